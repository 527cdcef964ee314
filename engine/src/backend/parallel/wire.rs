//! How the processes of a multi-node group meet: frames on TCP (a tag byte, a u64 length,
//! the payload), the hello every connection opens with, and rank 0's rendezvous, which
//! accepts one socket per other rank (the collectives, `tcp.rs`) and one per other node (the
//! step broadcast, `runner/tensor_parallel_remote.rs`) and refuses any process whose
//! protocol version, group shape or model fingerprint differs from its own, by name.
use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Bumped whenever a frame or the hello changes: processes of different builds refuse
/// each other instead of misreading.
pub const PROTOCOL_VERSION: u32 = 1;
const MAGIC: &[u8; 8] = b"RVLLMTP\0";
/// A frame past this is junk, not a step or an activation.
const MAX_FRAME: u64 = 1 << 34;
/// How long a connection to the rendezvous has to say its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// A failure sent in place of the expected frame; its payload is the message (UTF-8).
pub const TAG_ERROR: u8 = 0xEE;
/// The rendezvous' answer to an accepted hello.
pub const TAG_WELCOME: u8 = 0x57;

pub fn write_frame(mut s: impl Write, tag: u8, payload: &[u8]) -> std::io::Result<()> {
    let mut head = [0u8; 9];
    head[0] = tag;
    head[1..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    s.write_all(&head)?;
    s.write_all(payload)?;
    s.flush()
}

pub fn read_frame(s: impl Read) -> std::io::Result<(u8, Vec<u8>)> {
    read_frame_up_to(s, MAX_FRAME)
}

fn read_frame_up_to(mut s: impl Read, max: u64) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 9];
    s.read_exact(&mut head)?;
    let len = u64::from_le_bytes(head[1..].try_into().expect("8 bytes"));
    if len > max {
        return Err(std::io::Error::new(
            ErrorKind::InvalidData,
            format!("a frame of {len} bytes: the peer is not an rvllm rank"),
        ));
    }
    let mut payload = vec![0u8; len as usize];
    s.read_exact(&mut payload)?;
    Ok((head[0], payload))
}

/// Who opens a connection to rank 0: a rank (its collectives) or a node (its steps).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Rank(usize),
    Node(usize),
}

/// What every connection says first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub world: usize,
    pub nnodes: usize,
    /// The model and the flags that shape its ranks (`config_fingerprint`).
    pub fingerprint: u64,
    pub role: Role,
}

impl Hello {
    fn encode(&self) -> Vec<u8> {
        let (kind, index) = match self.role {
            Role::Rank(r) => (0u8, r),
            Role::Node(n) => (1u8, n),
        };
        let mut b = MAGIC.to_vec();
        b.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        b.extend_from_slice(&(self.world as u64).to_le_bytes());
        b.extend_from_slice(&(self.nnodes as u64).to_le_bytes());
        b.extend_from_slice(&self.fingerprint.to_le_bytes());
        b.push(kind);
        b.extend_from_slice(&(index as u64).to_le_bytes());
        b
    }

    /// The hello in `b`, checked against the leader's `own` (same version, group and
    /// model): an error that says what differs.
    fn decode_against(b: &[u8], own: &Hello) -> Result<Hello> {
        if b.len() < 12 || &b[..8] != MAGIC {
            bail!("a connection that is not an rvllm tensor-parallel process");
        }
        let version = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
        if version != PROTOCOL_VERSION || b.len() != 45 {
            bail!(
                "a process speaking protocol version {version}, the leader {PROTOCOL_VERSION}: \
                 run the same rvllm build on every node"
            );
        }
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let (world, nnodes, fingerprint) = (u64_at(12) as usize, u64_at(20) as usize, u64_at(28));
        let index = u64_at(37) as usize;
        let role = match b[36] {
            0 => Role::Rank(index),
            1 => Role::Node(index),
            k => bail!("a hello of unknown kind {k}"),
        };
        let who = match role {
            Role::Rank(r) => format!("rank {r}"),
            Role::Node(n) => format!("node {n}"),
        };
        if (world, nnodes) != (own.world, own.nnodes) {
            bail!(
                "{who} runs --tensor-parallel-size {world} --nnodes {nnodes}, the leader \
                 --tensor-parallel-size {} --nnodes {}: start every node with the same flags",
                own.world,
                own.nnodes
            );
        }
        if fingerprint != own.fingerprint {
            bail!(
                "{who} loaded a different model or runs different flags (fingerprint {fingerprint:016x}, \
                 the leader's {:016x}): start every node with the same --model and engine flags",
                own.fingerprint
            );
        }
        Ok(Hello {
            world,
            nnodes,
            fingerprint,
            role,
        })
    }
}

/// Connects to `addr`, retrying until `deadline` (the leader may still be loading).
pub fn connect(addr: &str, deadline: Instant) -> Result<TcpStream> {
    let mut last = None;
    while Instant::now() < deadline {
        let addrs: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .map(|a| a.collect())
            .unwrap_or_default();
        for a in &addrs {
            match TcpStream::connect_timeout(a, Duration::from_secs(2)) {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    match last {
        Some(e) => Err(e).with_context(|| {
            format!("the leader at {addr} (--master-addr:--master-port) did not answer in time")
        }),
        None => bail!("--master-addr:--master-port `{addr}` does not resolve to an address"),
    }
}

/// Says `hello` to the leader on `s` and waits (until `deadline`) for its welcome, whose
/// payload it returns; a refusal is an error carrying the leader's reason.
pub fn join(s: &mut TcpStream, hello: &Hello, deadline: Instant) -> Result<Vec<u8>> {
    send_hello(s, hello)?;
    await_welcome(s, deadline)
}

/// `join`'s first half, for a rank of the leader's own process, which must say hello before
/// the leader accepts (its welcome comes once the rendezvous is complete).
pub fn send_hello(s: &mut TcpStream, hello: &Hello) -> Result<()> {
    write_frame(&mut *s, 0, &hello.encode()).context("sending the hello to the leader")
}

pub fn await_welcome(s: &mut TcpStream, deadline: Instant) -> Result<Vec<u8>> {
    s.set_read_timeout(Some(remaining(deadline)))?;
    let (tag, payload) = read_frame(&mut *s).context("waiting for the leader's welcome")?;
    match tag {
        TAG_WELCOME => Ok(payload),
        TAG_ERROR => bail!(
            "the leader refused this process: {}",
            String::from_utf8_lossy(&payload)
        ),
        t => bail!("the leader answered the hello with frame {t}"),
    }
}

fn remaining(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(10))
}

/// The sockets rank 0 accepted: every other rank's, every other node's.
pub struct Accepted {
    pub ranks: BTreeMap<usize, TcpStream>,
    pub nodes: BTreeMap<usize, TcpStream>,
}

/// Rank 0's rendezvous: accepts on `listener` until every rank 1.. and every node 1.. has
/// said a hello matching `own` (each welcomed, a node with `node_welcome`), or fails at
/// `deadline` naming who never came, or at the first mismatched process (refused by name).
pub fn accept_all(
    listener: &TcpListener,
    own: &Hello,
    node_welcome: &[u8],
    deadline: Instant,
) -> Result<Accepted> {
    listener.set_nonblocking(true)?;
    let mut got = Accepted {
        ranks: BTreeMap::new(),
        nodes: BTreeMap::new(),
    };
    while got.ranks.len() + 1 < own.world || got.nodes.len() + 1 < own.nnodes {
        let mut s = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing_ranks: Vec<usize> = (1..own.world)
                        .filter(|r| !got.ranks.contains_key(r))
                        .collect();
                    let missing_nodes: Vec<usize> = (1..own.nnodes)
                        .filter(|n| !got.nodes.contains_key(n))
                        .collect();
                    bail!(
                        "nodes {missing_nodes:?} (ranks {missing_ranks:?}) never joined the leader's \
                         rendezvous on port {} (RVLLM_TP_RENDEZVOUS_TIMEOUT_S): start them with \
                         --headless --node-rank N and this --master-addr / --master-port",
                        listener.local_addr().map(|a| a.port()).unwrap_or(0)
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => return Err(e).context("accepting a rank's connection"),
        };
        s.set_nonblocking(false)?;
        // Anything may connect to the port (a scanner, a probe): what is not an rvllm
        // process's hello within a few seconds is dropped, not waited for.
        s.set_read_timeout(Some(remaining(deadline).min(HELLO_TIMEOUT)))?;
        let b = match read_frame_up_to(&mut s, 64) {
            Ok((_, b)) if b.starts_with(MAGIC) => b,
            other => {
                let why = other.map_or_else(|e| e.to_string(), |_| "no rvllm hello".into());
                let from = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
                eprintln!("rvllm: rendezvous: dropped a connection from {from}: {why}");
                continue;
            }
        };
        let hello = match Hello::decode_against(&b, own).and_then(|h| check_new(&got, own, h)) {
            Ok(h) => h,
            Err(e) => {
                let _ = write_frame(&mut s, TAG_ERROR, format!("{e:#}").as_bytes());
                return Err(e.context("refused a process at the rendezvous"));
            }
        };
        match hello.role {
            Role::Rank(r) => {
                write_frame(&mut s, TAG_WELCOME, &[])?;
                got.ranks.insert(r, s);
            }
            Role::Node(n) => {
                write_frame(&mut s, TAG_WELCOME, node_welcome)?;
                got.nodes.insert(n, s);
            }
        }
    }
    Ok(got)
}

fn check_new(got: &Accepted, own: &Hello, h: Hello) -> Result<Hello> {
    match h.role {
        Role::Rank(r) if r == 0 || r >= own.world => {
            bail!("rank {r} is outside ranks 1..{}", own.world)
        }
        Role::Rank(r) if got.ranks.contains_key(&r) => {
            bail!("rank {r} joined twice: two nodes run the same --node-rank")
        }
        Role::Node(n) if n == 0 || n >= own.nnodes => {
            bail!("--node-rank {n} is outside 1..{}", own.nnodes)
        }
        Role::Node(n) if got.nodes.contains_key(&n) => {
            bail!("node {n} joined twice: two nodes run --node-rank {n}")
        }
        _ => Ok(h),
    }
}

/// Seconds from $`var`, else `default`.
fn seconds_from_env(var: &str, default: u64) -> Duration {
    let secs = std::env::var(var)
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0);
    secs.map_or(Duration::from_secs(default), Duration::from_secs_f64)
}

/// How long a rank waits for a peer's bytes inside a step (RVLLM_TP_STEP_TIMEOUT_S, 300).
pub fn step_timeout() -> Duration {
    seconds_from_env("RVLLM_TP_STEP_TIMEOUT_S", 300)
}

/// How long the nodes have to meet and load their shards (RVLLM_TP_RENDEZVOUS_TIMEOUT_S, 900):
/// a leader still loading a large checkpoint keeps the workers waiting.
pub fn rendezvous_timeout() -> Duration {
    seconds_from_env("RVLLM_TP_RENDEZVOUS_TIMEOUT_S", 900)
}
