//! Every CUDA kernel against its CPU reference (`rvllm_kernels::reference`), on fresh random
//! inputs (the seed is printed; RVLLM_TEST_SEED replays one), with outputs poisoned (NaN)
//! before each launch, over several shapes including sizes that are not multiples of the
//! kernels' block sizes and contexts longer than one KV block. Every kernel with 2-byte
//! elements is checked in both element types it is built for, bf16 and f16 (`<stem>_f16`
//! modules), each at its own tolerance; block tables and sampling have no element type.
//!
//! Without a CUDA device each test prints `SKIPPED: no CUDA device` and returns. Build with
//! `--features cuda` so that the kernels are embedded. Attention: `gpu_attention.rs`; timings:
//! `gpu_bench.rs`.
mod gpu_harness;

use gpu_harness::{assert_close, gpu, inv_freq, rng, Elem};
use rand::seq::SliceRandom;
use rand::Rng;
use rvllm_kernels::args;
use rvllm_kernels::gemv_bulk::GemvBulk;
use rvllm_kernels::reference as cpu;

#[test]
fn block_tables_expand_from_the_compact_upload() {
    let Some(g) = gpu("block_tables_expand_from_the_compact_upload") else {
        return;
    };
    let mut r = rng("block_tables");
    // (sequences, row stride); rows from empty to full.
    for &(seqs, stride) in &[(5usize, 8usize), (300, 40), (1, 8192)] {
        let lens: Vec<usize> = (0..seqs).map(|_| r.random_range(0..=stride)).collect();
        let mut offsets = vec![0i32];
        let mut compact = Vec::new();
        for &n in &lens {
            compact.extend((0..n).map(|_| r.random_range(0..1_000_000)));
            offsets.push(compact.len() as i32);
        }
        // What the table held before: entries past each row's ids must keep it.
        let before: Vec<i32> = (0..seqs * stride).map(|i| -(i as i32) - 1).collect();
        let d_tables = g.upload(&before);
        let (d_compact, d_offsets) = (g.upload(&compact), g.upload(&offsets));
        let (n, st) = (seqs as i32, stride as i32);
        g.launch_args(
            "block_tables",
            "expand_block_tables",
            (seqs as u32, 1, 1),
            (128, 1, 1),
            args::ExpandBlockTables {
                tables: d_tables.ptr,
                compact: d_compact.ptr,
                offsets: d_offsets.ptr,
                num_seqs: n,
                stride: st,
            },
        );
        let mut want = before.clone();
        cpu::expand_block_tables(&mut want, &compact, &offsets, stride);
        assert_eq!(
            g.download(&d_tables),
            want,
            "{seqs} rows of stride {stride}"
        );
    }
}

#[test]
fn sampled_tokens_feed_the_next_steps_ids() {
    let Some(g) = gpu("sampled_tokens_feed_the_next_steps_ids") else {
        return;
    };
    let mut r = rng("feed");
    // (step tokens, previous rows, pairs): fewer and more pairs than a block's 256 threads.
    for &(num_ids, rows, pairs) in &[
        (7usize, 5usize, 3usize),
        (1024, 1024, 1000),
        (600, 300, 257),
    ] {
        let ids: Vec<i32> = (0..num_ids).map(|_| r.random_range(0..128_000)).collect();
        let tokens: Vec<i32> = (0..rows).map(|_| r.random_range(0..128_000)).collect();
        // Distinct destinations (each placeholder is one token), any source rows.
        let mut dst: Vec<i32> = (0..num_ids as i32).collect();
        dst.shuffle(&mut r);
        let feed: Vec<i32> = dst[..pairs]
            .iter()
            .flat_map(|&d| [d, r.random_range(0..rows as i32)])
            .collect();
        let (d_ids, d_feed, d_tokens) = (g.upload(&ids), g.upload(&feed), g.upload(&tokens));
        let n = pairs as i32;
        g.launch_args(
            "block_tables",
            "feed_sampled_tokens",
            (pairs.div_ceil(256) as u32, 1, 1),
            (256, 1, 1),
            args::FeedSampledTokens {
                ids: d_ids.ptr,
                feed: d_feed.ptr,
                tokens: d_tokens.ptr,
                n,
            },
        );
        let mut want = ids.clone();
        cpu::feed_sampled_tokens(&mut want, &feed, &tokens);
        assert_eq!(
            g.download(&d_ids),
            want,
            "{pairs} of {num_ids} ids from {rows} rows"
        );
    }
}

#[test]
fn embedding_lookup_and_row_gather() {
    let Some(g) = gpu("embedding_lookup_and_row_gather") else {
        return;
    };
    let mut r = rng("embedding");
    for e in Elem::BOTH {
        let (ty, module) = (e.name(), e.module("embedding"));
        for &(vocab, hidden, tokens) in
            &[(1000usize, 576usize, 7usize), (301, 4096, 33), (50, 130, 5)]
        {
            let (table_h, table) = e.random(&mut r, vocab * hidden, 1.0);
            let mut ids: Vec<i32> = (0..tokens)
                .map(|_| r.random_range(0..vocab as i32))
                .collect();
            ids[0] = vocab as i32 - 1;
            let d_table = g.upload(&table_h);
            let d_ids = g.upload(&ids);
            let out = g.poisoned(tokens * hidden, e.nan());
            let (n, h, v) = (tokens as i32, hidden as i32, vocab as i32);
            g.launch_args(
                &module,
                &e.kernel("embedding_lookup_bf16"),
                (tokens as u32, 1, 1),
                (256, 1, 1),
                args::EmbeddingLookup {
                    out: out.ptr,
                    table: d_table.ptr,
                    ids: d_ids.ptr,
                    num_tokens: n,
                    hidden: h,
                    vocab: v,
                },
            );
            // Embedding rows are copies: exact.
            assert_close(
                &format!("{ty} embedding v{vocab} h{hidden}"),
                &g.download_as(e, &out),
                &cpu::embedding(&table, hidden, &ids),
                0.0,
                0.0,
            );

            let rows: Vec<i32> = (0..3).map(|_| r.random_range(0..vocab as i32)).collect();
            let d_rows = g.upload(&rows);
            let out = g.poisoned(rows.len() * hidden, e.nan());
            let nr = rows.len() as i32;
            g.launch_args(
                &module,
                &e.kernel("gather_rows_bf16"),
                (rows.len() as u32, 1, 1),
                (256, 1, 1),
                args::GatherRows {
                    out: out.ptr,
                    r#in: d_table.ptr,
                    rows: d_rows.ptr,
                    num_rows: nr,
                    cols: h,
                },
            );
            assert_close(
                &format!("{ty} gather_rows v{vocab} h{hidden}"),
                &g.download_as(e, &out),
                &cpu::gather_rows(&table, hidden, &rows),
                0.0,
                0.0,
            );
        }
    }
}

#[test]
fn rms_norm_plain_and_fused_with_residual() {
    let Some(g) = gpu("rms_norm_plain_and_fused_with_residual") else {
        return;
    };
    let mut r = rng("rms_norm");
    for e in Elem::BOTH {
        let (ty, module) = (e.name(), e.module("norm"));
        let (atol, rtol) = e.tolerance();
        // 576..4096: 16-byte register path; 1001 and 12288 (> 8 * 4 * 256): the plain loop.
        for &(tokens, hidden) in &[
            (1usize, 576usize),
            (13, 4096),
            (5, 1000),
            (3, 1001),
            (2, 12288),
        ] {
            let eps = 1e-5f32;
            let (x_h, x) = e.random(&mut r, tokens * hidden, 2.0);
            let (w_h, w) = e.random(&mut r, hidden, 1.5);
            let (res_h, res) = e.random(&mut r, tokens * hidden, 2.0);
            let (d_x, d_w) = (g.upload(&x_h), g.upload(&w_h));
            let (n, h) = (tokens as i32, hidden as i32);
            let out = g.poisoned(tokens * hidden, e.nan());
            g.launch_args(
                &module,
                &e.kernel("rms_norm_bf16"),
                (tokens as u32, 1, 1),
                (256, 1, 1),
                args::RmsNorm {
                    out: out.ptr,
                    x: d_x.ptr,
                    weight: d_w.ptr,
                    eps,
                    num_tokens: n,
                    hidden: h,
                },
            );
            assert_close(
                &format!("{ty} rms_norm t{tokens} h{hidden}"),
                &g.download_as(e, &out),
                &cpu::rms_norm(&x, &w, eps),
                atol,
                rtol,
            );

            let d_res = g.upload(&res_h);
            let out = g.poisoned(tokens * hidden, e.nan());
            g.launch_args(
                &module,
                &e.kernel("fused_add_rms_norm_bf16"),
                (tokens as u32, 1, 1),
                (256, 1, 1),
                args::FusedAddRmsNorm {
                    out: out.ptr,
                    residual: d_res.ptr,
                    x: d_x.ptr,
                    weight: d_w.ptr,
                    eps,
                    num_tokens: n,
                    hidden: h,
                },
            );
            let mut want_res = res.clone();
            let want = cpu::fused_add_rms_norm(&mut want_res, &x, &w, eps);
            assert_close(
                &format!("{ty} fused residual t{tokens} h{hidden}"),
                &g.download_as(e, &d_res),
                &want_res,
                atol,
                rtol,
            );
            assert_close(
                &format!("{ty} fused_add_rms_norm t{tokens} h{hidden}"),
                &g.download_as(e, &out),
                &want,
                atol,
                rtol,
            );
        }
    }
}

/// Per-head q/k RMSNorm (Qwen3, Gemma 3) on fused qkv rows, written into a poisoned copy of
/// the rows: the q and k heads must match the reference and the v part must stay poisoned
/// (the kernel reads and writes only q and k), for head sizes on and off the register path.
#[test]
fn head_rms_norm_of_q_and_k() {
    let Some(g) = gpu("head_rms_norm_of_q_and_k") else {
        return;
    };
    let mut r = rng("head_rms_norm");
    for e in Elem::BOTH {
        let (ty, module) = (e.name(), e.module("norm"));
        let (atol, rtol) = e.tolerance();
        // (tokens, q heads, kv heads, head_dim): 64/128/256 as built, 80 and 96 off the
        // power of two, 320 past the register path; head counts not multiples of 4.
        for &(tokens, hq, hk, hd) in &[
            (1usize, 16usize, 8usize, 128usize),
            (7, 8, 4, 256),
            (5, 14, 2, 64),
            (3, 6, 3, 80),
            (2, 5, 1, 96),
            (4, 3, 1, 320),
        ] {
            let stride = (hq + 2 * hk) * hd;
            let eps = 1e-6f32;
            let (x_h, x) = e.random(&mut r, tokens * stride, 3.0);
            let (qw_h, qw) = e.random(&mut r, hd, 1.5);
            let (kw_h, kw) = e.random(&mut r, hd, 1.5);
            let (d_x, d_qw, d_kw) = (g.upload(&x_h), g.upload(&qw_h), g.upload(&kw_h));
            let out = g.poisoned(tokens * stride, e.nan());
            g.launch_args(
                &module,
                &e.kernel("head_rms_norm_bf16"),
                (tokens as u32, (hq + hk).div_ceil(4) as u32, 1),
                (128, 1, 1),
                args::HeadRmsNorm {
                    out: out.ptr,
                    x: d_x.ptr,
                    q_weight: d_qw.ptr,
                    k_weight: d_kw.ptr,
                    eps,
                    num_tokens: tokens as i32,
                    row_stride: stride as i32,
                    num_q_heads: hq as i32,
                    num_kv_heads: hk as i32,
                    head_dim: hd as i32,
                },
            );
            let mut want = x.clone();
            cpu::head_rms_norm(&mut want, stride, hq, hk, &qw, &kw, eps);
            let got = g.download_as(e, &out);
            let qk = (hq + hk) * hd;
            let (got_qk, want_qk): (Vec<f32>, Vec<f32>) = got
                .chunks_exact(stride)
                .zip(want.chunks_exact(stride))
                .flat_map(|(a, b)| a[..qk].iter().copied().zip(b[..qk].iter().copied()))
                .unzip();
            let what = format!("{ty} head_rms_norm t{tokens} q{hq} k{hk} hd{hd}");
            assert_close(&what, &got_qk, &want_qk, atol, rtol);
            assert!(
                got.chunks_exact(stride)
                    .all(|row| row[qk..].iter().all(|v| v.is_nan())),
                "{what}: the v part was written"
            );
        }
    }
}

#[test]
fn silu_and_mul_and_elementwise_helpers() {
    let Some(g) = gpu("silu_and_mul_and_elementwise_helpers") else {
        return;
    };
    let mut r = rng("silu");
    for e in Elem::BOTH {
        let (ty, module) = (e.name(), e.module("activation"));
        let (atol, rtol) = e.tolerance();
        for &(tokens, inter) in &[(1usize, 1536usize), (9, 14336), (4, 1000), (3, 2053)] {
            let (x_h, x) = e.random(&mut r, tokens * 2 * inter, 4.0);
            let d_x = g.upload(&x_h);
            let out = g.poisoned(tokens * inter, e.nan());
            let (n, i) = (tokens as i32, inter as i32);
            g.launch_args(
                &module,
                &e.kernel("silu_and_mul_bf16"),
                (inter.div_ceil(2048) as u32, tokens as u32, 1),
                (256, 1, 1),
                args::SiluAndMul {
                    out: out.ptr,
                    r#in: d_x.ptr,
                    num_tokens: n,
                    inter: i,
                },
            );
            assert_close(
                &format!("{ty} silu_and_mul t{tokens} i{inter}"),
                &g.download_as(e, &out),
                &cpu::silu_and_mul(&x, inter),
                atol,
                rtol,
            );
        }
        let n = 10_007usize;
        let (a_h, a) = e.random(&mut r, n, 3.0);
        let (b_h, b) = e.random(&mut r, n, 3.0);
        let (d_a, d_b) = (g.upload(&a_h), g.upload(&b_h));
        let out = g.poisoned(n, e.nan());
        let n64 = n as i64;
        let add = e.kernel("add_bf16");
        g.launch_args(
            &module,
            &add,
            (8, 1, 1),
            (256, 1, 1),
            args::Add {
                out: out.ptr,
                a: d_a.ptr,
                b: d_b.ptr,
                n: n64,
            },
        );
        let want: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
        assert_close(
            &format!("{ty} {add}"),
            &g.download_as(e, &out),
            &want,
            atol,
            rtol,
        );

        let f: Vec<f32> = (0..n).map(|_| r.random_range(-100.0f32..100.0)).collect();
        let d_f = g.upload(&f);
        let out = g.poisoned(n, e.nan());
        let narrow = e.kernel("f32_to_bf16");
        g.launch_args(
            &module,
            &narrow,
            (8, 1, 1),
            (256, 1, 1),
            args::F32ToElem {
                out: out.ptr,
                r#in: d_f.ptr,
                n: n64,
            },
        );
        // Exactly half::bf16::from_f32 / half::f16::from_f32 (round to nearest even).
        let got: Vec<u16> = g.download(&out);
        let want: Vec<u16> = f.iter().map(|&v| e.bits(v)).collect();
        assert_eq!(
            got, want,
            "{ty}: {narrow} must round to nearest even exactly like half::{ty}"
        );
        let back = g.poisoned(n, f32::NAN);
        let widen = e.kernel("bf16_to_f32");
        g.launch_args(
            &module,
            &widen,
            (8, 1, 1),
            (256, 1, 1),
            args::ElemToF32 {
                out: back.ptr,
                r#in: out.ptr,
                n: n64,
            },
        );
        let want: Vec<f32> = f.iter().map(|&v| e.round(v)).collect();
        assert_close(
            &format!("{ty} {widen}"),
            &g.download(&back),
            &want,
            0.0,
            0.0,
        );
    }
}

/// Gemma's elementwise kernels: GeGLU (gelu_tanh_and_mul, on the 16-byte and the scalar
/// path), the embedding scale and the final logit soft-cap (both in place; the soft-cap on
/// logits far past the cap, where tanh saturates, as well as inside it).
#[test]
fn gemma_geglu_scale_and_softcap() {
    let Some(g) = gpu("gemma_geglu_scale_and_softcap") else {
        return;
    };
    let mut r = rng("gemma_elementwise");
    for e in Elem::BOTH {
        let (ty, module) = (e.name(), e.module("activation"));
        let (atol, rtol) = e.tolerance();
        for &(tokens, inter) in &[(1usize, 1536usize), (9, 15360), (4, 1000), (3, 2053)] {
            let (x_h, x) = e.random(&mut r, tokens * 2 * inter, 4.0);
            let d_x = g.upload(&x_h);
            let out = g.poisoned(tokens * inter, e.nan());
            g.launch_args(
                &module,
                &e.kernel("gelu_tanh_and_mul_bf16"),
                (inter.div_ceil(2048) as u32, tokens as u32, 1),
                (256, 1, 1),
                args::GeluTanhAndMul {
                    out: out.ptr,
                    r#in: d_x.ptr,
                    num_tokens: tokens as i32,
                    inter: inter as i32,
                },
            );
            assert_close(
                &format!("{ty} gelu_tanh_and_mul t{tokens} i{inter}"),
                &g.download_as(e, &out),
                &cpu::gelu_tanh_and_mul(&x, inter),
                atol,
                rtol,
            );
        }
        let n = 10_007usize;
        // sqrt(hidden) of Gemma-3-12B's 3840.
        let factor = 3840f32.sqrt();
        let (x_h, x) = e.random(&mut r, n, 2.0);
        let d_x = g.upload(&x_h);
        g.launch_args(
            &module,
            &e.kernel("scale_bf16"),
            (8, 1, 1),
            (256, 1, 1),
            args::Scale {
                x: d_x.ptr,
                factor,
                n: n as i64,
            },
        );
        let want: Vec<f32> = x.iter().map(|v| v * factor).collect();
        assert_close(
            &format!("{ty} scale"),
            &g.download_as(e, &d_x),
            &want,
            atol,
            rtol,
        );
        for cap in [30.0f32, 5.0] {
            let (x_h, x) = e.random(&mut r, n, 4.0 * cap);
            let d_x = g.upload(&x_h);
            g.launch_args(
                &module,
                &e.kernel("softcap_bf16"),
                (8, 1, 1),
                (256, 1, 1),
                args::Softcap {
                    x: d_x.ptr,
                    cap,
                    n: n as i64,
                },
            );
            let want: Vec<f32> = x.iter().map(|&v| cpu::softcap(v, cap)).collect();
            let got = g.download_as(e, &d_x);
            assert_close(&format!("{ty} softcap {cap}"), &got, &want, atol, rtol);
            assert!(
                got.iter().all(|v| v.abs() <= cap),
                "{ty} softcap {cap}: a value past the cap"
            );
        }
    }
}

/// Llama-3 style inv_freq (the scaling itself is host work; any positive table will do here).
#[test]
fn rope_and_cache_write() {
    let Some(g) = gpu("rope_and_cache_write") else {
        return;
    };
    let mut r = rng("rope_cache");
    for e in Elem::BOTH {
        let ty = e.name();
        let (atol, rtol) = e.tolerance();
        // (tokens, heads, kv heads, head dim, fused qkv row?, rotated dims): partial rotary
        // (Phi-3's 96 of 128) runs rope_partial_and_cache, whose other dims pass through.
        for &(tokens, nh, nkv, hd, fused, rot) in &[
            (5usize, 32usize, 8usize, 128usize, false, 128usize),
            (19, 9, 3, 64, true, 64),
            (3, 4, 4, 128, true, 128),
            (4, 6, 2, 36, false, 36), // head_dim / 2 not a multiple of 8: the scalar path
            (6, 8, 2, 128, true, 96),
            (5, 4, 2, 64, false, 32),
            (3, 3, 1, 64, true, 20), // rotary_dim / 2 not a multiple of 8: the scalar path
        ] {
            let bs = 16usize;
            let num_blocks = 8usize;
            let kvw = nkv * hd;
            // q, k, v either separate or inside one [T, (nh + 2 nkv) hd] row.
            let (q_stride, k_stride, v_stride) = if fused {
                (
                    (nh + 2 * nkv) * hd,
                    (nh + 2 * nkv) * hd,
                    (nh + 2 * nkv) * hd,
                )
            } else {
                (nh * hd, kvw, kvw)
            };
            let (q_h, q) = e.random(&mut r, tokens * q_stride, 2.0);
            let (k_h, k) = if fused {
                (q_h.clone(), q.clone())
            } else {
                e.random(&mut r, tokens * k_stride, 2.0)
            };
            let (v_h, v) = if fused {
                (q_h.clone(), q.clone())
            } else {
                e.random(&mut r, tokens * v_stride, 2.0)
            };
            let (k_off, v_off) = if fused {
                (nh * hd, (nh + nkv) * hd)
            } else {
                (0, 0)
            };
            let positions: Vec<i32> = (0..tokens).map(|_| r.random_range(0..131_072)).collect();
            let mut slots: Vec<i32> = (0..(num_blocks * bs) as i32).collect();
            slots.shuffle(&mut r);
            let mut slots: Vec<i32> = slots[..tokens].to_vec();
            slots[tokens - 1] = -1; // padding token: no cache write
            let freqs = inv_freq(rot, 500_000.0);
            // LongRoPE's factor for a 4x context (Phi-3.5's shape) on the partial builds.
            let factor = if rot == hd { 1.0 } else { 1.1902 };

            let d_q = g.upload(&q_h);
            let d_k = if fused { None } else { Some(g.upload(&k_h)) };
            let d_v = if fused { None } else { Some(g.upload(&v_h)) };
            let q_ptr = d_q.ptr;
            let k_ptr = d_k.as_ref().map_or(q_ptr + (k_off * 2) as u64, |b| b.ptr);
            let v_ptr = d_v.as_ref().map_or(q_ptr + (v_off * 2) as u64, |b| b.ptr);
            let kc = g.poisoned(num_blocks * bs * kvw, e.nan());
            let vc = g.poisoned(num_blocks * bs * kvw, e.nan());
            let (d_pos, d_slots, d_freq) =
                (g.upload(&positions), g.upload(&slots), g.upload(&freqs));
            let (n, nh_, nkv_, hd_) = (tokens as i32, nh as i32, nkv as i32, hd as i32);
            let (qs, ks, vs) = (q_stride as i32, k_stride as i32, v_stride as i32);
            let (module, grid, block) =
                (e.module("rope_cache"), (tokens as u32, 1, 1), (256, 1, 1));
            if rot == hd {
                g.launch_args(
                    &module,
                    &e.kernel("rope_and_cache_bf16"),
                    grid,
                    block,
                    args::RopeAndCache {
                        q: q_ptr,
                        k: k_ptr,
                        v: v_ptr,
                        key_cache: kc.ptr,
                        value_cache: vc.ptr,
                        positions: d_pos.ptr,
                        slot_mapping: d_slots.ptr,
                        inv_freq: d_freq.ptr,
                        num_tokens: n,
                        num_heads: nh_,
                        num_kv_heads: nkv_,
                        head_dim: hd_,
                        q_stride: qs,
                        k_stride: ks,
                        v_stride: vs,
                    },
                );
            } else {
                g.launch_args(
                    &module,
                    &e.kernel("rope_partial_and_cache_bf16"),
                    grid,
                    block,
                    args::RopePartialAndCache {
                        q: q_ptr,
                        k: k_ptr,
                        v: v_ptr,
                        key_cache: kc.ptr,
                        value_cache: vc.ptr,
                        positions: d_pos.ptr,
                        slot_mapping: d_slots.ptr,
                        inv_freq: d_freq.ptr,
                        num_tokens: n,
                        num_heads: nh_,
                        num_kv_heads: nkv_,
                        head_dim: hd_,
                        q_stride: qs,
                        k_stride: ks,
                        v_stride: vs,
                        rotary_dim: rot as i32,
                        attention_factor: factor,
                    },
                );
            }

            let mut want_q = q.clone();
            cpu::rope_partial_inplace(
                &mut want_q,
                q_stride,
                nh,
                hd,
                rot,
                &positions,
                &freqs,
                factor,
            );
            let mut want_k = k[k_off..].to_vec();
            cpu::rope_partial_inplace(
                &mut want_k,
                k_stride,
                nkv,
                hd,
                rot,
                &positions,
                &freqs,
                factor,
            );
            let got_q = g.download_as(e, &d_q);
            let tag = format!("{ty} t{tokens} nh{nh} nkv{nkv} hd{hd} rot{rot} fused {fused}");
            let rows = |src: &[f32], stride: usize, off: usize, width: usize| -> Vec<f32> {
                (0..tokens)
                    .flat_map(|t| src[t * stride + off..t * stride + off + width].to_vec())
                    .collect()
            };
            assert_close(
                &format!("rope q {tag}"),
                &rows(&got_q, q_stride, 0, nh * hd),
                &rows(&want_q, q_stride, 0, nh * hd),
                atol,
                rtol,
            );
            let got_k = match &d_k {
                Some(b) => g.download_as(e, b),
                None => got_q[k_off..].to_vec(),
            };
            assert_close(
                &format!("rope k {tag}"),
                &rows(&got_k, k_stride, 0, kvw),
                &rows(&want_k, k_stride, 0, kvw),
                atol,
                rtol,
            );
            if fused {
                // The v part of the fused row is read, never written.
                assert_close(
                    &format!("v untouched {tag}"),
                    &rows(&got_q, q_stride, v_off, kvw),
                    &rows(&q, q_stride, v_off, kvw),
                    0.0,
                    0.0,
                );
            }

            let mut want_kc = vec![f32::NAN; num_blocks * bs * kvw];
            let mut want_vc = want_kc.clone();
            cpu::write_cache(&mut want_kc, kvw, &want_k, k_stride, &slots);
            cpu::write_cache(&mut want_vc, kvw, &v[v_off..], v_stride, &slots);
            for (name, got, want) in [
                ("key cache", g.download_as(e, &kc), want_kc),
                ("value cache", g.download_as(e, &vc), want_vc),
            ] {
                // Slots outside slot_mapping must still hold the poison.
                for (s, (gs, ws)) in got.chunks(kvw).zip(want.chunks(kvw)).enumerate() {
                    if ws[0].is_nan() {
                        assert!(
                            gs.iter().all(|x| x.is_nan()),
                            "{name}: slot {s} was written but is not in slot_mapping ({tag})"
                        );
                    } else {
                        assert_close(&format!("{name} slot {s} {tag}"), gs, ws, atol, rtol);
                    }
                }
            }
        }
    }
}

#[test]
fn sampling_greedy_and_seeded() {
    let Some(g) = gpu("sampling_greedy_and_seeded") else {
        return;
    };
    let mut r = rng("sampling");
    for &vocab in &[1000usize, 49_152, 128_256] {
        let base = cpu::SampleParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 0,
            offset: 0,
        };
        let mut params = vec![
            base,
            cpu::SampleParams {
                temperature: 1.0,
                ..base
            },
            cpu::SampleParams {
                temperature: 0.7,
                top_k: 50,
                ..base
            },
            cpu::SampleParams {
                temperature: 0.9,
                top_p: 0.9,
                ..base
            },
            cpu::SampleParams {
                temperature: 1.3,
                min_p: 0.05,
                ..base
            },
            cpu::SampleParams {
                temperature: 0.8,
                top_k: 200,
                top_p: 0.8,
                min_p: 0.02,
                ..base
            },
            cpu::SampleParams {
                temperature: 1.0,
                top_k: 1,
                ..base
            },
            cpu::SampleParams {
                temperature: 2.0,
                top_p: 0.3,
                ..base
            },
        ];
        for p in params.iter_mut() {
            p.seed = r.random();
            p.offset = r.random_range(0..1000);
        }
        // A few more greedy rows, one with a tie for the maximum.
        params.push(base);
        params.push(base);
        let b = params.len();
        let mut logits: Vec<f32> = (0..b * vocab)
            .map(|_| r.random_range(-8.0f32..8.0))
            .collect();
        let tie_row = b - 1;
        logits[tie_row * vocab + 17] = 20.0;
        logits[tie_row * vocab + vocab - 3] = 20.0;
        let run = |params: &[cpu::SampleParams]| -> (Vec<i32>, Vec<f32>) {
            let d_logits = g.upload(&logits);
            let temps: Vec<f32> = params.iter().map(|p| p.temperature).collect();
            let ks: Vec<i32> = params.iter().map(|p| p.top_k).collect();
            let ps: Vec<f32> = params.iter().map(|p| p.top_p).collect();
            let mps: Vec<f32> = params.iter().map(|p| p.min_p).collect();
            let seeds: Vec<u64> = params.iter().map(|p| p.seed).collect();
            let offs: Vec<u64> = params.iter().map(|p| p.offset).collect();
            let (d_t, d_k, d_p, d_m, d_s, d_o) = (
                g.upload(&temps),
                g.upload(&ks),
                g.upload(&ps),
                g.upload(&mps),
                g.upload(&seeds),
                g.upload(&offs),
            );
            let tokens = g.poisoned(params.len(), -1i32);
            let lps = g.poisoned(params.len(), f32::NAN);
            let v = vocab as i32;
            g.launch_args(
                "sampling",
                "sample_tokens",
                (params.len() as u32, 1, 1),
                (1024, 1, 1),
                args::SampleTokens {
                    out_tokens: tokens.ptr,
                    out_logprobs: lps.ptr,
                    logits: d_logits.ptr,
                    vocab: v,
                    temperatures: d_t.ptr,
                    top_ks: d_k.ptr,
                    top_ps: d_p.ptr,
                    min_ps: d_m.ptr,
                    seeds: d_s.ptr,
                    offsets: d_o.ptr,
                    filtered_only: 0,
                },
            );
            (g.download(&tokens), g.download(&lps))
        };
        let (tokens, lps) = run(&params);
        let mut same_as_cpu = 0;
        for (i, p) in params.iter().enumerate() {
            let row = &logits[i * vocab..(i + 1) * vocab];
            let (want_tok, want_lp) = cpu::sample(row, p);
            let tok = tokens[i];
            assert!(
                tok >= 0 && (tok as usize) < vocab,
                "row {i}: token {tok} out of range"
            );
            let tok = tok as usize;
            assert!(
                (lps[i] - cpu::log_softmax_at(row, tok)).abs() < 1e-3,
                "row {i}: logprob {} vs {}",
                lps[i],
                cpu::log_softmax_at(row, tok)
            );
            if p.temperature < 1e-5 {
                assert_eq!(tok, want_tok, "greedy row {i} (vocab {vocab})");
                assert!((lps[i] - want_lp).abs() < 1e-3);
            } else {
                let allowed = cpu::allowed_tokens(row, p);
                assert!(
                    allowed[tok],
                    "row {i} {p:?}: token {tok} is outside the allowed set ({} allowed)",
                    allowed.iter().filter(|&&a| a).count()
                );
            }
            same_as_cpu += usize::from(tok == want_tok);
        }
        assert_eq!(tokens[tie_row], 17, "greedy ties go to the first index");
        // Gumbel-max with the same hash: the CPU reference picks the same token except at
        // float near-ties (CPU vs GPU logf), which random data essentially never produces.
        assert!(
            same_as_cpu + 1 >= b,
            "vocab {vocab}: only {same_as_cpu} of {b} rows match the CPU sampler"
        );
        // Same seed and offset: same tokens; another offset moves at least one random row.
        let (again, _) = run(&params);
        assert_eq!(
            again, tokens,
            "vocab {vocab}: same seeds gave different tokens"
        );
        let moved: Vec<cpu::SampleParams> = params
            .iter()
            .map(|p| cpu::SampleParams {
                offset: p.offset + 1,
                ..*p
            })
            .collect();
        let (other, _) = run(&moved);
        assert_ne!(
            other, tokens,
            "vocab {vocab}: a new offset changed no random draw"
        );
        eprintln!(
            "sampling vocab {vocab}: ok, {same_as_cpu}/{b} rows identical to the CPU sampler"
        );
    }
}

#[test]
fn gemv_small_batch_matches_reference() {
    let Some(g) = gpu("gemv_small_batch_matches_reference") else {
        return;
    };
    let mut r = rng("gemv");
    for e in Elem::BOTH {
        let (ty, module) = (e.name(), e.module("gemv"));
        let (atol, rtol) = e.tolerance();
        // (batch rows, out features, in features)
        for (case, &(m, n, k)) in [
            (1usize, 1000usize, 576usize),
            (3, 37, 4096),
            (8, 129, 1536),
            (2, 4096, 14336),
            (5, 300, 8),
            (1, 6144, 4096),
            (1, 77, 2056),
            (4, 5, 64),
        ]
        .iter()
        .enumerate()
        {
            let (x_h, x) = e.random(&mut r, m * k, 1.0);
            let (w_h, w) = e.random(&mut r, n * k, 0.05);
            let (d_x, d_w) = (g.upload(&x_h), g.upload(&w_h));
            let y = g.poisoned(m * n, e.nan());
            let bt = [1usize, 2, 4, 8]
                .into_iter()
                .find(|&b| b >= m)
                .expect("m <= 8");
            let (mi, ni, ki) = (m as i32, n as i32, k as i32);
            // Every split (warps per output row) on a rotating basis across the cases.
            let split = [1i32, 2, 4, 8][case % 4];
            let rows_per_block = 8 / split as usize;
            g.launch_args(
                &module,
                &e.kernel(&format!("gemv_bf16_b{bt}")),
                (n.div_ceil(rows_per_block) as u32, 1, 1),
                (256, 1, 1),
                args::Gemv {
                    y: y.ptr,
                    x: d_x.ptr,
                    w: d_w.ptr,
                    m: mi,
                    n: ni,
                    k: ki,
                    split,
                },
            );
            assert_close(
                &format!("{ty} gemv m{m} n{n} k{k} split {split}"),
                &g.download_as(e, &y),
                &cpu::linear(&x, &w, n, k),
                atol,
                rtol,
            );
        }
    }
}

#[test]
fn sampling_plain_path_matches_single_block_sampler() {
    let Some(g) = gpu("sampling_plain_path_matches_single_block_sampler") else {
        return;
    };
    let mut r = rng("sampling_plain");
    for &vocab in &[1000usize, 128_256] {
        let base = cpu::SampleParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 0,
            offset: 0,
        };
        let mut params = [
            base,
            cpu::SampleParams {
                temperature: 1.0,
                ..base
            },
            cpu::SampleParams {
                temperature: 0.7,
                ..base
            },
            cpu::SampleParams {
                temperature: 0.8,
                top_k: 1,
                ..base
            },
            cpu::SampleParams {
                temperature: 1.2,
                top_k: vocab as i32,
                ..base
            },
            base,
        ];
        for p in params.iter_mut() {
            p.seed = r.random();
            p.offset = r.random_range(0..1000);
        }
        let b = params.len();
        let mut logits: Vec<f32> = (0..b * vocab)
            .map(|_| r.random_range(-8.0f32..8.0))
            .collect();
        logits[(b - 1) * vocab + 5] = 30.0; // a tie for the maximum in the last (greedy) row
        logits[(b - 1) * vocab + vocab - 1] = 30.0;
        let d_logits = g.upload(&logits);
        let temps: Vec<f32> = params.iter().map(|p| p.temperature).collect();
        let ks: Vec<i32> = params.iter().map(|p| p.top_k).collect();
        let seeds: Vec<u64> = params.iter().map(|p| p.seed).collect();
        let offs: Vec<u64> = params.iter().map(|p| p.offset).collect();
        let (d_t, d_k, d_s, d_o) = (
            g.upload(&temps),
            g.upload(&ks),
            g.upload(&seeds),
            g.upload(&offs),
        );
        let v = vocab as i32;
        for nchunks in [1usize, 7, 128] {
            let partials = g.poisoned(b * nchunks * 5, -1i32);
            let tokens = g.poisoned(b, -1i32);
            let lps = g.poisoned(b, f32::NAN);
            let nc = nchunks as i32;
            g.launch_args(
                "sampling",
                "sample_plain_partial",
                (nchunks as u32, b as u32, 1),
                (256, 1, 1),
                args::SamplePlainPartial {
                    partials: partials.ptr,
                    logits: d_logits.ptr,
                    vocab: v,
                    nchunks: nc,
                    temperatures: d_t.ptr,
                    top_ks: d_k.ptr,
                    seeds: d_s.ptr,
                    offsets: d_o.ptr,
                },
            );
            g.launch_args(
                "sampling",
                "sample_plain_finish",
                (b as u32, 1, 1),
                (32, 1, 1),
                args::SamplePlainFinish {
                    out_tokens: tokens.ptr,
                    out_logprobs: lps.ptr,
                    partials: partials.ptr,
                    logits: d_logits.ptr,
                    vocab: v,
                    nchunks: nc,
                    temperatures: d_t.ptr,
                    top_ks: d_k.ptr,
                },
            );
            let (tokens, lps) = (g.download(&tokens), g.download(&lps));
            for (i, p) in params.iter().enumerate() {
                let row = &logits[i * vocab..(i + 1) * vocab];
                let (want, want_lp) = cpu::sample(row, p);
                assert_eq!(
                    tokens[i], want as i32,
                    "vocab {vocab} nchunks {nchunks} row {i} {p:?}"
                );
                assert!(
                    (lps[i] - want_lp).abs() < 1e-3,
                    "row {i}: logprob {} vs {want_lp}",
                    lps[i]
                );
            }
            assert_eq!(tokens[b - 1], 5, "greedy ties go to the first index");
        }
        eprintln!("sample_plain vocab {vocab}: ok");
    }
}

#[test]
fn gemv_with_fused_silu_matches_reference() {
    let Some(g) = gpu("gemv_with_fused_silu_matches_reference") else {
        return;
    };
    let mut r = rng("gemv_silu");
    for e in Elem::BOTH {
        let ty = e.name();
        let (atol, rtol) = e.tolerance();
        // (out features, intermediate size): the batch-1 MLP down projection; sizes that are not
        // multiples of the kernel's rows per block or of its unrolled chunk run.
        for &(n, inter) in &[(576usize, 1536usize), (4096, 14336), (37, 2056), (129, 8)] {
            let (gu_h, gu) = e.random(&mut r, 2 * inter, 2.0);
            let (w_h, w) = e.random(&mut r, n * inter, 0.05);
            let (d_gu, d_w) = (g.upload(&gu_h), g.upload(&w_h));
            let y = g.poisoned(n, e.nan());
            let (mi, ni, ki, split) = (1i32, n as i32, inter as i32, 4i32);
            g.launch_args(
                &e.module("gemv"),
                &e.kernel("gemv_silu_bf16_b1"),
                (n.div_ceil(2) as u32, 1, 1),
                (256, 1, 1),
                args::GemvSiluB1 {
                    y: y.ptr,
                    gate_up: d_gu.ptr,
                    w: d_w.ptr,
                    m: mi,
                    n: ni,
                    k: ki,
                    split,
                },
            );
            // The unfused path stores silu(gate) * up in the element type before the GEMV reads
            // it.
            let act: Vec<f32> = cpu::silu_and_mul(&gu, inter)
                .into_iter()
                .map(|v| e.round(v))
                .collect();
            assert_close(
                &format!("{ty} gemv_silu n{n} inter {inter}"),
                &g.download_as(e, &y),
                &cpu::linear(&act, &w, n, inter),
                atol,
                rtol,
            );
        }
    }
}

#[test]
fn gemv_bulk_matches_reference() {
    let Some(g) = gpu("gemv_bulk_matches_reference") else {
        return;
    };
    if g.compute_capability().0 < 9 {
        eprintln!("gemv_bulk needs sm_90 ({}): not run", g.name);
        return;
    }
    let mut r = rng("gemv_bulk");
    let eps = 1e-5f32;
    for e in Elem::BOTH {
        let (ty, module) = (e.name(), e.module("gemv_bulk"));
        let (atol, rtol) = e.tolerance();
        // (out features, in features, grid): many groups per block, one row per stage
        // (k = 14336), a partial last group (4099 rows), a tiny k.
        // Both built pipeline depths (4 and 6 stages); k = 16384 is the longest row a stage holds.
        for &(n, k, grid, stages) in &[
            (1000usize, 576usize, 132u32, 4usize),
            (6144, 4096, 132, 4),
            (37, 2056, 3, 4),
            (4096, 14336, 132, 4),
            (129, 8, 2, 4),
            (4099, 4096, 7, 4),
            (6144, 4096, 132, 6),
            (4096, 14336, 132, 6),
            (300, 16384, 5, 6),
            (4099, 4096, 7, 6),
        ] {
            // (kernel variant in the bf16 build, input: 0 plain / 1 silu / 2 norm, adds into y)
            for (variant, input, add) in [
                ("bf16", 0, false),
                ("silu_bf16", 1, false),
                ("norm_bf16", 2, false),
                ("add_bf16", 0, true),
                ("silu_add_bf16", 1, true),
            ] {
                let in_len = if input == 1 { 2 * k } else { k };
                let (x_h, x) = e.random(&mut r, in_len, if input == 1 { 2.0 } else { 1.0 });
                let (w_h, w) = e.random(&mut r, n * k, 0.05);
                let (nw_h, nw) = e.random(&mut r, k, 1.0);
                let (y0_h, y0) = e.random(&mut r, n, 1.0);
                let (d_x, d_w, d_nw) = (g.upload(&x_h), g.upload(&w_h), g.upload(&nw_h));
                // Poisoned unless the kernel adds into y.
                let y = if add {
                    g.upload(&y0_h)
                } else {
                    g.poisoned(n, e.nan())
                };
                let geometry = GemvBulk::for_k(k, stages).expect("a row fits one stage");
                let (rows, smem) = (geometry.rows_per_stage as i32, geometry.shared_bytes);
                let (ni, ki) = (n as i32, k as i32);
                let depth = if stages == 6 { "_s6" } else { "" };
                let kernel = e.kernel(&format!("gemv_bulk_{variant}{depth}_b1"));
                let groups = n.div_ceil(rows as usize) as u32;
                // The L2 evict-first streaming (same values) on the deeper pipeline.
                let evict_first = (stages == 6) as i32;
                g.launch_args_smem(
                    &module,
                    &kernel,
                    (grid.min(groups), 1, 1),
                    (256, 1, 1),
                    smem,
                    args::GemvBulk {
                        y: y.ptr,
                        x: d_x.ptr,
                        w: d_w.ptr,
                        n: ni,
                        k: ki,
                        rows_per_stage: rows,
                        norm_w: d_nw.ptr,
                        eps,
                        evict_first,
                    },
                );
                // The unfused paths store their input in the element type before the GEMV reads
                // it.
                let round =
                    |v: Vec<f32>| -> Vec<f32> { v.into_iter().map(|v| e.round(v)).collect() };
                let input_vec = match input {
                    1 => round(cpu::silu_and_mul(&x, k)),
                    2 => round(cpu::rms_norm(&x, &nw, eps)),
                    _ => x,
                };
                let mut want = cpu::linear(&input_vec, &w, n, k);
                if add {
                    for (o, y0) in want.iter_mut().zip(&y0) {
                        *o += y0;
                    }
                }
                assert_close(
                    &format!("{ty} {kernel} n{n} k{k} grid {grid}"),
                    &g.download_as(e, &y),
                    &want,
                    atol,
                    rtol,
                );
            }
        }
    }
}
