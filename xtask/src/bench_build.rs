//! `cargo xtask bench-build`: times the kernel build the way a developer meets it.
//!
//! Steps: cold (fresh target dir, empty ccache), no-op rebuild, one `.cu` changed, and a
//! cold rebuild (fresh target dir) with the ccache the first three warmed.
//!
//! It builds `rvllm-kernels --features cuda --release` from a scratch copy of
//! `kernels/src` (`RVLLM_KERNELS_SRC`), so the repository's kernels are never edited, and
//! uses its own target and ccache folders, so nothing else is disturbed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::toolchain;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Where to write the JSON results (default: <target>/bench-build.json).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The kernel to change in step 3 (file stem; default: the first alphabetically).
    #[arg(long)]
    pub touch: Option<String>,
    /// Keep the scratch folder (target dirs, ccache, source copy) for inspection.
    #[arg(long)]
    pub keep: bool,
}

#[derive(Debug, Serialize)]
pub struct Step {
    pub name: String,
    /// Wall time of the whole `cargo build` (includes cargo's own work).
    pub cargo_seconds: f64,
    /// Time `kernels/build.rs` spent on kernels (from its kernel_build.json), when it ran.
    pub kernel_seconds: Option<f64>,
    pub kernels_compiled: Option<u64>,
    pub kernels_unchanged: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub nvcc: String,
    pub ccache: Option<String>,
    pub jobs: Option<u64>,
    pub archs: Option<String>,
    pub kernels: usize,
    pub touched: String,
    pub steps: Vec<Step>,
}

struct Bench {
    scratch: PathBuf,
    src: PathBuf,
    nvcc: PathBuf,
}

impl Bench {
    fn build(&self, name: &str, target: &Path) -> Result<(Step, Option<serde_json::Value>)> {
        let json = target
            .join("release")
            .join("rvllm-kernels")
            .join("kernel_build.json");
        let before = std::fs::metadata(&json).and_then(|m| m.modified()).ok();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        eprintln!("bench-build: {name} ...");
        let t = Instant::now();
        let out = Command::new(cargo)
            .current_dir(crate::project_root())
            .args([
                "build",
                "-p",
                "rvllm-kernels",
                "--features",
                "cuda",
                "--release",
            ])
            .env("CARGO_TARGET_DIR", target)
            .env("RVLLM_KERNELS_SRC", &self.src)
            .env("RVLLM_NVCC", &self.nvcc)
            .env("CCACHE_DIR", self.scratch.join("ccache"))
            .output()
            .context("running cargo build")?;
        let secs = t.elapsed().as_secs_f64();
        if !out.status.success() {
            bail!(
                "the kernel build failed during `{name}`:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // The build script rewrites kernel_build.json only when it ran.
        let after = std::fs::metadata(&json).and_then(|m| m.modified()).ok();
        let ran = after.is_some() && after != before;
        let info: Option<serde_json::Value> = if ran {
            std::fs::read_to_string(&json)
                .ok()
                .and_then(|s| serde_json::from_str(&s).ok())
        } else {
            None
        };
        let step = Step {
            name: name.to_string(),
            cargo_seconds: secs,
            kernel_seconds: info.as_ref().and_then(|v| v["seconds"].as_f64()),
            kernels_compiled: info.as_ref().map(|v| v["compiled"].as_u64().unwrap_or(0)),
            kernels_unchanged: info.as_ref().map(|v| v["unchanged"].as_u64().unwrap_or(0)),
        };
        Ok((step, info))
    }
}

fn copy_sources(from: &Path, to: &Path) -> Result<Vec<String>> {
    std::fs::create_dir_all(to)?;
    let mut stems = Vec::new();
    for e in std::fs::read_dir(from)
        .with_context(|| format!("reading {}", from.display()))?
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".cu") || name.ends_with(".cuh") || name.ends_with(".h") {
            std::fs::copy(e.path(), to.join(&name)).with_context(|| format!("copying {name}"))?;
            if let Some(stem) = name.strip_suffix(".cu") {
                stems.push(stem.to_string());
            }
        }
    }
    stems.sort();
    Ok(stems)
}

pub fn run(args: Args) -> Result<()> {
    let root = crate::project_root();
    let det = toolchain::detect_cuda(&root);
    let tk = det.chosen.with_context(|| {
        format!(
            "bench-build compiles CUDA kernels and no toolkit was found; {}",
            toolchain::Detection::fix_hint()
        )
    })?;
    let scratch = std::env::temp_dir().join(format!("rvllm-bench-build-{}", std::process::id()));
    if scratch.exists() {
        std::fs::remove_dir_all(&scratch)?;
    }
    let src = scratch.join("src");
    let stems = copy_sources(&root.join("kernels").join("src"), &src)?;
    let touched = match args.touch {
        Some(t) if stems.contains(&t) => t,
        Some(t) => bail!(
            "--touch {t}: no kernels/src/{t}.cu (kernels: {})",
            stems.join(", ")
        ),
        None => stems
            .first()
            .cloned()
            .context("kernels/src has no .cu file")?,
    };
    let bench = Bench {
        scratch: scratch.clone(),
        src: src.clone(),
        nvcc: tk.nvcc.clone(),
    };
    let (target_a, target_b) = (scratch.join("target-a"), scratch.join("target-b"));

    let mut steps = Vec::new();
    let (cold, info) = bench.build("cold build (empty ccache)", &target_a)?;
    steps.push(cold);
    steps.push(bench.build("no-op rebuild", &target_a)?.0);
    let file = src.join(format!("{touched}.cu"));
    let mut text = std::fs::read_to_string(&file)?;
    // A real code change (not a comment, which ccache's preprocessor mode would see through).
    text.push_str(&format!(
        "\n__device__ int rvllm_bench_build_touch_{};\n",
        std::process::id()
    ));
    std::fs::write(&file, text)?;
    steps.push(
        bench
            .build(&format!("rebuild after changing {touched}.cu"), &target_a)?
            .0,
    );
    steps.push(bench.build("cold rebuild, warm ccache", &target_b)?.0);

    let ccache =
        toolchain::find_ccache(std::env::var_os("PATH").as_ref()).map(|(_, v)| v.to_string());
    let report = Report {
        nvcc: format!("{} ({})", tk.version, tk.nvcc.display()),
        ccache,
        jobs: info.as_ref().and_then(|v| v["jobs"].as_u64()),
        archs: info
            .as_ref()
            .and_then(|v| v["archs"].as_str().map(String::from)),
        kernels: stems.len(),
        touched,
        steps,
    };
    print_table(&report);
    let out = args
        .out
        .unwrap_or_else(|| crate::target_dir().join("bench-build.json"));
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&out, serde_json::to_string_pretty(&report)?)?;
    eprintln!("wrote {}", out.display());
    if args.keep {
        eprintln!("kept {}", scratch.display());
    } else {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    Ok(())
}

fn print_table(r: &Report) {
    println!(
        "kernel build benchmark: {} kernels, nvcc {}, ccache {}, {} job(s), targets {}",
        r.kernels,
        r.nvcc,
        r.ccache.as_deref().unwrap_or("none"),
        r.jobs.map(|j| j.to_string()).unwrap_or_else(|| "?".into()),
        r.archs.as_deref().unwrap_or("?")
    );
    println!("| step | cargo build (s) | kernel phase (s) | kernels compiled / unchanged |");
    println!("|---|---:|---:|---|");
    for s in &r.steps {
        let kernel = s
            .kernel_seconds
            .map(|k| format!("{k:.2}"))
            .unwrap_or_else(|| "not run".into());
        let counts = match (s.kernels_compiled, s.kernels_unchanged) {
            (Some(c), Some(u)) => format!("{c} / {u}"),
            _ => "build script not run".into(),
        };
        println!(
            "| {} | {:.2} | {kernel} | {counts} |",
            s.name, s.cargo_seconds
        );
    }
    if let (Some(cold), Some(warm)) = (r.steps.first(), r.steps.get(3)) {
        if let (Some(c), Some(w)) = (cold.kernel_seconds, warm.kernel_seconds) {
            println!(
                "warm-ccache speed-up of the kernel phase: {:.1}x",
                c / w.max(1e-3)
            );
        }
        println!(
            "warm-ccache speed-up of the whole cold cargo build: {:.1}x",
            cold.cargo_seconds / warm.cargo_seconds.max(1e-3)
        );
    }
}
