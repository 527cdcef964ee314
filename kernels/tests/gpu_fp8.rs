//! The FP8 activation quantization kernels (`fp8_quant.cu`) against a CPU reference of
//! vLLM's `scaled_fp8_quant` (dynamic per-token and per-tensor scales, E4M3 codes rounded to
//! nearest even with saturation), in both input types, on random inputs with the outputs
//! poisoned first. Codes and scales must match bit for bit.
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

#[test]
fn the_reference_codec_round_trips_every_code() {
    // Guards the restated codec itself (no GPU needed): every finite code's value, built
    // from its fields, encodes back to the code.
    for code in 0..=255u8 {
        let exp = ((code >> 3) & 0xf) as i32;
        let mant = (code & 7) as f32;
        if exp == 15 && code & 7 == 7 {
            continue;
        }
        let mag = if exp == 0 {
            mant / 8.0 * 2f32.powi(-6)
        } else {
            (1.0 + mant / 8.0) * 2f32.powi(exp - 7)
        };
        let v = if code & 0x80 != 0 { -mag } else { mag };
        assert_eq!(f32_to_e4m3(v), code, "code {code:#x} = {v}");
    }
    assert_eq!(f32_to_e4m3(1e6), 0x7e);
}
