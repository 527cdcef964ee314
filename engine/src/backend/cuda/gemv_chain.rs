//! Hand-offs between consecutive batch-1 GEMVs through counters instead of grid completion.
//!
//! At batch 1 a layer ends in three GEMVs in a row (O projection, gate/up, down, then the
//! next layer's QKV). With programmatic dependent launch each one's blocks wait for the
//! previous grid to complete, which an H200's block timeline showed releasing them ~2 us
//! after the previous kernel's last block ended. Here every bulk GEMV of a forward pass gets
//! a counter its blocks increment once their rows are written (gemv_bulk.cu's `signal`); a
//! GEMV queued directly after another waits for that counter to reach the other's block
//! count (`wait_on`, `wait_count`) instead of waiting on the grid.
//!
//! Invariants:
//! - A launch waits on a counter only when nothing else was queued on the stream since the
//!   GEMV that signals it (`Gpu::queued`), so every other producer is still waited for by
//!   grid completion.
//! - Every counter is zero when a forward pass begins: `begin` queues a memset of all of
//!   them (inside a CUDA graph, a memset node), and a pass uses each counter once.
//! - A GEMV that does not launch (`RVLLM_SKIP_KERNELS`) breaks the chain.

use std::sync::Mutex;

use anyhow::Result;
use cudarc::driver::sys::CUdeviceptr;

use super::device::{DevBuf, Gpu};

/// Counters a forward pass may use; GEMVs past them wait on grid completion (a 126-layer
/// model has ~500 bulk GEMVs a pass).
const SLOTS: usize = 1024;

pub struct GemvChain {
    counters: DevBuf,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The next unused counter of this pass.
    next: usize,
    /// The last GEMV that signalled: the stream's queue count after it, its counter, its
    /// block count.
    last: Option<(u64, usize, u32)>,
}

/// A launch's place in the chain: the counter it signals and the one it waits on, as
/// gemv_bulk's `signal`, `wait_on`, `wait_count` arguments (0: none).
#[derive(Debug, Clone, Copy, Default)]
pub struct Link {
    pub signal: CUdeviceptr,
    pub wait_on: CUdeviceptr,
    pub wait_count: i32,
    slot: Option<usize>,
}

impl GemvChain {
    /// None when `RVLLM_GEMV_CHAIN=0` (every GEMV waits on grid completion) or without
    /// programmatic launch (then each kernel starts after the previous one anyway).
    pub fn from_env(gpu: &Gpu) -> Result<Option<Self>> {
        let wanted = std::env::var("RVLLM_GEMV_CHAIN").map_or(true, |v| v.trim() != "0");
        if !wanted || !gpu.pdl {
            return Ok(None);
        }
        let counters = gpu.alloc(SLOTS * 4)?;
        gpu.memset_zero(counters.ptr, SLOTS * 4)?;
        Ok(Some(Self {
            counters,
            state: Mutex::new(State::default()),
        }))
    }

    /// Starts a forward pass: every counter back to zero, no GEMV to follow yet.
    pub fn begin(&self, gpu: &Gpu) -> Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        *st = State::default();
        gpu.memset_zero(self.counters.ptr, SLOTS * 4)
    }

    /// The link for a GEMV `kernel` about to be launched.
    pub fn link(&self, gpu: &Gpu, kernel: &str) -> Link {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if gpu.skips(kernel) {
            st.last = None;
            return Link::default();
        }
        let mut link = Link::default();
        if let Some((queued, slot, blocks)) = st.last {
            if queued == gpu.queued() {
                link.wait_on = self.counter(slot);
                link.wait_count = blocks as i32;
            }
        }
        if st.next < SLOTS {
            link.slot = Some(st.next);
            link.signal = self.counter(st.next);
            st.next += 1;
        }
        link
    }

    /// Records that the GEMV of `link` was queued with `blocks` blocks.
    pub fn launched(&self, gpu: &Gpu, link: Link, blocks: u32) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.last = link.slot.map(|slot| (gpu.queued(), slot, blocks));
    }

    fn counter(&self, slot: usize) -> CUdeviceptr {
        self.counters.ptr + (slot * 4) as u64
    }
}
