//! CUDA backend: cudarc driver API (dynamically loaded), cuBLAS GEMMs, rvllm-kernels' fatbin.
pub mod backend;
pub mod block_trace;
pub mod ceilings;
pub mod device;
pub mod elem;
pub mod kernels;
pub mod moe;
pub mod nccl;
pub mod profiler;
pub mod switches;

pub use ceilings::measure_ceilings;
pub use device::{device_count, memory_and_name, Gpu};
