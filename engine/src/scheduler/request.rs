//! What goes into the scheduler (requests) and what comes out of it (per-step outputs),
//! plus the scheduler's own per-request state.
use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::output::{RequestId, TokenLogprobs};
use crate::sampling::SamplingParams;

/// One sequence to generate. `n > 1` is split into `n` of these at the edge.
#[derive(Debug, Clone)]
pub struct EngineRequest {
    pub req_id: RequestId,
    pub prompt_token_ids: Vec<u32>,
    pub sampling: SamplingParams,
    /// The model's end-of-sequence ids (generation_config.json may list several).
    pub eos_token_ids: Vec<u32>,
}

/// Why a sequence ended, as in the OpenAI API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// EOS or one of `stop_token_ids` (stop strings are found at the edge, which then
    /// aborts the request in the core).
    Stop,
    /// `max_tokens` generated, the context (`max_model_len`) full, or the whole KV cache
    /// used up by this one sequence.
    Length,
    /// Aborted by the client.
    Abort,
}

impl FinishReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

impl std::fmt::Display for FinishReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What one request produced in one step.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineCoreOutput {
    pub req_id: RequestId,
    /// The token(s) sampled this step; a stop token (EOS, stop_token_ids) is included.
    pub new_token_ids: Vec<u32>,
    /// One entry per new token when logprobs were asked for, else empty.
    pub new_logprobs: Vec<TokenLogprobs>,
    /// Sent once, with the first generated token, when prompt_logprobs were asked for.
    pub prompt_logprobs: Option<Vec<TokenLogprobs>>,
    /// Set on the request's last output.
    pub finish_reason: Option<FinishReason>,
    /// The token id that stopped the sequence (EOS or one of stop_token_ids).
    pub stop_token: Option<u32>,
}

/// Why `Scheduler::add_request` refused a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddRequestError {
    EmptyPrompt {
        req_id: RequestId,
    },
    DuplicateId {
        req_id: RequestId,
    },
    PromptTooLong {
        prompt_len: usize,
        max_model_len: usize,
    },
    PromptExceedsKvCache {
        prompt_len: usize,
        blocks_needed: usize,
        num_kv_blocks: usize,
        block_size: usize,
    },
}

impl std::fmt::Display for AddRequestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AddRequestError::EmptyPrompt { req_id } => {
                write!(
                    f,
                    "request {req_id} has an empty prompt; give at least one token"
                )
            }
            AddRequestError::DuplicateId { req_id } => {
                write!(
                    f,
                    "request id {req_id} is already in the engine; request ids must be unique"
                )
            }
            AddRequestError::PromptTooLong {
                prompt_len,
                max_model_len,
            } => write!(
                f,
                "the prompt is {prompt_len} tokens long, more than the maximum context length of \
                 {max_model_len} tokens; shorten the prompt or raise --max-model-len (the model \
                 and the KV cache must allow it)"
            ),
            AddRequestError::PromptExceedsKvCache {
                prompt_len,
                blocks_needed,
                num_kv_blocks,
                block_size,
            } => {
                write!(
                    f,
                    "the prompt is {prompt_len} tokens long and needs {blocks_needed} KV cache blocks of \
                     {block_size} tokens, but the whole KV cache has only {num_kv_blocks} blocks \
                     ({} tokens); shorten the prompt or give the KV cache more memory \
                     (--num-kv-blocks, --gpu-memory-utilization or --cpu-kv-cache-gb)",
                    num_kv_blocks * block_size
                )
            }
        }
    }
}

impl std::error::Error for AddRequestError {}

/// Where a request is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Status {
    Waiting,
    Running,
}

/// The scheduler's view of one request: its tokens and how many have KV entries.
#[derive(Debug, Clone)]
pub(super) struct Request {
    pub prompt_len: usize,
    /// Prompt followed by every generated token. After a preemption all of these are
    /// recomputed, so a request's outputs survive it.
    pub all_token_ids: Vec<u32>,
    /// Tokens whose KV entries are in the cache. The last known token is never computed
    /// between steps: it is the input that produces the next token.
    pub num_computed_tokens: usize,
    pub sampling: SamplingParams,
    pub eos_token_ids: Vec<u32>,
    pub status: Status,
    /// NewRequestData was sent to the runner (only ever once, even across preemptions).
    pub sent_to_runner: bool,
    /// Prompt logprobs were delivered (a recompute after preemption must not repeat them).
    pub prompt_logprobs_sent: bool,
    /// Tokens being sampled by a step still on the device (0 or 1): scheduled as
    /// `PLACEHOLDER_TOKEN`, appended when that step's output comes back.
    pub num_pending: usize,
    /// Start positions of the chunks scheduled but not yet folded back in (a step still
    /// running), oldest first: their queries may still read the KV before them.
    pub unfinished_chunk_starts: VecDeque<usize>,
}

impl Request {
    pub fn new(req: EngineRequest) -> Self {
        Self {
            prompt_len: req.prompt_token_ids.len(),
            all_token_ids: req.prompt_token_ids,
            num_computed_tokens: 0,
            sampling: req.sampling,
            eos_token_ids: req.eos_token_ids,
            status: Status::Waiting,
            sent_to_runner: false,
            prompt_logprobs_sent: false,
            num_pending: 0,
            unfinished_chunk_starts: VecDeque::new(),
        }
    }

    /// The position of the earliest query of this request that has not run yet (a step
    /// still running included): no query of it reads keys a window before this.
    pub fn earliest_unfinished_query(&self) -> usize {
        self.unfinished_chunk_starts
            .front()
            .map_or(self.num_computed_tokens, |&s| {
                s.min(self.num_computed_tokens)
            })
    }

    pub fn num_tokens(&self) -> usize {
        self.all_token_ids.len()
    }

    pub fn num_output_tokens(&self) -> usize {
        self.all_token_ids.len() - self.prompt_len
    }

    pub fn prompt(&self) -> &[u32] {
        &self.all_token_ids[..self.prompt_len]
    }

    /// Known tokens still lacking KV entries, the pending ones included.
    pub fn num_uncomputed(&self) -> usize {
        (self.num_tokens() + self.num_pending).saturating_sub(self.num_computed_tokens)
    }

    /// Whether the pending token ends the sequence whatever it is (max_tokens or the
    /// context length reached): then there is nothing to schedule until it comes back.
    pub fn ends_with_pending(&self, max_model_len: usize) -> bool {
        self.num_pending > 0
            && (self
                .sampling
                .max_tokens
                .is_some_and(|m| self.num_output_tokens() + self.num_pending >= m)
                || self.num_tokens() + self.num_pending >= max_model_len)
    }

    /// After appending the sampled token: does the sequence end here, and why?
    /// Checked in order: EOS, stop_token_ids (neither before min_tokens outputs),
    /// max_tokens, then the context length.
    pub fn check_stop(&self, max_model_len: usize) -> Option<(FinishReason, Option<u32>)> {
        let last = *self.all_token_ids.last()?;
        let num_outputs = self.num_output_tokens();
        // The sampling step that produced `last`; the sampler masks stop tokens while the
        // step is below min_tokens, and this keeps the two consistent.
        let step = num_outputs.saturating_sub(1);
        if num_outputs > 0 && step >= self.sampling.min_tokens {
            if !self.sampling.ignore_eos && self.eos_token_ids.contains(&last) {
                return Some((FinishReason::Stop, Some(last)));
            }
            if self.sampling.stop_token_ids.contains(&last) {
                return Some((FinishReason::Stop, Some(last)));
            }
        }
        if self.sampling.max_tokens.is_some_and(|m| num_outputs >= m) {
            return Some((FinishReason::Length, None));
        }
        if self.num_tokens() >= max_model_len {
            return Some((FinishReason::Length, None));
        }
        None
    }
}
