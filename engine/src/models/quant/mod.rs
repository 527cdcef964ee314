//! FP8: checkpoints quantized to E4M3 (`quantization_config` of config.json), vLLM's online
//! `--quantization fp8`, and `--kv-cache-dtype fp8`.
//!
//! Weights of an FP8 checkpoint are dequantized once, at load, into f32
//! (`code value x scale`, the scale chosen per tensor, per output channel or per block as
//! the file says): every backend then runs the same dequantized weights, so an FP8
//! checkpoint gives exactly the tokens of its dequantized-f32 copy on the CPU (the CUDA
//! backend rounds that copy to its compute type, as for any checkpoint). `--quantization fp8`
//! rounds each layer weight through E4M3 with vLLM's dynamic per-channel scale (row amax / 448)
//! and keeps the rounded values; activations stay unquantized (vLLM's weight-only FP8, the
//! path it takes on GPUs without FP8 tensor cores). Neither saves memory yet: the FP8 GEMMs
//! that would are issue 20's GPU work.
pub mod checkpoint;
pub mod config;
pub mod online;

pub use checkpoint::Fp8Loader;
pub use config::{parse_quantization_config, Fp8Checkpoint, QuantConfig, WeightScaling};
pub use online::{apply_runtime_options, KvCacheDtype};
