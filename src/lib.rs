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
pub mod init;
pub mod listeners;
pub mod load;
pub mod metrics;
pub mod model;
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

pub mod webhook;

/// An error and all its causes on one line (`a: b: c`), for logs, events and pages.
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
