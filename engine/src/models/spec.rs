//! The decoder as data: what each family does differently, layer by layer, built once from
//! `ModelConfig`. `llama.rs` runs any `DecoderSpec` with the same code; a backend reads it to
//! refuse at load what its kernels cannot do (`Backend::check_decoder`). The types themselves
//! are plain data at the bottom of the layering (`types`), so backends read them without
//! importing `models`; building one from a config is the models' business, here.
use super::config::ModelConfig;
use crate::types::AttentionLayout;
pub use crate::types::{DecoderSpec, LayerSpec};

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
                    moe: f
                        .moe
                        .as_ref()
                        .filter(|m| m.is_sparse(i))
                        .map(|m| m.layout()),
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
}
