//! The outbox: every event is a file in `<state>/outbox/<target>/<id>.json` before anything
//! else happens to it (written to a temporary name and renamed; then the filesystem synced,
//! once per batch), so a SIGKILL or a power cut loses nothing that was told. One delivery task per target sends
//! them oldest first, one at a time (so each session's events arrive in order), removes each
//! file once the target answered 2xx, and retries the oldest with backoff until the target's
//! `retry_for` has passed since the event; then the file moves to `failed/` and the next goes.
//! A file delivered but not yet removed when vessel dies is sent again: at least once, and a
//! receiver deduplicates on the event id.
//!
//! The loop only writes files and pokes the task: a target that is down costs it nothing.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{CloudEvent, NotifyError, NotifyTarget, render_template, template_values};
use crate::http_client::{Api, HttpError, Limits};
use crate::secret::Secret;

/// Counts of one target's deliveries (since start; `queued` is what waits on disk).
#[derive(Debug, Default)]
pub struct TargetStats {
    pub queued: AtomicU64,
    pub delivered: AtomicU64,
    pub failed: AtomicU64,
    pub attempts: AtomicU64,
    last_error: Mutex<Option<String>>,
    last_delivered: Mutex<Option<DateTime<Utc>>>,
}

/// One target's deliveries, as status shows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct TargetView {
    /// Events waiting (on disk) to be delivered.
    pub queued: u64,
    /// Delivered since vessel started.
    pub delivered: u64,
    /// Given up on (past `retry_for`) since vessel started; kept in `failed/`.
    pub failed: u64,
    /// Tries made since vessel started (retries included).
    pub attempts: u64,
    /// The last failed try's error, while the oldest event still waits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_delivered: Option<DateTime<Utc>>,
}

impl TargetStats {
    pub fn view(&self) -> TargetView {
        TargetView {
            queued: self.queued.load(Ordering::Relaxed),
            delivered: self.delivered.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            attempts: self.attempts.load(Ordering::Relaxed),
            last_error: crate::lock_or_reset(&self.last_error).clone(),
            last_delivered: *crate::lock_or_reset(&self.last_delivered),
        }
    }
}

/// Every target's counts, by name.
pub type Stats = Arc<BTreeMap<String, Arc<TargetStats>>>;

struct Queue {
    dir: PathBuf,
    tx: mpsc::UnboundedSender<u64>,
    stats: Arc<TargetStats>,
}

/// The durable side: what the loop writes to.
pub struct Outbox {
    queues: BTreeMap<String, Queue>,
    stats: Stats,
}

/// One target's delivery task, ready to run.
pub struct Delivery {
    name: String,
    dir: PathBuf,
    api: Api,
    path: String,
    secret: Secret,
    template: Option<String>,
    content_type: String,
    retry_for: chrono::Duration,
    max_backoff: Duration,
    backlog: VecDeque<u64>,
    rx: mpsc::UnboundedReceiver<u64>,
    stats: Arc<TargetStats>,
}

/// `<id>.json`, zero-padded so names sort as ids do.
fn file_name(id: u64) -> String {
    format!("{id:020}.json")
}

fn id_of(name: &str) -> Option<u64> {
    name.strip_suffix(".json")?.parse().ok()
}

/// `scheme://host:port` and the rest (`/path?query`, at least `/`).
fn split_url(url: &str) -> (&str, &str) {
    let start = url.find("://").map_or(0, |i| i + 3);
    match url[start..].find(['/', '?']) {
        Some(i) => (&url[..start + i], &url[start + i..]),
        None => (url, "/"),
    }
}

/// A delivery error, without the URL's path (a chat tool's webhook URL holds its token).
fn describe(e: &HttpError) -> String {
    match e {
        HttpError::Request { addr, source, .. } => {
            let inner = std::error::Error::source(source)
                .map(|s| format!(": {}", crate::error_chain(s)))
                .unwrap_or_default();
            format!("POST to {addr} failed{inner}")
        }
        HttpError::Body { addr, .. } => format!("reading the answer of {addr} failed"),
        other => other.to_string(),
    }
}

/// Ids waiting in `dir`, oldest first; leftover temporary files removed.
fn waiting(dir: &Path) -> std::io::Result<Vec<u64>> {
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(".tmp-") {
            let _ = std::fs::remove_file(entry.path());
        } else if let Some(id) = id_of(&name) {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

impl Outbox {
    /// Open the outbox of `targets` under `state_dir`: their queues as they were left, and a
    /// delivery task for each. The last id any queue holds is returned too (ids never go back).
    pub fn open(
        state_dir: &Path,
        targets: &[NotifyTarget],
        max_backoff: Duration,
    ) -> Result<(Outbox, Vec<Delivery>, u64), NotifyError> {
        let mut queues = BTreeMap::new();
        let mut stats = BTreeMap::new();
        let mut deliveries = Vec::new();
        let mut last = 0;
        for t in targets {
            let label_ok = !t.name.is_empty()
                && t.name.len() <= 63
                && t.name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !label_ok || queues.contains_key(&t.name) {
                return Err(NotifyError::Name {
                    name: t.name.clone(),
                });
            }
            let secret_err = |what| {
                move |source| NotifyError::Secret {
                    name: t.name.clone(),
                    what,
                    source,
                }
            };
            let url = t.url.resolve().map_err(secret_err("url"))?;
            let secret = t.secret.resolve().map_err(secret_err("secret"))?;
            if secret.expose().len() < 8 {
                return Err(NotifyError::WeakSecret {
                    name: t.name.clone(),
                });
            }
            let (base, path) = split_url(url.expose());
            let limits = Limits {
                connect: Duration::from_secs(5),
                answer: Duration::from_secs(15),
                max_body: 64 << 10,
            };
            let api = Api::keep_alive(base, "notify target URL", t.tls.as_ref(), limits).map_err(
                |source| NotifyError::Url {
                    name: t.name.clone(),
                    source,
                },
            )?;
            let dir = state_dir.join("outbox").join(&t.name);
            let io = |source| NotifyError::Outbox {
                path: dir.clone(),
                source,
            };
            std::fs::create_dir_all(dir.join("failed")).map_err(io)?;
            let backlog = waiting(&dir).map_err(io)?;
            last = last.max(backlog.last().copied().unwrap_or(0));
            let s = Arc::new(TargetStats::default());
            s.queued.store(backlog.len() as u64, Ordering::Relaxed);
            let (tx, rx) = mpsc::unbounded_channel();
            deliveries.push(Delivery {
                name: t.name.clone(),
                dir: dir.clone(),
                api,
                path: path.to_string(),
                secret,
                template: t.template.clone(),
                content_type: t.content_type.clone().unwrap_or_else(|| {
                    if t.template.is_some() {
                        "application/json".into()
                    } else {
                        "application/cloudevents+json".into()
                    }
                }),
                retry_for: chrono::Duration::from_std(t.retry_for.std())
                    .unwrap_or(chrono::Duration::MAX),
                max_backoff,
                backlog: backlog.into(),
                rx,
                stats: s.clone(),
            });
            stats.insert(t.name.clone(), s.clone());
            queues.insert(t.name.clone(), Queue { dir, tx, stats: s });
        }
        Ok((
            Outbox {
                queues,
                stats: Arc::new(stats),
            },
            deliveries,
            last,
        ))
    }

    /// Every target's counts.
    pub fn stats(&self) -> Stats {
        self.stats.clone()
    }

    pub fn targets(&self) -> impl Iterator<Item = &str> {
        self.queues.keys().map(String::as_str)
    }

    /// Make `events` durable, each in the queues of the targets named with it, then hand them
    /// to the delivery tasks. Nothing is handed over unless all of it is on disk.
    pub fn push(&self, events: &[(u64, Vec<String>, CloudEvent)]) -> std::io::Result<()> {
        let mut written: Vec<(&Queue, u64)> = Vec::new();
        let mut dirs: Vec<&Path> = Vec::new();
        for (id, targets, event) in events {
            let body = serde_json::to_vec(event).map_err(std::io::Error::other)?;
            for t in targets {
                let Some(q) = self.queues.get(t) else {
                    continue;
                };
                let tmp = q.dir.join(format!(".tmp-{}", file_name(*id)));
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(&body)?;
                drop(f);
                std::fs::rename(&tmp, q.dir.join(file_name(*id)))?;
                written.push((q, *id));
                if !dirs.contains(&q.dir.as_path()) {
                    dirs.push(&q.dir);
                }
            }
        }
        // Past a SIGKILL the files are there already (the page cache is the kernel's); for a
        // power cut, one sync of the state directory's filesystem per batch makes the files,
        // their contents and the renames durable together (a sync per file costs ms each).
        if let Some(first) = dirs.first() {
            let d = std::fs::File::open(first)?;
            if nix::unistd::syncfs(&d).is_err() {
                for d in &dirs {
                    for id in written
                        .iter()
                        .filter(|(q, _)| q.dir == **d)
                        .map(|(_, id)| id)
                    {
                        std::fs::File::open(d.join(file_name(*id)))?.sync_data()?;
                    }
                    std::fs::File::open(d)?.sync_all()?;
                }
            }
        }
        for (q, id) in written {
            q.stats.queued.fetch_add(1, Ordering::Relaxed);
            let _ = q.tx.send(id);
        }
        Ok(())
    }
}

impl Delivery {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Deliver until `cancel`: the oldest waiting event first, each until it is delivered
    /// or its `retry_for` has passed.
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut tries: u32 = 0;
        loop {
            while let Ok(id) = self.rx.try_recv() {
                self.backlog.push_back(id);
            }
            let Some(&id) = self.backlog.front() else {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    id = self.rx.recv() => match id {
                        Some(id) => self.backlog.push_back(id),
                        None => return,
                    },
                }
                continue;
            };
            let path = self.dir.join(file_name(id));
            let bytes = match tokio::fs::read(&path).await {
                Ok(b) => b,
                Err(e) => {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        tracing::warn!(target_name = %self.name, file = %path.display(), "cannot read a queued event ({e}); skipped");
                    }
                    self.done(id, false).await;
                    continue;
                }
            };
            let event: CloudEvent = match serde_json::from_slice(&bytes) {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(target_name = %self.name, file = %path.display(), "a queued event does not read ({e}); set aside in failed/");
                    self.set_aside(id, &e.to_string()).await;
                    continue;
                }
            };
            let body = match &self.template {
                Some(t) => render_template(t, &template_values(&event)).into_bytes(),
                None => bytes,
            };
            let signature = format!(
                "sha256={}",
                hex::encode(crate::webhook::hmac_sha256(
                    self.secret.expose().as_bytes(),
                    &body
                ))
            );
            self.stats.attempts.fetch_add(1, Ordering::Relaxed);
            let headers = [
                ("content-type", self.content_type.as_str()),
                ("x-vessel-signature", signature.as_str()),
                ("x-vessel-event-id", event.id.as_str()),
                ("x-vessel-event-type", event.kind.as_str()),
            ];
            let sent = tokio::select! {
                _ = cancel.cancelled() => return,
                r = self.api.call(http::Method::POST, &self.path, &headers, Some(body.into())) => r,
            };
            let error = match sent {
                Ok(r) if (200..300).contains(&r.status) => {
                    tries = 0;
                    *crate::lock_or_reset(&self.stats.last_delivered) = Some(Utc::now());
                    *crate::lock_or_reset(&self.stats.last_error) = None;
                    self.done(id, true).await;
                    continue;
                }
                Ok(r) => format!("the target answered {}: {}", r.status, r.brief()),
                Err(e) => describe(&e),
            };
            tries += 1;
            if Utc::now() > event.time + self.retry_for {
                tracing::warn!(target_name = %self.name, id = %event.id, tries, "giving up on an event after its retry time: {error}");
                self.set_aside(id, &error).await;
                tries = 0;
                continue;
            }
            if tries == 1 || tries.is_power_of_two() {
                tracing::info!(target_name = %self.name, id = %event.id, tries, "delivery failed, retrying: {error}");
            }
            *crate::lock_or_reset(&self.stats.last_error) = Some(error);
            let wait = (Duration::from_millis(250) * 2u32.saturating_pow(tries.min(16) - 1))
                .min(self.max_backoff);
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// The oldest event is done with: delivered (its file removed) or gone.
    async fn done(&mut self, id: u64, delivered: bool) {
        self.backlog.pop_front();
        if delivered {
            if let Err(e) = tokio::fs::remove_file(self.dir.join(file_name(id))).await {
                tracing::warn!(target_name = %self.name, "cannot remove a delivered event ({e}); it may be sent again");
            }
            self.stats.delivered.fetch_add(1, Ordering::Relaxed);
        }
        let _ = self
            .stats
            .queued
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |q| {
                Some(q.saturating_sub(1))
            });
    }

    /// Give up on the oldest event: it moves to `failed/` (the last 1,000 are kept).
    async fn set_aside(&mut self, id: u64, why: &str) {
        let from = self.dir.join(file_name(id));
        let failed = self.dir.join("failed");
        if let Err(e) = tokio::fs::rename(&from, failed.join(file_name(id))).await {
            tracing::warn!(target_name = %self.name, "cannot set a failed event aside ({e})");
            let _ = tokio::fs::remove_file(&from).await;
        }
        if let Ok(mut old) = waiting(&failed) {
            while old.len() > 1_000 {
                let _ = std::fs::remove_file(failed.join(file_name(old.remove(0))));
            }
        }
        *crate::lock_or_reset(&self.stats.last_error) = Some(why.to_string());
        self.stats.failed.fetch_add(1, Ordering::Relaxed);
        self.done(id, false).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_base_and_path() {
        assert_eq!(
            split_url("http://127.0.0.1:8080"),
            ("http://127.0.0.1:8080", "/")
        );
        assert_eq!(
            split_url("https://hooks.example.com/services/T0/B0/xyz?a=1"),
            ("https://hooks.example.com", "/services/T0/B0/xyz?a=1")
        );
        assert_eq!(split_url("http://h:1?x"), ("http://h:1", "?x"));
        assert_eq!(id_of(&file_name(42)), Some(42));
        assert!(file_name(9) < file_name(10));
    }
}
