//! Phase 1: each desired session as the plan wants it (expiry applied), and each session's
//! fate: create, replace, update in place, start, stop, destroy, keep; or held, and why.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::model::observed::{ObservedSession, ProviderId, RuntimeSpec, SessionState};
use crate::model::{ComputeKind, FieldChange, Kind, PlanSpec, RunState, SessionSpec};

use super::{Fate, HoldReason, Object, Planner, Reason, Want};

/// The merged, resolved spec a session on `plan` runs with, on its plan's first choice of
/// compute (`runtime_spec_on` for another).
pub fn runtime_spec(session: &SessionSpec, plan: &PlanSpec) -> RuntimeSpec {
    runtime_spec_on(session, plan, plan.compute.first())
}

/// The merged, resolved spec a session on `plan` runs with on `compute`.
pub fn runtime_spec_on(
    session: &SessionSpec,
    plan: &PlanSpec,
    compute: ComputeKind,
) -> RuntimeSpec {
    let mut env = plan.env.clone();
    env.extend(session.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    RuntimeSpec {
        compute,
        image: plan.image.clone(),
        guest: plan.guest,
        template: plan.template.clone(),
        clone: plan.clone,
        storage: plan.storage.clone(),
        pull: plan.pull,
        command: plan.command.clone(),
        env,
        cpus: plan.cpus,
        memory: plan.memory,
        disk: plan.disk,
        ports: plan.ports.clone(),
        health: plan.health.clone(),
        firewall: plan.firewall.clone(),
        hotplug: plan.hotplug,
        stop_timeout: plan.stop_timeout,
    }
}

impl<'a> Planner<'a> {
    /// Desired sessions with expiry applied (and the earliest future expiry to wake for);
    /// what files with errors hold.
    pub(super) fn wants(&mut self) {
        let (desired, policy) = (self.desired, self.policy);
        // Sessions without env of their own share their plan's spec and fingerprint (per
        // compute kind: a plan with a preference list can run sessions on several).
        type Shared = (Arc<RuntimeSpec>, Arc<str>);
        let mut per_plan: std::collections::BTreeMap<(&str, ComputeKind), Shared> =
            Default::default();
        for (name, doc) in &desired.sessions {
            let Some(plan) = desired.plans.get(&doc.spec.plan) else {
                // No plan (validation prevents it): held, never destroyed.
                self.held.quarantined.insert(name);
                continue;
            };
            let s = &doc.spec;
            // The clock's part: expiry, dormant cleanup, running hours; each change to come
            // wakes the loop.
            let (timed, upcoming) = super::timed::timed(s, &plan.spec, policy.now);
            for u in upcoming {
                self.wake_at(u.at);
                self.out.upcoming.push(u);
            }
            let (state, expired) = match timed {
                super::timed::Timed::Destroy { at, dormant } => {
                    self.expired.insert(name, (at, dormant));
                    continue;
                }
                super::timed::Timed::Live { state, expired } => (state, expired),
            };
            let (compute, unreachable) = self.placement(name, &plan.spec);
            let (spec, fingerprint) = if s.env.is_empty() {
                per_plan
                    .entry((plan.spec.name.as_str(), compute))
                    .or_insert_with(|| {
                        let spec = runtime_spec_on(s, &plan.spec, compute);
                        let fp = spec.fingerprint();
                        (Arc::new(spec), fp.into())
                    })
                    .clone()
            } else {
                let spec = runtime_spec_on(s, &plan.spec, compute);
                let fp = spec.fingerprint();
                (Arc::new(spec), fp.into())
            };
            self.wants.insert(
                name,
                Want {
                    spec,
                    fingerprint,
                    session: s,
                    file: &doc.file,
                    state,
                    expired,
                    unreachable,
                },
            );
        }
        // Held by quarantine: the names broken files hold. A file of unknown contents holds
        // every removal anywhere.
        self.held.quarantined.extend(desired.held(Kind::Session));
        self.held.quarantined_routes = desired.held(Kind::Route);
        self.held.unknown_files = desired
            .quarantined
            .iter()
            .filter(|(_, q)| !q.complete)
            .map(|(f, _)| f.clone())
            .collect();
    }

    /// Which compute kind of its plan's `compute` list a session runs on, and the kinds
    /// before it that could not be observed. A session that is there (or was last seen on a
    /// provider that is a gap now) stays on its kind while the list has it: it is never moved
    /// because another provider came back or went away. Otherwise the first kind whose
    /// provider was observed; with none, the first (and it is held, its provider unobserved).
    fn placement(&self, name: &str, plan: &PlanSpec) -> (ComputeKind, Vec<ComputeKind>) {
        let observed = self.observed;
        let kinds = plan.compute.kinds();
        let there = observed
            .sessions
            .get(name)
            .map(|o| o.provider)
            .or_else(|| observed.unreachable.get(name).copied());
        if let Some(k) = there.filter(|k| kinds.contains(k)) {
            return (k, Vec::new());
        }
        let seen = |k: &ComputeKind| observed.is_observed(&ProviderId::Compute(*k));
        match kinds.iter().position(seen) {
            Some(i) => (kinds[i], kinds[..i].to_vec()),
            None => (plan.compute.first(), Vec::new()),
        }
    }

    /// The file with errors that holds this session, if one does (`Some(None)`: a file with
    /// errors names it, but which is not known).
    fn quarantined_file(&self, o: &ObservedSession) -> Option<Option<std::path::PathBuf>> {
        let desired = self.desired;
        if self.held.quarantined.contains(o.name.as_str()) {
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
    }

    /// Decide each session's fate, or hold it: a file with errors, an unobserved provider, an
    /// object in the way, a missing project, a change still settling.
    pub(super) fn fates(&mut self) {
        let observed = self.observed;
        let wants = std::mem::take(&mut self.wants);
        let joined = super::order::merge_join(
            wants.iter().map(|(k, v)| (*k, v)),
            observed.sessions.iter().map(|(k, v)| (k.as_str(), v)),
        );
        for (name, want, have) in joined {
            if let Some(o) = have {
                if let Some(file) = self.quarantined_file(o) {
                    self.hold_session(name, HoldReason::Quarantined { file });
                    continue;
                }
            } else if self.held.quarantined.contains(name) {
                continue;
            }
            if let Some(kinds) = observed.duplicates.get(name) {
                let providers = kinds.clone();
                self.hold_session(name, HoldReason::Duplicate { providers });
                continue;
            }
            let providers: BTreeSet<ProviderId> = want
                .map(|w| ProviderId::Compute(w.spec.compute))
                .into_iter()
                .chain(have.map(|o| ProviderId::Compute(o.provider)))
                // Last seen on a provider that is a gap now: still there, as far as vessel knows.
                .chain(
                    observed
                        .unreachable
                        .get(name)
                        .map(|k| ProviderId::Compute(*k)),
                )
                .collect();
            if let Some(why) = providers.iter().find_map(|p| self.unobserved(p)) {
                self.hold_session(name, why);
                continue;
            }
            if let (Some(w), Some(o)) = (want, have)
                && o.owned
                && let Some(old) = &o.spec
                && let Some((field, reason)) =
                    crate::model::refused_change(w.spec.compute, old, &w.spec)
            {
                self.hold_session(name, HoldReason::Refused { field, reason });
                continue;
            }
            let fate = match (want, have) {
                (None, None) => continue,
                (Some(_), Some(o)) if !o.owned => {
                    self.hold_session(name, HoldReason::Foreign);
                    continue;
                }
                (None, Some(o)) if !o.owned => continue,
                (Some(_), None) => Fate::Create,
                (None, Some(_)) => Fate::Destroy(match self.expired.get(name) {
                    Some((at, None)) => Reason::Expired { at: *at },
                    Some((at, Some(after))) => Reason::Dormant {
                        at: *at,
                        after: after.to_string(),
                    },
                    None => Reason::NotDesired,
                }),
                (Some(w), Some(o)) => self.fate_of(name, w, o),
            };
            // A session is not made without its project.
            if matches!(fate, Fate::Create | Fate::Replace(_))
                && let Some(path) = self.desired.missing_sources.get(name)
            {
                self.hold_session(name, HoldReason::SourceMissing { path: path.clone() });
                continue;
            }
            // What a source change takes away waits until its files have settled.
            if matches!(fate, Fate::Destroy(_) | Fate::Replace(_)) {
                let obj = Object::Session(name.to_string());
                let files = self
                    .policy
                    .settle
                    .files_of(&obj, have.and_then(|o| o.source_file.as_deref()));
                if let Some((file, until)) = self.policy.settle.wait_for(files, self.policy.now) {
                    self.wake_at(until);
                    self.hold_session(name, HoldReason::Settling { file, until });
                    continue;
                }
            }
            self.fates.insert(name, fate);
        }
        self.wants = wants;
    }

    /// The fate of a session that is both desired and there: replaced for what it cannot
    /// change in place, else updated in place (noted) and brought to its desired state.
    fn fate_of(&mut self, name: &'a str, w: &Want, o: &ObservedSession) -> Fate {
        // Its making stopped part-way: made again, or finished by its start.
        match &o.half_made {
            Some(h) if !h.finish => return Fate::Replace(Vec::new()),
            Some(h) if w.state != RunState::Stopped => {
                return Fate::Start(Reason::HalfMade {
                    finish: true,
                    detail: h.detail.clone(),
                });
            }
            _ => {}
        }
        let diff = spec_diff(o, &w.spec, &w.fingerprint);
        if !diff.replace.is_empty() {
            let mut changes = diff.replace;
            changes.extend(diff.restart);
            changes.sort();
            return Fate::Replace(changes);
        }
        if !diff.restart.is_empty() {
            self.updates.insert(name, diff.restart);
        }
        // Asleep by vessel's hand (idle, or declared `sleeping`): converged, whatever the
        // provider reports (a paused session still runs; one that died asleep is woken by
        // the next request like any other). Only `stopped` changes it.
        if let Some(a) = &o.asleep
            && w.state != RunState::Stopped
        {
            self.out.asleep.push(crate::model::plan::AsleepSession {
                session: name.to_string(),
                state: w.state,
                since: a.since,
                depth: a.depth,
            });
            return Fate::Keep;
        }
        // `sleeping` is made asleep, and awake only while requests wake it: either is it.
        if w.state == RunState::Sleeping
            && matches!(o.state, SessionState::Running | SessionState::Stopped)
        {
            return Fate::Keep;
        }
        // A declarative restart: once, if it last started before the time asked for.
        if let Some(at) = w.session.restart_requested {
            if at > self.policy.now {
                self.wake_at(at);
            } else if w.state == RunState::Running
                && o.state == SessionState::Running
                && o.started.is_some_and(|s| s < at)
            {
                return Fate::Start(Reason::RestartRequested { at });
            }
        }
        let want_running = w.state != RunState::Stopped;
        match (want_running, o.state) {
            (true, SessionState::Running) | (false, SessionState::Stopped) => Fate::Keep,
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

fn state_str(s: SessionState) -> &'static str {
    match s {
        SessionState::Running => "running",
        SessionState::Stopped => "stopped",
        SessionState::Failed => "failed",
    }
}

/// What differs between a session and its desired spec: fields that need a replace, and
/// fields its provider changes in place with a restart (free and ignored fields need nothing).
pub(super) struct SpecDiff {
    replace: Vec<String>,
    restart: Vec<String>,
}

pub(super) fn spec_diff(o: &ObservedSession, new: &RuntimeSpec, fingerprint: &str) -> SpecDiff {
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
