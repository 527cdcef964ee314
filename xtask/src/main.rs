//! `cargo xtask`: rvllm's developer toolkit (doctor, toolkit setup, builds, tests, demo,
//! benchmarks, and the release/install workflows).

mod bench_build;
mod build;
mod demo;
mod doctor;
mod driver;
mod gpu_test;
mod jobs;
mod libs;
mod setup_cuda;
mod soak;
mod testing;
mod toolchain;

mod dev;
mod dist;
mod docker;
mod install;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "rvllm developer toolkit", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check OS, Rust, CUDA toolkit, driver and GPUs, ccache, loader libraries, build jobs.
    Doctor(doctor::Args),
    /// Install nvcc, the CUDA runtime headers and CCCL from PyPI into <repo>/.cuda.
    SetupCuda(setup_cuda::Args),
    /// Build the engine for a target device (cuda, cpu or empty).
    Build(build::Args),
    /// Run the test suite (`cargo test --workspace --release`).
    Test(testing::Args),
    /// Build for the device present and chat with SmolLM2-135M-Instruct.
    Demo(demo::Args),
    /// Measure kernel build times: cold, no-op, one kernel changed, cold with warm ccache.
    BenchBuild(bench_build::Args),
    /// Package a release artifact (fatbins, binary, manifest).
    Dist(dist::Args),
    /// Download and install a prebuilt release artifact.
    Install(install::Args),
    /// Build from source reusing an installed artifact's compiled kernels.
    Dev(dev::Args),
    /// Build (or pull) the Docker images.
    Docker(docker::Args),
    /// Build the GPU tests, the binary and their fixtures into one folder to run on a GPU machine.
    GpuTest(gpu_test::Args),
    /// Soak `rvllm serve` on the CPU: many clients, hang-ups and hostile requests for a long
    /// time; then check nothing was lost, the engine drained and RSS stayed flat.
    Soak(soak::Args),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Doctor(a) => doctor::run(a),
        Command::SetupCuda(a) => setup_cuda::run(a),
        Command::Build(a) => build::run(a),
        Command::Test(a) => testing::run(a),
        Command::Demo(a) => demo::run(a),
        Command::BenchBuild(a) => bench_build::run(a),
        Command::Dist(a) => dist::run(a),
        Command::Install(a) => install::run(a),
        Command::Dev(a) => dev::run(a),
        Command::Docker(a) => docker::run(a),
        Command::GpuTest(a) => gpu_test::run(a),
        Command::Soak(a) => soak::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// The repository root (xtask lives in `<root>/xtask`).
pub fn project_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// Cargo's target directory: `CARGO_TARGET_DIR`, else `<root>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR").filter(|v| !v.is_empty()) {
        Some(d) => {
            let d = PathBuf::from(d);
            if d.is_absolute() {
                d
            } else {
                project_root().join(d)
            }
        }
        None => project_root().join("target"),
    }
}
