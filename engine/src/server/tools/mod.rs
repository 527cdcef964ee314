//! Tool calling, as `vllm serve --enable-auto-tool-choice --tool-call-parser NAME` does it.
//!
//! - request.rs: `tools`, `tool_choice` (none, auto, required, a named function) and
//!   `parallel_tool_calls` read and checked; for `required` and a named function the JSON
//!   schema that constrains the output (vLLM's shapes).
//! - One parser a model family (`--tool-call-parser`), each finding calls in the model's
//!   text as it streams: hermes.rs (`<tool_call>{json}</tool_call>`: Hermes, Qwen2.5,
//!   Qwen3), llama3_json.rs (Llama 3.x JSON, `<|python_tag|>` optional), mistral.rs
//!   (`[TOOL_CALLS]` and a JSON array, or v11's `[TOOL_CALLS]name[ARGS]{...}`), pythonic.rs
//!   (`[f(a=1), g(b="x")]`).
//! - choice.rs: one choice's state in a response: which parser (or the constrained
//!   output of `required` / named), call ids and indexes, the finish reason.
//!
//! Rules every parser keeps, so that a stream adds up to the whole response whatever the
//! pieces: a call is released only once it is complete and valid (its arguments arrive in
//! one piece), so a stream never shows a call the whole response would not have; text
//! that turns out not to be a call (broken or cut-off JSON) is content, exactly as
//! written; whitespace between content and a call is a separator, not content; a piece
//! ending in what may begin a marker holds that part back until the next piece settles it.
use std::str::FromStr;

pub mod choice;
mod hermes;
pub mod json;
mod llama3_json;
mod mistral;
mod pythonic;
pub mod request;
mod required;

/// One complete call found in the output: the function's name and its arguments, a JSON
/// object as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    pub name: String,
    pub arguments: String,
}

impl ToolCall {
    pub fn new(name: impl Into<String>, arguments: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            arguments: arguments.into(),
        }
    }
}

/// What a piece of output holds: content text and the calls completed in it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ToolDelta {
    pub content: String,
    pub calls: Vec<ToolCall>,
}

impl ToolDelta {
    pub fn append(&mut self, other: ToolDelta) {
        self.content.push_str(&other.content);
        self.calls.extend(other.calls);
    }
}

/// Finds tool calls in one choice's output as it arrives (see the module comment).
pub trait ToolCallParser: Send {
    /// The next piece of the output.
    fn push(&mut self, text: &str) -> ToolDelta;
    /// The end of the output: what was held back, settled.
    fn finish(&mut self) -> ToolDelta;
}

/// A parser that keeps the output it has not released in one buffer and reads it in
/// `step`, holding back what may still grow into a call until `at_end`.
trait BufferedParser: Send {
    fn buffer(&mut self) -> &mut String;
    fn step(&mut self, out: &mut ToolDelta, at_end: bool);
}

impl<P: BufferedParser> ToolCallParser for P {
    fn push(&mut self, text: &str) -> ToolDelta {
        let mut out = ToolDelta::default();
        self.buffer().push_str(text);
        self.step(&mut out, false);
        out
    }

    fn finish(&mut self) -> ToolDelta {
        let mut out = ToolDelta::default();
        self.step(&mut out, true);
        out
    }
}

/// The parsers served, by vLLM's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolParserName {
    Hermes,
    Llama3Json,
    Mistral,
    Pythonic,
}

impl ToolParserName {
    pub const NAMES: [&'static str; 4] = ["hermes", "llama3_json", "mistral", "pythonic"];

    pub fn parser(self) -> Box<dyn ToolCallParser> {
        match self {
            ToolParserName::Hermes => Box::new(hermes::HermesParser::default()),
            ToolParserName::Llama3Json => Box::new(llama3_json::Llama3JsonParser::default()),
            ToolParserName::Mistral => Box::new(mistral::MistralParser::default()),
            ToolParserName::Pythonic => Box::new(pythonic::PythonicParser::default()),
        }
    }

    /// Whether the tokens that open a call are special tokens in this family's
    /// tokenizers (`<tool_call>` in some Hermes models, `[TOOL_CALLS]` in Mistral's), so a
    /// request with tools must keep special tokens in its text, as vLLM's parsers ask.
    pub fn needs_special_tokens(self) -> bool {
        matches!(self, ToolParserName::Hermes | ToolParserName::Mistral)
    }

    /// A new call id: vLLM's `chatcmpl-tool-<hex>`, or for Mistral the 9 letters and
    /// digits its chat templates insist on.
    pub fn call_id(self) -> String {
        match self {
            ToolParserName::Mistral => {
                use rand::Rng;
                const ALNUM: &[u8] =
                    b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
                let mut rng = rand::rng();
                (0..9)
                    .map(|_| ALNUM[rng.random_range(0..ALNUM.len())] as char)
                    .collect()
            }
            _ => default_call_id(),
        }
    }
}

/// vLLM's tool-call id: `chatcmpl-tool-` and 32 hex digits.
pub fn default_call_id() -> String {
    super::responses::random_id("chatcmpl-tool")
}

impl FromStr for ToolParserName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "hermes" => Ok(ToolParserName::Hermes),
            "llama3_json" => Ok(ToolParserName::Llama3Json),
            "mistral" => Ok(ToolParserName::Mistral),
            "pythonic" => Ok(ToolParserName::Pythonic),
            other => Err(format!(
                "unknown tool call parser `{other}`; rvllm has {}",
                Self::NAMES.join(", ")
            )),
        }
    }
}

/// The parse of a whole output.
pub fn parse_whole(name: ToolParserName, text: &str) -> ToolDelta {
    let mut p = name.parser();
    let mut out = p.push(text);
    out.append(p.finish());
    out
}

/// Content text in which calls begin with a marker (hermes' `<tool_call>`, Mistral's
/// `[TOOL_CALLS]`): releases content up to a marker, holding back a possible partial
/// marker and trailing whitespace (a separator if a call follows, content otherwise), and
/// dropping the whitespace right after a call.
#[derive(Debug, Default)]
struct MarkedContent {
    held: String,
    after_call: bool,
}

/// The marker was found: the whitespace before it (dropped unless the call falls back to
/// content) and the text after it.
struct MarkerFound {
    ws: String,
    rest: String,
}

impl MarkedContent {
    fn push(&mut self, marker: &str, text: &str, out: &mut String) -> Option<MarkerFound> {
        let mut buf = std::mem::take(&mut self.held);
        buf.push_str(text);
        if self.after_call {
            let t = buf.trim_start();
            if t.is_empty() {
                return None;
            }
            buf = t.to_string();
            self.after_call = false;
        }
        if let Some(p) = buf.find(marker) {
            let before = buf[..p].trim_end();
            out.push_str(before);
            return Some(MarkerFound {
                ws: buf[before.len()..p].to_string(),
                rest: buf[p + marker.len()..].to_string(),
            });
        }
        let keep = json::partial_marker_len(&buf, &[marker]);
        let body = buf[..buf.len() - keep].trim_end();
        out.push_str(body);
        self.held = buf[body.len()..].to_string();
        None
    }

    fn finish(&mut self, out: &mut String) {
        if !self.after_call {
            out.push_str(&self.held);
        }
        self.held.clear();
    }
}

#[cfg(test)]
mod stream_tests;
