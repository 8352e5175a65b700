//! The docker compute provider against a real Podman engine (`podman_support`): containers
//! with limits and labels, HTTP through the embedded proxy, source sync without excludes,
//! save on stop, drift repaired through the events stream, a restarted vessel adopting its
//! containers, and containers vessel did not create left alone.
//!
//! Each test is its own vessel `instance` (the marker's value) with its own session names, so
//! tests sharing the engine never see each other's containers as theirs.

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::daemon_support::{Daemon, wait_for};
use crate::podman_support::{Cleanup, IMAGE, podman};
use crate::support::{text, vessel_in};

const PLAN: &str = "kind: Plan
name: web
compute: docker
image: localhost/busybox:test
command: [/bin/busybox, httpd, -f, -p, '{port.ide}', -h, '{workspace}']
cpus: 0.5
memory: 64MiB
ports: {ide: 8080}
stop_timeout: 2s
";

/// A unique prefix for this test's instance and session names.
fn unique(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{tag}{}x{}",
        std::process::id() % 100_000,
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// A daemon (not started) whose sessions are containers on the shared Podman, as `instance`.
fn docker_daemon(instance: &str, resync: &str) -> Daemon {
    let pod = podman();
    let d = Daemon::new();
    let config = format!(
        "source: {{dir: desired}}\nstate_dir: state\nproviders:\n  compute:\n    docker:\n      hosts: [{{name: local, endpoint: '{}'}}]\n      instance: {instance}\n  proxy:\n    embedded: {{listen: '{}'}}\nstatus: {{listen: '{}'}}\npolicy:\n  resync_interval: {resync}\n",
        pod.endpoint(),
        d.proxy,
        d.status
    );
    std::fs::write(d.dir.path().join("vessel.yaml"), config).expect("config");
    std::fs::write(d.source().join("plan.yaml"), PLAN).expect("plan");
    d
}

fn session_yaml(name: &str, extra: &str) -> String {
    format!("kind: Session\nname: {name}\nplan: web\n{extra}")
}

/// A project with an index page (`hello from <name>`) and a node_modules directory.
fn project(root: &Path, name: &str) -> std::path::PathBuf {
    let p = root.join(format!("proj-{name}"));
    std::fs::create_dir_all(p.join("node_modules/pkg")).expect("mkdir");
    std::fs::create_dir_all(p.join("src")).expect("mkdir");
    std::fs::write(p.join("index.html"), format!("hello from {name}\n")).expect("write");
    std::fs::write(p.join("src/app.js"), "v1\n").expect("write");
    std::fs::write(p.join("node_modules/pkg/index.js"), "dep\n").expect("write");
    p
}

fn serves(d: &Daemon, session: &str, path: &str, body: &str) -> bool {
    d.get(&format!("{session}.localhost"), path)
        .is_some_and(|(c, b)| c == 200 && b == body)
}

fn wait(limit_s: u64, what: &str, d: &Daemon, f: impl FnMut() -> bool) -> Duration {
    wait_for(Duration::from_secs(limit_s), f)
        .unwrap_or_else(|| panic!("{what} within {limit_s} s; vessel's log:\n{}", d.log()))
}

#[test]
fn docker_sessions_get_limits_labels_source_without_excludes_and_serve_through_the_proxy() {
    let pod = podman();
    let instance = unique("lim");
    let _cleanup = Cleanup {
        instance: instance.clone(),
        names: vec![],
    };
    let mut d = docker_daemon(&instance, "30s");
    let s = format!("{instance}a");
    let src = project(d.dir.path(), &s);
    d.write(
        &format!("{s}.yaml"),
        &session_yaml(
            &s,
            &format!(
                "source: {{path: {}, exclude: [node_modules]}}\n",
                src.display()
            ),
        ),
    );
    d.start();
    wait(
        30,
        "the session serves its project through the proxy",
        &d,
        || serves(&d, &s, "/index.html", &format!("hello from {s}\n")),
    );
    // The excluded directory never reached the container.
    assert_eq!(
        d.get(&format!("{s}.localhost"), "/node_modules/pkg/index.js")
            .map(|(c, _)| c),
        Some(404)
    );
    let ls = pod.cli(&[
        "exec",
        &format!("vessel-{s}"),
        "/bin/busybox",
        "ls",
        "/workspace",
    ]);
    assert!(
        ls.contains("index.html") && ls.contains("src") && !ls.contains("node_modules"),
        "{ls}"
    );
    let c = pod
        .inspect(&format!("vessel-{s}"))
        .expect("the container exists");
    assert_eq!(c.pointer("/HostConfig/Memory"), Some(&(64u64 << 20).into()));
    assert_eq!(
        c.pointer("/HostConfig/NanoCpus"),
        Some(&500_000_000u64.into())
    );
    let labels = c.pointer("/Config/Labels").expect("labels");
    assert_eq!(labels["vessel.managed-by"], instance.as_str());
    assert_eq!(labels["vessel.session"], s.as_str());
    assert_eq!(labels["vessel.host"], "local");
    assert_eq!(
        labels["vessel.fingerprint"].as_str().map(str::len),
        Some(16)
    );
    assert_eq!(
        c.pointer("/Config/Image").and_then(|v| v.as_str()),
        Some(IMAGE)
    );
    // The observed snapshot reports the session running on its host, once a pass has
    // observed it (the pass that made it observed it before its steps ran).
    let snapshot = || -> serde_json::Value {
        std::fs::read(d.state().join("observed.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    };
    wait(30, "the snapshot shows the session", &d, || {
        snapshot()["sessions"][&s]["state"] == "running"
    });
    let observed = snapshot();
    assert_eq!(observed["sessions"][&s]["host"], "local");
    assert_eq!(observed["sessions"][&s]["state"], "running");
}

#[test]
fn docker_save_on_stop_brings_the_work_back_and_keeps_the_container() {
    let pod = podman();
    let instance = unique("sav");
    let _cleanup = Cleanup {
        instance: instance.clone(),
        names: vec![],
    };
    let mut d = docker_daemon(&instance, "30s");
    let s = format!("{instance}a");
    let src = project(d.dir.path(), &s);
    let source = format!(
        "source: {{path: {}, exclude: [node_modules], save_on_stop: true}}\n",
        src.display()
    );
    d.write(&format!("{s}.yaml"), &session_yaml(&s, &source));
    d.start();
    wait(30, "the session serves", &d, || {
        serves(&d, &s, "/index.html", &format!("hello from {s}\n"))
    });
    let name = format!("vessel-{s}");
    pod.cli(&[
        "exec",
        &name,
        "/bin/busybox",
        "sh",
        "-c",
        "echo v2 > /workspace/src/app.js && echo made-inside > /workspace/new.txt && mkdir -p /workspace/node_modules/junk",
    ]);
    let id = pod
        .inspect(&name)
        .and_then(|c| c["Id"].as_str().map(str::to_string));
    d.write(
        &format!("{s}.yaml"),
        &session_yaml(&s, &format!("{source}state: stopped\n")),
    );
    wait(
        30,
        "the work is saved and the container stopped",
        &d,
        || {
            std::fs::read_to_string(src.join("new.txt")).is_ok_and(|t| t == "made-inside\n")
                && pod.state(&name).as_deref() == Some("exited")
        },
    );
    assert_eq!(
        std::fs::read_to_string(src.join("src/app.js")).expect("saved"),
        "v2\n"
    );
    // The project's own excluded entries stay; the container's are not copied back.
    assert!(src.join("node_modules/pkg/index.js").exists());
    assert!(!src.join("node_modules/junk").exists());
    // Stopped keeps the container and its data; running again starts the same one.
    let id2 = pod
        .inspect(&name)
        .and_then(|c| c["Id"].as_str().map(str::to_string));
    assert_eq!(id, id2);
    d.write(&format!("{s}.yaml"), &session_yaml(&s, &source));
    wait(30, "the session serves again", &d, || {
        serves(&d, &s, "/new.txt", "made-inside\n")
    });
}

#[test]
fn docker_drift_is_repaired_at_once_through_events() {
    let pod = podman();
    let instance = unique("dri");
    let _cleanup = Cleanup {
        instance: instance.clone(),
        names: vec![],
    };
    // A resync far away: only the events stream can make the repair fast.
    let mut d = docker_daemon(&instance, "10m");
    let s = format!("{instance}a");
    let src = project(d.dir.path(), &s);
    d.write(
        &format!("{s}.yaml"),
        &session_yaml(&s, &format!("source: {{path: {}}}\n", src.display())),
    );
    d.start();
    let body = format!("hello from {s}\n");
    wait(30, "the session serves", &d, || {
        serves(&d, &s, "/index.html", &body)
    });
    let name = format!("vessel-{s}");

    // Stopped by hand: started again.
    // vessel may start it again before the stop command has cleaned up after itself, which
    // the command then reports as an error: the stop itself did happen.
    if let Err(e) = pod.try_cli(&["stop", "-t", "0", &name]) {
        assert!(e.contains("refusing to clean up"), "{e}");
    }
    let took = wait(10, "a container stopped by hand runs again", &d, || {
        pod.state(&name).as_deref() == Some("running") && serves(&d, &s, "/index.html", &body)
    });
    eprintln!("stopped by hand: serving again after {took:?}");

    // Removed by hand: made again, its source synced in again.
    let before = pod
        .inspect(&name)
        .and_then(|c| c["Id"].as_str().map(str::to_string));
    pod.cli(&["rm", "-f", "-v", "-t", "0", &name]);
    let took = wait(10, "a container removed by hand is made again", &d, || {
        serves(&d, &s, "/index.html", &body)
    });
    eprintln!("removed by hand: serving again after {took:?}");
    let after = pod
        .inspect(&name)
        .and_then(|c| c["Id"].as_str().map(str::to_string));
    assert!(after.is_some() && after != before);
}

#[test]
fn docker_a_restarted_vessel_adopts_its_containers_without_duplicates() {
    let pod = podman();
    let instance = unique("rst");
    let _cleanup = Cleanup {
        instance: instance.clone(),
        names: vec![],
    };
    let mut d = docker_daemon(&instance, "1s");
    let names: Vec<String> = (0..3).map(|i| format!("{instance}s{i}")).collect();
    for n in &names {
        let src = project(d.dir.path(), n);
        d.write(
            &format!("{n}.yaml"),
            &session_yaml(n, &format!("source: {{path: {}}}\n", src.display())),
        );
    }
    d.start();
    for n in &names {
        wait(30, "every session serves", &d, || {
            serves(&d, n, "/index.html", &format!("hello from {n}\n"))
        });
    }
    let marker = format!("vessel.managed-by={instance}");
    let mut ids = pod.ids_with_label(&marker);
    ids.sort();
    assert_eq!(ids.len(), 3);
    assert_eq!(d.signal(nix::sys::signal::Signal::SIGTERM), Some(0));
    // Containers outlive vessel.
    assert_eq!(pod.ids_with_label(&marker).len(), 3);
    d.start();
    for n in &names {
        wait(30, "every session serves after the restart", &d, || {
            serves(&d, n, "/index.html", &format!("hello from {n}\n"))
        });
    }
    // A few passes later: the same three containers, nothing made again.
    std::thread::sleep(Duration::from_secs(3));
    let mut again = pod.ids_with_label(&marker);
    again.sort();
    assert_eq!(ids, again);
}

#[test]
fn docker_containers_vessel_did_not_create_are_never_touched() {
    let pod = podman();
    let instance = unique("frn");
    let taken = format!("{instance}taken");
    let forged = format!("{instance}forged");
    let other = format!("{instance}other");
    let _cleanup = Cleanup {
        instance: instance.clone(),
        names: vec![
            format!("vessel-{taken}"),
            format!("lookalike-{forged}"),
            format!("vessel-{other}"),
        ],
    };
    // In the way: a plain container with the name vessel would give a session.
    pod.cli(&[
        "run",
        "-d",
        "--name",
        &format!("vessel-{taken}"),
        IMAGE,
        "/bin/busybox",
        "sleep",
        "600",
    ]);
    // A session label and a similar name, but no marker.
    pod.cli(&[
        "run",
        "-d",
        "--name",
        &format!("lookalike-{forged}"),
        "--label",
        &format!("vessel.session={forged}"),
        IMAGE,
        "/bin/busybox",
        "sleep",
        "600",
    ]);
    // Another vessel instance's container.
    pod.cli(&[
        "run",
        "-d",
        "--name",
        &format!("vessel-{other}"),
        "--label",
        "vessel.managed-by=someone-else",
        "--label",
        &format!("vessel.session={other}"),
        IMAGE,
        "/bin/busybox",
        "sleep",
        "600",
    ]);
    let ids = |n: &str| {
        pod.inspect(n)
            .and_then(|c| c["Id"].as_str().map(str::to_string))
    };
    let before = [
        ids(&format!("vessel-{taken}")),
        ids(&format!("lookalike-{forged}")),
        ids(&format!("vessel-{other}")),
    ];
    let mut d = docker_daemon(&instance, "1s");
    let mine = format!("{instance}mine");
    for n in [&taken, &forged, &mine] {
        d.write(&format!("{n}.yaml"), &session_yaml(n, ""));
    }
    d.start();
    // Its own sessions are made, the forged label notwithstanding.
    wait(30, "its own sessions run", &d, || {
        pod.state(&format!("vessel-{mine}")).as_deref() == Some("running")
            && pod.state(&format!("vessel-{forged}")).as_deref() == Some("running")
    });
    // The one in the way is reported, and held.
    let out = vessel_in(
        d.dir.path(),
        &["plan", "vessel.yaml", "--observed", "state/observed.json"],
    );
    let plan = text(&out.stdout);
    assert!(
        plan.contains(&format!(
            "session {taken}: an object vessel does not own is in the way"
        )),
        "{plan}"
    );
    // The workspace volume of vessel's own session, which goes with it.
    let volumes: Vec<String> = pod
        .inspect(&format!("vessel-{forged}"))
        .and_then(|c| c["Mounts"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter(|m| m["Type"] == "volume")
        .filter_map(|m| m["Name"].as_str().map(str::to_string))
        .collect();
    assert!(!volumes.is_empty(), "the workspace is a volume");
    // Desired no longer: the forged one and the other instance's are not vessel's to destroy.
    for n in [&taken, &forged] {
        std::fs::remove_file(d.source().join(format!("{n}.yaml"))).expect("rm");
    }
    wait(
        30,
        "vessel's own forged-name session is destroyed",
        &d,
        || pod.state(&format!("vessel-{forged}")).is_none(),
    );
    // The destroy removes the container, then its volume: wait for the step to end.
    for v in &volumes {
        wait(
            30,
            "the destroyed session's volume is removed with it",
            &d,
            || pod.try_cli(&["volume", "exists", v]).is_err(),
        );
    }
    std::thread::sleep(Duration::from_secs(2));
    let after = [
        ids(&format!("vessel-{taken}")),
        ids(&format!("lookalike-{forged}")),
        ids(&format!("vessel-{other}")),
    ];
    assert_eq!(before, after, "foreign containers were touched");
    for n in [
        format!("vessel-{taken}"),
        format!("lookalike-{forged}"),
        format!("vessel-{other}"),
    ] {
        assert_eq!(pod.state(&n).as_deref(), Some("running"), "{n}");
    }
}

#[test]
fn docker_an_unreachable_engine_is_a_gap_with_no_creates() {
    let d = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(d.path().join("desired")).expect("mkdir");
    std::fs::write(d.path().join("desired/plan.yaml"), PLAN).expect("plan");
    std::fs::write(d.path().join("desired/a.yaml"), session_yaml("a", "")).expect("session");
    let sock = d.path().join("nothing-here.sock");
    std::fs::write(
        d.path().join("vessel.yaml"),
        format!(
            "source: {{dir: desired}}\nstate_dir: state\nproviders:\n  compute:\n    docker:\n      hosts: [{{name: gone, endpoint: 'unix://{}'}}]\n",
            sock.display()
        ),
    )
    .expect("config");
    let out = vessel_in(d.path(), &["plan", "vessel.yaml"]);
    let plan = text(&out.stdout);
    assert!(
        plan.contains("compute/docker could not be observed") && !plan.contains("create a"),
        "{plan}\n{}",
        text(&out.stderr)
    );
}

#[test]
fn docker_a_replace_and_a_destroy_keep_the_workspace_and_give_it_back() {
    let pod = podman();
    let instance = unique("kep");
    let _cleanup = Cleanup {
        instance: instance.clone(),
        names: vec![],
    };
    let mut d = docker_daemon(&instance, "30s");
    let s = format!("{instance}a");
    // Another session, so removing this one does not empty the source.
    d.write(&format!("{s}z.yaml"), &session_yaml(&format!("{s}z"), ""));
    d.write(&format!("{s}.yaml"), &session_yaml(&s, ""));
    d.start();
    let name = format!("vessel-{s}");
    wait(30, "the session runs", &d, || {
        pod.state(&name).as_deref() == Some("running")
    });
    pod.cli(&[
        "exec",
        &name,
        "/bin/busybox",
        "sh",
        "-c",
        "echo made-inside > /workspace/work.txt",
    ]);
    wait(30, "the work is served", &d, || {
        serves(&d, &s, "/work.txt", "made-inside\n")
    });
    let id = pod
        .inspect(&name)
        .and_then(|c| c["Id"].as_str().map(str::to_string));

    // A replace (a docker plan's memory changes a container): a new container, the same work.
    std::fs::write(
        d.source().join("plan.yaml"),
        PLAN.replace("memory: 64MiB", "memory: 96MiB"),
    )
    .expect("plan");
    wait(40, "the replaced session serves the same work", &d, || {
        let id2 = pod
            .inspect(&name)
            .and_then(|c| c["Id"].as_str().map(str::to_string));
        id2.is_some() && id2 != id && serves(&d, &s, "/work.txt", "made-inside\n")
    });
    assert!(
        d.log().contains("restored its kept workspace"),
        "{}",
        d.log()
    );

    // Destroyed: the workspace is kept in the state directory; declared again, it is back.
    std::fs::remove_file(d.source().join(format!("{s}.yaml"))).expect("rm");
    let kept = d.state().join(format!("retained/docker/{s}/workspace.tar"));
    wait(
        30,
        "the container goes and its workspace is kept",
        &d,
        || pod.inspect(&name).is_none() && kept.exists(),
    );
    d.write(&format!("{s}.yaml"), &session_yaml(&s, ""));
    wait(40, "the session comes back with its work", &d, || {
        serves(&d, &s, "/work.txt", "made-inside\n")
    });
    assert!(!kept.exists(), "the kept copy was used up");
}

/// Sleep at `depth` after 1 s idle, and a request wakes it (issue 15): the container is
/// paused (`pause`) or stopped (`stop`; started again it may publish its port elsewhere, and
/// the route follows), passes leave it asleep, and the woken container gives the right
/// answer.
fn docker_sleeps_and_wakes(depth: &str) {
    let pod = podman();
    let name = unique(&format!("nap{depth}"));
    let _cleanup = Cleanup {
        instance: name.clone(),
        names: vec![format!("vessel-{name}")],
    };
    let mut d = docker_daemon(&name, "1s");
    std::fs::write(
        d.source().join("plan.yaml"),
        format!("{PLAN}idle_timeout: 1s\nsleep: {depth}\n"),
    )
    .expect("plan");
    d.configure("lifecycle: {check_interval: 100ms}\n");
    let proj = project(d.dir.path(), &name);
    d.write(
        &format!("{name}.yaml"),
        &session_yaml(&name, &format!("source: {{path: '{}'}}\n", proj.display())),
    );
    d.start();
    let hello = format!("hello from {name}\n");
    wait(120, "the session serves", &d, || {
        serves(&d, &name, "/index.html", &hello)
    });
    let container = format!("vessel-{name}");
    let want = if depth == "pause" { "paused" } else { "exited" };
    wait(60, "the container sleeps", &d, || {
        pod.state(&container).as_deref() == Some(want)
    });
    let before = d.passes();
    wait(60, "passes go on", &d, || d.passes() >= before + 2);
    assert_eq!(
        pod.state(&container).as_deref(),
        Some(want),
        "a pass woke it; log:\n{}",
        d.log()
    );
    // The next request wakes it and gets the page.
    assert!(
        serves(&d, &name, "/index.html", &hello),
        "the woken session answers; log:\n{}",
        d.log()
    );
    assert_eq!(pod.state(&container).as_deref(), Some("running"));
}

#[test]
fn docker_pause_sleeps_and_a_request_wakes() {
    docker_sleeps_and_wakes("pause");
}

#[test]
fn docker_stop_sleeps_and_a_request_wakes() {
    docker_sleeps_and_wakes("stop");
}

#[test]
fn docker_restart_requested_restarts_the_container_once() {
    let pod = podman();
    let instance = unique("rst");
    let _cleanup = Cleanup {
        instance: instance.clone(),
        names: vec![],
    };
    // Resynced every second: later passes look again, and must leave it alone.
    let mut d = docker_daemon(&instance, "1s");
    let s = format!("{instance}a");
    let src = project(d.dir.path(), &s);
    let source = format!("source: {{path: {}}}\n", src.display());
    d.write(&format!("{s}.yaml"), &session_yaml(&s, &source));
    d.start();
    let body = format!("hello from {s}\n");
    wait(30, "the session serves", &d, || {
        serves(&d, &s, "/index.html", &body)
    });
    let name = format!("vessel-{s}");
    let started = || {
        pod.inspect(&name).and_then(|c| {
            Some((
                c["Id"].as_str()?.to_string(),
                c["State"]["StartedAt"].as_str()?.to_string(),
            ))
        })
    };
    let (id, first) = started().expect("inspect");
    std::thread::sleep(Duration::from_millis(1100));
    let at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    d.write(
        &format!("{s}.yaml"),
        &session_yaml(&s, &format!("{source}restart_requested: '{at}'\n")),
    );
    wait(30, "the container is started again", &d, || {
        started().is_some_and(|(i, t)| i == id && t != first)
            && serves(&d, &s, "/index.html", &body)
    });
    let object = format!("session {s}");
    let restarts = || {
        d.events()
            .lines()
            .filter(|l| l.contains("\"restart\"") && l.contains(&object))
            .count()
    };
    let (_, second) = started().expect("inspect");
    // Later passes leave it alone: once.
    let passes = d.passes();
    wait(10, "two more passes", &d, || d.passes() >= passes + 2);
    assert_eq!(started().map(|(_, t)| t), Some(second), "restarted once");
    assert_eq!(restarts(), 1, "{}", d.events());
}
