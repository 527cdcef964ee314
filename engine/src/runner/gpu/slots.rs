//! The GPU sampler's persistent input batch, host side: which device slot holds each live
//! request's sampling state, and the join records that bring a new request's parameters
//! and lists to that slot once (vLLM's persistent batch: updated by difference as requests
//! come and go, never re-uploaded whole); and the grammars of constrained requests
//! (structured output), whose masks the host builds for each step. Plain bookkeeping,
//! tested without a GPU.
use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use rvllm_kernels::sampling_state::{
    SlotJoin, SlotParams, BAD_SEQS_CAP, BAD_TOKENS_CAP, BIAS_CAP, HISTORY, SLOT_ALLOWED, SLOT_BIAS,
    SLOT_PENALTIES, STOP_CAP,
};

use crate::sampling::structured::{bitmask_words, GrammarMatcher, StructuredSupport};
use crate::sampling::SamplingParams;
use crate::scheduler::RequestId;

/// Slot assignment: a request keeps its slot from its first step until it finishes (also
/// across preemption, so its counts and recent output survive the recompute).
#[derive(Debug)]
pub struct SlotTable {
    free: Vec<u32>,
    by_request: HashMap<RequestId, u32>,
}

impl SlotTable {
    pub fn new(slots: usize) -> Self {
        Self {
            free: (0..slots as u32).rev().collect(),
            by_request: HashMap::new(),
        }
    }

    pub fn get(&self, id: RequestId) -> Option<u32> {
        self.by_request.get(&id).copied()
    }

    /// A free slot for `id`, which must not hold one.
    pub fn join(&mut self, id: RequestId) -> Result<u32> {
        if self.by_request.contains_key(&id) {
            bail!("request {id} joined the GPU sampler twice; this is a bug");
        }
        let Some(slot) = self.free.pop() else {
            bail!(
                "more live requests than the GPU sampler has slots ({}); the scheduler keeps at \
                 most --max-num-seqs, so this is a bug",
                self.by_request.len()
            );
        };
        self.by_request.insert(id, slot);
        Ok(slot)
    }

    pub fn leave(&mut self, id: RequestId) {
        if let Some(slot) = self.by_request.remove(&id) {
            self.free.push(slot);
        }
    }

    pub fn live(&self) -> usize {
        self.by_request.len()
    }
}

/// Joins of one step, as `slot_init` reads them: the records and the i32 data their lists
/// point into.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct JoinBatch {
    pub joins: Vec<SlotJoin>,
    pub data: Vec<i32>,
}

impl JoinBatch {
    pub fn is_empty(&self) -> bool {
        self.joins.is_empty()
    }

    pub fn clear(&mut self) {
        self.joins.clear();
        self.data.clear();
    }

    /// Bytes of the upload: the records, then the data.
    pub fn bytes(&self) -> usize {
        std::mem::size_of_val(self.joins.as_slice()) + 4 * self.data.len()
    }

    /// Adds request state for `slot`: `seed` is the request's (or the one chosen for it),
    /// `eos` the model's end-of-sequence ids.
    pub fn push(
        &mut self,
        slot: u32,
        p: &SamplingParams,
        seed: u64,
        prompt: &[u32],
        eos: &[u32],
    ) -> Result<()> {
        let penalties =
            p.repetition_penalty != 1.0 || p.frequency_penalty != 0.0 || p.presence_penalty != 0.0;
        let mut flags = 0;
        if penalties {
            flags |= SLOT_PENALTIES;
        }
        // Lists a request does not use start where its data starts, with length 0.
        let start = self.data.len() as i32;
        let mut join = SlotJoin {
            slot: slot as i32,
            prompt_at: start,
            allowed_at: start,
            bias_at: start,
            stops_at: start,
            bad_at: start,
            ..SlotJoin::default()
        };
        let ids = |v: &[u32]| v.iter().map(|&t| t as i32).collect::<Vec<i32>>();
        if p.repetition_penalty != 1.0 {
            join.prompt_at = self.data.len() as i32;
            join.n_prompt = prompt.len() as i32;
            self.data.extend(ids(prompt));
        }
        if let Some(allowed) = &p.allowed_token_ids {
            flags |= SLOT_ALLOWED;
            join.allowed_at = self.data.len() as i32;
            join.n_allowed = allowed.len() as i32;
            self.data.extend(ids(allowed));
        }
        if !p.logit_bias.is_empty() {
            if p.logit_bias.len() > BIAS_CAP {
                bail!(
                    "{} logit_bias entries; the GPU sampler holds at most {BIAS_CAP}",
                    p.logit_bias.len()
                );
            }
            flags |= SLOT_BIAS;
            let mut bias = p.logit_bias.clone();
            bias.sort_by_key(|&(t, _)| t);
            join.bias_at = self.data.len() as i32;
            for (t, v) in bias {
                self.data.extend([t as i32, v.to_bits() as i32]);
            }
        }
        let mut stops = Vec::new();
        if p.min_tokens > 0 {
            if !p.ignore_eos {
                stops.extend_from_slice(eos);
            }
            stops.extend_from_slice(&p.stop_token_ids);
            if stops.len() > STOP_CAP {
                bail!(
                    "{} EOS and stop-token ids under min_tokens; the GPU sampler holds at most {STOP_CAP}",
                    stops.len()
                );
            }
        }
        join.stops_at = self.data.len() as i32;
        self.data.extend(ids(&stops));
        let words = &p.bad_words_token_ids;
        let total: usize = words.iter().map(Vec::len).sum();
        if words.len() > BAD_SEQS_CAP
            || total > BAD_TOKENS_CAP
            || words.iter().any(|w| w.is_empty() || w.len() > HISTORY + 1)
        {
            bail!(
                "bad_words: {} token sequences of {total} tokens; the GPU sampler holds at most \
                 {BAD_SEQS_CAP} sequences, {BAD_TOKENS_CAP} tokens, {} tokens a word",
                words.len(),
                HISTORY + 1
            );
        }
        join.bad_at = self.data.len() as i32;
        self.data.extend(words.iter().map(|w| w.len() as i32));
        for w in words {
            self.data.extend(ids(w));
        }
        let top_k = if p.top_k <= 0 { 0 } else { p.top_k };
        join.params = SlotParams {
            temperature: p.temperature,
            top_k,
            top_p: p.top_p,
            min_p: p.min_p,
            seed,
            repetition_penalty: p.repetition_penalty,
            frequency_penalty: p.frequency_penalty,
            presence_penalty: p.presence_penalty,
            min_tokens: i32::try_from(p.min_tokens).context("min_tokens")?,
            flags,
            n_bias: p.logit_bias.len() as i32,
            n_stop: stops.len() as i32,
            n_bad: words.len() as i32,
            reserved: [0; 2],
        };
        self.joins.push(join);
        Ok(())
    }
}

/// Structured output on the GPU runner, host side: each constrained request's grammar
/// matcher, advanced by its sampled tokens as their steps are collected, and the masks of a
/// step's constrained rows in vLLM's layout (bit `t % 32` of word `t / 32`,
/// `bitmask_words(vocab)` words a row), one mask row per constrained sampled row, compacted.
/// `row_mask[r]` names sampled row `r`'s mask row, -1 for an unconstrained row, which the
/// device leaves alone (so unconstrained rows cost no upload and no work).
///
/// A mask needs the request's previous token, which lookahead scheduling leaves on the
/// device: a step with a constrained row whose last token is in a step not yet collected
/// waits for that step first (`must_wait`; vLLM v1 likewise takes structured-output requests
/// out of async scheduling's overlap).
pub struct Grammars {
    support: StructuredSupport,
    vocab: usize,
    eos: Vec<u32>,
    by_request: HashMap<RequestId, Grammar>,
}

struct Grammar {
    matcher: GrammarMatcher,
    /// The request's `min_tokens` still masks EOS on the device. A finished grammar allows
    /// only end of sequence, which ends the request before `min_tokens` (as the CPU sampler
    /// does): the device must stop applying it.
    min_tokens_on_device: bool,
}

/// What `Grammars::fill_masks` wrote.
#[derive(Debug, Default, PartialEq)]
pub struct StepMasks {
    /// Mask rows written: the step's constrained rows.
    pub rows: usize,
    /// Requests whose grammar has finished while their `min_tokens` is still applied on the
    /// device: the runner clears it before the step (once per request).
    pub end_min_tokens: Vec<RequestId>,
}

impl Grammars {
    /// For a model of `vocab` logits per row whose end-of-sequence ids are `eos`.
    pub fn new(support: StructuredSupport, vocab: usize, eos: &[u32]) -> Self {
        Self {
            support,
            vocab,
            eos: eos.to_vec(),
            by_request: HashMap::new(),
        }
    }

    /// Words of one mask row.
    pub fn words(&self) -> usize {
        bitmask_words(self.vocab)
    }

    /// Starts the grammar of a constrained request (nothing for any other, or one already
    /// started: a preempted request keeps its position). A constraint that cannot be built
    /// here (admission checks it first) allows only end of sequence, never free output.
    pub fn join(&mut self, id: RequestId, p: &SamplingParams) {
        let Some(spec) = &p.structured_output else {
            return;
        };
        if self.by_request.contains_key(&id) {
            return;
        }
        let matcher = match self.support.get().map(|s| s.matcher(spec)) {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => GrammarMatcher::refused(&self.eos, self.vocab, &e),
            Err(why) => GrammarMatcher::refused(&self.eos, self.vocab, &why),
        };
        self.by_request.insert(
            id,
            Grammar {
                matcher,
                min_tokens_on_device: p.min_tokens > 0,
            },
        );
    }

    pub fn leave(&mut self, id: RequestId) {
        self.by_request.remove(&id);
    }

    pub fn is_empty(&self) -> bool {
        self.by_request.is_empty()
    }

    pub fn is_constrained(&self, id: RequestId) -> bool {
        self.by_request.contains_key(&id)
    }

    /// Advances `id`'s grammar past its sampled `token` (nothing for an unconstrained one).
    pub fn accept(&mut self, id: RequestId, token: u32) {
        if let Some(g) = self.by_request.get_mut(&id) {
            g.matcher.accept(token);
        }
    }

    /// Whether a step sampling `step` must wait for the steps still queued (their sampled
    /// requests, `queued`): when one of them holds the last token of a constrained request
    /// of this step, whose mask depends on it.
    pub fn must_wait(
        &self,
        step: &[RequestId],
        queued: impl IntoIterator<Item = RequestId>,
    ) -> bool {
        if self.is_empty() {
            return false;
        }
        let constrained: Vec<RequestId> = step
            .iter()
            .copied()
            .filter(|&id| self.is_constrained(id))
            .collect();
        !constrained.is_empty() && queued.into_iter().any(|id| constrained.contains(&id))
    }

    /// The masks of the step whose sampled rows belong to `rows` (a request at most once):
    /// `row_mask` (at least `rows.len()` long) gets each row's mask row or -1, `masks` the
    /// packed mask rows one after another. Every grammar must have seen its request's tokens
    /// so far. Many rows are filled on several threads (each matcher is independent; a
    /// JSON schema's mask takes llguidance tens to hundreds of microseconds).
    pub fn fill_masks(
        &mut self,
        rows: &[RequestId],
        row_mask: &mut [i32],
        masks: &mut [u32],
    ) -> Result<StepMasks> {
        let words = self.words();
        if row_mask.len() < rows.len() {
            bail!(
                "{} sampled rows but room for {} mask indexes; this is a bug",
                rows.len(),
                row_mask.len()
            );
        }
        let mut mask_of: HashMap<RequestId, usize> = HashMap::new();
        for (r, id) in rows.iter().enumerate() {
            row_mask[r] = match self.by_request.contains_key(id) {
                true => {
                    let k = mask_of.len();
                    if mask_of.insert(*id, k).is_some() {
                        bail!("request {id} has two sampled rows in one step; this is a bug");
                    }
                    k as i32
                }
                false => -1,
            };
        }
        let n = mask_of.len();
        if masks.len() < n * words {
            bail!(
                "{n} grammar masks but room for {}; this is a bug",
                masks.len() / words
            );
        }
        let mut dst: Vec<Option<&mut [u32]>> = masks.chunks_mut(words).take(n).map(Some).collect();
        let mut work: Vec<(RequestId, &mut Grammar, &mut [u32])> = Vec::with_capacity(n);
        for (id, g) in self.by_request.iter_mut() {
            if let Some(&k) = mask_of.get(id) {
                let d = dst[k]
                    .take()
                    .context("a mask row given twice; this is a bug")?;
                work.push((*id, g, d));
            }
        }
        let fill = |part: &mut [(RequestId, &mut Grammar, &mut [u32])]| -> Vec<RequestId> {
            let mut ended = Vec::new();
            for (id, g, d) in part.iter_mut() {
                g.matcher.fill_bitmask(d);
                if g.min_tokens_on_device && g.matcher.is_finished() {
                    g.min_tokens_on_device = false;
                    ended.push(*id);
                }
            }
            ended
        };
        let threads = std::thread::available_parallelism().map_or(1, |t| t.get().min(8));
        let mut end_min_tokens = if n >= PARALLEL_MASKS && threads > 1 {
            let per = n.div_ceil(threads);
            std::thread::scope(|scope| {
                let handles: Vec<_> = work
                    .chunks_mut(per)
                    .map(|part| scope.spawn(move || fill(part)))
                    .collect();
                let mut ended = Vec::new();
                for h in handles {
                    match h.join() {
                        Ok(e) => ended.extend(e),
                        Err(_) => bail!("building a grammar mask panicked"),
                    }
                }
                Ok(ended)
            })?
        } else {
            fill(&mut work)
        };
        end_min_tokens.sort_by_key(|id| mask_of[id]);
        Ok(StepMasks {
            rows: n,
            end_min_tokens,
        })
    }
}

/// Constrained rows from which a step's masks are built on several threads.
const PARALLEL_MASKS: usize = 4;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_reused_after_leaving_and_never_shared() {
        let mut t = SlotTable::new(2);
        let a = t.join(1).unwrap();
        let b = t.join(2).unwrap();
        assert_ne!(a, b);
        assert!(t.join(3).is_err(), "a third request has no slot");
        assert!(t.join(1).is_err(), "joining twice is refused");
        t.leave(1);
        assert_eq!(t.join(3).unwrap(), a);
        assert_eq!(t.get(2), Some(b));
        assert_eq!(t.live(), 2);
    }

    #[test]
    fn a_join_carries_only_the_lists_its_processors_use() {
        let mut j = JoinBatch::default();
        j.push(0, &SamplingParams::default(), 7, &[1, 2, 3], &[9])
            .unwrap();
        assert_eq!(j.joins[0].params.flags, 0);
        assert!(j.data.is_empty(), "{:?}", j.data);
        assert_eq!(j.joins[0].params.seed, 7);

        let p = SamplingParams {
            repetition_penalty: 1.2,
            min_tokens: 2,
            stop_token_ids: vec![5],
            logit_bias: vec![(8, -1.5), (3, 2.0)],
            allowed_token_ids: Some(vec![3, 4]),
            bad_words_token_ids: vec![vec![6], vec![7, 8]],
            ..SamplingParams::default()
        };
        j.push(1, &p, 0, &[1, 2], &[9]).unwrap();
        let r = j.joins[1];
        assert_eq!(r.slot, 1);
        assert_eq!(r.params.flags, SLOT_PENALTIES | SLOT_ALLOWED | SLOT_BIAS);
        let at = |start: i32, n: usize| j.data[start as usize..start as usize + n].to_vec();
        assert_eq!(at(r.prompt_at, 2), vec![1, 2]);
        assert_eq!(at(r.allowed_at, 2), vec![3, 4]);
        // Sorted by token; values as f32 bits.
        assert_eq!(
            at(r.bias_at, 4),
            vec![3, 2.0f32.to_bits() as i32, 8, (-1.5f32).to_bits() as i32]
        );
        assert_eq!(r.params.n_stop, 2);
        assert_eq!(at(r.stops_at, 2), vec![9, 5]);
        assert_eq!(r.params.n_bad, 2);
        assert_eq!(at(r.bad_at, 5), vec![1, 2, 6, 7, 8]);
        assert_eq!(j.bytes(), 2 * 96 + 4 * j.data.len());
    }

    /// The grammars of the tiny llama3 fixture's tokenizer (512 tokens, one per ASCII
    /// character among them; EOS 2).
    fn tiny_grammars() -> (tokenizers::Tokenizer, Grammars) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/tiny/llama3_hd64/tokenizer.json");
        let tok = tokenizers::Tokenizer::from_file(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let support = StructuredSupport::lazy(Some(&tok), &[2], 512);
        (tok, Grammars::new(support, 512, &[2]))
    }

    fn token(tok: &tokenizers::Tokenizer, s: &str) -> u32 {
        tok.token_to_id(s)
            .unwrap_or_else(|| panic!("no token {s:?}"))
    }

    fn is_set(mask: &[u32], t: u32) -> bool {
        mask[t as usize / 32] >> (t % 32) & 1 == 1
    }

    fn choice(choices: &[&str]) -> SamplingParams {
        SamplingParams {
            structured_output: Some(crate::sampling::StructuredOutput::Choice(
                choices.iter().map(|c| c.to_string()).collect(),
            )),
            ..SamplingParams::default()
        }
    }

    #[test]
    fn masks_go_to_constrained_rows_only_compacted_in_row_order() {
        let (tok, mut g) = tiny_grammars();
        let words = g.words();
        assert_eq!(words, 16);
        g.join(10, &choice(&["yes", "no"]));
        g.join(11, &SamplingParams::default());
        g.join(12, &choice(&["maybe"]));
        assert!(g.is_constrained(10) && g.is_constrained(12) && !g.is_constrained(11));
        // Rows: 11 (free), 12, 10; a padding row index stays as the caller left it.
        let mut row_mask = vec![-7; 4];
        let mut masks = vec![u32::MAX; 4 * words];
        let m = g
            .fill_masks(&[11, 12, 10], &mut row_mask, &mut masks)
            .unwrap();
        assert_eq!(m.rows, 2);
        assert!(m.end_min_tokens.is_empty());
        assert_eq!(row_mask[..3], [-1, 0, 1]);
        let (m12, m10) = (&masks[..words], &masks[words..2 * words]);
        let (y, n, mm) = (token(&tok, "y"), token(&tok, "n"), token(&tok, "m"));
        assert!(is_set(m10, y) && is_set(m10, n) && !is_set(m10, mm));
        assert!(is_set(m12, mm) && !is_set(m12, y) && !is_set(m12, 2));
        // Rows past the ones written keep what they held.
        assert!(masks[2 * words..].iter().all(|&w| w == u32::MAX));

        // The grammar follows the accepted tokens: after "n", only "o".
        g.accept(10, n);
        g.accept(11, y); // unconstrained: nothing to advance
        let m = g.fill_masks(&[10], &mut row_mask, &mut masks).unwrap();
        assert_eq!((m.rows, row_mask[0]), (1, 0));
        let allowed: Vec<u32> = (0..512).filter(|&t| is_set(&masks[..words], t)).collect();
        assert_eq!(allowed, vec![token(&tok, "o")]);
        g.leave(10);
        assert!(!g.is_constrained(10));
    }

    #[test]
    fn many_rows_filled_on_threads_match_one_at_a_time() {
        let (tok, mut g) = tiny_grammars();
        let (mut one, words) = (tiny_grammars().1, g.words());
        let specs = ["ab", "cd", "ef", "gh", "ij", "kl", "mn", "op", "qr", "st"];
        let mut rows = Vec::new();
        for (i, c) in specs.iter().enumerate() {
            let id = 100 + i as RequestId;
            let p = SamplingParams {
                min_tokens: i % 2,
                ..choice(&[c, "z"])
            };
            g.join(id, &p);
            one.join(id, &p);
            // Half of them one character in; the odd ones' grammars finish with it.
            if i % 2 == 1 {
                let first = token(&tok, &c[..1]);
                let second = token(&tok, &c[1..]);
                for t in [first, second] {
                    g.accept(id, t);
                    one.accept(id, t);
                }
            }
            rows.push(id);
            rows.push(i as RequestId); // unconstrained neighbours between them
        }
        let mut row_mask = vec![0; rows.len()];
        let mut masks = vec![0u32; specs.len() * words];
        let m = g.fill_masks(&rows, &mut row_mask, &mut masks).unwrap();
        assert_eq!(m.rows, specs.len());
        // The odd requests (min_tokens 1, grammar finished), in row order.
        assert_eq!(m.end_min_tokens, vec![101, 103, 105, 107, 109]);
        for (r, &id) in rows.iter().enumerate() {
            if id < 100 {
                assert_eq!(row_mask[r], -1);
                continue;
            }
            let k = row_mask[r] as usize;
            let (mut idx, mut alone) = (vec![0; 1], vec![0u32; words]);
            one.fill_masks(&[id], &mut idx, &mut alone).unwrap();
            assert_eq!(
                &masks[k * words..(k + 1) * words],
                &alone[..],
                "request {id}"
            );
        }
    }

    #[test]
    fn a_finished_grammar_allows_only_eos_and_ends_min_tokens_once() {
        let (tok, mut g) = tiny_grammars();
        let words = g.words();
        g.join(
            1,
            &SamplingParams {
                min_tokens: 50,
                ..choice(&["a"])
            },
        );
        g.join(2, &choice(&["a"])); // no min_tokens: nothing to clear
        g.accept(1, token(&tok, "a"));
        g.accept(2, token(&tok, "a"));
        let (mut row_mask, mut masks) = (vec![0; 2], vec![0; 2 * words]);
        let m = g.fill_masks(&[1, 2], &mut row_mask, &mut masks).unwrap();
        assert_eq!(m.end_min_tokens, vec![1]);
        for k in 0..2 {
            let allowed: Vec<u32> = (0..512)
                .filter(|&t| is_set(&masks[k * words..], t))
                .collect();
            assert_eq!(allowed, vec![2], "mask row {k}: only EOS");
        }
        let m = g.fill_masks(&[1, 2], &mut row_mask, &mut masks).unwrap();
        assert!(m.end_min_tokens.is_empty(), "cleared once");
    }

    #[test]
    fn a_constraint_that_cannot_be_built_allows_only_eos() {
        let mut g = Grammars::new(StructuredSupport::refused("no masks here"), 512, &[2]);
        g.join(1, &choice(&["a"]));
        let (mut row_mask, mut masks) = (vec![0; 1], vec![0; 16]);
        g.fill_masks(&[1], &mut row_mask, &mut masks).unwrap();
        let allowed: Vec<u32> = (0..512).filter(|&t| is_set(&masks, t)).collect();
        assert_eq!(allowed, vec![2]);
    }

    #[test]
    fn a_step_waits_only_for_queued_tokens_of_its_constrained_requests() {
        let (_, mut g) = tiny_grammars();
        assert!(!g.must_wait(&[1, 2], [1, 2]), "nothing constrained");
        g.join(1, &choice(&["a"]));
        // Request 1's last token is in a queued step: its mask must wait for it.
        assert!(g.must_wait(&[1, 2], [2, 1]));
        // Only unconstrained requests in flight, or request 1 not in this step: no wait.
        assert!(!g.must_wait(&[1, 2], [2, 3]));
        assert!(!g.must_wait(&[2, 3], [1, 2]));
        // Its first sampled row (nothing queued for it): no wait.
        assert!(!g.must_wait(&[1], []));
    }

    #[test]
    fn lists_beyond_the_device_capacity_are_refused_by_name() {
        let p = SamplingParams {
            logit_bias: (0..BIAS_CAP as u32 + 1).map(|t| (t, 1.0)).collect(),
            ..SamplingParams::default()
        };
        let e = JoinBatch::default().push(0, &p, 0, &[], &[]).unwrap_err();
        assert!(e.to_string().contains("logit_bias"), "{e}");
        let p = SamplingParams {
            bad_words_token_ids: vec![vec![1; HISTORY + 2]],
            ..SamplingParams::default()
        };
        let e = JoinBatch::default().push(0, &p, 0, &[], &[]).unwrap_err();
        assert!(e.to_string().contains("bad_words"), "{e}");
    }
}
