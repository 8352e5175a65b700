//! The webhook receiver: on a listener of its own, off by default. A POST signed with
//! HMAC-SHA256 over its body (`X-Hub-Signature-256: sha256=<hex>` as GitHub sends it, or the
//! generic `X-Vessel-Signature` in the same form) pokes the loop to fetch now. It carries no
//! data into the plan: the body is only checked, never read for content. A bad or missing
//! signature gets 401 and changes nothing; every other method gets 405. Bodies are bounded
//! (1 MiB), and connections as every listener's are (`listeners`).

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Secret;
use crate::reconcile::Trigger;

/// HMAC-SHA256 (RFC 2104).
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    inner.update(message);
    let inner = inner.finalize();
    let mut outer = Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner);
    let mut out = [0u8; 32];
    out.copy_from_slice(&outer.finalize());
    out
}

/// Is `headers`' signature of `body` the one `secret` makes? Constant-time.
pub fn signed(secret: &[u8], body: &[u8], headers: &HeaderMap) -> bool {
    let given = ["x-hub-signature-256", "x-vessel-signature"]
        .iter()
        .find_map(|h| headers.get(*h))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("sha256="))
        .and_then(|hexed| hex::decode(hexed.trim()).ok());
    let Some(given) = given else { return false };
    let want = hmac_sha256(secret, body);
    given.len() == want.len()
        && given
            .iter()
            .zip(want.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

struct Hook {
    secret: Secret,
    poke: mpsc::UnboundedSender<Trigger>,
}

async fn receive(
    State(h): State<Arc<Hook>>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if method != Method::POST {
        let mut r = (
            StatusCode::METHOD_NOT_ALLOWED,
            "POST a signed payload here\n",
        )
            .into_response();
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return r;
    }
    if !signed(h.secret.expose().as_bytes(), &body, &headers) {
        return (StatusCode::UNAUTHORIZED, "bad or missing signature\n").into_response();
    }
    let _ = h.poke.send(Trigger::Webhook);
    (StatusCode::ACCEPTED, "fetching\n").into_response()
}

/// Serve on a thread of its own, within `limits`, until `cancel`.
pub fn serve_thread(
    listener: std::net::TcpListener,
    secret: Secret,
    poke: mpsc::UnboundedSender<Trigger>,
    limits: crate::listeners::Limits,
    cancel: CancellationToken,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let app = Router::new()
        .fallback(receive)
        .layer(DefaultBodyLimit::max(1 << 20))
        .with_state(Arc::new(Hook { secret, poke }));
    crate::listeners::serve_router_thread("webhook", listener, app, limits, cancel)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231_case_2() {
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn signatures_are_checked() {
        let body = br#"{"ref":"refs/heads/main"}"#;
        let sig = format!("sha256={}", hex::encode(hmac_sha256(b"s3cret", body)));
        let mut h = HeaderMap::new();
        h.insert(
            "x-hub-signature-256",
            HeaderValue::from_str(&sig).unwrap_or(HeaderValue::from_static("")),
        );
        assert!(signed(b"s3cret", body, &h));
        assert!(!signed(b"other", body, &h));
        assert!(!signed(b"s3cret", b"tampered", &h));
        assert!(!signed(b"s3cret", body, &HeaderMap::new()));
    }
}
