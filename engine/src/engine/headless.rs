//! `rvllm serve --headless --node-rank N`: a worker node of a multi-node tensor-parallel
//! group (vLLM's flag). It serves no HTTP and schedules nothing: it joins the leader's
//! rendezvous, loads its ranks' part of the model, allocates their KV caches with the
//! leader's block count, then runs every step the leader sends until the leader closes
//! the connection (exit 0). A step that fails on this node aborts the group and ends it
//! with an error (the ranks' caches may disagree from then on).
use std::io::ErrorKind;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{ensure, Context, Result};

use super::core::{load_engine_model, resolve_device};
use super::EngineArgs;
use crate::backend::cpu::CpuBackend;
use crate::backend::parallel::wire::{
    self, connect, join, read_frame, write_frame, Hello, Role, TAG_ERROR,
};
use crate::backend::parallel::{HostCommunicator, TcpGroup};
use crate::runner::tensor_parallel::{load_ranks_of, spawn_peer, ThreadPeer};
use crate::runner::tensor_parallel_remote::{
    config_fingerprint, decode_batch, MultiNode, TAG_DONE, TAG_READY, TAG_STEP,
};
use crate::runner::RunnerConfig;

/// Runs this process as worker node `--node-rank` until the leader closes.
pub fn serve_headless(args: &EngineArgs) -> Result<()> {
    let device = resolve_device(&args.device)?;
    let mn = args.multi_node(device)?.context(
        "--headless runs a worker node of a multi-node group: pass --nnodes (above 1), \
         --node-rank, --master-addr and --master-port",
    )?;
    ensure!(
        mn.node_rank > 0,
        "--headless with --node-rank 0: node 0 is the leader, which serves HTTP; start it \
         without --headless"
    );
    let mut model = load_engine_model(args, device)?;
    let limits = args.batch_limits(false);
    let cfg = RunnerConfig {
        block_size: args.block_size,
        max_num_batched_tokens: limits.max_num_batched_tokens,
        max_num_seqs: limits.max_num_seqs,
        tensor_parallel_size: args.tensor_parallel_size,
        multi_node: Some(mn.clone()),
        ..RunnerConfig::default()
    };
    let tp = cfg.tensor_parallel_size;
    let mine = mn.ranks_of(mn.node_rank, tp);
    let fingerprint = config_fingerprint(&model.config, &cfg);
    let hello = |role| Hello {
        world: tp,
        nnodes: mn.nnodes,
        fingerprint,
        role,
    };
    let deadline = Instant::now() + wire::rendezvous_timeout();
    let addr = mn.rendezvous();
    eprintln!(
        "rvllm: headless node {} of {} (ranks {mine:?} of {tp}): joining the leader at {addr}",
        mn.node_rank, mn.nnodes
    );
    let mut control = connect(&addr, deadline)?;
    let welcome = join(&mut control, &hello(Role::Node(mn.node_rank)), deadline)?;
    let blocks = welcome
        .try_into()
        .map(u64::from_le_bytes)
        .map_err(|_| anyhow::anyhow!("the leader's welcome carries no block count"))?
        as usize;
    let kv_fp8 = model.config.family.quant.kv_cache_fp8_scales.clone();
    let (config, weights) = (&model.config, model.weights.take());
    let started = (|| -> Result<Vec<ThreadPeer>> {
        let models = load_ranks_of(config, weights, tp, mine.clone())?;
        let timeout = wire::step_timeout();
        let mut peers = Vec::new();
        for (rank, m) in mine.clone().zip(models) {
            let mut link = connect(&addr, deadline)?;
            join(&mut link, &hello(Role::Rank(rank)), deadline)?;
            let comm: Arc<HostCommunicator> = Arc::new(TcpGroup::member(rank, tp, link, timeout)?);
            let be = CpuBackend::new()
                .with_kv_cache_fp8(kv_fp8.clone())
                .with_communicator(comm.clone());
            peers.push(spawn_peer(rank, be, m, &cfg, blocks, comm)?);
        }
        Ok(peers)
    })();
    let peers = match started {
        Ok(p) => p,
        Err(e) => {
            let _ = write_frame(&control, TAG_ERROR, format!("{e:#}").as_bytes());
            return Err(e);
        }
    };
    write_frame(&control, TAG_READY, &[]).context("telling the leader this node is ready")?;
    eprintln!(
        "rvllm: headless node {} ready ({blocks} KV blocks per rank)",
        mn.node_rank
    );
    serve_steps(&control, &peers, &mn)
}

/// Runs each step the leader sends on every rank of this node, answering done or the error.
fn serve_steps(control: &std::net::TcpStream, peers: &[ThreadPeer], mn: &MultiNode) -> Result<()> {
    // Idle between steps for as long as the leader has no work.
    control.set_read_timeout(None)?;
    loop {
        let (tag, payload) = match read_frame(control) {
            Ok(f) => f,
            Err(e) if is_closed(&e) => {
                eprintln!(
                    "rvllm: headless node {}: the leader closed the connection; exiting",
                    mn.node_rank
                );
                return Ok(());
            }
            Err(e) => return Err(e).context("reading the leader's next step"),
        };
        ensure!(tag == TAG_STEP, "the leader sent frame {tag}, not a step");
        let result = decode_batch(&payload).and_then(|batch| {
            let batch = Arc::new(batch);
            let mut first_err = None;
            let mut started = 0;
            for p in peers {
                match p.start(batch.clone()) {
                    Ok(()) => started += 1,
                    Err(e) => {
                        first_err.get_or_insert(e);
                        break;
                    }
                }
            }
            for p in &peers[..started] {
                if let Err(e) = p.finish() {
                    first_err.get_or_insert(e);
                }
            }
            first_err.map_or(Ok(()), Err)
        });
        match result {
            Ok(()) => write_frame(control, TAG_DONE, &[]).context("answering the leader")?,
            Err(e) => {
                let _ = write_frame(control, TAG_ERROR, format!("{e:#}").as_bytes());
                return Err(e.context(format!(
                    "headless node {}: a step failed, the group is aborted",
                    mn.node_rank
                )));
            }
        }
    }
}

fn is_closed(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
    )
}
