//! Phase 2: the guards. While a file's contents are unknown, nothing is destroyed; a plan that
//! would destroy more sessions (or discard more workspaces) than the budget allows, or
//! destroy everything from an empty source, is held unless allowed.

use super::{DataFate, Fate, Guard, HoldReason, Planner, steps::data_fate};

impl Planner<'_> {
    pub(super) fn guards(&mut self) {
        let (desired, observed, policy) = (self.desired, self.observed, self.policy);
        let destroys: Vec<&str> = self
            .fates
            .iter()
            .filter(|(_, f)| matches!(f, Fate::Destroy(_)))
            .map(|(n, _)| *n)
            .collect();
        // Replaces that discard a workspace count against the budget too.
        let discarding: Vec<&str> = self
            .fates
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
        if self.held.removals() {
            self.out.guards.push(Guard::UnknownObjects {
                files: self.held.unknown_files.clone(),
            });
            for n in &destroys {
                self.fates.remove(n);
                self.hold_session(n, HoldReason::Guarded);
            }
        }
        let destroys: Vec<&str> = destroys
            .into_iter()
            .filter(|n| self.fates.contains_key(n))
            .collect();
        let risky: Vec<&str> = destroys.iter().chain(discarding.iter()).copied().collect();
        if risky.is_empty() {
            return;
        }
        let existing = observed.sessions.values().filter(|o| o.owned).count();
        let empty_source = desired.sessions.is_empty() && desired.quarantined.is_empty();
        let b = policy.destroy_budget;
        let over_count = risky.len() > b.max_count as usize;
        let over_share =
            risky.len() > 1 && risky.len() * 100 > usize::from(b.max_percent) * existing;
        let guard = if empty_source && !destroys.is_empty() && !policy.allow_empty_source {
            Guard::EmptySource {
                destroys: destroys.len(),
            }
        } else if (over_count || over_share) && !policy.allow_destroy {
            Guard::DestroyBudget {
                destroys: risky.len(),
                existing,
                max_count: b.max_count,
                max_percent: b.max_percent,
            }
        } else {
            return;
        };
        self.out.guards.push(guard);
        for n in risky {
            self.fates.remove(n);
            self.hold_session(n, HoldReason::Guarded);
        }
    }
}
