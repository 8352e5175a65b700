//! Phase 4: scheduled snapshots of sessions that stay. A session whose plan has `snapshots`
//! and whose provider reports what it took gets one step when a slot of the schedule has
//! passed since its newest snapshot (or since it was made), or when it has more of vessel's
//! snapshots than `keep`; the loop wakes at the next slot. Sessions made, replaced, destroyed,
//! held or half-made in this plan get none.

use crate::model::SnapshotSchedule;
use crate::model::observed::Snapshots;

use super::{Action, Fate, Phase, Planner, Reason, SessionAction};

impl<'a> Planner<'a> {
    pub(super) fn snapshots(&mut self) {
        let (desired, observed, now) = (self.desired, self.observed, self.policy.now);
        let mut drafts = Vec::new();
        let mut wake = None;
        for (&name, w) in &self.wants {
            let Some(schedule) = desired
                .plans
                .get(&w.session.plan)
                .and_then(|p| p.spec.snapshots.as_ref())
            else {
                continue;
            };
            let Some(o) = observed.sessions.get(name) else {
                continue;
            };
            let Some(taken) = &o.snapshots else {
                continue;
            };
            let stays = matches!(
                self.fates.get(name),
                Some(Fate::Keep | Fate::Start(_) | Fate::Stop(_))
            );
            if !o.owned || !stays || o.half_made.is_some() || self.held.session(name) {
                continue;
            }
            let Some((take, prune)) = due(schedule, taken, now) else {
                if let Some(next) = schedule.next_slot(now) {
                    wake = Some(wake.map_or(next, |w: chrono::DateTime<_>| w.min(next)));
                }
                continue;
            };
            if let Some(next) = schedule.next_slot(now) {
                wake = Some(wake.map_or(next, |w: chrono::DateTime<_>| w.min(next)));
            }
            drafts.push((
                Action::Session(SessionAction::Snapshot {
                    session: name.to_string(),
                    provider: o.provider,
                    take: take.map(SnapshotSchedule::name),
                    slot: take,
                    prune: prune.clone(),
                }),
                Reason::SnapshotDue {
                    slot: take,
                    keep: schedule.keep,
                    pruned: prune.len(),
                },
            ));
        }
        for (action, reason) in drafts {
            self.drafts.push(Phase::Snapshot, action, reason);
        }
        if let Some(at) = wake {
            self.wake_at(at);
        }
    }
}

/// What a session's schedule asks for now: the slot to take a snapshot for (if one passed
/// since its newest, or since it was made), and vessel's snapshots past `keep` after it,
/// oldest first. None when there is nothing to do.
pub fn due(
    schedule: &SnapshotSchedule,
    snaps: &Snapshots,
    now: chrono::DateTime<chrono::Utc>,
) -> Option<(Option<chrono::DateTime<chrono::Utc>>, Vec<String>)> {
    let last = schedule.last_slot(now)?;
    let newest = snaps.taken.iter().map(|t| t.slot).max();
    let take = match newest.or(snaps.since) {
        Some(anchor) => (anchor < last).then_some(last),
        None => Some(last),
    };
    let mut oldest_first: Vec<_> = snaps.taken.iter().collect();
    oldest_first.sort_by_key(|t| (t.slot, &t.name));
    let count = oldest_first.len() + usize::from(take.is_some());
    let keep = usize::try_from(schedule.keep).unwrap_or(usize::MAX);
    let prune: Vec<String> = oldest_first
        .iter()
        .take(count.saturating_sub(keep))
        .map(|t| t.name.clone())
        .collect();
    (take.is_some() || !prune.is_empty()).then_some((take, prune))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::observed::Snapshot;
    use chrono::{TimeZone, Utc};

    fn daily(keep: u32) -> SnapshotSchedule {
        SnapshotSchedule {
            every: "1d".parse().expect("duration"),
            at: Some("02:30".into()),
            keep,
        }
    }

    fn snap(slot: chrono::DateTime<Utc>) -> Snapshot {
        Snapshot {
            name: SnapshotSchedule::name(slot),
            slot,
        }
    }

    #[test]
    fn slots_are_aligned_to_the_time_of_day() {
        let s = daily(3);
        let now = Utc.with_ymd_and_hms(2026, 12, 1, 1, 0, 0).unwrap();
        assert_eq!(
            s.last_slot(now),
            Some(Utc.with_ymd_and_hms(2026, 11, 30, 2, 30, 0).unwrap())
        );
        assert_eq!(
            s.next_slot(now),
            Some(Utc.with_ymd_and_hms(2026, 12, 1, 2, 30, 0).unwrap())
        );
        let at = Utc.with_ymd_and_hms(2026, 12, 1, 2, 30, 0).unwrap();
        assert_eq!(s.last_slot(at), Some(at));
        assert_eq!(SnapshotSchedule::name(at), "vessel_20261201_023000");
    }

    #[test]
    fn a_new_session_waits_for_the_first_slot_after_it_was_made() {
        let s = daily(3);
        let made = Utc.with_ymd_and_hms(2026, 12, 1, 3, 0, 0).unwrap();
        let snaps = Snapshots {
            since: Some(made),
            ..Default::default()
        };
        assert_eq!(due(&s, &snaps, made + chrono::Duration::hours(5)), None);
        let next = Utc.with_ymd_and_hms(2026, 12, 2, 2, 30, 0).unwrap();
        assert_eq!(
            due(&s, &snaps, next + chrono::Duration::minutes(1)),
            Some((Some(next), vec![]))
        );
    }

    #[test]
    fn one_snapshot_per_slot_and_the_oldest_past_keep_are_pruned() {
        let s = daily(2);
        let d = |day| Utc.with_ymd_and_hms(2026, 12, day, 2, 30, 0).unwrap();
        let snaps = Snapshots {
            since: None,
            taken: vec![snap(d(2)), snap(d(1))],
            failed: None,
        };
        // Taken for today's slot already: nothing.
        assert_eq!(due(&s, &snaps, d(2) + chrono::Duration::hours(3)), None);
        // Several slots missed (vessel was down): one snapshot, for the latest.
        let (take, prune) = due(&s, &snaps, d(5) + chrono::Duration::hours(1)).expect("due");
        assert_eq!(take, Some(d(5)));
        assert_eq!(prune, vec![SnapshotSchedule::name(d(1))]);
        // `keep` lowered: the excess goes without a new snapshot.
        let one = daily(1);
        assert_eq!(
            due(&one, &snaps, d(2) + chrono::Duration::hours(1)),
            Some((None, vec![SnapshotSchedule::name(d(1))]))
        );
    }

    #[test]
    fn a_schedule_that_cannot_be_used_plans_nothing() {
        let bad = SnapshotSchedule {
            every: "1d".parse().expect("duration"),
            at: Some("25:00".into()),
            keep: 1,
        };
        assert!(bad.check().is_err());
        assert_eq!(due(&bad, &Snapshots::default(), Utc::now()), None);
        let zero = SnapshotSchedule {
            keep: 0,
            ..daily(1)
        };
        assert!(zero.check().is_err());
    }
}
