//! The only two types that cross between the scheduler and the model runner
//! (ARCHITECTURE.md invariant 2). Plain data: no tensors, no backend handles.
use crate::sampling::SamplingParams;
pub use crate::types::{RequestId, TokenLogprobs};

/// Sent once, the first step a request is scheduled. The runner keeps what it needs for
/// sampling (penalties, seeded RNG) until the request shows up in `finished`.
#[derive(Debug, Clone)]
pub struct NewRequestData {
    pub req_id: RequestId,
    pub prompt_token_ids: Vec<u32>,
    pub sampling: SamplingParams,
}

/// Stands for the token that the step still running samples for the same request: a step
/// may be scheduled before the previous one's output is back (lookahead scheduling), and the
/// runner fills this in from that output (on the device, where it stays).
pub const PLACEHOLDER_TOKEN: u32 = u32::MAX;

/// One request's share of a step.
#[derive(Debug, Clone)]
pub struct ScheduledRequest {
    pub req_id: RequestId,
    /// Tokens whose KV entries are computed this step, at positions
    /// `start_pos .. start_pos + token_ids.len()`. The last may be `PLACEHOLDER_TOKEN`.
    pub token_ids: Vec<u32>,
    /// Number of tokens already in the KV cache before this step (num_computed_tokens).
    pub start_pos: usize,
    /// The request's whole block table (physical block ids), long enough for
    /// `start_pos + token_ids.len()` tokens.
    pub block_table: Vec<u32>,
    /// True when this chunk reaches the end of the request's known tokens, so the runner
    /// samples the next token. False for a non-final prefill chunk.
    pub sample: bool,
    /// Number of tokens the request has generated so far, the pending one included (the
    /// sampling step index; seeded sampling draws from (seed, this index) so that batching
    /// and lookahead never change the stream).
    pub num_output_tokens: usize,
}

#[derive(Debug, Clone, Default)]
pub struct SchedulerOutput {
    pub new_requests: Vec<NewRequestData>,
    pub scheduled: Vec<ScheduledRequest>,
    /// Requests that finished or were aborted since the last step: the runner drops their state.
    pub finished: Vec<RequestId>,
    /// Requests preempted this step (their KV is gone; they will be recomputed later).
    pub preempted: Vec<RequestId>,
}

impl SchedulerOutput {
    pub fn total_tokens(&self) -> usize {
        self.scheduled.iter().map(|s| s.token_ids.len()).sum()
    }
    pub fn is_empty(&self) -> bool {
        self.scheduled.is_empty()
    }
}

#[derive(Debug, Clone)]
pub struct SampledToken {
    pub req_id: RequestId,
    pub token_id: u32,
    pub logprobs: Option<TokenLogprobs>,
    /// Present on the step that finishes a prompt when prompt_logprobs was asked for:
    /// one entry per prompt token after the first.
    pub prompt_logprobs: Option<Vec<TokenLogprobs>>,
}

#[derive(Debug, Clone, Default)]
pub struct ModelRunnerOutput {
    /// One entry per scheduled request with `sample == true`, in scheduling order.
    pub sampled: Vec<SampledToken>,
}
