//! The desired-state model: the documents people write (`Plan`, `Session`, `Route`).
//!
//! Owns the shape of the YAML, its JSON Schema and the small value types inside it. It does no
//! I/O and knows nothing of files; the loader attaches each document to where it came from.

pub mod observed;
pub mod plan;
pub mod schedule;
pub mod units;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use units::{Duration, Size};

/// The kinds of document a desired-state tree holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Kind {
    Plan,
    Session,
    Route,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Plan, Kind::Session, Kind::Route];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Plan => "Plan",
            Kind::Session => "Session",
            Kind::Route => "Route",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

macro_rules! kind_tag {
    ($tag:ident, $lit:literal) => {
        #[doc = concat!("The `kind: ", $lit, "` tag of a document.")]
        #[derive(
            Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema,
        )]
        pub enum $tag {
            #[default]
            $tag,
        }
    };
}

/// Tags that make `kind` part of each document's own type (and so of its schema).
pub mod tag {
    use super::*;
    kind_tag!(Plan, "Plan");
    kind_tag!(Session, "Session");
    kind_tag!(Route, "Route");
}

/// Where a session's compute runs.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum ComputeKind {
    /// Local child processes: the embedded default that needs nothing installed.
    #[default]
    Process,
    /// Containers through the Docker Engine API (Docker or Podman).
    Docker,
    /// QEMU microVMs.
    Qemu,
    /// Proxmox VE virtual machines or containers.
    Proxmox,
    /// Kubernetes pods.
    Kubernetes,
}

impl ComputeKind {
    /// The sleep depths sessions of this kind support (the loader refuses a plan asking for
    /// another).
    pub fn sleep_depths(self) -> &'static [SleepDepth] {
        match self {
            ComputeKind::Process
            | ComputeKind::Docker
            | ComputeKind::Proxmox
            | ComputeKind::Qemu => &[SleepDepth::Stop, SleepDepth::Pause],
            ComputeKind::Kubernetes => &[SleepDepth::Stop],
        }
    }

    pub const ALL: [ComputeKind; 5] = [
        ComputeKind::Process,
        ComputeKind::Docker,
        ComputeKind::Qemu,
        ComputeKind::Proxmox,
        ComputeKind::Kubernetes,
    ];

    /// The kind written `s` in YAML (`docker`), if any.
    pub fn parse(s: &str) -> Option<ComputeKind> {
        ComputeKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ComputeKind::Process => "process",
            ComputeKind::Docker => "docker",
            ComputeKind::Qemu => "qemu",
            ComputeKind::Proxmox => "proxmox",
            ComputeKind::Kubernetes => "kubernetes",
        }
    }
}

/// Where sessions on a plan run: one compute kind, or a preference list (`[docker, process]`).
/// A new session goes to the first kind whose provider could be observed; a session that
/// exists stays where it is as long as its kind is in the list. Never empty, no kind twice.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Compute(Vec<ComputeKind>);

impl Compute {
    pub fn one(kind: ComputeKind) -> Compute {
        Compute(vec![kind])
    }

    /// A preference list; `None` when it is empty or names a kind twice.
    pub fn list(kinds: Vec<ComputeKind>) -> Option<Compute> {
        let unique = kinds
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len()
            == kinds.len();
        (!kinds.is_empty() && unique).then_some(Compute(kinds))
    }

    /// The first choice.
    pub fn first(&self) -> ComputeKind {
        self.0.first().copied().unwrap_or_default()
    }

    /// Every kind, in order of preference.
    pub fn kinds(&self) -> &[ComputeKind] {
        &self.0
    }

    pub fn contains(&self, kind: ComputeKind) -> bool {
        self.0.contains(&kind)
    }
}

impl Default for Compute {
    fn default() -> Self {
        Compute::one(ComputeKind::default())
    }
}

impl Serialize for Compute {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0.as_slice() {
            [one] => one.serialize(s),
            many => many.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Compute {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        fn kind<E: serde::de::Error>(s: &str) -> Result<ComputeKind, E> {
            ComputeKind::parse(s).ok_or_else(|| {
                let known: Vec<&str> = ComputeKind::ALL.iter().map(|k| k.as_str()).collect();
                E::custom(format!(
                    "unknown compute `{s}`; expected one of {}",
                    known.join(", ")
                ))
            })
        }
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Compute;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a compute kind, or a list of them in order of preference")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Compute, E> {
                kind(s).map(Compute::one)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<Compute, A::Error> {
                let mut kinds = Vec::new();
                while let Some(s) = a.next_element::<String>()? {
                    kinds.push(kind(&s)?);
                }
                Compute::list(kinds).ok_or_else(|| {
                    serde::de::Error::custom(
                        "a compute list names at least one kind, and each kind once",
                    )
                })
            }
        }
        d.deserialize_any(V)
    }
}

impl JsonSchema for Compute {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Compute".into()
    }
    fn json_schema(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let kind = g.subschema_for::<ComputeKind>();
        schemars::json_schema!({
            "anyOf": [
                kind,
                {"type": "array", "items": kind, "minItems": 1, "uniqueItems": true}
            ]
        })
    }
}

/// How a change to one field of a session's spec is carried out, by compute kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FieldChange {
    /// Nothing to do: it travels with the steps that use it.
    Free,
    /// This compute kind does not use it (validation warns).
    Ignored,
    /// Changed in place; a running session restarts, its workspace kept.
    Restart,
    /// Needs a new session: destroyed and created again.
    Replace,
}

impl FieldChange {
    pub fn describe(self) -> &'static str {
        match self {
            FieldChange::Free => "changes in place",
            FieldChange::Ignored => "ignored",
            FieldChange::Restart => "changes in place with a restart",
            FieldChange::Replace => "replaces the session",
        }
    }
}

/// The fields of a plan that make a session's spec (the `RuntimeSpec`), in schema order.
pub const SPEC_FIELDS: [&str; 16] = [
    "compute",
    "image",
    "guest",
    "template",
    "clone",
    "storage",
    "pull",
    "command",
    "env",
    "cpus",
    "memory",
    "disk",
    "ports",
    "health",
    "firewall",
    "stop_timeout",
];

/// How changing `field` of a session on `kind` is carried out. The schema docs of each plan
/// field say the same (a hygiene test checks).
pub fn field_change(kind: ComputeKind, field: &str) -> FieldChange {
    use FieldChange::*;
    match (kind, field) {
        (_, "health" | "stop_timeout" | "idle_timeout" | "sleep") => Free,
        (_, "compute") => Replace,
        (ComputeKind::Process, "command" | "env" | "ports") => Restart,
        (ComputeKind::Process, _) => Ignored,
        (ComputeKind::Docker, "disk") => Ignored,
        (ComputeKind::Docker, "pull") => Free,
        (
            ComputeKind::Docker,
            "guest" | "template" | "clone" | "storage" | "firewall" | "hotplug",
        ) => Ignored,
        (ComputeKind::Proxmox, "hotplug") => Free,
        // A guest runs what its template holds; its cores, memory and disk change in place
        // (a disk only grows: the provider refuses a shrink), its ports are where routes go.
        (ComputeKind::Proxmox, "image" | "pull" | "command" | "env") => Ignored,
        (ComputeKind::Proxmox, "cpus" | "memory" | "disk" | "ports" | "firewall") => Restart,
        // A VM boots its plan's image and command: everything it runs replaces it, and the
        // proxmox-only fields mean nothing to it.
        (ComputeKind::Qemu, "guest" | "template" | "clone" | "storage" | "firewall" | "pull") => {
            Ignored
        }
        _ => Replace,
    }
}

/// When a provider that changes a running session without restarting it takes `changes` to
/// `spec` (None: its provider restarts the session for them). A proxmox container takes cores
/// and memory at once; a VM only with hot-plug (`hotplug`), else at its next stop and start;
/// a disk grows, firewall rules and ports change at once.
pub fn applies_in_place(spec: &observed::RuntimeSpec, changes: &[String]) -> Option<plan::Applies> {
    match spec.compute {
        ComputeKind::Proxmox => {
            let vm = spec.guest.unwrap_or_default() == Guest::Vm;
            let sized = changes.iter().any(|c| c == "cpus" || c == "memory");
            Some(if vm && sized && !spec.hotplug {
                plan::Applies::NextStop
            } else {
                plan::Applies::Hot
            })
        }
        _ => None,
    }
}

/// A change from `old` to `new` that a session on `kind` cannot take, with why: the plan
/// holds the session as it is and says so. Proxmox disks only grow.
pub fn refused_change(
    kind: ComputeKind,
    old: &observed::RuntimeSpec,
    new: &observed::RuntimeSpec,
) -> Option<(String, String)> {
    match (kind, old.disk, new.disk) {
        (ComputeKind::Proxmox, Some(was), Some(now))
            if now.bytes() < was.bytes() && old.compute == new.compute =>
        {
            Some((
                "disk".into(),
                format!("the disk is {was} and the plan asks for {now}; a disk never shrinks"),
            ))
        }
        _ => None,
    }
}

/// A route template of the config: a host pattern for one port (or every port) of every
/// session's plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteTemplate {
    /// The host, such as `{port}-{session}.{domain}`.
    pub host: String,
    /// The port name this template applies to, or `"*"` for every port of the plan.
    pub port: String,
    /// Publish DNS records for these hosts.
    #[serde(default)]
    pub dns: bool,
    /// While its session wakes, a browser's navigation gets a small page that reloads itself
    /// (true) or waits for the answer (false). Unset: `lifecycle.waking_page`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waking_page: Option<bool>,
}

/// A host of a compute provider a new session can be placed on (the planner places; the
/// provider's config says which hosts it has).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacementHost {
    pub name: String,
    pub location: Option<String>,
}

/// What one compute host holds: the `cpus` and `memory` of the plans of the sessions placed
/// on it are summed against these, and a session that would take the sum past either is held.
/// Unset: no limit on that.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HostCapacity {
    /// CPUs the sessions on the host may have, together (the plans' `cpus`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// Memory the sessions on the host may have, together (the plans' `memory`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Size>,
}

/// Caps on how many sessions run at once. Sessions asleep do not count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionLimits {
    /// At most this many sessions running, all together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_running: Option<u32>,
    /// At most this many sessions running for one `owner` (sessions without one count
    /// together, as one owner).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_running_per_owner: Option<u32>,
}

/// How many sessions one plan may destroy before the plan is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DestroyBudget {
    /// At most this many session destroys in one plan.
    #[serde(default = "default_max_count")]
    pub max_count: u32,
    /// At most this share (percent) of existing sessions destroyed in one plan.
    #[serde(default = "default_max_percent")]
    pub max_percent: u8,
}

impl Default for DestroyBudget {
    fn default() -> Self {
        DestroyBudget {
            max_count: default_max_count(),
            max_percent: default_max_percent(),
        }
    }
}

fn default_max_count() -> u32 {
    10
}

fn default_max_percent() -> u8 {
    50
}

/// A TCP port number, 1..65535.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, JsonSchema)]
#[schemars(transparent)]
pub struct Port(#[schemars(range(min = 1, max = 65535))] pub u16);

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = i64::deserialize(d)?;
        match u16::try_from(n) {
            Ok(p) if p >= 1 => Ok(Port(p)),
            _ => Err(serde::de::Error::custom(format!(
                "port {n} is outside 1..65535"
            ))),
        }
    }
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A size preset: what a session runs and with how much.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Plan")]
pub struct PlanSpec {
    pub kind: tag::Plan,
    /// The plan's name, a DNS label that sessions refer to.
    pub name: String,
    /// Where sessions on this plan run: one kind, or a preference list such as
    /// `[docker, process]`. A new session goes to the first kind whose provider could be
    /// observed (the plan says so: `create NAME on process (docker unreachable)`); a session
    /// that exists is never moved while its kind stays in the list.
    /// Changing it (process: replaces the session; docker: replaces the session).
    #[serde(default)]
    pub compute: Compute,
    /// The image to run (docker, kubernetes) or template to clone (proxmox, qemu).
    /// Changing it (process: ignored; docker: replaces the session).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// What a proxmox session is: `vm` (a QEMU virtual machine, the default) or `lxc` (a
    /// container).
    /// Changing it (process: ignored; docker: ignored). On proxmox it replaces the session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<Guest>,
    /// The proxmox template a session's guest is cloned from: its VMID (`9000`) or its name
    /// (`debian-12-devbox`), a template of the same guest type on the session's cluster.
    /// Changing it (process: ignored; docker: ignored). On proxmox it replaces the session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// How a proxmox guest is cloned from its template: `full` (the default: a copy of its
    /// disks, independent of the template) or `linked` (copy-on-write on the template's
    /// storage: fast, but the template must stay).
    /// Changing it (process: ignored; docker: ignored). On proxmox it replaces the session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone: Option<CloneMode>,
    /// The proxmox storage a full clone's disks go to (such as `local-lvm`); by default the
    /// template's.
    /// Changing it (process: ignored; docker: ignored). On proxmox it replaces the session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<String>,
    /// When the image is pulled from its registry: `missing` (the default) when the engine
    /// does not have it, `always` before every create or replace, `never` (it must be there).
    /// A pull runs before a replace takes the old session away; one that fails holds the
    /// session with the registry's message and destroys nothing. Credentials for private
    /// registries are in the config (`providers.compute.docker.registries`).
    /// Changing it (process: ignored; docker: changes in place).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull: Option<PullPolicy>,
    /// The command and its arguments, run without a shell. `{port.NAME}` is replaced by the
    /// port a session was given for NAME, `{workspace}` by its workspace directory.
    /// Changing it (process: changes in place with a restart; docker: replaces the session).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Environment for the session's processes.
    /// Changing it (process: changes in place with a restart; docker: replaces the session).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// CPU limit in cores, such as `1` or `0.5` (proxmox: whole cores, rounded up).
    /// Changing it (process: ignored; docker: replaces the session). On proxmox it changes
    /// in place without a restart: a container and a VM with `hotplug` take it at once, any
    /// other VM at its next stop (the plan says which).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    /// Memory limit, such as `1GiB`.
    /// Changing it (process: ignored; docker: replaces the session). On proxmox it changes
    /// in place without a restart: a container and a VM with `hotplug` take it at once, any
    /// other VM at its next stop (the plan says which).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Size>,
    /// Disk size, such as `10GiB` (proxmox: the guest's boot disk, grown to it after the
    /// clone).
    /// Changing it (process: ignored; docker: ignored). On proxmox a larger size grows the
    /// disk in place; a smaller one is refused (disks never shrink).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<Size>,
    /// Named ports the session serves, such as `{ide: 8080, app: 5173}`.
    /// Changing it (process: changes in place with a restart; docker: replaces the session).
    #[serde(default)]
    pub ports: BTreeMap<String, Port>,
    /// Firewall rules for a proxmox guest: `{allow: [{port: ide, from: 10.0.0.0/8}]}`. Each
    /// becomes an inbound TCP accept rule on the guest's firewall, marked by its comment
    /// (`vessel.<instance>`); rules vessel did not write stay as they are. The guest's
    /// firewall is enabled when there are rules (its network device needs `firewall=1`, in
    /// the template).
    /// Changing it (process: ignored; docker: ignored). On proxmox it changes in place (the
    /// rules are rewritten; nothing restarts for it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firewall: Option<Firewall>,
    /// Snapshots of a proxmox guest on a schedule: `{every: 1d, at: "00:00", keep: 7}`.
    /// Each is named by its time (`vessel_20261201_0000`), taken when a slot of the schedule
    /// has passed since the last one, and those past `keep` (vessel's own, oldest first) are
    /// deleted. A snapshot that fails is shown in status and retried with backoff; it never
    /// holds the session's other steps.
    /// Changing it (process: ignored; docker: ignored). On proxmox it changes nothing on the
    /// guest: the next snapshot follows the new schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshots: Option<SnapshotSchedule>,
    /// The proxmox VM template has CPU and memory hot-plug enabled (`hotplug: cpu,memory`
    /// and `numa: 1`): a change of `cpus` or `memory` applies to the running VM. Without it
    /// (the default) such a change is written to the VM's config and applies at its next
    /// stop. A container always takes them at once.
    /// Changing it (process: ignored; docker: ignored). On proxmox it changes nothing by
    /// itself.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hotplug: bool,
    /// How vessel decides a session is healthy; by default, its first port answers.
    /// Changing it (process: changes in place; docker: changes in place).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Health>,
    /// Put a session to sleep after this long without traffic through its routes (requests
    /// and WebSocket frames either way); the next request to any of its routes wakes it.
    /// A session may set its own.
    /// Changing it (process: changes in place; docker: changes in place).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<Duration>,
    /// How deep a session sleeps: `stop` (the default: frees its memory; a wake starts it) or
    /// `pause` (process: SIGSTOP of its group; docker: the engine's pause; proxmox: the guest
    /// suspended; qemu: QMP `stop`; memory kept, CPU freed, a wake takes milliseconds).
    /// Changing it (process: changes in place; docker: changes in place).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sleep: Option<SleepDepth>,
    /// How long a stopping session gets before it is killed.
    /// Changing it (process: changes in place; docker: changes in place).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_timeout: Option<Duration>,
    /// "Expiring soon" notifications this long before a session's `expires`, one per
    /// threshold (`[3d, 1d]`); over the config's `policy.warn_before`, under the
    /// session's own.
    /// Changing it (process: changes in place; docker: changes in place).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warn_before: Option<Vec<Duration>>,
    /// Running hours: outside them, sessions on this plan sleep or stop. A session may set
    /// its own.
    /// Changing it (process: changes in place; docker: changes in place).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<schedule::Schedule>,
}

/// A schedule of snapshots: a slot every `every`, aligned to `at` (a UTC time of day) or,
/// without it, to multiples of `every` since the Unix epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotSchedule {
    /// How often, such as `1d` or `6h`.
    pub every: Duration,
    /// The UTC time of day slots are aligned to, `HH:MM` (such as `"00:00"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([01][0-9]|2[0-3]):[0-5][0-9]$"))]
    pub at: Option<String>,
    /// How many of vessel's snapshots are kept (at least 1); older ones are deleted.
    pub keep: u32,
}

/// Why a snapshot schedule cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("`at` must be a UTC time of day as HH:MM (such as \"00:00\"), not `{0}`")]
    At(String),
    #[error("`every` must be at least one second")]
    Every,
    #[error("`keep` must be at least 1")]
    Keep,
}

impl SnapshotSchedule {
    /// Seconds after midnight UTC that slots are aligned to.
    fn offset(&self) -> Result<i64, ScheduleError> {
        let Some(at) = &self.at else {
            return Ok(0);
        };
        let bad = || ScheduleError::At(at.clone());
        let (h, m) = at.split_once(':').ok_or_else(bad)?;
        if h.len() != 2 || m.len() != 2 {
            return Err(bad());
        }
        let (h, m): (i64, i64) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
        if !(0..24).contains(&h) || !(0..60).contains(&m) {
            return Err(bad());
        }
        Ok(h * 3600 + m * 60)
    }

    /// Whether the schedule can be used: `at` well formed, `every` and `keep` not zero.
    pub fn check(&self) -> Result<(), ScheduleError> {
        if self.every.std().as_secs() == 0 {
            return Err(ScheduleError::Every);
        }
        if self.keep == 0 {
            return Err(ScheduleError::Keep);
        }
        self.offset().map(|_| ())
    }

    /// The latest slot at or before `now` (None for a schedule `check` refuses).
    pub fn last_slot(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.check().ok()?;
        let every = i64::try_from(self.every.std().as_secs()).ok()?;
        let anchor = self.offset().ok()?;
        let t = now.timestamp() - anchor;
        let slot = t.div_euclid(every) * every + anchor;
        DateTime::from_timestamp(slot, 0)
    }

    /// The first slot after `now`.
    pub fn next_slot(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let last = self.last_slot(now)?;
        let every = chrono::Duration::seconds(i64::try_from(self.every.std().as_secs()).ok()?);
        last.checked_add_signed(every)
    }

    /// The name of the snapshot taken for the slot at `slot`.
    pub fn name(slot: DateTime<Utc>) -> String {
        slot.format("vessel_%Y%m%d_%H%M%S").to_string()
    }
}

/// A proxmox guest's firewall rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Firewall {
    /// Inbound TCP connections accepted.
    #[serde(default)]
    pub allow: Vec<FirewallAllow>,
}

/// One inbound accept rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FirewallAllow {
    /// A port name of the plan (`ide`) or a port number (`22`).
    pub port: FirewallPort,
    /// Where from: an address or CIDR (`10.0.0.0/8`); anywhere when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
}

/// A port, by the plan's name for it or by number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum FirewallPort {
    Number(Port),
    Name(String),
}

/// What a proxmox session's guest is.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Guest {
    /// A QEMU virtual machine (its address from the QEMU guest agent).
    #[default]
    Vm,
    /// An LXC container.
    Lxc,
}

/// How a proxmox guest is cloned from its template.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum CloneMode {
    /// A full copy of the template's disks.
    #[default]
    Full,
    /// A linked (copy-on-write) clone on the template's storage.
    Linked,
}

/// When a container image is pulled from its registry.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum PullPolicy {
    /// When the engine does not have the image.
    #[default]
    Missing,
    /// Before every create (and before a replace takes the old container away).
    Always,
    /// Never: the image must be on the engine already.
    Never,
}

impl fmt::Display for PullPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PullPolicy::Missing => "missing",
            PullPolicy::Always => "always",
            PullPolicy::Never => "never",
        })
    }
}

/// A health check: an HTTP GET on one of the plan's ports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Health {
    /// The port name to check; by default `ide`, else the plan's first port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<String>,
    /// The HTTP path to request; any answer below 500 counts as healthy.
    #[serde(default = "default_health_path")]
    pub path: String,
    /// How long a start may take to become healthy before its step fails (default 60s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
}

fn default_health_path() -> String {
    "/".into()
}

/// The state a session should be in. Absent sessions are destroyed.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// Running and routed; with an `idle_timeout`, put to sleep after that long without
    /// traffic and woken by the next request to any of its routes.
    #[default]
    Running,
    /// Made, but asleep until the first request to one of its routes; asleep again when idle.
    Sleeping,
    /// Stopped, its data kept; requests never wake it.
    Stopped,
}

impl RunState {
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Sleeping => "sleeping",
            RunState::Stopped => "stopped",
        }
    }
}

/// How deep a session sleeps when idle.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum SleepDepth {
    /// Stopped: its memory freed; a wake starts it.
    #[default]
    Stop,
    /// Paused: its memory kept, its CPU freed; a wake resumes it in milliseconds.
    Pause,
}

impl SleepDepth {
    pub fn as_str(self) -> &'static str {
        match self {
            SleepDepth::Stop => "stop",
            SleepDepth::Pause => "pause",
        }
    }
}

/// What happens to a session once it is past `expires`.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum ExpiryAction {
    /// Stop it and keep its data.
    #[default]
    Stop,
    /// Destroy it (saving its work first if `source.save_on_stop` asks).
    Destroy,
}

/// A project directory copied into a session's workspace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Source {
    /// An absolute path on the host, inside the roots the config allows.
    pub path: PathBuf,
    /// Names or glob patterns not copied, such as `node_modules`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<String>,
    /// Copy the work back to `path` before the session is stopped or destroyed.
    #[serde(default)]
    pub save_on_stop: bool,
}

/// One user's development session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Session")]
pub struct SessionSpec {
    pub kind: tag::Session,
    /// The session's name, a DNS label; it becomes part of its hostnames.
    pub name: String,
    /// The plan it runs on.
    pub plan: String,
    /// Who the session is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// The state it should be in.
    #[serde(default)]
    pub state: RunState,
    /// A project copied in when the session is created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
    /// When the session expires (RFC 3339).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "rfc3339_opt"
    )]
    pub expires: Option<DateTime<Utc>>,
    /// What happens once it has expired.
    #[serde(default)]
    pub on_expiry: ExpiryAction,
    /// With `on_expiry: stop`: a session that stays expired this long is destroyed (its work
    /// saved first if `source.save_on_stop` asks), within the destroy budget, announced by a
    /// `dormant` notification first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destroy_after: Option<Duration>,
    /// "Expiring soon" notifications this long before `expires`, over its plan's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warn_before: Option<Vec<Duration>>,
    /// Running hours, over its plan's: outside them the session sleeps or stops.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<schedule::Schedule>,
    /// Environment added to the plan's.
    /// Changing it (process: changes in place with a restart; docker: replaces the session).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Where a new session is placed: the `location` of one of its compute provider's hosts.
    /// Placement only: a session that exists is never moved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// This session's own idle timeout, over its plan's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<Duration>,
    /// A declarative restart (RFC 3339): a running session last started before this time is
    /// restarted once (stopped within its plan's `stop_timeout` and started again; a proxmox
    /// guest reboots). Set it to now to restart a session; a time in the future restarts it
    /// then. Every compute provider reports when its sessions started (process, docker,
    /// proxmox).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "rfc3339_opt"
    )]
    pub restart_requested: Option<DateTime<Utc>>,
}

/// A hostname routed to one port of a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Route")]
pub struct RouteSpec {
    pub kind: tag::Route,
    /// The route's name, a DNS label.
    pub name: String,
    /// The hostname, such as `docs-user-1.dev.example.com`.
    pub host: String,
    /// The session it routes to.
    pub session: String,
    /// The name of the plan port it routes to.
    pub port: String,
    /// A path prefix, such as `/preview/user-1`: only requests under it (on whole segments:
    /// `/preview/user-1` and `/preview/user-1/x`, not `/preview/user-10`) take this route. The
    /// longest matching prefix on a host wins; a route without one is the host's `/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Take `path` off the request's path before it goes to the session (`/preview/user-1/x`
    /// arrives as `/x`, the query kept).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub strip_prefix: bool,
    /// Publish a DNS record for the host.
    #[serde(default)]
    pub dns: bool,
    /// While its session wakes, a browser's navigation gets a small page that reloads itself
    /// (true) or waits for the answer (false). Unset: `lifecycle.waking_page`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waking_page: Option<bool>,
}

impl RouteSpec {
    /// Its path prefix; `/` is the same as none.
    pub fn prefix(&self) -> Option<&str> {
        self.path.as_deref().filter(|p| *p != "/")
    }
}

/// A route's identity: its host, then its path prefix if it has one
/// (`preview.localhost/preview/user-1`). A route without a path is known by its host alone.
pub fn route_key(host: &str, path: Option<&str>) -> String {
    match path {
        Some(p) => format!("{host}{p}"),
        None => host.to_string(),
    }
}

/// The host and path prefix of a `route_key` (hosts hold no `/`, so it splits at the first).
pub fn split_route_key(key: &str) -> (&str, Option<&str>) {
    match key.find('/') {
        Some(i) => (&key[..i], Some(&key[i..])),
        None => (key, None),
    }
}

/// Does the request path `path` fall under `prefix`, on whole segments?
/// (`/a/b` is under `/a/b` and `/a`, not under `/a/bc`.)
pub fn path_under(path: &str, prefix: &str) -> bool {
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/') || rest.starts_with('?'))
}

/// What is wrong with a route's path prefix, if anything: it starts with `/`, has no empty,
/// `.` or `..` segment, no trailing `/`, and only characters every proxy matches literally
/// (letters, digits and `-._~!$&'()+,;=:@`).
pub fn path_problem(p: &str) -> Option<String> {
    if !p.starts_with('/') {
        return Some(format!("path `{p}` must start with `/`"));
    }
    if p == "/" {
        return None;
    }
    if p.len() > 1024 {
        return Some(format!("path `{p}` is longer than 1024 characters"));
    }
    if p.ends_with('/') {
        return Some(format!(
            "path `{p}` ends with `/`; a prefix matches whole segments, so write `{}`",
            p.trim_end_matches('/')
        ));
    }
    if let Some(c) = p
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "/-._~!$&'()+,;=:@".contains(*c)))
    {
        return Some(format!(
            "path `{p}` contains `{c}`; a path prefix is letters, digits and -._~!$&'()+,;=:@ between `/`s"
        ));
    }
    if p[1..]
        .split('/')
        .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return Some(format!("path `{p}` has an empty, `.` or `..` segment"));
    }
    None
}

/// An RFC 3339 timestamp, with an error that shows the expected form.
fn rfc3339_opt<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
    let s = String::deserialize(d)?;
    DateTime::parse_from_rfc3339(s.trim())
        .map(|t| Some(t.with_timezone(&Utc)))
        .map_err(|_| {
            serde::de::Error::custom(format!(
                "`{s}` is not an RFC 3339 timestamp; write it like `2026-12-31T00:00:00Z`"
            ))
        })
}

/// Is `s` a DNS label: 1 to 63 of `a-z`, `0-9` and `-`, not starting or ending with `-`?
pub fn dns_label_problem(s: &str) -> Option<String> {
    if s.is_empty() {
        return Some("a name cannot be empty".into());
    }
    if s.len() > 63 {
        return Some(format!(
            "`{s}` is {} characters long; a DNS label has at most 63",
            s.len()
        ));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        let hint = if c.is_ascii_uppercase() {
            format!("; try `{}`", s.to_ascii_lowercase())
        } else {
            String::new()
        };
        return Some(format!(
            "`{s}` contains `{c}`; names are DNS labels (a-z, 0-9 and -){hint}"
        ));
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Some(format!(
            "`{s}` starts or ends with `-`, which a DNS label cannot"
        ));
    }
    None
}

/// Is `s` a valid hostname (dot-separated labels, case-insensitive, optional `*.` wildcard)?
pub fn hostname_problem(s: &str) -> Option<String> {
    if s.len() > 253 {
        return Some(format!("host `{s}` is longer than 253 characters"));
    }
    let body = s.strip_prefix("*.").unwrap_or(s);
    for label in body.split('.') {
        let lower = label.to_ascii_lowercase();
        if let Some(p) = dns_label_problem(&lower) {
            return Some(format!("host `{s}` is not a valid hostname: {p}"));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels() {
        assert_eq!(dns_label_problem("user-1"), None);
        assert!(
            dns_label_problem("User-1")
                .unwrap()
                .contains("try `user-1`")
        );
        assert!(dns_label_problem("-a").is_some());
        assert!(dns_label_problem("a_b").is_some());
        assert!(dns_label_problem(&"a".repeat(64)).is_some());
        assert!(dns_label_problem("").is_some());
    }

    #[test]
    fn timestamps_parse_from_rfc3339_only() {
        let ok = serde_saphyr::from_str::<SessionSpec>(
            "kind: Session\nname: a\nplan: p\nexpires: 2026-12-31T01:00:00+01:00\n",
        );
        let want =
            DateTime::parse_from_rfc3339("2026-12-31T00:00:00Z").map(|t| t.with_timezone(&Utc));
        assert_eq!(ok.map(|s| s.expires).ok().flatten(), want.ok());
        let bad = serde_saphyr::from_str::<SessionSpec>(
            "kind: Session\nname: a\nplan: p\nexpires: 2026-12-31\n",
        );
        let msg = bad.map(|_| ()).unwrap_err().to_string();
        assert!(msg.contains("not an RFC 3339 timestamp"), "{msg}");
    }

    #[test]
    fn paths_match_on_whole_segments() {
        assert!(path_under("/preview/user-1", "/preview/user-1"));
        assert!(path_under("/preview/user-1/x", "/preview/user-1"));
        assert!(path_under("/preview/user-1?q=1", "/preview/user-1"));
        assert!(!path_under("/preview/user-10", "/preview/user-1"));
        assert!(!path_under("/preview", "/preview/user-1"));
        assert_eq!(path_problem("/preview/user-1"), None);
        assert_eq!(path_problem("/"), None);
        for bad in ["preview", "/a/", "/a//b", "/a/../b", "/a b", "/a*", "/a%2F"] {
            assert!(path_problem(bad).is_some(), "{bad}");
        }
        let key = route_key("p.localhost", Some("/a/b"));
        assert_eq!(key, "p.localhost/a/b");
        assert_eq!(split_route_key(&key), ("p.localhost", Some("/a/b")));
        assert_eq!(split_route_key("p.localhost"), ("p.localhost", None));
    }

    #[test]
    fn compute_is_one_kind_or_a_preference_list() {
        let plan = |c: &str| {
            serde_saphyr::from_str::<PlanSpec>(&format!("kind: Plan\nname: p\ncompute: {c}\n"))
                .map(|p| p.compute)
                .map_err(|e| e.to_string())
        };
        assert_eq!(plan("docker"), Ok(Compute::one(ComputeKind::Docker)));
        assert_eq!(
            plan("[docker, process]").map(|c| c.kinds().to_vec()),
            Ok(vec![ComputeKind::Docker, ComputeKind::Process])
        );
        assert!(plan("[]").is_err());
        assert!(plan("[docker, docker]").is_err());
        assert!(plan("dockr").is_err_and(|e| e.contains("unknown compute `dockr`")));
        let one = serde_json::to_value(Compute::one(ComputeKind::Docker)).ok();
        assert_eq!(one, Some(serde_json::json!("docker")));
    }

    #[test]
    fn hostnames() {
        assert_eq!(hostname_problem("5173-user-1.localhost"), None);
        assert_eq!(hostname_problem("Docs.Example.COM"), None);
        assert!(hostname_problem("a..b").is_some());
        assert!(hostname_problem("a b.c").is_some());
    }
}
