//! Providers: what observes the world and carries out plan steps. Three families, each a small
//! trait of `observe` plus idempotent operations (the plan's actions):
//!
//! - compute (`ComputeProvider`): sessions, one step at a time;
//! - proxy (`ProxyProvider`): routes, in batches (one table swap or config load per batch);
//! - DNS (`DnsProvider`): records, in batches.
//!
//! `Providers` is the set the config chooses. Observing never fails as a whole: a provider
//! that cannot be observed becomes a gap, and the planner leaves everything there alone.
//! Foreign (SDK) types stay inside each provider's module.

pub mod caddy;
pub mod docker;
pub mod embedded;
pub mod hosts;
pub mod http;
pub mod kept;
pub mod powerdns;
pub mod process;
pub mod traefik;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Config, DnsConfig, ProxyConfig};
use crate::model::ComputeKind;
use crate::observed::{Observed, ObservedRecord, ObservedRoute, ObservedSession, ProviderId};
use crate::planner::Action;

pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a provider call failed. Its Display names the operation and the object; the cause is
/// in `source`, never repeated.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("{op} {object}")]
    Io {
        op: &'static str,
        object: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{op} {object}: {message}")]
    Failed {
        op: &'static str,
        object: String,
        message: String,
    },
    /// A typed cause, shared when one failure (a batch's file write, say) fails several steps.
    #[error("{op} {object}")]
    Caused {
        op: &'static str,
        object: String,
        #[source]
        source: Arc<dyn std::error::Error + Send + Sync>,
    },
    #[error("{0} is not handled by this provider")]
    Unsupported(&'static str),
}

impl ProviderError {
    pub fn io(
        op: &'static str,
        object: impl Into<String>,
    ) -> impl FnOnce(std::io::Error) -> ProviderError {
        let object = object.into();
        move |source| ProviderError::Io { op, object, source }
    }

    pub fn caused(
        op: &'static str,
        object: impl Into<String>,
        source: Arc<dyn std::error::Error + Send + Sync>,
    ) -> ProviderError {
        ProviderError::Caused {
            op,
            object: object.into(),
            source,
        }
    }

    pub fn failed(
        op: &'static str,
        object: impl Into<String>,
        message: impl Into<String>,
    ) -> ProviderError {
        ProviderError::Failed {
            op,
            object: object.into(),
            message: message.into(),
        }
    }
}

pub use crate::error_chain as chain;

/// What a create step gives a compute provider.
pub struct CreateArgs<'a> {
    pub session: &'a str,
    pub spec: &'a crate::observed::RuntimeSpec,
    pub fingerprint: &'a str,
    pub source_file: &'a Path,
    pub save_to: Option<&'a Path>,
    pub start: bool,
    /// The host the plan placed it on, for providers with several.
    pub host: Option<&'a str>,
    /// Restore the workspace kept from an earlier session of this name, if it is still kept.
    pub restore: bool,
}

/// The session steps of a compute provider, one per kind of plan action on a session;
/// `run_session_step` maps the plan's actions onto them.
/// What vessel last asked of a session, kept in a compute provider's session record (so a
/// session that is down against that wish reads as failed, not stopped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Intent {
    Running,
    Stopped,
}

pub(crate) trait SessionSteps: Sync {
    fn create(&self, a: &CreateArgs<'_>) -> impl Future<Output = Result<(), ProviderError>> + Send;
    /// Change a session's spec in place (the fields its kind changes without a replace);
    /// with `restart`, a running session restarts with it.
    fn update(
        &self,
        session: &str,
        spec: &crate::observed::RuntimeSpec,
        fingerprint: &str,
        restart: bool,
    ) -> impl Future<Output = Result<(), ProviderError>> + Send;
    fn start(&self, session: &str) -> impl Future<Output = Result<(), ProviderError>> + Send;
    fn stop(
        &self,
        session: &str,
        stop_timeout: Option<crate::model::Duration>,
    ) -> impl Future<Output = Result<(), ProviderError>> + Send;
    /// Destroy a session; with `retain`, keep its workspace for the retention time first
    /// (failing rather than losing it when it cannot be kept).
    fn destroy(
        &self,
        session: &str,
        stop_timeout: Option<crate::model::Duration>,
        retain: bool,
    ) -> impl Future<Output = Result<(), ProviderError>> + Send;
    fn wait_healthy(
        &self,
        session: &str,
        check: Option<&crate::model::Health>,
    ) -> impl Future<Output = Result<(), ProviderError>> + Send;
    fn sync_source(
        &self,
        session: &str,
        path: &Path,
        exclude: &[String],
        save_to: &Option<std::path::PathBuf>,
    ) -> impl Future<Output = Result<(), ProviderError>> + Send;
    fn save_work(
        &self,
        session: &str,
        path: &Path,
    ) -> impl Future<Output = Result<(), ProviderError>> + Send;
}

/// Carry out one session step of the plan with `p`'s steps.
pub(crate) async fn run_session_step<P: SessionSteps>(
    p: &P,
    action: &Action,
) -> Result<(), ProviderError> {
    match action {
        Action::CreateSession {
            session,
            spec,
            fingerprint,
            source_file,
            save_to,
            start,
            host,
            restore,
        } => {
            let args = CreateArgs {
                restore: *restore,
                session,
                spec,
                fingerprint,
                source_file,
                save_to: save_to.as_deref(),
                start: *start,
                host: host.as_deref(),
            };
            p.create(&args).await
        }
        Action::UpdateSession {
            session,
            spec,
            fingerprint,
            restart,
            ..
        } => p.update(session, spec, fingerprint, *restart).await,
        Action::StartSession { session, .. } => p.start(session).await,
        Action::StopSession {
            session,
            stop_timeout,
            ..
        } => p.stop(session, *stop_timeout).await,
        Action::DestroySession {
            session,
            stop_timeout,
            retain,
            ..
        } => p.destroy(session, *stop_timeout, *retain).await,
        Action::WaitHealthy { session, check, .. } => p.wait_healthy(session, check.as_ref()).await,
        Action::SyncSource {
            session,
            path,
            exclude,
            save_to,
            ..
        } => p.sync_source(session, path, exclude, save_to).await,
        Action::SaveWork { session, path, .. } => p.save_work(session, path).await,
        _ => Err(ProviderError::Unsupported("a non-session step")),
    }
}

pub trait ComputeProvider: Send + Sync {
    fn kind(&self) -> ComputeKind;
    /// Every session carrying vessel's marker (and any in the way, marked foreign).
    fn observe(&self) -> BoxFut<'_, Result<Vec<ObservedSession>, ProviderError>>;
    /// Carry out one session step. Idempotent: applying it twice is applying it once.
    fn apply<'a>(&'a self, action: &'a Action) -> BoxFut<'a, Result<(), ProviderError>>;
    /// Ticks when something changed by itself (a session exited), so the loop can repair it
    /// without waiting for the periodic pass.
    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }
    /// Workspaces of destroyed sessions it keeps, by session (dropping the expired ones).
    fn retained(
        &self,
    ) -> BoxFut<'_, Result<Vec<(String, crate::observed::RetainedWorkspace)>, ProviderError>> {
        Box::pin(async { Ok(Vec::new()) })
    }
    /// vessel is exiting.
    fn shutdown(&self) -> BoxFut<'_, ()> {
        Box::pin(async {})
    }
}

pub trait ProxyProvider: Send + Sync {
    fn observe(&self) -> BoxFut<'_, Result<Vec<ObservedRoute>, ProviderError>>;
    /// Carry out route steps as one batch; one result per action, in order.
    fn apply<'a>(&'a self, actions: &'a [&'a Action])
    -> BoxFut<'a, Vec<Result<(), ProviderError>>>;
}

pub trait DnsProvider: Send + Sync {
    fn observe(&self) -> BoxFut<'_, Result<Vec<ObservedRecord>, ProviderError>>;
    fn apply<'a>(&'a self, actions: &'a [&'a Action])
    -> BoxFut<'a, Vec<Result<(), ProviderError>>>;
}

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
                docker::DockerProvider::new(d.clone(), config.state_dir.join("docker"), kept)
                    .map_err(SetupError::Invalid)?;
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

/// One result per action for a route batch that succeeded or failed as a whole (one config
/// write): route steps share the outcome, anything else is not a proxy's.
pub(crate) fn route_batch_results(
    actions: &[&Action],
    outcome: Result<(), String>,
) -> Vec<Result<(), ProviderError>> {
    actions
        .iter()
        .map(|a| match a.route_after() {
            Some((host, _)) => outcome
                .clone()
                .map_err(|m| ProviderError::failed("route", host, m)),
            None => Err(ProviderError::Unsupported("a non-route step")),
        })
        .collect()
}

/// Replace `file` atomically: a temporary file beside it, synced, keeping the old file's
/// permissions, then renamed over it. A reader sees the old file or the new, never half.
pub(crate) fn write_atomically(file: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomically_from(file, bytes, parent_dir(file))
}

/// The directory `file` is in (`.` for a bare name).
pub(crate) fn parent_dir(file: &std::path::Path) -> &std::path::Path {
    file.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."))
}

/// `write_atomically`, with the temporary file in `dir` (on `file`'s filesystem): for a file
/// in a directory a watcher reloads on every event, where a temporary file beside it would be
/// one more change.
pub(crate) fn write_atomically_from(
    file: &std::path::Path,
    bytes: &[u8],
    dir: &std::path::Path,
) -> std::io::Result<()> {
    use std::io::Write;
    let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.vessel-{}", std::process::id()));
    // A leftover of an interrupted write goes first; the new one never follows a symlink.
    let _ = std::fs::remove_file(&tmp);
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        if let Ok(meta) = std::fs::metadata(file) {
            let _ = std::fs::set_permissions(&tmp, meta.permissions());
        }
        std::fs::rename(&tmp, file)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
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

/// Expand `{key}` placeholders in one command argument. `value` says what a key stands for:
/// `None` leaves the placeholder as written, `Some(Err)` refuses the argument.
pub(crate) fn expand(
    arg: &str,
    value: impl Fn(&str) -> Option<Result<String, String>>,
) -> Result<String, String> {
    let mut out = String::with_capacity(arg.len());
    let mut rest = arg;
    while let Some(i) = rest.find('{') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        let Some(end) = tail.find('}') else {
            out.push_str(tail);
            return Ok(out);
        };
        match value(&tail[1..end]) {
            Some(v) => out.push_str(&v?),
            None => out.push_str(&tail[..=end]),
        }
        rest = &tail[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// What `{port.NAME}` stands for, given the port each name has.
pub(crate) fn port_placeholder(
    key: &str,
    ports: &BTreeMap<String, u16>,
) -> Option<Result<String, String>> {
    let name = key.strip_prefix("port.")?;
    Some(match ports.get(name) {
        Some(p) => Ok(p.to_string()),
        None => Err(format!(
            "the command uses `{{{key}}}` but the plan has no port `{name}`"
        )),
    })
}

/// `PORT_<NAME>` for a port name.
pub(crate) fn env_name(port: &str) -> String {
    port.to_ascii_uppercase().replace('-', "_")
}

/// Refuse a source or save path that resolves through a symlink: the validated path must be
/// the path that is read and written (a link could lead outside `source_roots`, and a save
/// would replace the link itself). A path that does not exist yet (a first save) is checked
/// up to its nearest existing ancestor.
pub(crate) fn no_symlinks(
    op: &'static str,
    session: &str,
    path: &Path,
) -> Result<(), ProviderError> {
    let mut existing = path;
    while !existing.exists() {
        match existing.parent() {
            Some(p) => existing = p,
            None => return Ok(()),
        }
    }
    let real = existing.canonicalize().map_err(ProviderError::io(
        op,
        format!("{session}: {}", path.display()),
    ))?;
    if real != existing {
        return Err(ProviderError::failed(
            op,
            session,
            format!(
                "{} resolves through a symlink to {}; write the real path",
                existing.display(),
                real.display()
            ),
        ));
    }
    Ok(())
}

/// Does `addr` (`host:port`) answer? With a path: an HTTP GET answered below 500.
pub(crate) async fn probe(addr: &str, path: Option<&str>) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(Ok(mut s)) =
        tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr)).await
    else {
        return false;
    };
    let Some(path) = path else { return true };
    let req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    match tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await {
        Ok(Ok(n)) if n >= 12 => std::str::from_utf8(&buf[9..12])
            .ok()
            .and_then(|c| c.parse::<u16>().ok())
            .is_some_and(|c| c < 500),
        _ => false,
    }
}
