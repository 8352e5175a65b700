//! Compute providers: a session is a process, a container, a VM or a pod. Each provider is a
//! folder here (`process/`, `docker/`) implementing `SessionSteps`; what they all need is
//! written once beside them: the dispatch of the plan's session steps (`run_session_step`),
//! the record of what vessel last asked (`Intent`), health probes (`health.rs`), kept
//! workspaces (`kept.rs`), command placeholders and the symlink check on source paths.

pub mod docker;
pub mod health;
pub mod kept;
pub(crate) mod local;
pub mod process;
pub mod proxmox;
pub mod qemu;
pub(crate) mod record;
pub mod workspace;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;

use std::sync::Arc;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::model::observed::ObservedSession;
use crate::model::plan::SessionAction;
use crate::model::{ComputeKind, HostCapacity, PlacementHost};

use super::{BoxFut, ProviderError};

/// What a compute provider's config gives the rest of vessel: the hosts it offers for
/// placement, how its paths are rebased, and the provider itself. Each provider's config type
/// implements it beside the provider; its kind is the one its registration line names.
pub trait ComputeConfig {
    /// Make relative paths in it relative to `base` (the config file's directory).
    fn rebase(&mut self, _base: &Path) {}
    /// The hosts a new session may be placed on, sorted by name; none for a provider that is
    /// one place.
    fn placement_hosts(&self) -> Vec<PlacementHost> {
        Vec::new()
    }
    /// What its hosts hold (`None` for a provider that is one place); none declared, none.
    fn capacity(&self) -> Vec<(Option<String>, HostCapacity)> {
        Vec::new()
    }
    /// The provider, keeping its state under `env.state_dir`.
    fn build(&self, env: &super::Env) -> Result<Arc<dyn ComputeProvider>, super::SetupError>;
}

/// The compute providers, registered: one line each, `field: ConfigType => Kind`. This makes the
/// `providers.compute` section of the config (a field per provider, its type the provider's
/// own) and the list every other part of vessel goes through (`ComputeProviders::each`).
macro_rules! compute_providers {
    ($($(#[$doc:meta])* $field:ident: $ty:ty => $kind:ident,)*) => {
        /// The compute providers sessions can use; a plan's `compute` names one.
        #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
        #[serde(deny_unknown_fields)]
        pub struct ComputeProviders {
            $(
                $(#[$doc])*
                #[serde(default, skip_serializing_if = "Option::is_none")]
                pub $field: Option<$ty>,
            )*
        }

        impl ComputeProviders {
            /// The kinds of session this build of vessel has a provider for.
            pub const REGISTERED: &[ComputeKind] = &[$(ComputeKind::$kind),*];

            /// Is a provider for `kind` configured?
            pub fn has(&self, kind: ComputeKind) -> bool {
                match kind {
                    $(ComputeKind::$kind => self.$field.is_some(),)*
                    #[allow(unreachable_patterns)]
                    _ => false,
                }
            }

            /// No compute provider at all.
            pub fn none() -> Self {
                ComputeProviders { $($field: None,)* }
            }

            /// The configured providers' configs, with the kind each makes.
            pub fn each(&self) -> Vec<(ComputeKind, &dyn ComputeConfig)> {
                let mut v: Vec<(ComputeKind, &dyn ComputeConfig)> = Vec::new();
                $(if let Some(c) = &self.$field { v.push((ComputeKind::$kind, c)); })*
                v
            }

            /// The same, to change (rebasing paths).
            pub fn each_mut(&mut self) -> Vec<&mut dyn ComputeConfig> {
                let mut v: Vec<&mut dyn ComputeConfig> = Vec::new();
                $(if let Some(c) = &mut self.$field { v.push(c); })*
                v
            }
        }
    };
}

compute_providers! {
    /// Local child processes.
    process: process::ProcessConfig => Process,
    /// Docker Engine API hosts (Docker or Podman).
    docker: docker::DockerConfig => Docker,
    /// Proxmox VE clusters: sessions are VMs or LXC containers cloned from templates.
    proxmox: proxmox::ProxmoxConfig => Proxmox,
    /// QEMU VMs on this machine: a kernel and initramfs per session, ports forwarded on
    /// 127.0.0.1, the workspace shared over virtio-9p.
    qemu: qemu::QemuConfig => Qemu,
}

impl Default for ComputeProviders {
    /// The embedded default: local processes only.
    fn default() -> Self {
        ComputeProviders {
            process: Some(process::ProcessConfig::default()),
            ..ComputeProviders::none()
        }
    }
}

impl ComputeProviders {
    /// Where each provider with several hosts may place new sessions.
    pub fn placement(&self) -> std::collections::BTreeMap<ComputeKind, Vec<PlacementHost>> {
        self.each()
            .into_iter()
            .map(|(kind, c)| (kind, c.placement_hosts()))
            .filter(|(_, hosts)| !hosts.is_empty())
            .collect()
    }

    /// What each compute host holds, where declared.
    pub fn capacity(
        &self,
    ) -> std::collections::BTreeMap<(ComputeKind, Option<String>), HostCapacity> {
        self.each()
            .into_iter()
            .flat_map(|(kind, c)| {
                c.capacity()
                    .into_iter()
                    .map(move |(host, cap)| ((kind, host), cap))
            })
            .collect()
    }
}

/// `true`, for `#[serde(default = ...)]`.
pub(crate) fn yes() -> bool {
    true
}

/// What a create step gives a compute provider.
pub struct CreateArgs<'a> {
    pub session: &'a str,
    pub spec: &'a crate::model::observed::RuntimeSpec,
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
pub(crate) use record::{Intent, Synced};

pub(crate) trait SessionSteps: Sync {
    /// Make sure a session's image is on the host it goes on, by its pull policy (before a
    /// replace takes the old session away).
    fn pull_image(
        &self,
        session: &str,
        image: &str,
        pull: crate::model::PullPolicy,
        host: Option<&str>,
    ) -> impl Future<Output = Result<(), ProviderError>> + Send;
    fn create(&self, a: &CreateArgs<'_>) -> impl Future<Output = Result<(), ProviderError>> + Send;
    /// Change a session's spec in place (the fields its kind changes without a replace);
    /// with `restart`, a running session restarts with it.
    fn update(
        &self,
        session: &str,
        spec: &crate::model::observed::RuntimeSpec,
        fingerprint: &str,
        restart: bool,
    ) -> impl Future<Output = Result<(), ProviderError>> + Send;
    fn start(&self, session: &str) -> impl Future<Output = Result<(), ProviderError>> + Send;
    /// Restart a running session (a session's `restart_requested`): by default a stop within
    /// `stop_timeout`, then a start.
    fn restart(
        &self,
        session: &str,
        stop_timeout: Option<crate::model::Duration>,
    ) -> impl Future<Output = Result<(), ProviderError>> + Send {
        async move {
            self.stop(session, stop_timeout).await?;
            self.start(session).await
        }
    }
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
    /// Wait until the session's `port` (by name, chosen by the plan) answers the check.
    fn wait_healthy(
        &self,
        session: &str,
        port: &str,
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
    /// Take the snapshot `take` (named for the schedule's `slot`) and delete vessel's
    /// snapshots `prune`. Only providers that take snapshots get such steps (the planner
    /// plans them for sessions whose provider reports `snapshots`).
    fn snapshot(
        &self,
        session: &str,
        take: Option<(&str, chrono::DateTime<chrono::Utc>)>,
        prune: &[String],
    ) -> impl Future<Output = Result<(), ProviderError>> + Send {
        let _ = (take, prune);
        async move {
            Err(ProviderError::failed(
                "snapshot",
                session,
                "its compute provider takes no snapshots",
            ))
        }
    }
}

/// Carry out one session step of the plan with `p`'s steps.
pub(crate) async fn run_session_step<P: SessionSteps>(
    p: &P,
    action: &SessionAction,
) -> Result<(), ProviderError> {
    match action {
        SessionAction::CreateSession {
            session,
            spec,
            fingerprint,
            source_file,
            save_to,
            start,
            host,
            restore,
            unreachable: _,
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
        SessionAction::UpdateSession {
            session,
            spec,
            fingerprint,
            restart,
            ..
        } => p.update(session, spec, fingerprint, *restart).await,
        SessionAction::StartSession {
            session,
            restart: true,
            stop_timeout,
            ..
        } => p.restart(session, *stop_timeout).await,
        SessionAction::StartSession { session, .. } => p.start(session).await,
        SessionAction::StopSession {
            session,
            stop_timeout,
            ..
        } => p.stop(session, *stop_timeout).await,
        SessionAction::DestroySession {
            session,
            stop_timeout,
            retain,
            ..
        } => p.destroy(session, *stop_timeout, *retain).await,
        SessionAction::WaitHealthy {
            session,
            port,
            check,
            ..
        } => match port {
            Some(port) => p.wait_healthy(session, port, check.as_ref()).await,
            // No port: nothing answers or can be waited for.
            None => Ok(()),
        },
        SessionAction::SyncSource {
            session,
            path,
            exclude,
            save_to,
            ..
        } => p.sync_source(session, path, exclude, save_to).await,
        SessionAction::SaveWork { session, path, .. } => p.save_work(session, path).await,
        SessionAction::PullImage {
            session,
            image,
            pull,
            host,
            ..
        } => p.pull_image(session, image, *pull, host.as_deref()).await,
        SessionAction::Snapshot {
            session,
            take,
            slot,
            prune,
            ..
        } => {
            let take = take.as_deref().zip(*slot);
            p.snapshot(session, take, prune).await
        }
    }
}

pub trait ComputeProvider: Send + Sync {
    fn kind(&self) -> ComputeKind;
    /// Every session carrying vessel's marker (and any in the way, marked foreign).
    fn observe(&self) -> BoxFut<'_, Result<Vec<ObservedSession>, ProviderError>>;
    /// Carry out one session step. Idempotent: applying it twice is applying it once.
    fn apply<'a>(&'a self, action: &'a SessionAction) -> BoxFut<'a, Result<(), ProviderError>>;
    /// Nothing `observe` would report has changed since it last ran, as far as the provider
    /// knows for certain (false when it cannot tell). Cheap: what it costs follows what runs
    /// or changed, never what is declared. A pass on the timer that finds every provider
    /// unchanged, and nothing else changed, does nothing.
    fn unchanged(&self) -> bool {
        false
    }
    /// The periodic resync: the next `observe` looks at the world again instead of
    /// answering from what the provider keeps in memory.
    fn resync(&self) {}
    /// Ticks when something changed by itself (a session exited), so the loop can repair it
    /// without waiting for the periodic pass.
    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }
    /// What is happening to each session now, in words (an image pull's progress), while it
    /// happens; for status. Display only: never a secret.
    fn activity(&self) -> Option<tokio::sync::watch::Receiver<BTreeMap<String, String>>> {
        None
    }
    /// Pause a running session where it is (the `pause` sleep depth: memory kept, CPU freed);
    /// `StartSession` resumes it. Only kinds whose `sleep_depths` include `pause`.
    fn pause<'a>(&'a self, session: &'a str) -> BoxFut<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            Err(ProviderError::failed(
                "pause",
                session,
                format!("{} sessions cannot be paused", self.kind().as_str()),
            ))
        })
    }
    /// Where each of a session's ports answers now (after a wake, which may have moved them).
    fn endpoints<'a>(
        &'a self,
        session: &'a str,
    ) -> BoxFut<'a, Result<BTreeMap<String, String>, ProviderError>> {
        Box::pin(async move {
            Ok(self
                .observe()
                .await?
                .into_iter()
                .find(|o| o.name == session && o.owned)
                .map(|o| o.endpoints)
                .unwrap_or_default())
        })
    }
    /// Workspaces of destroyed sessions it keeps, by session (dropping the expired ones).
    fn retained(
        &self,
    ) -> BoxFut<'_, Result<Vec<(String, crate::model::observed::RetainedWorkspace)>, ProviderError>>
    {
        Box::pin(async { Ok(Vec::new()) })
    }
    /// vessel is exiting.
    fn shutdown(&self) -> BoxFut<'_, ()> {
        Box::pin(async {})
    }
}

/// A command argument that cannot be expanded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlaceholderError {
    #[error("the command uses `{{{key}}}` but the plan has no port `{name}`")]
    NoPort { key: String, name: String },
}

/// Expand `{key}` placeholders in one command argument. `value` says what a key stands for:
/// `None` leaves the placeholder as written, `Some(Err)` refuses the argument.
pub(crate) fn expand(
    arg: &str,
    value: impl Fn(&str) -> Option<Result<String, PlaceholderError>>,
) -> Result<String, PlaceholderError> {
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
) -> Option<Result<String, PlaceholderError>> {
    let name = key.strip_prefix("port.")?;
    Some(match ports.get(name) {
        Some(p) => Ok(p.to_string()),
        None => Err(PlaceholderError::NoPort {
            key: key.into(),
            name: name.into(),
        }),
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
