//! vessel: a declarative GitOps reconciler for developer sessions.
//!
//! The library holds everything; `main.rs` only parses the command line. See ARCHITECTURE.md
//! for the map of modules and the invariants they keep.

pub mod cli;
pub mod config;
pub mod daemon;
pub mod desired;
pub mod devserver;
pub mod diag;
pub mod exec;
pub mod http_client;
pub mod init;
pub mod lifecycle;
pub mod listeners;
pub mod load;
pub mod metrics;
pub mod model;
pub mod notify;
pub use model::observed;
pub mod planner;
pub mod progress;
pub mod providers;
pub mod proxy;
pub mod reconcile;
pub mod schema;
pub mod secret;
pub mod settle;
pub mod source;
pub mod state;
pub mod status;
pub mod watch;

pub mod webhook;

/// An error and all its causes on one line (`a: b: c`), for logs, events and pages.
/// Lock state that is safe to forget (a cache, a waiting slot). A lock poisoned by a panic in
/// the middle of an update may hold half of it, so the value is reset to its default and the
/// poison cleared: a cache that forgets is safe (the next call reads the world again), one that
/// lies is not, and skipping the lock would lose the update for good.
pub(crate) fn lock_or_reset<T: Default>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => {
            let mut g = poisoned.into_inner();
            *g = T::default();
            m.clear_poison();
            tracing::warn!("a lock was poisoned by a panic: its state was reset");
            g
        }
    }
}

pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
