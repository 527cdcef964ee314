//! Sampling parameters and the CPU sampler (penalties, temperature, top-k/top-p/min-p,
//! seeded draws, logprobs).
pub mod params;
pub mod sampler;
pub mod structured;

pub use params::{ParamError, SamplingParams, StructuredOutput, MAX_LOGPROBS, MAX_N};
pub use sampler::{argmax, log_sum_exp, top_logprobs, SeqSampler};
