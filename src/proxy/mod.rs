//! vessel's embedded reverse proxy: routes requests by Host to a session's address.
//!
//! The route table is an immutable map swapped atomically (`ArcSwap`): a change is one pointer
//! swap, requests in flight keep the table they started with, and no connection is dropped.
//! Lookup is one hash probe, so the cost per request does not grow with the number of routes.
//!
//! HTTP/1.1 with keep-alive to upstreams, WebSocket upgrades passed through byte for byte,
//! `X-Forwarded-*` headers, and pages that say what is wrong (404 no such host, 502 session
//! not answering, 503 session not ready). Every route records its activity (requests and
//! WebSocket bytes, not only new connections), and a request for a route that is not ready is
//! held until it is (or a timeout), after poking a waker: what sleep-on-idle and
//! wake-on-request need.

mod page;
mod pool;

pub use pool::Pool;

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::error_chain;

pub type Body = BoxBody<Bytes, hyper::Error>;

/// One route as the proxy serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// `host:port` of the session's port.
    pub upstream: String,
    pub session: String,
    /// The explicit `kind: Route` it came from, if any.
    pub route: Option<String>,
    /// Requests are forwarded only when ready; otherwise they are held (see `Proxy::set_waker`).
    pub ready: bool,
}

/// Activity counters of one route. They survive table swaps for the same host.
#[derive(Debug, Default)]
pub struct RouteStats {
    /// Milliseconds since the Unix epoch of the last request or WebSocket traffic.
    pub last_activity_ms: AtomicU64,
    pub requests: AtomicU64,
    pub ws_bytes: AtomicU64,
}

/// Activity is recorded to this resolution: writing a shared timestamp on every request
/// would bounce its cache line between the serving threads.
const ACTIVITY_RESOLUTION_MS: u64 = 100;

impl RouteStats {
    fn touch(&self) {
        let now = now_ms();
        if now.saturating_sub(self.last_activity_ms.load(Ordering::Relaxed))
            >= ACTIVITY_RESOLUTION_MS
        {
            self.last_activity_ms.store(now, Ordering::Relaxed);
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Debug)]
struct Entry {
    route: Route,
    stats: Arc<RouteStats>,
}

type Table = HashMap<String, Arc<Entry>>;

/// A snapshot of one route's activity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Activity {
    pub last_activity_ms: u64,
    pub requests: u64,
    pub ws_bytes: u64,
}

/// Called with a session's name when a request arrives for one of its routes that is not ready.
pub type Waker = Arc<dyn Fn(&str) + Send + Sync>;

/// The proxy: cheap to clone, all clones share one table.
#[derive(Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
}

struct Inner {
    table: ArcSwap<Table>,
    version: tokio::sync::watch::Sender<u64>,
    waker: std::sync::Mutex<Option<Waker>>,
    hold_timeout: Duration,
}

/// The upstream connection pool: one per serving thread, so a request and its upstream
/// connection stay on one thread (no cross-thread wake-ups per request).
pub type UpstreamClient = Pool;

fn upstream_client() -> UpstreamClient {
    Pool::default()
}

/// A change to the route table.
#[derive(Debug, Clone)]
pub enum Change {
    Upsert { host: String, route: Route },
    Remove { host: String },
}

impl Default for Proxy {
    fn default() -> Self {
        Proxy::new(Duration::from_secs(30))
    }
}

impl Proxy {
    /// A proxy that holds requests for routes that are not ready for at most `hold_timeout`.
    pub fn new(hold_timeout: Duration) -> Proxy {
        Proxy {
            inner: Arc::new(Inner {
                table: ArcSwap::from_pointee(HashMap::new()),
                version: tokio::sync::watch::channel(0).0,
                waker: std::sync::Mutex::new(None),
                hold_timeout,
            }),
        }
    }

    /// Serve on `threads` threads, each with its own single-threaded runtime, accept loop and
    /// upstream pool (as nginx runs a worker per core). Returns once they are running.
    pub fn serve_threads(
        &self,
        listener: std::net::TcpListener,
        threads: usize,
        shutdown: CancellationToken,
    ) -> std::io::Result<Vec<std::thread::JoinHandle<()>>> {
        listener.set_nonblocking(true)?;
        let mut handles = Vec::new();
        for i in 0..threads.max(1) {
            let l = listener.try_clone()?;
            let proxy = self.clone();
            let shutdown = shutdown.clone();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(
                std::thread::Builder::new()
                    .name(format!("vessel-proxy-{i}"))
                    .spawn(move || {
                        rt.block_on(async move {
                            match TcpListener::from_std(l) {
                                Ok(l) => proxy.accept_loop(l, upstream_client(), shutdown).await,
                                Err(e) => tracing::error!(error = %e, "proxy thread cannot listen"),
                            }
                        })
                    })?,
            );
        }
        Ok(handles)
    }

    /// The routes being served, by host.
    pub fn routes(&self) -> BTreeMap<String, Route> {
        self.inner
            .table
            .load()
            .iter()
            .map(|(h, e)| (h.clone(), e.route.clone()))
            .collect()
    }

    /// Activity per host.
    pub fn activity(&self) -> BTreeMap<String, Activity> {
        self.inner
            .table
            .load()
            .iter()
            .map(|(h, e)| {
                let s = &e.stats;
                (
                    h.clone(),
                    Activity {
                        last_activity_ms: s.last_activity_ms.load(Ordering::Relaxed),
                        requests: s.requests.load(Ordering::Relaxed),
                        ws_bytes: s.ws_bytes.load(Ordering::Relaxed),
                    },
                )
            })
            .collect()
    }

    /// Apply a batch of changes as one atomic swap. Hosts are lower-cased.
    pub fn apply(&self, changes: &[Change]) {
        if changes.is_empty() {
            return;
        }
        self.inner.table.rcu(|old| {
            let mut t: Table = (**old).clone();
            for c in changes {
                match c {
                    Change::Upsert { host, route } => {
                        let host = host.to_ascii_lowercase();
                        let stats = t.get(&host).map(|e| e.stats.clone()).unwrap_or_default();
                        t.insert(
                            host,
                            Arc::new(Entry {
                                route: route.clone(),
                                stats,
                            }),
                        );
                    }
                    Change::Remove { host } => {
                        t.remove(&host.to_ascii_lowercase());
                    }
                }
            }
            t
        });
        self.inner.version.send_modify(|v| *v += 1);
    }

    /// Set what is called when a request arrives for a route that is not ready.
    pub fn set_waker(&self, waker: Waker) {
        if let Ok(mut w) = self.inner.waker.lock() {
            *w = Some(waker);
        }
    }

    fn lookup(&self, host: &str) -> Option<Arc<Entry>> {
        let table = self.inner.table.load();
        if let Some(e) = table.get(host) {
            return Some(e.clone());
        }
        // `*.example.com` routes serve any single label under them.
        let (_, parent) = host.split_once('.')?;
        table.get(&format!("*.{parent}")).cloned()
    }

    /// Serve on `listener` until `shutdown` is cancelled. Connections already open finish the
    /// request they are on.
    pub async fn serve(self, listener: TcpListener, shutdown: CancellationToken) {
        self.accept_loop(listener, upstream_client(), shutdown)
            .await
    }

    async fn accept_loop(
        &self,
        listener: TcpListener,
        client: UpstreamClient,
        shutdown: CancellationToken,
    ) {
        loop {
            let (stream, remote) = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "proxy accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let proxy = self.clone();
            let shutdown = shutdown.clone();
            let client = client.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let proxy = proxy.clone();
                    let client = client.clone();
                    async move { Ok::<_, Infallible>(proxy.handle(req, remote, &client).await) }
                });
                // A client that sends no complete header within 60 s (an idle keep-alive
                // connection included) is closed, so idle connections cannot pile up.
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(60))
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), svc)
                    .with_upgrades();
                tokio::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => {}
                    _ = shutdown.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
                    }
                }
            });
        }
    }

    /// Handle one request: find the route, hold it if not ready, forward it.
    pub async fn handle(
        &self,
        mut req: Request<Incoming>,
        remote: SocketAddr,
        client: &UpstreamClient,
    ) -> Response<Body> {
        let host = request_host(&req);
        let Some(mut entry) = self.lookup(&host) else {
            return page::not_found(&host);
        };
        if !entry.route.ready {
            match self.hold(&host, &entry.route.session).await {
                Some(e) => entry = e,
                None => return page::not_ready(&host, &entry.route.session),
            }
        }
        entry.stats.requests.fetch_add(1, Ordering::Relaxed);
        entry.stats.touch();
        let upgrade = is_upgrade(req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        // Origin form on the wire; `Host` stays as the client sent it.
        if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
            let path = parts
                .uri
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/");
            parts.uri = match Uri::try_from(path) {
                Ok(u) => u,
                Err(e) => return page::bad_gateway(&host, &entry.route, &e.to_string()),
            };
        }
        parts.version = http::Version::HTTP_11;
        strip_hop_by_hop(&mut parts.headers, upgrade);
        forwarded_headers(&mut parts.headers, &host, remote);
        let upstream_req = Request::from_parts(parts, body);
        match client_upgrade {
            None => match client.send(&entry.route.upstream, upstream_req).await {
                Ok(resp) => {
                    let (mut parts, body) = resp.into_parts();
                    strip_hop_by_hop(&mut parts.headers, false);
                    Response::from_parts(parts, body.boxed())
                }
                Err(e) => page::bad_gateway(&host, &entry.route, &error_chain(&e)),
            },
            Some(client_upgrade) => {
                self.tunnel(upstream_req, client_upgrade, &host, entry)
                    .await
            }
        }
    }

    /// Wait until the route for `host` is ready (poking the waker once), or time out.
    async fn hold(&self, host: &str, session: &str) -> Option<Arc<Entry>> {
        let waker = self.inner.waker.lock().ok().and_then(|w| w.clone());
        if let Some(w) = waker {
            w(session);
        }
        let mut rx = self.inner.version.subscribe();
        let deadline = tokio::time::Instant::now() + self.inner.hold_timeout;
        loop {
            match self.lookup(host) {
                Some(e) if e.route.ready => return Some(e),
                Some(_) => {}
                None => return None,
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return None;
            }
        }
    }

    /// Forward an upgrade (WebSocket) request on a connection of its own, then splice the two
    /// upgraded streams together, metering traffic as route activity.
    async fn tunnel(
        &self,
        req: Request<Incoming>,
        client_upgrade: hyper::upgrade::OnUpgrade,
        host: &str,
        entry: Arc<Entry>,
    ) -> Response<Body> {
        // As for plain requests: an upstream that does not accept within 5 s is a bad gateway,
        // and so is one that does not answer the upgrade within 30 s.
        let connect = tokio::time::timeout(
            Duration::from_secs(5),
            TcpStream::connect(&entry.route.upstream),
        );
        let stream = match connect.await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return page::bad_gateway(host, &entry.route, &e.to_string()),
            Err(_) => {
                return page::bad_gateway(host, &entry.route, "connecting timed out after 5 s");
            }
        };
        let (mut sender, conn) =
            match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
                Ok(x) => x,
                Err(e) => return page::bad_gateway(host, &entry.route, &error_chain(&e)),
            };
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        let mut resp =
            match tokio::time::timeout(Duration::from_secs(30), sender.send_request(req)).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => return page::bad_gateway(host, &entry.route, &error_chain(&e)),
                Err(_) => {
                    return page::bad_gateway(
                        host,
                        &entry.route,
                        "the upgrade was not answered within 30 s",
                    );
                }
            };
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            let (parts, body) = resp.into_parts();
            return Response::from_parts(parts, body.boxed());
        }
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        let stats = entry.stats.clone();
        tokio::spawn(async move {
            let (Ok(client), Ok(upstream)) = tokio::join!(client_upgrade, upstream_upgrade) else {
                return;
            };
            let mut client = Metered {
                inner: TokioIo::new(client),
                stats: stats.clone(),
            };
            let mut upstream = Metered {
                inner: TokioIo::new(upstream),
                stats,
            };
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        });
        let (parts, _) = resp.into_parts();
        Response::from_parts(
            parts,
            Full::new(Bytes::new())
                .map_err(|never| match never {})
                .boxed(),
        )
    }
}

/// The request's host, lower-cased, without port or trailing dot.
fn request_host<B>(req: &Request<B>) -> String {
    let raw = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().host())
        .unwrap_or("");
    // Without the port: `[::1]:80` -> `[::1]`, `a.localhost:80` -> `a.localhost`.
    let no_port = match raw.rfind([':', ']']) {
        Some(i)
            if raw.as_bytes()[i] == b':' && !raw[..i].contains(':')
                || raw.starts_with('[') && raw[..i].ends_with(']') =>
        {
            &raw[..i]
        }
        _ => raw,
    };
    no_port.trim_end_matches('.').to_ascii_lowercase()
}

fn is_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE)
        && h.get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

/// Remove hop-by-hop headers (RFC 9110 7.6.1), keeping `Connection: upgrade` and `Upgrade`
/// for an upgrade.
fn strip_hop_by_hop(h: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| {
            v.split(',')
                .map(|t| t.trim().to_ascii_lowercase())
                .collect::<Vec<_>>()
        })
        .filter(|t| !(upgrade && t == "upgrade"))
        .filter_map(|t| HeaderName::try_from(t).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in [
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "proxy-authorization",
        "proxy-authenticate",
    ] {
        h.remove(n);
    }
    if upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        h.remove(header::CONNECTION);
        h.remove(header::UPGRADE);
    }
}

fn forwarded_headers(h: &mut HeaderMap, host: &str, remote: SocketAddr) {
    let ip = remote.ip().to_string();
    let xff = match h.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {ip}"),
        None => ip,
    };
    if let Ok(v) = HeaderValue::try_from(xff) {
        h.insert("x-forwarded-for", v);
    }
    if let Ok(v) = HeaderValue::try_from(host) {
        h.insert("x-forwarded-host", v);
    }
    h.insert("x-forwarded-proto", HeaderValue::from_static("http"));
}

/// A stream that records traffic as route activity.
struct Metered<T> {
    inner: T,
    stats: Arc<RouteStats>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Metered<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.stats.ws_bytes.fetch_add(n as u64, Ordering::Relaxed);
            self.stats.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Metered<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_normalised() {
        let r = |h: &str| {
            request_host(
                &Request::builder()
                    .header("host", h)
                    .body(())
                    .unwrap_or_default(),
            )
        };
        assert_eq!(r("Alice.LocalHost:8080"), "alice.localhost");
        assert_eq!(r("alice.localhost."), "alice.localhost");
        assert_eq!(r("[::1]:8080"), "[::1]");
        assert_eq!(r("5173-bob.localhost"), "5173-bob.localhost");
    }

    #[test]
    fn table_swaps_keep_stats_and_wildcards_match() {
        let p = Proxy::default();
        let route = |u: &str| Route {
            upstream: u.into(),
            session: "s".into(),
            route: None,
            ready: true,
        };
        p.apply(&[Change::Upsert {
            host: "A.localhost".into(),
            route: route("127.0.0.1:1"),
        }]);
        p.lookup("a.localhost")
            .map(|e| e.stats.requests.fetch_add(3, Ordering::Relaxed));
        p.apply(&[Change::Upsert {
            host: "a.localhost".into(),
            route: route("127.0.0.1:2"),
        }]);
        assert_eq!(p.activity()["a.localhost"].requests, 3);
        assert_eq!(p.routes()["a.localhost"].upstream, "127.0.0.1:2");
        p.apply(&[Change::Upsert {
            host: "*.preview.localhost".into(),
            route: route("127.0.0.1:3"),
        }]);
        assert_eq!(
            p.lookup("x.preview.localhost")
                .map(|e| e.route.upstream.clone()),
            Some("127.0.0.1:3".into())
        );
        assert!(p.lookup("preview.localhost").is_none());
        p.apply(&[Change::Remove {
            host: "a.localhost".into(),
        }]);
        assert!(p.lookup("a.localhost").is_none());
    }

    #[test]
    fn hop_by_hop_headers_go_and_upgrades_stay() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("accept", HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut h, false);
        assert!(
            h.get("x-private").is_none()
                && h.get("keep-alive").is_none()
                && h.get("connection").is_none()
        );
        assert!(h.get("accept").is_some());
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("Upgrade"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(
            h.get("upgrade").and_then(|v| v.to_str().ok()),
            Some("websocket")
        );
        assert_eq!(
            h.get("connection").and_then(|v| v.to_str().ok()),
            Some("upgrade")
        );
    }
}
