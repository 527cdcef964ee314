//! Toolkit detection against real directory layouts in temp folders, with executable fake
//! `nvcc` scripts that print a version the way nvcc does.

use super::*;
use std::os::unix::fs::PermissionsExt;

/// Creates `<root>/bin/nvcc` printing `release <version>`; returns the nvcc path.
fn fake_toolkit(root: &Path, version: &str) -> PathBuf {
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(root.join("include")).unwrap();
    let nvcc = bin.join("nvcc");
    let script = format!(
        "#!/bin/sh\n\
         if [ \"$1\" = \"--list-gpu-code\" ]; then printf 'sm_75\\nsm_80\\nsm_86\\nsm_90\\n'; exit 0; fi\n\
         echo 'nvcc: NVIDIA (R) Cuda compiler driver'\n\
         echo 'Cuda compilation tools, release {version}, V{version}.1'\n"
    );
    std::fs::write(&nvcc, script).unwrap();
    std::fs::set_permissions(&nvcc, std::fs::Permissions::from_mode(0o755)).unwrap();
    nvcc
}

fn path_of(dirs: &[&Path]) -> Option<OsString> {
    Some(std::env::join_paths(dirs).unwrap())
}

#[test]
fn parses_nvcc_version_output() {
    let out =
        "nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release 13.0, V13.0.88\n";
    assert_eq!(
        parse_nvcc_version(out),
        Some(CudaVersion {
            major: 13,
            minor: 0
        })
    );
    assert_eq!(
        parse_nvcc_version("release 12.4, V12.4.131"),
        Some(CudaVersion {
            major: 12,
            minor: 4
        })
    );
    assert_eq!(parse_nvcc_version("garbage"), None);
    assert_eq!(
        CudaVersion::from_driver_code(12040),
        Some(CudaVersion {
            major: 12,
            minor: 4
        })
    );
    assert_eq!(
        CudaVersion {
            major: 13,
            minor: 0
        }
        .driver_code(),
        13000
    );
}

#[test]
fn cuda_home_pointing_nowhere_is_reported_and_not_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let other = tmp.path().join("other");
    fake_toolkit(&other, "12.4");
    let env = DetectEnv {
        cuda_home: Some(tmp.path().join("does-not-exist")),
        path: path_of(&[&other.join("bin")]),
        ..Default::default()
    };
    let d = detect_cuda_with(&env);
    assert!(d.cuda_home_invalid);
    assert!(
        d.chosen.is_none(),
        "an explicit CUDA_HOME must not silently fall back: {:?}",
        d.chosen
    );
    assert!(
        d.problems[0].contains("has no bin/nvcc"),
        "{:?}",
        d.problems
    );
    // PATH's nvcc is still seen (doctor reports it).
    assert_eq!(
        d.path.unwrap().version,
        CudaVersion {
            major: 12,
            minor: 4
        }
    );
}

#[test]
fn two_nvcc_that_disagree_are_flagged_and_cuda_home_wins() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("cuda-12.4");
    let other = tmp.path().join("cuda-13.0");
    fake_toolkit(&home, "12.4");
    fake_toolkit(&other, "13.0");
    let env = DetectEnv {
        cuda_home: Some(home.clone()),
        path: path_of(&[&other.join("bin")]),
        ..Default::default()
    };
    let d = detect_cuda_with(&env);
    let chosen = d.chosen.unwrap();
    assert_eq!(chosen.source, ToolkitSource::CudaHome);
    assert_eq!(
        chosen.version,
        CudaVersion {
            major: 12,
            minor: 4
        }
    );
    let msg = d.disagreement.expect("versions differ");
    assert!(msg.contains("13.0") && msg.contains("12.4"), "{msg}");

    // Same version on both: no disagreement.
    let env = DetectEnv {
        cuda_home: Some(home.clone()),
        path: path_of(&[&home.join("bin")]),
        ..Default::default()
    };
    assert!(detect_cuda_with(&env).disagreement.is_none());
}

#[test]
fn nvcc_only_on_path() {
    let tmp = tempfile::tempdir().unwrap();
    let tk = tmp.path().join("tk");
    let nvcc = fake_toolkit(&tk, "12.8");
    let empty = tmp.path().join("empty-bin");
    std::fs::create_dir_all(&empty).unwrap();
    let env = DetectEnv {
        path: path_of(&[&empty, &tk.join("bin")]),
        standard_prefixes: vec![tmp.path().join("usr-local-cuda")],
        ..Default::default()
    };
    let d = detect_cuda_with(&env);
    let chosen = d.chosen.unwrap();
    assert_eq!(chosen.source, ToolkitSource::Path);
    assert_eq!(chosen.nvcc, nvcc);
    assert_eq!(chosen.root, std::fs::canonicalize(&tk).unwrap());
    assert_eq!(
        chosen.include_dirs(),
        vec![std::fs::canonicalize(&tk).unwrap().join("include")]
    );
    assert_eq!(chosen.supported_archs().unwrap(), vec![75, 80, 86, 90]);
}

#[test]
fn a_non_executable_nvcc_on_path_is_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = tmp.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::write(bin.join("nvcc"), "not a program").unwrap();
    let d = detect_cuda_with(&DetectEnv {
        path: path_of(&[&bin]),
        ..Default::default()
    });
    assert!(d.chosen.is_none());
}

#[test]
fn standard_prefix_comes_before_the_project_local_toolkit() {
    let tmp = tempfile::tempdir().unwrap();
    let prefix = tmp.path().join("opt-cuda");
    fake_toolkit(&prefix, "12.6");
    let local = tmp.path().join("repo").join(".cuda");
    fake_toolkit(&local.join("nvidia").join("cu13"), "13.0");
    let env = DetectEnv {
        standard_prefixes: vec![tmp.path().join("missing"), prefix.clone()],
        project_local: Some(local),
        ..Default::default()
    };
    let chosen = detect_cuda_with(&env).chosen.unwrap();
    assert_eq!(chosen.source, ToolkitSource::StandardPrefix);
    assert_eq!(
        chosen.version,
        CudaVersion {
            major: 12,
            minor: 6
        }
    );
}

#[test]
fn project_local_pypi_layout_is_found_last() {
    let tmp = tempfile::tempdir().unwrap();
    let local = tmp.path().join(".cuda");
    let cu13 = local.join("nvidia").join("cu13");
    let nvcc = fake_toolkit(&cu13, "13.0");
    // A stray cu12 folder without nvcc is ignored.
    std::fs::create_dir_all(local.join("nvidia").join("cu12").join("lib")).unwrap();
    let env = DetectEnv {
        path: path_of(&[&tmp.path().join("nothing-here")]),
        standard_prefixes: vec![tmp.path().join("usr-local-cuda")],
        project_local: Some(local),
        ..Default::default()
    };
    let d = detect_cuda_with(&env);
    let chosen = d.chosen.unwrap();
    assert_eq!(chosen.source, ToolkitSource::ProjectLocal);
    assert_eq!(chosen.nvcc, nvcc);
    assert_eq!(
        chosen.version,
        CudaVersion {
            major: 13,
            minor: 0
        }
    );
    assert!(chosen.include_dirs()[0].ends_with("nvidia/cu13/include"));
}

#[test]
fn nothing_found_gives_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let d = detect_cuda_with(&DetectEnv {
        path: path_of(&[tmp.path()]),
        standard_prefixes: vec![tmp.path().join("x")],
        project_local: Some(tmp.path().join(".cuda")),
        ..Default::default()
    });
    assert!(d.chosen.is_none() && !d.cuda_home_invalid);
    assert!(Detection::fix_hint().contains("cargo xtask setup-cuda"));
}

#[test]
fn parses_arch_lists() {
    let a = parse_cuda_archs("80;90a").unwrap();
    assert_eq!(format_cuda_archs(&a), "80;90a");
    assert_eq!(
        format_cuda_archs(&parse_cuda_archs("8.6 sm_80, compute_90a;80").unwrap()),
        "80;86;90a"
    );
    assert!(parse_cuda_archs("ampere").unwrap_err().contains("`ampere`"));
    assert!(parse_cuda_archs(" ; ").is_err());
    assert!(parse_cuda_archs("90x").is_err());
    assert_eq!(
        CudaArch::from_compute_capability(9, 0).to_string(),
        "sm_90a"
    );
    assert_eq!(CudaArch::from_compute_capability(8, 9).to_string(), "sm_89");
}

#[test]
fn gencode_has_sass_for_each_and_ptx_only_when_the_driver_can_load_it() {
    let archs = parse_cuda_archs("80;90a").unwrap();
    let v13 = CudaVersion {
        major: 13,
        minor: 0,
    };
    let v12 = CudaVersion {
        major: 12,
        minor: 8,
    };
    assert!(should_embed_ptx(v12, Some(v13)));
    assert!(should_embed_ptx(v13, Some(v13)));
    assert!(!should_embed_ptx(v13, Some(v12)));
    assert!(should_embed_ptx(v13, None));
    assert_eq!(
        gencode_flags(&archs, false),
        [
            "-gencode=arch=compute_80,code=sm_80",
            "-gencode=arch=compute_90a,code=sm_90a"
        ]
    );
    let with = gencode_flags(&archs, true);
    assert_eq!(with.len(), 3);
    assert_eq!(with[2], "-gencode=arch=compute_90a,code=compute_90a");
}

#[test]
fn unsupported_archs_are_split_off() {
    let archs = parse_cuda_archs("70;75;80;86;89;90a").unwrap();
    let supported = parse_gpu_code_list("sm_75\nsm_80\nsm_86\nsm_89\nsm_90\nsm_100\n");
    let (ok, dropped) = filter_supported(&archs, &supported);
    assert_eq!(format_cuda_archs(&ok), "75;80;86;89;90a");
    assert_eq!(format_cuda_archs(&dropped), "70");
    // The default list trimmed to an nvcc without sm_120 (CUDA 12.7 knew sm_100 only).
    let (ok, dropped) =
        filter_supported(&parse_cuda_archs(DEFAULT_CUDA_ARCHS).unwrap(), &supported);
    assert_eq!(format_cuda_archs(&ok), "80;86;89;90a;100");
    assert_eq!(format_cuda_archs(&dropped), "120");
    // nvcc 13.0 targets every default one.
    let cu13 = parse_gpu_code_list(
        "sm_75\nsm_80\nsm_86\nsm_87\nsm_88\nsm_89\nsm_90\nsm_100\nsm_110\nsm_103\nsm_120\nsm_121\n",
    );
    let (ok, dropped) = filter_supported(&parse_cuda_archs(DEFAULT_CUDA_ARCHS).unwrap(), &cu13);
    assert_eq!((ok.len(), dropped.len()), (6, 0));
}

#[test]
fn ccache_version_gate() {
    assert_eq!(
        parse_ccache_version("ccache version 4.7.5\nFeatures: ..."),
        Some(CudaVersion { major: 4, minor: 7 })
    );
    assert_eq!(
        parse_ccache_version("ccache version 3.7.7"),
        Some(CudaVersion { major: 3, minor: 7 })
    );
    assert_eq!(parse_ccache_version("sccache 0.8"), None);
}
