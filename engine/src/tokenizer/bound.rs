//! A lower bound on a text's token count that needs no tokenization: no token stands for
//! more than `bytes_per_token` bytes of the text, so a text of B bytes is at least
//! B / bytes_per_token tokens. The server refuses a prompt this already puts past the
//! context length without tokenizing it (tokenizing 15 MB takes seconds and gigabytes).
//!
//! The bound must never refuse a prompt that fits, so it is given only for pipelines where
//! it provably holds, and is None otherwise:
//! - the model is a BPE through which every character of the text reaches a token: its
//!   byte-level alphabet or byte-fallback tokens cover every byte, or each unknown character
//!   gets its own unknown token (a fused unknown token could stand for any length). A
//!   byte-level vocabulary that lacks a few bytes (SmolLM2's lacks some control characters)
//!   drops them from the text: those bytes are not counted;
//! - no normalizer or pre-tokenizer deletes text (Strip, BertNormalizer, Whitespace, ...),
//!   and the ones that shorten it do so by a bounded factor (Unicode normalization and
//!   lowercasing by at most 4: a 4-byte character becomes a 1-byte one);
//! - no truncation is configured.
//!
//! A token's length is that of its vocabulary string: in bytes of the normalized text, or
//! in characters under a byte-level pre-tokenizer, whose characters each stand for one byte.
//! Added (special) tokens count with their content's bytes.
use serde_json::Value;
use tokenizers::ModelWrapper;

/// Factor by which Unicode normalization or case folding can shorten UTF-8 text
/// (U+1D400 MATHEMATICAL BOLD CAPITAL A, 4 bytes, becomes "A" under NFKC).
const UNICODE_SHRINK: usize = 4;

/// The fewest tokens a text can become, from its bytes alone.
#[derive(Debug, Clone)]
pub struct TokenBound {
    bytes_per_token: usize,
    /// Bytes the model drops (a byte-level vocabulary without them, and no unknown token).
    dropped: Option<Box<[bool; 256]>>,
}

impl TokenBound {
    /// The most bytes of text one token stands for.
    pub fn bytes_per_token(&self) -> usize {
        self.bytes_per_token
    }

    /// Whether every byte of a text reaches a token, so that its length alone bounds its
    /// token count.
    pub fn keeps_every_byte(&self) -> bool {
        self.dropped.is_none()
    }

    /// A lower bound on the number of tokens `text` encodes to (one pass over its bytes).
    pub fn min_tokens(&self, text: &str) -> usize {
        let kept = match &self.dropped {
            None => text.len(),
            Some(d) => text.bytes().filter(|&b| !d[b as usize]).count(),
        };
        kept.div_ceil(self.bytes_per_token)
    }
}

/// The bound for this tokenizer, or None when its pipeline gives none.
pub(crate) fn token_bound(tok: &tokenizers::Tokenizer) -> Option<TokenBound> {
    if tok.get_truncation().is_some() {
        return None;
    }
    let shrink = match tok.get_normalizer() {
        None => 1,
        Some(n) => normalizer_shrink(&serde_json::to_value(n).ok()?)?,
    };
    let pre = match tok.get_pre_tokenizer() {
        None => None,
        Some(p) => Some(serde_json::to_value(p).ok()?),
    };
    if let Some(p) = &pre {
        if !pre_tokenizer_keeps_text(p)? {
            return None;
        }
    }
    let byte_level = pre.as_ref().is_some_and(has_byte_level);
    let ModelWrapper::BPE(bpe) = tok.get_model() else {
        return None;
    };
    if bpe.continuing_subword_prefix.is_some() || bpe.end_of_word_suffix.is_some() {
        return None;
    }
    let vocab = bpe.get_vocab();
    let byte_fallback =
        bpe.byte_fallback && (0..=255u8).all(|b| vocab.contains_key(&format!("<{b:#04X}>")));
    // An unknown token for each unknown character: a character is at most 4 bytes.
    let unk_per_char = bpe.unk_token.is_some() && !bpe.fuse_unk;
    let mut dropped = None;
    if !(byte_fallback || unk_per_char) {
        if !byte_level {
            return None;
        }
        let alphabet = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet();
        let mut lost = Box::new([false; 256]);
        for b in 0..=255u8 {
            let c = byte_level_char(b)?;
            if !alphabet.contains(&c) {
                return None;
            }
            lost[b as usize] = !vocab.contains_key(&c.to_string());
        }
        if lost.iter().any(|&l| l) {
            // Lost bytes are dropped only without an unknown token (a fused one could stand
            // for any run of them), and can be counted on the text only when no normalizer
            // changes it first.
            if bpe.unk_token.is_some() || shrink != 1 {
                return None;
            }
            dropped = Some(lost);
        }
    }
    let token_len = |s: &String| {
        if byte_level {
            s.chars().count()
        } else {
            s.len()
        }
    };
    let longest_model_token = vocab.keys().map(token_len).max().unwrap_or(0);
    let longest_added = tok
        .get_added_tokens_decoder()
        .values()
        .map(|t| t.content.len())
        .max()
        .unwrap_or(0);
    let unk = if unk_per_char { 4 } else { 0 };
    let longest = longest_model_token.max(longest_added).max(unk).max(1);
    Some(TokenBound {
        bytes_per_token: longest.checked_mul(shrink)?,
        dropped,
    })
}

/// GPT-2's byte-to-character map, which the byte-level pre-tokenizer applies: printable
/// Latin-1 bytes stand for themselves, the other 68 for U+0100 onwards in byte order.
fn byte_level_char(b: u8) -> Option<char> {
    let printable = |x: u8| (b'!'..=b'~').contains(&x) || (0xA1..=0xAC).contains(&x) || x >= 0xAE;
    if printable(b) {
        return char::from_u32(b as u32);
    }
    let rank = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + rank)
}

/// How many times shorter (in bytes) a normalizer can make a text; None when it can delete
/// text or is unknown.
fn normalizer_shrink(n: &Value) -> Option<usize> {
    match n.get("type")?.as_str()? {
        "Sequence" => n
            .get("normalizers")?
            .as_array()?
            .iter()
            .try_fold(1usize, |acc, x| acc.checked_mul(normalizer_shrink(x)?)),
        "Prepend" | "ByteLevel" => Some(1),
        "NFC" | "NFD" | "NFKC" | "NFKD" | "Lowercase" => Some(UNICODE_SHRINK),
        "Replace" => {
            let pattern = n.get("pattern")?.get("String")?.as_str()?;
            let content = n.get("content")?.as_str()?;
            if content.is_empty() {
                return None;
            }
            Some(pattern.len().div_ceil(content.len()).max(1))
        }
        _ => None,
    }
}

/// Whether every byte of the text survives pre-tokenization (Some(false): some is removed;
/// None: a kind this bound does not know).
fn pre_tokenizer_keeps_text(p: &Value) -> Option<bool> {
    Some(match p.get("type")?.as_str()? {
        "Sequence" => {
            for x in p.get("pretokenizers")?.as_array()? {
                if !pre_tokenizer_keeps_text(x)? {
                    return Some(false);
                }
            }
            true
        }
        "ByteLevel" | "Metaspace" | "Digits" | "UnicodeScripts" | "FixedLength" => true,
        "Split" | "Punctuation" => p.get("behavior")?.as_str()? != "Removed",
        _ => false,
    })
}

fn has_byte_level(p: &Value) -> bool {
    match p.get("type").and_then(Value::as_str) {
        Some("ByteLevel") => true,
        Some("Sequence") => p
            .get("pretokenizers")
            .and_then(Value::as_array)
            .is_some_and(|v| v.iter().any(has_byte_level)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn fixture(model: &str) -> tokenizers::Tokenizer {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/tiny")
            .join(model)
            .join("tokenizer.json");
        tokenizers::Tokenizer::from_file(p).unwrap()
    }

    /// Random text of ASCII, spaces, accents, CJK, emoji and the specials' own text.
    fn random_text(rng: &mut StdRng, specials: &[String]) -> String {
        const PARTS: [&str; 13] = [
            "a", "the", " ", "  ", "\n", "é", "e\u{301}", "日本", "😀", "ﬀ", "𝐀", "1234", "\u{4}",
        ];
        let n = rng.random_range(0..200);
        (0..n)
            .map(|_| {
                if !specials.is_empty() && rng.random_bool(0.05) {
                    specials[rng.random_range(0..specials.len())].clone()
                } else {
                    PARTS[rng.random_range(0..PARTS.len())].to_string()
                }
            })
            .collect()
    }

    fn check_bound(name: &str, tok: &tokenizers::Tokenizer, rng: &mut StdRng) -> TokenBound {
        let bound =
            token_bound(tok).unwrap_or_else(|| panic!("{name}: byte-level BPEs have a bound"));
        let specials: Vec<String> = tok
            .get_added_tokens_decoder()
            .values()
            .map(|t| t.content.clone())
            .collect();
        for _ in 0..300 {
            let text = random_text(rng, &specials);
            let n = tok.encode_fast(text.as_str(), true).unwrap().len();
            assert!(
                n >= bound.min_tokens(&text),
                "{name}: {n} tokens, below the bound {} for {text:?}",
                bound.min_tokens(&text)
            );
        }
        bound
    }

    #[test]
    fn the_bound_holds_for_the_fixture_tokenizers() {
        let mut rng = StdRng::seed_from_u64(3);
        for model in ["llama3", "mistral", "qwen2"] {
            let bound = check_bound(model, &fixture(model), &mut rng);
            assert!(bound.keeps_every_byte(), "{model}");
            assert_eq!(
                bound.min_tokens(&"a".repeat(1000)),
                1000usize.div_ceil(bound.bytes_per_token())
            );
        }
    }

    /// A byte-level vocabulary without some byte (SmolLM2's lacks a few control characters)
    /// loses that byte from the text: the bound does not count it.
    #[test]
    fn bytes_the_vocabulary_lacks_are_not_counted() {
        let mut doc: Value =
            serde_json::from_str(&fixture("llama3").to_string(false).unwrap()).unwrap();
        let lost = byte_level_char(4).unwrap().to_string();
        assert!(doc["model"]["vocab"]
            .as_object_mut()
            .unwrap()
            .remove(&lost)
            .is_some());
        let tok: tokenizers::Tokenizer = doc.to_string().parse().unwrap();
        let bound = check_bound("llama3 without byte 4", &tok, &mut StdRng::seed_from_u64(5));
        assert!(!bound.keeps_every_byte());
        let text = "\u{4}".repeat(10_000);
        assert_eq!(tok.encode_fast(text.as_str(), false).unwrap().len(), 0);
        assert_eq!(bound.min_tokens(&text), 0);
        assert_eq!(bound.min_tokens(&format!("{text}ab")), 1);
    }

    #[test]
    fn the_byte_map_is_gpt2s() {
        let alphabet = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet();
        let mine: std::collections::HashSet<char> =
            (0..=255u8).map(|b| byte_level_char(b).unwrap()).collect();
        assert_eq!(mine.len(), 256);
        assert!(mine.iter().all(|c| alphabet.contains(c)));
        assert_eq!(byte_level_char(b' '), Some('Ġ'));
        assert_eq!(byte_level_char(b'\n'), Some('Ċ'));
        assert_eq!(byte_level_char(b'a'), Some('a'));
    }

    /// The normalizers and pre-tokenizers that drop text, and the models that fuse or drop
    /// unknown text, get no bound; those that only grow or shrink it boundedly keep one.
    #[test]
    fn pipelines_that_can_lose_text_get_no_bound() {
        let base: Value =
            serde_json::from_str(&fixture("llama3").to_string(false).unwrap()).unwrap();
        let with = |f: &dyn Fn(&mut Value)| {
            let mut doc = base.clone();
            f(&mut doc);
            let tok: tokenizers::Tokenizer = doc.to_string().parse().unwrap();
            token_bound(&tok).map(|b| b.bytes_per_token())
        };
        let plain = with(&|_| {}).unwrap();
        assert_eq!(
            with(&|d| d["normalizer"] = serde_json::json!({"type": "NFKC"})),
            Some(plain * 4)
        );
        assert_eq!(
            with(
                &|d| d["normalizer"] = serde_json::json!({"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "▁"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]})
            ),
            Some(plain)
        );
        for n in [
            serde_json::json!({"type": "Strip", "strip_left": true, "strip_right": true}),
            serde_json::json!({"type": "Replace", "pattern": {"String": "x"}, "content": ""}),
            serde_json::json!({"type": "Replace", "pattern": {"Regex": "x+"}, "content": "y"}),
        ] {
            assert_eq!(with(&|d| d["normalizer"] = n.clone()), None, "{n}");
        }
        assert_eq!(
            with(&|d| d["pre_tokenizer"] = serde_json::json!({"type": "WhitespaceSplit"})),
            None
        );
        // Without the byte-level alphabet, unknown characters must each get a token.
        let metaspace = serde_json::json!({"type": "Metaspace", "replacement": "▁",
            "prepend_scheme": "always", "split": true});
        assert_eq!(with(&|d| d["pre_tokenizer"] = metaspace.clone()), None);
        assert!(with(&|d| {
            d["pre_tokenizer"] = metaspace.clone();
            d["model"]["unk_token"] = "<|endoftext|>".into();
            d["model"]["fuse_unk"] = false.into();
        })
        .is_some());
        assert_eq!(
            with(&|d| {
                d["pre_tokenizer"] = metaspace.clone();
                d["model"]["unk_token"] = "<|endoftext|>".into();
                d["model"]["fuse_unk"] = true.into();
            }),
            None
        );
        assert_eq!(
            with(
                &|d| d["truncation"] = serde_json::json!({"direction": "Right", "max_length": 8,
                "strategy": "LongestFirst", "stride": 0})
            ),
            None
        );
    }
}
