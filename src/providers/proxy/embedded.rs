//! The embedded proxy as a proxy provider: observe reads its table, apply swaps it. Every
//! route in it is vessel's. A route counts as applied as soon as the swap is done, which is
//! also when it serves.

use crate::model::observed::ObservedRoute;
use crate::model::plan::RouteAction;
use crate::proxy::{Proxy, Route, RouteChange};

use super::{BoxFut, ProviderError, ProxyProvider};

pub struct EmbeddedProxy {
    proxy: Proxy,
    /// This process is not the daemon: the table that serves lives in `vessel run`, so it
    /// cannot be observed from here (a gap, not an empty table).
    outside_daemon: bool,
    /// The table's version when it was last observed, plus one (0: never).
    observed: std::sync::atomic::AtomicU64,
}

impl EmbeddedProxy {
    pub fn new(proxy: Proxy) -> EmbeddedProxy {
        EmbeddedProxy {
            proxy,
            outside_daemon: false,
            observed: Default::default(),
        }
    }

    pub fn outside_daemon(proxy: Proxy) -> EmbeddedProxy {
        EmbeddedProxy {
            proxy,
            outside_daemon: true,
            observed: Default::default(),
        }
    }
}

impl ProxyProvider for EmbeddedProxy {
    fn observe(&self) -> BoxFut<'_, Result<Vec<ObservedRoute>, ProviderError>> {
        if self.outside_daemon {
            return Box::pin(async {
                Err(ProviderError::failed(
                    "observe",
                    "the embedded proxy",
                    "it serves inside `vessel run`; plan against its snapshot with --observed <state dir>/observed.json",
                ))
            });
        }
        // The version first: a change while the table is read shows as a change next time.
        let version = self.proxy.version();
        let routes = self
            .proxy
            .routes()
            .into_iter()
            .map(|(key, r)| {
                let (host, path) = crate::model::split_route_key(&key);
                ObservedRoute {
                    host: host.to_string(),
                    path: path.map(str::to_string),
                    strip_prefix: r.strip_prefix,
                    upstream: r.upstream,
                    owned: true,
                    session: Some(r.session),
                    route: r.route,
                }
            })
            .collect();
        self.observed
            .store(version + 1, std::sync::atomic::Ordering::SeqCst);
        Box::pin(async move { Ok(routes) })
    }

    fn unchanged(&self) -> bool {
        !self.outside_daemon
            && self.observed.load(std::sync::atomic::Ordering::SeqCst) == self.proxy.version() + 1
    }

    fn apply<'a>(
        &'a self,
        actions: &'a [&'a RouteAction],
    ) -> BoxFut<'a, Vec<Result<(), ProviderError>>> {
        let changes: Vec<RouteChange> = actions.iter().map(|a| route_change(a)).collect();
        let results = actions.iter().map(|_| Ok(())).collect();
        self.proxy.apply(&changes);
        Box::pin(async move { results })
    }
}

/// What a route step does to vessel's own proxy's table.
pub(crate) fn route_change(a: &RouteAction) -> RouteChange {
    match a.after() {
        Some(r) => RouteChange::Upsert {
            host: a.key(),
            route: Route {
                upstream: r.upstream,
                session: r.session.unwrap_or_default(),
                route: r.route,
                ready: true,
                strip_prefix: r.strip_prefix,
            },
        },
        None => RouteChange::Remove { host: a.key() },
    }
}
