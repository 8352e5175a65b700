//! Nothing is lost to a half-saved file: with the real binary, a session's file is saved in
//! the ways editors save (truncate then write, write in place in small chunks, rename over,
//! move away then write, comment-only for a moment), and the session keeps its process and
//! the work in its workspace. A genuine deletion still takes effect, after the settle time.

use std::io::Write;
use std::time::{Duration, Instant};

use crate::daemon_support::{Daemon, session, wait_for};

const LIMIT: Duration = Duration::from_secs(20);
/// The default settle time, and a little more for the pass that follows it.
const SETTLE: Duration = Duration::from_secs(2);

fn alice_pid(d: &Daemon) -> Vec<i32> {
    d.processes()
        .into_iter()
        .filter(|(n, _)| n == "alice")
        .map(|(_, p)| p)
        .collect()
}

fn started() -> (Daemon, Vec<i32>) {
    let mut d = Daemon::new();
    d.write("zed.yaml", &session("zed"));
    d.write("alice.yaml", &session("alice"));
    d.start();
    wait_for(LIMIT, || {
        d.get("alice.localhost", "/healthz")
            .is_some_and(|(c, _)| c == 200)
    })
    .expect("alice serves");
    let ws = d.state().join("sessions/alice/workspace");
    std::fs::write(ws.join("notes.md"), "work in progress").expect("work");
    let pid = alice_pid(&d);
    assert_eq!(pid.len(), 1, "{:?}", d.processes());
    (d, pid)
}

/// After a save: wait past the settle time, then nothing of alice's may have changed.
fn assert_nothing_lost(d: &Daemon, pid: &[i32], how: &str) {
    std::thread::sleep(SETTLE + Duration::from_millis(1_500));
    assert_eq!(alice_pid(d), pid, "{how}: alice's process is the same");
    let notes = d.state().join("sessions/alice/workspace/notes.md");
    assert_eq!(
        std::fs::read_to_string(&notes).ok().as_deref(),
        Some("work in progress"),
        "{how}: the work is there"
    );
    assert_eq!(
        d.get("alice.localhost", "/healthz").map(|r| r.0),
        Some(200),
        "{how}: the route serves"
    );
    let events = d.events();
    assert!(
        !events.contains("\"action\":\"destroy\",\"object\":\"session alice\"")
            && !events.contains("\"action\":\"remove-route\",\"object\":\"route alice.localhost\""),
        "{how}: nothing of alice's was destroyed or removed:\n{events}"
    );
}

#[test]
fn saves_the_way_editors_save_lose_nothing() {
    let (d, pid) = started();
    let file = d.source().join("alice.yaml");
    let text = session("alice");

    // Truncate, then the old content back 0.6 s later.
    std::fs::write(&file, "").expect("truncate");
    std::thread::sleep(Duration::from_millis(600));
    std::fs::write(&file, &text).expect("write");
    assert_nothing_lost(&d, &pid, "truncate then write");

    // Only a comment for 0.6 s.
    std::fs::write(&file, "# saving...\n").expect("comment");
    std::thread::sleep(Duration::from_millis(600));
    std::fs::write(&file, &text).expect("write");
    assert_nothing_lost(&d, &pid, "comment-only");

    // Written in place in small chunks, with pauses longer than the watcher's debounce.
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&file)
            .expect("open");
        for chunk in text.as_bytes().chunks(6) {
            f.write_all(chunk).expect("chunk");
            f.flush().expect("flush");
            std::thread::sleep(Duration::from_millis(150));
        }
    }
    assert_nothing_lost(&d, &pid, "write in place in chunks");

    // A new file renamed over the old one.
    d.write("alice.yaml", &text);
    assert_nothing_lost(&d, &pid, "rename over");

    // The old file moved away (a backup), the new one written 0.5 s later.
    std::fs::rename(&file, d.source().join("alice.yaml~")).expect("move away");
    std::thread::sleep(Duration::from_millis(500));
    std::fs::write(&file, &text).expect("write");
    assert_nothing_lost(&d, &pid, "move away then write");
}

#[test]
fn a_genuine_deletion_waits_for_the_settle_time_then_takes_effect() {
    let (d, pid) = started();
    let t0 = Instant::now();
    std::fs::remove_file(d.source().join("alice.yaml")).expect("rm");
    // While it settles, alice is held as she is and says so.
    std::thread::sleep(Duration::from_millis(1_000));
    assert_eq!(alice_pid(&d), pid, "held while the change settles");
    let plan = crate::status::json(d.status, "/plan?format=json");
    let held = plan["held"].to_string();
    assert!(held.contains("settling"), "status shows the hold: {held}");
    wait_for(LIMIT, || alice_pid(&d).is_empty()).expect("alice goes");
    let took = t0.elapsed();
    assert!(
        took >= SETTLE,
        "a deletion waits for the settle time: {took:?}"
    );
    assert!(
        took < SETTLE + Duration::from_secs(2),
        "and takes effect in the pass after it: {took:?}"
    );
    wait_for(LIMIT, || {
        d.get("alice.localhost", "/").is_some_and(|(c, _)| c == 404)
    })
    .expect("the route goes");
}

#[test]
fn a_destroyed_workspace_is_kept_restored_when_declared_again_and_gone_after_retention() {
    let (d, _) = started();
    let kept = d.state().join("retained/process/alice");
    std::fs::remove_file(d.source().join("alice.yaml")).expect("rm");
    wait_for(LIMIT, || alice_pid(&d).is_empty()).expect("alice goes");
    wait_for(LIMIT, || !d.state().join("sessions/alice").exists()).expect("her directory goes");
    assert_eq!(
        std::fs::read_to_string(kept.join("workspace/notes.md"))
            .ok()
            .as_deref(),
        Some("work in progress"),
        "her workspace is kept in the state directory"
    );
    // Status lists it from the next observation on.
    let mut status = serde_json::Value::Null;
    wait_for(LIMIT, || {
        status = crate::status::json(d.status, "/status");
        status["kept_workspaces"][0]["session"] == "alice"
    })
    .unwrap_or_else(|| panic!("status lists the kept workspace: {status}"));
    let listed = &status["kept_workspaces"];
    assert_eq!(listed[0]["provider"], "process");
    assert!(listed[0]["until"].is_string());

    // Declared again: she comes back with her work, and the kept copy is gone.
    d.write("alice.yaml", &session("alice"));
    wait_for(LIMIT, || {
        d.get("alice.localhost", "/notes.md")
            .is_some_and(|(c, b)| c == 200 && b == "work in progress")
    })
    .expect("alice serves her restored work");
    assert!(!kept.exists(), "the kept copy was used up");
}

#[test]
fn nothing_is_kept_past_the_retention_time() {
    let mut d = Daemon::new();
    d.edit_config(|c| {
        c.replace(
            "resync_interval: 1s",
            "resync_interval: 1s\n  workspace_retention: 3s",
        )
    });
    d.write("zed.yaml", &session("zed"));
    d.write("alice.yaml", &session("alice"));
    d.start();
    wait_for(LIMIT, || {
        d.get("alice.localhost", "/healthz")
            .is_some_and(|(c, _)| c == 200)
    })
    .expect("alice serves");
    let kept = d.state().join("retained/process/alice");
    std::fs::remove_file(d.source().join("alice.yaml")).expect("rm");
    wait_for(LIMIT, || kept.exists()).expect("her workspace is kept");
    let since = Instant::now();
    wait_for(LIMIT, || !kept.exists()).expect("and deleted once its time is up");
    assert!(
        since.elapsed() < Duration::from_secs(5),
        "{:?}",
        since.elapsed()
    );
}
