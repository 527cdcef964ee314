//! `rvllm bench latency|throughput|serve`, shaped like `vllm bench`, and `serve-merge`.
pub mod dataset;
pub mod offline;
pub mod schema_check;
pub mod serve;
pub mod serve_merge;
pub mod structured;
