//! The config.json fields that set a family apart (activation, norms, soft-caps, sliding
//! layers, the RoPE of each layer type), read as transformers' config classes read them,
//! defaults included. Anything rvllm does not implement is refused here, named.
use anyhow::{bail, Result};
use serde_json::Value;

use super::config::{Architecture, FamilyConfig, LocalRope, MlpActivation, RopeScaling};
use super::hf_config::{f32_field, usize_field};
use super::rope::{longrope_attention_factor, yarn_attention_factor};

fn is_gemma(a: Architecture) -> bool {
    matches!(a, Architecture::Gemma2 | Architecture::Gemma3)
}

/// The MLP activation: Gemma reads `hidden_activation`, the others `hidden_act`.
pub fn activation(cfg: &Value, arch: Architecture) -> Result<MlpActivation> {
    let keys: &[&str] = if is_gemma(arch) {
        &["hidden_activation", "hidden_act"]
    } else {
        &["hidden_act"]
    };
    let Some((key, act)) = keys
        .iter()
        .find_map(|k| cfg.get(*k).and_then(Value::as_str).map(|v| (*k, v)))
    else {
        return Ok(if is_gemma(arch) {
            MlpActivation::GeluTanh
        } else {
            MlpActivation::Silu
        });
    };
    Ok(match act {
        "silu" | "swish" => MlpActivation::Silu,
        "gelu_pytorch_tanh" => MlpActivation::GeluTanh,
        other => bail!("{key} `{other}` is not supported (supported: silu, gelu_pytorch_tanh)"),
    })
}

/// Where a config keeps its RoPE settings: transformers 4's top-level `rope_theta` /
/// `rope_scaling`, transformers 5's `rope_parameters`, or (Gemma 3 in transformers 5)
/// `rope_parameters` per layer type.
pub struct RopeSource<'a> {
    pub theta: f32,
    pub theta_key: String,
    pub scaling: Option<&'a Value>,
    pub scaling_key: String,
    /// The sliding layers' own RoPE (Gemma 3): base and scaling.
    pub local: Option<(f32, Option<&'a Value>)>,
}

pub fn rope_source<'a>(cfg: &'a Value, arch: Architecture) -> Result<RopeSource<'a>> {
    let params = cfg.get("rope_parameters").filter(|v| v.is_object());
    let per_type = params.filter(|p| p.get("full_attention").is_some_and(Value::is_object));
    let (global, global_key) = match per_type {
        Some(p) => (p.get("full_attention"), "rope_parameters.full_attention"),
        None => (params, "rope_parameters"),
    };
    let (theta, theta_key) = match f32_field(cfg, "rope_theta")? {
        Some(t) => (t, "rope_theta".to_string()),
        None => match global {
            Some(p) => (
                f32_field(p, "rope_theta")?.unwrap_or(default_theta(arch)),
                format!("{global_key}.rope_theta"),
            ),
            None => (default_theta(arch), "rope_theta".to_string()),
        },
    };
    let (scaling, scaling_key) = match cfg.get("rope_scaling").filter(|v| !v.is_null()) {
        Some(s) => (Some(s), "rope_scaling".to_string()),
        None => (global, global_key.to_string()),
    };
    let local = if arch == Architecture::Gemma3 {
        match per_type.and_then(|p| p.get("sliding_attention")) {
            Some(l) => Some((f32_field(l, "rope_theta")?.unwrap_or(10000.0), Some(l))),
            None => Some((
                f32_field(cfg, "rope_local_base_freq")?.unwrap_or(10000.0),
                None,
            )),
        }
    } else {
        None
    };
    Ok(RopeSource {
        theta,
        theta_key,
        scaling,
        scaling_key,
        local,
    })
}

fn default_theta(arch: Architecture) -> f32 {
    match arch {
        Architecture::Gemma3 => 1_000_000.0,
        _ => 10000.0,
    }
}

/// What a RoPE scaling needs beyond its own parameters.
pub struct RopeContext {
    pub max_position_embeddings: usize,
    /// Phi-3's top-level `original_max_position_embeddings`.
    pub original_max_position_embeddings: Option<usize>,
}

/// RoPE scaling from `rope_scaling` or `rope_parameters` (whichever is present).
pub fn rope_scaling(params: Option<&Value>, ctx: &RopeContext) -> Result<Option<RopeScaling>> {
    let Some(p) = params.filter(|p| !p.is_null()) else {
        return Ok(None);
    };
    let kind = p
        .get("rope_type")
        .or_else(|| p.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |k: &str| -> Result<f32> {
        f32_field(p, k)?.ok_or_else(|| anyhow::anyhow!("rope scaling `{kind}` needs `{k}`"))
    };
    let list = |k: &str| -> Result<Vec<f32>> {
        let v = p.get(k).and_then(Value::as_array).ok_or_else(|| {
            anyhow::anyhow!("rope scaling `{kind}` needs `{k}` (a list of numbers)")
        })?;
        v.iter()
            .map(|x| {
                x.as_f64()
                    .map(|f| f as f32)
                    .ok_or_else(|| anyhow::anyhow!("`{k}` holds {x}, expected a number"))
            })
            .collect()
    };
    Ok(match kind {
        "default" => None,
        "linear" => Some(RopeScaling::Linear {
            factor: num("factor")?,
        }),
        "llama3" => Some(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: usize_field(p, "original_max_position_embeddings")?
                .ok_or_else(|| {
                anyhow::anyhow!("rope scaling `llama3` needs `original_max_position_embeddings`")
            })?,
        }),
        "yarn" => {
            let factor = num("factor")?;
            let attention_factor = match f32_field(p, "attention_factor")? {
                Some(a) => a,
                None => yarn_attention_factor(
                    factor,
                    f32_field(p, "mscale")?,
                    f32_field(p, "mscale_all_dim")?,
                ),
            };
            Some(RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: match ctx.original_max_position_embeddings {
                    Some(o) => o,
                    None => usize_field(p, "original_max_position_embeddings")?
                        .unwrap_or(ctx.max_position_embeddings),
                },
                beta_fast: f32_field(p, "beta_fast")?.unwrap_or(32.0),
                beta_slow: f32_field(p, "beta_slow")?.unwrap_or(1.0),
                attention_factor,
                truncate: p.get("truncate").and_then(Value::as_bool).unwrap_or(true),
            })
        }
        "longrope" | "su" => {
            // As transformers 5: a top-level `original_max_position_embeddings` (Phi-3 keeps
            // the pretrained length there) wins over the one inside the scaling.
            let inner = usize_field(p, "original_max_position_embeddings")?;
            let original = ctx
                .original_max_position_embeddings
                .or(inner)
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "rope scaling `{kind}` needs `original_max_position_embeddings`"
                    )
                })?;
            // Without a `factor`, how far `max_position_embeddings` extends the original.
            let factor = match f32_field(p, "factor")? {
                Some(f) => f,
                None => ctx.max_position_embeddings as f32 / original as f32,
            };
            let attention_factor = match f32_field(p, "attention_factor")? {
                Some(a) => a,
                None => longrope_attention_factor(factor, original),
            };
            Some(RopeScaling::LongRope {
                short_factor: list("short_factor")?,
                long_factor: list("long_factor")?,
                original_max_position_embeddings: original,
                attention_factor,
            })
        }
        other => bail!(
            "rope scaling type `{other}` is not supported (supported: linear, llama3, yarn, longrope)"
        ),
    })
}

/// The sliding layers' RoPE of Gemma 3.
pub fn local_rope(src: &RopeSource, ctx: &RopeContext) -> Result<Option<LocalRope>> {
    let Some((theta, scaling)) = src.local else {
        return Ok(None);
    };
    Ok(Some(LocalRope {
        theta,
        scaling: rope_scaling(scaling, ctx)?,
    }))
}

/// The window of each layer: `layer_types` when the config lists them, else the family's
/// rule (transformers' defaults). Returns (sliding_window, per-layer flags).
pub fn sliding(
    cfg: &Value,
    arch: Architecture,
    num_layers: usize,
) -> Result<(Option<usize>, Option<Vec<bool>>)> {
    // Absent (not null), the config classes' default applies: 4096 for Mistral, Gemma and
    // Qwen (the last only with use_sliding_window), none for Phi-3.
    let window = match cfg.get("sliding_window") {
        None if !matches!(arch, Architecture::Phi3 | Architecture::Mixtral) => Some(4096),
        _ => usize_field(cfg, "sliding_window")?,
    };
    // Qwen3-MoE windows every layer or none (no `max_window_layers`); Mixtral every layer.
    if arch == Architecture::Qwen3Moe {
        let used = cfg.get("use_sliding_window").and_then(Value::as_bool) == Some(true);
        return Ok((window.filter(|_| used), None));
    }
    let qwen = matches!(arch, Architecture::Qwen2 | Architecture::Qwen3);
    if qwen && cfg.get("use_sliding_window").and_then(Value::as_bool) != Some(true) {
        return Ok((None, None));
    }
    if arch == Architecture::Llama {
        return Ok((None, None));
    }
    if let Some(types) = cfg.get("layer_types").filter(|v| !v.is_null()) {
        let types = types
            .as_array()
            .ok_or_else(|| anyhow::anyhow!("`layer_types` is {types}, expected a list"))?;
        let flags = types
            .iter()
            .enumerate()
            .map(|(i, t)| match t.as_str() {
                Some("full_attention") => Ok(false),
                Some("sliding_attention") => Ok(true),
                _ => bail!(
                    "`layer_types[{i}]` = {t} is not supported (supported: full_attention, sliding_attention)"
                ),
            })
            .collect::<Result<Vec<bool>>>()?;
        // A config whose every layer is full keeps no window, as transformers uses none.
        let window = window.filter(|_| flags.contains(&true));
        return Ok((window, Some(flags)));
    }
    let flags: Option<Vec<bool>> = match arch {
        Architecture::Qwen2 | Architecture::Qwen3 => {
            let first = usize_field(cfg, "max_window_layers")?.unwrap_or(28);
            Some((0..num_layers).map(|i| i >= first).collect())
        }
        Architecture::Gemma2 => Some((0..num_layers).map(|i| (i + 1) % 2 != 0).collect()),
        Architecture::Gemma3 => {
            let pattern = usize_field(cfg, "sliding_window_pattern")?
                .unwrap_or(6)
                .max(1);
            Some((0..num_layers).map(|i| (i + 1) % pattern != 0).collect())
        }
        _ => None,
    };
    let window = match &flags {
        Some(f) if !f.contains(&true) => None,
        _ => window,
    };
    Ok((window, flags))
}

/// Everything but the RoPE and the window: norms, activation, soft-caps, scales.
pub fn family(cfg: &Value, arch: Architecture) -> Result<FamilyConfig> {
    let mut f = FamilyConfig {
        activation: activation(cfg, arch)?,
        ..FamilyConfig::default()
    };
    // A key present as null means "off"; absent means the config class's default.
    let opt = |k: &str, default: Option<f32>| -> Result<Option<f32>> {
        match cfg.get(k) {
            None => Ok(default),
            Some(Value::Null) => Ok(None),
            Some(_) => f32_field(cfg, k),
        }
    };
    match arch {
        Architecture::Qwen3 | Architecture::Qwen3Moe => f.qk_norm = true,
        Architecture::Phi3 => f.fused_projections = true,
        Architecture::Gemma2 | Architecture::Gemma3 => {
            let g2 = arch == Architecture::Gemma2;
            if cfg
                .get("use_bidirectional_attention")
                .and_then(Value::as_bool)
                == Some(true)
            {
                bail!("use_bidirectional_attention = true (an embedding model's bidirectional attention) is not supported: rvllm runs causal decoders");
            }
            f.qk_norm = !g2;
            f.norm_plus_one = true;
            f.sandwich_norms = true;
            f.scale_embedding = true;
            f.query_pre_attn_scalar = opt("query_pre_attn_scalar", Some(256.0))?;
            f.attn_logit_softcap = opt("attn_logit_softcapping", g2.then_some(50.0))?;
            f.final_logit_softcap = opt("final_logit_softcapping", g2.then_some(30.0))?;
        }
        _ => {}
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::super::config::ModelConfig;
    use super::super::hf_config::parse_config;
    use super::*;

    fn shipped(name: &str) -> ModelConfig {
        let path = format!("{}/configs/{name}/config.json", env!("CARGO_MANIFEST_DIR"));
        parse_config(&std::fs::read_to_string(&path).unwrap(), None).unwrap()
    }

    #[test]
    fn shipped_qwen3_phi4_and_gemma3_shapes_parse_as_their_families() {
        let q = shipped("qwen3-8b");
        assert_eq!(q.architecture, Architecture::Qwen3);
        assert!(q.family.qk_norm && q.sliding_window.is_none() && !q.attention_bias);
        let p = shipped("phi-4");
        assert_eq!(p.architecture, Architecture::Phi3);
        assert!(p.family.fused_projections);
        assert_eq!((p.head_dim, p.rotary_dim()), (128, 128));
        let g = shipped("gemma-3-12b");
        assert_eq!(g.architecture, Architecture::Gemma3);
        let f = &g.family;
        assert!(f.qk_norm && f.norm_plus_one && f.sandwich_norms && f.scale_embedding);
        assert_eq!(f.activation, MlpActivation::GeluTanh);
        assert_eq!((f.attn_logit_softcap, f.final_logit_softcap), (None, None));
        assert_eq!(f.query_pre_attn_scalar, Some(256.0));
        // Five local layers, then a global one.
        let windows: Vec<Option<usize>> = (0..12).map(|i| g.layer_window(i)).collect();
        assert_eq!(windows[4], Some(1024));
        assert_eq!(windows[5], None);
        assert_eq!(windows[11], None);
        assert_eq!(windows.iter().filter(|w| w.is_some()).count(), 10);
        assert_eq!(g.rope_scaling, Some(RopeScaling::Linear { factor: 8.0 }));
        let local = f.local_rope.as_ref().unwrap();
        assert_eq!((local.theta, &local.scaling), (10000.0, &None));
        assert!(g.tie_word_embeddings);
    }

    const GEMMA3_V5: &str = r#"{"architectures": ["Gemma3ForCausalLM"], "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 256, "vocab_size": 100, "sliding_window": 8,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
        "rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}}"#;

    #[test]
    fn transformers5_per_layer_type_rope_and_layer_types() {
        let g = parse_config(GEMMA3_V5, None).unwrap();
        assert_eq!(g.rope_theta, 1_000_000.0);
        assert_eq!(g.rope_scaling, Some(RopeScaling::Linear { factor: 8.0 }));
        assert_eq!(g.family.local_rope.as_ref().unwrap().theta, 10000.0);
        assert_eq!(
            (0..3).map(|i| g.layer_window(i)).collect::<Vec<_>>(),
            vec![Some(8), None, Some(8)]
        );
        let e = format!(
            "{:#}",
            parse_config(
                &GEMMA3_V5.replace(
                    "\"full_attention\", \"sliding_attention\"]",
                    "\"full_attention\", \"chunked_attention\"]",
                ),
                None
            )
            .unwrap_err()
        );
        assert!(
            e.contains("layer_types[2]") && e.contains("chunked_attention"),
            "{e}"
        );
    }

    #[test]
    fn gemma2_softcaps_default_as_its_config_class_and_null_turns_them_off() {
        let base = r#"{"architectures": ["Gemma2ForCausalLM"], "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
            "head_dim": 32, "vocab_size": 100, "sliding_window": 16"#;
        let g = parse_config(&format!("{base}}}"), None).unwrap();
        assert_eq!(g.family.attn_logit_softcap, Some(50.0));
        assert_eq!(g.family.final_logit_softcap, Some(30.0));
        assert!(!g.family.qk_norm && g.family.norm_plus_one);
        assert_eq!((g.layer_window(0), g.layer_window(1)), (Some(16), None));
        let g = parse_config(
            &format!(r#"{base}, "attn_logit_softcapping": null, "final_logit_softcapping": 5}}"#),
            None,
        )
        .unwrap();
        assert_eq!(g.family.attn_logit_softcap, None);
        assert_eq!(g.family.final_logit_softcap, Some(5.0));
    }

    /// An absent `sliding_window` is the config class's default (4096 for Mistral), a null
    /// one is none.
    #[test]
    fn an_absent_window_takes_the_config_class_default() {
        let mistral = |extra: &str| {
            format!(
                r#"{{"architectures": ["MistralForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
                    "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100{extra}}}"#
            )
        };
        let c = parse_config(&mistral(""), None).unwrap();
        assert_eq!(c.sliding_window, Some(4096));
        let c = parse_config(&mistral(r#", "sliding_window": null"#), None).unwrap();
        assert_eq!(c.sliding_window, None);
    }

    fn qwen3(rope: &str) -> String {
        format!(
            r#"{{"architectures": ["Qwen3ForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
                "num_hidden_layers": 2, "num_attention_heads": 2, "head_dim": 64,
                "vocab_size": 100, "max_position_embeddings": 131072, {rope}}}"#
        )
    }

    #[test]
    fn yarn_reads_its_parameters_and_derives_the_attention_factor() {
        let c = parse_config(
            &qwen3(r#""rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}"#),
            None,
        )
        .unwrap();
        let Some(RopeScaling::Yarn {
            factor,
            original_max_position_embeddings,
            beta_fast,
            beta_slow,
            attention_factor,
            truncate,
        }) = c.rope_scaling
        else {
            panic!("{:?}", c.rope_scaling)
        };
        assert_eq!((factor, original_max_position_embeddings), (4.0, 32768));
        assert_eq!((beta_fast, beta_slow, truncate), (32.0, 1.0, true));
        assert!((attention_factor - (0.1 * 4f32.ln() + 1.0)).abs() < 1e-6);
        assert!((c.rope(false).attention_factor - attention_factor).abs() < 1e-7);
    }

    #[test]
    fn unsupported_features_are_refused_by_name() {
        for (rope, needle) in [
            (
                r#""rope_scaling": {"rope_type": "dynamic", "factor": 2.0}"#,
                "`dynamic`",
            ),
            (r#""hidden_act": "relu""#, "hidden_act `relu`"),
            (
                r#""rope_scaling": {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0], "original_max_position_embeddings": 4096}"#,
                "short_factor` has 1 entries",
            ),
            (r#""partial_rotary_factor": 0.3"#, "partial_rotary_factor"),
        ] {
            let e = format!("{:#}", parse_config(&qwen3(rope), None).unwrap_err());
            assert!(e.contains(needle), "{rope}: {e}");
        }
    }

    #[test]
    fn phi3_longrope_uses_the_length_ratio_and_partial_rotary() {
        let short: Vec<String> = (0..24)
            .map(|i| format!("{}", 1.0 + i as f32 * 0.1))
            .collect();
        let json = format!(
            r#"{{"architectures": ["Phi3ForCausalLM"], "hidden_size": 256, "intermediate_size": 128,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "vocab_size": 100, "max_position_embeddings": 131072,
                "original_max_position_embeddings": 4096, "partial_rotary_factor": 0.75,
                "rope_scaling": {{"type": "longrope", "short_factor": [{s}], "long_factor": [{s}]}}}}"#,
            s = short.join(", ")
        );
        let c = parse_config(&json, None).unwrap();
        assert_eq!((c.head_dim, c.rotary_dim()), (64, 48));
        let Some(RopeScaling::LongRope {
            attention_factor,
            original_max_position_embeddings,
            ..
        }) = &c.rope_scaling
        else {
            panic!()
        };
        assert_eq!(*original_max_position_embeddings, 4096);
        let want = (1.0 + 32f32.ln() / 4096f32.ln()).sqrt();
        assert!((attention_factor - want).abs() < 1e-6);
        assert_eq!(c.rope(false).inv_freq.len(), 24);
    }
}
