//! The model runner: turns a `SchedulerOutput` into a forward pass and sampled tokens.
//! The engine core drives it through `Executor`, whatever the backend.
use std::sync::mpsc;

use anyhow::{anyhow, ensure, Context, Result};

use crate::backend::cpu::CpuBackend;
use crate::models::config::ModelConfig;
use crate::models::weights::WeightMap;
use crate::models::LoadedModel;
use crate::sampling::structured::StructuredSupport;
use crate::scheduler::{ModelRunnerOutput, SchedulerOutput};

mod batch;
pub mod gpu;
mod model_runner;
pub(crate) mod tensor_parallel;
pub(crate) mod tensor_parallel_remote;
#[cfg(test)]
mod tests;

pub use batch::{build_forward_batch, RowUse};
pub use model_runner::ModelRunner;
pub use tensor_parallel_remote::MultiNode;

/// What the engine core drives: `ModelRunner<B>` on a thread of its own for the CPU
/// (`CpuExecutor`), the `GpuRunner` (`gpu/`) for CUDA.
pub trait Executor: Send {
    /// Starts a step; its output comes from `collect`, oldest first. Every `submit` that
    /// returns Ok has exactly one `collect` result (which may be an error). When the previous
    /// step is still running, this step's `PLACEHOLDER_TOKEN`s stand for the tokens that step
    /// samples for the same requests, and the executor fills them in.
    fn submit(&mut self, so: &SchedulerOutput) -> Result<()>;
    /// The output of the oldest step submitted and not collected, waiting for it if need be.
    fn collect(&mut self) -> Result<ModelRunnerOutput>;
    /// Whether `submit` returns before the step's work is done, so that the engine schedules
    /// the next step meanwhile (lookahead); false: steps run inside `submit`.
    fn overlaps(&self) -> bool {
        false
    }
    /// One step from start to end (nothing may be in flight).
    fn execute(&mut self, so: &SchedulerOutput) -> Result<ModelRunnerOutput> {
        self.submit(so)?;
        self.collect()
    }
    fn num_kv_blocks(&self) -> usize;
    fn block_size(&self) -> usize;
    fn device_name(&self) -> String;
    /// Time spent blocked on the device since start-up (waiting for a step's results); zero
    /// for backends that compute on the calling thread.
    fn device_wait(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }
    /// A backend's own breakdown of its step time, for the bench commands.
    fn profile_detail(&self) -> Option<String> {
        None
    }
    /// How the steps that sampled tokens ran, counted since start-up (for /metrics).
    fn step_counts(&self) -> StepCounts {
        StepCounts::default()
    }
}

/// How a runner's steps ran, counted since start-up: only steps that sample tokens count
/// (a prefill chunk that samples nothing does not). Graph plus eager is every such step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepCounts {
    /// Steps that replayed a captured CUDA decode graph (always 0 on the CPU).
    pub graph_steps: u64,
    /// Steps launched op by op: every CPU step; on CUDA, the steps no captured graph fits
    /// (prefill or mixed batches, a batch above the largest graph, graphs turned off).
    pub eager_steps: u64,
    /// Of those steps, the ones where some sampled row was masked by its grammar
    /// (structured output).
    pub grammar_mask_steps: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerConfig {
    /// Tokens per KV block.
    pub block_size: usize,
    /// Exactly this many KV blocks; None: as many as `kv_cache_bytes` holds.
    pub num_kv_blocks: Option<usize>,
    /// Memory for the KV cache when `num_kv_blocks` is None.
    pub kv_cache_bytes: usize,
    pub max_num_batched_tokens: usize,
    pub max_num_seqs: usize,
    /// Ranks the model is split over (`--tensor-parallel-size`); above 1 on the CPU only,
    /// ranks as threads of this process (`tensor_parallel.rs`).
    pub tensor_parallel_size: usize,
    /// The ranks spread over several nodes (`--nnodes`), ranks of other nodes reached over
    /// TCP (`tensor_parallel_remote.rs`); None: every rank in this process.
    pub multi_node: Option<MultiNode>,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            num_kv_blocks: None,
            kv_cache_bytes: 2 << 30,
            max_num_batched_tokens: 8192,
            max_num_seqs: 256,
            tensor_parallel_size: 1,
            multi_node: None,
        }
    }
}

/// Number of KV blocks for a cache whose elements take `elem_bytes` bytes.
pub fn kv_blocks_for(config: &ModelConfig, cfg: &RunnerConfig, elem_bytes: usize) -> Result<usize> {
    ensure!(cfg.block_size > 0, "--block-size must be at least 1");
    let per_block = cfg.block_size * config.kv_bytes_per_token(elem_bytes);
    let blocks = match cfg.num_kv_blocks {
        Some(n) => n,
        None => cfg.kv_cache_bytes / per_block.max(1),
    };
    ensure!(
        blocks > 0,
        "the KV cache ({} bytes) holds no block of {} tokens ({per_block} bytes each); \
         give it more memory (--cpu-kv-cache-gb) or pass --num-kv-blocks",
        cfg.kv_cache_bytes,
        cfg.block_size
    );
    Ok(blocks)
}

/// The CPU executor for a loaded model (f32 weights and KV cache), without structured output.
pub fn create_cpu_executor(model: LoadedModel, cfg: &RunnerConfig) -> Result<Box<dyn Executor>> {
    let structured = StructuredSupport::refused("this runner has no tokenizer");
    create_cpu_executor_structured(model, cfg, structured)
}

/// `create_cpu_executor` whose constrained requests get their grammars from `structured`
/// (where it refuses them, a matcher that allows only end of sequence; admission refuses
/// them first).
pub fn create_cpu_executor_structured(
    model: LoadedModel,
    cfg: &RunnerConfig,
    structured: StructuredSupport,
) -> Result<Box<dyn Executor>> {
    cpu_executor(&model.config, model.weights, cfg, structured)
}

/// The CPU executor from a config and weights (None: deterministic random weights).
pub fn create_cpu_executor_from_parts(
    config: &ModelConfig,
    weights: Option<WeightMap>,
    cfg: &RunnerConfig,
) -> Result<Box<dyn Executor>> {
    let structured = StructuredSupport::refused("this runner has no tokenizer");
    cpu_executor(config, weights, cfg, structured)
}

fn cpu_executor(
    config: &ModelConfig,
    weights: Option<WeightMap>,
    cfg: &RunnerConfig,
    structured: StructuredSupport,
) -> Result<Box<dyn Executor>> {
    let kv_fp8 = config.family.quant.kv_cache_fp8_scales.clone();
    let runner = if cfg.tensor_parallel_size > 1 {
        tensor_parallel::tp_model_runner(config, weights, cfg, kv_fp8)?
    } else {
        let blocks = kv_blocks_for(config, cfg, std::mem::size_of::<f32>())?;
        let backend = CpuBackend::new().with_kv_cache_fp8(kv_fp8);
        ModelRunner::new(backend, config, weights, cfg, blocks)?
    };
    Ok(Box::new(CpuExecutor::spawn(
        runner.with_structured(structured),
    )?))
}

/// Runs the steps on a thread of its own, in order, so that the engine schedules the next
/// step and hands out the last one's outputs meanwhile. Each step runs inside a rayon scope:
/// the ops' parallel loops then start from inside the pool (cheap work-stealing) instead of
/// each one being injected from the calling thread and waited for (hundreds of cross-thread
/// hand-offs per decode step).
struct CpuExecutor {
    steps: Option<mpsc::Sender<SchedulerOutput>>,
    /// Each step's output with the runner's step counts after it.
    outputs: mpsc::Receiver<(Result<ModelRunnerOutput>, StepCounts)>,
    /// The counts that came with the last output collected.
    step_counts: StepCounts,
    worker: Option<std::thread::JoinHandle<()>>,
    num_kv_blocks: usize,
    block_size: usize,
    device_name: String,
}

impl CpuExecutor {
    fn spawn(mut runner: ModelRunner<CpuBackend>) -> Result<Self> {
        let (num_kv_blocks, block_size, device_name) = (
            runner.num_kv_blocks(),
            runner.block_size(),
            runner.device_name(),
        );
        // A rank blocked at an all-reduce must not hold one of rayon's workers, which the
        // other ranks' ops need: the ranks of a group run outside the pool.
        let in_pool = runner.tensor_parallel_size() == 1;
        let (step_tx, step_rx) = mpsc::channel::<SchedulerOutput>();
        let (out_tx, out_rx) = mpsc::channel();
        let worker = std::thread::Builder::new()
            .name("rvllm-cpu-runner".into())
            .spawn(move || {
                for so in step_rx {
                    // A panic is a bug, but it must reach the caller as an error, not end the
                    // thread and leave the engine waiting.
                    let out =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match in_pool {
                            true => rayon::scope(|_| runner.run_step(&so)),
                            false => runner.run_step(&so),
                        }))
                        .unwrap_or_else(|panic| {
                            Err(anyhow!(
                                "the CPU model runner panicked: {}",
                                panic_message(&panic)
                            ))
                        });
                    if out_tx.send((out, runner.step_counts())).is_err() {
                        return;
                    }
                }
            })
            .context("starting the CPU model runner thread")?;
        Ok(Self {
            steps: Some(step_tx),
            outputs: out_rx,
            step_counts: StepCounts::default(),
            worker: Some(worker),
            num_kv_blocks,
            block_size,
            device_name,
        })
    }
}

pub(super) fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

impl Executor for CpuExecutor {
    fn submit(&mut self, so: &SchedulerOutput) -> Result<()> {
        self.steps
            .as_ref()
            .and_then(|tx| tx.send(so.clone()).ok())
            .context("the CPU model runner thread has stopped")
    }
    fn collect(&mut self) -> Result<ModelRunnerOutput> {
        let (out, counts) = self
            .outputs
            .recv()
            .context("the CPU model runner thread has stopped")?;
        self.step_counts = counts;
        out
    }
    fn overlaps(&self) -> bool {
        true
    }
    fn num_kv_blocks(&self) -> usize {
        self.num_kv_blocks
    }
    fn block_size(&self) -> usize {
        self.block_size
    }
    fn device_name(&self) -> String {
        self.device_name.clone()
    }
    fn step_counts(&self) -> StepCounts {
        self.step_counts
    }
}

impl Drop for CpuExecutor {
    fn drop(&mut self) {
        // Closing the channel ends the worker's loop once the steps in flight are done.
        self.steps.take();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}
