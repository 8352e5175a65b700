//! The habits operators expect, with the real binary: `vessel init` (then validate passes; it
//! never overwrites), completions and a man page from the CLI definition, `vessel apply`'s
//! progress (plain lines when not a terminal, a redrawn line on a pty through `script`), the
//! per-plan health timeout, and the systemd unit checked by `systemd-analyze verify`.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::daemon_support::Daemon;
use crate::support::{root, text, vessel_in};

#[test]
fn init_writes_a_config_and_a_session_that_validate_and_never_overwrites() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("fleet");
    let out = vessel_in(tmp.path(), &["init", "fleet"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for f in [
        "vessel.yaml",
        "sessions/example.yaml",
        "schemas/config.schema.json",
    ] {
        assert!(dir.join(f).is_file(), "init wrote {f}");
    }
    let config = std::fs::read_to_string(dir.join("vessel.yaml")).expect("config");
    assert!(
        config
            .lines()
            .filter(|l| l.trim_start().starts_with('#'))
            .count()
            > 20,
        "the config is commented"
    );
    let out = vessel_in(&dir, &["validate", "vessel.yaml"]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let said = text(&out.stdout) + &text(&out.stderr);
    assert!(said.contains("1 plan, 1 session"), "{said}");

    // A second init changes nothing, and says which file is in the way.
    std::fs::write(dir.join("sessions/example.yaml"), "# mine\n").expect("edit");
    let out = vessel_in(tmp.path(), &["init", "fleet"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("vessel.yaml already exists"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("sessions/example.yaml")).expect("kept"),
        "# mine\n",
        "nothing is overwritten"
    );
    // Only one of the files in the way is enough to write nothing at all.
    let other = tmp.path().join("other");
    std::fs::create_dir_all(other.join("sessions")).expect("mkdir");
    std::fs::write(other.join("sessions/example.yaml"), "# mine\n").expect("write");
    let out = vessel_in(tmp.path(), &["init", "other"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(!other.join("vessel.yaml").exists(), "nothing written");
}

#[test]
fn completions_load_in_bash_and_name_every_subcommand() {
    let out = vessel_in(&root(), &["completions", "bash"]);
    assert!(out.status.success());
    let script = text(&out.stdout);
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("vessel.bash"), &script).expect("write");
    // Sourced into a real bash: it registers a completion for `vessel`, and completing
    // `vessel pl` offers `plan`.
    let probe = format!(
        "source {}; complete -p vessel; COMP_WORDS=(vessel pl); COMP_CWORD=1; COMP_LINE='vessel pl'; COMP_POINT=9; _vessel vessel pl vessel; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        dir.path().join("vessel.bash").display()
    );
    let out = Command::new("bash")
        .args(["-c", &probe])
        .output()
        .expect("bash runs");
    let said = text(&out.stdout);
    assert!(out.status.success(), "{said}{}", text(&out.stderr));
    assert!(said.contains("-F _vessel vessel"), "{said}");
    assert!(said.lines().any(|l| l == "plan"), "{said}");
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        let out = vessel_in(&root(), &["completions", shell]);
        assert!(out.status.success(), "{shell}");
        for sub in ["validate", "plan", "apply", "run", "status", "init", "man"] {
            assert!(text(&out.stdout).contains(sub), "{shell} completes {sub}");
        }
    }
    let out = vessel_in(&root(), &["completions", "tcsh"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}

#[test]
fn the_man_page_is_roff_with_a_section_per_subcommand() {
    let out = vessel_in(&root(), &["man"]);
    assert!(out.status.success());
    let page = text(&out.stdout);
    assert!(page.contains(".TH vessel 1"), "{page}");
    for sub in [
        "VALIDATE",
        "PLAN",
        "APPLY",
        "RUN",
        "STATUS",
        "INIT",
        "COMPLETIONS",
    ] {
        assert!(
            page.contains(&format!(".SH \"VESSEL {sub}\"")),
            "a section for {sub}"
        );
    }
    assert!(page.contains("against\\-ref"), "options are there");
    // Where man's formatter is installed, it renders without warnings.
    if let Ok(o) = Command::new("groff")
        .args(["-man", "-Tutf8", "-ww", "-z"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            if let Some(mut i) = c.stdin.take() {
                let _ = i.write_all(page.as_bytes());
            }
            c.wait_with_output()
        })
    {
        assert!(o.status.success(), "{}", text(&o.stderr));
    }
}

/// A plan whose sessions take `delay` seconds to answer, with a health timeout of `timeout`.
fn slow_plan(delay: u32, timeout: &str) -> String {
    format!(
        "kind: Plan
name: web
command: [/bin/sh, -c, 'sleep {delay}; exec \"$0\" devserver --listen 127.0.0.1:$PORT_IDE --root .', '{{vessel}}']
ports: {{ide: 8080}}
health: {{path: /healthz, timeout: {timeout}}}
stop_timeout: 1s
"
    )
}

#[test]
fn apply_shows_plain_progress_lines_when_not_a_terminal() {
    let d = Daemon::new();
    d.write("plan.yaml", &slow_plan(6, "30s"));
    d.write("alice.yaml", &crate::daemon_support::session("alice"));
    let out = vessel_in(d.dir.path(), &["apply", "vessel.yaml"]);
    let said = text(&out.stdout);
    assert!(out.status.success(), "{said}{}", text(&out.stderr));
    assert!(
        !said.contains('\r'),
        "no redrawing when not a terminal: {said:?}"
    );
    // When a step starts: how many are done of how many, and which step.
    assert!(
        said.contains(" done] wait-healthy session alice\n"),
        "{said}"
    );
    // While the health wait runs: its elapsed time, and when it would time out.
    assert!(
        said.contains("wait-healthy session alice: still running after 5s (times out after 30s)"),
        "{said}"
    );
    assert!(said.contains("the world matches"), "{said}");
}

#[test]
fn apply_redraws_one_progress_line_on_a_terminal() {
    let d = Daemon::new();
    d.write("plan.yaml", &slow_plan(3, "30s"));
    d.write("alice.yaml", &crate::daemon_support::session("alice"));
    // `script` gives vessel a pty for its stdout; what it wrote is in the typescript file.
    let typescript = d.dir.path().join("typescript");
    let out = Command::new("script")
        .args(["-q", "-e", "-c"])
        .arg(format!(
            "NO_COLOR=1 {} apply vessel.yaml",
            env!("CARGO_BIN_EXE_vessel")
        ))
        .arg(&typescript)
        .current_dir(d.dir.path())
        .stdin(std::process::Stdio::null())
        .output()
        .expect("script runs (bsdutils)");
    let said = std::fs::read_to_string(&typescript).unwrap_or_default();
    assert!(out.status.success(), "{said}{}", text(&out.stderr));
    // The line is drawn in place (carriage return, erase line) with done of total, the step
    // and its elapsed seconds of its timeout, and redrawn as the seconds go.
    assert!(
        said.contains("] wait-healthy session alice 0s/30s"),
        "{said:?}"
    );
    assert!(said.contains("\r\x1b[K[1/"), "{said:?}");
    assert!(
        said.contains("] wait-healthy session alice 2s/30s"),
        "{said:?}"
    );
    assert!(
        !said.contains("still running after"),
        "no plain lines on a terminal"
    );
    assert!(said.contains("the world matches"), "{said:?}");
}

#[test]
fn a_plans_health_timeout_is_the_one_the_executor_waits() {
    let d = Daemon::new();
    // Never answers: the wait ends at the plan's 2 s, not the 60 s default.
    d.write(
        "plan.yaml",
        "kind: Plan\nname: web\ncommand: [/bin/sleep, '300']\nports: {ide: 8080}\nhealth: {timeout: 2s}\nstop_timeout: 1s\n",
    );
    d.write("alice.yaml", &crate::daemon_support::session("alice"));
    // The plan is complete: the wait step carries the plan's timeout.
    let plan = vessel_in(d.dir.path(), &["plan", "vessel.yaml", "--format", "json"]);
    let json: serde_json::Value = serde_json::from_slice(&plan.stdout).expect("plan JSON");
    let wait = json["steps"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["action"] == "wait_healthy"))
        .unwrap_or_else(|| panic!("a wait step: {json}"));
    assert_eq!(wait["check"]["timeout"], "2s", "{wait}");
    let started = Instant::now();
    let out = vessel_in(d.dir.path(), &["apply", "vessel.yaml"]);
    let said = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("wait-healthy session alice timed_out"),
        "{said}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the plan's timeout, not the default: {:?}",
        started.elapsed()
    );
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    let unit = root().join("deploy/systemd/vessel.service");
    let text_of = std::fs::read_to_string(&unit).expect("deploy/systemd/vessel.service");
    for needed in [
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "StateDirectory=vessel",
        "ProtectHome=",
        "PrivateTmp=yes",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ] {
        assert!(text_of.contains(needed), "the unit has {needed}");
    }
    // verify needs the ExecStart binary to exist: point a copy at the one just built.
    let dir = tempfile::tempdir().expect("tempdir");
    let copy = dir.path().join("vessel.service");
    std::fs::write(
        &copy,
        text_of.replace("/usr/local/bin/vessel", env!("CARGO_BIN_EXE_vessel")),
    )
    .expect("write");
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&copy)
        .env("SYSTEMD_LOG_LEVEL", "notice")
        .output()
        .expect("systemd-analyze runs (the systemd package; .ci/run installs it)");
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "systemd-analyze verify: {said}");
    // Warnings about this unit (unknown keys, bad values) fail too.
    let ours: Vec<&str> = said
        .lines()
        .filter(|l| l.contains("vessel.service"))
        .collect();
    assert!(ours.is_empty(), "systemd-analyze verify says: {said}");
}
