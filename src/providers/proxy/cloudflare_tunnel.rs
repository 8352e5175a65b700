//! The `cloudflare_tunnel` proxy provider: vessel's routes as ingress rules of one Cloudflare
//! Tunnel's remotely managed configuration (`GET`/`PUT
//! /accounts/{account}/cfd_tunnel/{tunnel}/configurations`), through the v4 API
//! (`providers/cloudflare.rs`: token, rate budget, envelope).
//!
//! Ownership: an ingress rule has no field for a label (hostname, service, path and
//! originRequest are all it has, in Cloudflare's API and its SDK's types), so vessel keeps a
//! ledger of the rules it wrote, in its state directory (`cloudflare_tunnel/<tunnel>.json`):
//! hostname, path and service exactly as written, with the session and route. A rule is
//! vessel's only when the ledger has it field for field; anything else, a rule for a similar
//! or even the same hostname pointing elsewhere included, is foreign and never changed. A lost
//! ledger makes vessel's rules foreign (left alone), never the other way round. The ledger is
//! widened before each write (old and new rules) and narrowed to what was written after it.
//!
//! The document: each batch reads the configuration, keeps every foreign rule in its order,
//! puts vessel's rules in one block (sorted by host, longer paths first, so a path rule comes
//! before its host's plain rule) where the first of them was, or just before the catch-all
//! when there were none, keeps the catch-all (the last rule, with no hostname and no path)
//! last, adding `http_status:404` when there is none, and keeps every other field of the
//! document as it was read. The API has no conditional write, so the write is guarded by
//! compare and re-read: the batch computes from the document it last read (observe's, when
//! there is one), re-reads it just before writing, and if the version or the rules moved,
//! computes again from the fresh one (at most `ATTEMPTS` times). A change landing in the
//! instant between that re-read and the write is the one window left; the version the write
//! returns shows it, and it is logged.
//!
//! cloudflared matches a rule's `path` as a regular expression, so a route's path prefix is
//! written `^<prefix>(/|$)` (escaped); it cannot take a prefix off, so a route with
//! `strip_prefix` is refused.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http::Method;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::model::observed::ObservedRoute;
use crate::model::plan::RouteAction;
use crate::providers::cloudflare::{Client, CloudflareError};

use super::{BoxFut, ProviderError, ProxyProvider};

/// Reads of the configuration per batch before giving up on a document that keeps moving.
const ATTEMPTS: usize = 4;
const CATCH_ALL: &str = "http_status:404";

/// The `cloudflare_tunnel` proxy provider.
pub struct CloudflareTunnel {
    client: Client,
    account: String,
    tunnel: String,
    ledger_file: PathBuf,
    /// The configuration last read (version and document), to compare the next read with.
    last: std::sync::Mutex<Option<(Option<i64>, Value)>>,
}

/// Why a route batch failed. Never holds the token.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error(transparent)]
    Api(#[from] CloudflareError),
    #[error(
        "the tunnel's configuration kept changing under vessel ({0} reads); tried again next pass"
    )]
    KeptChanging(usize),
    #[error("the tunnel's configuration is not a JSON object with an `ingress` list")]
    NotConfig,
    #[error("cannot write the ledger of vessel's tunnel rules {path}")]
    Ledger {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the ledger of vessel's tunnel rules {path} cannot be read")]
    LedgerUnreadable {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cloudflared cannot take a path prefix off a request: `strip_prefix` is not supported")]
    StripPrefix,
    #[error("a rule vessel did not write is at this hostname and path; left alone")]
    Foreign,
}

/// One of vessel's rules, as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Owned {
    hostname: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    path: Option<String>,
    service: String,
    session: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    route: Option<String>,
    /// The route's path prefix (`path` is its regular expression).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prefix: Option<String>,
}

impl Owned {
    fn key(&self) -> String {
        crate::model::route_key(&self.hostname, self.prefix.as_deref())
    }

    fn rule(&self) -> Value {
        let mut r = json!({"hostname": self.hostname, "service": self.service});
        if let Some(p) = &self.path {
            r["path"] = json!(p);
        }
        r
    }

    /// Whether the rule `r` is this one, field for field (an `originRequest` or anything else
    /// added makes it someone else's).
    fn is(&self, r: &Value) -> bool {
        let Some(m) = r.as_object() else {
            return false;
        };
        let text = |k: &str| m.get(k).and_then(Value::as_str);
        m.len() == 2 + usize::from(self.path.is_some())
            && text("hostname") == Some(self.hostname.as_str())
            && text("service") == Some(self.service.as_str())
            && text("path") == self.path.as_deref()
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Ledger {
    rules: Vec<Owned>,
}

/// A route's path prefix as a cloudflared path expression: the prefix, on whole segments.
fn path_regex(prefix: &str) -> String {
    let mut out = String::from("^");
    for c in prefix.trim_end_matches('/').chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out.push_str("(/|$)");
    out
}

fn is_catch_all(r: &Value) -> bool {
    r.get("hostname")
        .and_then(Value::as_str)
        .is_none_or(|h| h.is_empty() || h == "*")
        && r.get("path")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
}

impl CloudflareTunnel {
    pub fn new(client: Client, account: &str, tunnel: &str, state_dir: &std::path::Path) -> Self {
        CloudflareTunnel {
            client,
            account: account.to_string(),
            tunnel: tunnel.to_string(),
            ledger_file: state_dir
                .join("cloudflare_tunnel")
                .join(format!("{tunnel}.json")),
            last: Default::default(),
        }
    }

    /// The API client (its budget counts the calls).
    pub fn client(&self) -> &Client {
        &self.client
    }

    fn path(&self) -> String {
        format!(
            "/accounts/{}/cfd_tunnel/{}/configurations",
            self.account, self.tunnel
        )
    }

    fn ledger(&self) -> Result<Ledger, TunnelError> {
        match std::fs::read(&self.ledger_file) {
            Ok(b) => serde_json::from_slice(&b).map_err(|source| TunnelError::LedgerUnreadable {
                path: self.ledger_file.clone(),
                source,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Ledger::default()),
            Err(source) => Err(TunnelError::Ledger {
                path: self.ledger_file.clone(),
                source,
            }),
        }
    }

    fn write_ledger(&self, rules: Vec<Owned>) -> Result<(), TunnelError> {
        let err = |source| TunnelError::Ledger {
            path: self.ledger_file.clone(),
            source,
        };
        std::fs::create_dir_all(super::super::parent_dir(&self.ledger_file)).map_err(err)?;
        let mut rules = rules;
        rules.sort_by(|a, b| (a.key(), &a.service).cmp(&(b.key(), &b.service)));
        rules.dedup();
        let bytes = serde_json::to_vec_pretty(&Ledger { rules }).unwrap_or_default();
        super::super::write_atomically(&self.ledger_file, &bytes).map_err(err)
    }

    /// The configuration now: its version and its `config` document.
    async fn read(&self) -> Result<(Option<i64>, Value), TunnelError> {
        let a = self.client.call(Method::GET, &self.path(), None).await?;
        let version = a.result.get("version").and_then(Value::as_i64);
        let mut config = a.result.get("config").cloned().unwrap_or(Value::Null);
        if config.is_null() {
            config = json!({});
        }
        let ok = config.is_object()
            && config
                .get("ingress")
                .is_none_or(|i| i.is_array() || i.is_null());
        if !ok {
            return Err(TunnelError::NotConfig);
        }
        *crate::lock_or_reset(&self.last) = Some((version, config.clone()));
        Ok((version, config))
    }

    /// The rules of `config`, each with the ledger entry that owns it.
    fn rules<'l>(config: &Value, ledger: &'l Ledger) -> Vec<(Value, Option<&'l Owned>)> {
        // The ledger by hostname: a lookup per rule, not a walk of the whole ledger.
        let mut by_host: BTreeMap<&str, Vec<&Owned>> = BTreeMap::new();
        for o in &ledger.rules {
            by_host.entry(o.hostname.as_str()).or_default().push(o);
        }
        config
            .get("ingress")
            .and_then(Value::as_array)
            .map(|rules| {
                rules
                    .iter()
                    .map(|r| {
                        let host = r.get("hostname").and_then(Value::as_str).unwrap_or("");
                        let owner = by_host
                            .get(host)
                            .and_then(|c| c.iter().copied().find(|o| o.is(r)));
                        (r.clone(), owner)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The document after `actions`, the rules vessel owns in it, and each action's outcome.
    #[allow(clippy::type_complexity)]
    fn compute(
        &self,
        config: &Value,
        ledger: &Ledger,
        actions: &[&RouteAction],
    ) -> (Value, Vec<Owned>, Vec<Result<(), TunnelError>>) {
        let rules = Self::rules(config, ledger);
        let mut mine: BTreeMap<String, Owned> = BTreeMap::new();
        let mut foreign: Vec<Value> = Vec::new();
        let mut catch_all: Option<Value> = None;
        let mut block_at: Option<usize> = None;
        let n = rules.len();
        for (i, (r, owner)) in rules.into_iter().enumerate() {
            match owner {
                Some(o) => {
                    block_at.get_or_insert(foreign.len());
                    mine.insert(o.key(), o.clone());
                }
                None if i + 1 == n && is_catch_all(&r) => catch_all = Some(r),
                None => foreign.push(r),
            }
        }
        let foreign_keys: std::collections::BTreeSet<(String, Option<String>)> = foreign
            .iter()
            .map(|r| {
                (
                    r.get("hostname")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_ascii_lowercase(),
                    r.get("path").and_then(Value::as_str).map(str::to_string),
                )
            })
            .collect();
        let mut outcomes = Vec::new();
        for a in actions {
            outcomes.push(match a {
                RouteAction::UpsertRoute {
                    strip_prefix: true, ..
                } => Err(TunnelError::StripPrefix),
                RouteAction::UpsertRoute {
                    host,
                    path,
                    upstream,
                    session,
                    route,
                    ..
                } => {
                    let o = Owned {
                        hostname: host.to_ascii_lowercase(),
                        path: path.as_deref().map(path_regex),
                        service: format!("http://{upstream}"),
                        session: session.clone(),
                        route: route.clone(),
                        prefix: path.clone(),
                    };
                    if foreign_keys.contains(&(o.hostname.clone(), o.path.clone())) {
                        Err(TunnelError::Foreign)
                    } else {
                        mine.insert(o.key(), o);
                        Ok(())
                    }
                }
                RouteAction::RemoveRoute { .. } => {
                    mine.remove(&a.key());
                    Ok(())
                }
            });
        }
        let mut owned: Vec<Owned> = mine.into_values().collect();
        // By host, longer paths first: cloudflared takes the first rule that matches.
        owned.sort_by(|a, b| {
            a.hostname.cmp(&b.hostname).then_with(|| {
                let len = |o: &Owned| o.prefix.as_deref().map_or(0, str::len);
                len(b).cmp(&len(a))
            })
        });
        let at = block_at.unwrap_or(foreign.len()).min(foreign.len());
        let mut ingress: Vec<Value> = foreign[..at].to_vec();
        ingress.extend(owned.iter().map(Owned::rule));
        ingress.extend(foreign[at..].iter().cloned());
        ingress.push(catch_all.unwrap_or_else(|| json!({"hostname": "", "service": CATCH_ALL})));
        let mut doc = config.clone();
        if let Some(m) = doc.as_object_mut() {
            m.insert("ingress".into(), Value::Array(ingress));
        }
        (doc, owned, outcomes)
    }

    async fn apply_batch(
        &self,
        actions: &[&RouteAction],
    ) -> Result<Vec<Result<(), TunnelError>>, TunnelError> {
        let ledger = self.ledger()?;
        let mut base = crate::lock_or_reset(&self.last).clone();
        for _ in 0..ATTEMPTS {
            let fresh = self.read().await?;
            let Some(b) = base.take().filter(|b| *b == fresh) else {
                // The first read, or the document moved since the last: compute from it and
                // read once more before writing.
                base = Some(fresh);
                continue;
            };
            let (doc, owned, outcomes) = self.compute(&b.1, &ledger, actions);
            if doc == b.1 {
                return Ok(outcomes);
            }
            let mut wider = ledger.rules.clone();
            wider.extend(owned.iter().cloned());
            self.write_ledger(wider)?;
            let body = json!({ "config": doc }).to_string();
            let a = self
                .client
                .call(Method::PUT, &self.path(), Some(Bytes::from(body)))
                .await?;
            let version = a.result.get("version").and_then(Value::as_i64);
            if let (Some(before), Some(after)) = (b.0, version)
                && after != before + 1
            {
                tracing::warn!(
                    tunnel = %self.tunnel,
                    before,
                    after,
                    "the tunnel's configuration changed between vessel's last read and its write"
                );
            }
            let written = a.result.get("config").cloned().unwrap_or(doc);
            *crate::lock_or_reset(&self.last) = Some((version, written));
            self.write_ledger(owned)?;
            return Ok(outcomes);
        }
        Err(TunnelError::KeptChanging(ATTEMPTS))
    }
}

impl ProxyProvider for CloudflareTunnel {
    fn observe(&self) -> BoxFut<'_, Result<Vec<ObservedRoute>, ProviderError>> {
        Box::pin(async move {
            let err = |e: TunnelError| {
                ProviderError::caused(
                    "read the configuration of tunnel",
                    &self.tunnel,
                    Arc::new(e),
                )
            };
            let ledger = self.ledger().map_err(err)?;
            let (_, config) = self.read().await.map_err(err)?;
            Ok(Self::rules(&config, &ledger)
                .into_iter()
                .filter_map(|(r, owner)| {
                    let host = r.get("hostname").and_then(Value::as_str)?;
                    if host.is_empty() {
                        return None;
                    }
                    Some(match owner {
                        Some(o) => ObservedRoute {
                            host: o.hostname.clone(),
                            path: o.prefix.clone(),
                            strip_prefix: false,
                            upstream: o.service.trim_start_matches("http://").to_string(),
                            owned: true,
                            session: Some(o.session.clone()),
                            route: o.route.clone(),
                        },
                        None => ObservedRoute {
                            host: host.to_ascii_lowercase(),
                            path: r.get("path").and_then(Value::as_str).map(str::to_string),
                            strip_prefix: false,
                            upstream: r
                                .get("service")
                                .and_then(Value::as_str)
                                .unwrap_or("")
                                .to_string(),
                            owned: false,
                            session: None,
                            route: None,
                        },
                    })
                })
                .collect())
        })
    }

    fn apply<'a>(
        &'a self,
        actions: &'a [&'a RouteAction],
    ) -> BoxFut<'a, Vec<Result<(), ProviderError>>> {
        Box::pin(async move {
            match self.apply_batch(actions).await {
                Ok(outcomes) => outcomes
                    .into_iter()
                    .zip(actions)
                    .map(|(o, a)| {
                        o.map_err(|e| ProviderError::caused("route", a.key(), Arc::new(e)))
                    })
                    .collect(),
                Err(e) => super::route_batch_results(actions, Err(Arc::new(e))),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_prefixes_become_anchored_expressions() {
        assert_eq!(path_regex("/preview"), "^/preview(/|$)");
        assert_eq!(path_regex("/a.b/"), "^/a\\.b(/|$)");
    }

    #[test]
    fn a_catch_all_has_no_hostname_and_no_path() {
        assert!(is_catch_all(&json!({"service": "http_status:404"})));
        assert!(is_catch_all(
            &json!({"hostname": "", "service": "http_status:404"})
        ));
        assert!(!is_catch_all(
            &json!({"hostname": "a.example.com", "service": "x"})
        ));
        assert!(!is_catch_all(&json!({"path": "^/x", "service": "x"})));
    }
}
