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
use crate::model::observed::Observed;

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

/// `events.jsonl` is trimmed when it grows past this many bytes...
pub const EVENTS_MAX_BYTES: u64 = 4 << 20;
/// ...to its last this many events.
pub const EVENTS_KEEP: usize = 5_000;

/// The file that marks a directory as a state directory.
pub const STATE_MARKER: &str = ".vessel-state";

pub struct StateDir {
    path: PathBuf,
    /// The digest of the observed snapshot last written: the same snapshot is not written
    /// again.
    observed_digest: std::sync::Mutex<Option<[u8; 32]>>,
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
            observed_digest: std::sync::Mutex::new(None),
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

    /// The last observed snapshot kept, if there is one that reads.
    pub fn read_observed(&self) -> Option<Observed> {
        let bytes = std::fs::read(self.observed_path()).ok()?;
        match serde_json::from_slice(&bytes) {
            Ok(o) => Some(o),
            Err(e) => {
                tracing::warn!(error = %e, "the kept observed snapshot does not read; ignored");
                None
            }
        }
    }

    /// Keep the last observed snapshot (written atomically); not written again when it is
    /// the one written last (a converged loop writes nothing).
    pub fn write_observed(&self, o: &Observed) -> std::io::Result<()> {
        use sha2::{Digest, Sha256};
        let bytes = serde_json::to_vec_pretty(o).map_err(std::io::Error::other)?;
        let digest: [u8; 32] = Sha256::digest(&bytes).into();
        let mut last = crate::lock_or_reset(&self.observed_digest);
        if *last == Some(digest) && self.observed_path().exists() {
            return Ok(());
        }
        let tmp = self.path.join(".observed.json.tmp");
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(tmp, self.observed_path())?;
        *last = Some(digest);
        Ok(())
    }

    /// Append events to `events.jsonl`. Past `EVENTS_MAX_BYTES` the file is replaced, never
    /// rewritten in place: its last `EVENTS_KEEP` events plus the new ones go to a temporary
    /// file, which is synced and renamed over it, so a reader sees the old file or the new one,
    /// never a truncated or half-written one.
    pub fn append_events(&self, events: &[Event]) -> std::io::Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let p = self.path.join("events.jsonl");
        let mut buf = Vec::new();
        for e in events {
            serde_json::to_writer(&mut buf, e).map_err(std::io::Error::other)?;
            buf.push(b'\n');
        }
        let len = match std::fs::metadata(&p) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        if len > EVENTS_MAX_BYTES {
            return self.replace_events(&p, &buf);
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)?;
        f.write_all(&buf)
    }

    /// Replace `events.jsonl` atomically with its last `EVENTS_KEEP` complete lines and `new`.
    fn replace_events(&self, path: &Path, new: &[u8]) -> std::io::Result<()> {
        let old = std::fs::read(path)?;
        // Complete lines only: a crash mid-append can leave a torn last line.
        let complete = &old[..old.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1)];
        let mut start = complete.len();
        let mut kept = 0;
        while kept < EVENTS_KEEP && start > 0 {
            start = complete[..start - 1]
                .iter()
                .rposition(|b| *b == b'\n')
                .map_or(0, |i| i + 1);
            kept += 1;
        }
        let tmp = self.path.join(".events.jsonl.tmp");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(&complete[start..])?;
        f.write_all(new)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        // The rename itself is durable once the directory is synced.
        File::open(&self.path)?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(pass: u64, step: usize) -> Event {
        Event {
            time: DateTime::<Utc>::UNIX_EPOCH,
            pass,
            step,
            action: "create".into(),
            object: format!("session/user-{step}"),
            outcome: Outcome::Failed {
                error: "x".repeat(1000),
            },
            duration_ms: 1,
            revision: None,
        }
    }

    /// The observed snapshot is written when it changed, and only then (a converged loop
    /// rewrites nothing); removed by hand, it is written again.
    #[test]
    fn the_observed_snapshot_is_written_only_when_it_changed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = StateDir::open(dir.path()).expect("open");
        let ino = || {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(s.observed_path()).map(|m| m.ino()).ok()
        };
        let mut o = Observed::default();
        s.write_observed(&o).expect("write");
        let first = ino().expect("written");
        s.write_observed(&o).expect("write");
        assert_eq!(ino(), Some(first), "the same snapshot was written again");
        o.gaps.insert(
            crate::model::observed::ProviderId::Proxy,
            "unreachable".into(),
        );
        s.write_observed(&o).expect("write");
        let second = ino().expect("written");
        assert_ne!(second, first, "a changed snapshot was not written");
        assert_eq!(s.read_observed(), Some(o.clone()));
        std::fs::remove_file(s.observed_path()).expect("rm");
        s.write_observed(&o).expect("write");
        assert!(ino().is_some(), "a removed snapshot is written again");
    }

    /// A reader polling `events.jsonl` while passes append and trim it never sees a torn file:
    /// every complete line is an event, and once it held the trimmed length it never holds
    /// fewer lines (a rewrite in place shows an empty or half-written file).
    #[test]
    fn a_reader_never_sees_a_torn_events_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateDir::open(dir.path()).expect("state dir");
        let path = dir.path().join("events.jsonl");
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            let reader = s.spawn(|| {
                let (mut reads, mut most) = (0usize, 0usize);
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    let Ok(text) = std::fs::read_to_string(&path) else {
                        assert_eq!(most, 0, "the file vanished");
                        continue;
                    };
                    // An append in progress may show an unterminated last line.
                    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
                    let lines = complete.lines().count();
                    // A torn file shows at its ends.
                    for l in [complete.lines().next(), complete.lines().last()] {
                        let l = l.unwrap_or_default();
                        assert!(
                            l.is_empty() || serde_json::from_str::<Event>(l).is_ok(),
                            "torn line {l:?}"
                        );
                    }
                    assert!(lines >= most.min(EVENTS_KEEP), "{lines} lines after {most}");
                    most = most.max(lines);
                    reads += 1;
                }
                (reads, most)
            });
            // Events of about 1 kB: past the first trim, every pass replaces the file.
            for pass in 0..80 {
                let batch: Vec<Event> = (0..100).map(|i| event(pass, i)).collect();
                state.append_events(&batch).expect("append");
            }
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            let (reads, most) = reader.join().expect("reader");
            assert!(reads > 10, "{reads} reads");
            assert!(most >= EVENTS_KEEP);
        });
        let size = std::fs::metadata(&path).expect("events").len();
        assert!(size <= 6 << 20, "{size} bytes");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().contains("tmp"))
            .collect();
        assert!(leftovers.is_empty(), "no temporary file is left behind");
    }
}
