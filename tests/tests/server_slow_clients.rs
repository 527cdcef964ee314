//! `rvllm serve`'s HTTP layer against clients that stall (real sockets on loopback, the real
//! binary on the tiny fixture): header, body and keep-alive timeouts, the connection cap
//! under a low open-file limit, shutdown with stalled connections, 503 for requests the grace
//! period cuts off, JSON bodies on hyper's own 400/414/431, 415 for non-JSON bodies, and the
//! KV gauges before the first request. Timeouts are set to a second or two through the flags,
//! so every wait here is bounded by a few seconds.
mod server_common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::json;
use server_common::{metric, parse_response, post_bytes, tiny_model, Server};

fn start(extra: &[&str]) -> Server {
    let mut args = vec!["--served-model-name", "tiny"];
    args.extend_from_slice(extra);
    Server::start(&tiny_model(), &args, &[])
}

fn connect(s: &Server) -> TcpStream {
    let c = TcpStream::connect(&s.addr).expect("connecting");
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    c
}

/// Read until the server closes the connection (EOF or reset); returns what came and how long
/// it took. Panics when the read timeout (20 s) passes first: the server kept it open.
fn read_until_closed(c: &mut TcpStream) -> (Vec<u8>, Duration) {
    let start = Instant::now();
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match c.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => all.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!(
                "the server kept the connection open for {:?} ({e}); got {:?}",
                start.elapsed(),
                String::from_utf8_lossy(&all)
            ),
        }
    }
    (all, start.elapsed())
}

/// One response on a kept-alive connection (Content-Length bodies only).
fn read_one_response(c: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = all.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&all[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if all.len() >= end + 4 + len {
                return all;
            }
        }
        let n = c.read(&mut buf).expect("reading a response");
        assert!(
            n > 0,
            "closed mid-response: {:?}",
            String::from_utf8_lossy(&all)
        );
        all.extend_from_slice(&buf[..n]);
    }
}

#[test]
fn stalled_headers_and_bodies_are_cut_off() {
    let s = start(&["--header-read-timeout", "1", "--request-body-timeout", "1"]);
    // Headers that stop before their blank line.
    let mut c = connect(&s);
    c.write_all(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let (_, took) = read_until_closed(&mut c);
    assert!(
        took < Duration::from_secs(5),
        "partial headers held {took:?}"
    );

    // Headers one byte every 300 ms: the timeout is for the whole head, not per byte.
    let mut c = connect(&s);
    let mut w = c.try_clone().unwrap();
    let dripper = std::thread::spawn(move || {
        let head = format!(
            "GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
            "a".repeat(200)
        );
        for b in head.bytes() {
            if w.write_all(&[b]).is_err() {
                return true; // the server closed it
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        false
    });
    let (got, took) = read_until_closed(&mut c);
    assert!(
        took < Duration::from_secs(5),
        "a one-byte-at-a-time head held the connection {took:?}"
    );
    assert!(
        !String::from_utf8_lossy(&got).contains("200 OK"),
        "the dripped request was served"
    );
    drop(c);
    assert!(
        dripper.join().unwrap(),
        "the dripping client could write its whole head"
    );

    // A body shorter than its Content-Length: 408 with a JSON error, then the connection ends.
    let mut c = connect(&s);
    c.write_all(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\": ",
    )
    .unwrap();
    let (got, took) = read_until_closed(&mut c);
    assert!(
        took < Duration::from_secs(5),
        "a stalled body held {took:?}"
    );
    let r = parse_response(&got);
    let e = r.expect_error(408);
    assert_eq!(e["code"], "request_timeout", "{e}");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("--request-body-timeout"),
        "{e}"
    );

    // The server still serves.
    assert_eq!(s.get("/health").status, 200);
}

#[test]
fn idle_keep_alive_connections_are_closed() {
    let s = start(&["--timeout-keep-alive", "1", "--header-read-timeout", "30"]);
    let mut c = connect(&s);
    c.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let r = parse_response(&read_one_response(&mut c));
    assert_eq!(r.status, 200);
    // A second request on the same connection is served: it is kept alive.
    c.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert_eq!(parse_response(&read_one_response(&mut c)).status, 200);
    let (rest, took) = read_until_closed(&mut c);
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(6),
        "an idle keep-alive connection closed after {took:?} (--timeout-keep-alive 1)"
    );
}

#[test]
fn connection_cap_keeps_health_answering_under_a_low_file_limit() {
    let s = start(&["--max-connections", "24", "--header-read-timeout", "1"]);
    // The issue's case: 64 open files. Without a cap, 80 stalled connections take every file
    // and accept fails from then on.
    let ok = std::process::Command::new("prlimit")
        .args(["--pid", &s.pid().to_string(), "--nofile=64:64"])
        .status()
        .expect("running prlimit");
    assert!(ok.success(), "prlimit failed");
    let stalled: Vec<TcpStream> = (0..80)
        .map(|_| {
            let mut c = TcpStream::connect(&s.addr).expect("connecting");
            c.write_all(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
                .unwrap();
            c
        })
        .collect();
    let start = Instant::now();
    let mut c = connect(&s);
    c.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let (got, took) = read_until_closed(&mut c);
    let r = parse_response(&got);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "/health took {took:?} behind 80 stalled connections"
    );
    assert!(
        s.log().contains("--max-connections"),
        "no log line when the cap was reached:\n{}",
        s.log()
    );
    drop(stalled);
}

#[test]
fn sigterm_does_not_wait_for_stalled_or_idle_connections() {
    let mut s = start(&[
        "--shutdown-grace-period",
        "60",
        "--header-read-timeout",
        "60",
        "--timeout-keep-alive",
        "60",
    ]);
    let mut half = connect(&s);
    half.write_all(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let mut idle = connect(&s);
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert_eq!(parse_response(&read_one_response(&mut idle)).status, 200);
    let start = Instant::now();
    let status = s.terminate(Duration::from_secs(10));
    assert!(status.success(), "exit status {status}; log:\n{}", s.log());
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "SIGTERM took {:?} with a stalled connection open (grace period 60 s)",
        start.elapsed()
    );
    let (_, _) = read_until_closed(&mut half);
    let (_, _) = read_until_closed(&mut idle);
}

#[test]
fn requests_cut_off_by_the_grace_period_get_503() {
    // One sequence at a time: the requests behind the first wait, and the grace period of 0
    // ends them all at SIGTERM.
    let mut s = start(&["--shutdown-grace-period", "0", "--max-num-seqs", "1"]);
    let body = json!({"prompt": "a", "max_tokens": 200, "ignore_eos": true, "temperature": 0});
    let clients: Vec<_> = (0..6)
        .map(|_| {
            let raw = post_bytes("/v1/completions", body.to_string().as_bytes(), None);
            let mut c = connect(&s);
            std::thread::spawn(move || {
                c.write_all(&raw).unwrap();
                let (got, _) = read_until_closed(&mut c);
                parse_response(&got)
            })
        })
        .collect();
    s.wait_metrics(
        Duration::from_secs(20),
        "requests running and waiting",
        |m| {
            metric(m, "rvllm:num_requests_running") >= 1.0
                && metric(m, "rvllm:num_requests_waiting") >= 1.0
        },
    );
    let status = s.terminate(Duration::from_secs(10));
    assert!(status.success(), "exit status {status}");
    let mut cut = 0;
    for c in clients {
        let r = c.join().unwrap();
        match r.status {
            200 => {}
            503 => {
                let e = r.expect_error(503);
                assert_eq!(e["code"], "shutting_down", "{e}");
                cut += 1;
            }
            other => panic!("a request cut off by shutdown got {other}: {}", r.text()),
        }
    }
    assert!(cut >= 1, "no request was cut off by the grace period");
}

#[test]
fn http_layer_errors_kv_gauges_content_types_and_params() {
    let s = start(&[]);
    // Before any request, the free KV blocks are all of them (0 before the fix).
    let m = s.metrics();
    let free = metric(&m, "rvllm:kv_cache_free_blocks");
    assert!(free > 0.0, "{m}");
    assert_eq!(free, metric(&m, "rvllm:kv_cache_total_blocks"), "{m}");

    // hyper's own answers to what it cannot parse, now with JSON bodies.
    let mut many = String::from("GET /health HTTP/1.1\r\nHost: x\r\n");
    for i in 0..150 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let long_uri = format!(
        "GET /v1/models?q={} HTTP/1.1\r\nHost: x\r\n\r\n",
        "a".repeat(70_000)
    );
    let cases: [(&[u8], u16, &str); 3] = [
        (many.as_bytes(), 431, "headers_too_large"),
        (long_uri.as_bytes(), 414, "uri_too_long"),
        (
            b"GET /health HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
            400,
            "invalid_http",
        ),
    ];
    for (raw, status, code) in cases {
        let r = s.send(raw);
        let e = r.expect_error(status);
        assert_eq!(e["code"], code, "{e}");
        assert_eq!(r.header("content-type"), Some("application/json"));
    }

    // A JSON route refuses other media types, naming what was sent.
    let body = json!({"prompt": "hi", "max_tokens": 2}).to_string();
    for ct in ["text/plain", "application/x-www-form-urlencoded"] {
        let raw = format!(
            "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: {ct}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let e = s.send(raw.as_bytes()).expect_error(415);
        assert!(e["message"].as_str().unwrap().contains(ct), "{e}");
        assert_eq!(e["code"], "unsupported_media_type");
    }
    // JSON with a charset, and no Content-Type at all (read as JSON, as vLLM does), pass.
    for ct in ["Content-Type: application/json; charset=utf-8\r\n", ""] {
        let raw = format!(
            "POST /v1/completions HTTP/1.1\r\nHost: x\r\n{ct}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let r = s.send(raw.as_bytes());
        assert_eq!(r.status, 200, "{ct:?}: {}", r.text());
    }

    // A missing field is named, at the root and inside a message (it was ".").
    let e = s.post("/detokenize", b"{}").expect_error(400);
    assert_eq!(e["param"], "tokens", "{e}");
    let e = s
        .post(
            "/v1/chat/completions",
            br#"{"messages": [{"content": "hi"}]}"#,
        )
        .expect_error(400);
    assert_eq!(e["param"], "messages[0].role", "{e}");
}
