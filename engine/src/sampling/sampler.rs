//! The CPU sampler: turns one position's logits into a token, as vLLM's v1 sampler does.
//!
//! Order of operations (vLLM v1): logprobs are taken from the raw logits; then min_tokens
//! masking, penalties (repetition over prompt + output, frequency/presence over output),
//! and either greedy argmax or temperature → min-p → top-k → top-p → one draw.
//!
//! Reproducibility: the draw at sampling step `s` uses a number derived only from
//! `(seed, s)`, so a seeded request gives the same tokens whatever else is in the batch and
//! after a preemption recomputes it.
use std::collections::{HashMap, HashSet};

use super::params::SamplingParams;
use crate::scheduler::TokenLogprobs;

/// One request's sampler, kept by the model runner for the life of the request.
#[derive(Debug, Clone)]
pub struct SeqSampler {
    params: SamplingParams,
    eos_token_ids: Vec<u32>,
    /// Prompt and output tokens, for the repetition penalty (empty when it is off).
    seen: HashSet<u32>,
    /// How often each token was generated, for frequency/presence penalties.
    output_counts: HashMap<u32, u32>,
    seed: u64,
}

impl SeqSampler {
    pub fn new(params: &SamplingParams, prompt_token_ids: &[u32], eos_token_ids: &[u32]) -> Self {
        let seen = if params.repetition_penalty != 1.0 {
            prompt_token_ids.iter().copied().collect()
        } else {
            HashSet::new()
        };
        Self {
            params: params.clone(),
            eos_token_ids: eos_token_ids.to_vec(),
            seen,
            output_counts: HashMap::new(),
            seed: params.seed.unwrap_or_else(rand::random),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The seed in use (the request's, or the random one chosen at `new`).
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Choose the next token from the raw logits of one position (`[vocab]`, modified in
    /// place). `step` is the number of tokens generated so far. Returns the token and, when
    /// `logprobs` was asked for, the log-softmax of the raw logits at the chosen token and
    /// the top-k.
    pub fn sample(&mut self, logits: &mut [f32], step: usize) -> (u32, Option<TokenLogprobs>) {
        if logits.is_empty() {
            return (0, None);
        }
        for l in logits.iter_mut() {
            if l.is_nan() {
                *l = f32::NEG_INFINITY; // a NaN must not poison sums or comparisons
            }
        }
        let raw = self.params.logprobs.map(|k| (logits.to_vec(), k));
        self.apply_min_tokens(logits, step);
        self.apply_penalties(logits);
        let token = if self.params.is_greedy() {
            argmax(logits)
        } else {
            self.draw(logits, uniform(self.seed, step as u64))
        };
        let logprobs = raw.map(|(raw, k)| top_logprobs(&raw, token, k));
        (token, logprobs)
    }

    /// Count a generated token for the penalties (the runner calls this after each sample).
    pub fn record_output(&mut self, token: u32) {
        *self.output_counts.entry(token).or_insert(0) += 1;
        if self.params.repetition_penalty != 1.0 {
            self.seen.insert(token);
        }
    }

    /// While fewer than min_tokens were generated, EOS (unless ignore_eos) and
    /// stop_token_ids cannot be chosen.
    pub(crate) fn apply_min_tokens(&self, logits: &mut [f32], step: usize) {
        if step >= self.params.min_tokens {
            return;
        }
        let eos = if self.params.ignore_eos {
            &[][..]
        } else {
            &self.eos_token_ids[..]
        };
        for &t in eos.iter().chain(&self.params.stop_token_ids) {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
    }

    /// vLLM's penalties: repetition divides positive and multiplies negative logits of every
    /// token seen in prompt or output; frequency subtracts `penalty * count` and presence
    /// `penalty` for every token generated so far.
    pub(crate) fn apply_penalties(&self, logits: &mut [f32]) {
        let rp = self.params.repetition_penalty;
        if rp != 1.0 {
            for &t in &self.seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 { *l / rp } else { *l * rp };
                }
            }
        }
        let (freq, pres) = (self.params.frequency_penalty, self.params.presence_penalty);
        if freq != 0.0 || pres != 0.0 {
            for (&t, &count) in &self.output_counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= freq * count as f32 + pres;
                }
            }
        }
    }

    /// Temperature, min-p, top-k, top-p, then the token where the cumulative probability
    /// passes `u` (in [0, 1)).
    fn draw(&self, logits: &[f32], u: f64) -> u32 {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            return 0; // everything masked: nothing to choose from
        }
        let inv_t = 1.0 / self.params.temperature;
        // Unnormalized probabilities; the largest is exactly 1.
        let probs: Vec<f32> = logits.iter().map(|&l| ((l - max) * inv_t).exp()).collect();
        // min-p keeps tokens with at least min_p times the top probability.
        let floor = self.params.min_p.max(f32::MIN_POSITIVE);
        let mut cand: Vec<u32> = (0..probs.len() as u32)
            .filter(|&i| probs[i as usize] >= floor)
            .collect();

        let k = self.params.top_k;
        if k > 0 && (k as usize) < cand.len() {
            // Keep every token at least as likely as the k-th (ties may keep a few more).
            let mut vals: Vec<f32> = cand.iter().map(|&i| probs[i as usize]).collect();
            let (_, kth, _) = vals.select_nth_unstable_by(k as usize - 1, |a, b| b.total_cmp(a));
            let kth = *kth;
            cand.retain(|&i| probs[i as usize] >= kth);
        }

        let top_p = self.params.top_p;
        if top_p < 1.0 {
            let mass: f64 = cand.iter().map(|&i| probs[i as usize] as f64).sum();
            // Tokens this unlikely are always outside the nucleus: even all of them together
            // hold at most (1 - top_p) of the mass. Dropping them first keeps the sort short.
            let cutoff = ((1.0 - top_p as f64) * mass / cand.len() as f64) as f32;
            cand.retain(|&i| probs[i as usize] > cutoff);
            cand.sort_unstable_by(|&a, &b| {
                probs[b as usize]
                    .total_cmp(&probs[a as usize])
                    .then(a.cmp(&b))
            });
            let limit = top_p as f64 * mass;
            let mut before = 0.0f64;
            let mut keep = 0;
            for &i in &cand {
                if keep > 0 && before >= limit {
                    break;
                }
                before += probs[i as usize] as f64;
                keep += 1;
            }
            cand.truncate(keep);
        }

        let mass: f64 = cand.iter().map(|&i| probs[i as usize] as f64).sum();
        let target = u * mass;
        let mut acc = 0.0f64;
        for &i in &cand {
            acc += probs[i as usize] as f64;
            if acc > target {
                return i;
            }
        }
        cand.last().copied().unwrap_or_else(|| argmax(logits))
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
    match log_softmax_shift(values) {
        Some((max, ln_sum)) => max + ln_sum as f32,
        None => f32::NEG_INFINITY,
    }
}

/// `(max, ln(sum(exp(x - max))))` over the non-NaN values, or None when there is no finite
/// maximum. A logprob is then `(x - max) - ln_sum`, which keeps full precision even when
/// the logits are large (adding `max` back first would round away small differences).
fn log_softmax_shift(values: &[f32]) -> Option<(f32, f64)> {
    let max = values
        .iter()
        .copied()
        .filter(|v| !v.is_nan())
        .fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return None;
    }
    let sum: f64 = values
        .iter()
        .filter(|v| !v.is_nan())
        .map(|&v| ((v - max) as f64).exp())
        .sum();
    Some((max, sum.ln()))
}

/// Log-softmax of `logits` at `chosen`, its rank, and the `k` most likely tokens (highest
/// first, the lower id first on ties). Also used for prompt logprobs.
pub fn top_logprobs(logits: &[f32], chosen: u32, k: usize) -> TokenLogprobs {
    let shift = log_softmax_shift(logits);
    let logprob = |v: f32| match shift {
        Some((max, ln_sum)) if !v.is_nan() => (((v - max) as f64) - ln_sum) as f32,
        _ => f32::NEG_INFINITY,
    };
    let top = top_k_indices(logits, k)
        .into_iter()
        .map(|i| (i, logprob(logits[i as usize])))
        .collect();
    // NaN ranks as -inf, as in top_k_indices; an id outside the vocabulary ranks last.
    let key = |v: f32| if v.is_nan() { f32::NEG_INFINITY } else { v };
    let rank = match logits.get(chosen as usize) {
        Some(&c) => logits.iter().filter(|&&v| key(v) >= key(c)).count(),
        None => logits.len() + 1,
    };
    TokenLogprobs {
        token_id: chosen,
        logprob: logits
            .get(chosen as usize)
            .map_or(f32::NEG_INFINITY, |&v| logprob(v)),
        rank: u32::try_from(rank).unwrap_or(u32::MAX),
        top,
    }
}

/// Ids of the `k` largest values, largest first (lower id first on ties, NaN last).
fn top_k_indices(values: &[f32], k: usize) -> Vec<u32> {
    let k = k.min(values.len());
    if k == 0 {
        return Vec::new();
    }
    let key = |i: u32| {
        let v = values[i as usize];
        if v.is_nan() {
            f32::NEG_INFINITY
        } else {
            v
        }
    };
    let order = |a: &u32, b: &u32| key(*b).total_cmp(&key(*a)).then(a.cmp(b));
    let mut ids: Vec<u32> = (0..values.len() as u32).collect();
    if k < ids.len() {
        ids.select_nth_unstable_by(k - 1, order);
        ids.truncate(k);
    }
    ids.sort_unstable_by(order);
    ids
}

/// splitmix64's output function: a well-mixed 64-bit hash of its input.
fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A uniform number in [0, 1) that depends only on (seed, step).
pub fn uniform(seed: u64, step: u64) -> f64 {
    let bits = mix64(seed ^ mix64(step));
    (bits >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

#[cfg(test)]
#[path = "sampler_tests.rs"]
mod tests;
