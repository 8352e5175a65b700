//! Loading a desired-state tree: find the files, read them within limits, parse every document,
//! validate across files, and return the valid objects plus the quarantined files.
//!
//! Reads files; never writes. Problems are data (diagnostics on quarantined files), never
//! panics: a broken file only quarantines itself and the objects that depend on it.

pub mod yaml;

use std::io::Read;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};

use crate::config::Config;
use crate::desired::{Desired, Doc, Held, Quarantine};
use crate::diag::{Diagnostic, Pos, did_you_mean};
use crate::model::{Kind, PlanSpec, RouteSpec, SessionSpec};
use crate::validate;

/// Files larger than this are refused without being read.
pub const MAX_FILE_BYTES: u64 = 4 << 20;

/// A parsed document of any kind.
#[derive(Debug, Clone)]
pub enum Object {
    Plan(Doc<PlanSpec>),
    Session(Doc<SessionSpec>),
    Route(Doc<RouteSpec>),
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Plan(_) => Kind::Plan,
            Object::Session(_) => Kind::Session,
            Object::Route(_) => Kind::Route,
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Object::Plan(d) => &d.spec.name,
            Object::Session(d) => &d.spec.name,
            Object::Route(d) => &d.spec.name,
        }
    }
}

/// One file as read and parsed, before cross-file validation.
#[derive(Debug, Clone)]
pub struct LoadedFile {
    /// Relative to the tree's root.
    pub rel: PathBuf,
    /// As diagnostics show it (the root as given, joined with `rel`).
    pub display: PathBuf,
    pub text: String,
    pub objects: Vec<Object>,
    pub errors: Vec<Diagnostic>,
    /// Kind and name of every document that had them, even ones that failed to parse.
    pub held: Vec<Held>,
    /// `held` names every object in the file (see `Quarantine::complete`).
    pub complete: bool,
}

impl LoadedFile {
    /// A diagnostic in this file, with its source line attached.
    pub fn error(&self, code: &'static str, pos: Pos, message: impl Into<String>) -> Diagnostic {
        Diagnostic::error(code, &self.display, pos, message).with_source(&self.text)
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

/// Load and validate the tree under `root`.
pub fn load_tree(root: &Path, config: &Config, now: DateTime<Utc>) -> Result<Desired, LoadError> {
    let files = find_files(root)?;
    let mut loaded: Vec<LoadedFile> = files.iter().map(|rel| load_file(root, rel)).collect();
    let warnings = validate::check(&mut loaded, config, now);
    Ok(assemble(loaded, warnings))
}

/// Files given in memory: (path relative to the tree's root, bytes or why they could not be read).
pub type Entries = Vec<(PathBuf, Result<Vec<u8>, String>)>;

/// Load and validate files given in memory (from a git tree, say): `(relative path, bytes or
/// why they could not be read)`. Diagnostics show paths under `display_root`.
pub fn load_entries(
    display_root: &Path,
    mut entries: Entries,
    config: &Config,
    now: DateTime<Utc>,
) -> Desired {
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let mut loaded: Vec<LoadedFile> = entries
        .into_iter()
        .map(|(rel, bytes)| {
            let bytes = bytes.and_then(|b| {
                if b.len() as u64 > MAX_FILE_BYTES {
                    Err(format!("file is {} bytes, over the {} MiB limit for one desired-state file; split it", b.len(), MAX_FILE_BYTES >> 20))
                } else {
                    Ok(b)
                }
            });
            parse(text_of(&display_root.join(&rel), &rel, bytes))
        })
        .collect();
    let warnings = validate::check(&mut loaded, config, now);
    assemble(loaded, warnings)
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
            } else if is_desired_name(&name, false) && ft.is_file() {
                out.push(child);
            }
        }
    }
    out.sort();
    Ok(out)
}

fn read_limited(path: &Path) -> Result<Vec<u8>, String> {
    let f = std::fs::File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if len > MAX_FILE_BYTES {
        return Err(format!(
            "file is {} bytes, over the {} MiB limit for one desired-state file; split it",
            len,
            MAX_FILE_BYTES >> 20
        ));
    }
    let mut buf = Vec::with_capacity(len as usize);
    f.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(|e| format!("cannot read: {e}"))?;
    if buf.len() as u64 > MAX_FILE_BYTES {
        return Err(format!(
            "file grew past the {} MiB limit while being read",
            MAX_FILE_BYTES >> 20
        ));
    }
    Ok(buf)
}

/// Read one file as text within the limits; problems become the file's errors.
fn load_text(root: &Path, rel: &Path) -> LoadedFile {
    let display = root.join(rel);
    let bytes = read_limited(&display);
    text_of(&display, rel, bytes)
}

/// Turn a file's bytes (or why they could not be read) into text; problems become errors.
fn text_of(display: &Path, rel: &Path, bytes: Result<Vec<u8>, String>) -> LoadedFile {
    let display = display.to_path_buf();
    let mut lf = LoadedFile {
        rel: rel.to_path_buf(),
        display: display.clone(),
        text: String::new(),
        objects: Vec::new(),
        errors: Vec::new(),
        held: Vec::new(),
        complete: false,
    };
    let whole = Pos::default();
    let bytes = match bytes {
        Ok(b) => b,
        Err(msg) => {
            lf.errors
                .push(Diagnostic::error("unreadable", &display, whole, msg));
            return lf;
        }
    };
    let text = match String::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            let good = &e.as_bytes()[..e.utf8_error().valid_up_to()];
            let line = good.iter().filter(|b| **b == b'\n').count() as u32 + 1;
            let col = good.iter().rev().take_while(|b| **b != b'\n').count() as u32 + 1;
            lf.errors.push(
                Diagnostic::error(
                    "not-utf8",
                    &display,
                    Pos { line, column: col },
                    "the file is not UTF-8 text",
                )
                .with_help("desired-state files are YAML text; is this a binary file?"),
            );
            return lf;
        }
    };
    lf.text = text
        .strip_prefix('\u{feff}')
        .map(str::to_string)
        .unwrap_or(text);
    if let Some(i) = lf.text.find('\0') {
        let before = &lf.text[..i];
        let line = before.matches('\n').count() as u32 + 1;
        let col = before
            .rsplit('\n')
            .next()
            .map(|l| l.chars().count())
            .unwrap_or(0) as u32
            + 1;
        lf.errors.push(
            Diagnostic::error(
                "not-utf8",
                &display,
                Pos { line, column: col },
                "the file contains NUL bytes",
            )
            .with_help("desired-state files are YAML text; is this a binary file?"),
        );
    }
    lf
}

/// Read and parse one file. Never fails: problems become the file's errors.
pub fn load_file(root: &Path, rel: &Path) -> LoadedFile {
    parse(load_text(root, rel))
}

/// Parse the documents of a file whose text was read.
fn parse(mut lf: LoadedFile) -> LoadedFile {
    if !lf.errors.is_empty() {
        return lf;
    }
    lf.complete = true;
    let docs = match yaml::scan(&lf.text) {
        Ok(d) => d,
        Err(p) => {
            let d = problem(&lf, p);
            lf.errors.push(d);
            lf.complete = false;
            return lf;
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
            Kind::Plan => yaml::deserialize::<PlanSpec>(&lf.text, doc)
                .map(|s| Object::Plan(with(doc, &lf.rel, s))),
            Kind::Session => yaml::deserialize::<SessionSpec>(&lf.text, doc)
                .map(|s| Object::Session(with(doc, &lf.rel, s))),
            Kind::Route => yaml::deserialize::<RouteSpec>(&lf.text, doc)
                .map(|s| Object::Route(with(doc, &lf.rel, s))),
        };
        match parsed {
            Ok(o) => lf.objects.push(o),
            Err(p) => {
                let d = problem(&lf, p);
                lf.errors.push(d);
            }
        }
    }
    lf
}

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
        h.update(f.text.as_bytes());
        h.update([0]);
        for e in &f.errors {
            h.update(e.message.as_bytes());
        }
    }
    format!("dir:{}", &hex::encode(h.finalize())[..12])
}

/// A digest of one file as read: its text, or why it could not be read.
fn file_digest(f: &LoadedFile) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(f.text.as_bytes());
    if f.text.is_empty() {
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
            let mut held = f.held;
            held.sort();
            held.dedup();
            d.quarantined.insert(
                f.rel,
                Quarantine {
                    errors: f.errors,
                    held,
                    complete: f.complete,
                },
            );
            continue;
        }
        for o in f.objects {
            match o {
                Object::Plan(p) => {
                    d.plans.insert(p.spec.name.clone(), p);
                }
                Object::Session(s) => {
                    d.sessions.insert(s.spec.name.clone(), s);
                }
                Object::Route(r) => {
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
    let lf = load_file_raw(&dir, &rel);
    let (text, display) = match lf {
        Ok(t) => t,
        Err(d) => return Err(vec![*d]),
    };
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
    // A route template may only use the placeholders it knows (`{owner}` would stay braces).
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
                .with_help("the placeholders are {session}, {domain}, {port} and {port_name}"),
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
        if !matches!(name, "session" | "domain" | "port" | "port_name") {
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

fn load_file_raw(root: &Path, rel: &Path) -> Result<(String, PathBuf), Box<Diagnostic>> {
    let lf = load_text(root, rel);
    match lf.errors.into_iter().next() {
        Some(d) => Err(Box::new(d)),
        None => Ok((lf.text, lf.display)),
    }
}
