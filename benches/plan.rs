//! Planner benchmark: 10,000 sessions, 30,000 routes and 10,000 DNS records, planned against
//! an empty world, a converged one, and one with 1% drift. Target: each under 50 ms.
//!
//! Run: `cargo bench --bench plan` (`BENCH_ONLY=empty` runs one case 50 times, for profiling). Prints the figures; asserts only that the plans are right.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use vessel::config::{Config, RouteTemplate};
use vessel::desired::{Desired, Doc};
use vessel::model::{PlanSpec, Port, SessionSpec, tag};
use vessel::observed::{Observed, RecordType, SessionState};
use vessel::planner::{plan, simulate::converge};

const SESSIONS: usize = 10_000;
const RUNS: usize = 7;

fn doc<T>(spec: T, file: String) -> Doc<T> {
    Doc {
        spec,
        file: PathBuf::from(file),
        pos: Default::default(),
        fields: BTreeMap::new(),
    }
}

fn main() {
    let mut d = Desired::default();
    let p = PlanSpec {
        kind: tag::Plan::Plan,
        name: "web".into(),
        compute: Default::default(),
        image: None,
        guest: None,
        template: None,
        clone: None,
        storage: None,
        pull: None,
        command: vec!["serve".into(), "{port.ide}".into()],
        env: BTreeMap::new(),
        cpus: Some(1.0),
        memory: "1GiB".parse().ok(),
        disk: None,
        ports: [
            ("ide".to_string(), Port(8080)),
            ("app".to_string(), Port(5173)),
        ]
        .into_iter()
        .collect(),
        health: None,
        firewall: None,
        hotplug: false,
        snapshots: None,
        idle_timeout: None,
        sleep: None,
        stop_timeout: None,
        warn_before: None,
        schedule: None,
    };
    d.plans.insert("web".into(), doc(p, "plans.yaml".into()));
    for i in 0..SESSIONS {
        let name = format!("user-{i}");
        let s = SessionSpec {
            kind: tag::Session::Session,
            name: name.clone(),
            plan: "web".into(),
            owner: None,
            state: Default::default(),
            source: None,
            expires: None,
            on_expiry: Default::default(),
            restart_requested: None,
            destroy_after: None,
            warn_before: None,
            schedule: None,
            env: BTreeMap::new(),
            location: None,
            idle_timeout: None,
        };
        d.sessions
            .insert(name.clone(), doc(s, format!("{name}.yaml")));
    }
    let mut policy = Config::embedded_default(std::path::Path::new(".")).policy(chrono::Utc::now());
    // {session}.{domain} with DNS, {port}-{session}.{domain} for both ports: 3 routes, 1 record.
    policy.templates = vec![
        RouteTemplate {
            host: "{session}.{domain}".into(),
            port: "ide".into(),
            dns: true,
            waking_page: None,
        },
        RouteTemplate {
            host: "{port}-{session}.{domain}".into(),
            port: "*".into(),
            dns: false,
            waking_page: None,
        },
    ];
    policy.dns = Some((RecordType::A, "192.0.2.1".into()));
    policy.allow_destroy = true;

    let empty = Observed::default();
    let (converged, passes) = converge(&d, &empty, &policy, 4);
    assert_eq!(
        converged.sessions.len(),
        SESSIONS,
        "converged in {passes} passes"
    );
    assert_eq!(converged.routes.len(), 3 * SESSIONS);
    assert_eq!(converged.records.len(), SESSIONS);

    let mut drifted = converged.clone();
    for (i, s) in drifted.sessions.values_mut().enumerate() {
        if i % 100 == 0 {
            s.state = SessionState::Failed;
        }
    }
    for (i, r) in drifted.routes.values_mut().enumerate() {
        if i % 100 == 1 {
            r.upstream = "127.0.0.1:1".into();
        }
    }
    let keys: Vec<String> = drifted.records.keys().step_by(100).cloned().collect();
    for k in keys {
        drifted.records.remove(&k);
    }

    let only = std::env::var("BENCH_ONLY").ok();
    let runs = if only.is_some() { 50 } else { RUNS };
    for (label, observed) in [
        ("empty", &empty),
        ("converged", &converged),
        ("1% drift", &drifted),
    ] {
        if only.as_deref().is_some_and(|o| o != label) {
            continue;
        }
        let mut times: Vec<Duration> = Vec::new();
        let mut steps = 0;
        for _ in 0..runs {
            let t = Instant::now();
            let p = plan(&d, observed, &policy);
            times.push(t.elapsed());
            steps = p.steps.len() + p.deferred.len();
        }
        times.sort();
        println!(
            "plan 10k sessions / 30k routes / 10k records against {label:>9}: median {:6.1} ms, min {:6.1} ms ({steps} steps+deferred; target < 50 ms)",
            times[runs / 2].as_secs_f64() * 1e3,
            times[0].as_secs_f64() * 1e3,
        );
    }
}
