//! Reasoning models and the chat template's inputs, through `rvllm serve`: `--reasoning-parser`
//! (vLLM's deepseek_r1 and qwen3) puts the thinking in `reasoning_content`, whole and
//! streamed; `chat_template_kwargs`, `reasoning_effort`, `documents` and the history's tool
//! calls, tool results and reasoning reach the template; fields rvllm does not serve get a
//! 400 naming them. The tiny fixture runs fast; SmolLM2 runs the real `openai` client
//! (tests/python/test_openai_reasoning.py).
mod server_common;

use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};
use server_common::{idle_and_no_leak, rvllm_bin, smollm2_gguf, tiny_model, Server};

#[test]
fn an_unknown_reasoning_parser_stops_start_up_naming_the_known_ones() {
    let out = Command::new(rvllm_bin())
        .arg("serve")
        .arg(tiny_model())
        .args([
            "--device",
            "cpu",
            "--port",
            "0",
            "--reasoning-parser",
            "granite",
        ])
        .output()
        .expect("running rvllm serve");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`granite`") && err.contains("deepseek_r1, qwen3"),
        "{err}"
    );
}

/// A message's text: (reasoning_content, content), each None when absent.
type Parts = (Option<String>, Option<String>);

/// The non-streamed message and the streamed deltas of one chat request, joined.
fn whole_and_streamed(s: &Server, body: &Value) -> (Parts, Parts) {
    let r = s.post_json("/v1/chat/completions", body);
    assert_eq!(r.status, 200, "{}", r.text());
    let m = &r.json()["choices"][0]["message"];
    assert_eq!(m["reasoning"], m["reasoning_content"], "{m}");
    let whole = (
        m["reasoning_content"].as_str().map(String::from),
        m["content"].as_str().map(String::from),
    );
    let mut streamed_body = body.clone();
    streamed_body["stream"] = json!(true);
    let r = s.post_json("/v1/chat/completions", &streamed_body);
    assert_eq!(r.status, 200, "{}", r.text());
    let (mut reasoning, mut content) = (None::<String>, None::<String>);
    for ev in r.sse_events() {
        if ev == "[DONE]" {
            continue;
        }
        let v: Value = serde_json::from_str(&ev).unwrap();
        let d = &v["choices"][0]["delta"];
        assert_eq!(d["reasoning"], d["reasoning_content"], "{d}");
        if let Some(t) = d["reasoning_content"].as_str() {
            reasoning.get_or_insert_with(String::new).push_str(t);
        }
        // The role chunk's empty content says nothing.
        if let Some(t) = d["content"].as_str().filter(|t| !t.is_empty()) {
            content.get_or_insert_with(String::new).push_str(t);
        }
    }
    (whole, (reasoning, content))
}

#[test]
fn reasoning_parsers_split_thinking_from_content_whole_and_streamed() {
    let s = Server::start(&tiny_model(), &["--reasoning-parser", "deepseek_r1"], &[]);
    // The assistant's turn is continued from a prefix that thought and began answering;
    // echo sends that prefix back through the parser with the generated text.
    let body = json!({
        "messages": [{"role": "user", "content": "2+2?"},
                     {"role": "assistant", "content": "<think>Add them.</think>It is"}],
        "add_generation_prompt": false, "continue_final_message": true, "echo": true,
        "max_tokens": 6, "temperature": 0, "ignore_eos": true,
    });
    let (whole, streamed) = whole_and_streamed(&s, &body);
    assert_eq!(whole.0.as_deref(), Some("Add them."));
    assert!(
        whole.1.as_deref().unwrap().starts_with("It is"),
        "{whole:?}"
    );
    assert_eq!(whole, streamed);
    // Without a closing tag the whole output is thinking: content is null.
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
                      "temperature": 0, "ignore_eos": true});
    let (whole, streamed) = whole_and_streamed(&s, &body);
    assert!(
        whole.0.as_deref().is_some_and(|r| !r.is_empty()),
        "{whole:?}"
    );
    assert_eq!(whole.1, None);
    assert_eq!(whole, streamed);
    s.wait_metrics(
        std::time::Duration::from_secs(10),
        "an idle engine",
        idle_and_no_leak,
    );

    let q = Server::start(&tiny_model(), &["--reasoning-parser", "qwen3"], &[]);
    let mut body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
                          "temperature": 0, "ignore_eos": true});
    let (thinking, _) = whole_and_streamed(&q, &body);
    body["chat_template_kwargs"] = json!({"enable_thinking": false});
    let (off, off_streamed) = whole_and_streamed(&q, &body);
    assert_eq!(off.0, None, "thinking off: no reasoning");
    assert_eq!(off.1, thinking.0, "the same greedy text, now as content");
    assert_eq!(off, off_streamed);
}

/// Token ids of `text` with no special tokens added.
fn tokens(s: &Server, text: &str) -> Value {
    let r = s.post_json(
        "/tokenize",
        &json!({"prompt": text, "add_special_tokens": false}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["tokens"].clone()
}

#[test]
fn template_variables_and_history_reach_the_chat_template() {
    let s = Server::start(&tiny_model(), &["--trust-request-chat-template"], &[]);
    let template = "{% if enable_thinking is false %}off{% endif %}|{{ reasoning_effort }}|{{ documents[0].title }}|\
        {% for m in messages %}{{ m.role }}:{{ m.content }}\
        {% if m.reasoning_content %}[think:{{ m.reasoning_content }}]{% endif %}\
        {% for c in m.tool_calls or [] %}[call {{ c.function.name }} {{ c.function.arguments | tojson }}]{% endfor %}\
        {% if m.tool_call_id %}[result of {{ m.tool_call_id }}]{% endif %};{% endfor %}";
    let messages = json!([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": null, "reasoning_content": "Ask the tool.",
         "tool_calls": [{"id": "c1", "type": "function",
                         "function": {"name": "weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "21C"},
    ]);
    let want = tokens(
        &s,
        "off|low|Doc|user:Weather in Paris?;assistant:[think:Ask the tool.]\
         [call weather {\"city\": \"Paris\"}];tool:21C[result of c1];",
    );
    let r = s.post_json(
        "/tokenize",
        &json!({"messages": messages, "chat_template": template, "add_generation_prompt": false,
                "chat_template_kwargs": {"enable_thinking": false, "reasoning_effort": "low",
                                         "documents": [{"title": "Doc"}]}}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["tokens"], want);
    // The chat route renders the same prompt from the request's own fields.
    let r = s.post_json(
        "/v1/chat/completions",
        &json!({"messages": messages, "chat_template": template, "add_generation_prompt": false,
                "chat_template_kwargs": {"enable_thinking": false}, "reasoning_effort": "low",
                "documents": [{"title": "Doc"}], "max_tokens": 1, "request_id": "abc"}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["usage"]["prompt_tokens"], want.as_array().unwrap().len());
    assert_eq!(v["id"], "chatcmpl-abc");
    // What the server sets itself cannot come in as a template variable.
    let e = s
        .post_json(
            "/v1/chat/completions",
            &json!({"messages": messages, "chat_template_kwargs": {"messages": []}}),
        )
        .expect_error(400);
    assert_eq!(e["param"], "chat_template_kwargs.messages", "{e}");
}

#[test]
fn fields_rvllm_does_not_serve_get_a_400_naming_them() {
    let s = Server::start(&tiny_model(), &[], &[]);
    for (field, value) in [
        ("spaces_between_special_tokens", json!(false)),
        ("priority", json!(3)),
        ("cache_salt", json!("tenant-1")),
        ("guided_decoding_backend", json!("xgrammar")),
        ("length_penalty", json!(0.5)),
        ("web_search_options", json!({})),
    ] {
        let mut body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1});
        body[field] = value;
        let e = s.post_json("/v1/chat/completions", &body).expect_error(400);
        assert_eq!(e["param"], field, "{e}");
        assert!(e["message"].as_str().unwrap().contains(field), "{e}");
    }
}

/// Greedy chat text of `rvllm generate --chat` for one user message.
fn generate_chat(model: &Path, message: &str, max_tokens: usize) -> String {
    let out = Command::new(rvllm_bin())
        .args([
            "generate",
            "--device",
            "cpu",
            "--disable-progress",
            "--temperature",
            "0",
        ])
        .args([
            "--output",
            "json",
            "--chat",
            "--max-tokens",
            &max_tokens.to_string(),
        ])
        .arg("--model")
        .arg(model)
        .args(["--prompt", message])
        .output()
        .expect("running rvllm generate");
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

#[test]
fn openai_client_reads_reasoning_content_from_smollm2() {
    let model = smollm2_gguf();
    let message = "Name three colors of the rainbow.";
    let max_tokens = 12;
    let expect = json!({"message": message, "max_tokens": max_tokens,
                        "text": generate_chat(&model, message, max_tokens)});
    let s = Server::start(
        &model,
        &[
            "--served-model-name",
            "smollm2",
            "--max-model-len",
            "2048",
            "--cpu-kv-cache-gb",
            "0.5",
            "--reasoning-parser",
            "deepseek_r1",
        ],
        &[],
    );
    server_common::run_openai_unittest(
        &s,
        &[server_common::python_script("test_openai_reasoning.py")],
        &[
            ("RVLLM_BASE_URL", format!("http://{}/v1", s.addr)),
            ("RVLLM_MODEL", "smollm2".into()),
            ("RVLLM_EXPECT", expect.to_string()),
        ],
    );
}
