//! The status endpoint of a running daemon: every endpoint, read-only (405), the bearer token,
//! redaction, the page in headless Chromium, and `vessel status --wait-converged`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::Value;

use crate::daemon_support::{Daemon, PLAN, session, wait_for};

const LIMIT: Duration = Duration::from_secs(20);

/// Headless Chromium as the tests run it: no sandbox (root), no GPU, nothing in the background.
pub const CHROMIUM_FLAGS: [&str; 8] = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
];

/// (status, headers, body) of `METHOD path`, with an optional bearer token.
fn call(addr: SocketAddr, method: &str, path: &str, token: Option<&str>) -> (u16, String, String) {
    let auth = token.map(|t| format!("Bearer {t}"));
    call_auth(addr, method, path, auth.as_deref())
}

/// (status, headers, body) of `METHOD path`, with an optional `Authorization` value.
pub fn call_auth(
    addr: SocketAddr,
    method: &str,
    path: &str,
    authorization: Option<&str>,
) -> (u16, String, String) {
    let auth = authorization
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    call_with(addr, method, path, &auth)
}

/// (status, headers, body) of `METHOD path` with `headers` (whole lines, each ending in CRLF).
pub fn call_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
) -> (u16, String, String) {
    // Not listening yet (the daemon binds it a moment after the proxy): status 0, polled again.
    let Ok(mut s) = TcpStream::connect(addr) else {
        return (0, String::new(), String::new());
    };
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: status\r\nContent-Length: 0\r\n{headers}\r\n"
    )
    .expect("write");
    let mut buf = String::new();
    s.read_to_string(&mut buf).expect("read");
    let code = buf.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let (head, body) = buf.split_once("\r\n\r\n").unwrap_or((&buf, ""));
    (code, head.to_string(), body.to_string())
}

pub fn json(addr: SocketAddr, path: &str) -> Value {
    let (code, _, body) = call(addr, "GET", path, None);
    assert_eq!(code, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path} is not JSON: {e}: {body}"))
}

const SECRET_ENV: &str = "hunter2-plan-env-value";

fn daemon_with_two_sessions(token_env: Option<(&str, &str)>) -> Daemon {
    let mut d = Daemon::new();
    // A plan whose env holds a value that must never be served.
    d.write(
        "plan.yaml",
        &format!("{PLAN}env: {{API_KEY: {SECRET_ENV}}}\n"),
    );
    d.write("alice.yaml", &session("alice"));
    d.write("bob.yaml", &session("bob"));
    if let Some((name, _)) = token_env {
        let cfg = std::fs::read_to_string(d.dir.path().join("vessel.yaml")).expect("config");
        let cfg = cfg.replace(
            &format!("status: {{listen: '{}'}}", d.status),
            &format!("status: {{listen: '{}', token: {{env: {name}}}}}", d.status),
        );
        std::fs::write(d.dir.path().join("vessel.yaml"), cfg).expect("config");
    }
    d.start_with_env(token_env);
    d
}

fn converged(d: &Daemon, token: Option<&str>) -> bool {
    let (code, _, body) = call(d.status, "GET", "/status", token);
    code == 200
        && serde_json::from_str::<Value>(&body)
            .is_ok_and(|v| v["converged"] == true && v["counts"]["routes"] == 6)
}

#[test]
fn every_endpoint_answers_and_nothing_but_get_is_allowed() {
    let d = daemon_with_two_sessions(None);
    wait_for(LIMIT, || converged(&d, None)).expect("the daemon converges");
    assert_eq!(call(d.status, "GET", "/healthz", None).0, 200);
    assert_eq!(call(d.status, "GET", "/readyz", None).0, 200);

    let st = json(d.status, "/status");
    assert_eq!(st["ready"], true);
    assert!(
        st["revision"]
            .as_str()
            .is_some_and(|r| r.starts_with("dir:")),
        "{st}"
    );
    assert_eq!(st["counts"]["sessions_running"], 2);
    assert!(st["last_pass"]["trigger"].is_string());
    let providers: Vec<&str> = st["providers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["observed"] == true)
        .filter_map(|p| p["provider"].as_str())
        .collect();
    assert_eq!(providers, ["compute/process", "proxy"]);

    let sessions = json(d.status, "/sessions");
    let alice = sessions
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == "alice"))
        .expect("alice is listed")
        .clone();
    assert_eq!(alice["desired_state"], "running");
    assert_eq!(alice["observed_state"], "running");
    let url = format!("http://alice.localhost:{}/", d.proxy.port());
    assert!(
        alice["urls"]
            .as_array()
            .is_some_and(|u| u.iter().any(|x| x == url.as_str())),
        "{alice}"
    );
    let ready = alice["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
        .expect("a Ready condition");
    assert_eq!(ready["status"], true);
    assert!(ready["since"].is_string());

    let detail = json(d.status, "/sessions/alice");
    assert_eq!(detail["spec"]["env"]["API_KEY"], "<redacted>");
    assert!(
        detail["endpoints"]["ide"]
            .as_str()
            .is_some_and(|e| e.starts_with("127.0.0.1:"))
    );
    assert!(detail["events"].as_array().is_some_and(|e| !e.is_empty()));
    assert_eq!(call(d.status, "GET", "/sessions/nobody", None).0, 404);

    let routes = json(d.status, "/routes");
    let r = routes
        .as_array()
        .and_then(|a| a.iter().find(|r| r["host"] == "alice.localhost"))
        .expect("alice's route")
        .clone();
    assert_eq!(r["served"], true);
    assert!(
        r["upstream"]
            .as_str()
            .is_some_and(|u| u.starts_with("127.0.0.1:"))
    );
    assert_eq!(json(d.status, "/dns"), serde_json::json!([]));

    let (code, _, plan) = call(d.status, "GET", "/plan", None);
    assert_eq!(code, 200);
    assert!(plan.contains("No changes."), "{plan}");
    assert_eq!(
        json(d.status, "/plan?format=json")["steps"],
        serde_json::json!([])
    );
    let events = json(d.status, "/events?limit=5");
    assert!(events.as_array().is_some_and(|e| !e.is_empty()
        && e.len() <= 5
        && e.iter().all(|e| e["outcome"].is_string())));

    let (code, head, metrics) = call(d.status, "GET", "/metrics", None);
    assert_eq!(code, 200);
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text")
    );
    for needle in [
        "vessel_passes_total{trigger=\"startup\"}",
        "vessel_pass_duration_seconds_bucket",
        "vessel_steps_total{action=\"create\",outcome=\"succeeded\"} 2",
        "vessel_sessions{state=\"running\"} 2",
        "vessel_converged 1",
        "vessel_drift_repairs_total",
    ] {
        assert!(
            metrics.contains(needle),
            "{needle} not in metrics:\n{metrics}"
        );
    }
    let (code, _, page) = call(d.status, "GET", "/", None);
    assert_eq!(code, 200);
    assert!(
        page.contains("id=\"session-alice\"") && page.contains(&url),
        "{page}"
    );

    for method in ["POST", "PUT", "DELETE", "PATCH"] {
        for path in ["/status", "/sessions/alice", "/", "/no-such-path"] {
            let (code, head, _) = call(d.status, method, path, None);
            assert_eq!(code, 405, "{method} {path}");
            assert!(
                head.to_ascii_lowercase().contains("allow: get, head"),
                "{head}"
            );
        }
    }
    // Nothing a reader did changed anything.
    assert_eq!(json(d.status, "/status")["counts"]["sessions_running"], 2);

    // A broken file shows, with its line, and the sessions stay.
    d.write("broken.yaml", "kind: Session\nname: eve\nplna: web\n");
    wait_for(LIMIT, || {
        json(d.status, "/status")["quarantined"]
            .as_array()
            .is_some_and(|q| !q.is_empty())
    })
    .expect("the broken file shows");
    let q = &json(d.status, "/status")["quarantined"][0];
    assert!(
        q["file"]
            .as_str()
            .is_some_and(|f| f.ends_with("broken.yaml"))
            && q["errors"][0]["line"] == 3,
        "{q}"
    );
}

#[test]
fn the_token_guards_everything_but_healthz_and_secrets_never_show() {
    let token = "s3cret-status-token-value";
    let d = daemon_with_two_sessions(Some(("VESSEL_TEST_STATUS_TOKEN", token)));
    wait_for(LIMIT, || converged(&d, Some(token))).expect("the daemon converges");
    assert_eq!(call(d.status, "GET", "/healthz", None).0, 200);
    let paths = [
        "/",
        "/readyz",
        "/status",
        "/sessions",
        "/sessions/alice",
        "/routes",
        "/dns",
        "/plan",
        "/plan?format=json",
        "/events",
        "/metrics",
    ];
    for p in paths {
        let (code, head, _) = call(d.status, "GET", p, None);
        assert_eq!(code, 401, "{p} without a token");
        assert!(
            head.to_ascii_lowercase()
                .contains("www-authenticate: bearer"),
            "{head}"
        );
        assert_eq!(
            call(d.status, "GET", p, Some("wrong-token-value")).0,
            401,
            "{p} with a wrong token"
        );
        let (code, _, body) = call(d.status, "GET", p, Some(token));
        assert_eq!(code, 200, "{p} with the token");
        assert!(
            !body.contains(token) && !body.contains(SECRET_ENV),
            "{p} serves a secret: {body}"
        );
    }
    // Nor in the log or anywhere in the state directory.
    assert!(!d.log().contains(token) && !d.log().contains(SECRET_ENV));
    let mut stack = vec![d.state()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(text) = std::fs::read_to_string(&p) {
                assert!(!text.contains(token), "{} holds the token", p.display());
            }
        }
    }
}

#[test]
fn the_page_shows_a_known_session_in_headless_chromium() {
    let d = daemon_with_two_sessions(None);
    wait_for(LIMIT, || converged(&d, None)).expect("the daemon converges");
    let profile = tempfile::tempdir().expect("profile dir");
    let out = std::process::Command::new("chromium")
        .args(CHROMIUM_FLAGS)
        .args([
            &format!("--user-data-dir={}", profile.path().display()),
            "--dump-dom",
            &format!("http://{}/", d.status),
        ])
        .output()
        .expect("chromium runs (Debian package `chromium`; .ci/run installs it)");
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        dom.contains("id=\"session-alice\""),
        "alice is not on the page:\n{dom}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        dom.contains(&format!("http://bob.localhost:{}/", d.proxy.port())),
        "bob's link is not on the page"
    );
}

#[test]
fn vessel_status_waits_until_converged() {
    let d = daemon_with_two_sessions(None);
    let url = format!("http://{}", d.status);
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_vessel"))
            .args(args)
            .output()
            .expect("vessel status")
    };
    let out = run(&[
        "status",
        "--url",
        &url,
        "--wait-converged",
        "--timeout",
        "20s",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("converged") && text.contains("2 running"),
        "{text}"
    );
    // A new file: --wait-converged returns only once it is applied. (It waits on what the
    // daemon knows: first let the daemon see the file, which takes a watcher event.)
    let before = json(d.status, "/status")["revision"].clone();
    d.write("carol.yaml", &session("carol"));
    wait_for(Duration::from_secs(20), || {
        json(d.status, "/status")["revision"] != before
    })
    .expect("the daemon sees the new file");
    let out = run(&[
        "status",
        "--url",
        &url,
        "--wait-converged",
        "--timeout",
        "20s",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["counts"]["sessions_running"], 3, "{v}");
    assert_eq!(d.get("carol.localhost", "/healthz").map(|r| r.0), Some(200));
    // Nothing listening: a clear error, non-zero, after the timeout.
    let dead = format!("http://127.0.0.1:{}", crate::daemon_support::free_port());
    let out = run(&[
        "status",
        "--url",
        &dead,
        "--wait-converged",
        "--timeout",
        "1s",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("timed out"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
