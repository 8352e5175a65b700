//! What to tell, from what a pass saw: edges, not levels. `Memory` is what was told already
//! (kept in the state directory, so a restart neither repeats nor loses anything); `detect`
//! compares it with a pass's `Facts` and returns the events, in a fixed order. Pure.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{EventData, EventKind};
use crate::model::Duration;

/// What has been told, per session and for the source.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Memory {
    #[serde(default)]
    pub sessions: BTreeMap<String, Told>,
    #[serde(default)]
    pub source_failing: bool,
    /// The last event's sequence number (events are numbered across everything).
    #[serde(default)]
    pub sequence: u64,
    /// The last event id handed out (ids never go back, across restarts).
    #[serde(default)]
    pub last_id: u64,
}

/// What has been told about one session.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Told {
    #[serde(default)]
    pub ready: bool,
    #[serde(default)]
    pub asleep: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held: Option<String>,
    #[serde(default)]
    pub failed: bool,
    /// The `expires` the warnings below were for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<DateTime<Utc>>,
    /// The thresholds warned about, in seconds.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub warned: BTreeSet<u64>,
    /// The `expires` whose passing was told.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expired: Option<DateTime<Utc>>,
    /// The `expires` whose dormant destroy was announced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dormant: Option<DateTime<Utc>>,
}

/// What a pass saw of one declared session.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SessionFacts {
    pub owner: Option<String>,
    pub plan: Option<String>,
    pub urls: Vec<String>,
    /// In its desired state, and meant to run (its Ready condition, not stopped).
    pub ready: bool,
    /// Asleep by vessel's hand; `None` when it could not be observed.
    pub asleep: Option<bool>,
    /// Why it is held, if it is (and the hold is worth telling).
    pub held: Option<String>,
    /// Its steps' failures in a row, and the last error.
    pub failures: u32,
    pub last_error: Option<String>,
    pub expires: Option<DateTime<Utc>>,
    /// What its expiry does: `stopped` or `destroyed`.
    pub on_expiry: &'static str,
    /// Its `warn_before` thresholds (session's, else plan's, else the config's).
    pub warn_before: Vec<Duration>,
    /// Outside its running hours (so a sleep is the schedule's).
    pub outside_hours: bool,
}

/// What a pass saw.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Facts {
    pub now: DateTime<Utc>,
    pub sessions: BTreeMap<String, SessionFacts>,
    /// The source could not be read or refreshed.
    pub source_error: Option<String>,
    /// Failures in a row that make a `failed` event.
    pub failed_after: u32,
    /// Only the source is known (the pass stopped before it saw sessions): sessions are left
    /// as they were told.
    pub source_only: bool,
}

/// An event to be told: its kind, its subject (a session, or `source`), what it says.
pub type Told1 = (EventKind, String, EventData);

fn data(mem: &mut Memory, kind: EventKind, session: Option<(&str, &SessionFacts)>) -> EventData {
    mem.sequence += 1;
    EventData {
        event: kind.as_str().to_string(),
        sequence: mem.sequence,
        session: session.map(|(n, _)| n.to_string()),
        owner: session.and_then(|(_, f)| f.owner.clone()),
        plan: session.and_then(|(_, f)| f.plan.clone()),
        ..EventData::default()
    }
}

/// The events `facts` call for, given what `mem` says was told; `mem` is updated as if they
/// were told. Sessions in name order; per session: held, failed, expired, expiring, slept,
/// woke, ready; the source last.
pub fn detect(mem: &mut Memory, facts: &Facts) -> Vec<Told1> {
    let mut out = Vec::new();
    let now = facts.now;
    // Sessions no longer declared are forgotten (a new one of the same name starts afresh).
    if !facts.source_only {
        mem.sessions.retain(|n, _| facts.sessions.contains_key(n));
    }
    for (name, f) in facts.sessions.iter().filter(|_| !facts.source_only) {
        let mut told = mem.sessions.remove(name).unwrap_or_default();
        let mut emit = |mem: &mut Memory, kind: EventKind, fill: &dyn Fn(&mut EventData)| {
            let mut d = data(mem, kind, Some((name, f)));
            fill(&mut d);
            out.push((kind, name.clone(), d));
        };
        // Held: told when it starts (not again while the reason's details move).
        match (&f.held, &told.held) {
            (Some(why), None) => {
                emit(mem, EventKind::Held, &|d| {
                    d.reason = Some(why.clone());
                    d.text = format!("{name} is held: {why}");
                });
                told.held = Some(why.clone());
            }
            (Some(why), Some(_)) => told.held = Some(why.clone()),
            (None, _) => told.held = None,
        }
        // Failed: once per run of failures.
        if f.failures >= facts.failed_after.max(1) && !told.failed {
            emit(mem, EventKind::Failed, &|d| {
                d.failures = Some(f.failures);
                d.reason = f.last_error.clone();
                d.text = format!(
                    "{name} failed {} times in a row{}",
                    f.failures,
                    f.last_error
                        .as_deref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                );
            });
            told.failed = true;
        } else if f.failures == 0 {
            told.failed = false;
        }
        if let Some(exp) = f.expires {
            // A later `expires` re-arms the warnings; an earlier one keeps what was told.
            if told.expires.is_some_and(|was| exp > was) {
                told.warned.clear();
            }
            told.expires = Some(exp);
            if exp <= now {
                if told.expired != Some(exp) {
                    emit(mem, EventKind::Expired, &|d| {
                        d.expires = Some(exp);
                        d.reason = Some(format!("expired: {}", f.on_expiry));
                        d.text = format!(
                            "{name} expired at {} and is {}",
                            exp.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                            f.on_expiry
                        );
                    });
                    told.expired = Some(exp);
                }
            } else {
                // Thresholds that came due and were not told: one event, for the tightest.
                let due: Vec<&Duration> = f
                    .warn_before
                    .iter()
                    .filter(|t| {
                        chrono::Duration::from_std(t.std())
                            .ok()
                            .and_then(|d| exp.checked_sub_signed(d))
                            .is_some_and(|from| now >= from)
                            && !told.warned.contains(&t.std().as_secs())
                    })
                    .collect();
                if let Some(tightest) = due.iter().min_by_key(|t| t.std()) {
                    let left = crate::planner::timed::human(exp - now);
                    let t = tightest.to_string();
                    emit(mem, EventKind::Expiring, &|d| {
                        d.expires = Some(exp);
                        d.warn_before = Some(t.clone());
                        d.text = format!(
                            "{name} expires in {left} ({}) and will be {}",
                            exp.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                            f.on_expiry
                        );
                    });
                    told.warned.extend(due.iter().map(|t| t.std().as_secs()));
                }
            }
        } else {
            told.expires = None;
            told.warned.clear();
        }
        match f.asleep {
            Some(true) if !told.asleep => {
                emit(mem, EventKind::Slept, &|d| {
                    let why = if f.outside_hours {
                        "outside its running hours"
                    } else {
                        "idle"
                    };
                    d.reason = Some(why.into());
                    d.text = format!("{name} is asleep ({why}); a request wakes it");
                });
                told.asleep = true;
            }
            Some(false) if told.asleep => {
                emit(mem, EventKind::Woke, &|d| {
                    d.text = format!("{name} woke");
                });
                told.asleep = false;
            }
            _ => {}
        }
        if f.ready && !told.ready {
            emit(mem, EventKind::Ready, &|d| {
                d.urls = f.urls.clone();
                d.text = match f.urls.first() {
                    Some(u) => format!("{name} is ready: {u}"),
                    None => format!("{name} is ready"),
                };
            });
        }
        told.ready = f.ready;
        mem.sessions.insert(name.clone(), told);
    }
    match (&facts.source_error, mem.source_failing) {
        (Some(e), false) => {
            let mut d = data(mem, EventKind::SourceFailing, None);
            d.reason = Some(e.clone());
            d.text = format!("the source cannot be read: {e}");
            out.push((EventKind::SourceFailing, "source".into(), d));
            mem.source_failing = true;
        }
        (None, true) => {
            let mut d = data(mem, EventKind::SourceRecovered, None);
            d.text = "the source reads again".into();
            out.push((EventKind::SourceRecovered, "source".into(), d));
            mem.source_failing = false;
        }
        _ => {}
    }
    out
}

/// The dormant destroys a plan is about to make, announced before it runs: `(session,
/// expires, destroy_after)` of each. Once per expiry.
pub fn dormant(
    mem: &mut Memory,
    destroys: &[(String, DateTime<Utc>, String)],
    facts: &BTreeMap<String, SessionFacts>,
) -> Vec<Told1> {
    let mut out = Vec::new();
    for (name, exp, after) in destroys {
        let told = mem.sessions.entry(name.clone()).or_default();
        if told.dormant == Some(*exp) {
            continue;
        }
        told.dormant = Some(*exp);
        let f = facts.get(name).cloned().unwrap_or_default();
        let mut d = data(mem, EventKind::Dormant, Some((name, &f)));
        d.expires = Some(*exp);
        d.reason = Some(format!("expired {after} ago: destroyed now"));
        d.text = format!("{name} has been expired for {after} and is being destroyed");
        out.push((EventKind::Dormant, name.clone(), d));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).expect("time").to_utc()
    }

    fn facts(now: &str, expires: &str) -> Facts {
        let mut f = Facts {
            now: t(now),
            failed_after: 3,
            ..Facts::default()
        };
        f.sessions.insert(
            "user-1".into(),
            SessionFacts {
                expires: Some(t(expires)),
                on_expiry: "stopped",
                warn_before: vec![Duration::from_secs(3 * 86_400), Duration::from_secs(86_400)],
                ..SessionFacts::default()
            },
        );
        f
    }

    fn kinds(v: &[Told1]) -> Vec<String> {
        v.iter()
            .map(|(k, _, d)| {
                format!(
                    "{}{}",
                    k.as_str(),
                    d.warn_before
                        .as_deref()
                        .map(|w| format!(":{w}"))
                        .unwrap_or_default()
                )
            })
            .collect()
    }

    /// One warning per threshold; nothing again for the same ones (a restart reads the
    /// memory back); a later `expires` re-arms them; the passing is told once.
    #[test]
    fn warnings_once_per_threshold_and_rearmed() {
        let mut m = Memory::default();
        assert!(
            detect(
                &mut m,
                &facts("2026-12-01T00:00:00Z", "2026-12-10T00:00:00Z")
            )
            .is_empty()
        );
        assert_eq!(
            kinds(&detect(
                &mut m,
                &facts("2026-12-07T00:00:00Z", "2026-12-10T00:00:00Z")
            )),
            ["expiring:3d"]
        );
        assert!(
            detect(
                &mut m,
                &facts("2026-12-07T01:00:00Z", "2026-12-10T00:00:00Z")
            )
            .is_empty()
        );
        // Across a restart: the memory as the state directory keeps it.
        let mut m: Memory =
            serde_json::from_str(&serde_json::to_string(&m).expect("ser")).expect("de");
        assert!(
            detect(
                &mut m,
                &facts("2026-12-08T00:00:00Z", "2026-12-10T00:00:00Z")
            )
            .is_empty()
        );
        assert_eq!(
            kinds(&detect(
                &mut m,
                &facts("2026-12-09T00:00:00Z", "2026-12-10T00:00:00Z")
            )),
            ["expiring:1d"]
        );
        // Extended by a week: re-armed, and the 3d warning comes again in time.
        assert!(
            detect(
                &mut m,
                &facts("2026-12-09T01:00:00Z", "2026-12-17T00:00:00Z")
            )
            .is_empty()
        );
        assert_eq!(
            kinds(&detect(
                &mut m,
                &facts("2026-12-14T00:00:00Z", "2026-12-17T00:00:00Z")
            )),
            ["expiring:3d"]
        );
        // Both thresholds at once (a jump): one event, the tightest; neither again.
        assert_eq!(
            kinds(&detect(
                &mut m,
                &facts("2026-12-14T00:00:00Z", "2026-12-14T12:00:00Z")
            )),
            ["expiring:1d"]
        );
        assert!(
            detect(
                &mut m,
                &facts("2026-12-14T01:00:00Z", "2026-12-14T12:00:00Z")
            )
            .is_empty()
        );
        assert_eq!(
            kinds(&detect(
                &mut m,
                &facts("2026-12-14T12:00:00Z", "2026-12-14T12:00:00Z")
            )),
            ["expired"]
        );
        assert!(
            detect(
                &mut m,
                &facts("2026-12-15T00:00:00Z", "2026-12-14T12:00:00Z")
            )
            .is_empty()
        );
    }

    /// A dormant destroy is announced once per expiry, however many passes plan it (a
    /// destroy held by the budget is planned again and again).
    #[test]
    fn dormant_destroys_are_announced_once() {
        let mut m = Memory::default();
        let d = vec![(
            "old".to_string(),
            t("2026-05-01T00:00:00Z"),
            "30d".to_string(),
        )];
        let facts = BTreeMap::new();
        let first = dormant(&mut m, &d, &facts);
        assert_eq!(kinds(&first), ["dormant"]);
        assert_eq!(first[0].2.expires, Some(t("2026-05-01T00:00:00Z")));
        assert!(dormant(&mut m, &d, &facts).is_empty());
        let later = vec![(
            "old".to_string(),
            t("2026-05-09T00:00:00Z"),
            "30d".to_string(),
        )];
        assert_eq!(kinds(&dormant(&mut m, &later, &facts)), ["dormant"]);
    }

    #[test]
    fn edges_of_ready_sleep_failure_hold_and_source() {
        let mut m = Memory::default();
        let mut f = Facts {
            now: t("2026-12-01T00:00:00Z"),
            failed_after: 3,
            ..Facts::default()
        };
        let s = SessionFacts {
            ready: true,
            asleep: Some(false),
            urls: vec!["http://user-1.localhost/".into()],
            ..SessionFacts::default()
        };
        f.sessions.insert("user-1".into(), s.clone());
        assert_eq!(kinds(&detect(&mut m, &f)), ["ready"]);
        assert!(detect(&mut m, &f).is_empty());
        let one = f.sessions.get_mut("user-1").expect("s");
        one.asleep = Some(true);
        assert_eq!(kinds(&detect(&mut m, &f)), ["slept"]);
        // Unknown (a gap) is not awake.
        f.sessions.get_mut("user-1").expect("s").asleep = None;
        assert!(detect(&mut m, &f).is_empty());
        f.sessions.get_mut("user-1").expect("s").asleep = Some(false);
        assert_eq!(kinds(&detect(&mut m, &f)), ["woke"]);
        for n in 1..=4 {
            let one = f.sessions.get_mut("user-1").expect("s");
            one.failures = n;
            one.ready = false;
            let k = kinds(&detect(&mut m, &f));
            assert_eq!(
                k,
                if n == 3 {
                    vec!["failed".to_string()]
                } else {
                    vec![]
                },
                "{n}"
            );
        }
        let one = f.sessions.get_mut("user-1").expect("s");
        one.failures = 0;
        one.ready = true;
        one.held = Some("cap".into());
        f.source_error = Some("fetch failed".into());
        assert_eq!(
            kinds(&detect(&mut m, &f)),
            ["held", "ready", "source_failing"]
        );
        f.source_error = None;
        assert_eq!(kinds(&detect(&mut m, &f)), ["source_recovered"]);
        let seqs: Vec<u64> = detect(&mut m, &{
            let mut g = f.clone();
            g.sessions.get_mut("user-1").expect("s").held = None;
            g.sessions.get_mut("user-1").expect("s").failures = 5;
            g
        })
        .iter()
        .map(|e| e.2.sequence)
        .collect();
        assert_eq!(seqs, [m.sequence]);
    }
}
