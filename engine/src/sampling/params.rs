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
    /// Added to a token's logit before sampling (OpenAI's `logit_bias`): sorted by id,
    /// unique, values in [-100, 100].
    pub logit_bias: Vec<(u32, f32)>,
    /// Only these tokens may be generated (vLLM's `allowed_token_ids`); None: all.
    pub allowed_token_ids: Option<Vec<u32>>,
    /// Words that must not be generated (vLLM's `bad_words`), as given.
    pub bad_words: Vec<String>,
    /// `bad_words` tokenized ([`bad_words_token_ids`] at the edge, where the tokenizer is
    /// known): each a token sequence whose last token is masked after its prefix.
    pub bad_words_token_ids: Vec<Vec<u32>>,
    /// Constrains the output to a grammar (vLLM's `structured_outputs`, the OpenAI
    /// `response_format`, the `guided_*` fields, and tool calls with `tool_choice`
    /// `required` or named); None: unconstrained.
    pub structured_output: Option<StructuredOutput>,
}

/// What a constrained request's output must match (vLLM's `StructuredOutputsParams`,
/// one of its fields).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StructuredOutput {
    /// A JSON document valid against this JSON schema.
    JsonSchema(serde_json::Value),
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// A string fully matching this regular expression.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A context-free grammar (Lark syntax, or GBNF/EBNF as llguidance accepts it).
    Grammar(String),
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
            logit_bias: Vec::new(),
            allowed_token_ids: None,
            bad_words: Vec::new(),
            bad_words_token_ids: Vec::new(),
            structured_output: None,
        }
    }
}

impl SamplingParams {
    pub fn greedy(max_tokens: usize) -> Self {
        Self {
            temperature: 0.0,
            max_tokens: Some(max_tokens),
            ..Self::default()
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature < 1e-5
    }
}

/// Most top log-probabilities one position may ask for (vLLM's default `max_logprobs`).
pub const MAX_LOGPROBS: usize = 20;
/// Most completions one request may ask for; each is a separate sequence in the engine.
pub const MAX_N: usize = 128;

/// Most stop strings one request may give. vLLM sets no limit and OpenAI allows 4; every
/// stop string is searched for in every sequence's text, and a request's `n` sequences each
/// hold back the longest one's length while streaming, so the count and length are bounded
/// generously for real use (a few stop words) and tightly enough that a request cannot buy
/// seconds of CPU or gigabytes of memory with them.
pub const MAX_STOP_STRINGS: usize = 64;
/// Longest stop string, in characters.
pub const MAX_STOP_STRING_CHARS: usize = 1024;
/// Most `stop_token_ids` one request may give: each generated token is checked against
/// them, so like the stop strings they are bounded well above real use (a model's few
/// end-of-turn ids).
pub const MAX_STOP_TOKEN_IDS: usize = 1024;

/// Most `logit_bias` entries one request may give (the GPU sampler holds them per row).
pub const MAX_LOGIT_BIAS: usize = 1024;
/// The range a bias is clamped to (OpenAI's and vLLM's).
pub const LOGIT_BIAS_LIMIT: f32 = 100.0;
/// Most tokens one bad word may take, and most bad-word token sequences a request may
/// have after tokenization (the GPU sampler holds them per row).
pub const MAX_BAD_WORD_TOKENS: usize = 32;
pub const MAX_BAD_WORD_SEQUENCES: usize = 128;
/// Most `allowed_token_ids` one request may give: no more than a vocabulary would need.
pub const MAX_ALLOWED_TOKEN_IDS: usize = 1 << 20;

/// A sampling parameter outside its allowed range: which one, and what to change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamError {
    pub param: &'static str,
    pub message: String,
}

impl std::fmt::Display for ParamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid `{}`: {}", self.param, self.message)
    }
}

impl std::error::Error for ParamError {}

fn bad(param: &'static str, message: String) -> Result<(), ParamError> {
    Err(ParamError { param, message })
}

impl SamplingParams {
    /// Check every parameter against vLLM's ranges. Comparisons are written so that NaN
    /// fails them too.
    pub fn validate(&self) -> Result<(), ParamError> {
        if self.n < 1 || self.n > MAX_N {
            return bad(
                "n",
                format!("n must be between 1 and {MAX_N}, got {}", self.n),
            );
        }
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad(
                "temperature",
                format!(
                    "temperature must be a finite number >= 0 (0 means greedy), got {}",
                    self.temperature
                ),
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(
                "top_p",
                format!(
                    "top_p must be in (0, 1] (1 disables it), got {}",
                    self.top_p
                ),
            );
        }
        if self.top_k < -1 {
            return bad(
                "top_k",
                format!(
                    "top_k must be 0 or -1 (disabled) or at least 1, got {}",
                    self.top_k
                ),
            );
        }
        if !(self.min_p >= 0.0 && self.min_p <= 1.0) {
            return bad(
                "min_p",
                format!(
                    "min_p must be in [0, 1] (0 disables it), got {}",
                    self.min_p
                ),
            );
        }
        if !(self.presence_penalty >= -2.0 && self.presence_penalty <= 2.0) {
            return bad(
                "presence_penalty",
                format!(
                    "presence_penalty must be in [-2, 2] (0 disables it), got {}",
                    self.presence_penalty
                ),
            );
        }
        if !(self.frequency_penalty >= -2.0 && self.frequency_penalty <= 2.0) {
            return bad(
                "frequency_penalty",
                format!(
                    "frequency_penalty must be in [-2, 2] (0 disables it), got {}",
                    self.frequency_penalty
                ),
            );
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad(
                "repetition_penalty",
                format!(
                    "repetition_penalty must be a finite number > 0 (1 disables it), got {}",
                    self.repetition_penalty
                ),
            );
        }
        if let Some(max_tokens) = self.max_tokens {
            if max_tokens < 1 {
                return bad(
                    "max_tokens",
                    format!("max_tokens must be at least 1, got {max_tokens}"),
                );
            }
            if self.min_tokens > max_tokens {
                return bad(
                    "min_tokens",
                    format!(
                        "min_tokens must be less than or equal to max_tokens={max_tokens}, got {}; lower \
                         min_tokens or raise max_tokens",
                        self.min_tokens
                    ),
                );
            }
        }
        if let Some(k) = self.logprobs {
            if k > MAX_LOGPROBS {
                return bad(
                    "logprobs",
                    format!("logprobs must be at most {MAX_LOGPROBS}, got {k}"),
                );
            }
        }
        if let Some(k) = self.prompt_logprobs {
            if k > MAX_LOGPROBS {
                return bad(
                    "prompt_logprobs",
                    format!("prompt_logprobs must be at most {MAX_LOGPROBS}, got {k}"),
                );
            }
        }
        if self.stop_token_ids.len() > MAX_STOP_TOKEN_IDS {
            return bad(
                "stop_token_ids",
                format!(
                    "`stop_token_ids` holds {} ids, more than the limit of {MAX_STOP_TOKEN_IDS} a \
                     request may give",
                    self.stop_token_ids.len()
                ),
            );
        }
        check_stop_strings(&self.stop)?;
        self.check_token_lists()
    }

    /// `logit_bias`, `allowed_token_ids` and the tokenized bad words: the limits the GPU
    /// sampler needs (the vocabulary is checked by [`SamplingParams::check_vocab`]).
    fn check_token_lists(&self) -> Result<(), ParamError> {
        if self.logit_bias.len() > MAX_LOGIT_BIAS {
            return bad(
                "logit_bias",
                format!(
                    "`logit_bias` holds {} entries, more than the limit of {MAX_LOGIT_BIAS} a \
                     request may give",
                    self.logit_bias.len()
                ),
            );
        }
        if let Some((t, b)) = self.logit_bias.iter().find(|(_, b)| !b.is_finite()) {
            return bad(
                "logit_bias",
                format!("the bias of token {t} must be a finite number, got {b}"),
            );
        }
        if let Some(allowed) = &self.allowed_token_ids {
            if allowed.is_empty() {
                return bad(
                    "allowed_token_ids",
                    "`allowed_token_ids` must not be empty; omit it to allow every token".into(),
                );
            }
            if allowed.len() > MAX_ALLOWED_TOKEN_IDS {
                return bad(
                    "allowed_token_ids",
                    format!(
                        "`allowed_token_ids` holds {} ids, more than the limit of \
                         {MAX_ALLOWED_TOKEN_IDS}",
                        allowed.len()
                    ),
                );
            }
        }
        check_bad_word_ids(&self.bad_words_token_ids)
    }

    /// Every token id the request names (`logit_bias`, `allowed_token_ids`, bad words) is
    /// below `vocab_size`. vLLM's wording.
    pub fn check_vocab(&self, vocab_size: usize) -> Result<(), ParamError> {
        let out = |t: u32| t as usize >= vocab_size;
        if let Some((t, _)) = self.logit_bias.iter().find(|(t, _)| out(*t)) {
            return bad(
                "logit_bias",
                format!("token_id {t} in logit_bias contains out-of-vocab token id (vocabulary size {vocab_size})"),
            );
        }
        if let Some(t) = self.allowed_token_ids.iter().flatten().find(|&&t| out(t)) {
            return bad(
                "allowed_token_ids",
                format!("allowed_token_ids contains out-of-vocab token id {t} (vocabulary size {vocab_size})"),
            );
        }
        if let Some(t) = self.bad_words_token_ids.iter().flatten().find(|&&t| out(t)) {
            return bad(
                "bad_words",
                format!(
                    "bad_words contains out-of-vocab token id {t} (vocabulary size {vocab_size})"
                ),
            );
        }
        Ok(())
    }
}

/// The tokenized bad words: at most [`MAX_BAD_WORD_SEQUENCES`] sequences of 1 to
/// [`MAX_BAD_WORD_TOKENS`] tokens.
pub fn check_bad_word_ids(ids: &[Vec<u32>]) -> Result<(), ParamError> {
    if ids.len() > MAX_BAD_WORD_SEQUENCES {
        return bad(
            "bad_words",
            format!(
                "`bad_words` tokenize to {} token sequences, more than the limit of \
                 {MAX_BAD_WORD_SEQUENCES}; give fewer bad words",
                ids.len()
            ),
        );
    }
    for w in ids {
        if w.is_empty() {
            return bad(
                "bad_words",
                "a word of `bad_words` tokenizes to no tokens; remove empty bad words".into(),
            );
        }
        if w.len() > MAX_BAD_WORD_TOKENS {
            return bad(
                "bad_words",
                format!(
                    "a word of `bad_words` tokenizes to {} tokens, more than the limit of \
                     {MAX_BAD_WORD_TOKENS} tokens per bad word; shorten it",
                    w.len()
                ),
            );
        }
    }
    Ok(())
}

/// `logit_bias` as OpenAI sends it (token id as a string key, bias as the value) into
/// [`normalize_logit_bias`]'s form. A key that is not a token id, or a bias that is not
/// finite, is an error naming `logit_bias`.
pub fn parse_logit_bias<'a>(
    entries: impl IntoIterator<Item = (&'a str, f64)>,
) -> Result<Vec<(u32, f32)>, ParamError> {
    let mut out = Vec::new();
    for (key, value) in entries {
        let id: u32 = key.trim().parse().map_err(|_| ParamError {
            param: "logit_bias",
            message: format!("logit_bias keys must be token ids (integers), got {key:?}"),
        })?;
        if !value.is_finite() {
            return Err(ParamError {
                param: "logit_bias",
                message: format!("the bias of token {id} must be a finite number, got {value}"),
            });
        }
        out.push((id, value));
    }
    Ok(normalize_logit_bias(out))
}

/// Sorted unique `(id, bias)` pairs (the last value of a repeated id wins, as a JSON object
/// with a repeated key keeps the last), each bias clamped to [-100, 100].
pub fn normalize_logit_bias(entries: Vec<(u32, f64)>) -> Vec<(u32, f32)> {
    let limit = LOGIT_BIAS_LIMIT as f64;
    let mut out: Vec<(u32, f32)> = entries
        .into_iter()
        .rev()
        .map(|(id, b)| (id, b.clamp(-limit, limit) as f32))
        .collect();
    // A stable sort keeps the last-given value first within an id.
    out.sort_by_key(|e| e.0);
    out.dedup_by_key(|e| e.0);
    out
}

/// vLLM's tokenization of bad words: for each word, the ids of `word.trim_start()` and of
/// `" " + word.trim_start()` (without special tokens); the second is kept only when it has
/// as many tokens as the first and a different first token (a real "word after a space"
/// variant). `encode` returns the ids of a string without special tokens.
pub fn bad_words_token_ids<E>(
    words: &[String],
    mut encode: impl FnMut(&str) -> Result<Vec<u32>, E>,
) -> Result<Vec<Vec<u32>>, E> {
    let mut out = Vec::new();
    for word in words {
        let word = word.trim_start();
        let plain = encode(word)?;
        let spaced = encode(&format!(" {word}"))?;
        let keep_spaced = !plain.is_empty() && spaced.len() == plain.len() && spaced[0] != plain[0];
        out.push(plain);
        if keep_spaced {
            out.push(spaced);
        }
    }
    Ok(out)
}

/// The stop-string limits (MAX_STOP_STRINGS, MAX_STOP_STRING_CHARS) and no empty string.
/// Public so that the server can refuse a request before it spends time on its prompt.
pub fn check_stop_strings(stop: &[String]) -> Result<(), ParamError> {
    if stop.len() > MAX_STOP_STRINGS {
        return bad(
            "stop",
            format!(
                "`stop` holds {} strings, more than the limit of {MAX_STOP_STRINGS} stop strings \
                 a request may give; send at most {MAX_STOP_STRINGS}",
                stop.len()
            ),
        );
    }
    for (i, s) in stop.iter().enumerate() {
        if s.is_empty() {
            return bad(
                "stop",
                "stop strings must not be empty; remove the empty string from `stop`".into(),
            );
        }
        // A string of more bytes than the limit allows characters is over it whatever
        // its characters are: skip counting them.
        if s.len() > MAX_STOP_STRING_CHARS {
            let chars = s.chars().count();
            if chars > MAX_STOP_STRING_CHARS {
                return bad(
                    "stop",
                    format!(
                        "stop string {i} is {chars} characters long, more than the limit of \
                         {MAX_STOP_STRING_CHARS} characters a stop string may have; shorten it"
                    ),
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(p: SamplingParams) -> ParamError {
        p.validate().expect_err("should be rejected")
    }

    #[test]
    fn defaults_and_greedy_are_valid() {
        SamplingParams::default().validate().unwrap();
        SamplingParams::greedy(5).validate().unwrap();
        let full = SamplingParams {
            n: 3,
            temperature: 0.7,
            top_p: 0.9,
            top_k: -1,
            min_p: 1.0,
            seed: Some(1),
            presence_penalty: -2.0,
            frequency_penalty: 2.0,
            repetition_penalty: 1.3,
            max_tokens: None,
            min_tokens: 4,
            logprobs: Some(20),
            prompt_logprobs: Some(0),
            stop: vec!["\n".into()],
            ..Default::default()
        };
        full.validate().unwrap();
    }

    #[test]
    fn out_of_range_values_name_the_parameter() {
        let d = SamplingParams::default;
        let cases: Vec<(SamplingParams, &str)> = vec![
            (SamplingParams { n: 0, ..d() }, "n"),
            (
                SamplingParams {
                    temperature: -0.1,
                    ..d()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    temperature: f32::NAN,
                    ..d()
                },
                "temperature",
            ),
            (SamplingParams { top_p: 0.0, ..d() }, "top_p"),
            (SamplingParams { top_p: 1.01, ..d() }, "top_p"),
            (SamplingParams { top_k: -2, ..d() }, "top_k"),
            (SamplingParams { min_p: 1.5, ..d() }, "min_p"),
            (
                SamplingParams {
                    presence_penalty: 2.5,
                    ..d()
                },
                "presence_penalty",
            ),
            (
                SamplingParams {
                    frequency_penalty: -3.0,
                    ..d()
                },
                "frequency_penalty",
            ),
            (
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..d()
                },
                "repetition_penalty",
            ),
            (
                SamplingParams {
                    max_tokens: Some(0),
                    ..d()
                },
                "max_tokens",
            ),
            (
                SamplingParams {
                    max_tokens: Some(3),
                    min_tokens: 4,
                    ..d()
                },
                "min_tokens",
            ),
            (
                SamplingParams {
                    logprobs: Some(21),
                    ..d()
                },
                "logprobs",
            ),
            (
                SamplingParams {
                    prompt_logprobs: Some(100),
                    ..d()
                },
                "prompt_logprobs",
            ),
            (
                SamplingParams {
                    stop: vec!["".into()],
                    ..d()
                },
                "stop",
            ),
        ];
        for (p, name) in cases {
            let e = err(p);
            assert_eq!(e.param, name);
            assert!(e.to_string().contains(name), "{e}");
        }
        let many = err(SamplingParams {
            stop: vec!["x".into(); MAX_STOP_STRINGS + 1],
            ..d()
        });
        assert_eq!(many.param, "stop");
        assert!(many.message.contains("limit of 64 stop strings"), "{many}");
        let long = err(SamplingParams {
            stop: vec!["é".repeat(MAX_STOP_STRING_CHARS + 1)],
            ..d()
        });
        assert!(long.message.contains("limit of 1024 characters"), "{long}");
        let ids = err(SamplingParams {
            stop_token_ids: vec![1; MAX_STOP_TOKEN_IDS + 1],
            ..d()
        });
        assert_eq!(ids.param, "stop_token_ids");
        assert!(ids.message.contains("limit of 1024"), "{ids}");
        // At the limits exactly: accepted (a 1024-character string of 2-byte characters too).
        SamplingParams {
            stop: vec!["é".repeat(MAX_STOP_STRING_CHARS); MAX_STOP_STRINGS],
            ..d()
        }
        .validate()
        .unwrap();
        let e = err(SamplingParams {
            max_tokens: Some(3),
            min_tokens: 4,
            ..d()
        });
        assert!(
            e.message.contains("max_tokens=3") && e.message.contains("got 4"),
            "{}",
            e.message
        );
    }

    #[test]
    fn token_lists_are_limited_and_checked_against_the_vocabulary() {
        let d = SamplingParams::default;
        let e = err(SamplingParams {
            logit_bias: (0..=MAX_LOGIT_BIAS as u32).map(|t| (t, 1.0)).collect(),
            ..d()
        });
        assert_eq!(e.param, "logit_bias");
        assert!(e.message.contains("limit of 1024"), "{e}");
        let e = err(SamplingParams {
            allowed_token_ids: Some(vec![]),
            ..d()
        });
        assert_eq!(e.param, "allowed_token_ids");
        let e = err(SamplingParams {
            bad_words_token_ids: vec![vec![1; MAX_BAD_WORD_TOKENS + 1]],
            ..d()
        });
        assert!(e.message.contains("limit of 32 tokens"), "{e}");
        let e = err(SamplingParams {
            bad_words_token_ids: vec![vec![1]; MAX_BAD_WORD_SEQUENCES + 1],
            ..d()
        });
        assert!(e.message.contains("limit of 128"), "{e}");
        let ok = SamplingParams {
            logit_bias: vec![(3, 1.0)],
            allowed_token_ids: Some(vec![1, 9]),
            bad_words_token_ids: vec![vec![2, 4]],
            ..d()
        };
        ok.validate().unwrap();
        ok.check_vocab(10).unwrap();
        for (vocab, param) in [(3, "logit_bias"), (5, "allowed_token_ids")] {
            assert_eq!(ok.check_vocab(vocab).unwrap_err().param, param);
        }
        let bad_word = SamplingParams {
            bad_words_token_ids: vec![vec![2, 40]],
            ..d()
        };
        let e = bad_word.check_vocab(10).unwrap_err();
        assert!(e.param == "bad_words" && e.message.contains("40"), "{e}");
    }

    #[test]
    fn logit_bias_parses_clamps_sorts_and_keeps_the_last_repeat() {
        let got = parse_logit_bias([("7", 150.0), ("2", -0.5), ("7", -300.0)]).unwrap();
        assert_eq!(got, vec![(2, -0.5), (7, -100.0)]);
        let e = parse_logit_bias([("x", 1.0)]).unwrap_err();
        assert!(
            e.param == "logit_bias" && e.message.contains("\"x\""),
            "{e}"
        );
        assert!(parse_logit_bias([("-1", 1.0)]).is_err());
        assert!(parse_logit_bias([("1", f64::NAN)]).is_err());
    }

    #[test]
    fn bad_words_tokenize_with_and_without_a_leading_space() {
        // A toy tokenizer: a leading space is its own token 0 unless the word is "hi",
        // which has a distinct "space-hi" token.
        let encode = |s: &str| -> Result<Vec<u32>, ()> {
            Ok(match s {
                "hi" => vec![5],
                " hi" => vec![6],
                "ab" => vec![1, 2],
                " ab" => vec![0, 1, 2],
                other => other.bytes().map(u32::from).collect(),
            })
        };
        let ids = bad_words_token_ids(&["  hi".into(), "ab".into()], encode).unwrap();
        assert_eq!(ids, vec![vec![5], vec![6], vec![1, 2]]);
    }
}
