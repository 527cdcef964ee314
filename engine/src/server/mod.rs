//! `rvllm serve`: an OpenAI-compatible HTTP server over the `AsyncEngine`. This module is the
//! only one that knows HTTP, JSON or the OpenAI wire format (ARCHITECTURE.md invariant 4).
//! protocol.rs (wire requests) → validate.rs (internal jobs) → completions.rs / chat.rs
//! (through generation.rs to the engine) → responses.rs; sse.rs frames streams, metrics.rs
//! renders /metrics, error.rs shapes every failure, routes.rs holds the small routes;
//! compat.rs takes `vllm serve`'s flags (accepts, or refuses saying why); reasoning.rs
//! splits a reasoning model's thinking from its answer (`--reasoning-parser`); tools/ reads
//! tool calls (`--enable-auto-tool-choice --tool-call-parser`, `tool_choice`). The
//! field_audit.rs test holds every request field to a decision: honoured or refused.
pub mod chat;
pub mod compat;
pub mod completions;
pub mod cpu_work;
pub mod error;
#[cfg(test)]
mod field_audit;
pub mod generation;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod protocol;
pub mod reasoning;
pub mod responses;
pub mod routes;
pub mod sse;
pub mod tools;
pub mod validate;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use clap::Args;

use crate::engine::{AsyncEngine, EngineArgs};
use crate::sampling::SamplingParams;
use crate::tokenizer::Tokenizer;
use compat::VllmCompatArgs;
use error::ApiError;
use metrics::ServerMetrics;

#[derive(Args, Clone, Debug)]
pub struct ServeArgs {
    /// The model to serve (the same as --model).
    #[arg(value_name = "MODEL")]
    pub model_tag: Option<String>,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    pub host: String,
    /// Port to listen on (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Require `Authorization: Bearer <key>` on every route but /health (also read from
    /// RVLLM_API_KEY, else VLLM_API_KEY as vLLM does).
    #[arg(long, env = "RVLLM_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// A chat template (a file, or the template text itself) overriding the model's.
    #[arg(long)]
    pub chat_template: Option<String>,
    /// Honour a `chat_template` sent in a request (chat, /tokenize); without this flag such
    /// a request is refused, as vLLM does (a template is code the server runs).
    #[arg(long)]
    pub trust_request_chat_template: bool,
    /// Put a reasoning model's thinking in chat messages' `reasoning_content` (vLLM's
    /// parsers: deepseek_r1, qwen3; see server/reasoning.rs).
    #[arg(long, value_name = "NAME", value_parser = parse_reasoning_parser)]
    pub reasoning_parser: Option<reasoning::ReasoningParser>,
    /// Largest request body accepted (413 above).
    #[arg(long, default_value_t = 16 * 1024 * 1024)]
    pub max_request_body_bytes: usize,
    /// Seconds that in-flight requests get to finish after SIGTERM / Ctrl-C.
    #[arg(long, default_value_t = 30.0)]
    pub shutdown_grace_period: f64,
    /// Seconds a client has to send a request's line and headers, counted from when the
    /// connection opens (or, on a kept-alive connection, from the previous response); the
    /// connection is closed after that.
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS")]
    pub header_read_timeout: f64,
    /// Seconds the server waits for the next piece of a request body before answering 408
    /// and closing the connection.
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS")]
    pub request_body_timeout: f64,
    /// Seconds an idle keep-alive connection stays open waiting for its next request
    /// (uvicorn's name and vLLM's default; also read from VLLM_HTTP_TIMEOUT_KEEP_ALIVE).
    #[arg(
        long,
        env = "VLLM_HTTP_TIMEOUT_KEEP_ALIVE",
        default_value_t = 5.0,
        value_name = "SECONDS"
    )]
    pub timeout_keep_alive: f64,
    /// Most connections open at once; further ones wait in the listen backlog until one
    /// closes (a log line says when the limit is reached). Default: the open-file limit
    /// less what the server keeps for itself.
    #[arg(long, value_name = "N")]
    pub max_connections: Option<u32>,
    /// A worker node of a multi-node group (--nnodes, --node-rank above 0): run this node's
    /// tensor-parallel ranks for the leader, serving no HTTP (vLLM's flag).
    #[arg(long)]
    pub headless: bool,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub vllm: VllmCompatArgs,
}

fn parse_reasoning_parser(s: &str) -> Result<reasoning::ReasoningParser, String> {
    s.parse()
}

/// What every handler shares.
pub struct AppState {
    pub engine: AsyncEngine,
    pub tokenizer: Option<Arc<Tokenizer>>,
    pub served_model: String,
    pub model_path: String,
    pub chat_template: Option<String>,
    pub api_key: Option<String>,
    pub metrics: Arc<ServerMetrics>,
    pub max_body_bytes: usize,
    pub started_unix: u64,
    pub shutting_down: AtomicBool,
    /// `--max-logprobs`: the most top log-probabilities a request may ask for.
    pub max_logprobs: usize,
    /// `--seed`: seeds the requests that bring none, in arrival order.
    pub seed: Option<u64>,
    pub unseeded_requests: AtomicU64,
    /// `--return-tokens-as-token-ids`.
    pub return_tokens_as_token_ids: bool,
    /// `--trust-request-chat-template`.
    pub trust_request_chat_template: bool,
    /// `--reasoning-parser`.
    pub reasoning_parser: Option<reasoning::ReasoningParser>,
    /// `--tool-call-parser` when `--enable-auto-tool-choice` is on: reads the calls of
    /// requests whose `tool_choice` is auto.
    pub auto_tool_parser: Option<tools::ToolParserName>,
    /// Whether the engine shares a prefix cache between requests (`cache_salt` needs not).
    pub prefix_caching: bool,
    /// Parsing, template rendering and tokenizing, off the async threads (cpu_work.rs).
    pub cpu_work: cpu_work::CpuWork,
}

impl AppState {
    /// Server-wide defaults for what a validated request left unset: a seed derived from
    /// `--seed` and the request's arrival number, and `--return-tokens-as-token-ids`.
    pub fn apply_defaults(&self, params: &mut SamplingParams, tokens_as_ids: &mut bool) {
        if let (None, Some(s)) = (params.seed, self.seed) {
            let i = self.unseeded_requests.fetch_add(1, Ordering::Relaxed);
            params.seed = Some(compat::request_seed(s, i));
        }
        *tokens_as_ids |= self.return_tokens_as_token_ids;
    }
}

/// The routes, with auth and error counting around them.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/completions", post(completions::completions))
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/models", get(routes::models))
        .route("/health", get(routes::health))
        .route("/version", get(routes::version))
        .route("/metrics", get(routes::metrics))
        .route("/tokenize", post(routes::tokenize))
        .route("/detokenize", post(routes::detokenize))
        .route_layer(axum::middleware::from_fn(routes::require_json))
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

/// Bearer auth on everything but /health, and a count of error answers for /metrics.
async fn guard(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &st.api_key {
        if req.uri().path() != "/health" {
            let given = req
                .headers()
                .get(axum::http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim);
            if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), key.as_bytes())) {
                st.metrics.error_answered();
                return ApiError::unauthorized().into_response();
            }
        }
    }
    let resp = next.run(req).await;
    if resp.status().is_client_error() || resp.status().is_server_error() {
        st.metrics.error_answered();
    }
    resp
}

/// Compare keys without an early exit, so that timing does not reveal a prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `--chat-template`: a file when one exists at that path, else the template text itself.
fn load_chat_template(arg: &str) -> Result<String> {
    let p = Path::new(arg);
    if p.is_file() {
        return std::fs::read_to_string(p)
            .with_context(|| format!("reading --chat-template {}", p.display()));
    }
    if arg.contains("{{") || arg.contains("{%") {
        return Ok(arg.to_string());
    }
    bail!("--chat-template `{arg}` is neither a readable file nor a Jinja template; give a path to a template file")
}

/// `rvllm serve`: load the model, serve until SIGTERM / Ctrl-C, then drain and exit.
pub fn run(mut args: ServeArgs) -> Result<()> {
    match (&args.model_tag, args.engine.model.is_empty()) {
        (Some(tag), true) => args.engine.model = tag.clone(),
        (Some(tag), false) if *tag != args.engine.model => {
            bail!("the model is given twice, as `{tag}` and as --model `{}`; give it once", args.engine.model)
        }
        (None, true) => bail!("no model given: `rvllm serve MODEL` (a Hugging Face folder, a .gguf file, or org/name)"),
        _ => {}
    }
    if !(args.shutdown_grace_period >= 0.0 && args.shutdown_grace_period.is_finite()) {
        bail!(
            "--shutdown-grace-period must be 0 or more seconds, got {}",
            args.shutdown_grace_period
        );
    }
    let limits = http::HttpLimits::from_args(&args)?;
    let chat_template = args
        .chat_template
        .as_deref()
        .map(load_chat_template)
        .transpose()?;
    for note in args.vllm.check(&args.engine)? {
        eprintln!("rvllm: note: {note}");
    }
    if args.headless {
        args.engine.kv_cache_dtype = args.vllm.kv_cache_dtype.clone();
        return crate::engine::serve_headless(&args.engine);
    }
    let api_key = args
        .api_key
        .clone()
        .or_else(|| std::env::var("VLLM_API_KEY").ok())
        .filter(|k| !k.is_empty());
    let addr: SocketAddr = format!("{}:{}", args.host, args.port)
        .parse()
        .or_else(|_| {
            use std::net::ToSocketAddrs;
            (args.host.as_str(), args.port)
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .ok_or(())
        })
        .map_err(|_| {
            anyhow::anyhow!(
                "--host `{}` is not an address this machine can listen on",
                args.host
            )
        })?;
    // Bind before loading the model so a taken port fails fast.
    let std_listener = std::net::TcpListener::bind(addr).with_context(|| {
        format!("listening on {addr} (is another server using it? choose another --port)")
    })?;
    std_listener
        .set_nonblocking(true)
        .context("setting the listener non-blocking")?;
    let local = std_listener
        .local_addr()
        .context("reading the bound address")?;

    // The server's batch defaults (vLLM's usage context).
    args.engine.serving = true;
    // vLLM's flag is read among the compatibility flags; the engine checks its value.
    args.engine.kv_cache_dtype = args.vllm.kv_cache_dtype.clone();
    let engine = AsyncEngine::start(&args.engine).context("starting the engine")?;
    let state = Arc::new(AppState {
        tokenizer: engine.tokenizer(),
        served_model: engine.model_name().to_string(),
        model_path: args.engine.model.clone(),
        engine: engine.clone(),
        chat_template,
        api_key,
        metrics: Arc::new(ServerMetrics::new()),
        max_body_bytes: args.max_request_body_bytes,
        started_unix: responses::unix_now(),
        shutting_down: AtomicBool::new(false),
        max_logprobs: args.vllm.max_logprobs as usize,
        seed: args.vllm.seed,
        unseeded_requests: AtomicU64::new(0),
        return_tokens_as_token_ids: args.vllm.return_tokens_as_token_ids,
        trust_request_chat_template: args.trust_request_chat_template,
        prefix_caching: args.engine.prefix_caching(),
        reasoning_parser: args.reasoning_parser,
        auto_tool_parser: args
            .vllm
            .tool_call_parser
            .filter(|_| args.vllm.enable_auto_tool_choice),
        cpu_work: cpu_work::CpuWork::for_this_machine(),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("rvllm-http")
        .build()
        .context("starting the tokio runtime")?;
    let grace = Duration::from_secs_f64(args.shutdown_grace_period);
    let conns = http::Connections::new(limits.max_connections);
    let result = rt.block_on(serve(
        std_listener,
        local,
        state,
        grace,
        limits,
        conns.clone(),
    ));
    engine.shutdown();
    // The requests the grace period cut off now have their answers (503, or an error event
    // in a stream): give them a moment to go out.
    rt.block_on(conns.wait_closed(Duration::from_secs(1)));
    // Streams cut off by the grace period may still hold tasks: do not wait for them.
    rt.shutdown_timeout(Duration::from_secs(1));
    eprintln!("rvllm: server stopped");
    result
}

async fn serve(
    std_listener: std::net::TcpListener,
    local: SocketAddr,
    state: Arc<AppState>,
    grace: Duration,
    limits: http::HttpLimits,
    conns: Arc<http::Connections>,
) -> Result<()> {
    let listener =
        tokio::net::TcpListener::from_std(std_listener).context("registering the listener")?;
    let (signalled_tx, signalled_rx) = tokio::sync::watch::channel(false);
    let st = state.clone();
    tokio::spawn(async move {
        let which = shutdown_signal().await;
        eprintln!(
            "rvllm: {which}: no new requests; waiting up to {:.0} s for in-flight ones",
            grace.as_secs_f64()
        );
        st.shutting_down.store(true, Ordering::SeqCst);
        st.engine.stop_accepting();
        let _ = signalled_tx.send(true);
    });
    eprintln!(
        "rvllm: serving `{}` on http://{local} (OpenAI API at http://{local}/v1)",
        state.served_model
    );
    eprintln!(
        "rvllm: at most {} connections; header read timeout {:.0} s, request body timeout {:.0} s, \
         keep-alive timeout {:.0} s",
        limits.max_connections,
        limits.header_read_timeout.as_secs_f64(),
        limits.request_body_timeout.as_secs_f64(),
        limits.keep_alive_timeout.as_secs_f64()
    );
    let accept = http::accept_loop(
        listener,
        router(state),
        limits,
        conns.clone(),
        signalled_rx.clone(),
    );
    let server = async move {
        accept.await;
        conns.closed().await;
    };
    let mut grace_rx = signalled_rx;
    let deadline = async move {
        let _ = grace_rx.wait_for(|s| *s).await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        _ = server => {}
        _ = deadline => eprintln!("rvllm: grace period over; aborting the requests still running"),
    }
    Ok(())
}

async fn shutdown_signal() -> &'static str {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("rvllm: cannot watch SIGTERM ({e}); Ctrl-C still stops the server");
                    let _ = tokio::signal::ctrl_c().await;
                    return "Ctrl-C";
                }
            };
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = tokio::signal::ctrl_c() => "Ctrl-C",
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "Ctrl-C"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }

    #[test]
    fn chat_template_argument_is_a_file_or_a_template() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("t.jinja");
        std::fs::write(&f, "{{ messages }}").unwrap();
        assert_eq!(
            load_chat_template(f.to_str().unwrap()).unwrap(),
            "{{ messages }}"
        );
        let inline = "{% for m in messages %}{{ m.content }}{% endfor %}";
        assert_eq!(load_chat_template(inline).unwrap(), inline);
        let e = load_chat_template("/no/such/file.jinja")
            .unwrap_err()
            .to_string();
        assert!(e.contains("neither a readable file"), "{e}");
    }
}
