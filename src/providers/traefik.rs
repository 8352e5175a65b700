//! The `traefik` proxy provider, through Traefik's file provider.
//!
//! vessel owns one dynamic-configuration file (YAML) in a directory Traefik watches: for each
//! route a router (`Host(...)` rule) and a load-balancer service of the same name,
//! `<prefix>_<session>_<route>_<host>`. The file is replaced atomically (a temporary file,
//! then a rename), so Traefik never reads half of it. Observe reads it back.
//!
//! The file is vessel's alone: anything in it vessel would not write (another router, a
//! middleware, an unknown key) makes the provider unobservable, so the planner changes
//! nothing there rather than overwrite what someone put in. Rules use Traefik v3 syntax.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::observed::ObservedRoute;
use crate::planner::Action;

use super::{
    BoxFut, ProviderError, ProxyProvider, parse_route_tag, route_batch_results, route_tag,
};

pub struct Traefik {
    file: PathBuf,
    entrypoints: Vec<String>,
    prefix: String,
    /// Serialises read-modify-write of the file.
    lock: tokio::sync::Mutex<()>,
}

/// The part of Traefik's dynamic configuration vessel writes.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DynamicConfig {
    #[serde(default)]
    pub http: Http,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Http {
    #[serde(default)]
    pub routers: BTreeMap<String, Router>,
    #[serde(default)]
    pub services: BTreeMap<String, Service>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Router {
    pub rule: String,
    pub service: String,
    /// Exact hosts rank above every wildcard (Traefik otherwise ranks by rule length, and a
    /// wildcard's regexp is the longer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u64>,
    #[serde(rename = "entryPoints", default, skip_serializing_if = "Vec::is_empty")]
    pub entry_points: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    #[serde(rename = "loadBalancer")]
    pub load_balancer: LoadBalancer,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadBalancer {
    pub servers: Vec<Server>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Server {
    pub url: String,
}

/// The Traefik v3 rule that matches `host` (a `*.` wildcard matches one label).
pub fn rule(host: &str) -> String {
    match host.strip_prefix("*.") {
        Some(rest) => format!("HostRegexp(`^[^.]+\\.{}$`)", rest.replace('.', "\\.")),
        None => format!("Host(`{host}`)"),
    }
}

/// Added to an exact host's router priority: above any wildcard rule's length.
const EXACT_PRIORITY: u64 = 10_000;

/// A route vessel keeps in the file: host -> (session, route, upstream).
type Routes = BTreeMap<String, (String, Option<String>, String)>;

impl Traefik {
    pub fn new(file: PathBuf, entrypoints: &[String], prefix: &str) -> Result<Traefik, String> {
        if prefix.is_empty() || prefix.contains('_') || prefix.contains('@') {
            return Err(format!(
                "the traefik `name_prefix` `{prefix}` must be non-empty and without `_` or `@`"
            ));
        }
        Ok(Traefik {
            file,
            entrypoints: entrypoints.to_vec(),
            prefix: prefix.to_string(),
            lock: tokio::sync::Mutex::new(()),
        })
    }

    fn read(&self) -> Result<DynamicConfig, String> {
        let text = match std::fs::read_to_string(&self.file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Default::default()),
            Err(e) => return Err(format!("cannot read {}: {e}", self.file.display())),
        };
        if text.trim().is_empty() {
            return Ok(Default::default());
        }
        serde_saphyr::from_str(&text).map_err(|e| {
            format!(
                "{} holds something vessel did not write, and vessel owns that file alone: {e}",
                self.file.display()
            )
        })
    }

    /// The file's routes; an entry vessel would not have written is an error.
    fn routes(&self, c: &DynamicConfig) -> Result<Routes, String> {
        let mut out = Routes::new();
        for (name, router) in &c.http.routers {
            let alien = || {
                format!(
                    "router `{name}` in {} is not one vessel wrote, and vessel owns that file alone",
                    self.file.display()
                )
            };
            let (session, route, host) = parse_route_tag(&self.prefix, name).ok_or_else(alien)?;
            let service = c.http.services.get(name).ok_or_else(alien)?;
            let upstream = match service.load_balancer.servers.as_slice() {
                [s] => s.url.strip_prefix("http://").unwrap_or(&s.url).to_string(),
                _ => String::new(),
            };
            // Anything edited by hand reads as drifted, so the next pass rewrites it.
            let upstream =
                if *router == self.router(name, host) && *service == service_for(&upstream) {
                    upstream
                } else {
                    format!("{upstream} (edited outside vessel)")
                };
            out.insert(
                host.to_string(),
                (session.to_string(), route.map(str::to_string), upstream),
            );
        }
        if let Some(name) = c
            .http
            .services
            .keys()
            .find(|n| !c.http.routers.contains_key(*n))
        {
            return Err(format!(
                "service `{name}` in {} is not one vessel wrote, and vessel owns that file alone",
                self.file.display()
            ));
        }
        Ok(out)
    }

    fn router(&self, name: &str, host: &str) -> Router {
        let rule = rule(host);
        Router {
            priority: Some(if host.starts_with("*.") {
                rule.len() as u64
            } else {
                EXACT_PRIORITY + rule.len() as u64
            }),
            rule,
            service: name.to_string(),
            entry_points: self.entrypoints.clone(),
        }
    }

    /// The file for `routes`.
    pub fn render(&self, routes: &Routes) -> DynamicConfig {
        let mut c = DynamicConfig::default();
        for (host, (session, route, upstream)) in routes {
            let name = route_tag(&self.prefix, session, route.as_deref(), host);
            c.http
                .routers
                .insert(name.clone(), self.router(&name, host));
            c.http.services.insert(name, service_for(upstream));
        }
        c
    }

    fn apply_batch(&self, actions: &[&Action]) -> Result<(), String> {
        let mut routes = self.routes(&self.read()?)?;
        for (host, after) in actions.iter().filter_map(|a| a.route_after()) {
            match after {
                Some(r) => routes.insert(
                    host.to_string(),
                    (r.session.unwrap_or_default(), r.route, r.upstream),
                ),
                None => routes.remove(host),
            };
        }
        let text = serde_saphyr::to_string(&self.render(&routes))
            .map_err(|e| format!("cannot write the routes as YAML: {e}"))?;
        let text = format!(
            "# Written by vessel: edits here are overwritten, and anything added makes vessel stop changing this file.\n{text}"
        );
        super::write_atomically(&self.file, text.as_bytes())
            .map_err(|e| format!("cannot write {}: {e}", self.file.display()))
    }
}

fn service_for(upstream: &str) -> Service {
    Service {
        load_balancer: LoadBalancer {
            servers: vec![Server {
                url: format!("http://{upstream}"),
            }],
        },
    }
}

impl ProxyProvider for Traefik {
    fn observe(&self) -> BoxFut<'_, Result<Vec<ObservedRoute>, ProviderError>> {
        let result = self
            .read()
            .and_then(|c| self.routes(&c))
            .map(|routes| {
                routes
                    .into_iter()
                    .map(|(host, (session, route, upstream))| ObservedRoute {
                        host,
                        upstream,
                        owned: true,
                        session: Some(session),
                        route,
                    })
                    .collect()
            })
            .map_err(|m| ProviderError::failed("read", "the Traefik file", m));
        Box::pin(async move { result })
    }

    fn apply<'a>(
        &'a self,
        actions: &'a [&'a Action],
    ) -> BoxFut<'a, Vec<Result<(), ProviderError>>> {
        Box::pin(async move {
            let _guard = self.lock.lock().await;
            let outcome = self.apply_batch(actions);
            route_batch_results(actions, outcome)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules() {
        assert_eq!(rule("a.localhost"), "Host(`a.localhost`)");
        assert_eq!(
            rule("*.dev.example"),
            "HostRegexp(`^[^.]+\\.dev\\.example$`)"
        );
    }

    #[test]
    fn exact_hosts_outrank_wildcards() {
        let t = Traefik::new(PathBuf::from("f.yml"), &[], "vessel").expect("provider");
        let wild = t.router("w", "*.dev.example");
        let exact = t.router("e", "a-very-long-session-name.dev.example");
        assert!(exact.priority > wild.priority, "{exact:?} {wild:?}");
    }
}
