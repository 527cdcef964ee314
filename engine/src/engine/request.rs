//! Admission of a user request: validation against the engine's limits and the fan-out of
//! `n` into independent core requests. Shared by the offline and the async front ends.
use std::sync::atomic::{AtomicU64, Ordering};

use crate::sampling::SamplingParams;
use crate::scheduler::{EngineRequest, RequestId};

static NEXT_REQUEST_ID: AtomicU64 = AtomicU64::new(1);

pub fn next_request_id() -> RequestId {
    NEXT_REQUEST_ID.fetch_add(1, Ordering::Relaxed)
}

#[derive(Debug, Clone, PartialEq)]
pub enum EngineError {
    /// A parameter is out of range; `param` names it, `message` says what to change.
    InvalidParam {
        param: String,
        message: String,
    },
    /// The prompt leaves no room to generate within --max-model-len.
    PromptTooLong {
        prompt_len: usize,
        max_model_len: usize,
    },
    /// The engine is stopping and takes no new requests.
    ShuttingDown,
    Internal(String),
}

impl std::fmt::Display for EngineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EngineError::InvalidParam { param, message } => write!(f, "invalid `{param}`: {message}"),
            EngineError::PromptTooLong { prompt_len, max_model_len } => write!(
                f,
                "the prompt is {prompt_len} tokens long but this model's maximum context length \
                 (--max-model-len) is {max_model_len} tokens; shorten the prompt or raise --max-model-len"
            ),
            EngineError::ShuttingDown => write!(f, "the engine is shutting down and takes no new requests"),
            EngineError::Internal(m) => write!(f, "internal engine error: {m}"),
        }
    }
}

impl std::error::Error for EngineError {}

/// Validate a request and split it into `n` core requests (seeds `seed + i` when seeded).
/// `max_tokens: None` becomes "up to the end of the context".
pub fn admit(
    prompt_token_ids: &[u32],
    params: &SamplingParams,
    max_model_len: usize,
    vocab_size: usize,
    eos_token_ids: &[u32],
) -> Result<(SamplingParams, Vec<EngineRequest>), EngineError> {
    params
        .validate()
        .and_then(|()| params.check_vocab(vocab_size))
        .map_err(|e| EngineError::InvalidParam {
            param: e.param.to_string(),
            message: e.message,
        })?;
    if prompt_token_ids.is_empty() {
        return Err(EngineError::InvalidParam {
            param: "prompt".into(),
            message: "the prompt is empty; give at least one token".into(),
        });
    }
    // Checked here, at admission: an out-of-range id reaching a step would fail the whole
    // batch it runs in, not just this request.
    if let Some(bad) = prompt_token_ids.iter().find(|&&t| t as usize >= vocab_size) {
        return Err(EngineError::InvalidParam {
            param: "prompt".into(),
            message: format!(
                "token id {bad} is outside the model's vocabulary (ids 0..{}); give token ids below {vocab_size}",
                vocab_size.saturating_sub(1)
            ),
        });
    }
    let prompt_len = prompt_token_ids.len();
    if prompt_len >= max_model_len {
        return Err(EngineError::PromptTooLong {
            prompt_len,
            max_model_len,
        });
    }
    let room = max_model_len - prompt_len;
    let mut params = params.clone();
    match params.max_tokens {
        None => params.max_tokens = Some(room),
        Some(m) if m > room => {
            return Err(EngineError::InvalidParam {
                param: "max_tokens".into(),
                message: format!(
                    "this model's maximum context length is {max_model_len} tokens, but {} were \
                     requested ({prompt_len} in the prompt, {m} to generate); lower max_tokens to at most {room}",
                    prompt_len + m
                ),
            })
        }
        Some(_) => {}
    }
    // The core never reads stop strings (they are matched at the edge, invariant 3): its
    // `n` copies of the parameters go without them rather than hold n copies of the strings.
    let stop = std::mem::take(&mut params.stop);
    let reqs = (0..params.n)
        .map(|i| {
            let mut child = params.clone();
            child.n = 1;
            child.seed = params.seed.map(|s| s.wrapping_add(i as u64));
            EngineRequest {
                req_id: next_request_id(),
                prompt_token_ids: prompt_token_ids.to_vec(),
                sampling: child,
                eos_token_ids: eos_token_ids.to_vec(),
            }
        })
        .collect();
    params.stop = stop;
    Ok((params, reqs))
}
