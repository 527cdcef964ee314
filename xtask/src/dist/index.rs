//! The static release tree that `dist --release-tree` lays out and `install` reads. Any
//! static HTTP server (or a plain folder) can serve it:
//!
//! ```text
//! index.json                       latest release, all releases, current nightly
//! releases/<version>/index.json    artifacts of that release, per target and CUDA variant
//! releases/<version>/rvllm-<version>-<target>-<variant>.tar.gz (+ .sha256)
//! nightly/index.json               artifacts of the latest main build
//! nightly/rvllm-0.0.0.dev-<target>-<variant>.tar.gz (+ .sha256)
//! commits/<40-hex>/index.json      artifacts built from that commit
//! commits/<40-hex>/rvllm-0.0.0.dev-<target>-<variant>.tar.gz (+ .sha256)
//! ```
//!
//! Nightly and per-commit files keep a stable placeholder version in their names, so links
//! to them never change; the real version is in the index entry and in the manifest inside.

use super::manifest::{compare_versions, Manifest};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const INDEX_SCHEMA: u32 = 1;
pub const INDEX_FILE: &str = "index.json";
/// The version written into nightly and per-commit file names.
pub const PLACEHOLDER_VERSION: &str = "0.0.0.dev";

/// Where an artifact is published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Channel {
    /// `releases/<version>/` (and `commits/<sha>/`).
    Release,
    /// `nightly/` (and `commits/<sha>/`).
    Nightly,
}

/// `index.json` at the top of the tree.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootIndex {
    pub schema: u32,
    /// Highest release version (prereleases only when there is nothing else).
    pub latest: Option<String>,
    pub releases: Vec<String>,
    pub nightly: Option<NightlyRef>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NightlyRef {
    pub version: String,
    pub commit: String,
}

/// `index.json` of one release, of `nightly` or of one commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelIndex {
    pub schema: u32,
    pub artifacts: Vec<ArtifactEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactEntry {
    pub target: String,
    /// CUDA version of the variant, `None` for the CPU variant.
    pub cuda: Option<String>,
    /// `cu121` or `cpu`.
    pub variant: String,
    /// File name beside this index.
    pub file: String,
    pub size: u64,
    pub sha256: String,
    /// Real version and commit (the file name may carry the placeholder).
    pub version: String,
    pub commit: String,
}

impl ChannelIndex {
    pub fn parse(bytes: &[u8], what: &str) -> Result<ChannelIndex> {
        let idx: ChannelIndex = serde_json::from_slice(bytes)
            .with_context(|| format!("{what} is not a valid rvllm release index"))?;
        if idx.schema != INDEX_SCHEMA {
            bail!(
                "{what} has schema {} but this xtask understands {INDEX_SCHEMA}; update this \
                 source tree (git pull)",
                idx.schema
            );
        }
        Ok(idx)
    }
}

impl RootIndex {
    pub fn parse(bytes: &[u8], what: &str) -> Result<RootIndex> {
        let idx: RootIndex = serde_json::from_slice(bytes)
            .with_context(|| format!("{what} is not a valid rvllm release index"))?;
        if idx.schema != INDEX_SCHEMA {
            bail!(
                "{what} has schema {} but this xtask understands {INDEX_SCHEMA}; update this \
                 source tree (git pull)",
                idx.schema
            );
        }
        Ok(idx)
    }
}

/// The artifact file name: the real version for releases, the placeholder otherwise.
pub fn artifact_file_name(version: &str, target: &str, variant: &str) -> String {
    format!("rvllm-{version}-{target}-{variant}.tar.gz")
}

/// Copies `tarball` into the tree for `channel` (and for its commit), updates the indexes and
/// returns the folders written.
pub fn publish(
    tree: &Path,
    tarball: &Path,
    sha256: &str,
    size: u64,
    m: &Manifest,
    channel: Channel,
) -> Result<Vec<PathBuf>> {
    let variant = m.variant();
    if channel == Channel::Release {
        // A release is one commit: refuse to mix artifacts of two commits under one version.
        let idx_path = tree.join("releases").join(&m.version).join(INDEX_FILE);
        if let Ok(bytes) = std::fs::read(&idx_path) {
            let idx = ChannelIndex::parse(&bytes, &idx_path.display().to_string())?;
            if let Some(other) = idx.artifacts.iter().find(|a| a.commit != m.commit) {
                bail!(
                    "release {} already holds artifacts of commit {} ({}), and this one is \
                     commit {}; a release is one commit. Bump the version, rebuild from {}, or \
                     publish with --channel nightly",
                    m.version,
                    other.commit,
                    other.variant,
                    m.commit,
                    other.commit
                );
            }
        }
    }
    let placeholder = artifact_file_name(PLACEHOLDER_VERSION, &m.target, &variant);
    let mut dirs = vec![(tree.join("commits").join(&m.commit), placeholder.clone())];
    match channel {
        Channel::Release => dirs.push((
            tree.join("releases").join(&m.version),
            artifact_file_name(&m.version, &m.target, &variant),
        )),
        Channel::Nightly => dirs.push((tree.join("nightly"), placeholder)),
    }
    for (dir, file) in &dirs {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let dest = dir.join(file);
        copy_atomic(tarball, &dest)?;
        write_atomic(
            &dir.join(format!("{file}.sha256")),
            format!("{sha256}  {file}\n").as_bytes(),
        )?;
        let index_path = dir.join(INDEX_FILE);
        let mut idx = if index_path.exists() {
            let bytes = std::fs::read(&index_path)
                .with_context(|| format!("reading {}", index_path.display()))?;
            ChannelIndex::parse(&bytes, &index_path.display().to_string())?
        } else {
            ChannelIndex {
                schema: INDEX_SCHEMA,
                artifacts: Vec::new(),
            }
        };
        // One artifact per (target, variant): a rebuild replaces the old one.
        idx.artifacts
            .retain(|a| !(a.target == m.target && a.variant == variant));
        idx.artifacts.push(ArtifactEntry {
            target: m.target.clone(),
            cuda: m.cuda.clone(),
            variant: variant.clone(),
            file: file.clone(),
            size,
            sha256: sha256.to_string(),
            version: m.version.clone(),
            commit: m.commit.clone(),
        });
        idx.artifacts
            .sort_by(|a, b| (&a.target, &a.variant).cmp(&(&b.target, &b.variant)));
        write_json(&index_path, &idx)?;
    }
    update_root_index(tree, m, channel)?;
    Ok(dirs.into_iter().map(|(d, _)| d).collect())
}

/// Rebuilds `index.json` from the `releases/` folders present, so `latest` is always the
/// highest release (publishing a patch of an older line does not make it latest).
fn update_root_index(tree: &Path, m: &Manifest, channel: Channel) -> Result<()> {
    let path = tree.join(INDEX_FILE);
    let mut root = if path.exists() {
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        RootIndex::parse(&bytes, &path.display().to_string())?
    } else {
        RootIndex {
            schema: INDEX_SCHEMA,
            ..Default::default()
        }
    };
    let mut releases = Vec::new();
    let rel_dir = tree.join("releases");
    if rel_dir.is_dir() {
        for e in
            std::fs::read_dir(&rel_dir).with_context(|| format!("listing {}", rel_dir.display()))?
        {
            let e = e?;
            if e.path().join(INDEX_FILE).is_file() {
                releases.push(e.file_name().to_string_lossy().into_owned());
            }
        }
    }
    releases.sort_by(|a, b| compare_versions(a, b));
    let stable = releases.iter().rfind(|v| !v.contains('-'));
    root.latest = stable.or(releases.last()).cloned();
    root.releases = releases;
    if channel == Channel::Nightly {
        root.nightly = Some(NightlyRef {
            version: m.version.clone(),
            commit: m.commit.clone(),
        });
    }
    write_json(&path, &root)
}

pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value)?;
    bytes.push(b'\n');
    write_atomic(path, &bytes)
}

/// Writes through a temporary sibling and a rename, so a server never serves half a file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_sibling(path);
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))
}

fn copy_atomic(from: &Path, to: &Path) -> Result<()> {
    let tmp = tmp_sibling(to);
    std::fs::copy(from, &tmp)
        .with_context(|| format!("copying {} to {}", from.display(), tmp.display()))?;
    std::fs::rename(&tmp, to).with_context(|| format!("renaming into {}", to.display()))
}

fn tmp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}
