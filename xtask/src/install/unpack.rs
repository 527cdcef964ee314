//! Unpacking artifacts, which are hostile until proven otherwise. A first pass reads the
//! whole archive without writing anything: every entry must be a plain file or folder with a
//! relative path that stays inside the install folder, the manifest must come first, and
//! every file must be listed in it with the same size and sha256. Only then does a second
//! pass write the files into an empty staging folder, checking each hash again.

use crate::dist::manifest::{sha256_reader, Manifest, MANIFEST_FILE};
use anyhow::{bail, Context, Result};
use flate2::read::GzDecoder;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// The manifest is small; anything bigger is not ours.
const MAX_MANIFEST_BYTES: u64 = 1 << 20;

/// Pass 1: validates the archive and returns its manifest. Writes nothing.
pub fn inspect(tarball: &Path) -> Result<Manifest> {
    let mut archive = open(tarball)?;
    let mut manifest: Option<Manifest> = None;
    let mut expected: BTreeMap<String, (u64, String)> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for entry in archive.entries().context(CORRUPT)? {
        let mut entry = entry.context(CORRUPT)?;
        let Some(path) = checked_entry(&entry)? else {
            continue;
        };
        if !seen.insert(path.clone()) {
            bail!("archive entry {path:?} appears twice; refusing an ambiguous artifact");
        }
        if entry.header().entry_type().is_dir() {
            continue;
        }
        let size = entry.header().size().context(CORRUPT)?;
        match &manifest {
            None => {
                if path != MANIFEST_FILE {
                    bail!(
                        "the archive starts with {path:?}, not {MANIFEST_FILE}; it is not an \
                         rvllm artifact"
                    );
                }
                if size > MAX_MANIFEST_BYTES {
                    bail!("{MANIFEST_FILE} is {size} bytes; not an rvllm manifest");
                }
                let mut bytes = Vec::new();
                entry.read_to_end(&mut bytes).context(CORRUPT)?;
                let m = Manifest::parse(&bytes)?;
                for f in &m.files {
                    let p = normalize(&f.path)
                        .with_context(|| format!("{MANIFEST_FILE} lists {:?}", f.path))?;
                    if p == MANIFEST_FILE
                        || expected.insert(p, (f.size, f.sha256.clone())).is_some()
                    {
                        bail!("{MANIFEST_FILE} lists {:?} twice", f.path);
                    }
                }
                if !expected.contains_key("bin/rvllm") {
                    bail!("{MANIFEST_FILE} lists no bin/rvllm; not an rvllm artifact");
                }
                manifest = Some(m);
            }
            Some(_) => {
                let Some((want_size, want_sha)) = expected.remove(&path) else {
                    bail!("archive entry {path:?} is not listed in {MANIFEST_FILE}; refusing it");
                };
                if size != want_size {
                    bail!(
                        "archive entry {path:?} is {size} bytes but {MANIFEST_FILE} says \
                         {want_size}; the artifact is corrupt or tampered with"
                    );
                }
                let (n, sha) = sha256_reader(&mut entry).context(CORRUPT)?;
                if n != want_size || sha != want_sha {
                    bail!(
                        "archive entry {path:?} has sha256 {sha} but {MANIFEST_FILE} says \
                         {want_sha}; the artifact is corrupt or tampered with"
                    );
                }
            }
        }
    }
    let m = manifest.context("the archive is empty or holds no manifest.json")?;
    if let Some(missing) = expected.keys().next() {
        bail!("{MANIFEST_FILE} lists {missing:?} but the archive does not contain it");
    }
    Ok(m)
}

/// Pass 2: writes the archive into `dest` (an existing empty folder), re-checking each file
/// against the manifest that pass 1 accepted.
pub fn unpack(tarball: &Path, dest: &Path, m: &Manifest) -> Result<()> {
    let wanted: BTreeMap<String, (u64, String, bool)> = m
        .files
        .iter()
        .filter_map(|f| {
            normalize(&f.path)
                .ok()
                .map(|p| (p, (f.size, f.sha256.clone(), f.executable)))
        })
        .collect();
    let mut archive = open(tarball)?;
    for entry in archive.entries().context(CORRUPT)? {
        let mut entry = entry.context(CORRUPT)?;
        let Some(path) = checked_entry(&entry)? else {
            continue;
        };
        let target = dest.join(&path);
        if entry.header().entry_type().is_dir() {
            std::fs::create_dir_all(&target)
                .with_context(|| format!("creating {}", target.display()))?;
            continue;
        }
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        // create_new: never follow or replace anything already there.
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&target)
            .with_context(|| format!("creating {}", target.display()))?;
        let mut tee = WriteThrough {
            inner: &mut entry,
            out: &mut out,
        };
        let (n, sha) =
            sha256_reader(&mut tee).with_context(|| format!("writing {}", target.display()))?;
        let executable = if path == MANIFEST_FILE {
            false
        } else {
            match wanted.get(&path) {
                Some((size, want, exe)) if *size == n && *want == sha => *exe,
                _ => bail!(
                    "archive entry {path:?} changed between checking and unpacking; refusing it"
                ),
            }
        };
        out.set_permissions(std::fs::Permissions::from_mode(if executable {
            0o755
        } else {
            0o644
        }))?;
        out.sync_all()
            .with_context(|| format!("syncing {}", target.display()))?;
    }
    Ok(())
}

const CORRUPT: &str = "reading the archive failed: it is corrupt or not a .tar.gz";

fn open(tarball: &Path) -> Result<tar::Archive<GzDecoder<std::fs::File>>> {
    let f =
        std::fs::File::open(tarball).with_context(|| format!("opening {}", tarball.display()))?;
    Ok(tar::Archive::new(GzDecoder::new(f)))
}

/// The entry's normalized relative path, `None` for metadata entries to skip, or an error
/// naming why the entry is refused.
fn checked_entry<R: Read>(entry: &tar::Entry<R>) -> Result<Option<String>> {
    use tar::EntryType as T;
    let raw = entry.path_bytes();
    let shown = String::from_utf8_lossy(&raw).into_owned();
    let kind = entry.header().entry_type();
    match kind {
        T::XGlobalHeader | T::XHeader | T::GNULongName | T::GNULongLink => return Ok(None),
        T::Regular | T::Directory => {}
        T::Symlink | T::Link => {
            let what = if kind == T::Symlink {
                "symlink"
            } else {
                "hard link"
            };
            let link = entry
                .link_name_bytes()
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            // Hard link names are relative to the archive root, symlinks to their folder.
            let base = if kind == T::Symlink {
                parent_of(&shown)
            } else {
                String::new()
            };
            if escapes(&base, &link) {
                bail!(
                    "archive entry {shown:?} is a {what} to {link:?}, which points outside the \
                     install folder; refusing a hostile archive"
                );
            }
            bail!(
                "archive entry {shown:?} is a {what} to {link:?}; rvllm artifacts hold only \
                 plain files, so this archive is not one"
            );
        }
        T::Char | T::Block | T::Fifo => {
            bail!("archive entry {shown:?} is a device or special file; refusing a hostile archive")
        }
        other => bail!(
            "archive entry {shown:?} has unsupported type {other:?}; rvllm artifacts hold only \
             plain files"
        ),
    }
    let text = std::str::from_utf8(&raw)
        .map_err(|_| anyhow::anyhow!("archive entry {shown:?} has a name that is not UTF-8"))?;
    normalize(text)
        .map(|p| if p.is_empty() { None } else { Some(p) })
        .with_context(|| format!("archive entry {shown:?} is refused"))
        .and_then(|p| match p {
            None if kind == T::Directory => Ok(None),
            None => bail!("archive entry {shown:?} has an empty name"),
            some => Ok(some),
        })
}

/// A relative path with only normal components, joined by `/`; `..`, absolute paths and
/// Windows-style prefixes are errors that name the problem.
pub fn normalize(p: &str) -> Result<String> {
    if p.starts_with('/') {
        bail!("it is an absolute path ({p:?}), which would write outside the install folder");
    }
    let mut parts = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => bail!("its path {p:?} contains `..`, which would escape the install folder"),
            c if c.contains('\\') || c.contains('\0') || c.contains(':') && parts.is_empty() => {
                bail!("its path {p:?} contains a drive or separator character")
            }
            c => parts.push(c),
        }
    }
    Ok(parts.join("/"))
}

fn parent_of(p: &str) -> String {
    let p = p.trim_end_matches('/');
    match p.rfind('/') {
        Some(i) => p[..i].to_string(),
        None => String::new(),
    }
}

/// Whether `link`, resolved from the folder `base` (both relative to the install folder),
/// leaves it.
fn escapes(base: &str, link: &str) -> bool {
    if link.starts_with('/') {
        return true;
    }
    let mut depth: Vec<&str> = base
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    for c in link.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                if depth.pop().is_none() {
                    return true;
                }
            }
            c => depth.push(c),
        }
    }
    false
}

struct WriteThrough<'a, R: Read> {
    inner: &'a mut R,
    out: &'a mut std::fs::File,
}

impl<R: Read> Read for WriteThrough<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::io::Write;
        let k = self.inner.read(buf)?;
        self.out.write_all(&buf[..k])?;
        Ok(k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_safe_paths_and_names_the_unsafe_ones() {
        assert_eq!(normalize("bin/rvllm").unwrap(), "bin/rvllm");
        assert_eq!(
            normalize("./kernels//a.fatbin").unwrap(),
            "kernels/a.fatbin"
        );
        assert!(normalize("../x").unwrap_err().to_string().contains(".."));
        assert!(normalize("bin/../../x").is_err());
        assert!(normalize("/etc/passwd")
            .unwrap_err()
            .to_string()
            .contains("absolute"));
        assert!(normalize("C:/x").is_err());
    }

    #[test]
    fn symlink_escape_is_resolved_from_the_link_folder() {
        assert!(escapes("bin", "../../etc/passwd"));
        assert!(escapes("", "../x"));
        assert!(escapes("bin", "/etc/passwd"));
        assert!(!escapes("bin", "../kernels/a.fatbin"));
        assert!(!escapes("bin", "rvllm"));
        assert!(escapes("bin", "a/../../../x"));
    }
}
