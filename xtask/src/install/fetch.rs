//! Reading release indexes and downloading artifacts, from an HTTP(S) server or a local
//! folder, with a progress bar and a streaming sha256. Every byte count is checked: a
//! download that ends early is an error, never a short file.

use crate::dist::manifest::sha256_reader;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

/// Where a release tree or an artifact lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Http(String),
    File(PathBuf),
}

impl Location {
    /// `http://` and `https://` are fetched with reqwest; `file://` and plain paths are read
    /// from disk.
    pub fn parse(s: &str) -> Location {
        if s.starts_with("http://") || s.starts_with("https://") {
            Location::Http(s.to_string())
        } else if let Some(p) = s.strip_prefix("file://") {
            Location::File(PathBuf::from(p))
        } else {
            Location::File(PathBuf::from(s))
        }
    }

    /// A path below this location (`rel` uses `/`).
    pub fn join(&self, rel: &str) -> Location {
        match self {
            Location::Http(u) => Location::Http(format!("{}/{rel}", u.trim_end_matches('/'))),
            Location::File(p) => Location::File(p.join(rel)),
        }
    }

    /// The same location with a suffix on its last component (`.sha256`).
    pub fn with_suffix(&self, suffix: &str) -> Location {
        match self {
            Location::Http(u) => Location::Http(format!("{u}{suffix}")),
            Location::File(p) => {
                let mut s = p.clone().into_os_string();
                s.push(suffix);
                Location::File(PathBuf::from(s))
            }
        }
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Http(u) => f.write_str(u),
            Location::File(p) => write!(f, "{}", p.display()),
        }
    }
}

pub struct Fetcher {
    client: reqwest::blocking::Client,
}

impl Fetcher {
    pub fn new() -> Result<Fetcher> {
        let client = reqwest::blocking::Client::builder()
            .connect_timeout(Duration::from_secs(20))
            // Large artifacts on slow links: no overall deadline, the byte counts catch
            // connections that die.
            .timeout(None::<Duration>)
            .user_agent(concat!("rvllm-xtask/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("setting up the HTTP client")?;
        Ok(Fetcher { client })
    }

    /// A small file (an index, a `.sha256`); `Ok(None)` when the server answers 404 or the
    /// local file does not exist.
    pub fn fetch_small(&self, loc: &Location) -> Result<Option<Vec<u8>>> {
        match loc {
            Location::File(p) => match std::fs::read(p) {
                Ok(b) => Ok(Some(b)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
            },
            Location::Http(u) => {
                let resp =
                    self.client.get(u).send().with_context(|| {
                        format!("fetching {u} (is the release server reachable?)")
                    })?;
                if resp.status() == reqwest::StatusCode::NOT_FOUND {
                    return Ok(None);
                }
                if !resp.status().is_success() {
                    bail!("fetching {u}: the server answered {}", resp.status());
                }
                let expected = resp.content_length();
                let bytes = resp
                    .bytes()
                    .with_context(|| format!("reading {u} (the connection ended early)"))?;
                if let Some(n) = expected {
                    if bytes.len() as u64 != n {
                        bail!("{u}: got {} of {n} bytes; retry", bytes.len());
                    }
                }
                Ok(Some(bytes.to_vec()))
            }
        }
    }

    /// Copies the artifact at `loc` into `dest`, returning its size and sha256. Fails when
    /// fewer bytes arrive than the server announced or than `expected_size`.
    pub fn download(
        &self,
        loc: &Location,
        dest: &mut std::fs::File,
        expected_size: Option<u64>,
    ) -> Result<(u64, String)> {
        let (mut reader, announced): (Box<dyn Read>, Option<u64>) = match loc {
            Location::File(p) => {
                let f = std::fs::File::open(p)
                    .with_context(|| format!("opening the artifact {}", p.display()))?;
                let len = f.metadata().ok().map(|m| m.len());
                (Box::new(f), len)
            }
            Location::Http(u) => {
                let resp = self
                    .client
                    .get(u)
                    .send()
                    .with_context(|| format!("downloading {u} (is the server reachable?)"))?;
                if resp.status() == reqwest::StatusCode::NOT_FOUND {
                    bail!("{u} does not exist on the server (HTTP 404)");
                }
                if !resp.status().is_success() {
                    bail!("downloading {u}: the server answered {}", resp.status());
                }
                let len = resp.content_length();
                (Box::new(resp), len)
            }
        };
        let total = announced.or(expected_size);
        let bar = progress_bar(total, loc);
        let mut counting = Tee {
            inner: &mut reader,
            out: dest,
            bar: &bar,
            n: 0,
        };
        let result = sha256_reader(&mut counting);
        let got = counting.n;
        bar.finish_and_clear();
        let (n, sha) = result.with_context(|| match total {
            Some(t) => format!("download of {loc} broke off after {got} of {t} bytes; retry"),
            None => format!("download of {loc} broke off after {got} bytes; retry"),
        })?;
        if let Some(a) = announced {
            if n != a {
                bail!("download of {loc} is truncated: got {n} of {a} bytes; retry");
            }
        }
        if let Some(e) = expected_size {
            if n != e {
                bail!(
                    "download of {loc} has {n} bytes but the index says {e}; the server or the \
                     download is broken (truncated or replaced file)"
                );
            }
        }
        dest.flush()?;
        Ok((n, sha))
    }
}

fn progress_bar(total: Option<u64>, loc: &Location) -> ProgressBar {
    let bar = match total {
        Some(t) => ProgressBar::with_draw_target(Some(t), ProgressDrawTarget::stderr()),
        None => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()),
    };
    let style = ProgressStyle::with_template(
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    let name = match loc {
        Location::Http(u) => u.rsplit('/').next().unwrap_or(u).to_string(),
        Location::File(p) => p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };
    bar.set_message(name);
    bar
}

/// Reads from `inner`, writes every byte to `out` and advances the progress bar.
struct Tee<'a> {
    inner: &'a mut dyn Read,
    out: &'a mut std::fs::File,
    bar: &'a ProgressBar,
    n: u64,
}

impl Read for Tee<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let k = self.inner.read(buf)?;
        self.out.write_all(&buf[..k])?;
        self.n += k as u64;
        self.bar.set_position(self.n);
        Ok(k)
    }
}

/// The hex digest in a `.sha256` file (`<hex>  <name>` or just `<hex>`).
pub fn parse_sha256_file(text: &str) -> Option<String> {
    let first = text.split_whitespace().next()?;
    (first.len() == 64 && first.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| first.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations() {
        let h = Location::parse("http://127.0.0.1:8000/tree/");
        assert_eq!(
            h.join("nightly/index.json"),
            Location::Http("http://127.0.0.1:8000/tree/nightly/index.json".into())
        );
        assert_eq!(
            Location::parse("file:///srv/tree").join("index.json"),
            Location::File(PathBuf::from("/srv/tree/index.json"))
        );
        assert_eq!(
            Location::parse("/a/b.tar.gz").with_suffix(".sha256"),
            Location::File(PathBuf::from("/a/b.tar.gz.sha256"))
        );
    }

    #[test]
    fn sha256_files() {
        let hex = "ab".repeat(32);
        assert_eq!(
            parse_sha256_file(&format!("{hex}  x.tar.gz\n")),
            Some(hex.clone())
        );
        assert_eq!(parse_sha256_file(&hex.to_uppercase()), Some(hex));
        assert_eq!(parse_sha256_file("nothing"), None);
        assert_eq!(parse_sha256_file(""), None);
    }
}
