//! The loop in process, with fake providers built on the planner's simulator: a compute, a
//! proxy and a DNS provider whose world is an `Observed` that each step changes exactly as
//! `planner::simulate::simulate_step` says it would. Failures are injected per session. These
//! drive the reconciler's backoff, conditions, follow-up passes and observation (two compute
//! providers reporting one session) in milliseconds, without spawning the binary; the
//! end-to-end tests beside them, on real processes and servers, stay.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use vessel::config::{Config, DnsConfig};
use vessel::model::ComputeKind;
use vessel::model::observed::{Observed, ObservedRecord, ObservedRoute, ObservedSession};
use vessel::model::plan::{Action, HoldReason, Object, RecordAction, RouteAction, SessionAction};
use vessel::planner::simulate::simulate_step;
use vessel::providers::compute::ComputeProvider;
use vessel::providers::dns::DnsProvider;
use vessel::providers::proxy::ProxyProvider;
use vessel::providers::{BoxFut, ProviderError, Providers};
use vessel::reconcile::{Reconciler, Trigger};
use vessel::state::StateDir;

/// The fake world every fake provider reads and changes, and what the test injects.
#[derive(Default)]
struct World {
    observed: Observed,
    /// Sessions whose create fails.
    failing: BTreeSet<String>,
    /// Session steps applied, by verb and session, in order.
    calls: Vec<String>,
}

type Shared = Arc<Mutex<World>>;

fn lock(w: &Shared) -> std::sync::MutexGuard<'_, World> {
    w.lock().unwrap_or_else(|p| p.into_inner())
}

/// A compute provider of one kind: its sessions are the world's sessions of that kind, plus
/// any `extra` it reports as well (a second provider reporting a name).
struct FakeCompute {
    kind: ComputeKind,
    world: Shared,
    extra: Vec<ObservedSession>,
}

impl ComputeProvider for FakeCompute {
    fn kind(&self) -> ComputeKind {
        self.kind
    }

    fn observe(&self) -> BoxFut<'_, Result<Vec<ObservedSession>, ProviderError>> {
        let w = lock(&self.world);
        let mut v: Vec<ObservedSession> = w
            .observed
            .sessions
            .values()
            .filter(|s| s.provider == self.kind)
            .cloned()
            .collect();
        v.extend(self.extra.iter().cloned());
        Box::pin(async move { Ok(v) })
    }

    fn apply<'a>(&'a self, action: &'a SessionAction) -> BoxFut<'a, Result<(), ProviderError>> {
        let mut w = lock(&self.world);
        w.calls
            .push(format!("{} {}", action.verb(), action.session()));
        let r = if matches!(action, SessionAction::CreateSession { .. })
            && w.failing.contains(action.session())
        {
            Err(ProviderError::failed(
                "create",
                action.session(),
                "the fake engine refuses",
            ))
        } else {
            simulate_step(&Action::Session(action.clone()), &mut w.observed);
            Ok(())
        };
        Box::pin(async move { r })
    }
}

/// A batch of route or record steps, each simulated on the world.
fn batch<A>(
    world: &Shared,
    actions: &[&A],
    action: impl Fn(&A) -> Action,
) -> Vec<Result<(), ProviderError>> {
    let mut w = lock(world);
    actions
        .iter()
        .map(|a| {
            simulate_step(&action(a), &mut w.observed);
            Ok(())
        })
        .collect()
}

struct FakeProxy(Shared);

impl ProxyProvider for FakeProxy {
    fn observe(&self) -> BoxFut<'_, Result<Vec<ObservedRoute>, ProviderError>> {
        let v: Vec<ObservedRoute> = lock(&self.0).observed.routes.values().cloned().collect();
        Box::pin(async move { Ok(v) })
    }

    fn apply<'a>(
        &'a self,
        actions: &'a [&'a RouteAction],
    ) -> BoxFut<'a, Vec<Result<(), ProviderError>>> {
        let r = batch(&self.0, actions, |a| Action::Route(a.clone()));
        Box::pin(async move { r })
    }
}

struct FakeDns(Shared);

impl DnsProvider for FakeDns {
    fn observe(&self) -> BoxFut<'_, Result<Vec<ObservedRecord>, ProviderError>> {
        let v: Vec<ObservedRecord> = lock(&self.0).observed.records.values().cloned().collect();
        Box::pin(async move { Ok(v) })
    }

    fn apply<'a>(
        &'a self,
        actions: &'a [&'a RecordAction],
    ) -> BoxFut<'a, Vec<Result<(), ProviderError>>> {
        let r = batch(&self.0, actions, |a| Action::Record(a.clone()));
        Box::pin(async move { r })
    }
}

const PLAN: &str =
    "kind: Plan\nname: web\ncommand: [serve, '{port.ide}']\nports: {ide: 8080, app: 5173}\n";

fn session(name: &str) -> String {
    format!("kind: Session\nname: {name}\nplan: web\n")
}

/// A reconciler over `dir`'s files, on fake providers sharing `world`; `extra` are sessions a
/// second (docker) compute provider reports.
fn reconciler(dir: &Path, world: &Shared, extra: Vec<ObservedSession>) -> Reconciler {
    let source = dir.join("desired");
    std::fs::create_dir_all(&source).expect("mkdir");
    let mut config = Config::embedded_default(&source);
    config.state_dir = dir.join("state");
    for t in &mut config.routes.templates {
        t.dns = true;
    }
    config.providers.dns = DnsConfig::Hosts {
        file: dir.join("hosts"),
        address: "127.0.0.1".into(),
    };
    let mut compute: BTreeMap<ComputeKind, Arc<dyn ComputeProvider>> = BTreeMap::new();
    compute.insert(
        ComputeKind::Process,
        Arc::new(FakeCompute {
            kind: ComputeKind::Process,
            world: world.clone(),
            extra: Vec::new(),
        }),
    );
    if !extra.is_empty() {
        compute.insert(
            ComputeKind::Docker,
            Arc::new(FakeCompute {
                kind: ComputeKind::Docker,
                world: world.clone(),
                extra,
            }),
        );
    }
    let providers = Providers {
        compute,
        proxy: Arc::new(FakeProxy(world.clone())),
        dns: Some(Arc::new(FakeDns(world.clone()))),
        embedded: None,
        observe_timeout: Duration::from_secs(5),
        locks: Default::default(),
    };
    let state = StateDir::open(&config.state_dir).expect("state dir");
    Reconciler::new(config, providers, state)
}

fn write(dir: &Path, file: &str, text: &str) {
    std::fs::create_dir_all(dir.join("desired")).expect("mkdir");
    std::fs::write(dir.join("desired").join(file), text).expect("write");
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn condition(r: &Reconciler, session: &str, kind: &str) -> Option<bool> {
    r.latest()
        .conditions
        .get(session)?
        .iter()
        .find(|c| c.kind == kind)
        .map(|c| c.status)
}

#[test]
fn follow_up_passes_bring_sessions_routes_and_records_up_and_then_nothing_is_left() {
    let dir = tempfile::tempdir().expect("tempdir");
    let world = Shared::default();
    write(dir.path(), "plans.yaml", PLAN);
    write(dir.path(), "alice.yaml", &session("alice"));
    write(dir.path(), "bob.yaml", &session("bob"));
    let mut r = reconciler(dir.path(), &world, Vec::new());
    let cancel = CancellationToken::new();
    let reports = rt().block_on(r.converge(Trigger::Startup, 10, &cancel, |_| {}));
    // The first pass makes the sessions; routes wait for their addresses, so a follow-up pass
    // makes them (and their records); the last finds nothing to do.
    assert!(reports.len() >= 2, "{} passes", reports.len());
    assert_eq!(reports[1].trigger, Trigger::Followup);
    let last = reports.last().expect("a pass");
    assert!(last.converged, "converged: {last:?}");
    let w = lock(&world);
    assert_eq!(
        w.observed.sessions.keys().collect::<Vec<_>>(),
        ["alice", "bob"]
    );
    for host in ["alice.localhost", "5173-alice.localhost", "bob.localhost"] {
        let route = w.observed.routes.get(host).expect(host);
        assert!(route.owned && route.upstream.contains(".sim:"), "{route:?}");
    }
    assert_eq!(
        w.observed.records.len(),
        w.observed.routes.len(),
        "a record per route host"
    );
    drop(w);
    assert_eq!(condition(&r, "alice", "Ready"), Some(true));
    assert_eq!(condition(&r, "alice", "Stalled"), Some(false));
}

#[test]
fn a_failing_create_backs_off_reads_stalled_and_recovers_once_fixed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let world = Shared::default();
    lock(&world).failing.insert("alice".into());
    write(dir.path(), "plans.yaml", PLAN);
    write(dir.path(), "alice.yaml", &session("alice"));
    write(dir.path(), "bob.yaml", &session("bob"));
    let mut r = reconciler(dir.path(), &world, Vec::new());
    let cancel = CancellationToken::new();
    let rt = rt();

    let (first, _, _) = rt.block_on(r.pass(Trigger::Startup, &cancel, |_| {}));
    assert_eq!(first.outcomes.get("failed"), Some(&1), "{first:?}");
    assert!(lock(&world).observed.sessions.contains_key("bob"));
    assert_eq!(condition(&r, "alice", "Stalled"), Some(true));
    assert_eq!(condition(&r, "bob", "Stalled"), Some(false));
    let retry = r.next_retry().expect("a backoff is running");

    // A pass at once: alice's create waits out its backoff, untried; nothing spins.
    let creates = |w: &Shared| {
        lock(w)
            .calls
            .iter()
            .filter(|c| *c == "create alice")
            .count()
    };
    assert_eq!(creates(&world), 1);
    let (again, _, _) = rt.block_on(r.pass(Trigger::Followup, &cancel, |_| {}));
    assert_eq!(creates(&world), 1, "tried again inside its backoff");
    assert!(again.outcomes.contains_key("backing_off"), "{again:?}");

    // It fails again once the backoff ends: the next backoff is longer.
    std::thread::sleep(
        retry.saturating_duration_since(std::time::Instant::now()) + Duration::from_millis(5),
    );
    let t = std::time::Instant::now();
    rt.block_on(r.pass(Trigger::Timer, &cancel, |_| {}));
    assert_eq!(creates(&world), 2);
    let second = r.next_retry().expect("backing off again");
    assert!(
        second.saturating_duration_since(t) > Duration::from_millis(400),
        "the second backoff ({:?}) is longer than the first's minimum",
        second.saturating_duration_since(t)
    );

    // Fixed: after the backoff it is made, and reads Ready once its routes follow.
    lock(&world).failing.clear();
    std::thread::sleep(
        second.saturating_duration_since(std::time::Instant::now()) + Duration::from_millis(5),
    );
    let reports = rt.block_on(r.converge(Trigger::Timer, 10, &cancel, |_| {}));
    assert!(reports.last().is_some_and(|p| p.converged), "{reports:?}");
    assert!(lock(&world).observed.sessions.contains_key("alice"));
    assert_eq!(condition(&r, "alice", "Ready"), Some(true));
    assert_eq!(condition(&r, "alice", "Stalled"), Some(false));
    assert_eq!(r.next_retry(), None, "success clears the backoff");
}

#[test]
fn a_session_two_compute_providers_report_is_held_and_never_destroyed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let world = Shared::default();
    write(dir.path(), "plans.yaml", PLAN);
    write(dir.path(), "alice.yaml", &session("alice"));
    write(dir.path(), "bob.yaml", &session("bob"));
    // Make the world first, on the process provider alone.
    let cancel = CancellationToken::new();
    let rt = rt();
    {
        let mut r = reconciler(dir.path(), &world, Vec::new());
        rt.block_on(r.converge(Trigger::Startup, 10, &cancel, |_| {}));
    }
    // A docker provider reports an owned session named alice too, and alice is no longer
    // declared, with destroys allowed.
    let mut twin = lock(&world).observed.sessions["alice"].clone();
    twin.provider = ComputeKind::Docker;
    std::fs::remove_file(dir.path().join("desired/alice.yaml")).expect("rm");
    let mut r = reconciler(dir.path(), &world, vec![twin]);
    r.allow_destroy = true;
    r.config.policy.settle = vessel::model::Duration::from_secs(0);
    let (report, plan, _) = rt.block_on(r.pass(Trigger::Source, &cancel, |_| {}));

    let observed = r.latest().observed.clone().expect("observed");
    assert_eq!(
        observed.duplicates.get("alice"),
        Some(&vec![ComputeKind::Process, ComputeKind::Docker]),
        "the observation shows both providers"
    );
    let hold = plan
        .held
        .iter()
        .find(|h| h.object == Object::Session("alice".into()))
        .expect("alice is held");
    assert!(
        matches!(&hold.why, HoldReason::Duplicate { providers } if providers.len() == 2),
        "{hold:?}"
    );
    assert!(
        plan.steps
            .iter()
            .all(|s| s.action.session() != Some("alice")),
        "no step touches alice: {:?}",
        plan.steps
    );
    assert_eq!(report.summary.destroy, 0);
    let w = lock(&world);
    assert!(w.observed.sessions.contains_key("alice"));
    assert!(w.observed.routes.contains_key("alice.localhost"));
    assert!(!w.calls.iter().any(|c| c.starts_with("destroy")));
}
