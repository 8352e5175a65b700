//! The `caddy` proxy provider, through Caddy's admin API.
//!
//! vessel's routes live in one HTTP server of Caddy's config (the config names it), each with
//! an `@id` of `<prefix>_<session>_<route>_<host>`: that `@id` is the ownership marker. Every
//! other route, server, app and setting is foreign and is written back exactly as read.
//!
//! A batch is one read-modify-write of the whole config: `GET /config/`, replace vessel's
//! routes, `POST /config/` with `If-Match` set to the ETag read, so a change someone else
//! made in between is never overwritten (Caddy answers 412 and vessel reads again). One
//! write per batch matters: Caddy re-provisions the whole config on every change, so adding
//! 1,000 routes one by one is quadratic (12.5 s measured here) where one write takes tens of
//! milliseconds. Caddy answers a config change only once the new config runs, so a route
//! counts as applied (and serving) when the write returns 200.
//!
//! vessel's routes go first in the server's route list, most specific first (wildcards last,
//! and on one host the longest path prefix first), each terminal: Caddy tries routes in order,
//! and vessel's are host-specific. A route with a path prefix matches the prefix itself and
//! everything under it (`path: [/p, /p/*]`: whole segments), and one that strips its prefix
//! runs Caddy's `rewrite` (`strip_path_prefix`) before it proxies. Caddy's path matcher
//! ignores case, where the embedded proxy and Traefik do not. A server that
//! is missing (Caddy restarted with an empty config) is created with the configured `listen`
//! addresses, as a plain-HTTP server (automatic HTTPS off); for TLS, define the server in
//! Caddy's own config and vessel only adds its routes to it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bytes::Bytes;
use http::Method;
use serde_json::{Map, Value, json};

use crate::model::observed::ObservedRoute;
use crate::model::plan::RouteAction;

use super::{
    BoxFut, ProviderError, ProxyProvider, parse_route_tag, route_batch_results, route_tag,
};
use crate::http_client::TlsConfig;
use crate::http_client::{Api, HttpError, Limits, Reply};

/// Tries of one batch when someone else changes Caddy's config at the same time.
const TRIES: usize = 3;

pub struct Caddy {
    /// The admin API.
    api: Api,
    server: String,
    listen: Vec<String>,
    prefix: String,
    /// Serialises vessel's own read-modify-writes.
    lock: tokio::sync::Mutex<()>,
}

/// Why the caddy provider could not do something. Display names the operation and the
/// object; the cause is in `source`.
#[derive(Debug, thiserror::Error)]
pub enum CaddyError {
    #[error("the caddy proxy provider needs the name of a `server`")]
    NoServerName,
    #[error("the caddy `id_prefix` `{0}` must be non-empty and without `_`")]
    Prefix(String),
    #[error("the caddy `admin` setting")]
    Setting(#[source] HttpError),
    #[error("Caddy's admin API")]
    Api(#[source] HttpError),
    #[error("Caddy answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("Caddy's config is not JSON")]
    NotJson(#[source] serde_json::Error),
    #[error(
        "Caddy sent no ETag with its config (Caddy 2.6 or later is needed), so vessel cannot write safely"
    )]
    NoEtag,
    #[error("{0} in Caddy's config is not an object")]
    NotObject(String),
    #[error("Caddy's config has no server `{0}`, and no `listen` is configured to create it")]
    NoServer(String),
    #[error("the routes of server `{0}` in Caddy's config are not a list")]
    RoutesNotList(String),
    #[error("Caddy refused the config ({status}): {body}")]
    Refused { status: u16, body: String },
    #[error("Caddy's config changed under vessel {0} times in a row; trying again next pass")]
    Raced(usize),
    #[error("a route vessel did not create serves this host in Caddy's config; left alone")]
    Foreign,
}

impl Caddy {
    pub fn new(
        admin: &str,
        server: &str,
        listen: &[String],
        prefix: &str,
        tls: Option<&TlsConfig>,
    ) -> Result<Caddy, CaddyError> {
        if server.is_empty() {
            return Err(CaddyError::NoServerName);
        }
        if prefix.is_empty() || prefix.contains('_') {
            return Err(CaddyError::Prefix(prefix.to_string()));
        }
        Ok(Caddy {
            api: Api::new(admin, "Caddy admin API", tls, Limits::default())
                .map_err(CaddyError::Setting)?,
            server: server.to_string(),
            listen: listen.to_vec(),
            prefix: prefix.to_string(),
            lock: tokio::sync::Mutex::new(()),
        })
    }

    /// The whole config (`null` when Caddy has none) and its ETag.
    async fn read(&self) -> Result<(Value, Option<String>), CaddyError> {
        let r = self
            .api
            .call(Method::GET, "/config/", &[], None)
            .await
            .map_err(CaddyError::Api)?;
        if r.status != 200 {
            return Err(CaddyError::Status {
                status: r.status,
                body: r.brief(),
            });
        }
        let config = serde_json::from_slice(&r.body).map_err(CaddyError::NotJson)?;
        Ok((config, r.etag))
    }

    async fn write(&self, config: &Value, etag: &str) -> Result<Reply, CaddyError> {
        self.api
            .call(
                Method::POST,
                "/config/",
                &[("if-match", etag)],
                Some(Bytes::from(config.to_string())),
            )
            .await
            .map_err(CaddyError::Api)
    }

    /// The route vessel writes for `r`.
    fn route(&self, r: &Want) -> Value {
        let tag = route_tag(&self.prefix, r.session, r.route, r.host, r.path);
        let proxy = json!({"handler": "reverse_proxy", "upstreams": [{"dial": r.upstream}]});
        match r.path {
            None => json!({
                "@id": tag,
                "match": [{"host": [r.host]}],
                "handle": [proxy],
                "terminal": true,
            }),
            Some(p) => {
                let mut handle = Vec::new();
                if r.strip_prefix {
                    handle.push(json!({"handler": "rewrite", "strip_path_prefix": p}));
                }
                handle.push(proxy);
                json!({
                    "@id": tag,
                    "match": [{"host": [r.host], "path": [p, format!("{p}/*")]}],
                    "handle": handle,
                    "terminal": true,
                })
            }
        }
    }

    /// What the server's routes say: vessel's (by `@id`) and the hosts of foreign ones.
    fn observed(&self, config: &Value) -> Vec<ObservedRoute> {
        let mut owned = Vec::new();
        let mut foreign = Vec::new();
        for r in server_routes(config, &self.server) {
            let tag = r.get("@id").and_then(Value::as_str);
            match tag.and_then(|t| parse_route_tag(&self.prefix, t)) {
                Some(t) => {
                    let dial = dial(r).unwrap_or_default();
                    let strip_prefix = t.path.is_some() && strips(r);
                    let want = Want {
                        host: t.host,
                        path: t.path.as_deref(),
                        strip_prefix,
                        upstream: &dial,
                        session: t.session,
                        route: t.route,
                    };
                    // A route edited by hand reads as drifted, so the next pass rewrites it.
                    let upstream = if *r == self.route(&want) {
                        dial
                    } else {
                        format!("{dial} (edited outside vessel)")
                    };
                    owned.push(ObservedRoute {
                        host: t.host.to_ascii_lowercase(),
                        path: t.path.clone(),
                        strip_prefix,
                        upstream,
                        owned: true,
                        session: Some(t.session.to_string()),
                        route: t.route.map(str::to_string),
                    });
                }
                None => {
                    for host in hosts(r) {
                        foreign.push(ObservedRoute {
                            host,
                            path: None,
                            strip_prefix: false,
                            upstream: dial(r).unwrap_or_default(),
                            owned: false,
                            session: None,
                            route: None,
                        });
                    }
                }
            }
        }
        // Foreign last: where a foreign route claims a host vessel's also does, the foreign
        // one is what the planner sees, and it holds rather than fights.
        owned.extend(foreign);
        owned
    }

    /// `config` with `actions` applied to vessel's routes, everything else as it was.
    /// Also the hosts whose upserts were refused (a foreign route claims them).
    fn merged(
        &self,
        config: Value,
        actions: &[&RouteAction],
    ) -> Result<(Value, BTreeSet<String>), CaddyError> {
        let mut config = match config {
            Value::Null => Value::Object(Map::new()),
            Value::Object(m) => Value::Object(m),
            _ => return Err(CaddyError::NotObject("the whole".into())),
        };
        let servers = object_at(&mut config, &["apps", "http", "servers"])?;
        if !servers.contains_key(&self.server) {
            if self.listen.is_empty() {
                return Err(CaddyError::NoServer(self.server.clone()));
            }
            servers.insert(
                self.server.clone(),
                // Plain HTTP: Caddy would otherwise take a listener with host matchers for an
                // HTTPS one. A server that needs TLS is one to define in Caddy's own config.
                json!({"listen": self.listen, "automatic_https": {"disable": true}, "routes": []}),
            );
        }
        let server = servers
            .get_mut(&self.server)
            .and_then(Value::as_object_mut)
            .ok_or_else(|| CaddyError::NotObject(format!("server `{}`", self.server)))?;
        let routes = match server.remove("routes") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a,
            Some(_) => return Err(CaddyError::RoutesNotList(self.server.clone())),
        };
        // Vessel's routes by (wildcard last, host, longest path first); foreign ones in their
        // order.
        let mut ours: BTreeMap<Order, Value> = BTreeMap::new();
        let mut others = Vec::new();
        for r in routes {
            let at = r
                .get("@id")
                .and_then(Value::as_str)
                .and_then(|t| parse_route_tag(&self.prefix, t))
                .map(|t| key(t.host, t.path.as_deref()));
            match at {
                Some(k) => {
                    ours.insert(k, r);
                }
                None => others.push(r),
            }
        }
        // Hosts a foreign route claims: vessel neither adds a route for one nor keeps its own
        // (which, being first, would hide the foreign one).
        let foreign: BTreeSet<String> = others.iter().flat_map(hosts).collect();
        let mut refused = BTreeSet::new();
        for a in actions {
            let (host, path) = (a.host(), a.path());
            match a.after() {
                Some(_) if foreign.contains(&host.to_ascii_lowercase()) => {
                    refused.insert(host.to_string());
                }
                Some(r) => {
                    let route = self.route(&Want {
                        host,
                        path,
                        strip_prefix: r.strip_prefix,
                        upstream: &r.upstream,
                        session: r.session.as_deref().unwrap_or_default(),
                        route: r.route.as_deref(),
                    });
                    ours.insert(key(host, path), route);
                }
                None => {
                    ours.remove(&key(host, path));
                }
            }
        }
        ours.retain(|(_, h, _, _), _| !foreign.contains(h));
        // Leading foreign routes that only add behaviour to every request (authentication,
        // headers, ...) and match everything stay in front of vessel's; everything else goes
        // after them.
        let lead = others.iter().take_while(|r| is_middleware(r)).count();
        let rest = others.split_off(lead);
        let mut all = others;
        all.extend(ours.into_values());
        all.extend(rest);
        server.insert("routes".into(), Value::Array(all));
        Ok((config, refused))
    }

    /// The hosts whose upserts were refused, on success.
    async fn apply_batch(&self, actions: &[&RouteAction]) -> Result<BTreeSet<String>, CaddyError> {
        let _guard = self.lock.lock().await;
        for _ in 0..TRIES {
            let (config, etag) = self.read().await?;
            // Without it the write could overwrite a change made since the read.
            let etag = etag.ok_or(CaddyError::NoEtag)?;
            let (new, refused) = self.merged(config, actions)?;
            let r = self.write(&new, &etag).await?;
            match r.status {
                200 => return Ok(refused),
                // Someone else changed the config since it was read: read it again.
                412 => continue,
                status => {
                    return Err(CaddyError::Refused {
                        status,
                        body: r.brief(),
                    });
                }
            }
        }
        Err(CaddyError::Raced(TRIES))
    }
}

/// A route that matches every request and whose handlers only add behaviour to it
/// (authentication, headers and the like) rather than answer it.
fn is_middleware(route: &Value) -> bool {
    const ADDS: &[&str] = &[
        "authentication",
        "headers",
        "encode",
        "vars",
        "map",
        "rewrite",
        "request_body",
        "tracing",
        "log_append",
    ];
    route.get("match").is_none()
        && route.get("terminal") != Some(&Value::Bool(true))
        && route
            .get("handle")
            .and_then(Value::as_array)
            .is_some_and(|h| {
                !h.is_empty()
                    && h.iter().all(|x| {
                        x.get("handler")
                            .and_then(Value::as_str)
                            .is_some_and(|n| ADDS.contains(&n))
                    })
            })
}

/// Where one of vessel's routes goes among them: (wildcard, host, longest path first, path).
type Order = (bool, String, std::cmp::Reverse<usize>, String);

fn key(host: &str, path: Option<&str>) -> Order {
    let path = path.unwrap_or("");
    (
        host.starts_with("*."),
        host.to_ascii_lowercase(),
        std::cmp::Reverse(path.len()),
        path.to_string(),
    )
}

/// One of vessel's routes, as it is written.
struct Want<'a> {
    host: &'a str,
    path: Option<&'a str>,
    strip_prefix: bool,
    upstream: &'a str,
    session: &'a str,
    route: Option<&'a str>,
}

/// Does a route take its path prefix off (a `rewrite` handler that strips one)?
fn strips(route: &Value) -> bool {
    route
        .get("handle")
        .and_then(Value::as_array)
        .is_some_and(|h| {
            h.iter()
                .any(|x| x.get("handler").and_then(Value::as_str) == Some("rewrite"))
        })
}

/// The object at `path` inside `v`, created (empty) where missing.
fn object_at<'a>(
    v: &'a mut Value,
    path: &[&str],
) -> Result<&'a mut Map<String, Value>, CaddyError> {
    let mut cur = v;
    for (i, p) in path.iter().enumerate() {
        let map = cur
            .as_object_mut()
            .ok_or_else(|| CaddyError::NotObject(format!("`{}`", path[..i].join("."))))?;
        let next = map
            .entry(p.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        if next.is_null() {
            *next = Value::Object(Map::new());
        }
        cur = next;
    }
    cur.as_object_mut()
        .ok_or_else(|| CaddyError::NotObject(format!("`{}`", path.join("."))))
}

fn server_routes<'a>(config: &'a Value, server: &str) -> &'a [Value] {
    config
        .get("apps")
        .and_then(|v| v.get("http"))
        .and_then(|v| v.get("servers"))
        .and_then(|v| v.get(server))
        .and_then(|v| v.get("routes"))
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

/// The first upstream a route's `reverse_proxy` handler dials.
fn dial(route: &Value) -> Option<String> {
    route
        .get("handle")?
        .as_array()?
        .iter()
        .find(|h| h.get("handler").and_then(Value::as_str) == Some("reverse_proxy"))?
        .get("upstreams")?
        .as_array()?
        .first()?
        .get("dial")?
        .as_str()
        .map(str::to_string)
}

/// The hosts a route matches, lower-cased.
fn hosts(route: &Value) -> Vec<String> {
    let mut out: Vec<String> = route
        .get("match")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|m| m.get("host").and_then(Value::as_array))
        .flatten()
        .filter_map(Value::as_str)
        .map(str::to_ascii_lowercase)
        .collect();
    out.sort();
    out.dedup();
    out
}

impl ProxyProvider for Caddy {
    fn observe(&self) -> BoxFut<'_, Result<Vec<ObservedRoute>, ProviderError>> {
        Box::pin(async move {
            let (config, _) = self
                .read()
                .await
                .map_err(|e| ProviderError::caused("read the config of", "Caddy", Arc::new(e)))?;
            Ok(self.observed(&config))
        })
    }

    fn apply<'a>(
        &'a self,
        actions: &'a [&'a RouteAction],
    ) -> BoxFut<'a, Vec<Result<(), ProviderError>>> {
        Box::pin(async move {
            let routes: Vec<&RouteAction> = actions.to_vec();
            let outcome = if routes.is_empty() {
                Ok(BTreeSet::new())
            } else {
                self.apply_batch(&routes).await
            };
            let (refused, outcome) = match outcome {
                Ok(refused) => (refused, Ok(())),
                Err(e) => {
                    let e: Arc<dyn std::error::Error + Send + Sync> = Arc::new(e);
                    (BTreeSet::new(), Err(e))
                }
            };
            let mut results = route_batch_results(actions, outcome);
            for (a, r) in actions.iter().zip(results.iter_mut()) {
                let host = a.host();
                if a.after().is_some() && refused.contains(host) {
                    *r = Err(ProviderError::caused(
                        "route",
                        host,
                        Arc::new(CaddyError::Foreign),
                    ));
                }
            }
            results
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caddy() -> Caddy {
        Caddy::new(
            "http://127.0.0.1:2019",
            "srv",
            &[":8080".into()],
            "vessel",
            None,
        )
        .expect("caddy")
    }

    fn upsert(host: &str, upstream: &str) -> RouteAction {
        RouteAction::UpsertRoute {
            host: host.into(),
            path: None,
            strip_prefix: false,
            upstream: upstream.into(),
            session: "alice".into(),
            port: "ide".into(),
            route: None,
            upstream_from: None,
        }
    }

    #[test]
    fn merging_touches_only_vessels_routes() {
        let c = caddy();
        let foreign = json!({"@id": "mine", "match": [{"host": ["shop.example"]}], "handle": [{"handler": "static_response", "body": "hi"}]});
        let config = json!({
            "admin": {"listen": "127.0.0.1:2999"},
            "apps": {"http": {"servers": {"srv": {"listen": [":9999"], "routes": [foreign.clone()]}}}},
            "logging": {"logs": {"default": {"level": "ERROR"}}},
        });
        let a = upsert("*.b.localhost", "127.0.0.1:2");
        let b = upsert("a.localhost", "127.0.0.1:1");
        let (new, refused) = c.merged(config.clone(), &[&a, &b]).expect("merge");
        assert!(refused.is_empty());
        let routes = server_routes(&new, "srv");
        assert_eq!(routes.len(), 3);
        assert_eq!(hosts(&routes[0]), ["a.localhost"], "specific hosts first");
        assert_eq!(hosts(&routes[1]), ["*.b.localhost"]);
        assert_eq!(routes[2], foreign, "the foreign route is as it was");
        assert_eq!(new["admin"], config["admin"]);
        assert_eq!(new["logging"], config["logging"]);
        assert_eq!(
            new["apps"]["http"]["servers"]["srv"]["listen"],
            json!([":9999"])
        );

        let observed = c.observed(&new);
        assert_eq!(observed.len(), 3);
        assert!(observed[0].owned && observed[0].upstream == "127.0.0.1:1");
        assert!(!observed[2].owned && observed[2].host == "shop.example");

        let gone = c
            .merged(
                new,
                &[&RouteAction::RemoveRoute {
                    host: "a.localhost".into(),
                    path: None,
                }],
            )
            .expect("merge")
            .0;
        assert_eq!(server_routes(&gone, "srv").len(), 2);
    }

    #[test]
    fn an_empty_config_gets_the_server_and_a_hand_edit_reads_as_drift() {
        let c = caddy();
        let new = c
            .merged(Value::Null, &[&upsert("a.localhost", "127.0.0.1:1")])
            .expect("merge")
            .0;
        assert_eq!(
            new["apps"]["http"]["servers"]["srv"]["listen"],
            json!([":8080"])
        );
        let mut edited = new.clone();
        edited["apps"]["http"]["servers"]["srv"]["routes"][0]["terminal"] = json!(false);
        assert_eq!(c.observed(&new)[0].upstream, "127.0.0.1:1");
        assert_ne!(c.observed(&edited)[0].upstream, "127.0.0.1:1");

        let no_listen =
            Caddy::new("http://127.0.0.1:2019", "srv", &[], "vessel", None).expect("caddy");
        assert!(no_listen.merged(Value::Null, &[]).is_err());
    }

    #[test]
    fn a_host_a_foreign_route_claims_is_left_to_it_and_leading_middleware_stays_first() {
        let c = caddy();
        let auth = json!({"handle": [{"handler": "authentication", "providers": {}}]});
        let theirs = json!({"match": [{"host": ["taken.localhost"]}], "handle": [{"handler": "static_response"}]});
        let config = json!({"apps": {"http": {"servers": {"srv": {"listen": [":1"], "routes": [auth.clone(), theirs.clone()]}}}}});
        let (new, refused) = c
            .merged(
                config,
                &[
                    &upsert("taken.localhost", "127.0.0.1:1"),
                    &upsert("free.localhost", "127.0.0.1:2"),
                ],
            )
            .expect("merge");
        assert_eq!(refused, BTreeSet::from(["taken.localhost".to_string()]));
        let routes = server_routes(&new, "srv");
        assert_eq!(routes.len(), 3);
        assert_eq!(
            routes[0], auth,
            "authentication still runs first for every host"
        );
        assert_eq!(hosts(&routes[1]), ["free.localhost"]);
        assert_eq!(routes[2], theirs);
    }
}
