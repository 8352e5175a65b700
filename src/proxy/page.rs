//! The proxy's own pages: what is wrong, said plainly, as HTML for people and a status code
//! for scripts.

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::{BodyExt, Full};

use super::{Body, Route};

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn page(status: StatusCode, title: &str, detail: &str) -> Response<Body> {
    let html = format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{t}</title>\
         <style>body{{font:16px system-ui,sans-serif;margin:4em auto;max-width:40em;color:#222}}\
         code{{background:#f3f3f3;padding:.1em .3em}}</style></head>\
         <body><h1>{t}</h1><p>{d}</p><p><small>vessel proxy &middot; {code}</small></p></body></html>\n",
        t = escape(title),
        d = detail,
        code = status.as_u16(),
    );
    let mut r = Response::new(
        Full::new(Bytes::from(html))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    r
}

/// A 503 page with `Retry-After` (seconds).
fn unavailable(title: &str, detail: &str, retry_after: &'static str) -> Response<Body> {
    let mut r = page(StatusCode::SERVICE_UNAVAILABLE, title, detail);
    r.headers_mut().insert(
        header::RETRY_AFTER,
        header::HeaderValue::from_static(retry_after),
    );
    r
}

pub fn not_found(host: &str) -> Response<Body> {
    page(
        StatusCode::NOT_FOUND,
        "No session here",
        &format!(
            "vessel has no route for <code>{}</code>. Check the session's name, or whether it is still declared.",
            escape(host)
        ),
    )
}

pub fn bad_gateway(host: &str, route: &Route, error: &str) -> Response<Body> {
    page(
        StatusCode::BAD_GATEWAY,
        "Session not answering",
        &format!(
            "Session <code>{}</code> does not answer at <code>{}</code> for <code>{}</code>: {}. vessel repairs it on its next pass.",
            escape(&route.session),
            escape(&route.upstream),
            escape(host),
            escape(error)
        ),
    )
}

pub fn not_ready(host: &str, session: &str) -> Response<Body> {
    unavailable(
        "Session starting",
        &format!(
            "Session <code>{}</code> for <code>{}</code> is not ready yet. Try again in a moment.",
            escape(session),
            escape(host)
        ),
        "2",
    )
}

/// A request vessel will not pass on, and why. The connection closes after it: whatever
/// follows on it cannot be trusted to be framed as the client meant.
pub fn bad_request(why: &str) -> Response<Body> {
    let mut r = page(
        StatusCode::BAD_REQUEST,
        "Bad request",
        &format!("vessel does not pass this request on: {}.", escape(why)),
    );
    r.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    r
}

/// CONNECT: vessel routes requests to sessions by host; it is not a forward proxy.
pub fn connect_refused() -> Response<Body> {
    let mut r = page(
        StatusCode::METHOD_NOT_ALLOWED,
        "CONNECT is not served",
        "vessel routes requests to sessions by host; it opens no tunnels to other addresses.",
    );
    let h = r.headers_mut();
    h.insert(
        header::ALLOW,
        header::HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
    );
    h.insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    r
}

/// Too many requests are already waiting for sessions to wake: this one is not held.
pub fn too_many_waiting(host: &str, session: &str) -> Response<Body> {
    unavailable(
        "Session waking up",
        &format!(
            "Session <code>{}</code> for <code>{}</code> is waking up, and too many requests are already waiting. Try again in a moment.",
            escape(session),
            escape(host)
        ),
        "2",
    )
}

/// For a browser's navigation while its session wakes: a page that reloads itself.
pub fn waking(host: &str, session: &str) -> Response<Body> {
    unavailable(
        "Waking up",
        &format!(
            "Session <code>{}</code> for <code>{}</code> was asleep and is waking up. This page reloads by itself.<script>setTimeout(()=>location.reload(),1000)</script>",
            escape(session),
            escape(host)
        ),
        "1",
    )
}

/// Its session cannot wake: the caps on running sessions are reached and none can sleep.
pub fn platform_full(host: &str, session: &str) -> Response<Body> {
    unavailable(
        "The platform is full",
        &format!(
            "Session <code>{}</code> for <code>{}</code> is asleep, and cannot wake now: as many sessions run as the platform allows, and every one of them is in use. Try again later.",
            escape(session),
            escape(host)
        ),
        "30",
    )
}

/// Its session is declared `stopped`: kept, not running, and not woken by requests.
pub fn stopped(host: &str, session: &str) -> Response<Body> {
    page(
        StatusCode::SERVICE_UNAVAILABLE,
        "Session stopped",
        &format!(
            "Session <code>{}</code> for <code>{}</code> is stopped: it is declared <code>state: stopped</code>. Its work is kept; it runs again when it is declared <code>running</code>. Requests do not wake it.",
            escape(session),
            escape(host)
        ),
    )
}
