//! Tensor parallelism on the CPU: the ranks of one group are threads of this process. Rank
//! 0 is the `ModelRunner` itself (it alone computes the logits and samples, as vLLM's driver
//! worker); ranks 1.. each own their part of the model, a KV cache of their KV heads and a
//! workspace, on threads of their own. Every step, rank 0 hands them the step's batch and
//! all ranks run the decoder together, meeting at each all-reduce; the scheduler sees one
//! executor and one KV block pool (every rank's cache has the same blocks).
use std::sync::{mpsc, Arc};

use anyhow::{anyhow, Context, Result};

use super::model_runner::ModelRunner;
use super::{kv_blocks_for, panic_message, RunnerConfig};
use crate::backend::cpu::CpuBackend;
use crate::backend::parallel::{HostCommunicator, LocalGroup};
use crate::backend::{Backend, ForwardBatch, KvCacheShape};
use crate::models::config::ModelConfig;
use crate::models::llama::{LlamaModel, Workspace};
use crate::models::weights::WeightMap;

/// Ranks 1.. of the group, driven by rank 0.
pub(super) struct TpPeers {
    /// Rank 0's communicator: aborting it releases the peers when rank 0 fails mid-step.
    comm: Arc<HostCommunicator>,
    peers: Vec<Peer>,
}

struct Peer {
    steps: Option<mpsc::Sender<Arc<ForwardBatch>>>,
    done: mpsc::Receiver<Result<()>>,
    worker: Option<std::thread::JoinHandle<()>>,
}

impl TpPeers {
    /// Ranks in the group, rank 0 included.
    pub(super) fn world_size(&self) -> usize {
        self.peers.len() + 1
    }

    /// Hands the step to every peer, which starts its forward at once.
    pub(super) fn start(&self, batch: &ForwardBatch) -> Result<()> {
        let batch = Arc::new(batch.clone());
        for (i, p) in self.peers.iter().enumerate() {
            p.steps
                .as_ref()
                .and_then(|tx| tx.send(batch.clone()).ok())
                .with_context(|| format!("tensor-parallel rank {} has stopped", i + 1))?;
        }
        Ok(())
    }

    /// Waits for every peer's forward; returns rank 0's result unless a peer failed. A
    /// failure aborts the group (later steps fail too: the ranks' caches may disagree).
    pub(super) fn finish<T>(&self, rank0: Result<T>) -> Result<T> {
        if rank0.is_err() {
            self.comm.abort();
        }
        let mut first_err = None;
        for (i, p) in self.peers.iter().enumerate() {
            let r = p
                .done
                .recv()
                .map_err(|_| anyhow!("tensor-parallel rank {} has stopped", i + 1))
                .and_then(|r| r.with_context(|| format!("tensor-parallel rank {}", i + 1)));
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        match (rank0, first_err) {
            (Err(e), _) => Err(e),
            (Ok(_), Some(e)) => Err(e),
            (Ok(v), None) => Ok(v),
        }
    }
}

impl Drop for TpPeers {
    fn drop(&mut self) {
        for p in &mut self.peers {
            p.steps.take();
        }
        for p in &mut self.peers {
            if let Some(w) = p.worker.take() {
                let _ = w.join();
            }
        }
    }
}

/// The KV cache shape of one rank (its KV heads only).
pub(super) fn kv_shape(local: &ModelConfig, cfg: &RunnerConfig, blocks: usize) -> KvCacheShape {
    KvCacheShape {
        num_layers: local.num_hidden_layers,
        num_blocks: blocks,
        block_size: cfg.block_size,
        num_kv_heads: local.num_key_value_heads,
        head_dim: local.head_dim,
    }
}

/// The runner of a group of `cfg.tensor_parallel_size` CPU ranks: rank 0's runner, its
/// peers started. `--cpu-kv-cache-gb` is each rank's (as vLLM's memory is each GPU's).
pub(super) fn tp_model_runner(
    config: &ModelConfig,
    weights: Option<WeightMap>,
    cfg: &RunnerConfig,
    kv_fp8_scales: Option<Vec<(f32, f32)>>,
) -> Result<ModelRunner<CpuBackend>> {
    let tp = cfg.tensor_parallel_size;
    let comms: Vec<Arc<HostCommunicator>> = LocalGroup::new(tp)
        .into_iter()
        .map(|g| Arc::new(g) as Arc<HostCommunicator>)
        .collect();
    let backends: Vec<CpuBackend> = comms
        .iter()
        .map(|c| {
            CpuBackend::new()
                .with_kv_cache_fp8(kv_fp8_scales.clone())
                .with_communicator(c.clone())
        })
        .collect();
    let models =
        LlamaModel::load_ranks(&backends, config, weights, 0).context("building the model")?;
    let local = models[0].config().clone();
    let blocks = kv_blocks_for(&local, cfg, std::mem::size_of::<f32>())?;
    let mut ranks = backends.into_iter().zip(models);
    let (be0, model0) = ranks.next().context("a group without rank 0")?;
    let mut peers = Vec::with_capacity(tp - 1);
    for (rank, (be, model)) in ranks.enumerate().map(|(i, r)| (i + 1, r)) {
        let kv = be
            .alloc_kv_cache(kv_shape(&local, cfg, blocks))
            .with_context(|| format!("allocating rank {rank}'s KV cache"))?;
        let ws = Workspace::new(&be, &local, super::model_runner::initial_rows(cfg))
            .with_context(|| format!("allocating rank {rank}'s activations"))?;
        peers.push(spawn_peer(rank, be, model, kv, ws, comms[rank].clone())?);
    }
    let tp_peers = TpPeers {
        comm: comms[0].clone(),
        peers,
    };
    ModelRunner::from_model(be0, model0, cfg, blocks).map(|r| r.with_peers(tp_peers))
}

fn spawn_peer(
    rank: usize,
    be: CpuBackend,
    model: LlamaModel<CpuBackend>,
    mut kv: <CpuBackend as Backend>::KvCache,
    mut ws: Workspace<CpuBackend>,
    comm: Arc<HostCommunicator>,
) -> Result<Peer> {
    let (step_tx, step_rx) = mpsc::channel::<Arc<ForwardBatch>>();
    let (done_tx, done_rx) = mpsc::channel();
    let worker = std::thread::Builder::new()
        .name(format!("rvllm-tp-rank-{rank}"))
        .spawn(move || {
            for batch in step_rx {
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    model
                        .forward_body(&be, &batch, &mut kv, &mut ws)
                        .map(|_| ())
                }))
                .unwrap_or_else(|panic| {
                    Err(anyhow!("rank {rank} panicked: {}", panic_message(&panic)))
                });
                if r.is_err() {
                    comm.abort();
                }
                if done_tx.send(r).is_err() {
                    return;
                }
            }
        })
        .with_context(|| format!("starting tensor-parallel rank {rank}'s thread"))?;
    Ok(Peer {
        steps: Some(step_tx),
        done: done_rx,
        worker: Some(worker),
    })
}
