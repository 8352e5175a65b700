//! What every HTTP listener vessel has (the embedded proxy, the status endpoint, the webhook
//! receiver) shares: a bounded number of connections per listener and per client address, in
//! which a connection sitting idle makes way for a new one; a header-read timeout (slowloris)
//! and an idle keep-alive timeout; bounded request heads; an accept loop that backs off when
//! the process is out of file descriptors; and, in `fds`, the file-descriptor budget the
//! bounds come from.
//!
//! A connection is *busy* from the moment its request head is read until its response has been
//! written (a WebSocket tunnel stays busy while it lasts), and *idle* otherwise: before its
//! first request, between keep-alive requests, and while a head trickles in. Only idle
//! connections are ever closed to make room, so a request in flight is never cut short by
//! someone else's flood.
//!
//! Must not: touch anything of the reconciler's. A full listener refuses connections; it never
//! blocks the loop or another listener.

pub mod fds;

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::ListenersConfig;

/// The largest request head (request line and headers) any listener reads; a larger one gets
/// 431. Browsers' heads, cookies included, stay well below.
pub const MAX_HEAD: usize = 64 * 1024;

/// Timeouts are kept within these: a zero timeout would close every connection, and one of
/// years would mean none.
const MIN_TIMEOUT: Duration = Duration::from_millis(100);
const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// A configured timeout, within `MIN_TIMEOUT..=MAX_TIMEOUT`.
pub fn timeout(configured: crate::model::Duration) -> Duration {
    configured.std().clamp(MIN_TIMEOUT, MAX_TIMEOUT)
}

/// One listener's bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Open connections at most.
    pub max_connections: usize,
    /// Open connections from one client address (an IPv6 /64) at most.
    pub per_client: usize,
    /// A request head must arrive whole within this, from the connection's start or from the
    /// first byte of a later request.
    pub header_timeout: Duration,
    /// A connection idle this long after a response is closed.
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits::new(&ListenersConfig::default(), 1024)
    }
}

impl Limits {
    /// The configured limits for a listener allowed `max_connections`.
    pub fn new(c: &ListenersConfig, max_connections: usize) -> Limits {
        let max_connections = max_connections.max(1);
        Limits {
            max_connections,
            per_client: (c.max_connections_per_client as usize).clamp(1, max_connections),
            header_timeout: timeout(c.header_timeout),
            idle_timeout: timeout(c.idle_timeout),
        }
    }
}

/// One listener's open connections, shared by every thread that accepts on it.
#[derive(Clone)]
pub struct Gate {
    inner: Arc<GateInner>,
}

struct GateInner {
    name: &'static str,
    limits: Limits,
    epoch: Instant,
    table: Mutex<Table>,
    /// Connections closed at once at a bound, and idle ones closed to make room, since the
    /// last report; reported at most every `REPORT_EVERY`.
    refused: AtomicU64,
    evicted: AtomicU64,
    last_report_ms: AtomicU64,
}

const REPORT_EVERY: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Table {
    next_id: u64,
    conns: HashMap<u64, Arc<State>>,
    /// Open connections per client that are not being closed.
    per_client: HashMap<IpAddr, usize>,
    /// Connections told to close that have not closed yet.
    closing: usize,
}

const NONE: u64 = u64::MAX;

/// What the gate and the connection's own task know about one connection.
struct State {
    client: IpAddr,
    accepted_ms: u64,
    busy: AtomicU32,
    /// A request has been answered: later waits are keep-alive waits.
    served: AtomicBool,
    idle_since_ms: AtomicU64,
    /// When the first byte of the next request arrived (`NONE`: not yet).
    first_byte_ms: AtomicU64,
    evicted: AtomicBool,
    wake: Notify,
}

impl State {
    fn idle_since(&self) -> Option<u64> {
        (self.busy.load(Ordering::Acquire) == 0 && !self.evicted.load(Ordering::Relaxed))
            .then(|| self.idle_since_ms.load(Ordering::Relaxed))
    }
}

/// Why a connection was closed by its listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// Idle while the listener (or its client) was at its bound and a new connection came.
    MadeRoom,
    HeaderTimeout,
    IdleTimeout,
}

impl std::fmt::Display for Closed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Closed::MadeRoom => "idle, closed to make room",
            Closed::HeaderTimeout => "no whole request head within the header timeout",
            Closed::IdleTimeout => "idle past the idle timeout",
        })
    }
}

/// The key a client's connections are counted under: its address, an IPv6 address's /64.
fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

impl Gate {
    pub fn new(name: &'static str, limits: Limits) -> Gate {
        Gate {
            inner: Arc::new(GateInner {
                name,
                limits,
                epoch: Instant::now(),
                table: Mutex::new(Table::default()),
                refused: AtomicU64::new(0),
                evicted: AtomicU64::new(0),
                last_report_ms: AtomicU64::new(0),
            }),
        }
    }

    pub fn limits(&self) -> Limits {
        self.inner.limits
    }

    /// Open connections now (those being closed included).
    pub fn open(&self) -> usize {
        self.table().conns.len()
    }

    fn now_ms(&self) -> u64 {
        self.inner.epoch.elapsed().as_millis() as u64
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.inner
            .table
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Let a new connection from `peer` in, closing the connection idle the longest (of the
    /// client's, at its bound; of anyone's, at the listener's) to make room. `None`: every
    /// connection under the bound is busy, and this one is to be closed at once.
    pub fn admit(&self, peer: SocketAddr) -> Option<Conn> {
        let client = client_key(peer.ip());
        let limits = self.inner.limits;
        let now = self.now_ms();
        let mut t = self.table();
        if t.per_client.get(&client).copied().unwrap_or(0) >= limits.per_client {
            let victim = oldest_idle(t.conns.values().filter(|s| s.client == client));
            if !self.evict(&mut t, victim) {
                drop(t);
                return self.refuse();
            }
        }
        if t.conns.len() - t.closing >= limits.max_connections {
            let victim = oldest_idle(t.conns.values());
            if !self.evict(&mut t, victim) {
                drop(t);
                return self.refuse();
            }
        }
        let id = t.next_id;
        t.next_id += 1;
        let state = Arc::new(State {
            client,
            accepted_ms: now,
            busy: AtomicU32::new(0),
            served: AtomicBool::new(false),
            idle_since_ms: AtomicU64::new(now),
            first_byte_ms: AtomicU64::new(NONE),
            evicted: AtomicBool::new(false),
            wake: Notify::new(),
        });
        t.conns.insert(id, state.clone());
        *t.per_client.entry(client).or_default() += 1;
        drop(t);
        self.report();
        Some(Conn {
            inner: Arc::new(ConnInner {
                gate: self.clone(),
                id,
                state,
            }),
        })
    }

    fn evict(&self, t: &mut Table, victim: Option<Arc<State>>) -> bool {
        let Some(v) = victim else { return false };
        v.evicted.store(true, Ordering::Relaxed);
        v.wake.notify_one();
        t.closing += 1;
        if let Some(n) = t.per_client.get_mut(&v.client) {
            *n = n.saturating_sub(1);
        }
        self.inner.evicted.fetch_add(1, Ordering::Relaxed);
        true
    }

    fn refuse(&self) -> Option<Conn> {
        self.inner.refused.fetch_add(1, Ordering::Relaxed);
        self.report();
        None
    }

    /// Say what the bounds did, at most once every `REPORT_EVERY`.
    fn report(&self) {
        let now = self.now_ms();
        let last = self.inner.last_report_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) < REPORT_EVERY.as_millis() as u64
            || self
                .inner
                .last_report_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let refused = self.inner.refused.swap(0, Ordering::Relaxed);
        let evicted = self.inner.evicted.swap(0, Ordering::Relaxed);
        if refused + evicted > 0 {
            tracing::warn!(
                listener = self.inner.name,
                refused,
                made_room = evicted,
                max_connections = self.inner.limits.max_connections,
                per_client = self.inner.limits.per_client,
                "{}: at its connection bounds: {refused} new connections closed at once (every other one busy), {evicted} idle ones closed to make room",
                self.inner.name
            );
        }
    }

    fn remove(&self, id: u64) {
        let mut t = self.table();
        if let Some(s) = t.conns.remove(&id) {
            if s.evicted.load(Ordering::Relaxed) {
                t.closing = t.closing.saturating_sub(1);
            } else if let Some(n) = t.per_client.get_mut(&s.client) {
                *n = n.saturating_sub(1);
            }
            if t.per_client.get(&s.client) == Some(&0) {
                t.per_client.remove(&s.client);
            }
        }
    }
}

/// The connection idle the longest among `conns`.
fn oldest_idle<'a>(conns: impl Iterator<Item = &'a Arc<State>>) -> Option<Arc<State>> {
    conns
        .filter_map(|s| s.idle_since().map(|t| (t, s)))
        .min_by_key(|(t, _)| *t)
        .map(|(_, s)| s.clone())
}

/// One admitted connection. It holds its place in the gate until the last clone is dropped
/// (a WebSocket tunnel keeps a clone).
#[derive(Clone)]
pub struct Conn {
    inner: Arc<ConnInner>,
}

struct ConnInner {
    gate: Gate,
    id: u64,
    state: Arc<State>,
}

impl Drop for ConnInner {
    fn drop(&mut self) {
        self.gate.remove(self.id);
    }
}

impl Conn {
    fn now_ms(&self) -> u64 {
        self.inner.gate.now_ms()
    }

    /// Mark the connection busy until the guard is dropped.
    pub fn busy(&self) -> Busy {
        let s = &self.inner.state;
        s.busy.fetch_add(1, Ordering::AcqRel);
        s.first_byte_ms.store(NONE, Ordering::Relaxed);
        Busy { conn: self.clone() }
    }

    /// The earliest moment the connection is to be closed, as it stands (`None`: busy).
    fn deadline_ms(&self) -> Option<u64> {
        let s = &self.inner.state;
        if s.busy.load(Ordering::Acquire) > 0 {
            return None;
        }
        let limits = self.inner.gate.inner.limits;
        let header = limits.header_timeout.as_millis() as u64;
        if !s.served.load(Ordering::Relaxed) {
            return Some(s.accepted_ms.saturating_add(header));
        }
        match s.first_byte_ms.load(Ordering::Relaxed) {
            NONE => Some(
                s.idle_since_ms
                    .load(Ordering::Relaxed)
                    .saturating_add(limits.idle_timeout.as_millis() as u64),
            ),
            first => Some(first.saturating_add(header)),
        }
    }

    /// Resolves when the listener wants this connection closed: made room for a new one, or a
    /// header or idle timeout passed.
    pub async fn closing(&self) -> Closed {
        let s = &self.inner.state;
        loop {
            let woken = s.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if s.evicted.load(Ordering::Relaxed) {
                return Closed::MadeRoom;
            }
            match self.deadline_ms() {
                None => woken.await,
                Some(at) => {
                    let now = self.now_ms();
                    if at <= now {
                        return if s.served.load(Ordering::Relaxed)
                            && s.first_byte_ms.load(Ordering::Relaxed) == NONE
                        {
                            Closed::IdleTimeout
                        } else {
                            Closed::HeaderTimeout
                        };
                    }
                    let sleep = tokio::time::sleep(Duration::from_millis(at - now));
                    tokio::select! {
                        _ = sleep => {}
                        _ = woken => {}
                    }
                }
            }
        }
    }

    /// Note that bytes arrived: the first of a request on an idle connection starts its header
    /// timeout.
    fn saw_bytes(&self) {
        let s = &self.inner.state;
        if s.busy.load(Ordering::Acquire) == 0
            && s.served.load(Ordering::Relaxed)
            && s.first_byte_ms.load(Ordering::Relaxed) == NONE
        {
            s.first_byte_ms.store(self.now_ms(), Ordering::Relaxed);
            s.wake.notify_one();
        }
    }
}

/// A connection is busy while one of these lives.
pub struct Busy {
    conn: Conn,
}

impl Drop for Busy {
    fn drop(&mut self) {
        let s = &self.conn.inner.state;
        s.idle_since_ms.store(self.conn.now_ms(), Ordering::Relaxed);
        s.first_byte_ms.store(NONE, Ordering::Relaxed);
        s.served.store(true, Ordering::Relaxed);
        if s.busy.fetch_sub(1, Ordering::AcqRel) == 1 {
            s.wake.notify_one();
        }
    }
}

/// A stream that reports how many bytes each read brought (the listener's "a request is
/// arriving", the proxy's WebSocket metering).
pub struct OnRead<T, F> {
    io: T,
    on_read: F,
}

impl<T, F: FnMut(usize)> OnRead<T, F> {
    pub fn new(io: T, on_read: F) -> OnRead<T, F> {
        OnRead { io, on_read }
    }
}

impl<T: AsyncRead + Unpin, F: FnMut(usize) + Unpin> AsyncRead for OnRead<T, F> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            (self.on_read)(n);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin, F: Unpin> AsyncWrite for OnRead<T, F> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// A response body that keeps its connection busy until it has been written (or dropped).
pub struct BusyBody<B> {
    inner: B,
    _busy: Busy,
}

impl<B: Body + Unpin> Body for BusyBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A service whose requests mark their connection busy while they are served.
struct Tracked<S> {
    inner: S,
    conn: Conn,
}

type BoxedResponse<B, E> = Pin<Box<dyn Future<Output = Result<Response<BusyBody<B>>, E>> + Send>>;

impl<S, B> hyper::service::Service<Request<Incoming>> for Tracked<S>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>>,
    S::Future: Send + 'static,
    B: Body + Unpin,
{
    type Response = Response<BusyBody<B>>;
    type Error = S::Error;
    type Future = BoxedResponse<B, S::Error>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let busy = self.conn.busy();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            Ok(resp.map(|inner| BusyBody { inner, _busy: busy }))
        })
    }
}

/// Serve HTTP/1.1 on one admitted connection until it ends, the listener closes it (timeouts,
/// making room), or `shutdown` (then the request in flight may finish, for 5 s at most).
pub async fn serve_http<S, B>(stream: TcpStream, conn: Conn, svc: S, shutdown: CancellationToken)
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let limits = conn.inner.gate.limits();
    let watched = conn.clone();
    let io = TokioIo::new(OnRead::new(stream, move |_| watched.saw_bytes()));
    let http = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        // The gate's own timeouts are the ones that apply; hyper's is only a backstop.
        .header_read_timeout(limits.header_timeout + limits.idle_timeout)
        .max_buf_size(MAX_HEAD)
        .keep_alive(true)
        .serve_connection(
            io,
            Tracked {
                inner: svc,
                conn: conn.clone(),
            },
        )
        .with_upgrades();
    tokio::pin!(http);
    tokio::select! {
        _ = http.as_mut() => {}
        why = conn.closing() => {
            tracing::trace!(listener = conn.inner.gate.inner.name, reason = %why, "connection closed by its listener");
        }
        _ = shutdown.cancelled() => {
            http.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), http).await;
        }
    }
}

/// Retrying `accept` after an error: at once for what concerns one connection only, after a
/// growing pause for what concerns the process (out of file descriptors or memory), so a
/// listener whose backlog cannot be taken never spins.
#[derive(Debug, Default)]
struct Backoff {
    delay: Duration,
    last_warn: Option<Instant>,
    suppressed: u64,
}

const BACKOFF_FIRST: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

impl Backoff {
    /// The pause before the next `accept` after `e` (zero: at once).
    fn after(&mut self, e: &std::io::Error) -> Duration {
        use nix::errno::Errno;
        let per_connection = matches!(
            e.raw_os_error().map(Errno::from_raw),
            Some(Errno::ECONNABORTED | Errno::EINTR | Errno::EAGAIN | Errno::EPROTO | Errno::EPERM)
        );
        if per_connection {
            return Duration::ZERO;
        }
        self.delay = (self.delay * 2).clamp(BACKOFF_FIRST, BACKOFF_MAX);
        self.delay
    }

    fn reset(&mut self) {
        self.delay = Duration::ZERO;
    }

    /// Warn at most once every `REPORT_EVERY`, with how many were not said.
    fn warn(&mut self, name: &str, e: &std::io::Error, pause: Duration) {
        if self.last_warn.is_some_and(|t| t.elapsed() < REPORT_EVERY) {
            self.suppressed += 1;
            return;
        }
        tracing::warn!(
            listener = name,
            error = %e,
            pause_ms = pause.as_millis() as u64,
            repeated = self.suppressed,
            "{name}: accepting a connection failed; pausing before the next"
        );
        self.last_warn = Some(Instant::now());
        self.suppressed = 0;
    }
}

/// Accept connections on `listener` until `shutdown`, handing each one the gate admits to
/// `serve` (which spawns its task) and closing at once each one it does not.
pub async fn accept_loop(
    listener: TcpListener,
    gate: Gate,
    shutdown: CancellationToken,
    mut serve: impl FnMut(TcpStream, SocketAddr, Conn),
) {
    let mut backoff = Backoff::default();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff.reset();
                match gate.admit(peer) {
                    Some(conn) => serve(stream, peer, conn),
                    None => drop(stream),
                }
                // Let the connections just accepted read what they already sent before taking
                // more: in a burst, a request already on its way becomes busy (and safe from
                // making room) instead of waiting behind the burst as the longest idle.
                tokio::task::yield_now().await;
            }
            Err(e) => {
                let pause = backoff.after(&e);
                if pause.is_zero() {
                    continue;
                }
                backoff.warn(gate.inner.name, &e, pause);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
}

/// Serve `app` (an axum router) on a thread of its own, with its own single-threaded runtime,
/// within `limits`, until `cancel`: what vessel's side listeners (status, webhook) run on, so a
/// busy pass never slows them.
pub fn serve_router_thread(
    name: &'static str,
    listener: std::net::TcpListener,
    app: axum::Router,
    limits: Limits,
    cancel: CancellationToken,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name(format!("vessel-{name}"))
        .spawn(move || {
            rt.block_on(async move {
                let listener = match TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "{name} cannot listen");
                        return;
                    }
                };
                let gate = Gate::new(name, limits);
                accept_loop(listener, gate, cancel.clone(), |stream, _, conn| {
                    let svc = hyper_util::service::TowerToHyperService::new(app.clone());
                    tokio::spawn(serve_http(stream, conn, svc, cancel.clone()));
                })
                .await;
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: usize, per_client: usize) -> Limits {
        Limits {
            max_connections: max,
            per_client,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        }
    }

    fn peer(ip: &str) -> SocketAddr {
        SocketAddr::new(ip.parse().unwrap_or(IpAddr::from([127, 0, 0, 1])), 40000)
    }

    #[test]
    fn at_the_bound_the_longest_idle_makes_room_and_busy_ones_never_do() {
        let gate = Gate::new("test", limits(3, 3));
        let a = gate.admit(peer("10.0.0.1"));
        let b = gate.admit(peer("10.0.0.2"));
        let c = gate.admit(peer("10.0.0.3"));
        let (Some(a), Some(b), Some(c)) = (a, b, c) else {
            panic!("three fit")
        };
        let _busy_b = b.busy();
        let _busy_c = c.busy();
        // Full: the one idle connection (a) makes room.
        let d = gate.admit(peer("10.0.0.4"));
        assert!(d.is_some());
        assert!(a.inner.state.evicted.load(Ordering::Relaxed));
        assert!(!b.inner.state.evicted.load(Ordering::Relaxed));
        drop(a);
        assert_eq!(gate.open(), 3);
        // d is idle, so the next one takes its place; then every one is busy: refused.
        let _busy_d = d.as_ref().map(Conn::busy);
        assert!(gate.admit(peer("10.0.0.5")).is_none());
        assert_eq!(gate.open(), 3);
    }

    #[test]
    fn one_client_is_bounded_alone_and_an_ipv6_64_is_one_client() {
        let gate = Gate::new("test", limits(100, 2));
        let a = gate.admit(peer("2001:db8::1"));
        let b = gate.admit(peer("2001:db8::2"));
        let _busy: Vec<Busy> = a.iter().chain(b.iter()).map(Conn::busy).collect();
        assert!(gate.admit(peer("2001:db8::3")).is_none(), "same /64");
        assert!(gate.admit(peer("2001:db8:0:1::1")).is_some(), "another /64");
        assert!(gate.admit(peer("::ffff:10.0.0.1")).is_some());
        assert_eq!(
            client_key("::ffff:10.0.0.1".parse().unwrap_or(IpAddr::from([0u8; 4]))),
            IpAddr::from([10, 0, 0, 1])
        );
    }

    #[test]
    fn accept_errors_of_the_process_back_off_and_others_do_not() {
        let mut b = Backoff::default();
        let emfile = std::io::Error::from_raw_os_error(nix::libc::EMFILE);
        let pauses: Vec<u128> = (0..10).map(|_| b.after(&emfile).as_millis()).collect();
        assert_eq!(pauses, [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000]);
        let aborted = std::io::Error::from_raw_os_error(nix::libc::ECONNABORTED);
        assert_eq!(b.after(&aborted), Duration::ZERO);
        b.reset();
        assert_eq!(b.after(&emfile), BACKOFF_FIRST);
    }

    #[tokio::test]
    async fn an_idle_connection_closes_after_its_timeouts() {
        let gate = Gate::new(
            "test",
            Limits {
                header_timeout: Duration::from_millis(100),
                idle_timeout: Duration::from_millis(300),
                ..limits(10, 10)
            },
        );
        let Some(c) = gate.admit(peer("10.0.0.1")) else {
            panic!("admitted")
        };
        // No request at all: the header timeout, from the start.
        let start = Instant::now();
        assert_eq!(c.closing().await, Closed::HeaderTimeout);
        let t = start.elapsed();
        assert!(
            t >= Duration::from_millis(95) && t < Duration::from_millis(290),
            "{t:?}"
        );
        // After a response: the idle timeout.
        drop(c.busy());
        let start = Instant::now();
        assert_eq!(c.closing().await, Closed::IdleTimeout);
        assert!(start.elapsed() >= Duration::from_millis(295));
        // The first byte of a request starts the header timeout, shorter than the idle one.
        drop(c.busy());
        c.saw_bytes();
        let start = Instant::now();
        assert_eq!(c.closing().await, Closed::HeaderTimeout);
        let t = start.elapsed();
        assert!(
            t >= Duration::from_millis(95) && t < Duration::from_millis(290),
            "{t:?}"
        );
        // A busy connection never times out.
        let busy = c.busy();
        let r = tokio::time::timeout(Duration::from_millis(500), c.closing()).await;
        assert!(r.is_err());
        drop(busy);
    }
}
