//! Turning the core's token ids into text, at the edge (ARCHITECTURE.md invariant 3):
//! incremental detokenization, stop strings found across token boundaries, and the deltas
//! that the CLI and the server hand to their users.
use std::sync::Arc;

use aho_corasick::automaton::{Automaton, StateID};
use aho_corasick::nfa::contiguous::NFA;
use aho_corasick::{Anchored, MatchKind};

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

/// A request's stop strings, compiled once into one Aho-Corasick automaton that every
/// sequence of the request shares (in an `Arc`): each sequence keeps only its automaton
/// state, and feeding it a token's text costs that text's length whatever the number and
/// length of the stop strings.
pub struct StopStrings {
    strings: Vec<String>,
    /// None when there are no (non-empty) stop strings.
    automaton: Option<NFA>,
    /// Characters held back while streaming (the longest stop string's length less one, or
    /// 0 with include_stop_str_in_output), so that no text is sent that a stop string
    /// completed later would have cut.
    holdback_chars: usize,
    include_stop: bool,
}

impl StopStrings {
    pub fn new(params: &SamplingParams) -> Self {
        let strings: Vec<String> = params
            .stop
            .iter()
            .filter(|s| !s.is_empty())
            .cloned()
            .collect();
        // Standard semantics: a state lists every stop string that ends at the current
        // position, which is what finding the earliest-starting one needs. Building fails
        // only past u32 state ids, far beyond the stop-string limits that
        // SamplingParams::validate enforces before any request gets here.
        let automaton = match strings.is_empty() {
            true => None,
            false => match NFA::builder()
                .match_kind(MatchKind::Standard)
                .build(&strings)
            {
                Ok(a) => Some(a),
                Err(e) => {
                    eprintln!("rvllm: stop strings ignored: cannot compile them: {e}");
                    None
                }
            },
        };
        let longest = params
            .stop
            .iter()
            .map(|s| s.chars().count())
            .max()
            .unwrap_or(0);
        Self {
            strings,
            automaton,
            holdback_chars: if params.include_stop_str_in_output {
                0
            } else {
                longest.saturating_sub(1)
            },
            include_stop: params.include_stop_str_in_output,
        }
    }

    fn start(&self) -> Option<StateID> {
        self.automaton
            .as_ref()
            .and_then(|a| a.start_state(Anchored::No).ok())
    }

    /// Feed `piece`, which sits at byte `at` of the sequence's text, advancing `state`.
    /// Returns the earliest-starting stop string that ends inside `piece` (at equal starts
    /// the first in the request's list) as (start byte, index in `strings`).
    fn feed(&self, state: &mut Option<StateID>, piece: &str, at: usize) -> Option<(usize, usize)> {
        let (Some(a), Some(sid)) = (self.automaton.as_ref(), state.as_mut()) else {
            return None;
        };
        let mut best: Option<(usize, usize)> = None;
        for (i, &b) in piece.as_bytes().iter().enumerate() {
            *sid = a.next_state(Anchored::No, *sid, b);
            if a.is_match(*sid) {
                let end = at + i + 1;
                for k in 0..a.match_len(*sid) {
                    let pid = a.match_pattern(*sid, k);
                    let found = (end - a.pattern_len(pid), pid.as_usize());
                    if best.is_none_or(|b| found < b) {
                        best = Some(found);
                    }
                }
            }
        }
        best
    }
}

/// Text state of one sequence. `process` returns the delta to emit and whether a stop
/// string ended the sequence (the caller then aborts it in the core).
pub struct SeqOutput {
    index: usize,
    tokenizer: Option<Arc<Tokenizer>>,
    detok: Option<IncrementalDetokenizer>,
    stops: Arc<StopStrings>,
    /// Where the stop-string automaton stands after the text so far.
    stop_state: Option<StateID>,
    /// All text produced so far (after stop handling) and how much of it was emitted.
    text: String,
    emitted: usize,
    /// Characters in `text[emitted..]`, so that the holdback is found without rescanning.
    pending_chars: usize,
    pub finished: bool,
}

impl SeqOutput {
    pub fn new(
        index: usize,
        tokenizer: Option<Arc<Tokenizer>>,
        prompt_ids: &[u32],
        params: &SamplingParams,
    ) -> Self {
        Self::with_stops(
            index,
            tokenizer,
            prompt_ids,
            params,
            Arc::new(StopStrings::new(params)),
        )
    }

    /// The `n` sequences of one request, sharing one compiled set of stop strings.
    pub fn for_request(
        n: usize,
        tokenizer: Option<Arc<Tokenizer>>,
        prompt_ids: &[u32],
        params: &SamplingParams,
    ) -> Vec<Self> {
        let stops = Arc::new(StopStrings::new(params));
        (0..n)
            .map(|i| Self::with_stops(i, tokenizer.clone(), prompt_ids, params, stops.clone()))
            .collect()
    }

    fn with_stops(
        index: usize,
        tokenizer: Option<Arc<Tokenizer>>,
        prompt_ids: &[u32],
        params: &SamplingParams,
        stops: Arc<StopStrings>,
    ) -> Self {
        let detok = tokenizer
            .as_ref()
            .map(|_| IncrementalDetokenizer::new(prompt_ids, params.skip_special_tokens));
        Self {
            index,
            tokenizer,
            detok,
            stop_state: stops.start(),
            stops,
            text: String::new(),
            emitted: 0,
            pending_chars: 0,
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
        if let (Some(tok), Some(mut detok)) = (self.tokenizer.clone(), self.detok.take()) {
            let n = out.new_token_ids.len();
            for (j, &id) in out.new_token_ids.iter().enumerate() {
                // As vLLM: the text of the token that stopped the sequence (EOS or one of
                // stop_token_ids) is not part of the output unless include_stop_str_in_output;
                // the id stays in token_ids.
                if j + 1 == n && out.stop_token.is_some() && !self.stops.include_stop {
                    break;
                }
                let piece = detok.push(&tok, id).unwrap_or_default();
                if let Some(k) = self.push_piece(&piece) {
                    delta.finish_reason = Some(FinishReason::Stop);
                    delta.stop_reason = Some(StopReason::Str(self.stops.strings[k].clone()));
                    stopped_by_string = true;
                    break;
                }
            }
            self.detok = Some(detok);
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

    /// Append one token's text and look for a stop string ending in it. On a match the
    /// text is cut at the stop string (after it with include_stop_str_in_output) and the
    /// string's index in `StopStrings::strings` is returned.
    fn push_piece(&mut self, piece: &str) -> Option<usize> {
        let at = self.text.len();
        self.text.push_str(piece);
        self.pending_chars += piece.chars().count();
        let (pos, k) = self.stops.feed(&mut self.stop_state, piece, at)?;
        let cut = if self.stops.include_stop {
            pos + self.stops.strings[k].len()
        } else {
            pos
        };
        self.text.truncate(cut);
        Some(k)
    }

    /// All text so far (for offline results).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The text not yet emitted, minus a tail that could still turn into a stop string.
    /// Only the characters emitted now are walked, so streaming stays linear in the text.
    fn take_emittable(&mut self, finished: bool) -> String {
        let hold = self.stops.holdback_chars;
        let end = if finished || hold == 0 {
            self.text.len()
        } else if self.pending_chars <= hold {
            return String::new();
        } else {
            let emit = self.pending_chars - hold;
            self.text[self.emitted..]
                .char_indices()
                .nth(emit)
                .map_or(self.text.len(), |(i, _)| self.emitted + i)
        };
        if end <= self.emitted {
            return String::new();
        }
        let s = self.text[self.emitted..end].to_string();
        self.pending_chars = self.pending_chars.saturating_sub(s.chars().count());
        self.emitted = end;
        s
    }
}

#[cfg(test)]
mod tests;
