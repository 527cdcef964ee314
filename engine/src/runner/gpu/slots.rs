//! The GPU sampler's persistent input batch, host side: which device slot holds each live
//! request's sampling state, and the join records that bring a new request's parameters
//! and lists to that slot once (vLLM's persistent batch: updated by difference as requests
//! come and go, never re-uploaded whole). Plain bookkeeping, tested without a GPU.
use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use rvllm_kernels::sampling_state::{
    SlotJoin, SlotParams, BAD_SEQS_CAP, BAD_TOKENS_CAP, BIAS_CAP, HISTORY, SLOT_ALLOWED, SLOT_BIAS,
    SLOT_PENALTIES, STOP_CAP,
};

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
