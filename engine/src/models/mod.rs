//! Model files (HF folders, GGUF, hub ids) and the Llama-family model.
pub mod config;
pub mod weights;
