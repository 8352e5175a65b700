//! Tar archives for moving a project into a container and its work back out: a project
//! packed without its excluded entries (`node_modules`), and a downloaded workspace unpacked
//! where nothing in it can write outside the target directory.

use std::io;
use std::path::Path;

use crate::providers::compute::workspace::excluded;

/// Pack the tree at `from` under `prefix` (the container's workspace path without its leading
/// `/`, so the archive is unpacked at `/`), leaving out entries `exclude` names at any depth.
/// The workspace's parent directories get entries too, so it is made if missing. Symlinks are
/// stored as links, never followed.
pub fn pack(from: &Path, prefix: &str, exclude: &[String]) -> io::Result<Vec<u8>> {
    let meta = std::fs::symlink_metadata(from)?;
    if !meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a directory", from.display()),
        ));
    }
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    let prefix = prefix.trim_matches('/');
    let mut acc = String::new();
    for part in prefix.split('/').filter(|p| !p.is_empty()) {
        if !acc.is_empty() {
            acc.push('/');
        }
        acc.push_str(part);
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        h.set_mtime(meta_mtime(&meta));
        b.append_data(&mut h, format!("{acc}/"), io::empty())?;
    }
    walk(&mut b, from, Path::new(prefix), exclude)?;
    b.into_inner()
}

fn meta_mtime(m: &std::fs::Metadata) -> u64 {
    m.modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn walk(
    b: &mut tar::Builder<Vec<u8>>,
    dir: &Path,
    at: &Path,
    exclude: &[String],
) -> io::Result<()> {
    let mut entries: Vec<std::fs::DirEntry> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name();
        if name.to_str().is_some_and(|n| excluded(n, exclude)) {
            continue;
        }
        let (path, inside) = (e.path(), at.join(&name));
        let ft = e.file_type()?;
        if ft.is_dir() {
            b.append_path_with_name(&path, &inside)?;
            walk(b, &path, &inside, exclude)?;
        } else if ft.is_file() || ft.is_symlink() {
            b.append_path_with_name(&path, &inside)?;
        }
    }
    Ok(())
}

/// Unpack `archive` into `into` (which must exist). The tar crate refuses entries that would
/// land outside `into` (`..`, absolute paths, writes through links); permissions beyond the
/// plain mode bits and ownership are not restored.
pub fn unpack(archive: &[u8], into: &Path) -> io::Result<()> {
    let mut a = tar::Archive::new(archive);
    a.set_preserve_permissions(false);
    a.set_preserve_ownerships(false);
    a.set_unpack_xattrs(false);
    a.set_overwrite(true);
    a.unpack(into)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_under_the_workspace_without_excludes_and_unpacks_back() -> io::Result<()> {
        let t = tempfile::tempdir()?;
        let src = t.path().join("src");
        std::fs::create_dir_all(src.join("node_modules/pkg"))?;
        std::fs::create_dir_all(src.join("app/node_modules"))?;
        std::fs::write(src.join("app/main.js"), "v1")?;
        std::fs::write(src.join("app/node_modules/x.js"), "dep")?;
        std::fs::write(src.join("node_modules/pkg/index.js"), "dep")?;
        std::os::unix::fs::symlink("/etc/passwd", src.join("link"))?;
        let tar = pack(&src, "/home/dev/workspace", &["node_modules".to_string()])?;
        let names: Vec<String> = tar::Archive::new(tar.as_slice())
            .entries()?
            .map(|e| e.and_then(|e| Ok(e.path()?.display().to_string())))
            .collect::<Result<_, _>>()?;
        assert_eq!(
            names,
            [
                "home/",
                "home/dev/",
                "home/dev/workspace/",
                "home/dev/workspace/app",
                "home/dev/workspace/app/main.js",
                "home/dev/workspace/link",
            ]
        );
        let out = t.path().join("out");
        std::fs::create_dir_all(&out)?;
        unpack(&tar, &out)?;
        assert_eq!(
            std::fs::read_to_string(out.join("home/dev/workspace/app/main.js"))?,
            "v1"
        );
        assert!(
            std::fs::symlink_metadata(out.join("home/dev/workspace/link"))?
                .file_type()
                .is_symlink()
        );
        Ok(())
    }

    #[test]
    fn an_archive_cannot_write_outside_its_target() -> io::Result<()> {
        let t = tempfile::tempdir()?;
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(4);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        // `append_data` refuses `..` itself, so the name is written raw.
        h.as_old_mut().name[..12].copy_from_slice(b"../escape.tx");
        h.set_cksum();
        b.append(&h, "evil".as_bytes())?;
        let tar = b.into_inner()?;
        let into = t.path().join("into");
        std::fs::create_dir_all(&into)?;
        let _ = unpack(&tar, &into);
        assert!(!t.path().join("escape.tx").exists());
        Ok(())
    }
}

/// Rewrite the engine's archive of a workspace so every entry is under `base` (the workspace
/// directory's own name), as a running container's archive is. Podman gives the directory's
/// contents at the root (`/a.txt`) for a container that is not running; restoring that into
/// the workspace's parent would scatter the work. Streams from file to file.
pub fn normalize(src: &Path, dst: &Path, base: &str) -> io::Result<()> {
    let mut a = tar::Archive::new(io::BufReader::new(std::fs::File::open(src)?));
    let mut b = tar::Builder::new(io::BufWriter::new(std::fs::File::create(dst)?));
    for entry in a.entries()? {
        let mut entry = entry?;
        let path = under_base(&entry.path()?, base);
        let mut header = entry.header().clone();
        match entry.link_name()?.map(|l| l.into_owned()) {
            Some(target) if header.entry_type().is_symlink() => {
                b.append_link(&mut header, &path, &target)?;
            }
            // A hard link names another entry by its path: moved under `base` too.
            Some(target) if header.entry_type().is_hard_link() => {
                b.append_link(&mut header, &path, under_base(&target, base))?;
            }
            _ => b.append_data(&mut header, &path, &mut entry)?,
        }
    }
    b.into_inner()?
        .into_inner()
        .map_err(|e| e.into_error())?
        .sync_all()
}

/// `p` as a relative path under `base` (left as it is when it is under `base` already).
fn under_base(p: &Path, base: &str) -> std::path::PathBuf {
    let rel: std::path::PathBuf = p
        .components()
        .filter(|c| matches!(c, std::path::Component::Normal(_)))
        .collect();
    match rel.components().next() {
        Some(std::path::Component::Normal(first)) if first == base => rel,
        None => std::path::PathBuf::from(base),
        _ => Path::new(base).join(rel),
    }
}

#[cfg(test)]
mod normalize_tests {
    use super::*;

    /// An archive with these raw names (Podman's `/a.txt` included, which `append_data`
    /// refuses); names ending in `/` are directories.
    fn archive(entries: &[(&str, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, body) in entries {
            let mut h = tar::Header::new_gnu();
            let dir = name.ends_with('/');
            h.set_entry_type(if dir {
                tar::EntryType::Directory
            } else {
                tar::EntryType::Regular
            });
            h.set_size(body.len() as u64);
            h.set_mode(if dir { 0o755 } else { 0o644 });
            if let Some(g) = h.as_gnu_mut() {
                g.name[..name.len()].copy_from_slice(name.as_bytes());
            }
            h.set_cksum();
            b.append(&h, body.as_bytes()).expect("entry");
        }
        b.into_inner().expect("tar")
    }

    fn names(path: &Path) -> Vec<String> {
        let mut a = tar::Archive::new(std::fs::File::open(path).expect("open"));
        a.entries()
            .expect("entries")
            .map(|e| {
                e.expect("entry")
                    .path()
                    .expect("path")
                    .display()
                    .to_string()
            })
            .collect()
    }

    #[test]
    fn contents_at_the_root_move_under_the_workspace_and_good_archives_stay() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (src, dst) = (dir.path().join("a.tar"), dir.path().join("b.tar"));
        std::fs::write(
            &src,
            archive(&[("/", ""), ("/a.txt", "hi"), ("/d/", ""), ("/d/b", "x")]),
        )
        .expect("write");
        normalize(&src, &dst, "workspace").expect("normalize");
        assert_eq!(
            names(&dst),
            [
                "workspace",
                "workspace/a.txt",
                "workspace/d",
                "workspace/d/b"
            ]
        );
        std::fs::write(
            &src,
            archive(&[("workspace/", ""), ("workspace/a.txt", "hi")]),
        )
        .expect("write");
        normalize(&src, &dst, "workspace").expect("normalize");
        assert_eq!(names(&dst), ["workspace", "workspace/a.txt"]);
    }
}
