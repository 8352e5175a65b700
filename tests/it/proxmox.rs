//! The proxmox compute provider, against a CONTRACT DOUBLE of the Proxmox VE API
//! (`pve_double`): no Proxmox runs on these machines, so every request vessel makes is checked
//! against Proxmox's own published API schema (`../shared/contracts/proxmox/pve-api.json`) and
//! answered in the schema's shapes, with tasks that take time, locks and injected failures.
//! What passes here is vessel keeping to the published contract, not a test against a real
//! cluster.
//!
//! Each test runs the real `vessel` binary (`apply`, `plan`) on a tree of its own, with the
//! double as its one cluster (two nodes in two locations) and a TCP listener of the test's as
//! the guests' service (the double's guests report 127.0.0.1).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::pve_double::{Double, TOKEN_ID, TOKEN_SECRET, Timing};
use crate::support::text;

/// A tree for one test: config, desired state, state directory, and the guests' service.
struct Tree {
    dir: tempfile::TempDir,
    port: u16,
    _service: std::net::TcpListener,
}

const TEMPLATES: &[(u64, &str, &str, &str)] = &[
    (9000, "qemu", "pve1", "debian-vm"),
    (9001, "lxc", "pve1", "debian-ct"),
];

fn double(timing: Timing) -> Double {
    let d = Double::start(&["pve1", "pve2"], timing);
    for (id, kind, node, name) in TEMPLATES {
        d.add(*id, kind, node, name, true);
    }
    d
}

impl Tree {
    fn new(d: &Double, extra_config: &str) -> Tree {
        Tree::with_url(&d.url, extra_config)
    }

    fn with_url(url: &str, extra_config: &str) -> Tree {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("desired")).expect("mkdir");
        // Another test binary may take a port between its check and this bind: take the next.
        let (port, service) = (0..20)
            .find_map(|_| {
                let p = crate::daemon_support::free_port();
                std::net::TcpListener::bind(("127.0.0.1", p))
                    .ok()
                    .map(|l| (p, l))
            })
            .expect("a free port for the guests' service");
        let config = format!(
            "source: {{dir: desired}}\nstate_dir: state\nroutes: {{templates: []}}\nproviders:\n  compute:\n    proxmox:\n      clusters:\n        - name: lab\n          url: '{url}'\n          token_id: '{TOKEN_ID}'\n          token_secret: {{env: PVE_TEST_TOKEN}}\n          nodes:\n            - {{name: pve1, location: fra}}\n            - {{name: pve2, location: ams}}\n      poll_interval: 50ms\n      call_timeout: 2s\n      task_timeout: 20s\n      address_timeout: 5s\n{extra_config}"
        );
        std::fs::write(dir.path().join("vessel.yaml"), config).expect("config");
        Tree {
            dir,
            port,
            _service: service,
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn write(&self, name: &str, body: &str) {
        std::fs::write(self.path().join("desired").join(name), body).expect("write");
    }

    fn remove(&self, name: &str) {
        std::fs::remove_file(self.path().join("desired").join(name)).expect("rm");
    }

    /// A plan `name` for `guest` guests.
    fn plan(&self, name: &str, guest: &str, extra: &str) {
        let template = if guest == "vm" { "debian-vm" } else { "9001" };
        self.write(
            &format!("plan-{name}.yaml"),
            &format!(
                "kind: Plan\nname: {name}\ncompute: proxmox\nguest: {guest}\ntemplate: '{template}'\ncpus: 2\nmemory: 2GiB\ndisk: 8GiB\nports: {{ide: {}}}\nstop_timeout: 2s\n{extra}",
                self.port
            ),
        );
    }

    fn session(&self, name: &str, plan: &str, extra: &str) {
        self.write(
            &format!("{name}.yaml"),
            &format!("kind: Session\nname: {name}\nplan: {plan}\n{extra}"),
        );
    }

    /// Run vessel with the token in its environment: (exit code, stdout + stderr).
    fn vessel(&self, args: &[&str]) -> (i32, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_vessel"))
            .args(args)
            .current_dir(self.path())
            .env("NO_COLOR", "1")
            .env("PVE_TEST_TOKEN", TOKEN_SECRET)
            .output()
            .expect("vessel runs");
        (
            out.status.code().unwrap_or(-1),
            text(&out.stdout) + &text(&out.stderr),
        )
    }

    fn apply(&self) -> (i32, String) {
        self.vessel(&["apply", "vessel.yaml"])
    }

    /// Every file under the state directory, read.
    fn state_text(&self) -> String {
        let mut out = String::new();
        fn walk(p: &Path, out: &mut String) {
            for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
                let path: PathBuf = e.path();
                if path.is_dir() {
                    walk(&path, out);
                } else if let Ok(b) = std::fs::read(&path) {
                    out.push_str(&String::from_utf8_lossy(&b));
                }
            }
        }
        walk(&self.path().join("state"), &mut out);
        out
    }
}

/// A double, a tree with plan `plan` (for `guest` guests) and session `session`, applied.
fn made(plan: &str, guest: &str, plan_extra: &str, session: &str) -> (Double, Tree) {
    let d = double(Timing::quick());
    let t = Tree::new(&d, "");
    t.plan(plan, guest, plan_extra);
    t.session(session, plan, "");
    let (code, out) = t.apply();
    assert_eq!(code, 0, "{out}");
    (d, t)
}

/// The double's guest named `vessel-<session>`: (vmid, node, tags, status, cores, memory MiB,
/// disk bytes).
fn guest(d: &Double, session: &str) -> Option<(u64, String, String, String, u64, u64, u64)> {
    d.with(|w| {
        w.guests
            .iter()
            .find(|(_, g)| g.name == format!("vessel-{session}"))
            .map(|(id, g)| {
                (
                    *id,
                    g.node.clone(),
                    g.tags.clone(),
                    g.status.to_string(),
                    g.cores,
                    g.memory_mib,
                    g.maxdisk,
                )
            })
    })
}

fn tag_set(t: &str) -> std::collections::BTreeSet<&str> {
    t.split([';', ',', ' ']).filter(|s| !s.is_empty()).collect()
}

#[test]
fn contract_double_proxmox_vm_and_lxc_are_cloned_full_and_linked_on_the_node_of_their_location() {
    let d = double(Timing::quick());
    let t = Tree::new(&d, "");
    t.plan("vm", "vm", "clone: full\nstorage: local-lvm\n");
    t.plan("ct", "lxc", "clone: linked\n");
    t.session("alice", "vm", "location: ams\n");
    t.session("bob", "ct", "location: fra\n");
    let (code, out) = t.apply();
    assert_eq!(code, 0, "{out}");

    let (_, node, tags, status, cores, mem, disk) = guest(&d, "alice").expect("alice's VM");
    assert_eq!(node, "pve2", "placed on the node in ams");
    assert_eq!(status, "running");
    assert_eq!((cores, mem, disk), (2, 2048, 8 << 30));
    assert!(tag_set(&tags).contains("vessel.vessel"), "{tags}");
    let (_, node, _, status, ..) = guest(&d, "bob").expect("bob's container");
    assert_eq!((node.as_str(), status.as_str()), ("pve1", "running"));

    // The clone requests: the VM full to its storage, cross-node (`target`); the container
    // linked, no storage.
    let vm = d.params_of("POST", "/9000/clone");
    assert_eq!(vm.len(), 1);
    assert_eq!(vm[0]["full"], serde_json::json!(true));
    assert_eq!(vm[0]["storage"], serde_json::json!("local-lvm"));
    assert_eq!(vm[0]["target"], serde_json::json!("pve2"));
    assert_eq!(vm[0]["name"], serde_json::json!("vessel-alice"));
    let ct = d.params_of("POST", "/9001/clone");
    assert_eq!(ct[0]["full"], serde_json::json!(false));
    assert_eq!(ct[0]["hostname"], serde_json::json!("vessel-bob"));
    assert!(ct[0].get("storage").is_none());
    // Every task was polled on the node its UPID names (the double refuses any other).
    let polls: Vec<String> = d
        .requests()
        .into_iter()
        .filter(|r| r.contains("/tasks/"))
        .collect();
    assert!(!polls.is_empty());

    // Converged: a plan shows nothing to do, and observing is one listing per cluster.
    let before = d.requests().len();
    let answered = d.calls.load(std::sync::atomic::Ordering::Relaxed);
    let (code, out) = t.vessel(&["plan", "vessel.yaml"]);
    assert_eq!(code, 0, "no changes: {out}");
    assert_eq!(
        d.calls.load(std::sync::atomic::Ordering::Relaxed),
        answered + 1
    );
    let made = d.requests()[before..].to_vec();
    assert_eq!(made, vec!["GET /cluster/resources".to_string()], "{made:?}");

    // Proxmox reorders tags: still vessel's.
    d.with(|w| {
        for g in w.guests.values_mut() {
            let mut v: Vec<&str> = g.tags.split(';').collect();
            v.reverse();
            g.tags = v.join(",");
        }
    });
    let (code, out) = t.vessel(&["plan", "vessel.yaml"]);
    assert_eq!(code, 0, "tags compared as a set: {out}");

    // Destroyed when no longer desired (stopped first: Proxmox refuses to destroy a running
    // guest).
    t.remove("bob.yaml");
    let (code, out) = t.apply();
    assert_eq!(code, 0, "{out}");
    assert!(guest(&d, "bob").is_none(), "bob's container destroyed");
    assert!(guest(&d, "alice").is_some());
    assert!(d.with(|w| w.guests.contains_key(&9000) && w.guests.contains_key(&9001)));
}

#[test]
fn contract_double_a_guest_whose_clone_failed_is_destroyed_and_made_again() {
    let d = double(Timing::quick());
    d.with(|w| w.faults.clones_fail = 1);
    let t = Tree::new(&d, "");
    t.plan("vm", "vm", "");
    t.session("carol", "vm", "");
    let (code, out) = t.apply();
    assert_ne!(code, 0, "the clone failed: {out}");
    assert!(out.contains("clone failed"), "{out}");
    let (half, ..) = guest(&d, "carol").expect("the half-made guest is left");

    // The next pass recognises it as vessel's (its record names that VMID), half-made: the
    // plan says it is rolled back and made again, and why.
    let (code, out) = t.vessel(&["plan", "vessel.yaml"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("replace"), "{out}");
    assert!(
        out.contains(&format!(
            "half-made (the clone into VMID {half} on pve1 never finished): rolled back, destroyed and made again"
        )),
        "{out}"
    );
    let (code, out) = t.apply();
    assert_eq!(code, 0, "{out}");
    let (vmid, _, tags, status, ..) = guest(&d, "carol").expect("made again");
    assert_eq!(status, "running");
    assert!(tag_set(&tags).contains("vessel.vessel"));
    assert!(
        d.with(|w| w
            .guests
            .values()
            .filter(|g| g.name == "vessel-carol")
            .count())
            == 1,
        "nothing leaked (the half-made guest was {half}, the new one is {vmid})"
    );
}

#[test]
fn contract_double_a_guest_that_failed_to_start_is_finished_not_remade() {
    let d = double(Timing::quick());
    d.with(|w| {
        w.faults.fail_500.insert("/status/start".into(), 1);
    });
    let t = Tree::new(&d, "");
    t.plan("ct", "lxc", "");
    t.session("dave", "ct", "");
    let (_, out) = t.apply();
    let (vmid, ..) = guest(&d, "dave").unwrap_or_else(|| panic!("made: {out}"));
    let (code, out) = t.vessel(&["plan", "vessel.yaml"]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains(&format!(
            "half-made (VMID {vmid} on pve1 was cloned and configured, not yet started): finished"
        )),
        "the plan says it finishes the guest: {out}"
    );
    assert!(out.contains("0 to replace"), "{out}");
    let (code, out) = t.apply();
    assert_eq!(code, 0, "{out}");
    let (again, _, _, status, ..) = guest(&d, "dave").expect("still there");
    assert_eq!(
        (again, status.as_str()),
        (vmid, "running"),
        "finished in place"
    );
    assert_eq!(d.params_of("POST", "/clone").len(), 1, "cloned once");
}

#[test]
fn contract_double_a_vmid_taken_meanwhile_is_asked_for_again_and_never_reused() {
    let d = double(Timing::quick());
    d.with(|w| w.faults.steal_ids = 1);
    let t = Tree::new(&d, "");
    t.plan("vm", "vm", "");
    t.session("erin", "vm", "");
    let (code, out) = t.apply();
    assert_eq!(code, 0, "{out}");
    let clones = d.params_of("POST", "/clone");
    assert_eq!(clones.len(), 2, "the first VMID was taken: asked again");
    let stolen = d.with(|w| {
        w.guests
            .iter()
            .find(|(_, g)| g.name.starts_with("someone-else"))
            .map(|(id, g)| (*id, g.tags.clone()))
    });
    let (stolen, tags) = stolen.expect("the other client's guest");
    assert!(tags.is_empty(), "the other client's guest is untouched");
    let (vmid, ..) = guest(&d, "erin").expect("made");
    assert_ne!(vmid, stolen);
}

#[test]
fn contract_double_foreign_guests_with_similar_names_are_never_touched() {
    let d = double(Timing::quick());
    d.add(300, "qemu", "pve1", "vessel-frank", false);
    d.add(301, "qemu", "pve1", "vessel-gina", false);
    d.with(|w| {
        if let Some(g) = w.guests.get_mut(&301) {
            g.tags = "vessel.other".into();
            g.status = "running";
        }
    });
    let t = Tree::new(&d, "");
    t.plan("vm", "vm", "");
    t.session("frank", "vm", "");
    let (code, out) = t.apply();
    assert_ne!(code, 0, "frank is held: {out}");
    assert!(out.contains("frank"), "{out}");
    let touched: Vec<String> = d
        .requests()
        .into_iter()
        .filter(|r| r.contains("/300") || r.contains("/301"))
        .collect();
    assert!(touched.is_empty(), "{touched:?}");
    assert_eq!(d.params_of("POST", "/clone").len(), 0);
    d.with(|w| {
        assert_eq!(w.guests[&301].status, "running");
        assert_eq!(w.guests[&300].tags, "");
    });
}

#[test]
fn contract_double_an_unreachable_cluster_is_a_gap_no_creates_no_destroys() {
    let d = double(Timing::quick());
    let t = Tree::new(&d, "");
    t.plan("vm", "vm", "");
    t.session("hank", "vm", "");
    let (code, out) = t.apply();
    assert_eq!(code, 0, "{out}");
    // The cluster goes away (nothing listens at its URL) and hank is no longer desired,
    // ivy is new: neither is acted on.
    let gone = format!("http://127.0.0.1:{}", crate::daemon_support::free_port());
    let config = std::fs::read_to_string(t.path().join("vessel.yaml")).expect("config");
    std::fs::write(t.path().join("vessel.yaml"), config.replace(&d.url, &gone)).expect("write");
    t.remove("hank.yaml");
    t.session("ivy", "vm", "");
    let (code, out) = t.vessel(&["plan", "vessel.yaml"]);
    assert!(!out.contains("create ivy"), "{out}");
    assert!(!out.contains("destroy hank"), "{out}");
    assert!(out.contains("compute/proxmox"), "the gap is named: {out}");
    assert_ne!(code, 1, "{out}");

    // A frozen cluster (answers slower than call_timeout) is a gap too.
    std::fs::write(t.path().join("vessel.yaml"), config).expect("write");
    d.with(|w| w.faults.hang = Some(Duration::from_secs(4)));
    let (_, out) = t.vessel(&["plan", "vessel.yaml"]);
    assert!(
        !out.contains("create ivy") && !out.contains("destroy hank"),
        "{out}"
    );
    assert!(guest(&d, "hank").is_some());
}

#[test]
fn contract_double_the_token_never_appears_in_output_state_or_errors() {
    let d = double(Timing::quick());
    d.with(|w| {
        w.faults.fail_500.insert("/config".into(), 1);
        w.faults.agent_never = true;
    });
    let t = Tree::new(&d, "");
    t.plan("vm", "vm", "");
    t.session("jo", "vm", "");
    let (code, out) = t.apply();
    assert_ne!(code, 0, "{out}");
    let (_, out2) = t.apply();
    assert!(
        out2.contains("wait for the address") || out2.contains("guest agent"),
        "an agent that never answers fails its step, bounded: {out2}"
    );
    let (_, status) = t.vessel(&["plan", "vessel.yaml", "--format", "json"]);
    for (what, text) in [
        ("output", &out),
        ("output", &out2),
        ("plan", &status),
        ("state", &t.state_text()),
    ] {
        assert!(!text.contains(TOKEN_SECRET), "the token leaked into {what}");
    }
    d.with(|w| {
        assert!(
            w.seen.iter().all(|s| !s.contains(TOKEN_SECRET)),
            "only the Authorization header carries the token"
        );
    });
    // A wrong token: 401, and the error names the cluster, not the token.
    let t2 = Tree::new(&d, "");
    t2.plan("vm", "vm", "");
    let out = Command::new(env!("CARGO_BIN_EXE_vessel"))
        .args(["plan", "vessel.yaml"])
        .current_dir(t2.path())
        .env("PVE_TEST_TOKEN", "wrong-secret-value")
        .output()
        .expect("vessel runs");
    let all = text(&out.stdout) + &text(&out.stderr);
    assert!(!all.contains("wrong-secret-value"), "{all}");
    assert!(
        all.contains("401") || all.contains("authentication"),
        "{all}"
    );
}

#[test]
fn contract_double_power_states_stop_with_shutdown_then_start_again() {
    let (d, t) = made("vm", "vm", "", "kim");
    t.session("kim", "vm", "state: stopped\n");
    let (code, out) = t.apply();
    assert_eq!(code, 0, "{out}");
    let (vmid, _, _, status, ..) = guest(&d, "kim").expect("kept");
    assert_eq!(status, "stopped");
    let shut = d.params_of("POST", &format!("/{vmid}/status/shutdown"));
    assert_eq!(shut.len(), 1, "a clean shutdown");
    assert_eq!(
        shut[0]["forceStop"],
        serde_json::json!(true),
        "then a stop after the timeout"
    );
    assert_eq!(shut[0]["timeout"], serde_json::json!(2));
    t.session("kim", "vm", "state: running\n");
    let (code, out) = t.apply();
    assert_eq!(code, 0, "{out}");
    assert_eq!(guest(&d, "kim").expect("kept").3, "running");
}

#[test]
fn contract_double_cores_memory_and_disk_change_in_place_and_a_shrink_is_refused() {
    let (d, t) = made("ct", "lxc", "", "lee");
    let (vmid, ..) = guest(&d, "lee").expect("made");
    t.write(
        "plan-ct.yaml",
        &std::fs::read_to_string(t.path().join("desired/plan-ct.yaml"))
            .expect("plan")
            .replace("cpus: 2", "cpus: 4")
            .replace("memory: 2GiB", "memory: 4GiB")
            .replace("disk: 8GiB", "disk: 12GiB"),
    );
    let (code, out) = t.vessel(&["plan", "vessel.yaml"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("update in place"), "in place: {out}");
    assert!(out.contains("0 to replace"), "in place: {out}");
    let (code, out) = t.apply();
    assert_eq!(code, 0, "{out}");
    let (again, _, _, _, cores, mem, disk) = guest(&d, "lee").expect("kept");
    assert_eq!((again, cores, mem, disk), (vmid, 4, 4096, 12 << 30));
    let resize = d.params_of("PUT", "/resize");
    assert!(
        resize
            .iter()
            .all(|p| p["size"].as_str().is_some_and(|s| s.starts_with('+'))),
        "grown with `+`: {resize:?}"
    );
    // A smaller disk: refused with a reason; the guest keeps its disk.
    t.write(
        "plan-ct.yaml",
        &std::fs::read_to_string(t.path().join("desired/plan-ct.yaml"))
            .expect("plan")
            .replace("disk: 12GiB", "disk: 6GiB"),
    );
    let (code, out) = t.vessel(&["plan", "vessel.yaml"]);
    assert!(out.contains("never shrinks"), "refused in the plan: {out}");
    assert_eq!(code, 2, "held, nothing else to do: {out}");
    assert!(out.contains("0 to update"), "{out}");
    let (code, out) = t.apply();
    assert_eq!(code, 3, "held: {out}");
    assert!(out.contains("never shrinks"), "{out}");
    assert_eq!(guest(&d, "lee").expect("kept").6, 12 << 30);
}

/// The double itself: requests off the schema are refused as Proxmox would.
#[test]
fn contract_double_refuses_requests_the_schema_does_not_allow() {
    let d = double(Timing::quick());
    let call = |method: &str, path: &str, body: &str| -> (u16, String) {
        use std::io::{Read, Write};
        let addr = d.url.trim_start_matches("http://");
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        let req = format!(
            "{method} /api2/json{path} HTTP/1.1\r\nhost: x\r\nauthorization: PVEAPIToken={TOKEN_ID}={TOKEN_SECRET}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).expect("write");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        let code = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
        (code, out)
    };
    let (c, out) = call("GET", "/cluster/resources?type=vms", "");
    assert_eq!(c, 400, "an enum: {out}");
    let (c, out) = call("GET", "/cluster/resources?kind=vm", "");
    assert!(
        c == 400 && out.contains("not defined in schema"),
        "unknown: {out}"
    );
    let (c, out) = call("POST", "/nodes/pve1/qemu/9000/clone", "{}");
    assert!(c == 400 && out.contains("newid"), "missing: {out}");
    let (c, out) = call("POST", "/nodes/pve1/qemu/9000/clone", r#"{"newid": "abc"}"#);
    assert!(c == 400 && out.contains("integer"), "a type: {out}");
    let (c, out) = call(
        "PUT",
        "/nodes/pve1/qemu/9000/resize",
        r#"{"disk": "scsi0", "size": "-1G"}"#,
    );
    assert!(c == 400 && out.contains("pattern"), "a pattern: {out}");
    let (c, out) = call(
        "POST",
        "/nodes/pve1/qemu/9000/clone",
        r#"{"newid": 101, "name": "not_a_dns_name"}"#,
    );
    assert!(c == 400 && out.contains("format"), "a format: {out}");
    let (c, _) = call("GET", "/nodes/pve1/qemu/9000/nonsense", "");
    assert_eq!(c, 501);
    let (c, out) = call(
        "POST",
        "/nodes/pve1/qemu/9000/clone",
        r#"{"newid": 101, "full": 1}"#,
    );
    assert_eq!(c, 200, "{out}");
    let upid: serde_json::Value =
        serde_json::from_str(out.split("\r\n\r\n").nth(1).unwrap_or_default()).expect("json");
    let upid = upid["data"].as_str().expect("a UPID").to_string();
    let (c, out) = call("GET", &format!("/nodes/pve2/tasks/{upid}/status"), "");
    assert_eq!(c, 500, "a task is polled on its own node only: {out}");
    let (c, out) = call("PUT", "/nodes/pve1/qemu/101/config", r#"{"cores": 2}"#);
    assert!(
        c == 500 && out.contains("locked"),
        "locked while its clone runs: {out}"
    );
}

#[test]
fn contract_double_restart_requested_reboots_a_running_guest_once() {
    let (d, t) = made("vm", "vm", "", "max");
    // Asked for after it started (uptime is in whole seconds).
    std::thread::sleep(Duration::from_millis(1500));
    let at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    t.session("max", "vm", &format!("restart_requested: '{at}'\n"));
    let (code, out) = t.vessel(&["plan", "vessel.yaml"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("restart requested at"), "{out}");
    let (code, out) = t.apply();
    assert_eq!(code, 0, "{out}");
    let (vmid, ..) = guest(&d, "max").expect("kept");
    assert_eq!(
        d.params_of("POST", &format!("/{vmid}/status/reboot")).len(),
        1,
        "rebooted once"
    );
    let (code, out) = t.vessel(&["plan", "vessel.yaml"]);
    assert_eq!(code, 0, "restarted once, not again: {out}");
    // A time in the future restarts nothing yet.
    let later = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    t.session("max", "vm", &format!("restart_requested: '{later}'\n"));
    let (code, out) = t.vessel(&["plan", "vessel.yaml"]);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn contract_double_the_pause_sleep_depth_suspends_and_a_start_resumes() {
    use vessel::model::ComputeKind;
    use vessel::model::plan::SessionAction;
    use vessel::providers::ComputeProvider;
    let (d, t) = made("vm", "vm", "sleep: pause\n", "nia");
    // The provider in process, on the tree's state directory, as the daemon's lifecycle
    // drives it.
    let token = t.path().join("token");
    std::fs::write(&token, TOKEN_SECRET).expect("token");
    let config: vessel::providers::compute::proxmox::ProxmoxConfig = serde_saphyr::from_str(
        &format!(
            "clusters: [{{name: lab, url: '{}', token_id: '{TOKEN_ID}', token_secret: {{file: '{}'}}, nodes: [{{name: pve1}}, {{name: pve2}}]}}]\npoll_interval: 50ms\n",
            d.url,
            token.display()
        ),
    )
    .expect("config");
    let p = vessel::providers::compute::proxmox::ProxmoxProvider::new(
        config,
        t.path().join("state/proxmox"),
    )
    .expect("provider");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        p.observe().await.expect("observed");
        p.pause("nia").await.expect("paused");
        assert_eq!(
            d.with(|w| w
                .guests
                .values()
                .find(|g| g.name == "vessel-nia")
                .map(|g| g.qmp)),
            Some("paused")
        );
        let start = SessionAction::StartSession {
            session: "nia".into(),
            provider: ComputeKind::Proxmox,
            restart: false,
            stop_timeout: None,
        };
        p.apply(&start).await.expect("resumed");
    });
    assert_eq!(
        d.with(|w| w
            .guests
            .values()
            .find(|g| g.name == "vessel-nia")
            .map(|g| g.qmp)),
        Some("running")
    );
    assert_eq!(d.params_of("POST", "/status/resume").len(), 1);
}

#[test]
fn contract_double_firewall_rules_are_vessels_by_their_comment_and_foreign_ones_stay() {
    let (d, t) = made(
        "vm",
        "vm",
        "firewall: {allow: [{port: ide, from: 10.0.0.0/8}, {port: 22}]}\n",
        "ola",
    );
    let (vmid, ..) = guest(&d, "ola").expect("made");
    let rules = |d: &Double| {
        d.with(|w| {
            w.guests[&vmid]
                .rules
                .iter()
                .map(|r| {
                    format!(
                        "{} {} {}",
                        r.get("comment").and_then(|v| v.as_str()).unwrap_or(""),
                        r.get("dport").and_then(|v| v.as_str()).unwrap_or(""),
                        r.get("source").and_then(|v| v.as_str()).unwrap_or("any")
                    )
                })
                .collect::<std::collections::BTreeSet<String>>()
        })
    };
    let ide = format!("vessel.vessel {} 10.0.0.0/8", t.port);
    assert_eq!(
        rules(&d),
        [ide.clone(), "vessel.vessel 22 any".to_string()].into()
    );
    assert!(
        d.with(|w| w.guests[&vmid].firewall),
        "the guest's firewall is on"
    );
    // Someone adds a rule of their own; the plan drops the ide rule.
    d.with(|w| {
        let mut r = serde_json::Map::new();
        r.insert("type".into(), "in".into());
        r.insert("action".into(), "ACCEPT".into());
        r.insert("dport".into(), "9100".into());
        r.insert("comment".into(), "monitoring".into());
        w.guests.get_mut(&vmid).expect("guest").rules.insert(0, r);
    });
    t.plan("vm", "vm", "firewall: {allow: [{port: 22}]}\n");
    let (code, out) = t.apply();
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        rules(&d),
        [
            "monitoring 9100 any".to_string(),
            "vessel.vessel 22 any".to_string()
        ]
        .into()
    );
    assert!(
        d.params_of("POST", &format!("/{vmid}/status/reboot"))
            .is_empty(),
        "a firewall change reboots nothing"
    );
}

#[test]
fn contract_double_a_running_vm_takes_new_cores_at_its_next_stop_or_hot_with_hotplug() {
    let (d, t) = made("vm", "vm", "", "hank");
    let (vmid, ..) = guest(&d, "hank").expect("made");
    let reboots = || d.params_of("POST", "/status/reboot").len();
    let bigger = |t: &Tree, extra: &str| {
        t.write(
            "plan-vm.yaml",
            &std::fs::read_to_string(t.path().join("desired/plan-vm.yaml"))
                .expect("plan")
                .replace("cpus: 2", "cpus: 3")
                .replace("memory: 2GiB", &format!("memory: 3GiB\n{extra}")),
        );
    };
    bigger(&t, "");
    let (code, out) = t.vessel(&["plan", "vessel.yaml"]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("taken at its next stop (no hot-plug"),
        "the plan says when: {out}"
    );
    let (code, out) = t.apply();
    assert_eq!(code, 0, "{out}");
    assert_eq!(reboots(), 0, "nothing rebooted for it");
    let (again, _, _, status, cores, mem, _) = guest(&d, "hank").expect("kept");
    assert_eq!((again, status.as_str()), (vmid, "running"));
    assert_eq!(
        (cores, mem),
        (2, 2048),
        "pending in Proxmox until the VM stops"
    );
    let (code, out) = t.vessel(&["plan", "vessel.yaml"]);
    assert_eq!(code, 0, "converged: {out}");
    // Stopped (declared), then running again: it runs with them.
    t.session("hank", "vm", "state: stopped\n");
    let (code, out) = t.apply();
    assert_eq!(code, 0, "{out}");
    assert_eq!(guest(&d, "hank").expect("kept").4, 3, "taken at the stop");
    t.session("hank", "vm", "");
    let (code, out) = t.apply();
    assert_eq!(code, 0, "{out}");
    let (_, _, _, status, cores, mem, _) = guest(&d, "hank").expect("kept");
    assert_eq!((status.as_str(), cores, mem), ("running", 3, 3072));

    // With hot-plug (the template has it, the plan says so): at once, without a reboot.
    d.with(|w| {
        if let Some(g) = w.guests.get_mut(&vmid) {
            g.hotplug = true;
        }
    });
    t.write(
        "plan-vm.yaml",
        &std::fs::read_to_string(t.path().join("desired/plan-vm.yaml"))
            .expect("plan")
            .replace("cpus: 3", "cpus: 4")
            .replace("memory: 3GiB", "memory: 3GiB\nhotplug: true"),
    );
    let (code, out) = t.vessel(&["plan", "vessel.yaml"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("update in place, at once (hot"), "{out}");
    let (code, out) = t.apply();
    assert_eq!(code, 0, "{out}");
    let (_, _, _, status, cores, ..) = guest(&d, "hank").expect("kept");
    assert_eq!((status.as_str(), cores), ("running", 4));
    assert_eq!(reboots(), 0, "hot: nothing rebooted");
}

#[test]
fn contract_double_snapshots_are_taken_on_schedule_pruned_past_keep_and_listed() {
    let d = double(Timing::quick());
    let (proxy, status) = (
        crate::daemon_support::free_port(),
        crate::daemon_support::free_port(),
    );
    let t = Tree::new(
        &d,
        &format!(
            "  proxy:\n    embedded:\n      listen: 127.0.0.1:{proxy}\nstatus:\n  listen: 127.0.0.1:{status}\n"
        ),
    );
    // A slot every 2 s (aligned to the epoch): each apply a slot later takes one snapshot.
    t.plan("ct", "lxc", "snapshots: {every: 2s, keep: 2}\n");
    t.session("iris", "ct", "");
    let (code, out) = t.apply();
    assert_eq!(code, 0, "{out}");
    let (vmid, ..) = guest(&d, "iris").expect("made");
    let snaps = || {
        d.with(|w| {
            w.guests
                .get(&vmid)
                .map(|g| g.snapshots.clone())
                .unwrap_or_default()
        })
    };
    let wait_slot = || std::thread::sleep(Duration::from_millis(2100));
    wait_slot();
    let (code, out) = t.vessel(&["plan", "vessel.yaml"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("snapshot due"), "the plan says why: {out}");
    let (code, out) = t.apply();
    assert_eq!(code, 0, "{out}");
    // At least one (an apply that spans a slot's end takes that slot's too), named by time.
    let first = snaps();
    assert!(!first.is_empty() && first.len() <= 2, "{first:?}");
    assert!(
        first.iter().all(|n| n.starts_with("vessel_2")),
        "named by time: {first:?}"
    );
    wait_slot();
    let (code, out) = t.apply();
    assert_eq!(code, 0, "{out}");
    wait_slot();
    let (code, out) = t.apply();
    assert_eq!(code, 0, "{out}");
    let kept = snaps();
    assert_eq!(kept.len(), 2, "pruned past keep: {kept:?}");
    assert!(!kept.contains(&first[0]), "the oldest went first: {kept:?}");
    assert_eq!(
        d.params_of("DELETE", &format!("/snapshot/{}", first[0]))
            .len(),
        1
    );

    // A snapshot of someone else's stays, whatever vessel prunes.
    d.with(|w| {
        if let Some(g) = w.guests.get_mut(&vmid) {
            g.snapshots.insert(0, "before_upgrade".into());
        }
    });
    // Snapshots failing under the daemon: shown in status, retried, and the session is
    // neither held nor touched meanwhile.
    d.with(|w| {
        w.faults.fail_500.insert("/snapshot".into(), 1000);
    });
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_vessel"))
        .args(["run", "vessel.yaml"])
        .current_dir(t.path())
        .env("NO_COLOR", "1")
        .env("PVE_TEST_TOKEN", TOKEN_SECRET)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("vessel run");
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], status).into();
    let view = || {
        crate::daemon_support::get(addr, "127.0.0.1", "/sessions/iris")
            .map(|(_, body)| body)
            .unwrap_or_default()
    };
    let failed =
        crate::daemon_support::wait_for(Duration::from_secs(20), || view().contains("\"failed\""));
    let shown = view();
    assert!(failed.is_some(), "a failed snapshot is shown: {shown}");
    assert!(
        shown.contains("vessel_"),
        "status lists the snapshots: {shown}"
    );
    let v: serde_json::Value = serde_json::from_str(&shown).expect("json");
    assert_eq!(v["observed_state"], "running", "{shown}");
    assert!(
        v["snapshots"]["failed"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("answered 500: injected failure: internal error")),
        "the failure in Proxmox's words (its status line): {shown}"
    );
    assert_eq!(guest(&d, "iris").expect("kept").3, "running");
    let tries = d.params_of("POST", "/snapshot").len();
    d.with(|w| {
        w.faults.fail_500.clear();
    });
    let recovered = crate::daemon_support::wait_for(Duration::from_secs(20), || {
        let v = view();
        !v.contains("\"failed\"") && v.contains("vessel_")
    });
    let _ = daemon.kill();
    let _ = daemon.wait();
    assert!(recovered.is_some(), "retried and taken: {}", view());
    assert!(d.params_of("POST", "/snapshot").len() > tries, "retried");
    let now = snaps();
    assert!(
        now.contains(&"before_upgrade".to_string()),
        "foreign kept: {now:?}"
    );
    assert_eq!(
        now.iter().filter(|s| s.starts_with("vessel_")).count(),
        2,
        "{now:?}"
    );
}
