//! Chat messages rendered as a request's are: a model's real template (the tiny fixture
//! tokenizers', both the tokenizer.json kind and the GGUF kind), generation prompt or
//! continue-final-message, bounded by the
//! server's prompt limit, then tokenized. Structured input (`arbitrary`): the fuzzer
//! spends its time on roles and contents, not on JSON syntax.
#![no_main]
use std::sync::OnceLock;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use rvllm::server::chat::{render_chat, ChatPrompt};
use rvllm::server::limits::PromptBound;
use rvllm::server::validate::{ChatTurn, CHAT_ROLES};
use rvllm::tokenizer::Tokenizer;

/// SmolLM2's context: the render cap and the prompt bound follow from it.
const MAX_MODEL_LEN: usize = 2048;

#[derive(Debug, Arbitrary)]
struct Turn {
    role: u8,
    content: String,
}

#[derive(Debug, Arbitrary)]
struct Input {
    tokenizer: bool,
    add_generation_prompt: bool,
    continue_final_message: bool,
    add_special_tokens: bool,
    turns: Vec<Turn>,
}

fn tokenizers() -> &'static [Tokenizer; 2] {
    static T: OnceLock<[Tokenizer; 2]> = OnceLock::new();
    T.get_or_init(|| {
        let dir = rvllm_fuzz::repo_fixture("tiny/llama3");
        let hf = Tokenizer::from_file(
            &dir.join("tokenizer.json"),
            Some(&dir.join("tokenizer_config.json")),
        )
        .expect("the fixture tokenizer loads");
        let spm = rvllm_fuzz::spm_fixture_tokenizer();
        assert!(hf.chat_template().is_some() && spm.chat_template().is_some());
        [hf, spm]
    })
}

fuzz_target!(|input: Input| {
    let tok = &tokenizers()[input.tokenizer as usize];
    let turns: Vec<ChatTurn> = input
        .turns
        .into_iter()
        .map(|t| ChatTurn {
            role: CHAT_ROLES[t.role as usize % CHAT_ROLES.len()].to_string(),
            content: t.content,
            extra: Default::default(),
        })
        .collect();
    let prompt = ChatPrompt {
        turns: &turns,
        template: None,
        template_kwargs: &Default::default(),
        add_generation_prompt: input.add_generation_prompt,
        continue_final_message: input.continue_final_message,
        add_special_tokens: input.add_special_tokens,
    };
    let r = render_chat(
        Some(tok),
        &prompt,
        &PromptBound::new(Some(tok), MAX_MODEL_LEN),
    );
    if let Err(e) = r {
        assert!(e.status.is_client_error(), "{}: {}", e.status, e.message);
    }
});
