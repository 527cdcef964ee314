//! `cargo xtask dist`: builds (or takes) the `rvllm` binary, packages it with its compiled
//! kernels and a manifest into a reproducible `.tar.gz` with a `.sha256` beside it, and
//! optionally publishes it into a static release tree (see [`index`]).

pub mod index;
pub mod manifest;

use anyhow::{bail, Context, Result};
use flate2::{write::GzEncoder, Compression};
use index::Channel;
use manifest::{
    fatbin_archs, is_full_commit, scan_min_glibc, sha256_file, sort_capabilities, BinaryIdentity,
    FileEntry, Manifest, MANIFEST_FILE, MANIFEST_SCHEMA,
};
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Build the CUDA variant, recording this CUDA toolkit version (e.g. 12.1, 13.0).
    /// Without it the CPU variant is built.
    #[arg(long, value_name = "MAJOR.MINOR")]
    pub cuda: Option<String>,
    /// Folder for the tarball and its .sha256 [default: <target dir>/dist].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Package this already-built rvllm binary instead of running cargo build.
    #[arg(long, value_name = "PATH")]
    pub binary: Option<PathBuf>,
    /// Folder holding the compiled kernels (*.fatbin) [default: the rvllm-kernels build
    /// output of the release build].
    #[arg(long, value_name = "DIR")]
    pub kernels_dir: Option<PathBuf>,
    /// Also publish the artifact into this static release tree.
    #[arg(long, value_name = "DIR")]
    pub release_tree: Option<PathBuf>,
    /// Part of the release tree to publish into; both also publish under commits/<sha>/.
    #[arg(long, value_enum, default_value = "nightly", requires = "release_tree")]
    pub channel: Channel,
}

/// What `dist` produced.
#[derive(Debug)]
pub struct Artifact {
    pub tarball: PathBuf,
    pub sha256: String,
    pub size: u64,
    pub manifest: Manifest,
}

pub fn run(args: Args) -> Result<()> {
    if let Some(v) = &args.cuda {
        validate_cuda_version(v)?;
    }
    let root = workspace_root();
    let binary = match &args.binary {
        Some(b) => b.clone(),
        None => build_release(&root, args.cuda.as_deref())?,
    };
    let kernels = if args.cuda.is_some() {
        let dir = match &args.kernels_dir {
            Some(d) => d.clone(),
            None => find_kernels_dir(&target_dir(&root)).context(
                "found no compiled kernels (*.fatbin) in the rvllm-kernels build output; \
                 pass --kernels-dir DIR",
            )?,
        };
        if let Some(v) = &args.cuda {
            check_nvcc_version(&dir, v)?;
        }
        let mut files = collect_fatbins(&dir)?;
        // The architectures list travels too: a build from these prebuilt kernels
        // (`cargo xtask dev`) reports it.
        let archs = dir.join("built_archs.txt");
        if archs.is_file() && !files.is_empty() {
            files.push(archs);
        }
        files
    } else {
        if args.kernels_dir.is_some() {
            bail!("--kernels-dir only applies to CUDA artifacts; add --cuda MAJOR.MINOR");
        }
        Vec::new()
    };
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| target_dir(&root).join("dist"));
    let art = package(&binary, &kernels, args.cuda.as_deref(), &out)?;
    println!(
        "packaged rvllm {} (commit {}, {}, {}) -> {} ({} bytes, sha256 {})",
        art.manifest.version,
        art.manifest.commit,
        art.manifest.target,
        art.manifest.variant(),
        art.tarball.display(),
        art.size,
        art.sha256
    );
    if let Some(tree) = &args.release_tree {
        let dirs = index::publish(
            tree,
            &art.tarball,
            &art.sha256,
            art.size,
            &art.manifest,
            args.channel,
        )?;
        for d in dirs {
            println!("published into {}", d.display());
        }
    }
    Ok(())
}

/// `12.1`-style: digits, a dot, digits.
pub fn validate_cuda_version(v: &str) -> Result<()> {
    let ok = v
        .split_once('.')
        .map(|(a, b)| {
            !a.is_empty()
                && !b.is_empty()
                && a.bytes().all(|c| c.is_ascii_digit())
                && b.bytes().all(|c| c.is_ascii_digit())
        })
        .unwrap_or(false);
    if !ok {
        bail!("--cuda {v:?} is not a CUDA version; write MAJOR.MINOR, e.g. --cuda 12.1");
    }
    Ok(())
}

/// The full commit of HEAD in `root`, if it is a git checkout.
pub fn git_head(root: &Path) -> Option<String> {
    Command::new("git")
        .arg("-C")
        .arg(root)
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|h| is_full_commit(h))
}

/// kernels/build.rs leaves `kernel_build.json` (with the nvcc version) beside the fatbins;
/// the manifest's CUDA version must be the one the kernels were really compiled with.
fn check_nvcc_version(kernels: &Path, cuda: &str) -> Result<()> {
    let Ok(bytes) = std::fs::read(kernels.join("kernel_build.json")) else {
        return Ok(());
    };
    let report: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    let Some(nvcc) = report.get("nvcc_version").and_then(|v| v.as_str()) else {
        return Ok(());
    };
    let major_minor = |v: &str| {
        let mut it = v.trim().split('.');
        (it.next().map(str::to_string), it.next().map(str::to_string))
    };
    if major_minor(nvcc) != major_minor(cuda) {
        bail!(
            "the kernels in {} were compiled with nvcc {nvcc} but --cuda says {cuda}; pass \
             --cuda {nvcc} (the manifest must name the real toolkit)",
            kernels.display()
        );
    }
    Ok(())
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

pub fn target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => root.join(d),
        None => root.join("target"),
    }
}

fn build_release(root: &Path, cuda: Option<&str>) -> Result<PathBuf> {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root)
        .args(["build", "--release", "-p", "rvllm"]);
    if cuda.is_some() {
        cmd.args(["--features", "cuda"]);
    }
    // engine/build.rs reruns when RVLLM_COMMIT changes; `.git/HEAD` alone does not change on
    // a new commit, so without this the binary (and so the manifest) can name an old commit.
    if let Some(head) = git_head(root) {
        cmd.env("RVLLM_COMMIT", head);
    }
    eprintln!("running {cmd:?}");
    let status = cmd.status().context("running cargo build")?;
    if !status.success() {
        bail!("cargo build --release -p rvllm failed ({status}); fix the build and rerun dist");
    }
    // The manifest names HEAD; say so when the build holds more than HEAD.
    let dirty = Command::new("git")
        .arg("-C")
        .arg(root)
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .is_some_and(|o| !o.stdout.is_empty());
    if dirty {
        eprintln!(
            "warning: the working tree has uncommitted changes; the artifact is labelled with \
             commit HEAD but contains them. Commit first for a reproducible artifact"
        );
    }
    Ok(target_dir(root).join("release").join("rvllm"))
}

/// Where the release build left its fatbins: `<target>/release/rvllm-kernels/` (a stable
/// copy that kernels/build.rs keeps), else the newest `rvllm-kernels-*/out` build folder.
pub fn find_kernels_dir(target: &Path) -> Option<PathBuf> {
    let stable = target.join("release").join("rvllm-kernels");
    if collect_fatbins(&stable).is_ok_and(|f| !f.is_empty()) {
        return Some(stable);
    }
    let build = target.join("release").join("build");
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    for e in std::fs::read_dir(&build).ok()?.flatten() {
        if !e
            .file_name()
            .to_string_lossy()
            .starts_with("rvllm-kernels-")
        {
            continue;
        }
        let out = e.path().join("out");
        let fatbins = collect_fatbins(&out).unwrap_or_default();
        if fatbins.is_empty() {
            continue;
        }
        let newest = fatbins
            .iter()
            .filter_map(|p| p.metadata().and_then(|m| m.modified()).ok())
            .max()?;
        if best.as_ref().is_none_or(|(t, _)| newest > *t) {
            best = Some((newest, out));
        }
    }
    best.map(|(_, p)| p)
}

/// Every `*.fatbin` in `dir` (and its subfolders), sorted by file name.
pub fn collect_fatbins(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "fatbin") {
                out.push(p);
            }
        }
    }
    out.sort_by_key(|p| p.file_name().map(|n| n.to_os_string()));
    for w in out.windows(2) {
        if w[0].file_name() == w[1].file_name() {
            bail!(
                "two kernels named {:?} under {}; the artifact keeps one folder of kernels",
                w[0].file_name().unwrap_or_default(),
                dir.display()
            );
        }
    }
    Ok(out)
}

/// Asks the binary who it is.
pub fn identify(binary: &Path) -> Result<BinaryIdentity> {
    let out = Command::new(binary)
        .arg("--version")
        .output()
        .with_context(|| format!("running {} --version", binary.display()))?;
    if !out.status.success() {
        bail!(
            "{} --version failed ({}): {}",
            binary.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    BinaryIdentity::parse(text.lines().next().unwrap_or(""))
}

/// Writes `<out>/rvllm-<version>-<target>-<variant>.tar.gz` and its `.sha256`.
pub fn package(
    binary: &Path,
    kernels: &[PathBuf],
    cuda: Option<&str>,
    out: &Path,
) -> Result<Artifact> {
    let id = identify(binary)?;
    let has_cuda = id.backends.iter().any(|b| b == "cuda");
    match (cuda, has_cuda) {
        (Some(v), false) => bail!(
            "--cuda {v} given but {} has no CUDA backend (device backends: {}); build it with \
             --features cuda",
            binary.display(),
            id.backends.join(", ")
        ),
        (None, true) => bail!(
            "{} has a CUDA backend; pass --cuda MAJOR.MINOR (the toolkit it was built with)",
            binary.display()
        ),
        _ => {}
    }
    if cuda.is_some()
        && !kernels
            .iter()
            .any(|k| k.extension().is_some_and(|x| x == "fatbin"))
    {
        bail!("a CUDA artifact needs its compiled kernels; none were found");
    }
    if !is_full_commit(&id.commit) {
        bail!(
            "{} reports commit {:?}; artifacts must name their full commit. Build from a git \
             checkout or set RVLLM_COMMIT=<40-hex> for the build",
            binary.display(),
            id.commit
        );
    }

    // (path in archive, source file, executable)
    let mut files: Vec<(String, PathBuf, bool)> = vec![("bin/rvllm".into(), binary.into(), true)];
    let mut caps = Vec::new();
    for k in kernels {
        if k.extension().is_some_and(|x| x == "fatbin") {
            let bytes = std::fs::read(k).with_context(|| format!("reading {}", k.display()))?;
            let archs = fatbin_archs(&bytes).with_context(|| format!("reading {}", k.display()))?;
            caps.extend(archs);
        }
        let name = k
            .file_name()
            .context("kernel path has no file name")?
            .to_string_lossy()
            .into_owned();
        files.push((format!("kernels/{name}"), k.clone(), false));
    }
    sort_capabilities(&mut caps);

    let bin_bytes =
        std::fs::read(binary).with_context(|| format!("reading {}", binary.display()))?;
    let mut entries = Vec::new();
    for (path, src, exe) in &files {
        let (size, sha256) = sha256_file(src)?;
        entries.push(FileEntry {
            path: path.clone(),
            size,
            sha256,
            executable: *exe,
        });
    }
    let manifest = Manifest {
        schema: MANIFEST_SCHEMA,
        name: "rvllm".into(),
        version: id.version.clone(),
        commit: id.commit.to_ascii_lowercase(),
        target: id.target.clone(),
        cuda: cuda.map(str::to_string),
        compute_capabilities: caps,
        min_glibc: scan_min_glibc(&bin_bytes),
        files: entries,
    };

    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let name = index::artifact_file_name(&manifest.version, &manifest.target, &manifest.variant());
    let tarball = out.join(&name);
    let tmp = out.join(format!(".{name}.tmp-{}", std::process::id()));
    write_tarball(&tmp, &manifest, &files).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &tarball)
        .with_context(|| format!("renaming into {}", tarball.display()))?;
    let (size, sha256) = sha256_file(&tarball)?;
    index::write_atomic(
        &out.join(format!("{name}.sha256")),
        format!("{sha256}  {name}\n").as_bytes(),
    )?;
    Ok(Artifact {
        tarball,
        sha256,
        size,
        manifest,
    })
}

/// A reproducible archive: manifest first (so installers meet it early), fixed owner, mode
/// and mtime, files in a fixed order.
fn write_tarball(path: &Path, m: &Manifest, files: &[(String, PathBuf, bool)]) -> Result<()> {
    let f = std::fs::File::create(path)?;
    let gz = GzEncoder::new(f, Compression::best());
    let mut tar = tar::Builder::new(gz);
    let mut manifest_json = serde_json::to_vec_pretty(m)?;
    manifest_json.push(b'\n');
    append(
        &mut tar,
        MANIFEST_FILE,
        0o644,
        &mut manifest_json.as_slice(),
        manifest_json.len() as u64,
    )?;
    for (p, src, exe) in files {
        let mut f =
            std::fs::File::open(src).with_context(|| format!("opening {}", src.display()))?;
        let len = f.metadata()?.len();
        append(&mut tar, p, if *exe { 0o755 } else { 0o644 }, &mut f, len)?;
    }
    let gz = tar.into_inner()?;
    let f = gz.finish()?;
    f.sync_all()?;
    Ok(())
}

fn append<W: std::io::Write>(
    tar: &mut tar::Builder<W>,
    path: &str,
    mode: u32,
    data: &mut dyn std::io::Read,
    len: u64,
) -> Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(len);
    h.set_mode(mode);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    tar.append_data(&mut h, path, data)
        .with_context(|| format!("adding {path} to the archive"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_report_must_match_the_cuda_version() {
        let t = tempfile::tempdir().unwrap();
        assert!(
            check_nvcc_version(t.path(), "12.1").is_ok(),
            "no report: nothing to check"
        );
        std::fs::write(
            t.path().join("kernel_build.json"),
            r#"{"compiled":3,"nvcc_version":"13.0","archs":"80;90a"}"#,
        )
        .unwrap();
        assert!(check_nvcc_version(t.path(), "13.0").is_ok());
        let e = check_nvcc_version(t.path(), "12.1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("nvcc 13.0") && e.contains("--cuda 13.0"), "{e}");
    }

    #[test]
    fn cuda_versions_are_checked() {
        assert!(validate_cuda_version("12.1").is_ok());
        assert!(validate_cuda_version("13.0").is_ok());
        for bad in ["12", "cu121", "12.x", ".1", "12."] {
            assert!(validate_cuda_version(bad).is_err(), "{bad}");
        }
    }
}
