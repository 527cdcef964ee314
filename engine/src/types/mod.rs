//! Plain data that several layers share: request ids, sampled-token logprobs, the device
//! kind, host tensors and the decoder's description. The bottom of the layering
//! (ARCHITECTURE.md, "Layering"): this module imports nothing else from the crate, so every
//! layer may import it, and a type needed by two layers lives here rather than in the higher
//! one.
mod decoder;
mod tensor;

pub use decoder::{AttentionLayout, DecoderSpec, LayerSpec, MlpActivation, MoeLayout};
pub use tensor::{DType, HostData, HostTensor};

/// The id of one core request: one sequence (a user request with `n > 1` becomes `n` of them).
pub type RequestId = u64;

/// Which backend runs the model, after resolving `--device auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda,
}

/// Top log-probabilities at one position: the chosen token first, then the top-k.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub token_id: u32,
    pub logprob: f32,
    /// Rank of `token_id` in the vocabulary, counted as vLLM does: how many tokens have a
    /// logprob at least as high as its own (1: the most likely token).
    pub rank: u32,
    /// (token id, logprob), highest first.
    pub top: Vec<(u32, f32)>,
}
