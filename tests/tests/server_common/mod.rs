//! Shared by the server tests: start the real `rvllm serve` binary on 127.0.0.1 (port 0, the
//! bound address read from its log), and a minimal HTTP/1.1 client over std's TcpStream that
//! can send anything (invalid UTF-8, oversized bodies) and hang up mid-stream.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The `rvllm` binary: $RVLLM_BIN, else target/<profile>/rvllm next to this test's exe
/// (target/<profile>/deps/<test>).
pub fn rvllm_bin() -> PathBuf {
    if let Ok(p) = std::env::var("RVLLM_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test exe lives in target/<profile>/deps");
    let bin = profile_dir.join(format!("rvllm{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "the rvllm binary is not at {}: build it first (`cargo build -p rvllm`, with the same profile as the \
         tests) or point RVLLM_BIN at it",
        bin.display()
    );
    bin
}

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

pub fn tiny_model() -> PathBuf {
    let p = fixtures().join("tiny").join("llama3");
    assert!(
        p.join("config.json").is_file(),
        "missing fixture {}",
        p.display()
    );
    p
}

#[allow(unused_imports)]
pub use rvllm_tests::smollm2_gguf;

pub struct Server {
    child: Child,
    pub addr: String,
    log: Arc<Mutex<String>>,
}

impl Server {
    /// Start `rvllm serve MODEL --host 127.0.0.1 --port 0 ARGS...` and wait until it listens.
    pub fn start(model: &Path, args: &[&str], envs: &[(&str, &str)]) -> Server {
        let mut cmd = Command::new(rvllm_bin());
        cmd.arg("serve")
            .arg(model)
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--device",
                "cpu",
                "--disable-progress",
            ])
            .args(args)
            .env_remove("RVLLM_API_KEY")
            .env_remove("VLLM_API_KEY")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawning rvllm serve");
        let stderr = child.stderr.take().expect("stderr piped");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let log_w = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.split(" on http://").nth(1) {
                    if line.contains("serving") {
                        let addr = rest.split([' ', '/']).next().unwrap_or("").to_string();
                        let _ = tx.send(addr);
                    }
                }
                log_w.lock().unwrap().push_str(&format!("{line}\n"));
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(180)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "rvllm serve did not start listening; its log:\n{}",
                    log.lock().unwrap()
                );
            }
        };
        Server { child, addr, log }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Send SIGTERM and wait (up to `timeout`) for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(ok.success(), "kill -TERM failed");
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return s;
            }
            assert!(
                start.elapsed() < timeout,
                "server did not exit within {timeout:?} of SIGTERM; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn get(&self, path: &str) -> Resp {
        self.send(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
    }

    pub fn get_auth(&self, path: &str, key: &str) -> Resp {
        self.send(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
    }

    pub fn post(&self, path: &str, body: &[u8]) -> Resp {
        self.send(&post_bytes(path, body, None))
    }

    pub fn post_auth(&self, path: &str, body: &[u8], key: &str) -> Resp {
        self.send(&post_bytes(path, body, Some(key)))
    }

    pub fn post_json(&self, path: &str, body: &serde_json::Value) -> Resp {
        self.post(path, body.to_string().as_bytes())
    }

    pub fn send(&self, raw: &[u8]) -> Resp {
        http(&self.addr, raw)
    }

    /// /metrics as text.
    /// Wait (up to 10 s) until nothing runs or waits and every KV block is free. The
    /// engine thread publishes what /metrics reads after each step, just after it hands the
    /// step's outputs over, so a response can arrive a moment before its request's end shows.
    pub fn wait_idle(&self) -> String {
        self.wait_metrics(
            Duration::from_secs(10),
            "an idle engine with every KV block free",
            idle_and_no_leak,
        )
    }

    pub fn metrics(&self) -> String {
        let r = self.get("/metrics");
        assert_eq!(r.status, 200, "/metrics: {}", r.text());
        r.text()
    }

    /// Poll /metrics until `pred` holds (or panic after `timeout`).
    pub fn wait_metrics(
        &self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let start = Instant::now();
        loop {
            let m = self.metrics();
            if pred(&m) {
                return m;
            }
            assert!(
                start.elapsed() < timeout,
                "timed out waiting for {what}; metrics:\n{m}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `rvllm bench serve` pointed at this server.
    pub fn bench_serve_command(&self) -> Command {
        let mut cmd = Command::new(rvllm_bin());
        cmd.args([
            "bench",
            "serve",
            "--base-url",
            &format!("http://{}", self.addr),
        ]);
        cmd
    }

    /// Runs `rvllm bench serve ARGS` against this server with its result saved to `result`;
    /// asserts that it succeeded (its output and the server's log in the message) and returns
    /// what it printed and the saved result.
    pub fn bench_serve(&self, args: &[&str], result: &Path) -> (String, serde_json::Value) {
        let out = self
            .bench_serve_command()
            .args(args)
            .arg("--save-result")
            .arg("--result-filename")
            .arg(result)
            .output()
            .expect("running rvllm bench serve");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "bench serve {args:?} failed:\n{stdout}\n{}\nserver log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        let saved =
            std::fs::read(result).unwrap_or_else(|e| panic!("reading {}: {e}", result.display()));
        let saved = serde_json::from_slice(&saved)
            .unwrap_or_else(|e| panic!("{} is not JSON: {e}", result.display()));
        (stdout, saved)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn post_bytes(path: &str, body: &[u8], key: Option<&str>) -> Vec<u8> {
    let auth = key
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    let mut raw = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    raw.extend_from_slice(body);
    raw
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.text()))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The `data:` payloads of an SSE body.
    pub fn sse_events(&self) -> Vec<String> {
        self.text()
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .map(str::to_string)
            .collect()
    }

    /// Assert an OpenAI-style error with this status; returns the error object.
    pub fn expect_error(&self, status: u16) -> serde_json::Value {
        assert_eq!(
            self.status,
            status,
            "expected {status}, got {}: {}",
            self.status,
            self.text()
        );
        let v = self.json();
        let e = v
            .get("error")
            .unwrap_or_else(|| panic!("no `error` object: {v}"))
            .clone();
        for k in ["message", "type", "param", "code"] {
            assert!(e.get(k).is_some(), "error body lacks `{k}`: {v}");
        }
        assert!(
            e["message"].as_str().is_some_and(|m| m.len() > 10),
            "unhelpful message: {v}"
        );
        e
    }
}

/// One request on a fresh connection (`Connection: close`), read to the end.
pub fn http(addr: &str, raw: &[u8]) -> Resp {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    // A server may answer (413) before reading a large body and close: ignore write errors.
    let _ = s.write_all(raw);
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    parse_response(&buf)
}

pub fn parse_response(buf: &[u8]) -> Resp {
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP header in {:?}", String::from_utf8_lossy(buf)));
    let head = String::from_utf8_lossy(&buf[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| {
            l.split_once(':')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        })
        .collect();
    let mut body = buf[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked {
        body = dechunk(&body);
    }
    Resp {
        status,
        headers,
        body,
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = eol + 2;
        let end = (start + size).min(b.len());
        out.extend_from_slice(&b[start..end]);
        b = &b[(end + 2).min(b.len())..];
    }
    out
}

/// The value of the first sample line starting with `series` (name plus labels, or a prefix).
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric {series} in:\n{text}"))
}

/// The KV cache is back to empty and nothing runs or waits.
pub fn idle_and_no_leak(m: &str) -> bool {
    metric(m, "rvllm:num_requests_running") == 0.0
        && metric(m, "rvllm:num_requests_waiting") == 0.0
        && metric(m, "rvllm:kv_cache_free_blocks") == metric(m, "rvllm:kv_cache_total_blocks")
}

/// A Python that can `import openai`: $RVLLM_PYTHON, else python3 from PATH. Without the
/// package the test fails saying how to get it (`cargo xtask test` provides one).
pub fn python_with_openai() -> String {
    let py = std::env::var("RVLLM_PYTHON").unwrap_or_else(|_| "python3".into());
    match Command::new(&py).args(["-c", "import openai"]).output() {
        Ok(o) if o.status.success() => py,
        Ok(o) => panic!(
            "`{py}` cannot import the openai package ({}): `pip install openai`, or set \
             RVLLM_PYTHON to a Python that has it",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => panic!(
            "cannot run `{py}` ({e}): install Python 3 with `pip install openai`, or set \
             RVLLM_PYTHON"
        ),
    }
}

/// Where the Python client tests live (tests/python).
pub fn python_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("python")
        .join(name)
}

/// Runs a unittest program of the real `openai` client against `server` (`args`: a script
/// path, or `-c` and code; `env`: what it reads, RVLLM_BASE_URL among it), and fails with its output and the server's log unless it exits 0 with
/// unittest's `OK`.
pub fn run_openai_unittest<A: AsRef<std::ffi::OsStr>>(
    server: &Server,
    args: &[A],
    env: &[(&str, String)],
) {
    let out = Command::new(python_with_openai())
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .expect("running the python client tests");
    let report = format!(
        "{}{}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        server.log()
    );
    assert!(
        out.status.success(),
        "the openai client tests failed:\n{report}"
    );
    assert!(
        report.contains("\nOK"),
        "unittest did not report OK:\n{report}"
    );
}
