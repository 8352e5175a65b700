//! Workspaces kept after a destroy, for the retention time: one directory per session under a
//! compute provider's own root (`<state>/retained/<provider>/<session>/`), holding the kept
//! data (what it is is the provider's: a directory, an archive) and `kept.json` (when it was
//! kept, until when, its size). A copy is swapped in whole by a rename, so a crash leaves the
//! old copy or the new one, never half; expired copies are deleted when listed.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::model::ComputeKind;
use crate::model::observed::RetainedWorkspace;

const META: &str = "kept.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Meta {
    since: DateTime<Utc>,
    until: DateTime<Utc>,
    #[serde(default)]
    bytes: Option<u64>,
}

/// A provider's kept workspaces.
#[derive(Debug, Clone)]
pub struct Kept {
    root: PathBuf,
    provider: ComputeKind,
    retention: std::time::Duration,
}

impl Kept {
    pub fn new(root: PathBuf, provider: ComputeKind, retention: std::time::Duration) -> Kept {
        Kept {
            root,
            provider,
            retention,
        }
    }

    /// A fresh, empty directory to put a session's data in before `commit`.
    pub fn begin(&self, session: &str) -> std::io::Result<PathBuf> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        std::fs::create_dir_all(&self.root)?;
        let tmp = self.root.join(format!(
            ".new-{session}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir(&tmp)?;
        Ok(tmp)
    }

    /// Make what `begin`'s directory holds the session's kept copy (replacing an older one).
    pub fn commit(&self, session: &str, tmp: &Path, now: DateTime<Utc>) -> std::io::Result<()> {
        let meta = Meta {
            since: now,
            until: now + chrono::Duration::from_std(self.retention).unwrap_or_default(),
            bytes: Some(size_of(tmp)),
        };
        let bytes = serde_json::to_vec_pretty(&meta).map_err(std::io::Error::other)?;
        std::fs::write(tmp.join(META), bytes)?;
        let dest = self.root.join(session);
        if dest.exists() {
            let old = self
                .root
                .join(format!(".old-{session}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&old);
            std::fs::rename(&dest, &old)?;
            std::fs::rename(tmp, &dest)?;
            let _ = std::fs::remove_dir_all(&old);
            Ok(())
        } else {
            std::fs::rename(tmp, &dest)
        }
    }

    /// The session's kept copy, if there is one still within its time.
    pub fn get(&self, session: &str, now: DateTime<Utc>) -> Option<PathBuf> {
        let dir = self.root.join(session);
        let meta = read_meta(&dir)?;
        (meta.until > now).then_some(dir)
    }

    /// The copy has been restored (or is no longer wanted): delete it.
    pub fn remove(&self, session: &str) -> std::io::Result<()> {
        match std::fs::remove_dir_all(self.root.join(session)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// `list` at the current time, off the async threads.
    pub async fn list_now(&self) -> Result<Vec<(String, RetainedWorkspace)>, super::ProviderError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.list(Utc::now()))
            .await
            .map_err(|e| super::ProviderError::failed("list", "kept workspaces", e.to_string()))?
            .map_err(super::ProviderError::io("list", "kept workspaces"))
    }

    /// Every kept copy within its time; expired ones (and leftovers of interrupted keeps) are
    /// deleted.
    pub fn list(&self, now: DateTime<Utc>) -> std::io::Result<Vec<(String, RetainedWorkspace)>> {
        let rd = match std::fs::read_dir(&self.root) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        for e in rd.flatten() {
            let Some(name) = e.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let path = e.path();
            if name.starts_with('.') {
                // A keep interrupted by a crash (ours are made by this process's pid).
                if !name.contains(&format!("-{}-", std::process::id())) {
                    let _ = std::fs::remove_dir_all(&path);
                }
                continue;
            }
            match read_meta(&path) {
                Some(m) if m.until > now => out.push((
                    name,
                    RetainedWorkspace {
                        provider: self.provider,
                        since: m.since,
                        until: m.until,
                        bytes: m.bytes,
                    },
                )),
                _ => {
                    tracing::info!(session = %name, "a kept workspace is past its retention: deleted");
                    let _ = std::fs::remove_dir_all(&path);
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}

fn read_meta(dir: &Path) -> Option<Meta> {
    let bytes = std::fs::read(dir.join(META)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Bytes under `dir` (files only; links not followed).
fn size_of(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(t) if t.is_file() => total += e.metadata().map(|m| m.len()).unwrap_or(0),
                _ => {}
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_copy_is_listed_replaced_and_expires() {
        let dir = tempfile::tempdir().expect("tempdir");
        let k = Kept::new(
            dir.path().join("kept"),
            ComputeKind::Process,
            std::time::Duration::from_secs(60),
        );
        let now = Utc::now();
        let t = k.begin("alice").expect("begin");
        std::fs::write(t.join("data"), "one").expect("write");
        k.commit("alice", &t, now).expect("commit");
        let t = k.begin("alice").expect("begin");
        std::fs::write(t.join("data"), "two!").expect("write");
        k.commit("alice", &t, now).expect("commit again");
        let got = k.get("alice", now).expect("kept");
        assert_eq!(
            std::fs::read_to_string(got.join("data")).ok().as_deref(),
            Some("two!")
        );
        let listed = k.list(now).expect("list");
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].1.bytes, Some(4));
        // Past its time: not restorable, and deleted when listed.
        let later = now + chrono::Duration::seconds(61);
        assert!(k.get("alice", later).is_none());
        assert!(k.list(later).expect("list").is_empty());
        assert!(!dir.path().join("kept/alice").exists());
    }
}
