//! `rvllm generate`: offline generation for prompts given on the command line or in a JSONL
//! file, printing each completion and a summary line.
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Deserialize;
use serde_json::json;

use super::progress;
use super::sampling_flags::SamplingFlags;
use crate::engine::{EngineArgs, KvCacheDtypeFlag, Llm, RequestOutput};
use crate::sampling::params::bad_words_token_ids;
use crate::tokenizer::{ChatMessage, Tokenizer};

#[derive(Args, Clone, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// A prompt (repeatable).
    #[arg(long = "prompt")]
    pub prompts: Vec<String>,
    /// A JSONL file: each line a string, or {"prompt": ...}, {"messages": [...]} or
    /// {"prompt_token_ids": [...]}.
    #[arg(long)]
    pub prompts_file: Option<PathBuf>,
    /// Apply the model's chat template (each prompt becomes one user message).
    #[arg(long)]
    pub chat: bool,
    /// A chat template file overriding the model's.
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
    #[command(flatten)]
    pub sampling: SamplingFlags,
    /// text (for people) or json (for machines).
    #[arg(long, default_value = "text")]
    pub output: String,
    #[command(flatten)]
    pub kv_cache: KvCacheDtypeFlag,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum PromptLine {
    Text(String),
    Prompt { prompt: String },
    Chat { messages: Vec<ChatMessage> },
    Ids { prompt_token_ids: Vec<u32> },
}

enum PromptInput {
    Text(String),
    Chat(Vec<ChatMessage>),
    Ids(Vec<u32>),
}

pub fn run(args: GenerateArgs) -> Result<()> {
    if args.output != "text" && args.output != "json" {
        bail!("unknown --output `{}`: use text or json", args.output);
    }
    let inputs = collect_inputs(&args)?;
    if inputs.is_empty() {
        bail!("no prompts: pass --prompt \"...\" (repeatable) or --prompts-file F.jsonl");
    }
    let template = match &args.chat_template {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .with_context(|| format!("reading --chat-template {}", p.display()))?,
        ),
        None => None,
    };
    let engine_args = args.kv_cache.apply(&args.engine);
    let mut llm = Llm::new(&engine_args)?;
    let tok = llm.tokenizer();
    let mut prompts = Vec::with_capacity(inputs.len());
    for (i, input) in inputs.iter().enumerate() {
        let ids = tokenize(tok.as_deref(), input, template.as_deref())
            .with_context(|| format!("prompt {i}"))?;
        prompts.push(ids);
    }
    let mut params = args.sampling.to_params();
    if !params.bad_words.is_empty() {
        let tok = tok
            .as_deref()
            .context("--bad-words needs the model's tokenizer, and this model has none")?;
        params.bad_words_token_ids =
            bad_words_token_ids(&params.bad_words, |w| tok.encode(w, false))?;
    }
    let bar = progress::bar(
        prompts.len() as u64,
        "generating",
        args.engine.disable_progress,
    );
    let start = Instant::now();
    let outputs = llm.generate(&prompts, std::slice::from_ref(&params), |done| {
        bar.set_position(done as u64)
    })?;
    bar.finish_and_clear();
    let elapsed = start.elapsed().as_secs_f64();
    print_outputs(&args.output, tok.as_deref(), &outputs, elapsed)
}

fn collect_inputs(args: &GenerateArgs) -> Result<Vec<PromptInput>> {
    let wrap = |s: String| {
        if args.chat {
            PromptInput::Chat(vec![ChatMessage {
                role: "user".into(),
                content: s,
            }])
        } else {
            PromptInput::Text(s)
        }
    };
    let mut inputs: Vec<PromptInput> = args.prompts.iter().cloned().map(wrap).collect();
    if let Some(path) = &args.prompts_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading --prompts-file {}", path.display()))?;
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let parsed: PromptLine = serde_json::from_str(line).with_context(|| {
                format!(
                    "{}:{}: expected a JSON string, {{\"prompt\": ...}}, {{\"messages\": [...]}} or {{\"prompt_token_ids\": [...]}}",
                    path.display(),
                    n + 1
                )
            })?;
            inputs.push(match parsed {
                PromptLine::Text(s) | PromptLine::Prompt { prompt: s } => wrap(s),
                PromptLine::Chat { messages } => PromptInput::Chat(messages),
                PromptLine::Ids { prompt_token_ids } => PromptInput::Ids(prompt_token_ids),
            });
        }
    }
    Ok(inputs)
}

fn tokenize(
    tok: Option<&Tokenizer>,
    input: &PromptInput,
    template: Option<&str>,
) -> Result<Vec<u32>> {
    if let PromptInput::Ids(ids) = input {
        return Ok(ids.clone());
    }
    let tok = tok.context(
        "this model has no tokenizer: give prompts as {\"prompt_token_ids\": [...]} lines",
    )?;
    match input {
        PromptInput::Text(s) => tok.encode(s, true),
        PromptInput::Chat(messages) => {
            let text = tok.apply_chat_template(messages, true, template)?;
            // The template already wrote any BOS it wants.
            tok.encode(&text, false)
        }
        PromptInput::Ids(_) => unreachable!("handled above"),
    }
}

fn print_outputs(
    format: &str,
    tok: Option<&Tokenizer>,
    outputs: &[RequestOutput],
    elapsed: f64,
) -> Result<()> {
    let prompt_tokens: usize = outputs.iter().map(|o| o.prompt_token_ids.len()).sum();
    let gen_tokens: usize = outputs
        .iter()
        .flat_map(|o| &o.outputs)
        .map(|c| c.token_ids.len())
        .sum();
    if format == "json" {
        let items: Vec<_> = outputs
            .iter()
            .map(|o| {
                let prompt = tok.and_then(|t| t.decode(&o.prompt_token_ids, false).ok());
                json!({
                    "prompt": prompt,
                    "prompt_token_ids": o.prompt_token_ids,
                    "prompt_logprobs": o.prompt_logprobs.as_ref().map(|v| v.iter().map(|x| x.as_ref().map(logprobs_json)).collect::<Vec<_>>()),
                    "outputs": o.outputs.iter().map(|c| json!({
                        "index": c.index,
                        "text": c.text,
                        "token_ids": c.token_ids,
                        "logprobs": if c.logprobs.is_empty() { serde_json::Value::Null } else { c.logprobs.iter().map(logprobs_json).collect() },
                        "finish_reason": c.finish_reason.as_ref().map(finish_str),
                        "stop_reason": c.stop_reason.as_ref().map(|s| match s {
                            crate::engine::StopReason::Str(s) => json!(s),
                            crate::engine::StopReason::TokenId(t) => json!(t),
                        }),
                    })).collect::<Vec<_>>(),
                    "time_to_first_token_s": o.time_to_first_token.map(|d| d.as_secs_f64()),
                    "latency_s": o.latency.as_secs_f64(),
                })
            })
            .collect();
        let summary = json!({
            "requests": outputs.len(),
            "prompt_tokens": prompt_tokens,
            "generated_tokens": gen_tokens,
            "elapsed_s": elapsed,
            "tokens_per_s": (prompt_tokens + gen_tokens) as f64 / elapsed.max(1e-9),
            "generated_tokens_per_s": gen_tokens as f64 / elapsed.max(1e-9),
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"outputs": items, "summary": summary}))?
        );
    } else {
        for (i, o) in outputs.iter().enumerate() {
            for c in &o.outputs {
                let tag = if o.outputs.len() > 1 {
                    format!("[{i}.{}]", c.index)
                } else {
                    format!("[{i}]")
                };
                println!("{tag} {}", c.text);
            }
        }
        println!(
            "requests: {}, prompt tokens: {prompt_tokens}, generated tokens: {gen_tokens}, time: {elapsed:.2} s, \
             throughput: {:.1} tok/s ({:.1} generated tok/s)",
            outputs.len(),
            (prompt_tokens + gen_tokens) as f64 / elapsed.max(1e-9),
            gen_tokens as f64 / elapsed.max(1e-9)
        );
    }
    Ok(())
}

pub fn finish_str(f: &crate::engine::FinishReason) -> &'static str {
    match f {
        crate::engine::FinishReason::Stop => "stop",
        crate::engine::FinishReason::Length => "length",
        crate::engine::FinishReason::Abort => "abort",
    }
}

fn logprobs_json(t: &crate::scheduler::TokenLogprobs) -> serde_json::Value {
    json!({
        "token_id": t.token_id,
        "logprob": t.logprob,
        "rank": t.rank,
        "top": t.top.iter().map(|(id, lp)| json!([id, lp])).collect::<Vec<_>>(),
    })
}
