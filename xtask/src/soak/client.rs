//! One soak client's requests, over raw HTTP/1.1 on a `TcpStream` so that a client can do
//! what a library would not let it: hang up mid-stream, send headers a byte at a time, lie
//! about its body length, or send bytes that are not HTTP at all.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

/// A small deterministic PRNG (xorshift64*): each client has its own, seeded from --seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    pub fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.next() as usize % xs.len()]
    }
}

/// What the client expects the server to do with a request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Expect {
    /// 200 with a complete body (`[DONE]` for a stream, `choices` otherwise).
    Success { stream: bool },
    /// A 4xx answer, or the server closing the connection; with `ok_too`, a 200 is fine as
    /// well (limits a server may or may not enforce).
    Refused { ok_too: bool },
}

/// What the client does while the request runs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Action {
    Whole,
    /// Hang up after this many SSE events.
    CutAfterEvents(usize),
    /// Hang up after this long if the answer is not complete by then (a cancellation).
    CutAfter(Duration),
    /// Send the request a byte per `gap`, hanging up after `total` if the server has not
    /// answered or closed by then.
    Slow {
        gap: Duration,
        total: Duration,
    },
    /// Send `Content-Length` larger than the body, then half-close (`eof`) or wait `idle`
    /// and hang up.
    ShortBody {
        eof: bool,
        idle: Duration,
    },
}

pub struct Plan {
    pub scenario: &'static str,
    pub request: Vec<u8>,
    pub expect: Expect,
    pub action: Action,
}

/// How a request ended. The first four are fine; the rest fail the soak.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// A complete success answer.
    Ok,
    /// The client hung up on purpose.
    Cut,
    /// An expected refusal: the HTTP status, or 0 when the server closed the connection.
    Refused(u16),
    /// Accepted where a refusal was also fine (`Expect::Refused { ok_too: true }`).
    Accepted,
    /// 5xx.
    ServerError(u16),
    /// A stream or body that ended before it was complete.
    Truncated,
    /// No complete answer before the request deadline.
    Hung,
    /// Anything else (a refusal of a good request, a success for a bad one, a reset...).
    Unexpected(String),
}

impl Outcome {
    pub fn is_failure(&self) -> bool {
        !matches!(
            self,
            Outcome::Ok | Outcome::Cut | Outcome::Refused(_) | Outcome::Accepted
        )
    }
    /// The label the summary groups by.
    pub fn label(&self) -> String {
        match self {
            Outcome::Ok => "ok".into(),
            Outcome::Cut => "cut by client".into(),
            Outcome::Refused(0) => "closed by server".into(),
            Outcome::Refused(s) => format!("refused {s}"),
            Outcome::Accepted => "accepted".into(),
            Outcome::ServerError(s) => format!("SERVER ERROR {s}"),
            Outcome::Truncated => "TRUNCATED".into(),
            Outcome::Hung => "HUNG".into(),
            Outcome::Unexpected(_) => "UNEXPECTED".into(),
        }
    }
}

/// A request with `Connection: close`, so the answer ends at EOF.
pub fn request(method: &str, path: &str, content_type: &str, body: &[u8]) -> Vec<u8> {
    request_claiming(method, path, content_type, body, body.len())
}

/// A request whose `Content-Length` says `claimed` whatever the body's length.
pub fn request_claiming(
    method: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
    claimed: usize,
) -> Vec<u8> {
    let mut r = format!(
        "{method} {path} HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\
         Content-Type: {content_type}\r\nContent-Length: {claimed}\r\n\r\n"
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

/// A plain GET (for /health and /metrics): the status and body, or why not.
pub fn get(addr: &str, path: &str, timeout: Duration) -> Result<(u16, String), String> {
    let mut s = connect(addr, timeout)?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).map_err(|e| e.to_string())?;
    let (status, body) = split_response(&buf).ok_or("no HTTP answer")?;
    Ok((status, String::from_utf8_lossy(body).into_owned()))
}

fn connect(addr: &str, timeout: Duration) -> Result<TcpStream, String> {
    let sa = addr
        .parse()
        .map_err(|e| format!("bad address {addr}: {e}"))?;
    let s = TcpStream::connect_timeout(&sa, timeout).map_err(|e| format!("connect: {e}"))?;
    s.set_nodelay(true).ok();
    s.set_read_timeout(Some(timeout)).ok();
    s.set_write_timeout(Some(timeout)).ok();
    Ok(s)
}

/// The status and the body of a complete response (the body as sent, chunked or not: the
/// checks below look for markers that chunk framing cannot split, since each SSE event is
/// written as one chunk).
fn split_response(buf: &[u8]) -> Option<(u16, &[u8])> {
    let end = find(buf, b"\r\n\r\n")?;
    let head = std::str::from_utf8(&buf[..end]).ok()?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, &buf[end + 4..]))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn count(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

/// Run one request to its end; `deadline` is when it counts as hung.
pub fn run(addr: &str, plan: &Plan, deadline: Duration) -> Outcome {
    let start = Instant::now();
    let mut s = match connect(addr, Duration::from_secs(30)) {
        Ok(s) => s,
        Err(e) => return Outcome::Unexpected(e),
    };
    let mut cut_at: Option<Instant> = None;
    let sent = match plan.action {
        Action::Slow { gap, total } => {
            let stop = start + total;
            let mut r = Ok(());
            for b in &plan.request {
                if Instant::now() >= stop {
                    return Outcome::Cut;
                }
                if let Err(e) = s.write_all(std::slice::from_ref(b)) {
                    r = Err(e);
                    break;
                }
                std::thread::sleep(gap);
            }
            r
        }
        Action::ShortBody { eof, idle } => {
            let r = s.write_all(&plan.request);
            if eof {
                let _ = s.shutdown(Shutdown::Write);
            } else {
                cut_at = Some(Instant::now() + idle);
            }
            r
        }
        Action::CutAfter(d) => {
            cut_at = Some(start + d);
            s.write_all(&plan.request)
        }
        _ => s.write_all(&plan.request),
    };
    if let Err(e) = sent {
        // The server may have answered and closed before taking the whole request (413).
        if !matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset) {
            return Outcome::Unexpected(format!("write: {e}"));
        }
    }
    let hung_at = start + deadline;
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 16384];
    loop {
        let now = Instant::now();
        let until = cut_at.map_or(hung_at, |c| c.min(hung_at));
        if now >= until {
            return if cut_at.is_some_and(|c| c <= hung_at) {
                Outcome::Cut
            } else {
                Outcome::Hung
            };
        }
        s.set_read_timeout(Some(until - now)).ok();
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if let Action::CutAfterEvents(k) = plan.action {
                    if let Some((200, body)) = split_response(&buf) {
                        if count(body, b"data: ") >= k && find(body, b"data: [DONE]").is_none() {
                            return Outcome::Cut;
                        }
                    }
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(e) if e.kind() == ErrorKind::ConnectionReset && buf.is_empty() => {
                return match plan.expect {
                    Expect::Refused { .. } => Outcome::Refused(0),
                    Expect::Success { .. } => Outcome::Unexpected("connection reset".into()),
                }
            }
            Err(e) => {
                return match plan.expect {
                    Expect::Refused { .. } if split_response(&buf).is_none() => Outcome::Refused(0),
                    _ => Outcome::Unexpected(format!("read: {e}")),
                }
            }
        }
    }
    classify(plan, &buf)
}

fn classify(plan: &Plan, buf: &[u8]) -> Outcome {
    let Some((status, body)) = split_response(buf) else {
        return match plan.expect {
            Expect::Refused { .. } if buf.is_empty() => Outcome::Refused(0),
            _ if buf.is_empty() => Outcome::Unexpected("closed without an answer".into()),
            _ => Outcome::Unexpected(format!(
                "not an HTTP answer: {:?}",
                String::from_utf8_lossy(&buf[..buf.len().min(200)])
            )),
        };
    };
    let text = || String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
    if status >= 500 {
        return Outcome::ServerError(status);
    }
    match plan.expect {
        Expect::Success { stream } => match status {
            200 if stream => {
                if find(body, b"data: [DONE]").is_some() && find(body, b"\"error\"").is_none() {
                    Outcome::Ok
                } else {
                    Outcome::Truncated
                }
            }
            200 if find(body, b"\"choices\"").is_some() => Outcome::Ok,
            200 => Outcome::Truncated,
            s => Outcome::Unexpected(format!("status {s} for a good request: {}", text())),
        },
        Expect::Refused { ok_too } => match status {
            400..=499 => Outcome::Refused(status),
            200..=299 if ok_too => Outcome::Accepted,
            s => Outcome::Unexpected(format!("status {s} for a bad request: {}", text())),
        },
    }
}
