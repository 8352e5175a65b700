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

/// The health wait every compute provider runs: look at the session (is it still up, at
/// which address does the port answer?) at most every `every` while its address is known
/// and every `every_unknown` while it is not, probing the address in between, until the probe
/// passes or a look fails (the session exited or went away: the error says how). The step's
/// timeout bounds it from outside.
pub(crate) async fn wait_until_healthy<F, Fut>(
    path: Option<&str>,
    every: Duration,
    every_unknown: Duration,
    mut look: F,
) -> Result<(), super::ProviderError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<String>, super::ProviderError>>,
{
    let mut last_look: Option<tokio::time::Instant> = None;
    let mut target: Option<String> = None;
    loop {
        let interval = if target.is_some() {
            every
        } else {
            every_unknown
        };
        if last_look.is_none_or(|t| t.elapsed() >= interval) {
            last_look = Some(tokio::time::Instant::now());
            target = look().await?;
        }
        if let Some(addr) = &target
            && probe(addr, path).await
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
