//! The tokenizer as llguidance sees it: each token id's bytes in a `TokTrie`.
//!
//! Built once per tokenizer from its `tokenizer.json` form (byte-level BPE and SentencePiece
//! byte-fallback vocabularies; llguidance's own reader). Special tokens get llguidance's
//! 0xFF marker, so grammar text never matches them; ids the tokenizer lacks (a model's padded
//! vocabulary) get no bytes and are never allowed. The end-of-sequence ids are the model's.
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};

/// The token bytes of `tokenizer`, one entry per id up to `model_vocab` (or the tokenizer's
/// own size, when larger).
pub fn token_bytes(tokenizer: &tokenizers::Tokenizer, model_vocab: usize) -> Result<Vec<Vec<u8>>> {
    let json: serde_json::Value = serde_json::from_str(
        &tokenizer
            .to_string(false)
            .map_err(|e| anyhow!("cannot serialize the tokenizer: {e}"))?,
    )
    .context("the tokenizer's JSON form")?;
    // llguidance's reader asserts on vocabularies it does not expect; such a tokenizer
    // must give an error (structured output refused), never a panic.
    let mut words = std::panic::catch_unwind(|| llguidance::token_bytes_from_tokenizer_json(&json))
        .map_err(|_| anyhow!("the tokenizer's vocabulary has a form llguidance cannot read"))?
        .context("reading the tokenizer's token bytes")?;
    let size = model_vocab.max(words.len());
    words.resize(size, Vec::new());
    Ok(words)
}

/// The llguidance tokenizer environment for these token bytes and end-of-sequence ids.
/// Tokenization inside the grammar (rarely needed for masks) is the trie's greedy one, so
/// the environment says it is not canonical and llguidance never forces tokens from it.
pub fn tok_env(words: &[Vec<u8>], eos_token_ids: &[u32]) -> Result<TokEnv> {
    let Some(&first_eos) = eos_token_ids.first() else {
        bail!("the model has no end-of-sequence token, so a constrained output could never end");
    };
    let vocab_size = u32::try_from(words.len()).context("vocabulary size")?;
    if let Some(bad) = eos_token_ids.iter().find(|&&t| t >= vocab_size) {
        bail!("end-of-sequence id {bad} is outside the vocabulary ({vocab_size} tokens)");
    }
    let info = TokRxInfo::new(vocab_size, first_eos);
    let trie = TokTrie::from(&info, words).with_eos_tokens(eos_token_ids);
    Ok(Arc::new(ApproximateTokEnv::new(trie)))
}
