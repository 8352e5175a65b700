//! Proxy providers: routes host -> session port. `embedded` (vessel's own proxy), `caddy` (its
//! admin API), `traefik` (its file provider). Route steps come in batches: one table swap or
//! config write per batch. Proxies without labels mark vessel's routes by name (`route_tag`).

pub mod caddy;
mod config;
pub mod embedded;
pub mod traefik;

pub use config::{ProxyConfig, TraefikConfig};

use crate::model::observed::ObservedRoute;
use crate::model::plan::RouteAction;

use super::{BoxFut, ProviderError};

pub trait ProxyProvider: Send + Sync {
    fn observe(&self) -> BoxFut<'_, Result<Vec<ObservedRoute>, ProviderError>>;
    /// Carry out route steps as one batch; one result per action, in order.
    fn apply<'a>(
        &'a self,
        actions: &'a [&'a RouteAction],
    ) -> BoxFut<'a, Vec<Result<(), ProviderError>>>;
}

/// One result per action for a route batch that succeeded or failed as a whole (one config
/// write): route steps share the outcome, anything else is not a proxy's.
pub(crate) fn route_batch_results(
    actions: &[&RouteAction],
    outcome: Result<(), String>,
) -> Vec<Result<(), ProviderError>> {
    actions
        .iter()
        .map(|a| {
            outcome
                .clone()
                .map_err(|m| ProviderError::failed("route", a.host(), m))
        })
        .collect()
}

/// The name that marks one of vessel's routes in a proxy that has no labels (a Caddy `@id`,
/// a Traefik router): `<prefix>_<session>_<route>_<host>`, `<route>` empty for a session's
/// own port routes. Sessions, routes and hosts never contain `_`, so it parses back from the
/// right whatever the prefix.
pub(crate) fn route_tag(prefix: &str, session: &str, route: Option<&str>, host: &str) -> String {
    format!("{prefix}_{session}_{}_{host}", route.unwrap_or(""))
}

/// (session, route, host) of a name `route_tag` made with `prefix`; None for anything else.
pub(crate) fn parse_route_tag<'a>(
    prefix: &str,
    tag: &'a str,
) -> Option<(&'a str, Option<&'a str>, &'a str)> {
    let mut parts = tag.rsplitn(4, '_');
    let host = parts.next()?;
    let route = parts.next()?;
    let session = parts.next()?;
    if parts.next()? != prefix || session.is_empty() || host.is_empty() {
        return None;
    }
    Some((session, (!route.is_empty()).then_some(route), host))
}
