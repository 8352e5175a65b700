//! Session lifecycle: sessions sleep when idle and wake on the next request.
//!
//! Beside the reconciler, not inside it: a wake must take milliseconds whatever the number of
//! declared sessions, so it is never a pass. The reconciler tells the lifecycle what each
//! session should be after every pass (`update`); the lifecycle marks sessions it put to sleep
//! in `<state>/asleep.json` (before it puts them to sleep, so a crash in between leaves a
//! session marked asleep that is in fact awake, which the next request wakes harmlessly,
//! never one asleep that a pass would see as broken) and the reconciler reads the marks into
//! what it observes (`annotate`), so asleep is converged, not drift, and a restarted vessel
//! wakes nothing.
//!
//! Session steps of the plan and the lifecycle's own sleep and wake take one lock per
//! session (`SessionLocks`): a session is never paused while a step starts it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::desired::Desired;
use crate::model::observed::{Asleep, Observed, SessionState, SleepReason};
use crate::model::plan::SessionAction;
use crate::model::{ComputeKind, Health, RunState, SleepDepth};
use crate::providers::SessionLocks;
use crate::providers::compute::ComputeProvider;
use crate::proxy::Proxy;

/// What the lifecycle needs to know of one declared session.
#[derive(Debug, Clone, PartialEq)]
pub struct LifeSpec {
    pub provider: ComputeKind,
    pub state: RunState,
    /// None: it never sleeps by idleness.
    pub idle_timeout: Option<Duration>,
    pub depth: SleepDepth,
    pub health_port: Option<String>,
    pub health: Option<Health>,
    pub stop_timeout: Option<crate::model::Duration>,
}

/// A session's lifecycle, for status.
#[derive(Debug, Clone, Serialize, PartialEq, schemars::JsonSchema)]
pub struct SessionLife {
    /// `awake`, `falling-asleep` (being paused or stopped now), `asleep` or `waking`.
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_activity: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub asleep_since: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sleep_reason: Option<SleepReason>,
    /// Requests held now, waiting for it to wake.
    pub held_requests: usize,
    pub wakes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_wake_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_wake_error: Option<String>,
}

/// Counters for metrics.
#[derive(Debug, Default)]
pub struct LifeCounters {
    pub wakes: AtomicU64,
    pub wake_failures: AtomicU64,
    pub sleeps_idle: AtomicU64,
    pub sleeps_cap: AtomicU64,
    /// Wake durations not yet taken by metrics (bounded).
    wake_seconds: Mutex<Vec<f64>>,
}

impl LifeCounters {
    /// The wake durations recorded since the last call.
    pub fn take_wake_seconds(&self) -> Vec<f64> {
        std::mem::take(&mut *crate::lock_or_reset(&self.wake_seconds))
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Marks {
    #[serde(default)]
    asleep: BTreeMap<String, Asleep>,
}

#[derive(Default)]
struct State {
    specs: HashMap<String, LifeSpec>,
    marks: Marks,
    /// Sessions the last pass saw running and not asleep.
    running: HashSet<String>,
    /// Where each session's ports answered at the last pass.
    endpoints: HashMap<String, BTreeMap<String, String>>,
    /// When each session was last seen waking or starting (ms since the epoch).
    awake_since: HashMap<String, u64>,
    waking: HashSet<String>,
    /// In the middle of going to sleep.
    falling: HashSet<String>,
    /// Sessions the proxy holds requests for.
    proxy_asleep: HashSet<String>,
    wakes: HashMap<String, (u64, Option<u64>, Option<String>)>,
    /// Caps on running sessions, and each declared session's owner (only with a cap).
    limits: crate::model::SessionLimits,
    owners: HashMap<String, String>,
    /// What compute hosts hold, and where each session on one of them is and what its plan
    /// asks for (only with a capacity declared).
    capacity: BTreeMap<HostKey, crate::model::HostCapacity>,
    usage: HashMap<String, Usage>,
}

/// A compute host: its provider, and its name (`None` for a provider that is one place).
pub type HostKey = (ComputeKind, Option<String>);

/// Where a session runs and what its plan asks for there.
#[derive(Debug, Clone, PartialEq)]
struct Usage {
    host: HostKey,
    cpus: f64,
    memory: u64,
}

/// What the lifecycle takes from the config at each pass.
pub struct Settings<'a> {
    /// The idle timeout of `sleeping` sessions whose plan and session set none.
    pub default_idle: Duration,
    pub limits: crate::model::SessionLimits,
    pub templates: &'a [crate::model::RouteTemplate],
    pub domain: &'a str,
    pub capacity: &'a BTreeMap<HostKey, crate::model::HostCapacity>,
}

pub struct Lifecycle {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    compute: BTreeMap<ComputeKind, Arc<dyn ComputeProvider>>,
    proxy: Option<Proxy>,
    locks: SessionLocks,
    state: Mutex<State>,
    counters: Arc<LifeCounters>,
    /// Pokes the reconciler after a wake or sleep, so observation catches up.
    poke: Mutex<Option<Box<dyn Fn() + Send + Sync>>>,
    /// Moves on with every change of the asleep marks (what `annotate` adds).
    saves: std::sync::atomic::AtomicU64,
}

impl Clone for Lifecycle {
    fn clone(&self) -> Self {
        Lifecycle {
            inner: self.inner.clone(),
        }
    }
}

fn now_ms() -> u64 {
    Utc::now().timestamp_millis().max(0) as u64
}

fn at(ms: u64) -> Option<DateTime<Utc>> {
    (ms > 0)
        .then(|| DateTime::from_timestamp_millis(ms as i64))
        .flatten()
}

impl Lifecycle {
    /// Open the lifecycle with the marks kept in `state_dir` (none if it has none; an
    /// unreadable file is kept aside and warned about: sessions then look awake, and the
    /// next pass repairs what is not).
    pub fn open(
        state_dir: &std::path::Path,
        compute: BTreeMap<ComputeKind, Arc<dyn ComputeProvider>>,
        proxy: Option<Proxy>,
        locks: SessionLocks,
    ) -> Lifecycle {
        let path = state_dir.join("asleep.json");
        let marks = match std::fs::read(&path) {
            Ok(b) => match serde_json::from_slice::<Marks>(&b) {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(file = %path.display(), "the asleep marks cannot be read ({e}); kept aside as asleep.json.bad");
                    let _ = std::fs::rename(&path, path.with_extension("json.bad"));
                    Marks::default()
                }
            },
            Err(_) => Marks::default(),
        };
        let lc = Lifecycle {
            inner: Arc::new(Inner {
                path,
                compute,
                proxy,
                locks,
                state: Mutex::new(State {
                    marks,
                    ..State::default()
                }),
                counters: Arc::default(),
                poke: Mutex::new(None),
                saves: Default::default(),
            }),
        };
        // Whatever is marked asleep holds its requests from the first route on.
        let marked: Vec<String> = lc.state().marks.asleep.keys().cloned().collect();
        for s in marked {
            lc.proxy_asleep(&s, true, &HashMap::new());
        }
        lc
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        crate::lock_or_reset(&self.inner.state)
    }

    pub fn counters(&self) -> Arc<LifeCounters> {
        self.inner.counters.clone()
    }

    /// Call `f` after a wake or a sleep (the daemon triggers a pass with it).
    pub fn on_change(&self, f: Box<dyn Fn() + Send + Sync>) {
        *crate::lock_or_reset(&self.inner.poke) = Some(f);
    }

    fn poke(&self) {
        if let Some(f) = crate::lock_or_reset(&self.inner.poke).as_ref() {
            f();
        }
    }

    /// Moves on with every change of the asleep marks: while it stays, `annotate` adds the
    /// same marks.
    pub fn generation(&self) -> u64 {
        self.inner.saves.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn save(&self, st: &State) {
        self.inner
            .saves
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let bytes = match serde_json::to_vec_pretty(&st.marks) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!("cannot encode the asleep marks: {e}");
                return;
            }
        };
        if let Err(e) = crate::providers::write_atomically(&self.inner.path, &bytes) {
            tracing::warn!(file = %self.inner.path.display(), "cannot keep the asleep marks: {e}");
        }
    }

    fn proxy_asleep(&self, session: &str, asleep: bool, moved: &HashMap<String, String>) {
        let changed = {
            let mut st = self.state();
            if asleep {
                st.proxy_asleep.insert(session.to_string())
            } else {
                st.proxy_asleep.remove(session) || !moved.is_empty()
            }
        };
        if let (true, Some(p)) = (changed, &self.inner.proxy) {
            p.set_asleep(session, asleep, moved);
        }
    }

    /// Mark what is asleep in what the providers report.
    pub fn annotate(&self, observed: &mut Observed) {
        let st = self.state();
        for (name, a) in &st.marks.asleep {
            if let Some(o) = observed.sessions.get_mut(name)
                && o.owned
            {
                o.asleep = Some(a.clone());
            }
        }
    }

    /// After a pass: what each declared session should be, and what the providers reported.
    /// Marks of sessions no longer declared, declared `stopped`, or gone are dropped; a
    /// `sleeping` session made stopped is marked asleep.
    pub fn update(&self, desired: &Desired, observed: &Observed, settings: &Settings<'_>) {
        let Settings {
            default_idle,
            limits,
            templates,
            domain,
            capacity,
        } = *settings;
        let usage = usage(desired, observed, capacity);
        let owners: HashMap<String, String> =
            if limits.max_running.is_some() || limits.max_running_per_owner.is_some() {
                desired
                    .sessions
                    .iter()
                    .map(|(n, d)| (n.clone(), d.spec.owner.clone().unwrap_or_default()))
                    .collect()
            } else {
                HashMap::new()
            };
        let mut specs: HashMap<String, LifeSpec> = HashMap::new();
        for (name, d) in &desired.sessions {
            let Some(plan) = desired.plans.get(&d.spec.plan) else {
                continue;
            };
            let p = &plan.spec;
            // Outside its running hours a session is `sleeping` (or `stopped`) by the clock.
            let state = crate::planner::timed::scheduled_state(
                d.spec.state,
                crate::planner::timed::schedule_of(&d.spec, p),
                Utc::now(),
            );
            let idle = d
                .spec
                .idle_timeout
                .or(p.idle_timeout)
                .map(|t| t.std())
                .or((state == RunState::Sleeping).then_some(default_idle));
            if idle.is_none() && state == RunState::Running {
                continue;
            }
            let rs = crate::planner::runtime_spec(&d.spec, p);
            specs.insert(
                name.clone(),
                LifeSpec {
                    // Where it runs, or where a new one goes first.
                    provider: observed
                        .sessions
                        .get(name)
                        .map(|o| o.provider)
                        .unwrap_or_else(|| p.compute.first()),
                    state,
                    idle_timeout: idle,
                    depth: p.sleep.unwrap_or_default(),
                    health_port: rs.health_port().map(String::from),
                    health: rs.health.clone(),
                    stop_timeout: rs.stop_timeout,
                },
            );
        }
        let now = now_ms();
        let mut wake_now = Vec::new();
        let mut unmark = Vec::new();
        let mut mark = Vec::new();
        {
            let mut st = self.state();
            let busy: HashSet<String> = st.waking.union(&st.falling).cloned().collect();
            // Marks that no longer mean anything. Unknown is not gone: with a compute
            // provider unobserved, every mark stays.
            let compute_gap = observed
                .gaps
                .keys()
                .any(|g| matches!(g, crate::model::observed::ProviderId::Compute(_)));
            for name in st.marks.asleep.keys() {
                if busy.contains(name) {
                    continue;
                }
                let gone = !compute_gap && !observed.sessions.get(name).is_some_and(|o| o.owned);
                match specs.get(name) {
                    // `stopped`: the plan stops it; no longer asleep.
                    Some(s) if s.state == RunState::Stopped => unmark.push(name.clone()),
                    Some(_) if gone => unmark.push(name.clone()),
                    Some(_) => {}
                    // Declared running without an idle timeout now: awake from now on.
                    None if desired.sessions.contains_key(name) && !gone => {
                        wake_now.push(name.clone())
                    }
                    None => unmark.push(name.clone()),
                }
            }
            // `sleeping` sessions made stopped (or found stopped) are asleep.
            for (name, s) in &specs {
                if s.state != RunState::Sleeping
                    || busy.contains(name)
                    || st.marks.asleep.contains_key(name)
                {
                    continue;
                }
                if observed
                    .sessions
                    .get(name)
                    .is_some_and(|o| o.owned && o.state == SessionState::Stopped)
                {
                    mark.push(name.clone());
                }
            }
            for name in &unmark {
                st.marks.asleep.remove(name);
            }
            for name in &mark {
                st.marks.asleep.insert(
                    name.clone(),
                    Asleep {
                        since: Utc::now(),
                        depth: SleepDepth::Stop,
                        reason: SleepReason::Declared,
                    },
                );
            }
            if !mark.is_empty() || !unmark.is_empty() {
                self.save(&st);
            }
            st.running = observed
                .sessions
                .values()
                .filter(|o| {
                    o.owned
                        && o.state == SessionState::Running
                        && !st.marks.asleep.contains_key(&o.name)
                })
                .map(|o| o.name.clone())
                .collect();
            st.endpoints = observed
                .sessions
                .values()
                .filter(|o| specs.contains_key(&o.name))
                .map(|o| (o.name.clone(), o.endpoints.clone()))
                .collect();
            let running: Vec<String> = st.running.iter().cloned().collect();
            for r in running {
                st.awake_since.entry(r).or_insert(now);
            }
            let State {
                awake_since,
                running,
                ..
            } = &mut *st;
            awake_since.retain(|k, _| running.contains(k));
            st.specs = specs;
            st.limits = limits;
            st.owners = owners;
            st.capacity = capacity.clone();
            st.usage = usage;
        }
        if let Some(px) = &self.inner.proxy {
            px.set_pages(pages(desired, templates, domain, &self.state().specs));
        }
        for name in &mark {
            self.proxy_asleep(name, true, &HashMap::new());
        }
        // Declared awake for good (no idle timeout any more): woken now.
        for name in wake_now {
            self.wake(&name);
        }
        for name in unmark {
            self.proxy_asleep(&name, false, &HashMap::new());
        }
    }

    /// The proxy's waker: a request arrived for a session whose routes are not ready.
    pub fn waker(&self) -> crate::proxy::Waker {
        let lc = self.clone();
        Arc::new(move |session: &str| lc.wake(session))
    }

    /// Wake a session, once however many ask: requests during a wake share it.
    pub fn wake(&self, session: &str) {
        {
            let mut st = self.state();
            // Waking already, or not asleep (a request that found its route not ready just
            // before a wake ended): nothing to do.
            if st.waking.contains(session) || !st.marks.asleep.contains_key(session) {
                return;
            }
            // `stopped` is never woken by a request.
            if st
                .specs
                .get(session)
                .is_some_and(|s| s.state == RunState::Stopped)
            {
                return;
            }
            st.waking.insert(session.to_string());
        }
        // A new try: whether the platform is full is found out again.
        if let Some(px) = &self.inner.proxy {
            px.set_full(session, false);
        }
        let lc = self.clone();
        let session = session.to_string();
        tokio::spawn(async move {
            let t = Instant::now();
            let result = lc.wake_now(&session).await;
            let took = t.elapsed();
            {
                let mut st = lc.state();
                st.waking.remove(&session);
                let e = st.wakes.entry(session.clone()).or_default();
                match &result {
                    Ok(()) => {
                        e.0 += 1;
                        e.1 = Some(took.as_millis() as u64);
                        e.2 = None;
                    }
                    Err(err) => e.2 = Some(crate::error_chain(err)),
                }
            }
            match result {
                Ok(()) => {
                    let c = &lc.inner.counters;
                    c.wakes.fetch_add(1, Ordering::Relaxed);
                    let mut w = crate::lock_or_reset(&c.wake_seconds);
                    if w.len() < 10_000 {
                        w.push(took.as_secs_f64());
                    }
                    tracing::info!(%session, ms = took.as_millis() as u64, "woke");
                }
                Err(e) => {
                    lc.inner
                        .counters
                        .wake_failures
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%session, "cannot wake: {}", crate::error_chain(&e));
                }
            }
            lc.poke();
        });
    }

    async fn wake_now(&self, session: &str) -> Result<(), LifecycleError> {
        let asked = Instant::now();
        let _lock = self.inner.locks.lock(session).await;
        let locked = asked.elapsed();
        let (spec, before, depth) = {
            let st = self.state();
            (
                st.specs.get(session).cloned(),
                st.endpoints.get(session).cloned().unwrap_or_default(),
                st.marks.asleep.get(session).map(|m| m.depth),
            )
        };
        // Resumed from a pause, a session is the same process at the same addresses.
        let paused = depth == Some(SleepDepth::Pause);
        let Some(spec) = spec else {
            // Marked but no longer looked after: started, unmarked, served.
            return self.wake_unmanaged(session).await;
        };
        let provider_kind = spec.provider;
        let Some(p) = self.inner.compute.get(&provider_kind).cloned() else {
            return Err(LifecycleError::NoProvider(provider_kind.as_str()));
        };
        if let Err(full) = self.make_room(session).await {
            if let Some(px) = &self.inner.proxy {
                px.set_full(session, true);
            }
            return Err(full);
        }
        if let Some(px) = &self.inner.proxy {
            px.set_full(session, false);
        }
        let start = SessionAction::StartSession {
            session: session.to_string(),
            provider: provider_kind,
            restart: false,
            stop_timeout: None,
        };
        let t0 = Instant::now();
        bounded("start", Duration::from_secs(120), p.apply(&start)).await?;
        let started = t0.elapsed();
        // Paused, it answered where it was before: probed there at once, with no look at the
        // provider (an engine API call); the provider's own wait if that does not pass soon.
        let resumed = match (&spec.health_port, paused) {
            (Some(port), true) => match before.get(port) {
                Some(addr) => {
                    let path = spec.health.as_ref().map(|h| h.path.as_str());
                    answers_soon(addr, path).await
                }
                None => false,
            },
            _ => false,
        };
        if let Some(port) = spec.health_port.as_ref().filter(|_| !resumed) {
            let wait = SessionAction::WaitHealthy {
                session: session.to_string(),
                provider: provider_kind,
                port: Some(port.clone()),
                check: spec.health.clone(),
            };
            let limit = spec
                .health
                .as_ref()
                .and_then(|h| h.timeout)
                .map(|t| t.std())
                .unwrap_or(Duration::from_secs(60));
            bounded("health", limit + Duration::from_secs(1), p.apply(&wait)).await?;
        }
        let healthy = t0.elapsed();
        // Ports may have moved (a container started again publishes anew); not when resumed.
        let mut moved = HashMap::new();
        if !paused
            && let Ok(Ok(now)) =
                tokio::time::timeout(Duration::from_secs(10), p.endpoints(session)).await
        {
            for (port, old) in &before {
                if let Some(new) = now.get(port)
                    && new != old
                {
                    moved.insert(old.clone(), new.clone());
                }
            }
            self.state().endpoints.insert(session.to_string(), now);
        }
        {
            let mut st = self.state();
            st.marks.asleep.remove(session);
            self.save(&st);
            st.awake_since.insert(session.to_string(), now_ms());
            st.running.insert(session.to_string());
        }
        // Serve (the held requests go on).
        {
            let mut st = self.state();
            st.proxy_asleep.remove(session);
        }
        if let Some(px) = &self.inner.proxy {
            px.set_asleep(session, false, &moved);
        }
        tracing::debug!(
            %session,
            lock_ms = locked.as_millis() as u64,
            room_ms = (asked.elapsed() - locked - t0.elapsed()).as_millis() as u64,
            start_ms = started.as_millis() as u64,
            healthy_ms = healthy.as_millis() as u64,
            served_ms = t0.elapsed().as_millis() as u64,
            "wake steps"
        );
        Ok(())
    }

    /// Room for `session` under the caps: at a cap, the least recently active session that
    /// can sleep (of the same owner, for the per-owner cap) is put to sleep first. Err when
    /// none can.
    async fn make_room(&self, session: &str) -> Result<(), LifecycleError> {
        for _ in 0..4 {
            let victim = {
                let st = self.state();
                let activity = self.activity();
                match room_for(&st, session, &activity) {
                    Room::Enough => return Ok(()),
                    Room::Full => return Err(LifecycleError::Full),
                    Room::After(victim) => victim,
                }
            };
            self.sleep(&victim, SleepReason::Cap).await.map_err(|e| {
                LifecycleError::MakingRoom {
                    session: victim.clone(),
                    source: Box::new(e),
                }
            })?;
        }
        Err(LifecycleError::Full)
    }

    /// A marked session the lifecycle no longer looks after (declared `running` without an
    /// idle timeout now): started, unmarked, served.
    async fn wake_unmanaged(&self, session: &str) -> Result<(), LifecycleError> {
        if !self.state().marks.asleep.contains_key(session) {
            return Ok(());
        }
        for p in self.inner.compute.values() {
            let start = SessionAction::StartSession {
                session: session.to_string(),
                provider: p.kind(),
                restart: false,
                stop_timeout: None,
            };
            if bounded("start", Duration::from_secs(120), p.apply(&start))
                .await
                .is_ok()
            {
                break;
            }
        }
        {
            let mut st = self.state();
            st.marks.asleep.remove(session);
            self.save(&st);
            st.proxy_asleep.remove(session);
        }
        if let Some(px) = &self.inner.proxy {
            px.set_asleep(session, false, &HashMap::new());
        }
        Ok(())
    }

    /// Put a session to sleep now, for `reason`.
    pub async fn sleep(&self, session: &str, reason: SleepReason) -> Result<(), LifecycleError> {
        {
            let mut st = self.state();
            if st.waking.contains(session)
                || st.falling.contains(session)
                || st.marks.asleep.contains_key(session)
            {
                return Ok(());
            }
            st.falling.insert(session.to_string());
        }
        let r = self.sleep_now(session, reason).await;
        self.state().falling.remove(session);
        match &r {
            Ok(()) => {
                let c = &self.inner.counters;
                match reason {
                    SleepReason::Cap => c.sleeps_cap.fetch_add(1, Ordering::Relaxed),
                    _ => c.sleeps_idle.fetch_add(1, Ordering::Relaxed),
                };
                tracing::info!(%session, reason = reason.as_str(), "asleep");
            }
            Err(e) => tracing::warn!(%session, "cannot put to sleep: {}", crate::error_chain(e)),
        }
        self.poke();
        r
    }

    async fn sleep_now(&self, session: &str, reason: SleepReason) -> Result<(), LifecycleError> {
        let _lock = self.inner.locks.lock(session).await;
        let Some(spec) = self.state().specs.get(session).cloned() else {
            return Ok(());
        };
        if spec.state == RunState::Stopped {
            return Ok(());
        }
        let Some(p) = self.inner.compute.get(&spec.provider).cloned() else {
            return Err(LifecycleError::NoProvider(spec.provider.as_str()));
        };
        // Marked first (see the module's doc), then held, then put to sleep.
        {
            let mut st = self.state();
            st.marks.asleep.insert(
                session.to_string(),
                Asleep {
                    since: Utc::now(),
                    depth: spec.depth,
                    reason,
                },
            );
            self.save(&st);
            st.running.remove(session);
            st.awake_since.remove(session);
        }
        self.proxy_asleep(session, true, &HashMap::new());
        let r = match spec.depth {
            SleepDepth::Pause => bounded("pause", Duration::from_secs(30), p.pause(session)).await,
            SleepDepth::Stop => {
                let stop = SessionAction::StopSession {
                    session: session.to_string(),
                    provider: spec.provider,
                    stop_timeout: spec.stop_timeout,
                };
                let limit = spec
                    .stop_timeout
                    .map(|t| t.std())
                    .unwrap_or(Duration::from_secs(10))
                    + Duration::from_secs(30);
                bounded("stop", limit, p.apply(&stop)).await
            }
        };
        if let Err(e) = r {
            // Still awake: unmarked, served again.
            {
                let mut st = self.state();
                st.marks.asleep.remove(session);
                self.save(&st);
                st.running.insert(session.to_string());
                st.awake_since.insert(session.to_string(), now_ms());
            }
            self.proxy_asleep(session, false, &HashMap::new());
            return Err(e);
        }
        Ok(())
    }

    /// The sessions idle past their timeout now, given each one's last activity.
    fn idle_now(&self, activity: &HashMap<String, u64>, now: u64) -> Vec<String> {
        let st = self.state();
        let mut out = Vec::new();
        for name in &st.running {
            let Some(spec) = st.specs.get(name) else {
                continue;
            };
            let Some(idle) = spec.idle_timeout else {
                continue;
            };
            if spec.state == RunState::Stopped
                || st.waking.contains(name)
                || st.falling.contains(name)
            {
                continue;
            }
            let since = st.awake_since.get(name).copied().unwrap_or(now);
            let last = activity.get(name).copied().unwrap_or(0).max(since);
            if now.saturating_sub(last) >= idle.as_millis() as u64 {
                out.push(name.clone());
            }
        }
        out.sort();
        out
    }

    /// Each session's last activity through the embedded proxy.
    fn activity(&self) -> HashMap<String, u64> {
        self.inner
            .proxy
            .as_ref()
            .map(Proxy::session_activity)
            .unwrap_or_default()
    }

    /// Put idle sessions to sleep, until cancelled: a check every `tick`.
    pub async fn run(self, tick: Duration, cancel: CancellationToken) {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(tick) => {}
            }
            // Nothing that can fall asleep by idleness runs: no activity to read (the default
            // has no idle timeouts, and costs nothing here).
            let any = {
                let st = self.state();
                st.running
                    .iter()
                    .any(|n| st.specs.get(n).is_some_and(|s| s.idle_timeout.is_some()))
            };
            if !any {
                continue;
            }
            for name in self.idle_now(&self.activity(), now_ms()) {
                let lc = self.clone();
                tokio::spawn(async move {
                    let _ = lc.sleep(&name, SleepReason::Idle).await;
                });
            }
        }
    }

    /// Each looked-after or marked session's lifecycle, for status.
    pub fn view(&self) -> BTreeMap<String, SessionLife> {
        let activity = self.activity();
        let held = self
            .inner
            .proxy
            .as_ref()
            .map(Proxy::held_by_session)
            .unwrap_or_default();
        let st = self.state();
        let names: std::collections::BTreeSet<&String> =
            st.specs.keys().chain(st.marks.asleep.keys()).collect();
        names
            .into_iter()
            .map(|n| {
                let mark = st.marks.asleep.get(n);
                let lifecycle = if st.waking.contains(n) {
                    "waking"
                } else if st.falling.contains(n) {
                    // Marked, held, and being paused or stopped now.
                    "falling-asleep"
                } else if mark.is_some() {
                    "asleep"
                } else {
                    "awake"
                };
                let (wakes, last, err) = st.wakes.get(n).cloned().unwrap_or_default();
                (
                    n.clone(),
                    SessionLife {
                        state: lifecycle.to_string(),
                        last_activity: activity.get(n).and_then(|t| at(*t)),
                        asleep_since: mark.map(|m| m.since),
                        sleep_reason: mark.map(|m| m.reason),
                        held_requests: held.get(n.as_str()).copied().unwrap_or(0),
                        wakes,
                        last_wake_ms: last,
                        last_wake_error: err,
                    },
                )
            })
            .collect()
    }
}

/// Where each owned session on a host with a declared capacity runs, and what its plan asks
/// for (the declared plan; else what it was made with). Empty without capacities.
fn usage(
    desired: &Desired,
    observed: &Observed,
    capacity: &BTreeMap<HostKey, crate::model::HostCapacity>,
) -> HashMap<String, Usage> {
    if capacity.is_empty() {
        return HashMap::new();
    }
    observed
        .sessions
        .values()
        .filter(|o| o.owned)
        .filter_map(|o| {
            let host = (o.provider, o.host.clone());
            if !capacity.contains_key(&host) {
                return None;
            }
            let plan = desired
                .sessions
                .get(&o.name)
                .and_then(|d| desired.plans.get(&d.spec.plan))
                .map(|p| (p.spec.cpus, p.spec.memory));
            let (cpus, memory) = plan.or_else(|| o.spec.as_ref().map(|s| (s.cpus, s.memory)))?;
            Some((
                o.name.clone(),
                Usage {
                    host,
                    cpus: cpus.unwrap_or(0.0),
                    memory: memory.map_or(0, |m| m.bytes()),
                },
            ))
        })
        .collect()
}

/// Whether a session can wake under the caps and its host's capacity.
enum Room {
    Enough,
    /// Once this session (the least recently active that can make the room) sleeps.
    After(String),
    Full,
}

/// Room for `session` to wake: under `limits` (sessions running, all and per owner), and on
/// its host (what the plans there ask for against its capacity; a paused session keeps its
/// memory, so only sleeping at depth `stop` frees memory).
fn room_for(st: &State, session: &str, activity: &HashMap<String, u64>) -> Room {
    let awake: HashSet<&String> = st
        .running
        .iter()
        .chain(st.waking.iter())
        .filter(|n| n.as_str() != session)
        .collect();
    let limits = st.limits;
    let owner = st.owners.get(session).cloned().unwrap_or_default();
    let owner_of = |n: &str| st.owners.get(n).cloned().unwrap_or_default();
    let over_total = limits
        .max_running
        .is_some_and(|m| awake.len() as u64 >= u64::from(m));
    let over_owner = limits.max_running_per_owner.is_some_and(|m| {
        awake.iter().filter(|n| owner_of(n) == owner).count() as u64 >= u64::from(m)
    });
    // On its host: what runs there, and the memory of what is paused there.
    let (over_cpus, over_memory, host) = match st.usage.get(session) {
        Some(mine) => {
            let cap = st.capacity.get(&mine.host).copied().unwrap_or_default();
            let (mut cpus, mut memory) = (0.0f64, 0u64);
            for (n, u) in &st.usage {
                if n == session || u.host != mine.host {
                    continue;
                }
                if awake.contains(n) {
                    cpus += u.cpus;
                    memory += u.memory;
                } else if st
                    .marks
                    .asleep
                    .get(n)
                    .is_some_and(|m| m.depth == SleepDepth::Pause)
                {
                    memory += u.memory;
                }
            }
            let paused = st
                .marks
                .asleep
                .get(session)
                .is_some_and(|m| m.depth == SleepDepth::Pause);
            // Paused, its memory is held already.
            let needs_memory = if paused { 0 } else { mine.memory };
            (
                cap.cpus
                    .is_some_and(|c| mine.cpus > 0.0 && cpus + mine.cpus > f64::from(c) + 1e-9),
                cap.memory
                    .is_some_and(|m| needs_memory > 0 && memory + needs_memory > m.bytes()),
                Some(&mine.host),
            )
        }
        None => (false, false, None),
    };
    if !over_total && !over_owner && !over_cpus && !over_memory {
        return Room::Enough;
    }
    st.running
        .iter()
        .filter(|n| n.as_str() != session && !st.falling.contains(*n))
        .filter(|n| {
            st.specs.get(*n).is_some_and(|s| {
                s.state != RunState::Stopped
                    // Pausing frees no memory.
                    && (!over_memory || s.depth == SleepDepth::Stop)
            })
        })
        .filter(|n| !over_owner || over_total || owner_of(n) == owner)
        .filter(|n| !(over_cpus || over_memory) || st.usage.get(*n).map(|u| &u.host) == host)
        .min_by_key(|n| {
            (
                activity
                    .get(*n)
                    .copied()
                    .unwrap_or(0)
                    .max(st.awake_since.get(*n).copied().unwrap_or(0)),
                (*n).clone(),
            )
        })
        .map_or(Room::Full, |v| Room::After(v.clone()))
}

/// What the proxy says for routes it does not serve: the routes of sessions declared
/// `stopped` get the "stopped" page; and the routes of sessions that sleep, their own choice
/// of the waking page. Only those sessions' routes are expanded.
fn pages(
    desired: &Desired,
    templates: &[crate::model::RouteTemplate],
    domain: &str,
    specs: &HashMap<String, LifeSpec>,
) -> crate::proxy::Pages {
    let stopped = |name: &str| {
        desired
            .sessions
            .get(name)
            .is_some_and(|d| d.spec.state == RunState::Stopped)
    };
    let mut out = crate::proxy::Pages::default();
    let routes = crate::desired::effective_routes(desired, templates, domain, |name| {
        specs.contains_key(name) || stopped(name)
    });
    for r in routes {
        if stopped(r.session) {
            out.stopped_route(&r.key, r.session);
        } else if let Some(page) = r.waking_page {
            out.waking_page.insert(r.key, page);
        }
    }
    out
}

/// Why a sleep or a wake did not happen.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error("no {0} provider is configured")]
    NoProvider(&'static str),
    #[error("{step}")]
    Step {
        step: &'static str,
        #[source]
        source: crate::providers::ProviderError,
    },
    #[error("{step}: no answer within {} s", .limit.as_secs())]
    TimedOut { step: &'static str, limit: Duration },
    #[error("the platform is full: every running session is in use and none can sleep")]
    Full,
    #[error("putting {session} to sleep to make room")]
    MakingRoom {
        session: String,
        #[source]
        source: Box<LifecycleError>,
    },
}

/// Run one provider call of `step` within `limit`.
/// Does `addr` pass the health probe within a second (a resumed session answers at once)?
/// The shared health wait, with the address known and nothing to look at.
async fn answers_soon(addr: &str, path: Option<&str>) -> bool {
    let known = || async { Ok(Some(addr.to_string())) };
    let wait = crate::providers::compute::health::wait_until_healthy(
        path,
        Duration::from_secs(1),
        Duration::from_secs(1),
        known,
    );
    matches!(
        tokio::time::timeout(Duration::from_secs(1), wait).await,
        Ok(Ok(()))
    )
}

async fn bounded(
    step: &'static str,
    limit: Duration,
    f: impl std::future::Future<Output = Result<(), crate::providers::ProviderError>>,
) -> Result<(), LifecycleError> {
    match tokio::time::timeout(limit, f).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(source)) => Err(LifecycleError::Step { step, source }),
        Err(_) => Err(LifecycleError::TimedOut { step, limit }),
    }
}
