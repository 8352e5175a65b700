//! The `proxmox` compute provider: a session is a Proxmox VE guest, a QEMU VM or an LXC
//! container (the plan's `guest`), cloned from the plan's template onto the node the plan
//! placed it on, named `vessel-<session>`.
//!
//! Ownership: a guest is vessel's only if its tags (compared as a set: Proxmox reorders them)
//! hold `vessel.<instance>` and its name is `vessel-<session>`. A guest in the few seconds
//! between its clone and its first configuration has no tags yet; it is vessel's only if this
//! vessel's record for that session names the very guest (cluster and VMID) it was cloning.
//! Anything else, however similar its name, is foreign and never touched.
//!
//! Observing is one `GET /cluster/resources?type=vm` per cluster, concurrently, whatever the
//! number of guests; a cluster that does not answer makes the provider a gap (nothing created
//! or destroyed on a world vessel cannot see). What the listing lacks (the spec a guest was
//! made from, its address, what vessel last asked of it, how far its making got) is in a record
//! per session under `<state>/proxmox/`, bound to the guest's cluster and VMID.
//!
//! A create is: a VMID from `/cluster/nextid` (racy: a VMID taken meanwhile is asked for
//! again, never reused), the clone, its configuration (tags, cores, memory), the disk grown,
//! the start, and the wait for an address. Every task's UPID is polled to its end on the node
//! it names, within `task_timeout`; clones and starts take a slot of `max_tasks_per_node`. A
//! create that fails part-way leaves a marked, recorded guest: the next pass sees it as failed
//! and finishes it (it was cloned and configured: its start step does the rest) or, when its
//! clone never finished, as half-made (its fingerprint `half-made`) and the plan replaces it.
//! A guest locked by a running task is waited for, never fought.

mod api;
mod config;

pub use api::PveError;
pub use config::{ProxmoxCluster, ProxmoxConfig, ProxmoxNode};

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::Method;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::model::observed::{
    HalfMade, ObservedSession, RuntimeSpec, SessionState, Snapshot, SnapshotFailure, Snapshots,
};
use crate::model::plan::SessionAction;
use crate::model::{CloneMode, ComputeKind, Guest, Health};

use super::{BoxFut, ComputeProvider, CreateArgs, Intent, ProviderError, SessionSteps};
use api::{Cluster, Kind, Resource};

/// The fingerprint a guest reports while its making is unfinished and cannot be finished.
pub const HALF_MADE: &str = "half-made";

/// Why the proxmox provider cannot be set up from its config.
#[derive(Debug, thiserror::Error)]
pub enum ProxmoxSetupError {
    #[error("the proxmox provider needs at least one cluster with a node")]
    NoNodes,
    #[error("proxmox instance `{0}` must be a DNS label")]
    Instance(String),
    #[error("proxmox node `{0}` is configured twice")]
    DuplicateNode(String),
    #[error("proxmox cluster `{0}` is configured twice")]
    DuplicateCluster(String),
    #[error("proxmox cluster `{name}`")]
    Client {
        name: String,
        #[source]
        source: crate::http_client::HttpError,
    },
    #[error("cannot create {}", path.display())]
    Records {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl From<ProxmoxSetupError> for crate::providers::SetupError {
    fn from(e: ProxmoxSetupError) -> Self {
        crate::providers::SetupError::Proxmox(e)
    }
}

/// How far a guest's making got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Phase {
    /// A clone was asked for: the guest may exist, untagged.
    Cloning,
    /// Cloned and configured (tagged): the disk, the start and the address remain.
    Configured,
    /// Made: everything the create asked for was done.
    Ready,
}

/// `<state>/proxmox/<session>.json`: what the cluster's listing does not say.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    cluster: String,
    node: String,
    vmid: u64,
    guest: Guest,
    phase: Phase,
    intent: Intent,
    spec: RuntimeSpec,
    fingerprint: String,
    #[serde(default)]
    address: Option<String>,
    #[serde(default)]
    source_file: Option<PathBuf>,
    #[serde(default)]
    save_to: Option<PathBuf>,
    /// Suspended by vessel (the `pause` sleep depth): a start resumes it.
    #[serde(default)]
    paused: bool,
    /// When its making began: its snapshot schedule counts from here.
    #[serde(default)]
    made: Option<chrono::DateTime<chrono::Utc>>,
    /// vessel's snapshots of it, oldest first.
    #[serde(default)]
    snapshots: Vec<Snapshot>,
    /// The last snapshot attempt, if it failed.
    #[serde(default)]
    snapshot_failed: Option<SnapshotFailure>,
}

/// Where a session's guest was last seen.
#[derive(Debug, Clone)]
struct Placed {
    cluster: usize,
    res: Resource,
}

#[derive(Clone)]
pub struct ProxmoxProvider {
    inner: Arc<Inner>,
}

struct Inner {
    config: ProxmoxConfig,
    clusters: Vec<Cluster>,
    /// Node name -> its cluster.
    node_cluster: HashMap<String, usize>,
    /// Node name -> its task slots.
    slots: HashMap<String, Arc<tokio::sync::Semaphore>>,
    records: PathBuf,
    placed: Mutex<HashMap<String, Placed>>,
    calls: Arc<AtomicU64>,
    marker: String,
    /// Per cluster: held from `/cluster/nextid` until the clone that uses the VMID is asked
    /// for, so vessel's own creates never race each other for one VMID (other clients still
    /// can: a VMID taken is asked for again).
    allocating: Vec<tokio::sync::Mutex<()>>,
}

fn err(op: &'static str, session: &str) -> impl FnOnce(PveError) -> ProviderError {
    let object = session.to_string();
    move |e| ProviderError::caused(op, object, Arc::new(e))
}

/// The guest's name for a session.
pub fn guest_name(session: &str) -> String {
    format!("vessel-{session}")
}

impl ProxmoxProvider {
    /// A provider for `config`'s clusters, keeping its records under `records`. Nothing is
    /// contacted until the first call.
    pub fn new(config: ProxmoxConfig, records: PathBuf) -> Result<Self, ProxmoxSetupError> {
        if crate::model::dns_label_problem(&config.instance).is_some() {
            return Err(ProxmoxSetupError::Instance(config.instance.clone()));
        }
        let calls = Arc::new(AtomicU64::new(0));
        let mut clusters = Vec::new();
        let mut node_cluster = HashMap::new();
        let mut slots = HashMap::new();
        for c in &config.clusters {
            if clusters.iter().any(|x: &Cluster| x.name == c.name) {
                return Err(ProxmoxSetupError::DuplicateCluster(c.name.clone()));
            }
            let client = Cluster::new(
                &c.name,
                &c.url,
                c.tls.as_ref(),
                &c.token_id,
                &c.token_secret,
                config.call_timeout.std(),
                calls.clone(),
            )
            .map_err(|source| ProxmoxSetupError::Client {
                name: c.name.clone(),
                source,
            })?;
            for n in &c.nodes {
                if node_cluster
                    .insert(n.name.clone(), clusters.len())
                    .is_some()
                {
                    return Err(ProxmoxSetupError::DuplicateNode(n.name.clone()));
                }
                slots.insert(
                    n.name.clone(),
                    Arc::new(tokio::sync::Semaphore::new(
                        config.max_tasks_per_node.max(1) as usize,
                    )),
                );
            }
            clusters.push(client);
        }
        if node_cluster.is_empty() {
            return Err(ProxmoxSetupError::NoNodes);
        }
        std::fs::create_dir_all(&records).map_err(|source| ProxmoxSetupError::Records {
            path: records.clone(),
            source,
        })?;
        Ok(ProxmoxProvider {
            inner: Arc::new(Inner {
                marker: format!("vessel.{}", config.instance),
                clusters,
                node_cluster,
                slots,
                records,
                placed: Mutex::new(HashMap::new()),
                calls,
                allocating: (0..config.clusters.len())
                    .map(|_| tokio::sync::Mutex::new(()))
                    .collect(),
                config,
            }),
        })
    }

    /// API calls made so far (for benchmarks and tests).
    pub fn api_calls(&self) -> u64 {
        self.inner.calls.load(Ordering::Relaxed)
    }
}

impl Inner {
    fn every(&self) -> Duration {
        self.config.poll_interval.std()
    }

    fn read_record(&self, session: &str) -> Option<Record> {
        super::record::read_session(&self.records, session)
    }

    fn write_record(&self, session: &str, r: &Record) -> Result<(), ProviderError> {
        super::record::write(&super::record::session_path(&self.records, session), r)
    }

    fn remove_record(&self, session: &str) -> Result<(), ProviderError> {
        super::record::remove_session(&self.records, session)
    }

    /// The record of `session` if it describes the guest `res` on cluster `cluster`.
    fn record_for(&self, session: &str, cluster: usize, res: &Resource) -> Option<Record> {
        self.read_record(session)
            .filter(|r| r.cluster == self.clusters[cluster].name && r.vmid == res.vmid)
    }

    /// Is `res` (named for `session`) vessel's?
    fn owned(&self, session: &str, cluster: usize, res: &Resource) -> bool {
        let record = || self.record_for(session, cluster, res);
        self.owned_with(session, res, record)
    }

    /// The same, with the session's record (if it describes `res`) read by `record` only
    /// when the tags do not settle it.
    fn owned_with(
        &self,
        session: &str,
        res: &Resource,
        record: impl FnOnce() -> Option<Record>,
    ) -> bool {
        if res.template || res.name != guest_name(session) {
            return false;
        }
        res.tags.contains(&self.marker) || record().is_some_and(|r| r.phase == Phase::Cloning)
    }

    /// Every session's record, read once (a pass's observation reads each at most once).
    fn all_records(&self) -> HashMap<String, Record> {
        let Ok(dir) = std::fs::read_dir(&self.records) else {
            return HashMap::new();
        };
        dir.flatten()
            .filter_map(|e| {
                let name = e.file_name().to_str()?.strip_suffix(".json")?.to_string();
                let r = self.read_record(&name)?;
                Some((name, r))
            })
            .collect()
    }

    fn path(&self, res: &Resource, rest: &str) -> String {
        format!(
            "/nodes/{}/{}/{}{rest}",
            api::encode(&res.node),
            res.kind.path(),
            res.vmid
        )
    }

    /// Every cluster's listing, concurrently; the first failure fails it all.
    async fn list_all(&self) -> Result<Vec<(usize, Vec<Resource>)>, ProviderError> {
        let lists = futures_util::future::join_all(
            self.clusters
                .iter()
                .enumerate()
                .map(|(i, c)| async move { (i, c.resources().await) }),
        )
        .await;
        let mut out = Vec::new();
        for (i, l) in lists {
            let l = l.map_err(|e| {
                ProviderError::caused(
                    "list guests of",
                    format!("proxmox cluster {}", self.clusters[i].name),
                    Arc::new(e),
                )
            })?;
            out.push((i, l));
        }
        Ok(out)
    }

    /// vessel's guest for `session`: from the last observation, else a fresh listing.
    async fn locate(&self, session: &str) -> Result<Option<Placed>, ProviderError> {
        if let Some(p) = crate::lock_or_reset(&self.placed).get(session).cloned() {
            return Ok(Some(p));
        }
        for (cluster, list) in self.list_all().await? {
            if let Some(res) = list.into_iter().find(|r| self.owned(session, cluster, r)) {
                let p = Placed { cluster, res };
                self.remember(session, p.clone());
                return Ok(Some(p));
            }
        }
        Ok(None)
    }

    fn remember(&self, session: &str, p: Placed) {
        let mut m = crate::lock_or_reset(&self.placed);
        m.insert(session.to_string(), p);
    }

    fn forget(&self, session: &str) {
        let mut m = crate::lock_or_reset(&self.placed);
        m.remove(session);
    }

    /// The guest's current status and lock.
    async fn current(&self, p: &Placed, session: &str) -> Result<Value, ProviderError> {
        self.clusters[p.cluster]
            .get(&self.path(&p.res, "/status/current"), &[])
            .await
            .map_err(err("read the status of", session))
    }

    /// Wait until no task holds the guest's lock (a clone, a backup, a snapshot), within
    /// `task_timeout`: a locked guest is waited for, never fought.
    async fn wait_unlocked(&self, p: &Placed, session: &str) -> Result<Value, ProviderError> {
        let deadline = tokio::time::Instant::now() + self.config.task_timeout.std();
        loop {
            let cur = self.current(p, session).await?;
            match cur.get("lock").and_then(Value::as_str) {
                None | Some("") => return Ok(cur),
                Some(lock) if tokio::time::Instant::now() >= deadline => {
                    return Err(ProviderError::failed(
                        "wait for the lock of",
                        session,
                        format!(
                            "its guest is still locked ({lock}) after {} s",
                            self.config.task_timeout.std().as_secs()
                        ),
                    ));
                }
                Some(_) => tokio::time::sleep(self.every()).await,
            }
        }
    }

    /// Start a task and wait for its end.
    async fn run_task(
        &self,
        cluster: usize,
        method: Method,
        path: &str,
        params: &[(&str, Value)],
        within: Duration,
    ) -> Result<(), PveError> {
        let c = &self.clusters[cluster];
        let upid = c.task(method, path, params).await?;
        c.wait_task(&upid, within, self.every()).await
    }

    /// The guest's address, asked for until it has one (within `address_timeout`).
    async fn wait_address(&self, p: &Placed, session: &str) -> Result<String, ProviderError> {
        let path = match p.res.kind {
            Kind::Qemu => self.path(&p.res, "/agent/network-get-interfaces"),
            Kind::Lxc => self.path(&p.res, "/interfaces"),
        };
        let within = self.config.address_timeout.std();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let last = match self.clusters[p.cluster].get(&path, &[]).await {
                Ok(data) => match api::guest_address(&data) {
                    Some(a) => return Ok(a),
                    None => "no IPv4 address yet".to_string(),
                },
                // The agent not running yet is an error answer: asked again.
                Err(e) => crate::error_chain(&e),
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(ProviderError::failed(
                    "wait for the address of",
                    session,
                    format!("none within {} s (last: {last})", within.as_secs()),
                ));
            }
            tokio::time::sleep(self.every()).await;
        }
    }

    /// The template a spec names on `cluster` (by VMID or name, of the spec's guest type).
    fn template<'l>(
        &self,
        list: &'l [Resource],
        spec: &RuntimeSpec,
        session: &str,
        cluster: usize,
    ) -> Result<&'l Resource, ProviderError> {
        let want = spec.template.as_deref().unwrap_or_default();
        let kind = kind_of(spec.guest.unwrap_or_default());
        list.iter()
            .find(|r| {
                r.template
                    && r.kind == kind
                    && (r.vmid.to_string() == want || (!r.name.is_empty() && r.name == want))
            })
            .ok_or_else(|| {
                ProviderError::failed(
                    "create",
                    session,
                    format!(
                        "proxmox cluster {} has no {} template `{want}`",
                        self.clusters[cluster].name,
                        kind.path()
                    ),
                )
            })
    }

    /// Configure a cloned guest: its tags (the marker, the spec's fingerprint), cores and
    /// memory.
    async fn configure(
        &self,
        p: &Placed,
        session: &str,
        spec: &RuntimeSpec,
        fingerprint: &str,
    ) -> Result<(), ProviderError> {
        let mut params: Vec<(&str, Value)> = vec![(
            "tags",
            Value::from(format!("{};fp.{fingerprint}", self.marker)),
        )];
        if let Some(cpus) = spec.cpus {
            params.push(("cores", Value::from(cpus.ceil().max(1.0) as u64)));
        }
        if let Some(mem) = spec.memory {
            let mib = (mem.bytes() >> 20).max(16);
            params.push((
                "memory",
                match p.res.kind {
                    // A VM's memory is a property string (`[current=]<MiB>`).
                    Kind::Qemu => Value::from(mib.to_string()),
                    Kind::Lxc => Value::from(mib),
                },
            ));
        }
        self.clusters[p.cluster]
            .call(Method::PUT, &self.path(&p.res, "/config"), &params)
            .await
            .map_err(err("configure", session))?;
        Ok(())
    }

    /// Grow the guest's disk to `spec.disk` (never shrink: refused).
    async fn grow_disk(
        &self,
        p: &Placed,
        session: &str,
        spec: &RuntimeSpec,
    ) -> Result<(), ProviderError> {
        let Some(want) = spec.disk.map(|d| d.bytes()) else {
            return Ok(());
        };
        let cur = self.current(p, session).await?;
        let have = cur.get("maxdisk").and_then(api::number).unwrap_or(0);
        if want < have {
            return Err(ProviderError::failed(
                "resize the disk of",
                session,
                format!(
                    "the disk is {have} bytes and the plan asks for {want}: a disk only grows, never shrinks"
                ),
            ));
        }
        if want == have {
            return Ok(());
        }
        let delta_k = (want - have).div_ceil(1024);
        let disk = match p.res.kind {
            Kind::Qemu => self.config.vm_disk.clone(),
            Kind::Lxc => "rootfs".into(),
        };
        self.run_task(
            p.cluster,
            Method::PUT,
            &self.path(&p.res, "/resize"),
            &[
                ("disk", Value::from(disk)),
                ("size", Value::from(format!("+{delta_k}K"))),
            ],
            self.config.task_timeout.std(),
        )
        .await
        .map_err(err("resize the disk of", session))
    }

    /// Start the guest (if it is not running) and wait for its address.
    async fn start_guest(
        &self,
        p: &Placed,
        session: &str,
        paused: bool,
    ) -> Result<String, ProviderError> {
        let cur = self.wait_unlocked(p, session).await?;
        let status = cur.get("status").and_then(Value::as_str).unwrap_or("");
        let qmp = cur.get("qmpstatus").and_then(Value::as_str).unwrap_or("");
        if status != "running" {
            let _slot = self.slot(&p.res.node).await;
            self.run_task(
                p.cluster,
                Method::POST,
                &self.path(&p.res, "/status/start"),
                &[],
                self.config.task_timeout.std(),
            )
            .await
            .map_err(err("start", session))?;
        } else if paused || qmp == "paused" || qmp == "suspended" {
            self.run_task(
                p.cluster,
                Method::POST,
                &self.path(&p.res, "/status/resume"),
                &[],
                self.config.task_timeout.std(),
            )
            .await
            .map_err(err("resume", session))?;
        }
        self.wait_address(p, session).await
    }

    /// Make the guest's firewall rules vessel marks (by their comment) the spec's: removed
    /// where the spec has them no more, added where it has new ones. Rules without the mark
    /// are never touched. Nothing is asked when neither the spec nor `had` has rules.
    async fn sync_firewall(
        &self,
        p: &Placed,
        session: &str,
        spec: &RuntimeSpec,
        had: bool,
    ) -> Result<(), ProviderError> {
        use crate::model::FirewallPort;
        let want: Vec<(String, Option<String>)> = match &spec.firewall {
            Some(fw) => fw
                .allow
                .iter()
                .map(|a| {
                    let port = match &a.port {
                        FirewallPort::Number(n) => Some(n.0),
                        FirewallPort::Name(name) => spec.ports.get(name).map(|p| p.0),
                    };
                    port.map(|n| (n.to_string(), a.from.clone()))
                        .ok_or_else(|| {
                            ProviderError::failed(
                                "set the firewall of",
                                session,
                                format!("the plan has no port `{:?}`", a.port),
                            )
                        })
                })
                .collect::<Result<_, _>>()?,
            None if !had => return Ok(()),
            None => Vec::new(),
        };
        let c = &self.clusters[p.cluster];
        let rules_path = self.path(&p.res, "/firewall/rules");
        let rules = c
            .get(&rules_path, &[])
            .await
            .map_err(err("read the firewall of", session))?;
        let mark = self.marker.as_str();
        let mut have: Vec<(u64, String, Option<String>)> = rules
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r.get("comment").and_then(Value::as_str) == Some(mark))
            .filter_map(|r| {
                Some((
                    api::number(r.get("pos")?)?,
                    r.get("dport")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string(),
                    r.get("source").and_then(Value::as_str).map(str::to_string),
                ))
            })
            .collect();
        // Highest position first: removing one moves those after it.
        have.sort_by_key(|r| std::cmp::Reverse(r.0));
        for (pos, dport, source) in &have {
            if !want.iter().any(|(d, s)| d == dport && s == source) {
                c.call(Method::DELETE, &format!("{rules_path}/{pos}"), &[])
                    .await
                    .map_err(err("remove a firewall rule of", session))?;
            }
        }
        for (dport, source) in &want {
            if have.iter().any(|(_, d, s)| d == dport && s == source) {
                continue;
            }
            let mut params = vec![
                ("type", Value::from("in")),
                ("action", Value::from("ACCEPT")),
                ("proto", Value::from("tcp")),
                ("dport", Value::from(dport.clone())),
                ("enable", Value::from(1)),
                ("comment", Value::from(mark)),
            ];
            if let Some(s) = source {
                params.push(("source", Value::from(s.clone())));
            }
            c.call(Method::POST, &rules_path, &params)
                .await
                .map_err(err("add a firewall rule to", session))?;
        }
        if !want.is_empty() {
            c.call(
                Method::PUT,
                &self.path(&p.res, "/firewall/options"),
                &[("enable", Value::from(true))],
            )
            .await
            .map_err(err("enable the firewall of", session))?;
        }
        Ok(())
    }

    /// Reboot a running guest and wait for its address again.
    async fn reboot(&self, p: &Placed, session: &str, r: &mut Record) -> Result<(), ProviderError> {
        self.run_task(
            p.cluster,
            Method::POST,
            &self.path(&p.res, "/status/reboot"),
            &[],
            self.config.task_timeout.std(),
        )
        .await
        .map_err(err("reboot", session))?;
        r.address = Some(self.wait_address(p, session).await?);
        self.write_record(session, r)
    }

    /// Take `take` and delete `prune` (vessel's own, by name), keeping the record's list in
    /// step with what Proxmox has after each.
    async fn snapshots(
        &self,
        p: &Placed,
        session: &str,
        r: &mut Record,
        take: Option<(&str, chrono::DateTime<chrono::Utc>)>,
        prune: &[String],
    ) -> Result<(), ProviderError> {
        self.wait_unlocked(p, session).await?;
        if let Some((name, slot)) = take
            && !r.snapshots.iter().any(|t| t.name == name)
        {
            let taken = self
                .run_task(
                    p.cluster,
                    Method::POST,
                    &self.path(&p.res, "/snapshot"),
                    &[
                        ("snapname", Value::from(name)),
                        (
                            "description",
                            Value::from(format!(
                                "vessel: scheduled snapshot of session {session} (instance {})",
                                self.config.instance
                            )),
                        ),
                    ],
                    self.config.task_timeout.std(),
                )
                .await;
            match taken {
                Ok(()) => {}
                // Taken before a crash cut the record's write short: it is there.
                Err(e) if e.message().contains("already exists") => {}
                Err(e) => return Err(err("snapshot", session)(e)),
            }
            r.snapshots.push(Snapshot {
                name: name.to_string(),
                slot,
            });
            self.write_record(session, r)?;
        }
        for name in prune {
            if !name.starts_with("vessel_") {
                continue;
            }
            let deleted = self
                .run_task(
                    p.cluster,
                    Method::DELETE,
                    &self.path(&p.res, &format!("/snapshot/{name}")),
                    &[],
                    self.config.task_timeout.std(),
                )
                .await;
            match deleted {
                Ok(()) => {}
                // Deleted by hand already.
                Err(e) if e.message().contains("does not exist") => {}
                Err(e) => return Err(err("delete a snapshot of", session)(e)),
            }
            r.snapshots.retain(|t| &t.name != name);
            self.write_record(session, r)?;
        }
        Ok(())
    }

    async fn slot(&self, node: &str) -> Option<tokio::sync::OwnedSemaphorePermit> {
        match self.slots.get(node) {
            Some(s) => s.clone().acquire_owned().await.ok(),
            None => None,
        }
    }

    /// Finish a guest from its record's phase: configure, grow, start, address.
    async fn finish(
        &self,
        session: &str,
        p: &Placed,
        mut r: Record,
        start: bool,
    ) -> Result<(), ProviderError> {
        if r.phase == Phase::Cloning {
            self.wait_unlocked(p, session).await?;
            self.configure(p, session, &r.spec, &r.fingerprint).await?;
            r.phase = Phase::Configured;
            self.write_record(session, &r)?;
        }
        if r.phase == Phase::Configured {
            self.grow_disk(p, session, &r.spec).await?;
            self.sync_firewall(p, session, &r.spec, false).await?;
        }
        if start {
            r.intent = Intent::Running;
            self.write_record(session, &r)?;
            let address = self.start_guest(p, session, r.paused).await?;
            r.address = Some(address);
            r.paused = false;
        }
        r.phase = Phase::Ready;
        self.write_record(session, &r)
    }

    /// Clone the template for `session` onto `node`: a fresh VMID (asked again while taken),
    /// the record written before the clone is asked for, the task waited for.
    async fn clone_guest(
        &self,
        a: &CreateArgs<'_>,
        cluster: usize,
        node: &str,
        template: &Resource,
    ) -> Result<(Placed, Record), ProviderError> {
        let session = a.session;
        let guest = a.spec.guest.unwrap_or_default();
        let c = &self.clusters[cluster];
        let full = a.spec.clone.unwrap_or_default() == CloneMode::Full;
        let mut tries = 0;
        loop {
            tries += 1;
            let allocating = self.allocating[cluster].lock().await;
            let vmid = c
                .get("/cluster/nextid", &[])
                .await
                .ok()
                .and_then(|v| api::number(&v))
                .ok_or_else(|| {
                    ProviderError::failed("create", session, "no free VMID from /cluster/nextid")
                })?;
            let record = Record {
                cluster: c.name.clone(),
                node: node.to_string(),
                vmid,
                guest,
                phase: Phase::Cloning,
                intent: if a.start {
                    Intent::Running
                } else {
                    Intent::Stopped
                },
                spec: a.spec.clone(),
                fingerprint: a.fingerprint.to_string(),
                address: None,
                source_file: Some(a.source_file.to_path_buf()),
                save_to: a.save_to.map(Path::to_path_buf),
                paused: false,
                made: Some(chrono::Utc::now()),
                snapshots: Vec::new(),
                snapshot_failed: None,
            };
            self.write_record(session, &record)?;
            let name_key = match guest {
                Guest::Vm => "name",
                Guest::Lxc => "hostname",
            };
            let mut params: Vec<(&str, Value)> = vec![
                ("newid", Value::from(vmid)),
                (name_key, Value::from(guest_name(session))),
                ("full", Value::from(full)),
                (
                    "description",
                    Value::from(format!(
                        "vessel session {session} (instance {})",
                        self.config.instance
                    )),
                ),
            ];
            if full && let Some(s) = &a.spec.storage {
                params.push(("storage", Value::from(s.clone())));
            }
            if template.node != node {
                params.push(("target", Value::from(node.to_string())));
            }
            let asked = c
                .task(Method::POST, &self.path(template, "/clone"), &params)
                .await;
            drop(allocating);
            let upid = match asked {
                Ok(u) => u,
                // Taken between nextid and the clone (another client): ask again.
                Err(e) if e.message().contains("already exists") && tries < 5 => {
                    tracing::info!(%session, vmid, "VMID taken meanwhile; asking for another");
                    continue;
                }
                Err(e) => {
                    self.remove_record(session)?;
                    return Err(err("clone a guest for", session)(e));
                }
            };
            let p = Placed {
                cluster,
                res: Resource {
                    kind: template.kind,
                    vmid,
                    node: node.to_string(),
                    name: guest_name(session),
                    status: "stopped".into(),
                    template: false,
                    lock: None,
                    tags: Default::default(),
                    maxdisk: template.maxdisk,
                    uptime: None,
                },
            };
            self.remember(session, p.clone());
            c.wait_task(&upid, self.config.task_timeout.std(), self.every())
                .await
                .map_err(err("clone a guest for", session))?;
            return Ok((p, record));
        }
    }
}

fn kind_of(g: Guest) -> Kind {
    match g {
        Guest::Vm => Kind::Qemu,
        Guest::Lxc => Kind::Lxc,
    }
}

impl ProxmoxProvider {
    async fn observe_all(&self) -> Result<Vec<ObservedSession>, ProviderError> {
        let inner = &self.inner;
        let lists = inner.list_all().await?;
        let records = inner.all_records();
        let now = chrono::Utc::now();
        let mut out: BTreeMap<String, ObservedSession> = BTreeMap::new();
        let mut placed = HashMap::new();
        for (cluster, list) in lists {
            for res in list {
                if res.template {
                    continue;
                }
                let Some(session) = res.name.strip_prefix("vessel-") else {
                    continue;
                };
                if crate::model::dns_label_problem(session).is_some() {
                    continue;
                }
                let session = session.to_string();
                let record = records
                    .get(&session)
                    .filter(|r| r.cluster == inner.clusters[cluster].name && r.vmid == res.vmid);
                let owned = inner.owned_with(&session, &res, || record.cloned());
                let running = res.status == "running";
                if out.get(&session).is_some_and(|o| o.owned || !owned) {
                    tracing::warn!(%session, vmid = res.vmid, "another guest for this session exists; left alone");
                    continue;
                }
                if !owned {
                    let state = if running {
                        SessionState::Running
                    } else {
                        SessionState::Stopped
                    };
                    out.insert(
                        session.clone(),
                        ObservedSession {
                            host: Some(res.node.clone()),
                            ..ObservedSession::bare(session, ComputeKind::Proxmox, state, false)
                        },
                    );
                    continue;
                }
                let record = record.cloned();
                let fp_tag = res
                    .tags
                    .iter()
                    .find_map(|t| t.strip_prefix("fp."))
                    .map(str::to_string);
                let phase = record.as_ref().map_or(Phase::Ready, |r| r.phase);
                let (fingerprint, spec) = match (&record, phase) {
                    // Its clone may never have finished: made again.
                    (_, Phase::Cloning) => (HALF_MADE.to_string(), None),
                    (Some(r), _) => (r.fingerprint.clone(), Some(r.spec.clone())),
                    (None, _) => (fp_tag.unwrap_or_else(|| HALF_MADE.into()), None),
                };
                let intent = record.as_ref().map(|r| r.intent);
                // A guest that runs is running, locked or not: a lock is a task of
                // Proxmox's (a backup, a snapshot) that is waited for, never fought.
                let state = match (running, phase, intent) {
                    (_, Phase::Cloning | Phase::Configured, _) => SessionState::Failed,
                    (true, _, _) => SessionState::Running,
                    (false, _, Some(Intent::Running)) => SessionState::Failed,
                    (false, _, _) => SessionState::Stopped,
                };
                let half_made = match phase {
                    Phase::Cloning => Some(HalfMade {
                        finish: false,
                        detail: format!(
                            "the clone into VMID {} on {} never finished",
                            res.vmid, res.node
                        ),
                    }),
                    Phase::Configured => Some(HalfMade {
                        finish: true,
                        detail: format!(
                            "VMID {} on {} was cloned and configured, not yet started",
                            res.vmid, res.node
                        ),
                    }),
                    Phase::Ready => None,
                };
                let snapshots = record.as_ref().map(|r| Snapshots {
                    since: r.made,
                    taken: r.snapshots.clone(),
                    failed: r.snapshot_failed.clone(),
                });
                let endpoints = match (&record, &spec) {
                    (Some(r), Some(s)) if running => r
                        .address
                        .as_ref()
                        .map(|a| {
                            s.ports
                                .iter()
                                .map(|(k, v)| (k.clone(), format!("{a}:{}", v.0)))
                                .collect()
                        })
                        .unwrap_or_default(),
                    _ => BTreeMap::new(),
                };
                placed.insert(
                    session.clone(),
                    Placed {
                        cluster,
                        res: res.clone(),
                    },
                );
                out.insert(
                    session.clone(),
                    ObservedSession {
                        name: session,
                        provider: ComputeKind::Proxmox,
                        state,
                        owned: true,
                        fingerprint,
                        spec,
                        endpoints,
                        source_file: record.as_ref().and_then(|r| r.source_file.clone()),
                        synced_source: None,
                        save_to: record.as_ref().and_then(|r| r.save_to.clone()),
                        healthy: None,
                        host: Some(res.node.clone()),
                        asleep: None,
                        started: res
                            .uptime
                            .filter(|_| running)
                            .and_then(|u| i64::try_from(u).ok())
                            .map(|u| now - chrono::Duration::seconds(u)),
                        snapshots,
                        half_made,
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

    async fn placed(&self, op: &'static str, session: &str) -> Result<Placed, ProviderError> {
        self.inner
            .locate(session)
            .await?
            .ok_or_else(|| ProviderError::failed(op, session, "it has no guest"))
    }

    /// Shut the guest down (a clean shutdown, then a hard stop after `stop_timeout`).
    async fn shutdown(
        &self,
        p: &Placed,
        session: &str,
        stop_timeout: Option<crate::model::Duration>,
    ) -> Result<(), ProviderError> {
        let inner = &self.inner;
        let cur = inner.wait_unlocked(p, session).await?;
        if cur.get("status").and_then(Value::as_str) != Some("running") {
            return Ok(());
        }
        let secs = stop_timeout.map_or(10, |t| t.std().as_secs().max(1));
        inner
            .run_task(
                p.cluster,
                Method::POST,
                &inner.path(&p.res, "/status/shutdown"),
                &[
                    ("timeout", Value::from(secs)),
                    ("forceStop", Value::from(true)),
                ],
                inner.config.task_timeout.std() + Duration::from_secs(secs),
            )
            .await
            .map_err(err("stop", session))
    }
}

impl SessionSteps for ProxmoxProvider {
    async fn pull_image(
        &self,
        _session: &str,
        _image: &str,
        _pull: crate::model::PullPolicy,
        _host: Option<&str>,
    ) -> Result<(), ProviderError> {
        // A guest is cloned from a template on the cluster: nothing to pull.
        Ok(())
    }

    async fn create(&self, a: &CreateArgs<'_>) -> Result<(), ProviderError> {
        let inner = &self.inner;
        let session = a.session;
        let node = match a.host {
            Some(n) => n.to_string(),
            None => inner
                .config
                .clusters
                .iter()
                .flat_map(|c| &c.nodes)
                .map(|n| n.name.clone())
                .min()
                .unwrap_or_default(),
        };
        let cluster = *inner.node_cluster.get(&node).ok_or_else(|| {
            ProviderError::failed(
                "create",
                session,
                format!("no proxmox node named `{node}` is configured"),
            )
        })?;
        let list = inner.clusters[cluster]
            .resources()
            .await
            .map_err(err("create", session))?;
        // Already there (an interrupted create): ours is finished, another's is in the way.
        if let Some(res) = list
            .iter()
            .find(|r| !r.template && r.name == guest_name(session))
        {
            if !inner.owned(session, cluster, res) {
                return Err(ProviderError::failed(
                    "create",
                    session,
                    format!(
                        "a guest named {} that vessel did not create (VMID {}) is in the way",
                        guest_name(session),
                        res.vmid
                    ),
                ));
            }
            let p = Placed {
                cluster,
                res: res.clone(),
            };
            let r = inner
                .record_for(session, cluster, res)
                .filter(|r| r.fingerprint == a.fingerprint)
                .ok_or_else(|| {
                    ProviderError::failed(
                        "create",
                        session,
                        "a guest of vessel's with another spec exists; it must be destroyed first",
                    )
                })?;
            inner.remember(session, p.clone());
            return inner.finish(session, &p, r, a.start).await;
        }
        let template = inner.template(&list, a.spec, session, cluster)?;
        let (p, r) = {
            let _slot = inner.slot(&node).await;
            inner.clone_guest(a, cluster, &node, template).await?
        };
        inner.finish(session, &p, r, a.start).await
    }

    async fn update(
        &self,
        session: &str,
        spec: &RuntimeSpec,
        fingerprint: &str,
        restart: bool,
    ) -> Result<(), ProviderError> {
        let inner = &self.inner;
        let p = self.placed("update", session).await?;
        let mut r = inner
            .record_for(session, p.cluster, &p.res)
            .ok_or_else(|| ProviderError::failed("update", session, "it has no record"))?;
        inner.wait_unlocked(&p, session).await?;
        // The disk first: a shrink is refused before anything changes.
        inner.grow_disk(&p, session, spec).await?;
        inner.configure(&p, session, spec, fingerprint).await?;
        inner
            .sync_firewall(&p, session, spec, r.spec.firewall.is_some())
            .await?;
        // Nothing reboots for it: a container and a VM with hot-plug take cores and memory
        // at once, a VM without keeps them pending until its next stop (the plan says which).
        // A restart asked for all the same (by another provider's rules) is a reboot.
        r.spec = spec.clone();
        r.fingerprint = fingerprint.to_string();
        inner.write_record(session, &r)?;
        if restart {
            let cur = inner.current(&p, session).await?;
            if cur.get("status").and_then(Value::as_str) == Some("running") {
                inner.reboot(&p, session, &mut r).await?;
            }
        }
        Ok(())
    }

    async fn start(&self, session: &str) -> Result<(), ProviderError> {
        let inner = &self.inner;
        let p = self.placed("start", session).await?;
        let r = inner
            .record_for(session, p.cluster, &p.res)
            .ok_or_else(|| ProviderError::failed("start", session, "it has no record"))?;
        if r.phase == Phase::Cloning {
            return Err(ProviderError::failed(
                "start",
                session,
                "its making never finished; it is replaced",
            ));
        }
        inner.finish(session, &p, r, true).await
    }

    /// A reboot (a guest that is not running is started instead).
    async fn restart(
        &self,
        session: &str,
        _stop_timeout: Option<crate::model::Duration>,
    ) -> Result<(), ProviderError> {
        let inner = &self.inner;
        let p = self.placed("restart", session).await?;
        let mut r = inner
            .record_for(session, p.cluster, &p.res)
            .ok_or_else(|| ProviderError::failed("restart", session, "it has no record"))?;
        let cur = inner.wait_unlocked(&p, session).await?;
        if cur.get("status").and_then(Value::as_str) != Some("running") {
            return inner.finish(session, &p, r, true).await;
        }
        inner.reboot(&p, session, &mut r).await
    }

    async fn stop(
        &self,
        session: &str,
        stop_timeout: Option<crate::model::Duration>,
    ) -> Result<(), ProviderError> {
        let inner = &self.inner;
        let Some(p) = inner.locate(session).await? else {
            return Ok(());
        };
        if let Some(mut r) = inner.record_for(session, p.cluster, &p.res) {
            r.intent = Intent::Stopped;
            inner.write_record(session, &r)?;
            // Made part-way and wanted stopped: finished without a start.
            if r.phase == Phase::Configured {
                return inner.finish(session, &p, r, false).await;
            }
        }
        self.shutdown(&p, session, stop_timeout).await
    }

    async fn destroy(
        &self,
        session: &str,
        stop_timeout: Option<crate::model::Duration>,
        _retain: bool,
    ) -> Result<(), ProviderError> {
        let inner = &self.inner;
        let Some(p) = inner.locate(session).await? else {
            return inner.remove_record(session);
        };
        let cur = match inner.wait_unlocked(&p, session).await {
            Ok(c) => c,
            // Gone already.
            Err(e) if crate::error_chain(&e).contains("does not exist") => {
                inner.forget(session);
                return inner.remove_record(session);
            }
            Err(e) => return Err(e),
        };
        if cur.get("status").and_then(Value::as_str) == Some("running") {
            let secs = stop_timeout.map_or(10, |t| t.std().as_secs().max(1));
            inner
                .run_task(
                    p.cluster,
                    Method::POST,
                    &inner.path(&p.res, "/status/stop"),
                    &[],
                    inner.config.task_timeout.std() + Duration::from_secs(secs),
                )
                .await
                .map_err(err("stop", session))?;
        }
        let r = inner
            .run_task(
                p.cluster,
                Method::DELETE,
                &inner.path(&p.res, ""),
                &[
                    ("purge", Value::from(true)),
                    ("destroy-unreferenced-disks", Value::from(true)),
                ],
                inner.config.task_timeout.std(),
            )
            .await;
        match r {
            Ok(()) => {}
            Err(e) if e.message().contains("does not exist") => {}
            Err(e) => return Err(err("destroy", session)(e)),
        }
        inner.forget(session);
        inner.remove_record(session)
    }

    async fn wait_healthy(
        &self,
        session: &str,
        port: &str,
        check: Option<&Health>,
    ) -> Result<(), ProviderError> {
        let inner = &self.inner;
        let path = check.map(|h| h.path.as_str());
        let every = inner.every();
        super::health::wait_until_healthy(path, every, every, || async {
            let r = inner.read_record(session).ok_or_else(|| {
                ProviderError::failed("check health of", session, "it has no record")
            })?;
            let port = r.spec.ports.get(port).map(|p| p.0);
            Ok(r.address.zip(port).map(|(a, p)| format!("{a}:{p}")))
        })
        .await
    }

    async fn sync_source(
        &self,
        session: &str,
        _path: &Path,
        _exclude: &[String],
        _save_to: &Option<PathBuf>,
    ) -> Result<(), ProviderError> {
        Err(ProviderError::failed(
            "sync source into",
            session,
            "proxmox guests get their files from their template; a `source` is not copied in",
        ))
    }

    /// Take the snapshot for a slot of the plan's schedule, then delete vessel's snapshots
    /// past `keep`. What was taken is in the record; a failure is recorded (status shows it)
    /// and the step fails, so the loop retries it with backoff.
    async fn snapshot(
        &self,
        session: &str,
        take: Option<(&str, chrono::DateTime<chrono::Utc>)>,
        prune: &[String],
    ) -> Result<(), ProviderError> {
        let inner = &self.inner;
        let p = self.placed("snapshot", session).await?;
        let mut r = inner
            .record_for(session, p.cluster, &p.res)
            .ok_or_else(|| ProviderError::failed("snapshot", session, "it has no record"))?;
        let result = inner.snapshots(&p, session, &mut r, take, prune).await;
        r.snapshot_failed = result.as_ref().err().map(|e| SnapshotFailure {
            at: chrono::Utc::now(),
            error: crate::error_chain(e),
        });
        inner.write_record(session, &r)?;
        result
    }

    async fn save_work(&self, session: &str, _path: &Path) -> Result<(), ProviderError> {
        Err(ProviderError::failed(
            "save work of",
            session,
            "proxmox guests keep their work on their own disk; nothing is saved out",
        ))
    }
}

impl ComputeProvider for ProxmoxProvider {
    fn kind(&self) -> ComputeKind {
        ComputeKind::Proxmox
    }

    fn observe(&self) -> BoxFut<'_, Result<Vec<ObservedSession>, ProviderError>> {
        Box::pin(self.observe_all())
    }

    fn apply<'a>(&'a self, action: &'a SessionAction) -> BoxFut<'a, Result<(), ProviderError>> {
        Box::pin(super::run_session_step(self, action))
    }

    /// Suspend the guest (the `pause` sleep depth): a VM's memory is kept and its vCPUs stop;
    /// a container is frozen. A start resumes it.
    fn pause<'a>(&'a self, session: &'a str) -> BoxFut<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            let inner = &self.inner;
            let p = self.placed("pause", session).await?;
            let mut r = inner
                .record_for(session, p.cluster, &p.res)
                .ok_or_else(|| ProviderError::failed("pause", session, "it has no record"))?;
            inner.wait_unlocked(&p, session).await?;
            // Marked first: a crash in between leaves a guest marked paused that runs, which
            // a start resumes harmlessly.
            r.paused = true;
            inner.write_record(session, &r)?;
            inner
                .run_task(
                    p.cluster,
                    Method::POST,
                    &inner.path(&p.res, "/status/suspend"),
                    &[],
                    inner.config.task_timeout.std(),
                )
                .await
                .map_err(err("pause", session))
        })
    }

    fn endpoints<'a>(
        &'a self,
        session: &'a str,
    ) -> BoxFut<'a, Result<BTreeMap<String, String>, ProviderError>> {
        Box::pin(async move {
            let Some(r) = self.inner.read_record(session) else {
                return Ok(BTreeMap::new());
            };
            Ok(r.address
                .map(|a| {
                    r.spec
                        .ports
                        .iter()
                        .map(|(k, v)| (k.clone(), format!("{a}:{}", v.0)))
                        .collect()
                })
                .unwrap_or_default())
        })
    }
}
