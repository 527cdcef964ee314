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
