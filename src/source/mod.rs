//! Where desired state comes from: a directory on disk, or a revision of a git repository.
//! Reads only; never writes to a working tree. `load` is the one way every command and the
//! daemon get a `Desired`.

pub mod git;
pub mod transport;

use chrono::{DateTime, Utc};

use crate::config::{Config, SourceConfig};
use crate::desired::Desired;
use crate::load::{LoadCache, LoadError, load_entries_cached, load_tree_cached};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Git(#[from] git::GitError),
    #[error("{0}, and no earlier commit verifies with today's allowed signers: nothing is applied")]
    Unverified(git::VerifyError),
    #[error("nothing has been fetched from {url} yet: {fetch}")]
    NeverFetched {
        url: String,
        fetch: String,
        #[source]
        source: git::GitError,
    },
}

/// Load the configured source. For git: fetch (within a time limit), then read the tree of
/// the ref's commit; when the fetch fails, the last fetched commit is used and
/// `Desired::source_error` says why.
pub fn load(config: &Config, now: DateTime<Utc>) -> Result<Desired, SourceError> {
    load_cached(config, now, &mut LoadCache::default())
}

/// `load`, reading and parsing again only the files that changed since the load that left
/// `cache` (the loop keeps one from pass to pass). The result is the one `load` gives.
pub fn load_cached(
    config: &Config,
    now: DateTime<Utc>,
    cache: &mut LoadCache,
) -> Result<Desired, SourceError> {
    let mut d = load_source(config, now, cache)?;
    d.missing_sources = d
        .sessions
        .iter()
        .filter_map(|(n, s)| {
            let p = &s.spec.source.as_ref()?.path;
            (!p.is_dir()).then(|| (n.clone(), p.clone()))
        })
        .collect();
    Ok(d)
}

fn load_source(
    config: &Config,
    now: DateTime<Utc>,
    cache: &mut LoadCache,
) -> Result<Desired, SourceError> {
    match &config.source {
        SourceConfig::Dir(d) => Ok(load_tree_cached(d, config, now, cache)?),
        SourceConfig::Git(g) => {
            let dir = config.state_dir.join("git");
            let fetched = git::fetch_with_timeout(&dir, g);
            let mirror = git::Mirror::open(&dir, g)?;
            let head = match (mirror.head(), &fetched) {
                (Ok(id), _) => id,
                (Err(e), Err(f)) => {
                    return Err(SourceError::NeverFetched {
                        url: g.url.clone(),
                        fetch: crate::error_chain(f),
                        source: e,
                    });
                }
                (Err(e), Ok(())) => return Err(e.into()),
            };
            let mut notes: Vec<String> = Vec::new();
            if let Err(f) = &fetched {
                notes.push(format!(
                    "{}; using the last fetched revision",
                    crate::error_chain(f)
                ));
            }
            // With verification on, an unverified commit is not applied: the last verified one
            // is, and the note says why.
            let id = match &g.verify {
                None => head,
                Some(v) => match mirror.verify(head, &v.allowed_signers, &dir.join("scratch")) {
                    Ok(_) => head,
                    // The fallback is checked again against today's signers: a revoked key's
                    // last commit is not kept applied.
                    Err(why) => match mirror.last_verified().filter(|last| {
                        mirror
                            .verify(*last, &v.allowed_signers, &dir.join("scratch"))
                            .is_ok()
                    }) {
                        Some(last) => {
                            notes.push(format!(
                                "{}: not applied; applying the last verified revision {}",
                                crate::error_chain(&why),
                                &last.to_string()[..12]
                            ));
                            last
                        }
                        None => return Err(SourceError::Unverified(why)),
                    },
                },
            };
            let (revision, files) = mirror.entries_at(id)?;
            let display = std::path::Path::new(&g.path);
            let mut d = load_entries_cached(display, files, config, now, cache);
            d.commit = Some(revision.id.clone());
            d.revision = Some(format!(
                "{} {}",
                &revision.id[..revision.id.len().min(12)],
                revision.summary
            ));
            d.source_error = (!notes.is_empty()).then(|| notes.join("; "));
            Ok(d)
        }
    }
}
