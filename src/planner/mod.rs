//! The planner: `plan(&Desired, &Observed, &Policy) -> Plan`.
//!
//! Synchronous and pure: no I/O, no clock (the policy carries `now`), no environment, no
//! randomness. The same inputs give a byte-identical plan. The plan is complete: every step
//! carries the names, specs and addresses the executor needs, its reason and its
//! dependencies, so execution makes no choices.
//!
//! Safety lives here, visible in the output: objects in an observation gap get no steps,
//! nothing vessel does not own is ever destroyed, objects from quarantined files are held as
//! they are, and destroys past the budget (or from an empty source) are held unless allowed.
//!
//! `plan` is a list of phases over one `Planner`, each in its own file: `sessions.rs` decides
//! each session's fate, `guards.rs` holds what the guards hold, `steps.rs` turns fates into
//! session steps, `routes.rs` plans routes and DNS records, `order.rs` numbers the steps and
//! wires their dependencies. What is held, and why, is one record (`Held`) every phase reads.

mod caps;
mod guards;
mod order;
pub mod policy;
pub mod render;
mod routes;
mod sessions;
pub mod simulate;
mod snapshots;
mod steps;
pub mod timed;

pub use crate::model::PlacementHost;
pub use order::{ObjectChange, object_changes};
pub use policy::{Policy, Settle, record_for};
pub use sessions::{runtime_spec, runtime_spec_on};

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Utc};

pub use crate::model::plan::{
    Action, DataFate, Deferred, Guard, Hold, HoldReason, Object, Plan, Reason, RecordAction,
    RouteAction, SessionAction, Step, Summary,
};

use crate::desired::{Desired, EffectiveRoute};
use crate::model::observed::{Observed, ProviderId, RuntimeSpec};
use crate::model::{ComputeKind, RunState, SessionSpec};

/// Compute the plan. Pure and deterministic.
pub fn plan(desired: &Desired, observed: &Observed, policy: &Policy) -> Plan {
    let mut p = Planner::new(desired, observed, policy);
    p.wants();
    p.fates();
    p.caps();
    p.guards();
    p.session_steps();
    p.snapshots();
    p.routes();
    p.records();
    p.finish()
}

/// One plan in the making: the inputs, what each phase decided, and the plan so far.
struct Planner<'a> {
    desired: &'a Desired,
    observed: &'a Observed,
    policy: &'a Policy,
    /// Holds, guards, deferred steps and the next wake-up, as the phases find them.
    out: Plan,
    drafts: Drafts,
    /// Desired sessions, expiry applied.
    wants: BTreeMap<&'a str, Want<'a>>,
    /// Sessions declared to be destroyed at their expiry, past it, or dormant past their
    /// `destroy_after`: when it expired, and the dormant time.
    expired: BTreeMap<&'a str, (DateTime<Utc>, Option<crate::model::Duration>)>,
    /// What happens to each session that is not held.
    fates: BTreeMap<&'a str, Fate>,
    /// Sessions whose spec changes in place, and the fields that change.
    updates: BTreeMap<&'a str, Vec<String>>,
    held: Held<'a>,
    /// Sessions whose address appears or changes in this plan: their routes wait.
    address_pending: BTreeSet<&'a str>,
    /// Hosts with a route that waits (for an address) or has none: their records wait too.
    /// The value is the waiting route's key where it is not the host (a path route). Only
    /// ever looked up, never walked: hashed (30,000 pending routes from empty made a sorted
    /// map's string comparisons a tenth of a plan).
    route_pending: std::collections::HashMap<String, Option<String>>,
    /// The routes wanted, by key (explicit routes win, then templates in order).
    routes: Vec<EffectiveRoute<'a>>,
}

/// What the plan leaves exactly as it is, and why it matters to later phases: one record,
/// consulted by every phase (a held session's routes and records are held too).
#[derive(Default)]
struct Held<'a> {
    /// Sessions a file with errors names (or whose plan is missing): never made or destroyed.
    quarantined: BTreeSet<&'a str>,
    /// Explicit routes a file with errors names.
    quarantined_routes: BTreeSet<&'a str>,
    /// Files that could not be read far enough to know what they declare: while there are any,
    /// nothing anywhere is destroyed or removed.
    unknown_files: Vec<PathBuf>,
    /// Sessions this plan leaves as they are, for any reason.
    sessions: BTreeSet<&'a str>,
    /// Hosts this plan leaves as they are.
    hosts: BTreeSet<String>,
}

impl Held<'_> {
    /// Is this session (and so everything of it) left as it is?
    fn session(&self, s: &str) -> bool {
        self.sessions.contains(s) || self.quarantined.contains(s)
    }

    /// Are removals held everywhere (a file's contents are unknown)?
    fn removals(&self) -> bool {
        !self.unknown_files.is_empty()
    }
}

/// A desired session as the plan sees it.
struct Want<'a> {
    spec: Arc<RuntimeSpec>,
    fingerprint: Arc<str>,
    session: &'a SessionSpec,
    file: &'a Path,
    /// The state it should be in now (expiry applied).
    state: RunState,
    expired: Option<DateTime<Utc>>,
    /// Kinds before `spec.compute` in its plan's list that could not be observed (a new
    /// session placed on a later choice).
    unreachable: Vec<ComputeKind>,
}

/// What the plan does with one session.
enum Fate {
    Create,
    Replace(Vec<String>),
    Start(Reason),
    Stop(Reason),
    Destroy(Reason),
    Keep,
}

/// Phases, in execution order. Dependencies only ever point to an earlier phase (or an earlier
/// step of the same phase), so step ids are a topological order.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    /// A replaced session's new image, before anything of the old one is taken away.
    Pull,
    RemoveRecord,
    RemoveRoute,
    SaveWork,
    Stop,
    Destroy,
    Update,
    Create,
    Start,
    Healthy,
    Source,
    UpsertRoute,
    UpsertRecord,
    Snapshot,
}

struct Draft {
    phase: Phase,
    action: Action,
    reason: Reason,
}

/// The steps found so far, in the order the phases found them.
#[derive(Default)]
struct Drafts(Vec<Draft>);

impl Drafts {
    fn push(&mut self, phase: Phase, action: Action, reason: Reason) {
        self.0.push(Draft {
            phase,
            action,
            reason,
        });
    }
}

impl<'a> Planner<'a> {
    fn new(desired: &'a Desired, observed: &'a Observed, policy: &'a Policy) -> Planner<'a> {
        Planner {
            desired,
            observed,
            policy,
            out: Plan::default(),
            drafts: Drafts::default(),
            wants: BTreeMap::new(),
            expired: BTreeMap::new(),
            fates: BTreeMap::new(),
            updates: BTreeMap::new(),
            held: Held::default(),
            address_pending: BTreeSet::new(),
            route_pending: Default::default(),
            routes: Vec::new(),
        }
    }

    /// Leave `object` as it is, saying why.
    fn hold(&mut self, object: Object, why: HoldReason) {
        self.out.held.push(Hold { object, why });
    }

    /// Leave a session (and its routes and records) as it is, saying why.
    fn hold_session(&mut self, name: &'a str, why: HoldReason) {
        self.held.sessions.insert(name);
        self.hold(Object::Session(name.to_string()), why);
    }

    /// Leave a route (by key: host, or `host/path`) and its host's record as they are,
    /// saying why.
    fn hold_host(&mut self, key: &str, why: HoldReason) {
        let (host, _) = crate::model::split_route_key(key);
        self.held.hosts.insert(host.to_string());
        self.hold(Object::Route(key.to_string()), why);
    }

    /// Why nothing of `provider` may be touched, if it could not be observed.
    fn unobserved(&self, provider: &ProviderId) -> Option<HoldReason> {
        self.observed
            .gaps
            .get(provider)
            .map(|error| HoldReason::Unobserved {
                provider: provider.clone(),
                error: error.clone(),
            })
    }

    /// When removing `object` (of `session`) must wait for its files to settle, if it must:
    /// the file it was declared in and the file its session was made from.
    fn settling(&self, object: &Object, session: Option<&str>) -> Option<(PathBuf, DateTime<Utc>)> {
        let settle = &self.policy.settle;
        let mut files = settle.files_of(object, None);
        if let Some(s) = session {
            let made_from = self
                .observed
                .sessions
                .get(s)
                .and_then(|o| o.source_file.as_deref());
            files.extend(settle.files_of(&Object::Session(s.to_string()), made_from));
        }
        settle.wait_for(files, self.policy.now)
    }

    /// Wake the loop at `at` at the latest.
    fn wake_at(&mut self, at: DateTime<Utc>) {
        if self.out.next_wakeup.is_none_or(|w| at < w) {
            self.out.next_wakeup = Some(at);
        }
    }

    /// Order the steps, wire their dependencies, and summarise.
    fn finish(mut self) -> Plan {
        self.out
            .upcoming
            .sort_by(|a, b| (a.at, &a.session, a.change).cmp(&(b.at, &b.session, b.change)));
        order::finish(self.out, self.drafts.0, self.observed)
    }
}
