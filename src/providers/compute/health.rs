//! Health probes: does a session's port answer (and, with a path, answer an HTTP GET below
//! 500)? Every compute provider's health wait is built on it.

use std::time::Duration;

/// Does `addr` (`host:port`) answer? With a path: an HTTP GET answered below 500.
pub(crate) async fn probe(addr: &str, path: Option<&str>) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(Ok(mut s)) =
        tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr)).await
    else {
        return false;
    };
    let Some(path) = path else { return true };
    let req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    match tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await {
        Ok(Ok(n)) if n >= 12 => std::str::from_utf8(&buf[9..12])
            .ok()
            .and_then(|c| c.parse::<u16>().ok())
            .is_some_and(|c| c < 500),
        _ => false,
    }
}
