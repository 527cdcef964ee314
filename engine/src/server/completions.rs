//! POST /v1/completions: text or token-id prompts (one or many), `n` choices each, echo,
//! logprobs, and SSE streaming with one chunk per engine delta.
use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;

use super::error::ApiError;
use super::generation::{failure, tokenize_bad_words, Generation};
use super::limits::PromptBound;
use super::protocol::CompletionRequest;
use super::responses::{
    completion_logprobs, finish_str, prompt_logprobs, random_id, stop_reason_json, unix_now,
    CompletionChoice, CompletionLogprobs, CompletionResponse, Usage,
};
use super::routes::read_body;
use super::validate::{
    check_cache_salt, check_model, parse_json, validate_completion, CompletionJob, PromptInput,
};
use super::{sse, AppState};
use crate::engine::CompletionDelta;
use crate::scheduler::TokenLogprobs;
use crate::tokenizer::Tokenizer;

pub async fn completions(State(st): State<Arc<AppState>>, body: Body) -> Response {
    match handle(st, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// Text of each prompt for echo, and its token ids for the engine.
struct Prompt {
    text: String,
    ids: Vec<u32>,
}

/// Everything before generation, from the body's bytes (on a CPU-work thread: see
/// cpu_work.rs): parse, validate, then every text prompt checked against the context by its
/// byte length before any is tokenized.
fn prepare(st: &AppState, bytes: &[u8]) -> Result<(CompletionJob, Vec<Prompt>), ApiError> {
    let req: CompletionRequest = parse_json(bytes)?;
    check_model(req.model.as_deref(), &st.served_model, &st.model_path)?;
    check_cache_salt(req.cache_salt.as_deref(), st.prefix_caching)?;
    let mut job = validate_completion(&req, st.max_logprobs)?;
    drop(req);
    st.apply_defaults(&mut job.params, &mut job.tokens_as_ids);
    // Without a tokenizer there is no text: the token ids are the output.
    job.return_token_ids |= st.tokenizer.is_none();
    let tok = st.tokenizer.as_deref();
    tokenize_bad_words(tok, &mut job.params)?;
    let bound = PromptBound::new(tok, st.engine.max_model_len());
    for p in &job.prompts {
        if let PromptInput::Text(s) = p {
            bound.check("prompt", s)?;
        }
    }
    let prompts = job
        .prompts
        .iter()
        .map(|p| tokenize_prompt(tok, p, &job))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((job, prompts))
}

async fn handle(st: Arc<AppState>, body: Body) -> Result<Response, ApiError> {
    let bytes = read_body(body, st.max_body_bytes).await?;
    let shared = st.clone();
    let (job, prompts) = st.cpu_work.run(move || prepare(&shared, &bytes)).await??;
    let gen = Generation::start(
        &st.engine,
        st.metrics.clone(),
        prompts.iter().map(|p| p.ids.clone()).collect(),
        &job.params,
        "prompt",
    )?;
    let n = job.params.n.max(1);
    let choices: Vec<ChoiceState> = (0..gen.num_choices())
        .map(|c| ChoiceState::new(&prompts[c / n], &job))
        .collect();
    let out = Output {
        id: match &job.request_id {
            Some(r) => format!("cmpl-{r}"),
            None => random_id("cmpl"),
        },
        created: unix_now(),
        model: st.served_model.clone(),
        tokenizer: st.tokenizer.clone(),
        job,
        prompt_tokens: prompts.iter().map(|p| p.ids.len()).sum(),
        choices,
    };
    if out.job.stream.stream {
        Ok(stream(gen, out))
    } else {
        collect(gen, out).await
    }
}

fn tokenize_prompt(
    tok: Option<&Tokenizer>,
    p: &PromptInput,
    job: &CompletionJob,
) -> Result<Prompt, ApiError> {
    match p {
        PromptInput::Text(s) => {
            let t = tok.ok_or_else(|| {
                ApiError::invalid(
                    "prompt",
                    "this model has no tokenizer: send the prompt as a list of token ids",
                )
            })?;
            let ids = t.encode(s, job.add_special_tokens).map_err(|e| {
                ApiError::invalid(
                    "prompt",
                    format!("the prompt could not be tokenized: {e:#}"),
                )
            })?;
            if ids.is_empty() {
                return Err(ApiError::invalid(
                    "prompt",
                    "the prompt tokenizes to no tokens; give some text",
                ));
            }
            Ok(Prompt {
                text: s.clone(),
                ids,
            })
        }
        PromptInput::Tokens(ids) => {
            super::routes::check_token_ids(tok, "prompt", ids)?;
            let text = match (job.echo, tok) {
                (true, Some(t)) => t.decode(ids, true).unwrap_or_default(),
                _ => String::new(),
            };
            Ok(Prompt {
                text,
                ids: ids.clone(),
            })
        }
    }
}

/// One choice's output so far.
struct ChoiceState {
    /// Echoed prompt still to be sent (taken by the first delta).
    echo: Option<(String, Vec<u32>)>,
    text: String,
    tokens: usize,
    token_ids: Vec<u32>,
    logprobs: Option<CompletionLogprobs>,
    text_offset: usize,
    finish_reason: Option<&'static str>,
    stop_reason: Option<serde_json::Value>,
    /// The engine's prompt logprobs (None first), from the first delta that has them.
    prompt_logprobs: Option<Vec<Option<TokenLogprobs>>>,
}

impl ChoiceState {
    fn new(prompt: &Prompt, job: &CompletionJob) -> Self {
        Self {
            echo: job.echo.then(|| (prompt.text.clone(), prompt.ids.clone())),
            text: String::new(),
            tokens: 0,
            token_ids: Vec::new(),
            logprobs: job.params.logprobs.map(|_| CompletionLogprobs::default()),
            text_offset: 0,
            finish_reason: None,
            stop_reason: None,
            prompt_logprobs: None,
        }
    }
}

struct Output {
    id: String,
    created: u64,
    model: String,
    tokenizer: Option<Arc<Tokenizer>>,
    job: CompletionJob,
    prompt_tokens: usize,
    choices: Vec<ChoiceState>,
}

impl Output {
    /// Fold a delta into its choice; returns the new text and logprobs it adds.
    fn absorb(&mut self, c: usize, d: &CompletionDelta) -> (String, Option<CompletionLogprobs>) {
        let tok = self.tokenizer.as_deref();
        let top_k = self.job.params.logprobs.unwrap_or(0);
        let as_ids = self.job.tokens_as_ids;
        // The engine numbers choices below n; an out-of-range one is dropped, not a panic.
        let Some(ch) = self.choices.get_mut(c) else {
            return (String::new(), None);
        };
        let mut text = String::new();
        let mut lps = ch.logprobs.as_ref().map(|_| CompletionLogprobs::default());
        if let Some((prompt_text, prompt_ids)) = ch.echo.take() {
            text.push_str(&prompt_text);
            if let Some(lps) = lps.as_mut() {
                let plp = d.prompt_logprobs.as_deref().unwrap_or(&[]);
                let entries: Vec<_> = prompt_ids
                    .iter()
                    .enumerate()
                    .map(|(i, id)| Some((*id, plp.get(i).and_then(|x| x.as_ref()))))
                    .collect();
                lps.extend(completion_logprobs(
                    tok,
                    &entries,
                    top_k,
                    as_ids,
                    &mut ch.text_offset,
                ));
            }
        }
        text.push_str(&d.text);
        if let Some(lps) = lps.as_mut() {
            let entries: Vec<_> = d
                .token_ids
                .iter()
                .enumerate()
                .map(|(i, id)| Some((*id, d.logprobs.get(i))))
                .collect();
            lps.extend(completion_logprobs(
                tok,
                &entries,
                top_k,
                as_ids,
                &mut ch.text_offset,
            ));
        }
        if ch.prompt_logprobs.is_none() {
            ch.prompt_logprobs = d.prompt_logprobs.clone();
        }
        ch.text.push_str(&text);
        ch.tokens += d.token_ids.len();
        if self.job.return_token_ids {
            ch.token_ids.extend_from_slice(&d.token_ids);
        }
        if let (Some(all), Some(new)) = (ch.logprobs.as_mut(), lps.as_ref()) {
            all.extend(new.clone());
        }
        if let Some(f) = &d.finish_reason {
            ch.finish_reason = Some(finish_str(f));
            ch.stop_reason = stop_reason_json(&d.stop_reason);
        }
        (text, lps)
    }

    fn usage(&self) -> Usage {
        Usage::new(
            self.prompt_tokens,
            self.choices.iter().map(|c| c.tokens).sum(),
        )
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
    let tok = out.tokenizer.as_deref();
    let plp_k = out.job.params.prompt_logprobs;
    let return_ids = out.job.return_token_ids;
    let choices = out
        .choices
        .into_iter()
        .enumerate()
        .map(|(index, c)| {
            let plp = c.prompt_logprobs.as_deref().unwrap_or(&[]);
            CompletionChoice {
                index,
                text: c.text,
                logprobs: c.logprobs,
                finish_reason: c.finish_reason,
                stop_reason: c.stop_reason,
                token_ids: return_ids.then_some(c.token_ids),
                prompt_logprobs: Some(plp_k.map(|k| prompt_logprobs(tok, plp, k))),
            }
        })
        .collect();
    let resp = CompletionResponse {
        id: out.id,
        object: "text_completion",
        created: out.created,
        model: out.model,
        choices,
        usage: Some(usage),
    };
    Ok(axum::Json(resp).into_response())
}

fn chunk(out: &Output, choices: Vec<CompletionChoice>, usage: Option<Usage>) -> Bytes {
    sse::event(&CompletionResponse {
        id: out.id.clone(),
        object: "text_completion",
        created: out.created,
        model: out.model.clone(),
        choices,
        usage,
    })
}

fn stream(gen: Generation, out: Output) -> Response {
    let events = futures::stream::unfold(Some((gen, out)), |state| async move {
        let (mut gen, mut out) = state?;
        match gen.next().await {
            Some((c, d)) => {
                if let Some(e) = failure(&d) {
                    return Some((vec![sse::error_event(&e), sse::done()], None));
                }
                let (text, logprobs) = out.absorb(c, &d);
                let finish = d.finish_reason.as_ref().map(finish_str);
                if text.is_empty()
                    && finish.is_none()
                    && logprobs.as_ref().is_none_or(|l| l.tokens.is_empty())
                    && (!out.job.return_token_ids || d.token_ids.is_empty())
                {
                    // Nothing to say yet (text held back while a stop string may be forming).
                    return Some((vec![], Some((gen, out))));
                }
                let choice = CompletionChoice {
                    index: c,
                    text,
                    logprobs,
                    finish_reason: finish,
                    stop_reason: stop_reason_json(&d.stop_reason),
                    token_ids: out.job.return_token_ids.then(|| d.token_ids.clone()),
                    prompt_logprobs: None,
                };
                let usage = out.job.stream.continuous_usage.then(|| out.usage());
                Some((vec![chunk(&out, vec![choice], usage)], Some((gen, out))))
            }
            None => {
                let mut tail = Vec::new();
                if out.job.stream.include_usage {
                    tail.push(chunk(&out, vec![], Some(out.usage())));
                }
                tail.push(sse::done());
                Some((tail, None))
            }
        }
    })
    .flat_map(|v| futures::stream::iter(v.into_iter().map(Ok::<_, Infallible>)));
    sse::response(Body::from_stream(events))
}
