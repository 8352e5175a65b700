//! The plan's data: what a plan is (`Plan`), its steps and what each does (`Action`, in three
//! families: session, route and record steps, so a provider can only be handed its own), why
//! (`Reason`), and what is deliberately left alone (`Hold`, `Guard`). The planner makes plans;
//! the executor, the providers, the renderers and the status endpoint read them, and import
//! nothing from the planner.

use std::path::PathBuf;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::observed::{ProviderId, RecordType, RuntimeSpec};
use super::{ComputeKind, Duration, Health};

/// What one step does. Carries everything its execution needs. Each family goes to its own
/// kind of provider: a compute provider can only be handed a `SessionAction`, a proxy a
/// `RouteAction`, a DNS provider a `RecordAction`. In JSON, a step's `action` names it either
/// way (`create_session`, `upsert_route`, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Action {
    Session(SessionAction),
    Route(RouteAction),
    Record(RecordAction),
}

/// A step on one session, for its compute provider.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum SessionAction {
    CreateSession {
        session: String,
        spec: Arc<RuntimeSpec>,
        fingerprint: String,
        /// The desired-state file it comes from, recorded on the session.
        source_file: PathBuf,
        /// Where its work is saved before it stops or goes away, if anywhere.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        save_to: Option<PathBuf>,
        /// Start it once created (otherwise it is created stopped).
        start: bool,
        /// The provider's host it is placed on, for providers with several (docker).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        host: Option<String>,
        /// Restore the workspace its provider kept from an earlier session of this name.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        restore: bool,
        /// Compute kinds before this one in its plan's `compute` list that could not be
        /// observed: the session goes to a later choice.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        unreachable: Vec<ComputeKind>,
    },
    /// Change a session's spec in place (fields its provider changes without a replace);
    /// a running session restarts with it, its workspace kept.
    UpdateSession {
        session: String,
        provider: ComputeKind,
        spec: Arc<RuntimeSpec>,
        fingerprint: String,
        /// Restart it now (it is running and stays so).
        restart: bool,
    },
    StartSession {
        session: String,
        provider: ComputeKind,
        /// It runs and is restarted (stopped within `stop_timeout`, started again): a
        /// session's `restart_requested`.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        restart: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stop_timeout: Option<Duration>,
    },
    StopSession {
        session: String,
        provider: ComputeKind,
        /// How long it gets before it is killed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stop_timeout: Option<Duration>,
    },
    DestroySession {
        session: String,
        provider: ComputeKind,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stop_timeout: Option<Duration>,
        /// Keep its workspace for the retention time (to restore it if it comes back).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        retain: bool,
    },
    /// Pull a session's image before a replace takes the old session away, so that an image
    /// that cannot be pulled destroys nothing (a create pulls by itself, by the same policy).
    PullImage {
        session: String,
        provider: ComputeKind,
        image: String,
        /// When to pull: `missing` (only if the engine lacks it), `always`, or `never` (only
        /// check that the engine has it).
        pull: super::PullPolicy,
        /// The provider's host the new session goes on.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        host: Option<String>,
    },
    WaitHealthy {
        session: String,
        provider: ComputeKind,
        /// The port probed, by name, decided by the plan (`RuntimeSpec::health_port`); none
        /// when the session has no ports (nothing to wait for).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        port: Option<String>,
        /// The check to run (its path and timeout); without one, the port accepting a
        /// connection is enough.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        check: Option<Health>,
    },
    SyncSource {
        session: String,
        provider: ComputeKind,
        path: PathBuf,
        exclude: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        save_to: Option<PathBuf>,
    },
    SaveWork {
        session: String,
        provider: ComputeKind,
        path: PathBuf,
    },
    /// Take a scheduled snapshot of a session (`take`, for the schedule's slot `slot`) and
    /// delete vessel's snapshots past the schedule's `keep` (`prune`, oldest first). Its own
    /// object (`snapshots of NAME`): a snapshot that fails backs off alone and never holds
    /// the session's other steps.
    Snapshot {
        session: String,
        provider: ComputeKind,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        take: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        slot: Option<DateTime<Utc>>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        prune: Vec<String>,
    },
}

/// A step on one route, for the proxy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum RouteAction {
    UpsertRoute {
        host: String,
        /// The route's path prefix, if it serves only part of the host.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<String>,
        /// Take the prefix off the request's path before it goes to the session.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        strip_prefix: bool,
        /// Where requests go (`127.0.0.1:20001`). Empty when `upstream_from` is set.
        upstream: String,
        session: String,
        port: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        route: Option<String>,
        /// The session is made or started by steps before this one in the same plan: the
        /// upstream is the address its `port` has on this compute provider once they ran,
        /// which the executor reads from the provider (so a new session is served in the
        /// pass that makes it). The plan decides it; the executor only looks it up.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        upstream_from: Option<ComputeKind>,
    },
    RemoveRoute {
        host: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<String>,
    },
}

/// A step on one DNS record, for the DNS provider.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum RecordAction {
    UpsertRecord {
        name: String,
        rtype: RecordType,
        content: String,
        /// The session the record serves (recorded as its owner).
        session: String,
    },
    RemoveRecord {
        name: String,
        rtype: RecordType,
    },
}

impl Action {
    /// The object a step acts on, as `kind name`; steps on one object render together.
    pub fn object(&self) -> Object {
        match self {
            Action::Session(SessionAction::Snapshot { session, .. }) => {
                Object::Snapshot(session.clone())
            }
            Action::Session(a) => Object::Session(a.session().to_string()),
            Action::Route(a) => Object::Route(a.key()),
            Action::Record(a) => {
                let (name, rtype) = a.name();
                Object::Record(format!("{name} {}", rtype.as_str()))
            }
        }
    }

    /// The object's identity without allocating: (kind, name, route path, record type).
    pub fn key(&self) -> (u8, &str, Option<&str>, Option<RecordType>) {
        match self {
            Action::Session(SessionAction::Snapshot { session, .. }) => (3, session, None, None),
            Action::Session(a) => (0, a.session(), None, None),
            Action::Route(a) => (1, a.host(), a.path(), None),
            Action::Record(a) => {
                let (name, rtype) = a.name();
                (2, name, None, Some(rtype))
            }
        }
    }

    /// The session a step acts on, if it acts on one (the executor never runs two at once).
    pub fn session(&self) -> Option<&str> {
        match self {
            Action::Session(a) => Some(a.session()),
            Action::Route(_) | Action::Record(_) => None,
        }
    }

    pub fn provider(&self) -> ProviderId {
        match self {
            Action::Session(a) => ProviderId::Compute(a.provider()),
            Action::Route(_) => ProviderId::Proxy,
            Action::Record(_) => ProviderId::Dns,
        }
    }

    /// A short verb for listings and events.
    pub fn verb(&self) -> &'static str {
        match self {
            Action::Session(a) => a.verb(),
            Action::Route(a) => a.verb(),
            Action::Record(a) => a.verb(),
        }
    }
}

impl SessionAction {
    pub fn session(&self) -> &str {
        match self {
            SessionAction::CreateSession { session, .. }
            | SessionAction::UpdateSession { session, .. }
            | SessionAction::StartSession { session, .. }
            | SessionAction::StopSession { session, .. }
            | SessionAction::DestroySession { session, .. }
            | SessionAction::WaitHealthy { session, .. }
            | SessionAction::PullImage { session, .. }
            | SessionAction::SyncSource { session, .. }
            | SessionAction::SaveWork { session, .. }
            | SessionAction::Snapshot { session, .. } => session,
        }
    }

    /// The compute provider it is for.
    pub fn provider(&self) -> ComputeKind {
        match self {
            SessionAction::CreateSession { spec, .. } => spec.compute,
            SessionAction::UpdateSession { provider, .. }
            | SessionAction::StartSession { provider, .. }
            | SessionAction::StopSession { provider, .. }
            | SessionAction::DestroySession { provider, .. }
            | SessionAction::WaitHealthy { provider, .. }
            | SessionAction::PullImage { provider, .. }
            | SessionAction::SyncSource { provider, .. }
            | SessionAction::SaveWork { provider, .. }
            | SessionAction::Snapshot { provider, .. } => *provider,
        }
    }

    pub fn verb(&self) -> &'static str {
        match self {
            SessionAction::CreateSession { .. } => "create",
            SessionAction::UpdateSession { .. } => "update",
            SessionAction::StartSession { restart: true, .. } => "restart",
            SessionAction::StartSession { .. } => "start",
            SessionAction::StopSession { .. } => "stop",
            SessionAction::DestroySession { .. } => "destroy",
            SessionAction::WaitHealthy { .. } => "wait-healthy",
            SessionAction::PullImage { .. } => "pull-image",
            SessionAction::SyncSource { .. } => "sync-source",
            SessionAction::SaveWork { .. } => "save-work",
            SessionAction::Snapshot { take: Some(_), .. } => "snapshot",
            SessionAction::Snapshot { .. } => "prune-snapshots",
        }
    }
}

impl RouteAction {
    pub fn host(&self) -> &str {
        match self {
            RouteAction::UpsertRoute { host, .. } | RouteAction::RemoveRoute { host, .. } => host,
        }
    }

    /// The route's path prefix, if it has one.
    pub fn path(&self) -> Option<&str> {
        match self {
            RouteAction::UpsertRoute { path, .. } | RouteAction::RemoveRoute { path, .. } => {
                path.as_deref()
            }
        }
    }

    /// The route's identity: `host`, or `host/path` (`model::route_key`).
    pub fn key(&self) -> String {
        super::route_key(self.host(), self.path())
    }

    pub fn verb(&self) -> &'static str {
        match self {
            RouteAction::UpsertRoute { .. } => "upsert-route",
            RouteAction::RemoveRoute { .. } => "remove-route",
        }
    }

    /// Its host, and what the step leaves in the proxy there: vessel's route for an upsert,
    /// None for a removal.
    pub fn route_after(&self) -> (&str, Option<super::observed::ObservedRoute>) {
        (self.host(), self.after())
    }

    /// What the step leaves in the proxy: vessel's route for an upsert, None for a removal.
    pub fn after(&self) -> Option<super::observed::ObservedRoute> {
        match self {
            RouteAction::UpsertRoute {
                host,
                path,
                strip_prefix,
                upstream,
                session,
                route,
                ..
            } => Some(super::observed::ObservedRoute {
                host: host.clone(),
                path: path.clone(),
                strip_prefix: *strip_prefix,
                upstream: upstream.clone(),
                owned: true,
                session: Some(session.clone()),
                route: route.clone(),
            }),
            RouteAction::RemoveRoute { .. } => None,
        }
    }
}

impl RecordAction {
    /// The record's name and type.
    pub fn name(&self) -> (&str, RecordType) {
        match self {
            RecordAction::UpsertRecord { name, rtype, .. }
            | RecordAction::RemoveRecord { name, rtype } => (name, *rtype),
        }
    }

    pub fn verb(&self) -> &'static str {
        match self {
            RecordAction::UpsertRecord { .. } => "upsert-record",
            RecordAction::RemoveRecord { .. } => "remove-record",
        }
    }
}

/// An object the plan talks about.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(tag = "kind", content = "name", rename_all = "lowercase")]
pub enum Object {
    Session(String),
    Route(String),
    Record(String),
    /// A session's scheduled snapshots.
    Snapshot(String),
}

impl std::fmt::Display for Object {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Object::Session(n) => write!(f, "session {n}"),
            Object::Route(h) => write!(f, "route {h}"),
            Object::Record(r) => write!(f, "dns {r}"),
            Object::Snapshot(n) => write!(f, "snapshots of {n}"),
        }
    }
}

/// What happens to a replaced session's data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DataFate {
    /// Its work is copied back to this path first.
    SavedTo(PathBuf),
    /// Its provider keeps the workspace and the new session gets it back.
    Kept,
    /// Its workspace is discarded (no `save_on_stop`, and its provider keeps nothing).
    Discarded,
}

/// Why a step is in the plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Reason {
    /// Desired but absent.
    Missing,
    /// Present but no longer desired.
    NotDesired,
    /// Past its `expires`.
    Expired { at: DateTime<Utc> },
    /// Stopped by its expiry at `at` and expired for its `destroy_after` since: destroyed.
    Dormant { at: DateTime<Utc>, after: String },
    /// Its run state differs from the desired one.
    StateChanged { from: String, to: String },
    /// It exited or crashed and is desired running.
    Failed,
    /// A mutable field differs; the changes are listed.
    Drifted { changes: Vec<String> },
    /// Fields its provider changes in place differ; `restart` when it restarts for them;
    /// `applies` when the provider takes them without a restart, at once or later.
    Changed {
        changes: Vec<String>,
        restart: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        applies: Option<Applies>,
    },
    /// An immutable field differs, so it is destroyed and created again.
    Replaced {
        changes: Vec<String>,
        data: DataFate,
    },
    /// Part of another step's chain (health after start, source after create).
    Follows { object: Object },
    /// Its `restart_requested` is later than its last start.
    RestartRequested { at: DateTime<Utc> },
    /// Its making stopped part-way: finished, or destroyed and made again.
    HalfMade { finish: bool, detail: String },
    /// A slot of its snapshot schedule has passed since its last snapshot (`slot`), and/or
    /// it has more of vessel's snapshots than `keep`.
    SnapshotDue {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        slot: Option<DateTime<Utc>>,
        keep: u32,
        pruned: usize,
    },
}

/// When a change made in place without a restart takes effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Applies {
    /// At once, on the running session (hot-plug, or a container's limits).
    Hot,
    /// Written now, taken at its next stop and start (a VM without hot-plug).
    NextStop,
}

impl Reason {
    pub fn describe(&self) -> String {
        match self {
            Reason::Missing => "missing".into(),
            Reason::NotDesired => "no longer desired".into(),
            Reason::Expired { at } => format!("expired at {}", at.to_rfc3339()),
            Reason::Dormant { at, after } => {
                format!("dormant: expired at {} and {after} since", at.to_rfc3339())
            }
            Reason::StateChanged { from, to } => format!("state {from} -> {to}"),
            Reason::Failed => "not running (exited or failed)".into(),
            Reason::Drifted { changes } => format!("drifted: {}", changes.join(", ")),
            Reason::Changed {
                changes,
                restart,
                applies,
            } => {
                let changes = changes.join(", ");
                match (restart, applies) {
                    (true, _) => format!("update in place with a restart: {changes} changed"),
                    (false, Some(Applies::Hot)) => {
                        format!("update in place, at once (hot, no restart): {changes} changed")
                    }
                    (false, Some(Applies::NextStop)) => format!(
                        "update in place: {changes} changed; taken at its next stop (no hot-plug; nothing restarts now)"
                    ),
                    (false, None) => format!("update in place: {changes} changed"),
                }
            }
            Reason::Replaced { changes, data } => {
                let d = match data {
                    DataFate::SavedTo(p) => format!("work saved to {} first", p.display()),
                    DataFate::Kept => "workspace kept".into(),
                    DataFate::Discarded => "workspace discarded".into(),
                };
                format!("replace: {} changed; {d}", changes.join(", "))
            }
            Reason::Follows { object } => format!("follows {object}"),
            Reason::RestartRequested { at } => {
                format!("restart requested at {}", at.to_rfc3339())
            }
            Reason::HalfMade {
                finish: true,
                detail,
            } => format!("half-made ({detail}): finished"),
            Reason::HalfMade {
                finish: false,
                detail,
            } => format!("half-made ({detail}): rolled back, destroyed and made again"),
            Reason::SnapshotDue { slot, keep, pruned } => {
                let mut out = match slot {
                    Some(s) => format!("snapshot due (slot {})", s.to_rfc3339()),
                    None => "snapshots past keep".to_string(),
                };
                if *pruned > 0 {
                    out.push_str(&format!("; keep {keep}: {pruned} oldest deleted"));
                }
                out
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Step {
    pub id: usize,
    #[serde(flatten)]
    pub action: Action,
    #[serde(flatten)]
    pub reason: Reason,
    /// Steps that must succeed first (always lower ids).
    pub depends_on: Vec<usize>,
}

/// Something the plan will do once an input exists (a route waits for its session's address).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Deferred {
    pub object: Object,
    /// What it waits for: a session's address (for a route), or a route (for a record).
    pub after: Object,
}

impl Deferred {
    pub fn waiting_for(&self) -> String {
        match &self.after {
            Object::Session(s) => format!("an address for session {s}"),
            other => other.to_string(),
        }
    }
}

/// Why an object is deliberately left as it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum HoldReason {
    /// Its provider could not be observed.
    Unobserved { provider: ProviderId, error: String },
    /// It comes from a file with errors.
    Quarantined { file: Option<PathBuf> },
    /// An object vessel does not own is in the way.
    Foreign,
    /// A guard held its destroy.
    Guarded,
    /// Its session has no address to route to (stopped or asleep, and never started).
    NoAddress,
    /// No host of its compute provider is in the location it asks for.
    NoHost { location: String },
    /// A file it comes from changed moments ago: what the change takes away waits until the
    /// file has been unchanged for the settle time and a fresh pass still wants it.
    Settling { file: PathBuf, until: DateTime<Utc> },
    /// Its `source.path` does not exist: it is not made without its project.
    SourceMissing { path: PathBuf },
    /// Its spec asks for a change its compute provider cannot make (a disk that would shrink):
    /// it is left as it is.
    Refused { field: String, reason: String },
    /// More than one compute provider reports a session of this name: vessel cannot tell which
    /// is the session, so it touches none of them.
    Duplicate { providers: Vec<ComputeKind> },
    /// Starting it would take what the plans on its host ask for past the host's capacity
    /// (`capacity` of a compute host in the config).
    Capacity {
        provider: ComputeKind,
        /// The host's name; none for a provider that is one place.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        host: Option<String>,
        /// `cpus` or `memory`.
        resource: String,
        /// What it asks for, what the host has, and what the sessions that run there have
        /// already (CPUs, or a size such as `512Mi`).
        needs: String,
        capacity: String,
        used: String,
    },
    /// Starting it would take the sessions running past a cap (`limits` in the config).
    Cap {
        /// `max_running` or `max_running_per_owner`.
        limit: String,
        max: u32,
        /// For the per-owner cap, whose.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Hold {
    pub object: Object,
    #[serde(flatten)]
    pub why: HoldReason,
}

/// A safety guard that held destroys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "guard", rename_all = "snake_case")]
pub enum Guard {
    /// The plan would destroy more sessions than the budget allows.
    DestroyBudget {
        destroys: usize,
        existing: usize,
        max_count: u32,
        max_percent: u8,
    },
    /// The source has no sessions at all.
    EmptySource { destroys: usize },
    /// A file could not be read far enough to know what it declares: anything missing might
    /// be in it, so nothing is destroyed or removed.
    UnknownObjects { files: Vec<PathBuf> },
}

impl Guard {
    pub fn describe(&self) -> String {
        match self {
            Guard::DestroyBudget {
                destroys,
                existing,
                max_count,
                max_percent,
            } => format!(
                "destroy budget: {destroys} of {existing} sessions would be destroyed or replaced without saving their work (limit {max_count}, or {max_percent}%); held: pass --allow-destroy to apply"
            ),
            Guard::EmptySource { destroys } => format!(
                "empty source: it has no sessions, and {destroys} would be destroyed; held: set policy.allow_empty_source to apply"
            ),
            Guard::UnknownObjects { files } => format!(
                "{} could not be read far enough to know what it declares; nothing is destroyed or removed until it is fixed",
                files
                    .iter()
                    .map(|f| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Summary {
    pub create: usize,
    pub update: usize,
    pub replace: usize,
    pub destroy: usize,
    pub deferred: usize,
    pub held: usize,
}

/// The plan: what to do, in order, and everything deliberately not done.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(title = "vessel plan")]
pub struct Plan {
    pub steps: Vec<Step>,
    pub deferred: Vec<Deferred>,
    pub held: Vec<Hold>,
    pub guards: Vec<Guard>,
    /// The earliest future expiry: when the next pass must run at the latest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_wakeup: Option<DateTime<Utc>>,
    /// Identifies what a destroy budget or empty-source guard holds: `vessel approve` with it
    /// lets the daemon apply exactly these destroys, once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<String>,
    pub summary: Summary,
    /// Sessions asleep (by idleness, or declared `sleeping`): converged, and left so.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub asleep: Vec<AsleepSession>,
    /// Time-based changes to come (expiries, running hours, dormant cleanup), soonest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upcoming: Vec<Upcoming>,
}

/// A change the clock will bring: "user-1 expires in 2d 4h".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Upcoming {
    pub session: String,
    pub change: TimedChange,
    pub at: DateTime<Utc>,
    /// How long until then, from the plan's clock (`2d 4h`).
    #[serde(rename = "in")]
    pub after: String,
}

/// What the clock changes.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum TimedChange {
    /// Its `expires` comes.
    Expires,
    /// Its dormant time (`destroy_after`) ends: it is destroyed.
    Destroyed,
    /// Its running hours end: it sleeps.
    Sleeps,
    /// Its running hours end: it stops.
    Stops,
    /// Its running hours begin.
    Starts,
}

impl TimedChange {
    pub fn verb(self) -> &'static str {
        match self {
            TimedChange::Expires => "expires",
            TimedChange::Destroyed => "is destroyed (dormant)",
            TimedChange::Sleeps => "sleeps",
            TimedChange::Stops => "stops",
            TimedChange::Starts => "starts",
        }
    }
}

/// A session that is asleep, as the plan leaves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AsleepSession {
    pub session: String,
    /// Its declared state: `running` or `sleeping`.
    pub state: crate::model::RunState,
    pub since: DateTime<Utc>,
    pub depth: crate::model::SleepDepth,
}

impl Plan {
    /// No steps and nothing waiting: the world matches.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty() && self.deferred.is_empty()
    }

    pub fn has_changes(&self) -> bool {
        !self.is_empty()
    }
}
