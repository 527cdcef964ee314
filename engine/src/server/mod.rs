//! `rvllm serve`: an OpenAI-compatible HTTP server over the `AsyncEngine`. This module is the
//! only one that knows HTTP, JSON or the OpenAI wire format (ARCHITECTURE.md invariant 4).
//! protocol.rs (wire requests) → validate.rs (internal jobs) → handlers → responses; sse.rs
//! frames streams, metrics.rs renders /metrics, error.rs shapes every failure.
pub mod error;
pub mod metrics;
pub mod protocol;
pub mod sse;
pub mod validate;
