//! Wake on request (issue 15), against a running daemon (release binary), side by side with
//! the floor measured in the same run:
//!
//! - process, `stop`: 20 wakes (a request to an asleep session until its answer), next to 20
//!   starts of the same command by hand until it answers (the floor; target floor + 50 ms
//!   at p50);
//! - process, `pause`: 20 wakes (target under 20 ms at p50);
//! - docker, `stop` and `pause` (with `--docker`, needs Podman as `cargo bench --bench docker`
//!   does): 20 wakes each, next to 20 starts of the stopped container straight on the
//!   engine's API until it answers (the floor);
//! - 100 concurrent requests to one asleep session: how many wakes (target 1) and answers.
//!
//! Run: `cargo bench --bench wake [-- --docker | --docker-only | --activity-only]`. Prints its
//! figures.

#[path = "../tests/it/podman_support.rs"]
#[allow(dead_code)]
mod podman_support;
mod support;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{Kill, free_port, get, ms, percentile, wait_for};

const WAKES: usize = 20;

struct Daemon {
    dir: tempfile::TempDir,
    proxy: SocketAddr,
    status: SocketAddr,
    _child: Kill,
}

fn daemon(compute: &str, plan: &str, sessions: &[&str]) -> Daemon {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::create_dir_all(d.join("desired")).expect("mkdir");
    std::fs::write(d.join("desired/plan.yaml"), plan).expect("plan");
    for s in sessions {
        std::fs::write(
            d.join(format!("desired/{s}.yaml")),
            format!("kind: Session\nname: {s}\nplan: nap\n"),
        )
        .expect("session");
    }
    let proxy = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let status = SocketAddr::from(([127, 0, 0, 1], free_port()));
    std::fs::write(
        d.join("vessel.yaml"),
        format!(
            "source: {{dir: desired}}\nstate_dir: state\nproviders:\n  compute:\n{compute}  proxy:\n    embedded: {{listen: '{proxy}'}}\nstatus: {{listen: '{status}'}}\nlifecycle: {{check_interval: 20ms}}\n"
        ),
    )
    .expect("config");
    let log = std::fs::File::create(d.join("vessel.log")).expect("log");
    let child = Command::new(env!("CARGO_BIN_EXE_vessel"))
        .args(["run", "vessel.yaml"])
        .current_dir(d)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("vessel runs");
    Daemon {
        dir,
        proxy,
        status,
        _child: Kill(child),
    }
}

fn life(d: &Daemon, name: &str) -> serde_json::Value {
    get(d.status, "s", &format!("/sessions/{name}"))
        .and_then(|(_, b)| {
            let body = b.split_once("\r\n\r\n")?.1.to_string();
            serde_json::from_str::<serde_json::Value>(&body).ok()
        })
        .map(|v| v["lifecycle"].clone())
        .unwrap_or_default()
}

/// The session itself answered (any status of its own below 500; not one of the proxy's pages).
fn from_session(r: &Option<(u16, String)>) -> bool {
    r.as_ref()
        .is_some_and(|(c, b)| *c < 500 && !b.contains("vessel proxy &middot;"))
}

fn answers(d: &Daemon, name: &str) -> bool {
    from_session(&get(d.proxy, &format!("{name}.localhost"), "/healthz"))
}

/// `WAKES` times: wait until asleep, then time one request until its answer.
fn wakes(d: &Daemon, name: &str) -> Vec<Duration> {
    wait_for(Duration::from_secs(120), || answers(d, name)).unwrap_or_else(|| {
        panic!(
            "{name} never answers; log:\n{}",
            std::fs::read_to_string(d.dir.path().join("vessel.log")).unwrap_or_default()
        )
    });
    let mut out = Vec::new();
    for _ in 0..WAKES {
        wait_for(Duration::from_secs(60), || {
            life(d, name)["state"] == "asleep"
        })
        .expect("asleep");
        // A moment for the sleep to finish (the mark comes first).
        std::thread::sleep(Duration::from_millis(100));
        let t = Instant::now();
        let r = get(d.proxy, &format!("{name}.localhost"), "/healthz");
        let took = t.elapsed();
        assert!(from_session(&r), "a woken session answers: {r:?}");
        out.push(took);
    }
    out
}

/// With `WAKE_BENCH_LOGS=DIR`, the daemon's log is kept as `DIR/<label>.log` (run with
/// `VESSEL_LOG=vessel=debug` for each wake's steps).
fn keep_log(d: &Daemon, label: &str) {
    if let Some(dir) = std::env::var_os("WAKE_BENCH_LOGS") {
        let _ = std::fs::copy(
            d.dir.path().join("vessel.log"),
            Path::new(&dir).join(format!("{label}.log")),
        );
    }
}

/// The floor for a process: the same command started by hand, until it answers.
fn process_floor(root: &Path) -> Vec<Duration> {
    (0..WAKES)
        .map(|_| {
            let port = free_port();
            let t = Instant::now();
            let _k = support::devserver(port, root);
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            wait_for(Duration::from_secs(10), || {
                get(addr, "x", "/healthz").is_some_and(|(c, _)| c == 200)
            })
            .expect("the devserver answers");
            t.elapsed()
        })
        .collect()
}

fn line(label: &str, v: &mut [Duration], floor: Option<&mut [Duration]>) {
    let (p50, p95) = (percentile(v, 0.5), percentile(v, 0.95));
    match floor {
        Some(f) => {
            let (f50, f95) = (percentile(f, 0.5), percentile(f, 0.95));
            println!(
                "  {label:<24} p50 {:>9}  p95 {:>9}   floor p50 {:>9}  p95 {:>9}   p50 over floor {:>+8.1} ms",
                ms(p50),
                ms(p95),
                ms(f50),
                ms(f95),
                (p50.as_secs_f64() - f50.as_secs_f64()) * 1e3
            );
        }
        None => println!("  {label:<24} p50 {:>9}  p95 {:>9}", ms(p50), ms(p95)),
    }
}

fn process_plan(depth: &str) -> String {
    format!(
        "kind: Plan\nname: nap\ncommand: ['{}', devserver, --listen, '127.0.0.1:{{port.ide}}', --root, '{{workspace}}']\nports: {{ide: 8080}}\nhealth: {{port: ide, path: /healthz}}\nidle_timeout: 300ms\nsleep: {depth}\nstop_timeout: 2s\n",
        support::vessel()
    )
}

/// A minimal HTTP/1.0 call on the engine's Unix socket; the status code.
fn engine(socket: &Path, method: &str, path: &str) -> Option<(u16, String)> {
    let mut s = std::os::unix::net::UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: d\r\nContent-Length: 0\r\n\r\n"
    )
    .ok()?;
    let mut b = String::new();
    s.read_to_string(&mut b).ok()?;
    let code = b.get(9..12)?.parse().ok()?;
    Some((code, b.split_once("\r\n\r\n")?.1.to_string()))
}

/// Where the container `name` publishes its port 8080, read on the engine's API.
fn published(socket: &Path, name: &str) -> SocketAddr {
    let (_, body) =
        engine(socket, "GET", &format!("/v1.41/containers/{name}/json")).expect("inspect");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    let port: u16 = v
        .pointer("/NetworkSettings/Ports/8080~1tcp/0/HostPort")
        .and_then(|p| p.as_str())
        .and_then(|p| p.parse().ok())
        .expect("a published port");
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Wait until a container answers at `addr` (below 500).
fn container_answers(addr: SocketAddr) {
    wait_for(Duration::from_secs(10), || {
        get(addr, "x", "/").is_some_and(|(c, _)| c < 500)
    })
    .expect("the container answers");
}

/// The floor for docker: a stopped container started straight on the engine's API, its
/// published port read, until it answers.
fn docker_floor(socket: &Path, name: &str) -> Vec<Duration> {
    (0..WAKES)
        .map(|_| {
            engine(
                socket,
                "POST",
                &format!("/v1.41/containers/{name}/stop?t=0"),
            );
            let t = Instant::now();
            let (code, _) =
                engine(socket, "POST", &format!("/v1.41/containers/{name}/start")).expect("start");
            assert!(code < 300, "start answered {code}");
            container_answers(published(socket, name));
            t.elapsed()
        })
        .collect()
}

/// The floor for docker's `pause`: a paused container resumed straight on the engine's API,
/// until it answers.
fn docker_pause_floor(socket: &Path, name: &str) -> Vec<Duration> {
    let addr = published(socket, name);
    (0..WAKES)
        .map(|_| {
            engine(socket, "POST", &format!("/v1.41/containers/{name}/pause"));
            std::thread::sleep(Duration::from_millis(100));
            let t = Instant::now();
            let (code, _) = engine(socket, "POST", &format!("/v1.41/containers/{name}/unpause"))
                .expect("unpause");
            assert!(code < 300, "unpause answered {code}");
            container_answers(addr);
            t.elapsed()
        })
        .collect()
}

fn main() {
    let docker_only = std::env::args().any(|a| a == "--docker-only");
    let docker = docker_only || std::env::args().any(|a| a == "--docker");
    println!(
        "wake on request: {WAKES} wakes each, a request to an asleep session until its answer"
    );
    if std::env::args().any(|a| a == "--activity-only") {
        activity_cost();
        return;
    }
    if !docker_only {
        processes();
        activity_cost();
    }
    if docker {
        dockers();
    } else {
        println!("  (docker: run with `-- --docker`)");
    }
}

/// What recording activity costs the proxy: `wrk -t2 -c64` through one embedded proxy with
/// activity tracking on and off (the same build, the same table and threads), interleaved.
fn activity_cost() {
    use vessel::proxy::{Proxy, Route, RouteChange};
    if Command::new("wrk").arg("--version").output().is_err() {
        println!("  activity tracking: skipped, `wrk` is not installed (apt-get install wrk)");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let up = free_port();
    let _upstream = support::devserver(up, dir.path());
    let proxy = Proxy::default();
    proxy.apply(&[RouteChange::Upsert {
        host: "alice.localhost".into(),
        route: Route {
            upstream: format!("127.0.0.1:{up}"),
            session: "alice".into(),
            route: None,
            ready: true,
            strip_prefix: false,
        },
    }]);
    // Served as the daemon serves it: a thread per core.
    let (addr, cancel) = support::serve_proxy(&proxy);
    let url = format!("http://{addr}/healthz");
    const ROUNDS: usize = 5;
    let (mut on, mut off, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let mut cpu: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for round in 0..ROUNDS {
        // Alternating which goes first, so neither always runs on a warmer machine; each
        // round's pair is compared (the machine's load drifts between rounds).
        let order = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        let mut pair = [0.0f64; 2];
        for tracking in order {
            proxy.set_activity_tracking(tracking);
            let cpu0 = cpu_seconds();
            if let Some((rps, _)) = support::wrk(&url, Some("alice.localhost")) {
                // The proxy's CPU per request (this process is the proxy): steadier than
                // throughput on a machine whose two cores wrk and the upstream share.
                let us = (cpu_seconds() - cpu0) / (rps * 8.0) * 1e6;
                cpu[usize::from(!tracking)].push(us);
                pair[usize::from(!tracking)] = rps;
                if tracking {
                    on.push(rps)
                } else {
                    off.push(rps)
                }
            }
        }
        if pair[0] > 0.0 && pair[1] > 0.0 {
            ratios.push(pair[0] / pair[1]);
        }
    }
    cancel.cancel();
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let rounds = ratios
        .iter()
        .map(|x| format!("{:+.1}%", (x - 1.0) * 100.0))
        .collect::<Vec<_>>()
        .join(" ");
    let (a, b, r) = (median(&mut on), median(&mut off), median(&mut ratios));
    println!(
        "  proxy throughput, wrk -t2 -c64 -d8s, {ROUNDS} interleaved rounds: activity tracking on {a:.0} req/s, off {b:.0} req/s (medians); on against off per round: median {:+.1}% ({rounds}) (target within 3%)",
        (r - 1.0) * 100.0
    );
    let (c_on, c_off) = (median(&mut cpu[0]), median(&mut cpu[1]));
    println!(
        "  proxy CPU per request (medians): activity tracking on {c_on:.1} us, off {c_off:.1} us: {:+.1}%",
        (c_on / c_off - 1.0) * 100.0
    );
}

/// CPU time (user and system) this process has used, in seconds.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // After the command's `)`: state is field 3, utime 14 and stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields from 3 on, so field n is at n - 3; clock ticks are 100 a second on Linux.
    (ticks(14 - 3) + ticks(15 - 3)) / 100.0
}

/// Process sessions, both depths, and 100 requests at once.
fn processes() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut floor = process_floor(root.path());
    let port_base = 21_000 + (std::process::id() % 50) as u16 * 40;
    let compute = format!("    process: {{port_base: {port_base}}}\n");
    for depth in ["stop", "pause"] {
        let d = daemon(&compute, &process_plan(depth), &["alice"]);
        let mut v = wakes(&d, "alice");
        keep_log(&d, &format!("process-{depth}"));
        let label = format!("process, {depth}");
        if depth == "stop" {
            line(&label, &mut v, Some(&mut floor));
        } else {
            line(&label, &mut v, None);
        }
        drop(d);
    }
    // 100 at once, one wake.
    {
        let d = daemon(&compute, &process_plan("stop"), &["bob"]);
        wait_for(Duration::from_secs(60), || answers(&d, "bob")).expect("bob answers");
        wait_for(Duration::from_secs(60), || {
            life(&d, "bob")["state"] == "asleep"
        })
        .expect("asleep");
        std::thread::sleep(Duration::from_millis(100));
        let proxy = d.proxy;
        let t = Instant::now();
        let ok = std::thread::scope(|s| {
            let hs: Vec<_> = (0..100)
                .map(|_| s.spawn(move || get(proxy, "bob.localhost", "/healthz")))
                .collect();
            hs.into_iter()
                .filter(|_| true)
                .map(|h| h.join().ok().flatten())
                .filter(|r| r.as_ref().is_some_and(|(c, _)| *c == 200))
                .count()
        });
        let took = t.elapsed();
        println!(
            "  100 concurrent requests to one asleep session: {ok} answered 200 in {}, {} wake(s) (target 1)",
            ms(took),
            life(&d, "bob")["wakes"]
        );
    }
}

/// Docker sessions on Podman, both depths.
fn dockers() {
    let pod = podman_support::podman();
    let image = podman_support::IMAGE;
    for depth in ["stop", "pause"] {
        let instance = format!("wake{depth}{}", std::process::id());
        let compute = format!(
            "    docker:\n      hosts: [{{name: local, endpoint: '{}'}}]\n      instance: {instance}\n",
            pod.endpoint()
        );
        let plan = format!(
            "kind: Plan\nname: nap\ncompute: docker\nimage: {image}\ncommand: [/bin/busybox, httpd, -f, -p, '{{port.ide}}', -h, /]\nports: {{ide: 8080}}\nhealth: {{port: ide, path: /}}\nidle_timeout: 300ms\nsleep: {depth}\nstop_timeout: 1s\n"
        );
        let name = format!("carol{depth}{}", std::process::id());
        let container = format!("vessel-{name}");
        let _ = pod.try_cli(&["rm", "-f", "-t", "0", &container]);
        let d = daemon(&compute, &plan, &[name.as_str()]);
        let mut v = wakes(&d, &name);
        keep_log(&d, &format!("docker-{depth}"));
        drop(d);
        let label = format!("docker, {depth}");
        let mut f = if depth == "stop" {
            docker_floor(&pod.socket, &container)
        } else {
            // Left paused or stopped by the daemon's exit: running first.
            engine(
                &pod.socket,
                "POST",
                &format!("/v1.41/containers/{container}/unpause"),
            );
            engine(
                &pod.socket,
                "POST",
                &format!("/v1.41/containers/{container}/start"),
            );
            docker_pause_floor(&pod.socket, &container)
        };
        line(&label, &mut v, Some(&mut f));
        let _ = pod.try_cli(&["rm", "-f", "-t", "0", &container]);
    }
}
