//! Decode attention of the layers `windowed_attention` takes (a sliding window shorter than the
//! longest context, attention-logit soft-capping, head dims 80 and 96): the fused paged decode
//! kernel's windowed build (`paged_attention_decode_windowed_hd*`), which streams only the
//! window's keys, split over the context like the plain kernel, with RoPE and the cache write
//! of the new token fused in. Its partials go through the windowed reduce, whose partitions
//! follow the window. Batch 1 runs the compact kernel's windowed build (head dims 64, 128 and
//! 256; 80 and 96 have none), as the plain path does (`decode_attention`); the choice follows
//! the layer and the batch size alone, so that a decode graph and an eager step run the same
//! kernel. Over an FP8 cache the same launch runs the `kvfp8` build (kv_fp8.rs) with the layer's
//! (k, v) scales at every batch size (there is no compact FP8 build).
use anyhow::{ensure, Context, Result};

use super::attention_args::DecodeInputs;
use super::kv_fp8::{self, KvElems};
use super::{CudaBackend, CudaTensor};
use crate::backend::cuda::elem::{kernel, Kernel, NamedKernel};
use crate::backend::AttentionLayout;
use rvllm_kernels::{args, decode_smem};

macro_rules! compact_windowed {
    ($hd:literal, $gt:literal) => {
        (
            $hd,
            $gt,
            kernel!(
                args::DecodeAttentionCompactWindowed,
                "attention_decode",
                concat!("paged_attention_decode_compact_windowed_hd", $hd, "_g", $gt),
                concat!(
                    "paged_attention_decode_compact_windowed_hd",
                    $hd,
                    "_g",
                    $gt,
                    "_f16"
                )
            ),
        )
    };
}

/// The windowed decode builds of attention_decode.cu.
#[allow(clippy::type_complexity)]
const DECODE_WINDOWED: [(usize, usize, Kernel<args::DecodeAttentionWindowed>); 20] =
    full_decode_builds!(args::DecodeAttentionWindowed, "windowed");

/// (head dim, query heads a block, the compact kernel's windowed build) for batch 1.
#[allow(clippy::type_complexity)]
const DECODE_COMPACT_WINDOWED: [(usize, usize, Kernel<args::DecodeAttentionCompactWindowed>); 12] = [
    compact_windowed!(64, 1),
    compact_windowed!(64, 2),
    compact_windowed!(64, 4),
    compact_windowed!(64, 8),
    compact_windowed!(128, 1),
    compact_windowed!(128, 2),
    compact_windowed!(128, 4),
    compact_windowed!(128, 8),
    compact_windowed!(256, 1),
    compact_windowed!(256, 2),
    compact_windowed!(256, 4),
    compact_windowed!(256, 8),
];

pub(super) const DECODE_REDUCE_WINDOWED: Kernel<args::PagedAttentionDecodeReduceWindowed> = kernel!(
    args::PagedAttentionDecodeReduceWindowed,
    "attention_decode",
    "paged_attention_decode_reduce_windowed",
    "paged_attention_decode_reduce_windowed_f16"
);

/// Every entry point above (for `kernels::all`).
pub fn kernels() -> Vec<NamedKernel> {
    let mut k: Vec<NamedKernel> = DECODE_WINDOWED.iter().map(|d| d.2.named()).collect();
    k.extend(DECODE_COMPACT_WINDOWED.iter().map(|d| d.2.named()));
    k.push(DECODE_REDUCE_WINDOWED.named());
    k
}

/// Query heads a block for a GQA group of `group` heads, as `decode_kernel` tiles them: groups
/// of 3 take the 4-head tile, 5 and more the 8-head one (several blocks a KV head past 8).
fn tile_heads(group: usize) -> usize {
    match group {
        0 | 1 => 1,
        2 => 2,
        3 | 4 => 4,
        _ => 8,
    }
}

/// The windowed decode kernel of a layer and its query heads a block, if built.
pub(super) fn windowed_decode_kernel(
    head_dim: usize,
    group: usize,
) -> Option<(Kernel<args::DecodeAttentionWindowed>, usize)> {
    let gt = tile_heads(group);
    DECODE_WINDOWED
        .iter()
        .find(|&&(hd, g, _)| hd == head_dim && g == gt)
        .map(|&(_, _, kernel)| (kernel, gt))
}

/// The compact kernel's windowed build for a layer, if built (head dims 64, 128 and 256).
fn compact_windowed_kernel(
    head_dim: usize,
    gt: usize,
) -> Option<Kernel<args::DecodeAttentionCompactWindowed>> {
    DECODE_COMPACT_WINDOWED
        .iter()
        .find(|&&(hd, g, _)| hd == head_dim && g == gt)
        .map(|&(_, _, kernel)| kernel)
}

/// The kernels' window argument: 0 for none; a window past i32 never cuts a context.
pub(super) fn window_arg(layout: &AttentionLayout) -> i32 {
    layout
        .sliding_window
        .map_or(0, |w| w.min(i32::MAX as usize) as i32)
}

/// The kernels' soft-cap argument: 0 for none, else positive and finite.
pub(super) fn softcap_arg(layout: &AttentionLayout) -> Result<f32> {
    ensure!(
        layout.softcap.is_none_or(|c| c > 0.0 && c.is_finite()),
        "attention logit soft-cap {:?}: must be positive",
        layout.softcap
    );
    Ok(layout.softcap.unwrap_or(0.0))
}

impl CudaBackend {
    /// Windowed decode attention for the step's leading one-token sequences.
    pub(super) fn windowed_decode_attention(
        &self,
        d: &DecodeInputs,
        out: &mut CudaTensor,
    ) -> Result<()> {
        let DecodeInputs {
            layout,
            step,
            cache,
            layer,
            ..
        } = *d;
        if step.num_decode == 0 {
            return Ok(());
        }
        let hd = layout.head_dim;
        let group = layout.num_heads / layout.num_kv_heads.max(1);
        let gt = tile_heads(group);
        let elems = cache.layer_elems(layer)?;
        let (window, softcap) = (window_arg(layout), softcap_arg(layout)?);
        let (full, grid) = self.step_decode_args(d, out, gt);
        let a = decode_args!(full => DecodeAttentionWindowed, window: window, softcap: softcap);
        let built = "(built: 64, 80, 96, 128, 256)";
        match elems {
            // The FP8 cache has no compact build: every batch size runs the full one.
            KvElems::Fp8 { k_scale, v_scale } => {
                let kernel = kv_fp8::decode_kernel(hd, gt).with_context(|| {
                    format!("no FP8-KV decode attention kernel for head_dim {hd} {built}")
                })?;
                let a = decode_args!(a => DecodeAttentionKvFp8,
                    window: a.window,
                    softcap: a.softcap,
                    k_scale: k_scale,
                    v_scale: v_scale,
                );
                self.launch_smem(kernel, grid, 128, decode_smem::full(gt), a)?;
            }
            // Batch 1 through the compact build where `runs_compact_decode` says so, as the
            // plain decode does.
            KvElems::Compute => match self
                .runs_compact_decode(step, hd)
                .then(|| compact_windowed_kernel(hd, gt))
                .flatten()
            {
                Some(kernel) => {
                    let smem = decode_smem::compact(hd, gt);
                    let a = decode_args!(a => DecodeAttentionCompactWindowed,
                        window: a.window,
                        softcap: a.softcap,
                    );
                    self.launch_smem(kernel, grid, 128, smem, a)?;
                }
                None => {
                    let (kernel, _) = windowed_decode_kernel(hd, group).with_context(|| {
                        format!("no windowed decode attention kernel for head_dim {hd} {built}")
                    })?;
                    self.launch_smem(kernel, grid, 128, decode_smem::full(gt), a)?;
                }
            },
        }
        self.reduce_decode_partials(layout, step, out, Some(window))
    }
}

#[cfg(test)]
mod tests {
    use super::{compact_windowed_kernel, softcap_arg, window_arg, windowed_decode_kernel};
    use crate::backend::cuda::elem::GpuDtype;
    use crate::backend::AttentionLayout;

    #[test]
    fn every_head_size_and_group_has_a_windowed_decode_build() {
        for hd in [64, 80, 96, 128, 256] {
            for (group, gt) in [(1, 1), (2, 2), (3, 4), (4, 4), (5, 8), (8, 8), (16, 8)] {
                let (kernel, tile) = windowed_decode_kernel(hd, group).unwrap();
                assert_eq!(tile, gt, "group {group}");
                assert_eq!(
                    kernel.of(GpuDtype::F16),
                    (
                        "attention_decode_f16",
                        format!("paged_attention_decode_windowed_hd{hd}_g{gt}_f16").as_str()
                    )
                );
            }
        }
        assert!(windowed_decode_kernel(112, 1).is_none());
        // Batch 1: a compact build for head dims 64, 128 and 256 (as the plain kernel).
        for gt in [1, 2, 4, 8] {
            for hd in [128, 256] {
                assert_eq!(
                    compact_windowed_kernel(hd, gt)
                        .unwrap()
                        .of(GpuDtype::Bf16)
                        .1,
                    format!("paged_attention_decode_compact_windowed_hd{hd}_g{gt}")
                );
            }
            assert!(compact_windowed_kernel(64, gt).is_some());
            for hd in [80, 96] {
                assert!(compact_windowed_kernel(hd, gt).is_none(), "hd {hd}");
            }
        }
    }

    #[test]
    fn window_and_softcap_arguments_say_none_with_zero_and_refuse_bad_caps() {
        let plain = AttentionLayout {
            num_heads: 8,
            num_kv_heads: 2,
            head_dim: 256,
            scale: 1.0 / 16.0,
            sliding_window: None,
            softcap: None,
            rotary_dim: 256,
            rope_scale: 1.0,
        };
        assert_eq!((window_arg(&plain), softcap_arg(&plain).unwrap()), (0, 0.0));
        let gemma = AttentionLayout {
            sliding_window: Some(4096),
            softcap: Some(50.0),
            ..plain
        };
        assert_eq!(
            (window_arg(&gemma), softcap_arg(&gemma).unwrap()),
            (4096, 50.0)
        );
        let huge = AttentionLayout {
            sliding_window: Some(usize::MAX),
            ..plain
        };
        assert_eq!(window_arg(&huge), i32::MAX);
        let negative = AttentionLayout {
            softcap: Some(-1.0),
            ..plain
        };
        assert!(softcap_arg(&negative).is_err());
    }
}
