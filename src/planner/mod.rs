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

pub mod policy;
pub mod render;
pub mod simulate;

pub use policy::{PlacementHost, Policy, Settle, record_for};

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Utc};

pub use crate::model::plan::{
    Action, DataFate, Deferred, Guard, Hold, HoldReason, Object, Plan, Reason, RecordAction,
    RouteAction, SessionAction, Step, Summary,
};

use crate::desired::{Desired, EffectiveRoute, effective_routes};
use crate::model::observed::{
    Observed, ObservedSession, ProviderId, RecordType, RuntimeSpec, SessionState,
};
use crate::model::{Duration, ExpiryAction, FieldChange, Kind, PlanSpec, RunState, SessionSpec};

/// The merged, resolved spec a session on `plan` runs with.
pub fn runtime_spec(session: &SessionSpec, plan: &PlanSpec) -> RuntimeSpec {
    let mut env = plan.env.clone();
    env.extend(session.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    RuntimeSpec {
        compute: plan.compute,
        image: plan.image.clone(),
        command: plan.command.clone(),
        env,
        cpus: plan.cpus,
        memory: plan.memory,
        disk: plan.disk,
        ports: plan.ports.clone(),
        health: plan.health.clone(),
        stop_timeout: plan.stop_timeout,
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
}

struct Draft {
    phase: Phase,
    action: Action,
    reason: Reason,
}

/// Compute the plan. Pure and deterministic.
pub fn plan(desired: &Desired, observed: &Observed, policy: &Policy) -> Plan {
    let mut out = Plan::default();
    let gap = |p: &ProviderId| observed.gaps.get(p).cloned();

    // Desired sessions with expiry applied, and the earliest future expiry.
    let mut wants: BTreeMap<&str, Want> = BTreeMap::new();
    // Sessions without env of their own share their plan's spec and fingerprint.
    let mut per_plan: BTreeMap<&str, (Arc<RuntimeSpec>, Arc<str>)> = BTreeMap::new();
    // Sessions whose plan is not there (validation prevents it): held, never destroyed.
    let mut planless: BTreeSet<&str> = BTreeSet::new();
    for (name, doc) in &desired.sessions {
        let Some(plan) = desired.plans.get(&doc.spec.plan) else {
            planless.insert(name);
            continue;
        };
        let s = &doc.spec;
        let mut state = s.state;
        let mut expired = None;
        if let Some(at) = s.expires {
            if at <= policy.now {
                expired = Some(at);
                if s.on_expiry == ExpiryAction::Destroy {
                    continue;
                }
                state = RunState::Stopped;
            } else {
                wake_at(&mut out.next_wakeup, at);
            }
        }
        let (spec, fingerprint) = if s.env.is_empty() {
            per_plan
                .entry(plan.spec.name.as_str())
                .or_insert_with(|| {
                    let spec = runtime_spec(s, &plan.spec);
                    let fp = spec.fingerprint();
                    (Arc::new(spec), fp.into())
                })
                .clone()
        } else {
            let spec = runtime_spec(s, &plan.spec);
            let fp = spec.fingerprint();
            (Arc::new(spec), fp.into())
        };
        wants.insert(
            name,
            Want {
                spec,
                fingerprint,
                session: s,
                file: &doc.file,
                state,
                expired,
            },
        );
    }
    let expired_destroy: BTreeMap<&str, DateTime<Utc>> = desired
        .sessions
        .iter()
        .filter_map(|(n, d)| match (d.spec.expires, d.spec.on_expiry) {
            (Some(at), ExpiryAction::Destroy) if at <= policy.now => Some((n.as_str(), at)),
            _ => None,
        })
        .collect();

    // Held by quarantine: names the broken files hold, and sessions made from those files.
    let mut held_sessions: BTreeSet<&str> = desired.held(Kind::Session);
    held_sessions.extend(planless.iter().copied());
    // A file of unknown contents: nothing is destroyed or removed anywhere.
    let unknown_files: Vec<PathBuf> = desired
        .quarantined
        .iter()
        .filter(|(_, q)| !q.complete)
        .map(|(f, _)| f.clone())
        .collect();
    let hold_removals = !unknown_files.is_empty();
    let held_routes: BTreeSet<&str> = desired.held(Kind::Route);
    let quarantined_file = |o: &ObservedSession| -> Option<Option<PathBuf>> {
        if held_sessions.contains(o.name.as_str()) {
            return Some(
                desired
                    .quarantined
                    .iter()
                    .find(|(_, q)| {
                        q.held
                            .iter()
                            .any(|h| h.kind == Kind::Session && h.name == o.name)
                    })
                    .map(|(f, _)| f.clone()),
            );
        }
        match &o.source_file {
            Some(f) if desired.quarantined.contains_key(f) => Some(Some(f.clone())),
            _ => None,
        }
    };

    // 1. Decide each session's fate.
    let mut fates: BTreeMap<&str, Fate> = BTreeMap::new();
    // Sessions whose spec changes in place, and the fields that change.
    let mut updates: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut held_session_names: BTreeSet<&str> = BTreeSet::new();
    let joined = merge_join(
        wants.iter().map(|(k, v)| (*k, v)),
        observed.sessions.iter().map(|(k, v)| (k.as_str(), v)),
    );
    for (name, want, have) in joined {
        let obj = Object::Session(name.to_string());
        if let Some(o) = have {
            if let Some(file) = quarantined_file(o) {
                out.held.push(Hold {
                    object: obj,
                    why: HoldReason::Quarantined { file },
                });
                held_session_names.insert(name);
                continue;
            }
        } else if held_sessions.contains(name) {
            continue;
        }
        let providers: BTreeSet<ProviderId> = want
            .map(|w| ProviderId::Compute(w.spec.compute))
            .into_iter()
            .chain(have.map(|o| ProviderId::Compute(o.provider)))
            .collect();
        if let Some((p, e)) = providers
            .iter()
            .find_map(|p| gap(p).map(|e| (p.clone(), e)))
        {
            out.held.push(Hold {
                object: obj,
                why: HoldReason::Unobserved {
                    provider: p,
                    error: e,
                },
            });
            held_session_names.insert(name);
            continue;
        }
        let fate = match (want, have) {
            (None, None) => continue,
            (Some(_), Some(o)) if !o.owned => {
                out.held.push(Hold {
                    object: obj,
                    why: HoldReason::Foreign,
                });
                held_session_names.insert(name);
                continue;
            }
            (None, Some(o)) if !o.owned => continue,
            (Some(_), None) => Fate::Create,
            (None, Some(_)) => Fate::Destroy(match expired_destroy.get(name) {
                Some(at) => Reason::Expired { at: *at },
                None => Reason::NotDesired,
            }),
            (Some(w), Some(o)) => {
                let diff = spec_diff(o, &w.spec, &w.fingerprint);
                if !diff.replace.is_empty() {
                    let mut changes = diff.replace;
                    changes.extend(diff.restart);
                    changes.sort();
                    Fate::Replace(changes)
                } else {
                    if !diff.restart.is_empty() {
                        updates.insert(name, diff.restart);
                    }
                    let want_running = w.state == RunState::Running;
                    match (want_running, o.state) {
                        (true, SessionState::Running) | (false, SessionState::Stopped) => {
                            Fate::Keep
                        }
                        (true, SessionState::Failed) => Fate::Start(Reason::Failed),
                        (true, SessionState::Stopped) => Fate::Start(Reason::StateChanged {
                            from: "stopped".into(),
                            to: w.state.as_str().into(),
                        }),
                        (false, _) => Fate::Stop(match w.expired {
                            Some(at) => Reason::Expired { at },
                            None => Reason::StateChanged {
                                from: state_str(o.state).into(),
                                to: w.state.as_str().into(),
                            },
                        }),
                    }
                }
            }
        };
        // A session is not made without its project.
        if matches!(fate, Fate::Create | Fate::Replace(_))
            && let Some(path) = desired.missing_sources.get(name)
        {
            out.held.push(Hold {
                object: obj,
                why: HoldReason::SourceMissing { path: path.clone() },
            });
            held_session_names.insert(name);
            continue;
        }
        // What a source change takes away waits until its files have settled.
        if matches!(fate, Fate::Destroy(_) | Fate::Replace(_)) {
            let files = policy
                .settle
                .files_of(&obj, have.and_then(|o| o.source_file.as_deref()));
            if let Some((file, until)) = policy.settle.wait_for(files, policy.now) {
                wake_at(&mut out.next_wakeup, until);
                out.held.push(Hold {
                    object: obj,
                    why: HoldReason::Settling { file, until },
                });
                held_session_names.insert(name);
                continue;
            }
        }
        fates.insert(name, fate);
    }

    // 2. Guards. Destroys, and replaces that discard a workspace, count against the budget.
    let destroys: Vec<&str> = fates
        .iter()
        .filter(|(_, f)| matches!(f, Fate::Destroy(_)))
        .map(|(n, _)| *n)
        .collect();
    let discarding: Vec<&str> = fates
        .iter()
        .filter(|(n, f)| {
            matches!(f, Fate::Replace(_))
                && observed
                    .sessions
                    .get(**n)
                    .is_none_or(|o| data_fate(o, policy) == DataFate::Discarded)
        })
        .map(|(n, _)| *n)
        .collect();
    if hold_removals && !destroys.is_empty() {
        out.guards.push(Guard::UnknownObjects {
            files: unknown_files.clone(),
        });
        for n in &destroys {
            fates.remove(n);
            held_session_names.insert(n);
            out.held.push(Hold {
                object: Object::Session(n.to_string()),
                why: HoldReason::Guarded,
            });
        }
    } else if hold_removals {
        out.guards.push(Guard::UnknownObjects {
            files: unknown_files.clone(),
        });
    }
    let destroys: Vec<&str> = destroys
        .into_iter()
        .filter(|n| fates.contains_key(n))
        .collect();
    let risky: Vec<&str> = destroys.iter().chain(discarding.iter()).copied().collect();
    if !risky.is_empty() {
        let existing = observed.sessions.values().filter(|o| o.owned).count();
        let empty_source = desired.sessions.is_empty() && desired.quarantined.is_empty();
        let b = policy.destroy_budget;
        let over_count = risky.len() > b.max_count as usize;
        let over_share =
            risky.len() > 1 && risky.len() * 100 > usize::from(b.max_percent) * existing;
        let guard = if empty_source && !destroys.is_empty() && !policy.allow_empty_source {
            Some(Guard::EmptySource {
                destroys: destroys.len(),
            })
        } else if (over_count || over_share) && !policy.allow_destroy {
            Some(Guard::DestroyBudget {
                destroys: risky.len(),
                existing,
                max_count: b.max_count,
                max_percent: b.max_percent,
            })
        } else {
            None
        };
        if let Some(g) = guard {
            out.guards.push(g);
            for n in risky {
                fates.remove(n);
                held_session_names.insert(n);
                out.held.push(Hold {
                    object: Object::Session(n.to_string()),
                    why: HoldReason::Guarded,
                });
            }
        }
    }

    let mut drafts: Vec<Draft> = Vec::new();
    let mut push = |phase, action, reason| {
        drafts.push(Draft {
            phase,
            action,
            reason,
        })
    };

    // 3. Session steps.
    // Sessions whose address will change or appear in this plan: their routes wait.
    let mut address_pending: BTreeSet<&str> = BTreeSet::new();
    let stop_timeout = |name: &str| {
        wants
            .get(name)
            .and_then(|w| w.spec.stop_timeout)
            .or_else(|| {
                observed
                    .sessions
                    .get(name)
                    .and_then(|o| o.spec.as_ref())
                    .and_then(|s| s.stop_timeout)
            })
    };
    // Sessions held because no host is in the location they ask for.
    let mut no_host: Vec<(&str, String)> = Vec::new();
    for (&name, fate) in &fates {
        let have = observed.sessions.get(name);
        let want = wants.get(name);
        let follows = || Reason::Follows {
            object: Object::Session(name.to_string()),
        };
        if let (Some(changes), Some(w), Some(o)) = (updates.get(name), want, have) {
            // In place: a running session that stays so restarts with it.
            let restart = matches!(fate, Fate::Keep) && o.state == SessionState::Running;
            push(
                Phase::Update,
                Action::Session(SessionAction::UpdateSession {
                    session: name.into(),
                    provider: o.provider,
                    spec: w.spec.clone(),
                    fingerprint: w.fingerprint.to_string(),
                    restart,
                }),
                Reason::Changed {
                    changes: changes.clone(),
                    restart,
                },
            );
            if restart {
                push(
                    Phase::Healthy,
                    Action::Session(SessionAction::WaitHealthy {
                        session: name.into(),
                        provider: o.provider,
                        check: w.spec.health.clone(),
                    }),
                    follows(),
                );
                if changes.iter().any(|c| c == "ports") {
                    address_pending.insert(name);
                }
            }
        }
        match fate {
            Fate::Keep => {
                if let (Some(w), Some(o)) = (want, have)
                    && let Some(src) = &w.session.source
                    && w.state == RunState::Running
                    && o.state == SessionState::Running
                    && o.synced_source.as_ref() != Some(&src.path)
                    && !desired.missing_sources.contains_key(name)
                {
                    push(
                        Phase::Source,
                        sync_action(name, w),
                        Reason::Drifted {
                            changes: vec!["source.path".into()],
                        },
                    );
                }
            }
            Fate::Create => {
                let Some(w) = want else { continue };
                let placed = place(name, w, policy, None);
                let Some(host) = placed.map_err(|l| no_host.push((name, l))).ok() else {
                    continue;
                };
                let restore = observed.retained.get(name).is_some_and(|r| {
                    r.provider == w.spec.compute
                        && r.until > policy.now
                        && policy.keeps_workspaces.contains(&r.provider)
                });
                create_steps(&mut push, name, w, host, restore, Reason::Missing);
                address_pending.insert(name);
            }
            Fate::Replace(changes) => {
                let (Some(w), Some(o)) = (want, have) else {
                    continue;
                };
                let placed = place(name, w, policy, o.host.as_deref());
                let Some(host) = placed.map_err(|l| no_host.push((name, l))).ok() else {
                    continue;
                };
                let keep = policy.keeps_workspaces.contains(&o.provider);
                let reason = Reason::Replaced {
                    changes: changes.clone(),
                    data: data_fate(o, policy),
                };
                let retain = Retain {
                    keep,
                    timeout: stop_timeout(name),
                };
                save_then_destroy(&mut push, name, o, &reason, retain);
                let restore = keep && policy.keeps_workspaces.contains(&w.spec.compute);
                create_steps(&mut push, name, w, host, restore, reason);
                address_pending.insert(name);
            }
            Fate::Start(reason) => {
                let Some(o) = have else { continue };
                push(
                    Phase::Start,
                    Action::Session(SessionAction::StartSession {
                        session: name.into(),
                        provider: o.provider,
                    }),
                    reason.clone(),
                );
                push(
                    Phase::Healthy,
                    Action::Session(SessionAction::WaitHealthy {
                        session: name.into(),
                        provider: o.provider,
                        check: want.and_then(|w| w.spec.health.clone()),
                    }),
                    follows(),
                );
                if let Some(w) = want
                    && let Some(src) = &w.session.source
                    && o.synced_source.as_ref() != Some(&src.path)
                    && !desired.missing_sources.contains_key(name)
                {
                    push(Phase::Source, sync_action(name, w), follows());
                }
                address_pending.insert(name);
            }
            Fate::Stop(reason) => {
                let Some(o) = have else { continue };
                save_first(&mut push, name, o, reason);
                push(
                    Phase::Stop,
                    Action::Session(SessionAction::StopSession {
                        session: name.into(),
                        provider: o.provider,
                        stop_timeout: stop_timeout(name),
                    }),
                    reason.clone(),
                );
            }
            Fate::Destroy(reason) => {
                let Some(o) = have else { continue };
                let retain = Retain {
                    keep: policy.keeps_workspaces.contains(&o.provider),
                    timeout: stop_timeout(name),
                };
                save_then_destroy(&mut push, name, o, reason, retain);
            }
        }
    }

    for (name, location) in no_host {
        out.held.push(Hold {
            object: Object::Session(name.to_string()),
            why: HoldReason::NoHost { location },
        });
        held_session_names.insert(name);
    }

    // Whether removing a route or record (of `session`) waits for its files to settle.
    let settling = |object: &Object, session: Option<&str>| {
        let mut files = policy.settle.files_of(object, None);
        if let Some(s) = session {
            let made_from = observed
                .sessions
                .get(s)
                .and_then(|o| o.source_file.as_deref());
            files.extend(
                policy
                    .settle
                    .files_of(&Object::Session(s.to_string()), made_from),
            );
        }
        policy.settle.wait_for(files, policy.now)
    };

    // 4. Routes: desired for sessions that are running or sleeping (not stopped, not held).
    let routed = |s: &str| {
        wants.get(s).is_some_and(|w| w.state != RunState::Stopped)
            && !held_session_names.contains(s)
    };
    // Sorted by host; where two claim one host (validation prevents it) the explicit route
    // wins, then the first template in `RouteOrigin` order: a total order, so deterministic.
    let mut desired_routes: Vec<EffectiveRoute> =
        effective_routes(desired, &policy.templates, &policy.domain, routed);
    desired_routes.sort_unstable_by(|a, b| (&a.host, a.origin).cmp(&(&b.host, b.origin)));
    desired_routes.dedup_by(|later, first| later.host == first.host);
    let proxy_gap = gap(&ProviderId::Proxy);
    let mut held_hosts: BTreeSet<&str> = BTreeSet::new();
    let mut route_pending: BTreeSet<&str> = BTreeSet::new();
    let joined = merge_join(
        desired_routes.iter().map(|r| (r.host.as_str(), r)),
        observed.routes.iter().map(|(k, v)| (k.as_str(), v)),
    );
    for (host, want, have) in joined {
        let obj = || Object::Route(host.to_string());
        if have.is_some_and(|o| !o.owned) {
            if want.is_some() {
                out.held.push(Hold {
                    object: obj(),
                    why: HoldReason::Foreign,
                });
                held_hosts.insert(host);
            }
            continue;
        }
        let held_by_quarantine = have.and_then(|o| {
            let s = o
                .session
                .as_deref()
                .is_some_and(|s| held_session_names.contains(s) || held_sessions.contains(s));
            let r = o.route.as_deref().is_some_and(|r| held_routes.contains(r));
            (s || r).then_some(())
        });
        if held_by_quarantine.is_some() {
            held_hosts.insert(host);
            continue;
        }
        if let Some(e) = &proxy_gap {
            out.held.push(Hold {
                object: obj(),
                why: HoldReason::Unobserved {
                    provider: ProviderId::Proxy,
                    error: e.clone(),
                },
            });
            held_hosts.insert(host);
            continue;
        }
        match (want, have) {
            (Some(r), _) => {
                let upstream = if address_pending.contains(r.session) {
                    None
                } else {
                    observed
                        .sessions
                        .get(r.session)
                        .and_then(|s| s.endpoints.get(r.port_name))
                        .cloned()
                };
                let Some(upstream) = upstream else {
                    if address_pending.contains(r.session) {
                        // The session is being created or started in this plan: the next
                        // pass has its address.
                        out.deferred.push(Deferred {
                            object: obj(),
                            after: Object::Session(r.session.to_string()),
                        });
                        route_pending.insert(host);
                    } else if have.is_none() {
                        // Asleep or stopped with no address: nothing to route to until it runs.
                        out.held.push(Hold {
                            object: obj(),
                            why: HoldReason::NoAddress,
                        });
                        route_pending.insert(host);
                    }
                    continue;
                };
                let route_name: Option<&str> = match r.origin {
                    crate::desired::RouteOrigin::Route(n) => Some(n),
                    crate::desired::RouteOrigin::Template(_) => None,
                };
                let reason = match have {
                    None => Reason::Missing,
                    Some(o) if o.upstream != upstream => Reason::Drifted {
                        changes: vec![format!("upstream {} -> {upstream}", o.upstream)],
                    },
                    Some(o)
                        if o.session.as_deref() != Some(r.session)
                            || o.route.as_deref() != route_name =>
                    {
                        Reason::Drifted {
                            changes: vec!["owner".into()],
                        }
                    }
                    Some(_) => continue,
                };
                push(
                    Phase::UpsertRoute,
                    Action::Route(RouteAction::UpsertRoute {
                        host: host.into(),
                        upstream,
                        session: r.session.to_string(),
                        port: r.port_name.to_string(),
                        route: route_name.map(str::to_string),
                    }),
                    reason,
                );
            }
            (None, Some(_)) if hold_removals => {}
            (None, Some(o)) => {
                if let Some((file, until)) = settling(&obj(), o.session.as_deref()) {
                    wake_at(&mut out.next_wakeup, until);
                    out.held.push(Hold {
                        object: obj(),
                        why: HoldReason::Settling { file, until },
                    });
                    held_hosts.insert(host);
                    continue;
                }
                push(
                    Phase::RemoveRoute,
                    Action::Route(RouteAction::RemoveRoute { host: host.into() }),
                    Reason::NotDesired,
                )
            }
            (None, None) => {}
        }
    }

    // 5. DNS records for routes with `dns: true`.
    if let Some((rtype, content)) = &policy.dns {
        let dns_gap = gap(&ProviderId::Dns);
        let mut want: Vec<(String, &EffectiveRoute)> = desired_routes
            .iter()
            .filter(|r| r.dns)
            .map(|r| (Observed::record_key(&r.host, *rtype), r))
            .collect();
        want.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let joined = merge_join(
            want.iter().map(|(k, v)| (k.as_str(), *v)),
            observed.records.iter().map(|(k, v)| (k.as_str(), v)),
        );
        // Names where a record vessel does not own stands, of any type: never shadowed.
        let foreign_names: BTreeSet<&str> = observed
            .records
            .values()
            .filter(|r| !r.owned)
            .map(|r| r.name.as_str())
            .collect();
        let held_session = |s: Option<&str>| {
            s.is_some_and(|s| held_session_names.contains(s) || held_sessions.contains(s))
        };
        for (_, w, have) in joined {
            let (name, ty) = match (w, have) {
                (Some(r), _) => (r.host.clone(), *rtype),
                (None, Some(o)) => (o.name.clone(), o.rtype),
                (None, None) => continue,
            };
            let obj = || Object::Record(format!("{name} {}", ty.as_str()));
            if have.is_some_and(|o| !o.owned)
                || (w.is_some() && foreign_names.contains(name.as_str()))
            {
                if w.is_some() {
                    out.held.push(Hold {
                        object: obj(),
                        why: HoldReason::Foreign,
                    });
                }
                continue;
            }
            if held_hosts.contains(name.as_str())
                || have.is_some_and(|o| held_session(o.session.as_deref()))
            {
                continue;
            }
            if let Some(e) = &dns_gap {
                out.held.push(Hold {
                    object: obj(),
                    why: HoldReason::Unobserved {
                        provider: ProviderId::Dns,
                        error: e.clone(),
                    },
                });
                continue;
            }
            match (w, have) {
                (Some(_), _) if route_pending.contains(name.as_str()) => {
                    let after = Object::Route(name.clone());
                    out.deferred.push(Deferred {
                        object: obj(),
                        after,
                    });
                }
                (Some(r), None) => push(
                    Phase::UpsertRecord,
                    Action::Record(RecordAction::UpsertRecord {
                        name,
                        rtype: ty,
                        content: content.clone(),
                        session: r.session.to_string(),
                    }),
                    Reason::Missing,
                ),
                (Some(r), Some(o))
                    if o.content != *content || o.session.as_deref() != Some(r.session) =>
                {
                    let change = if o.content != *content {
                        format!("content {} -> {content}", o.content)
                    } else {
                        "owner".into()
                    };
                    push(
                        Phase::UpsertRecord,
                        Action::Record(RecordAction::UpsertRecord {
                            name,
                            rtype: ty,
                            content: content.clone(),
                            session: r.session.to_string(),
                        }),
                        Reason::Drifted {
                            changes: vec![change],
                        },
                    )
                }
                (Some(_), Some(_)) => {}
                // A record is removed only when it is surely not wanted: every file was read,
                // the proxy was seen, and the record says whose it is (or nothing is held).
                (None, Some(o)) => {
                    let attributable = o.session.is_some() || desired.quarantined.is_empty();
                    let route = Object::Route(name.clone());
                    if let Some((file, until)) = settling(&route, o.session.as_deref()) {
                        wake_at(&mut out.next_wakeup, until);
                        out.held.push(Hold {
                            object: obj(),
                            why: HoldReason::Settling { file, until },
                        });
                    } else if !hold_removals && proxy_gap.is_none() && attributable {
                        push(
                            Phase::RemoveRecord,
                            Action::Record(RecordAction::RemoveRecord { name, rtype: ty }),
                            Reason::NotDesired,
                        );
                    }
                }
                (None, None) => {}
            }
        }
    }

    finish(out, drafts, observed)
}

/// Wake the loop at `at` at the latest.
fn wake_at(next: &mut Option<DateTime<Utc>>, at: DateTime<Utc>) {
    if next.is_none_or(|w| at < w) {
        *next = Some(at);
    }
}

fn state_str(s: SessionState) -> &'static str {
    match s {
        SessionState::Running => "running",
        SessionState::Stopped => "stopped",
        SessionState::Failed => "failed",
    }
}

fn save_path(o: &ObservedSession) -> Option<PathBuf> {
    o.save_to.clone()
}

/// Save a running session's work first, where it asked for that (`save_on_stop`).
fn save_first(
    push: &mut impl FnMut(Phase, Action, Reason),
    name: &str,
    o: &ObservedSession,
    reason: &Reason,
) {
    if let (Some(p), SessionState::Running) = (save_path(o), o.state) {
        push(
            Phase::SaveWork,
            Action::Session(SessionAction::SaveWork {
                session: name.into(),
                provider: o.provider,
                path: p,
            }),
            reason.clone(),
        );
    }
}

/// How a session is destroyed: whether its workspace is kept, and its stop timeout.
struct Retain {
    keep: bool,
    timeout: Option<Duration>,
}

/// What a replace does with a session's data.
fn data_fate(o: &ObservedSession, policy: &Policy) -> DataFate {
    match save_path(o) {
        Some(p) => DataFate::SavedTo(p),
        None if policy.keeps_workspaces.contains(&o.provider) => DataFate::Kept,
        None => DataFate::Discarded,
    }
}

/// Save a session's work (where it asked for that), then destroy it.
fn save_then_destroy(
    push: &mut impl FnMut(Phase, Action, Reason),
    name: &str,
    o: &ObservedSession,
    reason: &Reason,
    retain: Retain,
) {
    save_first(push, name, o, reason);
    push(
        Phase::Destroy,
        Action::Session(SessionAction::DestroySession {
            session: name.into(),
            provider: o.provider,
            stop_timeout: retain.timeout,
            retain: retain.keep,
        }),
        reason.clone(),
    );
}

fn sync_action(name: &str, w: &Want) -> Action {
    let src = w.session.source.as_ref();
    Action::Session(SessionAction::SyncSource {
        session: name.into(),
        provider: w.spec.compute,
        path: src.map(|s| s.path.clone()).unwrap_or_default(),
        exclude: src.map(|s| s.exclude.clone()).unwrap_or_default(),
        save_to: src.filter(|s| s.save_on_stop).map(|s| s.path.clone()),
    })
}

/// The host a session goes on, for compute providers with several: the one it is on already
/// (sessions are never moved), else the highest of `hash(session, host)` among the hosts in
/// its location (rendezvous hashing: deterministic, and adding a host moves no placement but
/// the ones it wins). `Err(location)` when no host is in the location it asks for.
fn place(
    name: &str,
    w: &Want,
    policy: &Policy,
    existing: Option<&str>,
) -> Result<Option<String>, String> {
    use sha2::{Digest, Sha256};
    let Some(hosts) = policy.placement.get(&w.spec.compute) else {
        return Ok(None);
    };
    if let Some(h) = existing
        && hosts.iter().any(|x| x.name == h)
    {
        return Ok(Some(h.to_string()));
    }
    let wanted = w.session.location.as_deref();
    let score = |h: &PlacementHost| {
        let d = Sha256::new()
            .chain_update(name.as_bytes())
            .chain_update([0u8])
            .chain_update(h.name.as_bytes())
            .finalize();
        let mut b = [0u8; 8];
        b.copy_from_slice(&d[..8]);
        u64::from_be_bytes(b)
    };
    hosts
        .iter()
        .filter(|h| wanted.is_none() || h.location.as_deref() == wanted)
        .max_by_key(|h| (score(h), std::cmp::Reverse(h.name.as_str())))
        .map(|h| Some(h.name.clone()))
        .ok_or_else(|| wanted.unwrap_or("any").to_string())
}

fn create_steps(
    push: &mut impl FnMut(Phase, Action, Reason),
    name: &str,
    w: &Want,
    host: Option<String>,
    restore: bool,
    reason: Reason,
) {
    let start = w.state == RunState::Running;
    let save_to = w
        .session
        .source
        .as_ref()
        .filter(|s| s.save_on_stop)
        .map(|s| s.path.clone());
    push(
        Phase::Create,
        Action::Session(SessionAction::CreateSession {
            session: name.into(),
            spec: w.spec.clone(),
            fingerprint: w.fingerprint.to_string(),
            source_file: w.file.to_path_buf(),
            save_to,
            start,
            host,
            restore,
        }),
        reason,
    );
    let follows = Reason::Follows {
        object: Object::Session(name.to_string()),
    };
    if start {
        push(
            Phase::Healthy,
            Action::Session(SessionAction::WaitHealthy {
                session: name.into(),
                provider: w.spec.compute,
                check: w.spec.health.clone(),
            }),
            follows.clone(),
        );
    }
    if w.session.source.is_some() {
        push(Phase::Source, sync_action(name, w), follows);
    }
}

/// What differs between a session and its desired spec: fields that need a replace, and
/// fields its provider changes in place with a restart (free and ignored fields need nothing).
struct SpecDiff {
    replace: Vec<String>,
    restart: Vec<String>,
}

fn spec_diff(o: &ObservedSession, new: &RuntimeSpec, fingerprint: &str) -> SpecDiff {
    let mut d = SpecDiff {
        replace: Vec::new(),
        restart: Vec::new(),
    };
    if o.provider != new.compute {
        d.replace.push("compute".into());
        return d;
    }
    let Some(old) = &o.spec else {
        // Only a fingerprint to go by: any change is a replace.
        if o.fingerprint != fingerprint {
            d.replace.push("spec fingerprint".into());
        }
        return d;
    };
    for field in spec_changes(old, new) {
        match crate::model::field_change(new.compute, &field) {
            FieldChange::Replace => d.replace.push(field),
            FieldChange::Restart => d.restart.push(field),
            FieldChange::Free | FieldChange::Ignored => {}
        }
    }
    // Something differs that no field shows (a fingerprint of another version of vessel):
    // fields are what count.
    d
}

/// Field names that differ between what a session was made from and what is desired now.
fn spec_changes(old: &RuntimeSpec, new: &RuntimeSpec) -> Vec<String> {
    if old == new {
        return Vec::new();
    }
    let a = serde_json::to_value(old).unwrap_or_default();
    let b = serde_json::to_value(new).unwrap_or_default();
    let empty = serde_json::Map::new();
    let (a, b) = (
        a.as_object().unwrap_or(&empty),
        b.as_object().unwrap_or(&empty),
    );
    let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect()
}

/// Order drafts by phase and object, number them, wire dependencies, and summarise.
fn finish(mut out: Plan, mut drafts: Vec<Draft>, observed: &Observed) -> Plan {
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
    let mut by_host: BTreeMap<(Phase, &str), usize> = BTreeMap::new();
    for (id, d) in drafts.iter().enumerate() {
        if let Some(s) = d.action.session() {
            by_session.entry((d.phase, s)).or_default().push(id);
        }
        match &d.action {
            Action::Route(RouteAction::UpsertRoute { host, .. })
            | Action::Route(RouteAction::RemoveRoute { host }) => {
                by_host.insert((d.phase, host), id);
            }
            Action::Record(RecordAction::UpsertRecord { name, .. })
            | Action::Record(RecordAction::RemoveRecord { name, .. }) => {
                by_host.insert((d.phase, name), id);
            }
            _ => {}
        }
    }
    // Hosts of each session's observed routes and records (for destroy ordering).
    let mut routes_of: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (h, r) in &observed.routes {
        if let Some(s) = &r.session {
            routes_of.entry(s.as_str()).or_default().push(h.as_str());
        }
    }
    let mut records_of: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for r in observed.records.values() {
        if let Some(s) = &r.session {
            records_of
                .entry(s.as_str())
                .or_default()
                .push(r.name.as_str());
        }
    }
    let sess = |p: Phase, s: &str| {
        by_session
            .get(&(p, s))
            .map(Vec::as_slice)
            .unwrap_or_default()
            .to_vec()
    };
    let host = |p: Phase, h: &str| by_host.get(&(p, h)).copied();
    let mut all = Vec::with_capacity(drafts.len());
    for (id, d) in drafts.iter().enumerate() {
        let mut deps: Vec<usize> = Vec::new();
        match &d.action {
            Action::Route(RouteAction::RemoveRoute { host: h }) => {
                deps.extend(host(Phase::RemoveRecord, h))
            }
            Action::Session(SessionAction::SaveWork { session, .. })
            | Action::Session(SessionAction::StopSession { session, .. })
            | Action::Session(SessionAction::DestroySession { session, .. }) => {
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
                deps.extend(sess(Phase::Healthy, session));
                deps.extend(sess(Phase::Source, session));
            }
            Action::Record(RecordAction::UpsertRecord { name, .. }) => {
                deps.extend(host(Phase::UpsertRoute, name))
            }
            Action::Record(RecordAction::RemoveRecord { .. }) => {}
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
pub fn object_changes(plan: &Plan) -> BTreeMap<Object, Change> {
    let mut m: BTreeMap<Object, Change> = BTreeMap::new();
    for s in &plan.steps {
        let c = change_of(s);
        let e = m.entry(s.action.object()).or_insert(c);
        if c.rank() > e.rank() {
            *e = c;
        }
    }
    // An object whose steps only follow others (health, save) is an update.
    for c in m.values_mut() {
        if *c == Change::Follow {
            *c = Change::Update;
        }
    }
    m
}

/// What one step does to its object.
fn change_of(s: &Step) -> Change {
    match (&s.action, &s.reason) {
        (_, Reason::Replaced { .. }) => Change::Replace,
        (
            Action::Session(SessionAction::CreateSession { .. })
            | Action::Route(RouteAction::UpsertRoute { .. })
            | Action::Record(RecordAction::UpsertRecord { .. }),
            Reason::Missing,
        ) => Change::Create,
        (
            Action::Session(SessionAction::DestroySession { .. })
            | Action::Route(RouteAction::RemoveRoute { .. })
            | Action::Record(RecordAction::RemoveRecord { .. }),
            _,
        ) => Change::Destroy,
        (
            Action::Session(SessionAction::WaitHealthy { .. })
            | Action::Session(SessionAction::SaveWork { .. }),
            _,
        ) => Change::Follow,
        (Action::Session(SessionAction::SyncSource { .. }), Reason::Follows { .. }) => {
            Change::Follow
        }
        _ => Change::Update,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Follow,
    Update,
    Create,
    Destroy,
    Replace,
}

impl Change {
    fn rank(self) -> u8 {
        match self {
            Change::Follow => 0,
            Change::Update => 1,
            Change::Create => 2,
            Change::Destroy => 3,
            Change::Replace => 4,
        }
    }

    pub fn symbol(self) -> &'static str {
        match self {
            Change::Follow | Change::Update => "~",
            Change::Create => "+",
            Change::Destroy => "-",
            Change::Replace => "-/+",
        }
    }
}

fn summarize(p: &Plan) -> Summary {
    let mut s = Summary {
        deferred: p.deferred.len(),
        held: p.held.len(),
        ..Summary::default()
    };
    let mut m: BTreeMap<(u8, &str, Option<RecordType>), Change> = BTreeMap::new();
    for step in &p.steps {
        let c = change_of(step);
        let e = m.entry(step.action.key()).or_insert(c);
        if c.rank() > e.rank() {
            *e = c;
        }
    }
    for c in m.values() {
        match c {
            Change::Create => s.create += 1,
            Change::Destroy => s.destroy += 1,
            Change::Replace => s.replace += 1,
            Change::Update | Change::Follow => s.update += 1,
        }
    }
    s
}

/// Walk two sequences sorted by key together: every key once, with its value from either side.
fn merge_join<'k, A, B>(
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
