//! `rvllm serve` takes the flags of `vllm serve`: every flag we claim (README.md, "`vllm
//! serve` flags") appears in `--help`; the routine ones of vLLM launch scripts start a
//! working server and do what they say (--max-logprobs, --seed,
//! --return-tokens-as-token-ids, VLLM_API_KEY); those rvllm cannot honour fail at once
//! with the reason.
mod server_common;

use std::process::Command;

use serde_json::{json, Value};
use server_common::{rvllm_bin, tiny_model, Server};

/// `vllm serve` flags that rvllm serves or accepts (keep in step with the README table).
const CLAIMED: &[&str] = &[
    // Served.
    "--host",
    "--port",
    "--api-key",
    "--served-model-name",
    "--model",
    "--chat-template",
    "--trust-request-chat-template",
    "--max-model-len",
    "--max-num-seqs",
    "--max-num-batched-tokens",
    "--block-size",
    "--gpu-memory-utilization",
    "--num-gpu-blocks-override",
    "--enforce-eager",
    "--load-format",
    "--dtype",
    "--device",
    "--seed",
    "--max-logprobs",
    "--return-tokens-as-token-ids",
    "--enable-auto-tool-choice",
    "--tool-call-parser",
    // Accepted where the value holds for rvllm.
    "--tensor-parallel-size",
    "--pipeline-parallel-size",
    "--data-parallel-size",
    "--tokenizer",
    "--tokenizer-mode",
    "--generation-config",
    "--kv-cache-dtype",
    "--chat-template-content-format",
    // Accepted without effect.
    "--trust-remote-code",
    "--no-trust-remote-code",
    "--disable-log-requests",
    "--enable-log-requests",
    "--max-log-len",
    "--disable-log-stats",
    "--uvicorn-log-level",
    "--disable-uvicorn-access-log",
    "--disable-frontend-multiprocessing",
    "--swap-space",
    "--enable-chunked-prefill",
    // Engine flags shared with generate and bench.
    "--enable-prefix-caching",
    "--no-enable-prefix-caching",
];

fn serve_help() -> String {
    let out = Command::new(rvllm_bin())
        .args(["serve", "--help"])
        .output()
        .expect("running rvllm serve --help");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).expect("utf-8 help")
}

#[test]
fn serve_help_lists_every_vllm_flag_we_claim() {
    let help = serve_help();
    // Flag names as help prints them: `--name`, `--name <VALUE>`, `--name, ...`.
    let words: std::collections::HashSet<&str> = help
        .split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']' || c == '=')
        .filter(|w| w.starts_with("--"))
        .collect();
    let missing: Vec<&&str> = CLAIMED.iter().filter(|f| !words.contains(**f)).collect();
    assert!(
        missing.is_empty(),
        "rvllm serve --help lacks {missing:?}:\n{help}"
    );
    // A flag that exists only to be refused stays out of the help.
    let hidden = "--no-enable-chunked-prefill";
    assert!(!words.contains(hidden), "{hidden} is listed:\n{help}");
    assert!(help.contains("vLLM compatibility"), "{help}");
}

/// `rvllm serve TINY FLAGS...` for flags that must be refused before anything loads.
fn refused(flags: &[&str], words: &str) {
    let start = std::time::Instant::now();
    let out = Command::new(rvllm_bin())
        .arg("serve")
        .arg(tiny_model())
        .args(["--host", "127.0.0.1", "--port", "0", "--device", "cpu"])
        .args(flags)
        .output()
        .expect("running rvllm serve");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "{flags:?} should be refused; stderr:\n{err}"
    );
    assert!(
        err.contains(words),
        "{flags:?}: the error should say `{words}`:\n{err}"
    );
    assert!(
        !err.contains("serving"),
        "{flags:?}: refused after starting:\n{err}"
    );
    assert!(
        start.elapsed() < std::time::Duration::from_secs(30),
        "{flags:?}: refused only after {:?}",
        start.elapsed()
    );
}

#[test]
fn flags_rvllm_cannot_honour_fail_at_once_with_the_reason() {
    refused(&["--tensor-parallel-size", "3"], "num_attention_heads");
    refused(&["--pipeline-parallel-size", "2"], "one GPU");
    refused(&["--data-parallel-size", "2"], "load balancer");
    refused(&["--dtype", "float16"], "computes in float32");
    refused(&["--dtype", "bfloat16"], "pass --dtype auto or float32");
    refused(&["--max-logprobs", "50"], "at most 20");
    refused(&["--generation-config", "auto"], "--generation-config vllm");
    refused(
        &["--tokenizer", "meta-llama/Llama-3.1-8B"],
        "tokenizer from the model",
    );
    refused(
        &["--kv-cache-dtype", "fp8_e5m2"],
        "rvllm's FP8 KV cache is E4M3",
    );
    refused(
        &["--enable-auto-tool-choice"],
        "requires --tool-call-parser",
    );
    refused(
        &["--tool-call-parser", "granite"],
        "hermes, llama3_json, mistral, pythonic",
    );
    refused(&["--uvicorn-log-level", "verbose"], "verbose");
}

#[test]
fn a_vllm_launch_script_s_flags_start_a_working_server() {
    let model = tiny_model();
    let model_str = model.to_str().unwrap();
    let s = Server::start(
        &model,
        &[
            "--served-model-name",
            "tiny",
            "--dtype",
            "auto",
            "--tensor-parallel-size",
            "1",
            "--trust-remote-code",
            "--disable-log-requests",
            "--disable-log-stats",
            "--uvicorn-log-level",
            "warning",
            "--generation-config",
            "vllm",
            "--tokenizer",
            model_str,
            "--tokenizer-mode",
            "auto",
            "--kv-cache-dtype",
            "auto",
            "--max-logprobs",
            "3",
            "--return-tokens-as-token-ids",
            "--swap-space",
            "4",
            "--enable-chunked-prefill",
            "--no-enable-prefix-caching",
            "--disable-frontend-multiprocessing",
        ],
        &[],
    );
    assert!(
        s.log().contains("--swap-space 4 has no effect"),
        "{}",
        s.log()
    );
    let ok = s.post_json(
        "/v1/completions",
        &json!({"model": "tiny", "prompt": "hi", "max_tokens": 3, "logprobs": 3}),
    );
    assert_eq!(ok.status, 200, "{}", ok.text());
    let v = ok.json();
    // --return-tokens-as-token-ids: logprob tokens are `token_id:N`.
    let tokens = v["choices"][0]["logprobs"]["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 3, "{v}");
    assert!(
        tokens
            .iter()
            .all(|t| t.as_str().unwrap().starts_with("token_id:")),
        "{v}"
    );
    // --max-logprobs 3 bounds every count.
    for (route, body, param) in [
        (
            "/v1/completions",
            json!({"prompt": "hi", "max_tokens": 1, "logprobs": 4}),
            "logprobs",
        ),
        (
            "/v1/completions",
            json!({"prompt": "hi", "max_tokens": 1, "prompt_logprobs": 4}),
            "prompt_logprobs",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 4}),
            "top_logprobs",
        ),
    ] {
        let e = s.post_json(route, &body).expect_error(400);
        assert_eq!(e["param"], param, "{e}");
        let msg = e["message"].as_str().unwrap();
        assert!(
            msg.contains("between 0 and 3") && msg.contains("--max-logprobs"),
            "{msg}"
        );
    }
}

/// Sample one unseeded completion (temperature 1) from a fresh server started with `args`;
/// its token ids.
fn first_unseeded_sample(args: &[&str]) -> Vec<u64> {
    let s = Server::start(&tiny_model(), args, &[]);
    let body = json!({"prompt": "hi", "max_tokens": 12, "temperature": 1.0, "ignore_eos": true,
                      "return_token_ids": true});
    let v = s.post_json("/v1/completions", &body).json();
    v["choices"][0]["token_ids"]
        .as_array()
        .unwrap_or_else(|| panic!("{v}"))
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect()
}

#[test]
fn seed_makes_unseeded_requests_reproducible_across_restarts() {
    let a = first_unseeded_sample(&["--seed", "1234"]);
    let b = first_unseeded_sample(&["--seed", "1234"]);
    assert_eq!(a.len(), 12);
    assert_eq!(a, b, "the same --seed and the same first request");
    let c = first_unseeded_sample(&["--seed", "99"]);
    assert_ne!(a, c, "another --seed samples otherwise");
}

#[test]
fn vllm_api_key_from_the_environment_is_enforced() {
    let s = Server::start(&tiny_model(), &[], &[("VLLM_API_KEY", "sekret")]);
    let e = s.get("/v1/models").expect_error(401);
    assert!(
        e["message"].as_str().unwrap().contains("VLLM_API_KEY"),
        "{e}"
    );
    let ok = s.get_auth("/v1/models", "sekret");
    assert_eq!(ok.status, 200, "{}", ok.text());
    let models: Value = ok.json();
    assert!(models["data"][0]["id"].is_string(), "{models}");
}
