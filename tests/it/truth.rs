//! The command line tells the truth, with the real binary: `vessel apply` exits 0 only when
//! converged and 3 when something was held back; `vessel status --wait-converged` waits for a
//! revision and fails while files have errors (unless told otherwise) or a provider cannot be
//! observed; `vessel plan` and `vessel validate` refuse what cannot work.

use std::time::Duration;

use crate::daemon_support::{Daemon, PLAN, session, wait_for};
use crate::support::{git, text, vessel_in};

const LIMIT: Duration = Duration::from_secs(20);

fn run(dir: &std::path::Path, args: &[&str]) -> (i32, String) {
    let out = vessel_in(dir, args);
    (
        out.status.code().unwrap_or(-1),
        text(&out.stdout) + &text(&out.stderr),
    )
}

#[test]
fn apply_exits_0_only_when_converged_and_3_when_something_is_held() {
    let d = Daemon::new();
    let dir = d.dir.path();
    for s in ["a", "b", "c", "e"] {
        d.write(&format!("{s}.yaml"), &session(s));
    }
    let (code, out) = run(dir, &["apply", "vessel.yaml"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("the world matches"), "{out}");

    // Three of four deleted: the destroy budget holds them, and apply says so with 3.
    for s in ["b", "c", "e"] {
        std::fs::remove_file(d.source().join(format!("{s}.yaml"))).expect("rm");
    }
    let (code, out) = run(dir, &["apply", "vessel.yaml"]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("destroy budget"), "{out}");
    assert!(
        out.contains("vessel approve"),
        "the way out is printed: {out}"
    );

    // A file with errors holds its objects: 3 again, never 0.
    d.write("b.yaml", &session("b"));
    d.write("c.yaml", &session("c"));
    d.write("e.yaml", "kind: Session\nname: e\nplan: web\nbogus: 1\n");
    let (code, out) = run(dir, &["apply", "vessel.yaml"]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("e.yaml has errors"), "{out}");

    // A step that fails: 1.
    d.write("e.yaml", &session("e"));
    d.write(
        "plan.yaml",
        &PLAN.replace("'{vessel}', devserver", "/nonexistent/program, devserver"),
    );
    d.write("f.yaml", &session("f"));
    let (code, out) = run(dir, &["apply", "vessel.yaml"]);
    assert_eq!(code, 1, "{out}");
    for (_, pid) in d.processes() {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

fn wait_converged(d: &Daemon, extra: &[&str]) -> (i32, String) {
    let mut args = vec![
        "status",
        "vessel.yaml",
        "--wait-converged",
        "--timeout",
        "4s",
    ];
    args.extend_from_slice(extra);
    run(d.dir.path(), &args)
}

#[test]
fn wait_converged_waits_for_a_revision_and_fails_while_files_have_errors() {
    let mut d = Daemon::new();
    d.write("alice.yaml", &session("alice"));
    d.start();
    // The endpoint comes from the config given.
    let (code, out) = wait_converged(&d, &[]);
    assert_eq!(code, 0, "{out}");

    // The directory's content revision, or a later one.
    let rev = crate::status::json(d.status, "/status")["revision"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let (code, out) = wait_converged(&d, &["--revision", &rev]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = wait_converged(&d, &["--revision", "dir:000000000000"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("waiting for revision dir:000000000000"),
        "{out}"
    );

    // A file with errors: not converged, and it says why; allowed explicitly, it is.
    d.write(
        "broken.yaml",
        "kind: Session\nname: b\nplan: web\nbogus: 1\n",
    );
    let (code, out) = wait_converged(&d, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("broken.yaml has errors"), "{out}");
    let (code, out) = wait_converged(&d, &["--allow-quarantined"]);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn wait_converged_waits_for_a_git_revision_or_a_later_one() {
    let mut d = Daemon::new();
    let root = d.dir.path().to_path_buf();
    let (bare, work) = (root.join("remote.git"), root.join("work"));
    let s = |p: &std::path::Path| p.to_str().expect("utf-8").to_string();
    git(&root, &["init", "-q", "--bare", "-b", "main", &s(&bare)]);
    git(&root, &["clone", "-q", &s(&bare), &s(&work)]);
    std::fs::create_dir_all(work.join("sessions")).expect("mkdir");
    std::fs::write(work.join("sessions/plan.yaml"), PLAN).expect("plan");
    let commit = |msg: &str| {
        git(&work, &["add", "-A"]);
        git(&work, &["commit", "-q", "-m", msg]);
        git(&work, &["push", "-q", "origin", "HEAD:main"]);
        let out = std::process::Command::new("git")
            .args(["rev-parse", "HEAD"])
            .current_dir(&work)
            .output()
            .expect("git");
        text(&out.stdout).trim().to_string()
    };
    std::fs::write(work.join("sessions/alice.yaml"), session("alice")).expect("alice");
    let first = commit("alice");
    d.edit_config(|c| {
        c.replace(
            "source: {dir: desired}",
            &format!(
                "source: {{git: {{url: 'file://{}', ref: main, path: sessions, poll_interval: 1s}}}}",
                bare.display()
            ),
        )
    });
    d.start();
    let (code, out) = wait_converged(&d, &["--revision", &first]);
    assert_eq!(code, 0, "{out}");
    // A commit not pushed yet is not applied: it waits, and times out.
    std::fs::write(work.join("sessions/bob.yaml"), session("bob")).expect("bob");
    git(&work, &["add", "-A"]);
    git(&work, &["commit", "-q", "-m", "bob"]);
    let second = text(
        &std::process::Command::new("git")
            .args(["rev-parse", "HEAD"])
            .current_dir(&work)
            .output()
            .expect("git")
            .stdout,
    )
    .trim()
    .to_string();
    let (code, out) = wait_converged(&d, &["--revision", &second]);
    assert_eq!(code, 1, "{out}");
    // Pushed, it is applied; and the earlier commit counts as applied too (an ancestor).
    git(&work, &["push", "-q", "origin", "HEAD:main"]);
    let (code, out) = run(
        d.dir.path(),
        &[
            "status",
            "vessel.yaml",
            "--wait-converged",
            "--timeout",
            "20s",
            "--revision",
            &second,
        ],
    );
    assert_eq!(code, 0, "{out}");
    wait_for(LIMIT, || {
        d.get("bob.localhost", "/healthz")
            .is_some_and(|(c, _)| c == 200)
    })
    .expect("bob serves");
    let (code, out) = wait_converged(&d, &["--revision", &first]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = wait_converged(&d, &["--revision", "main"]);
    assert_eq!(code, 0, "a branch name: {out}");
}

#[test]
fn plan_and_validate_refuse_what_cannot_work() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path();
    std::fs::write(
        p.join("plan.yaml"),
        "kind: Plan\nname: box\ncompute: docker\nimage: localhost/x:1\nmemory: 512m\nports: {ide: 8080}\n",
    )
    .expect("write");
    std::fs::write(p.join("a.yaml"), "kind: Session\nname: a\nplan: box\n").expect("write");
    // No docker provider in the embedded default: an error that points at `compute:`.
    let (code, out) = run(p, &["validate", "."]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("no-provider"), "{out}");
    assert!(
        out.contains("plan.yaml:3:10"),
        "file, line and column: {out}"
    );
    let (code, out) = run(p, &["plan", "."]);
    assert_eq!(
        code, 1,
        "plan fails too, never 'nothing will change': {out}"
    );

    // A field the provider ignores is a warning; sizes as containers write them parse.
    std::fs::write(
        p.join("plan.yaml"),
        "kind: Plan\nname: box\ncommand: [x]\ncpus: 2\nmemory: 2g\nports: {ide: 8080}\n",
    )
    .expect("write");
    let (code, out) = run(p, &["validate", "."]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("ignored-field") && out.contains("`cpus`"),
        "{out}"
    );

    // An unknown placeholder in a route template is an error in the config.
    std::fs::write(
        p.join("vessel.yml"),
        "source: {dir: .}\nroutes:\n  templates:\n    - host: '{user}.{domain}'\n      port: ide\n",
    )
    .expect("write");
    let (code, out) = run(p, &["validate", "vessel.yml"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("unknown-placeholder") && out.contains("{user}"),
        "{out}"
    );

    // `{owner}` is a placeholder: a session without an owner is an error under it, at its
    // name; with one, its hosts carry it.
    std::fs::remove_file(p.join("vessel.yml")).expect("rm");
    let cfg_dir = tempfile::tempdir().expect("tempdir");
    let cfg = cfg_dir.path().join("vessel.yml");
    std::fs::write(
        &cfg,
        format!(
            "source: {{dir: '{}'}}\nroutes:\n  templates:\n    - host: '{{owner}}-{{session}}-{{port}}.{{domain}}'\n      port: '*'\n",
            p.display()
        ),
    )
    .expect("write");
    let cfg = cfg.to_str().expect("utf-8");
    let (code, out) = run(p, &["validate", cfg]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("missing-owner") && out.contains("a.yaml:2:7"),
        "{out}"
    );
    std::fs::write(
        p.join("a.yaml"),
        "kind: Session\nname: a\nplan: box\nowner: ann\n",
    )
    .expect("write");
    let (code, out) = run(p, &["validate", cfg]);
    assert_eq!(code, 0, "{out}");
    let (_, out) = run(p, &["plan", cfg]);
    assert!(out.contains("ann-a-8080.localhost"), "{out}");
}

#[test]
fn a_missing_source_path_holds_its_session_instead_of_half_making_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path();
    std::fs::write(p.join("plan.yaml"), PLAN).expect("write");
    std::fs::write(
        p.join("a.yaml"),
        "kind: Session\nname: a\nplan: web\nsource: {path: /nonexistent/project-a}\n",
    )
    .expect("write");
    std::fs::write(p.join("observed.json"), "{}").expect("write");
    let obs = p.join("observed.json");
    let (code, out) = run(
        p,
        &["plan", ".", "--observed", obs.to_str().expect("utf-8")],
    );
    assert_eq!(code, 2, "held is a difference: {out}");
    assert!(
        out.contains("session a: its source path /nonexistent/project-a does not exist"),
        "{out}"
    );
    assert!(!out.contains("create a"), "nothing is half-made: {out}");
}

#[test]
fn wait_converged_fails_while_an_engine_cannot_be_observed() {
    let mut d = Daemon::new();
    d.edit_config(|c| {
        c.replace(
            "  proxy:",
            "    docker:\n      hosts: [{name: gone, endpoint: 'unix:///nonexistent/docker.sock'}]\n  proxy:",
        )
    });
    d.write(
        "box.yaml",
        "kind: Plan\nname: box\ncompute: docker\nimage: localhost/x:1\nports: {ide: 8080}\n",
    );
    d.write("b.yaml", "kind: Session\nname: b\nplan: box\n");
    d.start();
    let (code, out) = wait_converged(&d, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("compute/docker could not be observed"),
        "{out}"
    );
}

/// `restart_requested` on a process session: restarted once (a new process), then converged.
#[test]
fn restart_requested_restarts_a_process_session_once() {
    let d = Daemon::new();
    let dir = d.dir.path();
    d.write("a.yaml", &session("a"));
    let (code, out) = run(dir, &["apply", "vessel.yaml"]);
    assert_eq!(code, 0, "{out}");
    let before = d.processes();
    std::thread::sleep(Duration::from_millis(50));
    let at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    d.write(
        "a.yaml",
        &format!("{}restart_requested: '{at}'\n", session("a")),
    );
    let (code, out) = run(dir, &["plan", "vessel.yaml"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("restart a"), "{out}");
    let (code, out) = run(dir, &["apply", "vessel.yaml"]);
    assert_eq!(code, 0, "{out}");
    let after = d.processes();
    assert_ne!(before, after, "a new process");
    let (code, out) = run(dir, &["plan", "vessel.yaml"]);
    assert!(!out.contains("restart a"), "once: {out}");
    assert_ne!(code, 1, "{out}");
}
