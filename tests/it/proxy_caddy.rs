//! The `caddy` proxy provider against a real Caddy (admin API and listener on loopback ports,
//! started here): vessel's routes serve HTTP and WebSockets through Caddy; updates and
//! removals touch only vessel's routes; a Caddy restarted with an empty config gets them back
//! on the next pass; with PowerDNS too, a record is published only once Caddy serves its
//! route, and goes before the route does.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};

use crate::daemon_support::{Daemon, free_port, session, wait_for, websocket_echo};
use crate::servers::{Caddy, PDNS_KEY, Pdns};

const LIMIT: Duration = Duration::from_secs(20);

/// Caddy with a foreign route in vessel's server, a foreign server, and other settings.
pub(crate) fn base_config(admin: u16, listen: u16, other: u16) -> Value {
    json!({
        "admin": {"listen": format!("127.0.0.1:{admin}")},
        "logging": {"logs": {"default": {"level": "WARN"}}},
        "apps": {"http": {"servers": {
            "vessel": {
                "listen": [format!("127.0.0.1:{listen}")],
                "automatic_https": {"disable": true},
                "routes": [{
                    "@id": "shop",
                    "match": [{"host": ["shop.localhost"]}],
                    "handle": [{"handler": "static_response", "body": "the shop"}],
                    "terminal": true
                }]
            },
            "other": {
                "listen": [format!("127.0.0.1:{other}")],
                "automatic_https": {"disable": true},
                "routes": [{"handle": [{"handler": "static_response", "body": "other"}]}]
            }
        }}}
    })
}

fn caddy_yaml(admin: u16, listen: u16) -> String {
    format!(
        "caddy: {{admin: 'http://127.0.0.1:{admin}', server: vessel, listen: ['127.0.0.1:{listen}']}}"
    )
}

/// Everything in Caddy's config but vessel's routes.
fn without_vessels_routes(mut config: Value) -> Value {
    if let Some(routes) = config
        .pointer_mut("/apps/http/servers/vessel/routes")
        .and_then(Value::as_array_mut)
    {
        routes.retain(|r| {
            !r.get("@id")
                .and_then(Value::as_str)
                .is_some_and(|id| id.starts_with("vessel_"))
        });
    }
    config
}

fn vessel_ids(config: &Value) -> Vec<String> {
    config
        .pointer("/apps/http/servers/vessel/routes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|r| r.get("@id").and_then(Value::as_str))
        .filter(|id| id.starts_with("vessel_"))
        .map(str::to_string)
        .collect()
}

fn serves(d: &Daemon, host: &str) -> bool {
    d.get(host, "/healthz")
        .is_some_and(|(c, b)| c == 200 && b == "ok\n")
}

#[test]
fn caddy_serves_vessels_routes_and_leaves_the_rest_as_it_was() {
    let mut d = Daemon::new();
    let (admin, listen, other) = (free_port(), free_port(), free_port());
    let base = base_config(admin, listen, other);
    let mut caddy = Caddy::start(d.dir.path(), admin, &base.to_string());
    d.use_proxy(
        &caddy_yaml(admin, listen),
        SocketAddr::from(([127, 0, 0, 1], listen)),
    );
    d.write("zed.yaml", &session("zed"));
    d.write("alice.yaml", &session("alice"));
    d.start();

    // Create: both of alice's routes serve through Caddy, WebSockets included.
    wait_for(LIMIT, || {
        serves(&d, "alice.localhost") && serves(&d, "zed.localhost")
    })
    .unwrap_or_else(|| panic!("alice serves through Caddy:\n{}\n{}", d.log(), caddy.log()));
    let ids = vessel_ids(&caddy.config());
    assert!(
        ids.contains(&"vessel_alice__alice.localhost".to_string())
            && ids.contains(&"vessel_alice__5173-alice.localhost".to_string()),
        "vessel's routes carry its @id: {ids:?}"
    );
    websocket_echo(d.proxy, "alice.localhost");
    assert_eq!(
        without_vessels_routes(caddy.config()),
        base,
        "everything else in Caddy's config is exactly as it was"
    );
    assert_eq!(
        d.get("shop.localhost", "/").map(|r| r.1).as_deref(),
        Some("the shop")
    );

    // Update: an explicit route is added, then moved to another session.
    let docs = |s: &str| {
        format!("kind: Route\nname: docs\nhost: docs.localhost\nsession: {s}\nport: ide\n")
    };
    d.write("docs.yaml", &docs("alice"));
    wait_for(LIMIT, || {
        vessel_ids(&caddy.config()).contains(&"vessel_alice_docs_docs.localhost".into())
    })
    .unwrap_or_else(|| panic!("the route is added: {}", d.log()));
    assert!(serves(&d, "docs.localhost"));
    d.write("docs.yaml", &docs("zed"));
    wait_for(LIMIT, || {
        vessel_ids(&caddy.config()).contains(&"vessel_zed_docs_docs.localhost".into())
    })
    .unwrap_or_else(|| panic!("the route follows its session: {}", d.log()));
    assert!(serves(&d, "docs.localhost"));

    // Remove: alice goes, and only her routes with her.
    std::fs::remove_file(d.source().join("alice.yaml")).expect("rm");
    wait_for(LIMIT, || {
        !vessel_ids(&caddy.config())
            .iter()
            .any(|id| id.contains("alice"))
    })
    .unwrap_or_else(|| panic!("alice's routes go: {}", d.log()));
    assert_eq!(without_vessels_routes(caddy.config()), base);
    assert!(serves(&d, "zed.localhost"));

    // Caddy restarted with an empty config: the next pass puts vessel's server and routes back.
    let empty = json!({"admin": {"listen": format!("127.0.0.1:{admin}")}});
    caddy.restart(&empty.to_string());
    wait_for(LIMIT, || {
        serves(&d, "zed.localhost") && serves(&d, "docs.localhost")
    })
    .unwrap_or_else(|| panic!("vessel re-asserts its routes: {}\n{}", d.log(), caddy.log()));
    let config = caddy.config();
    assert_eq!(
        without_vessels_routes(config.clone())
            .pointer("/apps/http/servers/vessel/routes")
            .and_then(Value::as_array)
            .map(Vec::len),
        Some(0),
        "Caddy did restart empty (the foreign route is gone), and vessel's routes are back"
    );
    assert_eq!(config["admin"], empty["admin"], "the admin section is kept");
    assert_eq!(
        config.pointer("/apps/http/servers/vessel/listen"),
        Some(&json!([format!("127.0.0.1:{listen}")])),
        "the server is created with the configured listen addresses"
    );
}

#[test]
fn with_caddy_and_powerdns_a_record_follows_its_route_and_goes_before_it() {
    let mut d = Daemon::new();
    let (admin, listen, other) = (free_port(), free_port(), free_port());
    let _caddy = Caddy::start(
        d.dir.path(),
        admin,
        &base_config(admin, listen, other).to_string(),
    );
    let pdns = Pdns::start(d.dir.path(), free_port(), free_port(), "dev.example.com");
    d.use_proxy(
        &caddy_yaml(admin, listen),
        SocketAddr::from(([127, 0, 0, 1], listen)),
    );
    let cfg = std::fs::read_to_string(d.dir.path().join("vessel.yaml")).expect("config");
    let cfg = cfg.replace(
        "  proxy:",
        &format!(
            "  dns:\n    powerdns: {{api: 'http://127.0.0.1:{}', api_key: {{env: VESSEL_TEST_PDNS_KEY}}, zones: [dev.example.com], address: 192.0.2.10}}\n  proxy:",
            pdns.api
        ),
    );
    std::fs::write(d.dir.path().join("vessel.yaml"), cfg).expect("config");
    let host = "docs-alice.dev.example.com";
    d.write("keep.yaml", &session("keep"));
    d.write(
        "alice.yaml",
        &format!(
            "{}---\nkind: Route\nname: docs\nhost: {host}\nsession: alice\nport: ide\ndns: true\n",
            session("alice")
        ),
    );
    d.start_with_env(Some(("VESSEL_TEST_PDNS_KEY", PDNS_KEY)));

    // The moment dig first answers, Caddy already serves the host.
    wait_for(LIMIT, || {
        crate::dns_powerdns::dig(pdns.dns, host) == "192.0.2.10"
    })
    .unwrap_or_else(|| panic!("dig answers for the new host: {}", d.log()));
    assert!(
        serves(&d, host),
        "the route serves before the record exists"
    );
    wait_for(LIMIT, || {
        d.event_line("upsert-record", &format!("dns {host} A"))
            .is_some()
    })
    .expect("the record's event");
    let route = d.event_line("upsert-route", &format!("route {host}"));
    let record = d.event_line("upsert-record", &format!("dns {host} A"));
    assert!(
        route.is_some() && route < record,
        "the record follows the route:\n{}",
        d.events()
    );

    // On removal, the moment Caddy stops serving the host, the record is already gone.
    std::fs::remove_file(d.source().join("alice.yaml")).expect("rm");
    wait_for(LIMIT, || !serves(&d, host)).unwrap_or_else(|| panic!("the route goes: {}", d.log()));
    assert_eq!(
        crate::dns_powerdns::dig(pdns.dns, host),
        "",
        "the record went first"
    );
    wait_for(LIMIT, || {
        d.event_line("remove-route", &format!("route {host}"))
            .is_some()
    })
    .expect("the route's removal event");
    let record = d.event_line("remove-record", &format!("dns {host} A"));
    let route = d.event_line("remove-route", &format!("route {host}"));
    assert!(
        record.is_some() && record < route,
        "the record goes before the route:\n{}",
        d.events()
    );
    assert!(!d.log().contains(PDNS_KEY), "the API key never shows");
}
