//! Model files (HF folders, GGUF, hub ids) and the Llama-family model.
pub mod config;
pub mod gguf;
pub mod hf_config;
pub mod hf_family;
pub mod hf_weights;
pub mod hub;
pub mod layout;
pub mod llama;
pub mod loader;
pub mod moe;
pub mod quant;
pub mod rope;
pub mod spec;
pub mod weights;

#[cfg(test)]
mod gpu_support_tests;

pub use loader::{load_model, LoadFormat, LoadOptions, LoadedModel};
