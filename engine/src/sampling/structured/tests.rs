//! The matcher on a small byte-level BPE built here (every byte a token, a few merges, two
//! specials): masks, end of sequence, errors. SmolLM2 runs in tests/tests/structured_output.rs.
use serde_json::json;

use super::*;

const EOS: u32 = 1;

fn tokenizer() -> tokenizers::Tokenizer {
    let mut alphabet: Vec<String> = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet()
        .into_iter()
        .map(|c| c.to_string())
        .collect();
    alphabet.sort();
    let mut vocab = serde_json::Map::new();
    for (i, s) in ["<s>", "</s>"].iter().enumerate() {
        vocab.insert(s.to_string(), json!(i));
    }
    for t in alphabet
        .iter()
        .chain(["ab".to_string(), "Ġb".to_string()].iter())
    {
        let n = vocab.len();
        vocab.insert(t.clone(), json!(n));
    }
    let special = |id: u32, s: &str| {
        json!({"id": id, "content": s, "single_word": false,
        "lstrip": false, "rstrip": false, "normalized": false, "special": true})
    };
    let doc = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(0, "<s>"), special(1, "</s>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": [["a", "b"], ["Ġ", "b"]]}
    });
    tokenizers::Tokenizer::from_bytes(serde_json::to_vec(&doc).unwrap()).unwrap()
}

/// The structured outputs of that tokenizer for a model with 8 padding logits.
fn outputs() -> (tokenizers::Tokenizer, StructuredOutputs) {
    let tok = tokenizer();
    let vocab = tok.get_vocab_size(true) + 8;
    let so = StructuredOutputs::new(&tok, &[EOS], vocab).unwrap();
    (tok, so)
}

fn allowed(m: &mut GrammarMatcher, vocab: usize) -> Vec<u32> {
    let mut words = vec![0u32; bitmask_words(vocab)];
    m.fill_bitmask(&mut words);
    (0..vocab as u32)
        .filter(|&t| words[t as usize / 32] >> (t % 32) & 1 == 1)
        .collect()
}

fn id(tok: &tokenizers::Tokenizer, s: &str) -> u32 {
    tok.token_to_id(s).unwrap_or_else(|| panic!("no token {s}"))
}

#[test]
fn choice_allows_each_prefix_then_only_eos() {
    let (tok, so) = outputs();
    let vocab = so.vocab_size();
    let mut m = so
        .matcher(&StructuredOutput::Choice(vec!["ab".into(), "c".into()]))
        .unwrap();
    let first = allowed(&mut m, vocab);
    // "a", "ab" and "c" start a choice; nothing else does, and the grammar cannot end yet.
    let mut want = vec![id(&tok, "a"), id(&tok, "ab"), id(&tok, "c")];
    want.sort();
    assert_eq!(first, want);
    m.accept(id(&tok, "ab"));
    assert_eq!(allowed(&mut m, vocab), vec![EOS]);
    assert!(m.is_finished());
}

#[test]
fn regex_allows_eos_only_when_it_accepts() {
    let (tok, so) = outputs();
    let vocab = so.vocab_size();
    let mut m = so
        .matcher(&StructuredOutput::Regex("[0-9]{1,2}".into()))
        .unwrap();
    let first = allowed(&mut m, vocab);
    assert!(!first.contains(&EOS), "an empty match is not accepted");
    assert!(first.contains(&id(&tok, "7")));
    m.accept(id(&tok, "7"));
    let next = allowed(&mut m, vocab);
    assert!(next.contains(&EOS) && next.contains(&id(&tok, "3")));
    assert!(!next.contains(&id(&tok, "a")));
    m.accept(id(&tok, "3"));
    assert_eq!(allowed(&mut m, vocab), vec![EOS]);
}

#[test]
fn json_schema_is_compact_and_padding_ids_are_never_allowed() {
    let (tok, so) = outputs();
    let vocab = so.vocab_size();
    let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}},
        "required": ["a"], "additionalProperties": false});
    let mut m = so.matcher(&StructuredOutput::JsonSchema(schema)).unwrap();
    let ids = tok.encode("{\"a\": 12}", false).unwrap().get_ids().to_vec();
    for (i, &t) in ids.iter().enumerate() {
        let mask = allowed(&mut m, vocab);
        assert!(
            mask.contains(&t),
            "token {i} of the compact form is allowed"
        );
        assert!(mask
            .iter()
            .all(|&t| (t as usize) < tok.get_vocab_size(true)));
        assert!(!mask.contains(&id(&tok, "Ċ")), "no newline anywhere");
        m.accept(t);
    }
    assert_eq!(allowed(&mut m, vocab), vec![EOS]);
    // Without the space after the colon the layout is refused.
    let mut m = so
        .matcher(&StructuredOutput::JsonSchema(json!({"type": "object"})))
        .unwrap();
    for t in tok.encode("{\"a\":", false).unwrap().get_ids() {
        m.accept(*t);
    }
    assert_eq!(allowed(&mut m, vocab), vec![id(&tok, "Ġ")]);
}

#[test]
fn bad_specs_are_errors_naming_the_problem() {
    let (_, so) = outputs();
    let err = so
        .check(&StructuredOutput::Regex("(unclosed".into()))
        .unwrap_err();
    assert!(!err.is_empty());
    let err = so
        .check(&StructuredOutput::Grammar("start: undefined_rule".into()))
        .unwrap_err();
    assert!(err.contains("undefined_rule"), "{err}");
    let err = so
        .check(&StructuredOutput::JsonSchema(
            json!({"type": "no-such-type"}),
        ))
        .unwrap_err();
    assert!(err.contains("no-such-type"), "{err}");
    assert!(so.check(&StructuredOutput::Choice(vec![])).is_err());
    // Errors are cached like grammars: asking again gives the same answer.
    assert!(so
        .check(&StructuredOutput::Regex("(unclosed".into()))
        .is_err());
    assert!(so.check(&StructuredOutput::JsonObject).is_ok());
}

#[test]
fn a_failed_matcher_allows_only_eos() {
    let (tok, so) = outputs();
    let vocab = so.vocab_size();
    let mut m = so.matcher(&StructuredOutput::Regex("a+".into())).unwrap();
    m.accept(id(&tok, "c"));
    assert!(m.is_finished());
    assert_eq!(allowed(&mut m, vocab), vec![EOS]);
}

/// `min_tokens` masks end of sequence, but a finished grammar allows nothing else: the
/// grammar's end wins (never token 0 from an all -inf row).
#[test]
fn a_finished_grammar_ends_the_request_before_min_tokens() {
    let (tok, so) = outputs();
    let vocab = so.vocab_size();
    let spec = StructuredOutput::Choice(vec!["ab".into()]);
    let params = SamplingParams {
        min_tokens: 8,
        structured_output: Some(spec.clone()),
        ..SamplingParams::greedy(16)
    };
    let mut s = crate::sampling::SeqSampler::for_request(&params, &[], &[EOS], Some(&so), vocab);
    let mut logits = vec![0.0f32; vocab];
    logits[id(&tok, "ab") as usize] = 1.0;
    let (first, _) = s.sample(&mut logits, 0);
    assert_eq!(first, id(&tok, "ab"));
    s.record_output(first);
    let mut logits = vec![0.0f32; vocab];
    let (next, _) = s.sample(&mut logits, 1);
    assert_eq!(next, EOS, "only end of sequence is left");
}
