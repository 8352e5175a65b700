//! Notifications: what happened to sessions, told to webhook targets (`notify:` in the config)
//! as CloudEvents 1.0 JSON, signed with HMAC-SHA256 as the webhook receiver checks them.
//!
//! - `detect.rs` (pure) turns what a pass saw into events, remembering what it already told
//!   (`Memory`, kept in `<state>/notify.json`) so nothing is told twice across restarts and
//!   everything that changes is told once.
//! - `outbox.rs` makes each event durable in `<state>/outbox/<target>/` before anything else
//!   happens to it, and delivers it on a task of its own per target: at least once, in order,
//!   retried with backoff for the target's `retry_for`. A target that is down never slows the
//!   reconcile loop: the loop only writes files.
//!
//! This module must not decide anything about sessions: it reports what the planner and the
//! providers decided.

pub mod detect;
pub mod outbox;

use std::collections::BTreeMap;
use std::path::Path;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::http_client::TlsConfig;
use crate::model::Duration;
use crate::secret::SecretRef;

pub use detect::{Facts, Memory, SessionFacts};
pub use outbox::{Outbox, TargetStats};

/// The longest wait between two tries of one delivery.
pub const MAX_BACKOFF: std::time::Duration = std::time::Duration::from_secs(30);

/// One webhook target of `notify:`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NotifyTarget {
    /// The target's name, a DNS label (`ops`, `chat`): its queue's directory and its label
    /// in status and metrics.
    pub name: String,
    /// The URL events are POSTed to, by reference (a chat tool's incoming-webhook URL is a
    /// secret): `{env: NAME}` or `{file: PATH}`. `http://` or `https://`, no credentials.
    pub url: SecretRef,
    /// The HMAC-SHA256 key the body is signed with (`X-Vessel-Signature: sha256=<hex>`), by
    /// reference. At least 8 bytes.
    pub secret: SecretRef,
    /// The events it wants (`ready`, `slept`, `woke`, `expiring`, `expired`, `failed`,
    /// `held`, `dormant`, `source_failing`, `source_recovered`). Empty: all of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<EventKind>,
    /// A body to send instead of the CloudEvent, for chat tools' incoming webhooks:
    /// `{{text}}`, `{{type}}`, `{{kind}}`, `{{subject}}`, `{{id}}`, `{{time}}`, `{{session}}`,
    /// `{{owner}}`, `{{urls}}` are replaced by the event's values, escaped for a JSON string
    /// (`{"text": "{{text}}"}`). Still signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// The `Content-Type` of a templated body (default `application/json`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// How long an event is retried (with backoff) before it counts as failed and is set
    /// aside in `<state>/outbox/<target>/failed/`.
    #[serde(default = "default_retry_for")]
    pub retry_for: Duration,
    /// How vessel trusts an `https://` target (default: the system's roots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
}

fn default_retry_for() -> Duration {
    Duration::from_secs(24 * 3600)
}

impl NotifyTarget {
    /// Does it want events of `kind`?
    pub fn wants(&self, kind: EventKind) -> bool {
        self.events.is_empty() || self.events.contains(&kind)
    }

    /// Make a relative CA file relative to `base`.
    pub fn rebase(&mut self, base: &Path) {
        if let Some(t) = &mut self.tls {
            t.rebase(base);
        }
    }
}

/// What happened.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A session is in its desired state and answers (with its URLs).
    Ready,
    /// A session was put to sleep (idle, or outside its running hours).
    Slept,
    /// A sleeping session woke.
    Woke,
    /// A session expires within one of its `warn_before` thresholds.
    Expiring,
    /// A session passed its `expires` (stopped or destroyed, as `on_expiry` says).
    Expired,
    /// A session's steps failed several times in a row.
    Failed,
    /// A session is held (by a guard, a cap, capacity or a file with errors).
    Held,
    /// A session expired long enough ago (`destroy_after`) is about to be destroyed.
    Dormant,
    /// The desired-state source cannot be read.
    SourceFailing,
    /// The source reads again.
    SourceRecovered,
}

impl EventKind {
    /// The CloudEvents `type`.
    pub fn cloud_type(self) -> &'static str {
        match self {
            EventKind::Ready => "dev.vessel.session.ready",
            EventKind::Slept => "dev.vessel.session.slept",
            EventKind::Woke => "dev.vessel.session.woke",
            EventKind::Expiring => "dev.vessel.session.expiring",
            EventKind::Expired => "dev.vessel.session.expired",
            EventKind::Failed => "dev.vessel.session.failed",
            EventKind::Held => "dev.vessel.session.held",
            EventKind::Dormant => "dev.vessel.session.dormant",
            EventKind::SourceFailing => "dev.vessel.source.failing",
            EventKind::SourceRecovered => "dev.vessel.source.recovered",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Ready => "ready",
            EventKind::Slept => "slept",
            EventKind::Woke => "woke",
            EventKind::Expiring => "expiring",
            EventKind::Expired => "expired",
            EventKind::Failed => "failed",
            EventKind::Held => "held",
            EventKind::Dormant => "dormant",
            EventKind::SourceFailing => "source_failing",
            EventKind::SourceRecovered => "source_recovered",
        }
    }
}

/// A CloudEvents 1.0 event in the structured JSON format: the body vessel POSTs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(title = "vessel notification (CloudEvents 1.0)")]
pub struct CloudEvent {
    /// Always `1.0`.
    pub specversion: String,
    /// Unique per event (with `source`): the same in every retry and every target, so a
    /// receiver deduplicates on it.
    pub id: String,
    /// `urn:vessel:<domain>`: which vessel.
    pub source: String,
    /// `dev.vessel.session.ready` and so on (see `EventKind`).
    #[serde(rename = "type")]
    pub kind: String,
    /// The session's name, or `source` for source events.
    pub subject: String,
    /// When it happened.
    pub time: DateTime<Utc>,
    /// Always `application/json`.
    pub datacontenttype: String,
    pub data: EventData,
}

/// What an event says.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct EventData {
    /// One line for people: "user-1 is ready: http://user-1.localhost/".
    pub text: String,
    /// The event's kind, as `notify[].events` names it.
    pub event: String,
    /// Per session (or for the source), 1, 2, 3...: the order events happened in. Within a
    /// target, events are delivered in this order.
    pub sequence: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
    /// Where the session answers (ready).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
    /// Its `expires` (expiring, expired, dormant).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<DateTime<Utc>>,
    /// The threshold that came due (expiring): `3d`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warn_before: Option<String>,
    /// Why (held: the hold; failed: the last error; slept: idle or schedule; expired and
    /// dormant: what happens to it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Failures in a row (failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failures: Option<u32>,
}

/// Why the notifier cannot start.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("notify target `{name}`: its {what} cannot be read")]
    Secret {
        name: String,
        what: &'static str,
        #[source]
        source: crate::secret::SecretError,
    },
    #[error("notify target `{name}`: its secret is shorter than 8 bytes")]
    WeakSecret { name: String },
    #[error("notify target `{name}`: its URL is not usable")]
    Url {
        name: String,
        #[source]
        source: crate::http_client::HttpError,
    },
    #[error("notify target name `{name}` is not a DNS label (a-z, 0-9, -), or it is used twice")]
    Name { name: String },
    #[error("cannot open the outbox in {path}")]
    Outbox {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The loop's side of notifications: what was told (`Memory`, in `<state>/notify.json`) and
/// the outbox. The loop calls `dormant` before a plan runs and `after_pass` after it.
pub struct Notifier {
    outbox: Outbox,
    /// The events each target wants (empty: all).
    wants: BTreeMap<String, Vec<EventKind>>,
    memory: Memory,
    /// What `notify.json` holds now, to write it only when it changes.
    saved: Vec<u8>,
    path: std::path::PathBuf,
    source: String,
    /// Failures in a row that make a `failed` event.
    pub failed_after: u32,
}

impl Notifier {
    /// Open the outbox and the memory in `state_dir`; the delivery tasks are the caller's to
    /// spawn. `domain` names this vessel in events' `source`.
    pub fn open(
        state_dir: &Path,
        targets: &[NotifyTarget],
        domain: &str,
        max_backoff: std::time::Duration,
    ) -> Result<(Notifier, Vec<outbox::Delivery>), NotifyError> {
        let (outbox, deliveries, last) = Outbox::open(state_dir, targets, max_backoff)?;
        let path = state_dir.join("notify.json");
        let saved = std::fs::read(&path).unwrap_or_default();
        let mut memory: Memory = if saved.is_empty() {
            Memory::default()
        } else {
            serde_json::from_slice(&saved).unwrap_or_else(|e| {
                tracing::warn!(file = %path.display(), "what was notified cannot be read ({e}); starting afresh");
                Memory::default()
            })
        };
        // Ids never go back: past every id queued, every id handed out, and the clock.
        let clock = Utc::now().timestamp_micros().max(0) as u64;
        memory.last_id = memory.last_id.max(last).max(clock);
        Ok((
            Notifier {
                outbox,
                wants: targets
                    .iter()
                    .map(|t| (t.name.clone(), t.events.clone()))
                    .collect(),
                memory,
                saved,
                path,
                source: format!("urn:vessel:{domain}"),
                failed_after: 3,
            },
            deliveries,
        ))
    }

    /// Was `session` told ready, and has it stayed so? (Its URLs are only needed when not.)
    pub fn told_ready(&self, session: &str) -> bool {
        self.memory.sessions.get(session).is_some_and(|t| t.ready)
    }

    /// Every target's delivery counts.
    pub fn stats(&self) -> outbox::Stats {
        self.outbox.stats()
    }

    /// Tell what a pass saw.
    pub fn after_pass(&mut self, facts: &Facts) {
        let before = self.memory.clone();
        let told = detect::detect(&mut self.memory, facts);
        self.tell(told, facts.now, before);
    }

    /// Announce the dormant destroys a plan is about to run: `(session, expires, after)`.
    pub fn dormant(
        &mut self,
        destroys: &[(String, DateTime<Utc>, String)],
        facts: &BTreeMap<String, SessionFacts>,
        now: DateTime<Utc>,
    ) {
        if destroys.is_empty() {
            return;
        }
        let before = self.memory.clone();
        let told = detect::dormant(&mut self.memory, destroys, facts);
        self.tell(told, now, before);
    }

    /// Queue `told` durably, then remember it; if the outbox cannot take it, forget it (the
    /// next pass tries again).
    fn tell(&mut self, told: Vec<detect::Told1>, now: DateTime<Utc>, before: Memory) {
        let mut batch = Vec::with_capacity(told.len());
        for (kind, subject, data) in told {
            let targets: Vec<String> = self
                .wants
                .iter()
                .filter(|(_, w)| w.is_empty() || w.contains(&kind))
                .map(|(n, _)| n.clone())
                .collect();
            if targets.is_empty() {
                continue;
            }
            self.memory.last_id += 1;
            let id = self.memory.last_id;
            tracing::info!(id, kind = kind.as_str(), %subject, "notifying: {}", data.text);
            batch.push((
                id,
                targets,
                CloudEvent {
                    specversion: "1.0".into(),
                    id: id.to_string(),
                    source: self.source.clone(),
                    kind: kind.cloud_type().into(),
                    subject,
                    time: now,
                    datacontenttype: "application/json".into(),
                    data,
                },
            ));
        }
        if self.memory == before {
            return;
        }
        if let Err(e) = self.outbox.push(&batch) {
            tracing::warn!("cannot queue notifications ({e}); they are tried again next pass");
            self.memory = before;
            return;
        }
        self.save();
    }

    /// Keep the memory (atomically), when it changed.
    fn save(&mut self) {
        let Ok(bytes) = serde_json::to_vec(&self.memory) else {
            return;
        };
        if bytes == self.saved {
            return;
        }
        let tmp = self.path.with_extension("json.tmp");
        let written = std::fs::write(&tmp, &bytes).and_then(|_| std::fs::rename(&tmp, &self.path));
        match written {
            Ok(()) => self.saved = bytes,
            Err(e) => {
                tracing::warn!(file = %self.path.display(), "cannot keep what was notified ({e})")
            }
        }
    }
}

/// Replace `{{name}}` in `template` with `values`, each escaped for the inside of a JSON
/// string. Unknown names stay as they are.
pub fn render_template(template: &str, values: &BTreeMap<&str, String>) -> String {
    let mut out = String::with_capacity(template.len() + 64);
    let mut rest = template;
    while let Some(i) = rest.find("{{") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        match after.find("}}") {
            Some(j) if values.contains_key(after[..j].trim()) => {
                let v = &values[after[..j].trim()];
                let quoted = serde_json::to_string(v).unwrap_or_default();
                out.push_str(&quoted[1..quoted.len().saturating_sub(1).max(1)]);
                rest = &after[j + 2..];
            }
            _ => {
                out.push_str("{{");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// The values a template may use, from an event.
pub fn template_values(e: &CloudEvent) -> BTreeMap<&'static str, String> {
    let mut v = BTreeMap::new();
    v.insert("id", e.id.clone());
    v.insert("type", e.kind.clone());
    v.insert("kind", e.data.event.clone());
    v.insert("subject", e.subject.clone());
    v.insert("time", e.time.to_rfc3339());
    v.insert("text", e.data.text.clone());
    v.insert("session", e.data.session.clone().unwrap_or_default());
    v.insert("owner", e.data.owner.clone().unwrap_or_default());
    v.insert("urls", e.data.urls.join(" "));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_escape_for_json() {
        let mut v = BTreeMap::new();
        v.insert("text", "say \"hi\"\nnow".to_string());
        v.insert("empty", String::new());
        let out = render_template(
            r#"{"text": "{{text}}", "e": "{{ empty }}", "x": "{{nope}}"}"#,
            &v,
        );
        assert_eq!(
            out,
            r#"{"text": "say \"hi\"\nnow", "e": "", "x": "{{nope}}"}"#
        );
        let parsed: serde_json::Value = serde_json::from_str(&out).expect("valid JSON");
        assert_eq!(parsed["text"], "say \"hi\"\nnow");
    }
}
