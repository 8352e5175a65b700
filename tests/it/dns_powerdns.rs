//! The `powerdns` DNS provider against a real PowerDNS (gsqlite3 backend, API and DNS on
//! loopback ports, started here): records published after their routes and answered by `dig`,
//! removed before them; a record vessel did not create stays untouched.

use std::process::Command;
use std::time::Duration;
use vessel::model::plan::RecordAction;

use crate::daemon_support::{Daemon, free_port, session, wait_for};
use crate::servers::{PDNS_KEY as KEY, Pdns};

const LIMIT: Duration = Duration::from_secs(20);

fn start_pdns(dir: &std::path::Path) -> Pdns {
    let p = Pdns::start(dir, free_port(), free_port(), "dev.example.com");
    // A record vessel did not create.
    let (code, body) = p.call(
        "PATCH",
        "/api/v1/servers/localhost/zones/dev.example.com.",
        r#"{"rrsets":[{"name":"mail.dev.example.com.","type":"A","ttl":300,"changetype":"REPLACE","records":[{"content":"192.0.2.99","disabled":false}]}]}"#,
    );
    assert_eq!(code, 204, "{body}");
    p
}

pub fn dig(port: u16, name: &str) -> String {
    let out = Command::new("dig")
        .args([
            "+short",
            "+time=1",
            "+tries=1",
            "@127.0.0.1",
            "-p",
            &port.to_string(),
            name,
            "A",
        ])
        .output()
        .expect("dig runs (dnsutils; .ci/run installs it)");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn records_are_served_by_dig_and_foreign_ones_stay() {
    let mut d = Daemon::new();
    let pdns = start_pdns(d.dir.path());
    let cfg = std::fs::read_to_string(d.dir.path().join("vessel.yaml")).expect("config").replace(
        "  proxy:",
        &format!("  dns:\n    powerdns: {{api: 'http://127.0.0.1:{}', api_key: {{env: VESSEL_TEST_PDNS_KEY}}, zones: [dev.example.com], address: 192.0.2.10}}\n  proxy:", pdns.api),
    );
    std::fs::write(d.dir.path().join("vessel.yaml"), cfg).expect("config");
    d.write("keep.yaml", &session("keep"));
    d.write("alice.yaml", &format!("{}---\nkind: Route\nname: docs\nhost: docs-alice.dev.example.com\nsession: alice\nport: app\ndns: true\n", session("alice")));
    d.start_with_env(Some(("VESSEL_TEST_PDNS_KEY", KEY)));
    wait_for(LIMIT, || {
        dig(pdns.dns, "docs-alice.dev.example.com") == "192.0.2.10"
    })
    .unwrap_or_else(|| panic!("dig answers for the new host: {}", d.log()));
    let (_, zone) = pdns.call(
        "GET",
        "/api/v1/servers/localhost/zones/dev.example.com.",
        "",
    );
    assert!(
        zone.contains("vessel session=alice"),
        "vessel's ownership comment is on its rrset: {zone}"
    );
    assert_eq!(dig(pdns.dns, "mail.dev.example.com"), "192.0.2.99");

    std::fs::remove_file(d.source().join("alice.yaml")).expect("rm");
    wait_for(LIMIT, || {
        dig(pdns.dns, "docs-alice.dev.example.com").is_empty()
    })
    .expect("the record goes");
    assert_eq!(
        dig(pdns.dns, "mail.dev.example.com"),
        "192.0.2.99",
        "the foreign record stays"
    );
    assert!(!d.log().contains(KEY), "the API key never shows");
}

#[test]
fn the_provider_refuses_to_write_over_a_record_it_did_not_create() {
    use vessel::observed::RecordType;
    use vessel::providers::DnsProvider;
    let dir = tempfile::tempdir().expect("tempdir");
    let pdns = start_pdns(dir.path());
    let p = vessel::providers::dns::powerdns::PowerDns::new(
        &format!("http://127.0.0.1:{}", pdns.api),
        "localhost",
        vessel::config::Secret::new(KEY),
        &["dev.example.com".to_string()],
        None,
    )
    .expect("provider");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let upsert = |name: &str| RecordAction::UpsertRecord {
        name: name.into(),
        rtype: RecordType::A,
        content: "192.0.2.10".into(),
        session: "alice".into(),
    };
    let (mail, mine) = (
        upsert("mail.dev.example.com"),
        upsert("mine.dev.example.com"),
    );
    let remove = RecordAction::RemoveRecord {
        name: "mail.dev.example.com".into(),
        rtype: RecordType::A,
    };
    // A foreign TXT where vessel would put a CNAME: PowerDNS refuses a whole PATCH with such a
    // conflict, so that step alone must be refused, and the rest still go.
    let (code, body) = pdns.call(
        "PATCH",
        "/api/v1/servers/localhost/zones/dev.example.com.",
        r#"{"rrsets":[{"name":"note.dev.example.com.","type":"TXT","ttl":300,"changetype":"REPLACE","records":[{"content":"\"hello\"","disabled":false}]}]}"#,
    );
    assert_eq!(code, 204, "{body}");
    let cname = RecordAction::UpsertRecord {
        name: "note.dev.example.com".into(),
        rtype: RecordType::CNAME,
        content: "proxy.dev.example.com".into(),
        session: "alice".into(),
    };
    let results = rt.block_on(p.apply(&[&mail, &mine, &remove, &cname]));
    assert!(
        results[0].is_err() && results[2].is_err() && results[3].is_err(),
        "{results:?}"
    );
    assert!(results[1].is_ok(), "{results:?}");
    assert_eq!(
        dig(pdns.dns, "mail.dev.example.com"),
        "192.0.2.99",
        "untouched"
    );
    assert_eq!(dig(pdns.dns, "mine.dev.example.com"), "192.0.2.10");
    let observed = rt.block_on(p.observe()).expect("observe");
    let owned: Vec<&str> = observed
        .iter()
        .filter(|r| r.owned)
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(owned, ["mine.dev.example.com"]);
}
