//! Notifications end to end: `vessel run` with a `notify:` target, and a receiver here that
//! checks every body's HMAC-SHA256 signature and its CloudEvents schema
//! (`schemas/notification.schema.json`), and records ids, types, subjects and sequence
//! numbers (order per session, deduplication). The target goes down (connections refused)
//! and comes back; vessel is SIGKILLed with events queued and in flight.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::daemon_support::{Daemon, free_port, session, wait_for};

const SECRET: &str = "notify-s3cret-key";

/// One request the receiver took.
#[derive(Debug, Clone)]
pub struct Got {
    pub id: String,
    pub kind: String,
    pub subject: String,
    pub sequence: u64,
    pub body: serde_json::Value,
}

/// A webhook receiver on a port of its own: accepts POSTs whose signature and schema are
/// right (anything else fails the test), answers after `delay_ms`; `down()` closes the port
/// (connections refused) and `up()` opens it again.
pub struct Receiver {
    pub port: u16,
    pub got: Arc<Mutex<Vec<Got>>>,
    pub bad: Arc<Mutex<Vec<String>>>,
    /// Templated bodies (to `/chat...`).
    pub plain: Arc<Mutex<Vec<serde_json::Value>>>,
    pub delay_ms: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn validator() -> jsonschema::Validator {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/notification.schema.json"),
    )
    .expect("the notification schema is in schemas/");
    let schema: serde_json::Value = serde_json::from_str(&text).expect("schema is JSON");
    jsonschema::validator_for(&schema).expect("a schema")
}

/// Read one HTTP/1.1 request: its headers (lowercased names) and body.
fn read_request(s: &mut TcpStream) -> Option<(BTreeMap<String, String>, Vec<u8>)> {
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = s.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 1 << 20 {
            return None;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut headers = BTreeMap::new();
    if let Some(path) = head.lines().next().and_then(|l| l.split(' ').nth(1)) {
        headers.insert(":path".to_string(), path.to_string());
    }
    for line in head.lines().skip(1) {
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let len: usize = headers.get("content-length")?.parse().ok()?;
    while buf.len() < head_end + len {
        let n = s.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some((headers, buf[head_end..head_end + len].to_vec()))
}

impl Receiver {
    pub fn start() -> Receiver {
        let mut r = Receiver {
            port: free_port(),
            got: Arc::default(),
            bad: Arc::default(),
            plain: Arc::default(),
            delay_ms: Arc::default(),
            stop: Arc::default(),
            thread: None,
        };
        r.up();
        r
    }

    pub fn up(&mut self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port)).expect("the receiver binds");
        listener.set_nonblocking(true).expect("nonblocking");
        self.stop.store(false, Ordering::SeqCst);
        let plain = self.plain.clone();
        let (got, bad, delay, stop) = (
            self.got.clone(),
            self.bad.clone(),
            self.delay_ms.clone(),
            self.stop.clone(),
        );
        self.thread = Some(std::thread::spawn(move || {
            let validator = validator();
            while !stop.load(Ordering::SeqCst) {
                let mut s = match listener.accept() {
                    Ok((s, _)) => s,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(2));
                        continue;
                    }
                };
                let _ = s.set_nonblocking(false);
                let Some((headers, body)) = read_request(&mut s) else {
                    continue;
                };
                let mut problems = Vec::new();
                let mut h = axum::http::HeaderMap::new();
                if let Some(v) = headers
                    .get("x-vessel-signature")
                    .and_then(|v| axum::http::HeaderValue::from_str(v).ok())
                {
                    h.insert("x-vessel-signature", v);
                }
                if !vessel::webhook::signed(SECRET.as_bytes(), &body, &h) {
                    problems.push("bad signature".to_string());
                }
                if headers.get("content-type").map(String::as_str)
                    != Some("application/cloudevents+json")
                {
                    problems.push(format!("content type {:?}", headers.get("content-type")));
                }
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                // A templated body (the `chat` target): signed, JSON, but no CloudEvent.
                if headers.get(":path").is_some_and(|p| p.starts_with("/chat")) {
                    if problems == ["content type Some(\"application/json\")"] {
                        plain.lock().expect("lock").push(v);
                        let _ = s.write_all(
                            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                        );
                    } else {
                        bad.lock().expect("lock").push(problems.join("; "));
                    }
                    continue;
                }
                if let Err(e) = validator.validate(&v) {
                    problems.push(format!("schema: {e}"));
                }
                if v["specversion"] != "1.0" {
                    problems.push("specversion".into());
                }
                if headers.get("x-vessel-event-id").map(String::as_str) != v["id"].as_str() {
                    problems.push("the id header is not the body's id".into());
                }
                std::thread::sleep(Duration::from_millis(delay.load(Ordering::SeqCst)));
                if problems.is_empty() {
                    got.lock().expect("lock").push(Got {
                        id: v["id"].as_str().unwrap_or_default().to_string(),
                        kind: v["type"].as_str().unwrap_or_default().to_string(),
                        subject: v["subject"].as_str().unwrap_or_default().to_string(),
                        sequence: v["data"]["sequence"].as_u64().unwrap_or_default(),
                        body: v,
                    });
                    let _ = s.write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n");
                } else {
                    bad.lock().expect("lock").push(problems.join("; "));
                    let _ = s.write_all(
                        b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                }
            }
        }));
    }

    /// Close the port: connections are refused until `up`.
    pub fn down(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    pub fn got(&self) -> Vec<Got> {
        self.got.lock().expect("lock").clone()
    }

    pub fn of_kind(&self, kind: &str) -> Vec<Got> {
        self.got()
            .into_iter()
            .filter(|g| g.kind == format!("dev.vessel.session.{kind}"))
            .collect()
    }

    /// Nothing was refused for a bad signature or schema.
    pub fn assert_clean(&self) {
        let bad = self.bad.lock().expect("lock").clone();
        assert!(bad.is_empty(), "the receiver refused: {bad:?}");
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.down();
    }
}

/// A daemon whose config notifies `r` (the URL and the secret by file reference).
fn daemon_for(r: &Receiver, extra: &str) -> Daemon {
    let d = Daemon::new();
    std::fs::write(
        d.dir.path().join("notify-url"),
        format!("http://127.0.0.1:{}/hooks/vessel?token=abc\n", r.port),
    )
    .expect("url");
    std::fs::write(d.dir.path().join("notify-secret"), format!("{SECRET}\n")).expect("secret");
    d.configure(&format!(
        "notify:\n  - name: hook\n    url: {{file: notify-url}}\n    secret: {{file: notify-secret}}\n{extra}"
    ));
    d
}

/// A daemon notifying `r`, started with `n` sessions that a cap of 0 holds: `n` `held`
/// events, and no session process.
fn held_sessions(r: &Receiver, n: usize) -> Daemon {
    let mut d = daemon_for(r, "limits: {max_running: 0}\n");
    let all: String = (0..n)
        .map(|i| format!("{}---\n", session(&format!("s{i:03}"))))
        .collect();
    d.write("all.yaml", &all);
    d.start();
    d
}

/// Per subject, events arrive in the order they happened (their sequence numbers grow).
fn assert_ordered(got: &[Got]) {
    let mut last: BTreeMap<&str, u64> = BTreeMap::new();
    let mut seen: BTreeSet<&str> = BTreeSet::new();
    for g in got {
        // A repeated delivery (at least once) is the same event, the same id.
        if !seen.insert(g.id.as_str()) {
            continue;
        }
        let prev = last.insert(g.subject.as_str(), g.sequence).unwrap_or(0);
        assert!(
            g.sequence > prev,
            "{} arrived after sequence {prev}: {:?}",
            g.sequence,
            got.iter()
                .map(|g| (&g.subject, g.sequence))
                .collect::<Vec<_>>()
        );
    }
}

/// Ready (with its URLs), expiring soon, expired: each told once, signed and valid.
#[test]
fn sessions_are_told_ready_expiring_and_expired_once() {
    let r = Receiver::start();
    let mut d = daemon_for(&r, "");
    std::fs::write(
        d.dir.path().join("chat-url"),
        format!("http://127.0.0.1:{}/chat/T0/B0/token", r.port),
    )
    .expect("url");
    d.configure(concat!(
        "  - name: chat\n    url: {file: chat-url}\n    secret: {file: notify-secret}\n",
        "    events: [expiring]\n    template: '{\"text\": \"{{text}}\", \"kind\": \"{{kind}}\"}'\n",
    ));
    let expires = (chrono::Utc::now() + chrono::Duration::seconds(6))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    d.write("a.yaml", &session("alpha"));
    d.write(
        "b.yaml",
        &format!(
            "{}owner: bob@example.com\nexpires: {expires}\nwarn_before: [1d, 3d]\n",
            session("beta")
        ),
    );
    d.start();
    fn told<'a>(r: &'a Receiver, kind: &'a str, subject: &'a str) -> impl FnMut() -> bool + 'a {
        move || r.of_kind(kind).iter().any(|g| g.subject == subject)
    }
    wait_for(Duration::from_secs(30), told(&r, "ready", "alpha"))
        .unwrap_or_else(|| panic!("alpha is told ready: {:?}\n{}", r.got(), d.log()));
    let ready = r.of_kind("ready");
    let alpha = ready.iter().find(|g| g.subject == "alpha").expect("alpha");
    let urls = alpha.body["data"]["urls"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        urls.iter()
            .any(|u| u.as_str().is_some_and(|u| u.contains("alpha.localhost"))),
        "{urls:?}"
    );
    wait_for(Duration::from_secs(10), told(&r, "expiring", "beta"))
        .expect("beta is told it expires soon");
    let warn = &r.of_kind("expiring")[0];
    assert_eq!(
        warn.body["data"]["warn_before"], "1d",
        "the tightest threshold due"
    );
    assert_eq!(warn.body["data"]["owner"], "bob@example.com");
    wait_for(Duration::from_secs(20), told(&r, "expired", "beta"))
        .expect("beta is told it expired");
    // Nothing more comes for what was told (a few resyncs later).
    std::thread::sleep(Duration::from_secs(3));
    d.signal(nix::sys::signal::Signal::SIGTERM);
    // A restart tells nothing again.
    let before = r.got().len();
    d.start();
    std::thread::sleep(Duration::from_secs(4));
    let got = r.got();
    for kind in ["ready", "expiring", "expired"] {
        for subject in ["alpha", "beta"] {
            let n = r
                .of_kind(kind)
                .iter()
                .filter(|g| g.subject == subject)
                .count();
            assert!(n <= 1, "{kind} {subject} told {n} times: {got:?}");
        }
    }
    assert_eq!(
        got.len(),
        before,
        "a restart repeated something: {:?}",
        &got[before..]
    );
    let ids: BTreeSet<&str> = got.iter().map(|g| g.id.as_str()).collect();
    assert_eq!(ids.len(), got.len(), "ids are unique");
    // The chat target got only what it asked for, in its template.
    let plain = r.plain.lock().expect("lock").clone();
    assert_eq!(plain.len(), 1, "{plain:?}");
    assert_eq!(plain[0]["kind"], "expiring");
    assert!(
        plain[0]["text"]
            .as_str()
            .is_some_and(|t| t.starts_with("beta expires in")),
        "{plain:?}"
    );
    assert_ordered(&got);
    r.assert_clean();
}

/// 100 sessions held by a cap make 100 `held` events. The target answers slowly; vessel is
/// SIGKILLed part way through delivering them, and restarted: every event arrives, and at
/// most the one in flight arrives twice (the same id).
#[test]
fn sigkill_with_100_queued_loses_none() {
    let r = Receiver::start();
    r.delay_ms.store(20, Ordering::SeqCst);
    let mut d = held_sessions(&r, 100);
    let queued = |d: &Daemon| {
        std::fs::read_dir(d.state().join("outbox/hook"))
            .map(|rd| rd.flatten().filter(|e| e.path().is_file()).count())
            .unwrap_or(0)
    };
    wait_for(Duration::from_secs(20), || r.got().len() >= 30)
        .unwrap_or_else(|| panic!("deliveries begin: {}", d.log()));
    d.signal(nix::sys::signal::Signal::SIGKILL);
    let at_kill = r.got().len();
    assert!(
        at_kill < 100,
        "all were delivered before the kill ({at_kill})"
    );
    assert!(queued(&d) > 0, "events are still queued on disk");
    r.delay_ms.store(0, Ordering::SeqCst);
    d.start();
    wait_for(Duration::from_secs(30), || {
        r.got()
            .iter()
            .map(|g| g.id.clone())
            .collect::<BTreeSet<_>>()
            .len()
            >= 100
    })
    .unwrap_or_else(|| panic!("every event arrives: {} of 100", r.got().len()));
    std::thread::sleep(Duration::from_secs(2));
    let got = r.got();
    let held: BTreeSet<&str> = got
        .iter()
        .filter(|g| g.kind == "dev.vessel.session.held")
        .map(|g| g.subject.as_str())
        .collect();
    assert_eq!(held.len(), 100, "one held event per session");
    let ids: BTreeSet<&str> = got.iter().map(|g| g.id.as_str()).collect();
    assert_eq!(ids.len(), 100, "no event was made twice");
    assert!(
        got.len() - ids.len() <= 1,
        "{} duplicates; at most the one in flight",
        got.len() - ids.len()
    );
    assert_ordered(&got);
    assert_eq!(queued(&d), 0, "the outbox is empty");
    r.assert_clean();
}

/// The target is down (connections refused) while events happen: the loop's passes do not
/// slow down, status shows them queued, and after it comes back everything arrives in order.
#[test]
fn a_target_down_gets_everything_after_it_recovers() {
    let mut r = Receiver::start();
    r.down();
    let d = held_sessions(&r, 20);
    let status = |d: &Daemon| -> serde_json::Value {
        let (code, body) =
            crate::daemon_support::get(d.status, "status", "/notifications").unwrap_or_default();
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).expect("JSON")
    };
    wait_for(Duration::from_secs(20), || {
        status(&d)["hook"]["queued"] == 20
    })
    .unwrap_or_else(|| panic!("20 queued: {}", status(&d)));
    wait_for(Duration::from_secs(5), || {
        status(&d)["hook"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("127.0.0.1"))
    })
    .unwrap_or_else(|| panic!("the error is shown: {}", status(&d)));
    // The loop keeps its pace while the target is down: resyncs every second, each short.
    let passes = d.passes();
    let t0 = Instant::now();
    wait_for(Duration::from_secs(10), || d.passes() >= passes + 3).expect("passes go on");
    assert!(
        t0.elapsed() < Duration::from_secs(6),
        "{:?} for 3 passes",
        t0.elapsed()
    );
    let (_, metrics) =
        crate::daemon_support::get(d.status, "status", "/metrics").unwrap_or_default();
    assert!(
        metrics.contains("vessel_notifications_queued{target=\"hook\"} 20"),
        "{metrics}"
    );
    r.up();
    wait_for(Duration::from_secs(40), || r.got().len() >= 20)
        .unwrap_or_else(|| panic!("everything arrives: {} of 20", r.got().len()));
    wait_for(Duration::from_secs(5), || {
        status(&d)["hook"]["delivered"] == 20
    })
    .expect("counted");
    assert_eq!(status(&d)["hook"]["queued"], 0);
    assert_ordered(&r.got());
    r.assert_clean();
}

/// Running hours with the daemon's own clock: a session whose hours begin at the next full
/// minute (UTC) is stopped until then, `/status` lists when it starts, and the daemon's timer
/// starts it at the boundary (no other trigger: resyncs are an hour apart).
#[test]
fn the_timer_starts_a_session_when_its_hours_begin() {
    use chrono::Timelike;
    let mut now = chrono::Utc::now();
    // Not across midnight, and not so close to the minute that the boundary passes at start.
    while now.second() > 50 || (now.hour() == 23 && now.minute() >= 57) {
        std::thread::sleep(Duration::from_secs(1));
        now = chrono::Utc::now();
    }
    let start = now.hour() * 60 + now.minute() + 1;
    let end = start + 2;
    let hhmm = |m: u32| format!("{:02}:{:02}", m / 60, m % 60);
    let mut d = Daemon::new();
    d.edit_config(|c| c.replace("resync_interval: 1s", "resync_interval: 1h"));
    d.write(
        "a.yaml",
        &format!(
            "{}schedule: {{hours: 'daily {}-{}', timezone: UTC, outside: stop}}\n",
            session("early"),
            hhmm(start),
            hhmm(end)
        ),
    );
    d.start();
    let status = || -> serde_json::Value {
        let (_, body) =
            crate::daemon_support::get(d.status, "status", "/status").unwrap_or_default();
        serde_json::from_str(&body).unwrap_or_default()
    };
    wait_for(Duration::from_secs(10), || {
        status()["passes"].as_u64() >= Some(1)
    })
    .expect("a first pass");
    let up = status()["upcoming"].clone();
    assert_eq!(up[0]["session"], "early", "{up}");
    assert_eq!(up[0]["change"], "starts", "{up}");
    assert!(d.processes().is_empty(), "it is stopped outside its hours");
    let boundary = now
        .with_second(0)
        .and_then(|t| t.with_nanosecond(0))
        .expect("time")
        + chrono::Duration::minutes(1);
    assert_eq!(
        up[0]["at"].as_str(),
        Some(
            boundary
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                .as_str()
        )
    );
    wait_for(Duration::from_secs(90), || {
        d.get("early.localhost", "/healthz")
            .is_some_and(|(c, _)| c == 200)
    })
    .unwrap_or_else(|| panic!("it starts when its hours begin: {}", d.log()));
    assert!(
        chrono::Utc::now() >= boundary,
        "it started before its hours"
    );
    let after = status()["upcoming"].clone();
    assert_eq!(after[0]["change"], "stops", "{after}");
}
