//! Phase 3: each session's fate as steps (create, update, start, stop, save, destroy, sync
//! its source), placed on a host where its provider has several.

use std::path::PathBuf;

use crate::model::observed::{ObservedSession, SessionState};
use crate::model::{ComputeKind, Duration, RunState};

use super::{
    Action, DataFate, Drafts, Fate, HoldReason, Object, Phase, PlacementHost, Planner, Policy,
    Reason, SessionAction, Want,
};

impl<'a> Planner<'a> {
    pub(super) fn session_steps(&mut self) {
        let (desired, observed, policy) = (self.desired, self.observed, self.policy);
        let mut drafts = std::mem::take(&mut self.drafts);
        // Sessions held because no host is in the location they ask for.
        let mut no_host: Vec<(&'a str, String)> = Vec::new();
        for (&name, fate) in &self.fates {
            let have = observed.sessions.get(name);
            let want = self.wants.get(name);
            let stop_timeout = want.and_then(|w| w.spec.stop_timeout).or_else(|| {
                have.and_then(|o| o.spec.as_ref())
                    .and_then(|s| s.stop_timeout)
            });
            let follows = || Reason::Follows {
                object: Object::Session(name.to_string()),
            };
            if let (Some(changes), Some(w), Some(o)) = (self.updates.get(name), want, have)
                && update_steps(&mut drafts, name, changes, fate, w, o)
            {
                self.address_pending.insert(name);
            }
            // Its project, synced in when it is not yet (and exists).
            let unsynced = |w: &Want, o: &ObservedSession| {
                w.session.source.as_ref().is_some_and(|src| {
                    o.synced_source.as_ref() != Some(&src.path)
                        && !desired.missing_sources.contains_key(name)
                })
            };
            match fate {
                Fate::Keep => {
                    if let (Some(w), Some(o)) = (want, have)
                        && w.state == RunState::Running
                        && o.state == SessionState::Running
                        && unsynced(w, o)
                    {
                        drafts.push(
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
                    let Some(host) = place(name, w, policy, None)
                        .map_err(|l| no_host.push((name, l.0)))
                        .ok()
                    else {
                        continue;
                    };
                    let restore = observed.retained.get(name).is_some_and(|r| {
                        r.provider == w.spec.compute
                            && r.until > policy.now
                            && policy.keeps_workspaces.contains(&r.provider)
                    });
                    create_steps(&mut drafts, name, w, host, restore, Reason::Missing);
                    self.address_pending.insert(name);
                }
                Fate::Replace(changes) => {
                    let (Some(w), Some(o)) = (want, have) else {
                        continue;
                    };
                    let Some(host) = place(name, w, policy, o.host.as_deref())
                        .map_err(|l| no_host.push((name, l.0)))
                        .ok()
                    else {
                        continue;
                    };
                    let keep = policy.keeps_workspaces.contains(&o.provider);
                    let reason = match &o.half_made {
                        Some(h) if !h.finish => Reason::HalfMade {
                            finish: false,
                            detail: h.detail.clone(),
                        },
                        _ => Reason::Replaced {
                            changes: changes.clone(),
                            data: data_fate(o, policy),
                        },
                    };
                    let retain = Retain {
                        keep,
                        timeout: stop_timeout,
                    };
                    pull_first(&mut drafts, name, w, &host, &reason);
                    save_then_destroy(&mut drafts, name, o, &reason, retain);
                    let restore = keep && policy.keeps_workspaces.contains(&w.spec.compute);
                    create_steps(&mut drafts, name, w, host, restore, reason);
                    self.address_pending.insert(name);
                }
                Fate::Start(reason) => {
                    let Some(o) = have else { continue };
                    drafts.push(
                        Phase::Start,
                        Action::Session(SessionAction::StartSession {
                            session: name.into(),
                            provider: o.provider,
                            restart: matches!(reason, Reason::RestartRequested { .. }),
                            stop_timeout,
                        }),
                        reason.clone(),
                    );
                    drafts.push(
                        Phase::Healthy,
                        Action::Session(SessionAction::WaitHealthy {
                            session: name.into(),
                            provider: o.provider,
                            port: want
                                .map(|w| w.spec.as_ref())
                                .or(o.spec.as_ref())
                                .and_then(|s| s.health_port())
                                .map(String::from),
                            check: want.and_then(|w| w.spec.health.clone()),
                        }),
                        follows(),
                    );
                    if let Some(w) = want
                        && unsynced(w, o)
                    {
                        drafts.push(Phase::Source, sync_action(name, w), follows());
                    }
                    self.address_pending.insert(name);
                }
                Fate::Stop(reason) => {
                    let Some(o) = have else { continue };
                    save_first(&mut drafts, name, o, reason);
                    drafts.push(
                        Phase::Stop,
                        Action::Session(SessionAction::StopSession {
                            session: name.into(),
                            provider: o.provider,
                            stop_timeout,
                        }),
                        reason.clone(),
                    );
                }
                Fate::Destroy(reason) => {
                    let Some(o) = have else { continue };
                    let retain = Retain {
                        keep: policy.keeps_workspaces.contains(&o.provider),
                        timeout: stop_timeout,
                    };
                    save_then_destroy(&mut drafts, name, o, reason, retain);
                }
            }
        }
        self.drafts = drafts;
        for (name, location) in no_host {
            self.hold_session(name, HoldReason::NoHost { location });
        }
    }
}

/// The steps of an update in place: the new spec, and (for a running session that stays so) a
/// restart and a health wait. True when its address may change (its ports did).
fn update_steps(
    drafts: &mut Drafts,
    name: &str,
    changes: &[String],
    fate: &Fate,
    w: &Want,
    o: &ObservedSession,
) -> bool {
    let running = matches!(fate, Fate::Keep) && o.state == SessionState::Running;
    // Some providers take the change without a restart (at once, or at the next stop).
    let applies = running
        .then(|| crate::model::applies_in_place(&w.spec, changes))
        .flatten();
    let restart = running && applies.is_none();
    drafts.push(
        Phase::Update,
        Action::Session(SessionAction::UpdateSession {
            session: name.into(),
            provider: o.provider,
            spec: w.spec.clone(),
            fingerprint: w.fingerprint.to_string(),
            restart,
        }),
        Reason::Changed {
            changes: changes.to_vec(),
            restart,
            applies,
        },
    );
    if !restart {
        // Its address changes without a restart where its ports did.
        return applies.is_some() && changes.iter().any(|c| c == "ports");
    }
    drafts.push(
        Phase::Healthy,
        Action::Session(SessionAction::WaitHealthy {
            session: name.into(),
            provider: o.provider,
            port: w.spec.health_port().map(String::from),
            check: w.spec.health.clone(),
        }),
        Reason::Follows {
            object: Object::Session(name.to_string()),
        },
    );
    changes.iter().any(|c| c == "ports")
}

fn save_path(o: &ObservedSession) -> Option<PathBuf> {
    o.save_to.clone()
}

/// Save a running session's work first, where it asked for that (`save_on_stop`).
fn save_first(drafts: &mut Drafts, name: &str, o: &ObservedSession, reason: &Reason) {
    if let (Some(p), SessionState::Running) = (save_path(o), o.state) {
        drafts.push(
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
pub(super) fn data_fate(o: &ObservedSession, policy: &Policy) -> DataFate {
    match save_path(o) {
        Some(p) => DataFate::SavedTo(p),
        None if policy.keeps_workspaces.contains(&o.provider) => DataFate::Kept,
        None => DataFate::Discarded,
    }
}

/// Save a session's work (where it asked for that), then destroy it.
fn save_then_destroy(
    drafts: &mut Drafts,
    name: &str,
    o: &ObservedSession,
    reason: &Reason,
    retain: Retain,
) {
    save_first(drafts, name, o, reason);
    drafts.push(
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

/// A replace pulls the new image before anything of the old session is taken away: an image
/// that cannot be pulled then destroys nothing (`order.rs` makes every removal of the session
/// wait for it). Only for providers that run images; with `pull: never` the step only checks
/// that the image is there, so a missing one destroys nothing either.
fn pull_first(drafts: &mut Drafts, name: &str, w: &Want, host: &Option<String>, reason: &Reason) {
    let pull = w.spec.pull.unwrap_or_default();
    if let (ComputeKind::Docker, Some(image)) = (w.spec.compute, &w.spec.image) {
        drafts.push(
            Phase::Pull,
            Action::Session(SessionAction::PullImage {
                session: name.into(),
                provider: w.spec.compute,
                image: image.clone(),
                pull,
                host: host.clone(),
            }),
            reason.clone(),
        );
    }
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
pub(super) fn place(
    name: &str,
    w: &Want,
    policy: &Policy,
    existing: Option<&str>,
) -> Result<Option<String>, NoHostIn> {
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
        .ok_or_else(|| NoHostIn(wanted.unwrap_or("any").to_string()))
}

/// No host of a session's compute provider is in the location it asks for (named).
pub(super) struct NoHostIn(String);

fn create_steps(
    drafts: &mut Drafts,
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
    drafts.push(
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
            unreachable: w.unreachable.clone(),
        }),
        reason,
    );
    let follows = Reason::Follows {
        object: Object::Session(name.to_string()),
    };
    if start {
        drafts.push(
            Phase::Healthy,
            Action::Session(SessionAction::WaitHealthy {
                session: name.into(),
                provider: w.spec.compute,
                port: w.spec.health_port().map(String::from),
                check: w.spec.health.clone(),
            }),
            follows.clone(),
        );
    }
    if w.session.source.is_some() {
        drafts.push(Phase::Source, sync_action(name, w), follows);
    }
}
