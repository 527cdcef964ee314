//! vLLM's `SamplingParams`, as plain data. Validation lives here so that the CLI and the
//! server reject the same things with the same words.
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Number of independent completions for the prompt.
    pub n: usize,
    /// 0 means greedy.
    pub temperature: f32,
    /// In (0, 1]; 1 disables.
    pub top_p: f32,
    /// 0 or -1 disables (vLLM accepts -1).
    pub top_k: i32,
    /// In [0, 1]; 0 disables.
    pub min_p: f32,
    /// Same seed gives the same output whatever else is in the batch.
    pub seed: Option<u64>,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// 1 disables.
    pub repetition_penalty: f32,
    /// None: up to the model's context.
    pub max_tokens: Option<usize>,
    pub min_tokens: usize,
    /// Stop strings, matched on the detokenized text at the edge (CLI / server).
    pub stop: Vec<String>,
    pub include_stop_str_in_output: bool,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// Number of top log-probabilities to return per generated token (the sampled token's
    /// own logprob is always included when this is Some).
    pub logprobs: Option<usize>,
    /// Number of top log-probabilities per prompt token.
    pub prompt_logprobs: Option<usize>,
    pub skip_special_tokens: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            n: 1,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            max_tokens: Some(16),
            min_tokens: 0,
            stop: Vec::new(),
            include_stop_str_in_output: false,
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            logprobs: None,
            prompt_logprobs: None,
            skip_special_tokens: true,
        }
    }
}

impl SamplingParams {
    pub fn greedy(max_tokens: usize) -> Self {
        Self { temperature: 0.0, max_tokens: Some(max_tokens), ..Self::default() }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature < 1e-5
    }
}
