//! The kernels that fuse Gemma's extra per-layer ops (issue 18) against their CPU references
//! and against the unfused kernels they replace, bit for bit: `rms_norm_add` (a sandwich
//! norm and the residual add in one launch) and the GeGLU input of the batch-1 down
//! projection (`gemv_bulk_gelu*`, `gemv_gelu_b1`). Fresh random inputs (the seed is printed;
//! RVLLM_TEST_SEED replays one), outputs poisoned (NaN) first, bf16 and f16, Gemma-3's widths
//! (hidden 3840 and 5120, intermediate 15360) beside sizes off the kernels' fast paths.
//!
//! Without a CUDA device each test prints `SKIPPED: no CUDA device` and returns. Build with
//! `--features cuda` so that the kernels are embedded.
mod gpu_harness;

use gpu_harness::{assert_close, gpu, rng, Elem};
use rvllm_kernels::args;
use rvllm_kernels::reference as cpu;

/// `residual += round(rms_norm(x) * w)` on rows of `hidden`, the residual stored rounded.
fn rms_norm_add_reference(e: Elem, residual: &[f32], x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let hidden = w.len();
    let mut out = residual.to_vec();
    for (res, row) in out.chunks_mut(hidden).zip(x.chunks(hidden)) {
        let normed = cpu::rms_norm(row, w, eps);
        for (r, n) in res.iter_mut().zip(normed) {
            *r = e.round(*r + e.round(n));
        }
    }
    out
}

#[test]
fn rms_norm_add_matches_the_unfused_pair() {
    let Some(g) = gpu("rms_norm_add_matches_the_unfused_pair") else {
        return;
    };
    let mut r = rng("rms_norm_add");
    let eps = 1e-6f32;
    for e in Elem::BOTH {
        let (ty, module) = (e.name(), e.module("norm"));
        let (atol, rtol) = e.tolerance();
        // 3840 and 5120 (Gemma-3-12B / 27B hidden) and 576 on the 16-byte register path;
        // 1001 (not a multiple of 8) and 12288 (> 8 * 4 * 256) on the plain loop.
        for &(tokens, hidden) in &[
            (1usize, 3840usize),
            (1, 5120),
            (7, 3840),
            (2, 576),
            (3, 1001),
            (2, 12288),
        ] {
            let (x_h, x) = e.random(&mut r, tokens * hidden, 3.0);
            let (w_h, w) = e.random(&mut r, hidden, 2.0);
            let (res_h, res) = e.random(&mut r, tokens * hidden, 4.0);
            // One poisoned row past the tokens: the kernel must not touch it.
            let mut res_padded = res_h.clone();
            res_padded.extend(std::iter::repeat_n(e.nan(), hidden));
            let (d_x, d_w) = (g.upload(&x_h), g.upload(&w_h));
            let d_res = g.upload(&res_padded);
            let (n, h) = (tokens as i32, hidden as i32);
            g.launch_args(
                &module,
                &e.kernel("rms_norm_add_bf16"),
                (tokens as u32, 1, 1),
                (256, 1, 1),
                args::RmsNormAdd {
                    residual: d_res.ptr,
                    x: d_x.ptr,
                    weight: d_w.ptr,
                    eps,
                    num_tokens: n,
                    hidden: h,
                },
            );
            let what = format!("{ty} rms_norm_add t{tokens} h{hidden}");
            let fused: Vec<u16> = g.download(&d_res);
            assert!(
                fused[tokens * hidden..].iter().all(|&b| b == e.nan()),
                "{what}: wrote past its rows"
            );
            let got: Vec<f32> = fused[..tokens * hidden]
                .iter()
                .map(|&b| e.widen(b))
                .collect();
            let want = rms_norm_add_reference(e, &res, &x, &w, eps);
            assert_close(&what, &got, &want, atol, rtol);

            // The unfused pair the engine ran before: rms_norm into a poisoned buffer, then
            // add into the residual. Same bits.
            let normed = g.poisoned(tokens * hidden, e.nan());
            g.launch_args(
                &module,
                &e.kernel("rms_norm_bf16"),
                (tokens as u32, 1, 1),
                (256, 1, 1),
                args::RmsNorm {
                    out: normed.ptr,
                    x: d_x.ptr,
                    weight: d_w.ptr,
                    eps,
                    num_tokens: n,
                    hidden: h,
                },
            );
            let d_res2 = g.upload(&res_h);
            let count = (tokens * hidden) as i64;
            g.launch_args(
                &e.module("activation"),
                &e.kernel("add_bf16"),
                ((tokens * hidden).div_ceil(256).min(4096) as u32, 1, 1),
                (256, 1, 1),
                args::Add {
                    out: d_res2.ptr,
                    a: d_res2.ptr,
                    b: normed.ptr,
                    n: count,
                },
            );
            assert_eq!(
                fused[..tokens * hidden],
                g.download(&d_res2)[..],
                "{what}: the fused kernel's bits differ from rms_norm + add"
            );
        }
    }
}

/// The GeGLU input of the down projection as the unfused path stores it: gelu_tanh(gate) * up
/// rounded to the element type.
fn geglu_rounded(e: Elem, gate_up: &[f32], inter: usize) -> Vec<f32> {
    cpu::gelu_tanh_and_mul(gate_up, inter)
        .into_iter()
        .map(|v| e.round(v))
        .collect()
}

/// The unfused activation on the GPU: gelu_tanh_and_mul of one gate|up row into a poisoned
/// buffer, as the engine ran it before the down projection.
fn gpu_geglu(g: &gpu_harness::Gpu, e: Elem, d_gu: u64, inter: usize) -> gpu_harness::Buf<u16> {
    let act = g.poisoned(inter, e.nan());
    g.launch_args(
        &e.module("activation"),
        &e.kernel("gelu_tanh_and_mul_bf16"),
        (inter.div_ceil(2048) as u32, 1, 1),
        (256, 1, 1),
        args::GeluTanhAndMul {
            out: act.ptr,
            r#in: d_gu,
            num_tokens: 1,
            inter: inter as i32,
        },
    );
    act
}

/// gemv_bulk's GeGLU variants (Gemma's batch-1 down projection, with and without the residual
/// add) against the reference, and bit for bit against gelu_tanh_and_mul then the plain (or
/// add) variant on the stored product.
#[test]
fn gemv_bulk_gelu_matches_the_unfused_pair() {
    let Some(g) = gpu("gemv_bulk_gelu_matches_the_unfused_pair") else {
        return;
    };
    if g.compute_capability().0 < 9 {
        eprintln!("gemv_bulk needs sm_90 ({}): not run", g.name);
        return;
    }
    let mut r = rng("gemv_bulk_gelu");
    for e in Elem::BOTH {
        let (ty, module) = (e.name(), e.module("gemv_bulk"));
        let (atol, rtol) = e.tolerance();
        // (out features, intermediate, grid): Gemma-3-12B's down projection (one 30 KiB row a
        // stage), 4B's, a partial last group on a small grid, a tiny k.
        for &(n, inter, grid) in &[
            (3840usize, 15360usize, 132u32),
            (2560, 10240, 132),
            (1000, 576, 132),
            (37, 2056, 3),
            (129, 8, 2),
        ] {
            let geometry =
                rvllm_kernels::gemv_bulk::GemvBulk::for_k(inter, 4).expect("a row fits one stage");
            let (rows, smem) = (geometry.rows_per_stage as i32, geometry.shared_bytes);
            let groups = n.div_ceil(rows as usize) as u32;
            let (gu_h, gu) = e.random(&mut r, 2 * inter, 4.0);
            let (w_h, w) = e.random(&mut r, n * inter, 0.05);
            let (y0_h, y0) = e.random(&mut r, n, 1.0);
            let (d_gu, d_w) = (g.upload(&gu_h), g.upload(&w_h));
            let act = gpu_geglu(&g, e, d_gu.ptr, inter);
            let product = cpu::linear(&geglu_rounded(e, &gu, inter), &w, n, inter);
            for add in [false, true] {
                let launch = |variant: &str, x: u64, y: u64| {
                    g.launch_args_smem(
                        &module,
                        &e.kernel(&format!("gemv_bulk_{variant}_b1")),
                        (grid.min(groups), 1, 1),
                        (256, 1, 1),
                        smem,
                        args::GemvBulk {
                            y,
                            x,
                            w: d_w.ptr,
                            n: n as i32,
                            k: inter as i32,
                            rows_per_stage: rows,
                            norm_w: 0,
                            eps: 0.0,
                            evict_first: 1,
                        },
                    )
                };
                let (fused_variant, plain_variant) = if add {
                    ("gelu_add_bf16", "add_bf16")
                } else {
                    ("gelu_bf16", "bf16")
                };
                // Poisoned unless the kernel adds into y.
                let fresh_y = || {
                    if add {
                        g.upload(&y0_h)
                    } else {
                        g.poisoned(n, e.nan())
                    }
                };
                let y = fresh_y();
                launch(fused_variant, d_gu.ptr, y.ptr);
                let mut want = product.clone();
                if add {
                    for (o, y0) in want.iter_mut().zip(&y0) {
                        *o += y0;
                    }
                }
                let what = format!("{ty} gemv_bulk_{fused_variant} n{n} k{inter} grid {grid}");
                let fused: Vec<u16> = g.download(&y);
                let got: Vec<f32> = fused.iter().map(|&b| e.widen(b)).collect();
                assert_close(&what, &got, &want, atol, rtol);
                let y_unfused = fresh_y();
                launch(plain_variant, act.ptr, y_unfused.ptr);
                assert_eq!(
                    fused,
                    g.download(&y_unfused),
                    "{what}: bits differ from gelu_tanh_and_mul + gemv_bulk_{plain_variant}"
                );
            }
        }
    }
}

/// gemv.cu's GeGLU down projection (GPUs before sm_90, rows past a bulk stage such as
/// Gemma-3-27B's 21,504) against the reference, and bit for bit against gelu_tanh_and_mul then
/// the plain batch-1 GEMV.
#[test]
fn gemv_gelu_matches_the_unfused_pair() {
    let Some(g) = gpu("gemv_gelu_matches_the_unfused_pair") else {
        return;
    };
    let mut r = rng("gemv_gelu");
    for e in Elem::BOTH {
        let (ty, module) = (e.name(), e.module("gemv"));
        let (atol, rtol) = e.tolerance();
        for &(n, inter) in &[(5376usize, 21504usize), (3840, 15360), (37, 2056), (129, 8)] {
            let (gu_h, gu) = e.random(&mut r, 2 * inter, 4.0);
            let (w_h, w) = e.random(&mut r, n * inter, 0.05);
            let (d_gu, d_w) = (g.upload(&gu_h), g.upload(&w_h));
            // 4 warps a row, 2 rows a block: the engine's GEMV_SPLIT.
            let (grid, split) = ((n.div_ceil(2) as u32, 1, 1), 4i32);
            let y = g.poisoned(n, e.nan());
            g.launch_args(
                &module,
                &e.kernel("gemv_gelu_bf16_b1"),
                grid,
                (256, 1, 1),
                args::GemvGeluB1 {
                    y: y.ptr,
                    gate_up: d_gu.ptr,
                    w: d_w.ptr,
                    m: 1,
                    n: n as i32,
                    k: inter as i32,
                    split,
                },
            );
            let what = format!("{ty} gemv_gelu n{n} inter {inter}");
            let fused: Vec<u16> = g.download(&y);
            let got: Vec<f32> = fused.iter().map(|&b| e.widen(b)).collect();
            let want = cpu::linear(&geglu_rounded(e, &gu, inter), &w, n, inter);
            assert_close(&what, &got, &want, atol, rtol);

            let act = gpu_geglu(&g, e, d_gu.ptr, inter);
            let y_unfused = g.poisoned(n, e.nan());
            g.launch_args(
                &module,
                &e.kernel("gemv_bf16_b1"),
                grid,
                (256, 1, 1),
                args::Gemv {
                    y: y_unfused.ptr,
                    x: act.ptr,
                    w: d_w.ptr,
                    m: 1,
                    n: n as i32,
                    k: inter as i32,
                    split,
                },
            );
            assert_eq!(
                fused,
                g.download(&y_unfused),
                "{what}: bits differ from gelu_tanh_and_mul + gemv_b1"
            );
        }
    }
}
