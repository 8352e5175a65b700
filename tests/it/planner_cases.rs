//! Data-driven planner tests: every `tests/planner/*.yaml` case is loaded, planned and
//! rendered; the text (and Markdown, for cases that ask) must match the `.txt` beside it.
//! Run with `UPDATE_EXPECT=1` to rewrite the snapshots, then review the diff.
//!
//! A case:
//! ```yaml
//! now: 2026-06-01T00:00:00Z     # the clock
//! world_now: ...                # the clock the world was converged at (default: now)
//! policy: {dns: 192.0.2.1, allow_destroy: false, max_count: 10, max_percent: 50,
//!          docker_hosts: [{name: a, location: eu, capacity: {cpus: 4, memory: 8Gi}}],
//!          process_capacity: {cpus: 2, memory: 1Gi},
//!          keep_workspaces: true,    # process and docker keep destroyed workspaces (default)
//!          settling: [alice.yaml]}   # files that changed a second ago (settle until now+1s)
//! world: {FILE: YAML, ...}      # the tree the observed world was converged from
//! world_passes: 1               # converge only this many passes (default: to the end)
//! files: {FILE: YAML, ...}      # the desired tree now
//! drift: [...]                  # edits to the observed world, see `Drift`
//! markdown: true                # also snapshot the Markdown rendering
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::Deserialize;

use vessel::config::{Config, DestroyBudget};
use vessel::desired::Desired;
use vessel::model::ComputeKind;
use vessel::observed::{
    Observed, ObservedRecord, ObservedRoute, ObservedSession, ProviderId, SessionState,
};
use vessel::planner::{PlacementHost, Policy, plan, record_for, render, simulate::converge};

use crate::support::root;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CasePolicy {
    dns: Option<String>,
    #[serde(default)]
    allow_destroy: bool,
    #[serde(default)]
    allow_empty_source: bool,
    max_count: Option<u32>,
    max_percent: Option<u8>,
    #[serde(default)]
    docker_hosts: Vec<CaseHost>,
    keep_workspaces: Option<bool>,
    #[serde(default)]
    settling: Vec<PathBuf>,
    max_running: Option<u32>,
    max_running_per_owner: Option<u32>,
    /// What the process provider's machine holds.
    process_capacity: Option<vessel::model::HostCapacity>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseHost {
    name: String,
    location: Option<String>,
    capacity: Option<vessel::model::HostCapacity>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    now: Option<DateTime<Utc>>,
    /// The clock the world was converged at (default: `now`).
    world_now: Option<DateTime<Utc>>,
    #[serde(default)]
    policy: CasePolicy,
    #[serde(default)]
    world: BTreeMap<String, String>,
    world_passes: Option<usize>,
    #[serde(default)]
    files: BTreeMap<String, String>,
    #[serde(default)]
    drift: Vec<Drift>,
    #[serde(default)]
    markdown: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum Drift {
    Stop(String),
    Fail(String),
    RemoveSession(String),
    RemoveRoute(String),
    Upstream {
        host: String,
        to: String,
    },
    Gap {
        provider: String,
        error: String,
    },
    /// A compute provider that is a gap now: its sessions are known only as last seen
    /// (`Observed::unreachable`), as the loop carries them over.
    Unreachable {
        provider: String,
        error: String,
    },
    ForeignSession {
        name: String,
    },
    ForeignRoute {
        host: String,
        upstream: String,
    },
    ForeignRecord {
        name: String,
        content: String,
    },
    /// The session's provider keeps a workspace of an earlier session of this name.
    Retained(String),
    /// A second compute provider (docker) also reports a session of this name.
    Duplicate(String),
    /// vessel put the session to sleep (at `depth`), leaving the provider reporting `state`.
    Asleep {
        session: String,
        depth: String,
        state: String,
    },
}

pub fn load(files: &BTreeMap<String, String>, now: DateTime<Utc>) -> Desired {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, text) in files {
        let p = dir.path().join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(p, text).expect("write");
    }
    // The embedded default, with docker and proxmox providers too (cases use every kind).
    let mut cfg = Config::embedded_default(dir.path());
    cfg.providers.compute.docker = Some(
        serde_saphyr::from_str("hosts: [{name: a, endpoint: 'unix:///run/docker.sock'}]")
            .expect("docker config"),
    );
    cfg.providers.compute.proxmox = Some(
        serde_saphyr::from_str(
            "clusters: [{name: lab, url: 'https://pve.example.com:8006', token_id: 'v@pve!v', token_secret: {env: PVE_TOKEN}, nodes: [{name: pve1}]}]",
        )
        .expect("proxmox config"),
    );
    vessel::load::load_tree(dir.path(), &cfg, now).expect("load")
}

fn policy_of(c: &CasePolicy, now: DateTime<Utc>) -> Policy {
    let mut p = Config::embedded_default(Path::new(".")).policy(now);
    p.dns = c.dns.as_deref().map(record_for);
    p.allow_destroy = c.allow_destroy;
    p.allow_empty_source = c.allow_empty_source;
    p.limits = vessel::model::SessionLimits {
        max_running: c.max_running,
        max_running_per_owner: c.max_running_per_owner,
    };
    let d = DestroyBudget::default();
    p.destroy_budget = DestroyBudget {
        max_count: c.max_count.unwrap_or(d.max_count),
        max_percent: c.max_percent.unwrap_or(d.max_percent),
    };
    p.keeps_workspaces = if c.keep_workspaces.unwrap_or(true) {
        [ComputeKind::Process, ComputeKind::Docker].into()
    } else {
        Default::default()
    };
    p.settle = std::sync::Arc::new(vessel::planner::Settle {
        until: c
            .settling
            .iter()
            .map(|f| (f.clone(), now + chrono::Duration::seconds(1)))
            .collect(),
        origins: BTreeMap::new(),
    });
    if !c.docker_hosts.is_empty() {
        p.placement.insert(
            ComputeKind::Docker,
            c.docker_hosts
                .iter()
                .map(|h| PlacementHost {
                    name: h.name.clone(),
                    location: h.location.clone(),
                })
                .collect(),
        );
        for h in &c.docker_hosts {
            if let Some(cap) = h.capacity {
                p.capacity
                    .insert((ComputeKind::Docker, Some(h.name.clone())), cap);
            }
        }
    }
    if let Some(cap) = c.process_capacity {
        p.capacity.insert((ComputeKind::Process, None), cap);
    }
    p
}

fn apply_drift(o: &mut Observed, drift: &[Drift]) {
    for d in drift {
        match d {
            Drift::Stop(s) => {
                o.sessions.get_mut(s).expect("drift names a session").state = SessionState::Stopped
            }
            Drift::Fail(s) => {
                o.sessions.get_mut(s).expect("drift names a session").state = SessionState::Failed
            }
            Drift::RemoveSession(s) => {
                o.sessions.remove(s).expect("drift names a session");
            }
            Drift::RemoveRoute(h) => {
                o.routes.remove(h).expect("drift names a route");
            }
            Drift::Upstream { host, to } => {
                o.routes
                    .get_mut(host)
                    .expect("drift names a route")
                    .upstream = to.clone()
            }
            Drift::Gap { provider, error } => {
                o.gaps.insert(
                    provider.parse::<ProviderId>().expect("provider id"),
                    error.clone(),
                );
            }
            Drift::Unreachable { provider, error } => {
                let id = provider.parse::<ProviderId>().expect("provider id");
                let previous = o.clone();
                o.gaps.insert(id.clone(), error.clone());
                o.sessions
                    .retain(|_, s| ProviderId::Compute(s.provider) != id);
                o.carry_unreachable(&previous);
            }
            Drift::ForeignSession { name } => {
                o.sessions.insert(
                    name.clone(),
                    ObservedSession {
                        name: name.clone(),
                        provider: ComputeKind::Process,
                        state: SessionState::Running,
                        owned: false,
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
                    },
                );
            }
            Drift::ForeignRoute { host, upstream } => {
                o.routes.insert(
                    host.clone(),
                    ObservedRoute {
                        host: host.clone(),
                        path: None,
                        strip_prefix: false,
                        upstream: upstream.clone(),
                        owned: false,
                        session: None,
                        route: None,
                    },
                );
            }
            Drift::Asleep {
                session,
                depth,
                state,
            } => {
                let o = o.sessions.get_mut(session).expect("drift names a session");
                o.state = serde_json::from_value(serde_json::Value::String(state.clone()))
                    .expect("a session state");
                o.asleep = Some(vessel::observed::Asleep {
                    since: "2026-11-30T12:00:00Z".parse().expect("a time"),
                    depth: serde_json::from_value(serde_json::Value::String(depth.clone()))
                        .expect("a sleep depth"),
                    reason: vessel::observed::SleepReason::Idle,
                });
            }
            Drift::Duplicate(name) => {
                o.duplicates.insert(
                    name.clone(),
                    vec![ComputeKind::Process, ComputeKind::Docker],
                );
            }
            Drift::Retained(name) => {
                o.retained.insert(
                    name.clone(),
                    vessel::observed::RetainedWorkspace {
                        provider: ComputeKind::Process,
                        since: DateTime::parse_from_rfc3339("2026-05-31T12:00:00Z")
                            .expect("ts")
                            .with_timezone(&Utc),
                        until: DateTime::parse_from_rfc3339("2026-06-01T12:00:00Z")
                            .expect("ts")
                            .with_timezone(&Utc),
                        bytes: Some(1024),
                    },
                );
            }
            Drift::ForeignRecord { name, content } => {
                let (rtype, _) = record_for(content);
                o.records.insert(
                    Observed::record_key(name, rtype),
                    ObservedRecord {
                        name: name.clone(),
                        rtype,
                        content: content.clone(),
                        owned: false,
                        session: None,
                    },
                );
            }
        }
    }
}

/// A case made ready to plan: the world as converged (what vessel had written), the world as
/// observed (with the case's drift), what is desired now, and the policy.
pub struct Prepared {
    pub world: Observed,
    pub observed: Observed,
    pub desired: Desired,
    pub policy: Policy,
    /// Also snapshot the Markdown rendering.
    pub markdown: bool,
}

pub fn prepare(path: &Path) -> Prepared {
    let text = std::fs::read_to_string(path).expect("read case");
    let case: Case =
        serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let now = case.now.unwrap_or_else(|| {
        DateTime::parse_from_rfc3339("2026-06-01T00:00:00Z")
            .expect("ts")
            .with_timezone(&Utc)
    });
    let policy = policy_of(&case.policy, now);
    let world_now = case.world_now.unwrap_or(now);
    let mut world_policy = policy.clone();
    world_policy.now = world_now;
    world_policy.allow_destroy = true;
    world_policy.allow_empty_source = true;
    let world = load(&case.world, world_now);
    let (world, _) = converge(
        &world,
        &Observed::default(),
        &world_policy,
        case.world_passes.unwrap_or(5),
    );
    let mut observed = world.clone();
    apply_drift(&mut observed, &case.drift);
    Prepared {
        world,
        observed,
        desired: load(&case.files, now),
        policy,
        markdown: case.markdown,
    }
}

fn run_case(path: &Path) -> String {
    let Prepared {
        observed,
        desired,
        policy,
        markdown,
        ..
    } = prepare(path);
    let p = plan(&desired, &observed, &policy);
    let again = plan(&desired, &observed, &policy);
    assert_eq!(
        render::json(&p),
        render::json(&again),
        "{}: planning twice gives the same plan",
        path.display()
    );
    let mut out = render::text(&p, &observed, false);
    if markdown {
        out.push_str("\n---- markdown ----\n");
        out.push_str(&render::markdown(&p, &observed));
    }
    out
}

/// Every planner case, in order.
pub fn case_paths() -> Vec<PathBuf> {
    let dir = root().join("tests/planner");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/planner")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    cases.sort();
    cases
}

#[test]
fn planner_cases_match_their_snapshots() {
    let cases = case_paths();
    assert!(
        cases.len() >= 10,
        "expected the planner cases in tests/planner"
    );
    let update = std::env::var_os("UPDATE_EXPECT").is_some();
    let mut failures = Vec::new();
    for case in &cases {
        let got = run_case(case);
        let snap = case.with_extension("txt");
        let want = std::fs::read_to_string(&snap).unwrap_or_default();
        if got != want {
            if update {
                std::fs::write(&snap, &got).expect("write snapshot");
            } else {
                failures.push(format!(
                    "{}:\n--- want\n{want}\n--- got\n{got}",
                    snap.display()
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} snapshot(s) differ (UPDATE_EXPECT=1 to update):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// A create that falls back to a later choice of its plan's `compute` list names the kinds it
/// skipped in the JSON plan, and its spec the kind it goes to.
#[test]
fn a_fallback_create_says_why_in_json() {
    let Prepared {
        observed,
        desired,
        policy,
        ..
    } = prepare(&root().join("tests/planner/30-fallback-placement.yaml"));
    let p = plan(&desired, &observed, &policy);
    let json: serde_json::Value =
        serde_json::from_str(&render::json(&p)).expect("the plan is JSON");
    let creates: Vec<&serde_json::Value> = json["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["action"] == "create_session")
        .collect();
    assert_eq!(creates.len(), 1, "{json}");
    assert_eq!(creates[0]["session"], "new");
    assert_eq!(creates[0]["spec"]["compute"], "process");
    assert_eq!(creates[0]["unreachable"], serde_json::json!(["docker"]));
}
