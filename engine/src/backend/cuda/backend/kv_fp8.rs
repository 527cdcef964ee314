//! The FP8 (E4M3) KV cache (`--kv-cache-dtype fp8`, issue 20): one byte an element, the
//! saturated E4M3 code of x / scale with per-layer (k, v) scales (the checkpoint's `k_scale` /
//! `v_scale`, else 1.0, as vLLM does), so a block holds half the bytes of the compute type's
//! and the same memory holds twice the tokens. The cache write (`rope_and_cache_kvfp8*`) and
//! both attention kernels (`paged_attention_decode_kvfp8_hd*`, `paged_attention_prefill_kvfp8_hd*`:
//! the windowed builds over an FP8 cache, window and soft-cap 0 where the layer has none) read
//! and write the codes; everything else computes in the compute type as before. Every layer of
//! such a cache runs these kernels: the decode one at every batch size (there is no compact FP8
//! build), its split partials merged by the windowed reduce. Needs compute capability 8.9 or
//! newer (the conversions are single instructions there), as vLLM's FP8 paths do.
use anyhow::{anyhow, bail, ensure, Context, Result};
use cudarc::driver::sys::CUdeviceptr;

use super::windowed_decode::{softcap_arg, window_arg, DECODE_REDUCE_WINDOWED};
use super::{CudaBackend, CudaKvCache, CudaStepMeta, CudaTensor, CudaVector, ELEM_BYTES};
use crate::backend::cuda::elem::{kernel, Kernel, NamedKernel};
use crate::backend::AttentionLayout;
use rvllm_kernels::{args, decode_smem};

/// (head dim, query heads a block, the kernel) for each FP8-cache decode build.
macro_rules! decode_kv_fp8 {
    ($(($hd:literal, $gt:literal)),*) => {
        [$((
            $hd,
            $gt,
            kernel!(
                args::DecodeAttentionKvFp8,
                "attention_decode",
                concat!("paged_attention_decode_kvfp8_hd", $hd, "_g", $gt),
                concat!("paged_attention_decode_kvfp8_hd", $hd, "_g", $gt, "_f16")
            ),
        )),*]
    };
}

#[allow(clippy::type_complexity)]
const DECODE_KV_FP8: [(usize, usize, Kernel<args::DecodeAttentionKvFp8>); 20] = decode_kv_fp8!(
    (64, 1),
    (64, 2),
    (64, 4),
    (64, 8),
    (80, 1),
    (80, 2),
    (80, 4),
    (80, 8),
    (96, 1),
    (96, 2),
    (96, 4),
    (96, 8),
    (128, 1),
    (128, 2),
    (128, 4),
    (128, 8),
    (256, 1),
    (256, 2),
    (256, 4),
    (256, 8)
);

macro_rules! prefill_kv_fp8 {
    ($($hd:literal),*) => {
        [$((
            $hd,
            kernel!(
                args::PrefillAttentionKvFp8,
                "attention_prefill",
                concat!("paged_attention_prefill_kvfp8_hd", $hd),
                concat!("paged_attention_prefill_kvfp8_hd", $hd, "_f16")
            ),
        )),*]
    };
}

const PREFILL_KV_FP8: [(usize, Kernel<args::PrefillAttentionKvFp8>); 5] =
    prefill_kv_fp8!(64, 80, 96, 128, 256);

const ROPE_AND_CACHE_KV_FP8: Kernel<args::RopeAndCacheKvfp8> = kernel!(
    args::RopeAndCacheKvfp8,
    "rope_cache",
    "rope_and_cache_kvfp8_bf16",
    "rope_and_cache_kvfp8_f16"
);

const ROPE_PARTIAL_AND_CACHE_KV_FP8: Kernel<args::RopePartialAndCacheKvfp8> = kernel!(
    args::RopePartialAndCacheKvfp8,
    "rope_cache",
    "rope_partial_and_cache_kvfp8_bf16",
    "rope_partial_and_cache_kvfp8_f16"
);

/// Query rows a block of the prefill kernel takes.
const ROWS_PER_BLOCK: usize = 64;

/// Every entry point above (for `kernels::all`).
pub fn kernels() -> Vec<NamedKernel> {
    let mut k: Vec<NamedKernel> = DECODE_KV_FP8.iter().map(|d| d.2.named()).collect();
    k.extend(PREFILL_KV_FP8.iter().map(|p| p.1.named()));
    k.push(ROPE_AND_CACHE_KV_FP8.named());
    k.push(ROPE_PARTIAL_AND_CACHE_KV_FP8.named());
    k
}

/// The FP8-cache decode kernel for a head size and GQA group, and its query heads a block
/// (groups of 3 take the 4-head tile, 5 and more the 8-head one, as the other builds).
fn decode_kernel(
    head_dim: usize,
    group: usize,
) -> Option<(Kernel<args::DecodeAttentionKvFp8>, usize)> {
    let gt = match group {
        0 | 1 => 1,
        2 => 2,
        3 | 4 => 4,
        _ => 8,
    };
    DECODE_KV_FP8
        .iter()
        .find(|&&(hd, g, _)| hd == head_dim && g == gt)
        .map(|&(_, _, kernel)| (kernel, gt))
}

/// Refuses FP8 KV scales the kernels cannot use.
fn check_scales(scales: &[(f32, f32)]) -> Result<()> {
    if let Some((layer, s)) = scales
        .iter()
        .enumerate()
        .find(|(_, &(k, v))| !(k > 0.0 && k.is_finite() && v > 0.0 && v.is_finite()))
    {
        bail!(
            "--kv-cache-dtype fp8: layer {layer}'s (k, v) scales {s:?} must be positive and finite"
        );
    }
    Ok(())
}

impl CudaBackend {
    /// `--kv-cache-dtype fp8`: caches allocated from now on hold E4M3 codes with these
    /// per-layer (k, v) scales (None: the compute type, as before). Refused below compute
    /// capability 8.9, as `--quantization fp8` is, and with tensor parallelism
    /// (`tensor_parallel` > 1), whose other ranks' backends do not take it yet.
    pub fn enable_kv_cache_fp8(
        &self,
        scales: Option<Vec<(f32, f32)>>,
        tensor_parallel: usize,
    ) -> Result<()> {
        let Some(scales) = scales else {
            return Ok(());
        };
        if tensor_parallel > 1 {
            bail!(
                "--kv-cache-dtype fp8 with --tensor-parallel-size {tensor_parallel}: the FP8 KV \
                 cache runs on one GPU only so far; pass --kv-cache-dtype auto"
            );
        }
        let (major, minor) = self.gpu.compute_capability;
        if (major, minor) < (8, 9) {
            bail!(
                "--kv-cache-dtype fp8 needs compute capability 8.9 or newer (Ada, Hopper, \
                 Blackwell: E4M3 conversions in hardware); {} is sm_{major}{minor}. Pass \
                 --kv-cache-dtype auto",
                self.gpu.name
            );
        }
        check_scales(&scales)?;
        self.kv_cache_fp8
            .set(scales)
            .map_err(|_| anyhow!("the FP8 KV cache was enabled twice"))
    }

    /// Bytes of one KV cache element: 1 with the FP8 cache, else the compute type's.
    pub fn kv_cache_elem_bytes(&self) -> usize {
        if self.kv_cache_fp8.get().is_some() {
            1
        } else {
            ELEM_BYTES
        }
    }

    /// The per-layer scales a new cache takes (None: the compute type).
    pub(super) fn kv_cache_fp8_scales(&self) -> Option<Vec<(f32, f32)>> {
        self.kv_cache_fp8.get().cloned()
    }

    /// `rope_and_write_kv` over an FP8 cache (`layout` from `gpu_layout`).
    pub(super) fn kv_fp8_rope_and_write_kv(
        &self,
        qkv: &mut CudaTensor,
        inv_freq: &CudaVector,
        layout: &AttentionLayout,
        step: &CudaStepMeta,
        cache: &mut CudaKvCache,
        layer: usize,
    ) -> Result<()> {
        self.kv_fp8_rope_tokens(qkv, inv_freq, layout, step, cache, layer, 0)
    }

    /// `attention` over an FP8 cache: q, k and v already rotated and in the cache.
    pub(super) fn kv_fp8_attention(
        &self,
        qkv: &CudaTensor,
        layout: &AttentionLayout,
        step: &CudaStepMeta,
        cache: &CudaKvCache,
        layer: usize,
        out: &mut CudaTensor,
    ) -> Result<()> {
        self.kv_fp8_decode_attention(qkv, None, layout, step, cache, layer, out)?;
        self.kv_fp8_prefill_attention(qkv, layout, step, cache, layer, out)
    }

    /// `rope_attention` over an FP8 cache: the prefill tokens through the rotation kernel,
    /// the decodes rotated and written inside decode attention (every token through the
    /// rotation kernel with partial rotary, which decode attention does not do).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn kv_fp8_rope_attention(
        &self,
        qkv: &mut CudaTensor,
        inv_freq: &CudaVector,
        layout: &AttentionLayout,
        step: &CudaStepMeta,
        cache: &mut CudaKvCache,
        layer: usize,
        out: &mut CudaTensor,
    ) -> Result<()> {
        if layout.rotary_dim != layout.head_dim {
            self.kv_fp8_rope_tokens(qkv, inv_freq, layout, step, cache, layer, 0)?;
            return self.kv_fp8_attention(qkv, layout, step, cache, layer, out);
        }
        self.kv_fp8_rope_tokens(qkv, inv_freq, layout, step, cache, layer, step.num_decode)?;
        self.kv_fp8_decode_attention(qkv, Some(inv_freq), layout, step, cache, layer, out)?;
        self.kv_fp8_prefill_attention(qkv, layout, step, cache, layer, out)
    }

    /// Layer `layer`'s (k, v) scales.
    fn kv_fp8_layer_scales(cache: &CudaKvCache, layer: usize) -> Result<(f32, f32)> {
        let scales = cache
            .fp8_scales
            .as_ref()
            .context("an FP8 attention kernel on a cache of the compute type")?;
        scales.get(layer).copied().with_context(|| {
            format!(
                "layer {layer}: the FP8 KV cache has scales for {} layers",
                scales.len()
            )
        })
    }

    /// RoPE of q and k (in place) of the step's tokens from `first` on, and their k and v
    /// written to the FP8 cache.
    #[allow(clippy::too_many_arguments)]
    fn kv_fp8_rope_tokens(
        &self,
        qkv: &mut CudaTensor,
        inv_freq: &CudaVector,
        layout: &AttentionLayout,
        step: &CudaStepMeta,
        cache: &mut CudaKvCache,
        layer: usize,
        first: usize,
    ) -> Result<()> {
        let t = step.num_tokens.saturating_sub(first) as i32;
        if t == 0 {
            return Ok(());
        }
        let (k_scale, v_scale) = Self::kv_fp8_layer_scales(cache, layer)?;
        let q = qkv.buf.ptr + (first * layout.qkv_size() * ELEM_BYTES) as u64;
        let k = q + (layout.q_size() * ELEM_BYTES) as u64;
        let v = k + (layout.kv_size() * ELEM_BYTES) as u64;
        let stride = layout.qkv_size() as i32;
        let grid = (t as u32, 1, 1);
        let a = args::RopeAndCacheKvfp8 {
            q,
            k,
            v,
            key_cache: cache.k_layer(layer),
            value_cache: cache.v_layer(layer),
            positions: step.at(step.layout.positions + first),
            slot_mapping: step.at(step.layout.slots + first),
            inv_freq: inv_freq.f32.ptr,
            num_tokens: t,
            num_heads: layout.num_heads as i32,
            num_kv_heads: layout.num_kv_heads as i32,
            head_dim: layout.head_dim as i32,
            q_stride: stride,
            k_stride: stride,
            v_stride: stride,
            k_scale,
            v_scale,
        };
        if layout.rotary_dim != layout.head_dim {
            ensure!(
                inv_freq.len * 2 == layout.rotary_dim,
                "partial rotary: {} inverse frequencies for rotary_dim {}",
                inv_freq.len,
                layout.rotary_dim
            );
            let p = args::RopePartialAndCacheKvfp8 {
                q: a.q,
                k: a.k,
                v: a.v,
                key_cache: a.key_cache,
                value_cache: a.value_cache,
                positions: a.positions,
                slot_mapping: a.slot_mapping,
                inv_freq: a.inv_freq,
                num_tokens: a.num_tokens,
                num_heads: a.num_heads,
                num_kv_heads: a.num_kv_heads,
                head_dim: a.head_dim,
                q_stride: a.q_stride,
                k_stride: a.k_stride,
                v_stride: a.v_stride,
                rotary_dim: layout.rotary_dim as i32,
                attention_factor: layout.rope_scale,
                k_scale,
                v_scale,
            };
            return self.launch(ROPE_PARTIAL_AND_CACHE_KV_FP8, grid, 256, p);
        }
        // `gpu_layout` moved a whole-head rotation's attention factor into the softmax scale.
        ensure!(
            layout.rope_scale == 1.0,
            "rope_and_cache takes no attention factor ({}); the layout must come from gpu_layout",
            layout.rope_scale
        );
        self.launch(ROPE_AND_CACHE_KV_FP8, grid, 256, a)
    }

    /// Decode attention over the FP8 cache for the step's leading one-token sequences.
    /// `rope`: their q and new k are still unrotated and the kernel rotates them and writes
    /// k and v to the cache; None: the rotation kernel did both already (the kernel rewrites
    /// the same codes).
    #[allow(clippy::too_many_arguments)]
    fn kv_fp8_decode_attention(
        &self,
        qkv: &CudaTensor,
        rope: Option<&CudaVector>,
        layout: &AttentionLayout,
        step: &CudaStepMeta,
        cache: &CudaKvCache,
        layer: usize,
        out: &mut CudaTensor,
    ) -> Result<()> {
        if step.num_decode == 0 {
            return Ok(());
        }
        let hd = layout.head_dim;
        let group = layout.num_heads / layout.num_kv_heads.max(1);
        let (kernel, gt) = decode_kernel(hd, group).with_context(|| {
            format!(
                "no FP8-KV decode attention kernel for head_dim {hd} (built: 64, 80, 96, 128, 256)"
            )
        })?;
        let (k_scale, v_scale) = Self::kv_fp8_layer_scales(cache, layer)?;
        let window = window_arg(layout);
        let softcap = softcap_arg(layout)?;
        let q = qkv.buf.ptr;
        let k_new = q + (layout.q_size() * ELEM_BYTES) as u64;
        let v_new = k_new + (layout.kv_size() * ELEM_BYTES) as u64;
        let (nh, depth) = (layout.num_heads as i32, step.decode_partitions);
        let target = step.decode_target as i32;
        let context_lens = step.at(step.layout.context_lens);
        let (partial_out, partial_ml) = (self.partial_out.ptr, self.partial_ml.ptr);
        let a = args::DecodeAttentionKvFp8 {
            out: out.buf.ptr,
            partial_out,
            partial_ml,
            // Null: the reduce kernel merges split sequences, as on the other paths.
            semaphores: 0,
            q,
            k_new,
            v_new,
            qkv_stride: layout.qkv_size() as i32,
            key_cache: cache.k_layer(layer),
            value_cache: cache.v_layer(layer),
            block_tables: step.at(step.layout.block_tables),
            context_lens,
            positions: step.at(step.layout.positions),
            slot_mapping: step.at(step.layout.slots),
            inv_freq: rope.map_or(0 as CUdeviceptr, |r| r.f32.ptr),
            scale: layout.scale,
            num_heads: nh,
            num_kv_heads: layout.num_kv_heads as i32,
            block_size: cache.shape.block_size as i32,
            max_blocks_per_seq: step.max_blocks_per_seq as i32,
            target_partitions: target,
            window,
            softcap,
            k_scale,
            v_scale,
        };
        let grid = (
            (layout.num_kv_heads * group.div_ceil(gt)) as u32,
            step.num_decode as u32,
            depth as u32,
        );
        self.launch_smem(kernel, grid, 128, decode_smem::full(gt), a)?;
        if depth > 1 {
            let reduce = args::PagedAttentionDecodeReduceWindowed {
                out: out.buf.ptr,
                partial_out,
                partial_ml,
                context_lens,
                num_heads: nh,
                head_dim: hd as i32,
                max_partitions: depth as i32,
                target_partitions: target,
                window,
            };
            let grid = (layout.num_heads as u32, step.num_decode as u32, 1);
            self.launch(DECODE_REDUCE_WINDOWED, grid, 128, reduce)?;
        }
        Ok(())
    }

    /// Prefill attention over the FP8 cache for the step's sequences after the decodes
    /// (chunks of prompts), one launch for all of them.
    fn kv_fp8_prefill_attention(
        &self,
        qkv: &CudaTensor,
        layout: &AttentionLayout,
        step: &CudaStepMeta,
        cache: &CudaKvCache,
        layer: usize,
        out: &mut CudaTensor,
    ) -> Result<()> {
        let num_prefill = step.num_seqs - step.num_decode;
        if num_prefill == 0 {
            return Ok(());
        }
        let hd = layout.head_dim;
        let &(_, kernel) = PREFILL_KV_FP8
            .iter()
            .find(|p| p.0 == hd)
            .with_context(|| {
                format!("no FP8-KV prefill attention kernel for head_dim {hd} (built: 64, 80, 96, 128, 256)")
            })?;
        let (k_scale, v_scale) = Self::kv_fp8_layer_scales(cache, layer)?;
        // The prefill sequences' rows of the step metadata (cu_seqlens holds token offsets
        // into the whole step, so q stays the step's).
        let d = step.num_decode;
        let a = args::PrefillAttentionKvFp8 {
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
            window: window_arg(layout),
            softcap: softcap_arg(layout)?,
            k_scale,
            v_scale,
        };
        let grid = (
            step.max_chunk.max(1).div_ceil(ROWS_PER_BLOCK) as u32,
            layout.num_heads as u32,
            num_prefill as u32,
        );
        self.launch(kernel, grid, 128, a)
    }
}

#[cfg(test)]
mod tests {
    use super::{check_scales, decode_kernel, kernels, PREFILL_KV_FP8};
    use crate::backend::cuda::elem::GpuDtype;

    #[test]
    fn every_head_size_and_group_has_an_fp8_cache_build() {
        for hd in [64, 80, 96, 128, 256] {
            for (group, gt) in [(1, 1), (2, 2), (3, 4), (4, 4), (5, 8), (8, 8), (16, 8)] {
                let (kernel, tile) = decode_kernel(hd, group).unwrap();
                assert_eq!(tile, gt, "group {group}");
                assert_eq!(
                    kernel.of(GpuDtype::F16),
                    (
                        "attention_decode_f16",
                        format!("paged_attention_decode_kvfp8_hd{hd}_g{gt}_f16").as_str()
                    )
                );
            }
            assert!(PREFILL_KV_FP8.iter().any(|p| p.0 == hd), "prefill hd {hd}");
        }
        assert!(decode_kernel(112, 1).is_none());
        assert_eq!(kernels().len(), 20 + 5 + 2);
    }

    #[test]
    fn scales_must_be_positive_and_finite() {
        assert!(check_scales(&[(1.0, 1.0), (0.02, 3.5)]).is_ok());
        for bad in [
            (0.0, 1.0),
            (1.0, -1.0),
            (f32::NAN, 1.0),
            (1.0, f32::INFINITY),
        ] {
            let err = check_scales(&[(1.0, 1.0), bad]).unwrap_err().to_string();
            assert!(err.contains("layer 1"), "{err}");
        }
    }
}
