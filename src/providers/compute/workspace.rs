//! Workspaces, for every compute provider: copying a project into a workspace and saving the work back out, honouring excludes.
//!
//! Saving is atomic: the new tree is built beside the target and swapped in with
//! `renameat2(RENAME_EXCHANGE)`, so the target is always either the old project or the new
//! one, never half written. Entries the excludes name (such as `node_modules`) are never
//! copied, and the target's own are kept.

use std::io;
use std::path::{Path, PathBuf};

use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};

/// Does `name` match a glob `pattern` (`*` any run, `?` one character)?
pub fn glob(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// Does an entry called `name` match one of the `exclude` patterns?
pub fn excluded(name: &str, exclude: &[String]) -> bool {
    exclude.iter().any(|p| glob(p, name))
}

/// Copy the tree at `from` into `to` (created if missing), overwriting files, skipping any
/// entry whose name matches `exclude` at any depth. Symlinks are copied as links.
pub fn copy_tree(from: &Path, to: &Path, exclude: &[String]) -> io::Result<()> {
    let meta = std::fs::symlink_metadata(from)?;
    if !meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a directory", from.display()),
        ));
    }
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_str().is_some_and(|n| excluded(n, exclude)) {
            continue;
        }
        let (src, dst) = (entry.path(), to.join(&name));
        let ft = entry.file_type()?;
        if ft.is_dir() {
            copy_tree(&src, &dst, exclude)?;
        } else if ft.is_symlink() {
            let target = std::fs::read_link(&src)?;
            let _ = std::fs::remove_file(&dst);
            std::os::unix::fs::symlink(target, &dst)?;
        } else if ft.is_file() {
            std::fs::copy(&src, &dst)?;
        }
    }
    Ok(())
}

/// Write `bytes` to `tmp`, flush it to disk, and rename it over `path`.
pub fn write_atomically(tmp: &Path, path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(tmp, path)
}

/// Hard-link (or copy, across file systems) the tree at `from` to `to`.
fn link_tree(from: &Path, to: &Path) -> io::Result<()> {
    let ft = std::fs::symlink_metadata(from)?.file_type();
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)?;
    }
    if ft.is_dir() {
        std::fs::create_dir_all(to)?;
        for e in std::fs::read_dir(from)? {
            let e = e?;
            link_tree(&e.path(), &to.join(e.file_name()))?;
        }
        Ok(())
    } else if ft.is_symlink() {
        std::os::unix::fs::symlink(std::fs::read_link(from)?, to)
    } else {
        std::fs::hard_link(from, to).or_else(|_| std::fs::copy(from, to).map(|_| ()))
    }
}

/// Carry the entries of `old` that `exclude` names into `new`, at the same paths.
fn keep_excluded(old: &Path, new: &Path, exclude: &[String], rel: &Path) -> io::Result<()> {
    for e in std::fs::read_dir(old.join(rel))? {
        let e = e?;
        let name = e.file_name();
        let sub = rel.join(&name);
        if name.to_str().is_some_and(|n| excluded(n, exclude)) {
            link_tree(&e.path(), &new.join(&sub))?;
        } else if e.file_type()?.is_dir() {
            keep_excluded(old, new, exclude, &sub)?;
        }
    }
    Ok(())
}

/// Replace the project at `dest` with the workspace at `from`, atomically.
pub fn save_atomically(from: &Path, dest: &Path, exclude: &[String]) -> io::Result<()> {
    let parent = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = dest
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("project");
    std::fs::create_dir_all(parent)?;
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    // What an interrupted save left beside the project (vessel killed mid-save) goes first.
    let stale = format!(".{name}.vessel-save-");
    if let Ok(rd) = std::fs::read_dir(parent) {
        for e in rd.flatten() {
            if e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(&stale))
            {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let tmp: PathBuf = parent.join(format!(
        ".{name}.vessel-save-{}-{nonce}",
        std::process::id()
    ));
    let result = (|| {
        copy_tree(from, &tmp, exclude)?;
        if dest.exists() {
            if !exclude.is_empty() {
                keep_excluded(dest, &tmp, exclude, Path::new(""))?;
            }
            renameat2(AT_FDCWD, &tmp, AT_FDCWD, dest, RenameFlags::RENAME_EXCHANGE)
                .map_err(io::Error::from)?;
        } else {
            std::fs::rename(&tmp, dest)?;
        }
        Ok(())
    })();
    // `tmp` now holds the old project (or a failed half copy): remove it either way.
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob("node_modules", "node_modules"));
        assert!(glob("*.log", "debug.log"));
        assert!(!glob("*.log", "debug.txt"));
        assert!(glob("cache-?", "cache-1"));
        assert!(glob("*", "anything"));
        assert!(!glob("node_modules", "node_modules2"));
    }

    #[test]
    fn copy_skips_excludes_and_save_keeps_the_targets_own() -> io::Result<()> {
        let t = tempfile::tempdir()?;
        let src = t.path().join("src");
        std::fs::create_dir_all(src.join("node_modules/pkg"))?;
        std::fs::create_dir_all(src.join("app"))?;
        std::fs::write(src.join("app/main.js"), "v1")?;
        std::fs::write(src.join("node_modules/pkg/index.js"), "dep")?;
        std::fs::write(src.join("debug.log"), "noise")?;
        let ws = t.path().join("ws");
        let ex = vec!["node_modules".to_string(), "*.log".to_string()];
        copy_tree(&src, &ws, &ex)?;
        assert!(ws.join("app/main.js").exists());
        assert!(!ws.join("node_modules").exists());
        assert!(!ws.join("debug.log").exists());
        // Work happens in the workspace.
        std::fs::write(ws.join("app/main.js"), "v2")?;
        std::fs::write(ws.join("app/new.js"), "new")?;
        save_atomically(&ws, &src, &ex)?;
        assert_eq!(std::fs::read_to_string(src.join("app/main.js"))?, "v2");
        assert_eq!(std::fs::read_to_string(src.join("app/new.js"))?, "new");
        // The project's own excluded entries are still there.
        assert_eq!(
            std::fs::read_to_string(src.join("node_modules/pkg/index.js"))?,
            "dep"
        );
        assert!(src.join("debug.log").exists());
        // No temporary directories are left beside it.
        let leftovers: Vec<_> = std::fs::read_dir(t.path())?
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains("vessel-save"))
            .collect();
        assert!(leftovers.is_empty());
        Ok(())
    }
}
