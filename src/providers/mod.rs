//! Providers: what observes the world and carries out plan steps. Three families, each in its
//! folder with a small trait of `observe` plus idempotent operations:
//!
//! - `compute/` (`ComputeProvider`): sessions, one step at a time; `process/` and `docker/`,
//!   with what both need written once beside them (the step dispatch, health probes, kept
//!   workspaces, placeholders, path checks);
//! - `proxy/` (`ProxyProvider`): routes, in batches (one table swap or config load per batch);
//!   `embedded`, `caddy`, `traefik`;
//! - `dns/` (`DnsProvider`): records, in batches; `hosts`, `powerdns`.
//!
//! `registry.rs` builds the set the config chooses (`Providers`) and observes it: observing
//! never fails as a whole, a provider that cannot be observed becomes a gap, and the planner
//! leaves everything there alone. Foreign (SDK) types stay inside each provider's module.

pub mod cloudflare;
pub mod compute;
pub mod dns;
pub mod proxy;
pub mod registry;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

pub use compute::ComputeProvider;
pub use dns::DnsProvider;
pub use proxy::ProxyProvider;
pub use registry::{Env, Providers, ProvidersConfig, SetupError};

pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a provider call failed. Its Display names the operation and the object; the cause is
/// in `source`, never repeated.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("{op} {object}")]
    Io {
        op: &'static str,
        object: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{op} {object}: {message}")]
    Failed {
        op: &'static str,
        object: String,
        message: String,
    },
    /// A typed cause, shared when one failure (a batch's file write, say) fails several steps.
    #[error("{op} {object}")]
    Caused {
        op: &'static str,
        object: String,
        #[source]
        source: Arc<dyn std::error::Error + Send + Sync>,
    },
}

impl ProviderError {
    pub fn io(
        op: &'static str,
        object: impl Into<String>,
    ) -> impl FnOnce(std::io::Error) -> ProviderError {
        let object = object.into();
        move |source| ProviderError::Io { op, object, source }
    }

    pub fn caused(
        op: &'static str,
        object: impl Into<String>,
        source: Arc<dyn std::error::Error + Send + Sync>,
    ) -> ProviderError {
        ProviderError::Caused {
            op,
            object: object.into(),
            source,
        }
    }

    pub fn failed(
        op: &'static str,
        object: impl Into<String>,
        message: impl Into<String>,
    ) -> ProviderError {
        ProviderError::Failed {
            op,
            object: object.into(),
            message: message.into(),
        }
    }
}

pub use crate::error_chain as chain;

/// An API that rate-limited vessel, or a call vessel held back to stay within its budget for
/// that API. A provider that is only rate-limited is degraded, not failed: it is still a gap
/// (no creates, no deletes while it cannot be read), and status says it is waiting.
#[derive(Debug, Clone, thiserror::Error)]
#[error("rate-limited: no calls for {}s", .retry_after.as_secs().max(1))]
pub struct RateLimited {
    pub retry_after: std::time::Duration,
}

/// Whether `e` or one of its causes is `RateLimited`.
pub fn is_rate_limited(e: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(e), |c| c.source()).any(|c| c.is::<RateLimited>())
}

/// Replace `file` atomically: a temporary file beside it, synced, keeping the old file's
/// permissions, then renamed over it. A reader sees the old file or the new, never half.
pub(crate) fn write_atomically(file: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomically_from(file, bytes, parent_dir(file))
}

/// The directory `file` is in (`.` for a bare name).
pub(crate) fn parent_dir(file: &std::path::Path) -> &std::path::Path {
    file.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."))
}

/// `write_atomically`, with the temporary file in `dir` (on `file`'s filesystem): for a file
/// in a directory a watcher reloads on every event, where a temporary file beside it would be
/// one more change.
pub(crate) fn write_atomically_from(
    file: &std::path::Path,
    bytes: &[u8],
    dir: &std::path::Path,
) -> std::io::Result<()> {
    use std::io::Write;
    let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.vessel-{}", std::process::id()));
    // A leftover of an interrupted write goes first; the new one never follows a symlink.
    let _ = std::fs::remove_file(&tmp);
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        if let Ok(meta) = std::fs::metadata(file) {
            let _ = std::fs::set_permissions(&tmp, meta.permissions());
        }
        std::fs::rename(&tmp, file)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// One async lock per session, shared by the executor and the lifecycle.
#[derive(Clone, Default)]
#[allow(clippy::type_complexity)]
pub struct SessionLocks(
    std::sync::Arc<
        std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<tokio::sync::Mutex<()>>>>,
    >,
);

impl SessionLocks {
    /// Wait for the session's lock.
    pub async fn lock(&self, session: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let m = {
            let mut map = crate::lock_or_reset(&self.0);
            // Forget the locks nobody holds or waits for, now and then, so the map follows
            // the sessions that exist.
            if map.len() > 64 && map.len().is_power_of_two() {
                map.retain(|_, l| std::sync::Arc::strong_count(l) > 1);
            }
            map.entry(session.to_string()).or_default().clone()
        };
        m.lock_owned().await
    }
}
