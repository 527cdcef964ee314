//! The install prefix layout, shared by `install` and `dev`:
//!
//! ```text
//! PREFIX/bin/rvllm                       symlink -> ../lib/rvllm/<version>-<commit12>-<variant>/bin/rvllm
//! PREFIX/bin/.rvllm.dev-backup           (dev mode only) the installed link, kept aside
//! PREFIX/lib/rvllm/<version>-<commit12>-<variant>/{manifest.json, bin/rvllm, kernels/*.fatbin}
//! PREFIX/lib/rvllm/.staging-<pid>-<n>/   an install in progress (same filesystem, renamed
//!                                        into place when complete)
//! ```
//!
//! Versions stay side by side under lib/rvllm, so rolling back is switching the link.

use crate::dist::manifest::{sha256_file, Manifest, MANIFEST_FILE};
use anyhow::{Context, Result};
use std::path::{Component, Path, PathBuf};

pub const STAGING_PREFIX: &str = ".staging-";

#[derive(Debug, Clone)]
pub struct Prefix {
    pub root: PathBuf,
}

impl Prefix {
    /// `--prefix`, else `~/.local`; made absolute without requiring it to exist.
    pub fn resolve(arg: Option<&Path>) -> Result<Prefix> {
        let p = match arg {
            Some(p) => p.to_path_buf(),
            None => {
                let home = std::env::var_os("HOME")
                    .filter(|h| !h.is_empty())
                    .context("HOME is not set, so there is no default prefix; pass --prefix DIR")?;
                PathBuf::from(home).join(".local")
            }
        };
        let p = if p.is_absolute() {
            p
        } else {
            std::env::current_dir()
                .context("reading the current folder")?
                .join(p)
        };
        Ok(Prefix {
            root: lexical_clean(&p),
        })
    }

    pub fn bin_dir(&self) -> PathBuf {
        self.root.join("bin")
    }
    pub fn link(&self) -> PathBuf {
        self.bin_dir().join("rvllm")
    }
    pub fn backup(&self) -> PathBuf {
        self.bin_dir().join(".rvllm.dev-backup")
    }
    pub fn lib_dir(&self) -> PathBuf {
        self.root.join("lib").join("rvllm")
    }

    /// What `PREFIX/bin/rvllm` is now.
    pub fn link_state(&self) -> Result<LinkState> {
        link_state_of(&self.link(), &self.lib_dir())
    }

    /// What the dev backup is, if there is one.
    pub fn backup_state(&self) -> Result<LinkState> {
        link_state_of(&self.backup(), &self.lib_dir())
    }
}

/// The folder name of an installed version.
pub fn install_dir_name(m: &Manifest) -> String {
    let short = m.commit.get(..12).unwrap_or(&m.commit);
    format!("{}-{short}-{}", m.version, m.variant())
}

/// The relative link target from `PREFIX/bin/` to an installed version's binary.
pub fn link_target(dir_name: &str) -> PathBuf {
    Path::new("../lib/rvllm")
        .join(dir_name)
        .join("bin")
        .join("rvllm")
}

#[derive(Debug)]
pub enum LinkState {
    /// Nothing there.
    Absent,
    /// A link to an installed version (`dir` is `PREFIX/lib/rvllm/<name>`).
    Installed { dir: PathBuf, manifest: Manifest },
    /// A link somewhere outside `PREFIX/lib/rvllm` (the source build in dev mode).
    Elsewhere { target: PathBuf },
    /// A link into `PREFIX/lib/rvllm` whose version folder or manifest is missing or broken.
    Broken { target: PathBuf, why: String },
    /// A regular file, folder or other thing that this tool did not put there.
    Foreign,
}

fn link_state_of(path: &Path, lib: &Path) -> Result<LinkState> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(LinkState::Absent),
        Err(e) => return Err(e).with_context(|| format!("inspecting {}", path.display())),
    };
    if !meta.file_type().is_symlink() {
        return Ok(LinkState::Foreign);
    }
    let raw = std::fs::read_link(path).with_context(|| format!("reading {}", path.display()))?;
    let target = lexical_clean(&path.parent().unwrap_or(Path::new("/")).join(&raw));
    let Ok(rest) = target.strip_prefix(lib) else {
        return Ok(LinkState::Elsewhere { target });
    };
    let mut comps = rest.components();
    let dir = match (comps.next(), comps.next(), comps.next(), comps.next()) {
        (
            Some(Component::Normal(d)),
            Some(Component::Normal(b)),
            Some(Component::Normal(r)),
            None,
        ) if b == "bin" && r == "rvllm" => lib.join(d),
        _ => {
            return Ok(LinkState::Broken {
                target,
                why: "it does not name <lib>/rvllm/<version>/bin/rvllm".into(),
            })
        }
    };
    match read_installed_manifest(&dir) {
        Ok(manifest) => Ok(LinkState::Installed { dir, manifest }),
        Err(e) => Ok(LinkState::Broken {
            target,
            why: format!("{e:#}"),
        }),
    }
}

pub fn read_installed_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST_FILE);
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    Manifest::parse(&bytes).with_context(|| format!("reading {}", path.display()))
}

/// Whether an installed version folder still holds exactly what its manifest lists.
pub fn verify_installed(dir: &Path, m: &Manifest) -> Result<()> {
    for f in &m.files {
        let p = dir.join(&f.path);
        let (size, sha) = sha256_file(&p)?;
        if size != f.size || sha != f.sha256 {
            anyhow::bail!("{} does not match its manifest", p.display());
        }
    }
    Ok(())
}

/// Removes `.` and `..` components without touching the filesystem (the prefix may not
/// exist yet, and links must be judged by what they name, not where they lead).
pub fn lexical_clean(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// Folders this process created (and staging folders it made), undone on drop unless
/// `commit` is called: a failed install leaves the prefix as it found it.
#[derive(Default)]
pub struct PrefixTxn {
    created: Vec<PathBuf>,
    scratch: Vec<PathBuf>,
    committed: bool,
}

impl PrefixTxn {
    /// Creates `dir` and any missing parents, remembering which ones were new.
    pub fn ensure_dir(&mut self, dir: &Path) -> Result<()> {
        let mut missing: Vec<&Path> = dir.ancestors().take_while(|a| !a.exists()).collect();
        missing.reverse();
        for m in missing {
            std::fs::create_dir(m).with_context(|| format!("creating {}", m.display()))?;
            self.created.push(m.to_path_buf());
        }
        Ok(())
    }

    /// A path removed (recursively) if the transaction does not commit.
    pub fn scratch(&mut self, p: PathBuf) {
        self.scratch.push(p);
    }

    /// Forgets a scratch path that became permanent (renamed into place).
    pub fn keep(&mut self, p: &Path) {
        self.scratch.retain(|s| s != p);
    }

    pub fn commit(mut self) {
        self.committed = true;
        // Scratch left at commit time is still temporary (e.g. a replaced old folder).
        for s in std::mem::take(&mut self.scratch) {
            remove_any(&s);
        }
    }
}

impl Drop for PrefixTxn {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        for s in self.scratch.drain(..).rev() {
            remove_any(&s);
        }
        for d in self.created.drain(..).rev() {
            // Only empty folders we made; never anything else.
            let _ = std::fs::remove_dir(&d);
        }
    }
}

fn remove_any(p: &Path) {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => {
            let _ = std::fs::remove_dir_all(p);
        }
        Ok(_) => {
            let _ = std::fs::remove_file(p);
        }
        Err(_) => {}
    }
}

/// Staging folders of installs whose process is gone (interrupted by a signal or a crash).
pub fn stale_staging_dirs(lib: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(lib) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid: i32 = name
                .strip_prefix(STAGING_PREFIX)?
                .split('-')
                .next()?
                .parse()
                .ok()?;
            // SAFETY: signal 0 only checks that the process exists.
            let alive = unsafe { libc::kill(pid, 0) } == 0
                || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
            (!alive).then(|| e.path())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleans_paths_lexically() {
        assert_eq!(
            lexical_clean(Path::new("/p/bin/../lib/rvllm/./x/bin/rvllm")),
            PathBuf::from("/p/lib/rvllm/x/bin/rvllm")
        );
    }

    #[test]
    fn txn_removes_only_what_it_created() {
        let t = tempfile::tempdir().unwrap();
        let keep = t.path().join("keep");
        std::fs::create_dir(&keep).unwrap();
        {
            let mut txn = PrefixTxn::default();
            txn.ensure_dir(&keep.join("a/b/c")).unwrap();
            let s = keep.join("a/b/c/.staging-1-1");
            std::fs::create_dir(&s).unwrap();
            std::fs::write(s.join("f"), b"x").unwrap();
            txn.scratch(s);
        }
        assert!(keep.is_dir());
        assert_eq!(std::fs::read_dir(&keep).unwrap().count(), 0);
    }
}
