//! What the CUDA kernels can run, decided from the decoder's description alone (no GPU
//! needed, so the rules are unit-tested everywhere). A model that needs anything else is
//! refused at load, the feature named, rather than run wrongly.
use anyhow::{bail, Result};

use super::AttentionLayout;
use crate::types::DecoderSpec;

/// Head sizes with prefill and decode attention kernels (kernels/src/attention_*.cu).
/// Head dim 256 (Gemma 3) runs decode's full kernel at every batch size and the windowed
/// prefill build.
pub const GPU_HEAD_DIMS: [usize; 3] = [64, 128, 256];

/// Refuses what the CUDA backend's kernels do not do yet. `context_len` is the longest
/// context the model will see (`--max-model-len`, else `max_position_embeddings`).
pub fn check_gpu_decoder(spec: &DecoderSpec, context_len: usize) -> Result<()> {
    let cpu = "run it with --device cpu";
    let Some(first) = spec.layers.first() else {
        return Ok(());
    };
    let hd = first.attention.head_dim;
    if !GPU_HEAD_DIMS.contains(&hd) {
        bail!("head_dim {hd} has no CUDA attention kernel (built: {GPU_HEAD_DIMS:?}); {cpu}");
    }
    // The CUDA attention kernels take no window: a window shorter than the context would
    // be ignored and give other tokens than transformers past it.
    if let Some((i, w)) = spec
        .layers
        .iter()
        .enumerate()
        .find_map(|(i, l)| l.attention.sliding_window.map(|w| (i, w)))
        .filter(|&(_, w)| w < context_len)
    {
        bail!(
            "layer {i} attends within a sliding window of {w} tokens, shorter than the context of \
             {context_len} tokens, and the CUDA attention kernels take no window yet; pass \
             --max-model-len {w} (or less) so that the window never matters, or {cpu}"
        );
    }
    if let Some((i, m)) = spec
        .layers
        .iter()
        .enumerate()
        .find_map(|(i, l)| l.moe.map(|m| (i, m)))
    {
        bail!(
            "layer {i} is a mixture of experts ({} experts, top {}) and the CUDA backend has no \
             mixture-of-experts kernels yet; {cpu}",
            m.num_experts,
            m.top_k
        );
    }
    for l in &spec.layers {
        let a = &l.attention;
        if a.softcap.is_some() {
            bail!("attention logit soft-capping (attn_logit_softcapping) is not implemented by the CUDA kernels; {cpu}");
        }
    }
    if spec.final_logit_softcap.is_some() {
        bail!("final logit soft-capping (final_logit_softcapping) is not implemented by the CUDA sampler; {cpu}");
    }
    if spec.has_local_rope() {
        bail!("a separate RoPE for sliding layers (rope_local_base_freq) is not implemented by the CUDA backend; {cpu}");
    }
    Ok(())
}

/// The layout the GPU kernels run. The whole-head rotations (the rotation kernel and the one
/// fused into decode attention) do not scale cos and sin, so YaRN's and LongRoPE's attention
/// factor `m` moves into the softmax scale: q and k each carry one `m`, so scores carry `m^2`;
/// v is never rotated and the cache holds k without it. With partial rotary only the rotated
/// dims carry `m`, which no softmax scale expresses: there the rotation kernel
/// (`rope_partial_and_cache`) scales cos and sin itself, as HF does, and the layout keeps it.
pub fn gpu_layout(layout: &AttentionLayout) -> AttentionLayout {
    if layout.rotary_dim != layout.head_dim {
        return *layout;
    }
    AttentionLayout {
        scale: layout.scale * layout.rope_scale * layout.rope_scale,
        rope_scale: 1.0,
        ..*layout
    }
}
