//! The small routes (models, health, version, metrics, tokenize, detokenize), the fallbacks,
//! and the body reading every POST route shares.
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::chat::{render_chat, ChatPrompt};
use super::error::ApiError;
use super::limits::{check_request_template, PromptBound};
use super::metrics::EngineGauges;
use super::protocol::{DetokenizeRequest, TokenizeRequest};
use super::validate::{check_model, flatten_message, parse_json, template_kwargs};
use super::AppState;
use crate::tokenizer::Tokenizer;

/// Read a whole body, refusing more than `limit` bytes (413), and answering 408 when it stops
/// arriving (the body timeout layer in http.rs).
pub async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let chain = || std::iter::successors(Some(&e as &dyn std::error::Error), |e| e.source());
        let too_large = chain().any(|e| e.to_string().contains("length limit exceeded"));
        let timed_out = chain().any(|e| e.is::<tower_http::timeout::TimeoutError>());
        if too_large {
            ApiError::payload_too_large(limit)
        } else if timed_out {
            ApiError::request_timeout()
        } else {
            ApiError::bad_request(
                format!("could not read the request body: {e}"),
                "invalid_body",
            )
        }
    })
}

/// Token ids from a client must exist in the vocabulary (the model would index past its
/// embedding table otherwise).
pub fn check_token_ids(tok: Option<&Tokenizer>, param: &str, ids: &[u32]) -> Result<(), ApiError> {
    if let Some(t) = tok {
        let vocab = t.vocab_size();
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(ApiError::invalid(
                param,
                format!("token id {bad} is outside this model's vocabulary (ids are 0..{vocab})"),
            ));
        }
    }
    Ok(())
}

pub async fn models(State(st): State<Arc<AppState>>) -> Response {
    Json(json!({
        "object": "list",
        "data": [{
            "id": st.served_model,
            "object": "model",
            "created": st.started_unix,
            "owned_by": "rvllm",
            "root": st.model_path,
            "parent": null,
            "max_model_len": st.engine.max_model_len(),
        }],
    }))
    .into_response()
}

pub async fn health(State(st): State<Arc<AppState>>) -> Response {
    if st.shutting_down.load(std::sync::atomic::Ordering::SeqCst) {
        return ApiError::unavailable("the server is shutting down").into_response();
    }
    StatusCode::OK.into_response()
}

pub async fn version() -> Response {
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "commit": env!("RVLLM_GIT_COMMIT"),
        "devices": crate::compiled_devices(),
    }))
    .into_response()
}

pub async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let s = st.engine.stats();
    let gauges = EngineGauges {
        num_running: s.num_running,
        num_waiting: s.num_waiting,
        kv_usage: s.kv_usage,
        num_free_blocks: s.num_free_blocks,
        num_total_blocks: s.num_total_blocks,
        num_preemptions: s.num_preemptions,
        prompt_tokens_total: s.prompt_tokens_total,
        generation_tokens_total: s.generation_tokens_total,
        prefix_cache_queries: s.prefix_cache_queries,
        prefix_cache_hits: s.prefix_cache_hits,
        cuda_graph_decode_steps: s.steps.graph_steps,
        eager_steps: s.steps.eager_steps,
        grammar_mask_steps: s.steps.grammar_mask_steps,
    };
    let mut resp = st.metrics.render(&st.served_model, &gauges).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

pub async fn tokenize(State(st): State<Arc<AppState>>, body: Body) -> Response {
    let run = async {
        let bytes = read_body(body, st.max_body_bytes).await?;
        let shared = st.clone();
        st.cpu_work
            .run(move || tokenize_json(&shared, &bytes))
            .await?
    };
    match run.await {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// /tokenize's answer (on a CPU-work thread: see cpu_work.rs), with the chat route's rules:
/// request templates only when trusted, prompts past the context refused by length first.
fn tokenize_json(st: &AppState, bytes: &[u8]) -> Result<serde_json::Value, ApiError> {
    let req: TokenizeRequest = parse_json(bytes)?;
    check_model(req.model.as_deref(), &st.served_model, &st.model_path)?;
    let tok = st.tokenizer.as_deref();
    let bound = PromptBound::new(tok, st.engine.max_model_len());
    let ids = match (&req.prompt, &req.messages) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "messages",
                "send either `prompt` or `messages`, not both",
            ));
        }
        (None, None) => {
            return Err(ApiError::invalid(
                "prompt",
                "send `prompt` (text) or `messages` (a chat)",
            ))
        }
        (Some(p), None) => {
            let t =
                tok.ok_or_else(|| ApiError::invalid("prompt", "this model has no tokenizer"))?;
            bound.check("prompt", p)?;
            t.encode(p, req.add_special_tokens.unwrap_or(true))
                .map_err(|e| ApiError::invalid("prompt", format!("could not tokenize: {e:#}")))?
        }
        (None, Some(msgs)) => {
            if msgs.is_empty() {
                return Err(ApiError::invalid(
                    "messages",
                    "`messages` is empty; send at least one message",
                ));
            }
            check_request_template(
                req.chat_template.as_deref(),
                req.chat_template_kwargs.as_ref(),
                st.trust_request_chat_template,
            )?;
            let turns = msgs
                .iter()
                .enumerate()
                .map(|(i, m)| flatten_message(i, m))
                .collect::<Result<Vec<_>, _>>()?;
            let (kwargs, kwargs_template) =
                template_kwargs(None, None, req.chat_template_kwargs.as_ref())?;
            let template = req
                .chat_template
                .as_deref()
                .or(kwargs_template.as_deref())
                .or(st.chat_template.as_deref());
            let prompt = ChatPrompt {
                turns: &turns,
                template,
                template_kwargs: &kwargs,
                add_generation_prompt: req.add_generation_prompt.unwrap_or(true),
                continue_final_message: req.continue_final_message.unwrap_or(false),
                add_special_tokens: req.add_special_tokens.unwrap_or(false),
            };
            render_chat(tok, &prompt, &bound)?
        }
    };
    let mut v =
        json!({"count": ids.len(), "max_model_len": st.engine.max_model_len(), "tokens": ids});
    if req.return_token_strs == Some(true) {
        let strs: Vec<String> = ids
            .iter()
            .map(|&id| tok.and_then(|t| t.id_to_token(id)).unwrap_or_default())
            .collect();
        v["token_strs"] = json!(strs);
    }
    Ok(v)
}

pub async fn detokenize(State(st): State<Arc<AppState>>, body: Body) -> Response {
    let run = async {
        let bytes = read_body(body, st.max_body_bytes).await?;
        let req: DetokenizeRequest = parse_json(&bytes)?;
        check_model(req.model.as_deref(), &st.served_model, &st.model_path)?;
        let tok = st
            .tokenizer
            .as_deref()
            .ok_or_else(|| ApiError::invalid("tokens", "this model has no tokenizer"))?;
        let ids: Vec<u32> = req
            .tokens
            .iter()
            .map(|&t| {
                u32::try_from(t)
                    .map_err(|_| ApiError::invalid("tokens", format!("{t} is not a token id")))
            })
            .collect::<Result<_, _>>()?;
        check_token_ids(Some(tok), "tokens", &ids)?;
        let text = tok
            .decode(&ids, false)
            .map_err(|e| ApiError::invalid("tokens", format!("could not decode: {e:#}")))?;
        Ok(Json(json!({"prompt": text})).into_response())
    };
    run.await.unwrap_or_else(|e: ApiError| e.into_response())
}

/// The routes that read a JSON body.
const JSON_ROUTES: [&str; 4] = [
    "/v1/completions",
    "/v1/chat/completions",
    "/tokenize",
    "/detokenize",
];

/// 415 for a POST to a JSON route whose Content-Type is not JSON. No Content-Type at all is
/// read as JSON, as FastAPI (vLLM) does; `application/json` and `application/*+json` pass,
/// with any parameters (charset).
pub async fn require_json(req: Request, next: Next) -> Response {
    if req.method() == Method::POST && JSON_ROUTES.contains(&req.uri().path()) {
        if let Some(ct) = req.headers().get(header::CONTENT_TYPE) {
            let given = String::from_utf8_lossy(ct.as_bytes());
            if !is_json_media_type(&given) {
                return ApiError::unsupported_media_type(given.trim()).into_response();
            }
        }
    }
    next.run(req).await
}

fn is_json_media_type(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match essence.strip_prefix("application/") {
        Some(sub) => sub == "json" || sub.ends_with("+json"),
        None => false,
    }
}

pub async fn not_found(uri: Uri) -> Response {
    ApiError::not_found_route(uri.path()).into_response()
}

pub async fn method_not_allowed() -> Response {
    ApiError::method_not_allowed().into_response()
}

#[cfg(test)]
mod tests {
    use super::is_json_media_type;

    #[test]
    fn json_media_types() {
        for ok in [
            "application/json",
            "Application/JSON; charset=utf-8",
            "application/merge-patch+json",
        ] {
            assert!(is_json_media_type(ok), "{ok}");
        }
        for bad in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "",
        ] {
            assert!(!is_json_media_type(bad), "{bad}");
        }
    }
}
