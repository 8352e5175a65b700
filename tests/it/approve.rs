//! `vessel approve`: destroys a guard holds go ahead once, for exactly the plan approved,
//! without restarting the daemon or leaving `--allow-destroy` on; approvals expire.

use std::time::Duration;

use crate::daemon_support::{Daemon, session, wait_for};
use crate::support::{text, vessel_in};

const LIMIT: Duration = Duration::from_secs(20);

fn running(d: &Daemon) -> Vec<String> {
    let mut v: Vec<String> = d.processes().into_iter().map(|(n, _)| n).collect();
    v.dedup();
    v
}

/// The approval hash the daemon's current plan shows, once it shows one.
fn approval(d: &Daemon) -> String {
    let mut hash = None;
    wait_for(LIMIT, || {
        let plan: serde_json::Value =
            crate::daemon_support::get(d.status, "s", "/plan?format=json")
                .and_then(|(_, body)| serde_json::from_str(&body).ok())
                .unwrap_or_default();
        hash = plan["approval"].as_str().map(str::to_string);
        hash.is_some()
    })
    .unwrap_or_else(|| panic!("the plan holds destroys; log:\n{}", d.log()));
    hash.unwrap_or_default()
}

fn approve(d: &Daemon, args: &[&str]) -> (i32, String) {
    let mut all = vec!["approve"];
    all.extend_from_slice(args);
    let out = vessel_in(d.dir.path(), &all);
    (
        out.status.code().unwrap_or(-1),
        text(&out.stdout) + &text(&out.stderr),
    )
}

#[test]
fn an_approval_lets_held_destroys_through_once_and_only_for_that_plan() {
    let mut d = Daemon::new();
    for s in ["a", "b", "c", "d"] {
        d.write(&format!("{s}.yaml"), &session(s));
    }
    d.start();
    wait_for(LIMIT, || running(&d).len() == 4).expect("four sessions run");
    for s in ["b", "c", "d"] {
        std::fs::remove_file(d.source().join(format!("{s}.yaml"))).expect("rm");
    }
    // Three of four: over the budget's 50%, held.
    let hash = approval(&d);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(running(&d).len(), 4, "held by the destroy budget");

    // An approval of another plan, and an expired one, let nothing through.
    let (code, out) = approve(&d, &["0123456789abcdef", "vessel.yaml"]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = approve(&d, &[&hash, "vessel.yaml", "--ttl", "0s"]);
    assert_eq!(code, 0, "{out}");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(running(&d).len(), 4, "no approval of this plan is valid");
    assert!(
        d.state().join("approvals/0123456789abcdef.json").exists(),
        "another plan's approval waits, unused"
    );

    // Approved: applied once, at once, with no flag and no restart.
    let (code, out) = approve(&d, &[&hash, "vessel.yaml"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&hash), "{out}");
    wait_for(LIMIT, || running(&d) == ["a"]).expect("the approved destroys ran");
    assert!(
        !d.state().join(format!("approvals/{hash}.json")).exists(),
        "the approval is used up"
    );

    // A new deletion past the budget is held again: the approval was for that plan only.
    for s in ["e", "f", "g", "h"] {
        d.write(&format!("{s}.yaml"), &session(s));
    }
    wait_for(LIMIT, || running(&d).len() == 5).expect("five sessions run");
    for s in ["e", "f", "g"] {
        std::fs::remove_file(d.source().join(format!("{s}.yaml"))).expect("rm");
    }
    let again = approval(&d);
    assert_ne!(again, hash);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(running(&d).len(), 5, "held again");
}

#[test]
fn a_malformed_hash_is_refused() {
    let d = Daemon::new();
    let (code, out) = approve(&d, &["not-a-hash", "vessel.yaml"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("not an approval hash"), "{out}");
}
