//! The OpenAI wire format of responses and stream chunks, and the log-probability layouts of
//! both endpoints (completions: parallel arrays; chat: one object per token).
use serde::Serialize;
use serde_json::{Map, Value};

use crate::engine::{FinishReason, StopReason};
use crate::scheduler::TokenLogprobs;
use crate::tokenizer::Tokenizer;

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<&'static str>,
    /// vLLM's extension: the stop string or stop token id that ended the choice.
    pub stop_reason: Option<Value>,
    /// Generated token ids, when asked for (`return_token_ids`) or when the model has no
    /// tokenizer (the text is then empty).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
    /// vLLM's `prompt_logprobs`: always present in a whole response (`null` unless asked
    /// for, as vLLM writes it), absent from stream chunks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<Option<PromptLogprobs>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CompletionResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    pub usage: Option<Usage>,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct CompletionLogprobs {
    pub text_offset: Vec<usize>,
    pub token_logprobs: Vec<Option<f32>>,
    pub tokens: Vec<String>,
    pub top_logprobs: Vec<Option<Map<String, Value>>>,
}

impl CompletionLogprobs {
    pub fn extend(&mut self, other: CompletionLogprobs) {
        self.text_offset.extend(other.text_offset);
        self.token_logprobs.extend(other.token_logprobs);
        self.tokens.extend(other.tokens);
        self.top_logprobs.extend(other.top_logprobs);
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatMessageOut {
    pub role: &'static str,
    /// `null` when a reasoning parser found only reasoning.
    pub content: Option<String>,
    /// The thinking, with `--reasoning-parser`: vLLM's two names for it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<String>,
    /// The calls the model made (server/tools/): OpenAI's `tool_calls`, absent when none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<Value>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatChoice {
    pub index: usize,
    pub message: ChatMessageOut,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
    pub stop_reason: Option<Value>,
    /// Generated token ids, when asked for (`return_token_ids`) or when the model has no
    /// tokenizer (the text is then empty).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
    /// vLLM's `prompt_logprobs` of the rendered conversation (`null` unless asked for).
    pub prompt_logprobs: Option<PromptLogprobs>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// With `--reasoning-parser`: the piece of thinking, under vLLM's two names.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<String>,
    /// Pieces of tool calls (`index`; `id`, `type` and `name` in a call's first piece).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<Value>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: ChatDelta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
    pub stop_reason: Option<Value>,
    /// Generated token ids, when asked for (`return_token_ids`) or when the model has no
    /// tokenizer (the text is then empty).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatChunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<ChatTopLogprob>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatTopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

/// vLLM's `prompt_logprobs`: one entry per prompt token, `null` for the first (nothing
/// precedes it), else a map from token id (a string key, as JSON writes vLLM's int keys) to
/// its `Logprob`: the prompt's own token first, then the top alternatives.
pub type PromptLogprobs = Vec<Option<LogprobMap>>;

/// vLLM's `Logprob`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct VllmLogprob {
    pub logprob: Value,
    pub rank: u32,
    pub decoded_token: Option<String>,
}

/// `{token id: Logprob}` in insertion order (the prompt token first), as vLLM's dict is.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LogprobMap(pub Vec<(u32, VllmLogprob)>);

impl Serialize for LogprobMap {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (id, lp) in &self.0 {
            m.serialize_entry(&id.to_string(), lp)?;
        }
        m.end()
    }
}

/// Build vLLM's prompt_logprobs from the engine's (`None` first, as the engine's delta has
/// it), with the top `top_k` alternatives per position. As vLLM: the prompt token carries
/// its own rank; alternatives are ranked 1..=top_k, and when the prompt token is one of
/// them its entry keeps its place and takes the alternative's rank; -inf becomes -9999.
/// `decoded_token` is the token's own text (null without a tokenizer).
pub fn prompt_logprobs(
    tok: Option<&Tokenizer>,
    plp: &[Option<TokenLogprobs>],
    top_k: usize,
) -> PromptLogprobs {
    let decoded = |id: u32| tok.map(|_| token_str(tok, id, false));
    plp.iter()
        .map(|lp| {
            let lp = lp.as_ref()?;
            let mut map = LogprobMap(vec![(
                lp.token_id,
                VllmLogprob {
                    logprob: json_f32(finite(lp.logprob)),
                    rank: lp.rank,
                    decoded_token: decoded(lp.token_id),
                },
            )]);
            for (i, (id, l)) in lp.top.iter().take(top_k).enumerate() {
                let entry = VllmLogprob {
                    logprob: json_f32(finite(*l)),
                    rank: i as u32 + 1,
                    decoded_token: decoded(*id),
                };
                match map.0.iter_mut().find(|(k, _)| k == id) {
                    Some((_, e)) => *e = entry,
                    None => map.0.push((*id, entry)),
                }
            }
            Some(map)
        })
        .collect()
}

pub fn finish_str(f: &FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Abort => "abort",
    }
}

pub fn stop_reason_json(s: &Option<StopReason>) -> Option<Value> {
    match s {
        Some(StopReason::Str(s)) => Some(Value::String(s.clone())),
        Some(StopReason::TokenId(t)) => Some(Value::from(*t)),
        None => None,
    }
}

/// An f32 as a JSON number written the way f32 prints (-0.48119926, not -0.4811992645263672).
fn json_f32(x: f32) -> Value {
    let short: f64 = format!("{x}").parse().unwrap_or(x as f64);
    serde_json::Number::from_f64(short)
        .map(Value::Number)
        .unwrap_or(Value::Null)
}

/// JSON has no -inf: vLLM reports impossible tokens as -9999.
fn finite(lp: f32) -> f32 {
    if lp.is_finite() {
        lp
    } else {
        -9999.0
    }
}

/// The text of one token as logprobs show it (special tokens included), or `token_id:N`
/// when asked for ids or when there is no tokenizer.
pub fn token_str(tok: Option<&Tokenizer>, id: u32, as_ids: bool) -> String {
    match tok {
        Some(t) if !as_ids => t
            .decode(&[id], false)
            .unwrap_or_else(|_| format!("token_id:{id}")),
        _ => format!("token_id:{id}"),
    }
}

/// Completions logprobs for `entries` (None: a position without logprobs, the first prompt
/// token), text offsets counted in characters from `offset`, which is advanced.
pub fn completion_logprobs(
    tok: Option<&Tokenizer>,
    entries: &[Option<(u32, Option<&TokenLogprobs>)>],
    top_k: usize,
    as_ids: bool,
    offset: &mut usize,
) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    for e in entries {
        let Some((id, lp)) = e else { continue };
        let s = token_str(tok, *id, as_ids);
        out.text_offset.push(*offset);
        *offset += s.chars().count();
        match lp {
            Some(lp) => {
                out.token_logprobs.push(Some(finite(lp.logprob)));
                let mut top = Map::new();
                top.insert(s.clone(), json_f32(finite(lp.logprob)));
                for (tid, tlp) in lp.top.iter().take(top_k) {
                    top.entry(token_str(tok, *tid, as_ids))
                        .or_insert(json_f32(finite(*tlp)));
                }
                out.top_logprobs.push(Some(top));
            }
            None => {
                out.token_logprobs.push(None);
                out.top_logprobs.push(None);
            }
        }
        out.tokens.push(s);
    }
    out
}

pub fn chat_logprobs(
    tok: Option<&Tokenizer>,
    lps: &[TokenLogprobs],
    top_k: usize,
    as_ids: bool,
) -> ChatLogprobs {
    let content = lps
        .iter()
        .map(|lp| {
            let token = token_str(tok, lp.token_id, as_ids);
            ChatTokenLogprob {
                bytes: token.as_bytes().to_vec(),
                token,
                logprob: finite(lp.logprob),
                top_logprobs: lp
                    .top
                    .iter()
                    .take(top_k)
                    .map(|(id, l)| {
                        let token = token_str(tok, *id, as_ids);
                        ChatTopLogprob {
                            bytes: token.as_bytes().to_vec(),
                            token,
                            logprob: finite(*l),
                        }
                    })
                    .collect(),
            }
        })
        .collect();
    ChatLogprobs { content }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A random request id (`cmpl-…`, `chatcmpl-…`).
pub fn random_id(prefix: &str) -> String {
    use rand::Rng;
    let n: u128 = rand::rng().random();
    format!("{prefix}-{n:032x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lp(id: u32, l: f32, top: &[(u32, f32)]) -> TokenLogprobs {
        TokenLogprobs {
            token_id: id,
            logprob: l,
            rank: 1 + top.iter().filter(|t| t.1 > l).count() as u32,
            top: top.to_vec(),
        }
    }

    #[test]
    fn completion_logprobs_layout_without_tokenizer() {
        let a = lp(5, -0.5, &[(5, -0.5), (6, -1.5), (7, -2.0)]);
        let b = lp(9, f32::NEG_INFINITY, &[]);
        let mut offset = 3;
        let out = completion_logprobs(
            None,
            &[
                None,
                Some((4, None)),
                Some((5, Some(&a))),
                Some((9, Some(&b))),
            ],
            2,
            false,
            &mut offset,
        );
        assert_eq!(out.tokens, vec!["token_id:4", "token_id:5", "token_id:9"]);
        assert_eq!(out.token_logprobs, vec![None, Some(-0.5), Some(-9999.0)]);
        assert_eq!(out.text_offset, vec![3, 13, 23]);
        assert_eq!(offset, 33);
        let top = out.top_logprobs[1].as_ref().unwrap();
        assert_eq!(
            top.len(),
            2,
            "the sampled token plus the top 2, which include it"
        );
        assert_eq!(top["token_id:6"], json_f32(-1.5));
        assert_eq!(json_f32(-0.48119926).to_string(), "-0.48119926");
        assert!(out.top_logprobs[0].is_none());
    }

    #[test]
    fn prompt_logprobs_layout_is_vllms() {
        // Position 1: the prompt token (8) is outside the top 2; position 2: it is the
        // second alternative, so it keeps its place first and takes rank 2.
        let plp = vec![
            None,
            Some(lp(8, -4.0, &[(3, -0.1), (4, -2.5), (8, -4.0)])),
            Some(lp(6, -1.5, &[(5, -0.5), (6, -1.5), (7, f32::NEG_INFINITY)])),
        ];
        let v = serde_json::to_value(prompt_logprobs(None, &plp, 2)).unwrap();
        assert_eq!(v[0], Value::Null);
        let first = v[1].as_object().unwrap();
        assert_eq!(first.len(), 3, "the prompt token plus the top 2");
        assert_eq!(
            v[1]["8"],
            serde_json::json!({"logprob": -4.0, "rank": 3, "decoded_token": null})
        );
        assert_eq!(v[1]["3"]["rank"], 1);
        assert_eq!(v[1]["4"]["rank"], 2);
        assert_eq!(v[2].as_object().unwrap().len(), 2);
        assert_eq!(v[2]["6"]["rank"], 2);
        assert_eq!(v[2]["5"]["logprob"], -0.5);
        // The prompt token comes first in the text, as in vLLM's dict.
        let text = serde_json::to_string(&prompt_logprobs(None, &plp, 2)).unwrap();
        assert!(text.starts_with(r#"[null,{"8":"#), "{text}");
        // -inf is written as -9999, as vLLM clamps it.
        let v = serde_json::to_value(prompt_logprobs(None, &plp, 3)).unwrap();
        assert_eq!(v[2]["7"]["logprob"], -9999.0);
    }

    #[test]
    fn chat_logprobs_layout() {
        let out = chat_logprobs(None, &[lp(1, -0.25, &[(1, -0.25), (2, -3.0)])], 1, true);
        let v = serde_json::to_value(&out).unwrap();
        assert_eq!(v["content"][0]["token"], "token_id:1");
        assert_eq!(v["content"][0]["logprob"], -0.25);
        assert_eq!(v["content"][0]["top_logprobs"].as_array().unwrap().len(), 1);
        assert_eq!(
            v["content"][0]["bytes"].as_array().unwrap().len(),
            "token_id:1".len()
        );
    }
}
