//! The daemon at 10, 1,000 and 10,000 declared sessions (issue 17's table), one `vessel run`
//! (release binary) per size on the embedded default, 3 sessions running and the rest declared
//! `stopped`, measured in one run:
//!
//! - start-up to converged: from the daemon's start on a fresh state directory to `/status`
//!   saying converged with the 3 running sessions serving through the proxy;
//! - no-op pass: the mean pass time over the idle window, from `vessel_pass_duration_seconds`
//!   (sum and count before and after; a pass every 2 s, `policy.resync_interval: 2s`);
//! - file drop to serving: a session file renamed into the tree until its URL answers through
//!   the proxy, p50 over 5;
//! - idle CPU (the daemon's user + system time over 20 idle seconds, per minute) and resident
//!   memory (VmRSS) once idle;
//! - stop on SIGTERM with `keep_on_exit: false` (the 3 running and the drops are stopped).
//!
//! Run: `cargo bench --bench declared` (`-- 10 1000` for some sizes only). Prints the table;
//! asserts only that each daemon converges and serves.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod support;
use support::{free_port, get, ms, percentile, vessel, wait_for};

const RUNNING: usize = 3;
const DROPS: usize = 5;
const IDLE: Duration = Duration::from_secs(20);

const PLAN: &str = "kind: Plan\nname: web\ncommand: ['{vessel}', devserver, --listen, '127.0.0.1:{port.ide}', --root, '{workspace}']\nports: {ide: 8080}\nhealth: {port: ide, path: /healthz}\nstop_timeout: 2s\n";

/// user + system CPU seconds of `pid` so far.
fn cpu_seconds(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = s.rfind(')').map_or("", |i| &s[i + 1..]);
    let f: Vec<&str> = after.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields 14 and 15 (utime, stime), counted from the state (field 3) at index 0.
    (tick(11) + tick(12)) / 100.0
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |k| k / 1024.0)
}

/// `vessel_pass_duration_seconds` sum and count from `/metrics`.
fn pass_totals(status: SocketAddr) -> (f64, f64) {
    let body = get(status, "status", "/metrics")
        .map(|r| r.1)
        .unwrap_or_default();
    let read = |name: &str| {
        body.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (
        read("vessel_pass_duration_seconds_sum "),
        read("vessel_pass_duration_seconds_count "),
    )
}

fn converged(status: SocketAddr) -> bool {
    get(status, "status", "/status").is_some_and(|(c, r)| {
        c == 200
            && r.split_once("\r\n\r\n").is_some_and(|(_, body)| {
                serde_json::from_str::<serde_json::Value>(body)
                    .is_ok_and(|v| v["converged"] == serde_json::Value::Bool(true))
            })
    })
}

fn serves(proxy: SocketAddr, name: &str) -> bool {
    get(proxy, &format!("{name}.localhost"), "/healthz").is_some_and(|(c, _)| c == 200)
}

fn tree(d: &Path, n: usize) {
    let desired = d.join("desired");
    std::fs::create_dir_all(&desired).expect("mkdir");
    std::fs::write(desired.join("plan.yaml"), PLAN).expect("plan");
    for i in 0..n {
        let (name, extra) = if i < RUNNING {
            (format!("run-{i}"), "")
        } else {
            (format!("user-{i}"), "state: stopped\n")
        };
        std::fs::write(
            desired.join(format!("{name}.yaml")),
            format!("kind: Session\nname: {name}\nplan: web\n{extra}"),
        )
        .expect("session");
    }
}

struct Row {
    n: usize,
    startup: Duration,
    noop: Option<Duration>,
    drop_p50: Duration,
    cpu_per_min: f64,
    rss: f64,
    stop: Duration,
}

fn measure(n: usize, port_base: u16) -> Row {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    tree(d, n);
    let proxy = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let status = SocketAddr::from(([127, 0, 0, 1], free_port()));
    std::fs::write(
        d.join("vessel.yaml"),
        format!(
            "source: {{dir: desired}}\nstate_dir: state\nproviders:\n  compute:\n    process: {{port_base: {port_base}, keep_on_exit: false}}\n  proxy:\n    embedded: {{listen: '{proxy}'}}\nstatus: {{listen: '{status}'}}\npolicy: {{resync_interval: 2s}}\n"
        ),
    )
    .expect("config");
    let t = Instant::now();
    let mut child = Command::new(vessel())
        .args(["run", "vessel.yaml"])
        .current_dir(d)
        .env("VESSEL_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("vessel run");
    let pid = child.id();
    wait_for(Duration::from_secs(1800), || {
        converged(status) && (0..RUNNING).all(|i| serves(proxy, &format!("run-{i}")))
    })
    .unwrap_or_else(|| panic!("{n} declared: never converged"));
    let startup = t.elapsed();

    // Idle: passes on the resync timer only.
    std::thread::sleep(Duration::from_secs(3));
    let (sum0, count0) = pass_totals(status);
    let cpu0 = cpu_seconds(pid);
    std::thread::sleep(IDLE);
    let cpu1 = cpu_seconds(pid);
    let (sum1, count1) = pass_totals(status);
    let rss = rss_mib(pid);
    let noop =
        (count1 > count0).then(|| Duration::from_secs_f64((sum1 - sum0) / (count1 - count0)));

    let mut drops = Vec::new();
    for i in 0..DROPS {
        let name = format!("drop-{i}");
        let tmp = d.join(format!("desired/.{name}.tmp"));
        std::fs::write(&tmp, format!("kind: Session\nname: {name}\nplan: web\n")).expect("write");
        let t = Instant::now();
        std::fs::rename(&tmp, d.join(format!("desired/{name}.yaml"))).expect("drop");
        wait_for(Duration::from_secs(120), || serves(proxy, &name))
            .unwrap_or_else(|| panic!("{n} declared: {name} never serves"));
        drops.push(t.elapsed());
    }

    let t = Instant::now();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = child.wait();
    let stop = t.elapsed();
    Row {
        n,
        startup,
        noop,
        drop_p50: percentile(&mut drops, 0.5),
        cpu_per_min: (cpu1 - cpu0) * 60.0 / IDLE.as_secs_f64(),
        rss,
        stop,
    }
}

fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![10, 1_000, 10_000]
    } else {
        sizes
    };
    println!(
        "| declared | start-up to converged | no-op pass (mean) | file drop to serving p50 | idle CPU | idle RSS | stop on SIGTERM |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (k, n) in sizes.into_iter().enumerate() {
        // Host ports of their own for each daemon, below the ephemeral range.
        let r = measure(n, 15_000 + 1_000 * k as u16);
        println!(
            "| {} | {} | {} | {} | {:.3} s/min | {:.1} MiB | {} |",
            r.n,
            ms(r.startup),
            r.noop.map_or("-".into(), ms),
            ms(r.drop_p50),
            r.cpu_per_min,
            r.rss,
            ms(r.stop)
        );
    }
}
