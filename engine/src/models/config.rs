//! The model description every backend works from, whatever file format it came from.
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
