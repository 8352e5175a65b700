//! What the status endpoint serves, as types (their JSON Schemas are in `schemas/`). Built
//! from the reconciler's shared view; secret-bearing values (environment values) redacted.

use crate::model::plan::SessionAction;
use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::Serialize;

use crate::desired::effective_routes;
use crate::diag::Diagnostic;
use crate::model::observed::{RecordType, RuntimeSpec, SessionState};
use crate::reconcile::{Activity, Condition, PassReport, Snapshot};
use crate::state::Event;

pub const REDACTED: &str = "<redacted>";

/// `GET /status`.
#[derive(Debug, Serialize, JsonSchema)]
#[schemars(title = "vessel status")]
pub struct StatusView {
    pub version: String,
    pub started: Option<DateTime<Utc>>,
    /// The source revision the last pass applied.
    pub revision: Option<String>,
    /// The first full pass is done and the source loaded.
    pub ready: bool,
    /// The world is as declared: the last pass found nothing to do and held nothing back (no
    /// guard, no quarantined file, no provider it could not observe, no change settling, no
    /// object in the way), and no source change is waiting. Sessions asleep or stopped with
    /// no address do not count against it.
    pub converged: bool,
    /// As `converged`, except that files with errors (and what they hold) are allowed.
    pub converged_allowing_quarantine: bool,
    /// The full commit id the last pass applied, for a git source.
    pub commit: Option<String>,
    /// A source change arrived that no pass has loaded yet.
    pub source_changed: bool,
    /// What is wrong with the source (a fetch, a signature), while it is wrong.
    pub source_error: Option<String>,
    /// Since when it has been wrong.
    pub source_failing_since: Option<DateTime<Utc>>,
    pub passes: u64,
    pub last_pass: Option<PassReport>,
    pub counts: Counts,
    /// Sessions that sleep when idle, by `awake`, `asleep` and `waking`; and requests held
    /// now while their sessions wake.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lifecycle: Option<LifecycleCounts>,
    /// Why it is not converged, in words (empty when it is).
    pub not_converged: Vec<String>,
    pub quarantined: Vec<QuarantinedFile>,
    pub providers: Vec<ProviderStatus>,
    /// Workspaces of destroyed sessions, kept until `until` and restored if the session is
    /// declared again before then.
    pub kept_workspaces: Vec<KeptWorkspace>,
    /// Time-based changes to come (expiries, running hours, dormant cleanup), soonest first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub upcoming: Vec<crate::model::plan::Upcoming>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct KeptWorkspace {
    pub session: String,
    #[serde(flatten)]
    pub kept: crate::model::observed::RetainedWorkspace,
}

#[derive(Debug, Default, Serialize, JsonSchema)]
pub struct Counts {
    pub sessions_desired: usize,
    pub sessions_running: usize,
    pub sessions_stopped: usize,
    pub sessions_failed: usize,
    pub routes: usize,
    pub records: usize,
    pub pending_steps: usize,
    pub deferred: usize,
    pub held: usize,
}

/// Sessions by lifecycle state, and requests held now.
#[derive(Debug, Default, Serialize, JsonSchema)]
pub struct LifecycleCounts {
    pub awake: usize,
    pub asleep: usize,
    pub waking: usize,
    pub held_requests: u64,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct QuarantinedFile {
    pub file: String,
    pub errors: Vec<Diagnostic>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct ProviderStatus {
    pub provider: String,
    pub observed: bool,
    /// `ok`, `degraded` (not observed only because its API rate-limited vessel: it recovers
    /// by itself once the wait is over) or `failed`.
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One entry of `GET /sessions`.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct SessionView {
    pub name: String,
    pub plan: Option<String>,
    pub owner: Option<String>,
    /// `running`, `sleeping` or `stopped`; none when it is no longer declared.
    pub desired_state: Option<String>,
    /// `running`, `stopped` or `failed`; none when it does not exist.
    pub observed_state: Option<String>,
    pub compute: Option<String>,
    pub urls: Vec<String>,
    pub expires: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub conditions: Vec<Condition>,
    /// The file with errors that declares it: it is held as it is until the file is fixed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quarantined: Option<String>,
    /// What is happening to it right now, in words (an image pull's progress).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub activity: Option<String>,
    /// Asleep, awake or waking, for sessions that sleep when idle or are declared `sleeping`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lifecycle: Option<crate::lifecycle::SessionLife>,
    /// vessel's scheduled snapshots of it (oldest first) and the last attempt's failure, for
    /// providers that take them (proxmox).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshots: Option<crate::model::observed::Snapshots>,
}

/// `GET /sessions/{name}`.
#[derive(Debug, Serialize, JsonSchema)]
#[schemars(title = "vessel session status")]
pub struct SessionDetail {
    #[serde(flatten)]
    pub summary: SessionView,
    /// The spec it runs with (environment values redacted).
    pub spec: Option<RuntimeSpec>,
    /// Where each port answers.
    pub endpoints: BTreeMap<String, String>,
    pub events: Vec<Event>,
}

/// One entry of `GET /routes`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct RouteView {
    pub host: String,
    pub session: Option<String>,
    pub port: Option<String>,
    pub upstream: Option<String>,
    pub desired: bool,
    pub served: bool,
    pub owned: bool,
    pub url: String,
}

/// One entry of `GET /dns`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct RecordView {
    pub name: String,
    #[serde(rename = "type")]
    pub rtype: RecordType,
    pub content: String,
    pub owned: bool,
    pub session: Option<String>,
}

/// What the views need besides the shared state.
#[derive(Clone, Debug)]
pub struct Context {
    /// The proxy's port, for URLs (`http://host:port/`).
    pub proxy_port: Option<u16>,
    pub domain: String,
    pub templates: Vec<crate::model::RouteTemplate>,
    /// The git source's mirror, to tell whether a revision is applied (`/revision`).
    pub git_mirror: Option<std::path::PathBuf>,
}

fn state_name(s: SessionState) -> &'static str {
    match s {
        SessionState::Running => "running",
        SessionState::Stopped => "stopped",
        SessionState::Failed => "failed",
    }
}

pub fn status(s: &Snapshot, source_changed: bool) -> StatusView {
    let mut counts = Counts::default();
    if let Some(d) = &s.desired {
        counts.sessions_desired = d.sessions.len();
    }
    if let Some(o) = &s.observed {
        for sess in o.sessions.values().filter(|x| x.owned) {
            match sess.state {
                SessionState::Running => counts.sessions_running += 1,
                SessionState::Stopped => counts.sessions_stopped += 1,
                SessionState::Failed => counts.sessions_failed += 1,
            }
        }
        counts.routes = o.routes.values().filter(|r| r.owned).count();
        counts.records = o.records.values().filter(|r| r.owned).count();
    }
    if let Some(p) = &s.plan {
        counts.pending_steps = p.steps.len();
        counts.deferred = p.deferred.len();
        counts.held = p.held.len();
    }
    let quarantined = s
        .desired
        .as_ref()
        .map(|d| {
            d.quarantined
                .iter()
                .map(|(f, q)| QuarantinedFile {
                    file: f.display().to_string(),
                    errors: q.errors.clone(),
                })
                .collect()
        })
        .unwrap_or_default();
    let gaps = s
        .observed
        .as_ref()
        .map(|o| {
            o.gaps
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect::<BTreeMap<_, _>>()
        })
        .unwrap_or_default();
    let degraded: std::collections::BTreeSet<String> = s
        .observed
        .as_ref()
        .map(|o| o.degraded.keys().map(ToString::to_string).collect())
        .unwrap_or_default();
    let providers = s
        .providers
        .iter()
        .map(|p| ProviderStatus {
            provider: p.clone(),
            observed: s.observed.is_some() && !gaps.contains_key(p),
            state: match (gaps.contains_key(p), degraded.contains(p)) {
                (false, _) => "ok",
                (true, true) => "degraded",
                (true, false) => "failed",
            },
            error: gaps.get(p).cloned(),
        })
        .collect();
    let ready = s.last.as_ref().is_some_and(|l| l.error.is_none());
    let (strict, loose) = convergence(s, ready, source_changed);
    StatusView {
        version: env!("CARGO_PKG_VERSION").to_string(),
        started: s.started,
        revision: s.last.as_ref().and_then(|l| l.revision.clone()),
        ready,
        converged: strict.is_empty(),
        converged_allowing_quarantine: loose.is_empty(),
        commit: s.last.as_ref().and_then(|l| l.commit.clone()),
        not_converged: strict,
        source_changed,
        source_error: s
            .last
            .as_ref()
            .and_then(|l| l.source_error.clone().or_else(|| l.error.clone())),
        source_failing_since: s.source_failing_since,
        passes: s.passes,
        last_pass: s.last.clone(),
        counts,
        lifecycle: None,
        quarantined,
        providers,
        kept_workspaces: s
            .observed
            .iter()
            .flat_map(|o| &o.retained)
            .map(|(name, k)| KeptWorkspace {
                session: name.clone(),
                kept: k.clone(),
            })
            .collect(),
        upcoming: s
            .plan
            .as_ref()
            .map(|p| p.upcoming.clone())
            .unwrap_or_default(),
    }
}

/// Why the world is not as declared (empty: converged), strictly and allowing quarantine.
fn convergence(s: &Snapshot, ready: bool, source_changed: bool) -> (Vec<String>, Vec<String>) {
    let mut why: Vec<(String, bool)> = Vec::new();
    if !ready {
        why.push(("no pass has loaded the source yet".into(), false));
    }
    if source_changed {
        why.push(("a source change is waiting for a pass".into(), false));
    }
    why.extend(not_converged(
        s.plan.as_deref(),
        s.observed.as_deref(),
        s.desired.as_deref(),
    ));
    let loose = why
        .iter()
        .filter(|(_, q)| !q)
        .map(|(w, _)| w.clone())
        .collect();
    (why.into_iter().map(|(w, _)| w).collect(), loose)
}

/// Why a plan against what was observed leaves the world not as declared, each reason with
/// whether it comes only from a file with errors. Sessions asleep or stopped with no address
/// do not count.
pub fn not_converged(
    plan: Option<&crate::model::plan::Plan>,
    observed: Option<&crate::model::observed::Observed>,
    desired: Option<&crate::desired::Desired>,
) -> Vec<(String, bool)> {
    use crate::model::plan::{Guard, HoldReason};
    let mut why: Vec<(String, bool)> = Vec::new();
    if let Some(p) = plan {
        if !p.steps.is_empty() {
            why.push((format!("{} step(s) pending", p.steps.len()), false));
        }
        if !p.deferred.is_empty() {
            let n = p.deferred.len();
            why.push((format!("{n} step(s) deferred to the next pass"), false));
        }
        for g in &p.guards {
            let quarantine = matches!(g, Guard::UnknownObjects { .. });
            why.push((g.describe(), quarantine));
        }
        for h in &p.held {
            match &h.why {
                HoldReason::NoAddress => {}
                HoldReason::Quarantined { .. } => {
                    why.push((format!("{} is held by a file with errors", h.object), true))
                }
                other => why.push((
                    format!(
                        "{} is held: {}",
                        h.object,
                        crate::planner::render::hold_text(other)
                    ),
                    false,
                )),
            }
        }
    }
    if let Some(o) = observed {
        for (p, e) in &o.gaps {
            if o.degraded.contains_key(p) {
                why.push((
                    format!("{p} is degraded (rate-limited, waiting): {e}"),
                    false,
                ));
            } else {
                why.push((format!("{p} could not be observed: {e}"), false));
            }
        }
    }
    if let Some(d) = desired {
        for f in d.quarantined.keys() {
            why.push((
                format!("{} has errors (its objects are held)", f.display()),
                true,
            ));
        }
    }
    why
}

pub fn sessions(s: &Snapshot, ctx: &Context, now: &Activity) -> Vec<SessionView> {
    let mut names: Vec<String> = s
        .desired
        .iter()
        .flat_map(|d| d.sessions.keys().cloned())
        .collect();
    // Sessions a file with errors declares: shown, with their file.
    let mut quarantined: BTreeMap<String, String> = BTreeMap::new();
    if let Some(d) = &s.desired {
        for (file, q) in &d.quarantined {
            for h in q
                .held
                .iter()
                .filter(|h| h.kind == crate::model::Kind::Session)
            {
                quarantined
                    .entry(h.name.clone())
                    .or_insert_with(|| file.display().to_string());
            }
        }
    }
    names.extend(quarantined.keys().cloned());
    // Sessions something is happening to now (a first pass pulling their image, before any
    // snapshot lists them).
    names.extend(now.sessions.keys().cloned());
    if let Some(o) = &s.observed {
        names.extend(
            o.sessions
                .iter()
                .filter(|(_, x)| x.owned)
                .map(|(k, _)| k.clone()),
        );
    }
    names.sort();
    names.dedup();
    let mut hosts: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    if let Some(d) = &s.desired {
        for r in effective_routes(d, &ctx.templates, &ctx.domain, |_| true) {
            hosts
                .entry(r.session)
                .or_default()
                .push(crate::desired::route_url(&r.host, ctx.proxy_port));
        }
    }
    names
        .into_iter()
        .map(|name| {
            let want = s.desired.as_ref().and_then(|d| d.sessions.get(&name));
            let have = s.observed.as_ref().and_then(|o| o.sessions.get(&name));
            SessionView {
                plan: want.map(|w| w.spec.plan.clone()),
                owner: want.and_then(|w| w.spec.owner.clone()),
                desired_state: want.map(|w| w.spec.state.as_str().to_string()),
                observed_state: have.map(|h| state_name(h.state).to_string()),
                compute: have.map(|h| h.provider.as_str().to_string()),
                urls: hosts.get(name.as_str()).cloned().unwrap_or_default(),
                expires: want.and_then(|w| w.spec.expires),
                last_error: s.last_errors.get(&name).cloned(),
                conditions: s.conditions.get(&name).cloned().unwrap_or_default(),
                quarantined: quarantined.get(&name).cloned(),
                activity: now.sessions.get(&name).cloned(),
                lifecycle: None,
                snapshots: have.and_then(|h| h.snapshots.clone()),
                name,
            }
        })
        .collect()
}

pub fn session(s: &Snapshot, ctx: &Context, now: &Activity, name: &str) -> Option<SessionDetail> {
    let summary = sessions(s, ctx, now).into_iter().find(|v| v.name == name)?;
    let have = s.observed.as_ref().and_then(|o| o.sessions.get(name));
    let spec = have.and_then(|h| h.spec.clone()).map(|mut spec| {
        for v in spec.env.values_mut() {
            *v = REDACTED.to_string();
        }
        spec
    });
    let object = format!("session {name}");
    let mut events: Vec<Event> = s
        .events
        .iter()
        .rev()
        .filter(|e| e.object == object)
        .take(50)
        .cloned()
        .collect();
    events.reverse();
    Some(SessionDetail {
        summary,
        spec,
        endpoints: have.map(|h| h.endpoints.clone()).unwrap_or_default(),
        events,
    })
}

pub fn routes(s: &Snapshot, ctx: &Context) -> Vec<RouteView> {
    let mut out: BTreeMap<String, RouteView> = BTreeMap::new();
    if let Some(d) = &s.desired {
        for r in effective_routes(d, &ctx.templates, &ctx.domain, |_| true) {
            out.insert(
                r.key.clone(),
                RouteView {
                    url: crate::desired::route_url(&r.key, ctx.proxy_port),
                    host: r.key,
                    session: Some(r.session.to_string()),
                    port: Some(r.port_name.to_string()),
                    upstream: None,
                    desired: true,
                    served: false,
                    owned: true,
                },
            );
        }
    }
    if let Some(o) = &s.observed {
        for (h, r) in &o.routes {
            let e = out.entry(h.clone()).or_insert_with(|| RouteView {
                host: h.clone(),
                session: r.session.clone(),
                port: None,
                upstream: None,
                desired: false,
                served: false,
                owned: r.owned,
                url: crate::desired::route_url(h, ctx.proxy_port),
            });
            e.upstream = Some(r.upstream.clone());
            e.served = true;
            e.owned = r.owned;
        }
    }
    out.into_values().collect()
}

pub fn records(s: &Snapshot) -> Vec<RecordView> {
    s.observed
        .iter()
        .flat_map(|o| o.records.values())
        .map(|r| RecordView {
            name: r.name.clone(),
            rtype: r.rtype,
            content: r.content.clone(),
            owned: r.owned,
            session: r.session.clone(),
        })
        .collect()
}

/// The plan with environment values redacted (they may hold secrets).
pub fn redact_plan(plan: &crate::model::plan::Plan) -> crate::model::plan::Plan {
    let mut p = plan.clone();
    for step in &mut p.steps {
        if let crate::model::plan::Action::Session(SessionAction::CreateSession { spec, .. }) =
            &mut step.action
        {
            let mut redacted = (**spec).clone();
            for v in redacted.env.values_mut() {
                *v = REDACTED.to_string();
            }
            *spec = std::sync::Arc::new(redacted);
        }
    }
    p
}

/// The observed state with environment values redacted.
pub fn redact_observed(
    observed: &crate::model::observed::Observed,
) -> crate::model::observed::Observed {
    let mut o = observed.clone();
    for s in o.sessions.values_mut() {
        if let Some(spec) = &mut s.spec {
            for v in spec.env.values_mut() {
                *v = REDACTED.to_string();
            }
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_and_observed_specs_are_served_without_env_values() {
        let spec = RuntimeSpec {
            compute: crate::model::ComputeKind::Process,
            image: None,
            guest: None,
            template: None,
            clone: None,
            storage: None,
            pull: None,
            command: vec![],
            env: [("API_KEY".to_string(), "hunter2".to_string())]
                .into_iter()
                .collect(),
            cpus: None,
            memory: None,
            disk: None,
            ports: BTreeMap::new(),
            health: None,
            firewall: None,
            hotplug: false,
            stop_timeout: None,
        };
        let mut plan = crate::model::plan::Plan::default();
        plan.steps.push(crate::model::plan::Step {
            id: 0,
            action: crate::model::plan::Action::Session(SessionAction::CreateSession {
                session: "a".into(),
                spec: std::sync::Arc::new(spec.clone()),
                fingerprint: "f".into(),
                source_file: "a.yaml".into(),
                save_to: None,
                start: true,
                host: None,
                restore: false,
                unreachable: Vec::new(),
            }),
            reason: crate::model::plan::Reason::Missing,
            depends_on: vec![],
        });
        let json = crate::planner::render::json(&redact_plan(&plan));
        assert!(
            json.contains("API_KEY") && !json.contains("hunter2"),
            "{json}"
        );
        let mut observed = crate::model::observed::Observed::default();
        observed.sessions.insert(
            "b".into(),
            crate::model::observed::ObservedSession {
                name: "b".into(),
                provider: crate::model::ComputeKind::Process,
                state: SessionState::Running,
                owned: true,
                fingerprint: "x".into(),
                spec: Some(spec),
                endpoints: BTreeMap::new(),
                source_file: None,
                synced_source: None,
                save_to: None,
                healthy: None,
                host: None,
                asleep: None,
                started: None,
                snapshots: None,
                half_made: None,
            },
        );
        let text =
            crate::planner::render::text(&redact_plan(&plan), &redact_observed(&observed), false);
        assert!(!text.contains("hunter2"), "{text}");
    }
}
