//! The `traefik` proxy provider. Traefik is not installable here, so these tests check the
//! file vessel writes against Traefik's documented contract instead of a running Traefik:
//! `CONTRACT` below is the part of Traefik's published dynamic-configuration JSON Schema
//! (SchemaStore's `traefik-v3-file-provider.json`) that covers what vessel writes, transcribed
//! with the same constraints: no unknown top-level keys; routers need `rule` and `service`
//! and take only the documented keys; a service is exactly one kind, and a load balancer has
//! at least one server, each with a `url`. The service URLs are checked to reach the session
//! for real, which is what Traefik would forward to.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use vessel::planner::Action;
use vessel::providers::ProxyProvider;
use vessel::providers::traefik::Traefik;

use crate::daemon_support::{Daemon, get, session, wait_for};

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
        "routers": {"type": "object", "additionalProperties": {"$ref": "#/definitions/httpRouter"}},
        "services": {"type": "object", "additionalProperties": {"$ref": "#/definitions/httpService"}},
        "middlewares": {"type": "object"}
      }
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
    ] {
        assert!(!v.is_valid(&bad), "{bad}");
    }
}

#[test]
fn the_file_follows_the_sessions_and_matches_traefiks_schema() {
    let mut d = Daemon::new();
    let file = d.dir.path().join("traefik/vessel.yml");
    std::fs::create_dir_all(file.parent().expect("dir")).expect("mkdir");
    // No proxy listens in vessel with Traefik: start() waits for the status listener instead.
    let status = d.status;
    d.use_proxy(
        "traefik: {file: traefik/vessel.yml, entrypoints: [web]}",
        status,
    );
    d.write("zed.yaml", &session("zed"));
    d.write("alice.yaml", &session("alice"));
    d.start();
    let text = || std::fs::read_to_string(&file).unwrap_or_default();
    wait_for(LIMIT, || {
        text().contains("alice.localhost") && text().contains("zed.localhost")
    })
    .unwrap_or_else(|| panic!("the file has both sessions:\n{}\n{}", text(), d.log()));

    let doc = checked(&file);
    let routers = doc["http"]["routers"].as_object().expect("routers");
    assert_eq!(
        routers.len(),
        6,
        "three routes for each session:\n{}",
        text()
    );
    let r = &routers["vessel_alice__alice.localhost"];
    assert_eq!(r["rule"], "Host(`alice.localhost`)");
    assert_eq!(r["entryPoints"], serde_json::json!(["web"]));
    for (name, router) in routers {
        let svc = &doc["http"]["services"][router["service"].as_str().expect("service")];
        let url = svc["loadBalancer"]["servers"][0]["url"]
            .as_str()
            .expect("url");
        let addr: SocketAddr = url
            .strip_prefix("http://")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("{name}: {url}"));
        assert_eq!(
            get(addr, "x", "/healthz").map(|r| r.0),
            Some(200),
            "{name} forwards to a session that answers"
        );
    }

    std::fs::remove_file(d.source().join("alice.yaml")).expect("rm");
    wait_for(LIMIT, || !text().contains("alice"))
        .unwrap_or_else(|| panic!("alice's routers go:\n{}", text()));
    let doc = checked(&file);
    assert_eq!(doc["http"]["routers"].as_object().map(|m| m.len()), Some(3));
}

fn upsert(host: &str, port: u16) -> Action {
    Action::UpsertRoute {
        host: host.into(),
        upstream: format!("127.0.0.1:{port}"),
        session: "s".into(),
        port: "ide".into(),
        route: None,
    }
}

#[test]
fn writes_are_atomic_and_anything_foreign_in_the_file_stops_vessel() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("vessel.yml");
    let t = Traefik::new(file.clone(), &[], "vessel").expect("provider");
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
        let hosts: Vec<Action> = (0..20)
            .map(|j| upsert(&format!("h{j}.localhost"), 20000 + i + j))
            .collect();
        let refs: Vec<&Action> = hosts.iter().collect();
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
