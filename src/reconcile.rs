//! One reconcile pass, from scratch every time: load the desired tree, observe, keep the
//! snapshot, plan, execute, record. Triggers only decide when a pass runs, never what it does.
//!
//! Retrying is this loop's job: an object whose step failed backs off (exponentially, with
//! jitter, per object), so one broken session never slows the others.

use crate::model::plan::{
    Action, Object, Plan, Reason, RecordAction, RouteAction, SessionAction, Step, Summary,
};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::desired::Desired;
use crate::exec::{ExecOptions, Outcome, StepResult, execute};
use crate::load::LoadCache;
use crate::model::ComputeKind;
use crate::model::observed::Observed;
use crate::planner::plan;
use crate::providers::Providers;
use crate::settle::{Root, SourceHistory};
use crate::state::{Event, StateDir};

/// What started a pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    Startup,
    /// The desired tree changed on disk.
    Source,
    /// The periodic full pass.
    Resync,
    /// An expiry or a backoff came due.
    Timer,
    /// A provider said something changed by itself.
    Provider,
    /// The previous pass made progress and left work for the next.
    Followup,
    /// A one-shot `vessel apply`.
    Apply,
    /// A signed webhook asked for a fetch.
    Webhook,
    /// `vessel approve` approved held destroys.
    Approval,
    /// The config file changed (or SIGHUP).
    Config,
    /// A session was put to sleep or woken.
    Lifecycle,
}

impl Trigger {
    /// Its name, as the JSON and the logs write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Startup => "startup",
            Trigger::Source => "source",
            Trigger::Resync => "resync",
            Trigger::Timer => "timer",
            Trigger::Provider => "provider",
            Trigger::Followup => "followup",
            Trigger::Apply => "apply",
            Trigger::Webhook => "webhook",
            Trigger::Approval => "approval",
            Trigger::Config => "config",
            Trigger::Lifecycle => "lifecycle",
        }
    }
}

impl std::fmt::Display for Trigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What one pass did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PassReport {
    pub pass: u64,
    pub trigger: Trigger,
    pub started: DateTime<Utc>,
    /// The source revision the pass loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Its full commit id, for a git source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    pub duration_ms: u64,
    /// The plan this pass found.
    pub summary: Summary,
    /// Step outcomes by kind (`succeeded`, `failed`, ...).
    pub outcomes: BTreeMap<String, usize>,
    /// The pass found nothing to do: the world matched.
    pub converged: bool,
    /// Some step succeeded, so a follow-up pass may find more to do.
    pub progressed: bool,
    /// Files whose objects are held.
    pub quarantined: Vec<String>,
    /// Providers that could not be observed.
    pub gaps: BTreeMap<String, String>,
    /// A problem that stopped the pass before planning (an unreadable source).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The source could not be refreshed; the pass used its last good revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_error: Option<String>,
    /// When the next timer-driven pass is due (an expiry or a backoff).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_due: Option<DateTime<Utc>>,
    /// A pass on the timer that found nothing changed since a pass that changed nothing, and
    /// so read, observed and planned nothing (its figures are that pass's).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub quiet: bool,
}

/// How long each phase of a pass took, for the debug log.
struct Phases {
    last: Instant,
    took: Vec<(&'static str, Duration)>,
}

impl Phases {
    fn start(t0: Instant) -> Phases {
        Phases {
            last: t0,
            took: Vec::new(),
        }
    }

    /// The phase `name` ends now.
    fn mark(&mut self, name: &'static str) {
        let now = Instant::now();
        self.took.push((name, now - self.last));
        self.last = now;
    }
}

impl std::fmt::Display for Phases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (name, d)) in self.took.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(f, "{sep}{name} {:.1} ms", d.as_secs_f64() * 1000.0)?;
        }
        Ok(())
    }
}

/// An object's failures in a row, and until when its steps wait. A backoff is for one wish:
/// it holds only steps of the same kind (making or taking away) against the same desired spec,
/// so a fixed spec is tried at once and a destroy never waits for failed creates.
struct Backoff {
    failures: u32,
    until: Instant,
    wish: Wish,
}

/// What was being attempted when an object's step failed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Wish {
    removing: bool,
    /// The fingerprint of the session's desired spec, for session steps.
    spec: Option<String>,
}

/// The wish a step serves, given each desired session's spec fingerprint. The steps of a
/// replace (its pull, save and destroy too) all serve making the new session, so a replace
/// that keeps failing backs off as one wish.
fn wish_of(step: &Step, specs: &BTreeMap<&str, String>) -> Wish {
    let action = &step.action;
    let removing = !matches!(step.reason, Reason::Replaced { .. })
        && matches!(
            action,
            Action::Session(
                SessionAction::DestroySession { .. }
                    | SessionAction::StopSession { .. }
                    | SessionAction::SaveWork { .. }
            ) | Action::Route(RouteAction::RemoveRoute { .. })
                | Action::Record(RecordAction::RemoveRecord { .. })
        );
    Wish {
        removing,
        spec: action.session().and_then(|s| specs.get(s).cloned()),
    }
}

/// A session's condition, Kubernetes style: a type, whether it holds, why, and since when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Condition {
    /// `Ready`, `Reconciling` or `Stalled`.
    #[serde(rename = "type")]
    pub kind: String,
    pub status: bool,
    pub reason: String,
    pub since: DateTime<Utc>,
}

/// What a pass leaves for its readers (the status endpoint, metrics, `vessel apply`): one
/// typed snapshot, published whole after every pass on a `watch` channel. Readers never lock
/// the reconciler and never see half a pass.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    pub last: Option<PassReport>,
    pub desired: Option<Arc<Desired>>,
    pub observed: Option<Arc<Observed>>,
    pub plan: Option<Arc<Plan>>,
    /// The step outcomes of the last pass (indices into its plan's steps).
    pub results: Arc<Vec<StepResult>>,
    /// Recent step outcomes, oldest first.
    pub events: Arc<VecDeque<Event>>,
    pub passes: u64,
    /// Conditions by session name.
    pub conditions: Arc<BTreeMap<String, Vec<Condition>>>,
    /// The last error of each session's steps, while it lasts.
    pub last_errors: Arc<BTreeMap<String, String>>,
    /// How many source changes had been seen when the last pass began (see `SourceChanges`).
    pub loaded_changes: u64,
    /// Since when the source has been failing (a git fetch, a verification), while it fails.
    pub source_failing_since: Option<DateTime<Utc>>,
    /// Configured providers, for status.
    pub providers: Vec<String>,
    pub started: Option<DateTime<Utc>>,
}

/// Source changes the watcher has seen, counted. A change is waiting (status must not call the
/// previous pass's result converged) while the count is past the latest snapshot's
/// `loaded_changes`.
#[derive(Debug, Default)]
pub struct SourceChanges {
    count: AtomicU64,
    /// A watcher reports every change of the source tree (while one runs and keeps up).
    watched: std::sync::atomic::AtomicBool,
}

impl SourceChanges {
    pub fn seen(&self) {
        self.count.fetch_add(1, Ordering::SeqCst);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    /// Say whether a watcher reports every change of the source tree: while one does, a pass
    /// on the timer with no change seen need not read the tree again.
    pub fn set_watched(&self, on: bool) {
        self.watched.store(on, Ordering::SeqCst);
    }

    pub fn watched(&self) -> bool {
        self.watched.load(Ordering::SeqCst)
    }
}

/// What a pass that changed nothing left for the next one on the timer to compare with: while
/// no source change was seen, the lifecycle's marks stayed, no provider saw a change and
/// nothing came due, the next such pass would plan the same nothing, so it does nothing.
#[derive(Debug, Clone)]
struct Quiet {
    changes: u64,
    lifecycle: Option<u64>,
    /// The first time the clock decides something (an expiry, a retry, a warning, a file
    /// that settles).
    due: Option<DateTime<Utc>>,
}

/// What is happening to sessions while a pass runs its steps, in words (an image pull's
/// progress), as the compute providers say it; empty between passes. Display only.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Activity {
    /// Moves on with every change (for caches).
    pub seq: u64,
    pub sessions: BTreeMap<String, String>,
}

/// What a reader holds: the latest snapshot, the count of source changes seen, and what is
/// happening now.
#[derive(Debug, Clone)]
pub struct Published {
    snapshot: watch::Receiver<Arc<Snapshot>>,
    changes: Arc<SourceChanges>,
    activity: watch::Receiver<Activity>,
}

impl Published {
    /// The latest snapshot, and whether a source change is waiting for a pass.
    pub fn latest(&self) -> (Arc<Snapshot>, bool) {
        let snap = self.snapshot.borrow().clone();
        let waiting = self.changes.count() > snap.loaded_changes;
        (snap, waiting)
    }

    /// A number that changes whenever what readers see may have changed (for caches).
    pub fn version(&self) -> (u64, u64) {
        (self.snapshot.borrow().passes, self.changes.count())
    }

    /// What is happening to sessions now (while a pass runs its steps).
    pub fn activity(&self) -> Activity {
        self.activity.borrow().clone()
    }
}

/// Called with each snapshot as it is published (metrics count passes and steps with it).
pub type OnPass = Box<dyn Fn(&Snapshot) + Send + Sync>;

pub struct Reconciler {
    pub config: Config,
    pub providers: Providers,
    pub exec: ExecOptions,
    pub allow_destroy: bool,
    state: StateDir,
    backoff: BTreeMap<Object, Backoff>,
    /// What earlier passes loaded: which files are settling.
    history: SourceHistory,
    /// The files the last pass loaded, parsed: a pass reads and parses only what changed.
    load_cache: LoadCache,
    /// Left by the last pass if it changed nothing (see `Quiet`).
    quiet: Option<Quiet>,
    /// When the providers last looked at the world again (`full_resync_interval`).
    last_full: Option<Instant>,
    pass: u64,
    /// `SourceChanges::count` when this pass began.
    changes_at_start: u64,
    seed: u64,
    /// What the next snapshot is built from.
    current: Snapshot,
    tx: watch::Sender<Arc<Snapshot>>,
    changes: Arc<SourceChanges>,
    on_pass: Vec<OnPass>,
    /// What the compute providers say is happening, forwarded while steps run.
    activity: Arc<watch::Sender<Activity>>,
    /// Sleep and wake (the daemon's): what it put to sleep is read into each observation,
    /// and it hears what each pass wants.
    lifecycle: Option<crate::lifecycle::Lifecycle>,
    /// Notifications (the daemon's, when `notify:` has targets): told after each pass, and
    /// dormant destroys before their plan runs.
    notifier: Option<crate::notify::Notifier>,
    /// The proxy's port, for the URLs notifications carry.
    url_port: Option<u16>,
}

/// How many recent events are kept in memory.
const RECENT_EVENTS: usize = 1_000;

impl Reconciler {
    pub fn new(config: Config, providers: Providers, state: StateDir) -> Reconciler {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            | 1;
        let mut names: Vec<String> = providers
            .compute
            .keys()
            .map(|k| crate::model::observed::ProviderId::Compute(*k).to_string())
            .collect();
        names.push("proxy".into());
        if providers.dns.is_some() {
            names.push("dns".into());
        }
        let history = SourceHistory::new(config.policy.settle.std());
        let current = Snapshot {
            providers: names,
            started: Some(Utc::now()),
            ..Snapshot::default()
        };
        let (tx, _) = watch::channel(Arc::new(current.clone()));
        Reconciler {
            config,
            providers,
            exec: ExecOptions::default(),
            allow_destroy: false,
            state,
            backoff: BTreeMap::new(),
            history,
            load_cache: LoadCache::default(),
            quiet: None,
            last_full: None,
            pass: 0,
            changes_at_start: 0,
            seed,
            current,
            tx,
            changes: Arc::default(),
            on_pass: Vec::new(),
            activity: Arc::new(watch::channel(Activity::default()).0),
            lifecycle: None,
            notifier: None,
            url_port: None,
        }
    }

    /// Tell what happens with `n`; URLs in events go through a proxy on `url_port`.
    pub fn set_notifier(&mut self, n: crate::notify::Notifier, url_port: Option<u16>) {
        self.notifier = Some(n);
        self.url_port = url_port;
    }

    /// What each session looks like to notifications after a pass.
    fn notify_facts(
        &self,
        desired: &Desired,
        observed: &Observed,
        plan: &Plan,
        now: DateTime<Utc>,
        source_error: Option<String>,
    ) -> crate::notify::Facts {
        use crate::model::plan::HoldReason as H;
        use crate::notify::SessionFacts;
        // URLs only for the sessions that may be told ready now (not told so already).
        let told = |n: &str| self.notifier.as_ref().is_some_and(|x| x.told_ready(n));
        let mut urls: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for r in crate::desired::effective_routes(
            desired,
            &self.config.routes.templates,
            &self.config.domain,
            |n| !told(n),
        ) {
            urls.entry(r.session)
                .or_default()
                .push(crate::desired::route_url(&r.key, self.url_port));
        }
        let mut held: BTreeMap<&str, String> = BTreeMap::new();
        for h in &plan.held {
            // Holds worth telling: a guard, a cap or capacity, a file with errors, a refused
            // change; not the passing ones (settling, an unobserved provider, no address yet).
            let tell = !matches!(
                h.why,
                H::Settling { .. } | H::Unobserved { .. } | H::NoAddress
            );
            if let (Object::Session(n), true) = (&h.object, tell) {
                held.entry(n.as_str())
                    .or_insert_with(|| crate::planner::render::hold_text(&h.why));
            }
        }
        let mut sessions = BTreeMap::new();
        for (name, d) in &desired.sessions {
            let s = &d.spec;
            let plan_spec = desired.plans.get(&s.plan).map(|p| &p.spec);
            let (live, outside) = match plan_spec {
                Some(ps) => {
                    let (t, _) = crate::planner::timed::timed(s, ps, now);
                    let outside =
                        crate::planner::timed::schedule_of(s, ps).is_some_and(|sc| !sc.inside(now));
                    let live = matches!(
                        t,
                        crate::planner::timed::Timed::Live { state, expired: None }
                            if state != crate::model::RunState::Stopped
                    );
                    (live, outside)
                }
                None => (false, false),
            };
            let ready = live
                && self
                    .current
                    .conditions
                    .get(name)
                    .is_some_and(|c| c.iter().any(|c| c.kind == "Ready" && c.status));
            let o = observed.sessions.get(name).filter(|o| o.owned);
            let asleep = match o {
                Some(o) if o.asleep.is_some() => Some(true),
                Some(o) if o.state == crate::model::observed::SessionState::Running => Some(false),
                _ => None,
            };
            let on_expiry = match (s.on_expiry, s.destroy_after) {
                (crate::model::ExpiryAction::Destroy, _) => "destroyed",
                (_, Some(_)) => "stopped (destroyed later, when dormant)",
                _ => "stopped",
            };
            sessions.insert(
                name.clone(),
                SessionFacts {
                    owner: s.owner.clone(),
                    plan: Some(s.plan.clone()),
                    urls: urls.remove(name.as_str()).unwrap_or_default(),
                    ready,
                    asleep,
                    held: held.remove(name.as_str()),
                    failures: self
                        .backoff
                        .get(&Object::Session(name.clone()))
                        .map_or(0, |b| b.failures),
                    last_error: self.current.last_errors.get(name).cloned(),
                    expires: s.expires,
                    on_expiry,
                    warn_before: s
                        .warn_before
                        .clone()
                        .or_else(|| plan_spec.and_then(|p| p.warn_before.clone()))
                        .unwrap_or_else(|| self.config.policy.warn_before.clone()),
                    outside_hours: outside,
                },
            );
        }
        // Sessions held that are not (validly) declared: a file with errors declares them.
        for (name, why) in held {
            sessions.insert(
                name.to_string(),
                SessionFacts {
                    held: Some(why),
                    asleep: None,
                    on_expiry: "stopped",
                    ..SessionFacts::default()
                },
            );
        }
        crate::notify::Facts {
            now,
            sessions,
            source_error,
            failed_after: 3,
            source_only: false,
        }
    }

    /// The source failed before the pass saw anything else: tell only that.
    fn notify_source_failing(&mut self, error: &str, now: DateTime<Utc>) {
        if let Some(n) = &mut self.notifier {
            n.after_pass(&crate::notify::Facts {
                now,
                source_error: Some(error.to_string()),
                failed_after: 3,
                source_only: true,
                ..Default::default()
            });
        }
    }

    /// Sleep and wake sessions with `lc`.
    pub fn set_lifecycle(&mut self, lc: crate::lifecycle::Lifecycle) {
        self.lifecycle = Some(lc);
    }

    /// What readers subscribe to.
    pub fn published(&self) -> Published {
        Published {
            snapshot: self.tx.subscribe(),
            changes: self.changes.clone(),
            activity: self.activity.subscribe(),
        }
    }

    /// Where the source watcher counts the changes it sees.
    pub fn source_changes(&self) -> Arc<SourceChanges> {
        self.changes.clone()
    }

    /// The providers configured, by name, as status shows them.
    pub fn provider_names(&self) -> &[String] {
        &self.current.providers
    }

    /// Call `f` with every snapshot as it is published.
    pub fn on_pass(&mut self, f: OnPass) {
        self.on_pass.push(f);
    }

    /// The latest snapshot.
    pub fn latest(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }

    pub fn state(&self) -> &StateDir {
        &self.state
    }

    /// Take a reloaded config (the providers are the caller's to rebuild).
    pub fn set_config(&mut self, config: Config) {
        self.history.set_settle(config.policy.settle.std());
        self.config = config;
        self.quiet = None;
    }

    /// The last pass changed nothing and nothing has changed since (see `Quiet`).
    fn still_quiet(&self, now: DateTime<Utc>) -> bool {
        let Some(q) = &self.quiet else {
            return false;
        };
        matches!(self.config.source, crate::config::SourceConfig::Dir(_))
            && self.changes.watched()
            && self.changes.count() == q.changes
            && self.lifecycle.as_ref().map(|l| l.generation()) == q.lifecycle
            && q.due.is_none_or(|d| now < d)
            && self.backoff.is_empty()
            && self.providers.unchanged()
    }

    /// A number in [0.5, 1.5) for jitter (xorshift; no need for more).
    fn jitter(&mut self) -> f64 {
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        0.5 + (self.seed % 1_000) as f64 / 1_000.0
    }

    /// The earliest moment a backoff that is still running ends: when a held step may run
    /// again. A backoff that has run out wakes nothing (its object may be held for another
    /// reason, and waking for it would spin the loop).
    pub fn next_retry(&self) -> Option<Instant> {
        let now = Instant::now();
        self.backoff
            .values()
            .map(|b| b.until)
            .filter(|u| *u > now)
            .min()
    }

    /// Forward what the compute providers say is happening to their sessions (an image pull's
    /// progress) to readers while steps run, at most five times a second; aborted after them.
    fn forward_activity(&self) -> Option<tokio::task::JoinHandle<()>> {
        let mut feeds: Vec<_> = self
            .providers
            .compute
            .values()
            .filter_map(|p| p.activity())
            .collect();
        if feeds.is_empty() {
            return None;
        }
        let tx = self.activity.clone();
        Some(tokio::spawn(async move {
            loop {
                let mut now = BTreeMap::new();
                for f in &mut feeds {
                    now.extend(f.borrow_and_update().clone());
                }
                tx.send_if_modified(|a| {
                    let changed = a.sessions != now;
                    if changed {
                        a.sessions = now;
                        a.seq += 1;
                    }
                    changed
                });
                let any = futures_util::future::select_all(
                    feeds.iter_mut().map(|f| Box::pin(f.changed())),
                );
                if any.await.0.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }))
    }

    /// Run one pass. `on_step` sees every step outcome as it happens (for progress output).
    pub async fn pass(
        &mut self,
        trigger: Trigger,
        cancel: &CancellationToken,
        on_step: impl FnMut(&Event),
    ) -> (PassReport, Arc<Plan>, Vec<StepResult>) {
        use tracing::Instrument;
        self.pass += 1;
        // One span per pass: every line it logs carries the pass number and the trigger.
        let span = tracing::info_span!("pass", n = self.pass, trigger = %trigger);
        self.run_pass(trigger, cancel, on_step)
            .instrument(span)
            .await
    }

    async fn run_pass(
        &mut self,
        trigger: Trigger,
        cancel: &CancellationToken,
        mut on_step: impl FnMut(&Event),
    ) -> (PassReport, Arc<Plan>, Vec<StepResult>) {
        let pass = self.pass;
        // The pass's one reading of the clock: what it loads, settles, plans and reports
        // against. (Events carry the time each step ended; backoffs use the monotonic clock.)
        let now = Utc::now();
        let started = now;
        let t0 = Instant::now();
        let mut report = PassReport {
            pass,
            trigger,
            started,
            revision: None,
            commit: None,
            source_error: None,
            duration_ms: 0,
            summary: Summary::default(),
            outcomes: BTreeMap::new(),
            converged: false,
            progressed: false,
            quarantined: Vec::new(),
            gaps: BTreeMap::new(),
            error: None,
            next_due: None,
            quiet: false,
        };
        self.changes_at_start = self.changes.count();
        if trigger == Trigger::Resync {
            let every = self.config.policy.full_resync_interval.std();
            if self.last_full.is_none_or(|t| t.elapsed() >= every) {
                // The periodic look at the world: nothing is taken from memory.
                self.quiet = None;
                self.providers.resync();
                self.last_full = Some(Instant::now());
            } else if self.still_quiet(now) {
                // Nothing changed: the plan would be the last one's nothing.
                let last = self.current.last.clone();
                if let Some(last) = last {
                    report.revision = last.revision;
                    report.commit = last.commit;
                    report.summary = last.summary;
                    report.converged = last.converged;
                    report.quarantined = last.quarantined;
                    report.next_due = last.next_due;
                }
                report.quiet = true;
                report.duration_ms = t0.elapsed().as_millis() as u64;
                self.publish(&report, None, None, None, Vec::new(), Vec::new());
                let plan = self.current.plan.clone().unwrap_or_default();
                return (report, plan, Vec::new());
            }
        }
        self.last_full.get_or_insert_with(Instant::now);
        let config = self.config.clone();
        // The cache travels with the load and comes back with it (a load that panicked leaves
        // an empty one: the next pass loads everything).
        let mut cache = std::mem::take(&mut self.load_cache);
        let loaded = tokio::task::spawn_blocking(move || {
            let d = crate::source::load_cached(&config, now, &mut cache);
            (d, cache)
        })
        .await
        .map(|(d, cache)| {
            self.load_cache = cache;
            d
        });
        let mut desired = match loaded {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => {
                // Unknown desired state: plan nothing, destroy nothing.
                report.error = Some(crate::providers::chain(&e));
                self.notify_source_failing(report.error.as_deref().unwrap_or_default(), now);
                report.duration_ms = t0.elapsed().as_millis() as u64;
                self.publish(&report, None, None, None, Vec::new(), Vec::new());
                return (report, Arc::new(Plan::default()), Vec::new());
            }
            Err(e) => {
                report.error = Some(format!("loading the source failed: {e}"));
                self.notify_source_failing(report.error.as_deref().unwrap_or_default(), now);
                self.publish(&report, None, None, None, Vec::new(), Vec::new());
                return (report, Arc::new(Plan::default()), Vec::new());
            }
        };
        report.revision = desired.revision.clone();
        report.commit = desired.commit.clone();
        report.source_error = desired.source_error.clone();
        if let Some(e) = &desired.source_error {
            tracing::warn!("source: {e}");
        }
        let mut phases = Phases::start(t0);
        phases.mark("load");
        let needed: BTreeSet<ComputeKind> = desired
            .plans
            .values()
            .flat_map(|p| p.spec.compute.kinds().iter().copied())
            .collect();
        // The marks as they are before `annotate` reads them: one made since shows as a change.
        let marks = self.lifecycle.as_ref().map(|l| l.generation());
        let mut observed = self.providers.observe(&needed).await;
        if let Some(lc) = &self.lifecycle {
            lc.annotate(&mut observed);
        }
        // Where sessions were last seen, for providers that are gaps now (a fallback must not
        // place one of them elsewhere): the last pass's observation, or after a restart the
        // one kept in the state directory.
        let previous = match &self.current.observed {
            Some(o) => Some(o.clone()),
            None => self.state.read_observed().map(Arc::new),
        };
        if let Some(previous) = previous {
            observed.carry_unreachable(&previous);
        }
        let observed = Arc::new(observed);
        phases.mark("observe");
        let settle = self.history.record(
            &mut desired,
            &observed,
            &self.config.routes.templates,
            &self.config.domain,
            Root(self.config.source_dir()),
            now,
        );
        let desired = Arc::new(desired);
        report.quarantined = desired
            .quarantined
            .keys()
            .map(|p| p.display().to_string())
            .collect();
        report.gaps = observed
            .gaps
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        phases.mark("settle");
        // Kept after the steps run (they wait for nothing), and only when it changed.
        let observed_changed = self
            .current
            .observed
            .as_ref()
            .is_none_or(|prev| **prev != *observed);
        let settles = settle.until.values().min().copied();
        let mut policy = self.config.policy(now);
        policy.allow_destroy = self.allow_destroy;
        policy.settle = Arc::new(settle);
        phases.mark("compare observed");
        let mut p = plan(&desired, &observed, &policy);
        // An approval of exactly what a guard holds lets it through, once.
        if let Some(hash) = p.approval.clone()
            && self.state.take_approval(&hash, now)
        {
            tracing::info!(approval = %hash, "approval taken: applying the destroys it approved, once");
            policy.allow_destroy = true;
            policy.allow_empty_source = true;
            p = plan(&desired, &observed, &policy);
        }
        let p = Arc::new(p);
        report.summary = p.summary;
        report.converged = p.is_empty();
        // Steps whose object is backing off for the same wish wait; their dependents are
        // skipped. A backoff for another wish (the spec changed, or it failed making what is
        // now being taken away) starts over.
        let clock = Instant::now();
        // Only for the sessions this plan has steps for: a converged pass fingerprints nothing.
        let specs: BTreeMap<&str, String> = p
            .steps
            .iter()
            .filter_map(|s| s.action.session())
            .collect::<BTreeSet<&str>>()
            .into_iter()
            .filter_map(|n| {
                let d = desired.sessions.get(n)?;
                let plan = desired.plans.get(&d.spec.plan)?;
                let fp = crate::planner::runtime_spec(&d.spec, &plan.spec).fingerprint();
                Some((n, fp))
            })
            .collect();
        let mut stepping: BTreeSet<Object> = BTreeSet::new();
        let mut hold: BTreeSet<usize> = BTreeSet::new();
        for s in &p.steps {
            let o = s.action.object();
            let wish = wish_of(s, &specs);
            match self.backoff.get(&o) {
                Some(b) if b.wish != wish => {
                    self.backoff.remove(&o);
                }
                Some(b) if b.until > clock => {
                    hold.insert(s.id);
                }
                _ => {}
            }
            stepping.insert(o);
        }
        // An object with no step left, whose backoff has run out, is forgotten.
        self.backoff
            .retain(|o, b| b.until > clock || stepping.contains(o));
        // Dormant destroys are announced before they run.
        if self.notifier.is_some() {
            let dormant: Vec<(String, DateTime<Utc>, String)> = p
                .steps
                .iter()
                .filter_map(|s| match (&s.action, &s.reason) {
                    (
                        Action::Session(SessionAction::DestroySession { session, .. }),
                        Reason::Dormant { at, after },
                    ) => Some((session.clone(), *at, after.clone())),
                    _ => None,
                })
                .collect();
            if !dormant.is_empty() {
                let facts = self.notify_facts(&desired, &observed, &p, now, None);
                if let Some(n) = &mut self.notifier {
                    n.dormant(&dormant, &facts.sessions, now);
                }
            }
        }
        phases.mark("plan");
        let mut events = Vec::new();
        let forwarding = self.forward_activity();
        let results = execute(&p, &self.providers, &self.exec, &hold, cancel, |step, outcome, d| {
            let e = Event {
                time: Utc::now(),
                pass,
                step: step.id,
                action: step.action.verb().to_string(),
                object: step.action.object().to_string(),
                outcome: outcome.clone(),
                duration_ms: d.as_millis() as u64,
                revision: desired.revision.clone(),
            };
            if outcome.is_failure() {
                tracing::warn!(
                    step = step.id,
                    object = %e.object,
                    action = %e.action,
                    outcome = outcome.label(),
                    "{} {} failed: {}",
                    e.action,
                    e.object,
                    failure_text(outcome).unwrap_or_default()
                );
            } else {
                tracing::debug!(step = step.id, object = %e.object, action = %e.action, outcome = outcome.label(), "step done");
            }
            on_step(&e);
            events.push(e);
        })
        .await;
        if let Some(f) = forwarding {
            f.abort();
        }
        self.activity.send_if_modified(|a| {
            let busy = !a.sessions.is_empty();
            if busy {
                a.sessions.clear();
                a.seq += 1;
            }
            busy
        });
        // Backoff: per object, reset by success, grown by failure.
        let mut failed: BTreeMap<Object, Wish> = BTreeMap::new();
        let mut succeeded: BTreeSet<Object> = BTreeSet::new();
        for r in &results {
            let action = &p.steps[r.step].action;
            let o = action.object();
            if r.outcome.is_failure() {
                failed.insert(o, wish_of(&p.steps[r.step], &specs));
            } else if r.outcome.is_success() {
                succeeded.insert(o);
            }
        }
        for o in &succeeded {
            if !failed.contains_key(o) {
                self.backoff.remove(o);
            }
        }
        for (o, wish) in failed {
            let j = self.jitter();
            let b = self.backoff.entry(o).or_insert(Backoff {
                failures: 0,
                until: clock,
                wish: wish.clone(),
            });
            b.wish = wish;
            b.failures += 1;
            let base = Duration::from_millis(500) * 2u32.saturating_pow(b.failures.min(10) - 1);
            b.until = Instant::now() + base.min(Duration::from_secs(300)).mul_f64(j);
        }
        report.progressed = results.iter().any(|r| {
            r.outcome.is_success()
                && !matches!(
                    p.steps[r.step].action,
                    crate::model::plan::Action::Session(
                        SessionAction::WaitHealthy { .. } | SessionAction::PullImage { .. }
                    )
                )
        }) || (!p.deferred.is_empty()
            && results.iter().any(|r| r.outcome.is_success()));
        for r in &results {
            *report
                .outcomes
                .entry(r.outcome.label().to_string())
                .or_default() += 1;
        }
        let retry = self.next_retry().map(|i| {
            now + chrono::Duration::from_std(i.saturating_duration_since(clock)).unwrap_or_default()
        });
        // An "expiring soon" warning comes due: a pass then tells it.
        let warning = self.notifier.as_ref().and_then(|_| {
            desired
                .sessions
                .values()
                .filter_map(|d| {
                    let exp = d.spec.expires?;
                    let plan = desired.plans.get(&d.spec.plan).map(|p| &p.spec);
                    let ts = d
                        .spec
                        .warn_before
                        .as_ref()
                        .or_else(|| plan.and_then(|p| p.warn_before.as_ref()))
                        .unwrap_or(&self.config.policy.warn_before);
                    ts.iter()
                        .filter_map(|t| {
                            exp.checked_sub_signed(chrono::Duration::from_std(t.std()).ok()?)
                        })
                        .filter(|at| *at > now)
                        .min()
                })
                .min()
        });
        report.next_due = [p.next_wakeup, retry, warning].into_iter().flatten().min();
        report.duration_ms = t0.elapsed().as_millis() as u64;
        phases.mark("execute");
        if observed_changed && let Err(e) = self.state.write_observed(&observed) {
            tracing::warn!(error = %e, "cannot keep the observed snapshot");
        }
        if let Err(e) = self.state.append_events(&events) {
            tracing::warn!(error = %e, "cannot record events");
        }
        if let Some(lc) = &self.lifecycle {
            lc.update(
                &desired,
                &observed,
                &crate::lifecycle::Settings {
                    default_idle: self.config.lifecycle.idle_timeout.std(),
                    limits: self.config.limits,
                    templates: &self.config.routes.templates,
                    domain: &self.config.domain,
                    capacity: &policy.capacity,
                },
            );
        }
        phases.mark("keep observed, events, lifecycle");
        self.update_conditions(&desired, &observed, &p, &results, now);
        // A pass that found nothing to do, saw everything and ran nothing: the next pass on the
        // timer may skip it all while nothing changes.
        self.quiet = (results.is_empty()
            && report.error.is_none()
            && desired.source_error.is_none()
            && desired.missing_sources.is_empty()
            && observed.gaps.is_empty()
            && p.approval.is_none())
        .then(|| Quiet {
            changes: self.changes_at_start,
            lifecycle: marks,
            // A kept workspace is deleted when its time is up, by an observation.
            due: [
                report.next_due,
                settles,
                observed.retained.values().map(|r| r.until).min(),
            ]
            .into_iter()
            .flatten()
            .min(),
        });
        if self.notifier.is_some() {
            let source_error = desired.source_error.clone();
            let facts = self.notify_facts(&desired, &observed, &p, now, source_error);
            if let Some(n) = &mut self.notifier {
                n.after_pass(&facts);
            }
        }
        phases.mark("conditions, notify");
        self.publish(
            &report,
            Some(desired),
            Some(observed),
            Some(p.clone()),
            events,
            results.clone(),
        );
        phases.mark("publish");
        tracing::debug!(phases = %phases, "pass phases");
        (report, p, results)
    }

    /// Build the pass's snapshot, publish it, and tell the subscribers.
    fn publish(
        &mut self,
        report: &PassReport,
        desired: Option<Arc<Desired>>,
        observed: Option<Arc<Observed>>,
        plan: Option<Arc<Plan>>,
        events: Vec<Event>,
        results: Vec<StepResult>,
    ) {
        let c = &mut self.current;
        let failing = report.source_error.is_some() || report.error.is_some();
        c.source_failing_since = match (failing, c.source_failing_since) {
            (true, Some(since)) => Some(since),
            (true, None) => Some(report.started),
            (false, _) => None,
        };
        c.last = Some(report.clone());
        // The changes seen before this pass began are loaded; one seen since still waits.
        c.loaded_changes = self.changes_at_start;
        c.passes = report.pass;
        if desired.is_some() {
            c.desired = desired;
        }
        if observed.is_some() {
            c.observed = observed;
        }
        if plan.is_some() {
            c.plan = plan;
        }
        c.results = Arc::new(results);
        if !events.is_empty() {
            let recent = Arc::make_mut(&mut c.events);
            for e in events {
                if recent.len() >= RECENT_EVENTS {
                    recent.pop_front();
                }
                recent.push_back(e);
            }
        }
        let snap = Arc::new(c.clone());
        for f in &self.on_pass {
            f(&snap);
        }
        self.tx.send_replace(snap);
    }

    /// Conditions per session after a pass: Stalled (its step failed, or it is held),
    /// Reconciling (the plan has work for it), Ready (neither, and it is in its desired state).
    fn update_conditions(
        &mut self,
        desired: &Desired,
        observed: &Observed,
        plan: &Plan,
        results: &[StepResult],
        now: DateTime<Utc>,
    ) {
        let mut failures: BTreeMap<String, String> = BTreeMap::new();
        for r in results {
            let action = &plan.steps[r.step].action;
            let session = match action {
                crate::model::plan::Action::Route(RouteAction::UpsertRoute { session, .. })
                | crate::model::plan::Action::Record(RecordAction::UpsertRecord {
                    session, ..
                }) => Some(session.as_str()),
                other => other.session(),
            };
            if let (Some(s), Some(e)) = (session, failure_text(&r.outcome)) {
                failures
                    .entry(s.to_string())
                    .or_insert(format!("{} failed: {e}", action.verb()));
            }
        }
        let mut pending: BTreeMap<String, String> = BTreeMap::new();
        for step in &plan.steps {
            if let Some(s) = step.action.session() {
                pending
                    .entry(s.to_string())
                    .or_insert_with(|| step.reason.describe());
            }
        }
        let mut held: BTreeMap<String, String> = BTreeMap::new();
        for h in &plan.held {
            if let Object::Session(s) = &h.object {
                held.insert(
                    s.clone(),
                    format!("held: {}", crate::planner::render::hold_text(&h.why)),
                );
            }
        }
        let names: BTreeSet<&String> = desired
            .sessions
            .keys()
            .chain(
                observed
                    .sessions
                    .iter()
                    .filter(|(_, o)| o.owned)
                    .map(|(k, _)| k),
            )
            .collect();
        let shared = &mut self.current;
        let last_errors = Arc::make_mut(&mut shared.last_errors);
        let mut next: BTreeMap<String, Vec<Condition>> = BTreeMap::new();
        let clock = Instant::now();
        for name in names {
            // A session whose steps keep failing is Stalled while it backs off between tries
            // too (its steps then wait, so they do not fail again in that pass).
            let failing = self
                .backoff
                .get(&Object::Session(name.clone()))
                .filter(|b| b.failures > 0)
                .map(|b| {
                    let last = last_errors
                        .get(name.as_str())
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default();
                    format!(
                        "failing ({} in a row; the next try in {} s){last}",
                        if b.failures == 1 {
                            "1 failure".to_string()
                        } else {
                            format!("{} failures", b.failures)
                        },
                        b.until.saturating_duration_since(clock).as_secs()
                    )
                });
            let stalled = failures.get(name).or(held.get(name)).cloned().or(failing);
            // Stalled and Reconciling exclude each other: work that cannot progress is stalled.
            let reconciling = pending.get(name).cloned().filter(|_| stalled.is_none());
            let ready = stalled.is_none()
                && reconciling.is_none()
                && desired.sessions.contains_key(name.as_str());
            let prev = shared.conditions.get(name.as_str());
            let since = |kind: &str, status: bool| {
                prev.and_then(|p| p.iter().find(|c| c.kind == kind && c.status == status))
                    .map(|c| c.since)
                    .unwrap_or(now)
            };
            let ready_reason = if ready {
                "in its desired state".to_string()
            } else {
                "not yet".to_string()
            };
            next.insert(
                name.clone(),
                vec![
                    Condition {
                        kind: "Ready".into(),
                        status: ready,
                        since: since("Ready", ready),
                        reason: ready_reason,
                    },
                    Condition {
                        kind: "Reconciling".into(),
                        status: reconciling.is_some(),
                        since: since("Reconciling", reconciling.is_some()),
                        reason: reconciling.unwrap_or_default(),
                    },
                    Condition {
                        kind: "Stalled".into(),
                        status: stalled.is_some(),
                        since: since("Stalled", stalled.is_some()),
                        reason: stalled.clone().unwrap_or_default(),
                    },
                ],
            );
            match stalled {
                Some(e) if failures.contains_key(name.as_str()) => {
                    last_errors.insert(name.clone(), e);
                }
                _ if ready => {
                    last_errors.remove(name.as_str());
                }
                _ => {}
            }
        }
        shared.conditions = Arc::new(next);
    }

    /// Pass after pass until nothing is left to do, nothing progresses, or `max` passes.
    pub async fn converge(
        &mut self,
        first: Trigger,
        max: usize,
        cancel: &CancellationToken,
        mut on_step: impl FnMut(&Event),
    ) -> Vec<PassReport> {
        let mut reports = Vec::new();
        let mut trigger = first;
        for _ in 0..max {
            let (r, p, _) = self.pass(trigger, cancel, &mut on_step).await;
            // A change still settling: wait for it, then look again.
            let settles = p
                .held
                .iter()
                .filter_map(|h| match h.why {
                    crate::model::plan::HoldReason::Settling { until, .. } => Some(until),
                    _ => None,
                })
                .max();
            let stop = (r.converged || !r.progressed) && settles.is_none()
                || r.error.is_some()
                || cancel.is_cancelled();
            reports.push(r);
            if stop {
                break;
            }
            if let Some(until) = settles
                && let Ok(wait) = (until - Utc::now()).to_std()
            {
                tokio::select! {
                    _ = tokio::time::sleep(wait + Duration::from_millis(10)) => {}
                    _ = cancel.cancelled() => break,
                }
            }
            trigger = Trigger::Followup;
        }
        reports
    }
}

/// A failing step's outcome, for messages.
pub fn failure_text(o: &Outcome) -> Option<String> {
    match o {
        Outcome::Failed { error } => Some(error.clone()),
        Outcome::TimedOut { after_ms } => Some(format!("timed out after {after_ms} ms")),
        _ => None,
    }
}
