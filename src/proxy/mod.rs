//! vessel's embedded reverse proxy: routes requests by Host (and path prefix) to a session's
//! address.
//!
//! The route table is an immutable map swapped atomically (`ArcSwap`): a change is one pointer
//! swap, requests in flight keep the table they started with, and no connection is dropped.
//! Lookup is one hash probe for the host, then a walk of that host's few path prefixes,
//! longest first (a host without path routes has one entry), so the cost per request does not
//! grow with the number of routes. A prefix matches on whole segments (`/a` serves `/a` and
//! `/a/b`, not `/ab`); a route may take its prefix off the path it sends on.
//!
//! HTTP/1.1 with keep-alive to upstreams, WebSocket upgrades passed through byte for byte,
//! `X-Forwarded-*` headers, and pages that say what is wrong (400 a request vessel will not
//! pass on, 404 no such host, 405 CONNECT, 502 session not answering, 503 session not ready).
//! Every route records its activity (requests and WebSocket bytes, not only new connections),
//! and a request for a route that is not ready is held until it is (or a timeout), after poking
//! a waker: what sleep-on-idle and wake-on-request need.
//!
//! Strict where leniency would let a request mean one thing to vessel and another upstream
//! (RFC 9112): one Host, required; an absolute-form target's authority wins over Host and
//! becomes the Host sent on; a `Connection` header cannot remove Host or Content-Length; only
//! a GET asking for `Upgrade: websocket` is tunnelled (any other upgrade goes on as a plain
//! request without it); CONNECT is refused; a request body that breaks its framing is the
//! client's error (400), not the session's (502). Connections are bounded and timed out by
//! `listeners`.

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
use http::uri::Authority;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::error_chain;
use crate::listeners::{self, Conn, Gate, Limits, OnRead};

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
    /// Take the route's path prefix off the request's path before it goes on (a route
    /// without a prefix has nothing to take).
    pub strip_prefix: bool,
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
    /// Its path prefix; `None` for the host's `/`.
    prefix: Option<String>,
}

/// One host's routes, longest prefix first, the host's `/` (no prefix) last.
type HostRoutes = Vec<Arc<Entry>>;

/// Routes by lower-cased host.
type Table = HashMap<String, HostRoutes>;

/// The route among `routes` (longest prefix first) that serves `path`.
fn pick(routes: &HostRoutes, path: &str) -> Option<Arc<Entry>> {
    routes
        .iter()
        .find(|e| {
            e.prefix
                .as_deref()
                .is_none_or(|p| crate::model::path_under(path, p))
        })
        .cloned()
}

impl Entry {
    /// Its identity: the host, or `host/path` (`model::route_key`).
    fn key(&self, host: &str) -> String {
        crate::model::route_key(host, self.prefix.as_deref())
    }
}

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
    hold_timeout: std::sync::atomic::AtomicU64,
    /// Sessions asleep or waking: their routes are not ready whatever a change says.
    asleep: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Sessions that cannot wake because the platform is full: requests get a 503 at once.
    full: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Requests held now, and the bound on them.
    held: std::sync::atomic::AtomicUsize,
    max_held: std::sync::atomic::AtomicUsize,
    /// Requests answered 503 because their session did not wake in time, or too many waited.
    rejected_wake_timeout: AtomicU64,
    rejected_held_full: AtomicU64,
    rejected_full: AtomicU64,
    /// A browser's navigation to a waking session gets a page that reloads itself, rather
    /// than waiting.
    waking_page: std::sync::atomic::AtomicBool,
    /// Requests held now, per session.
    held_by: std::sync::Mutex<HashMap<String, usize>>,
    /// What routes that are not served say, and per-route page choices (`set_pages`).
    pages: ArcSwap<Pages>,
    /// Record each request's activity (on unless a bench turns it off to measure its cost).
    track_activity: std::sync::atomic::AtomicBool,
}

/// What the proxy says for routes it does not serve, and per-route choices for the ones it
/// holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pages {
    /// Routes of sessions declared `stopped`, by host (lower-case, or a `*.` wildcard): each
    /// one's path prefix and session. A request gets the "stopped" page rather than "no
    /// session here" (it never wakes anything).
    stopped: HashMap<String, Vec<(Option<String>, String)>>,
    /// Routes whose browser navigations get (true) or do not get (false) the waking page,
    /// whatever `Holding::waking_page` says, by route key (`model::route_key`).
    pub waking_page: HashMap<String, bool>,
}

impl Pages {
    /// Say that the route `key` (`model::route_key`) belongs to `session`, declared stopped.
    pub fn stopped_route(&mut self, key: &str, session: &str) {
        let (host, prefix) = crate::model::split_route_key(key);
        self.stopped
            .entry(host.to_ascii_lowercase())
            .or_default()
            .push((prefix.map(str::to_string), session.to_string()));
    }

    /// The stopped session a request for `path` on `host` would have gone to, found as
    /// routes are: the host's longest prefix the path is under, else the same on the `*.`
    /// wildcard of its parent.
    fn stopped(&self, host: &str, path: &str) -> Option<&str> {
        if self.stopped.is_empty() {
            return None;
        }
        let on = |h: &str| {
            self.stopped.get(h).and_then(|routes| {
                routes
                    .iter()
                    .filter(|(prefix, _)| {
                        prefix
                            .as_deref()
                            .is_none_or(|p| crate::model::path_under(path, p))
                    })
                    .max_by_key(|(prefix, _)| prefix.as_ref().map_or(0, |p| p.len() + 1))
                    .map(|(_, session)| session.as_str())
            })
        };
        on(host).or_else(|| {
            let (_, parent) = host.split_once('.')?;
            on(&format!("*.{parent}"))
        })
    }
}

/// What the proxy has held and refused, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HoldCounters {
    /// Requests held now, waiting for their session to wake.
    pub held: u64,
    /// Requests answered 503 because their session did not wake within the wake timeout.
    pub rejected_wake_timeout: u64,
    /// Requests answered 503 because too many were already held.
    pub rejected_held_full: u64,
    /// Requests answered 503 because their session could not wake under the caps.
    pub rejected_platform_full: u64,
}

/// How the proxy holds requests for sessions that are asleep or waking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holding {
    /// How long a request waits for its session to wake before a 503.
    pub wake_timeout: Duration,
    /// Requests held at most, all sessions together; past it, 503 at once.
    pub max_held: usize,
    /// A browser's navigation (a GET accepting text/html) gets a page that reloads itself
    /// instead of waiting.
    pub waking_page: bool,
}

impl Default for Holding {
    fn default() -> Self {
        Holding {
            wake_timeout: Duration::from_secs(60),
            max_held: 4096,
            waking_page: false,
        }
    }
}

/// The upstream connection pool: one per serving thread, so a request and its upstream
/// connection stay on one thread (no cross-thread wake-ups per request).
pub type UpstreamClient = Pool;

/// How a proxy listener serves: its connection bounds and timeouts, how long a session may
/// take to start answering, and how many idle upstream connections it keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Serving {
    pub limits: Limits,
    /// A session that sends no response head within this gets the client a 502.
    pub upstream_header_timeout: Duration,
    /// Idle upstream connections kept, across all serving threads.
    pub pool_idle: usize,
}

impl Default for Serving {
    fn default() -> Self {
        Serving {
            limits: Limits::default(),
            upstream_header_timeout: Duration::from_secs(60),
            pool_idle: 256,
        }
    }
}

/// What handling one request needs to know about its connection.
struct Cx {
    remote: SocketAddr,
    client: UpstreamClient,
    conn: Conn,
    upstream_header_timeout: Duration,
}

/// A change to the route table. `host` is the route's key: a host, or a host followed by a
/// path prefix (`preview.localhost/preview/user-1`), as `model::route_key` writes it.
#[derive(Debug, Clone)]
pub enum RouteChange {
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
                hold_timeout: AtomicU64::new(hold_timeout.as_millis() as u64),
                asleep: Default::default(),
                full: Default::default(),
                held: Default::default(),
                max_held: std::sync::atomic::AtomicUsize::new(Holding::default().max_held),
                rejected_wake_timeout: AtomicU64::new(0),
                rejected_held_full: AtomicU64::new(0),
                rejected_full: AtomicU64::new(0),
                waking_page: Default::default(),
                held_by: Default::default(),
                pages: ArcSwap::from_pointee(Pages::default()),
                track_activity: std::sync::atomic::AtomicBool::new(true),
            }),
        }
    }

    /// Set how requests for sleeping sessions are held.
    pub fn set_holding(&self, h: Holding) {
        let i = &self.inner;
        i.hold_timeout
            .store(h.wake_timeout.as_millis() as u64, Ordering::Relaxed);
        i.max_held.store(h.max_held, Ordering::Relaxed);
        i.waking_page.store(h.waking_page, Ordering::Relaxed);
    }

    /// Set what routes that are not served say, and per-route page choices. Swapped only when
    /// it changed.
    pub fn set_pages(&self, pages: Pages) {
        if **self.inner.pages.load() != pages {
            self.inner.pages.store(Arc::new(pages));
        }
    }

    /// Record activity per request (the default), or not: for measuring what recording costs.
    /// Without it sessions never fall asleep for idleness.
    pub fn set_activity_tracking(&self, on: bool) {
        self.inner.track_activity.store(on, Ordering::Relaxed);
    }

    /// Requests held now, per session (sessions with none left out).
    pub fn held_by_session(&self) -> HashMap<String, usize> {
        self.inner
            .held_by
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// What has been held and refused.
    pub fn hold_counters(&self) -> HoldCounters {
        let i = &self.inner;
        HoldCounters {
            held: i.held.load(Ordering::Relaxed) as u64,
            rejected_wake_timeout: i.rejected_wake_timeout.load(Ordering::Relaxed),
            rejected_held_full: i.rejected_held_full.load(Ordering::Relaxed),
            rejected_platform_full: i.rejected_full.load(Ordering::Relaxed),
        }
    }

    /// Mark a session asleep (its routes hold requests and poke the waker) or awake again
    /// (they serve), in one swap. Awake, `moved` maps upstreams the session had to the ones
    /// it has now (a container woken from `stop` may publish its ports elsewhere).
    pub fn set_asleep(&self, session: &str, asleep: bool, moved: &HashMap<String, String>) {
        {
            let mut set = self.inner.asleep.lock().unwrap_or_else(|p| p.into_inner());
            if asleep {
                set.insert(session.to_string());
            } else {
                set.remove(session);
            }
        }
        self.inner.table.rcu(|old| {
            let mut t: Table = (**old).clone();
            for e in t.values_mut().flat_map(|routes| routes.iter_mut()) {
                if e.route.session == session {
                    let mut route = e.route.clone();
                    route.ready = !asleep;
                    if let Some(to) = moved.get(&route.upstream) {
                        route.upstream = to.clone();
                    }
                    *e = Arc::new(Entry {
                        route,
                        stats: e.stats.clone(),
                        prefix: e.prefix.clone(),
                    });
                }
            }
            t
        });
        self.inner.version.send_modify(|v| *v += 1);
    }

    /// Say that `session` cannot wake now because the platform is full (its held requests
    /// get a 503 saying so), or that it may again.
    pub fn set_full(&self, session: &str, full: bool) {
        let changed = {
            let mut set = self.inner.full.lock().unwrap_or_else(|p| p.into_inner());
            if full {
                set.insert(session.to_string())
            } else {
                set.remove(session)
            }
        };
        if changed && full {
            self.inner.version.send_modify(|v| *v += 1);
        }
    }

    fn is_full(&self, session: &str) -> bool {
        self.inner
            .full
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(session)
    }

    /// The last activity of each session with routes (milliseconds since the Unix epoch, 0
    /// for none), the latest over its routes.
    pub fn session_activity(&self) -> HashMap<String, u64> {
        let mut out: HashMap<String, u64> = HashMap::new();
        for e in self.inner.table.load().values().flatten() {
            let t = e.stats.last_activity_ms.load(Ordering::Relaxed);
            let v = out.entry(e.route.session.clone()).or_default();
            *v = (*v).max(t);
        }
        out
    }

    /// Serve on `threads` threads, each with its own single-threaded runtime, accept loop and
    /// upstream pool (as nginx runs a worker per core), within one set of connection bounds.
    /// Returns once they are running.
    pub fn serve_threads(
        &self,
        listener: std::net::TcpListener,
        threads: usize,
        serving: Serving,
        shutdown: CancellationToken,
    ) -> std::io::Result<Vec<std::thread::JoinHandle<()>>> {
        listener.set_nonblocking(true)?;
        let threads = threads.max(1);
        let gate = Gate::new("proxy", serving.limits);
        let mut handles = Vec::new();
        for i in 0..threads {
            let l = listener.try_clone()?;
            let proxy = self.clone();
            let shutdown = shutdown.clone();
            let gate = gate.clone();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(
                std::thread::Builder::new()
                    .name(format!("vessel-proxy-{i}"))
                    .spawn(move || {
                        rt.block_on(async move {
                            match TcpListener::from_std(l) {
                                Ok(l) => {
                                    let pool = Pool::new(serving.pool_idle / threads);
                                    proxy.accept_loop(l, pool, gate, serving, shutdown).await
                                }
                                Err(e) => tracing::error!(error = %e, "proxy thread cannot listen"),
                            }
                        })
                    })?,
            );
        }
        Ok(handles)
    }

    /// Moves on with every change of the table (and of what requests for a session get).
    pub fn version(&self) -> u64 {
        *self.inner.version.borrow()
    }

    /// The routes being served, by key (host, or `host/path`).
    pub fn routes(&self) -> BTreeMap<String, Route> {
        self.inner
            .table
            .load()
            .iter()
            .flat_map(|(h, routes)| routes.iter().map(move |e| (e.key(h), e.route.clone())))
            .collect()
    }

    /// Activity per route key (host, or `host/path`).
    pub fn activity(&self) -> BTreeMap<String, Activity> {
        self.inner
            .table
            .load()
            .iter()
            .flat_map(|(h, routes)| routes.iter().map(move |e| (h, e)))
            .map(|(h, e)| {
                let s = &e.stats;
                (
                    e.key(h),
                    Activity {
                        last_activity_ms: s.last_activity_ms.load(Ordering::Relaxed),
                        requests: s.requests.load(Ordering::Relaxed),
                        ws_bytes: s.ws_bytes.load(Ordering::Relaxed),
                    },
                )
            })
            .collect()
    }

    /// Apply a batch of changes as one atomic swap. Hosts are lower-cased; paths are kept as
    /// they are (they match case-sensitively).
    pub fn apply(&self, changes: &[RouteChange]) {
        if changes.is_empty() {
            return;
        }
        let asleep = self.inner.asleep.lock().unwrap_or_else(|p| p.into_inner());
        self.inner.table.rcu(|old| {
            let mut t: Table = (**old).clone();
            for c in changes {
                let (RouteChange::Upsert { host: key, .. } | RouteChange::Remove { host: key }) = c;
                let (host, prefix) = crate::model::split_route_key(key);
                let host = host.to_ascii_lowercase();
                let routes = t.entry(host.clone()).or_default();
                let at = routes.iter().position(|e| e.prefix.as_deref() == prefix);
                match c {
                    RouteChange::Upsert { route, .. } => {
                        let mut route = route.clone();
                        route.ready &= !asleep.contains(&route.session);
                        let entry = Arc::new(Entry {
                            route,
                            stats: at.map(|i| routes[i].stats.clone()).unwrap_or_default(),
                            prefix: prefix.map(str::to_string),
                        });
                        match at {
                            Some(i) => routes[i] = entry,
                            None => {
                                routes.push(entry);
                                // Longest prefix first; the host's `/` (none) last.
                                routes.sort_by_key(|e| {
                                    std::cmp::Reverse(e.prefix.as_ref().map_or(0, |p| p.len() + 1))
                                });
                            }
                        }
                    }
                    RouteChange::Remove { .. } => {
                        if let Some(i) = at {
                            routes.remove(i);
                        }
                        if routes.is_empty() {
                            t.remove(&host);
                        }
                    }
                }
            }
            t
        });
        drop(asleep);
        self.inner.version.send_modify(|v| *v += 1);
    }

    /// Set what is called when a request arrives for a route that is not ready.
    pub fn set_waker(&self, waker: Waker) {
        // The slot holds a whole value, never half of one: a poisoned lock is taken as is.
        *self.inner.waker.lock().unwrap_or_else(|p| p.into_inner()) = Some(waker);
    }

    /// The route that serves `path` on `host`: the host's longest matching prefix, else the
    /// same on the `*.` wildcard of its parent.
    fn lookup(&self, host: &str, path: &str) -> Option<Arc<Entry>> {
        let table = self.inner.table.load();
        if let Some(e) = table.get(host).and_then(|r| pick(r, path)) {
            return Some(e);
        }
        // `*.example.com` routes serve any single label under them.
        let (_, parent) = host.split_once('.')?;
        table
            .get(&format!("*.{parent}"))
            .and_then(|r| pick(r, path))
    }

    /// Serve on `listener` until `shutdown` is cancelled. Connections already open finish the
    /// request they are on.
    pub async fn serve(self, listener: TcpListener, serving: Serving, shutdown: CancellationToken) {
        let gate = Gate::new("proxy", serving.limits);
        let pool = Pool::new(serving.pool_idle);
        self.accept_loop(listener, pool, gate, serving, shutdown)
            .await
    }

    async fn accept_loop(
        &self,
        listener: TcpListener,
        client: UpstreamClient,
        gate: Gate,
        serving: Serving,
        shutdown: CancellationToken,
    ) {
        listeners::accept_loop(listener, gate, shutdown.clone(), |stream, remote, conn| {
            let _ = stream.set_nodelay(true);
            let proxy = self.clone();
            let cx = Arc::new(Cx {
                remote,
                client: client.clone(),
                conn: conn.clone(),
                upstream_header_timeout: serving.upstream_header_timeout,
            });
            let svc = service_fn(move |req| {
                let proxy = proxy.clone();
                let cx = cx.clone();
                async move { Ok::<_, Infallible>(proxy.handle(req, &cx).await) }
            });
            tokio::spawn(listeners::serve_http(stream, conn, svc, shutdown.clone()));
        })
        .await
    }

    /// Handle one request: check it, find the route, hold it if not ready, forward it.
    async fn handle(&self, mut req: Request<Incoming>, cx: &Cx) -> Response<Body> {
        if req.method() == Method::CONNECT {
            return page::connect_refused();
        }
        let target = match Target::of(&req) {
            Ok(t) => t,
            Err(why) => return page::bad_request(why),
        };
        let host = target.host;
        let Some(mut entry) = self.lookup(&host, req.uri().path()) else {
            let pages = self.inner.pages.load();
            return match pages.stopped(&host, req.uri().path()) {
                Some(session) => page::stopped(&host, session),
                None => page::not_found(&host),
            };
        };
        if !entry.route.ready {
            // Activity: the request that wakes a session counts, so it does not fall asleep
            // again before the request is through.
            entry.stats.touch();
            let navigation = req.method() == Method::GET
                && req
                    .headers()
                    .get(header::ACCEPT)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.contains("text/html"));
            let page = self
                .inner
                .pages
                .load()
                .waking_page
                .get(&entry.key(&host))
                .copied();
            match self
                .hold(
                    &host,
                    req.uri().path(),
                    &entry.route.session,
                    navigation,
                    page,
                )
                .await
            {
                Held::Ready(e) => entry = e,
                Held::TimedOut => return page::not_ready(&host, &entry.route.session),
                Held::Full => return page::too_many_waiting(&host, &entry.route.session),
                Held::Page => return page::waking(&host, &entry.route.session),
                Held::PlatformFull => return page::platform_full(&host, &entry.route.session),
            }
        }
        let track = self.inner.track_activity.load(Ordering::Relaxed);
        if track {
            entry.stats.requests.fetch_add(1, Ordering::Relaxed);
            entry.stats.touch();
        }
        let upgrade = is_websocket_upgrade(&req);
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        // Origin form on the wire (without the route's prefix if it strips it, the query
        // kept), and the Host the request was routed by.
        let strip = entry.prefix.as_deref().filter(|_| entry.route.strip_prefix);
        if parts.uri.scheme().is_some() || parts.uri.authority().is_some() || strip.is_some() {
            let full = parts.uri.path();
            let path = match strip.and_then(|p| full.strip_prefix(p)) {
                Some("") => "/",
                Some(rest) => rest,
                None => full,
            };
            let target = match parts.uri.query() {
                Some(q) => format!("{path}?{q}"),
                None => path.to_string(),
            };
            parts.uri = match Uri::try_from(target) {
                Ok(u) => u,
                Err(_) => return page::bad_request("the request target is not a valid URI"),
            };
        }
        if let Some(p) = strip
            && let Ok(v) = HeaderValue::try_from(p)
        {
            parts.headers.insert("x-forwarded-prefix", v);
        }
        parts.headers.insert(header::HOST, target.authority);
        parts.version = Version::HTTP_11;
        strip_hop_by_hop(&mut parts.headers, upgrade);
        forwarded_headers(&mut parts.headers, &host, cx.remote);
        let (body, body_failed) = RequestBody::new(body);
        let upstream_req = Request::from_parts(parts, body);
        let Some(client_upgrade) = client_upgrade else {
            let limit = cx.upstream_header_timeout;
            let sent =
                tokio::time::timeout(limit, cx.client.send(&entry.route.upstream, upstream_req));
            return match sent.await {
                Ok(Ok(resp)) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
                    page::bad_gateway(&host, &entry.route, "it switched protocols unasked")
                }
                Ok(Ok(resp)) => {
                    let (mut parts, body) = resp.into_parts();
                    strip_hop_by_hop(&mut parts.headers, false);
                    Response::from_parts(parts, body.boxed())
                }
                Ok(Err(_)) if body_failed.load(Ordering::Relaxed) => {
                    page::bad_request("the request body does not follow its framing")
                }
                Ok(Err(e)) => page::bad_gateway(&host, &entry.route, &error_chain(&e)),
                Err(_) => page::bad_gateway(
                    &host,
                    &entry.route,
                    &format!("no response within {}", crate::model::Duration(limit)),
                ),
            };
        };
        self.tunnel(upstream_req, client_upgrade, &host, entry, cx)
            .await
    }

    /// Wait until the route for `path` on `host` is ready (poking the waker once), or time out; within
    /// the bound on held requests. A browser's navigation may get the waking page instead
    /// (`page`: the route's own choice, else the proxy's).
    async fn hold(
        &self,
        host: &str,
        path: &str,
        session: &str,
        navigation: bool,
        page: Option<bool>,
    ) -> Held {
        let i = &self.inner;
        let waker = i.waker.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(w) = waker {
            w(session);
        }
        if navigation && page.unwrap_or_else(|| i.waking_page.load(Ordering::Relaxed)) {
            return Held::Page;
        }
        if i.held.fetch_add(1, Ordering::Relaxed) >= i.max_held.load(Ordering::Relaxed) {
            i.held.fetch_sub(1, Ordering::Relaxed);
            i.rejected_held_full.fetch_add(1, Ordering::Relaxed);
            return Held::Full;
        }
        *i.held_by
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(session.to_string())
            .or_default() += 1;
        struct Release<'a>(&'a Inner, &'a str);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                self.0.held.fetch_sub(1, Ordering::Relaxed);
                let mut by = self.0.held_by.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(n) = by.get_mut(self.1) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        by.remove(self.1);
                    }
                }
            }
        }
        let _release = Release(i, session);
        let mut rx = i.version.subscribe();
        let timeout = Duration::from_millis(i.hold_timeout.load(Ordering::Relaxed));
        let held_at = tokio::time::Instant::now();
        let deadline = held_at + timeout;
        loop {
            match self.lookup(host, path) {
                Some(e) if e.route.ready => {
                    let waited_ms = held_at.elapsed().as_millis() as u64;
                    tracing::debug!(%session, waited_ms, "held request goes on");
                    return Held::Ready(e);
                }
                Some(_) if self.is_full(session) => {
                    i.rejected_full.fetch_add(1, Ordering::Relaxed);
                    return Held::PlatformFull;
                }
                Some(_) => {}
                None => {
                    i.rejected_wake_timeout.fetch_add(1, Ordering::Relaxed);
                    return Held::TimedOut;
                }
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                i.rejected_wake_timeout.fetch_add(1, Ordering::Relaxed);
                return Held::TimedOut;
            }
        }
    }

    /// Forward an upgrade (WebSocket) request on a connection of its own, then splice the two
    /// upgraded streams together, metering traffic as route activity.
    async fn tunnel(
        &self,
        req: Request<RequestBody>,
        client_upgrade: hyper::upgrade::OnUpgrade,
        host: &str,
        entry: Arc<Entry>,
        cx: &Cx,
    ) -> Response<Body> {
        // As for plain requests: an upstream that does not accept within 5 s is a bad gateway,
        // and so is one that does not answer the upgrade within the upstream header timeout.
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
        let limit = cx.upstream_header_timeout;
        let mut resp = match tokio::time::timeout(limit, sender.send_request(req)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return page::bad_gateway(host, &entry.route, &error_chain(&e)),
            Err(_) => {
                return page::bad_gateway(
                    host,
                    &entry.route,
                    &format!(
                        "the upgrade was not answered within {}",
                        crate::model::Duration(limit)
                    ),
                );
            }
        };
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            let (parts, body) = resp.into_parts();
            return Response::from_parts(parts, body.boxed());
        }
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        let stats = entry.stats.clone();
        // The tunnel keeps its connection's place in the listener, busy, while it lasts.
        let conn = cx.conn.clone();
        let busy = conn.busy();
        tokio::spawn(async move {
            let _held = (conn, busy);
            let (Ok(client), Ok(upstream)) = tokio::join!(client_upgrade, upstream_upgrade) else {
                return;
            };
            // Traffic either way is route activity.
            let meter = |stats: Arc<RouteStats>| {
                move |n: usize| {
                    stats.ws_bytes.fetch_add(n as u64, Ordering::Relaxed);
                    stats.touch();
                }
            };
            let mut client = OnRead::new(TokioIo::new(client), meter(stats.clone()));
            let mut upstream = OnRead::new(TokioIo::new(upstream), meter(stats));
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

/// How holding a request for a route that is not ready ended.
enum Held {
    Ready(Arc<Entry>),
    TimedOut,
    Full,
    Page,
    PlatformFull,
}

/// Where a request goes: the host its route is looked up by (lower-cased, without port or
/// trailing dot), and the authority sent on as its Host.
#[derive(Debug)]
struct Target {
    host: String,
    authority: HeaderValue,
}

impl Target {
    /// RFC 9112 3.2: exactly one Host (an HTTP/1.1 request without one is refused), and an
    /// absolute-form target's authority wins over it (3.2.2). The error says why, for a 400.
    fn of<B>(req: &Request<B>) -> Result<Target, &'static str> {
        let mut hosts = req.headers().get_all(header::HOST).iter();
        let host_header = hosts.next();
        if hosts.next().is_some() {
            return Err("the request has more than one Host header");
        }
        if host_header.is_none() && req.version() >= Version::HTTP_11 {
            return Err("the request has no Host header");
        }
        let authority = match (req.uri().scheme_str(), req.uri().authority()) {
            (Some(scheme), Some(a)) => {
                if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
                    return Err("only http and https targets are served");
                }
                a.clone()
            }
            (None, None) => match host_header {
                Some(h) => Authority::try_from(h.as_bytes())
                    .map_err(|_| "the Host header is not a host name")?,
                None => return Err("the request has no Host header"),
            },
            _ => return Err("the request target is not a valid URI"),
        };
        if authority.as_str().contains('@') {
            return Err("the host carries user information");
        }
        let host = authority.host().trim_end_matches('.').to_ascii_lowercase();
        if host.is_empty() {
            return Err("the Host header is empty");
        }
        let authority = HeaderValue::from_str(authority.as_str())
            .map_err(|_| "the Host header is not a host name")?;
        Ok(Target { host, authority })
    }
}

/// A WebSocket handshake (RFC 6455 4.1): an HTTP/1.1 GET with `Connection: upgrade` and
/// `Upgrade: websocket`. Nothing else is tunnelled.
fn is_websocket_upgrade<B>(req: &Request<B>) -> bool {
    let h = req.headers();
    let mut upgrade = h.get_all(header::UPGRADE).iter();
    let websocket = upgrade.next().is_some_and(|v| {
        v.to_str()
            .is_ok_and(|v| v.trim().eq_ignore_ascii_case("websocket"))
    }) && upgrade.next().is_none();
    req.method() == Method::GET
        && req.version() == Version::HTTP_11
        && websocket
        && connection_tokens(h).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

/// The tokens of every `Connection` header.
fn connection_tokens(h: &HeaderMap) -> impl Iterator<Item = &str> {
    h.get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Headers a `Connection` header may not remove: what routing and framing rest on.
const END_TO_END: [HeaderName; 2] = [header::HOST, header::CONTENT_LENGTH];

/// Remove hop-by-hop headers (RFC 9110 7.6.1), keeping `Connection: upgrade` and `Upgrade`
/// for an upgrade.
fn strip_hop_by_hop(h: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = connection_tokens(h)
        .filter(|t| !(upgrade && t.eq_ignore_ascii_case("upgrade")))
        .filter_map(|t| HeaderName::try_from(t.to_ascii_lowercase()).ok())
        .filter(|n| !END_TO_END.contains(n))
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

/// A request body on its way upstream that remembers whether it failed: a body that breaks its
/// own framing (bad chunks, cut short) is the client's error, not the session's.
pub struct RequestBody {
    /// `None`: no body (a request sent again, which had none).
    inner: Option<Incoming>,
    failed: Arc<std::sync::atomic::AtomicBool>,
}

impl RequestBody {
    fn new(inner: Incoming) -> (RequestBody, Arc<std::sync::atomic::AtomicBool>) {
        let failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        (
            RequestBody {
                inner: Some(inner),
                failed: failed.clone(),
            },
            failed,
        )
    }

    /// No body at all.
    pub(crate) fn empty() -> RequestBody {
        RequestBody {
            inner: None,
            failed: Arc::default(),
        }
    }
}

impl hyper::body::Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let Some(inner) = &mut self.inner else {
            return Poll::Ready(None);
        };
        let r = Pin::new(inner).poll_frame(cx);
        if let Poll::Ready(Some(Err(_))) = &r {
            self.failed.store(true, Ordering::Relaxed);
        }
        r
    }
    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }
    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(
        uri: &str,
        version: Version,
        hosts: &[&str],
    ) -> Result<(String, String), &'static str> {
        let mut b = Request::builder().uri(uri).version(version);
        for h in hosts {
            b = b.header("host", *h);
        }
        let req = b.body(()).expect("the test's request is well formed");
        Target::of(&req).map(|t| {
            let a = t.authority.to_str().unwrap_or("?").to_string();
            (t.host, a)
        })
    }

    #[test]
    fn hosts_are_normalised() {
        let r = |h: &str| target("/", Version::HTTP_11, &[h]).map(|(host, _)| host);
        assert_eq!(r("Alice.LocalHost:8080"), Ok("alice.localhost".into()));
        assert_eq!(r("alice.localhost."), Ok("alice.localhost".into()));
        assert_eq!(r("[::1]:8080"), Ok("[::1]".into()));
        assert_eq!(r("5173-bob.localhost"), Ok("5173-bob.localhost".into()));
    }

    #[test]
    fn one_host_is_required_and_an_absolute_target_wins() {
        let v11 = Version::HTTP_11;
        assert!(target("/", v11, &["a.localhost", "b.localhost"]).is_err());
        assert!(target("/", v11, &[]).is_err());
        assert!(target("/", v11, &[""]).is_err());
        assert!(target("/", v11, &["a b"]).is_err());
        assert!(target("/", v11, &["user@a.localhost"]).is_err());
        // HTTP/1.0 may leave Host out when the target says where it goes.
        assert!(target("/", Version::HTTP_10, &[]).is_err());
        assert_eq!(
            target("http://b.localhost:8080/x", Version::HTTP_10, &[]),
            Ok(("b.localhost".into(), "b.localhost:8080".into()))
        );
        assert_eq!(
            target("http://B.localhost/x?y", v11, &["a.localhost"]),
            Ok(("b.localhost".into(), "B.localhost".into()))
        );
        assert!(target("ftp://b.localhost/x", v11, &["a.localhost"]).is_err());
        assert!(target("http://u:p@b.localhost/x", v11, &["a.localhost"]).is_err());
    }

    fn route(upstream: &str) -> Route {
        Route {
            upstream: upstream.into(),
            session: "s".into(),
            route: None,
            ready: true,
            strip_prefix: false,
        }
    }

    #[test]
    fn table_swaps_keep_stats_and_wildcards_match() {
        let p = Proxy::default();
        p.apply(&[RouteChange::Upsert {
            host: "A.localhost".into(),
            route: route("127.0.0.1:1"),
        }]);
        p.lookup("a.localhost", "/")
            .map(|e| e.stats.requests.fetch_add(3, Ordering::Relaxed));
        p.apply(&[RouteChange::Upsert {
            host: "a.localhost".into(),
            route: route("127.0.0.1:2"),
        }]);
        assert_eq!(p.activity()["a.localhost"].requests, 3);
        assert_eq!(p.routes()["a.localhost"].upstream, "127.0.0.1:2");
        p.apply(&[RouteChange::Upsert {
            host: "*.preview.localhost".into(),
            route: route("127.0.0.1:3"),
        }]);
        assert_eq!(
            p.lookup("x.preview.localhost", "/")
                .map(|e| e.route.upstream.clone()),
            Some("127.0.0.1:3".into())
        );
        assert!(p.lookup("preview.localhost", "/").is_none());
        p.apply(&[RouteChange::Remove {
            host: "a.localhost".into(),
        }]);
        assert!(p.lookup("a.localhost", "/").is_none());
    }

    #[test]
    fn the_longest_prefix_on_whole_segments_wins() {
        let p = Proxy::default();
        let up = |path: &str| {
            p.lookup("p.localhost", path)
                .map(|e| e.route.upstream.clone())
        };
        p.apply(&[
            RouteChange::Upsert {
                host: "P.localhost/a".into(),
                route: route("127.0.0.1:1"),
            },
            RouteChange::Upsert {
                host: "p.localhost/a/b".into(),
                route: route("127.0.0.1:2"),
            },
        ]);
        assert_eq!(up("/a"), Some("127.0.0.1:1".into()));
        assert_eq!(up("/a/bc"), Some("127.0.0.1:1".into()));
        assert_eq!(up("/a/b"), Some("127.0.0.1:2".into()));
        assert_eq!(up("/a/b/c"), Some("127.0.0.1:2".into()));
        assert_eq!(up("/ab"), None, "no route for the host's `/`");
        p.apply(&[RouteChange::Upsert {
            host: "p.localhost".into(),
            route: route("127.0.0.1:3"),
        }]);
        assert_eq!(up("/ab"), Some("127.0.0.1:3".into()));
        assert_eq!(up("/a/b/c"), Some("127.0.0.1:2".into()));
        assert_eq!(
            p.routes().keys().collect::<Vec<_>>(),
            ["p.localhost", "p.localhost/a", "p.localhost/a/b"]
        );
        p.apply(&[RouteChange::Remove {
            host: "p.localhost/a/b".into(),
        }]);
        assert_eq!(up("/a/b/c"), Some("127.0.0.1:1".into()));
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
        // Connection cannot take away what routing and framing need.
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("Host, content-length, x-a"),
        );
        h.insert("host", HeaderValue::from_static("a.localhost"));
        h.insert("content-length", HeaderValue::from_static("3"));
        h.insert("x-a", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert!(h.get("host").is_some() && h.get("content-length").is_some());
        assert!(h.get("x-a").is_none());

        let ws = |method: &str, upgrade: &str| {
            Request::builder()
                .method(method)
                .header("connection", "keep-alive, Upgrade")
                .header("upgrade", upgrade)
                .body(())
                .map(|r| is_websocket_upgrade(&r))
                .unwrap_or(false)
        };
        assert!(ws("GET", "WebSocket"));
        assert!(!ws("GET", "h2c"));
        assert!(!ws("GET", "websocket, h2c"));
        assert!(!ws("POST", "websocket"));
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("Upgrade"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
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
