//! The vocabulary-parallel embedding and LM head's collective on the CPU (vLLM's
//! `VocabParallelEmbedding` and the logits' all-gather of `ParallelLMHead`).
use anyhow::{ensure, Context, Result};
use rayon::prelude::*;

use super::{CpuTensor, CpuWeight};
use crate::backend::parallel::HostCommunicator;
use crate::backend::Activation;

/// `out[t] = table[ids[t] - first]` where this shard holds the row, else zeros. Rows past
/// the vocabulary (the last shard's padding) are never looked up: `ForwardBatch::validate`
/// refuses such ids.
pub fn embedding(table: &CpuWeight, ids: &[u32], first: usize, out: &mut CpuTensor) -> Result<()> {
    ensure!(
        out.cols == table.cols,
        "vocabulary-parallel embedding output has {} cols, table {}",
        out.cols,
        table.cols
    );
    out.set_rows(ids.len())?;
    let h = table.cols;
    if h == 0 {
        return Ok(());
    }
    let mine = first..first + table.rows;
    out.as_mut_slice()
        .par_chunks_mut(h)
        .zip(ids.par_iter())
        .for_each(|(row, &id)| {
            let id = id as usize;
            if mine.contains(&id) {
                let r = id - first;
                row.copy_from_slice(&table.data[r * h..(r + 1) * h]);
            } else {
                row.fill(0.0);
            }
        });
    Ok(())
}

/// `out[r]` = every rank's `part[r]`, side by side in rank order.
pub fn all_gather_columns(
    comm: Option<&HostCommunicator>,
    part: &CpuTensor,
    out: &mut CpuTensor,
) -> Result<()> {
    let comm = comm
        .context("all_gather_columns on a CPU backend that belongs to no tensor-parallel group")?;
    let (rows, cols, world) = (part.rows, part.cols, comm.world_size());
    ensure!(
        out.cols == cols * world,
        "all_gather_columns: the output has {} cols, not {world} ranks × {cols}",
        out.cols
    );
    out.set_rows(rows)?;
    let mut all = vec![0.0f32; rows * cols * world];
    comm.all_gather(part.as_slice(), &mut all)?;
    if rows * cols == 0 {
        return Ok(());
    }
    let dst = out.as_mut_slice();
    for (rank, ranks_rows) in all.chunks_exact(rows * cols).enumerate() {
        for (r, src) in ranks_rows.chunks_exact(cols).enumerate() {
            let at = r * cols * world + rank * cols;
            dst[at..at + cols].copy_from_slice(src);
        }
    }
    Ok(())
}
