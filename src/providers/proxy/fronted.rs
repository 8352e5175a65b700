//! Caddy or Traefik in front of vessel's wake-and-activity listener (`wake_listen`): every
//! route goes twice, to the inner proxy (vessel's own, served on the wake listener) with the
//! session's real upstream, and to the outer proxy with the wake listener as its upstream. The
//! outer keeps the Host (both do by default), so the inner routes by it; the inner strips a
//! path prefix, the outer never does. The inner is where sleeping sessions' requests are held
//! and activity is counted, exactly as with the embedded proxy.
//!
//! Observing reads the outer and puts back, for each of vessel's routes that points at the wake
//! listener, the inner's upstream and prefix stripping for its key: the planner sees the routes
//! it asked for and no drift. A route of vessel's that points elsewhere (written before
//! `wake_listen` was set) or that the inner does not have (vessel restarted) reads as drift, so
//! the next pass writes it again. Foreign routes are reported as they are.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use crate::model::observed::ObservedRoute;
use crate::model::plan::RouteAction;

use super::{BoxFut, ProviderError, ProxyProvider};

/// Where the inner proxy's routes are read from.
pub enum Inner {
    /// The daemon: the proxy it serves on the wake listener.
    Live(crate::proxy::Proxy),
    /// Any other process (`vessel plan`): the inner table lives in the daemon, so its routes
    /// are taken from the daemon's last observed snapshot (`<state dir>/observed.json`).
    Snapshot(PathBuf),
}

pub struct Fronted {
    outer: Arc<dyn ProxyProvider>,
    inner: Inner,
    wake: SocketAddr,
}

/// What the inner proxy has for one route key: its upstream, and whether it strips the prefix.
type InnerRoutes = BTreeMap<String, (String, bool)>;

impl Fronted {
    pub fn new(outer: Arc<dyn ProxyProvider>, inner: Inner, wake: SocketAddr) -> Fronted {
        Fronted { outer, inner, wake }
    }

    fn inner_routes(&self) -> InnerRoutes {
        match &self.inner {
            Inner::Live(p) => p
                .routes()
                .into_iter()
                .map(|(k, r)| (k, (r.upstream, r.strip_prefix)))
                .collect(),
            Inner::Snapshot(path) => read_snapshot(path),
        }
    }
}

/// The routes of the daemon's last observed snapshot, by key; none if it does not read.
fn read_snapshot(path: &std::path::Path) -> InnerRoutes {
    let Ok(bytes) = std::fs::read(path) else {
        return InnerRoutes::new();
    };
    match serde_json::from_slice::<crate::model::observed::Observed>(&bytes) {
        Ok(o) => o
            .routes
            .into_iter()
            .filter(|(_, r)| r.owned)
            .map(|(k, r)| (k, (r.upstream, r.strip_prefix)))
            .collect(),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "the observed snapshot does not read; fronted routes read as drifted");
            InnerRoutes::new()
        }
    }
}

/// One outer route as the planner should see it, given the inner's routes.
fn map_back(mut r: ObservedRoute, wake: &str, inner: &InnerRoutes) -> ObservedRoute {
    if !r.owned {
        return r;
    }
    if r.upstream != wake {
        // Straight to the session: right upstream, wrong path. Say so, so it is written again.
        r.upstream = format!("{} (not through the wake listener {wake})", r.upstream);
        return r;
    }
    if let (false, Some((upstream, strip))) = (r.strip_prefix, inner.get(&r.key())) {
        r.upstream = upstream.clone();
        r.strip_prefix = *strip;
    }
    r
}

/// The outer proxy's version of a route step: to the wake listener, the prefix kept.
fn outer_action(a: &RouteAction, wake: &str) -> RouteAction {
    match a {
        RouteAction::UpsertRoute {
            host,
            path,
            session,
            port,
            route,
            ..
        } => RouteAction::UpsertRoute {
            host: host.clone(),
            path: path.clone(),
            strip_prefix: false,
            upstream: wake.to_string(),
            session: session.clone(),
            port: port.clone(),
            route: route.clone(),
            upstream_from: None,
        },
        RouteAction::RemoveRoute { .. } => a.clone(),
    }
}

impl ProxyProvider for Fronted {
    fn observe(&self) -> BoxFut<'_, Result<Vec<ObservedRoute>, ProviderError>> {
        Box::pin(async move {
            let outer = self.outer.observe().await?;
            let inner = self.inner_routes();
            let wake = self.wake.to_string();
            Ok(outer
                .into_iter()
                .map(|r| map_back(r, &wake, &inner))
                .collect())
        })
    }

    fn apply<'a>(
        &'a self,
        actions: &'a [&'a RouteAction],
    ) -> BoxFut<'a, Vec<Result<(), ProviderError>>> {
        Box::pin(async move {
            let Inner::Live(inner) = &self.inner else {
                return actions
                    .iter()
                    .map(|a| {
                        Err(ProviderError::failed(
                            "route",
                            a.key(),
                            "the wake listener serves inside `vessel run`",
                        ))
                    })
                    .collect();
            };
            let wake = self.wake.to_string();
            // Upserts reach the inner first, so the outer never sends a request it lacks.
            let upserts: Vec<_> = actions
                .iter()
                .filter(|a| a.after().is_some())
                .map(|a| super::embedded::route_change(a))
                .collect();
            inner.apply(&upserts);
            let outer: Vec<RouteAction> = actions.iter().map(|a| outer_action(a, &wake)).collect();
            let refs: Vec<&RouteAction> = outer.iter().collect();
            let results = self.outer.apply(&refs).await;
            // A removal leaves the inner only once the outer no longer sends there.
            let removals: Vec<_> = actions
                .iter()
                .zip(&results)
                .filter(|(a, r)| a.after().is_none() && r.is_ok())
                .map(|(a, _)| super::embedded::route_change(a))
                .collect();
            inner.apply(&removals);
            results
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(host: &str, upstream: &str, owned: bool) -> ObservedRoute {
        ObservedRoute {
            host: host.into(),
            path: None,
            strip_prefix: false,
            upstream: upstream.into(),
            owned,
            session: owned.then(|| "a".to_string()),
            route: None,
        }
    }

    #[test]
    fn outer_routes_read_back_as_the_inner_has_them() {
        let wake = "127.0.0.1:9000";
        let inner: InnerRoutes = [(
            "a.localhost/p".to_string(),
            ("127.0.0.1:14001".to_string(), true),
        )]
        .into();
        let mut r = route("a.localhost", wake, true);
        r.path = Some("/p".into());
        let back = map_back(r, wake, &inner);
        assert_eq!(
            (back.upstream.as_str(), back.strip_prefix),
            ("127.0.0.1:14001", true)
        );
        // Not in the inner (vessel restarted): the wake address, which is drift.
        let back = map_back(route("b.localhost", wake, true), wake, &inner);
        assert_eq!(back.upstream, wake);
        // Straight to a session: drift, whatever the address.
        let back = map_back(route("b.localhost", "127.0.0.1:14001", true), wake, &inner);
        assert!(back.upstream.contains("not through the wake listener"));
        // Foreign: as it is.
        let back = map_back(route("f.localhost", wake, false), wake, &inner);
        assert_eq!(back, route("f.localhost", wake, false));
    }

    #[test]
    fn the_outer_gets_the_wake_address_and_keeps_the_prefix() {
        let a = RouteAction::UpsertRoute {
            host: "a.localhost".into(),
            path: Some("/p".into()),
            strip_prefix: true,
            upstream: "127.0.0.1:14001".into(),
            session: "a".into(),
            port: "app".into(),
            route: None,
            upstream_from: None,
        };
        let RouteAction::UpsertRoute {
            upstream,
            strip_prefix,
            path,
            ..
        } = outer_action(&a, "127.0.0.1:9000")
        else {
            panic!("an upsert stays an upsert")
        };
        assert_eq!(
            (upstream.as_str(), strip_prefix, path.as_deref()),
            ("127.0.0.1:9000", false, Some("/p"))
        );
    }
}
