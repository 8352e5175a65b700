//! What the two Cloudflare providers share (`proxy/cloudflare_tunnel.rs`, `dns/cloudflare.rs`):
//! the v4 API client with its token, the rate budget per token, and the answer envelope.
//!
//! Cloudflare allows 1,200 requests per five minutes per token and blocks a token for five
//! minutes past that. vessel counts its own calls per token (`Budget`: a sliding window over
//! the last five minutes, shared by both providers when they use one token) and holds a call
//! back rather than go past it; a 429 blocks the token for its `Retry-After` (five minutes
//! without one). A held-back or refused call is `RateLimited`: the provider is degraded, its
//! observation a gap, and the next pass after the wait goes on. Nothing here sleeps: every
//! call is bounded by the HTTP client's limits.
//!
//! The token goes only into the `Authorization` header (marked sensitive), and every text an
//! answer brings into an error has the token scrubbed out, should Cloudflare ever echo it.
//! Cloudflare's JSON stays in this module and its two users.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;
use serde::Deserialize;
use sha2::Digest;

use crate::http_client::{Api, HttpError, Limits, TlsConfig};
use crate::secret::Secret;

use super::RateLimited;

/// Cloudflare's API, which the providers call unless their `api` says otherwise.
pub const API: &str = "https://api.cloudflare.com";
/// The v4 API's path prefix.
const V4: &str = "/client/v4";
/// Requests per `WINDOW` Cloudflare allows one token.
pub const DEFAULT_BUDGET: u32 = 1200;
const WINDOW: Duration = Duration::from_secs(300);
/// How long a 429 without `Retry-After` blocks (Cloudflare's own block).
const BLOCKED_FOR: Duration = Duration::from_secs(300);

/// vessel's own count of the calls it made with one token over the last five minutes.
#[derive(Debug)]
pub struct Budget {
    limit: usize,
    state: Mutex<BudgetState>,
}

#[derive(Debug, Default)]
struct BudgetState {
    sent: VecDeque<Instant>,
    blocked_until: Option<Instant>,
    /// Calls made since the budget was made (for benches and tests).
    total: u64,
}

impl Budget {
    pub fn new(limit: u32) -> Budget {
        Budget {
            limit: limit.max(1) as usize,
            state: Mutex::default(),
        }
    }

    /// Take one call from the budget, or say how long to wait.
    fn take(&self) -> Result<(), RateLimited> {
        let now = Instant::now();
        let mut s = crate::lock_or_reset(&self.state);
        if let Some(until) = s.blocked_until {
            if until > now {
                return Err(RateLimited {
                    retry_after: until - now,
                });
            }
            s.blocked_until = None;
        }
        while s
            .sent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= WINDOW)
        {
            s.sent.pop_front();
        }
        if s.sent.len() >= self.limit {
            let oldest = s.sent.front().copied().unwrap_or(now);
            return Err(RateLimited {
                retry_after: WINDOW.saturating_sub(now.duration_since(oldest)),
            });
        }
        s.sent.push_back(now);
        s.total += 1;
        Ok(())
    }

    fn block(&self, d: Duration) {
        let mut s = crate::lock_or_reset(&self.state);
        let until = Instant::now() + d;
        s.blocked_until = Some(s.blocked_until.map_or(until, |u| u.max(until)));
    }

    /// Calls made with this budget so far.
    pub fn calls(&self) -> u64 {
        crate::lock_or_reset(&self.state).total
    }

    /// Calls made in the last five minutes.
    pub fn in_window(&self) -> usize {
        let now = Instant::now();
        crate::lock_or_reset(&self.state)
            .sent
            .iter()
            .filter(|t| now.duration_since(**t) < WINDOW)
            .count()
    }
}

/// The budgets of the providers one config builds, one per token: two providers with the same
/// token share one.
#[derive(Default)]
pub struct Budgets(BTreeMap<Vec<u8>, Arc<Budget>>);

impl Budgets {
    pub fn for_token(&mut self, token: &Secret, limit: u32) -> Arc<Budget> {
        let key = sha2::Sha256::digest(token.expose().as_bytes()).to_vec();
        self.0
            .entry(key)
            .or_insert_with(|| Arc::new(Budget::new(limit)))
            .clone()
    }
}

/// Why a Cloudflare call failed. Display names what failed; the cause is in `source`. Never
/// holds the token.
#[derive(Debug, thiserror::Error)]
pub enum CloudflareError {
    #[error("the cloudflare `api` setting")]
    Setting(#[source] HttpError),
    #[error("the Cloudflare API")]
    Api(#[source] HttpError),
    #[error("the Cloudflare API is rate-limiting this token")]
    RateLimited(#[source] RateLimited),
    #[error(
        "Cloudflare refused the API token ({status}: {message}): check that it is valid and has the permissions the README lists"
    )]
    Unauthorized { status: u16, message: String },
    #[error("Cloudflare answered {status}: {message}")]
    Status { status: u16, message: String },
    #[error("Cloudflare sent an answer vessel cannot read")]
    Answer(#[source] serde_json::Error),
    #[error("no zone named {0} is visible to this token")]
    NoZone(String),
}

/// Cloudflare's answer envelope.
#[derive(Deserialize)]
struct Envelope {
    #[serde(default)]
    success: bool,
    #[serde(default)]
    errors: Vec<Message>,
    #[serde(default)]
    result: serde_json::Value,
    #[serde(default)]
    result_info: Option<ResultInfo>,
}

#[derive(Deserialize)]
struct Message {
    #[serde(default)]
    code: i64,
    #[serde(default)]
    message: String,
}

/// A list's page information.
#[derive(Deserialize, Clone, Copy, Debug, Default)]
pub struct ResultInfo {
    #[serde(default)]
    pub page: Option<u32>,
    #[serde(default)]
    pub per_page: Option<u32>,
    #[serde(default)]
    pub total_pages: Option<u32>,
}

/// A successful answer: its `result`, and its `result_info` for a list.
pub struct Answer {
    pub result: serde_json::Value,
    pub info: Option<ResultInfo>,
}

/// The v4 API, with one token and its budget.
pub struct Client {
    api: Api,
    token: Secret,
    budget: Arc<Budget>,
}

impl Client {
    pub fn new(
        api: &str,
        token: Secret,
        budget: Arc<Budget>,
        tls: Option<&TlsConfig>,
    ) -> Result<Client, CloudflareError> {
        let limits = Limits {
            answer: Duration::from_secs(20),
            ..Limits::default()
        };
        Client::with_limits(api, token, budget, tls, limits)
    }

    /// `new`, with other time and size limits (tests shorten the answer time).
    pub fn with_limits(
        api: &str,
        token: Secret,
        budget: Arc<Budget>,
        tls: Option<&TlsConfig>,
        limits: Limits,
    ) -> Result<Client, CloudflareError> {
        Ok(Client {
            api: Api::new(api, "Cloudflare API", tls, limits).map_err(CloudflareError::Setting)?,
            token,
            budget,
        })
    }

    pub fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }

    /// One call to `path` (after `/client/v4`, with its query), within the budget.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<Answer, CloudflareError> {
        self.budget.take().map_err(CloudflareError::RateLimited)?;
        let auth = format!("Bearer {}", self.token.expose());
        let reply = self
            .api
            .call(
                method,
                &format!("{V4}{path}"),
                &[("authorization", &auth)],
                body,
            )
            .await
            .map_err(CloudflareError::Api)?;
        if reply.status == 429 {
            let wait = reply.retry_after.unwrap_or(BLOCKED_FOR);
            self.budget.block(wait);
            return Err(CloudflareError::RateLimited(RateLimited {
                retry_after: wait,
            }));
        }
        let envelope: Result<Envelope, _> = serde_json::from_slice(&reply.body);
        let message = |e: &Result<Envelope, serde_json::Error>| {
            let text = match e {
                Ok(env) if !env.errors.is_empty() => env
                    .errors
                    .iter()
                    .map(|m| format!("{} {}", m.code, m.message))
                    .collect::<Vec<_>>()
                    .join("; "),
                _ => reply.brief(),
            };
            self.scrub(&text)
        };
        if reply.status == 401 || reply.status == 403 {
            return Err(CloudflareError::Unauthorized {
                status: reply.status,
                message: message(&envelope),
            });
        }
        if !(200..300).contains(&reply.status) {
            return Err(CloudflareError::Status {
                status: reply.status,
                message: message(&envelope),
            });
        }
        let env = match envelope {
            Ok(env) if env.success => env,
            Ok(_) => {
                return Err(CloudflareError::Status {
                    status: reply.status,
                    message: message(&envelope),
                });
            }
            Err(e) => return Err(CloudflareError::Answer(e)),
        };
        Ok(Answer {
            result: env.result,
            info: env.result_info,
        })
    }

    /// `text` with the token taken out, wherever it is.
    fn scrub(&self, text: &str) -> String {
        let t = self.token.expose();
        if t.is_empty() {
            return text.to_string();
        }
        text.replace(t, "<redacted>")
    }
}

/// `s` for a URL's query: everything but unreserved characters percent-encoded.
pub fn query_value(s: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Whether `id` looks like a Cloudflare identifier (32 hex digits).
pub fn is_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_holds_calls_back_past_its_limit_and_after_a_block() {
        let b = Budget::new(3);
        for _ in 0..3 {
            assert!(b.take().is_ok());
        }
        let wait = b.take().expect_err("the fourth call waits");
        assert!(wait.retry_after > Duration::from_secs(290), "{wait:?}");
        assert_eq!(b.calls(), 3);
        let b = Budget::new(10);
        b.block(Duration::from_secs(7));
        let wait = b.take().expect_err("blocked");
        assert!(wait.retry_after <= Duration::from_secs(7));
        assert_eq!(b.calls(), 0);
    }

    #[test]
    fn one_token_one_budget() {
        let mut all = Budgets::default();
        let a = all.for_token(&Secret::new("t1"), 5);
        let b = all.for_token(&Secret::new("t1"), 5);
        let c = all.for_token(&Secret::new("t2"), 5);
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &c));
    }

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(query_value("vessel:dev "), "vessel%3Adev%20");
        assert!(is_id("023e105f4ecef8ad9ca31a8372d0c353"));
        assert!(!is_id("example.com"));
    }
}
