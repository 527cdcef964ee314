//! The engine core: one step is `schedule()` → executor `submit` / `collect` →
//! `update_from_output()`, with the next step scheduled and submitted before the current one
//! is collected (async scheduling, ARCHITECTURE.md invariant 12). It sees token ids only;
//! text lives in `output.rs` at the edge.
use std::collections::VecDeque;

use anyhow::{bail, Context, Result};

use super::args::{BatchLimits, EngineArgs};
use crate::models::config::ModelConfig;
use crate::models::quant::{apply_runtime_options, KvCacheDtype};
use crate::models::{load_model, LoadFormat, LoadOptions, LoadedModel};
use crate::runner::{Executor, RunnerConfig};
use crate::sampling::structured::StructuredSupport;
use crate::scheduler::{
    EngineCoreOutput, EngineRequest, RequestId, Scheduler, SchedulerConfig, SchedulerOutput,
};

pub use crate::types::Device;

pub fn resolve_device(requested: &str) -> Result<Device> {
    let built = crate::compiled_devices();
    if built == ["empty"] {
        bail!(
            "this rvllm was built with target device empty: it has no device backend and cannot \
             run a model. Rebuild with `cargo xtask build --target-device cpu` (or `cuda`)"
        );
    }
    match requested {
        "cpu" if cfg!(feature = "cpu") => Ok(Device::Cpu),
        "cpu" => bail!("this rvllm was built without the CPU backend; rebuild with `cargo xtask build --target-device cpu`"),
        "cuda" | "gpu" if cfg!(feature = "cuda") => Ok(Device::Cuda),
        "cuda" | "gpu" => bail!(
            "this rvllm was built without the CUDA backend; rebuild with `cargo xtask build --target-device cuda`"
        ),
        "auto" => {
            if cfg!(feature = "cuda") && cuda_device_present() {
                Ok(Device::Cuda)
            } else if cfg!(feature = "cpu") {
                Ok(Device::Cpu)
            } else {
                bail!("--device auto found no usable GPU and this build has no CPU backend; rebuild with `cargo xtask build --target-device cpu`")
            }
        }
        other => bail!("unknown --device `{other}`: use cpu, cuda or auto"),
    }
}

/// `--tensor-parallel-size`: any size (the model checks that it divides the heads and the
/// MLP when it loads). On CUDA the ranks are the GPUs of this node, one thread each over one
/// NCCL group (`runner/gpu/tensor_parallel.rs`); several nodes are refused by the args.
/// The model as the engine runs it: loaded with `--load-format`, then `--quantization` and
/// `--kv-cache-dtype` applied for `device`, and `--max-model-len` set. A headless node
/// (headless.rs) loads it the same way, so that its fingerprint agrees with the leader's.
pub(crate) fn load_engine_model(args: &EngineArgs, device: Device) -> Result<LoadedModel> {
    let load_format = match args.load_format.as_str() {
        "auto" | "safetensors" | "gguf" => LoadFormat::Auto,
        "dummy" => LoadFormat::Dummy,
        other => bail!("unknown --load-format `{other}`: use auto or dummy"),
    };
    let opts = LoadOptions {
        load_format,
        progress: !args.disable_progress,
    };
    let kv_cache_dtype = KvCacheDtype::parse(args.kv_cache_dtype.as_deref().unwrap_or("auto"))?;
    let mut model = load_model(&args.model, &opts)
        .with_context(|| format!("loading model `{}`", args.model))?;
    apply_runtime_options(
        &mut model,
        args.quantization.as_deref(),
        kv_cache_dtype,
        device,
    )?;
    // What the model may see decides LongRoPE's factors and whether a window matters.
    model.config.family.max_model_len = args.max_model_len;
    Ok(model)
}

fn check_tensor_parallel(tp: usize, device: Device) -> Result<()> {
    if tp == 0 {
        bail!("--tensor-parallel-size must be at least 1");
    }
    #[cfg(not(feature = "cuda"))]
    let _ = device; // a CUDA device needs the cuda feature; resolve_device said so already
    #[cfg(feature = "cuda")]
    if tp > 1 && device == Device::Cuda {
        let found = crate::backend::cuda::device_count().unwrap_or(0);
        if found < tp {
            bail!(
                "--tensor-parallel-size {tp} needs {tp} GPUs on this node (one rank each), found \
                 {found}; pass a smaller size, or --device cpu to split the model over {tp} CPU ranks"
            );
        }
        // Said before the model loads, not after minutes of uploading weights.
        crate::backend::cuda::nccl::version()
            .with_context(|| format!("--tensor-parallel-size {tp} on CUDA needs NCCL"))?;
    }
    #[cfg(feature = "cuda")]
    if device == Device::Cuda
        && crate::backend::cuda::switches::CudaSettings::from_env()?.nccl_at_tp1
    {
        // Said before the model loads, not after minutes of uploading weights.
        crate::backend::cuda::nccl::version().with_context(|| {
            format!(
                "{}=1 asks for the NCCL path on one GPU",
                crate::backend::cuda::switches::NCCL_AT_TP1_ENV
            )
        })?;
    }
    Ok(())
}

/// The step limits: the flags, or vLLM's defaults for this device and usage (said on stderr
/// when they differ from the small-device ones, so that a larger default is never a surprise).
fn batch_limits(args: &EngineArgs, device: Device) -> Result<BatchLimits> {
    let large_gpu = match device {
        Device::Cpu => false,
        #[cfg(feature = "cuda")]
        Device::Cuda => {
            let (total, name) = crate::backend::cuda::memory_and_name(0)?;
            super::args::is_large_gpu(total, &name)
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda => false,
    };
    let limits = args.batch_limits(large_gpu);
    if large_gpu && (args.max_num_seqs.is_none() || args.max_num_batched_tokens.is_none()) {
        eprintln!(
            "rvllm: up to {} sequences and {} tokens a step (vLLM's defaults for a GPU of 70 GiB \
             or more; --max-num-seqs / --max-num-batched-tokens change them)",
            limits.max_num_seqs, limits.max_num_batched_tokens
        );
    }
    Ok(limits)
}

#[cfg(feature = "cuda")]
fn cuda_device_present() -> bool {
    // Probe for the driver library first: without it cudarc panics, and even a caught panic
    // prints a message and a backtrace, which on a CPU-only machine looks like a crash.
    // SAFETY: only tries to open the driver library by its usual names.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return false;
    }
    crate::backend::cuda::device_count().unwrap_or(0) > 0
}
#[cfg(not(feature = "cuda"))]
fn cuda_device_present() -> bool {
    false
}

/// Where the engine's steps spent their time (summed since start-up): the bench commands
/// print it, so that a slow run says whether the host or the device is the limit.
#[derive(Debug, Default, Clone, Copy)]
pub struct StepProfile {
    pub steps: u64,
    pub schedule: std::time::Duration,
    /// The whole `execute` call, device wait included.
    pub execute: std::time::Duration,
    pub update: std::time::Duration,
}

impl StepProfile {
    /// One line: per-step milliseconds of scheduling, executing (and of that, waiting for
    /// the device), and updating.
    pub fn summary(&self, device_wait: std::time::Duration) -> String {
        let n = self.steps.max(1) as f64;
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3 / n;
        format!(
            "{} steps; per step: schedule {:.3} ms, execute {:.3} ms (device wait {:.3} ms, host {:.3} ms), update {:.3} ms",
            self.steps,
            ms(self.schedule),
            ms(self.execute),
            ms(device_wait),
            ms(self.execute.saturating_sub(device_wait)),
            ms(self.update)
        )
    }
}

pub struct EngineCore {
    pub scheduler: Scheduler,
    pub executor: Box<dyn Executor>,
    pub config: ModelConfig,
    pub max_model_len: usize,
    pub prompt_tokens_total: u64,
    pub generation_tokens_total: u64,
    pub profile: StepProfile,
    /// Whether constrained requests can run (admission checks them against it).
    pub structured: StructuredSupport,
    /// Steps submitted whose outputs are not folded in yet, oldest first (two at most).
    in_flight: VecDeque<SchedulerOutput>,
    /// Schedule and submit the next step while the last one runs (async scheduling).
    lookahead: bool,
}

impl EngineCore {
    /// Load the model and build the backend and scheduler for it. Returns the loaded
    /// model's tokenizer alongside (the core itself never uses it).
    pub fn new(args: &EngineArgs) -> Result<(Self, Option<crate::tokenizer::Tokenizer>)> {
        if args.model.is_empty() {
            bail!("no model given: pass --model <HF folder | file.gguf | org/name>");
        }
        let device = resolve_device(&args.device)?;
        // A --dtype the device cannot run fails before the model loads.
        crate::backend::dtype::check_dtype(&args.dtype, device)?;
        check_tensor_parallel(args.tensor_parallel_size, device)?;
        let mut model = load_engine_model(args, device)?;
        let tokenizer = model.tokenizer.take();
        let config = model.config.clone();
        let limits = batch_limits(args, device)?;
        let runner_cfg = RunnerConfig {
            block_size: args.block_size,
            num_kv_blocks: args.num_kv_blocks,
            kv_cache_bytes: (args.cpu_kv_cache_gb as f64 * (1u64 << 30) as f64) as usize,
            max_num_batched_tokens: limits.max_num_batched_tokens,
            max_num_seqs: limits.max_num_seqs,
            tensor_parallel_size: args.tensor_parallel_size,
            multi_node: args.multi_node(device)?,
        };
        // Both runners apply grammar masks (the CUDA one builds them on the host and applies
        // them in its device sampler).
        let structured = StructuredSupport::lazy(
            tokenizer.as_ref().map(|t| t.inner()),
            &config.eos_token_ids,
            config.vocab_size,
        );
        let executor: Box<dyn Executor> = match device {
            Device::Cpu => crate::runner::create_cpu_executor_structured(
                model,
                &runner_cfg,
                structured.clone(),
            )?,
            #[cfg(feature = "cuda")]
            Device::Cuda => crate::runner::gpu::create_gpu_executor(
                model,
                &runner_cfg,
                &crate::runner::gpu::GpuOptions {
                    dtype: args.dtype.clone(),
                    max_model_len: args.max_model_len,
                    gpu_memory_utilization: args.gpu_memory_utilization,
                    enforce_eager: args.enforce_eager,
                    show_progress: !args.disable_progress,
                    structured: structured.clone(),
                },
            )?,
            #[cfg(not(feature = "cuda"))]
            Device::Cuda => unreachable!("resolve_device refuses cuda without the cuda feature"),
        };
        let num_blocks = executor.num_kv_blocks();
        let kv_tokens = num_blocks * args.block_size;
        // Every layer windowed: a request holds only the blocks its window and chunks span, so
        // contexts longer than the cache fit (`kv::max_blocks_held`).
        let window = crate::kv::uniform_window(
            (0..config.num_hidden_layers).map(|i| config.layer_window(i)),
        );
        let fits = |len: usize| {
            crate::kv::max_blocks_held(len, args.block_size, window, limits.max_num_batched_tokens)
                <= num_blocks
        };
        let max_model_len = match args.max_model_len {
            Some(len) => {
                if !fits(len) {
                    bail!(
                        "--max-model-len {len} needs {len} tokens of KV cache but only {kv_tokens} fit \
                         ({num_blocks} blocks of {}); lower --max-model-len or give the KV cache more \
                         memory (--gpu-memory-utilization / --cpu-kv-cache-gb)",
                        args.block_size
                    );
                }
                len
            }
            None if fits(config.max_position_embeddings) => config.max_position_embeddings,
            None => config.max_position_embeddings.min(kv_tokens),
        };
        if max_model_len == 0 {
            bail!("the KV cache holds no tokens; give it more memory (--gpu-memory-utilization / --cpu-kv-cache-gb)");
        }
        let scheduler = Scheduler::new(SchedulerConfig {
            max_num_seqs: limits.max_num_seqs,
            max_num_batched_tokens: limits.max_num_batched_tokens,
            max_model_len,
            block_size: args.block_size,
            num_kv_blocks: num_blocks,
        })
        .with_prefix_caching(args.prefix_caching())
        // Every layer windowed (Mistral v0.1 style): blocks the window has left behind go back
        // to the pool as the requests run (hybrid models keep every block).
        .with_layer_windows((0..config.num_hidden_layers).map(|i| config.layer_window(i)));
        let lookahead = executor.overlaps() && !args.no_async_scheduling;
        let core = Self {
            scheduler,
            executor,
            config,
            max_model_len,
            prompt_tokens_total: 0,
            generation_tokens_total: 0,
            profile: StepProfile::default(),
            structured,
            in_flight: VecDeque::new(),
            lookahead,
        };
        Ok((core, tokenizer))
    }

    pub fn add_request(&mut self, req: EngineRequest) -> Result<(), String> {
        let n = req.prompt_token_ids.len() as u64;
        self.scheduler.add_request(req).map_err(|e| e.to_string())?;
        self.prompt_tokens_total += n;
        Ok(())
    }

    pub fn abort(&mut self, id: RequestId) {
        self.scheduler.abort(id);
    }

    /// True while any request is unfinished or a step's output is still to be folded in.
    pub fn has_unfinished(&self) -> bool {
        self.scheduler.has_unfinished() || !self.in_flight.is_empty()
    }

    /// Whether steps are scheduled one ahead of the device (async scheduling).
    pub fn lookahead(&self) -> bool {
        self.lookahead
    }

    /// One engine step. Returns the outputs of every request that produced something.
    ///
    /// With lookahead the next step is scheduled and submitted before this one's output is
    /// waited for, so the host's scheduling, batch preparation and output handling overlap
    /// the device's work on the step before; its outputs come with the next call.
    pub fn step(&mut self) -> Result<Vec<EngineCoreOutput>> {
        if self.in_flight.is_empty() && !self.submit_next()? {
            return Ok(Vec::new());
        }
        if self.lookahead && self.in_flight.len() == 1 {
            self.submit_next()?;
        }
        let so = self.in_flight.pop_front().expect("a step is in flight");
        let t0 = std::time::Instant::now();
        let out = self.executor.collect()?;
        let t1 = std::time::Instant::now();
        let outputs = self.scheduler.update_from_output(&so, &out);
        let p = &mut self.profile;
        p.steps += 1;
        p.execute += t1 - t0;
        p.update += t1.elapsed();
        self.generation_tokens_total += outputs
            .iter()
            .map(|o| o.new_token_ids.len() as u64)
            .sum::<u64>();
        Ok(outputs)
    }

    /// Schedules a step and hands it to the executor; false when there is nothing to run.
    fn submit_next(&mut self) -> Result<bool> {
        let t0 = std::time::Instant::now();
        let so = self.scheduler.schedule();
        if so.is_empty() && so.finished.is_empty() {
            self.profile.schedule += t0.elapsed();
            return Ok(false);
        }
        let t1 = std::time::Instant::now();
        self.executor.submit(&so)?;
        self.in_flight.push_back(so);
        self.profile.schedule += t1 - t0;
        self.profile.execute += t1.elapsed();
        Ok(true)
    }
}
