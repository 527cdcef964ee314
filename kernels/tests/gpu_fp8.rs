//! The FP8 activation quantization kernels (`fp8_quant.cu`) against a CPU reference of
//! vLLM's `scaled_fp8_quant` (dynamic per-token and per-tensor scales, E4M3 codes rounded to
//! nearest even with saturation), in both input types, on random inputs with the outputs
//! poisoned first. Codes and scales must match bit for bit. And the FP8 GEMM through
//! cuBLASLt (E4M3 x E4M3, per-tensor scale pointers, bf16 out) against the f32 reference.
//!
//! The reference codec is the engine's (`rvllm::backend::cpu::fp8`, checked there against
//! torch's table), restated here because this crate sits below the engine.
//!
//! Without a CUDA device each test prints `SKIPPED: no CUDA device` and returns.
mod gpu_harness;

use gpu_harness::{gpu, rng, Elem};
use rand::Rng;
use rvllm_kernels::args;

const E4M3_MAX: f32 = 448.0;
const MIN_SCALE: f32 = 1.0 / (E4M3_MAX * 512.0);

/// Nearest E4M3 code, ties to even, saturating at ±448; NaN stays NaN.
fn f32_to_e4m3(x: f32) -> u8 {
    let sign = ((x.to_bits() >> 24) & 0x80) as u8;
    if x.is_nan() {
        return sign | 0x7f;
    }
    let a = x.abs().min(E4M3_MAX);
    if a < 1.0 / 64.0 {
        return sign | (a * 512.0).round_ties_even() as u8;
    }
    let bits = a.to_bits();
    let mut exp = ((bits >> 23) & 0xff) as i32 - 127 + 7;
    let mant = bits & 0x7f_ffff;
    let mut m = mant >> 20;
    let rest = mant & 0xf_ffff;
    if rest > 1 << 19 || (rest == 1 << 19 && m & 1 == 1) {
        m += 1;
    }
    if m == 8 {
        m = 0;
        exp += 1;
    }
    sign | ((exp as u8) << 3) | m as u8
}

fn scale_of(x: &[f32]) -> f32 {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    (amax / E4M3_MAX).max(MIN_SCALE)
}

fn quantize(x: &[f32], scale: f32) -> Vec<u8> {
    let inv = 1.0 / scale;
    x.iter().map(|&v| f32_to_e4m3(v * inv)).collect()
}

/// Inputs whose rows span magnitudes (so scales differ row to row), with an all-zero row
/// (the floor scale) when there are several rows.
fn inputs(e: Elem, r: &mut rand::rngs::StdRng, rows: usize, cols: usize) -> (Vec<u16>, Vec<f32>) {
    let mut bits = Vec::with_capacity(rows * cols);
    for row in 0..rows {
        let amp = if rows > 1 && row == rows / 2 {
            0.0
        } else {
            10f32.powf(r.random_range(-3.0..3.0))
        };
        let (b, _) = e.random(r, cols, amp.max(f32::MIN_POSITIVE));
        bits.extend(b.into_iter().map(|v| if amp == 0.0 { 0 } else { v }));
    }
    let vals = bits.iter().map(|&b| e.widen(b)).collect();
    (bits, vals)
}

fn first_mismatch<T: PartialEq + std::fmt::Debug>(got: &[T], want: &[T]) -> Option<String> {
    let i = got.iter().zip(want).position(|(a, b)| a != b)?;
    Some(format!("index {i}: got {:?}, want {:?}", got[i], want[i]))
}

#[test]
fn per_token_quantization_matches_the_reference() {
    let Some(g) = gpu("per_token_quantization_matches_the_reference") else {
        return;
    };
    let mut r = rng("fp8_per_token");
    for e in Elem::BOTH {
        // Columns below, at and past the block's 256 threads, and not multiples of 8.
        for &(rows, cols) in &[(1usize, 64usize), (7, 4096), (33, 1000), (5, 14336)] {
            let (bits, vals) = inputs(e, &mut r, rows, cols);
            let d_in = g.upload(&bits);
            let out = g.poisoned(rows * cols, 0x7fu8);
            let scales = g.poisoned(rows, f32::NAN);
            g.launch_args(
                &e.module("fp8_quant"),
                &e.kernel("fp8_quant_per_token_bf16"),
                (rows as u32, 1, 1),
                (256, 1, 1),
                args::Fp8QuantPerToken {
                    out: out.ptr,
                    scales: scales.ptr,
                    r#in: d_in.ptr,
                    rows: rows as i32,
                    cols: cols as i32,
                },
            );
            let want_scales: Vec<f32> = vals.chunks(cols).map(scale_of).collect();
            let want: Vec<u8> = vals
                .chunks(cols)
                .zip(&want_scales)
                .flat_map(|(row, &s)| quantize(row, s))
                .collect();
            let what = format!("{} per-token {rows}x{cols}", e.name());
            let got_scales: Vec<u32> = g.download(&scales).iter().map(|s| s.to_bits()).collect();
            let want_bits: Vec<u32> = want_scales.iter().map(|s| s.to_bits()).collect();
            if let Some(m) = first_mismatch(&got_scales, &want_bits) {
                panic!("{what}: scale bits differ at {m}");
            }
            if let Some(m) = first_mismatch(&g.download(&out), &want) {
                panic!("{what}: codes differ at {m}");
            }
        }
    }
}

#[test]
fn per_tensor_quantization_matches_the_reference() {
    let Some(g) = gpu("per_tensor_quantization_matches_the_reference") else {
        return;
    };
    let mut r = rng("fp8_per_tensor");
    for e in Elem::BOTH {
        // Sizes below one block, across many blocks and past the grid (grid-stride loops).
        for &(n, blocks) in &[(100usize, 1u32), (65_537, 64), (1 << 20, 132)] {
            let (bits, vals) = inputs(e, &mut r, 1, n);
            let d_in = g.upload(&bits);
            let amax = g.upload(&[0.0f32]);
            let n64 = n as i64;
            g.launch_args(
                &e.module("fp8_quant"),
                &e.kernel("fp8_absmax_bf16"),
                (blocks, 1, 1),
                (256, 1, 1),
                args::Fp8Absmax {
                    amax: amax.ptr,
                    r#in: d_in.ptr,
                    n: n64,
                },
            );
            let out = g.poisoned(n, 0x7fu8);
            let scale = g.poisoned(1, f32::NAN);
            g.launch_args(
                &e.module("fp8_quant"),
                &e.kernel("fp8_quant_per_tensor_bf16"),
                (blocks, 1, 1),
                (256, 1, 1),
                args::Fp8QuantPerTensor {
                    out: out.ptr,
                    scale: scale.ptr,
                    amax: amax.ptr,
                    r#in: d_in.ptr,
                    n: n64,
                },
            );
            let want_scale = scale_of(&vals);
            let what = format!("{} per-tensor n {n}", e.name());
            let got_scale = g.download(&scale)[0];
            assert_eq!(
                got_scale.to_bits(),
                want_scale.to_bits(),
                "{what}: scale {got_scale} vs {want_scale}"
            );
            if let Some(m) = first_mismatch(&g.download(&out), &quantize(&vals, want_scale)) {
                panic!("{what}: codes differ at {m}");
            }
        }
    }
}

fn e4m3_to_f32(code: u8) -> f32 {
    let exp = ((code >> 3) & 0xf) as i32;
    let mant = (code & 7) as f32;
    if exp == 15 && code & 7 == 7 {
        return f32::NAN;
    }
    let mag = if exp == 0 {
        mant / 8.0 * 2f32.powi(-6)
    } else {
        (1.0 + mant / 8.0) * 2f32.powi(exp - 7)
    };
    if code & 0x80 != 0 {
        -mag
    } else {
        mag
    }
}

/// The FP8 GEMM the engine will run for prefill and large batches: `y[m, n] = sx * sw *
/// sum_k x[m, k] w[n, k]`, E4M3 x E4M3 with f32 accumulation and per-tensor scales read from
/// device pointers (cuBLASLt's A/B scale pointers), bf16 out, row-major throughout. In
/// cuBLASLt's column-major terms that is `Y^T = op_T(W) * X^T`: the "TN" layout FP8 GEMMs
/// require. Checked against the f32 reference at bf16 tolerance.
#[test]
fn fp8_gemm_through_cublaslt_matches_the_reference() {
    use cudarc::cublaslt::{result as lt, sys as ltsys};
    use std::ffi::c_void;
    let Some(g) = gpu("fp8_gemm_through_cublaslt_matches_the_reference") else {
        return;
    };
    if g.compute_capability() < (8, 9) {
        println!("SKIPPED: FP8 GEMMs need compute capability 8.9 or newer");
        return;
    }
    let mut r = rng("fp8_gemm");
    // (m, n, k): a decode-sized batch, a prefill chunk, and n not a multiple of 128; k a
    // multiple of 16, as cuBLASLt's FP8 kernels require.
    for &(m, n, k) in &[
        (16usize, 4096usize, 4096usize),
        (300, 1000, 512),
        (128, 14336, 4096),
    ] {
        let xv: Vec<f32> = (0..m * k).map(|_| r.random_range(-2.0..2.0)).collect();
        let wv: Vec<f32> = (0..n * k).map(|_| r.random_range(-0.05..0.05)).collect();
        let (sx, sw) = (scale_of(&xv), scale_of(&wv));
        let (xq, wq) = (quantize(&xv, sx), quantize(&wv, sw));
        let d_x = g.upload(&xq);
        let d_w = g.upload(&wq);
        let (d_sx, d_sw) = (g.upload(&[sx]), g.upload(&[sw]));
        let d_y = g.poisoned(m * n, Elem::Bf16.nan());
        let workspace_bytes = 32usize << 20;
        let d_ws = g.poisoned(workspace_bytes, 0u8);
        unsafe {
            let handle = lt::create_handle().expect("cublasLtCreate");
            let desc = lt::create_matmul_desc(
                ltsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                ltsys::cudaDataType::CUDA_R_32F,
            )
            .expect("matmul desc");
            let set = |attr, v: *const c_void, size| {
                lt::set_matmul_desc_attribute(desc, attr, v, size).expect("matmul desc attribute")
            };
            use ltsys::cublasLtMatmulDescAttributes_t as A;
            // cublasOperation_t: CUBLAS_OP_N = 0, CUBLAS_OP_T = 1.
            let (op_t, op_n) = (1i32, 0i32);
            set(A::CUBLASLT_MATMUL_DESC_TRANSA, &op_t as *const i32 as _, 4);
            set(A::CUBLASLT_MATMUL_DESC_TRANSB, &op_n as *const i32 as _, 4);
            let (psw, psx) = (d_sw.ptr, d_sx.ptr);
            set(
                A::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER,
                &psw as *const u64 as _,
                8,
            );
            set(
                A::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER,
                &psx as *const u64 as _,
                8,
            );
            let e4m3 = ltsys::cudaDataType::CUDA_R_8F_E4M3;
            let bf16 = ltsys::cudaDataType::CUDA_R_16BF;
            let a = lt::create_matrix_layout(e4m3, k as u64, n as u64, k as i64).unwrap();
            let b = lt::create_matrix_layout(e4m3, k as u64, m as u64, k as i64).unwrap();
            let c = lt::create_matrix_layout(bf16, n as u64, m as u64, n as i64).unwrap();
            let pref = lt::create_matmul_pref().unwrap();
            lt::set_matmul_pref_attribute(
                pref,
                ltsys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &workspace_bytes as *const usize as _,
                std::mem::size_of::<usize>(),
            )
            .unwrap();
            let heuristic = lt::get_matmul_algo_heuristic(handle, desc, a, b, c, c, pref)
                .expect("no cuBLASLt algorithm for this FP8 GEMM");
            let (alpha, beta) = (1.0f32, 0.0f32);
            lt::matmul(
                handle,
                desc,
                &alpha as *const f32 as _,
                &beta as *const f32 as _,
                d_w.ptr as *const c_void,
                a,
                d_x.ptr as *const c_void,
                b,
                d_y.ptr as *const c_void,
                c,
                d_y.ptr as *mut c_void,
                c,
                &heuristic.algo,
                d_ws.ptr as *mut c_void,
                workspace_bytes,
                std::ptr::null_mut(),
            )
            .expect("cublasLtMatmul");
            g.sync();
            lt::destroy_matmul_pref(pref).unwrap();
            for l in [a, b, c] {
                lt::destroy_matrix_layout(l).unwrap();
            }
            lt::destroy_matmul_desc(desc).unwrap();
            lt::destroy_handle(handle).unwrap();
        }
        let (xd, wd): (Vec<f32>, Vec<f32>) = (
            xq.iter().map(|&q| e4m3_to_f32(q)).collect(),
            wq.iter().map(|&q| e4m3_to_f32(q)).collect(),
        );
        let mut want = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let dot: f32 = xd[i * k..(i + 1) * k]
                    .iter()
                    .zip(&wd[j * k..(j + 1) * k])
                    .map(|(a, b)| a * b)
                    .sum();
                want[i * n + j] = dot * sx * sw;
            }
        }
        let got = g.download_as(Elem::Bf16, &d_y);
        let (atol, rtol) = Elem::Bf16.tolerance();
        gpu_harness::assert_close(&format!("fp8 gemm {m}x{n}x{k}"), &got, &want, atol, rtol);
    }
}

#[test]
fn the_reference_codec_round_trips_every_code() {
    // Guards the restated codec itself (no GPU needed): every finite code's value, built
    // from its fields, encodes back to the code.
    for code in 0..=255u8 {
        let v = e4m3_to_f32(code);
        if v.is_nan() {
            continue;
        }
        assert_eq!(f32_to_e4m3(v), code, "code {code:#x} = {v}");
    }
    assert_eq!(f32_to_e4m3(1e6), 0x7e);
}
