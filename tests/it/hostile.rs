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
