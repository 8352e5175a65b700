//! The embedded proxy in-process: route swaps never drop a connection, and the error pages.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use vessel::proxy::{Proxy, Route, RouteChange, Serving};

use crate::daemon_support::{free_port, wait_for};

fn route(port: u16) -> Route {
    Route {
        upstream: format!("127.0.0.1:{port}"),
        session: "s".into(),
        route: None,
        ready: true,
        strip_prefix: false,
    }
}

/// Send one keep-alive request on `s` and read one response (status, body).
fn exchange(
    s: &mut TcpStream,
    reader: &mut BufReader<TcpStream>,
    host: &str,
    path: &str,
) -> (u16, String) {
    write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").expect("write");
    let mut status = String::new();
    reader.read_line(&mut status).expect("status line");
    let mut len = 0;
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).expect("header");
        if h.trim().is_empty() {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; len];
    reader.read_exact(&mut body).expect("body");
    (
        status.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0),
        String::from_utf8_lossy(&body).into_owned(),
    )
}

#[test]
fn swapping_routes_never_drops_an_open_connection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = free_port();
    let _upstream = crate::daemon_support::spawn_devserver(up, dir.path());
    let proxy = Proxy::default();
    proxy.apply(&[RouteChange::Upsert {
        host: "keep.localhost".into(),
        route: route(up),
    }]);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let cancel = CancellationToken::new();
    proxy
        .serve_threads(listener, 2, Serving::default(), cancel.clone())
        .expect("serve");

    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut reader = BufReader::new(s.try_clone().expect("clone"));
    assert_eq!(
        exchange(&mut s, &mut reader, "keep.localhost", "/healthz"),
        (200, "ok\n".into())
    );
    for round in 0..20 {
        // 100 other routes come and go, and this connection's own route is replaced.
        let changes: Vec<RouteChange> = (0..100)
            .map(|i| {
                if round % 2 == 0 {
                    RouteChange::Upsert {
                        host: format!("r{i}.localhost"),
                        route: route(up),
                    }
                } else {
                    RouteChange::Remove {
                        host: format!("r{i}.localhost"),
                    }
                }
            })
            .chain(std::iter::once(RouteChange::Upsert {
                host: "keep.localhost".into(),
                route: route(up),
            }))
            .collect();
        proxy.apply(&changes);
        assert_eq!(
            exchange(&mut s, &mut reader, "keep.localhost", "/healthz"),
            (200, "ok\n".into()),
            "round {round}"
        );
    }
    // The same connection sees a removal as a 404, and an unknown host too.
    proxy.apply(&[RouteChange::Remove {
        host: "keep.localhost".into(),
    }]);
    let (code, body) = exchange(&mut s, &mut reader, "keep.localhost", "/");
    assert_eq!(code, 404);
    assert!(body.contains("No session here"), "{body}");
    // A route to a port where nothing listens: 502, saying which session.
    proxy.apply(&[RouteChange::Upsert {
        host: "dead.localhost".into(),
        route: Route {
            session: "dead".into(),
            ..route(free_port())
        },
    }]);
    let (code, body) = exchange(&mut s, &mut reader, "dead.localhost", "/");
    assert_eq!(code, 502);
    assert!(
        body.contains("Session not answering") && body.contains("dead"),
        "{body}"
    );
    cancel.cancel();
    wait_for(Duration::from_secs(1), || true);
}

/// An upstream that answers one request per connection with keep-alive, then closes the
/// connection a moment later: the proxy's pooled connection dies under it.
fn closing_upstream() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for s in l.incoming().take(1000) {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
                let _ = s.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nok\n",
                );
                std::thread::sleep(Duration::from_millis(20));
            });
        }
    });
    port
}

#[test]
fn a_pooled_connection_the_upstream_closed_is_retried_not_a_502() {
    let up = closing_upstream();
    let proxy = Proxy::default();
    proxy.apply(&[RouteChange::Upsert {
        host: "close.localhost".into(),
        route: route(up),
    }]);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let cancel = CancellationToken::new();
    proxy
        .serve_threads(listener, 1, Serving::default(), cancel.clone())
        .expect("serve");
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut reader = BufReader::new(s.try_clone().expect("clone"));
    // Requests timed to land as the upstream closes the connection the last one used.
    let mut bad = Vec::new();
    for i in 0..60 {
        let (code, _) = exchange(&mut s, &mut reader, "close.localhost", "/");
        if code != 200 {
            bad.push((i, code));
        }
        std::thread::sleep(Duration::from_micros(19_000 + (i % 20) * 100));
    }
    cancel.cancel();
    assert!(bad.is_empty(), "requests that failed: {bad:?}");
}
