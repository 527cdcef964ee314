//! CPU backend: f32 compute, multi-threaded (rayon), GEMM through the `gemm` crate.
//! The f32 KV cache and every activation live in plain `Vec<f32>`s.
use std::ops::Range;

use anyhow::{ensure, Context, Result};

use super::parallel::HostCommunicator;
use super::{Activation, AttentionLayout, Backend, ForwardBatch, KvCacheShape};
use crate::types::{HostData, HostTensor};

mod attention;
pub mod fp8;
mod linear;
mod moe;
mod rowwise;
#[cfg(test)]
mod tests;
mod vocab_parallel;

/// The CPU backend. The thread pool is rayon's global one; the settings are the KV
/// cache's element type and, for one rank of a tensor-parallel group, its communicator.
#[derive(Debug, Default, Clone)]
pub struct CpuBackend {
    kv_fp8_scales: Option<Vec<(f32, f32)>>,
    comm: Option<std::sync::Arc<HostCommunicator>>,
}

impl CpuBackend {
    pub fn new() -> Self {
        Self::default()
    }

    /// An FP8 (E4M3) KV cache with these per-layer (k, v) scales (`--kv-cache-dtype fp8`);
    /// None keeps it f32.
    pub fn with_kv_cache_fp8(mut self, scales: Option<Vec<(f32, f32)>>) -> Self {
        self.kv_fp8_scales = scales;
        self
    }

    /// This backend serves one rank of a tensor-parallel group (`all_reduce_sum` goes
    /// through `comm`).
    pub fn with_communicator(mut self, comm: std::sync::Arc<HostCommunicator>) -> Self {
        self.comm = Some(comm);
        self
    }
}

/// A row-major `[rows, cols]` activation with room for `capacity_rows` rows.
#[derive(Debug, Clone)]
pub struct CpuTensor {
    data: Vec<f32>,
    rows: usize,
    cols: usize,
}

impl CpuTensor {
    /// The current rows.
    pub fn as_slice(&self) -> &[f32] {
        &self.data[..self.rows * self.cols]
    }
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        &mut self.data[..self.rows * self.cols]
    }
}

impl Activation for CpuTensor {
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
    fn capacity_rows(&self) -> usize {
        self.data.len().checked_div(self.cols).unwrap_or(0)
    }
    fn set_rows(&mut self, rows: usize) -> Result<()> {
        ensure!(
            rows * self.cols <= self.data.len(),
            "activation buffer holds {} rows of {}, asked for {rows}",
            self.capacity_rows(),
            self.cols
        );
        self.rows = rows;
        Ok(())
    }
}

/// A `[rows, cols]` f32 matrix (linear weight, embedding table, LM head).
#[derive(Debug, Clone)]
pub struct CpuWeight {
    pub data: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
}

/// A 1-D f32 parameter.
#[derive(Debug, Clone)]
pub struct CpuVector {
    pub data: Vec<f32>,
}

/// Per layer, K and V each `[num_blocks, block_size, num_kv_heads, head_dim]`.
#[derive(Debug)]
pub struct CpuKvCache {
    pub shape: KvCacheShape,
    pub k: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
    /// FP8 cache: per layer, the (k, v) scales. Each value is written as
    /// `decode(encode(x / scale)) * scale`, so the f32 arrays hold exactly what an E4M3
    /// cache dequantizes to on read (the reference for the GPU's byte cache; the CPU keeps
    /// 4 bytes an element either way).
    pub fp8_scales: Option<Vec<(f32, f32)>>,
}

/// The step's batch plus, per token, which sequence it belongs to (attention is
/// parallel over (token, head) and needs each token's sequence without a search).
#[derive(Debug)]
pub struct CpuStepMeta {
    pub batch: ForwardBatch,
    pub token_seq: Vec<u32>,
}

fn host_to_f32(t: HostTensor) -> Vec<f32> {
    match t.data {
        HostData::F32(v) => v,
        other => HostTensor {
            shape: t.shape,
            data: other,
        }
        .to_f32(),
    }
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Weight = CpuWeight;
    type Vector = CpuVector;
    type KvCache = CpuKvCache;
    type StepMeta = CpuStepMeta;

    fn device_name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn alloc_activation(&self, capacity_rows: usize, cols: usize) -> Result<CpuTensor> {
        let n = capacity_rows
            .checked_mul(cols)
            .context("activation buffer size overflows")?;
        Ok(CpuTensor {
            data: vec![0.0; n],
            rows: 0,
            cols,
        })
    }

    fn activation_from_host(&self, rows: usize, cols: usize, data: &[f32]) -> Result<CpuTensor> {
        ensure!(
            data.len() == rows * cols,
            "host data has {} elements, expected {rows} x {cols}",
            data.len()
        );
        Ok(CpuTensor {
            data: data.to_vec(),
            rows,
            cols,
        })
    }

    fn to_host(&self, x: &CpuTensor, dst: &mut Vec<f32>) -> Result<()> {
        dst.clear();
        dst.extend_from_slice(x.as_slice());
        Ok(())
    }

    fn upload_weight(&self, name: &str, t: HostTensor) -> Result<CpuWeight> {
        ensure!(
            t.shape.len() == 2,
            "weight `{name}` should be 2-D, has shape {:?}",
            t.shape
        );
        let (rows, cols) = (t.shape[0], t.shape[1]);
        let data = host_to_f32(t);
        ensure!(
            data.len() == rows * cols,
            "weight `{name}` has the wrong number of elements"
        );
        Ok(CpuWeight { data, rows, cols })
    }

    fn upload_vector(&self, name: &str, t: HostTensor) -> Result<CpuVector> {
        ensure!(
            t.shape.len() == 1,
            "vector `{name}` should be 1-D, has shape {:?}",
            t.shape
        );
        Ok(CpuVector {
            data: host_to_f32(t),
        })
    }

    fn alloc_kv_cache(&self, shape: KvCacheShape) -> Result<CpuKvCache> {
        let n = shape.layer_elems();
        // vec![0.0; n] comes from calloc: pages are only touched when first written.
        let k = (0..shape.num_layers).map(|_| vec![0.0f32; n]).collect();
        let v = (0..shape.num_layers).map(|_| vec![0.0f32; n]).collect();
        if let Some(s) = &self.kv_fp8_scales {
            ensure!(
                s.len() == shape.num_layers,
                "{} FP8 KV-cache scales for {} layers",
                s.len(),
                shape.num_layers
            );
        }
        Ok(CpuKvCache {
            shape,
            k,
            v,
            fp8_scales: self.kv_fp8_scales.clone(),
        })
    }

    fn kv_cache_shape(&self, cache: &CpuKvCache) -> KvCacheShape {
        cache.shape
    }

    fn upload_step(&self, batch: &ForwardBatch) -> Result<CpuStepMeta> {
        let mut token_seq = vec![0u32; batch.num_tokens()];
        for (i, s) in batch.seqs.iter().enumerate() {
            let range = s.token_offset..s.token_offset + s.num_tokens;
            ensure!(
                range.end <= token_seq.len(),
                "sequence {i} runs past the batch's tokens"
            );
            token_seq[range].fill(i as u32);
        }
        Ok(CpuStepMeta {
            batch: batch.clone(),
            token_seq,
        })
    }

    fn embedding(&self, table: &CpuWeight, step: &CpuStepMeta, out: &mut CpuTensor) -> Result<()> {
        rowwise::embedding(table, &step.batch.token_ids, out)
    }

    fn linear(
        &self,
        x: &CpuTensor,
        w: &CpuWeight,
        bias: Option<&CpuVector>,
        out: &mut CpuTensor,
    ) -> Result<()> {
        // A rank's columns of a column-parallel product have the whole product's bits.
        linear::linear(x, w, bias, out)
    }

    fn rms_norm(&self, x: &CpuTensor, w: &CpuVector, eps: f32, out: &mut CpuTensor) -> Result<()> {
        rowwise::rms_norm(x, w, eps, out)
    }

    fn add_rms_norm(
        &self,
        residual: &mut CpuTensor,
        x: &CpuTensor,
        w: &CpuVector,
        eps: f32,
        out: &mut CpuTensor,
    ) -> Result<()> {
        rowwise::add_rms_norm(residual, x, w, eps, out)
    }

    fn rope_and_write_kv(
        &self,
        qkv: &mut CpuTensor,
        inv_freq: &CpuVector,
        layout: &AttentionLayout,
        step: &CpuStepMeta,
        cache: &mut CpuKvCache,
        layer: usize,
    ) -> Result<()> {
        attention::rope_and_write_kv(qkv, &inv_freq.data, layout, &step.batch, cache, layer)
    }

    fn attention(
        &self,
        qkv: &CpuTensor,
        layout: &AttentionLayout,
        step: &CpuStepMeta,
        cache: &CpuKvCache,
        layer: usize,
        out: &mut CpuTensor,
    ) -> Result<()> {
        attention::paged_attention(qkv, layout, step, cache, layer, out)
    }

    fn silu_and_mul(&self, gate_up: &CpuTensor, out: &mut CpuTensor) -> Result<()> {
        rowwise::silu_and_mul(gate_up, out)
    }

    fn add_inplace(&self, acc: &mut CpuTensor, x: &CpuTensor) -> Result<()> {
        rowwise::add_inplace(acc, x)
    }
    fn in_tp_group(&self) -> bool {
        self.comm.is_some()
    }

    fn all_reduce_sum(&self, x: &mut CpuTensor) -> Result<()> {
        match &self.comm {
            Some(comm) => comm.all_reduce_sum(x.as_mut_slice()),
            None => anyhow::bail!(
                "all_reduce_sum on a CPU backend that belongs to no tensor-parallel group"
            ),
        }
    }

    const VOCAB_PARALLEL: bool = true;

    fn vocab_parallel_embedding(
        &self,
        table: &CpuWeight,
        step: &CpuStepMeta,
        first_token: usize,
        out: &mut CpuTensor,
    ) -> Result<()> {
        vocab_parallel::embedding(table, &step.batch.token_ids, first_token, out)
    }

    fn all_gather_columns(&self, part: &CpuTensor, out: &mut CpuTensor) -> Result<()> {
        vocab_parallel::all_gather_columns(self.comm.as_deref(), part, out)
    }

    /// Always, in a group or not: the CPU backend has one route, so `--tensor-parallel-size 1`
    /// gives the bits of every other size (its fixed-order one-row products cost no more
    /// than the gemm crate's matrix-vector kernel did; BENCHMARKS.md).
    fn sums_row_parallel_exactly(&self) -> bool {
        true
    }

    fn row_parallel_linear(
        &self,
        x: &CpuTensor,
        w: &CpuWeight,
        part_len: usize,
        accumulate: bool,
        out: &mut CpuTensor,
    ) -> Result<()> {
        linear::row_parallel_linear(x, w, part_len, accumulate, out, self.comm.as_deref())
    }

    fn row_parallel_moe(
        &self,
        x: &CpuTensor,
        router: &CpuWeight,
        gate_up: &CpuWeight,
        down: &CpuWeight,
        layout: &super::MoeLayout,
        part_len: usize,
        scratch: &mut super::MoeScratch<CpuTensor>,
        out: &mut CpuTensor,
    ) -> Result<()> {
        let comm = self.comm.as_deref();
        moe::row_parallel_moe(
            x, router, gate_up, down, layout, part_len, scratch, out, comm,
        )
    }

    fn qk_norm(
        &self,
        qkv: &mut CpuTensor,
        q_weight: &CpuVector,
        k_weight: &CpuVector,
        eps: f32,
        layout: &AttentionLayout,
    ) -> Result<()> {
        ensure!(
            qkv.cols == layout.qkv_size(),
            "qk_norm: qkv has {} cols, layout wants {}",
            qkv.cols,
            layout.qkv_size()
        );
        let hd = layout.head_dim;
        rowwise::head_rms_norm(qkv, 0, layout.num_heads, hd, q_weight, eps)?;
        rowwise::head_rms_norm(qkv, layout.q_size(), layout.num_kv_heads, hd, k_weight, eps)
    }

    fn gelu_tanh_and_mul(&self, gate_up: &CpuTensor, out: &mut CpuTensor) -> Result<()> {
        rowwise::gelu_tanh_and_mul(gate_up, out)
    }

    fn scale(&self, x: &mut CpuTensor, factor: f32) -> Result<()> {
        rowwise::scale(x, factor)
    }

    fn moe(
        &self,
        x: &CpuTensor,
        router: &CpuWeight,
        gate_up: &CpuWeight,
        down: &CpuWeight,
        layout: &super::MoeLayout,
        scratch: &mut super::MoeScratch<CpuTensor>,
        out: &mut CpuTensor,
    ) -> Result<()> {
        moe::moe(x, router, gate_up, down, layout, scratch, out)
    }

    fn gather_rows(
        &self,
        x: &CpuTensor,
        step: &CpuStepMeta,
        range: Range<usize>,
        out: &mut CpuTensor,
    ) -> Result<()> {
        let rows = step
            .batch
            .logits_rows
            .get(range.clone())
            .with_context(|| format!("logits rows {range:?} are out of range"))?;
        rowwise::gather_rows(x, rows, out)
    }
}
