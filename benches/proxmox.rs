//! The proxmox provider against the Proxmox API contract double (`tests/it/pve_double.rs`,
//! every request checked against Proxmox's published schema) with realistic task times:
//! clone 2 s, start 1 s, the guest agent's address 3 s after a start.
//!
//! 1. 50 sessions from empty (creates and health waits all at once, as the executor hands
//!    them over; the provider bounds clones and starts per node), against the sequential sum
//!    of the same steps (one session's create and health wait, measured alone, times 50).
//!    Target: at most 0.15x.
//! 2. A no-op observation of 500 guests on two clusters. Target: one API call per cluster,
//!    under 50 ms.
//!
//! `cargo bench --bench proxmox` (options: `-- --sessions N --nodes N --guests N`).

#[path = "support/mod.rs"]
mod support;

mod daemon_support {
    pub use crate::support::free_port;
}

#[path = "../tests/it/pve_double.rs"]
#[allow(dead_code)]
mod pve_double;

use std::sync::Arc;
use std::time::{Duration, Instant};

use pve_double::{Double, TOKEN_ID, TOKEN_SECRET, Timing};
use vessel::model::observed::RuntimeSpec;
use vessel::model::plan::SessionAction;
use vessel::model::{ComputeKind, Guest, Port, Size};
use vessel::providers::ComputeProvider;
use vessel::providers::compute::proxmox::{ProxmoxConfig, ProxmoxProvider};

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn realistic() -> Timing {
    Timing {
        clone: Duration::from_secs(2),
        start: Duration::from_secs(1),
        stop: Duration::from_secs(1),
        resize: Duration::from_millis(200),
        delete: Duration::from_millis(500),
        address_after: Duration::from_secs(3),
        latency: Duration::from_millis(2),
    }
}

fn provider(dir: &std::path::Path, clusters: &[(&str, &Double, Vec<String>)]) -> ProxmoxProvider {
    let token = dir.join("token");
    std::fs::write(&token, TOKEN_SECRET).expect("token");
    let mut yaml = String::from("clusters:\n");
    for (name, d, nodes) in clusters {
        let nodes: Vec<String> = nodes.iter().map(|n| format!("{{name: {n}}}")).collect();
        yaml.push_str(&format!(
            "  - {{name: {name}, url: '{}', token_id: '{TOKEN_ID}', token_secret: {{file: '{}'}}, nodes: [{}]}}\n",
            d.url,
            token.display(),
            nodes.join(", ")
        ));
    }
    yaml.push_str("poll_interval: 250ms\nmax_tasks_per_node: 8\n");
    let config: ProxmoxConfig = serde_saphyr::from_str(&yaml).expect("config");
    ProxmoxProvider::new(config, dir.join("records")).expect("provider")
}

fn spec(port: u16) -> RuntimeSpec {
    RuntimeSpec {
        compute: ComputeKind::Proxmox,
        image: None,
        guest: Some(Guest::Vm),
        template: Some("debian-vm".into()),
        clone: None,
        storage: None,
        pull: None,
        command: vec![],
        env: Default::default(),
        cpus: Some(2.0),
        memory: Some(Size(2 << 30)),
        disk: Some(Size(8 << 30)),
        ports: [("ide".to_string(), Port(port))].into(),
        health: None,
        firewall: None,
        hotplug: false,
        stop_timeout: None,
    }
}

/// Create one session on `node` and wait until it is healthy.
async fn make(p: &ProxmoxProvider, session: String, node: String, spec: Arc<RuntimeSpec>) {
    let create = SessionAction::CreateSession {
        session: session.clone(),
        fingerprint: spec.fingerprint(),
        spec,
        source_file: "bench.yaml".into(),
        save_to: None,
        start: true,
        host: Some(node),
        restore: false,
        unreachable: vec![],
    };
    p.apply(&create).await.expect("created");
    let wait = SessionAction::WaitHealthy {
        session,
        provider: ComputeKind::Proxmox,
        port: Some("ide".into()),
        check: None,
    };
    p.apply(&wait).await.expect("healthy");
}

fn main() {
    let sessions = arg("--sessions", 50);
    let nodes = arg("--nodes", 3);
    let guests = arg("--guests", 500);
    // The guests' service: the double's guests report 127.0.0.1.
    let service = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = service.local_addr().expect("addr").port();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    // 1. From empty.
    let node_names: Vec<String> = (1..=nodes).map(|i| format!("pve{i}")).collect();
    let names: Vec<&str> = node_names.iter().map(String::as_str).collect();
    let d = Double::start(&names, realistic());
    d.add(9000, "qemu", "pve1", "debian-vm", true);
    let dir = tempfile::tempdir().expect("tempdir");
    let p = provider(dir.path(), &[("lab", &d, node_names.clone())]);
    let spec = Arc::new(spec(port));
    let one = rt.block_on(async {
        let t = Instant::now();
        make(&p, "solo".into(), "pve1".into(), spec.clone()).await;
        t.elapsed()
    });
    let sequential = one * sessions as u32;
    let calls_before = p.api_calls();
    let all = rt.block_on(async {
        let t = Instant::now();
        let jobs = (0..sessions).map(|i| {
            let (p, spec) = (&p, spec.clone());
            let node = node_names[i % nodes].clone();
            async move { make(p, format!("s{i}"), node, spec).await }
        });
        futures_util::future::join_all(jobs).await;
        t.elapsed()
    });
    let ratio = all.as_secs_f64() / sequential.as_secs_f64();
    println!(
        "proxmox: {sessions} sessions from empty on {nodes} nodes (clone 2 s, start 1 s, address after 3 s; at most 8 clones and starts at once per node): {:.1} s, against {:.1} s for their steps one after another ({:.1} s for one session, measured alone): {ratio:.3}x (target at most 0.15x) [{}]; {} API calls",
        all.as_secs_f64(),
        sequential.as_secs_f64(),
        one.as_secs_f64(),
        if ratio <= 0.15 { "met" } else { "NOT met" },
        p.api_calls() - calls_before
    );
    drop(d);

    // 2. A no-op observation of `guests` guests on two clusters.
    let a = Double::start(&["a1", "a2"], Timing::quick());
    let b = Double::start(&["b1", "b2"], Timing::quick());
    for (i, (double, node)) in (0..guests)
        .map(|i| if i % 2 == 0 { (&a, "a1") } else { (&b, "b1") })
        .enumerate()
    {
        let vmid = 1000 + i as u64;
        double.add(vmid, "qemu", node, &format!("vessel-g{i}"), false);
        double.with(|w| {
            if let Some(g) = w.guests.get_mut(&vmid) {
                g.tags = "vessel.vessel;fp.0123456789abcdef".into();
                g.status = "running";
            }
        });
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let p = provider(
        dir.path(),
        &[
            ("a", &a, vec!["a1".into(), "a2".into()]),
            ("b", &b, vec!["b1".into(), "b2".into()]),
        ],
    );
    let mut best = Duration::MAX;
    let mut calls = 0;
    let mut seen = 0;
    for _ in 0..5 {
        let before = p.api_calls();
        let t = Instant::now();
        let o = rt.block_on(p.observe()).expect("observed");
        best = best.min(t.elapsed());
        calls = p.api_calls() - before;
        seen = o.len();
    }
    println!(
        "proxmox: no-op observation of {seen} guests on 2 clusters: {calls} API calls ({} per cluster), {:.1} ms (best of 5; target one call per cluster, under 50 ms) [{}]",
        calls / 2,
        best.as_secs_f64() * 1000.0,
        if calls == 2 && best < Duration::from_millis(50) {
            "met"
        } else {
            "NOT met"
        }
    );
    drop(service);
}
