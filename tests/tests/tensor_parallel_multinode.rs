//! Tensor parallelism over several nodes (issue 22), proven with real processes on loopback:
//! deploy/lws.yaml is checked against the LeaderWorkerSet and Pod structure, and its leader
//! and worker command lines (the LWS variables set to loopback values, the model to a tiny
//! fixture, the ports to free ones, `--device cpu` added) start two `rvllm` processes, node 0
//! serving HTTP and node 1 headless, each holding one of the two ranks. Their greedy tokens
//! over 32 steps are those of one rank in one process; a killed worker fails the leader's
//! requests with an error naming it (no hang); a mismatched worker is refused by name.
mod server_common;

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use rvllm::engine::Llm;
use rvllm::sampling::SamplingParams;
use rvllm_tests::{engine_args, fixtures, ids, read_json, rvllm_bin};
use serde_json::json;
use serde_yaml::Value;
use server_common::{http, post_bytes};

const NEW_TOKENS: usize = 32;
/// What LeaderWorkerSet sets in every pod of a group.
const LWS_VARS: [&str; 3] = ["LWS_LEADER_ADDRESS", "LWS_GROUP_SIZE", "LWS_WORKER_INDEX"];

fn manifest_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/lws.yaml")
}

/// Every document of the manifest.
fn manifest_docs() -> Vec<Value> {
    let text = std::fs::read_to_string(manifest_path()).expect("deploy/lws.yaml");
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("deploy/lws.yaml is YAML"))
        .collect()
}

fn lws_doc() -> Value {
    manifest_docs()
        .into_iter()
        .find(|d| d["kind"] == "LeaderWorkerSet")
        .expect("deploy/lws.yaml holds a LeaderWorkerSet")
}

// ---- the schema check ---------------------------------------------------------------

/// `v` is a mapping whose keys are all in `known` and include all of `required`.
fn check_keys(at: &str, v: &Value, known: &[&str], required: &[&str]) {
    let m = v
        .as_mapping()
        .unwrap_or_else(|| panic!("{at} must be a mapping, is {v:?}"));
    for k in m.keys() {
        let k = k
            .as_str()
            .unwrap_or_else(|| panic!("{at}: key {k:?} is not a string"));
        assert!(
            known.contains(&k),
            "{at}.{k} is not a field of its type (known: {known:?})"
        );
    }
    for r in required {
        assert!(m.contains_key(*r), "{at} lacks the required field {r}");
    }
}

fn check_str(at: &str, v: &Value) -> String {
    v.as_str()
        .unwrap_or_else(|| panic!("{at} must be a string, is {v:?}"))
        .to_string()
}

fn check_int(at: &str, v: &Value) -> i64 {
    v.as_i64()
        .unwrap_or_else(|| panic!("{at} must be an integer, is {v:?}"))
}

fn check_dns_label(at: &str, v: &Value) {
    let s = check_str(at, v);
    assert!(
        !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !s.starts_with('-')
            && !s.ends_with('-'),
        "{at} `{s}` is not a DNS-1123 label"
    );
}

fn check_string_map(at: &str, v: &Value) {
    for (k, val) in v
        .as_mapping()
        .unwrap_or_else(|| panic!("{at} must be a mapping"))
    {
        check_str(&format!("{at} key"), k);
        check_str(&format!("{at}.{k:?}"), val);
    }
}

fn check_object_meta(at: &str, v: &Value) {
    check_keys(at, v, &["name", "namespace", "labels", "annotations"], &[]);
    if !v["name"].is_null() {
        check_dns_label(&format!("{at}.name"), &v["name"]);
    }
    for f in ["labels", "annotations"] {
        if !v[f].is_null() {
            check_string_map(&format!("{at}.{f}"), &v[f]);
        }
    }
}

/// A port: an integer in 1..=65535 or a port name.
fn check_port(at: &str, v: &Value) {
    match v.as_i64() {
        Some(p) => assert!((1..=65535).contains(&p), "{at}: port {p} out of range"),
        None => {
            check_str(at, v);
        }
    }
}

fn check_probe(at: &str, v: &Value) {
    let ints = [
        "initialDelaySeconds",
        "periodSeconds",
        "timeoutSeconds",
        "successThreshold",
        "failureThreshold",
    ];
    let mut known = vec!["httpGet", "tcpSocket", "exec", "grpc"];
    known.extend(ints);
    check_keys(at, v, &known, &[]);
    for f in ints {
        if !v[f].is_null() {
            assert!(check_int(&format!("{at}.{f}"), &v[f]) >= 0);
        }
    }
    let h = &v["httpGet"];
    if !h.is_null() {
        check_keys(
            &format!("{at}.httpGet"),
            h,
            &["path", "port", "host", "scheme", "httpHeaders"],
            &["port"],
        );
        check_port(&format!("{at}.httpGet.port"), &h["port"]);
        check_str(&format!("{at}.httpGet.path"), &h["path"]);
    }
}

/// A Pod's container (core/v1 Container, the fields a serving container uses).
fn check_container(at: &str, c: &Value) {
    let known = [
        "name",
        "image",
        "imagePullPolicy",
        "command",
        "args",
        "workingDir",
        "env",
        "envFrom",
        "ports",
        "resources",
        "readinessProbe",
        "livenessProbe",
        "startupProbe",
        "volumeMounts",
        "securityContext",
    ];
    check_keys(at, c, &known, &["name", "image"]);
    check_dns_label(&format!("{at}.name"), &c["name"]);
    check_str(&format!("{at}.image"), &c["image"]);
    for f in ["command", "args"] {
        if let Some(list) = c.get(f) {
            let items = list
                .as_sequence()
                .unwrap_or_else(|| panic!("{at}.{f} must be a list"));
            for (i, s) in items.iter().enumerate() {
                check_str(&format!("{at}.{f}[{i}]"), s);
            }
        }
    }
    for (i, e) in seq(c, "env").iter().enumerate() {
        let at = format!("{at}.env[{i}]");
        check_keys(&at, e, &["name", "value", "valueFrom"], &["name"]);
        check_str(&format!("{at}.name"), &e["name"]);
        if !e["value"].is_null() {
            check_str(&format!("{at}.value"), &e["value"]);
        }
    }
    for (i, p) in seq(c, "ports").iter().enumerate() {
        let at = format!("{at}.ports[{i}]");
        check_keys(
            &at,
            p,
            &["name", "containerPort", "protocol", "hostPort"],
            &["containerPort"],
        );
        check_port(&format!("{at}.containerPort"), &p["containerPort"]);
        assert!(
            p["containerPort"].is_i64(),
            "{at}.containerPort must be an integer"
        );
        if !p["protocol"].is_null() {
            let proto = check_str(&format!("{at}.protocol"), &p["protocol"]);
            assert!(
                ["TCP", "UDP", "SCTP"].contains(&proto.as_str()),
                "{at}: {proto}"
            );
        }
    }
    if let Some(r) = c.get("resources") {
        check_keys(
            &format!("{at}.resources"),
            r,
            &["limits", "requests", "claims"],
            &[],
        );
        for f in ["limits", "requests"] {
            if let Some(m) = r.get(f) {
                check_string_map(&format!("{at}.resources.{f}"), m);
            }
        }
    }
    for f in ["readinessProbe", "livenessProbe", "startupProbe"] {
        if let Some(p) = c.get(f) {
            check_probe(&format!("{at}.{f}"), p);
        }
    }
    // Kubernetes expands $(VAR) from the container's environment: every one must be set,
    // by the container's env or by LWS.
    let defined: BTreeSet<String> = seq(c, "env")
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .chain(LWS_VARS.iter().map(|s| s.to_string()))
        .collect();
    for arg in strings(c, "command").iter().chain(&strings(c, "args")) {
        for var in referenced_vars(arg) {
            assert!(
                defined.contains(&var),
                "{at}: `{arg}` uses $({var}), which neither the container's env nor LWS sets"
            );
        }
    }
}

fn seq<'a>(v: &'a Value, f: &str) -> &'a [Value] {
    v.get(f)
        .and_then(Value::as_sequence)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

fn strings(v: &Value, f: &str) -> Vec<String> {
    seq(v, f)
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

fn referenced_vars(arg: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = arg;
    while let Some(i) = rest.find("$(") {
        let after = &rest[i + 2..];
        let end = after.find(')').expect("an unclosed $(");
        out.push(after[..end].to_string());
        rest = &after[end + 1..];
    }
    out
}

fn check_pod_template(at: &str, t: &Value) {
    check_keys(at, t, &["metadata", "spec"], &["spec"]);
    if let Some(m) = t.get("metadata") {
        check_object_meta(&format!("{at}.metadata"), m);
    }
    let spec = &t["spec"];
    let known = [
        "containers",
        "initContainers",
        "volumes",
        "nodeSelector",
        "tolerations",
        "affinity",
        "serviceAccountName",
        "terminationGracePeriodSeconds",
        "restartPolicy",
        "imagePullSecrets",
        "securityContext",
    ];
    check_keys(&format!("{at}.spec"), spec, &known, &["containers"]);
    let containers = seq(spec, "containers");
    assert!(!containers.is_empty(), "{at}.spec.containers is empty");
    for (i, c) in containers.iter().enumerate() {
        check_container(&format!("{at}.spec.containers[{i}]"), c);
    }
}

/// The value after `flag` in a command line.
fn flag_value<'a>(cmd: &'a [String], flag: &str) -> Option<&'a str> {
    cmd.iter()
        .position(|a| a == flag)
        .and_then(|i| cmd.get(i + 1))
        .map(String::as_str)
}

fn env_value(c: &Value, name: &str) -> Option<String> {
    seq(c, "env")
        .iter()
        .find(|e| e["name"] == name)
        .and_then(|e| e["value"].as_str())
        .map(str::to_string)
}

#[test]
fn the_lws_manifest_is_a_valid_leaderworkerset_whose_commands_rvllm_accepts() {
    let lws = lws_doc();
    check_keys(
        "",
        &lws,
        &["apiVersion", "kind", "metadata", "spec"],
        &["apiVersion", "kind", "metadata", "spec"],
    );
    assert_eq!(lws["apiVersion"], "leaderworkerset.x-k8s.io/v1");
    check_object_meta("metadata", &lws["metadata"]);
    check_dns_label("metadata.name", &lws["metadata"]["name"]);
    let spec = &lws["spec"];
    let known = [
        "replicas",
        "leaderWorkerTemplate",
        "rolloutStrategy",
        "startupPolicy",
        "networkConfig",
    ];
    check_keys("spec", spec, &known, &["leaderWorkerTemplate"]);
    if !spec["replicas"].is_null() {
        assert!(check_int("spec.replicas", &spec["replicas"]) >= 0);
    }
    let lwt = &spec["leaderWorkerTemplate"];
    let known = [
        "size",
        "leaderTemplate",
        "workerTemplate",
        "restartPolicy",
        "subGroupPolicy",
    ];
    check_keys(
        "spec.leaderWorkerTemplate",
        lwt,
        &known,
        &["workerTemplate"],
    );
    let size = check_int("spec.leaderWorkerTemplate.size", &lwt["size"]);
    assert!(
        size >= 2,
        "a multi-node group needs size 2 or more, not {size}"
    );
    if !lwt["restartPolicy"].is_null() {
        let p = check_str("restartPolicy", &lwt["restartPolicy"]);
        assert!(
            ["RecreateGroupOnPodRestart", "None", "Default"].contains(&p.as_str()),
            "{p}"
        );
    }
    check_pod_template("leaderTemplate", &lwt["leaderTemplate"]);
    check_pod_template("workerTemplate", &lwt["workerTemplate"]);

    // What rvllm needs of the two commands.
    let leader = &lwt["leaderTemplate"]["spec"]["containers"][0];
    let worker = &lwt["workerTemplate"]["spec"]["containers"][0];
    let (lc, wc) = (strings(leader, "command"), strings(worker, "command"));
    for (who, cmd) in [("leader", &lc), ("worker", &wc)] {
        assert_eq!(&cmd[..2], ["rvllm", "serve"], "{who}: {cmd:?}");
        assert_eq!(
            flag_value(cmd, "--nnodes"),
            Some("$(LWS_GROUP_SIZE)"),
            "{who}"
        );
        assert_eq!(
            flag_value(cmd, "--master-addr"),
            Some("$(LWS_LEADER_ADDRESS)"),
            "{who}"
        );
        assert_eq!(
            flag_value(cmd, "--master-port"),
            flag_value(&lc, "--master-port")
        );
    }
    assert_eq!(flag_value(&lc, "--node-rank"), Some("0"));
    assert!(!lc.contains(&"--headless".to_string()));
    assert_eq!(flag_value(&wc, "--node-rank"), Some("$(LWS_WORKER_INDEX)"));
    assert!(wc.contains(&"--headless".to_string()));
    // HTTP on 8000, the readiness probe on /health there; the rendezvous port exposed.
    assert_eq!(flag_value(&lc, "--port"), Some("8000"));
    let probe = &leader["readinessProbe"]["httpGet"];
    assert_eq!(
        (probe["path"].as_str(), probe["port"].as_i64()),
        (Some("/health"), Some(8000))
    );
    let ports: Vec<i64> = seq(leader, "ports")
        .iter()
        .map(|p| p["containerPort"].as_i64().unwrap())
        .collect();
    let master_port: i64 = flag_value(&lc, "--master-port").unwrap().parse().unwrap();
    assert!(
        ports.contains(&8000) && ports.contains(&master_port),
        "{ports:?}"
    );
    // One rank per GPU: tp = size × the GPUs of each pod.
    for (who, c) in [("leader", leader), ("worker", worker)] {
        let gpus: i64 = c["resources"]["limits"]["nvidia.com/gpu"]
            .as_str()
            .unwrap_or_else(|| panic!("{who} asks for no nvidia.com/gpu"))
            .parse()
            .unwrap();
        let tp: i64 = env_value(c, "TP_SIZE").unwrap().parse().unwrap();
        assert_eq!(
            tp,
            size * gpus,
            "{who}: TP_SIZE {tp} is not size {size} × {gpus} GPUs"
        );
    }
    // Every flag is one `rvllm serve` knows.
    let help = Command::new(rvllm_bin())
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for a in lc.iter().chain(&wc).filter(|a| a.starts_with("--")) {
        assert!(
            help.contains(&format!("{a} ")) || help.contains(&format!("{a}\n")),
            "rvllm serve has no {a}"
        );
    }
    // The Service reaches the leaders only.
    let svc = manifest_docs()
        .into_iter()
        .find(|d| d["kind"] == "Service")
        .expect("a Service for the leaders");
    assert_eq!(svc["apiVersion"], "v1");
    let selector = svc["spec"]["selector"].as_mapping().unwrap();
    let labels = lwt["leaderTemplate"]["metadata"]["labels"]
        .as_mapping()
        .unwrap();
    for (k, v) in selector {
        let k = k.as_str().unwrap();
        assert!(
            labels.get(k) == Some(v)
                || k == "leaderworkerset.sigs.k8s.io/name" && *v == lws["metadata"]["name"],
            "the Service selects {k}={v:?}, which the leader pods do not carry"
        );
    }
}

// ---- the processes ------------------------------------------------------------------

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The manifest's command for `template` (leaderTemplate, workerTemplate) as this test runs
/// it: LWS's variables and the container's env set to loopback values, the model a fixture,
/// HTTP on a free loopback port, the rendezvous on `master_port`, on the CPU.
fn command_from_manifest(template: &str, model: &Path, master_port: u16, tp: usize) -> Vec<String> {
    let lws = lws_doc();
    let c = &lws["spec"]["leaderWorkerTemplate"][template]["spec"]["containers"][0];
    let vars: HashMap<&str, String> = HashMap::from([
        ("LWS_LEADER_ADDRESS", "127.0.0.1".to_string()),
        ("LWS_GROUP_SIZE", "2".to_string()),
        ("LWS_WORKER_INDEX", "1".to_string()),
        ("MODEL", model.to_str().unwrap().to_string()),
        ("TP_SIZE", tp.to_string()),
    ]);
    let mut cmd: Vec<String> = strings(c, "command")
        .into_iter()
        .map(|arg| {
            referenced_vars(&arg).iter().fold(arg.clone(), |a, v| {
                a.replace(
                    &format!("$({v})"),
                    vars.get(v.as_str())
                        .unwrap_or_else(|| panic!("no test value for $({v})")),
                )
            })
        })
        .collect();
    for (flag, value) in [
        ("--host", "127.0.0.1".to_string()),
        ("--port", "0".to_string()),
        ("--master-port", master_port.to_string()),
    ] {
        if let Some(i) = cmd.iter().position(|a| a == flag) {
            cmd[i + 1] = value;
        }
    }
    cmd.extend(
        [
            "--device",
            "cpu",
            "--disable-progress",
            "--num-kv-blocks",
            "256",
        ]
        .map(String::from),
    );
    cmd
}

/// A started `rvllm` process and its log.
struct Proc {
    child: Child,
    log: Arc<Mutex<String>>,
    /// The HTTP address, once a leader says it serves.
    addr: mpsc::Receiver<String>,
}

impl Proc {
    fn start(cmd: &[String]) -> Proc {
        assert_eq!(cmd[0], "rvllm");
        let mut child = Command::new(rvllm_bin())
            .args(&cmd[1..])
            .env("RVLLM_TP_STEP_TIMEOUT_S", "30")
            .env("RVLLM_TP_RENDEZVOUS_TIMEOUT_S", "60")
            .env_remove("RVLLM_API_KEY")
            .env_remove("VLLM_API_KEY")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning rvllm");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, addr) = mpsc::channel();
        let log_w = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("serving") {
                    if let Some(rest) = line.split(" on http://").nth(1) {
                        let _ = tx.send(rest.split([' ', '/']).next().unwrap_or("").to_string());
                    }
                }
                log_w.lock().unwrap().push_str(&format!("{line}\n"));
            }
        });
        Proc { child, log, addr }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The exit status within `timeout`, or a panic showing the log.
    fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                // Let the log reader drain the last lines.
                std::thread::sleep(Duration::from_millis(100));
                return s;
            }
            assert!(
                start.elapsed() < timeout,
                "no exit within {timeout:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Node 0 and node 1 of a two-node group on `model`, started from the manifest; returns
/// them once the leader serves.
fn start_group(model: &Path, tp: usize) -> (Proc, Proc, String) {
    let port = free_port();
    let worker = Proc::start(&command_from_manifest("workerTemplate", model, port, tp));
    let leader = Proc::start(&command_from_manifest("leaderTemplate", model, port, tp));
    let addr = leader
        .addr
        .recv_timeout(Duration::from_secs(120))
        .unwrap_or_else(|_| {
            panic!(
                "the leader did not serve; its log:\n{}\nthe worker's:\n{}",
                leader.log(),
                worker.log()
            )
        });
    (leader, worker, addr)
}

fn prompts(model: &Path) -> Vec<Vec<u32>> {
    read_json(&model.join("reference.json"))["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| ids(&p["prompt_ids"]))
        .collect()
}

/// Greedy tokens of every prompt from one rank in this process.
fn one_rank_tokens(model: &Path, prompts: &[Vec<u32>]) -> Vec<Vec<u32>> {
    let mut llm = Llm::new(&engine_args(model)).unwrap();
    let params = SamplingParams {
        temperature: 0.0,
        ignore_eos: true,
        max_tokens: Some(NEW_TOKENS),
        ..SamplingParams::default()
    };
    let out = llm.generate(prompts, &[params], |_| {}).unwrap();
    out.iter().map(|o| o.outputs[0].token_ids.clone()).collect()
}

fn completion(addr: &str, prompt: &[u32]) -> server_common::Resp {
    let body = json!({"prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0,
                      "ignore_eos": true, "return_token_ids": true});
    http(
        addr,
        &post_bytes("/v1/completions", body.to_string().as_bytes(), None),
    )
}

/// Greedy tokens of every prompt from the group, the requests sent at once (one batch).
fn group_tokens(addr: &str, prompts: &[Vec<u32>]) -> Vec<Vec<u32>> {
    std::thread::scope(|s| {
        let hs: Vec<_> = prompts
            .iter()
            .map(|p| s.spawn(move || completion(addr, p)))
            .collect();
        hs.into_iter()
            .map(|h| {
                let r = h.join().unwrap();
                assert_eq!(r.status, 200, "{}", r.text());
                ids(&r.json()["choices"][0]["token_ids"])
            })
            .collect()
    })
}

/// llama3 (2 KV heads, one per rank) and gemma2 (1 KV head, replicated on both ranks) at TP 2,
/// one rank a process; qwen2 at TP 4, two ranks a process (each node's second rank a thread
/// that reduces over TCP too): the group gives one rank's greedy tokens. Then a killed worker
/// fails the next request with an error naming it, at once, and a worker whose leader stops
/// exits 0.
#[test]
fn two_processes_give_one_ranks_tokens_and_fail_cleanly() {
    for (name, tp, kill_worker) in [
        ("llama3", 2, true),
        ("gemma2", 2, false),
        ("qwen2", 4, false),
    ] {
        let model = fixtures().join("tiny").join(name);
        let prompts = prompts(&model);
        let want = one_rank_tokens(&model, &prompts);
        let (mut leader, mut worker, addr) = start_group(&model, tp);
        let got = group_tokens(&addr, &prompts);
        assert_eq!(
            got,
            want,
            "{name}: TP {tp} over two nodes vs one rank; leader log:\n{}",
            leader.log()
        );
        assert!(got.iter().all(|t| t.len() == NEW_TOKENS));
        if kill_worker {
            worker.child.kill().unwrap();
            worker.wait(Duration::from_secs(10));
            let started = Instant::now();
            let r = completion(&addr, &prompts[0]);
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "{:?}",
                started.elapsed()
            );
            assert!(r.status >= 500, "{name}: {} {}", r.status, r.text());
            let msg = r.text();
            assert!(
                (msg.contains("rank 1") || msg.contains("node 1")) && msg.contains("closed"),
                "{name}: {msg}"
            );
        } else {
            let _ = Command::new("kill")
                .args(["-TERM", &leader.child.id().to_string()])
                .status();
            assert!(
                leader.wait(Duration::from_secs(60)).success(),
                "{}",
                leader.log()
            );
            let status = worker.wait(Duration::from_secs(20));
            assert!(
                status.success(),
                "worker: {status:?}; log:\n{}",
                worker.log()
            );
            assert!(
                worker.log().contains("the leader closed the connection"),
                "{}",
                worker.log()
            );
        }
    }
}

/// A worker started on another model, and a size that does not split over the nodes, are
/// refused by name.
#[test]
fn mismatched_nodes_and_sizes_are_refused_by_name() {
    let llama = fixtures().join("tiny").join("llama3");
    let qwen = fixtures().join("tiny").join("qwen2");
    let port = free_port();
    let mut worker = Proc::start(&command_from_manifest("workerTemplate", &qwen, port, 2));
    let mut leader = Proc::start(&command_from_manifest("leaderTemplate", &llama, port, 2));
    assert!(!leader.wait(Duration::from_secs(60)).success());
    assert!(!worker.wait(Duration::from_secs(60)).success());
    for (who, log) in [("leader", leader.log()), ("worker", worker.log())] {
        assert!(
            log.contains("node 1 loaded a different model"),
            "{who}:\n{log}"
        );
    }
    let mut cmd = command_from_manifest("leaderTemplate", &llama, free_port(), 2);
    let i = cmd
        .iter()
        .position(|a| a == "--tensor-parallel-size")
        .unwrap();
    cmd[i + 1] = "3".into();
    let mut odd = Proc::start(&cmd);
    assert!(!odd.wait(Duration::from_secs(60)).success());
    assert!(
        odd.log()
            .contains("--tensor-parallel-size 3 is not divisible by --nnodes 2"),
        "{}",
        odd.log()
    );
}
