//! A tokenizer rebuilt from GGUF metadata (`tokenizer.ggml.*`), as the `tokenizers` JSON
//! format describes it, so that one code path (tokenizers) does all encoding.
//!
//! - `gpt2` (byte-level BPE): tokens + merges; the pre-tokenizer follows `tokenizer.ggml.pre`
//!   (llama.cpp's name for the model's split regex).
//! - `llama` (SentencePiece BPE with byte fallback): tokens + scores; merges are recovered
//!   from the scores, as transformers' converter does.
//!
//! Tokens of type 3 (control) become special added tokens; type 4 (user defined) plain added
//! tokens.
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::Tokenizer;
use crate::gguf_file::{GgufFile, GgufValue};

const TOKEN_TYPE_NORMAL: i64 = 1;
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;
const TOKEN_TYPE_BYTE: i64 = 6;

/// Split regex of Llama 3 style tokenizers (llama.cpp pre-type `llama-bpe`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Split regex of Qwen2 (single digits).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn byte_level(use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

fn split(pattern: &str) -> Value {
    json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false})
}

/// The pre-tokenizer for a llama.cpp pre-type.
fn gpt2_pre_tokenizer(pre: &str) -> Result<Value> {
    Ok(match pre {
        "default" | "gpt-2" | "gpt2" | "olmo" | "starcoder" | "refact" => byte_level(true),
        // SmolLM splits every \p{N} character off on its own before the GPT-2 regex.
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "llama-bpe" | "llama3" | "llama-v3" | "smaug-bpe" | "falcon3" => {
            json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT), byte_level(false)]})
        }
        "qwen2" | "deepseek-r1-qwen" => {
            json!({"type": "Sequence", "pretokenizers": [split(QWEN2_SPLIT), byte_level(false)]})
        }
        other => bail!(
            "GGUF tokenizer pre-type `{other}` is not supported (supported: default, gpt-2, smollm, llama-bpe, qwen2); use the Hugging Face folder of this model instead"
        ),
    })
}

fn string_array<'a>(g: &'a GgufFile, key: &str) -> Result<Option<Vec<&'a str>>> {
    let Some(arr) = g.array(key)? else {
        return Ok(None);
    };
    let strings = arr.strings().with_context(|| {
        format!(
            "metadata `{key}` is an array of {}, expected strings",
            arr.elem_type()
        )
    })?;
    Ok(Some(strings.iter().collect()))
}

fn int_array(g: &GgufFile, key: &str) -> Result<Option<Vec<i64>>> {
    let Some(arr) = g.array(key)? else {
        return Ok(None);
    };
    arr.to_i64s().map(Some).with_context(|| {
        format!(
            "metadata `{key}` is an array of {}, expected integers",
            arr.elem_type()
        )
    })
}

fn float_array(g: &GgufFile, key: &str) -> Result<Option<Vec<f64>>> {
    let Some(arr) = g.array(key)? else {
        return Ok(None);
    };
    arr.to_f64s().map(Some).with_context(|| {
        format!(
            "metadata `{key}` is an array of {}, expected numbers",
            arr.elem_type()
        )
    })
}

fn token_id(g: &GgufFile, key: &str) -> Option<u32> {
    g.get(key).and_then(GgufValue::as_u64).map(|v| v as u32)
}

/// The tokenizer stored in a GGUF file, or None when it has none.
pub fn from_gguf(g: &GgufFile) -> Result<Option<Tokenizer>> {
    let model = g
        .string("tokenizer.ggml.model")
        .with_context(|| format!("reading the tokenizer stored in {}", g.path.display()))?;
    let Some(model) = model else {
        return Ok(None);
    };
    build(g, model)
        .map(Some)
        .with_context(|| format!("cannot build the tokenizer stored in {}", g.path.display()))
}

fn build(g: &GgufFile, model: &str) -> Result<Tokenizer> {
    let tokens = string_array(g, "tokenizer.ggml.tokens")?
        .context("metadata `tokenizer.ggml.tokens` is missing")?;
    let types = int_array(g, "tokenizer.ggml.token_type")?
        .unwrap_or_else(|| vec![TOKEN_TYPE_NORMAL; tokens.len()]);
    anyhow::ensure!(
        types.len() == tokens.len(),
        "{} token types for {} tokens",
        types.len(),
        tokens.len()
    );
    let bos = token_id(g, "tokenizer.ggml.bos_token_id");
    let eos = token_id(g, "tokenizer.ggml.eos_token_id");
    let unk = token_id(g, "tokenizer.ggml.unknown_token_id");
    let name_of = |id: Option<u32>| {
        id.and_then(|i| tokens.get(i as usize))
            .map(|s| s.to_string())
    };

    let added_tokens: Vec<Value> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|(_, (_, t))| **t == TOKEN_TYPE_CONTROL || **t == TOKEN_TYPE_USER_DEFINED)
        .map(|(id, (content, t))| {
            json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": *t == TOKEN_TYPE_CONTROL})
        })
        .collect();
    let vocab: serde_json::Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), json!(i)))
        .collect();

    let (add_bos_default, mut doc) = match model {
        "gpt2" => {
            let merges: Vec<Value> = string_array(g, "tokenizer.ggml.merges")?
                .context("metadata `tokenizer.ggml.merges` is missing (a gpt2 tokenizer needs it)")?
                .iter()
                .map(|m| {
                    m.split_once(' ')
                        .map(|(a, b)| json!([a, b]))
                        .with_context(|| format!("merge `{m}` is not two tokens"))
                })
                .collect::<Result<_>>()?;
            let pre = g.string("tokenizer.ggml.pre")?.unwrap_or("default");
            let doc = json!({
                "normalizer": null,
                "pre_tokenizer": gpt2_pre_tokenizer(pre)?,
                "decoder": byte_level(true),
                "model": {"type": "BPE", "dropout": null, "unk_token": null,
                          "continuing_subword_prefix": null, "end_of_word_suffix": null,
                          "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                          "vocab": vocab, "merges": merges},
            });
            (false, doc)
        }
        "llama" => {
            let scores = float_array(g, "tokenizer.ggml.scores")?.context(
                "metadata `tokenizer.ggml.scores` is missing (a llama tokenizer needs it)",
            )?;
            let merges = sentencepiece_merges(&tokens, &types, &scores);
            let add_space = g
                .get("tokenizer.ggml.add_space_prefix")
                .and_then(GgufValue::as_bool)
                .unwrap_or(true);
            let mut normalizers = vec![];
            if add_space {
                normalizers.push(json!({"type": "Prepend", "prepend": "\u{2581}"}));
            }
            normalizers.push(
                json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}),
            );
            let mut decoders = vec![
                json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
                json!({"type": "ByteFallback"}),
                json!({"type": "Fuse"}),
            ];
            if add_space {
                decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
            }
            let doc = json!({
                "normalizer": {"type": "Sequence", "normalizers": normalizers},
                "pre_tokenizer": null,
                "decoder": {"type": "Sequence", "decoders": decoders},
                "model": {"type": "BPE", "dropout": null, "unk_token": name_of(unk),
                          "continuing_subword_prefix": null, "end_of_word_suffix": null,
                          "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                          "vocab": vocab, "merges": merges},
            });
            (true, doc)
        }
        other => bail!("GGUF tokenizer model `{other}` is not supported (supported: gpt2, llama)"),
    };

    let add_bos = g
        .get("tokenizer.ggml.add_bos_token")
        .and_then(GgufValue::as_bool)
        .unwrap_or(add_bos_default);
    let post = match (add_bos, bos, name_of(bos)) {
        (true, Some(id), Some(name)) => json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": name, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": name, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": name, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {name.clone(): {"id": name, "ids": [id], "tokens": [name]}},
        }),
        _ => Value::Null,
    };
    let obj = doc.as_object_mut().expect("built as an object");
    obj.insert("version".into(), json!("1.0"));
    obj.insert("truncation".into(), Value::Null);
    obj.insert("padding".into(), Value::Null);
    obj.insert("added_tokens".into(), Value::Array(added_tokens));
    obj.insert("post_processor".into(), post);

    let bytes = serde_json::to_vec(&doc)?;
    let inner = tokenizers::Tokenizer::from_bytes(&bytes)
        .map_err(|e| anyhow::anyhow!("the tokenizer description is not valid: {e}"))?;
    Ok(Tokenizer::from_parts(
        inner,
        g.string("tokenizer.chat_template")?.map(String::from),
        name_of(bos),
        name_of(eos),
    ))
}

/// SentencePiece BPE stores no merges, only a score per piece (higher merges first). Every
/// way of writing a piece as two shorter pieces of the vocabulary is a merge, ranked by the
/// merged piece's score (ties by the ids of the parts, as transformers orders them).
fn sentencepiece_merges(tokens: &[&str], types: &[i64], scores: &[f64]) -> Vec<Value> {
    let index: std::collections::HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| types[*i] == TOKEN_TYPE_NORMAL || types[*i] == TOKEN_TYPE_USER_DEFINED)
        .map(|(i, t)| (*t, i))
        .collect();
    let mut merges: Vec<(f64, usize, usize)> = Vec::new();
    for (&piece, &id) in &index {
        if types[id] != TOKEN_TYPE_NORMAL || types[id] == TOKEN_TYPE_BYTE {
            continue;
        }
        for (split, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(split);
            if let (Some(&li), Some(&ri)) = (index.get(l), index.get(r)) {
                merges.push((scores.get(id).copied().unwrap_or(0.0), li, ri));
            }
        }
    }
    merges.sort_by(|a, b| {
        b.0.partial_cmp(&a.0)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.1.cmp(&b.1))
            .then(a.2.cmp(&b.2))
    });
    merges
        .into_iter()
        .map(|(_, l, r)| json!([tokens[l], tokens[r]]))
        .collect()
}
