//! `cargo xtask docker`: builds the images in `docker/` (CUDA by default, `--cpu` for the
//! CPU image), labelled with the version and commit; `--commit SHA` builds exactly that
//! commit (the context is `git archive SHA`), `--push` pushes, `--pull --commit SHA` fetches
//! the published per-commit image and checks its labels. Without a Docker engine it says
//! so and stops.

use crate::dist::{self, manifest::is_full_commit};
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::{Command, Stdio};

/// The label that carries the commit (OCI annotation names).
const REVISION_LABEL: &str = "org.opencontainers.image.revision";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Build this commit (any revision git knows) instead of the working tree; with --pull,
    /// the full 40-hex commit whose image to fetch.
    #[arg(long, value_name = "SHA")]
    pub commit: Option<String>,
    /// Image tag [default: rvllm:<version>-<commit12>, with -cpu for --cpu].
    #[arg(long, value_name = "TAG")]
    pub tag: Option<String>,
    /// Push the image (tagged <repo>:commit-<sha>, plus --tag) after building.
    #[arg(long)]
    pub push: bool,
    /// Fetch the published image of --commit instead of building.
    #[arg(long, requires = "commit", conflicts_with = "push")]
    pub pull: bool,
    /// The CPU image (docker/Dockerfile.cpu) instead of the CUDA one.
    #[arg(long)]
    pub cpu: bool,
    /// Parallel compile jobs inside the build.
    #[arg(long, env = "MAX_JOBS", value_name = "N")]
    pub max_jobs: Option<u32>,
    /// GPU architectures of the kernels (the builder has no GPU to detect).
    #[arg(long, env = "CUDA_ARCHS", value_name = "LIST")]
    pub cuda_archs: Option<String>,
    /// Image repository for per-commit tags, --push and --pull (e.g. registry/org/rvllm).
    #[arg(long, env = "RVLLM_DOCKER_REPO", value_name = "REPO")]
    pub repo: Option<String>,
    /// Print the docker commands instead of running them (needs no Docker engine).
    #[arg(long)]
    pub dry_run: bool,
}

pub fn run(args: Args) -> Result<()> {
    if let Some(t) = &args.tag {
        validate_reference(t, "--tag")?;
    }
    if let Some(r) = &args.repo {
        validate_reference(r, "--repo")?;
    }
    if args.max_jobs == Some(0) {
        bail!("--max-jobs (MAX_JOBS) must be at least 1");
    }
    let flavour = if args.cpu { "-cpu" } else { "" };
    if args.pull {
        let commit = args.commit.as_deref().unwrap_or_default();
        if !is_full_commit(commit) {
            bail!(
                "--pull needs the full 40-hex commit (got {commit:?}); per-commit images are \
                 tagged with it. `git rev-parse {commit}` prints it"
            );
        }
        let repo = args.repo.as_deref().context(
            "--pull needs the image repository: pass --repo REPO or set RVLLM_DOCKER_REPO",
        )?;
        let image = format!("{repo}:commit-{}{flavour}", commit.to_ascii_lowercase());
        if args.dry_run {
            println!("docker pull {image}");
            return Ok(());
        }
        require_engine()?;
        run_cmd(Command::new("docker").args(["pull", &image]), "docker pull")?;
        let label = image_label(&image, REVISION_LABEL)?;
        if !label.eq_ignore_ascii_case(commit) {
            bail!("{image} is labelled with commit {label:?}, not {commit}; the registry tag is wrong");
        }
        println!("pulled {image} (commit {commit})");
        return Ok(());
    }
    if args.push && args.repo.is_none() && !args.tag.as_deref().is_some_and(|t| t.contains('/')) {
        bail!("--push needs somewhere to push: pass --repo REPO (or RVLLM_DOCKER_REPO) or a --tag with a registry");
    }

    let root = dist::workspace_root();
    let commit = match &args.commit {
        Some(rev) => resolve_commit(&root, rev)?,
        None => resolve_commit(&root, "HEAD")?,
    };
    let cargo_toml = match &args.commit {
        Some(_) => git_output(&root, &["show", &format!("{commit}:Cargo.toml")])?,
        None => std::fs::read_to_string(root.join("Cargo.toml")).context("reading Cargo.toml")?,
    };
    let version = workspace_version(&cargo_toml)
        .context("no version in [workspace.package] of Cargo.toml")?;
    let mut tags = vec![args
        .tag
        .clone()
        .unwrap_or_else(|| format!("rvllm:{version}-{}{flavour}", &commit[..12]))];
    if let Some(repo) = &args.repo {
        tags.push(format!("{repo}:commit-{commit}{flavour}"));
    }
    let dockerfile = if args.cpu {
        "docker/Dockerfile.cpu"
    } else {
        "docker/Dockerfile"
    };

    let mut build = Command::new("docker");
    build
        .env("DOCKER_BUILDKIT", "1")
        .args(["build", "-f", dockerfile]);
    let mut build_args = vec![
        format!("RVLLM_VERSION={version}"),
        format!("RVLLM_COMMIT={commit}"),
    ];
    if let Some(j) = args.max_jobs {
        build_args.push(format!("MAX_JOBS={j}"));
    }
    if let (Some(a), false) = (&args.cuda_archs, args.cpu) {
        build_args.push(format!("CUDA_ARCHS={a}"));
    }
    for a in &build_args {
        build.args(["--build-arg", a]);
    }
    for t in &tags {
        build.args(["-t", t]);
    }
    // A commit builds from `git archive` on stdin (exactly that commit's files); the working
    // tree builds from the repository folder.
    let from_commit = args.commit.is_some();
    if from_commit {
        build.arg("-");
    } else {
        build.arg(&root);
    }

    if args.dry_run {
        if from_commit {
            println!("git archive --format=tar {commit} | {}", show(&build));
        } else {
            println!("{}", show(&build));
        }
        for t in tags.iter().filter(|t| args.push && t.contains('/')) {
            println!("docker push {t}");
        }
        return Ok(());
    }
    require_engine()?;
    if from_commit {
        let mut archive = Command::new("git")
            .arg("-C")
            .arg(&root)
            .args(["archive", "--format=tar", &commit])
            .stdout(Stdio::piped())
            .spawn()
            .context("running git archive")?;
        let stdout = archive.stdout.take().context("git archive has no output")?;
        let status = build
            .stdin(stdout)
            .status()
            .context("running docker build")?;
        let git_ok = archive.wait().map(|s| s.success()).unwrap_or(false);
        if !git_ok {
            bail!("git archive {commit} failed");
        }
        if !status.success() {
            bail!("docker build failed ({status})");
        }
    } else {
        run_cmd(&mut build, "docker build")?;
    }
    println!(
        "built {} (rvllm {version}, commit {commit})",
        tags.join(", ")
    );
    if args.push {
        for t in tags.iter().filter(|t| t.contains('/')) {
            run_cmd(Command::new("docker").args(["push", t]), "docker push")?;
            println!("pushed {t}");
        }
    }
    Ok(())
}

/// Stops with a plain explanation when there is no docker client or no engine behind it.
fn require_engine() -> Result<()> {
    let out = match Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
    {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "the docker command is not installed; install Docker (or use `cargo xtask build` \
             directly, which is what the image runs)"
        ),
        Err(e) => return Err(e).context("running docker info"),
    };
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr);
        let why = why
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or("docker info failed");
        bail!(
            "no Docker engine is reachable ({why}). Start the Docker daemon or point \
             DOCKER_HOST at one, then rerun; `--dry-run` prints the commands without an engine"
        );
    }
    Ok(())
}

fn run_cmd(cmd: &mut Command, what: &str) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn image_label(image: &str, label: &str) -> Result<String> {
    let out = Command::new("docker")
        .args([
            "image",
            "inspect",
            "--format",
            &format!("{{{{ index .Config.Labels \"{label}\" }}}}"),
            image,
        ])
        .output()
        .context("running docker image inspect")?;
    if !out.status.success() {
        bail!("docker image inspect {image} failed");
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn resolve_commit(root: &Path, rev: &str) -> Result<String> {
    if rev.starts_with('-') {
        bail!("--commit {rev:?} is not a revision");
    }
    let sha = git_output(
        root,
        &[
            "rev-parse",
            "--verify",
            "--quiet",
            &format!("{rev}^{{commit}}"),
        ],
    )
    .with_context(|| {
        format!("git does not know the commit {rev:?}; `git fetch` it or check the spelling")
    })?;
    let sha = sha.trim().to_string();
    if !is_full_commit(&sha) {
        bail!("git rev-parse {rev} gave {sha:?}, not a commit hash");
    }
    Ok(sha)
}

fn git_output(root: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(root)
        .args(args)
        .output()
        .context("running git")?;
    if !out.status.success() {
        bail!(
            "git {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `version = "x"` under `[workspace.package]`.
pub fn workspace_version(toml: &str) -> Option<String> {
    let mut in_section = false;
    for line in toml.lines() {
        let l = line.trim();
        if l.starts_with('[') {
            in_section = l == "[workspace.package]";
            continue;
        }
        if in_section {
            if let Some(rest) = l.strip_prefix("version") {
                let v = rest
                    .trim_start()
                    .strip_prefix('=')?
                    .trim()
                    .trim_matches('"');
                return Some(v.to_string());
            }
        }
    }
    None
}

/// Image names: lowercase letters, digits and `._-/:@`, no spaces, not starting with `-`.
fn validate_reference(s: &str, flag: &str) -> Result<()> {
    let ok = !s.is_empty()
        && !s.starts_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/:@".contains(&b));
    if !ok {
        bail!("{flag} {s:?} is not a valid image reference (lowercase letters, digits, `._-/:@`)");
    }
    Ok(())
}

fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        let a = a.to_string_lossy();
        if a.contains(' ') || a.contains(';') {
            s.push_str(&format!(" '{a}'"));
        } else {
            s.push(' ');
            s.push_str(&a);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_workspace_version() {
        let t = "[workspace]\nmembers = []\n\n[workspace.package]\nversion = \"0.3.1\"\nedition = \"2021\"\n";
        assert_eq!(workspace_version(t).as_deref(), Some("0.3.1"));
        assert_eq!(workspace_version("[package]\nversion = \"1\"\n"), None);
    }

    #[test]
    fn checks_image_references() {
        assert!(validate_reference("rvllm:0.1.0-abc", "--tag").is_ok());
        assert!(validate_reference("registry.example/org/rvllm", "--repo").is_ok());
        assert!(validate_reference("Bad Tag", "--tag").is_err());
        assert!(validate_reference("-x", "--tag").is_err());
    }
}
