//! An engine outage, for real: a Podman service of the test's own is frozen (SIGSTOP: it
//! accepts and answers nothing) and stopped in the middle of an apply. The daemon keeps
//! answering, bounds every Engine API call, treats the engine as unobserved (no creates, no
//! destroys), and repairs everything once the engine is back, with no duplicates.

use std::time::{Duration, Instant};

use crate::daemon_support::{Daemon, wait_for};
use crate::podman_support::PrivatePodman;

const PLAN: &str = "kind: Plan
name: box
compute: docker
image: localhost/busybox:test
command: [/bin/busybox, httpd, -f, -p, '{port.ide}', -h, /]
ports: {ide: 8080}
stop_timeout: 1s
";

fn session(name: &str) -> String {
    format!("kind: Session\nname: {name}\nplan: box\n")
}

fn status(d: &Daemon) -> serde_json::Value {
    crate::daemon_support::get(d.status, "s", "/status")
        .and_then(|(_, b)| serde_json::from_str(&b).ok())
        .unwrap_or_default()
}

fn healthz_within(d: &Daemon, limit: Duration) -> bool {
    let t = Instant::now();
    crate::daemon_support::get(d.status, "s", "/healthz").is_some_and(|(c, _)| c == 200)
        && t.elapsed() < limit
}

#[test]
fn a_frozen_then_stopped_engine_holds_everything_and_nothing_is_lost() {
    let mut pod = PrivatePodman::start();
    let mut d = Daemon::new();
    let config = format!(
        "source: {{dir: desired}}\nstate_dir: state\nproviders:\n  compute:\n    docker:\n      hosts: [{{name: own, endpoint: '{}'}}]\n      instance: outage\n      call_timeout: 2s\n  proxy:\n    embedded: {{listen: '{}'}}\nstatus: {{listen: '{}'}}\npolicy:\n  resync_interval: 1s\n",
        pod.endpoint(),
        d.proxy,
        d.status
    );
    std::fs::write(d.dir.path().join("vessel.yaml"), config).expect("config");
    d.write("plan.yaml", PLAN);
    d.write("a.yaml", &session("a"));
    d.write("b.yaml", &session("b"));
    d.start();
    let both = vec!["vessel-a".to_string(), "vessel-b".to_string()];
    wait_for(Duration::from_secs(60), || pod.running() == both)
        .unwrap_or_else(|| panic!("a and b run; log:\n{}", d.log()));

    // Frozen mid-apply: a new session and a deletion arrive, and the engine stops answering
    // as the pass that creates the session calls it.
    d.write("c.yaml", &session("c"));
    std::fs::remove_file(d.source().join("b.yaml")).expect("rm");
    std::thread::sleep(Duration::from_millis(130));
    pod.freeze();
    let frozen = Instant::now();
    let passes = |d: &Daemon| status(d)["passes"].as_u64().unwrap_or(0);
    let before = passes(&d);
    // The daemon keeps answering, and its passes keep finishing (each call is bounded).
    let mut unobserved = false;
    while frozen.elapsed() < Duration::from_secs(20) {
        assert!(
            healthz_within(&d, Duration::from_millis(500)),
            "/healthz answers while the engine is frozen"
        );
        unobserved |= status(&d)["providers"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| p["provider"] == "compute/docker" && p["observed"] == false);
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(
        unobserved,
        "a frozen engine reads as unobserved; log:\n{}",
        d.log()
    );
    assert!(
        passes(&d) >= before + 2,
        "passes go on (each call waits at most call_timeout); log:\n{}",
        d.log()
    );
    let (code, out) = {
        let o = crate::support::vessel_in(
            d.dir.path(),
            &[
                "status",
                "vessel.yaml",
                "--wait-converged",
                "--timeout",
                "1s",
            ],
        );
        (o.status.code(), crate::support::text(&o.stderr))
    };
    assert_eq!(
        code,
        Some(1),
        "not converged while the engine is frozen: {out}"
    );

    // Thawed: nothing was destroyed or made while it was unknown, then everything converges.
    pod.thaw();
    let after = vec!["vessel-a".to_string(), "vessel-c".to_string()];
    wait_for(Duration::from_secs(60), || pod.running() == after)
        .unwrap_or_else(|| panic!("a and c run, b is gone; log:\n{}", d.log()));

    // Stopped: the containers go on under their monitors; vessel holds everything.
    pod.kill();
    d.write("e.yaml", &session("e"));
    std::fs::remove_file(d.source().join("c.yaml")).expect("rm");
    wait_for(Duration::from_secs(20), || {
        status(&d)["not_converged"]
            .to_string()
            .contains("compute/docker could not be observed")
    })
    .unwrap_or_else(|| panic!("the stopped engine is unobserved; log:\n{}", d.log()));
    std::thread::sleep(Duration::from_secs(4));
    assert!(healthz_within(&d, Duration::from_millis(500)));
    pod.resume();
    let last = vec!["vessel-a".to_string(), "vessel-e".to_string()];
    wait_for(Duration::from_secs(60), || {
        pod.running() == last && pod.containers() == last
    })
    .unwrap_or_else(|| {
        panic!(
            "a and e run, c is gone, no duplicates: {:?}; log:\n{}",
            pod.containers(),
            d.log()
        )
    });
}
