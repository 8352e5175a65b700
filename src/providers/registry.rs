//! The set of providers a config chooses (`Providers`), and observing them all at once: a
//! provider that fails or does not answer in time becomes a gap, never an empty list.
//! Registering a provider is one line in `from_config`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Config, DnsConfig, ProxyConfig};
use crate::model::ComputeKind;
use crate::model::observed::{Observed, ProviderId};

use super::compute::{ComputeProvider, docker, kept, process};
use super::dns::{DnsProvider, hosts, powerdns};
use super::proxy::{ProxyProvider, caddy, embedded, traefik};
use super::{ProviderError, chain};

/// The providers a config chooses.
#[derive(Clone)]
pub struct Providers {
    pub compute: BTreeMap<ComputeKind, Arc<dyn ComputeProvider>>,
    pub proxy: Arc<dyn ProxyProvider>,
    pub dns: Option<Arc<dyn DnsProvider>>,
    /// The embedded proxy, when it is the proxy provider (the daemon serves it).
    pub embedded: Option<crate::proxy::Proxy>,
    pub observe_timeout: Duration,
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
    Docker(#[from] docker::DockerSetupError),
    #[error("cannot prepare the process provider's directory {path}")]
    StateDir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Providers {
    /// The providers `config` names, for a process that is not the daemon (`vessel plan`):
    /// the embedded proxy's table lives in the daemon, so it is reported as unobservable.
    pub fn for_planning(config: &Config) -> Result<Providers, SetupError> {
        let mut p = Providers::from_config(config)?;
        if let Some(proxy) = p.embedded.take() {
            p.proxy = Arc::new(embedded::EmbeddedProxy::outside_daemon(proxy));
        }
        Ok(p)
    }

    /// The providers `config` names.
    pub fn from_config(config: &Config) -> Result<Providers, SetupError> {
        let mut compute: BTreeMap<ComputeKind, Arc<dyn ComputeProvider>> = BTreeMap::new();
        if let Some(p) = &config.providers.compute.process {
            let root = config.state_dir.join("sessions");
            let kept = kept::Kept::new(
                config.state_dir.join("retained/process"),
                ComputeKind::Process,
                config.policy.workspace_retention.std(),
            );
            let provider = process::ProcessProvider::new(root.clone(), p.clone(), kept)
                .map_err(|source| SetupError::StateDir { path: root, source })?;
            compute.insert(ComputeKind::Process, Arc::new(provider));
        }
        if let Some(d) = &config.providers.compute.docker {
            let kept = kept::Kept::new(
                config.state_dir.join("retained/docker"),
                ComputeKind::Docker,
                config.policy.workspace_retention.std(),
            );
            let provider =
                docker::DockerProvider::new(d.clone(), config.state_dir.join("docker"), kept)?;
            compute.insert(ComputeKind::Docker, Arc::new(provider));
        }
        let (proxy, embedded): (Arc<dyn ProxyProvider>, _) = match &config.providers.proxy {
            ProxyConfig::Embedded { .. } => {
                let p = crate::proxy::Proxy::default();
                (Arc::new(embedded::EmbeddedProxy::new(p.clone())), Some(p))
            }
            ProxyConfig::Caddy {
                admin,
                server,
                listen,
                id_prefix,
            } => (
                Arc::new(
                    caddy::Caddy::new(admin, server, listen, id_prefix)
                        .map_err(SetupError::Invalid)?,
                ),
                None,
            ),
            ProxyConfig::Traefik(t) => (Arc::new(traefik::Traefik::new(t)?), None),
        };
        let dns: Option<Arc<dyn DnsProvider>> = match &config.providers.dns {
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
                ..
            } => {
                let key = api_key.resolve().map_err(|e| {
                    SetupError::Invalid(format!("cannot read the PowerDNS API key: {e}"))
                })?;
                Some(Arc::new(
                    powerdns::PowerDns::new(api, server_id, key, zones)
                        .map_err(SetupError::Invalid)?,
                ))
            }
        };
        Ok(Providers {
            compute,
            proxy,
            dns,
            embedded,
            observe_timeout: Duration::from_secs(10),
        })
    }

    /// Observe everything at once. A provider that fails or times out becomes a gap; a compute
    /// kind that `needed` names but no provider serves is a gap too.
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
                    tracing::warn!(provider = kind.as_str(), "cannot list kept workspaces: {e}")
                }
            }
            match flatten(r, t) {
                Ok(sessions) => {
                    for s in sessions {
                        o.sessions.insert(s.name.clone(), s);
                    }
                }
                Err(e) => {
                    o.gaps.insert(ProviderId::Compute(kind), e);
                }
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
            Ok(routes) => o.routes = routes.into_iter().map(|r| (r.host.clone(), r)).collect(),
            Err(e) => {
                o.gaps.insert(ProviderId::Proxy, e);
            }
        }
        match dns.map(|r| flatten(r, t)) {
            Some(Ok(records)) => {
                o.records = records
                    .into_iter()
                    .map(|r| (Observed::record_key(&r.name, r.rtype), r))
                    .collect()
            }
            Some(Err(e)) => {
                o.gaps.insert(ProviderId::Dns, e);
            }
            None => {}
        }
        o
    }
}

fn flatten<T>(
    r: Result<Result<T, ProviderError>, tokio::time::error::Elapsed>,
    t: Duration,
) -> Result<T, String> {
    match r {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(chain(&e)),
        Err(_) => Err(format!("no answer within {}s", t.as_secs())),
    }
}
