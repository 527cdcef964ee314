//! POST /v1/chat/completions: messages rendered with the model's chat template (or the
//! request's / --chat-template override), `n` choices, logprobs, and SSE streaming (a role
//! chunk per choice first, then one content chunk per engine delta).
use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;

use super::error::ApiError;
use super::generation::{failure, tokenize_bad_words, Generation};
use super::limits::{check_request_template, PromptBound};
use super::protocol::ChatCompletionRequest;
use super::reasoning::{split_piece, ReasoningSplitter, Split};
use super::responses::{
    chat_logprobs, finish_str, prompt_logprobs, random_id, stop_reason_json, unix_now, ChatChoice,
    ChatChunk, ChatChunkChoice, ChatDelta, ChatLogprobs, ChatMessageOut, ChatResponse, Usage,
};
use super::routes::read_body;
use super::tools::choice::{accumulate, CallDelta, CallOut, ChoiceTools};
use super::tools::request::ToolChoice;
use super::validate::{check_cache_salt, check_model, parse_json, validate_chat, ChatJob};
use super::{sse, AppState};
use crate::engine::CompletionDelta;
use crate::scheduler::TokenLogprobs;
use crate::tokenizer::{RenderError, Tokenizer};

pub async fn chat_completions(State(st): State<Arc<AppState>>, body: Body) -> Response {
    match handle(st, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// What a chat prompt is rendered from: the turns, the template (None: the model's) and
/// its variables, and the request's rendering switches.
#[derive(Clone, Copy)]
pub struct ChatPrompt<'a> {
    pub turns: &'a [super::validate::ChatTurn],
    pub template: Option<&'a str>,
    pub template_kwargs: &'a serde_json::Map<String, serde_json::Value>,
    pub add_generation_prompt: bool,
    pub continue_final_message: bool,
    pub add_special_tokens: bool,
}

/// Render and tokenize the conversation (on a CPU-work thread: see cpu_work.rs). The
/// rendering stops at `bound.render_cap()` bytes and at the template's fuel; the rendered
/// text is checked against `bound` before it is tokenized.
pub fn render_chat(
    tok: Option<&Tokenizer>,
    prompt: &ChatPrompt<'_>,
    bound: &PromptBound<'_>,
) -> Result<Vec<u32>, ApiError> {
    let ChatPrompt {
        turns,
        template,
        template_kwargs,
        add_generation_prompt,
        continue_final_message,
        add_special_tokens,
    } = *prompt;
    let tok = tok.ok_or_else(|| {
        ApiError::invalid(
            "messages",
            "this model has no tokenizer, so chat messages cannot be rendered; use /v1/completions with token ids",
        )
    })?;
    let msgs: Vec<serde_json::Value> = turns.iter().map(|t| t.to_template_json()).collect();
    let mut text = tok
        .render_chat_json(
            &msgs,
            template_kwargs,
            add_generation_prompt,
            template,
            Some(bound.render_cap()),
        )
        .map_err(|e| match e {
            RenderError::TooLong { limit } => bound.rendered_too_long("messages", limit),
            e => ApiError::invalid(
                "messages",
                format!("the chat template could not render these messages: {e}"),
            ),
        })?;
    if continue_final_message {
        // Cut the rendered text right after the final message so the model continues it.
        if let Some(last) = turns.last().filter(|m| !m.content.is_empty()) {
            if let Some(pos) = text.rfind(&last.content) {
                text.truncate(pos + last.content.len());
            }
        }
    }
    bound.check("messages", &text)?;
    let ids = tok.encode(&text, add_special_tokens).map_err(|e| {
        ApiError::invalid(
            "messages",
            format!("the rendered conversation could not be tokenized: {e:#}"),
        )
    })?;
    if ids.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "the conversation renders to no tokens; send some content",
        ));
    }
    Ok(ids)
}

/// Everything before generation, from the body's bytes: parse, validate, render, tokenize.
fn prepare(st: &AppState, bytes: &[u8]) -> Result<(ChatJob, Vec<u32>), ApiError> {
    let req: ChatCompletionRequest = parse_json(bytes)?;
    check_model(req.model.as_deref(), &st.served_model, &st.model_path)?;
    check_cache_salt(req.cache_salt.as_deref(), st.prefix_caching)?;
    check_request_template(
        req.chat_template.as_deref(),
        req.chat_template_kwargs.as_ref(),
        st.trust_request_chat_template,
    )?;
    let mut job = validate_chat(&req, st.max_logprobs)?;
    drop(req);
    if let Some(t) = job.tools.as_ref().filter(|t| t.choice == ToolChoice::Auto) {
        // vLLM's rule: the model may call tools on its own only where the server reads
        // its calls.
        let parser = st.auto_tool_parser.ok_or_else(|| {
            ApiError::invalid(
                "tool_choice",
                "\"auto\" tool choice requires --enable-auto-tool-choice and --tool-call-parser \
                 to be set on the server (tool_choice defaults to \"auto\" when `tools` are \
                 given); send tool_choice \"none\", \"required\" or a named function instead",
            )
        })?;
        if parser.needs_special_tokens() && !t.tools.is_empty() {
            job.params.skip_special_tokens = false;
        }
    }
    st.apply_defaults(&mut job.params, &mut job.tokens_as_ids);
    job.return_token_ids |= st.tokenizer.is_none();
    tokenize_bad_words(st.tokenizer.as_deref(), &mut job.params)?;
    let template = job.chat_template.as_deref().or(st.chat_template.as_deref());
    let prompt = ChatPrompt {
        turns: &job.messages,
        template,
        template_kwargs: &job.template_kwargs,
        add_generation_prompt: job.add_generation_prompt,
        continue_final_message: job.continue_final_message,
        add_special_tokens: job.add_special_tokens,
    };
    let ids = render_chat(
        st.tokenizer.as_deref(),
        &prompt,
        &PromptBound::new(st.tokenizer.as_deref(), st.engine.max_model_len()),
    )?;
    Ok((job, ids))
}

async fn handle(st: Arc<AppState>, body: Body) -> Result<Response, ApiError> {
    let bytes = read_body(body, st.max_body_bytes).await?;
    let shared = st.clone();
    let (job, ids) = st.cpu_work.run(move || prepare(&shared, &bytes)).await??;
    let echo = match job.messages.last() {
        Some(m) if job.echo && m.role == "assistant" => Some(m.content.clone()),
        _ => None,
    };
    let prompt_tokens = ids.len();
    let gen = Generation::start(
        &st.engine,
        st.metrics.clone(),
        vec![ids],
        &job.params,
        "messages",
    )?;
    let out = Output {
        id: match &job.request_id {
            Some(r) => format!("chatcmpl-{r}"),
            None => random_id("chatcmpl"),
        },
        created: unix_now(),
        model: st.served_model.clone(),
        tokenizer: st.tokenizer.clone(),
        prompt_tokens,
        choices: (0..gen.num_choices())
            .map(|_| ChoiceState {
                echo: echo.clone(),
                splitter: st
                    .reasoning_parser
                    .map(|p| p.splitter(&job.template_kwargs)),
                tools: job
                    .tools
                    .as_ref()
                    .and_then(|t| ChoiceTools::new(t, st.auto_tool_parser)),
                calls: Vec::new(),
                reasoning: String::new(),
                text: String::new(),
                tokens: 0,
                token_ids: Vec::new(),
                logprobs: job.logprobs.map(|_| ChatLogprobs::default()),
                finish_reason: None,
                stop_reason: None,
            })
            .collect(),
        prompt_logprobs: None,
        job,
    };
    if out.job.stream.stream {
        Ok(stream(gen, out))
    } else {
        collect(gen, out).await
    }
}

struct ChoiceState {
    echo: Option<String>,
    /// With --reasoning-parser: splits the output into reasoning and content.
    splitter: Option<ReasoningSplitter>,
    /// The reasoning so far (with a parser), and the content so far.
    reasoning: String,
    text: String,
    /// With tools: reads calls out of the content (after the reasoning).
    tools: Option<ChoiceTools>,
    calls: Vec<CallOut>,
    tokens: usize,
    token_ids: Vec<u32>,
    logprobs: Option<ChatLogprobs>,
    finish_reason: Option<&'static str>,
    stop_reason: Option<serde_json::Value>,
}

struct Output {
    id: String,
    created: u64,
    model: String,
    tokenizer: Option<Arc<Tokenizer>>,
    job: ChatJob,
    prompt_tokens: usize,
    choices: Vec<ChoiceState>,
    /// The engine's prompt logprobs (None first): every choice computes the same ones, so
    /// the first to arrive is kept (vLLM puts them at the top level of the response).
    prompt_logprobs: Option<Vec<Option<TokenLogprobs>>>,
}

impl Output {
    /// The delta's text, split into reasoning and content, the pieces of tool calls in it,
    /// and its logprobs.
    fn absorb(
        &mut self,
        c: usize,
        d: &CompletionDelta,
    ) -> (Split, Vec<CallDelta>, Option<ChatLogprobs>) {
        // The engine numbers choices below n; an out-of-range one is dropped, not a panic.
        let Some(ch) = self.choices.get_mut(c) else {
            return (Split::default(), Vec::new(), None);
        };
        if self.prompt_logprobs.is_none() {
            self.prompt_logprobs = d.prompt_logprobs.clone();
        }
        let mut text = ch.echo.take().unwrap_or_default();
        text.push_str(&d.text);
        let lps = self.job.logprobs.map(|k| {
            chat_logprobs(
                self.tokenizer.as_deref(),
                &d.logprobs,
                k,
                self.job.tokens_as_ids,
            )
        });
        let mut split = match ch.splitter.as_mut() {
            Some(s) => split_piece(s, &text, d.finish_reason.is_some()),
            None => Split {
                reasoning: String::new(),
                content: text,
            },
        };
        let mut calls = Vec::new();
        if let Some(t) = ch.tools.as_mut() {
            let td = t.push(&split.content, d.finish_reason.is_some());
            split.content = td.content;
            accumulate(&mut ch.calls, &td.calls);
            calls = td.calls;
        }
        ch.text.push_str(&split.content);
        ch.reasoning.push_str(&split.reasoning);
        ch.tokens += d.token_ids.len();
        if self.job.return_token_ids {
            ch.token_ids.extend_from_slice(&d.token_ids);
        }
        if let (Some(all), Some(new)) = (ch.logprobs.as_mut(), lps.as_ref()) {
            all.content.extend(new.content.iter().cloned());
        }
        if let Some(f) = &d.finish_reason {
            let f = finish_str(f);
            ch.finish_reason = Some(ch.tools.as_ref().map_or(f, |t| t.finish_reason(f)));
            ch.stop_reason = stop_reason_json(&d.stop_reason);
        }
        (split, calls, lps)
    }

    fn usage(&self) -> Usage {
        Usage::new(
            self.prompt_tokens,
            self.choices.iter().map(|c| c.tokens).sum(),
        )
    }

    fn chunk(&self, choices: Vec<ChatChunkChoice>, usage: Option<Usage>) -> Bytes {
        sse::event(&ChatChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        })
    }
}

async fn collect(mut gen: Generation, mut out: Output) -> Result<Response, ApiError> {
    while let Some((c, d)) = gen.next().await {
        if let Some(e) = failure(&d) {
            return Err(e);
        }
        out.absorb(c, &d);
    }
    let usage = out.usage();
    let plp = out.job.params.prompt_logprobs.map(|k| {
        prompt_logprobs(
            out.tokenizer.as_deref(),
            out.prompt_logprobs.as_deref().unwrap_or(&[]),
            k,
        )
    });
    let resp = ChatResponse {
        id: out.id,
        object: "chat.completion",
        created: out.created,
        model: out.model,
        choices: out
            .choices
            .into_iter()
            .enumerate()
            .map(|(index, c)| ChatChoice {
                index,
                message: message_out(
                    c.splitter.is_some() || c.tools.is_some(),
                    c.reasoning,
                    c.text,
                    &c.calls,
                ),
                logprobs: c.logprobs,
                finish_reason: c.finish_reason,
                stop_reason: c.stop_reason,
                token_ids: out.job.return_token_ids.then_some(c.token_ids),
            })
            .collect(),
        usage,
        prompt_logprobs: plp,
    };
    Ok(axum::Json(resp).into_response())
}

/// The whole message; with a reasoning parser or tools, vLLM's shape: `content` null when
/// the model only thought or only called tools, the reasoning under both of vLLM's names.
fn message_out(
    parsed: bool,
    reasoning: String,
    content: String,
    calls: &[CallOut],
) -> ChatMessageOut {
    let tool_calls = calls.iter().map(CallOut::to_json).collect();
    if !parsed {
        return ChatMessageOut {
            role: "assistant",
            content: Some(content),
            reasoning_content: None,
            reasoning: None,
            tool_calls,
        };
    }
    let reasoning = (!reasoning.is_empty()).then_some(reasoning);
    ChatMessageOut {
        role: "assistant",
        content: (!content.is_empty()).then_some(content),
        reasoning_content: reasoning.clone(),
        reasoning,
        tool_calls,
    }
}

fn stream(gen: Generation, out: Output) -> Response {
    // The role comes first, once per choice, before any content.
    let roles: Vec<ChatChunkChoice> = (0..out.choices.len())
        .map(|index| ChatChunkChoice {
            index,
            delta: ChatDelta {
                role: Some("assistant"),
                content: Some(String::new()),
                ..Default::default()
            },
            logprobs: None,
            finish_reason: None,
            stop_reason: None,
            token_ids: None,
        })
        .collect();
    let head: Vec<Bytes> = roles
        .into_iter()
        .map(|r| out.chunk(vec![r], None))
        .collect();
    let body = futures::stream::unfold(Some((gen, out)), |state| async move {
        let (mut gen, mut out) = state?;
        match gen.next().await {
            Some((c, d)) => {
                if let Some(e) = failure(&d) {
                    return Some((vec![sse::error_event(&e), sse::done()], None));
                }
                let (split, calls, logprobs) = out.absorb(c, &d);
                let finish = d
                    .finish_reason
                    .as_ref()
                    .and_then(|_| out.choices.get(c)?.finish_reason);
                let has_lps = logprobs.as_ref().is_some_and(|l| !l.content.is_empty());
                let has_ids = out.job.return_token_ids && !d.token_ids.is_empty();
                let Split { reasoning, content } = split;
                if content.is_empty()
                    && reasoning.is_empty()
                    && calls.is_empty()
                    && finish.is_none()
                    && !has_lps
                    && !has_ids
                {
                    return Some((vec![], Some((gen, out))));
                }
                // An empty content goes out only where the chunk carries nothing else of
                // the text (logprobs or token ids of a piece the splitter held back).
                let send_content = !content.is_empty()
                    || (finish.is_none() && reasoning.is_empty() && calls.is_empty());
                let reasoning = (!reasoning.is_empty()).then_some(reasoning);
                let choice = ChatChunkChoice {
                    index: c,
                    delta: ChatDelta {
                        role: None,
                        content: send_content.then_some(content),
                        reasoning_content: reasoning.clone(),
                        reasoning,
                        tool_calls: calls.iter().map(CallDelta::to_json).collect(),
                    },
                    logprobs,
                    finish_reason: finish,
                    stop_reason: stop_reason_json(&d.stop_reason),
                    token_ids: out.job.return_token_ids.then(|| d.token_ids.clone()),
                };
                let usage = out.job.stream.continuous_usage.then(|| out.usage());
                Some((vec![out.chunk(vec![choice], usage)], Some((gen, out))))
            }
            None => {
                let mut tail = Vec::new();
                if out.job.stream.include_usage {
                    tail.push(out.chunk(vec![], Some(out.usage())));
                }
                tail.push(sse::done());
                Some((tail, None))
            }
        }
    });
    let events = futures::stream::iter(vec![head])
        .chain(body)
        .flat_map(|v| futures::stream::iter(v.into_iter().map(Ok::<_, Infallible>)));
    sse::response(Body::from_stream(events))
}
