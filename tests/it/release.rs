//! Release packaging: `deploy/release/package` run for real on this test build of vessel (the
//! release workflow calls the same script), and the README's set-up quoting the glibc the
//! script enforces.

use std::path::Path;
use std::process::{Command, Output};

use crate::support::{root, text};

fn package(args: &[&str]) -> Output {
    Command::new(root().join("deploy/release/package"))
        .args(args)
        .output()
        .expect("deploy/release/package runs")
}

fn run(cmd: &str, args: &[&str], dir: &Path) -> String {
    let out = Command::new(cmd)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        text(&out.stderr)
    );
    text(&out.stdout)
}

#[test]
fn package_refuses_a_binary_that_is_not_stripped() {
    let out_dir = tempfile::tempdir().expect("tempdir");
    let out = package(&[
        "--binary",
        env!("CARGO_BIN_EXE_vessel"),
        "--target",
        "x86_64-unknown-linux-gnu",
        "--out",
        out_dir.path().to_str().expect("utf-8"),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains("is not stripped"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(std::fs::read_dir(out_dir.path()).expect("out").count(), 0);
}

#[test]
fn package_writes_a_tarball_with_completions_man_page_and_checksums() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let bin = tmp.path().join("vessel");
    std::fs::copy(env!("CARGO_BIN_EXE_vessel"), &bin).expect("copy the binary");
    run("strip", &[bin.to_str().expect("utf-8")], tmp.path());
    let dist = tmp.path().join("dist");
    let out = Command::new(root().join("deploy/release/package"))
        .args([
            "--binary",
            "vessel",
            "--target",
            "test-target",
            "--out",
            "dist",
        ])
        .current_dir(tmp.path())
        // A test build on a newer system may need a newer glibc than releases (built on Debian
        // 12) do; the limit itself is the next test's subject.
        .env("VESSEL_MAX_GLIBC", "99")
        .output()
        .expect("deploy/release/package runs");
    assert!(out.status.success(), "{}", text(&out.stderr));

    let version = env!("CARGO_PKG_VERSION");
    let name = format!("vessel-{version}-test-target");
    let sums = std::fs::read_to_string(dist.join("SHA256SUMS")).expect("SHA256SUMS");
    assert!(sums.ends_with(&format!("  {name}.tar.gz\n")), "{sums}");
    run("sha256sum", &["--check", "--strict", "SHA256SUMS"], &dist);

    let listing = run("tar", &["-tzvf", &format!("{name}.tar.gz")], &dist);
    let mut files: Vec<&str> = listing
        .lines()
        .filter(|l| !l.starts_with('d'))
        .map(|l| l.rsplit(' ').next().expect("a path"))
        .collect();
    files.sort_unstable();
    let want: Vec<String> = [
        "README.md",
        "completions/_vessel",
        "completions/vessel.bash",
        "completions/vessel.fish",
        "examples/quickstart/alice.yaml",
        "examples/quickstart/bob.yaml",
        "examples/quickstart/plan.yaml",
        "man/vessel.1",
        "vessel",
    ]
    .iter()
    .map(|f| format!("{name}/{f}"))
    .collect();
    assert_eq!(files, want);
    assert!(
        listing.lines().all(|l| l.contains(" 0/0 ")),
        "entries owned by 0/0: {listing}"
    );

    run("tar", &["-xzf", &format!("{name}.tar.gz")], &dist);
    let unpacked = dist.join(&name);
    let man = std::fs::read_to_string(unpacked.join("man/vessel.1")).expect("man page");
    assert!(man.contains(".TH vessel 1"), "{man}");
    let bash = std::fs::read_to_string(unpacked.join("completions/vessel.bash")).expect("bash");
    assert!(bash.contains("complete -F"), "{bash}");
    // The unpacked binary runs and validates the quickstart shipped beside it.
    let v = Command::new(unpacked.join("vessel"))
        .args(["validate", "examples/quickstart"])
        .current_dir(&unpacked)
        .output()
        .expect("the packaged vessel runs");
    assert_eq!(v.status.code(), Some(0), "{}", text(&v.stderr));
    let said = format!("{}{}", text(&v.stdout), text(&v.stderr));
    assert!(said.contains("valid: 1 plan, 2 sessions"), "{said}");
}

#[test]
fn the_readme_quotes_the_glibc_the_package_script_enforces() {
    let script = std::fs::read_to_string(root().join("deploy/release/package")).expect("script");
    let max = script
        .lines()
        .find_map(|l| l.strip_prefix("MAX_GLIBC=\"${VESSEL_MAX_GLIBC:-"))
        .and_then(|rest| rest.strip_suffix("}\""))
        .expect("a MAX_GLIBC=\"${VESSEL_MAX_GLIBC:-X.Y}\" line");
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README");
    assert!(
        readme.contains(&format!("It needs glibc {max} or newer")),
        "README's set-up must say the prebuilt binary needs glibc {max} or newer"
    );
    let workflow = std::fs::read_to_string(root().join(".github/workflows/release.yml"))
        .expect("release workflow");
    assert!(workflow.contains("deploy/release/package"), "{workflow}");
    assert!(workflow.contains("deploy/container/build"), "{workflow}");
}
