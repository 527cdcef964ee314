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

/// Typed kernel arguments: one struct a kernel signature, generated at build time from the
/// `.cu` files (kernels/launch_args.rs; no nvcc needed), fields named and ordered as the C
/// parameters, so that a launch written against a struct cannot pass its arguments in
/// another order, and a changed signature fails to compile at every launch site.
///
/// Naming: a kernel of a `RVLLM_<NAME>(...)` macro gets `<Name>` (`RVLLM_GEMV_BULK` ->
/// `GemvBulk`, `RVLLM_DECODE_ATTENTION` -> `DecodeAttention`); any other its name in CamelCase
/// without `bf16` (`rms_norm_bf16` -> `RmsNorm`, `sample_tokens` -> `SampleTokens`), where a
/// conversion reads it `elem` (`bf16_to_f32` -> `ElemToF32`). Pointers are `u64` device
/// addresses; `int` is `i32`, `int64_t` `i64`, `uint64_t` `u64`, `float` `f32`. Each struct
/// lists its entry points (`ENTRIES`: module and name, and the f16 build's) and C parameter
/// names (`PARAMS`); `KernelArgs::params` gives the pointer array a launch takes.
pub mod args {
    include!(concat!(env!("OUT_DIR"), "/args.rs"));
}

/// One entry point of a kernel module: the bf16 (or only) build's module and name, and the f16
/// build's (`<module>_f16`, its name) for a dtype-dependent kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub module: &'static str,
    pub name: &'static str,
    pub f16: Option<(&'static str, &'static str)>,
}

/// A kernel's argument struct (see `args`).
pub trait KernelArgs {
    /// The entry points that take these arguments.
    const ENTRIES: &'static [Entry];

    /// The kernel parameter array of a launch (`cuLaunchKernel`'s `kernelParams`): one
    /// pointer a field, in the C order, valid while `self` is borrowed.
    fn params(&mut self) -> Params<'_>;

    /// Whether `name` is one of `ENTRIES` (either build).
    fn takes(name: &str) -> bool {
        Self::ENTRIES
            .iter()
            .any(|e| e.name == name || e.f16.is_some_and(|(_, f)| f == name))
    }
}

/// The most parameters a kernel may take (a generated struct with more fails to build).
pub const MAX_PARAMS: usize = 32;

/// Pointers to the fields of an argument struct, in the C parameter order.
pub struct Params<'a> {
    ptrs: [*mut std::ffi::c_void; MAX_PARAMS],
    len: usize,
    _args: std::marker::PhantomData<&'a mut ()>,
}

impl<'a> Params<'a> {
    /// Used by the generated code; each pointer points into the struct borrowed for `'a`.
    #[doc(hidden)]
    pub fn new<const N: usize>(ptrs: &mut [*mut std::ffi::c_void; N]) -> Self {
        const {
            assert!(
                N <= MAX_PARAMS,
                "a kernel takes more than MAX_PARAMS parameters"
            )
        };
        let mut all = [std::ptr::null_mut(); MAX_PARAMS];
        all[..N].copy_from_slice(ptrs);
        Self {
            ptrs: all,
            len: N,
            _args: std::marker::PhantomData,
        }
    }

    /// The array `cuLaunchKernel` takes.
    pub fn as_mut_slice(&mut self) -> &mut [*mut std::ffi::c_void] {
        &mut self.ptrs[..self.len]
    }
}

/// CPU reference implementations of the kernels (f32), shared by the GPU tests and the engine.
pub mod reference;

/// FP8 E4M3 and vLLM's scaled quantization rules (the engine's codec, and the FP8 tests').
pub mod reference_fp8;

/// The GPU sampler's per-request state layouts (`sampling_state.cuh`).
pub mod sampling_state;

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

    /// Tokens of a compact kernel chunk (compact_chunk): 64, and 32 for head dims past 128.
    pub const fn compact_chunk(head_dim: usize) -> usize {
        if head_dim > 128 {
            32
        } else {
            64
        }
    }

    /// The compact kernel (compact_smem_bytes): two buffers of a chunk of K and V rows padded
    /// by 16 bytes, q in f32, the warps' probabilities, the new token's k and v.
    pub const fn compact(head_dim: usize, gt: usize) -> u32 {
        let chunk = compact_chunk(head_dim);
        (4 * chunk * (head_dim * 2 + 16) + gt * head_dim * 4 + 4 * chunk * 4 + 2 * head_dim * 2)
            as u32
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
        /// Hopper's largest shared memory for one block (227 KiB), which the geometries
        /// below assume.
        const BLOCK_SHARED: usize = 227 * 1024;
        /// That less the kernel's static shared memory (at most 2,176 bytes: the add variants
        /// park their residual rows).
        const MAX_SHARED: usize = Self::BLOCK_SHARED - 2304;

        /// Whether a GPU whose blocks may opt in to `optin` bytes of shared memory takes the
        /// geometries below: Hopper and B200 (227 KiB) do; Ampere's smaller chips, Ada and the
        /// RTX Blackwells (99 KiB) run gemv.cu instead.
        pub const fn fits_shared(optin: usize) -> bool {
            optin >= Self::BLOCK_SHARED
        }

        /// Geometry for `stages` pipeline stages (4 or 6, the built depths). None when a row
        /// of `k` bf16 does not fit one stage, k is not a multiple of 8, or the stages and x
        /// do not fit shared memory.
        pub fn for_k(k: usize, stages: usize) -> Option<Self> {
            let row_bytes = 2 * k;
            if k == 0 || !k.is_multiple_of(8) {
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

        /// Geometry of the E4M3 build (`gemv_bulk_fp8_*`) for `stages` pipeline stages (4 or
        /// 6): rows of `k` one-byte codes, the input staged in the compute type. None when k
        /// is not a multiple of 16 (the bulk copies' 16-byte rows) or past 16,384 (kFp8MaxK:
        /// each lane keeps its input fragments in registers).
        pub fn for_fp8_k(k: usize, stages: usize) -> Option<Self> {
            if k == 0 || !k.is_multiple_of(16) || k > 16384 {
                return None;
            }
            let rows_per_stage = [8, 4, 2, 1]
                .into_iter()
                .find(|&r| r * k <= Self::STAGE_BYTES)?;
            let shared = stages * Self::STAGE_BYTES + 2 * k + 8 * (stages + 1);
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

/// The generator's own tests (it is a module of build.rs, whose tests cargo does not run).
#[cfg(test)]
#[allow(dead_code)]
#[path = "../launch_args.rs"]
mod launch_args;

#[cfg(test)]
mod tests {
    use super::*;

    /// The generated structs follow the `.cu` signatures: fields named and ordered as the C
    /// parameters (copied here from norm.cu, activation.cu, attention_decode.cu and
    /// gemv_bulk.cu), and `params` points at the fields in that order.
    #[test]
    fn argument_structs_follow_the_c_parameter_order() {
        assert_eq!(
            args::RmsNorm::PARAMS,
            ["out", "x", "weight", "eps", "num_tokens", "hidden"]
        );
        assert_eq!(args::ElemToF32::PARAMS, ["out", "in", "n"]);
        assert_eq!(
            args::GemvBulk::PARAMS,
            [
                "y",
                "x",
                "w",
                "n",
                "k",
                "rows_per_stage",
                "norm_w",
                "eps",
                "evict_first"
            ]
        );
        assert_eq!(
            args::PagedAttentionDecodeReduce::PARAMS,
            [
                "out",
                "partial_out",
                "partial_ml",
                "context_lens",
                "num_heads",
                "head_dim",
                "max_partitions",
                "target_partitions"
            ]
        );
        assert_eq!(
            args::DecodeAttention::PARAMS,
            args::DecodeAttentionCompact::PARAMS
        );
        assert_eq!(args::DecodeAttention::PARAMS.len(), 21);
        assert_eq!(args::DecodeAttention::PARAMS[3], "semaphores");
        // The small-batch FP8 linear is weight-only: its input in the compute type, no x_scales.
        assert_eq!(
            args::Fp8Gemv::PARAMS,
            [
                "y",
                "x",
                "wq",
                "w_scales",
                "scale_kind",
                "m",
                "n",
                "k",
                "accumulate"
            ]
        );

        let mut a = args::RmsNorm {
            out: 1,
            x: 2,
            weight: 3,
            eps: 1e-5,
            num_tokens: 7,
            hidden: 4096,
        };
        let want: Vec<*mut std::ffi::c_void> = vec![
            &mut a.out as *mut u64 as _,
            &mut a.x as *mut u64 as _,
            &mut a.weight as *mut u64 as _,
            &mut a.eps as *mut f32 as _,
            &mut a.num_tokens as *mut i32 as _,
            &mut a.hidden as *mut i32 as _,
        ];
        let mut p = a.params();
        assert_eq!(p.as_mut_slice(), want.as_slice());
        // The values behind the pointers are the fields' (what cuLaunchKernel reads).
        let got = unsafe { *(p.as_mut_slice()[4] as *const i32) };
        assert_eq!(got, 7);
    }

    /// Each struct lists its entry points in both builds; a macro's instantiations share one.
    #[test]
    fn argument_structs_list_their_entry_points() {
        assert_eq!(
            args::RmsNorm::ENTRIES,
            [Entry {
                module: "norm",
                name: "rms_norm_bf16",
                f16: Some(("norm_f16", "rms_norm_f16")),
            }]
        );
        assert!(args::ElemToF32::takes("f16_to_f32") && args::ElemToF32::takes("bf16_to_f32"));
        assert!(!args::ElemToF32::takes("f32_to_bf16"));
        assert!(args::GemvBulk::takes("gemv_bulk_silu_add_f16_b1"));
        assert!(args::GemvBulk::takes("gemv_bulk_norm_bf16_s6_b1"));
        // Head dims 64, 128 and 256 at groups 1, 2, 4, 8, the full kernel and the compact one.
        assert_eq!(args::DecodeAttention::ENTRIES.len(), 12);
        assert_eq!(args::DecodeAttentionCompact::ENTRIES.len(), 12);
        assert!(args::DecodeAttentionCompact::takes(
            "paged_attention_decode_compact_hd128_g4_f16"
        ));
        assert_eq!(args::PrefillAttention::ENTRIES.len(), 2);
        assert_eq!(args::Gemv::ENTRIES[0].name, "gemv_bf16_b1");
        assert_eq!(
            args::ExpandBlockTables::ENTRIES,
            [Entry {
                module: "block_tables",
                name: "expand_block_tables",
                f16: None,
            }]
        );
        assert_eq!(args::RvllmSmokeAddOne::PARAMS, ["data", "n"]);
    }

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
