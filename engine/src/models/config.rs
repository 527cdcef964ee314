//! The model description every backend works from, whatever file format it came from.
use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
}

impl Architecture {
    pub const SUPPORTED: &'static [&'static str] =
        &["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"];
}

/// Llama 3.x frequency scaling ("rope_type": "llama3"), or linear scaling.
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
        let layer = h * (q + 2 * kv) + bias + q * h + 3 * inter * h + 2 * h;
        let embed = self.vocab_size as u64 * h;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        embed + head + self.num_hidden_layers as u64 * layer + h
    }

    pub fn kv_bytes_per_token(&self, elem_bytes: usize) -> usize {
        2 * self.num_hidden_layers * self.kv_size() * elem_bytes
    }

    /// Inverse frequencies for RoPE (one per pair of dims), with rope scaling applied.
    /// Shared by the CPU backend and the CUDA backend (which uploads them once).
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let mut inv: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / (self.rope_theta as f64).powf(2.0 * i as f64 / d as f64) as f32)
            .collect();
        match &self.rope_scaling {
            None => {}
            Some(RopeScaling::Linear { factor }) => inv.iter_mut().for_each(|f| *f /= factor),
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                let old = *original_max_position_embeddings as f32;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                for f in inv.iter_mut() {
                    let wavelen = 2.0 * std::f32::consts::PI / *f;
                    if wavelen < high_wavelen {
                        // high frequency: unchanged
                    } else if wavelen > low_wavelen {
                        *f /= factor;
                    } else {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
        }
        inv
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
        hidden_size % num_attention_heads == 0,
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
            self.head_dim % 2 == 0,
            "{} = {} is odd: rotary embeddings rotate pairs of dimensions",
            field(Field::HeadDim),
            self.head_dim
        );
        ensure!(
            self.num_attention_heads % self.num_key_value_heads == 0,
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
        match &self.rope_scaling {
            None => {}
            Some(RopeScaling::Linear { factor }) => float(
                Field::RopeScalingFactor,
                *factor,
                factor.is_finite() && *factor > 0.0,
                "the RoPE scaling factor must be a finite number greater than 0",
            )?,
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                float(
                    Field::RopeScalingFactor,
                    *factor,
                    factor.is_finite() && *factor > 0.0,
                    "the RoPE scaling factor must be a finite number greater than 0",
                )?;
                float(
                    Field::RopeLowFreqFactor,
                    *low_freq_factor,
                    low_freq_factor.is_finite() && *low_freq_factor > 0.0,
                    "the low frequency factor must be a finite number greater than 0",
                )?;
                float(
                    Field::RopeHighFreqFactor,
                    *high_freq_factor,
                    high_freq_factor.is_finite() && *high_freq_factor > *low_freq_factor,
                    &format!(
                        "the high frequency factor must be finite and greater than {} = {low_freq_factor}",
                        field(Field::RopeLowFreqFactor)
                    ),
                )?;
                ensure!(
                    *original_max_position_embeddings > 0,
                    "{} = 0 is impossible: the original context length must be at least 1",
                    field(Field::RopeOriginalMaxPositionEmbeddings)
                );
            }
        }
        Ok(())
    }
}
