//! The incremental detokenizer that streams text: prompt ids seed its window, then token ids
//! arrive one by one (valid, special, or out of the vocabulary), then the sequence ends. Two
//! real tokenizers: byte-level BPE (tokenizer.json) and SentencePiece with byte fallback
//! (GGUF). What it emits must add up to what it says it emitted.
#![no_main]
use std::sync::OnceLock;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use rvllm::tokenizer::{IncrementalDetokenizer, Tokenizer};

#[derive(Debug, Arbitrary)]
struct Input {
    tokenizer: bool,
    skip_special_tokens: bool,
    prompt: Vec<u16>,
    generated: Vec<u16>,
}

fn tokenizers() -> &'static [Tokenizer; 2] {
    static T: OnceLock<[Tokenizer; 2]> = OnceLock::new();
    T.get_or_init(|| {
        let dir = rvllm_fuzz::repo_fixture("tiny/llama3");
        let hf = Tokenizer::from_file(&dir.join("tokenizer.json"), None)
            .expect("the fixture tokenizer loads");
        let spm = rvllm_fuzz::spm_fixture_tokenizer();
        [hf, spm]
    })
}

fuzz_target!(|input: Input| {
    let tok = &tokenizers()[input.tokenizer as usize];
    // Mostly in-vocabulary ids, with a few past the end (a model whose vocabulary is larger
    // than its tokenizer's emits those).
    let span = tok.vocab_size() as u32 + 4;
    let id = |x: u16| x as u32 % span;
    let prompt: Vec<u32> = input.prompt.iter().map(|&x| id(x)).collect();
    let mut d = IncrementalDetokenizer::new(&prompt, input.skip_special_tokens);
    let mut emitted = String::new();
    for &x in input.generated.iter().take(256) {
        match d.push(tok, id(x)) {
            Ok(delta) => emitted.push_str(&delta),
            Err(_) => return,
        }
    }
    if let Ok(rest) = d.finish(tok) {
        emitted.push_str(&rest);
        assert_eq!(emitted, d.text(), "the deltas do not add up to the text");
    }
});
