//! CUDA backend: cudarc driver API, cuBLAS(Lt) GEMMs, rvllm-kernels' fatbin.
