//! Argument structs of kernels whose parameters are another kernel's plus a few: the compact
//! and windowed decode builds and the FP8-cache ones (decode, prefill, rope-and-cache), which
//! take the plain kernel's parameters and a window, soft-cap or the layer's (k, v) scales. One
//! launch site builds the plain struct and these move it into the build it runs, so the paths
//! cannot pass different arguments. Each literal must name every field of its target, so a
//! parameter added to a kernel fails to compile here until it is passed. Also the table of
//! the full decode builds both families share (`full_decode_builds!`).

/// (head dim, query heads a block, kernel) for each full decode build of one family,
/// `paged_attention_decode_<family>_hd<hd>_g<gt>` (and `_f16`): head dims 64, 80, 96, 128 and
/// 256, tiles of 1, 2, 4 and 8 query heads (the windowed and the FP8-cache builds).
macro_rules! full_decode_builds {
    ($args:ty, $family:literal) => {
        full_decode_builds!(@ $args, $family;
            (64, 1), (64, 2), (64, 4), (64, 8),
            (80, 1), (80, 2), (80, 4), (80, 8),
            (96, 1), (96, 2), (96, 4), (96, 8),
            (128, 1), (128, 2), (128, 4), (128, 8),
            (256, 1), (256, 2), (256, 4), (256, 8))
    };
    (@ $args:ty, $family:literal; $(($hd:literal, $gt:literal)),*) => {
        [$((
            $hd,
            $gt,
            kernel!(
                $args,
                "attention_decode",
                concat!("paged_attention_decode_", $family, "_hd", $hd, "_g", $gt),
                concat!("paged_attention_decode_", $family, "_hd", $hd, "_g", $gt, "_f16")
            ),
        )),*]
    };
}

/// `args::$to` from a decode attention argument struct `$a` (the fields of `DecodeAttention`) and
/// the fields the target adds.
macro_rules! decode_args {
    ($a:ident => $to:ident $(, $x:ident: $v:expr)* $(,)?) => {
        args::$to {
            out: $a.out,
            partial_out: $a.partial_out,
            partial_ml: $a.partial_ml,
            semaphores: $a.semaphores,
            q: $a.q,
            k_new: $a.k_new,
            v_new: $a.v_new,
            qkv_stride: $a.qkv_stride,
            key_cache: $a.key_cache,
            value_cache: $a.value_cache,
            block_tables: $a.block_tables,
            context_lens: $a.context_lens,
            positions: $a.positions,
            slot_mapping: $a.slot_mapping,
            inv_freq: $a.inv_freq,
            scale: $a.scale,
            num_heads: $a.num_heads,
            num_kv_heads: $a.num_kv_heads,
            block_size: $a.block_size,
            max_blocks_per_seq: $a.max_blocks_per_seq,
            target_partitions: $a.target_partitions,
            $($x: $v,)*
        }
    };
}

/// `args::$to` from a prefill attention argument struct `$a` (the fields of `PrefillAttention`)
/// and the fields the target adds.
macro_rules! prefill_args {
    ($a:ident => $to:ident $(, $x:ident: $v:expr)* $(,)?) => {
        args::$to {
            out: $a.out,
            q: $a.q,
            key_cache: $a.key_cache,
            value_cache: $a.value_cache,
            cu_seqlens_q: $a.cu_seqlens_q,
            context_lens: $a.context_lens,
            block_tables: $a.block_tables,
            scale: $a.scale,
            num_heads: $a.num_heads,
            num_kv_heads: $a.num_kv_heads,
            block_size: $a.block_size,
            max_blocks_per_seq: $a.max_blocks_per_seq,
            q_stride: $a.q_stride,
            $($x: $v,)*
        }
    };
}

/// `args::$to` from a rope-and-cache argument struct `$a` (the fields of `RopeAndCache`) and the
/// fields the target adds.
macro_rules! rope_args {
    ($a:ident => $to:ident $(, $x:ident: $v:expr)* $(,)?) => {
        args::$to {
            q: $a.q,
            k: $a.k,
            v: $a.v,
            key_cache: $a.key_cache,
            value_cache: $a.value_cache,
            positions: $a.positions,
            slot_mapping: $a.slot_mapping,
            inv_freq: $a.inv_freq,
            num_tokens: $a.num_tokens,
            num_heads: $a.num_heads,
            num_kv_heads: $a.num_kv_heads,
            head_dim: $a.head_dim,
            q_stride: $a.q_stride,
            k_stride: $a.k_stride,
            v_stride: $a.v_stride,
            $($x: $v,)*
        }
    };
}

use anyhow::Result;
use cudarc::driver::sys::CUdeviceptr;

use super::windowed_decode::DECODE_REDUCE_WINDOWED;
use super::{kernels, CudaBackend, CudaKvCache, CudaStepMeta, CudaTensor, CudaVector, ELEM_BYTES};
use crate::backend::AttentionLayout;
use rvllm_kernels::args;

/// What a decode attention launch reads: the step's fused q|k|v rows, their rotation (`rope`:
/// q and the new k are still unrotated and the kernel rotates them and writes k and v to the
/// cache; None: the rotation kernel did both already and the kernel rewrites the same values),
/// the layer's layout, the step's metadata and the cache's layer.
#[derive(Clone, Copy)]
pub(super) struct DecodeInputs<'a> {
    pub qkv: &'a CudaTensor,
    pub rope: Option<&'a CudaVector>,
    pub layout: &'a AttentionLayout,
    pub step: &'a CudaStepMeta,
    pub cache: &'a CudaKvCache,
    pub layer: usize,
}

impl CudaBackend {
    /// The decode attention kernels' shared arguments for the step's leading one-token
    /// sequences (`rope`: as `decode_attention` says), and their grid for `gt` query heads a
    /// block. Null semaphores: the reduce kernel merges split sequences (the full kernel's
    /// last-block merge measured slower and is the kernel tests' benchmark only; the compact
    /// one's is not yet measured).
    pub(super) fn step_decode_args(
        &self,
        d: &DecodeInputs,
        out: &CudaTensor,
        gt: usize,
    ) -> (args::DecodeAttention, (u32, u32, u32)) {
        let DecodeInputs {
            qkv,
            rope,
            layout,
            step,
            cache,
            layer,
        } = *d;
        let q = qkv.buf.ptr;
        let k_new = q + (layout.q_size() * ELEM_BYTES) as u64;
        let v_new = k_new + (layout.kv_size() * ELEM_BYTES) as u64;
        let a = args::DecodeAttention {
            out: out.buf.ptr,
            partial_out: self.partial_out.ptr,
            partial_ml: self.partial_ml.ptr,
            semaphores: 0,
            q,
            k_new,
            v_new,
            qkv_stride: layout.qkv_size() as i32,
            key_cache: cache.k_layer(layer),
            value_cache: cache.v_layer(layer),
            block_tables: step.at(step.layout.block_tables),
            context_lens: step.at(step.layout.context_lens),
            positions: step.at(step.layout.positions),
            slot_mapping: step.at(step.layout.slots),
            inv_freq: rope.map_or(0 as CUdeviceptr, |r| r.f32.ptr),
            scale: layout.scale,
            num_heads: layout.num_heads as i32,
            num_kv_heads: layout.num_kv_heads as i32,
            block_size: cache.shape.block_size as i32,
            max_blocks_per_seq: step.max_blocks_per_seq as i32,
            target_partitions: step.decode_target as i32,
        };
        let group = layout.num_heads / layout.num_kv_heads.max(1);
        let grid = (
            (layout.num_kv_heads * group.div_ceil(gt)) as u32,
            step.num_decode as u32,
            step.decode_partitions as u32,
        );
        (a, grid)
    }

    /// Merges the decode kernels' split partials when the step's grid is deeper than one:
    /// the plain reduce, or the windowed one (`window`, 0: none), whose partitions follow the
    /// window.
    pub(super) fn reduce_decode_partials(
        &self,
        layout: &AttentionLayout,
        step: &CudaStepMeta,
        out: &CudaTensor,
        window: Option<i32>,
    ) -> Result<()> {
        let depth = step.decode_partitions;
        if depth <= 1 {
            return Ok(());
        }
        let a = args::PagedAttentionDecodeReduce {
            out: out.buf.ptr,
            partial_out: self.partial_out.ptr,
            partial_ml: self.partial_ml.ptr,
            context_lens: step.at(step.layout.context_lens),
            num_heads: layout.num_heads as i32,
            head_dim: layout.head_dim as i32,
            max_partitions: depth as i32,
            target_partitions: step.decode_target as i32,
        };
        let grid = (layout.num_heads as u32, step.num_decode as u32, 1);
        let Some(window) = window else {
            return self.launch(kernels::DECODE_REDUCE, grid, 128, a);
        };
        let w = args::PagedAttentionDecodeReduceWindowed {
            out: a.out,
            partial_out: a.partial_out,
            partial_ml: a.partial_ml,
            context_lens: a.context_lens,
            num_heads: a.num_heads,
            head_dim: a.head_dim,
            max_partitions: a.max_partitions,
            target_partitions: a.target_partitions,
            window,
        };
        self.launch(DECODE_REDUCE_WINDOWED, grid, 128, w)
    }

    /// The prefill attention kernels' shared arguments for the step's sequences after the
    /// decodes (chunks of prompts; cu_seqlens holds token offsets into the whole step, so q
    /// stays the step's), and their grid: one launch for all of them.
    pub(super) fn step_prefill_args(
        qkv: &CudaTensor,
        layout: &AttentionLayout,
        step: &CudaStepMeta,
        cache: &CudaKvCache,
        layer: usize,
        out: &CudaTensor,
    ) -> (args::PrefillAttention, (u32, u32, u32)) {
        let d = step.num_decode;
        let a = args::PrefillAttention {
            out: out.buf.ptr,
            q: qkv.buf.ptr,
            key_cache: cache.k_layer(layer),
            value_cache: cache.v_layer(layer),
            cu_seqlens_q: step.at(step.layout.cu_seqlens + d),
            context_lens: step.at(step.layout.context_lens + d),
            block_tables: step.at(step.layout.block_tables + d * step.max_blocks_per_seq),
            scale: layout.scale,
            num_heads: layout.num_heads as i32,
            num_kv_heads: layout.num_kv_heads as i32,
            block_size: cache.shape.block_size as i32,
            max_blocks_per_seq: step.max_blocks_per_seq as i32,
            q_stride: layout.qkv_size() as i32,
        };
        let grid = (
            step.max_chunk.max(1).div_ceil(PREFILL_ROWS_PER_BLOCK) as u32,
            layout.num_heads as u32,
            (step.num_seqs - d) as u32,
        );
        (a, grid)
    }
}

/// Query rows a block of the prefill kernels takes.
const PREFILL_ROWS_PER_BLOCK: usize = 64;
