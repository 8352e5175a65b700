//! Property tests for the planner: convergence, safety and determinism over random desired
//! trees, random worlds and random drift.

use std::collections::BTreeMap;
use std::path::PathBuf;
use vessel::model::plan::{RecordAction, RouteAction, SessionAction};

use chrono::{DateTime, Utc};
use proptest::prelude::*;

use vessel::config::{Config, DestroyBudget};
use vessel::desired::{Desired, Doc, Held, Quarantine};
use vessel::model::{Kind, PlanSpec, Port, RouteSpec, RunState, SessionSpec, Source, tag};
use vessel::observed::{
    Observed, ObservedRecord, ObservedRoute, ObservedSession, ProviderId, RecordType, SessionState,
};
use vessel::planner::{
    Action, Plan, Policy, plan, render,
    simulate::{converge, simulate},
};

fn doc<T>(spec: T, file: &str) -> Doc<T> {
    Doc {
        spec,
        file: PathBuf::from(file),
        pos: Default::default(),
        fields: BTreeMap::new(),
    }
}

fn plans(variant: u8) -> Vec<PlanSpec> {
    let mk = |name: &str, cmd: &str, ports: &[(&str, u16)]| PlanSpec {
        kind: tag::Plan::Plan,
        name: name.into(),
        compute: Default::default(),
        image: None,
        guest: None,
        template: None,
        clone: None,
        storage: None,
        pull: None,
        command: vec![cmd.into(), "{port.ide}".into()],
        env: BTreeMap::new(),
        cpus: None,
        memory: None,
        disk: None,
        ports: ports
            .iter()
            .map(|(n, p)| (n.to_string(), Port(*p)))
            .collect(),
        health: None,
        firewall: None,
        hotplug: false,
        snapshots: None,
        idle_timeout: None,
        sleep: None,
        stop_timeout: None,
        warn_before: None,
        schedule: None,
    };
    let cmd = if variant.is_multiple_of(2) {
        "serve"
    } else {
        "serve2"
    };
    vec![
        mk("p0", cmd, &[("ide", 8080), ("app", 5173)]),
        mk("p1", "serve", &[("ide", 8080)]),
    ]
}

#[derive(Debug, Clone)]
struct GenSession {
    name: u8,
    plan: u8,
    state: u8,
    source: Option<(u8, bool)>,
    docs_route: bool,
}

fn gen_session() -> impl Strategy<Value = GenSession> {
    (
        0u8..10,
        0u8..2,
        0u8..3,
        proptest::option::of((0u8..3, any::<bool>())),
        any::<bool>(),
    )
        .prop_map(|(name, plan, state, source, docs_route)| GenSession {
            name,
            plan,
            state,
            source,
            docs_route,
        })
}

fn build(variant: u8, sessions: &[GenSession]) -> Desired {
    let mut d = Desired::default();
    for p in plans(variant) {
        d.plans.insert(p.name.clone(), doc(p, "plans.yaml"));
    }
    for g in sessions {
        let name = format!("s{}", g.name);
        let file = format!("{name}.yaml");
        let spec = SessionSpec {
            kind: tag::Session::Session,
            name: name.clone(),
            plan: format!("p{}", g.plan),
            owner: None,
            state: [RunState::Running, RunState::Sleeping, RunState::Stopped][g.state as usize],
            source: g.source.map(|(n, save)| Source {
                path: PathBuf::from(format!("/srv/{name}-{n}")),
                exclude: vec![],
                save_on_stop: save,
            }),
            expires: None,
            on_expiry: Default::default(),
            restart_requested: None,
            destroy_after: None,
            warn_before: None,
            schedule: None,
            env: BTreeMap::new(),
            location: None,
            idle_timeout: None,
        };
        d.sessions.insert(name.clone(), doc(spec, &file));
        if g.docs_route {
            let r = RouteSpec {
                kind: tag::Route::Route,
                name: format!("{name}-docs"),
                host: format!("docs-{name}.example.com"),
                session: name.clone(),
                port: "ide".into(),
                path: None,
                strip_prefix: false,
                dns: true,
                waking_page: None,
            };
            d.routes.insert(r.name.clone(), doc(r, &file));
            // And a path route on a host every session shares.
            let r = RouteSpec {
                kind: tag::Route::Route,
                name: format!("{name}-preview"),
                host: "preview.example.com".into(),
                session: name.clone(),
                port: "ide".into(),
                path: Some(format!("/{name}")),
                strip_prefix: true,
                dns: false,
                waking_page: None,
            };
            d.routes.insert(r.name.clone(), doc(r, &file));
        }
        d.files.push(PathBuf::from(file));
    }
    d
}

fn now() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-06-01T00:00:00Z")
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_default()
}

fn policy(allow: bool) -> Policy {
    let mut p = Config::embedded_default(std::path::Path::new(".")).policy(now());
    p.dns = Some((RecordType::A, "192.0.2.1".into()));
    p.allow_destroy = allow;
    p.allow_empty_source = allow;
    p.destroy_budget = DestroyBudget {
        max_count: 3,
        max_percent: 50,
    };
    p
}

#[derive(Debug, Clone)]
enum Drift {
    Stop(u8),
    Fail(u8),
    Remove(u8),
    Upstream(u8),
    RemoveRoute(u8),
}

fn gen_drift() -> impl Strategy<Value = Drift> {
    prop_oneof![
        (0u8..10).prop_map(Drift::Stop),
        (0u8..10).prop_map(Drift::Fail),
        (0u8..10).prop_map(Drift::Remove),
        (0u8..10).prop_map(Drift::Upstream),
        (0u8..10).prop_map(Drift::RemoveRoute),
    ]
}

fn drift(o: &mut Observed, ds: &[Drift]) {
    for d in ds {
        match d {
            Drift::Stop(n) => {
                if let Some(s) = o.sessions.get_mut(&format!("s{n}")) {
                    s.state = SessionState::Stopped;
                }
            }
            Drift::Fail(n) => {
                if let Some(s) = o.sessions.get_mut(&format!("s{n}")) {
                    s.state = SessionState::Failed;
                }
            }
            Drift::Remove(n) => {
                o.sessions.remove(&format!("s{n}"));
            }
            Drift::Upstream(n) => {
                if let Some(r) = o.routes.get_mut(&format!("s{n}.localhost")) {
                    r.upstream = "127.0.0.1:1".into();
                }
            }
            Drift::RemoveRoute(n) => {
                o.routes.remove(&format!("s{n}.localhost"));
            }
        }
    }
}

/// A world converged from one random tree, then drifted.
fn world(variant: u8, sessions: &[GenSession], ds: &[Drift]) -> Observed {
    let (mut o, _) = converge(
        &build(variant, sessions),
        &Observed::default(),
        &policy(true),
        6,
    );
    drift(&mut o, ds);
    o
}

fn foreign(o: &mut Observed, n: u8) {
    let name = format!("s{n}");
    o.sessions.insert(
        name.clone(),
        ObservedSession {
            name: name.clone(),
            provider: Default::default(),
            state: SessionState::Running,
            owned: false,
            fingerprint: "x".into(),
            spec: None,
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
    let host = format!("{name}.localhost");
    o.routes.insert(
        host.clone(),
        ObservedRoute {
            host: host.clone(),
            path: None,
            strip_prefix: false,
            upstream: "10.0.0.1:80".into(),
            owned: false,
            session: None,
            route: None,
        },
    );
    let rec = format!("docs-{name}.example.com");
    o.records.insert(
        Observed::record_key(&rec, RecordType::A),
        ObservedRecord {
            name: rec,
            rtype: RecordType::A,
            content: "198.51.100.1".into(),
            owned: false,
            session: None,
        },
    );
}

/// (session, route host, record name) a step acts on.
fn step_touches(a: &Action) -> (Option<String>, Option<String>, Option<String>) {
    match a {
        Action::Route(r) => (None, Some(r.key()), None),
        Action::Record(RecordAction::UpsertRecord { name, .. })
        | Action::Record(RecordAction::RemoveRecord { name, .. }) => {
            (None, None, Some(name.clone()))
        }
        other => (other.session().map(str::to_string), None, None),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(200), .. ProptestConfig::default() })]

    /// Apply the plan on paper, plan again: within a few passes nothing is left to do, and the
    /// world holds exactly the desired sessions in their desired states.
    #[test]
    fn plans_converge(
        wv in 0u8..2, world_s in proptest::collection::vec(gen_session(), 0..8),
        dv in 0u8..2, want_s in proptest::collection::vec(gen_session(), 0..8),
        ds in proptest::collection::vec(gen_drift(), 0..6),
    ) {
        let observed = world(wv, &world_s, &ds);
        let desired = build(dv, &want_s);
        let pol = policy(true);
        let (end, passes) = converge(&desired, &observed, &pol, 4);
        let last = plan(&desired, &end, &pol);
        prop_assert!(last.is_empty(), "not converged after {passes} passes:\n{}", render::text(&last, &end, false));
        let names: Vec<&String> = end.sessions.keys().collect();
        let want: Vec<&String> = desired.sessions.keys().collect();
        prop_assert_eq!(names, want);
        for (n, s) in &desired.sessions {
            let state = end.sessions[n].state;
            match s.spec.state {
                RunState::Running => prop_assert_eq!(state, SessionState::Running, "{}", n),
                RunState::Stopped => prop_assert_eq!(state, SessionState::Stopped, "{}", n),
                // Asleep, or awake because a request woke it: either is `sleeping`.
                RunState::Sleeping => prop_assert_ne!(state, SessionState::Failed, "{}", n),
            }
        }
    }

    /// No step on anything in an observation gap; nothing not owned is ever destroyed, removed
    /// or overwritten; nothing from a quarantined file is touched.
    #[test]
    fn plans_are_safe(
        wv in 0u8..2, world_s in proptest::collection::vec(gen_session(), 0..8),
        dv in 0u8..2, want_s in proptest::collection::vec(gen_session(), 0..8),
        ds in proptest::collection::vec(gen_drift(), 0..6),
        gaps in proptest::collection::btree_set(0u8..3, 0..3),
        foreigners in proptest::collection::btree_set(0u8..10, 0..3),
        quarantined in proptest::option::of((0u8..10, any::<bool>())),
        allow in any::<bool>(),
    ) {
        let mut observed = world(wv, &world_s, &ds);
        for f in &foreigners {
            foreign(&mut observed, *f);
        }
        for g in &gaps {
            let p = [ProviderId::Compute(Default::default()), ProviderId::Proxy, ProviderId::Dns][*g as usize].clone();
            observed.gaps.insert(p, "unreachable".into());
        }
        let mut desired = build(dv, &want_s);
        let mut held_session = None;
        let mut incomplete = false;
        if let Some((q, complete)) = quarantined {
            incomplete = !complete;
            let name = format!("s{q}");
            desired.sessions.remove(&name);
            desired.routes.retain(|_, r| r.spec.session != name);
            desired.quarantined.insert(PathBuf::from(format!("{name}.yaml")), Quarantine { errors: vec![], held: vec![Held { kind: Kind::Session, name: name.clone() }], complete });
            held_session = Some(name);
        }
        let p: Plan = plan(&desired, &observed, &policy(allow));
        for step in &p.steps {
            prop_assert!(observed.is_observed(&step.action.provider()), "step in a gap: {:?}", step.action);
            let (session, host, record) = step_touches(&step.action);
            if let Some(s) = &session {
                if let Some(o) = observed.sessions.get(s) {
                    prop_assert!(o.owned, "step on a foreign session: {:?}", step.action);
                }
                prop_assert!(held_session.as_ref() != Some(s), "step on a quarantined session: {:?}", step.action);
            }
            if let Some(h) = &host
                && let Some(r) = observed.routes.get(h) {
                    prop_assert!(r.owned, "step on a foreign route: {:?}", step.action);
                    prop_assert!(held_session.is_none() || r.session != held_session, "step on a quarantined route: {:?}", step.action);
                }
            if let Some(n) = &record {
                for rec in observed.records.values().filter(|r| &r.name == n) {
                    prop_assert!(rec.owned, "step on a foreign record: {:?}", step.action);
                }
                let of_held = observed.routes.get(n).is_some_and(|r| held_session.is_some() && r.session == held_session);
                prop_assert!(!of_held, "step on a quarantined session's record: {:?}", step.action);
            }
            for d in &step.depends_on {
                prop_assert!(*d < step.id, "dependencies point backwards");
            }
            if incomplete {
                let removes = matches!(step.action, Action::Route(RouteAction::RemoveRoute { .. }) | Action::Record(RecordAction::RemoveRecord { .. }))
                    || (matches!(step.action, Action::Session(SessionAction::DestroySession { .. })) && !matches!(step.reason, vessel::planner::Reason::Replaced { .. }));
                prop_assert!(!removes, "a file with unknown contents holds every destroy: {:?}", step.action);
            }
        }
        if !allow {
            let destroys = p.steps.iter().filter(|s| matches!(s.action, Action::Session(SessionAction::DestroySession { .. })) && !matches!(s.reason, vessel::planner::Reason::Replaced { .. })).count();
            prop_assert!(destroys <= 3, "the destroy budget holds: {destroys}");
        }
    }

    /// The same inputs give a byte-identical plan, whatever order the maps were filled in.
    #[test]
    fn plans_are_deterministic(
        wv in 0u8..2, world_s in proptest::collection::vec(gen_session(), 0..8),
        want_s in proptest::collection::vec(gen_session(), 0..8),
        ds in proptest::collection::vec(gen_drift(), 0..6),
    ) {
        let observed = world(wv, &world_s, &ds);
        let desired = build(0, &want_s);
        let a = render::json(&plan(&desired, &observed, &policy(false)));
        let mut reversed = observed.clone();
        reversed.sessions = observed.sessions.iter().rev().map(|(k, v)| (k.clone(), v.clone())).collect();
        reversed.routes = observed.routes.iter().rev().map(|(k, v)| (k.clone(), v.clone())).collect();
        let mut shuffled_desired = build(0, &want_s.iter().rev().cloned().collect::<Vec<_>>());
        shuffled_desired.files.sort();
        let mut d2 = desired.clone();
        d2.files.sort();
        let b = render::json(&plan(&shuffled_desired, &reversed, &policy(false)));
        let c = render::json(&plan(&d2, &observed, &policy(false)));
        prop_assert_eq!(&a, &c);
        // Duplicate session numbers make the reversed build keep a different spec; compare only
        // when the generated names are distinct.
        let mut names: Vec<u8> = want_s.iter().map(|g| g.name).collect();
        names.sort();
        names.dedup();
        if names.len() == want_s.len() {
            prop_assert_eq!(&a, &b);
        }
    }
}

#[test]
fn simulate_of_an_empty_plan_changes_nothing() {
    let o = world(
        0,
        &[GenSession {
            name: 1,
            plan: 0,
            state: 0,
            source: None,
            docs_route: true,
        }],
        &[],
    );
    let p = plan(
        &build(
            0,
            &[GenSession {
                name: 1,
                plan: 0,
                state: 0,
                source: None,
                docs_route: true,
            }],
        ),
        &o,
        &policy(false),
    );
    assert!(p.is_empty(), "{}", render::text(&p, &o, false));
    assert_eq!(simulate(&p, &o), o);
}
