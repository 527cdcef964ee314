//! One HTTP request's generation: the engine streams of its prompts merged into one, choice
//! numbering (`prompt * n + index`), per-choice timing for /metrics, and the in-flight
//! count. Dropping a `Generation` (the client went away, or the response is done) drops the
//! engine streams, which aborts whatever is unfinished and frees its KV blocks.
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures::stream::{SelectAll, Stream, StreamExt};

use super::error::ApiError;
use super::metrics::{Finished, ServerMetrics};
use crate::engine::async_engine::SHUT_DOWN_MESSAGE;
use crate::engine::{AsyncEngine, CompletionDelta, EngineError, FinishReason, StopReason};
use crate::sampling::params::{bad_words_token_ids, check_bad_word_ids};
use crate::sampling::SamplingParams;
use crate::tokenizer::Tokenizer;

type DeltaStream = Pin<Box<dyn Stream<Item = (usize, CompletionDelta)> + Send>>;

struct ChoiceTiming {
    first_token: Option<Instant>,
    tokens: usize,
    finished: bool,
}

pub struct Generation {
    merged: SelectAll<DeltaStream>,
    n: usize,
    started: Instant,
    choices: Vec<ChoiceTiming>,
    metrics: Arc<ServerMetrics>,
}

/// What went wrong with the engine, said to the client. `prompt_param` names the field that
/// held the prompt ("prompt" or "messages").
pub fn engine_error(e: EngineError, prompt_param: &str) -> ApiError {
    match e {
        EngineError::InvalidParam { param, message } => ApiError::invalid(param, message),
        EngineError::PromptTooLong { .. } => {
            let mut err = ApiError::invalid(prompt_param, e.to_string());
            err.code = Some("context_length_exceeded");
            err
        }
        EngineError::ShuttingDown => ApiError::unavailable(e.to_string()),
        EngineError::Internal(m) => ApiError::internal(format!("internal engine error: {m}")),
    }
}

/// Fills `bad_words_token_ids` from `bad_words` with the model's tokenizer (vLLM's rule, see
/// `bad_words_token_ids`) and checks them against the limits the GPU sampler holds.
pub fn tokenize_bad_words(
    tok: Option<&Tokenizer>,
    params: &mut SamplingParams,
) -> Result<(), ApiError> {
    if params.bad_words.is_empty() {
        return Ok(());
    }
    let tok = tok.ok_or_else(|| {
        ApiError::invalid(
            "bad_words",
            "this model has no tokenizer, so `bad_words` cannot be tokenized; leave it out",
        )
    })?;
    let ids = bad_words_token_ids(&params.bad_words, |w| tok.encode(w, false)).map_err(|e| {
        ApiError::invalid(
            "bad_words",
            format!("a bad word could not be tokenized: {e:#}"),
        )
    })?;
    check_bad_word_ids(&ids).map_err(|e| ApiError::invalid(e.param, e.message))?;
    params.bad_words_token_ids = ids;
    Ok(())
}

impl Generation {
    /// Submit every prompt; on any refusal the ones already submitted are dropped (aborted).
    pub fn start(
        engine: &AsyncEngine,
        metrics: Arc<ServerMetrics>,
        prompts: Vec<Vec<u32>>,
        params: &SamplingParams,
        prompt_param: &str,
    ) -> Result<Self, ApiError> {
        let n = params.n.max(1);
        let mut merged = SelectAll::new();
        for (p, ids) in prompts.into_iter().enumerate() {
            let rs = engine
                .generate(ids, params.clone())
                .map_err(|e| engine_error(e, prompt_param))?;
            let s = futures::stream::unfold(rs, move |mut rs| async move {
                rs.next().await.map(|d| ((p, d), rs))
            });
            merged.push(Box::pin(s) as DeltaStream);
        }
        let total = merged.len() * n;
        metrics.request_started();
        Ok(Self {
            merged,
            n,
            started: Instant::now(),
            choices: (0..total)
                .map(|_| ChoiceTiming {
                    first_token: None,
                    tokens: 0,
                    finished: false,
                })
                .collect(),
            metrics,
        })
    }

    pub fn num_choices(&self) -> usize {
        self.choices.len()
    }

    /// The next delta and the choice it belongs to; None when every choice has finished.
    pub async fn next(&mut self) -> Option<(usize, CompletionDelta)> {
        let (p, delta) = self.merged.next().await?;
        let choice = p * self.n + delta.index;
        if let Some(t) = self.choices.get_mut(choice) {
            if !delta.token_ids.is_empty() && t.first_token.is_none() {
                t.first_token = Some(Instant::now());
            }
            t.tokens += delta.token_ids.len();
            if let Some(f) = &delta.finish_reason {
                t.finished = true;
                let how = match f {
                    FinishReason::Stop => Finished::Stop,
                    FinishReason::Length => Finished::Length,
                    FinishReason::Abort => Finished::Abort,
                };
                let ttft = t.first_token.map(|f| (f - self.started).as_secs_f64());
                self.metrics.record_sequence(
                    ttft,
                    self.started.elapsed().as_secs_f64(),
                    t.tokens,
                    how,
                );
            }
        }
        Some((choice, delta))
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        let e2e = self.started.elapsed().as_secs_f64();
        for t in self.choices.iter().filter(|t| !t.finished) {
            let ttft = t.first_token.map(|f| (f - self.started).as_secs_f64());
            self.metrics
                .record_sequence(ttft, e2e, t.tokens, Finished::Abort);
        }
        self.metrics.request_ended();
    }
}

/// An engine-side failure of one choice (the engine reports it as an Abort carrying the
/// message), as an error for the client.
pub fn failure(delta: &CompletionDelta) -> Option<ApiError> {
    match (&delta.finish_reason, &delta.stop_reason) {
        (Some(FinishReason::Abort), Some(StopReason::Str(msg))) if msg == SHUT_DOWN_MESSAGE => {
            Some(ApiError::unavailable(msg.clone()))
        }
        (Some(FinishReason::Abort), Some(StopReason::Str(msg))) => {
            Some(ApiError::internal(msg.clone()))
        }
        (Some(FinishReason::Abort), _) => {
            Some(ApiError::internal("the engine aborted the request"))
        }
        _ => None,
    }
}
