//! Phase 1b: caps on running sessions (`limits`). Sessions that run now and stay running
//! count first; then the sessions this plan would start (made or started, in name order, so
//! the plan is deterministic) count one by one, and each that would pass a cap is held, and
//! says which. A crashed session repaired, or one replaced, ran before: it is not new. Asleep
//! sessions do not run, and do not count.

use std::collections::BTreeMap;

use crate::model::RunState;
use crate::model::observed::SessionState;

use super::{Fate, HoldReason, Planner, Reason};

impl<'a> Planner<'a> {
    pub(super) fn caps(&mut self) {
        let limits = self.policy.limits;
        if limits.max_running.is_none() && limits.max_running_per_owner.is_none() {
            return;
        }
        let observed = self.observed;
        let owners: BTreeMap<&'a str, String> = self
            .wants
            .iter()
            .map(|(n, w)| (*n, w.session.owner.clone().unwrap_or_default()))
            .collect();
        let owner_of = |name: &str| -> String { owners.get(name).cloned().unwrap_or_default() };
        let runs_now = |name: &str| {
            observed
                .sessions
                .get(name)
                .is_some_and(|o| o.owned && o.asleep.is_none() && o.state == SessionState::Running)
        };
        let mut total: u32 = 0;
        let mut per_owner: BTreeMap<String, u32> = BTreeMap::new();
        let mut new: Vec<&'a str> = Vec::new();
        // Sessions that run now and stay so, held ones included (they are left as they are).
        let names: Vec<&'a str> = self
            .fates
            .keys()
            .copied()
            .chain(self.held.sessions.iter().copied())
            .collect();
        for name in names {
            let wants_running = self
                .wants
                .get(name)
                .is_some_and(|w| w.state == RunState::Running);
            let stays = match self.fates.get(name) {
                None => runs_now(name),
                Some(Fate::Keep) => runs_now(name),
                Some(Fate::Replace(_)) => runs_now(name) && wants_running,
                Some(Fate::Start(Reason::Failed)) => true,
                // A restart of a session that runs: it runs before and after.
                Some(Fate::Start(Reason::RestartRequested { .. })) => true,
                Some(Fate::Start(_)) | Some(Fate::Create) => {
                    if wants_running {
                        new.push(name);
                    }
                    false
                }
                Some(Fate::Stop(_)) | Some(Fate::Destroy(_)) => false,
            };
            if stays {
                total += 1;
                *per_owner.entry(owner_of(name)).or_default() += 1;
            }
        }
        new.sort_unstable();
        new.dedup();
        for name in new {
            let owner = owner_of(name);
            let mine = per_owner.get(&owner).copied().unwrap_or(0);
            let why = match (limits.max_running, limits.max_running_per_owner) {
                (Some(max), _) if total >= max => Some(HoldReason::Cap {
                    limit: "max_running".into(),
                    max,
                    owner: None,
                }),
                (_, Some(max)) if mine >= max => Some(HoldReason::Cap {
                    limit: "max_running_per_owner".into(),
                    max,
                    owner: Some(if owner.is_empty() {
                        "(no owner)".into()
                    } else {
                        owner.clone()
                    }),
                }),
                _ => None,
            };
            match why {
                Some(why) => {
                    self.fates.remove(name);
                    self.hold_session(name, why);
                }
                None => {
                    total += 1;
                    *per_owner.entry(owner).or_default() += 1;
                }
            }
        }
    }
}
