//! Session records, for every compute provider: a small JSON file per session holding what
//! vessel last asked of it (its `Intent`) and what was synced into it, written atomically
//! (a crash leaves the old record or the new one, never half of one). Each provider keeps its
//! own fields beside the shared ones (`Synced`, flattened, so the file format is one object).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::providers::ProviderError;

/// What vessel last asked of a session (so a session that is down against that wish reads
/// as failed, not stopped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Intent {
    Running,
    Stopped,
}

/// The source synced into a session's workspace, and where its work is saved back to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Synced {
    #[serde(default)]
    pub synced_source: Option<PathBuf>,
    /// What the last source sync left out (kept out of saves too, and kept in the target).
    #[serde(default)]
    pub exclude: Vec<String>,
    #[serde(default)]
    pub save_to: Option<PathBuf>,
}

/// Read the record at `path`: `None` when there is none.
pub(crate) fn read<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, ProviderError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            ProviderError::failed(
                "read",
                path.display().to_string(),
                format!("not a session record: {e}"),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ProviderError::io("read", path.display().to_string())(e)),
    }
}

/// Write the record at `path` atomically (a temporary file beside it, renamed over it).
pub(crate) fn write<T: Serialize>(path: &Path, r: &T) -> Result<(), ProviderError> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let bytes = serde_json::to_vec_pretty(r)
        .map_err(|e| ProviderError::failed("write", path.display().to_string(), e.to_string()))?;
    super::workspace::write_atomically(&tmp, path, &bytes)
        .map_err(ProviderError::io("write", path.display().to_string()))
}

/// `<dir>/<session>.json`: where a provider that keeps one record per session keeps it.
pub(crate) fn session_path(dir: &Path, session: &str) -> PathBuf {
    dir.join(format!("{session}.json"))
}

/// The record of `session` under `dir`; `None` when there is none or it cannot be read (a
/// session without a record reads as one vessel knows nothing more about).
pub(crate) fn read_session<T: DeserializeOwned>(dir: &Path, session: &str) -> Option<T> {
    read(&session_path(dir, session)).ok().flatten()
}

/// Remove the record of `session` under `dir` (none there is fine).
pub(crate) fn remove_session(dir: &Path, session: &str) -> Result<(), ProviderError> {
    match std::fs::remove_file(session_path(dir, session)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ProviderError::io("remove the record of", session)(e)),
    }
}
