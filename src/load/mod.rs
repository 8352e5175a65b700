//! Loading a desired-state tree: find the files, read them within limits, parse every document,
//! validate across files, and return the valid objects plus the quarantined files.
//!
//! Reads files; never writes. Problems are data (diagnostics on quarantined files), never
//! panics: a broken file only quarantines itself and the objects that depend on it.

pub mod cache;
pub mod validate;
pub mod yaml;

pub use cache::{LoadCache, LoadStats};

use std::io::Read;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};

use crate::config::{Config, LoadLimits};
use crate::desired::{Desired, Doc, Held, Quarantine};
use crate::diag::{Diagnostic, Pos, SourceLines, attach_snippets, did_you_mean};
use crate::model::Size;
use crate::model::{Kind, PlanSpec, RouteSpec, SessionSpec};

/// The default limit on one file (`load.max_file_bytes`); larger files are refused unread.
pub const MAX_FILE_BYTES: u64 = 4 << 20;

/// At most this many errors of one file are kept; the rest are counted in one last diagnostic.
pub const MAX_ERRORS_PER_FILE: usize = 100;

/// A parsed document of any kind.
#[derive(Debug, Clone)]
pub enum Document {
    Plan(Doc<PlanSpec>),
    Session(Doc<SessionSpec>),
    Route(Doc<RouteSpec>),
}

impl Document {
    pub fn kind(&self) -> Kind {
        match self {
            Document::Plan(_) => Kind::Plan,
            Document::Session(_) => Kind::Session,
            Document::Route(_) => Kind::Route,
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Document::Plan(d) => &d.spec.name,
            Document::Session(d) => &d.spec.name,
            Document::Route(d) => &d.spec.name,
        }
    }

    /// The lines the object and its fields are on.
    fn lines(&self) -> impl Iterator<Item = u32> + '_ {
        let (pos, fields) = match self {
            Document::Plan(d) => (d.pos, &d.fields),
            Document::Session(d) => (d.pos, &d.fields),
            Document::Route(d) => (d.pos, &d.fields),
        };
        std::iter::once(pos.line).chain(fields.values().map(|p| p.line))
    }
}

/// One file as read and parsed, before cross-file validation.
#[derive(Debug, Clone)]
pub struct LoadedFile {
    /// Relative to the tree's root.
    pub rel: PathBuf,
    /// As diagnostics show it (the root as given, joined with `rel`).
    pub display: PathBuf,
    /// The lines the objects' fields are on (for the snippets of later diagnostics): the text
    /// itself is not kept once the file is parsed.
    pub lines: SourceLines,
    /// A hash of the file's bytes (for the revision of a directory source).
    pub digest: [u8; 32],
    pub objects: Vec<Document>,
    pub errors: Vec<Diagnostic>,
    /// Kind and name of every document that had them, even ones that failed to parse.
    pub held: Vec<Held>,
    /// `held` names every object in the file (see `Quarantine::complete`).
    pub complete: bool,
}

impl LoadedFile {
    /// A diagnostic in this file, with its source line attached.
    pub fn error(&self, code: &'static str, pos: Pos, message: impl Into<String>) -> Diagnostic {
        Diagnostic::error(code, &self.display, pos, message).with_lines(&self.lines)
    }
}

/// Why a file was not read. It becomes the file's `unreadable` error, which quarantines it
/// incompletely (what it holds is unknown, so nothing anywhere is destroyed).
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("cannot open the file")]
    Open(#[source] std::io::Error),
    #[error("cannot read the file")]
    Read(#[source] std::io::Error),
    #[error("not a regular file but {0}; desired-state files are plain files")]
    NotRegular(&'static str),
    #[error("file is {size} bytes, over the {limit} limit for one desired-state file; split it")]
    TooLarge { size: u64, limit: Size },
    #[error("file grew past {limit} bytes while being read")]
    Grew { limit: u64 },
    #[error(
        "not read: its {size} bytes would take this load past its budget of {budget} ({used} bytes read before it, in path order); raise `load.max_total_bytes` or make the tree smaller"
    )]
    OverBudget { size: u64, used: u64, budget: Size },
    #[error("cannot read {what}")]
    Source {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// What one load may still read: `LoadLimits` applied to the files in path order.
#[derive(Debug, Clone)]
pub struct LoadBudget {
    limits: LoadLimits,
    used: u64,
    nodes: u64,
}

impl LoadBudget {
    pub fn new(limits: LoadLimits) -> LoadBudget {
        LoadBudget {
            limits,
            used: 0,
            nodes: 0,
        }
    }

    /// Bytes read so far.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// How many YAML nodes the next file may have: what is left of the load's node budget,
    /// and never more than `yaml::MAX_EVENTS`.
    fn nodes_left(&self) -> usize {
        let left = self.limits.max_total_nodes.saturating_sub(self.nodes);
        usize::try_from(left).map_or(yaml::MAX_EVENTS, |l| l.min(yaml::MAX_EVENTS))
    }

    /// Admit a file of `size` bytes (as known before reading it): reserves them and returns how
    /// many bytes it may be read up to, or why it must not be read at all.
    pub fn admit(&mut self, size: u64) -> Result<u64, ReadError> {
        let per_file = self.limits.max_file_bytes;
        if size > per_file.bytes() {
            return Err(ReadError::TooLarge {
                size,
                limit: per_file,
            });
        }
        let total = self.limits.max_total_bytes;
        let left = total.bytes().saturating_sub(self.used);
        if size > left {
            return Err(ReadError::OverBudget {
                size,
                used: self.used,
                budget: total,
            });
        }
        self.used += size;
        Ok(per_file.bytes().min(left))
    }

    /// Settle an admitted file that turned out to have `read` bytes instead of `size`.
    pub fn settle(&mut self, size: u64, read: u64) {
        self.used = self.used.saturating_sub(size).saturating_add(read);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read desired-state directory {path}")]
    Root {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("desired-state source {0} is not a directory")]
    NotADirectory(PathBuf),
}

/// Load and validate the tree under `root`, reading at most `config.load`'s budget.
pub fn load_tree(root: &Path, config: &Config, now: DateTime<Utc>) -> Result<Desired, LoadError> {
    load_tree_cached(root, config, now, &mut LoadCache::default())
}

/// `load_tree`, reading again only the files whose identity on disk (device, inode, size,
/// modification and change times) differs from what `cache` kept, and parsing again only those
/// whose bytes differ; the checks across files run over everything. The result is the one
/// `load_tree` gives.
pub fn load_tree_cached(
    root: &Path,
    config: &Config,
    now: DateTime<Utc>,
    cache: &mut LoadCache,
) -> Result<Desired, LoadError> {
    let files = find_files(root)?;
    let mut pass = cache.begin(root, config);
    for rel in files {
        let display = root.join(&rel);
        let id = std::fs::metadata(&display)
            .ok()
            .and_then(|m| cache::Stamp::of(&m))
            .map_or(cache::Identity::Unknown, |s| {
                s.identity(std::time::SystemTime::now())
            });
        if pass.reuse_by_identity(&rel, &id) {
            continue;
        }
        let read_at = std::time::SystemTime::now();
        let (bytes, stamp) = read_stamped(&display, &mut pass.budget);
        let id = stamp.map_or(cache::Identity::Unknown, |s| s.identity(read_at));
        pass.read(&rel, &display, bytes, id);
    }
    Ok(pass.finish(now))
}

/// One file of a tree given from elsewhere (a git commit, memory): its path relative to the
/// tree's root, its size as known before reading it, and how to read it. Nothing is read
/// before the budget admits the file.
pub struct Entry<'a> {
    pub rel: PathBuf,
    /// An id that changes whenever the content does (a git blob id), if the source has one:
    /// a load with a cache reads no file whose id it has seen.
    pub id: Option<Box<[u8]>>,
    /// The size, or why the file cannot be read at all.
    pub size: Result<u64, ReadError>,
    pub read: Box<dyn FnOnce() -> Result<Vec<u8>, ReadError> + 'a>,
}

impl Entry<'static> {
    /// A file whose bytes are at hand.
    pub fn bytes(rel: impl Into<PathBuf>, bytes: Vec<u8>) -> Entry<'static> {
        Entry {
            rel: rel.into(),
            id: None,
            size: Ok(bytes.len() as u64),
            read: Box::new(move || Ok(bytes)),
        }
    }
}

impl std::fmt::Debug for Entry<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("rel", &self.rel)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// Load and validate files given from elsewhere (a git tree, say), reading them one at a time
/// in path order within `config.load`'s budget. Diagnostics show paths under `display_root`.
pub fn load_entries(
    display_root: &Path,
    entries: Vec<Entry<'_>>,
    config: &Config,
    now: DateTime<Utc>,
) -> Desired {
    load_entries_cached(
        display_root,
        entries,
        config,
        now,
        &mut LoadCache::default(),
    )
}

/// `load_entries`, reading no entry whose `id` `cache` has seen for its path and parsing none
/// whose bytes it has seen; the checks across files run over everything. The result is the
/// one `load_entries` gives.
pub fn load_entries_cached(
    display_root: &Path,
    mut entries: Vec<Entry<'_>>,
    config: &Config,
    now: DateTime<Utc>,
    cache: &mut LoadCache,
) -> Desired {
    entries.sort_by(|a, b| a.rel.cmp(&b.rel));
    let mut pass = cache.begin(display_root, config);
    for e in entries {
        let id =
            e.id.map_or(cache::Identity::Unknown, cache::Identity::Content);
        // A size that cannot be known is an error the usual read reports.
        if e.size.is_ok() && pass.reuse_by_identity(&e.rel, &id) {
            continue;
        }
        let budget = &mut pass.budget;
        let bytes = e.size.and_then(|size| {
            let cap = budget.admit(size)?;
            let bytes = (e.read)()?;
            let n = bytes.len() as u64;
            budget.settle(size, n);
            if n > cap {
                return Err(ReadError::Grew { limit: cap });
            }
            Ok(bytes)
        });
        pass.read(&e.rel, &display_root.join(&e.rel), bytes, id);
    }
    pass.finish(now)
}

/// Is a file of this name part of a desired-state tree? (`*.yaml`/`*.yml`, not hidden, not an
/// editor's swap or backup file.) Directories whose name this rejects are skipped too.
pub fn is_desired_name(name: &str, is_dir: bool) -> bool {
    if name.starts_with('.') || name.starts_with('#') || name.ends_with('~') {
        return false;
    }
    is_dir || name.ends_with(".yaml") || name.ends_with(".yml")
}

/// Every `*.yaml`/`*.yml` under `root`, relative, sorted; hidden files, editor swap and backup
/// files, and symlinked directories skipped.
pub fn find_files(root: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let meta = std::fs::metadata(root).map_err(|source| LoadError::Root {
        path: root.to_path_buf(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(LoadError::NotADirectory(root.to_path_buf()));
    }
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(source) if rel.as_os_str().is_empty() => {
                return Err(LoadError::Root {
                    path: root.to_path_buf(),
                    source,
                });
            }
            // A subdirectory that cannot be listed is reported as an unreadable entry: it is
            // quarantined (incompletely), so nothing that might be in it is destroyed.
            Err(_) => {
                out.push(rel);
                continue;
            }
        };
        for entry in entries {
            let Ok(entry) = entry else {
                out.push(rel.clone());
                continue;
            };
            let os_name = entry.file_name();
            let name = os_name.to_string_lossy();
            if !is_desired_name(&name, false) && !is_desired_name(&name, true) {
                continue;
            }
            let child = rel.join(&*name);
            let Ok(ft) = entry.file_type() else {
                out.push(child);
                continue;
            };
            if os_name.to_str().is_none() {
                // Not UTF-8: reading `child` (the lossy name) fails, which quarantines it.
                out.push(child);
            } else if ft.is_dir() {
                // A state directory inside the tree holds workspaces, not desired state.
                if !root.join(&child).join(crate::state::STATE_MARKER).exists() {
                    stack.push(child);
                }
            } else if ft.is_symlink() {
                match std::fs::metadata(entry.path()) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) if is_desired_name(&name, false) => out.push(child),
                    Ok(_) => {}
                    // A link whose target cannot be checked might be a desired file.
                    Err(_) if is_desired_name(&name, false) => out.push(child),
                    Err(_) => {}
                }
            } else if is_desired_name(&name, false) {
                // Regular or not: reading refuses a FIFO, socket or device, which quarantines it
                // with an error that says so.
                out.push(child);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Read one file within the budget. The file is opened without blocking and checked to be a
/// regular file on the opened descriptor (a FIFO would block the load for ever; a separate
/// `metadata` call would race with a swap of the file).
pub fn read_limited(path: &Path, budget: &mut LoadBudget) -> Result<Vec<u8>, ReadError> {
    read_stamped(path, budget).0
}

/// `read_limited`, and the identity of the file read (from the opened descriptor).
fn read_stamped(
    path: &Path,
    budget: &mut LoadBudget,
) -> (Result<Vec<u8>, ReadError>, Option<cache::Stamp>) {
    let mut stamp = None;
    let bytes = read_opened(path, budget, &mut stamp);
    (bytes, stamp)
}

fn read_opened(
    path: &Path,
    budget: &mut LoadBudget,
    stamp: &mut Option<cache::Stamp>,
) -> Result<Vec<u8>, ReadError> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc_flags())
        .open(path)
    {
        Ok(f) => f,
        // Opening a socket fails (ENXIO): say what it is. (The decision is the failed open; the
        // look here only names the reason.)
        Err(e) => {
            return Err(match std::fs::metadata(path) {
                Ok(m) if !m.is_file() => ReadError::NotRegular(special_kind(m.file_type())),
                _ => ReadError::Open(e),
            });
        }
    };
    let meta = f.metadata().map_err(ReadError::Read)?;
    if !meta.is_file() {
        return Err(ReadError::NotRegular(special_kind(meta.file_type())));
    }
    *stamp = cache::Stamp::of(&meta);
    let size = meta.len();
    let cap = budget.admit(size)?;
    let mut buf = Vec::with_capacity(size as usize);
    let read = f.take(cap + 1).read_to_end(&mut buf);
    budget.settle(size, buf.len() as u64);
    read.map_err(ReadError::Read)?;
    if buf.len() as u64 > cap {
        return Err(ReadError::Grew { limit: cap });
    }
    Ok(buf)
}

/// What a file that is not a regular file is, for a message.
fn special_kind(ft: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_fifo() {
        "a FIFO (named pipe)"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_dir() {
        "a directory"
    } else {
        "a special file"
    }
}

/// `O_NONBLOCK` (opening a FIFO does not wait for a writer) and `O_NOCTTY`.
fn libc_flags() -> i32 {
    (nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_NOCTTY).bits()
}

/// A file with nothing in it yet.
fn empty_file(display: &Path, rel: &Path) -> LoadedFile {
    LoadedFile {
        rel: rel.to_path_buf(),
        display: display.to_path_buf(),
        lines: SourceLines::default(),
        digest: [0; 32],
        objects: Vec::new(),
        errors: Vec::new(),
        held: Vec::new(),
        complete: false,
    }
}

/// A file that could not be read: its one error says why.
fn unreadable(display: &Path, rel: &Path, e: ReadError) -> LoadedFile {
    let mut lf = empty_file(display, rel);
    lf.errors.push(Diagnostic::error(
        "unreadable",
        display,
        Pos::default(),
        crate::error_chain(&e),
    ));
    lf
}

/// Turn a file's bytes (with their `digest`) into a parsed file; problems become its errors.
/// The text is dropped once parsed: only the lines later diagnostics may point at are kept.
/// Also says what the parse took of the budget's nodes.
fn parse_bytes(
    display: &Path,
    rel: &Path,
    bytes: Vec<u8>,
    digest: [u8; 32],
    budget: &mut LoadBudget,
) -> (LoadedFile, cache::Scan) {
    let mut lf = empty_file(display, rel);
    lf.digest = digest;
    let text = match decode(display, bytes) {
        Ok(t) => t,
        Err(d) => {
            lf.errors.push(*d);
            return (lf, cache::Scan::None);
        }
    };
    let scan = parse(&mut lf, &text, budget);
    attach_snippets(&mut lf.errors, &text);
    lf.lines = SourceLines::pick(&text, lf.objects.iter().flat_map(Document::lines));
    (lf, scan)
}

/// A file's bytes as text: UTF-8 without NUL bytes, a leading byte-order mark dropped, and line
/// breaks made `\n`. YAML counts a lone `\r` as a line break too (as `\r\n`): with them all
/// made `\n`, the parser's line numbers, the documents' byte ranges and the snippets agree.
fn decode(display: &Path, bytes: Vec<u8>) -> Result<String, Box<Diagnostic>> {
    let binary = |pos, message| {
        Box::new(
            Diagnostic::error("not-utf8", display, pos, message)
                .with_help("desired-state files are YAML text; is this a binary file?"),
        )
    };
    let mut text = match String::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            let good = &e.as_bytes()[..e.utf8_error().valid_up_to()];
            let good = String::from_utf8_lossy(good);
            return Err(binary(
                end_of(&unify_breaks(&good)),
                "the file is not UTF-8 text",
            ));
        }
    };
    if text.starts_with('\u{feff}') {
        text.drain(..'\u{feff}'.len_utf8());
    }
    if text.contains('\r') {
        text = unify_breaks(&text);
    }
    if let Some(i) = text.find('\0') {
        return Err(binary(end_of(&text[..i]), "the file contains NUL bytes"));
    }
    Ok(text)
}

/// `\r\n` and a lone `\r` made `\n`.
fn unify_breaks(text: &str) -> String {
    text.replace("\r\n", "\n").replace('\r', "\n")
}

/// The position just after `before` (whose line breaks are `\n`).
fn end_of(before: &str) -> Pos {
    Pos {
        line: before.matches('\n').count() as u32 + 1,
        column: before.rsplit('\n').next().unwrap_or("").chars().count() as u32 + 1,
    }
}

/// Parse the documents of a file's text into its objects, errors (without snippets yet) and
/// the names it holds; says what the parse took of the budget's nodes.
fn parse(lf: &mut LoadedFile, text: &str, budget: &mut LoadBudget) -> cache::Scan {
    lf.complete = true;
    let limit = budget.nodes_left();
    let (docs, scan) = match yaml::scan_within(text, limit) {
        Ok((docs, events)) => {
            budget.nodes += events as u64;
            (docs, cache::Scan::Done(events as u64))
        }
        Err(mut p) => {
            let nodes = p.code == "too-large"
                && p.message
                    .ends_with("YAML nodes; split it into smaller files");
            if nodes && limit < yaml::MAX_EVENTS {
                p.message = format!(
                    "this file would take the load past its budget of {} YAML nodes ({} in the files before it, in path order)",
                    budget.limits.max_total_nodes, budget.nodes
                );
                p.help = Some("raise `load.max_total_nodes`, or make the tree smaller".into());
            }
            let d = problem(lf, p);
            lf.errors.push(d);
            lf.complete = false;
            return if limit < yaml::MAX_EVENTS {
                cache::Scan::Budget
            } else {
                cache::Scan::Failed
            };
        }
    };
    for doc in &docs {
        if doc.empty {
            continue;
        }
        match (&doc.kind, &doc.name) {
            (Some((kind, _)), Some(name)) if Kind::parse(kind).is_some() => {
                if let Some(kind) = Kind::parse(kind) {
                    lf.held.push(Held {
                        kind,
                        name: name.clone(),
                    });
                }
            }
            // What this document is, or what it is called, is unknown.
            _ => lf.complete = false,
        }
        if !doc.is_mapping {
            let e = lf
                .error(
                    "not-a-mapping",
                    doc.pos,
                    "a document must be a mapping with a `kind`",
                )
                .with_help("start it with `kind: Session` (or Plan, Route)");
            lf.errors.push(e);
            continue;
        }
        let Some((kind_str, kind_pos)) = &doc.kind else {
            let e = lf
                .error("missing-kind", doc.pos, "document has no `kind`")
                .with_help("add `kind: Session` (or Plan, Route)");
            lf.errors.push(e);
            continue;
        };
        let Some(kind) = Kind::parse(kind_str) else {
            let names = Kind::ALL.map(Kind::as_str);
            let help = match did_you_mean(kind_str, names) {
                Some(k) => format!("did you mean `{k}`?"),
                None => "the kinds are Plan, Session and Route".into(),
            };
            let e = lf
                .error(
                    "unknown-kind",
                    *kind_pos,
                    format!("unknown kind `{kind_str}`"),
                )
                .with_help(help);
            lf.errors.push(e);
            continue;
        };
        let parsed = match kind {
            Kind::Plan => yaml::deserialize::<PlanSpec>(text, doc)
                .map(|s| Document::Plan(with(doc, &lf.rel, s))),
            Kind::Session => yaml::deserialize::<SessionSpec>(text, doc)
                .map(|s| Document::Session(with(doc, &lf.rel, s))),
            Kind::Route => yaml::deserialize::<RouteSpec>(text, doc)
                .map(|s| Document::Route(with(doc, &lf.rel, s))),
        };
        match parsed {
            Ok(o) => lf.objects.push(o),
            Err(p) => {
                let d = problem(lf, p);
                lf.errors.push(d);
            }
        }
    }
    scan
}

/// A document's object, with the positions `yaml::scan` kept (what later diagnostics point at).
fn with<T>(doc: &yaml::RawDoc, rel: &Path, spec: T) -> Doc<T> {
    Doc {
        spec,
        file: rel.to_path_buf(),
        pos: doc.pos,
        fields: doc.fields.clone(),
    }
}

fn problem(lf: &LoadedFile, p: yaml::Problem) -> Diagnostic {
    let d = lf.error(p.code, p.pos, p.message);
    match p.help {
        Some(h) => d.with_help(h),
        None => d,
    }
}

/// A content hash of the files as read: the revision of a directory source.
fn content_revision(files: &[LoadedFile]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for f in files {
        h.update(f.rel.to_string_lossy().as_bytes());
        h.update([0]);
        h.update(f.digest);
        for e in &f.errors {
            h.update(e.message.as_bytes());
        }
    }
    format!("dir:{}", &hex::encode(h.finalize())[..12])
}

/// A digest of one file as read: its bytes, or why it could not be read.
fn file_digest(f: &LoadedFile) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(f.digest);
    if f.digest == [0; 32] {
        for e in &f.errors {
            h.update(e.message.as_bytes());
        }
    }
    hex::encode(&h.finalize()[..12])
}

/// Build `Desired` from validated files: objects of error-free files, the rest quarantined.
fn assemble(files: Vec<LoadedFile>, warnings: Vec<Diagnostic>) -> Desired {
    let mut d = Desired {
        warnings,
        revision: Some(content_revision(&files)),
        ..Desired::default()
    };
    for f in files {
        d.files.push(f.rel.clone());
        d.digests.insert(f.rel.clone(), file_digest(&f));
        if !f.errors.is_empty() {
            let mut errors = f.errors;
            if errors.len() > MAX_ERRORS_PER_FILE {
                let more = errors.len() - MAX_ERRORS_PER_FILE;
                errors.truncate(MAX_ERRORS_PER_FILE);
                errors.push(Diagnostic::error(
                    "more-errors",
                    &f.display,
                    Pos::default(),
                    format!("and {more} more errors in this file, not shown"),
                ));
            }
            let mut held = f.held;
            held.sort();
            held.dedup();
            d.quarantined.insert(
                f.rel,
                Quarantine {
                    errors,
                    held,
                    complete: f.complete,
                },
            );
            continue;
        }
        for o in f.objects {
            match o {
                Document::Plan(p) => {
                    d.plans.insert(p.spec.name.clone(), p);
                }
                Document::Session(s) => {
                    d.sessions.insert(s.spec.name.clone(), s);
                }
                Document::Route(r) => {
                    d.routes.insert(r.spec.name.clone(), r);
                }
            }
        }
    }
    d
}

/// Read a config file. Relative paths in it are made relative to its directory.
pub fn load_config(path: &Path) -> Result<Config, Vec<Diagnostic>> {
    let (dir, rel) = match (path.parent(), path.file_name()) {
        (Some(d), Some(n)) => (d.to_path_buf(), PathBuf::from(n)),
        _ => (PathBuf::from("."), path.to_path_buf()),
    };
    let display = dir.join(&rel);
    let mut budget = LoadBudget::new(LoadLimits::default());
    let text = read_limited(&display, &mut budget)
        .map_err(|e| {
            Box::new(Diagnostic::error(
                "unreadable",
                &display,
                Pos::default(),
                crate::error_chain(&e),
            ))
        })
        .and_then(|bytes| decode(&display, bytes))
        .map_err(|d| vec![*d])?;
    let docs = yaml::scan(&text).map_err(|p| vec![config_problem(&display, &text, p)])?;
    let docs: Vec<_> = docs.into_iter().filter(|d| !d.empty).collect();
    let mut config = match docs.as_slice() {
        [] => Config::embedded_default(Path::new(".")),
        [doc] => yaml::deserialize::<Config>(&text, doc)
            .map_err(|p| vec![config_problem(&display, &text, p)])?,
        [_, second, ..] => {
            return Err(vec![
                Diagnostic::error(
                    "config-documents",
                    &display,
                    second.pos,
                    "a config file holds one document",
                )
                .with_source(&text),
            ]);
        }
    };
    // A route template may only use the placeholders it knows (`{user}` would stay braces).
    let doc = docs.first();
    for (i, t) in config.routes.templates.iter().enumerate() {
        if let Some(bad) = unknown_placeholder(&t.host) {
            let pos = doc
                .and_then(|d| {
                    d.fields
                        .get(&format!("routes.templates[{i}].host"))
                        .copied()
                })
                .unwrap_or_default();
            return Err(vec![
                Diagnostic::error(
                    "unknown-placeholder",
                    &display,
                    pos,
                    format!(
                        "route template `{}` uses `{{{bad}}}`, which is not a placeholder",
                        t.host
                    ),
                )
                .with_source(&text)
                .with_help(
                    "the placeholders are {session}, {owner}, {domain}, {port} and {port_name}",
                ),
            ]);
        }
    }
    // Credentials in an http(s) URL would travel into logs, status and the mirror's config.
    if let crate::config::SourceConfig::Git(g) = &config.source {
        let authority = g
            .url
            .split_once("://")
            .filter(|(scheme, _)| scheme.starts_with("http"))
            .map(|(_, rest)| rest.split('/').next().unwrap_or(""));
        if authority.is_some_and(|a| a.contains('@')) {
            let pos = docs
                .first()
                .and_then(|d| d.fields.get("source.git.url").copied())
                .unwrap_or_default();
            return Err(vec![
                // No source line: it holds the credential.
                Diagnostic::error("secret-in-url", &display, pos, "the git URL carries credentials")
                    .with_help("remove them from the URL and use `auth: {token: {env: NAME}}` (or basic) instead"),
            ]);
        }
    }
    config.rebase(if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        &dir
    });
    Ok(config)
}

/// The first `{name}` in a route template that is not one of its placeholders (or an
/// unclosed `{`).
fn unknown_placeholder(host: &str) -> Option<String> {
    let mut rest = host;
    while let Some(i) = rest.find('{') {
        let tail = &rest[i + 1..];
        let Some(end) = tail.find('}') else {
            return Some(tail.to_string());
        };
        let name = &tail[..end];
        if !matches!(name, "session" | "owner" | "domain" | "port" | "port_name") {
            return Some(name.to_string());
        }
        rest = &tail[end + 1..];
    }
    None
}

fn config_problem(display: &Path, text: &str, p: yaml::Problem) -> Diagnostic {
    let d = Diagnostic::error(p.code, display, p.pos, p.message).with_source(text);
    match p.help {
        Some(h) => d.with_help(h),
        None => d,
    }
}
