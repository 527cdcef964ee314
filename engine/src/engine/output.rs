//! Turning the core's token ids into text, at the edge (ARCHITECTURE.md invariant 3):
//! incremental detokenization, stop strings found across token boundaries, and the deltas
//! that the CLI and the server hand to their users.
use std::sync::Arc;

use crate::sampling::SamplingParams;
use crate::scheduler::{EngineCoreOutput, FinishReason, TokenLogprobs};
use crate::tokenizer::{IncrementalDetokenizer, Tokenizer};

/// Why a sequence stopped with `FinishReason::Stop`.
#[derive(Debug, Clone, PartialEq)]
pub enum StopReason {
    /// A stop string matched (the string).
    Str(String),
    /// A stop token id (EOS or one of stop_token_ids) was generated.
    TokenId(u32),
}

/// New output of one sequence (`index` of the request's `n`) since the previous delta.
#[derive(Debug, Clone, Default)]
pub struct CompletionDelta {
    pub index: usize,
    pub text: String,
    pub token_ids: Vec<u32>,
    pub logprobs: Vec<TokenLogprobs>,
    /// Per prompt token (the first has none), on the first delta when asked for.
    pub prompt_logprobs: Option<Vec<Option<TokenLogprobs>>>,
    pub finish_reason: Option<FinishReason>,
    pub stop_reason: Option<StopReason>,
}

/// Text state of one sequence. `process` returns the delta to emit and whether a stop
/// string ended the sequence (the caller then aborts it in the core).
pub struct SeqOutput {
    index: usize,
    tokenizer: Option<Arc<Tokenizer>>,
    detok: Option<IncrementalDetokenizer>,
    stop: Vec<String>,
    include_stop: bool,
    /// Characters held back while streaming because they may start a stop string.
    holdback_chars: usize,
    /// All text produced so far (after stop handling) and how much of it was emitted.
    text: String,
    emitted: usize,
    pub finished: bool,
}

impl SeqOutput {
    pub fn new(
        index: usize,
        tokenizer: Option<Arc<Tokenizer>>,
        prompt_ids: &[u32],
        params: &SamplingParams,
    ) -> Self {
        let detok = tokenizer
            .as_ref()
            .map(|_| IncrementalDetokenizer::new(prompt_ids, params.skip_special_tokens));
        let longest = params
            .stop
            .iter()
            .map(|s| s.chars().count())
            .max()
            .unwrap_or(0);
        Self {
            index,
            tokenizer,
            detok,
            stop: params
                .stop
                .iter()
                .filter(|s| !s.is_empty())
                .cloned()
                .collect(),
            include_stop: params.include_stop_str_in_output,
            holdback_chars: if params.include_stop_str_in_output {
                0
            } else {
                longest.saturating_sub(1)
            },
            text: String::new(),
            emitted: 0,
            finished: false,
        }
    }

    /// Fold one core output into the text state. Returns the delta and whether a stop
    /// string was found (the sequence is then finished here and must be aborted in the core).
    pub fn process(&mut self, out: EngineCoreOutput) -> (CompletionDelta, bool) {
        let mut delta = CompletionDelta {
            index: self.index,
            token_ids: out.new_token_ids.clone(),
            logprobs: out.new_logprobs,
            prompt_logprobs: out.prompt_logprobs.map(|v| {
                std::iter::once(None)
                    .chain(v.into_iter().map(Some))
                    .collect()
            }),
            finish_reason: out.finish_reason,
            stop_reason: out.stop_token.map(StopReason::TokenId),
            ..Default::default()
        };
        let mut stopped_by_string = false;
        if let (Some(tok), Some(detok)) = (self.tokenizer.as_ref(), self.detok.as_mut()) {
            let n = out.new_token_ids.len();
            for (j, &id) in out.new_token_ids.iter().enumerate() {
                // As vLLM: the text of the token that stopped the sequence (EOS or one of
                // stop_token_ids) is not part of the output unless include_stop_str_in_output;
                // the id stays in token_ids.
                if j + 1 == n && out.stop_token.is_some() && !self.include_stop {
                    break;
                }
                let piece = detok.push(tok, id).unwrap_or_default();
                let search_from = self.text.len().saturating_sub(max_len(&self.stop) + 4);
                self.text.push_str(&piece);
                if let Some((pos, s)) = find_stop(&self.text, &self.stop, search_from) {
                    let cut = if self.include_stop {
                        pos + s.len()
                    } else {
                        pos
                    };
                    self.text.truncate(cut);
                    delta.finish_reason = Some(FinishReason::Stop);
                    delta.stop_reason = Some(StopReason::Str(s));
                    stopped_by_string = true;
                    break;
                }
            }
        }
        let finished = delta.finish_reason.is_some();
        if finished && !stopped_by_string {
            // Flush a character the detokenizer held back waiting for more bytes.
            if let (Some(tok), Some(detok)) = (self.tokenizer.as_ref(), self.detok.as_mut()) {
                self.text.push_str(&detok.finish(tok).unwrap_or_default());
            }
        }
        self.finished = finished;
        delta.text = self.take_emittable(finished);
        (delta, stopped_by_string)
    }

    /// All text so far (for offline results).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The text not yet emitted, minus a tail that could still turn into a stop string.
    fn take_emittable(&mut self, finished: bool) -> String {
        let mut end = self.text.len();
        if !finished && self.holdback_chars > 0 {
            end = self.text[..end]
                .char_indices()
                .rev()
                .nth(self.holdback_chars - 1)
                .map(|(i, _)| i)
                .unwrap_or(0);
        }
        if end <= self.emitted {
            return String::new();
        }
        let s = self.text[self.emitted..end].to_string();
        self.emitted = end;
        s
    }
}

fn max_len(stops: &[String]) -> usize {
    stops.iter().map(|s| s.len()).max().unwrap_or(0)
}

/// The earliest stop string in `text[from..]` (from is moved back to a char boundary).
fn find_stop(text: &str, stops: &[String], from: usize) -> Option<(usize, String)> {
    let mut from = from.min(text.len());
    while !text.is_char_boundary(from) {
        from -= 1;
    }
    stops
        .iter()
        .filter_map(|s| text[from..].find(s.as_str()).map(|p| (from + p, s.clone())))
        .min_by_key(|(p, _)| *p)
}
