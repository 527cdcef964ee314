//! Prefix caching, on by default as in vLLM: requests sharing a prompt prefix reuse the KV
//! blocks an earlier request computed, and get the outputs of a cold cache (the same tokens,
//! logprobs up to rounding; with `n` > 1 and prompt logprobs too); the server's /metrics
//! counts the lookups and hits in tokens; `--no-enable-prefix-caching` turns it all off;
//! `rvllm bench` reports the hit rate of its `prefix_repetition` workload.
mod server_common;

use std::process::Command;

use rvllm::engine::{EngineArgs, Llm, RequestOutput};
use rvllm::sampling::SamplingParams;
use rvllm_tests::{engine_args, tiny_model, TinyReference, TINY_MODELS};
use serde_json::{json, Value};
use server_common::{metric, Server};

fn generate(llm: &mut Llm, prompts: &[Vec<u32>], params: &[SamplingParams]) -> Vec<RequestOutput> {
    llm.generate(prompts, params, |_| {})
        .unwrap_or_else(|e| panic!("generate failed: {e:#}"))
}

/// One sequence's outputs: tokens and ids in the top logprobs (which must not change with
/// the cache), and every logprob value (prompt ones included), which may move by rounding.
/// The CPU linear layers take a different path for chunks of fewer than 32 rows, so a suffix
/// computed on its own after a cached prefix rounds differently from the same rows computed
/// in one chunk with the prefix (as it does for chunked prefill): close, not bitwise equal.
#[derive(Debug)]
struct Fingerprint {
    ids: String,
    values: Vec<f32>,
}

fn fingerprint(outs: &[RequestOutput]) -> Vec<Fingerprint> {
    let mut fps = Vec::new();
    for o in outs {
        let prompt = o.prompt_logprobs.iter().flatten().flatten();
        let mut values = Vec::new();
        let mut top_ids = Vec::new();
        for l in prompt.chain(o.outputs.iter().flat_map(|c| &c.logprobs)) {
            values.push(l.logprob);
            values.extend(l.top.iter().map(|t| t.1));
            top_ids.push((
                l.token_id,
                l.rank,
                l.top.iter().map(|t| t.0).collect::<Vec<_>>(),
            ));
        }
        let tokens: Vec<&[u32]> = o.outputs.iter().map(|c| c.token_ids.as_slice()).collect();
        fps.push(Fingerprint {
            ids: format!("{tokens:?} {top_ids:?}"),
            values,
        });
    }
    fps
}

fn assert_same(what: &str, a: &Fingerprint, b: &Fingerprint) {
    assert_eq!(a.ids, b.ids, "{what}: tokens changed with the prefix cache");
    assert_eq!(a.values.len(), b.values.len(), "{what}");
    for (x, y) in a.values.iter().zip(&b.values) {
        assert!(
            (x - y).abs() <= 1e-4,
            "{what}: logprob {x} against {y} without the cache"
        );
    }
}

/// Runs a warm-up prompt, then a batch sharing its prefix (greedy with logprobs, a full hit
/// up to its last block, seeded n = 2, prompt logprobs), then the same batch again; returns
/// the outputs and the scheduler's (hits, queries).
fn shared_prefix_session(args: &EngineArgs, base: &[u32]) -> (Vec<Fingerprint>, (u64, u64)) {
    let mut llm = Llm::new(args).unwrap_or_else(|e| panic!("loading {}: {e:#}", args.model));
    // 13 tokens of prefix: three full blocks of 4 and one token more.
    let prefix: Vec<u32> = base.iter().cycle().take(13).copied().collect();
    let with = |tail: &[u32]| -> Vec<u32> { prefix.iter().chain(tail).copied().collect() };
    let greedy = SamplingParams {
        temperature: 0.0,
        ignore_eos: true,
        max_tokens: Some(6),
        logprobs: Some(3),
        ..SamplingParams::default()
    };
    let seeded_pair = SamplingParams {
        temperature: 1.0,
        seed: Some(11),
        n: 2,
        ..greedy.clone()
    };
    let prompt_logprobs = SamplingParams {
        prompt_logprobs: Some(2),
        ..greedy.clone()
    };
    let mut fp = fingerprint(&generate(
        &mut llm,
        &[with(&[base[0]])],
        std::slice::from_ref(&greedy),
    ));
    let batch = [
        with(&[base[1], base[2]]),
        prefix[..12].to_vec(), // every block cached: the last one is still computed
        with(&[base[3]]),
        with(&[base[2]]),
    ];
    let params = [greedy.clone(), greedy, seeded_pair, prompt_logprobs];
    for _ in 0..2 {
        fp.extend(fingerprint(&generate(&mut llm, &batch, &params)));
    }
    let s = &llm.core.scheduler;
    (fp, (s.prefix_cache_hits(), s.prefix_cache_queries()))
}

#[test]
fn cached_prefixes_give_the_outputs_of_a_cold_cache() {
    for name in TINY_MODELS {
        let reference = TinyReference::load(name);
        // Four distinct-position tokens from the reference prompts (real ids of the vocab).
        let base: Vec<u32> = reference.prompt_ids().concat();
        assert!(
            base.len() >= 4,
            "tiny {name}: the reference prompts are too short"
        );
        let base = &base;
        let mut args = engine_args(&tiny_model(name));
        args.block_size = 4;
        args.num_kv_blocks = Some(256);
        args.max_model_len = Some(256);
        assert!(args.prefix_caching(), "on by default");
        let (cached, (hits, queries)) = shared_prefix_session(&args, base);
        args.no_enable_prefix_caching = true;
        let (cold, cold_counts) = shared_prefix_session(&args, base);
        assert_eq!(
            cold_counts,
            (0, 0),
            "tiny {name}: caching off counts nothing"
        );
        // Every request after the first reads 12 cached tokens (the prompt-logprobs one
        // reads nothing and is no query); the second pass as many.
        assert_eq!(queries, 14 + 2 * (15 + 12 + 14 + 14), "tiny {name}");
        assert_eq!(hits, 2 * (12 + 8 + 12 + 12), "tiny {name}");
        for (i, (a, b)) in cached.iter().zip(&cold).enumerate() {
            assert_same(&format!("tiny {name} output {i}"), a, b);
        }
        assert_eq!(cached.len(), cold.len());
    }
}

fn completion(prompt: &[u32]) -> Value {
    json!({"model": "tiny", "prompt": prompt, "max_tokens": 5, "temperature": 0,
           "ignore_eos": true, "logprobs": 2})
}

/// Two completions sharing 32 prompt tokens (two blocks of 16): the second hits both
/// blocks; /metrics counts lookups and hits in tokens; the answers are a cold server's
/// (logprobs up to rounding, see `Fingerprint`).
#[test]
fn server_counts_prefix_cache_hits_and_answers_as_without_the_cache() {
    let shared: Vec<u32> = (0..32).map(|i| 40 + (i * 7) % 400).collect();
    let first: Vec<u32> = shared.iter().copied().chain([5, 6, 7]).collect();
    let second: Vec<u32> = shared.iter().copied().chain([9, 8, 7, 6, 5]).collect();
    let hits = "rvllm:prefix_cache_hits_total{model_name=\"tiny\"}";
    let queries = "rvllm:prefix_cache_queries_total{model_name=\"tiny\"}";
    let mut answers = Vec::new();
    for flags in [&[][..], &["--no-enable-prefix-caching"][..]] {
        let mut args = vec!["--served-model-name", "tiny"];
        args.extend_from_slice(flags);
        let s = Server::start(&server_common::tiny_model(), &args, &[]);
        let m = s.metrics();
        assert!(
            m.contains("# TYPE rvllm:prefix_cache_hits_total counter")
                && m.contains("# TYPE rvllm:prefix_cache_queries_total counter"),
            "{m}"
        );
        assert_eq!((metric(&m, hits), metric(&m, queries)), (0.0, 0.0));
        let mut texts = Vec::new();
        for prompt in [&first, &second] {
            let r = s.post_json("/v1/completions", &completion(prompt));
            assert_eq!(r.status, 200, "{}", r.text());
            let choice = &r.json()["choices"][0];
            let logprobs: Vec<f64> = choice["logprobs"]["token_logprobs"]
                .as_array()
                .expect("token_logprobs")
                .iter()
                .map(|v| v.as_f64().expect("a number"))
                .collect();
            texts.push((
                format!("{} {}", choice["text"], choice["logprobs"]["tokens"]),
                logprobs,
            ));
        }
        let m = s.wait_idle();
        let counts = (metric(&m, hits), metric(&m, queries));
        if flags.is_empty() {
            assert_eq!(counts, (32.0, 35.0 + 37.0), "{m}");
        } else {
            assert_eq!(counts, (0.0, 0.0), "caching off: {m}");
        }
        answers.push(texts);
    }
    for ((text, lp), (cold_text, cold_lp)) in answers[0].iter().zip(&answers[1]) {
        assert_eq!(text, cold_text, "answer changed with the prefix cache");
        for (x, y) in lp.iter().zip(cold_lp) {
            assert!(
                (x - y).abs() <= 1e-4,
                "logprob {x} against {y} without the cache"
            );
        }
    }
}

/// `rvllm bench serve --dataset-name prefix_repetition`, one request at a time: 2 prefixes
/// of 32 tokens over 8 prompts, so 6 prompts find their prefix's two blocks cached.
#[test]
fn bench_serve_prefix_repetition_reports_the_hit_rate() {
    let s = Server::start(
        &server_common::tiny_model(),
        &["--served-model-name", "tiny"],
        &[],
    );
    let dir = tempfile::tempdir().unwrap();
    let result = dir.path().join("bench.json");
    let (stdout, saved) = s.bench_serve(
        &[
            "--dataset-name",
            "prefix_repetition",
            "--prefix-repetition-prefix-len",
            "32",
            "--prefix-repetition-suffix-len",
            "8",
            "--prefix-repetition-num-prefixes",
            "2",
            "--prefix-repetition-output-len",
            "4",
            "--num-prompts",
            "8",
            "--max-concurrency",
            "1",
            "--ignore-eos",
            "--random-vocab-size",
            "300",
        ],
        &result,
    );
    assert!(
        stdout.contains("Prefix cache hit rate (server /metrics, during the run): 60.00 %"),
        "{stdout}"
    );
    assert_eq!(saved["input_lens"], json!(vec![40; 8]));
    assert_eq!(saved["output_lens"], json!(vec![4; 8]));
    assert_eq!(saved["prefix_cache_hits"], json!(192.0));
    assert_eq!(saved["prefix_cache_queries"], json!(320.0));
    assert_eq!(saved["dataset_name"], json!("prefix_repetition"));
}

/// `rvllm bench throughput --dataset-name prefix_repetition` on the CPU prints the hit rate
/// and saves the counters; with the cache off it reports no lookups.
#[test]
fn bench_throughput_prefix_repetition_reports_the_hit_rate() {
    let dir = tempfile::tempdir().unwrap();
    for off in [false, true] {
        let json_path = dir.path().join(format!("throughput-{off}.json"));
        let mut cmd = Command::new(server_common::rvllm_bin());
        cmd.args(["bench", "throughput", "--model"])
            .arg(server_common::tiny_model())
            .args(["--device", "cpu", "--disable-progress"])
            .args(["--dataset-name", "prefix_repetition"])
            .args(["--prefix-repetition-prefix-len", "32"])
            .args(["--prefix-repetition-suffix-len", "8"])
            .args(["--prefix-repetition-num-prefixes", "2"])
            .args(["--prefix-repetition-output-len", "3"])
            .args(["--num-prompts", "6", "--output-json"])
            .arg(&json_path);
        if off {
            cmd.arg("--no-enable-prefix-caching");
        }
        let out = cmd.output().expect("running rvllm bench throughput");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("Total num prompt tokens:  240"), "{stdout}");
        assert!(stdout.contains("Total num output tokens:  18"), "{stdout}");
        let saved: Value =
            serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
        if off {
            assert!(
                stdout.contains("Prefix cache hit rate: no lookups"),
                "{stdout}"
            );
            assert_eq!(saved["prefix_cache_queries"], json!(0));
        } else {
            // All six arrive in one batch: only the first prompt of each prefix can have
            // computed it before the others are admitted, so hits depend on the step
            // budget; the lookups are every prompt token.
            assert!(stdout.contains("Prefix cache hit rate: "), "{stdout}");
            assert_eq!(saved["prefix_cache_queries"], json!(240));
        }
    }
}
