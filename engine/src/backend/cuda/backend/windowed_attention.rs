//! Attention for the layers the fused decode kernel cannot run: a sliding window shorter than
//! the longest context (Mistral, Gemma's local layers, Phi-3), attention-logit soft-capping
//! (Gemma 2), and head sizes without a decode build (80 and 96: Phi). Every token of such a
//! layer is rotated and written to the cache by the rotation kernel, then one launch of the
//! windowed prefill kernel (`paged_attention_prefill_windowed_hd*`) attends for all of the
//! step's sequences, a decode being a chunk of one query row. The kernel reads only the key
//! tiles inside the window, but streams one query head a block with no split over the context:
//! simple before fast. The choice follows the layer and the step buffers alone, never the
//! step, so that a decode graph and an eager step run the same kernel.
use anyhow::{bail, ensure, Result};

use super::{
    kernels, windowed_args, CudaBackend, CudaKvCache, CudaStepMeta, CudaTensor, CudaVector,
};
use crate::backend::AttentionLayout;
use rvllm_kernels::args;

/// Query rows a block of the windowed prefill kernel takes.
const ROWS_PER_BLOCK: usize = 64;

/// Whether a layer attends through the windowed kernel rather than decode attention:
/// `longest_context` bounds every context (the block table's capacity), so a window at least
/// that long never cuts and keeps the fused path; `has_decode_build` says whether decode
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
    /// `attends_windowed` for this backend's step buffers and `cache`'s blocks.
    pub(super) fn layer_attends_windowed(
        &self,
        layout: &AttentionLayout,
        cache: &CudaKvCache,
    ) -> bool {
        let group = layout.num_heads / layout.num_kv_heads.max(1);
        let built = Self::decode_kernel(layout.head_dim, group, false).is_ok();
        let longest = self.limits.max_blocks_per_seq * cache.shape.block_size;
        attends_windowed(layout, longest, built)
    }

    /// `rope_attention` of such a layer (`layout` from `gpu_layout`): every token, decodes
    /// included, through the rotation kernel, then `windowed_attention`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn windowed_rope_attention(
        &self,
        qkv: &mut CudaTensor,
        inv_freq: &CudaVector,
        layout: &AttentionLayout,
        step: &CudaStepMeta,
        cache: &mut CudaKvCache,
        layer: usize,
        out: &mut CudaTensor,
    ) -> Result<()> {
        self.rope_tokens(qkv, inv_freq, layout, step, cache, layer, 0)?;
        self.windowed_attention(qkv, layout, step, cache, layer, out)
    }

    /// Attention of every sequence of the step, decodes and prefill chunks in one launch, with
    /// the layer's window and soft-cap; q, k and v already rotated and in the cache.
    pub(super) fn windowed_attention(
        &self,
        qkv: &CudaTensor,
        layout: &AttentionLayout,
        step: &CudaStepMeta,
        cache: &CudaKvCache,
        layer: usize,
        out: &mut CudaTensor,
    ) -> Result<()> {
        if step.num_seqs == 0 {
            return Ok(());
        }
        let hd = layout.head_dim;
        let Some(&(_, kernel)) = kernels::PREFILL_WINDOWED.iter().find(|p| p.0 == hd) else {
            bail!("no windowed attention kernel for head_dim {hd} (built: 64, 80, 96, 128, 256)");
        };
        // 0 is the kernel's "none" for both; a window past i32 never cuts a context.
        let window = layout
            .sliding_window
            .map_or(0, |w| w.min(i32::MAX as usize) as i32);
        ensure!(
            layout.softcap.is_none_or(|c| c > 0.0 && c.is_finite()),
            "attention logit soft-cap {:?}: must be positive",
            layout.softcap
        );
        let softcap = layout.softcap.unwrap_or(0.0);
        let a = args::PrefillAttention {
            out: out.buf.ptr,
            q: qkv.buf.ptr,
            key_cache: cache.k_layer(layer),
            value_cache: cache.v_layer(layer),
            cu_seqlens_q: step.at(step.layout.cu_seqlens),
            context_lens: step.at(step.layout.context_lens),
            block_tables: step.at(step.layout.block_tables),
            scale: layout.scale,
            num_heads: layout.num_heads as i32,
            num_kv_heads: layout.num_kv_heads as i32,
            block_size: cache.shape.block_size as i32,
            max_blocks_per_seq: step.max_blocks_per_seq as i32,
            q_stride: layout.qkv_size() as i32,
        };
        // A decode-only step has no chunk: its sequences are chunks of one row.
        let grid = (
            step.max_chunk.max(1).div_ceil(ROWS_PER_BLOCK) as u32,
            layout.num_heads as u32,
            step.num_seqs as u32,
        );
        self.launch(kernel, grid, 128, windowed_args(a, window, softcap))
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
