//! The model description every backend works from, whatever file format it came from.
use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};

pub use crate::types::MlpActivation;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Phi3,
    Gemma2,
    Gemma3,
    Mixtral,
    Qwen3Moe,
}

impl Architecture {
    pub const SUPPORTED: &'static [&'static str] = &[
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "Phi3ForCausalLM",
        "Gemma2ForCausalLM",
        "Gemma3ForCausalLM",
        "MixtralForCausalLM",
        "Qwen3MoeForCausalLM",
    ];
}

/// RoPE frequency scaling: Llama 3.x ("llama3"), linear, YaRN ("yarn") or LongRoPE
/// ("longrope", formerly "su"). `rope.rs` turns each into inverse frequencies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RopeScaling {
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
    Linear {
        factor: f32,
    },
    /// YaRN: each frequency blended between interpolated (`/ factor`) and extrapolated by a
    /// ramp over the dimensions that `beta_fast` / `beta_slow` rotations bound; cos and sin
    /// scaled by `attention_factor` (resolved at parse time from `mscale` when not given).
    Yarn {
        factor: f32,
        original_max_position_embeddings: usize,
        beta_fast: f32,
        beta_slow: f32,
        attention_factor: f32,
        /// Round the ramp's bounds to whole dimensions (transformers' `truncate`, default on).
        truncate: bool,
    },
    /// LongRoPE (Phi-3, Phi-4): one divisor per frequency, the short list for contexts up to
    /// `original_max_position_embeddings`, the long one beyond; cos and sin scaled by
    /// `attention_factor`.
    LongRope {
        short_factor: Vec<f32>,
        long_factor: Vec<f32>,
        original_max_position_embeddings: usize,
        attention_factor: f32,
    },
}

/// The RoPE of Gemma 3's local (sliding-window) layers, which differs from the global one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LocalRope {
    pub theta: f32,
    pub scaling: Option<RopeScaling>,
}

/// What sets a family apart from Llama; the default is Llama. The decoder reads these through
/// `models::spec::DecoderSpec`, one description per layer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FamilyConfig {
    /// Per-head RMSNorm of q and k before RoPE (`q_norm` / `k_norm`: Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// Norm weights are stored as `w` and scale by `1 + w` (Gemma); folded in at load.
    pub norm_plus_one: bool,
    /// Norms around both blocks: `post_attention_layernorm` normalizes the attention output
    /// and `pre_feedforward_layernorm` / `post_feedforward_layernorm` wrap the MLP (Gemma 2/3).
    pub sandwich_norms: bool,
    pub activation: MlpActivation,
    /// The embedding is multiplied by sqrt(hidden_size) (Gemma).
    pub scale_embedding: bool,
    /// `cap * tanh(score / cap)` on attention scores (Gemma 2).
    pub attn_logit_softcap: Option<f32>,
    /// `cap * tanh(logit / cap)` on the final logits (Gemma 2, some Gemma 3).
    pub final_logit_softcap: Option<f32>,
    /// Attention scores scale by `query_pre_attn_scalar^-0.5` instead of `head_dim^-0.5`.
    pub query_pre_attn_scalar: Option<f32>,
    /// Per layer, whether it attends within `sliding_window` only; None: every layer does
    /// when `sliding_window` is set.
    pub sliding_layers: Option<Vec<bool>>,
    /// RoPE of the sliding layers when it differs from the global one (Gemma 3).
    pub local_rope: Option<LocalRope>,
    /// Dimensions of each head that RoPE rotates (`partial_rotary_factor`); None: all.
    pub rotary_dim: Option<usize>,
    /// `qkv_proj` and `gate_up_proj` stored fused (Phi-3).
    pub fused_projections: bool,
    /// Mixture-of-experts MLPs (Mixtral, Qwen3-MoE): the experts and which layers have them.
    #[serde(default)]
    pub moe: Option<super::moe::MoeConfig>,
    /// The longest context the engine will run (`--max-model-len`): LongRoPE picks its long
    /// factors when this passes the original context. None: `max_position_embeddings`.
    pub max_model_len: Option<usize>,
    /// FP8: the checkpoint's format and the runtime options (`models/quant`).
    #[serde(default)]
    pub quant: super::quant::QuantConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Qwen2 has biases on the q/k/v projections.
    pub attention_bias: bool,
    /// Sliding window (Mistral); None means full attention.
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// The checkpoint's type as config.json names it (`torch_dtype`, or `dtype` in newer
    /// transformers): what `--dtype auto` follows on the GPU. None for GGUF files.
    pub torch_dtype: Option<String>,
    /// The family's differences from Llama.
    pub family: FamilyConfig,
}

impl ModelConfig {
    pub fn q_size(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }
    pub fn kv_size(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }
    /// Bytes of KV cache per token for a given element size.
    /// Parameters of the decoder: embedding, layers, final norm, and the LM head unless it
    /// is tied to the embedding.
    pub fn num_parameters(&self) -> u64 {
        let (h, q, kv, inter) = (
            self.hidden_size as u64,
            self.q_size() as u64,
            self.kv_size() as u64,
            self.intermediate_size as u64,
        );
        let bias = if self.attention_bias { q + 2 * kv } else { 0 };
        let f = &self.family;
        let norms = if f.sandwich_norms { 4 * h } else { 2 * h }
            + if f.qk_norm {
                2 * self.head_dim as u64
            } else {
                0
            };
        let layer = h * (q + 2 * kv) + bias + q * h + norms;
        let (sparse, moe) = match &f.moe {
            Some(m) => (m.num_sparse_layers() as u64, m.layer_parameters(h)),
            None => (0, 0),
        };
        let dense = self.num_hidden_layers as u64 - sparse;
        let embed = self.vocab_size as u64 * h;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        embed
            + head
            + self.num_hidden_layers as u64 * layer
            + dense * 3 * inter * h
            + sparse * moe
            + h
    }

    /// Parameters one token reads: `num_parameters` less the experts a mixture-of-experts
    /// layer does not route it to (the bandwidth ceiling of MoE decode).
    pub fn num_active_parameters(&self) -> u64 {
        let idle = self.family.moe.as_ref().map_or(0, |m| {
            let per_expert = 3 * m.intermediate_size as u64 * self.hidden_size as u64;
            m.num_sparse_layers() as u64 * (m.num_experts - m.top_k) as u64 * per_expert
        });
        self.num_parameters() - idle
    }

    pub fn kv_bytes_per_token(&self, elem_bytes: usize) -> usize {
        2 * self.num_hidden_layers * self.kv_size() * elem_bytes
    }

    /// Inverse frequencies of the global RoPE (one per rotated pair of dims), with its
    /// scaling applied. Shared by the CPU backend and the CUDA backend (which uploads them).
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        self.rope(false).inv_freq
    }

    /// The RoPE of the global layers, or (`local`) of the sliding-window ones.
    pub fn rope(&self, local: bool) -> super::rope::Rope {
        let (theta, scaling) = match (&self.family.local_rope, local) {
            (Some(l), true) => (l.theta, l.scaling.as_ref()),
            _ => (self.rope_theta, self.rope_scaling.as_ref()),
        };
        super::rope::Rope::new(theta, self.rotary_dim(), scaling, self.context_len())
    }

    /// Dimensions of each head that RoPE rotates.
    pub fn rotary_dim(&self) -> usize {
        self.family.rotary_dim.unwrap_or(self.head_dim)
    }

    /// The longest context the model will see.
    pub fn context_len(&self) -> usize {
        self.family
            .max_model_len
            .unwrap_or(self.max_position_embeddings)
    }

    /// Layer `i`'s attention window: None for full attention.
    pub fn layer_window(&self, i: usize) -> Option<usize> {
        let sliding = match &self.family.sliding_layers {
            Some(v) => v.get(i).copied().unwrap_or(false),
            None => true,
        };
        self.sliding_window.filter(|_| sliding)
    }

    /// Whether some layer's window is shorter than a context of `len` tokens (so that it
    /// changes the result).
    pub fn window_matters(&self, len: usize) -> bool {
        (0..self.num_hidden_layers).any(|i| self.layer_window(i).is_some_and(|w| w < len))
    }
}

/// A field [`ModelConfig::validate`] checks. Each loader names it as its file spells it
/// (`rope_theta` in config.json, `llama.rope.freq_base` in a GGUF file), so an error points at
/// the value to fix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    HiddenSize,
    IntermediateSize,
    NumHiddenLayers,
    NumAttentionHeads,
    NumKeyValueHeads,
    HeadDim,
    VocabSize,
    MaxPositionEmbeddings,
    SlidingWindow,
    RmsNormEps,
    RopeTheta,
    RopeScalingFactor,
    RopeLowFreqFactor,
    RopeHighFreqFactor,
    RopeOriginalMaxPositionEmbeddings,
    RopeAttentionFactor,
    RopeBetaFast,
    RopeBetaSlow,
    RopeShortFactor,
    RopeLongFactor,
    PartialRotaryFactor,
    RopeLocalTheta,
    AttnLogitSoftcapping,
    FinalLogitSoftcapping,
    QueryPreAttnScalar,
    LayerTypes,
}

/// The head size a config implies when it names none: hidden size over the head count, which
/// must divide evenly (transformers refuses the model otherwise too).
pub fn implied_head_dim(
    hidden_size: usize,
    num_attention_heads: usize,
    name: &dyn Fn(Field) -> String,
) -> Result<usize> {
    ensure!(
        num_attention_heads > 0,
        "`{}` = 0: a model needs at least one attention head",
        name(Field::NumAttentionHeads)
    );
    ensure!(
        hidden_size.is_multiple_of(num_attention_heads),
        "`{}` = {hidden_size} is not divisible by `{}` = {num_attention_heads}, and no `{}` gives the head size",
        name(Field::HiddenSize),
        name(Field::NumAttentionHeads),
        name(Field::HeadDim)
    );
    Ok(hidden_size / num_attention_heads)
}

impl ModelConfig {
    /// Refuse values no model can have, before any weight is read: a NaN, zero or negative
    /// RoPE base or norm epsilon loads fine and then produces garbage (every logit NaN, the
    /// same token forever). `name` spells a field as the file the config came from does;
    /// messages quote it in backticks with the value.
    pub fn validate(&self, name: &dyn Fn(Field) -> String) -> Result<()> {
        let field = |f: Field| format!("`{}`", name(f));
        // Upper bounds no real model reaches: larger values come from corrupt or mistyped
        // files and would make the loader allocate or loop without bound.
        let sizes = [
            (Field::NumHiddenLayers, self.num_hidden_layers, 4096),
            (Field::HiddenSize, self.hidden_size, 1 << 20),
            (Field::IntermediateSize, self.intermediate_size, 1 << 22),
            (Field::NumAttentionHeads, self.num_attention_heads, 4096),
            (Field::NumKeyValueHeads, self.num_key_value_heads, 4096),
            (Field::HeadDim, self.head_dim, 4096),
            (Field::VocabSize, self.vocab_size, 1 << 24),
            // Ten times the longest context any model claims today.
            (
                Field::MaxPositionEmbeddings,
                self.max_position_embeddings,
                1 << 27,
            ),
        ];
        for (f, value, max) in sizes {
            ensure!(
                (1..=max).contains(&value),
                "{} = {value} is out of range (1..={max}): the model config is corrupt",
                field(f)
            );
        }
        ensure!(
            self.head_dim.is_multiple_of(2),
            "{} = {} is odd: rotary embeddings rotate pairs of dimensions",
            field(Field::HeadDim),
            self.head_dim
        );
        ensure!(
            self.num_attention_heads
                .is_multiple_of(self.num_key_value_heads),
            "{} = {} attention heads cannot be shared by {} = {} KV heads (it must divide them)",
            field(Field::NumAttentionHeads),
            self.num_attention_heads,
            field(Field::NumKeyValueHeads),
            self.num_key_value_heads
        );
        if self.sliding_window == Some(0) {
            bail!(
                "{} = 0 would let no token attend to any other",
                field(Field::SlidingWindow)
            );
        }
        let float = |f: Field, v: f32, ok: bool, rule: &str| -> Result<()> {
            ensure!(ok, "{} = {v} is impossible: {rule}", field(f));
            Ok(())
        };
        let eps = self.rms_norm_eps;
        float(
            Field::RmsNormEps,
            eps,
            eps.is_finite() && eps > 0.0 && eps < 1.0,
            "the RMSNorm epsilon must be a number between 0 and 1 (exclusive), typically 1e-5 or 1e-6",
        )?;
        let theta = self.rope_theta;
        float(
            Field::RopeTheta,
            theta,
            theta.is_finite() && theta > 1.0,
            "the RoPE base must be a finite number greater than 1, typically 10000 to 1000000",
        )?;
        if let Some(s) = &self.rope_scaling {
            self.validate_scaling(s, name)?;
        }
        let f = &self.family;
        if let Some(local) = &f.local_rope {
            float(
                Field::RopeLocalTheta,
                local.theta,
                local.theta.is_finite() && local.theta > 1.0,
                "the local RoPE base must be a finite number greater than 1",
            )?;
            if let Some(s) = &local.scaling {
                self.validate_scaling(s, name)?;
            }
        }
        let rot = self.rotary_dim();
        ensure!(
            rot > 0 && rot.is_multiple_of(2) && rot <= self.head_dim,
            "{} gives {rot} rotated dimensions of {}: it must be an even number between 2 and the head size",
            field(Field::PartialRotaryFactor),
            self.head_dim
        );
        for (fl, v) in [
            (Field::AttnLogitSoftcapping, f.attn_logit_softcap),
            (Field::FinalLogitSoftcapping, f.final_logit_softcap),
            (Field::QueryPreAttnScalar, f.query_pre_attn_scalar),
        ] {
            if let Some(v) = v {
                float(
                    fl,
                    v,
                    v.is_finite() && v > 0.0,
                    "it must be a finite number greater than 0",
                )?;
            }
        }
        if let Some(layers) = &f.sliding_layers {
            ensure!(
                layers.len() == self.num_hidden_layers,
                "{} has {} entries for {} = {} layers",
                field(Field::LayerTypes),
                layers.len(),
                field(Field::NumHiddenLayers),
                self.num_hidden_layers
            );
            ensure!(
                self.sliding_window.is_some() || !layers.contains(&true),
                "{} marks layers sliding_attention but {} is not set",
                field(Field::LayerTypes),
                field(Field::SlidingWindow)
            );
        }
        Ok(())
    }

    fn validate_scaling(
        &self,
        scaling: &RopeScaling,
        name: &dyn Fn(Field) -> String,
    ) -> Result<()> {
        let field = |f: Field| format!("`{}`", name(f));
        let positive = |f: Field, v: f32| -> Result<()> {
            ensure!(
                v.is_finite() && v > 0.0,
                "{} = {v} is impossible: it must be a finite number greater than 0",
                field(f)
            );
            Ok(())
        };
        let original = |n: usize| -> Result<()> {
            ensure!(
                n > 0,
                "{} = 0 is impossible: the original context length must be at least 1",
                field(Field::RopeOriginalMaxPositionEmbeddings)
            );
            Ok(())
        };
        match scaling {
            RopeScaling::Linear { factor } => positive(Field::RopeScalingFactor, *factor)?,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                positive(Field::RopeScalingFactor, *factor)?;
                positive(Field::RopeLowFreqFactor, *low_freq_factor)?;
                ensure!(
                    high_freq_factor.is_finite() && *high_freq_factor > *low_freq_factor,
                    "{} = {high_freq_factor} is impossible: the high frequency factor must be finite and greater than {} = {low_freq_factor}",
                    field(Field::RopeHighFreqFactor),
                    field(Field::RopeLowFreqFactor)
                );
                original(*original_max_position_embeddings)?;
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                attention_factor,
                ..
            } => {
                positive(Field::RopeScalingFactor, *factor)?;
                positive(Field::RopeBetaFast, *beta_fast)?;
                positive(Field::RopeBetaSlow, *beta_slow)?;
                positive(Field::RopeAttentionFactor, *attention_factor)?;
                original(*original_max_position_embeddings)?;
            }
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings,
                attention_factor,
            } => {
                let want = self.rotary_dim() / 2;
                for (f, list) in [
                    (Field::RopeShortFactor, short_factor),
                    (Field::RopeLongFactor, long_factor),
                ] {
                    ensure!(
                        list.len() == want,
                        "{} has {} entries; LongRoPE needs one per rotated pair of dimensions ({want})",
                        field(f),
                        list.len()
                    );
                    if let Some(bad) = list.iter().find(|v| !(v.is_finite() && **v > 0.0)) {
                        bail!(
                            "{} holds {bad}: every factor must be a finite number greater than 0",
                            field(f)
                        );
                    }
                }
                positive(Field::RopeAttentionFactor, *attention_factor)?;
                original(*original_max_position_embeddings)?;
            }
        }
        Ok(())
    }
}
