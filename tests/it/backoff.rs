//! Retrying, with the real binary: a failing session backs off without spinning the loop, even
//! once it is held; a fixed spec is tried at once; a destroy never waits for failed creates.

use std::time::{Duration, Instant};

use crate::daemon_support::{Daemon, wait_for};

const LIMIT: Duration = Duration::from_secs(20);
/// Waits for a run of failures: each one is a start, a failed health wait and a growing backoff
/// (0.5, 1, 2, 4 s), which on a loaded 2-core CI machine took longer than LIMIT.
const FAILING: Duration = Duration::from_secs(90);

/// A plan whose sessions exit at once: their health wait fails, again and again.
const BAD: &str = "kind: Plan
name: bad
command: [sh, -c, 'exit 3']
ports: {ide: 8080}
health: {port: ide, path: /healthz}
";

fn crash(plan: &str) -> String {
    format!("kind: Session\nname: crash\nplan: {plan}\n")
}

/// A daemon whose periodic pass is rare, so the passes counted are the ones vessel chose.
fn daemon() -> Daemon {
    let mut d = Daemon::new();
    d.edit_config(|c| c.replace("resync_interval: 1s", "resync_interval: 60s"));
    d.write("zed.yaml", &crate::daemon_support::session("zed"));
    d.write("bad.yaml", BAD);
    d.write("crash.yaml", &crash("bad"));
    d.start();
    d
}

fn failures(d: &Daemon) -> usize {
    d.events()
        .lines()
        .filter(|l| l.contains("\"object\":\"session crash\"") && l.contains("\"failed\""))
        .count()
}

#[test]
fn a_held_failing_session_does_not_spin_the_loop() {
    let d = daemon();
    wait_for(FAILING, || failures(&d) >= 2).expect("crash fails and is retried");
    // Its file breaks: it is held, and its backoff must not drive passes.
    d.write(
        "crash.yaml",
        "kind: Session\nname: crash\nplan: bad\nbogus: 1\n",
    );
    std::thread::sleep(Duration::from_secs(1));
    let before = d.passes();
    std::thread::sleep(Duration::from_secs(5));
    let passes = d.passes() - before;
    assert!(
        passes <= 2,
        "{passes} passes in 5 s with a held failing session; log:\n{}",
        d.log()
    );
}

#[test]
fn a_fixed_spec_is_tried_at_once_and_a_destroy_does_not_wait_for_failed_creates() {
    let d = daemon();
    // Failures in a row: the backoff grows to seconds.
    wait_for(FAILING, || failures(&d) >= 4).expect("crash keeps failing");
    // The fix: a plan that works. It runs at once, not after the backoff.
    let fixed = Instant::now();
    d.write("crash.yaml", &crash("web"));
    wait_for(LIMIT, || {
        d.get("crash.localhost", "/healthz")
            .is_some_and(|(c, _)| c == 200)
    })
    .expect("the fixed session serves");
    assert!(
        fixed.elapsed() < Duration::from_millis(2_500),
        "the fixed spec waited {:?}",
        fixed.elapsed()
    );

    // Broken again, failing again; then deleted: the destroy comes after the settle time, not
    // after the backoff of the failing start.
    d.write("crash.yaml", &crash("bad"));
    let n = failures(&d);
    wait_for(FAILING, || failures(&d) >= n + 4).expect("it fails again");
    let deleted = Instant::now();
    std::fs::remove_file(d.source().join("crash.yaml")).expect("rm");
    wait_for(LIMIT, || !d.state().join("sessions/crash").exists()).expect("crash is destroyed");
    assert!(
        deleted.elapsed() < Duration::from_millis(3_500),
        "the destroy waited {:?}",
        deleted.elapsed()
    );
}
