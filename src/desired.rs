//! `Desired`: the valid objects of a desired-state tree, each with where it came from, plus the
//! files that were quarantined and why. Also the effective routes (explicit routes and those
//! that route templates give every session), which validation and the planner share.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde::Serialize;

use crate::diag::{Diagnostic, Pos};
use crate::model::RouteTemplate;
use crate::model::{Kind, PlanSpec, Port, RouteSpec, SessionSpec};

/// A document and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Doc<T> {
    pub spec: T,
    /// The file, relative to the tree's root.
    pub file: PathBuf,
    /// Where the document starts.
    pub pos: Pos,
    /// Position of each field's value by dotted path, for diagnostics.
    pub fields: BTreeMap<String, Pos>,
}

impl<T> Doc<T> {
    /// The position of `path`'s value, or of the document if it has no such field.
    pub fn at(&self, path: &str) -> Pos {
        self.fields.get(path).copied().unwrap_or(self.pos)
    }
}

/// A file whose objects are held: neither changed nor destroyed until it is fixed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Quarantine {
    pub errors: Vec<Diagnostic>,
    /// The objects the file names, as far as they could be read.
    pub held: Vec<Held>,
    /// Every object in the file is in `held`. When false (the file could not be read or
    /// parsed, or a document's kind or name is unreadable), nothing anywhere is destroyed:
    /// any missing object might be in this file.
    pub complete: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Held {
    pub kind: Kind,
    pub name: String,
}

#[derive(Debug, Clone, Default)]
pub struct Desired {
    pub plans: BTreeMap<String, Doc<PlanSpec>>,
    pub sessions: BTreeMap<String, Doc<SessionSpec>>,
    pub routes: BTreeMap<String, Doc<RouteSpec>>,
    /// Every file read, relative to the root, in load order.
    pub files: Vec<PathBuf>,
    /// A digest of each file's content as read (what a change to one file is told by).
    pub digests: BTreeMap<PathBuf, String>,
    /// Files with errors, relative to the root.
    pub quarantined: BTreeMap<PathBuf, Quarantine>,
    pub warnings: Vec<Diagnostic>,
    /// Which revision of the source this is: a commit for git, a content hash for a directory.
    pub revision: Option<String>,
    /// The full commit id, for a git source.
    pub commit: Option<String>,
    /// Sessions whose `source.path` does not exist on this machine (checked when loaded):
    /// they are not created until it does.
    pub missing_sources: BTreeMap<String, PathBuf>,
    /// The source could not be refreshed (a git fetch failed): this is the last good revision.
    pub source_error: Option<String>,
}

impl Desired {
    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.quarantined.values().flat_map(|q| q.errors.iter())
    }

    pub fn is_valid(&self) -> bool {
        self.quarantined.is_empty()
    }

    /// Names of objects of `kind` held by quarantined files.
    pub fn held(&self, kind: Kind) -> BTreeSet<&str> {
        self.quarantined
            .values()
            .flat_map(|q| q.held.iter())
            .filter(|h| h.kind == kind)
            .map(|h| h.name.as_str())
            .collect()
    }

    /// Some quarantined file could not be read far enough to know what it holds.
    pub fn has_unknown_objects(&self) -> bool {
        self.quarantined.values().any(|q| !q.complete)
    }

    pub fn object_count(&self) -> usize {
        self.plans.len() + self.sessions.len() + self.routes.len()
    }
}

/// Where an effective route came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RouteOrigin<'a> {
    /// A `kind: Route` document, by name.
    Route(&'a str),
    /// A route template from the config, by its host pattern.
    Template(&'a str),
}

/// A route as it will be served: host (and path prefix) -> one port of one session.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct EffectiveRoute<'a> {
    /// Its identity: the host, or `host/path` (`model::route_key`).
    pub key: String,
    /// Lower-cased host.
    pub host: String,
    /// Its path prefix (explicit routes only).
    pub path: Option<&'a str>,
    pub strip_prefix: bool,
    pub session: &'a str,
    pub port_name: &'a str,
    pub port: Port,
    pub dns: bool,
    /// The route's own choice of the waking page, if it makes one.
    pub waking_page: Option<bool>,
    pub origin: RouteOrigin<'a>,
}

/// Expand a template's host for one session and port, in one pass.
pub fn expand_template(
    pattern: &str,
    session: &str,
    owner: &str,
    domain: &str,
    port_name: &str,
    port: Port,
) -> String {
    let mut out = String::with_capacity(pattern.len() + session.len() + domain.len() + 8);
    let mut rest = pattern;
    while let Some(i) = rest.find('{') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        let (value, len): (&dyn std::fmt::Display, usize) = if tail.starts_with("{session}") {
            (&session, 9)
        } else if tail.starts_with("{owner}") {
            (&owner, 7)
        } else if tail.starts_with("{domain}") {
            (&domain, 8)
        } else if tail.starts_with("{port_name}") {
            (&port_name, 11)
        } else if tail.starts_with("{port}") {
            (&port.0, 6)
        } else {
            (&'{', 1)
        };
        use std::fmt::Write as _;
        let _ = write!(out, "{value}");
        rest = &tail[len..];
    }
    out.push_str(rest);
    out.make_ascii_lowercase();
    out
}

/// Routes templates give one session on `plan`, in template then port order.
pub fn template_routes<'a>(
    session: &'a str,
    owner: Option<&'a str>,
    plan: &'a PlanSpec,
    templates: &'a [RouteTemplate],
    domain: &str,
) -> impl Iterator<Item = EffectiveRoute<'a>> {
    templates.iter().flat_map(move |t| {
        plan.ports
            .iter()
            .filter(move |(name, _)| t.port == "*" || t.port == **name)
            .map(move |(name, port)| {
                let host =
                    expand_template(&t.host, session, owner.unwrap_or(""), domain, name, *port);
                EffectiveRoute {
                    key: host.clone(),
                    host,
                    path: None,
                    strip_prefix: false,
                    session,
                    port_name: name,
                    port: *port,
                    dns: t.dns,
                    waking_page: t.waking_page,
                    origin: RouteOrigin::Template(&t.host),
                }
            })
    })
}

/// The URL of a route, by key (host, or `host/path`), through a proxy on `port`.
pub fn route_url(key: &str, port: Option<u16>) -> String {
    let (host, path) = crate::model::split_route_key(key);
    let path = path.unwrap_or("");
    match port {
        Some(80) | None => format!("http://{host}{path}/"),
        Some(p) => format!("http://{host}:{p}{path}/"),
    }
}

/// Every route of the valid objects: from templates for each session, then explicit routes.
/// Routes whose session or port does not resolve are left out (validation reports them).
/// Only sessions for which `include` is true get routes.
pub fn effective_routes<'a>(
    desired: &'a Desired,
    templates: &'a [RouteTemplate],
    domain: &str,
    include: impl Fn(&str) -> bool,
) -> Vec<EffectiveRoute<'a>> {
    let mut out =
        Vec::with_capacity(desired.sessions.len() * templates.len() + desired.routes.len());
    for (name, s) in &desired.sessions {
        if !include(name) {
            continue;
        }
        if let Some(plan) = desired.plans.get(&s.spec.plan) {
            out.extend(template_routes(
                name,
                s.spec.owner.as_deref(),
                &plan.spec,
                templates,
                domain,
            ));
        }
    }
    for (name, r) in &desired.routes {
        if !include(&r.spec.session) {
            continue;
        }
        let port = desired
            .sessions
            .get(&r.spec.session)
            .and_then(|s| desired.plans.get(&s.spec.plan))
            .and_then(|p| p.spec.ports.get_key_value(&r.spec.port));
        if let Some((port_name, port)) = port {
            let host = r.spec.host.to_ascii_lowercase();
            let path = r.spec.prefix();
            out.push(EffectiveRoute {
                key: crate::model::route_key(&host, path),
                host,
                path,
                strip_prefix: r.spec.strip_prefix && path.is_some(),
                session: &r.spec.session,
                port_name,
                port: *port,
                dns: r.spec.dns,
                waking_page: r.spec.waking_page,
                origin: RouteOrigin::Route(name),
            });
        }
    }
    out
}
