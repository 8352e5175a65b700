//! Applying a plan to an observed state on paper: what the world looks like if every step
//! succeeds. Used by the property tests (convergence) and by `vessel plan --against-ref`, which
//! plans a change against the world another revision would have made. Pure.

use crate::desired::Desired;
use crate::model::observed::{Observed, ObservedRecord, ObservedSession, SessionState};
use crate::model::plan::{RecordAction, RouteAction, SessionAction};

use super::{Action, Plan, Policy, plan};

/// The address a simulated session's port answers at.
pub fn sim_endpoint(session: &str, port: u16) -> String {
    format!("{session}.sim:{port}")
}

/// `observed` after every step of `plan` succeeded.
pub fn simulate(plan: &Plan, observed: &Observed) -> Observed {
    let mut o = observed.clone();
    for step in &plan.steps {
        simulate_step(&step.action, &mut o);
    }
    o
}

/// What one step does to the world when it succeeds. (Fake providers in the loop's in-process
/// tests are built on it.)
pub fn simulate_step(action: &Action, o: &mut Observed) {
    {
        match action {
            Action::Session(SessionAction::CreateSession {
                session,
                spec,
                fingerprint,
                source_file,
                save_to,
                start,
                host,
                ..
            }) => {
                o.sessions.insert(
                    session.clone(),
                    ObservedSession {
                        name: session.clone(),
                        provider: spec.compute,
                        state: if *start {
                            SessionState::Running
                        } else {
                            SessionState::Stopped
                        },
                        owned: true,
                        fingerprint: fingerprint.clone(),
                        spec: Some((**spec).clone()),
                        endpoints: spec
                            .ports
                            .iter()
                            .map(|(n, p)| (n.clone(), sim_endpoint(session, p.0)))
                            .collect(),
                        source_file: Some(source_file.clone()),
                        synced_source: None,
                        save_to: save_to.clone(),
                        healthy: Some(*start),
                        host: host.clone(),
                        asleep: None,
                        started: None,
                        snapshots: None,
                        half_made: None,
                    },
                );
            }
            Action::Session(SessionAction::UpdateSession {
                session,
                spec,
                fingerprint,
                restart,
                ..
            }) => {
                if let Some(s) = o.sessions.get_mut(session) {
                    s.fingerprint = fingerprint.clone();
                    s.spec = Some((**spec).clone());
                    s.endpoints = spec
                        .ports
                        .iter()
                        .map(|(n, p)| (n.clone(), sim_endpoint(session, p.0)))
                        .collect();
                    if *restart {
                        s.state = SessionState::Running;
                    }
                }
            }
            Action::Session(SessionAction::StartSession { session, .. }) => {
                if let Some(s) = o.sessions.get_mut(session) {
                    s.state = SessionState::Running;
                }
            }
            Action::Session(SessionAction::StopSession { session, .. }) => {
                if let Some(s) = o.sessions.get_mut(session) {
                    s.state = SessionState::Stopped;
                }
            }
            Action::Session(SessionAction::DestroySession { session, .. }) => {
                o.sessions.remove(session);
            }
            Action::Session(SessionAction::SyncSource {
                session,
                path,
                save_to,
                ..
            }) => {
                if let Some(s) = o.sessions.get_mut(session) {
                    s.synced_source = Some(path.clone());
                    s.save_to = save_to.clone();
                }
            }
            Action::Session(SessionAction::Snapshot {
                session,
                take,
                slot,
                prune,
                ..
            }) => {
                if let Some(s) = o.sessions.get_mut(session) {
                    let snaps = s.snapshots.get_or_insert_with(Default::default);
                    snaps.taken.retain(|t| !prune.contains(&t.name));
                    if let (Some(name), Some(slot)) = (take, slot) {
                        snaps.taken.push(crate::model::observed::Snapshot {
                            name: name.clone(),
                            slot: *slot,
                        });
                    }
                    snaps.failed = None;
                }
            }
            Action::Session(SessionAction::WaitHealthy { .. })
            | Action::Session(SessionAction::PullImage { .. })
            | Action::Session(SessionAction::SaveWork { .. }) => {}
            Action::Route(a) => {
                match a.after() {
                    Some(mut r) => {
                        // An upstream read at run time: the session's address by then.
                        if let RouteAction::UpsertRoute {
                            session,
                            port,
                            upstream_from: Some(_),
                            ..
                        } = a
                        {
                            r.upstream = o
                                .sessions
                                .get(session)
                                .and_then(|s| s.endpoints.get(port))
                                .cloned()
                                .unwrap_or_default();
                        }
                        o.routes.insert(a.key(), r)
                    }
                    None => o.routes.remove(&a.key()),
                };
            }
            Action::Record(RecordAction::UpsertRecord {
                name,
                rtype,
                content,
                session,
            }) => {
                o.records.insert(
                    Observed::record_key(name, *rtype),
                    ObservedRecord {
                        name: name.clone(),
                        rtype: *rtype,
                        content: content.clone(),
                        owned: true,
                        session: Some(session.clone()),
                    },
                );
            }
            Action::Record(RecordAction::RemoveRecord { name, rtype }) => {
                o.records.remove(&Observed::record_key(name, *rtype));
            }
        }
    }
}

/// The world `desired` converges to from `start`: plan and simulate until nothing is left to
/// do (deferred routes take a second pass). At most `max_passes` passes.
pub fn converge(
    desired: &Desired,
    start: &Observed,
    policy: &Policy,
    max_passes: usize,
) -> (Observed, usize) {
    let mut o = start.clone();
    for pass in 0..max_passes {
        let p = plan(desired, &o, policy);
        if p.steps.is_empty() {
            return (o, pass);
        }
        o = simulate(&p, &o);
    }
    (o, max_passes)
}
