//! The observed-state model: what providers report. Sessions with their run state, the spec
//! they were made from (and its fingerprint) and their addresses; routes host -> upstream; DNS
//! records. Every object says whether it carries vessel's ownership marker. Providers that
//! could not be observed are listed as gaps: unknown is not absent.
//!
//! Serialisable, so the daemon can keep the last snapshot in the state directory and
//! `vessel plan --observed` can plan against it with no infrastructure.

use std::collections::BTreeMap;
use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{ComputeKind, Duration, Health, Port, Size};

/// Which provider an object belongs to, as it appears in gaps and in the plan.
/// Written `compute/<kind>`, `proxy` or `dns`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProviderId {
    /// A compute provider, by kind.
    Compute(ComputeKind),
    Proxy,
    Dns,
}

impl std::fmt::Display for ProviderId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProviderId::Compute(k) => write!(f, "compute/{}", k.as_str()),
            ProviderId::Proxy => f.write_str("proxy"),
            ProviderId::Dns => f.write_str("dns"),
        }
    }
}

/// A provider id that names no provider.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderIdError {
    #[error("unknown provider `{0}`")]
    Unknown(String),
    #[error("unknown compute provider `{0}`")]
    UnknownCompute(String),
}

impl std::str::FromStr for ProviderId {
    type Err = ProviderIdError;
    fn from_str(s: &str) -> Result<Self, ProviderIdError> {
        match s {
            "proxy" => Ok(ProviderId::Proxy),
            "dns" => Ok(ProviderId::Dns),
            _ => {
                let kind = s
                    .strip_prefix("compute/")
                    .ok_or_else(|| ProviderIdError::Unknown(s.into()))?;
                serde_json::from_value(serde_json::Value::String(kind.into()))
                    .map(ProviderId::Compute)
                    .map_err(|_| ProviderIdError::UnknownCompute(kind.into()))
            }
        }
    }
}

impl Serialize for ProviderId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ProviderId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for ProviderId {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ProviderId".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({"type": "string", "pattern": "^(compute/[a-z]+|proxy|dns)$"})
    }
}

/// What a compute provider needs to run a session: the plan and session merged and resolved.
/// Recorded on the session when it is created, so later passes can diff field by field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RuntimeSpec {
    pub compute: ComputeKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<crate::model::Guest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone: Option<crate::model::CloneMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull: Option<crate::model::PullPolicy>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Size>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<Size>,
    #[serde(default)]
    pub ports: BTreeMap<String, Port>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Health>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firewall: Option<crate::model::Firewall>,
    /// A proxmox VM takes `cpus` and `memory` changes while running (the plan's `hotplug`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hotplug: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_timeout: Option<Duration>,
}

impl RuntimeSpec {
    /// The port a session's health is judged by: the plan's `health.port`, else `ide`, else
    /// the first by name. The planner puts it in each wait step; a provider that hands a
    /// session its main port (`PORT`) uses the same one.
    pub fn health_port(&self) -> Option<&str> {
        if let Some(p) = self.health.as_ref().and_then(|h| h.port.as_deref()) {
            return Some(p);
        }
        if self.ports.contains_key("ide") {
            return Some("ide");
        }
        self.ports.keys().next().map(String::as_str)
    }

    /// A short, stable fingerprint of everything that cannot change without a replace.
    /// `health`, `stop_timeout` and `pull` are left out: they travel with the steps that use
    /// them and never need a replace.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let immutable = RuntimeSpec {
            health: None,
            stop_timeout: None,
            pull: None,
            ..self.clone()
        };
        let json = serde_json::to_vec(&immutable).unwrap_or_default();
        hex::encode(&Sha256::digest(&json)[..8])
    }

    /// The spec as `key: value` lines, for field-level diffs.
    pub fn lines(&self) -> Vec<String> {
        let v = serde_json::to_value(self).unwrap_or_default();
        let mut out = Vec::new();
        if let serde_json::Value::Object(map) = v {
            for (k, v) in map {
                match v {
                    serde_json::Value::Object(m) => {
                        for (k2, v2) in m {
                            out.push(format!("{k}.{k2}: {}", scalar(&v2)));
                        }
                    }
                    other => out.push(format!("{k}: {}", scalar(&other))),
                }
            }
        }
        out
    }
}

fn scalar(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The state a compute provider reports for a session.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum SessionState {
    Running,
    /// Stopped with its data kept (both `sleeping` and `stopped` sessions look like this).
    Stopped,
    /// Exited or crashed without being asked to.
    Failed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ObservedSession {
    pub name: String,
    pub provider: ComputeKind,
    pub state: SessionState,
    /// Carries vessel's ownership marker.
    pub owned: bool,
    /// The fingerprint of the spec it was created from.
    #[serde(default)]
    pub fingerprint: String,
    /// The spec it was created from, where the provider records it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<RuntimeSpec>,
    /// Where each named port answers, such as `127.0.0.1:20001`.
    #[serde(default)]
    pub endpoints: BTreeMap<String, String>,
    /// The desired-state file it was created from, relative to the tree's root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_file: Option<PathBuf>,
    /// The source path last synced in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synced_source: Option<PathBuf>,
    /// Where its work is saved before it stops or goes away (`save_on_stop`), if anywhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub save_to: Option<PathBuf>,
    /// Its health, where the provider knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy: Option<bool>,
    /// The provider's host it runs on, for providers with several (docker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Put to sleep by vessel (idle, or at a cap): converged, not drift. Recorded in the state
    /// directory, so a restarted vessel wakes nothing that sleeps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asleep: Option<Asleep>,
    /// When it last started, where its provider knows (for `restart_requested`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started: Option<chrono::DateTime<chrono::Utc>>,
    /// Its snapshots, where its provider takes them (proxmox).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshots: Option<Snapshots>,
    /// Its making stopped part-way (a create that failed or was cut off): what the plan does
    /// with it, finish or make again, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub half_made: Option<HalfMade>,
}

/// A session whose making stopped part-way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct HalfMade {
    /// It can be finished (its remaining steps run); otherwise it is destroyed and made
    /// again.
    pub finish: bool,
    /// How far its making got, in words (`its clone never finished`).
    pub detail: String,
}

/// The snapshots vessel took of a session, as its provider recorded them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Snapshots {
    /// Since when snapshots are kept for it (when it was made): the first is due at the first
    /// slot after this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    /// vessel's snapshots of it, oldest first.
    #[serde(default)]
    pub taken: Vec<Snapshot>,
    /// The last attempt that failed, if the last attempt failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<SnapshotFailure>,
}

/// One snapshot vessel took.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Snapshot {
    pub name: String,
    /// The schedule's slot it was taken for.
    pub slot: chrono::DateTime<chrono::Utc>,
}

/// A snapshot that could not be taken (or pruned): when, and the provider's words.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SnapshotFailure {
    pub at: chrono::DateTime<chrono::Utc>,
    pub error: String,
}

/// A session vessel put to sleep: since when, how deep, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Asleep {
    pub since: chrono::DateTime<chrono::Utc>,
    pub depth: crate::model::SleepDepth,
    pub reason: SleepReason,
}

/// Why a session sleeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SleepReason {
    /// No traffic for its idle timeout.
    Idle,
    /// Declared `state: sleeping`, and not yet woken.
    Declared,
    /// Put to sleep to make room under a cap.
    Cap,
}

impl SleepReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SleepReason::Idle => "idle",
            SleepReason::Declared => "declared",
            SleepReason::Cap => "cap",
        }
    }
}

impl ObservedSession {
    /// A session known only by name and state: no spec, fingerprint, endpoints or records
    /// (one in the way, or one vessel cannot read).
    pub fn bare(
        name: impl Into<String>,
        provider: ComputeKind,
        state: SessionState,
        owned: bool,
    ) -> ObservedSession {
        ObservedSession {
            name: name.into(),
            provider,
            state,
            owned,
            fingerprint: String::new(),
            spec: None,
            endpoints: BTreeMap::new(),
            source_file: None,
            synced_source: None,
            save_to: None,
            healthy: None,
            host: None,
            asleep: None,
            started: None,
            snapshots: None,
            half_made: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ObservedRoute {
    /// Lower-cased host.
    pub host: String,
    /// Its path prefix, for a route that serves only part of its host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The prefix is taken off the request's path before it goes on.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub strip_prefix: bool,
    /// Where it forwards, such as `127.0.0.1:20001`.
    pub upstream: String,
    pub owned: bool,
    /// The session it routes to, for vessel's routes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// The explicit `kind: Route` it came from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
}

impl ObservedRoute {
    /// Its identity in `Observed::routes` and in plans: `host`, or `host/path` (`route_key`).
    pub fn key(&self) -> String {
        super::route_key(&self.host, self.path.as_deref())
    }
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
pub enum RecordType {
    A,
    #[allow(clippy::upper_case_acronyms)]
    AAAA,
    #[allow(clippy::upper_case_acronyms)]
    CNAME,
}

impl RecordType {
    pub fn as_str(self) -> &'static str {
        match self {
            RecordType::A => "A",
            RecordType::AAAA => "AAAA",
            RecordType::CNAME => "CNAME",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ObservedRecord {
    /// The record's name, lower-cased, without a trailing dot.
    pub name: String,
    pub rtype: RecordType,
    pub content: String,
    pub owned: bool,
    /// The session it serves, as recorded with vessel's ownership marker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
}

/// A destroyed session's workspace, kept by its compute provider to be restored if the
/// session is declared again before `until`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RetainedWorkspace {
    pub provider: ComputeKind,
    /// When the session was destroyed.
    pub since: chrono::DateTime<chrono::Utc>,
    /// When the copy is deleted.
    pub until: chrono::DateTime<chrono::Utc>,
    /// Its size on disk, where the provider knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
}

/// Everything observed in one pass.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(title = "vessel observed snapshot")]
pub struct Observed {
    /// By session name.
    #[serde(default)]
    pub sessions: BTreeMap<String, ObservedSession>,
    /// By host, or `host/path` for a route with a path prefix (`ObservedRoute::key`).
    #[serde(default)]
    pub routes: BTreeMap<String, ObservedRoute>,
    /// By `name/TYPE`.
    #[serde(default)]
    pub records: BTreeMap<String, ObservedRecord>,
    /// Providers that could not be observed, with why.
    #[serde(default)]
    pub gaps: BTreeMap<ProviderId, String>,
    /// Of the gaps, those only rate-limited (the API asked vessel to wait, or vessel held its
    /// calls back to stay within its budget): degraded, not failed. Still gaps: nothing there
    /// is created or removed until they can be read again.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub degraded: BTreeMap<ProviderId, String>,
    /// Workspaces of destroyed sessions, kept for a while, by session name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub retained: BTreeMap<String, RetainedWorkspace>,
    /// Session names that more than one compute provider reports, with the providers: such a
    /// session is left as it is everywhere (`sessions` holds the first report) until all but
    /// one are removed by hand.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub duplicates: BTreeMap<String, Vec<ComputeKind>>,
    /// Sessions a compute provider that is a gap now reported when it was last observed,
    /// with that provider (carried from one observation to the next while the gap lasts):
    /// as far as vessel knows they are still there, so no fallback places them elsewhere.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unreachable: BTreeMap<String, ComputeKind>,
}

impl Observed {
    pub fn record_key(name: &str, rtype: RecordType) -> String {
        format!("{name}/{}", rtype.as_str())
    }

    pub fn is_observed(&self, p: &ProviderId) -> bool {
        !self.gaps.contains_key(p)
    }

    /// Carry over from `previous` (the last observation) the sessions of compute providers
    /// that are gaps now: where a session was last seen, it is taken to be still.
    pub fn carry_unreachable(&mut self, previous: &Observed) {
        let last_seen = previous
            .sessions
            .values()
            .map(|s| (&s.name, s.provider))
            .chain(previous.unreachable.iter().map(|(n, k)| (n, *k)));
        for (name, kind) in last_seen {
            if !self.is_observed(&ProviderId::Compute(kind)) && !self.sessions.contains_key(name) {
                self.unreachable.insert(name.clone(), kind);
            }
        }
    }
}
