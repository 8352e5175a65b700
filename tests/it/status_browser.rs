//! The status page in a real browser: headless Chromium driven over the Chrome DevTools
//! Protocol. With a status token, the browser's own HTTP Basic prompt (answered through CDP's
//! `Fetch.authRequired`, as a person would type it) opens the page; the page then updates
//! itself without a reload (a mark set in the page survives, the scroll position is kept)
//! when a session is added; a session in a file with errors shows with its file; a session
//! failing again and again reads Stalled, not Reconciling.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::daemon_support::{Daemon, PLAN, session};
use crate::status::{CHROMIUM_FLAGS, call_auth, call_with};
use crate::support::base64;

const TOKEN: &str = "page-token-Zq81";
const LIMIT: Duration = Duration::from_secs(30);

struct Browser(Child);

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Headless Chromium with a DevTools port; the page target's WebSocket URL.
fn chromium(profile: &std::path::Path) -> (Browser, String) {
    let mut child = Command::new("chromium")
        .args(CHROMIUM_FLAGS)
        .args([
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("about:blank")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("chromium runs (Debian package `chromium`; .ci/run installs it)");
    let stderr = child.stderr.take().expect("stderr");
    let browser = Browser(child);
    let mut lines = BufReader::new(stderr).lines();
    let ws = loop {
        let Some(Ok(line)) = lines.next() else {
            panic!("chromium ended before its DevTools listened");
        };
        if let Some(url) = line.split("DevTools listening on ").nth(1) {
            break url.trim().to_string();
        }
    };
    // Keep reading its stderr so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    let hostport = ws
        .strip_prefix("ws://")
        .and_then(|r| r.split('/').next())
        .expect("a ws:// URL")
        .to_string();
    // The page target (about:blank), once the DevTools HTTP side lists it.
    let t0 = Instant::now();
    let url = loop {
        let found = (|| {
            let mut s = std::net::TcpStream::connect(&hostport).ok()?;
            // Its HTTP side keeps the connection open: read the head, then Content-Length bytes.
            s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            write!(
                s,
                "GET /json/list HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n\r\n"
            )
            .ok()?;
            let mut buf = Vec::new();
            let mut chunk = [0u8; 8192];
            let body = loop {
                let n = s.read(&mut chunk).ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).into_owned();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse().ok())?
                        })
                        .unwrap_or(0);
                    if body.len() >= len {
                        break body.to_string();
                    }
                }
            };
            let list: Value = serde_json::from_str(&body).ok()?;
            list.as_array()?
                .iter()
                .find(|t| t["type"] == "page")
                .and_then(|t| t["webSocketDebuggerUrl"].as_str())
                .map(str::to_string)
        })();
        match found {
            Some(u) => break u,
            None if t0.elapsed() < LIMIT => std::thread::sleep(Duration::from_millis(100)),
            None => panic!("chromium lists no page target"),
        }
    };
    (browser, url)
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A CDP session on one page: commands, and the events that must be answered on the way
/// (every request paused by `Fetch` is continued; a Basic challenge gets the token).
struct Cdp {
    ws: Ws,
    next: u64,
    /// The Basic challenges answered so far.
    challenges: Vec<String>,
}

impl Cdp {
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let msg = json!({"id": id, "method": method, "params": params}).to_string();
        self.ws.send(Message::text(msg)).await.expect("send");
        loop {
            let m = tokio::time::timeout(LIMIT, self.ws.next())
                .await
                .expect("chromium answers")
                .expect("open")
                .expect("a message");
            let Message::Text(t) = m else { continue };
            let v: Value = serde_json::from_str(t.as_str()).expect("CDP JSON");
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
            self.event(&v).await;
        }
    }

    async fn event(&mut self, v: &Value) {
        let p = &v["params"];
        match v["method"].as_str() {
            Some("Fetch.requestPaused") => {
                self.send(
                    "Fetch.continueRequest",
                    json!({"requestId": p["requestId"]}),
                )
                .await;
            }
            Some("Fetch.authRequired") => {
                let scheme = p["authChallenge"]["scheme"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                self.challenges.push(scheme.clone());
                // What a person types into the browser's prompt: any user name, the token.
                let answer = if scheme.eq_ignore_ascii_case("basic") {
                    json!({"response": "ProvideCredentials", "username": "admin", "password": TOKEN})
                } else {
                    json!({"response": "CancelAuth"})
                };
                self.send(
                    "Fetch.continueWithAuth",
                    json!({"requestId": p["requestId"], "authChallengeResponse": answer}),
                )
                .await;
            }
            _ => {}
        }
    }

    /// Send without waiting for the answer (answers to these are skipped as events).
    async fn send(&mut self, method: &str, params: Value) {
        self.next += 1;
        let msg = json!({"id": self.next, "method": method, "params": params}).to_string();
        self.ws.send(Message::text(msg)).await.expect("send");
    }

    /// The value of a JavaScript expression in the page.
    async fn eval(&mut self, expr: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expr, "returnByValue": true}),
            )
            .await;
        r["result"]["value"].clone()
    }

    /// Evaluate `expr` until it is true (handling events meanwhile); how long it took.
    async fn until(&mut self, expr: &str, limit: Duration) -> Option<Duration> {
        let t0 = Instant::now();
        while t0.elapsed() < limit {
            if self.eval(expr).await == Value::Bool(true) {
                return Some(t0.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        None
    }
}

#[test]
fn the_page_opens_with_basic_auth_and_updates_itself_keeping_the_scroll_position() {
    let mut d = Daemon::new();
    d.write("alice.yaml", &session("alice"));
    d.write("bob.yaml", &session("bob"));
    // A session that fails again and again: its command does not exist.
    d.write(
        "broken-plan.yaml",
        &PLAN
            .replace("name: web", "name: broken")
            .replace("'{vessel}', devserver", "/nonexistent/program, devserver"),
    );
    d.write("erin.yaml", "kind: Session\nname: erin\nplan: broken\n");
    // A session in a file with errors.
    d.write(
        "dave.yaml",
        "kind: Session\nname: dave\nplan: web\nbogus: 1\n",
    );
    let cfg = std::fs::read_to_string(d.dir.path().join("vessel.yaml")).expect("config");
    let cfg = cfg.replace(
        &format!("status: {{listen: '{}'}}", d.status),
        &format!(
            "status: {{listen: '{}', token: {{env: VESSEL_TEST_STATUS_TOKEN}}}}",
            d.status
        ),
    );
    std::fs::write(d.dir.path().join("vessel.yaml"), cfg).expect("config");
    d.start_with_env(Some(("VESSEL_TEST_STATUS_TOKEN", TOKEN)));
    crate::daemon_support::wait_for(LIMIT, || std::net::TcpStream::connect(d.status).is_ok())
        .expect("the status endpoint listens");

    // Without credentials: 401 with a Basic challenge, so a browser asks for them.
    let (code, unauth, _) = call_auth(d.status, "GET", "/", None);
    let unauth = unauth.to_ascii_lowercase();
    assert_eq!(code, 401, "{unauth}");
    assert!(
        unauth.contains("www-authenticate: basic realm=\"vessel\""),
        "{unauth}"
    );
    // The token as a Basic password (any user), or as a bearer token: 200.
    let basic = format!("Basic {}", base64(format!("someone:{TOKEN}").as_bytes()));
    assert_eq!(call_auth(d.status, "GET", "/", Some(&basic)).0, 200);
    let bearer = format!("Bearer {TOKEN}");
    assert_eq!(call_auth(d.status, "GET", "/", Some(&bearer)).0, 200);
    let wrong = format!("Basic {}", base64(b"someone:not-the-token"));
    assert_eq!(call_auth(d.status, "GET", "/", Some(&wrong)).0, 401);
    // The page's refresh names the version it shows: 304, no body, while nothing changed
    // (passes move the version on, so a few tries may be needed).
    let unchanged = (0..20).any(|_| {
        let (_, head, _) = call_auth(d.status, "GET", "/", Some(&bearer));
        let Some(etag) = head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("etag").then(|| v.trim().to_string())
        }) else {
            return false;
        };
        let again = format!("Authorization: {bearer}\r\nIf-None-Match: {etag}\r\n");
        let (code, _, body) = call_with(d.status, "GET", "/", &again);
        code == 304 && body.is_empty()
    });
    assert!(unchanged, "a refresh of an unchanged page is a 304");

    let profile = tempfile::tempdir().expect("profile");
    let (_browser, page) = chromium(profile.path());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let (ws, _) = tokio_tungstenite::connect_async(page.as_str())
            .await
            .expect("CDP connects");
        let mut cdp = Cdp {
            ws,
            next: 0,
            challenges: Vec::new(),
        };
cdp.call(
            "Fetch.enable",
            json!({"handleAuthRequests": true, "patterns": [{"urlPattern": "*"}]}),
        )
        .await;
        // A short window, so the page scrolls.
        cdp.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": 900, "height": 240, "deviceScaleFactor": 1, "mobile": false}),
        )
        .await;
        cdp.call("Runtime.enable", json!({})).await;
        cdp.call(
            "Page.navigate",
            json!({"url": format!("http://{}/", d.status)}),
        )
        .await;
cdp.until("document.getElementById('session-bob') !== null", LIMIT)
            .await
            .unwrap_or_else(|| panic!("the page opened with the token as Basic password; challenges: {:?}", cdp.challenges));
        assert!(
            cdp.challenges.iter().any(|c| c.eq_ignore_ascii_case("basic")),
            "the browser was asked through Basic: {:?}",
            cdp.challenges
        );

        // The session in a file with errors: in the table, with its file.
let dave = cdp
            .eval("(document.getElementById('session-dave') || {}).textContent || ''")
            .await;
        let dave = dave.as_str().unwrap_or_default().to_string();
        assert!(dave.contains("quarantined"), "{dave}");
        assert!(dave.contains("dave.yaml"), "{dave}");

        // The failing session settles on Stalled, never Reconciling, while it backs off.
let stalled = cdp
            .until(
                "(() => { const t = (document.getElementById('session-erin') || {}).textContent || ''; \
                   return t.includes('Stalled') && !t.includes('Reconciling') && t.includes('failing'); })()",
                LIMIT,
            )
            .await;
        let erin = cdp
            .eval("(document.getElementById('session-erin') || {}).textContent || ''")
            .await;
        assert!(stalled.is_some(), "erin reads Stalled: {erin}");

        // Mark the page and scroll it; then add a session: it appears without a reload.
let scrolled = cdp
            .eval("window.__mark = 42; window.scrollTo(0, 120); window.scrollY")
            .await;
        assert_eq!(scrolled, json!(120), "the page scrolls");
        d.write("carol.yaml", &session("carol"));
cdp.until("document.getElementById('session-carol') !== null", LIMIT)
            .await
            .expect("carol appears without a reload");
        let after = cdp
            .eval("JSON.stringify([window.__mark, window.scrollY, Number(document.body.dataset.refreshed || 0)])")
            .await;
        let after: Value = serde_json::from_str(after.as_str().unwrap_or("[]")).expect("json");
        assert_eq!(after[0], 42, "the same page (no reload): {after}");
        assert_eq!(after[1], 120, "the scroll position kept: {after}");
        assert!(after[2].as_u64().unwrap_or(0) >= 1, "{after}");
    });

    // The same, as JSON.
    let (_, _, body) = call_auth(d.status, "GET", "/sessions", Some(&basic));
    let list: Value = serde_json::from_str(&body).expect("json");
    let by_name = |n: &str| {
        list.as_array()
            .and_then(|l| l.iter().find(|s| s["name"] == n))
            .cloned()
            .unwrap_or(Value::Null)
    };
    assert!(
        by_name("dave")["quarantined"]
            .as_str()
            .is_some_and(|f| f.ends_with("dave.yaml")),
        "{list}"
    );
    let conds = by_name("erin")["conditions"].clone();
    let on = |k: &str| {
        conds
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == k || c["kind"] == k))
            .map(|c| c["status"] == true)
    };
    assert_eq!(on("Stalled"), Some(true), "{conds}");
    assert_eq!(on("Reconciling"), Some(false), "{conds}");
}
