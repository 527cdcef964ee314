//! CPU reference implementations of the CUDA kernels in `src/*.cu`, in plain f32.
//!
//! They follow the same layouts as the kernels (and as the engine's CPU backend):
//! - activations row-major `[rows, cols]`;
//! - paged KV cache per layer: K and V each `[num_blocks, block_size, num_kv_heads, head_dim]`,
//!   a token's slot is `block_id * block_size + offset`;
//! - RoPE in the HF "rotate half" form with `angle = pos * inv_freq[i]`;
//! - GQA: query head `h` reads KV head `h / (num_heads / num_kv_heads)`.
//!
//! The GPU tests (`tests/gpu_kernels.rs`) compare every kernel against these; the engine may
//! reuse them. Shapes are the caller's responsibility: a mismatch panics with a message, as
//! these take internal (already validated) data, never user input.

/// `out[t] = table[ids[t]]`; an id outside the table gives a row of zeros (as the kernel does).
pub fn embedding(table: &[f32], hidden: usize, ids: &[i32]) -> Vec<f32> {
    let vocab = table.len() / hidden;
    let mut out = vec![0.0; ids.len() * hidden];
    for (t, &id) in ids.iter().enumerate() {
        if id >= 0 && (id as usize) < vocab {
            let id = id as usize;
            out[t * hidden..(t + 1) * hidden]
                .copy_from_slice(&table[id * hidden..(id + 1) * hidden]);
        }
    }
    out
}

/// `out[r] = input[rows[r]]` (rows of width `cols`).
pub fn gather_rows(input: &[f32], cols: usize, rows: &[i32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows.len() * cols);
    for &r in rows {
        let r = r as usize;
        out.extend_from_slice(&input[r * cols..(r + 1) * cols]);
    }
    out
}

/// Writes sequence `s`'s block ids, `compact[offsets[s]..offsets[s + 1]]`, at the start of
/// row `s` of `tables` (rows `stride` apart); the rest of each row is left as it was.
pub fn expand_block_tables(tables: &mut [i32], compact: &[i32], offsets: &[i32], stride: usize) {
    for (s, w) in offsets.windows(2).enumerate() {
        let ids = &compact[w[0] as usize..w[1] as usize];
        let n = ids.len().min(stride);
        tables[s * stride..s * stride + n].copy_from_slice(&ids[..n]);
    }
}

/// feed_sampled_tokens: `ids[feed[2i]] = tokens[feed[2i + 1]]` for every pair of `feed`.
pub fn feed_sampled_tokens(ids: &mut [i32], feed: &[i32], tokens: &[i32]) {
    for pair in feed.chunks_exact(2) {
        ids[pair[0] as usize] = tokens[pair[1] as usize];
    }
}

/// RMSNorm of every row of `x` (row width = `weight.len()`).
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let hidden = weight.len();
    let mut out = vec![0.0; x.len()];
    for (row, o) in x.chunks_exact(hidden).zip(out.chunks_exact_mut(hidden)) {
        let ss: f32 = row.iter().map(|v| v * v).sum();
        let inv = 1.0 / (ss / hidden as f32 + eps).sqrt();
        for ((o, &v), &w) in o.iter_mut().zip(row).zip(weight) {
            *o = v * inv * w;
        }
    }
    out
}

/// `residual += x`, then returns `rms_norm(residual) * weight`.
pub fn fused_add_rms_norm(residual: &mut [f32], x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    assert_eq!(residual.len(), x.len(), "residual and x differ in length");
    for (r, &v) in residual.iter_mut().zip(x) {
        *r += v;
    }
    rms_norm(residual, weight, eps)
}

/// Per-head RMSNorm of the q and k parts of rows `stride` apart, in place: each of the first
/// `num_q_heads` heads (of `q_weight.len()` values) is normalized and scaled by `q_weight`,
/// the `num_kv_heads` after it by `k_weight`; the rest of each row (v) is left as it is.
pub fn head_rms_norm(
    x: &mut [f32],
    stride: usize,
    num_q_heads: usize,
    num_kv_heads: usize,
    q_weight: &[f32],
    k_weight: &[f32],
    eps: f32,
) {
    let hd = q_weight.len();
    assert_eq!(k_weight.len(), hd, "q and k norm weights differ in length");
    assert!(
        (num_q_heads + num_kv_heads) * hd <= stride,
        "heads overrun the row"
    );
    for row in x.chunks_exact_mut(stride) {
        for (h, head) in row[..(num_q_heads + num_kv_heads) * hd]
            .chunks_exact_mut(hd)
            .enumerate()
        {
            let w = if h < num_q_heads { q_weight } else { k_weight };
            let ss: f32 = head.iter().map(|v| v * v).sum();
            let inv = 1.0 / (ss / hd as f32 + eps).sqrt();
            for (v, &g) in head.iter_mut().zip(w) {
                *v = *v * inv * g;
            }
        }
    }
}

/// Applies rotate-half RoPE in place to `num_heads` heads at the start of each row of `x`
/// (rows `stride` apart), token `t` at position `positions[t]`.
pub fn rope_inplace(
    x: &mut [f32],
    stride: usize,
    num_heads: usize,
    head_dim: usize,
    positions: &[i32],
    inv_freq: &[f32],
) {
    rope_partial_inplace(
        x, stride, num_heads, head_dim, head_dim, positions, inv_freq, 1.0,
    );
}

/// `rope_inplace` over the first `rotary_dim` dims of each head only (partial rotary, Phi-3/4:
/// pairs `i, i + rotary_dim / 2`, `inv_freq` of `rotary_dim / 2` values), with cos and sin
/// multiplied by `attention_factor` (LongRoPE / YaRN; 1 for none); the other dims are left as
/// they are.
#[allow(clippy::too_many_arguments)]
pub fn rope_partial_inplace(
    x: &mut [f32],
    stride: usize,
    num_heads: usize,
    head_dim: usize,
    rotary_dim: usize,
    positions: &[i32],
    inv_freq: &[f32],
    attention_factor: f32,
) {
    let half = rotary_dim / 2;
    assert!(rotary_dim <= head_dim, "rotary_dim past head_dim");
    assert_eq!(
        inv_freq.len(),
        half,
        "inv_freq must hold rotary_dim / 2 values"
    );
    for (t, &pos) in positions.iter().enumerate() {
        for h in 0..num_heads {
            let base = t * stride + h * head_dim;
            for i in 0..half {
                let (s, c) = (pos as f32 * inv_freq[i]).sin_cos();
                let (s, c) = (s * attention_factor, c * attention_factor);
                let x1 = x[base + i];
                let x2 = x[base + i + half];
                x[base + i] = x1 * c - x2 * s;
                x[base + i + half] = x2 * c + x1 * s;
            }
        }
    }
}

/// Writes the first `width` values of each row of `src` (rows `stride` apart) into cache slot
/// `slot_mapping[t]` (slots `width` apart); a negative slot is skipped.
pub fn write_cache(
    cache: &mut [f32],
    width: usize,
    src: &[f32],
    stride: usize,
    slot_mapping: &[i32],
) {
    for (t, &slot) in slot_mapping.iter().enumerate() {
        if slot < 0 {
            continue;
        }
        let s = slot as usize;
        cache[s * width..(s + 1) * width].copy_from_slice(&src[t * stride..t * stride + width]);
    }
}

/// `y = x W^T` for `x` `[m, k]` and `w` `[n, k]` (HF linear layout); returns `[m, n]`.
pub fn linear(x: &[f32], w: &[f32], n: usize, k: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len() / k * n);
    for xr in x.chunks_exact(k) {
        out.extend(
            w.chunks_exact(k)
                .map(|wr| xr.iter().zip(wr).map(|(a, b)| a * b).sum::<f32>()),
        );
    }
    out
}

/// `in` is `[T, 2 * inter]` (gate, then up); returns `silu(gate) * up`, `[T, inter]`.
pub fn silu_and_mul(input: &[f32], inter: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(input.len() / 2);
    for row in input.chunks_exact(2 * inter) {
        let (gate, up) = row.split_at(inter);
        out.extend(
            gate.iter()
                .zip(up)
                .map(|(&g, &u)| g / (1.0 + (-g).exp()) * u),
        );
    }
    out
}

/// GELU with the tanh approximation (PyTorch's `gelu(x, approximate="tanh")`, HF's
/// `gelu_pytorch_tanh`).
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x)).tanh())
}

/// `in` is `[T, 2 * inter]` (gate, then up); returns `gelu_tanh(gate) * up`, `[T, inter]`
/// (GeGLU, Gemma).
pub fn gelu_tanh_and_mul(input: &[f32], inter: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(input.len() / 2);
    for row in input.chunks_exact(2 * inter) {
        let (gate, up) = row.split_at(inter);
        out.extend(gate.iter().zip(up).map(|(&g, &u)| gelu_tanh(g) * u));
    }
    out
}

/// `cap * tanh(x / cap)`: Gemma's soft-cap of attention scores and of final logits.
pub fn softcap(x: f32, cap: f32) -> f32 {
    cap * (x / cap).tanh()
}

/// A paged KV cache of one layer, as the attention kernels see it.
#[derive(Debug, Clone, Copy)]
pub struct PagedKv<'a> {
    pub key_cache: &'a [f32],
    pub value_cache: &'a [f32],
    pub block_size: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// The step's sequences: sequence `s` owns query rows `cu_seqlens_q[s]..cu_seqlens_q[s+1]`,
/// has `context_lens[s]` tokens in the cache (its new ones included) and the block table row
/// `block_tables[s * max_blocks_per_seq..]`.
#[derive(Debug, Clone, Copy)]
pub struct AttentionBatch<'a> {
    pub cu_seqlens_q: &'a [i32],
    pub context_lens: &'a [i32],
    pub block_tables: &'a [i32],
    pub max_blocks_per_seq: usize,
}

/// Causal attention of each sequence's new queries over its cached keys: query `i` of a chunk
/// of `n` new tokens sees keys `0..=context_len - n + i`. Covers decode (one query per
/// sequence) and chunked prefill. `q` rows are `q_stride` apart with the heads first; returns
/// `[T, num_heads * head_dim]`. Accumulates in f64 so that it can serve as the reference.
pub fn paged_attention(
    q: &[f32],
    q_stride: usize,
    num_heads: usize,
    kv: &PagedKv<'_>,
    batch: &AttentionBatch<'_>,
    scale: f32,
) -> Vec<f32> {
    paged_attention_windowed(q, q_stride, num_heads, kv, batch, scale, None, None)
}

/// `paged_attention` with a sliding window (a query at position p sees the keys after
/// p - window: Mistral, Gemma's local layers) and a soft-cap (each scaled score s becomes
/// `cap * tanh(s / cap)` before the softmax: Gemma 2).
#[allow(clippy::too_many_arguments)]
pub fn paged_attention_windowed(
    q: &[f32],
    q_stride: usize,
    num_heads: usize,
    kv: &PagedKv<'_>,
    batch: &AttentionBatch<'_>,
    scale: f32,
    window: Option<usize>,
    softcap: Option<f32>,
) -> Vec<f32> {
    let hd = kv.head_dim;
    let group = num_heads / kv.num_kv_heads;
    let num_seqs = batch.context_lens.len();
    let total_rows = batch.cu_seqlens_q[num_seqs] as usize;
    let mut out = vec![0.0f32; total_rows * num_heads * hd];
    let kv_row = kv.num_kv_heads * hd;
    for s in 0..num_seqs {
        let q0 = batch.cu_seqlens_q[s] as usize;
        let n = batch.cu_seqlens_q[s + 1] as usize - q0;
        let ctx = batch.context_lens[s] as usize;
        let start = ctx - n;
        let table = &batch.block_tables[s * batch.max_blocks_per_seq..];
        let slot = |key: usize| -> usize {
            table[key / kv.block_size] as usize * kv.block_size + key % kv.block_size
        };
        for i in 0..n {
            let row = q0 + i;
            let visible = start + i + 1;
            let first = window.map_or(0, |w| visible.saturating_sub(w));
            for h in 0..num_heads {
                let kvh = h / group;
                let qv = &q[row * q_stride + h * hd..row * q_stride + (h + 1) * hd];
                let scores: Vec<f64> = (first..visible)
                    .map(|key| {
                        let k = &kv.key_cache[slot(key) * kv_row + kvh * hd..][..hd];
                        let s = qv
                            .iter()
                            .zip(k)
                            .map(|(&a, &b)| a as f64 * b as f64)
                            .sum::<f64>()
                            * scale as f64;
                        softcap.map_or(s, |c| c as f64 * (s / c as f64).tanh())
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let total: f64 = weights.iter().sum();
                let o = &mut out[(row * num_heads + h) * hd..(row * num_heads + h + 1) * hd];
                let mut acc = vec![0.0f64; hd];
                for (key, w) in (first..visible).zip(&weights) {
                    let v = &kv.value_cache[slot(key) * kv_row + kvh * hd..][..hd];
                    for (a, &x) in acc.iter_mut().zip(v) {
                        *a += w * x as f64;
                    }
                }
                for (o, a) in o.iter_mut().zip(acc) {
                    *o = (a / total) as f32;
                }
            }
        }
    }
    out
}

// Sampling (the draw, the logits processors, logprobs): one definition, its own file.
#[path = "reference_sampling.rs"]
mod sampling;
pub use sampling::*;

// The fused mixture-of-experts path (moe.cu): its own file.
#[path = "reference_moe.rs"]
mod moe;
pub use moe::*;

#[cfg(test)]
mod tests {
    use super::sampling::mix64;
    use super::*;

    /// Small deterministic pseudo-random values in [-1, 1), never all zero.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        (0..n)
            .map(|i| {
                ((mix64(seed.wrapping_mul(1000003) ^ i as u64) >> 40) as f32 / 8_388_608.0) - 1.0
            })
            .collect()
    }

    #[test]
    fn rms_norm_matches_definition() {
        let x = values(2 * 8, 1);
        let w = values(8, 2);
        let out = rms_norm(&x, &w, 1e-6);
        for t in 0..2 {
            let row = &x[t * 8..(t + 1) * 8];
            let rms = (row.iter().map(|v| v * v).sum::<f32>() / 8.0 + 1e-6).sqrt();
            for i in 0..8 {
                assert!((out[t * 8 + i] - row[i] / rms * w[i]).abs() < 1e-6);
            }
        }
        let mut residual = values(16, 3);
        let before = residual.clone();
        let fused = fused_add_rms_norm(&mut residual, &x, &w, 1e-6);
        for i in 0..16 {
            assert_eq!(residual[i], before[i] + x[i]);
        }
        assert_eq!(fused, rms_norm(&residual, &w, 1e-6));
    }

    #[test]
    fn rope_rotates_pairs_and_keeps_norm() {
        let hd = 8;
        let mut x = values(2 * hd, 4);
        let orig = x.clone();
        let inv_freq: Vec<f32> = (0..hd / 2)
            .map(|i| 10000f32.powf(-(2.0 * i as f32) / hd as f32))
            .collect();
        rope_inplace(&mut x, hd, 1, hd, &[0, 5], &inv_freq);
        // Position 0 is the identity.
        assert_eq!(&x[..hd], &orig[..hd]);
        // Each (i, i + hd/2) pair keeps its length and turns by 5 * inv_freq[i].
        for i in 0..hd / 2 {
            let (a, b) = (orig[hd + i], orig[hd + i + hd / 2]);
            let (c, d) = (x[hd + i], x[hd + i + hd / 2]);
            assert!(((a * a + b * b) - (c * c + d * d)).abs() < 1e-5);
            let turned = d.atan2(c) - b.atan2(a);
            let want = 5.0 * inv_freq[i];
            let diff = (turned - want).rem_euclid(std::f32::consts::TAU);
            assert!(
                !(1e-4..=std::f32::consts::TAU - 1e-4).contains(&diff),
                "pair {i}: {turned} vs {want}"
            );
        }
    }

    #[test]
    fn silu_and_mul_matches_definition() {
        let x = values(2 * 6, 5);
        let out = silu_and_mul(&x, 3);
        assert_eq!(out.len(), 6);
        for t in 0..2 {
            for i in 0..3 {
                let g = x[t * 6 + i];
                let u = x[t * 6 + 3 + i];
                assert!((out[t * 3 + i] - g * u / (1.0 + (-g).exp())).abs() < 1e-7);
            }
        }
    }

    #[test]
    fn linear_is_x_times_w_transposed() {
        // x = [[1, 2], [3, 4]], w = [[1, 0], [0, 1], [1, 1]] (3 outputs of 2 inputs).
        let y = linear(&[1.0, 2.0, 3.0, 4.0], &[1.0, 0.0, 0.0, 1.0, 1.0, 1.0], 3, 2);
        assert_eq!(y, [1.0, 2.0, 3.0, 3.0, 4.0, 7.0]);
    }

    #[test]
    fn embedding_and_gather_pick_rows() {
        let table = values(5 * 3, 6);
        let out = embedding(&table, 3, &[4, 0, 9]);
        assert_eq!(&out[..3], &table[12..15]);
        assert_eq!(&out[3..6], &table[..3]);
        assert_eq!(&out[6..], &[0.0; 3]);
        assert_eq!(gather_rows(&table, 3, &[2]), table[6..9].to_vec());
    }

    /// Dense causal attention over contiguous K/V, the textbook formula.
    fn dense_attention(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        n: usize,
        ctx: usize,
        hd: usize,
        scale: f32,
    ) -> Vec<f32> {
        let start = ctx - n;
        let mut out = vec![0.0; n * hd];
        for i in 0..n {
            let visible = start + i + 1;
            let s: Vec<f32> = (0..visible)
                .map(|j| (0..hd).map(|d| q[i * hd + d] * k[j * hd + d]).sum::<f32>() * scale)
                .collect();
            let m = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
            let z: f32 = e.iter().sum();
            for d in 0..hd {
                out[i * hd + d] = (0..visible).map(|j| e[j] * v[j * hd + d]).sum::<f32>() / z;
            }
        }
        out
    }

    #[test]
    fn paged_attention_matches_dense_with_scrambled_blocks_and_gqa() {
        let (hd, nkv, nh, bs) = (8, 2, 4, 4);
        let ctx = 11;
        let n = 3; // a chunk of 3 new tokens at the end of an 11-token context
        let num_blocks = 6;
        // Logical block j of the sequence lives in physical block table[j].
        let table: [i32; 4] = [4, 1, 5, 0];
        let kd = values(ctx * nkv * hd, 7);
        let vd = values(ctx * nkv * hd, 8);
        let mut key_cache = vec![f32::NAN; num_blocks * bs * nkv * hd];
        let mut value_cache = key_cache.clone();
        let slots: Vec<i32> = (0..ctx)
            .map(|t| table[t / bs] * bs as i32 + (t % bs) as i32)
            .collect();
        write_cache(&mut key_cache, nkv * hd, &kd, nkv * hd, &slots);
        write_cache(&mut value_cache, nkv * hd, &vd, nkv * hd, &slots);
        let q = values(n * nh * hd, 9);
        let kv = PagedKv {
            key_cache: &key_cache,
            value_cache: &value_cache,
            block_size: bs,
            num_kv_heads: nkv,
            head_dim: hd,
        };
        let batch = AttentionBatch {
            cu_seqlens_q: &[0, n as i32],
            context_lens: &[ctx as i32],
            block_tables: &table,
            max_blocks_per_seq: 4,
        };
        let out = paged_attention(&q, nh * hd, nh, &kv, &batch, 0.3);
        for h in 0..nh {
            let kvh = h / 2;
            let pick = |src: &[f32], rows: usize, heads: usize, head: usize| -> Vec<f32> {
                (0..rows)
                    .flat_map(|r| {
                        src[(r * heads + head) * hd..(r * heads + head + 1) * hd].to_vec()
                    })
                    .collect()
            };
            let qh = pick(&q, n, nh, h);
            let want = dense_attention(
                &qh,
                &pick(&kd, ctx, nkv, kvh),
                &pick(&vd, ctx, nkv, kvh),
                n,
                ctx,
                hd,
                0.3,
            );
            let got = pick(&out, n, nh, h);
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 1e-5, "head {h}: {a} vs {b}");
            }
        }
    }

    /// A window of w keys gives a query the attention of a context holding only its last w
    /// keys; a soft-cap far above every score changes nothing, a tight one does.
    #[test]
    fn windowed_attention_sees_the_last_window_keys_and_softcap_bends_scores() {
        let (hd, bs, ctx, w) = (8, 4, 11, 4);
        let table: [i32; 3] = [2, 0, 1];
        let kd = values(ctx * hd, 3);
        let vd = values(ctx * hd, 4);
        let mut key_cache = vec![f32::NAN; 3 * bs * hd];
        let mut value_cache = key_cache.clone();
        let slots: Vec<i32> = (0..ctx)
            .map(|t| table[t / bs] * bs as i32 + (t % bs) as i32)
            .collect();
        write_cache(&mut key_cache, hd, &kd, hd, &slots);
        write_cache(&mut value_cache, hd, &vd, hd, &slots);
        let q: Vec<f32> = values(hd, 5).iter().map(|x| 4.0 * x).collect();
        let kv = PagedKv {
            key_cache: &key_cache,
            value_cache: &value_cache,
            block_size: bs,
            num_kv_heads: 1,
            head_dim: hd,
        };
        let batch = AttentionBatch {
            cu_seqlens_q: &[0, 1],
            context_lens: &[ctx as i32],
            block_tables: &table,
            max_blocks_per_seq: 3,
        };
        let attend =
            |window, cap| paged_attention_windowed(&q, hd, 1, &kv, &batch, 0.5, window, cap);
        let last = (ctx - w) * hd..;
        let want = dense_attention(&q, &kd[last.clone()], &vd[last], 1, w, hd, 0.5);
        for (a, b) in attend(Some(w), None).iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "window: {a} vs {b}");
        }
        let plain = attend(None, None);
        for (a, b) in attend(Some(ctx), Some(1e6)).iter().zip(&plain) {
            assert!((a - b).abs() < 1e-5, "loose cap: {a} vs {b}");
        }
        let tight = attend(None, Some(0.1));
        assert!(
            tight.iter().zip(&plain).any(|(a, b)| (a - b).abs() > 1e-3),
            "a 0.1 cap must flatten the softmax"
        );
    }
}
