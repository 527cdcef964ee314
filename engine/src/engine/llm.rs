//! The offline front end (`rvllm generate`, `rvllm bench`): drives the core in the calling
//! thread until every request of a batch is done, like vLLM's `LLM.generate`.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};

use super::args::EngineArgs;
use super::core::EngineCore;
use super::output::{SeqOutput, StopReason};
use super::request::admit;
use crate::sampling::SamplingParams;
use crate::scheduler::{FinishReason, RequestId, TokenLogprobs};
use crate::tokenizer::Tokenizer;

#[derive(Debug, Clone)]
pub struct CompletionOutput {
    pub index: usize,
    pub text: String,
    pub token_ids: Vec<u32>,
    pub logprobs: Vec<TokenLogprobs>,
    pub finish_reason: Option<FinishReason>,
    pub stop_reason: Option<StopReason>,
}

#[derive(Debug, Clone)]
pub struct RequestOutput {
    pub prompt_token_ids: Vec<u32>,
    pub prompt_logprobs: Option<Vec<Option<TokenLogprobs>>>,
    pub outputs: Vec<CompletionOutput>,
    /// From submission to the first generated token of any sequence.
    pub time_to_first_token: Option<Duration>,
    /// From submission to the last sequence finishing.
    pub latency: Duration,
}

pub struct Llm {
    pub core: EngineCore,
    tokenizer: Option<Arc<Tokenizer>>,
}

/// Where each core request's outputs go: (index into the batch, sequence index).
struct Slot {
    request: usize,
    seq: usize,
}

impl Llm {
    pub fn new(args: &EngineArgs) -> Result<Self> {
        let (core, tokenizer) = EngineCore::new(args)?;
        Ok(Self {
            core,
            tokenizer: tokenizer.map(Arc::new),
        })
    }

    pub fn tokenizer(&self) -> Option<Arc<Tokenizer>> {
        self.tokenizer.clone()
    }

    pub fn max_model_len(&self) -> usize {
        self.core.max_model_len
    }

    /// Run a batch to completion. `params` holds one entry per prompt, or one for all.
    /// `on_step` is told the number of finished requests after each step (progress bars).
    pub fn generate(
        &mut self,
        prompts: &[Vec<u32>],
        params: &[SamplingParams],
        mut on_step: impl FnMut(usize),
    ) -> Result<Vec<RequestOutput>> {
        if params.len() != 1 && params.len() != prompts.len() {
            return Err(anyhow!(
                "give one SamplingParams for all prompts or one per prompt"
            ));
        }
        let start = Instant::now();
        let eos = self.core.config.eos_token_ids.clone();
        let mut results = Vec::with_capacity(prompts.len());
        let mut texts: Vec<Vec<SeqOutput>> = Vec::with_capacity(prompts.len());
        let mut slots: HashMap<RequestId, Slot> = HashMap::new();
        let mut pending = Vec::with_capacity(prompts.len());
        for (i, prompt) in prompts.iter().enumerate() {
            let p = if params.len() == 1 {
                &params[0]
            } else {
                &params[i]
            };
            crate::sampling::structured::check_request(&self.core.structured, p)
                .map_err(|e| anyhow!("prompt {i}: invalid `{}`: {}", e.param, e.message))?;
            let (p, reqs) = admit(
                prompt,
                p,
                self.core.max_model_len,
                self.core.config.vocab_size,
                &eos,
            )
            .map_err(|e| anyhow!("prompt {i}: {e}"))?;
            texts.push(SeqOutput::for_request(
                reqs.len(),
                self.tokenizer.clone(),
                prompt,
                &p,
            ));
            results.push(RequestOutput {
                prompt_token_ids: prompt.clone(),
                prompt_logprobs: None,
                outputs: (0..reqs.len())
                    .map(|s| CompletionOutput {
                        index: s,
                        text: String::new(),
                        token_ids: Vec::new(),
                        logprobs: Vec::new(),
                        finish_reason: None,
                        stop_reason: None,
                    })
                    .collect(),
                time_to_first_token: None,
                latency: Duration::ZERO,
            });
            pending.push((i, reqs));
        }
        // Only once every prompt is admitted do requests enter the core, so that a rejected
        // batch leaves nothing running (and holding KV blocks) behind.
        for (i, reqs) in pending {
            for (s, req) in reqs.into_iter().enumerate() {
                let id = req.req_id;
                if let Err(e) = self.core.add_request(req) {
                    self.abort_all(&slots);
                    return Err(anyhow!("prompt {i}: {e}"));
                }
                slots.insert(id, Slot { request: i, seq: s });
            }
        }
        let mut done_requests = 0;
        while self.core.has_unfinished() {
            let outputs = match self.core.step() {
                Ok(o) => o,
                Err(e) => {
                    self.abort_all(&slots);
                    return Err(e);
                }
            };
            for out in outputs {
                let Some(slot) = slots.get(&out.req_id) else {
                    continue;
                };
                let (req_idx, seq_idx, id) = (slot.request, slot.seq, out.req_id);
                let (delta, stopped) = texts[req_idx][seq_idx].process(out);
                if stopped {
                    self.core.abort(id);
                }
                let r = &mut results[req_idx];
                if r.time_to_first_token.is_none() && !delta.token_ids.is_empty() {
                    r.time_to_first_token = Some(start.elapsed());
                }
                if delta.prompt_logprobs.is_some() {
                    r.prompt_logprobs = delta.prompt_logprobs;
                }
                let o = &mut r.outputs[seq_idx];
                o.token_ids.extend(&delta.token_ids);
                o.logprobs.extend(delta.logprobs);
                if delta.finish_reason.is_some() {
                    o.finish_reason = delta.finish_reason;
                    o.stop_reason = delta.stop_reason;
                    slots.remove(&id);
                    if r.outputs.iter().all(|o| o.finish_reason.is_some()) {
                        r.latency = start.elapsed();
                        done_requests += 1;
                    }
                }
            }
            on_step(done_requests);
        }
        for (r, seqs) in results.iter_mut().zip(&texts) {
            for (o, t) in r.outputs.iter_mut().zip(seqs) {
                o.text = t.text().to_string();
                // A stop string may end the text mid-token: keep the ids the text came from.
            }
        }
        Ok(results)
    }

    /// Drop the batch's unfinished requests from the core (their blocks are freed).
    fn abort_all(&mut self, slots: &HashMap<RequestId, Slot>) {
        for &id in slots.keys() {
            self.core.abort(id);
        }
    }
}
