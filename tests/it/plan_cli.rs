//! `vessel plan` end to end: against another git revision (real repositories made with the
//! `git` CLI), against an observed snapshot, in every format, with its exit codes.

use crate::support::{git, text, vessel_in};

const PLAN: &str =
    "kind: Plan\nname: web\ncommand: [serve, '{port.ide}']\nports: {ide: 8080, app: 5173}\n";

fn session(name: &str) -> String {
    format!("kind: Session\nname: {name}\nplan: web\n")
}

/// A repository whose desired tree lives in `sessions/`, with two commits: alice and bob,
/// then bob removed and carol added.
fn repo() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    git(d, &["init", "-q", "-b", "main"]);
    std::fs::create_dir(d.join("sessions")).expect("mkdir");
    std::fs::write(d.join("sessions/plan.yaml"), PLAN).expect("write");
    std::fs::write(d.join("sessions/alice.yaml"), session("alice")).expect("write");
    std::fs::write(d.join("sessions/bob.yaml"), session("bob")).expect("write");
    git(d, &["add", "-A"]);
    git(d, &["commit", "-q", "-m", "alice and bob"]);
    std::fs::remove_file(d.join("sessions/bob.yaml")).expect("rm");
    std::fs::write(d.join("sessions/carol.yaml"), session("carol")).expect("write");
    git(d, &["add", "-A"]);
    git(d, &["commit", "-q", "-m", "bob leaves, carol joins"]);
    dir
}

#[test]
fn against_the_previous_commit_shows_what_the_change_does() {
    let r = repo();
    let out = vessel_in(r.path(), &["plan", "sessions", "--against-ref", "HEAD~1"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("+ session carol (missing)"), "{stdout}");
    assert!(
        stdout.contains("- session bob (no longer desired)"),
        "{stdout}"
    );
    assert!(stdout.contains("- route bob.localhost"), "{stdout}");
    assert!(
        !stdout.contains("session alice"),
        "alice is unchanged: {stdout}"
    );
    assert!(
        stdout.contains("Plan: 4 to create, 0 to update, 0 to replace, 4 to destroy"),
        "{stdout}"
    );
    assert!(
        text(&out.stderr).contains("bob leaves") || text(&out.stderr).contains("alice and bob"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn against_the_same_commit_there_are_no_changes() {
    let r = repo();
    let out = vessel_in(r.path(), &["plan", "sessions", "--against-ref", "HEAD"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    assert!(text(&out.stdout).contains("No changes."));
}

#[test]
fn markdown_and_json_formats() {
    let r = repo();
    let out = vessel_in(
        r.path(),
        &[
            "plan",
            "sessions",
            "--against-ref",
            "HEAD~1",
            "--format",
            "markdown",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    let md = text(&out.stdout);
    assert!(md.starts_with("### vessel plan"), "{md}");
    assert!(md.contains("| `+` | session `carol` | missing |"), "{md}");
    let out = vessel_in(
        r.path(),
        &[
            "plan",
            "sessions",
            "--against-ref",
            "HEAD~1",
            "--format",
            "json",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    // carol and her three routes, served in the pass that makes her.
    assert_eq!(v["summary"]["create"], 4);
    assert_eq!(v["summary"]["destroy"], 4);
    let first = &v["steps"][0];
    assert!(
        first["action"].is_string()
            && first["reason"].is_string()
            && first["depends_on"].is_array(),
        "{first}"
    );
}

#[test]
fn a_broken_file_in_the_change_fails_the_plan() {
    let r = repo();
    std::fs::write(
        r.path().join("sessions/carol.yaml"),
        "kind: Session\nname: carol\nplna: web\n",
    )
    .expect("write");
    let out = vessel_in(r.path(), &["plan", "sessions", "--against-ref", "HEAD~1"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("sessions/carol.yaml:3:1"), "{err}");
    // bob's deletion is still planned, carol (unknown now) is not created.
    assert!(
        text(&out.stdout).contains("- session bob"),
        "{}",
        text(&out.stdout)
    );
    assert!(!text(&out.stdout).contains("+ session carol"));
}

#[test]
fn a_new_directory_against_a_revision_without_it_creates_everything() {
    let r = repo();
    std::fs::create_dir(r.path().join("team-b")).expect("mkdir");
    std::fs::write(r.path().join("team-b/plan.yaml"), PLAN).expect("write");
    std::fs::write(r.path().join("team-b/dora.yaml"), session("dora")).expect("write");
    let out = vessel_in(r.path(), &["plan", "team-b", "--against-ref", "HEAD"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stdout).contains("+ session dora"));
}

#[test]
fn against_an_observed_snapshot() {
    let r = repo();
    // A snapshot of the world as HEAD~1 made it, written as the daemon would.
    let out = vessel_in(
        r.path(),
        &[
            "plan",
            "sessions",
            "--against-ref",
            "HEAD~1",
            "--format",
            "json",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    let empty = r.path().join("empty.json");
    std::fs::write(&empty, "{}").expect("write");
    let out = vessel_in(
        r.path(),
        &[
            "plan",
            "sessions",
            "--observed",
            empty.to_str().expect("utf-8"),
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stdout).contains("+ session alice"));
    let bad = r.path().join("bad.json");
    std::fs::write(&bad, "{\"sessions\": [}").expect("write");
    let out = vessel_in(
        r.path(),
        &[
            "plan",
            "sessions",
            "--observed",
            bad.to_str().expect("utf-8"),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("bad.json:1:"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn outside_a_repository_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("plan.yaml"), PLAN).expect("write");
    let out = vessel_in(dir.path(), &["plan", ".", "--against-ref", "HEAD"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("not inside a git repository"),
        "{}",
        text(&out.stderr)
    );
}
