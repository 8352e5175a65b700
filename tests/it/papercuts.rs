//! What operators run into, with the real binary: `vessel validate FILE.yaml`, logs in words
//! and said once per change, `--log-format json`, a closed pipe, and `/metrics` as it says.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::daemon_support::{Daemon, session, wait_for};
use crate::support::{root, text, vessel};

const LIMIT: Duration = Duration::from_secs(20);

#[test]
fn validate_takes_one_file_and_reports_on_it_alone() {
    let out = vessel(&["validate", "examples/quickstart/alice.yaml"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("1 session"),
        "{}",
        text(&out.stderr)
    );
    let out = vessel(&["validate", "tests/fixtures/broken/missing-plan.yaml"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("missing-plan.yaml:3:7"), "{err}");
    assert!(
        !err.contains("bad-name.yaml"),
        "other files' problems are not reported: {err}"
    );
}

#[test]
fn a_closed_pipe_ends_the_command_quietly() {
    for args in [
        vec!["plan", "examples/quickstart"],
        vec!["schema", "--out", "/dev/null/x"],
        vec!["validate", "examples/quickstart", "--format", "json"],
    ] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_vessel"))
            .args(&args)
            .current_dir(root())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("vessel runs");
        drop(child.stdout.take());
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        let _ = child.wait();
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

#[test]
fn the_log_speaks_in_words_once_per_change_and_in_json_when_asked() {
    let mut d = Daemon::new();
    d.edit_config(|c| c.replace("resync_interval: 1s", "resync_interval: 300ms"));
    d.write(
        "bad.yaml",
        "kind: Plan\nname: bad\ncommand: [sh, -c, 'exit 3']\nports: {ide: 8080}\n",
    );
    d.write("crash.yaml", "kind: Session\nname: crash\nplan: bad\n");
    d.write(
        "broken.yaml",
        "kind: Session\nname: b\nplan: web\nbogus: 1\n",
    );
    d.write("alice.yaml", &session("alice"));
    d.start_with_args(&["--log-format", "json"], None);
    wait_for(LIMIT, || d.log().contains("crash failed")).expect("the failure is logged");
    std::thread::sleep(Duration::from_secs(3));
    let log = d.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let messages: Vec<&str> = lines.iter().filter_map(|l| l["message"].as_str()).collect();
    let failed = messages
        .iter()
        .find(|m| m.contains("crash failed"))
        .expect("a failure message");
    assert!(
        failed.contains("it exited") && !failed.contains('{'),
        "in words, no Debug: {failed}"
    );
    let broken: Vec<&&str> = messages
        .iter()
        .filter(|m| m.contains("broken.yaml"))
        .collect();
    assert_eq!(
        broken.len(),
        1,
        "said once, though passes went on: {broken:?}"
    );
    assert!(
        broken[0].contains("unknown field"),
        "with the error: {}",
        broken[0]
    );
}

#[test]
fn metrics_are_openmetrics_and_every_listed_metric_is_there() {
    let mut d = Daemon::new();
    d.write("alice.yaml", &session("alice"));
    // A notification target (nobody listens there), so the per-target metrics have a series.
    let (key, url) = (
        d.dir.path().join("notify.key"),
        d.dir.path().join("notify.url"),
    );
    std::fs::write(&key, "a-test-signing-key").expect("key");
    std::fs::write(&url, "http://127.0.0.1:9/hook").expect("url");
    d.configure(&format!(
        "notify:\n  - name: ops\n    url: {{file: {}}}\n    secret: {{file: {}}}\n",
        url.display(),
        key.display()
    ));
    d.start();
    wait_for(LIMIT, || {
        d.get("alice.localhost", "/healthz")
            .is_some_and(|(c, _)| c == 200)
    })
    .expect("alice serves");
    let mut s = std::net::TcpStream::connect(d.status).expect("connect");
    use std::io::Write;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: s\r\n\r\n").expect("write");
    let mut buf = String::new();
    s.read_to_string(&mut buf).expect("read");
    let (head, body) = buf.split_once("\r\n\r\n").expect("a response");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    assert!(
        body.trim_end().ends_with("# EOF"),
        "OpenMetrics ends with # EOF"
    );
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README");
    let listed = readme
        .lines()
        .find(|l| l.starts_with("| `/metrics`"))
        .expect("the README lists the metrics");
    for name in listed
        .split('`')
        .filter(|w| w.starts_with("vessel_"))
        .map(|w| w.split('{').next().unwrap_or(w))
    {
        assert!(
            body.contains(name),
            "{name} is listed but not served:\n{body}"
        );
    }
}
