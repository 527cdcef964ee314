//! No request field is silently ignored: every field a request struct of protocol.rs accepts
//! is listed here as honoured, refused (with a value that must get a 400 naming it), or
//! without effect by its nature (with why). The lists are checked against the fields serde
//! actually accepts, so a field added to protocol.rs fails this test until it is decided.
use serde::de::DeserializeOwned;

use super::protocol::{
    ChatCompletionRequest, ChatMessageIn, CompletionRequest, DetokenizeRequest, StreamOptions,
    TokenizeRequest,
};
use super::validate::{check_cache_salt, parse_json, validate_chat, validate_completion};

/// Fields of both completions and chat (protocol.rs's sampling_fields!) that change the
/// output or the response.
const HONOURED_COMMON: &[&str] = &[
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stream",
    "stream_options",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "logit_bias",
    "top_k",
    "min_p",
    "repetition_penalty",
    "min_tokens",
    "stop_token_ids",
    "include_stop_str_in_output",
    "ignore_eos",
    "skip_special_tokens",
    "prompt_logprobs",
    "add_special_tokens",
    "echo",
    "allowed_token_ids",
    "bad_words",
    "return_tokens_as_token_ids",
    "return_token_ids",
    // Structured output (llguidance; validate.rs's structured_fields.rs). One kind a
    // request; bad values get a 400 (REFUSED_COMMON), and so does a spec that does not
    // compile, at admission.
    "structured_outputs",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "guided_whitespace_pattern",
    // llguidance is the one backend: `auto` and `guidance` are served, others refused.
    "guided_decoding_backend",
    // The response id is built from it, as vLLM does.
    "request_id",
    // Honoured where they are served, refused where not (see REFUSED_COMMON):
    "best_of",
    "response_format",
    "spaces_between_special_tokens",
    "use_beam_search",
    "length_penalty",
    "priority",
    "store",
    "service_tier",
    "cache_salt",
];

/// Fields whose every value leaves the output as it is, by what they mean.
const WITHOUT_EFFECT_COMMON: &[(&str, &str)] = &[
    (
        "user",
        "OpenAI's end-user tag, for the caller's abuse monitoring",
    ),
    ("metadata", "tags for stored completions; none are stored"),
];

/// A value of each common field that is not served, for a 400 naming the field.
const REFUSED_COMMON: &[(&str, &str)] = &[
    ("best_of", "3"),
    ("response_format", r#"{"type":"structural_tag"}"#),
    ("spaces_between_special_tokens", "false"),
    ("use_beam_search", "true"),
    ("length_penalty", "2.0"),
    ("truncate_prompt_tokens", "5"),
    ("structured_outputs", r#"{"structural_tag":"{}"}"#),
    ("guided_json", "3"),
    ("guided_regex", "5"),
    ("guided_choice", "[]"),
    ("guided_grammar", "5"),
    ("guided_decoding_backend", r#""xgrammar""#),
    ("guided_whitespace_pattern", "5"),
    ("logits_processors", r#"["x"]"#),
    ("priority", "1"),
    ("store", "true"),
    ("service_tier", r#""flex""#),
];

const HONOURED_COMPLETION: &[&str] = &["prompt", "logprobs", "suffix"];
const REFUSED_COMPLETION: &[(&str, &str)] = &[("suffix", r#""tail""#)];

const HONOURED_CHAT: &[&str] = &[
    "messages",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
    "add_generation_prompt",
    "continue_final_message",
    "chat_template",
    // Reach the chat template's context, as in vLLM.
    "chat_template_kwargs",
    "documents",
    "reasoning_effort",
    // Tool calling (server/tools/): tools reach the template, tool_choice picks how calls
    // are read (auto: --tool-call-parser; required / named: a JSON schema), and without
    // parallel_tool_calls only the first call is kept.
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    // Honoured where they are served (none, auto), refused where not:
    "functions",
    "function_call",
    "modalities",
];
const WITHOUT_EFFECT_CHAT: &[(&str, &str)] = &[];
const REFUSED_CHAT: &[(&str, &str)] = &[
    ("functions", r#"[{"name":"f"}]"#),
    ("tool_choice", r#""required""#),
    ("function_call", r#"{"name":"f"}"#),
    ("modalities", r#"["text","audio"]"#),
    ("audio", r#"{"voice":"alloy","format":"wav"}"#),
    ("prediction", r#"{"type":"content","content":"x"}"#),
    ("web_search_options", "{}"),
];

/// Every field of a message reaches the chat template (validate.rs's `template_fields`).
const HONOURED_MESSAGE: &[&str] = &[
    "role",
    "content",
    "name",
    "tool_calls",
    "tool_call_id",
    "refusal",
    "function_call",
    "reasoning_content",
    "reasoning",
];
const HONOURED_TOKENIZE: &[&str] = &[
    "model",
    "prompt",
    "messages",
    "add_special_tokens",
    "add_generation_prompt",
    "continue_final_message",
    "chat_template",
    "chat_template_kwargs",
    "return_token_strs",
];
const HONOURED_DETOKENIZE: &[&str] = &["model", "tokens"];
const HONOURED_STREAM_OPTIONS: &[&str] = &["include_usage", "continuous_usage_stats"];

/// The fields serde accepts for `T`, read from its unknown-field message (which lists them
/// all, in declaration order).
fn accepted_fields<T: DeserializeOwned>() -> Vec<String> {
    let err = serde_json::from_str::<T>(r#"{"\u0001":0}"#)
        .err()
        .expect("an unknown field is refused")
        .to_string();
    // "expected `a`", "expected `a` or `b`", "expected one of `a`, `b`, `c`".
    let list = err
        .split_once("expected ")
        .unwrap_or_else(|| panic!("no field list in `{err}`"))
        .1;
    let list = list.split(" at line").next().unwrap_or(list);
    list.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

fn check_decided(what: &str, accepted: &[String], decided: &[&[&str]]) {
    let all: Vec<&str> = decided.iter().flat_map(|l| l.iter().copied()).collect();
    let undecided: Vec<&String> = accepted
        .iter()
        .filter(|f| !all.contains(&f.as_str()))
        .collect();
    assert!(
        undecided.is_empty(),
        "{what}: these fields are accepted but neither honoured, refused nor listed as \
         without effect: {undecided:?}"
    );
    let stale: Vec<&&str> = all
        .iter()
        .filter(|f| !accepted.iter().any(|a| a == *f))
        .collect();
    assert!(
        stale.is_empty(),
        "{what}: listed but not accepted: {stale:?}"
    );
}

fn names(l: &[(&'static str, &str)]) -> Vec<&'static str> {
    l.iter().map(|(n, _)| *n).collect()
}

#[test]
fn every_request_field_is_decided() {
    let (rc, wc) = (names(REFUSED_COMMON), names(WITHOUT_EFFECT_COMMON));
    let (rp, rch, wch) = (
        names(REFUSED_COMPLETION),
        names(REFUSED_CHAT),
        names(WITHOUT_EFFECT_CHAT),
    );
    check_decided(
        "CompletionRequest",
        &accepted_fields::<CompletionRequest>(),
        &[HONOURED_COMMON, &rc, &wc, HONOURED_COMPLETION, &rp],
    );
    check_decided(
        "ChatCompletionRequest",
        &accepted_fields::<ChatCompletionRequest>(),
        &[HONOURED_COMMON, &rc, &wc, HONOURED_CHAT, &rch, &wch],
    );
    check_decided(
        "ChatMessageIn",
        &accepted_fields::<ChatMessageIn>(),
        &[HONOURED_MESSAGE],
    );
    check_decided(
        "TokenizeRequest",
        &accepted_fields::<TokenizeRequest>(),
        &[HONOURED_TOKENIZE],
    );
    check_decided(
        "DetokenizeRequest",
        &accepted_fields::<DetokenizeRequest>(),
        &[HONOURED_DETOKENIZE],
    );
    check_decided(
        "StreamOptions",
        &accepted_fields::<StreamOptions>(),
        &[HONOURED_STREAM_OPTIONS],
    );
}

fn assert_refused(result: Result<(), super::error::ApiError>, field: &str, value: &str) {
    let e = result.expect_err(&format!("`{field}: {value}` was accepted"));
    assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST, "{field}");
    assert_eq!(e.param.as_deref(), Some(field), "{field}: {}", e.message);
    assert!(e.message.contains(field), "{field}: {}", e.message);
}

#[test]
fn every_refused_value_gets_a_400_naming_its_field() {
    for (field, value) in REFUSED_COMMON.iter().chain(REFUSED_COMPLETION) {
        let body = format!(r#"{{"prompt":"x","{field}":{value}}}"#);
        let r = parse_json::<CompletionRequest>(body.as_bytes())
            .and_then(|r| validate_completion(&r, 20).map(drop));
        assert_refused(r, field, value);
    }
    for (field, value) in REFUSED_COMMON.iter().chain(REFUSED_CHAT) {
        let body = format!(r#"{{"messages":[{{"role":"user","content":"x"}}],"{field}":{value}}}"#);
        let r = parse_json::<ChatCompletionRequest>(body.as_bytes())
            .and_then(|r| validate_chat(&r, 20).map(drop));
        assert_refused(r, field, value);
    }
    assert_refused(check_cache_salt(Some("s"), true), "cache_salt", "\"s\"");
    assert!(check_cache_salt(Some("s"), false).is_ok());
}

#[test]
fn served_values_of_partly_served_fields_pass() {
    let chat = |extra: &str| {
        let body = format!(r#"{{"messages":[{{"role":"user","content":"x"}}],{extra}}}"#);
        parse_json::<ChatCompletionRequest>(body.as_bytes())
            .and_then(|r| validate_chat(&r, 20))
            .unwrap_or_else(|e| panic!("{extra}: {}", e.message))
    };
    for ok in [
        r#""best_of":1"#,
        r#""response_format":{"type":"text"}"#,
        r#""response_format":{"type":"json_object"}"#,
        r#""response_format":{"type":"json_schema","json_schema":{"name":"n","schema":{},"strict":true}}"#,
        r#""structured_outputs":{"regex":"a+"}"#,
        r#""guided_choice":["a","b"],"guided_decoding_backend":"guidance""#,
        r#""spaces_between_special_tokens":true"#,
        r#""use_beam_search":false"#,
        r#""length_penalty":1.0"#,
        r#""priority":0"#,
        r#""store":false"#,
        r#""service_tier":"auto""#,
        r#""tool_choice":"none""#,
        r#""function_call":"auto""#,
        r#""modalities":["text"]"#,
        r#""parallel_tool_calls":true"#,
        r#""parallel_tool_calls":false,"tools":[{"type":"function","function":{"name":"f"}}]"#,
        r#""user":"u1","metadata":{"k":"v"}"#,
    ] {
        chat(ok);
    }
    let j = chat(
        r#""documents":[{"title":"t"}],"reasoning_effort":"low",
           "chat_template_kwargs":{"enable_thinking":false,"reasoning_effort":"high"},
           "request_id":"abc""#,
    );
    assert_eq!(j.template_kwargs["documents"][0]["title"], "t");
    assert_eq!(j.template_kwargs["enable_thinking"], false);
    assert_eq!(
        j.template_kwargs["reasoning_effort"], "high",
        "chat_template_kwargs wins, as in vLLM"
    );
    assert_eq!(j.request_id.as_deref(), Some("abc"));
    // required and named choices constrain the output; the tools reach the template.
    let tools =
        r#""tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}]"#;
    for choice in [
        r#""required""#,
        r#"{"type":"function","function":{"name":"f"}}"#,
    ] {
        let j = chat(&format!(r#"{tools},"tool_choice":{choice}"#));
        assert!(j.params.structured_output.is_some(), "{choice}");
        assert_eq!(j.template_kwargs["tools"][0]["function"]["name"], "f");
    }
    let j = chat(&format!(r#"{tools},"tool_choice":"none""#));
    assert!(j.params.structured_output.is_none());
    assert_eq!(j.template_kwargs["tools"][0]["function"]["name"], "f");
}
