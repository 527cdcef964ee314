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
