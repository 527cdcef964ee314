//! `quantization_config` of config.json: the FP8 formats rvllm reads, and a refusal naming
//! anything else.
use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// How a checkpoint's FP8 weights are scaled. Every scale multiplies the decoded code (the
/// `weight_scale_inv` of block-wise checkpoints too, despite its name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WeightScaling {
    /// One scale per tensor (`weight_scale`, shape `[]` or `[1]`).
    Tensor,
    /// One scale per output row (`weight_scale`, shape `[out, 1]` or `[out]`).
    Channel,
    /// One scale per `rows x cols` block; the blocks at the right and bottom edges may be
    /// partial, so the scale grid is `[ceil(out / rows), ceil(in / cols)]`.
    Block { rows: usize, cols: usize },
}

/// An FP8 checkpoint's format, from its `quantization_config`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fp8Checkpoint {
    /// `fp8` or `compressed-tensors`, as config.json names it.
    pub quant_method: String,
    pub weights: WeightScaling,
}

impl Fp8Checkpoint {
    /// The name of a weight's scale tensor (`<prefix>.weight` → `<prefix>.weight_scale_inv`
    /// for block-wise `fp8`, `<prefix>.weight_scale` otherwise).
    pub fn scale_name(&self, weight: &str) -> String {
        let prefix = weight.strip_suffix(".weight").unwrap_or(weight);
        let block_fp8 =
            self.quant_method == "fp8" && matches!(self.weights, WeightScaling::Block { .. });
        if block_fp8 {
            format!("{prefix}.weight_scale_inv")
        } else {
            format!("{prefix}.weight_scale")
        }
    }
}

/// What quantization the model runs with: the checkpoint's format, and the runtime options.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct QuantConfig {
    /// The checkpoint's FP8 format; None for unquantized checkpoints.
    pub checkpoint: Option<Fp8Checkpoint>,
    /// `--quantization fp8` rounded the layer weights through E4M3.
    pub online_fp8: bool,
    /// `--kv-cache-dtype fp8`: per layer, the (k, v) scales of the E4M3 KV cache (from the
    /// checkpoint's `k_scale` / `v_scale`, else 1.0). None: the cache keeps the compute type.
    pub kv_cache_fp8_scales: Option<Vec<(f32, f32)>>,
}

fn as_u64_pair(v: &Value) -> Option<(usize, usize)> {
    let a = v.as_array()?;
    if a.len() != 2 {
        return None;
    }
    Some((a[0].as_u64()? as usize, a[1].as_u64()? as usize))
}

/// `fp8` (transformers' FineGrainedFP8Config and vLLM's Fp8Config).
fn parse_fp8(q: &Value) -> Result<Fp8Checkpoint> {
    if let Some(fmt) = q.get("fmt").and_then(Value::as_str) {
        ensure!(
            fmt == "e4m3",
            "quantization_config.fmt = {fmt}: only e4m3 FP8 weights are supported"
        );
    }
    match q.get("activation_scheme").and_then(Value::as_str) {
        None | Some("dynamic") => {}
        Some("static") => bail!(
            "quantization_config.activation_scheme = static: rvllm computes activations \
             unquantized and would ignore the checkpoint's static input_scale values; only \
             dynamic FP8 checkpoints are supported"
        ),
        Some(other) => bail!("quantization_config.activation_scheme = {other} is not supported"),
    }
    let weights = match q.get("weight_block_size") {
        None | Some(Value::Null) => WeightScaling::Tensor,
        Some(v) => match as_u64_pair(v) {
            Some((rows, cols)) if rows > 0 && cols > 0 => WeightScaling::Block { rows, cols },
            _ => bail!(
                "quantization_config.weight_block_size = {v}: expected two positive block sizes"
            ),
        },
    };
    Ok(Fp8Checkpoint {
        quant_method: "fp8".into(),
        weights,
    })
}

/// One scheme of a compressed-tensors `config_groups` entry: 8-bit float, symmetric.
fn check_float8(group: &str, what: &str, s: &Value) -> Result<()> {
    let bits = s.get("num_bits").and_then(Value::as_u64);
    let kind = s.get("type").and_then(Value::as_str);
    ensure!(
        bits == Some(8) && kind == Some("float"),
        "compressed-tensors group {group}: {what} are {} {}-bit; only 8-bit float (FP8) is supported",
        kind.unwrap_or("?"),
        bits.map_or("?".into(), |b| b.to_string())
    );
    if s.get("symmetric").and_then(Value::as_bool) == Some(false) {
        bail!("compressed-tensors group {group}: asymmetric {what} are not supported");
    }
    Ok(())
}

/// compressed-tensors (llm-compressor) `float-quantized` checkpoints.
fn parse_compressed_tensors(q: &Value) -> Result<Fp8Checkpoint> {
    let format = q.get("format").and_then(Value::as_str).unwrap_or("?");
    ensure!(
        format == "float-quantized",
        "compressed-tensors format `{format}` is not supported; only float-quantized (FP8) is"
    );
    if let Some(s) = q
        .get("sparsity_config")
        .filter(|s| s.as_object().is_some_and(|o| !o.is_empty()))
    {
        bail!("compressed-tensors sparsity_config {s} is not supported");
    }
    if q.get("transform_config").is_some_and(|t| !t.is_null()) {
        bail!("compressed-tensors transform_config is not supported");
    }
    let groups = q
        .get("config_groups")
        .and_then(Value::as_object)
        .filter(|g| !g.is_empty())
        .ok_or_else(|| anyhow::anyhow!("compressed-tensors config has no config_groups"))?;
    let mut scaling: Option<WeightScaling> = None;
    for (name, g) in groups {
        let w = g.get("weights").filter(|w| !w.is_null()).ok_or_else(|| {
            anyhow::anyhow!("compressed-tensors group {name} has no weights scheme")
        })?;
        check_float8(name, "weights", w)?;
        if w.get("dynamic").and_then(Value::as_bool) == Some(true) {
            bail!("compressed-tensors group {name}: dynamic weight scales are not supported");
        }
        let strategy = w
            .get("strategy")
            .and_then(Value::as_str)
            .unwrap_or("tensor");
        let this = match strategy {
            "tensor" => WeightScaling::Tensor,
            "channel" => WeightScaling::Channel,
            "block" => match w.get("block_structure").and_then(as_u64_pair) {
                Some((rows, cols)) if rows > 0 && cols > 0 => WeightScaling::Block { rows, cols },
                _ => bail!("compressed-tensors group {name}: block strategy without a valid block_structure"),
            },
            other => bail!(
                "compressed-tensors group {name}: weight strategy `{other}` is not supported (tensor, channel or block)"
            ),
        };
        if scaling.is_some_and(|s| s != this) {
            bail!("compressed-tensors groups with different weight strategies are not supported");
        }
        scaling = Some(this);
        if let Some(a) = g.get("input_activations").filter(|a| !a.is_null()) {
            check_float8(name, "input activations", a)?;
            if a.get("dynamic").and_then(Value::as_bool) != Some(true) {
                bail!(
                    "compressed-tensors group {name}: static input activation scales are not \
                     supported (rvllm computes activations unquantized and would ignore them)"
                );
            }
        }
        if g.get("output_activations").is_some_and(|a| !a.is_null()) {
            bail!(
                "compressed-tensors group {name}: output activation quantization is not supported"
            );
        }
    }
    Ok(Fp8Checkpoint {
        quant_method: "compressed-tensors".into(),
        weights: scaling.unwrap_or(WeightScaling::Tensor),
    })
}

/// The checkpoint's FP8 format from config.json's `quantization_config`; None when it has
/// none. Any other method, or an option rvllm would not honour, is refused by name.
pub fn parse_quantization_config(cfg: &Value) -> Result<Option<Fp8Checkpoint>> {
    let q = match cfg.get("quantization_config") {
        None | Some(Value::Null) => return Ok(None),
        Some(q) if q.is_object() => q,
        Some(q) => bail!("quantization_config is {q}, expected an object"),
    };
    let method = q.get("quant_method").and_then(Value::as_str).unwrap_or("?");
    match method {
        "fp8" => parse_fp8(q).map(Some),
        "compressed-tensors" => parse_compressed_tensors(q).map(Some),
        other => bail!(
            "quantization_config.quant_method `{other}` is not supported; rvllm reads fp8 and \
             compressed-tensors (float-quantized) FP8 checkpoints"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(q: Value) -> Result<Option<Fp8Checkpoint>> {
        parse_quantization_config(&json!({ "quantization_config": q }))
    }

    fn ct(weights: Value, acts: Value) -> Value {
        json!({"quant_method": "compressed-tensors", "format": "float-quantized",
               "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                             "input_activations": acts}},
               "ignore": ["lm_head"]})
    }

    #[test]
    fn reads_the_hub_formats() {
        assert_eq!(parse_quantization_config(&json!({})).unwrap(), None);
        let block = parse(
            json!({"quant_method": "fp8", "activation_scheme": "dynamic",
                                 "fmt": "e4m3", "weight_block_size": [128, 128]}),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            block.weights,
            WeightScaling::Block {
                rows: 128,
                cols: 128
            }
        );
        assert_eq!(
            block.scale_name("a.q_proj.weight"),
            "a.q_proj.weight_scale_inv"
        );
        let tensor = parse(json!({"quant_method": "fp8", "activation_scheme": "dynamic"}))
            .unwrap()
            .unwrap();
        assert_eq!(tensor.weights, WeightScaling::Tensor);
        assert_eq!(
            tensor.scale_name("a.q_proj.weight"),
            "a.q_proj.weight_scale"
        );
        let w = json!({"num_bits": 8, "type": "float", "strategy": "channel",
                       "dynamic": false, "symmetric": true});
        let a = json!({"num_bits": 8, "type": "float", "strategy": "token", "dynamic": true});
        let channel = parse(ct(w, a)).unwrap().unwrap();
        assert_eq!(channel.weights, WeightScaling::Channel);
    }

    #[test]
    fn refuses_what_it_would_not_honour_by_name() {
        let msg = |q: Value| format!("{:#}", parse(q).unwrap_err());
        assert!(msg(json!({"quant_method": "awq"})).contains("`awq`"));
        assert!(
            msg(json!({"quant_method": "fp8", "activation_scheme": "static"})).contains("static")
        );
        assert!(msg(json!({"quant_method": "fp8", "fmt": "e5m2"})).contains("e5m2"));
        let w = json!({"num_bits": 8, "type": "float", "strategy": "tensor"});
        let static_acts = json!({"num_bits": 8, "type": "float", "dynamic": false});
        assert!(msg(ct(w.clone(), static_acts)).contains("static input"));
        let int8 = json!({"num_bits": 8, "type": "int", "strategy": "channel"});
        assert!(msg(ct(int8, Value::Null)).contains("int 8-bit"));
        let group = json!({"num_bits": 8, "type": "float", "strategy": "group"});
        assert!(msg(ct(group, Value::Null)).contains("`group`"));
    }
}
