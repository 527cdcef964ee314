//! `rvllm serve` on the tiny random Llama fixture (fast on a CPU): every bad input answered
//! with the right 4xx and an OpenAI-style error, 200 concurrent streams with no request lost
//! and no KV block leaked, API-key enforcement, client disconnects, `rvllm bench serve`.
mod server_common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::{json, Value};
use server_common::{idle_and_no_leak, metric, post_bytes, tiny_model, Server};

const MODEL_NAME: &str = "tiny";

fn start(extra: &[&str]) -> Server {
    let mut args = vec!["--served-model-name", MODEL_NAME];
    args.extend_from_slice(extra);
    Server::start(&tiny_model(), &args, &[])
}

fn completion(prompt: &str, max_tokens: usize) -> Value {
    json!({"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true})
}

#[test]
fn bad_inputs_get_openai_errors_and_the_server_keeps_serving() {
    let s = start(&["--max-request-body-bytes", "20000"]);
    let c = "/v1/completions";
    let chat = "/v1/chat/completions";
    // (what, route, body, status, param, words the message must hold)
    type Case<'a> = (&'a str, &'a str, Vec<u8>, u16, Value, &'a str);
    let cases: Vec<Case> = vec![
        (
            "malformed JSON",
            c,
            br#"{"prompt": "hi", "#.to_vec(),
            400,
            Value::Null,
            "not valid JSON",
        ),
        (
            "not an object",
            c,
            b"[1, 2]".to_vec(),
            400,
            Value::Null,
            "JSON object",
        ),
        ("empty body", c, b"".to_vec(), 400, Value::Null, "empty"),
        (
            "wrong type",
            c,
            br#"{"prompt": "hi", "temperature": "hot"}"#.to_vec(),
            400,
            json!("temperature"),
            "invalid type",
        ),
        (
            "wrong prompt type",
            c,
            br#"{"prompt": {"a": 1}}"#.to_vec(),
            400,
            json!("prompt"),
            "prompt",
        ),
        (
            "unknown field",
            c,
            br#"{"prompt": "hi", "temprature": 0.5}"#.to_vec(),
            400,
            json!("temprature"),
            "unknown field",
        ),
        (
            "negative max_tokens",
            c,
            br#"{"prompt": "hi", "max_tokens": -5}"#.to_vec(),
            400,
            json!("max_tokens"),
            "at least 1",
        ),
        (
            "huge max_tokens",
            c,
            br#"{"prompt": "hi", "max_tokens": 1000000000}"#.to_vec(),
            400,
            json!("max_tokens"),
            "max_tokens",
        ),
        (
            "temperature too high",
            c,
            br#"{"prompt": "hi", "temperature": 3.5}"#.to_vec(),
            400,
            json!("temperature"),
            "between 0 and 2",
        ),
        (
            "negative temperature",
            c,
            br#"{"prompt": "hi", "temperature": -1}"#.to_vec(),
            400,
            json!("temperature"),
            "between 0 and 2",
        ),
        (
            "top_p zero",
            c,
            br#"{"prompt": "hi", "top_p": 0}"#.to_vec(),
            400,
            json!("top_p"),
            "top_p",
        ),
        (
            "n zero",
            c,
            br#"{"prompt": "hi", "n": 0}"#.to_vec(),
            400,
            json!("n"),
            "`n`",
        ),
        (
            "unknown model",
            c,
            br#"{"model": "gpt-4", "prompt": "hi"}"#.to_vec(),
            404,
            json!("model"),
            "gpt-4",
        ),
        (
            "empty prompt",
            c,
            br#"{"prompt": ""}"#.to_vec(),
            400,
            json!("prompt"),
            "empty",
        ),
        (
            "token id out of vocab",
            c,
            br#"{"prompt": [1, 99999]}"#.to_vec(),
            400,
            json!("prompt"),
            "vocabulary",
        ),
        (
            "invalid UTF-8",
            c,
            b"{\"prompt\": \"\xff\xfe\xfd\"}".to_vec(),
            400,
            Value::Null,
            "UTF-8",
        ),
        (
            "oversized body",
            c,
            vec![b' '; 30000],
            413,
            Value::Null,
            "limit",
        ),
        (
            "empty messages",
            chat,
            br#"{"messages": []}"#.to_vec(),
            400,
            json!("messages"),
            "empty",
        ),
        (
            "no messages",
            chat,
            br#"{"model": "tiny"}"#.to_vec(),
            400,
            json!("messages"),
            "required",
        ),
        (
            "bad role",
            chat,
            br#"{"messages": [{"role": "wizard", "content": "x"}]}"#.to_vec(),
            400,
            json!("messages[0].role"),
            "role",
        ),
        (
            "chat unknown field",
            chat,
            br#"{"messages": [{"role": "user", "content": "x"}], "foo": 1}"#.to_vec(),
            400,
            json!("foo"),
            "unknown field",
        ),
        (
            "top_logprobs without logprobs",
            chat,
            br#"{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}"#.to_vec(),
            400,
            json!("top_logprobs"),
            "logprobs",
        ),
        (
            "stream_options without stream",
            c,
            br#"{"prompt": "hi", "stream_options": {"include_usage": true}}"#.to_vec(),
            400,
            json!("stream_options"),
            "stream",
        ),
        (
            "negative prompt_logprobs",
            c,
            br#"{"prompt": "hi", "prompt_logprobs": -3}"#.to_vec(),
            400,
            json!("prompt_logprobs"),
            "between 0 and 20",
        ),
        (
            "prompt_logprobs too large",
            chat,
            br#"{"messages": [{"role": "user", "content": "x"}], "prompt_logprobs": 21}"#.to_vec(),
            400,
            json!("prompt_logprobs"),
            "got 21",
        ),
        (
            "prompt_logprobs while streaming",
            c,
            br#"{"prompt": "hi", "prompt_logprobs": 2, "stream": true}"#.to_vec(),
            400,
            json!("prompt_logprobs"),
            "stream=True",
        ),
        (
            "detokenize bad id",
            "/detokenize",
            br#"{"tokens": [-1]}"#.to_vec(),
            400,
            json!("tokens"),
            "token id",
        ),
    ];
    for (what, route, body, status, param, words) in &cases {
        let r = s.post(route, body);
        let e = r.expect_error(*status);
        assert_eq!(&e["param"], param, "{what}: param of {e}");
        let msg = e["message"].as_str().unwrap();
        assert!(
            msg.contains(words),
            "{what}: message `{msg}` should mention `{words}`"
        );
        assert_eq!(r.header("content-type"), Some("application/json"), "{what}");
    }

    // A prompt longer than --max-model-len (the tiny model's context is 256 tokens).
    let long: Vec<u32> = (0..300).map(|i| 10 + (i % 400)).collect();
    let r = s.post_json(c, &json!({"prompt": long, "max_tokens": 4}));
    let e = r.expect_error(400);
    assert_eq!(e["param"], "prompt");
    assert_eq!(e["code"], "context_length_exceeded");
    assert!(
        e["message"].as_str().unwrap().contains("max-model-len"),
        "{e}"
    );

    // Routes and methods.
    s.get("/v1/nope").expect_error(404);
    s.get("/v1/completions").expect_error(405);

    // Still serving, and counting the errors it answered.
    let ok = s.post_json(c, &completion("hello", 4));
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(ok.json()["usage"]["completion_tokens"], 4);
    let m = s.wait_idle();
    assert!(
        metric(&m, "rvllm:http_request_errors_total") >= cases.len() as f64 + 3.0,
        "{m}"
    );
}

#[test]
fn two_hundred_concurrent_streams_complete_without_leaking_kv() {
    let s = start(&[]);
    let addr = s.addr.clone();
    let threads: Vec<_> = (0..200)
        .map(|i| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let max_tokens = 8 + i % 17;
                let body = json!({
                    "model": MODEL_NAME, "prompt": format!("request number {i}:"), "max_tokens": max_tokens,
                    "temperature": if i % 2 == 0 { 0.0 } else { 0.8 }, "seed": i, "ignore_eos": true,
                    "stream": true, "stream_options": {"include_usage": true},
                });
                let r = server_common::http(&addr, &post_bytes("/v1/completions", body.to_string().as_bytes(), None));
                (i, max_tokens, r)
            })
        })
        .collect();
    for t in threads {
        let (i, max_tokens, r) = t.join().expect("client thread");
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        assert_eq!(r.header("content-type"), Some("text/event-stream"));
        let events = r.sse_events();
        assert_eq!(
            events.last().map(String::as_str),
            Some("[DONE]"),
            "request {i} did not end with [DONE]"
        );
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        let usage = &chunks.last().unwrap()["usage"];
        assert_eq!(
            usage["completion_tokens"], max_tokens,
            "request {i}: {usage}"
        );
        let finishes: Vec<&Value> = chunks
            .iter()
            .flat_map(|c| c["choices"].as_array().unwrap())
            .map(|c| &c["finish_reason"])
            .filter(|f| !f.is_null())
            .collect();
        assert_eq!(finishes, vec![&json!("length")], "request {i}");
    }
    let m = s.wait_metrics(
        Duration::from_secs(10),
        "an idle engine with every KV block free",
        idle_and_no_leak,
    );
    assert_eq!(
        metric(
            &m,
            "rvllm:request_success_total{model_name=\"tiny\",finished_reason=\"length\"}"
        ),
        200.0
    );
    assert_eq!(metric(&m, "rvllm:time_to_first_token_seconds_count"), 200.0);
    assert_eq!(metric(&m, "rvllm:server_requests_in_flight"), 0.0);
    let generated: f64 = (0..200).map(|i| (8 + i % 17) as f64).sum();
    assert_eq!(metric(&m, "rvllm:generation_tokens_total"), generated);
    // The same series under vLLM's names, which an inference gateway reads to balance replicas.
    assert_eq!(metric(&m, "vllm:generation_tokens_total"), generated);
    let l = "model_name=\"tiny\"";
    for gauge in [
        "num_requests_running",
        "num_requests_waiting",
        "kv_cache_usage_perc",
    ] {
        assert_eq!(metric(&m, &format!("vllm:{gauge}{{{l}}}")), 0.0, "{gauge}");
    }
}

#[test]
fn api_key_is_enforced_everywhere_but_health() {
    let s = Server::start(
        &tiny_model(),
        &["--served-model-name", MODEL_NAME],
        &[("RVLLM_API_KEY", "sekret-123")],
    );
    assert_eq!(s.get("/health").status, 200, "/health needs no key");
    for path in ["/v1/models", "/metrics", "/version"] {
        let e = s.get(path).expect_error(401);
        assert_eq!(e["code"], "invalid_api_key", "{path}");
        assert_eq!(
            s.get_auth(path, "wrong").status,
            401,
            "{path} with a wrong key"
        );
        assert_eq!(
            s.get_auth(path, "sekret-123").status,
            200,
            "{path} with the key"
        );
    }
    let body = completion("hi", 2).to_string();
    s.post("/v1/completions", body.as_bytes()).expect_error(401);
    let ok = s.post_auth("/v1/completions", body.as_bytes(), "sekret-123");
    assert_eq!(ok.status, 200, "{}", ok.text());
}

#[test]
fn a_client_that_disconnects_mid_stream_frees_its_request() {
    let s = start(&["--max-num-seqs", "4"]);
    let body = json!({
        "model": MODEL_NAME, "prompt": "a long story", "max_tokens": 240, "ignore_eos": true, "stream": true,
    });
    let mut sock = TcpStream::connect(&s.addr).unwrap();
    sock.write_all(&post_bytes(
        "/v1/completions",
        body.to_string().as_bytes(),
        None,
    ))
    .unwrap();
    // Wait for the first content chunk, then hang up.
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("\"text\"") {
        let n = sock.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "stream ended before its first chunk: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    drop(sock);
    let m = s.wait_metrics(
        Duration::from_secs(20),
        "the aborted request to be freed",
        |m| idle_and_no_leak(m) && metric(m, "rvllm:server_requests_in_flight") == 0.0,
    );
    assert_eq!(
        metric(
            &m,
            "rvllm:request_success_total{model_name=\"tiny\",finished_reason=\"abort\"}"
        ),
        1.0,
        "the request must end as aborted, not run to its 240 tokens:\n{m}"
    );
    assert!(metric(&m, "rvllm:generation_tokens_total") < 240.0, "{m}");
    // And the server goes on serving.
    assert_eq!(
        s.post_json("/v1/completions", &completion("x", 3)).status,
        200
    );
}

#[test]
fn bench_serve_drives_the_server_and_saves_results() {
    let s = start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let result = dir.path().join("bench.json");
    for (endpoint, format) in [("/v1/completions", "ids"), ("/v1/chat/completions", "text")] {
        let (stdout, v) = s.bench_serve(
            &[
                "--endpoint",
                endpoint,
                "--random-input-len",
                "12",
                "--random-output-len",
                "6",
                "--num-prompts",
                "24",
                "--ignore-eos",
                "--request-rate",
                "200",
                "--max-concurrency",
                "8",
                "--seed",
                "3",
                "--random-prompt-format",
                format,
                "--random-vocab-size",
                "300",
            ],
            &result,
        );
        for line in [
            "Successful requests:",
            "Mean TTFT (ms):",
            "P99 ITL (ms):",
            "Output token throughput",
        ] {
            assert!(
                stdout.contains(line),
                "{endpoint}: the table lacks `{line}`:\n{stdout}"
            );
        }
        assert_eq!(v["completed"], 24, "{endpoint}: {v}");
        assert_eq!(v["failed"], 0);
        assert_eq!(
            v["total_output_tokens"],
            24 * 6,
            "--ignore-eos makes every request generate 6 tokens"
        );
        assert_eq!(
            v["model_id"], MODEL_NAME,
            "the model is read from /v1/models"
        );
        if format == "ids" {
            assert_eq!(
                v["total_input_tokens"],
                24 * 12,
                "token-id prompts have the exact length"
            );
        }
        assert!(v["mean_ttft_ms"].as_f64().unwrap() > 0.0);
    }
    s.wait_idle();
}

#[test]
fn bench_serve_shards_merge_into_the_whole_run() {
    // A run split in shards (`--shard I/N`, one command each) and joined by `bench
    // serve-merge` covers every prompt of the whole run once.
    let s = start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let bench = |extra: &[&str]| {
        let out = s
            .bench_serve_command()
            .args(["--random-input-len", "10", "--random-output-len", "4"])
            .args([
                "--num-prompts",
                "7",
                "--ignore-eos",
                "--max-concurrency",
                "1",
            ])
            .args([
                "--random-prompt-format",
                "ids",
                "--random-vocab-size",
                "300",
            ])
            .args(extra)
            .output()
            .expect("running rvllm bench serve");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let mut parts = Vec::new();
    for (i, want) in [(0, 3), (1, 4)] {
        let path = dir.path().join(format!("shard{i}.json"));
        let (ok, text) = bench(&[
            "--shard",
            &format!("{i}/2"),
            "--save-result",
            "--result-filename",
            path.to_str().unwrap(),
        ]);
        assert!(ok, "{text}");
        assert!(text.contains(&format!("shard {i}/2 of 7")), "{text}");
        let v: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(v["completed"], want, "shard {i} sends its part only: {v}");
        assert_eq!(v["e2els"].as_array().map(Vec::len), Some(want));
        parts.push(path);
    }
    let merged = dir.path().join("merged.json");
    let out = std::process::Command::new(server_common::rvllm_bin())
        .args(["bench", "serve-merge", "--output", merged.to_str().unwrap()])
        .args(&parts)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("Mean TPOT (ms):"), "{stdout}");
    let v: Value = serde_json::from_slice(&std::fs::read(&merged).unwrap()).unwrap();
    assert_eq!(v["completed"], 7, "{v}");
    assert_eq!(v["total_output_tokens"], 28);
    assert_eq!(v["total_input_tokens"], 70);
    // Merging a shard twice is refused, and a bad shard is refused before any request.
    let out = std::process::Command::new(server_common::rvllm_bin())
        .args(["bench", "serve-merge"])
        .args([&parts[0], &parts[0]])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("repeats shard"));
    let (ok, text) = bench(&["--shard", "2/2"]);
    assert!(!ok && text.contains("0 <= I < N"), "{text}");
    s.wait_idle();
}

#[test]
fn token_ids_are_returned_on_request_and_always_without_a_tokenizer() {
    // With a tokenizer: `return_token_ids` adds them to the choice (and to every chunk).
    let s = start(&[]);
    let body = json!({"model": MODEL_NAME, "prompt": [5, 6, 7], "max_tokens": 5, "ignore_eos": true,
                      "return_token_ids": true});
    let r = s.post_json("/v1/completions", &body).json();
    assert_eq!(
        r["choices"][0]["token_ids"].as_array().map(Vec::len),
        Some(5),
        "{r}"
    );
    let plain = s.post_json("/v1/completions", &completion("hi", 2)).json();
    assert!(
        plain["choices"][0].get("token_ids").is_none(),
        "only when asked: {plain}"
    );

    // A model folder with config.json alone: dummy weights and no tokenizer, so token ids
    // are the only output and every chunk carries them.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        tiny_model().join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let bare = Server::start(
        dir.path(),
        &["--load-format", "dummy", "--served-model-name", "bare"],
        &[],
    );
    let body = json!({"prompt": [5, 6, 7], "max_tokens": 6, "ignore_eos": true, "stream": true});
    let events = bare.post_json("/v1/completions", &body).sse_events();
    let ids: usize = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .map(|c| {
            c["choices"][0]["token_ids"]
                .as_array()
                .map(Vec::len)
                .unwrap_or(0)
        })
        .sum();
    assert_eq!(ids, 6, "{events:?}");
    let e = bare
        .post_json(
            "/v1/completions",
            &json!({"prompt": "text", "max_tokens": 2}),
        )
        .expect_error(400);
    assert!(
        e["message"].as_str().unwrap().contains("no tokenizer"),
        "{e}"
    );
}

/// prompt_logprobs over raw HTTP: the wire shape (string keys, null first), token-id
/// prompts, `n`, chat at the top level, and `stream` with 0 (accepted, nothing sent).
#[test]
fn prompt_logprobs_wire_shape() {
    let s = start(&[]);
    let prompts = [vec![5u32, 6, 7], vec![9, 10, 11, 12]];
    let body = json!({"model": MODEL_NAME, "prompt": prompts, "n": 2, "max_tokens": 2,
                      "ignore_eos": true, "prompt_logprobs": 3});
    let r = s.post_json("/v1/completions", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert!(
        v.get("prompt_logprobs").is_none(),
        "per choice, not top level: {v}"
    );
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4);
    for c in choices {
        let p = &prompts[c["index"].as_u64().unwrap() as usize / 2];
        let plp = c["prompt_logprobs"].as_array().expect("a list");
        assert_eq!(plp.len(), p.len(), "{c}");
        assert!(plp[0].is_null(), "{c}");
        for (pos, e) in plp.iter().enumerate().skip(1) {
            let e = e.as_object().expect("a map");
            let own = &e[&p[pos].to_string()];
            assert!(own["logprob"].as_f64().unwrap() <= 0.0, "{own}");
            assert!(own["rank"].as_u64().unwrap() >= 1, "{own}");
            assert!(own["decoded_token"].is_string(), "{own}");
            assert!((3..=4).contains(&e.len()), "{e:?}");
            let mut ranks: Vec<u64> = e.values().map(|x| x["rank"].as_u64().unwrap()).collect();
            ranks.sort();
            assert_eq!(&ranks[..3], &[1, 2, 3], "{e:?}");
        }
    }
    // Whole responses always carry the field, null unless asked for (as vLLM writes it).
    let plain = s.post_json("/v1/completions", &completion("hi", 1)).json();
    assert!(
        plain["choices"][0]["prompt_logprobs"].is_null()
            && plain["choices"][0]
                .as_object()
                .unwrap()
                .contains_key("prompt_logprobs"),
        "{plain}"
    );

    let body = json!({"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 2,
                      "prompt_logprobs": 0});
    let v = s.post_json("/v1/chat/completions", &body).json();
    let plp = v["prompt_logprobs"].as_array().expect("top level");
    assert_eq!(
        plp.len() as u64,
        v["usage"]["prompt_tokens"].as_u64().unwrap()
    );
    assert!(plp[0].is_null());
    assert!(
        plp[1..].iter().all(|e| e.as_object().unwrap().len() == 1),
        "{v}"
    );
    assert!(v["choices"][0].get("prompt_logprobs").is_none(), "{v}");

    // stream with 0: accepted (vLLM's rule); chunks carry no prompt_logprobs.
    let body = json!({"prompt": "hi", "max_tokens": 2, "stream": true, "prompt_logprobs": 0});
    let r = s.post_json("/v1/completions", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let events = r.sse_events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert!(!r.text().contains("prompt_logprobs"), "{}", r.text());
    s.wait_idle();
}
