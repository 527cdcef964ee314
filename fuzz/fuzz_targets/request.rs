//! A request body, through what the server does before the engine sees it: JSON (UTF-8,
//! syntax, types, unknown fields) into the wire structs, then validation into a completion
//! or chat job. Every refusal must be a 4xx naming what is wrong; whatever is accepted must
//! be checkable by the engine's own parameter rules without a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rvllm::server::error::ApiError;
use rvllm::server::protocol::{ChatCompletionRequest, CompletionRequest};
use rvllm::server::validate::{parse_json, validate_chat, validate_completion, MAX_LOGPROBS};

fn refused(e: &ApiError) {
    assert!(
        e.status.is_client_error(),
        "a bad request got {}: {}",
        e.status,
        e.message
    );
    assert!(!e.message.is_empty(), "an error without a message");
}

fn check<T>(r: Result<T, ApiError>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            refused(&e);
            None
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let max = MAX_LOGPROBS as usize;
    if let Some(req) = check(parse_json::<CompletionRequest>(data)) {
        if let Some(job) = check(validate_completion(&req, max)) {
            let _ = job.params.validate();
        }
    }
    if let Some(req) = check(parse_json::<ChatCompletionRequest>(data)) {
        if let Some(job) = check(validate_chat(&req, max)) {
            let _ = job.params.validate();
        }
    }
});
