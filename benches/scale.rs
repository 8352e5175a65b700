//! The process provider at 10, 1,000 and 10,000 declared sessions (issue 17, point 3 and the
//! start-up part of point 5), measured in one run against their floors:
//!
//! 1. making N stopped sessions one after another (what a first start-up does): each create
//!    hands out a host port; it used to read every record to find a free one (quadratic);
//! 2. a no-op observation with the records kept in memory (each record's file is stat-ed, not
//!    read), against a cold one (a new provider reading and parsing every record, as every
//!    pass did before) and against the floor of listing the directory and stat-ing N files.
//!
//! 3. stopping at exit (`keep_on_exit: false`) with none of them running: one look at `/proc`
//!    for every session's processes, against what it was (a stop step for each session, each
//!    looking through `/proc` for its own).
//!
//! Run: `cargo bench --bench scale` (or `--profile dev` for a quick look). Prints the figures;
//! asserts only that each observation saw every session.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vessel::model::ComputeKind;
use vessel::model::observed::RuntimeSpec;
use vessel::model::plan::SessionAction;
use vessel::providers::compute::ComputeProvider;
use vessel::providers::compute::kept::Kept;
use vessel::providers::compute::process::{ProcessConfig, ProcessProvider};

fn provider(root: &std::path::Path) -> ProcessProvider {
    let config = ProcessConfig {
        port_base: 14000,
        keep_on_exit: false,
        ..ProcessConfig::default()
    };
    let kept = Kept::new(
        root.join("kept"),
        ComputeKind::Process,
        Duration::from_secs(3600),
    );
    ProcessProvider::new(root.join("sessions"), config, kept).expect("provider")
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let spec: Arc<RuntimeSpec> = Arc::new(
        serde_json::from_value(serde_json::json!({
            "compute": "process",
            "command": ["/bin/true"],
            "ports": {"ide": 8080}
        }))
        .expect("spec"),
    );
    println!(
        "| declared | make N stopped (per session) | no-op observe, records in memory | cold observe (reads every record) | floor: list + stat N files | stop at exit | stop at exit, one stop step each (before) |"
    );
    println!("|---|---|---|---|---|---|---|");
    for n in [10usize, 1_000, 10_000] {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = provider(dir.path());
        let t = Instant::now();
        for i in 0..n {
            let a = SessionAction::CreateSession {
                session: format!("user-{i}"),
                spec: spec.clone(),
                fingerprint: "f".into(),
                source_file: "s.yaml".into(),
                save_to: None,
                start: false,
                host: None,
                restore: false,
                unreachable: Vec::new(),
            };
            rt.block_on(p.apply(&a)).expect("create");
        }
        let made = t.elapsed();
        let observe = |p: &ProcessProvider| {
            let t = Instant::now();
            let seen = rt.block_on(p.observe()).expect("observe");
            assert_eq!(seen.len(), n);
            t.elapsed()
        };
        // Records written less than 2 s ago are read again (their stamps are not trusted yet).
        std::thread::sleep(Duration::from_millis(2100));
        observe(&p);
        let warm = median((0..7).map(|_| observe(&p)).collect());
        let cold = median((0..3).map(|_| observe(&provider(dir.path()))).collect());
        let root = dir.path().join("sessions");
        let floor = median(
            (0..7)
                .map(|_| {
                    let t = Instant::now();
                    let mut k = 0;
                    for e in std::fs::read_dir(&root).expect("list").flatten() {
                        if std::fs::symlink_metadata(e.path().join("session.json")).is_ok() {
                            k += 1;
                        }
                    }
                    assert_eq!(k, n);
                    t.elapsed()
                })
                .collect(),
        );
        let t = Instant::now();
        rt.block_on(p.shutdown());
        let exit = t.elapsed();
        let t = Instant::now();
        for i in 0..n {
            let a = SessionAction::StopSession {
                session: format!("user-{i}"),
                provider: ComputeKind::Process,
                stop_timeout: None,
            };
            rt.block_on(p.apply(&a)).expect("stop");
        }
        let each = t.elapsed();
        println!(
            "| {n} | {} ({:.3} ms) | {} | {} | {} | {} | {} |",
            ms(made),
            made.as_secs_f64() * 1e3 / n as f64,
            ms(warm),
            ms(cold),
            ms(floor),
            ms(exit),
            ms(each)
        );
    }
}
