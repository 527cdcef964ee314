//! Tool calling through `rvllm serve`, as vLLM serves it: `--enable-auto-tool-choice
//! --tool-call-parser NAME`; `tools` reach the chat template; `tool_choice` auto (calls
//! read by the parser), required and named (the output constrained to calls by a JSON
//! schema); message `tool_calls` and stream deltas that add up to them; finish reasons;
//! the refusals. The tiny fixture checks the wiring with calls echoed through the parser;
//! SmolLM2 makes real calls (a Hermes-style template and a few worked examples get it to
//! call on its own), and the real `openai` client runs a round trip
//! (tests/python/test_openai_tools.py).
mod server_common;

use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};
use server_common::{idle_and_no_leak, rvllm_bin, smollm2_gguf, tiny_model, Server};

fn start_up_error(args: &[&str]) -> String {
    let out = Command::new(rvllm_bin())
        .arg("serve")
        .arg(tiny_model())
        .args(["--device", "cpu", "--port", "0"])
        .args(args)
        .output()
        .expect("running rvllm serve");
    assert!(!out.status.success(), "{args:?} started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_tool_flags_stop_start_up_saying_why() {
    let e = start_up_error(&["--enable-auto-tool-choice", "--tool-call-parser", "granite"]);
    assert!(
        e.contains("`granite`") && e.contains("hermes, llama3_json, mistral, pythonic"),
        "{e}"
    );
    let e = start_up_error(&["--enable-auto-tool-choice"]);
    assert!(e.contains("requires --tool-call-parser"), "{e}");
}

const WEATHER: &str = r#"[{"type": "function", "function": {"name": "get_weather",
    "description": "Get the current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"], "additionalProperties": false}}},
  {"type": "function", "function": {"name": "get_time", "description": "The time now"}}]"#;

fn tools() -> Value {
    serde_json::from_str(WEATHER).unwrap()
}

/// A choice read back: content, calls as (name, arguments), finish reason.
type Read = (Option<String>, Vec<(String, String)>, String);

fn check_id(id: &Value) {
    let id = id.as_str().unwrap_or_else(|| panic!("no call id: {id}"));
    assert!(
        id.strip_prefix("chatcmpl-tool-")
            .is_some_and(|h| h.len() == 32 && h.chars().all(|c| c.is_ascii_hexdigit())),
        "{id}"
    );
}

/// The request whole, and streamed with its deltas joined as a client joins them.
fn whole_and_streamed(s: &Server, body: &Value) -> (Read, Read) {
    let r = s.post_json("/v1/chat/completions", body);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let c = &v["choices"][0];
    let calls = c["message"]["tool_calls"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|t| {
                    check_id(&t["id"]);
                    assert_eq!(t["type"], "function", "{t}");
                    let f = &t["function"];
                    (
                        f["name"].as_str().unwrap().to_string(),
                        f["arguments"].as_str().unwrap().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let whole = (
        c["message"]["content"].as_str().map(String::from),
        calls,
        c["finish_reason"].as_str().unwrap().to_string(),
    );
    let mut body = body.clone();
    body["stream"] = json!(true);
    let r = s.post_json("/v1/chat/completions", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let (mut content, mut calls, mut finish) =
        (None::<String>, Vec::<(String, String)>::new(), None);
    for ev in r.sse_events() {
        if ev == "[DONE]" {
            continue;
        }
        let v: Value = serde_json::from_str(&ev).unwrap();
        let c = &v["choices"][0];
        if let Some(t) = c["delta"]["content"].as_str().filter(|t| !t.is_empty()) {
            content.get_or_insert_with(String::new).push_str(t);
        }
        for t in c["delta"]["tool_calls"].as_array().into_iter().flatten() {
            let i = t["index"].as_u64().unwrap() as usize;
            if i == calls.len() {
                // A call's first piece carries its id, type and name.
                check_id(&t["id"]);
                assert_eq!(t["type"], "function", "{t}");
                calls.push((
                    t["function"]["name"].as_str().unwrap().into(),
                    String::new(),
                ));
            } else {
                assert!(t.get("id").is_none() && i < calls.len(), "{t}");
            }
            calls[i].1 += t["function"]["arguments"].as_str().unwrap();
        }
        if let Some(f) = c["finish_reason"].as_str() {
            finish = Some(f.to_string());
        }
    }
    (whole, (content, calls, finish.expect("a finish reason")))
}

#[test]
fn without_the_flags_auto_is_refused_and_tools_reach_the_template() {
    let s = Server::start(&tiny_model(), &["--trust-request-chat-template"], &[]);
    let msgs = json!([{"role": "user", "content": "hi"}]);
    // tool_choice defaults to auto when tools are given: vLLM's 400.
    for choice in [None, Some(json!("auto"))] {
        let mut body = json!({"messages": msgs, "tools": tools(), "max_tokens": 1});
        if let Some(c) = choice {
            body["tool_choice"] = c;
        }
        let e = s.post_json("/v1/chat/completions", &body).expect_error(400);
        assert_eq!(e["param"], "tool_choice", "{e}");
        let m = e["message"].as_str().unwrap();
        assert!(
            m.contains("--enable-auto-tool-choice") && m.contains("--tool-call-parser"),
            "{e}"
        );
    }
    for (body, param) in [
        (
            json!({"messages": msgs, "tool_choice": "required"}),
            "tool_choice",
        ),
        (
            json!({"messages": msgs, "tools": tools(),
                   "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
            "tool_choice",
        ),
        (
            json!({"messages": msgs, "tools": [{"type": "code_interpreter"}]}),
            "tools[0].type",
        ),
        (
            json!({"messages": msgs, "functions": [{"name": "f"}]}),
            "functions",
        ),
    ] {
        let e = s.post_json("/v1/chat/completions", &body).expect_error(400);
        assert_eq!(e["param"], param, "{e}");
    }
    // tool_choice none: plain content, and the tools still reach the template.
    let template = "{% for t in tools %}[{{ t.function.name }}]{% endfor %}\
                    {% for m in messages %}{{ m.content }}{% endfor %}";
    let want = s.post_json(
        "/tokenize",
        &json!({"prompt": "[get_weather][get_time]hi", "add_special_tokens": false}),
    );
    let want = want.json()["tokens"].as_array().unwrap().len();
    let body = json!({"messages": msgs, "tools": tools(), "tool_choice": "none",
                      "chat_template": template, "max_tokens": 3, "temperature": 0,
                      "ignore_eos": true});
    let (whole, streamed) = whole_and_streamed(&s, &body);
    assert!(whole.0.is_some() && whole.1.is_empty(), "{whole:?}");
    assert_eq!(whole, streamed);
    let r = s.post_json("/v1/chat/completions", &body).json();
    assert_eq!(r["usage"]["prompt_tokens"], want, "{r}");
}

#[test]
fn auto_calls_are_read_by_the_parser_whole_and_streamed() {
    let s = Server::start(
        &tiny_model(),
        &["--enable-auto-tool-choice", "--tool-call-parser", "hermes"],
        &[],
    );
    // The assistant's turn is continued from a prefix holding a call; echo sends it back
    // through the parser with what the (random-weight) model adds, which is content.
    let prefix = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n";
    let body = json!({
        "messages": [{"role": "user", "content": "Weather in Paris?"},
                     {"role": "assistant", "content": prefix}],
        "tools": tools(), "add_generation_prompt": false, "continue_final_message": true,
        "echo": true, "max_tokens": 5, "temperature": 0, "ignore_eos": true,
    });
    let (whole, streamed) = whole_and_streamed(&s, &body);
    assert_eq!(
        whole.1,
        vec![(
            "get_weather".to_string(),
            r#"{"city": "Paris"}"#.to_string()
        )]
    );
    assert!(
        whole
            .0
            .as_deref()
            .is_some_and(|c| c.starts_with("Let me check.")),
        "{whole:?}"
    );
    assert_eq!(
        whole.2, "length",
        "cut by max_tokens, not stopped after the call"
    );
    assert_eq!(whole, streamed);
    // The same echoed prefix under tool_choice none is all content.
    let mut none = body.clone();
    none["tool_choice"] = json!("none");
    let (whole, streamed) = whole_and_streamed(&s, &none);
    assert!(whole.1.is_empty() && whole.0.as_deref().unwrap().starts_with(prefix));
    assert_eq!(whole, streamed);
    s.wait_metrics(
        std::time::Duration::from_secs(10),
        "an idle engine",
        idle_and_no_leak,
    );
}

#[test]
fn reasoning_is_split_off_before_calls_are_read() {
    let s = Server::start(
        &tiny_model(),
        &[
            "--reasoning-parser",
            "deepseek_r1",
            "--enable-auto-tool-choice",
            "--tool-call-parser",
            "hermes",
        ],
        &[],
    );
    // A call written while thinking is thinking; the one after </think> is a call.
    let prefix = "<think>Maybe <tool_call>{\"name\": \"get_time\"}</tool_call>?</think>Checking.\n<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}</tool_call>";
    let body = json!({
        "messages": [{"role": "user", "content": "Weather in Paris?"},
                     {"role": "assistant", "content": prefix}],
        "tools": tools(), "add_generation_prompt": false, "continue_final_message": true,
        "echo": true, "max_tokens": 4, "temperature": 0, "ignore_eos": true,
    });
    let r = s.post_json("/v1/chat/completions", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let m = r.json()["choices"][0]["message"].clone();
    assert_eq!(
        m["reasoning_content"], "Maybe <tool_call>{\"name\": \"get_time\"}</tool_call>?",
        "{m}"
    );
    let (whole, streamed) = whole_and_streamed(&s, &body);
    assert_eq!(
        whole.1,
        vec![(
            "get_weather".to_string(),
            r#"{"city": "Paris"}"#.to_string()
        )]
    );
    assert!(
        whole.0.as_deref().unwrap().starts_with("Checking."),
        "{whole:?}"
    );
    assert_eq!(whole, streamed);
}

/// A Hermes-style chat template (the shape of Qwen2.5's): the tools in the system turn,
/// calls in `<tool_call>` tags, results in `<tool_response>` tags.
const HERMES_TEMPLATE: &str = r#"{%- if tools %}<|im_start|>system
You are a function calling AI model. You are provided with function signatures within <tools></tools> XML tags:
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>
For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m.role == "assistant" and m.tool_calls %}<|im_start|>assistant
{% for c in m.tool_calls %}<tool_call>
{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% elif m.role == "tool" %}<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"#;

/// SmolLM2 under the Hermes template, with the hermes parser.
fn smollm2_server(dir: &Path) -> Server {
    let template = dir.join("hermes.jinja");
    std::fs::write(&template, HERMES_TEMPLATE).unwrap();
    Server::start(
        &smollm2_gguf(),
        &[
            "--served-model-name",
            "smollm2",
            "--max-model-len",
            "2048",
            "--cpu-kv-cache-gb",
            "0.5",
            "--enable-auto-tool-choice",
            "--tool-call-parser",
            "hermes",
            "--chat-template",
            template.to_str().unwrap(),
        ],
        &[],
    )
}

/// A city in the arguments of a get_weather call.
fn city(args: &str) -> String {
    let v: Value = serde_json::from_str(args).unwrap_or_else(|e| panic!("{args}: {e}"));
    v["city"]
        .as_str()
        .unwrap_or_else(|| panic!("no city in {args}"))
        .to_string()
}

#[test]
fn smollm2_calls_tools_when_asked_to() {
    let dir = tempfile::tempdir().unwrap();
    let s = smollm2_server(dir.path());
    let ask = json!([{"role": "user", "content": "What is the weather in Paris?"}]);
    let base = json!({"messages": ask, "tools": tools(), "temperature": 0, "max_tokens": 60});

    // required: a JSON array of calls, constrained by vLLM's schema.
    let mut body = base.clone();
    body["tool_choice"] = json!("required");
    let (whole, streamed) = whole_and_streamed(&s, &body);
    assert_eq!(whole, streamed);
    assert_eq!(whole.0, None, "only calls: content is null");
    assert!(!whole.1.is_empty());
    for (name, args) in &whole.1 {
        assert!(name == "get_weather" || name == "get_time", "{name}");
        if name == "get_weather" {
            city(args);
        } else {
            assert!(serde_json::from_str::<Value>(args).unwrap().is_object());
        }
    }
    assert_eq!(whole.2, "tool_calls");
    body["parallel_tool_calls"] = json!(false);
    let (one, _) = whole_and_streamed(&s, &body);
    assert_eq!(one.1.len(), 1, "{one:?}");

    // named: that function's arguments; OpenAI's finish reason stays "stop".
    let mut body = base.clone();
    body["tool_choice"] = json!({"type": "function", "function": {"name": "get_weather"}});
    let (whole, streamed) = whole_and_streamed(&s, &body);
    assert_eq!(whole, streamed);
    assert_eq!(whole.1.len(), 1);
    assert_eq!(whole.1[0].0, "get_weather");
    assert_eq!(city(&whole.1[0].1), "Paris");
    assert_eq!((whole.0.as_deref(), whole.2.as_str()), (None, "stop"));

    // auto: after a few worked examples SmolLM2 writes a <tool_call> itself.
    let mut body = base.clone();
    body["messages"] = few_shot("Paris");
    let (whole, streamed) = whole_and_streamed(&s, &body);
    assert_eq!(whole, streamed);
    assert_eq!(whole.1.len(), 1, "{whole:?}");
    assert_eq!(whole.1[0].0, "get_weather");
    assert_eq!(city(&whole.1[0].1), "Paris");
    assert_eq!((whole.0.as_deref(), whole.2.as_str()), (None, "tool_calls"));
}

/// Three worked weather questions (call, result, answer), then one about `city`.
fn few_shot(city: &str) -> Value {
    let mut msgs = Vec::new();
    for (c, w) in [
        ("London", "12 C, rain"),
        ("Berlin", "8 C, cloudy"),
        ("Rome", "25 C, sunny"),
    ] {
        msgs.push(json!({"role": "user", "content": format!("What is the weather in {c}?")}));
        msgs.push(json!({"role": "assistant", "content": null, "tool_calls": [
            {"id": format!("call{c}"), "type": "function", "function": {
                "name": "get_weather", "arguments": format!("{{\"city\": \"{c}\"}}")}}]}));
        msgs.push(json!({"role": "tool", "tool_call_id": format!("call{c}"), "content": w}));
        msgs.push(json!({"role": "assistant", "content": format!("It is {w} in {c}.")}));
    }
    msgs.push(json!({"role": "user", "content": format!("What is the weather in {city}?")}));
    Value::Array(msgs)
}

#[test]
fn openai_client_round_trips_tool_calls_with_smollm2() {
    let dir = tempfile::tempdir().unwrap();
    let s = smollm2_server(dir.path());
    server_common::run_openai_unittest(
        &s,
        &[server_common::python_script("test_openai_tools.py")],
        &[
            ("RVLLM_BASE_URL", format!("http://{}/v1", s.addr)),
            ("RVLLM_MODEL", "smollm2".into()),
            ("RVLLM_TOOLS", WEATHER.to_string()),
            ("RVLLM_FEW_SHOT", few_shot("Paris").to_string()),
        ],
    );
}
