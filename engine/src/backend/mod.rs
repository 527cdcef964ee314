//! One trait, two implementations (CPU in `cpu/`, CUDA in `cuda/`). Models are written once
//! against `Backend` and call its ops; nothing global (ARCHITECTURE.md invariant 6).
//!
//! Layout conventions every implementation keeps (the CUDA kernels use exactly these):
//! - Activations are row-major `[rows, cols]`, one row per token of the step. An activation
//!   buffer is allocated once with a row *capacity*; each op sets its output's current row
//!   count from its input, so a step never allocates (CUDA graphs need fixed addresses).
//! - Linear weights are `[out, in]` (HF layout); `linear` computes `x @ w^T (+ bias)`.
//!   Fused weights: `qkv` is q, k and v stacked along `out` (`[q_size + 2 * kv_size, in]`),
//!   `gate_up` is gate then up (`[2 * intermediate, in]`).
//! - The fused qkv activation row is `[q (num_heads * head_dim) | k (num_kv_heads * head_dim) |
//!   v (num_kv_heads * head_dim)]`, heads contiguous inside each part.
//! - Paged KV cache, per layer: K and V each `[num_blocks, block_size, num_kv_heads, head_dim]`.
//!   A token's slot is `block_id * block_size + offset`, so slot `s` starts at element
//!   `s * num_kv_heads * head_dim` of the layer's K (or V) array.
//! - RoPE is the HF "rotate half" form over the first `rotary_dim` dims of each head: pairs
//!   (i, i + rotary_dim/2) rotated by `position * inv_freq[i]` (`inv_freq` from
//!   `ModelConfig::rope`), cos and sin multiplied by the layout's `rope_scale`; the other
//!   dims pass through (partial rotary, Phi-4).
//! - Attention reads K/V from the cache only (the step's own keys are written there first by
//!   `rope_and_write_kv`). Token `i` of a sequence chunk that starts at `start_pos` sees keys
//!   `0 ..= start_pos + i` (causal with offset; a decode is a chunk of one token). Query head
//!   `h` uses KV head `h / (num_heads / num_kv_heads)` (GQA).
use std::ops::Range;

use anyhow::Result;

pub use crate::types::{AttentionLayout, MlpActivation, MoeLayout};
use crate::types::{DecoderSpec, HostTensor};

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod dtype;
pub mod dummy_weight;
pub mod gpu_support;
pub mod parallel;

/// Geometry of the paged KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvCacheShape {
    pub num_layers: usize,
    pub num_blocks: usize,
    pub block_size: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl KvCacheShape {
    /// Elements of one layer's K (or V) array.
    pub fn layer_elems(&self) -> usize {
        self.num_blocks * self.block_size * self.num_kv_heads * self.head_dim
    }
    /// Elements of one token's K (or V) entry in one layer.
    pub fn slot_elems(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
    pub fn num_slots(&self) -> usize {
        self.num_blocks * self.block_size
    }
}

/// One sequence's part of a step's flattened token list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqSlice {
    /// Offset of the sequence's first new token in the step's token list.
    pub token_offset: usize,
    /// Number of new tokens this step.
    pub num_tokens: usize,
    /// Tokens in the KV cache after this step (start_pos + num_tokens): attention length.
    pub context_len: usize,
    pub block_table: Vec<u32>,
}

impl SeqSlice {
    /// Position of the chunk's first token.
    pub fn start_pos(&self) -> usize {
        self.context_len - self.num_tokens
    }
}

/// Everything a model forward pass needs about the step, built by the runner from a
/// `SchedulerOutput` (invariant 6: an explicit batch description).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ForwardBatch {
    pub token_ids: Vec<u32>,
    pub positions: Vec<u32>,
    /// KV cache slot of each token.
    pub slot_mapping: Vec<u32>,
    pub seqs: Vec<SeqSlice>,
    /// Rows of the step whose logits are wanted (e.g. each sampled sequence's last token).
    pub logits_rows: Vec<u32>,
}

impl ForwardBatch {
    pub fn num_tokens(&self) -> usize {
        self.token_ids.len()
    }

    /// Checks the invariants every backend relies on, so that a bad batch is an error
    /// naming what is wrong rather than an out-of-bounds access in a kernel.
    pub fn validate(&self, kv: &KvCacheShape, vocab_size: usize) -> Result<()> {
        let n = self.token_ids.len();
        anyhow::ensure!(
            self.positions.len() == n && self.slot_mapping.len() == n,
            "forward batch has {n} tokens but {} positions and {} slots",
            self.positions.len(),
            self.slot_mapping.len()
        );
        if let Some(&bad) = self.token_ids.iter().find(|&&t| t as usize >= vocab_size) {
            anyhow::bail!("token id {bad} is outside the model's vocabulary (size {vocab_size})");
        }
        if let Some(&bad) = self
            .slot_mapping
            .iter()
            .find(|&&s| s as usize >= kv.num_slots())
        {
            anyhow::bail!(
                "KV slot {bad} is outside the cache ({} slots)",
                kv.num_slots()
            );
        }
        let mut next = 0;
        for (i, s) in self.seqs.iter().enumerate() {
            anyhow::ensure!(
                s.token_offset == next && s.num_tokens > 0 && s.context_len >= s.num_tokens,
                "sequence {i} of the batch is malformed: {s:?} (expected token_offset {next})"
            );
            anyhow::ensure!(
                s.block_table.len() * kv.block_size >= s.context_len,
                "sequence {i} has {} blocks of {} for a context of {} tokens",
                s.block_table.len(),
                kv.block_size,
                s.context_len
            );
            if let Some(&b) = s.block_table.iter().find(|&&b| b as usize >= kv.num_blocks) {
                anyhow::bail!(
                    "sequence {i} uses KV block {b} but the cache has {}",
                    kv.num_blocks
                );
            }
            next += s.num_tokens;
        }
        anyhow::ensure!(
            next == n,
            "sequences cover {next} tokens but the batch has {n}"
        );
        if let Some(&r) = self.logits_rows.iter().find(|&&r| r as usize >= n) {
            anyhow::bail!("logits row {r} is outside the batch ({n} tokens)");
        }
        Ok(())
    }
}

/// Scratch of a mixture-of-experts layer, allocated with the model's workspace for the
/// largest step: `T` rows of the step's tokens, `P = T * top_k` rows of (token, expert) pairs.
pub struct MoeScratch<A> {
    /// The router's logits, `[T, num_experts]`.
    pub router_logits: A,
    /// Each pair's input row, grouped by expert, then the expert's output row, `[P, hidden]`.
    pub rows: A,
    /// The experts' gate/up outputs, `[P, 2 * intermediate]`, for a backend that stores them
    /// before silu_and_mul (`Backend::MOE_GATE_UP_SCRATCH`); None where SiLU-and-mul is fused
    /// into the gate/up GEMM (CUDA), which saves `P x 2I` activations (~200 MB at 8,192
    /// tokens of Qwen3-30B-A3B).
    pub gate_up: Option<A>,
    /// `[P, intermediate]`.
    pub act: A,
}

/// An error unless `a` and `b` have the same current shape (elementwise ops).
pub fn check_same_shape(op: &str, a: &impl Activation, b: &impl Activation) -> Result<()> {
    anyhow::ensure!(
        a.rows() == b.rows() && a.cols() == b.cols(),
        "{op}: the operands are {}x{} and {}x{}",
        a.rows(),
        a.cols(),
        b.rows(),
        b.cols()
    );
    Ok(())
}

/// A device activation buffer: `[rows, cols]` with a fixed row capacity.
pub trait Activation {
    fn rows(&self) -> usize;
    fn cols(&self) -> usize;
    fn capacity_rows(&self) -> usize;
    /// Sets the current row count; an error past the capacity.
    fn set_rows(&mut self, rows: usize) -> Result<()>;
}

/// The ops a model forward pass needs. Every op writes into an output that the caller
/// allocated up front, and sets the output's row count from its input.
pub trait Backend: Send + Sized + 'static {
    /// Activations (`[rows, cols]`, f32 on the CPU, bf16 or f16 on the GPU).
    type Tensor: Activation + Send;
    /// A `[out, in]` matrix: linear weights, the embedding table, the LM head.
    type Weight: Send;
    /// A 1-D parameter: norm weights, biases, RoPE inverse frequencies.
    type Vector: Send;
    /// All layers' paged K and V caches.
    type KvCache: Send;
    /// A step's metadata (token ids, positions, slots, sequences, logits rows) as the device
    /// wants it, uploaded once per step and shared by every layer's ops.
    type StepMeta;

    /// Whether `moe` needs `MoeScratch::gate_up`.
    const MOE_GATE_UP_SCRATCH: bool = true;

    fn device_name(&self) -> String;

    // ---- allocation and upload -------------------------------------------------------

    /// An activation buffer of `capacity_rows` rows (current rows: 0).
    fn alloc_activation(&self, capacity_rows: usize, cols: usize) -> Result<Self::Tensor>;
    /// Fills an activation from host data (`data.len()` must be `rows * cols`).
    fn activation_from_host(&self, rows: usize, cols: usize, data: &[f32]) -> Result<Self::Tensor>;
    /// Copies the current rows of an activation to the host (row-major).
    fn to_host(&self, x: &Self::Tensor, dst: &mut Vec<f32>) -> Result<()>;
    /// Takes a 2-D host tensor (`[out, in]`) into device storage. `name` is for errors.
    fn upload_weight(&self, name: &str, t: HostTensor) -> Result<Self::Weight>;
    /// Makes a `--load-format dummy` weight in device storage. By default its values are made
    /// on the host and uploaded; a backend may make them where they live, identically.
    fn upload_dummy_weight(
        &self,
        name: &str,
        w: &dummy_weight::DummyWeight,
    ) -> Result<Self::Weight> {
        self.upload_weight(name, w.to_host())
    }
    /// Takes a 1-D host tensor into device storage. `name` is for errors.
    fn upload_vector(&self, name: &str, t: HostTensor) -> Result<Self::Vector>;
    /// A zero-filled paged KV cache.
    fn alloc_kv_cache(&self, shape: KvCacheShape) -> Result<Self::KvCache>;
    /// The geometry a cache was allocated with.
    fn kv_cache_shape(&self, cache: &Self::KvCache) -> KvCacheShape;
    /// Uploads a step's metadata. The batch must have passed `ForwardBatch::validate`.
    fn upload_step(&self, batch: &ForwardBatch) -> Result<Self::StepMeta>;

    // ---- ops ---------------------------------------------------------------------------

    /// `out[t] = table[token_ids[t]]` for every token of the step.
    fn embedding(
        &self,
        table: &Self::Weight,
        step: &Self::StepMeta,
        out: &mut Self::Tensor,
    ) -> Result<()>;

    /// `out = x @ w^T (+ bias)`; `x` is `[rows, in]`, `w` is `[out, in]`, `out` `[rows, out]`.
    fn linear(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        bias: Option<&Self::Vector>,
        out: &mut Self::Tensor,
    ) -> Result<()>;

    /// `out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * weight`.
    fn rms_norm(
        &self,
        x: &Self::Tensor,
        weight: &Self::Vector,
        eps: f32,
        out: &mut Self::Tensor,
    ) -> Result<()>;

    /// `residual += x; out = rms_norm(residual) * weight` (the residual stream update of a
    /// pre-norm transformer, in one pass).
    fn add_rms_norm(
        &self,
        residual: &mut Self::Tensor,
        x: &Self::Tensor,
        weight: &Self::Vector,
        eps: f32,
        out: &mut Self::Tensor,
    ) -> Result<()>;

    /// `residual += rms_norm(x) * weight`: a block's output norm (Gemma's sandwich norms) and
    /// the residual add. The normed rows are rounded to the activation type before the add,
    /// as `rms_norm` then `add_inplace` compute it; `scratch` (`x`'s shape) holds them where
    /// the backend does not fuse the two.
    fn rms_norm_add(
        &self,
        x: &Self::Tensor,
        weight: &Self::Vector,
        eps: f32,
        scratch: &mut Self::Tensor,
        residual: &mut Self::Tensor,
    ) -> Result<()> {
        self.rms_norm(x, weight, eps, scratch)?;
        self.add_inplace(residual, scratch)
    }

    /// Rotates the q and k parts of a fused qkv activation in place (RoPE at each token's
    /// position), then writes the rotated k and the v of every token into `layer`'s cache at
    /// the token's slot.
    fn rope_and_write_kv(
        &self,
        qkv: &mut Self::Tensor,
        inv_freq: &Self::Vector,
        layout: &AttentionLayout,
        step: &Self::StepMeta,
        cache: &mut Self::KvCache,
        layer: usize,
    ) -> Result<()>;

    /// Paged attention for a step that mixes prefill chunks and decodes: reads q from the
    /// fused qkv activation, K/V from `layer`'s cache; `out` is `[tokens, num_heads * head_dim]`.
    fn attention(
        &self,
        qkv: &Self::Tensor,
        layout: &AttentionLayout,
        step: &Self::StepMeta,
        cache: &Self::KvCache,
        layer: usize,
        out: &mut Self::Tensor,
    ) -> Result<()>;

    /// One layer's RoPE, KV-cache write and attention: `rope_and_write_kv` then `attention`.
    /// Models call this; a backend may fuse the two (the CUDA backend rotates and stores the
    /// decode tokens inside its decode attention kernel), so afterwards only `out` and the
    /// cache are defined, not the q/k part of `qkv`.
    #[allow(clippy::too_many_arguments)]
    fn rope_attention(
        &self,
        qkv: &mut Self::Tensor,
        inv_freq: &Self::Vector,
        layout: &AttentionLayout,
        step: &Self::StepMeta,
        cache: &mut Self::KvCache,
        layer: usize,
        out: &mut Self::Tensor,
    ) -> Result<()> {
        self.rope_and_write_kv(qkv, inv_freq, layout, step, cache, layer)?;
        self.attention(qkv, layout, step, cache, layer, out)
    }

    /// `out = silu(gate) * up` where `gate_up` rows are `[gate | up]`.
    fn silu_and_mul(&self, gate_up: &Self::Tensor, out: &mut Self::Tensor) -> Result<()>;

    /// Refuses, naming it, a model feature this backend cannot run (before any weight is
    /// uploaded). `context_len` is the longest context the model will see.
    fn check_decoder(&self, spec: &DecoderSpec, context_len: usize) -> Result<()> {
        let _ = (spec, context_len);
        Ok(())
    }

    /// Per-head RMSNorm of the q and k parts of a fused qkv activation, in place: every
    /// `head_dim` slice of q is normalized and scaled by `q_weight`, of k by `k_weight`
    /// (Qwen3 / Gemma 3, before RoPE).
    fn qk_norm(
        &self,
        qkv: &mut Self::Tensor,
        q_weight: &Self::Vector,
        k_weight: &Self::Vector,
        eps: f32,
        layout: &AttentionLayout,
    ) -> Result<()> {
        let _ = (qkv, q_weight, k_weight, eps, layout);
        anyhow::bail!(
            "per-head q/k RMSNorm (qk_norm) is not implemented on {}",
            self.device_name()
        )
    }

    /// `out = gelu_tanh(gate) * up` (GeGLU with the tanh approximation, Gemma).
    fn gelu_tanh_and_mul(&self, gate_up: &Self::Tensor, out: &mut Self::Tensor) -> Result<()> {
        let _ = (gate_up, out);
        anyhow::bail!(
            "the GeGLU MLP (gelu_pytorch_tanh) is not implemented on {}",
            self.device_name()
        )
    }

    /// A mixture-of-experts MLP (`MoeLayout`): each row of `x` is routed to its `top_k`
    /// experts (softmax of `x @ router^T` in f32, renormalized over the top k when the
    /// layout says so) and `out[t] = sum_e w[t, e] * (silu(x[t] @ gate_e^T) * (x[t] @ up_e^T))
    /// @ down_e^T`. `router` is `[num_experts, hidden]`; `gate_up` stacks every expert's
    /// `[gate | up]` (`[num_experts * 2 * inter, hidden]`), `down` every expert's down
    /// projection (`[num_experts * hidden, inter]`).
    #[allow(clippy::too_many_arguments)]
    fn moe(
        &self,
        x: &Self::Tensor,
        router: &Self::Weight,
        gate_up: &Self::Weight,
        down: &Self::Weight,
        layout: &MoeLayout,
        scratch: &mut MoeScratch<Self::Tensor>,
        out: &mut Self::Tensor,
    ) -> Result<()> {
        let _ = (x, router, gate_up, down, layout, scratch, out);
        anyhow::bail!(
            "mixture-of-experts layers are not implemented on {}",
            self.device_name()
        )
    }

    /// `x *= factor`, elementwise (Gemma's embedding scale).
    fn scale(&self, x: &mut Self::Tensor, factor: f32) -> Result<()> {
        let _ = (x, factor);
        anyhow::bail!(
            "scaling activations (Gemma's embedding scale) is not implemented on {}",
            self.device_name()
        )
    }

    /// `acc += x`, elementwise.
    fn add_inplace(&self, acc: &mut Self::Tensor, x: &Self::Tensor) -> Result<()>;

    /// `residual += moe(x)`: a mixture-of-experts MLP whose output goes straight into the
    /// decoder's residual stream (`out`: scratch for the layer's output where the add is not
    /// fused). The default runs `moe` into `out`, then `add_inplace`; a backend may fuse the
    /// add into the experts' down projection.
    #[allow(clippy::too_many_arguments)]
    fn moe_add(
        &self,
        x: &Self::Tensor,
        router: &Self::Weight,
        gate_up: &Self::Weight,
        down: &Self::Weight,
        layout: &MoeLayout,
        scratch: &mut MoeScratch<Self::Tensor>,
        residual: &mut Self::Tensor,
        out: &mut Self::Tensor,
    ) -> Result<()> {
        self.moe(x, router, gate_up, down, layout, scratch, out)?;
        self.add_inplace(residual, out)
    }

    /// Whether this backend serves a rank of a tensor-parallel group (so the model calls
    /// `all_reduce_sum`), a group of one included.
    fn in_tp_group(&self) -> bool {
        false
    }

    /// Tensor parallelism: `x` (its current rows) becomes the sum of every rank's `x`, through
    /// the communicator of the rank this backend serves (`parallel::Communicator`). Called
    /// after each row-parallel projection of a sharded model only.
    fn all_reduce_sum(&self, x: &mut Self::Tensor) -> Result<()> {
        let _ = x;
        anyhow::bail!(
            "tensor parallelism (an all-reduce) is not implemented on {}",
            self.device_name()
        )
    }

    /// Whether a sharded model splits its embedding and LM head over the vocabulary (vLLM's
    /// `VocabParallelEmbedding` and `ParallelLMHead`): this backend has
    /// `vocab_parallel_embedding` and `all_gather_columns`. Otherwise they are replicated.
    const VOCAB_PARALLEL: bool = false;

    /// A vocabulary-parallel embedding: `out[t] = table[token_ids[t] - first_token]` for the
    /// tokens whose row this rank's `table` holds, zero for the others (an all-reduce then
    /// gives every rank every row).
    fn vocab_parallel_embedding(
        &self,
        table: &Self::Weight,
        step: &Self::StepMeta,
        first_token: usize,
        out: &mut Self::Tensor,
    ) -> Result<()> {
        let _ = (table, step, first_token, out);
        anyhow::bail!(
            "a vocabulary-parallel embedding is not implemented on {}",
            self.device_name()
        )
    }

    /// `out` (`[rows, ranks × part.cols]`) becomes every rank's `part`, rank r's in columns
    /// `r × part.cols..`: the ranks' vocabulary shards of the logits side by side.
    fn all_gather_columns(&self, part: &Self::Tensor, out: &mut Self::Tensor) -> Result<()> {
        let _ = (part, out);
        anyhow::bail!(
            "tensor parallelism (an all-gather) is not implemented on {}",
            self.device_name()
        )
    }

    /// Whether the model runs its row-parallel projections (O, down) and mixture layers
    /// through `row_parallel_linear` and `row_parallel_moe` instead of `linear`/`linear_add`
    /// (`moe`) and `all_reduce_sum`: on a backend that sums them exactly, so that one rank
    /// gives the bits of several (the CPU backend always, in a group or not).
    fn sums_row_parallel_exactly(&self) -> bool {
        false
    }

    /// A row-parallel projection summed exactly: `out = x @ w^T`, or `out += x @ w^T` with
    /// `accumulate`, the inner dimension in f64 over parts of `part_len` and, on a rank of a
    /// group, over the ranks (each rank's `x` and `w` hold whole parts), rounded once; so the
    /// result does not depend on how many ranks the model is split over.
    fn row_parallel_linear(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        part_len: usize,
        accumulate: bool,
        out: &mut Self::Tensor,
    ) -> Result<()> {
        let _ = (x, w, part_len, accumulate, out);
        anyhow::bail!(
            "exactly summed row-parallel projections are not implemented on {}",
            self.device_name()
        )
    }

    /// `moe` with its experts' down projections summed as `row_parallel_linear` sums (parts
    /// of `part_len` of their inner dimension, then the ranks, in f64, rounded once): what the
    /// model runs for a mixture layer where `sums_row_parallel_exactly`, all-reduce included.
    #[allow(clippy::too_many_arguments)]
    fn row_parallel_moe(
        &self,
        x: &Self::Tensor,
        router: &Self::Weight,
        gate_up: &Self::Weight,
        down: &Self::Weight,
        layout: &MoeLayout,
        part_len: usize,
        scratch: &mut MoeScratch<Self::Tensor>,
        out: &mut Self::Tensor,
    ) -> Result<()> {
        let _ = (x, router, gate_up, down, layout, part_len, scratch, out);
        anyhow::bail!(
            "exactly summed mixture-of-experts layers are not implemented on {}",
            self.device_name()
        )
    }

    /// A pre-norm block's input side: `normed = rms_norm(x) * norm_weight`, then
    /// `out = normed @ w^T (+ bias)`. A backend may fuse the two (and then need not fill
    /// `normed`).
    #[allow(clippy::too_many_arguments)] // the norm's and the projection's operands
    fn norm_linear(
        &self,
        x: &Self::Tensor,
        norm_weight: &Self::Vector,
        eps: f32,
        normed: &mut Self::Tensor,
        w: &Self::Weight,
        bias: Option<&Self::Vector>,
        out: &mut Self::Tensor,
    ) -> Result<()> {
        self.rms_norm(x, norm_weight, eps, normed)?;
        self.linear(normed, w, bias, out)
    }

    /// A block's output side: `residual += x @ w^T`. `scratch` (`[rows, w.rows]`) holds the
    /// product where the backend does not fuse the add.
    fn linear_add(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        residual: &mut Self::Tensor,
        scratch: &mut Self::Tensor,
    ) -> Result<()> {
        self.linear(x, w, None, scratch)?;
        self.add_inplace(residual, scratch)
    }

    /// `out = activation(gate) * up` where `gate_up` rows are `[gate | up]`: `silu_and_mul`
    /// or `gelu_tanh_and_mul`.
    fn act_and_mul(
        &self,
        activation: MlpActivation,
        gate_up: &Self::Tensor,
        out: &mut Self::Tensor,
    ) -> Result<()> {
        match activation {
            MlpActivation::Silu => self.silu_and_mul(gate_up, out),
            MlpActivation::GeluTanh => self.gelu_tanh_and_mul(gate_up, out),
        }
    }

    /// The MLP's second half: `act = activation(gate) * up`, then `out = act @ down^T`. A
    /// backend may fuse the two (and then need not fill `act`); the result is the same
    /// either way (the product is rounded to the activation type before the projection).
    fn gated_linear(
        &self,
        activation: MlpActivation,
        gate_up: &Self::Tensor,
        down: &Self::Weight,
        act: &mut Self::Tensor,
        out: &mut Self::Tensor,
    ) -> Result<()> {
        self.act_and_mul(activation, gate_up, act)?;
        self.linear(act, down, None, out)
    }

    /// The MLP's output side: `residual += (activation(gate) * up) @ down^T`; `act` and
    /// `scratch` hold the intermediates where the backend does not fuse them.
    fn gated_linear_add(
        &self,
        activation: MlpActivation,
        gate_up: &Self::Tensor,
        down: &Self::Weight,
        act: &mut Self::Tensor,
        residual: &mut Self::Tensor,
        scratch: &mut Self::Tensor,
    ) -> Result<()> {
        self.gated_linear(activation, gate_up, down, act, scratch)?;
        self.add_inplace(residual, scratch)
    }

    /// `gated_linear_add` with SiLU.
    fn silu_mul_linear_add(
        &self,
        gate_up: &Self::Tensor,
        down: &Self::Weight,
        act: &mut Self::Tensor,
        residual: &mut Self::Tensor,
        scratch: &mut Self::Tensor,
    ) -> Result<()> {
        self.gated_linear_add(MlpActivation::Silu, gate_up, down, act, residual, scratch)
    }

    /// `gated_linear` with SiLU.
    fn silu_mul_linear(
        &self,
        gate_up: &Self::Tensor,
        down: &Self::Weight,
        act: &mut Self::Tensor,
        out: &mut Self::Tensor,
    ) -> Result<()> {
        self.gated_linear(MlpActivation::Silu, gate_up, down, act, out)
    }

    /// `out[r] = x[logits_rows[range.start + r]]`: picks the rows whose logits are wanted
    /// (a range, so that very many rows can be pushed through the LM head in chunks).
    fn gather_rows(
        &self,
        x: &Self::Tensor,
        step: &Self::StepMeta,
        range: Range<usize>,
        out: &mut Self::Tensor,
    ) -> Result<()>;
}
