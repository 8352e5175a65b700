//! The read-only status endpoint: health, readiness, status, sessions, routes, DNS, the pending
//! plan, recent events, Prometheus metrics and a status page.
//!
//! Read-only by construction: it holds only the reconciler's shared view (behind a mutex it
//! reads) and the metrics; nothing it can reach changes state. Every method but GET and HEAD
//! answers 405. An optional token guards everything but `/healthz`, given as a bearer token or
//! as the password of HTTP Basic authentication (any user name), so a browser can open the
//! page. Known secret values are redacted from every body. It runs on a thread of its own, so a busy reconcile pass does
//! not slow it down, with bounded connections and timeouts (`listeners`).

mod page;
pub mod view;

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::config::Secret;
use crate::metrics::Metrics;
use crate::planner::render;
use crate::reconcile::{Published, Snapshot};

pub use view::Context;

pub struct AppState {
    /// The reconciler's latest snapshot.
    pub published: Published,
    pub metrics: Arc<Metrics>,
    pub ctx: Context,
    pub token: Option<Secret>,
    /// Values never to be served: resolved secrets.
    pub secrets: Vec<String>,
    /// `/status` rendered once per published version.
    cache: Mutex<Option<((u64, u64), Bytes)>>,
    /// Sleep and wake, for each session's lifecycle.
    lifecycle: Option<crate::lifecycle::Lifecycle>,
    /// The embedded proxy, for the requests it holds.
    proxy: Option<crate::proxy::Proxy>,
    /// Each notification target's deliveries.
    notifications: Option<crate::notify::outbox::Stats>,
}

impl AppState {
    pub fn new(
        published: Published,
        metrics: Arc<Metrics>,
        ctx: Context,
        token: Option<Secret>,
        mut secrets: Vec<String>,
    ) -> AppState {
        if let Some(t) = &token {
            secrets.push(t.expose().to_string());
        }
        secrets.retain(|s| s.len() >= 4);
        AppState {
            published,
            metrics,
            ctx,
            token,
            secrets,
            cache: Mutex::new(None),
            lifecycle: None,
            proxy: None,
            notifications: None,
        }
    }

    /// Show each session's lifecycle from `lc`, and the requests `proxy` holds.
    pub fn with_lifecycle(
        mut self,
        lc: crate::lifecycle::Lifecycle,
        proxy: Option<crate::proxy::Proxy>,
    ) -> AppState {
        self.lifecycle = Some(lc);
        self.proxy = proxy;
        self
    }

    /// Show each notification target's deliveries (`/notifications`, and on the page).
    pub fn with_notifications(mut self, stats: crate::notify::outbox::Stats) -> AppState {
        self.notifications = Some(stats);
        self
    }

    fn notification_views(
        &self,
    ) -> std::collections::BTreeMap<String, crate::notify::outbox::TargetView> {
        self.notifications
            .iter()
            .flat_map(|s| s.iter())
            .map(|(k, v)| (k.clone(), v.view()))
            .collect()
    }

    fn add_lifecycle(&self, views: &mut [view::SessionView]) {
        if let Some(lc) = &self.lifecycle {
            let mut life = lc.view();
            for v in views {
                v.lifecycle = life.remove(&v.name);
            }
        }
    }

    fn redact(&self, mut body: String) -> String {
        for s in &self.secrets {
            if body.contains(s.as_str()) {
                body = body.replace(s.as_str(), view::REDACTED);
            }
        }
        body
    }

    fn with<T>(&self, f: impl FnOnce(&Snapshot) -> T) -> Option<T> {
        let (snap, _) = self.published.latest();
        Some(f(&snap))
    }

    /// The status view of the latest snapshot.
    fn status_view(&self) -> view::StatusView {
        let (snap, waiting) = self.published.latest();
        let mut v = view::status(&snap, waiting);
        if let Some(lc) = &self.lifecycle {
            let mut c = view::LifecycleCounts::default();
            for l in lc.view().values() {
                match l.state.as_str() {
                    "asleep" | "falling-asleep" => c.asleep += 1,
                    "waking" => c.waking += 1,
                    _ => c.awake += 1,
                }
            }
            c.held_requests = self.proxy.as_ref().map_or(0, |p| p.hold_counters().held);
            v.lifecycle = Some(c);
        }
        v
    }
}

fn respond(status: StatusCode, ctype: &'static str, body: impl Into<Bytes>) -> Response {
    let mut r = (status, body.into()).into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn json<T: serde::Serialize>(st: &AppState, v: &T) -> Response {
    match serde_json::to_string_pretty(v) {
        Ok(s) => respond(StatusCode::OK, "application/json", st.redact(s) + "\n"),
        Err(e) => respond(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("cannot render: {e}\n"),
        ),
    }
}

fn unavailable() -> Response {
    respond(
        StatusCode::SERVICE_UNAVAILABLE,
        "text/plain",
        "the status is not available\n",
    )
}

/// The router, for `serve` and for tests.
pub fn router(st: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/sessions", get(sessions))
        .route("/sessions/{name}", get(session))
        .route("/routes", get(routes))
        .route("/dns", get(dns))
        .route("/plan", get(plan))
        .route("/revision", get(revision))
        .route("/events", get(events))
        .route("/metrics", get(metrics))
        .route("/notifications", get(notifications))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(st.clone(), guard))
        .with_state(st)
}

/// The token of an `Authorization: Bearer <token>` value. The scheme is case-insensitive
/// (RFC 9110 11.1): `bearer x` and `BEARER x` are the same.
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_start())
}

/// The token an `Authorization` value carries: a bearer token, or the password of HTTP Basic
/// authentication (RFC 7617; any user name), so that a browser can open the page.
fn credential(value: &str) -> Option<String> {
    if let Some(t) = bearer(value) {
        return Some(t.to_string());
    }
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64_decode(encoded.trim())?;
    let text = String::from_utf8(decoded).ok()?;
    let (_user, password) = text.split_once(':')?;
    Some(password.to_string())
}

/// Standard base64 (padding optional); None for anything else.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(u32::from(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        }))
    };
    let s = s
        .strip_suffix("==")
        .or_else(|| s.strip_suffix('='))
        .unwrap_or(s);
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for chunk in s.as_bytes().chunks(4) {
        if chunk.len() == 1 {
            return None;
        }
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= value(*c)? << (18 - 6 * i);
        }
        out.push((n >> 16) as u8);
        if chunk.len() > 2 {
            out.push((n >> 8) as u8);
        }
        if chunk.len() > 3 {
            out.push(n as u8);
        }
    }
    Some(out)
}

fn eq_constant_time(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Read-only and authenticated: 405 for every method but GET and HEAD; 401 without the token.
async fn guard(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "the status endpoint is read-only\n",
        );
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    if let Some(token) = &st.token
        && req.uri().path() != "/healthz"
    {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(credential)
            .unwrap_or_default();
        if !eq_constant_time(given.as_bytes(), token.expose().as_bytes()) {
            let mut r = respond(
                StatusCode::UNAUTHORIZED,
                "text/plain",
                "the status token is required: `Authorization: Bearer <token>`, or in a browser any user name and the token as the password\n",
            );
            // Both schemes: a browser asks for a user name and a password (Basic).
            r.headers_mut().append(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"vessel\""),
            );
            r.headers_mut().append(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"vessel\", charset=\"UTF-8\""),
            );
            return r;
        }
    }
    next.run(req).await
}

async fn healthz() -> Response {
    respond(StatusCode::OK, "text/plain", "ok\n")
}

async fn readyz(State(st): State<Arc<AppState>>) -> Response {
    match st.status_view().ready {
        true => respond(StatusCode::OK, "text/plain", "ready\n"),
        false => respond(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready: the first full pass has not completed\n",
        ),
    }
}

#[derive(Deserialize)]
struct RevisionQuery {
    contains: Option<String>,
}

/// `GET /revision?contains=REV`: the revision the last pass applied, and whether it is REV or
/// a later one (for git: REV is the applied commit or one of its ancestors; for a directory:
/// the same content revision).
async fn revision(State(st): State<Arc<AppState>>, Query(q): Query<RevisionQuery>) -> Response {
    let Some((revision, commit)) = st.with(|s| {
        let last = s.last.as_ref();
        (
            last.and_then(|l| l.revision.clone()),
            last.and_then(|l| l.commit.clone()),
        )
    }) else {
        return unavailable();
    };
    let contains = match (q.contains, &commit, &st.ctx.git_mirror) {
        (None, _, _) => None,
        (Some(rev), _, _) if rev.is_empty() || rev.len() > 256 => Some(false),
        (Some(rev), Some(applied), Some(mirror)) => {
            let (mirror, applied) = (mirror.clone(), applied.clone());
            tokio::task::spawn_blocking(move || {
                crate::source::git::contains(&mirror, &applied, &rev)
            })
            .await
            .ok()
        }
        (Some(rev), _, _) => Some(
            revision
                .as_deref()
                .is_some_and(|r| r == rev || r.split_whitespace().next() == Some(rev.as_str())),
        ),
    };
    json(
        &st,
        &serde_json::json!({"revision": revision, "commit": commit, "contains": contains}),
    )
}

async fn status(State(st): State<Arc<AppState>>) -> Response {
    let version = st.published.version();
    if let Some((v, body)) = crate::lock_or_reset(&st.cache).as_ref()
        && *v == version
    {
        return respond(StatusCode::OK, "application/json", body.clone());
    }
    let v = st.status_view();
    let body: Bytes = match serde_json::to_string_pretty(&v) {
        Ok(s) => Bytes::from(st.redact(s) + "\n"),
        Err(e) => {
            return respond(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("cannot render: {e}\n"),
            );
        }
    };
    *crate::lock_or_reset(&st.cache) = Some((version, body.clone()));
    respond(StatusCode::OK, "application/json", body)
}

async fn sessions(State(st): State<Arc<AppState>>) -> Response {
    let now = st.published.activity();
    match st.with(|s| view::sessions(s, &st.ctx, &now)) {
        Some(mut v) => {
            st.add_lifecycle(&mut v);
            json(&st, &v)
        }
        None => unavailable(),
    }
}

async fn session(State(st): State<Arc<AppState>>, Path(name): Path<String>) -> Response {
    let now = st.published.activity();
    match st.with(|s| view::session(s, &st.ctx, &now, &name)) {
        Some(Some(mut v)) => {
            st.add_lifecycle(std::slice::from_mut(&mut v.summary));
            json(&st, &v)
        }
        Some(None) => respond(
            StatusCode::NOT_FOUND,
            "application/json",
            format!(
                "{{\"error\": \"no session named {}\"}}\n",
                name.replace(['"', '\\'], "")
            ),
        ),
        None => unavailable(),
    }
}

async fn routes(State(st): State<Arc<AppState>>) -> Response {
    match st.with(|s| view::routes(s, &st.ctx)) {
        Some(v) => json(&st, &v),
        None => unavailable(),
    }
}

async fn dns(State(st): State<Arc<AppState>>) -> Response {
    match st.with(view::records) {
        Some(v) => json(&st, &v),
        None => unavailable(),
    }
}

#[derive(Deserialize)]
struct PlanQuery {
    format: Option<String>,
}

async fn plan(
    State(st): State<Arc<AppState>>,
    Query(q): Query<PlanQuery>,
    headers: HeaderMap,
) -> Response {
    let wants_json = q.format.as_deref() == Some("json")
        || headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("application/json"));
    let Some(out) = st.with(|s| match (&s.plan, &s.observed) {
        (Some(p), Some(o)) => Some(if wants_json {
            render::json(&view::redact_plan(p))
        } else {
            render::text(&view::redact_plan(p), &view::redact_observed(o), false)
        }),
        _ => None,
    }) else {
        return unavailable();
    };
    match out {
        None => respond(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "no pass has run yet\n",
        ),
        Some(body) if wants_json => respond(StatusCode::OK, "application/json", st.redact(body)),
        Some(body) => respond(StatusCode::OK, "text/plain; charset=utf-8", st.redact(body)),
    }
}

#[derive(Deserialize)]
struct EventsQuery {
    limit: Option<usize>,
}

async fn events(State(st): State<Arc<AppState>>, Query(q): Query<EventsQuery>) -> Response {
    let limit = q.limit.unwrap_or(100).min(1_000);
    match st.with(|s| {
        s.events
            .iter()
            .rev()
            .take(limit)
            .rev()
            .cloned()
            .collect::<Vec<_>>()
    }) {
        Some(v) => json(&st, &v),
        None => unavailable(),
    }
}

/// `GET /notifications`: each target's queued, delivered and failed deliveries, now.
async fn notifications(State(st): State<Arc<AppState>>) -> Response {
    json(&st, &st.notification_views())
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    // The body is the OpenMetrics text format (`# EOF` at the end), and says so.
    respond(
        StatusCode::OK,
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
        st.redact(st.metrics.encode()),
    )
}

/// The page; with `If-None-Match` naming the version the reader has, 304 while nothing changed
/// (the page's script asks every few seconds, and swaps in what changed without a reload).
async fn index(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let now = st.published.activity();
    let ((passes, changes), seq) = (st.published.version(), now.seq);
    let told = st.notification_views();
    let deliveries: u64 = told
        .values()
        .map(|t| t.queued + t.delivered + t.failed + t.attempts)
        .sum();
    let tag = format!("\"{passes}-{changes}-{seq}-{deliveries}\"");
    let etag = HeaderValue::from_str(&tag).unwrap_or(HeaderValue::from_static("\"0\""));
    if headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == tag.as_bytes())
    {
        let mut r = respond(StatusCode::NOT_MODIFIED, "text/html; charset=utf-8", "");
        r.headers_mut().insert(header::ETAG, etag);
        return r;
    }
    let (snap, waiting) = st.published.latest();
    let life = st
        .lifecycle
        .as_ref()
        .map(crate::lifecycle::Lifecycle::view)
        .unwrap_or_default();
    let html = page::render(&snap, waiting, &st.ctx, &now, &tag, &life, &told);
    let mut r = respond(StatusCode::OK, "text/html; charset=utf-8", st.redact(html));
    r.headers_mut().insert(header::ETAG, etag);
    r
}

async fn not_found() -> Response {
    respond(
        StatusCode::NOT_FOUND,
        "text/plain",
        "no such endpoint; see / for the list\n",
    )
}

/// Serve on a thread of its own, within `limits`, until `cancel`.
pub fn serve_thread(
    listener: std::net::TcpListener,
    st: Arc<AppState>,
    limits: crate::listeners::Limits,
    cancel: CancellationToken,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    crate::listeners::serve_router_thread("status", listener, router(st), limits, cancel)
}

#[cfg(test)]
mod tests {
    use super::{bearer, credential};

    #[test]
    fn basic_authentication_carries_the_token_as_its_password() {
        // "anyone:s3cret-token" and "vessel:pa:ss" (a colon in the password).
        assert_eq!(
            credential("Basic YW55b25lOnMzY3JldC10b2tlbg=="),
            Some("s3cret-token".into())
        );
        assert_eq!(credential("basic dmVzc2VsOnBhOnNz"), Some("pa:ss".into()));
        assert_eq!(credential("Bearer abc"), Some("abc".into()));
        assert_eq!(credential("Basic !!!"), None);
        assert_eq!(credential("Basic YW55b25l"), None, "no colon: no password");
        assert_eq!(credential("Digest abc"), None);
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer abc"), Some("abc"));
        assert_eq!(bearer("BEARER  abc"), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearerabc"), None);
        assert_eq!(bearer("Bearer"), None);
    }
}
