//! Hostile YAML gets an error, fast, in bounded memory, and never takes other files down.

use std::path::Path;

use vessel::config::Config;
use vessel::load::load_tree;

fn load(dir: &Path) -> vessel::desired::Desired {
    let cfg = Config::embedded_default(dir);
    load_tree(dir, &cfg, chrono::Utc::now()).expect("the tree is readable")
}

fn tree_with(name: &str, contents: &[u8]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("plan.yaml"),
        "kind: Plan\nname: small\ncommand: [sleep, '1']\nports: {ide: 8080}\n",
    )
    .expect("write");
    std::fs::write(dir.path().join(name), contents).expect("write");
    dir
}

fn error_code(d: &vessel::desired::Desired, file: &str) -> String {
    let q = d
        .quarantined
        .get(Path::new(file))
        .unwrap_or_else(|| panic!("{file} is not quarantined"));
    q.errors[0].code.to_string()
}

#[test]
fn alias_bomb_is_refused() {
    let mut y = String::from(
        "kind: Session\nname: bomb\nplan: small\nenv:\n  a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
    );
    let mut prev = 'a';
    for c in 'b'..='j' {
        y.push_str(&format!("  {c}: &{c} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]\n"));
        prev = c;
    }
    let dir = tree_with("bomb.yaml", y.as_bytes());
    let d = load(dir.path());
    let code = error_code(&d, "bomb.yaml");
    assert!(
        matches!(
            code.as_str(),
            "too-large" | "too-many-aliases" | "invalid-value"
        ),
        "{code}"
    );
    assert!(d.plans.contains_key("small"), "the other file still loads");
}

#[test]
fn alias_expansion_is_bounded() {
    // 900 aliases of a 100 kB string would expand to 90 MB.
    let y = format!(
        "kind: Plan\nname: p\ncompute: docker\nimage: &a \"{}\"\ncommand: [{}]\n",
        "x".repeat(100_000),
        vec!["*a"; 900].join(",")
    );
    let dir = tree_with("expand.yaml", y.as_bytes());
    let d = load(dir.path());
    assert_eq!(error_code(&d, "expand.yaml"), "too-large");
    assert!(
        d.quarantined[Path::new("expand.yaml")].errors[0]
            .message
            .contains("limits")
    );
    // Many small aliases are refused before any expansion.
    let y = format!(
        "kind: Plan\nname: p\ncompute: docker\nimage: &a x\ncommand: [{}]\n",
        vec!["*a"; 5000].join(",")
    );
    let dir = tree_with("many.yaml", y.as_bytes());
    assert_eq!(
        error_code(&load(dir.path()), "many.yaml"),
        "too-many-aliases"
    );
}

#[test]
fn a_fifty_megabyte_file_is_refused_unread() {
    let dir = tree_with("big.yaml", b"");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join("big.yaml"))
        .expect("open");
    f.set_len(50 << 20).expect("sparse file");
    let d = load(dir.path());
    assert_eq!(error_code(&d, "big.yaml"), "unreadable");
    assert!(
        d.quarantined[Path::new("big.yaml")].errors[0]
            .message
            .contains("limit")
    );
    assert!(d.plans.contains_key("small"));
}

#[test]
fn deep_nesting_is_refused() {
    let y = format!(
        "kind: Session\nname: deep\nplan: small\nenv: {}1{}\n",
        "[".repeat(5000),
        "]".repeat(5000)
    );
    let dir = tree_with("deep.yaml", y.as_bytes());
    let d = load(dir.path());
    let code = error_code(&d, "deep.yaml");
    assert!(
        matches!(code.as_str(), "too-deep" | "yaml-syntax"),
        "{code}"
    );
    let y = format!(
        "kind: Session\nname: deep\nplan: small\nenv:\n{}",
        (0..200)
            .map(|i| format!("{}k{i}:\n", "  ".repeat(i + 1)))
            .collect::<String>()
    );
    let dir = tree_with("deep.yaml", y.as_bytes());
    assert_eq!(error_code(&load(dir.path()), "deep.yaml"), "too-deep");
}

#[test]
fn binary_garbage_is_refused() {
    // A deterministic pseudo-random byte stream (xorshift), mostly not UTF-8.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let bytes: Vec<u8> = (0..1 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let dir = tree_with("garbage.yaml", &bytes);
    let d = load(dir.path());
    assert_eq!(error_code(&d, "garbage.yaml"), "not-utf8");
    // Printable garbage is valid UTF-8 but not a document.
    let dir = tree_with("noise.yaml", b"\x07\x08 ]]]: {{{ ,,, @@@ `` \x1b[0m");
    let d = load(dir.path());
    assert!(d.quarantined.contains_key(Path::new("noise.yaml")));
}

#[test]
fn many_documents_in_one_file_are_bounded() {
    let y = "---\n".repeat(20_000);
    let dir = tree_with("seps.yaml", y.as_bytes());
    let d = load(dir.path());
    assert_eq!(error_code(&d, "seps.yaml"), "too-large");
}

fn config_with_budget(dir: &Path, total: u64) -> Config {
    let mut cfg = Config::embedded_default(dir);
    cfg.load.max_total_bytes = vessel::model::Size(total);
    cfg
}

/// A plan document padded with comments to `size` bytes.
fn padded_plan(name: &str, size: usize) -> Vec<u8> {
    let mut y = format!("kind: Plan\nname: {name}\ncommand: [sleep, '1']\n").into_bytes();
    let line = format!("# {}\n", "x".repeat(1000));
    while y.len() + line.len() <= size {
        y.extend_from_slice(line.as_bytes());
    }
    y
}

#[test]
fn a_tree_past_its_byte_budget_is_quarantined_past_the_budget_not_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    for i in 0..20 {
        let name = format!("p{i:02}.yaml");
        std::fs::write(
            dir.path().join(name),
            padded_plan(&format!("p{i:02}"), 1 << 20),
        )
        .expect("write");
    }
    let cfg = config_with_budget(dir.path(), 4 << 20);
    let d = load_tree(dir.path(), &cfg, chrono::Utc::now()).expect("load");
    assert_eq!(d.files.len(), 20);
    // The first four files (in path order) fit in 4 MiB; the rest are refused unread, held,
    // and incomplete (what they hold is unknown, so nothing anywhere is destroyed).
    let loaded: Vec<&str> = d.plans.keys().map(String::as_str).collect();
    assert_eq!(loaded, ["p00", "p01", "p02", "p03"]);
    assert_eq!(d.quarantined.len(), 16);
    for (file, q) in &d.quarantined {
        assert!(!q.complete, "{}", file.display());
        assert_eq!(q.errors.len(), 1);
        assert_eq!(q.errors[0].code, "unreadable");
        assert_eq!(q.errors[0].line, 0);
        assert!(
            q.errors[0].message.contains("budget of 4MiB"),
            "{}",
            q.errors[0].message
        );
    }
    assert!(d.has_unknown_objects());
}

/// A git repository whose tree names one blob `files` times (a repository of a few hundred
/// kilobytes that expands to `files` x `blob` bytes).
fn blob_bomb(dir: &Path, files: usize, blob: usize) {
    let repo = git2::Repository::init(dir).expect("git init");
    let id = repo.blob(&padded_plan("p", blob)).expect("blob");
    let mut sub = repo.treebuilder(None).expect("treebuilder");
    for i in 0..files {
        sub.insert(format!("f{i:03}.yaml"), id, 0o100644)
            .expect("insert");
    }
    let sub = sub.write().expect("tree");
    let mut root = repo.treebuilder(None).expect("treebuilder");
    root.insert("desired", sub, 0o040000).expect("insert");
    let tree = repo
        .find_tree(root.write().expect("tree"))
        .expect("find tree");
    let sig = git2::Signature::now("t", "t@example.com").expect("signature");
    repo.commit(Some("HEAD"), &sig, &sig, "bomb", &tree, &[])
        .expect("commit");
}

#[test]
fn a_git_blob_bomb_reads_only_what_the_budget_admits() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let dir = tempfile::tempdir().expect("tempdir");
    blob_bomb(dir.path(), 300, 1 << 20);
    let desired = dir.path().join("desired");
    let checkout = vessel::source::git::Checkout::discover(dir.path()).expect("repository");
    let (_, entries) = checkout.tree_at(&desired, "HEAD").expect("tree");
    assert_eq!(entries.len(), 300);
    // Count the blobs actually inflated.
    let reads = AtomicUsize::new(0);
    let entries: Vec<vessel::load::Entry<'_>> = entries
        .into_iter()
        .map(|e| {
            let read = e.read;
            let reads = &reads;
            vessel::load::Entry {
                rel: e.rel,
                id: e.id,
                size: e.size,
                read: Box::new(move || {
                    reads.fetch_add(1, Ordering::Relaxed);
                    read()
                }),
            }
        })
        .collect();
    let cfg = config_with_budget(dir.path(), 4 << 20);
    let d = vessel::load::load_entries(&desired, entries, &cfg, chrono::Utc::now());
    assert_eq!(
        reads.load(Ordering::Relaxed),
        4,
        "only the admitted blobs are read"
    );
    assert_eq!(d.files.len(), 300);
    let unread = d
        .quarantined
        .values()
        .filter(|q| q.errors[0].code == "unreadable" && !q.complete)
        .count();
    assert_eq!(unread, 296);
    // The four read define plan `p` four times: quarantined too, for that.
    let dup = &d.quarantined[Path::new("f000.yaml")].errors[0];
    assert_eq!(dup.code, "duplicate-name");
    assert!(d.plans.is_empty());
}

#[test]
fn a_fifo_a_socket_and_a_device_are_refused_without_blocking() {
    let dir = tree_with(
        "ok.yaml",
        b"kind: Route\nname: r\nhost: r.localhost\nsession: s\nport: ide\n",
    );
    let p = dir.path();
    nix::unistd::mkfifo(&p.join("pipe.yaml"), nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
    std::os::unix::fs::symlink(p.join("pipe.yaml"), p.join("link.yaml")).expect("symlink");
    let _sock = std::os::unix::net::UnixListener::bind(p.join("sock.yaml")).expect("socket");
    std::os::unix::fs::symlink("/dev/null", p.join("null.yaml")).expect("symlink");
    let root = p.to_path_buf();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(load(&root));
    });
    let d = rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("the load finishes: a FIFO must not block it");
    let message = |f: &str| {
        let q = &d.quarantined[Path::new(f)];
        assert_eq!(q.errors[0].code, "unreadable", "{f}");
        assert!(!q.complete);
        q.errors[0].message.clone()
    };
    assert!(
        message("pipe.yaml").contains("a FIFO"),
        "{}",
        message("pipe.yaml")
    );
    assert!(message("link.yaml").contains("a FIFO"));
    assert!(
        message("sock.yaml").contains("a socket"),
        "{}",
        message("sock.yaml")
    );
    assert!(message("null.yaml").contains("a character device"));
    assert!(d.plans.contains_key("small"), "the other files still load");
    assert_eq!(d.quarantined.len(), 5, "{:?}", d.quarantined.keys());
}

#[test]
fn many_errors_in_one_file_are_capped_and_linear() {
    // 9,999 documents, each of an unknown kind: one error each.
    let y: String = (0..9_999)
        .map(|i| format!("---\nkind: Sesion\nname: s{i}\n"))
        .collect();
    let dir = tree_with("many.yaml", y.as_bytes());
    let t = std::time::Instant::now();
    let d = load(dir.path());
    let q = &d.quarantined[Path::new("many.yaml")];
    assert_eq!(q.errors.len(), 101);
    assert_eq!(q.errors[0].code, "unknown-kind");
    assert_eq!(q.errors[0].help.as_deref(), Some("did you mean `Session`?"));
    assert_eq!(q.errors[99].line, 299);
    assert_eq!(q.errors[99].snippet.as_deref(), Some("kind: Sesion"));
    assert_eq!(q.errors[100].code, "more-errors");
    assert_eq!(
        q.errors[100].message,
        "and 9899 more errors in this file, not shown"
    );
    // Generous for a debug build; it was 3.3 s in release when quadratic.
    assert!(t.elapsed() < std::time::Duration::from_secs(30));
}

#[test]
fn a_long_port_name_gets_no_suggestion_and_a_bounded_message() {
    let long = "p".repeat(100_000);
    let y = format!(
        "kind: Plan\nname: big\ncommand: [x]\nports:\n  ? {long}\n  : 80\n  ide: 8080\nhealth: {{port: {long}q}}\n"
    );
    let dir = tree_with("big.yaml", y.as_bytes());
    let t = std::time::Instant::now();
    let d = load(dir.path());
    let q = &d.quarantined[Path::new("big.yaml")];
    let codes: Vec<&str> = q.errors.iter().map(|e| e.code).collect();
    assert_eq!(codes, ["invalid-name", "unknown-port"]);
    let help = q.errors[1].help.as_deref().unwrap_or_default();
    assert_eq!(
        help,
        format!("plan `big` has ports: ide, {}...", "p".repeat(64))
    );
    assert!(
        q.errors
            .iter()
            .all(|e| e.snippet.as_ref().is_none_or(|s| s.len() <= 200))
    );
    assert!(t.elapsed() < std::time::Duration::from_secs(10));
}

#[test]
fn a_config_that_is_a_fifo_is_refused_without_blocking() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("vessel.yaml");
    nix::unistd::mkfifo(&path, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(vessel::load::load_config(&path).map(|_| ()));
    });
    let err = rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("reading the config finishes")
        .expect_err("a FIFO is not a config");
    assert_eq!(err[0].code, "unreadable");
    assert!(err[0].message.contains("a FIFO"), "{}", err[0].message);
}

#[test]
fn a_tree_past_its_node_budget_is_quarantined_past_the_budget() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Each file: one session with 40 environment variables (some 90 YAML nodes).
    for i in 0..5 {
        let env: String = (0..40).map(|k| format!("  K{k}: v\n")).collect();
        let y = format!("kind: Session\nname: s{i}\nplan: small\nenv:\n{env}");
        std::fs::write(dir.path().join(format!("s{i}.yaml")), y).expect("write");
    }
    std::fs::write(
        dir.path().join("a-plan.yaml"),
        "kind: Plan\nname: small\ncommand: [sleep, '1']\nports: {ide: 8080}\n",
    )
    .expect("write");
    let mut cfg = Config::embedded_default(dir.path());
    cfg.load.max_total_nodes = 250;
    let d = load_tree(dir.path(), &cfg, chrono::Utc::now()).expect("load");
    let loaded: Vec<&str> = d.sessions.keys().map(String::as_str).collect();
    assert_eq!(loaded, ["s0", "s1"]);
    let q = &d.quarantined[Path::new("s2.yaml")];
    assert_eq!(q.errors[0].code, "too-large");
    assert!(
        q.errors[0].message.contains("budget of 250 YAML nodes"),
        "{}",
        q.errors[0].message
    );
    assert!(
        !q.complete,
        "what it holds is unknown: nothing is destroyed"
    );
    assert_eq!(d.quarantined.len(), 3);
    // The environment's entries are objects' data, not positions kept for diagnostics.
    let s0 = &d.sessions["s0"];
    assert_eq!(s0.spec.env.len(), 40);
    assert!(
        s0.fields.keys().all(|k| !k.starts_with("env.")),
        "{:?}",
        s0.fields.keys()
    );
}

/// Found by the fuzzer: YAML counts a lone `\r` as a line break, and the loader counted only
/// `\n`, so positions past one pointed past the end of the file, snippets showed the wrong line
/// and a document's text could be cut at the wrong place.
#[test]
fn lone_carriage_returns_are_line_breaks_everywhere() {
    let y = "kind: Plan\rname: small\r\ncommand: [sleep, '1']\rports: {ide: 8080}\r---\rkind: Session\rname: s\rplan: small\rcolour: red\r";
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("cr.yaml"), y).expect("write");
    let d = load(dir.path());
    let q = &d.quarantined[Path::new("cr.yaml")];
    assert_eq!(q.errors.len(), 1, "{:?}", q.errors);
    let e = &q.errors[0];
    assert_eq!(e.code, "unknown-field");
    assert_eq!((e.line, e.column), (9, 1));
    assert_eq!(e.snippet.as_deref(), Some("colour: red"));
    // Both documents were read as the two documents they are.
    assert_eq!(q.held.len(), 2, "{:?}", q.held);
    let fixed = y.replace("colour: red\r", "");
    std::fs::write(dir.path().join("cr.yaml"), fixed).expect("write");
    let d = load(dir.path());
    assert!(d.is_valid(), "{:?}", d.quarantined);
    assert_eq!(d.sessions["s"].pos.line, 6);
}
