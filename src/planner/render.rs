//! Rendering a plan: terraform-like text for people, stable JSON for machines, Markdown for
//! pull-request comments. Pure functions of the plan and the observed state (for field diffs).

use crate::model::plan::{RecordAction, RouteAction, SessionAction};
use std::collections::BTreeMap;
use std::fmt::Write as _;

use similar::TextDiff;

use crate::model::observed::{Observed, RuntimeSpec};

use super::{Action, Object, ObjectChange, Plan, Reason, Step, object_changes};

struct Colors {
    green: &'static str,
    yellow: &'static str,
    red: &'static str,
    cyan: &'static str,
    dim: &'static str,
    bold: &'static str,
    reset: &'static str,
}

impl Colors {
    fn new(on: bool) -> Colors {
        if on {
            Colors {
                green: "\x1b[32m",
                yellow: "\x1b[33m",
                red: "\x1b[31m",
                cyan: "\x1b[36m",
                dim: "\x1b[2m",
                bold: "\x1b[1m",
                reset: "\x1b[0m",
            }
        } else {
            Colors {
                green: "",
                yellow: "",
                red: "",
                cyan: "",
                dim: "",
                bold: "",
                reset: "",
            }
        }
    }

    fn of(&self, c: ObjectChange) -> &'static str {
        match c {
            ObjectChange::Create => self.green,
            ObjectChange::Update | ObjectChange::Follow => self.yellow,
            ObjectChange::Destroy => self.red,
            ObjectChange::Replace => self.cyan,
        }
    }
}

/// The one-line summary.
pub fn summary_line(plan: &Plan) -> String {
    let s = plan.summary;
    let mut line = format!(
        "Plan: {} to create, {} to update, {} to replace, {} to destroy",
        s.create, s.update, s.replace, s.destroy
    );
    if s.deferred > 0 {
        let _ = write!(line, "; {} deferred to the next pass", s.deferred);
    }
    if s.held > 0 {
        let _ = write!(line, "; {} held", s.held);
    }
    line.push('.');
    line
}

/// Steps grouped by the object they act on, in the order objects first appear.
fn grouped(plan: &Plan) -> Vec<(Object, Vec<&Step>)> {
    let mut order: Vec<Object> = Vec::new();
    let mut groups: BTreeMap<Object, Vec<&Step>> = BTreeMap::new();
    for s in &plan.steps {
        let o = s.action.object();
        if !groups.contains_key(&o) {
            order.push(o.clone());
        }
        groups.entry(o).or_default().push(s);
    }
    order
        .into_iter()
        .map(|o| {
            let steps = groups.remove(&o).unwrap_or_default();
            (o, steps)
        })
        .collect()
}

/// The main reason for an object: the first step's that is not a mere follower.
fn headline(steps: &[&Step]) -> String {
    steps
        .iter()
        .find(|s| !matches!(s.reason, Reason::Follows { .. }))
        .or(steps.first())
        .map(|s| s.reason.describe())
        .unwrap_or_default()
}

/// What the object looks like before and after, as `key: value` lines.
fn before_after(
    object: &Object,
    steps: &[&Step],
    observed: &Observed,
) -> (Vec<String>, Vec<String>) {
    match object {
        Object::Session(name) => {
            let with_host = |mut lines: Vec<String>, host: Option<&String>| {
                if let Some(h) = host {
                    lines.push(format!("host: {h}"));
                    lines.sort();
                }
                lines
            };
            let have = observed.sessions.get(name);
            let before = have
                .and_then(|s| s.spec.as_ref())
                .map(RuntimeSpec::lines)
                .map(|l| with_host(l, have.and_then(|s| s.host.as_ref())))
                .unwrap_or_default();
            let created = steps.iter().find_map(|s| match &s.action {
                Action::Session(SessionAction::CreateSession { spec, host, .. }) => {
                    Some(with_host(spec.lines(), host.as_ref()))
                }
                Action::Session(SessionAction::UpdateSession { spec, .. }) => {
                    Some(with_host(spec.lines(), have.and_then(|s| s.host.as_ref())))
                }
                _ => None,
            });
            let destroyed = steps.iter().any(|s| {
                matches!(
                    s.action,
                    Action::Session(SessionAction::DestroySession { .. })
                )
            });
            let after = match created {
                Some(l) => l,
                None if destroyed => Vec::new(),
                None => before.clone(),
            };
            (before, after)
        }
        Object::Route(host) => {
            let before = observed
                .routes
                .get(host)
                .map(|r| vec![format!("upstream: {}", r.upstream)])
                .unwrap_or_default();
            let after = steps.iter().find_map(|s| match &s.action {
                Action::Route(RouteAction::UpsertRoute {
                    upstream,
                    session,
                    port,
                    strip_prefix,
                    upstream_from,
                    ..
                }) => {
                    let upstream = match upstream_from {
                        Some(_) => format!("({session}'s {port} address, once it is made)"),
                        None => upstream.clone(),
                    };
                    let mut lines = vec![
                        format!("upstream: {upstream}"),
                        format!("session: {session}:{port}"),
                    ];
                    if *strip_prefix {
                        lines.push("strip_prefix: true".into());
                    }
                    Some(lines)
                }
                _ => None,
            });
            let after = after.unwrap_or_default();
            let before = if before.is_empty() {
                before
            } else {
                let mut b = before;
                if let Some(r) = observed.routes.get(host)
                    && let Some(s) = &r.session
                {
                    b.push(format!(
                        "session: {s}:{}",
                        after
                            .get(1)
                            .and_then(|l| l.rsplit(':').next())
                            .unwrap_or("?")
                    ));
                }
                if observed.routes.get(host).is_some_and(|r| r.strip_prefix) {
                    b.push("strip_prefix: true".into());
                }
                b
            };
            (before, after)
        }
        Object::Record(_) => {
            let after = steps.iter().find_map(|s| match &s.action {
                Action::Record(RecordAction::UpsertRecord { content, .. }) => {
                    Some(vec![format!("content: {content}")])
                }
                _ => None,
            });
            let before = steps.iter().find_map(|s| match &s.action {
                Action::Record(RecordAction::UpsertRecord { name, rtype, .. })
                | Action::Record(RecordAction::RemoveRecord { name, rtype }) => observed
                    .records
                    .get(&Observed::record_key(name, *rtype))
                    .map(|r| vec![format!("content: {}", r.content)]),
                _ => None,
            });
            (before.unwrap_or_default(), after.unwrap_or_default())
        }
        Object::Snapshot(name) => {
            let before: Vec<String> = observed
                .sessions
                .get(name)
                .and_then(|s| s.snapshots.as_ref())
                .map(|s| {
                    s.taken
                        .iter()
                        .map(|t| format!("snapshot: {}", t.name))
                        .collect()
                })
                .unwrap_or_default();
            let mut after = before.clone();
            for s in steps {
                if let Action::Session(SessionAction::Snapshot { take, prune, .. }) = &s.action {
                    after.retain(|l| !prune.iter().any(|p| l.ends_with(p.as_str())));
                    if let Some(t) = take {
                        after.push(format!("snapshot: {t}"));
                    }
                }
            }
            (before, after)
        }
    }
}

fn join_lines(v: &[String]) -> String {
    let mut s = v.join("\n");
    if !s.is_empty() {
        s.push('\n');
    }
    s
}

/// A unified diff of the object's fields, only for objects that change (not plain creates).
fn field_diff(
    object: &Object,
    steps: &[&Step],
    observed: &Observed,
    change: ObjectChange,
) -> Option<String> {
    let (before, after) = before_after(object, steps, observed);
    if before == after {
        return None;
    }
    match change {
        ObjectChange::Create => Some(after.iter().map(|l| format!("+{l}\n")).collect()),
        ObjectChange::Destroy => None,
        _ => {
            let (a, b) = (join_lines(&before), join_lines(&after));
            let diff = TextDiff::from_lines(&a, &b);
            let mut out = String::new();
            for hunk in diff.unified_diff().context_radius(1).iter_hunks() {
                for change in hunk.iter_changes() {
                    let sign = match change.tag() {
                        similar::ChangeTag::Delete => '-',
                        similar::ChangeTag::Insert => '+',
                        similar::ChangeTag::Equal => ' ',
                    };
                    let _ = write!(out, "{sign}{}", change.value());
                    if !change.value().ends_with('\n') {
                        out.push('\n');
                    }
                }
            }
            Some(out)
        }
    }
}

/// Terraform-like text. Colour only when `color` (the CLI passes "stdout is a TTY").
/// `user-1 expires in 2d 4h (2026-12-31T00:00:00Z)`.
pub fn upcoming_text(u: &crate::model::plan::Upcoming) -> String {
    format!(
        "{} {} in {} ({})",
        u.session,
        u.change.verb(),
        u.after,
        u.at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    )
}

/// `running (asleep since T, paused)`.
fn asleep_text(a: &crate::model::plan::AsleepSession) -> String {
    format!(
        "{} (asleep since {}, {})",
        a.state.as_str(),
        a.since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        match a.depth {
            crate::model::SleepDepth::Stop => "stopped",
            crate::model::SleepDepth::Pause => "paused",
        }
    )
}

pub fn text(plan: &Plan, observed: &Observed, color: bool) -> String {
    let c = Colors::new(color);
    let mut out = String::new();
    let changes = object_changes(plan);
    if plan.steps.is_empty()
        && plan.deferred.is_empty()
        && (!plan.held.is_empty() || !plan.guards.is_empty())
    {
        let _ = writeln!(
            out,
            "Nothing will change now; what is held is listed below."
        );
    } else if plan.steps.is_empty() && plan.deferred.is_empty() {
        let _ = writeln!(out, "No changes. The world matches the desired state.");
    } else if !plan.steps.is_empty() {
        let _ = writeln!(out, "vessel will perform the following actions:\n");
    }
    for (object, steps) in grouped(plan) {
        let change = changes
            .get(&object)
            .copied()
            .unwrap_or(ObjectChange::Update);
        let col = c.of(change);
        let _ = writeln!(
            out,
            "{col}{:>3}{} {}{object}{} {}({}){}",
            change.symbol(),
            c.reset,
            c.bold,
            c.reset,
            c.dim,
            headline(&steps),
            c.reset
        );
        if let Some(diff) = field_diff(&object, &steps, observed, change) {
            for line in diff.lines() {
                let lc = match line.chars().next() {
                    Some('+') => c.green,
                    Some('-') => c.red,
                    _ => "",
                };
                let _ = writeln!(out, "      {lc}{line}{}", c.reset);
            }
        }
    }
    if !plan.deferred.is_empty() {
        let _ = writeln!(
            out,
            "\nDeferred to the next pass (an input does not exist yet):"
        );
        for d in &plan.deferred {
            let (sym, col) = if exists(&d.object, observed) {
                ("~", c.yellow)
            } else {
                ("+", c.green)
            };
            let _ = writeln!(
                out,
                "  {col}{sym}{} {}: waits for {}",
                c.reset,
                d.object,
                d.waiting_for()
            );
        }
    }
    if !observed.gaps.is_empty() {
        let _ = writeln!(
            out,
            "\nCould not observe (nothing there is created or destroyed):"
        );
        for (p, e) in &observed.gaps {
            let _ = writeln!(out, "  {}!{} {p}: {e}", c.red, c.reset);
        }
    }
    if !plan.asleep.is_empty() {
        let _ = writeln!(out, "\nAsleep (converged; the next request wakes them):");
        for a in &plan.asleep {
            let _ = writeln!(
                out,
                "  {}z{} session {}: {}",
                c.dim,
                c.reset,
                a.session,
                asleep_text(a)
            );
        }
    }
    if !plan.upcoming.is_empty() {
        let _ = writeln!(out, "\nComing up (by the clock):");
        for u in &plan.upcoming {
            let _ = writeln!(out, "  {}~{} {}", c.dim, c.reset, upcoming_text(u));
        }
    }
    if !plan.held.is_empty() || !plan.guards.is_empty() {
        let _ = writeln!(out, "\nHeld (left exactly as they are):");
        for g in &plan.guards {
            let _ = writeln!(out, "  {}!{} {}", c.red, c.reset, g.describe());
        }
        if let Some(a) = &plan.approval {
            let _ = writeln!(
                out,
                "  {}!{} to let a running vessel apply exactly these once: vessel approve {a}",
                c.red, c.reset
            );
        }
        for h in &plan.held {
            let _ = writeln!(
                out,
                "  {}!{} {}: {}",
                c.yellow,
                c.reset,
                h.object,
                hold_text(&h.why)
            );
        }
    }
    if !plan.steps.is_empty() {
        let _ = writeln!(out, "\nSteps, in order:");
        let width = plan.steps.len().to_string().len();
        for s in &plan.steps {
            let deps = if s.depends_on.is_empty() {
                String::new()
            } else {
                format!(
                    " {}(after {}){}",
                    c.dim,
                    s.depends_on
                        .iter()
                        .map(|d| (d + 1).to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                    c.reset
                )
            };
            let _ = writeln!(
                out,
                "  {:>width$}. {} {}{deps}",
                s.id + 1,
                s.action.verb(),
                step_target(&s.action)
            );
        }
    }
    let _ = writeln!(out, "\n{}{}{}", c.bold, summary_line(plan), c.reset);
    out
}

fn step_target(a: &Action) -> String {
    match a {
        Action::Route(
            r @ RouteAction::UpsertRoute {
                upstream,
                strip_prefix,
                session,
                port,
                upstream_from,
                ..
            },
        ) => {
            let strip = match (strip_prefix, r.path()) {
                (true, Some(p)) => format!(" (without {p})"),
                _ => String::new(),
            };
            match upstream_from {
                Some(_) => format!("{} -> {session}:{port} once made{strip}", r.key()),
                None => format!("{} -> {upstream}{strip}", r.key()),
            }
        }
        Action::Record(RecordAction::UpsertRecord {
            name,
            rtype,
            content,
            ..
        }) => format!("{name} {} {content}", rtype.as_str()),
        Action::Record(RecordAction::RemoveRecord { name, rtype }) => {
            format!("{name} {}", rtype.as_str())
        }
        Action::Session(SessionAction::SyncSource { session, path, .. }) => {
            format!("{session} <- {}", path.display())
        }
        Action::Session(SessionAction::SaveWork { session, path, .. }) => {
            format!("{session} -> {}", path.display())
        }
        Action::Session(SessionAction::PullImage {
            session,
            image,
            pull,
            host,
            ..
        }) => {
            let on = host
                .as_ref()
                .map(|h| format!(" on {h}"))
                .unwrap_or_default();
            let how = match pull {
                crate::model::PullPolicy::Never => "pull: never; only looked for".to_string(),
                other => format!("pull: {other}"),
            };
            format!("{session}: {image}{on} ({how})")
        }
        Action::Session(SessionAction::CreateSession {
            session,
            host,
            restore,
            spec,
            unreachable,
            ..
        }) => {
            let on = match (unreachable.is_empty(), host) {
                (true, Some(h)) => format!(" on {h}"),
                (true, None) => String::new(),
                (false, h) => format!(
                    " on {}{} ({})",
                    spec.compute.as_str(),
                    h.as_ref().map(|h| format!(" {h}")).unwrap_or_default(),
                    fallback_text(unreachable)
                ),
            };
            let kept = if *restore {
                ", restoring its kept workspace"
            } else {
                ""
            };
            format!("{session}{on}{kept}")
        }
        Action::Session(SessionAction::DestroySession {
            session,
            retain: true,
            ..
        }) => format!("{session}, keeping its workspace"),
        other => match other.object() {
            Object::Session(n) | Object::Route(n) | Object::Record(n) => n,
            Object::Snapshot(n) => n,
        },
    }
}

/// Why a session went to a later choice of its plan's `compute` list: `docker unreachable`.
fn fallback_text(unreachable: &[crate::model::ComputeKind]) -> String {
    let names: Vec<&str> = unreachable.iter().map(|k| k.as_str()).collect();
    format!("{} unreachable", names.join(" and "))
}

/// A create that went to a later choice of its plan's `compute` list, in words:
/// `create alice on process (docker unreachable)`.
fn fallback_line(steps: &[&Step]) -> Option<String> {
    steps.iter().find_map(|s| match &s.action {
        a @ Action::Session(SessionAction::CreateSession { unreachable, .. })
            if !unreachable.is_empty() =>
        {
            Some(format!("{} {}", a.verb(), step_target(a)))
        }
        _ => None,
    })
}

/// Why an object is held, in words.
pub fn hold_text(h: &super::HoldReason) -> String {
    match h {
        super::HoldReason::Cap {
            limit,
            max,
            owner: Some(o),
        } => format!(
            "{o} already runs {max} sessions ({limit} is {max}); it starts when one sleeps, stops or goes"
        ),
        super::HoldReason::Cap {
            limit,
            max,
            owner: None,
        } => format!(
            "{max} sessions already run ({limit} is {max}); it starts when one sleeps, stops or goes"
        ),
        super::HoldReason::Capacity {
            provider,
            host,
            resource,
            needs,
            capacity,
            used,
        } => {
            let host = match host {
                Some(h) => format!("{} host {h}", provider.as_str()),
                None => format!("the {} host", provider.as_str()),
            };
            format!(
                "{host} has {capacity} {resource} for sessions and those that run there have {used}; it needs {needs} (capacity); it starts when room is made"
            )
        }
        super::HoldReason::Unobserved { provider, error } => {
            format!("{provider} could not be observed: {error}")
        }
        super::HoldReason::Quarantined { file: Some(f) } => {
            format!("its file {} has errors", f.display())
        }
        super::HoldReason::Quarantined { file: None } => "it is named in a file with errors".into(),
        super::HoldReason::Foreign => "an object vessel does not own is in the way".into(),
        super::HoldReason::Guarded => "its destroy is held by a guard".into(),
        super::HoldReason::NoAddress => "its session has no address yet (stopped or asleep)".into(),
        super::HoldReason::NoHost { location } => {
            format!("no host of its compute provider is in location `{location}`")
        }
        super::HoldReason::Refused { field, reason } => {
            format!("its `{field}` cannot change that way: {reason}")
        }
        super::HoldReason::SourceMissing { path } => format!(
            "its source path {} does not exist on this machine; it is made once it does",
            path.display()
        ),
        super::HoldReason::Duplicate { providers } => format!(
            "{} compute providers each report a session of this name ({}); remove all but one by hand",
            providers.len(),
            providers
                .iter()
                .map(|k| k.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        super::HoldReason::Settling { file, until } => format!(
            "{} changed moments ago; what the change takes away waits until {} (it must stay unchanged that long)",
            file.display(),
            until.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        ),
    }
}

/// Stable, pretty JSON (schema: `schemas/plan-output.schema.json`).
pub fn json(plan: &Plan) -> String {
    let mut s =
        serde_json::to_string_pretty(plan).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    s.push('\n');
    s
}

/// Markdown for a pull-request comment.
pub fn markdown(plan: &Plan, observed: &Observed) -> String {
    let mut out = String::new();
    let changes = object_changes(plan);
    let _ = writeln!(out, "### vessel plan\n");
    if plan.is_empty() && plan.held.is_empty() {
        let _ = writeln!(out, "No changes. The world matches the desired state.");
        return out;
    }
    let _ = writeln!(out, "**{}**\n", summary_line(plan));
    if !plan.steps.is_empty() {
        let _ = writeln!(out, "| | object | why |\n|---|---|---|");
        for (object, steps) in grouped(plan) {
            let change = changes
                .get(&object)
                .copied()
                .unwrap_or(ObjectChange::Update);
            let mut why = headline(&steps);
            if let Some(line) = fallback_line(&steps) {
                why = format!("{why}; {line}");
            }
            let _ = writeln!(
                out,
                "| `{}` | {} | {} |",
                change.symbol(),
                md_object(&object),
                md_escape(&why)
            );
        }
        out.push('\n');
    }
    if !plan.deferred.is_empty() {
        let _ = writeln!(out, "**Deferred to the next pass**\n");
        for d in &plan.deferred {
            let sym = if exists(&d.object, observed) {
                "~"
            } else {
                "+"
            };
            let _ = writeln!(
                out,
                "- `{sym}` {}: waits for {}",
                md_object(&d.object),
                md_escape(&d.waiting_for())
            );
        }
        out.push('\n');
    }
    if !observed.gaps.is_empty() {
        let _ = writeln!(
            out,
            "**Could not observe** (nothing there is created or destroyed)\n"
        );
        for (p, e) in &observed.gaps {
            let _ = writeln!(out, "- :x: `{p}`: {}", md_escape(e));
        }
        out.push('\n');
    }
    if !plan.asleep.is_empty() {
        let _ = writeln!(out, "**Asleep** (converged; the next request wakes them)\n");
        for a in &plan.asleep {
            let _ = writeln!(
                out,
                "- :zzz: session `{}`: {}",
                a.session,
                md_escape(&asleep_text(a))
            );
        }
        out.push('\n');
    }
    if !plan.upcoming.is_empty() {
        let _ = writeln!(out, "**Coming up** (by the clock)\n");
        for u in &plan.upcoming {
            let _ = writeln!(out, "- :clock3: {}", md_escape(&upcoming_text(u)));
        }
        out.push('\n');
    }
    if !plan.held.is_empty() || !plan.guards.is_empty() {
        let _ = writeln!(out, "**Held** (left exactly as they are)\n");
        for g in &plan.guards {
            let _ = writeln!(out, "- :warning: {}", md_escape(&g.describe()));
        }
        if let Some(a) = &plan.approval {
            let _ = writeln!(
                out,
                "- :key: to let a running vessel apply exactly these once: `vessel approve {a}`"
            );
        }
        for h in &plan.held {
            let _ = writeln!(
                out,
                "- {}: {}",
                md_object(&h.object),
                md_escape(&hold_text(&h.why))
            );
        }
        out.push('\n');
    }
    let mut diffs = String::new();
    for (object, steps) in grouped(plan) {
        let change = changes
            .get(&object)
            .copied()
            .unwrap_or(ObjectChange::Update);
        if let Some(d) = field_diff(&object, &steps, observed, change) {
            let _ = writeln!(diffs, "# {object}\n{d}");
        }
    }
    if !diffs.is_empty() {
        let _ = writeln!(
            out,
            "<details><summary>Field changes</summary>\n\n```diff\n{}```\n\n</details>",
            diffs
        );
    }
    out
}

fn exists(o: &Object, observed: &Observed) -> bool {
    match o {
        Object::Session(n) => observed.sessions.contains_key(n),
        Object::Snapshot(n) => observed
            .sessions
            .get(n)
            .is_some_and(|s| s.snapshots.as_ref().is_some_and(|s| !s.taken.is_empty())),
        Object::Route(h) => observed.routes.contains_key(h),
        Object::Record(r) => {
            let mut it = r.rsplitn(2, ' ');
            let (ty, name) = (it.next().unwrap_or(""), it.next().unwrap_or(""));
            observed
                .records
                .keys()
                .any(|k| k == &format!("{name}/{ty}"))
        }
    }
}

fn md_object(o: &Object) -> String {
    match o {
        Object::Session(n) => format!("session `{n}`"),
        Object::Route(h) => format!("route `{h}`"),
        Object::Record(r) => format!("dns `{r}`"),
        Object::Snapshot(n) => format!("snapshots of `{n}`"),
    }
}

fn md_escape(s: &str) -> String {
    s.replace('|', "\\|")
}
