//! The decoder as data: attention geometry and what each layer does, built by `models` from a
//! model's config and read by backends (to run it, or to refuse at load what they cannot).
use serde::{Deserialize, Serialize};

/// The MLP's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum MlpActivation {
    /// SwiGLU: `silu(gate) * up` (Llama, Mistral, Qwen, Phi-3).
    #[default]
    Silu,
    /// GeGLU with the tanh approximation of GELU (`gelu_pytorch_tanh`: Gemma).
    GeluTanh,
}

/// Attention geometry, fixed per model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionLayout {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Softmax scale, normally `1 / sqrt(head_dim)`.
    pub scale: f32,
    /// When set, token at position p only sees keys at positions > p - window
    /// (Mistral-style sliding window). None: full causal attention.
    pub sliding_window: Option<usize>,
    /// When set, scores (after `scale`) become `cap * tanh(score / cap)` (Gemma 2).
    pub softcap: Option<f32>,
    /// Dims of each head RoPE rotates (the first ones); `head_dim` unless partial rotary.
    pub rotary_dim: usize,
    /// cos and sin are multiplied by this (YaRN / LongRoPE attention factor; else 1).
    pub rope_scale: f32,
}

impl AttentionLayout {
    pub fn q_size(&self) -> usize {
        self.num_heads * self.head_dim
    }
    pub fn kv_size(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
    /// Width of a fused qkv row.
    pub fn qkv_size(&self) -> usize {
        self.q_size() + 2 * self.kv_size()
    }
}

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
    /// A mixture-of-experts MLP in place of the dense one (None: dense).
    pub moe: Option<MoeLayout>,
}

/// A layer's mixture of experts (Mixtral, Qwen3-MoE): a router `[num_experts, hidden]`
/// scores every token, the softmax (f32) of its logits picks the `top_k` experts, whose
/// weights are those probabilities (divided by their sum when `renormalize`), and each expert
/// is a SwiGLU MLP of `intermediate_size`; the layer's output is the weighted sum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoeLayout {
    pub num_experts: usize,
    pub top_k: usize,
    /// Width of one expert's gate (and up) projection.
    pub intermediate_size: usize,
    /// Divide the top-k probabilities by their sum (Mixtral always; Qwen3-MoE's
    /// `norm_topk_prob`).
    pub renormalize: bool,
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
    /// Whether any layer uses the local RoPE.
    pub fn has_local_rope(&self) -> bool {
        self.layers.iter().any(|l| l.local_rope)
    }
}
