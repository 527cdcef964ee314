//! `ModelRunner<B>`: per-request sampling state, the KV cache and the model on one backend.
use std::collections::HashMap;

use anyhow::{Context, Result};

use super::batch::{build_forward_batch, RowUse};
use super::RunnerConfig;
use crate::backend::{Backend, KvCacheShape};
use crate::models::config::ModelConfig;
use crate::models::llama::{LlamaModel, Workspace};
use crate::models::weights::WeightMap;
use crate::sampling::sampler::{top_logprobs, SeqSampler};
use crate::sampling::structured::StructuredSupport;
use crate::scheduler::{
    ModelRunnerOutput, RequestId, SampledToken, ScheduledRequest, SchedulerOutput, TokenLogprobs,
    PLACEHOLDER_TOKEN,
};

/// Workspace rows allocated up front; it grows to the largest step actually seen (up to
/// max_num_batched_tokens) so that small runs do not pay for the largest possible step.
const INITIAL_WORKSPACE_ROWS: usize = 512;

struct RequestState {
    sampler: SeqSampler,
    prompt: Vec<u32>,
    /// Top-k of prompt logprobs still to be delivered (None: not asked, or delivered).
    prompt_logprobs_k: Option<usize>,
    /// Prompt logprobs of the chunks computed so far.
    prompt_logprobs: Vec<TokenLogprobs>,
}

pub struct ModelRunner<B: Backend> {
    backend: B,
    model: LlamaModel<B>,
    kv: B::KvCache,
    kv_shape: KvCacheShape,
    ws: Workspace<B>,
    requests: HashMap<RequestId, RequestState>,
    /// The tokens the last step sampled: what the next step's placeholders stand for.
    last_sampled: HashMap<RequestId, u32>,
    /// Compiles the grammars of constrained requests (structured output).
    structured: StructuredSupport,
    /// Tensor parallelism: the other ranks of the group, which run every forward with this
    /// one (rank 0); None for a single rank.
    peers: Option<super::tensor_parallel::TpPeers>,
    step_counts: super::StepCounts,
}

/// Workspace rows a runner starts with (see `INITIAL_WORKSPACE_ROWS`).
pub(super) fn initial_rows(cfg: &RunnerConfig) -> usize {
    cfg.max_num_batched_tokens.clamp(1, INITIAL_WORKSPACE_ROWS)
}

impl<B: Backend> ModelRunner<B> {
    /// Loads the model onto `backend` and allocates a KV cache of `num_kv_blocks` blocks.
    pub fn new(
        backend: B,
        config: &ModelConfig,
        weights: Option<WeightMap>,
        cfg: &RunnerConfig,
        num_kv_blocks: usize,
    ) -> Result<Self> {
        let model = LlamaModel::load(&backend, config, weights).context("building the model")?;
        Self::from_model(backend, model, cfg, num_kv_blocks)
    }

    /// A runner for a model already loaded onto `backend` (one rank's part, for a rank of a
    /// tensor-parallel group: the KV cache holds that rank's KV heads).
    pub fn from_model(
        backend: B,
        model: LlamaModel<B>,
        cfg: &RunnerConfig,
        num_kv_blocks: usize,
    ) -> Result<Self> {
        let kv_shape = super::tensor_parallel::kv_shape(model.config(), cfg, num_kv_blocks);
        let kv = backend
            .alloc_kv_cache(kv_shape)
            .context("allocating the KV cache")?;
        let ws = Workspace::new(&backend, model.config(), initial_rows(cfg))
            .context("allocating activations")?;
        Ok(Self {
            backend,
            model,
            kv,
            kv_shape,
            ws,
            requests: HashMap::new(),
            last_sampled: HashMap::new(),
            structured: StructuredSupport::refused("no structured output was set up"),
            peers: None,
            step_counts: super::StepCounts::default(),
        })
    }

    /// This runner is rank 0 of a tensor-parallel group whose other ranks are `peers`.
    pub(super) fn with_peers(mut self, peers: super::tensor_parallel::TpPeers) -> Self {
        self.peers = Some(peers);
        self
    }

    /// Ranks that run each step (1 without tensor parallelism).
    pub fn tensor_parallel_size(&self) -> usize {
        self.peers.as_ref().map_or(1, |p| p.world_size())
    }

    /// Constrained requests get their grammar matchers from `structured`.
    pub fn with_structured(mut self, structured: StructuredSupport) -> Self {
        self.structured = structured;
        self
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Requests whose sampling state the runner holds.
    pub fn num_tracked_requests(&self) -> usize {
        self.requests.len()
    }

    fn update_states(&mut self, so: &SchedulerOutput) {
        for id in &so.finished {
            self.requests.remove(id);
        }
        for id in &so.preempted {
            // The prompt is recomputed from the start: its logprobs too, unless delivered.
            if let Some(st) = self.requests.get_mut(id) {
                st.prompt_logprobs.clear();
            }
        }
        let eos = &self.model.config().eos_token_ids;
        let vocab = self.model.config().vocab_size;
        // Built (if it is not yet) only for a constrained request: admission has built it.
        let constrained = so
            .new_requests
            .iter()
            .any(|nr| nr.sampling.structured_output.is_some());
        let structured = match constrained {
            true => self.structured.get().ok().map(|s| s.as_ref()),
            false => None,
        };
        for nr in &so.new_requests {
            self.requests
                .entry(nr.req_id)
                .or_insert_with(|| RequestState {
                    sampler: SeqSampler::for_request(
                        &nr.sampling,
                        &nr.prompt_token_ids,
                        eos,
                        structured,
                        vocab,
                    ),
                    prompt: nr.prompt_token_ids.clone(),
                    prompt_logprobs_k: nr.sampling.prompt_logprobs,
                    prompt_logprobs: Vec::new(),
                });
        }
    }

    /// Runs one step now: its placeholders are the tokens of the step run before it.
    pub(crate) fn run_step(&mut self, so: &SchedulerOutput) -> Result<ModelRunnerOutput> {
        let resolved = resolve_placeholders(so, &self.last_sampled)?;
        let out = self.run(resolved.as_ref().unwrap_or(so))?;
        self.last_sampled = out.sampled.iter().map(|t| (t.req_id, t.token_id)).collect();
        Ok(out)
    }

    fn run(&mut self, so: &SchedulerOutput) -> Result<ModelRunnerOutput> {
        self.update_states(so);
        if so.scheduled.is_empty() {
            return Ok(ModelRunnerOutput::default());
        }
        for sr in &so.scheduled {
            anyhow::ensure!(
                self.requests.contains_key(&sr.req_id),
                "request {} was scheduled but never sent to the runner as new",
                sr.req_id
            );
        }
        let requests = &self.requests;
        let (batch, uses) = build_forward_batch(so, self.kv_shape.block_size, |i| {
            let st = &requests[&so.scheduled[i].req_id];
            st.prompt_logprobs_k.map(|_| st.prompt.as_slice())
        })?;
        let vocab = self.model.config().vocab_size;
        let Self {
            backend,
            model,
            kv,
            ws,
            requests,
            peers,
            ..
        } = self;
        let mut out = ModelRunnerOutput::default();
        if let Some(p) = peers.as_ref() {
            p.start(&batch)?;
        }
        let done = model.forward_chunked(backend, &batch, kv, ws, |first, chunk| {
            for (i, logits) in chunk.chunks_exact_mut(vocab).enumerate() {
                let row = first + i;
                let u = uses
                    .get(row)
                    .with_context(|| format!("logits row {row} has no use"))?;
                handle_row(requests, so, *u, logits, &mut out)?;
            }
            Ok(())
        });
        match peers.as_ref() {
            Some(p) => p.finish(done)?,
            None => done?,
        }
        if !out.sampled.is_empty() {
            let c = &mut self.step_counts;
            c.eager_steps += 1;
            let requests = &self.requests;
            if out.sampled.iter().any(|t| {
                requests
                    .get(&t.req_id)
                    .is_some_and(|st| st.sampler.is_constrained())
            }) {
                c.grammar_mask_steps += 1;
            }
        }
        Ok(out)
    }
}

impl<B: Backend> ModelRunner<B> {
    pub fn num_kv_blocks(&self) -> usize {
        self.kv_shape.num_blocks
    }
    pub fn block_size(&self) -> usize {
        self.kv_shape.block_size
    }
    pub fn device_name(&self) -> String {
        self.backend.device_name()
    }
    /// Every step runs eagerly here: no graphs.
    pub fn step_counts(&self) -> super::StepCounts {
        self.step_counts
    }
}

/// `so` with each `PLACEHOLDER_TOKEN` replaced by the token `previous` sampled for its
/// request; None when it has none.
pub(crate) fn resolve_placeholders(
    so: &SchedulerOutput,
    previous: &HashMap<RequestId, u32>,
) -> Result<Option<SchedulerOutput>> {
    let pending = |sr: &ScheduledRequest| sr.token_ids.contains(&PLACEHOLDER_TOKEN);
    if !so.scheduled.iter().any(pending) {
        return Ok(None);
    }
    let mut resolved = so.clone();
    for sr in resolved.scheduled.iter_mut().filter(|sr| pending(sr)) {
        let token = *previous.get(&sr.req_id).with_context(|| {
            format!(
                "request {} was scheduled with the token of a step that sampled none for it; \
                 this is a bug",
                sr.req_id
            )
        })?;
        for t in sr.token_ids.iter_mut().filter(|t| **t == PLACEHOLDER_TOKEN) {
            *t = token;
        }
    }
    Ok(Some(resolved))
}

/// Uses one row of logits: a prompt logprob, or the next token of a request.
fn handle_row(
    requests: &mut HashMap<RequestId, RequestState>,
    so: &SchedulerOutput,
    u: RowUse,
    logits: &mut [f32],
    out: &mut ModelRunnerOutput,
) -> Result<()> {
    match u {
        RowUse::PromptLogprob {
            sched_index,
            target,
        } => {
            if let Some(st) = requests.get_mut(&so.scheduled[sched_index].req_id) {
                if let Some(k) = st.prompt_logprobs_k {
                    st.prompt_logprobs.push(top_logprobs(logits, target, k));
                }
            }
        }
        RowUse::Sample { sched_index } => {
            let sr = &so.scheduled[sched_index];
            let st = requests
                .get_mut(&sr.req_id)
                .with_context(|| format!("request {} is not tracked by the runner", sr.req_id))?;
            // The chunk that reaches the end of the prompt delivers its logprobs.
            let prompt_logprobs = if sr.start_pos + sr.token_ids.len() >= st.prompt.len() {
                st.prompt_logprobs_k
                    .take()
                    .map(|_| std::mem::take(&mut st.prompt_logprobs))
            } else {
                None
            };
            let (token_id, logprobs) = st.sampler.sample(logits, sr.num_output_tokens);
            st.sampler.record_output(token_id);
            out.sampled.push(SampledToken {
                req_id: sr.req_id,
                token_id,
                logprobs,
                prompt_logprobs,
            });
        }
    }
    Ok(())
}
