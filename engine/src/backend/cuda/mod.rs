//! CUDA backend: cudarc driver API (dynamically loaded), cuBLAS GEMMs, rvllm-kernels' fatbin.
pub mod ceilings;
pub mod device;

pub use ceilings::measure_ceilings;
pub use device::{device_count, Gpu};
