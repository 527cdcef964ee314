//! The decoder as data: what each family does differently, layer by layer, built once from
//! `ModelConfig`. `llama.rs` runs any `DecoderSpec` with the same code; a backend reads it to
//! refuse at load what its kernels cannot do (`Backend::check_decoder`).
use super::config::{MlpActivation, ModelConfig};
use crate::backend::AttentionLayout;

/// One decoder layer.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerSpec {
    /// Heads, softmax scale, window, soft-cap and the rotated part of each head.
    pub attention: AttentionLayout,
    /// Uses the local RoPE (Gemma 3's sliding layers) rather than the global one.
    pub local_rope: bool,
    /// Per-head RMSNorm of q and k before RoPE.
    pub qk_norm: bool,
    /// Norms on the attention output and around the MLP (Gemma 2/3), besides the input norm.
    pub sandwich_norms: bool,
    pub activation: MlpActivation,
}

/// The whole decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderSpec {
    /// The embedding is multiplied by this (Gemma: sqrt(hidden_size)).
    pub embed_scale: Option<f32>,
    /// `cap * tanh(logit / cap)` on the LM head's output.
    pub final_logit_softcap: Option<f32>,
    /// Norm weights scale by `1 + w` (folded into the weight at load).
    pub norm_plus_one: bool,
    /// `qkv_proj` / `gate_up_proj` are stored fused.
    pub fused_projections: bool,
    pub layers: Vec<LayerSpec>,
    /// The RoPE cos/sin factor of the global and the local RoPE.
    pub rope_scale: [f32; 2],
}

impl DecoderSpec {
    pub fn new(c: &ModelConfig) -> Self {
        let f = &c.family;
        let scale = 1.0 / f.query_pre_attn_scalar.unwrap_or(c.head_dim as f32).sqrt();
        let rope_scale = [
            c.rope(false).attention_factor,
            c.rope(true).attention_factor,
        ];
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let window = c.layer_window(i);
                let local_rope = window.is_some() && f.local_rope.is_some();
                LayerSpec {
                    attention: AttentionLayout {
                        num_heads: c.num_attention_heads,
                        num_kv_heads: c.num_key_value_heads,
                        head_dim: c.head_dim,
                        scale,
                        sliding_window: window,
                        softcap: f.attn_logit_softcap,
                        rotary_dim: c.rotary_dim(),
                        rope_scale: rope_scale[local_rope as usize],
                    },
                    local_rope,
                    qk_norm: f.qk_norm,
                    sandwich_norms: f.sandwich_norms,
                    activation: f.activation,
                }
            })
            .collect();
        Self {
            embed_scale: f.scale_embedding.then(|| (c.hidden_size as f32).sqrt()),
            final_logit_softcap: f.final_logit_softcap,
            norm_plus_one: f.norm_plus_one,
            fused_projections: f.fused_projections,
            layers,
            rope_scale,
        }
    }

    /// Whether any layer uses the local RoPE.
    pub fn has_local_rope(&self) -> bool {
        self.layers.iter().any(|l| l.local_rope)
    }
}
