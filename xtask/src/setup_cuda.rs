//! `cargo xtask setup-cuda`: where no CUDA toolkit is present, installs nvcc, the runtime
//! headers and CCCL from PyPI into `<repo>/.cuda` (git-ignored), which detection then finds.
//! No system file is touched.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::toolchain::{self, CudaVersion, ToolkitSource};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// CUDA version (major.minor) to install, e.g. 13.0. Default: the driver's CUDA version
    /// when a driver is present, else 13.0.
    #[arg(long)]
    pub version: Option<String>,
    /// Install even when another toolkit is already found, replacing <repo>/.cuda.
    #[arg(long)]
    pub force: bool,
}

/// Used when no driver says otherwise: the CUDA of the newest PyPI toolkit we test with.
pub const FALLBACK_VERSION: CudaVersion = CudaVersion {
    major: 13,
    minor: 0,
};

/// The pip requirement specifiers for a CUDA version. All parts are pinned to the same
/// minor release: nvcc depends on unpinned `nvidia-nvvm` / `nvidia-cuda-crt`, and a newer
/// cicc next to an older ptxas emits PTX that ptxas rejects.
pub fn pip_requirements(v: CudaVersion) -> Result<Vec<String>> {
    let pin = format!("=={}.{}.*", v.major, v.minor);
    let names: &[&str] = match v.major {
        13.. => &["nvidia-cuda-nvcc", "nvidia-cuda-runtime", "nvidia-cuda-cccl", "nvidia-nvvm", "nvidia-cuda-crt"],
        12 => &["nvidia-cuda-nvcc-cu12", "nvidia-cuda-runtime-cu12", "nvidia-cuda-cccl-cu12"],
        _ => bail!("CUDA {v} is not available from PyPI; use 12.x or 13.x (or install a toolkit and set CUDA_HOME)"),
    };
    Ok(names.iter().map(|n| format!("{n}{pin}")).collect())
}

fn python() -> Result<PathBuf> {
    for name in ["python3", "python"] {
        if let Ok(p) = which::which(name) {
            return Ok(p);
        }
    }
    bail!("setup-cuda needs Python with pip; install it (e.g. `apt-get install python3-pip`)")
}

pub fn run(args: Args) -> Result<()> {
    let root = crate::project_root();
    let det = toolchain::detect_cuda(&root);
    if let Some(tk) = det
        .chosen
        .as_ref()
        .filter(|t| t.source != ToolkitSource::ProjectLocal)
    {
        if !args.force {
            eprintln!(
                "a CUDA toolkit is already present: nvcc {} at {} ({}); rvllm builds against it. \
                 Nothing to do (--force installs the project-local one anyway, without touching it).",
                tk.version,
                tk.nvcc.display(),
                tk.source
            );
            return Ok(());
        }
    }
    let version = match &args.version {
        Some(v) => CudaVersion::parse(v)
            .with_context(|| format!("--version `{v}`: write major.minor, e.g. 13.0"))?,
        None => match crate::driver::query_driver() {
            Ok(Some(info)) => {
                eprintln!(
                    "the driver supports CUDA {}; installing that version",
                    info.cuda_version
                );
                info.cuda_version
            }
            _ => FALLBACK_VERSION,
        },
    };
    if let Some(tk) = det
        .chosen
        .as_ref()
        .filter(|t| t.source == ToolkitSource::ProjectLocal)
    {
        if tk.version == version && !args.force {
            eprintln!(
                "the project-local toolkit already has nvcc {version} at {}",
                tk.nvcc.display()
            );
            return Ok(());
        }
    }
    let dest = toolchain::project_local_dir(&root);
    install(&dest, version)?;
    let tk = toolchain::detect_cuda_with(&toolchain::DetectEnv {
        project_local: Some(dest.clone()),
        ..Default::default()
    })
    .chosen
    .context("the install finished but no nvcc was found under .cuda; please report this")?;
    crate::doctor::smoke_compile(&tk)
        .map_err(anyhow::Error::msg)
        .context("the installed nvcc failed to compile a test kernel")?;
    eprintln!(
        "installed nvcc {} at {} (a test kernel compiled)",
        tk.version,
        tk.nvcc.display()
    );
    Ok(())
}

/// Installs into a scratch folder next to `dest`, then swaps it in, so a failed download
/// never leaves a half-installed toolkit that detection would pick up.
fn install(dest: &Path, version: CudaVersion) -> Result<()> {
    let reqs = pip_requirements(version)?;
    let py = python()?;
    let staging = dest.with_extension("partial");
    if staging.exists() {
        std::fs::remove_dir_all(&staging)
            .with_context(|| format!("removing {}", staging.display()))?;
    }
    eprintln!("installing {} into {}", reqs.join(" "), dest.display());
    // `--target` installs outside any Python environment (and is allowed where the system
    // Python is externally managed); pip's own cache makes repeated CI runs cheap.
    let status = Command::new(&py)
        .args([
            "-m",
            "pip",
            "install",
            "--no-input",
            "--disable-pip-version-check",
            "--target",
        ])
        .arg(&staging)
        .args(&reqs)
        .status()
        .with_context(|| format!("running {} -m pip", py.display()))?;
    if !status.success() {
        bail!(
            "pip could not install CUDA {version} ({status}); check the network, or choose another version \
             with `cargo xtask setup-cuda --version 13.0`"
        );
    }
    if dest.exists() {
        std::fs::remove_dir_all(dest)
            .with_context(|| format!("removing the old {}", dest.display()))?;
    }
    std::fs::rename(&staging, dest)
        .with_context(|| format!("moving {} to {}", staging.display(), dest.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_part_is_pinned_to_one_minor_release() {
        let r = pip_requirements(CudaVersion {
            major: 13,
            minor: 0,
        })
        .unwrap();
        assert!(r.contains(&"nvidia-cuda-nvcc==13.0.*".to_string()));
        assert!(r.contains(&"nvidia-nvvm==13.0.*".to_string()));
        assert!(r.iter().all(|s| s.ends_with("==13.0.*")), "{r:?}");
        let r = pip_requirements(CudaVersion {
            major: 12,
            minor: 4,
        })
        .unwrap();
        assert!(r.contains(&"nvidia-cuda-nvcc-cu12==12.4.*".to_string()));
        assert!(pip_requirements(CudaVersion {
            major: 11,
            minor: 8
        })
        .is_err());
    }
}
