//! `dist`, `install` and `dev` end to end: a release tree made by `cargo xtask dist` from
//! stand-in binaries, served over real HTTP on 127.0.0.1, installed into temporary prefixes.

mod install_support;

use install_support::*;
use std::path::Path;

fn install(server: &Server, prefix: &Path, extra: &[&str]) -> String {
    let mut args = vec![
        "install",
        "--index-url",
        &server.base,
        "--prefix",
        p(prefix),
    ];
    args.extend_from_slice(extra);
    String::from_utf8_lossy(&ok(&args).stdout).into_owned()
}

#[test]
fn release_tree_has_indexes_and_placeholder_names() {
    let tree = release_tree();
    let root: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tree.join("index.json")).unwrap()).unwrap();
    assert_eq!(root["latest"], "0.2.0");
    assert_eq!(root["releases"], serde_json::json!(["0.1.0", "0.2.0"]));
    assert_eq!(root["nightly"]["commit"], COMMIT_NIGHTLY);

    let t = host_triple();
    let nightly: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tree.join("nightly/index.json")).unwrap()).unwrap();
    let arts = nightly["artifacts"].as_array().unwrap();
    assert_eq!(arts.len(), 3);
    for a in arts {
        // Stable placeholder file names; the real version in the entry.
        let file = a["file"].as_str().unwrap();
        assert!(file.starts_with(&format!("rvllm-0.0.0.dev-{t}-")), "{file}");
        assert_eq!(a["version"], NIGHTLY_VERSION);
        assert!(tree.join("nightly").join(file).is_file());
        assert!(tree
            .join("nightly")
            .join(format!("{file}.sha256"))
            .is_file());
    }
    assert!(tree
        .join(format!("nightly/rvllm-0.0.0.dev-{t}-cu121.tar.gz"))
        .is_file());
    assert!(tree
        .join(format!("releases/0.1.0/rvllm-0.1.0-{t}-cu118.tar.gz"))
        .is_file());
    for c in [COMMIT_010, COMMIT_020, COMMIT_NIGHTLY] {
        assert!(tree.join(format!("commits/{c}/index.json")).is_file());
        assert!(tree
            .join(format!("commits/{c}/rvllm-0.0.0.dev-{t}-cpu.tar.gz"))
            .is_file());
    }
    // The .sha256 beside each tarball is right.
    let f = tree.join(format!("releases/0.2.0/rvllm-0.2.0-{t}-cu121.tar.gz"));
    let side = std::fs::read_to_string(f.with_extension("gz.sha256")).unwrap();
    assert_eq!(
        side.split_whitespace().next().unwrap(),
        sha256_hex(&std::fs::read(&f).unwrap())
    );
}

#[test]
fn installs_each_kind_and_reports_the_real_version() {
    let server = Server::start(&release_tree());
    let t = tempfile::tempdir().unwrap();

    // Latest release.
    let pre = t.path().join("latest");
    let out = install(&server, &pre, &[]);
    assert!(out.contains("installed rvllm 0.2.0"), "{out}");
    assert!(installed_version(&pre).starts_with(&format!("rvllm 0.2.0 (commit {COMMIT_020}")));

    // A given version and CUDA variant.
    let pre = t.path().join("v010");
    let out = install(&server, &pre, &["--version", "0.1.0", "--cuda", "11.8"]);
    assert!(
        out.contains("installed rvllm 0.1.0") && out.contains("CUDA 11.8"),
        "{out}"
    );
    assert!(installed_version(&pre).contains("rvllm 0.1.0"));
    let dir = pre.join(format!("lib/rvllm/0.1.0-{}-cu118", &COMMIT_010[..12]));
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["cuda"], "11.8");
    assert_eq!(
        m["compute_capabilities"],
        serde_json::json!([
            "sm_80",
            "compute_80",
            "sm_90",
            "sm_90a",
            "compute_90a",
            "sm_100f"
        ])
    );
    assert!(dir.join("kernels/norm.fatbin").is_file());
    assert!(dir.join("kernels/built_archs.txt").is_file());

    // The nightly: placeholder file name on the server, real version printed and installed.
    let pre = t.path().join("nightly");
    let out = install(&server, &pre, &["--nightly", "--cuda", "12.1"]);
    assert!(
        out.contains(&format!(
            "installed rvllm {NIGHTLY_VERSION} (commit {COMMIT_NIGHTLY}"
        )),
        "{out}"
    );
    assert!(installed_version(&pre).contains(NIGHTLY_VERSION));
    assert!(server
        .requests()
        .iter()
        .any(|r| r.contains("rvllm-0.0.0.dev-") && r.contains("cu121")));

    // A commit.
    let pre = t.path().join("commit");
    let out = install(&server, &pre, &["--commit", COMMIT_010, "--cuda", "cpu"]);
    assert!(out.contains("installed rvllm 0.1.0"), "{out}");
    assert!(installed_version(&pre).contains(COMMIT_010));

    // --from a local file (its .sha256 beside it) and from a URL.
    let tree = release_tree();
    let file = tree.join(format!(
        "releases/0.2.0/rvllm-0.2.0-{}-cpu.tar.gz",
        host_triple()
    ));
    let pre = t.path().join("from-file");
    ok(&["install", "--from", p(&file), "--prefix", p(&pre)]);
    assert!(installed_version(&pre).contains("rvllm 0.2.0"));
    let url = format!(
        "{}/releases/0.2.0/rvllm-0.2.0-{}-cu118.tar.gz",
        server.base,
        host_triple()
    );
    let pre = t.path().join("from-url");
    ok(&["install", "--from", &url, "--prefix", p(&pre)]);
    assert!(installed_version(&pre).contains("rvllm 0.2.0"));
}

#[test]
fn upgrade_then_roll_back_keeps_versions_side_by_side() {
    let server = Server::start(&release_tree());
    let t = tempfile::tempdir().unwrap();
    let pre = t.path().join("prefix");
    install(&server, &pre, &["--version", "0.1.0", "--cuda", "cpu"]);
    assert!(installed_version(&pre).contains("rvllm 0.1.0"));

    let out = install(&server, &pre, &["--version", "0.2.0", "--cuda", "cpu"]);
    assert!(installed_version(&pre).contains("rvllm 0.2.0"));
    assert!(out.contains("previous version 0.1.0"), "{out}");
    let lib = pre.join("lib/rvllm");
    let mut names: Vec<String> = std::fs::read_dir(&lib)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec![
            format!("0.1.0-{}-cpu", &COMMIT_010[..12]),
            format!("0.2.0-{}-cpu", &COMMIT_020[..12])
        ],
        "no staging leftovers"
    );
    // The link is relative, so the prefix can move.
    let link = std::fs::read_link(pre.join("bin/rvllm")).unwrap();
    assert!(link.is_relative(), "{}", link.display());

    // An install interrupted by a signal leaves a staging folder of a dead process; the
    // next successful install clears it. (4194305 is above the kernel's highest pid.)
    let stale = lib.join(".staging-4194305-1");
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join("half-written"), b"x").unwrap();
    install(&server, &pre, &["--version", "0.2.0", "--cuda", "cpu"]);
    assert!(!stale.exists(), "stale staging folder removed");

    // Roll back: the old version folder is reused; the link switches back.
    let before = snapshot(&lib);
    install(&server, &pre, &["--version", "0.1.0", "--cuda", "cpu"]);
    assert!(installed_version(&pre).contains("rvllm 0.1.0"));
    assert_eq!(
        snapshot(&lib),
        before,
        "rollback reuses the installed folder"
    );
}

#[test]
fn dev_then_quit_leaves_the_prefix_byte_for_byte() {
    let server = Server::start(&release_tree());
    let t = tempfile::tempdir().unwrap();
    let pre = t.path().join("prefix");
    install(&server, &pre, &["--nightly", "--cuda", "12.1"]);
    let before = snapshot(&pre);
    let installed = installed_version(&pre);

    // A stand-in for the source build (so the test does not build the engine).
    let src = fake_rvllm(
        &t.path().join("src-build"),
        "0.3.0-dev",
        "0000000000000000000000000000000000000000",
        true,
        "dev",
    );
    let o = ok(&["dev", "--prefix", p(&pre), "--binary", p(&src)]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("dev mode"), "{out}");
    assert!(
        installed_version(&pre).contains("commit 0000000000"),
        "the source build is linked"
    );
    assert!(pre.join("bin/.rvllm.dev-backup").exists());

    // Twice is safe, and installing over dev mode is refused.
    ok(&["dev", "--prefix", p(&pre), "--binary", p(&src)]);
    assert!(installed_version(&pre).contains("commit 0000000000"));
    let err = fails(&[
        "install",
        "--index-url",
        &server.base,
        "--prefix",
        p(&pre),
        "--version",
        "0.1.0",
    ]);
    assert!(
        err.contains("dev mode") && err.contains("dev --quit"),
        "{err}"
    );

    ok(&["dev", "--quit", "--prefix", p(&pre)]);
    assert_eq!(snapshot(&pre), before);
    assert_eq!(installed_version(&pre), installed);
    let o = ok(&["dev", "-q", "--prefix", p(&pre)]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("not in dev mode"));
    assert_eq!(snapshot(&pre), before);
}

#[test]
fn dev_reports_inconsistent_states_without_touching_them() {
    let server = Server::start(&release_tree());
    let t = tempfile::tempdir().unwrap();
    let src = fake_rvllm(
        &t.path().join("src-build"),
        "0.3.0-dev",
        COMMIT_NIGHTLY,
        false,
        "dev",
    );

    // Nothing installed: dev says how to get an install.
    let empty = t.path().join("empty");
    let err = fails(&["dev", "--prefix", p(&empty), "--binary", p(&src)]);
    assert!(err.contains("dev --nightly"), "{err}");
    assert!(!empty.exists());

    // --nightly fetches it first.
    let pre = t.path().join("prefix");
    ok(&[
        "dev",
        "--nightly",
        "--index-url",
        &server.base,
        "--prefix",
        p(&pre),
        "--binary",
        p(&src),
    ]);
    assert!(pre.join("bin/.rvllm.dev-backup").exists());

    // A backup with no link.
    std::fs::remove_file(pre.join("bin/rvllm")).unwrap();
    let before = snapshot(&pre);
    for args in [
        vec!["dev", "--prefix", p(&pre), "--binary", p(&src)],
        vec!["dev", "--quit", "--prefix", p(&pre)],
    ] {
        let err = fails(&args);
        assert!(err.contains("inconsistent") && err.contains("mv "), "{err}");
        assert_eq!(snapshot(&pre), before);
    }
    // Following the advice restores a working install.
    std::fs::rename(pre.join("bin/.rvllm.dev-backup"), pre.join("bin/rvllm")).unwrap();
    assert!(installed_version(&pre).contains(NIGHTLY_VERSION));

    // A link to a source build with no backup.
    std::fs::remove_file(pre.join("bin/rvllm")).unwrap();
    std::os::unix::fs::symlink(&src, pre.join("bin/rvllm")).unwrap();
    let before = snapshot(&pre);
    let err = fails(&["dev", "--quit", "--prefix", p(&pre)]);
    assert!(err.contains("no backup") && err.contains("rm "), "{err}");
    assert_eq!(snapshot(&pre), before);
}

#[test]
fn prefix_whose_bin_is_a_link_elsewhere_still_works() {
    let server = Server::start(&release_tree());
    let t = tempfile::tempdir().unwrap();
    let pre = t.path().join("prefix");
    let elsewhere = t.path().join("dotfiles/bin");
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::fs::create_dir_all(&pre).unwrap();
    std::os::unix::fs::symlink(&elsewhere, pre.join("bin")).unwrap();
    install(&server, &pre, &["--version", "0.2.0", "--cuda", "cpu"]);
    assert!(installed_version(&pre).contains("rvllm 0.2.0"));
    // The link resolves from its real folder too.
    let o = std::process::Command::new(elsewhere.join("rvllm"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stdout).contains("rvllm 0.2.0"));
}

#[test]
fn a_release_version_is_one_commit() {
    let t = tempfile::tempdir().unwrap();
    let tree = t.path().join("tree");
    dist_into(&tree, t.path(), "0.5.0", COMMIT_010, None, "release");
    let bin = fake_rvllm(&t.path().join("other"), "0.5.0", COMMIT_020, true, "x");
    let kernels = kernels_dir(t.path());
    let err = fails(&[
        "dist",
        "--binary",
        p(&bin),
        "--cuda",
        "12.1",
        "--kernels-dir",
        p(&kernels),
        "--out",
        p(&t.path().join("out2")),
        "--release-tree",
        p(&tree),
        "--channel",
        "release",
    ]);
    assert!(err.contains("a release is one commit"), "{err}");
    // Nothing of the refused artifact reached the tree.
    let idx = std::fs::read_to_string(tree.join("releases/0.5.0/index.json")).unwrap();
    assert!(!idx.contains(COMMIT_020) && !idx.contains("cu121"), "{idx}");
    assert!(!tree.join(format!("commits/{COMMIT_020}")).exists());
}
