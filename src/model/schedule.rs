//! Running hours (`schedule:` on a plan or a session): when a session may run, in a time zone,
//! and what it does outside them. Pure: whether an instant is inside the hours and when the
//! next boundary comes are functions of the instant passed in (the planner's clock), so
//! daylight-saving changes are tested with an injected clock. Time zones come from the tz
//! database bundled into the binary (jiff), not the machine's.

use std::fmt;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// `{hours: "Mon-Fri 08:00-19:00", timezone: Europe/Berlin, outside: sleep}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// When sessions may run: clauses `DAYS HH:MM-HH:MM` separated by `;` or `,`, where DAYS
    /// is a day (`Mon`), a range (`Mon-Fri`) or `daily`. `24:00` ends at midnight; a clause
    /// never crosses midnight (write two).
    pub hours: Hours,
    /// An IANA time zone (`Europe/Berlin`, `UTC`); the hours are local times there,
    /// daylight-saving changes included.
    pub timezone: Zone,
    /// What a session does outside the hours: `sleep` (it sleeps when idle and a request
    /// wakes it) or `stop` (stopped until the hours begin again).
    #[serde(default)]
    pub outside: Outside,
}

/// What a session does outside its running hours.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Outside {
    #[default]
    Sleep,
    Stop,
}

/// One clause of the hours: these weekdays (bit 0 is Monday), from `start` to `end` minutes
/// after local midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Clause {
    days: u8,
    start: u16,
    end: u16,
}

/// Parsed running hours; written back as they were given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hours {
    text: String,
    clauses: Vec<Clause>,
}

/// A time zone by its IANA name, checked against the bundled tz database.
#[derive(Clone, PartialEq, Eq)]
pub struct Zone {
    name: String,
    tz: jiff::tz::TimeZone,
}

impl fmt::Debug for Zone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Zone({})", self.name)
    }
}

/// Why running hours or a time zone do not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("`{clause}` is not `DAYS HH:MM-HH:MM` (such as `Mon-Fri 08:00-19:00`)")]
    Clause { clause: String },
    #[error("`{day}` is not a day (Mon, Tue, Wed, Thu, Fri, Sat, Sun, or daily)")]
    Day { day: String },
    #[error("`{time}` is not a time HH:MM from 00:00 to 24:00")]
    Time { time: String },
    #[error("`{clause}` ends before it starts (a clause never crosses midnight: write two)")]
    Backwards { clause: String },
    #[error("no running hours given")]
    Empty,
    #[error("`{name}` is not a time zone of the tz database (such as Europe/Berlin or UTC)")]
    Zone { name: String },
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

fn day(s: &str) -> Result<u8, ScheduleError> {
    const FULL: [&str; 7] = [
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
        "sunday",
    ];
    let l = s.trim().to_ascii_lowercase();
    (0..7)
        .find(|&i| l == DAYS[i] || l == FULL[i])
        .map(|i| i as u8)
        .ok_or_else(|| ScheduleError::Day { day: s.to_string() })
}

fn minutes(s: &str) -> Result<u16, ScheduleError> {
    let bad = || ScheduleError::Time {
        time: s.to_string(),
    };
    let (h, m) = s.split_once(':').ok_or_else(bad)?;
    let (h, m): (u16, u16) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if m >= 60 || h > 24 || (h == 24 && m != 0) || s.len() > 5 {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

impl Hours {
    pub fn parse(text: &str) -> Result<Hours, ScheduleError> {
        let mut clauses = Vec::new();
        for raw in text
            .split([';', ','])
            .map(str::trim)
            .filter(|c| !c.is_empty())
        {
            let bad = || ScheduleError::Clause {
                clause: raw.to_string(),
            };
            let (days, times) = raw.split_once(char::is_whitespace).ok_or_else(bad)?;
            let days = match days.trim() {
                d if d.eq_ignore_ascii_case("daily") => 0x7f,
                d => match d.split_once('-') {
                    Some((a, b)) => {
                        let (a, b) = (day(a)?, day(b)?);
                        // A range may wrap the week (Sat-Mon).
                        (0..7u8)
                            .filter(|i| {
                                if a <= b {
                                    (a..=b).contains(i)
                                } else {
                                    *i >= a || *i <= b
                                }
                            })
                            .fold(0u8, |m, i| m | 1 << i)
                    }
                    None => 1 << day(d)?,
                },
            };
            let (start, end) = times.trim().split_once('-').ok_or_else(bad)?;
            let (start, end) = (minutes(start.trim())?, minutes(end.trim())?);
            if end <= start {
                return Err(ScheduleError::Backwards {
                    clause: raw.to_string(),
                });
            }
            clauses.push(Clause { days, start, end });
        }
        if clauses.is_empty() {
            return Err(ScheduleError::Empty);
        }
        Ok(Hours {
            text: text.to_string(),
            clauses,
        })
    }
}

impl Zone {
    pub fn parse(name: &str) -> Result<Zone, ScheduleError> {
        jiff::tz::TimeZone::get(name)
            .map(|tz| Zone {
                name: name.to_string(),
                tz,
            })
            .map_err(|_| ScheduleError::Zone {
                name: name.to_string(),
            })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

fn to_ts(t: DateTime<Utc>) -> jiff::Timestamp {
    jiff::Timestamp::from_second(t.timestamp())
        .ok()
        .and_then(|s| {
            s.checked_add(jiff::SignedDuration::from_nanos(
                t.timestamp_subsec_nanos() as i64
            ))
            .ok()
        })
        .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
}

fn from_ts(t: jiff::Timestamp) -> DateTime<Utc> {
    DateTime::from_timestamp(t.as_second(), t.subsec_nanosecond().max(0) as u32)
        .unwrap_or(DateTime::UNIX_EPOCH)
}

impl Schedule {
    /// Is `at` inside the running hours?
    pub fn inside(&self, at: DateTime<Utc>) -> bool {
        let z = to_ts(at).to_zoned(self.timezone.tz.clone());
        let wd = z.weekday().to_monday_zero_offset() as u8;
        let m = z.hour() as u16 * 60 + z.minute() as u16;
        self.hours
            .clauses
            .iter()
            .any(|c| c.days & (1 << wd) != 0 && c.start <= m && m < c.end)
    }

    /// The first instant after `at` at which being inside the hours changes, within the next
    /// eight days (none: the hours cover the whole week). Local times that a daylight-saving
    /// change skips begin at the first instant after the gap; ones it repeats, at the first.
    pub fn next_change(&self, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let tz = &self.timezone.tz;
        let now = to_ts(at);
        let today = now.to_zoned(tz.clone()).date();
        let was = self.inside(at);
        let mut candidates: Vec<jiff::Timestamp> = Vec::new();
        for offset in -1..=8i32 {
            let Ok(date) = today.checked_add(jiff::Span::new().days(offset)) else {
                continue;
            };
            let wd = date.weekday().to_monday_zero_offset() as u8;
            for c in self
                .hours
                .clauses
                .iter()
                .filter(|c| c.days & (1 << wd) != 0)
            {
                for m in [c.start, c.end] {
                    let (d, m) = if m == 24 * 60 {
                        match date.tomorrow() {
                            Ok(d) => (d, 0),
                            Err(_) => continue,
                        }
                    } else {
                        (date, m)
                    };
                    let local = d.at((m / 60) as i8, (m % 60) as i8, 0, 0);
                    if let Ok(z) = local.to_zoned(tz.clone())
                        && z.timestamp() > now
                    {
                        candidates.push(z.timestamp());
                    }
                }
            }
        }
        candidates.sort();
        candidates.dedup();
        candidates
            .into_iter()
            .map(from_ts)
            .find(|c| self.inside(*c) != was)
    }
}

impl fmt::Display for Hours {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for Hours {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for Hours {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Hours::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl Serialize for Zone {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name)
    }
}

impl<'de> Deserialize<'de> for Zone {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Zone::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Hours {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Hours".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "Clauses `DAYS HH:MM-HH:MM` separated by `;` or `,`, such as `Mon-Fri 08:00-19:00`.",
            "examples": ["Mon-Fri 08:00-19:00", "Mon-Fri 08:00-12:00; Mon-Fri 13:00-18:00", "daily 07:00-24:00"]
        })
    }
}

impl JsonSchema for Zone {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "TimeZone".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "An IANA time zone, such as `Europe/Berlin` or `UTC`.",
            "examples": ["Europe/Berlin", "America/New_York", "UTC"]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn berlin(hours: &str) -> Schedule {
        Schedule {
            hours: Hours::parse(hours).expect("hours"),
            timezone: Zone::parse("Europe/Berlin").expect("zone"),
            outside: Outside::Sleep,
        }
    }

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).expect("time").to_utc()
    }

    #[test]
    fn hours_parse_and_refuse() {
        assert!(Hours::parse("Mon-Fri 08:00-19:00").is_ok());
        assert!(Hours::parse("daily 00:00-24:00").is_ok());
        assert!(Hours::parse("Sat-Mon 10:00-12:00; Wed 09:30-10:00").is_ok());
        assert!(matches!(
            Hours::parse("Mon-Fri 19:00-08:00"),
            Err(ScheduleError::Backwards { .. })
        ));
        assert!(matches!(
            Hours::parse("Mnday 08:00-09:00"),
            Err(ScheduleError::Day { .. })
        ));
        assert!(matches!(
            Hours::parse("Mon 8-9"),
            Err(ScheduleError::Time { .. })
        ));
        assert!(matches!(
            Hours::parse("Mon 08:00-24:30"),
            Err(ScheduleError::Time { .. })
        ));
        assert!(matches!(Hours::parse(" ; "), Err(ScheduleError::Empty)));
        assert!(matches!(
            Zone::parse("Europe/Nowhere"),
            Err(ScheduleError::Zone { .. })
        ));
    }

    /// Berlin switches from CET (+01) to CEST (+02) on Sunday 2026-03-29 and back on Sunday
    /// 2026-10-25: 08:00 local is 07:00 UTC on the Friday before the spring change and 06:00
    /// UTC on the Monday after it.
    #[test]
    fn boundaries_follow_daylight_saving() {
        let s = berlin("Mon-Fri 08:00-19:00");
        // Friday 2026-03-27 18:30 UTC = 19:30 CET: outside; next is Monday 08:00 CEST.
        let fri = t("2026-03-27T18:30:00Z");
        assert!(!s.inside(fri));
        assert_eq!(s.next_change(fri), Some(t("2026-03-30T06:00:00Z")));
        assert!(s.inside(t("2026-03-30T06:00:00Z")));
        assert!(!s.inside(t("2026-03-30T05:59:59Z")));
        // Inside on Monday: it ends at 19:00 CEST = 17:00 UTC.
        assert_eq!(
            s.next_change(t("2026-03-30T09:00:00Z")),
            Some(t("2026-03-30T17:00:00Z"))
        );
        // Autumn: Friday 2026-10-23 ends 17:00 UTC (CEST), Monday 10-26 starts 07:00 UTC (CET).
        assert_eq!(
            s.next_change(t("2026-10-23T16:00:00Z")),
            Some(t("2026-10-23T17:00:00Z"))
        );
        assert_eq!(
            s.next_change(t("2026-10-23T17:00:00Z")),
            Some(t("2026-10-26T07:00:00Z"))
        );
    }

    /// A boundary inside the skipped hour begins right after the gap; one inside the
    /// repeated hour, at its first occurrence.
    #[test]
    fn boundaries_in_a_gap_or_a_fold() {
        let s = berlin("Sun 02:30-12:00");
        // 2026-03-29 02:30 does not exist in Berlin: it begins at 03:30 CEST = 01:30 UTC.
        assert_eq!(
            s.next_change(t("2026-03-28T12:00:00Z")),
            Some(t("2026-03-29T01:30:00Z"))
        );
        // 2026-10-25 02:30 happens twice: first at 02:30 CEST = 00:30 UTC.
        assert_eq!(
            s.next_change(t("2026-10-24T12:00:00Z")),
            Some(t("2026-10-25T00:30:00Z"))
        );
    }

    #[test]
    fn whole_week_has_no_boundary() {
        let s = berlin("daily 00:00-24:00");
        assert!(s.inside(t("2026-03-29T01:30:00Z")));
        assert_eq!(s.next_change(t("2026-03-29T01:30:00Z")), None);
    }
}
