//! The vLLM-v1-style scheduler: plain bookkeeping, no tensors, no backend, no locks.
pub mod output;
pub use output::*;
