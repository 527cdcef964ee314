//! The TCP communicator: the ranks of a group in separate processes (on one host or several,
//! `--nnodes`), host `[f32]` buffers. A star through rank 0: each collective, every other
//! rank sends its buffer to rank 0, which reads them in rank order, computes the result
//! exactly as the in-process group does (the sum starts from rank 0's buffer and adds ranks
//! 1, 2, ... in order, so a TP = N run over TCP holds the bits of the same run over threads)
//! and sends it back. A socket that closes or stays silent past the timeout is an error
//! naming the rank, never a hang; `abort` shuts every socket of this rank, which releases
//! the others (rank 0 then aborts too, releasing everyone).
//!
//! `wire.rs` holds the framing and the handshake this group's sockets went through.
use std::io::ErrorKind;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};

use super::wire::{read_frame, write_frame, TAG_ERROR};
use super::Communicator;

/// Each collective's frame tag, so that ranks calling different collectives fail by name.
const OP_ALL_REDUCE: u8 = 1;
const OP_ALL_GATHER: u8 = 2;
const OP_BROADCAST: u8 = 3;
const OP_BARRIER: u8 = 4;

fn op_name(op: u8) -> &'static str {
    match op {
        OP_ALL_REDUCE => "all_reduce_sum",
        OP_ALL_GATHER => "all_gather",
        OP_BROADCAST => "broadcast",
        OP_BARRIER => "barrier",
        _ => "an unknown collective",
    }
}

/// One rank of a group whose ranks talk over TCP.
#[derive(Debug)]
pub struct TcpGroup {
    rank: usize,
    world: usize,
    /// Rank 0: rank i's socket at i - 1; any other rank: its one socket to rank 0.
    links: Mutex<Vec<TcpStream>>,
    /// Clones of the sockets, which `abort` shuts without waiting for a collective's lock.
    shut: Vec<TcpStream>,
    aborted: AtomicBool,
}

impl TcpGroup {
    /// Rank 0 of `world` ranks, `peers[i]` connected to rank i + 1. `timeout`: the longest
    /// a collective waits for a peer's bytes.
    pub fn leader(world: usize, peers: Vec<TcpStream>, timeout: Duration) -> Result<Self> {
        ensure!(
            peers.len() + 1 == world,
            "rank 0 of {world} ranks needs {} peer sockets, got {}",
            world - 1,
            peers.len()
        );
        Self::with_links(0, world, peers, timeout)
    }

    /// Rank `rank` (not 0) of `world` ranks, `to_leader` connected to rank 0.
    pub fn member(
        rank: usize,
        world: usize,
        to_leader: TcpStream,
        timeout: Duration,
    ) -> Result<Self> {
        ensure!(
            rank > 0 && rank < world,
            "rank {rank} is not a member rank of {world}"
        );
        Self::with_links(rank, world, vec![to_leader], timeout)
    }

    fn with_links(
        rank: usize,
        world: usize,
        links: Vec<TcpStream>,
        timeout: Duration,
    ) -> Result<Self> {
        let mut shut = Vec::with_capacity(links.len());
        for s in &links {
            s.set_nodelay(true).context("setting TCP_NODELAY")?;
            s.set_read_timeout(Some(timeout))
                .context("setting the socket's read timeout")?;
            s.set_write_timeout(Some(timeout))
                .context("setting the socket's write timeout")?;
            shut.push(s.try_clone().context("cloning a socket")?);
        }
        Ok(Self {
            rank,
            world,
            links: Mutex::new(links),
            shut,
            aborted: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Vec<TcpStream>> {
        self.links.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check_live(&self, what: &str) -> Result<()> {
        if self.aborted.load(Ordering::SeqCst) {
            bail!(
                "{what} on rank {}: the tensor-parallel group was aborted by a failing rank",
                self.rank
            );
        }
        Ok(())
    }

    /// Runs one collective: rank 0 collects every rank's `mine` (its own first), computes
    /// the result with `combine` and sends it to every rank; the others send `mine` and get
    /// the result. Any failure aborts the group, so no rank waits on it.
    fn exchange(
        &self,
        op: u8,
        mine: &[f32],
        combine: impl FnOnce(Vec<Vec<f32>>) -> Result<Vec<f32>>,
    ) -> Result<Vec<f32>> {
        let what = op_name(op);
        self.check_live(what)?;
        let r = if self.rank == 0 {
            self.exchange_as_leader(op, mine, combine)
        } else {
            self.exchange_as_member(op, mine)
        };
        if r.is_err() {
            self.abort();
        }
        r.with_context(|| format!("{what} on rank {} of {}", self.rank, self.world))
    }

    fn exchange_as_leader(
        &self,
        op: u8,
        mine: &[f32],
        combine: impl FnOnce(Vec<Vec<f32>>) -> Result<Vec<f32>>,
    ) -> Result<Vec<f32>> {
        let mut links = self.lock();
        let mut slots = Vec::with_capacity(self.world);
        slots.push(mine.to_vec());
        let mut refused = None;
        for (i, link) in links.iter_mut().enumerate() {
            let (tag, bytes) = read_frame(&mut *link).map_err(|e| peer_error(i + 1, e))?;
            if tag != op {
                refused.get_or_insert(format!(
                    "rank {} called {} while rank 0 called {}",
                    i + 1,
                    op_name(tag),
                    op_name(op)
                ));
            }
            slots.push(from_bytes(&bytes)?);
        }
        let result = match refused {
            Some(msg) => Err(anyhow::anyhow!(msg)),
            None => combine(slots),
        };
        let (tag, payload) = match &result {
            Ok(v) => (op, to_bytes(v)),
            Err(e) => (TAG_ERROR, format!("{e:#}").into_bytes()),
        };
        for (i, link) in links.iter_mut().enumerate() {
            write_frame(&mut *link, tag, &payload).map_err(|e| peer_error(i + 1, e))?;
        }
        result
    }

    fn exchange_as_member(&self, op: u8, mine: &[f32]) -> Result<Vec<f32>> {
        let mut links = self.lock();
        let link = &mut links[0];
        write_frame(&mut *link, op, &to_bytes(mine)).map_err(|e| peer_error(0, e))?;
        let (tag, bytes) = read_frame(&mut *link).map_err(|e| peer_error(0, e))?;
        match tag {
            t if t == op => from_bytes(&bytes),
            TAG_ERROR => bail!("rank 0 failed it: {}", String::from_utf8_lossy(&bytes)),
            other => bail!("rank 0 answered with frame {other}, not {}", op_name(op)),
        }
    }
}

/// What a socket error means for the group, naming the peer.
fn peer_error(peer: usize, e: std::io::Error) -> anyhow::Error {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => anyhow::anyhow!(
            "rank {peer} sent nothing within the timeout (RVLLM_TP_STEP_TIMEOUT_S): it is stuck \
             or its host is unreachable"
        ),
        ErrorKind::UnexpectedEof
        | ErrorKind::ConnectionReset
        | ErrorKind::ConnectionAborted
        | ErrorKind::BrokenPipe
        | ErrorKind::NotConnected => anyhow::anyhow!(
            "rank {peer}'s connection closed: its process died, or it aborted the group"
        ),
        _ => anyhow::Error::new(e).context(format!("talking to rank {peer}")),
    }
}

fn to_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn from_bytes(b: &[u8]) -> Result<Vec<f32>> {
    ensure!(
        b.len().is_multiple_of(4),
        "a frame of {} bytes is not f32 values",
        b.len()
    );
    Ok(b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

fn same_lengths(what: &str, slots: &[Vec<f32>]) -> Result<usize> {
    let n = slots[0].len();
    ensure!(
        slots.iter().all(|s| s.len() == n),
        "{what}: the ranks passed buffers of different lengths ({:?})",
        slots.iter().map(Vec::len).collect::<Vec<_>>()
    );
    Ok(n)
}

fn copy_result(what: &str, dst: &mut [f32], src: &[f32]) -> Result<()> {
    ensure!(
        dst.len() == src.len(),
        "{what}: the result holds {} values, this rank's buffer {}",
        src.len(),
        dst.len()
    );
    dst.copy_from_slice(src);
    Ok(())
}

impl Communicator for TcpGroup {
    type Buf = [f32];
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        let sum = self.exchange(OP_ALL_REDUCE, buf, |slots| {
            same_lengths("all_reduce_sum", &slots)?;
            // The in-process group's order: rank 0's buffer, then + rank 1, + rank 2, ...
            let mut out = slots[0].clone();
            for s in &slots[1..] {
                out.iter_mut().zip(s).for_each(|(b, x)| *b += x);
            }
            Ok(out)
        })?;
        copy_result("all_reduce_sum", buf, &sum)
    }
    fn all_gather(&self, send: &[f32], out: &mut [f32]) -> Result<()> {
        let all = self.exchange(OP_ALL_GATHER, send, |slots| {
            same_lengths("all_gather", &slots)?;
            Ok(slots.concat())
        })?;
        copy_result("all_gather", out, &all)
    }
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        ensure!(root < self.world, "broadcast: root {root} is not a rank");
        let mine: &[f32] = if self.rank == root { buf } else { &[] };
        let got = self.exchange(OP_BROADCAST, mine, |mut slots| {
            Ok(std::mem::take(&mut slots[root]))
        })?;
        copy_result("broadcast", buf, &got)
    }
    fn barrier(&self) -> Result<()> {
        self.exchange(OP_BARRIER, &[], |_| Ok(Vec::new()))
            .map(|_| ())
    }
    fn abort(&self) {
        self.aborted.store(true, Ordering::SeqCst);
        for s in &self.shut {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

#[cfg(test)]
mod tests;
