//! The reconciler and proxy on the embedded default, measured:
//!
//! 1. file drop to serving: `vessel run` (release binary) on a tree; a session file is dropped
//!    and we time until its URL answers through the proxy; 20 runs, p50/p95 (target p50 under
//!    200 ms);
//! 2. a route change becoming effective: a route is pointed at another upstream and we time
//!    until a request through the proxy reaches it; 20 runs (target under 10 ms);
//! 3. throughput: `wrk -t2 -c64` through the proxy with 1,000 routes (to the first and the
//!    1,000th), against a direct hit on the upstream, and against nginx with 1,000 server
//!    names and upstream keep-alive in front of the same upstream.
//!
//! 4. the status endpoint under load: `wrk -t2 -c64` against `/status` while the daemon
//!    converges 50 sessions dropped in at once (target at least 20k req/s, p99 under 10 ms).
//!
//! Run: `cargo bench --bench reconcile` (needs `wrk`; nginx optional: `apt-get install wrk
//! nginx-light`). Prints the figures; asserts nothing about time.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vessel::proxy::{Proxy, Route, RouteChange};

mod support;
use support::{Kill, devserver, free_port, get, ms, nginx, percentile, vessel, wait_for, wrk};

fn file_drop_latency() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::create_dir_all(d.join("desired")).expect("mkdir");
    std::fs::write(
        d.join("desired/plan.yaml"),
        "kind: Plan\nname: web\ncommand: ['{vessel}', devserver, --listen, '127.0.0.1:{port.ide}', --root, '{workspace}']\nports: {ide: 8080}\nhealth: {port: ide, path: /healthz}\nstop_timeout: 2s\n",
    )
    .expect("plan");
    // One session to begin with, so the tree is never empty.
    std::fs::write(
        d.join("desired/base.yaml"),
        "kind: Session\nname: base\nplan: web\n",
    )
    .expect("base");
    let proxy = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let status = SocketAddr::from(([127, 0, 0, 1], free_port()));
    std::fs::write(
        d.join("vessel.yaml"),
        format!("source: {{dir: desired}}\nstate_dir: state\nproviders:\n  compute:\n    process: {{port_base: 41000, keep_on_exit: false}}\n  proxy:\n    embedded: {{listen: '{proxy}'}}\nstatus: {{listen: '{status}'}}\n"),
    )
    .expect("config");
    let _daemon = Kill(
        Command::new(vessel())
            .args(["run", "vessel.yaml"])
            .current_dir(d)
            .env("VESSEL_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("vessel run"),
    );
    wait_for(Duration::from_secs(20), || {
        get(proxy, "base.localhost", "/healthz").is_some_and(|(c, _)| c == 200)
    })
    .expect("the base session serves");
    let mut times = Vec::new();
    for i in 0..20 {
        let name = format!("drop-{i}");
        let tmp = d.join(format!("desired/.{name}.tmp"));
        std::fs::write(&tmp, format!("kind: Session\nname: {name}\nplan: web\n")).expect("write");
        let t = Instant::now();
        std::fs::rename(&tmp, d.join(format!("desired/{name}.yaml"))).expect("drop");
        let host = format!("{name}.localhost");
        wait_for(Duration::from_secs(10), || {
            get(proxy, &host, "/healthz").is_some_and(|(c, _)| c == 200)
        })
        .expect("the dropped session serves");
        times.push(t.elapsed());
    }
    let (p50, p95) = (percentile(&mut times, 0.5), percentile(&mut times, 0.95));
    println!(
        "file drop to serving ({} runs): p50 {}, p95 {}, max {} (target p50 < 200 ms)",
        times.len(),
        ms(p50),
        ms(p95),
        ms(*times.last().expect("runs"))
    );
}

fn route_change_latency(rt: &tokio::runtime::Runtime) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (free_port(), free_port());
    let _ua = devserver(a, dir.path());
    let _ub = devserver(b, dir.path());
    let proxy = Proxy::default();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let cancel = tokio_util::sync::CancellationToken::new();
    rt.spawn(
        proxy
            .clone()
            .serve(listener, Default::default(), cancel.clone()),
    );
    // 1,000 other routes, so the swap copies a real table.
    let mut changes: Vec<RouteChange> = (0..1000)
        .map(|i| RouteChange::Upsert {
            host: format!("r{i}.localhost"),
            route: Route {
                upstream: format!("127.0.0.1:{a}"),
                session: format!("r{i}"),
                route: None,
                ready: true,
                strip_prefix: false,
            },
        })
        .collect();
    changes.push(RouteChange::Upsert {
        host: "flip.localhost".into(),
        route: Route {
            upstream: format!("127.0.0.1:{a}"),
            session: "flip".into(),
            route: None,
            ready: true,
            strip_prefix: false,
        },
    });
    proxy.apply(&changes);
    let mut swaps = Vec::new();
    let mut effective = Vec::new();
    for i in 0..20 {
        let port = if i % 2 == 0 { b } else { a };
        let t = Instant::now();
        proxy.apply(&[RouteChange::Upsert {
            host: "flip.localhost".into(),
            route: Route {
                upstream: format!("127.0.0.1:{port}"),
                session: "flip".into(),
                route: None,
                ready: true,
                strip_prefix: false,
            },
        }]);
        swaps.push(t.elapsed());
        let marker = format!("on port {port}");
        wait_for(Duration::from_secs(5), || {
            get(addr, "flip.localhost", "/").is_some_and(|(_, body)| body.contains(&marker))
        })
        .expect("the change takes effect");
        effective.push(t.elapsed());
    }
    println!(
        "route change (1,001 routes): table swap p50 {}, effective (first request served by the new upstream) p50 {}, p95 {} (target < 10 ms)",
        ms(percentile(&mut swaps, 0.5)),
        ms(percentile(&mut effective, 0.5)),
        ms(percentile(&mut effective, 0.95))
    );
    cancel.cancel();
}

fn throughput() {
    if Command::new("wrk").arg("--version").output().is_err() {
        println!("throughput: skipped, `wrk` is not installed (apt-get install wrk)");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let up = free_port();
    let _upstream = devserver(up, dir.path());
    let proxy = Proxy::default();
    let changes: Vec<RouteChange> = (0..1000)
        .map(|i| RouteChange::Upsert {
            host: format!("r{i}.localhost"),
            route: Route {
                upstream: format!("127.0.0.1:{up}"),
                session: format!("r{i}"),
                route: None,
                ready: true,
                strip_prefix: false,
            },
        })
        .collect();
    proxy.apply(&changes);
    // Served as the daemon serves it: a thread per core.
    let (addr, cancel) = support::serve_proxy(&proxy);
    let line = |label: &str, r: Option<(f64, String)>| match r {
        Some((rps, extra)) => println!("  {label:<48} {rps:>9.0} req/s, {extra}"),
        None => println!("  {label:<48} (wrk failed)"),
    };
    println!(
        "throughput, wrk -t2 -c64 -d8s, GET /healthz (2 cores shared by wrk, proxy and upstream; interleaved, twice):"
    );
    let nginx = nginx(up, dir.path());
    for round in 1..=2 {
        line(
            &format!("[{round}] direct to the upstream"),
            wrk(&format!("http://127.0.0.1:{up}/healthz"), None),
        );
        line(
            &format!("[{round}] vessel proxy, 1,000 routes, the 1st host"),
            wrk(&format!("http://{addr}/healthz"), Some("r0.localhost")),
        );
        line(
            &format!("[{round}] vessel proxy, 1,000 routes, the 1,000th host"),
            wrk(&format!("http://{addr}/healthz"), Some("r999.localhost")),
        );
        match &nginx {
            Some((_, port)) => line(
                &format!("[{round}] nginx, 1,000 server names, the 1,000th host"),
                wrk(
                    &format!("http://127.0.0.1:{port}/healthz"),
                    Some("r999.localhost"),
                ),
            ),
            None => println!("  nginx: skipped, not installed (apt-get install nginx-light)"),
        }
    }
    cancel.cancel();
}

/// `wrk -t2 -c64` against `/status` while the daemon converges 50 sessions dropped in at once.
fn status_under_load() {
    if Command::new("wrk").arg("--version").output().is_err() {
        println!("status under load: skipped, `wrk` is not installed");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_path_buf();
    std::fs::create_dir_all(d.join("desired")).expect("mkdir");
    std::fs::write(
        d.join("desired/plan.yaml"),
        "kind: Plan\nname: web\ncommand: ['{vessel}', devserver, --listen, '127.0.0.1:{port.ide}', --root, '{workspace}']\nports: {ide: 8080}\nhealth: {port: ide, path: /healthz}\nstop_timeout: 2s\n",
    )
    .expect("plan");
    std::fs::write(
        d.join("desired/base.yaml"),
        "kind: Session\nname: base\nplan: web\n",
    )
    .expect("base");
    let proxy = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let status = SocketAddr::from(([127, 0, 0, 1], free_port()));
    std::fs::write(
        d.join("vessel.yaml"),
        format!("source: {{dir: desired}}\nstate_dir: state\nproviders:\n  compute:\n    process: {{port_base: 43000, keep_on_exit: false}}\n  proxy:\n    embedded: {{listen: '{proxy}'}}\nstatus: {{listen: '{status}'}}\n"),
    )
    .expect("config");
    let _daemon = Kill(
        Command::new(vessel())
            .args(["run", "vessel.yaml"])
            .current_dir(&d)
            .env("VESSEL_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("vessel run"),
    );
    let converged = move |n: u64| {
        get(status, "status", "/status").is_some_and(|(c, body)| {
            c == 200
                && body.contains("\"converged\": true")
                && body.contains(&format!("\"sessions_running\": {n}"))
        })
    };
    wait_for(Duration::from_secs(20), || converged(1)).expect("the daemon starts");
    let dropper = {
        let d = d.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(500));
            let t = Instant::now();
            for i in 0..50 {
                std::fs::write(
                    d.join(format!("desired/s{i}.yaml")),
                    format!("kind: Session\nname: s{i}\nplan: web\n"),
                )
                .expect("drop");
            }
            let took = wait_for(Duration::from_secs(60), || converged(51));
            (t, took)
        })
    };
    let r = wrk(&format!("http://{status}/status"), None);
    let (_, took) = dropper.join().expect("dropper");
    match r {
        Some((rps, extra)) => println!(
            "status under load: wrk -t2 -c64 -d8s GET /status while 50 sessions converge: {rps:.0} req/s, {extra} (target >= 20k req/s, p99 < 10 ms); the 50 sessions converged in {}",
            took.map(ms).unwrap_or_else(|| "(not within 60 s)".into())
        ),
        None => println!("status under load: wrk failed"),
    }
}

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    if only.is_empty() || only == "drop" {
        file_drop_latency();
    }
    if only.is_empty() || only == "route" {
        route_change_latency(&rt);
    }
    if only.is_empty() || only == "status" {
        status_under_load();
    }
    if only.is_empty() || only == "wrk" {
        throughput();
    }
}
