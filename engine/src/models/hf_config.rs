//! Hugging Face `config.json` (+ `generation_config.json`) to [`ModelConfig`].
//!
//! Reads both the transformers 4 spelling (`rope_theta`, `rope_scaling`) and the
//! transformers 5 one (`rope_parameters` holding `rope_theta` and the scaling).
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use super::config::{implied_head_dim, Architecture, Field, ModelConfig};
use super::hf_family;

/// `architectures[0]` of config.json, or the architecture `model_type` implies.
fn architecture(cfg: &Value) -> Result<Architecture> {
    let name = match cfg
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(Value::as_str)
    {
        Some(n) => n.to_string(),
        None => match cfg.get("model_type").and_then(Value::as_str) {
            Some("llama") => "LlamaForCausalLM".into(),
            Some("mistral") => "MistralForCausalLM".into(),
            Some("qwen2") => "Qwen2ForCausalLM".into(),
            Some("qwen3") => "Qwen3ForCausalLM".into(),
            Some("phi3") => "Phi3ForCausalLM".into(),
            Some("gemma2") => "Gemma2ForCausalLM".into(),
            Some("gemma3_text") => "Gemma3ForCausalLM".into(),
            Some("mixtral") => "MixtralForCausalLM".into(),
            Some("qwen3_moe") => "Qwen3MoeForCausalLM".into(),
            Some(other) => format!("model_type `{other}`"),
            None => bail!("config.json names no `architectures` and no `model_type`"),
        },
    };
    Ok(match name.as_str() {
        "LlamaForCausalLM" => Architecture::Llama,
        "MistralForCausalLM" => Architecture::Mistral,
        "Qwen2ForCausalLM" => Architecture::Qwen2,
        "Qwen3ForCausalLM" => Architecture::Qwen3,
        "Phi3ForCausalLM" => Architecture::Phi3,
        "Gemma2ForCausalLM" => Architecture::Gemma2,
        "Gemma3ForCausalLM" => Architecture::Gemma3,
        "MixtralForCausalLM" => Architecture::Mixtral,
        "Qwen3MoeForCausalLM" => Architecture::Qwen3Moe,
        other if super::moe::unsupported_architecture(other).is_some() => bail!(
            "architecture {other} is not supported: {} is not implemented; supported architectures: {}",
            super::moe::unsupported_architecture(other).unwrap_or_default(),
            Architecture::SUPPORTED.join(", ")
        ),
        other => bail!(
            "architecture {other} is not supported; supported architectures: {}",
            Architecture::SUPPORTED.join(", ")
        ),
    })
}

pub(super) fn usize_field(cfg: &Value, key: &str) -> Result<Option<usize>> {
    match cfg.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(|x| Some(x as usize))
            .ok_or_else(|| anyhow::anyhow!("`{key}` is {v}, expected a non-negative integer")),
    }
}

fn required(cfg: &Value, key: &str) -> Result<usize> {
    usize_field(cfg, key)?.ok_or_else(|| anyhow::anyhow!("`{key}` is missing"))
}

pub(super) fn f32_field(cfg: &Value, key: &str) -> Result<Option<f32>> {
    match cfg.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => {
            let x = v
                .as_f64()
                .ok_or_else(|| anyhow::anyhow!("`{key}` is {v}, expected a number"))?;
            // Past f32's range the value would silently become infinite.
            ensure!(
                (x as f32).is_finite(),
                "`{key}` = {v} is out of range for a 32-bit float"
            );
            Ok(Some(x as f32))
        }
    }
}

/// A [`Field`] as config.json spells it; `theta` and `scaling` say where the RoPE values were
/// found (`rope_theta` / `rope_scaling`, or inside transformers 5's `rope_parameters`).
fn field_name(f: Field, theta: &str, scaling: &str) -> String {
    match f {
        Field::HiddenSize => "hidden_size".into(),
        Field::IntermediateSize => "intermediate_size".into(),
        Field::NumHiddenLayers => "num_hidden_layers".into(),
        Field::NumAttentionHeads => "num_attention_heads".into(),
        Field::NumKeyValueHeads => "num_key_value_heads".into(),
        Field::HeadDim => "head_dim".into(),
        Field::VocabSize => "vocab_size".into(),
        Field::MaxPositionEmbeddings => "max_position_embeddings".into(),
        Field::SlidingWindow => "sliding_window".into(),
        Field::RmsNormEps => "rms_norm_eps".into(),
        Field::RopeTheta => theta.into(),
        Field::RopeScalingFactor => format!("{scaling}.factor"),
        Field::RopeLowFreqFactor => format!("{scaling}.low_freq_factor"),
        Field::RopeHighFreqFactor => format!("{scaling}.high_freq_factor"),
        Field::RopeOriginalMaxPositionEmbeddings => {
            format!("{scaling}.original_max_position_embeddings")
        }
        Field::RopeAttentionFactor => format!("{scaling}.attention_factor"),
        Field::RopeBetaFast => format!("{scaling}.beta_fast"),
        Field::RopeBetaSlow => format!("{scaling}.beta_slow"),
        Field::RopeShortFactor => format!("{scaling}.short_factor"),
        Field::RopeLongFactor => format!("{scaling}.long_factor"),
        Field::PartialRotaryFactor => "partial_rotary_factor".into(),
        Field::RopeLocalTheta => "rope_local_base_freq".into(),
        Field::AttnLogitSoftcapping => "attn_logit_softcapping".into(),
        Field::FinalLogitSoftcapping => "final_logit_softcapping".into(),
        Field::QueryPreAttnScalar => "query_pre_attn_scalar".into(),
        Field::LayerTypes => "layer_types".into(),
    }
}

/// Token ids given as an int or a list of ints.
fn token_ids(v: Option<&Value>, key: &str) -> Result<Vec<u32>> {
    match v {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|x| {
                x.as_u64()
                    .map(|i| i as u32)
                    .ok_or_else(|| anyhow::anyhow!("`{key}` holds {x}, expected token ids"))
            })
            .collect(),
        Some(x) => x
            .as_u64()
            .map(|i| vec![i as u32])
            .ok_or_else(|| anyhow::anyhow!("`{key}` is {x}, expected a token id or a list")),
    }
}

/// Parse the text of config.json and, when present, generation_config.json.
pub fn parse_config(config_json: &str, generation_json: Option<&str>) -> Result<ModelConfig> {
    let cfg: Value = serde_json::from_str(config_json).context("config.json is not valid JSON")?;
    ensure!(cfg.is_object(), "config.json is not a JSON object");
    let architecture = architecture(&cfg)?;
    if cfg.get("mlp_bias").and_then(Value::as_bool) == Some(true) {
        bail!("mlp_bias = true is not supported");
    }
    let rope = hf_family::rope_source(&cfg, architecture)?;
    let (rope_theta, theta_key, scaling_key) = (
        rope.theta,
        rope.theta_key.as_str(),
        rope.scaling_key.as_str(),
    );
    let name = |f: Field| field_name(f, theta_key, scaling_key);

    let hidden_size = required(&cfg, "hidden_size")?;
    let num_attention_heads = required(&cfg, "num_attention_heads")?;
    let num_key_value_heads =
        usize_field(&cfg, "num_key_value_heads")?.unwrap_or(num_attention_heads);
    let head_dim = match usize_field(&cfg, "head_dim")? {
        Some(d) => d,
        None => implied_head_dim(hidden_size, num_attention_heads, &name)?,
    };

    let intermediate_size = required(&cfg, "intermediate_size")?;
    let num_hidden_layers = required(&cfg, "num_hidden_layers")?;
    let (sliding_window, sliding_layers) =
        hf_family::sliding(&cfg, architecture, num_hidden_layers)?;
    let max_position_embeddings = usize_field(&cfg, "max_position_embeddings")?.unwrap_or(2048);
    let rope_ctx = hf_family::RopeContext {
        max_position_embeddings,
        original_max_position_embeddings: usize_field(&cfg, "original_max_position_embeddings")?,
    };
    let mut family = hf_family::family(&cfg, architecture)?;
    family.quant.checkpoint = super::quant::parse_quantization_config(&cfg)?;
    family.moe = super::moe::from_hf(
        &cfg,
        architecture,
        num_hidden_layers,
        intermediate_size,
        family.activation,
    )?;
    family.sliding_layers = sliding_layers;
    family.local_rope = hf_family::local_rope(&rope, &rope_ctx)?;
    let partial = match f32_field(&cfg, "partial_rotary_factor")? {
        Some(p) => Some(p),
        None => match cfg.get("rope_parameters").filter(|v| v.is_object()) {
            Some(p) => f32_field(p, "partial_rotary_factor")?,
            None => None,
        },
    };
    if let Some(p) = partial {
        ensure!(
            p.is_finite() && p > 0.0 && p <= 1.0,
            "`partial_rotary_factor` = {p} is impossible: it must be in (0, 1]"
        );
        // transformers: int(head_dim * partial_rotary_factor)
        family.rotary_dim = Some((head_dim as f64 * p as f64) as usize);
    }

    let generation: Option<Value> = match generation_json {
        Some(text) => {
            Some(serde_json::from_str(text).context("generation_config.json is not valid JSON")?)
        }
        None => None,
    };
    let from_either = |key: &str| -> Result<Vec<u32>> {
        if let Some(g) = &generation {
            let ids = token_ids(g.get(key), key)?;
            if !ids.is_empty() {
                return Ok(ids);
            }
        }
        token_ids(cfg.get(key), key)
    };
    let eos_token_ids = from_either("eos_token_id")?;
    let bos_token_id = from_either("bos_token_id")?.first().copied();

    let config = ModelConfig {
        architecture,
        hidden_size,
        intermediate_size,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        vocab_size: required(&cfg, "vocab_size")?,
        rms_norm_eps: f32_field(&cfg, "rms_norm_eps")?.unwrap_or(1e-6),
        rope_theta,
        rope_scaling: hf_family::rope_scaling(rope.scaling, &rope_ctx)?,
        max_position_embeddings,
        // Gemma's config classes tie by default, the others do not.
        tie_word_embeddings: cfg
            .get("tie_word_embeddings")
            .and_then(Value::as_bool)
            .unwrap_or(matches!(
                architecture,
                Architecture::Gemma2 | Architecture::Gemma3
            )),
        attention_bias: match architecture {
            Architecture::Qwen2 => true,
            _ => cfg
                .get("attention_bias")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        },
        sliding_window,
        bos_token_id,
        eos_token_ids,
        torch_dtype: ["torch_dtype", "dtype"]
            .iter()
            .find_map(|k| cfg.get(*k).and_then(Value::as_str))
            .map(str::to_string),
        family,
    };
    config.validate(&name)?;
    Ok(config)
}

/// Read `config.json` and the `generation_config.json` beside it (if any).
pub fn read_config(config_path: &Path) -> Result<ModelConfig> {
    let text = std::fs::read_to_string(config_path)
        .with_context(|| format!("cannot read {}", config_path.display()))?;
    let gen_path = config_path.with_file_name("generation_config.json");
    let gen_text = if gen_path.is_file() {
        Some(
            std::fs::read_to_string(&gen_path)
                .with_context(|| format!("cannot read {}", gen_path.display()))?,
        )
    } else {
        None
    };
    parse_config(&text, gen_text.as_deref())
        .with_context(|| format!("invalid model config {}", config_path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::config::RopeScaling;

    const LLAMA31: &str = r#"{
        "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "vocab_size": 128256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "max_position_embeddings": 131072, "bos_token_id": 128000, "eos_token_id": 128001,
        "hidden_act": "silu", "tie_word_embeddings": false }"#;

    #[test]
    fn llama31_with_generation_config_list() {
        let c = parse_config(
            LLAMA31,
            Some(r#"{"eos_token_id": [128001, 128008, 128009]}"#),
        )
        .unwrap();
        assert_eq!(c.architecture, Architecture::Llama);
        assert_eq!(c.head_dim, 128);
        assert_eq!(c.num_key_value_heads, 8);
        assert_eq!(c.rms_norm_eps, 1e-5);
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(
            c.rope_scaling,
            Some(RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192
            })
        );
        assert_eq!(c.eos_token_ids, vec![128001, 128008, 128009]);
        assert_eq!(c.bos_token_id, Some(128000));
        assert!(!c.attention_bias && !c.tie_word_embeddings);
        // Without generation_config.json the config's own eos is used.
        assert_eq!(
            parse_config(LLAMA31, None).unwrap().eos_token_ids,
            vec![128001]
        );
    }

    #[test]
    fn transformers5_rope_parameters_and_qwen2_bias() {
        let c = parse_config(
            r#"{"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "vocab_size": 100, "tie_word_embeddings": true, "sliding_window": 4096,
                "use_sliding_window": false,
                "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "linear", "factor": 2.0}}"#,
            None,
        )
        .unwrap();
        assert_eq!(c.architecture, Architecture::Qwen2);
        assert!(c.attention_bias && c.tie_word_embeddings);
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.rope_theta, 1_000_000.0);
        assert_eq!(c.rope_scaling, Some(RopeScaling::Linear { factor: 2.0 }));
        assert_eq!(c.sliding_window, None);
        assert_eq!(c.rms_norm_eps, 1e-6);
        assert_eq!(c.torch_dtype, None, "no type named");
    }

    #[test]
    fn the_checkpoint_type_is_read_under_either_key() {
        assert_eq!(parse_config(LLAMA31, None).unwrap().torch_dtype, None);
        for key in ["torch_dtype", "dtype"] {
            let json = LLAMA31.replacen('{', &format!(r#"{{"{key}": "float16","#), 1);
            let c = parse_config(&json, None).unwrap();
            assert_eq!(c.torch_dtype.as_deref(), Some("float16"), "{key}");
        }
    }

    #[test]
    fn mistral_keeps_sliding_window_and_explicit_head_dim() {
        let c = parse_config(
            r#"{"architectures": ["MistralForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
                "num_hidden_layers": 2, "num_attention_heads": 4, "head_dim": 32,
                "vocab_size": 100, "sliding_window": 4096, "eos_token_id": 2}"#,
            None,
        )
        .unwrap();
        assert_eq!(c.architecture, Architecture::Mistral);
        assert_eq!(c.head_dim, 32);
        assert_eq!(c.q_size(), 128);
        assert_eq!(c.sliding_window, Some(4096));
        assert_eq!(c.eos_token_ids, vec![2]);
    }

    #[test]
    fn unsupported_architecture_is_named_with_the_supported_list() {
        let e = parse_config(
            r#"{"architectures": ["GPT2LMHeadModel"], "hidden_size": 64}"#,
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("GPT2LMHeadModel"), "{e}");
        for s in Architecture::SUPPORTED {
            assert!(e.contains(s), "{e}");
        }
    }

    /// Impossible values name the field where the file put it, with the value.
    #[test]
    fn impossible_values_name_the_field_as_the_file_spells_it() {
        let qwen = |rope: &str| {
            format!(
                r#"{{"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
                    "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100, {rope}}}"#
            )
        };
        let cases = [
            (
                r#""rope_parameters": {"rope_theta": -5.0}"#,
                "`rope_parameters.rope_theta` = -5 ",
            ),
            (
                r#""rope_parameters": {"rope_theta": 1e6, "rope_type": "linear", "factor": 0}"#,
                "`rope_parameters.factor` = 0 ",
            ),
            (
                r#""rope_scaling": {"rope_type": "linear", "factor": -2}"#,
                "`rope_scaling.factor` = -2 ",
            ),
            (
                r#""rope_scaling": {"rope_type": "llama3", "factor": 8, "low_freq_factor": 4,
                    "high_freq_factor": 4, "original_max_position_embeddings": 64}"#,
                "`rope_scaling.high_freq_factor` = 4 ",
            ),
            (r#""rms_norm_eps": 0"#, "`rms_norm_eps` = 0 "),
            (
                r#""rope_theta": 1e39"#,
                "`rope_theta` = 1e+39 is out of range",
            ),
            (
                r#""max_position_embeddings": 0"#,
                "`max_position_embeddings` = 0 ",
            ),
            (r#""num_key_value_heads": 3"#, "`num_key_value_heads` = 3 "),
        ];
        for (rope, needle) in cases {
            let e = format!("{:#}", parse_config(&qwen(rope), None).unwrap_err());
            assert!(e.contains(needle), "{rope}: {e}");
        }
        assert!(parse_config(&qwen(r#""rope_theta": 1e6"#), None).is_ok());
    }

    #[test]
    fn missing_and_mistyped_fields_are_named() {
        let e = format!(
            "{:#}",
            parse_config(r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4}"#, None)
                .unwrap_err()
        );
        assert!(e.contains("intermediate_size"), "{e}");
        let e = format!(
            "{:#}",
            parse_config(
                r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": "big"}"#,
                None
            )
            .unwrap_err()
        );
        assert!(e.contains("hidden_size"), "{e}");
        assert!(parse_config("not json", None).is_err());
    }
}
