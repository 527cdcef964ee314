//! `cargo xtask docker` without a Docker engine: a plain error, and the exact commands with
//! `--dry-run`.

mod install_support;

use install_support::*;
use std::process::Command;

fn head() -> String {
    let o = Command::new("git")
        .args(["-C", env!("CARGO_MANIFEST_DIR"), "rev-parse", "HEAD"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

#[test]
fn no_engine_is_a_plain_error() {
    // A socket that cannot exist: the same answer on machines with and without Docker.
    let o = Command::new(XTASK)
        .args(["docker", "--cpu"])
        .env("DOCKER_HOST", "unix:///nonexistent-rvllm-test/docker.sock")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("no Docker engine is reachable")
            || err.contains("docker command is not installed"),
        "{err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("stack backtrace"),
        "{err}"
    );
}

#[test]
fn dry_run_prints_labelled_builds() {
    let commit = head();
    let o = ok(&[
        "docker",
        "--dry-run",
        "--max-jobs",
        "3",
        "--cuda-archs",
        "80;90a",
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("-f docker/Dockerfile "), "{out}");
    assert!(
        out.contains(&format!("--build-arg RVLLM_COMMIT={commit}")),
        "{out}"
    );
    assert!(out.contains("--build-arg MAX_JOBS=3"), "{out}");
    assert!(out.contains("'CUDA_ARCHS=80;90a'"), "{out}");
    // Default tag: rvllm:<version>-<commit12>.
    assert!(out.contains(&format!("-{} ", &commit[..12])), "{out}");

    let o = ok(&[
        "docker",
        "--dry-run",
        "--cpu",
        "--commit",
        &commit,
        "--repo",
        "registry.example/rvllm",
        "--push",
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.starts_with(&format!(
            "git archive --format=tar {commit} | docker build -f docker/Dockerfile.cpu"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "docker push registry.example/rvllm:commit-{commit}-cpu"
        )),
        "{out}"
    );

    let err = fails(&[
        "docker",
        "--pull",
        "--commit",
        "abc",
        "--repo",
        "registry.example/rvllm",
    ]);
    assert!(err.contains("40-hex"), "{err}");
    let err = fails(&["docker", "--push", "--dry-run"]);
    assert!(err.contains("--repo"), "{err}");
}
