//! The `rvllm` command line: thin wrappers over the engine's front ends.
pub mod generate;
pub mod progress;
pub mod sampling_flags;
pub mod vllm_aliases;
