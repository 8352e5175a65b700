//! Loading benchmark: 10,000 generated session files (plus one plan file) loaded and validated.
//! Target: under 1 s in release on the project's 2-core machine. Then hostile shapes: one file
//! with 10, 1,000 and 9,999 errors (each a "did you mean"), as many routes naming a missing
//! session (cross-file errors), and a plan whose port names are 100,000 characters long; each
//! must stay linear (9,999 errors took 3.3 s, the long port name 40 s, when quadratic).
//!
//! Then incremental loading (issue 17): a pass's load with 10, 1,000 and 10,000 declared
//! session files, from nothing (a full load), with the last pass's cache and nothing changed,
//! and with the cache and one file changed.
//!
//! Run: `cargo bench --bench load`. Prints the figures; asserts nothing about time.

use std::time::{Duration, Instant};

use vessel::config::Config;
use vessel::load::{LoadCache, load_tree, load_tree_cached};

/// The daemon's allocator (`src/main.rs`), so the figures are the daemon's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SESSIONS: usize = 10_000;
const RUNS: usize = 5;

fn main() {
    let dir = session_tree(SESSIONS);
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
    incremental();
    hostile();
}

/// A tree of one plan file and `n` session files.
fn session_tree(n: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("plans.yaml"),
        "kind: Plan\nname: small\ncommand: [sleep, '1000']\nports: {ide: 8080, app: 5173}\nmemory: 1GiB\n",
    )
    .expect("write plan");
    std::fs::create_dir(dir.path().join("sessions")).expect("mkdir");
    for i in 0..n {
        std::fs::write(
            dir.path().join(format!("sessions/user-{i}.yaml")),
            session(i, "running"),
        )
        .expect("write session");
    }
    dir
}

fn session(i: usize, state: &str) -> String {
    format!(
        "# yaml-language-server: $schema=../schemas/session.schema.json\nkind: Session\nname: user-{i}\nplan: small\nowner: user{i}@example.com\nstate: {state}\nsource:\n  path: /srv/projects/user-{i}\n  exclude: [node_modules, .venv]\n  save_on_stop: true\nexpires: 2030-01-01T00:00:00Z\n"
    )
}

/// The median of `runs` timings of `f`.
fn median(runs: usize, mut f: impl FnMut() -> Duration) -> Duration {
    let mut t: Vec<Duration> = (0..runs).map(|_| f()).collect();
    t.sort();
    t[runs / 2]
}

fn incremental() {
    println!(
        "incremental loading: one pass's load, median of 7 (files written more than {} s before, as a daemon's are)",
        vessel::load::cache::RACY.as_secs()
    );
    println!(
        "{:>8} | {:>10} | {:>22} | {:>21}",
        "declared", "full load", "incremental, no change", "incremental, 1 changed"
    );
    for n in [10, 1_000, 10_000] {
        let dir = session_tree(n);
        let root = dir.path();
        let cfg = Config::embedded_default(root);
        let now = chrono::Utc::now();
        let mut cache = LoadCache::default();
        load_tree_cached(root, &cfg, now, &mut cache).expect("load");
        // Past the time in which a file just written is read again.
        std::thread::sleep(vessel::load::cache::RACY + Duration::from_millis(200));
        load_tree_cached(root, &cfg, now, &mut cache).expect("load");
        let full = median(7, || {
            let t = Instant::now();
            let d = load_tree(root, &cfg, now).expect("load");
            let took = t.elapsed();
            assert_eq!(d.sessions.len(), n);
            took
        });
        let same = median(7, || {
            let t = Instant::now();
            let d = load_tree_cached(root, &cfg, now, &mut cache).expect("load");
            let took = t.elapsed();
            assert_eq!(
                (d.sessions.len(), cache.last().read),
                (n, 0),
                "{n}: {:?}",
                cache.last()
            );
            took
        });
        let mut k = 0;
        let one = median(7, || {
            k += 1;
            // A file whose bytes differ from what the cache has (the first round stops them).
            let state = if (k / n) % 2 == 0 {
                "stopped"
            } else {
                "running"
            };
            let file = root.join(format!("sessions/user-{}.yaml", k % n));
            std::fs::write(file, session(k % n, state)).expect("write");
            let t = Instant::now();
            let d = load_tree_cached(root, &cfg, now, &mut cache).expect("load");
            let took = t.elapsed();
            assert_eq!(d.sessions.len(), n);
            assert!(cache.last().parsed == 1, "{:?}", cache.last());
            took
        });
        println!(
            "{n:>8} | {:>7.1} ms | {:>19.1} ms | {:>18.1} ms",
            ms(full),
            ms(same),
            ms(one)
        );
    }
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
