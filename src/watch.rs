//! Watching directories for changes, and only for changes: files created, written, removed,
//! renamed, or their attributes changed (a `chmod` can make a file unreadable). Never opens,
//! reads or closes after reading: the loop reads every desired-state file it loads, and those
//! reads must not wake anything (notify 8 subscribes to opens, with no way to leave them out;
//! its 9.x, which can, is a release candidate). inotify, asked for the change events alone, so
//! the kernel never queues the rest.
//!
//! Owns the inotify descriptor and the task that reads it, both gone when the `Watch` is
//! dropped. Says what changed (a path, and how); deciding what a change means is the caller's.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask, Watches};
use tokio::io::unix::AsyncFd;

/// What changes a file or a directory's entries; nothing a reader causes.
pub const CHANGES: WatchMask = WatchMask::CREATE
    .union(WatchMask::DELETE)
    .union(WatchMask::MODIFY)
    .union(WatchMask::CLOSE_WRITE)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::ATTRIB)
    .union(WatchMask::DELETE_SELF)
    .union(WatchMask::MOVE_SELF)
    .union(WatchMask::ONLYDIR);

/// How something changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Created,
    Written,
    Removed,
    /// Renamed away (the path is the old name).
    MovedAway,
    /// Renamed here (the path is the new name).
    MovedHere,
    /// Permissions, owner, times or links.
    Attributes,
    /// The kernel's queue overflowed: anything may have changed (the path is the root).
    Overflow,
    /// From now on changes may go unreported (a directory could not be watched, or the
    /// events cannot be read): anything may have changed, and only reading tells (the path is
    /// the root). Said once.
    Lost,
}

impl Change {
    /// The path holds something new (created, written or renamed to it).
    pub fn is_new_content(self) -> bool {
        matches!(self, Change::Created | Change::Written | Change::MovedHere)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot start watching (inotify)")]
    Init(#[source] std::io::Error),
    #[error("cannot watch {path}")]
    Add {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A running watch; dropping it stops it.
#[derive(Debug)]
pub struct Watch {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Watch `root` (and, if `recursive`, every directory under it, as they come and go; symlinked
/// directories are not followed, as the loader does not follow them). `on_change` is called
/// from a task of the current tokio runtime with each change. `skip` leaves out a directory
/// and what is under it (a state directory inside a source tree).
pub fn watch(
    root: &Path,
    recursive: bool,
    skip: impl Fn(&Path) -> bool + Send + 'static,
    mut on_change: impl FnMut(&Path, Change) + Send + 'static,
) -> Result<Watch, WatchError> {
    let inotify = Inotify::init().map_err(WatchError::Init)?;
    let mut dirs = Dirs {
        watches: inotify.watches(),
        paths: HashMap::new(),
        recursive,
        skip: Box::new(skip),
        incomplete: false,
    };
    let root_wd = dirs
        .watches
        .add(root, CHANGES)
        .map_err(|source| WatchError::Add {
            path: root.to_path_buf(),
            source,
        })?;
    dirs.paths.insert(root_wd, root.to_path_buf());
    if recursive {
        dirs.add_below(root);
    }
    // SAFETY: `Inotify` owns its descriptor (shared with `Watches` through an `Arc`, closed
    // only when the last of them goes) and always returns that same descriptor, so it stays
    // open and the same for as long as the `AsyncFd` holds it.
    let fd = unsafe { AsyncFd::register_with_interest(inotify, tokio::io::Interest::READABLE) }
        .map_err(|e| WatchError::Init(e.into_parts().1))?;
    let root = root.to_path_buf();
    let task = tokio::spawn(async move {
        let mut fd = fd;
        let mut buf = vec![0u8; 64 * 1024];
        let mut lost = false;
        loop {
            if dirs.incomplete && !lost {
                lost = true;
                on_change(&root, Change::Lost);
            }
            let Ok(mut ready) = fd.readable_mut().await else {
                return;
            };
            let read: Vec<(WatchDescriptor, EventMask, Option<OsString>)> = match ready
                .try_io(|i| i.get_mut().read_events(&mut buf))
            {
                Ok(Ok(events)) => events
                    .map(|e| (e.wd, e.mask, e.name.map(|n| n.to_os_string())))
                    .collect(),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, root = %root.display(), "cannot read file events; the periodic pass still reads the source");
                    if !lost {
                        on_change(&root, Change::Lost);
                    }
                    return;
                }
                Err(_would_block) => continue,
            };
            for (wd, mask, name) in read {
                if mask.contains(EventMask::Q_OVERFLOW) {
                    on_change(&root, Change::Overflow);
                    continue;
                }
                if mask.contains(EventMask::IGNORED) {
                    dirs.paths.remove(&wd);
                    continue;
                }
                let Some(dir) = dirs.paths.get(&wd) else {
                    continue;
                };
                let path = match &name {
                    Some(n) => dir.join(n),
                    None => dir.clone(),
                };
                let is_dir = mask.contains(EventMask::ISDIR);
                let change = if mask.contains(EventMask::CREATE) {
                    Change::Created
                } else if mask.intersects(EventMask::DELETE | EventMask::DELETE_SELF) {
                    Change::Removed
                } else if mask.contains(EventMask::MOVED_FROM) {
                    Change::MovedAway
                } else if mask.contains(EventMask::MOVED_TO) {
                    Change::MovedHere
                } else if mask.contains(EventMask::MOVE_SELF) {
                    // The watched directory itself moved; its own parent says where.
                    continue;
                } else if mask.contains(EventMask::ATTRIB) {
                    Change::Attributes
                } else {
                    Change::Written
                };
                if is_dir && name.is_some() {
                    match change {
                        Change::Created | Change::MovedHere => dirs.add_tree(&path),
                        Change::MovedAway => dirs.forget_tree(&path),
                        _ => {}
                    }
                }
                on_change(&path, change);
            }
        }
    });
    Ok(Watch { task })
}

/// The watched directories, by watch.
struct Dirs {
    watches: Watches,
    paths: HashMap<WatchDescriptor, PathBuf>,
    recursive: bool,
    skip: Box<dyn Fn(&Path) -> bool + Send>,
    /// A directory that exists could not be watched (the watch limit, say).
    incomplete: bool,
}

impl Dirs {
    /// Watch `dir` and, if recursive, everything under it. A directory that cannot be watched
    /// (gone already, or the watch limit reached) is left to the periodic pass.
    fn add_tree(&mut self, dir: &Path) {
        if !self.recursive || (self.skip)(dir) {
            return;
        }
        match self.watches.add(dir, CHANGES) {
            // Re-adding a directory (renamed within the tree) gives its watch back: its
            // path is updated.
            Ok(wd) => {
                self.paths.insert(wd, dir.to_path_buf());
            }
            Err(e) => {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot watch a directory; changes under it are seen by the periodic full resync");
                    self.incomplete = true;
                }
                return;
            }
        }
        self.add_below(dir);
    }

    fn add_below(&mut self, dir: &Path) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            // `file_type` does not follow symlinks: a symlinked directory is not entered.
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                self.add_tree(&e.path());
            }
        }
    }

    /// Stop watching `dir` and everything under it (renamed out of the tree, or elsewhere in
    /// it: its new name is watched anew).
    fn forget_tree(&mut self, dir: &Path) {
        let gone: Vec<WatchDescriptor> = self
            .paths
            .iter()
            .filter(|(_, p)| p.starts_with(dir))
            .map(|(wd, _)| wd.clone())
            .collect();
        for wd in gone {
            self.paths.remove(&wd);
            let _ = self.watches.remove(wd);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    type Seen = Arc<Mutex<Vec<(PathBuf, Change)>>>;

    fn start(root: &Path) -> (Watch, Seen) {
        let seen: Seen = Arc::default();
        let s = seen.clone();
        let w = watch(
            root,
            true,
            |_| false,
            move |p, c| {
                s.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((p.to_path_buf(), c))
            },
        )
        .expect("watch");
        (w, seen)
    }

    async fn settle(seen: &Seen) -> Vec<(PathBuf, Change)> {
        tokio::time::sleep(Duration::from_millis(150)).await;
        std::mem::take(&mut *seen.lock().unwrap_or_else(|e| e.into_inner()))
    }

    #[tokio::test]
    async fn reads_are_not_changes_and_every_kind_of_change_is() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::fs::create_dir_all(root.join("sub")).expect("mkdir");
        for i in 0..50 {
            std::fs::write(root.join(format!("sub/s{i}.yaml")), "kind: Session\n").expect("w");
        }
        let (_w, seen) = start(root);
        // Opening, reading, listing, stat: nothing.
        for _ in 0..3 {
            for i in 0..50 {
                let _ = std::fs::read(root.join(format!("sub/s{i}.yaml"))).expect("read");
            }
            let _ = std::fs::read_dir(root.join("sub")).expect("ls").count();
            let _ = std::fs::metadata(root.join("sub/s1.yaml")).expect("stat");
        }
        assert_eq!(settle(&seen).await, vec![], "reads are not changes");

        let p = root.join("sub/new.yaml");
        std::fs::write(&p, "x").expect("create");
        let got = settle(&seen).await;
        assert!(got.contains(&(p.clone(), Change::Created)), "{got:?}");
        std::fs::write(&p, "y").expect("modify");
        let got = settle(&seen).await;
        assert!(got.contains(&(p.clone(), Change::Written)), "{got:?}");
        let q = root.join("sub/moved.yaml");
        std::fs::rename(&p, &q).expect("rename");
        let got = settle(&seen).await;
        assert!(got.contains(&(p.clone(), Change::MovedAway)), "{got:?}");
        assert!(got.contains(&(q.clone(), Change::MovedHere)), "{got:?}");
        std::fs::remove_file(&q).expect("rm");
        assert!(settle(&seen).await.contains(&(q.clone(), Change::Removed)));

        // A directory made later is watched, and so is one renamed within the tree.
        std::fs::create_dir_all(root.join("later")).expect("mkdir");
        let _ = settle(&seen).await;
        let r = root.join("later/r.yaml");
        std::fs::write(&r, "x").expect("write");
        assert!(settle(&seen).await.contains(&(r, Change::Created)));
        std::fs::rename(root.join("later"), root.join("renamed")).expect("mv");
        let _ = settle(&seen).await;
        let r = root.join("renamed/r2.yaml");
        std::fs::write(&r, "x").expect("write");
        assert!(settle(&seen).await.contains(&(r, Change::Created)));
    }
}
