//! The model runner: turns a `SchedulerOutput` into a forward pass and sampled tokens.
//! The engine core drives it through `Executor`, whatever the backend.
use anyhow::{ensure, Result};

use crate::backend::cpu::CpuBackend;
use crate::models::config::ModelConfig;
use crate::models::weights::WeightMap;
use crate::models::LoadedModel;
use crate::scheduler::{ModelRunnerOutput, SchedulerOutput};

mod batch;
mod model_runner;
#[cfg(test)]
mod tests;

pub use batch::{build_forward_batch, RowUse};
pub use model_runner::ModelRunner;

/// What the engine core drives; implemented by `ModelRunner<B>` for every backend.
pub trait Executor: Send {
    fn execute(&mut self, so: &SchedulerOutput) -> Result<ModelRunnerOutput>;
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
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            num_kv_blocks: None,
            kv_cache_bytes: 2 << 30,
            max_num_batched_tokens: 8192,
            max_num_seqs: 256,
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

/// The CPU executor for a loaded model (f32 weights and KV cache).
pub fn create_cpu_executor(model: LoadedModel, cfg: &RunnerConfig) -> Result<Box<dyn Executor>> {
    create_cpu_executor_from_parts(&model.config, model.weights, cfg)
}

/// The CPU executor from a config and weights (None: deterministic random weights).
pub fn create_cpu_executor_from_parts(
    config: &ModelConfig,
    weights: Option<WeightMap>,
    cfg: &RunnerConfig,
) -> Result<Box<dyn Executor>> {
    let blocks = kv_blocks_for(config, cfg, std::mem::size_of::<f32>())?;
    let runner = ModelRunner::new(CpuBackend::new(), config, weights, cfg, blocks)?;
    Ok(Box::new(CpuExecutor(runner)))
}

/// Runs each step on a rayon worker thread: the ops' parallel loops then start from inside
/// the pool (cheap work-stealing) instead of each one being injected from the engine thread
/// and waited for (hundreds of cross-thread hand-offs per decode step).
struct CpuExecutor(ModelRunner<CpuBackend>);

impl Executor for CpuExecutor {
    fn execute(&mut self, so: &SchedulerOutput) -> Result<ModelRunnerOutput> {
        let runner = &mut self.0;
        rayon::scope(|_| runner.execute(so))
    }
    fn num_kv_blocks(&self) -> usize {
        self.0.num_kv_blocks()
    }
    fn block_size(&self) -> usize {
        self.0.block_size()
    }
    fn device_name(&self) -> String {
        self.0.device_name()
    }
}
