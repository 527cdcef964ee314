//! The FP8 activation quantization kernels (`fp8_quant.cu`) against a CPU reference of
//! vLLM's `scaled_fp8_quant` (dynamic per-token and per-tensor scales, E4M3 codes rounded to
//! nearest even with saturation), in both input types, on random inputs with the outputs
//! poisoned first. Codes and scales must match bit for bit. And the FP8 GEMM through
//! cuBLASLt (E4M3 x E4M3, per-tensor scale pointers, bf16 out), `fp8_scaled_mm`, the scaled
//! epilogue against the f32 reference, and the small-batch weight-only `fp8_gemv` / `_silu` /
//! `_norm` (every scale kind) against `weight_only_mm`.
//!
//! The reference codec is `rvllm_kernels::reference_fp8`, the one the engine's FP8 paths use
//! (`rvllm::backend::cpu::fp8` re-exports it).
//!
//! Without a CUDA device each test prints `SKIPPED: no CUDA device` and returns.
mod gpu_harness;

use gpu_harness::{gpu, rng, Elem};
use rand::Rng;
use rvllm_kernels::args;
use rvllm_kernels::gemv_bulk::GemvBulk;
use rvllm_kernels::reference_fp8::{
    dynamic_scale, e4m3_to_f32, f32_to_e4m3, quantize_per_token, quantize_with_scale, scaled_mm,
    weight_only_mm, WeightScales,
};

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
            let want_scales: Vec<f32> = vals.chunks(cols).map(dynamic_scale).collect();
            let want: Vec<u8> = vals
                .chunks(cols)
                .zip(&want_scales)
                .flat_map(|(row, &s)| quantize_with_scale(row, s))
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
            let want_scale = dynamic_scale(&vals);
            let what = format!("{} per-tensor n {n}", e.name());
            let got_scale = g.download(&scale)[0];
            assert_eq!(
                got_scale.to_bits(),
                want_scale.to_bits(),
                "{what}: scale {got_scale} vs {want_scale}"
            );
            if let Some(m) =
                first_mismatch(&g.download(&out), &quantize_with_scale(&vals, want_scale))
            {
                panic!("{what}: codes differ at {m}");
            }
        }
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
        let (sx, sw) = (dynamic_scale(&xv), dynamic_scale(&wv));
        let (xq, wq) = (quantize_with_scale(&xv, sx), quantize_with_scale(&wv, sw));
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

/// Per-token codes and scales of `rows` random rows (magnitudes differ row to row).
fn per_token_inputs(r: &mut rand::rngs::StdRng, rows: usize, k: usize) -> (Vec<u8>, Vec<f32>) {
    let x: Vec<f32> = (0..rows)
        .flat_map(|_| {
            let amp = 10f32.powf(r.random_range(-2.0..1.0));
            (0..k)
                .map(|_| r.random_range(-amp..amp))
                .collect::<Vec<_>>()
        })
        .collect();
    quantize_per_token(&x, k)
}

/// `fp8_scaled_mm` (the FP8 GEMM for shapes cuBLASLt does not take) against the reference's
/// `scaled_mm`, with and without accumulation into the output, k a multiple of 16 (the
/// 16-byte path) and not (the scalar path), n not a multiple of the block's 8 warps.
#[test]
fn fp8_scaled_mm_matches_the_reference() {
    let Some(g) = gpu("fp8_scaled_mm_matches_the_reference") else {
        return;
    };
    let mut r = rng("fp8_scaled_mm");
    for e in Elem::BOTH {
        for &(m, n, k) in &[(1usize, 100usize, 64usize), (5, 37, 40), (17, 256, 576)] {
            let (xq, sx) = per_token_inputs(&mut r, m, k);
            let (wq, sw) = per_token_inputs(&mut r, n, k);
            let want_mm = scaled_mm(&xq, &sx, &wq, &sw, k);
            for accumulate in [false, true] {
                let (y0_bits, y0) = e.random(&mut r, m * n, 1.0);
                let d_y = if accumulate {
                    g.upload(&y0_bits)
                } else {
                    g.poisoned(m * n, e.nan())
                };
                let (d_xq, d_sx, d_wq, d_sw) =
                    (g.upload(&xq), g.upload(&sx), g.upload(&wq), g.upload(&sw));
                g.launch_args(
                    &e.module("fp8_quant"),
                    &e.kernel("fp8_scaled_mm_bf16"),
                    (n.div_ceil(8) as u32, m as u32, 1),
                    (256, 1, 1),
                    args::Fp8ScaledMm {
                        y: d_y.ptr,
                        xq: d_xq.ptr,
                        x_scales: d_sx.ptr,
                        wq: d_wq.ptr,
                        w_scales: d_sw.ptr,
                        m: m as i32,
                        n: n as i32,
                        k: k as i32,
                        accumulate: accumulate as i32,
                    },
                );
                let want: Vec<f32> = if accumulate {
                    want_mm.iter().zip(&y0).map(|(a, b)| a + b).collect()
                } else {
                    want_mm.clone()
                };
                let got = g.download_as(e, &d_y);
                let (atol, rtol) = e.tolerance();
                let what = format!(
                    "{} fp8_scaled_mm {m}x{n}x{k} accumulate {accumulate}",
                    e.name()
                );
                gpu_harness::assert_close(&what, &got, &want, atol, rtol);
            }
        }
    }
}

/// What an `fp8_gemv` variant (kernels/src/fp8_gemv.cu) takes as its input.
#[derive(Clone, Copy, Debug, PartialEq)]
enum GemvInput {
    /// `fp8_gemv`: x `[m, k]` as it is.
    Plain,
    /// `fp8_gemv_silu`: gate_up `[1, 2k]`, the input silu(gate) * up.
    Silu,
    /// `fp8_gemv_norm`: x `[1, k]` and a norm weight, the input rmsnorm(x) * norm_w.
    Norm,
}

impl GemvInput {
    /// The bf16 build's entry point of this variant.
    fn kernel(self) -> &'static str {
        match self {
            GemvInput::Plain => "fp8_gemv_bf16",
            GemvInput::Silu => "fp8_gemv_silu_bf16",
            GemvInput::Norm => "fp8_gemv_norm_bf16",
        }
    }
}

/// One `fp8_gemv*` launch's operands, whichever the input (`x` is gate_up for silu; `norm_w`
/// and `eps` are read by norm only), and each variant's typed arguments over them.
struct Gemv {
    y: u64,
    x: u64,
    norm_w: u64,
    eps: f32,
    wq: u64,
    w_scales: u64,
    scale_kind: i32,
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
}

/// An `fp8_gemv*` argument struct from a `Gemv`: the fields every variant shares, and its own.
macro_rules! gemv_args {
    ($g:expr, $ty:ident { $($field:ident: $value:expr),* }) => {
        args::$ty {
            y: $g.y,
            wq: $g.wq,
            w_scales: $g.w_scales,
            scale_kind: $g.scale_kind,
            m: $g.m as i32,
            n: $g.n as i32,
            k: $g.k as i32,
            accumulate: $g.accumulate as i32,
            $($field: $value),*
        }
    };
}

impl Gemv {
    const BLOCK: (u32, u32, u32) = (256, 1, 1);

    fn grid(&self) -> (u32, u32, u32) {
        (self.n.div_ceil(16) as u32, 1, 1)
    }

    fn plain(&self) -> args::Fp8Gemv {
        gemv_args!(self, Fp8Gemv { x: self.x })
    }

    fn silu(&self) -> args::Fp8GemvSilu {
        gemv_args!(self, Fp8GemvSilu { gate_up: self.x })
    }

    /// gemv_bulk.cu's E4M3 build (one token; `accumulate` picks the add variant's kernel, not
    /// an argument).
    fn bulk(&self, rows_per_stage: usize) -> args::GemvBulkFp8 {
        args::GemvBulkFp8 {
            y: self.y,
            x: self.x,
            wq: self.wq,
            w_scales: self.w_scales,
            scale_kind: self.scale_kind,
            n: self.n as i32,
            k: self.k as i32,
            rows_per_stage: rows_per_stage as i32,
            norm_w: self.norm_w,
            eps: self.eps,
            evict_first: 1,
        }
    }

    fn norm(&self) -> args::Fp8GemvNorm {
        gemv_args!(
            self,
            Fp8GemvNorm {
                x: self.x,
                norm_w: self.norm_w,
                eps: self.eps
            }
        )
    }

    /// Launches `input`'s variant `kernel` of `module` and waits (`launch_args`).
    fn launch(&self, g: &gpu_harness::Gpu, input: GemvInput, module: &str, kernel: &str) {
        let (grid, block) = (self.grid(), Self::BLOCK);
        match input {
            GemvInput::Plain => g.launch_args(module, kernel, grid, block, self.plain()),
            GemvInput::Silu => g.launch_args(module, kernel, grid, block, self.silu()),
            GemvInput::Norm => g.launch_args(module, kernel, grid, block, self.norm()),
        }
    }

    /// Launches `input`'s variant `f` on `stream` without waiting (`launch_on`).
    fn launch_on(
        &self,
        g: &gpu_harness::Gpu,
        stream: cudarc::driver::sys::CUstream,
        f: cudarc::driver::sys::CUfunction,
        input: GemvInput,
    ) {
        let (grid, block) = (self.grid(), Self::BLOCK);
        match input {
            GemvInput::Plain => g.launch_on(stream, f, grid, block, self.plain()),
            GemvInput::Silu => g.launch_on(stream, f, grid, block, self.silu()),
            GemvInput::Norm => g.launch_on(stream, f, grid, block, self.norm()),
        }
    }
}

/// One FP8 GEMV test case's host data: random codes and `kind` scales for an `[n, k]`
/// weight, an input of `input`'s kind (rows of different magnitudes and, with several rows,
/// an all-zero one), the expected product and each output's sum of term magnitudes.
struct GemvCase {
    wq: Vec<u8>,
    sw: Vec<f32>,
    /// The kernel's input as raw element bits (gate_up for silu).
    x_bits: Vec<u16>,
    norm_bits: Option<Vec<u16>>,
    want_mm: Vec<f32>,
    magnitude: Vec<f32>,
}

const GEMV_EPS: f32 = 1e-5;

/// A `GemvCase`: the expected input is what the unfused kernels would have stored
/// (silu_and_mul's and rms_norm's results rounded to `e`); the product is `weight_only_mm`.
fn gemv_case(
    r: &mut rand::rngs::StdRng,
    e: Elem,
    input: GemvInput,
    kind: WeightScales,
    (m, n, k): (usize, usize, usize),
) -> GemvCase {
    let eps = GEMV_EPS;
    let (wq, _) = per_token_inputs(r, n, k);
    // Scales near 1e-5 keep outputs within f16's range for inputs up to 1e3.
    let sw: Vec<f32> = (0..kind.count(n, k))
        .map(|_| r.random_range(0.5f32..2.0) * 1e-5)
        .collect();
    let (x_bits, x_input, norm_bits) = match input {
        GemvInput::Plain => {
            let (bits, vals) = inputs(e, r, m, k);
            (bits, vals, None)
        }
        GemvInput::Silu => {
            let (bits, vals) = e.random(r, 2 * k, 4.0);
            let mut act = rvllm_kernels::reference::silu_and_mul(&vals, k);
            e.round_all(&mut act);
            (bits, act, None)
        }
        GemvInput::Norm => {
            let (bits, vals) = inputs(e, r, 1, k);
            let (nw_bits, nw) = e.random(r, k, 2.0);
            let mut normed = rvllm_kernels::reference::rms_norm(&vals, &nw, eps);
            e.round_all(&mut normed);
            (bits, normed, Some(nw_bits))
        }
    };
    let want_mm = weight_only_mm(&x_input, &wq, &sw, kind, k);
    // Each output's sum of term magnitudes (the tensor cores' f32 accumulation may keep fewer
    // bits than an FMA chain).
    let x_abs: Vec<f32> = x_input.iter().map(|v| v.abs()).collect();
    let w_abs: Vec<u8> = wq.iter().map(|&c| c & 0x7f).collect();
    let magnitude = weight_only_mm(&x_abs, &w_abs, &sw, kind, k);
    GemvCase {
        wq,
        sw,
        x_bits,
        norm_bits,
        want_mm,
        magnitude,
    }
}

/// Which FP8 GEMV a check launches.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fp8Kernel {
    /// fp8_gemv.cu's `fp8_gemv*` (1 to 16 tokens).
    Tiles,
    /// gemv_bulk.cu's `gemv_bulk_fp8_*` (one token) with `stages` pipeline stages (4 or 6) on
    /// a grid of at most `grid` blocks.
    Bulk { grid: u32, stages: usize },
}

/// One FP8 GEMV launch against the reference (`gemv_case`), `y` poisoned or, when
/// accumulating (the bulk kernel's add variants), random.
#[allow(clippy::too_many_arguments)] // one test case's parameters
fn check_fp8_gemv_with(
    g: &gpu_harness::Gpu,
    r: &mut rand::rngs::StdRng,
    e: Elem,
    which: Fp8Kernel,
    input: GemvInput,
    kind: WeightScales,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
) {
    let case = gemv_case(r, e, input, kind, (m, n, k));
    let (y0_bits, y0) = e.random(r, m * n, 1.0);
    let d_y = if accumulate {
        g.upload(&y0_bits)
    } else {
        g.poisoned(m * n, e.nan())
    };
    let (d_x, d_wq, d_sw) = (
        g.upload(&case.x_bits),
        g.upload(&case.wq),
        g.upload(&case.sw),
    );
    let d_nw = g.upload(case.norm_bits.as_deref().unwrap_or(&[0u16]));
    let gemv = Gemv {
        y: d_y.ptr,
        x: d_x.ptr,
        norm_w: d_nw.ptr,
        eps: GEMV_EPS,
        wq: d_wq.ptr,
        w_scales: d_sw.ptr,
        scale_kind: kind.kernel_arg(),
        m,
        n,
        k,
        accumulate,
    };
    let name = match which {
        Fp8Kernel::Tiles => {
            let name = input.kernel();
            gemv.launch(g, input, &e.module("fp8_gemv"), &e.kernel(name));
            name.to_string()
        }
        Fp8Kernel::Bulk { grid, stages } => {
            assert_eq!(m, 1, "gemv_bulk_fp8 takes one token");
            let name = bulk_fp8_kernel(input, accumulate, stages);
            let geometry = GemvBulk::for_fp8_k(k, stages).expect("gemv_bulk_fp8 takes this k");
            let grid = grid.min(n.div_ceil(geometry.rows_per_stage) as u32);
            g.launch_args_smem(
                &e.module("gemv_bulk"),
                &e.kernel(&name),
                (grid, 1, 1),
                Gemv::BLOCK,
                geometry.shared_bytes,
                gemv.bulk(geometry.rows_per_stage),
            );
            format!("{name} grid {grid}")
        }
    };
    let want: Vec<f32> = if accumulate {
        case.want_mm.iter().zip(&y0).map(|(a, b)| a + b).collect()
    } else {
        case.want_mm
    };
    let what = format!(
        "{} {name} {kind:?} {m}x{n}x{k} accumulate {accumulate}",
        e.name()
    );
    assert_gemv_close(&what, &g.download_as(e, &d_y), &want, &case.magnitude, e, n);
}

/// `check_fp8_gemv_with` for fp8_gemv.cu's kernels.
fn check_fp8_gemv(
    g: &gpu_harness::Gpu,
    r: &mut rand::rngs::StdRng,
    e: Elem,
    input: GemvInput,
    kind: WeightScales,
    shape: (usize, usize, usize),
    accumulate: bool,
) {
    let which = Fp8Kernel::Tiles;
    check_fp8_gemv_with(g, r, e, which, input, kind, shape, accumulate);
}

/// The bf16 build's name of gemv_bulk.cu's E4M3 variant for `input` (`add`: the residual add)
/// with `stages` pipeline stages (4, or 6: the `_s6` build).
fn bulk_fp8_kernel(input: GemvInput, add: bool, stages: usize) -> String {
    let variant = match (input, add) {
        (GemvInput::Plain, false) => "",
        (GemvInput::Silu, false) => "silu_",
        (GemvInput::Norm, false) => "norm_",
        (GemvInput::Plain, true) => "add_",
        (GemvInput::Silu, true) => "silu_add_",
        (GemvInput::Norm, true) => panic!("gemv_bulk_fp8 has no norm + add variant"),
    };
    let depth = if stages == 6 { "_s6" } else { "" };
    format!("gemv_bulk_fp8_{variant}bf16{depth}_b1")
}

/// gemv_bulk.cu's E4M3 build (the FP8 linear at batch 1 on sm_90+) against `weight_only_mm`:
/// every variant (plain, add, silu, silu + add, norm), every scale kind, both element types;
/// k of 8, 4 and 2 rows a stage (4,096, 6,144, 14,336 and 16,384: 1, 2 and 4 segments a row),
/// a partial 64-column unit (k = 208), a partial last group of rows and n across the 128-row
/// scale blocks; the full grid and small ones (a block loops over many groups, and the add
/// variants read past the rows they park); 4 stages (the engine's) and, on three shapes, the
/// 6-stage build. Outputs poisoned first unless added into.
#[test]
fn gemv_bulk_fp8_matches_the_reference() {
    let Some(g) = gpu("gemv_bulk_fp8_matches_the_reference") else {
        return;
    };
    if g.compute_capability() < (9, 0) {
        println!("SKIPPED: gemv_bulk_fp8 needs sm_90 ({})", g.name);
        return;
    }
    let mut r = rng("gemv_bulk_fp8");
    for e in Elem::BOTH {
        for kind in WeightScales::ALL {
            for &((n, k), grid, stages) in &[
                ((256usize, 4096usize), 132u32, 4usize),
                ((100, 576), 132, 4),
                ((300, 6144), 132, 4),
                ((33, 208), 2, 4),
                ((4096, 14336), 132, 4),
                ((130, 16384), 5, 4),
                ((2051, 4096), 3, 4),
                ((300, 6144), 132, 6),
                ((4096, 14336), 132, 6),
                ((130, 16384), 5, 6),
            ] {
                for (input, add) in [
                    (GemvInput::Plain, false),
                    (GemvInput::Plain, true),
                    (GemvInput::Silu, false),
                    (GemvInput::Silu, true),
                    (GemvInput::Norm, false),
                ] {
                    let which = Fp8Kernel::Bulk { grid, stages };
                    check_fp8_gemv_with(&g, &mut r, e, which, input, kind, (1, n, k), add);
                }
            }
        }
    }
}

/// The host's geometry of the E4M3 bulk GEMV: rows of k one-byte codes, R the most whole rows
/// in a 32 KiB stage, and the k it refuses (not a multiple of 16, past 16,384).
#[test]
fn gemv_bulk_fp8_geometry() {
    let rows = |k| GemvBulk::for_fp8_k(k, 4).map(|g| g.rows_per_stage);
    assert_eq!(rows(4096), Some(8));
    assert_eq!(rows(6144), Some(4));
    assert_eq!(rows(14336), Some(2));
    assert_eq!(rows(16384), Some(2));
    assert_eq!(rows(576), Some(8));
    assert_eq!(rows(1000), None);
    assert_eq!(rows(16400), None);
    assert_eq!(rows(0), None);
    let g = GemvBulk::for_fp8_k(14336, 4).unwrap();
    assert_eq!(g.shared_bytes as usize, 4 * 32 * 1024 + 2 * 14336 + 40);
    // Six stages and the widest input still fit one block's shared memory.
    let g = GemvBulk::for_fp8_k(16384, 6).unwrap();
    assert_eq!(g.shared_bytes as usize, 6 * 32 * 1024 + 2 * 16384 + 56);
}

/// `fp8_gemv` (the FP8 linear at 1 to 16 tokens: weight-only FP8 on the tensor cores) against
/// `weight_only_mm`, every scale kind, both element types, with and without accumulation:
/// batch 1, 3, 8 (the narrow build's last), 9 and 16 (the wide build); k a multiple of the
/// 128-column tile, a multiple of 16 but not of 128 (a partial last tile), and not a multiple
/// of 16 (the byte-wise loads); n below, across and not a multiple of the block's 16 rows and
/// of the 128-row scale blocks; the Llama-3.1-8B down projection's k.
#[test]
fn fp8_gemv_matches_the_reference() {
    let Some(g) = gpu("fp8_gemv_matches_the_reference") else {
        return;
    };
    let mut r = rng("fp8_gemv");
    for e in Elem::BOTH {
        for kind in WeightScales::ALL {
            for shape in [
                (1usize, 256usize, 4096usize),
                (3, 100, 576),
                (16, 48, 14336),
                (1, 37, 40),
                (9, 33, 1000),
                (8, 130, 256),
                (16, 300, 208),
            ] {
                for accumulate in [false, true] {
                    check_fp8_gemv(&g, &mut r, e, GemvInput::Plain, kind, shape, accumulate);
                }
            }
        }
    }
}

/// `fp8_gemv_silu` (the batch-1 down projection with silu_and_mul in its input) and
/// `fp8_gemv_norm` (QKV / gate|up with the RMSNorm in its input) against the reference: every
/// scale kind, both element types, with and without accumulation, k a multiple of 16 and not
/// (the staging's element-wise path), the Llama-3.1-8B shapes.
#[test]
fn fp8_gemv_fused_inputs_match_the_reference() {
    let Some(g) = gpu("fp8_gemv_fused_inputs_match_the_reference") else {
        return;
    };
    let mut r = rng("fp8_gemv_fused");
    for e in Elem::BOTH {
        for kind in WeightScales::ALL {
            for (input, shape) in [
                (GemvInput::Silu, (1usize, 4096usize, 14336usize)),
                (GemvInput::Silu, (1, 100, 40)),
                (GemvInput::Silu, (1, 64, 576)),
                (GemvInput::Norm, (1, 6144, 4096)),
                (GemvInput::Norm, (1, 100, 40)),
                (GemvInput::Norm, (1, 130, 1000)),
            ] {
                for accumulate in [false, true] {
                    check_fp8_gemv(&g, &mut r, e, input, kind, shape, accumulate);
                }
            }
        }
    }
}

/// `got` against `want` at the element type's tolerance plus 1/4096 of each output's term
/// magnitudes: the tensor cores' f32 accumulation may keep fewer bits than an FMA chain, so an
/// output may differ from the sequential f32 sum by a small fraction of them, on top of its
/// rounding to the element type.
fn assert_gemv_close(what: &str, got: &[f32], want: &[f32], magnitude: &[f32], e: Elem, n: usize) {
    assert_eq!(got.len(), want.len(), "{what}");
    let (atol, rtol) = e.tolerance();
    for (j, ((&a, &b), &l1)) in got.iter().zip(want).zip(magnitude).enumerate() {
        let tol = atol + rtol * b.abs() + l1 / 4096.0;
        assert!(
            (a - b).abs() <= tol,
            "{what}: element {j} (token {}, row {}): GPU {a}, reference {b} (tolerance {tol})",
            j / n,
            j % n
        );
    }
}

/// `fp8_scaled_epilogue`: a bf16 product scaled by token x channel scale into either element
/// type, in place (acc = out, the linear) and accumulating from a separate buffer (the
/// residual add).
#[test]
fn fp8_scaled_epilogue_matches_the_reference() {
    let Some(g) = gpu("fp8_scaled_epilogue_matches_the_reference") else {
        return;
    };
    let mut r = rng("fp8_scaled_epilogue");
    for e in Elem::BOTH {
        let (rows, cols) = (7usize, 1000usize);
        let (acc_bits, acc) = Elem::Bf16.random(&mut r, rows * cols, 3000.0);
        let rs: Vec<f32> = (0..rows).map(|_| r.random_range(1e-4..1e-2)).collect();
        let cs: Vec<f32> = (0..cols).map(|_| r.random_range(1e-4..1e-2)).collect();
        let scaled: Vec<f32> = (0..rows * cols)
            .map(|i| acc[i] * rs[i / cols] * cs[i % cols])
            .collect();
        let (d_rs, d_cs) = (g.upload(&rs), g.upload(&cs));
        // In place: out holds the bf16 product on entry.
        let d_out = g.upload(&acc_bits);
        let launch = |out: u64, acc: u64, accumulate: bool| {
            g.launch_args(
                &e.module("fp8_quant"),
                &e.kernel("fp8_scaled_epilogue_bf16"),
                (((rows * cols).div_ceil(256)) as u32, 1, 1),
                (256, 1, 1),
                args::Fp8ScaledEpilogue {
                    out,
                    acc,
                    row_scales: d_rs.ptr,
                    col_scales: d_cs.ptr,
                    rows: rows as i32,
                    cols: cols as i32,
                    accumulate: accumulate as i32,
                },
            )
        };
        launch(d_out.ptr, d_out.ptr, false);
        let (atol, rtol) = e.tolerance();
        let what = format!("{} epilogue in place", e.name());
        gpu_harness::assert_close(&what, &g.download_as(e, &d_out), &scaled, atol, rtol);
        let (res_bits, res) = e.random(&mut r, rows * cols, 1.0);
        let d_res = g.upload(&res_bits);
        let d_acc = g.upload(&acc_bits);
        launch(d_res.ptr, d_acc.ptr, true);
        let want: Vec<f32> = scaled.iter().zip(&res).map(|(a, b)| a + b).collect();
        let what = format!("{} epilogue accumulating", e.name());
        gpu_harness::assert_close(&what, &g.download_as(e, &d_res), &want, atol, rtol);
    }
}

#[test]
fn the_reference_codec_saturates() {
    // The shared codec's own tests live in reference_fp8; this guards what these tests lean
    // on: saturation and a round trip of every finite code.
    for code in 0..=255u8 {
        let v = e4m3_to_f32(code);
        if !v.is_nan() {
            assert_eq!(f32_to_e4m3(v), code, "code {code:#x} = {v}");
        }
    }
    assert_eq!(f32_to_e4m3(1e6), 0x7e);
}

/// The device's streaming multiprocessors (the bulk kernel's grid: one block an SM at most).
fn sm_count() -> u32 {
    use cudarc::driver::{result as drv, sys};
    let attr = sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT;
    unsafe { drv::device::get_attribute(drv::device::get(0).expect("device 0"), attr) }
        .expect("the SM count") as u32
}

/// Timings of the FP8 GEMVs on the Llama-3.1-8B projections (per-channel scales, bf16):
/// `fp8_gemv` at 1, 3, 8 and 16 tokens, and at batch 1 the old path (`fp8_gemv` with the
/// variant the engine ran: norm for qkv and gate|up, the residual add for o_proj, silu + add
/// for down) against gemv_bulk's E4M3 build (plain, and the engine's variant; 4 stages, the
/// engine's, and 6). Each time is the median of 20 replays of a CUDA graph of N launches
/// between two events, after a warm-up replay, divided by N; the launches rotate over copies
/// of the weights (>= 400 MB) so that L2 does not hold them. GB/s counts the weight bytes (the
/// E4M3 codes). Not a timed test: run on a GPU with `gpu_fp8 --ignored --nocapture
/// bench_fp8_gemv`. (It printed 300-530 us before: the graph held N launches a repetition,
/// N x N in all, divided by N.)
#[test]
#[ignore = "benchmark: run on a GPU with --ignored"]
fn bench_fp8_gemv() {
    let Some(g) = gpu("bench_fp8_gemv") else {
        return;
    };
    let mut r = rng("bench_fp8_gemv");
    let e = Elem::Bf16;
    let bulk = g.compute_capability() >= (9, 0);
    let sms = sm_count();
    println!(
        "FP8 GEMVs on {} ({sms} SMs; bf16 inputs, per-channel scales)",
        g.name
    );
    println!(
        "{:>8} {:>6} {:>6} {:>2} {:>30} {:>9} {:>7}",
        "layer", "n", "k", "m", "kernel", "us", "GB/s"
    );
    for (name, n, k, fused, add) in [
        ("qkv", 6144usize, 4096usize, GemvInput::Norm, false),
        ("o_proj", 4096, 4096, GemvInput::Plain, true),
        ("gate_up", 28672, 4096, GemvInput::Norm, false),
        ("down", 4096, 14336, GemvInput::Silu, true),
    ] {
        let bytes = n * k;
        let copies = 400_000_000usize.div_ceil(bytes).clamp(2, 16);
        // Random codes without the NaN ones.
        let host: Vec<u8> = (0..bytes)
            .map(|_| {
                let c: u8 = r.random();
                if c & 0x7f == 0x7f {
                    c ^ 1
                } else {
                    c
                }
            })
            .collect();
        let ws: Vec<_> = (0..copies).map(|_| g.upload(&host)).collect();
        let sw = g.upload(&vec![1e-3f32; n]);
        let (x_bits, _) = e.random(&mut r, 16 * 2 * k, 1.0);
        let x = g.upload(&x_bits);
        let (nw_bits, _) = e.random(&mut r, k, 1.0);
        let nw = g.upload(&nw_bits);
        let y = g.poisoned(16 * n, e.nan());
        let gemv = |m: usize, wq: u64, accumulate: bool| Gemv {
            y: y.ptr,
            x: x.ptr,
            norm_w: nw.ptr,
            eps: 1e-5,
            wq,
            w_scales: sw.ptr,
            scale_kind: 1,
            m,
            n,
            k,
            accumulate,
        };
        // Launches a repetition: the weights rotate through every copy several times.
        let launches = 4 * copies;
        let report = |m: usize, kernel: &str, us: f32| {
            let gbs = bytes as f64 / (us as f64 * 1e-6) / 1e9;
            println!("{name:>8} {n:>6} {k:>6} {m:>2} {kernel:>30} {us:>9.2} {gbs:>7.0}");
        };

        let module = e.module("fp8_gemv");
        let mut cases: Vec<(usize, GemvInput, bool)> = [1usize, 3, 8, 16]
            .map(|m| (m, GemvInput::Plain, false))
            .to_vec();
        cases.push((1, fused, add));
        for (m, input, accumulate) in cases {
            let kernel = e.kernel(input.kernel());
            let f = g.function(&module, &kernel);
            let mut i = 0;
            let us = g.graph_time_us(launches, |stream| {
                gemv(m, ws[i % copies].ptr, accumulate).launch_on(&g, stream, f, input);
                i += 1;
            });
            report(m, &kernel, us);
        }

        if !bulk {
            println!("{name:>8}: gemv_bulk_fp8 needs sm_90");
            continue;
        }
        let module = e.module("gemv_bulk");
        for (stages, input, accumulate) in [
            (4, GemvInput::Plain, false),
            (4, fused, add),
            (6, GemvInput::Plain, false),
            (6, fused, add),
        ] {
            let geometry = GemvBulk::for_fp8_k(k, stages).expect("gemv_bulk_fp8 takes the Llama k");
            let grid = (n.div_ceil(geometry.rows_per_stage) as u32).min(sms);
            let kernel = e.kernel(&bulk_fp8_kernel(input, accumulate, stages));
            let f = g.function(&module, &kernel);
            g.allow_smem(f, geometry.shared_bytes);
            let mut i = 0;
            let us = g.graph_time_us(launches, |stream| {
                let args = gemv(1, ws[i % copies].ptr, accumulate).bulk(geometry.rows_per_stage);
                g.launch_on_smem(
                    stream,
                    f,
                    (grid, 1, 1),
                    Gemv::BLOCK,
                    geometry.shared_bytes,
                    args,
                );
                i += 1;
            });
            report(1, &kernel, us);
        }
    }
}
