//! The vLLM-v1-style scheduler: plain bookkeeping, no tensors, no backend, no locks.
//!
//! There are no prefill and decode phases. Every request has a list of known tokens
//! (prompt + outputs) and a count of those already in the KV cache; each step hands out
//! token counts under a budget (`max_num_batched_tokens`, `max_num_seqs`). Running
//! requests are served first (a decode needs 1 token, an unfinished prefill as many as the
//! budget allows), then waiting requests are admitted in arrival order, so long prompts are
//! prefilled in chunks next to running decodes. When the KV cache runs out of blocks the
//! newest running request is preempted: its blocks are freed and it is recomputed later
//! from its prompt and the outputs it already has.
//!
//! A step may be scheduled while the previous one is still on the device (lookahead, so that
//! the host's work overlaps the device's): a request's computed count advances when it is
//! scheduled, and a token that a running step is still sampling is scheduled as
//! `PLACEHOLDER_TOKEN` for the runner to fill in. Its outputs then come one step later: a
//! request that stops on that token has one wasted step computed, never a wrong token.
//!
//! On a model whose every layer has a sliding window, each step first gives back the KV
//! blocks that no query of a running request, in a step still running or to come, can see
//! any more (`KvCacheManager::free_skipped_blocks`), so that they count as free for the
//! requests it schedules and admits.
pub mod output;
mod request;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};

pub use output::*;
pub use request::{AddRequestError, EngineCoreOutput, EngineRequest, FinishReason};
use request::{Request, Status};

use crate::kv::KvCacheManager;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Most requests running at once (`--max-num-seqs`).
    pub max_num_seqs: usize,
    /// Most tokens computed in one step, over all requests (`--max-num-batched-tokens`).
    pub max_num_batched_tokens: usize,
    /// Longest sequence (prompt + outputs) in tokens (`--max-model-len`).
    pub max_model_len: usize,
    /// Tokens per KV block (`--block-size`).
    pub block_size: usize,
    /// KV blocks the backend allocated.
    pub num_kv_blocks: usize,
}

pub struct Scheduler {
    cfg: SchedulerConfig,
    kv: KvCacheManager,
    requests: HashMap<RequestId, Request>,
    /// Arrival order; preempted requests go back to the front.
    waiting: VecDeque<RequestId>,
    /// Admission order: the last one is the newest, the first to be preempted.
    running: Vec<RequestId>,
    /// Finished or aborted since the last `schedule()`: reported in its `finished`.
    finished_since_last: Vec<RequestId>,
    /// Outputs of requests that ended inside `schedule()` (the KV cache is too small for
    /// them alone): returned by the next `update_from_output()`.
    pending_outputs: Vec<EngineCoreOutput>,
    num_preemptions: u64,
    /// Prefix-cache statistics: tokens looked up at admission, and tokens found cached.
    prefix_cache_queries: u64,
    prefix_cache_hits: u64,
}

impl Scheduler {
    /// Limits of 0 would stall the engine forever, so they are raised to 1.
    pub fn new(cfg: SchedulerConfig) -> Self {
        let cfg = SchedulerConfig {
            max_num_seqs: cfg.max_num_seqs.max(1),
            max_num_batched_tokens: cfg.max_num_batched_tokens.max(1),
            max_model_len: cfg.max_model_len.max(1),
            block_size: cfg.block_size.max(1),
            num_kv_blocks: cfg.num_kv_blocks,
        };
        Self {
            kv: KvCacheManager::new(cfg.num_kv_blocks, cfg.block_size),
            cfg,
            requests: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            finished_since_last: Vec::new(),
            pending_outputs: Vec::new(),
            num_preemptions: 0,
            prefix_cache_queries: 0,
            prefix_cache_hits: 0,
        }
    }

    /// Reuse the KV of computed full blocks across requests with the same token prefix
    /// (and across a preempted request's recompute). Off unless asked for here (the engine
    /// turns it on by default, see `EngineArgs::prefix_caching`). Requests that ask for
    /// prompt_logprobs never start from cached blocks, since those need every prompt
    /// position computed.
    pub fn with_prefix_caching(mut self, enabled: bool) -> Self {
        self.kv.set_prefix_caching(enabled);
        self
    }

    /// Give back the KV blocks a sliding window leaves behind, when every layer has one
    /// (`layer_windows`: each layer's window, None for full attention; the largest is used).
    /// A model with any full-attention layer (Gemma 2/3) keeps every block: its global
    /// layers read them all, and vLLM's per-layer-group block tables, which would free them
    /// for the windowed layers alone, are not done here.
    pub fn with_layer_windows(
        mut self,
        layer_windows: impl IntoIterator<Item = Option<usize>>,
    ) -> Self {
        self.set_layer_windows(layer_windows);
        self
    }

    /// `with_layer_windows` on a scheduler already built; set it before the first request
    /// (a request's table only loses blocks from when it is on).
    pub fn set_layer_windows(&mut self, layer_windows: impl IntoIterator<Item = Option<usize>>) {
        self.kv
            .set_sliding_window(crate::kv::uniform_window(layer_windows));
    }

    /// The window whose left-behind blocks are freed (None: every block is kept).
    pub fn sliding_window(&self) -> Option<usize> {
        self.kv.sliding_window()
    }

    /// KV blocks the request holds now (0 for an unknown or waiting one).
    pub fn num_held_blocks(&self, req_id: RequestId) -> usize {
        self.kv.num_held_blocks(req_id)
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    /// Queue a request. Refused when its prompt is empty, longer than `max_model_len`, or
    /// needs more KV blocks than the whole cache holds. A prompt that fits but whose
    /// prompt + max_tokens does not is accepted: if its generation later fills the whole
    /// cache with nothing else running, it finishes with `Length`.
    pub fn add_request(&mut self, req: EngineRequest) -> Result<(), AddRequestError> {
        let prompt_len = req.prompt_token_ids.len();
        if prompt_len == 0 {
            return Err(AddRequestError::EmptyPrompt { req_id: req.req_id });
        }
        if self.requests.contains_key(&req.req_id) {
            return Err(AddRequestError::DuplicateId { req_id: req.req_id });
        }
        if prompt_len > self.cfg.max_model_len {
            return Err(AddRequestError::PromptTooLong {
                prompt_len,
                max_model_len: self.cfg.max_model_len,
            });
        }
        let blocks_needed = self
            .kv
            .max_blocks_held(prompt_len, self.cfg.max_num_batched_tokens);
        if blocks_needed > self.kv.num_total_blocks() {
            return Err(AddRequestError::PromptExceedsKvCache {
                prompt_len,
                blocks_needed,
                num_kv_blocks: self.kv.num_total_blocks(),
                block_size: self.kv.block_size(),
            });
        }
        let id = req.req_id;
        self.requests.insert(id, Request::new(req));
        self.waiting.push_back(id);
        Ok(())
    }

    /// Drop a request wherever it is and free its blocks; the runner hears of it in the
    /// next `SchedulerOutput.finished`. Unknown (e.g. already finished) ids are ignored.
    pub fn abort(&mut self, req_id: RequestId) {
        let Some(req) = self.requests.remove(&req_id) else {
            return;
        };
        match req.status {
            Status::Waiting => self.waiting.retain(|&id| id != req_id),
            Status::Running => self.running.retain(|&id| id != req_id),
        }
        self.kv.free(req_id);
        self.finished_since_last.push(req_id);
    }

    /// Decide what the next step computes.
    pub fn schedule(&mut self) -> SchedulerOutput {
        let mut out = SchedulerOutput::default();
        let mut budget = self.cfg.max_num_batched_tokens;
        if self.kv.sliding_window().is_some() {
            for &id in &self.running {
                let first = self.requests[&id].earliest_unfinished_query();
                self.kv.free_skipped_blocks(id, first);
            }
        }

        // 1. Running requests, oldest first. A request that cannot get blocks preempts the
        // newest running one (possibly itself); requests already scheduled this step are
        // older than every victim, so they are never preempted.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let req = &self.requests[&id];
            // A pending token that ends the sequence anyway: nothing left to compute.
            let num_new = if req.ends_with_pending(self.cfg.max_model_len) {
                0
            } else {
                req.num_uncomputed().min(budget)
            };
            if num_new == 0 {
                i += 1;
                continue;
            }
            let target = req.num_computed_tokens + num_new;
            let pending = req.num_pending > 0;
            let mut keeps_running = true;
            let mut wait_for_pending = false;
            while !self.kv.allocate_slots(id, target) {
                let victim = *self.running.last().expect("the running list holds `id`");
                if victim == id && i == 0 {
                    if pending {
                        // Its token from the step still running comes first (ending the
                        // request now would lose it); the next step ends it if need be.
                        wait_for_pending = true;
                        break;
                    }
                    // Alone in the cache and it still does not fit: this one sequence has
                    // used up every block. End it rather than preempt it forever.
                    self.running.pop();
                    self.finish_in_schedule(id);
                    keeps_running = false;
                    break;
                }
                self.running.pop();
                self.preempt(victim, &mut out);
                if victim == id {
                    keeps_running = false;
                    break;
                }
            }
            if wait_for_pending {
                i += 1;
                continue;
            }
            if !keeps_running {
                continue; // `id` left the running list, which ends this loop
            }
            out.scheduled.push(self.schedule_chunk(id, num_new));
            budget -= num_new;
            i += 1;
        }

        // 2. Waiting requests in arrival order, unless this step had to preempt (admitting
        // new work into a full cache would only preempt again).
        if out.preempted.is_empty() {
            while budget > 0 && self.running.len() < self.cfg.max_num_seqs {
                let Some(&id) = self.waiting.front() else {
                    break;
                };
                let req = &self.requests[&id];
                if req.num_pending > 0 {
                    // Preempted while its last step still runs: first come, first served,
                    // so everyone waits for that step's token.
                    break;
                }
                // Waiting requests hold no blocks and have nothing computed; start them
                // from the cached prefix when there is one. Prompt logprobs need a row for
                // every prompt position, so those requests never read the cache (their
                // blocks are still cached for others once computed).
                let reads_cache =
                    self.kv.prefix_caching() && req.sampling.prompt_logprobs.is_none();
                let cached = if reads_cache {
                    self.kv.acquire_cached_prefix(id, &req.all_token_ids)
                } else {
                    0
                };
                let num_new = (req.num_tokens() - cached).min(budget);
                // A cached prefix may reach further back than the window: the first chunk's
                // queries start at `cached` (or earlier, in a step from before a preemption
                // still running).
                let first = req
                    .unfinished_chunk_starts
                    .front()
                    .map_or(cached, |&p| p.min(cached));
                self.kv.free_skipped_blocks(id, first);
                if !self.kv.allocate_slots(id, cached + num_new) {
                    self.kv.free(id); // give back the cached blocks it took
                    if self.running.is_empty() {
                        // Every block is free and this chunk still does not fit: the
                        // request (prompt + outputs from before a preemption) has outgrown
                        // the whole cache and never will fit.
                        self.waiting.pop_front();
                        self.finish_in_schedule(id);
                        continue;
                    }
                    break; // first come, first served: wait for blocks to free up
                }
                self.waiting.pop_front();
                self.running.push(id);
                let req = self.requests.get_mut(&id).expect("waiting ids are known");
                req.status = Status::Running;
                req.num_computed_tokens = cached;
                // As vLLM counts them: first admissions only (a preempted request's
                // recompute is not a new query), and only requests that read the cache.
                if reads_cache && !req.sent_to_runner {
                    self.prefix_cache_queries += req.num_tokens() as u64;
                    self.prefix_cache_hits += cached as u64;
                }
                if !req.sent_to_runner {
                    req.sent_to_runner = true;
                    out.new_requests.push(NewRequestData {
                        req_id: id,
                        prompt_token_ids: req.prompt().to_vec(),
                        sampling: req.sampling.clone(),
                    });
                }
                out.scheduled.push(self.schedule_chunk(id, num_new));
                budget -= num_new;
            }
        }

        out.finished = std::mem::take(&mut self.finished_since_last);
        out
    }

    /// Fold the runner's sampled tokens into the requests: append tokens, share the blocks
    /// the step computed, and end those that hit a stop condition. `so` is the step the
    /// output belongs to, which need not be the last one scheduled.
    pub fn update_from_output(
        &mut self,
        so: &SchedulerOutput,
        out: &ModelRunnerOutput,
    ) -> Vec<EngineCoreOutput> {
        let mut outputs = std::mem::take(&mut self.pending_outputs);
        let sampled: HashMap<RequestId, &SampledToken> =
            out.sampled.iter().map(|s| (s.req_id, s)).collect();
        let max_model_len = self.cfg.max_model_len;
        for s in &so.scheduled {
            // Aborted (or finished) since the step was scheduled: nothing to update.
            let Some(req) = self.requests.get_mut(&s.req_id) else {
                continue;
            };
            // This chunk's queries have run: the window may let its keys go.
            if let Some(i) = req
                .unfinished_chunk_starts
                .iter()
                .position(|&p| p == s.start_pos)
            {
                req.unfinished_chunk_starts.remove(i);
            }
            // A request preempted while this step ran (Waiting) keeps its token, since the
            // step computed it from the whole context, but its blocks are gone.
            if req.status == Status::Running {
                // The step wrote these blocks: from now on other requests may share them.
                // Only a chunk that completes a block has any to add (most decode steps do
                // not), so the others skip the lookups. A block not added when completed
                // (its last token still unknown) is added by the next chunk that completes
                // one: each call adds every completed block not added yet.
                let end = s.start_pos + s.token_ids.len();
                let computed = end.min(req.num_computed_tokens).min(req.num_tokens());
                let bs = self.cfg.block_size;
                if self.kv.prefix_caching() && computed / bs > s.start_pos / bs {
                    self.kv
                        .cache_computed_blocks(s.req_id, &req.all_token_ids, computed);
                }
            }
            if !s.sample {
                continue;
            }
            req.num_pending = req.num_pending.saturating_sub(1);
            let Some(tok) = sampled.get(&s.req_id) else {
                // The runner skipped a token it should have sampled. Recompute the last
                // token next step instead of leaving the request with nothing to do.
                if req.status == Status::Running {
                    req.num_computed_tokens = req.num_tokens() - 1;
                }
                continue;
            };
            req.all_token_ids.push(tok.token_id);
            let prompt_logprobs = if req.prompt_logprobs_sent {
                None
            } else {
                tok.prompt_logprobs.clone()
            };
            // Only the first pass over the prompt reports its logprobs; a recompute after
            // preemption must not send them again.
            req.prompt_logprobs_sent = true;
            let stop = req.check_stop(max_model_len);
            outputs.push(EngineCoreOutput {
                req_id: s.req_id,
                new_token_ids: vec![tok.token_id],
                new_logprobs: tok.logprobs.iter().cloned().collect(),
                prompt_logprobs,
                finish_reason: stop.map(|(reason, _)| reason),
                stop_token: stop.and_then(|(_, token)| token),
            });
            if stop.is_some() {
                self.finish_request(s.req_id);
            }
        }
        outputs
    }

    /// True while any request is waiting or running, or has an output not yet returned.
    pub fn has_unfinished(&self) -> bool {
        !self.requests.is_empty() || !self.pending_outputs.is_empty()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Fraction of KV blocks in use.
    pub fn kv_usage(&self) -> f32 {
        self.kv.usage()
    }

    pub fn num_preemptions(&self) -> u64 {
        self.num_preemptions
    }

    pub fn num_free_blocks(&self) -> usize {
        self.kv.num_free_blocks()
    }

    pub fn num_total_blocks(&self) -> usize {
        self.kv.num_total_blocks()
    }

    /// Fraction of admitted tokens found in the prefix cache (0 when off or unused).
    pub fn prefix_cache_hit_rate(&self) -> f32 {
        if self.prefix_cache_queries == 0 {
            return 0.0;
        }
        self.prefix_cache_hits as f32 / self.prefix_cache_queries as f32
    }

    /// Tokens of the requests that looked their prefix up in the cache, counted once per
    /// request when first admitted (vLLM's `prefix_cache_queries`).
    pub fn prefix_cache_queries(&self) -> u64 {
        self.prefix_cache_queries
    }

    /// Of `prefix_cache_queries`, the tokens found cached (vLLM's `prefix_cache_hits`).
    pub fn prefix_cache_hits(&self) -> u64 {
        self.prefix_cache_hits
    }

    /// The chunk of `id`'s tokens from its computed count, `num_new` long (its blocks are
    /// already allocated), counted as computed from now on: tokens a running step is still
    /// sampling go as `PLACEHOLDER_TOKEN`, and a chunk that reaches the end samples one more.
    fn schedule_chunk(&mut self, id: RequestId, num_new: usize) -> ScheduledRequest {
        let req = self.requests.get_mut(&id).expect("scheduled ids are known");
        let start = req.num_computed_tokens;
        let end = start + num_new;
        let known = req.num_tokens();
        let mut token_ids = req.all_token_ids[start.min(known)..end.min(known)].to_vec();
        token_ids.resize(num_new, PLACEHOLDER_TOKEN);
        let sample = end == known + req.num_pending;
        let num_output_tokens = req.num_output_tokens() + req.num_pending;
        req.num_computed_tokens = end;
        req.unfinished_chunk_starts.push_back(start);
        if sample {
            req.num_pending += 1;
        }
        ScheduledRequest {
            req_id: id,
            token_ids,
            start_pos: start,
            block_table: self.kv.block_table(id).to_vec(),
            sample,
            num_output_tokens,
        }
    }

    /// Take `id` (already removed from `running`) out of the cache and put it at the front
    /// of the queue; its tokens, outputs included, are recomputed when it comes back.
    fn preempt(&mut self, id: RequestId, out: &mut SchedulerOutput) {
        self.kv.free(id);
        if let Some(req) = self.requests.get_mut(&id) {
            req.num_computed_tokens = 0;
            req.status = Status::Waiting;
        }
        self.waiting.push_front(id);
        out.preempted.push(id);
        self.num_preemptions += 1;
    }

    /// End a request whose sequence no longer fits in the whole KV cache (already removed
    /// from `running`/`waiting`); its output comes with the next `update_from_output`.
    fn finish_in_schedule(&mut self, id: RequestId) {
        self.kv.free(id);
        self.requests.remove(&id);
        self.finished_since_last.push(id);
        self.pending_outputs.push(EngineCoreOutput {
            req_id: id,
            new_token_ids: Vec::new(),
            new_logprobs: Vec::new(),
            prompt_logprobs: None,
            finish_reason: Some(FinishReason::Length),
            stop_token: None,
        });
    }

    /// End a request that hit a stop condition (running, or preempted while its last step
    /// ran) and free its blocks.
    fn finish_request(&mut self, id: RequestId) {
        self.running.retain(|&r| r != id);
        self.waiting.retain(|&r| r != id);
        self.kv.free(id);
        self.requests.remove(&id);
        self.finished_since_last.push(id);
    }
}
