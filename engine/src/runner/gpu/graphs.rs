//! CUDA graphs of pure decode steps, one per padded batch size.
use anyhow::{anyhow, Result};
use cudarc::driver::{result as drv, sys};

use crate::backend::cuda::device::Gpu;
use crate::backend::{ForwardBatch, SeqSlice};

/// Batch sizes with a captured decode graph (those up to --max-num-seqs, plus it). A step
/// runs the smallest graph that holds its batch, so the steps between sizes pad by < 20 %.
pub const GRAPH_SIZES: &[usize] = &[
    1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 896,
    1024,
];

pub struct Graph {
    exec: sys::CUgraphExec,
}

/// Rank 0's decode step of one size as two graphs: the body with the LM head, then the
/// sampler. Apart so that a step with grammar masks queues its body first and builds the
/// masks while it runs; their upload goes between the two (stream order puts it before the
/// sampler), as vLLM overlaps the bitmask with the forward pass.
pub struct DecodeGraphs {
    pub forward: Graph,
    pub sample: Graph,
}

impl Graph {
    /// Instantiates what the stream captured (the capture must have ended successfully).
    pub fn instantiate(graph: sys::CUgraph, b: usize) -> Result<Self> {
        let exec = unsafe { drv::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0)) }
            .map_err(|e| anyhow!("instantiating the decode graph for batch {b}: {e:?}"));
        unsafe {
            let _ = drv::graph::destroy(graph);
        }
        Ok(Self { exec: exec? })
    }

    pub fn launch(&self, gpu: &Gpu, b: usize) -> Result<()> {
        unsafe { drv::graph::launch(self.exec, gpu.stream) }
            .map_err(|e| anyhow!("launching the decode graph for batch {b}: {e:?}"))
    }
}

impl Drop for Graph {
    fn drop(&mut self) {
        unsafe {
            let _ = drv::graph::exec_destroy(self.exec);
        }
    }
}

/// A decode batch of `b` rows: `batch`'s, then placeholder rows that write no KV (slot -1)
/// with context 1.
pub fn padded(batch: &ForwardBatch, b: usize) -> ForwardBatch {
    let mut p = batch.clone();
    for i in batch.seqs.len()..b {
        p.token_ids.push(0);
        p.positions.push(0);
        p.slot_mapping.push(u32::MAX); // -1 on the device: skip the cache write
        p.seqs.push(SeqSlice {
            token_offset: i,
            num_tokens: 1,
            context_len: 1,
            block_table: vec![0],
        });
    }
    p.logits_rows = (0..b as u32).collect();
    p
}

/// The smallest captured size that holds `n` rows.
pub fn graph_size_for(n: usize, captured: impl Fn(usize) -> bool) -> Option<usize> {
    GRAPH_SIZES.iter().copied().find(|&g| g >= n && captured(g))
}
