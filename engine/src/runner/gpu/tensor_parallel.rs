//! Tensor parallelism over the GPUs of one process (`--tensor-parallel-size N`, one node):
//! rank r runs on GPU r with its own `Gpu`, `CudaBackend`, part of the model (Megatron
//! sharding, `LlamaModel::load_ranks`), KV cache of its KV heads, workspace and decode
//! graphs, and joins one NCCL group (ncclCommInitAll). Rank 0 is the `GpuRunner` itself: it
//! alone schedules, computes the logits and samples (vLLM's driver worker). Ranks 1.. are
//! threads (`GpuPeers`), each driving its own GPU's stream, that are handed every step's
//! batch (padded as rank 0 pads it) and the decode graph size rank 0 replays.
//!
//! Every rank issues the same collectives in the same order: at start-up the profiling
//! pass, then per graph size a warm-up forward and a captured one; per step a broadcast of
//! the step's token ids from rank 0 (its placeholders are filled on rank 0's device from the
//! sampler, which only rank 0 has), then the decoder's all-reduces, eager or in the graph.
//! Each rank's KV cache has the same number of blocks: the smallest that every GPU fits.
//!
//! The LM head is replicated and only rank 0 runs it (its logits are whole; the peers hold
//! a copy they never use). vLLM splits it over the vocabulary (a vocabulary-parallel LM head
//! and embedding, issue 22): not done yet.
//!
//! Failures never hang: a rank that fails records its error and aborts every rank's
//! communicator (ncclCommAbort), so the collectives the others wait in return; rank 0 then
//! reports the failing rank's error. Rank 0 failing mid-step aborts the group the same way.
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::backend::cuda::backend::{CudaBackend, CudaKvCache, CudaStepMeta, CudaTensor};
use crate::backend::cuda::device::{DevBuf, Gpu};
use crate::backend::cuda::nccl::NcclComm;
use crate::backend::parallel::Communicator;
use crate::backend::{Activation, Backend, ForwardBatch, KvCacheShape};
use crate::models::config::ModelConfig;
use crate::models::llama::{LlamaModel, Workspace};
use crate::models::weights::WeightMap;

use super::executor::GpuRunner;
use super::graphs::{self, Graph};
use super::memory;

/// The decode graph sizes every rank captures, in the order they are captured (the ranks'
/// captures meet at the same all-reduces, so the order must be the same everywhere).
pub(super) fn capture_sizes(max_rows: usize) -> Vec<usize> {
    let mut sizes: Vec<usize> = graphs::GRAPH_SIZES
        .iter()
        .copied()
        .filter(|&b| b <= max_rows)
        .collect();
    if !sizes.contains(&max_rows) {
        sizes.push(max_rows);
    }
    sizes
}

/// The KV blocks every rank allocates: `--num-gpu-blocks-override` when given, else the
/// fewest that any rank's memory holds (the scheduler has one block pool for all ranks).
pub(super) fn agreed_blocks(rank_blocks: &[usize], forced: Option<usize>) -> Result<usize> {
    if let Some(n) = forced {
        return Ok(n);
    }
    match rank_blocks.iter().copied().min() {
        Some(0) | None => bail!("no KV cache blocks fit on some GPU of the tensor-parallel group"),
        Some(n) => Ok(n),
    }
}

/// A cuBLAS workspace of fixed size, so that GEMMs can be captured into graphs.
pub(super) fn fixed_cublas_workspace(gpu: &Gpu) -> Result<DevBuf> {
    let ws_bytes = 64 << 20;
    let ws = gpu.alloc(ws_bytes)?;
    // SAFETY: the handle is this GPU's; the workspace lives as long as the runner.
    unsafe {
        cudarc::cublas::sys::cublasSetWorkspace_v2(
            gpu.blas,
            ws.ptr as *mut std::ffi::c_void,
            ws_bytes,
        )
        .result()
        .map_err(|e| anyhow!("cublasSetWorkspace: {e:?}"))?;
    }
    Ok(ws)
}

/// What a peer needs to size its start-up exactly as rank 0 does.
#[derive(Debug, Clone)]
pub(super) struct PeerSizing {
    pub profile_tokens: usize,
    pub max_len: usize,
    pub block_size: usize,
    pub gpu_memory_utilization: f32,
    pub num_kv_blocks: Option<usize>,
}

/// Every rank's communicator, by address, for aborting the group from any thread; and the
/// first failure. Rank 0's address is re-registered before each phase in which a peer may
/// fail (`pin`: the profiling pass, the captures, each step), when the runner no longer moves.
#[derive(Default)]
struct GroupState {
    comms: Mutex<Vec<usize>>,
    failure: Mutex<Option<String>>,
}

impl GroupState {
    fn new(world: usize) -> Self {
        Self {
            comms: Mutex::new(vec![0; world]),
            failure: Mutex::new(None),
        }
    }

    fn set(&self, rank: usize, comm: Option<&NcclComm>) {
        let mut comms = self.comms.lock().unwrap_or_else(|e| e.into_inner());
        comms[rank] = comm.map_or(0, |c| c as *const NcclComm as usize);
    }

    fn abort_all(&self) {
        let comms = self.comms.lock().unwrap_or_else(|e| e.into_inner());
        for &addr in comms.iter().filter(|&&a| a != 0) {
            // SAFETY: a registered address is live until its owner clears it under this
            // lock (peers before dropping their backend; rank 0 re-pins after each move).
            unsafe { (*(addr as *const NcclComm)).abort() };
        }
    }

    /// Records the first failure, then aborts (in that order: whoever wakes up from an
    /// aborted collective finds the cause already recorded).
    fn fail(&self, message: String) {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(message);
        self.abort_all();
    }

    fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// One peer's step: the batch rank 0 uploads (padded to the graph size when it replays one).
struct PeerStep {
    batch: ForwardBatch,
    graph: Option<usize>,
}

enum Command {
    /// Run the profiling pass and answer the KV blocks this rank fits (sent once rank 0's
    /// communicator is pinned where it stays for the pass).
    Profile,
    /// Allocate the KV cache of `blocks` blocks, then capture decode graphs of these sizes.
    Start {
        blocks: usize,
        graphs: Vec<usize>,
    },
    Step(Arc<PeerStep>),
}

struct Peer {
    rank: usize,
    commands: Option<mpsc::Sender<Command>>,
    /// Start-up answers: the blocks the rank fits, then the end of its graph captures.
    replies: mpsc::Receiver<Result<usize>>,
    exited: mpsc::Receiver<()>,
}

/// Ranks 1.. of rank 0's group.
pub struct GpuPeers {
    peers: Vec<Peer>,
    group: Arc<GroupState>,
    /// Rank 0's copy of each step's token ids, broadcast to the peers.
    ids: CudaTensor,
    /// A step was handed to the peers and rank 0 has not yet issued all of its collectives.
    in_step: bool,
}

// SAFETY: GpuPeers is used only by the thread that owns the runner.
unsafe impl Send for GpuPeers {}

/// Elements of the activation type that carry one i32 token id (both types are 2 bytes).
const ELEMS_PER_ID: usize = 2;

impl GpuPeers {
    /// Rank 0's backend `be0` (its GPU 0) and the group's other GPUs: every rank's part of
    /// the model (loaded from this thread: each upload binds its GPU), the NCCL group, and
    /// the peers' threads, waiting for `profile`.
    pub(super) fn load(
        be0: CudaBackend,
        config: &ModelConfig,
        weights: Option<WeightMap>,
        tp: usize,
        limits: crate::backend::cuda::backend::StepLimits,
        sizing: PeerSizing,
    ) -> Result<(CudaBackend, LlamaModel<CudaBackend>, GpuPeers)> {
        let local = crate::models::llama::rank_config(config, tp);
        let dtype = be0.dtype;
        let mut gpus = vec![be0.gpu.clone()];
        // Rank 0's settings, parsed once at start-up, for every rank.
        let settings = be0.gpu.settings.clone();
        let mut bes = vec![be0];
        let mut cublas = vec![];
        for rank in 1..tp {
            let gpu = Arc::new(
                Gpu::with_settings(rank, settings.clone())
                    .with_context(|| format!("tensor-parallel rank {rank} needs GPU {rank}"))?,
            );
            cublas.push(fixed_cublas_workspace(&gpu)?);
            let be = CudaBackend::new(
                gpu.clone(),
                limits,
                local.num_attention_heads,
                local.num_key_value_heads,
                local.head_dim,
                dtype,
            )?;
            be.enable_online_fp8(config.family.quant.online_fp8)?;
            gpus.push(gpu);
            bes.push(be);
        }
        gpus[0].bind()?;
        let models = LlamaModel::load_ranks(&bes, config, weights, 0)
            .with_context(|| format!("loading the model onto {tp} GPUs"))?;
        let comms = NcclComm::group_of(&gpus, dtype)?;
        gpus[0].bind()?;
        let group = Arc::new(GroupState::new(tp));
        let mut ranks = bes.into_iter().zip(models).zip(comms);
        let ((be0, model0), comm0) = ranks.next().context("a group without rank 0")?;
        be0.join_nccl_group(comm0)?;
        let mut peers = Vec::with_capacity(tp - 1);
        for (i, ((be, model), comm)) in ranks.enumerate() {
            be.join_nccl_group(comm)?;
            let rank = i + 1;
            let ws = cublas.remove(0);
            peers.push(spawn(rank, be, model, ws, sizing.clone(), group.clone())?);
        }
        gpus[0].bind()?;
        let ids = be0.alloc_activation(limits.max_tokens, ELEMS_PER_ID)?;
        let peers = GpuPeers {
            peers,
            group,
            ids,
            in_step: false,
        };
        Ok((be0, model0, peers))
    }

    fn send_all(&self, what: &str, command: impl Fn() -> Command) -> Result<()> {
        for p in &self.peers {
            if p.commands
                .as_ref()
                .and_then(|tx| tx.send(command()).ok())
                .is_none()
            {
                let e = self.peer_error(p, what);
                self.group.abort_all();
                return Err(e);
            }
        }
        Ok(())
    }

    /// Starts the peers' profiling passes; rank 0 runs its own next, from `be0` where it is.
    pub(super) fn profile(&self, be0: &CudaBackend) -> Result<()> {
        self.pin(be0);
        self.send_all("before its profiling pass", || Command::Profile)
    }

    /// Has the peers allocate `blocks` KV blocks and capture these graph sizes, while rank 0
    /// (`be0`, where it stays for the captures) captures its own.
    pub(super) fn start(&self, be0: &CudaBackend, blocks: usize, graphs: &[usize]) -> Result<()> {
        self.pin(be0);
        self.send_all("before its KV cache", || Command::Start {
            blocks,
            graphs: graphs.to_vec(),
        })
    }

    /// Registers rank 0's communicator at its current address (call after each move).
    pub(super) fn pin(&self, be0: &CudaBackend) {
        self.group.set(0, be0.nccl());
    }

    fn peer_error(&self, peer: &Peer, what: &str) -> anyhow::Error {
        match self.group.failure() {
            Some(f) => anyhow!("{f}"),
            None => anyhow!("tensor-parallel rank {} stopped {what}", peer.rank),
        }
    }

    /// A peer's failure, if any, over `rank0`'s own result (the peer's is the cause).
    pub(super) fn checked<T>(&self, rank0: Result<T>) -> Result<T> {
        match self.group.failure() {
            Some(f) => Err(anyhow!("{f}")),
            None => rank0,
        }
    }

    /// Every peer's KV block count, then the count every rank allocates (with rank 0's `own`).
    pub(super) fn agree_blocks(&self, own: Result<usize>, forced: Option<usize>) -> Result<usize> {
        let mut all = vec![self.checked(own)?];
        for p in &self.peers {
            let r = p
                .replies
                .recv()
                .map_err(|_| self.peer_error(p, "during its profiling pass"))?;
            all.push(self.checked(r)?);
        }
        agreed_blocks(&all, forced)
    }

    /// Waits until every peer has its KV cache and graphs.
    pub(super) fn wait_started(&self) -> Result<()> {
        for p in &self.peers {
            let r = p
                .replies
                .recv()
                .map_err(|_| self.peer_error(p, "while capturing its graphs"))?;
            self.checked(r)?;
        }
        Ok(())
    }

    /// Rank 0's part of a step after its upload: hands the peers the step, then broadcasts
    /// the step's token ids (placeholders already filled) from rank 0's `step`.
    pub(super) fn step(
        &mut self,
        be0: &CudaBackend,
        batch: &ForwardBatch,
        graph: Option<usize>,
        step: &CudaStepMeta,
    ) -> Result<()> {
        self.checked(Ok(()))?;
        self.pin(be0);
        let msg = Arc::new(PeerStep {
            batch: batch.clone(),
            graph,
        });
        self.in_step = true;
        self.send_all("before this step", || Command::Step(msg.clone()))?;
        let n = batch.num_tokens();
        self.ids.set_rows(n)?;
        be0.gpu.copy_d2d(self.ids.ptr(), step.ids(), n * 4)?;
        broadcast_ids(be0, &mut self.ids)
    }

    /// Before rank 0 submits a step.
    pub(super) fn begin_submit(&mut self) -> Result<()> {
        self.in_step = false;
        self.checked(Ok(()))
    }

    /// After rank 0 submitted a step: a rank-0 failure once the peers had the step aborts
    /// the group (they would wait in its collectives forever).
    pub(super) fn end_submit<T>(&mut self, r: Result<T>) -> Result<T> {
        if r.is_err() && self.in_step {
            self.group.fail(format!(
                "tensor-parallel rank 0 failed mid-step: {:#}",
                r.as_ref()
                    .err()
                    .map_or_else(String::new, |e| format!("{e:#}"))
            ));
        }
        self.in_step = false;
        self.checked(r)
    }

    /// Stops the peers: every registered communicator is aborted (a local operation, where
    /// destroying one of a group may wait for the others), then each thread is given a while
    /// to end. Rank 0's is among them only when `GpuRunner`'s drop pinned it just before.
    fn shut_down(&mut self) {
        self.group.abort_all();
        for p in &mut self.peers {
            p.commands.take();
        }
        for p in &self.peers {
            if p.exited.recv_timeout(Duration::from_secs(30)).is_err() {
                eprintln!(
                    "rvllm: tensor-parallel rank {} did not stop within 30 s; left behind",
                    p.rank
                );
            }
        }
        self.peers.clear();
        self.group.set(0, None);
    }
}

impl Drop for GpuPeers {
    fn drop(&mut self) {
        // Without the runner (start-up failed), rank 0's address may be stale: its backend
        // drops on its own.
        self.group.set(0, None);
        self.shut_down();
    }
}

impl Drop for GpuRunner {
    fn drop(&mut self) {
        // Rank 0's communicator is where the runner is now, which `pin` may not have seen.
        if let Some(tp) = self.tp.as_mut() {
            tp.pin(&self.be);
            tp.shut_down();
        }
    }
}

fn broadcast_ids(be: &CudaBackend, ids: &mut CudaTensor) -> Result<()> {
    be.nccl()
        .context("a tensor-parallel rank without its NCCL group")?
        .broadcast(ids, 0)
        .context("broadcasting the step's token ids")
}

/// Starts rank `rank` on a thread of its own (its GPU bound there), which runs its
/// profiling pass at once.
fn spawn(
    rank: usize,
    be: CudaBackend,
    model: LlamaModel<CudaBackend>,
    cublas_workspace: DevBuf,
    sizing: PeerSizing,
    group: Arc<GroupState>,
) -> Result<Peer> {
    let (cmd_tx, cmd_rx) = mpsc::channel::<Command>();
    let (reply_tx, reply_rx) = mpsc::channel();
    let (exit_tx, exit_rx) = mpsc::channel();
    let ranks = RankParts {
        be,
        model,
        _cublas_workspace: cublas_workspace,
    };
    std::thread::Builder::new()
        .name(format!("rvllm-tp-gpu-{rank}"))
        .spawn(move || {
            // Boxed: the group holds the communicator's address while the thread runs.
            let parts = Box::new(ranks);
            group.set(rank, parts.be.nccl());
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run_rank(rank, &parts, &sizing, &cmd_rx, &reply_tx)
            }))
            .unwrap_or_else(|p| Err(anyhow!("panicked: {}", crate::runner::panic_message(&p))));
            if let Err(e) = result {
                let message = format!("tensor-parallel rank {rank} (GPU {rank}): {e:#}");
                group.fail(message.clone());
                let _ = reply_tx.send(Err(anyhow!(message)));
            }
            group.set(rank, None);
            drop(parts);
            let _ = exit_tx.send(());
        })
        .with_context(|| format!("starting tensor-parallel rank {rank}'s thread"))?;
    Ok(Peer {
        rank,
        commands: Some(cmd_tx),
        replies: reply_rx,
        exited: exit_rx,
    })
}

struct RankParts {
    be: CudaBackend,
    model: LlamaModel<CudaBackend>,
    _cublas_workspace: DevBuf,
}

/// A peer's whole life: profiling pass, KV cache, graphs, then every step until rank 0
/// closes the channel.
fn run_rank(
    rank: usize,
    parts: &RankParts,
    sizing: &PeerSizing,
    commands: &mpsc::Receiver<Command>,
    replies: &mpsc::Sender<Result<usize>>,
) -> Result<()> {
    let (be, model) = (&parts.be, &parts.model);
    be.gpu.bind()?;
    let Ok(Command::Profile) = commands.recv() else {
        return Ok(()); // rank 0 gave up before the profiling pass
    };
    let local = model.config().clone();
    let profile_blocks =
        memory::profile_blocks(sizing.profile_tokens, sizing.max_len, sizing.block_size);
    let mut shape = KvCacheShape {
        num_layers: local.num_hidden_layers,
        num_blocks: profile_blocks,
        block_size: sizing.block_size,
        num_kv_heads: local.num_key_value_heads,
        head_dim: local.head_dim,
    };
    let mut kv = be
        .alloc_kv_cache(shape)
        .context("allocating the KV cache")?;
    let mut ws =
        Workspace::new(be, &local, sizing.profile_tokens).context("allocating activations")?;
    memory::profile_pass(
        be,
        model,
        &mut kv,
        &mut ws,
        sizing.profile_tokens,
        sizing.max_len,
        sizing.block_size,
    )?;
    let block_bytes = sizing.block_size * local.kv_bytes_per_token(2);
    let fits = match sizing.num_kv_blocks {
        Some(n) => n,
        None => memory::kv_blocks_for_memory(
            &be.gpu,
            sizing.gpu_memory_utilization,
            profile_blocks,
            block_bytes,
        )?,
    };
    if replies.send(Ok(fits)).is_err() {
        return Ok(()); // rank 0 gave up
    }
    let Ok(Command::Start { blocks, graphs }) = commands.recv() else {
        return Ok(());
    };
    drop(kv);
    shape.num_blocks = blocks;
    let mut kv = be
        .alloc_kv_cache(shape)
        .with_context(|| format!("allocating the KV cache of {blocks} blocks"))?;
    let mut captured = std::collections::HashMap::new();
    for b in graphs {
        captured.insert(b, capture(be, model, &mut kv, &mut ws, b)?);
    }
    let mut ids = be.alloc_activation(ws.capacity(), ELEMS_PER_ID)?;
    if replies.send(Ok(0)).is_err() {
        return Ok(());
    }
    for command in commands {
        let Command::Step(s) = command else {
            bail!("rank {rank} was sent a start-up command mid-run; this is a bug");
        };
        let step = be.upload_step(&s.batch)?;
        let n = s.batch.num_tokens();
        ids.set_rows(n)?;
        broadcast_ids(be, &mut ids)?;
        be.gpu.copy_d2d(step.ids(), ids.ptr(), n * 4)?;
        match s.graph {
            Some(g) => captured
                .get(&g)
                .with_context(|| format!("no decode graph of batch {g} on rank {rank}"))?
                .launch(&be.gpu, g)?,
            None => model.forward_hidden(be, &step, &mut kv, &mut ws)?,
        }
    }
    Ok(())
}

/// A peer's decode graph of `b` rows: the body only (rank 0's adds the LM head and sampler).
fn capture(
    be: &CudaBackend,
    model: &LlamaModel<CudaBackend>,
    kv: &mut CudaKvCache,
    ws: &mut Workspace<CudaBackend>,
    b: usize,
) -> Result<Graph> {
    use cudarc::driver::{result as drv, sys};
    use std::sync::atomic::Ordering;
    let dummy = graphs::padded(&ForwardBatch::default(), b);
    be.capturing_graph.store(true, Ordering::Relaxed);
    let step = be.upload_step(&dummy)?;
    // Warm-up outside the capture, meeting rank 0's warm-up at the same all-reduces.
    model.forward_hidden(be, &step, kv, ws)?;
    be.gpu.sync()?;
    // SAFETY: this rank's stream, captured from this thread only.
    unsafe {
        drv::stream::begin_capture(
            be.gpu.stream,
            sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
        )
    }
    .map_err(|e| anyhow!("starting CUDA graph capture: {e:?}"))?;
    let launched = model.forward_hidden(be, &step, kv, ws);
    // SAFETY: ends the capture begun above on the same stream.
    let graph = unsafe { drv::stream::end_capture(be.gpu.stream) };
    be.capturing_graph.store(false, Ordering::Relaxed);
    launched.with_context(|| format!("capturing the decode graph for batch {b}"))?;
    let graph = graph.map_err(|e| anyhow!("ending CUDA graph capture for batch {b}: {e:?}"))?;
    Graph::instantiate(graph, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_group_takes_the_fewest_blocks_any_rank_fits() {
        assert_eq!(agreed_blocks(&[900, 850, 1000], None).unwrap(), 850);
        assert_eq!(agreed_blocks(&[7], None).unwrap(), 7);
    }

    #[test]
    fn an_override_applies_to_every_rank() {
        assert_eq!(agreed_blocks(&[900, 850], Some(64)).unwrap(), 64);
    }

    #[test]
    fn no_blocks_on_a_rank_is_an_error() {
        let e = agreed_blocks(&[900, 0], None).unwrap_err().to_string();
        assert!(e.contains("no KV cache blocks"), "{e}");
        assert!(agreed_blocks(&[], None).is_err());
    }

    /// The first failure is the one reported (the others are its consequences: collectives
    /// that the abort ended); with nothing registered, failing aborts nothing and is no crash.
    #[test]
    fn the_group_keeps_the_first_failure() {
        let group = GroupState::new(3);
        assert_eq!(group.failure(), None);
        group.fail("tensor-parallel rank 2 (GPU 2): out of memory".into());
        group.fail("tensor-parallel rank 1 (GPU 1): the NCCL group was aborted".into());
        assert_eq!(
            group.failure().as_deref(),
            Some("tensor-parallel rank 2 (GPU 2): out of memory")
        );
    }

    #[test]
    fn capture_sizes_are_ascending_and_end_at_max_num_seqs() {
        assert_eq!(capture_sizes(1), vec![1]);
        assert_eq!(capture_sizes(6), vec![1, 2, 4, 6]);
        assert_eq!(capture_sizes(8), vec![1, 2, 4, 8]);
        let big = capture_sizes(256);
        assert!(big.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(big.last(), Some(&256));
    }
}
