//! The set of providers a config chooses (`Providers`) and that config (`ProvidersConfig`, the
//! `providers:` section), and observing them all at once: a provider that fails or does not
//! answer in time becomes a gap, never an empty list. A compute provider registers in one line
//! (`compute_providers!` in `compute/mod.rs`); proxies and DNS providers are one variant of
//! their family's config each.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::model::ComputeKind;
use crate::model::observed::{Observed, ProviderId};

use super::cloudflare::{Budgets, Client as CloudflareClient, CloudflareError};
use super::compute::{ComputeProvider, ComputeProviders};
use super::dns::{DnsConfig, DnsProvider, cloudflare as cloudflare_dns, hosts, powerdns};
use super::proxy::{
    ProxyConfig, ProxyProvider, caddy, cloudflare_tunnel, embedded, fronted, traefik,
};
use super::{ProviderError, chain};

/// The `providers:` section of the config.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProvidersConfig {
    #[serde(default)]
    pub compute: ComputeProviders,
    #[serde(default)]
    pub proxy: ProxyConfig,
    #[serde(default)]
    pub dns: DnsConfig,
}

/// What providers are given besides their own config.
#[derive(Debug, Clone)]
pub struct Env {
    /// vessel's state directory: each provider keeps its records in a folder of its own.
    pub state_dir: PathBuf,
    /// How long destroyed sessions' workspaces are kept.
    pub workspace_retention: Duration,
}

/// The providers a config chooses.
#[derive(Clone)]
pub struct Providers {
    pub compute: BTreeMap<ComputeKind, Arc<dyn ComputeProvider>>,
    pub proxy: Arc<dyn ProxyProvider>,
    pub dns: Option<Arc<dyn DnsProvider>>,
    /// vessel's own proxy, which the daemon serves: the embedded proxy when it is the proxy
    /// provider, or the wake listener's when Caddy or Traefik is in front of one
    /// (`wake_listen`). It holds requests for sleeping sessions and counts activity.
    pub embedded: Option<crate::proxy::Proxy>,
    pub observe_timeout: Duration,
    /// One lock per session, taken by session steps and by the lifecycle's sleeps and wakes.
    pub locks: super::SessionLocks,
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("the {0} provider is not available in this build of vessel yet")]
    NotAvailable(&'static str),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Traefik(#[from] traefik::TraefikError),
    #[error(transparent)]
    Caddy(#[from] caddy::CaddyError),
    #[error(transparent)]
    PowerDns(#[from] powerdns::PowerDnsError),
    #[error("cannot read the PowerDNS API key")]
    PowerDnsKey(#[source] crate::secret::SecretError),
    #[error("cannot read the Cloudflare API token")]
    CloudflareToken(#[source] crate::secret::SecretError),
    #[error(transparent)]
    Cloudflare(#[from] CloudflareError),
    #[error(transparent)]
    Docker(#[from] super::compute::docker::DockerSetupError),
    #[error(transparent)]
    Proxmox(super::compute::proxmox::ProxmoxSetupError),
    #[error("cannot prepare the process provider's directory {path}")]
    StateDir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ProvidersConfig {
    /// Make relative paths relative to `base` (the config file's directory).
    pub fn rebase(&mut self, base: &std::path::Path) {
        for c in self.compute.each_mut() {
            c.rebase(base);
        }
        self.proxy.rebase(base);
        self.dns.rebase(base);
    }
}

impl Providers {
    /// The providers `config` names, for a process that is not the daemon (`vessel plan`):
    /// the embedded proxy's table lives in the daemon, so it is reported as unobservable; in
    /// front of the wake listener, the inner routes are read from the daemon's last snapshot.
    pub fn for_planning(config: &ProvidersConfig, env: &Env) -> Result<Providers, SetupError> {
        Providers::build(config, env, false)
    }

    /// The providers `config` names.
    pub fn new(config: &ProvidersConfig, env: &Env) -> Result<Providers, SetupError> {
        Providers::build(config, env, true)
    }

    fn build(config: &ProvidersConfig, env: &Env, daemon: bool) -> Result<Providers, SetupError> {
        let mut compute: BTreeMap<ComputeKind, Arc<dyn ComputeProvider>> = BTreeMap::new();
        // One rate budget per Cloudflare token, shared by the providers that use it.
        let mut budgets = Budgets::default();
        for (kind, c) in config.compute.each() {
            compute.insert(kind, c.build(env)?);
        }
        let (proxy, embedded): (Arc<dyn ProxyProvider>, _) = match &config.proxy {
            ProxyConfig::Embedded { .. } => {
                let p = crate::proxy::Proxy::default();
                let provider = if daemon {
                    embedded::EmbeddedProxy::new(p.clone())
                } else {
                    embedded::EmbeddedProxy::outside_daemon(p.clone())
                };
                (Arc::new(provider), daemon.then_some(p))
            }
            ProxyConfig::Caddy {
                admin,
                server,
                listen,
                id_prefix,
                tls,
                ..
            } => (
                Arc::new(caddy::Caddy::new(
                    admin,
                    server,
                    listen,
                    id_prefix,
                    tls.as_ref(),
                )?),
                None,
            ),
            ProxyConfig::Traefik(t) => (Arc::new(traefik::Traefik::new(t)?), None),
            ProxyConfig::CloudflareTunnel(c) => {
                let token = c.api_token.resolve().map_err(SetupError::CloudflareToken)?;
                let budget = budgets.for_token(&token, c.rate_budget);
                let client = CloudflareClient::new(&c.api, token, budget, c.tls.as_ref())?;
                (
                    Arc::new(cloudflare_tunnel::CloudflareTunnel::new(
                        client,
                        &c.account_id,
                        &c.tunnel_id,
                        &env.state_dir,
                    )),
                    None,
                )
            }
        };
        // Caddy or Traefik in front of the wake listener: vessel's own proxy serves there.
        let (proxy, embedded): (Arc<dyn ProxyProvider>, _) = match config.proxy.wake_listen() {
            Some(wake) if daemon => {
                let p = crate::proxy::Proxy::default();
                let inner = fronted::Inner::Live(p.clone());
                (Arc::new(fronted::Fronted::new(proxy, inner, wake)), Some(p))
            }
            Some(wake) => {
                // `StateDir::observed_path` (the state module imports the providers, not back).
                let inner = fronted::Inner::Snapshot(env.state_dir.join("observed.json"));
                (Arc::new(fronted::Fronted::new(proxy, inner, wake)), None)
            }
            None => (proxy, embedded),
        };
        let dns: Option<Arc<dyn DnsProvider>> = match &config.dns {
            DnsConfig::None => None,
            DnsConfig::Hosts { file, address } => {
                if address.parse::<std::net::IpAddr>().is_err() {
                    return Err(SetupError::Invalid(format!(
                        "the hosts DNS provider maps names to addresses: `{address}` is not an IP address"
                    )));
                }
                Some(Arc::new(hosts::HostsDns::new(file.clone())))
            }
            DnsConfig::Powerdns {
                api,
                server_id,
                api_key,
                zones,
                tls,
                ..
            } => {
                let key = api_key.resolve().map_err(SetupError::PowerDnsKey)?;
                Some(Arc::new(powerdns::PowerDns::new(
                    api,
                    server_id,
                    key,
                    zones,
                    tls.as_ref(),
                )?))
            }
            DnsConfig::Cloudflare(c) => {
                let tunnel = matches!(config.proxy, ProxyConfig::CloudflareTunnel(_));
                if c.address.is_none() && !tunnel {
                    return Err(SetupError::Invalid(
                        "the cloudflare DNS provider needs an `address` (unless the proxy is cloudflare_tunnel, whose records point at the tunnel)".into(),
                    ));
                }
                if c.instance.is_empty()
                    || !c
                        .instance
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                {
                    return Err(SetupError::Invalid(format!(
                        "the cloudflare DNS provider's `instance` `{}` must be letters, digits and `-`",
                        c.instance
                    )));
                }
                let token = c.api_token.resolve().map_err(SetupError::CloudflareToken)?;
                let budget = budgets.for_token(&token, c.rate_budget);
                let client = CloudflareClient::new(&c.api, token, budget, c.tls.as_ref())?;
                Some(Arc::new(cloudflare_dns::CloudflareDns::new(
                    client,
                    &c.zones,
                    &c.instance,
                    c.proxied,
                    c.batch_limit,
                )))
            }
        };
        Ok(Providers {
            compute,
            proxy,
            dns,
            embedded,
            observe_timeout: Duration::from_secs(10),
            locks: Default::default(),
        })
    }

    /// Observe everything at once. A provider that fails or times out becomes a gap; a compute
    /// kind that `needed` names but no provider serves is a gap too.
    /// Nothing any provider would report has changed since its last `observe`, as far as
    /// every one of them knows for certain.
    pub fn unchanged(&self) -> bool {
        self.compute.values().all(|p| p.unchanged())
            && self.proxy.unchanged()
            && self.dns.as_ref().is_none_or(|d| d.unchanged())
    }

    /// The periodic resync: the next observation looks at the world again, not at what the
    /// providers keep in memory.
    pub fn resync(&self) {
        for p in self.compute.values() {
            p.resync();
        }
    }

    pub async fn observe(&self, needed: &BTreeSet<ComputeKind>) -> Observed {
        let t = self.observe_timeout;
        let mut o = Observed::default();
        let compute =
            futures_util::future::join_all(self.compute.iter().map(|(k, p)| async move {
                let (sessions, kept) = tokio::join!(
                    tokio::time::timeout(t, p.observe()),
                    tokio::time::timeout(t, p.retained())
                );
                (*k, sessions, kept)
            }));
        let proxy = tokio::time::timeout(t, self.proxy.observe());
        let dns = async {
            match &self.dns {
                Some(d) => Some(tokio::time::timeout(t, d.observe()).await),
                None => None,
            }
        };
        let (compute, proxy, dns) = tokio::join!(compute, proxy, dns);
        for (kind, r, kept) in compute {
            // What is kept is for status and restores only: not knowing it is no gap.
            match flatten(kept, t) {
                Ok(kept) => o.retained.extend(kept),
                Err(e) => {
                    tracing::warn!(
                        provider = kind.as_str(),
                        "cannot list kept workspaces: {}",
                        e.text()
                    )
                }
            }
            match flatten(r, t) {
                Ok(sessions) => {
                    for s in sessions {
                        match o.sessions.get(&s.name) {
                            Some(first) if first.provider != kind => {
                                let kinds = o.duplicates.entry(s.name.clone()).or_default();
                                for k in [first.provider, kind] {
                                    if !kinds.contains(&k) {
                                        kinds.push(k);
                                    }
                                }
                            }
                            _ => {
                                o.sessions.insert(s.name.clone(), s);
                            }
                        }
                    }
                }
                Err(e) => gap(&mut o, ProviderId::Compute(kind), &e),
            }
        }
        for k in needed {
            if !self.compute.contains_key(k) {
                o.gaps.insert(
                    ProviderId::Compute(*k),
                    format!("no {} provider is configured", k.as_str()),
                );
            }
        }
        match flatten(proxy, t) {
            Ok(routes) => o.routes = routes.into_iter().map(|r| (r.key(), r)).collect(),
            Err(e) => gap(&mut o, ProviderId::Proxy, &e),
        }
        match dns.map(|r| flatten(r, t)) {
            Some(Ok(records)) => {
                o.records = records
                    .into_iter()
                    .map(|r| (Observed::record_key(&r.name, r.rtype), r))
                    .collect()
            }
            Some(Err(e)) => gap(&mut o, ProviderId::Dns, &e),
            None => {}
        }
        o
    }
}

/// `p` is a gap in `o` because of `e`; degraded as well when `e` is only a rate limit.
fn gap(o: &mut Observed, p: ProviderId, e: &ObserveError) {
    let text = e.text();
    if super::is_rate_limited(e) {
        o.degraded.insert(p.clone(), text.clone());
    }
    o.gaps.insert(p, text);
}

/// Why a provider could not be observed: what `Observed::gaps` says, in words.
#[derive(Debug, thiserror::Error)]
enum ObserveError {
    #[error(transparent)]
    Failed(ProviderError),
    #[error("no answer within {}s", .0.as_secs())]
    NoAnswer(Duration),
}

impl ObserveError {
    /// The whole chain of causes, for a gap.
    fn text(&self) -> String {
        chain(self)
    }
}

fn flatten<T>(
    r: Result<Result<T, ProviderError>, tokio::time::error::Elapsed>,
    t: Duration,
) -> Result<T, ObserveError> {
    match r {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(ObserveError::Failed(e)),
        Err(_) => Err(ObserveError::NoAnswer(t)),
    }
}
