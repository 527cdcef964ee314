//! `Backend` on the GPU: bf16 or f16 activations, weights and KV cache (`GpuDtype`), cuBLAS
//! GEMMs, rvllm-kernels for the rest. Step metadata goes up in one copy into buffers allocated
//! once, so that every step of a given shape uses the same device addresses (what CUDA graphs
//! need).
use std::ops::Range;
use std::sync::{Arc, Mutex};

use anyhow::{bail, ensure, Result};
use cudarc::driver::sys::CUdeviceptr;

use super::device::{DevBuf, Gpu, PinnedPair};
use super::elem::{bits_of, value_of, GpuDtype, Kernel, ELEM_BYTES};
use super::kernels;
use crate::backend::gpu_support::{check_gpu_decoder, gpu_layout};
use crate::backend::{
    Activation, AttentionLayout, Backend, ForwardBatch, KvCacheShape, MlpActivation,
};
use crate::types::{DecoderSpec, HostData, HostTensor};
use rvllm_kernels::{args, decode_smem, gemv_bulk::GemvBulk, KernelArgs};

#[macro_use]
mod attention_args;
mod dummy;
mod fp8;
#[cfg(test)]
mod gemma_fusion_tests;
pub(super) mod kv_fp8;
mod upload;
mod windowed_attention;
pub(super) mod windowed_decode;

use attention_args::DecodeInputs;
use kv_fp8::KvElems;

/// How decode attention splits contexts for a batch of `num_decode` sequences: the target
/// number of partitions per sequence (from the batch size alone, so that one CUDA graph serves
/// every context; enough blocks for about two per SM) and the grid depth. Each block streams
/// every depth-th partition of its sequence and merges them (attention_decode.cu), so any
/// depth covers any context: a graph (`max_context` None) takes the target, an eager step no
/// more than its longest context has partitions of 64 tokens.
pub fn decode_split(
    num_decode: usize,
    num_kv_heads: usize,
    sm_count: usize,
    max_context: Option<usize>,
) -> (usize, usize) {
    let blocks_per_partition = num_decode.max(1) * num_kv_heads.max(1);
    let target = (2 * sm_count.max(1))
        .div_ceil(blocks_per_partition)
        .clamp(1, MAX_DECODE_DEPTH);
    let depth = match max_context {
        Some(ctx) => target.min(ctx.div_ceil(64)).max(1),
        None => target,
    };
    (target, depth)
}

/// The decode reduce combines at most this many partials (kMaxReducePartitions).
const MAX_DECODE_DEPTH: usize = 2048;

pub struct CudaTensor {
    buf: DevBuf,
    rows: usize,
    cols: usize,
    cap: usize,
}

impl CudaTensor {
    pub fn ptr(&self) -> CUdeviceptr {
        self.buf.ptr
    }
}

impl Activation for CudaTensor {
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
    fn capacity_rows(&self) -> usize {
        self.cap
    }
    fn set_rows(&mut self, rows: usize) -> Result<()> {
        ensure!(
            rows <= self.cap,
            "GPU activation holds {} rows of {}, asked for {rows}",
            self.cap,
            self.cols
        );
        self.rows = rows;
        Ok(())
    }
}

pub struct CudaWeight {
    pub buf: DevBuf,
    pub rows: usize,
    pub cols: usize,
    /// `--quantization fp8`: `buf` holds E4M3 codes and this one f32 scale a row (fp8.rs).
    pub fp8_scales: Option<DevBuf>,
}

/// A 1-D parameter, kept in the compute type (norm weights, biases) and f32 (RoPE
/// frequencies).
pub struct CudaVector {
    pub elem: DevBuf,
    pub f32: DevBuf,
    pub len: usize,
}

/// All layers' K (and V) in one allocation each: layer `l` starts at `l * layer_bytes`.
pub struct CudaKvCache {
    pub shape: KvCacheShape,
    pub k: DevBuf,
    pub v: DevBuf,
    /// E4M3 codes (one byte an element) with these per-layer (k, v) scales (kv_fp8.rs);
    /// None: the compute type.
    pub fp8_scales: Option<Vec<(f32, f32)>>,
}

impl CudaKvCache {
    fn layer_bytes(&self) -> usize {
        self.shape.layer_elems()
            * if self.fp8_scales.is_some() {
                1
            } else {
                ELEM_BYTES
            }
    }
    pub fn k_layer(&self, l: usize) -> CUdeviceptr {
        self.k.ptr + (l * self.layer_bytes()) as u64
    }
    pub fn v_layer(&self, l: usize) -> CUdeviceptr {
        self.v.ptr + (l * self.layer_bytes()) as u64
    }
}

/// Capacities of the persistent step buffers.
#[derive(Debug, Clone, Copy)]
pub struct StepLimits {
    pub max_tokens: usize,
    pub max_seqs: usize,
    pub max_blocks_per_seq: usize,
}

/// Offsets (in i32 elements) of each metadata array inside the one step buffer.
#[derive(Debug, Clone, Copy)]
struct MetaLayout {
    ids: usize,
    positions: usize,
    slots: usize,
    cu_seqlens: usize,
    context_lens: usize,
    logits_rows: usize,
    /// Sequence s's block ids are compact[table_offsets[s]..table_offsets[s + 1]]: what goes
    /// up each step; expand_block_tables writes them into the strided `block_tables`.
    table_offsets: usize,
    compact_tables: usize,
    block_tables: usize,
    total: usize,
}

impl MetaLayout {
    fn new(l: &StepLimits) -> Self {
        let ids = 0;
        let positions = ids + l.max_tokens;
        let slots = positions + l.max_tokens;
        let cu_seqlens = slots + l.max_tokens;
        let context_lens = cu_seqlens + l.max_seqs + 1;
        let logits_rows = context_lens + l.max_seqs;
        let table_offsets = logits_rows + l.max_tokens;
        let compact_tables = table_offsets + l.max_seqs + 1;
        let block_tables = compact_tables + l.max_seqs * l.max_blocks_per_seq;
        let total = block_tables + l.max_seqs * l.max_blocks_per_seq;
        Self {
            ids,
            positions,
            slots,
            cu_seqlens,
            context_lens,
            logits_rows,
            table_offsets,
            compact_tables,
            block_tables,
            total,
        }
    }

    /// Elements a step must upload: everything up to the end of its `compact_ids` block ids.
    /// The strided tables are never uploaded (their row stride follows --max-model-len:
    /// 1,024 sequences x 8,192 blocks = 33 MB for Llama 3.1's 131,072 tokens).
    fn used(&self, compact_ids: usize) -> usize {
        (self.compact_tables + compact_ids).min(self.block_tables)
    }
}

/// A step's metadata on the device. Sequences that decode (one new token) come first in
/// every batch the CUDA runner builds; `num_decode` counts them.
pub struct CudaStepMeta {
    pub num_tokens: usize,
    pub num_seqs: usize,
    pub num_decode: usize,
    pub max_chunk: usize,
    pub max_context: usize,
    /// Decode attention's target partitions per sequence and grid depth (`decode_split`).
    pub decode_target: usize,
    pub decode_partitions: usize,
    base: CUdeviceptr,
    layout: MetaLayout,
    max_blocks_per_seq: usize,
}

impl CudaStepMeta {
    fn at(&self, offset: usize) -> CUdeviceptr {
        self.base + (offset * 4) as u64
    }
    pub fn ids(&self) -> CUdeviceptr {
        self.at(self.layout.ids)
    }
    pub fn logits_rows(&self) -> CUdeviceptr {
        self.at(self.layout.logits_rows)
    }
}

pub struct CudaBackend {
    pub gpu: Arc<Gpu>,
    limits: StepLimits,
    layout: MetaLayout,
    meta: DevBuf,
    /// Host staging of the step metadata, page-locked so that an upload never waits for the
    /// stream (lookahead scheduling prepares a step while the one before runs).
    staging: Mutex<PinnedPair>,
    /// Split-K scratch for decode attention: `scratch_partitions` (sequence, partition) pairs
    /// of every head.
    partial_out: DevBuf,
    partial_ml: DevBuf,
    /// Batch-1 decode attention through the compact kernel;
    /// `RVLLM_DECODE_COMPACT=0` uses the full kernel there too (a same-binary A/B).
    decode_compact: bool,
    scratch_partitions: usize,
    num_kv_heads: usize,
    /// A column of ones: adds a bias as a rank-1 GEMM update.
    ones: DevBuf,
    /// The element type of activations, weights and the KV cache.
    pub dtype: GpuDtype,
    /// Set while capturing a graph: decode attention's grid then takes the batch's target
    /// depth, which serves every context, not just the capture step's (the grid is frozen
    /// into the graph).
    pub capturing_graph: std::sync::atomic::AtomicBool,
    /// Batch-1 GEMVs through gemv_bulk (sm_90+; older GPUs use gemv.cu).
    gemv_bulk: bool,
    /// gemv_bulk streams the weights with an L2 evict-first policy (`RVLLM_GEMV_EVICT_FIRST=0`
    /// turns it off): measured +1.1 % batch-1 decode on an H200 (BENCHMARKS.md).
    gemv_evict_first: bool,
    /// Counts the bytes of weights uploaded while a model loads (`set_upload_progress`).
    upload_progress: Mutex<Option<indicatif::ProgressBar>>,
    /// `--quantization fp8`'s switch, cuBLASLt and activation buffers (fp8.rs).
    fp8: fp8::Fp8State,
    /// The mixture-of-experts routing arrays (`moe.rs`), allocated on first use.
    pub(super) moe_routing: super::moe::MoeRouting,
    /// The NCCL group this backend is a rank of (`nccl.rs`), set once before graphs.
    pub(super) nccl: std::sync::OnceLock<super::nccl::NcclComm>,
    /// `--kv-cache-dtype fp8`'s per-layer (k, v) scales, set once before the caches (kv_fp8.rs).
    kv_cache_fp8: std::sync::OnceLock<Vec<(f32, f32)>>,
}

// SAFETY: all device state is used from one thread at a time (the engine thread).
unsafe impl Send for CudaBackend {}

/// gemv_bulk's pipeline depth (the 6-stage build measured slower: BENCHMARKS.md).
const GEMV_STAGES: usize = 4;

impl CudaBackend {
    pub fn new(
        gpu: Arc<Gpu>,
        limits: StepLimits,
        num_heads: usize,
        num_kv_heads: usize,
        head_dim: usize,
        dtype: GpuDtype,
    ) -> Result<Self> {
        let layout = MetaLayout::new(&limits);
        let meta = gpu.alloc(layout.total * 4)?;
        // Zeroed once: steps upload only the block ids they use (MetaLayout::used), and
        // table entries past a sequence's ids keep earlier, valid values.
        gpu.memset_zero(meta.ptr, layout.total * 4)?;
        let sms = gpu.sm_count as usize;
        let scratch_partitions = (1..=limits.max_seqs)
            .map(|b| b * decode_split(b, num_kv_heads, sms, None).1)
            .max()
            .unwrap_or(1);
        let scratch = scratch_partitions * num_heads;
        let partial_out = gpu.alloc(scratch * head_dim * 4)?;
        let partial_ml = gpu.alloc(scratch * 2 * 4)?;
        let decode_compact = gpu.settings.decode_compact;
        let ones = gpu.alloc(limits.max_tokens * ELEM_BYTES)?;
        gpu.upload(ones.ptr, &vec![bits_of(1.0, dtype); limits.max_tokens])?;
        // The bulk copies need sm_90; its stages need Hopper's shared memory (sm_120 has
        // the instructions but 99 KiB a block).
        let gemv_bulk = gpu.compute_capability.0 >= 9
            && GemvBulk::fits_shared(gpu.smem_per_block_optin as usize);
        let gemv_evict_first = gpu.settings.gemv_evict_first;
        Ok(Self {
            gpu,
            limits,
            layout,
            meta,
            // The host fills only what goes up: everything before the strided tables.
            staging: Mutex::new(PinnedPair::new(layout.block_tables * 4)?),
            partial_out,
            partial_ml,
            decode_compact,
            scratch_partitions,
            num_kv_heads,
            ones,
            dtype,
            capturing_graph: std::sync::atomic::AtomicBool::new(false),
            upload_progress: Mutex::new(None),
            fp8: Default::default(),
            moe_routing: Default::default(),
            nccl: std::sync::OnceLock::new(),
            kv_cache_fp8: std::sync::OnceLock::new(),
            gemv_bulk,
            gemv_evict_first,
        })
    }

    /// Shows weight uploads on `bar` (bytes in the compute type) until `finish_upload_progress`.
    pub fn set_upload_progress(&self, bar: indicatif::ProgressBar) {
        *self
            .upload_progress
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(bar);
    }

    pub fn finish_upload_progress(&self) {
        if let Some(bar) = self
            .upload_progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            bar.finish_and_clear();
        }
    }

    fn count_upload(&self, bytes: usize) {
        if let Some(bar) = &*self
            .upload_progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
        {
            bar.inc(bytes as u64);
        }
    }

    pub fn limits(&self) -> StepLimits {
        self.limits
    }

    /// Host data in this backend's type, streamed through page-locked buffers (upload.rs).
    fn upload_host(&self, data: &HostData) -> Result<DevBuf> {
        self.upload_host_staged(data)
    }

    fn upload_slice<T: Copy>(&self, data: &[T]) -> Result<DevBuf> {
        let buf = self.gpu.alloc(std::mem::size_of_val(data))?;
        self.gpu.upload(buf.ptr, data)?;
        Ok(buf)
    }

    /// Launches the build of `kernel` for this backend's element type with `args`.
    pub(super) fn launch<A: KernelArgs>(
        &self,
        kernel: Kernel<A>,
        grid: (u32, u32, u32),
        block: u32,
        args: A,
    ) -> Result<()> {
        self.launch_smem(kernel, grid, block, 0, args)
    }

    /// `act(gate) * up` over `gate_up`'s two halves into `out`: the checks and the grid
    /// the gated activations share (each kernel has its own argument struct).
    fn gated_activation<A: KernelArgs>(
        &self,
        op: &str,
        kernel: Kernel<A>,
        gate_up: &CudaTensor,
        out: &mut CudaTensor,
        args: impl Fn(CUdeviceptr, CUdeviceptr, i32, i32) -> A,
    ) -> Result<()> {
        let inter = gate_up.cols / 2;
        ensure!(
            out.cols == inter,
            "{op}: output has {} columns, expected {inter}",
            out.cols
        );
        out.set_rows(gate_up.rows)?;
        // Rows go on the grid's y, which stops at 65,535: a mixture of experts' prefill has
        // tokens x top-k rows (131,072 for 16,384 tokens at top 8), so launch in chunks.
        const MAX_GRID_Y: usize = 65_535;
        let mut row = 0;
        while row < gate_up.rows {
            let rows = (gate_up.rows - row).min(MAX_GRID_Y);
            let a = args(
                out.buf.ptr + (row * inter * ELEM_BYTES) as CUdeviceptr,
                gate_up.buf.ptr + (row * 2 * inter * ELEM_BYTES) as CUdeviceptr,
                rows as i32,
                inter as i32,
            );
            self.launch(
                kernel,
                (inter.div_ceil(2048) as u32, rows as u32, 1),
                256,
                a,
            )?;
            row += rows;
        }
        Ok(())
    }

    pub(super) fn launch_smem<A: KernelArgs>(
        &self,
        kernel: Kernel<A>,
        grid: (u32, u32, u32),
        block: u32,
        shared_bytes: u32,
        mut args: A,
    ) -> Result<()> {
        let (module, name) = kernel.of(self.dtype);
        self.gpu.launch_params(
            module,
            name,
            grid,
            (block, 1, 1),
            shared_bytes,
            args.params(),
        )
    }

    /// RoPE and the cache write for the step's tokens from `first` on (the decode tokens come
    /// first; the fused path leaves them to decode attention), into a cache of the compute
    /// type or of FP8 codes (the same kernel's `kvfp8` build with the layer's scales).
    #[allow(clippy::too_many_arguments)]
    fn rope_tokens(
        &self,
        qkv: &mut CudaTensor,
        inv_freq: &CudaVector,
        layout: &AttentionLayout,
        step: &CudaStepMeta,
        cache: &mut CudaKvCache,
        layer: usize,
        first: usize,
    ) -> Result<()> {
        let t = step.num_tokens.saturating_sub(first) as i32;
        if t == 0 {
            return Ok(());
        }
        let elems = cache.layer_elems(layer)?;
        let q = qkv.buf.ptr + (first * layout.qkv_size() * ELEM_BYTES) as u64;
        let k = q + (layout.q_size() * ELEM_BYTES) as u64;
        let v = k + (layout.kv_size() * ELEM_BYTES) as u64;
        let stride = layout.qkv_size() as i32;
        let grid = (t as u32, 1, 1);
        let a = args::RopeAndCache {
            q,
            k,
            v,
            key_cache: cache.k_layer(layer),
            value_cache: cache.v_layer(layer),
            positions: step.at(step.layout.positions + first),
            slot_mapping: step.at(step.layout.slots + first),
            inv_freq: inv_freq.f32.ptr,
            num_tokens: t,
            num_heads: layout.num_heads as i32,
            num_kv_heads: layout.num_kv_heads as i32,
            head_dim: layout.head_dim as i32,
            q_stride: stride,
            k_stride: stride,
            v_stride: stride,
        };
        if layout.rotary_dim != layout.head_dim {
            ensure!(
                inv_freq.len * 2 == layout.rotary_dim,
                "partial rotary: {} inverse frequencies for rotary_dim {}",
                inv_freq.len,
                layout.rotary_dim
            );
            let p = rope_args!(a => RopePartialAndCache,
                rotary_dim: layout.rotary_dim as i32,
                attention_factor: layout.rope_scale,
            );
            return match elems {
                KvElems::Compute => self.launch(kernels::ROPE_PARTIAL_AND_CACHE, grid, 256, p),
                KvElems::Fp8 { k_scale, v_scale } => {
                    let p = rope_args!(p => RopePartialAndCacheKvfp8,
                        rotary_dim: p.rotary_dim,
                        attention_factor: p.attention_factor,
                        k_scale: k_scale,
                        v_scale: v_scale,
                    );
                    self.launch(kv_fp8::ROPE_PARTIAL_AND_CACHE_KV_FP8, grid, 256, p)
                }
            };
        }
        // `gpu_layout` moved a whole-head rotation's attention factor into the softmax scale.
        ensure!(
            layout.rope_scale == 1.0,
            "rope_and_cache takes no attention factor ({}); the layout must come from gpu_layout",
            layout.rope_scale
        );
        match elems {
            KvElems::Compute => self.launch(kernels::ROPE_AND_CACHE, grid, 256, a),
            KvElems::Fp8 { k_scale, v_scale } => {
                let a = rope_args!(a => RopeAndCacheKvfp8, k_scale: k_scale, v_scale: v_scale);
                self.launch(kv_fp8::ROPE_AND_CACHE_KV_FP8, grid, 256, a)
            }
        }
    }

    /// Decode attention for the step's leading one-token sequences. Layers the plain kernels
    /// cannot run (and every layer over an FP8 cache) go through the windowed builds
    /// (windowed_attention.rs).
    fn decode_attention(&self, d: &DecodeInputs, out: &mut CudaTensor) -> Result<()> {
        let DecodeInputs {
            layout,
            step,
            cache,
            ..
        } = *d;
        if step.num_decode == 0 {
            return Ok(());
        }
        if self.layer_attends_windowed(layout, cache) {
            return self.windowed_decode_attention(d, out);
        }
        let hd = layout.head_dim;
        let group = layout.num_heads / layout.num_kv_heads;
        // Batch 1 goes through the compact kernel: there a decode attention block runs once a
        // layer, and the full kernel's ~95 KB of code cost it ~4 us a layer in instruction
        // fetch (H200 block timeline: 12.8 vs 9.1 us; batch-1 decode +2.5-3 %). Larger batches
        // keep the full kernel, which streams long partitions faster (batch 8 and 16 with
        // 1,024-token prompts: 10 % longer runs with the compact one). The choice follows the
        // batch size alone, never the step's depth: an eager step of a short context has depth
        // 1 where its graph has the target, and both must run the same kernel to give the
        // same tokens (the two kernels round differently).
        let compact = self.runs_compact_decode(step, hd);
        let (kernel, gt) = Self::decode_kernel(hd, group, compact)?;
        // The full and compact kernels take the same arguments.
        let (full, grid) = self.step_decode_args(d, out, gt);
        match kernel {
            DecodeKernel::Full(kernel) => {
                self.launch_smem(kernel, grid, 128, decode_smem::full(gt), full)?
            }
            DecodeKernel::Compact(kernel) => {
                let smem = decode_smem::compact(hd, gt);
                let a = decode_args!(full => DecodeAttentionCompact);
                self.launch_smem(kernel, grid, 128, smem, a)?
            }
        }
        self.reduce_decode_partials(layout, step, out, None)
    }

    /// Prefill attention for the step's sequences after the decodes (chunks of prompts), as
    /// `decode_attention` chooses between the plain and the windowed builds.
    fn prefill_attention(
        &self,
        qkv: &CudaTensor,
        layout: &AttentionLayout,
        step: &CudaStepMeta,
        cache: &CudaKvCache,
        layer: usize,
        out: &mut CudaTensor,
    ) -> Result<()> {
        if step.num_seqs == step.num_decode {
            return Ok(());
        }
        if self.layer_attends_windowed(layout, cache) {
            return self.windowed_prefill_attention(qkv, layout, step, cache, layer, out);
        }
        let hd = layout.head_dim;
        let plain = kernels::PREFILL.iter().find(|p| p.0 == hd).map(|p| p.1);
        let windowed = kernels::PREFILL_WINDOWED
            .iter()
            .find(|p| p.0 == hd)
            .map(|p| p.1);
        let (a, grid) = Self::step_prefill_args(qkv, layout, step, cache, layer, out);
        match (plain, windowed) {
            (Some(kernel), _) => self.launch(kernel, grid, 128, a),
            // Head dims the plain builds lack (256) run the windowed build with no window and
            // no cap (layers with either attend in windowed_attention).
            (None, Some(kernel)) => {
                let a = prefill_args!(a => PrefillAttentionWindowed, window: 0, softcap: 0.0);
                self.launch(kernel, grid, 128, a)
            }
            (None, None) => {
                bail!("no prefill attention kernel for head_dim {hd} (built: 64, 80, 96, 128, 256)")
            }
        }
    }

    /// `logits[i] = cap * tanh(logits[i] / cap)` over `n` values in the compute type, in place
    /// (Gemma's `final_logit_softcapping`, on the LM head's output before the sampler).
    pub fn softcap_logits(&self, logits: CUdeviceptr, n: usize, cap: f32) -> Result<()> {
        ensure!(
            cap > 0.0 && cap.is_finite(),
            "final logit soft-cap {cap}: must be positive"
        );
        if n == 0 {
            return Ok(());
        }
        let blocks = n.div_ceil(256).min(4096) as u32;
        let args = args::Softcap {
            x: logits,
            cap,
            n: n as i64,
        };
        self.launch(kernels::SOFTCAP, (blocks, 1, 1), 256, args)
    }

    /// `y[1, n] = x[1, k] @ w[n, k]^T` with the GEMV kernel (k a multiple of 8).
    pub fn gemv_b1(&self, x: CUdeviceptr, w: &CudaWeight, y: CUdeviceptr) -> Result<()> {
        ensure!(
            w.fp8_scales.is_none(),
            "gemv_b1 reads the compute type, not FP8 codes"
        );
        if self.gemv_bulk(GemvInput::Plain, false, x, w, y, None)? {
            return Ok(());
        }
        let (m, n, k, split) = self.gemv_classic_shape(w);
        let grid = self.gemv_classic_grid(w);
        let w = w.buf.ptr;
        let args = args::Gemv {
            y,
            x,
            w,
            m,
            n,
            k,
            split,
        };
        self.launch(kernels::GEMV_B1, grid, 256, args)
    }

    /// Batch-1 GEMV through gemv_bulk (kernels/src/gemv_bulk.cu) when this GPU and `w` allow
    /// it; false (nothing launched) otherwise. `add`: y += the product (the residual add).
    fn gemv_bulk(
        &self,
        input: GemvInput,
        add: bool,
        x: CUdeviceptr,
        w: &CudaWeight,
        y: CUdeviceptr,
        norm: Option<(&CudaVector, f32)>,
    ) -> Result<bool> {
        let kernel = match (input, add) {
            (GemvInput::Plain, false) => kernels::GEMV_BULK_PLAIN,
            (GemvInput::Silu, false) => kernels::GEMV_BULK_SILU,
            (GemvInput::Norm, false) => kernels::GEMV_BULK_NORM,
            (GemvInput::Plain, true) => kernels::GEMV_BULK_ADD,
            (GemvInput::Silu, true) => kernels::GEMV_BULK_SILU_ADD,
            (GemvInput::Norm, true) => bail!("gemv_bulk has no norm + add variant"),
        };
        self.gemv_bulk_kernel(kernel, x, w, y, norm)
    }

    /// `gemv_bulk` with its kernel named (a `GemvBulk` variant).
    fn gemv_bulk_kernel(
        &self,
        kernel: Kernel<args::GemvBulk>,
        x: CUdeviceptr,
        w: &CudaWeight,
        y: CUdeviceptr,
        norm: Option<(&CudaVector, f32)>,
    ) -> Result<bool> {
        ensure!(
            w.fp8_scales.is_none(),
            "gemv_bulk reads the compute type, not FP8 codes"
        );
        let Some(g) = self
            .gemv_bulk
            .then(|| GemvBulk::for_k(w.cols, GEMV_STAGES))
            .flatten()
        else {
            return Ok(false);
        };
        let (norm_w, eps) = match norm {
            Some((v, eps)) => (v.elem.ptr, eps),
            None => (0, 0.0f32),
        };
        let (wp, n, k, rows) = (
            w.buf.ptr,
            w.rows as i32,
            w.cols as i32,
            g.rows_per_stage as i32,
        );
        let grid = (w.rows.div_ceil(g.rows_per_stage) as u32).min(self.gpu.sm_count);
        let evict = self.gemv_evict_first as i32;
        self.launch_smem(
            kernel,
            (grid, 1, 1),
            256,
            g.shared_bytes,
            args::GemvBulk {
                y,
                x,
                w: wp,
                n,
                k,
                rows_per_stage: rows,
                norm_w,
                eps,
                evict_first: evict,
            },
        )?;
        Ok(true)
    }

    /// The warp-per-row GEMV of gemv.cu (GPUs before sm_90, rows gemv_bulk cannot stage):
    /// (m, n, k, split) of a batch-1 product with `w`.
    fn gemv_classic_shape(&self, w: &CudaWeight) -> (i32, i32, i32, i32) {
        (1, w.rows as i32, w.cols as i32, GEMV_SPLIT)
    }

    /// The grid of gemv.cu's batch-1 kernels over `w`: 8 warps a block, `GEMV_SPLIT` a row.
    fn gemv_classic_grid(&self, w: &CudaWeight) -> (u32, u32, u32) {
        (w.rows.div_ceil(8 / GEMV_SPLIT as usize) as u32, 1, 1)
    }

    /// Whether a batch-1 GEMV over `w` fuses its neighbours (gemv_bulk applies).
    fn fuses_b1(&self, rows: usize, w: &CudaWeight) -> bool {
        rows == 1 && self.gemv_bulk && GemvBulk::for_k(w.cols, GEMV_STAGES).is_some()
    }

    /// Compute type → f32, `n` elements.
    pub fn to_f32(&self, out: CUdeviceptr, input: CUdeviceptr, n: usize) -> Result<()> {
        let n64 = n as i64;
        let blocks = n.div_ceil(256).min(4096) as u32;
        let args = args::ElemToF32 {
            out,
            r#in: input,
            n: n64,
        };
        self.launch(kernels::TO_F32, (blocks, 1, 1), 256, args)
    }

    /// The decode attention kernel (full or compact) for a head size and GQA group, and the
    /// query heads each of its blocks takes.
    /// Whether a step's decode attention runs the compact kernel: at batch 1 (by the batch
    /// size alone, as `decode_attention` explains) and head dims up to 128. At head 256 the
    /// compact build's 32-token chunks lose to the full kernel (H100, Gemma-3-12B batch 1:
    /// 110.4 against 113.5 tok/s; one local layer at 384 tokens 26.6 against 18.9 us), so its
    /// builds there serve the kernel benchmark only.
    pub(super) fn runs_compact_decode(&self, step: &CudaStepMeta, head_dim: usize) -> bool {
        self.decode_compact && step.num_decode == 1 && head_dim <= 128
    }

    fn decode_kernel(
        head_dim: usize,
        group: usize,
        compact: bool,
    ) -> Result<(DecodeKernel, usize)> {
        let gt = match group {
            1 => 1,
            2 => 2,
            3 | 4 => 4,
            _ => 8,
        };
        let Some(&(_, _, full, small)) = kernels::DECODE
            .iter()
            .find(|&&(hd, g, _, _)| hd == head_dim && g == gt)
        else {
            bail!("no decode attention kernel for head_dim {head_dim} (built: 64, 128, 256)");
        };
        let kernel = if compact {
            DecodeKernel::Compact(small)
        } else {
            DecodeKernel::Full(full)
        };
        Ok((kernel, gt))
    }
}

/// Warps per output row of gemv.cu's batch-1 kernels; measured best on the H100.
const GEMV_SPLIT: i32 = 4;

/// The decode attention kernel a step runs (`CudaBackend::decode_kernel`).
#[derive(Debug, Clone, Copy)]
enum DecodeKernel {
    Full(Kernel<args::DecodeAttention>),
    Compact(Kernel<args::DecodeAttentionCompact>),
}

impl DecodeKernel {
    #[cfg(test)]
    fn of(self, dtype: GpuDtype) -> (&'static str, &'static str) {
        match self {
            DecodeKernel::Full(k) => k.of(dtype),
            DecodeKernel::Compact(k) => k.of(dtype),
        }
    }
}

/// What a bulk GEMV reads as its input vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GemvInput {
    Plain,
    /// silu(gate) * up of a `[2k]` gate|up row.
    Silu,
    /// rms_norm(x) * weight.
    Norm,
}

/// The bulk GEMV that reads `activation(gate) * up` of a gate|up row (`add`: into y).
fn gated_bulk_kernel(activation: MlpActivation, add: bool) -> Kernel<args::GemvBulk> {
    match (activation, add) {
        (MlpActivation::Silu, false) => kernels::GEMV_BULK_SILU,
        (MlpActivation::Silu, true) => kernels::GEMV_BULK_SILU_ADD,
        (MlpActivation::GeluTanh, false) => kernels::GEMV_BULK_GELU,
        (MlpActivation::GeluTanh, true) => kernels::GEMV_BULK_GELU_ADD,
    }
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type Weight = CudaWeight;
    type Vector = CudaVector;
    type KvCache = CudaKvCache;
    type StepMeta = CudaStepMeta;
    const MOE_GATE_UP_SCRATCH: bool = false; // SiLU-and-mul is in moe_grouped_gemm's epilogue

    fn device_name(&self) -> String {
        format!(
            "cuda:0 ({}, sm_{}{})",
            self.gpu.name, self.gpu.compute_capability.0, self.gpu.compute_capability.1
        )
    }

    fn alloc_activation(&self, capacity_rows: usize, cols: usize) -> Result<CudaTensor> {
        let buf = self.gpu.alloc(capacity_rows.max(1) * cols * ELEM_BYTES)?;
        Ok(CudaTensor {
            buf,
            rows: 0,
            cols,
            cap: capacity_rows.max(1),
        })
    }

    fn activation_from_host(&self, rows: usize, cols: usize, data: &[f32]) -> Result<CudaTensor> {
        ensure!(
            data.len() == rows * cols,
            "activation data has {} values for {rows}x{cols}",
            data.len()
        );
        let host: Vec<u16> = data.iter().map(|&x| bits_of(x, self.dtype)).collect();
        let mut t = self.alloc_activation(rows, cols)?;
        self.gpu.upload(t.buf.ptr, &host)?;
        t.rows = rows;
        Ok(t)
    }

    fn to_host(&self, x: &CudaTensor, dst: &mut Vec<f32>) -> Result<()> {
        let mut tmp = vec![0u16; x.rows * x.cols];
        self.gpu.download(&mut tmp, x.buf.ptr)?;
        dst.clear();
        dst.extend(tmp.iter().map(|&v| value_of(v, self.dtype)));
        Ok(())
    }

    fn upload_dummy_weight(
        &self,
        name: &str,
        w: &crate::backend::dummy_weight::DummyWeight,
    ) -> Result<CudaWeight> {
        self.gpu.bind()?; // tensor parallelism loads every GPU's rank from one thread
        self.fill_dummy_weight(name, w)
    }

    fn upload_weight(&self, name: &str, t: HostTensor) -> Result<CudaWeight> {
        self.gpu.bind()?; // tensor parallelism loads every GPU's rank from one thread
        ensure!(
            t.shape.len() == 2,
            "weight `{name}` should be 2-D, has shape {:?}",
            t.shape
        );
        if let Some(w) = self.upload_fp8_weight(name, &t)? {
            return Ok(w);
        }
        let (rows, cols) = (t.shape[0], t.shape[1]);
        let buf = self.upload_host(&t.data)?;
        self.count_upload(buf.bytes);
        Ok(CudaWeight {
            buf,
            rows,
            cols,
            fp8_scales: None,
        })
    }

    fn upload_vector(&self, name: &str, t: HostTensor) -> Result<CudaVector> {
        self.gpu.bind()?; // tensor parallelism loads every GPU's rank from one thread
        ensure!(
            t.shape.len() == 1,
            "vector `{name}` should be 1-D, has shape {:?}",
            t.shape
        );
        let f = t.to_f32();
        self.count_upload(f.len() * ELEM_BYTES);
        let bits: Vec<u16> = f.iter().map(|&x| bits_of(x, self.dtype)).collect();
        Ok(CudaVector {
            elem: self.upload_slice(&bits)?,
            f32: self.upload_slice(&f)?,
            len: f.len(),
        })
    }

    fn alloc_kv_cache(&self, shape: KvCacheShape) -> Result<CudaKvCache> {
        let bytes = shape.num_layers * shape.layer_elems() * self.kv_cache_elem_bytes();
        let k = self.gpu.alloc(bytes)?;
        let v = self.gpu.alloc(bytes)?;
        self.gpu.memset_zero(k.ptr, bytes)?;
        self.gpu.memset_zero(v.ptr, bytes)?;
        let fp8_scales = self.kv_cache_fp8_scales();
        Ok(CudaKvCache {
            shape,
            k,
            v,
            fp8_scales,
        })
    }

    fn kv_cache_shape(&self, cache: &CudaKvCache) -> KvCacheShape {
        cache.shape
    }

    fn upload_step(&self, batch: &ForwardBatch) -> Result<CudaStepMeta> {
        let l = &self.limits;
        let (nt, ns) = (batch.num_tokens(), batch.seqs.len());
        ensure!(
            nt <= l.max_tokens,
            "step of {nt} tokens exceeds the GPU step buffers ({})",
            l.max_tokens
        );
        ensure!(
            ns <= l.max_seqs,
            "step of {ns} sequences exceeds the GPU step buffers ({})",
            l.max_seqs
        );
        ensure!(
            batch.logits_rows.len() <= l.max_tokens,
            "too many logits rows"
        );
        let lay = &self.layout;
        let mut staging = self.staging.lock().unwrap_or_else(|e| e.into_inner());
        let buf = staging.take_turn();
        let st: &mut [i32] = buf.slice_mut(lay.block_tables);
        for (i, t) in batch.token_ids.iter().enumerate() {
            st[lay.ids + i] = *t as i32;
            st[lay.positions + i] = batch.positions[i] as i32;
            st[lay.slots + i] = batch.slot_mapping[i] as i32;
        }
        let mut num_decode = 0;
        let mut decoding = true;
        let (mut max_chunk, mut max_context) = (0, 0);
        st[lay.cu_seqlens] = 0;
        st[lay.table_offsets] = 0;
        let mut compact = 0;
        for (i, s) in batch.seqs.iter().enumerate() {
            ensure!(
                s.block_table.len() <= l.max_blocks_per_seq,
                "sequence {i} has {} blocks, more than --max-model-len allows",
                s.block_table.len()
            );
            if decoding && s.num_tokens == 1 {
                num_decode += 1;
            } else {
                decoding = false;
                max_chunk = max_chunk.max(s.num_tokens);
            }
            max_context = max_context.max(s.context_len);
            st[lay.cu_seqlens + i + 1] = (s.token_offset + s.num_tokens) as i32;
            st[lay.context_lens + i] = s.context_len as i32;
            let at = lay.compact_tables + compact;
            for (j, b) in s.block_table.iter().enumerate() {
                st[at + j] = *b as i32;
            }
            compact += s.block_table.len();
            st[lay.table_offsets + i + 1] = compact as i32;
        }
        for (i, r) in batch.logits_rows.iter().enumerate() {
            st[lay.logits_rows + i] = *r as i32;
        }
        // One copy of the (fixed-layout) buffer keeps every array at a fixed address; only the
        // part this step uses goes across.
        buf.upload(&self.gpu, self.meta.ptr, lay.used(compact) * 4)?;
        if ns > 0 {
            let (tables, ids, offsets) = (
                self.meta.ptr + (lay.block_tables * 4) as u64,
                self.meta.ptr + (lay.compact_tables * 4) as u64,
                self.meta.ptr + (lay.table_offsets * 4) as u64,
            );
            let (n, stride) = (ns as i32, l.max_blocks_per_seq as i32);
            // Block ids are int32 in both element types: one build.
            self.gpu.launch_args(
                (ns as u32, 1, 1),
                (128, 1, 1),
                0,
                args::ExpandBlockTables {
                    tables,
                    compact: ids,
                    offsets,
                    num_seqs: n,
                    stride,
                },
            )?;
        }
        let capturing = self
            .capturing_graph
            .load(std::sync::atomic::Ordering::Relaxed);
        let sms = self.gpu.sm_count as usize;
        let (decode_target, decode_partitions) = decode_split(
            num_decode,
            self.num_kv_heads,
            sms,
            (!capturing).then_some(max_context),
        );
        ensure!(
            num_decode * decode_partitions <= self.scratch_partitions,
            "a decode step of {num_decode} sequences split {decode_partitions} ways exceeds the \
             attention scratch (sized for {} sequences); this is a bug",
            self.limits.max_seqs,
        );
        Ok(CudaStepMeta {
            num_tokens: nt,
            num_seqs: ns,
            num_decode,
            max_chunk,
            max_context,
            decode_target,
            decode_partitions,
            base: self.meta.ptr,
            layout: *lay,
            max_blocks_per_seq: l.max_blocks_per_seq,
        })
    }

    fn embedding(
        &self,
        table: &CudaWeight,
        step: &CudaStepMeta,
        out: &mut CudaTensor,
    ) -> Result<()> {
        out.set_rows(step.num_tokens)?;
        let (o, t, ids) = (out.buf.ptr, table.buf.ptr, step.ids());
        let (n, h, v) = (step.num_tokens as i32, table.cols as i32, table.rows as i32);
        if n == 0 {
            return Ok(());
        }
        self.launch(
            kernels::EMBEDDING,
            (n as u32, 1, 1),
            256,
            args::EmbeddingLookup {
                out: o,
                table: t,
                ids,
                num_tokens: n,
                hidden: h,
                vocab: v,
            },
        )
    }

    fn linear(
        &self,
        x: &CudaTensor,
        w: &CudaWeight,
        bias: Option<&CudaVector>,
        out: &mut CudaTensor,
    ) -> Result<()> {
        if w.fp8_scales.is_some() {
            return self.fp8_linear(x, w, bias, out);
        }
        ensure!(
            x.cols == w.cols,
            "linear: input has {} columns, weight expects {}",
            x.cols,
            w.cols
        );
        ensure!(
            out.cols == w.rows,
            "linear: output has {} columns, weight gives {}",
            out.cols,
            w.rows
        );
        out.set_rows(x.rows)?;
        if x.rows == 0 {
            return Ok(());
        }
        if x.rows == 1 && w.cols.is_multiple_of(8) {
            // Batch-1 decode streams every weight once: our GEMV reads them faster than cuBLAS.
            self.gemv_b1(x.buf.ptr, w, out.buf.ptr)?;
        } else {
            self.gpu.gemm(
                self.dtype,
                x.buf.ptr,
                w.buf.ptr,
                out.buf.ptr,
                x.rows,
                w.rows,
                w.cols,
                false,
            )?;
        }
        if let Some(b) = bias {
            ensure!(
                b.len == w.rows,
                "bias has {} values for {} outputs",
                b.len,
                w.rows
            );
            // out += ones[rows, 1] @ bias[out, 1]^T
            self.gpu.gemm(
                self.dtype,
                self.ones.ptr,
                b.elem.ptr,
                out.buf.ptr,
                x.rows,
                w.rows,
                1,
                true,
            )?;
        }
        Ok(())
    }

    fn rms_norm(
        &self,
        x: &CudaTensor,
        weight: &CudaVector,
        eps: f32,
        out: &mut CudaTensor,
    ) -> Result<()> {
        out.set_rows(x.rows)?;
        let (o, xp, wp, t, h) = (
            out.buf.ptr,
            x.buf.ptr,
            weight.elem.ptr,
            x.rows as i32,
            x.cols as i32,
        );
        if t == 0 {
            return Ok(());
        }
        self.launch(
            kernels::RMS_NORM,
            (t as u32, 1, 1),
            256,
            args::RmsNorm {
                out: o,
                x: xp,
                weight: wp,
                eps,
                num_tokens: t,
                hidden: h,
            },
        )
    }

    fn add_rms_norm(
        &self,
        residual: &mut CudaTensor,
        x: &CudaTensor,
        weight: &CudaVector,
        eps: f32,
        out: &mut CudaTensor,
    ) -> Result<()> {
        ensure!(
            residual.rows == x.rows,
            "add_rms_norm: residual has {} rows, x {}",
            residual.rows,
            x.rows
        );
        out.set_rows(x.rows)?;
        let (o, r, xp, wp) = (out.buf.ptr, residual.buf.ptr, x.buf.ptr, weight.elem.ptr);
        let (t, h) = (x.rows as i32, x.cols as i32);
        if t == 0 {
            return Ok(());
        }
        self.launch(
            kernels::FUSED_ADD_RMS_NORM,
            (t as u32, 1, 1),
            256,
            args::FusedAddRmsNorm {
                out: o,
                residual: r,
                x: xp,
                weight: wp,
                eps,
                num_tokens: t,
                hidden: h,
            },
        )
    }

    fn rms_norm_add(
        &self,
        x: &CudaTensor,
        weight: &CudaVector,
        eps: f32,
        _scratch: &mut CudaTensor,
        residual: &mut CudaTensor,
    ) -> Result<()> {
        crate::backend::check_same_shape("rms_norm_add", residual, x)?;
        let (t, h) = (x.rows as i32, x.cols as i32);
        if t == 0 {
            return Ok(());
        }
        let (r, xp, wp) = (residual.buf.ptr, x.buf.ptr, weight.elem.ptr);
        self.launch(
            kernels::RMS_NORM_ADD,
            (t as u32, 1, 1),
            256,
            args::RmsNormAdd {
                residual: r,
                x: xp,
                weight: wp,
                eps,
                num_tokens: t,
                hidden: h,
            },
        )
    }

    fn rope_and_write_kv(
        &self,
        qkv: &mut CudaTensor,
        inv_freq: &CudaVector,
        layout: &AttentionLayout,
        step: &CudaStepMeta,
        cache: &mut CudaKvCache,
        layer: usize,
    ) -> Result<()> {
        let layout = &gpu_layout(layout);
        self.rope_tokens(qkv, inv_freq, layout, step, cache, layer, 0)
    }

    fn attention(
        &self,
        qkv: &CudaTensor,
        layout: &AttentionLayout,
        step: &CudaStepMeta,
        cache: &CudaKvCache,
        layer: usize,
        out: &mut CudaTensor,
    ) -> Result<()> {
        let layout = &gpu_layout(layout);
        out.set_rows(step.num_tokens)?;
        let d = DecodeInputs {
            qkv,
            rope: None,
            layout,
            step,
            cache,
            layer,
        };
        self.decode_attention(&d, out)?;
        self.prefill_attention(qkv, layout, step, cache, layer, out)
    }

    /// The decode tokens' RoPE and cache write happen inside decode attention; the rotation
    /// kernel runs over the prefill tokens only.
    fn rope_attention(
        &self,
        qkv: &mut CudaTensor,
        inv_freq: &CudaVector,
        layout: &AttentionLayout,
        step: &CudaStepMeta,
        cache: &mut CudaKvCache,
        layer: usize,
        out: &mut CudaTensor,
    ) -> Result<()> {
        let layout = &gpu_layout(layout);
        out.set_rows(step.num_tokens)?;
        // Decode attention rotates whole heads only: with partial rotary the rotation kernel
        // takes every token, decode ones included, and decode attention rotates nothing (it
        // rewrites the same K/V).
        let whole_heads = layout.rotary_dim == layout.head_dim;
        let first_rotated = if whole_heads { step.num_decode } else { 0 };
        self.rope_tokens(qkv, inv_freq, layout, step, cache, layer, first_rotated)?;
        let d = DecodeInputs {
            qkv,
            rope: whole_heads.then_some(inv_freq),
            layout,
            step,
            cache,
            layer,
        };
        self.decode_attention(&d, out)?;
        self.prefill_attention(qkv, layout, step, cache, layer, out)
    }

    fn check_decoder(&self, spec: &DecoderSpec, context_len: usize) -> Result<()> {
        check_gpu_decoder(spec, context_len)
    }

    fn qk_norm(
        &self,
        qkv: &mut CudaTensor,
        q_weight: &CudaVector,
        k_weight: &CudaVector,
        eps: f32,
        layout: &AttentionLayout,
    ) -> Result<()> {
        ensure!(
            qkv.cols == layout.qkv_size(),
            "qk_norm: qkv has {} columns, the layout wants {}",
            qkv.cols,
            layout.qkv_size()
        );
        ensure!(
            q_weight.len == layout.head_dim && k_weight.len == layout.head_dim,
            "qk_norm: norm weights of {} and {} values for head_dim {}",
            q_weight.len,
            k_weight.len,
            layout.head_dim
        );
        let t = qkv.rows as i32;
        if t == 0 {
            return Ok(());
        }
        // A warp a head, 4 heads a block.
        let heads = layout.num_heads + layout.num_kv_heads;
        let p = qkv.buf.ptr;
        self.launch(
            kernels::HEAD_RMS_NORM,
            (t as u32, heads.div_ceil(4) as u32, 1),
            128,
            args::HeadRmsNorm {
                out: p,
                x: p,
                q_weight: q_weight.elem.ptr,
                k_weight: k_weight.elem.ptr,
                eps,
                num_tokens: t,
                row_stride: qkv.cols as i32,
                num_q_heads: layout.num_heads as i32,
                num_kv_heads: layout.num_kv_heads as i32,
                head_dim: layout.head_dim as i32,
            },
        )
    }

    fn silu_and_mul(&self, gate_up: &CudaTensor, out: &mut CudaTensor) -> Result<()> {
        self.gated_activation(
            "silu_and_mul",
            kernels::SILU_AND_MUL,
            gate_up,
            out,
            |o, i, t, n| args::SiluAndMul {
                out: o,
                r#in: i,
                num_tokens: t,
                inter: n,
            },
        )
    }

    fn gelu_tanh_and_mul(&self, gate_up: &CudaTensor, out: &mut CudaTensor) -> Result<()> {
        self.gated_activation(
            "gelu_tanh_and_mul",
            kernels::GELU_TANH_AND_MUL,
            gate_up,
            out,
            |o, i, t, n| args::GeluTanhAndMul {
                out: o,
                r#in: i,
                num_tokens: t,
                inter: n,
            },
        )
    }

    fn moe(
        &self,
        x: &CudaTensor,
        router: &CudaWeight,
        gate_up: &CudaWeight,
        down: &CudaWeight,
        layout: &crate::backend::MoeLayout,
        scratch: &mut crate::backend::MoeScratch<CudaTensor>,
        out: &mut CudaTensor,
    ) -> Result<()> {
        self.moe_impl(x, router, gate_up, down, layout, scratch, out, None)
    }

    fn moe_add(
        &self,
        x: &CudaTensor,
        router: &CudaWeight,
        gate_up: &CudaWeight,
        down: &CudaWeight,
        layout: &crate::backend::MoeLayout,
        scratch: &mut crate::backend::MoeScratch<CudaTensor>,
        residual: &mut CudaTensor,
        out: &mut CudaTensor,
    ) -> Result<()> {
        self.moe_impl(
            x,
            router,
            gate_up,
            down,
            layout,
            scratch,
            out,
            Some(residual),
        )
    }

    fn scale(&self, x: &mut CudaTensor, factor: f32) -> Result<()> {
        let n = (x.rows * x.cols) as i64;
        if n == 0 {
            return Ok(());
        }
        let blocks = (n as usize).div_ceil(256).min(4096) as u32;
        let args = args::Scale {
            x: x.buf.ptr,
            factor,
            n,
        };
        self.launch(kernels::SCALE, (blocks, 1, 1), 256, args)
    }

    fn gated_linear(
        &self,
        activation: MlpActivation,
        gate_up: &CudaTensor,
        down: &CudaWeight,
        act: &mut CudaTensor,
        out: &mut CudaTensor,
    ) -> Result<()> {
        if down.fp8_scales.is_some() {
            if activation == MlpActivation::Silu {
                return self.fp8_silu_mul_linear(gate_up, down, act, out);
            }
            // The FP8 GEMVs fuse SiLU only: GeGLU is stored, then the FP8 linear reads it.
            self.act_and_mul(activation, gate_up, act)?;
            return self.linear(act, down, None, out);
        }
        let inter = gate_up.cols / 2;
        if gate_up.rows != 1 || inter != down.cols || !inter.is_multiple_of(8) {
            self.act_and_mul(activation, gate_up, act)?;
            return self.linear(act, down, None, out);
        }
        ensure!(
            out.cols == down.rows,
            "gated_linear: output has {} columns, weight gives {}",
            out.cols,
            down.rows
        );
        out.set_rows(1)?;
        // Batch-1 decode: the activation-and-mul happens inside the GEMV's input loads.
        let (x, y) = (gate_up.buf.ptr, out.buf.ptr);
        if self.gemv_bulk_kernel(gated_bulk_kernel(activation, false), x, down, y, None)? {
            return Ok(());
        }
        let (m, n, k, split) = self.gemv_classic_shape(down);
        let grid = self.gemv_classic_grid(down);
        let w = down.buf.ptr;
        match activation {
            MlpActivation::Silu => {
                let args = args::GemvSiluB1 {
                    y,
                    gate_up: x,
                    w,
                    m,
                    n,
                    k,
                    split,
                };
                self.launch(kernels::GEMV_SILU_B1, grid, 256, args)
            }
            MlpActivation::GeluTanh => {
                let args = args::GemvGeluB1 {
                    y,
                    gate_up: x,
                    w,
                    m,
                    n,
                    k,
                    split,
                };
                self.launch(kernels::GEMV_GELU_B1, grid, 256, args)
            }
        }
    }

    fn in_tp_group(&self) -> bool {
        self.nccl().is_some()
    }

    fn all_reduce_sum(&self, x: &mut CudaTensor) -> Result<()> {
        self.nccl_all_reduce_sum(x)
    }

    fn add_inplace(&self, acc: &mut CudaTensor, x: &CudaTensor) -> Result<()> {
        crate::backend::check_same_shape("add", acc, x)?;
        let n = (x.rows * x.cols) as i64;
        if n == 0 {
            return Ok(());
        }
        let (o, a, b) = (acc.buf.ptr, acc.buf.ptr, x.buf.ptr);
        let blocks = (n as usize).div_ceil(256).min(4096) as u32;
        let args = args::Add { out: o, a, b, n };
        self.launch(kernels::ADD, (blocks, 1, 1), 256, args)
    }

    fn norm_linear(
        &self,
        x: &CudaTensor,
        norm_weight: &CudaVector,
        eps: f32,
        normed: &mut CudaTensor,
        w: &CudaWeight,
        bias: Option<&CudaVector>,
        out: &mut CudaTensor,
    ) -> Result<()> {
        if w.fp8_scales.is_some() {
            return self.fp8_norm_linear(x, norm_weight, eps, normed, w, bias, out);
        }
        if bias.is_none() && x.cols == w.cols && out.cols == w.rows && self.fuses_b1(x.rows, w) {
            out.set_rows(1)?;
            let norm = Some((norm_weight, eps));
            if self.gemv_bulk(GemvInput::Norm, false, x.buf.ptr, w, out.buf.ptr, norm)? {
                return Ok(());
            }
        }
        self.rms_norm(x, norm_weight, eps, normed)?;
        self.linear(normed, w, bias, out)
    }

    fn linear_add(
        &self,
        x: &CudaTensor,
        w: &CudaWeight,
        residual: &mut CudaTensor,
        scratch: &mut CudaTensor,
    ) -> Result<()> {
        if w.fp8_scales.is_some() {
            return self.fp8_linear_add(x, w, residual, scratch);
        }
        ensure!(
            x.cols == w.cols && residual.cols == w.rows && residual.rows == x.rows,
            "linear_add: input {}x{}, weight {}x{}, residual {}x{}",
            x.rows,
            x.cols,
            w.rows,
            w.cols,
            residual.rows,
            residual.cols
        );
        if x.rows == 0 {
            return Ok(());
        }
        if self.fuses_b1(x.rows, w)
            && self.gemv_bulk(GemvInput::Plain, true, x.buf.ptr, w, residual.buf.ptr, None)?
        {
            return Ok(());
        }
        if x.rows == 1 && w.cols.is_multiple_of(8) {
            // The classic GEMV has no add: product, then the elementwise add.
            self.linear(x, w, None, scratch)?;
            return self.add_inplace(residual, scratch);
        }
        // cuBLAS accumulates into the residual (beta = 1): one rounding, no scratch pass.
        self.gpu.gemm(
            self.dtype,
            x.buf.ptr,
            w.buf.ptr,
            residual.buf.ptr,
            x.rows,
            w.rows,
            w.cols,
            true,
        )
    }

    fn gated_linear_add(
        &self,
        activation: MlpActivation,
        gate_up: &CudaTensor,
        down: &CudaWeight,
        act: &mut CudaTensor,
        residual: &mut CudaTensor,
        scratch: &mut CudaTensor,
    ) -> Result<()> {
        if down.fp8_scales.is_some() {
            if activation == MlpActivation::Silu {
                return self.fp8_silu_mul_linear_add(gate_up, down, act, residual, scratch);
            }
            // As in gated_linear: GeGLU stored, then the FP8 linear with its add.
            self.act_and_mul(activation, gate_up, act)?;
            return self.linear_add(act, down, residual, scratch);
        }
        let inter = gate_up.cols / 2;
        ensure!(
            inter == down.cols && residual.cols == down.rows && residual.rows == gate_up.rows,
            "gated_linear_add: gate_up {}x{}, weight {}x{}, residual {}x{}",
            gate_up.rows,
            gate_up.cols,
            down.rows,
            down.cols,
            residual.rows,
            residual.cols
        );
        if self.fuses_b1(gate_up.rows, down) {
            let (x, y) = (gate_up.buf.ptr, residual.buf.ptr);
            let kernel = gated_bulk_kernel(activation, true);
            if self.gemv_bulk_kernel(kernel, x, down, y, None)? {
                return Ok(());
            }
        }
        if gate_up.rows == 1 {
            // The classic GEMV with the activation fused, then the add.
            self.gated_linear(activation, gate_up, down, act, scratch)?;
            return self.add_inplace(residual, scratch);
        }
        self.act_and_mul(activation, gate_up, act)?;
        self.linear_add(act, down, residual, scratch)
    }

    fn gather_rows(
        &self,
        x: &CudaTensor,
        step: &CudaStepMeta,
        range: Range<usize>,
        out: &mut CudaTensor,
    ) -> Result<()> {
        let n = range.len();
        out.set_rows(n)?;
        if n == 0 {
            return Ok(());
        }
        let (o, i) = (out.buf.ptr, x.buf.ptr);
        let rows = step.logits_rows() + (range.start * 4) as u64;
        let (nr, cols) = (n as i32, x.cols as i32);
        self.launch(
            kernels::GATHER_ROWS,
            (n as u32, 1, 1),
            256,
            args::GatherRows {
                out: o,
                r#in: i,
                rows,
                num_rows: nr,
                cols,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::{decode_split, GemvBulk, MetaLayout, StepLimits};

    #[test]
    fn steps_upload_their_block_ids_not_the_strided_tables() {
        let limits = StepLimits {
            max_tokens: 8192,
            max_seqs: 256,
            max_blocks_per_seq: 8192,
        };
        let lay = MetaLayout::new(&limits);
        assert_eq!(lay.total, lay.block_tables + 256 * 8192);
        // A step uploads up to the end of its block ids, never the strided tables.
        assert_eq!(lay.used(0), lay.compact_tables);
        assert_eq!(lay.used(40 * 256), lay.compact_tables + 40 * 256);
        assert_eq!(lay.used(256 * 8192), lay.block_tables);
        // Every other array precedes the ids, so a step always uploads those whole.
        for start in [
            lay.ids,
            lay.positions,
            lay.slots,
            lay.cu_seqlens,
            lay.context_lens,
            lay.table_offsets,
        ] {
            assert!(start < lay.compact_tables);
        }
        assert!(lay.logits_rows + limits.max_tokens <= lay.table_offsets);
        assert_eq!(lay.table_offsets + limits.max_seqs + 1, lay.compact_tables);
    }

    #[test]
    fn decode_split_targets_two_blocks_per_sm_whatever_the_context() {
        // Batch 1, 8 KV heads, 132 SMs: 33 partitions wanted, at most ctx / 64 blocks deep.
        assert_eq!(decode_split(1, 8, 132, Some(2048)), (33, 32));
        assert_eq!(decode_split(1, 8, 132, Some(384)), (33, 6));
        // Large batches: one block a sequence, which streams every partition.
        assert_eq!(decode_split(512, 8, 132, Some(511)), (1, 1));
        assert_eq!(decode_split(512, 8, 132, Some(1024)), (1, 1));
        assert_eq!(decode_split(0, 8, 132, Some(0)), (33, 1));
        // A graph takes the target: long contexts no longer deepen the grid (or the scratch).
        assert_eq!(decode_split(64, 8, 132, None), (1, 1));
        assert_eq!(decode_split(1, 8, 132, None), (33, 33));
        // One KV head on a large GPU: the reduce's limit caps the depth.
        assert_eq!(decode_split(1, 1, 2000, None).1, 2048);
    }

    #[test]
    fn decode_kernels_cover_the_built_head_sizes_and_groups() {
        use super::{CudaBackend, GpuDtype};
        // Llama-3.1-8B: group 4, head dim 128; groups of 3 take the 4-head tile, 5+ the 8-head.
        let (full, gt) = CudaBackend::decode_kernel(128, 4, false).unwrap();
        assert_eq!(gt, 4);
        assert_eq!(
            full.of(GpuDtype::Bf16),
            ("attention_decode", "paged_attention_decode_hd128_g4")
        );
        assert_eq!(
            full.of(GpuDtype::F16),
            (
                "attention_decode_f16",
                "paged_attention_decode_hd128_g4_f16"
            )
        );
        let (compact, _) = CudaBackend::decode_kernel(128, 4, true).unwrap();
        assert_eq!(
            compact.of(GpuDtype::F16).1,
            "paged_attention_decode_compact_hd128_g4_f16"
        );
        assert_eq!(CudaBackend::decode_kernel(64, 3, true).unwrap().1, 4);
        assert_eq!(CudaBackend::decode_kernel(64, 7, false).unwrap().1, 8);
        let e = CudaBackend::decode_kernel(96, 1, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("head_dim 96") && e.contains("64, 128, 256"),
            "{e}"
        );
        // Head dim 256 (Gemma 3): batch 1 runs its compact build too.
        let (k256, gt) = CudaBackend::decode_kernel(256, 2, true).unwrap();
        assert_eq!(gt, 2);
        assert_eq!(
            k256.of(GpuDtype::Bf16),
            (
                "attention_decode",
                "paged_attention_decode_compact_hd256_g2"
            )
        );
        let (full256, _) = CudaBackend::decode_kernel(256, 2, false).unwrap();
        assert_eq!(
            full256.of(GpuDtype::Bf16).1,
            "paged_attention_decode_hd256_g2"
        );
    }

    #[test]
    fn gemv_bulk_stages_hold_whole_rows() {
        // Llama-3.1-8B: hidden 4096 (8 KiB rows, 4 a stage), intermediate 14336 (one row).
        assert_eq!(GemvBulk::for_k(4096, 4).unwrap().rows_per_stage, 4);
        assert_eq!(GemvBulk::for_k(14336, 4).unwrap().rows_per_stage, 1);
        assert_eq!(GemvBulk::for_k(576, 4).unwrap().rows_per_stage, 8);
        // Shared memory: 4 stages of 32 KiB, x, 5 barriers; within Hopper's 227 KiB.
        let g = GemvBulk::for_k(14336, 4).unwrap();
        assert_eq!(g.shared_bytes, 4 * 32768 + 28672 + 40);
        // Six stages still fit with the longest row a stage holds (k = 16384).
        let g = GemvBulk::for_k(16384, 6).unwrap();
        assert_eq!(g.shared_bytes, 6 * 32768 + 32768 + 56);
        // With the kernel's static shared memory, within Hopper's 227 KiB.
        assert!(g.shared_bytes as usize + 2176 <= 227 * 1024);
        // Rows longer than a stage, or k not a multiple of 8: the classic GEMV.
        assert_eq!(GemvBulk::for_k(16392, 4), None);
        assert_eq!(GemvBulk::for_k(4095, 4), None);
        assert_eq!(GemvBulk::for_k(0, 4), None);
        // The GPUs that take them: H100/H200 and B200 (227 KiB a block), not the RTX
        // Blackwells, Ada or the smaller Amperes (99 KiB).
        assert!(GemvBulk::fits_shared(232_448));
        assert!(!GemvBulk::fits_shared(101_376));
    }
}
