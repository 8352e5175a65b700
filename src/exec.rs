//! The executor: runs one plan once. It makes no choices (the plan made them all) and no
//! retries (the loop retries on later passes, with backoff).
//!
//! Steps run as soon as their dependencies have succeeded, within a global limit and a limit
//! per provider; never two steps on one session at once; route and DNS steps that are ready
//! together go to their provider as one batch. Every step has a timeout. A failed step skips
//! only the steps that depend on it. Cancelling starts nothing new and lets running steps
//! finish.

use crate::model::plan::{RecordAction, RouteAction, SessionAction};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::model::ComputeKind;
use crate::model::observed::ProviderId;
use crate::model::plan::{Action, Plan, Step};
use crate::providers::{ProviderError, Providers, chain};
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct ExecOptions {
    /// Steps (or batches) running at once.
    pub concurrency: usize,
    /// Steps running at once against one provider.
    pub per_provider: usize,
    pub step_timeout: Duration,
    /// For waiting until a session is healthy, when its plan does not say (`health.timeout`).
    pub health_timeout: Duration,
    /// Where the executor publishes its progress (steps done of total, the ones in flight),
    /// for `vessel apply`'s progress display. Readers subscribe; nothing reads back.
    pub progress: Option<tokio::sync::watch::Sender<Progress>>,
}

/// How far one execution is: published on `ExecOptions::progress` whenever a step starts or
/// ends.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Progress {
    /// Steps in the plan.
    pub total: usize,
    /// Steps ended (whatever their outcome).
    pub done: usize,
    /// Steps running, in step order.
    pub running: Vec<InFlight>,
}

/// A step in flight.
#[derive(Debug, Clone, PartialEq)]
pub struct InFlight {
    pub step: usize,
    /// Its verb (`create`, `wait-healthy`, ...).
    pub action: &'static str,
    /// What it acts on.
    pub object: String,
    pub started: Instant,
    /// When it times out.
    pub timeout: Duration,
}

impl Default for ExecOptions {
    fn default() -> Self {
        ExecOptions {
            concurrency: 16,
            per_provider: 8,
            step_timeout: Duration::from_secs(300),
            health_timeout: Duration::from_secs(60),
            progress: None,
        }
    }
}

/// How a step ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    Succeeded,
    Failed {
        error: String,
    },
    TimedOut {
        after_ms: u64,
    },
    /// Not run: a step it depends on did not succeed.
    Skipped {
        because_of: usize,
    },
    /// Not run: its object failed recently and waits out its backoff.
    BackingOff,
    /// Not run: vessel is shutting down.
    Cancelled,
}

impl Outcome {
    pub fn is_success(&self) -> bool {
        matches!(self, Outcome::Succeeded)
    }

    pub fn is_failure(&self) -> bool {
        matches!(self, Outcome::Failed { .. } | Outcome::TimedOut { .. })
    }

    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Failed { .. } => "failed",
            Outcome::TimedOut { .. } => "timed_out",
            Outcome::Skipped { .. } => "skipped",
            Outcome::BackingOff => "backing_off",
            Outcome::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct StepResult {
    pub step: usize,
    pub outcome: Outcome,
    pub duration: Duration,
}

#[derive(Clone, Copy, PartialEq)]
enum Status {
    Pending,
    Running,
    Done,
}

type Finished = (Vec<usize>, Vec<Outcome>, Duration);

/// Run `plan` once. `hold` are steps not to run (backing off). `report` sees every outcome as
/// it happens.
pub async fn execute(
    plan: &Plan,
    providers: &Providers,
    opts: &ExecOptions,
    hold: &BTreeSet<usize>,
    cancel: &CancellationToken,
    mut report: impl FnMut(&Step, &Outcome, Duration),
) -> Vec<StepResult> {
    let n = plan.steps.len();
    let mut status = vec![Status::Pending; n];
    let mut results: Vec<Option<StepResult>> = vec![None; n];
    let mut in_flight: BTreeMap<usize, InFlight> = BTreeMap::new();
    let publish = |status: &[Status], in_flight: &BTreeMap<usize, InFlight>| {
        if let Some(tx) = &opts.progress {
            tx.send_replace(Progress {
                total: n,
                done: status.iter().filter(|s| **s == Status::Done).count(),
                running: in_flight.values().cloned().collect(),
            });
        }
    };
    publish(&status, &in_flight);
    let mut finish = |id: usize,
                      outcome: Outcome,
                      d: Duration,
                      status: &mut Vec<Status>,
                      results: &mut Vec<Option<StepResult>>| {
        status[id] = Status::Done;
        report(&plan.steps[id], &outcome, d);
        results[id] = Some(StepResult {
            step: id,
            outcome,
            duration: d,
        });
    };
    for &id in hold {
        if id < n {
            finish(
                id,
                Outcome::BackingOff,
                Duration::ZERO,
                &mut status,
                &mut results,
            );
        }
    }
    let mut running: JoinSet<Finished> = JoinSet::new();
    let mut busy_sessions: BTreeSet<String> = BTreeSet::new();
    let mut per_provider: BTreeMap<ProviderId, usize> = BTreeMap::new();
    let mut batch_running: BTreeSet<ProviderId> = BTreeSet::new();
    // Which steps each running task carries, so a panic fails only its own.
    let mut tasks: std::collections::HashMap<tokio::task::Id, Vec<usize>> =
        std::collections::HashMap::new();
    loop {
        // Skip what depends on a step that did not succeed (ids are a topological order).
        for id in 0..n {
            if status[id] != Status::Pending {
                continue;
            }
            let failed_dep = plan.steps[id].depends_on.iter().find(|d| {
                status[**d] == Status::Done
                    && !results[**d]
                        .as_ref()
                        .is_some_and(|r| r.outcome.is_success())
            });
            if let Some(d) = failed_dep {
                finish(
                    id,
                    Outcome::Skipped { because_of: *d },
                    Duration::ZERO,
                    &mut status,
                    &mut results,
                );
            }
        }
        if cancel.is_cancelled() {
            for id in 0..n {
                if status[id] == Status::Pending {
                    finish(
                        id,
                        Outcome::Cancelled,
                        Duration::ZERO,
                        &mut status,
                        &mut results,
                    );
                }
            }
        } else {
            let ready: Vec<usize> = (0..n)
                .filter(|id| status[*id] == Status::Pending)
                .filter(|id| {
                    plan.steps[*id]
                        .depends_on
                        .iter()
                        .all(|d| results[*d].as_ref().is_some_and(|r| r.outcome.is_success()))
                })
                .collect();
            let mut routes = Batch::default();
            let mut records = Batch::default();
            for id in ready {
                if running.len() >= opts.concurrency {
                    break;
                }
                let step = &plan.steps[id];
                let provider = step.action.provider();
                if batch_running.contains(&provider) {
                    continue;
                }
                match &step.action {
                    Action::Route(a) => routes.push(id, a),
                    Action::Record(a) => records.push(id, a),
                    Action::Session(a) => {
                        let session = a.session().to_string();
                        let count = per_provider.get(&provider).copied().unwrap_or(0);
                        let slot = holds_a_provider_slot(a);
                        if busy_sessions.contains(&session) || (slot && count >= opts.per_provider)
                        {
                            continue;
                        }
                        busy_sessions.insert(session);
                        if slot {
                            *per_provider.entry(provider.clone()).or_default() += 1;
                        }
                        status[id] = Status::Running;
                        in_flight.insert(id, in_flight_of(step, opts));
                        let task = spawn_compute(&mut running, providers, id, a.clone(), opts);
                        tasks.insert(task, vec![id]);
                    }
                }
            }
            if !routes.ids.is_empty() {
                let ids = routes.ids.clone();
                for id in &ids {
                    status[*id] = Status::Running;
                    in_flight.insert(*id, in_flight_of(&plan.steps[*id], opts));
                }
                batch_running.insert(ProviderId::Proxy);
                let proxy = providers.proxy.clone();
                let compute = providers.compute.clone();
                let task = spawn_batch(&mut running, ids.clone(), opts, async move {
                    // Routes to sessions made earlier in this plan: their address, read now.
                    let mut ready: Vec<RouteAction> = Vec::with_capacity(routes.actions.len());
                    let mut failed: Vec<Option<ProviderError>> = Vec::new();
                    for a in routes.actions {
                        match resolve_upstream(a, &compute).await {
                            Ok(a) => {
                                ready.push(a);
                                failed.push(None);
                            }
                            Err(e) => failed.push(Some(e)),
                        }
                    }
                    let refs: Vec<&RouteAction> = ready.iter().collect();
                    let mut applied = proxy.apply(&refs).await.into_iter();
                    failed
                        .into_iter()
                        .map(|f| match f {
                            None => applied.next().unwrap_or_else(|| {
                                Err(ProviderError::failed(
                                    "route",
                                    "a batch",
                                    "the proxy answered for fewer routes than it was given",
                                ))
                            }),
                            Some(e) => Err(e),
                        })
                        .collect()
                });
                tasks.insert(task, ids);
            }
            if !records.ids.is_empty() {
                let ids = records.ids.clone();
                for id in &ids {
                    status[*id] = Status::Running;
                    in_flight.insert(*id, in_flight_of(&plan.steps[*id], opts));
                }
                batch_running.insert(ProviderId::Dns);
                let dns = providers.dns.clone();
                let task = spawn_batch(&mut running, ids.clone(), opts, async move {
                    let refs: Vec<&RecordAction> = records.actions.iter().collect();
                    match &dns {
                        Some(d) => d.apply(&refs).await,
                        // The plan has DNS steps only where a DNS provider is configured.
                        None => refs
                            .iter()
                            .map(|a| {
                                Err(crate::providers::ProviderError::failed(
                                    "publish",
                                    a.name().0,
                                    "no DNS provider is configured",
                                ))
                            })
                            .collect(),
                    }
                });
                tasks.insert(task, ids);
            }
        }
        publish(&status, &in_flight);
        let Some(joined) = running.join_next_with_id().await else {
            break;
        };
        let (ids, outcomes, d) = match joined {
            Ok((task, f)) => {
                tasks.remove(&task);
                f
            }
            Err(e) => {
                // A provider panicked: fail that task's steps, visibly, and go on with the rest.
                let ids = tasks.remove(&e.id()).unwrap_or_default();
                let outcomes = ids
                    .iter()
                    .map(|_| Outcome::Failed {
                        error: format!("provider task failed: {e}"),
                    })
                    .collect();
                (ids, outcomes, Duration::ZERO)
            }
        };
        for (id, outcome) in ids.into_iter().zip(outcomes) {
            let action = &plan.steps[id].action;
            let provider = action.provider();
            match provider {
                ProviderId::Compute(_) => {
                    if let Some(s) = action.session() {
                        busy_sessions.remove(s);
                    }
                    let slot = matches!(action, Action::Session(a) if holds_a_provider_slot(a));
                    if slot && let Some(c) = per_provider.get_mut(&provider) {
                        *c = c.saturating_sub(1);
                    }
                }
                _ => {
                    batch_running.remove(&provider);
                }
            }
            in_flight.remove(&id);
            finish(id, outcome, d, &mut status, &mut results);
        }
    }
    publish(&status, &in_flight);
    results.into_iter().flatten().collect()
}

/// A route step whose upstream is the address a session made earlier in the plan has now:
/// looked up on its compute provider (a port it does not have fails the step).
async fn resolve_upstream(
    a: RouteAction,
    compute: &BTreeMap<ComputeKind, Arc<dyn crate::providers::compute::ComputeProvider>>,
) -> Result<RouteAction, ProviderError> {
    let RouteAction::UpsertRoute {
        host,
        path,
        strip_prefix,
        session,
        port,
        route,
        upstream_from: Some(kind),
        ..
    } = a
    else {
        return Ok(a);
    };
    let provider = compute.get(&kind).ok_or_else(|| {
        ProviderError::failed(
            "route to",
            session.clone(),
            format!("no {} compute provider is configured", kind.as_str()),
        )
    })?;
    let endpoints = provider.endpoints(&session).await?;
    let upstream = endpoints.get(&port).cloned().ok_or_else(|| {
        ProviderError::failed(
            "route to",
            session.clone(),
            format!("it has no address for port `{port}` after it was made"),
        )
    })?;
    Ok(RouteAction::UpsertRoute {
        host,
        path,
        strip_prefix,
        upstream,
        session,
        port,
        route,
        upstream_from: None,
    })
}

/// Does the step take one of its provider's `per_provider` slots while it runs? A wait for a
/// session to become healthy does not: it only probes the session (bounded by its timeout and
/// by the plan's overall `concurrency`), so sessions booting slowly (VMs) do not keep the
/// next ones from being made.
fn holds_a_provider_slot(a: &SessionAction) -> bool {
    !matches!(a, SessionAction::WaitHealthy { .. })
}

fn in_flight_of(step: &Step, opts: &ExecOptions) -> InFlight {
    InFlight {
        step: step.id,
        action: step.action.verb(),
        object: step.action.object().to_string(),
        started: Instant::now(),
        timeout: match &step.action {
            Action::Session(a) => timeout_for(a, opts),
            _ => opts.step_timeout,
        },
    }
}

fn timeout_for(action: &SessionAction, opts: &ExecOptions) -> Duration {
    match action {
        // The plan's own (`health.timeout`), carried in the step; else the default.
        SessionAction::WaitHealthy { check, .. } => check
            .as_ref()
            .and_then(|h| h.timeout)
            .map_or(opts.health_timeout, |t| t.std()),
        _ => opts.step_timeout,
    }
}

/// The route or record steps that go to their provider together, with their step ids.
struct Batch<A> {
    ids: Vec<usize>,
    actions: Vec<A>,
}

impl<A> Default for Batch<A> {
    fn default() -> Self {
        Batch {
            ids: Vec::new(),
            actions: Vec::new(),
        }
    }
}

impl<A: Clone> Batch<A> {
    fn push(&mut self, id: usize, a: &A) {
        self.ids.push(id);
        self.actions.push(a.clone());
    }
}

fn spawn_compute(
    set: &mut JoinSet<Finished>,
    providers: &Providers,
    id: usize,
    action: SessionAction,
    opts: &ExecOptions,
) -> tokio::task::Id {
    let timeout = timeout_for(&action, opts);
    let kind = action.provider();
    let provider = providers.compute.get(&kind).cloned();
    let locks = providers.locks.clone();
    set.spawn(async move {
        // Not while the lifecycle puts this session to sleep or wakes it.
        let _lock = locks.lock(action.session()).await;
        let t = Instant::now();
        let outcome = match provider {
            None => Outcome::Failed {
                error: format!("no {} provider is configured", kind.as_str()),
            },
            Some(p) => match tokio::time::timeout(timeout, p.apply(&action)).await {
                Ok(Ok(())) => Outcome::Succeeded,
                Ok(Err(e)) => Outcome::Failed { error: chain(&e) },
                Err(_) => Outcome::TimedOut {
                    after_ms: timeout.as_millis() as u64,
                },
            },
        };
        (vec![id], vec![outcome], t.elapsed())
    })
    .id()
}

/// Run one batch (`apply`, a provider's call for all of `ids` at once) within the step
/// timeout; one outcome per id, in order.
fn spawn_batch(
    set: &mut JoinSet<Finished>,
    ids: Vec<usize>,
    opts: &ExecOptions,
    apply: impl std::future::Future<Output = Vec<Result<(), crate::providers::ProviderError>>>
    + Send
    + 'static,
) -> tokio::task::Id {
    let timeout = opts.step_timeout;
    set.spawn(async move {
        let t = Instant::now();
        let outcomes: Vec<Outcome> = match tokio::time::timeout(timeout, apply).await {
            Ok(rs) => (0..ids.len())
                .map(|i| match rs.get(i) {
                    Some(Ok(())) => Outcome::Succeeded,
                    Some(Err(e)) => Outcome::Failed { error: chain(e) },
                    None => Outcome::Failed {
                        error: "the provider gave no result for this step".into(),
                    },
                })
                .collect(),
            Err(_) => ids
                .iter()
                .map(|_| Outcome::TimedOut {
                    after_ms: timeout.as_millis() as u64,
                })
                .collect(),
        };
        (ids, outcomes, t.elapsed())
    })
    .id()
}

/// Results in plan order, counted by outcome label.
pub fn tally(results: &[StepResult]) -> BTreeMap<&'static str, usize> {
    let mut m = BTreeMap::new();
    for r in results {
        *m.entry(r.outcome.label()).or_default() += 1;
    }
    m
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::model::ComputeKind;
    use crate::model::observed::{ObservedRoute, ObservedSession, RuntimeSpec};
    use crate::model::plan::{Reason, Step};
    use crate::providers::{BoxFut, ComputeProvider, ProviderError, ProxyProvider};

    /// Records calls; fails every step on session `bad`; tracks concurrency per session.
    #[derive(Default)]
    struct Recorder {
        calls: Mutex<Vec<String>>,
        active: Mutex<BTreeMap<String, usize>>,
        overlap: Mutex<bool>,
    }

    impl ComputeProvider for Recorder {
        fn kind(&self) -> ComputeKind {
            ComputeKind::Process
        }
        fn observe(&self) -> BoxFut<'_, Result<Vec<ObservedSession>, ProviderError>> {
            Box::pin(async { Ok(vec![]) })
        }
        fn apply<'a>(&'a self, action: &'a SessionAction) -> BoxFut<'a, Result<(), ProviderError>> {
            Box::pin(async move {
                let s = action.session().to_string();
                {
                    let mut a = self.active.lock().unwrap_or_else(|e| e.into_inner());
                    let n = a.entry(s.clone()).or_default();
                    *n += 1;
                    if *n > 1 {
                        *self.overlap.lock().unwrap_or_else(|e| e.into_inner()) = true;
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
                self.calls
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(format!("{} {s}", action.verb()));
                *self
                    .active
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(s.clone())
                    .or_default() -= 1;
                if s == "boom" {
                    panic!("the provider panicked on purpose");
                }
                if s == "bad" {
                    Err(ProviderError::failed("apply", s, "it is broken"))
                } else {
                    Ok(())
                }
            })
        }
    }

    struct Routes(Mutex<Vec<usize>>);
    impl ProxyProvider for Routes {
        fn observe(&self) -> BoxFut<'_, Result<Vec<ObservedRoute>, ProviderError>> {
            Box::pin(async { Ok(vec![]) })
        }
        fn apply<'a>(
            &'a self,
            actions: &'a [&'a RouteAction],
        ) -> BoxFut<'a, Vec<Result<(), ProviderError>>> {
            self.0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(actions.len());
            Box::pin(async move { actions.iter().map(|_| Ok(())).collect() })
        }
    }

    /// Providers for a test: `compute` as the process provider, `proxy` as the proxy.
    fn providers_of(compute: Arc<dyn ComputeProvider>, proxy: Arc<dyn ProxyProvider>) -> Providers {
        Providers {
            compute: [(ComputeKind::Process, compute)].into_iter().collect(),
            proxy,
            dns: None,
            embedded: None,
            observe_timeout: Duration::from_secs(1),
            locks: Default::default(),
        }
    }

    fn spec() -> RuntimeSpec {
        RuntimeSpec {
            compute: ComputeKind::Process,
            image: None,
            guest: None,
            template: None,
            clone: None,
            storage: None,
            pull: None,
            command: vec![],
            env: BTreeMap::new(),
            cpus: None,
            memory: None,
            disk: None,
            ports: BTreeMap::new(),
            health: None,
            firewall: None,
            hotplug: false,
            stop_timeout: None,
        }
    }

    fn chain(plan: &mut Plan, session: &str) {
        let base = plan.steps.len();
        let p = ComputeKind::Process;
        let actions = [
            Action::Session(SessionAction::CreateSession {
                session: session.into(),
                spec: Arc::new(spec()),
                fingerprint: "f".into(),
                source_file: "s.yaml".into(),
                save_to: None,
                start: true,
                host: None,
                restore: false,
                unreachable: Vec::new(),
            }),
            Action::Session(SessionAction::WaitHealthy {
                session: session.into(),
                provider: p,
                port: None,
                check: None,
            }),
            Action::Session(SessionAction::SyncSource {
                session: session.into(),
                provider: p,
                path: "/x".into(),
                exclude: vec![],
                save_to: None,
            }),
        ];
        for (i, action) in actions.into_iter().enumerate() {
            let depends_on = if i == 0 { vec![] } else { vec![base + i - 1] };
            plan.steps.push(Step {
                id: base + i,
                action,
                reason: Reason::Missing,
                depends_on,
            });
        }
        let id = plan.steps.len();
        plan.steps.push(Step {
            id,
            action: Action::Route(RouteAction::UpsertRoute {
                host: format!("{session}.localhost"),
                path: None,
                strip_prefix: false,
                upstream: "127.0.0.1:1".into(),
                session: session.into(),
                port: "ide".into(),
                route: None,
                upstream_from: None,
            }),
            reason: Reason::Missing,
            depends_on: vec![base + 1],
        });
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failure_skips_only_its_dependents_and_sessions_never_overlap() {
        let mut plan = Plan::default();
        for s in ["a", "bad", "c"] {
            chain(&mut plan, s);
        }
        let rec = Arc::new(Recorder::default());
        let routes = Arc::new(Routes(Mutex::new(vec![])));
        let providers = providers_of(rec.clone(), routes.clone());
        let results = execute(
            &plan,
            &providers,
            &ExecOptions::default(),
            &BTreeSet::new(),
            &CancellationToken::new(),
            |_, _, _| {},
        )
        .await;
        let by_id: BTreeMap<usize, &Outcome> =
            results.iter().map(|r| (r.step, &r.outcome)).collect();
        // a and c: every step succeeded; bad: create failed, the rest skipped because of it.
        for base in [0, 8] {
            for id in base..base + 4 {
                assert_eq!(by_id[&id], &Outcome::Succeeded, "step {id}");
            }
        }
        assert!(matches!(by_id[&4], Outcome::Failed { .. }));
        assert_eq!(by_id[&5], &Outcome::Skipped { because_of: 4 });
        assert_eq!(by_id[&6], &Outcome::Skipped { because_of: 5 });
        assert_eq!(by_id[&7], &Outcome::Skipped { because_of: 5 });
        assert!(
            !*rec.overlap.lock().unwrap_or_else(|e| e.into_inner()),
            "two steps ran on one session at once"
        );
        // Routes ready together went as batches, never more calls than routes.
        let batches = routes.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        assert_eq!(batches.iter().sum::<usize>(), 2);
    }

    /// Waits for `a` to be healthy until `b` has been created (as a slow VM boots while the
    /// next one is made): gives up after 5 s.
    #[derive(Default)]
    struct Gate {
        b_made: tokio::sync::Notify,
    }

    impl ComputeProvider for Gate {
        fn kind(&self) -> ComputeKind {
            ComputeKind::Process
        }
        fn observe(&self) -> BoxFut<'_, Result<Vec<ObservedSession>, ProviderError>> {
            Box::pin(async { Ok(vec![]) })
        }
        fn apply<'a>(&'a self, action: &'a SessionAction) -> BoxFut<'a, Result<(), ProviderError>> {
            Box::pin(async move {
                match action {
                    SessionAction::CreateSession { session, .. } if session == "b" => {
                        self.b_made.notify_one();
                        Ok(())
                    }
                    SessionAction::WaitHealthy { session, .. } if session == "a" => {
                        tokio::time::timeout(Duration::from_secs(5), self.b_made.notified())
                            .await
                            .map_err(|_| ProviderError::failed("wait for", "a", "b was never made"))
                    }
                    _ => Ok(()),
                }
            })
        }
    }

    /// A session waiting to become healthy does not hold its provider's slot: with one slot,
    /// the next session is made while the first one boots.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_health_wait_does_not_hold_a_provider_slot() {
        let mut plan = Plan::default();
        chain(&mut plan, "a");
        chain(&mut plan, "b");
        let providers = providers_of(
            Arc::new(Gate::default()),
            Arc::new(Routes(Mutex::new(vec![]))),
        );
        let opts = ExecOptions {
            per_provider: 1,
            ..ExecOptions::default()
        };
        let results = execute(
            &plan,
            &providers,
            &opts,
            &BTreeSet::new(),
            &CancellationToken::new(),
            |_, _, _| {},
        )
        .await;
        for r in &results {
            assert_eq!(r.outcome, Outcome::Succeeded, "step {}", r.step);
        }
        assert_eq!(results.len(), plan.steps.len());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cancelled_runs_start_nothing_and_held_steps_back_off() {
        let mut plan = Plan::default();
        chain(&mut plan, "a");
        chain(&mut plan, "b");
        let rec = Arc::new(Recorder::default());
        let providers = providers_of(rec.clone(), Arc::new(Routes(Mutex::new(vec![]))));
        let hold: BTreeSet<usize> = [4].into_iter().collect();
        let results = execute(
            &plan,
            &providers,
            &ExecOptions::default(),
            &hold,
            &CancellationToken::new(),
            |_, _, _| {},
        )
        .await;
        let b: Vec<&str> = results
            .iter()
            .filter(|r| r.step >= 4)
            .map(|r| r.outcome.label())
            .collect();
        assert_eq!(b, ["backing_off", "skipped", "skipped", "skipped"]);
        let cancel = CancellationToken::new();
        cancel.cancel();
        let rec2 = Arc::new(Recorder::default());
        let providers = Providers {
            compute: [(
                ComputeKind::Process,
                rec2.clone() as Arc<dyn ComputeProvider>,
            )]
            .into_iter()
            .collect(),
            ..providers
        };
        let results = execute(
            &plan,
            &providers,
            &ExecOptions::default(),
            &BTreeSet::new(),
            &cancel,
            |_, _, _| {},
        )
        .await;
        assert!(results.iter().all(|r| r.outcome == Outcome::Cancelled));
        assert!(
            rec2.calls
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_empty()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_provider_fails_only_its_own_steps() {
        let mut plan = Plan::default();
        for s in ["a", "boom", "c"] {
            chain(&mut plan, s);
        }
        let rec = Arc::new(Recorder::default());
        let providers = providers_of(rec.clone(), Arc::new(Routes(Mutex::new(vec![]))));
        let results = execute(
            &plan,
            &providers,
            &ExecOptions::default(),
            &BTreeSet::new(),
            &CancellationToken::new(),
            |_, _, _| {},
        )
        .await;
        let by_id: BTreeMap<usize, &Outcome> =
            results.iter().map(|r| (r.step, &r.outcome)).collect();
        for base in [0, 8] {
            for id in base..base + 4 {
                assert_eq!(by_id[&id], &Outcome::Succeeded, "step {id}");
            }
        }
        assert!(
            matches!(by_id[&4], Outcome::Failed { error } if error.contains("provider task failed"))
        );
        assert_eq!(by_id[&5], &Outcome::Skipped { because_of: 4 });
    }
}
