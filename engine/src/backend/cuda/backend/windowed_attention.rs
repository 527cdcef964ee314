//! Attention for the layers the plain kernels cannot run: a sliding window shorter than the
//! longest context (Mistral, Gemma's local layers, Phi-3), attention-logit soft-capping
//! (Gemma 2), and head sizes without a plain decode build (80 and 96: Phi). The step's decodes
//! go through the windowed build of the fused decode kernel (`windowed_decode.rs`: RoPE and
//! the cache write fused in where the whole head rotates, split over the window's keys), its
//! prefill chunks through the windowed prefill kernel (`paged_attention_prefill_windowed_hd*`,
//! after the rotation kernel), both reading only the keys inside the window. The choice
//! follows the layer and the step buffers alone, never the step's data, so that a decode
//! graph and an eager step run the same kernels. `decode_attention` and `prefill_attention`
//! (backend.rs) send such layers here; the rotation kernel runs before them as on the plain
//! path. Every layer over an FP8 cache
//! (`--kv-cache-dtype fp8`, kv_fp8.rs) attends here too, whatever its window: the same
//! launches run the kernels' `kvfp8` builds with the layer's (k, v) scales, window and
//! soft-cap 0 where the layer has none.
use anyhow::{Context, Result};

use super::kv_fp8::{self, KvElems};
use super::windowed_decode::{softcap_arg, window_arg};
use super::{kernels, CudaBackend, CudaKvCache, CudaStepMeta, CudaTensor};
use crate::backend::AttentionLayout;
use rvllm_kernels::args;

/// Whether a layer attends through the windowed builds rather than the plain ones:
/// `longest_context` bounds every context (the block table's capacity), so a window at least
/// that long never cuts and keeps the plain path; `has_decode_build` says whether plain decode
/// attention has a build for the layer's head size and group.
pub(super) fn attends_windowed(
    layout: &AttentionLayout,
    longest_context: usize,
    has_decode_build: bool,
) -> bool {
    layout.sliding_window.is_some_and(|w| w < longest_context)
        || layout.softcap.is_some()
        || !has_decode_build
}

impl CudaBackend {
    /// `attends_windowed` for this backend's step buffers and `cache`'s blocks; always over an
    /// FP8 cache, whose attention kernels are windowed builds only.
    pub(super) fn layer_attends_windowed(
        &self,
        layout: &AttentionLayout,
        cache: &CudaKvCache,
    ) -> bool {
        if cache.fp8_scales.is_some() {
            return true;
        }
        let group = layout.num_heads / layout.num_kv_heads.max(1);
        let built = Self::decode_kernel(layout.head_dim, group, false).is_ok();
        let longest = self.limits.max_blocks_per_seq * cache.shape.block_size;
        attends_windowed(layout, longest, built)
    }

    /// The windowed prefill kernel over the step's sequences after the decodes (prefill
    /// chunks), one launch for all of them.
    pub(super) fn windowed_prefill_attention(
        &self,
        qkv: &CudaTensor,
        layout: &AttentionLayout,
        step: &CudaStepMeta,
        cache: &CudaKvCache,
        layer: usize,
        out: &mut CudaTensor,
    ) -> Result<()> {
        let hd = layout.head_dim;
        let elems = cache.layer_elems(layer)?;
        let (a, grid) = Self::step_prefill_args(qkv, layout, step, cache, layer, out);
        let (window, softcap) = (window_arg(layout), softcap_arg(layout)?);
        match elems {
            KvElems::Compute => {
                let &(_, kernel) = kernels::PREFILL_WINDOWED
                    .iter()
                    .find(|p| p.0 == hd)
                    .with_context(|| {
                        format!("no windowed attention kernel for head_dim {hd} (built: 64, 80, 96, 128, 256)")
                    })?;
                let a = prefill_args!(a => PrefillAttentionWindowed,
                    window: window,
                    softcap: softcap,
                );
                self.launch(kernel, grid, 128, a)
            }
            KvElems::Fp8 { k_scale, v_scale } => {
                let kernel = kv_fp8::prefill_kernel(hd).with_context(|| {
                    format!("no FP8-KV prefill attention kernel for head_dim {hd} (built: 64, 80, 96, 128, 256)")
                })?;
                let a = prefill_args!(a => PrefillAttentionKvFp8,
                    window: window,
                    softcap: softcap,
                    k_scale: k_scale,
                    v_scale: v_scale,
                );
                self.launch(kernel, grid, 128, a)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::attends_windowed;
    use crate::backend::AttentionLayout;

    fn layout(head_dim: usize) -> AttentionLayout {
        AttentionLayout {
            num_heads: 8,
            num_kv_heads: 2,
            head_dim,
            scale: 1.0 / (head_dim as f32).sqrt(),
            sliding_window: None,
            softcap: None,
            rotary_dim: head_dim,
            rope_scale: 1.0,
        }
    }

    #[test]
    fn windows_shorter_than_the_longest_context_caps_and_unbuilt_head_sizes_go_windowed() {
        let plain = layout(128);
        assert!(!attends_windowed(&plain, 8192, true));
        // Mistral's 4096 with --max-model-len 4096: the window never cuts, the fused path stays.
        let mistral = AttentionLayout {
            sliding_window: Some(4096),
            ..plain
        };
        assert!(!attends_windowed(&mistral, 4096, true));
        assert!(attends_windowed(&mistral, 4112, true));
        // Gemma 2: every layer is capped.
        let capped = AttentionLayout {
            softcap: Some(50.0),
            ..plain
        };
        assert!(attends_windowed(&capped, 64, true));
        // Phi-3 (head dim 96): no decode build.
        assert!(attends_windowed(&layout(96), 8192, false));
    }
}
