//! Tensor parallelism on the CPU. Rank 0 is the `ModelRunner` itself (it alone samples, as
//! vLLM's driver worker, from the logits every rank's part of the vocabulary-parallel LM
//! head computes and the all-gather collects); every other rank owns its part of the model,
//! a KV cache of its KV heads and a workspace. Every step, rank 0 hands its peers the step's
//! batch and all ranks run the decoder together, meeting at each all-reduce; the scheduler
//! sees one executor and one KV block pool (every rank's cache has the same blocks).
//!
//! A peer is a rank on a thread of this process (`ThreadPeer`, the in-process communicator
//! on one node) or, with `--nnodes` above 1, the ranks of another node, sent each step over
//! TCP (`tensor_parallel_remote.rs`; that node's side is `engine/headless.rs`).
use std::ops::Range;
use std::sync::{mpsc, Arc};

use anyhow::{anyhow, Context, Result};

use super::model_runner::ModelRunner;
use super::tensor_parallel_remote::RemoteNode;
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
    world: usize,
    peers: Vec<Peer>,
}

pub(super) enum Peer {
    Thread(ThreadPeer),
    Remote(RemoteNode),
}

impl Peer {
    fn start(&self, batch: &Arc<ForwardBatch>) -> Result<()> {
        match self {
            Peer::Thread(p) => p.start(batch.clone()),
            Peer::Remote(p) => p.start(batch),
        }
    }
    fn finish(&self) -> Result<()> {
        match self {
            Peer::Thread(p) => p.finish(),
            Peer::Remote(p) => p.finish(),
        }
    }
}

impl TpPeers {
    pub(super) fn new(comm: Arc<HostCommunicator>, world: usize, peers: Vec<Peer>) -> Self {
        Self { comm, world, peers }
    }

    /// Ranks in the group, rank 0 included.
    pub(super) fn world_size(&self) -> usize {
        self.world
    }

    /// Hands the step to every peer, which starts its forward at once. A peer that cannot
    /// take it aborts the group, so that the peers already started do not wait for it.
    pub(super) fn start(&self, batch: &ForwardBatch) -> Result<()> {
        let batch = Arc::new(batch.clone());
        for (i, p) in self.peers.iter().enumerate() {
            if let Err(e) = p.start(&batch) {
                self.comm.abort();
                for started in &self.peers[..i] {
                    let _ = started.finish();
                }
                return Err(e);
            }
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
        for p in &self.peers {
            if let Err(e) = p.finish() {
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

/// One rank on a thread of this process.
pub(crate) struct ThreadPeer {
    rank: usize,
    steps: Option<mpsc::Sender<Arc<ForwardBatch>>>,
    done: mpsc::Receiver<Result<()>>,
    worker: Option<std::thread::JoinHandle<()>>,
}

impl ThreadPeer {
    pub(crate) fn start(&self, batch: Arc<ForwardBatch>) -> Result<()> {
        self.steps
            .as_ref()
            .and_then(|tx| tx.send(batch).ok())
            .with_context(|| format!("tensor-parallel rank {} has stopped", self.rank))
    }

    pub(crate) fn finish(&self) -> Result<()> {
        let rank = self.rank;
        self.done
            .recv()
            .map_err(|_| anyhow!("tensor-parallel rank {rank} has stopped"))
            .and_then(|r| r.with_context(|| format!("tensor-parallel rank {rank}")))
    }
}

impl Drop for ThreadPeer {
    fn drop(&mut self) {
        self.steps.take();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
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
    if let Some(mn) = &cfg.multi_node {
        return super::tensor_parallel_remote::leader_model_runner(
            config,
            weights,
            cfg,
            kv_fp8_scales,
            mn,
        );
    }
    let tp = cfg.tensor_parallel_size;
    let comms: Vec<Arc<HostCommunicator>> = LocalGroup::new(tp)
        .into_iter()
        .map(|g| Arc::new(g) as Arc<HostCommunicator>)
        .collect();
    let models = load_ranks_of(config, weights, tp, 0..tp)?;
    let local = models[0].config().clone();
    let blocks = kv_blocks_for(&local, cfg, std::mem::size_of::<f32>())?;
    let mut ranks = comms.iter().zip(models);
    let (comm0, model0) = ranks.next().context("a group without rank 0")?;
    let backend = |c: &Arc<HostCommunicator>| {
        CpuBackend::new()
            .with_kv_cache_fp8(kv_fp8_scales.clone())
            .with_communicator(c.clone())
    };
    let mut peers = Vec::with_capacity(tp - 1);
    for (rank, (comm, model)) in ranks.enumerate().map(|(i, r)| (i + 1, r)) {
        let p = spawn_peer(rank, backend(comm), model, cfg, blocks, comm.clone())?;
        peers.push(Peer::Thread(p));
    }
    let tp_peers = TpPeers::new(comms[0].clone(), tp, peers);
    ModelRunner::from_model(backend(comm0), model0, cfg, blocks).map(|r| r.with_peers(tp_peers))
}

/// Ranks `mine` of a group of `tp`, loaded on the CPU. Loading builds every rank's part and
/// keeps this node's (`LlamaModel::load_ranks` splits the whole group at once): more memory
/// while loading on a node that holds only some of the ranks, none after. A CPU backend
/// carries no state the weights depend on, so the ranks take their communicators later.
pub(crate) fn load_ranks_of(
    config: &ModelConfig,
    weights: Option<WeightMap>,
    tp: usize,
    mine: Range<usize>,
) -> Result<Vec<LlamaModel<CpuBackend>>> {
    let backends = vec![CpuBackend::new(); tp];
    let models =
        LlamaModel::load_ranks(&backends, config, weights, 0).context("building the model")?;
    Ok(models
        .into_iter()
        .enumerate()
        .filter(|(rank, _)| mine.contains(rank))
        .map(|(_, m)| m)
        .collect())
}

/// Starts rank `rank` on a thread of its own: its KV cache of `blocks` blocks, its
/// workspace, then a forward for every step it is handed.
pub(crate) fn spawn_peer(
    rank: usize,
    be: CpuBackend,
    model: LlamaModel<CpuBackend>,
    cfg: &RunnerConfig,
    blocks: usize,
    comm: Arc<HostCommunicator>,
) -> Result<ThreadPeer> {
    let local = model.config().clone();
    let mut kv = be
        .alloc_kv_cache(kv_shape(&local, cfg, blocks))
        .with_context(|| format!("allocating rank {rank}'s KV cache"))?;
    let mut ws = Workspace::new(&be, &local, super::model_runner::initial_rows(cfg))
        .with_context(|| format!("allocating rank {rank}'s activations"))?;
    let (step_tx, step_rx) = mpsc::channel::<Arc<ForwardBatch>>();
    let (done_tx, done_rx) = mpsc::channel();
    let worker = std::thread::Builder::new()
        .name(format!("rvllm-tp-rank-{rank}"))
        .spawn(move || {
            for batch in step_rx {
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    model.forward_peer(&be, &batch, &mut kv, &mut ws)
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
    Ok(ThreadPeer {
        rank,
        steps: Some(step_tx),
        done: done_rx,
        worker: Some(worker),
    })
}
