//! `cargo xtask install`: downloads a prebuilt artifact (latest release, `--version`,
//! `--nightly`, `--commit`, or `--from` a file/URL), verifies it, checks it against this
//! machine and installs it atomically under a prefix. See [`prefix`] for the layout.
//!
//! Order of work, so that a failure anywhere leaves the prefix exactly as it was: validate
//! the request (before any network), check the prefix is ours to change, download into the
//! system temp folder, verify sha256, inspect the archive without writing, check the
//! manifest against the request and the machine, unpack into a staging folder inside the
//! prefix, run the staged binary, rename it into place, switch the link with a rename.

pub mod fetch;
pub mod host;
pub mod prefix;
pub mod unpack;

use crate::dist::index::{ArtifactEntry, ChannelIndex, RootIndex, INDEX_FILE};
use crate::dist::manifest::{is_full_commit, BinaryIdentity, Manifest};
use anyhow::{bail, Context, Result};
use fetch::{parse_sha256_file, Fetcher, Location};
use host::{Host, VariantRequest};
use prefix::{LinkState, Prefix, PrefixTxn};
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug, Clone, Default)]
pub struct Args {
    /// Install this release version [default: the latest release].
    #[arg(long, value_name = "X.Y.Z", conflicts_with_all = ["nightly", "commit", "from"])]
    pub version: Option<String>,
    /// Install the nightly build of the latest main.
    #[arg(long, conflicts_with_all = ["commit", "from"])]
    pub nightly: bool,
    /// Install the build of this commit (the full 40-hex hash).
    #[arg(long, value_name = "SHA", conflicts_with = "from")]
    pub commit: Option<String>,
    /// CUDA variant: MAJOR.MINOR (12.1, 11.8, ...) or `cpu` [default: the newest variant
    /// the local driver can run; the CPU variant when there is no driver].
    #[arg(long, value_name = "MAJOR.MINOR|cpu")]
    pub cuda: Option<String>,
    /// Install this artifact (.tar.gz path or URL) instead of looking it up in an index; its
    /// sha256 comes from the `.sha256` beside it or from --sha256.
    #[arg(long, value_name = "PATH|URL")]
    pub from: Option<String>,
    /// Expected sha256 of the --from artifact.
    #[arg(long, value_name = "HEX", requires = "from")]
    pub sha256: Option<String>,
    /// Base URL (or folder) of the release tree.
    #[arg(long, env = "RVLLM_INDEX_URL", value_name = "URL")]
    pub index_url: Option<String>,
    /// Install under this prefix (binary link in PREFIX/bin) [default: ~/.local].
    #[arg(long, value_name = "DIR")]
    pub prefix: Option<PathBuf>,
}

/// What an install did.
#[derive(Debug)]
pub struct Outcome {
    pub manifest: Manifest,
    pub dir: PathBuf,
    pub previous: Option<Manifest>,
}

pub fn run(args: Args) -> Result<()> {
    let out = install(&args)?;
    let m = &out.manifest;
    let prefix = Prefix::resolve(args.prefix.as_deref())?;
    println!(
        "installed rvllm {} (commit {}, {}, {}) into {}",
        m.version,
        m.commit,
        m.cuda
            .as_deref()
            .map(|c| format!("CUDA {c}"))
            .unwrap_or_else(|| "CPU".into()),
        m.target,
        out.dir.display()
    );
    println!(
        "{} -> {}",
        prefix.link().display(),
        out.dir.join("bin/rvllm").display()
    );
    if let Some(p) = &out.previous {
        if p != m {
            println!(
                "previous version {} (commit {}) is kept; `cargo xtask install --version {}` \
                 or --commit {} switches back",
                p.version, p.commit, p.version, p.commit
            );
        }
    }
    let bin = prefix.bin_dir();
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d == bin))
        .unwrap_or(false);
    if !on_path {
        println!(
            "note: {} is not on PATH; add it to run `rvllm`",
            bin.display()
        );
    }
    Ok(())
}

/// The whole install, returning what was installed; nothing in the prefix changes on error.
pub fn install(args: &Args) -> Result<Outcome> {
    // 1. The request, before any network.
    if let Some(c) = &args.commit {
        if !is_full_commit(c) {
            bail!(
                "--commit {c:?} is not a full commit hash; builds are published under the full \
                 40-hex hash (`git rev-parse {c}` prints it)"
            );
        }
    }
    let variant = args
        .cuda
        .as_deref()
        .map(VariantRequest::parse)
        .transpose()?;
    if let Some(s) = &args.sha256 {
        if parse_sha256_file(s).is_none() {
            bail!("--sha256 {s:?} is not a 64-hex sha256 digest");
        }
    }
    let prefix = Prefix::resolve(args.prefix.as_deref())?;
    let previous = check_prefix_is_ours(&prefix)?;
    let host = host::detect();
    let fetcher = Fetcher::new()?;

    // 2. Where the artifact is and what it must hash to.
    let (loc, want_sha, want_size, entry) = match &args.from {
        Some(from) => {
            let loc = Location::parse(from);
            let sha = match &args.sha256 {
                Some(s) => parse_sha256_file(s).unwrap_or_default(),
                None => {
                    let side = loc.with_suffix(".sha256");
                    let text = fetcher.fetch_small(&side)?.with_context(|| {
                        format!(
                            "there is no {side} beside the artifact, so its integrity cannot \
                             be checked; pass --sha256 HEX"
                        )
                    })?;
                    parse_sha256_file(&String::from_utf8_lossy(&text))
                        .with_context(|| format!("{side} holds no sha256 digest"))?
                }
            };
            (loc, sha, None, None)
        }
        None => {
            let (dir, entry) = locate(args, &fetcher, &host, variant.as_ref())?;
            let loc = dir.join(&entry.file);
            (loc, entry.sha256.clone(), Some(entry.size), Some(entry))
        }
    };

    // 3. Download outside the prefix and verify before looking inside.
    let mut tmp = tempfile::Builder::new()
        .prefix("rvllm-download-")
        .suffix(".tar.gz")
        .tempfile()
        .context("creating a temporary file for the download")?;
    let (_, got_sha) = fetcher.download(&loc, tmp.as_file_mut(), want_size)?;
    if got_sha != want_sha.to_ascii_lowercase() {
        bail!(
            "sha256 of {loc} is {got_sha} but {want_sha} was expected: the download is corrupt \
             or was tampered with; nothing was installed"
        );
    }
    let manifest = unpack::inspect(tmp.path()).with_context(|| format!("checking {loc}"))?;

    // 4. The manifest must be what was asked for, and runnable here.
    check_request(args, entry.as_ref(), variant.as_ref(), &manifest)?;
    for w in host::check(&manifest, &host)? {
        eprintln!("warning: {w}");
    }
    warn_on_uncovered_gpus(&manifest, &host);

    // 5. Into the prefix.
    let dir = place(&prefix, tmp.path(), &manifest)?;
    Ok(Outcome {
        manifest,
        dir,
        previous,
    })
}

/// Warns when a GPU of this machine is not among the architectures the kernels cover (the
/// CUDA backend would fail to load them there). Only asked when a driver is present.
fn warn_on_uncovered_gpus(m: &Manifest, host: &Host) {
    if m.cuda.is_none() || host.driver.is_none() {
        return;
    }
    let Ok(Some(info)) = crate::driver::query_driver() else {
        return;
    };
    let gpus: Vec<(u32, u32)> = info.gpus.iter().map(|g| g.compute_capability).collect();
    for (major, minor) in host::uncovered_gpus(&m.compute_capabilities, &gpus) {
        eprintln!(
            "warning: this machine has a GPU of compute capability {major}.{minor}, which the \
             artifact's kernels ({}) do not cover; the CUDA backend will not run on it. Build \
             from source (`cargo xtask build`) to compile for it",
            m.compute_capabilities.join(", ")
        );
    }
}

/// Refuses a prefix whose `bin/rvllm` this tool did not make or that is in dev mode;
/// returns the currently installed manifest, if any.
fn check_prefix_is_ours(prefix: &Prefix) -> Result<Option<Manifest>> {
    if !matches!(prefix.backup_state()?, LinkState::Absent) {
        bail!(
            "{} is in dev mode ({} exists); run `cargo xtask dev --quit --prefix {}` first",
            prefix.root.display(),
            prefix.backup().display(),
            prefix.root.display()
        );
    }
    match prefix.link_state()? {
        LinkState::Absent | LinkState::Broken { .. } => Ok(None),
        LinkState::Installed { manifest, .. } => Ok(Some(manifest)),
        LinkState::Elsewhere { target } => bail!(
            "{} is a link to {} that cargo xtask install did not make; move it away (or pick \
             another --prefix) and rerun",
            prefix.link().display(),
            target.display()
        ),
        LinkState::Foreign => bail!(
            "{} exists and is not a link made by cargo xtask install; move it away (or pick \
             another --prefix) and rerun",
            prefix.link().display()
        ),
    }
}

/// Finds the channel index for the request and picks this machine's artifact in it.
fn locate(
    args: &Args,
    fetcher: &Fetcher,
    host: &Host,
    variant: Option<&VariantRequest>,
) -> Result<(Location, ArtifactEntry)> {
    let base = args.index_url.as_deref().context(
        "no release server configured: pass --index-url URL or set RVLLM_INDEX_URL (or install \
         a file with --from PATH)",
    )?;
    let base = Location::parse(base);
    let (dir, what, missing) = if let Some(c) = &args.commit {
        let c = c.to_ascii_lowercase();
        (
            base.join(&format!("commits/{c}")),
            format!("the build of commit {c}"),
            format!(
                "no build is published for commit {c} at {base}: only commits on main are \
                 built. Use --nightly for the latest main build, or build from source with \
                 `cargo xtask build`"
            ),
        )
    } else if args.nightly {
        (
            base.join("nightly"),
            "the nightly build".to_string(),
            format!("no nightly build is published at {base}"),
        )
    } else {
        let version = match &args.version {
            Some(v) => v.clone(),
            None => {
                let root = fetcher
                    .fetch_small(&base.join(INDEX_FILE))?
                    .with_context(|| {
                        format!("{base} has no {INDEX_FILE}; is it a release tree?")
                    })?;
                let root = RootIndex::parse(&root, &format!("{base}/{INDEX_FILE}"))?;
                root.latest
                    .with_context(|| format!("{base} has no releases yet; try --nightly"))?
            }
        };
        (
            base.join(&format!("releases/{version}")),
            format!("release {version}"),
            format!(
                "release {version} is not published at {base}{}",
                available_releases(fetcher, &base)
            ),
        )
    };
    let index_loc = dir.join(INDEX_FILE);
    let bytes = fetcher.fetch_small(&index_loc)?.context(missing)?;
    let idx = ChannelIndex::parse(&bytes, &index_loc.to_string())?;
    let entry = host::pick_artifact(&idx.artifacts, host, variant, &what)?.clone();
    if entry.file.contains('/') || entry.file.starts_with('.') {
        bail!(
            "{index_loc} names artifact file {:?}, which is not a plain file name",
            entry.file
        );
    }
    Ok((dir, entry))
}

fn available_releases(fetcher: &Fetcher, base: &Location) -> String {
    let Ok(Some(bytes)) = fetcher.fetch_small(&base.join(INDEX_FILE)) else {
        return String::new();
    };
    match RootIndex::parse(&bytes, "index") {
        Ok(r) if !r.releases.is_empty() => format!(" (available: {})", r.releases.join(", ")),
        _ => String::new(),
    }
}

/// The manifest must agree with the index entry and with what the user asked for.
fn check_request(
    args: &Args,
    entry: Option<&ArtifactEntry>,
    variant: Option<&VariantRequest>,
    m: &Manifest,
) -> Result<()> {
    if let Some(e) = entry {
        if e.version != m.version
            || e.commit != m.commit
            || e.target != m.target
            || e.cuda != m.cuda
        {
            bail!(
                "the index says {} {} {} {} but the artifact's manifest says {} {} {} {}; the \
                 release tree is inconsistent, nothing was installed",
                e.version,
                e.commit,
                e.target,
                e.variant,
                m.version,
                m.commit,
                m.target,
                m.variant()
            );
        }
    }
    if let Some(v) = &args.version {
        if *v != m.version {
            bail!(
                "asked for version {v} but the artifact is version {}",
                m.version
            );
        }
    }
    if let Some(c) = &args.commit {
        if !c.eq_ignore_ascii_case(&m.commit) {
            bail!(
                "asked for commit {c} but the artifact was built from {}",
                m.commit
            );
        }
    }
    if let Some(v) = variant {
        let ok = match v {
            VariantRequest::Cpu => m.cuda.is_none(),
            VariantRequest::Cuda(cv) => {
                m.cuda
                    .as_deref()
                    .and_then(crate::toolchain::CudaVersion::parse)
                    == Some(*cv)
            }
        };
        if !ok {
            bail!(
                "asked for --cuda {} but the artifact is the {} variant",
                args.cuda.as_deref().unwrap_or(""),
                m.variant()
            );
        }
    }
    Ok(())
}

/// Unpacks into a staging folder next to the final one, checks the staged binary runs,
/// renames it into place and switches `bin/rvllm`. Returns the version folder.
fn place(prefix: &Prefix, tarball: &Path, m: &Manifest) -> Result<PathBuf> {
    let lib = prefix.lib_dir();
    let name = prefix::install_dir_name(m);
    let final_dir = lib.join(&name);
    let mut txn = PrefixTxn::default();
    txn.ensure_dir(&lib)?;

    let reuse = final_dir.is_dir()
        && prefix::read_installed_manifest(&final_dir).is_ok_and(|have| have == *m)
        && prefix::verify_installed(&final_dir, m).is_ok();
    if !reuse {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let staging = lib.join(format!(
            "{}{}-{stamp}",
            prefix::STAGING_PREFIX,
            std::process::id()
        ));
        std::fs::create_dir(&staging).with_context(|| format!("creating {}", staging.display()))?;
        txn.scratch(staging.clone());
        unpack::unpack(tarball, &staging, m)?;
        smoke_test(&staging.join("bin/rvllm"), m)?;
        if final_dir.exists() {
            // A damaged copy of this same version: swap it out, never delete first.
            let old = lib.join(format!(
                "{}{}-old-{stamp}",
                prefix::STAGING_PREFIX,
                std::process::id()
            ));
            std::fs::rename(&final_dir, &old)
                .with_context(|| format!("moving aside {}", final_dir.display()))?;
            if let Err(e) = std::fs::rename(&staging, &final_dir) {
                let _ = std::fs::rename(&old, &final_dir);
                return Err(e).with_context(|| format!("renaming into {}", final_dir.display()));
            }
            txn.scratch(old);
        } else {
            std::fs::rename(&staging, &final_dir)
                .with_context(|| format!("renaming into {}", final_dir.display()))?;
        }
        txn.keep(&staging);
        // From here the new version is complete on disk; if switching the link fails it
        // stays as an unused version folder, and the old link keeps working.
    }

    let bin = prefix.bin_dir();
    txn.ensure_dir(&bin)?;
    let tmp_link = bin.join(format!(".rvllm.new-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp_link);
    // Relative, so the prefix can move; absolute when PREFIX/bin is itself a link elsewhere
    // (a relative `..` would then resolve from the link's real folder).
    let bin_is_plain = bin
        .canonicalize()
        .ok()
        .and_then(|b| b.parent().map(Path::to_path_buf))
        == prefix.root.canonicalize().ok();
    let target = if bin_is_plain {
        prefix::link_target(&name)
    } else {
        final_dir.join("bin").join("rvllm")
    };
    std::os::unix::fs::symlink(&target, &tmp_link)
        .with_context(|| format!("creating {}", tmp_link.display()))?;
    txn.scratch(tmp_link.clone());
    std::fs::rename(&tmp_link, prefix.link())
        .with_context(|| format!("switching {}", prefix.link().display()))?;
    txn.keep(&tmp_link);
    for stale in prefix::stale_staging_dirs(&lib) {
        txn.scratch(stale);
    }
    txn.commit();
    Ok(final_dir)
}

/// The staged binary must run here and say it is the version the manifest claims.
fn smoke_test(bin: &Path, m: &Manifest) -> Result<()> {
    let out = std::process::Command::new(bin)
        .arg("--version")
        .output()
        .with_context(|| format!("running the artifact's binary {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "the artifact's binary does not run on this machine ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let id = BinaryIdentity::parse(text.lines().next().unwrap_or(""))?;
    if id.version != m.version || !id.commit.eq_ignore_ascii_case(&m.commit) {
        bail!(
            "the artifact's binary says it is {} (commit {}) but its manifest says {} (commit \
             {}); refusing an inconsistent artifact",
            id.version,
            id.commit,
            m.version,
            m.commit
        );
    }
    Ok(())
}
