//! Path routes (`path`, `strip_prefix`) and fallback placement (`compute: [docker, process]`).
//!
//! Path routes are checked the same way through each proxy, all real: the embedded proxy
//! serving in-process, a real Caddy through its admin API, and the real Traefik watching
//! vessel's file. Behind them, small upstreams answer with the request target they were sent,
//! so each check sees the path the session saw: a prefix matches on whole segments, the
//! longest prefix on a host wins, a route without a path is the host's `/`, and a stripping
//! route sends the rest of the path with the query kept. Validation rejects two routes on one
//! host and path, naming both files. Fallback placement: with docker unreachable, `vessel
//! apply` puts a new session on process and says why.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use serde_json::json;
use vessel::model::plan::RouteAction;
use vessel::observed::ObservedRoute;
use vessel::providers::ProxyProvider;

use crate::daemon_support::{free_port, get, wait_for};
use crate::support::{text, vessel_in};

const LIMIT: Duration = Duration::from_secs(20);

/// An upstream that answers every request with `<name> <request target>` and closes.
fn echo(name: &'static str) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match s.read(&mut b) {
                        Ok(1) => head.push(b[0]),
                        _ => return,
                    }
                }
                let head = String::from_utf8_lossy(&head);
                let target = head.split(' ').nth(1).unwrap_or("?");
                let body = format!("{name} {target}");
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    port
}

fn upsert(path: Option<&str>, strip: bool, session: &str, port: u16) -> RouteAction {
    RouteAction::UpsertRoute {
        host: "paths.localhost".into(),
        path: path.map(str::to_string),
        strip_prefix: strip,
        upstream: format!("127.0.0.1:{port}"),
        session: session.into(),
        port: "app".into(),
        route: path.map(|_| format!("{session}-route")),
        upstream_from: None,
    }
}

/// The routes every proxy serves here: the host's `/`, a stripping prefix, and a longer
/// prefix under it that does not strip.
fn routes() -> Vec<RouteAction> {
    vec![
        upsert(None, false, "root", echo("root")),
        upsert(Some("/preview/user-1"), true, "one", echo("one")),
        upsert(Some("/preview/user-1/api"), false, "api", echo("api")),
    ]
}

/// What the sessions see through a proxy at `addr`, waited for until it serves all of it.
fn check(addr: SocketAddr) {
    let seen = |path: &str| get(addr, "paths.localhost", path);
    let want = [
        // The prefix itself, stripped to `/`, the query kept.
        ("/preview/user-1?q=1", "one /?q=1"),
        // Under it: the rest of the path, the query kept.
        ("/preview/user-1/x/y?q=1&r=2", "one /x/y?q=1&r=2"),
        // Not on a segment boundary: the host's `/`, unstripped.
        ("/preview/user-10/x", "root /preview/user-10/x"),
        ("/preview", "root /preview"),
        // The longest prefix wins, and it does not strip.
        ("/preview/user-1/api", "api /preview/user-1/api"),
        ("/preview/user-1/api/v?z=2", "api /preview/user-1/api/v?z=2"),
        // `/preview/user-1/apix` is under `/preview/user-1`, not `/preview/user-1/api`.
        ("/preview/user-1/apix", "one /apix"),
        ("/", "root /"),
    ];
    let ok = wait_for(LIMIT, || {
        want.iter()
            .all(|(p, w)| seen(p).is_some_and(|(c, b)| c == 200 && b == *w))
    });
    if ok.is_none() {
        let got: Vec<_> = want.iter().map(|(p, _)| (p, seen(p))).collect();
        panic!("each path reaches the right session with the right path: {got:?}");
    }
}

/// What a proxy reports after `routes()`: each route by host and path, stripping as written,
/// its upstream as written (nothing reads as edited).
fn check_observed(observed: &[ObservedRoute]) {
    let mut got: Vec<(String, bool, bool)> = observed
        .iter()
        .filter(|r| r.owned)
        .map(|r| (r.key(), r.strip_prefix, r.upstream.contains('(')))
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            ("paths.localhost".into(), false, false),
            ("paths.localhost/preview/user-1".into(), true, false),
            ("paths.localhost/preview/user-1/api".into(), false, false),
        ],
        "{observed:?}"
    );
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn apply(rt: &tokio::runtime::Runtime, p: &dyn ProxyProvider, actions: &[RouteAction]) {
    let refs: Vec<&RouteAction> = actions.iter().collect();
    let results = rt.block_on(p.apply(&refs));
    for r in results {
        if let Err(e) = r {
            panic!("route step failed: {}", vessel::error_chain(&e));
        }
    }
}

#[test]
fn path_routes_through_the_embedded_proxy() {
    let proxy = vessel::proxy::Proxy::default();
    let provider = vessel::providers::proxy::embedded::EmbeddedProxy::new(proxy.clone());
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let cancel = tokio_util::sync::CancellationToken::new();
    proxy
        .serve_threads(
            listener,
            1,
            vessel::proxy::Serving::default(),
            cancel.clone(),
        )
        .expect("serve");
    let rt = runtime();
    apply(&rt, &provider, &routes());
    check(addr);
    check_observed(&rt.block_on(provider.observe()).expect("observe"));
    // Removing the longer prefix hands its paths to the shorter one; the others stay.
    apply(
        &rt,
        &provider,
        &[RouteAction::RemoveRoute {
            host: "paths.localhost".into(),
            path: Some("/preview/user-1/api".into()),
        }],
    );
    assert_eq!(
        get(addr, "paths.localhost", "/preview/user-1/api/v?z=2").map(|r| r.1),
        Some("one /api/v?z=2".into())
    );
    assert_eq!(
        get(addr, "paths.localhost", "/other").map(|r| r.1),
        Some("root /other".into())
    );
    cancel.cancel();
}

#[test]
fn path_routes_through_caddy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (admin, listen) = (free_port(), free_port());
    let config = json!({
        "admin": {"listen": format!("127.0.0.1:{admin}")},
        "logging": {"logs": {"default": {"level": "WARN"}}},
    });
    let caddy = crate::servers::Caddy::start(dir.path(), admin, &config.to_string());
    let provider = vessel::providers::proxy::caddy::Caddy::new(
        &format!("http://127.0.0.1:{admin}"),
        "vessel",
        &[format!("127.0.0.1:{listen}")],
        "vessel",
        None,
    )
    .expect("provider");
    let rt = runtime();
    apply(&rt, &provider, &routes());
    check(SocketAddr::from(([127, 0, 0, 1], listen)));
    check_observed(&rt.block_on(provider.observe()).expect("observe"));
    // The longest prefix is first among vessel's routes in Caddy's config.
    let ids: Vec<String> = caddy
        .config()
        .pointer("/apps/http/servers/vessel/routes")
        .and_then(|v| v.as_array())
        .into_iter()
        .flatten()
        .filter_map(|r| r["@id"].as_str().map(str::to_string))
        .collect();
    assert_eq!(
        ids,
        [
            "vessel_api_api-route_paths.localhost~2Fpreview~2Fuser-1~2Fapi",
            "vessel_one_one-route_paths.localhost~2Fpreview~2Fuser-1",
            "vessel_root__paths.localhost",
        ],
        "{}",
        caddy.log()
    );
}

#[test]
fn path_routes_through_traefik() {
    let dir = tempfile::tempdir().expect("tempdir");
    let watched = dir.path().join("dynamic");
    std::fs::create_dir_all(&watched).expect("mkdir");
    let traefik = crate::servers::Traefik::start(
        dir.path(),
        &watched,
        free_port(),
        free_port(),
        &["--providers.providersThrottleDuration=50ms"],
    );
    let provider =
        vessel::providers::proxy::traefik::Traefik::new(&vessel::config::TraefikConfig {
            file: watched.join("vessel.yml"),
            entrypoints: vec!["web".into()],
            name_prefix: "vessel".into(),
            api: Some(format!("http://127.0.0.1:{}", traefik.api)),
            confirm_within: vessel::model::Duration::from_secs(10),
            tls: None,
            wake_listen: None,
        })
        .expect("provider");
    let rt = runtime();
    apply(&rt, &provider, &routes());
    assert_eq!(
        traefik.problems(),
        Vec::<String>::new(),
        "{}",
        traefik.log()
    );
    check(SocketAddr::from(([127, 0, 0, 1], traefik.web)));
    check_observed(&rt.block_on(provider.observe()).expect("observe"));
    // Turning the strip off is one rewrite; the session then sees the whole path.
    apply(
        &rt,
        &provider,
        &[upsert(Some("/preview/user-1"), false, "one", echo("one"))],
    );
    let whole = wait_for(LIMIT, || {
        get(
            SocketAddr::from(([127, 0, 0, 1], traefik.web)),
            "paths.localhost",
            "/preview/user-1/x?q=1",
        )
        .is_some_and(|r| r.1 == "one /preview/user-1/x?q=1")
    });
    assert!(whole.is_some(), "{}", traefik.log());
}

/// A tree loaded as the planner cases load one.
fn load(files: &[(&str, &str)]) -> vessel::desired::Desired {
    let files = files
        .iter()
        .map(|(n, t)| (n.to_string(), t.to_string()))
        .collect();
    crate::planner_cases::load(&files, chrono::Utc::now())
}

const PLAN: &str = "kind: Plan\nname: web\ncommand: [serve]\nports: {app: 5173}\n---\nkind: Session\nname: alice\nplan: web\n---\nkind: Session\nname: bob\nplan: web\n";

fn route(name: &str, session: &str, path: &str) -> String {
    format!(
        "kind: Route\nname: {name}\nhost: preview.localhost\npath: {path}\nsession: {session}\nport: app\n"
    )
}

#[test]
fn two_routes_on_one_host_and_path_are_rejected_naming_both_files() {
    let a = route("alice-preview", "alice", "/preview/x");
    let b = format!("# bob's\n{}", route("bob-preview", "bob", "/preview/x"));
    let d = load(&[("plans.yaml", PLAN), ("a.yaml", &a), ("b.yaml", &b)]);
    let errors: Vec<(String, u32, u32, String)> = d
        .errors()
        .map(|e| {
            let j = serde_json::to_value(e).expect("diagnostic");
            (
                std::path::Path::new(j["file"].as_str().unwrap_or(""))
                    .file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                j["line"].as_u64().unwrap_or(0) as u32,
                j["column"].as_u64().unwrap_or(0) as u32,
                format!("{} {}", j["message"], j["help"]),
            )
        })
        .collect();
    assert_eq!(errors.len(), 2, "{errors:?}");
    let (a_err, b_err) = (&errors[0], &errors[1]);
    assert_eq!(
        (a_err.0.as_str(), a_err.1, a_err.2),
        ("a.yaml", 4, 7),
        "{errors:?}"
    );
    assert_eq!(
        (b_err.0.as_str(), b_err.1, b_err.2),
        ("b.yaml", 5, 7),
        "{errors:?}"
    );
    assert!(
        a_err.3.contains("host `preview.localhost` path `/preview/x` is claimed by route `alice-preview` and by route `bob-preview`")
            && a_err.3.contains("b.yaml:5:7;"),
        "{errors:?}"
    );
    assert!(b_err.3.contains("a.yaml:4:7;"), "{errors:?}");
    assert!(d.routes.is_empty(), "both routes are held");
}

#[test]
fn one_host_with_different_paths_is_valid_and_bad_paths_are_not() {
    let ok = format!(
        "{}---\n{}---\nkind: Route\nname: front\nhost: preview.localhost\nsession: alice\nport: app\n",
        route("alice-preview", "alice", "/preview/alice"),
        route("bob-preview", "bob", "/preview/alice/bob")
    );
    let d = load(&[("plans.yaml", PLAN), ("ok.yaml", &ok)]);
    assert!(d.is_valid(), "{:?}", d.errors().collect::<Vec<_>>());
    assert_eq!(d.routes.len(), 3);

    for (path, why) in [
        ("preview", "must start with `/`"),
        ("/preview/", "ends with `/`"),
        ("/a//b", "empty, `.` or `..` segment"),
        ("/a/*", "contains `*`"),
    ] {
        let bad = route("bad", "alice", path);
        let d = load(&[("plans.yaml", PLAN), ("bad.yaml", &bad)]);
        let msgs: Vec<String> = d.errors().map(|e| format!("{e:?}")).collect();
        assert!(
            msgs.iter()
                .any(|m| m.contains("invalid-path") && m.contains(why)),
            "{path}: {msgs:?}"
        );
    }
    let strip = "kind: Route\nname: s\nhost: preview.localhost\nstrip_prefix: true\nsession: alice\nport: app\n";
    let d = load(&[("plans.yaml", PLAN), ("s.yaml", strip)]);
    let msgs: Vec<String> = d.errors().map(|e| format!("{e:?}")).collect();
    assert!(
        msgs.iter()
            .any(|m| m.contains("strips a prefix but has no `path`")),
        "{msgs:?}"
    );
}

#[test]
fn with_docker_unreachable_a_new_session_lands_on_process() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("desired")).expect("mkdir");
    let port_base = 31000 + (std::process::id() % 50) as u16 * 10;
    let config = format!(
        "source: {{dir: desired}}\nstate_dir: state\nproviders:\n  compute:\n    process: {{port_base: {port_base}}}\n    docker:\n      hosts: [{{name: own, endpoint: 'unix://{}/no-docker.sock'}}]\n      call_timeout: 2s\n",
        dir.path().display()
    );
    std::fs::write(dir.path().join("vessel.yaml"), config).expect("config");
    let plan = format!(
        "kind: Plan\nname: web\ncompute: [docker, process]\nimage: localhost/busybox:test\ncommand: ['{}', devserver, --listen, '127.0.0.1:{{port.app}}', --root, '{{workspace}}']\nports: {{app: 5173}}\nhealth: {{port: app, path: /healthz}}\nstop_timeout: 3s\n---\nkind: Session\nname: alice\nplan: web\n",
        env!("CARGO_BIN_EXE_vessel"),
    );
    std::fs::write(dir.path().join("desired/alice.yaml"), plan).expect("tree");

    let out = vessel_in(dir.path(), &["plan", "vessel.yaml"]);
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("create alice on process (docker unreachable)"),
        "{stdout}\n{}",
        text(&out.stderr)
    );
    let out = vessel_in(dir.path(), &["apply", "vessel.yaml"]);
    // Held back (exit 3): docker could not be observed; alice is made all the same.
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    // The session is a process, and the next plan does not make it again (docker is still a
    // gap: it is not moved there either).
    let observed: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("state/observed.json")).expect("observed snapshot"),
    )
    .expect("json");
    assert_eq!(
        observed["sessions"]["alice"]["provider"], "process",
        "{observed}"
    );
    assert!(observed["gaps"]["compute/docker"].is_string(), "{observed}");
    let out = vessel_in(dir.path(), &["plan", "vessel.yaml", "--format", "json"]);
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}\n{}", text(&out.stdout), text(&out.stderr)));
    let creates = plan["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["action"] == "create_session")
        .count();
    assert_eq!(creates, 0, "alice is not made again: {plan}");
}
