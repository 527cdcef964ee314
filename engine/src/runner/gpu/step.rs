//! One step of the GPU runner: request bookkeeping, the batch (decodes first, sampled rows
//! before prompt-logprob rows), its uploads, the graph or the eager launches, and the
//! results read back in `collect`. A step with constrained rows (structured output) queues
//! its body and LM head first, then waits for any queued step holding one of their last
//! tokens, builds their grammar masks on the host while the body runs, uploads them and
//! only then queues the sampler (`grammar_masks`): the device does not idle on the host.
use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::executor::{GpuRequest, GpuRunner};
use super::graphs;
use crate::backend::cuda::backend::CudaStepMeta;
use crate::backend::cuda::elem::value_of;
use crate::backend::Backend;
use crate::runner::{build_forward_batch, RowUse};
use crate::sampling::sampler::top_logprobs;
use crate::scheduler::{
    ModelRunnerOutput, RequestId, SampledToken, ScheduledRequest, SchedulerOutput, TokenLogprobs,
    PLACEHOLDER_TOKEN,
};

/// A step handed to `submit` and not yet collected.
pub(super) enum Submitted {
    /// Done already (a step with nothing to sample), or failed.
    Ready(Result<ModelRunnerOutput>),
    /// Queued on the device.
    Device(DeviceStep),
}

pub(super) struct DeviceStep {
    /// The request whose token each sampled row holds, with the top logprobs it asked for.
    rows: Vec<(RequestId, Option<usize>)>,
    /// The sampling requests in scheduling order (the output's order).
    sched_ids: Vec<RequestId>,
    /// Prompt logprobs delivered with this step's token, by request.
    prompt_logprobs: HashMap<RequestId, Vec<TokenLogprobs>>,
    /// Which of `downloads` receives the results, and whether logprobs come too.
    slot: usize,
    logprobs: bool,
    graph: bool,
}

/// Where a step's host time goes: preparing the batch (bookkeeping, batch, checks, rows),
/// submitting (uploads and launches), waiting for the sampled tokens, and finishing.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct PhaseTimes {
    /// u64: these counts are also /metrics counters of a server that may run for months.
    steps: u64,
    prepare: Duration,
    submit: Duration,
    pub(super) wait: Duration,
    finish: Duration,
    /// The share of the steps (and of their submit and wait) that replayed a decode graph.
    graph_steps: u64,
    graph_submit: Duration,
    graph_wait: Duration,
    /// Steps with grammar masks, the host time building and queuing them, and how many of
    /// those steps had to wait for the step queued before (behind their own queued body).
    masked_steps: u64,
    masks: Duration,
    mask_waits: u64,
    /// Host time those waits took (the step before's tail on the device; with the body
    /// queued first it overlaps this step's body).
    mask_wait: Duration,
}

impl PhaseTimes {
    /// The step counts of `report`, for /metrics.
    pub(super) fn counts(&self) -> crate::runner::StepCounts {
        crate::runner::StepCounts {
            graph_steps: self.graph_steps,
            eager_steps: self.steps - self.graph_steps,
            grammar_mask_steps: self.masked_steps,
        }
    }

    pub(super) fn report(&self) -> String {
        let n = self.steps.max(1) as f64;
        let ms = |d: Duration| d.as_secs_f64() * 1e3 / n;
        let split = |steps: u64, submit: Duration, wait: Duration| {
            let k = steps.max(1) as f64;
            format!(
                "{steps} steps, submit {:.3} ms, wait {:.3} ms",
                submit.as_secs_f64() * 1e3 / k,
                wait.as_secs_f64() * 1e3 / k
            )
        };
        // Graph replays and eager steps cost the host very differently: show both.
        let masks = match self.masked_steps {
            0 => String::new(),
            k => format!(
                "\n  grammar masks: {k} steps, {:.3} ms each, {} waited for the step before ({:.3} ms each)",
                self.masks.as_secs_f64() * 1e3 / k as f64,
                self.mask_waits,
                self.mask_wait.as_secs_f64() * 1e3 / self.mask_waits.max(1) as f64
            ),
        };
        format!(
            "{} device steps; per step: prepare {:.3} ms, submit {:.3} ms, wait {:.3} ms, finish {:.3} ms\n  decode graphs: {}; eager: {}{masks}",
            self.steps,
            ms(self.prepare),
            ms(self.submit),
            ms(self.wait),
            ms(self.finish),
            split(self.graph_steps, self.graph_submit, self.graph_wait),
            split(
                self.steps - self.graph_steps,
                self.submit - self.graph_submit,
                self.wait - self.graph_wait
            )
        )
    }
}

impl GpuRunner {
    /// Requests that finished leave, preempted ones will recompute their prompt logprobs,
    /// new ones join (their sampling state goes up with the next step).
    fn update_requests(&mut self, so: &SchedulerOutput) -> Result<()> {
        for id in &so.finished {
            self.requests.remove(id);
            self.slots.leave(*id);
            self.grammars.leave(*id);
        }
        for id in &so.preempted {
            if let Some(st) = self.requests.get_mut(id) {
                st.prompt_logprobs.clear();
            }
        }
        let eos = self.config.eos_token_ids.clone();
        for nr in &so.new_requests {
            if self.requests.contains_key(&nr.req_id) {
                continue; // resumed after preemption: its slot and state stay
            }
            let slot = self.slots.join(nr.req_id)?;
            let seed = nr.sampling.seed.unwrap_or_else(rand::random);
            self.joins
                .push(slot, &nr.sampling, seed, &nr.prompt_token_ids, &eos)
                .with_context(|| format!("request {}", nr.req_id))?;
            self.grammars.join(nr.req_id, &nr.sampling);
            self.requests.insert(
                nr.req_id,
                GpuRequest {
                    params: nr.sampling.clone(),
                    prompt: nr.prompt_token_ids.clone(),
                    prompt_logprobs_k: nr.sampling.prompt_logprobs,
                    prompt_logprobs: Vec::new(),
                },
            );
        }
        Ok(())
    }

    pub(super) fn submit_step(&mut self, so: &SchedulerOutput) -> Result<Submitted> {
        let t_start = Instant::now();
        self.update_requests(so)?;
        if so.scheduled.is_empty() {
            return Ok(Submitted::Ready(Ok(ModelRunnerOutput::default())));
        }
        for sr in &so.scheduled {
            if !self.requests.contains_key(&sr.req_id) {
                bail!(
                    "request {} was scheduled but never sent to the runner as new",
                    sr.req_id
                );
            }
        }
        // Decodes first: the attention dispatch takes the leading one-token sequences.
        let mut order: Vec<usize> = (0..so.scheduled.len()).collect();
        order.sort_by_key(|&i| so.scheduled[i].token_ids.len() > 1);
        let mut reordered = SchedulerOutput {
            scheduled: order
                .iter()
                .map(|&i| so.scheduled[i].clone())
                .collect::<Vec<ScheduledRequest>>(),
            ..Default::default()
        };
        let feed = self.placeholders_fed_on_device(&mut reordered)?;
        let requests = &self.requests;
        let (mut batch, uses) = build_forward_batch(&reordered, self.kv_shape.block_size, |i| {
            let st = &requests[&reordered.scheduled[i].req_id];
            st.prompt_logprobs_k.map(|_| st.prompt.as_slice())
        })?;
        // Sampled rows first (the sampler's rows 0..n), prompt-logprob rows after them.
        let mut sampled = Vec::new();
        let mut prompt_rows = Vec::new();
        for (row, u) in batch.logits_rows.iter().zip(&uses) {
            match *u {
                RowUse::Sample { sched_index } => sampled.push((*row, sched_index)),
                RowUse::PromptLogprob {
                    sched_index,
                    target,
                } => prompt_rows.push((*row, sched_index, target)),
            }
        }
        batch.logits_rows = sampled
            .iter()
            .map(|s| s.0)
            .chain(prompt_rows.iter().map(|p| p.0))
            .collect();
        batch.validate(&self.be.kv_cache_shape(&self.kv), self.config.vocab_size)?;
        if batch.num_tokens() > self.ws.capacity() {
            bail!(
                "a step of {} tokens is larger than the activations sized at start-up; this is a bug \
                 (the profiling pass sizes them for --max-num-batched-tokens)",
                batch.num_tokens()
            );
        }
        let n = sampled.len();
        let mut rows = Vec::with_capacity(n);
        let (mut row_slots, mut row_steps, mut row_k) = (vec![], vec![], vec![]);
        let mut filtered = false;
        let vocab = self.config.vocab_size;
        for &(_, si) in &sampled {
            let sr = &reordered.scheduled[si];
            let st = &self.requests[&sr.req_id];
            let slot = self
                .slots
                .get(sr.req_id)
                .context("a live request lost its slot")?;
            let p = &st.params;
            let top_k_filters = p.top_k > 1 && (p.top_k as usize) < vocab;
            if !p.is_greedy() && (top_k_filters || p.top_p < 1.0 || p.min_p > 0.0) {
                filtered = true;
            }
            row_slots.push(slot as i32);
            row_steps.push(i32::try_from(sr.num_output_tokens).context("sampling step")?);
            row_k.push(p.logprobs.map_or(-1, |k| k as i32));
            rows.push((sr.req_id, p.logprobs));
        }
        let want_logprobs = rows.iter().any(|r| r.1.is_some());
        let pure_decode = prompt_rows.is_empty()
            && batch.seqs.iter().all(|s| s.num_tokens == 1)
            && n == batch.seqs.len();
        let graph_size = if pure_decode {
            graphs::graph_size_for(n, |g| self.graphs.contains_key(&g))
        } else {
            None
        };
        let t_prepared = Instant::now();
        if !self.joins.is_empty() {
            self.sampler.init_slots(&self.gpu, &self.joins)?;
            self.joins.clear();
        }
        self.sampler
            .upload_rows(&self.gpu, &row_slots, &row_steps, &row_k)?;
        let mut delivered = HashMap::new();
        match graph_size {
            Some(g) => {
                let padded = graphs::padded(&batch, g);
                let step = self.be.upload_step(&padded)?;
                self.feed_tokens(&feed, &step)?;
                if let Some(tp) = self.tp.as_mut() {
                    tp.step(&self.be, &padded, Some(g), &step)?;
                }
                // The body first: the masks are built while it runs (the step before may
                // have to finish first) and go up before the sampler in stream order.
                self.graphs[&g].forward.launch(&self.gpu, g)?;
                self.grammar_masks(&rows)?;
                self.graphs[&g].sample.launch(&self.gpu, g)?;
            }
            None => {
                let step = self.be.upload_step(&batch)?;
                self.feed_tokens(&feed, &step)?;
                if let Some(tp) = self.tp.as_mut() {
                    tp.step(&self.be, &batch, None, &step)?;
                }
                self.model
                    .forward_hidden(&self.be, &step, &mut self.kv, &mut self.ws)?;
                if !prompt_rows.is_empty() {
                    self.prompt_logprobs(&step, n, &prompt_rows, &reordered)?;
                }
                // The chunk that reaches the end of a prompt delivers its prompt logprobs.
                for &(_, si) in &sampled {
                    let sr = &reordered.scheduled[si];
                    let st = self.requests.get_mut(&sr.req_id).context("lost request")?;
                    if sr.start_pos + sr.token_ids.len() >= st.prompt.len()
                        && st.prompt_logprobs_k.take().is_some()
                    {
                        delivered.insert(sr.req_id, std::mem::take(&mut st.prompt_logprobs));
                    }
                }
                if n == 0 {
                    // Only non-final prefill chunks: nothing to sample.
                    self.last_rows.clear();
                    return Ok(Submitted::Ready(Ok(ModelRunnerOutput::default())));
                }
                self.lm_head(&step, 0..n)?;
                let masked = self.grammar_masks(&rows)?;
                self.sampler
                    .launch_with(&self.gpu, self.logits_elem.ptr, n, filtered, masked)?;
            }
        }
        // The results come back behind the step; the slot's previous copy must have been read.
        let slot = self.next_download;
        if self
            .queue
            .iter()
            .any(|q| matches!(q, Submitted::Device(d) if d.slot == slot))
        {
            self.finish_queued_device_steps();
        }
        self.next_download ^= 1;
        let d = &mut self.downloads[slot];
        self.sampler.download(
            &self.gpu,
            &mut d.tokens,
            want_logprobs.then_some(&mut d.logprobs),
            n,
        )?;
        d.done.record(&self.gpu)?;
        self.last_rows = rows
            .iter()
            .enumerate()
            .map(|(row, &(id, _))| (id, row as u32))
            .collect();
        let p = &mut self.phases;
        p.prepare += t_prepared - t_start;
        p.submit += t_prepared.elapsed();
        if graph_size.is_some() {
            p.graph_submit += t_prepared.elapsed();
        }
        Ok(Submitted::Device(DeviceStep {
            rows,
            sched_ids: so
                .scheduled
                .iter()
                .filter(|s| s.sample)
                .map(|s| s.req_id)
                .collect(),
            prompt_logprobs: delivered,
            slot,
            logprobs: want_logprobs,
            graph: graph_size.is_some(),
        }))
    }

    /// Queues the grammar masks of the step's sampled `rows` (true: some row is masked).
    /// A constrained row's mask needs its request's last token: a queued step that holds one
    /// is waited for first (its output is kept for `collect`), which advances the grammars.
    /// Called after the step's body is queued and before its sampler, so that wait and the
    /// host's mask building overlap the body on the device.
    fn grammar_masks(&mut self, rows: &[(RequestId, Option<usize>)]) -> Result<bool> {
        if self.grammars.is_empty() {
            // Nothing constrained: at most a reset of the last masked step's indexes.
            return self.sampler.upload_masks(&self.gpu, false, |_, _| Ok(0));
        }
        let ids: Vec<RequestId> = rows.iter().map(|r| r.0).collect();
        let constrained = ids.iter().any(|&id| self.grammars.is_constrained(id));
        if constrained {
            let queued = self.queue.iter().flat_map(|q| match q {
                Submitted::Device(d) => d.rows.as_slice(),
                Submitted::Ready(_) => &[],
            });
            if self.grammars.must_wait(&ids, queued.map(|r| r.0)) {
                let t_wait = Instant::now();
                self.finish_queued_device_steps();
                self.phases.mask_waits += 1;
                self.phases.mask_wait += t_wait.elapsed();
            }
        }
        let t0 = Instant::now();
        let grammars = &mut self.grammars;
        let mut ended = Vec::new();
        let masked = self
            .sampler
            .upload_masks(&self.gpu, constrained, |index, masks| {
                let m = grammars.fill_masks(&ids, index, masks)?;
                ended = m.end_min_tokens;
                Ok(m.rows)
            })?;
        for id in ended {
            let slot = self.slots.get(id).context("a live request lost its slot")?;
            self.sampler.end_min_tokens(&self.gpu, slot)?;
        }
        if masked {
            self.phases.masked_steps += 1;
            self.phases.masks += t0.elapsed();
        }
        Ok(masked)
    }

    /// Prompt logprobs of the step's logits rows after the `first` sampled ones, in groups the
    /// LM head's buffers hold; computed on the host from the downloaded logits (the step
    /// waits for them: only prefill steps of requests that ask pay this).
    fn prompt_logprobs(
        &mut self,
        step: &CudaStepMeta,
        first: usize,
        rows: &[(u32, usize, u32)],
        so: &SchedulerOutput,
    ) -> Result<()> {
        let vocab = self.config.vocab_size;
        let mut start = 0;
        while start < rows.len() {
            let end = (start + self.max_rows).min(rows.len());
            self.lm_head(step, first + start..first + end)?;
            let mut raw = vec![0u16; (end - start) * vocab];
            self.gpu.download(&mut raw, self.logits_elem.ptr)?;
            for (i, &(_, si, target)) in rows[start..end].iter().enumerate() {
                let logits: Vec<f32> = raw[i * vocab..(i + 1) * vocab]
                    .iter()
                    .map(|&b| value_of(b, self.be.dtype))
                    .collect();
                let id = so.scheduled[si].req_id;
                if let Some(st) = self.requests.get_mut(&id) {
                    if let Some(k) = st.prompt_logprobs_k {
                        st.prompt_logprobs.push(top_logprobs(&logits, target, k));
                    }
                }
            }
            start = end;
        }
        Ok(())
    }

    /// Replaces each placeholder of `so` with 0 and a (token index in the step, row of the
    /// sampler's tokens) pair for `feed_tokens`: the token is the last step's, still on the
    /// device.
    fn placeholders_fed_on_device(&self, so: &mut SchedulerOutput) -> Result<Vec<i32>> {
        let mut feed = Vec::new();
        let mut offset = 0;
        for sr in &mut so.scheduled {
            for (k, t) in sr.token_ids.iter_mut().enumerate() {
                if *t != PLACEHOLDER_TOKEN {
                    continue;
                }
                let Some(&row) = self.last_rows.get(&sr.req_id) else {
                    bail!(
                        "request {} was scheduled with the token of a step that sampled none for \
                         it; this is a bug",
                        sr.req_id
                    );
                };
                *t = 0;
                feed.extend([(offset + k) as i32, row as i32]);
            }
            offset += sr.token_ids.len();
        }
        Ok(feed)
    }

    /// Puts the previous step's sampled tokens into this step's ids (after its upload).
    fn feed_tokens(&mut self, feed: &[i32], step: &CudaStepMeta) -> Result<()> {
        if feed.is_empty() {
            return Ok(());
        }
        let buf = self.feed_staging.take_turn();
        buf.slice_mut(feed.len()).copy_from_slice(feed);
        buf.upload(&self.gpu, self.feed.ptr, feed.len() * 4)?;
        let pairs = feed.len() / 2;
        self.gpu.launch_args(
            ((pairs as u32).div_ceil(256), 1, 1),
            (256, 1, 1),
            0,
            rvllm_kernels::args::FeedSampledTokens {
                ids: step.ids(),
                feed: self.feed.ptr,
                tokens: self.sampler.tokens.ptr,
                n: pairs as i32,
            },
        )
    }

    /// Waits for a device step's results and makes its output.
    pub(super) fn finish_device_step(&mut self, d: DeviceStep) -> Result<ModelRunnerOutput> {
        let t0 = Instant::now();
        let dl = &self.downloads[d.slot];
        dl.done.wait()?;
        if self.gpu.profiler.is_some() {
            self.gpu.sync()?; // resolves the kernel timings
        }
        let toks: Vec<i32> = dl.tokens.slice(d.rows.len()).to_vec();
        let t_done = Instant::now();
        if !self.grammars.is_empty() {
            for (&(id, _), &t) in d.rows.iter().zip(&toks) {
                self.grammars.accept(id, t as u32);
            }
        }
        let mut by_id: HashMap<RequestId, (u32, Option<TokenLogprobs>)> =
            HashMap::with_capacity(toks.len());
        for (r, (&(id, k), &t)) in d.rows.iter().zip(&toks).enumerate() {
            let logprobs = match (k, d.logprobs) {
                (Some(k), true) => {
                    let lp = self.sampler.read_logprobs(&dl.logprobs, r, k);
                    Some(TokenLogprobs {
                        token_id: t as u32,
                        logprob: lp.logprob,
                        rank: lp.rank,
                        top: lp.top,
                    })
                }
                _ => None,
            };
            by_id.insert(id, (t as u32, logprobs));
        }
        let mut prompt_logprobs = d.prompt_logprobs;
        let mut sampled = Vec::with_capacity(d.sched_ids.len());
        for id in &d.sched_ids {
            let (token_id, logprobs) = by_id
                .remove(id)
                .with_context(|| format!("request {id} has no sampled row; this is a bug"))?;
            sampled.push(SampledToken {
                req_id: *id,
                token_id,
                logprobs,
                prompt_logprobs: prompt_logprobs.remove(id),
            });
        }
        let p = &mut self.phases;
        p.steps += 1;
        p.wait += t_done - t0;
        p.finish += t_done.elapsed();
        if d.graph {
            p.graph_steps += 1;
            p.graph_wait += t_done - t0;
        }
        Ok(ModelRunnerOutput { sampled })
    }

    /// Waits for every step queued on the device and keeps its output for `collect`.
    fn finish_queued_device_steps(&mut self) {
        for entry in std::mem::take(&mut self.queue) {
            let ready = match entry {
                Submitted::Device(d) => Submitted::Ready(self.finish_device_step(d)),
                ready => ready,
            };
            self.queue.push_back(ready);
        }
    }
}
