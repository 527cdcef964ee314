//! Incremental detokenization for streaming: text grows token by token, and nothing is
//! emitted until it is final.
//!
//! Decoding a single token is wrong in general (byte-level BPE splits UTF-8 characters
//! across tokens; SentencePiece drops a leading space at the start of a decode). So we keep a
//! short window of ids: `prefix..read` is text already emitted, `read..` is pending. Each push
//! decodes the window with and without the pending ids; the difference is new text unless it
//! ends in U+FFFD (an incomplete character), in which case we wait for more tokens.
use anyhow::Result;

use super::Tokenizer;

/// How many prompt tokens seed the window, so the first generated token decodes in context.
const PROMPT_CONTEXT: usize = 5;

#[derive(Debug, Clone)]
pub struct IncrementalDetokenizer {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    skip_special_tokens: bool,
    text: String,
}

impl IncrementalDetokenizer {
    pub fn new(prompt_ids: &[u32], skip_special_tokens: bool) -> Self {
        let ctx = &prompt_ids[prompt_ids.len().saturating_sub(PROMPT_CONTEXT)..];
        IncrementalDetokenizer {
            ids: ctx.to_vec(),
            prefix_offset: 0,
            read_offset: ctx.len(),
            skip_special_tokens,
            text: String::new(),
        }
    }

    /// Add one generated token; returns the text that became final (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, token_id: u32) -> Result<String> {
        self.ids.push(token_id);
        let skip = self.skip_special_tokens;
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], skip)?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..], skip)?;
        if full.len() <= prefix.len() || full.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let delta = new_suffix(&prefix, &full).to_string();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        self.text.push_str(&delta);
        Ok(delta)
    }

    /// Emit whatever is still held back (an incomplete character becomes U+FFFD): call when
    /// the sequence ends.
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<String> {
        if self.read_offset == self.ids.len() {
            return Ok(String::new());
        }
        let skip = self.skip_special_tokens;
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], skip)?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..], skip)?;
        let delta = if full.len() > prefix.len() {
            new_suffix(&prefix, &full).to_string()
        } else {
            String::new()
        };
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        self.text.push_str(&delta);
        Ok(delta)
    }

    /// All output text emitted so far.
    pub fn text(&self) -> &str {
        &self.text
    }
}

/// The part of `full` after `prefix`. Normally `full` starts with `prefix`; if a decoder
/// rewrote the boundary, fall back to the longest common prefix (on a char boundary).
fn new_suffix<'a>(prefix: &str, full: &'a str) -> &'a str {
    if let Some(rest) = full.strip_prefix(prefix) {
        return rest;
    }
    let common = prefix
        .char_indices()
        .zip(full.chars())
        .take_while(|((_, a), b)| a == b)
        .last()
        .map(|((i, c), _)| i + c.len_utf8())
        .unwrap_or(0);
    &full[common..]
}

#[cfg(test)]
mod tests {
    use super::new_suffix;

    #[test]
    fn suffix_on_char_boundaries() {
        assert_eq!(new_suffix("ab", "abc"), "c");
        assert_eq!(new_suffix("", "xé"), "xé");
        assert_eq!(new_suffix("aé", "aè!"), "è!");
    }
}
