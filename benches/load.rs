//! Loading benchmark: 10,000 generated session files (plus one plan file) loaded and validated.
//! Target: under 1 s in release on the project's 2-core machine. Then hostile shapes: one file
//! with 10, 1,000 and 9,999 errors (each a "did you mean"), as many routes naming a missing
//! session (cross-file errors), and a plan whose port names are 100,000 characters long; each
//! must stay linear (9,999 errors took 3.3 s, the long port name 40 s, when quadratic).
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
    hostile();
}

/// Time loading a tree with one plan file and `file` holding `text`; the errors counted.
fn time_tree(file: &str, text: &str) -> (Duration, usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("plans.yaml"),
        "kind: Plan\nname: small\ncommand: [sleep, '1']\nports: {ide: 8080}\n",
    )
    .expect("write plan");
    std::fs::write(dir.path().join(file), text).expect("write");
    let cfg = Config::embedded_default(dir.path());
    let t = Instant::now();
    let d = load_tree(dir.path(), &cfg, chrono::Utc::now()).expect("load");
    let took = t.elapsed();
    let shown = d.errors().count();
    (took, shown)
}

fn hostile() {
    for n in [10, 1_000, 9_999] {
        let y: String = (0..n)
            .map(|i| format!("---\nkind: Sesion\nname: s{i}\n"))
            .collect();
        let (t, shown) = time_tree("many.yaml", &y);
        println!(
            "{n} errors in one file (unknown kind, did-you-mean each): {:.1} ms, {shown} shown",
            ms(t)
        );
    }
    for n in [10, 1_000, 10_000] {
        let y: String = (0..n)
            .map(|i| format!("---\nkind: Route\nname: r{i}\nhost: r{i}.localhost\nsession: nobody{i}\nport: ide\n"))
            .collect();
        let (t, shown) = time_tree("routes.yaml", &y);
        println!(
            "{n} routes naming a missing session (cross-file errors): {:.1} ms, {shown} shown",
            ms(t)
        );
    }
    let long = "p".repeat(100_000);
    let y = format!(
        "kind: Plan\nname: big\ncompute: docker\nimage: x\nports:\n  ? {long}\n  : 80\nhealth: {{port: {long}q}}\n"
    );
    let (t, shown) = time_tree("big.yaml", &y);
    println!(
        "a 100,000-character port name and a near miss: {:.1} ms, {shown} shown",
        ms(t)
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
