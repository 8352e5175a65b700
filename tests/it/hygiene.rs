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
