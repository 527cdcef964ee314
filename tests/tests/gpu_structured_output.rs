//! Constrained sampling (structured output) through the GPU runner, on the tiny llama3
//! fixture (512 tokens, its own tokenizer): JSON-schema, choice and regex requests batched
//! beside a seeded unconstrained one. Each constrained output must parse and validate (and
//! end by the grammar, not by length), the seeded neighbour's tokens must be those it gets
//! alone, and the same batch must give the same tokens with lookahead scheduling and step
//! by step (a mask waits for its request's previous token), with CUDA graphs and eager.
//!
//! The same checks run on the CPU runner, which proves the test anywhere. Without a usable
//! CUDA device every GPU test prints a `SKIPPED` line and returns; built without the `cuda`
//! feature, one test says so.
use rvllm::engine::{EngineArgs, FinishReason, Llm, RequestOutput};
use rvllm::sampling::{SamplingParams, StructuredOutput};
use rvllm_tests::{read_json, tiny_model};
use serde_json::{json, Value};

const FIXTURE: &str = "llama3_hd64";
/// The fixture's end-of-sequence id.
const EOS: u32 = 2;

/// Bounded in every part, so that any output of it fits `max_tokens` (at most six escaped
/// characters of name, three digits of id).
fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 0, "maximum": 999},
            "ok": {"type": "boolean"},
            "tag": {"enum": ["red", "green", "blue"]},
            "name": {"type": "string", "maxLength": 6}
        },
        "required": ["id", "ok", "tag", "name"],
        "additionalProperties": false
    })
}

const CHOICES: [&str; 3] = ["alpha", "beta", "gamma delta"];
const REGEX: &str = "[0-9]{3}-[a-z]{2}";

fn engine(device: &str, eager: bool, lookahead: bool) -> Llm {
    let dir = tiny_model(FIXTURE);
    let args = EngineArgs {
        model: dir.to_str().expect("fixture paths are UTF-8").to_string(),
        device: device.into(),
        max_model_len: Some(512),
        max_num_batched_tokens: Some(64),
        gpu_memory_utilization: 0.3,
        cpu_kv_cache_gb: 0.25,
        enforce_eager: eager,
        no_async_scheduling: !lookahead,
        disable_progress: true,
        ..EngineArgs::default()
    };
    Llm::new(&args).unwrap_or_else(|e| panic!("starting the engine ({device}): {e:#}"))
}

fn prompts() -> Vec<Vec<u32>> {
    let r = read_json(&tiny_model(FIXTURE).join("reference.json"));
    r["prompts"]
        .as_array()
        .expect("reference.json has prompts")
        .iter()
        .map(|p| {
            p["prompt_ids"]
                .as_array()
                .expect("prompt_ids")
                .iter()
                .map(|t| t.as_u64().expect("a token id") as u32)
                .collect()
        })
        .collect()
}

/// The unconstrained seeded request whose tokens must not depend on its neighbours.
fn seeded() -> SamplingParams {
    SamplingParams {
        temperature: 1.0,
        top_p: 0.9,
        seed: Some(1234),
        max_tokens: Some(24),
        ..SamplingParams::default()
    }
}

fn constrained(spec: StructuredOutput, sampled: Option<u64>) -> SamplingParams {
    SamplingParams {
        structured_output: Some(spec),
        temperature: if sampled.is_some() { 1.0 } else { 0.0 },
        seed: sampled,
        max_tokens: Some(160),
        ..SamplingParams::default()
    }
}

/// The batch: the seeded request first, then constrained ones (greedy and sampled JSON,
/// a choice under a `min_tokens` longer than any choice, after which the finished grammar
/// allows only EOS, a regex asking for logprobs), and the seeded request again.
fn batch() -> Vec<SamplingParams> {
    let choice = StructuredOutput::Choice(CHOICES.map(String::from).to_vec());
    vec![
        seeded(),
        constrained(StructuredOutput::JsonSchema(schema()), None),
        constrained(StructuredOutput::JsonSchema(schema()), Some(7)),
        SamplingParams {
            min_tokens: 100,
            ..constrained(choice, Some(11))
        },
        SamplingParams {
            logprobs: Some(3),
            ..constrained(StructuredOutput::Regex(REGEX.into()), Some(13))
        },
        seeded(),
    ]
}

fn tokens(outs: &[RequestOutput]) -> Vec<Vec<u32>> {
    outs.iter()
        .map(|o| o.outputs[0].token_ids.clone())
        .collect()
}

/// Runs the batch on `device` and checks every output; returns the batch's tokens.
fn constrained_batch(device: &str, eager: bool, lookahead: bool) -> Vec<Vec<u32>> {
    let what = format!("{device} eager={eager} lookahead={lookahead}");
    let mut llm = engine(device, eager, lookahead);
    let p = prompts();
    let alone = llm
        .generate(std::slice::from_ref(&p[0]), &[seeded()], |_| {})
        .unwrap_or_else(|e| panic!("{what}: generate: {e:#}"));
    let params = batch();
    let batch_prompts: Vec<Vec<u32>> = (0..params.len())
        .map(|i| {
            p[if i == params.len() - 1 {
                0
            } else {
                i % p.len()
            }]
            .clone()
        })
        .collect();
    let outs = llm
        .generate(&batch_prompts, &params, |_| {})
        .unwrap_or_else(|e| panic!("{what}: generate: {e:#}"));
    for i in [0, params.len() - 1] {
        assert_eq!(
            outs[i].outputs[0].token_ids, alone[0].outputs[0].token_ids,
            "{what}: the seeded request (row {i}) changed beside constrained neighbours"
        );
    }
    let validator = jsonschema::validator_for(&schema()).expect("the schema compiles");
    for (i, out) in outs.iter().enumerate().skip(1).take(params.len() - 2) {
        let o = &out.outputs[0];
        eprintln!("{what}: request {i}: {:?}", o.text);
        assert_eq!(
            o.finish_reason,
            Some(FinishReason::Stop),
            "{what}: request {i} did not end by its grammar: {:?} ({} tokens)",
            o.text,
            o.token_ids.len()
        );
        match &params[i].structured_output {
            Some(StructuredOutput::JsonSchema(_)) => {
                let doc: Value = serde_json::from_str(&o.text).unwrap_or_else(|e| {
                    panic!("{what}: request {i}: not JSON ({e}): {:?}", o.text)
                });
                let first_error = validator.iter_errors(&doc).next().map(|e| e.to_string());
                if let Some(e) = first_error {
                    panic!("{what}: request {i}: {doc} is invalid: {e}");
                }
            }
            Some(StructuredOutput::Choice(_)) => {
                assert!(
                    CHOICES.contains(&o.text.as_str()),
                    "{what}: request {i}: {:?} is not a choice",
                    o.text
                );
                // Once the grammar is finished only EOS is allowed, min_tokens or not (the
                // scheduler does not stop on it before min_tokens, as vLLM).
                let first_eos = o.token_ids.iter().position(|&t| t == EOS);
                let tail = &o.token_ids[first_eos.unwrap_or(o.token_ids.len())..];
                assert!(
                    first_eos.is_some() && tail.iter().all(|&t| t == EOS),
                    "{what}: request {i}: tokens after the grammar ended: {:?}",
                    o.token_ids
                );
            }
            Some(StructuredOutput::Regex(_)) => {
                let re = regex::Regex::new(&format!("^(?:{REGEX})$")).unwrap();
                assert!(
                    re.is_match(&o.text),
                    "{what}: request {i}: {:?} does not match",
                    o.text
                );
                assert_eq!(o.logprobs.len(), o.token_ids.len(), "{what}: logprobs");
            }
            other => panic!("unexpected spec {other:?}"),
        }
    }
    tokens(&outs)
}

#[test]
fn constrained_neighbours_on_the_cpu() {
    let stepwise = constrained_batch("cpu", true, false);
    assert_eq!(constrained_batch("cpu", true, true), stepwise);
}

#[cfg(not(feature = "cuda"))]
#[test]
fn gpu_structured_output_tests_need_the_cuda_feature() {
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "\n*** SKIPPED: built without the cuda feature: the GPU constrained-sampling tests did \
         not run. Build them with `cargo test -p rvllm-tests --features cuda --test gpu_structured_output`. ***"
    );
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::*;

    /// Whether a CUDA device is usable; otherwise a loud SKIPPED line.
    fn gpu(test: &str) -> bool {
        use std::io::Write;
        let why = match rvllm::engine::resolve_device("auto") {
            Ok(rvllm::engine::Device::Cuda) => match rvllm::backend::cuda::device_count() {
                Ok(n) if n > 0 => return true,
                Ok(_) => "the driver reports no CUDA device".to_string(),
                Err(e) => format!("{e:#}"),
            },
            Ok(_) => "no CUDA driver library or no CUDA device here".to_string(),
            Err(e) => format!("{e:#}"),
        };
        let _ = writeln!(
            std::io::stderr(),
            "\n*** SKIPPED: {test}: no usable CUDA device ({why}) ***"
        );
        false
    }

    /// One test, so that only one engine holds the GPU at a time.
    #[test]
    fn constrained_neighbours_on_the_gpu() {
        if !gpu("constrained_neighbours_on_the_gpu") {
            return;
        }
        let stepwise = constrained_batch("cuda", false, false);
        let lookahead = constrained_batch("cuda", false, true);
        assert_eq!(
            lookahead, stepwise,
            "lookahead scheduling changed constrained tokens (graphs)"
        );
        let eager = constrained_batch("cuda", true, true);
        assert_eq!(eager, stepwise, "eager steps differ from graph replays");
    }
}
