//! The `traefik` proxy provider against a real Traefik 3, beside Caddy's admin API and
//! vessel's embedded proxy, measured in one run:
//!
//! 1. route change to serving: `flip.localhost`, among 1,000 other routes, is pointed at the
//!    other of two upstreams through the provider, and we time from the call until a request
//!    through the proxy reaches the new upstream; 20 changes, p50/p95. Traefik is measured
//!    as it comes (its file watcher, then at most one change per 2 s `providersThrottleDuration`)
//!    with changes back to back and with changes 3 s apart, and with the throttle at 0 s; the
//!    same with `api` set gives how long a confirmed write takes to return.
//! 2. 1,000 routes from empty to all serving: one batch, timed until a request for the last
//!    host is served (each proxy loads a batch at once; every host is then checked to serve).
//!    Traefik starts from vessel's file without routes, written 5 s before (a provider's very
//!    first write also makes `.vessel-tmp/`, which Traefik sees as one change more: up to 2 s).
//! 3. throughput: `wrk -t2 -c64 -d8s` GET /healthz through Traefik with 1,000 routes, to the
//!    1st and the 1,000th host, against nginx with 1,000 server blocks in front of the same
//!    upstream, and the upstream directly.
//!
//! Run: `cargo bench --bench traefik` (needs Traefik, which `.ci/run` installs; caddy; and
//! `wrk` and `nginx`: `apt-get install nginx wrk`). Prints the figures; asserts only that
//! each step did what it should. `BENCH_ONLY=change|empty|wrk` runs one part.

#[path = "../tests/it/servers.rs"]
mod servers;
mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};
use vessel::model::plan::RouteAction;

use servers::{Caddy, Traefik as TraefikServer};
use support::{Kill, devserver, free_port, get, ms, nginx, percentile, wait_for, wrk};
use vessel::config::TraefikConfig;
use vessel::providers::ProxyProvider;
use vessel::providers::proxy::caddy::Caddy as CaddyProvider;
use vessel::providers::proxy::embedded::EmbeddedProxy;
use vessel::providers::proxy::traefik::Traefik;

const CHANGES: usize = 20;
const LIMIT: Duration = Duration::from_secs(20);

fn upsert(host: &str, port: u16) -> RouteAction {
    RouteAction::UpsertRoute {
        host: host.into(),
        path: None,
        strip_prefix: false,
        upstream: format!("127.0.0.1:{port}"),
        session: host.split('.').next().unwrap_or("s").into(),
        port: "ide".into(),
        route: None,
        upstream_from: None,
    }
}

fn apply(rt: &tokio::runtime::Runtime, p: &dyn ProxyProvider, actions: &[RouteAction]) {
    let refs: Vec<&RouteAction> = actions.iter().collect();
    for r in rt.block_on(p.apply(&refs)) {
        if let Err(e) = r {
            panic!("apply: {}", vessel::error_chain(&e));
        }
    }
}

/// `n` routes `r0.localhost`.. to `port`.
fn routes(prefix: &str, n: usize, port: u16) -> Vec<RouteAction> {
    (0..n)
        .map(|i| upsert(&format!("{prefix}{i}.localhost"), port))
        .collect()
}

/// Is `host` served through `proxy` by the upstream on `port` (its page names the port)?
fn served_by(proxy: SocketAddr, host: &str, port: u16) -> bool {
    get(proxy, host, "/")
        .is_some_and(|(c, body)| c == 200 && body.contains(&format!("on port {port}.")))
}

/// The p50/p95 line for `times`.
fn line(label: &str, times: &mut [Duration]) {
    let (p50, p95) = (percentile(times, 0.5), percentile(times, 0.95));
    println!(
        "  {label:<58} p50 {:>9}  p95 {:>9}  max {:>9}",
        ms(p50),
        ms(p95),
        ms(*times.iter().max().expect("runs"))
    );
}

/// Point `flip.localhost` at `a` and `b` in turn through `p`, `CHANGES` times, `gap` apart:
/// (how long `apply` took, how long until the proxy served the new upstream).
fn flips(
    rt: &tokio::runtime::Runtime,
    p: &dyn ProxyProvider,
    proxy: SocketAddr,
    (a, b): (u16, u16),
    gap: Duration,
) -> (Vec<Duration>, Vec<Duration>) {
    apply(rt, p, &[upsert("flip.localhost", a)]);
    wait_for(LIMIT, || served_by(proxy, "flip.localhost", a)).expect("flip serves");
    let (mut returned, mut served) = (Vec::new(), Vec::new());
    for i in 0..CHANGES {
        std::thread::sleep(gap);
        let port = if i % 2 == 0 { b } else { a };
        let t = Instant::now();
        apply(rt, p, &[upsert("flip.localhost", port)]);
        returned.push(t.elapsed());
        wait_for(LIMIT, || served_by(proxy, "flip.localhost", port))
            .expect("the change takes effect");
        served.push(t.elapsed());
    }
    (returned, served)
}

/// The provider's settings for `vessel.yml` in `watched`, confirming through the API on
/// `api` if given.
fn settings(watched: &Path, api: Option<u16>) -> TraefikConfig {
    TraefikConfig {
        file: watched.join("vessel.yml"),
        entrypoints: vec!["web".into()],
        name_prefix: "vessel".into(),
        api: api.map(|p| format!("http://127.0.0.1:{p}")),
        confirm_within: vessel::model::Duration::from_secs(10),
        tls: None,
        wake_listen: None,
    }
}

/// A Traefik watching `dir/<name>/` with `args`, the provider on `dir/<name>/vessel.yml`
/// (confirming through the API when `confirm`), and 1,000 routes loaded.
fn traefik(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    name: &str,
    args: &[&str],
    upstream: u16,
) -> (TraefikServer, Traefik, Traefik) {
    let watched = dir.join(name);
    std::fs::create_dir_all(&watched).expect("mkdir");
    let server = TraefikServer::start(
        &dir.join(format!("{name}-server")),
        &watched,
        free_port(),
        free_port(),
        args,
    );
    let plain = Traefik::new(&settings(&watched, None)).expect("provider");
    let confirmed = Traefik::new(&settings(&watched, Some(server.api))).expect("provider");
    apply(rt, &confirmed, &routes("r", 1000, upstream));
    (server, plain, confirmed)
}

fn caddy(dir: &Path) -> (Caddy, CaddyProvider, SocketAddr) {
    let (admin, listen) = (free_port(), free_port());
    let base = servers::caddy_with_empty_server(admin, listen);
    let server = Caddy::start(dir, admin, &base.to_string());
    let p = CaddyProvider::new(
        &format!("http://127.0.0.1:{admin}"),
        "vessel",
        &[],
        "vessel",
        None,
    )
    .expect("provider");
    (server, p, SocketAddr::from(([127, 0, 0, 1], listen)))
}

fn embedded(rt: &tokio::runtime::Runtime) -> (EmbeddedProxy, SocketAddr) {
    let proxy = vessel::proxy::Proxy::default();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    rt.spawn(proxy.clone().serve(
        listener,
        Default::default(),
        tokio_util::sync::CancellationToken::new(),
    ));
    (EmbeddedProxy::new(proxy), addr)
}

fn route_change(rt: &tokio::runtime::Runtime, dir: &Path, (a, b): (u16, u16)) {
    println!("route change to serving, one route among 1,000, {CHANGES} changes:");
    let idle = Duration::from_secs(3);
    let (t, plain, confirmed) = traefik(rt, dir, "traefik-change", &[], a);
    let web = SocketAddr::from(([127, 0, 0, 1], t.web));
    let (_, mut served) = flips(rt, &plain, web, (a, b), Duration::ZERO);
    line("traefik 3.7.15, defaults, back to back", &mut served);
    let (_, mut served) = flips(rt, &plain, web, (a, b), idle);
    line("traefik 3.7.15, defaults, 3 s apart", &mut served);
    let (mut returned, mut served) = flips(rt, &confirmed, web, (a, b), idle);
    line(
        "traefik, `api` set: apply returns (confirmed), 3 s apart",
        &mut returned,
    );
    line("traefik, `api` set: served, 3 s apart", &mut served);
    drop(t);
    let (t, plain, _) = traefik(
        rt,
        dir,
        "traefik-nothrottle",
        &["--providers.providersThrottleDuration=0s"],
        a,
    );
    let web = SocketAddr::from(([127, 0, 0, 1], t.web));
    let (_, mut served) = flips(rt, &plain, web, (a, b), Duration::ZERO);
    line(
        "traefik, providersThrottleDuration=0s, back to back",
        &mut served,
    );
    drop(t);

    let (c, p, listen) = caddy(dir);
    apply(rt, &p, &routes("r", 1000, a));
    let (mut returned, mut served) = flips(rt, &p, listen, (a, b), Duration::ZERO);
    line("caddy admin API: apply returns", &mut returned);
    line("caddy admin API: served", &mut served);
    drop(c);

    let (p, addr) = embedded(rt);
    apply(rt, &p, &routes("r", 1000, a));
    let (_, mut served) = flips(rt, &p, addr, (a, b), Duration::ZERO);
    line("vessel embedded proxy: served", &mut served);
}

/// Apply 1,000 routes at once through `p`; (apply returned, the last host served), after
/// checking every host serves.
fn thousand(
    rt: &tokio::runtime::Runtime,
    p: &dyn ProxyProvider,
    proxy: SocketAddr,
    up: u16,
) -> (Duration, Duration) {
    let batch = routes("n", 1000, up);
    let t = Instant::now();
    apply(rt, p, &batch);
    let returned = t.elapsed();
    wait_for(LIMIT, || served_by(proxy, "n999.localhost", up)).expect("the last host serves");
    let served = t.elapsed();
    for i in 0..1000 {
        assert!(
            served_by(proxy, &format!("n{i}.localhost"), up),
            "n{i}.localhost serves"
        );
    }
    (returned, served)
}

fn from_empty(rt: &tokio::runtime::Runtime, dir: &Path, up: u16) {
    println!("1,000 routes from empty to all serving (one batch):");
    let report = |label: &str, (returned, served): (Duration, Duration)| {
        println!(
            "  {label:<40} apply returned {:>9}, the 1,000th host served {:>9}",
            ms(returned),
            ms(served)
        )
    };
    for (name, confirm) in [
        ("traefik, defaults", false),
        ("traefik, defaults, `api` set", true),
    ] {
        let watched = dir.join(format!("empty-{}", usize::from(confirm)));
        std::fs::create_dir_all(&watched).expect("mkdir");
        let t = TraefikServer::start(
            &dir.join(format!("empty-{}-server", usize::from(confirm))),
            &watched,
            free_port(),
            free_port(),
            &[],
        );
        let p = Traefik::new(&settings(&watched, confirm.then_some(t.api))).expect("provider");
        // vessel running with no routes yet: its file (the placeholder) and the directory for
        // temporary files exist, and Traefik's throttle has run out (making the directory and
        // the file were two changes, 2 s apart).
        apply(rt, &p, &[]);
        std::thread::sleep(Duration::from_secs(5));
        report(
            name,
            thousand(rt, &p, SocketAddr::from(([127, 0, 0, 1], t.web)), up),
        );
    }
    let (_c, p, listen) = caddy(&dir.join("caddy-empty"));
    report("caddy admin API", thousand(rt, &p, listen, up));
    let (p, addr) = embedded(rt);
    report("vessel embedded proxy", thousand(rt, &p, addr, up));
}

fn throughput(rt: &tokio::runtime::Runtime, dir: &Path, up: u16) {
    let (t, _, _) = traefik(rt, dir, "traefik-wrk", &[], up);
    let web = t.web;
    let nginx: (Kill, u16) = nginx(up, dir).expect("nginx runs (apt-get install nginx)");
    let run = |label: &str, url: String, host: Option<&str>| match wrk(&url, host) {
        Some((rps, extra)) => println!("  {label:<52} {rps:>9.0} req/s, {extra}"),
        None => panic!("wrk runs (apt-get install wrk)"),
    };
    println!(
        "throughput, wrk -t2 -c64 -d8s, GET /healthz, 1,000 routes (2 cores shared by wrk, proxy and upstream; interleaved, twice):"
    );
    for round in 1..=2 {
        run(
            &format!("[{round}] direct to the upstream"),
            format!("http://127.0.0.1:{up}/healthz"),
            None,
        );
        for (name, host) in [("1st", "r0.localhost"), ("1,000th", "r999.localhost")] {
            run(
                &format!("[{round}] traefik, the {name} host"),
                format!("http://127.0.0.1:{web}/healthz"),
                Some(host),
            );
            run(
                &format!("[{round}] nginx, 1,000 server blocks, the {name} host"),
                format!("http://127.0.0.1:{}/healthz", nginx.1),
                Some(host),
            );
        }
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (a, b) = (free_port(), free_port());
    let _ua = devserver(a, dir.path());
    let _ub = devserver(b, dir.path());
    if only.is_empty() || only == "change" {
        route_change(&rt, dir.path(), (a, b));
    }
    if only.is_empty() || only == "empty" {
        from_empty(&rt, dir.path(), a);
    }
    if only.is_empty() || only == "wrk" {
        throughput(&rt, dir.path(), a);
    }
}
