//! The GPU's element type (bf16 or f16) where it meets the host: which build of a kernel to
//! launch, cuBLAS's name of the type, and the conversions of uploads and downloads. Both types
//! are 2 bytes, so buffers, strides and launch geometry never depend on it.
use cudarc::cublas::sys::cudaDataType;
use half::{bf16, f16};
use rayon::prelude::*;
use rvllm_kernels::{Entry, KernelArgs};
use std::marker::PhantomData;

pub use crate::backend::dtype::GpuDtype;
use crate::types::HostData;

/// Bytes of one element in either type.
pub const ELEM_BYTES: usize = 2;

/// An rvllm-kernels entry point in both element types: the bf16 build lives in module
/// `<stem>`, the f16 build (the same source compiled with RVLLM_F16) in `<stem>_f16`, each
/// under its own name (kernels/src/common.cuh). `A` is its argument struct
/// (`rvllm_kernels::args`), so a launch can only pass the arguments that kernel declares.
/// Make one with `kernel!`.
pub struct Kernel<A> {
    modules: [&'static str; 2],
    names: [&'static str; 2],
    args: PhantomData<fn(A)>,
}

impl<A> Clone for Kernel<A> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<A> Copy for Kernel<A> {}

impl<A> std::fmt::Debug for Kernel<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Kernel({}.{})", self.modules[0], self.names[0])
    }
}

impl<A> Kernel<A> {
    pub const fn new(
        module_bf16: &'static str,
        module_f16: &'static str,
        bf16: &'static str,
        f16: &'static str,
    ) -> Self {
        Self {
            modules: [module_bf16, module_f16],
            names: [bf16, f16],
            args: PhantomData,
        }
    }

    /// (module, entry point) of the build for `dtype`.
    pub fn of(self, dtype: GpuDtype) -> (&'static str, &'static str) {
        let i = match dtype {
            GpuDtype::Bf16 => 0,
            GpuDtype::F16 => 1,
        };
        (self.modules[i], self.names[i])
    }
}

impl<A: KernelArgs> Kernel<A> {
    /// The same entry point without its argument type, with the entry points `A` declares
    /// (for the tables that list kernels of every signature).
    pub fn named(self) -> NamedKernel {
        NamedKernel {
            of: [self.of(GpuDtype::Bf16), self.of(GpuDtype::F16)],
            declared: A::ENTRIES,
        }
    }
}

/// A `Kernel` of any signature: its (module, name) in each build, and the entry points its
/// argument struct was generated from (the `.cu` signatures).
#[derive(Debug, Clone, Copy)]
pub struct NamedKernel {
    pub of: [(&'static str, &'static str); 2],
    pub declared: &'static [Entry],
}

impl NamedKernel {
    /// (module, entry point) of the build for `dtype`.
    pub fn of(self, dtype: GpuDtype) -> (&'static str, &'static str) {
        match dtype {
            GpuDtype::Bf16 => self.of[0],
            GpuDtype::F16 => self.of[1],
        }
    }
}

/// `kernel!(args::RmsNorm, "norm", "rms_norm_bf16", "rms_norm_f16")`: the entry point of
/// `norm.cu` in both builds, launched with `args::RmsNorm`.
macro_rules! kernel {
    ($args:ty, $stem:literal, $bf16:expr, $f16:expr) => {
        $crate::backend::cuda::elem::Kernel::<$args>::new(
            $stem,
            concat!($stem, "_f16"),
            $bf16,
            $f16,
        )
    };
}
pub(crate) use kernel;

/// cuBLAS's name of the type.
pub fn blas_type(dtype: GpuDtype) -> cudaDataType {
    match dtype {
        GpuDtype::Bf16 => cudaDataType::CUDA_R_16BF,
        GpuDtype::F16 => cudaDataType::CUDA_R_16F,
    }
}

/// `x` rounded to the type (nearest, ties to even), as its 16 bits.
pub fn bits_of(x: f32, dtype: GpuDtype) -> u16 {
    match dtype {
        GpuDtype::Bf16 => bf16::from_f32(x).to_bits(),
        GpuDtype::F16 => f16::from_f32(x).to_bits(),
    }
}

/// The value of 16 bits of the type.
pub fn value_of(bits: u16, dtype: GpuDtype) -> f32 {
    match dtype {
        GpuDtype::Bf16 => bf16::from_bits(bits).to_f32(),
        GpuDtype::F16 => f16::from_bits(bits).to_f32(),
    }
}

/// Host data as the type's bits, converted on every core (an 8B model is 8 billion
/// conversions). Data already in the type needs none: `CudaBackend` uploads it as it is.
pub fn host_bits(data: &HostData, dtype: GpuDtype) -> Vec<u16> {
    match data {
        HostData::F32(v) => v.par_iter().map(|&x| bits_of(x, dtype)).collect(),
        HostData::F16(v) => v.par_iter().map(|x| bits_of(x.to_f32(), dtype)).collect(),
        HostData::BF16(v) => v.par_iter().map(|x| bits_of(x.to_f32(), dtype)).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_name_the_build_of_each_type() {
        let k = kernel!(
            rvllm_kernels::args::RmsNorm,
            "norm",
            "rms_norm_bf16",
            "rms_norm_f16"
        );
        assert_eq!(k.of(GpuDtype::Bf16), ("norm", "rms_norm_bf16"));
        assert_eq!(k.of(GpuDtype::F16), ("norm_f16", "rms_norm_f16"));
    }

    #[test]
    fn host_data_converts_to_either_type_with_one_rounding() {
        let x = [1.0f32, -2.5, 1.0e-3, 70000.0, 2.71];
        for d in [GpuDtype::Bf16, GpuDtype::F16] {
            let from_f32 = host_bits(&HostData::F32(x.to_vec()), d);
            let want: Vec<u16> = x.iter().map(|&v| bits_of(v, d)).collect();
            assert_eq!(from_f32, want, "{d:?}");
            let as_bf16 = x.iter().map(|&v| bf16::from_f32(v)).collect();
            let from_bf16 = host_bits(&HostData::BF16(as_bf16), d);
            assert_eq!(value_of(from_bf16[1], d), -2.5);
        }
        // f16 has no 70000: it rounds to infinity, as torch's .half() does.
        assert!(value_of(bits_of(70000.0, GpuDtype::F16), GpuDtype::F16).is_infinite());
        // f16 keeps 3 more mantissa bits than bf16.
        assert_eq!(
            value_of(bits_of(0.1, GpuDtype::F16), GpuDtype::F16),
            0.099975586
        );
        assert_eq!(
            value_of(bits_of(0.1, GpuDtype::Bf16), GpuDtype::Bf16),
            0.100097656
        );
        let same = host_bits(&HostData::F16(vec![f16::from_f32(0.1)]), GpuDtype::F16);
        assert_eq!(same, vec![f16::from_f32(0.1).to_bits()]);
    }
}
