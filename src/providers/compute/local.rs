//! What the providers whose sessions keep their workspace in a directory on this machine
//! (`process`, `qemu`) do the same way: make the workspace (or bring back a kept one), copy a
//! project in and save the work out (off the async threads), and keep-then-remove a session's
//! directory on destroy.

use std::path::Path;

use super::ProviderError;
use super::workspace::{copy_tree, save_atomically};

/// Make `<dir>/workspace`: the workspace kept from an earlier session of this name when
/// `restore` and there is one, else a new empty one.
pub(crate) fn make_workspace(
    dir: &Path,
    kept: &super::kept::Kept,
    restore: bool,
    session: &str,
) -> Result<(), ProviderError> {
    let k = if restore {
        kept.get(session, chrono::Utc::now())
    } else {
        None
    };
    match k {
        Some(k) => {
            std::fs::rename(k.join("workspace"), dir.join("workspace"))
                .map_err(ProviderError::io("restore the kept workspace of", session))?;
            let _ = kept.remove(session);
            tracing::info!(%session, "restored its kept workspace");
            Ok(())
        }
        None => std::fs::create_dir_all(dir.join("workspace"))
            .map_err(ProviderError::io("create", dir.display().to_string())),
    }
}

/// Copy the project at `path` into `workspace`, without the `exclude`d entries.
pub(crate) async fn sync_in(
    session: &str,
    path: &Path,
    workspace: &Path,
    exclude: &[String],
) -> Result<(), ProviderError> {
    super::no_symlinks("sync source into", session, path)?;
    let (from, to, ex) = (
        path.to_path_buf(),
        workspace.to_path_buf(),
        exclude.to_vec(),
    );
    tokio::task::spawn_blocking(move || copy_tree(&from, &to, &ex))
        .await
        .map_err(|e| ProviderError::failed("sync source into", session, e.to_string()))?
        .map_err(ProviderError::io(
            "sync source into",
            format!("{session} from {}", path.display()),
        ))
}

/// Save `workspace` over the project at `path`, atomically, keeping the project's own
/// `exclude`d entries.
pub(crate) async fn save_out(
    session: &str,
    workspace: &Path,
    path: &Path,
    exclude: &[String],
) -> Result<(), ProviderError> {
    let (from, to, ex) = (
        workspace.to_path_buf(),
        path.to_path_buf(),
        exclude.to_vec(),
    );
    tokio::task::spawn_blocking(move || save_atomically(&from, &to, &ex))
        .await
        .map_err(|e| ProviderError::failed("save work of", session, e.to_string()))?
        .map_err(ProviderError::io(
            "save work of",
            format!("{session} to {}", path.display()),
        ))
}

/// Remove a session's directory `dir` (under `root`): its workspace kept first with
/// `retain` (failing, with nothing removed, when it cannot be kept), then the directory moved
/// out of the way (so a crash mid-delete never leaves a half-deleted session that looks
/// real) and deleted.
pub(crate) async fn keep_and_remove(
    root: &Path,
    dir: &Path,
    kept: &super::kept::Kept,
    session: &str,
    retain: bool,
) -> Result<(), ProviderError> {
    let workspace = dir.join("workspace");
    if retain && workspace.is_dir() {
        let tmp = kept
            .begin(session)
            .map_err(ProviderError::io("keep the workspace of", session))?;
        let moved = std::fs::rename(&workspace, tmp.join("workspace"))
            .and_then(|()| kept.commit(session, &tmp, chrono::Utc::now()));
        if let Err(e) = moved {
            // Put it back where it was, so a later attempt finds it.
            let _ = std::fs::rename(tmp.join("workspace"), &workspace);
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(ProviderError::io("keep the workspace of", session)(e));
        }
    }
    let trash = root.join(format!(".trash-{session}-{}", std::process::id()));
    std::fs::rename(dir, &trash).map_err(ProviderError::io("destroy", session))?;
    let t = trash.clone();
    tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&t))
        .await
        .map_err(|e| ProviderError::failed("destroy", session, e.to_string()))?
        .map_err(ProviderError::io("remove", trash.display().to_string()))
}
