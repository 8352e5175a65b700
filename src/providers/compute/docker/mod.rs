//! The `docker` compute provider: a session is a container named `vessel-<session>` on one of
//! the configured Docker Engine API hosts (Docker, or Podman's compatible API), through
//! bollard.
//!
//! Ownership: a container is vessel's only if it carries the marker label
//! (`vessel.managed-by=vessel`) and is named after the session its label names. Everything
//! else is never touched: a container named `vessel-<session>` without the marker is reported
//! as foreign (in the way), and a container with a session label but no marker is not
//! vessel's.
//!
//! Observing is two list calls per host whatever the number of sessions (one by the marker
//! label, one by name for foreign containers in the way), concurrently on every host, and none
//! at all while the host's events stream shows nothing changed since the last list (see
//! `HostCache`). A host that does not answer makes the whole provider unobserved (a gap):
//! nothing is created or destroyed on an unknown world.
//!
//! The container's labels record what it was made from (session, fingerprint, spec, host,
//! desired-state file). What changes after creation (what vessel last asked: running or
//! stopped; the source synced in and its excludes) is in a small record per session under
//! `<state>/docker/`, keyed by the container's id, so a container replaced by hand starts with
//! no record.
//!
//! The Docker events stream (per host, container events) pokes the loop through `changes()`
//! for events about vessel's containers or ones named like them, so a container stopped or
//! removed by hand is repaired at once.

mod archive;
mod config;
mod convert;
mod pull;

pub use config::{DockerConfig, DockerHost, DockerPorts};

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bollard::Docker;
use bollard::query_parameters::{
    CreateContainerOptions, DownloadFromContainerOptions, EventsOptions, ListContainersOptions,
    RemoveContainerOptions, StartContainerOptions, StopContainerOptions, UploadToContainerOptions,
};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::model::observed::{ObservedSession, RuntimeSpec, SessionState};
use crate::model::plan::SessionAction;
use crate::model::{ComputeKind, Health};

use super::{
    BoxFut, ComputeProvider, CreateArgs, Intent, ProviderError, SessionSteps, Synced, no_symlinks,
};

pub use convert::{ConvertError, MARKER, container_name};

/// Why the docker provider cannot be set up from its config.
#[derive(Debug, thiserror::Error)]
pub enum DockerSetupError {
    #[error("the docker provider needs at least one host")]
    NoHosts,
    #[error("docker host name `{name}`: {problem}")]
    HostName { name: String, problem: String },
    #[error("docker host `{0}` is configured twice")]
    Duplicate(String),
    #[error("docker host `{name}`")]
    Endpoint {
        name: String,
        #[source]
        source: EndpointError,
    },
    #[error("docker workspace `{0}` must be an absolute path below /")]
    Workspace(String),
    #[error("cannot create {}", path.display())]
    Records {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Why an engine endpoint cannot be reached the way it is written.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("`{0}` is TLS: set tls_cert_path to a directory with ca.pem, cert.pem and key.pem")]
    TlsWithoutCerts(String),
    #[error("`{0}` is not a unix://, tcp://, http:// or https:// endpoint")]
    Scheme(String),
    #[error("cannot make a client for `{endpoint}`")]
    Client {
        endpoint: String,
        #[source]
        source: bollard::errors::Error,
    },
}

/// A kept workspace, as an archive of the workspace directory (entries under its name).
const KEPT_TAR: &str = "workspace.tar";
/// The engine's archive as downloaded, before `archive::normalize`.
const KEPT_RAW: &str = "download.tar";

/// The workspace directory's own name (`/workspace` -> `workspace`).
fn workspace_base(workspace: &str) -> String {
    Path::new(workspace)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("workspace")
        .to_string()
}

/// `<state>/docker/<session>.json`: what changes after creation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    /// The container it describes; a record for another id is stale.
    container: String,
    intent: Intent,
    #[serde(flatten)]
    synced: Synced,
    /// When vessel last started it (for `restart_requested`; the engine's listing does not
    /// say). A start by someone else is not seen: such a container may be restarted once
    /// more for a request it already met, never left unrestarted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    started: Option<chrono::DateTime<chrono::Utc>>,
}

struct Host {
    name: String,
    endpoint: String,
    tls: Option<PathBuf>,
    /// Connected and version-negotiated on first use; retried until it works.
    client: tokio::sync::OnceCell<Docker>,
}

/// Where a session's container was last seen.
#[derive(Debug, Clone)]
struct Placed {
    host: usize,
    id: String,
    paused: bool,
}

#[derive(Clone)]
pub struct DockerProvider {
    inner: Arc<Inner>,
}

struct Inner {
    hosts: Vec<Host>,
    config: DockerConfig,
    records: PathBuf,
    placed: Mutex<HashMap<String, Placed>>,
    calls: AtomicU64,
    changes: tokio::sync::watch::Sender<u64>,
    events_started: AtomicBool,
    cancel: CancellationToken,
    /// Per host: the last list, reused while the events stream says nothing changed.
    cache: Vec<HostCache>,
    /// Workspaces of destroyed sessions (`workspace.tar`), kept for a while.
    kept: super::kept::Kept,
    /// What is happening to a session now (an image pull's progress), for status.
    activity: tokio::sync::watch::Sender<BTreeMap<String, String>>,
}

/// A host's last list, valid while its generation holds: every event on the host, every step
/// vessel runs there, and every (re)connection of the events stream moves the generation on.
/// A no-op pass then costs no Engine API call; a list is at most `CACHE_MAX_AGE` old anyway.
#[derive(Default)]
struct HostCache {
    generation: AtomicU64,
    /// Since when the events stream has been read (the cache is trusted only for lists begun
    /// a little after, so the engine has surely registered the subscription).
    streaming_since: Mutex<Option<tokio::time::Instant>>,
    last: Mutex<Option<CachedList>>,
}

struct CachedList {
    generation: u64,
    at: tokio::time::Instant,
    containers: Vec<convert::Container>,
}

const CACHE_MAX_AGE: Duration = Duration::from_secs(30);
const STREAM_SETTLE: Duration = Duration::from_millis(500);

impl HostCache {
    fn bump(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    fn streaming(&self, since: Option<tokio::time::Instant>) {
        {
            let mut s = crate::lock_or_reset(&self.streaming_since);
            *s = since;
        }
        self.bump();
    }

    fn cached(&self, generation: u64) -> Option<Vec<convert::Container>> {
        let since = (*crate::lock_or_reset(&self.streaming_since))?;
        let last = crate::lock_or_reset(&self.last);
        let l = last.as_ref()?;
        (l.generation == generation
            && l.at >= since + STREAM_SETTLE
            && l.at.elapsed() < CACHE_MAX_AGE)
            .then(|| l.containers.clone())
    }

    fn store(&self, generation: u64, at: tokio::time::Instant, containers: &[convert::Container]) {
        {
            let mut last = crate::lock_or_reset(&self.last);
            *last = Some(CachedList {
                generation,
                at,
                containers: containers.to_vec(),
            });
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn docker_err(
    op: &'static str,
    object: impl Into<String>,
) -> impl FnOnce(bollard::errors::Error) -> ProviderError {
    let object = object.into();
    move |e| ProviderError::failed(op, object, short(&e))
}

/// A bollard error without the payloads some variants carry.
fn short(e: &bollard::errors::Error) -> String {
    match e {
        bollard::errors::Error::DockerResponseServerError {
            status_code,
            message,
        } => format!("the engine answered {status_code}: {message}"),
        bollard::errors::Error::JsonDataError { message, .. } => {
            format!("unreadable answer: {message}")
        }
        other => other.to_string(),
    }
}

fn status_of(e: &bollard::errors::Error) -> Option<u16> {
    match e {
        bollard::errors::Error::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

impl DockerProvider {
    /// A provider for `config`'s hosts, keeping its records under `records` (created if
    /// missing). Nothing is contacted until the first call.
    pub fn new(
        config: DockerConfig,
        records: PathBuf,
        kept: super::kept::Kept,
    ) -> Result<DockerProvider, DockerSetupError> {
        if config.hosts.is_empty() {
            return Err(DockerSetupError::NoHosts);
        }
        let mut hosts: Vec<Host> = Vec::new();
        for h in &config.hosts {
            if let Some(p) = crate::model::dns_label_problem(&h.name) {
                return Err(DockerSetupError::HostName {
                    name: h.name.clone(),
                    problem: p.to_string(),
                });
            }
            if hosts.iter().any(|x| x.name == h.name) {
                return Err(DockerSetupError::Duplicate(h.name.clone()));
            }
            endpoint_kind(&h.endpoint, h.tls_cert_path.as_deref()).map_err(|source| {
                DockerSetupError::Endpoint {
                    name: h.name.clone(),
                    source,
                }
            })?;
            hosts.push(Host {
                name: h.name.clone(),
                endpoint: h.endpoint.clone(),
                tls: h.tls_cert_path.clone(),
                client: tokio::sync::OnceCell::new(),
            });
        }
        hosts.sort_by(|a, b| a.name.cmp(&b.name));
        if !config.workspace.starts_with('/') || config.workspace.trim_matches('/').is_empty() {
            return Err(DockerSetupError::Workspace(config.workspace.clone()));
        }
        std::fs::create_dir_all(&records).map_err(|source| DockerSetupError::Records {
            path: records.clone(),
            source,
        })?;
        Ok(DockerProvider {
            inner: Arc::new(Inner {
                cache: (0..hosts.len()).map(|_| HostCache::default()).collect(),
                hosts,
                config,
                records,
                placed: Mutex::new(HashMap::new()),
                calls: AtomicU64::new(0),
                changes: tokio::sync::watch::channel(0).0,
                events_started: AtomicBool::new(false),
                cancel: CancellationToken::new(),
                kept,
                activity: tokio::sync::watch::channel(BTreeMap::new()).0,
            }),
        })
    }

    /// Engine API calls made so far (for benchmarks and tests).
    pub fn api_calls(&self) -> u64 {
        self.inner.calls.load(Ordering::Relaxed)
    }
}

/// How an endpoint is reached.
enum EndpointKind<'a> {
    Unix(&'a str),
    Http(&'a str),
    Tls(&'a str, &'a Path),
}

fn endpoint_kind<'a>(
    endpoint: &'a str,
    tls: Option<&'a Path>,
) -> Result<EndpointKind<'a>, EndpointError> {
    if let Some(p) = endpoint.strip_prefix("unix://") {
        return Ok(EndpointKind::Unix(p));
    }
    if endpoint.starts_with('/') {
        return Ok(EndpointKind::Unix(endpoint));
    }
    match (endpoint.split_once("://").map(|(s, _)| s), tls) {
        (Some("tcp"), Some(dir)) | (Some("https"), Some(dir)) => {
            Ok(EndpointKind::Tls(endpoint, dir))
        }
        (Some("tcp"), None) | (Some("http"), None) => Ok(EndpointKind::Http(endpoint)),
        (Some("https"), None) => Err(EndpointError::TlsWithoutCerts(endpoint.to_string())),
        _ => Err(EndpointError::Scheme(endpoint.to_string())),
    }
}

/// A client whose every call must answer within `timeout` (bollard bounds the wait for the
/// response's head; bodies are bounded by the step's own timeout).
fn connect(h: &Host, timeout: Duration) -> Result<Docker, EndpointError> {
    let v = bollard::API_DEFAULT_VERSION;
    let secs = timeout.as_secs().max(1);
    let r = match endpoint_kind(&h.endpoint, h.tls.as_deref())? {
        EndpointKind::Unix(p) => Docker::connect_with_unix(p, secs, v),
        EndpointKind::Http(a) => Docker::connect_with_http(a, secs, v),
        EndpointKind::Tls(a, dir) => Docker::connect_with_ssl(
            a,
            &dir.join("key.pem"),
            &dir.join("cert.pem"),
            &dir.join("ca.pem"),
            secs,
            v,
        ),
    };
    r.map_err(|source| EndpointError::Client {
        endpoint: h.endpoint.clone(),
        source,
    })
}

impl Inner {
    fn count(&self) {
        self.calls.fetch_add(1, Ordering::Relaxed);
    }

    /// The index of the host a step names (the first host when it names none).
    fn host_index(
        &self,
        op: &'static str,
        session: &str,
        host: Option<&str>,
    ) -> Result<usize, ProviderError> {
        let Some(name) = host else { return Ok(0) };
        self.hosts
            .iter()
            .position(|h| h.name == name)
            .ok_or_else(|| {
                ProviderError::failed(
                    op,
                    session,
                    format!("no docker host named `{name}` is configured"),
                )
            })
    }

    async fn client(&self, host: usize) -> Result<&Docker, ProviderError> {
        let h = self
            .hosts
            .get(host)
            .ok_or_else(|| ProviderError::failed("reach", "docker host", "no such host"))?;
        h.client
            .get_or_try_init(|| async {
                let d = connect(h, self.config.call_timeout.std()).map_err(|e| {
                    ProviderError::caused(
                        "connect to",
                        format!("docker host {}", h.name),
                        Arc::new(e),
                    )
                })?;
                self.count();
                d.negotiate_version().await.map_err(docker_err(
                    "reach",
                    format!("docker host {} ({})", h.name, h.endpoint),
                ))
            })
            .await
    }

    /// The host's client for a workspace upload: `transfer_timeout` instead of `call_timeout`.
    async fn transfer_client(&self, host: usize) -> Result<Docker, ProviderError> {
        let d = self.client(host).await?;
        Ok(d.clone().with_timeout(self.config.transfer_timeout.std()))
    }

    /// Containers on `host` matching `filters` (all states).
    async fn list(
        &self,
        host: usize,
        filters: HashMap<String, Vec<String>>,
    ) -> Result<Vec<convert::Container>, ProviderError> {
        let d = self.client(host).await?;
        let what = format!("containers on docker host {}", self.hosts[host].name);
        self.count();
        let r = d
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..Default::default()
            }))
            .await;
        match r {
            Ok(list) => convert::from_summaries(&list)
                .map_err(|e| ProviderError::caused("list", what, Arc::new(e))),
            // Podman reports states bollard's enum lacks (`stopped`): read the answer leniently.
            Err(bollard::errors::Error::JsonDataError { contents, .. }) => {
                convert::from_json(&contents)
                    .map_err(|e| ProviderError::caused("list", what, Arc::new(e)))
            }
            Err(e) => Err(docker_err("list", what)(e)),
        }
    }

    fn marker_filter(&self) -> HashMap<String, Vec<String>> {
        HashMap::from([(
            "label".to_string(),
            vec![format!("{MARKER}={}", self.config.instance)],
        )])
    }

    fn owned(&self, c: &convert::Container) -> bool {
        c.owned(&self.config.instance)
    }

    /// vessel's containers on `host` and the foreign ones named like vessel's.
    async fn list_host(&self, host: usize) -> Result<Vec<convert::Container>, ProviderError> {
        let cache = &self.cache[host];
        let generation = cache.generation.load(Ordering::SeqCst);
        if let Some(list) = cache.cached(generation) {
            return Ok(list);
        }
        let at = tokio::time::Instant::now();
        let by_name = HashMap::from([("name".to_string(), vec!["vessel-".to_string()])]);
        let (owned, named) = tokio::join!(
            self.list(host, self.marker_filter()),
            self.list(host, by_name)
        );
        let mut all = owned?;
        all.extend(named?.into_iter().filter(|c| !self.owned(c)));
        cache.store(generation, at, &all);
        Ok(all)
    }

    fn record_path(&self, session: &str) -> PathBuf {
        super::record::session_path(&self.records, session)
    }

    fn read_record(&self, session: &str) -> Option<Record> {
        super::record::read_session(&self.records, session)
    }

    fn write_record(&self, session: &str, r: &Record) -> Result<(), ProviderError> {
        super::record::write(&self.record_path(session), r)
    }

    /// Change the session's record, if it has one for its current container.
    fn update_record(
        &self,
        session: &str,
        id: &str,
        f: impl FnOnce(&mut Record),
    ) -> Result<(), ProviderError> {
        let before = self.read_record(session).filter(|r| r.container == id);
        let mut r = before.clone().unwrap_or(Record {
            container: id.to_string(),
            intent: Intent::Stopped,
            synced: Synced::default(),
            started: None,
        });
        f(&mut r);
        // Unchanged (a wake from a pause: still meant to run): not written again.
        if before.as_ref() == Some(&r) {
            return Ok(());
        }
        self.write_record(session, &r)
    }

    /// Where `session`'s container is: from the last observation or create, else looked up
    /// by name on every host. `None`: there is no container of vessel's for it.
    async fn locate(&self, session: &str) -> Result<Option<Placed>, ProviderError> {
        if let Some(p) = crate::lock_or_reset(&self.placed).get(session).cloned() {
            return Ok(Some(p));
        }
        for host in 0..self.hosts.len() {
            if let Some(c) = self.find(host, session).await? {
                let p = Placed {
                    host,
                    id: c.id.clone(),
                    paused: c.paused(),
                };
                self.remember(session, p.clone());
                return Ok(Some(p));
            }
        }
        Ok(None)
    }

    /// vessel's container for `session` on `host`, if there is one.
    async fn find(
        &self,
        host: usize,
        session: &str,
    ) -> Result<Option<convert::Container>, ProviderError> {
        let mut f = self.marker_filter();
        f.insert(
            "name".into(),
            vec![format!("^/?{}$", container_name(session))],
        );
        let list = self.list(host, f).await?;
        Ok(list
            .into_iter()
            .find(|c| self.owned(c) && c.name() == Some(container_name(session).as_str())))
    }

    fn remember(&self, session: &str, p: Placed) {
        {
            let mut m = crate::lock_or_reset(&self.placed);
            m.insert(session.to_string(), p);
        }
    }

    fn forget(&self, session: &str) {
        {
            let mut m = crate::lock_or_reset(&self.placed);
            m.remove(session);
        }
    }
}

impl DockerProvider {
    /// Subscribe to every host's events (once): each one pokes the loop.
    fn start_events(&self) {
        if self.inner.events_started.swap(true, Ordering::SeqCst) {
            return;
        }
        for host in 0..self.inner.hosts.len() {
            let weak = Arc::downgrade(&self.inner);
            let cancel = self.inner.cancel.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = watch_events(weak, host) => {}
                }
            });
        }
    }

    async fn observe_all(&self) -> Result<Vec<ObservedSession>, ProviderError> {
        self.start_events();
        let inner = &self.inner;
        let lists = futures_util::future::join_all(
            (0..inner.hosts.len()).map(|h| async move { (h, inner.list_host(h).await) }),
        )
        .await;
        let mut out: BTreeMap<String, ObservedSession> = BTreeMap::new();
        let mut placed: HashMap<String, Placed> = HashMap::new();
        for (host, list) in lists {
            for c in list? {
                let host_name = inner.hosts[host].name.clone();
                let Some(session) = c.session_by_name().map(str::to_string) else {
                    if inner.owned(&c) {
                        tracing::warn!(container = %c.name().unwrap_or(&c.id), host = %host_name, "a container with vessel's marker is not named after a session (renamed by hand?); left alone");
                    }
                    continue;
                };
                let owned = inner.owned(&c) && c.label(convert::SESSION) == Some(session.as_str());
                if let Some(prev) = out.get(&session)
                    && (prev.owned || !owned)
                {
                    tracing::warn!(%session, host = %host_name, "another container for this session exists on another host; left alone");
                    continue;
                }
                let state = if c.running() {
                    SessionState::Running
                } else {
                    SessionState::Stopped
                };
                if !owned {
                    out.insert(
                        session.clone(),
                        ObservedSession {
                            host: Some(host_name),
                            ..ObservedSession::bare(session, ComputeKind::Docker, state, false)
                        },
                    );
                    continue;
                }
                let spec: Option<RuntimeSpec> = c
                    .label(convert::SPEC)
                    .and_then(|s| serde_json::from_str(s).ok());
                let record = inner.read_record(&session).filter(|r| r.container == c.id);
                let state = match (state, record.as_ref().map(|r| r.intent)) {
                    (SessionState::Running, _) => SessionState::Running,
                    (_, Some(Intent::Running)) => SessionState::Failed,
                    _ if c.paused() => SessionState::Failed,
                    _ => SessionState::Stopped,
                };
                let endpoints = spec
                    .as_ref()
                    .map(|s| c.endpoints(&convert::port_numbers(s), &inner.config))
                    .unwrap_or_default();
                placed.insert(
                    session.clone(),
                    Placed {
                        host,
                        id: c.id.clone(),
                        paused: c.paused(),
                    },
                );
                out.insert(
                    session.clone(),
                    ObservedSession {
                        name: session,
                        provider: ComputeKind::Docker,
                        state,
                        owned: true,
                        fingerprint: c
                            .label(convert::FINGERPRINT)
                            .unwrap_or_default()
                            .to_string(),
                        spec,
                        endpoints,
                        source_file: c.label(convert::SOURCE_FILE).map(PathBuf::from),
                        synced_source: record.as_ref().and_then(|r| r.synced.synced_source.clone()),
                        save_to: record
                            .as_ref()
                            .and_then(|r| r.synced.save_to.clone())
                            .or_else(|| c.label(convert::SAVE_TO).map(PathBuf::from)),
                        healthy: None,
                        host: Some(host_name),
                        asleep: None,
                        started: record
                            .as_ref()
                            .and_then(|r| r.started)
                            .filter(|_| state == SessionState::Running),
                        snapshots: None,
                        half_made: None,
                    },
                );
            }
        }
        {
            let mut m = crate::lock_or_reset(&inner.placed);
            *m = placed;
        }
        Ok(out.into_values().collect())
    }

    async fn start_container(
        &self,
        session: &str,
        host: usize,
        id: &str,
    ) -> Result<(), ProviderError> {
        let d = self.inner.client(host).await?;
        self.inner.count();
        match d.start_container(id, None::<StartContainerOptions>).await {
            Ok(()) => self.inner.update_record(session, id, |r| {
                r.started = Some(chrono::Utc::now());
            }),
            // Running already: its start time stays what it was.
            Err(e) if status_of(&e) == Some(304) => Ok(()),
            Err(e) => Err(docker_err("start", session)(e)),
        }
    }

    /// Download the container's workspace into its kept copy (`workspace.tar`), streamed to
    /// disk.
    async fn keep_workspace(&self, session: &str, p: &Placed) -> Result<(), ProviderError> {
        use tokio::io::AsyncWriteExt;
        let kept = &self.inner.kept;
        let err = || ProviderError::io("keep the workspace of", session);
        let tmp = kept.begin(session).map_err(err())?;
        let result = async {
            let d = self.inner.client(p.host).await?;
            self.inner.count();
            let mut stream = d.download_from_container(
                &p.id,
                Some(DownloadFromContainerOptions {
                    path: self.inner.config.workspace.clone(),
                }),
            );
            let mut f = tokio::fs::File::create(tmp.join(KEPT_RAW))
                .await
                .map_err(err())?;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(docker_err("keep the workspace of", session))?;
                f.write_all(&chunk).await.map_err(err())?;
            }
            f.sync_all().await.map_err(err())?;
            drop(f);
            // One layout whatever the container's state (see `archive::normalize`).
            let (raw, tar) = (tmp.join(KEPT_RAW), tmp.join(KEPT_TAR));
            let base = workspace_base(&self.inner.config.workspace);
            tokio::task::spawn_blocking(move || {
                archive::normalize(&raw, &tar, &base)?;
                std::fs::remove_file(&raw)
            })
            .await
            .map_err(|e| ProviderError::caused("keep the workspace of", session, Arc::new(e)))?
            .map_err(err())?;
            kept.commit(session, &tmp, chrono::Utc::now())
                .map_err(err())
        }
        .await;
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        result
    }

    /// Upload a kept `workspace.tar` into a new container (before it starts), streamed from
    /// disk.
    async fn restore_workspace(
        &self,
        session: &str,
        host: usize,
        id: &str,
        tar: &Path,
    ) -> Result<(), ProviderError> {
        use tokio::io::AsyncReadExt;
        let f = tokio::fs::File::open(tar)
            .await
            .map_err(ProviderError::io("restore the kept workspace of", session))?;
        let chunks = futures_util::stream::try_unfold(f, |mut f| async move {
            let mut buf = vec![0u8; 256 << 10];
            let n = f.read(&mut buf).await?;
            buf.truncate(n);
            Ok::<_, std::io::Error>((n > 0).then(|| (bytes::Bytes::from(buf), f)))
        });
        // The archive holds the workspace directory by its own name: it goes in its parent.
        let parent = Path::new(&self.inner.config.workspace)
            .parent()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "/".into());
        let d = self.inner.transfer_client(host).await?;
        self.inner.count();
        d.upload_to_container(
            id,
            Some(UploadToContainerOptions {
                path: parent,
                ..Default::default()
            }),
            bollard::body_try_stream(chunks),
        )
        .await
        .map_err(docker_err("restore the kept workspace of", session))
    }

    async fn placed(&self, op: &'static str, session: &str) -> Result<Placed, ProviderError> {
        self.inner
            .locate(session)
            .await?
            .ok_or_else(|| ProviderError::failed(op, session, "it has no container"))
    }

    /// Resume a paused container (asleep at depth `pause`).
    async fn unpause(&self, session: &str, p: &Placed) -> Result<(), ProviderError> {
        let d = self.inner.client(p.host).await?;
        self.inner.count();
        d.unpause_container(&p.id)
            .await
            .map_err(docker_err("unpause", session))?;
        self.inner.remember(
            session,
            Placed {
                paused: false,
                ..p.clone()
            },
        );
        Ok(())
    }

    async fn stop_container(
        &self,
        session: &str,
        p: &Placed,
        stop_timeout: Option<crate::model::Duration>,
    ) -> Result<(), ProviderError> {
        if p.paused {
            // A paused container takes no signal: resumed first, then stopped as any other.
            let _ = self.unpause(session, p).await;
        }
        let secs = convert::stop_seconds(stop_timeout);
        // The engine answers once the container has stopped: its stop timeout, then the call's.
        let d = self.inner.client(p.host).await?.clone().with_timeout(
            self.inner.config.call_timeout.std() + Duration::from_secs(secs.max(0) as u64),
        );
        self.inner.count();
        let r = d
            .stop_container(
                &p.id,
                Some(StopContainerOptions {
                    t: Some(secs),
                    signal: None,
                }),
            )
            .await;
        match r {
            Ok(()) => Ok(()),
            Err(e) if matches!(status_of(&e), Some(304 | 404)) => Ok(()),
            Err(e) => Err(docker_err("stop", session)(e)),
        }
    }
}

impl SessionSteps for DockerProvider {
    async fn pull_image(
        &self,
        session: &str,
        image: &str,
        pull: crate::model::PullPolicy,
        host: Option<&str>,
    ) -> Result<(), ProviderError> {
        let host = self.inner.host_index("pull image for", session, host)?;
        self.inner.ensure_image(host, session, image, pull).await
    }

    async fn create(&self, req: &CreateArgs<'_>) -> Result<(), ProviderError> {
        let inner = &self.inner;
        let session = req.session;
        let start = req.start;
        let host = inner.host_index("create", session, req.host)?;
        let host_name = inner.hosts[host].name.as_str();
        // The image first (by the plan's pull policy): a pull that fails makes nothing.
        if let Some(image) = &req.spec.image {
            inner
                .ensure_image(host, session, image, req.spec.pull.unwrap_or_default())
                .await?;
        }
        let d = inner.client(host).await?;
        let body = convert::create_body(req, host_name, &inner.config)
            .map_err(|e| ProviderError::caused("create", session, Arc::new(e)))?;
        inner.count();
        let created = d
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(container_name(session)),
                    ..Default::default()
                }),
                body,
            )
            .await;
        let id = match created {
            Ok(r) => r.id,
            Err(e) if status_of(&e) == Some(409) => {
                // The name is taken: ours from an interrupted create (carry on), another spec
                // of ours (destroy first), or not ours (never touched).
                let existing = inner.find(host, session).await?.ok_or_else(|| {
                    ProviderError::failed(
                        "create",
                        session,
                        format!(
                            "a container named {} that vessel did not create is in the way on docker host {}",
                            container_name(session),
                            inner.hosts[host].name
                        ),
                    )
                })?;
                if existing.label(convert::FINGERPRINT) != Some(req.fingerprint) {
                    return Err(ProviderError::failed(
                        "create",
                        session,
                        "a container with another spec exists; it must be destroyed first",
                    ));
                }
                existing.id
            }
            Err(e) => return Err(docker_err("create", session)(e)),
        };
        inner.remember(
            session,
            Placed {
                host,
                id: id.clone(),
                paused: false,
            },
        );
        let intent = if start {
            Intent::Running
        } else {
            Intent::Stopped
        };
        inner.update_record(session, &id, |r| {
            r.intent = intent;
            r.synced.save_to = req.save_to.map(Path::to_path_buf);
        })?;
        if req.restore
            && let Some(k) = inner.kept.get(session, chrono::Utc::now())
        {
            self.restore_workspace(session, host, &id, &k.join(KEPT_TAR))
                .await?;
            let _ = inner.kept.remove(session);
            tracing::info!(%session, "restored its kept workspace");
        }
        if start {
            self.start_container(session, host, &id).await?;
        }
        Ok(())
    }
    async fn update(
        &self,
        session: &str,
        _spec: &RuntimeSpec,
        _fingerprint: &str,
        _restart: bool,
    ) -> Result<(), ProviderError> {
        // Every field a container is made from is fixed at create: the plan replaces.
        Err(ProviderError::failed(
            "update",
            session,
            "a docker session's spec does not change in place; it is replaced",
        ))
    }
    async fn start(&self, session: &str) -> Result<(), ProviderError> {
        let p = self.placed("start", session).await?;
        self.inner
            .update_record(session, &p.id, |r| r.intent = Intent::Running)?;
        if p.paused {
            return self.unpause(session, &p).await;
        }
        match self.start_container(session, p.host, &p.id).await {
            Ok(()) => Ok(()),
            // Paused behind the cache's back (a pause by another vessel, or by hand): resumed.
            Err(e) => self.unpause(session, &p).await.map_err(|_| e),
        }
    }
    async fn stop(
        &self,
        session: &str,
        stop_timeout: Option<crate::model::Duration>,
    ) -> Result<(), ProviderError> {
        let Some(p) = self.inner.locate(session).await? else {
            return Ok(());
        };
        self.inner
            .update_record(session, &p.id, |r| r.intent = Intent::Stopped)?;
        self.stop_container(session, &p, stop_timeout).await
    }
    async fn destroy(
        &self,
        session: &str,
        stop_timeout: Option<crate::model::Duration>,
        retain: bool,
    ) -> Result<(), ProviderError> {
        let Some(p) = self.inner.locate(session).await? else {
            let _ = std::fs::remove_file(self.inner.record_path(session));
            return Ok(());
        };
        self.stop_container(session, &p, stop_timeout).await?;
        if retain {
            // Kept first: if it cannot be kept, nothing is destroyed.
            self.keep_workspace(session, &p).await?;
        }
        let d = self.inner.client(p.host).await?;
        self.inner.count();
        let r = d
            .remove_container(
                &p.id,
                Some(RemoveContainerOptions {
                    force: true,
                    v: self.inner.config.remove_volumes,
                    link: false,
                }),
            )
            .await;
        match r {
            Ok(()) => {}
            Err(e) if status_of(&e) == Some(404) => {}
            Err(e) => return Err(docker_err("remove", session)(e)),
        }
        self.inner.forget(session);
        match std::fs::remove_file(self.inner.record_path(session)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ProviderError::io("remove the record of", session)(e)),
        }
    }
    async fn wait_healthy(
        &self,
        session: &str,
        port: &str,
        check: Option<&Health>,
    ) -> Result<(), ProviderError> {
        let p = self.placed("check health of", session).await?;
        let mut f = self.inner.marker_filter();
        f.insert("id".into(), vec![p.id.clone()]);
        let path = check.map(|h| h.path.as_str());
        // A look is an Engine API call: every 200 ms until the port has an address, then
        // every second.
        let every = (Duration::from_secs(1), Duration::from_millis(200));
        super::health::wait_until_healthy(path, every.0, every.1, || async {
            let c = self
                .inner
                .list(p.host, f.clone())
                .await?
                .into_iter()
                .next()
                .ok_or_else(|| {
                    ProviderError::failed("check health of", session, "its container went away")
                })?;
            if !c.running() {
                return Err(ProviderError::failed(
                    "check health of",
                    session,
                    format!(
                        "its container is not running ({})",
                        c.status
                            .as_deref()
                            .or(c.state.as_deref())
                            .unwrap_or("unknown")
                    ),
                ));
            }
            let spec: Option<RuntimeSpec> = c
                .label(convert::SPEC)
                .and_then(|s| serde_json::from_str(s).ok());
            let ports = spec.as_ref().map(convert::port_numbers).unwrap_or_default();
            Ok(c.endpoints(&ports, &self.inner.config).remove(port))
        })
        .await
    }
    async fn sync_source(
        &self,
        session: &str,
        path: &Path,
        exclude: &[String],
        save_to: &Option<PathBuf>,
    ) -> Result<(), ProviderError> {
        no_symlinks("sync source into", session, path)?;
        let p = self.placed("sync source into", session).await?;
        let (from, prefix, ex) = (
            path.to_path_buf(),
            self.inner.config.workspace.clone(),
            exclude.to_vec(),
        );
        let tar = tokio::task::spawn_blocking(move || archive::pack(&from, &prefix, &ex))
            .await
            .map_err(|e| ProviderError::caused("sync source into", session, Arc::new(e)))?
            .map_err(ProviderError::io(
                "sync source into",
                format!("{session} from {}", path.display()),
            ))?;
        let d = self.inner.transfer_client(p.host).await?;
        self.inner.count();
        d.upload_to_container(
            &p.id,
            Some(UploadToContainerOptions {
                path: "/".into(),
                ..Default::default()
            }),
            bollard::body_full(tar.into()),
        )
        .await
        .map_err(docker_err("sync source into", session))?;
        self.inner.update_record(session, &p.id, |r| {
            r.synced.synced_source = Some(path.to_path_buf());
            r.synced.exclude = exclude.to_vec();
            r.synced.save_to = save_to.clone();
        })
    }
    async fn save_work(&self, session: &str, path: &Path) -> Result<(), ProviderError> {
        no_symlinks("save work of", session, path)?;
        let p = self.placed("save work of", session).await?;
        let exclude = self
            .inner
            .read_record(session)
            .filter(|r| r.container == p.id)
            .map(|r| r.synced.exclude)
            .unwrap_or_default();
        let d = self.inner.client(p.host).await?;
        self.inner.count();
        let workspace = self.inner.config.workspace.clone();
        let mut stream = d.download_from_container(
            &p.id,
            Some(DownloadFromContainerOptions {
                path: workspace.clone(),
            }),
        );
        let mut tar: Vec<u8> = Vec::new();
        while let Some(chunk) = stream.next().await {
            tar.extend_from_slice(&chunk.map_err(docker_err("save work of", session))?);
        }
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let tmp = self.inner.records.join(format!(
            ".save-{session}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let dest = path.to_path_buf();
        let base = Path::new(&workspace)
            .file_name()
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("workspace"));
        let t = tmp.clone();
        let r = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            std::fs::create_dir_all(&t)?;
            archive::unpack(&tar, &t)?;
            super::workspace::save_atomically(&t.join(base), &dest, &exclude)
        })
        .await;
        let _ = std::fs::remove_dir_all(&tmp);
        r.map_err(|e| ProviderError::caused("save work of", session, Arc::new(e)))?
            .map_err(ProviderError::io(
                "save work of",
                format!("{session} to {}", path.display()),
            ))
    }
}

/// Follow `host`'s events for vessel's containers; every one pokes the loop. Reconnects with
/// backoff while the provider lives; a reconnect pokes too (events may have been missed).
async fn watch_events(weak: Weak<Inner>, host: usize) {
    let mut backoff = Duration::from_millis(250);
    loop {
        let client: Option<(Docker, String)> = {
            let Some(inner) = weak.upgrade() else { return };
            // Podman answers an events request only with its first event: the wait for the
            // answer is not bounded by the call timeout, or a quiet engine would drop it.
            let d = inner
                .client(host)
                .await
                .ok()
                .map(|d| d.clone().with_timeout(EVENTS_WAIT));
            if d.is_some() {
                inner.count();
            }
            d.map(|d| (d, inner.config.instance.clone()))
        };
        if let Some((d, instance)) = client {
            // Every container event: a foreign container named like vessel's matters too.
            let filters = HashMap::from([("type".to_string(), vec!["container".to_string()])]);
            let mut stream = d.events(Some(EventsOptions {
                filters: Some(filters),
                ..Default::default()
            }));
            let connected = tokio::time::Instant::now();
            with_cache(&weak, host, |c| c.streaming(Some(connected)));
            let mut heard = false;
            while let Some(event) = stream.next().await {
                let Ok(event) = event else { break };
                heard = true;
                with_cache(&weak, host, HostCache::bump);
                if concerns_vessel(&event, &instance) && !poke(&weak) {
                    return;
                }
            }
            with_cache(&weak, host, |c| c.streaming(None));
            // A stream that worked for a while and then ended may have missed events: a pass
            // looks. One that failed at once (the engine is down) backs off, and pokes nothing:
            // a down engine must not drive passes.
            if heard || connected.elapsed() >= EVENTS_HEALTHY {
                backoff = Duration::from_millis(500);
                if !poke(&weak) {
                    return;
                }
            } else {
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        } else {
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
        tokio::time::sleep(backoff).await;
    }
}

/// How long an events request may wait for its first event before it is made again.
const EVENTS_WAIT: Duration = Duration::from_secs(3600);

/// An events stream that lasted this long was connected (the engine sends nothing while
/// nothing happens, so silence alone says nothing).
const EVENTS_HEALTHY: Duration = Duration::from_secs(5);

fn with_cache(weak: &Weak<Inner>, host: usize, f: impl FnOnce(&HostCache)) {
    if let Some(inner) = weak.upgrade()
        && let Some(c) = inner.cache.get(host)
    {
        f(c);
    }
}

/// An event about one of this instance's containers, or one named like vessel's (or one that
/// does not say which: better a pass too many than a change missed).
fn concerns_vessel(e: &bollard::models::EventMessage, instance: &str) -> bool {
    let Some(attrs) = e.actor.as_ref().and_then(|a| a.attributes.as_ref()) else {
        return true;
    };
    let ours = attrs.get(MARKER).is_some_and(|v| v == instance);
    let named = attrs
        .get("name")
        .is_none_or(|n| n.trim_start_matches('/').starts_with("vessel-"));
    ours || named
}

fn poke(weak: &Weak<Inner>) -> bool {
    match weak.upgrade() {
        Some(inner) => {
            inner.changes.send_modify(|v| *v += 1);
            true
        }
        None => false,
    }
}

impl ComputeProvider for DockerProvider {
    fn kind(&self) -> ComputeKind {
        ComputeKind::Docker
    }

    fn observe(&self) -> BoxFut<'_, Result<Vec<ObservedSession>, ProviderError>> {
        Box::pin(self.observe_all())
    }

    fn apply<'a>(&'a self, action: &'a SessionAction) -> BoxFut<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            let r = super::run_session_step(self, action).await;
            // vessel changed something: the next observation lists again. A health check or
            // a download of the workspace changes nothing a list shows.
            if !matches!(
                action,
                SessionAction::WaitHealthy { .. }
                    | SessionAction::SaveWork { .. }
                    | SessionAction::PullImage { .. }
            ) {
                for c in &self.inner.cache {
                    c.bump();
                }
            }
            r
        })
    }

    fn pause<'a>(&'a self, session: &'a str) -> BoxFut<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            let p = self.placed("pause", session).await?;
            let d = self.inner.client(p.host).await?;
            self.inner.count();
            match d.pause_container(&p.id).await {
                Ok(()) => {}
                // Already paused.
                Err(e) if status_of(&e) == Some(304) => {}
                Err(e) => return Err(docker_err("pause", session)(e)),
            }
            self.inner.remember(session, Placed { paused: true, ..p });
            Ok(())
        })
    }

    fn endpoints<'a>(
        &'a self,
        session: &'a str,
    ) -> BoxFut<'a, Result<BTreeMap<String, String>, ProviderError>> {
        Box::pin(async move {
            let p = self.placed("find the ports of", session).await?;
            let Some(c) = self.inner.find(p.host, session).await? else {
                return Ok(BTreeMap::new());
            };
            let spec: Option<RuntimeSpec> = c
                .label(convert::SPEC)
                .and_then(|s| serde_json::from_str(s).ok());
            Ok(spec
                .map(|s| c.endpoints(&convert::port_numbers(&s), &self.inner.config))
                .unwrap_or_default())
        })
    }

    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.inner.changes.subscribe())
    }

    fn activity(&self) -> Option<tokio::sync::watch::Receiver<BTreeMap<String, String>>> {
        Some(self.inner.activity.subscribe())
    }

    fn retained(
        &self,
    ) -> BoxFut<'_, Result<Vec<(String, crate::model::observed::RetainedWorkspace)>, ProviderError>>
    {
        Box::pin(self.inner.kept.list_now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(config: &str) -> Result<DockerProvider, DockerSetupError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let config: DockerConfig = serde_saphyr::from_str(config).expect("config");
        let kept = super::super::kept::Kept::new(
            dir.path().join("kept"),
            ComputeKind::Docker,
            Duration::from_secs(60),
        );
        DockerProvider::new(config, dir.path().join("records"), kept)
    }

    #[test]
    fn setup_errors_are_typed_and_keep_their_cause() {
        let e = provider("hosts: [{name: a, endpoint: 'ftp://x'}]\n")
            .err()
            .expect("an unknown scheme is refused");
        assert!(matches!(
            &e,
            DockerSetupError::Endpoint {
                source: EndpointError::Scheme(_),
                ..
            }
        ));
        assert_eq!(
            crate::error_chain(&e),
            "docker host `a`: `ftp://x` is not a unix://, tcp://, http:// or https:// endpoint"
        );
        let e = provider("hosts: [{name: a, endpoint: 'https://x:2376'}]\n")
            .err()
            .expect("TLS without certificates is refused");
        assert!(crate::error_chain(&e).contains("set tls_cert_path"));
        let e = provider(
            "hosts: [{name: a, endpoint: 'unix:///x'}, {name: a, endpoint: 'unix:///y'}]\n",
        )
        .err()
        .expect("a host twice is refused");
        assert_eq!(e.to_string(), "docker host `a` is configured twice");
    }
}
