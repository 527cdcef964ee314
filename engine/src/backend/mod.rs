//! One trait, two implementations (CPU in `cpu/`, CUDA in `cuda/`). Models are written once
//! against `Backend` and call its ops; nothing global (ARCHITECTURE.md invariant 6).
//!
//! DRAFT interface (owned by the CPU-backend work; the CUDA backend implements the same).
//! Layout conventions every implementation keeps:
//! - Activations are row-major `[rows, cols]`, one row per token of the step.
//! - Linear weights are `[out, in]` (HF layout); `linear` computes `x @ w^T (+ bias)`.
//! - Paged KV cache, per layer: K and V each `[num_blocks, block_size, num_kv_heads, head_dim]`.
//!   A token's slot is `block_id * block_size + offset`.
//! - RoPE is the HF "rotate half" form (pairs (i, i + head_dim/2)).
use anyhow::Result;

use crate::models::weights::HostTensor;

/// Geometry of the paged KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvCacheShape {
    pub num_layers: usize,
    pub num_blocks: usize,
    pub block_size: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// One sequence's part of a step's flattened token list.
#[derive(Debug, Clone)]
pub struct SeqSlice {
    /// Offset of the sequence's first new token in the step's token list.
    pub token_offset: usize,
    /// Number of new tokens this step.
    pub num_tokens: usize,
    /// Tokens in the KV cache after this step (start_pos + num_tokens): attention length.
    pub context_len: usize,
    pub block_table: Vec<u32>,
}

/// Everything a model forward pass needs about the step, built by the runner from a
/// `SchedulerOutput` (invariant 6: an explicit batch description).
#[derive(Debug, Clone, Default)]
pub struct ForwardBatch {
    pub token_ids: Vec<u32>,
    pub positions: Vec<u32>,
    /// KV cache slot of each token.
    pub slot_mapping: Vec<u32>,
    pub seqs: Vec<SeqSlice>,
    /// Rows of the step whose logits are wanted (e.g. each sampled sequence's last token).
    pub logits_rows: Vec<u32>,
}

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
