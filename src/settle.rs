//! The history of the desired-state files the loop has loaded: when each last changed, what it
//! declared, and where each object was last declared. From it the loop builds the planner's
//! `Settle` (which files are still settling), and it holds the objects of a file that turned
//! empty or comment-only (an editor truncating a file before writing it) as if the file were
//! quarantined, until it has stayed that way for the settle time.
//!
//! Its only I/O is reading a file's modification time the first time it sees the file, so a
//! change made just before vessel started settles too.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};

use crate::desired::{Desired, Held, Quarantine, RouteOrigin, effective_routes};
use crate::diag::{Diagnostic, Pos};
use crate::model::Kind;
use crate::model::RouteTemplate;
use crate::model::observed::Observed;
use crate::model::plan::Object;
use crate::planner::Settle;

/// What the loop remembers of the files it has loaded.
pub struct SourceHistory {
    settle: chrono::Duration,
    files: BTreeMap<PathBuf, Memo>,
    origins: BTreeMap<Object, PathBuf>,
}

struct Memo {
    /// The content's digest; None while the file is absent.
    digest: Option<String>,
    /// When its content (or its presence) last changed.
    changed: DateTime<Utc>,
    /// What it declared the last time it declared anything without errors.
    declared: Vec<Held>,
}

/// Where the tree's files are, to date a file seen for the first time by its modification
/// time (a directory source); None for a git source, whose files change only with commits.
pub struct Root<'a>(pub Option<&'a Path>);

impl SourceHistory {
    pub fn new(settle: std::time::Duration) -> SourceHistory {
        SourceHistory {
            settle: chrono::Duration::from_std(settle).unwrap_or_default(),
            files: BTreeMap::new(),
            origins: BTreeMap::new(),
        }
    }

    /// A new settle time (a reloaded config).
    pub fn set_settle(&mut self, settle: std::time::Duration) {
        self.settle = chrono::Duration::from_std(settle).unwrap_or_default();
    }

    /// Take in what a pass loaded and observed: note which files changed, hold the objects of
    /// files that turned empty (adding them to `desired.quarantined`), and say which files
    /// are settling.
    pub fn record(
        &mut self,
        desired: &mut Desired,
        observed: &Observed,
        templates: &[RouteTemplate],
        domain: &str,
        root: Root<'_>,
        now: DateTime<Utc>,
    ) -> Settle {
        let settle = self.settle;
        // 1. Changes of content or presence.
        let present: BTreeSet<&PathBuf> = desired.files.iter().collect();
        for (file, memo) in self.files.iter_mut() {
            if !present.contains(file) && memo.digest.is_some() {
                memo.digest = None;
                memo.changed = now;
            }
        }
        for file in &desired.files {
            let digest = desired.digests.get(file).cloned();
            match self.files.get_mut(file) {
                Some(m) if m.digest == digest => {}
                Some(m) => {
                    m.digest = digest;
                    m.changed = now;
                }
                None => {
                    let changed = match root.0 {
                        Some(dir) => modified(&dir.join(file)).map_or(now, |t| t.min(now)),
                        None => DateTime::<Utc>::UNIX_EPOCH,
                    };
                    self.files.insert(
                        file.clone(),
                        Memo {
                            digest,
                            changed,
                            declared: Vec::new(),
                        },
                    );
                }
            }
        }
        // A file a session says it was made from, never seen by this process and absent now:
        // when it went is unknown, so it counts as changed now.
        for s in observed.sessions.values().filter(|s| s.owned) {
            if let Some(f) = &s.source_file
                && !self.files.contains_key(f)
                && root.0.is_some()
            {
                self.files.insert(
                    f.clone(),
                    Memo {
                        digest: None,
                        changed: now,
                        declared: Vec::new(),
                    },
                );
            }
        }

        // 2. Files that turned empty while they declared objects hold them for a while.
        let mut declared_now: BTreeMap<&Path, Vec<Held>> = BTreeMap::new();
        let held = |kind, name: &str| Held {
            kind,
            name: name.to_string(),
        };
        for (n, d) in &desired.plans {
            declared_now
                .entry(&d.file)
                .or_default()
                .push(held(Kind::Plan, n));
        }
        for (n, d) in &desired.sessions {
            declared_now
                .entry(&d.file)
                .or_default()
                .push(held(Kind::Session, n));
        }
        for (n, d) in &desired.routes {
            declared_now
                .entry(&d.file)
                .or_default()
                .push(held(Kind::Route, n));
        }
        let mut emptied: Vec<(PathBuf, Quarantine)> = Vec::new();
        for file in &desired.files {
            let Some(memo) = self.files.get_mut(file) else {
                continue;
            };
            let quarantined = desired.quarantined.contains_key(file);
            let mut objects = declared_now.remove(file.as_path()).unwrap_or_default();
            if quarantined {
                // What it declared before it broke stays what it declared.
                continue;
            }
            if objects.is_empty() && !memo.declared.is_empty() {
                let until = memo.changed + settle;
                if now < until {
                    let names: Vec<String> = memo
                        .declared
                        .iter()
                        .map(|h| format!("{} {}", h.kind.as_str(), h.name))
                        .collect();
                    let warning = Diagnostic::warning(
                        "emptied",
                        file.clone(),
                        Pos::default(),
                        format!(
                            "the file turned empty (or only comments) while it declared {}; they are held as they are until it stays so until {}",
                            names.join(", "),
                            until.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                        ),
                    )
                    .with_help("if the file is being saved, nothing is lost; to remove them, leave it empty or delete it");
                    emptied.push((
                        file.clone(),
                        Quarantine {
                            errors: vec![warning],
                            held: memo.declared.clone(),
                            complete: true,
                        },
                    ));
                    continue;
                }
            }
            objects.sort();
            memo.declared = objects;
        }
        desired.quarantined.extend(emptied);

        // 3. Where each object was declared: sessions, and every host a route gives.
        let mut current: BTreeSet<Object> = BTreeSet::new();
        for (n, d) in &desired.sessions {
            let o = Object::Session(n.clone());
            self.origins.insert(o.clone(), d.file.clone());
            current.insert(o);
        }
        for r in effective_routes(desired, templates, domain, |_| true) {
            let file = match r.origin {
                RouteOrigin::Route(name) => desired.routes.get(name).map(|d| &d.file),
                RouteOrigin::Template(_) => desired.sessions.get(r.session).map(|d| &d.file),
            };
            if let Some(f) = file {
                let o = Object::Route(r.key);
                self.origins.insert(o.clone(), f.clone());
                current.insert(o);
            }
        }

        // 4. What is still settling; forget what has settled and is gone.
        let until: BTreeMap<PathBuf, DateTime<Utc>> = self
            .files
            .iter()
            .map(|(f, m)| (f, m.changed + settle))
            .filter(|(_, at)| *at > now)
            .map(|(f, at)| (f.clone(), at))
            .collect();
        self.files
            .retain(|f, m| m.digest.is_some() || until.contains_key(f));
        self.origins
            .retain(|o, f| current.contains(o) || until.contains_key(f));
        Settle {
            until,
            origins: self.origins.clone(),
        }
    }
}

fn modified(path: &Path) -> Option<DateTime<Utc>> {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .map(DateTime::<Utc>::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn load(files: &[(&str, &str)]) -> Desired {
        let entries = files
            .iter()
            .map(|(p, t)| crate::load::Entry::bytes(*p, t.as_bytes().to_vec()))
            .collect();
        let cfg = Config::embedded_default(Path::new("."));
        crate::load::load_entries(Path::new("."), entries, &cfg, Utc::now())
    }

    const PLAN: &str = "kind: Plan\nname: web\ncommand: [x]\nports: {ide: 8080}\n";
    const ALICE: &str = "kind: Session\nname: alice\nplan: web\n";

    #[test]
    fn an_emptied_file_holds_what_it_declared_until_it_settles() {
        let mut h = SourceHistory::new(std::time::Duration::from_secs(2));
        let t0 = Utc::now();
        let o = Observed::default();
        let cfg = Config::embedded_default(Path::new("."));
        let rec = |h: &mut SourceHistory, d: &mut Desired, at| {
            h.record(d, &o, &cfg.routes.templates, "localhost", Root(None), at)
        };
        let mut d = load(&[("plan.yaml", PLAN), ("alice.yaml", ALICE)]);
        let s = rec(&mut h, &mut d, t0);
        assert!(s.until.is_empty(), "first sight of a git tree is settled");
        assert_eq!(
            s.origins.get(&Object::Route("alice.localhost".into())),
            Some(&PathBuf::from("alice.yaml"))
        );

        let at = t0 + chrono::Duration::milliseconds(500);
        let mut d = load(&[("plan.yaml", PLAN), ("alice.yaml", "# nothing\n")]);
        let s = rec(&mut h, &mut d, at);
        let q = d.quarantined.get(Path::new("alice.yaml")).expect("held");
        assert_eq!(
            q.held,
            vec![Held {
                kind: Kind::Session,
                name: "alice".into()
            }]
        );
        assert_eq!(q.errors[0].code, "emptied");
        assert_eq!(
            s.until.get(Path::new("alice.yaml")),
            Some(&(at + chrono::Duration::seconds(2)))
        );

        // Still empty once settled: no longer held, and nothing settles any more.
        let later = at + chrono::Duration::milliseconds(2_001);
        let mut d = load(&[("plan.yaml", PLAN), ("alice.yaml", "# nothing\n")]);
        let s = rec(&mut h, &mut d, later);
        assert!(d.quarantined.is_empty(), "{:?}", d.quarantined);
        assert!(s.until.is_empty());
        // The session's origin is kept while it may still be destroyed... and forgotten once
        // its file has settled.
        assert!(!s.origins.contains_key(&Object::Session("alice".into())));
    }

    #[test]
    fn a_vanished_file_settles_from_when_it_went() {
        let mut h = SourceHistory::new(std::time::Duration::from_secs(2));
        let t0 = Utc::now();
        let o = Observed::default();
        let mut d = load(&[("plan.yaml", PLAN), ("alice.yaml", ALICE)]);
        h.record(&mut d, &o, &[], "localhost", Root(None), t0);
        let mut d = load(&[("plan.yaml", PLAN)]);
        let s = h.record(&mut d, &o, &[], "localhost", Root(None), t0);
        assert_eq!(
            s.until.get(Path::new("alice.yaml")),
            Some(&(t0 + chrono::Duration::seconds(2)))
        );
        assert_eq!(
            s.origins.get(&Object::Session("alice".into())),
            Some(&PathBuf::from("alice.yaml"))
        );
        let now = t0 + chrono::Duration::seconds(1);
        assert_eq!(
            s.wait_for([Path::new("alice.yaml")], now).map(|(f, _)| f),
            Some(PathBuf::from("alice.yaml"))
        );
        assert_eq!(s.wait_for([Path::new("plan.yaml")], now), None);
    }
}
