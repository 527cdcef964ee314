//! `cargo xtask soak`: `rvllm serve` on the CPU with SmolLM2 and a small KV cache, driven by
//! many concurrent clients for a long time: completions and chats, streamed and not, clients
//! that hang up mid-stream or cancel, and hostile requests mixed in (malformed JSON, bad and
//! huge fields, lying Content-Length, byte-a-second headers, bytes that are not HTTP).
//!
//! It fails (exit 1) when any request is lost, hung, answered 5xx or cut short by the
//! server; when the engine does not drain back to 0 running, 0 waiting and 0 % KV usage;
//! when the server's RSS grows by more than --max-rss-growth-pct between the end of the
//! warm-up and the end; or when the server dies or logs a panic.

mod client;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use client::{Action, Expect, Outcome, Plan, Rng};

use crate::build::{self, TargetDevice};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Concurrent clients.
    #[arg(long, default_value_t = 1000)]
    pub clients: usize,
    /// How long the clients keep sending, e.g. 30m, 90s, 2h.
    #[arg(long, default_value = "30m", value_parser = parse_duration)]
    pub duration: Duration,
    /// The part of the run that RSS may still grow in (default: a fifth of --duration, at
    /// most 5 minutes).
    #[arg(long, value_parser = parse_duration)]
    pub warmup: Option<Duration>,
    /// Largest RSS growth allowed from the end of the warm-up to the end, in percent.
    #[arg(long, default_value_t = 10.0)]
    pub max_rss_growth_pct: f64,
    /// A request with no complete answer after this long counts as hung. Queueing alone
    /// takes about clients / throughput (~2.5 requests/s for SmolLM2 on 2 busy cores: 6-7
    /// minutes at 1,000 clients), so the default leaves room for that.
    #[arg(long, default_value = "20m", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// KV-cache blocks of 16 tokens (small, so that requests queue and get preempted).
    #[arg(long, default_value_t = 512)]
    pub kv_blocks: usize,
    /// Percent of requests that are hostile.
    #[arg(long, default_value_t = 15)]
    pub hostile_pct: u64,
    /// Seed of the clients' random choices.
    #[arg(long, default_value_t = 24)]
    pub seed: u64,
    /// The model (default: SmolLM2-135M-Instruct GGUF, as `cargo xtask demo --offline`).
    #[arg(long)]
    pub model: Option<String>,
    /// A prebuilt rvllm binary instead of building the cpu one.
    #[arg(long)]
    pub binary: Option<PathBuf>,
    /// More `rvllm serve` arguments (repeat the flag for each).
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    pub server_args: Vec<String>,
    /// Also write the summary as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.trim().split_at(
        s.trim()
            .find(|c: char| c.is_ascii_alphabetic())
            .unwrap_or(s.trim().len()),
    );
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (e.g. 90s, 30m, 2h)"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        other => return Err(format!("unknown unit `{other}` in `{s}` (use s, m or h)")),
    };
    if !(secs.is_finite() && secs > 0.0) {
        return Err(format!("`{s}` must be a positive duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// The server under test: its address, pid and the tail of its log.
struct Server {
    child: Child,
    addr: String,
    log: Arc<Mutex<Vec<String>>>,
    panics: Arc<AtomicU64>,
}

impl Server {
    fn start(bin: &PathBuf, model: &str, args: &Args) -> Result<Server> {
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .arg(model)
            .args(["--host", "127.0.0.1", "--port", "0", "--device", "cpu"])
            .args(["--disable-progress", "--max-model-len", "2048"])
            .args(["--num-gpu-blocks-override", &args.kv_blocks.to_string()])
            .args(&args.server_args)
            .env_remove("RVLLM_API_KEY")
            .env_remove("VLLM_API_KEY")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        eprintln!("$ {cmd:?}");
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stderr = child.stderr.take().context("no stderr pipe")?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let panics = Arc::new(AtomicU64::new(0));
        let (tx, rx) = mpsc::channel();
        let (log_w, panics_w) = (log.clone(), panics.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("serving") {
                    if let Some(rest) = line.split(" on http://").nth(1) {
                        let _ = tx.send(rest.split([' ', '/']).next().unwrap_or("").to_string());
                    }
                }
                if line.contains("panicked") {
                    panics_w.fetch_add(1, Ordering::Relaxed);
                }
                let mut l = log_w.lock().unwrap();
                if l.len() >= 400 {
                    l.remove(0);
                }
                l.push(line);
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(300)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "rvllm serve did not start listening; its log:\n{}",
                    log.lock().unwrap().join("\n")
                );
            }
        };
        Ok(Server {
            child,
            addr,
            log,
            panics,
        })
    }

    fn rss_kib(&self) -> Option<u64> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn log_tail(&self, n: usize) -> String {
        let l = self.log.lock().unwrap();
        l[l.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The engine gauges of /metrics.
#[derive(Clone, Copy, Debug, Default)]
struct Gauges {
    running: f64,
    waiting: f64,
    kv_usage: f64,
}

fn gauges(addr: &str) -> Result<Gauges, String> {
    let (status, body) = client::get(addr, "/metrics", Duration::from_secs(30))?;
    if status != 200 {
        return Err(format!("/metrics answered {status}"));
    }
    let value = |name: &str| -> Result<f64, String> {
        body.lines()
            .find(|l| l.starts_with(&format!("rvllm:{name}{{")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("/metrics has no rvllm:{name}"))
    };
    Ok(Gauges {
        running: value("num_requests_running")?,
        waiting: value("num_requests_waiting")?,
        kv_usage: value("kv_cache_usage_perc")?,
    })
}

const WORDS: &[&str] = &[
    "the", "river", "quiet", "engine", "of", "stars", "bright", "a", "garden", "under", "morning",
    "light", "and", "old", "stone", "bridge", "winter", "sky", "paper", "lantern", "why", "does",
    "how", "many", "ships", "tell", "me", "about", "history", "tea",
];

fn words(rng: &mut Rng, n: u64) -> String {
    (0..n)
        .map(|_| *rng.pick(WORDS))
        .collect::<Vec<_>>()
        .join(" ")
}

fn json_plan(
    scenario: &'static str,
    path: &str,
    body: serde_json::Value,
    expect: Expect,
    action: Action,
) -> Plan {
    Plan {
        scenario,
        request: client::request(
            "POST",
            path,
            "application/json",
            body.to_string().as_bytes(),
        ),
        expect,
        action,
    }
}

/// A normal request: completion or chat, streamed or not, sometimes hung up on.
fn normal(rng: &mut Rng) -> Plan {
    let chat = rng.chance(50);
    let stream = rng.chance(50);
    let max_tokens = rng.range(1, 48);
    let mut body = if chat {
        let mut messages = Vec::new();
        if rng.chance(30) {
            messages.push(serde_json::json!({"role": "system", "content": "Answer briefly."}));
        }
        for i in 0..rng.range(1, 3) {
            let role = if i % 2 == 0 { "user" } else { "assistant" };
            let n = rng.range(3, 60);
            messages.push(serde_json::json!({"role": role, "content": words(rng, n)}));
        }
        if messages.last().unwrap()["role"] == "assistant" {
            messages.push(serde_json::json!({"role": "user", "content": "and then?"}));
        }
        serde_json::json!({"messages": messages, "max_tokens": max_tokens})
    } else {
        let n = rng.range(1, 200);
        serde_json::json!({"prompt": words(rng, n), "max_tokens": max_tokens})
    };
    let b = body.as_object_mut().unwrap();
    b.insert("stream".into(), stream.into());
    if rng.chance(50) {
        b.insert("temperature".into(), 0.8.into());
        b.insert("seed".into(), rng.range(0, 1000).into());
    } else {
        b.insert("temperature".into(), 0.0.into());
    }
    if rng.chance(15) {
        b.insert("n".into(), 2.into());
    }
    if rng.chance(15) {
        b.insert("stop".into(), serde_json::json!([".", " and"]));
    }
    if rng.chance(10) {
        b.insert("logprobs".into(), if chat { true.into() } else { 2.into() });
    }
    if stream && rng.chance(30) {
        b.insert(
            "stream_options".into(),
            serde_json::json!({"include_usage": true}),
        );
    }
    let path = if chat {
        "/v1/chat/completions"
    } else {
        "/v1/completions"
    };
    let (scenario, action) = match (chat, stream) {
        (_, true) if rng.chance(25) => (
            "stream, hung up mid-stream",
            Action::CutAfterEvents(rng.range(1, 8) as usize),
        ),
        (_, false) if rng.chance(10) => (
            "cancelled (hung up before the answer)",
            Action::CutAfter(Duration::from_millis(rng.range(50, 5000))),
        ),
        (true, true) => ("chat, streamed", Action::Whole),
        (true, false) => ("chat", Action::Whole),
        (false, true) => ("completion, streamed", Action::Whole),
        (false, false) => ("completion", Action::Whole),
    };
    json_plan(scenario, path, body, Expect::Success { stream }, action)
}

/// A hostile request, and what the server may do with it.
fn hostile(rng: &mut Rng) -> Plan {
    let refuse = Expect::Refused { ok_too: false };
    let either = Expect::Refused { ok_too: true };
    let raw = |scenario, request: Vec<u8>, expect, action| Plan {
        scenario,
        request,
        expect,
        action,
    };
    let cmpl = "/v1/completions";
    match rng.range(0, 13) {
        0 => raw(
            "hostile: malformed JSON",
            client::request(
                "POST",
                cmpl,
                "application/json",
                b"{\"prompt\": \"hi\", \"max_tokens\": ",
            ),
            refuse,
            Action::Whole,
        ),
        1 => {
            let bad = *rng.pick(&[
                r#"{"prompt": "hi", "temperature": -1}"#,
                r#"{"prompt": "hi", "top_p": 2}"#,
                r#"{"prompt": "hi", "n": 0}"#,
                r#"{"prompt": "hi", "max_tokens": -5}"#,
                r#"{"prompt": "hi", "logprobs": 1000}"#,
                r#"{"prompt": [4294967296]}"#,
                r#"{"prompt": ""}"#,
                r#"{"messages": []}"#,
                r#"{"prompt": 5}"#,
                r#"{"prompt": "hi", "no_such_field": 1}"#,
            ]);
            let path = if bad.contains("messages") {
                "/v1/chat/completions"
            } else {
                cmpl
            };
            raw(
                "hostile: invalid field",
                client::request("POST", path, "application/json", bad.as_bytes()),
                refuse,
                Action::Whole,
            )
        }
        2 => json_plan(
            "hostile: max_tokens past the context",
            cmpl,
            serde_json::json!({"prompt": "hi", "max_tokens": 1_000_000_000u64}),
            refuse,
            Action::Whole,
        ),
        3 => {
            let n = rng.range(3000, 6000);
            json_plan(
                "hostile: prompt past the context",
                cmpl,
                serde_json::json!({"prompt": words(rng, n), "max_tokens": 4}),
                refuse,
                Action::Whole,
            )
        }
        4 => {
            // Claims a body far over --max-request-body-bytes; sends only its start.
            let start = [b"{\"prompt\": \"".as_slice(), &[b'a'; 4096]].concat();
            raw(
                "hostile: huge Content-Length",
                client::request_claiming("POST", cmpl, "application/json", &start, 1_000_000_000),
                refuse,
                Action::ShortBody {
                    eof: true,
                    idle: Duration::ZERO,
                },
            )
        }
        5 => {
            let n = rng.range(0, 400) as usize;
            let garbage: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            raw(
                "hostile: not HTTP",
                garbage,
                refuse,
                Action::ShortBody {
                    eof: true,
                    idle: Duration::ZERO,
                },
            )
        }
        6 => raw(
            "hostile: headers a byte at a time",
            client::request("GET", "/v1/models", "application/json", b""),
            refuse,
            Action::Slow {
                gap: Duration::from_millis(rng.range(500, 3000)),
                total: Duration::from_secs(rng.range(5, 40)),
            },
        ),
        7 => {
            let body = br#"{"prompt": "hello", "max_tokens": 4}"#;
            let eof = rng.chance(50);
            raw(
                if eof {
                    "hostile: short body, then EOF"
                } else {
                    "hostile: short body, then silence"
                },
                client::request_claiming("POST", cmpl, "application/json", body, body.len() + 100),
                refuse,
                Action::ShortBody {
                    eof,
                    idle: Duration::from_secs(rng.range(1, 20)),
                },
            )
        }
        8 => raw(
            "hostile: text/plain body",
            client::request(
                "POST",
                cmpl,
                "text/plain",
                br#"{"prompt": "hello", "max_tokens": 4}"#,
            ),
            either,
            Action::Whole,
        ),
        9 => {
            let stops: Vec<String> = (0..rng.range(500, 3000))
                .map(|i| format!("{i:0>200}"))
                .collect();
            json_plan(
                "hostile: thousands of long stop strings",
                cmpl,
                serde_json::json!({"prompt": "count", "max_tokens": 8, "stop": stops}),
                either,
                Action::Whole,
            )
        }
        10 => json_plan(
            "hostile: request-supplied chat template",
            "/v1/chat/completions",
            serde_json::json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                "chat_template": "{% for i in range(1000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}x"}),
            either,
            Action::Whole,
        ),
        11 => raw(
            "hostile: invalid UTF-8",
            client::request(
                "POST",
                cmpl,
                "application/json",
                b"{\"prompt\": \"\xff\xfe\"}",
            ),
            refuse,
            Action::Whole,
        ),
        _ => raw(
            "hostile: unknown route",
            client::request("DELETE", "/v1/nothing", "application/json", b"{}"),
            refuse,
            Action::Whole,
        ),
    }
}

#[derive(Default)]
struct Tally {
    /// (scenario, outcome label) -> count
    outcomes: BTreeMap<(String, String), u64>,
    /// Latencies of complete answers to good requests, by scenario.
    latency: BTreeMap<String, Vec<f64>>,
    /// A few examples of each failure kind.
    examples: BTreeMap<String, Vec<String>>,
    failures: u64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub fn run(args: Args) -> Result<()> {
    if !cfg!(target_os = "linux") {
        bail!("the soak test reads the server's RSS from /proc: it runs on Linux");
    }
    raise_fd_limit(args.clients as u64 * 2 + 256);
    let bin = match &args.binary {
        Some(b) => b.clone(),
        None => {
            let b = build::Args {
                target_device: Some(TargetDevice::Cpu),
                release: true,
                ..Default::default()
            };
            build::build_engine(&b)?.1
        }
    };
    let model = match &args.model {
        Some(m) => m.clone(),
        None => crate::demo::smollm2_gguf()?.display().to_string(),
    };
    let mut server = Server::start(&bin, &model, &args)?;
    let addr = server.addr.clone();
    let warmup = args
        .warmup
        .unwrap_or_else(|| (args.duration / 5).min(Duration::from_secs(300)));
    eprintln!(
        "soak: {} clients for {:?} against http://{addr} (warm-up {:?}, {} KV blocks, {} % hostile)",
        args.clients, args.duration, warmup, args.kv_blocks, args.hostile_pct
    );

    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let started = Arc::new(AtomicU64::new(0));
    let finished = Arc::new(AtomicU64::new(0));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let mut workers = Vec::new();
    for c in 0..args.clients {
        let (stop, started, finished, tally, addr) = (
            stop.clone(),
            started.clone(),
            finished.clone(),
            tally.clone(),
            addr.clone(),
        );
        let (seed, hostile_pct, timeout) = (
            args.seed ^ ((c as u64) << 20),
            args.hostile_pct,
            args.request_timeout,
        );
        let w = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || {
                let mut rng = Rng::new(seed);
                // Spread the first requests over a few seconds.
                std::thread::sleep(Duration::from_millis(rng.range(0, 3000)));
                while !stop.load(Ordering::Relaxed) {
                    let plan = if rng.chance(hostile_pct) {
                        hostile(&mut rng)
                    } else {
                        normal(&mut rng)
                    };
                    started.fetch_add(1, Ordering::Relaxed);
                    let t = Instant::now();
                    let outcome = client::run(&addr, &plan, timeout);
                    let secs = t.elapsed().as_secs_f64();
                    let mut tl = tally.lock().unwrap();
                    *tl.outcomes
                        .entry((plan.scenario.to_string(), outcome.label()))
                        .or_default() += 1;
                    if outcome == Outcome::Ok {
                        tl.latency
                            .entry(plan.scenario.to_string())
                            .or_default()
                            .push(secs);
                    }
                    if outcome.is_failure() {
                        tl.failures += 1;
                        let ex = tl.examples.entry(outcome.label()).or_default();
                        if ex.len() < 5 {
                            ex.push(format!("{} after {secs:.1} s: {outcome:?}", plan.scenario));
                        }
                    }
                    drop(tl);
                    finished.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(rng.range(0, 200)));
                }
            })
            .context("starting a client thread")?;
        workers.push(w);
    }

    // /health once a second: it must keep answering quickly while the load runs.
    let health = {
        let (stop, addr) = (stop.clone(), addr.clone());
        std::thread::spawn(move || {
            let (mut lat, mut bad) = (Vec::new(), Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                match client::get(&addr, "/health", Duration::from_secs(10)) {
                    Ok((200, _)) => lat.push(t.elapsed().as_secs_f64()),
                    other => bad.push(format!(
                        "{:.0} s: {other:?}",
                        t.duration_since(t0).as_secs_f64()
                    )),
                }
                std::thread::sleep(Duration::from_secs(1));
            }
            (lat, bad)
        })
    };

    let mut rss: Vec<(f64, u64)> = Vec::new();
    let mut peak = Gauges::default();
    let mut metric_errors = Vec::new();
    let mut last_print = Instant::now();
    while t0.elapsed() < args.duration {
        std::thread::sleep(Duration::from_secs(5).min(args.duration.saturating_sub(t0.elapsed())));
        if !server.alive() {
            stop.store(true, Ordering::Relaxed);
            bail!(
                "the server died during the soak; its log:\n{}",
                server.log_tail(60)
            );
        }
        if let Some(kib) = server.rss_kib() {
            rss.push((t0.elapsed().as_secs_f64(), kib));
        }
        match gauges(&addr) {
            Ok(g) => {
                peak.running = peak.running.max(g.running);
                peak.waiting = peak.waiting.max(g.waiting);
                peak.kv_usage = peak.kv_usage.max(g.kv_usage);
                if last_print.elapsed() >= Duration::from_secs(30) {
                    last_print = Instant::now();
                    eprintln!(
                        "soak: {:>5.0} s  requests {} done / {} started  running {} waiting {} KV {:.0} %  RSS {} MiB  failures {}",
                        t0.elapsed().as_secs_f64(),
                        finished.load(Ordering::Relaxed),
                        started.load(Ordering::Relaxed),
                        g.running,
                        g.waiting,
                        g.kv_usage * 100.0,
                        rss.last().map_or(0, |r| r.1 / 1024),
                        tally.lock().unwrap().failures
                    );
                }
            }
            Err(e) => metric_errors.push(e),
        }
    }
    eprintln!("soak: time is up; waiting for the clients' last requests");
    stop.store(true, Ordering::Relaxed);
    let mut dead_clients = 0;
    for w in workers {
        if w.join().is_err() {
            dead_clients += 1;
        }
    }
    let (health_lat, health_bad) = health.join().unwrap_or_default();
    let load_secs = t0.elapsed().as_secs_f64();

    // Drained: nothing running or waiting, no KV block in use.
    let drain_start = Instant::now();
    let drained = loop {
        let g = gauges(&addr);
        if let Ok(g) = &g {
            if g.running == 0.0 && g.waiting == 0.0 && g.kv_usage == 0.0 {
                break Ok(*g);
            }
        }
        if drain_start.elapsed() > Duration::from_secs(60) {
            break Err(g);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let drain_secs = drain_start.elapsed().as_secs_f64();
    // Let freed memory settle before the last RSS sample.
    std::thread::sleep(Duration::from_secs(2));
    if let Some(kib) = server.rss_kib() {
        rss.push((t0.elapsed().as_secs_f64(), kib));
    }
    let alive = server.alive();

    // ---- summary
    let tl = tally.lock().unwrap();
    let (n_started, n_finished) = (
        started.load(Ordering::Relaxed),
        finished.load(Ordering::Relaxed),
    );
    let lost = n_started - n_finished;
    println!(
        "\n== soak summary: {} clients, {load_secs:.0} s of load, {n_finished} requests ({:.1}/s)",
        args.clients,
        n_finished as f64 / load_secs
    );
    println!("\n{:<44} {:<22} {:>8}", "scenario", "outcome", "count");
    for ((scenario, label), n) in &tl.outcomes {
        println!("{scenario:<44} {label:<22} {n:>8}");
    }
    let mut by_outcome: BTreeMap<&str, u64> = BTreeMap::new();
    for ((_, label), n) in &tl.outcomes {
        *by_outcome.entry(label).or_default() += n;
    }
    println!(
        "\nby outcome: {}",
        by_outcome
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "\nlatency of complete answers (s): {:<30} {:>7} {:>7} {:>7} {:>7} {:>7}",
        "", "n", "p50", "p90", "p99", "max"
    );
    let mut lat_json = serde_json::Map::new();
    for (scenario, v) in &tl.latency {
        let mut v = v.clone();
        v.sort_by(f64::total_cmp);
        let (p50, p90, p99, max) = (
            percentile(&v, 0.5),
            percentile(&v, 0.9),
            percentile(&v, 0.99),
            v[v.len() - 1],
        );
        println!(
            "  {scenario:<60} {:>7} {p50:>7.2} {p90:>7.2} {p99:>7.2} {max:>7.2}",
            v.len()
        );
        lat_json.insert(
            scenario.clone(),
            serde_json::json!({"n": v.len(), "p50": p50, "p90": p90, "p99": p99, "max": max}),
        );
    }
    let mut hl = health_lat.clone();
    hl.sort_by(f64::total_cmp);
    println!(
        "\n/health: {} answers, p50 {:.3} s, p99 {:.3} s, max {:.3} s; {} failed",
        hl.len(),
        percentile(&hl, 0.5),
        percentile(&hl, 0.99),
        hl.last().copied().unwrap_or(f64::NAN),
        health_bad.len()
    );
    println!(
        "peak gauges: running {} waiting {} KV {:.0} %",
        peak.running,
        peak.waiting,
        peak.kv_usage * 100.0
    );
    match &drained {
        Ok(_) => println!("drained in {drain_secs:.1} s: running 0, waiting 0, KV 0 %"),
        Err(g) => println!("NOT drained after {drain_secs:.0} s: {g:?}"),
    }
    let after_warmup = rss
        .iter()
        .find(|(t, _)| *t >= warmup.as_secs_f64())
        .copied();
    let end = rss.last().copied();
    println!("\nRSS samples (s, MiB):");
    let step = (rss.len() / 20).max(1);
    let shown: Vec<String> = rss
        .iter()
        .enumerate()
        .filter(|(i, _)| i % step == 0 || *i == rss.len() - 1)
        .map(|(_, (t, k))| format!("{t:.0}:{}", k / 1024))
        .collect();
    println!("  {}", shown.join("  "));
    let growth = match (after_warmup, end) {
        (Some((_, a)), Some((_, b))) => Some((b as f64 - a as f64) / a as f64 * 100.0),
        _ => None,
    };
    if let (Some((ta, a)), Some((tb, b)), Some(g)) = (after_warmup, end, growth) {
        println!(
            "  first after warm-up {} MiB at {ta:.0} s, end {} MiB at {tb:.0} s: {g:+.1} %",
            a / 1024,
            b / 1024
        );
    }

    let mut problems = Vec::new();
    if lost > 0 || dead_clients > 0 {
        problems.push(format!(
            "{lost} requests lost ({dead_clients} client threads died)"
        ));
    }
    if tl.failures > 0 {
        problems.push(format!("{} requests failed", tl.failures));
    }
    if drained.is_err() {
        problems.push("the engine did not drain to 0 running, 0 waiting, 0 % KV".into());
    }
    match growth {
        Some(g) if g > args.max_rss_growth_pct => problems.push(format!(
            "RSS grew {g:.1} % after the warm-up (limit {} %)",
            args.max_rss_growth_pct
        )),
        None => problems.push("no RSS sample after the warm-up (run longer than --warmup)".into()),
        _ => {}
    }
    if !health_bad.is_empty() {
        problems.push(format!(
            "/health failed {} times: {:?}",
            health_bad.len(),
            &health_bad[..health_bad.len().min(5)]
        ));
    }
    if !metric_errors.is_empty() {
        problems.push(format!(
            "/metrics failed {} times: {:?}",
            metric_errors.len(),
            &metric_errors[..metric_errors.len().min(5)]
        ));
    }
    if !alive {
        problems.push("the server exited".into());
    }
    let panics = server.panics.load(Ordering::Relaxed);
    if panics > 0 {
        problems.push(format!("the server logged {panics} panics"));
    }
    for (label, ex) in &tl.examples {
        println!("\nexamples of {label}:");
        for e in ex {
            println!("  {e}");
        }
    }
    if let Some(path) = &args.json {
        let j = serde_json::json!({
            "clients": args.clients, "load_seconds": load_secs, "requests": n_finished,
            "lost": lost, "failures": tl.failures,
            "by_outcome": by_outcome, "latency": lat_json,
            "health": {"answers": hl.len(), "p99": percentile(&hl, 0.99), "failed": health_bad.len()},
            "peak": {"running": peak.running, "waiting": peak.waiting, "kv_usage": peak.kv_usage},
            "drained": drained.is_ok(), "rss_kib": rss, "rss_growth_pct": growth,
            "problems": problems,
        });
        std::fs::write(path, serde_json::to_string_pretty(&j)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if !problems.is_empty() {
        println!("\nserver log (last 30 lines):\n{}", server.log_tail(30));
        bail!("soak failed: {}", problems.join("; "));
    }
    println!(
        "\nsoak passed: 0 lost, 0 failed, drained, RSS within {} %",
        args.max_rss_growth_pct
    );
    Ok(())
}

/// 1,000 clients and the server's sockets need more than the usual 1,024 descriptors; the
/// server inherits the raised limit.
fn raise_fd_limit(want: u64) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < want {
            r.rlim_cur = want.min(r.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
    if r.rlim_cur < want {
        eprintln!(
            "soak: warning: only {} file descriptors allowed (want {want}); raise `ulimit -n`",
            r.rlim_cur
        );
    }
}
