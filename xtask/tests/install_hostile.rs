//! `install` against bad input and a misbehaving server: each case is refused with a clear
//! reason and the prefix stays byte-for-byte as it was (or absent, if it was absent).

mod install_support;

use install_support::*;
use std::path::PathBuf;

/// A prefix with 0.1.0 installed, and a second prefix path that does not exist yet.
fn prefixes(server: &Server) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let pre = t.path().join("installed");
    ok(&[
        "install",
        "--index-url",
        &server.base,
        "--prefix",
        p(&pre),
        "--version",
        "0.1.0",
        "--cuda",
        "cpu",
    ]);
    let fresh = t.path().join("fresh");
    (t, pre, fresh)
}

/// Installing `extra` fails with a message containing every `needles`, and changes nothing.
fn refused(server: &Server, extra: &[&str], needles: &[&str]) {
    let (t, pre, fresh) = prefixes(server);
    let outside = snapshot(t.path());
    for prefix in [&pre, &fresh] {
        let before = snapshot(prefix);
        let mut args = vec![
            "install",
            "--index-url",
            &server.base,
            "--prefix",
            p(prefix),
        ];
        args.extend_from_slice(extra);
        let err = fails(&args);
        for n in needles {
            assert!(err.contains(n), "expected {n:?} in:\n{err}");
        }
        assert_eq!(
            snapshot(prefix),
            before,
            "prefix changed after a refused install"
        );
    }
    assert!(!fresh.exists());
    assert_eq!(
        snapshot(t.path()),
        outside,
        "something was written next to the prefixes"
    );
    assert!(
        installed_version(&pre).contains("rvllm 0.1.0"),
        "previous install still works"
    );
}

fn commit_path(commit: &str, variant: &str) -> String {
    format!(
        "/commits/{commit}/rvllm-0.0.0.dev-{}-{variant}.tar.gz",
        host_triple()
    )
}

/// Serves `tarball` as the CPU artifact of commit 0.2.0, with an index whose sha256 and size
/// match it, so only the archive's contents can cause a refusal.
fn serve_as_commit_020(server: &Server, tarball: Vec<u8>) {
    let tree = release_tree();
    let idx_path = tree.join(format!("commits/{COMMIT_020}/index.json"));
    let mut idx: serde_json::Value =
        serde_json::from_slice(&std::fs::read(idx_path).unwrap()).unwrap();
    for a in idx["artifacts"].as_array_mut().unwrap() {
        if a["variant"] == "cpu" {
            a["sha256"] = sha256_hex(&tarball).into();
            a["size"] = tarball.len().into();
        }
    }
    server.overlay(
        &format!("/commits/{COMMIT_020}/index.json"),
        Overlay::Body(serde_json::to_vec(&idx).unwrap()),
    );
    server.overlay(&commit_path(COMMIT_020, "cpu"), Overlay::Body(tarball));
}

/// The genuine CPU artifact of 0.2.0, unpacked: (manifest bytes, binary bytes).
fn genuine_parts() -> (Vec<u8>, Vec<u8>) {
    let f = release_tree().join(format!(
        "releases/0.2.0/rvllm-0.2.0-{}-cpu.tar.gz",
        host_triple()
    ));
    let mut a = tar::Archive::new(flate2::read::GzDecoder::new(
        std::fs::File::open(f).unwrap(),
    ));
    let (mut m, mut b) = (Vec::new(), Vec::new());
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let path = e.path().unwrap().to_string_lossy().into_owned();
        let buf = if path == "manifest.json" {
            &mut m
        } else {
            &mut b
        };
        std::io::Read::read_to_end(&mut e, buf).unwrap();
    }
    (m, b)
}

/// Raw tar entry, written by hand so that names the tar crate refuses to write (`..`,
/// absolute paths) can be made.
fn raw_entry(out: &mut Vec<u8>, name: &str, kind: u8, link: &str, data: &[u8]) {
    let mut h = tar::Header::new_old();
    {
        let old = h.as_old_mut();
        old.name[..name.len()].copy_from_slice(name.as_bytes());
        old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        old.linkflag[0] = kind;
    }
    h.set_size(data.len() as u64);
    h.set_mode(0o755);
    h.set_mtime(0);
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

fn gz(entries: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut raw = Vec::new();
    entries(&mut raw);
    raw.extend_from_slice(&[0u8; 1024]);
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut e, &raw).unwrap();
    e.finish().unwrap()
}

#[test]
fn corrupted_tarball_is_refused_by_sha256() {
    let server = Server::start(&release_tree());
    let path = commit_path(COMMIT_020, "cpu");
    let mut bytes = std::fs::read(release_tree().join(path.trim_start_matches('/'))).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    server.overlay(&path, Overlay::Body(bytes));
    refused(
        &server,
        &["--commit", COMMIT_020, "--cuda", "cpu"],
        &["sha256", "corrupt"],
    );
}

#[test]
fn truncated_download_is_refused() {
    let server = Server::start(&release_tree());
    let path = commit_path(COMMIT_020, "cpu");
    let bytes = std::fs::read(release_tree().join(path.trim_start_matches('/'))).unwrap();
    let announced = bytes.len();
    server.overlay(
        &path,
        Overlay::Truncated {
            announced,
            body: bytes[..announced / 2].to_vec(),
        },
    );
    refused(
        &server,
        &["--commit", COMMIT_020, "--cuda", "cpu"],
        &["retry"],
    );
}

#[test]
fn dot_dot_entry_is_refused() {
    let server = Server::start(&release_tree());
    let (manifest, bin) = genuine_parts();
    serve_as_commit_020(
        &server,
        gz(|t| {
            raw_entry(t, "manifest.json", b'0', "", &manifest);
            raw_entry(t, "../../escaped", b'0', "", b"pwned");
            raw_entry(t, "bin/rvllm", b'0', "", &bin);
        }),
    );
    refused(
        &server,
        &["--commit", COMMIT_020, "--cuda", "cpu"],
        &["\"../../escaped\"", ".."],
    );
}

#[test]
fn absolute_path_entry_is_refused() {
    let server = Server::start(&release_tree());
    let (manifest, bin) = genuine_parts();
    // An absolute name on this machine (the temp folder), which extraction must not write.
    let target = std::env::temp_dir().join("rvllm-absolute-entry");
    let target_name = target.to_str().expect("a UTF-8 temp folder");
    serve_as_commit_020(
        &server,
        gz(|t| {
            raw_entry(t, "manifest.json", b'0', "", &manifest);
            raw_entry(t, target_name, b'0', "", b"pwned");
            raw_entry(t, "bin/rvllm", b'0', "", &bin);
        }),
    );
    refused(
        &server,
        &["--commit", COMMIT_020, "--cuda", "cpu"],
        &["absolute"],
    );
    assert!(!target.exists());
}

#[test]
fn escaping_symlink_is_refused() {
    let server = Server::start(&release_tree());
    let (manifest, _) = genuine_parts();
    serve_as_commit_020(
        &server,
        gz(|t| {
            raw_entry(t, "manifest.json", b'0', "", &manifest);
            raw_entry(t, "bin/rvllm", b'2', "../../../../../../bin/sh", b"");
        }),
    );
    refused(
        &server,
        &["--commit", COMMIT_020, "--cuda", "cpu"],
        &["symlink", "outside"],
    );
}

#[test]
fn device_file_and_unlisted_file_are_refused() {
    let server = Server::start(&release_tree());
    let (manifest, bin) = genuine_parts();
    serve_as_commit_020(
        &server,
        gz(|t| {
            raw_entry(t, "manifest.json", b'0', "", &manifest);
            raw_entry(t, "bin/rvllm", b'0', "", &bin);
            raw_entry(t, "dev-null", b'3', "", b"");
        }),
    );
    refused(
        &server,
        &["--commit", COMMIT_020, "--cuda", "cpu"],
        &["device"],
    );

    // A binary that does not match the manifest's sha256 (archive re-made by someone else).
    let server = Server::start(&release_tree());
    serve_as_commit_020(
        &server,
        gz(|t| {
            raw_entry(t, "manifest.json", b'0', "", &manifest);
            let mut other = bin.clone();
            other[0] ^= 1;
            raw_entry(t, "bin/rvllm", b'0', "", &other);
        }),
    );
    refused(
        &server,
        &["--commit", COMMIT_020, "--cuda", "cpu"],
        &["tampered"],
    );
}

#[test]
fn bad_and_unknown_commits_are_refused() {
    let server = Server::start(&release_tree());
    // Not a full hash: refused before any request reaches the server.
    let (_t, pre, _) = prefixes(&server);
    let before_requests = server.requests().len();
    let before = snapshot(&pre);
    for bad in ["abc123", "main", &"g".repeat(40), &format!("{COMMIT_020}0")] {
        let err = fails(&[
            "install",
            "--index-url",
            &server.base,
            "--prefix",
            p(&pre),
            "--commit",
            bad,
        ]);
        assert!(err.contains("40-hex"), "{err}");
    }
    assert_eq!(
        server.requests().len(),
        before_requests,
        "no network for an invalid commit"
    );
    assert_eq!(snapshot(&pre), before);

    // A well-formed commit with no build: a 404 that points to --nightly.
    refused(
        &server,
        &["--commit", &"1".repeat(40)],
        &["no build is published for commit", "--nightly"],
    );
}

#[test]
fn artifacts_this_machine_cannot_run_are_refused() {
    let server = Server::start(&release_tree());
    // A variant that does not exist.
    refused(
        &server,
        &["--version", "0.2.0", "--cuda", "13.0"],
        &["no CUDA 13.0 variant", "cu118"],
    );
    // A release that does not exist.
    refused(
        &server,
        &["--version", "9.9.9"],
        &["release 9.9.9 is not published", "0.1.0, 0.2.0"],
    );

    // A binary that needs a newer glibc than any machine has, installed --from a file.
    let t = tempfile::tempdir().unwrap();
    let bin = fake_rvllm(
        &t.path().join("b"),
        "0.2.0",
        COMMIT_020,
        false,
        "needs GLIBC_2.999",
    );
    let out = t.path().join("out");
    ok(&["dist", "--binary", p(&bin), "--out", p(&out)]);
    let file = out.join(format!("rvllm-0.2.0-{}-cpu.tar.gz", host_triple()));
    let pre = t.path().join("prefix");
    let err = fails(&["install", "--from", p(&file), "--prefix", p(&pre)]);
    assert!(err.contains("glibc 2.999"), "{err}");
    assert!(!pre.exists());

    // --from without a .sha256 beside it and no --sha256: integrity cannot be checked.
    std::fs::remove_file(file.with_extension("gz.sha256")).unwrap();
    let err = fails(&["install", "--from", p(&file), "--prefix", p(&pre)]);
    assert!(err.contains("--sha256"), "{err}");
    let err = fails(&[
        "install",
        "--from",
        p(&file),
        "--prefix",
        p(&pre),
        "--sha256",
        &"0".repeat(64),
    ]);
    assert!(err.contains("sha256"), "{err}");
    assert!(!pre.exists());
}

/// A consistent archive whose binary says it is another version than its manifest: caught
/// by running the staged binary, i.e. after files were written into the prefix's staging
/// folder, which must be cleaned away.
#[test]
fn binary_contradicting_its_manifest_is_refused_after_staging() {
    let server = Server::start(&release_tree());
    let (manifest, bin) = genuine_parts();
    let liar = String::from_utf8(bin)
        .unwrap()
        .replace("rvllm 0.2.0", "rvllm 6.6.6");
    let mut m: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    for f in m["files"].as_array_mut().unwrap() {
        if f["path"] == "bin/rvllm" {
            f["sha256"] = sha256_hex(liar.as_bytes()).into();
            f["size"] = liar.len().into();
        }
    }
    let manifest = serde_json::to_vec(&m).unwrap();
    serve_as_commit_020(
        &server,
        gz(|t| {
            raw_entry(t, "manifest.json", b'0', "", &manifest);
            raw_entry(t, "bin/rvllm", b'0', "", liar.as_bytes());
        }),
    );
    refused(
        &server,
        &["--commit", COMMIT_020, "--cuda", "cpu"],
        &["says it is 6.6.6", "inconsistent"],
    );
}
