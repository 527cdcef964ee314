//! The CUDA executor: the generic `ModelRunner` on the `CudaBackend` for every step, plus a
//! fast path for steps whose sampled rows need nothing the host must see (no penalties,
//! logprobs or prompt logprobs): logits stay on the GPU, a kernel samples them, and only the
//! token ids come back. Pure decode steps of that kind replay a CUDA graph captured at
//! start-up for the padded batch size.
use std::collections::{HashMap, VecDeque};
use std::ffi::c_void;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use cudarc::driver::{result as drv, sys};

use super::backend::{CudaBackend, CudaTensor, StepLimits};
use super::device::{DevBuf, Gpu, PinnedBuf, PinnedPair, StreamEvent};
use crate::backend::{Backend, ForwardBatch, SeqSlice};
use crate::engine::EngineArgs;
use crate::models::config::ModelConfig;
use crate::models::LoadedModel;
use crate::runner::{
    build_forward_batch, resolve_placeholders, Executor, ModelRunner, RunnerConfig,
};
use crate::sampling::SamplingParams;
use crate::scheduler::{
    ModelRunnerOutput, SampledToken, ScheduledRequest, SchedulerOutput, PLACEHOLDER_TOKEN,
};

/// Batch sizes with a captured decode graph (those up to --max-num-seqs, plus it). A step
/// runs the smallest graph that holds its batch, so the steps between sizes pad by < 20 %.
const GRAPH_SIZES: &[usize] = &[
    1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 896,
    1024,
];

/// Persistent per-row sampling parameters (fixed addresses for graphs), staged page-locked.
struct SamplingBuffers {
    dev: DevBuf,
    staging: PinnedPair,
    max_rows: usize,
}

impl SamplingBuffers {
    // Layout: temps f32 | top_ks i32 | top_ps f32 | min_ps f32 | seeds u64 | offsets u64
    fn offsets(&self) -> [usize; 6] {
        let n = self.max_rows;
        [0, 4 * n, 8 * n, 12 * n, 16 * n, 24 * n]
    }
    fn bytes(max_rows: usize) -> usize {
        32 * max_rows
    }
    fn ptr(&self, i: usize) -> sys::CUdeviceptr {
        self.dev.ptr + self.offsets()[i] as u64
    }
    /// Writes the rows' parameters (zeros after them) and queues their upload.
    fn upload(&mut self, gpu: &Gpu, rows: &[(f32, i32, f32, f32, u64, u64)]) -> Result<()> {
        let o = self.offsets();
        let bytes = Self::bytes(self.max_rows);
        let buf = self.staging.take_turn();
        let st: &mut [u8] = buf.slice_mut(bytes);
        st.fill(0);
        for (r, &(t, k, p, m, seed, off)) in rows.iter().enumerate() {
            st[o[0] + 4 * r..][..4].copy_from_slice(&t.to_le_bytes());
            st[o[1] + 4 * r..][..4].copy_from_slice(&k.to_le_bytes());
            st[o[2] + 4 * r..][..4].copy_from_slice(&p.to_le_bytes());
            st[o[3] + 4 * r..][..4].copy_from_slice(&m.to_le_bytes());
            st[o[4] + 8 * r..][..8].copy_from_slice(&seed.to_le_bytes());
            st[o[5] + 8 * r..][..8].copy_from_slice(&off.to_le_bytes());
        }
        buf.upload(gpu, self.dev.ptr, bytes)
    }
}

struct Graph {
    exec: sys::CUgraphExec,
}

impl Drop for Graph {
    fn drop(&mut self) {
        unsafe {
            let _ = drv::graph::exec_destroy(self.exec);
        }
    }
}

pub struct CudaExecutor {
    gpu: Arc<Gpu>,
    runner: ModelRunner<CudaBackend>,
    config: ModelConfig,
    block_size: usize,
    num_blocks: usize,
    /// LM-head input rows and f32 logits for the sampled rows of a step.
    gathered: CudaTensor,
    logits: DevBuf,
    /// Logits of the sampled rows in the compute type (widened into `logits` for the sampler).
    logits_elem: DevBuf,
    /// Scratch of the two-kernel sampler (`[rows, nchunks, 5]` int32).
    sample_partials: DevBuf,
    tokens: DevBuf,
    token_logprobs: DevBuf,
    sampling: SamplingBuffers,
    graphs: HashMap<usize, Graph>,
    _cublas_workspace: DevBuf,
    /// Host time of device-path steps by phase (summed since start-up).
    phases: PhaseTimes,
    /// Steps submitted and not yet collected, oldest first.
    queue: VecDeque<Submitted>,
    /// Where the last step, when it was queued on the device, leaves each request's sampled
    /// token (its row of `tokens`): what the next step's placeholders stand for.
    last_rows: HashMap<u64, u32>,
    /// The tokens of the last step, when it ran to completion on the host path.
    last_tokens: HashMap<u64, u32>,
    /// Each device step's sampled tokens come back into one of these (two: the step queued
    /// behind it must not overwrite a copy not yet read).
    downloads: [(PinnedBuf, StreamEvent); 2],
    next_download: usize,
    /// (index into the step's ids, row of `tokens`) of the placeholders filled on the device,
    /// and its staging.
    feed: DevBuf,
    feed_staging: PinnedPair,
}

/// A step handed to `submit` and not yet collected.
enum Submitted {
    /// Done already: the host path, or a step with nothing to sample.
    Ready(Result<ModelRunnerOutput>),
    /// Queued on the device.
    Device(DeviceStep),
}

struct DeviceStep {
    /// The request whose token each row of `tokens` holds.
    row_ids: Vec<u64>,
    /// The sampling requests in scheduling order (the output's order).
    sched_ids: Vec<u64>,
    /// Which of `downloads` receives the tokens.
    slot: usize,
    graph: bool,
}

/// Where a device-path step's host time goes: preparing the batch (runner state, batch,
/// checks, sampling rows), submitting (uploads and launches), waiting for the sampled
/// tokens, and finishing (recording them).
#[derive(Debug, Default, Clone, Copy)]
struct PhaseTimes {
    steps: u32,
    prepare: std::time::Duration,
    submit: std::time::Duration,
    wait: std::time::Duration,
    finish: std::time::Duration,
    /// The share of the steps (and of their submit and wait) that replayed a decode graph.
    graph_steps: u32,
    graph_submit: std::time::Duration,
    graph_wait: std::time::Duration,
}

// SAFETY: used from the engine thread only; raw handles are not shared.
unsafe impl Send for CudaExecutor {}

/// Whether the GPU sampler does exactly what this request asks at this step.
fn device_samplable(p: &SamplingParams, step: usize) -> bool {
    p.presence_penalty == 0.0
        && p.frequency_penalty == 0.0
        && p.repetition_penalty == 1.0
        && p.logprobs.is_none()
        && step >= p.min_tokens
}

pub fn create_cuda_executor(
    model: LoadedModel,
    cfg: &RunnerConfig,
    args: &EngineArgs,
) -> Result<Box<dyn Executor>> {
    Ok(Box::new(CudaExecutor::new(model, cfg, args)?))
}

impl CudaExecutor {
    pub fn new(model: LoadedModel, cfg: &RunnerConfig, args: &EngineArgs) -> Result<Self> {
        let config = model.config.clone();
        let c = &config;
        let dtype = crate::backend::dtype::gpu_dtype(&args.dtype, c.torch_dtype.as_deref())?;
        let gpu = Arc::new(Gpu::new(0)?);
        let max_len = args
            .max_model_len
            .unwrap_or(c.max_position_embeddings)
            .max(1);
        let max_seqs = cfg.max_num_seqs.max(1);
        let limits = StepLimits {
            max_tokens: cfg.max_num_batched_tokens.max(max_seqs).max(1),
            max_seqs,
            max_blocks_per_seq: max_len.div_ceil(cfg.block_size),
        };
        // cuBLAS gets a fixed workspace so that GEMMs can be captured into graphs.
        let ws_bytes = 64 << 20;
        let cublas_ws = gpu.alloc(ws_bytes)?;
        unsafe {
            cudarc::cublas::sys::cublasSetWorkspace_v2(
                gpu.blas,
                cublas_ws.ptr as *mut c_void,
                ws_bytes,
            )
            .result()
            .map_err(|e| anyhow::anyhow!("cublasSetWorkspace: {e:?}"))?;
        }
        let be = CudaBackend::new(
            gpu.clone(),
            limits,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
            dtype,
        )?;
        let gathered = be.alloc_activation(max_seqs, c.hidden_size)?;
        let logits = gpu.alloc(max_seqs * c.vocab_size * 4)?;
        let tokens = gpu.alloc(max_seqs * 4)?;
        let logits_elem = gpu.alloc(max_seqs * c.vocab_size * 2)?;
        let sample_partials = gpu.alloc(max_seqs * 128 * 5 * 4)?;
        let token_logprobs = gpu.alloc(max_seqs * 4)?;
        let sampling = SamplingBuffers {
            dev: gpu.alloc(SamplingBuffers::bytes(max_seqs))?,
            staging: PinnedPair::new(SamplingBuffers::bytes(max_seqs))?,
            max_rows: max_seqs,
        };
        let downloads = [
            (PinnedBuf::new(max_seqs * 4)?, StreamEvent::new()?),
            (PinnedBuf::new(max_seqs * 4)?, StreamEvent::new()?),
        ];
        let feed = gpu.alloc(max_seqs * 2 * 4)?;
        let feed_staging = PinnedPair::new(max_seqs * 2 * 4)?;
        // Load with a KV cache just big enough for the profiling pass, then size the real one
        // from what that pass left free.
        let profile_tokens = limits.max_tokens;
        let profile_blocks = profile_blocks(profile_tokens, max_len, cfg.block_size);
        let t0 = std::time::Instant::now();
        if !args.disable_progress {
            be.set_upload_progress(crate::models::loader::bytes_progress_bar(
                c.num_parameters() * 2,
                &format!("weights to {} ({})", gpu.name, dtype.name()),
            ));
        }
        let runner = ModelRunner::new(be, c, model.weights, cfg, profile_blocks);
        if let Ok(r) = &runner {
            r.backend().finish_upload_progress();
        }
        let mut runner = runner.with_context(|| format!("loading the model onto {}", gpu.name))?;
        eprintln!(
            "rvllm: weights on {} in {:.1} s, computing in {}",
            gpu.name,
            t0.elapsed().as_secs_f64(),
            dtype.name()
        );
        profile_pass(
            &mut runner,
            profile_tokens,
            max_len,
            cfg.block_size,
            c.vocab_size,
        )?;
        let num_blocks = match cfg.num_kv_blocks {
            Some(n) => n,
            None => {
                let (free, total) = gpu.mem_info()?;
                let used = total - free;
                let budget =
                    (args.gpu_memory_utilization as f64 * total as f64) as i64 - used as i64;
                let per_block = (cfg.block_size * c.kv_bytes_per_token(2)) as i64;
                let profile_kv = profile_blocks as i64 * per_block;
                let blocks = (budget + profile_kv) / per_block;
                if blocks < 1 {
                    bail!(
                        "no GPU memory is left for the KV cache: weights and activations use {:.1} GiB of {:.1} GiB \
                         and --gpu-memory-utilization is {}; raise it, or lower --max-num-batched-tokens / --max-num-seqs",
                        used as f64 / (1u64 << 30) as f64,
                        total as f64 / (1u64 << 30) as f64,
                        args.gpu_memory_utilization
                    );
                }
                blocks as usize
            }
        };
        runner
            .resize_kv_cache(num_blocks)
            .context("allocating the KV cache")?;
        let kv_tokens = num_blocks * cfg.block_size;
        eprintln!(
            "rvllm: KV cache: {num_blocks} blocks of {} tokens ({kv_tokens} tokens, {:.2} GiB); the longest context that fits is {} tokens",
            cfg.block_size,
            (num_blocks * cfg.block_size * c.kv_bytes_per_token(2)) as f64 / (1u64 << 30) as f64,
            kv_tokens.min(max_len)
        );
        let mut ex = Self {
            gpu,
            runner,
            config: config.clone(),
            block_size: cfg.block_size,
            num_blocks,
            gathered,
            logits,
            logits_elem,
            sample_partials,
            tokens,
            token_logprobs,
            sampling,
            graphs: HashMap::new(),
            _cublas_workspace: cublas_ws,
            phases: PhaseTimes::default(),
            queue: VecDeque::new(),
            last_rows: HashMap::new(),
            last_tokens: HashMap::new(),
            downloads,
            next_download: 0,
            feed,
            feed_staging,
        };
        if !args.enforce_eager {
            let t0 = std::time::Instant::now();
            for &b in GRAPH_SIZES.iter().filter(|&&b| b <= max_seqs) {
                ex.capture(b)?;
            }
            if !ex.graphs.contains_key(&max_seqs) {
                ex.capture(max_seqs)?;
            }
            eprintln!(
                "rvllm: captured {} decode graphs in {:.1} s",
                ex.graphs.len(),
                t0.elapsed().as_secs_f64()
            );
        }
        Ok(ex)
    }

    /// A decode batch of `b` placeholder rows: no KV writes (slot -1), context 1.
    fn padded(batch: &ForwardBatch, b: usize) -> ForwardBatch {
        let mut p = batch.clone();
        for i in batch.seqs.len()..b {
            p.token_ids.push(0);
            p.positions.push(0);
            p.slot_mapping.push(u32::MAX); // -1 on the device: skip the cache write
            p.seqs.push(SeqSlice {
                token_offset: i,
                num_tokens: 1,
                context_len: 1,
                block_table: vec![0],
            });
        }
        p.logits_rows = (0..b as u32).collect();
        p
    }

    /// Everything after the step metadata is uploaded: body, LM head on the sampled rows,
    /// sampling. Launches only (graph-capturable). `plain`: no row filters (top-k/top-p/
    /// min-p), so the faster two-kernel sampler applies.
    fn launch_step(
        &mut self,
        rows: usize,
        step: &super::backend::CudaStepMeta,
        plain: bool,
    ) -> Result<()> {
        let (be, model, kv, ws) = self.runner.parts();
        model.forward_hidden(be, step, kv, ws)?;
        be.gather_rows(ws.normed(), step, 0..rows, &mut self.gathered)?;
        let c = &self.config;
        let lm_head = model.lm_head();
        // Logits are made in the compute type, as the host path (and vLLM) make them, then
        // widened: the on-GPU sampler and the host sampler then see the same values.
        if rows == 1 && c.hidden_size % 8 == 0 {
            be.gemv_b1(self.gathered.ptr(), lm_head, self.logits_elem.ptr)?;
        } else {
            self.gpu.gemm(
                be.dtype,
                self.gathered.ptr(),
                lm_head.buf.ptr,
                self.logits_elem.ptr,
                rows,
                c.vocab_size,
                c.hidden_size,
                false,
            )?;
        }
        be.to_f32(self.logits.ptr, self.logits_elem.ptr, rows * c.vocab_size)?;
        let (t, lp, lg) = (self.tokens.ptr, self.token_logprobs.ptr, self.logits.ptr);
        let vocab = c.vocab_size as i32;
        let s = &self.sampling;
        let (temps, ks, ps, mps, seeds, offs) =
            (s.ptr(0), s.ptr(1), s.ptr(2), s.ptr(3), s.ptr(4), s.ptr(5));
        macro_rules! args {
            ($($x:expr),* $(,)?) => { &mut [$(&$x as *const _ as *mut c_void),*] };
        }
        if plain {
            // nchunks = clamp(528 / B, 4, 128): measured fastest on the H100 (sampling.cu).
            let nchunks = (528 / rows).clamp(4, 128) as i32;
            let parts = self.sample_partials.ptr;
            self.gpu.launch(
                "sampling",
                "sample_plain_partial",
                (nchunks as u32, rows as u32, 1),
                (256, 1, 1),
                0,
                args![parts, lg, vocab, nchunks, temps, ks, seeds, offs],
            )?;
            self.gpu.launch(
                "sampling",
                "sample_plain_finish",
                (rows as u32, 1, 1),
                (32, 1, 1),
                0,
                args![t, lp, parts, lg, vocab, nchunks, temps, ks],
            )
        } else {
            self.gpu.launch(
                "sampling",
                "sample_tokens",
                (rows as u32, 1, 1),
                (1024, 1, 1),
                0,
                args![t, lp, lg, vocab, temps, ks, ps, mps, seeds, offs],
            )
        }
    }

    fn capture(&mut self, b: usize) -> Result<()> {
        let dummy = Self::padded(&ForwardBatch::default(), b);
        self.sampling
            .upload(&self.gpu, &vec![(0.0, 0, 1.0, 0.0, 0, 0); b])?;
        let be = self.runner.parts().0;
        be.capturing_graph
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let step = be.upload_step(&dummy)?;
        // Warm-up outside the capture (cuBLAS picks its kernels, modules load).
        self.launch_step(b, &step, true)?;
        self.gpu.sync()?;
        unsafe {
            drv::stream::begin_capture(
                self.gpu.stream,
                sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
        }
        .map_err(|e| anyhow::anyhow!("starting CUDA graph capture: {e:?}"))?;
        let launched = self.launch_step(b, &step, true);
        let graph = unsafe { drv::stream::end_capture(self.gpu.stream) };
        self.runner
            .parts()
            .0
            .capturing_graph
            .store(false, std::sync::atomic::Ordering::Relaxed);
        launched.with_context(|| format!("capturing the decode graph for batch {b}"))?;
        let graph =
            graph.map_err(|e| anyhow::anyhow!("ending CUDA graph capture for batch {b}: {e:?}"))?;
        let exec = unsafe { drv::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0)) }
            .map_err(|e| anyhow::anyhow!("instantiating the decode graph for batch {b}: {e:?}"));
        unsafe {
            let _ = drv::graph::destroy(graph);
        }
        self.graphs.insert(b, Graph { exec: exec? });
        Ok(())
    }

    /// The fast path, when every sampled row can be sampled on the GPU: queues the step on
    /// the device (its tokens come back in `collect`) and returns true; false when the step
    /// needs the host path.
    fn try_device_submit(&mut self, so: &SchedulerOutput) -> Result<bool> {
        if so.scheduled.is_empty()
            || !so
                .new_requests
                .iter()
                .all(|n| n.sampling.prompt_logprobs.is_none())
        {
            return Ok(false);
        }
        let t_start = std::time::Instant::now();
        self.runner.update_states(so);
        for sr in &so.scheduled {
            if self.runner.wants_prompt_logprobs(sr.req_id) {
                return Ok(false);
            }
            let Some(sampler) = self.runner.sampler(sr.req_id) else {
                return Ok(false);
            };
            if sr.sample && !device_samplable(sampler.params(), sr.num_output_tokens) {
                return Ok(false);
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
        let feed = self.resolve_placeholders_on_device(&mut reordered)?;
        let (batch, _uses) = build_forward_batch(&reordered, self.block_size, |_| None)?;
        let kv_shape = {
            let (be, _, kv, _) = self.runner.parts();
            be.kv_cache_shape(kv)
        };
        batch.validate(&kv_shape, self.config.vocab_size)?;
        if batch.num_tokens() > self.runner.parts().3.capacity() {
            bail!(
                "a step of {} tokens is larger than the activations sized at start-up; this is a bug \
                 (the profiling pass sizes them for --max-num-batched-tokens)",
                batch.num_tokens()
            );
        }
        // Sampling rows follow the reordered sequences.
        let row_ids: Vec<u64> = reordered
            .scheduled
            .iter()
            .filter(|s| s.sample)
            .map(|s| s.req_id)
            .collect();
        let mut row_params = Vec::with_capacity(row_ids.len());
        for sr in reordered.scheduled.iter().filter(|s| s.sample) {
            let sampler = self
                .runner
                .sampler(sr.req_id)
                .context("a scheduled request lost its sampler")?;
            let p = sampler.params();
            let top_k = if p.top_k <= 0 { 0 } else { p.top_k };
            row_params.push((
                p.temperature,
                top_k,
                p.top_p,
                p.min_p,
                sampler.seed(),
                sr.num_output_tokens as u64,
            ));
        }
        let n = row_params.len();
        let plain = row_params.iter().all(|&(_, k, p, m, _, _)| {
            (k <= 1 || k as usize >= self.config.vocab_size) && p >= 1.0 && m <= 0.0
        });
        let pure_decode =
            plain && batch.seqs.iter().all(|s| s.num_tokens == 1) && n == batch.seqs.len();
        let graph_size = if pure_decode {
            GRAPH_SIZES
                .iter()
                .copied()
                .find(|&g| g >= n && self.graphs.contains_key(&g))
        } else {
            None
        };
        let t_prepared = std::time::Instant::now();
        match graph_size {
            Some(g) => {
                let padded = Self::padded(&batch, g);
                let mut rows = row_params.clone();
                rows.resize(g, (0.0, 0, 1.0, 0.0, 0, 0));
                self.sampling.upload(&self.gpu, &rows)?;
                let step = self.runner.parts().0.upload_step(&padded)?;
                self.feed_tokens(&feed, &step)?;
                let exec = self.graphs[&g].exec;
                unsafe { drv::graph::launch(exec, self.gpu.stream) }.map_err(|e| {
                    anyhow::anyhow!("launching the decode graph for batch {g}: {e:?}")
                })?;
            }
            None => {
                if n == 0 {
                    // Only non-final prefill chunks: run the body, nothing to sample.
                    let step = self.runner.parts().0.upload_step(&batch)?;
                    self.feed_tokens(&feed, &step)?;
                    let (be, model, kv, ws) = self.runner.parts();
                    model.forward_hidden(be, &step, kv, ws)?;
                    self.last_rows.clear();
                    self.last_tokens.clear();
                    self.queue
                        .push_back(Submitted::Ready(Ok(ModelRunnerOutput::default())));
                    return Ok(true);
                }
                self.sampling.upload(&self.gpu, &row_params)?;
                let step = self.runner.parts().0.upload_step(&batch)?;
                self.feed_tokens(&feed, &step)?;
                self.launch_step(n, &step, plain)?;
            }
        }
        // The tokens come back behind the step; the slot's previous copy must have been read.
        let slot = self.next_download;
        if self
            .queue
            .iter()
            .any(|q| matches!(q, Submitted::Device(d) if d.slot == slot))
        {
            self.finish_queued_device_steps();
        }
        self.next_download ^= 1;
        let (buf, event) = &mut self.downloads[slot];
        buf.download(&self.gpu, self.tokens.ptr, n * 4)?;
        event.record(&self.gpu)?;
        self.last_rows = row_ids
            .iter()
            .enumerate()
            .map(|(row, &id)| (id, row as u32))
            .collect();
        self.last_tokens.clear();
        self.queue.push_back(Submitted::Device(DeviceStep {
            row_ids,
            sched_ids: so
                .scheduled
                .iter()
                .filter(|s| s.sample)
                .map(|s| s.req_id)
                .collect(),
            slot,
            graph: graph_size.is_some(),
        }));
        let p = &mut self.phases;
        p.prepare += t_prepared - t_start;
        p.submit += t_prepared.elapsed();
        if graph_size.is_some() {
            p.graph_submit += t_prepared.elapsed();
        }
        Ok(true)
    }

    /// Replaces each placeholder of `so` with its token where the host knows it, else with 0
    /// and a (token index in the step, row of `tokens`) pair for `feed_tokens`.
    fn resolve_placeholders_on_device(&self, so: &mut SchedulerOutput) -> Result<Vec<i32>> {
        let mut feed = Vec::new();
        let mut offset = 0;
        for sr in &mut so.scheduled {
            for (k, t) in sr.token_ids.iter_mut().enumerate() {
                if *t != PLACEHOLDER_TOKEN {
                    continue;
                }
                if let Some(&tok) = self.last_tokens.get(&sr.req_id) {
                    *t = tok;
                } else if let Some(&row) = self.last_rows.get(&sr.req_id) {
                    *t = 0;
                    feed.extend([(offset + k) as i32, row as i32]);
                } else {
                    bail!(
                        "request {} was scheduled with the token of a step that sampled none for \
                         it; this is a bug",
                        sr.req_id
                    );
                }
            }
            offset += sr.token_ids.len();
        }
        Ok(feed)
    }

    /// Puts the previous step's sampled tokens into this step's ids (after its upload).
    fn feed_tokens(&mut self, feed: &[i32], step: &super::backend::CudaStepMeta) -> Result<()> {
        if feed.is_empty() {
            return Ok(());
        }
        let buf = self.feed_staging.take_turn();
        buf.slice_mut(feed.len()).copy_from_slice(feed);
        buf.upload(&self.gpu, self.feed.ptr, feed.len() * 4)?;
        let pairs = (feed.len() / 2) as i32;
        let (ids, pairs_ptr, tokens) = (step.ids(), self.feed.ptr, self.tokens.ptr);
        self.gpu.launch(
            "block_tables",
            "feed_sampled_tokens",
            ((pairs as u32).div_ceil(256), 1, 1),
            (256, 1, 1),
            0,
            &mut [
                &ids as *const _ as *mut c_void,
                &pairs_ptr as *const _ as *mut c_void,
                &tokens as *const _ as *mut c_void,
                &pairs as *const _ as *mut c_void,
            ],
        )
    }

    /// Waits for a device step's tokens and makes its output.
    fn finish_device_step(&mut self, d: DeviceStep) -> Result<ModelRunnerOutput> {
        let t0 = std::time::Instant::now();
        let (buf, event) = &self.downloads[d.slot];
        event.wait()?;
        if self.gpu.profiler.is_some() {
            self.gpu.sync()?; // resolves the kernel timings
        }
        let toks: Vec<i32> = buf.slice(d.row_ids.len()).to_vec();
        let t_done = std::time::Instant::now();
        let mut by_id: HashMap<u64, u32> = HashMap::with_capacity(toks.len());
        for (&id, &t) in d.row_ids.iter().zip(&toks) {
            by_id.insert(id, t as u32);
            self.runner.record_output(id, t as u32);
        }
        let sampled = d
            .sched_ids
            .iter()
            .map(|id| SampledToken {
                req_id: *id,
                token_id: by_id[id],
                logprobs: None,
                prompt_logprobs: None,
            })
            .collect();
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

    /// Waits for every step queued on the device and keeps its output for `collect`; the
    /// newest one's tokens become what the next step's placeholders stand for.
    fn finish_queued_device_steps(&mut self) {
        for entry in std::mem::take(&mut self.queue) {
            let ready = match entry {
                Submitted::Device(d) => {
                    let out = self.finish_device_step(d);
                    if let Ok(o) = &out {
                        self.last_tokens =
                            o.sampled.iter().map(|t| (t.req_id, t.token_id)).collect();
                    }
                    Submitted::Ready(out)
                }
                ready => ready,
            };
            self.queue.push_back(ready);
        }
        self.last_rows.clear();
    }

    /// The host path: the step runs to completion now, after the steps queued on the device
    /// (whose tokens it may need, and whose sampler state it continues).
    fn host_step(&mut self, so: &SchedulerOutput) -> Result<ModelRunnerOutput> {
        self.finish_queued_device_steps();
        let resolved = resolve_placeholders(so, &self.last_tokens)?;
        let out = self.runner.run_step(resolved.as_ref().unwrap_or(so));
        self.last_tokens = match &out {
            Ok(o) => o.sampled.iter().map(|t| (t.req_id, t.token_id)).collect(),
            Err(_) => HashMap::new(),
        };
        out
    }
}

/// One forward pass at the largest step (`tokens` tokens in sequences of at most `max_len`),
/// so that the memory left afterwards is what the KV cache can have: activations at their
/// largest, cuBLAS workspace and kernels all counted, and no buffer ever grows later (graphs
/// hold their addresses).
fn profile_pass(
    runner: &mut ModelRunner<CudaBackend>,
    tokens: usize,
    max_len: usize,
    block_size: usize,
    vocab: usize,
) -> Result<()> {
    let mut batch = ForwardBatch::default();
    let mut next_block = 0u32;
    let mut offset = 0;
    while offset < tokens {
        let n = (tokens - offset).min(max_len);
        let blocks: Vec<u32> = (next_block..next_block + n.div_ceil(block_size) as u32).collect();
        for i in 0..n {
            batch.token_ids.push(((offset + i) % vocab) as u32);
            batch.positions.push(i as u32);
            batch
                .slot_mapping
                .push(blocks[i / block_size] * block_size as u32 + (i % block_size) as u32);
        }
        next_block += blocks.len() as u32;
        batch.seqs.push(SeqSlice {
            token_offset: offset,
            num_tokens: n,
            context_len: n,
            block_table: blocks,
        });
        offset += n;
        batch.logits_rows.push(offset as u32 - 1);
    }
    let (be, model, kv, ws) = runner.parts();
    model
        .forward(be, &batch, kv, ws)
        .context("profiling forward pass")?;
    be.gpu.sync()
}

/// KV blocks the profiling pass needs for `tokens` tokens in sequences of at most `max_len`.
fn profile_blocks(tokens: usize, max_len: usize, block_size: usize) -> usize {
    let full = tokens / max_len;
    let rest = tokens % max_len;
    full * max_len.div_ceil(block_size) + rest.div_ceil(block_size)
}

impl Executor for CudaExecutor {
    fn submit(&mut self, so: &SchedulerOutput) -> Result<()> {
        self.gpu.bind()?;
        if !self.try_device_submit(so)? {
            let out = self.host_step(so);
            self.queue.push_back(Submitted::Ready(out));
        }
        Ok(())
    }
    fn collect(&mut self) -> Result<ModelRunnerOutput> {
        match self.queue.pop_front() {
            None => bail!("collect() without a step submitted; this is a bug"),
            Some(Submitted::Ready(out)) => out,
            Some(Submitted::Device(d)) => self.finish_device_step(d),
        }
    }
    fn overlaps(&self) -> bool {
        true
    }
    fn num_kv_blocks(&self) -> usize {
        self.num_blocks
    }
    fn block_size(&self) -> usize {
        self.block_size
    }
    fn device_name(&self) -> String {
        self.runner.backend().device_name()
    }
    fn device_wait(&self) -> std::time::Duration {
        self.phases.wait
    }
    fn profile_detail(&self) -> Option<String> {
        let p = &self.phases;
        let n = p.steps.max(1) as f64;
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3 / n;
        let mut line = format!(
            "{} device-path steps; per step: prepare {:.3} ms, submit {:.3} ms, wait {:.3} ms, finish {:.3} ms",
            p.steps,
            ms(p.prepare),
            ms(p.submit),
            ms(p.wait),
            ms(p.finish)
        );
        // Graph replays and eager steps cost the host very differently: show both.
        let split = |steps: u32, submit: std::time::Duration, wait: std::time::Duration| {
            let k = steps.max(1) as f64;
            format!(
                "{steps} steps, submit {:.3} ms, wait {:.3} ms",
                submit.as_secs_f64() * 1e3 / k,
                wait.as_secs_f64() * 1e3 / k
            )
        };
        line.push_str(&format!(
            "\n  decode graphs: {}; eager: {}",
            split(p.graph_steps, p.graph_submit, p.graph_wait),
            split(
                p.steps - p.graph_steps,
                p.submit - p.graph_submit,
                p.wait - p.graph_wait
            )
        ));
        if let Some(profiler) = &self.gpu.profiler {
            line.push('\n');
            line.push_str(&profiler.report());
        }
        Some(line)
    }
}
