//! The GPU runner itself: start-up (weights, profiling, KV sizing, graph capture) and the
//! `Executor` the engine core drives.
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use anyhow::{bail, Context, Result};

use crate::backend::cuda::backend::{CudaBackend, CudaKvCache, CudaTensor, StepLimits};
use crate::backend::cuda::device::{DevBuf, Gpu, PinnedBuf, PinnedPair, StreamEvent};
use crate::backend::cuda::switches::CudaSettings;
use crate::backend::{Backend, KvCacheShape};
use crate::models::config::ModelConfig;
use crate::models::llama::{LlamaModel, Workspace};
use crate::models::LoadedModel;
use crate::runner::{Executor, RunnerConfig};
use crate::sampling::structured::StructuredSupport;
use crate::sampling::SamplingParams;
use crate::scheduler::{ModelRunnerOutput, RequestId, TokenLogprobs};

use super::graphs::{self, Graph};
use super::sampler::DeviceSampler;
use super::slots::{Grammars, JoinBatch, SlotTable};
use super::{memory, step};

/// A live request, host side: what the device does not hold.
pub(super) struct GpuRequest {
    pub(super) params: SamplingParams,
    pub(super) prompt: Vec<u32>,
    /// Top-k of prompt logprobs still to be delivered (None: not asked, or delivered).
    pub(super) prompt_logprobs_k: Option<usize>,
    /// Prompt logprobs of the chunks computed so far.
    pub(super) prompt_logprobs: Vec<TokenLogprobs>,
}

pub struct GpuRunner {
    /// Ranks 1.. with --tensor-parallel-size above 1 (`tensor_parallel.rs`); rank 0 is this.
    pub(super) tp: Option<super::tensor_parallel::GpuPeers>,
    pub(super) gpu: Arc<Gpu>,
    pub(super) be: CudaBackend,
    pub(super) model: LlamaModel<CudaBackend>,
    pub(super) kv: CudaKvCache,
    pub(super) kv_shape: KvCacheShape,
    pub(super) ws: Workspace<CudaBackend>,
    pub(super) config: ModelConfig,
    pub(super) max_rows: usize,
    pub(super) requests: HashMap<RequestId, GpuRequest>,
    pub(super) slots: SlotTable,
    /// Joins not yet uploaded (they go up with the next step that runs).
    pub(super) joins: JoinBatch,
    /// Grammar matchers of constrained requests (structured output); their masks.
    pub(super) grammars: Grammars,
    pub(super) sampler: DeviceSampler,
    /// LM-head input rows and their logits in the compute type.
    pub(super) gathered: CudaTensor,
    pub(super) logits_elem: DevBuf,
    pub(super) graphs: HashMap<usize, graphs::DecodeGraphs>,
    pub(super) _cublas_workspace: DevBuf,
    pub(super) phases: step::PhaseTimes,
    /// Steps submitted and not yet collected, oldest first.
    pub(super) queue: VecDeque<step::Submitted>,
    /// Where the last step leaves each request's sampled token (its row of the sampler's
    /// `tokens`): what the next step's placeholders stand for.
    pub(super) last_rows: HashMap<RequestId, u32>,
    /// Each step's tokens and logprobs come back into one of these (two: the step queued
    /// behind it must not overwrite a copy not yet read).
    pub(super) downloads: [Download; 2],
    pub(super) next_download: usize,
    /// (index into the step's ids, row of `tokens`) of the placeholders filled on the device,
    /// and its staging.
    pub(super) feed: DevBuf,
    pub(super) feed_staging: PinnedPair,
}

pub(super) struct Download {
    pub(super) tokens: PinnedBuf,
    pub(super) logprobs: PinnedBuf,
    pub(super) done: StreamEvent,
}

// SAFETY: used from the engine thread only; raw handles are not shared.
unsafe impl Send for GpuRunner {}

/// What the GPU runner needs beyond the runner config (the engine's flags of the same names).
#[derive(Debug, Clone)]
pub struct GpuOptions {
    /// `--dtype`.
    pub dtype: String,
    /// `--max-model-len`; None: the model's.
    pub max_model_len: Option<usize>,
    /// `--gpu-memory-utilization`.
    pub gpu_memory_utilization: f32,
    /// `--enforce-eager`: no CUDA graphs.
    pub enforce_eager: bool,
    /// Progress bars while loading.
    pub show_progress: bool,
    /// Compiles constrained requests' grammars (or says why they are refused).
    pub structured: StructuredSupport,
}

pub fn create_gpu_executor(
    model: LoadedModel,
    cfg: &RunnerConfig,
    options: &GpuOptions,
) -> Result<Box<dyn Executor>> {
    Ok(Box::new(GpuRunner::new(model, cfg, options)?))
}

impl GpuRunner {
    pub fn new(model: LoadedModel, cfg: &RunnerConfig, args: &GpuOptions) -> Result<Self> {
        let config = model.config.clone();
        let c = &config;
        let dtype = crate::backend::dtype::gpu_dtype(&args.dtype, c.torch_dtype.as_deref())?;
        let gpu = Arc::new(Gpu::with_settings(0, CudaSettings::from_env()?)?);
        let max_len = args
            .max_model_len
            .unwrap_or(c.max_position_embeddings)
            .max(1);
        let max_rows = cfg.max_num_seqs.max(1);
        let limits = StepLimits {
            max_tokens: cfg.max_num_batched_tokens.max(max_rows).max(1),
            max_seqs: max_rows,
            max_blocks_per_seq: max_len.div_ceil(cfg.block_size),
        };
        // cuBLAS gets a fixed workspace so that GEMMs can be captured into graphs.
        let ws_bytes = 64 << 20;
        let cublas_ws = gpu.alloc(ws_bytes)?;
        unsafe {
            cudarc::cublas::sys::cublasSetWorkspace_v2(
                gpu.blas,
                cublas_ws.ptr as *mut std::ffi::c_void,
                ws_bytes,
            )
            .result()
            .map_err(|e| anyhow::anyhow!("cublasSetWorkspace: {e:?}"))?;
        }
        let tp = cfg.tensor_parallel_size.max(1);
        // This rank's heads (all of them at tensor-parallel size 1).
        let local = crate::models::llama::rank_config(c, tp);
        let be = CudaBackend::new(
            gpu.clone(),
            limits,
            local.num_attention_heads,
            local.num_key_value_heads,
            c.head_dim,
            dtype,
        )?;
        // The NCCL path at tensor-parallel size 1 (a group of this one GPU, joined before the
        // profiling pass and the graphs so that its all-reduces are captured like a rank's).
        if tp == 1 && gpu.settings.nccl_at_tp1 {
            let comm =
                crate::backend::cuda::nccl::NcclComm::group_of(std::slice::from_ref(&gpu), dtype)?
                    .remove(0);
            be.join_nccl_group(comm)?;
        }
        // `--quantization fp8`: the projections upload as E4M3 (backend/fp8.rs).
        be.enable_online_fp8(c.family.quant.online_fp8)?;
        // `--kv-cache-dtype fp8`: the KV cache holds E4M3 codes (backend/kv_fp8.rs).
        be.enable_kv_cache_fp8(c.family.quant.kv_cache_fp8_scales.clone(), tp)?;
        // Everything a step uses is allocated before the profiling pass measures what is left.
        let gathered = be.alloc_activation(max_rows, c.hidden_size)?;
        let logits_elem = gpu.alloc(max_rows * c.vocab_size * 2)?;
        let sampler = DeviceSampler::new(&gpu, max_rows, c.vocab_size, dtype)?;
        let downloads = [Download::new(&sampler)?, Download::new(&sampler)?];
        let feed = gpu.alloc(max_rows * 2 * 4)?;
        let feed_staging = PinnedPair::new(max_rows * 2 * 4)?;

        let t0 = std::time::Instant::now();
        if args.show_progress {
            be.set_upload_progress(crate::models::loader::bytes_progress_bar(
                c.num_parameters() * 2,
                &format!("weights to {} ({})", gpu.name, dtype.name()),
            ));
        }
        let sizing = super::tensor_parallel::PeerSizing {
            profile_tokens: limits.max_tokens,
            max_len,
            block_size: cfg.block_size,
            gpu_memory_utilization: args.gpu_memory_utilization,
            num_kv_blocks: cfg.num_kv_blocks,
        };
        let (be, loaded, peers) = if tp > 1 {
            let (be, model, peers) =
                super::tensor_parallel::GpuPeers::load(be, c, model.weights, tp, limits, sizing)?;
            (be, Ok(model), Some(peers))
        } else {
            let loaded = LlamaModel::load(&be, c, model.weights);
            (be, loaded, None)
        };
        be.finish_upload_progress();
        let model = loaded.with_context(|| format!("loading the model onto {}", gpu.name))?;
        if let Some(p) = &peers {
            p.profile(&be)?;
        }
        eprintln!(
            "rvllm: weights on {} in {:.1} s, computing in {}",
            gpu.name,
            t0.elapsed().as_secs_f64(),
            dtype.name()
        );
        // A KV cache just big enough for the profiling pass; the real one takes what it leaves.
        let profile_tokens = limits.max_tokens;
        let profile_blocks = memory::profile_blocks(profile_tokens, max_len, cfg.block_size);
        let mut kv_shape = KvCacheShape {
            num_layers: c.num_hidden_layers,
            num_blocks: profile_blocks,
            block_size: cfg.block_size,
            num_kv_heads: local.num_key_value_heads,
            head_dim: c.head_dim,
        };
        let mut kv = be
            .alloc_kv_cache(kv_shape)
            .context("allocating the KV cache")?;
        let mut ws =
            Workspace::new(&be, &local, profile_tokens).context("allocating activations")?;
        let profiled = memory::profile_pass(
            &be,
            &model,
            &mut kv,
            &mut ws,
            profile_tokens,
            max_len,
            cfg.block_size,
        );
        let block_bytes = cfg.block_size * local.kv_bytes_per_token(be.kv_cache_elem_bytes());
        let fits = profiled.and_then(|()| match cfg.num_kv_blocks {
            Some(n) => Ok(n),
            None => memory::kv_blocks_for_memory(
                &gpu,
                args.gpu_memory_utilization,
                profile_blocks,
                block_bytes,
            ),
        });
        let capture_sizes = match args.enforce_eager {
            true => vec![],
            false => super::tensor_parallel::capture_sizes(max_rows),
        };
        let num_blocks = match &peers {
            Some(p) => p.agree_blocks(fits, cfg.num_kv_blocks)?,
            None => fits?,
        };
        drop(kv); // both never need to fit at once
        kv_shape.num_blocks = num_blocks;
        let kv = be
            .alloc_kv_cache(kv_shape)
            .context("allocating the KV cache")?;
        let kv_tokens = num_blocks * cfg.block_size;
        let kv_dtype = if be.kv_cache_elem_bytes() == 1 {
            "fp8_e4m3"
        } else {
            dtype.name()
        };
        eprintln!(
            "rvllm: KV cache ({kv_dtype}): {num_blocks} blocks of {} tokens ({kv_tokens} tokens, {:.2} GiB); the longest context that fits is {} tokens",
            cfg.block_size,
            (num_blocks * block_bytes) as f64 / (1u64 << 30) as f64,
            kv_tokens.min(max_len)
        );
        let mut runner = Self {
            tp: peers,
            gpu,
            be,
            model,
            kv,
            kv_shape,
            ws,
            config: config.clone(),
            max_rows,
            requests: HashMap::new(),
            slots: SlotTable::new(max_rows),
            joins: JoinBatch::default(),
            grammars: Grammars::new(
                args.structured.clone(),
                config.vocab_size,
                &config.eos_token_ids,
            ),
            sampler,
            gathered,
            logits_elem,
            graphs: HashMap::new(),
            _cublas_workspace: cublas_ws,
            phases: step::PhaseTimes::default(),
            queue: VecDeque::new(),
            last_rows: HashMap::new(),
            downloads,
            next_download: 0,
            feed,
            feed_staging,
        };
        if let Some(p) = &runner.tp {
            p.start(&runner.be, num_blocks, &capture_sizes)?;
        }
        if !args.enforce_eager {
            let t0 = std::time::Instant::now();
            // Every rank captures these sizes in this order (their all-reduces meet).
            for b in capture_sizes {
                let captured = runner.capture(b);
                match &runner.tp {
                    Some(p) => p.checked(captured)?,
                    None => captured?,
                }
            }
            eprintln!(
                "rvllm: captured {} decode graphs in {:.1} s",
                runner.graphs.len(),
                t0.elapsed().as_secs_f64()
            );
        }
        if let Some(p) = &runner.tp {
            p.wait_started()?;
        }
        if let Some(profiler) = &runner.gpu.profiler {
            runner.gpu.sync()?;
            profiler.clear();
        }
        Ok(runner)
    }

    /// Captures the decode graphs of `b` padding rows: the body with the LM head, then the
    /// sampler (`graphs::DecodeGraphs`).
    fn capture(&mut self, b: usize) -> Result<()> {
        let dummy = graphs::padded(&crate::backend::ForwardBatch::default(), b);
        self.sampler.upload_rows(&self.gpu, &[], &[], &[])?;
        self.be
            .capturing_graph
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let captured = self.capture_both(b, &dummy);
        self.be
            .capturing_graph
            .store(false, std::sync::atomic::Ordering::Relaxed);
        self.graphs.insert(b, captured?);
        Ok(())
    }

    fn capture_both(
        &mut self,
        b: usize,
        dummy: &crate::backend::ForwardBatch,
    ) -> Result<graphs::DecodeGraphs> {
        let step = self.be.upload_step(dummy)?;
        // Warm-up outside the capture (cuBLAS picks its kernels, modules load).
        self.launch_forward(b, &step)?;
        self.sampler
            .launch(&self.gpu, self.logits_elem.ptr, b, true)?;
        self.gpu.sync()?;
        let forward = self.capture_one(b, "decode graph", |r| r.launch_forward(b, &step))?;
        let sample = self.capture_one(b, "sampling graph", |r| {
            r.sampler.launch(&r.gpu, r.logits_elem.ptr, b, true)
        })?;
        Ok(graphs::DecodeGraphs { forward, sample })
    }

    /// What `launch` queues on the stream, captured into a graph.
    fn capture_one(
        &mut self,
        b: usize,
        what: &str,
        launch: impl FnOnce(&mut Self) -> Result<()>,
    ) -> Result<Graph> {
        use cudarc::driver::{result as drv, sys};
        unsafe {
            drv::stream::begin_capture(
                self.gpu.stream,
                sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
        }
        .map_err(|e| anyhow::anyhow!("starting CUDA graph capture: {e:?}"))?;
        let launched = launch(self);
        let graph = unsafe { drv::stream::end_capture(self.gpu.stream) };
        launched.with_context(|| format!("capturing the {what} for batch {b}"))?;
        let graph =
            graph.map_err(|e| anyhow::anyhow!("ending CUDA graph capture for batch {b}: {e:?}"))?;
        Graph::instantiate(graph, b)
    }

    /// The body and the LM head on the first `rows` logits rows, after the step metadata is
    /// uploaded. Launches only (graph-capturable); the sampler follows separately.
    fn launch_forward(
        &mut self,
        rows: usize,
        step: &crate::backend::cuda::backend::CudaStepMeta,
    ) -> Result<()> {
        self.model
            .forward_hidden(&self.be, step, &mut self.kv, &mut self.ws)?;
        self.lm_head(step, 0..rows)
    }

    /// Logits (compute type) of the step's logits rows `range` into `logits_elem`: made in
    /// the compute type as vLLM makes them.
    pub(super) fn lm_head(
        &mut self,
        step: &crate::backend::cuda::backend::CudaStepMeta,
        range: std::ops::Range<usize>,
    ) -> Result<()> {
        let rows = range.len();
        if rows > self.max_rows {
            bail!("{rows} logits rows at once; at most {}", self.max_rows);
        }
        self.be
            .gather_rows(self.ws.normed(), step, range, &mut self.gathered)?;
        let c = &self.config;
        let lm_head = self.model.lm_head();
        if rows == 1 && c.hidden_size.is_multiple_of(8) {
            self.be
                .gemv_b1(self.gathered.ptr(), lm_head, self.logits_elem.ptr)?;
        } else {
            self.gpu.gemm(
                self.be.dtype,
                self.gathered.ptr(),
                lm_head.buf.ptr,
                self.logits_elem.ptr,
                rows,
                c.vocab_size,
                c.hidden_size,
                false,
            )?;
        }
        // Every reader of the logits (the sampler, logprobs, prompt logprobs) sees them
        // capped, as the CPU runner hands them on.
        if let Some(cap) = self.model.spec().final_logit_softcap {
            self.be
                .softcap_logits(self.logits_elem.ptr, rows * c.vocab_size, cap)?;
        }
        Ok(())
    }
}

impl Download {
    fn new(sampler: &DeviceSampler) -> Result<Self> {
        Ok(Self {
            tokens: PinnedBuf::new(4 * sampler.max_rows())?,
            logprobs: PinnedBuf::new(DeviceSampler::logprob_bytes(sampler.max_rows()))?,
            done: StreamEvent::new()?,
        })
    }
}

impl Executor for GpuRunner {
    fn submit(&mut self, so: &crate::scheduler::SchedulerOutput) -> Result<()> {
        self.gpu.bind()?;
        if let Some(tp) = self.tp.as_mut() {
            tp.begin_submit()?;
        }
        let submitted = self.submit_step(so);
        let submitted = match self.tp.as_mut() {
            Some(tp) => tp.end_submit(submitted)?,
            None => submitted?,
        };
        self.queue.push_back(submitted);
        Ok(())
    }
    fn collect(&mut self) -> Result<ModelRunnerOutput> {
        let out = match self.queue.pop_front() {
            None => bail!("collect() without a step submitted; this is a bug"),
            Some(step::Submitted::Ready(out)) => out,
            Some(step::Submitted::Device(d)) => self.finish_device_step(d),
        };
        // A peer that failed aborted the group: this step's tokens are not to be trusted.
        match &self.tp {
            Some(tp) => tp.checked(out),
            None => out,
        }
    }
    fn overlaps(&self) -> bool {
        true
    }
    fn num_kv_blocks(&self) -> usize {
        self.kv_shape.num_blocks
    }
    fn block_size(&self) -> usize {
        self.kv_shape.block_size
    }
    fn device_name(&self) -> String {
        self.be.device_name()
    }
    fn device_wait(&self) -> std::time::Duration {
        self.phases.wait
    }
    fn step_counts(&self) -> crate::runner::StepCounts {
        self.phases.counts()
    }
    fn profile_detail(&self) -> Option<String> {
        let mut line = self.phases.report();
        if let Some(profiler) = &self.gpu.profiler {
            line.push('\n');
            line.push_str(&profiler.report());
        }
        Some(line)
    }
}
