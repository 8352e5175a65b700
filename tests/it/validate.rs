//! `vessel validate` on good and broken trees.

use std::collections::BTreeSet;

use expect_test::expect_file;
use serde_json::Value;

use crate::support::{text, vessel};

#[test]
fn quickstart_is_valid() {
    let out = vessel(&["validate", "examples/quickstart"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("valid: 1 plan, 2 sessions"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn broken_fixtures_render_one_error_per_problem() {
    let out = vessel(&["validate", "tests/fixtures/broken.vessel.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    expect_file!["../fixtures/broken.expected.txt"].assert_eq(&text(&out.stderr));
}

#[test]
fn broken_fixtures_as_json_keep_the_valid_objects() {
    let out = vessel(&[
        "validate",
        "tests/fixtures/broken.vessel.yaml",
        "--format",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).expect("validate --format json prints JSON");
    assert_eq!(v["valid"], Value::Bool(false));
    // The valid files' objects still load.
    assert_eq!(v["objects"]["plans"], serde_json::json!(["small"]));
    assert_eq!(v["objects"]["sessions"], serde_json::json!(["good"]));
    // Exactly one error per broken file, each with file:line:col, and the code we expect.
    let q = v["quarantined"].as_object().expect("quarantined is a map");
    let mut codes = BTreeSet::new();
    for (file, entry) in q {
        let errors = entry["errors"].as_array().expect("errors");
        assert_eq!(errors.len(), 1, "{file}: {errors:?}");
        let e = &errors[0];
        assert!(
            e["line"].as_u64().unwrap_or(0) > 0,
            "{file} has no line: {e}"
        );
        assert!(
            e["column"].as_u64().unwrap_or(0) > 0,
            "{file} has no column: {e}"
        );
        codes.insert((file.clone(), e["code"].as_str().unwrap_or("").to_string()));
    }
    let want: BTreeSet<(String, String)> = [
        ("bad-name.yaml", "invalid-name"),
        ("binary.yaml", "not-utf8"),
        ("dup-a.yaml", "duplicate-name"),
        ("dup-b.yaml", "duplicate-name"),
        ("host-conflict.yaml", "host-conflict"),
        ("missing-plan.yaml", "missing-plan"),
        ("multi.yaml", "unknown-field"),
        ("outside-roots.yaml", "invalid-source"),
        ("port-range.yaml", "invalid-value"),
        ("relative-source.yaml", "invalid-source"),
        ("route-host-conflict.yaml", "host-conflict"),
        ("route-missing-session.yaml", "missing-session"),
        ("route-unknown-port.yaml", "unknown-port"),
        ("syntax.yaml", "yaml-syntax"),
        ("unknown-field.yaml", "unknown-field"),
        ("unknown-kind.yaml", "unknown-kind"),
    ]
    .into_iter()
    .map(|(f, c)| (f.to_string(), c.to_string()))
    .collect();
    assert_eq!(codes, want);
    // A broken multi-document file holds every object it names.
    let held: Vec<&str> = q["multi.yaml"]["held"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|h| h["name"].as_str())
        .collect();
    assert_eq!(held, ["multi-bad", "multi-ok"]);
    // The past expiry is a warning, not an error.
    assert_eq!(v["warnings"][0]["code"], "expired");
    // Hidden files, swap files and backups are not read.
    let files: Vec<&str> = v["files"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f.as_str())
        .collect();
    assert!(
        files
            .iter()
            .all(|f| !f.starts_with('.') && f.ends_with(".yaml")),
        "{files:?}"
    );
    let mut sorted = files.clone();
    sorted.sort();
    assert_eq!(files, sorted, "files load in a stable, sorted order");
}

#[test]
fn a_broken_config_names_file_line_and_column() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("vessel.yaml");
    std::fs::write(
        &cfg,
        "source:\n  dir: .\nstatus:\n  listen: 127.0.0.1:9090\n  token: {value: hunter2}\n",
    )
    .expect("write");
    let out = vessel(&["validate", cfg.to_str().expect("utf-8 path")]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("vessel.yaml:5:"), "{err}");
    assert!(err.contains("never written inline"), "{err}");
    assert!(
        !err.contains("hunter2") || err.contains("token: {value: hunter2}"),
        "the secret only shows as the user's own source line: {err}"
    );
}

#[test]
fn unknown_arguments_and_missing_dirs_fail_cleanly() {
    let out = vessel(&["validate", "does/not/exist"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("does/not/exist"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn credentials_in_a_git_url_are_refused_without_echoing_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("vessel.yaml");
    std::fs::write(
        &cfg,
        "source:\n  git:\n    url: https://bot:ghp_s3cr3tT0ken@git.example.com/team/s.git\n",
    )
    .expect("write");
    let out = vessel(&["validate", cfg.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("vessel.yaml:3:") && err.contains("carries credentials"),
        "{err}"
    );
    assert!(
        !err.contains("ghp_s3cr3tT0ken"),
        "the credential is not echoed: {err}"
    );
}
