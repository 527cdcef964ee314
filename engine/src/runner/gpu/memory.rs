//! Start-up memory: the profiling pass at the largest step and the KV cache sized from what
//! it leaves under `--gpu-memory-utilization`.
use anyhow::{bail, Context, Result};

use crate::backend::cuda::backend::CudaBackend;
use crate::backend::cuda::device::Gpu;
use crate::backend::{ForwardBatch, SeqSlice};
use crate::models::llama::{LlamaModel, Workspace};

/// One forward pass at the largest step (`tokens` tokens in sequences of at most `max_len`),
/// so that the memory left afterwards is what the KV cache can have: activations at their
/// largest, cuBLAS workspace and kernels all counted, and no buffer ever grows later (graphs
/// hold their addresses).
pub fn profile_pass(
    be: &CudaBackend,
    model: &LlamaModel<CudaBackend>,
    kv: &mut <CudaBackend as crate::backend::Backend>::KvCache,
    ws: &mut Workspace<CudaBackend>,
    tokens: usize,
    max_len: usize,
    block_size: usize,
) -> Result<()> {
    let vocab = model.config().vocab_size;
    let mut batch = ForwardBatch::default();
    let mut next_block = 0u32;
    let mut offset = 0;
    while offset < tokens {
        let n = (tokens - offset).min(max_len);
        let blocks: Vec<u32> = (next_block..next_block + n.div_ceil(block_size) as u32).collect();
        for i in 0..n {
            batch.token_ids.push(((offset + i) % vocab) as u32);
            batch.positions.push(i as u32);
            batch
                .slot_mapping
                .push(blocks[i / block_size] * block_size as u32 + (i % block_size) as u32);
        }
        next_block += blocks.len() as u32;
        batch.seqs.push(SeqSlice {
            token_offset: offset,
            num_tokens: n,
            context_len: n,
            block_table: blocks,
        });
        offset += n;
        batch.logits_rows.push(offset as u32 - 1);
    }
    model
        .forward(be, &batch, kv, ws)
        .context("profiling forward pass")?;
    be.gpu.sync()
}

/// KV blocks the profiling pass needs for `tokens` tokens in sequences of at most `max_len`.
pub fn profile_blocks(tokens: usize, max_len: usize, block_size: usize) -> usize {
    let full = tokens / max_len;
    let rest = tokens % max_len;
    full * max_len.div_ceil(block_size) + rest.div_ceil(block_size)
}

/// KV blocks that fit what `utilization` of the GPU leaves after the profiling pass, which
/// held `profile_blocks` blocks of `block_bytes` (freed when the real cache replaces them).
pub fn kv_blocks_for_memory(
    gpu: &Gpu,
    utilization: f32,
    profile_blocks: usize,
    block_bytes: usize,
) -> Result<usize> {
    let (free, total) = gpu.mem_info()?;
    let used = total - free;
    let budget = (utilization as f64 * total as f64) as i64 - used as i64;
    let per_block = block_bytes as i64;
    let blocks = (budget + profile_blocks as i64 * per_block) / per_block;
    if blocks < 1 {
        bail!(
            "no GPU memory is left for the KV cache: weights and activations use {:.1} GiB of {:.1} GiB \
             and --gpu-memory-utilization is {utilization}; raise it, or lower --max-num-batched-tokens / --max-num-seqs",
            used as f64 / (1u64 << 30) as f64,
            total as f64 / (1u64 << 30) as f64,
        );
    }
    Ok(blocks as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_blocks_cover_full_and_partial_sequences() {
        assert_eq!(profile_blocks(8192, 4096, 16), 512);
        assert_eq!(profile_blocks(100, 64, 16), 4 + 3);
        assert_eq!(profile_blocks(16, 4096, 16), 1);
    }
}
