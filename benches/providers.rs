//! The `caddy` proxy and `powerdns` DNS providers against real servers, measured:
//!
//! 1. 1,000 routes through Caddy: from empty, a no-op pass, and after 1% changed (10 routes
//!    pointed elsewhere). Target: under 0.5 s from empty.
//! 2. 10,000 records through PowerDNS: from empty, a no-op pass, and after 1% changed (100
//!    records). Targets: under 300 ms from empty, under 100 ms no-op.
//!
//! A pass here is what the reconciler does with one provider: observe it, work out the
//! changes against the desired set, and apply them as one batch (the planner's own cost is
//! measured by `cargo bench --bench plan`). Each figure is the median of 5 runs (min-max).
//!
//! Run: `cargo bench --bench providers` (needs caddy, pdns-server, pdns-backend-sqlite3 and
//! sqlite3, which `.ci/run` installs). Prints the figures; asserts only that each pass did
//! what it should.

#[path = "../tests/it/servers.rs"]
mod servers;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use vessel::model::plan::{RecordAction, RouteAction};

use servers::{Caddy, PDNS_KEY, Pdns};
use vessel::config::Secret;
use vessel::observed::RecordType;
use vessel::providers::{DnsProvider, ProxyProvider};

const RUNS: usize = 5;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn summary(mut v: Vec<Duration>) -> String {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    format!(
        "{:7.1} ms  ({:.1}-{:.1})",
        ms(v[v.len() / 2]),
        ms(v[0]),
        ms(v[v.len() - 1])
    )
}

/// One pass for a proxy: observe, diff against `want` (host -> upstream), apply as a batch.
/// Returns the number of changes applied.
async fn route_pass(p: &dyn ProxyProvider, want: &BTreeMap<String, String>) -> usize {
    let have: BTreeMap<String, String> = p
        .observe()
        .await
        .expect("observe")
        .into_iter()
        .filter(|r| r.owned)
        .map(|r| (r.host, r.upstream))
        .collect();
    let mut actions = Vec::new();
    for (host, upstream) in want {
        if have.get(host) != Some(upstream) {
            actions.push(RouteAction::UpsertRoute {
                host: host.clone(),
                path: None,
                strip_prefix: false,
                upstream: upstream.clone(),
                session: host.split('.').next().unwrap_or("s").to_string(),
                port: "ide".into(),
                route: None,
                upstream_from: None,
            });
        }
    }
    for host in have.keys().filter(|h| !want.contains_key(*h)) {
        actions.push(RouteAction::RemoveRoute {
            host: host.clone(),
            path: None,
        });
    }
    let refs: Vec<&RouteAction> = actions.iter().collect();
    if !refs.is_empty() {
        for r in p.apply(&refs).await {
            r.expect("apply");
        }
    }
    actions.len()
}

/// One pass for DNS: observe, diff against `want` (name -> address), apply as a batch.
async fn record_pass(p: &dyn DnsProvider, want: &BTreeMap<String, String>) -> usize {
    let have: BTreeMap<String, String> = p
        .observe()
        .await
        .expect("observe")
        .into_iter()
        .filter(|r| r.owned)
        .map(|r| (r.name, r.content))
        .collect();
    let mut actions = Vec::new();
    for (name, content) in want {
        if have.get(name) != Some(content) {
            actions.push(RecordAction::UpsertRecord {
                name: name.clone(),
                rtype: RecordType::A,
                content: content.clone(),
                session: name.split('.').next().unwrap_or("s").to_string(),
            });
        }
    }
    for name in have.keys().filter(|n| !want.contains_key(*n)) {
        actions.push(RecordAction::RemoveRecord {
            name: name.clone(),
            rtype: RecordType::A,
        });
    }
    let refs: Vec<&RecordAction> = actions.iter().collect();
    if !refs.is_empty() {
        for r in p.apply(&refs).await {
            r.expect("apply");
        }
    }
    actions.len()
}

async fn timed<F: std::future::Future<Output = usize>>(expect: usize, f: F) -> Duration {
    let t = Instant::now();
    let n = f.await;
    let d = t.elapsed();
    assert_eq!(n, expect, "the pass made the expected number of changes");
    d
}

async fn caddy(dir: &std::path::Path) {
    let (admin, listen) = (free_port(), free_port());
    let base = serde_json::json!({
        "admin": {"listen": format!("127.0.0.1:{admin}")},
        "apps": {"http": {"servers": {"vessel": {
            "listen": [format!("127.0.0.1:{listen}")],
            "automatic_https": {"disable": true},
            "routes": [{"@id": "foreign", "match": [{"host": ["shop.localhost"]}],
                        "handle": [{"handler": "static_response", "body": "shop"}]}]
        }}}}
    })
    .to_string();
    let server = Caddy::start(dir, admin, &base);
    let p = vessel::providers::proxy::caddy::Caddy::new(
        &format!("http://127.0.0.1:{admin}"),
        "vessel",
        &[],
        "vessel",
        None,
    )
    .expect("provider");
    let want: BTreeMap<String, String> = (0..1000)
        .map(|i| {
            (
                format!("s{i}.localhost"),
                format!("127.0.0.1:{}", 20000 + i),
            )
        })
        .collect();
    let mut changed = want.clone();
    for i in (0..1000).step_by(100) {
        changed.insert(
            format!("s{i}.localhost"),
            format!("127.0.0.1:{}", 40000 + i),
        );
    }
    let (mut empty, mut noop, mut one) = (vec![], vec![], vec![]);
    for _ in 0..RUNS {
        let (code, body) = servers::http(admin, "POST", "/load", "", &base);
        assert_eq!(code, 200, "{body}");
        empty.push(timed(1000, route_pass(&p, &want)).await);
        noop.push(timed(0, route_pass(&p, &want)).await);
        one.push(timed(10, route_pass(&p, &changed)).await);
    }
    let served = server.config();
    assert_eq!(
        served["apps"]["http"]["servers"]["vessel"]["routes"]
            .as_array()
            .map(Vec::len),
        Some(1001),
        "1,000 of vessel's routes and the foreign one"
    );
    println!("caddy, 1,000 routes    from empty {}", summary(empty));
    println!("                       no-op      {}", summary(noop));
    println!("                       1% changed {}", summary(one));
}

async fn powerdns(dir: &std::path::Path) {
    let server = Pdns::start(dir, free_port(), free_port(), "bench.example");
    let p = vessel::providers::dns::powerdns::PowerDns::new(
        &format!("http://127.0.0.1:{}", server.api),
        "localhost",
        Secret::new(PDNS_KEY),
        &["bench.example".to_string()],
        None,
    )
    .expect("provider");
    let want: BTreeMap<String, String> = (0..10_000)
        .map(|i| {
            (
                format!("s{i}.bench.example"),
                format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256),
            )
        })
        .collect();
    let mut changed = want.clone();
    for i in (0..10_000).step_by(100) {
        changed.insert(format!("s{i}.bench.example"), "192.0.2.1".into());
    }
    let none = BTreeMap::new();
    let (mut empty, mut noop, mut one) = (vec![], vec![], vec![]);
    for _ in 0..RUNS {
        empty.push(timed(10_000, record_pass(&p, &want)).await);
        noop.push(timed(0, record_pass(&p, &want)).await);
        one.push(timed(100, record_pass(&p, &changed)).await);
        timed(10_000, record_pass(&p, &none)).await;
    }
    println!("powerdns, 10,000 records from empty {}", summary(empty));
    println!("                       no-op      {}", summary(noop));
    println!("                       1% changed {}", summary(one));
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        if only.is_empty() || only == "caddy" {
            caddy(dir.path()).await;
        }
        if only.is_empty() || only == "powerdns" {
            powerdns(dir.path()).await;
        }
    });
}
