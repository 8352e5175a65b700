//! The extra hop of `wake_listen` (issue 15, point 2), measured in one run against a real
//! Caddy and a real `vessel run` (release binary) with one process session:
//!
//! - `direct.localhost`: a route in Caddy (foreign to vessel, added by hand) straight to the
//!   session's upstream, as Caddy serves sessions without `wake_listen`;
//! - `alice.localhost`: vessel's route, Caddy -> vessel's wake listener -> the same upstream.
//!
//! Latency: 500 sequential GETs of /healthz on new connections, alternating the two, p50/p95.
//! Throughput: `wrk -t2 -c64 -d8s` GET /healthz, each in turn.
//!
//! Run: `cargo bench --bench fronted` (needs caddy and wrk). Prints the figures.

#[path = "../tests/it/servers.rs"]
mod servers;
mod support;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use servers::{Caddy, http};
use support::{Kill, free_port, get, ms, percentile, wait_for, wrk};

const PLAN: &str = "kind: Plan
name: web
command: ['{vessel}', devserver, --listen, '127.0.0.1:{port.ide}', --listen, '127.0.0.1:{port.app}', --root, '{workspace}']
ports: {ide: 8080, app: 5173}
health: {port: ide, path: /healthz}
";

const GETS: usize = 500;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let (admin, listen, wake, status) = (free_port(), free_port(), free_port(), free_port());
    let caddy_config = servers::caddy_with_empty_server(admin, listen);
    let _caddy = Caddy::start(d, admin, &caddy_config.to_string());
    std::fs::create_dir_all(d.join("desired")).expect("mkdir");
    std::fs::write(d.join("desired/plan.yaml"), PLAN).expect("plan");
    std::fs::write(
        d.join("desired/alice.yaml"),
        "kind: Session\nname: alice\nplan: web\n",
    )
    .expect("session");
    std::fs::write(
        d.join("vessel.yaml"),
        format!(
            "source: {{dir: desired}}\nstate_dir: state\nproviders:\n  compute:\n    process: {{port_base: {}}}\n  proxy:\n    caddy: {{admin: 'http://127.0.0.1:{admin}', server: vessel, wake_listen: '127.0.0.1:{wake}'}}\nstatus: {{listen: '127.0.0.1:{status}'}}\n",
            free_port()
        ),
    )
    .expect("config");
    let log = std::fs::File::create(d.join("vessel.log")).expect("log");
    let _vessel = Kill(
        Command::new(support::vessel())
            .args(["run", "vessel.yaml"])
            .current_dir(d)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("vessel runs"),
    );
    let caddy = SocketAddr::from(([127, 0, 0, 1], listen));
    let ok = |host: &str| {
        get(caddy, host, "/healthz").is_some_and(|(c, b)| c == 200 && b.ends_with("ok\n"))
    };
    wait_for(Duration::from_secs(30), || ok("alice.localhost")).unwrap_or_else(|| {
        panic!(
            "alice serves through Caddy: {}",
            std::fs::read_to_string(d.join("vessel.log")).unwrap_or_default()
        )
    });
    // The session's own upstream, as vessel observed it (through the wake listener's table).
    let upstream = || {
        let o: serde_json::Value = std::fs::read(d.join("state/observed.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())?;
        Some(
            o["routes"]["alice.localhost"]["upstream"]
                .as_str()?
                .to_string(),
        )
    };
    wait_for(Duration::from_secs(10), || upstream().is_some())
        .expect("alice's upstream in the observed snapshot");
    let upstream = upstream().expect("alice's upstream");
    let direct = serde_json::json!({
        "match": [{"host": ["direct.localhost"]}],
        "handle": [{"handler": "reverse_proxy", "upstreams": [{"dial": upstream}]}],
        "terminal": true
    });
    let (code, body) = http(
        admin,
        "POST",
        "/config/apps/http/servers/vessel/routes",
        "",
        &direct.to_string(),
    );
    assert_eq!(code, 200, "Caddy takes the direct route: {body}");
    wait_for(Duration::from_secs(10), || ok("direct.localhost")).expect("direct serves");

    println!(
        "Caddy -> session ({upstream}) vs Caddy -> wake listener (127.0.0.1:{wake}) -> session"
    );
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..GETS {
        for (host, v) in [("direct.localhost", &mut a), ("alice.localhost", &mut b)] {
            let t = Instant::now();
            assert!(ok(host), "{host} answers");
            v.push(t.elapsed());
        }
    }
    for (name, v) in [("direct", &mut a), ("fronted", &mut b)] {
        println!(
            "  latency {name:8} p50 {}  p95 {}  ({GETS} GETs, new connections)",
            ms(percentile(v, 0.5)),
            ms(percentile(v, 0.95))
        );
    }
    let url = format!("http://{caddy}/healthz");
    for (name, host) in [
        ("direct", "direct.localhost"),
        ("fronted", "alice.localhost"),
    ] {
        match wrk(&url, Some(host)) {
            Some((rps, rest)) => println!("  wrk -t2 -c64 -d8s {name:8} {rps:>9.0} req/s  {rest}"),
            None => println!("  wrk {name}: did not run (apt-get install wrk)"),
        }
    }
}
