//! What one load keeps for the next: each file as parsed and checked alone, with what tells
//! that it has not changed since (its identity on disk, or a git blob id, and the digest of its
//! bytes). A load given the cache reads only the files whose identity changed, parses only
//! those whose bytes changed, and runs the checks across files over everything again: its
//! result is the one a load from nothing would give (a test compares them over random edits).
//!
//! Nothing is kept for a file that could not be read, nor for one whose parse depended on what
//! the files before it took of the load's budget; entries are kept only for the files the last
//! load saw, and all of them are dropped when the root or the config changes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::config::Config;
use crate::diag::Diagnostic;

use super::{LoadBudget, LoadedFile, yaml};

/// A file whose modification or change time is less than this before the moment it was read
/// is read again (and its digest compared) at the next load, even if nothing about it seems
/// to have changed: a write in the same tick of the file system's clock as the read before it
/// would leave size and times as they were (git's "racily clean" entries). Two seconds covers
/// the coarsest clocks of the file systems in use (FAT's is two seconds).
pub const RACY: Duration = Duration::from_secs(2);

/// The files of the last load, as parsed and checked alone. `Default` is empty: a load with an
/// empty cache is a full load.
#[derive(Debug, Default)]
pub struct LoadCache {
    /// The root (as diagnostics show it) and the config the entries were made under.
    under: Option<(PathBuf, Config)>,
    files: BTreeMap<PathBuf, Cached>,
    last: LoadStats,
}

/// What the last load did, file by file.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LoadStats {
    /// Files in the tree.
    pub files: usize,
    /// Files whose bytes were read (or an attempt made).
    pub read: usize,
    /// Files parsed (the rest were taken from the cache).
    pub parsed: usize,
}

impl LoadCache {
    /// What the last load did.
    pub fn last(&self) -> LoadStats {
        self.last
    }

    /// How many files the cache holds (never more than the last load saw).
    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Start a load of the tree shown as `root` under `config`: what was kept under another
    /// root or config is dropped.
    pub(super) fn begin<'a>(&'a mut self, root: &Path, config: &'a Config) -> Pass<'a> {
        let same = self
            .under
            .as_ref()
            .is_some_and(|(r, c)| r == root && c == config);
        if !same {
            self.files.clear();
            self.under = Some((root.to_path_buf(), config.clone()));
        }
        let old = std::mem::take(&mut self.files);
        Pass {
            old,
            cache: self,
            config,
            budget: LoadBudget::new(config.load),
            files: Vec::new(),
            notes: Vec::new(),
            stats: LoadStats::default(),
        }
    }
}

/// One file as the last load left it.
#[derive(Debug)]
struct Cached {
    /// What tells, without reading it, that the file is the one read.
    id: Identity,
    /// The digest of its bytes.
    digest: [u8; 32],
    /// Its size as read.
    size: u64,
    scan: Scan,
    /// Parsed and checked alone (`validate::check_file`).
    file: LoadedFile,
    warnings: Vec<Diagnostic>,
}

/// How an unchanged file is known without reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Identity {
    /// Nothing: the file is read and its digest compared.
    Unknown,
    /// A file on disk: trusted only when its times were older than `RACY` when it was read.
    Stat { stamp: Stamp, trusted: bool },
    /// An id that changes whenever the content does (a git blob id).
    Content(Box<[u8]>),
}

/// A file's identity on disk: device, inode, size, and modification and change times (the
/// change time moves with every write, and nobody can set it back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    /// A regular file's stamp (None for anything else).
    pub(super) fn of(meta: &std::fs::Metadata) -> Option<Stamp> {
        use std::os::unix::fs::MetadataExt;
        meta.is_file().then(|| Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        })
    }

    /// The identity of a file with this stamp read at `read_at`.
    pub(super) fn identity(self, read_at: SystemTime) -> Identity {
        let secs = |(s, ns): (i64, i64)| s as f64 + ns as f64 / 1e9;
        let newest = secs(self.mtime).max(secs(self.ctime));
        let read = read_at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        Identity::Stat {
            stamp: self,
            trusted: newest + RACY.as_secs_f64() < read,
        }
    }
}

/// What parsing a file took of the load's node budget, which decides whether its result can be
/// taken again at another place in the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Scan {
    /// Never parsed (not text): takes nothing, whatever the budget.
    None,
    /// Parsed in this many YAML nodes: the same wherever at least these many are left.
    Done(u64),
    /// Failed under the full per-file limit: the same wherever that limit applies.
    Failed,
    /// Failed under a limit the budget lowered: its message names the budget, so it is not
    /// kept.
    Budget,
}

impl Scan {
    fn fits(self, budget: &LoadBudget) -> bool {
        match self {
            Scan::None => true,
            Scan::Done(n) => budget.nodes_left() as u64 >= n,
            Scan::Failed => budget.nodes_left() == yaml::MAX_EVENTS,
            Scan::Budget => false,
        }
    }
}

/// One load in progress: the files in path order, each taken from the cache or made anew.
pub(super) struct Pass<'a> {
    old: BTreeMap<PathBuf, Cached>,
    cache: &'a mut LoadCache,
    pub(super) config: &'a Config,
    pub(super) budget: LoadBudget,
    files: Vec<LoadedFile>,
    notes: Vec<Vec<Diagnostic>>,
    stats: LoadStats,
}

impl Pass<'_> {
    /// The cached entry of `rel` if `id` says it is the file read last time and the budget
    /// lets its parse stand: admitted (by its size) and added, and true; false if the file
    /// must be read (the entry, if any, stays for the digest to be compared).
    pub(super) fn reuse_by_identity(&mut self, rel: &Path, id: &Identity) -> bool {
        let Some(c) = self.old.get(rel) else {
            return false;
        };
        let same = match (&c.id, id) {
            (Identity::Stat { stamp, trusted }, Identity::Stat { stamp: now, .. }) => {
                *trusted && stamp == now
            }
            (Identity::Content(a), Identity::Content(b)) => a == b,
            _ => false,
        };
        if !same || !c.scan.fits(&self.budget) {
            return false;
        }
        // Admitted as a read of the same size would be; a file the budget refuses is read
        // (and refused) the usual way.
        let Ok(_) = self.budget.admit(c.size) else {
            return false;
        };
        let Some(c) = self.old.remove(rel) else {
            return false;
        };
        self.take(rel, c);
        true
    }

    /// A file whose bytes were read (or could not be): taken from the cache when its digest
    /// is the one kept, parsed and checked otherwise.
    pub(super) fn read(
        &mut self,
        rel: &Path,
        display: &Path,
        bytes: Result<Vec<u8>, super::ReadError>,
        id: Identity,
    ) {
        use sha2::{Digest, Sha256};
        self.stats.read += 1;
        let old = self.old.remove(rel);
        let bytes = match bytes {
            Ok(b) => b,
            Err(e) => {
                let mut lf = super::unreadable(display, rel, e);
                let warnings = super::validate::check_file(&mut lf, self.config);
                self.push(lf, warnings);
                return;
            }
        };
        let digest: [u8; 32] = Sha256::digest(&bytes).into();
        let size = bytes.len() as u64;
        if let Some(mut c) = old
            && c.digest == digest
            && c.scan.fits(&self.budget)
        {
            c.id = id;
            c.size = size;
            self.take(rel, c);
            return;
        }
        self.stats.parsed += 1;
        let (mut file, scan) = super::parse_bytes(display, rel, bytes, digest, &mut self.budget);
        let warnings = super::validate::check_file(&mut file, self.config);
        if scan != Scan::Budget {
            self.push(file.clone(), warnings.clone());
            self.cache.files.insert(
                rel.to_path_buf(),
                Cached {
                    id,
                    digest,
                    size,
                    scan,
                    file,
                    warnings,
                },
            );
        } else {
            self.push(file, warnings);
        }
    }

    /// Take a cached file into this load (its nodes counted against the budget) and keep it.
    fn take(&mut self, rel: &Path, c: Cached) {
        if let Scan::Done(n) = c.scan {
            self.budget.nodes += n;
        }
        self.push(c.file.clone(), c.warnings.clone());
        self.cache.files.insert(rel.to_path_buf(), c);
    }

    fn push(&mut self, file: LoadedFile, warnings: Vec<Diagnostic>) {
        self.files.push(file);
        self.notes.push(warnings);
    }

    /// The checks across files over everything, and the result. Entries of files this load
    /// did not see are gone.
    pub(super) fn finish(mut self, now: chrono::DateTime<chrono::Utc>) -> crate::desired::Desired {
        let warnings = super::validate::check_across_files(
            &mut self.files,
            std::mem::take(&mut self.notes),
            self.config,
            now,
        );
        self.stats.files = self.files.len();
        self.cache.last = self.stats;
        super::assemble(self.files, warnings)
    }
}
