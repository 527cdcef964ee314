//! `rvllm bench latency|throughput|serve`, shaped like `vllm bench`.
pub mod offline;
pub mod serve;
