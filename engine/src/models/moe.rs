//! Mixture-of-experts MLPs (Mixtral, Qwen3-MoE): the config fields, the checkpoint's expert
//! tensors, and their stacking at load into one gate/up and one down matrix per layer.
//!
//! Checkpoints on the hub keep one tensor per expert and projection
//! (`block_sparse_moe.experts.N.w1/w3/w2` in Mixtral, `mlp.experts.N.gate_proj/up_proj/
//! down_proj` in Qwen3-MoE); transformers 5 holds them in memory stacked as 3-D
//! `mlp.experts.gate_up_proj` `[experts, 2 * inter, hidden]` and `mlp.experts.down_proj`
//! `[experts, hidden, inter]` (router `mlp.gate.weight`), and a folder saved in that layout
//! is read too: [`split_stacked`] turns its tensors into the hub names, so the model sees one
//! layout.
//!
//! What rvllm does not run is refused here at parse time, named: shared experts
//! (Qwen2-MoE, DeepSeek, Llama 4), grouped or sigmoid routing (DeepSeek V3), gpt-oss.
use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::config::{Architecture, MlpActivation, ModelConfig};
use super::hf_config::usize_field;
use super::weights::{HostData, HostTensor};
use crate::backend::{Backend, MoeScratch};
use crate::types::MoeLayout;

/// The experts of a mixture-of-experts model and which layers use them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoeConfig {
    pub num_experts: usize,
    /// Experts per token (`num_experts_per_tok`).
    pub top_k: usize,
    /// Width of one expert's gate and up projections (`moe_intermediate_size`, or Mixtral's
    /// `intermediate_size`).
    pub intermediate_size: usize,
    /// Renormalize the top-k routing probabilities to sum to 1.
    pub renormalize: bool,
    /// Per layer: whether its MLP is the mixture (else the dense MLP of the config's
    /// `intermediate_size`).
    pub sparse_layers: Vec<bool>,
}

impl MoeConfig {
    pub fn is_sparse(&self, layer: usize) -> bool {
        self.sparse_layers.get(layer).copied().unwrap_or(false)
    }
    pub fn num_sparse_layers(&self) -> usize {
        self.sparse_layers.iter().filter(|&&s| s).count()
    }
    /// Parameters of one sparse layer's MLP: the router and every expert.
    pub fn layer_parameters(&self, hidden: u64) -> u64 {
        let (e, i) = (self.num_experts as u64, self.intermediate_size as u64);
        e * hidden + e * 3 * i * hidden
    }
    pub fn layout(&self) -> MoeLayout {
        MoeLayout {
            num_experts: self.num_experts,
            top_k: self.top_k,
            intermediate_size: self.intermediate_size,
            renormalize: self.renormalize,
        }
    }
}

/// Mixture-of-experts architectures rvllm recognizes but does not run, with what they need.
pub fn unsupported_architecture(name: &str) -> Option<&'static str> {
    Some(match name {
        "Qwen2MoeForCausalLM" => {
            "Qwen2-MoE's shared expert (shared_expert with its sigmoid shared_expert_gate)"
        }
        "DeepseekV2ForCausalLM" | "DeepseekV3ForCausalLM" => {
            "DeepSeek's multi-head latent attention (MLA), shared experts and grouped top-k routing (n_group / topk_group)"
        }
        "GptOssForCausalLM" => {
            "gpt-oss's attention sinks, biased experts with a clamped SwiGLU and MXFP4 weights"
        }
        "Llama4ForCausalLM" | "Llama4ForConditionalGeneration" => {
            "Llama 4's shared expert, sigmoid routing and chunked attention"
        }
        _ => return None,
    })
}

fn bool_field(cfg: &Value, key: &str, default: bool) -> Result<bool> {
    match cfg.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => bail!("`{key}` is {v}, expected true or false"),
    }
}

/// Config keys of routing or expert features rvllm does not implement, refused when they are
/// set to anything but their "off" value.
fn refuse_foreign_features(cfg: &Value) -> Result<()> {
    for key in [
        "shared_expert_intermediate_size",
        "n_shared_experts",
        "num_shared_experts",
    ] {
        if usize_field(cfg, key)?.unwrap_or(0) > 0 {
            bail!(
                "shared experts (`{key}` = {}) are not implemented",
                cfg[key]
            );
        }
    }
    for key in ["n_group", "topk_group"] {
        if usize_field(cfg, key)?.unwrap_or(1) > 1 {
            bail!(
                "grouped top-k routing (`{key}` = {}) is not implemented",
                cfg[key]
            );
        }
    }
    if let Some(f) = cfg.get("scoring_func").and_then(Value::as_str) {
        if f != "softmax" {
            bail!(
                "router scoring function `scoring_func` = `{f}` is not implemented (only softmax)"
            );
        }
    }
    Ok(())
}

/// The mixture-of-experts fields of config.json, read as transformers' config classes read
/// them (defaults included); None for a dense model.
pub fn from_hf(
    cfg: &Value,
    arch: Architecture,
    num_layers: usize,
    intermediate_size: usize,
    activation: MlpActivation,
) -> Result<Option<MoeConfig>> {
    let moe = match arch {
        Architecture::Mixtral => MoeConfig {
            num_experts: usize_field(cfg, "num_local_experts")?.unwrap_or(8),
            top_k: usize_field(cfg, "num_experts_per_tok")?.unwrap_or(2),
            intermediate_size,
            renormalize: true,
            sparse_layers: vec![true; num_layers],
        },
        Architecture::Qwen3Moe => {
            // The config class maps `num_experts` onto `num_local_experts` (transformers 5
            // writes the latter; the hub's configs the former).
            let num_experts = match (
                usize_field(cfg, "num_experts")?,
                usize_field(cfg, "num_local_experts")?,
            ) {
                (Some(a), Some(b)) if a != b => bail!(
                    "`num_experts` = {a} and `num_local_experts` = {b} disagree (they name the same value)"
                ),
                (a, b) => a.or(b).unwrap_or(128),
            };
            if num_experts == 0 {
                return Ok(None);
            }
            let step = usize_field(cfg, "decoder_sparse_step")?.unwrap_or(1);
            ensure!(
                step >= 1,
                "`decoder_sparse_step` = 0: no layer could be sparse (it must be at least 1)"
            );
            let dense: Vec<usize> = match cfg.get("mlp_only_layers") {
                None | Some(Value::Null) => vec![],
                Some(Value::Array(items)) => items
                    .iter()
                    .map(|v| match v.as_u64() {
                        Some(i) if (i as usize) < num_layers => Ok(i as usize),
                        _ => bail!(
                            "`mlp_only_layers` holds {v}, expected a layer index below `num_hidden_layers` = {num_layers}"
                        ),
                    })
                    .collect::<Result<_>>()?,
                Some(v) => bail!("`mlp_only_layers` is {v}, expected a list of layer indices"),
            };
            MoeConfig {
                num_experts,
                top_k: usize_field(cfg, "num_experts_per_tok")?.unwrap_or(8),
                intermediate_size: usize_field(cfg, "moe_intermediate_size")?.unwrap_or(768),
                renormalize: bool_field(cfg, "norm_topk_prob", false)?,
                sparse_layers: (0..num_layers)
                    .map(|i| !dense.contains(&i) && (i + 1) % step == 0)
                    .collect(),
            }
        }
        _ => return Ok(None),
    };
    refuse_foreign_features(cfg)?;
    let key = match arch {
        Architecture::Mixtral => "num_local_experts",
        _ => "num_experts",
    };
    ensure!(
        (1..=4096).contains(&moe.num_experts),
        "`{key}` = {} is out of range (1..=4096): the model config is corrupt",
        moe.num_experts
    );
    ensure!(
        (1..=moe.num_experts).contains(&moe.top_k),
        "`num_experts_per_tok` = {} must be between 1 and the {} experts",
        moe.top_k,
        moe.num_experts
    );
    ensure!(
        (1..=1 << 22).contains(&moe.intermediate_size),
        "`moe_intermediate_size` = {} is out of range (1..=4194304): the model config is corrupt",
        moe.intermediate_size
    );
    if activation != MlpActivation::Silu {
        bail!("experts with the {activation:?} activation are not implemented (only silu)");
    }
    Ok(Some(moe))
}

/// Where a layer's experts live in a hub checkpoint.
fn block_prefix(arch: Architecture, layer: usize) -> String {
    match arch {
        Architecture::Mixtral => format!("model.layers.{layer}.block_sparse_moe"),
        _ => format!("model.layers.{layer}.mlp"),
    }
}

/// The router's weight, `[num_experts, hidden]`.
pub fn router_name(arch: Architecture, layer: usize) -> String {
    format!("{}.gate.weight", block_prefix(arch, layer))
}

/// Expert `e`'s gate, up and down projections.
pub fn expert_names(arch: Architecture, layer: usize, e: usize) -> [String; 3] {
    let p = format!("{}.experts.{e}", block_prefix(arch, layer));
    match arch {
        Architecture::Mixtral => [
            format!("{p}.w1.weight"),
            format!("{p}.w3.weight"),
            format!("{p}.w2.weight"),
        ],
        _ => [
            format!("{p}.gate_proj.weight"),
            format!("{p}.up_proj.weight"),
            format!("{p}.down_proj.weight"),
        ],
    }
}

/// Every tensor of a sparse layer's MLP with its shape (hub layout).
pub fn expected_tensors(c: &ModelConfig, m: &MoeConfig, layer: usize) -> Vec<(String, Vec<usize>)> {
    let (h, i) = (c.hidden_size, m.intermediate_size);
    let mut out = vec![(router_name(c.architecture, layer), vec![m.num_experts, h])];
    for e in 0..m.num_experts {
        let [gate, up, down] = expert_names(c.architecture, layer, e);
        out.push((gate, vec![i, h]));
        out.push((up, vec![i, h]));
        out.push((down, vec![h, i]));
    }
    out
}

/// A sparse layer's router and its experts stacked as `Backend::moe` takes them: every
/// expert's `[gate | up]` one after the other (`[num_experts * 2 * inter, hidden]`) and every
/// down projection (`[num_experts * hidden, inter]`). `take` reads a tensor by name and shape.
pub fn stacked_experts(
    c: &ModelConfig,
    layer: usize,
    m: &MoeLayout,
    mut take: impl FnMut(&str, &[usize]) -> Result<HostTensor>,
) -> Result<[HostTensor; 3]> {
    let (h, i, arch) = (c.hidden_size, m.intermediate_size, c.architecture);
    let router = take(&router_name(arch, layer), &[m.num_experts, h])?;
    let mut gate_up = Vec::with_capacity(2 * m.num_experts);
    let mut down = Vec::with_capacity(m.num_experts);
    for e in 0..m.num_experts {
        let [g, u, d] = expert_names(arch, layer, e);
        gate_up.push(take(&g, &[i, h])?);
        gate_up.push(take(&u, &[i, h])?);
        down.push(take(&d, &[h, i])?);
    }
    let prefix = block_prefix(arch, layer);
    Ok([
        router,
        super::llama::concat_rows(&format!("{prefix}.experts.gate_up"), gate_up)?,
        super::llama::concat_rows(&format!("{prefix}.experts.down"), down)?,
    ])
}

/// The buffers `Backend::moe` needs for steps of up to `tokens` tokens; None for a dense model.
pub fn scratch<B: Backend>(
    be: &B,
    c: &ModelConfig,
    tokens: usize,
) -> Result<Option<MoeScratch<B::Tensor>>> {
    let Some(m) = &c.family.moe else {
        return Ok(None);
    };
    let pairs = tokens * m.top_k;
    Ok(Some(MoeScratch {
        router_logits: be.alloc_activation(tokens, m.num_experts)?,
        rows: be.alloc_activation(pairs, c.hidden_size)?,
        gate_up: if B::MOE_GATE_UP_SCRATCH {
            Some(be.alloc_activation(pairs, 2 * m.intermediate_size)?)
        } else {
            None
        },
        act: be.alloc_activation(pairs, m.intermediate_size)?,
    }))
}

/// The sparse layer a transformers-5 stacked tensor belongs to, and which one it is.
fn stacked_kind(c: &ModelConfig, name: &str) -> Option<(usize, &'static str)> {
    let m = c.family.moe.as_ref()?;
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, tail) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    if !m.is_sparse(layer) {
        return None;
    }
    let kind = match tail {
        "mlp.experts.gate_up_proj" => "gate_up",
        "mlp.experts.down_proj" => "down",
        // Mixtral's router under its in-memory name (the hub's is `block_sparse_moe.gate`).
        "mlp.gate.weight" if c.architecture == Architecture::Mixtral => "router",
        _ => return None,
    };
    Some((layer, kind))
}

/// Whether `name` is a tensor of transformers 5's stacked expert layout for this model.
pub fn is_stacked(c: &ModelConfig, name: &str) -> bool {
    stacked_kind(c, name).is_some()
}

/// Rows `rows` of a row-major tensor whose rows are `cols` wide, keeping the dtype.
fn slice_rows(t: &HostTensor, rows: std::ops::Range<usize>, cols: usize) -> HostData {
    let r = rows.start * cols..rows.end * cols;
    match &t.data {
        HostData::F32(v) => HostData::F32(v[r].to_vec()),
        HostData::F16(v) => HostData::F16(v[r].to_vec()),
        HostData::BF16(v) => HostData::BF16(v[r].to_vec()),
    }
}

/// A stacked tensor as the hub-layout tensors it holds (names and shapes as
/// [`expected_tensors`] gives them). The shape is checked against the config first.
pub fn split_stacked(
    c: &ModelConfig,
    name: &str,
    t: HostTensor,
) -> Result<Vec<(String, HostTensor)>> {
    let (Some((layer, kind)), Some(m)) = (stacked_kind(c, name), c.family.moe.as_ref()) else {
        bail!("`{name}` is not a stacked expert tensor of this model");
    };
    let (e, h, i) = (m.num_experts, c.hidden_size, m.intermediate_size);
    let want = match kind {
        "gate_up" => vec![e, 2 * i, h],
        "down" => vec![e, h, i],
        _ => vec![e, h],
    };
    ensure!(
        t.shape == want,
        "tensor `{name}` has shape {:?} but config.json implies {want:?}",
        t.shape
    );
    let arch = c.architecture;
    let part = |rows: std::ops::Range<usize>, cols: usize, shape: Vec<usize>| HostTensor {
        shape,
        data: slice_rows(&t, rows, cols),
    };
    let mut out = Vec::new();
    match kind {
        "router" => out.push((router_name(arch, layer), t)),
        "gate_up" => {
            for x in 0..e {
                let [gate, up, _] = expert_names(arch, layer, x);
                let first = x * 2 * i;
                out.push((gate, part(first..first + i, h, vec![i, h])));
                out.push((up, part(first + i..first + 2 * i, h, vec![i, h])));
            }
        }
        _ => {
            for x in 0..e {
                let [_, _, down] = expert_names(arch, layer, x);
                out.push((down, part(x * h..(x + 1) * h, i, vec![h, i])));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::hf_config::parse_config;

    fn qwen3_moe(extra: &str) -> String {
        format!(
            r#"{{"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
                "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                "head_dim": 16, "vocab_size": 100, "moe_intermediate_size": 32,
                "num_experts_per_tok": 2{extra}}}"#
        )
    }

    #[test]
    fn qwen3_moe_reads_sparse_step_dense_layers_and_either_expert_count_key() {
        let c = parse_config(
            &qwen3_moe(r#", "num_experts": 8, "decoder_sparse_step": 2, "mlp_only_layers": [3], "norm_topk_prob": true"#),
            None,
        )
        .unwrap();
        assert_eq!(c.architecture, Architecture::Qwen3Moe);
        assert!(c.family.qk_norm);
        let m = c.family.moe.as_ref().unwrap();
        assert_eq!((m.num_experts, m.top_k, m.intermediate_size), (8, 2, 32));
        assert!(m.renormalize);
        // Layers 1 and 3 by the step, 3 dense by mlp_only_layers.
        assert_eq!(m.sparse_layers, vec![false, true, false, false]);
        let c = parse_config(&qwen3_moe(r#", "num_local_experts": 6"#), None).unwrap();
        let m = c.family.moe.unwrap();
        assert_eq!((m.num_experts, m.renormalize), (6, false));
        assert_eq!(m.sparse_layers, vec![true; 4]);
        assert!(c.sliding_window.is_none());
    }

    #[test]
    fn mixtral_renormalises_and_has_no_window_by_default() {
        let c = parse_config(
            r#"{"architectures": ["MixtralForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "vocab_size": 100, "num_local_experts": 4, "num_experts_per_tok": 2}"#,
            None,
        )
        .unwrap();
        let m = c.family.moe.as_ref().unwrap();
        assert_eq!((m.num_experts, m.top_k, m.intermediate_size), (4, 2, 96));
        assert!(m.renormalize && !c.family.qk_norm);
        assert_eq!(c.sliding_window, None);
        let params = c.num_parameters();
        let attn = 64 * (64 + 2 * 32) + 64 * 64 + 2 * 64;
        let experts = 4 * 64 + 4 * 3 * 96 * 64;
        assert_eq!(params, 2 * 100 * 64 + 2 * (attn + experts) + 64);
    }

    /// The benchmark shapes parse as their families with the published parameter counts
    /// (Qwen3-30B-A3B: 30.5 B, Mixtral-8x7B: 46.7 B) and active parameter counts.
    #[test]
    fn shipped_moe_shapes_parse_with_their_parameter_counts() {
        let shipped = |name: &str| {
            let path = format!("{}/configs/{name}/config.json", env!("CARGO_MANIFEST_DIR"));
            parse_config(&std::fs::read_to_string(path).unwrap(), None).unwrap()
        };
        let q = shipped("qwen3-30b-a3b");
        assert_eq!(q.architecture, Architecture::Qwen3Moe);
        let m = q.family.moe.as_ref().unwrap();
        assert_eq!((m.num_experts, m.top_k, m.intermediate_size), (128, 8, 768));
        assert!(m.renormalize && q.family.qk_norm && q.sliding_window.is_none());
        assert_eq!(m.num_sparse_layers(), 48);
        let x = shipped("mixtral-8x7b");
        assert_eq!(x.architecture, Architecture::Mixtral);
        let m = x.family.moe.as_ref().unwrap();
        assert_eq!((m.num_experts, m.top_k, m.intermediate_size), (8, 2, 14336));
        assert!(x.sliding_window.is_none());
        // Active: 3.3 B and 12.9 B, as published.
        for (c, total, active) in [(q, 30.5, 3.3), (x, 46.7, 12.9)] {
            let got = c.num_parameters() as f64 / 1e9;
            assert!((got - total).abs() < 0.1, "{got} B, expected {total}");
            let got = c.num_active_parameters() as f64 / 1e9;
            assert!(
                (got - active).abs() < 0.1,
                "{got} B active, expected {active}"
            );
        }
    }

    #[test]
    fn unimplemented_moe_features_are_refused_by_name() {
        for (extra, needle) in [
            (
                r#", "shared_expert_intermediate_size": 128"#,
                "shared experts",
            ),
            (r#", "n_group": 8, "topk_group": 4"#, "grouped top-k"),
            (r#", "scoring_func": "sigmoid""#, "scoring_func"),
            (
                r#", "num_experts": 4, "num_experts_per_tok": 5"#,
                "num_experts_per_tok",
            ),
            (r#", "decoder_sparse_step": 0"#, "decoder_sparse_step"),
            (r#", "mlp_only_layers": [4]"#, "mlp_only_layers"),
            (r#", "num_experts": 8, "num_local_experts": 4"#, "disagree"),
        ] {
            let e = format!("{:#}", parse_config(&qwen3_moe(extra), None).unwrap_err());
            assert!(e.contains(needle), "{extra}: {e}");
        }
        for (arch, needle) in [
            ("Qwen2MoeForCausalLM", "shared expert"),
            ("DeepseekV3ForCausalLM", "MLA"),
            ("GptOssForCausalLM", "gpt-oss"),
        ] {
            let json = qwen3_moe("").replace("Qwen3MoeForCausalLM", arch);
            let e = format!("{:#}", parse_config(&json, None).unwrap_err());
            assert!(e.contains(arch) && e.contains(needle), "{e}");
        }
    }

    #[test]
    fn stacked_experts_split_into_the_hub_names() {
        let c = parse_config(
            &qwen3_moe(r#", "num_experts": 3, "mlp_only_layers": [0]"#),
            None,
        )
        .unwrap();
        let (e, h, i) = (3, 64, 32);
        let gate_up = HostTensor {
            shape: vec![e, 2 * i, h],
            data: HostData::F32((0..e * 2 * i * h).map(|x| x as f32).collect()),
        };
        assert!(!is_stacked(&c, "model.layers.0.mlp.experts.gate_up_proj"));
        let name = "model.layers.1.mlp.experts.gate_up_proj";
        assert!(is_stacked(&c, name));
        let parts = split_stacked(&c, name, gate_up).unwrap();
        assert_eq!(parts.len(), 2 * e);
        let (n, t) = &parts[3]; // expert 1's up
        assert_eq!(n, "model.layers.1.mlp.experts.1.up_proj.weight");
        assert_eq!(t.shape, vec![i, h]);
        assert_eq!(t.to_f32()[0], ((2 * i + i) * h) as f32);
        let down = HostTensor {
            shape: vec![e, h, i],
            data: HostData::F32((0..e * h * i).map(|x| x as f32).collect()),
        };
        let parts = split_stacked(&c, "model.layers.2.mlp.experts.down_proj", down).unwrap();
        assert_eq!(parts[2].0, "model.layers.2.mlp.experts.2.down_proj.weight");
        assert_eq!(parts[2].1.to_f32()[0], (2 * h * i) as f32);
        let bad = HostTensor {
            shape: vec![e, h, i + 1],
            data: HostData::F32(vec![0.0; e * h * (i + 1)]),
        };
        let err = split_stacked(&c, "model.layers.2.mlp.experts.down_proj", bad).unwrap_err();
        assert!(err.to_string().contains("down_proj"), "{err}");
    }
}
