//! The one definition of sampling: logits processors, the seeded draw and logprobs. The CPU
//! engine samples through these functions every token and the CUDA kernels
//! (`sampling.cu` and the device processors) mirror them, so that the same logits and the
//! same `(seed, step)` give the same token on either path.
//!
//! Every step below is written as the f32 operations it performs, in order, each rounded
//! (no fused multiply-add: the kernels use `__fmul_rn`, `__fadd_rn`, `__fsub_rn`,
//! `__fdiv_rn`). Two things cannot be bit-exact across CPU and GPU: `logf` (Gumbel noise,
//! min-p floor) and `exp2f` (top-p mass), whose last bit may differ between the C library and
//! CUDA's; they move a token only at float near-ties, which random logits essentially never
//! produce.
//!
//! The uniform behind the Gumbel noise is clamped to `1 - 2^-24` ([`gumbel_noise`]): without
//! it the top hash value gives u = 1 and +inf noise, and a random token wins about one draw
//! in 110 at vocab 150k whatever its logit. `sampling.cu`'s `gumbel()` needs the same clamp
//! (`fminf(u, 0x1.fffffep-1f)`) to agree on those draws.
//!
//! Contract on the logits: no NaN (the processors' first step maps NaN to -inf) and no +inf.
//! -inf marks a token that cannot be chosen.

/// One row's draw settings, as `sample_tokens` takes them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleParams {
    /// Below 1e-5: greedy.
    pub temperature: f32,
    /// <= 0 or >= vocab: disabled; 1: greedy.
    pub top_k: i32,
    /// In (0, 1]; >= 1 disables.
    pub top_p: f32,
    /// In [0, 1]; <= 0 disables.
    pub min_p: f32,
    pub seed: u64,
    /// The request's sampling step: how many tokens it generated before this one.
    pub offset: u64,
}

impl SampleParams {
    /// Greedy: temperature below 1e-5 or top-k 1 (whatever the temperature).
    pub fn is_greedy(&self) -> bool {
        self.temperature < 1e-5 || self.top_k == 1
    }
}

/// `log2(e)` as the kernels round it to f32.
const LOG2E: f32 = std::f32::consts::LOG2_E;
/// Top-p masses are fixed point with 40 fractional bits.
const MASS_SCALE: f64 = (1u64 << 40) as f64;

/// The first index of the largest logit (strict `>` in index order); 0 when every logit is
/// -inf (or the row is empty).
pub fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best
}

/// `log_softmax(logits)[idx]`, computed in f64.
pub fn log_softmax_at(logits: &[f32], idx: usize) -> f32 {
    let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let s: f64 = logits.iter().map(|&l| (l as f64 - m).exp()).sum();
    (logits[idx] as f64 - m - s.ln()) as f32
}

/// The order-preserving integer key of a float (sampling.cu's `order_key`): larger float,
/// larger key. All thresholds compare keys, so -0.0 ranks just below +0.0.
pub fn order_key(x: f32) -> u32 {
    let u = x.to_bits();
    if u & 0x8000_0000 != 0 {
        !u
    } else {
        u | 0x8000_0000
    }
}

/// A token's top-p weight: `(u64)((f64) exp2f(((l - lmax) * inv_t) * LOG2E) * 2^40)`, the
/// f32 operations in that order, the product in f64, truncated. At most 2^40 (the maximum).
pub fn top_p_mass(l: f32, lmax: f32, inv_t: f32) -> u64 {
    let e = ((l - lmax) * inv_t) * LOG2E;
    if e < -41.0 {
        return 0; // exp2f(e) < 2^-41: the product truncates to 0 (saves the exp2)
    }
    (f64::from(e.exp2()) * MASS_SCALE) as u64
}

pub(crate) fn mix64(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58476d1ce4e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d049bb133111eb);
    x ^= x >> 31;
    x
}

/// The per-draw key: `mix64(seed ^ mix64(offset))`.
fn draw_key(seed: u64, offset: u64) -> u64 {
    mix64(seed ^ mix64(offset))
}

/// The largest uniform the noise uses, `1 - 2^-24` (0x3f7fffff): for the top hash value,
/// `(h >> 40) + 0.5` rounds (ties to even) to 2^24, so u would be exactly 1 and the noise
/// +inf, which makes that token win whatever its logit (about 1 draw in 110 at vocab 150k).
const U_MAX: f32 = 1.0 - 1.0 / 16_777_216.0;

fn gumbel_of_key(key: u64, i: usize) -> f32 {
    let h = mix64(key.wrapping_add((i as u64).wrapping_mul(0x9E3779B97F4A7C15)));
    let u = (((h >> 40) as f32 + 0.5) * (1.0 / 16_777_216.0)).min(U_MAX);
    -(-u.ln()).ln()
}

/// The Gumbel noise added to token `i` in draw `(seed, offset)`: with
/// `key = mix64(seed ^ mix64(offset))` and `h = mix64(key + i * 0x9E3779B97F4A7C15)` (u64
/// wrapping), `u = min(((f32)(h >> 40) + 0.5) * 2^-24, 1 - 2^-24)` (f32; the clamp matters
/// for the top hash value only, whose u rounds to 1 and would give +inf noise) and the noise
/// is `-logf(-logf(u))`, always finite: in about [-2.8, 16.6].
/// `mix64` is splitmix64's finaliser (xor-shift 30, multiply 0xbf58476d1ce4e5b9, xor-shift
/// 27, multiply 0x94d049bb133111eb, xor-shift 31).
pub fn gumbel_noise(seed: u64, offset: u64, i: usize) -> f32 {
    gumbel_of_key(draw_key(seed, offset), i)
}

/// The smallest order key a token needs to stay in the draw after min-p, top-k and top-p
/// (`kept[i] = order_key(logits[i]) >= floor`). With `lmax` the largest logit and
/// `inv_t = 1.0f / T`:
/// - min-p (when `min_p > 0`): `floor = order_key(lmax + T * logf(min_p))` (f32: multiply,
///   then add);
/// - top-k (when `0 < top_k < vocab`): `floor = max(floor, key of the top_k-th largest
///   logit)`, counted over the whole row (not only what min-p kept), ties all kept;
/// - top-p (when `top_p < 1`): over the tokens with key >= floor, `total` = the u64 sum of
///   [`top_p_mass`], `need = ceil((f64) top_p * (f64) total)` clamped to `[1, total]`, and
///   `floor = max(floor, tau)` where tau is the largest key whose kept-at-or-above mass
///   (keys >= tau and >= floor) is >= need: whole ties kept.
///
/// 0 (keep everything) when no filter is on. Callers handle an all -inf row before this.
pub fn kept_floor_key(logits: &[f32], p: &SampleParams) -> u32 {
    let vocab = logits.len();
    let lmax = logits[argmax(logits)];
    let mut floor = 0u32;
    if p.min_p > 0.0 {
        floor = order_key(lmax + p.temperature * p.min_p.ln());
    }
    if p.top_k > 0 && (p.top_k as usize) < vocab {
        let mut keys: Vec<u32> = logits.iter().map(|&l| order_key(l)).collect();
        let (_, kth, _) = keys.select_nth_unstable_by(p.top_k as usize - 1, |a, b| b.cmp(a));
        floor = floor.max(*kth);
    }
    if p.top_p < 1.0 {
        floor = floor.max(top_p_floor(
            logits,
            lmax,
            1.0 / p.temperature,
            p.top_p,
            floor,
        ));
    }
    floor
}

/// Top-p's tau (see [`kept_floor_key`]). Only candidates are sorted: tokens lighter than
/// `(total - need) / n` are below tau, because together they weigh less than `total - need`
/// and mass is monotone in the key.
fn top_p_floor(logits: &[f32], lmax: f32, inv_t: f32, top_p: f32, floor: u32) -> u32 {
    let mut cand: Vec<(u32, u64)> = logits
        .iter()
        .map(|&l| (order_key(l), l))
        .filter(|&(k, _)| k >= floor)
        .map(|(k, l)| (k, top_p_mass(l, lmax, inv_t)))
        .collect();
    let total: u64 = cand.iter().map(|&(_, m)| m).sum();
    let want = ((top_p as f64) * (total as f64)).ceil() as u64;
    let need = want.max(1).min(total);
    let cutoff = (total - need) / cand.len().max(1) as u64;
    cand.retain(|&(_, m)| m >= cutoff);
    cand.sort_unstable_by_key(|c| std::cmp::Reverse(c.0));
    let mut cum = 0u64;
    let mut i = 0;
    while i < cand.len() {
        let key = cand[i].0;
        while i < cand.len() && cand[i].0 == key {
            cum += cand[i].1;
            i += 1;
        }
        if cum >= need {
            return key;
        }
    }
    // Unreachable for need <= total; keep the lowest candidate rather than nothing.
    cand.last().map_or(floor, |&(k, _)| k)
}

/// Which tokens survive min-p, top-k and top-p ([`kept_floor_key`]). A greedy row keeps
/// only its argmax.
pub fn allowed_tokens(logits: &[f32], p: &SampleParams) -> Vec<bool> {
    if p.is_greedy() || logits.is_empty() || logits[argmax(logits)] == f32::NEG_INFINITY {
        let best = argmax(logits);
        return (0..logits.len()).map(|i| i == best).collect();
    }
    let floor = kept_floor_key(logits, p);
    logits.iter().map(|&l| order_key(l) >= floor).collect()
}

/// The token `sample_tokens` picks for one row (no logprob).
///
/// - Greedy ([`SampleParams::is_greedy`]): [`argmax`], the first index of the largest logit.
/// - Every logit -inf (all masked): token 0, as greedy gives.
/// - Otherwise Gumbel-max over the kept tokens ([`kept_floor_key`]): `inv_t = 1.0f / T`
///   (f32 division), `score_i = l_i * inv_t + gumbel_noise(seed, offset, i)` (f32 multiply,
///   then add), the token is the first index of the largest score (strict `>` in index
///   order, ties to the lower index); -inf scores never win. Should no kept score exceed
///   -inf (an overflow of `l * inv_t`), the argmax. This samples exactly from the
///   renormalised distribution of the kept tokens at temperature T.
pub fn sample_token(logits: &[f32], p: &SampleParams) -> usize {
    let best = argmax(logits);
    if p.is_greedy() || logits.is_empty() || logits[best] == f32::NEG_INFINITY {
        return best;
    }
    let inv_t = 1.0 / p.temperature;
    let floor = kept_floor_key(logits, p);
    let key = draw_key(p.seed, p.offset);
    // Speed only, same token: the token of the largest key is always kept and its score is
    // a lower bound on the winning one, so a token whose score cannot reach it even with
    // the largest noise is skipped without computing its noise (the logarithms dominate).
    // (The argmax has the largest key unless it is -0.0 beside a +0.0.)
    let top = if logits[best] == 0.0 {
        (0..logits.len())
            .max_by_key(|&i| (order_key(logits[i]), std::cmp::Reverse(i)))
            .unwrap_or(best)
    } else {
        best
    };
    let bar = logits[top] * inv_t + gumbel_of_key(key, top);
    let reach = -(-U_MAX.ln()).ln() + 1e-3; // margin for the last bit of logf
    let mut pick = None;
    let mut pick_score = f32::NEG_INFINITY;
    for (i, &l) in logits.iter().enumerate() {
        if order_key(l) < floor || l == f32::NEG_INFINITY {
            continue;
        }
        let base = l * inv_t;
        if base + reach < bar {
            continue;
        }
        let score = base + gumbel_of_key(key, i);
        if score > pick_score {
            pick = Some(i);
            pick_score = score;
        }
    }
    pick.unwrap_or(best)
}

/// The token `sample_tokens` picks for one row ([`sample_token`]) and its log-softmax over
/// the same logits.
pub fn sample(logits: &[f32], p: &SampleParams) -> (usize, f32) {
    let token = sample_token(logits, p);
    (token, log_softmax_at(logits, token))
}

/// A request's logits processors, applied by [`apply_processors`] before the draw.
#[derive(Debug, Clone, Copy)]
pub struct Processors<'a> {
    /// Only these tokens may be chosen (vLLM's `allowed_token_ids`); None: all.
    pub allowed_token_ids: Option<&'a [u32]>,
    /// Token sequences that must not be generated (vLLM's tokenized `bad_words`).
    pub bad_words: &'a [Vec<u32>],
    /// While fewer tokens than this were generated, `eos_and_stop` are masked.
    pub min_tokens: usize,
    /// EOS ids (none when `ignore_eos`) and `stop_token_ids`.
    pub eos_and_stop: &'a [u32],
    /// Added to the logits; ids unique, values already clamped to [-100, 100].
    pub logit_bias: &'a [(u32, f32)],
    /// 1 disables.
    pub repetition_penalty: f32,
    /// 0 disables.
    pub frequency_penalty: f32,
    /// 0 disables.
    pub presence_penalty: f32,
}

impl Default for Processors<'_> {
    fn default() -> Self {
        Self {
            allowed_token_ids: None,
            bad_words: &[],
            min_tokens: 0,
            eos_and_stop: &[],
            logit_bias: &[],
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
        }
    }
}

/// NaN -> -inf (a NaN must not poison sums or comparisons).
pub fn clear_nan(logits: &mut [f32]) {
    for l in logits.iter_mut().filter(|l| l.is_nan()) {
        *l = f32::NEG_INFINITY;
    }
}

/// Every token not in `allowed` -> -inf. Ids outside the vocabulary are ignored.
pub fn apply_allowed_token_ids(logits: &mut [f32], allowed: &[u32]) {
    let mut keep = vec![false; logits.len()];
    for &t in allowed {
        if let Some(k) = keep.get_mut(t as usize) {
            *k = true;
        }
    }
    for (l, k) in logits.iter_mut().zip(keep) {
        if !k {
            *l = f32::NEG_INFINITY;
        }
    }
}

/// Structured output's token mask (vLLM v1's grammar bitmask), applied before every other
/// processor: token `t` is kept when bit `t % 32` of `words[t / 32]` is set, every other
/// logit -> -inf. Tokens past the mask's words are masked.
pub fn apply_token_bitmask(logits: &mut [f32], words: &[u32]) {
    for (t, l) in logits.iter_mut().enumerate() {
        let allowed = words.get(t / 32).is_some_and(|w| w >> (t % 32) & 1 == 1);
        if !allowed {
            *l = f32::NEG_INFINITY;
        }
    }
}

/// vLLM's `apply_bad_words` over the output tokens: for each bad word `ids`, skipped when
/// `ids.len() > output.len() + 1`; otherwise when `ids.len() == 1` or `output` ends with
/// `ids[..len - 1]`, `logits[ids[len - 1]] = -inf`.
pub fn apply_bad_words(logits: &mut [f32], bad_words: &[Vec<u32>], output: &[u32]) {
    for ids in bad_words {
        let Some((&last, prefix)) = ids.split_last() else {
            continue;
        };
        if prefix.len() > output.len() {
            continue;
        }
        if output.ends_with(prefix) {
            if let Some(l) = logits.get_mut(last as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
    }
}

/// While `num_output < min_tokens`: every id of `eos_and_stop` -> -inf.
pub fn apply_min_tokens(
    logits: &mut [f32],
    min_tokens: usize,
    eos_and_stop: &[u32],
    num_output: usize,
) {
    if num_output >= min_tokens {
        return;
    }
    for &t in eos_and_stop {
        if let Some(l) = logits.get_mut(t as usize) {
            *l = f32::NEG_INFINITY;
        }
    }
}

/// `logits[id] = logits[id] + bias` (f32 add) for each entry.
pub fn apply_logit_bias(logits: &mut [f32], bias: &[(u32, f32)]) {
    for &(t, b) in bias {
        if let Some(l) = logits.get_mut(t as usize) {
            *l += b;
        }
    }
}

/// The repetition penalty of one token, applied once per distinct token of prompt ∪
/// output: `l > 0 ? l / rp : l * rp` (f32 division / multiply).
pub fn repetition_penalized(l: f32, rp: f32) -> f32 {
    if l > 0.0 {
        l / rp
    } else {
        l * rp
    }
}

/// Frequency and presence penalties of a token generated `count` (> 0) times:
/// `l - (freq * (f32) count + presence)` (f32: multiply, add, subtract). Tokens never
/// generated are left alone.
pub fn frequency_presence_penalized(l: f32, count: u32, freq: f32, presence: f32) -> f32 {
    l - (freq * count as f32 + presence)
}

/// vLLM v1's logits processors, in its order:
/// 1. NaN -> -inf ([`clear_nan`]);
/// 2. `allowed_token_ids` ([`apply_allowed_token_ids`]);
/// 3. bad words over `output` ([`apply_bad_words`]);
/// 4. `min_tokens` with `output.len()` generated ([`apply_min_tokens`]);
/// 5. `logit_bias` ([`apply_logit_bias`]);
/// 6. repetition penalty over the distinct tokens of `prompt` and `output`
///    ([`repetition_penalized`], when `rp != 1`), then frequency and presence over each
///    distinct token of `output` with its count ([`frequency_presence_penalized`], when
///    either is non-zero).
///
/// Ids outside the vocabulary are ignored everywhere.
pub fn apply_processors(logits: &mut [f32], p: &Processors<'_>, prompt: &[u32], output: &[u32]) {
    clear_nan(logits);
    if let Some(allowed) = p.allowed_token_ids {
        apply_allowed_token_ids(logits, allowed);
    }
    apply_bad_words(logits, p.bad_words, output);
    apply_min_tokens(logits, p.min_tokens, p.eos_and_stop, output.len());
    apply_logit_bias(logits, p.logit_bias);
    let vocab = logits.len();
    if p.repetition_penalty != 1.0 {
        let mut seen = vec![false; vocab];
        for &t in prompt.iter().chain(output) {
            if let Some(s) = seen.get_mut(t as usize) {
                *s = true;
            }
        }
        for (l, s) in logits.iter_mut().zip(seen) {
            if s {
                *l = repetition_penalized(*l, p.repetition_penalty);
            }
        }
    }
    if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
        let mut counts = vec![0u32; vocab];
        for &t in output {
            if let Some(c) = counts.get_mut(t as usize) {
                *c += 1;
            }
        }
        for (l, c) in logits.iter_mut().zip(counts) {
            if c > 0 {
                *l = frequency_presence_penalized(*l, c, p.frequency_penalty, p.presence_penalty);
            }
        }
    }
}

/// Log-probabilities around one position: the chosen token's, its rank and the top k.
#[derive(Debug, Clone, PartialEq)]
pub struct TopLogprobs {
    /// `log_softmax(logits)[chosen]`; -inf for an id outside the vocabulary.
    pub logprob: f32,
    /// How many tokens have a logit >= the chosen one's (1 for the unique maximum; NaN
    /// counts as -inf); vocab + 1 for an id outside the vocabulary.
    pub rank: u32,
    /// The k most likely `(id, logprob)`, highest first, lower id first on ties.
    pub top: Vec<(u32, f32)>,
}

/// Log-softmax of the (raw) `logits` at `chosen`, its rank, and the `k` most likely tokens.
/// The log-softmax of `x` is `(x - max) as f64 - ln(sum over non-NaN v of exp((v - max) as
/// f64))` with `x - max` in f32: full precision even for large logits. NaN counts as -inf.
pub fn top_logprobs(logits: &[f32], chosen: u32, k: usize) -> TopLogprobs {
    let shift = log_softmax_shift(logits);
    let logprob = |v: f32| match shift {
        Some((max, ln_sum)) if !v.is_nan() => (((v - max) as f64) - ln_sum) as f32,
        _ => f32::NEG_INFINITY,
    };
    let top = top_k_indices(logits, k)
        .into_iter()
        .map(|i| (i, logprob(logits[i as usize])))
        .collect();
    let key = |v: f32| if v.is_nan() { f32::NEG_INFINITY } else { v };
    let rank = match logits.get(chosen as usize) {
        Some(&c) => logits.iter().filter(|&&v| key(v) >= key(c)).count(),
        None => logits.len() + 1,
    };
    TopLogprobs {
        logprob: logits
            .get(chosen as usize)
            .map_or(f32::NEG_INFINITY, |&v| logprob(v)),
        rank: u32::try_from(rank).unwrap_or(u32::MAX),
        top,
    }
}

/// `(max, ln(sum(exp(x - max))))` over the non-NaN values, or None without a finite maximum.
pub fn log_softmax_shift(values: &[f32]) -> Option<(f32, f64)> {
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

#[cfg(test)]
#[path = "reference_sampling_tests.rs"]
mod tests;
