//! What the CUDA kernels can run, decided from the decoder's description alone (no GPU
//! needed, so the rules are unit-tested everywhere). A model that needs anything else is
//! refused at load, the feature named, rather than run wrongly.
use anyhow::{bail, Result};

use super::AttentionLayout;
use crate::types::DecoderSpec;

/// Head sizes with prefill and decode attention kernels (kernels/src/attention_*.cu).
/// 64, 128 and 256 have plain decode attention builds; 80 and 96 (Phi), like layers with a
/// window shorter than the context or an attention-logit soft-cap, decode through the windowed
/// builds of the fused decode kernel (`cuda/backend/windowed_decode.rs`) and prefill through
/// the windowed prefill build (`cuda/backend/windowed_attention.rs`).
pub const GPU_HEAD_DIMS: [usize; 5] = [64, 80, 96, 128, 256];

/// Refuses what the CUDA backend's kernels do not do yet. `_context_len` is the longest
/// context the model will see (`--max-model-len`, else `max_position_embeddings`); no rule
/// needs it since sliding windows run on the GPU.
pub fn check_gpu_decoder(spec: &DecoderSpec, _context_len: usize) -> Result<()> {
    let cpu = "run it with --device cpu";
    let Some(first) = spec.layers.first() else {
        return Ok(());
    };
    let hd = first.attention.head_dim;
    if !GPU_HEAD_DIMS.contains(&hd) {
        bail!("head_dim {hd} has no CUDA attention kernel (built: {GPU_HEAD_DIMS:?}); {cpu}");
    }
    // Mixtures of experts run moe.cu (backend/cuda/moe.rs), whose routing kernel holds a
    // token's logits in a warp's registers and its picks one a lane.
    if let Some((i, m)) = spec
        .layers
        .iter()
        .enumerate()
        .find_map(|(i, l)| l.moe.map(|m| (i, m)))
        .filter(|(_, m)| m.num_experts > 1024 || m.top_k > 32)
    {
        bail!(
            "layer {i} is a mixture of {} experts, top {}, and the CUDA routing kernel takes at \
             most 1024 experts and top 32; {cpu}",
            m.num_experts,
            m.top_k
        );
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
