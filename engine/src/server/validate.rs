//! Validation at the edge: wire requests (`protocol.rs`) become internal requests holding a
//! checked `SamplingParams`, or an `ApiError` that names the field and says what to change.
//! Range checks that the engine also makes (SamplingParams::validate, the context length)
//! are left to it so that CLI and server use the same words; this file checks what only the
//! wire format can get wrong (types, signs, OpenAI's own limits, unsupported features).
use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::protocol::{
    ChatCompletionRequest, ChatMessageIn, CompletionRequest, MessageContent, PromptField,
    StopField, StreamOptions,
};
use crate::sampling::SamplingParams;

#[path = "structured_fields.rs"]
mod structured_fields;
pub use structured_fields::{structured_output, StructuredFields};

/// OpenAI's (and vLLM's default `--max-logprobs`) ceiling on top log-probabilities per
/// token; the engine returns no more. `rvllm serve --max-logprobs` may lower it.
pub const MAX_LOGPROBS: i64 = 20;
/// OpenAI's ceiling on `n`.
pub const MAX_N: i64 = 128;

/// A prompt before tokenization.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    Text(String),
    Tokens(Vec<u32>),
}

/// Output shaping shared by both endpoints.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StreamMode {
    pub stream: bool,
    pub include_usage: bool,
    pub continuous_usage: bool,
}

#[derive(Debug, Clone)]
pub struct CompletionJob {
    pub prompts: Vec<PromptInput>,
    pub params: SamplingParams,
    pub stream: StreamMode,
    pub echo: bool,
    pub add_special_tokens: bool,
    pub tokens_as_ids: bool,
    /// Put generated token ids in each choice (vLLM's `return_token_ids`).
    pub return_token_ids: bool,
    /// vLLM's `request_id`: the response's id is built from it (else a random one).
    pub request_id: Option<String>,
}

/// A chat message with its content flattened to text, and what else the turn carries for
/// the chat template (`name`, `tool_calls` with their arguments as mappings, `tool_call_id`,
/// `reasoning_content` / `reasoning`), as vLLM hands them to templates.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatTurn {
    pub role: String,
    pub content: String,
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl ChatTurn {
    /// The message as the template sees it: role, content, then the rest.
    pub fn to_template_json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        m.insert("role".into(), self.role.clone().into());
        m.insert("content".into(), self.content.clone().into());
        for (k, v) in &self.extra {
            m.insert(k.clone(), v.clone());
        }
        serde_json::Value::Object(m)
    }
}

#[derive(Debug, Clone)]
pub struct ChatJob {
    pub messages: Vec<ChatTurn>,
    pub params: SamplingParams,
    pub stream: StreamMode,
    /// Chat logprobs: Some(top_logprobs) when `logprobs: true`.
    pub logprobs: Option<usize>,
    pub echo: bool,
    pub add_generation_prompt: bool,
    pub continue_final_message: bool,
    pub add_special_tokens: bool,
    pub chat_template: Option<String>,
    /// Variables for the chat template beside the messages: `documents`,
    /// `reasoning_effort` and `chat_template_kwargs`, merged in that order (vLLM's).
    pub template_kwargs: serde_json::Map<String, serde_json::Value>,
    pub tokens_as_ids: bool,
    /// Put generated token ids in each choice (vLLM's `return_token_ids`).
    pub return_token_ids: bool,
    /// vLLM's `request_id`: the response's id is built from it (else a random one).
    pub request_id: Option<String>,
    /// `tools`, `tool_choice` and `parallel_tool_calls` (None: neither tools nor a choice).
    pub tools: Option<super::tools::request::ToolRequest>,
}

/// Parse a JSON body: invalid UTF-8, malformed JSON, wrong types and unknown fields each
/// get a 400 naming the place at fault.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if let Err(e) = std::str::from_utf8(body) {
        return Err(ApiError::bad_request(
            format!(
                "The request body is not valid UTF-8 (bad byte at offset {}); send JSON encoded as UTF-8",
                e.valid_up_to()
            ),
            "invalid_encoding",
        ));
    }
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(ApiError::bad_request(
            "The request body is empty; send a JSON object (Content-Type: application/json)",
            "invalid_json",
        ));
    }
    // serde would read a struct from a JSON array too; OpenAI bodies are objects.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::bad_request(
            "The request body must be a JSON object ({\"model\": ..., ...}); got something else",
            "invalid_type",
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::bad_request(
                format!("The request body is not valid JSON: {inner}; fix the JSON syntax"),
                "invalid_json",
            )
        } else {
            // serde names unknown and missing fields itself, inside the object the path points
            // at; for type errors the path says where. The root's path is ".": no field.
            let at_root = path == "." || path.is_empty();
            let field = match (named_field(&inner.to_string()), at_root) {
                (Some(name), true) => Some(name),
                // An unknown field's path already ends with it; a missing one's is the object.
                (Some(name), false) if path == name || path.ends_with(&format!(".{name}")) => {
                    Some(path.clone())
                }
                (Some(name), false) => Some(format!("{path}.{name}")),
                (None, false) => Some(path.clone()),
                (None, true) => None,
            };
            let where_ = if at_root {
                String::new()
            } else {
                format!(" at `{path}`")
            };
            let mut err = ApiError::invalid("", format!("Invalid request{where_}: {inner}"));
            err.param = field;
            err.code = Some("invalid_type");
            err
        }
    })?;
    de.end().map_err(|e| {
        ApiError::bad_request(
            format!("The request body has data after the JSON value: {e}"),
            "invalid_json",
        )
    })?;
    Ok(value)
}

/// The field serde's message names: "unknown field `x`, expected ..." or "missing field `x`".
fn named_field(msg: &str) -> Option<String> {
    let rest = msg
        .strip_prefix("unknown field `")
        .or_else(|| msg.strip_prefix("missing field `"))?;
    Some(rest[..rest.find('`')?].to_string())
}

/// The `model` field: absent means the served model; anything else must name it.
pub fn check_model(
    requested: Option<&str>,
    served: &str,
    model_path: &str,
) -> Result<(), ApiError> {
    match requested {
        None => Ok(()),
        Some(m) if m == served || m == model_path => Ok(()),
        Some(m) => Err(ApiError::model_not_found(m, served)),
    }
}

fn non_negative(param: &str, v: i64) -> Result<usize, ApiError> {
    usize::try_from(v)
        .map_err(|_| ApiError::invalid(param, format!("`{param}` must be 0 or more, got {v}")))
}

fn token_ids(param: &str, ids: &[i64]) -> Result<Vec<u32>, ApiError> {
    ids.iter()
        .map(|&t| {
            u32::try_from(t).map_err(|_| {
                ApiError::invalid(
                    param,
                    format!("`{param}` holds {t}, which is not a token id (0 or more, below 2^32)"),
                )
            })
        })
        .collect()
}

fn stream_mode(stream: Option<bool>, opts: &Option<StreamOptions>) -> Result<StreamMode, ApiError> {
    let stream = stream.unwrap_or(false);
    if opts.is_some() && !stream {
        return Err(ApiError::invalid(
            "stream_options",
            "`stream_options` is only allowed with `stream: true`; remove it or set stream to true",
        ));
    }
    let o = opts.clone().unwrap_or_default();
    Ok(StreamMode {
        stream,
        include_usage: o.include_usage.unwrap_or(false),
        continuous_usage: o.continuous_usage_stats.unwrap_or(false),
    })
}

/// A count of top log-probabilities (`logprobs`, `top_logprobs`, `prompt_logprobs`): 0 up to
/// the server's `--max-logprobs`.
fn logprob_count(param: &str, k: i64, max: usize) -> Result<usize, ApiError> {
    match usize::try_from(k) {
        Ok(k) if k <= max => Ok(k),
        _ => {
            let whole = if k == -1 {
                " (-1, the whole vocabulary, is not served)"
            } else {
                ""
            };
            Err(ApiError::invalid(
                param,
                format!(
                    "`{param}` must be between 0 and {max} (this server's --max-logprobs), got {k}{whole}"
                ),
            ))
        }
    }
}

/// vLLM's rule: prompt logprobs come in the whole response only, never in stream chunks,
/// so asking for some (more than 0) while streaming is refused. The value is checked here
/// too; with `stream` and 0 nothing is returned, so nothing is computed.
fn prompt_logprobs(k: Option<i64>, stream: bool, max: usize) -> Result<Option<usize>, ApiError> {
    let Some(k) = k else { return Ok(None) };
    let k = logprob_count("prompt_logprobs", k, max)?;
    match (stream, k) {
        (false, k) => Ok(Some(k)),
        (true, 0) => Ok(None),
        (true, _) => Err(ApiError::invalid(
            "prompt_logprobs",
            "`prompt_logprobs` are not available when `stream=True` (they come in the whole \
             response only); set stream to false, or leave prompt_logprobs out",
        )),
    }
}

/// OpenAI's `logit_bias`: token ids (as string keys) to numbers, clamped to [-100, 100].
fn logit_bias(m: &serde_json::Map<String, serde_json::Value>) -> Result<Vec<(u32, f32)>, ApiError> {
    use crate::sampling::params::{parse_logit_bias, MAX_LOGIT_BIAS};
    if m.len() > MAX_LOGIT_BIAS {
        return Err(ApiError::invalid(
            "logit_bias",
            format!(
                "`logit_bias` holds {} entries, more than the limit of {MAX_LOGIT_BIAS} a request may give",
                m.len()
            ),
        ));
    }
    let mut entries = Vec::with_capacity(m.len());
    for (k, v) in m {
        let Some(b) = v.as_f64() else {
            return Err(ApiError::invalid(
                "logit_bias",
                format!("`logit_bias` values must be numbers (the bias, -100 to 100); token {k:?} has {v}"),
            ));
        };
        entries.push((k.as_str(), b));
    }
    parse_logit_bias(entries).map_err(|e| ApiError::invalid(e.param, e.message))
}

/// vLLM's `bad_words`: checked for count and length before they are tokenized (each word
/// makes at least one token sequence; none may pass MAX_BAD_WORD_TOKENS tokens, which no
/// word of more than MAX_BAD_WORD_CHARS characters could meet in any real vocabulary).
fn bad_words(words: &[String]) -> Result<Vec<String>, ApiError> {
    use crate::sampling::params::MAX_BAD_WORD_SEQUENCES;
    if words.len() > MAX_BAD_WORD_SEQUENCES {
        return Err(ApiError::invalid(
            "bad_words",
            format!(
                "`bad_words` holds {} words, more than the limit of {MAX_BAD_WORD_SEQUENCES} token \
                 sequences they may tokenize to; give fewer",
                words.len()
            ),
        ));
    }
    for (i, w) in words.iter().enumerate() {
        if w.trim().is_empty() {
            return Err(ApiError::invalid(
                "bad_words",
                format!("bad word {i} is empty; remove it"),
            ));
        }
        if w.len() > MAX_BAD_WORD_CHARS && w.chars().count() > MAX_BAD_WORD_CHARS {
            return Err(ApiError::invalid(
                "bad_words",
                format!(
                    "bad word {i} is longer than {MAX_BAD_WORD_CHARS} characters; a bad word may \
                     tokenize to at most 32 tokens"
                ),
            ));
        }
    }
    Ok(words.to_vec())
}

/// Longest bad word accepted before tokenization, in characters.
const MAX_BAD_WORD_CHARS: usize = 1024;

fn unsupported(param: &str, what: &str) -> ApiError {
    let mut e = ApiError::invalid(
        param,
        format!("`{param}` is not supported by rvllm ({what}); remove it"),
    );
    e.code = Some("unsupported_parameter");
    e
}

/// Fields common to both endpoints (the sampling_fields! block of protocol.rs), mapped onto
/// SamplingParams. `default_max_tokens` differs: 16 for completions, None (to the end of the
/// context) for chat.
macro_rules! common_params {
    ($r:expr, $default_max_tokens:expr, $max_tokens_name:expr, $max_tokens:expr, $max_logprobs:expr) => {{
        let r = $r;
        let mut p = SamplingParams::default();
        if let Some(t) = r.temperature {
            if !(0.0..=2.0).contains(&t) {
                return Err(ApiError::invalid(
                    "temperature",
                    format!("`temperature` must be between 0 and 2, got {t}"),
                ));
            }
            p.temperature = t as f32;
        }
        if let Some(v) = r.top_p {
            if !(v > 0.0 && v <= 1.0) {
                return Err(ApiError::invalid(
                    "top_p",
                    format!("`top_p` must be in (0, 1], got {v}"),
                ));
            }
            p.top_p = v as f32;
        }
        p.max_tokens = match $max_tokens {
            None => $default_max_tokens,
            Some(m) if m < 1 => {
                return Err(ApiError::invalid(
                    $max_tokens_name,
                    format!("`{}` must be at least 1, got {m}", $max_tokens_name),
                ))
            }
            Some(m) => Some(usize::try_from(m).unwrap_or(usize::MAX)),
        };
        if let Some(n) = r.n {
            if !(1..=MAX_N).contains(&n) {
                return Err(ApiError::invalid(
                    "n",
                    format!("`n` must be between 1 and {MAX_N}, got {n}"),
                ));
            }
            p.n = n as usize;
        }
        if let Some(b) = r.best_of {
            if b != p.n as i64 {
                return Err(unsupported(
                    "best_of",
                    "only best_of equal to n is served; set it to n or leave it out",
                ));
            }
        }
        if let Some(s) = &r.stop {
            p.stop = match s {
                StopField::One(s) => vec![s.clone()],
                StopField::Many(v) => v.clone(),
            };
            p.stop.retain(|s| !s.is_empty());
            // Checked here, before the prompt is tokenized, though the engine checks too.
            if let Err(e) = crate::sampling::params::check_stop_strings(&p.stop) {
                return Err(ApiError::invalid(e.param, e.message));
            }
        }
        for (name, v, field) in [
            (
                "presence_penalty",
                r.presence_penalty,
                &mut p.presence_penalty,
            ),
            (
                "frequency_penalty",
                r.frequency_penalty,
                &mut p.frequency_penalty,
            ),
        ] {
            if let Some(v) = v {
                if !(-2.0..=2.0).contains(&v) {
                    return Err(ApiError::invalid(
                        name,
                        format!("`{name}` must be between -2 and 2, got {v}"),
                    ));
                }
                *field = v as f32;
            }
        }
        if let Some(v) = r.repetition_penalty {
            if !(v > 0.0 && v.is_finite()) {
                return Err(ApiError::invalid(
                    "repetition_penalty",
                    format!("`repetition_penalty` must be above 0, got {v}"),
                ));
            }
            p.repetition_penalty = v as f32;
        }
        if let Some(v) = r.min_p {
            if !(0.0..=1.0).contains(&v) {
                return Err(ApiError::invalid(
                    "min_p",
                    format!("`min_p` must be in [0, 1], got {v}"),
                ));
            }
            p.min_p = v as f32;
        }
        if let Some(k) = r.top_k {
            if k < -1 || k > i32::MAX as i64 {
                return Err(ApiError::invalid(
                    "top_k",
                    format!("`top_k` must be -1 (off), 0 (off) or a positive count, got {k}"),
                ));
            }
            p.top_k = k as i32;
        }
        // OpenAI seeds are any 64-bit integer; the bits are what matter.
        p.seed = r.seed.map(|s| s as u64);
        if let Some(m) = r.min_tokens {
            p.min_tokens = non_negative("min_tokens", m)?;
        }
        if let Some(ids) = &r.stop_token_ids {
            p.stop_token_ids = token_ids("stop_token_ids", ids)?;
        }
        p.include_stop_str_in_output = r.include_stop_str_in_output.unwrap_or(false);
        p.ignore_eos = r.ignore_eos.unwrap_or(false);
        p.skip_special_tokens = r.skip_special_tokens.unwrap_or(true);
        if r.spaces_between_special_tokens == Some(false) {
            return Err(unsupported(
                "spaces_between_special_tokens",
                "text is decoded as the tokenizer's decoder writes it, as vLLM's fast-tokenizer \
                 path does; only true (the default) is served",
            ));
        }
        if r.length_penalty.is_some_and(|v| v != 1.0) {
            return Err(unsupported(
                "length_penalty",
                "it only weighs beams in beam search, which is not implemented; only 1 is served",
            ));
        }
        if r.priority.is_some_and(|v| v != 0) {
            return Err(unsupported(
                "priority",
                "requests are scheduled first come, first served; only 0 is served",
            ));
        }
        if r.store == Some(true) {
            return Err(unsupported(
                "store",
                "completions are not stored; send false or leave it out",
            ));
        }
        if let Some(t) = r
            .service_tier
            .as_deref()
            .filter(|t| !matches!(*t, "auto" | "default"))
        {
            return Err(unsupported(
                "service_tier",
                &format!("there is one tier; `{t}` is not served, send auto or default"),
            ));
        }
        p.prompt_logprobs =
            prompt_logprobs(r.prompt_logprobs, r.stream.unwrap_or(false), $max_logprobs)?;
        if let Some(m) = &r.logit_bias {
            p.logit_bias = logit_bias(m)?;
        }
        if r.use_beam_search == Some(true) {
            return Err(unsupported(
                "use_beam_search",
                "beam search is not implemented",
            ));
        }
        p.structured_output = structured_output(&StructuredFields {
            response_format: r.response_format.as_ref(),
            structured_outputs: r.structured_outputs.as_ref(),
            guided_json: r.guided_json.as_ref(),
            guided_regex: r.guided_regex.as_ref(),
            guided_choice: r.guided_choice.as_ref(),
            guided_grammar: r.guided_grammar.as_ref(),
            guided_decoding_backend: r.guided_decoding_backend.as_ref(),
            guided_whitespace_pattern: r.guided_whitespace_pattern.as_ref(),
        })?;
        if r.truncate_prompt_tokens.is_some() {
            return Err(unsupported(
                "truncate_prompt_tokens",
                "prompts are never truncated; shorten the prompt yourself",
            ));
        }
        if let Some(ids) = &r.allowed_token_ids {
            if ids.is_empty() {
                return Err(ApiError::invalid(
                    "allowed_token_ids",
                    "`allowed_token_ids` must not be empty; leave it out to allow every token",
                ));
            }
            p.allowed_token_ids = Some(token_ids("allowed_token_ids", ids)?);
        }
        if let Some(words) = &r.bad_words {
            p.bad_words = bad_words(words)?;
        }
        if r.logits_processors.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(unsupported(
                "logits_processors",
                "custom logits processors are not implemented",
            ));
        }
        p
    }};
}

/// vLLM's `cache_salt` keeps a request's prompt out of the prefix cache that other requests
/// share; rvllm's cache does not take a salt, so a salted request is served only where there
/// is no shared cache (`--no-enable-prefix-caching`).
pub fn check_cache_salt(salt: Option<&str>, prefix_caching: bool) -> Result<(), ApiError> {
    match salt {
        Some(_) if prefix_caching => Err(unsupported(
            "cache_salt",
            "the prefix cache takes no salt, so it cannot keep this request's prompt apart; \
             leave it out, or start the server with --no-enable-prefix-caching",
        )),
        _ => Ok(()),
    }
}

/// `max_logprobs`: the server's `--max-logprobs` (at most MAX_LOGPROBS).
pub fn validate_completion(
    r: &CompletionRequest,
    max_logprobs: usize,
) -> Result<CompletionJob, ApiError> {
    let mut params = common_params!(r, Some(16), "max_tokens", r.max_tokens, max_logprobs);
    if r.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(unsupported(
            "suffix",
            "fill-in-the-middle is not implemented",
        ));
    }
    if let Some(k) = r.logprobs {
        params.logprobs = Some(logprob_count("logprobs", k, max_logprobs)?);
    }
    let echo = r.echo.unwrap_or(false);
    if echo && params.logprobs.is_some() && params.prompt_logprobs.is_none() {
        // Echoed prompt tokens carry their log-probabilities too, as in OpenAI's API.
        params.prompt_logprobs = params.logprobs;
    }
    let missing = || {
        ApiError::invalid(
            "prompt",
            "`prompt` is required: a string, a list of strings, or token ids",
        )
    };
    let empty = || {
        ApiError::invalid(
            "prompt",
            "`prompt` is empty; give at least one character or token",
        )
    };
    let prompts = match r.prompt.as_ref().ok_or_else(missing)? {
        PromptField::Text(s) => vec![PromptInput::Text(s.clone())],
        PromptField::Texts(v) => v.iter().cloned().map(PromptInput::Text).collect(),
        PromptField::Tokens(ids) => vec![PromptInput::Tokens(token_ids("prompt", ids)?)],
        PromptField::TokenLists(v) => v
            .iter()
            .map(|ids| token_ids("prompt", ids).map(PromptInput::Tokens))
            .collect::<Result<_, _>>()?,
    };
    if prompts.is_empty() {
        return Err(empty());
    }
    for p in &prompts {
        let is_empty = match p {
            PromptInput::Text(s) => s.is_empty(),
            PromptInput::Tokens(t) => t.is_empty(),
        };
        if is_empty {
            return Err(empty());
        }
    }
    Ok(CompletionJob {
        prompts,
        params,
        stream: stream_mode(r.stream, &r.stream_options)?,
        echo,
        add_special_tokens: r.add_special_tokens.unwrap_or(true),
        tokens_as_ids: r.return_tokens_as_token_ids.unwrap_or(false),
        return_token_ids: r.return_token_ids.unwrap_or(false),
        request_id: r.request_id.clone(),
    })
}

/// The chat template's variables beside the messages, merged as vLLM merges them:
/// `documents`, then `reasoning_effort`, then `chat_template_kwargs` (which may override
/// both). A `chat_template` inside the kwargs is taken out and returned as the template
/// (the caller has checked --trust-request-chat-template); the names the server sets
/// itself (`messages`, `add_generation_prompt`, ...) are refused.
pub fn template_kwargs(
    documents: Option<&serde_json::Value>,
    reasoning_effort: Option<&str>,
    kwargs: Option<&serde_json::Value>,
) -> Result<(serde_json::Map<String, serde_json::Value>, Option<String>), ApiError> {
    let mut vars = serde_json::Map::new();
    if let Some(d) = documents.filter(|d| !d.is_null()) {
        vars.insert("documents".into(), d.clone());
    }
    if let Some(e) = reasoning_effort {
        vars.insert("reasoning_effort".into(), e.into());
    }
    let mut template = None;
    match kwargs {
        None | Some(serde_json::Value::Null) => {}
        Some(serde_json::Value::Object(m)) => {
            for (k, v) in m {
                if crate::tokenizer::Tokenizer::RESERVED_TEMPLATE_VARIABLES.contains(&k.as_str()) {
                    return Err(ApiError::invalid(
                        format!("chat_template_kwargs.{k}"),
                        format!(
                            "`{k}` is set by the server, not by template kwargs; send it as the \
                             request's own field (or leave it out)"
                        ),
                    ));
                }
                match (k.as_str(), v) {
                    ("chat_template", serde_json::Value::Null) => {}
                    ("chat_template", serde_json::Value::String(t)) => template = Some(t.clone()),
                    ("chat_template", _) => {
                        return Err(ApiError::invalid(
                            "chat_template_kwargs.chat_template",
                            "`chat_template` must be a string (the template's text)",
                        ))
                    }
                    _ => {
                        vars.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "chat_template_kwargs",
                "`chat_template_kwargs` must be a JSON object of template variables, e.g. \
                 {\"enable_thinking\": false}",
            ))
        }
    }
    Ok((vars, template))
}

/// `max_logprobs`: the server's `--max-logprobs` (at most MAX_LOGPROBS).
pub fn validate_chat(r: &ChatCompletionRequest, max_logprobs: usize) -> Result<ChatJob, ApiError> {
    if r.max_tokens.is_some()
        && r.max_completion_tokens.is_some()
        && r.max_tokens != r.max_completion_tokens
    {
        return Err(ApiError::invalid(
            "max_completion_tokens",
            "`max_tokens` and `max_completion_tokens` disagree; send only one of them",
        ));
    }
    let (max_name, max_val) = match r.max_completion_tokens {
        Some(v) => ("max_completion_tokens", Some(v)),
        None => ("max_tokens", r.max_tokens),
    };
    let mut params = common_params!(r, None, max_name, max_val, max_logprobs);
    let logprobs = match (r.logprobs.unwrap_or(false), r.top_logprobs) {
        (false, Some(k)) if k > 0 => {
            return Err(ApiError::invalid(
                "top_logprobs",
                "`top_logprobs` needs `logprobs: true`; set logprobs to true",
            ))
        }
        (false, _) => None,
        (true, k) => Some(logprob_count("top_logprobs", k.unwrap_or(0), max_logprobs)?),
    };
    params.logprobs = logprobs;
    if r.functions.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(unsupported(
            "functions",
            "OpenAI's deprecated functions are not served; send them as `tools`",
        ));
    }
    if let Some(choice) = &r.function_call {
        if !matches!(choice.as_str(), Some("none") | Some("auto")) && !choice.is_null() {
            return Err(unsupported(
                "function_call",
                "OpenAI's deprecated function_call is not served; use `tool_choice`",
            ));
        }
    }
    let tools = super::tools::request::read_tools(
        r.tools.as_deref(),
        r.tool_choice.as_ref(),
        r.parallel_tool_calls,
    )?;
    // `required` and a named function constrain the output to calls (vLLM's schemas).
    if let Some(schema) = tools
        .as_ref()
        .map(super::tools::request::output_schema)
        .transpose()?
        .flatten()
    {
        if params.structured_output.is_some() {
            return Err(ApiError::invalid(
                "tool_choice",
                "`tool_choice` \"required\" or a named function constrains the output to tool \
                 calls; it cannot be combined with response_format or guided decoding",
            ));
        }
        params.structured_output = Some(crate::sampling::StructuredOutput::JsonSchema(schema));
    }
    if let Some(m) = r
        .modalities
        .as_ref()
        .filter(|m| m.iter().any(|m| m != "text"))
    {
        return Err(unsupported(
            "modalities",
            &format!("only text is generated, not {}", m.join(", ")),
        ));
    }
    for (name, v, what) in [
        ("audio", &r.audio, "audio output is not generated"),
        (
            "prediction",
            &r.prediction,
            "predicted outputs are not implemented",
        ),
        (
            "web_search_options",
            &r.web_search_options,
            "there is no web search",
        ),
    ] {
        if v.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(unsupported(name, what));
        }
    }
    let (mut template_kwargs, kwargs_template) = template_kwargs(
        r.documents.as_ref(),
        r.reasoning_effort.as_deref(),
        r.chat_template_kwargs.as_ref(),
    )?;
    // The tools reach the template whatever the choice (vLLM's default), under template
    // kwargs' own `tools` if sent (vLLM merges the kwargs last).
    if let Some(t) = &tools {
        template_kwargs
            .entry("tools")
            .or_insert_with(|| serde_json::Value::Array(t.tools.clone()));
    }
    let raw = r.messages.as_ref().ok_or_else(|| {
        ApiError::invalid(
            "messages",
            "`messages` is required: a list of {\"role\", \"content\"} objects",
        )
    })?;
    if raw.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "`messages` is empty; send at least one message",
        ));
    }
    let messages = raw
        .iter()
        .enumerate()
        .map(|(i, m)| flatten_message(i, m))
        .collect::<Result<Vec<_>, _>>()?;
    let add_generation_prompt = r.add_generation_prompt.unwrap_or(true);
    let continue_final_message = r.continue_final_message.unwrap_or(false);
    if continue_final_message && add_generation_prompt {
        return Err(ApiError::invalid(
            "continue_final_message",
            "`continue_final_message: true` needs `add_generation_prompt: false`",
        ));
    }
    Ok(ChatJob {
        messages,
        params,
        stream: stream_mode(r.stream, &r.stream_options)?,
        logprobs,
        echo: r.echo.unwrap_or(false),
        add_generation_prompt,
        continue_final_message,
        add_special_tokens: r.add_special_tokens.unwrap_or(false),
        chat_template: r.chat_template.clone().or(kwargs_template),
        template_kwargs,
        tokens_as_ids: r.return_tokens_as_token_ids.unwrap_or(false),
        return_token_ids: r.return_token_ids.unwrap_or(false),
        request_id: r.request_id.clone(),
        tools,
    })
}

/// The chat roles a message may have (OpenAI's, and `function` from its older API).
pub const CHAT_ROLES: [&str; 6] = [
    "system",
    "user",
    "assistant",
    "tool",
    "developer",
    "function",
];

pub fn flatten_message(i: usize, m: &ChatMessageIn) -> Result<ChatTurn, ApiError> {
    if !CHAT_ROLES.contains(&m.role.as_str()) {
        return Err(ApiError::invalid(
            format!("messages[{i}].role"),
            format!(
                "unknown role `{}`; use one of {}",
                m.role,
                CHAT_ROLES.join(", ")
            ),
        ));
    }
    let content = match &m.content {
        None => String::new(),
        Some(MessageContent::Text(s)) => s.clone(),
        Some(MessageContent::Parts(parts)) => {
            let mut text = String::new();
            for (j, part) in parts.iter().enumerate() {
                match (part.kind.as_str(), &part.text) {
                    ("text", Some(t)) => {
                        if !text.is_empty() {
                            text.push('\n');
                        }
                        text.push_str(t);
                    }
                    ("text", None) => {
                        return Err(ApiError::invalid(
                            format!("messages[{i}].content[{j}].text"),
                            "a text part needs a `text` string",
                        ))
                    }
                    (other, _) => {
                        return Err(unsupported(
                            &format!("messages[{i}].content[{j}]"),
                            &format!("content parts of type `{other}` cannot be read by a text-only model; send text parts"),
                        ))
                    }
                }
            }
            text
        }
    };
    Ok(ChatTurn {
        role: m.role.clone(),
        content,
        extra: template_fields(i, m)?,
    })
}

/// What a message carries besides role and content, as vLLM gives it to templates: `name`,
/// `tool_call_id`, `tool_calls` (each `function.arguments` checked to be JSON; the template
/// reads it as a mapping, transformers' convention for tool-use templates), the reasoning under
/// both `reasoning_content` and `reasoning` (a request may send either name). `refusal` and
/// the deprecated `function_call` are passed as they came.
fn template_fields(
    i: usize,
    m: &ChatMessageIn,
) -> Result<serde_json::Map<String, serde_json::Value>, ApiError> {
    use serde_json::Value;
    let mut extra = serde_json::Map::new();
    if let Some(n) = &m.name {
        extra.insert("name".into(), n.clone().into());
    }
    if let Some(calls) = &m.tool_calls {
        let mut out = Vec::with_capacity(calls.len());
        for (j, call) in calls.iter().enumerate() {
            let mut call = call.clone();
            let args = call
                .get_mut("function")
                .and_then(Value::as_object_mut)
                .and_then(|f| f.get_mut("arguments"));
            if let Some(a) = args {
                // A JSON string stays a string here: the chat template reads it into a
                // mapping with its keys in order (tokenizer/chat.rs).
                let parsed = match &*a {
                    Value::String(s) if s.trim().is_empty() => Value::Object(Default::default()),
                    Value::String(s) => serde_json::from_str::<Value>(s).map(|_| a.clone()).map_err(|e| {
                        ApiError::invalid(
                            format!("messages[{i}].tool_calls[{j}].function.arguments"),
                            format!("the arguments are not valid JSON ({e}); send them as a JSON object encoded in a string"),
                        )
                    })?,
                    Value::Null => Value::Object(Default::default()),
                    other => other.clone(),
                };
                *a = parsed;
            }
            out.push(call);
        }
        extra.insert("tool_calls".into(), Value::Array(out));
    }
    if let Some(id) = &m.tool_call_id {
        extra.insert("tool_call_id".into(), id.clone().into());
    }
    if let Some(r) = m.reasoning_content.as_ref().or(m.reasoning.as_ref()) {
        extra.insert("reasoning_content".into(), r.clone().into());
        extra.insert("reasoning".into(), r.clone().into());
    }
    if let Some(r) = &m.refusal {
        extra.insert("refusal".into(), r.clone().into());
    }
    if let Some(f) = &m.function_call {
        extra.insert("function_call".into(), f.clone());
    }
    Ok(extra)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    const MAX: usize = MAX_LOGPROBS as usize;

    fn completion(json: &str) -> Result<CompletionJob, ApiError> {
        validate_completion(&parse_json::<CompletionRequest>(json.as_bytes())?, MAX)
    }
    fn chat(json: &str) -> Result<ChatJob, ApiError> {
        validate_chat(&parse_json::<ChatCompletionRequest>(json.as_bytes())?, MAX)
    }

    #[test]
    fn completion_maps_fields_onto_sampling_params() {
        let j = completion(
            r#"{"model":"m","prompt":"Hello","max_tokens":5,"temperature":0,"n":2,"stop":"\n","seed":-1,
                "logprobs":3,"echo":true,"top_k":-1,"ignore_eos":true,"stop_token_ids":[7]}"#,
        )
        .unwrap();
        assert_eq!(j.prompts, vec![PromptInput::Text("Hello".into())]);
        assert_eq!(j.params.max_tokens, Some(5));
        assert_eq!(j.params.temperature, 0.0);
        assert_eq!(j.params.n, 2);
        assert_eq!(j.params.stop, vec!["\n".to_string()]);
        assert_eq!(j.params.seed, Some(u64::MAX));
        assert_eq!(j.params.logprobs, Some(3));
        assert_eq!(
            j.params.prompt_logprobs,
            Some(3),
            "echo + logprobs asks for prompt logprobs"
        );
        assert_eq!(j.params.top_k, -1);
        assert!(j.params.ignore_eos);
        assert_eq!(j.params.stop_token_ids, vec![7]);
        assert!(j.echo);
        assert!(!j.stream.stream);
        // logit_bias (OpenAI), allowed_token_ids and bad_words (vLLM's extra_body).
        let j = completion(
            r#"{"prompt":"x","logit_bias":{"9":250,"3":-1.5},"allowed_token_ids":[4,2],
                "bad_words":["no"]}"#,
        )
        .unwrap();
        assert_eq!(j.params.logit_bias, vec![(3, -1.5), (9, 100.0)]);
        assert_eq!(j.params.allowed_token_ids, Some(vec![4, 2]));
        assert_eq!(j.params.bad_words, vec!["no".to_string()]);
        let c =
            chat(r#"{"messages":[{"role":"user","content":"x"}],"logit_bias":{"1":2}}"#).unwrap();
        assert_eq!(c.params.logit_bias, vec![(1, 2.0)]);
    }

    #[test]
    fn completion_defaults_to_sixteen_tokens_and_chat_to_the_context() {
        assert_eq!(
            completion(r#"{"prompt":"x"}"#).unwrap().params.max_tokens,
            Some(16)
        );
        let c = chat(r#"{"messages":[{"role":"user","content":"hi"}]}"#).unwrap();
        assert_eq!(c.params.max_tokens, None);
        assert!(c.add_generation_prompt);
    }

    fn assert_bad(r: Result<impl std::fmt::Debug, ApiError>, param: &str, needle: &str) {
        let e = r.expect_err("expected a 400");
        assert_eq!(e.status, StatusCode::BAD_REQUEST, "{e:?}");
        assert_eq!(e.param.as_deref(), Some(param), "{e:?}");
        assert!(
            e.message.contains(needle),
            "message `{}` lacks `{needle}`",
            e.message
        );
    }

    #[test]
    fn bad_values_name_their_field() {
        assert_bad(
            completion(r#"{"prompt":"x","max_tokens":-5}"#),
            "max_tokens",
            "at least 1",
        );
        assert_bad(
            completion(r#"{"prompt":"x","max_tokens":0}"#),
            "max_tokens",
            "at least 1",
        );
        assert_bad(
            completion(r#"{"prompt":"x","temperature":5}"#),
            "temperature",
            "between 0 and 2",
        );
        assert_bad(
            completion(r#"{"prompt":"x","temperature":-0.1}"#),
            "temperature",
            "between 0 and 2",
        );
        assert_bad(completion(r#"{"prompt":"x","top_p":0}"#), "top_p", "(0, 1]");
        assert_bad(completion(r#"{"prompt":"x","n":0}"#), "n", "between 1");
        assert_bad(
            completion(r#"{"prompt":"x","logprobs":21}"#),
            "logprobs",
            "between 0 and 20",
        );
        assert_bad(completion(r#"{"prompt":""}"#), "prompt", "empty");
        assert_bad(completion(r#"{"prompt":[]}"#), "prompt", "empty");
        assert_bad(
            completion(r#"{"prompt":[1,-2]}"#),
            "prompt",
            "not a token id",
        );
        assert_bad(completion(r#"{}"#), "prompt", "required");
        assert_bad(
            completion(r#"{"prompt":"x","stream_options":{"include_usage":true}}"#),
            "stream_options",
            "stream: true",
        );
        assert_bad(
            completion(r#"{"prompt":"x","logit_bias":{"five":1}}"#),
            "logit_bias",
            "token ids",
        );
        assert_bad(
            completion(r#"{"prompt":"x","logit_bias":{"5":"up"}}"#),
            "logit_bias",
            "numbers",
        );
        assert_bad(
            completion(r#"{"prompt":"x","allowed_token_ids":[]}"#),
            "allowed_token_ids",
            "must not be empty",
        );
        assert_bad(
            completion(r#"{"prompt":"x","allowed_token_ids":[1,-1]}"#),
            "allowed_token_ids",
            "not a token id",
        );
        assert_bad(
            completion(r#"{"prompt":"x","bad_words":["ok",""]}"#),
            "bad_words",
            "empty",
        );
        assert_bad(chat(r#"{"messages":[]}"#), "messages", "empty");
        assert_bad(chat(r#"{"model":"m"}"#), "messages", "required");
        assert_bad(
            chat(r#"{"messages":[{"role":"robot","content":"x"}]}"#),
            "messages[0].role",
            "unknown role",
        );
        assert_bad(
            chat(r#"{"messages":[{"role":"user","content":"x"}],"top_logprobs":2}"#),
            "top_logprobs",
            "logprobs: true",
        );
        assert_bad(
            chat(
                r#"{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"u"}}]}]}"#,
            ),
            "messages[0].content[0]",
            "text",
        );
    }

    #[test]
    fn prompt_logprobs_rules_are_vllms() {
        let j = completion(r#"{"prompt":"x","prompt_logprobs":3}"#).unwrap();
        assert_eq!(j.params.prompt_logprobs, Some(3));
        assert_eq!(
            completion(r#"{"prompt":"x","prompt_logprobs":0}"#)
                .unwrap()
                .params
                .prompt_logprobs,
            Some(0),
            "0: the prompt token's own logprob and rank"
        );
        let c =
            chat(r#"{"messages":[{"role":"user","content":"x"}],"prompt_logprobs":20}"#).unwrap();
        assert_eq!(c.params.prompt_logprobs, Some(20));
        assert_bad(
            completion(r#"{"prompt":"x","prompt_logprobs":-2}"#),
            "prompt_logprobs",
            "between 0 and 20",
        );
        assert_bad(
            completion(r#"{"prompt":"x","prompt_logprobs":-1}"#),
            "prompt_logprobs",
            "whole vocabulary",
        );
        assert_bad(
            chat(r#"{"messages":[{"role":"user","content":"x"}],"prompt_logprobs":21}"#),
            "prompt_logprobs",
            "between 0 and 20",
        );
        assert_bad(
            completion(r#"{"prompt":"x","prompt_logprobs":1,"stream":true}"#),
            "prompt_logprobs",
            "not available when `stream=True`",
        );
        assert_bad(
            chat(
                r#"{"messages":[{"role":"user","content":"x"}],"prompt_logprobs":2,"stream":true}"#,
            ),
            "prompt_logprobs",
            "stream",
        );
        // 0 with stream is accepted (as vLLM) and computes nothing, since nothing is sent;
        // echo + logprobs still asks the engine for the echoed tokens' logprobs.
        let j = completion(r#"{"prompt":"x","prompt_logprobs":0,"stream":true}"#).unwrap();
        assert_eq!(j.params.prompt_logprobs, None);
        let j = completion(r#"{"prompt":"x","stream":true,"echo":true,"logprobs":2}"#).unwrap();
        assert_eq!(j.params.prompt_logprobs, Some(2));
        // A lower --max-logprobs bounds all three counts.
        let r = parse_json::<CompletionRequest>(br#"{"prompt":"x","prompt_logprobs":5}"#).unwrap();
        assert_bad(
            validate_completion(&r, 4),
            "prompt_logprobs",
            "between 0 and 4",
        );
        let r = parse_json::<CompletionRequest>(br#"{"prompt":"x","logprobs":5}"#).unwrap();
        assert_bad(validate_completion(&r, 4), "logprobs", "--max-logprobs");
        let r = parse_json::<ChatCompletionRequest>(
            br#"{"messages":[{"role":"user","content":"x"}],"logprobs":true,"top_logprobs":5}"#,
        )
        .unwrap();
        assert_bad(validate_chat(&r, 4), "top_logprobs", "between 0 and 4");
        assert!(validate_chat(&r, 5).is_ok());
    }

    #[test]
    fn wire_errors_are_400_with_a_field() {
        assert_bad(
            completion(r#"{"prompt":"x","temperature":"hot"}"#),
            "temperature",
            "invalid type",
        );
        assert_bad(
            completion(r#"{"prompt":"x","max_tokens":"10"}"#),
            "max_tokens",
            "invalid type",
        );
        assert_bad(
            completion(r#"{"prompt":"x","frobnicate":1}"#),
            "frobnicate",
            "unknown field",
        );
        let e = completion(r#"{"prompt": "x""#).unwrap_err();
        assert_eq!(
            (e.status, e.code),
            (StatusCode::BAD_REQUEST, Some("invalid_json"))
        );
        let e = parse_json::<CompletionRequest>(b"{\"prompt\": \"\xff\xfe\"}").unwrap_err();
        assert_eq!(
            (e.status, e.code),
            (StatusCode::BAD_REQUEST, Some("invalid_encoding"))
        );
        let e = parse_json::<CompletionRequest>(b"").unwrap_err();
        assert!(e.message.contains("empty"));
        let e = parse_json::<CompletionRequest>(b"[1, 2]").unwrap_err();
        assert!(e.message.contains("JSON object"), "{}", e.message);
        let e = parse_json::<CompletionRequest>(b"{} {}").unwrap_err();
        assert_eq!(e.code, Some("invalid_json"));
    }

    #[test]
    fn chat_logprobs_and_parts() {
        let c = chat(
            r#"{"messages":[{"role":"system","content":"s"},{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}],
                "logprobs":true,"top_logprobs":2,"max_completion_tokens":9}"#,
        )
        .unwrap();
        assert_eq!(c.logprobs, Some(2));
        assert_eq!(c.params.logprobs, Some(2));
        assert_eq!(c.params.max_tokens, Some(9));
        assert_eq!(
            c.messages[1],
            ChatTurn {
                role: "user".into(),
                content: "a\nb".into(),
                extra: Default::default(),
            }
        );
    }

    #[test]
    fn history_turns_keep_tool_calls_results_and_reasoning_for_the_template() {
        let c = chat(
            r#"{"messages":[{"role":"user","content":"Weather?"},
                {"role":"assistant","content":null,"reasoning":"Call it.",
                 "tool_calls":[{"id":"c1","type":"function","function":{"name":"w","arguments":"{\"city\": \"Paris\"}"}},
                               {"id":"c2","type":"function","function":{"name":"t","arguments":""}}]},
                {"role":"tool","tool_call_id":"c1","name":"w","content":"21C"}]}"#,
        )
        .unwrap();
        let a = c.messages[1].to_template_json();
        assert_eq!(a["content"], "");
        assert_eq!(a["reasoning_content"], "Call it.");
        assert_eq!(a["reasoning"], "Call it.");
        assert_eq!(
            a["tool_calls"][0]["function"]["arguments"], "{\"city\": \"Paris\"}",
            "the template reads the string into a mapping, keys in order"
        );
        assert_eq!(
            a["tool_calls"][1]["function"]["arguments"],
            serde_json::json!({})
        );
        let t = c.messages[2].to_template_json();
        assert_eq!(
            (&t["tool_call_id"], &t["name"]),
            (&"c1".into(), &"w".into())
        );
        assert_bad(
            chat(
                r#"{"messages":[{"role":"assistant","content":"",
                    "tool_calls":[{"id":"c1","type":"function","function":{"name":"w","arguments":"{oops"}}]}]}"#,
            ),
            "messages[0].tool_calls[0].function.arguments",
            "not valid JSON",
        );
    }

    #[test]
    fn template_kwargs_are_an_object_without_the_servers_own_names() {
        let base = r#"{"messages":[{"role":"user","content":"x"}],"chat_template_kwargs":"#;
        assert_bad(
            chat(&format!("{base}[1]}}")),
            "chat_template_kwargs",
            "JSON object",
        );
        assert_bad(
            chat(&format!(r#"{base}{{"add_generation_prompt":false}}}}"#)),
            "chat_template_kwargs.add_generation_prompt",
            "set by the server",
        );
        let c = chat(&format!(
            r#"{base}{{"chat_template":"{{{{ 1 }}}}","x":2}}}}"#
        ))
        .unwrap();
        assert_eq!(c.chat_template.as_deref(), Some("{{ 1 }}"));
        assert_eq!(c.template_kwargs.get("chat_template"), None);
        assert_eq!(c.template_kwargs["x"], 2);
    }

    #[test]
    fn stop_strings_are_bounded_before_the_prompt_is_tokenized() {
        let many: Vec<String> = (0..65).map(|i| format!("s{i}")).collect();
        let body = serde_json::json!({"prompt": "x", "stop": many}).to_string();
        assert_bad(completion(&body), "stop", "limit of 64 stop strings");
        let long = serde_json::json!({"messages": [{"role": "user", "content": "x"}],
            "stop": ["y".repeat(1025)]})
        .to_string();
        assert_bad(chat(&long), "stop", "limit of 1024 characters");
        let at_limit: Vec<String> = (0..64).map(|i| format!("{i:0>1024}")).collect();
        let body = serde_json::json!({"prompt": "x", "stop": at_limit}).to_string();
        assert_eq!(completion(&body).unwrap().params.stop.len(), 64);
    }

    #[test]
    fn model_must_match_when_given() {
        assert!(check_model(None, "smol", "/p/smol.gguf").is_ok());
        assert!(check_model(Some("smol"), "smol", "/p/smol.gguf").is_ok());
        assert!(check_model(Some("/p/smol.gguf"), "smol", "/p/smol.gguf").is_ok());
        let e = check_model(Some("gpt-4"), "smol", "/p/smol.gguf").unwrap_err();
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        assert!(e.message.contains("gpt-4") && e.message.contains("smol"));
    }
}
