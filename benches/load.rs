//! Loading benchmark: 10,000 generated session files (plus one plan file) loaded and validated.
//! Target: under 1 s in release on the project's 2-core machine.
//!
//! Run: `cargo bench --bench load`. Prints the figures; asserts nothing about time.

use std::time::{Duration, Instant};

use vessel::config::Config;
use vessel::load::load_tree;

const SESSIONS: usize = 10_000;
const RUNS: usize = 5;

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("plans.yaml"),
        "kind: Plan\nname: small\ncommand: [sleep, '1000']\nports: {ide: 8080, app: 5173}\nmemory: 1GiB\n",
    )
    .expect("write plan");
    std::fs::create_dir(dir.path().join("sessions")).expect("mkdir");
    for i in 0..SESSIONS {
        let y = format!(
            "# yaml-language-server: $schema=../schemas/session.schema.json\nkind: Session\nname: user-{i}\nplan: small\nowner: user{i}@example.com\nstate: running\nsource:\n  path: /srv/projects/user-{i}\n  exclude: [node_modules, .venv]\n  save_on_stop: true\nexpires: 2030-01-01T00:00:00Z\n"
        );
        std::fs::write(dir.path().join(format!("sessions/user-{i}.yaml")), y)
            .expect("write session");
    }
    let cfg = Config::embedded_default(dir.path());
    let mut times: Vec<Duration> = Vec::new();
    for _ in 0..RUNS {
        let t = Instant::now();
        let d = load_tree(dir.path(), &cfg, chrono::Utc::now()).expect("load");
        times.push(t.elapsed());
        assert_eq!(d.sessions.len(), SESSIONS);
        assert!(d.is_valid());
    }
    times.sort();
    println!(
        "load+validate {SESSIONS} session files: min {:.1} ms, median {:.1} ms, max {:.1} ms ({RUNS} runs; target < 1000 ms)",
        ms(times[0]),
        ms(times[RUNS / 2]),
        ms(times[RUNS - 1])
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
