//! GGUF model files (llama.cpp's format): config from the metadata, weights dequantized at
//! load and renamed to the Hugging Face layout, Q/K rows un-permuted.
pub mod dequant;
// The container reader sits at the bottom of the layering (`crate::gguf_file`) because the
// tokenizer reads GGUF metadata too; `reader` keeps its old path.
pub use crate::gguf_file as reader;

use anyhow::{bail, ensure, Context, Result};
use indicatif::ProgressBar;

use super::config::{implied_head_dim, Architecture, Field, ModelConfig, RopeScaling};
use super::layout::expected_tensors;
use super::weights::{HostData, HostTensor, WeightMap};
pub use reader::{GgufArray, GgufFile, GgufStrings, GgufTensorInfo, GgufType, GgufValue};

/// GGUF `general.architecture` values this loader understands.
pub const SUPPORTED_GGUF_ARCHITECTURES: &[&str] = &["llama", "qwen2"];

/// Per-layer tensor names: (llama.cpp, Hugging Face).
const LAYER_NAMES: &[(&str, &str)] = &[
    ("attn_norm", "input_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_norm", "post_attention_layernorm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// Whole-model tensor names: (llama.cpp, Hugging Face).
const GLOBAL_NAMES: &[(&str, &str)] = &[
    ("token_embd", "model.embed_tokens"),
    ("output_norm", "model.norm"),
    ("output", "lm_head"),
];

/// The llama.cpp name of a Hugging Face tensor name (`model.layers.3.mlp.up_proj.weight` ->
/// `blk.3.ffn_up.weight`).
pub fn gguf_name_for(hf: &str) -> Option<String> {
    let (stem, suffix) = hf.rsplit_once('.')?;
    if let Some(rest) = stem.strip_prefix("model.layers.") {
        let (layer, part) = rest.split_once('.')?;
        layer.parse::<usize>().ok()?;
        let (g, _) = LAYER_NAMES.iter().find(|(_, h)| *h == part)?;
        return Some(format!("blk.{layer}.{g}.{suffix}"));
    }
    let (g, _) = GLOBAL_NAMES.iter().find(|(_, h)| *h == stem)?;
    Some(format!("{g}.{suffix}"))
}

/// The Hugging Face name of a llama.cpp tensor name.
pub fn hf_name_for(gguf: &str) -> Option<String> {
    let (stem, suffix) = gguf.rsplit_once('.')?;
    if let Some(rest) = stem.strip_prefix("blk.") {
        let (layer, part) = rest.split_once('.')?;
        layer.parse::<usize>().ok()?;
        let (_, h) = LAYER_NAMES.iter().find(|(g, _)| *g == part)?;
        return Some(format!("model.layers.{layer}.{h}.{suffix}"));
    }
    let (_, h) = GLOBAL_NAMES.iter().find(|(g, _)| *g == stem)?;
    Some(format!("{h}.{suffix}"))
}

/// A value as an error message shows it: scalars as they are, arrays by type and length.
fn shown(v: &GgufValue) -> String {
    match v {
        GgufValue::Array(a) => format!("an array of {} {}", a.len(), a.elem_type()),
        GgufValue::String(s) => format!("{} {s:?}", v.type_description()),
        GgufValue::F32(x) => format!("f32 {x}"),
        GgufValue::F64(x) => format!("f64 {x}"),
        GgufValue::Bool(x) => format!("bool {x}"),
        other => {
            let n = match other.as_i64() {
                Some(i) => i.to_string(),
                None => other.as_u64().unwrap_or_default().to_string(),
            };
            format!("{} {n}", other.type_description())
        }
    }
}

fn meta_usize(g: &GgufFile, key: &str) -> Result<Option<usize>> {
    match g.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|x| usize::try_from(x).ok())
            .map(Some)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "metadata `{key}` is {}, expected a non-negative integer",
                    shown(v)
                )
            }),
    }
}

fn meta_f32(g: &GgufFile, key: &str) -> Result<Option<f32>> {
    match g.get(key) {
        None => Ok(None),
        Some(v) => {
            let x = v.as_f64().ok_or_else(|| {
                anyhow::anyhow!("metadata `{key}` is {}, expected a number", shown(v))
            })?;
            // An f64 past f32's range would silently become infinite.
            ensure!(
                !x.is_finite() || (x as f32).is_finite(),
                "metadata `{key}` = {x} is out of range for a 32-bit float"
            );
            Ok(Some(x as f32))
        }
    }
}

fn required_usize(g: &GgufFile, key: &str) -> Result<usize> {
    meta_usize(g, key)?
        .ok_or_else(|| anyhow::anyhow!("metadata `{key}` is missing (needed for the model shape)"))
}

/// The model config a GGUF file's metadata describes.
pub fn read_config(g: &GgufFile) -> Result<ModelConfig> {
    read_config_inner(g)
        .with_context(|| format!("reading the model config of {}", g.path.display()))
}

fn read_config_inner(g: &GgufFile) -> Result<ModelConfig> {
    let arch_name = g
        .string("general.architecture")?
        .ok_or_else(|| anyhow::anyhow!("metadata `general.architecture` is missing"))?;
    let architecture = match arch_name {
        "llama" => Architecture::Llama,
        "qwen2" => Architecture::Qwen2,
        other => bail!(
            "GGUF architecture `{other}` is not supported (supported: {})",
            SUPPORTED_GGUF_ARCHITECTURES.join(", ")
        ),
    };
    let key = |k: &str| format!("{arch_name}.{k}");
    // llama.cpp writes Mixtral as `llama` with experts: its tensors are not the dense ones
    // this loader maps, so it is refused by name rather than failing on a missing tensor.
    if let Some(experts) = meta_usize(g, &key("expert_count"))?.filter(|&n| n > 0) {
        bail!(
            "GGUF mixture-of-experts models (`{}` = {experts}) are not supported; load the \
             Hugging Face safetensors folder instead (Mixtral and Qwen3-MoE run from there)",
            key("expert_count")
        );
    }
    let vocab_key = match g.tensor_info("token_embd.weight") {
        Some(t) if t.dims.len() == 2 => "token_embd.weight".to_string(),
        _ if g.get(&key("vocab_size")).is_some() => key("vocab_size"),
        _ => "tokenizer.ggml.tokens".to_string(),
    };
    let name = |f: Field| match f {
        Field::HiddenSize => key("embedding_length"),
        Field::IntermediateSize => key("feed_forward_length"),
        Field::NumHiddenLayers => key("block_count"),
        Field::NumAttentionHeads => key("attention.head_count"),
        Field::NumKeyValueHeads => key("attention.head_count_kv"),
        Field::HeadDim => key("attention.key_length"),
        Field::VocabSize => vocab_key.clone(),
        Field::MaxPositionEmbeddings => key("context_length"),
        Field::SlidingWindow => key("attention.sliding_window"),
        Field::RmsNormEps => key("attention.layer_norm_rms_epsilon"),
        Field::RopeTheta => key("rope.freq_base"),
        Field::RopeScalingFactor => key("rope.scaling.factor"),
        // llama.cpp stores no such keys: the Llama 3 values are rebuilt from this tensor.
        Field::RopeLowFreqFactor | Field::RopeHighFreqFactor => "rope_freqs.weight".into(),
        Field::RopeOriginalMaxPositionEmbeddings => key("rope.scaling.original_context_length"),
        // Families this loader does not read (their fields stay at Llama's defaults).
        other => format!("{other:?}"),
    };
    let hidden_size = required_usize(g, &key("embedding_length"))?;
    let num_hidden_layers = required_usize(g, &key("block_count"))?;
    let intermediate_size = required_usize(g, &key("feed_forward_length"))?;
    let num_attention_heads = required_usize(g, &key("attention.head_count"))?;
    let num_key_value_heads =
        meta_usize(g, &key("attention.head_count_kv"))?.unwrap_or(num_attention_heads);
    let head_dim = match meta_usize(g, &key("attention.key_length"))? {
        Some(d) => d,
        None => implied_head_dim(hidden_size, num_attention_heads, &name)?,
    };
    let rms_norm_eps = meta_f32(g, &key("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5);
    let rope_theta = meta_f32(g, &key("rope.freq_base"))?.unwrap_or(10000.0);
    let max_position_embeddings = meta_usize(g, &key("context_length"))?.unwrap_or(2048);
    let vocab_size = match g.tensor_info("token_embd.weight") {
        Some(t) if t.dims.len() == 2 => t.dims[1] as usize,
        _ => match meta_usize(g, &key("vocab_size"))? {
            Some(v) => v,
            None => g
                .array("tokenizer.ggml.tokens")?
                .map(|a| a.len() as usize)
                .ok_or_else(|| anyhow::anyhow!("cannot tell the vocabulary size: no token_embd.weight, vocab_size or token list"))?,
        },
    };
    let rope_scaling = match g.string(&key("rope.scaling.type"))? {
        None | Some("none") => None,
        Some("linear") => Some(RopeScaling::Linear {
            factor: meta_f32(g, &key("rope.scaling.factor"))?.unwrap_or(1.0),
        }),
        Some(other) => bail!("rope scaling type `{other}` is not supported (only linear)"),
    };
    let tie_word_embeddings = g.tensor_info("output.weight").is_none();
    let id = |k: &str| meta_usize(g, k).map(|o| o.map(|x| x as u32));
    let mut eos_token_ids: Vec<u32> = id("tokenizer.ggml.eos_token_id")?.into_iter().collect();
    if let Some(eot) = id("tokenizer.ggml.eot_token_id")? {
        if !eos_token_ids.contains(&eot) {
            eos_token_ids.push(eot);
        }
    }
    let mut cfg = ModelConfig {
        architecture,
        hidden_size,
        intermediate_size,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        vocab_size,
        rms_norm_eps,
        rope_theta,
        rope_scaling,
        max_position_embeddings,
        tie_word_embeddings,
        attention_bias: architecture == Architecture::Qwen2,
        sliding_window: None,
        bos_token_id: id("tokenizer.ggml.bos_token_id")?,
        eos_token_ids,
        torch_dtype: None,
        family: Default::default(),
    };
    // Before the Llama 3 check below, which computes frequencies from these values.
    cfg.validate(&name)?;
    if let Some(info) = g.tensor_info("rope_freqs.weight") {
        cfg.rope_scaling = Some(llama3_scaling_from_rope_freqs(g, info, &cfg, &key, &name)?);
    }
    Ok(cfg)
}

/// Llama 3.1 GGUFs carry the RoPE scaling as a `rope_freqs` tensor (one divisor per frequency)
/// instead of parameters. Every Llama 3.x release uses low 1 / high 4 with the factor and
/// original context stored beside it; we rebuild those parameters and check that they
/// reproduce the tensor, refusing the file otherwise rather than running with wrong RoPE.
fn llama3_scaling_from_rope_freqs(
    g: &GgufFile,
    info: &GgufTensorInfo,
    cfg: &ModelConfig,
    key: &dyn Fn(&str) -> String,
    name: &dyn Fn(Field) -> String,
) -> Result<RopeScaling> {
    let n = cfg.head_dim / 2;
    ensure!(
        info.ggml_type == dequant::ggml_type::F32 && info.numel() == n as u64,
        "rope_freqs.weight should be {n} f32 values"
    );
    let bytes = g.tensor_bytes(info, 4 * n as u64)?;
    let divisors: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let factor = meta_f32(g, &key("rope.scaling.factor"))?
        .unwrap_or_else(|| divisors.iter().cloned().fold(1.0, f32::max));
    let original = meta_usize(g, &key("rope.scaling.original_context_length"))?.unwrap_or(8192);
    let scaling = RopeScaling::Llama3 {
        factor,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: original,
    };
    let plain = ModelConfig {
        rope_scaling: None,
        ..cfg.clone()
    }
    .rope_inv_freq();
    let scaled = ModelConfig {
        rope_scaling: Some(scaling.clone()),
        ..cfg.clone()
    };
    // A factor of 0 would turn the comparison below into inf against inf: name it instead.
    scaled.validate(name)?;
    let scaled = scaled.rope_inv_freq();
    for i in 0..n {
        let want = plain[i] / scaled[i];
        ensure!(
            (want - divisors[i]).abs() <= 1e-3 * want.abs().max(1.0),
            "rope_freqs.weight[{i}] = {} does not match Llama 3 scaling (factor {factor}, original context {original}) which gives {want}: this RoPE scaling is not supported",
            divisors[i]
        );
    }
    Ok(scaling)
}

/// Reverse llama.cpp's Q/K row permutation. llama.cpp stores each head's rows interleaved
/// (row 2i + s holds half s, index i) for its interleaved RoPE; Hugging Face keeps the two
/// halves contiguous (row s * head_dim/2 + i).
pub fn unpermute_rows<T: Copy>(data: &[T], n_heads: usize, rows: usize, cols: usize) -> Vec<T> {
    let head_dim = rows / n_heads;
    let half = head_dim / 2;
    let mut out = Vec::with_capacity(data.len());
    for h in 0..n_heads {
        for s in 0..2 {
            for i in 0..half {
                let src = h * head_dim + 2 * i + s;
                out.extend_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

fn unpermute_tensor(t: HostTensor, n_heads: usize) -> Result<HostTensor> {
    let rows = t.shape[0];
    let cols: usize = t.shape[1..].iter().product();
    ensure!(
        n_heads > 0 && rows.is_multiple_of(n_heads) && (rows / n_heads).is_multiple_of(2),
        "{rows} rows do not split into {n_heads} heads of even size"
    );
    let data = match &t.data {
        HostData::F32(v) => HostData::F32(unpermute_rows(v, n_heads, rows, cols)),
        HostData::F16(v) => HostData::F16(unpermute_rows(v, n_heads, rows, cols)),
        HostData::BF16(v) => HostData::BF16(unpermute_rows(v, n_heads, rows, cols)),
    };
    Ok(HostTensor {
        shape: t.shape,
        data,
    })
}

/// Total bytes of the tensors `load_weights` reads, for a progress bar.
pub fn weights_nbytes(g: &GgufFile, cfg: &ModelConfig) -> u64 {
    expected_tensors(cfg)
        .iter()
        .filter_map(|e| gguf_name_for(&e.name))
        .filter_map(|n| g.tensor_info(&n))
        .filter_map(|t| {
            dequant::tensor_nbytes(t.ggml_type, t.numel(), t.dims.first().copied().unwrap_or(1))
                .ok()
        })
        // Sizes come from the file: a corrupt one can claim more than u64 in all.
        .fold(0, u64::saturating_add)
}

/// Read every tensor the model needs, dequantized, under Hugging Face names.
pub fn load_weights(g: &GgufFile, cfg: &ModelConfig, progress: &ProgressBar) -> Result<WeightMap> {
    let file = g.path.display();
    let mut map = WeightMap::default();
    // llama.cpp permutes Q/K only for its "llama" architecture (Qwen2 uses NeoX-style RoPE).
    let permuted = cfg.architecture == Architecture::Llama;
    for exp in expected_tensors(cfg) {
        let gname = gguf_name_for(&exp.name)
            .ok_or_else(|| anyhow::anyhow!("no GGUF name for tensor `{}`", exp.name))?;
        let Some(info) = g.tensor_info(&gname) else {
            if exp.optional {
                continue;
            }
            bail!(
                "GGUF file {file} has no tensor `{gname}` (Hugging Face name `{}`), which the model needs",
                exp.name
            );
        };
        let shape = info.shape();
        ensure!(
            shape == exp.shape,
            "tensor `{gname}` in {file} has shape {shape:?} but the model config implies {:?}",
            exp.shape
        );
        let nbytes = dequant::tensor_nbytes(info.ggml_type, info.numel(), info.dims[0])
            .with_context(|| format!("tensor `{gname}` in {file}"))?;
        let bytes = g.tensor_bytes(info, nbytes)?;
        let data = dequant::dequantize(info.ggml_type, bytes, info.numel() as usize)
            .with_context(|| format!("tensor `{gname}` in {file}"))?;
        let mut tensor = HostTensor { shape, data };
        if permuted && exp.name.ends_with("q_proj.weight") {
            tensor = unpermute_tensor(tensor, cfg.num_attention_heads)
                .with_context(|| format!("tensor `{gname}` in {file}"))?;
        } else if permuted && exp.name.ends_with("k_proj.weight") {
            tensor = unpermute_tensor(tensor, cfg.num_key_value_heads)
                .with_context(|| format!("tensor `{gname}` in {file}"))?;
        }
        map.tensors.insert(exp.name, tensor);
        progress.inc(nbytes);
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways() {
        let pairs = [
            ("token_embd.weight", "model.embed_tokens.weight"),
            ("output_norm.weight", "model.norm.weight"),
            ("output.weight", "lm_head.weight"),
            (
                "blk.0.attn_q.weight",
                "model.layers.0.self_attn.q_proj.weight",
            ),
            (
                "blk.12.attn_k.bias",
                "model.layers.12.self_attn.k_proj.bias",
            ),
            (
                "blk.3.attn_output.weight",
                "model.layers.3.self_attn.o_proj.weight",
            ),
            (
                "blk.3.ffn_norm.weight",
                "model.layers.3.post_attention_layernorm.weight",
            ),
            (
                "blk.29.ffn_down.weight",
                "model.layers.29.mlp.down_proj.weight",
            ),
        ];
        for (g, h) in pairs {
            assert_eq!(hf_name_for(g).as_deref(), Some(h));
            assert_eq!(gguf_name_for(h).as_deref(), Some(g));
        }
        assert_eq!(hf_name_for("rope_freqs.weight"), None);
        assert_eq!(hf_name_for("blk.x.attn_q.weight"), None);
    }

    /// Permute as llama.cpp's converter does (reshape to [heads, 2, hd/2, cols], swap the
    /// middle axes) and check that un-permuting restores the original.
    #[test]
    fn unpermute_reverses_llama_cpp_permute() {
        let (heads, hd, cols) = (3, 8, 2);
        let rows = heads * hd;
        let hf: Vec<u32> = (0..(rows * cols) as u32).collect();
        let mut permuted = vec![0u32; hf.len()];
        for h in 0..heads {
            for s in 0..2 {
                for i in 0..hd / 2 {
                    let src = h * hd + s * hd / 2 + i;
                    let dst = h * hd + 2 * i + s;
                    permuted[dst * cols..(dst + 1) * cols]
                        .copy_from_slice(&hf[src * cols..(src + 1) * cols]);
                }
            }
        }
        assert_ne!(permuted, hf);
        assert_eq!(unpermute_rows(&permuted, heads, rows, cols), hf);
    }

    fn llama_meta(extra: Vec<(&'static str, GgufValue)>) -> Vec<(&'static str, GgufValue)> {
        let mut m = vec![
            ("general.architecture", GgufValue::String("llama".into())),
            ("llama.embedding_length", GgufValue::U32(256)),
            ("llama.block_count", GgufValue::U32(2)),
            ("llama.feed_forward_length", GgufValue::U32(512)),
            ("llama.attention.head_count", GgufValue::U32(4)),
            ("llama.attention.head_count_kv", GgufValue::U32(2)),
            ("llama.rope.freq_base", GgufValue::F32(500000.0)),
            ("llama.vocab_size", GgufValue::U32(1000)),
        ];
        m.extend(extra);
        m
    }

    fn open_written(
        meta: &[(&str, GgufValue)],
        tensors: &[reader::test_writer::TestTensor],
    ) -> (tempfile::TempDir, GgufFile) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.gguf");
        std::fs::write(&p, reader::test_writer::write(meta, tensors)).unwrap();
        let g = GgufFile::open(&p).unwrap();
        (dir, g)
    }

    /// Llama 3.1 GGUFs store RoPE scaling as per-frequency divisors: they are turned back into
    /// the llama3 parameters, and divisors that match no llama3 scaling are refused.
    #[test]
    fn rope_freqs_tensor_becomes_llama3_scaling() {
        let want = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        let (_d, g) = open_written(&llama_meta(vec![]), &[]);
        let base = read_config(&g).unwrap();
        assert_eq!((base.head_dim, base.vocab_size), (64, 1000));
        let plain = base.rope_inv_freq();
        let scaled = ModelConfig {
            rope_scaling: Some(want.clone()),
            ..base.clone()
        }
        .rope_inv_freq();
        let divisors: Vec<f32> = plain.iter().zip(&scaled).map(|(p, s)| p / s).collect();
        let tensor = |d: &[f32]| reader::test_writer::TestTensor {
            name: "rope_freqs.weight".into(),
            dims: vec![d.len() as u64],
            ggml_type: dequant::ggml_type::F32,
            data: d.iter().flat_map(|x| x.to_le_bytes()).collect(),
        };
        let (_d, g) = open_written(&llama_meta(vec![]), &[tensor(&divisors)]);
        assert_eq!(read_config(&g).unwrap().rope_scaling, Some(want));

        let mut wrong = divisors.clone();
        wrong[20] *= 1.5;
        let (_d, g) = open_written(&llama_meta(vec![]), &[tensor(&wrong)]);
        let e = format!("{:#}", read_config(&g).unwrap_err());
        assert!(e.contains("rope_freqs") && e.contains("m.gguf"), "{e}");

        // A stored factor of 0 is named as such, not as a tensor mismatch.
        let zero = llama_meta(vec![("llama.rope.scaling.factor", GgufValue::F32(0.0))]);
        let (_d, g) = open_written(&zero, &[tensor(&divisors)]);
        let e = format!("{:#}", read_config(&g).unwrap_err());
        assert!(e.contains("`llama.rope.scaling.factor` = 0 "), "{e}");
    }

    /// Values no model can have, and keys of the wrong type, are named with what was found.
    #[test]
    fn impossible_values_and_wrong_types_are_named() {
        let with = |over: Vec<(&'static str, GgufValue)>| {
            let mut m = llama_meta(vec![]);
            for (k, v) in over {
                match m.iter_mut().find(|(key, _)| *key == k) {
                    Some(e) => e.1 = v,
                    None => m.push((k, v)),
                }
            }
            m
        };
        let theta = "llama.rope.freq_base";
        let eps = "llama.attention.layer_norm_rms_epsilon";
        let cases = [
            (with(vec![(theta, GgufValue::F32(f32::NAN))]), "`llama.rope.freq_base` = NaN "),
            (with(vec![(theta, GgufValue::F32(f32::NEG_INFINITY))]), "= -inf "),
            (with(vec![(theta, GgufValue::U32(0))]), "`llama.rope.freq_base` = 0 "),
            (with(vec![(eps, GgufValue::F32(-1e-5))]), "`llama.attention.layer_norm_rms_epsilon` = -0.00001 "),
            (with(vec![(eps, GgufValue::F64(1e300))]), "out of range for a 32-bit float"),
            (
                with(vec![
                    ("llama.rope.scaling.type", GgufValue::String("linear".into())),
                    ("llama.rope.scaling.factor", GgufValue::F32(f32::NAN)),
                ]),
                "`llama.rope.scaling.factor` = NaN ",
            ),
            (
                with(vec![("llama.embedding_length", GgufValue::U32(250))]),
                "`llama.embedding_length` = 250 is not divisible by `llama.attention.head_count` = 4",
            ),
            (
                with(vec![("llama.attention.head_count_kv", GgufValue::U32(3))]),
                "`llama.attention.head_count_kv` = 3 ",
            ),
            (
                with(vec![("llama.context_length", GgufValue::U32(0))]),
                "`llama.context_length` = 0 ",
            ),
            (
                with(vec![("llama.expert_count", GgufValue::U32(8))]),
                "`llama.expert_count` = 8) are not supported",
            ),
            (
                with(vec![("general.architecture", GgufValue::U32(7))]),
                "metadata `general.architecture` has type u32, expected a string",
            ),
            (
                with(vec![("llama.rope.scaling.type", GgufValue::F32(1.0))]),
                "metadata `llama.rope.scaling.type` has type f32",
            ),
            (
                with(vec![("llama.block_count", GgufValue::F32(2.5))]),
                "metadata `llama.block_count` is f32 2.5, expected a non-negative integer",
            ),
        ];
        for (meta, needle) in cases {
            let (_d, g) = open_written(&meta, &[]);
            let e = format!("{:#}", read_config(&g).unwrap_err());
            assert!(e.contains(needle) && e.contains("m.gguf"), "{needle}: {e}");
        }
    }

    /// Found by fuzz/gguf: tensor sizes a corrupt header claims summed past u64 (a panic in
    /// debug builds, a wrapped progress total in release).
    #[test]
    fn claimed_tensor_sizes_past_u64_saturate() {
        let huge = |name: &str| reader::test_writer::TestTensor {
            name: name.into(),
            dims: vec![1 << 31, 1 << 30],
            ggml_type: dequant::ggml_type::F32,
            data: Vec::new(),
        };
        let (_d, g) = open_written(
            &llama_meta(vec![]),
            &[huge("blk.0.ffn_gate.weight"), huge("blk.0.ffn_up.weight")],
        );
        let cfg = read_config(&g).unwrap();
        assert_eq!(weights_nbytes(&g, &cfg), u64::MAX);
    }

    #[test]
    fn unsupported_architecture_and_missing_keys_are_named() {
        let mut meta = llama_meta(vec![]);
        meta[0].1 = GgufValue::String("gemma2".into());
        let (_d, g) = open_written(&meta, &[]);
        let e = format!("{:#}", read_config(&g).unwrap_err());
        assert!(e.contains("gemma2") && e.contains("llama, qwen2"), "{e}");
        let meta: Vec<_> = llama_meta(vec![])
            .into_iter()
            .filter(|(k, _)| *k != "llama.block_count")
            .collect();
        let (_d, g) = open_written(&meta, &[]);
        let e = format!("{:#}", read_config(&g).unwrap_err());
        assert!(e.contains("llama.block_count"), "{e}");
    }
}
