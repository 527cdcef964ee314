//! Shared parts of the install tests: stand-in `rvllm` binaries, a release tree made by the
//! real `cargo xtask dist`, a small static HTTP server on 127.0.0.1 that can also misbehave
//! (serve other bytes, close a download early), and byte-exact prefix snapshots.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex, OnceLock};

pub const XTASK: &str = env!("CARGO_BIN_EXE_xtask");

/// Commits of the two releases and the nightly.
pub const COMMIT_010: &str = "0123456789abcdef0123456789abcdef01234567";
pub const COMMIT_020: &str = "89abcdef0123456789abcdef0123456789abcdef";
pub const COMMIT_NIGHTLY: &str = "fedcba9876543210fedcba9876543210fedcba98";
pub const NIGHTLY_VERSION: &str = "0.3.0-dev";

/// The target triple `install` computes for this machine.
pub fn host_triple() -> String {
    format!("{}-unknown-linux-gnu", std::env::consts::ARCH)
}

/// A stand-in for the engine: a shell script that answers `--version` like `rvllm` does.
/// `extra` lands in a comment (e.g. a `GLIBC_x.y` marker the glibc scan will find).
pub fn fake_rvllm(dir: &Path, version: &str, commit: &str, cuda: bool, extra: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let backends = if cuda { "cpu, cuda" } else { "cpu" };
    let path = dir.join("rvllm");
    let script = format!(
        "#!/bin/sh\n# {extra}\ncase \"$1\" in\n  --version|-V) echo \"rvllm {version} (commit {commit}, target {}, device backends: {backends})\" ;;\n  *) echo \"rvllm stand-in: $*\" ;;\nesac\n",
        host_triple()
    );
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Real fatbins (written by CUDA 13's fatbinary) standing in for the kernel build output.
pub fn kernels_dir(dir: &Path) -> PathBuf {
    let k = dir.join("kernels-out");
    std::fs::create_dir_all(&k).unwrap();
    let testdata = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/dist/testdata");
    std::fs::copy(
        testdata.join("sm80_sm90a_ptx90a.fatbin"),
        k.join("norm.fatbin"),
    )
    .unwrap();
    std::fs::copy(
        testdata.join("sm90_sm100f_ptx80.fatbin"),
        k.join("rope.fatbin"),
    )
    .unwrap();
    // kernels/build.rs writes this beside the fatbins; the artifact carries it.
    std::fs::write(k.join("built_archs.txt"), "sm_80 sm_90a +PTX compute_90a\n").unwrap();
    k
}

pub fn xtask(args: &[&str]) -> Output {
    Command::new(XTASK)
        .args(args)
        .env_remove("RVLLM_INDEX_URL")
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .expect("running xtask")
}

pub fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs xtask and requires success.
pub fn ok(args: &[&str]) -> Output {
    let o = xtask(args);
    assert!(o.status.success(), "xtask {args:?} failed:\n{}", text(&o));
    o
}

/// Runs xtask, requires failure, and returns stderr.
pub fn fails(args: &[&str]) -> String {
    let o = xtask(args);
    assert!(
        !o.status.success(),
        "xtask {args:?} should have failed:\n{}",
        text(&o)
    );
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!err.contains("panicked"), "xtask {args:?} panicked:\n{err}");
    // Shown with --nocapture: the exact messages users get.
    eprintln!("xtask {} -> {}", args.join(" "), err.trim());
    err
}

/// Packages one stand-in build with the real `dist` into `tree`.
pub fn dist_into(
    tree: &Path,
    scratch: &Path,
    version: &str,
    commit: &str,
    cuda: Option<&str>,
    channel: &str,
) {
    let bin_dir = scratch.join(format!("bin-{version}-{}", cuda.unwrap_or("cpu")));
    let bin = fake_rvllm(&bin_dir, version, commit, cuda.is_some(), "stand-in");
    let out = scratch.join("dist-out");
    let (bin, out, tree_s) = (
        bin.to_str().unwrap(),
        out.to_str().unwrap(),
        tree.to_str().unwrap(),
    );
    let kernels = kernels_dir(scratch);
    let kernels = kernels.to_str().unwrap();
    let mut args = vec![
        "dist",
        "--binary",
        bin,
        "--out",
        out,
        "--release-tree",
        tree_s,
        "--channel",
        channel,
    ];
    if let Some(c) = cuda {
        args.extend(["--cuda", c, "--kernels-dir", kernels]);
    }
    ok(&args);
}

/// Two releases (0.1.0, 0.2.0) and a nightly, each as CPU, CUDA 11.8 and CUDA 12.1 variants;
/// three commits. Built once per test binary.
pub fn release_tree() -> PathBuf {
    static TREE: OnceLock<tempfile::TempDir> = OnceLock::new();
    TREE.get_or_init(|| {
        let t = tempfile::tempdir().unwrap();
        let tree = t.path().join("tree");
        let scratch = t.path().join("scratch");
        for (v, c, ch) in [
            ("0.1.0", COMMIT_010, "release"),
            ("0.2.0", COMMIT_020, "release"),
            (NIGHTLY_VERSION, COMMIT_NIGHTLY, "nightly"),
        ] {
            for cuda in [None, Some("11.8"), Some("12.1")] {
                dist_into(&tree, &scratch, v, c, cuda, ch);
            }
        }
        t
    })
    .path()
    .join("tree")
}

/// What the server sends for a path instead of the file.
#[derive(Clone)]
pub enum Overlay {
    Body(Vec<u8>),
    /// Announces `announced` bytes, sends `body`, then closes the connection.
    Truncated {
        announced: usize,
        body: Vec<u8>,
    },
}

pub struct Server {
    pub base: String,
    overlays: Arc<Mutex<HashMap<String, Overlay>>>,
    requests: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// Serves `root` on a free port of 127.0.0.1 until the test process exits.
    pub fn start(root: &Path) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let overlays: Arc<Mutex<HashMap<String, Overlay>>> = Default::default();
        let requests: Arc<Mutex<Vec<String>>> = Default::default();
        let (o, r, root) = (overlays.clone(), requests.clone(), root.to_path_buf());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (o, r, root) = (o.clone(), r.clone(), root.clone());
                std::thread::spawn(move || serve(stream, &root, &o, &r));
            }
        });
        Server {
            base,
            overlays,
            requests,
        }
    }

    pub fn overlay(&self, path: &str, o: Overlay) {
        self.overlays.lock().unwrap().insert(path.to_string(), o);
    }

    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

fn serve(
    mut stream: TcpStream,
    root: &Path,
    overlays: &Mutex<HashMap<String, Overlay>>,
    requests: &Mutex<Vec<String>>,
) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    // Drain the headers.
    loop {
        let mut h = String::new();
        match reader.read_line(&mut h) {
            Ok(0) | Err(_) => break,
            Ok(_) if h == "\r\n" || h == "\n" => break,
            Ok(_) => {}
        }
    }
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    requests.lock().unwrap().push(path.clone());
    let overlay = overlays.lock().unwrap().get(&path).cloned();
    let (announced, body) = match overlay {
        Some(Overlay::Body(b)) => (b.len(), b),
        Some(Overlay::Truncated { announced, body }) => (announced, body),
        None => {
            let rel = path.trim_start_matches('/');
            let file = root.join(rel);
            match (rel.split('/').any(|c| c == ".."), std::fs::read(&file)) {
                (false, Ok(b)) => (b.len(), b),
                _ => {
                    let _ = stream.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot found");
                    return;
                }
            }
        }
    };
    let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {announced}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n");
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(&body);
    let _ = stream.flush();
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// Everything under `root`: kind, mode, contents or link target. Two equal snapshots mean
/// the tree is byte-for-byte the same. A missing root is an empty snapshot marked absent.
pub fn snapshot(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if std::fs::symlink_metadata(root).is_err() {
        out.insert(String::new(), "absent".into());
        return out;
    }
    walk(root, root, &mut out);
    out
}

fn walk(root: &Path, p: &Path, out: &mut BTreeMap<String, String>) {
    let meta = std::fs::symlink_metadata(p).unwrap();
    let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
    let mode = meta.permissions().mode() & 0o7777;
    let ft = meta.file_type();
    if ft.is_symlink() {
        out.insert(
            rel,
            format!("link -> {}", std::fs::read_link(p).unwrap().display()),
        );
    } else if ft.is_dir() {
        out.insert(rel, format!("dir {mode:o}"));
        let mut names: Vec<_> = std::fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        for n in names {
            walk(root, &n, out);
        }
    } else {
        let bytes = std::fs::read(p).unwrap();
        out.insert(
            rel,
            format!("file {mode:o} {} {}", bytes.len(), sha(&bytes)),
        );
    }
}

fn sha(b: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(b))
}

pub fn sha256_hex(b: &[u8]) -> String {
    sha(b)
}

/// Runs `PREFIX/bin/rvllm --version`.
pub fn installed_version(prefix: &Path) -> String {
    let o = Command::new(prefix.join("bin/rvllm"))
        .arg("--version")
        .output()
        .expect("running the installed rvllm");
    assert!(o.status.success());
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

pub fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}
