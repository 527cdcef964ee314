//! `rvllm serve` with SmolLM2-135M-Instruct (GGUF) against the real `openai` Python client
//! (tests/python/test_openai_client.py): completions and chat, streamed and not, n=2,
//! logprobs, stop strings, echo, errors; greedy outputs must equal `rvllm generate`'s.
mod server_common;

use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};
use server_common::{idle_and_no_leak, rvllm_bin, smollm2_gguf, Server};

const MAX_TOKENS: usize = 16;
const PROMPT: &str = "The capital of France is";
const CHAT_MESSAGE: &str = "Name three colors of the rainbow.";

/// Greedy text of `rvllm generate` for one prompt (with --chat: as one user message).
fn generate(model: &Path, prompt: &str, chat: bool) -> String {
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
    .args(["--max-tokens", &MAX_TOKENS.to_string(), "--prompt", prompt]);
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
    v["outputs"][0]["outputs"][0]["text"]
        .as_str()
        .expect("generated text")
        .to_string()
}

/// A Python that can `import openai`: $RVLLM_PYTHON, else python3 from PATH.
fn python_with_openai() -> String {
    let py = std::env::var("RVLLM_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&py).args(["-c", "import openai"]).output();
    match ok {
        Ok(o) if o.status.success() => py,
        Ok(o) => panic!(
            "`{py}` cannot import the openai package ({}): `pip install openai`, or set RVLLM_PYTHON to a Python \
             that has it",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => panic!("cannot run `{py}` ({e}): install Python 3 with `pip install openai`, or set RVLLM_PYTHON"),
    }
}

#[test]
fn openai_python_client_against_smollm2() {
    let python = python_with_openai();
    let model = smollm2_gguf();
    let expect = json!({
        "max_tokens": MAX_TOKENS,
        "completion": {"prompt": PROMPT, "text": generate(&model, PROMPT, false)},
        "chat": {"message": CHAT_MESSAGE, "text": generate(&model, CHAT_MESSAGE, true)},
    });
    let s = Server::start(
        &model,
        &["--served-model-name", "smollm2", "--max-model-len", "2048"],
        &[],
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("python")
        .join("test_openai_client.py");
    let out = Command::new(&python)
        .arg(&script)
        .env("RVLLM_BASE_URL", format!("http://{}/v1", s.addr))
        .env("RVLLM_MODEL", "smollm2")
        .env("RVLLM_EXPECT", expect.to_string())
        .output()
        .expect("running the python test");
    let report = format!(
        "{}{}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        s.log()
    );
    assert!(
        out.status.success(),
        "the openai client tests failed:\n{report}"
    );
    assert!(
        report.contains("\nOK"),
        "unittest did not report OK:\n{report}"
    );
    // Everything the client did is finished and freed.
    s.wait_metrics(
        std::time::Duration::from_secs(10),
        "an idle engine",
        idle_and_no_leak,
    );
}
