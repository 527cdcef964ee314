//! Hugging Face hub ids (`org/name`): fetched into the usual cache layout
//! (`$HF_HOME/hub/models--org--name/snapshots/<commit>/...`, `refs/main` naming the commit),
//! so a model fetched by transformers is found here and the other way round.
//!
//! Honours `HF_HOME` / `HF_HUB_CACHE`, `HF_TOKEN`, `HF_HUB_OFFLINE` and `HF_ENDPOINT`.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};

/// Where the hub is and how to reach it; read from the environment by [`HubSettings::from_env`]
/// (tests build it directly, since the environment is shared by every test thread).
#[derive(Debug, Clone)]
pub struct HubSettings {
    pub endpoint: String,
    pub token: Option<String>,
    pub offline: bool,
    /// The `hub` folder of the cache (holding `models--org--name`).
    pub cache_dir: PathBuf,
}

fn truthy(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_lowercase().as_str(),
        "1" | "true" | "yes" | "on"
    )
}

impl HubSettings {
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let hf_home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let home = var("HOME").unwrap_or_else(|| ".".into());
            Path::new(&home).join(".cache").join("huggingface")
        });
        let cache_dir = var("HF_HUB_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let token = var("HF_TOKEN").or_else(|| {
            std::fs::read_to_string(hf_home.join("token"))
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
        });
        HubSettings {
            endpoint: var("HF_ENDPOINT")
                .unwrap_or_else(|| "https://huggingface.co".into())
                .trim_end_matches('/')
                .to_string(),
            token,
            offline: var("HF_HUB_OFFLINE").is_some_and(|v| truthy(&v))
                || var("TRANSFORMERS_OFFLINE").is_some_and(|v| truthy(&v)),
            cache_dir,
        }
    }

    fn repo_dir(&self, repo: &str) -> PathBuf {
        self.cache_dir
            .join(format!("models--{}", repo.replace('/', "--")))
    }
}

/// Whether `spec` has the shape of a hub id: `org/name`, each part letters, digits, `-_.`.
pub fn looks_like_repo_id(spec: &str) -> bool {
    let mut parts = spec.split('/');
    let (Some(a), Some(b), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let ok = |s: &str| {
        !s.is_empty()
            && !s.starts_with('.')
            && !s.contains("..")
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    ok(a) && ok(b) && !b.ends_with(".gguf") && !b.ends_with(".json")
}

/// The cached snapshot of `repo` (the commit `refs/main` names, else the newest snapshot),
/// if it holds a config.json.
pub fn cached_snapshot(settings: &HubSettings, repo: &str) -> Option<PathBuf> {
    let dir = settings.repo_dir(repo);
    let snaps = dir.join("snapshots");
    if let Ok(sha) = std::fs::read_to_string(dir.join("refs").join("main")) {
        let p = snaps.join(sha.trim());
        if p.join("config.json").is_file() {
            return Some(p);
        }
    }
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    for entry in std::fs::read_dir(&snaps).ok()?.flatten() {
        let p = entry.path();
        if !p.join("config.json").is_file() {
            continue;
        }
        let t = entry
            .metadata()
            .and_then(|m| m.modified())
            .unwrap_or(std::time::UNIX_EPOCH);
        if best.as_ref().is_none_or(|(bt, _)| t > *bt) {
            best = Some((t, p));
        }
    }
    best.map(|(_, p)| p)
}

/// A local folder holding `repo`: from the cache, or fetched from the hub into it.
pub fn resolve(settings: &HubSettings, repo: &str, progress: bool) -> Result<PathBuf> {
    ensure!(
        looks_like_repo_id(repo),
        "`{repo}` is not a hub id of the form org/name"
    );
    if settings.offline {
        return cached_snapshot(settings, repo).ok_or_else(|| {
            anyhow::anyhow!(
                "model `{repo}` is not in the Hugging Face cache ({}) and HF_HUB_OFFLINE is set, so it cannot be fetched; unset HF_HUB_OFFLINE to download it, or pass a local model folder or .gguf file",
                settings.repo_dir(repo).display()
            )
        });
    }
    // reqwest's blocking client must not run on an async runtime thread; a plain thread
    // makes this safe to call from anywhere.
    let (s, r) = (settings.clone(), repo.to_string());
    let fetched = std::thread::spawn(move || fetch(&s, &r, progress))
        .join()
        .map_err(|_| anyhow::anyhow!("the hub download thread panicked"))?;
    match fetched {
        Ok(p) => Ok(p),
        Err(e) if e.downcast_ref::<Unreachable>().is_some() => {
            if let Some(p) = cached_snapshot(settings, repo) {
                eprintln!("note: {e:#}; using the cached copy at {}", p.display());
                Ok(p)
            } else {
                Err(e)
            }
        }
        Err(e) => Err(e),
    }
}

/// The hub could not be reached at all (as opposed to answering with an error).
#[derive(Debug)]
struct Unreachable(String);

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Unreachable {}

struct Hub<'a> {
    settings: &'a HubSettings,
    client: reqwest::blocking::Client,
    repo: &'a str,
}

impl Hub<'_> {
    fn get(&self, url: &str) -> Result<reqwest::blocking::Response> {
        let mut req = self.client.get(url);
        if let Some(t) = &self.settings.token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().map_err(|e| {
            // reqwest's Display stops at "error sending request"; the cause says why.
            let mut cause = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(inner) = src {
                cause.push_str(": ");
                cause.push_str(&inner.to_string());
                src = inner.source();
            }
            let e = cause;
            anyhow::Error::new(Unreachable(format!(
                "the Hugging Face hub at {} is unreachable ({e}); pass a local model folder or .gguf file to --model, or set HF_ENDPOINT to a reachable mirror",
                self.settings.endpoint
            )))
        })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let repo = self.repo;
        match status.as_u16() {
            401 | 403 => bail!(
                "the hub refused access to `{repo}` ({status}): the model may be gated or private; set HF_TOKEN to a token that can read it"
            ),
            404 => bail!("`{url}` was not found on the hub ({status}): check the model id `{repo}`"),
            _ => bail!("the hub answered {status} for {url}"),
        }
    }

    fn download(
        &self,
        sha: &str,
        file: &str,
        dest: &Path,
        bar: &indicatif::ProgressBar,
    ) -> Result<()> {
        if dest.is_file() {
            return Ok(());
        }
        let url = format!(
            "{}/{}/resolve/{sha}/{file}",
            self.settings.endpoint, self.repo
        );
        let mut resp = self.get(&url)?;
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        let tmp = dest.with_extension("incomplete");
        let mut out = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        bar.set_message(file.to_string());
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = std::io::Read::read(&mut resp, &mut buf)
                .with_context(|| format!("download of {url} broke off"))?;
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n])
                .with_context(|| format!("cannot write {}", tmp.display()))?;
            bar.inc(n as u64);
        }
        out.flush()?;
        drop(out);
        std::fs::rename(&tmp, dest)
            .with_context(|| format!("cannot move {} into place", tmp.display()))?;
        Ok(())
    }
}

fn fetch(settings: &HubSettings, repo: &str, progress: bool) -> Result<PathBuf> {
    let client = reqwest::blocking::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .user_agent(concat!("rvllm/", env!("CARGO_PKG_VERSION")))
        .build()
        .context("cannot build an HTTP client")?;
    let hub = Hub {
        settings,
        client,
        repo,
    };
    let info: serde_json::Value = hub
        .get(&format!(
            "{}/api/models/{repo}/revision/main",
            settings.endpoint
        ))?
        .json()
        .context("the hub's model info is not valid JSON")?;
    let sha = info
        .get("sha")
        .and_then(|s| s.as_str())
        .filter(|s| s.chars().all(|c| c.is_ascii_alphanumeric()) && !s.is_empty())
        .ok_or_else(|| anyhow::anyhow!("the hub's model info for `{repo}` has no commit sha"))?
        .to_string();
    let siblings: Vec<String> = info
        .get("siblings")
        .and_then(|s| s.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|x| {
                    x.get("rfilename")
                        .and_then(|f| f.as_str())
                        .map(String::from)
                })
                .collect()
        })
        .unwrap_or_default();
    let has = |f: &str| siblings.iter().any(|s| s == f);
    ensure!(
        has("config.json"),
        "hub model `{repo}` has no config.json: is it a transformers model?"
    );

    let snap = settings.repo_dir(repo).join("snapshots").join(&sha);
    let bar = if progress {
        crate::models::loader::bytes_progress_bar(0, "downloading")
    } else {
        indicatif::ProgressBar::hidden()
    };
    let fetch_file = |f: &str| hub.download(&sha, f, &snap.join(f), &bar);
    for f in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        if has(f) {
            fetch_file(f)?;
        }
    }
    if has("model.safetensors.index.json") {
        fetch_file("model.safetensors.index.json")?;
        let index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
            snap.join("model.safetensors.index.json"),
        )?)
        .context("model.safetensors.index.json from the hub is not valid JSON")?;
        let mut shards: Vec<String> = index
            .get("weight_map")
            .and_then(|m| m.as_object())
            .map(|m| {
                m.values()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        shards.sort();
        shards.dedup();
        for s in shards {
            ensure!(
                !s.contains("..") && !s.starts_with('/'),
                "bad shard name `{s}` in the index"
            );
            fetch_file(&s)?;
        }
    } else if has("model.safetensors") {
        fetch_file("model.safetensors")?;
    } else {
        bail!(
            "hub model `{repo}` has no model.safetensors weights (other formats are not supported)"
        );
    }
    bar.finish_and_clear();
    let refs = settings.repo_dir(repo).join("refs");
    std::fs::create_dir_all(&refs).with_context(|| format!("cannot create {}", refs.display()))?;
    std::fs::write(refs.join("main"), &sha)
        .with_context(|| format!("cannot write {}", refs.join("main").display()))?;
    Ok(snap)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(dir: &Path, offline: bool, endpoint: &str) -> HubSettings {
        HubSettings {
            endpoint: endpoint.into(),
            token: None,
            offline,
            cache_dir: dir.join("hub"),
        }
    }

    #[test]
    fn repo_id_shape() {
        assert!(looks_like_repo_id("HuggingFaceTB/SmolLM2-135M-Instruct"));
        assert!(looks_like_repo_id("Qwen/Qwen2.5-0.5B"));
        assert!(!looks_like_repo_id("model.gguf"));
        assert!(!looks_like_repo_id("/abs/path"));
        assert!(!looks_like_repo_id("a/b/c"));
        assert!(!looks_like_repo_id("../x"));
        assert!(!looks_like_repo_id("dir/model.gguf"));
    }

    fn make_cache(dir: &Path, repo: &str, sha: &str) -> PathBuf {
        let snap = dir
            .join("hub")
            .join(format!("models--{}", repo.replace('/', "--")))
            .join("snapshots")
            .join(sha);
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(snap.join("config.json"), "{}").unwrap();
        let refs = snap.parent().unwrap().parent().unwrap().join("refs");
        std::fs::create_dir_all(&refs).unwrap();
        std::fs::write(refs.join("main"), sha).unwrap();
        snap
    }

    #[test]
    fn offline_uses_the_cache_layout() {
        let dir = tempfile::tempdir().unwrap();
        let snap = make_cache(dir.path(), "org/tiny", "abc123");
        let s = settings(dir.path(), true, "http://127.0.0.1:9");
        assert_eq!(resolve(&s, "org/tiny", false).unwrap(), snap);
    }

    #[test]
    fn offline_and_missing_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path(), true, "http://127.0.0.1:9");
        let e = format!("{:#}", resolve(&s, "org/absent", false).unwrap_err());
        assert!(
            e.contains("HF_HUB_OFFLINE") && e.contains("org/absent"),
            "{e}"
        );
        assert!(e.contains("models--org--absent"), "{e}");
    }

    #[test]
    fn unreachable_hub_is_a_clear_error_or_falls_back_to_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        // Port 9 (discard) on loopback: nothing listens, the connection is refused at once.
        let s = settings(dir.path(), false, "http://127.0.0.1:9");
        let e = format!("{:#}", resolve(&s, "org/absent", false).unwrap_err());
        assert!(
            e.contains("unreachable") && e.contains("local model folder"),
            "{e}"
        );
        let snap = make_cache(dir.path(), "org/cached", "def456");
        assert_eq!(resolve(&s, "org/cached", false).unwrap(), snap);
    }

    /// A loopback hub mirror (HF_ENDPOINT may point at any mirror) serving the tiny fixture
    /// folder, so the download path runs for real: model info, file URLs, auth header,
    /// cache layout, refs/main.
    fn serve_mirror(
        files: Vec<(String, Vec<u8>)>,
        sha: &'static str,
        require_token: Option<&'static str>,
    ) -> String {
        use std::io::{BufRead, BufReader};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request_line = String::new();
                if reader.read_line(&mut request_line).is_err() {
                    continue;
                }
                let mut authorized = require_token.is_none();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some(t) = require_token {
                        if line.to_ascii_lowercase().starts_with("authorization:")
                            && line.contains(&format!("Bearer {t}"))
                        {
                            authorized = true;
                        }
                    }
                }
                let path = request_line
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or("")
                    .to_string();
                let (status, body): (&str, Vec<u8>) = if !authorized {
                    ("401 Unauthorized", b"{}".to_vec())
                } else if path == "/api/models/org/tiny/revision/main" {
                    let siblings: Vec<String> = files
                        .iter()
                        .map(|(n, _)| format!("{{\"rfilename\": \"{n}\"}}"))
                        .collect();
                    let body = format!(
                        "{{\"sha\": \"{sha}\", \"siblings\": [{}]}}",
                        siblings.join(",")
                    );
                    ("200 OK", body.into_bytes())
                } else if let Some(f) = path.strip_prefix(&format!("/org/tiny/resolve/{sha}/")) {
                    match files.iter().find(|(n, _)| n == f) {
                        Some((_, data)) => ("200 OK", data.clone()),
                        None => ("404 Not Found", vec![]),
                    }
                } else {
                    ("404 Not Found", vec![])
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(&body);
            }
        });
        format!("http://{addr}")
    }

    fn fixture_files() -> Vec<(String, Vec<u8>)> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny/llama_tied");
        [
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "model.safetensors",
        ]
        .iter()
        .map(|f| (f.to_string(), std::fs::read(dir.join(f)).unwrap()))
        .collect()
    }

    #[test]
    fn downloads_from_a_mirror_into_the_cache_layout() {
        let files = fixture_files();
        let endpoint = serve_mirror(files.clone(), "feedbeef", Some("secret"));
        let dir = tempfile::tempdir().unwrap();
        let mut s = settings(dir.path(), false, &endpoint);
        s.token = Some("secret".into());
        let snap = resolve(&s, "org/tiny", false).unwrap();
        assert_eq!(
            snap,
            dir.path().join("hub/models--org--tiny/snapshots/feedbeef")
        );
        for (name, data) in &files {
            assert_eq!(&std::fs::read(snap.join(name)).unwrap(), data, "{name}");
        }
        let refs = dir.path().join("hub/models--org--tiny/refs/main");
        assert_eq!(std::fs::read_to_string(refs).unwrap(), "feedbeef");
        // Now offline, the cache alone serves it.
        s.offline = true;
        assert_eq!(resolve(&s, "org/tiny", false).unwrap(), snap);
        // And the snapshot is a loadable model folder.
        let m = crate::models::load_model(snap.to_str().unwrap(), &Default::default()).unwrap();
        assert!(m.weights.is_some() && m.tokenizer.is_some());
    }

    #[test]
    fn refused_access_and_unknown_models_are_explained() {
        let endpoint = serve_mirror(fixture_files(), "feedbeef", Some("secret"));
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path(), false, &endpoint);
        let e = format!("{:#}", resolve(&s, "org/tiny", false).unwrap_err());
        assert!(e.contains("HF_TOKEN") && e.contains("org/tiny"), "{e}");
        let endpoint = serve_mirror(fixture_files(), "feedbeef", None);
        let s = settings(dir.path(), false, &endpoint);
        let e = format!("{:#}", resolve(&s, "org/other", false).unwrap_err());
        assert!(e.contains("not found") && e.contains("org/other"), "{e}");
    }
}
