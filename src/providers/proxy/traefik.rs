//! The `traefik` proxy provider, through Traefik's file provider.
//!
//! vessel owns one dynamic-configuration file (YAML) in a directory Traefik watches: for each
//! route a router (`Host(...)` rule, with `Path`/`PathPrefix` on whole segments for a route
//! with a path prefix) and a load-balancer service of the same name,
//! `<prefix>_<session>_<route>_<host>` (`route_tag`), and for a route that strips its prefix a
//! `stripPrefix` middleware of that name too. The file is replaced atomically (a temporary file in
//! `.vessel-tmp/` beside it, then a rename), so Traefik never reads half of it and sees one
//! change per write. Observe reads it back.
//!
//! The file is vessel's alone: anything in it vessel would not write (another router, a
//! middleware, an unknown key) makes the provider unobservable, so the planner changes
//! nothing there rather than overwrite what someone put in. Rules use Traefik v3 syntax.
//!
//! Traefik reloads the file by itself (its watcher, then at most one change per
//! `providersThrottleDuration`, 2 s by default), so a replaced file is not yet a served route.
//! With `api` configured (Traefik's API on a loopback entry point), a batch counts as done only
//! once `/api/rawdata` shows each of its routers as written (same rule, same server URL) and
//! enabled, and each removed router gone, within `confirm_within`; a router Traefik refuses
//! (an unknown entry point, say) fails its step with Traefik's own error. Observe then also
//! asks the API, and a route Traefik has not loaded or has refused reads as drifted, so the
//! next pass repairs it (or fails it again, visibly). Without `api`, a write counts as done
//! once the file is replaced, and Traefik's answer is not checked.
//!
//! This module must not touch anything but its own file: other files in the directory, and
//! whatever else Traefik serves, are someone else's.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use serde::{Deserialize, Serialize};

use super::TraefikConfig;
use crate::model::observed::ObservedRoute;
use crate::model::plan::RouteAction;

use super::{BoxFut, ProviderError, ProxyProvider, parse_route_tag, route_tag};
use crate::http_client::{Api, HttpError, Limits};

/// How often a write asks Traefik's API whether it has loaded the file.
const POLL: Duration = Duration::from_millis(50);
/// The directory beside vessel's file that holds a write's temporary file.
const TMP_DIR: &str = ".vessel-tmp";
/// The bound on observe's one question to Traefik's API.
const OBSERVE_API_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Traefik {
    file: PathBuf,
    entrypoints: Vec<String>,
    prefix: String,
    /// Traefik's API, when configured.
    api: Option<Api>,
    confirm_within: Duration,
    /// Serialises read-modify-write of the file.
    lock: tokio::sync::Mutex<()>,
}

/// Why the traefik provider could not do something. Display names the operation and the
/// object; the cause is in `source`.
#[derive(Debug, thiserror::Error)]
pub enum TraefikError {
    #[error("the traefik `name_prefix` `{0}` must be non-empty and without `_` or `@`")]
    Prefix(String),
    #[error("the traefik `api` setting")]
    ApiSetting(#[source] HttpError),
    #[error("cannot read {file}")]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file} holds something vessel did not write, and vessel owns that file alone")]
    Unparsable {
        file: PathBuf,
        #[source]
        source: Box<serde_saphyr::Error>,
    },
    #[error("{what} in {file} is not one vessel wrote, and vessel owns that file alone")]
    Foreign { file: PathBuf, what: String },
    #[error("cannot write the routes as YAML")]
    Render(#[source] serde_saphyr::SerializeError),
    #[error("cannot write {file}")]
    Write {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Traefik's API at {addr}")]
    Api {
        addr: String,
        #[source]
        source: HttpError,
    },
    #[error("Traefik's API at {addr} answered {status} to /api/rawdata: {body}")]
    ApiStatus {
        addr: String,
        status: u16,
        body: String,
    },
    #[error("Traefik's API at {addr} answered /api/rawdata with something vessel cannot read")]
    ApiBody {
        addr: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("Traefik refused router `{router}`: {errors}")]
    Refused { router: String, errors: String },
    #[error(
        "Traefik did not load router `{router}` within {} ms (Traefik's log says why: its file provider may not watch this file's directory, a file it cannot read is skipped whole, and a router of the same name in another file makes it drop both)",
        .within.as_millis()
    )]
    NotLoaded { router: String, within: Duration },
    #[error(
        "Traefik still had router `{router}` {} ms after vessel removed it (Traefik's log says why)",
        .within.as_millis()
    )]
    NotRemoved { router: String, within: Duration },
    #[error("Traefik's API gave no answer within {} ms", .within.as_millis())]
    NoAnswer {
        within: Duration,
        #[source]
        last: Option<Box<TraefikError>>,
    },
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
    /// Never written empty: Traefik refuses a whole file with an empty map in it ("routers
    /// cannot be a standalone element") and keeps serving what it had before.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub routers: BTreeMap<String, Router>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub services: BTreeMap<String, Service>,
    /// Only the placeholder, in a file without routes (see `placeholder`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub middlewares: BTreeMap<String, Middleware>,
}

/// A middleware vessel writes: the placeholder (a chain of none, `Middleware::default`) or a
/// route's `stripPrefix`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Middleware {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain: Option<Chain>,
    #[serde(
        rename = "stripPrefix",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub strip_prefix: Option<StripPrefix>,
}

impl Default for Middleware {
    /// The placeholder: a chain of none, which does nothing.
    fn default() -> Self {
        Middleware {
            chain: Some(Chain::default()),
            strip_prefix: None,
        }
    }
}

impl Middleware {
    /// Take `prefix` off the request's path (Traefik keeps a leading `/` and the query).
    fn strip(prefix: &str) -> Middleware {
        Middleware {
            chain: None,
            strip_prefix: Some(StripPrefix {
                prefixes: vec![prefix.to_string()],
            }),
        }
    }
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StripPrefix {
    pub prefixes: Vec<String>,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Chain {
    pub middlewares: Vec<String>,
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
    /// The route's `stripPrefix` middleware, for one that strips its prefix.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub middlewares: Vec<String>,
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

/// The Traefik v3 rule that matches `host` (a `*.` wildcard matches one label), and with a
/// path prefix, the prefix and everything under it (whole segments).
pub fn rule(host: &str, path: Option<&str>) -> String {
    let host = match host.strip_prefix("*.") {
        Some(rest) => format!("HostRegexp(`^[^.]+\\.{}$`)", rest.replace('.', "\\.")),
        None => format!("Host(`{host}`)"),
    };
    match path {
        None => host,
        Some(p) => format!("{host} && (Path(`{p}`) || PathPrefix(`{p}/`))"),
    }
}

/// Added to an exact host's router priority: above any wildcard rule's length.
const EXACT_PRIORITY: u64 = 10_000;

/// The routes vessel keeps in the file, by key (host, or `host/path`).
type Routes = BTreeMap<String, Kept>;

/// One route vessel keeps in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct Kept {
    pub session: String,
    pub route: Option<String>,
    pub upstream: String,
    pub strip_prefix: bool,
}

/// What one step's route should look like in Traefik once it has loaded the file. Router
/// names are without Traefik's `@file`.
enum Expected {
    Loaded {
        router: String,
        rule: String,
        url: String,
    },
    Gone {
        router: String,
    },
}

impl Traefik {
    pub fn new(c: &TraefikConfig) -> Result<Traefik, TraefikError> {
        let prefix = &c.name_prefix;
        if prefix.is_empty() || prefix.contains('_') || prefix.contains('@') {
            return Err(TraefikError::Prefix(prefix.clone()));
        }
        let api = match &c.api {
            Some(a) => Some(
                Api::new(a, "Traefik API", c.tls.as_ref(), Limits::default())
                    .map_err(TraefikError::ApiSetting)?,
            ),
            None => None,
        };
        Ok(Traefik {
            file: c.file.clone(),
            entrypoints: c.entrypoints.clone(),
            prefix: prefix.clone(),
            api,
            confirm_within: c.confirm_within.std(),
            lock: tokio::sync::Mutex::new(()),
        })
    }

    fn read(&self) -> Result<DynamicConfig, TraefikError> {
        let text = match std::fs::read_to_string(&self.file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Default::default()),
            Err(source) => {
                return Err(TraefikError::Read {
                    file: self.file.clone(),
                    source,
                });
            }
        };
        if text.trim().is_empty() {
            return Ok(Default::default());
        }
        serde_saphyr::from_str(&text).map_err(|source| TraefikError::Unparsable {
            file: self.file.clone(),
            source: Box::new(source),
        })
    }

    /// The file's routes; an entry vessel would not have written is an error.
    fn routes(&self, c: &DynamicConfig) -> Result<Routes, TraefikError> {
        let foreign = |what: String| TraefikError::Foreign {
            file: self.file.clone(),
            what,
        };
        let mut out = Routes::new();
        // The `stripPrefix` middlewares vessel's routers use, by name.
        let mut strips = std::collections::BTreeSet::new();
        for (name, router) in &c.http.routers {
            let alien = || foreign(format!("router `{name}`"));
            let t = parse_route_tag(&self.prefix, name).ok_or_else(alien)?;
            let path = t.path.as_deref();
            let service = c.http.services.get(name).ok_or_else(alien)?;
            let upstream = match service.load_balancer.servers.as_slice() {
                [s] => s.url.strip_prefix("http://").unwrap_or(&s.url).to_string(),
                _ => String::new(),
            };
            let strip_prefix = path.is_some() && !router.middlewares.is_empty();
            let strip_ok = match path.filter(|_| strip_prefix) {
                Some(p) => {
                    strips.insert(name.as_str());
                    c.http.middlewares.get(name) == Some(&Middleware::strip(p))
                }
                None => true,
            };
            // Anything edited by hand reads as drifted, so the next pass rewrites it.
            let upstream = if *router == self.router(name, t.host, path, strip_prefix)
                && *service == service_for(&upstream)
                && strip_ok
            {
                upstream
            } else {
                format!("{upstream} (edited outside vessel)")
            };
            out.insert(
                crate::model::route_key(t.host, path),
                Kept {
                    session: t.session.to_string(),
                    route: t.route.map(str::to_string),
                    upstream,
                    strip_prefix,
                },
            );
        }
        if let Some(name) = c
            .http
            .services
            .keys()
            .find(|n| !c.http.routers.contains_key(*n))
        {
            return Err(foreign(format!("service `{name}`")));
        }
        if let Some((name, _)) = c.http.middlewares.iter().find(|(n, m)| {
            let placeholder = **n == self.placeholder() && **m == Middleware::default();
            let strip = strips.contains(n.as_str()) && m.strip_prefix.is_some();
            !(placeholder || strip)
        }) {
            return Err(foreign(format!("middleware `{name}`")));
        }
        Ok(out)
    }

    /// The router of route `name`. On one host a longer path prefix makes a longer rule, and
    /// so a higher priority: the longest matching prefix wins.
    fn router(&self, name: &str, host: &str, path: Option<&str>, strip_prefix: bool) -> Router {
        let rule = rule(host, path);
        Router {
            priority: Some(if host.starts_with("*.") {
                rule.len() as u64
            } else {
                EXACT_PRIORITY + rule.len() as u64
            }),
            rule,
            service: name.to_string(),
            entry_points: self.entrypoints.clone(),
            middlewares: if strip_prefix && path.is_some() {
                vec![name.to_string()]
            } else {
                Vec::new()
            },
        }
    }

    /// The name of the middleware a file without routes holds. Traefik skips a provider's
    /// configuration when it is empty (and refuses `http: {}` or an empty `routers:`), and
    /// keeps serving the one before, so a file emptied of its last route would leave that
    /// route served; an unused middleware that does nothing keeps the configuration
    /// non-empty. Its name is not a route tag (one `_`).
    fn placeholder(&self) -> String {
        format!("{}_placeholder", self.prefix)
    }

    /// The file for `routes`.
    pub fn render(&self, routes: &Routes) -> DynamicConfig {
        let mut c = DynamicConfig::default();
        if routes.is_empty() {
            c.http
                .middlewares
                .insert(self.placeholder(), Middleware::default());
        }
        for (key, r) in routes {
            let (host, path) = crate::model::split_route_key(key);
            let name = route_tag(&self.prefix, &r.session, r.route.as_deref(), host, path);
            let router = self.router(&name, host, path, r.strip_prefix);
            if let (Some(p), true) = (path, r.strip_prefix) {
                c.http
                    .middlewares
                    .insert(name.clone(), Middleware::strip(p));
            }
            c.http.routers.insert(name.clone(), router);
            c.http.services.insert(name, service_for(&r.upstream));
        }
        c
    }

    /// Write the file with `actions` applied; what each step's route should then look like in
    /// Traefik, by host.
    fn write_batch(
        &self,
        actions: &[&RouteAction],
    ) -> Result<BTreeMap<String, Expected>, TraefikError> {
        let mut routes = self.routes(&self.read()?)?;
        let mut expected = BTreeMap::new();
        for a in actions {
            let (host, path, key) = (a.host(), a.path(), a.key());
            let before = routes.remove(&key);
            let e = match (a.after(), before) {
                (Some(r), _) => {
                    let session = r.session.unwrap_or_default();
                    let e = Expected::Loaded {
                        router: route_tag(&self.prefix, &session, r.route.as_deref(), host, path),
                        rule: rule(host, path),
                        url: service_url(&r.upstream),
                    };
                    let kept = Kept {
                        session,
                        route: r.route,
                        upstream: r.upstream,
                        strip_prefix: r.strip_prefix,
                    };
                    routes.insert(key.clone(), kept);
                    e
                }
                (None, Some(k)) => Expected::Gone {
                    router: route_tag(&self.prefix, &k.session, k.route.as_deref(), host, path),
                },
                // Removing what the file does not have: nothing for Traefik to do.
                (None, None) => continue,
            };
            expected.insert(key, e);
        }
        let text = serde_saphyr::to_string(&self.render(&routes)).map_err(TraefikError::Render)?;
        let text = format!(
            "# Written by vessel: edits here are overwritten, and anything added makes vessel stop changing this file.\n{text}"
        );
        let write = |source| TraefikError::Write {
            file: self.file.clone(),
            source,
        };
        let tmp = self.tmp_dir().map_err(write)?;
        crate::providers::write_atomically_from(&self.file, text.as_bytes(), &tmp)
            .map_err(write)?;
        Ok(expected)
    }

    /// Where the temporary file of a write goes: `.vessel-tmp/` beside the file (made on
    /// the first write). Traefik's file provider reloads its directory on every event in it
    /// and then waits out `providersThrottleDuration` (2 s) before the next reload, so a
    /// temporary file beside vessel's would make each write wait 2 s behind a reload of the
    /// old file; the watch does not reach into subdirectories, so only the rename is seen.
    fn tmp_dir(&self) -> std::io::Result<PathBuf> {
        let dir = crate::providers::parent_dir(&self.file).join(TMP_DIR);
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => Ok(dir),
            Ok(_) => Err(std::io::Error::other(format!(
                "{} is not a directory (vessel keeps its temporary files there)",
                dir.display()
            ))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir(&dir)?;
                Ok(dir)
            }
            Err(e) => Err(e),
        }
    }

    /// Wait until Traefik's API shows every step of the batch as loaded (or refused), within
    /// `confirm_within`: one result per host.
    async fn confirm(
        &self,
        api: &Api,
        mut pending: BTreeMap<String, Expected>,
    ) -> BTreeMap<String, Result<(), Arc<TraefikError>>> {
        let start = tokio::time::Instant::now();
        let deadline = start + self.confirm_within;
        let mut done = BTreeMap::new();
        let mut last_error = None;
        loop {
            match tokio::time::timeout_at(deadline, raw_data(api)).await {
                Ok(Ok(raw)) => {
                    last_error = None;
                    pending.retain(|host, e| {
                        let outcome = match e {
                            Expected::Gone { router } if raw.has(router) => return true,
                            Expected::Gone { .. } => Ok(()),
                            Expected::Loaded { router, rule, url } => {
                                match raw.seen(router, rule, url) {
                                    Seen::NotYet => return true,
                                    Seen::Serving => Ok(()),
                                    Seen::Refused(errors) => Err(Arc::new(TraefikError::Refused {
                                        router: router.clone(),
                                        errors,
                                    })),
                                }
                            }
                        };
                        done.insert(host.clone(), outcome);
                        false
                    });
                }
                Ok(Err(e)) => last_error = Some(e),
                Err(_) => break,
            }
            if pending.is_empty() || tokio::time::Instant::now() + POLL >= deadline {
                break;
            }
            tokio::time::sleep(POLL).await;
        }
        let within = start.elapsed();
        let last_error = last_error.map(|e| {
            Arc::new(TraefikError::NoAnswer {
                within,
                last: Some(Box::new(e)),
            })
        });
        for (host, e) in pending {
            let err = match (&last_error, e) {
                (Some(shared), _) => shared.clone(),
                (None, Expected::Loaded { router, .. }) => {
                    Arc::new(TraefikError::NotLoaded { router, within })
                }
                (None, Expected::Gone { router }) => {
                    Arc::new(TraefikError::NotRemoved { router, within })
                }
            };
            done.insert(host, Err(err));
        }
        done
    }

    /// The routes in the file; with `api`, those Traefik has not loaded as written, or has
    /// refused, read as drifted.
    async fn observed(&self) -> Result<Vec<ObservedRoute>, TraefikError> {
        let routes = self.routes(&self.read()?)?;
        let raw = match &self.api {
            Some(api) => Some(
                tokio::time::timeout(OBSERVE_API_TIMEOUT, raw_data(api))
                    .await
                    .map_err(|_| TraefikError::NoAnswer {
                        within: OBSERVE_API_TIMEOUT,
                        last: None,
                    })??,
            ),
            None => None,
        };
        Ok(routes
            .into_iter()
            .map(|(key, k)| {
                let (host, path) = crate::model::split_route_key(&key);
                let name = route_tag(&self.prefix, &k.session, k.route.as_deref(), host, path);
                let upstream = k.upstream;
                let seen = raw
                    .as_ref()
                    .map(|raw| raw.seen(&name, &rule(host, path), &service_url(&upstream)));
                let upstream = match seen {
                    None | Some(Seen::Serving) => upstream,
                    Some(Seen::Refused(e)) => format!("{upstream} (refused by Traefik: {e})"),
                    Some(Seen::NotYet) => format!("{upstream} (not loaded by Traefik)"),
                };
                ObservedRoute {
                    host: host.to_string(),
                    path: path.map(str::to_string),
                    strip_prefix: k.strip_prefix,
                    upstream,
                    owned: true,
                    session: Some(k.session),
                    route: k.route,
                }
            })
            .collect())
    }
}

fn service_url(upstream: &str) -> String {
    format!("http://{upstream}")
}

fn service_for(upstream: &str) -> Service {
    Service {
        load_balancer: LoadBalancer {
            servers: vec![Server {
                url: service_url(upstream),
            }],
        },
    }
}

/// How far Traefik has taken a router as vessel wrote it.
enum Seen {
    /// Loaded as written, and enabled.
    Serving,
    /// Loaded as written, and refused: Traefik's errors.
    Refused(String),
    /// Not there, or not as written (Traefik has not reloaded the file yet).
    NotYet,
}

/// Traefik's `/api/rawdata`, as far as vessel reads it: the routers and services of the
/// file provider, each kept as JSON until vessel asks about one.
struct RawData {
    routers: serde_json::Map<String, serde_json::Value>,
    services: serde_json::Map<String, serde_json::Value>,
}

impl RawData {
    /// Does Traefik have router `name` from its file provider?
    fn has(&self, name: &str) -> bool {
        self.routers.contains_key(&format!("{name}@file"))
    }

    /// Router `name` (and its service of the same name) against the `rule` and server `url`
    /// vessel wrote.
    fn seen(&self, name: &str, rule: &str, url: &str) -> Seen {
        let key = format!("{name}@file");
        let Some(r) = self.routers.get(&key) else {
            return Seen::NotYet;
        };
        let service = self.services.get(&key);
        if text(r.get("rule")) != Some(rule)
            || text(service.and_then(|s| s.pointer("/loadBalancer/servers/0/url"))) != Some(url)
        {
            return Seen::NotYet;
        }
        let mut errors: Vec<String> = [Some(r), service]
            .into_iter()
            .flatten()
            .filter_map(|v| v.get("error").and_then(serde_json::Value::as_array))
            .flatten()
            .filter_map(|e| e.as_str().map(str::to_string))
            .collect();
        errors.sort();
        errors.dedup();
        if text(r.get("status")) == Some("disabled") && errors.is_empty() {
            errors.push("disabled, without a reason given".into());
        }
        if errors.is_empty() {
            Seen::Serving
        } else {
            Seen::Refused(errors.join("; "))
        }
    }
}

fn text(v: Option<&serde_json::Value>) -> Option<&str> {
    v.and_then(serde_json::Value::as_str)
}

/// One `GET /api/rawdata` from Traefik's API.
async fn raw_data(api: &Api) -> Result<RawData, TraefikError> {
    let addr = api.addr();
    let reply = api
        .call(Method::GET, "/api/rawdata", &[], None)
        .await
        .map_err(|source| TraefikError::Api {
            addr: addr.to_string(),
            source,
        })?;
    if reply.status != 200 {
        return Err(TraefikError::ApiStatus {
            addr: addr.to_string(),
            status: reply.status,
            body: reply.brief(),
        });
    }
    #[derive(Deserialize)]
    struct Wire {
        #[serde(default)]
        routers: Option<serde_json::Map<String, serde_json::Value>>,
        #[serde(default)]
        services: Option<serde_json::Map<String, serde_json::Value>>,
    }
    let wire: Wire =
        serde_json::from_slice(&reply.body).map_err(|source| TraefikError::ApiBody {
            addr: addr.to_string(),
            source,
        })?;
    Ok(RawData {
        routers: wire.routers.unwrap_or_default(),
        services: wire.services.unwrap_or_default(),
    })
}

impl ProxyProvider for Traefik {
    fn observe(&self) -> BoxFut<'_, Result<Vec<ObservedRoute>, ProviderError>> {
        Box::pin(async move {
            self.observed()
                .await
                .map_err(|e| ProviderError::caused("observe", "traefik", Arc::new(e)))
        })
    }

    fn apply<'a>(
        &'a self,
        actions: &'a [&'a RouteAction],
    ) -> BoxFut<'a, Vec<Result<(), ProviderError>>> {
        Box::pin(async move {
            let _guard = self.lock.lock().await;
            let outcomes = match self.write_batch(actions) {
                Err(e) => Err(Arc::new(e)),
                Ok(expected) => Ok(match &self.api {
                    Some(api) => self.confirm(api, expected).await,
                    None => expected.into_keys().map(|h| (h, Ok(()))).collect(),
                }),
            };
            actions
                .iter()
                .map(|a| {
                    let key = a.key();
                    let outcome = match &outcomes {
                        Err(e) => Err(e.clone()),
                        Ok(by_key) => by_key.get(&key).cloned().unwrap_or(Ok(())),
                    };
                    outcome.map_err(|e| ProviderError::caused("route", &key, e))
                })
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(file: &str) -> TraefikConfig {
        TraefikConfig {
            file: PathBuf::from(file),
            entrypoints: Vec::new(),
            name_prefix: "vessel".into(),
            api: None,
            confirm_within: crate::model::Duration::from_secs(1),
            tls: None,
            wake_listen: None,
        }
    }

    #[test]
    fn rules() {
        assert_eq!(rule("a.localhost", None), "Host(`a.localhost`)");
        assert_eq!(
            rule("*.dev.example", None),
            "HostRegexp(`^[^.]+\\.dev\\.example$`)"
        );
        assert_eq!(
            rule("a.localhost", Some("/p/q")),
            "Host(`a.localhost`) && (Path(`/p/q`) || PathPrefix(`/p/q/`))"
        );
    }

    #[test]
    fn a_file_without_routes_holds_only_the_placeholder_and_reads_as_empty() {
        let t = Traefik::new(&config("f.yml")).expect("provider");
        let empty = t.render(&Routes::new());
        assert_eq!(
            empty.http.middlewares.keys().collect::<Vec<_>>(),
            ["vessel_placeholder"]
        );
        assert_eq!(t.routes(&empty).map(|r| r.len()).ok(), Some(0));
        let mut routes = Routes::new();
        routes.insert(
            "a.localhost".into(),
            Kept {
                session: "a".into(),
                route: None,
                upstream: "127.0.0.1:1".into(),
                strip_prefix: false,
            },
        );
        assert!(t.render(&routes).http.middlewares.is_empty());
        // A route that strips its prefix has a middleware of its own, which reads back.
        routes.insert(
            "a.localhost/p".into(),
            Kept {
                session: "a".into(),
                route: Some("p".into()),
                upstream: "127.0.0.1:2".into(),
                strip_prefix: true,
            },
        );
        let both = t.render(&routes);
        assert_eq!(both.http.middlewares.len(), 1);
        assert_eq!(t.routes(&both).ok(), Some(routes.clone()));
        let mut other = empty.clone();
        other
            .http
            .middlewares
            .insert("auth".into(), Middleware::default());
        let err = t.routes(&other).err().map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains("middleware `auth`")),
            "{err:?}"
        );
    }

    #[test]
    fn traefiks_rawdata_reads_as_serving_refused_or_not_yet() {
        let json = serde_json::json!({
            "routers": {
                "ok@file": {"rule": "Host(`a`)", "service": "ok", "status": "enabled"},
                "bad@file": {"rule": "Host(`b`)", "service": "bad", "status": "disabled",
                    "error": ["entryPoint \"x\" doesn't exist", "no valid entryPoint for this router"]},
                "quiet@file": {"rule": "Host(`c`)", "service": "quiet", "status": "disabled"},
                "ok@docker": {"rule": "Host(`d`)", "service": "ok", "status": "enabled"}
            },
            "services": {
                "ok@file": {"loadBalancer": {"servers": [{"url": "http://127.0.0.1:1"}]}},
                "bad@file": {"loadBalancer": {"servers": [{"url": "http://127.0.0.1:2"}]},
                    "error": ["entryPoint \"x\" doesn't exist"]},
                "quiet@file": {"loadBalancer": {"servers": [{"url": "http://127.0.0.1:3"}]}}
            }
        });
        let map = |k: &str| json[k].as_object().cloned().unwrap_or_default();
        let raw = RawData {
            routers: map("routers"),
            services: map("services"),
        };
        assert!(matches!(
            raw.seen("ok", "Host(`a`)", "http://127.0.0.1:1"),
            Seen::Serving
        ));
        assert!(matches!(
            raw.seen("ok", "Host(`a`)", "http://127.0.0.1:9"),
            Seen::NotYet
        ));
        assert!(matches!(
            raw.seen("ok", "Host(`z`)", "http://127.0.0.1:1"),
            Seen::NotYet
        ));
        assert!(matches!(
            raw.seen("bad", "Host(`b`)", "http://127.0.0.1:2"),
            Seen::Refused(e) if e == "entryPoint \"x\" doesn't exist; no valid entryPoint for this router"
        ));
        assert!(matches!(
            raw.seen("quiet", "Host(`c`)", "http://127.0.0.1:3"),
            Seen::Refused(_)
        ));
        assert!(raw.has("ok") && !raw.has("gone"));
    }

    #[test]
    fn exact_hosts_outrank_wildcards() {
        let t = Traefik::new(&config("f.yml")).expect("provider");
        let wild = t.router("w", "*.dev.example", None, false);
        let exact = t.router("e", "a-very-long-session-name.dev.example", None, false);
        assert!(exact.priority > wild.priority, "{exact:?} {wild:?}");
        let root = t.router("r", "p.localhost", None, false);
        let short = t.router("s", "p.localhost", Some("/a"), false);
        let long = t.router("l", "p.localhost", Some("/a/b"), true);
        assert!(long.priority > short.priority && short.priority > root.priority);
    }
}
