//! The GPU model runner: the model on the `CudaBackend` with its KV cache, the device
//! sampler and its persistent per-request state, and CUDA graphs of decode steps. Every
//! step runs on the device and only token ids (and asked-for logprobs) come back; steps are
//! queued ahead (lookahead scheduling), their placeholders filled on the device.
//!
//! Layout: `slots` (which device slot holds each request's sampling state; host
//! bookkeeping), `sampler` (the device sampler's buffers and launches), `graphs` (decode
//! graph capture), `memory` (profiling pass and KV sizing), `step` (one step: batch,
//! uploads, launches, results).
pub mod slots;

#[cfg(feature = "cuda")]
mod executor;
#[cfg(feature = "cuda")]
mod graphs;
#[cfg(feature = "cuda")]
mod memory;
#[cfg(feature = "cuda")]
mod sampler;
#[cfg(feature = "cuda")]
mod step;
#[cfg(feature = "cuda")]
mod tensor_parallel;

#[cfg(feature = "cuda")]
pub use executor::{create_gpu_executor, GpuOptions, GpuRunner};
