//! CPU backend: f32 compute, multi-threaded (rayon), GEMM through the `gemm` crate.
