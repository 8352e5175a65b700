//! The config file is reloaded on SIGHUP and when it changes, with the real binary; SIGHUP
//! never ends the daemon; an invalid config keeps the running one and says why.

use std::time::Duration;

use nix::sys::signal::Signal;

use crate::daemon_support::{Daemon, session, wait_for};

const LIMIT: Duration = Duration::from_secs(20);

fn serves(d: &Daemon, host: &str) -> bool {
    d.get(host, "/healthz").is_some_and(|(c, _)| c == 200)
}

const EXTRA: &str = "routes:\n  templates:\n    - {host: '{session}.{domain}', port: ide}\n    - {host: 'preview-{session}.{domain}', port: app}\n";

#[test]
fn sighup_and_file_changes_reload_and_a_bad_config_keeps_the_running_one() {
    let mut d = Daemon::new();
    d.write("alice.yaml", &session("alice"));
    d.start();
    wait_for(LIMIT, || serves(&d, "alice.localhost")).expect("alice serves");
    assert!(!serves(&d, "preview-alice.localhost"));

    // SIGHUP: the daemon lives on (and reloads an unchanged file).
    let pid = d.child.as_ref().map(|c| c.id() as i32).expect("running");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGHUP).expect("hup");
    wait_for(LIMIT, || d.log().contains("reloaded: nothing changed")).expect("it reloads");
    assert!(
        d.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none()),
        "SIGHUP must not end the daemon"
    );

    // A change to the file is picked up on its own: a new route template.
    d.edit_config(|c| format!("{c}{EXTRA}"));
    wait_for(LIMIT, || serves(&d, "preview-alice.localhost"))
        .unwrap_or_else(|| panic!("the new template serves; log:\n{}", d.log()));

    // An invalid config: nothing changes, and the log says why (with line and column).
    d.edit_config(|c| c.replace("routes:", "routes: [oops\n"));
    wait_for(LIMIT, || d.log().contains("was not reloaded")).expect("it says so");
    let log = d.log();
    let line = log
        .lines()
        .find(|l| l.contains("was not reloaded"))
        .unwrap_or_default()
        .to_string();
    assert!(line.contains("vessel.yaml"), "{line}");
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        serves(&d, "preview-alice.localhost"),
        "the running config stays"
    );
    assert!(serves(&d, "alice.localhost"));

    // What only a restart changes keeps its running value, with a warning.
    d.edit_config(|c| {
        c.replace("routes: [oops\n", "routes:")
            .replace(&format!("'{}'", d.status), "'127.0.0.1:1'")
    });
    wait_for(LIMIT, || d.log().contains("status change only on restart"))
        .unwrap_or_else(|| panic!("the warning; log:\n{}", d.log()));
    assert_eq!(
        crate::daemon_support::get(d.status, "s", "/healthz").map(|r| r.0),
        Some(200),
        "the status endpoint still answers where it was"
    );
}
