//! Model loading end to end: the real SmolLM2 GGUF (config, dequantized weights against
//! transformers, tokenizer against reference ids, chat template), the tiny HF fixture folders,
//! and corrupt files, each of which must give an error naming the file (and tensor).
use std::path::{Path, PathBuf};

use rvllm::models::config::{Architecture, RopeScaling};
use rvllm::models::weights::{DType, HostTensor};
use rvllm::models::{load_model, LoadFormat, LoadOptions, LoadedModel};
use rvllm::tokenizer::ChatMessage;
use rvllm_tests::smollm2_gguf;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn opts(load_format: LoadFormat) -> LoadOptions {
    LoadOptions {
        load_format,
        progress: false,
    }
}

fn load(spec: &Path, f: LoadFormat) -> anyhow::Result<LoadedModel> {
    load_model(spec.to_str().unwrap(), &opts(f))
}

fn err_of(spec: &Path, f: LoadFormat) -> String {
    match load(spec, f) {
        Ok(_) => panic!("loading {} should fail", spec.display()),
        Err(e) => format!("{e:#}"),
    }
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn smollm2_gguf_config_weights_and_unpermuted_qk() {
    let gguf = smollm2_gguf();
    let m = load(&gguf, LoadFormat::Auto).unwrap();
    let c = &m.config;
    assert_eq!(c.architecture, Architecture::Llama);
    assert_eq!(c.num_hidden_layers, 30);
    assert_eq!(c.hidden_size, 576);
    assert_eq!(c.intermediate_size, 1536);
    assert_eq!(c.num_attention_heads, 9);
    assert_eq!(c.num_key_value_heads, 3);
    assert_eq!(c.head_dim, 64);
    assert_eq!(c.vocab_size, 49152);
    assert_eq!(c.rms_norm_eps, 1e-5);
    assert_eq!(c.rope_theta, 100000.0);
    assert_eq!(c.rope_scaling, None);
    assert_eq!(c.max_position_embeddings, 8192);
    assert!(c.tie_word_embeddings && !c.attention_bias);
    assert_eq!(c.eos_token_ids, vec![2]);
    assert_eq!(c.bos_token_id, Some(1));

    let w = m.weights.as_ref().unwrap();
    assert!(
        !w.contains("lm_head.weight"),
        "tied: the embedding serves as lm_head"
    );
    // 1 + 30 * 9 + 1 tensors.
    assert_eq!(w.tensors.len(), 272);
    assert_eq!(
        w.tensors["model.embed_tokens.weight"].shape,
        vec![49152, 576]
    );
    assert_eq!(
        w.tensors["model.layers.0.mlp.down_proj.weight"].shape,
        vec![576, 1536]
    );

    // Against transformers' own GGUF loading (dequantize + un-permute), dumped by
    // fixtures/smollm2/make_gguf_weight_reference.py.
    let reference = json(&fixtures().join("smollm2/gguf_weight_reference.json"));
    let cols = reference["cols"].as_u64().unwrap() as usize;
    let mut checked = 0;
    for (name, entry) in reference["tensors"].as_object().unwrap() {
        let t: &HostTensor = &w.tensors[name];
        let shape: Vec<usize> = entry["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(t.shape, shape, "{name}");
        let data = t.to_f32();
        let row_len: usize = t.shape[1..].iter().product::<usize>().max(1);
        let mut compare = |offset: usize, want: &Value, what: String| {
            for (j, v) in want.as_array().unwrap().iter().enumerate().take(cols) {
                let want = v.as_f64().unwrap() as f32;
                let got = data[offset + j];
                assert!(
                    (got - want).abs() <= 1e-6 * want.abs().max(1.0),
                    "{what}[{j}]: got {got}, transformers has {want}"
                );
                checked += 1;
            }
        };
        if let Some(rows) = entry.get("rows") {
            for (r, vals) in rows.as_object().unwrap() {
                let r: usize = r.parse().unwrap();
                compare(r * row_len, vals, format!("{name} row {r}"));
            }
        } else {
            compare(0, &entry["values"], name.clone());
        }
    }
    assert!(checked >= 250, "compared only {checked} values");
}

#[test]
fn smollm2_gguf_dummy_reads_config_and_tokenizer_only() {
    let m = load(&smollm2_gguf(), LoadFormat::Dummy).unwrap();
    assert!(m.weights.is_none());
    assert_eq!(m.config.num_hidden_layers, 30);
    assert!(m.tokenizer.is_some());
}

#[test]
fn smollm2_tokenizer_matches_reference_ids() {
    let m = load(&smollm2_gguf(), LoadFormat::Dummy).unwrap();
    let tok = m.tokenizer.unwrap();
    assert_eq!(tok.token_to_id("<|endoftext|>"), Some(0));
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
    assert_eq!(tok.eos_token_id(), Some(2));
    assert_eq!(tok.vocab_size(), 49152);

    let cases = json(&fixtures().join("smollm2/tokenizer_cases.json"));
    let cases = cases["cases"].as_array().unwrap();
    assert!(cases.len() >= 30);
    let mut failures = Vec::new();
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        // No BOS is added for SmolLM2, so both settings give the same ids.
        for add_special in [false, true] {
            let got = tok.encode(text, add_special).unwrap();
            if got != want {
                failures.push(format!(
                    "{text:?} (add_special {add_special}): got {got:?}, want {want:?}"
                ));
            }
        }
        assert_eq!(
            tok.decode(&want, false).unwrap(),
            text,
            "decode of {text:?}"
        );
    }
    assert!(
        failures.is_empty(),
        "tokenizer mismatches:\n{}",
        failures.join("\n")
    );
}

#[test]
fn smollm2_chat_template_matches_reference_prompts() {
    let m = load(&smollm2_gguf(), LoadFormat::Dummy).unwrap();
    let tok = m.tokenizer.unwrap();
    let one = tok
        .apply_chat_template(&[ChatMessage::new("user", "Hi!")], true, None)
        .unwrap();
    assert_eq!(
        one,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    );
    let reference = json(&fixtures().join("smollm2/reference.json"));
    let mut chats = 0;
    for p in reference["prompts"].as_array().unwrap() {
        let want_ids: Vec<u32> = p["prompt_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let text = if p["chat"].as_bool() == Some(true) {
            chats += 1;
            let msgs: Vec<ChatMessage> = serde_json::from_value(p["messages"].clone()).unwrap();
            let text = tok.apply_chat_template(&msgs, true, None).unwrap();
            assert_eq!(text, p["prompt"].as_str().unwrap(), "{}", p["name"]);
            text
        } else {
            p["prompt"].as_str().unwrap().to_string()
        };
        assert_eq!(tok.encode(&text, false).unwrap(), want_ids, "{}", p["name"]);
    }
    assert!(chats >= 1);
}

fn tiny(name: &str) -> PathBuf {
    fixtures().join("tiny").join(name)
}

#[test]
fn tiny_fixture_folders_load_with_their_config_and_dtype() {
    let cases = [
        ("llama3", Architecture::Llama, DType::F32, false, false),
        ("llama_tied", Architecture::Llama, DType::BF16, true, false),
        ("qwen2", Architecture::Qwen2, DType::F16, false, true),
        ("mistral", Architecture::Mistral, DType::F32, false, false),
        (
            "mistral_sharded",
            Architecture::Mistral,
            DType::F32,
            false,
            false,
        ),
    ];
    for (name, arch, dtype, tied, bias) in cases {
        let m = load(&tiny(name), LoadFormat::Auto).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let c = &m.config;
        let want_cfg = json(&tiny(name).join("config.json"));
        assert_eq!(c.architecture, arch, "{name}");
        assert_eq!(c.tie_word_embeddings, tied, "{name}");
        assert_eq!(c.attention_bias, bias, "{name}");
        assert_eq!(
            c.hidden_size,
            want_cfg["hidden_size"].as_u64().unwrap() as usize
        );
        assert_eq!(
            c.num_hidden_layers,
            want_cfg["num_hidden_layers"].as_u64().unwrap() as usize
        );
        assert_eq!(
            (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
            (4, 2, 16)
        );
        assert_eq!(c.vocab_size, 512);
        assert_eq!(c.eos_token_ids, vec![2], "{name}");
        let w = m.weights.as_ref().unwrap();
        for t in w.tensors.values() {
            assert_eq!(t.dtype(), dtype, "{name}: weights keep their on-disk dtype");
        }
        assert_eq!(w.contains("lm_head.weight"), !tied, "{name}");
        assert_eq!(
            w.contains("model.layers.0.self_attn.q_proj.bias"),
            bias,
            "{name}"
        );
        let tok = m.tokenizer.as_ref().unwrap();
        assert_eq!(tok.eos_token_id(), Some(2), "{name}");
        assert!(tok.chat_template().is_some(), "{name}");
    }
    let llama3 = load(&tiny("llama3"), LoadFormat::Dummy).unwrap().config;
    assert_eq!(llama3.rope_theta, 500000.0);
    assert_eq!(
        llama3.rope_scaling,
        Some(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64
        })
    );
    assert_eq!(
        load(&tiny("qwen2"), LoadFormat::Dummy)
            .unwrap()
            .config
            .rope_theta,
        1e6
    );

    // The sharded copy holds exactly the same weights.
    let a = load(&tiny("mistral"), LoadFormat::Auto)
        .unwrap()
        .weights
        .unwrap();
    let b = load(&tiny("mistral_sharded"), LoadFormat::Auto)
        .unwrap()
        .weights
        .unwrap();
    assert_eq!(a.tensors.len(), b.tensors.len());
    for (k, t) in &a.tensors {
        assert_eq!(t.to_f32(), b.tensors[k].to_f32(), "{k}");
    }
}

#[test]
fn dummy_format_reads_config_only() {
    // A config.json path: config, and the tokenizer beside it, no weights.
    let m = load(&tiny("llama3").join("config.json"), LoadFormat::Dummy).unwrap();
    assert!(m.weights.is_none() && m.tokenizer.is_some());
    assert_eq!(m.config.intermediate_size, 160);
    // A folder with config.json alone.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        tiny("qwen2").join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let m = load(dir.path(), LoadFormat::Dummy).unwrap();
    assert!(m.weights.is_none() && m.tokenizer.is_none());
    // The same folder without --load-format dummy: a clear error.
    let e = err_of(dir.path(), LoadFormat::Auto);
    assert!(
        e.contains("model.safetensors") && e.contains("dummy"),
        "{e}"
    );
}

/// A copy of a fixture folder to break.
fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(tiny(name)).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
    }
    dir
}

/// Rewrite the JSON header of a safetensors file (keeping its data bytes).
fn edit_header(path: &Path, edit: impl FnOnce(&mut Value)) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    let mut h = serde_json::to_vec(&header).unwrap();
    let pad = (8 - h.len() % 8) % 8;
    h.extend(std::iter::repeat_n(b' ', pad));
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(path, out).unwrap();
}

#[test]
fn truncated_safetensors_names_file_and_tensor() {
    let dir = copy_fixture("llama_tied");
    let st = dir.path().join("model.safetensors");
    let len = std::fs::metadata(&st).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&st).unwrap();
    f.set_len(len - 1000).unwrap();
    let e = err_of(dir.path(), LoadFormat::Auto);
    assert!(
        e.contains("model.safetensors") && e.contains("truncated"),
        "{e}"
    );
    assert!(e.contains("tensor `"), "{e}");
}

#[test]
fn header_pointing_out_of_bounds_names_the_tensor() {
    let dir = copy_fixture("llama_tied");
    let st = dir.path().join("model.safetensors");
    edit_header(&st, |h| {
        h["model.norm.weight"]["data_offsets"][1] = Value::from(10_000_000u64);
    });
    let e = err_of(dir.path(), LoadFormat::Auto);
    assert!(
        e.contains("model.safetensors") && e.contains("model.norm.weight"),
        "{e}"
    );
}

#[test]
fn shape_disagreeing_with_config_names_file_tensor_and_shapes() {
    let dir = copy_fixture("llama3");
    let cfg_path = dir.path().join("config.json");
    let mut cfg = json(&cfg_path);
    cfg["intermediate_size"] = Value::from(128);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let e = err_of(dir.path(), LoadFormat::Auto);
    assert!(e.contains("model.safetensors"), "{e}");
    assert!(
        e.contains("mlp.") && e.contains("implies [64, 128]") && e.contains("[64, 160]"),
        "{e}"
    );
}

#[test]
fn unsupported_and_unknown_dtypes_name_file_and_tensor() {
    let dir = copy_fixture("llama_tied");
    let st = dir.path().join("model.safetensors");
    // I16 is a valid safetensors dtype of the same width, but not a float type we read.
    edit_header(&st, |h| {
        h["model.norm.weight"]["dtype"] = Value::from("I16")
    });
    let e = err_of(dir.path(), LoadFormat::Auto);
    assert!(
        e.contains("model.safetensors") && e.contains("model.norm.weight") && e.contains("I16"),
        "{e}"
    );
    // A dtype no safetensors reader knows.
    edit_header(&st, |h| h["model.norm.weight"]["dtype"] = Value::from("Q4"));
    let e = err_of(dir.path(), LoadFormat::Auto);
    assert!(
        e.contains("model.safetensors") && e.contains("model.norm.weight") && e.contains("Q4"),
        "{e}"
    );
}

#[test]
fn missing_files_are_named() {
    let dir = copy_fixture("mistral_sharded");
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    let e = err_of(dir.path(), LoadFormat::Auto);
    assert!(
        e.contains("model-00002-of-00002.safetensors") && e.contains("missing"),
        "{e}"
    );

    let e = err_of(Path::new("/nonexistent/model/dir"), LoadFormat::Auto);
    assert!(
        e.contains("/nonexistent/model/dir") && e.contains("not found"),
        "{e}"
    );

    // A tensor the model needs that no file holds.
    let dir = copy_fixture("llama3");
    edit_header(&dir.path().join("model.safetensors"), |h| {
        let v = h
            .as_object_mut()
            .unwrap()
            .remove("model.norm.weight")
            .unwrap();
        h["model.norm.renamed"] = v;
    });
    let e = err_of(dir.path(), LoadFormat::Auto);
    assert!(
        e.contains("model.norm.weight") && e.contains("missing"),
        "{e}"
    );
}

#[test]
fn unsupported_architecture_is_named() {
    let dir = copy_fixture("llama3");
    let cfg_path = dir.path().join("config.json");
    let mut cfg = json(&cfg_path);
    cfg["architectures"] = serde_json::json!(["GemmaForCausalLM"]);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let e = err_of(dir.path(), LoadFormat::Dummy);
    assert!(
        e.contains("GemmaForCausalLM") && e.contains("Qwen2ForCausalLM"),
        "{e}"
    );
    assert!(e.contains("config.json"), "{e}");
}

#[test]
fn bad_gguf_magic_and_truncated_gguf_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.gguf");
    std::fs::write(&bad, b"NOPE\x03\x00\x00\x00 and some more bytes").unwrap();
    let e = err_of(&bad, LoadFormat::Auto);
    assert!(e.contains("bad.gguf") && e.contains("magic"), "{e}");

    let src = std::fs::read(smollm2_gguf()).unwrap();
    let trunc = dir.path().join("trunc.gguf");
    // Cut inside the metadata (the token list), then inside the tensor data.
    std::fs::write(&trunc, &src[..200_000]).unwrap();
    let e = err_of(&trunc, LoadFormat::Auto);
    assert!(e.contains("trunc.gguf") && e.contains("truncated"), "{e}");
    std::fs::write(&trunc, &src[..src.len() / 2]).unwrap();
    let e = err_of(&trunc, LoadFormat::Auto);
    assert!(
        e.contains("trunc.gguf") && e.contains("tensor `blk."),
        "{e}"
    );
}

#[test]
fn hub_id_from_an_offline_cache() {
    let home = tempfile::tempdir().unwrap();
    let repo = home.path().join("hub/models--tiny-org--tiny-llama");
    let snap = repo.join("snapshots/0123abcd");
    std::fs::create_dir_all(&snap).unwrap();
    for entry in std::fs::read_dir(tiny("llama_tied")).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, snap.join(p.file_name().unwrap())).unwrap();
    }
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    // Only this test resolves hub ids, so setting the process environment is safe here.
    std::env::set_var("HF_HOME", home.path());
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let m = load_model("tiny-org/tiny-llama", &opts(LoadFormat::Auto)).unwrap();
    assert!(m.config.tie_word_embeddings);
    assert!(m.source.contains("0123abcd"));
    let e = format!(
        "{:#}",
        load_model("tiny-org/not-cached", &opts(LoadFormat::Auto)).unwrap_err()
    );
    assert!(
        e.contains("HF_HUB_OFFLINE") && e.contains("tiny-org/not-cached"),
        "{e}"
    );
}

/// Compare every tensor of two loads of the same weights.
fn assert_same_weights(a: &LoadedModel, b: &LoadedModel, f16_names: &[&str]) {
    let (wa, wb) = (a.weights.as_ref().unwrap(), b.weights.as_ref().unwrap());
    let mut names: Vec<&String> = wa.tensors.keys().collect();
    names.sort();
    let nb: Vec<&String> = {
        let mut v: Vec<&String> = wb.tensors.keys().collect();
        v.sort();
        v
    };
    assert_eq!(names, nb);
    for name in names {
        let (ta, tb) = (&wa.tensors[name], &wb.tensors[name]);
        assert_eq!(ta.shape, tb.shape, "{name}");
        let lossy = f16_names.iter().any(|p| name.contains(p));
        for (i, (x, y)) in ta.to_f32().iter().zip(tb.to_f32()).enumerate() {
            let tol = if lossy { 1e-3 * x.abs().max(1e-2) } else { 0.0 };
            assert!((x - y).abs() <= tol, "{name}[{i}]: {x} vs {y}");
        }
    }
}

#[test]
fn tiny_llama_gguf_unpermutes_to_the_safetensors_weights_and_reads_its_spm_tokenizer() {
    let gguf = fixtures().join("gguf/tiny_llama_spm.gguf");
    let g = load(&gguf, LoadFormat::Auto).unwrap();
    let hf = load(&tiny("llama_tied"), LoadFormat::Auto).unwrap();
    let (cg, ch) = (&g.config, &hf.config);
    assert_eq!(cg.architecture, Architecture::Llama);
    assert_eq!(
        (cg.hidden_size, cg.intermediate_size, cg.num_hidden_layers),
        (ch.hidden_size, ch.intermediate_size, ch.num_hidden_layers)
    );
    assert_eq!(
        (
            cg.num_attention_heads,
            cg.num_key_value_heads,
            cg.head_dim,
            cg.vocab_size
        ),
        (
            ch.num_attention_heads,
            ch.num_key_value_heads,
            ch.head_dim,
            ch.vocab_size
        )
    );
    assert_eq!(
        (cg.rms_norm_eps, cg.rope_theta),
        (ch.rms_norm_eps, ch.rope_theta)
    );
    assert!(cg.tie_word_embeddings);
    let up = &g.weights.as_ref().unwrap().tensors["model.layers.0.mlp.up_proj.weight"];
    assert_eq!(up.dtype(), DType::F16);
    assert_same_weights(&g, &hf, &["mlp.up_proj"]);

    let tok = g.tokenizer.as_ref().unwrap();
    assert_eq!(tok.eos_token_id(), Some(2));
    let cases = json(&fixtures().join("gguf/tiny_llama_spm_cases.json"));
    for case in cases["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tok.encode(text, true).unwrap(), want, "{text:?}");
        assert_eq!(
            tok.encode(text, false).unwrap(),
            want[1..],
            "{text:?} without BOS"
        );
        assert_eq!(tok.decode(&want, true).unwrap(), text, "decode {text:?}");
    }
    // A leading space still gets the dummy prefix, as sentencepiece and llama.cpp do:
    // "  the" is "▁▁▁the" = ▁ ▁ ▁the.
    let sp = tok.token_to_id("\u{2581}").unwrap();
    let the = tok.token_to_id("\u{2581}the").unwrap();
    assert_eq!(tok.encode("  the", false).unwrap(), vec![sp, sp, the]);
    assert_eq!(tok.decode(&[1, sp, sp, the], true).unwrap(), "  the");
    let chat = tok
        .apply_chat_template(&[ChatMessage::new("user", "hi")], false, None)
        .unwrap();
    assert_eq!(chat, "[user] hi\n");
}

#[test]
fn tiny_qwen2_gguf_keeps_biases_and_is_not_unpermuted() {
    let g = load(&fixtures().join("gguf/tiny_qwen2.gguf"), LoadFormat::Auto).unwrap();
    let hf = load(&tiny("qwen2"), LoadFormat::Auto).unwrap();
    assert_eq!(g.config.architecture, Architecture::Qwen2);
    assert!(g.config.attention_bias && !g.config.tie_word_embeddings);
    assert_eq!(g.config.rope_theta, 1e6);
    assert!(g.tokenizer.is_none());
    assert_same_weights(&g, &hf, &[]);
}

/// Corrupt header bytes and truncations: every load returns (an error naming the file, or a
/// model), none panics or runs away with memory.
fn fuzz_file(src: &Path, name: &str, header_len: usize, folder_files: &[&str]) {
    let original = std::fs::read(src).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for f in folder_files {
        std::fs::copy(src.parent().unwrap().join(f), dir.path().join(f)).unwrap();
    }
    let target = dir.path().join(name);
    let spec = if folder_files.is_empty() {
        target.clone()
    } else {
        dir.path().to_path_buf()
    };
    let mut failures = Vec::new();
    let mut errors = 0;
    let mut mutations: Vec<(usize, Option<u8>)> = Vec::new();
    for pos in (0..header_len.min(original.len())).step_by(5) {
        mutations.push((pos, Some(original[pos] ^ 0xFF)));
        mutations.push((pos, Some(original[pos].wrapping_add(1))));
    }
    for cut in (0..original.len()).step_by(original.len() / 97 + 1) {
        mutations.push((cut, None));
    }
    for (pos, byte) in mutations {
        let mut bytes = original.clone();
        match byte {
            Some(b) => bytes[pos] = b,
            None => bytes.truncate(pos),
        }
        std::fs::write(&target, &bytes).unwrap();
        let spec = spec.clone();
        let r = std::panic::catch_unwind(move || load(&spec, LoadFormat::Auto));
        match r {
            Err(_) => failures.push(format!("panic at byte {pos} ({byte:?})")),
            Ok(Err(e)) => {
                errors += 1;
                let msg = format!("{e:#}");
                if !msg.contains(name) {
                    failures.push(format!(
                        "byte {pos} ({byte:?}): error without the file name: {msg}"
                    ));
                }
            }
            Ok(Ok(_)) => {}
        }
    }
    assert!(errors > 50, "only {errors} corruptions were noticed");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn corrupt_gguf_bytes_never_panic() {
    let src = fixtures().join("gguf/tiny_qwen2.gguf");
    fuzz_file(&src, "tiny_qwen2.gguf", 4096, &[]);
}

#[test]
fn corrupt_safetensors_bytes_never_panic() {
    let src = tiny("llama_tied").join("model.safetensors");
    let bytes = std::fs::read(&src).unwrap();
    let header = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    fuzz_file(&src, "model.safetensors", header, &["config.json"]);
}
