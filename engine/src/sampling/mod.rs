//! Sampling parameters and the CPU sampler (penalties, temperature, top-k/top-p/min-p,
//! seeded draws, logprobs).
pub mod params;
pub use params::SamplingParams;
