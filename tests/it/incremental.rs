//! Incremental loading: a load that keeps what the last one parsed gives what a load from
//! nothing gives, over random edit sequences (create, modify, a same-size modify that keeps
//! the modification time, truncate, delete, rename, broken YAML, comment-only files, names
//! declared twice, files over the load's budgets), for a directory and for a git source (real
//! git); and it reads only what changed.

use std::path::Path;

use chrono::Utc;
use vessel::config::Config;
use vessel::desired::Desired;
use vessel::load::{LoadCache, load_tree, load_tree_cached};
use vessel::model::observed::Observed;
use vessel::settle::{Root, SourceHistory};

use crate::support::git;

/// Seeded: the sequences are the same on every run.
struct Rng(proptest::test_runner::TestRng);

impl Rng {
    fn new(seed: u64) -> Rng {
        let mut bytes = [0u8; 32];
        bytes[..8].copy_from_slice(&seed.to_le_bytes());
        Rng(proptest::test_runner::TestRng::from_seed(
            proptest::test_runner::RngAlgorithm::ChaCha,
            &bytes,
        ))
    }
    fn below(&mut self, n: usize) -> usize {
        use proptest::prelude::Rng as _;
        (self.0.next_u64() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
}

const NAMES: &[&str] = &[
    "a.yaml",
    "b.yaml",
    "c.yml",
    "d.yaml",
    "sub/e.yaml",
    "sub/f.yaml",
    "sub/deeper/g.yaml",
    "z.yaml",
];

/// Contents a file may be given: valid objects (with names shared between files, so some are
/// declared twice), references that resolve or not, broken YAML, comment-only and empty files,
/// several documents, not UTF-8, and a file of many nodes.
fn content(rng: &mut Rng) -> Vec<u8> {
    let s = ["alice", "bob", "carol"][rng.below(3)];
    let n = rng.below(10);
    let text = match rng.below(14) {
        0 => "kind: Plan\nname: web\ncommand: [sleep, '1000']\nports: {ide: 8080, app: 5173}\n"
            .to_string(),
        1 => format!("kind: Plan\nname: p{n}\ncommand: [sleep, '{n}']\nports: {{ide: 808{n}}}\n"),
        2 | 3 => format!("kind: Session\nname: {s}\nplan: web\nowner: u{n}@example.com\n"),
        4 => format!("kind: Session\nname: {s}{n}\nplan: p{n}\n"),
        5 => format!(
            "kind: Route\nname: r{n}\nhost: docs-{n}.example.com\nsession: {s}\nport: app\n"
        ),
        6 => format!("kind: Session\nname: {s}\nplan: [unclosed\n"),
        7 => "# only a comment\n# and another\n".to_string(),
        8 => String::new(),
        9 => format!(
            "kind: Session\nname: {s}\nplan: web\n---\nkind: Route\nname: r{n}\nhost: x{n}.example.com\nsession: {s}\nport: ide\n"
        ),
        10 => format!("kind: Sesion\nname: {s}\n"),
        11 => return vec![b'k', 0xff, 0xfe, b'\n'],
        12 => (0..8)
            .map(|i| format!("---\nkind: Session\nname: many-{n}-{i}\nplan: web\n"))
            .collect(),
        _ => format!("kind: Session\nname: {s}\nplan: web\nbogus: field\n"),
    };
    text.into_bytes()
}

/// One random change to the tree at `root`.
fn edit(rng: &mut Rng, root: &Path) {
    let name = *rng.pick(NAMES);
    let path = root.join(name);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).expect("mkdir");
    }
    let exists = path.exists();
    match rng.below(8) {
        // Create or modify.
        0..=2 => std::fs::write(&path, content(rng)).expect("write"),
        // The same size, the same modification time: only the bytes (and the change time)
        // differ.
        3 if exists => {
            let mut bytes = std::fs::read(&path).expect("read");
            if let Some(b) = bytes.iter_mut().find(|b| b.is_ascii_digit()) {
                *b = if *b == b'9' { b'0' } else { *b + 1 };
            } else if let Some(b) = bytes.iter_mut().find(|b| **b == b'a') {
                *b = b'o';
            }
            let before = std::fs::metadata(&path).expect("stat");
            std::fs::write(&path, &bytes).expect("write");
            let mtime = before.modified().expect("mtime");
            std::fs::File::options()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_modified(mtime))
                .expect("set mtime");
        }
        // Truncate (to nothing, or half way).
        4 if exists => {
            let len = std::fs::metadata(&path).expect("stat").len();
            let f = std::fs::File::options()
                .write(true)
                .open(&path)
                .expect("open");
            f.set_len(if rng.below(2) == 0 { 0 } else { len / 2 })
                .expect("truncate");
        }
        5 if exists => std::fs::remove_file(&path).expect("delete"),
        // Rename, over another file or not.
        6 if exists => {
            let to = root.join(rng.pick(NAMES));
            if let Some(dir) = to.parent() {
                std::fs::create_dir_all(dir).expect("mkdir");
            }
            std::fs::rename(&path, &to).expect("rename");
        }
        // Replace atomically (a new inode, as editors save).
        _ => {
            let tmp = root.join(".tmp-save");
            std::fs::write(&tmp, content(rng)).expect("write");
            std::fs::rename(&tmp, &path).expect("rename");
        }
    }
}

/// The configs the sequences run under: the default, and budgets tight enough that edits to
/// earlier files move later ones in and out of them.
fn configs(root: &Path) -> Vec<Config> {
    let mut tight_bytes = Config::embedded_default(root);
    tight_bytes.load.max_total_bytes = vessel::model::Size(700);
    let mut tight_nodes = Config::embedded_default(root);
    tight_nodes.load.max_total_nodes = 90;
    vec![Config::embedded_default(root), tight_bytes, tight_nodes]
}

/// Everything a load gives, and what the settle history makes of it, as text.
fn seen(
    history: &mut SourceHistory,
    mut d: Desired,
    root: Option<&Path>,
    now: chrono::DateTime<Utc>,
) -> String {
    let cfg = Config::embedded_default(Path::new("."));
    let settle = history.record(
        &mut d,
        &Observed::default(),
        &cfg.routes.templates,
        "localhost",
        Root(root),
        now,
    );
    format!("{d:#?}\n{settle:#?}")
}

/// The two loads are the same, or a diff of them says where they part.
fn same(full: &str, incremental: &str, at: &str) {
    if full != incremental {
        let diff = similar::TextDiff::from_lines(full, incremental)
            .unified_diff()
            .header("full", "incremental")
            .to_string();
        panic!("{at}: the loads differ\n{diff}");
    }
}

#[test]
fn incremental_dir_load_equals_full_load_over_random_edits() {
    for (seed, cfg_index) in [(1u64, 0usize), (7, 0), (42, 1), (99, 2), (1234, 1), (5, 2)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("desired");
        std::fs::create_dir_all(&root).expect("mkdir");
        let cfg = configs(&root).swap_remove(cfg_index);
        let mut rng = Rng::new(seed);
        let mut cache = LoadCache::default();
        let settle = std::time::Duration::from_millis(300);
        let (mut full_h, mut inc_h) = (SourceHistory::new(settle), SourceHistory::new(settle));
        let mut parsed = 0;
        for step in 0..150 {
            for _ in 0..1 + rng.below(3) {
                edit(&mut rng, &root);
            }
            let now = Utc::now();
            let full = load_tree(&root, &cfg, now).expect("full load");
            let inc = load_tree_cached(&root, &cfg, now, &mut cache).expect("incremental load");
            parsed += cache.last().parsed;
            let (full, inc) = (
                seen(&mut full_h, full, Some(&root), now),
                seen(&mut inc_h, inc, Some(&root), now),
            );
            same(
                &full,
                &inc,
                &format!("seed {seed}, config {cfg_index}, step {step}"),
            );
            assert!(
                cache.len() <= cache.last().files,
                "entries only for files that exist"
            );
        }
        assert!(parsed > 0);
    }
}

#[test]
fn incremental_git_load_equals_full_load_over_random_edits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bare = dir.path().join("remote.git");
    let work = dir.path().join("work");
    let s = |p: &Path| p.to_str().expect("utf-8").to_string();
    git(
        dir.path(),
        &["init", "-q", "--bare", "-b", "main", &s(&bare)],
    );
    git(dir.path(), &["clone", "-q", &s(&bare), &s(&work)]);
    let root = work.join("desired");
    std::fs::create_dir_all(&root).expect("mkdir");
    std::fs::write(root.join("keep.yaml"), "# kept\n").expect("write");
    let commit = |m: &str| {
        git(&work, &["add", "-A"]);
        git(&work, &["commit", "-q", "--allow-empty", "-m", m]);
        git(&work, &["push", "-q", "origin", "HEAD:main"]);
    };
    commit("start");
    for (seed, cfg_index) in [(3u64, 0usize), (11, 1), (17, 2)] {
        let state = dir.path().join(format!("state-{seed}"));
        let config_file = dir.path().join(format!("vessel-{seed}.yaml"));
        std::fs::write(
            &config_file,
            format!(
                "source: {{git: {{url: '{}', ref: main, path: desired}}}}\nstate_dir: {}\n",
                s(&bare),
                s(&state)
            ),
        )
        .expect("config");
        let mut cfg = vessel::load::load_config(&config_file).expect("config loads");
        cfg.load = configs(&root)[cfg_index].load;
        let mut rng = Rng::new(seed);
        let mut cache = LoadCache::default();
        let settle = std::time::Duration::from_millis(300);
        let (mut full_h, mut inc_h) = (SourceHistory::new(settle), SourceHistory::new(settle));
        let mut read = 0;
        for step in 0..40 {
            for _ in 0..1 + rng.below(3) {
                edit(&mut rng, &root);
            }
            let _ = std::fs::remove_file(root.join(".tmp-save"));
            commit(&format!("step {step}"));
            let now = Utc::now();
            let inc = vessel::source::load_cached(&cfg, now, &mut cache).expect("incremental");
            read += cache.last().read;
            let full = vessel::source::load(&cfg, now).expect("full load");
            let (full, inc) = (
                seen(&mut full_h, full, None, now),
                seen(&mut inc_h, inc, None, now),
            );
            same(
                &full,
                &inc,
                &format!("seed {seed}, config {cfg_index}, step {step}"),
            );
        }
        // The same commit again: no blob is read, but under a tight budget those of files
        // whose parse failed under the limit the budget lowered (what they give depends on the
        // files before them, so it is not kept).
        let d = vessel::source::load_cached(&cfg, Utc::now(), &mut cache).expect("again");
        let bound = if cfg_index == 0 {
            0
        } else {
            d.quarantined.len()
        };
        assert!(
            cache.last().read <= bound,
            "seed {seed}: {:?}",
            cache.last()
        );
        assert!(read > 0);
    }
}

#[test]
fn an_unchanged_file_is_neither_read_nor_parsed_and_a_changed_one_is() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    std::fs::write(
        root.join("plan.yaml"),
        "kind: Plan\nname: web\ncommand: [sleep, '1000']\nports: {ide: 8080}\n",
    )
    .expect("write");
    for i in 0..20 {
        std::fs::write(
            root.join(format!("s{i}.yaml")),
            format!("kind: Session\nname: s{i}\nplan: web\n"),
        )
        .expect("write");
    }
    let cfg = Config::embedded_default(root);
    let mut cache = LoadCache::default();
    let load = |cache: &mut LoadCache| {
        let d = load_tree_cached(root, &cfg, Utc::now(), cache).expect("load");
        (d, cache.last())
    };
    let (d, stats) = load(&mut cache);
    assert_eq!((d.sessions.len(), stats.files, stats.parsed), (20, 21, 21));
    // Files written this moment are read again until their times are older than the file
    // system's clock could confuse: read, but not parsed.
    let (_, stats) = load(&mut cache);
    assert_eq!((stats.read, stats.parsed), (21, 0), "{stats:?}");
    std::thread::sleep(vessel::load::cache::RACY + std::time::Duration::from_millis(200));
    let (_, stats) = load(&mut cache);
    assert_eq!((stats.read, stats.parsed), (21, 0), "{stats:?}");
    let (d0, stats) = load(&mut cache);
    assert_eq!((stats.read, stats.parsed), (0, 0), "{stats:?}");

    // Touched: read (its times changed), not parsed (its bytes did not).
    let f = std::fs::File::options()
        .write(true)
        .open(root.join("s3.yaml"))
        .expect("open");
    f.set_modified(std::time::SystemTime::now()).expect("touch");
    let (_, stats) = load(&mut cache);
    assert_eq!((stats.read, stats.parsed), (1, 0), "{stats:?}");

    // The same size and modification time, other bytes: the change time gives it away.
    let path = root.join("s4.yaml");
    let mtime = std::fs::metadata(&path)
        .and_then(|m| m.modified())
        .expect("mtime");
    std::fs::write(&path, "kind: Session\nname: s9\nplan: web\n").expect("write");
    std::fs::File::options()
        .write(true)
        .open(&path)
        .and_then(|f| f.set_modified(mtime))
        .expect("set mtime");
    let (d, stats) = load(&mut cache);
    // (s3, touched a moment ago, is read again too.)
    assert_eq!((stats.read, stats.parsed), (2, 1), "{stats:?}");
    assert!(
        d.quarantined.contains_key(Path::new("s4.yaml")),
        "s9 is now declared twice"
    );
    assert_eq!(d0.sessions.len(), 20);

    // Deleted: gone from the cache too.
    std::fs::remove_file(root.join("s5.yaml")).expect("rm");
    let (d, stats) = load(&mut cache);
    assert_eq!((stats.files, cache.len()), (20, 20));
    assert!(!d.sessions.contains_key("s5"));
}

/// `/metrics` of a daemon, as text.
fn metrics(d: &crate::daemon_support::Daemon) -> String {
    crate::daemon_support::get(d.status, "status", "/metrics")
        .map(|(_, b)| b)
        .unwrap_or_default()
}

/// A counter's value in OpenMetrics text (0 when it has no sample yet).
fn counter(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// The loop's cost follows what changed: once converged, passes on the timer that find
/// nothing changed do nothing (`vessel_quiet_passes_total` counts them), and yet a session
/// whose process exits by itself is started again on the next one, and a changed file is
/// loaded; a change of anything makes the next pass a whole one.
#[test]
fn passes_on_the_timer_do_nothing_while_nothing_changes_and_still_repair() {
    use crate::daemon_support::{Daemon, session, wait_for};
    use std::time::Duration;
    let mut d = Daemon::new();
    d.write("alice.yaml", &session("alice"));
    d.start();
    let limit = Duration::from_secs(30);
    wait_for(limit, || {
        d.get("alice.localhost", "/healthz")
            .is_some_and(|(c, _)| c == 200)
    })
    .expect("alice serves");
    // Quiet passes come, one a second.
    let quiet = || counter(&metrics(&d), "vessel_quiet_passes_total");
    wait_for(limit, || quiet() >= 2).expect("quiet passes");
    let events = d.events().lines().count();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        d.events().lines().count(),
        events,
        "a quiet pass takes no step"
    );

    // Her process exits by itself: the next timer pass sees it and starts her again.
    let (_, pid) = d
        .processes()
        .into_iter()
        .find(|(n, _)| n == "alice")
        .expect("alice's process");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    wait_for(limit, || {
        d.processes()
            .into_iter()
            .any(|(n, p)| n == "alice" && p != pid)
            && d.get("alice.localhost", "/healthz")
                .is_some_and(|(c, _)| c == 200)
    })
    .unwrap_or_else(|| panic!("alice started again; log:\n{}", d.log()));

    // A new file is loaded and made, and then the passes are quiet again.
    d.write("bob.yaml", &session("bob"));
    wait_for(limit, || {
        d.get("bob.localhost", "/healthz")
            .is_some_and(|(c, _)| c == 200)
    })
    .expect("bob serves");
    let before = quiet();
    wait_for(limit, || quiet() >= before + 2).expect("quiet again");
}
