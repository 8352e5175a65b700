//! The bodies of vessel's fuzz targets, one function per target: bytes in, and a panic (turned
//! into an abort, which AFL++ records as a crash) for any broken invariant.
//!
//! - `load`: the bytes are one file of a desired-state tree, loaded and validated within tight
//!   limits. Never panics, never hangs, keeps to its budgets, and says where every problem is.
//! - `plan`: the bytes are a desired-state file and an observed snapshot (JSON) after a line
//!   `#observed`; the plan must uphold the safety rules (nothing `owned: false` is the target
//!   of a step, no step in an observation gap, no destroy while a file's contents are unknown,
//!   dependencies backwards) and be the same when made twice.
//! - `proxy`: the bytes are a raw HTTP/1 request sent to the embedded proxy, serving in this
//!   process on a loopback port with one ready route (to an upstream here that answers every
//!   request), one route that is not ready and a wildcard route.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;
use vessel::model::plan::{RecordAction, RouteAction, SessionAction};

use chrono::{DateTime, TimeZone, Utc};
use vessel::config::Config;
use vessel::desired::Desired;
use vessel::load::{Entry, MAX_ERRORS_PER_FILE, load_entries};
use vessel::model::Size;
use vessel::observed::{Observed, RecordType};
use vessel::planner::{Action, Reason, plan as make_plan, render};

/// Any panic, on any thread (tokio catches panics in tasks), is a crash.
pub fn abort_on_panic() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        std::process::abort();
    }));
}

/// The loader's limits under fuzzing: small, so inputs reach them.
pub const FUZZ_MAX_FILE: u64 = 64 << 10;
pub const FUZZ_MAX_TOTAL: u64 = 96 << 10;
pub const FUZZ_MAX_NODES: u64 = 10_000;

const PLANS: &str =
    "kind: Plan\nname: small\ncommand: [sleep, '1000']\nports: {ide: 8080, app: 5173}\n";
const SESSION: &str = "kind: Session\nname: fixed\nplan: small\n";

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 6, 1, 0, 0, 0)
        .single()
        .unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
}

fn config() -> Config {
    let mut c = Config::embedded_default(Path::new("tree"));
    c.load.max_file_bytes = Size(FUZZ_MAX_FILE);
    c.load.max_total_bytes = Size(FUZZ_MAX_TOTAL);
    c.load.max_total_nodes = FUZZ_MAX_NODES;
    c
}

/// The tree: a fixed plan, the input as `fuzz.yaml`, a fixed session after it.
fn tree(config: &Config, data: &[u8]) -> Desired {
    let entries = vec![
        Entry::bytes("a-plans.yaml", PLANS.as_bytes().to_vec()),
        Entry::bytes("fuzz.yaml", data.to_vec()),
        Entry::bytes("z/session.yaml", SESSION.as_bytes().to_vec()),
    ];
    load_entries(Path::new("tree"), entries, config, now())
}

/// Target `load`.
pub fn load(data: &[u8]) {
    let config = config();
    let d = tree(&config, data);
    assert_eq!(d.files.len(), 3, "every file is listed");
    let fuzz = Path::new("fuzz.yaml");
    if data.len() as u64 > FUZZ_MAX_FILE {
        let q = d
            .quarantined
            .get(fuzz)
            .expect("an oversized file is quarantined");
        assert_eq!(q.errors[0].code, "unreadable");
        assert!(!q.complete);
    }
    // Lines as YAML counts them: `\r\n`, a lone `\r` and `\n` each end one.
    let breaks = data
        .iter()
        .enumerate()
        .filter(|(i, b)| **b == b'\n' || (**b == b'\r' && data.get(i + 1) != Some(&b'\n')))
        .count();
    let lines = breaks as u32 + 1;
    for (file, q) in &d.quarantined {
        assert!(
            !q.errors.is_empty(),
            "{} is quarantined without an error",
            file.display()
        );
        assert!(
            q.errors.len() <= MAX_ERRORS_PER_FILE + 1,
            "errors are capped"
        );
        for e in &q.errors {
            assert!(e.is_error());
            if file == fuzz {
                assert!(e.line <= lines + 1, "line {} of {lines}", e.line);
            }
            if let Some(s) = &e.snippet {
                assert!(s.chars().count() <= vessel::diag::SNIPPET_CHARS);
            }
            let _ = e.render(false);
            let _ = e.render(true);
        }
    }
    for w in &d.warnings {
        let _ = w.render(false);
    }
    // Objects come only from files without errors.
    for s in d.sessions.values() {
        assert!(!d.quarantined.contains_key(&s.file));
    }
    // Deterministic: the same bytes give the same result.
    let once = vessel::cli::validation_json(&d);
    let again = vessel::cli::validation_json(&tree(&config, data));
    assert_eq!(once, again, "the load is deterministic");
}

/// Target `plan`.
pub fn plan(data: &[u8]) {
    let sep = b"\n#observed\n";
    let (yaml, json) = match data.windows(sep.len()).position(|w| w == sep) {
        Some(i) => (&data[..i], &data[i + sep.len()..]),
        None => (data, &b""[..]),
    };
    let config = config();
    let desired = tree(&config, yaml);
    let observed: Observed = serde_json::from_slice(json).unwrap_or_default();
    for (allow, dns) in [(false, false), (true, true)] {
        let mut policy = config.policy(now());
        policy.allow_destroy = allow;
        policy.allow_empty_source = allow;
        if dns {
            policy.dns = Some((RecordType::A, "10.0.0.1".into()));
        }
        let p = make_plan(&desired, &observed, &policy);
        check_plan(&desired, &observed, &p);
        let text = render::json(&p);
        let _ = render::text(&p, &observed, false);
        let _ = render::markdown(&p, &observed);
        assert_eq!(
            text,
            render::json(&make_plan(&desired, &observed, &policy)),
            "the plan is deterministic"
        );
    }
}

/// The planner's safety rules, as `tests/it/planner_props.rs` states them.
fn check_plan(desired: &Desired, observed: &Observed, p: &vessel::planner::Plan) {
    let unknown = desired.has_unknown_objects();
    for step in &p.steps {
        let a = &step.action;
        assert!(
            observed.is_observed(&a.provider()),
            "a step in a gap: {a:?}"
        );
        if let Some(s) = a.session().and_then(|s| observed.sessions.get(s)) {
            assert!(s.owned, "a step on a foreign session: {a:?}");
        }
        match a {
            Action::Route(r) => {
                if let Some(r) = observed.routes.get(&r.key()) {
                    assert!(r.owned, "a step on a foreign route: {a:?}");
                }
            }
            Action::Record(RecordAction::UpsertRecord { name, .. })
            | Action::Record(RecordAction::RemoveRecord { name, .. }) => {
                for r in observed.records.values().filter(|r| &r.name == name) {
                    assert!(r.owned, "a step on a foreign record: {a:?}");
                }
            }
            _ => {}
        }
        for d in &step.depends_on {
            assert!(*d < step.id, "dependencies point backwards");
        }
        if unknown {
            let removes = matches!(
                a,
                Action::Route(RouteAction::RemoveRoute { .. })
                    | Action::Record(RecordAction::RemoveRecord { .. })
            ) || (matches!(a, Action::Session(SessionAction::DestroySession { .. }))
                && !matches!(step.reason, Reason::Replaced { .. }));
            assert!(
                !removes,
                "a file with unknown contents holds every destroy: {a:?}"
            );
        }
    }
}

/// What the proxy target talks to, started once per process (AFL++ runs many inputs in one).
struct ProxyHarness {
    rt: tokio::runtime::Runtime,
    addr: SocketAddr,
}

fn harness() -> &'static ProxyHarness {
    static H: OnceLock<ProxyHarness> = OnceLock::new();
    H.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let addr = rt.block_on(async {
            let upstream = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind upstream");
            let up = upstream.local_addr().expect("upstream address");
            tokio::spawn(serve_upstream(upstream));
            let proxy = vessel::proxy::Proxy::new(Duration::from_millis(20));
            let route = |ready, upstream: String| vessel::proxy::Route {
                upstream,
                session: "s".into(),
                route: None,
                ready,
                strip_prefix: false,
            };
            proxy.apply(&[
                vessel::proxy::RouteChange::Upsert {
                    host: "a.localhost".into(),
                    route: route(true, up.to_string()),
                },
                vessel::proxy::RouteChange::Upsert {
                    host: "*.w.localhost".into(),
                    route: route(true, up.to_string()),
                },
                vessel::proxy::RouteChange::Upsert {
                    host: "held.localhost".into(),
                    route: route(false, up.to_string()),
                },
                vessel::proxy::RouteChange::Upsert {
                    host: "dead.localhost".into(),
                    route: route(true, "127.0.0.1:1".into()),
                },
            ]);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind proxy");
            let addr = listener.local_addr().expect("proxy address");
            tokio::spawn(proxy.serve(
                listener,
                Default::default(),
                tokio_util::sync::CancellationToken::new(),
            ));
            addr
        });
        ProxyHarness { rt, addr }
    })
}

/// An upstream that answers every request with its method and path, and reads the body.
async fn serve_upstream(listener: tokio::net::TcpListener) {
    use http_body_util::BodyExt;
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(
                |req: hyper::Request<hyper::body::Incoming>| async move {
                    let line = format!("{} {}\n", req.method(), req.uri());
                    let _ = req.into_body().collect().await;
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(hyper::body::Bytes::from(line)),
                    ))
                },
            );
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .with_upgrades()
                .await;
        });
    }
}

/// Target `proxy`.
pub fn proxy(data: &[u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = harness();
    h.rt.block_on(async {
        let Ok(mut s) = tokio::net::TcpStream::connect(h.addr).await else {
            panic!("the proxy stopped accepting connections");
        };
        let _ = s.write_all(data).await;
        let _ = s.shutdown().await;
        let mut out = Vec::new();
        // The proxy answers or closes; it must not keep a half-closed client waiting.
        let read = tokio::time::timeout(Duration::from_secs(5), async {
            let mut buf = [0u8; 16 << 10];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) if out.len() < 1 << 20 => out.extend_from_slice(&buf[..n]),
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(read.is_ok(), "the proxy kept a finished client waiting 5 s");
        if !out.is_empty() {
            assert!(
                out.starts_with(b"HTTP/1."),
                "not an HTTP response: {:?}",
                &out[..out.len().min(64)]
            );
        }
    });
}
