//! Text at the edge of the engine: tokenizer (a `tokenizers::Tokenizer` plus what
//! tokenizer_config.json adds), chat templates and incremental detokenization.
//!
//! The engine core sees token ids only; the server and CLI use this module.
mod bound;
mod chat;
mod detok;
pub mod gguf;

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{Context, Result};
use serde_json::Value;

pub use bound::TokenBound;
pub use chat::{ChatMessage, RenderError, TEMPLATE_FUEL};
pub use detok::IncrementalDetokenizer;

/// A tokenizer with its special tokens and chat template. `Send + Sync`: share it in an `Arc`.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    eos_token_id: Option<u32>,
    /// `bound::token_bound`, worked out on first use (it walks the vocabulary).
    token_bound: OnceLock<Option<TokenBound>>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish()
    }
}

/// A special-token entry of tokenizer_config.json: a string or `{"content": "..."}`.
fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(String::from),
        _ => None,
    }
}

/// `chat_template` as a string, or a list of `{name, template}` of which "default" is used.
fn template_from(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Array(items) => items
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str)
            .map(String::from),
        _ => None,
    }
}

impl Tokenizer {
    /// Wrap an already-built tokenizer (the GGUF loader builds one from metadata).
    pub fn from_parts(
        inner: tokenizers::Tokenizer,
        chat_template: Option<String>,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Self {
        let eos_token_id = eos_token.as_deref().and_then(|t| inner.token_to_id(t));
        Tokenizer {
            inner,
            chat_template,
            bos_token,
            eos_token,
            eos_token_id,
            token_bound: OnceLock::new(),
        }
    }

    /// Load `tokenizer.json`, with `tokenizer_config.json` for the chat template and special
    /// tokens. A `chat_template.jinja` (or `chat_template.json`) beside tokenizer.json, as
    /// transformers 5 writes, is used when the config has no template.
    pub fn from_file(tokenizer_json: &Path, tokenizer_config: Option<&Path>) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(tokenizer_json).map_err(|e| {
            anyhow::anyhow!("cannot load tokenizer {}: {e}", tokenizer_json.display())
        })?;
        let config: Value = match tokenizer_config {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("cannot read {}", p.display()))?;
                serde_json::from_str(&text)
                    .with_context(|| format!("{} is not valid JSON", p.display()))?
            }
            None => Value::Null,
        };
        let dir = tokenizer_json.parent().unwrap_or(Path::new("."));
        let mut chat_template = template_from(config.get("chat_template"));
        if chat_template.is_none() {
            let jinja = dir.join("chat_template.jinja");
            let json = dir.join("chat_template.json");
            if jinja.is_file() {
                chat_template = Some(
                    std::fs::read_to_string(&jinja)
                        .with_context(|| format!("cannot read {}", jinja.display()))?,
                );
            } else if json.is_file() {
                let v: Value = serde_json::from_str(
                    &std::fs::read_to_string(&json)
                        .with_context(|| format!("cannot read {}", json.display()))?,
                )
                .with_context(|| format!("{} is not valid JSON", json.display()))?;
                chat_template = template_from(v.get("chat_template"));
            }
        }
        Ok(Self::from_parts(
            inner,
            chat_template,
            token_string(config.get("bos_token")),
            token_string(config.get("eos_token")),
        ))
    }

    /// Token ids of `text`. `add_special_tokens` applies the tokenizer's post-processor
    /// (e.g. a BOS token); chat-templated text already holds its special tokens, so encode it
    /// with `false`.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|e| anyhow::anyhow!("tokenization failed: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| anyhow::anyhow!("detokenization failed: {e}"))
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, tok: &str) -> Option<u32> {
        self.inner.token_to_id(tok)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token_id
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token
            .as_deref()
            .and_then(|t| self.inner.token_to_id(t))
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// A lower bound on a text's token count from its bytes alone, when this tokenizer's
    /// pipeline gives one (see bound.rs).
    pub fn token_bound(&self) -> Option<&TokenBound> {
        self.token_bound
            .get_or_init(|| bound::token_bound(&self.inner))
            .as_ref()
    }

    /// Render `messages` with the model's chat template (or `template_override`).
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        template_override: Option<&str>,
    ) -> Result<String> {
        Ok(self.render_chat_template(messages, add_generation_prompt, template_override, None)?)
    }

    /// `apply_chat_template` with its failures told apart, and the output bounded to
    /// `max_bytes` (a template can write far more than any context holds).
    pub fn render_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        template_override: Option<&str>,
        max_bytes: Option<usize>,
    ) -> std::result::Result<String, RenderError> {
        let template = template_override
            .or(self.chat_template())
            .ok_or(RenderError::NoTemplate)?;
        chat::render(
            template,
            messages,
            add_generation_prompt,
            self.bos_token(),
            self.eos_token(),
            max_bytes,
        )
    }
}

#[cfg(test)]
mod tests;
