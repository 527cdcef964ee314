//! RoPE + paged KV-cache writes, and paged attention over a step that mixes prefill chunks
//! and decodes. Layouts: see `backend/mod.rs`.
use anyhow::{ensure, Result};
use rayon::prelude::*;

use super::fp8::fake_quant_in_place;
use super::{CpuKvCache, CpuStepMeta, CpuTensor};
use crate::backend::{Activation, AttentionLayout, ForwardBatch};

/// Rotates the first `2 * cos.len()` values of `x` (one head) in the HF "rotate half" form;
/// the rest pass through (partial rotary).
fn rotate(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    let (a, b) = x[..2 * half].split_at_mut(half);
    for i in 0..half {
        let (x0, x1) = (a[i], b[i]);
        a[i] = x0 * cos[i] - x1 * sin[i];
        b[i] = x1 * cos[i] + x0 * sin[i];
    }
}

pub fn rope_and_write_kv(
    qkv: &mut CpuTensor,
    inv_freq: &[f32],
    layout: &AttentionLayout,
    batch: &ForwardBatch,
    cache: &mut CpuKvCache,
    layer: usize,
) -> Result<()> {
    let hd = layout.head_dim;
    let (q_size, kv_size) = (layout.q_size(), layout.kv_size());
    ensure!(
        hd > 0 && hd.is_multiple_of(2),
        "rope: head_dim {hd} must be even and non-zero"
    );
    ensure!(
        qkv.cols == layout.qkv_size(),
        "rope: qkv has {} cols, layout wants {}",
        qkv.cols,
        layout.qkv_size()
    );
    ensure!(
        qkv.rows == batch.num_tokens(),
        "rope: qkv has {} rows, batch {} tokens",
        qkv.rows,
        batch.num_tokens()
    );
    ensure!(
        inv_freq.len() * 2 == layout.rotary_dim && layout.rotary_dim <= hd,
        "rope: {} inverse frequencies for {} rotated dims of head_dim {hd}",
        inv_freq.len(),
        layout.rotary_dim
    );
    let m = layout.rope_scale;
    ensure!(
        layer < cache.shape.num_layers,
        "layer {layer} is outside the KV cache"
    );
    ensure!(
        cache.shape.num_kv_heads == layout.num_kv_heads && cache.shape.head_dim == hd,
        "KV cache shape {:?} does not match the attention layout {layout:?}",
        cache.shape
    );
    let width = qkv.cols;
    let rotated_heads = layout.num_heads + layout.num_kv_heads;
    qkv.as_mut_slice()
        .par_chunks_mut(width)
        .zip(batch.positions.par_iter())
        .for_each(|(row, &pos)| {
            // Angles as HF computes them: f32 position times f32 inverse frequency; cos and
            // sin then scaled by the attention factor (YaRN, LongRoPE).
            let (cos, sin): (Vec<f32>, Vec<f32>) = inv_freq
                .iter()
                .map(|&f| {
                    let a = pos as f32 * f;
                    (a.cos() * m, a.sin() * m)
                })
                .unzip();
            for head in row[..rotated_heads * hd].chunks_mut(hd) {
                rotate(head, &cos, &sin);
            }
        });
    let (kc, vc) = (&mut cache.k[layer], &mut cache.v[layer]);
    let src = qkv.as_slice();
    for (t, &slot) in batch.slot_mapping.iter().enumerate() {
        let s = slot as usize * kv_size;
        let row = &src[t * width..(t + 1) * width];
        ensure!(
            s + kv_size <= kc.len(),
            "KV slot {slot} is outside the cache"
        );
        kc[s..s + kv_size].copy_from_slice(&row[q_size..q_size + kv_size]);
        vc[s..s + kv_size].copy_from_slice(&row[q_size + kv_size..]);
        let fp8_scales = cache.fp8_scales.as_ref().and_then(|s| s.get(layer));
        if let Some(&(k_scale, v_scale)) = fp8_scales {
            fake_quant_in_place(&mut kc[s..s + kv_size], k_scale);
            fake_quant_in_place(&mut vc[s..s + kv_size], v_scale);
        }
    }
    Ok(())
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent partial sums: lets the compiler use SIMD lanes despite the
    // non-associativity of float addition.
    let mut acc = [0.0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    s += acc.iter().sum::<f32>();
    s
}

pub fn paged_attention(
    qkv: &CpuTensor,
    layout: &AttentionLayout,
    step: &CpuStepMeta,
    cache: &CpuKvCache,
    layer: usize,
    out: &mut CpuTensor,
) -> Result<()> {
    let batch = &step.batch;
    let hd = layout.head_dim;
    let (nh, nkv) = (layout.num_heads, layout.num_kv_heads);
    ensure!(hd > 0, "attention: head_dim is zero");
    ensure!(
        nkv > 0 && nh % nkv == 0,
        "{nh} query heads cannot share {nkv} KV heads evenly"
    );
    ensure!(
        qkv.cols == layout.qkv_size(),
        "attention: qkv has {} cols, layout wants {}",
        qkv.cols,
        layout.qkv_size()
    );
    ensure!(
        qkv.rows == batch.num_tokens(),
        "attention: qkv has {} rows, batch {} tokens",
        qkv.rows,
        batch.num_tokens()
    );
    ensure!(
        out.cols == layout.q_size(),
        "attention: output has {} cols, expected {}",
        out.cols,
        layout.q_size()
    );
    ensure!(
        layer < cache.shape.num_layers,
        "layer {layer} is outside the KV cache"
    );
    out.set_rows(qkv.rows)?;
    let group = nh / nkv;
    let kv_size = layout.kv_size();
    let bs = cache.shape.block_size;
    let (kc, vc) = (&cache.k[layer], &cache.v[layer]);
    let width = qkv.cols;
    let q_all = qkv.as_slice();
    // One task per (token, query head): parallel for decodes and prefills alike.
    out.as_mut_slice()
        .par_chunks_mut(hd)
        .enumerate()
        .for_each(|(idx, o)| {
            let (t, h) = (idx / nh, idx % nh);
            let seq = &batch.seqs[step.token_seq[t] as usize];
            let qpos = seq.start_pos() + (t - seq.token_offset);
            let first = match layout.sliding_window {
                Some(w) if w > 0 => (qpos + 1).saturating_sub(w),
                _ => 0,
            };
            let q = &q_all[t * width + h * hd..t * width + (h + 1) * hd];
            let koff = (h / group) * hd;
            let slot_of =
                |j: usize| (seq.block_table[j / bs] as usize * bs + j % bs) * kv_size + koff;
            let mut scores: Vec<f32> = (first..=qpos)
                .map(|j| {
                    let s = slot_of(j);
                    let x = dot(q, &kc[s..s + hd]) * layout.scale;
                    match layout.softcap {
                        Some(cap) => cap * (x / cap).tanh(),
                        None => x,
                    }
                })
                .collect();
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            o.fill(0.0);
            for (j, &p) in (first..=qpos).zip(&scores) {
                let s = slot_of(j);
                for (acc, &v) in o.iter_mut().zip(&vc[s..s + hd]) {
                    *acc += p * v;
                }
            }
            let inv = 1.0 / sum;
            o.iter_mut().for_each(|x| *x *= inv);
        });
    Ok(())
}
