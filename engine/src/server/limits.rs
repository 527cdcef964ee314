//! What a request may make the server compute before the engine sees it: a chat template
//! sent in the request runs only on a server started with --trust-request-chat-template
//! (vLLM's rule), and a prompt whose byte length already puts it past --max-model-len is
//! refused without being tokenized (or, for a chat, without its rendering growing further).
use serde_json::Value;

use super::error::ApiError;
use crate::tokenizer::{TokenBound, Tokenizer};

/// Bytes a chat template may write per token of context when the tokenizer gives no sound
/// bound (see `Tokenizer::max_bytes_per_token`): far more than any real tokenizer's longest
/// token, so only a template gone wrong reaches it.
const FALLBACK_BYTES_PER_TOKEN: usize = 1024;

/// Refuse a request-supplied chat template (the `chat_template` field, or one inside
/// `chat_template_kwargs`) unless the server trusts them.
pub fn check_request_template(
    template: Option<&str>,
    kwargs: Option<&Value>,
    trusted: bool,
) -> Result<(), ApiError> {
    let in_kwargs = kwargs.is_some_and(|k| k.get("chat_template").is_some_and(|t| !t.is_null()));
    if trusted || (template.is_none() && !in_kwargs) {
        return Ok(());
    }
    let param = if template.is_some() {
        "chat_template"
    } else {
        "chat_template_kwargs.chat_template"
    };
    Err(ApiError::invalid(
        param,
        "a chat template was sent with the request, but this server was not started with \
         --trust-request-chat-template, so it refuses templates from requests (a template is \
         code the server runs); leave `chat_template` out to use the model's own, or start the \
         server with --trust-request-chat-template",
    ))
}

/// Which prompt texts are certainly longer than the context, told from their bytes.
#[derive(Debug, Clone, Copy)]
pub struct PromptBound<'a> {
    max_model_len: usize,
    bound: Option<&'a TokenBound>,
}

impl<'a> PromptBound<'a> {
    pub fn new(tok: Option<&'a Tokenizer>, max_model_len: usize) -> Self {
        Self {
            max_model_len,
            bound: tok.and_then(Tokenizer::token_bound),
        }
    }

    /// The most a chat template may write: the longest text that can still fit when the
    /// tokenizer counts every byte (one byte more is `max_model_len` tokens, and the engine
    /// takes prompts up to `max_model_len - 1`), else a generous fallback.
    pub fn render_cap(&self) -> usize {
        match self.bound {
            Some(b) if b.keeps_every_byte() => b
                .bytes_per_token()
                .saturating_mul(self.max_model_len.saturating_sub(1)),
            _ => FALLBACK_BYTES_PER_TOKEN.saturating_mul(self.max_model_len),
        }
    }

    /// Refuse a prompt text that cannot fit, as the engine refuses a prompt of too many
    /// tokens (400, `context_length_exceeded`), before it is tokenized.
    pub fn check(&self, param: &str, text: &str) -> Result<(), ApiError> {
        let Some(b) = self.bound else { return Ok(()) };
        let at_least = b.min_tokens(text);
        if at_least < self.max_model_len {
            return Ok(());
        }
        Err(self.too_long(
            param,
            format!(
                "the prompt is {} bytes long, so at least {at_least} tokens (no token of this \
                 model's tokenizer stands for more than {} bytes)",
                text.len(),
                b.bytes_per_token()
            ),
        ))
    }

    /// The error for a chat whose rendering outgrew `render_cap`.
    pub fn rendered_too_long(&self, param: &str, limit: usize) -> ApiError {
        self.too_long(
            param,
            format!("the conversation renders to more than {limit} bytes of prompt"),
        )
    }

    fn too_long(&self, param: &str, what: String) -> ApiError {
        let mut e = ApiError::invalid(
            param,
            format!(
                "{what}, but this model's maximum context length (--max-model-len) is {} \
                 tokens; shorten the prompt or raise --max-model-len",
                self.max_model_len
            ),
        );
        e.code = Some("context_length_exceeded");
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    #[test]
    fn request_templates_need_the_flag() {
        assert!(check_request_template(None, None, false).is_ok());
        assert!(check_request_template(Some("{{ x }}"), None, true).is_ok());
        let e = check_request_template(Some("{{ x }}"), None, false).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.param.as_deref(), Some("chat_template"));
        assert!(
            e.message.contains("--trust-request-chat-template"),
            "{}",
            e.message
        );
        let kwargs = serde_json::json!({"chat_template": "{{ x }}"});
        let e = check_request_template(None, Some(&kwargs), false).unwrap_err();
        assert_eq!(
            e.param.as_deref(),
            Some("chat_template_kwargs.chat_template")
        );
        let other = serde_json::json!({"enable_thinking": false, "chat_template": null});
        assert!(check_request_template(None, Some(&other), false).is_ok());
    }

    fn tiny_tokenizer() -> Tokenizer {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny/llama3");
        Tokenizer::from_file(&dir.join("tokenizer.json"), None).unwrap()
    }

    #[test]
    fn the_byte_bound_refuses_only_what_cannot_fit() {
        let tok = tiny_tokenizer();
        let per = tok.token_bound().unwrap().bytes_per_token();
        let b = PromptBound::new(Some(&tok), 100);
        assert_eq!(b.render_cap(), 99 * per);
        assert!(b.check("prompt", &"x".repeat(99 * per)).is_ok());
        let e = b.check("prompt", &"x".repeat(99 * per + 1)).unwrap_err();
        assert_eq!(e.code, Some("context_length_exceeded"));
        assert_eq!(e.param.as_deref(), Some("prompt"));
        assert!(e.message.contains("at least 100 tokens"), "{}", e.message);
        assert!(
            e.message.contains("--max-model-len) is 100"),
            "{}",
            e.message
        );
        let none = PromptBound::new(None, 100);
        assert!(none.check("prompt", &"x".repeat(1 << 20)).is_ok());
        assert_eq!(none.render_cap(), 100 * FALLBACK_BYTES_PER_TOKEN);
    }
}
