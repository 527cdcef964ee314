//! Tokenizer tests on a small byte-level BPE built here (the SmolLM2 tokenizer is tested in
//! tests/tests/loading.rs against reference ids).
use std::path::Path;

use serde_json::json;

use super::*;

/// A byte-level BPE: every byte is a token, plus "ab" and "Ġb" merges and three specials.
fn write_tokenizer(dir: &Path, config: Option<serde_json::Value>) -> Tokenizer {
    let mut alphabet: Vec<String> = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet()
        .into_iter()
        .map(|c| c.to_string())
        .collect();
    alphabet.sort();
    let mut vocab = serde_json::Map::new();
    for (i, s) in ["<s>", "</s>", "<|im_end|>"].iter().enumerate() {
        vocab.insert(s.to_string(), json!(i));
    }
    for t in alphabet
        .iter()
        .chain(["ab".to_string(), "Ġb".to_string()].iter())
    {
        let n = vocab.len();
        vocab.insert(t.clone(), json!(n));
    }
    let doc = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [
            {"id": 0, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 1, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 2, "content": "<|im_end|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
        ],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [0], "tokens": ["<s>"]}}},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": [["a", "b"], ["Ġ", "b"]]}
    });
    let tj = dir.join("tokenizer.json");
    std::fs::write(&tj, serde_json::to_string(&doc).unwrap()).unwrap();
    let cfg_path = dir.join("tokenizer_config.json");
    if let Some(c) = &config {
        std::fs::write(&cfg_path, c.to_string()).unwrap();
    }
    Tokenizer::from_file(&tj, config.is_some().then_some(cfg_path.as_path())).unwrap()
}

#[test]
fn encode_decode_and_special_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let tok = write_tokenizer(
        dir.path(),
        Some(json!({"bos_token": "<s>", "eos_token": {"content": "<|im_end|>"}})),
    );
    let ab = tok.token_to_id("ab").unwrap();
    let sp_b = tok.token_to_id("Ġb").unwrap();
    assert_eq!(tok.encode("ab b", false).unwrap(), vec![ab, sp_b]);
    assert_eq!(tok.encode("ab b", true).unwrap(), vec![0, ab, sp_b]);
    assert_eq!(tok.encode("<|im_end|>ab", false).unwrap(), vec![2, ab]);
    assert_eq!(
        tok.decode(&[0, ab, sp_b, 2], false).unwrap(),
        "<s>ab b<|im_end|>"
    );
    assert_eq!(tok.decode(&[0, ab, sp_b, 2], true).unwrap(), "ab b");
    assert_eq!(tok.eos_token_id(), Some(2));
    assert_eq!(tok.bos_token(), Some("<s>"));
    assert_eq!(tok.id_to_token(ab).as_deref(), Some("ab"));
    assert_eq!(tok.vocab_size(), 3 + 256 + 2);
    // Non-ASCII text round-trips through the byte alphabet.
    let ids = tok.encode("héllo 日本", false).unwrap();
    assert_eq!(tok.decode(&ids, false).unwrap(), "héllo 日本");
}

#[test]
fn chat_template_from_list_and_from_jinja_file() {
    let dir = tempfile::tempdir().unwrap();
    let tok = write_tokenizer(
        dir.path(),
        Some(json!({"eos_token": "</s>", "chat_template": [
            {"name": "tool_use", "template": "TOOLS"},
            {"name": "default", "template": "{% for m in messages %}<{{ m.role }}>{{ m.content }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"}
        ]})),
    );
    let msgs = [ChatMessage::new("user", "hi")];
    assert_eq!(
        tok.apply_chat_template(&msgs, true, None).unwrap(),
        "<user>hi</s><assistant>"
    );
    assert_eq!(
        tok.apply_chat_template(&msgs, false, Some("{{ messages[0].content | upper }}"))
            .unwrap(),
        "HI"
    );

    // transformers 5 writes the template to chat_template.jinja.
    let dir2 = tempfile::tempdir().unwrap();
    std::fs::write(
        dir2.path().join("chat_template.jinja"),
        "[{{ messages | length }}]",
    )
    .unwrap();
    let tok2 = write_tokenizer(dir2.path(), None);
    assert_eq!(tok2.apply_chat_template(&msgs, false, None).unwrap(), "[1]");

    // No template at all: a clear error.
    let dir3 = tempfile::tempdir().unwrap();
    let tok3 = write_tokenizer(dir3.path(), None);
    let e = tok3
        .apply_chat_template(&msgs, true, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no chat template"), "{e}");
}

#[test]
fn incremental_detokenizer_holds_back_split_characters() {
    let dir = tempfile::tempdir().unwrap();
    let tok = write_tokenizer(dir.path(), None);
    // "é" is two bytes, "日" three: each is split over byte tokens.
    let text = "ab é日 b!";
    let ids = tok.encode(text, false).unwrap();
    assert!(ids.len() > 6);
    let prompt = tok.encode("ab", false).unwrap();
    let mut d = IncrementalDetokenizer::new(&prompt, false);
    let mut pieces = Vec::new();
    for &id in &ids {
        let piece = d.push(&tok, id).unwrap();
        assert!(
            !piece.contains('\u{FFFD}'),
            "emitted a broken character: {piece:?}"
        );
        pieces.push(piece);
    }
    assert_eq!(pieces.concat(), text);
    assert_eq!(d.text(), text);
    // The second byte of "é" completes it: the first byte alone emits nothing.
    let e_start = pieces.iter().position(|p| p.contains('é')).unwrap();
    assert_eq!(pieces[e_start - 1], "");
    assert_eq!(d.finish(&tok).unwrap(), "");

    // An unfinished character at the end comes out on finish().
    let mut d = IncrementalDetokenizer::new(&[], false);
    let bytes = tok.encode("日", false).unwrap();
    assert_eq!(d.push(&tok, bytes[0]).unwrap(), "");
    assert_eq!(d.finish(&tok).unwrap(), "\u{FFFD}");
}

#[test]
fn incremental_detokenizer_skips_special_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let tok = write_tokenizer(dir.path(), None);
    let ab = tok.token_to_id("ab").unwrap();
    let mut d = IncrementalDetokenizer::new(&[], true);
    assert_eq!(d.push(&tok, ab).unwrap(), "ab");
    assert_eq!(d.push(&tok, 2).unwrap(), "");
    assert_eq!(d.push(&tok, ab).unwrap(), "ab");
    assert_eq!(d.text(), "abab");
    let mut d = IncrementalDetokenizer::new(&[], false);
    d.push(&tok, ab).unwrap();
    assert_eq!(d.push(&tok, 2).unwrap(), "<|im_end|>");
}

#[test]
fn tokenizer_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Tokenizer>();
    check::<IncrementalDetokenizer>();
}

#[test]
fn missing_or_broken_tokenizer_file_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tokenizer.json");
    let e = Tokenizer::from_file(&p, None).unwrap_err().to_string();
    assert!(e.contains("tokenizer.json"), "{e}");
    std::fs::write(&p, "{not json").unwrap();
    let e = Tokenizer::from_file(&p, None).unwrap_err().to_string();
    assert!(e.contains("tokenizer.json"), "{e}");
}
