//! rvllm's CUDA kernels. With the `cuda` feature, `build.rs` compiles every `src/*.cu` with
//! nvcc into a fatbin (SASS for each target architecture, plus PTX when the driver can load
//! it) and this crate embeds them. Without the feature nothing is compiled: `KERNEL_NAMES` is
//! empty and `fatbin` answers `None`.

/// Keeps an embedded fatbin 16-byte aligned: the driver reads it in place
/// (`cuModuleLoadData`) and `include_bytes!` alone only guarantees byte alignment.
#[repr(C, align(16))]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // no kernels, no instances
struct Aligned<T: ?Sized>(T);

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// CPU reference implementations of the kernels (f32), shared by the GPU tests and the engine.
pub mod reference;

/// The fatbin of kernel module `name` (the `.cu` file's stem), if this build has it.
pub fn fatbin(name: &str) -> Option<&'static [u8]> {
    lookup(name)
}

/// The architectures the embedded fatbins target, e.g. `sm_80 sm_90a +PTX compute_90a`.
pub fn built_archs() -> &'static str {
    BUILT_ARCHS
}

/// Dynamic shared memory of the decode attention kernels as attention_decode.cu lays it out;
/// the engine's launches and the GPU tests size them here.
pub mod decode_smem {
    /// The longest partition of the full kernel, in tokens (kMaxPartition).
    pub const MAX_PARTITION: usize = 512;

    /// The full kernel with `gt` query heads a block (decode_smem_bytes): a 3-stage K/V ring
    /// of 12 KiB, the scores of a partition per head, its slots.
    pub const fn full(gt: usize) -> u32 {
        (3 * 12288 + gt * MAX_PARTITION * 4 + MAX_PARTITION * 4) as u32
    }

    /// The compact kernel (compact_smem_bytes): two buffers of 64 K and V rows padded by 16
    /// bytes, q in f32, the warps' probabilities, the new token's k and v.
    pub const fn compact(head_dim: usize, gt: usize) -> u32 {
        (4 * 64 * (head_dim * 2 + 16) + gt * head_dim * 4 + 4 * 64 * 4 + 2 * head_dim * 2) as u32
    }
}

/// Launch geometry of the bulk-copy batch-1 GEMV (gemv_bulk.cu); the engine's launches and
/// the GPU tests take it from here.
pub mod gemv_bulk {
    /// Whole rows per pipeline stage and the dynamic shared memory of the stages, x and the
    /// barriers.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct GemvBulk {
        pub rows_per_stage: usize,
        pub shared_bytes: u32,
    }

    impl GemvBulk {
        /// Stage size: kStageBytes.
        const STAGE_BYTES: usize = 32 * 1024;
        /// Hopper's largest shared memory for one block (227 KiB), less the kernel's static
        /// shared memory (at most 2,176 bytes: the add variants park their residual rows).
        const MAX_SHARED: usize = 227 * 1024 - 2304;

        /// Geometry for `stages` pipeline stages (4 or 6, the built depths). None when a row
        /// of `k` bf16 does not fit one stage, k is not a multiple of 8, or the stages and x
        /// do not fit shared memory.
        pub fn for_k(k: usize, stages: usize) -> Option<Self> {
            let row_bytes = 2 * k;
            if k == 0 || k % 8 != 0 {
                return None;
            }
            let rows_per_stage = [8, 4, 2, 1]
                .into_iter()
                .find(|&r| r * row_bytes <= Self::STAGE_BYTES)?;
            // A barrier a stage, and one for the norm weights.
            let shared = stages * Self::STAGE_BYTES + row_bytes + 8 * (stages + 1);
            (shared <= Self::MAX_SHARED).then_some(Self {
                rows_per_stage,
                shared_bytes: shared as u32,
            })
        }
    }
}

/// Whether this build embeds compiled kernels (feature `cuda`).
pub const fn compiled_with_cuda() -> bool {
    cfg!(feature = "cuda")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn without_cuda_nothing_is_embedded() {
        assert!(KERNEL_NAMES.is_empty());
        assert_eq!(fatbin("smoke"), None);
        assert!(built_archs().contains("without the `cuda` feature"));
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn every_kernel_is_an_aligned_fatbin() {
        assert!(KERNEL_NAMES.contains(&"smoke"), "{KERNEL_NAMES:?}");
        for name in KERNEL_NAMES {
            let bin = fatbin(name).unwrap_or_else(|| panic!("{name} listed but not embedded"));
            assert_eq!(&bin[..4], &[0x50, 0xed, 0x55, 0xba], "{name}: not a fatbin");
            assert_eq!(bin.as_ptr() as usize % 16, 0, "{name}: misaligned");
        }
        assert_eq!(fatbin("no_such_kernel"), None);
        assert!(built_archs().starts_with("sm_"), "{}", built_archs());
    }
}
