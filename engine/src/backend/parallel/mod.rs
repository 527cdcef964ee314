//! Tensor parallelism's collectives (issue 22): the `Communicator` every rank of a group
//! calls, and how a decoder's weights are split over the ranks (`TpShard`).
//!
//! Megatron-style, as vLLM: QKV and gate/up are column-parallel (each rank holds its heads
//! and its slice of the MLP), O and down are row-parallel (each rank multiplies its slice
//! and the partial sums are all-reduced). The communicator is per rank, like a process
//! group: `local.rs` holds the in-process one (ranks as threads, for the CPU backend and
//! tests), `tcp.rs` one whose ranks are processes on one host or several (`--nnodes`,
//! meeting through `wire.rs`'s rendezvous); an NCCL one (cudarc) fits behind the same trait
//! with device buffers as `Buf`.
use std::fmt::Debug;

use anyhow::{ensure, Result};

mod local;
mod shard;
mod tcp;
mod wide;
pub mod wire;

pub use local::LocalGroup;
pub use shard::{TpShard, VOCAB_PADDING};
pub use tcp::TcpGroup;
pub use wide::all_reduce_sum_f64;

/// One rank's view of a group of `world_size` ranks. Every rank must call the same
/// collectives in the same order with buffers of the same length; a collective returns
/// once every rank has made it (or with an error once any rank has aborted the group, so a
/// failing rank never leaves the others waiting).
pub trait Communicator: Send + Sync + Debug {
    /// The buffer the collectives work on: `[f32]` in host memory here; a device slice for
    /// a GPU implementation.
    type Buf: ?Sized;
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Every rank's `buf` becomes the element-wise sum over the ranks, added in rank order
    /// (0, 1, 2, ...), so that every rank holds the same bits and a run reproduces itself.
    fn all_reduce_sum(&self, buf: &mut Self::Buf) -> Result<()>;
    /// `out` (world_size × `send`'s length) becomes every rank's `send`, in rank order.
    fn all_gather(&self, send: &Self::Buf, out: &mut Self::Buf) -> Result<()>;
    /// Every rank's `buf` becomes `root`'s.
    fn broadcast(&self, buf: &mut Self::Buf, root: usize) -> Result<()>;
    fn barrier(&self) -> Result<()>;
    /// Fails every collective in progress or to come on every rank (a rank that errors calls
    /// it before it returns, so its peers stop waiting for it).
    fn abort(&self);
}

/// The host communicator a CPU rank holds.
pub type HostCommunicator = dyn Communicator<Buf = [f32]>;

/// Checks that a decoder of these dimensions splits over `tp` ranks: attention heads and
/// the MLP (and each expert's MLP) evenly; KV heads evenly, or, when there are fewer KV
/// heads than ranks, each KV head replicated over a whole number of ranks (vLLM's rule).
pub fn check_divisible(
    tp: usize,
    num_heads: usize,
    num_kv_heads: usize,
    intermediate: usize,
    expert_intermediate: Option<usize>,
) -> Result<()> {
    ensure!(tp >= 1, "--tensor-parallel-size must be at least 1");
    ensure!(
        num_heads.is_multiple_of(tp),
        "--tensor-parallel-size {tp} must divide num_attention_heads ({num_heads})"
    );
    ensure!(
        num_kv_heads.is_multiple_of(tp) || tp.is_multiple_of(num_kv_heads),
        "--tensor-parallel-size {tp} must divide num_key_value_heads ({num_kv_heads}) or be a \
         multiple of it (KV heads are then replicated)"
    );
    ensure!(
        intermediate.is_multiple_of(tp),
        "--tensor-parallel-size {tp} must divide intermediate_size ({intermediate})"
    );
    if let Some(i) = expert_intermediate {
        ensure!(
            i.is_multiple_of(tp),
            "--tensor-parallel-size {tp} must divide the experts' intermediate size ({i})"
        );
    }
    Ok(())
}

/// How many equal parts the inner dimension of a row-parallel projection (O, the MLP's
/// down) is summed in where a backend sums them exactly
/// (`Backend::sums_row_parallel_exactly`): the greatest common divisor of the query heads and
/// the MLP widths. Every size that
/// `check_divisible` accepts divides it, so each rank's slice is a whole number of parts,
/// the same parts at every size.
pub fn row_parallel_parts(
    num_heads: usize,
    intermediate: usize,
    expert_intermediate: Option<usize>,
) -> usize {
    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    let g = gcd(num_heads, intermediate);
    expert_intermediate.map_or(g, |e| gcd(g, e)).max(1)
}
