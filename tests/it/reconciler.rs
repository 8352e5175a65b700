//! The reconciler on the embedded default, end to end: `vessel run` as a process, real
//! session processes, real HTTP through the embedded proxy.

use std::time::Duration;

use nix::sys::signal::Signal;

use crate::daemon_support::{Daemon, dir_names, session, wait_for};

const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn a_dropped_session_serves_then_edits_update_and_deletion_cleans_up() {
    let mut d = Daemon::new();
    // A second session, so deleting alice does not leave an empty source (which the
    // empty-source guard would hold).
    d.write("zed.yaml", &session("zed"));
    d.start();
    let project = d.dir.path().join("project");
    std::fs::create_dir_all(project.join("node_modules/dep")).expect("mkdir");
    std::fs::write(project.join("index.html"), "<h1>alice's project</h1>").expect("write");
    std::fs::write(project.join("node_modules/dep/x.js"), "dep").expect("write");
    let alice = format!(
        "kind: Session\nname: alice\nplan: web\nsource: {{path: {}, exclude: [node_modules], save_on_stop: true}}\n",
        project.display()
    );
    d.write("alice.yaml", &alice);
    wait_for(LIMIT, || {
        d.get("alice.localhost", "/")
            .is_some_and(|(c, b)| c == 200 && b.contains("alice's project"))
    })
    .expect("alice serves her project");
    assert_eq!(
        d.get("5173-alice.localhost", "/healthz").map(|r| r.0),
        Some(200),
        "the app port serves too"
    );
    let ws = d.state().join("sessions/alice/workspace");
    assert!(
        ws.join("index.html").exists() && !ws.join("node_modules").exists(),
        "the source is copied without excludes"
    );

    // Editing the session (its environment) replaces it: new process, new port, route updated.
    let alice_procs = |d: &Daemon| {
        d.processes()
            .into_iter()
            .filter(|(n, _)| n == "alice")
            .collect::<Vec<_>>()
    };
    let first_pid = alice_procs(&d);
    d.write("alice.yaml", &format!("{alice}env: {{GREETING: hi}}\n"));
    wait_for(LIMIT, || {
        let p = alice_procs(&d);
        !p.is_empty()
            && p != first_pid
            && d.get("alice.localhost", "/healthz")
                .is_some_and(|(c, _)| c == 200)
    })
    .expect("the edited session replaces the old one and serves");
    assert_eq!(
        alice_procs(&d).len(),
        1,
        "one process for alice: {:?}",
        d.processes()
    );

    // Work happens in the workspace; deleting the file saves it, then removes everything.
    let ws = d.state().join("sessions/alice/workspace");
    wait_for(LIMIT, || ws.join("index.html").exists()).expect("the new workspace has the project");
    std::fs::write(ws.join("notes.md"), "work in progress").expect("work");
    std::fs::remove_file(d.source().join("alice.yaml")).expect("rm");
    wait_for(LIMIT, || {
        d.get("alice.localhost", "/").is_some_and(|(c, _)| c == 404)
    })
    .expect("the route goes");
    wait_for(LIMIT, || alice_procs(&d).is_empty()).expect("the process goes");
    wait_for(LIMIT, || dir_names(&d.state().join("sessions")) == ["zed"])
        .expect("the workspace goes");
    assert_eq!(
        std::fs::read_to_string(project.join("notes.md"))
            .ok()
            .as_deref(),
        Some("work in progress"),
        "work saved first"
    );
    assert!(
        project.join("node_modules/dep/x.js").exists(),
        "the project's excluded files are kept"
    );
    assert_eq!(d.signal(Signal::SIGTERM), Some(0), "SIGTERM exits 0");
}

#[test]
fn a_killed_session_is_repaired() {
    let mut d = Daemon::new();
    d.write("bob.yaml", &session("bob"));
    d.start();
    wait_for(LIMIT, || {
        d.get("bob.localhost", "/healthz")
            .is_some_and(|(c, _)| c == 200)
    })
    .expect("bob serves");
    let before = d.processes();
    assert_eq!(before.len(), 1);
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(before[0].1), Signal::SIGKILL);
    wait_for(LIMIT, || {
        let now = d.processes();
        now.len() == 1
            && now != before
            && d.get("bob.localhost", "/healthz")
                .is_some_and(|(c, _)| c == 200)
    })
    .expect("the next pass starts bob again");
}

#[test]
fn sigkill_mid_apply_and_restart_leaves_no_duplicates_or_orphans() {
    let mut d = Daemon::new();
    let names: Vec<String> = (0..6).map(|i| format!("s{i}")).collect();
    for n in &names {
        d.write(&format!("{n}.yaml"), &session(n));
    }
    d.start();
    // Kill it as soon as the first session process appears: mid-apply.
    wait_for(LIMIT, || !d.processes().is_empty()).expect("the apply starts");
    assert_eq!(d.signal(Signal::SIGKILL), None);
    d.start();
    wait_for(LIMIT, || {
        names.iter().all(|n| {
            d.get(&format!("{n}.localhost"), "/healthz")
                .is_some_and(|(c, _)| c == 200)
        })
    })
    .expect("every session serves after the restart");
    // Let a resync pass or two run, then count.
    std::thread::sleep(Duration::from_millis(1500));
    let procs: Vec<String> = d.processes().into_iter().map(|(n, _)| n).collect();
    assert_eq!(procs, names, "exactly one process per session");
    assert_eq!(
        dir_names(&d.state().join("sessions")),
        names,
        "no orphaned or half-made workspaces"
    );
}

#[test]
fn a_broken_file_leaves_running_sessions_untouched_and_says_so() {
    let mut d = Daemon::new();
    d.write("carol.yaml", &session("carol"));
    d.write("dave.yaml", &session("dave"));
    d.start();
    wait_for(LIMIT, || {
        ["carol", "dave"].iter().all(|n| {
            d.get(&format!("{n}.localhost"), "/healthz")
                .is_some_and(|(c, _)| c == 200)
        })
    })
    .expect("both serve");
    let before = d.processes();
    // carol's own file breaks, and a broken file is dropped in.
    d.write("carol.yaml", "kind: Session\nname: carol\nplan: [web\n");
    d.write("broken.yaml", "kind: Sesion\nname: eve\n");
    wait_for(LIMIT, || {
        d.log().contains("carol.yaml") && d.log().contains("broken.yaml")
    })
    .expect("the errors show in the log");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(d.processes(), before, "no session was touched");
    assert_eq!(d.get("carol.localhost", "/healthz").map(|r| r.0), Some(200));
    assert_eq!(d.get("dave.localhost", "/healthz").map(|r| r.0), Some(200));
}

#[test]
fn a_websocket_echo_goes_through_the_proxy() {
    let mut d = Daemon::new();
    d.write("wes.yaml", &session("wes"));
    d.start();
    wait_for(LIMIT, || {
        d.get("wes.localhost", "/healthz")
            .is_some_and(|(c, _)| c == 200)
    })
    .expect("wes serves");
    let before = d.get("wes.localhost", "/healthz").map(|r| r.0);
    assert_eq!(before, Some(200));
    crate::daemon_support::websocket_echo(d.proxy, "wes.localhost");
}

#[test]
fn a_second_daemon_on_the_same_state_directory_is_refused() {
    let mut d = Daemon::new();
    d.start();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vessel"))
        .args(["run", "vessel.yaml", "--listen", "127.0.0.1:0"])
        .current_dir(d.dir.path())
        .env("NO_COLOR", "1")
        .output()
        .expect("vessel runs");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another vessel (pid"), "{err}");
}

#[test]
fn an_expired_session_is_stopped_by_the_timer_and_the_plan_says_why() {
    let mut d = Daemon::new();
    d.write("keep.yaml", &session("keep"));
    let at = chrono::Utc::now() + chrono::Duration::seconds(3);
    d.write(
        "exp.yaml",
        &format!(
            "kind: Session\nname: exp\nplan: web\nexpires: {}\n",
            at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        ),
    );
    d.start();
    wait_for(LIMIT, || {
        d.get("exp.localhost", "/healthz")
            .is_some_and(|(c, _)| c == 200)
    })
    .expect("exp serves until it expires");
    wait_for(LIMIT, || d.processes().iter().all(|(n, _)| n != "exp"))
        .expect("exp is stopped after its expiry");
    assert_eq!(
        d.get("exp.localhost", "/healthz").map(|r| r.0),
        Some(404),
        "its routes go"
    );
    assert!(
        d.state().join("sessions/exp/workspace").exists(),
        "stopped, not destroyed: its data is kept"
    );
    // Events are recorded when the pass ends, a moment after the process is gone.
    let events = || std::fs::read_to_string(d.state().join("events.jsonl")).unwrap_or_default();
    wait_for(LIMIT, || {
        events()
            .lines()
            .any(|l| l.contains("\"stop\"") && l.contains("session exp"))
    })
    .unwrap_or_else(|| panic!("no stop event: {}", events()));
    let record =
        || std::fs::read_to_string(d.state().join("sessions/exp/session.json")).unwrap_or_default();
    wait_for(LIMIT, || record().contains("\"intent\": \"stopped\""))
        .unwrap_or_else(|| panic!("{}", record()));
}

#[test]
fn plan_against_the_live_providers_and_the_daemons_snapshot() {
    let mut d = Daemon::new();
    d.write("pia.yaml", &session("pia"));
    d.start();
    wait_for(LIMIT, || {
        d.get("pia.localhost", "/healthz")
            .is_some_and(|(c, _)| c == 200)
    })
    .expect("pia serves");
    std::thread::sleep(Duration::from_millis(300));
    let dir = d.dir.path().to_path_buf();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_vessel"))
            .args(args)
            .current_dir(&dir)
            .env("NO_COLOR", "1")
            .output()
            .expect("vessel")
    };
    // Live: sessions are observed; the embedded proxy lives in the daemon, so it is a gap and
    // no route step is planned.
    let out = run(&["plan", "vessel.yaml"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("proxy: ") && text.contains("inside `vessel run`"),
        "{text}"
    );
    // Against the daemon's snapshot: the world matches.
    let out = run(&["plan", "vessel.yaml", "--observed", "state/observed.json"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("No changes."), "{text}");
    // A new file is a change (exit 2). The daemon is stopped first: it would create the
    // session and write a snapshot with it, racing the plan.
    assert_eq!(d.signal(Signal::SIGTERM), Some(0));
    std::fs::write(d.source().join("quin.yaml"), session("quin")).expect("write");
    let out = run(&["plan", "vessel.yaml", "--observed", "state/observed.json"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stdout).contains("+ session quin"));
}

#[test]
fn an_idle_daemon_does_not_reconcile_in_a_loop() {
    let mut d = Daemon::new();
    d.write("ida.yaml", &session("ida"));
    d.start();
    wait_for(LIMIT, || {
        d.get("ida.localhost", "/healthz")
            .is_some_and(|(c, _)| c == 200)
    })
    .expect("ida serves");
    // Passes read every file; reading must not count as a change (resync here is 1 s).
    std::thread::sleep(Duration::from_millis(1500));
    let source_passes = d
        .log()
        .lines()
        .filter(|l| l.contains("trigger=source"))
        .count();
    assert_eq!(source_passes, 0, "{}", d.log());
    // Every line of a pass is in its span, `pass{n=N trigger=...}`: count the passes.
    let total = d
        .log()
        .lines()
        .filter_map(|l| {
            l.split("pass{n=")
                .nth(1)?
                .split(' ')
                .next()
                .map(str::to_string)
        })
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    assert!(
        total <= 8,
        "{total} passes in 1.5 s of idling:\n{}",
        d.log()
    );
}

#[test]
fn stopping_leaves_no_stray_and_a_restart_runs_the_real_command() {
    let mut d = Daemon::new();
    // A command that leaves a child behind which ignores SIGTERM.
    let stray_plan = "kind: Plan\nname: stray\ncommand: [sh, -c, \"sh -c 'trap \\\"\\\" TERM; exec sleep 600' & exec \\\"$0\\\" devserver --listen 127.0.0.1:$PORT_IDE --root .\", '{vessel}']\nports: {ide: 8080}\nhealth: {port: ide, path: /healthz}\nstop_timeout: 1s\n";
    d.write("stray-plan.yaml", stray_plan);
    d.write("keep.yaml", &session("keep"));
    d.write("sam.yaml", "kind: Session\nname: sam\nplan: stray\n");
    d.start();
    wait_for(LIMIT, || {
        d.get("sam.localhost", "/healthz")
            .is_some_and(|(c, _)| c == 200)
    })
    .unwrap_or_else(|| panic!("sam serves: {}", d.log()));
    let sam = |d: &Daemon| {
        d.processes()
            .into_iter()
            .filter(|(n, _)| n == "sam")
            .count()
    };
    assert!(sam(&d) >= 2, "sam runs a server and a stray");
    d.write(
        "sam.yaml",
        "kind: Session\nname: sam\nplan: stray\nstate: stopped\n",
    );
    wait_for(LIMIT, || sam(&d) == 0).unwrap_or_else(|| {
        panic!(
            "every process of sam is gone after a stop: {:?}",
            d.processes()
        )
    });
    d.write("sam.yaml", "kind: Session\nname: sam\nplan: stray\n");
    wait_for(LIMIT, || {
        d.get("sam.localhost", "/healthz")
            .is_some_and(|(c, _)| c == 200)
    })
    .expect("a restart runs the real command again");
}

#[test]
fn a_source_path_through_a_symlink_is_refused_and_a_bad_record_holds_only_its_session() {
    let mut d = Daemon::new();
    let real = d.dir.path().join("elsewhere");
    std::fs::create_dir_all(&real).expect("mkdir");
    std::fs::write(real.join("secret.txt"), "not for alice").expect("write");
    let link = d.dir.path().join("projects-link");
    std::os::unix::fs::symlink(&real, &link).expect("symlink");
    d.write("keep.yaml", &session("keep"));
    d.write(
        "alice.yaml",
        &format!(
            "kind: Session\nname: alice\nplan: web\nsource: {{path: {}}}\n",
            link.display()
        ),
    );
    d.start();
    wait_for(LIMIT, || d.log().contains("resolves through a symlink"))
        .unwrap_or_else(|| panic!("{}", d.log()));
    assert!(
        !d.state()
            .join("sessions/alice/workspace/secret.txt")
            .exists(),
        "nothing was copied through the link"
    );

    // An unreadable record: that session is held as it is; the others are still repaired.
    wait_for(LIMIT, || {
        d.get("keep.localhost", "/healthz")
            .is_some_and(|(c, _)| c == 200)
    })
    .expect("keep serves");
    std::fs::write(d.state().join("sessions/alice/session.json"), "{ not json").expect("corrupt");
    let keep_pid = d
        .processes()
        .into_iter()
        .find(|(n, _)| n == "keep")
        .map(|(_, p)| p)
        .expect("keep runs");
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(keep_pid), Signal::SIGKILL);
    wait_for(LIMIT, || {
        d.processes()
            .iter()
            .any(|(n, p)| n == "keep" && *p != keep_pid)
            && d.get("keep.localhost", "/healthz")
                .is_some_and(|(c, _)| c == 200)
    })
    .expect("keep is repaired while alice's record is unreadable");
    assert!(
        d.state().join("sessions/alice").exists(),
        "alice is held, not destroyed"
    );
}

#[test]
fn a_second_signal_exits_at_once_while_a_step_is_in_flight() {
    let mut d = Daemon::new();
    // A health check that never passes keeps a step in flight.
    d.write(
        "plan.yaml",
        "kind: Plan\nname: web\ncommand: [sleep, '60']\nports: {ide: 8080}\nhealth: {port: ide, path: /healthz}\nstop_timeout: 1s\n",
    );
    d.write("slow.yaml", &session("slow"));
    d.start();
    wait_for(LIMIT, || d.log().contains("action=create"))
        .unwrap_or_else(|| panic!("the session is created: {}", d.log()));
    std::thread::sleep(Duration::from_millis(300));
    let child = d.child.as_ref().expect("running").id() as i32;
    let pid = nix::unistd::Pid::from_raw(child);
    nix::sys::signal::kill(pid, Signal::SIGTERM).expect("signal");
    std::thread::sleep(Duration::from_millis(500));
    let still_running = d
        .child
        .as_mut()
        .and_then(|c| c.try_wait().ok())
        .is_some_and(|s| s.is_none());
    assert!(
        still_running,
        "the first signal waits for the step in flight: {}",
        d.log()
    );
    assert_eq!(d.signal(Signal::SIGINT), Some(130), "{}", d.log());
    assert!(d.log().contains("second signal"), "{}", d.log());
}
