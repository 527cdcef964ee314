//! The `manifest.json` carried inside every release artifact, and the facts it records:
//! what the binary says about itself, the glibc it needs, the GPUs its kernels cover and the
//! size and sha256 of every file. `install` trusts nothing else about an artifact.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::cmp::Ordering;
use std::io::Read;
use std::path::Path;

/// The manifest schema this xtask writes and understands.
pub const MANIFEST_SCHEMA: u32 = 1;
/// The manifest's path inside an artifact (and inside an installed version folder).
pub const MANIFEST_FILE: &str = "manifest.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub schema: u32,
    pub name: String,
    /// The real version, also for nightly and per-commit artifacts whose file name carries
    /// a placeholder.
    pub version: String,
    /// Full 40-hex commit the binary was built from.
    pub commit: String,
    /// Rust target triple of the binary.
    pub target: String,
    /// CUDA toolkit version ("12.1") the kernels were compiled with; `None` for CPU builds.
    pub cuda: Option<String>,
    /// Compute capabilities the bundled kernels cover ("sm_80", "sm_90a", "compute_90a").
    pub compute_capabilities: Vec<String>,
    /// Highest `GLIBC_x.y` symbol version the binary references; `None` when it needs none.
    pub min_glibc: Option<String>,
    pub files: Vec<FileEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Relative path with `/` separators, e.g. `bin/rvllm`.
    pub path: String,
    pub size: u64,
    pub sha256: String,
    pub executable: bool,
}

impl Manifest {
    /// The variant name used in file names and indexes: `cu121` or `cpu`.
    pub fn variant(&self) -> String {
        variant_name(self.cuda.as_deref())
    }

    pub fn parse(bytes: &[u8]) -> Result<Manifest> {
        let m: Manifest =
            serde_json::from_slice(bytes).context("manifest.json is not a valid rvllm manifest")?;
        if m.schema != MANIFEST_SCHEMA {
            bail!(
                "manifest.json has schema {} but this xtask understands schema {MANIFEST_SCHEMA}; \
                 update this source tree (git pull) to install this artifact",
                m.schema
            );
        }
        Ok(m)
    }
}

/// `cu121` for CUDA 12.1, `cpu` when there is no CUDA.
pub fn variant_name(cuda: Option<&str>) -> String {
    match cuda {
        Some(v) => format!("cu{}", v.replace('.', "")),
        None => "cpu".to_string(),
    }
}

/// What `rvllm --version` reports:
/// `rvllm 0.1.0 (commit <sha>, target <triple>, device backends: cpu, cuda)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinaryIdentity {
    pub version: String,
    pub commit: String,
    pub target: String,
    pub backends: Vec<String>,
}

impl BinaryIdentity {
    pub fn parse(line: &str) -> Result<BinaryIdentity> {
        let line = line.trim();
        let what = || {
            format!(
                "`rvllm --version` printed {line:?}, expected \
                 `rvllm VERSION (commit SHA, target TRIPLE, device backends: LIST)`"
            )
        };
        let rest = line.strip_prefix("rvllm ").with_context(what)?;
        let (version, rest) = rest.split_once(" (").with_context(what)?;
        let inner = rest.strip_suffix(')').with_context(what)?;
        let commit = field(inner, "commit ").with_context(what)?;
        let target = field(inner, "target ").with_context(what)?;
        let backends = inner
            .split_once("device backends: ")
            .map(|(_, b)| b.split(',').map(|s| s.trim().to_string()).collect())
            .with_context(what)?;
        Ok(BinaryIdentity {
            version: version.trim().to_string(),
            commit,
            target,
            backends,
        })
    }
}

fn field(inner: &str, key: &str) -> Option<String> {
    let start = inner.find(key)? + key.len();
    let rest = &inner[start..];
    Some(rest.split(',').next()?.trim().to_string())
}

/// True for a full, lowercase-or-uppercase 40-hex commit hash.
pub fn is_full_commit(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Streaming sha256 of a file, with its size.
pub fn sha256_file(path: &Path) -> Result<(u64, String)> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    sha256_reader(&mut f).with_context(|| format!("reading {}", path.display()))
}

pub fn sha256_reader(r: &mut dyn Read) -> std::io::Result<(u64, String)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut n = 0u64;
    loop {
        let k = r.read(&mut buf)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((n, hex::encode(h.finalize())))
}

/// The highest `GLIBC_x.y[.z]` symbol version named anywhere in the binary. The dynamic
/// string table holds exactly the versions the loader will demand, so a byte scan finds
/// them without an ELF parser.
pub fn scan_min_glibc(bytes: &[u8]) -> Option<String> {
    const TAG: &[u8] = b"GLIBC_";
    let mut best: Option<String> = None;
    let mut i = 0;
    while i + TAG.len() < bytes.len() {
        if &bytes[i..i + TAG.len()] == TAG {
            let start = i + TAG.len();
            let mut end = start;
            while end < bytes.len() && (bytes[end].is_ascii_digit() || bytes[end] == b'.') {
                end += 1;
            }
            let cand = std::str::from_utf8(&bytes[start..end])
                .unwrap_or("")
                .trim_end_matches('.');
            // GLIBC_PRIVATE and the like carry no number.
            if cand.contains('.') && cand.split('.').all(|p| !p.is_empty()) {
                let newer = match &best {
                    None => true,
                    Some(b) => compare_versions(cand, b) == Ordering::Greater,
                };
                if newer {
                    best = Some(cand.to_string());
                }
            }
            i = end.max(i + 1);
        } else {
            i += 1;
        }
    }
    best
}

/// Compares dotted versions numerically, with an optional `-pre` suffix sorting before the
/// plain release (`0.2.0-rc1` < `0.2.0`). Non-numeric parts compare as text.
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    let (a_core, a_pre) = split_pre(a);
    let (b_core, b_pre) = split_pre(b);
    let mut ai = a_core.split('.');
    let mut bi = b_core.split('.');
    loop {
        match (ai.next(), bi.next()) {
            (None, None) => break,
            (x, y) => {
                let x = x.unwrap_or("0");
                let y = y.unwrap_or("0");
                let ord = match (x.parse::<u64>(), y.parse::<u64>()) {
                    (Ok(p), Ok(q)) => p.cmp(&q),
                    _ => x.cmp(y),
                };
                if ord != Ordering::Equal {
                    return ord;
                }
            }
        }
    }
    match (a_pre, b_pre) {
        (None, None) => Ordering::Equal,
        (None, Some(_)) => Ordering::Greater,
        (Some(_), None) => Ordering::Less,
        (Some(p), Some(q)) => p.cmp(q),
    }
}

fn split_pre(v: &str) -> (&str, Option<&str>) {
    match v.split_once('-') {
        Some((c, p)) => (c, Some(p)),
        None => (v, None),
    }
}

/// Compute capabilities covered by one fatbin: `sm_XY[a|f]` for each embedded cubin and
/// `compute_XY[a|f]` for each PTX image. Layout (little endian), checked against files
/// written by CUDA 13's `fatbinary`: a 16-byte header (magic 0xBA55ED50, u16 version,
/// u16 header size, u64 payload size), then entries of (u16 kind: 1 PTX / 2 ELF, u16
/// version, u32 entry header size, u64 payload size, ..., u32 sm at +28, u32 flags at +40).
pub fn fatbin_archs(bytes: &[u8]) -> Result<Vec<String>> {
    const MAGIC: u32 = 0xBA55_ED50;
    let u16_at = |o: usize| -> Option<u16> {
        Some(u16::from_le_bytes(bytes.get(o..o + 2)?.try_into().ok()?))
    };
    let u32_at = |o: usize| -> Option<u32> {
        Some(u32::from_le_bytes(bytes.get(o..o + 4)?.try_into().ok()?))
    };
    let u64_at = |o: usize| -> Option<u64> {
        Some(u64::from_le_bytes(bytes.get(o..o + 8)?.try_into().ok()?))
    };
    let mut out = Vec::new();
    let mut container = 0usize;
    // A file may hold several fatbin containers back to back.
    while container < bytes.len() {
        if u32_at(container) != Some(MAGIC) {
            if container == 0 {
                bail!("not a CUDA fatbin (no 0xBA55ED50 magic at the start)");
            }
            break;
        }
        let hsize = u16_at(container + 6).context("truncated fatbin header")? as usize;
        let payload = u64_at(container + 8).context("truncated fatbin header")? as usize;
        let mut off = container + hsize;
        let end = off
            .checked_add(payload)
            .filter(|&e| e <= bytes.len())
            .context("fatbin header claims more bytes than the file holds")?;
        while off < end {
            let kind = u16_at(off).context("truncated fatbin entry")?;
            let ehsize = u32_at(off + 4).context("truncated fatbin entry")? as usize;
            let esize = u64_at(off + 8).context("truncated fatbin entry")? as usize;
            let sm = u32_at(off + 28).context("truncated fatbin entry")?;
            let flags = u32_at(off + 40).unwrap_or(0);
            let suffix = if flags & 0x0010_0000 != 0 {
                "a"
            } else if flags & 0x0100_0000 != 0 {
                "f"
            } else {
                ""
            };
            let prefix = match kind {
                1 => "compute",
                2 => "sm",
                _ => "",
            };
            if !prefix.is_empty() {
                let name = format!("{prefix}_{sm}{suffix}");
                if !out.contains(&name) {
                    out.push(name);
                }
            }
            if ehsize == 0 {
                bail!("corrupt fatbin entry (zero header size)");
            }
            off = off
                .checked_add(ehsize)
                .and_then(|o| o.checked_add(esize))
                .context("corrupt fatbin entry size")?;
        }
        // Containers are 8-byte aligned.
        container = end.div_ceil(8) * 8;
    }
    Ok(out)
}

/// Sorts capabilities by number, cubins before PTX of the same number.
pub fn sort_capabilities(caps: &mut Vec<String>) {
    caps.sort_by_key(|c| {
        let (kind, rest) = c.split_once('_').unwrap_or(("", c));
        let num: u32 = rest
            .trim_end_matches(|ch: char| ch.is_ascii_alphabetic())
            .parse()
            .unwrap_or(0);
        (num, kind != "sm", c.clone())
    });
    caps.dedup();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_real_fatbins() {
        let a = include_bytes!("testdata/sm80_sm90a_ptx90a.fatbin");
        assert_eq!(
            fatbin_archs(a).unwrap(),
            vec!["sm_80", "sm_90a", "compute_90a"]
        );
        let b = include_bytes!("testdata/sm90_sm100f_ptx80.fatbin");
        assert_eq!(
            fatbin_archs(b).unwrap(),
            vec!["sm_90", "sm_100f", "compute_80"]
        );
        assert!(fatbin_archs(b"#!/bin/sh\n").is_err());
        assert!(fatbin_archs(&a[..100]).is_err());
    }

    #[test]
    fn sorts_capabilities() {
        let mut c = vec![
            "compute_90a".to_string(),
            "sm_100f".into(),
            "sm_80".into(),
            "sm_90a".into(),
        ];
        sort_capabilities(&mut c);
        assert_eq!(c, vec!["sm_80", "sm_90a", "compute_90a", "sm_100f"]);
    }

    #[test]
    fn glibc_scan_takes_the_highest_numbered_version() {
        let bin = b"\0GLIBC_2.2.5\0GLIBC_2.34\0GLIBC_PRIVATE\0GLIBC_2.17\0GLIBC_";
        assert_eq!(scan_min_glibc(bin).as_deref(), Some("2.34"));
        assert_eq!(scan_min_glibc(b"no versions here"), None);
        // A real binary: the test executable itself links glibc.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        if cfg!(target_env = "gnu") {
            assert!(scan_min_glibc(&me).is_some());
        }
    }

    #[test]
    fn version_ordering() {
        assert_eq!(compare_versions("0.10.0", "0.9.1"), Ordering::Greater);
        assert_eq!(compare_versions("2.17", "2.2.5"), Ordering::Greater);
        assert_eq!(compare_versions("0.2.0-rc1", "0.2.0"), Ordering::Less);
        assert_eq!(compare_versions("12.1", "12.1.0"), Ordering::Equal);
    }

    #[test]
    fn parses_binary_identity() {
        let id = BinaryIdentity::parse(
            "rvllm 0.1.0 (commit abc, target x86_64-unknown-linux-gnu, device backends: cpu, cuda)\n",
        )
        .unwrap();
        assert_eq!(id.version, "0.1.0");
        assert_eq!(id.commit, "abc");
        assert_eq!(id.target, "x86_64-unknown-linux-gnu");
        assert_eq!(id.backends, vec!["cpu", "cuda"]);
        assert!(BinaryIdentity::parse("something else").is_err());
    }

    #[test]
    fn variant_names() {
        assert_eq!(variant_name(Some("12.1")), "cu121");
        assert_eq!(variant_name(Some("13.0")), "cu130");
        assert_eq!(variant_name(None), "cpu");
        assert!(is_full_commit(&"a".repeat(40)));
        assert!(!is_full_commit("abc"));
        assert!(!is_full_commit(&"g".repeat(40)));
    }
}
