//! `rvllm serve` with SmolLM2-135M-Instruct (GGUF) against the real `openai` Python client
//! (tests/python/test_openai_client.py): completions and chat, streamed and not, n=2,
//! logprobs, prompt logprobs, stop strings, echo, errors; greedy outputs and prompt
//! logprobs must equal `rvllm generate`'s.
mod server_common;

use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};
use server_common::{idle_and_no_leak, rvllm_bin, smollm2_gguf, Server};

const MAX_TOKENS: usize = 16;
const PROMPT: &str = "The capital of France is";
const CHAT_MESSAGE: &str = "Name three colors of the rainbow.";
/// Top alternatives asked for per prompt token.
const PROMPT_LOGPROBS: usize = 5;

/// `rvllm generate --output json` for one greedy prompt (with --chat: as one user
/// message), with `extra` flags; the JSON of that request.
fn generate_json(
    model: &Path,
    prompt: &str,
    chat: bool,
    max_tokens: usize,
    extra: &[&str],
) -> Value {
    let mut cmd = Command::new(rvllm_bin());
    cmd.args([
        "generate",
        "--device",
        "cpu",
        "--disable-progress",
        "--temperature",
        "0",
        "--output",
        "json",
    ])
    .arg("--model")
    .arg(model)
    .args(["--max-tokens", &max_tokens.to_string(), "--prompt", prompt])
    .args(extra);
    if chat {
        cmd.arg("--chat");
    }
    let out = cmd.output().expect("running rvllm generate");
    assert!(
        out.status.success(),
        "rvllm generate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("rvllm generate --output json");
    v["outputs"][0].clone()
}

/// Greedy text of `rvllm generate` for one prompt.
fn generate(model: &Path, prompt: &str, chat: bool) -> String {
    generate_json(model, prompt, chat, MAX_TOKENS, &[])["outputs"][0]["text"]
        .as_str()
        .expect("generated text")
        .to_string()
}

/// The engine's prompt logprobs for one prompt, through `rvllm generate`: its prompt token
/// ids and, per position, null or {token_id, logprob, rank, top: [[id, logprob], ...]}.
fn prompt_logprobs(model: &Path, prompt: &str, chat: bool) -> Value {
    let k = PROMPT_LOGPROBS.to_string();
    let v = generate_json(model, prompt, chat, 1, &["--prompt-logprobs", &k]);
    let ids = v["prompt_token_ids"].as_array().expect("prompt_token_ids");
    let entries = v["prompt_logprobs"].as_array().expect("prompt_logprobs");
    assert_eq!(ids.len(), entries.len(), "rvllm generate: {v}");
    json!({"prompt_token_ids": ids, "entries": entries})
}

#[test]
fn openai_python_client_against_smollm2() {
    let model = smollm2_gguf();
    let expect = json!({
        "max_tokens": MAX_TOKENS,
        "completion": {"prompt": PROMPT, "text": generate(&model, PROMPT, false)},
        "chat": {"message": CHAT_MESSAGE, "text": generate(&model, CHAT_MESSAGE, true)},
        "prompt_logprobs": {
            "k": PROMPT_LOGPROBS,
            "completion": prompt_logprobs(&model, PROMPT, false),
            "chat": prompt_logprobs(&model, CHAT_MESSAGE, true),
        },
    });
    let s = Server::start(
        &model,
        &[
            "--served-model-name",
            "smollm2",
            "--max-model-len",
            "2048",
            "--cpu-kv-cache-gb",
            "0.5",
        ],
        &[],
    );
    server_common::run_openai_unittest(
        &s,
        &[server_common::python_script("test_openai_client.py")],
        &[
            ("RVLLM_BASE_URL", format!("http://{}/v1", s.addr)),
            ("RVLLM_MODEL", "smollm2".into()),
            ("RVLLM_EXPECT", expect.to_string()),
        ],
    );
    // Everything the client did is finished and freed.
    s.wait_metrics(
        std::time::Duration::from_secs(10),
        "an idle engine",
        idle_and_no_leak,
    );
}

/// SIGTERM while streams run (SmolLM2 is slow enough on a CPU that they surely do): every
/// stream still ends complete, after the signal, and the server exits 0.
#[test]
fn sigterm_lets_in_flight_streams_finish_then_exits_zero() {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};
    const TOKENS: usize = 48;
    let mut s = Server::start(
        &smollm2_gguf(),
        &[
            "--max-model-len",
            "512",
            "--cpu-kv-cache-gb",
            "0.25",
            "--shutdown-grace-period",
            "120",
        ],
        &[],
    );
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let clients: Vec<_> = (0..2)
        .map(|i| {
            let addr = s.addr.clone();
            let started = started_tx.clone();
            std::thread::spawn(move || {
                let body = json!({
                    "prompt": format!("Story number {i}:"), "max_tokens": TOKENS, "ignore_eos": true,
                    "temperature": 0, "stream": true, "stream_options": {"include_usage": true},
                });
                let mut sock = std::net::TcpStream::connect(&addr).unwrap();
                sock.write_all(&server_common::post_bytes("/v1/completions", body.to_string().as_bytes(), None))
                    .unwrap();
                let mut all = Vec::new();
                let mut buf = [0u8; 4096];
                let mut told = false;
                loop {
                    let n = sock.read(&mut buf).unwrap();
                    if n == 0 {
                        break;
                    }
                    all.extend_from_slice(&buf[..n]);
                    if !told && String::from_utf8_lossy(&all).contains("\"text\"") {
                        started.send(()).unwrap();
                        told = true;
                    }
                }
                (Instant::now(), server_common::parse_response(&all))
            })
        })
        .collect();
    for _ in 0..2 {
        started_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("a stream never started");
    }
    let signalled = Instant::now();
    let status = s.terminate(Duration::from_secs(120));
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        s.log()
    );
    for c in clients {
        let (done, r) = c.join().unwrap();
        assert!(
            done > signalled,
            "the stream ended before SIGTERM, so this tested nothing"
        );
        let events = r.sse_events();
        assert_eq!(
            events.last().map(String::as_str),
            Some("[DONE]"),
            "a stream was cut: {}",
            r.text()
        );
        let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
        assert_eq!(
            usage["usage"]["completion_tokens"], TOKENS,
            "every in-flight request finishes"
        );
    }
    assert!(s.log().contains("SIGTERM"), "{}", s.log());
}

/// A non-streaming client that hangs up mid-generation aborts its request too.
#[test]
fn a_non_streaming_client_that_disconnects_frees_its_request() {
    use std::io::Write;
    use std::time::Duration;
    let s = Server::start(
        &smollm2_gguf(),
        &["--max-model-len", "512", "--cpu-kv-cache-gb", "0.25"],
        &[],
    );
    let body = json!({"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": true});
    let mut sock = std::net::TcpStream::connect(&s.addr).unwrap();
    sock.write_all(&server_common::post_bytes(
        "/v1/completions",
        body.to_string().as_bytes(),
        None,
    ))
    .unwrap();
    s.wait_metrics(Duration::from_secs(60), "generation to start", |m| {
        server_common::metric(m, "rvllm:generation_tokens_total") > 0.0
    });
    drop(sock);
    let m = s.wait_metrics(
        Duration::from_secs(30),
        "the request to be aborted and freed",
        |m| {
            idle_and_no_leak(m)
                && server_common::metric(m, "rvllm:server_requests_in_flight") == 0.0
        },
    );
    let aborted = m
        .lines()
        .find(|l| {
            l.starts_with("rvllm:request_success_total") && l.contains("finished_reason=\"abort\"")
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok());
    assert_eq!(aborted, Some(1.0), "{m}");
    assert!(
        server_common::metric(&m, "rvllm:generation_tokens_total") < 400.0,
        "{m}"
    );
}
