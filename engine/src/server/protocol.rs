//! The OpenAI wire format of requests, as sent by clients. Every field the OpenAI API or
//! vLLM's server accepts is named here (clients send vLLM's extensions through
//! `extra_body`); anything else is rejected, as OpenAI does. Numbers are read wide (i64,
//! f64) so that a negative or huge value gets a message about the value, not about a type.
//! `validate.rs` turns these into internal types.
use serde::Deserialize;
use serde_json::Value;

/// `prompt` of /v1/completions: a string, a list of strings, a list of token ids, or a list
/// of lists of token ids.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PromptField {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<i64>),
    TokenLists(Vec<Vec<i64>>),
}

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
    /// vLLM: usage on every chunk.
    pub continuous_usage_stats: Option<bool>,
}

/// Fields shared by both endpoints: sampling controls, OpenAI's and vLLM's.
macro_rules! sampling_fields {
    ($(#[$m:meta])* pub struct $name:ident { $($extra:tt)* }) => {
        $(#[$m])*
        pub struct $name {
            pub model: Option<String>,
            pub max_tokens: Option<i64>,
            pub temperature: Option<f64>,
            pub top_p: Option<f64>,
            pub n: Option<i64>,
            pub stream: Option<bool>,
            pub stream_options: Option<StreamOptions>,
            pub stop: Option<StopField>,
            pub presence_penalty: Option<f64>,
            pub frequency_penalty: Option<f64>,
            pub seed: Option<i64>,
            pub user: Option<String>,
            pub best_of: Option<i64>,
            pub logit_bias: Option<serde_json::Map<String, Value>>,
            pub response_format: Option<Value>,
            // vLLM's sampling extensions.
            pub top_k: Option<i64>,
            pub min_p: Option<f64>,
            pub repetition_penalty: Option<f64>,
            pub min_tokens: Option<i64>,
            pub stop_token_ids: Option<Vec<i64>>,
            pub include_stop_str_in_output: Option<bool>,
            pub ignore_eos: Option<bool>,
            pub skip_special_tokens: Option<bool>,
            pub spaces_between_special_tokens: Option<bool>,
            pub prompt_logprobs: Option<i64>,
            pub add_special_tokens: Option<bool>,
            pub echo: Option<bool>,
            pub use_beam_search: Option<bool>,
            pub length_penalty: Option<f64>,
            pub truncate_prompt_tokens: Option<i64>,
            pub allowed_token_ids: Option<Vec<i64>>,
            pub bad_words: Option<Vec<String>>,
            pub guided_json: Option<Value>,
            pub guided_regex: Option<Value>,
            pub guided_choice: Option<Value>,
            pub guided_grammar: Option<Value>,
            pub guided_decoding_backend: Option<Value>,
            pub guided_whitespace_pattern: Option<Value>,
            /// vLLM's `StructuredOutputsParams` (json, regex, choice, grammar, json_object).
            pub structured_outputs: Option<Value>,
            pub logits_processors: Option<Value>,
            pub return_tokens_as_token_ids: Option<bool>,
            /// vLLM: add each choice's generated `token_ids` to responses and chunks.
            pub return_token_ids: Option<bool>,
            // Accepted and ignored: they do not change the output.
            pub priority: Option<i64>,
            pub request_id: Option<String>,
            pub cache_salt: Option<String>,
            pub metadata: Option<Value>,
            pub store: Option<bool>,
            pub service_tier: Option<String>,
            $($extra)*
        }
    };
}

sampling_fields! {
    #[derive(Debug, Clone, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct CompletionRequest {
        pub prompt: Option<PromptField>,
        pub suffix: Option<String>,
        /// Number of top log-probabilities per token (OpenAI: an integer).
        pub logprobs: Option<i64>,
    }
}

sampling_fields! {
    #[derive(Debug, Clone, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct ChatCompletionRequest {
        pub messages: Option<Vec<ChatMessageIn>>,
        pub max_completion_tokens: Option<i64>,
        /// Chat: a bool; the count is `top_logprobs`.
        pub logprobs: Option<bool>,
        pub top_logprobs: Option<i64>,
        pub tools: Option<Vec<Value>>,
        pub tool_choice: Option<Value>,
        pub parallel_tool_calls: Option<bool>,
        pub functions: Option<Vec<Value>>,
        pub function_call: Option<Value>,
        pub modalities: Option<Vec<String>>,
        pub audio: Option<Value>,
        pub prediction: Option<Value>,
        pub reasoning_effort: Option<String>,
        pub web_search_options: Option<Value>,
        pub add_generation_prompt: Option<bool>,
        pub continue_final_message: Option<bool>,
        pub documents: Option<Value>,
        pub chat_template: Option<String>,
        pub chat_template_kwargs: Option<Value>,
    }
}

/// One chat message. `content` is a string, a list of parts, or null (an assistant turn
/// that only called tools).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ChatMessageIn {
    pub role: String,
    #[serde(default)]
    pub content: Option<MessageContent>,
    pub name: Option<String>,
    pub tool_calls: Option<Vec<Value>>,
    pub tool_call_id: Option<String>,
    pub refusal: Option<String>,
    pub function_call: Option<Value>,
    pub reasoning_content: Option<String>,
    /// vLLM's newer name for `reasoning_content`.
    pub reasoning: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
    #[serde(flatten)]
    pub rest: serde_json::Map<String, Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizeRequest {
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub messages: Option<Vec<ChatMessageIn>>,
    pub add_special_tokens: Option<bool>,
    pub add_generation_prompt: Option<bool>,
    pub continue_final_message: Option<bool>,
    pub chat_template: Option<String>,
    pub chat_template_kwargs: Option<Value>,
    pub return_token_strs: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Vec<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_forms_parse() {
        let p = |s: &str| serde_json::from_str::<PromptField>(s).unwrap();
        assert_eq!(p(r#""hi""#), PromptField::Text("hi".into()));
        assert_eq!(
            p(r#"["a","b"]"#),
            PromptField::Texts(vec!["a".into(), "b".into()])
        );
        assert_eq!(p("[1,2,3]"), PromptField::Tokens(vec![1, 2, 3]));
        assert_eq!(
            p("[[1],[2,3]]"),
            PromptField::TokenLists(vec![vec![1], vec![2, 3]])
        );
        assert!(serde_json::from_str::<PromptField>("{}").is_err());
    }

    #[test]
    fn unknown_field_is_rejected_but_vllm_extensions_parse() {
        let ok: CompletionRequest = serde_json::from_str(
            r#"{"prompt":"x","top_k":5,"ignore_eos":true,"stream_options":{"include_usage":true}}"#,
        )
        .unwrap();
        assert_eq!(ok.top_k, Some(5));
        let err =
            serde_json::from_str::<CompletionRequest>(r#"{"prompt":"x","bogus":1}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `bogus`"), "{err}");
    }

    #[test]
    fn chat_content_parts_parse() {
        let r: ChatCompletionRequest = serde_json::from_str(
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"hi"}]},{"role":"assistant","content":null}]}"#,
        )
        .unwrap();
        let msgs = r.messages.unwrap();
        assert!(
            matches!(&msgs[0].content, Some(MessageContent::Parts(p)) if p[0].text.as_deref() == Some("hi"))
        );
        assert_eq!(msgs[1].content, None);
    }
}
