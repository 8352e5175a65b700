//! Validation of loaded files, alone and across files.
//!
//! Errors are pushed onto the file they are in, which quarantines it; objects that refer to a
//! quarantined object are quarantined in turn (checked to a fixpoint), so a broken file can
//! never make vessel act on a half-known world. Pure: no I/O, the clock passed in.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path};

use chrono::{DateTime, Utc};

use crate::config::Config;
use crate::desired::{Doc, Held, template_routes};
use crate::diag::{Diagnostic, Pos, did_you_mean, name_list};

/// How many names a diagnostic lists (known plans, ports, other claimants) before "and N more".
const LISTED: usize = 10;
use crate::load::{Document, LoadedFile};
use crate::model::{
    ComputeKind, ExpiryAction, Kind, dns_label_problem, hostname_problem, path_problem,
};

/// Validate `files` in place (errors go onto their file) and return warnings.
pub fn check(files: &mut [LoadedFile], config: &Config, now: DateTime<Utc>) -> Vec<Diagnostic> {
    let notes: Vec<Vec<Diagnostic>> = files.iter_mut().map(|f| check_file(f, config)).collect();
    check_across_files(files, notes, config, now)
}

/// The checks of one file alone (its errors go onto it): what they find depends only on the
/// file and the config, so an unchanged file's result can be kept from one load to the next.
/// Returns the file's warnings.
pub fn check_file(f: &mut LoadedFile, config: &Config) -> Vec<Diagnostic> {
    let mut errs = Vec::new();
    let mut warns = Vec::new();
    for o in &f.objects {
        check_object(f, o, config, &mut errs, &mut warns);
    }
    f.errors.extend(errs);
    warns
}

/// The checks across files, to a fixpoint, over files each already checked alone (`notes`:
/// each file's warnings from `check_file`, in the same order); returns the warnings of the
/// files that stay valid, then the expiry warnings.
pub fn check_across_files(
    files: &mut [LoadedFile],
    notes: Vec<Vec<Diagnostic>>,
    config: &Config,
    now: DateTime<Utc>,
) -> Vec<Diagnostic> {
    let notes: Vec<(usize, Diagnostic)> = notes
        .into_iter()
        .enumerate()
        .flat_map(|(i, ws)| ws.into_iter().map(move |w| (i, w)))
        .collect();
    loop {
        let new = check_across(files, config);
        if new.is_empty() {
            break;
        }
        // A file gets new errors only while it has none, so each pass's are deduplicated
        // among themselves (a set per file: a linear search would be quadratic).
        let mut seen: BTreeSet<(usize, u32, u32, &'static str, String)> = BTreeSet::new();
        for (i, d) in new {
            if seen.insert((i, d.line, d.column, d.code, d.message.clone())) {
                files[i].errors.push(d);
            }
        }
    }
    let mut warnings: Vec<Diagnostic> = notes
        .into_iter()
        .filter(|(i, _)| files[*i].errors.is_empty())
        .map(|(_, w)| w)
        .collect();
    for f in files.iter().filter(|f| f.errors.is_empty()) {
        for o in &f.objects {
            if let Document::Session(s) = o
                && let Some(exp) = s.spec.expires
                && exp <= now
            {
                let what = match s.spec.on_expiry {
                    ExpiryAction::Stop => "stopped",
                    ExpiryAction::Destroy => "destroyed",
                };
                warnings.push(
                    Diagnostic::warning(
                        "expired",
                        &f.display,
                        s.at("expires"),
                        format!(
                            "session `{}` expired at {}; it will be {what}",
                            s.spec.name,
                            exp.to_rfc3339()
                        ),
                    )
                    .with_lines(&f.lines)
                    .with_help("move `expires` into the future, or remove the session"),
                );
            }
        }
    }
    warnings
}

fn check_name<T>(f: &LoadedFile, kind: Kind, name: &str, doc: &Doc<T>, out: &mut Vec<Diagnostic>) {
    if let Some(p) = dns_label_problem(name) {
        out.push(f.error("invalid-name", doc.at("name"), format!("{kind} name {p}")));
    }
}

fn check_object(
    f: &LoadedFile,
    o: &Document,
    config: &Config,
    out: &mut Vec<Diagnostic>,
    warn: &mut Vec<Diagnostic>,
) {
    match o {
        Document::Plan(p) => {
            check_name(f, Kind::Plan, &p.spec.name, p, out);
            check_provider(f, p, config, out, warn);
            for name in p.spec.ports.keys() {
                if let Some(problem) = dns_label_problem(name) {
                    out.push(f.error(
                        "invalid-name",
                        p.at(&format!("ports.{name}#key")),
                        format!("port name {problem}"),
                    ));
                }
            }
            let kinds = p.spec.compute.kinds();
            let needs_command = kinds.contains(&ComputeKind::Process);
            // A proxmox guest is cloned from a template, not run from an image.
            let needs_image = kinds
                .iter()
                .find(|k| !matches!(k, ComputeKind::Process | ComputeKind::Proxmox));
            if kinds.contains(&ComputeKind::Proxmox) && p.spec.template.is_none() {
                out.push(
                    f.error(
                        "missing-field",
                        p.at("compute"),
                        format!(
                            "plan `{}` uses proxmox compute but has no `template`",
                            p.spec.name
                        ),
                    )
                    .with_help(
                        "add `template: <VMID or name>` (a template of the plan's `guest` type)",
                    ),
                );
            }
            if let Some(snap) = &p.spec.snapshots {
                if let Err(e) = snap.check() {
                    out.push(f.error(
                        "invalid-value",
                        p.at("snapshots"),
                        format!(
                            "plan `{}` has a snapshot schedule vessel cannot use: {e}",
                            p.spec.name
                        ),
                    ));
                }
                if !kinds.contains(&ComputeKind::Proxmox) {
                    out.push(
                        f.error(
                            "invalid-value",
                            p.at("snapshots"),
                            format!(
                                "plan `{}` asks for snapshots, but only proxmox guests are snapshotted",
                                p.spec.name
                            ),
                        )
                        .with_help("remove `snapshots`, or run the plan on `compute: proxmox`"),
                    );
                }
            }
            if needs_command && p.spec.command.is_empty() {
                out.push(
                    f.error("missing-field", p.at("compute"), format!("plan `{}` runs local processes but has no `command`", p.spec.name))
                        .with_help("add `command: [program, arg, ...]`; `{port.NAME}` stands for a session's port"),
                );
            }
            if let Some(kind) = needs_image
                && p.spec.image.is_none()
            {
                out.push(
                    f.error(
                        "missing-field",
                        p.at("compute"),
                        format!(
                            "plan `{}` uses {} compute but has no `image`",
                            p.spec.name,
                            kind.as_str()
                        ),
                    )
                    .with_help("add `image: ...`"),
                );
            }
            if let Some(depth) = p.spec.sleep
                && let Some(kind) = p
                    .spec
                    .compute
                    .kinds()
                    .iter()
                    .find(|k| !k.sleep_depths().contains(&depth))
            {
                out.push(
                    f.error(
                        "unsupported",
                        p.at("sleep"),
                        format!(
                            "plan `{}` sleeps at depth `{}`, which {} sessions cannot",
                            p.spec.name,
                            depth.as_str(),
                            kind.as_str()
                        ),
                    )
                    .with_help("use `sleep: stop`"),
                );
            }
            if let Some(port) = p.spec.health.as_ref().and_then(|h| h.port.as_ref())
                && !p.spec.ports.contains_key(port)
            {
                out.push(unknown_port(
                    f,
                    p.at("health.port"),
                    port,
                    &p.spec.name,
                    p.spec.ports.keys().map(String::as_str),
                ));
            }
            if let Some(c) = p.spec.cpus
                && !(c > 0.0 && c.is_finite())
            {
                out.push(f.error(
                    "invalid-value",
                    p.at("cpus"),
                    format!("cpus must be a positive number, not {c}"),
                ));
            }
        }
        Document::Session(s) => {
            check_name(f, Kind::Session, &s.spec.name, s, out);
            if let Some(src) = &s.spec.source
                && let Some(problem) = source_path_problem(&src.path, &config.source_roots)
            {
                out.push(
                    f.error("invalid-source", s.at("source.path"), problem.0)
                        .with_help(problem.1),
                );
            }
        }
        Document::Route(r) => {
            check_name(f, Kind::Route, &r.spec.name, r, out);
            if let Some(p) = hostname_problem(&r.spec.host) {
                out.push(f.error("invalid-host", r.at("host"), p));
            }
            if let Some(p) = r.spec.path.as_deref().and_then(path_problem) {
                out.push(f.error("invalid-path", r.at("path"), p));
            }
            if r.spec.strip_prefix && r.spec.prefix().is_none() {
                out.push(
                    f.error(
                        "invalid-value",
                        r.at("strip_prefix"),
                        format!("route `{}` strips a prefix but has no `path`", r.spec.name),
                    )
                    .with_help("add `path: /PREFIX`, or remove `strip_prefix`"),
                );
            }
        }
    }
}

/// A plan's compute kind must have a provider behind it; fields that provider ignores are
/// worth a warning.
fn check_provider(
    f: &LoadedFile,
    p: &Doc<crate::model::PlanSpec>,
    config: &Config,
    out: &mut Vec<Diagnostic>,
    warn: &mut Vec<Diagnostic>,
) {
    let c = &config.providers.compute;
    let registered = crate::config::ComputeProviders::REGISTERED;
    let kinds = p.spec.compute.kinds();
    for &kind in kinds {
        if !registered.contains(&kind) {
            let known: Vec<String> = registered
                .iter()
                .map(|k| format!("`compute: {}`", k.as_str()))
                .collect();
            out.push(
                f.error(
                    "no-provider",
                    p.at("compute"),
                    format!(
                        "plan `{}` runs on `{}`, which this version of vessel has no provider for",
                        p.spec.name,
                        kind.as_str()
                    ),
                )
                .with_help(format!("use {}", known.join(" or "))),
            );
            return;
        }
    }
    // A preference list needs one configured provider; the others fall through as gaps.
    if !kinds.iter().any(|k| c.has(*k)) {
        let kind = p.spec.compute.first();
        let names: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
        out.push(
            f.error(
                "no-provider",
                p.at("compute"),
                format!(
                    "plan `{}` runs on `{}`, but the config has no {} provider",
                    p.spec.name,
                    names.join("` or `"),
                    names.join(" or ")
                ),
            )
            .with_help(format!(
                "add `providers.compute.{}` to the config (examples/{} shows one)",
                kind.as_str(),
                if kind == ComputeKind::Docker {
                    "docker/vessel.yaml"
                } else {
                    "full/vessel.yaml"
                }
            )),
        );
    }
    let s = &p.spec;
    let set = [
        ("image", s.image.is_some()),
        ("command", !s.command.is_empty()),
        ("env", !s.env.is_empty()),
        ("cpus", s.cpus.is_some()),
        ("memory", s.memory.is_some()),
        ("disk", s.disk.is_some()),
    ];
    for (field, present) in set {
        let ignored = |k: &ComputeKind| {
            crate::model::field_change(*k, field) == crate::model::FieldChange::Ignored
        };
        if present && kinds.iter().all(ignored) {
            let names: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
            warn.push(
                Diagnostic::warning(
                    "ignored-field",
                    &f.display,
                    p.at(field),
                    format!(
                        "`{field}` of plan `{}` is ignored: the {} provider does not use it",
                        s.name,
                        names.join(" and ")
                    ),
                )
                .with_lines(&f.lines),
            );
        }
    }
}

fn unknown_port<'a>(
    f: &LoadedFile,
    pos: Pos,
    port: &str,
    plan: &str,
    known: impl Iterator<Item = &'a str> + Clone,
) -> Diagnostic {
    let help = match did_you_mean(port, known.clone()) {
        Some(k) => format!("did you mean `{k}`?"),
        None => format!("plan `{plan}` has ports: {}", name_list(known, LISTED)),
    };
    f.error(
        "unknown-port",
        pos,
        format!("plan `{plan}` has no port named `{port}`"),
    )
    .with_help(help)
}

/// Why `path` may not be a session's source, with a hint; `None` if it may.
pub fn source_path_problem(path: &Path, roots: &[std::path::PathBuf]) -> Option<(String, String)> {
    if !path.is_absolute() {
        return Some((
            format!("source path `{}` is relative", path.display()),
            "write an absolute path, such as `/srv/projects/user-1`".into(),
        ));
    }
    if path.components().any(|c| matches!(c, Component::ParentDir)) {
        return Some((
            format!("source path `{}` contains `..`", path.display()),
            "write the path without `..`".into(),
        ));
    }
    if !roots.is_empty() && !roots.iter().any(|r| path.starts_with(r)) {
        let list: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
        return Some((
            format!(
                "source path `{}` is outside the allowed source roots",
                path.display()
            ),
            format!("the config allows: {}", list.join(", ")),
        ));
    }
    None
}

/// One pass of cross-file checks over the files that have no errors yet.
fn check_across(files: &[LoadedFile], config: &Config) -> Vec<(usize, Diagnostic)> {
    let mut new = Vec::new();
    let valid: Vec<usize> = (0..files.len())
        .filter(|i| files[*i].errors.is_empty())
        .collect();
    // Held: names in quarantined files, with the file that holds them.
    let mut held: BTreeMap<&Held, &Path> = BTreeMap::new();
    for f in files.iter().filter(|f| !f.errors.is_empty()) {
        for h in &f.held {
            held.entry(h).or_insert(&f.display);
        }
    }
    let is_held = |kind: Kind, name: &str| {
        held.get(&Held {
            kind,
            name: name.to_string(),
        })
        .copied()
    };

    // Duplicate names, per kind.
    let mut by_name: BTreeMap<(Kind, &str), Vec<(usize, Pos)>> = BTreeMap::new();
    for &i in &valid {
        for o in &files[i].objects {
            let pos = match o {
                Document::Plan(d) => d.at("name"),
                Document::Session(d) => d.at("name"),
                Document::Route(d) => d.at("name"),
            };
            by_name
                .entry((o.kind(), o.name()))
                .or_default()
                .push((i, pos));
        }
    }
    for ((kind, name), defs) in &by_name {
        if let Some(other) = is_held(*kind, name) {
            for (i, pos) in defs {
                new.push((
                    *i,
                    files[*i]
                        .error(
                            "duplicate-name",
                            *pos,
                            format!("{kind} `{name}` is also defined in {}", other.display()),
                        )
                        .with_help("that file has errors; each name may be defined once"),
                ));
            }
        }
        if defs.len() > 1 {
            for (n, (i, pos)) in defs.iter().enumerate() {
                let (oi, opos) = defs[if n == 0 { 1 } else { 0 }];
                new.push((
                    *i,
                    files[*i]
                        .error(
                            "duplicate-name",
                            *pos,
                            format!("{kind} `{name}` is defined more than once"),
                        )
                        .with_help(format!(
                            "also defined at {}:{}:{}; rename or remove one",
                            files[oi].display.display(),
                            opos.line,
                            opos.column
                        )),
                ));
            }
        }
    }

    // References.
    let plans: BTreeMap<&str, &Doc<_>> = valid
        .iter()
        .flat_map(|i| files[*i].objects.iter())
        .filter_map(|o| match o {
            Document::Plan(p) => Some((p.spec.name.as_str(), p)),
            _ => None,
        })
        .collect();
    let sessions: BTreeMap<&str, (usize, &Doc<_>)> = valid
        .iter()
        .flat_map(|i| files[*i].objects.iter().map(move |o| (*i, o)))
        .filter_map(|(i, o)| match o {
            Document::Session(s) => Some((s.spec.name.as_str(), (i, s))),
            _ => None,
        })
        .collect();
    for &i in &valid {
        let f = &files[i];
        for o in &f.objects {
            match o {
                Document::Session(s) => {
                    let plan = s.spec.plan.as_str();
                    if plans.contains_key(plan) {
                        continue;
                    }
                    let d = match is_held(Kind::Plan, plan) {
                        Some(other) => f
                            .error("held-reference", s.at("plan"), format!("session `{}` uses plan `{plan}`, which is in a file with errors", s.spec.name))
                            .with_help(format!("fix {} first", other.display())),
                        None => {
                            let help = match did_you_mean(plan, plans.keys().copied()) {
                                Some(p) => format!("did you mean `{p}`?"),
                                None if plans.is_empty() => "no plans are defined; add a `kind: Plan` document".into(),
                                None => format!("known plans: {}", name_list(plans.keys().copied(), LISTED)),
                            };
                            f.error("missing-plan", s.at("plan"), format!("session `{}` names plan `{plan}`, which does not exist", s.spec.name))
                                .with_label("no such plan")
                                .with_help(help)
                        }
                    };
                    new.push((i, d));
                }
                Document::Route(r) => {
                    let sess = r.spec.session.as_str();
                    match sessions.get(sess) {
                        Some((_, s)) => {
                            if let Some(plan) = plans.get(s.spec.plan.as_str())
                                && !plan.spec.ports.contains_key(&r.spec.port)
                            {
                                new.push((
                                    i,
                                    unknown_port(
                                        f,
                                        r.at("port"),
                                        &r.spec.port,
                                        &plan.spec.name,
                                        plan.spec.ports.keys().map(String::as_str),
                                    ),
                                ));
                            }
                        }
                        None => {
                            let d = match is_held(Kind::Session, sess) {
                                Some(other) => f
                                    .error("held-reference", r.at("session"), format!("route `{}` names session `{sess}`, which is in a file with errors", r.spec.name))
                                    .with_help(format!("fix {} first", other.display())),
                                None => {
                                    let help = match did_you_mean(sess, sessions.keys().copied()) {
                                        Some(p) => format!("did you mean `{p}`?"),
                                        None => "add a `kind: Session` with that name, or fix the route".into(),
                                    };
                                    f.error("missing-session", r.at("session"), format!("route `{}` names session `{sess}`, which does not exist", r.spec.name))
                                        .with_label("no such session")
                                        .with_help(help)
                                }
                            };
                            new.push((i, d));
                        }
                    }
                }
                Document::Plan(_) => {}
            }
        }
    }

    // Two routes, explicit or from templates, claiming one host.
    // (file, position, who, explicit route?)
    let mut hosts: BTreeMap<String, Vec<(usize, Pos, String, bool)>> = BTreeMap::new();
    for (name, (i, s)) in &sessions {
        if let Some(plan) = plans.get(s.spec.plan.as_str()) {
            let owner = s.spec.owner.as_deref();
            if owner.is_none()
                && let Some(t) = config
                    .routes
                    .templates
                    .iter()
                    .find(|t| t.host.contains("{owner}"))
            {
                new.push((
                    *i,
                    files[*i]
                        .error(
                            "missing-owner",
                            s.at("name"),
                            format!(
                                "session `{name}` has no `owner`, and the route template `{}` names one",
                                t.host
                            ),
                        )
                        .with_help("add `owner: NAME` to the session"),
                ));
                continue;
            }
            for r in template_routes(
                name,
                owner,
                &plan.spec,
                &config.routes.templates,
                &config.domain,
            ) {
                let port_name = r.port_name;
                hosts.entry(r.host).or_default().push((
                    *i,
                    s.at("name"),
                    format!("session `{name}` (template for port `{port_name}`)"),
                    false,
                ));
            }
        }
    }
    for &i in &valid {
        for o in &files[i].objects {
            if let Document::Route(r) = o {
                let path = r.spec.prefix();
                let key = crate::model::route_key(&r.spec.host.to_ascii_lowercase(), path);
                let at = r.at(if path.is_some() { "path" } else { "host" });
                hosts.entry(key).or_default().push((
                    i,
                    at,
                    format!("route `{}`", r.spec.name),
                    true,
                ));
            }
        }
    }
    for (host, claims) in &hosts {
        if claims.len() < 2 {
            continue;
        }
        // One error per file involved, at that file's first claim.
        // A route that claims a host a template gives a session is the one at fault.
        let blame_routes_only = claims.iter().any(|c| c.3) && claims.iter().any(|c| !c.3);
        let mut seen = BTreeSet::new();
        for (n, (i, pos, who, explicit)) in claims.iter().enumerate() {
            if (blame_routes_only && !explicit) || !seen.insert(*i) {
                continue;
            }
            // The first others by name (taking them all for each claim would be quadratic).
            let mut others = name_list(
                claims
                    .iter()
                    .enumerate()
                    .filter(|(m, _)| *m != n)
                    .map(|(_, c)| c.2.as_str())
                    .take(LISTED),
                LISTED,
            );
            if claims.len() - 1 > LISTED {
                others.push_str(&format!(", and {} more", claims.len() - 1 - LISTED));
            }
            let d = match crate::model::split_route_key(host) {
                (host, None) => files[*i]
                    .error("host-conflict", *pos, format!("host `{host}` is claimed by {who} and by {others}"))
                    .with_help("each host routes to one place; rename a session or route, or change the template"),
                (host, Some(path)) => {
                    // Only routes have paths: name where each other claim is.
                    let at: Vec<String> = claims
                        .iter()
                        .enumerate()
                        .filter(|(m, _)| *m != n)
                        .map(|(_, (j, p, _, _))| format!("{}:{}:{}", files[*j].display.display(), p.line, p.column))
                        .take(LISTED)
                        .collect();
                    let at = at.join(", ");
                    files[*i]
                        .error("host-conflict", *pos, format!("host `{host}` path `{path}` is claimed by {who} and by {others}"))
                        .with_help(format!("also claimed at {at}; each host and path routes to one place: change one route's `path` or `host`"))
                }
            };
            new.push((*i, d));
        }
    }
    new
}
