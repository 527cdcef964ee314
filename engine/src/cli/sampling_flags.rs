//! Every SamplingParams field as a command-line flag (vLLM spellings).
use clap::Args;

use crate::sampling::params::normalize_logit_bias;
use crate::sampling::SamplingParams;

#[derive(Args, Clone, Debug)]
pub struct SamplingFlags {
    /// Completions per prompt.
    #[arg(long, default_value_t = 1)]
    pub n: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
    pub top_p: f32,
    /// 0 or -1 disables.
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    pub top_k: i32,
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    pub min_p: f32,
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    pub presence_penalty: f32,
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    pub frequency_penalty: f32,
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
    pub repetition_penalty: f32,
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    #[arg(long, default_value_t = 0)]
    pub min_tokens: usize,
    /// Stop string (repeatable).
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    #[arg(long)]
    pub include_stop_str_in_output: bool,
    /// Stop token id (repeatable).
    #[arg(long = "stop-token-id")]
    pub stop_token_ids: Vec<u32>,
    #[arg(long)]
    pub ignore_eos: bool,
    /// Top log-probabilities per generated token.
    #[arg(long)]
    pub logprobs: Option<usize>,
    /// Top log-probabilities per prompt token.
    #[arg(long)]
    pub prompt_logprobs: Option<usize>,
    /// Keep special tokens in the output text.
    #[arg(long)]
    pub keep_special_tokens: bool,
    /// Bias added to token logits, `ID=BIAS` pairs separated by commas (e.g.
    /// `123=2.5,77=-100`, repeatable); biases are clamped to [-100, 100].
    #[arg(long, value_delimiter = ',', value_parser = parse_bias_pair, allow_hyphen_values = true)]
    pub logit_bias: Vec<(u32, f64)>,
    /// Only these token ids may be generated (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub allowed_token_ids: Option<Vec<u32>>,
    /// A word that must not be generated (repeatable).
    #[arg(long = "bad-words")]
    pub bad_words: Vec<String>,
}

/// One `ID=BIAS` of `--logit-bias`.
fn parse_bias_pair(item: &str) -> Result<(u32, f64), String> {
    let (id, bias) = item
        .split_once('=')
        .ok_or_else(|| format!("`{item}`: expected ID=BIAS, e.g. 123=2.5"))?;
    let id = id
        .trim()
        .parse()
        .map_err(|_| format!("`{item}`: the token id `{id}` is not an integer"))?;
    match bias.trim().parse::<f64>() {
        Ok(b) if b.is_finite() => Ok((id, b)),
        _ => Err(format!(
            "`{item}`: the bias `{bias}` is not a finite number"
        )),
    }
}

impl SamplingFlags {
    /// The sampling parameters; `bad_words_token_ids` stays empty until
    /// [`crate::sampling::params::bad_words_token_ids`] fills it with the model's tokenizer.
    pub fn to_params(&self) -> SamplingParams {
        SamplingParams {
            n: self.n,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            seed: self.seed,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            repetition_penalty: self.repetition_penalty,
            max_tokens: Some(self.max_tokens),
            min_tokens: self.min_tokens,
            stop: self.stop.clone(),
            include_stop_str_in_output: self.include_stop_str_in_output,
            stop_token_ids: self.stop_token_ids.clone(),
            ignore_eos: self.ignore_eos,
            logprobs: self.logprobs,
            prompt_logprobs: self.prompt_logprobs,
            skip_special_tokens: !self.keep_special_tokens,
            logit_bias: normalize_logit_bias(self.logit_bias.clone()),
            allowed_token_ids: self.allowed_token_ids.clone(),
            bad_words: self.bad_words.clone(),
            bad_words_token_ids: Vec::new(),
            structured_output: None,
        }
    }
}
