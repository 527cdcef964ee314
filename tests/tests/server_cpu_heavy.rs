//! Requests that cost the server CPU or memory before (or beside) any generation: chat
//! templates sent by the client (refused unless --trust-request-chat-template; bounded by a
//! fuel limit when trusted), prompts whose byte length already exceeds the context (refused
//! before they are tokenized), and stop strings (bounded in count and length). While such a
//! request is handled, `/health` keeps answering within a second: the work runs off the
//! HTTP threads.
mod server_common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use server_common::{smollm2_gguf, tiny_model, Server};

/// Polls /health every 50 ms on fresh connections until dropped; reports the slowest answer.
struct HealthProbe {
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<(Duration, usize)>>,
}

impl HealthProbe {
    fn start(addr: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, addr) = (stop.clone(), addr.to_string());
        let handle = thread::spawn(move || {
            let (mut worst, mut n) = (Duration::ZERO, 0);
            while !flag.load(Ordering::SeqCst) {
                let t = Instant::now();
                let r = server_common::http(
                    &addr,
                    b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                );
                assert_eq!(r.status, 200, "/health: {}", r.text());
                worst = worst.max(t.elapsed());
                n += 1;
                thread::sleep(Duration::from_millis(50));
            }
            (worst, n)
        });
        Self {
            stop,
            handle: Some(handle),
        }
    }

    /// Stop polling; assert every answer came within a second. Returns the slowest.
    fn finish(mut self) -> Duration {
        self.stop.store(true, Ordering::SeqCst);
        let (worst, n) = self.handle.take().unwrap().join().expect("health probe");
        assert!(n >= 2, "only {n} health checks ran");
        assert!(
            worst < Duration::from_secs(1),
            "/health took {worst:?} while the heavy requests ran"
        );
        worst
    }
}

/// The server's resident memory (`VmRSS`) and its peak so far (`VmHWM`), in MiB.
fn rss_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {name} in {status}"))
            / 1024.0
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Send `bodies` to `path` at once, each from its own thread; returns (response, seconds).
fn concurrently(s: &Server, path: &str, bodies: Vec<Vec<u8>>) -> Vec<(server_common::Resp, f64)> {
    let threads: Vec<_> = bodies
        .into_iter()
        .map(|b| {
            let (addr, path) = (s.addr.clone(), path.to_string());
            thread::spawn(move || {
                let t = Instant::now();
                let r = server_common::http(&addr, &server_common::post_bytes(&path, &b, None));
                (r, t.elapsed().as_secs_f64())
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

fn chat_body(template: Option<&str>, content: &str) -> Value {
    let mut b = json!({
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 2, "temperature": 0,
    });
    if let Some(t) = template {
        b["chat_template"] = json!(t);
    }
    b
}

/// 2 x 10^8 loop steps: about 14 s of CPU for an unbounded renderer.
const RUNAWAY: &str = "{% for i in range(10000) %}{% for j in range(10000) %}{% for k in range(2) %}{% endfor %}{% endfor %}{% endfor %}";

#[test]
fn request_chat_templates_need_the_trust_flag_and_stop_at_the_fuel_limit() {
    let template = "{% for m in messages %}[{{ m.content }}]{% endfor %}";
    // Untrusted (the default): refused on chat and /tokenize, naming the flag.
    let s = Server::start(&tiny_model(), &[], &[]);
    let e = s
        .post_json("/v1/chat/completions", &chat_body(Some(template), "hi"))
        .expect_error(400);
    assert_eq!(e["param"], "chat_template", "{e}");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("--trust-request-chat-template"),
        "{e}"
    );
    let e = s
        .post_json(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "hi"}],
                    "chat_template_kwargs": {"chat_template": template}}),
        )
        .expect_error(400);
    assert!(e["message"]
        .as_str()
        .unwrap()
        .contains("--trust-request-chat-template"));
    let e = s
        .post_json(
            "/tokenize",
            &json!({"messages": [{"role": "user", "content": "hi"}], "chat_template": template}),
        )
        .expect_error(400);
    assert!(e["message"]
        .as_str()
        .unwrap()
        .contains("--trust-request-chat-template"));
    // The model's own template still serves.
    let r = s.post_json("/v1/chat/completions", &chat_body(None, "hi"));
    assert_eq!(r.status, 200, "{}", r.text());
    drop(s);

    // Trusted: the request's template is the one rendered.
    let s = Server::start(&tiny_model(), &["--trust-request-chat-template"], &[]);
    let r = s.post_json("/v1/chat/completions", &chat_body(Some(template), "hi"));
    assert_eq!(r.status, 200, "{}", r.text());
    let rendered = s.post_json(
        "/tokenize",
        &json!({"messages": [{"role": "user", "content": "hi"}], "chat_template": template}),
    );
    let plain = s.post_json(
        "/tokenize",
        &json!({"prompt": "[hi]", "add_special_tokens": false}),
    );
    assert_eq!(rendered.status, 200, "{}", rendered.text());
    assert_eq!(rendered.json()["tokens"], plain.json()["tokens"]);

    // A runaway template stops at the fuel limit with a 400 naming it, two at once, while
    // /health keeps answering.
    let probe = HealthProbe::start(&s.addr);
    let body = chat_body(Some(RUNAWAY), "hi").to_string().into_bytes();
    let started = Instant::now();
    for (r, secs) in concurrently(&s, "/v1/chat/completions", vec![body.clone(), body]) {
        let e = r.expect_error(400);
        let msg = e["message"].as_str().unwrap();
        assert!(
            msg.contains("limit of 20000000 template instructions"),
            "{e}"
        );
        assert!(
            secs < 15.0,
            "a runaway template took {secs:.1} s to be stopped"
        );
    }
    let worst = probe.finish();
    eprintln!(
        "two runaway templates refused in {:.2} s; slowest /health {worst:?}",
        started.elapsed().as_secs_f64()
    );
    let r = s.post_json("/v1/chat/completions", &chat_body(None, "still serving"));
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn prompts_too_long_by_their_bytes_are_refused_without_tokenizing() {
    let s = Server::start(&smollm2_gguf(), &[], &[]);
    let max_model_len = s.get("/v1/models").json()["data"][0]["max_model_len"]
        .as_u64()
        .unwrap();
    // A real-looking prompt just under 15 MB.
    let words = "the quick brown fox jumps over the lazy dog ";
    let huge = words.repeat(15_000_000 / words.len());
    let (rss_before, _) = rss_mib(s.pid());
    let probe = HealthProbe::start(&s.addr);
    let body = json!({"prompt": huge, "max_tokens": 1})
        .to_string()
        .into_bytes();
    let started = Instant::now();
    for (r, secs) in concurrently(&s, "/v1/completions", vec![body.clone(), body]) {
        let e = r.expect_error(400);
        assert_eq!(e["code"], "context_length_exceeded", "{e}");
        assert_eq!(e["param"], "prompt", "{e}");
        let msg = e["message"].as_str().unwrap();
        assert!(msg.contains(&format!("is {max_model_len} tokens")), "{msg}");
        assert!(secs < 5.0, "a 15 MB prompt took {secs:.1} s to be refused");
    }
    let both = started.elapsed();
    // The chat route (the rendering stops at the bound), a prompt list, and /tokenize.
    let chat = json!({"messages": [{"role": "user", "content": huge}]});
    let e = s.post_json("/v1/chat/completions", &chat).expect_error(400);
    assert_eq!(e["code"], "context_length_exceeded", "{e}");
    assert_eq!(e["param"], "messages", "{e}");
    let list = json!({"prompt": ["a short one", huge], "max_tokens": 1});
    let e = s.post_json("/v1/completions", &list).expect_error(400);
    assert_eq!(e["code"], "context_length_exceeded", "{e}");
    let e = s
        .post_json("/tokenize", &json!({"prompt": huge}))
        .expect_error(400);
    assert_eq!(e["code"], "context_length_exceeded", "{e}");
    let worst = probe.finish();
    let (rss_after, peak) = rss_mib(s.pid());
    eprintln!(
        "two 15 MB prompts refused in {:.2} s; slowest /health {worst:?}; RSS {rss_before:.0} -> \
         {rss_after:.0} MiB (peak {peak:.0})",
        both.as_secs_f64()
    );
    assert!(
        peak - rss_before < 600.0,
        "refusing long prompts raised the server's peak memory by {:.0} MiB",
        peak - rss_before
    );
    // A prompt that fits still works.
    let r = s.post_json(
        "/v1/completions",
        &json!({"prompt": words, "max_tokens": 2}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn stop_strings_are_bounded_and_cheap_at_the_limits() {
    let s = Server::start(&tiny_model(), &[], &[]);
    let (rss_before, _) = rss_mib(s.pid());
    // The request: n=16 with 15,000 stop strings of 1,000 characters.
    let stops: Vec<String> = (0..15_000).map(|i| format!("{i:x>1000}")).collect();
    let t = Instant::now();
    let e = s
        .post_json(
            "/v1/completions",
            &json!({"prompt": "hi", "n": 16, "max_tokens": 16, "stop": stops}),
        )
        .expect_error(400);
    assert_eq!(e["param"], "stop", "{e}");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("limit of 64 stop strings"),
        "{e}"
    );
    let (_, peak) = rss_mib(s.pid());
    eprintln!(
        "15,000 stop strings x 1,000 chars, n=16: refused in {:.2} s; RSS {rss_before:.0} MiB, \
         peak {peak:.0}",
        t.elapsed().as_secs_f64()
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let e = s
        .post_json(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "hi"}], "stop": ["z".repeat(1025)]}),
        )
        .expect_error(400);
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("limit of 1024 characters"),
        "{e}"
    );

    // At the limits: 64 stop strings of 1,024 characters, n = 16, streamed and not.
    let stops: Vec<String> = (0..64).map(|i| format!("{i:q>1024}")).collect();
    for stream in [false, true] {
        let t = Instant::now();
        let r = s.post_json(
            "/v1/completions",
            &json!({"prompt": "hello", "n": 16, "max_tokens": 64, "temperature": 1.0,
                    "ignore_eos": true, "stop": stops, "stream": stream}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let secs = t.elapsed().as_secs_f64();
        if stream {
            let events = r.sse_events();
            assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        } else {
            let v = r.json();
            assert_eq!(v["choices"].as_array().unwrap().len(), 16);
            assert_eq!(v["usage"]["completion_tokens"], 16 * 64);
        }
        eprintln!(
            "n=16 x 64 tokens with 64 stop strings of 1024 chars (stream {stream}): {secs:.2} s"
        );
        assert!(secs < 30.0, "{secs:.1} s");
    }
    let (rss_after, peak) = rss_mib(s.pid());
    eprintln!("RSS {rss_before:.0} -> {rss_after:.0} MiB (peak {peak:.0})");
    assert!(
        peak - rss_before < 300.0,
        "stop strings raised the server's peak memory by {:.0} MiB",
        peak - rss_before
    );
}

/// The SmolLM2 tokenizer (built from GGUF metadata; its byte-level vocabulary lacks some
/// control bytes) has a byte bound, and the bound never exceeds the true token count; its
/// chat template renders a 20,000-turn conversation (far past any context) within the fuel.
#[test]
fn smollm2_bound_holds_and_its_template_renders_long_chats_within_the_fuel() {
    use rvllm::models::{load_model, LoadFormat, LoadOptions};
    use rvllm::tokenizer::ChatMessage;
    let opts = LoadOptions {
        load_format: LoadFormat::Dummy,
        progress: false,
    };
    let m = load_model(smollm2_gguf().to_str().unwrap(), &opts).unwrap();
    let tok = m.tokenizer.expect("SmolLM2 carries its tokenizer");
    let bound = tok
        .token_bound()
        .expect("a byte-level BPE has a bound")
        .clone();
    eprintln!(
        "SmolLM2: at most {} bytes per token; every byte kept: {}",
        bound.bytes_per_token(),
        bound.keeps_every_byte()
    );
    let parts = [
        "the",
        " ",
        "\n",
        "    ",
        "é",
        "日本語",
        "😀",
        "\u{4}",
        "\u{13}",
        "####",
        "1234567",
        "<|im_start|>",
        "=====",
    ];
    let mut seed = 12345u64;
    let mut next = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) as usize
    };
    for _ in 0..300 {
        let text: String = (0..next() % 300)
            .map(|_| parts[next() % parts.len()])
            .collect();
        let n = tok.encode(&text, false).unwrap().len();
        assert!(
            n >= bound.min_tokens(&text),
            "{n} tokens < bound for {text:?}"
        );
    }
    let msgs: Vec<ChatMessage> = (0..20_000)
        .map(|i| {
            let role = if i % 2 == 0 { "user" } else { "assistant" };
            ChatMessage::new(role, format!("turn {i}: a line of ordinary chat text"))
        })
        .collect();
    let t = Instant::now();
    let text = tok.apply_chat_template(&msgs, true, None).unwrap();
    eprintln!(
        "SmolLM2 template: 20,000 turns ({} bytes) in {:.2} s",
        text.len(),
        t.elapsed().as_secs_f64()
    );
    assert!(text.contains("turn 19999"));
}
