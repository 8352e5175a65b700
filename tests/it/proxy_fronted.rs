//! Caddy and Traefik in front of vessel's wake-and-activity listener (`wake_listen`, issue 15
//! point 2), against a real Caddy and a real Traefik with real session processes: vessel's
//! routes in the outer proxy point at the wake listener, a session with `idle_timeout: 1s`
//! falls asleep behind it, a request through the outer proxy wakes it and gets the right
//! answer (a path route with its prefix stripped too), `vessel plan` against the live
//! providers sees no drift, and the outer proxy's foreign routes stay as they were.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;

use crate::daemon_support::{Daemon, free_port, get, wait_for};
use crate::servers::{Caddy, Traefik};
use crate::support::{text, vessel_in};

const LIMIT: Duration = Duration::from_secs(30);

/// A plan whose sessions sleep after a second without requests.
fn nap_plan() -> String {
    crate::daemon_support::PLAN.replace("name: web", "name: nap")
        + "idle_timeout: 1s\nsleep: stop\n"
}

/// alice on the nap plan, and a path route to her IDE port that strips its prefix.
fn sessions(d: &Daemon) {
    d.write("nap.yaml", &nap_plan());
    d.write("alice.yaml", "kind: Session\nname: alice\nplan: nap\n");
    d.write(
        "pre.yaml",
        "kind: Route\nname: pre\nhost: p.localhost\npath: /pre/alice\nstrip_prefix: true\nsession: alice\nport: ide\n",
    );
    d.configure("lifecycle: {check_interval: 100ms}\n");
}

fn life(d: &Daemon) -> Value {
    get(d.status, "status", "/sessions/alice")
        .and_then(|(c, b)| (c == 200).then(|| serde_json::from_str::<Value>(&b).ok())?)
        .map(|v| v["lifecycle"].clone())
        .unwrap_or(Value::Null)
}

/// Put a file into alice's workspace (her devserver serves it).
fn put_work(d: &Daemon) {
    std::fs::write(
        d.state().join("sessions/alice/workspace/hello.txt"),
        "alice's work\n",
    )
    .expect("write into the workspace");
}

fn work() -> Option<(u16, String)> {
    Some((200, "alice's work\n".to_string()))
}

/// The whole sleep-and-wake round through the outer proxy (`d.proxy`): asleep by idleness, a
/// request wakes her with the right answer, and `vessel plan` sees nothing to change.
fn sleeps_and_wakes_through(d: &Daemon, outer_log: &dyn Fn() -> String) {
    wait_for(LIMIT, || {
        // Caddy answers an unknown host with an empty 200: the body says it is alice.
        d.get("alice.localhost", "/healthz")
            .is_some_and(|(c, b)| c == 200 && b == "ok\n")
    })
    .unwrap_or_else(|| {
        panic!(
            "alice serves through the outer proxy:\n{}\n{}",
            d.log(),
            outer_log()
        )
    });
    put_work(d);
    assert_eq!(d.get("alice.localhost", "/hello.txt"), work());
    assert_eq!(
        d.get("p.localhost", "/pre/alice/hello.txt"),
        work(),
        "the path route reaches her with its prefix stripped once"
    );

    // Requests through the outer proxy count as activity; then a second without any: asleep.
    wait_for(LIMIT, || life(d)["state"] == "asleep")
        .unwrap_or_else(|| panic!("alice never sleeps: {}; log:\n{}", life(d), d.log()));
    let l = life(d);
    assert_eq!(l["sleep_reason"], "idle", "{l}");
    assert!(
        !l["last_activity"].is_null(),
        "the requests through the outer proxy were seen: {l}"
    );

    // A request through the outer proxy wakes her and gets the right answer.
    assert_eq!(
        d.get("alice.localhost", "/hello.txt"),
        work(),
        "log:\n{}\n{}",
        d.log(),
        outer_log()
    );
    let l = life(d);
    assert_eq!(
        (l["state"].as_str(), l["wakes"].as_u64()),
        (Some("awake"), Some(1)),
        "{l}"
    );
    wait_for(LIMIT, || life(d)["state"] == "asleep").expect("asleep again");
    assert_eq!(d.get("p.localhost", "/pre/alice/hello.txt"), work());
    assert_eq!(life(d)["wakes"], 2, "the path route woke her too");

    // `vessel plan` against the live outer proxy: the fronted routes are no drift.
    wait_for(LIMIT, || {
        vessel_in(d.dir.path(), &["plan", "vessel.yaml"])
            .status
            .code()
            == Some(0)
    })
    .unwrap_or_else(|| {
        let out = vessel_in(d.dir.path(), &["plan", "vessel.yaml"]);
        panic!(
            "no changes planned:\n{}\n{}",
            text(&out.stdout),
            text(&out.stderr)
        )
    });
}

#[test]
fn behind_caddy_a_session_sleeps_when_idle_and_a_request_through_caddy_wakes_it() {
    let mut d = Daemon::new();
    let (admin, listen, wake) = (free_port(), free_port(), free_port());
    let base = crate::proxy_caddy::base_config(admin, listen, free_port());
    let caddy = Caddy::start(d.dir.path(), admin, &base.to_string());
    d.use_proxy(
        &format!(
            "caddy: {{admin: 'http://127.0.0.1:{admin}', server: vessel, wake_listen: '127.0.0.1:{wake}'}}"
        ),
        SocketAddr::from(([127, 0, 0, 1], listen)),
    );
    sessions(&d);
    d.start();
    sleeps_and_wakes_through(&d, &|| caddy.log());

    // Every one of vessel's routes in Caddy dials the wake listener; the shop is untouched.
    let config = caddy.config();
    let routes = config
        .pointer("/apps/http/servers/vessel/routes")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let dials: Vec<(String, String)> = routes
        .iter()
        .filter_map(|r| {
            let id = r.get("@id")?.as_str()?;
            let dial = r
                .pointer("/handle/0/upstreams/0/dial")
                .map(Value::to_string);
            Some((id.to_string(), dial.unwrap_or_default()))
        })
        .collect();
    let wake_dial = format!("\"127.0.0.1:{wake}\"");
    assert!(
        dials
            .iter()
            .filter(|(id, _)| id.starts_with("vessel_"))
            .count()
            >= 3
            && dials
                .iter()
                .all(|(id, dial)| !id.starts_with("vessel_") || *dial == wake_dial),
        "vessel's routes dial {wake_dial}: {dials:?}"
    );
    assert_eq!(
        routes.iter().find(|r| r["@id"] == "shop"),
        base.pointer("/apps/http/servers/vessel/routes/0"),
        "the foreign route is exactly as it was"
    );
    assert_eq!(
        d.get("shop.localhost", "/").map(|r| r.1).as_deref(),
        Some("the shop")
    );
}

#[test]
fn behind_traefik_a_session_sleeps_when_idle_and_a_request_through_traefik_wakes_it() {
    let mut d = Daemon::new();
    let (web, api, wake) = (free_port(), free_port(), free_port());
    let watched = d.dir.path().join("dynamic");
    std::fs::create_dir_all(&watched).expect("mkdir dynamic");
    let traefik = Traefik::start(
        d.dir.path(),
        &watched,
        web,
        api,
        &["--providers.providersThrottleDuration=100ms"],
    );
    d.use_proxy(
        &format!(
            "traefik: {{file: '{}', entrypoints: [web], api: 'http://127.0.0.1:{api}', wake_listen: '127.0.0.1:{wake}'}}",
            watched.join("vessel.yml").display()
        ),
        SocketAddr::from(([127, 0, 0, 1], web)),
    );
    sessions(&d);
    d.start();
    sleeps_and_wakes_through(&d, &|| traefik.log());
    let file = std::fs::read_to_string(watched.join("vessel.yml")).expect("vessel.yml");
    let servers: Vec<&str> = file.lines().filter(|l| l.contains("- url:")).collect();
    assert!(
        !servers.is_empty()
            && servers
                .iter()
                .all(|l| l.trim() == format!("- url: http://127.0.0.1:{wake}")),
        "every service goes to the wake listener:\n{file}"
    );
}
