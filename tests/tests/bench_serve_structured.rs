//! `rvllm bench serve --structured-output-ratio` against a real server on loopback, on the
//! tiny llama3 config with dummy weights and the synthetic tokenizer that bench.sh's
//! `serve-structured` gives the benchmark model (xtask/src/gpu_test/make_bench_tokenizer.py):
//! the generator's tokenizer loads and llguidance reads it, constrained requests carry the
//! schema, and every constrained output that completes is valid against it, checked here by
//! an independent JSON-schema validator.
mod server_common;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};
use server_common::{tiny_model, Server};

/// The tiny model's config in `dir`, given the generator's tokenizer.
fn synthetic_tokenizer_model(dir: &Path) -> PathBuf {
    let src = dir.join("config-only");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::copy(tiny_model().join("config.json"), src.join("config.json")).unwrap();
    let generator =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../xtask/src/gpu_test/make_bench_tokenizer.py");
    let dst = dir.join("with-tokenizer");
    let py = std::env::var("RVLLM_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(&py)
        .arg(&generator)
        .args([&src, &dst])
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run `{py}` ({e}): install Python 3 or set RVLLM_PYTHON")
        });
    assert!(
        out.status.success(),
        "{} failed:\n{}",
        generator.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    dst
}

/// Runs `rvllm bench serve` with `args` and returns its saved result.
fn bench(server: &Server, dir: &Path, args: &[&str]) -> Value {
    let common = [
        "--random-prompt-format",
        "ids",
        "--random-vocab-size",
        "400",
        "--random-input-len",
        "8",
        "--max-concurrency",
        "3",
        "--seed",
        "5",
    ];
    let args: Vec<&str> = common.iter().chain(args).copied().collect();
    let (stdout, v) = server.bench_serve(&args, &dir.join("result.json"));
    assert!(stdout.contains("Structured output ratio:"), "{stdout}");
    assert_eq!(v["failed"], 0, "{v}");
    v
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .expect("an array")
        .iter()
        .map(|s| s.as_str().expect("a string"))
        .collect()
}

#[test]
fn constrained_outputs_follow_the_schema() {
    let dir = tempfile::tempdir().unwrap();
    let model = synthetic_tokenizer_model(dir.path());
    let tokenizer: Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("tokenizer.json")).unwrap())
            .unwrap();
    let mut ids: Vec<u64> = tokenizer["model"]["vocab"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .collect();
    ids.sort();
    assert_eq!(
        ids,
        (0..512).collect::<Vec<_>>(),
        "one token per id of vocab_size"
    );
    let server = Server::start(&model, &["--load-format", "dummy"], &[]);

    // The built-in schema never closes: with --ignore-eos every request runs its full length,
    // as unconstrained ones do, and the outputs are the schema's object, cut off.
    let v = bench(
        &server,
        dir.path(),
        &[
            "--num-prompts",
            "6",
            "--random-output-len",
            "24",
            "--ignore-eos",
            "--structured-output-ratio",
            "1",
        ],
    );
    assert_eq!(v["structured_output_ratio"], 1.0);
    assert_eq!(v["structured_output_requests"], 6);
    assert_eq!(v["output_lens"], json!(vec![24; 6]), "{v}");
    for text in strings(&v["generated_texts"]) {
        assert!(
            text.starts_with(r#"{"text": ""#),
            "not the schema's object: {text:?}"
        );
    }
    let judged = v["structured_output_valid"].as_u64().unwrap()
        + v["structured_output_truncated"].as_u64().unwrap();
    assert_eq!(judged, 6, "{v}");

    // A bounded schema, half the requests constrained, EOS allowed: the constrained outputs
    // end as whole documents, each valid; the others are left alone.
    let schema = json!({
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "kind": {"enum": ["small", "large"]},
            "n": {"type": "integer", "minimum": 0, "maximum": 99}
        },
        "required": ["ok", "kind", "n"],
        "additionalProperties": false
    });
    let schema_path = dir.path().join("schema.json");
    std::fs::write(&schema_path, schema.to_string()).unwrap();
    let v = bench(
        &server,
        dir.path(),
        &[
            "--num-prompts",
            "8",
            "--random-output-len",
            "64",
            "--structured-output-ratio",
            "0.5",
            "--json-schema-path",
            schema_path.to_str().unwrap(),
        ],
    );
    assert_eq!(v["structured_output_ratio"], 0.5);
    let constrained: Vec<bool> = v["structured_output_constrained"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_bool().unwrap())
        .collect();
    assert_eq!(constrained.iter().filter(|c| **c).count(), 4, "{v}");
    let validator = jsonschema::validator_for(&schema).unwrap();
    let texts = strings(&v["generated_texts"]);
    for (text, _) in texts.iter().zip(&constrained).filter(|(_, c)| **c) {
        let doc: Value = serde_json::from_str(text)
            .unwrap_or_else(|e| panic!("a constrained output is not JSON ({e}): {text:?}"));
        assert!(
            validator.is_valid(&doc),
            "invalid against the schema: {text}"
        );
    }
    assert_eq!(
        (
            &v["structured_output_complete"],
            &v["structured_output_valid"],
            &v["structured_output_truncated"]
        ),
        (&json!(4), &json!(4), &json!(0)),
        "{v}"
    );
}

/// The runner's step counters on /metrics (what bench.sh's `serve-structured` diffs around
/// its runs): an unconstrained request's steps are eager (no graphs on the CPU) and unmasked;
/// a constrained request's steps are all masked. One request at a time, so the deltas of a
/// window are that request's steps: one per token, and at most one more (a step scheduled
/// ahead before the grammar ended the request).
#[test]
fn metrics_count_graph_eager_and_grammar_mask_steps() {
    let dir = tempfile::tempdir().unwrap();
    let model = synthetic_tokenizer_model(dir.path());
    let server = Server::start(&model, &["--load-format", "dummy"], &[]);
    let steps = |m: &str| {
        let l = "{model_name=";
        [
            "cuda_graph_decode_steps_total",
            "eager_steps_total",
            "grammar_mask_steps_total",
        ]
        .map(|name| {
            let series = format!("rvllm:{name}");
            assert!(m.contains(&format!("# TYPE {series} counter\n")), "{m}");
            server_common::metric(m, &format!("{series}{l}"))
        })
    };
    let complete = |extra: Value| {
        let mut body = json!({"prompt": "a b c d", "max_tokens": 8, "ignore_eos": true,
                              "temperature": 0});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let r = server.post_json("/v1/completions", &body);
        assert_eq!(r.status, 200, "{}", r.text());
        let tokens = r.json()["usage"]["completion_tokens"].as_f64().unwrap();
        assert!(tokens >= 1.0, "{}", r.text());
        tokens
    };

    // One request's eager and masked steps (the counters' deltas around it).
    let request_steps = |extra: Value| {
        let before = steps(&server.wait_idle());
        let tokens = complete(extra);
        let after = steps(&server.wait_idle());
        let [graph, eager, masked] = [0, 1, 2].map(|i| after[i] - before[i]);
        assert_eq!(graph, 0.0, "the CPU has no graphs");
        assert!(
            (tokens..=tokens + 1.0).contains(&eager),
            "{eager} eager steps for {tokens} tokens"
        );
        (eager, masked)
    };

    let (_, masked) = request_steps(json!({}));
    assert_eq!(
        masked, 0.0,
        "an unconstrained request applied grammar masks"
    );

    let schema = json!({"type": "object", "properties": {"text": {"type": "string"}},
                        "required": ["text"], "additionalProperties": false});
    let (eager, masked) = request_steps(json!({"structured_outputs": {"json": schema}}));
    assert_eq!(
        masked, eager,
        "a constrained request's steps all apply its mask"
    );
}
