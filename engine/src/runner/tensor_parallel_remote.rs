//! Tensor parallelism over several nodes (`--nnodes`), the leader's side. The
//! `--tensor-parallel-size` ranks are split evenly over the nodes, node n holding ranks
//! n·k..(n+1)·k (k = tp / nnodes). Node 0 (the leader) holds rank 0, schedules and serves;
//! every other node runs `rvllm serve --headless` (`engine/headless.rs`). All ranks
//! meet at the leader's rendezvous on --master-port (`backend/parallel/wire.rs`) and reduce
//! through the TCP communicator; each other node is a `RemoteNode` peer that gets every
//! step's `ForwardBatch` on its control socket and answers when its ranks are done.
use std::net::{Shutdown, TcpListener, TcpStream};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};

use super::model_runner::ModelRunner;
use super::tensor_parallel::{load_ranks_of, spawn_peer, Peer, TpPeers};
use super::{kv_blocks_for, RunnerConfig};
use crate::backend::cpu::CpuBackend;
use crate::backend::parallel::wire::{
    self, accept_all, await_welcome, connect, read_frame, send_hello, write_frame, Hello, Role,
    TAG_ERROR,
};
use crate::backend::parallel::{HostCommunicator, TcpGroup};
use crate::backend::{ForwardBatch, SeqSlice};
use crate::models::config::ModelConfig;
use crate::models::weights::WeightMap;

/// Control frames between the leader and a node.
pub(crate) const TAG_STEP: u8 = 0x53;
pub(crate) const TAG_DONE: u8 = 0x44;
pub(crate) const TAG_READY: u8 = 0x52;

/// Where this process sits in a group spread over several nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MultiNode {
    pub nnodes: usize,
    pub node_rank: usize,
    /// The leader's address as the other nodes reach it, and the port of its rendezvous.
    pub master_addr: String,
    pub master_port: u16,
}

impl MultiNode {
    /// The ranks node `node` holds in a group of `tp`.
    pub fn ranks_of(&self, node: usize, tp: usize) -> Range<usize> {
        let per = tp / self.nnodes;
        node * per..(node + 1) * per
    }

    /// `host:port` of the rendezvous (an IPv6 literal bracketed).
    pub(crate) fn rendezvous(&self) -> String {
        match self.master_addr.contains(':') && !self.master_addr.starts_with('[') {
            true => format!("[{}]:{}", self.master_addr, self.master_port),
            false => format!("{}:{}", self.master_addr, self.master_port),
        }
    }
}

/// What must agree between the nodes beyond the group's shape: the model as loaded
/// (architecture, sizes, quantization, KV cache dtype, max_model_len) and the block size.
/// FNV-1a of their debug text, which one build prints the same on every host.
pub(crate) fn config_fingerprint(config: &ModelConfig, cfg: &RunnerConfig) -> u64 {
    let text = format!("{config:?}|block_size={}", cfg.block_size);
    text.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

/// The ranks of another node, as rank 0 drives them.
pub(super) struct RemoteNode {
    node: usize,
    ranks: Range<usize>,
    link: TcpStream,
}

impl RemoteNode {
    fn name(&self) -> String {
        format!("node {} (ranks {:?})", self.node, self.ranks)
    }

    pub(super) fn start(&self, batch: &ForwardBatch) -> Result<()> {
        write_frame(&self.link, TAG_STEP, &encode_batch(batch))
            .map_err(|e| link_error(&self.name(), e))
    }

    pub(super) fn finish(&self) -> Result<()> {
        let (tag, payload) = read_frame(&self.link).map_err(|e| link_error(&self.name(), e))?;
        match tag {
            TAG_DONE => Ok(()),
            TAG_ERROR => bail!("{}: {}", self.name(), String::from_utf8_lossy(&payload)),
            t => bail!("{} answered a step with frame {t}", self.name()),
        }
    }
}

impl Drop for RemoteNode {
    /// The node sees its control socket close between steps and exits.
    fn drop(&mut self) {
        let _ = self.link.shutdown(Shutdown::Both);
    }
}

fn link_error(who: &str, e: std::io::Error) -> anyhow::Error {
    use std::io::ErrorKind::*;
    match e.kind() {
        WouldBlock | TimedOut => anyhow!(
            "{who} did not answer within the step timeout (RVLLM_TP_STEP_TIMEOUT_S): it is \
             stuck or its host is unreachable"
        ),
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe | NotConnected => {
            anyhow!("{who} closed its connection: its process died or stopped")
        }
        _ => anyhow::Error::new(e).context(format!("talking to {who}")),
    }
}

/// Rank 0's runner of a multi-node group: this node's ranks loaded, every other node joined
/// and ready (its shard loaded, its KV cache of the leader's block count allocated).
pub(super) fn leader_model_runner(
    config: &ModelConfig,
    weights: Option<WeightMap>,
    cfg: &RunnerConfig,
    kv_fp8_scales: Option<Vec<(f32, f32)>>,
    mn: &MultiNode,
) -> Result<ModelRunner<CpuBackend>> {
    let tp = cfg.tensor_parallel_size;
    ensure!(
        mn.node_rank == 0,
        "node {} is a worker: run it with `rvllm serve --headless`",
        mn.node_rank
    );
    // Bound before the shard loads, so that the other nodes' connections wait in the backlog.
    let listener = TcpListener::bind(("0.0.0.0", mn.master_port)).with_context(|| {
        format!(
            "listening for the other nodes on port {} (--master-port; is it taken?)",
            mn.master_port
        )
    })?;
    let deadline = Instant::now() + wire::rendezvous_timeout();
    let mine = mn.ranks_of(0, tp);
    let mut models = load_ranks_of(config, weights, tp, mine.clone())?.into_iter();
    let model0 = models.next().context("node 0 holds no rank")?;
    let local = model0.config().clone();
    let blocks = kv_blocks_for(&local, cfg, std::mem::size_of::<f32>())?;
    let hello = |role| Hello {
        world: tp,
        nnodes: mn.nnodes,
        fingerprint: config_fingerprint(config, cfg),
        role,
    };
    // This node's other ranks join the rendezvous like any rank.
    let own = format!("127.0.0.1:{}", mn.master_port);
    let mut own_links = Vec::new();
    for rank in mine.clone().skip(1) {
        let mut s = connect(&own, deadline)?;
        send_hello(&mut s, &hello(Role::Rank(rank)))?;
        own_links.push((rank, s));
    }
    eprintln!(
        "rvllm: node 0 of {} (ranks {mine:?} of {tp}): waiting for the other nodes on port {}",
        mn.nnodes, mn.master_port
    );
    let welcome = (blocks as u64).to_le_bytes();
    let mut got = accept_all(&listener, &hello(Role::Rank(0)), &welcome, deadline)?;
    for (node, link) in got.nodes.iter_mut() {
        await_ready(*node, link, deadline)?;
    }
    let timeout = wire::step_timeout();
    let ranks0: Vec<TcpStream> = std::mem::take(&mut got.ranks).into_values().collect();
    let comm0: Arc<HostCommunicator> = Arc::new(TcpGroup::leader(tp, ranks0, timeout)?);
    let backend = |c: &Arc<HostCommunicator>| {
        CpuBackend::new()
            .with_kv_cache_fp8(kv_fp8_scales.clone())
            .with_communicator(c.clone())
    };
    let mut peers = Vec::new();
    for ((rank, mut link), model) in own_links.into_iter().zip(models) {
        await_welcome(&mut link, deadline)?;
        let comm: Arc<HostCommunicator> = Arc::new(TcpGroup::member(rank, tp, link, timeout)?);
        let p = spawn_peer(rank, backend(&comm), model, cfg, blocks, comm)?;
        peers.push(Peer::Thread(p));
    }
    for (node, link) in got.nodes {
        link.set_read_timeout(Some(timeout))?;
        link.set_write_timeout(Some(timeout))?;
        link.set_nodelay(true)?;
        peers.push(Peer::Remote(RemoteNode {
            node,
            ranks: mn.ranks_of(node, tp),
            link,
        }));
    }
    eprintln!(
        "rvllm: all {} nodes joined; {blocks} KV blocks on every rank",
        mn.nnodes
    );
    let tp_peers = TpPeers::new(comm0.clone(), tp, peers);
    ModelRunner::from_model(backend(&comm0), model0, cfg, blocks).map(|r| r.with_peers(tp_peers))
}

/// Waits for node `node`'s ready (or the error it failed to load with).
fn await_ready(node: usize, link: &mut TcpStream, deadline: Instant) -> Result<()> {
    link.set_read_timeout(Some(
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(10)),
    ))?;
    let who = format!("node {node}");
    let (tag, payload) = read_frame(&mut *link).map_err(|e| link_error(&who, e))?;
    match tag {
        TAG_READY => Ok(()),
        TAG_ERROR => bail!(
            "{who} failed to start: {}",
            String::from_utf8_lossy(&payload)
        ),
        t => bail!("{who} sent frame {t} instead of its ready"),
    }
}

/// A step on the wire: each list as a u64 count and its u32 values, little-endian; a
/// sequence as its three counts and its block table.
pub(super) fn encode_batch(b: &ForwardBatch) -> Vec<u8> {
    // Destructured, so that a new field fails to compile here instead of being dropped.
    let ForwardBatch {
        token_ids,
        positions,
        slot_mapping,
        seqs,
        logits_rows,
    } = b;
    let mut out = Vec::with_capacity(16 * token_ids.len() + 64);
    let u64s = |out: &mut Vec<u8>, v: u64| out.extend_from_slice(&v.to_le_bytes());
    let u32s = |out: &mut Vec<u8>, v: &[u32]| {
        out.extend_from_slice(&(v.len() as u64).to_le_bytes());
        v.iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
    };
    for list in [token_ids, positions, slot_mapping, logits_rows] {
        u32s(&mut out, list);
    }
    u64s(&mut out, seqs.len() as u64);
    for s in seqs {
        let SeqSlice {
            token_offset,
            num_tokens,
            context_len,
            block_table,
        } = s;
        for v in [token_offset, num_tokens, context_len] {
            u64s(&mut out, *v as u64);
        }
        u32s(&mut out, block_table);
    }
    out
}

pub(crate) fn decode_batch(bytes: &[u8]) -> Result<ForwardBatch> {
    let mut r = Reader { bytes, at: 0 };
    let token_ids = r.u32s()?;
    let positions = r.u32s()?;
    let slot_mapping = r.u32s()?;
    let logits_rows = r.u32s()?;
    let n = r.u64()? as usize;
    ensure!(n <= bytes.len(), "a step claims {n} sequences");
    let mut seqs = Vec::with_capacity(n);
    for _ in 0..n {
        seqs.push(SeqSlice {
            token_offset: r.u64()? as usize,
            num_tokens: r.u64()? as usize,
            context_len: r.u64()? as usize,
            block_table: r.u32s()?,
        });
    }
    ensure!(
        r.at == bytes.len(),
        "a step with {} bytes left over",
        bytes.len() - r.at
    );
    Ok(ForwardBatch {
        token_ids,
        positions,
        slot_mapping,
        seqs,
        logits_rows,
    })
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.context("a step frame cut short")?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn u32s(&mut self) -> Result<Vec<u32>> {
        let n = self.u64()? as usize;
        let raw = self.take(n.checked_mul(4).context("a step frame's count overflows")?)?;
        Ok(raw
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_survives_the_wire_and_a_cut_one_is_an_error() {
        let b = ForwardBatch {
            token_ids: vec![5, 6, 7],
            positions: vec![0, 1, 9],
            slot_mapping: vec![40, 41, 3],
            seqs: vec![
                SeqSlice {
                    token_offset: 0,
                    num_tokens: 2,
                    context_len: 2,
                    block_table: vec![10],
                },
                SeqSlice {
                    token_offset: 2,
                    num_tokens: 1,
                    context_len: 10,
                    block_table: vec![0, 3, 2],
                },
            ],
            logits_rows: vec![1, 2],
        };
        let bytes = encode_batch(&b);
        assert_eq!(decode_batch(&bytes).unwrap(), b);
        assert!(decode_batch(&bytes[..bytes.len() - 1]).is_err());
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode_batch(&longer).is_err());
    }

    #[test]
    fn ranks_split_evenly_over_the_nodes() {
        let mn = MultiNode {
            nnodes: 2,
            node_rank: 1,
            master_addr: "::1".into(),
            master_port: 29501,
        };
        assert_eq!(mn.ranks_of(0, 4), 0..2);
        assert_eq!(mn.ranks_of(1, 4), 2..4);
        assert_eq!(mn.rendezvous(), "[::1]:29501");
    }
}
