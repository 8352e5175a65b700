//! Phase 1b: caps on running sessions (`limits`) and the capacity of compute hosts. Sessions
//! that run now and stay running count first; then the sessions this plan would start (made
//! or started, in name order, so the plan is deterministic) count one by one, and each that
//! would pass a cap, or take the plans on its host past the host's `cpus` or `memory`, is
//! held, and says which. A crashed session repaired, or one replaced, ran before: it is not
//! new. Asleep sessions do not run, and do not count (a paused one keeps its memory: that
//! counts on its host).

use std::collections::BTreeMap;

use crate::model::observed::SessionState;
use crate::model::{ComputeKind, HostCapacity, RunState, SleepDepth};

use super::{Fate, HoldReason, Planner, Reason};

/// A host's place in the capacity count: its provider and name (`None`: one place).
type HostKey = (ComputeKind, Option<String>);

/// What the sessions on one host have, in CPUs and bytes.
#[derive(Debug, Default, Clone, Copy)]
struct Used {
    cpus: f64,
    memory: u64,
}

impl<'a> Planner<'a> {
    pub(super) fn caps(&mut self) {
        let limits = self.policy.limits;
        let counting = limits.max_running.is_some() || limits.max_running_per_owner.is_some();
        let capacity = &self.policy.capacity;
        if !counting && capacity.is_empty() {
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
        let mut used: BTreeMap<HostKey, Used> = BTreeMap::new();
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
            let fate = self.fates.get(name);
            let stays = match fate {
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
                if let Some((host, u)) = self.usage(name) {
                    let e = used.entry(host).or_default();
                    e.cpus += u.cpus;
                    e.memory += u.memory;
                }
            } else if !matches!(fate, Some(Fate::Destroy(_)) | Some(Fate::Stop(_)))
                && let Some(o) = observed.sessions.get(name)
                && o.owned
                && o.asleep
                    .as_ref()
                    .is_some_and(|a| a.depth == SleepDepth::Pause)
                && let Some((host, u)) = self.usage(name)
            {
                // Paused: its memory is still taken.
                used.entry(host).or_default().memory += u.memory;
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
            let usage = self.usage(name);
            let why = why.or_else(|| {
                let (host, u) = usage.as_ref()?;
                let cap = capacity.get(host)?;
                over(host, cap, used.get(host).copied().unwrap_or_default(), *u)
            });
            match why {
                Some(why) => {
                    self.fates.remove(name);
                    self.hold_session(name, why);
                }
                None => {
                    total += 1;
                    *per_owner.entry(owner).or_default() += 1;
                    if let Some((host, u)) = usage {
                        let e = used.entry(host).or_default();
                        e.cpus += u.cpus;
                        e.memory += u.memory;
                    }
                }
            }
        }
    }

    /// Where a session runs or would be placed, and what its plan asks for there; `None`
    /// when no capacity is declared for that host (or it has no host to go to).
    fn usage(&self, name: &str) -> Option<(HostKey, Used)> {
        if self.policy.capacity.is_empty() {
            return None;
        }
        let observed = self.observed.sessions.get(name).filter(|o| o.owned);
        let want = self.wants.get(name);
        let (kind, host) = match (observed, want) {
            (Some(o), _) => (o.provider, o.host.clone()),
            (None, Some(w)) => (
                w.spec.compute,
                super::steps::place(name, w, self.policy, None).ok()?,
            ),
            (None, None) => return None,
        };
        let key = (kind, host);
        if !self.policy.capacity.contains_key(&key) {
            return None;
        }
        // What it is declared to ask for; else what it was made with.
        let (cpus, memory) = match (want, observed.and_then(|o| o.spec.as_ref())) {
            (Some(w), _) => (w.spec.cpus, w.spec.memory),
            (None, Some(s)) => (s.cpus, s.memory),
            (None, None) => (None, None),
        };
        Some((
            key,
            Used {
                cpus: cpus.unwrap_or(0.0),
                memory: memory.map_or(0, |m| m.bytes()),
            },
        ))
    }
}

/// Why a session asking for `u` does not fit on `host` with `used` taken, if it does not.
fn over(host: &HostKey, cap: &HostCapacity, used: Used, u: Used) -> Option<HoldReason> {
    let hold = |resource: &str, needs: String, capacity: String, used: String| {
        Some(HoldReason::Capacity {
            provider: host.0,
            host: host.1.clone(),
            resource: resource.into(),
            needs,
            capacity,
            used,
        })
    };
    if let Some(max) = cap.cpus
        && u.cpus > 0.0
        && used.cpus + u.cpus > f64::from(max) + 1e-9
    {
        return hold(
            "cpus",
            cpus_text(u.cpus),
            max.to_string(),
            cpus_text(used.cpus),
        );
    }
    if let Some(max) = cap.memory
        && u.memory > 0
        && used.memory + u.memory > max.bytes()
    {
        use crate::model::Size;
        return hold(
            "memory",
            Size(u.memory).to_string(),
            max.to_string(),
            Size(used.memory).to_string(),
        );
    }
    None
}

/// CPUs as people write them: `2`, `0.5`, `1.25`.
fn cpus_text(c: f64) -> String {
    let s = format!("{c:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}
