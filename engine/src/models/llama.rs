//! The decoder of every supported family (Llama 2/3, SmolLM, Mistral, Qwen2/3, Phi-3/4,
//! Gemma 2/3), written once against `Backend`; what a family does differently is data
//! (`spec::DecoderSpec`, one `LayerSpec` a layer). Weights are fused at load: q/k/v into one
//! `qkv` matrix, gate/up into one `gate_up` matrix (Phi-3 stores them so), so that each layer
//! runs four GEMMs.
use anyhow::{bail, ensure, Context, Result};

use super::config::{MlpActivation, ModelConfig};
use super::spec::DecoderSpec;
use super::weights::{DType, HostData, HostTensor, WeightMap};
use crate::backend::dummy_weight::DummyWeight;
use crate::backend::parallel::{check_divisible, row_parallel_parts, TpShard};
use crate::backend::{Activation, Backend, ForwardBatch, MoeScratch};

/// Rows pushed through the LM head at once: bounds the logits buffer when many rows are
/// wanted (prompt logprobs over a long prefill).
const LOGITS_CHUNK_ROWS: usize = 64;

struct LlamaLayer<B: Backend> {
    input_norm: B::Vector,
    qkv: B::Weight,
    qkv_bias: Option<B::Vector>,
    /// Per-head norms of q and k (Qwen3, Gemma 3).
    q_norm: Option<B::Vector>,
    k_norm: Option<B::Vector>,
    o_proj: B::Weight,
    /// Norm of the attention output before the residual add (Gemma's
    /// `post_attention_layernorm`).
    attn_out_norm: Option<B::Vector>,
    /// The MLP's input norm (`post_attention_layernorm` in Llama, `pre_feedforward_layernorm`
    /// in Gemma).
    mlp_norm: B::Vector,
    /// Norm of the MLP output before the residual add (Gemma).
    mlp_out_norm: Option<B::Vector>,
    /// The dense MLP's `[gate | up]` and down, or a mixture's experts stacked (`Backend::moe`).
    gate_up: B::Weight,
    down: B::Weight,
    /// A mixture of experts' router (None: a dense MLP).
    router: Option<B::Weight>,
}

pub struct LlamaModel<B: Backend> {
    /// This rank's dimensions (`rank_config`): the whole model's for a single rank.
    config: ModelConfig,
    spec: DecoderSpec,
    /// Which rank of a tensor-parallel group this is (`TpShard::whole()` alone).
    shard: TpShard,
    /// The embedding and LM head hold this rank's part of the vocabulary
    /// (`TpShard::vocab_rows`); otherwise they are whole on every rank.
    vocab_parallel: bool,
    /// The parts the row-parallel projections' inner dimension is summed in where the
    /// backend sums them exactly (`Backend::sums_row_parallel_exactly`): O's, and the dense
    /// MLP's down.
    o_part_len: usize,
    down_part_len: usize,
    /// The experts' down projections' parts (mixture layers).
    expert_part_len: usize,
    embed: B::Weight,
    /// None: tied to the embedding table.
    lm_head: Option<B::Weight>,
    layers: Vec<LlamaLayer<B>>,
    final_norm: B::Vector,
    /// Inverse frequencies of the global RoPE and, where the sliding layers have their own
    /// (Gemma 3), of the local one.
    inv_freq: Vec<B::Vector>,
}

/// Activation buffers reused by every step (allocated for the largest step seen).
pub struct Workspace<B: Backend> {
    capacity: usize,
    residual: B::Tensor,
    normed: B::Tensor,
    qkv: B::Tensor,
    attn: B::Tensor,
    proj: B::Tensor,
    gate_up: B::Tensor,
    act: B::Tensor,
    gathered: B::Tensor,
    logits: B::Tensor,
    /// A vocabulary-parallel LM head's logits: this rank's part, and every rank's side by
    /// side (made by the first step that computes logits).
    vocab_logits: Option<(B::Tensor, B::Tensor)>,
    host: Vec<f32>,
    /// Mixture-of-experts buffers, for models that have such layers.
    moe: Option<MoeScratch<B::Tensor>>,
}

impl<B: Backend> Workspace<B> {
    /// Final hidden states of the last step (after the final norm).
    pub fn normed(&self) -> &B::Tensor {
        &self.normed
    }
    pub fn capacity(&self) -> usize {
        self.capacity
    }
    /// Buffers for steps of up to `max_tokens` tokens.
    pub fn new(be: &B, config: &ModelConfig, max_tokens: usize) -> Result<Self> {
        let c = config;
        let t = max_tokens.max(1);
        let logits_rows = LOGITS_CHUNK_ROWS.min(t);
        Ok(Self {
            capacity: t,
            residual: be.alloc_activation(t, c.hidden_size)?,
            normed: be.alloc_activation(t, c.hidden_size)?,
            qkv: be.alloc_activation(t, c.q_size() + 2 * c.kv_size())?,
            attn: be.alloc_activation(t, c.q_size())?,
            proj: be.alloc_activation(t, c.hidden_size)?,
            gate_up: be.alloc_activation(t, 2 * c.intermediate_size)?,
            act: be.alloc_activation(t, c.intermediate_size)?,
            gathered: be.alloc_activation(logits_rows, c.hidden_size)?,
            logits: be.alloc_activation(logits_rows, c.vocab_size)?,
            vocab_logits: None,
            host: Vec::new(),
            moe: super::moe::scratch(be, c, t)?,
        })
    }
}

/// Where weights come from: the files' tensors, or deterministic random ones
/// (`--load-format dummy`).
struct WeightSource {
    map: Option<WeightMap>,
    seed: u64,
}

impl WeightSource {
    /// A tensor on the host (vectors: norms, biases).
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        match &mut self.map {
            Some(m) => m.take(name, shape),
            None => Ok(dummy_tensor(name, shape, self.seed)),
        }
    }

    /// A matrix: the files' tensor, or a dummy one's description (made where it is uploaded).
    fn matrix(&mut self, name: &str, shape: &[usize]) -> Result<Pending> {
        match &mut self.map {
            Some(m) => Ok(Pending::Host(m.take(name, shape)?)),
            None => Ok(Pending::Dummy(DummyWeight::new(name, shape, self.seed))),
        }
    }
}

/// A weight on its way to the backends: the files' tensor on the host, or a dummy weight that
/// each backend makes itself (`Backend::upload_dummy_weight`: on a GPU, in device memory).
enum Pending {
    Host(HostTensor),
    Dummy(DummyWeight),
}

/// `concat_rows` of either kind (all parts come from one source).
fn fuse(name: &str, parts: Vec<Pending>) -> Result<Pending> {
    if parts.iter().all(|p| matches!(p, Pending::Dummy(_))) {
        let parts = parts.into_iter().filter_map(|p| match p {
            Pending::Dummy(w) => Some(w),
            Pending::Host(_) => None,
        });
        return Ok(Pending::Dummy(DummyWeight::stack(name, parts.collect())?));
    }
    let mut host = Vec::with_capacity(parts.len());
    for p in parts {
        match p {
            Pending::Host(t) => host.push(t),
            Pending::Dummy(_) => bail!("cannot fuse `{name}`: files' and dummy tensors mixed"),
        }
    }
    Ok(Pending::Host(concat_rows(name, host)?))
}

/// A mixture layer's dummy router and stacked experts, as `moe::stacked_experts` stacks the
/// files' (each expert's gate, up and down under its own name).
fn dummy_experts(
    c: &ModelConfig,
    layer: usize,
    m: &crate::types::MoeLayout,
    seed: u64,
) -> Result<[Pending; 3]> {
    let (h, i, arch) = (c.hidden_size, m.intermediate_size, c.architecture);
    let one = |name: &str, shape: &[usize]| DummyWeight::new(name, shape, seed);
    let router = one(&super::moe::router_name(arch, layer), &[m.num_experts, h]);
    let (mut gate_up, mut down) = (Vec::new(), Vec::new());
    for e in 0..m.num_experts {
        let [g, u, d] = super::moe::expert_names(arch, layer, e);
        gate_up.extend([one(&g, &[i, h]), one(&u, &[i, h])]);
        down.push(one(&d, &[h, i]));
    }
    Ok([
        Pending::Dummy(router),
        Pending::Dummy(DummyWeight::stack("experts.gate_up", gate_up)?),
        Pending::Dummy(DummyWeight::stack("experts.down", down)?),
    ])
}

/// Random weights that keep activations finite (`DummyWeight::new`), on the host.
fn dummy_tensor(name: &str, shape: &[usize], seed: u64) -> HostTensor {
    let mut t = DummyWeight::new(name, shape, seed).to_host();
    t.shape = shape.to_vec();
    t
}

/// Stacks tensors along their first dimension (fusing q/k/v or gate/up). Keeps the common
/// dtype so that a bf16 checkpoint stays bf16 on the way to a GPU.
pub(super) fn concat_rows(name: &str, parts: Vec<HostTensor>) -> Result<HostTensor> {
    let tail = parts[0].shape[1..].to_vec();
    ensure!(
        parts.iter().all(|p| p.shape[1..] == tail[..]),
        "cannot fuse `{name}`: inner shapes differ"
    );
    let rows = parts.iter().map(|p| p.shape[0]).sum::<usize>();
    let mut shape = vec![rows];
    shape.extend_from_slice(&tail);
    let same = parts.iter().all(|p| p.dtype() == parts[0].dtype());
    let numel = rows * tail.iter().product::<usize>();
    // Whole-slice appends: these tensors are the bulk of the model, so no per-element work.
    let data = match parts[0].dtype() {
        DType::F16 if same => {
            let mut out = Vec::with_capacity(numel);
            for p in parts {
                if let HostData::F16(v) = p.data {
                    out.extend_from_slice(&v);
                }
            }
            HostData::F16(out)
        }
        DType::BF16 if same => {
            let mut out = Vec::with_capacity(numel);
            for p in parts {
                if let HostData::BF16(v) = p.data {
                    out.extend_from_slice(&v);
                }
            }
            HostData::BF16(out)
        }
        _ => {
            let mut out = Vec::with_capacity(numel);
            for p in parts {
                match p.data {
                    HostData::F32(v) => out.extend_from_slice(&v),
                    HostData::F16(v) => out.extend(v.iter().map(|x| x.to_f32())),
                    HostData::BF16(v) => out.extend(v.iter().map(|x| x.to_f32())),
                }
            }
            HostData::F32(out)
        }
    };
    Ok(HostTensor { shape, data })
}

/// How a rank's part of a tensor is cut from the whole (`TpShard`'s cuts).
#[derive(Debug, Clone, Copy)]
enum Cut {
    Whole,
    Qkv {
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
    },
    GateUp {
        inter: usize,
        blocks: usize,
    },
    Columns {
        n: usize,
        unit: usize,
    },
    /// A `[vocab, hidden]` table's rows of this rank's part of the vocabulary, zero-padded.
    Vocab,
}

impl Cut {
    fn host(self, sh: &TpShard, t: &HostTensor) -> Result<HostTensor> {
        match self {
            Cut::Whole => Ok(t.clone()),
            Cut::Qkv {
                heads,
                kv_heads,
                head_dim,
            } => sh.qkv(t, heads, kv_heads, head_dim),
            Cut::GateUp { inter, blocks } => sh.gate_up(t, inter, blocks),
            Cut::Columns { n, unit } => sh.columns(t, n, unit),
            Cut::Vocab => sh.vocab_rows(t),
        }
    }

    /// The same cut of a dummy weight: the rows (or columns) it keeps are read off the host
    /// cut of a column (or row) of their indices, so both paths share `TpShard`'s rule.
    fn dummy(self, sh: &TpShard, w: &DummyWeight) -> Result<DummyWeight> {
        if sh.is_whole() || matches!(self, Cut::Whole) {
            return Ok(w.clone());
        }
        // Zero padding rows are no dummy weight's: `load_ranks` cuts such tables on the host.
        ensure!(
            !matches!(self, Cut::Vocab),
            "a dummy vocabulary table is cut on the host"
        );
        let [rows, cols] = w.shape();
        let by_columns = matches!(self, Cut::Columns { .. });
        let n = if by_columns { cols } else { rows };
        ensure!(
            n <= 1 << 24,
            "a dummy weight of {n} rows or columns is too large to shard"
        );
        let shape = if by_columns { vec![1, n] } else { vec![n, 1] };
        let index = HostTensor {
            shape,
            data: HostData::F32((0..n).map(|i| i as f32).collect()),
        };
        let kept: Vec<usize> = self
            .host(sh, &index)?
            .to_f32()
            .into_iter()
            .map(|i| i as usize)
            .collect();
        let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
        for i in kept {
            match runs.last_mut() {
                Some(r) if r.end == i => r.end += 1,
                _ => runs.push(i..i + 1),
            }
        }
        if by_columns {
            ensure!(
                runs.len() == 1,
                "a column cut keeps one range, not {runs:?}"
            );
            w.select_columns(runs[0].clone())
        } else {
            w.select_rows(&runs)
        }
    }
}

/// Rank `sh`'s part of `t`; a single rank takes `t` itself (moved, never copied).
fn part_of(t: &mut Option<HostTensor>, sh: &TpShard, cut: Cut) -> Result<HostTensor> {
    if sh.is_whole() {
        return t.take().context("a tensor was handed out twice");
    }
    cut.host(sh, t.as_ref().context("a tensor was handed out already")?)
}

/// The dimensions one rank of `tp` runs: its query heads, KV heads (one when they are
/// replicated), MLP width and experts' width. Hidden size, vocabulary and everything else
/// stay whole.
pub fn rank_config(c: &ModelConfig, tp: usize) -> ModelConfig {
    let mut local = c.clone();
    if tp > 1 {
        local.num_attention_heads /= tp;
        local.num_key_value_heads = (c.num_key_value_heads / tp).max(1);
        local.intermediate_size /= tp;
        if let Some(m) = local.family.moe.as_mut() {
            m.intermediate_size /= tp;
        }
    }
    local
}

/// One layer's uploads, one entry a rank, handed out last rank first.
struct RankParts<B: Backend> {
    input_norm: Vec<B::Vector>,
    qkv: Vec<B::Weight>,
    qkv_bias: Option<Vec<B::Vector>>,
    q_norm: Option<Vec<B::Vector>>,
    k_norm: Option<Vec<B::Vector>>,
    o_proj: Vec<B::Weight>,
    attn_out_norm: Option<Vec<B::Vector>>,
    mlp_norm: Vec<B::Vector>,
    mlp_out_norm: Option<Vec<B::Vector>>,
    gate_up: Vec<B::Weight>,
    down: Vec<B::Weight>,
    router: Option<Vec<B::Weight>>,
}

impl<B: Backend> RankParts<B> {
    fn pop(&mut self) -> Result<LlamaLayer<B>> {
        fn one<T>(v: &mut Vec<T>) -> Result<T> {
            v.pop().context("a layer has fewer parts than ranks")
        }
        fn maybe<T>(v: &mut Option<Vec<T>>) -> Result<Option<T>> {
            v.as_mut().map(one).transpose()
        }
        Ok(LlamaLayer {
            input_norm: one(&mut self.input_norm)?,
            qkv: one(&mut self.qkv)?,
            qkv_bias: maybe(&mut self.qkv_bias)?,
            q_norm: maybe(&mut self.q_norm)?,
            k_norm: maybe(&mut self.k_norm)?,
            o_proj: one(&mut self.o_proj)?,
            attn_out_norm: maybe(&mut self.attn_out_norm)?,
            mlp_norm: one(&mut self.mlp_norm)?,
            mlp_out_norm: maybe(&mut self.mlp_out_norm)?,
            gate_up: one(&mut self.gate_up)?,
            down: one(&mut self.down)?,
            router: maybe(&mut self.router)?,
        })
    }
}

impl<B: Backend> LlamaModel<B> {
    /// Builds the model on `be` from the files' weights, or (None) from deterministic random
    /// weights (seed 0).
    pub fn load(be: &B, config: &ModelConfig, weights: Option<WeightMap>) -> Result<Self> {
        Self::load_with_seed(be, config, weights, 0)
    }

    pub fn load_with_seed(
        be: &B,
        config: &ModelConfig,
        weights: Option<WeightMap>,
        seed: u64,
    ) -> Result<Self> {
        let mut ranks = Self::load_ranks(std::slice::from_ref(be), config, weights, seed)?;
        ranks.pop().context("loading produced no model")
    }

    /// One model a backend: with several, the ranks of a tensor-parallel group, rank i on
    /// `bes[i]` (whose backend must reduce through rank i's communicator). Each rank holds its
    /// query heads and KV heads (KV heads replicated when fewer than the ranks), its slice of
    /// the MLP (and of every expert's), the matching columns of O and down; the norms and the
    /// router are replicated. The embedding and the LM head (tied or not) are split over the
    /// vocabulary where the backend can (`Backend::VOCAB_PARALLEL`), else replicated.
    pub fn load_ranks(
        bes: &[B],
        config: &ModelConfig,
        weights: Option<WeightMap>,
        seed: u64,
    ) -> Result<Vec<Self>> {
        let c = config;
        let tp = bes.len();
        ensure!(
            c.num_key_value_heads > 0
                && c.num_attention_heads.is_multiple_of(c.num_key_value_heads),
            "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
            c.num_attention_heads,
            c.num_key_value_heads
        );
        ensure!(
            c.head_dim > 0 && c.head_dim.is_multiple_of(2),
            "head_dim ({}) must be even and non-zero",
            c.head_dim
        );
        check_divisible(
            tp,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.intermediate_size,
            c.family.moe.as_ref().map(|m| m.intermediate_size),
        )?;
        // The files' shapes come from the whole model; each rank runs its own part.
        let file_spec = DecoderSpec::new(c);
        let local = rank_config(c, tp);
        let spec = DecoderSpec::new(&local);
        // Refused before a single weight is read or uploaded.
        for be in bes {
            be.check_decoder(&spec, c.context_len())?;
        }
        let shards: Vec<TpShard> = (0..tp).map(|rank| TpShard { rank, size: tp }).collect();
        let vocab_parallel = tp > 1 && B::VOCAB_PARALLEL;
        let vocab_cut = if vocab_parallel {
            Cut::Vocab
        } else {
            Cut::Whole
        };
        let parts = row_parallel_parts(
            c.num_attention_heads,
            c.intermediate_size,
            c.family.moe.as_ref().map(|m| m.intermediate_size),
        );
        let (h, q, kv, inter, vocab) = (
            c.hidden_size,
            c.q_size(),
            c.kv_size(),
            c.intermediate_size,
            c.vocab_size,
        );
        let (heads, kv_heads, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let lm_head_in_files = weights
            .as_ref()
            .is_some_and(|m| m.contains("lm_head.weight"));
        let tied = c.tie_word_embeddings || (weights.is_some() && !lm_head_in_files);
        let mut src = WeightSource { map: weights, seed };
        // Gemma's norms scale by 1 + w: the 1 is added once here, in f32.
        let plus_one = spec.norm_plus_one;
        let norm = |src: &mut WeightSource, name: &str, len: usize| -> Result<HostTensor> {
            let mut t = src.take(name, &[len])?;
            if plus_one {
                let data = t.to_f32().into_iter().map(|w| w + 1.0).collect();
                t = HostTensor {
                    shape: vec![len],
                    data: HostData::F32(data),
                };
            }
            Ok(t)
        };
        // Each rank's upload of its part of `t` (`t` itself, moved, for a single rank).
        let weights_of = |name: &str, t: Pending, cut: Cut| -> Result<Vec<B::Weight>> {
            let t = match t {
                Pending::Host(t) => t,
                // Its padded rows are no dummy weight's: made on the host and cut there.
                Pending::Dummy(w) if matches!(cut, Cut::Vocab) => {
                    let mut t = w.to_host();
                    t.shape = w.shape().to_vec();
                    t
                }
                Pending::Dummy(w) => {
                    return bes
                        .iter()
                        .zip(&shards)
                        .map(|(be, sh)| be.upload_dummy_weight(name, &cut.dummy(sh, &w)?))
                        .collect();
                }
            };
            let mut t = Some(t);
            bes.iter()
                .zip(&shards)
                .map(|(be, sh)| be.upload_weight(name, part_of(&mut t, sh, cut)?))
                .collect()
        };
        let vectors_of = |name: &str, t: HostTensor, cut: Cut| -> Result<Vec<B::Vector>> {
            let mut t = Some(t);
            bes.iter()
                .zip(&shards)
                .map(|(be, sh)| be.upload_vector(name, part_of(&mut t, sh, cut)?))
                .collect()
        };
        let whole = Cut::Whole;
        let qkv_part = Cut::Qkv {
            heads,
            kv_heads,
            head_dim: d,
        };
        let o_part = Cut::Columns { n: heads, unit: d };

        let embed_name = "model.embed_tokens.weight";
        let mut embed = weights_of(embed_name, src.matrix(embed_name, &[vocab, h])?, vocab_cut)?;
        let mut layers: Vec<Vec<LlamaLayer<B>>> = (0..tp)
            .map(|_| Vec::with_capacity(c.num_hidden_layers))
            .collect();
        for (i, ls) in file_spec.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let n = |s: &str| format!("{p}.{s}");
            let input_norm = norm(&mut src, &n("input_layernorm.weight"), h)?;
            let qkv = if spec.fused_projections {
                src.matrix(&n("self_attn.qkv_proj.weight"), &[q + 2 * kv, h])?
            } else {
                fuse(
                    &n("self_attn.qkv"),
                    vec![
                        src.matrix(&n("self_attn.q_proj.weight"), &[q, h])?,
                        src.matrix(&n("self_attn.k_proj.weight"), &[kv, h])?,
                        src.matrix(&n("self_attn.v_proj.weight"), &[kv, h])?,
                    ],
                )?
            };
            let qkv_bias = if c.attention_bias {
                Some(concat_rows(
                    &n("self_attn.qkv_bias"),
                    vec![
                        src.take(&n("self_attn.q_proj.bias"), &[q])?,
                        src.take(&n("self_attn.k_proj.bias"), &[kv])?,
                        src.take(&n("self_attn.v_proj.bias"), &[kv])?,
                    ],
                )?)
            } else {
                None
            };
            let (q_norm, k_norm) = if ls.qk_norm {
                (
                    Some(norm(&mut src, &n("self_attn.q_norm.weight"), c.head_dim)?),
                    Some(norm(&mut src, &n("self_attn.k_norm.weight"), c.head_dim)?),
                )
            } else {
                (None, None)
            };
            let o_proj = src.matrix(&n("self_attn.o_proj.weight"), &[h, q])?;
            let post_attn = norm(&mut src, &n("post_attention_layernorm.weight"), h)?;
            let mlp_norm_name = match ls.sandwich_norms {
                true => "pre_feedforward_layernorm.weight",
                false => "post_attention_layernorm.weight",
            };
            let (attn_out_norm, mlp_norm, mlp_out_norm) = if ls.sandwich_norms {
                (
                    Some(post_attn),
                    norm(&mut src, &n("pre_feedforward_layernorm.weight"), h)?,
                    Some(norm(&mut src, &n("post_feedforward_layernorm.weight"), h)?),
                )
            } else {
                (None, post_attn, None)
            };
            let (mut router, mut experts_down) = (None, None);
            // The MLP's width and how many [gate | up] blocks it stacks (one a expert).
            let (mlp_inter, mlp_blocks) = match &ls.moe {
                Some(m) => (m.intermediate_size, m.num_experts),
                None => (inter, 1),
            };
            let gate_up = if let Some(m) = &ls.moe {
                let [r, gate_up, down] = match src.map.as_mut() {
                    Some(map) => {
                        super::moe::stacked_experts(c, i, m, |name, shape| map.take(name, shape))?
                            .map(Pending::Host)
                    }
                    None => dummy_experts(c, i, m, src.seed)?,
                };
                let router_name = super::moe::router_name(c.architecture, i);
                router = Some(weights_of(&router_name, r, whole)?);
                experts_down = Some(down);
                gate_up
            } else if spec.fused_projections {
                src.matrix(&n("mlp.gate_up_proj.weight"), &[2 * inter, h])?
            } else {
                fuse(
                    &n("mlp.gate_up"),
                    vec![
                        src.matrix(&n("mlp.gate_proj.weight"), &[inter, h])?,
                        src.matrix(&n("mlp.up_proj.weight"), &[inter, h])?,
                    ],
                )?
            };
            let down = match experts_down {
                Some(d) => d,
                None => src.matrix(&n("mlp.down_proj.weight"), &[h, inter])?,
            };
            let gate_up_part = Cut::GateUp {
                inter: mlp_inter,
                blocks: mlp_blocks,
            };
            let down_part = Cut::Columns {
                n: mlp_inter,
                unit: 1,
            };
            let vectors = |name: &str, t: Option<HostTensor>, cut: Cut| {
                t.map(|t| vectors_of(name, t, cut)).transpose()
            };
            let mut ranks = RankParts {
                input_norm: vectors_of(&n("input_layernorm.weight"), input_norm, whole)?,
                qkv: weights_of(&n("self_attn.qkv"), qkv, qkv_part)?,
                qkv_bias: vectors(&n("self_attn.qkv_bias"), qkv_bias, qkv_part)?,
                q_norm: vectors(&n("self_attn.q_norm.weight"), q_norm, whole)?,
                k_norm: vectors(&n("self_attn.k_norm.weight"), k_norm, whole)?,
                o_proj: weights_of(&n("self_attn.o_proj.weight"), o_proj, o_part)?,
                attn_out_norm: vectors(
                    &n("post_attention_layernorm.weight"),
                    attn_out_norm,
                    whole,
                )?,
                mlp_norm: vectors_of(&n(mlp_norm_name), mlp_norm, whole)?,
                mlp_out_norm: vectors(
                    &n("post_feedforward_layernorm.weight"),
                    mlp_out_norm,
                    whole,
                )?,
                gate_up: weights_of(&n("mlp.gate_up"), gate_up, gate_up_part)?,
                down: weights_of(&n("mlp.down_proj.weight"), down, down_part)?,
                router,
            };
            // Hand each rank its parts, last rank first (`pop`).
            for rank_layers in layers.iter_mut().rev() {
                rank_layers.push(ranks.pop()?);
            }
        }
        let mut final_norm = vectors_of(
            "model.norm.weight",
            norm(&mut src, "model.norm.weight", h)?,
            whole,
        )?;
        let mut lm_head = if tied {
            None
        } else {
            Some(weights_of(
                "lm_head.weight",
                src.matrix("lm_head.weight", &[vocab, h])?,
                vocab_cut,
            )?)
        };
        let ropes = if spec.has_local_rope() {
            vec![c.rope(false), c.rope(true)]
        } else {
            vec![c.rope(false)]
        };
        let mut inv_freq: Vec<Vec<B::Vector>> = (0..tp).map(|_| Vec::new()).collect();
        for (i, r) in ropes.into_iter().enumerate() {
            let name = if i == 0 {
                "rope_inv_freq"
            } else {
                "rope_local_inv_freq"
            };
            let t = HostTensor {
                shape: vec![r.inv_freq.len()],
                data: HostData::F32(r.inv_freq),
            };
            for (rank, v) in vectors_of(name, t, whole)?.into_iter().enumerate() {
                inv_freq[rank].push(v);
            }
        }
        let mut models = Vec::with_capacity(tp);
        for (rank, layers) in layers.into_iter().enumerate().rev() {
            models.push(Self {
                config: local.clone(),
                spec: spec.clone(),
                shard: shards[rank],
                vocab_parallel,
                o_part_len: q / parts,
                down_part_len: inter / parts,
                expert_part_len: c
                    .family
                    .moe
                    .as_ref()
                    .map_or(1, |m| m.intermediate_size / parts),
                embed: embed.pop().context("an embedding a rank")?,
                lm_head: match lm_head.as_mut() {
                    Some(v) => Some(v.pop().context("an LM head a rank")?),
                    None => None,
                },
                layers,
                final_norm: final_norm.pop().context("a final norm a rank")?,
                inv_freq: std::mem::take(&mut inv_freq[rank]),
            });
        }
        models.reverse();
        Ok(models)
    }

    /// The decoder's per-layer description.
    pub fn spec(&self) -> &DecoderSpec {
        &self.spec
    }

    /// The transformer body for an uploaded step: embedding, every layer (writing K/V into
    /// `kv`), final norm. Leaves the final hidden states in the workspace (`Workspace::normed`);
    /// launches work only, so that a GPU backend can capture it into a graph.
    pub fn forward_hidden(
        &self,
        be: &B,
        step: &B::StepMeta,
        kv: &mut B::KvCache,
        ws: &mut Workspace<B>,
    ) -> Result<()> {
        let eps = self.config.rms_norm_eps;
        if self.vocab_parallel {
            let first = self.shard.vocab(self.config.vocab_size).start;
            be.vocab_parallel_embedding(&self.embed, step, first, &mut ws.residual)?;
            // One rank holds each token's row, the others add zeros: exact.
            be.all_reduce_sum(&mut ws.residual)?;
        } else {
            be.embedding(&self.embed, step, &mut ws.residual)?;
        }
        if let Some(s) = self.spec.embed_scale {
            be.scale(&mut ws.residual, s)?;
        }
        // Each projection that ends a block adds into the residual stream itself
        // (`linear_add`), and each norm feeds the projection after it (`norm_linear`): a GPU
        // fuses both at batch 1, and adds by accumulating GEMMs otherwise. A block with an
        // output norm (Gemma) projects, normalizes, then adds.
        for (i, (l, ls)) in self.layers.iter().zip(&self.spec.layers).enumerate() {
            be.norm_linear(
                &ws.residual,
                &l.input_norm,
                eps,
                &mut ws.normed,
                &l.qkv,
                l.qkv_bias.as_ref(),
                &mut ws.qkv,
            )?;
            if let (Some(qn), Some(kn)) = (&l.q_norm, &l.k_norm) {
                be.qk_norm(&mut ws.qkv, qn, kn, eps, &ls.attention)?;
            }
            be.rope_attention(
                &mut ws.qkv,
                &self.inv_freq[ls.local_rope as usize],
                &ls.attention,
                step,
                kv,
                i,
                &mut ws.attn,
            )?;
            match &l.attn_out_norm {
                None => self.row_parallel_add(
                    be,
                    &ws.attn,
                    &l.o_proj,
                    self.o_part_len,
                    &mut ws.residual,
                    &mut ws.proj,
                )?,
                Some(w) => {
                    self.row_parallel(be, &ws.attn, &l.o_proj, self.o_part_len, &mut ws.proj)?;
                    be.rms_norm_add(&ws.proj, w, eps, &mut ws.normed, &mut ws.residual)?;
                }
            }
            if let (Some(router), Some(moe)) = (&l.router, &ls.moe) {
                be.rms_norm(&ws.residual, &l.mlp_norm, eps, &mut ws.normed)?;
                let scratch = ws
                    .moe
                    .as_mut()
                    .context("the workspace has no mixture-of-experts buffers")?;
                if be.sums_row_parallel_exactly() {
                    // Reduced inside, exactly, as `row_parallel` does.
                    be.row_parallel_moe(
                        &ws.normed,
                        router,
                        &l.gate_up,
                        &l.down,
                        moe,
                        self.expert_part_len,
                        scratch,
                        &mut ws.proj,
                    )?;
                } else if self.reduces(be) || l.mlp_out_norm.is_some() {
                    be.moe(
                        &ws.normed,
                        router,
                        &l.gate_up,
                        &l.down,
                        moe,
                        scratch,
                        &mut ws.proj,
                    )?;
                    // Each rank's experts hold a slice of every expert's MLP: partial sums.
                    if self.reduces(be) {
                        be.all_reduce_sum(&mut ws.proj)?;
                    }
                } else {
                    // One rank, no output norm: the experts add into the residual stream.
                    be.moe_add(
                        &ws.normed,
                        router,
                        &l.gate_up,
                        &l.down,
                        moe,
                        scratch,
                        &mut ws.residual,
                        &mut ws.proj,
                    )?;
                    continue;
                }
                match &l.mlp_out_norm {
                    None => be.add_inplace(&mut ws.residual, &ws.proj)?,
                    Some(w) => {
                        be.rms_norm_add(&ws.proj, w, eps, &mut ws.normed, &mut ws.residual)?
                    }
                }
                continue;
            }
            be.norm_linear(
                &ws.residual,
                &l.mlp_norm,
                eps,
                &mut ws.normed,
                &l.gate_up,
                None,
                &mut ws.gate_up,
            )?;
            match &l.mlp_out_norm {
                None => self.row_parallel_gated_add(
                    be,
                    ls.activation,
                    &ws.gate_up,
                    &l.down,
                    &mut ws.act,
                    &mut ws.residual,
                    &mut ws.proj,
                )?,
                Some(w) => {
                    self.row_parallel_gated(
                        be,
                        ls.activation,
                        &ws.gate_up,
                        &l.down,
                        &mut ws.act,
                        &mut ws.proj,
                    )?;
                    be.rms_norm_add(&ws.proj, w, eps, &mut ws.normed, &mut ws.residual)?;
                }
            }
        }
        be.rms_norm(&ws.residual, &self.final_norm, eps, &mut ws.normed)?;
        Ok(())
    }

    /// Whether row-parallel outputs are all-reduced: on every rank of a sharded model, and on
    /// a whole model whose backend is a group of one (the NCCL path at tensor-parallel size
    /// 1, which runs the single-GPU kernels and calls the collectives a rank calls).
    fn reduces(&self, be: &B) -> bool {
        !self.shard.is_whole() || be.in_tp_group()
    }

    /// Whether this rank adds the residual into its partial product before the all-reduce
    /// (rank 0; every rank when nothing is reduced).
    fn adds_residual(&self) -> bool {
        self.shard.rank == 0
    }

    /// `out = x @ w^T` for a row-parallel projection (O, down): on a rank of a group, `x` and
    /// `w` hold the rank's slice of the inner dimension, so the ranks' products are summed.
    /// A rank that sums exactly (`Backend::sums_row_parallel_exactly`, in parts of
    /// `part_len`) does so in a group of one too, so that one rank gives several's bits.
    fn row_parallel(
        &self,
        be: &B,
        x: &B::Tensor,
        w: &B::Weight,
        part_len: usize,
        out: &mut B::Tensor,
    ) -> Result<()> {
        if be.sums_row_parallel_exactly() {
            return be.row_parallel_linear(x, w, part_len, false, out);
        }
        be.linear(x, w, None, out)?;
        if self.reduces(be) {
            be.all_reduce_sum(out)?;
        }
        Ok(())
    }

    /// `residual += x @ w^T` for a row-parallel projection that ends a block. On a rank of a
    /// group the residual is folded into rank 0's partial product, as vLLM adds a
    /// row-parallel layer's bias on rank 0 only: rank 0 runs one GPU's fused product-and-add
    /// into the residual, the other ranks write their partial product there, and one
    /// in-place all-reduce of the residual completes the sum. So a rank runs the single-GPU
    /// kernels plus that collective, and every rank ends with the same residual bits.
    fn row_parallel_add(
        &self,
        be: &B,
        x: &B::Tensor,
        w: &B::Weight,
        part_len: usize,
        residual: &mut B::Tensor,
        scratch: &mut B::Tensor,
    ) -> Result<()> {
        if be.sums_row_parallel_exactly() {
            return be.row_parallel_linear(x, w, part_len, self.adds_residual(), residual);
        }
        if self.adds_residual() {
            be.linear_add(x, w, residual, scratch)?;
        } else {
            be.linear(x, w, None, residual)?;
        }
        self.all_reduce_residual(be, residual)
    }

    /// `out = (activation(gate) * up) @ down^T`, the down projection row-parallel (summed as
    /// `row_parallel` sums); a GPU fuses the activation into the GEMV at batch 1.
    fn row_parallel_gated(
        &self,
        be: &B,
        activation: MlpActivation,
        gate_up: &B::Tensor,
        down: &B::Weight,
        act: &mut B::Tensor,
        out: &mut B::Tensor,
    ) -> Result<()> {
        if be.sums_row_parallel_exactly() {
            be.act_and_mul(activation, gate_up, act)?;
            return be.row_parallel_linear(act, down, self.down_part_len, false, out);
        }
        be.gated_linear(activation, gate_up, down, act, out)?;
        if self.reduces(be) {
            be.all_reduce_sum(out)?;
        }
        Ok(())
    }

    /// `residual += (activation(gate) * up) @ down^T`, the down projection row-parallel:
    /// folded into rank 0's partial product as in `row_parallel_add`.
    #[allow(clippy::too_many_arguments)] // the activation's and the projection's operands
    fn row_parallel_gated_add(
        &self,
        be: &B,
        activation: MlpActivation,
        gate_up: &B::Tensor,
        down: &B::Weight,
        act: &mut B::Tensor,
        residual: &mut B::Tensor,
        scratch: &mut B::Tensor,
    ) -> Result<()> {
        if be.sums_row_parallel_exactly() {
            be.act_and_mul(activation, gate_up, act)?;
            let part_len = self.down_part_len;
            return be.row_parallel_linear(act, down, part_len, self.adds_residual(), residual);
        }
        if self.adds_residual() {
            be.gated_linear_add(activation, gate_up, down, act, residual, scratch)?;
        } else {
            be.gated_linear(activation, gate_up, down, act, residual)?;
        }
        self.all_reduce_residual(be, residual)
    }

    fn all_reduce_residual(&self, be: &B, residual: &mut B::Tensor) -> Result<()> {
        if self.reduces(be) {
            be.all_reduce_sum(residual)?;
        }
        Ok(())
    }

    /// Which rank of a tensor-parallel group this model is.
    pub fn shard(&self) -> TpShard {
        self.shard
    }

    /// The LM head matrix (the embedding table when tied).
    pub fn lm_head(&self) -> &B::Weight {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Runs one step: writes every token's K/V into `kv` and returns host f32 logits,
    /// `[batch.logits_rows.len(), vocab]` row-major.
    pub fn forward(
        &self,
        be: &B,
        batch: &ForwardBatch,
        kv: &mut B::KvCache,
        ws: &mut Workspace<B>,
    ) -> Result<Vec<f32>> {
        let mut logits = Vec::with_capacity(batch.logits_rows.len() * self.config.vocab_size);
        self.forward_chunked(be, batch, kv, ws, |_, chunk| {
            logits.extend_from_slice(chunk);
            Ok(())
        })?;
        Ok(logits)
    }

    /// What a rank other than the one that samples runs for a step: the body and, with a
    /// vocabulary-parallel LM head, its part of the logits (handed to the sampling rank by
    /// the all-gather).
    pub fn forward_peer(
        &self,
        be: &B,
        batch: &ForwardBatch,
        kv: &mut B::KvCache,
        ws: &mut Workspace<B>,
    ) -> Result<()> {
        if self.vocab_parallel {
            self.forward_chunked(be, batch, kv, ws, |_, _| Ok(()))
        } else {
            self.forward_body(be, batch, kv, ws).map(|_| ())
        }
    }

    /// The body of a step from its batch (checked, uploaded, the workspace grown to fit),
    /// leaving the final hidden states in `ws`: what a rank that computes no logits runs.
    pub fn forward_body(
        &self,
        be: &B,
        batch: &ForwardBatch,
        kv: &mut B::KvCache,
        ws: &mut Workspace<B>,
    ) -> Result<B::StepMeta> {
        let c = &self.config;
        batch
            .validate(&be.kv_cache_shape(kv), c.vocab_size)
            .context("invalid forward batch")?;
        if batch.num_tokens() > ws.capacity {
            *ws = Workspace::new(be, c, batch.num_tokens())?;
        }
        let step = be.upload_step(batch)?;
        self.forward_hidden(be, &step, kv, ws)?;
        Ok(step)
    }

    /// Like `forward`, but hands the host logits to `consume` a few rows at a time
    /// (`consume(first_row, rows x vocab)`, rows in `logits_rows` order), so that prompt
    /// logprobs over a long prefill never hold every row's logits at once.
    pub fn forward_chunked(
        &self,
        be: &B,
        batch: &ForwardBatch,
        kv: &mut B::KvCache,
        ws: &mut Workspace<B>,
        mut consume: impl FnMut(usize, &mut [f32]) -> Result<()>,
    ) -> Result<()> {
        let step = self.forward_body(be, batch, kv, ws)?;
        let lm_head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let rows = batch.logits_rows.len();
        let chunk = ws.gathered.capacity_rows().max(1);
        let vocab = self.config.vocab_size;
        let per_rank = self.shard.vocab_rows_per_rank(vocab);
        if self.vocab_parallel && ws.vocab_logits.is_none() {
            ws.vocab_logits = Some((
                be.alloc_activation(chunk, per_rank)?,
                be.alloc_activation(chunk, per_rank * self.shard.size)?,
            ));
        }
        for start in (0..rows).step_by(chunk) {
            let range = start..(start + chunk).min(rows);
            be.gather_rows(&ws.normed, &step, range, &mut ws.gathered)?;
            match ws.vocab_logits.as_mut().filter(|_| self.vocab_parallel) {
                None => {
                    be.linear(&ws.gathered, lm_head, None, &mut ws.logits)?;
                    be.to_host(&ws.logits, &mut ws.host)?;
                }
                Some((part, all)) => {
                    be.linear(&ws.gathered, lm_head, None, part)?;
                    be.all_gather_columns(part, all)?;
                    be.to_host(all, &mut ws.host)?;
                    drop_vocab_padding(&mut ws.host, per_rank * self.shard.size, vocab);
                }
            }
            // On the host: the logits are here anyway, and this is the only reader.
            if let Some(cap) = self.spec.final_logit_softcap {
                ws.host
                    .iter_mut()
                    .for_each(|x| *x = cap * (*x / cap).tanh());
            }
            consume(start, &mut ws.host)?;
        }
        Ok(())
    }
}

/// Rows of `padded` logits (every rank's part side by side) become rows of `vocab`, in
/// place: the padding past the vocabulary sits at the end of each row.
fn drop_vocab_padding(host: &mut Vec<f32>, padded: usize, vocab: usize) {
    let rows = host.len() / padded.max(1);
    for r in 0..rows {
        host.copy_within(r * padded..r * padded + vocab, r * vocab);
    }
    host.truncate(rows * vocab);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::backend::{KvCacheShape, SeqSlice};
    use crate::models::config::{Architecture, RopeScaling};

    const BS: usize = 4;

    fn tiny_config(arch: Architecture) -> ModelConfig {
        ModelConfig {
            architecture: arch,
            hidden_size: 64,
            intermediate_size: 96,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 16,
            vocab_size: 101,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: None,
            max_position_embeddings: 256,
            tie_word_embeddings: false,
            attention_bias: arch == Architecture::Qwen2,
            sliding_window: None,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
            torch_dtype: None,
            family: Default::default(),
        }
    }

    struct Harness {
        be: CpuBackend,
        model: LlamaModel<CpuBackend>,
        kv: <CpuBackend as Backend>::KvCache,
        ws: Workspace<CpuBackend>,
    }

    impl Harness {
        fn new(config: &ModelConfig) -> Self {
            let be = CpuBackend::new();
            let model = LlamaModel::load_with_seed(&be, config, None, 7).unwrap();
            let shape = KvCacheShape {
                num_layers: config.num_hidden_layers,
                num_blocks: 64,
                block_size: BS,
                num_kv_heads: config.num_key_value_heads,
                head_dim: config.head_dim,
            };
            let kv = be.alloc_kv_cache(shape).unwrap();
            let ws = Workspace::new(&be, config, 8).unwrap();
            Self { be, model, kv, ws }
        }

        /// Runs one step of (tokens, start_pos, block table) chunks, wanting logits for every
        /// token; returns each chunk's logits.
        fn step(&mut self, chunks: &[(&[u32], usize, &[u32])]) -> Vec<Vec<f32>> {
            let mut b = ForwardBatch::default();
            for &(toks, start, table) in chunks {
                b.seqs.push(SeqSlice {
                    token_offset: b.token_ids.len(),
                    num_tokens: toks.len(),
                    context_len: start + toks.len(),
                    block_table: table.to_vec(),
                });
                for (i, &t) in toks.iter().enumerate() {
                    let p = start + i;
                    b.logits_rows.push(b.token_ids.len() as u32);
                    b.token_ids.push(t);
                    b.positions.push(p as u32);
                    b.slot_mapping
                        .push(table[p / BS] * BS as u32 + (p % BS) as u32);
                }
            }
            let logits = self
                .model
                .forward(&self.be, &b, &mut self.kv, &mut self.ws)
                .unwrap();
            let v = self.model.config().vocab_size;
            assert_eq!(logits.len(), b.token_ids.len() * v);
            assert!(
                logits.iter().all(|x| x.is_finite()),
                "logits must stay finite"
            );
            b.seqs
                .iter()
                .map(|s| logits[s.token_offset * v..(s.token_offset + s.num_tokens) * v].to_vec())
                .collect()
        }

        /// Feeds `prompt` in chunks of the given sizes; returns all positions' logits.
        fn run_chunked(&mut self, prompt: &[u32], sizes: &[usize], table: &[u32]) -> Vec<f32> {
            let mut out = Vec::new();
            let mut pos = 0;
            for &n in sizes {
                out.extend(self.step(&[(&prompt[pos..pos + n], pos, table)]).remove(0));
                pos += n;
            }
            assert_eq!(pos, prompt.len());
            out
        }
    }

    fn prompt(n: usize, salt: u32) -> Vec<u32> {
        (0..n as u32)
            .map(|i| (i * 37 + salt * 11 + 5) % 101)
            .collect()
    }

    fn assert_close(a: &[f32], b: &[f32], what: &str) {
        assert_eq!(a.len(), b.len());
        let worst = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert!(worst <= 1e-4, "{what}: logits differ by up to {worst}");
    }

    fn configs() -> Vec<ModelConfig> {
        let llama = tiny_config(Architecture::Llama);
        let qwen = tiny_config(Architecture::Qwen2);
        let mut tied_llama3 = tiny_config(Architecture::Llama);
        tied_llama3.tie_word_embeddings = true;
        tied_llama3.rope_scaling = Some(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 32,
        });
        let mut mistral = tiny_config(Architecture::Mistral);
        mistral.sliding_window = Some(9);
        let mut qwen3_yarn = tiny_config(Architecture::Qwen3);
        qwen3_yarn.family.qk_norm = true;
        qwen3_yarn.rope_scaling = Some(RopeScaling::Yarn {
            factor: 4.0,
            original_max_position_embeddings: 16,
            beta_fast: 32.0,
            beta_slow: 1.0,
            attention_factor: 1.1,
            truncate: true,
        });
        let mut phi3 = tiny_config(Architecture::Phi3);
        phi3.family.fused_projections = true;
        phi3.family.rotary_dim = Some(8);
        phi3.rope_scaling = Some(RopeScaling::LongRope {
            short_factor: vec![1.0, 1.5, 2.0, 2.5],
            long_factor: vec![2.0, 3.0, 4.0, 5.0],
            original_max_position_embeddings: 16,
            attention_factor: 1.2,
        });
        let gemma = |arch: Architecture| {
            let mut g = tiny_config(arch);
            let f = &mut g.family;
            f.norm_plus_one = true;
            f.sandwich_norms = true;
            f.scale_embedding = true;
            f.activation = MlpActivation::GeluTanh;
            f.query_pre_attn_scalar = Some(24.0);
            f.sliding_layers = Some(vec![true, false]);
            g.sliding_window = Some(9);
            g.tie_word_embeddings = true;
            g
        };
        let mut gemma2 = gemma(Architecture::Gemma2);
        gemma2.family.attn_logit_softcap = Some(2.0);
        gemma2.family.final_logit_softcap = Some(3.0);
        let mut gemma3 = gemma(Architecture::Gemma3);
        gemma3.family.qk_norm = true;
        gemma3.family.local_rope = Some(crate::models::config::LocalRope {
            theta: 100.0,
            scaling: None,
        });
        gemma3.rope_scaling = Some(RopeScaling::Linear { factor: 8.0 });
        let moe = |experts, top_k, intermediate_size, renormalize, sparse_layers| {
            Some(crate::models::moe::MoeConfig {
                num_experts: experts,
                top_k,
                intermediate_size,
                renormalize,
                sparse_layers,
            })
        };
        let mut mixtral = tiny_config(Architecture::Mixtral);
        mixtral.family.moe = moe(4, 2, 96, true, vec![true, true]);
        // A dense layer before a sparse one, experts narrower than the dense MLP.
        let mut qwen3_moe = tiny_config(Architecture::Qwen3Moe);
        qwen3_moe.family.qk_norm = true;
        qwen3_moe.family.moe = moe(8, 3, 32, false, vec![false, true]);
        vec![
            llama,
            qwen,
            tied_llama3,
            mistral,
            qwen3_yarn,
            phi3,
            gemma2,
            gemma3,
            mixtral,
            qwen3_moe,
        ]
    }

    #[test]
    fn one_chunk_several_chunks_and_token_by_token_agree() {
        for config in configs() {
            let p = prompt(37, 0);
            let table: Vec<u32> = (0..10).map(|i| (i * 7 + 3) % 64).collect();
            let one = Harness::new(&config).run_chunked(&p, &[37], &table);
            let chunks = Harness::new(&config).run_chunked(&p, &[10, 15, 12], &table);
            let singles = Harness::new(&config).run_chunked(&p, &[1; 37], &table);
            let what = format!("{:?}", config.architecture);
            assert_close(&one, &chunks, &format!("{what}: one chunk vs three"));
            assert_close(
                &one,
                &singles,
                &format!("{what}: one chunk vs token by token"),
            );
        }
    }

    #[test]
    fn batching_two_sequences_gives_the_same_logits_as_each_alone() {
        for config in configs() {
            let (a, b) = (prompt(13, 1), prompt(22, 2));
            let (ta, tb): (Vec<u32>, Vec<u32>) = ((20..24).collect(), vec![9, 3, 40, 17, 5, 33]);
            let mut alone = Harness::new(&config);
            let a_alone = alone.run_chunked(&a, &[9, 1, 1, 1, 1], &ta);
            let mut alone = Harness::new(&config);
            let b_alone = alone.run_chunked(&b, &[4, 18], &tb);
            // Together: a prefills 9 while b prefills 4, then a decodes while b prefills 18,
            // then a keeps decoding alone.
            let mut h = Harness::new(&config);
            let mut a_b = h.step(&[(&a[..9], 0, &ta), (&b[..4], 0, &tb)]);
            let mut a_got = a_b.remove(0);
            let b1 = a_b.remove(0);
            let mut s2 = h.step(&[(&b[4..], 4, &tb), (&a[9..10], 9, &ta)]);
            let b_got: Vec<f32> = b1.into_iter().chain(s2.remove(0)).collect();
            a_got.extend(s2.remove(0));
            for i in 10..13 {
                a_got.extend(h.step(&[(&a[i..i + 1], i, &ta)]).remove(0));
            }
            let what = format!("{:?}", config.architecture);
            assert_close(
                &a_got,
                &a_alone,
                &format!("{what}: sequence a batched vs alone"),
            );
            assert_close(
                &b_got,
                &b_alone,
                &format!("{what}: sequence b batched vs alone"),
            );
        }
    }

    /// Each step's logits (rank 0's) with `config` split over `tp` ranks on threads.
    fn logits_over_ranks(config: &ModelConfig, tp: usize, steps: &[ForwardBatch]) -> Vec<Vec<f32>> {
        use crate::backend::parallel::{HostCommunicator, LocalGroup};
        let backends: Vec<CpuBackend> = LocalGroup::new(tp)
            .into_iter()
            .map(|g| {
                CpuBackend::new()
                    .with_communicator(std::sync::Arc::new(g) as std::sync::Arc<HostCommunicator>)
            })
            .collect();
        let models = LlamaModel::load_ranks(&backends, config, None, 7).unwrap();
        std::thread::scope(|s| {
            let ranks: Vec<_> = backends
                .iter()
                .zip(&models)
                .map(|(be, model)| {
                    s.spawn(move || {
                        let local = model.config();
                        let shape = KvCacheShape {
                            num_layers: local.num_hidden_layers,
                            num_blocks: 64,
                            block_size: BS,
                            num_kv_heads: local.num_key_value_heads,
                            head_dim: local.head_dim,
                        };
                        let mut kv = be.alloc_kv_cache(shape).unwrap();
                        let mut ws = Workspace::new(be, local, 8).unwrap();
                        let mut out = Vec::new();
                        for b in steps {
                            if model.shard().rank == 0 {
                                out.push(model.forward(be, b, &mut kv, &mut ws).unwrap());
                            } else {
                                model.forward_peer(be, b, &mut kv, &mut ws).unwrap();
                            }
                        }
                        out
                    })
                })
                .collect();
            ranks.into_iter().map(|h| h.join().unwrap()).next().unwrap()
        })
    }

    /// Every family split over 2 and 4 ranks (2 KV heads: replicated at 4) gives the whole
    /// model's logits to 1e-5 absolute (measured: the same bits), over a vocabulary of 101
    /// that splits unevenly (padded to 128: the last of 4 ranks holds 5 ids), tied and
    /// soft-capped heads and mixtures included; a prefill of two sequences, then decodes.
    #[test]
    fn split_models_give_the_whole_models_logits() {
        let (a, b) = (prompt(13, 1), prompt(6, 2));
        let (ta, tb): (Vec<u32>, Vec<u32>) = ((20..24).collect(), vec![9, 3]);
        let mut steps = Vec::new();
        let mut batch = |chunks: &[(&[u32], usize, &[u32])]| {
            let mut b = ForwardBatch::default();
            for &(toks, start, table) in chunks {
                b.seqs.push(SeqSlice {
                    token_offset: b.token_ids.len(),
                    num_tokens: toks.len(),
                    context_len: start + toks.len(),
                    block_table: table.to_vec(),
                });
                for (i, &t) in toks.iter().enumerate() {
                    let p = start + i;
                    b.logits_rows.push(b.token_ids.len() as u32);
                    b.token_ids.push(t);
                    b.positions.push(p as u32);
                    b.slot_mapping
                        .push(table[p / BS] * BS as u32 + (p % BS) as u32);
                }
            }
            steps.push(b);
        };
        batch(&[(&a[..9], 0, &ta), (&b[..5], 0, &tb)]);
        batch(&[(&a[9..10], 9, &ta), (&b[5..6], 5, &tb)]);
        batch(&[(&a[10..11], 10, &ta)]);
        for config in configs() {
            let whole = logits_over_ranks(&config, 1, &steps);
            for tp in [2, 4] {
                let split = logits_over_ranks(&config, tp, &steps);
                let worst = whole
                    .iter()
                    .flatten()
                    .zip(split.iter().flatten())
                    .map(|(x, y)| (x - y).abs())
                    .fold(0.0f32, f32::max);
                assert_eq!(
                    whole.iter().map(Vec::len).sum::<usize>(),
                    split.iter().map(Vec::len).sum::<usize>()
                );
                assert!(
                    worst <= 1e-5,
                    "{:?} TP {tp}: logits differ by {worst:e}",
                    config.architecture
                );
            }
        }
    }

    /// Every tensor name and shape of a checkpoint of `c`.
    fn checkpoint_tensors(c: &ModelConfig) -> Vec<(String, Vec<usize>)> {
        let (h, q, kv, i, v) = (
            c.hidden_size,
            c.q_size(),
            c.kv_size(),
            c.intermediate_size,
            c.vocab_size,
        );
        let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
        for l in 0..c.num_hidden_layers {
            let p = format!("model.layers.{l}");
            for (n, s) in [
                ("input_layernorm.weight", vec![h]),
                ("self_attn.q_proj.weight", vec![q, h]),
                ("self_attn.k_proj.weight", vec![kv, h]),
                ("self_attn.v_proj.weight", vec![kv, h]),
                ("self_attn.o_proj.weight", vec![h, q]),
                ("post_attention_layernorm.weight", vec![h]),
                ("mlp.gate_proj.weight", vec![i, h]),
                ("mlp.up_proj.weight", vec![i, h]),
                ("mlp.down_proj.weight", vec![h, i]),
            ] {
                out.push((format!("{p}.{n}"), s));
            }
        }
        out.push(("model.norm.weight".to_string(), vec![h]));
        out.push(("lm_head.weight".to_string(), vec![v, h]));
        out
    }

    #[test]
    fn loading_checks_shapes_and_ties_a_missing_lm_head() {
        let config = tiny_config(Architecture::Llama);
        let be = CpuBackend::new();
        let mut map = WeightMap::default();
        for (name, shape) in checkpoint_tensors(&config) {
            if name != "lm_head.weight" {
                map.tensors
                    .insert(name.clone(), dummy_tensor(&name, &shape, 3));
            }
        }
        let model = LlamaModel::load(&be, &config, Some(map)).unwrap();
        assert!(
            model.lm_head.is_none(),
            "no lm_head.weight in the files: tied to the embedding"
        );

        let mut bad = WeightMap::default();
        for (name, mut shape) in checkpoint_tensors(&config) {
            if name == "model.layers.1.mlp.up_proj.weight" {
                shape[0] += 1;
            }
            bad.tensors
                .insert(name.clone(), dummy_tensor(&name, &shape, 3));
        }
        let err = LlamaModel::load(&be, &config, Some(bad))
            .err()
            .expect("a wrong shape must be refused");
        assert!(
            err.to_string()
                .contains("model.layers.1.mlp.up_proj.weight"),
            "{err}"
        );
    }

    #[test]
    fn dummy_weights_are_deterministic_and_bounded() {
        let a = dummy_tensor("x.weight", &[300, 400], 1).to_f32();
        assert_eq!(a, dummy_tensor("x.weight", &[300, 400], 1).to_f32());
        assert_ne!(a, dummy_tensor("y.weight", &[300, 400], 1).to_f32());
        assert!(a.iter().all(|v| v.abs() <= 0.05) && a.iter().any(|v| v.abs() > 0.04));
        assert!(dummy_tensor("l.input_layernorm.weight", &[8], 1)
            .to_f32()
            .iter()
            .all(|&v| v == 1.0));
    }

    /// A dummy weight's description, fused and cut for a rank, holds the values the host gets
    /// by making each tensor, fusing them and cutting the result (what the CPU backend did
    /// before; a GPU makes the description's values on the device).
    #[test]
    fn dummy_weights_fused_and_cut_match_the_host_path() {
        let (h, heads, kv_heads, d, inter, experts) = (24, 8, 2, 4, 12, 3);
        let names = |prefix: &str, parts: &[(&str, usize)]| -> Vec<(String, Vec<usize>)> {
            parts
                .iter()
                .map(|(n, rows)| (format!("{prefix}.{n}.weight"), vec![*rows, h]))
                .collect()
        };
        let qkv = names(
            "l.self_attn",
            &[
                ("q_proj", heads * d),
                ("k_proj", kv_heads * d),
                ("v_proj", kv_heads * d),
            ],
        );
        let mut gate_up = Vec::new();
        for e in 0..experts {
            gate_up.extend(names(
                &format!("l.experts.{e}"),
                &[("gate", inter), ("up", inter)],
            ));
        }
        let o = vec![("l.o_proj.weight".to_string(), vec![h, heads * d])];
        let cases = [
            (
                qkv,
                Cut::Qkv {
                    heads,
                    kv_heads,
                    head_dim: d,
                },
            ),
            (
                gate_up,
                Cut::GateUp {
                    inter,
                    blocks: experts,
                },
            ),
            (o, Cut::Columns { n: heads, unit: d }),
        ];
        for (parts, cut) in cases {
            let host = concat_rows(
                "fused",
                parts.iter().map(|(n, s)| dummy_tensor(n, s, 5)).collect(),
            )
            .unwrap();
            let lazy = DummyWeight::stack(
                "fused",
                parts
                    .iter()
                    .map(|(n, s)| DummyWeight::new(n, s, 5))
                    .collect(),
            )
            .unwrap();
            for size in [1, 2, 4] {
                for rank in 0..size {
                    let sh = TpShard { rank, size };
                    let want = cut.host(&sh, &host).unwrap();
                    let got = cut.dummy(&sh, &lazy).unwrap().to_host();
                    assert_eq!(got.shape, want.shape, "{cut:?} rank {rank} of {size}");
                    assert_eq!(got.to_f32(), want.to_f32(), "{cut:?} rank {rank} of {size}");
                }
            }
        }
    }
}
