//! One HTTP/1.1 request on a fresh connection, for the providers that speak plain HTTP to an
//! API on loopback or a private network (Caddy's admin API, PowerDNS). A fresh connection
//! each time is deliberate: Caddy restarts its admin listener after every config change, so a
//! kept-alive connection would be reset under us.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Reply {
    pub status: u16,
    pub body: Bytes,
    /// The `ETag`, from the headers or the trailers (Caddy sends it as a trailer).
    pub etag: Option<String>,
}

impl Reply {
    /// The start of the body, for an error message.
    pub fn brief(&self) -> String {
        String::from_utf8_lossy(&self.body[..self.body.len().min(300)])
            .trim()
            .to_string()
    }
}

/// `api` is `http://host:port` (a trailing slash is fine); returns `host:port`.
pub fn authority(api: &str, what: &str) -> Result<String, String> {
    let rest = api
        .strip_prefix("http://")
        .ok_or_else(|| format!("the {what} `{api}` must be an http:// URL"))?;
    let addr = rest.trim_end_matches('/');
    if addr.contains('@') {
        return Err(format!(
            "the {what} must be just http://host:port: credentials go in their own setting, never in the URL"
        ));
    }
    if addr.is_empty() || addr.contains('/') {
        return Err(format!(
            "the {what} `{api}` must be just http://host:port, with no path"
        ));
    }
    Ok(addr.to_string())
}

/// Connect to `addr`. A refused connection is tried again for up to half a second: Caddy's
/// admin listener is briefly down while it restarts after each config change, and a refused
/// connection means nothing was sent, so trying again is safe for any request.
async fn connect(addr: &str) -> Result<tokio::net::TcpStream, String> {
    let mut refused = 0;
    loop {
        match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
            Err(_) => return Err(format!("connecting to {addr} timed out")),
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused && refused < 10 => {
                refused += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(Err(e)) => return Err(format!("cannot connect to {addr}: {e}")),
        }
    }
}

/// Send one request to `addr` (`host:port`). Error messages name the address, never a header
/// value (headers may carry secrets).
pub async fn call(
    addr: &str,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Bytes>,
) -> Result<Reply, String> {
    let stream = connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("{addr}: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let req = req
        .body(Full::new(body.unwrap_or_default()))
        .map_err(|_| format!("{addr}: the request for {path} cannot be built"))?;
    let exchange = async {
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let mut etag = resp
            .headers()
            .get(http::header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let collected = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        if etag.is_none() {
            etag = collected
                .trailers()
                .and_then(|t| t.get(http::header::ETAG))
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
        }
        Ok::<_, String>(Reply {
            status,
            body: collected.to_bytes(),
            etag,
        })
    };
    tokio::time::timeout(ANSWER_TIMEOUT, exchange)
        .await
        .map_err(|_| {
            format!(
                "{addr} did not answer within {} s",
                ANSWER_TIMEOUT.as_secs()
            )
        })?
        .map_err(|e| format!("{addr}: {e}"))
}
