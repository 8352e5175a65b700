//! The `hosts` DNS provider under a real daemon: records for `dns: true` routes in a managed
//! block, published after the route serves and removed before it; foreign lines untouched.

use std::time::Duration;

use crate::daemon_support::{Daemon, session, wait_for};

const LIMIT: Duration = Duration::from_secs(20);
const FOREIGN: &str = "127.0.0.1 localhost\n192.0.2.7 printer.lan # the printer\n";

#[test]
fn records_follow_routes_and_foreign_lines_stay() {
    let mut d = Daemon::new();
    let hosts = d.dir.path().join("hosts");
    std::fs::write(&hosts, FOREIGN).expect("hosts");
    let cfg = std::fs::read_to_string(d.dir.path().join("vessel.yaml"))
        .expect("config")
        .replace(
            "  proxy:",
            "  dns:\n    hosts: {file: hosts, address: 192.0.2.10}\n  proxy:",
        );
    std::fs::write(d.dir.path().join("vessel.yaml"), cfg).expect("config");
    d.write("keep.yaml", &session("keep"));
    d.write("alice.yaml", &format!("{}---\nkind: Route\nname: docs\nhost: docs-alice.example.com\nsession: alice\nport: app\ndns: true\n", session("alice")));
    // A route that claims a name the hosts file already has: held, never shadowed.
    d.write(
        "printer.yaml",
        "kind: Route\nname: printer\nhost: printer.lan\nsession: keep\nport: app\ndns: true\n",
    );
    d.start();
    let text = || std::fs::read_to_string(&hosts).unwrap_or_default();
    wait_for(LIMIT, || {
        text().contains("192.0.2.10 docs-alice.example.com # vessel session=alice")
    })
    .unwrap_or_else(|| panic!("{}\n{}", text(), d.log()));
    assert!(
        text().starts_with(FOREIGN),
        "foreign lines untouched:\n{}",
        text()
    );
    assert!(
        !text().contains("192.0.2.10 printer.lan"),
        "a foreign name is never shadowed:\n{}",
        text()
    );
    // Events are recorded when the pass ends, a moment after the file is written.
    let read_events =
        || std::fs::read_to_string(d.state().join("events.jsonl")).unwrap_or_default();
    wait_for(LIMIT, || {
        read_events().contains("\"upsert-record\",\"object\":\"dns docs-alice.example.com A\"")
    })
    .expect("the record's event");
    let events = read_events();
    let pos = |needle: &str| {
        events
            .lines()
            .position(|l| l.contains(needle))
            .unwrap_or(usize::MAX)
    };
    assert!(
        pos("\"upsert-route\",\"object\":\"route docs-alice.example.com\"")
            < pos("\"upsert-record\",\"object\":\"dns docs-alice.example.com A\""),
        "the record follows the route:\n{events}"
    );

    std::fs::remove_file(d.source().join("alice.yaml")).expect("rm");
    wait_for(LIMIT, || !text().contains("docs-alice")).expect("the record goes");
    assert_eq!(
        text(),
        FOREIGN,
        "the block goes when empty; the rest is exactly as it was"
    );
    wait_for(LIMIT, || {
        std::fs::read_to_string(d.state().join("events.jsonl"))
            .unwrap_or_default()
            .contains("\"remove-route\",\"object\":\"route docs-alice.example.com\"")
    })
    .expect("the route goes");
    let events = std::fs::read_to_string(d.state().join("events.jsonl")).unwrap_or_default();
    let pos = |needle: &str| {
        events
            .lines()
            .position(|l| l.contains(needle))
            .unwrap_or(usize::MAX)
    };
    assert!(
        pos("\"remove-record\",\"object\":\"dns docs-alice.example.com A\"")
            < pos("\"remove-route\",\"object\":\"route docs-alice.example.com\""),
        "the record goes first:\n{events}"
    );
}
