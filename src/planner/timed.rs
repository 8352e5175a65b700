//! What the clock decides for a session: its expiry (stop or destroy), its dormant cleanup
//! (`destroy_after`), its running hours (`schedule`), and the changes still to come, for
//! `vessel plan` and the status page. Pure: the clock is the policy's `now`.

use chrono::{DateTime, Utc};

use crate::model::plan::{TimedChange, Upcoming};
use crate::model::schedule::{Outside, Schedule};
use crate::model::{ExpiryAction, PlanSpec, RunState, SessionSpec};

/// What the clock makes of one session now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Timed {
    /// It should be in this state (`Stopped` when expired: `expired` says since when).
    Live {
        state: RunState,
        expired: Option<DateTime<Utc>>,
    },
    /// Past its expiry and meant to be destroyed (`on_expiry: destroy`, or dormant for its
    /// `destroy_after`): when it expired, and the dormant time if that is why.
    Destroy {
        at: DateTime<Utc>,
        dormant: Option<crate::model::Duration>,
    },
}

/// The running hours a session keeps: its own, else its plan's.
pub fn schedule_of<'a>(s: &'a SessionSpec, plan: &'a PlanSpec) -> Option<&'a Schedule> {
    s.schedule.as_ref().or(plan.schedule.as_ref())
}

/// The state running hours make of `state` at `now`: outside them a session declared
/// `running` or `sleeping` sleeps or stops, as the schedule says.
pub fn scheduled_state(
    state: RunState,
    schedule: Option<&Schedule>,
    now: DateTime<Utc>,
) -> RunState {
    match schedule {
        Some(sc) if state != RunState::Stopped && !sc.inside(now) => match sc.outside {
            Outside::Sleep => RunState::Sleeping,
            Outside::Stop => RunState::Stopped,
        },
        _ => state,
    }
}

/// A session's fate by the clock, and the changes to come (with when each comes).
pub fn timed(s: &SessionSpec, plan: &PlanSpec, now: DateTime<Utc>) -> (Timed, Vec<Upcoming>) {
    let mut upcoming = Vec::new();
    let mut soon = |change, at: DateTime<Utc>| {
        upcoming.push(Upcoming {
            session: s.name.clone(),
            change,
            at,
            after: human(at - now),
        })
    };
    if let Some(at) = s.expires {
        if at <= now {
            if s.on_expiry == ExpiryAction::Destroy {
                return (Timed::Destroy { at, dormant: None }, upcoming);
            }
            if let Some(after) = s.destroy_after {
                let when = chrono::Duration::from_std(after.std())
                    .ok()
                    .and_then(|d| at.checked_add_signed(d));
                match when {
                    Some(w) if w <= now => {
                        return (
                            Timed::Destroy {
                                at,
                                dormant: Some(after),
                            },
                            upcoming,
                        );
                    }
                    Some(w) => soon(TimedChange::Destroyed, w),
                    None => {}
                }
            }
            return (
                Timed::Live {
                    state: RunState::Stopped,
                    expired: Some(at),
                },
                upcoming,
            );
        }
        soon(TimedChange::Expires, at);
    }
    let schedule = schedule_of(s, plan);
    let state = scheduled_state(s.state, schedule, now);
    if let Some(sc) = schedule.filter(|_| s.state != RunState::Stopped)
        && let Some(next) = sc.next_change(now)
        && s.expires.is_none_or(|e| next < e)
    {
        let change = if state != s.state {
            TimedChange::Starts
        } else if sc.outside == Outside::Sleep {
            TimedChange::Sleeps
        } else {
            TimedChange::Stops
        };
        soon(change, next);
    }
    (
        Timed::Live {
            state,
            expired: None,
        },
        upcoming,
    )
}

/// A duration as people say it, to the two largest units: `2d 4h`, `5h 3m`, `12m`, `40s`.
pub fn human(d: chrono::Duration) -> String {
    let s = d.num_seconds().max(0);
    let (days, hours, mins, secs) = (s / 86_400, s % 86_400 / 3600, s % 3600 / 60, s % 60);
    match (days, hours, mins) {
        (0, 0, 0) => format!("{secs}s"),
        (0, 0, m) => format!("{m}m"),
        (0, h, m) => format!("{h}h {m}m"),
        (d, h, _) => format!("{d}d {h}h"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_durations() {
        assert_eq!(human(chrono::Duration::seconds(40)), "40s");
        assert_eq!(human(chrono::Duration::seconds(12 * 60 + 5)), "12m");
        assert_eq!(human(chrono::Duration::seconds(5 * 3600 + 180)), "5h 3m");
        assert_eq!(
            human(chrono::Duration::seconds(2 * 86_400 + 4 * 3600 + 59)),
            "2d 4h"
        );
        assert_eq!(human(chrono::Duration::seconds(-5)), "0s");
    }
}
