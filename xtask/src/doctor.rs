//! `cargo xtask doctor`: one line per check (OK / WARN / FAIL), each WARN or FAIL with the
//! command or setting that fixes it; `--json` for machines; exit code 1 when anything FAILs.

use std::path::Path;
use std::process::Command;

use anyhow::Result;
use serde::Serialize;

use crate::driver::{self, DriverInfo};

mod gpu_topology;
mod nccl_probe;
use crate::toolchain::{self, CudaToolkit, CudaVersion, Detection};
use crate::{jobs, libs};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Print the checks as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Status {
    #[serde(rename = "OK")]
    Ok,
    #[serde(rename = "WARN")]
    Warn,
    #[serde(rename = "FAIL")]
    Fail,
}

#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

fn ok(name: &'static str, message: impl Into<String>) -> Check {
    Check {
        name,
        status: Status::Ok,
        message: message.into(),
        fix: None,
    }
}
fn warn(name: &'static str, message: impl Into<String>, fix: impl Into<String>) -> Check {
    Check {
        name,
        status: Status::Warn,
        message: message.into(),
        fix: Some(fix.into()),
    }
}
fn fail(name: &'static str, message: impl Into<String>, fix: impl Into<String>) -> Check {
    Check {
        name,
        status: Status::Fail,
        message: message.into(),
        fix: Some(fix.into()),
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

fn check_os() -> Check {
    let arch = std::env::consts::ARCH;
    if cfg!(target_os = "linux") {
        ok("os", format!("Linux ({arch})"))
    } else {
        warn(
            "os",
            format!(
                "{} ({arch}): only the `empty` target device can be built here",
                std::env::consts::OS
            ),
            "build with `cargo xtask build --target-device empty`, or use Linux for cpu/cuda",
        )
    }
}

fn check_rust() -> Check {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    match Command::new(&rustc).arg("--version").output() {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout).trim().to_string();
            let ver = text.split_whitespace().nth(1).and_then(CudaVersion::parse);
            match ver {
                Some(v)
                    if v < (CudaVersion {
                        major: 1,
                        minor: 87,
                    }) =>
                {
                    fail(
                        "rust",
                        format!("{text}: rvllm needs Rust 1.87 or newer (llguidance, the structured-output engine, does)"),
                        "rustup update stable",
                    )
                }
                _ => ok("rust", text),
            }
        }
        _ => fail(
            "rust",
            format!("`{rustc} --version` failed"),
            "install Rust with rustup",
        ),
    }
}

fn check_toolkit(det: &Detection, checks: &mut Vec<Check>) {
    if det.cuda_home_invalid {
        checks.push(fail(
            "cuda-toolkit",
            det.problems.join("; "),
            "point CUDA_HOME at a CUDA toolkit (the folder with bin/nvcc) or unset it",
        ));
        return;
    }
    match &det.chosen {
        Some(tk) => checks.push(ok(
            "cuda-toolkit",
            format!(
                "nvcc {} at {} (found via {})",
                tk.version,
                tk.nvcc.display(),
                tk.source
            ),
        )),
        None => checks.push(warn(
            "cuda-toolkit",
            "no CUDA toolkit found (CUDA_HOME, PATH, /usr/local/cuda*, /opt/cuda, <repo>/.cuda): \
             only the cpu and empty targets can be built",
            Detection::fix_hint(),
        )),
    }
    for p in det.problems.iter().filter(|_| !det.cuda_home_invalid) {
        checks.push(warn(
            "cuda-toolkit",
            p.clone(),
            "fix or remove the broken nvcc",
        ));
    }
    match (&det.cuda_home, &det.path, &det.disagreement) {
        (_, _, Some(d)) => checks.push(warn(
            "nvcc-agreement",
            d.clone(),
            "export PATH=\"$CUDA_HOME/bin:$PATH\"",
        )),
        (Some(h), Some(p), None) => checks.push(ok(
            "nvcc-agreement",
            format!(
                "`nvcc --version` and `$CUDA_HOME/bin/nvcc --version` agree ({} / {})",
                p.version, h.version
            ),
        )),
        _ => {}
    }
}

fn check_nvcc_targets(tk: &CudaToolkit, checks: &mut Vec<Check>) {
    match tk.supported_archs() {
        Ok(list) if !list.is_empty() => checks.push(ok(
            "nvcc-archs",
            format!(
                "nvcc can target sm_{}",
                list.iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join(" sm_")
            ),
        )),
        Ok(_) => checks.push(warn(
            "nvcc-archs",
            "`nvcc --list-gpu-code` listed nothing",
            "reinstall the toolkit",
        )),
        Err(e) => checks.push(fail(
            "nvcc-archs",
            e,
            "reinstall the toolkit or `cargo xtask setup-cuda`",
        )),
    }
    match smoke_compile(tk) {
        Ok(()) => checks.push(ok("nvcc-compiles", "nvcc compiled a test kernel to a fatbin")),
        Err(e) => checks.push(fail(
            "nvcc-compiles",
            format!("nvcc could not compile a test kernel: {e}"),
            "the toolkit's parts do not match (e.g. mixed PyPI versions); `cargo xtask setup-cuda --force` \
             installs a consistent one",
        )),
    }
}

/// Compiles a one-line kernel: catches toolkits whose nvcc runs but whose cicc/ptxas/headers
/// do not match (the common failure of hand-assembled PyPI installs).
pub fn smoke_compile(tk: &CudaToolkit) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("rvllm-doctor-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let src = dir.join("probe.cu");
    let out = dir.join("probe.fatbin");
    std::fs::write(
        &src,
        "extern \"C\" __global__ void probe(float* x) { x[threadIdx.x] *= 2.0f; }\n",
    )
    .map_err(|e| e.to_string())?;
    let arch = tk
        .supported_archs()
        .ok()
        .and_then(|v| v.first().copied())
        .unwrap_or(75);
    let mut cmd = Command::new(&tk.nvcc);
    cmd.arg("-fatbin")
        .arg(format!("-gencode=arch=compute_{arch},code=sm_{arch}"));
    for inc in tk.include_dirs() {
        cmd.arg(format!("-I{}", inc.display()));
    }
    let res = cmd.arg("-o").arg(&out).arg(&src).output();
    let _ = std::fs::remove_dir_all(&dir);
    let o = res.map_err(|e| e.to_string())?;
    if o.status.success() {
        Ok(())
    } else {
        let err = String::from_utf8_lossy(&o.stderr);
        Err(err.lines().take(3).collect::<Vec<_>>().join(" | "))
    }
}

fn check_driver(tk: Option<&CudaToolkit>, checks: &mut Vec<Check>) -> Option<DriverInfo> {
    match driver::query_driver() {
        Ok(None) => {
            checks.push(warn(
                "driver",
                "no driver: libcuda.so could not be loaded, so no GPU can run here (CUDA kernels still compile)",
                "install the NVIDIA driver (e.g. `apt-get install nvidia-driver`), or use --target-device cpu",
            ));
            None
        }
        Err(e) => {
            checks.push(fail("driver", e, "reinstall or update the NVIDIA driver"));
            None
        }
        Ok(Some(info)) => {
            checks.push(ok(
                "driver",
                format!("NVIDIA driver supports CUDA {}", info.cuda_version),
            ));
            if info.gpus.is_empty() {
                checks.push(warn(
                    "gpu",
                    "the driver sees no GPU",
                    "check CUDA_VISIBLE_DEVICES and `nvidia-smi`",
                ));
            }
            for g in &info.gpus {
                let (a, b) = g.compute_capability;
                let text = format!(
                    "GPU {}: {}, {}, compute capability {a}.{b}",
                    g.index,
                    g.name,
                    gib(g.memory_bytes)
                );
                if driver::supported(g.compute_capability)
                    && a * 10 + b < toolchain::KERNELS_MIN_ARCH
                {
                    checks.push(warn(
                        "gpu",
                        format!("{text}: rvllm's CUDA kernels need compute capability 8.0 (bf16 tensor cores)"),
                        "run with --device cpu on this GPU, or use an Ampere or newer GPU",
                    ));
                } else if driver::supported(g.compute_capability) {
                    checks.push(ok("gpu", text));
                } else {
                    checks.push(fail(
                        "gpu",
                        format!("{text}: rvllm needs compute capability 7.0 or higher"),
                        "use a Volta or newer GPU (V100, T4, RTX 20xx, A100, L4, H100), or --target-device cpu",
                    ));
                }
            }
            if let Some(tk) = tk {
                if tk.version > info.cuda_version {
                    checks.push(warn(
                        "nvcc-vs-driver",
                        format!(
                            "nvcc {} is newer than the driver (CUDA {}): builds embed SASS for the GPUs present \
                             but no PTX, so other GPUs will not run these kernels",
                            tk.version, info.cuda_version
                        ),
                        format!(
                            "update the driver, or `cargo xtask setup-cuda --version {}` for a matching nvcc",
                            info.cuda_version
                        ),
                    ));
                }
            }
            Some(info)
        }
    }
}

fn check_ccache(checks: &mut Vec<Check>) {
    match which::which("ccache") {
        Err(_) => checks.push(warn(
            "ccache",
            "ccache not found: every cold kernel build compiles from scratch",
            "apt-get install ccache (4.x caches nvcc; `cargo xtask build` then uses it automatically)",
        )),
        Ok(exe) => {
            let out = Command::new(&exe).arg("--version").output();
            let ver = out.ok().and_then(|o| toolchain::parse_ccache_version(&String::from_utf8_lossy(&o.stdout)));
            match ver {
                Some(v) if v.major >= 4 => checks.push(ok("ccache", format!("ccache {v} (caches nvcc)"))),
                Some(v) => checks.push(warn(
                    "ccache",
                    format!("ccache {v} is older than 4 and cannot cache nvcc"),
                    "install ccache 4.x",
                )),
                None => checks.push(warn("ccache", format!("{} gave no version", exe.display()), "reinstall ccache")),
            }
        }
    }
    match which::which("sccache") {
        Ok(exe) => checks.push(ok(
            "sccache",
            format!(
                "sccache at {} (not used for nvcc: rvllm wraps nvcc with ccache)",
                exe.display()
            ),
        )),
        Err(_) => checks.push(ok("sccache", "sccache not found (optional)")),
    }
}

fn check_libraries(checks: &mut Vec<Check>) {
    let dups = libs::duplicate_copies(&libs::run_ldconfig(), &libs::ld_library_path());
    if dups.is_empty() {
        checks.push(ok(
            "libraries",
            "at most one copy each of libcublas, libcublasLt, libnccl visible to the loader",
        ));
    }
    for (lib, copies) in dups {
        checks.push(warn(
            "libraries",
            format!(
                "{} copies of {lib} visible to the loader: {}",
                copies.len(),
                copies.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
            ),
            "remove the extra copies from LD_LIBRARY_PATH (e.g. a conda env's lib) or uninstall one, \
             so rvllm loads the one you expect",
        ));
    }
}

fn check_jobs(checks: &mut Vec<Check>) {
    let cores = jobs::cpu_cores();
    let mem = jobs::mem_available_bytes();
    let max_jobs = std::env::var("MAX_JOBS").ok();
    let mem_text = mem.map(gib).unwrap_or_else(|| "unknown".into());
    match jobs::resolve_jobs(None, max_jobs.as_deref(), cores, mem) {
        Ok(c) => {
            let default = jobs::default_jobs(cores, mem);
            let text = format!(
                "{cores} CPU cores, {mem_text} free: {} parallel nvcc job(s) ({})",
                c.jobs, c.reason
            );
            if c.jobs > default {
                checks.push(warn(
                    "build-jobs",
                    format!("{text}; more than free memory allows (about 2 GiB a job)"),
                    format!("MAX_JOBS={default}"),
                ));
            } else {
                checks.push(ok("build-jobs", text));
            }
        }
        Err(e) => checks.push(fail(
            "build-jobs",
            e,
            "export MAX_JOBS=<positive integer> or unset it",
        )),
    }
}

/// NCCL's version (from the library itself; no GPU needed). Only tensor parallelism on the
/// CUDA device needs it, so its absence is a warning only where there are GPUs to split over.
fn check_nccl(gpus: usize, checks: &mut Vec<Check>) {
    match nccl_probe::probe() {
        Ok(info) => {
            let (a, b, c) = info.version;
            checks.push(ok("nccl", format!("NCCL {a}.{b}.{c} ({})", info.path)));
        }
        Err(e) if gpus >= 2 => checks.push(warn(
            "nccl",
            format!("NCCL {e}: --tensor-parallel-size above 1 cannot run on the CUDA device"),
            "install NCCL (apt-get install libnccl2, or pip install nvidia-nccl-cu12 and put its \
             lib folder on LD_LIBRARY_PATH), or name the file in VLLM_NCCL_SO_PATH",
        )),
        Err(e) => checks.push(ok(
            "nccl",
            format!("NCCL {e} (only tensor parallelism on GPUs needs it)"),
        )),
    }
}

/// NVLink and peer-to-peer between the GPUs (`nvidia-smi topo`).
fn check_topology(gpus: usize, checks: &mut Vec<Check>) {
    if gpus == 0 {
        checks.push(ok("gpu-topology", "not found: no GPU"));
        return;
    }
    match gpu_topology::describe() {
        Ok(line) if line.contains("PCIe only") || line.contains("not available") => {
            checks.push(warn(
                "gpu-topology",
                line,
                "tensor parallelism all-reduces over these links twice a layer: give one model \
                 NVLink-connected GPUs (CUDA_VISIBLE_DEVICES) where the host has them",
            ))
        }
        Ok(line) => checks.push(ok("gpu-topology", line)),
        Err(e) => checks.push(ok("gpu-topology", format!("not found: {e}"))),
    }
}

/// Runs every check.
pub fn collect(repo_root: &Path) -> Vec<Check> {
    let mut checks = vec![check_os(), check_rust()];
    let det = toolchain::detect_cuda(repo_root);
    check_toolkit(&det, &mut checks);
    if let Some(tk) = &det.chosen {
        check_nvcc_targets(tk, &mut checks);
    }
    let gpus = check_driver(det.chosen.as_ref(), &mut checks).map_or(0, |d| d.gpus.len());
    check_nccl(gpus, &mut checks);
    check_topology(gpus, &mut checks);
    check_ccache(&mut checks);
    check_libraries(&mut checks);
    check_jobs(&mut checks);
    checks
}

pub fn run(args: Args) -> Result<()> {
    let checks = collect(&crate::project_root());
    let failed = checks.iter().any(|c| c.status == Status::Fail);
    if args.json {
        let doc = serde_json::json!({ "ok": !failed, "checks": checks });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        for c in &checks {
            let tag = match c.status {
                Status::Ok => "OK  ",
                Status::Warn => "WARN",
                Status::Fail => "FAIL",
            };
            match &c.fix {
                Some(fix) => println!("{tag} {:<15} {} -- fix: {fix}", c.name, c.message),
                None => println!("{tag} {:<15} {}", c.name, c.message),
            }
        }
    }
    if failed {
        std::process::exit(1);
    }
    Ok(())
}
