//! Repository hygiene, checked inside `cargo test`: schemas current, examples valid and
//! editor-ready.

use std::path::Path;

use crate::support::{root, text, vessel};

#[test]
fn committed_schemas_are_current() {
    let dir = root().join("schemas");
    let mut stale = Vec::new();
    for (name, want) in vessel::schema::all() {
        let have = std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        if have != want {
            stale.push(name);
        }
    }
    assert!(
        stale.is_empty(),
        "stale schemas {stale:?}: run `cargo run -- schema --out schemas`"
    );
}

#[test]
fn every_example_tree_validates() {
    let mut seen = 0;
    for entry in std::fs::read_dir(root().join("examples")).expect("examples/") {
        let dir = entry.expect("entry").path();
        if !dir.is_dir() {
            continue;
        }
        let cfg = dir.join("vessel.yaml");
        let target = if cfg.exists() { cfg } else { dir.clone() };
        let out = vessel(&["validate", target.to_str().expect("utf-8")]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}: {}",
            target.display(),
            text(&out.stderr)
        );
        seen += 1;
    }
    assert!(seen >= 2, "expected at least quickstart and full");
}

fn yaml_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable") {
        let p = entry.expect("entry").path();
        if p.is_dir() {
            yaml_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(p);
        }
    }
}

#[test]
fn example_files_start_with_a_schema_modeline_that_resolves() {
    let mut files = Vec::new();
    yaml_files(&root().join("examples"), &mut files);
    files.push(root().join("src/default-config.yaml"));
    for f in files {
        let t = std::fs::read_to_string(&f).expect("read");
        let first = t.lines().next().unwrap_or("");
        let target = first
            .strip_prefix("# yaml-language-server: $schema=")
            .unwrap_or_else(|| panic!("{} does not start with a $schema modeline", f.display()));
        let schema = f.parent().expect("parent").join(target);
        assert!(
            schema.exists(),
            "{}: {} does not exist",
            f.display(),
            schema.display()
        );
    }
}

#[test]
fn the_planner_does_no_io() {
    let io = [
        "std::fs",
        "TcpStream",
        "TcpListener",
        "UdpSocket",
        "std::env",
        "std::process",
        "tokio",
        "Utc::now",
        "SystemTime",
        "Instant::now",
        "rand::",
    ];
    for f in [
        "src/planner/mod.rs",
        "src/planner/render.rs",
        "src/planner/simulate.rs",
        "src/load/validate.rs",
    ] {
        let text = std::fs::read_to_string(root().join(f)).expect("read");
        for word in io {
            assert!(
                !text.contains(word),
                "{f} mentions `{word}`: the planner and validation stay pure"
            );
        }
        if f.starts_with("src/planner") {
            for word in ["crate::load", "crate::source", "crate::providers"] {
                assert!(
                    !text.contains(word),
                    "{f} mentions `{word}`: the planner sees only Desired, Observed and Policy"
                );
            }
        }
    }
}

#[test]
fn ci_installs_the_traefik_release_the_tests_pin() {
    let ci = std::fs::read_to_string(root().join(".ci/run")).expect(".ci/run");
    let pin = format!("\nTRAEFIK_VERSION={}\n", crate::servers::TRAEFIK_VERSION);
    assert!(
        ci.contains(&pin),
        ".ci/run installs Traefik {} (tests/it/servers.rs pins it)",
        crate::servers::TRAEFIK_VERSION
    );
}

/// Each plan field's schema description says how changing it is carried out, exactly as the
/// planner decides it (`model::field_change`).
#[test]
fn the_schema_says_how_each_plan_field_changes() {
    use vessel::model::{ComputeKind, SPEC_FIELDS, field_change};
    let text = std::fs::read_to_string(crate::support::root().join("schemas/plan.schema.json"))
        .expect("plan schema");
    let schema: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    for field in SPEC_FIELDS.iter().chain(&["idle_timeout"]) {
        let desc = schema["properties"][field]["description"]
            .as_str()
            .unwrap_or_default();
        let want = format!(
            "(process: {}; docker: {})",
            field_change(ComputeKind::Process, field).describe(),
            field_change(ComputeKind::Docker, field).describe()
        );
        assert!(desc.contains(&want), "{field}: `{desc}` should say {want}");
    }
}

/// The module a source file is, as a path under the crate (`providers::compute::process`).
fn module_of(rel: &std::path::Path) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if parts.first().is_some_and(|p| p == "src") {
        parts.remove(0);
    }
    if parts
        .last()
        .is_some_and(|p| p == "mod" || p == "lib" || p == "main")
    {
        parts.pop();
    }
    parts
}

/// Every module path a file refers to (`crate::a::b`, and `super::` resolved against the
/// file's own module), outside comments.
fn references(text: &str, me: &[String]) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find(['c', 's']) {
            let tail = &rest[i..];
            let start_ok = i == 0
                || !rest[..i]
                    .chars()
                    .last()
                    .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':');
            let (base, after): (Vec<String>, &str) = if start_ok && tail.starts_with("crate::") {
                (Vec::new(), &tail[7..])
            } else if start_ok && tail.starts_with("super::") {
                let mut b = me.to_vec();
                let mut t = tail;
                while let Some(r) = t.strip_prefix("super::") {
                    b.pop();
                    t = r;
                }
                (b, t)
            } else {
                rest = &tail[1..];
                continue;
            };
            let path: Vec<String> = after
                .split("::")
                .map_while(|seg| {
                    let ident: String = seg
                        .chars()
                        .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                        .collect();
                    (!ident.is_empty() && ident.len() == seg.len()).then_some(ident)
                })
                .collect();
            let mut full = base;
            full.extend(path);
            if !full.is_empty() {
                out.push(full);
            }
            rest = &tail[1..];
        }
    }
    out
}

/// Module dependencies among the crate's files, by module path: no two modules import each
/// other anywhere in `src/` (siblings under any parent), and
/// the planner imports nothing from the config, the loader, the sources or the providers.
#[test]
fn modules_never_import_each_other_and_the_planner_stays_pure() {
    let src = root().join("src");
    let mut files = Vec::new();
    let mut stack = vec![src.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read src").flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                files.push(p);
            }
        }
    }
    // Edges between modules of the same parent: (parent, from, to).
    let mut edges: std::collections::BTreeSet<(String, String, String)> = Default::default();
    let mut planner_refs: Vec<String> = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(root()).expect("under the root");
        let me = module_of(rel);
        let text = std::fs::read_to_string(f).expect("read");
        for r in references(&text, &me) {
            // The first level where the two paths part: a dependency between siblings.
            let common = me.iter().zip(&r).take_while(|(a, b)| a == b).count();
            if let (Some(from), Some(to)) = (me.get(common), r.get(common)) {
                let parent = me[..common].join("::");
                edges.insert((parent, from.clone(), to.clone()));
            }
            if me.first().is_some_and(|m| m == "planner") {
                planner_refs.push(format!("{}: {}", rel.display(), r.join("::")));
            }
        }
    }
    // Anywhere in the tree: at the top level, among the provider families and the compute
    // providers, inside the planner, the proxy, the loader...
    let cycles: Vec<String> = edges
        .iter()
        .filter(|(p, a, b)| edges.contains(&(p.clone(), b.clone(), a.clone())))
        .map(|(p, a, b)| format!("{p}: {a} <-> {b}"))
        .collect();
    assert!(
        cycles.is_empty(),
        "modules that import each other: {cycles:#?}"
    );
    let bad: Vec<&String> = planner_refs
        .iter()
        .filter(|r| {
            let path = r.split(": ").nth(1).unwrap_or("");
            [
                "config",
                "load",
                "source",
                "providers",
                "exec",
                "reconcile",
                "daemon",
                "state",
            ]
            .iter()
            .any(|m| path == *m || path.starts_with(&format!("{m}::")))
        })
        .collect();
    assert!(
        bad.is_empty(),
        "the planner sees only Desired, Observed and its Policy: {bad:#?}"
    );
}
