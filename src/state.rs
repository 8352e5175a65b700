//! The state directory: a lock so two reconcilers never drive it, the last observed snapshot
//! (for `vessel plan --observed`), and the event history. Nothing here is secret, and nothing
//! here is the truth: the truth is what `observe` sees.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use nix::fcntl::{Flock, FlockArg};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::exec::Outcome;
use crate::observed::Observed;

/// One step's outcome, as recorded and served.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Event {
    pub time: DateTime<Utc>,
    pub pass: u64,
    pub step: usize,
    pub action: String,
    pub object: String,
    #[serde(flatten)]
    pub outcome: Outcome,
    pub duration_ms: u64,
    /// The source revision the pass applied, where there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
}

/// `vessel approve`'s record: one plan's held destroys may go ahead, once, until `expires`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Approval {
    hash: String,
    created: DateTime<Utc>,
    expires: DateTime<Utc>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot use state directory {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state directory {path} is in use by another vessel{}", pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    Locked { path: PathBuf, pid: Option<u32> },
}

/// The file that marks a directory as a state directory.
pub const STATE_MARKER: &str = ".vessel-state";

pub struct StateDir {
    path: PathBuf,
}

/// Held while a reconciler drives the state directory; released on drop.
pub struct StateLock {
    _lock: Flock<File>,
}

impl StateDir {
    pub fn open(path: &Path) -> Result<StateDir, StateError> {
        let err = |source| StateError::Dir {
            path: path.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(path).map_err(err)?;
        // Marks the directory so a source tree that contains it never reads it as desired state.
        let marker = path.join(STATE_MARKER);
        if !marker.exists() {
            std::fs::write(&marker, "vessel state directory: not desired state\n").map_err(err)?;
        }
        Ok(StateDir {
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Take the lock, or say who has it.
    pub fn lock(&self) -> Result<StateLock, StateError> {
        let p = self.path.join("lock");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&p)
            .map_err(|source| StateError::Dir {
                path: p.clone(),
                source,
            })?;
        match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
            Ok(mut lock) => {
                let _ = lock.set_len(0);
                let _ = writeln!(&mut *lock, "{}", std::process::id());
                Ok(StateLock { _lock: lock })
            }
            Err(_) => {
                let pid = std::fs::read_to_string(&p)
                    .ok()
                    .and_then(|s| s.trim().parse().ok());
                Err(StateError::Locked {
                    path: self.path.clone(),
                    pid,
                })
            }
        }
    }

    /// Where approvals of held destroys wait to be taken.
    pub fn approvals_dir(&self) -> PathBuf {
        self.path.join("approvals")
    }

    /// Approve the held destroys of the plan whose approval hash is `hash`, once, until
    /// `expires` (`vessel approve`). Needs no lock: the daemon takes it on its next pass.
    pub fn approve(&self, hash: &str, expires: DateTime<Utc>) -> Result<PathBuf, StateError> {
        let dir = self.approvals_dir();
        let err = |source| StateError::Dir {
            path: dir.clone(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(err)?;
        let a = Approval {
            hash: hash.to_string(),
            created: Utc::now(),
            expires,
        };
        let bytes = serde_json::to_vec_pretty(&a).map_err(|e| err(std::io::Error::other(e)))?;
        let path = dir.join(format!("{hash}.json"));
        crate::providers::write_atomically(&path, &bytes).map_err(err)?;
        Ok(path)
    }

    /// Take the approval for `hash` if there is one that has not expired (it is used up: a
    /// later plan needs its own). Expired approvals are deleted.
    pub fn take_approval(&self, hash: &str, now: DateTime<Utc>) -> bool {
        let dir = self.approvals_dir();
        let mut taken = false;
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = e.path();
            let a: Option<Approval> = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            match a {
                Some(a) if a.expires > now && a.hash == hash => {
                    taken = std::fs::remove_file(&path).is_ok();
                }
                Some(a) if a.expires > now => {}
                _ => {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        taken
    }

    pub fn observed_path(&self) -> PathBuf {
        self.path.join("observed.json")
    }

    /// Keep the last observed snapshot (written atomically).
    pub fn write_observed(&self, o: &Observed) -> std::io::Result<()> {
        let tmp = self.path.join(".observed.json.tmp");
        let bytes = serde_json::to_vec_pretty(o).map_err(std::io::Error::other)?;
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(tmp, self.observed_path())
    }

    /// Append events to `events.jsonl`, keeping the file under about 4 MiB.
    pub fn append_events(&self, events: &[Event]) -> std::io::Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let p = self.path.join("events.jsonl");
        if std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0) > 4 << 20 {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let keep: Vec<&str> = text.lines().rev().take(5_000).collect();
            let mut kept: String = keep.into_iter().rev().collect::<Vec<_>>().join("\n");
            kept.push('\n');
            std::fs::write(&p, kept)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)?;
        let mut buf = Vec::new();
        for e in events {
            serde_json::to_writer(&mut buf, e).map_err(std::io::Error::other)?;
            buf.push(b'\n');
        }
        f.write_all(&buf)
    }
}
