//! The HTTP/1 connection loop under the axum Router. `axum::serve` has no read timeouts, no
//! connection cap, and its graceful shutdown waits on connections that never finished sending
//! a request head; this loop drives hyper's connections itself so that each of those is
//! bounded: hyper's `header_read_timeout` for request heads, tower-http's body timeout
//! (routes.rs answers 408), an idle keep-alive timer per connection, a semaphore for
//! `--max-connections`, and shutdown that drops every connection not inside a request.
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::StatusCode;
use axum::Router;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, Semaphore};
use tower::ServiceExt;

use super::error::ApiError;
use super::ServeArgs;

/// The most bytes of request line plus headers taken (431 above); hyper's own cap on header
/// fields is 100.
pub const MAX_HEAD_BYTES: usize = 256 * 1024;
const MAX_HEADER_FIELDS: usize = 100;
/// hyper's limit on the request-target (414 above).
const MAX_URI_BYTES: usize = u16::MAX as usize - 1;

/// The connection-level limits (`--header-read-timeout` and friends).
#[derive(Clone, Debug)]
pub struct HttpLimits {
    pub header_read_timeout: Duration,
    pub request_body_timeout: Duration,
    pub keep_alive_timeout: Duration,
    pub max_connections: u32,
}

impl HttpLimits {
    pub fn from_args(a: &ServeArgs) -> anyhow::Result<Self> {
        let max_connections = match a.max_connections {
            Some(0) => anyhow::bail!("--max-connections must be 1 or more, got 0"),
            Some(n) => n,
            None => {
                raise_open_file_limit();
                default_max_connections()
            }
        };
        Ok(Self {
            header_read_timeout: seconds("--header-read-timeout", a.header_read_timeout)?,
            request_body_timeout: seconds("--request-body-timeout", a.request_body_timeout)?,
            keep_alive_timeout: seconds("--timeout-keep-alive", a.timeout_keep_alive)?,
            max_connections,
        })
    }
}

fn seconds(flag: &str, v: f64) -> anyhow::Result<Duration> {
    // A day at most: Duration::from_secs_f64 panics on huge values, and no client needs more.
    if !(v > 0.0 && v <= 86_400.0) {
        anyhow::bail!("{flag} must be more than 0 and at most 86400 seconds, got {v}");
    }
    Ok(Duration::from_secs_f64(v))
}

/// Every open connection holds one permit, so the semaphore both caps them and tells when
/// all are closed.
pub struct Connections {
    permits: Arc<Semaphore>,
    max: u32,
}

impl Connections {
    pub fn new(max: u32) -> Arc<Self> {
        Arc::new(Self {
            permits: Arc::new(Semaphore::new(max as usize)),
            max,
        })
    }

    /// Wait until every connection has closed.
    pub async fn closed(&self) {
        let _ = self.permits.acquire_many(self.max).await;
    }

    /// `closed`, for at most `limit`; false when the limit passed first.
    pub async fn wait_closed(&self, limit: Duration) -> bool {
        tokio::time::timeout(limit, self.closed()).await.is_ok()
    }

    pub fn open(&self) -> usize {
        self.max as usize - self.permits.available_permits()
    }
}

/// Raise the soft open-file limit to the hard one (as Go's runtime does): the soft default
/// (often 1024) would otherwise cap a server meant for thousands of clients.
fn raise_open_file_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write only the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max.min(1 << 20);
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// The default `--max-connections`: what the open-file limit leaves once the server's own
/// files (model, tokenizer, runtime) are set aside, so that accept never fails with EMFILE.
pub fn default_max_connections() -> u32 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct we pass.
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur
    } else {
        1024
    };
    let soft: u64 = soft.min(1 << 20);
    let reserve = (soft / 2).min(128);
    (soft - reserve).clamp(1, u32::MAX as u64) as u32
}

/// Requests in progress on one connection, and how many it has had. The serving task
/// watches it to tell an idle connection (keep-alive timer, closed at shutdown) from a busy
/// one.
#[derive(Default)]
struct Activity {
    active: AtomicUsize,
    started: AtomicU64,
    changed: Notify,
}

impl Activity {
    fn begin(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::SeqCst);
        self.started.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_one();
        ActiveGuard(self.clone())
    }

    fn idle(&self) -> bool {
        self.active.load(Ordering::SeqCst) == 0
    }
}

/// Held by a request from its head to the end of its response body.
struct ActiveGuard(Arc<Activity>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
        self.0.changed.notify_one();
    }
}

/// Accept connections until `stop` turns true, serving each with `app`. Returns once the
/// listener is closed; the connections go on until they finish (see `Connections`).
pub async fn accept_loop(
    listener: TcpListener,
    app: Router,
    limits: HttpLimits,
    conns: Arc<Connections>,
    mut stop: watch::Receiver<bool>,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_header_size(MAX_HEAD_BYTES)
        .keep_alive(true);
    // tower-http's timer restarts with each piece of body that arrives: it bounds a stalled
    // body (shorter than its Content-Length), and routes.rs turns its error into 408.
    let app = app.layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
        limits.request_body_timeout,
    ));
    let mut last_full_log: Option<Instant> = None;
    loop {
        let permit = match conns.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                // Once a minute at most: a flood would otherwise flood the log too.
                if last_full_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                    last_full_log = Some(Instant::now());
                    eprintln!(
                        "rvllm: {} connections open, the --max-connections limit; new connections wait \
                         in the listen backlog until one closes",
                        limits.max_connections
                    );
                }
                tokio::select! {
                    p = conns.permits.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => return,
                    },
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        };
        let (tcp, _peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and the like: the condition passes as connections close.
                    eprintln!("rvllm: accepting a connection failed: {e}; retrying in 100 ms");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.wait_for(|s| *s) => return,
        };
        // Stream chunks are small writes: without TCP_NODELAY, Nagle's algorithm holds each
        // one back until the client's (delayed, ~40 ms) ACK of the previous.
        let _ = tcp.set_nodelay(true);
        let activity = Arc::new(Activity::default());
        let io = TokioIo::new(HttpIo {
            tcp,
            activity: activity.clone(),
            replacing: None,
        });
        let svc_activity = activity.clone();
        let app = app.clone();
        let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let guard = svc_activity.begin();
            let app = app.clone();
            async move {
                let resp = app.oneshot(req.map(Body::new)).await?;
                // The guard lives as long as the response body: a stream is a request in
                // progress until its last chunk is out.
                Ok::<_, std::convert::Infallible>(resp.map(|b| {
                    Body::new(b.map_frame(move |f| {
                        let _in_progress = &guard;
                        f
                    }))
                }))
            }
        });
        let conn = http.serve_connection(io, svc);
        let stop = stop.clone();
        let keep_alive = limits.keep_alive_timeout;
        tokio::spawn(async move {
            let _permit = permit;
            serve_one(conn, activity, keep_alive, stop).await;
        });
    }
}

async fn serve_one<S>(
    conn: hyper::server::conn::http1::Connection<TokioIo<HttpIo>, S>,
    activity: Arc<Activity>,
    keep_alive: Duration,
    mut stop: watch::Receiver<bool>,
) where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = Body>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::pin!(conn);
    let mut stopping = false;
    loop {
        // hyper's header timer already bounds a connection that has had no request; after a
        // response, the (usually shorter) keep-alive timer takes over.
        let idle_after_request = activity.idle() && activity.started.load(Ordering::SeqCst) > 0;
        if stopping && activity.idle() {
            return; // dropping it closes the socket
        }
        let keep_alive_over = async {
            if idle_after_request {
                tokio::time::sleep(keep_alive).await
            } else {
                std::future::pending().await
            }
        };
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = stop.wait_for(|s| *s), if !stopping => {
                // In-flight requests finish and then the connection closes; one that is idle,
                // or still sending a request head, is closed now (the loop's first check).
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = activity.changed.notified() => {}
            _ = keep_alive_over => return,
        }
    }
}

/// The socket, with one change: hyper's own answers to requests it cannot parse
/// (400/414/431, written before any request reaches the Router) have empty bodies; they are
/// replaced by the same answer with an OpenAI-style JSON error body.
struct HttpIo {
    tcp: TcpStream,
    activity: Arc<Activity>,
    /// The replacement being written: bytes, how many went out, the length hyper gave.
    replacing: Option<(Vec<u8>, usize, usize)>,
}

impl AsyncRead for HttpIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for HttpIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.replacing.is_none() && this.activity.idle() {
            if let Some(status) = hyper_error_status(buf) {
                this.replacing = Some((parse_error_response(status), 0, buf.len()));
            }
        }
        if let Some((bytes, sent, given)) = &mut this.replacing {
            while *sent < bytes.len() {
                let n = ready!(Pin::new(&mut this.tcp).poll_write(cx, &bytes[*sent..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                *sent += n;
            }
            let given = *given;
            this.replacing = None;
            return Poll::Ready(Ok(given));
        }
        Pin::new(&mut this.tcp).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// The status of hyper's automatic parse-error answer, if `buf` is one: a lone head with
/// status 400, 414 or 431 and `content-length: 0`. Only called while no request is in
/// progress, when nothing else can be written.
fn hyper_error_status(buf: &[u8]) -> Option<u16> {
    if buf.len() > 512 || !buf.ends_with(b"\r\n\r\n") {
        return None;
    }
    let head = std::str::from_utf8(buf).ok()?;
    let rest = head
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| head.strip_prefix("HTTP/1.0 "))?;
    let status: u16 = rest.get(..3)?.parse().ok()?;
    let empty = head
        .split("\r\n")
        .any(|l| l.eq_ignore_ascii_case("content-length: 0"));
    (matches!(status, 400 | 414 | 431) && empty && head.matches("\r\n\r\n").count() == 1)
        .then_some(status)
}

fn parse_error(status: u16) -> ApiError {
    let (status, message, code) = match status {
        414 => (
            StatusCode::URI_TOO_LONG,
            format!(
                "The request URI is longer than this server accepts ({MAX_URI_BYTES} bytes); send the \
                 parameters in a JSON body instead"
            ),
            "uri_too_long",
        ),
        431 => (
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!(
                "The request headers are larger than this server accepts (at most {MAX_HEADER_FIELDS} \
                 header fields and {} KiB for the request line and headers together); send fewer or \
                 smaller headers",
                MAX_HEAD_BYTES / 1024
            ),
            "headers_too_large",
        ),
        _ => (
            StatusCode::BAD_REQUEST,
            "The request is not valid HTTP/1.1 (its request line, method, URI, version or a header \
             could not be parsed); check the request's syntax"
                .to_string(),
            "invalid_http",
        ),
    };
    ApiError {
        status,
        message,
        kind: "invalid_request_error",
        param: None,
        code: Some(code),
    }
}

fn parse_error_response(status: u16) -> Vec<u8> {
    let err = parse_error(status);
    let body = err.to_json();
    format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        err.status.as_u16(),
        err.status.canonical_reason().unwrap_or(""),
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognizes_only_hypers_empty_error_heads() {
        let h = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: Mon, 01 Jan 2024 00:00:00 GMT\r\n\r\n";
        assert_eq!(hyper_error_status(h), Some(431));
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(hyper_error_status(ok), None);
        let with_body = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(hyper_error_status(with_body), None);
    }

    #[test]
    fn replacement_is_a_complete_json_answer() {
        let r = String::from_utf8(parse_error_response(414)).unwrap();
        let (head, body) = r.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 414 URI Too Long\r\n"), "{head}");
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "uri_too_long");
        assert!(v["error"]["param"].is_null());
    }

    #[test]
    fn default_connection_cap_leaves_files_for_the_server() {
        let n = default_max_connections();
        assert!(n >= 1);
    }
}
