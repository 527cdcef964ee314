//! The CPU sampler: turns one position's logits into a token, through the one sampling
//! definition in `rvllm_kernels::reference` that the GPU kernels mirror.
//!
//! Order of operations (vLLM v1): logprobs are taken from the raw logits; then the
//! structured-output mask of a constrained request (`reference::apply_token_bitmask`, from its
//! `GrammarMatcher`); then the logits processors (`reference::apply_processors`: allowed ids,
//! bad words, min_tokens, logit bias, penalties) and the draw (`reference::sample_token`: greedy, or temperature, min-p,
//! top-k, top-p and a Gumbel-max draw).
//!
//! Reproducibility: the draw at sampling step `s` depends only on `(seed, s)` and the
//! logits, so a seeded request gives the same tokens whatever else is in the batch, after a
//! preemption recomputes it, and on the GPU.
use std::collections::{HashMap, HashSet};

use rvllm_kernels::reference as ops;

use super::params::SamplingParams;
use super::structured::{bitmask_words, GrammarMatcher, StructuredOutputs};
use crate::types::TokenLogprobs;

/// One request's sampler, kept by the model runner for the life of the request.
#[derive(Debug, Clone)]
pub struct SeqSampler {
    params: SamplingParams,
    /// EOS ids (none with `ignore_eos`) and `stop_token_ids`: masked before `min_tokens`.
    eos_and_stop: Vec<u32>,
    /// Distinct prompt and output tokens, for the repetition penalty (empty when it is off).
    seen: HashSet<u32>,
    /// How often each token was generated, for frequency/presence penalties.
    output_counts: HashMap<u32, u32>,
    /// The generated tokens, for bad words (empty when there are none).
    output: Vec<u32>,
    seed: u64,
    /// The structured-output matcher of a constrained request, and its mask buffer.
    grammar: Option<(GrammarMatcher, Vec<u32>)>,
}

impl SeqSampler {
    pub fn new(params: &SamplingParams, prompt_token_ids: &[u32], eos_token_ids: &[u32]) -> Self {
        let seen = if params.repetition_penalty != 1.0 {
            prompt_token_ids.iter().copied().collect()
        } else {
            HashSet::new()
        };
        let eos = if params.ignore_eos {
            &[][..]
        } else {
            eos_token_ids
        };
        Self {
            params: params.clone(),
            eos_and_stop: eos.iter().chain(&params.stop_token_ids).copied().collect(),
            seen,
            output_counts: HashMap::new(),
            output: Vec::new(),
            seed: params.seed.unwrap_or_else(rand::random),
            grammar: None,
        }
    }

    /// Constrains this sequence's tokens to `matcher`'s grammar (a request with
    /// `structured_output`); `vocab` is the model's logits per row.
    pub fn with_grammar(mut self, matcher: GrammarMatcher, vocab: usize) -> Self {
        self.grammar = Some((matcher, vec![0; bitmask_words(vocab)]));
        self
    }

    /// The sampler of a request that may be constrained: its matcher from `structured`, or
    /// one allowing only end of sequence when the constraint cannot be applied (admission
    /// refuses such requests; this keeps a bypass from running unconstrained).
    pub fn for_request(
        params: &SamplingParams,
        prompt_token_ids: &[u32],
        eos_token_ids: &[u32],
        structured: Option<&StructuredOutputs>,
        vocab: usize,
    ) -> Self {
        let sampler = Self::new(params, prompt_token_ids, eos_token_ids);
        let Some(spec) = &params.structured_output else {
            return sampler;
        };
        let matcher = match structured.map(|s| s.matcher(spec)) {
            Some(Ok(m)) => m,
            Some(Err(e)) => GrammarMatcher::refused(eos_token_ids, vocab, &e),
            None => GrammarMatcher::refused(eos_token_ids, vocab, "no structured output here"),
        };
        sampler.with_grammar(matcher, vocab)
    }

    /// Whether the sequence is constrained by a grammar.
    pub fn is_constrained(&self) -> bool {
        self.grammar.is_some()
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The seed in use (the request's, or the random one chosen at `new`).
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The draw settings of sampling step `step`, as the GPU sampler takes them.
    pub fn draw_params(&self, step: usize) -> ops::SampleParams {
        ops::SampleParams {
            temperature: self.params.temperature,
            top_k: self.params.top_k,
            top_p: self.params.top_p,
            min_p: self.params.min_p,
            seed: self.seed,
            offset: step as u64,
        }
    }

    /// Choose the next token from the raw logits of one position (`[vocab]`, modified in
    /// place). `step` is the number of tokens generated so far. Returns the token and, when
    /// `logprobs` was asked for, the log-softmax of the raw logits at the chosen token and
    /// the top-k.
    pub fn sample(&mut self, logits: &mut [f32], step: usize) -> (u32, Option<TokenLogprobs>) {
        if logits.is_empty() {
            return (0, None);
        }
        ops::clear_nan(logits);
        let raw = self.params.logprobs.map(|k| (logits.to_vec(), k));
        let mut min_tokens_apply = true;
        if let Some((matcher, words)) = &mut self.grammar {
            matcher.fill_bitmask(words);
            ops::apply_token_bitmask(logits, words);
            // A finished grammar allows only end of sequence, which ends the request even
            // before `min_tokens`: masking it as well would leave no token to sample.
            min_tokens_apply = !matcher.is_finished();
        }
        self.apply_processors(logits, step, min_tokens_apply);
        let token = ops::sample_token(logits, &self.draw_params(step)) as u32;
        let logprobs = raw.map(|(raw, k)| top_logprobs(&raw, token, k));
        (token, logprobs)
    }

    /// Count a generated token for the penalties and bad words (the runner calls this after
    /// each sample).
    pub fn record_output(&mut self, token: u32) {
        if let Some((matcher, _)) = &mut self.grammar {
            matcher.accept(token);
        }
        *self.output_counts.entry(token).or_insert(0) += 1;
        if self.params.repetition_penalty != 1.0 {
            self.seen.insert(token);
        }
        if !self.params.bad_words_token_ids.is_empty() {
            self.output.push(token);
        }
    }

    /// `reference::apply_processors` with this request's settings, from the incremental
    /// counts (the same result: each step is the reference's own function). `step` is the
    /// number of tokens generated so far; `min_tokens_apply` false skips `min_tokens` (a
    /// finished grammar).
    pub(crate) fn apply_processors(&self, logits: &mut [f32], step: usize, min_tokens_apply: bool) {
        let p = &self.params;
        if let Some(allowed) = &p.allowed_token_ids {
            ops::apply_allowed_token_ids(logits, allowed);
        }
        ops::apply_bad_words(logits, &p.bad_words_token_ids, &self.output);
        if min_tokens_apply {
            ops::apply_min_tokens(logits, p.min_tokens, &self.eos_and_stop, step);
        }
        ops::apply_logit_bias(logits, &p.logit_bias);
        self.apply_penalties(logits);
    }

    /// vLLM's penalties: repetition over every distinct token of prompt and output, then
    /// frequency and presence over the generated tokens (`reference`'s definitions).
    pub(crate) fn apply_penalties(&self, logits: &mut [f32]) {
        let rp = self.params.repetition_penalty;
        if rp != 1.0 {
            for &t in &self.seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = ops::repetition_penalized(*l, rp);
                }
            }
        }
        let (freq, pres) = (self.params.frequency_penalty, self.params.presence_penalty);
        if freq != 0.0 || pres != 0.0 {
            for (&t, &count) in &self.output_counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = ops::frequency_presence_penalized(*l, count, freq, pres);
                }
            }
        }
    }
}

/// Index of the largest value; the lowest index wins ties (NaN never wins).
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_val = f32::NEG_INFINITY;
    for (i, &v) in values.iter().enumerate() {
        if v > best_val {
            best = i;
            best_val = v;
        }
    }
    best as u32
}

/// log(sum(exp(x))), stable for large values; -inf when every value is -inf (or NaN).
pub fn log_sum_exp(values: &[f32]) -> f32 {
    match ops::log_softmax_shift(values) {
        Some((max, ln_sum)) => max + ln_sum as f32,
        None => f32::NEG_INFINITY,
    }
}

/// Log-softmax of `logits` at `chosen`, its rank, and the `k` most likely tokens (highest
/// first, the lower id first on ties): `reference::top_logprobs`. Also used for prompt
/// logprobs.
pub fn top_logprobs(logits: &[f32], chosen: u32, k: usize) -> TokenLogprobs {
    let lp = ops::top_logprobs(logits, chosen, k);
    TokenLogprobs {
        token_id: chosen,
        logprob: lp.logprob,
        rank: lp.rank,
        top: lp.top,
    }
}

#[cfg(test)]
#[path = "sampler_tests.rs"]
mod tests;
