//! Sleep when idle, wake on the next request (issue 15), with real `vessel run` daemons and
//! real session processes: idle sleep within a second of the idle timeout, the right answer
//! from a woken session, one wake for 100 concurrent requests, a WebSocket through a wake,
//! `pause` and `stop` depths, a restart that wakes nothing, `stopped` never woken, and
//! `sleeping` made asleep.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::daemon_support::{Daemon, get, wait_for, websocket_echo};

const LIMIT: Duration = Duration::from_secs(60);

/// The default test plan, renamed, with an idle timeout and a sleep depth.
fn nap_plan(idle: &str, depth: &str) -> String {
    crate::daemon_support::PLAN.replace("name: web", "name: nap")
        + &format!("idle_timeout: {idle}\nsleep: {depth}\n")
}

fn session(name: &str, plan: &str, extra: &str) -> String {
    format!("kind: Session\nname: {name}\nplan: {plan}\n{extra}")
}

fn life(d: &Daemon, name: &str) -> Value {
    get(d.status, "status", &format!("/sessions/{name}"))
        .and_then(|(c, b)| (c == 200).then(|| serde_json::from_str::<Value>(&b).ok())?)
        .map(|v| v["lifecycle"].clone())
        .unwrap_or(Value::Null)
}

fn asleep(d: &Daemon, name: &str) -> bool {
    life(d, name)["state"] == "asleep"
}

fn ok(d: &Daemon, name: &str) -> bool {
    d.get(&format!("{name}.localhost"), "/healthz")
        .is_some_and(|(c, _)| c == 200)
}

/// The process state letter (`S`, `R`, `T` for stopped by a signal) of `pid`.
fn proc_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')').next()?.trim_start().chars().next()
}

fn pid_of(d: &Daemon, name: &str) -> Option<i32> {
    d.processes()
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, p)| p)
}

fn started(idle: &str, depth: &str, sessions: &[(&str, &str)]) -> Daemon {
    let mut d = Daemon::new();
    d.write("nap.yaml", &nap_plan(idle, depth));
    for (name, extra) in sessions {
        d.write(&format!("{name}.yaml"), &session(name, "nap", extra));
    }
    d.configure("lifecycle: {check_interval: 100ms}\n");
    d.start();
    d
}

fn millis(v: &Value) -> i64 {
    v.as_str()
        .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.timestamp_millis())
        .unwrap_or(0)
}

#[test]
fn an_idle_session_sleeps_on_time_and_the_next_request_wakes_it_with_the_right_answer() {
    let d = started("2s", "stop", &[("alice", "")]);
    wait_for(LIMIT, || ok(&d, "alice"))
        .unwrap_or_else(|| panic!("alice does not answer; log:\n{}", d.log()));
    std::fs::write(
        d.state().join("sessions/alice/workspace/hello.txt"),
        "alice's work\n",
    )
    .expect("write into the workspace");
    assert_eq!(
        d.get("alice.localhost", "/hello.txt"),
        Some((200, "alice's work\n".to_string()))
    );
    wait_for(LIMIT, || asleep(&d, "alice")).unwrap_or_else(|| {
        panic!(
            "alice never sleeps: {}; log:\n{}",
            life(&d, "alice"),
            d.log()
        )
    });
    // Between the idle timeout and a second past it, counted from her last request.
    let l = life(&d, "alice");
    let idle_ms = millis(&l["asleep_since"]) - millis(&l["last_activity"]);
    assert!(
        (2_000..=3_100).contains(&idle_ms),
        "asleep {idle_ms} ms after the last request: {l}"
    );
    assert_eq!(l["sleep_reason"], "idle", "{l}");
    // Depth `stop`: nothing of hers runs.
    wait_for(Duration::from_secs(10), || pid_of(&d, "alice").is_none())
        .expect("her processes are gone");
    // Asleep is converged: passes go on and leave her asleep.
    let before = d.passes();
    wait_for(LIMIT, || d.passes() >= before + 2).expect("passes go on");
    assert!(asleep(&d, "alice") && pid_of(&d, "alice").is_none());
    let st: Value = get(d.status, "status", "/status")
        .and_then(|(_, b)| serde_json::from_str(&b).ok())
        .expect("status");
    assert_eq!(st["converged"], true, "{st}");
    assert_eq!(st["lifecycle"]["asleep"], 1, "{st}");
    // The status page says so too.
    let page = get(d.status, "status", "/").expect("the page").1;
    assert!(page.contains("asleep (idle) since"), "{page}");
    // The next request gets the right answer, not an error page, and the work is there.
    let t = Instant::now();
    assert_eq!(
        d.get("alice.localhost", "/hello.txt"),
        Some((200, "alice's work\n".to_string())),
        "log:\n{}",
        d.log()
    );
    let took = t.elapsed();
    let l = life(&d, "alice");
    assert_eq!(l["state"], "awake", "{l}");
    assert_eq!(l["wakes"], 1, "{l}");
    assert!(pid_of(&d, "alice").is_some());
    eprintln!("woken from stop in {took:?}");
    let metrics = get(d.status, "status", "/metrics").expect("metrics").1;
    for m in [
        "vessel_wakes_total 1",
        "vessel_sleeps_total{reason=\"idle\"} 1",
        "vessel_wake_duration_seconds_count 1",
        "vessel_held_requests 0",
        "vessel_rejected_requests_total{reason=\"wake_timeout\"} 0",
    ] {
        assert!(metrics.contains(m), "{m} in:\n{metrics}");
    }
}

#[test]
fn pause_keeps_the_process_stopped_in_memory_and_100_concurrent_requests_make_one_wake() {
    let d = started("1s", "pause", &[("bob", "")]);
    wait_for(LIMIT, || ok(&d, "bob"))
        .unwrap_or_else(|| panic!("bob does not answer; log:\n{}", d.log()));
    let pid = pid_of(&d, "bob").expect("bob runs");
    wait_for(LIMIT, || asleep(&d, "bob"))
        .unwrap_or_else(|| panic!("bob never sleeps; log:\n{}", d.log()));
    // Paused: the same process, stopped by a signal.
    wait_for(Duration::from_secs(5), || proc_state(pid) == Some('T'))
        .unwrap_or_else(|| panic!("bob is not paused: {:?}", proc_state(pid)));
    let before = d.passes();
    wait_for(LIMIT, || d.passes() >= before + 2).expect("passes go on");
    assert_eq!(proc_state(pid), Some('T'), "a pass woke him");
    // 100 at once: every one answered right, one wake.
    let proxy = d.proxy;
    let answers: Vec<Option<(u16, String)>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..100)
            .map(|_| s.spawn(move || get(proxy, "bob.localhost", "/healthz")))
            .collect();
        hs.into_iter().map(|h| h.join().ok().flatten()).collect()
    });
    let good = answers
        .iter()
        .filter(|a| a.as_ref().is_some_and(|(c, _)| *c == 200))
        .count();
    assert_eq!(good, 100, "{answers:?}");
    assert_eq!(pid_of(&d, "bob"), Some(pid), "the same process, resumed");
    assert_ne!(proc_state(pid), Some('T'));
    let l = life(&d, "bob");
    assert_eq!(l["wakes"], 1, "{l}");
    assert!(l["last_wake_ms"].as_u64().is_some(), "{l}");
}

#[test]
fn a_websocket_to_a_sleeping_session_wakes_it_and_works() {
    let d = started("1s", "stop", &[("carol", "")]);
    wait_for(LIMIT, || ok(&d, "carol"))
        .unwrap_or_else(|| panic!("carol does not answer; log:\n{}", d.log()));
    wait_for(LIMIT, || asleep(&d, "carol"))
        .unwrap_or_else(|| panic!("carol never sleeps; log:\n{}", d.log()));
    websocket_echo(d.proxy, "carol.localhost");
    assert_eq!(life(&d, "carol")["wakes"], 1);
}

#[test]
fn a_restart_wakes_nothing_asleep_and_a_session_killed_awake_is_restarted() {
    let mut d = Daemon::new();
    d.write("nap.yaml", &nap_plan("1s", "stop"));
    d.write(
        "pause.yaml",
        &crate::daemon_support::PLAN
            .replace("name: web", "name: doze")
            .replace(
                "stop_timeout: 3s\n",
                "stop_timeout: 3s\nidle_timeout: 1s\nsleep: pause\n",
            ),
    );
    d.write("dan.yaml", &session("dan", "nap", ""));
    d.write("eve.yaml", &session("eve", "doze", ""));
    // Erin never sleeps (no idle timeout).
    d.write("erin.yaml", &session("erin", "web", ""));
    d.configure("lifecycle: {check_interval: 100ms}\n");
    d.start();
    wait_for(LIMIT, || {
        ok(&d, "erin") && asleep(&d, "dan") && asleep(&d, "eve")
    })
    .unwrap_or_else(|| panic!("not all settled; log:\n{}", d.log()));
    let eve = pid_of(&d, "eve").expect("eve is paused, not gone");
    wait_for(Duration::from_secs(5), || proc_state(eve) == Some('T')).expect("eve paused");
    // vessel goes away (sessions are kept on exit) and comes back.
    d.signal(nix::sys::signal::Signal::SIGTERM);
    d.start();
    let before = d.passes();
    wait_for(LIMIT, || d.passes() >= before + 3).expect("passes after the restart");
    assert!(asleep(&d, "dan") && asleep(&d, "eve"), "{}", d.log());
    assert!(pid_of(&d, "dan").is_none(), "dan was woken by the restart");
    assert_eq!(proc_state(eve), Some('T'), "eve was woken by the restart");
    // A crash while awake is repaired at once.
    let erin = pid_of(&d, "erin").expect("erin runs");
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(erin),
        nix::sys::signal::Signal::SIGKILL,
    );
    wait_for(LIMIT, || {
        pid_of(&d, "erin").is_some_and(|p| p != erin) && ok(&d, "erin")
    })
    .unwrap_or_else(|| panic!("erin is not repaired; log:\n{}", d.log()));
    // And the sleepers still wake on a request.
    assert!(ok(&d, "dan") && ok(&d, "eve"), "{}", d.log());
}

#[test]
fn stopped_is_never_woken_and_sleeping_is_made_asleep_until_the_first_request() {
    let d = started(
        "1s",
        "stop",
        &[("fay", "state: stopped\n"), ("gus", "state: sleeping\n")],
    );
    // gus is made, asleep: no process until a request.
    wait_for(LIMIT, || asleep(&d, "gus")).unwrap_or_else(|| {
        panic!(
            "gus is not made asleep: {}; log:\n{}",
            life(&d, "gus"),
            d.log()
        )
    });
    assert!(pid_of(&d, "gus").is_none());
    assert_eq!(life(&d, "gus")["sleep_reason"], "declared");
    assert!(ok(&d, "gus"), "{}", d.log());
    assert!(pid_of(&d, "gus").is_some());
    // ...and asleep again when idle.
    wait_for(LIMIT, || asleep(&d, "gus")).expect("gus sleeps again");
    // fay's routes never wake her: they answer a page that says she is stopped.
    for host in ["fay.localhost", "8080-fay.localhost"] {
        let (code, body) = d.get(host, "/healthz").expect("an answer");
        assert_eq!(code, 503, "{body}");
        assert!(body.contains("Session stopped"), "{body}");
        assert!(body.contains("fay"), "{body}");
    }
    // A host nobody declared is still "no session here".
    assert_eq!(d.get("nobody.localhost", "/").map(|(c, _)| c), Some(404));
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        pid_of(&d, "fay").is_none(),
        "a request woke a stopped session"
    );
}

/// alice runs and bob is declared sleeping, on `plan`, under `config` and `process` (the
/// process provider's extra fields); then a request for bob: alice goes to sleep for him
/// (reason `cap`), he wakes and answers.
fn bob_wakes_for_alice(plan: &str, config: &str, process: &str) -> Daemon {
    let mut d = Daemon::new();
    d.write("nap.yaml", plan);
    d.write("alice.yaml", &session("alice", "nap", ""));
    d.write("bob.yaml", &session("bob", "nap", "state: sleeping\n"));
    d.configure(&format!("lifecycle: {{check_interval: 100ms}}\n{config}"));
    if !process.is_empty() {
        d.set_process_config(process);
    }
    d.start();
    wait_for(LIMIT, || ok(&d, "alice") && asleep(&d, "bob"))
        .unwrap_or_else(|| panic!("not settled; log:\n{}", d.log()));
    assert!(ok(&d, "bob"), "{}", d.log());
    let l = life(&d, "alice");
    assert_eq!(l["state"], "asleep", "{l}");
    assert_eq!(l["sleep_reason"], "cap", "{l}");
    assert!(pid_of(&d, "alice").is_none());
    d
}

#[test]
fn a_wake_at_the_cap_puts_the_least_recently_active_to_sleep_or_says_the_platform_is_full() {
    // One session may run. alice runs (and can sleep); bob is declared sleeping.
    let d = bob_wakes_for_alice(&nap_plan("1h", "stop"), "limits: {max_running: 1}\n", "");
    let metrics = get(d.status, "status", "/metrics").expect("metrics").1;
    assert!(
        metrics.contains("vessel_sleeps_total{reason=\"cap\"} 1"),
        "{metrics}"
    );

    // carol never sleeps (no idle timeout) and holds the one place: gus cannot wake.
    let mut d = Daemon::new();
    d.write("nap.yaml", &nap_plan("1h", "stop"));
    d.write("carol.yaml", &session("carol", "web", ""));
    d.write("gus.yaml", &session("gus", "nap", "state: sleeping\n"));
    d.configure("lifecycle: {check_interval: 100ms}\nlimits: {max_running: 1}\n");
    d.start();
    wait_for(LIMIT, || ok(&d, "carol") && asleep(&d, "gus"))
        .unwrap_or_else(|| panic!("not settled; log:\n{}", d.log()));
    let (code, body) = d.get("gus.localhost", "/healthz").expect("an answer");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("The platform is full"), "{body}");
    assert!(ok(&d, "carol"));
    assert!(pid_of(&d, "gus").is_none());
}

/// A GET as a browser's navigation (`Accept: text/html`): the status and body.
fn navigate(d: &Daemon, host: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&d.proxy, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET / HTTP/1.0\r\nHost: {host}\r\nAccept: text/html,application/xhtml+xml\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    Some((buf.get(9..12)?.parse().ok()?, buf))
}

#[test]
fn a_slow_wake_shows_its_held_requests_and_a_route_may_choose_the_waking_page() {
    // A session that takes 2 s to start answering, declared sleeping; one explicit route of
    // it asks for the waking page (the config does not).
    let mut d = Daemon::new();
    d.write(
        "slow.yaml",
        "kind: Plan\nname: slow\ncommand: ['/bin/sh', '-c', 'sleep 2; exec {vessel} devserver --listen 127.0.0.1:{port.ide} --root {workspace}']\nports: {ide: 8080}\nhealth: {port: ide, path: /healthz}\nidle_timeout: 1h\nsleep: stop\nstop_timeout: 2s\n",
    );
    d.write("hal.yaml", &session("hal", "slow", "state: sleeping\n"));
    d.write(
        "hal-page.yaml",
        "kind: Route\nname: hal-page\nhost: page-hal.localhost\nsession: hal\nport: ide\nwaking_page: true\n",
    );
    d.configure("lifecycle: {check_interval: 100ms}\n");
    d.start();
    wait_for(LIMIT, || asleep(&d, "hal")).unwrap_or_else(|| {
        panic!(
            "hal is not made asleep: {}; log:\n{}",
            life(&d, "hal"),
            d.log()
        )
    });
    let proxy = d.proxy;
    std::thread::scope(|s| {
        let held: Vec<_> = (0..5)
            .map(|_| s.spawn(move || get(proxy, "hal.localhost", "/healthz")))
            .collect();
        // While it wakes, status says how many requests wait for it.
        let seen = wait_for(Duration::from_secs(5), || {
            life(&d, "hal")["held_requests"] == 5
        });
        assert!(
            seen.is_some(),
            "held requests not shown: {}",
            life(&d, "hal")
        );
        assert_eq!(life(&d, "hal")["state"], "waking");
        // The route that asks for the waking page gives a navigation that page at once.
        let t = Instant::now();
        let (code, body) = navigate(&d, "page-hal.localhost").expect("an answer");
        assert_eq!(code, 503, "{body}");
        assert!(
            body.contains("Waking up") && body.contains("location.reload"),
            "{body}"
        );
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        for h in held {
            let r = h.join().expect("thread");
            assert_eq!(r.as_ref().map(|(c, _)| *c), Some(200), "{r:?}");
        }
    });
    assert_eq!(life(&d, "hal")["held_requests"], 0);
    // A navigation on a route without its own choice waits for the answer (the config's
    // default), now that hal is awake: the session's own page.
    let (code, _) = navigate(&d, "hal.localhost").expect("an answer");
    assert_eq!(code, 200);
}

#[test]
fn a_wake_past_its_hosts_memory_puts_the_least_recently_active_to_sleep_at_depth_stop() {
    // The machine holds 1Gi for sessions; each asks for 768Mi. alice runs; bob is declared
    // sleeping (made, asleep). A request for bob: alice is put to sleep (stopped: a pause would
    // keep her memory) and bob wakes.
    let d = bob_wakes_for_alice(
        &(nap_plan("1h", "stop") + "memory: 768Mi\n"),
        "",
        "capacity: {memory: 1Gi}",
    );
    // And alice, asked for now, takes the room back from bob.
    assert!(ok(&d, "alice"), "{}", d.log());
    assert_eq!(life(&d, "bob")["state"], "asleep");
}
