//! rvllm's CUDA kernels. With the `cuda` feature, `build.rs` compiles every `src/*.cu` with
//! nvcc and this crate embeds the resulting fatbins.
