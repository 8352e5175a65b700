//! Reading a desired-state tree out of a git commit (not a working tree someone could edit).

use std::path::{Path, PathBuf};

use git2::{ObjectType, Repository, TreeWalkMode, TreeWalkResult};

use crate::load::{Entries, MAX_FILE_BYTES, is_desired_name};

#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("{path} is not inside a git repository")]
    NotARepo {
        path: PathBuf,
        #[source]
        source: git2::Error,
    },
    #[error("the repository at {0} has no working tree")]
    Bare(PathBuf),
    #[error("{path} is outside the repository's working tree {workdir}")]
    Outside { path: PathBuf, workdir: PathBuf },
    #[error("cannot resolve git revision `{rev}`")]
    Revision {
        rev: String,
        #[source]
        source: git2::Error,
    },
    #[error("cannot read the tree of `{rev}`")]
    Tree {
        rev: String,
        #[source]
        source: git2::Error,
    },
}

/// A commit's identity, for plans, status and events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revision {
    pub id: String,
    pub summary: String,
}

/// The files of the desired-state tree at `dir` as of revision `rev` of the repository that
/// contains `dir`: `(path relative to dir, bytes or why not)`. A directory absent at `rev`
/// gives no files.
pub fn tree_at(dir: &Path, rev: &str) -> Result<(Revision, Entries), GitError> {
    let repo = Repository::discover(dir).map_err(|source| GitError::NotARepo {
        path: dir.to_path_buf(),
        source,
    })?;
    let workdir = repo
        .workdir()
        .ok_or_else(|| GitError::Bare(dir.to_path_buf()))?;
    let canon = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    let (wd, d) = (canon(workdir), canon(dir));
    let rel = d
        .strip_prefix(&wd)
        .map_err(|_| GitError::Outside {
            path: d.clone(),
            workdir: wd.clone(),
        })?
        .to_path_buf();
    let commit = repo
        .revparse_single(rev)
        .and_then(|o| o.peel_to_commit())
        .map_err(|source| GitError::Revision {
            rev: rev.to_string(),
            source,
        })?;
    let revision = Revision {
        id: commit.id().to_string(),
        summary: commit
            .summary()
            .ok()
            .flatten()
            .unwrap_or_default()
            .to_string(),
    };
    let tree = commit.tree().map_err(|source| GitError::Tree {
        rev: rev.to_string(),
        source,
    })?;
    let sub = if rel.as_os_str().is_empty() {
        Some(tree)
    } else {
        match tree.get_path(&rel) {
            Ok(entry) if entry.kind() == Some(ObjectType::Tree) => Some(
                entry
                    .to_object(&repo)
                    .and_then(|o| o.peel_to_tree())
                    .map_err(|source| GitError::Tree {
                        rev: rev.to_string(),
                        source,
                    })?,
            ),
            _ => None,
        }
    };
    let mut files = Vec::new();
    if let Some(sub) = sub {
        sub.walk(TreeWalkMode::PreOrder, |root, entry| {
            let name = entry.name().unwrap_or("");
            let is_dir = entry.kind() == Some(ObjectType::Tree);
            if !is_desired_name(name, is_dir) {
                return if is_dir {
                    TreeWalkResult::Skip
                } else {
                    TreeWalkResult::Ok
                };
            }
            if is_dir || entry.kind() != Some(ObjectType::Blob) {
                return TreeWalkResult::Ok;
            }
            let path = PathBuf::from(root).join(name);
            let bytes = match repo.find_blob(entry.id()) {
                Ok(b) if b.size() as u64 > MAX_FILE_BYTES => Err(format!(
                    "file is {} bytes, over the {} MiB limit for one desired-state file; split it",
                    b.size(),
                    MAX_FILE_BYTES >> 20
                )),
                Ok(b) => Ok(b.content().to_vec()),
                Err(e) => Err(format!("cannot read blob {}: {}", entry.id(), e.message())),
            };
            files.push((path, bytes));
            TreeWalkResult::Ok
        })
        .map_err(|source| GitError::Tree {
            rev: rev.to_string(),
            source,
        })?;
    }
    Ok((revision, files))
}
