//! `rvllm generate` as users run it: the built binary (target/<profile>/rvllm or $RVLLM_BIN)
//! on the tiny fixtures and SmolLM2, checking what it prints, and that bad flags and bad files
//! end with a non-zero exit and a message that names the problem, never a panic.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use rvllm_tests::{
    binary_backends, ids, on_cuda, rvllm_bin_for_test_device, smollm2_gguf, smollm2_reference,
    test_device, tiny_model, TinyReference,
};
use serde_json::Value;

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// The binary, checked once to have the test device's backend.
fn bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(rvllm_bin_for_test_device)
}

fn rvllm(args: &[&str]) -> Run {
    let out: Output = Command::new(bin())
        .args(args)
        // A panic would print its backtrace: easy to see in the assertions below.
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("running the rvllm binary");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `rvllm generate --model MODEL --device <test device> ARGS...`
fn generate(model: &Path, args: &[&str]) -> Run {
    let device = test_device();
    let mut all = vec![
        "generate",
        "--model",
        model.to_str().expect("UTF-8 path"),
        "--device",
        &device,
    ];
    all.extend_from_slice(args);
    rvllm(&all)
}

fn ok(run: &Run, what: &str) {
    assert_eq!(
        run.code,
        Some(0),
        "{what}: exit {:?}\nstdout:\n{}\nstderr:\n{}",
        run.code,
        run.stdout,
        run.stderr
    );
}

fn json_stdout(run: &Run, what: &str) -> Value {
    ok(run, what);
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| {
        panic!(
            "{what}: stdout is not one JSON document ({e}):\n{}",
            run.stdout
        )
    })
}

/// A failed run: exit code 1 or 2 (not a panic's 101), no panic text, and stderr naming
/// every one of `needles`.
fn fails_clearly(run: &Run, what: &str, needles: &[&str]) {
    assert!(
        matches!(run.code, Some(1) | Some(2)),
        "{what}: expected exit 1 or 2, got {:?}\nstderr:\n{}",
        run.code,
        run.stderr
    );
    assert!(
        !run.stderr.contains("panicked") && !run.stderr.contains("stack backtrace"),
        "{what}: panicked instead of a clear error:\n{}",
        run.stderr
    );
    for n in needles {
        assert!(
            run.stderr.contains(n),
            "{what}: stderr does not mention `{n}`:\n{}",
            run.stderr
        );
    }
}

fn greedy_flags(max_tokens: &str) -> Vec<&str> {
    vec![
        "--temperature",
        "0",
        "--ignore-eos",
        "--max-tokens",
        max_tokens,
    ]
}

/// --output json: one document with `outputs` (one per prompt, with the prompt's token ids and
/// each completion) and a `summary` whose counts add up.
#[test]
fn json_output_has_outputs_and_summary() {
    let reference = TinyReference::load("llama3");
    let (p1, p3) = (&reference.prompts[1], &reference.prompts[3]);
    let mut args = vec![
        "--prompt", &p1.text, "--prompt", &p3.text, "--output", "json",
    ];
    args.extend(greedy_flags("8"));
    let doc = json_stdout(
        &generate(&tiny_model("llama3"), &args),
        "generate --output json",
    );
    let outputs = doc["outputs"].as_array().expect("`outputs` array");
    assert_eq!(outputs.len(), 2);
    for (o, p) in outputs.iter().zip([p1, p3]) {
        assert_eq!(
            ids(&o["prompt_token_ids"]),
            p.prompt_ids,
            "tokenization of {:?}",
            p.text
        );
        let seqs = o["outputs"].as_array().expect("per-prompt `outputs`");
        assert_eq!(seqs.len(), 1);
        let c = &seqs[0];
        assert_eq!(ids(&c["token_ids"]).len(), 8);
        if !on_cuda() {
            assert_eq!(
                ids(&c["token_ids"]),
                p.greedy_ids[..8],
                "greedy tokens of {:?}",
                p.text
            );
        }
        assert_eq!(c["finish_reason"], "length");
        assert!(c["text"].is_string(), "completion text: {c}");
        assert!(o["latency_s"].as_f64().is_some_and(|t| t > 0.0));
    }
    let s = &doc["summary"];
    assert_eq!(s["requests"], 2);
    assert_eq!(
        s["prompt_tokens"],
        (p1.prompt_ids.len() + p3.prompt_ids.len()) as u64
    );
    assert_eq!(s["generated_tokens"], 16);
    assert!(
        s["elapsed_s"].as_f64().is_some_and(|t| t > 0.0),
        "summary: {s}"
    );
    assert!(
        s["tokens_per_s"].as_f64().is_some_and(|t| t > 0.0),
        "summary: {s}"
    );
}

/// --prompts-file takes each JSONL shape (a string, {"prompt"}, {"messages"},
/// {"prompt_token_ids"}), skips blank lines, and comes after the --prompt flags.
#[test]
fn prompts_file_accepts_every_line_shape() {
    let reference = TinyReference::load("llama3");
    let p = &reference.prompts;
    assert_eq!(p[2].kind, "chat");
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("prompts.jsonl");
    let lines = [
        serde_json::to_string(&p[1].text).expect("json"),
        String::new(),
        serde_json::json!({ "prompt": p[0].text }).to_string(),
        serde_json::json!({ "messages": p[2].messages }).to_string(),
        serde_json::json!({ "prompt_token_ids": p[3].prompt_ids }).to_string(),
    ];
    std::fs::write(&file, lines.join("\n") + "\n").expect("writing prompts file");
    let mut args = vec![
        "--prompt",
        &p[3].text,
        "--prompts-file",
        file.to_str().expect("UTF-8"),
        "--output",
        "json",
    ];
    args.extend(greedy_flags("4"));
    let doc = json_stdout(
        &generate(&tiny_model("llama3"), &args),
        "generate --prompts-file",
    );
    let outputs = doc["outputs"].as_array().expect("`outputs` array");
    let want = [&p[3], &p[1], &p[0], &p[2], &p[3]];
    assert_eq!(
        outputs.len(),
        want.len(),
        "one output per --prompt and per non-blank line"
    );
    for (i, (o, w)) in outputs.iter().zip(want).enumerate() {
        assert_eq!(
            ids(&o["prompt_token_ids"]),
            w.prompt_ids,
            "prompt {i} ({:?})",
            w.text
        );
        if !on_cuda() {
            assert_eq!(
                ids(&o["outputs"][0]["token_ids"]),
                w.greedy_ids[..4],
                "prompt {i}"
            );
        }
    }
    assert_eq!(doc["summary"]["requests"], 5);
}

/// --chat renders SmolLM2's chat template: the same prompt ids as transformers, and the
/// answer the reference gives, ending at EOS.
#[test]
fn chat_flag_applies_the_model_template() {
    let reference = smollm2_reference();
    let chat = reference
        .iter()
        .find(|p| p.name == "chat")
        .expect("chat prompt");
    let question = chat
        .messages
        .as_ref()
        .and_then(|m| m[0]["content"].as_str())
        .expect("a user message");
    let args = [
        "--chat",
        "--prompt",
        question,
        "--temperature",
        "0",
        "--max-tokens",
        "40",
        "--output",
        "json",
    ];
    let doc = json_stdout(&generate(&smollm2_gguf(), &args), "generate --chat");
    let o = &doc["outputs"][0];
    assert_eq!(
        ids(&o["prompt_token_ids"]),
        chat.prompt_ids,
        "the chat template's tokens"
    );
    let c = &o["outputs"][0];
    let text = c["text"].as_str().expect("text");
    assert!(text.contains("Paris"), "answer: {text:?}");
    assert_eq!(c["finish_reason"], "stop", "the answer ends at EOS");
    if !on_cuda() {
        let eos = chat
            .greedy_ids
            .iter()
            .position(|&t| t == 2)
            .expect("EOS in the reference");
        assert_eq!(ids(&c["token_ids"]), chat.greedy_ids[..=eos]);
        assert_eq!(text, "The capital of France is Paris.");
    }
}

/// Text output: one `[i]` (or `[i.j]` with n > 1) line per completion, then the summary line
/// `requests: R, prompt tokens: P, generated tokens: G, time: T s, throughput: X tok/s (Y
/// generated tok/s)` with the right counts.
#[test]
fn text_output_lines_and_summary() {
    let reference = TinyReference::load("llama3");
    let (p0, p1) = (&reference.prompts[0], &reference.prompts[1]);
    let args = [
        "--prompt",
        &p0.text,
        "--prompt",
        &p1.text,
        "--n",
        "2",
        "--seed",
        "1",
        "--ignore-eos",
        "--max-tokens",
        "3",
    ];
    let run = generate(&tiny_model("llama3"), &args);
    ok(&run, "generate (text)");
    for tag in ["[0.0] ", "[0.1] ", "[1.0] ", "[1.1] "] {
        assert!(
            run.stdout.lines().any(|l| l.starts_with(tag)),
            "no `{tag}` line in:\n{}",
            run.stdout
        );
    }
    let summary = run.stdout.lines().last().expect("a summary line");
    let fields = parse_summary(summary);
    let prompt_tokens = p0.prompt_ids.len() + p1.prompt_ids.len();
    assert_eq!(fields[0], ("requests".into(), "2".into()), "{summary}");
    assert_eq!(
        fields[1],
        ("prompt tokens".into(), prompt_tokens.to_string()),
        "{summary}"
    );
    assert_eq!(
        fields[2],
        ("generated tokens".into(), "12".into()),
        "2 prompts x n=2 x 3: {summary}"
    );
    assert_eq!(fields[3].0, "time");
    let secs = fields[3]
        .1
        .strip_suffix(" s")
        .and_then(|t| t.parse::<f64>().ok());
    assert!(secs.is_some_and(|t| t >= 0.0), "time field: {summary}");
    assert_eq!(fields[4].0, "throughput");
    let (tps, rest) = fields[4]
        .1
        .split_once(" tok/s (")
        .unwrap_or_else(|| panic!("throughput: {summary}"));
    assert!(tps.parse::<f64>().is_ok_and(|t| t > 0.0), "{summary}");
    let gen = rest
        .strip_suffix(" generated tok/s)")
        .and_then(|g| g.parse::<f64>().ok());
    assert!(gen.is_some_and(|g| g > 0.0), "{summary}");
}

/// `a: 1, b c: 2` -> [("a", "1"), ("b c", "2")], split on the ", " before each name.
fn parse_summary(line: &str) -> Vec<(String, String)> {
    let names = [
        "requests",
        "prompt tokens",
        "generated tokens",
        "time",
        "throughput",
    ];
    let mut out = Vec::new();
    let mut rest = line;
    for (i, name) in names.iter().enumerate() {
        let after = rest
            .strip_prefix(&format!("{name}: "))
            .unwrap_or_else(|| panic!("summary line lacks `{name}: ` where expected: {line:?}"));
        let value = match names.get(i + 1) {
            Some(next) => {
                let (v, _) = after
                    .split_once(&format!(", {next}: "))
                    .unwrap_or_else(|| panic!("summary line lacks `{next}`: {line:?}"));
                rest = &after[v.len() + 2..];
                v
            }
            None => after,
        };
        out.push((name.to_string(), value.to_string()));
    }
    out
}

/// Bad flags, files and values: exit 1 or 2 with a message naming what is wrong.
#[test]
fn bad_input_fails_with_a_clear_message() {
    let tiny = tiny_model("llama3");
    let model = tiny.to_str().expect("UTF-8");
    let dir = tempfile::tempdir().expect("temp dir");
    let bad_line = dir.path().join("bad.jsonl");
    std::fs::write(&bad_line, "\"fine\"\n{\"promt\": 3}\n").expect("write");
    let bad_line = bad_line.to_str().expect("UTF-8").to_string();
    let missing_file = dir
        .path()
        .join("missing.jsonl")
        .to_str()
        .expect("UTF-8")
        .to_string();
    let bad_line_2 = format!("{bad_line}:2");
    let long_prompt = "word ".repeat(40);
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            vec!["--prompt", "x", "--temperature", "abc"],
            vec!["--temperature", "abc"],
        ),
        (vec!["--prompt", "x", "--bogus-flag"], vec!["--bogus-flag"]),
        (
            vec!["--prompt", "x", "--output", "yaml"],
            vec!["--output", "yaml"],
        ),
        (vec![], vec!["--prompt", "--prompts-file"]),
        (vec!["--prompts-file", &missing_file], vec![&missing_file]),
        (vec!["--prompts-file", &bad_line], vec![&bad_line_2]),
        (vec!["--prompt", "x", "--top-p", "2"], vec!["top_p"]),
        // `=`: clap takes a bare `-1` after --temperature for a flag (see the report).
        (
            vec!["--prompt", "x", "--temperature=-1"],
            vec!["temperature"],
        ),
        (
            vec!["--prompt", &long_prompt, "--max-model-len", "16"],
            vec!["max-model-len", "16"],
        ),
        (
            vec![
                "--prompt",
                "x",
                "--max-model-len",
                "32",
                "--max-tokens",
                "100",
            ],
            vec!["max_tokens"],
        ),
        (
            vec!["--prompt", "x", "--load-format", "pickle"],
            vec!["--load-format", "pickle"],
        ),
    ];
    for (args, needles) in &cases {
        let run = generate(&tiny, args);
        fails_clearly(
            &run,
            &format!("generate --model {model} {}", args.join(" ")),
            needles,
        );
    }
    let missing_model = dir.path().join("nope.gguf");
    let missing_model = missing_model.to_str().expect("UTF-8");
    let run = generate(Path::new(missing_model), &["--prompt", "x"]);
    fails_clearly(&run, "a model file that does not exist", &[missing_model]);
    let run = rvllm(&[
        "generate", "--model", model, "--device", "tpu", "--prompt", "x",
    ]);
    fails_clearly(&run, "--device tpu", &["--device", "tpu"]);
    let run = rvllm(&[
        "generate",
        "--model",
        model,
        "--prompt",
        "x",
        "--chat",
        "--chat-template",
        &missing_file,
    ]);
    fails_clearly(&run, "a missing --chat-template", &[&missing_file]);
}

/// `--device cuda` on a build without the CUDA backend says how to rebuild; with the backend,
/// it runs when the tests run on the GPU and otherwise fails cleanly or runs.
#[test]
fn device_cuda_without_the_backend_says_how_to_rebuild() {
    let has_cuda = binary_backends(bin()).iter().any(|b| b == "cuda");
    let tiny = tiny_model("llama3");
    let args = [
        "generate",
        "--model",
        tiny.to_str().expect("UTF-8"),
        "--device",
        "cuda",
        "--prompt",
        "x",
        "--max-tokens",
        "2",
    ];
    let run = rvllm(&args);
    if !has_cuda {
        fails_clearly(
            &run,
            "--device cuda on a CPU-only build",
            &["CUDA", "rebuild", "--target-device cuda"],
        );
    } else if on_cuda() {
        ok(&run, "--device cuda on the GPU");
    } else if run.code != Some(0) {
        fails_clearly(
            &run,
            "--device cuda on a CUDA build without a usable GPU",
            &[],
        );
        assert!(
            run.stderr.to_lowercase().contains("cuda"),
            "the error names CUDA:\n{}",
            run.stderr
        );
    }
}

/// The prompt ids the CLI sends for the SmolLM2 reference's plain prompts match
/// transformers' tokenizer (spot-check across scripts: English, code, Chinese, numerals).
#[test]
fn plain_prompts_tokenize_like_transformers() {
    let reference = smollm2_reference();
    let plain: Vec<_> = reference.iter().filter(|p| !p.chat).collect();
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("p.jsonl");
    let lines: Vec<String> = plain
        .iter()
        .map(|p| serde_json::json!({ "prompt": p.prompt }).to_string())
        .collect();
    std::fs::write(&file, lines.join("\n")).expect("write");
    let args = [
        "--prompts-file",
        file.to_str().expect("UTF-8"),
        "--max-tokens",
        "1",
        "--output",
        "json",
    ];
    let doc = json_stdout(&generate(&smollm2_gguf(), &args), "SmolLM2 prompts file");
    for (o, p) in doc["outputs"]
        .as_array()
        .expect("outputs")
        .iter()
        .zip(&plain)
    {
        assert_eq!(
            ids(&o["prompt_token_ids"]),
            p.prompt_ids,
            "{}: tokenization",
            p.name
        );
    }
}
