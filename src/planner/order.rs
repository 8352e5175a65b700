//! The last phase: steps ordered by phase, numbered, their dependencies wired (always to
//! lower ids), the approval hash of what guards hold, and the summary. Also how a step changes
//! its object (for rendering), and the merge of two sorted sequences the phases walk.

use std::collections::{BTreeMap, BTreeSet};

use crate::model::observed::{Observed, RecordType};

use super::{
    Action, Draft, Guard, HoldReason, Object, Phase, Plan, Reason, RecordAction, RouteAction,
    SessionAction, Step, Summary,
};

/// Order drafts by phase and object, number them, wire dependencies, and summarise.
pub(super) fn finish(mut out: Plan, mut drafts: Vec<Draft>, observed: &Observed) -> Plan {
    // Stable, by phase only: within a phase, drafts were pushed in the order of the sorted maps
    // they came from, which is deterministic (and cheaper than comparing names again).
    drafts.sort_by_key(|d| d.phase);
    let deps = dependencies(&drafts, observed);
    for (id, (d, deps)) in drafts.into_iter().zip(deps).enumerate() {
        out.steps.push(Step {
            id,
            action: d.action,
            reason: d.reason,
            depends_on: deps,
        });
    }
    out.held.sort_by(|a, b| a.object.cmp(&b.object));
    out.held.dedup();
    out.approval = approval_of(&out);
    out.summary = summarize(&out);
    out
}

/// The approval hash of what approvable guards hold: the guards' kinds and the objects they
/// hold, sorted. None when no guard holds anything an approval could let through.
fn approval_of(plan: &Plan) -> Option<String> {
    use sha2::{Digest, Sha256};
    let kinds: Vec<&str> = plan
        .guards
        .iter()
        .filter_map(|g| match g {
            Guard::DestroyBudget { .. } => Some("destroy-budget"),
            Guard::EmptySource { .. } => Some("empty-source"),
            Guard::UnknownObjects { .. } => None,
        })
        .collect();
    if kinds.is_empty() {
        return None;
    }
    let mut h = Sha256::new();
    for k in kinds {
        h.update(k.as_bytes());
        h.update([0]);
    }
    for held in plan.held.iter().filter(|h| h.why == HoldReason::Guarded) {
        h.update(held.object.to_string().as_bytes());
        h.update([0]);
    }
    Some(hex::encode(&h.finalize()[..8]))
}

/// Each draft's dependencies, by index into the (sorted) drafts; always lower indices.
fn dependencies(drafts: &[Draft], observed: &Observed) -> Vec<Vec<usize>> {
    // Index: (phase, session) and (phase, host) -> step ids.
    let mut by_session: BTreeMap<(Phase, &str), Vec<usize>> = BTreeMap::new();
    // Several route steps can share a host (routes with path prefixes).
    let mut by_host: BTreeMap<(Phase, &str), Vec<usize>> = BTreeMap::new();
    for (id, d) in drafts.iter().enumerate() {
        if let Some(s) = d.action.session() {
            by_session.entry((d.phase, s)).or_default().push(id);
        }
        match &d.action {
            Action::Route(RouteAction::UpsertRoute { host, .. })
            | Action::Route(RouteAction::RemoveRoute { host, .. }) => {
                by_host.entry((d.phase, host)).or_default().push(id);
            }
            Action::Record(RecordAction::UpsertRecord { name, .. })
            | Action::Record(RecordAction::RemoveRecord { name, .. }) => {
                by_host.entry((d.phase, name)).or_default().push(id);
            }
            _ => {}
        }
    }
    // Hosts of the observed routes and records of the sessions that need them: those torn
    // down (their routes and records go first) and those pulling (a replace whose image cannot
    // be pulled takes nothing away, so their removals wait for the pull). Only those: a
    // converged pass has none, and indexing 40,000 routes and records for nothing was most of
    // its cost.
    let pulling: BTreeSet<&str> = by_session
        .keys()
        .filter(|(p, _)| *p == Phase::Pull)
        .map(|(_, s)| *s)
        .collect();
    let tearing: BTreeSet<&str> = drafts
        .iter()
        .filter_map(|d| match &d.action {
            Action::Session(SessionAction::SaveWork { session, .. })
            | Action::Session(SessionAction::StopSession { session, .. })
            | Action::Session(SessionAction::DestroySession { session, .. }) => {
                Some(session.as_str())
            }
            _ => None,
        })
        .collect();
    let mut routes_of: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    let mut records_of: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    if !pulling.is_empty() || !tearing.is_empty() {
        let wanted = |s: &str| pulling.contains(s) || tearing.contains(s);
        for r in observed.routes.values() {
            if let Some(s) = r.session.as_deref().filter(|s| wanted(s)) {
                routes_of.entry(s).or_default().push(r.host.as_str());
            }
        }
        for r in observed.records.values() {
            if let Some(s) = r.session.as_deref().filter(|s| wanted(s)) {
                records_of.entry(s).or_default().push(r.name.as_str());
            }
        }
    }
    let sess = |p: Phase, s: &str| {
        by_session
            .get(&(p, s))
            .map(Vec::as_slice)
            .unwrap_or_default()
            .to_vec()
    };
    let host = |p: Phase, h: &str| by_host.get(&(p, h)).cloned().unwrap_or_default();
    // The pulling session each observed route's host and record's name belongs to.
    let mut session_of_host: BTreeMap<&str, &str> = BTreeMap::new();
    for (s, hosts) in routes_of.iter().chain(records_of.iter()) {
        if pulling.contains(s) {
            for h in hosts {
                session_of_host.insert(h, s);
            }
        }
    }
    let pulled = |h: &str| {
        session_of_host
            .get(h)
            .map(|s| sess(Phase::Pull, s))
            .unwrap_or_default()
    };
    let mut all = Vec::with_capacity(drafts.len());
    for (id, d) in drafts.iter().enumerate() {
        let mut deps: Vec<usize> = Vec::new();
        match &d.action {
            // Taken of a session that stays (the planner adds none for one made, replaced or
            // destroyed in the same plan), after what the plan does to it now.
            Action::Session(SessionAction::Snapshot { session, .. }) => {
                deps.extend(sess(Phase::Update, session));
                deps.extend(sess(Phase::Start, session));
                deps.extend(sess(Phase::Stop, session));
            }
            Action::Session(SessionAction::PullImage { .. }) => {}
            Action::Route(RouteAction::RemoveRoute { host: h, .. }) => {
                deps.extend(host(Phase::RemoveRecord, h));
                deps.extend(pulled(h));
            }
            Action::Session(SessionAction::SaveWork { session, .. })
            | Action::Session(SessionAction::StopSession { session, .. })
            | Action::Session(SessionAction::DestroySession { session, .. }) => {
                deps.extend(sess(Phase::Pull, session));
                for h in routes_of.get(session.as_str()).into_iter().flatten() {
                    deps.extend(host(Phase::RemoveRoute, h));
                }
                for h in records_of.get(session.as_str()).into_iter().flatten() {
                    deps.extend(host(Phase::RemoveRecord, h));
                }
                if d.phase > Phase::SaveWork {
                    deps.extend(sess(Phase::SaveWork, session));
                }
            }
            Action::Session(SessionAction::CreateSession { session, .. }) => {
                deps.extend(sess(Phase::Destroy, session))
            }
            Action::Session(SessionAction::UpdateSession { session, .. }) => {
                deps.extend(sess(Phase::Stop, session))
            }
            Action::Session(SessionAction::StartSession { session, .. }) => {
                deps.extend(sess(Phase::Update, session))
            }
            Action::Session(SessionAction::WaitHealthy { session, .. }) => {
                deps.extend(sess(Phase::Update, session));
                deps.extend(sess(Phase::Create, session));
                deps.extend(sess(Phase::Start, session));
            }
            Action::Session(SessionAction::SyncSource { session, .. }) => {
                deps.extend(sess(Phase::Healthy, session));
                if deps.is_empty() {
                    deps.extend(sess(Phase::Create, session));
                }
            }
            Action::Route(RouteAction::UpsertRoute { session, .. }) => {
                // After the session is made, started, healthy and holds its project: a route
                // whose upstream is read then reads the address it has by then.
                deps.extend(sess(Phase::Create, session));
                deps.extend(sess(Phase::Start, session));
                deps.extend(sess(Phase::Healthy, session));
                deps.extend(sess(Phase::Source, session));
            }
            Action::Record(RecordAction::UpsertRecord { name, .. }) => {
                deps.extend(host(Phase::UpsertRoute, name))
            }
            Action::Record(RecordAction::RemoveRecord { name, .. }) => deps.extend(pulled(name)),
        }
        debug_assert!(
            deps.iter().all(|d| *d < id),
            "step {id} depends on a later step: {deps:?}"
        );
        deps.retain(|d| *d < id);
        deps.sort_unstable();
        deps.dedup();
        all.push(deps);
    }
    all
}

/// One verb per object: what the plan does to it overall.
pub fn object_changes(plan: &Plan) -> BTreeMap<Object, ObjectChange> {
    let mut m: BTreeMap<Object, ObjectChange> = BTreeMap::new();
    for s in &plan.steps {
        let c = change_of(s);
        let e = m.entry(s.action.object()).or_insert(c);
        if c.rank() > e.rank() {
            *e = c;
        }
    }
    // An object whose steps only follow others (health, save) is an update.
    for c in m.values_mut() {
        if *c == ObjectChange::Follow {
            *c = ObjectChange::Update;
        }
    }
    m
}

/// What one step does to its object.
fn change_of(s: &Step) -> ObjectChange {
    match (&s.action, &s.reason) {
        (_, Reason::Replaced { .. }) => ObjectChange::Replace,
        (
            Action::Session(SessionAction::CreateSession { .. })
            | Action::Route(RouteAction::UpsertRoute { .. })
            | Action::Record(RecordAction::UpsertRecord { .. }),
            Reason::Missing,
        ) => ObjectChange::Create,
        (
            Action::Session(SessionAction::DestroySession { .. })
            | Action::Route(RouteAction::RemoveRoute { .. })
            | Action::Record(RecordAction::RemoveRecord { .. }),
            _,
        ) => ObjectChange::Destroy,
        (
            Action::Session(SessionAction::WaitHealthy { .. })
            | Action::Session(SessionAction::PullImage { .. })
            | Action::Session(SessionAction::SaveWork { .. }),
            _,
        ) => ObjectChange::Follow,
        (Action::Session(SessionAction::SyncSource { .. }), Reason::Follows { .. }) => {
            ObjectChange::Follow
        }
        _ => ObjectChange::Update,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectChange {
    Follow,
    Update,
    Create,
    Destroy,
    Replace,
}

impl ObjectChange {
    fn rank(self) -> u8 {
        match self {
            ObjectChange::Follow => 0,
            ObjectChange::Update => 1,
            ObjectChange::Create => 2,
            ObjectChange::Destroy => 3,
            ObjectChange::Replace => 4,
        }
    }

    pub fn symbol(self) -> &'static str {
        match self {
            ObjectChange::Follow | ObjectChange::Update => "~",
            ObjectChange::Create => "+",
            ObjectChange::Destroy => "-",
            ObjectChange::Replace => "-/+",
        }
    }
}

fn summarize(p: &Plan) -> Summary {
    let mut s = Summary {
        deferred: p.deferred.len(),
        held: p.held.len(),
        ..Summary::default()
    };
    type Key<'a> = (u8, &'a str, Option<&'a str>, Option<RecordType>);
    let mut m: BTreeMap<Key, ObjectChange> = BTreeMap::new();
    for step in &p.steps {
        let c = change_of(step);
        let e = m.entry(step.action.key()).or_insert(c);
        if c.rank() > e.rank() {
            *e = c;
        }
    }
    for c in m.values() {
        match c {
            ObjectChange::Create => s.create += 1,
            ObjectChange::Destroy => s.destroy += 1,
            ObjectChange::Replace => s.replace += 1,
            ObjectChange::Update | ObjectChange::Follow => s.update += 1,
        }
    }
    s
}

/// Walk two sequences sorted by key together: every key once, with its value from either side.
pub(super) fn merge_join<'k, A, B>(
    a: impl Iterator<Item = (&'k str, A)>,
    b: impl Iterator<Item = (&'k str, B)>,
) -> impl Iterator<Item = (&'k str, Option<A>, Option<B>)> {
    let mut a = a.peekable();
    let mut b = b.peekable();
    std::iter::from_fn(move || {
        let order = match (a.peek(), b.peek()) {
            (None, None) => return None,
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some((ka, _)), Some((kb, _))) => ka.cmp(kb),
        };
        Some(match order {
            std::cmp::Ordering::Less => a.next().map(|(k, v)| (k, Some(v), None))?,
            std::cmp::Ordering::Greater => b.next().map(|(k, v)| (k, None, Some(v)))?,
            std::cmp::Ordering::Equal => {
                let (k, va) = a.next()?;
                let (_, vb) = b.next()?;
                (k, Some(va), Some(vb))
            }
        })
    })
}
