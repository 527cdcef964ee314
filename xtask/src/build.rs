//! `cargo xtask build`: picks the target device, then runs `cargo build -p rvllm` with the
//! matching features and hands the toolkit choice to `kernels/build.rs`.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::toolchain::{self, CudaToolkit, Detection};

/// What the engine is built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetDevice {
    /// CUDA kernels compiled with nvcc, plus the CPU backend.
    Cuda,
    /// The CPU backend only; no CUDA needed.
    Cpu,
    /// No device backend and no compiled kernels (development on unsupported systems).
    Empty,
}

impl TargetDevice {
    pub fn as_str(self) -> &'static str {
        match self {
            TargetDevice::Cuda => "cuda",
            TargetDevice::Cpu => "cpu",
            TargetDevice::Empty => "empty",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        match value.trim().to_ascii_lowercase().as_str() {
            "cuda" => Some(TargetDevice::Cuda),
            "cpu" => Some(TargetDevice::Cpu),
            "empty" => Some(TargetDevice::Empty),
            _ => None,
        }
    }

    /// The `cargo build` feature flags of this target for the `rvllm` package.
    pub fn cargo_feature_args(self) -> &'static [&'static str] {
        match self {
            TargetDevice::Cuda => &["--features", "cuda"],
            TargetDevice::Cpu => &[],
            TargetDevice::Empty => &["--no-default-features"],
        }
    }
}

/// The target device and the reason it was chosen (printed in build logs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub device: TargetDevice,
    pub why: String,
}

/// Inputs of [`resolve_target_device`], gathered so tests can vary each one.
#[derive(Clone, Debug, Default)]
pub struct DeviceInputs<'a> {
    pub flag: Option<TargetDevice>,
    pub rvllm_env: Option<&'a str>,
    pub vllm_env: Option<&'a str>,
    pub toolkit_found: bool,
    pub is_linux: bool,
}

/// `--target-device`, then `RVLLM_TARGET_DEVICE`, then `VLLM_TARGET_DEVICE`; by default
/// `cuda` when a toolkit is found, else `cpu` on Linux, else `empty`. Asking for `cuda`
/// without a toolkit is an error that says how to get one.
pub fn resolve_target_device(inp: &DeviceInputs) -> Result<Resolved, String> {
    let explicit = if let Some(d) = inp.flag {
        Some((d, "--target-device".to_string()))
    } else {
        let mut found = None;
        for (name, value) in [
            ("RVLLM_TARGET_DEVICE", inp.rvllm_env),
            ("VLLM_TARGET_DEVICE", inp.vllm_env),
        ] {
            if let Some(v) = value.filter(|v| !v.trim().is_empty()) {
                let d = TargetDevice::parse(v).ok_or_else(|| {
                    format!("{name}=`{v}` is not a target device; use cuda, cpu or empty")
                })?;
                found = Some((d, format!("{name}={v}")));
                break;
            }
        }
        found
    };
    if let Some((device, why)) = explicit {
        if device == TargetDevice::Cuda && !inp.toolkit_found {
            return Err(format!(
                "target device cuda ({why}) needs a CUDA toolkit and none was found; {}",
                Detection::fix_hint()
            ));
        }
        if device != TargetDevice::Empty && !inp.is_linux {
            return Err(format!(
                "target device {} ({why}) is only supported on Linux; use --target-device empty here",
                device.as_str()
            ));
        }
        return Ok(Resolved { device, why });
    }
    let (device, why) = if !inp.is_linux {
        (TargetDevice::Empty, "default: not Linux")
    } else if inp.toolkit_found {
        (TargetDevice::Cuda, "default: a CUDA toolkit was found")
    } else {
        (TargetDevice::Cpu, "default: no CUDA toolkit found")
    };
    Ok(Resolved {
        device,
        why: why.to_string(),
    })
}

/// Resolves with the real environment; also returns the toolkit detection.
pub fn resolve_from_env(flag: Option<TargetDevice>) -> Result<(Resolved, Detection)> {
    let det = toolchain::detect_cuda(&crate::project_root());
    if det.cuda_home_invalid {
        // An explicit CUDA_HOME that is wrong would otherwise silently mean "cpu".
        bail!("{}", det.problems.join("; "));
    }
    let rvllm = std::env::var("RVLLM_TARGET_DEVICE").ok();
    let vllm = std::env::var("VLLM_TARGET_DEVICE").ok();
    let resolved = resolve_target_device(&DeviceInputs {
        flag,
        rvllm_env: rvllm.as_deref(),
        vllm_env: vllm.as_deref(),
        toolkit_found: det.chosen.is_some(),
        is_linux: cfg!(target_os = "linux"),
    })
    .map_err(anyhow::Error::msg)?;
    Ok((resolved, det))
}

#[derive(clap::Args, Debug, Clone, Default)]
pub struct Args {
    /// cuda, cpu or empty (also RVLLM_TARGET_DEVICE / VLLM_TARGET_DEVICE).
    #[arg(long, value_enum)]
    pub target_device: Option<TargetDevice>,
    /// Optimised build (target/release).
    #[arg(long)]
    pub release: bool,
    /// GPU architectures for the kernels, e.g. `80;90a` (also CUDA_ARCHS). Default: the
    /// GPUs present, else sm_80 sm_86 sm_89 sm_90a.
    #[arg(long)]
    pub cuda_archs: Option<String>,
    /// Parallel nvcc jobs (also MAX_JOBS). Default: min(cores, free memory / 2 GiB).
    #[arg(long)]
    pub jobs: Option<String>,
    /// Do not wrap nvcc with ccache.
    #[arg(long)]
    pub no_ccache: bool,
}

/// The `cargo build` command for `args` (the toolkit is `Some` for cuda).
pub fn cargo_build_command(
    args: &Args,
    device: TargetDevice,
    toolkit: Option<&CudaToolkit>,
) -> Result<Command> {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(crate::project_root())
        .args(["build", "-p", "rvllm"]);
    if args.release {
        cmd.arg("--release");
    }
    cmd.args(device.cargo_feature_args());
    if let Some(j) = &args.jobs {
        let n = crate::jobs::parse_max_jobs(j)
            .map_err(anyhow::Error::msg)
            .context("--jobs")?;
        cmd.env("RVLLM_JOBS", n.to_string());
    }
    if args.no_ccache {
        cmd.env("RVLLM_NO_CCACHE", "1");
    }
    if device == TargetDevice::Cuda {
        let tk = toolkit.context("internal: cuda build without a toolkit")?;
        cmd.env("RVLLM_NVCC", &tk.nvcc);
        if let Some(list) = args
            .cuda_archs
            .clone()
            .or_else(|| std::env::var("CUDA_ARCHS").ok())
        {
            let archs = toolchain::parse_cuda_archs(&list)
                .map_err(anyhow::Error::msg)
                .context("--cuda-archs")?;
            cmd.env("RVLLM_CUDA_ARCHS", toolchain::format_cuda_archs(&archs));
        }
    }
    Ok(cmd)
}

/// Builds the engine; returns the path of the `rvllm` binary.
pub fn build_engine(args: &Args) -> Result<(TargetDevice, PathBuf)> {
    let (resolved, det) = resolve_from_env(args.target_device)?;
    let device = resolved.device;
    eprintln!(
        "building rvllm for target device `{}` ({})",
        device.as_str(),
        resolved.why
    );
    if let Some(tk) = det.chosen.as_ref().filter(|_| device == TargetDevice::Cuda) {
        eprintln!(
            "CUDA toolkit: nvcc {} at {} ({})",
            tk.version,
            tk.nvcc.display(),
            tk.source
        );
    }
    let mut cmd = cargo_build_command(args, device, det.chosen.as_ref())?;
    let status = cmd.status().context("running cargo build")?;
    if !status.success() {
        bail!(
            "cargo build for target device `{}` failed ({status})",
            device.as_str()
        );
    }
    let profile = if args.release { "release" } else { "debug" };
    let bin = crate::target_dir().join(profile).join("rvllm");
    eprintln!("built {}", bin.display());
    Ok((device, bin))
}

pub fn run(args: Args) -> Result<()> {
    build_engine(&args).map(|_| ())
}

/// Where `kernels/build.rs` publishes the fatbins of a build profile (`debug`/`release`):
/// `<target>/<profile>/rvllm-kernels/` holding `<kernel>.fatbin`, `built_archs.txt` and
/// `kernel_build.json`. `RVLLM_PREBUILT_KERNELS` accepts this folder.
#[allow(dead_code)] // used by `cargo xtask dist` (issue 6)
pub fn kernel_output_dir(profile: &str) -> PathBuf {
    crate::target_dir().join(profile).join("rvllm-kernels")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs<'a>(
        flag: Option<TargetDevice>,
        rvllm: Option<&'a str>,
        vllm: Option<&'a str>,
    ) -> DeviceInputs<'a> {
        DeviceInputs {
            flag,
            rvllm_env: rvllm,
            vllm_env: vllm,
            toolkit_found: true,
            is_linux: true,
        }
    }

    #[test]
    fn flag_beats_both_environment_spellings() {
        let r = resolve_target_device(&inputs(
            Some(TargetDevice::Cpu),
            Some("empty"),
            Some("cuda"),
        ))
        .unwrap();
        assert_eq!(r.device, TargetDevice::Cpu);
        assert_eq!(r.why, "--target-device");
    }

    #[test]
    fn rvllm_spelling_beats_vllm_spelling() {
        let r = resolve_target_device(&inputs(None, Some("empty"), Some("cpu"))).unwrap();
        assert_eq!(r.device, TargetDevice::Empty);
        assert_eq!(r.why, "RVLLM_TARGET_DEVICE=empty");
        let r = resolve_target_device(&inputs(None, None, Some("CPU"))).unwrap();
        assert_eq!(r.device, TargetDevice::Cpu);
        assert_eq!(r.why, "VLLM_TARGET_DEVICE=CPU");
        // An empty variable counts as unset.
        let r = resolve_target_device(&inputs(None, Some(""), Some("empty"))).unwrap();
        assert_eq!(r.device, TargetDevice::Empty);
    }

    #[test]
    fn bad_values_are_named() {
        let e = resolve_target_device(&inputs(None, Some("rocm"), None)).unwrap_err();
        assert!(e.contains("RVLLM_TARGET_DEVICE=`rocm`"), "{e}");
        let e = resolve_target_device(&inputs(None, None, Some("tpu"))).unwrap_err();
        assert!(e.contains("VLLM_TARGET_DEVICE=`tpu`"), "{e}");
    }

    #[test]
    fn defaults_follow_toolkit_and_os() {
        let mut i = inputs(None, None, None);
        assert_eq!(
            resolve_target_device(&i).unwrap().device,
            TargetDevice::Cuda
        );
        i.toolkit_found = false;
        assert_eq!(resolve_target_device(&i).unwrap().device, TargetDevice::Cpu);
        i.is_linux = false;
        assert_eq!(
            resolve_target_device(&i).unwrap().device,
            TargetDevice::Empty
        );
        i.flag = Some(TargetDevice::Cpu);
        assert!(resolve_target_device(&i)
            .unwrap_err()
            .contains("only supported on Linux"));
    }

    #[test]
    fn cuda_without_toolkit_fails_with_the_fix() {
        let mut i = inputs(None, None, Some("cuda"));
        i.toolkit_found = false;
        let e = resolve_target_device(&i).unwrap_err();
        assert!(e.contains("VLLM_TARGET_DEVICE=cuda"), "{e}");
        assert!(
            e.contains("cargo xtask setup-cuda") && e.contains("CUDA_HOME"),
            "{e}"
        );
    }

    #[test]
    fn features_map_to_cargo_flags() {
        assert_eq!(
            TargetDevice::Cuda.cargo_feature_args(),
            ["--features", "cuda"]
        );
        assert!(TargetDevice::Cpu.cargo_feature_args().is_empty());
        assert_eq!(
            TargetDevice::Empty.cargo_feature_args(),
            ["--no-default-features"]
        );
    }

    #[test]
    fn build_command_carries_toolkit_archs_jobs_and_ccache_choice() {
        let tk = CudaToolkit {
            root: "/opt/cuda".into(),
            nvcc: "/opt/cuda/bin/nvcc".into(),
            version: toolchain::CudaVersion {
                major: 12,
                minor: 4,
            },
            source: toolchain::ToolkitSource::StandardPrefix,
        };
        let args = Args {
            release: true,
            cuda_archs: Some("8.0, 90a".into()),
            jobs: Some("3".into()),
            no_ccache: true,
            ..Default::default()
        };
        let cmd = cargo_build_command(&args, TargetDevice::Cuda, Some(&tk)).unwrap();
        let argv: Vec<_> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            argv,
            ["build", "-p", "rvllm", "--release", "--features", "cuda"]
        );
        let envs: std::collections::HashMap<_, _> = cmd
            .get_envs()
            .map(|(k, v)| {
                (
                    k.to_string_lossy().into_owned(),
                    v.map(|v| v.to_string_lossy().into_owned()),
                )
            })
            .collect();
        assert_eq!(envs["RVLLM_NVCC"].as_deref(), Some("/opt/cuda/bin/nvcc"));
        assert_eq!(envs["RVLLM_CUDA_ARCHS"].as_deref(), Some("80;90a"));
        assert_eq!(envs["RVLLM_JOBS"].as_deref(), Some("3"));
        assert_eq!(envs["RVLLM_NO_CCACHE"].as_deref(), Some("1"));

        let bad = Args {
            jobs: Some("0".into()),
            ..Default::default()
        };
        assert!(cargo_build_command(&bad, TargetDevice::Cpu, None).is_err());
        let bad = Args {
            cuda_archs: Some("hopper".into()),
            ..Default::default()
        };
        let e = cargo_build_command(&bad, TargetDevice::Cuda, Some(&tk)).unwrap_err();
        assert!(
            format!("{e:#}").contains("`hopper` is not a CUDA architecture"),
            "{e:#}"
        );
    }
}
