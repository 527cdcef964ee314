//! Every CPU op against a slow, obvious reference on random inputs.
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::*;
use crate::backend::SeqSlice;
use crate::types::{HostData, HostTensor};

fn rand_vec(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn host(shape: &[usize], data: Vec<f32>) -> HostTensor {
    HostTensor {
        shape: shape.to_vec(),
        data: HostData::F32(data),
    }
}

fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * (1.0 + w.abs()),
            "{what}: element {i} is {g}, reference {w}"
        );
    }
}

#[test]
fn linear_matches_naive_for_small_and_large_row_counts() {
    let be = CpuBackend::new();
    let mut rng = StdRng::seed_from_u64(1);
    for &(m, k, n, with_bias) in &[
        (1, 64, 100, false),
        (3, 37, 130, true),
        (33, 70, 45, true),
        (80, 129, 257, false),
    ] {
        let xs = rand_vec(&mut rng, m * k);
        let ws = rand_vec(&mut rng, n * k);
        let bs = rand_vec(&mut rng, n);
        let x = be.activation_from_host(m, k, &xs).unwrap();
        let w = be.upload_weight("w", host(&[n, k], ws.clone())).unwrap();
        let b = be.upload_vector("b", host(&[n], bs.clone())).unwrap();
        let mut out = be.alloc_activation(m + 5, n).unwrap();
        // Poison the output: the op must overwrite every element, not accumulate into it.
        out.data.fill(f32::NAN);
        be.linear(&x, &w, with_bias.then_some(&b), &mut out)
            .unwrap();
        let mut want = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = if with_bias { bs[j] as f64 } else { 0.0 };
                for l in 0..k {
                    s += xs[i * k + l] as f64 * ws[j * k + l] as f64;
                }
                want[i * n + j] = s as f32;
            }
        }
        assert_eq!(out.rows(), m);
        assert_close(out.as_slice(), &want, 1e-4, &format!("linear {m}x{k}x{n}"));
    }
}

#[test]
fn linear_rejects_mismatched_shapes() {
    let be = CpuBackend::new();
    let x = be.activation_from_host(2, 3, &[0.0; 6]).unwrap();
    let w = be.upload_weight("w", host(&[4, 5], vec![0.0; 20])).unwrap();
    let mut out = be.alloc_activation(2, 4).unwrap();
    let err = be.linear(&x, &w, None, &mut out).unwrap_err().to_string();
    assert!(err.contains("3 features"), "{err}");
    let w = be.upload_weight("w", host(&[4, 3], vec![0.0; 12])).unwrap();
    let mut small = be.alloc_activation(1, 4).unwrap();
    assert!(
        be.linear(&x, &w, None, &mut small).is_err(),
        "output capacity must be checked"
    );
}

fn naive_rms(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let h = w.len();
    x.chunks(h)
        .flat_map(|r| {
            let ms = r.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / h as f64;
            let inv = 1.0 / (ms + eps as f64).sqrt();
            r.iter()
                .zip(w)
                .map(move |(v, g)| (*v as f64 * inv * *g as f64) as f32)
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn norms_match_naive() {
    let be = CpuBackend::new();
    let mut rng = StdRng::seed_from_u64(2);
    let (rows, h, eps) = (37, 96, 1e-5);
    let xs = rand_vec(&mut rng, rows * h);
    let rs = rand_vec(&mut rng, rows * h);
    let ws = rand_vec(&mut rng, h);
    let x = be.activation_from_host(rows, h, &xs).unwrap();
    let w = be.upload_vector("norm", host(&[h], ws.clone())).unwrap();
    let mut out = be.alloc_activation(rows, h).unwrap();
    be.rms_norm(&x, &w, eps, &mut out).unwrap();
    assert_close(out.as_slice(), &naive_rms(&xs, &ws, eps), 1e-5, "rms_norm");

    let mut residual = be.activation_from_host(rows, h, &rs).unwrap();
    be.add_rms_norm(&mut residual, &x, &w, eps, &mut out)
        .unwrap();
    let sum: Vec<f32> = rs.iter().zip(&xs).map(|(a, b)| a + b).collect();
    assert_close(residual.as_slice(), &sum, 0.0, "add_rms_norm residual");
    assert_close(
        out.as_slice(),
        &naive_rms(&sum, &ws, eps),
        1e-5,
        "add_rms_norm output",
    );
}

#[test]
fn silu_embedding_and_gather_match_naive() {
    let be = CpuBackend::new();
    let mut rng = StdRng::seed_from_u64(3);
    let (rows, i) = (9, 50);
    let gu = rand_vec(&mut rng, rows * 2 * i);
    let x = be.activation_from_host(rows, 2 * i, &gu).unwrap();
    let mut out = be.alloc_activation(rows, i).unwrap();
    be.silu_and_mul(&x, &mut out).unwrap();
    let want: Vec<f32> = (0..rows * i)
        .map(|e| {
            let (r, c) = (e / i, e % i);
            let g = gu[r * 2 * i + c] as f64;
            let u = gu[r * 2 * i + i + c] as f64;
            (g / (1.0 + (-g).exp()) * u) as f32
        })
        .collect();
    assert_close(out.as_slice(), &want, 1e-5, "silu_and_mul");

    let (vocab, h) = (20, 8);
    let table = rand_vec(&mut rng, vocab * h);
    let tw = be
        .upload_weight("embed", host(&[vocab, h], table.clone()))
        .unwrap();
    let ids = vec![3u32, 19, 0, 3, 7];
    let batch = ForwardBatch {
        token_ids: ids.clone(),
        positions: vec![0; 5],
        slot_mapping: vec![0; 5],
        seqs: vec![SeqSlice {
            token_offset: 0,
            num_tokens: 5,
            context_len: 5,
            block_table: vec![0],
        }],
        logits_rows: vec![4, 1],
    };
    let step = be.upload_step(&batch).unwrap();
    let mut emb = be.alloc_activation(5, h).unwrap();
    be.embedding(&tw, &step, &mut emb).unwrap();
    let want: Vec<f32> = ids
        .iter()
        .flat_map(|&t| table[t as usize * h..(t as usize + 1) * h].to_vec())
        .collect();
    assert_close(emb.as_slice(), &want, 0.0, "embedding");

    let mut g = be.alloc_activation(2, h).unwrap();
    be.gather_rows(&emb, &step, 0..2, &mut g).unwrap();
    let want: Vec<f32> = [4usize, 1]
        .iter()
        .flat_map(|&r| want[r * h..(r + 1) * h].to_vec())
        .collect();
    assert_close(g.as_slice(), &want, 0.0, "gather_rows");
    be.gather_rows(&emb, &step, 1..2, &mut g).unwrap();
    assert_eq!(g.rows(), 1);
    assert_close(g.as_slice(), &want[h..], 0.0, "gather_rows subrange");

    let bad = ForwardBatch {
        token_ids: vec![20, 1, 2, 3, 4],
        ..batch
    };
    let step = be.upload_step(&bad).unwrap();
    assert!(
        be.embedding(&tw, &step, &mut emb).is_err(),
        "an id past the vocabulary is an error"
    );
}

/// A random step: several sequences with chunks at various offsets, scrambled block tables.
struct AttnCase {
    layout: AttentionLayout,
    shape: KvCacheShape,
    batch: ForwardBatch,
}

fn attn_case(rng: &mut StdRng, chunks: &[(usize, usize)], window: Option<usize>) -> AttnCase {
    let (nh, nkv, hd, bs) = (6, 2, 16, 4);
    let layout = AttentionLayout {
        num_heads: nh,
        num_kv_heads: nkv,
        head_dim: hd,
        scale: 1.0 / (hd as f32).sqrt(),
        sliding_window: window,
        softcap: None,
        rotary_dim: hd,
        rope_scale: 1.0,
    };
    let blocks_needed: usize = chunks.iter().map(|(s, n)| (s + n).div_ceil(bs)).sum();
    let num_blocks = blocks_needed + 5;
    let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
    ids.shuffle(rng);
    let mut batch = ForwardBatch::default();
    let mut next_block = 0;
    for &(start, n) in chunks {
        let nb = (start + n).div_ceil(bs);
        let table = ids[next_block..next_block + nb].to_vec();
        next_block += nb;
        batch.seqs.push(SeqSlice {
            token_offset: batch.token_ids.len(),
            num_tokens: n,
            context_len: start + n,
            block_table: table.clone(),
        });
        for p in start..start + n {
            batch.token_ids.push(0);
            batch.positions.push(p as u32);
            batch
                .slot_mapping
                .push(table[p / bs] * bs as u32 + (p % bs) as u32);
        }
    }
    let shape = KvCacheShape {
        num_layers: 2,
        num_blocks,
        block_size: bs,
        num_kv_heads: nkv,
        head_dim: hd,
    };
    AttnCase {
        layout,
        shape,
        batch,
    }
}

/// Dense causal GQA attention of one sequence: q [n, nh, hd] at positions start.., k/v
/// [ctx, nkv, hd].
fn dense_attention(l: &AttentionLayout, q: &[f32], k: &[f32], v: &[f32], start: usize) -> Vec<f32> {
    let (nh, nkv, hd) = (l.num_heads, l.num_kv_heads, l.head_dim);
    let n = q.len() / (nh * hd);
    let mut out = vec![0.0f32; q.len()];
    for i in 0..n {
        let qpos = start + i;
        for h in 0..nh {
            let kh = h / (nh / nkv);
            let lo = l.sliding_window.map_or(0, |w| (qpos + 1).saturating_sub(w));
            let qv = &q[(i * nh + h) * hd..(i * nh + h + 1) * hd];
            let scores: Vec<f64> = (lo..=qpos)
                .map(|j| {
                    let kv = &k[(j * nkv + kh) * hd..(j * nkv + kh + 1) * hd];
                    qv.iter()
                        .zip(kv)
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum::<f64>()
                        * l.scale as f64
                })
                .map(|x| l.softcap.map_or(x, |c| c as f64 * (x / c as f64).tanh()))
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let z: f64 = e.iter().sum();
            for d in 0..hd {
                let acc: f64 = (lo..=qpos)
                    .zip(&e)
                    .map(|(j, p)| p * v[(j * nkv + kh) * hd + d] as f64)
                    .sum();
                out[(i * nh + h) * hd + d] = (acc / z) as f32;
            }
        }
    }
    out
}

fn check_paged_attention(chunks: &[(usize, usize)], window: Option<usize>, seed: u64) {
    check_paged_attention_capped(chunks, window, None, seed)
}

fn check_paged_attention_capped(
    chunks: &[(usize, usize)],
    window: Option<usize>,
    softcap: Option<f32>,
    seed: u64,
) {
    let be = CpuBackend::new();
    let mut rng = StdRng::seed_from_u64(seed);
    let AttnCase {
        mut layout,
        shape,
        batch,
    } = attn_case(&mut rng, chunks, window);
    layout.softcap = softcap;
    let (nkv, hd, bs) = (layout.num_kv_heads, layout.head_dim, shape.block_size);
    let layer = 1;
    let mut cache = be.alloc_kv_cache(shape).unwrap();
    let t = batch.num_tokens();
    let qkv_host = rand_vec(&mut rng, t * layout.qkv_size());
    let qkv = be
        .activation_from_host(t, layout.qkv_size(), &qkv_host)
        .unwrap();
    // Fill every sequence's whole context (earlier chunks and this one) with random K/V,
    // written at the slots its scrambled block table names.
    let mut dense = Vec::new();
    for s in &batch.seqs {
        let k = rand_vec(&mut rng, s.context_len * nkv * hd);
        let v = rand_vec(&mut rng, s.context_len * nkv * hd);
        for p in 0..s.context_len {
            let slot = s.block_table[p / bs] as usize * bs + p % bs;
            let (a, b) = (slot * nkv * hd, (slot + 1) * nkv * hd);
            cache.k[layer][a..b].copy_from_slice(&k[p * nkv * hd..(p + 1) * nkv * hd]);
            cache.v[layer][a..b].copy_from_slice(&v[p * nkv * hd..(p + 1) * nkv * hd]);
        }
        dense.push((k, v));
    }
    let step = be.upload_step(&batch).unwrap();
    let mut out = be.alloc_activation(t, layout.q_size()).unwrap();
    be.attention(&qkv, &layout, &step, &cache, layer, &mut out)
        .unwrap();
    for (s, (k, v)) in batch.seqs.iter().zip(&dense) {
        let q: Vec<f32> = (s.token_offset..s.token_offset + s.num_tokens)
            .flat_map(|r| {
                qkv_host[r * layout.qkv_size()..r * layout.qkv_size() + layout.q_size()].to_vec()
            })
            .collect();
        let want = dense_attention(&layout, &q, k, v, s.start_pos());
        let got = &out.as_slice()
            [s.token_offset * layout.q_size()..(s.token_offset + s.num_tokens) * layout.q_size()];
        assert_close(got, &want, 1e-5, &format!("attention of seq {s:?}"));
    }
}

#[test]
fn paged_attention_matches_dense_for_mixed_prefill_and_decode() {
    // A whole prompt, a later chunk of a prompt, two decodes; contexts span several blocks.
    check_paged_attention(&[(0, 11), (13, 7), (40, 1), (3, 1)], None, 4);
    check_paged_attention(&[(5, 1)], None, 5);
    check_paged_attention(&[(0, 1), (0, 23)], None, 6);
}

#[test]
fn paged_attention_honours_sliding_window() {
    check_paged_attention(&[(0, 17), (9, 6), (30, 1)], Some(5), 7);
}

/// Gemma 2's soft-cap: scores become `cap * tanh(score / cap)` (a cap this small changes
/// the random scores a lot), with and without a window.
#[test]
fn paged_attention_soft_caps_scores() {
    check_paged_attention_capped(&[(0, 17), (9, 6), (30, 1)], None, Some(0.5), 11);
    check_paged_attention_capped(&[(0, 17), (30, 1)], Some(5), Some(0.5), 12);
}

/// RoPE by the definition: x * cos + rotate_half(x) * sin over the first `rot` dims of each
/// of the row's first `heads` heads (cos/sin duplicated over both halves), times `scale`;
/// the other dims, and what follows the heads (v), pass through.
fn naive_rope(
    row: &[f32],
    heads: usize,
    hd: usize,
    rot: usize,
    inv_freq: &[f32],
    pos: f64,
    scale: f32,
) -> Vec<f32> {
    let mut want = row.to_vec();
    for head in 0..heads {
        let x = &row[head * hd..(head + 1) * hd];
        for d in 0..rot {
            let f = inv_freq[d % (rot / 2)] as f64 * pos;
            let other = if d < rot / 2 {
                -x[d + rot / 2]
            } else {
                x[d - rot / 2]
            } as f64;
            want[head * hd + d] = ((x[d] as f64 * f.cos() + other * f.sin()) * scale as f64) as f32;
        }
    }
    want
}

/// Partial rotary (Phi-4): only the first `rotary_dim` dims of each head turn, the rest pass
/// through; cos and sin carry the RoPE attention factor.
#[test]
fn rope_rotates_the_rotary_part_only_and_scales_it() {
    let be = CpuBackend::new();
    let mut rng = StdRng::seed_from_u64(13);
    let AttnCase {
        mut layout,
        shape,
        batch,
    } = attn_case(&mut rng, &[(0, 5), (20, 1)], None);
    let (hd, rot, m) = (layout.head_dim, 6, 1.25f32);
    layout.rotary_dim = rot;
    layout.rope_scale = m;
    let w = layout.qkv_size();
    let inv_freq: Vec<f32> = (0..rot / 2)
        .map(|i| 1.0 / 100f32.powf(2.0 * i as f32 / rot as f32))
        .collect();
    let t = batch.num_tokens();
    let src = rand_vec(&mut rng, t * w);
    let mut qkv = be.activation_from_host(t, w, &src).unwrap();
    let mut cache = be.alloc_kv_cache(shape).unwrap();
    let inv = be
        .upload_vector("inv_freq", host(&[rot / 2], inv_freq.clone()))
        .unwrap();
    let step = be.upload_step(&batch).unwrap();
    be.rope_and_write_kv(&mut qkv, &inv, &layout, &step, &mut cache, 0)
        .unwrap();
    for r in 0..t {
        let pos = batch.positions[r] as f64;
        let row = &src[r * w..(r + 1) * w];
        let heads = layout.num_heads + layout.num_kv_heads;
        let want = naive_rope(row, heads, hd, rot, &inv_freq, pos, m);
        assert_close(
            &qkv.as_slice()[r * w..(r + 1) * w],
            &want,
            2e-5,
            &format!("partial rope row {r}"),
        );
    }
}

#[test]
fn gelu_tanh_and_head_norms_match_naive() {
    let be = CpuBackend::new();
    let mut rng = StdRng::seed_from_u64(14);
    let (rows, i) = (7, 40);
    let gu = rand_vec(&mut rng, rows * 2 * i);
    let x = be.activation_from_host(rows, 2 * i, &gu).unwrap();
    let mut out = be.alloc_activation(rows, i).unwrap();
    be.gelu_tanh_and_mul(&x, &mut out).unwrap();
    let want: Vec<f32> = gu
        .chunks(2 * i)
        .flat_map(|r| {
            let (g, u) = r.split_at(i);
            g.iter()
                .zip(u)
                .map(|(&g, &u)| {
                    let g = 4.0 * g as f64; // past the linear part
                    let c = (2.0 / std::f64::consts::PI).sqrt();
                    (0.5 * g * (1.0 + (c * (g + 0.044715 * g.powi(3))).tanh()) * u as f64) as f32
                })
                .collect::<Vec<_>>()
        })
        .collect();
    let scaled: Vec<f32> = gu
        .chunks(2 * i)
        .flat_map(|r| {
            let (g, u) = r.split_at(i);
            g.iter()
                .map(|v| 4.0 * v)
                .chain(u.iter().copied())
                .collect::<Vec<_>>()
        })
        .collect();
    let x = be.activation_from_host(rows, 2 * i, &scaled).unwrap();
    be.gelu_tanh_and_mul(&x, &mut out).unwrap();
    assert_close(out.as_slice(), &want, 1e-5, "gelu_tanh_and_mul");

    // q/k norm: each head of q and of k normalized with its own weight; v untouched.
    let mut rng = StdRng::seed_from_u64(15);
    let AttnCase { layout, .. } = attn_case(&mut rng, &[(0, 3)], None);
    let (hd, w, t) = (layout.head_dim, layout.qkv_size(), 3);
    let src = rand_vec(&mut rng, t * w);
    let (qw, kw) = (rand_vec(&mut rng, hd), rand_vec(&mut rng, hd));
    let mut qkv = be.activation_from_host(t, w, &src).unwrap();
    let q_norm = be.upload_vector("q_norm", host(&[hd], qw.clone())).unwrap();
    let k_norm = be.upload_vector("k_norm", host(&[hd], kw.clone())).unwrap();
    be.qk_norm(&mut qkv, &q_norm, &k_norm, 1e-6, &layout)
        .unwrap();
    let want: Vec<f32> = src
        .chunks(w)
        .flat_map(|row| {
            let (q, rest) = row.split_at(layout.q_size());
            let (k, v) = rest.split_at(layout.kv_size());
            let mut out = naive_rms(q, &qw, 1e-6);
            out.extend(naive_rms(k, &kw, 1e-6));
            out.extend_from_slice(v);
            out
        })
        .collect();
    assert_close(qkv.as_slice(), &want, 1e-5, "qk_norm");
}

#[test]
fn rope_rotates_q_k_and_writes_cache_slots() {
    let be = CpuBackend::new();
    let mut rng = StdRng::seed_from_u64(8);
    let AttnCase {
        layout,
        shape,
        batch,
    } = attn_case(&mut rng, &[(0, 6), (17, 2), (33, 1)], None);
    let (hd, q_size, kv_size, w) = (
        layout.head_dim,
        layout.q_size(),
        layout.kv_size(),
        layout.qkv_size(),
    );
    let inv_freq: Vec<f32> = (0..hd / 2)
        .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / hd as f32))
        .collect();
    let t = batch.num_tokens();
    let src = rand_vec(&mut rng, t * w);
    let mut qkv = be.activation_from_host(t, w, &src).unwrap();
    let mut cache = be.alloc_kv_cache(shape).unwrap();
    let inv = be
        .upload_vector("inv_freq", host(&[hd / 2], inv_freq.clone()))
        .unwrap();
    let step = be.upload_step(&batch).unwrap();
    be.rope_and_write_kv(&mut qkv, &inv, &layout, &step, &mut cache, 0)
        .unwrap();
    for r in 0..t {
        let pos = batch.positions[r] as f64;
        let row = &src[r * w..(r + 1) * w];
        let heads = layout.num_heads + layout.num_kv_heads;
        let want = naive_rope(row, heads, hd, hd, &inv_freq, pos, 1.0);
        assert_close(
            &qkv.as_slice()[r * w..(r + 1) * w],
            &want,
            2e-5,
            &format!("rope row {r}"),
        );
        let slot = batch.slot_mapping[r] as usize;
        assert_close(
            &cache.k[0][slot * kv_size..(slot + 1) * kv_size],
            &qkv.as_slice()[r * w + q_size..r * w + q_size + kv_size],
            0.0,
            "cached k",
        );
        assert_close(
            &cache.v[0][slot * kv_size..(slot + 1) * kv_size],
            &row[q_size + kv_size..],
            0.0,
            "cached v",
        );
        assert!(
            cache.k[1].iter().all(|&x| x == 0.0),
            "other layers stay untouched"
        );
    }
}

#[test]
fn forward_batch_validation_names_the_problem() {
    let mut rng = StdRng::seed_from_u64(9);
    let AttnCase { shape, batch, .. } = attn_case(&mut rng, &[(0, 6), (17, 2)], None);
    batch.validate(&shape, 10).unwrap();
    let mut b = batch.clone();
    b.seqs[1].block_table.pop();
    assert!(b
        .validate(&shape, 10)
        .unwrap_err()
        .to_string()
        .contains("blocks"));
    let mut b = batch.clone();
    b.token_ids[0] = 10;
    assert!(b
        .validate(&shape, 10)
        .unwrap_err()
        .to_string()
        .contains("vocabulary"));
    let mut b = batch;
    b.logits_rows = vec![8];
    assert!(b
        .validate(&shape, 10)
        .unwrap_err()
        .to_string()
        .contains("logits row"));
}

#[test]
fn half_precision_weights_are_widened_exactly() {
    use half::{bf16, f16};
    let be = CpuBackend::new();
    let mut rng = StdRng::seed_from_u64(10);
    // k * n spans several widening blocks; m covers the split and the large-m paths.
    let (k, n) = (129, 1200);
    let ws = rand_vec(&mut rng, n * k);
    let as_bf16: Vec<bf16> = ws.iter().map(|&v| bf16::from_f32(v)).collect();
    let as_f16: Vec<f16> = ws.iter().map(|&v| f16::from_f32(v)).collect();
    let widened_bf16: Vec<f32> = as_bf16.iter().map(|v| v.to_f32()).collect();
    let widened_f16: Vec<f32> = as_f16.iter().map(|v| v.to_f32()).collect();
    let cases = [
        (HostData::BF16(as_bf16), widened_bf16),
        (HostData::F16(as_f16), widened_f16),
    ];
    for (data, widened) in cases {
        let w = be
            .upload_weight(
                "w",
                HostTensor {
                    shape: vec![n, k],
                    data,
                },
            )
            .unwrap();
        let f = be
            .upload_weight("w32", host(&[n, k], widened.clone()))
            .unwrap();
        for m in [1, 5, 40] {
            let xs = rand_vec(&mut rng, m * k);
            let x = be.activation_from_host(m, k, &xs).unwrap();
            let (mut a, mut b) = (
                be.alloc_activation(m, n).unwrap(),
                be.alloc_activation(m, n).unwrap(),
            );
            be.linear(&x, &w, None, &mut a).unwrap();
            be.linear(&x, &f, None, &mut b).unwrap();
            assert_close(
                a.as_slice(),
                b.as_slice(),
                1e-5,
                &format!("half weights, {m} rows"),
            );
        }
        // The embedding table may be half precision too (tied LM head).
        let step = be
            .upload_step(&ForwardBatch {
                token_ids: vec![1199, 0],
                positions: vec![0, 1],
                slot_mapping: vec![0, 1],
                seqs: vec![SeqSlice {
                    token_offset: 0,
                    num_tokens: 2,
                    context_len: 2,
                    block_table: vec![0],
                }],
                logits_rows: vec![],
            })
            .unwrap();
        let mut e = be.alloc_activation(2, k).unwrap();
        be.embedding(&w, &step, &mut e).unwrap();
        assert_close(
            &e.as_slice()[..k],
            &widened[1199 * k..],
            0.0,
            "half embedding row",
        );
        assert_close(
            &e.as_slice()[k..],
            &widened[..k],
            0.0,
            "half embedding row 0",
        );
    }
}
