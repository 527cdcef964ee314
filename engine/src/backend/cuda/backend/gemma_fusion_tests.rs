//! The backend's fused Gemma ops on the GPU against the kernels' CPU references (issue 18):
//! `gated_linear` and `gated_linear_add` with either activation through each path the backend
//! picks (gemv_bulk at batch 1 on sm_90+, gemv.cu's fused GEMV for rows past a bulk stage,
//! the unfused activation where k is not a multiple of 8 and for several tokens), and
//! `rms_norm_add` against the reference and bit for bit against `rms_norm` + `add_inplace`.
//! Both element types; outputs poisoned first. Prints SKIPPED without a GPU.
use std::sync::Arc;

use super::super::elem::{bits_of, value_of, GpuDtype};
use super::super::{device_count, Gpu};
use super::{CudaBackend, CudaTensor, StepLimits};
use crate::backend::{Backend, MlpActivation};
use crate::types::{HostData, HostTensor};
use rvllm_kernels::reference as cpu;

/// Deterministic values in [-scale, scale) (xorshift).
fn fill(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn backends(test: &str) -> Option<Vec<(GpuDtype, CudaBackend)>> {
    if !matches!(device_count(), Ok(n) if n > 0) {
        eprintln!("SKIPPED: no CUDA device ({test})");
        return None;
    }
    let gpu = Arc::new(Gpu::new(0).expect("a CUDA context"));
    let limits = StepLimits {
        max_tokens: 64,
        max_seqs: 8,
        max_blocks_per_seq: 1,
    };
    Some(
        [GpuDtype::Bf16, GpuDtype::F16]
            .into_iter()
            .map(|d| {
                (
                    d,
                    CudaBackend::new(gpu.clone(), limits, 1, 1, 64, d).unwrap(),
                )
            })
            .collect(),
    )
}

fn round(dtype: GpuDtype, v: Vec<f32>) -> Vec<f32> {
    v.into_iter()
        .map(|x| value_of(bits_of(x, dtype), dtype))
        .collect()
}

fn host(be: &CudaBackend, t: &CudaTensor) -> Vec<f32> {
    let mut v = Vec::new();
    be.to_host(t, &mut v).unwrap();
    v
}

/// |got - want| within a share of the largest |want| (bf16 2 %, f16 1 %).
fn check(dtype: GpuDtype, what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}");
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-3);
    let tol = scale
        * match dtype {
            GpuDtype::Bf16 => 2e-2,
            GpuDtype::F16 => 1e-2,
        };
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!(
            (a - b).abs() <= tol,
            "{what}: element {i}: GPU {a}, reference {b} (tolerance {tol})"
        );
    }
}

#[test]
fn gated_linears_match_the_reference_for_both_activations() {
    let Some(all) = backends("gated_linears_match_the_reference_for_both_activations") else {
        return;
    };
    for (dtype, be) in &all {
        let dtype = *dtype;
        // (tokens, out, intermediate): Gemma-3-12B's intermediate through gemv_bulk (one row a
        // stage), a row past a stage (gemv.cu's fused GEMV), k not a multiple of 8 (unfused),
        // several tokens (unfused, then cuBLAS).
        for (seed, &(m, n, k)) in [
            (1usize, 256usize, 15360usize),
            (1, 96, 16392),
            (1, 64, 60),
            (3, 100, 576),
        ]
        .iter()
        .enumerate()
        {
            let seed = 100 * seed as u64;
            let wv = round(dtype, fill(n * k, seed + 1, 0.05));
            let w = be
                .upload_weight(
                    "model.layers.0.mlp.down_proj.weight",
                    HostTensor {
                        shape: vec![n, k],
                        data: HostData::F32(wv.clone()),
                    },
                )
                .unwrap();
            let gate_up_v = round(dtype, fill(m * 2 * k, seed + 2, 4.0));
            let gate_up = be.activation_from_host(m, 2 * k, &gate_up_v).unwrap();
            let res_v = round(dtype, fill(m * n, seed + 3, 1.0));
            let poisoned = |rows: usize, cols: usize| {
                be.activation_from_host(rows, cols, &vec![f32::NAN; rows * cols])
                    .unwrap()
            };
            for activation in [MlpActivation::Silu, MlpActivation::GeluTanh] {
                let what = format!("{dtype:?} {activation:?} {m}x{n}x{k}");
                // The product is rounded to the element type before the projection, as the
                // unfused activation kernels store it.
                let act_host = round(
                    dtype,
                    match activation {
                        MlpActivation::Silu => cpu::silu_and_mul(&gate_up_v, k),
                        MlpActivation::GeluTanh => cpu::gelu_tanh_and_mul(&gate_up_v, k),
                    },
                );
                let mut want = Vec::with_capacity(m * n);
                for row in act_host.chunks(k) {
                    want.extend(cpu::linear(row, &wv, n, k));
                }

                let (mut act, mut out) = (poisoned(m, k), poisoned(m, n));
                be.gated_linear(activation, &gate_up, &w, &mut act, &mut out)
                    .unwrap();
                check(
                    dtype,
                    &format!("{what} gated_linear"),
                    &host(be, &out),
                    &want,
                );

                let mut residual = be.activation_from_host(m, n, &res_v).unwrap();
                let (mut act, mut scratch) = (poisoned(m, k), poisoned(m, n));
                be.gated_linear_add(
                    activation,
                    &gate_up,
                    &w,
                    &mut act,
                    &mut residual,
                    &mut scratch,
                )
                .unwrap();
                let want_add: Vec<f32> = want.iter().zip(&res_v).map(|(a, b)| a + b).collect();
                check(
                    dtype,
                    &format!("{what} gated_linear_add"),
                    &host(be, &residual),
                    &want_add,
                );
            }
        }
    }
}

#[test]
fn rms_norm_add_matches_rms_norm_then_add() {
    let Some(all) = backends("rms_norm_add_matches_rms_norm_then_add") else {
        return;
    };
    let eps = 1e-6f32;
    for (dtype, be) in &all {
        let dtype = *dtype;
        for (seed, &(m, h)) in [(1usize, 3840usize), (3, 5120), (2, 1001)]
            .iter()
            .enumerate()
        {
            let seed = 100 * seed as u64 + 7;
            let what = format!("{dtype:?} rms_norm_add {m}x{h}");
            let xv = round(dtype, fill(m * h, seed + 1, 3.0));
            let wv = round(dtype, fill(h, seed + 2, 2.0));
            let res_v = round(dtype, fill(m * h, seed + 3, 4.0));
            let x = be.activation_from_host(m, h, &xv).unwrap();
            let w = be
                .upload_vector(
                    "model.layers.0.post_attention_layernorm.weight",
                    HostTensor {
                        shape: vec![h],
                        data: HostData::F32(wv.clone()),
                    },
                )
                .unwrap();
            let mut residual = be.activation_from_host(m, h, &res_v).unwrap();
            let mut scratch = be
                .activation_from_host(m, h, &vec![f32::NAN; m * h])
                .unwrap();
            be.rms_norm_add(&x, &w, eps, &mut scratch, &mut residual)
                .unwrap();
            let fused = host(be, &residual);
            let mut want = Vec::with_capacity(m * h);
            for (row, res) in xv.chunks(h).zip(res_v.chunks(h)) {
                let normed = round(dtype, cpu::rms_norm(row, &wv, eps));
                want.extend(round(
                    dtype,
                    normed.iter().zip(res).map(|(n, r)| n + r).collect(),
                ));
            }
            check(dtype, &what, &fused, &want);

            let mut residual = be.activation_from_host(m, h, &res_v).unwrap();
            let mut normed = be
                .activation_from_host(m, h, &vec![f32::NAN; m * h])
                .unwrap();
            be.rms_norm(&x, &w, eps, &mut normed).unwrap();
            be.add_inplace(&mut residual, &normed).unwrap();
            let unfused = host(be, &residual);
            let differ = fused
                .iter()
                .zip(&unfused)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            assert_eq!(
                differ, 0,
                "{what}: {differ} elements differ from rms_norm + add_inplace"
            );
        }
    }
}
