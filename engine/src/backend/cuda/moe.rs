//! `Backend::moe` on the GPU: the fused mixture-of-experts path of kernels/src/moe.cu, the
//! same function as the CPU backend's (backend/cpu/moe.rs).
//!
//! router GEMM (cuBLAS, or the batch-1 GEMV) -> `moe_topk_softmax` (f32 softmax, top k in
//! ascending expert order, renormalised when the layout says so) -> `moe_align` (pairs sorted
//! by expert: offsets, sorted pairs, each pair's slot, the grouped GEMM's tile map) ->
//! `moe_gather` -> `moe_grouped_gemm` gated (gate/up, `[E, 2I, H]`, SiLU-and-mul in its
//! epilogue) -> `moe_grouped_gemm` (down, `[E, H, I]`) -> `moe_unpermute` (each token's rows,
//! weighted, summed in expert order).
//!
//! No step reads the routing on the host: every grid is a function of the batch size and the
//! layout alone. The grouped GEMM (kernels/src/moe_gemm.cu, tensor cores) runs a block a tile
//! of up to 64 of an expert's rows by 64 output columns (32 gated), the tiles listed on the
//! device by `moe_align` (its grid height bounds every routing; unused entries return at once),
//! so decode steps capture into CUDA graphs and batch-1 decode streams only the selected
//! experts' weights, each once. Prefills run the same kernels (no stream sync, one launch a
//! projection).
//!
//! Steps of one token (`MOE_SMALL_PATH_MAX_TOKENS`), with rows of whole 16-byte chunks, take
//! the small-batch decode path instead (kernels/src/moe_small.cu): after the router GEMM,
//! `moe_small_gate_up` (the routing in every block, then a GEMV of each distinct selected
//! expert's gate and up rows with SiLU-and-mul, `act` in pair order) and `moe_small_down` (each
//! output element its token's weighted sum over its experts): two launches where the path above
//! takes six, the same routing and the same function.
use std::sync::Mutex;

use anyhow::{ensure, Result};
use cudarc::driver::sys::CUdeviceptr;

use super::backend::{CudaBackend, CudaTensor, CudaWeight};
use super::device::DevBuf;
use super::elem::{kernel, Kernel, NamedKernel};
use crate::backend::{Activation, Backend, MoeLayout, MoeScratch};
use rvllm_kernels::args;
use rvllm_kernels::reference::{
    moe_gemm_tile_slots, moe_grouped_gemm_launch, moe_small_down_launch, moe_small_fits,
    moe_small_gate_up_launch,
};

pub const MOE_TOPK_SOFTMAX: Kernel<args::MoeTopkSoftmax> = kernel!(
    args::MoeTopkSoftmax,
    "moe",
    "moe_topk_softmax_bf16",
    "moe_topk_softmax_f16"
);
pub const MOE_ALIGN: Kernel<args::MoeAlign> =
    kernel!(args::MoeAlign, "moe", "moe_align_bf16", "moe_align_f16");
pub const MOE_GATHER: Kernel<args::MoeGather> =
    kernel!(args::MoeGather, "moe", "moe_gather_bf16", "moe_gather_f16");
pub const MOE_GROUPED_GEMM: Kernel<args::MoeGroupedGemm> = kernel!(
    args::MoeGroupedGemm,
    "moe_gemm",
    "moe_grouped_gemm_bf16",
    "moe_grouped_gemm_f16"
);
pub const MOE_UNPERMUTE: Kernel<args::MoeUnpermute> = kernel!(
    args::MoeUnpermute,
    "moe",
    "moe_unpermute_bf16",
    "moe_unpermute_f16"
);
/// Most tokens a step sends down the small-batch path. Its kernels take up to
/// `MOE_SMALL_MAX_TOKENS` (8), but the Qwen3-30B-A3B layer on an H100 (BENCHMARKS.md,
/// 2026-12-07, sixth session) ran 1.38x faster there than the grouped GEMM at one token, level
/// at two and slower from four (0.81x; 0.62x at eight): past one token the tensor cores win.
const MOE_SMALL_PATH_MAX_TOKENS: usize = 1;

pub const MOE_SMALL_GATE_UP: Kernel<args::MoeSmallGateUp> = kernel!(
    args::MoeSmallGateUp,
    "moe_small",
    "moe_small_gate_up_bf16",
    "moe_small_gate_up_f16"
);
pub const MOE_SMALL_DOWN: Kernel<args::MoeSmallDown> = kernel!(
    args::MoeSmallDown,
    "moe_small",
    "moe_small_down_bf16",
    "moe_small_down_f16"
);

/// The entry points this path launches (for the tables that list every kernel).
pub fn kernels() -> Vec<NamedKernel> {
    vec![
        MOE_TOPK_SOFTMAX.named(),
        MOE_ALIGN.named(),
        MOE_GATHER.named(),
        MOE_GROUPED_GEMM.named(),
        MOE_UNPERMUTE.named(),
        MOE_SMALL_GATE_UP.named(),
        MOE_SMALL_DOWN.named(),
    ]
}

/// moe_topk_softmax keeps a token's logits in a warp's registers (kMoeMaxExperts) and its
/// picks one a lane.
const MAX_EXPERTS: usize = 1024;
const MAX_TOP_K: usize = 32;

/// The layer's operands against its layout (the CPU backend's checks, and the kernels'
/// limits), as `(rows, cols)`.
pub fn check_moe_shapes(
    hidden: usize,
    router: (usize, usize),
    gate_up: (usize, usize),
    down: (usize, usize),
    layout: &MoeLayout,
) -> Result<()> {
    let (e, k, inter, h) = (
        layout.num_experts,
        layout.top_k,
        layout.intermediate_size,
        hidden,
    );
    ensure!(
        router == (e, h),
        "moe: router is {router:?}, expected ({e}, {h})"
    );
    ensure!(
        gate_up == (e * 2 * inter, h),
        "moe: stacked gate/up is {gate_up:?}, expected ({}, {h})",
        e * 2 * inter
    );
    ensure!(
        down == (e * h, inter),
        "moe: stacked down is {down:?}, expected ({}, {inter})",
        e * h
    );
    ensure!((1..=e).contains(&k), "moe: top_k {k} of {e} experts");
    ensure!(
        e <= MAX_EXPERTS && k <= MAX_TOP_K,
        "moe: the CUDA routing kernel takes at most {MAX_EXPERTS} experts and top {MAX_TOP_K}; \
         this layer has {e} experts, top {k}"
    );
    Ok(())
}

/// The routing's integer and f32 arrays, one allocation for every layer (they run one after
/// another on the stream): `topk_ids`, `topk_weights`, `sorted_pairs`, `pair_slots` (`P`
/// each), `expert_offsets` (`E + 1`) and the grouped GEMM's `tile_map`
/// (`moe_gemm_tile_slots`). Allocated on first use at the scratch's capacity, so
/// that every step sees the same addresses; a buffer outgrown is kept, not freed, since a
/// captured graph may still point into it.
#[derive(Default)]
pub struct MoeRouting {
    bufs: Mutex<RoutingBufs>,
}

#[derive(Default)]
struct RoutingBufs {
    current: Option<(DevBuf, usize, usize)>,
    retired: Vec<DevBuf>,
}

/// Device addresses of one layer's routing arrays.
#[derive(Debug, Clone, Copy)]
struct RoutingPtrs {
    topk_ids: CUdeviceptr,
    topk_weights: CUdeviceptr,
    sorted_pairs: CUdeviceptr,
    pair_slots: CUdeviceptr,
    expert_offsets: CUdeviceptr,
    tile_map: CUdeviceptr,
}

impl RoutingPtrs {
    /// Ints (and f32s) of the arrays for up to `pairs` pairs of `experts` experts.
    fn len(pairs: usize, experts: usize) -> usize {
        4 * pairs + experts + 1 + moe_gemm_tile_slots(pairs, experts)
    }

    fn at(base: CUdeviceptr, pairs: usize, experts: usize) -> Self {
        let p = (pairs * 4) as u64;
        Self {
            topk_ids: base,
            topk_weights: base + p,
            sorted_pairs: base + 2 * p,
            pair_slots: base + 3 * p,
            expert_offsets: base + 4 * p,
            tile_map: base + 4 * p + ((experts + 1) * 4) as u64,
        }
    }
}

impl CudaBackend {
    /// Routing arrays for up to `pairs` pairs of `experts`.
    fn moe_routing_ptrs(&self, pairs: usize, experts: usize) -> Result<RoutingPtrs> {
        let mut b = self
            .moe_routing
            .bufs
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some((buf, p, e)) = &b.current {
            if *p >= pairs && *e >= experts {
                return Ok(RoutingPtrs::at(buf.ptr, *p, *e));
            }
        }
        // A graph being captured cannot allocate (nor would its replays see a later buffer);
        // the profiling pass and each capture's warm-up step come first and allocate here.
        use cudarc::driver::{result::stream, sys::CUstreamCaptureStatus};
        // SAFETY: the backend's own stream, live as long as the Gpu.
        let capture = unsafe { stream::is_capturing(self.gpu.stream) }
            .map_err(|e| anyhow::anyhow!("cuStreamIsCapturing: {e:?}"))?;
        ensure!(
            capture == CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE,
            "moe: routing buffers for {pairs} pairs first asked for inside a CUDA graph capture"
        );
        let (p, e) = match &b.current {
            Some((_, p, e)) => ((*p).max(pairs), (*e).max(experts)),
            None => (pairs, experts),
        };
        let buf = self.gpu.alloc(RoutingPtrs::len(p, e) * 4)?;
        let ptrs = RoutingPtrs::at(buf.ptr, p, e);
        if let Some((old, _, _)) = b.current.replace((buf, p, e)) {
            b.retired.push(old);
        }
        Ok(ptrs)
    }

    /// `Backend::moe` (see the module comment), or with `residual` `Backend::moe_add`: the
    /// small path's down kernel adds into the residual stream itself, the grouped path writes
    /// `out` and adds it after.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn moe_impl(
        &self,
        x: &CudaTensor,
        router: &CudaWeight,
        gate_up: &CudaWeight,
        down: &CudaWeight,
        layout: &MoeLayout,
        scratch: &mut MoeScratch<CudaTensor>,
        out: &mut CudaTensor,
        residual: Option<&mut CudaTensor>,
    ) -> Result<()> {
        let (e, k, inter) = (layout.num_experts, layout.top_k, layout.intermediate_size);
        let (tokens, h) = (x.rows(), x.cols());
        check_moe_shapes(
            h,
            (router.rows, router.cols),
            (gate_up.rows, gate_up.cols),
            (down.rows, down.cols),
            layout,
        )?;
        ensure!(
            out.cols() == h,
            "moe: output has {} cols, expected {h}",
            out.cols()
        );
        // --quantization fp8 stores projections as E4M3 codes, which these kernels would read
        // as the compute type.
        ensure!(
            [router, gate_up, down]
                .iter()
                .all(|w| w.fp8_scales.is_none()),
            "--quantization fp8 is not implemented for the CUDA mixture-of-experts kernels \
             (the experts would be read as {}); run the model without it",
            self.dtype.name()
        );
        let s = scratch;
        ensure!(
            s.rows.cols() == h && s.act.cols() == inter,
            "moe: scratch buffers do not match the layout"
        );
        out.set_rows(tokens)?;
        if tokens == 0 {
            return Ok(());
        }
        let pairs = tokens * k;
        s.rows.set_rows(pairs)?;
        s.act.set_rows(pairs)?;
        let r = self.moe_routing_ptrs(s.rows.capacity_rows(), e)?;
        self.linear(x, router, None, &mut s.router_logits)?;
        if tokens <= MOE_SMALL_PATH_MAX_TOKENS && moe_small_fits(tokens, e, k, h, inter) {
            // With a residual the down kernel accumulates into it instead of writing `out`.
            let (dst, accumulate) = match residual {
                Some(res) => (res, true),
                None => (out, false),
            };
            ensure!(
                dst.rows() == tokens && dst.cols() == h,
                "moe: its destination is [{}, {}], expected [{tokens}, {h}]",
                dst.rows(),
                dst.cols()
            );
            return self.moe_small(x, gate_up, down, layout, s, r, dst, accumulate);
        }

        let (t32, e32, k32, p32) = (tokens as i32, e as i32, k as i32, pairs as i32);
        self.launch(
            MOE_TOPK_SOFTMAX,
            (tokens.div_ceil(8) as u32, 1, 1),
            256,
            args::MoeTopkSoftmax {
                topk_ids: r.topk_ids,
                topk_weights: r.topk_weights,
                logits: s.router_logits.ptr(),
                tokens: t32,
                experts: e32,
                top_k: k32,
                renormalize: layout.renormalize as i32,
            },
        )?;
        self.launch(
            MOE_ALIGN,
            (1, 1, 1),
            1024,
            args::MoeAlign {
                expert_offsets: r.expert_offsets,
                sorted_pairs: r.sorted_pairs,
                pair_slots: r.pair_slots,
                tile_map: r.tile_map,
                topk_ids: r.topk_ids,
                pairs: p32,
                experts: e32,
            },
        )?;
        self.launch(
            MOE_GATHER,
            (pairs as u32, 1, 1),
            256,
            args::MoeGather {
                rows: s.rows.ptr(),
                x: x.ptr(),
                sorted_pairs: r.sorted_pairs,
                pairs: p32,
                hidden: h as i32,
                top_k: k32,
            },
        )?;
        let grouped = |out: CUdeviceptr,
                       input: CUdeviceptr,
                       w: CUdeviceptr,
                       n: usize,
                       kk: usize,
                       gated: bool| {
            let (grid, block, smem) = moe_grouped_gemm_launch(n, e, pairs, gated);
            self.launch_smem(
                MOE_GROUPED_GEMM,
                grid,
                block,
                smem,
                args::MoeGroupedGemm {
                    out,
                    r#in: input,
                    w,
                    expert_offsets: r.expert_offsets,
                    tile_map: r.tile_map,
                    n: n as i32,
                    k: kk as i32,
                    gated: gated as i32,
                },
            )
        };
        // Gate/up with SiLU-and-mul in its epilogue: no [P, 2I] gate/up rows.
        grouped(s.act.ptr(), s.rows.ptr(), gate_up.buf.ptr, inter, h, true)?;
        // The experts' outputs replace their inputs, which are no longer needed.
        grouped(s.rows.ptr(), s.act.ptr(), down.buf.ptr, h, inter, false)?;
        self.launch(
            MOE_UNPERMUTE,
            (tokens as u32, 1, 1),
            256,
            args::MoeUnpermute {
                out: out.ptr(),
                rows: s.rows.ptr(),
                pair_slots: r.pair_slots,
                topk_weights: r.topk_weights,
                tokens: t32,
                hidden: h as i32,
                top_k: k32,
            },
        )?;
        match residual {
            Some(res) => self.add_inplace(res, out),
            None => Ok(()),
        }
    }
}

impl CudaBackend {
    /// The small-batch decode path (kernels/src/moe_small.cu): `moe_small_gate_up` routes
    /// every token from the router logits in each block (moe_topk_softmax's routing), stores
    /// the routing for the down kernel and writes `act` in pair order; `moe_small_down` sums
    /// each token's experts, weighted, into `out` (`accumulate`: adds them to it, in f32 with
    /// one rounding). Two launches after the router GEMM, grids from the shape alone.
    #[allow(clippy::too_many_arguments)]
    fn moe_small(
        &self,
        x: &CudaTensor,
        gate_up: &CudaWeight,
        down: &CudaWeight,
        layout: &MoeLayout,
        s: &mut MoeScratch<CudaTensor>,
        r: RoutingPtrs,
        out: &mut CudaTensor,
        accumulate: bool,
    ) -> Result<()> {
        let (e, k, inter) = (layout.num_experts, layout.top_k, layout.intermediate_size);
        let (tokens, h) = (x.rows(), x.cols());
        let (grid, block) = moe_small_gate_up_launch(tokens, e, k, inter);
        self.launch(
            MOE_SMALL_GATE_UP,
            grid,
            block,
            args::MoeSmallGateUp {
                act: s.act.ptr(),
                topk_ids: r.topk_ids,
                topk_weights: r.topk_weights,
                x: x.ptr(),
                logits: s.router_logits.ptr(),
                w: gate_up.buf.ptr,
                // No L2 prefetch of the down rows: the layer measured faster without it
                // (58.9 vs 60.5 us at one token, H100).
                w_down: 0,
                tokens: tokens as i32,
                experts: e as i32,
                top_k: k as i32,
                renormalize: layout.renormalize as i32,
                inter: inter as i32,
                hidden: h as i32,
            },
        )?;
        let (grid, block) = moe_small_down_launch(h);
        self.launch(
            MOE_SMALL_DOWN,
            grid,
            block,
            args::MoeSmallDown {
                out: out.ptr(),
                act: s.act.ptr(),
                w: down.buf.ptr,
                topk_ids: r.topk_ids,
                topk_weights: r.topk_weights,
                tokens: tokens as i32,
                experts: e as i32,
                top_k: k as i32,
                hidden: h as i32,
                inter: inter as i32,
                accumulate: accumulate as i32,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::elem::GpuDtype;
    use super::*;

    fn layout(e: usize, k: usize, inter: usize) -> MoeLayout {
        MoeLayout {
            num_experts: e,
            top_k: k,
            intermediate_size: inter,
            renormalize: true,
        }
    }

    /// Each entry point is one its argument struct was generated from, in both builds.
    #[test]
    fn every_moe_kernel_is_declared_by_its_argument_struct() {
        for k in kernels() {
            let (module, name) = k.of(GpuDtype::Bf16);
            let want = rvllm_kernels::Entry {
                module,
                name,
                f16: Some(k.of(GpuDtype::F16)),
            };
            assert!(k.declared.contains(&want), "{module}.{name}");
            assert!(module.starts_with("moe"), "{module}.{name}");
        }
    }

    #[test]
    fn shapes_and_kernel_limits_are_checked() {
        let (h, i) = (64, 32);
        let l = layout(8, 2, i);
        check_moe_shapes(h, (8, h), (8 * 2 * i, h), (8 * h, i), &l).unwrap();
        let e = check_moe_shapes(h, (8, h), (8 * i, h), (8 * h, i), &l).unwrap_err();
        assert!(e.to_string().contains("stacked gate/up"), "{e}");
        let e = check_moe_shapes(h, (8, h + 1), (8 * 2 * i, h), (8 * h, i), &l).unwrap_err();
        assert!(e.to_string().contains("router"), "{e}");
        let big = layout(2048, 8, i);
        let e = check_moe_shapes(h, (2048, h), (2048 * 2 * i, h), (2048 * h, i), &big).unwrap_err();
        assert!(e.to_string().contains("at most 1024 experts"), "{e}");
        let e =
            check_moe_shapes(h, (8, h), (8 * 2 * i, h), (8 * h, i), &layout(8, 9, i)).unwrap_err();
        assert!(e.to_string().contains("top_k 9 of 8"), "{e}");
    }

    /// The grouped GEMM's grid depends on the shape only: a block a 64-column tile and
    /// tile-map entry; batch 1 of Qwen3-MoE (8 pairs) has 8 rows of blocks, one an expert.
    #[test]
    fn grouped_gemm_grid_follows_the_shape() {
        let grid = |n, e, p, gated| moe_grouped_gemm_launch(n, e, p, gated).0;
        assert_eq!(grid(768, 128, 8, true), (24, 8, 1));
        assert_eq!(grid(2048, 128, 8, false), (32, 8, 1));
        assert_eq!(grid(2048, 128, 200 * 8, false), (32, 25 + 128, 1));
        assert_eq!(grid(100, 8, 2, false), (2, 2, 1));
        assert_eq!(grid(36, 8, 2, true), (2, 2, 1));
        assert_eq!(grid(0, 0, 0, false), (1, 1, 1));
    }

    /// The routing arrays do not overlap and the tile map holds every routing's tiles.
    #[test]
    fn small_batches_take_the_small_path() {
        let fits = rvllm_kernels::reference::moe_small_fits;
        assert!(fits(1, 128, 8, 2048, 768));
        assert!(fits(8, 128, 8, 2048, 768));
        assert!(!fits(9, 128, 8, 2048, 768));
        assert!(!fits(0, 128, 8, 2048, 768));
        assert!(!fits(1, 8, 2, 100, 36), "rows of no whole 16-byte chunks");
        assert!(!fits(1, 64, 33, 2048, 768), "top 33");
        assert_eq!(moe_small_gate_up_launch(1, 128, 8, 768).0, (32, 8, 1));
        assert_eq!(moe_small_gate_up_launch(8, 128, 8, 768).0, (32, 64, 1));
        assert_eq!(moe_small_gate_up_launch(8, 8, 2, 768).0, (32, 8, 1));
        assert_eq!(
            moe_small_gate_up_launch(1, 8, 2, 14336).0,
            (128, 2, 1),
            "Mixtral"
        );
        assert_eq!(moe_small_gate_up_launch(1, 8, 2, 64).0, (8, 2, 1));
        assert_eq!(moe_small_down_launch(2048).0, (256, 1, 1));
    }

    #[test]
    fn routing_arrays_are_laid_out_back_to_back() {
        let (p, e) = (1600, 128);
        let r = RoutingPtrs::at(0, p, e);
        assert_eq!(r.expert_offsets, 4 * 4 * p as u64);
        assert_eq!(r.tile_map, r.expert_offsets + 4 * (e as u64 + 1));
        assert_eq!(
            RoutingPtrs::len(p, e) as u64 * 4,
            r.tile_map + 4 * moe_gemm_tile_slots(p, e) as u64
        );
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

    /// The whole layer on the GPU against the CPU backend's, on the same (rounded) inputs and
    /// weights, in both element types: batches of 1 token (the small-batch path), 2, 7, 8, 9,
    /// 64 and 1,024 (the grouped GEMM's), Mixtral's 8
    /// experts top 2 and Qwen3-MoE's 128 top 8, routings where most experts get no token and
    /// where one expert gets every token. The router reads dimension `e` of x for expert `e`,
    /// and those dimensions hold levels 0.25 apart (exact in bf16 and f16), so the routing
    /// cannot flip between the GPU's rounded logits and the CPU's. Outputs are poisoned first.
    #[test]
    fn the_gpu_layer_matches_the_cpu_backend() {
        use super::super::backend::StepLimits;
        use super::super::elem::{bits_of, value_of};
        use crate::backend::cpu::{CpuBackend, CpuWeight};
        use crate::types::{HostData, HostTensor};
        if !matches!(super::super::device_count(), Ok(n) if n > 0) {
            eprintln!("SKIPPED: no CUDA device (the_gpu_layer_matches_the_cpu_backend)");
            return;
        }
        let gpu = std::sync::Arc::new(super::super::Gpu::new(0).expect("a CUDA context"));
        let limits = StepLimits {
            max_tokens: 1024,
            max_seqs: 1024,
            max_blocks_per_seq: 1,
        };
        let cpu = CpuBackend::new();
        // (experts, top k, tokens, renormalize, one expert takes every token)
        // One token takes the small-batch path, more the grouped GEMM.
        let cases = [
            (8, 2, 1, true, false),
            (128, 8, 1, true, false),
            (128, 8, 2, true, false),
            (128, 8, 7, false, false),
            (128, 8, 8, true, false),
            (128, 8, 8, true, true),
            (16, 1, 8, false, true),
            (16, 1, 1, false, true),
            (128, 8, 9, true, false),
            (8, 2, 64, true, false),
            (16, 1, 64, false, true),
            (8, 2, 1024, true, false),
            (128, 8, 1024, true, true),
        ];
        for dtype in [GpuDtype::Bf16, GpuDtype::F16] {
            let be = CudaBackend::new(gpu.clone(), limits, 1, 1, 64, dtype).unwrap();
            let round = |v: Vec<f32>| -> Vec<f32> {
                v.into_iter()
                    .map(|x| value_of(bits_of(x, dtype), dtype))
                    .collect()
            };
            for (seed, &(e, k, tokens, renormalize, one_expert)) in cases.iter().enumerate() {
                let (h, inter) = (256, 64);
                let what = format!("{dtype:?}: experts {e} top {k} tokens {tokens}");
                let l = MoeLayout {
                    num_experts: e,
                    top_k: k,
                    intermediate_size: inter,
                    renormalize,
                };
                let mut router = vec![0.0f32; e * h];
                for x in 0..e {
                    router[x * h + x] = 1.0;
                }
                let mut xs = fill(tokens * h, seed as u64 + 10, 1.0);
                for t in 0..tokens {
                    for x in 0..e {
                        xs[t * h + x] = 0.25 * ((x * 37 + t * 11) % e) as f32 - 8.0;
                    }
                    if one_expert {
                        xs[t * h + 2] = 40.0;
                    }
                }
                let xs = round(xs);
                let gate_up = round(fill(e * 2 * inter * h, seed as u64 + 20, 0.1));
                let down = round(fill(e * h * inter, seed as u64 + 30, 0.1));

                let cw = |data: &Vec<f32>, rows, cols| CpuWeight {
                    data: data.clone(),
                    rows,
                    cols,
                };
                let cx = cpu.activation_from_host(tokens, h, &xs).unwrap();
                let mut cs = MoeScratch {
                    router_logits: cpu.alloc_activation(tokens, e).unwrap(),
                    rows: cpu.alloc_activation(tokens * k, h).unwrap(),
                    gate_up: Some(cpu.alloc_activation(tokens * k, 2 * inter).unwrap()),
                    act: cpu.alloc_activation(tokens * k, inter).unwrap(),
                };
                let mut cout = cpu.alloc_activation(tokens, h).unwrap();
                cpu.moe(
                    &cx,
                    &cw(&router, e, h),
                    &cw(&gate_up, e * 2 * inter, h),
                    &cw(&down, e * h, inter),
                    &l,
                    &mut cs,
                    &mut cout,
                )
                .unwrap();
                let mut want = Vec::new();
                cpu.to_host(&cout, &mut want).unwrap();

                let gw = |name: &str, data: &Vec<f32>, rows, cols| {
                    let t = HostTensor {
                        shape: vec![rows, cols],
                        data: HostData::F32(data.clone()),
                    };
                    be.upload_weight(name, t).unwrap()
                };
                let gx = be.activation_from_host(tokens, h, &xs).unwrap();
                let poisoned = |rows: usize, cols: usize| {
                    be.activation_from_host(rows, cols, &vec![f32::NAN; rows * cols])
                        .unwrap()
                };
                let mut gs = MoeScratch {
                    router_logits: poisoned(tokens, e),
                    rows: poisoned(tokens * k, h),
                    gate_up: None,
                    act: poisoned(tokens * k, inter),
                };
                let weights = [
                    gw("router", &router, e, h),
                    gw("gate_up", &gate_up, e * 2 * inter, h),
                    gw("down", &down, e * h, inter),
                ];
                let [g_router, g_gate_up, g_down] = &weights;
                let mut gout = poisoned(tokens, h);
                be.moe(&gx, g_router, g_gate_up, g_down, &l, &mut gs, &mut gout)
                    .unwrap();
                let mut got = Vec::new();
                be.to_host(&gout, &mut got).unwrap();

                assert_eq!(got.len(), want.len(), "{what}");
                let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let tol = match dtype {
                    GpuDtype::Bf16 => 3e-2,
                    GpuDtype::F16 => 5e-3,
                } * scale.max(1e-3);
                // moe_add's tolerance adds the rounding of its outputs, whose magnitude is the
                // residual's.
                let ulp = match dtype {
                    GpuDtype::Bf16 => 1.0 / 128.0,
                    GpuDtype::F16 => 1.0 / 1024.0,
                };
                let check = |got: &[f32], want: &[f32], tol: f32, how: &str| {
                    for (i, (a, b)) in got.iter().zip(want).enumerate() {
                        assert!(
                            (a - b).abs() <= tol,
                            "{what}{how}: token {} dim {}: GPU {a}, CPU {b} (tolerance {tol})",
                            i / h,
                            i % h
                        );
                    }
                };
                check(&got, &want, tol, "");

                // moe_add: the same layer added onto a residual stream (the small path adds
                // inside its down kernel, the grouped one after).
                let residual = round(fill(tokens * h, seed as u64 + 40, 2.0));
                let mut gres = be.activation_from_host(tokens, h, &residual).unwrap();
                let mut gout = poisoned(tokens, h);
                be.moe_add(
                    &gx, g_router, g_gate_up, g_down, &l, &mut gs, &mut gres, &mut gout,
                )
                .unwrap();
                let mut got = Vec::new();
                be.to_host(&gres, &mut got).unwrap();
                let want: Vec<f32> = want.iter().zip(&residual).map(|(m, r)| m + r).collect();
                let top = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                check(&got, &want, tol + ulp * top, " (moe_add)");
            }
        }
    }
}
