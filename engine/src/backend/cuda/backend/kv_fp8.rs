//! The FP8 (E4M3) KV cache (`--kv-cache-dtype fp8`, issue 20): one byte an element, the
//! saturated E4M3 code of x / scale with per-layer (k, v) scales (the checkpoint's `k_scale` /
//! `v_scale`, else 1.0, as vLLM does), so a block holds half the bytes of the compute type's
//! and the same memory holds twice the tokens. The cache write (`rope_and_cache_kvfp8*`) and
//! both attention kernels (`paged_attention_decode_kvfp8_hd*`, `paged_attention_prefill_kvfp8_hd*`:
//! the windowed builds over an FP8 cache, window and soft-cap 0 where the layer has none) read
//! and write the codes; everything else computes in the compute type as before. Every layer of
//! such a cache attends through the windowed path (windowed_attention.rs, windowed_decode.rs),
//! whose launches take these builds and the layer's scales from `KvElems`: the decode one at
//! every batch size (there is no compact FP8 build), its split partials merged by the windowed
//! reduce. Needs compute capability 8.9 or newer (the conversions are single instructions
//! there), as vLLM's FP8 paths do.
use anyhow::{anyhow, bail, Context, Result};

use super::{CudaBackend, CudaKvCache, ELEM_BYTES};
use crate::backend::cuda::elem::{kernel, Kernel, NamedKernel};
use rvllm_kernels::args;

/// (head dim, query heads a block, the kernel) for each FP8-cache decode build.
#[allow(clippy::type_complexity)]
const DECODE_KV_FP8: [(usize, usize, Kernel<args::DecodeAttentionKvFp8>); 20] =
    full_decode_builds!(args::DecodeAttentionKvFp8, "kvfp8");

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

pub(super) const ROPE_AND_CACHE_KV_FP8: Kernel<args::RopeAndCacheKvfp8> = kernel!(
    args::RopeAndCacheKvfp8,
    "rope_cache",
    "rope_and_cache_kvfp8_bf16",
    "rope_and_cache_kvfp8_f16"
);

pub(super) const ROPE_PARTIAL_AND_CACHE_KV_FP8: Kernel<args::RopePartialAndCacheKvfp8> = kernel!(
    args::RopePartialAndCacheKvfp8,
    "rope_cache",
    "rope_partial_and_cache_kvfp8_bf16",
    "rope_partial_and_cache_kvfp8_f16"
);

/// Every entry point above (for `kernels::all`).
pub fn kernels() -> Vec<NamedKernel> {
    let mut k: Vec<NamedKernel> = DECODE_KV_FP8.iter().map(|d| d.2.named()).collect();
    k.extend(PREFILL_KV_FP8.iter().map(|p| p.1.named()));
    k.push(ROPE_AND_CACHE_KV_FP8.named());
    k.push(ROPE_PARTIAL_AND_CACHE_KV_FP8.named());
    k
}

/// The FP8-cache decode kernel for a head size and query heads a block (`tile_heads`: the
/// same tiles as the other builds).
pub(super) fn decode_kernel(
    head_dim: usize,
    gt: usize,
) -> Option<Kernel<args::DecodeAttentionKvFp8>> {
    DECODE_KV_FP8
        .iter()
        .find(|&&(hd, g, _)| hd == head_dim && g == gt)
        .map(|&(_, _, kernel)| kernel)
}

/// The FP8-cache prefill kernel for a head size.
pub(super) fn prefill_kernel(head_dim: usize) -> Option<Kernel<args::PrefillAttentionKvFp8>> {
    PREFILL_KV_FP8.iter().find(|p| p.0 == head_dim).map(|p| p.1)
}

/// How a layer's cache holds its elements, which picks the attention and cache-write builds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum KvElems {
    /// The compute type (bf16 or f16).
    Compute,
    /// E4M3 codes of x / scale, with the layer's scales.
    Fp8 { k_scale: f32, v_scale: f32 },
}

impl CudaKvCache {
    /// Layer `layer`'s element kind (and FP8 scales).
    pub(super) fn layer_elems(&self, layer: usize) -> Result<KvElems> {
        let Some(scales) = &self.fp8_scales else {
            return Ok(KvElems::Compute);
        };
        let &(k_scale, v_scale) = scales.get(layer).with_context(|| {
            format!(
                "layer {layer}: the FP8 KV cache has scales for {} layers",
                scales.len()
            )
        })?;
        Ok(KvElems::Fp8 { k_scale, v_scale })
    }
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
}

#[cfg(test)]
mod tests {
    use super::{check_scales, decode_kernel, kernels, prefill_kernel};
    use crate::backend::cuda::elem::GpuDtype;

    #[test]
    fn every_head_size_and_group_has_an_fp8_cache_build() {
        for hd in [64, 80, 96, 128, 256] {
            for gt in [1, 2, 4, 8] {
                let kernel = decode_kernel(hd, gt).unwrap();
                assert_eq!(
                    kernel.of(GpuDtype::F16),
                    (
                        "attention_decode_f16",
                        format!("paged_attention_decode_kvfp8_hd{hd}_g{gt}_f16").as_str()
                    )
                );
            }
            assert_eq!(
                prefill_kernel(hd).unwrap().of(GpuDtype::Bf16).1,
                format!("paged_attention_prefill_kvfp8_hd{hd}")
            );
        }
        assert!(decode_kernel(112, 1).is_none());
        assert!(decode_kernel(128, 3).is_none());
        assert!(prefill_kernel(112).is_none());
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
