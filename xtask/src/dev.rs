//! `cargo xtask dev` / `dev --quit`: work on the Rust code without a CUDA compiler, like
//! vLLM's Python-only development. `dev` takes the compiled kernels of the installed artifact
//! (or of the nightly with `--nightly`), builds the engine from this source tree against
//! them, keeps the installed `PREFIX/bin/rvllm` link aside as a backup and links the source
//! build in its place. `dev --quit` puts the backup back with one rename, so the prefix is
//! exactly as it was.
//!
//! The states, judged only from what is on disk:
//! - link to an installed version, no backup: normal install (`dev` may start);
//! - link elsewhere (the source build) and a backup of an installed link: dev mode;
//! - anything else is inconsistent and is reported with the commands that fix it; nothing
//!   is overwritten.

use crate::dist::{self, manifest::Manifest};
use crate::install::{
    self,
    prefix::{LinkState, Prefix},
};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Leave dev mode: remove the link to the source build and restore the installed binary.
    #[arg(long, short = 'q')]
    pub quit: bool,
    /// Install the nightly build first (its kernels are the ones reused).
    #[arg(long, conflicts_with = "quit")]
    pub nightly: bool,
    /// Prefix of the installed rvllm [default: ~/.local].
    #[arg(long, value_name = "DIR")]
    pub prefix: Option<PathBuf>,
    /// Release tree for --nightly.
    #[arg(long, env = "RVLLM_INDEX_URL", value_name = "URL")]
    pub index_url: Option<String>,
    /// Link this already-built rvllm binary instead of building the engine.
    #[arg(long, value_name = "PATH", conflicts_with = "quit")]
    pub binary: Option<PathBuf>,
    /// Build the engine with the dev profile instead of release (faster to compile).
    #[arg(long, conflicts_with_all = ["quit", "binary"])]
    pub debug: bool,
}

pub fn run(args: Args) -> Result<()> {
    let prefix = Prefix::resolve(args.prefix.as_deref())?;
    if args.quit {
        quit(&prefix)
    } else {
        enter(&prefix, &args)
    }
}

/// What the prefix holds, classified for dev mode.
enum DevState {
    NotInstalled,
    Installed {
        dir: PathBuf,
        manifest: Manifest,
    },
    Dev {
        link_target: PathBuf,
        manifest: Manifest,
    },
}

fn classify(prefix: &Prefix) -> Result<DevState> {
    let link = prefix.link();
    let backup = prefix.backup();
    let (l, b) = (prefix.link_state()?, prefix.backup_state()?);
    let p = prefix.root.display();
    match (l, b) {
        (LinkState::Absent, LinkState::Absent) => Ok(DevState::NotInstalled),
        (LinkState::Installed { dir, manifest }, LinkState::Absent) => {
            Ok(DevState::Installed { dir, manifest })
        }
        (LinkState::Elsewhere { target }, LinkState::Installed { manifest, .. }) => {
            Ok(DevState::Dev {
                link_target: target,
                manifest,
            })
        }
        (LinkState::Absent, LinkState::Installed { .. }) => bail!(
            "inconsistent dev state: the backup {} exists but {} is missing. Restore the \
             installed binary with `mv {} {}`",
            backup.display(),
            link.display(),
            backup.display(),
            link.display()
        ),
        (LinkState::Elsewhere { target }, LinkState::Absent) => bail!(
            "inconsistent dev state: {} links to {} but there is no backup of the installed \
             binary ({}). Remove the link with `rm {}` and reinstall with `cargo xtask install \
             --prefix {p}`",
            link.display(),
            target.display(),
            backup.display(),
            link.display()
        ),
        (LinkState::Installed { .. }, LinkState::Installed { .. }) => bail!(
            "inconsistent dev state: {} is an installed version and a dev backup {} exists too. \
             If the current install is the one you want, remove the backup with `rm {}`",
            link.display(),
            backup.display(),
            backup.display()
        ),
        (LinkState::Broken { target, why }, _) => bail!(
            "{} links to {} which is not a usable install ({why}); reinstall with `cargo xtask \
             install --prefix {p}`",
            link.display(),
            target.display()
        ),
        (LinkState::Foreign, _) => bail!(
            "{} was not installed by `cargo xtask install`; dev mode only works on such \
             installs. Move it away and run `cargo xtask install --prefix {p}`",
            link.display()
        ),
        (_, b) => bail!(
            "inconsistent dev state: the backup {} is not a link to an installed version ({}). \
             Inspect it and remove it (`rm {}`) once {} is what you want",
            backup.display(),
            describe(&b),
            backup.display(),
            link.display()
        ),
    }
}

fn describe(s: &LinkState) -> String {
    match s {
        LinkState::Absent => "missing".into(),
        LinkState::Installed { dir, .. } => format!("installed version {}", dir.display()),
        LinkState::Elsewhere { target } => format!("a link to {}", target.display()),
        LinkState::Broken { why, .. } => why.clone(),
        LinkState::Foreign => "not a link".into(),
    }
}

fn enter(prefix: &Prefix, args: &Args) -> Result<()> {
    if args.nightly {
        if let DevState::Dev { .. } = classify(prefix)? {
            bail!(
                "already in dev mode; run `cargo xtask dev --quit --prefix {}` before switching \
                 to the nightly",
                prefix.root.display()
            );
        }
        let out = install::install(&install::Args {
            nightly: true,
            index_url: args.index_url.clone(),
            prefix: Some(prefix.root.clone()),
            ..Default::default()
        })?;
        println!(
            "installed the nightly rvllm {} (commit {})",
            out.manifest.version, out.manifest.commit
        );
    }
    let (kernels_from, manifest, already) = match classify(prefix)? {
        DevState::NotInstalled => bail!(
            "no rvllm is installed in {}; run `cargo xtask dev --nightly` (or `cargo xtask \
             install --nightly`) first",
            prefix.root.display()
        ),
        DevState::Installed { dir, manifest } => (dir, manifest, false),
        DevState::Dev { manifest, .. } => {
            let dir = prefix
                .lib_dir()
                .join(install::prefix::install_dir_name(&manifest));
            (dir, manifest, true)
        }
    };

    warn_on_commit_mismatch(&manifest);
    // Build before touching the prefix: a failed build changes nothing.
    let built = match &args.binary {
        Some(b) => b
            .canonicalize()
            .with_context(|| format!("--binary {}: no such file", b.display()))?,
        None => build_engine(&kernels_from, &manifest, args.debug)?,
    };
    if !built.is_file() {
        bail!("{} is not a file", built.display());
    }

    let link = prefix.link();
    let tmp = prefix
        .bin_dir()
        .join(format!(".rvllm.dev-new-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&built, &tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    if !already {
        // Keep the installed link under a second name first (a hard link to the symlink
        // itself), so PREFIX/bin/rvllm never disappears, not even for an instant.
        if let Err(e) = std::fs::hard_link(&link, prefix.backup()) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e).with_context(|| format!("backing up {}", link.display()));
        }
    }
    if let Err(e) = std::fs::rename(&tmp, &link) {
        let _ = std::fs::remove_file(&tmp);
        if !already {
            let _ = std::fs::remove_file(prefix.backup());
        }
        return Err(e).with_context(|| format!("linking {}", link.display()));
    }
    println!(
        "{}dev mode: {} -> {} (over the installed rvllm {}, commit {}, {}; its link kept as {})",
        if already { "still in " } else { "" },
        link.display(),
        built.display(),
        manifest.version,
        manifest.commit,
        manifest.variant(),
        prefix.backup().display()
    );
    println!(
        "`cargo xtask dev --quit --prefix {}` restores the installed binary",
        prefix.root.display()
    );
    Ok(())
}

fn quit(prefix: &Prefix) -> Result<()> {
    match classify(prefix)? {
        DevState::NotInstalled => {
            println!(
                "not in dev mode (no rvllm installed in {}); nothing to do",
                prefix.root.display()
            );
        }
        DevState::Installed { manifest, .. } => {
            println!(
                "not in dev mode; {} is the installed rvllm {} (commit {}); nothing to do",
                prefix.link().display(),
                manifest.version,
                manifest.commit
            );
        }
        DevState::Dev {
            link_target,
            manifest,
        } => {
            // One rename: the backup (the original link, same inode) replaces the dev link.
            std::fs::rename(prefix.backup(), prefix.link()).with_context(|| {
                format!(
                    "restoring {} from {}",
                    prefix.link().display(),
                    prefix.backup().display()
                )
            })?;
            println!(
                "left dev mode: {} is the installed rvllm {} (commit {}) again (was linked to {})",
                prefix.link().display(),
                manifest.version,
                manifest.commit,
                link_target.display()
            );
        }
    }
    Ok(())
}

fn warn_on_commit_mismatch(m: &Manifest) {
    match dist::git_head(&dist::workspace_root()) {
        Some(h) if h.eq_ignore_ascii_case(&m.commit) => {}
        Some(h) => eprintln!(
            "warning: this source tree is at commit {h} but the installed kernels come from \
             commit {}; if the kernels' interface changed in between, the build or its results \
             can be wrong. Install that commit's build (`cargo xtask install --commit {h}`) or \
             check out {}",
            m.commit, m.commit
        ),
        None => eprintln!(
            "warning: cannot read this source tree's commit; the installed kernels come from \
             commit {}",
            m.commit
        ),
    }
}

/// Builds the engine against the installed kernels (CUDA artifacts), or the CPU engine.
fn build_engine(installed: &Path, m: &Manifest, debug: bool) -> Result<PathBuf> {
    let root = dist::workspace_root();
    let kernels = installed.join("kernels");
    let fatbins = if m.cuda.is_some() {
        dist::collect_fatbins(&kernels).unwrap_or_default()
    } else {
        Vec::new()
    };
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(&root).args(["build", "-p", "rvllm"]);
    // So that `rvllm --version` names this source tree's commit (see dist::build_release).
    if let Some(head) = dist::git_head(&root) {
        cmd.env("RVLLM_COMMIT", head);
    }
    if !debug {
        cmd.arg("--release");
    }
    if fatbins.is_empty() {
        eprintln!(
            "the installed artifact has no compiled kernels ({}); building the CPU engine",
            m.variant()
        );
    } else {
        cmd.args(["--features", "cuda"]);
        cmd.env("RVLLM_PREBUILT_KERNELS", &kernels);
        eprintln!(
            "building with the {} prebuilt kernels of {} (no nvcc needed)",
            fatbins.len(),
            kernels.display()
        );
    }
    eprintln!("running {cmd:?}");
    let status = cmd.status().context("running cargo build")?;
    if !status.success() {
        bail!("building the engine failed ({status}); nothing in the prefix was changed");
    }
    let profile = if debug { "debug" } else { "release" };
    let bin = dist::target_dir(&root).join(profile).join("rvllm");
    bin.canonicalize()
        .with_context(|| format!("the build did not produce {}", bin.display()))
}
