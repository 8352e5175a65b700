//! Hostile HTTP against the embedded proxy and the status endpoint: request smuggling, framing
//! tricks, oversized heads, slowloris, floods of idle connections, one greedy client, CONNECT
//! and foreign upgrades, a session that never answers, and a daemon past its open-file limit.
//! Each is answered as RFC 9112 says (or closed), nothing malformed reaches a session whole,
//! and the listener keeps serving everyone else.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio_util::sync::CancellationToken;
use vessel::listeners::Limits;
use vessel::proxy::{Proxy, Route, RouteChange, Serving};

use crate::daemon_support::{Daemon, free_port, get, session, spawn_devserver, wait_for};

type Seen = Arc<Mutex<Vec<String>>>;

/// An upstream that records every request it reads whole (head and body as they came on the
/// wire) and answers 200 with the head as its body.
struct Recorder {
    port: u16,
    seen: Seen,
}

impl Recorder {
    fn start() -> Recorder {
        let port = free_port();
        let l = TcpListener::bind(("127.0.0.1", port)).expect("bind");
        let seen = Seen::default();
        let s2 = seen.clone();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let seen = s2.clone();
                std::thread::spawn(move || record(s, seen));
            }
        });
        Recorder { port, seen }
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

fn record(s: TcpStream, seen: Seen) {
    let Ok(mut w) = s.try_clone() else { return };
    let mut r = BufReader::new(s);
    let line = |r: &mut BufReader<TcpStream>| -> Option<String> {
        let mut l = String::new();
        match r.read_line(&mut l) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(l),
        }
    };
    loop {
        let mut head = String::new();
        loop {
            let Some(l) = line(&mut r) else { return };
            head.push_str(&l);
            if l == "\r\n" {
                break;
            }
        }
        let lower = head.to_ascii_lowercase();
        let mut body = Vec::new();
        if lower.contains("transfer-encoding: chunked") {
            loop {
                let Some(size) = line(&mut r) else { return };
                let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
                    return;
                };
                let mut chunk = vec![0; n + 2];
                if r.read_exact(&mut chunk).is_err() {
                    return;
                }
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
        } else if let Some(len) = lower
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
        {
            body.resize(len, 0);
            if r.read_exact(&mut body).is_err() {
                return;
            }
        }
        if let Ok(mut v) = seen.lock() {
            v.push(format!("{head}{}", String::from_utf8_lossy(&body)));
        }
        let reply = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{head}",
            head.len()
        );
        if w.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

/// An upstream that accepts connections and never answers on them.
fn silent_upstream() -> u16 {
    let port = free_port();
    let l = TcpListener::bind(("127.0.0.1", port)).expect("bind");
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in l.incoming().flatten() {
            held.push(s);
        }
    });
    port
}

/// The embedded proxy in this process, serving `routes` (host, upstream port); stops on drop.
struct Served {
    addr: SocketAddr,
    cancel: CancellationToken,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn serve(routes: &[(&str, u16)], serving: Serving) -> Served {
    let proxy = Proxy::default();
    let changes: Vec<RouteChange> = routes
        .iter()
        .map(|(host, port)| RouteChange::Upsert {
            host: host.to_string(),
            route: Route {
                upstream: format!("127.0.0.1:{port}"),
                session: host.split('.').next().unwrap_or("s").to_string(),
                route: None,
                ready: true,
                strip_prefix: false,
            },
        })
        .collect();
    proxy.apply(&changes);
    let listener = TcpListener::bind(("127.0.0.1", free_port())).expect("bind");
    let addr = listener.local_addr().expect("addr");
    let cancel = CancellationToken::new();
    proxy
        .serve_threads(listener, 1, serving, cancel.clone())
        .expect("serve");
    Served { addr, cancel }
}

/// Tight bounds, so that tests see them act in a second or two.
fn strict(max_connections: usize, per_client: usize) -> Serving {
    Serving {
        limits: Limits {
            max_connections,
            per_client,
            header_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(2),
        },
        upstream_header_timeout: Duration::from_secs(2),
        pool_idle: 16,
    }
}

#[derive(Debug)]
struct Reply {
    status: u16,
    head: String,
    body: String,
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s
}

/// Read one response (its body by Content-Length).
fn read_reply(r: &mut impl BufRead) -> Option<Reply> {
    let mut head = String::new();
    loop {
        let mut l = String::new();
        if r.read_line(&mut l).ok()? == 0 {
            return None;
        }
        head.push_str(&l);
        if l == "\r\n" {
            break;
        }
    }
    let status = head.get(9..12)?.parse().ok()?;
    let len = head
        .to_ascii_lowercase()
        .lines()
        .find_map(|l| {
            l.strip_prefix("content-length:")
                .map(|v| v.trim().to_string())
        })
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    r.read_exact(&mut body).ok()?;
    Some(Reply {
        status,
        head,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// The status of the next response on `s`.
fn next_status(s: &TcpStream) -> Option<u16> {
    let mut r = BufReader::new(s.try_clone().ok()?);
    read_reply(&mut r).map(|r| r.status)
}

/// Has the peer closed `s` (or does it within `within`)?
fn closed(s: &TcpStream, within: Duration) -> bool {
    let _ = s.set_read_timeout(Some(within));
    let mut b = [0u8; 1];
    let r = (&*s).read(&mut b);
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    match r {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

/// Send `raw` on a new connection; the reply, and whether the connection was closed after it.
fn exchange(addr: SocketAddr, raw: &[u8]) -> (Option<Reply>, bool) {
    let mut s = connect(addr);
    let _ = s.write_all(raw);
    let mut r = BufReader::new(s.try_clone().expect("clone"));
    let reply = read_reply(&mut r);
    let closed = !r.buffer().is_empty() || closed(&s, Duration::from_millis(500));
    (reply, closed)
}

fn status_of(addr: SocketAddr, raw: &str) -> u16 {
    exchange(addr, raw.as_bytes())
        .0
        .map(|r| r.status)
        .unwrap_or(0)
}

/// Connect from `source` (another loopback address: another client), within 3 s.
fn try_connect_from(
    rt: &tokio::runtime::Runtime,
    source: [u8; 4],
    to: SocketAddr,
) -> Option<TcpStream> {
    let s = rt
        .block_on(async {
            let sock = tokio::net::TcpSocket::new_v4()?;
            sock.bind(SocketAddr::from((source, 0)))?;
            tokio::time::timeout(Duration::from_secs(3), sock.connect(to))
                .await
                .map_err(std::io::Error::other)??
                .into_std()
        })
        .ok()?;
    s.set_nonblocking(false).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    Some(s)
}

fn connect_from(rt: &tokio::runtime::Runtime, source: [u8; 4], to: SocketAddr) -> TcpStream {
    try_connect_from(rt, source, to).expect("connect from another loopback address")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn the_proxy_refuses_requests_that_could_be_read_two_ways() {
    let rec = Recorder::start();
    let p = serve(&[("a.localhost", rec.port)], strict(64, 64));
    let cases: [(&str, String, u16); 13] = [
        (
            "HTTP/2 with prior knowledge",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".into(),
            0,
        ),
        (
            "two Host headers",
            "GET / HTTP/1.1\r\nHost: a.localhost\r\nHost: b.localhost\r\n\r\n".into(),
            400,
        ),
        ("no Host", "GET / HTTP/1.1\r\n\r\n".into(), 400),
        ("no Host, HTTP/1.0", "GET / HTTP/1.0\r\n\r\n".into(), 400),
        (
            "a Host with user information",
            "GET / HTTP/1.1\r\nHost: x@a.localhost\r\n\r\n".into(),
            400,
        ),
        (
            "two Content-Lengths that differ",
            "POST / HTTP/1.1\r\nHost: a.localhost\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!".into(),
            400,
        ),
        (
            "Transfer-Encoding without chunked last",
            "POST / HTTP/1.1\r\nHost: a.localhost\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n".into(),
            400,
        ),
        (
            "Transfer-Encoding in HTTP/1.0",
            "POST / HTTP/1.0\r\nHost: a.localhost\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".into(),
            400,
        ),
        (
            "a chunk size that is not hex",
            "POST / HTTP/1.1\r\nHost: a.localhost\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n".into(),
            400,
        ),
        (
            "a chunk longer than it says",
            "POST / HTTP/1.1\r\nHost: a.localhost\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhello\r\n0\r\n\r\n".into(),
            400,
        ),
        (
            "CONNECT to a routed host",
            "CONNECT a.localhost:80 HTTP/1.1\r\nHost: a.localhost:80\r\n\r\n".into(),
            405,
        ),
        (
            "CONNECT to the session's own address",
            format!(
                "CONNECT 127.0.0.1:{0} HTTP/1.1\r\nHost: 127.0.0.1:{0}\r\n\r\n",
                rec.port
            ),
            405,
        ),
        (
            "an absolute target of another scheme",
            "GET ftp://a.localhost/x HTTP/1.1\r\nHost: a.localhost\r\n\r\n".into(),
            400,
        ),
    ];
    // 0: closed without a reply.
    for (what, raw, want) in &cases {
        let (reply, closed) = exchange(p.addr, raw.as_bytes());
        if *want == 0 {
            assert!(reply.is_none() && closed, "{what}: {reply:?}");
            continue;
        }
        let reply = reply.unwrap_or_else(|| panic!("{what}: no reply"));
        assert_eq!(reply.status, *want, "{what}: {reply:?}");
        assert!(closed, "{what}: the connection stays open after a {want}");
        if *want == 405 {
            assert!(
                reply.head.to_ascii_lowercase().contains("\r\nallow: get"),
                "{reply:?}"
            );
        }
    }
    assert_eq!(
        rec.seen(),
        Vec::<String>::new(),
        "reached the session whole"
    );
    // And the listener serves the next request as usual.
    assert_eq!(
        status_of(p.addr, "GET / HTTP/1.1\r\nHost: a.localhost\r\n\r\n"),
        200
    );
}

#[test]
fn the_proxy_forwards_exactly_what_it_routed_by() {
    let (a, b) = (Recorder::start(), Recorder::start());
    let p = serve(
        &[("a.localhost", a.port), ("b.localhost", b.port)],
        strict(64, 64),
    );

    // RFC 9112 3.2.2: an absolute-form target's authority wins over Host, and is the Host
    // sent on; the session sees the origin form.
    let (reply, _) = exchange(
        p.addr,
        b"GET http://B.localhost:8080/x?y=1 HTTP/1.1\r\nHost: a.localhost\r\n\r\n",
    );
    assert_eq!(reply.map(|r| r.status), Some(200));
    assert!(a.seen().is_empty(), "{:?}", a.seen());
    let seen = b.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(seen[0].starts_with("GET /x?y=1 HTTP/1.1\r\n"), "{seen:?}");
    assert_eq!(
        seen[0].to_ascii_lowercase().matches("\r\nhost: ").count(),
        1,
        "{seen:?}"
    );
    assert!(
        seen[0].contains("\r\nhost: B.localhost:8080\r\n"),
        "{seen:?}"
    );

    // `Connection` cannot strip Host or Content-Length; it still removes what it names.
    let (reply, _) = exchange(
        p.addr,
        b"POST /c HTTP/1.1\r\nHost: a.localhost\r\nConnection: host, content-length, x-private\r\nX-Private: 1\r\nContent-Length: 5\r\n\r\nhello",
    );
    assert_eq!(reply.map(|r| r.status), Some(200));
    let last = a.seen().pop().unwrap_or_default().to_ascii_lowercase();
    assert!(last.contains("\r\nhost: a.localhost\r\n"), "{last}");
    assert!(
        last.contains("\r\ncontent-length: 5\r\n") && last.ends_with("hello"),
        "{last}"
    );
    assert!(!last.contains("x-private"), "{last}");

    // h2c (and any upgrade but a WebSocket GET) goes on as a plain request without it.
    for raw in [
        "GET /h2c HTTP/1.1\r\nHost: a.localhost\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
        "POST /ws HTTP/1.1\r\nHost: a.localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nContent-Length: 0\r\n\r\n",
        "GET /two HTTP/1.1\r\nHost: a.localhost\r\nConnection: Upgrade\r\nUpgrade: websocket, h2c\r\n\r\n",
    ] {
        let (reply, _) = exchange(p.addr, raw.as_bytes());
        assert_eq!(reply.map(|r| r.status), Some(200), "{raw}");
        let last = a.seen().pop().unwrap_or_default().to_ascii_lowercase();
        assert!(
            !last.contains("upgrade") && !last.contains("http2-settings"),
            "{last}"
        );
    }

    // CL and TE together: the chunked framing wins, the connection closes after the answer,
    // and what the Content-Length would have carried never reaches the session as a request.
    for order in [
        "Content-Length: 50\r\nTransfer-Encoding: chunked",
        "Transfer-Encoding: chunked\r\nContent-Length: 50",
    ] {
        let raw = format!(
            "POST /first HTTP/1.1\r\nHost: a.localhost\r\n{order}\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a.localhost\r\n\r\n"
        );
        let (reply, closed) = exchange(p.addr, raw.as_bytes());
        assert!(closed, "{order}: the connection stays open");
        assert!(
            reply.is_none_or(|r| r.status == 200 || r.status == 400),
            "{order}"
        );
    }
    // Two equal Content-Lengths are one.
    let (reply, _) = exchange(
        p.addr,
        b"POST /same HTTP/1.1\r\nHost: a.localhost\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
    );
    assert_eq!(reply.map(|r| r.status), Some(200));
    std::thread::sleep(Duration::from_millis(300));
    let all = a.seen().join("\n");
    assert!(!all.contains("/smuggled"), "{all}");
    assert!(all.contains("POST /same HTTP/1.1"), "{all}");
}

#[test]
fn heads_over_64_kib_get_431_and_never_reach_the_session() {
    let rec = Recorder::start();
    let p = serve(&[("a.localhost", rec.port)], strict(64, 64));
    for (what, head) in [
        (
            "one 1 MB header",
            format!("X-Big: {}\r\n", "a".repeat(1 << 20)),
        ),
        (
            "10,000 small headers",
            (0..10_000).map(|i| format!("X-{i}: {i}\r\n")).collect(),
        ),
    ] {
        let mut s = connect(p.addr);
        let writer = {
            let mut s = s.try_clone().expect("clone");
            let raw = format!("GET / HTTP/1.1\r\nHost: a.localhost\r\n{head}\r\n");
            std::thread::spawn(move || {
                let _ = s.write_all(raw.as_bytes());
            })
        };
        let mut r = BufReader::new(s.try_clone().expect("clone"));
        let reply = read_reply(&mut r);
        assert!(
            reply.as_ref().is_some_and(|r| r.status == 431),
            "{what}: {reply:?}"
        );
        assert!(closed(&s, Duration::from_secs(2)), "{what}: stays open");
        let _ = s.flush();
        let _ = writer.join();
    }
    assert!(rec.seen().is_empty());
    assert_eq!(
        status_of(p.addr, "GET / HTTP/1.1\r\nHost: a.localhost\r\n\r\n"),
        200
    );
}

#[test]
fn slowloris_and_idle_connections_are_closed_on_time() {
    let rec = Recorder::start();
    let p = serve(&[("a.localhost", rec.port)], strict(64, 64));
    let addr = p.addr;
    // A head trickling in a header line every 200 ms: closed by the 1 s header timeout.
    let slow = std::thread::spawn(move || {
        let mut s = connect(addr);
        let start = Instant::now();
        let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: a.localhost\r\n");
        for i in 0..50 {
            std::thread::sleep(Duration::from_millis(200));
            if s.write_all(format!("X-{i}: {i}\r\n").as_bytes()).is_err() {
                break;
            }
        }
        let gone = closed(&s, Duration::from_secs(5));
        (gone, start.elapsed())
    });
    // A connection that never sends: the header timeout too, not the longer idle one.
    let silent = std::thread::spawn(move || {
        let s = connect(addr);
        let start = Instant::now();
        (closed(&s, Duration::from_secs(5)), start.elapsed())
    });
    // A keep-alive connection after its response: closed by the 2 s idle timeout.
    let idle = std::thread::spawn(move || {
        let mut s = connect(addr);
        let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: a.localhost\r\n\r\n");
        let status = next_status(&s);
        let start = Instant::now();
        (status, closed(&s, Duration::from_secs(6)), start.elapsed())
    });
    // Meanwhile everyone else is served.
    for _ in 0..5 {
        assert_eq!(
            status_of(addr, "GET / HTTP/1.1\r\nHost: a.localhost\r\n\r\n"),
            200
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (gone, t) = slow.join().expect("slowloris thread");
    assert!(
        gone && t >= Duration::from_millis(900) && t < Duration::from_millis(3000),
        "slowloris: closed {gone} after {t:?}"
    );
    let (gone, t) = silent.join().expect("silent thread");
    assert!(
        gone && t >= Duration::from_millis(900) && t < Duration::from_millis(1900),
        "silent: closed {gone} after {t:?}"
    );
    let (status, gone, t) = idle.join().expect("idle thread");
    assert_eq!(status, Some(200));
    assert!(
        gone && t >= Duration::from_millis(1900) && t < Duration::from_millis(4000),
        "idle: closed {gone} after {t:?}"
    );
}

#[test]
fn a_flood_of_idle_connections_makes_room_and_busy_ones_are_never_cut() {
    let rec = Recorder::start();
    let silent = silent_upstream();
    let mut serving = strict(20, 1000);
    serving.upstream_header_timeout = Duration::from_secs(3);
    serving.limits.header_timeout = Duration::from_secs(30);
    let p = serve(
        &[("a.localhost", rec.port), ("stuck.localhost", silent)],
        serving,
    );
    // 200 idle connections against a bound of 20.
    let idle: Vec<TcpStream> = (0..200).map(|_| connect(p.addr)).collect();
    std::thread::sleep(Duration::from_millis(200));
    let start = Instant::now();
    assert_eq!(
        status_of(p.addr, "GET / HTTP/1.1\r\nHost: a.localhost\r\n\r\n"),
        200
    );
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    let open = idle
        .iter()
        .filter(|s| !closed(s, Duration::from_millis(20)))
        .count();
    assert!(open <= 20, "{open} of the idle connections are still open");
    drop(idle);

    // 20 connections busy with a session that does not answer fill the bound: a new one is
    // closed at once, and the busy ones still get their answer (a 502 at the timeout).
    let busy: Vec<TcpStream> = (0..20)
        .map(|_| {
            let mut s = connect(p.addr);
            s.write_all(b"GET / HTTP/1.1\r\nHost: stuck.localhost\r\n\r\n")
                .expect("write");
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let extra = connect(p.addr);
    assert!(
        closed(&extra, Duration::from_secs(1)),
        "a connection past a bound of busy ones is let in"
    );
    for s in &busy {
        assert_eq!(next_status(s), Some(502));
    }
}

#[test]
fn one_client_cannot_take_the_listener() {
    let rt = runtime();
    let rec = Recorder::start();
    let silent = silent_upstream();
    let mut serving = strict(100, 4);
    serving.upstream_header_timeout = Duration::from_secs(3);
    serving.limits.header_timeout = Duration::from_secs(30);
    let p = serve(
        &[("a.localhost", rec.port), ("stuck.localhost", silent)],
        serving,
    );
    // 127.0.0.2 has four requests in flight: its fifth connection is closed at once.
    let busy: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut s = connect_from(&rt, [127, 0, 0, 2], p.addr);
            s.write_all(b"GET / HTTP/1.1\r\nHost: stuck.localhost\r\n\r\n")
                .expect("write");
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let fifth = connect_from(&rt, [127, 0, 0, 2], p.addr);
    assert!(
        closed(&fifth, Duration::from_secs(1)),
        "a fifth busy-client connection"
    );
    // Another client is served meanwhile.
    let mut other = connect_from(&rt, [127, 0, 0, 3], p.addr);
    other
        .write_all(b"GET / HTTP/1.1\r\nHost: a.localhost\r\n\r\n")
        .expect("write");
    assert_eq!(next_status(&other), Some(200));
    // A client with four idle connections gets a fifth: its own longest idle one makes room.
    let idle: Vec<TcpStream> = (0..4)
        .map(|_| {
            let s = connect_from(&rt, [127, 0, 0, 4], p.addr);
            std::thread::sleep(Duration::from_millis(20));
            s
        })
        .collect();
    let mut fifth = connect_from(&rt, [127, 0, 0, 4], p.addr);
    fifth
        .write_all(b"GET / HTTP/1.1\r\nHost: a.localhost\r\n\r\n")
        .expect("write");
    assert_eq!(next_status(&fifth), Some(200));
    assert!(
        closed(&idle[0], Duration::from_secs(1)),
        "the oldest idle one"
    );
    assert!(
        idle[1..]
            .iter()
            .all(|s| !closed(s, Duration::from_millis(50)))
    );
    // The busy client's requests were never cut: each gets its 502.
    for s in &busy {
        assert_eq!(next_status(s), Some(502));
    }
}

#[test]
fn a_session_that_never_answers_is_a_502_in_the_configured_time() {
    let silent = silent_upstream();
    let mut serving = strict(64, 64);
    serving.upstream_header_timeout = Duration::from_secs(1);
    let p = serve(&[("stuck.localhost", silent)], serving);
    for raw in [
        "GET / HTTP/1.1\r\nHost: stuck.localhost\r\n\r\n",
        "GET /ws HTTP/1.1\r\nHost: stuck.localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    ] {
        let start = Instant::now();
        let (reply, _) = exchange(p.addr, raw.as_bytes());
        let t = start.elapsed();
        let reply = reply.expect("a reply");
        assert_eq!(reply.status, 502, "{raw}: {reply:?}");
        assert!(reply.body.contains("within 1s"), "{}", reply.body);
        assert!(
            t >= Duration::from_millis(900) && t < Duration::from_secs(4),
            "{raw}: after {t:?}"
        );
    }
}

#[test]
fn websocket_tunnels_still_work_within_the_bounds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = free_port();
    let _dev = spawn_devserver(up, dir.path());
    let p = serve(&[("ws.localhost", up)], strict(4, 4));
    // More tunnels one after the other than the bound: each one's place is given back.
    for _ in 0..6 {
        crate::daemon_support::websocket_echo(p.addr, "ws.localhost");
    }
}

/// Status endpoint of a daemon with tight listener bounds and a token.
fn strict_daemon(token: &str) -> Daemon {
    let mut d = Daemon::new();
    let cfg = std::fs::read_to_string(d.dir.path().join("vessel.yaml")).expect("config");
    std::fs::write(
        d.dir.path().join("vessel.yaml"),
        cfg.replace(
            &format!("status: {{listen: '{}'}}", d.status),
            &format!(
                "status: {{listen: '{}', token: {{env: VESSEL_TEST_HOSTILE_TOKEN}}}}",
                d.status
            ),
        ),
    )
    .expect("config");
    d.configure(
        "listeners:\n  max_connections: {status: 8}\n  header_timeout: 1s\n  idle_timeout: 2s\n",
    );
    d.start_with_env(Some(("VESSEL_TEST_HOSTILE_TOKEN", token)));
    wait_for(Duration::from_secs(10), || {
        get(d.status, "status", "/healthz").is_some_and(|(c, _)| c == 200)
    })
    .expect("the status endpoint answers");
    d
}

#[test]
fn the_status_endpoint_refuses_hostile_http_and_keeps_answering() {
    let token = "hostile-status-token";
    let d = strict_daemon(token);
    let s = d.status;
    let healthz = || get(s, "status", "/healthz").map(|(c, _)| c);

    // The bearer scheme is case-insensitive.
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let raw = format!(
            "GET /status HTTP/1.1\r\nHost: status\r\nAuthorization: {scheme} {token}\r\n\r\n"
        );
        assert_eq!(status_of(s, &raw), 200, "{scheme}");
    }
    assert_eq!(
        status_of(
            s,
            &format!(
                "GET /status HTTP/1.1\r\nHost: status\r\nAuthorization: Basic {token}\r\n\r\n"
            )
        ),
        401
    );

    let cases: [(&str, &str, &[u16]); 6] = [
        (
            "two Content-Lengths that differ",
            "GET /healthz HTTP/1.1\r\nHost: s\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            &[400],
        ),
        (
            "CONNECT",
            "CONNECT s:443 HTTP/1.1\r\nHost: s:443\r\n\r\n",
            &[405],
        ),
        (
            "CL and TE together",
            "GET /healthz HTTP/1.1\r\nHost: s\r\nContent-Length: 30\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /status HTTP/1.1\r\n\r\n",
            &[200],
        ),
        (
            "a chunk size that is not hex",
            "POST /healthz HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
            &[400, 405],
        ),
        (
            "an absolute-form target",
            "GET http://s/healthz HTTP/1.1\r\nHost: elsewhere\r\n\r\n",
            &[200],
        ),
        (
            "an h2c upgrade",
            "GET /healthz HTTP/1.1\r\nHost: s\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
            &[200],
        ),
    ];
    for (what, raw, want) in cases {
        let (reply, closed) = exchange(s, raw.as_bytes());
        let reply = reply.unwrap_or_else(|| panic!("{what}: no reply"));
        assert!(want.contains(&reply.status), "{what}: {reply:?}");
        if what == "CL and TE together" || what.starts_with("a chunk") {
            assert!(closed, "{what}: the connection stays open");
        }
    }
    // A 1 MB header: 431, and the connection is closed.
    let mut c = connect(s);
    let writer = {
        let mut c = c.try_clone().expect("clone");
        std::thread::spawn(move || {
            let raw = format!(
                "GET /healthz HTTP/1.1\r\nHost: s\r\nX-Big: {}\r\n\r\n",
                "a".repeat(1 << 20)
            );
            let _ = c.write_all(raw.as_bytes());
        })
    };
    assert_eq!(next_status(&c), Some(431));
    assert!(closed(&c, Duration::from_secs(2)));
    let _ = c.flush();
    let _ = writer.join();

    // Slowloris: closed by the 1 s header timeout. An idle keep-alive connection: by the 2 s
    // idle timeout (it used to be kept forever).
    let mut slow = connect(s);
    let start = Instant::now();
    let _ = slow.write_all(b"GET /healthz HTTP/1.1\r\n");
    let mut gone = false;
    for i in 0..20 {
        std::thread::sleep(Duration::from_millis(200));
        if slow
            .write_all(format!("X-{i}: {i}\r\n").as_bytes())
            .is_err()
            || closed(&slow, Duration::from_millis(1))
        {
            gone = true;
            break;
        }
    }
    let t = start.elapsed();
    assert!(gone && t < Duration::from_secs(3), "slowloris kept {t:?}");
    let mut idle = connect(s);
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: s\r\n\r\n")
        .expect("write");
    assert_eq!(next_status(&idle), Some(200));
    let start = Instant::now();
    assert!(closed(&idle, Duration::from_secs(5)), "idle kept open");
    let t = start.elapsed();
    assert!(t >= Duration::from_millis(1900), "idle closed after {t:?}");

    // 100 idle connections against a bound of 8: /healthz still answers on a new one.
    let held: Vec<TcpStream> = (0..100).map(|_| connect(s)).collect();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(healthz(), Some(200));
    let open = held
        .iter()
        .filter(|c| !closed(c, Duration::from_millis(20)))
        .count();
    assert!(open <= 8, "{open} held connections still open");
    assert_eq!(healthz(), Some(200));
}

/// The daemon's open file descriptors.
fn open_files(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn status_json(addr: SocketAddr) -> Option<Value> {
    let (code, body) = get(addr, "status", "/status")?;
    (code == 200).then(|| serde_json::from_str(&body).ok())?
}

#[test]
fn idle_connections_past_the_file_limit_leave_sessions_health_and_passes_working() {
    // This process holds 1,200 connections: raise its own limit first.
    let _ = vessel::listeners::fds::raise_nofile();
    let mut d = Daemon::new();
    d.write("alice.yaml", &session("alice"));
    d.write("bob.yaml", &session("bob"));
    // Long timeouts: the bounds alone must hold the line.
    d.configure("listeners: {header_timeout: 60s, idle_timeout: 120s}\n");
    // `ulimit -n 256`, with a hard limit of 512 that vessel raises itself to.
    d.start_with_file_limit(256, 512);
    let pid = d.pid().expect("running");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
    let nofile = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .unwrap_or_default();
    assert_eq!(nofile.get(3..5), Some(&["512", "512"][..]), "{limits}");
    let answers = |name: &str| {
        d.get(&format!("{name}.localhost"), "/healthz")
            .is_some_and(|(c, _)| c == 200)
    };
    wait_for(Duration::from_secs(30), || {
        answers("alice") && answers("bob")
    })
    .unwrap_or_else(|| panic!("the sessions do not answer; log:\n{}", d.log()));
    let passes_before = status_json(d.status)
        .and_then(|v| v["passes"].as_u64())
        .unwrap_or(0);

    // More idle connections than the whole limit, against each listener, from 12 addresses
    // with 50 each, so that the per-client bound (128) does not come into it: the listeners'
    // share of the file limit must hold the line by itself.
    let rt = runtime();
    let mut held = Vec::new();
    for addr in [d.proxy, d.status] {
        let mut failed = 0;
        for i in 0..600 {
            match try_connect_from(&rt, [127, 0, 1, 1 + (i % 12) as u8], addr) {
                Some(s) => held.push(s),
                // A listener that no longer accepts (its backlog full) fails every connect.
                None if failed > 5 => break,
                None => failed += 1,
            }
        }
    }
    assert!(held.len() >= 1100, "only {} connections made", held.len());
    std::thread::sleep(Duration::from_millis(500));

    // The daemon keeps a reserve of files free whatever is held.
    let files = open_files(pid);
    assert!(files <= 512 - 128, "{files} files open at a limit of 512");
    // Sessions answer on a new connection, and so does /healthz.
    assert!(answers("alice") && answers("bob"));
    assert_eq!(
        get(d.status, "status", "/healthz").map(|(c, _)| c),
        Some(200)
    );
    // Passes keep working: a session killed now is started again.
    let alice = d
        .processes()
        .into_iter()
        .find(|(n, _)| n == "alice")
        .map(|(_, p)| p)
        .expect("alice runs");
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(alice),
        nix::sys::signal::Signal::SIGKILL,
    );
    wait_for(Duration::from_secs(30), || {
        d.processes()
            .iter()
            .any(|(n, p)| n == "alice" && *p != alice)
            && answers("alice")
    })
    .unwrap_or_else(|| panic!("alice is not repaired; log:\n{}", d.log()));
    // The pass that started her publishes when its steps are done (she may answer through
    // the proxy a moment before it has waited her healthy): wait for it, then read it.
    let mut st = Value::Null;
    wait_for(Duration::from_secs(30), || {
        st = status_json(d.status).unwrap_or(Value::Null);
        st["passes"].as_u64().unwrap_or(0) > passes_before
    })
    .unwrap_or_else(|| {
        panic!(
            "no pass published after the repair: {st}; log:\n{}",
            d.log()
        )
    });
    assert!(st["last_pass"]["error"].is_null(), "{st}");
    drop(held);
    let log = d.log();
    assert!(
        !log.contains("Too many open files") && !log.contains("os error 24"),
        "{log}"
    );
}

/// The child half of `an_accept_that_fails_for_want_of_files_backs_off`: serves a listener
/// while every file descriptor of the process is taken, and says how much CPU that cost.
#[test]
#[ignore = "run by an_accept_that_fails_for_want_of_files_backs_off, in a process of its own"]
fn emfile_child() {
    let Some(port) = std::env::var("VESSEL_TEST_EMFILE_PORT")
        .ok()
        .and_then(|p| p.parse::<u16>().ok())
    else {
        return;
    };
    use nix::sys::resource::{Resource, UsageWho, getrlimit, getrusage, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    setrlimit(Resource::RLIMIT_NOFILE, 256, hard).expect("setrlimit");
    let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind");
    let app = axum::Router::new().fallback(|| async { "ok\n" });
    let cancel = CancellationToken::new();
    vessel::listeners::serve_router_thread(
        "emfile-test",
        listener,
        app,
        Limits::default(),
        cancel.clone(),
    )
    .expect("serve");
    std::thread::sleep(Duration::from_millis(300));
    let mut hog = Vec::new();
    loop {
        match std::fs::File::open("/dev/null") {
            Ok(f) => hog.push(f),
            Err(e) if e.raw_os_error() == Some(nix::libc::EMFILE) => break,
            Err(e) => panic!("{e}"),
        }
    }
    println!("READY");
    let cpu = || {
        getrusage(UsageWho::RUSAGE_SELF)
            .map(|u| {
                let t = |tv: nix::sys::time::TimeVal| {
                    tv.tv_sec() as u64 * 1000 + tv.tv_usec() as u64 / 1000
                };
                t(u.user_time()) + t(u.system_time())
            })
            .unwrap_or(0)
    };
    // The parent connects now; every accept fails with EMFILE for 2 s.
    std::thread::sleep(Duration::from_millis(500));
    let before = cpu();
    std::thread::sleep(Duration::from_secs(2));
    println!("CPU {}", cpu() - before);
    drop(hog);
    std::thread::sleep(Duration::from_secs(4));
    cancel.cancel();
}

#[test]
fn an_accept_that_fails_for_want_of_files_backs_off() {
    use std::process::{Command, Stdio};
    let port = free_port();
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "hostile_http::emfile_child",
            "--ignored",
            "--nocapture",
        ])
        .env("VESSEL_TEST_EMFILE_PORT", port.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("child");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    let mut next = |want: &str| -> String {
        loop {
            line.clear();
            if out.read_line(&mut line).unwrap_or(0) == 0 {
                return String::new();
            }
            if line.starts_with(want) {
                return line.trim().to_string();
            }
        }
    };
    assert_eq!(next("READY"), "READY");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let waiting: Vec<TcpStream> = (0..3)
        .map(|_| {
            let mut s = connect(addr);
            s.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
                .expect("write");
            s
        })
        .collect();
    let cpu: u64 = next("CPU")
        .strip_prefix("CPU ")
        .and_then(|n| n.parse().ok())
        .expect("the child's CPU time");
    // A spinning accept loop burns the whole 2 s; a backing-off one next to nothing.
    assert!(cpu < 300, "{cpu} ms of CPU in 2 s of EMFILE");
    // Once files are free again, the connections that waited are served.
    for s in &waiting {
        assert_eq!(next_status(s), Some(200));
    }
    let _ = child.wait();
}
