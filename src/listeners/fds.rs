//! The process's file descriptors: the soft open-file limit raised to the hard one at start,
//! and the budget that splits the limit between the listeners' connections and a reserve that
//! is never theirs (the reconcile loop, providers' clients, session logs, the state directory).
//!
//! `FileBudget::split` is pure (the limit is passed in), so how a limit divides is tested without
//! touching the process.

use nix::sys::resource::{Resource, getrlimit, setrlimit};

use crate::config::MaxConnections;

/// The reserve is a quarter of the limit, and at least this many files (but never more than
/// half the limit).
pub const MIN_RESERVE: u64 = 256;

/// Whatever the limit, no more files than this are budgeted (an unlimited hard limit).
const MAX_LIMIT: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FdError {
    #[error("cannot read the open-file limit")]
    Get(#[source] nix::Error),
    #[error("cannot raise the open-file limit from {soft} to {hard}")]
    Set {
        soft: u64,
        hard: u64,
        #[source]
        source: nix::Error,
    },
}

/// The open-file limit before and after raising it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Raised {
    pub before: u64,
    pub limit: u64,
}

/// Raise the soft open-file limit to the hard one. On failure the limit stays as it was.
pub fn raise_nofile() -> Result<Raised, FdError> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(FdError::Get)?;
    if soft >= hard {
        return Ok(Raised {
            before: soft,
            limit: soft,
        });
    }
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(|source| FdError::Set {
        soft,
        hard,
        source,
    })?;
    Ok(Raised {
        before: soft,
        limit: hard,
    })
}

/// The soft open-file limit as it is now.
pub fn current_limit() -> Result<u64, FdError> {
    getrlimit(Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| soft)
        .map_err(FdError::Get)
}

/// How an open-file limit divides between the listeners and the reserve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileBudget {
    pub limit: u64,
    /// Files the listeners never get.
    pub reserve: u64,
    /// Client connections of the embedded proxy (each may hold an upstream connection too).
    pub proxy: usize,
    /// Idle upstream connections the proxy keeps, across all its threads.
    pub pool_idle: usize,
    pub status: usize,
    pub webhook: usize,
    /// Configured numbers the limit could not carry: (listener, configured, given).
    pub lowered: Vec<(&'static str, u32, usize)>,
}

impl FileBudget {
    /// Split `limit` for the listeners that run (`proxy`: the embedded proxy, `webhook`: the
    /// webhook receiver; the status endpoint always runs). A proxy connection counts twice: the
    /// client's and the session's.
    pub fn split(limit: u64, want: &MaxConnections, proxy: bool, webhook: bool) -> FileBudget {
        let limit = limit.min(MAX_LIMIT);
        let reserve = (limit / 4).max(MIN_RESERVE).min(limit / 2);
        let available = limit - reserve;
        let mut lowered = Vec::new();
        // The side listeners get a small share each; a configured number above a quarter of
        // what is available is lowered to it.
        let side_cap = (available / 4).max(1);
        let side_auto = (available / 16).clamp(8, 64).min(side_cap);
        let mut side = |name: &'static str, on: bool, want: u32| -> u64 {
            if !on {
                return 0;
            }
            if want == 0 {
                return side_auto;
            }
            let given = u64::from(want).min(side_cap);
            if given < u64::from(want) {
                lowered.push((name, want, given as usize));
            }
            given
        };
        let status = side("status", true, want.status);
        let webhook = side("webhook", webhook, want.webhook);
        let (proxy_conns, pool_idle) = if proxy {
            let files = available.saturating_sub(status + webhook);
            let pool_idle = files / 8;
            let most = ((files - pool_idle) / 2).max(1);
            let given = match want.proxy {
                0 => most,
                n => u64::from(n).min(most),
            };
            if want.proxy != 0 && given < u64::from(want.proxy) {
                lowered.push(("proxy", want.proxy, given as usize));
            }
            (given, pool_idle)
        } else {
            (0, 0)
        };
        FileBudget {
            limit,
            reserve,
            proxy: proxy_conns as usize,
            pool_idle: pool_idle as usize,
            status: status as usize,
            webhook: webhook as usize,
            lowered,
        }
    }

    /// Files the listeners may hold at most, all connections busy and the pool full.
    pub fn listener_files(&self) -> u64 {
        (2 * self.proxy + self.pool_idle + self.status + self.webhook) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auto() -> MaxConnections {
        MaxConnections::default()
    }

    #[test]
    fn the_reserve_always_stays() {
        for limit in [64, 256, 512, 1024, 4096, 20_000, 1_048_576, u64::MAX] {
            for webhook in [false, true] {
                let b = FileBudget::split(limit, &auto(), true, webhook);
                assert!(
                    b.listener_files() + b.reserve <= b.limit,
                    "{limit}: {b:?} overdraws"
                );
                assert!(b.reserve >= (b.limit / 4).min(MIN_RESERVE), "{b:?}");
                assert!(b.proxy >= 1 && b.status >= 1, "{b:?}");
                assert_eq!(b.webhook >= 1, webhook, "{b:?}");
            }
        }
    }

    #[test]
    fn a_1024_limit_divides_as_documented() {
        let b = FileBudget::split(1024, &auto(), true, false);
        assert_eq!(
            (b.reserve, b.proxy, b.pool_idle, b.status, b.webhook),
            (256, 315, 90, 48, 0)
        );
        // Without the embedded proxy the status endpoint keeps its share, and nothing more.
        let b = FileBudget::split(1024, &auto(), false, true);
        assert_eq!((b.proxy, b.status, b.webhook), (0, 48, 48));
    }

    #[test]
    fn configured_numbers_are_kept_or_lowered_never_raised() {
        let want = MaxConnections {
            proxy: 100,
            status: 10,
            webhook: 5,
        };
        let b = FileBudget::split(1024, &want, true, true);
        assert_eq!((b.proxy, b.status, b.webhook), (100, 10, 5));
        assert!(b.lowered.is_empty());
        let greedy = MaxConnections {
            proxy: 100_000,
            status: 100_000,
            webhook: 0,
        };
        let b = FileBudget::split(1024, &greedy, true, false);
        assert_eq!(b.status, 192);
        assert!(b.listener_files() + b.reserve <= 1024, "{b:?}");
        assert_eq!(
            b.lowered,
            vec![("status", 100_000, 192), ("proxy", 100_000, b.proxy)]
        );
    }
}
