//! Drives the real `kernels/build.rs` through cargo with a fake nvcc (a shell script that
//! logs each compile and writes a file with the fatbin magic), on a scratch kernel folder
//! (`RVLLM_KERNELS_SRC`): which kernels recompile after which edit, that published fatbins
//! appear, and that compile errors and bad MAX_JOBS values fail the build with their cause.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const FAKE_NVCC: &str = r#"#!/bin/sh
case "$1" in
  --version) echo "Cuda compilation tools, release 13.0, V13.0.88"; exit 0;;
  --list-gpu-code) printf 'sm_75\nsm_80\nsm_90\n'; exit 0;;
esac
out=""; src=""
while [ $# -gt 0 ]; do
  case "$1" in
    -o) out="$2"; shift;;
    *.cu) src="$1";;
  esac
  shift
done
if grep -q '#error' "$src"; then echo "$src(1): error: forced by the test" >&2; exit 1; fi
echo "$src" >> "$FAKE_NVCC_LOG"
printf '\120\355\125\272fake fatbin' > "$out"
"#;

struct Fixture {
    root: PathBuf,
    src: PathBuf,
    target: PathBuf,
    nvcc: PathBuf,
    log: PathBuf,
}

impl Fixture {
    fn new(name: &str) -> Fixture {
        // Under cargo's per-test temp dir, so the build-script compile is reused across runs;
        // the kernel folder is fresh each run (its path is part of the build's inputs).
        let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("kernel-build");
        let root = base.join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let src = root.join("src");
        std::fs::create_dir_all(&src).unwrap();
        let nvcc = root.join("bin").join("nvcc");
        std::fs::create_dir_all(nvcc.parent().unwrap()).unwrap();
        std::fs::write(&nvcc, FAKE_NVCC).unwrap();
        std::fs::set_permissions(&nvcc, std::fs::Permissions::from_mode(0o755)).unwrap();
        // A unique token keeps per-kernel stamps of earlier runs from matching.
        let token = format!("{}-{:?}", std::process::id(), std::time::SystemTime::now());
        std::fs::write(
            src.join("common.cuh"),
            format!("// {token}\n#define ONE 1\n"),
        )
        .unwrap();
        std::fs::write(
            src.join("alpha.cu"),
            "#include \"common.cuh\"\n__global__ void a() {}\n",
        )
        .unwrap();
        std::fs::write(
            src.join("beta.cu"),
            format!("// {token}\n__global__ void b() {{}}\n"),
        )
        .unwrap();
        let log = root.join("nvcc.log");
        Fixture {
            target: base.join("target"),
            root,
            src,
            nvcc,
            log,
        }
    }

    fn build(&self, extra_env: &[(&str, &str)]) -> Output {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap())
            .args(["build", "-p", "rvllm-kernels", "--features", "cuda"])
            .env("CARGO_TARGET_DIR", &self.target)
            .env("RVLLM_KERNELS_SRC", &self.src)
            .env("RVLLM_NVCC", &self.nvcc)
            .env("RVLLM_CUDA_ARCHS", "80;90a")
            .env("RVLLM_DRIVER_CUDA_VERSION", "none")
            .env("RVLLM_NO_CCACHE", "1")
            .env("FAKE_NVCC_LOG", &self.log)
            .env_remove("MAX_JOBS")
            .env_remove("RVLLM_PREBUILT_KERNELS");
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        cmd.output().expect("running cargo")
    }

    /// The kernels compiled since the last call, sorted.
    fn compiled(&self) -> Vec<String> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let _ = std::fs::remove_file(&self.log);
        let mut v: Vec<String> = text.lines().map(str::to_string).collect();
        v.sort();
        v
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn only_changed_kernels_recompile_and_failures_name_their_cause() {
    let f = Fixture::new("rebuild");
    let o = f.build(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(f.compiled(), ["alpha.cu", "beta.cu"]);
    assert!(
        stderr(&o).contains("compiled alpha.cu in"),
        "{}",
        stderr(&o)
    );
    let published = f.target.join("debug").join("rvllm-kernels");
    assert!(published.join("alpha.fatbin").is_file() && published.join("beta.fatbin").is_file());
    let archs = std::fs::read_to_string(published.join("built_archs.txt")).unwrap();
    assert_eq!(archs.trim(), "sm_80 sm_90a +PTX compute_90a");

    // Nothing changed: nothing compiles.
    let o = f.build(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(f.compiled().is_empty());

    // A header edit recompiles only the kernel that includes it.
    std::fs::write(f.src.join("common.cuh"), "#define ONE 2\n").unwrap();
    let o = f.build(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(f.compiled(), ["alpha.cu"]);

    // A compile error fails the build and names the kernel.
    std::fs::write(f.src.join("beta.cu"), "#error broken\n").unwrap();
    let o = f.build(&[]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("nvcc failed on beta.cu"),
        "{}",
        stderr(&o)
    );
    assert!(stderr(&o).contains("forced by the test"), "{}", stderr(&o));

    // Fixed again, with an invalid MAX_JOBS: the value is named.
    std::fs::write(f.src.join("beta.cu"), "__global__ void b2() {}\n").unwrap();
    let o = f.build(&[("MAX_JOBS", "lots")]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("MAX_JOBS=`lots` is not a number"),
        "{}",
        stderr(&o)
    );
    let o = f.build(&[("MAX_JOBS", "1")]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(f.compiled(), ["beta.cu"]);

    // Prebuilt kernels: the published folder feeds a build with no nvcc at all.
    let o = f.build(&[
        ("RVLLM_PREBUILT_KERNELS", published.to_str().unwrap()),
        ("RVLLM_NVCC", "/nonexistent/nvcc"),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("using 2 prebuilt kernel(s)"),
        "{}",
        stderr(&o)
    );
    assert!(f.compiled().is_empty());

    let _ = std::fs::remove_dir_all(&f.root);
}
