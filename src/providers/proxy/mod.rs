//! Proxy providers: routes host -> session port. `embedded` (vessel's own proxy), `caddy` (its
//! admin API), `traefik` (its file provider), `cloudflare_tunnel` (a tunnel's ingress rules);
//! `fronted` puts Caddy or Traefik in front of
//! vessel's wake-and-activity listener. Route steps come in batches: one table swap or
//! config write per batch. Proxies without labels mark vessel's routes by name (`route_tag`).

pub mod caddy;
pub mod cloudflare_tunnel;
mod config;
pub mod embedded;
pub mod fronted;
pub mod traefik;

pub use config::{CloudflareTunnelConfig, ProxyConfig, TraefikConfig};
use std::sync::Arc;

use crate::model::observed::ObservedRoute;
use crate::model::plan::RouteAction;

use super::{BoxFut, ProviderError};

pub trait ProxyProvider: Send + Sync {
    fn observe(&self) -> BoxFut<'_, Result<Vec<ObservedRoute>, ProviderError>>;
    /// Nothing `observe` would report has changed since it last ran, as far as the provider
    /// knows for certain (false when it cannot tell; see `ComputeProvider::unchanged`).
    fn unchanged(&self) -> bool {
        false
    }
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
    outcome: Result<(), Arc<dyn std::error::Error + Send + Sync>>,
) -> Vec<Result<(), ProviderError>> {
    actions
        .iter()
        .map(|a| {
            outcome
                .clone()
                .map_err(|e| ProviderError::caused("route", a.key(), e))
        })
        .collect()
}

/// The name that marks one of vessel's routes in a proxy that has no labels (a Caddy `@id`,
/// a Traefik router): `<prefix>_<session>_<route>_<host>`, `<route>` empty for a session's
/// own port routes, and a route's path prefix after the host with every byte but letters,
/// digits, `.` and `-` written `~XX` (`/preview` is `~2Fpreview`). Sessions, routes, hosts and
/// encoded paths never contain `_`, so it parses back from the right whatever the prefix.
pub(crate) fn route_tag(
    prefix: &str,
    session: &str,
    route: Option<&str>,
    host: &str,
    path: Option<&str>,
) -> String {
    use std::fmt::Write as _;
    let mut tag = format!("{prefix}_{session}_{}_{host}", route.unwrap_or(""));
    for b in path.unwrap_or("").bytes() {
        if b.is_ascii_alphanumeric() || b == b'.' || b == b'-' {
            tag.push(b as char);
        } else {
            let _ = write!(tag, "~{b:02X}");
        }
    }
    tag
}

/// What a name `route_tag` made says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RouteTag<'a> {
    pub session: &'a str,
    pub route: Option<&'a str>,
    pub host: &'a str,
    pub path: Option<String>,
}

/// The parts of a name `route_tag` made with `prefix`; None for anything else.
pub(crate) fn parse_route_tag<'a>(prefix: &str, tag: &'a str) -> Option<RouteTag<'a>> {
    let mut parts = tag.rsplitn(4, '_');
    let at = parts.next()?;
    let route = parts.next()?;
    let session = parts.next()?;
    if parts.next()? != prefix || session.is_empty() || at.is_empty() {
        return None;
    }
    let (host, path) = match at.find('~') {
        Some(i) => (&at[..i], Some(decode_path(&at[i..])?)),
        None => (at, None),
    };
    if host.is_empty() {
        return None;
    }
    Some(RouteTag {
        session,
        route: (!route.is_empty()).then_some(route),
        host,
        path,
    })
}

/// A path `route_tag` encoded; None if it is not one.
fn decode_path(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'~' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    let path = String::from_utf8(out).ok()?;
    path.starts_with('/').then_some(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_tags_parse_back_with_their_paths() {
        let tag = route_tag("vessel", "user-1", Some("pre"), "p.localhost", None);
        assert_eq!(tag, "vessel_user-1_pre_p.localhost");
        let t = parse_route_tag("vessel", &tag);
        assert_eq!(
            t.map(|t| (t.session, t.route, t.host, t.path)),
            Some(("user-1", Some("pre"), "p.localhost", None))
        );
        let path = "/preview/user_1/~x@y";
        let tag = route_tag("vessel", "user-1", None, "p.localhost", Some(path));
        assert_eq!(tag.matches('_').count(), 3, "{tag}");
        let t = parse_route_tag("vessel", &tag);
        assert_eq!(
            t.map(|t| (t.host, t.route, t.path)),
            Some(("p.localhost", None, Some(path.to_string())))
        );
        assert!(parse_route_tag("vessel", "vessel_a__h~zz").is_none());
        assert!(parse_route_tag("vessel", "other_a__h").is_none());
    }
}
