//! FP8 E4M3 and vLLM's scaled quantization rules: the codec lives in the kernels crate
//! (`rvllm_kernels::reference_fp8`) so that the engine and the FP8 kernels' GPU tests share
//! one; the engine's FP8 paths name it here.
pub use rvllm_kernels::reference_fp8::*;
