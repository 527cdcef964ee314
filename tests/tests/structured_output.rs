//! Structured output on SmolLM2 (CPU), end to end through `Llm`: every schema of
//! tests/fixtures/json_schemas gives a document that a JSON-schema validator accepts, in one
//! batched engine run; `choice` and `regex` outputs always match, sampled with seeds, with
//! `n > 1`, logprobs, stop strings, and under preemption (where the seeded outputs must equal
//! those of a run without it).
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, OnceLock};

use rvllm::engine::{FinishReason, Llm, RequestOutput};
use rvllm::sampling::{SamplingParams, StructuredOutput};
use rvllm::tokenizer::ChatMessage;
use rvllm_tests::{engine_args, fixtures, smollm2_gguf};
use serde_json::Value;

/// Tokens any output of a suite schema fits in (the schemas are bounded; gen.py).
const SCHEMA_MAX_TOKENS: usize = 256;

fn smollm2() -> MutexGuard<'static, Llm> {
    static LLM: OnceLock<Mutex<Llm>> = OnceLock::new();
    LLM.get_or_init(|| Mutex::new(load(None)))
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

fn load(num_kv_blocks: Option<usize>) -> Llm {
    let mut args = engine_args(&smollm2_gguf());
    args.num_kv_blocks = num_kv_blocks;
    Llm::new(&args).unwrap_or_else(|e| panic!("loading SmolLM2: {e:#}"))
}

/// The chat prompt of one user message, as token ids.
fn chat_prompt(llm: &Llm, user: &str) -> Vec<u32> {
    let tok = llm.tokenizer().expect("SmolLM2 has a tokenizer");
    let text = tok
        .apply_chat_template(&[ChatMessage::new("user", user)], true, None)
        .expect("chat template");
    tok.encode(&text, false).expect("tokenize")
}

fn run(llm: &mut Llm, prompts: &[Vec<u32>], params: &[SamplingParams]) -> Vec<RequestOutput> {
    llm.generate(prompts, params, |_| {})
        .unwrap_or_else(|e| panic!("generate failed: {e:#}"))
}

fn schemas() -> Vec<(String, Value)> {
    let dir: PathBuf = fixtures().join("json_schemas");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let name = p.file_stem().unwrap().to_string_lossy().into_owned();
            (name, rvllm_tests::read_json(&p))
        })
        .collect()
}

#[test]
fn every_schema_of_the_suite_gives_a_valid_document() {
    let suite = schemas();
    assert!(suite.len() >= 100, "the suite has {} schemas", suite.len());
    let mut llm = smollm2();
    let prompt = chat_prompt(&llm, "Reply with one JSON value, nothing else.");
    let params: Vec<SamplingParams> = suite
        .iter()
        .map(|(_, schema)| SamplingParams {
            structured_output: Some(StructuredOutput::JsonSchema(schema.clone())),
            ..SamplingParams::greedy(SCHEMA_MAX_TOKENS)
        })
        .collect();
    let prompts = vec![prompt; suite.len()];
    let started = std::time::Instant::now();
    let outs = run(&mut llm, &prompts, &params);
    let mut failures = Vec::new();
    for ((name, schema), out) in suite.iter().zip(&outs) {
        let o = &out.outputs[0];
        let validator = jsonschema::options()
            .should_validate_formats(true)
            .build(schema)
            .unwrap_or_else(|e| panic!("{name}: the validator refuses the schema: {e}"));
        let problem = match serde_json::from_str::<Value>(&o.text) {
            _ if o.finish_reason != Some(FinishReason::Stop) => {
                Some(format!("finished by {:?}", o.finish_reason))
            }
            Err(e) => Some(format!("not JSON: {e}")),
            Ok(doc) => validator
                .iter_errors(&doc)
                .next()
                .map(|e| format!("invalid: {e} at {}", e.instance_path)),
        };
        if let Some(p) = problem {
            failures.push(format!("{name}: {p}: {:?}", o.text));
        }
    }
    let tokens: usize = outs.iter().map(|o| o.outputs[0].token_ids.len()).sum();
    eprintln!(
        "{} schemas, {} valid, {tokens} tokens in {:.1?}",
        suite.len(),
        suite.len() - failures.len(),
        started.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{} invalid:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Seeded sampled requests (two each, n = 2) against a choice list and a regex, with
/// logprobs and a stop string that can never cut a valid output short.
fn choice_and_regex_batch(llm: &Llm) -> (Vec<Vec<u32>>, Vec<SamplingParams>) {
    let choices: Vec<String> = ["positive", "negative", "neutral", "mixed feelings"]
        .map(String::from)
        .to_vec();
    let questions = [
        "Is this review positive or negative? 'The food was great.'",
        "What is the sentiment of: 'I hated every minute.'",
        "Give me a date in ISO format.",
        "What is your phone number?",
    ];
    let mut prompts = Vec::new();
    let mut params = Vec::new();
    for (i, q) in questions.iter().enumerate() {
        for (j, spec) in [
            StructuredOutput::Choice(choices.clone()),
            StructuredOutput::Regex(REGEX.into()),
        ]
        .into_iter()
        .enumerate()
        {
            prompts.push(chat_prompt(llm, q));
            params.push(SamplingParams {
                n: 2,
                temperature: 1.0,
                seed: Some(1000 + (i * 2 + j) as u64),
                logprobs: Some(2),
                max_tokens: Some(40),
                stop: vec!["\n\n\n".into()],
                structured_output: Some(spec),
                ..SamplingParams::default()
            });
        }
    }
    (prompts, params)
}

const REGEX: &str = r"(\+1-[0-9]{3}-[0-9]{4}|[0-9]{4}-[01][0-9]-[0-3][0-9]|[a-z]{2,8})";

fn check_matches(outs: &[RequestOutput], params: &[SamplingParams]) {
    let re = regex::Regex::new(&format!("^(?:{REGEX})$")).unwrap();
    for (out, p) in outs.iter().zip(params) {
        assert_eq!(out.outputs.len(), 2, "n = 2");
        for o in &out.outputs {
            assert_eq!(o.finish_reason, Some(FinishReason::Stop), "{:?}", o.text);
            assert_eq!(o.logprobs.len(), o.token_ids.len(), "a logprob per token");
            match p.structured_output.as_ref().unwrap() {
                StructuredOutput::Choice(c) => assert!(c.contains(&o.text), "{:?}", o.text),
                StructuredOutput::Regex(_) => assert!(re.is_match(&o.text), "{:?}", o.text),
                other => unreachable!("{other:?}"),
            }
        }
    }
}

#[test]
fn choice_and_regex_outputs_always_match_also_under_preemption() {
    let (prompts, params, roomy) = {
        let mut llm = smollm2();
        let (prompts, params) = choice_and_regex_batch(&llm);
        let outs = run(&mut llm, &prompts, &params);
        (prompts, params, outs)
    };
    check_matches(&roomy, &params);
    // 16 sequences of up to ~85 tokens (6 blocks of 16) each, sharing 4 prompts' blocks
    // through the prefix cache: 8 blocks run one or two at a time, preempting the rest.
    let mut small = load(Some(8));
    let tight = run(&mut small, &prompts, &params);
    assert!(
        small.core.scheduler.num_preemptions() > 0,
        "8 blocks must preempt"
    );
    check_matches(&tight, &params);
    for (a, b) in roomy.iter().zip(&tight) {
        for (x, y) in a.outputs.iter().zip(&b.outputs) {
            assert_eq!(
                x.token_ids, y.token_ids,
                "seeded output changed under preemption"
            );
        }
    }
}

#[test]
fn a_spec_that_does_not_compile_is_refused_at_admission() {
    let mut llm = smollm2();
    let prompt = chat_prompt(&llm, "hi");
    for (spec, says) in [
        (
            StructuredOutput::Regex("(unclosed".into()),
            "regular expression",
        ),
        (
            StructuredOutput::Grammar("start: nothing_here".into()),
            "nothing_here",
        ),
        (
            StructuredOutput::JsonSchema(serde_json::json!({"type": "no-such-type"})),
            "JSON schema",
        ),
    ] {
        let params = SamplingParams {
            structured_output: Some(spec.clone()),
            ..SamplingParams::greedy(4)
        };
        let err = llm
            .generate(std::slice::from_ref(&prompt), &[params], |_| {})
            .expect_err(&format!("{spec:?} was admitted"));
        let msg = format!("{err:#}");
        assert!(
            msg.contains("structured_outputs") && msg.contains(says),
            "{msg}"
        );
    }
    assert_eq!(llm.core.scheduler.num_preemptions(), 0);
    assert!(!llm.core.has_unfinished(), "nothing was left running");
}

mod server_common;

/// `rvllm serve` with SmolLM2 on the CPU, for the HTTP tests.
fn smollm2_server() -> server_common::Server {
    server_common::Server::start(
        &smollm2_gguf(),
        &[
            "--served-model-name",
            "smollm2",
            "--max-model-len",
            "2048",
            "--cpu-kv-cache-gb",
            "0.5",
        ],
        &[],
    )
}

fn user(text: &str) -> Value {
    serde_json::json!([{"role": "user", "content": text}])
}

#[test]
fn the_server_serves_response_format_and_the_vllm_fields_and_refuses_bad_ones() {
    use serde_json::json;
    let s = smollm2_server();
    let schema = json!({"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"], "additionalProperties": false});
    let validator = jsonschema::validator_for(&schema).unwrap();
    let body = json!({"model": "smollm2", "messages": user("Describe a person as JSON."),
        "max_tokens": 60, "temperature": 0,
        "response_format": {"type": "json_schema",
            "json_schema": {"name": "person", "schema": schema, "strict": true}}});
    let r = s.post_json("/v1/chat/completions", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let choice = &r.json()["choices"][0];
    assert_eq!(choice["finish_reason"], "stop", "{choice}");
    let content = choice["message"]["content"].as_str().unwrap().to_string();
    let doc: Value = serde_json::from_str(&content).unwrap_or_else(|e| panic!("{content:?}: {e}"));
    assert!(validator.is_valid(&doc), "{content}");

    // Streamed, the deltas add up to the same document.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let r = s.post_json("/v1/chat/completions", &streamed);
    assert_eq!(r.status, 200, "{}", r.text());
    let text: String = r
        .sse_events()
        .iter()
        .filter(|e| *e != "[DONE]")
        .filter_map(|e| {
            let v: Value = serde_json::from_str(e).unwrap();
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect();
    assert_eq!(text, content);

    // json_object: some JSON object.
    let r = s.post_json(
        "/v1/chat/completions",
        &json!({"messages": user("Give me a JSON object."), "max_tokens": 80, "temperature": 0,
                "response_format": {"type": "json_object"}}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let choice = &r.json()["choices"][0];
    if choice["finish_reason"] == "stop" {
        let content = choice["message"]["content"].as_str().unwrap();
        let doc: Value =
            serde_json::from_str(content).unwrap_or_else(|e| panic!("{content:?}: {e}"));
        assert!(doc.is_object(), "{content}");
    }

    // Completions: vLLM's older and newer fields.
    for extra in [
        json!({"guided_choice": ["red", "green", "blue"]}),
        json!({"structured_outputs": {"choice": ["red", "green", "blue"]}}),
    ] {
        let mut body = json!({"prompt": "My favourite colour is", "max_tokens": 5, "n": 2,
                              "temperature": 1.0, "seed": 3});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let r = s.post_json("/v1/completions", &body);
        assert_eq!(r.status, 200, "{}", r.text());
        for c in r.json()["choices"].as_array().unwrap() {
            assert!(
                ["red", "green", "blue"].contains(&c["text"].as_str().unwrap()),
                "{c}"
            );
        }
    }
    let r = s.post_json(
        "/v1/completions",
        &json!({"prompt": "Call me at", "max_tokens": 20, "temperature": 0,
                "guided_regex": "\\+1-[0-9]{3}-[0-9]{4}"}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let text = r.json()["choices"][0]["text"].as_str().unwrap().to_string();
    assert!(
        regex::Regex::new(r"^\+1-[0-9]{3}-[0-9]{4}$")
            .unwrap()
            .is_match(&text),
        "{text}"
    );

    // Refused: a 400 naming the field and the problem.
    for (extra, param, says) in [
        (
            json!({"guided_regex": "(unclosed"}),
            "structured_outputs",
            "regular expression",
        ),
        (
            json!({"response_format": {"type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}}),
            "structured_outputs",
            "no-such-type",
        ),
        (
            json!({"guided_grammar": "start: missing_rule"}),
            "structured_outputs",
            "missing_rule",
        ),
        (
            json!({"response_format": {"type": "json_object"}, "guided_regex": "a"}),
            "guided_regex",
            "only one kind",
        ),
        (
            json!({"response_format": {"type": "yaml"}}),
            "response_format.type",
            "yaml",
        ),
        (
            json!({"guided_decoding_backend": "xgrammar", "guided_regex": "a"}),
            "guided_decoding_backend",
            "llguidance",
        ),
    ] {
        let mut body = json!({"messages": user("hi"), "max_tokens": 5});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let e = s.post_json("/v1/chat/completions", &body).expect_error(400);
        assert_eq!(e["param"], param, "{extra}: {e}");
        assert!(
            e["message"].as_str().unwrap().contains(says),
            "{extra}: {e}"
        );
    }
    assert!(
        server_common::idle_and_no_leak(&s.wait_idle()),
        "{}",
        s.log()
    );
}

#[test]
fn openai_client_parse_returns_a_pydantic_object() {
    let s = smollm2_server();
    server_common::run_openai_unittest(
        &s,
        &[server_common::python_script("test_openai_structured.py")],
        &[
            ("RVLLM_BASE_URL", format!("http://{}/v1", s.addr)),
            ("RVLLM_MODEL", "smollm2".into()),
        ],
    );
}
