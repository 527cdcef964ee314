//! rvllm: a vLLM-class LLM inference engine.
//!
//! See ARCHITECTURE.md for what lives where and the invariants the code holds.
pub mod backend;
pub mod bench;
pub mod cli;
pub mod engine;
pub mod gguf_file;
pub mod hash;
pub mod kv;
pub mod models;
pub mod runner;
pub mod sampling;
pub mod scheduler;
pub mod server;
pub mod tokenizer;
pub mod types;

#[cfg(test)]
mod layering_tests;

/// Version string printed by `rvllm --version`: crate version, commit, target.
pub fn version_string() -> String {
    format!(
        "rvllm {} (commit {}, target {}, device backends: {})",
        env!("CARGO_PKG_VERSION"),
        env!("RVLLM_GIT_COMMIT"),
        env!("RVLLM_TARGET_TRIPLE"),
        compiled_devices().join(", ")
    )
}

/// The device backends compiled into this build ("empty" when none).
pub fn compiled_devices() -> Vec<&'static str> {
    let mut v = Vec::new();
    if cfg!(feature = "cpu") {
        v.push("cpu");
    }
    if cfg!(feature = "cuda") {
        v.push("cuda");
    }
    if v.is_empty() {
        v.push("empty");
    }
    v
}
