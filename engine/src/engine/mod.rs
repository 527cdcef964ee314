//! The engine: the core step loop (`core`), its offline (`llm`) and async (`async_engine`)
//! front ends, request admission (`request`) and text output (`output`).
pub mod args;
pub mod async_engine;
pub mod core;
mod headless;
pub mod llm;
pub mod output;
pub mod request;

pub use crate::scheduler::FinishReason;
pub use args::{EngineArgs, KvCacheDtypeFlag};
pub use async_engine::{AsyncEngine, EngineStats, RequestStream};
pub use core::{resolve_device, Device, EngineCore};
pub use headless::serve_headless;
pub use llm::{CompletionOutput, Llm, RequestOutput};
pub use output::{CompletionDelta, StopReason};
pub use request::EngineError;
