//! The `powerdns` DNS provider against a real PowerDNS (gsqlite3 backend, API and DNS on
//! loopback ports, started here): records published after their routes and answered by `dig`,
//! removed before them; a record vessel did not create stays untouched.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::daemon_support::{Daemon, free_port, session, wait_for};

const LIMIT: Duration = Duration::from_secs(20);
const KEY: &str = "pdns-api-k3y-value";

struct Pdns {
    child: Child,
    api: u16,
    dns: u16,
}

impl Drop for Pdns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn api(port: u16, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the API");
    write!(s, "{method} {path} HTTP/1.0\r\nHost: pdns\r\nX-API-Key: {KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).expect("write");
    let mut buf = String::new();
    s.read_to_string(&mut buf).expect("read");
    (
        buf.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0),
        buf.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default(),
    )
}

fn start_pdns(dir: &Path) -> Pdns {
    let schema = std::fs::read_to_string("/usr/share/doc/pdns-backend-sqlite3/schema.sqlite3.sql")
        .expect("the gsqlite3 schema (pdns-backend-sqlite3; .ci/run installs it)");
    let db = dir.join("pdns.sqlite3");
    let mut sq = Command::new("sqlite3")
        .arg(&db)
        .stdin(Stdio::piped())
        .spawn()
        .expect("sqlite3 runs");
    sq.stdin
        .take()
        .expect("stdin")
        .write_all(schema.as_bytes())
        .expect("schema");
    assert!(sq.wait().expect("sqlite3").success());
    let (api_port, dns_port) = (free_port(), free_port());
    std::fs::write(
        dir.join("pdns.conf"),
        format!(
            "launch=gsqlite3\ngsqlite3-database={}\napi=yes\napi-key={KEY}\nwebserver=yes\nwebserver-address=127.0.0.1\nwebserver-port={api_port}\nwebserver-allow-from=127.0.0.0/8\nlocal-address=127.0.0.1\nlocal-port={dns_port}\nsocket-dir={}\nguardian=no\ndaemon=no\ndisable-syslog=yes\nloglevel=3\n",
            db.display(),
            dir.display()
        ),
    )
    .expect("pdns.conf");
    let child = Command::new("pdns_server")
        .arg(format!("--config-dir={}", dir.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("pdns_server runs (pdns-server; .ci/run installs it)");
    let p = Pdns {
        child,
        api: api_port,
        dns: dns_port,
    };
    wait_for(LIMIT, || {
        TcpStream::connect(("127.0.0.1", api_port)).is_ok()
    })
    .expect("the PowerDNS API listens");
    let (code, body) = api(
        api_port,
        "POST",
        "/api/v1/servers/localhost/zones",
        r#"{"name":"dev.example.com.","kind":"Native","nameservers":[]}"#,
    );
    assert_eq!(code, 201, "{body}");
    // A record vessel did not create.
    let (code, body) = api(
        api_port,
        "PATCH",
        "/api/v1/servers/localhost/zones/dev.example.com.",
        r#"{"rrsets":[{"name":"mail.dev.example.com.","type":"A","ttl":300,"changetype":"REPLACE","records":[{"content":"192.0.2.99","disabled":false}]}]}"#,
    );
    assert_eq!(code, 204, "{body}");
    p
}

fn dig(port: u16, name: &str) -> String {
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
    let (_, zone) = api(
        pdns.api,
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
