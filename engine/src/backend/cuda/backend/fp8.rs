//! `--quantization fp8` on the CUDA backend, as vLLM's online dynamic FP8 runs on Hopper:
//! the decoder layers' projections are held as E4M3 codes with one f32 scale per output
//! channel (a row of the `[out, in]` weight), each linear quantizes its input per token
//! (`fp8_quant_per_token`), and an FP8 GEMM multiplies the codes.
//!
//! The weight rule is the CPU's (`backend::cpu::fp8`: scale = row amax / 448, codes rounded to
//! nearest even, saturating), applied on the host at upload, so the GPU holds the very codes
//! the CPU path rounds its weights through. The GEMM is cuBLASLt's E4M3 x E4M3 matmul with
//! unit scales into bf16 (which holds the unscaled product's range; f16 would overflow), then
//! `fp8_scaled_epilogue` applies token scale x channel scale (and the residual add) in one
//! pass. Shapes cuBLASLt's FP8 kernels do not take (k or n not a multiple of 16) run
//! `fp8_scaled_mm`, a warp-per-output kernel with the same scales. Nothing here syncs the
//! host, and every buffer is allocated at load, so CUDA graphs capture it.
//!
//! Up to `FP8_GEMV_MAX_TOKENS` tokens (decode) the product is `fp8_gemv` instead
//! (kernels/src/fp8_gemv.cu): weight-only FP8, the codes streamed once and decoded in the
//! kernel, the input taken as it is in the compute type (not quantized), the channel scale and
//! the residual add applied in the same kernel: one launch a linear, as the compute-type
//! path's GEMV. At batch 1 `fp8_gemv_silu` also computes the down projection's
//! silu(gate) * up (no silu_and_mul launch, no activation stored) and `fp8_gemv_norm` the
//! RMSNorm before QKV and gate|up (no rms_norm launch, no normed rows stored), as gemv_bulk's
//! variants do for the compute type. So a request's numbers depend on its batch's size: up to
//! 16 tokens the input keeps its compute-type precision, past it it is rounded to E4M3.
//!
//! At batch 1 on sm_90+ the normed projections (QKV, gate|up) run gemv_bulk's E4M3 build
//! instead (`gemv_bulk_fp8_norm_*`, kernels/src/gemv_bulk.cu: the weights streamed into shared
//! memory by the bulk copy engine, the products on the tensor cores, the norm fused as
//! `fp8_gemv_norm` fuses it); O and down keep `fp8_gemv` (faster there: `fp8_gemv_bulk`), as do
//! 2 to 16 tokens and batch 1 where the bulk kernel does not take k.
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use anyhow::{anyhow, bail, ensure, Context, Result};
use cudarc::cublaslt::{result as lt, sys as ltsys};
use cudarc::driver::sys::CUdeviceptr;
use rayon::prelude::*;

use super::super::kernels::{
    FP8_GEMV, FP8_GEMV_NORM, FP8_GEMV_SILU, FP8_QUANT_PER_TOKEN, FP8_SCALED_EPILOGUE,
    FP8_SCALED_MM, GEMV_BULK_FP8_ADD, GEMV_BULK_FP8_NORM, GEMV_BULK_FP8_PLAIN, GEMV_BULK_FP8_SILU,
    GEMV_BULK_FP8_SILU_ADD,
};
use super::{CudaBackend, CudaTensor, CudaVector, CudaWeight, GemvInput};
use crate::backend::cpu::fp8::{dynamic_scale, quantize_with_scale};
use crate::backend::{Activation, Backend};
use crate::types::HostTensor;
use rvllm_kernels::args;
use rvllm_kernels::gemv_bulk::GemvBulk;

/// The most tokens `fp8_gemv` (kernels/src/fp8_gemv.cu) takes: the M of its MMA.
pub const FP8_GEMV_MAX_TOKENS: usize = 16;

/// The widest input `fp8_gemv_silu` / `fp8_gemv_norm` stage in shared memory (the kernels'
/// kMaxStagedK); wider ones run the unfused kernels.
pub const FP8_GEMV_MAX_STAGED_K: usize = 16384;

/// `fp8_gemv`'s scale layout for the weights `--quantization fp8` makes: one scale a row.
const CHANNEL_SCALES: i32 = 1;

/// Whether a batch of `rows` tokens runs the fused batch-1 FP8 GEMVs over `k` inputs.
fn fused_gemv_takes(rows: usize, k: usize) -> bool {
    rows == 1 && k <= FP8_GEMV_MAX_STAGED_K
}

/// The weights `--quantization fp8` stores as E4M3: the decoder layers' projections as the
/// model uploads them (fused QKV, O, fused gate|up, down). Embeddings, the LM head, norms,
/// MoE routers and experts stay in the compute type (the experts' host values are already
/// rounded through E4M3, as on the CPU).
pub fn is_fp8_projection(name: &str) -> bool {
    name.starts_with("model.layers.")
        && [
            ".self_attn.qkv",
            ".self_attn.o_proj.weight",
            ".mlp.gate_up",
            ".mlp.down_proj.weight",
        ]
        .iter()
        .any(|s| name.ends_with(s))
}

/// E4M3 codes and per-row scales of `[rows, cols]` f32 values, by the CPU's rule.
pub fn quantize_rows(values: &[f32], cols: usize) -> (Vec<u8>, Vec<f32>) {
    let cols = cols.max(1);
    let per_row: Vec<(Vec<u8>, f32)> = values
        .par_chunks(cols)
        .map(|row| {
            let s = dynamic_scale(row);
            (quantize_with_scale(row, s), s)
        })
        .collect();
    let mut codes = Vec::with_capacity(values.len());
    let mut scales = Vec::with_capacity(per_row.len());
    for (c, s) in per_row {
        codes.extend(c);
        scales.push(s);
    }
    (codes, scales)
}

/// Whether cuBLASLt's FP8 GEMM takes `[m, k] x [n, k]^T`: its FP8 kernels want the
/// reduction and the output's leading dimension in multiples of 16 (16-byte aligned rows).
pub fn cublaslt_takes(n: usize, k: usize) -> bool {
    n.is_multiple_of(16) && k.is_multiple_of(16)
}

/// The FP8 state of one backend: whether uploads quantize, and (from the first FP8 weight on)
/// cuBLASLt, its workspace and the per-token activation buffers.
#[derive(Default)]
pub struct Fp8State {
    online: AtomicBool,
    rt: Mutex<Option<Fp8Runtime>>,
}

const LT_WORKSPACE_BYTES: usize = 32 << 20;

struct Fp8Runtime {
    /// None below compute capability 8.9 (no FP8 tensor cores): `fp8_scaled_mm` only.
    lt: Option<ltsys::cublasLtHandle_t>,
    workspace: super::super::device::DevBuf,
    /// The current input's codes (`[max_tokens, max_k]`) and per-token scales.
    codes: super::super::device::DevBuf,
    scales: super::super::device::DevBuf,
    max_k: usize,
    /// One matmul plan per (m, n, k); None where cuBLASLt offered no algorithm.
    plans: HashMap<(usize, usize, usize), Option<LtPlan>>,
}

struct LtPlan {
    desc: ltsys::cublasLtMatmulDesc_t,
    layouts: [ltsys::cublasLtMatrixLayout_t; 3],
    algo: ltsys::cublasLtMatmulAlgo_t,
}

impl Drop for LtPlan {
    fn drop(&mut self) {
        // SAFETY: created by LtPlan::new and used by no one after this.
        unsafe {
            for l in self.layouts {
                let _ = lt::destroy_matrix_layout(l);
            }
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

impl Drop for Fp8Runtime {
    fn drop(&mut self) {
        self.plans.clear();
        if let Some(h) = self.lt.take() {
            // SAFETY: our own handle, its plans destroyed above.
            unsafe {
                let _ = lt::destroy_handle(h);
            }
        }
    }
}

fn lt_err(what: &str) -> impl Fn(lt::CublasError) -> anyhow::Error + '_ {
    move |e| anyhow!("cuBLASLt {what}: {e:?}")
}

impl LtPlan {
    /// Row-major `y[m, n] = x[m, k] @ w[n, k]^T`, E4M3 in, bf16 out, unit scales: in
    /// cuBLASLt's column-major terms `Y^T[n, m] = W^T (op T of the k x n W) * X^T`, the "TN"
    /// layout its FP8 kernels require.
    fn new(h: ltsys::cublasLtHandle_t, m: usize, n: usize, k: usize) -> Result<Option<Self>> {
        use ltsys::cublasLtMatmulDescAttributes_t as A;
        // SAFETY: descriptors are created, set with values that outlive the calls, and owned
        // by the plan (destroyed on drop, including on the error paths below).
        unsafe {
            let desc = lt::create_matmul_desc(
                ltsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                ltsys::cudaDataType::CUDA_R_32F,
            )
            .map_err(lt_err("matmul descriptor"))?;
            let e4m3 = ltsys::cudaDataType::CUDA_R_8F_E4M3;
            let bf16 = ltsys::cudaDataType::CUDA_R_16BF;
            let mut plan = Self {
                desc,
                layouts: [std::ptr::null_mut(); 3],
                // SAFETY: plain data, overwritten by the heuristic's choice below.
                algo: std::mem::zeroed(),
            };
            let (op_t, op_n) = (1i32, 0i32); // CUBLAS_OP_T, CUBLAS_OP_N
            for (attr, v) in [
                (A::CUBLASLT_MATMUL_DESC_TRANSA, &op_t),
                (A::CUBLASLT_MATMUL_DESC_TRANSB, &op_n),
            ] {
                lt::set_matmul_desc_attribute(desc, attr, v as *const i32 as *const c_void, 4)
                    .map_err(lt_err("matmul transpose"))?;
            }
            plan.layouts[0] = lt::create_matrix_layout(e4m3, k as u64, n as u64, k as i64)
                .map_err(lt_err("layout of W"))?;
            plan.layouts[1] = lt::create_matrix_layout(e4m3, k as u64, m as u64, k as i64)
                .map_err(lt_err("layout of X"))?;
            plan.layouts[2] = lt::create_matrix_layout(bf16, n as u64, m as u64, n as i64)
                .map_err(lt_err("layout of Y"))?;
            let pref = lt::create_matmul_pref().map_err(lt_err("preference"))?;
            let ws = LT_WORKSPACE_BYTES;
            let set = lt::set_matmul_pref_attribute(
                pref,
                ltsys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const usize as *const c_void,
                std::mem::size_of::<usize>(),
            );
            let [a, b, c] = plan.layouts;
            let found = set.and_then(|_| lt::get_matmul_algo_heuristic(h, desc, a, b, c, c, pref));
            let _ = lt::destroy_matmul_pref(pref);
            match found {
                Ok(r) => {
                    plan.algo = r.algo;
                    Ok(Some(plan))
                }
                Err(e) => {
                    eprintln!(
                        "rvllm: cuBLASLt has no FP8 GEMM for {m}x{k} @ {k}x{n} ({e:?}); that \
                         shape runs fp8_scaled_mm"
                    );
                    Ok(None)
                }
            }
        }
    }
}

impl Fp8State {
    pub fn online(&self) -> bool {
        self.online.load(Ordering::Relaxed)
    }
}

impl CudaBackend {
    /// `--quantization fp8` (vLLM's online dynamic FP8): from now on `upload_weight` stores
    /// the decoder's projections as E4M3 with per-channel scales. Refused below compute
    /// capability 8.9 (no FP8 tensor cores), as vLLM's FP8 GEMMs are.
    pub fn enable_online_fp8(&self, on: bool) -> Result<()> {
        if on {
            let (major, minor) = self.gpu.compute_capability;
            ensure!(
                (major, minor) >= (8, 9),
                "--quantization fp8 needs FP8 tensor cores (compute capability 8.9 or newer: \
                 Ada, Hopper); {} is sm_{major}{minor}; leave the flag out or run it with \
                 --device cpu",
                self.gpu.name
            );
        }
        self.fp8.online.store(on, Ordering::Relaxed);
        Ok(())
    }

    /// The FP8 upload of `t` when `--quantization fp8` is on and `name` is a projection;
    /// None otherwise (the caller uploads it in the compute type).
    pub(super) fn upload_fp8_weight(
        &self,
        name: &str,
        t: &HostTensor,
    ) -> Result<Option<CudaWeight>> {
        if !self.fp8.online() || !is_fp8_projection(name) || t.shape.len() != 2 {
            return Ok(None);
        }
        let (rows, cols) = (t.shape[0], t.shape[1]);
        let (codes, scales) = quantize_rows(&t.to_f32(), cols);
        self.ensure_fp8_runtime(cols)
            .with_context(|| format!("preparing the FP8 GEMM for `{name}`"))?;
        let buf = self.upload_slice(&codes)?;
        let scales = self.upload_slice(&scales)?;
        // The progress bar counts the compute type's bytes.
        self.count_upload(rows * cols * super::ELEM_BYTES);
        Ok(Some(CudaWeight {
            buf,
            rows,
            cols,
            fp8_scales: Some(scales),
        }))
    }

    /// cuBLASLt and the activation buffers, sized for inputs of `k` columns (grown at load,
    /// never while a step runs).
    fn ensure_fp8_runtime(&self, k: usize) -> Result<()> {
        let mut rt = self.fp8.rt.lock().unwrap_or_else(|e| e.into_inner());
        let tokens = self.limits.max_tokens.max(1);
        if rt.is_none() {
            let lt = if self.gpu.compute_capability >= (8, 9) {
                Some(lt::create_handle().map_err(|e| {
                    anyhow!("cuBLASLt could not be initialised ({e:?}): is libcublasLt (CUDA 12/13) on the loader path?")
                })?)
            } else {
                None
            };
            *rt = Some(Fp8Runtime {
                lt,
                workspace: self.gpu.alloc(LT_WORKSPACE_BYTES)?,
                codes: self.gpu.alloc(tokens * k)?,
                scales: self.gpu.alloc(tokens * 4)?,
                max_k: k,
                plans: HashMap::new(),
            });
        }
        let r = rt.as_mut().expect("just set");
        if k > r.max_k {
            r.codes = self.gpu.alloc(tokens * k)?;
            r.max_k = k;
        }
        Ok(())
    }

    /// `y = x @ w^T` (or `y += ...` when `accumulate`) for an FP8 `w`: up to
    /// `FP8_GEMV_MAX_TOKENS` tokens `fp8_gemv` (weight-only FP8, one launch); past it
    /// per-token quantization of `x`, then the FP8 GEMM. `scratch` (`[x.rows, w.rows]` in the
    /// compute type's 2 bytes an element) takes cuBLASLt's unscaled product when accumulating.
    fn fp8_matmul(
        &self,
        x: &CudaTensor,
        w: &CudaWeight,
        y: CUdeviceptr,
        scratch: Option<CUdeviceptr>,
        accumulate: bool,
    ) -> Result<()> {
        let Some(w_scales) = w.fp8_scales.as_ref() else {
            bail!("fp8_matmul on a weight that is not FP8");
        };
        let (m, n, k) = (x.rows, w.rows, w.cols);
        ensure!(
            x.cols == k,
            "FP8 linear: input has {} columns, weight expects {k}",
            x.cols
        );
        if m == 0 {
            return Ok(());
        }
        if m == 1 && self.fp8_gemv_bulk(GemvInput::Plain, accumulate, x.ptr(), w, y, None)? {
            return Ok(());
        }
        if m <= FP8_GEMV_MAX_TOKENS {
            // Decode-sized batches: one pass over the weight codes with the scale and the
            // residual add in the same kernel, instead of quantize, cuBLASLt and the epilogue.
            return self.launch(
                FP8_GEMV,
                (n.div_ceil(16) as u32, 1, 1),
                256,
                args::Fp8Gemv {
                    y,
                    x: x.ptr(),
                    wq: w.buf.ptr,
                    w_scales: w_scales.ptr,
                    scale_kind: CHANNEL_SCALES,
                    m: m as i32,
                    n: n as i32,
                    k: k as i32,
                    accumulate: accumulate as i32,
                },
            );
        }
        let mut guard = self.fp8.rt.lock().unwrap_or_else(|e| e.into_inner());
        let rt = guard
            .as_mut()
            .ok_or_else(|| anyhow!("FP8 weight without the FP8 runtime"))?;
        ensure!(
            k <= rt.max_k && m <= self.limits.max_tokens,
            "FP8 linear of {m}x{k}: the activation buffers hold {}x{}",
            self.limits.max_tokens,
            rt.max_k
        );
        let (codes, x_scales) = (rt.codes.ptr, rt.scales.ptr);
        self.launch(
            FP8_QUANT_PER_TOKEN,
            (m as u32, 1, 1),
            256,
            args::Fp8QuantPerToken {
                out: codes,
                scales: x_scales,
                r#in: x.ptr(),
                rows: m as i32,
                cols: k as i32,
            },
        )?;
        let lt_handle = rt.lt.filter(|_| cublaslt_takes(n, k));
        let plan = match lt_handle {
            Some(h) => {
                let slot = match rt.plans.entry((m, n, k)) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(e) => {
                        e.insert(LtPlan::new(h, m, n, k)?)
                    }
                };
                slot.as_ref().map(|p| (h, p))
            }
            None => None,
        };
        let Some((h, plan)) = plan else {
            // One grid row a token: CUDA's grid y stops at 65,535.
            ensure!(
                m <= 65_535,
                "fp8_scaled_mm takes at most 65,535 tokens a launch, asked for {m} (n {n}, k {k})"
            );
            let grid = (n.div_ceil(8) as u32, m as u32, 1);
            return self.launch(
                FP8_SCALED_MM,
                grid,
                256,
                args::Fp8ScaledMm {
                    y,
                    xq: codes,
                    x_scales,
                    wq: w.buf.ptr,
                    w_scales: w_scales.ptr,
                    m: m as i32,
                    n: n as i32,
                    k: k as i32,
                    accumulate: accumulate as i32,
                },
            );
        };
        let acc = if accumulate {
            scratch.ok_or_else(|| anyhow!("an accumulating FP8 linear needs a scratch buffer"))?
        } else {
            y
        };
        let (alpha, beta) = (1.0f32, 0.0f32);
        let [a, b, c] = plan.layouts;
        // SAFETY: the plan describes these buffers' shapes (codes [m, k], weight [n, k],
        // acc [m, n] bf16), the workspace is ours, and the stream is the backend's.
        unsafe {
            lt::matmul(
                h,
                plan.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                w.buf.ptr as *const c_void,
                a,
                codes as *const c_void,
                b,
                acc as *const c_void,
                c,
                acc as *mut c_void,
                c,
                &plan.algo,
                rt.workspace.ptr as *mut c_void,
                LT_WORKSPACE_BYTES,
                self.gpu.stream as ltsys::cudaStream_t,
            )
        }
        .map_err(|e| anyhow!("cuBLASLt FP8 GEMM ({m}x{k} @ {k}x{n}): {e:?}"))?;
        let total = m * n;
        let blocks = total.div_ceil(256).min(4096) as u32;
        self.launch(
            FP8_SCALED_EPILOGUE,
            (blocks, 1, 1),
            256,
            args::Fp8ScaledEpilogue {
                out: y,
                acc,
                row_scales: x_scales,
                col_scales: w_scales.ptr,
                rows: m as i32,
                cols: n as i32,
                accumulate: accumulate as i32,
            },
        )
    }

    /// `linear` for an FP8 weight.
    pub(super) fn fp8_linear(
        &self,
        x: &CudaTensor,
        w: &CudaWeight,
        bias: Option<&CudaVector>,
        out: &mut CudaTensor,
    ) -> Result<()> {
        ensure!(
            out.cols == w.rows,
            "FP8 linear: output has {} columns, weight gives {}",
            out.cols,
            w.rows
        );
        out.set_rows(x.rows)?;
        if x.rows == 0 {
            return Ok(());
        }
        self.fp8_matmul(x, w, out.ptr(), None, false)?;
        if let Some(b) = bias {
            ensure!(
                b.len == w.rows,
                "bias has {} values for {} outputs",
                b.len,
                w.rows
            );
            // out += ones[rows, 1] @ bias[out, 1]^T, as the compute-type linear adds it.
            self.gpu.gemm(
                self.dtype,
                self.ones.ptr,
                b.elem.ptr,
                out.ptr(),
                x.rows,
                w.rows,
                1,
                true,
            )?;
        }
        Ok(())
    }

    /// `residual += x @ w^T` for an FP8 weight (the add in the GEMM's epilogue).
    pub(super) fn fp8_linear_add(
        &self,
        x: &CudaTensor,
        w: &CudaWeight,
        residual: &mut CudaTensor,
        scratch: &mut CudaTensor,
    ) -> Result<()> {
        ensure!(
            residual.cols == w.rows && residual.rows == x.rows && scratch.cols == w.rows,
            "FP8 linear_add: input {}x{}, weight {}x{}, residual {}x{}, scratch of {} columns",
            x.rows,
            x.cols,
            w.rows,
            w.cols,
            residual.rows,
            residual.cols,
            scratch.cols
        );
        scratch.set_rows(x.rows)?;
        self.fp8_matmul(x, w, residual.ptr(), Some(scratch.ptr()), true)
    }

    /// `norm_linear` for an FP8 weight: the norm, then the FP8 linear.
    #[allow(clippy::too_many_arguments)] // the trait method's operands
    pub(super) fn fp8_norm_linear(
        &self,
        x: &CudaTensor,
        norm_weight: &CudaVector,
        eps: f32,
        normed: &mut CudaTensor,
        w: &CudaWeight,
        bias: Option<&CudaVector>,
        out: &mut CudaTensor,
    ) -> Result<()> {
        if bias.is_none() && fused_gemv_takes(x.rows, x.cols) {
            // Batch 1: the norm inside the GEMV (the normed rows are not stored, as
            // gemv_bulk's norm variant does not store them).
            let Some(w_scales) = w.fp8_scales.as_ref() else {
                bail!("fp8_norm_linear on a weight that is not FP8");
            };
            ensure!(
                x.cols == w.cols && out.cols == w.rows && norm_weight.len == w.cols,
                "FP8 norm_linear: input {}x{}, norm of {}, weight {}x{}, output of {} columns",
                x.rows,
                x.cols,
                norm_weight.len,
                w.rows,
                w.cols,
                out.cols
            );
            out.set_rows(x.rows)?;
            let norm = Some((norm_weight, eps));
            if self.fp8_gemv_bulk(GemvInput::Norm, false, x.ptr(), w, out.ptr(), norm)? {
                return Ok(());
            }
            return self.launch(
                FP8_GEMV_NORM,
                (w.rows.div_ceil(16) as u32, 1, 1),
                256,
                args::Fp8GemvNorm {
                    y: out.ptr(),
                    x: x.ptr(),
                    norm_w: norm_weight.elem.ptr,
                    eps,
                    wq: w.buf.ptr,
                    w_scales: w_scales.ptr,
                    scale_kind: CHANNEL_SCALES,
                    m: x.rows as i32,
                    n: w.rows as i32,
                    k: w.cols as i32,
                    accumulate: 0,
                },
            );
        }
        self.rms_norm(x, norm_weight, eps, normed)?;
        self.fp8_linear(normed, w, bias, out)
    }

    /// `silu_mul_linear` for an FP8 down projection.
    pub(super) fn fp8_silu_mul_linear(
        &self,
        gate_up: &CudaTensor,
        down: &CudaWeight,
        act: &mut CudaTensor,
        out: &mut CudaTensor,
    ) -> Result<()> {
        ensure!(
            out.cols == down.rows,
            "FP8 silu_mul_linear: output has {} columns, weight gives {}",
            out.cols,
            down.rows
        );
        out.set_rows(gate_up.rows)?;
        if self.fp8_gemv_silu(gate_up, down, out.ptr(), false)? {
            return Ok(());
        }
        self.silu_and_mul(gate_up, act)?;
        self.fp8_linear(act, down, None, out)
    }

    /// `silu_mul_linear_add` for an FP8 down projection.
    pub(super) fn fp8_silu_mul_linear_add(
        &self,
        gate_up: &CudaTensor,
        down: &CudaWeight,
        act: &mut CudaTensor,
        residual: &mut CudaTensor,
        scratch: &mut CudaTensor,
    ) -> Result<()> {
        ensure!(
            residual.cols == down.rows && residual.rows == gate_up.rows,
            "FP8 silu_mul_linear_add: gate_up {}x{}, weight {}x{}, residual {}x{}",
            gate_up.rows,
            gate_up.cols,
            down.rows,
            down.cols,
            residual.rows,
            residual.cols
        );
        if self.fp8_gemv_silu(gate_up, down, residual.ptr(), true)? {
            return Ok(());
        }
        self.silu_and_mul(gate_up, act)?;
        self.fp8_linear_add(act, down, residual, scratch)
    }

    /// Batch-1 `y (+)= (silu(gate) * up) @ down^T` in one launch (`fp8_gemv_silu`: the
    /// activation computed inside the GEMV, not stored); false (nothing launched) past batch 1
    /// or past `FP8_GEMV_MAX_STAGED_K` inputs.
    fn fp8_gemv_silu(
        &self,
        gate_up: &CudaTensor,
        down: &CudaWeight,
        y: CUdeviceptr,
        accumulate: bool,
    ) -> Result<bool> {
        let Some(w_scales) = down.fp8_scales.as_ref() else {
            bail!("fp8_gemv_silu on a weight that is not FP8");
        };
        if !fused_gemv_takes(gate_up.rows, down.cols) {
            return Ok(false);
        }
        ensure!(
            gate_up.cols == 2 * down.cols,
            "FP8 silu_mul_linear: gate_up has {} columns, the down projection takes {}",
            gate_up.cols,
            down.cols
        );
        if self.fp8_gemv_bulk(GemvInput::Silu, accumulate, gate_up.ptr(), down, y, None)? {
            return Ok(true);
        }
        self.launch(
            FP8_GEMV_SILU,
            (down.rows.div_ceil(16) as u32, 1, 1),
            256,
            args::Fp8GemvSilu {
                y,
                gate_up: gate_up.ptr(),
                wq: down.buf.ptr,
                w_scales: w_scales.ptr,
                scale_kind: CHANNEL_SCALES,
                m: gate_up.rows as i32,
                n: down.rows as i32,
                k: down.cols as i32,
                accumulate: accumulate as i32,
            },
        )?;
        Ok(true)
    }

    /// Batch-1 `y (+)= input @ w^T` for an FP8 `w` through gemv_bulk's E4M3 build
    /// (`gemv_bulk_fp8_*`) when this GPU (sm_90+) and `w` allow it (`GemvBulk::for_fp8_k`);
    /// false (nothing launched) otherwise. `x` is what `input` reads: the row, gate|up `[2k]`
    /// (silu) or the residual to normalize with `norm`; `add`: y += the product.
    fn fp8_gemv_bulk(
        &self,
        input: GemvInput,
        add: bool,
        x: CUdeviceptr,
        w: &CudaWeight,
        y: CUdeviceptr,
        norm: Option<(&CudaVector, f32)>,
    ) -> Result<bool> {
        let Some(w_scales) = w.fp8_scales.as_ref() else {
            bail!("fp8_gemv_bulk on a weight that is not FP8");
        };
        // Only the normed inputs (QKV, gate|up): on an H100 (BENCHMARKS.md, 2026-12-07, sixth
        // session) the bulk build beat `fp8_gemv` there (gate|up 44.8 vs 50.8 us, QKV 15.7 vs
        // 16.8) but lost on O with the residual add (14.0 vs 10.1) and on down (silu + add 30.6
        // vs 27.4), where a block's fixed start and drain outweigh its streaming.
        if !matches!(input, GemvInput::Norm) {
            return Ok(false);
        }
        let Some(g) = self
            .gemv_bulk
            .then(|| GemvBulk::for_fp8_k(w.cols, 4))
            .flatten()
        else {
            return Ok(false);
        };
        let kernel = match (input, add) {
            (GemvInput::Plain, false) => GEMV_BULK_FP8_PLAIN,
            (GemvInput::Silu, false) => GEMV_BULK_FP8_SILU,
            (GemvInput::Norm, false) => GEMV_BULK_FP8_NORM,
            (GemvInput::Plain, true) => GEMV_BULK_FP8_ADD,
            (GemvInput::Silu, true) => GEMV_BULK_FP8_SILU_ADD,
            (GemvInput::Norm, true) => bail!("gemv_bulk_fp8 has no norm + add variant"),
        };
        let (norm_w, eps) = match norm {
            Some((v, eps)) => (v.elem.ptr, eps),
            None => (0, 0.0f32),
        };
        // One persistent block per SM at most, as the compute type's bulk GEMV.
        let grid = (w.rows.div_ceil(g.rows_per_stage) as u32).min(self.gpu.sm_count);
        self.launch_smem(
            kernel,
            (grid, 1, 1),
            256,
            g.shared_bytes,
            args::GemvBulkFp8 {
                y,
                x,
                wq: w.buf.ptr,
                w_scales: w_scales.ptr,
                scale_kind: CHANNEL_SCALES,
                n: w.rows as i32,
                k: w.cols as i32,
                rows_per_stage: g.rows_per_stage as i32,
                norm_w,
                eps,
                evict_first: self.gemv_evict_first as i32,
            },
        )?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::elem::GpuDtype;
    use super::*;

    #[test]
    fn only_the_layer_projections_are_fp8() {
        for name in [
            "model.layers.0.self_attn.qkv",
            "model.layers.11.self_attn.o_proj.weight",
            "model.layers.3.mlp.gate_up",
            "model.layers.3.mlp.down_proj.weight",
        ] {
            assert!(is_fp8_projection(name), "{name}");
        }
        for name in [
            "model.embed_tokens.weight",
            "lm_head.weight",
            "model.layers.0.mlp.gate.weight",
            "model.layers.0.block_sparse_moe.gate.weight",
            "model.layers.0.input_layernorm.weight",
        ] {
            assert!(!is_fp8_projection(name), "{name}");
        }
    }

    #[test]
    fn rows_quantize_by_the_cpu_rule_and_round_trip_the_cpu_rounding() {
        use crate::backend::cpu::fp8::{e4m3_to_f32, fake_quant_in_place};
        let cols = 5;
        let mut w: Vec<f32> = (0..4 * cols)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.013)
            .collect();
        w[7] = 0.0;
        let (codes, scales) = quantize_rows(&w, cols);
        for (r, row) in w.chunks(cols).enumerate() {
            assert_eq!(scales[r], dynamic_scale(row));
            assert_eq!(
                &codes[r * cols..(r + 1) * cols],
                &quantize_with_scale(row, scales[r])[..]
            );
        }
        // `--quantization fp8` rounds the host weights first (models/quant/online.rs); the
        // GPU's codes of those rounded values stand for the same values.
        let mut rounded = w.clone();
        for row in rounded.chunks_mut(cols) {
            let s = dynamic_scale(row);
            fake_quant_in_place(row, s);
        }
        let (codes2, scales2) = quantize_rows(&rounded, cols);
        for (i, (&c, &v)) in codes2.iter().zip(&rounded).enumerate() {
            let back = e4m3_to_f32(c) * scales2[i / cols];
            assert!((back - v).abs() <= v.abs() * 1e-6, "{i}: {back} vs {v}");
        }
    }

    #[test]
    fn cublaslt_takes_16_aligned_shapes_only() {
        assert!(cublaslt_takes(576, 576));
        assert!(cublaslt_takes(28672, 4096));
        assert!(!cublaslt_takes(100, 64));
        assert!(!cublaslt_takes(64, 40));
    }

    /// A deterministic pseudo-random fill in [-scale, scale).
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

    /// The backend's FP8 linears on the GPU against the reference (`reference_fp8`): up to
    /// 16 tokens `weight_only_mm` (the input as it is, the weight's per-channel codes), past
    /// them the input's per-token codes and `scaled_mm`, both in f32. `linear` (with a bias),
    /// `linear_add`, `norm_linear` and `silu_mul_linear_add`, in both element types, through
    /// gemv_bulk's E4M3 build (batch 1 on sm_90+, k a multiple of 16), the fused
    /// `fp8_gemv_norm` / `fp8_gemv_silu` (batch 1 elsewhere), `fp8_gemv` (1 to 16 tokens),
    /// cuBLASLt (16-aligned shapes past 16 tokens) and `fp8_scaled_mm` (n = 100 past 16
    /// tokens); k = 40 and 1000 take the GEMVs' byte-wise loads. Outputs are poisoned first.
    #[test]
    fn fp8_linears_match_the_reference() {
        use super::super::super::elem::{bits_of, value_of};
        use super::super::StepLimits;
        use crate::backend::cpu::fp8::{
            quantize_per_token, scaled_mm, weight_only_mm, WeightScales,
        };
        use crate::types::HostData;
        if !matches!(super::super::super::device_count(), Ok(n) if n > 0) {
            eprintln!("SKIPPED: no CUDA device (fp8_linears_match_the_reference)");
            return;
        }
        let gpu = std::sync::Arc::new(super::super::super::Gpu::new(0).expect("a CUDA context"));
        if gpu.compute_capability < (8, 9) {
            eprintln!(
                "SKIPPED: FP8 needs compute capability 8.9 (fp8_linears_match_the_reference)"
            );
            return;
        }
        let limits = StepLimits {
            max_tokens: 512,
            max_seqs: 8,
            max_blocks_per_seq: 1,
        };
        for dtype in [GpuDtype::Bf16, GpuDtype::F16] {
            let be = CudaBackend::new(gpu.clone(), limits, 1, 1, 64, dtype).unwrap();
            be.enable_online_fp8(true).unwrap();
            let round = |v: Vec<f32>| -> Vec<f32> {
                v.into_iter()
                    .map(|x| value_of(bits_of(x, dtype), dtype))
                    .collect()
            };
            let tol_of = |want: &[f32]| {
                let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let rel = match dtype {
                    GpuDtype::Bf16 => 2e-2,
                    GpuDtype::F16 => 1e-2,
                };
                rel * scale.max(1e-3)
            };
            let check = |what: &str, got: &CudaTensor, want: &[f32]| {
                let mut g = Vec::new();
                be.to_host(got, &mut g).unwrap();
                assert_eq!(g.len(), want.len(), "{what}");
                let tol = tol_of(want);
                for (i, (a, b)) in g.iter().zip(want).enumerate() {
                    assert!(
                        (a - b).abs() <= tol,
                        "{what}: element {i}: GPU {a}, reference {b} (tolerance {tol})"
                    );
                }
            };
            for (seed, &(m, n, k)) in [
                (1usize, 256usize, 128usize),
                (1, 100, 64),
                (1, 96, 40),
                (7, 100, 64),
                (8, 4096, 1000),
                (16, 100, 64),
                (17, 100, 64),
                (33, 576, 1536),
                (300, 960, 576),
            ]
            .iter()
            .enumerate()
            {
                let what = format!("{dtype:?} {m}x{n}x{k}");
                let seed = seed as u64 * 10;
                let wv = fill(n * k, seed + 1, 0.05);
                let w = be
                    .upload_weight(
                        "model.layers.0.mlp.down_proj.weight",
                        HostTensor {
                            shape: vec![n, k],
                            data: HostData::F32(wv.clone()),
                        },
                    )
                    .unwrap();
                assert!(
                    w.fp8_scales.is_some() && w.buf.bytes == n * k,
                    "{what}: not stored as FP8"
                );
                let (wq, sw) = quantize_rows(&wv, k);
                // The reference of `x @ w^T` for an input the GPU holds as `x` (rounded).
                let reference = |x: &[f32]| {
                    if m <= FP8_GEMV_MAX_TOKENS {
                        return weight_only_mm(x, &wq, &sw, WeightScales::PerChannel, k);
                    }
                    let (xq, sx) = quantize_per_token(x, k);
                    scaled_mm(&xq, &sx, &wq, &sw, k)
                };
                let poisoned = |rows: usize, cols: usize| {
                    be.activation_from_host(rows, cols, &vec![f32::NAN; rows * cols])
                        .unwrap()
                };
                let xs = round(fill(m * k, seed + 2, 2.0));
                let x = be.activation_from_host(m, k, &xs).unwrap();
                let mm = reference(&xs);

                let bias_v = round(fill(n, seed + 3, 0.5));
                let bias = be
                    .upload_vector(
                        "bias",
                        HostTensor {
                            shape: vec![n],
                            data: HostData::F32(bias_v.clone()),
                        },
                    )
                    .unwrap();
                let mut out = poisoned(m, n);
                be.linear(&x, &w, Some(&bias), &mut out).unwrap();
                let want: Vec<f32> = mm
                    .iter()
                    .enumerate()
                    .map(|(i, v)| v + bias_v[i % n])
                    .collect();
                check(&format!("{what} linear + bias"), &out, &want);

                let res_v = round(fill(m * n, seed + 4, 1.0));
                let mut residual = be.activation_from_host(m, n, &res_v).unwrap();
                let mut scratch = poisoned(m, n);
                be.linear_add(&x, &w, &mut residual, &mut scratch).unwrap();
                let want: Vec<f32> = mm.iter().zip(&res_v).map(|(a, b)| a + b).collect();
                check(&format!("{what} linear_add"), &residual, &want);

                // norm_linear: the GPU's normed rows (rounded as it stores them) are the input.
                let norm_v = round(
                    fill(k, seed + 5, 1.0)
                        .into_iter()
                        .map(|v| 1.0 + 0.5 * v)
                        .collect(),
                );
                let norm = be
                    .upload_vector(
                        "norm",
                        HostTensor {
                            shape: vec![k],
                            data: HostData::F32(norm_v.clone()),
                        },
                    )
                    .unwrap();
                let mut normed = poisoned(m, k);
                let mut out = poisoned(m, n);
                be.norm_linear(&x, &norm, 1e-5, &mut normed, &w, None, &mut out)
                    .unwrap();
                // The input: rmsnorm(x) * w rounded to the element type (as rms_norm stores it;
                // batch 1 computes it inside the GEMV and stores no normed rows).
                let normed_host = round(rvllm_kernels::reference::rms_norm(&xs, &norm_v, 1e-5));
                check(
                    &format!("{what} norm_linear"),
                    &out,
                    &reference(&normed_host),
                );

                // silu_mul_linear_add: silu(gate) * up rounded to the element type (as
                // silu_and_mul stores it) is the input; batch 1 computes it inside the GEMV
                // and stores no activation.
                let gate_up_v = round(fill(m * 2 * k, seed + 6, 3.0));
                let gate_up = be.activation_from_host(m, 2 * k, &gate_up_v).unwrap();
                let mut act = poisoned(m, k);
                let mut residual = be.activation_from_host(m, n, &res_v).unwrap();
                let mut scratch = poisoned(m, n);
                be.silu_mul_linear_add(&gate_up, &w, &mut act, &mut residual, &mut scratch)
                    .unwrap();
                let act_host = round(rvllm_kernels::reference::silu_and_mul(&gate_up_v, k));
                let want: Vec<f32> = reference(&act_host)
                    .iter()
                    .zip(&res_v)
                    .map(|(a, b)| a + b)
                    .collect();
                check(&format!("{what} silu_mul_linear_add"), &residual, &want);
            }
        }
    }
}
