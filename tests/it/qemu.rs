//! The qemu compute provider with real QEMU VMs (TCG where KVM does not work), booting the
//! example's kernel and initramfs (`examples/microvm/build-image.sh`; `.ci/run` builds it and
//! sets `VESSEL_MICROVM_IMAGES`). The tests fail, never skip, when QEMU or the image is
//! missing.
//!
//! Boots take seconds under TCG, so each test shares its VM between the assertions that can
//! honestly share it: one session is served at both hostnames, shows its project without
//! `node_modules`, does work that is on the host after the session goes, is killed by hand and
//! repaired, and sleeps (paused) and wakes; another has its vessel killed mid-apply.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::daemon_support::{Daemon, wait_for};

/// The images directory: `VESSEL_MICROVM_IMAGES`, else where `.ci/run` builds it.
pub fn images() -> PathBuf {
    let dir = std::env::var_os("VESSEL_MICROVM_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache")
                });
            cache.join("vessel/microvm")
        });
    assert!(
        dir.join("devbox/vmlinuz").is_file() && dir.join("devbox/initrd.img").is_file(),
        "no microVM image in {} (run examples/microvm/build-image.sh, or .ci/run)",
        dir.display()
    );
    let qemu = Command::new("qemu-system-x86_64").arg("--version").output();
    assert!(
        qemu.is_ok_and(|o| o.status.success()),
        "qemu-system-x86_64 does not run (.ci/run installs it)"
    );
    dir
}

/// Two ports: `ide` (8080) and `app` (5173), both busybox httpd on the workspace; the
/// project's CGI scripts run in the guest.
const PLAN: &str = "kind: Plan
name: vm
compute: qemu
image: devbox
memory: 128MiB
command: [sh, -c, 'httpd -p {port.app} -h /workspace && exec httpd -f -p {port.ide} -h /workspace']
ports: {ide: 8080, app: 5173}
stop_timeout: 5s
";

/// A daemon (not started) whose sessions are VMs, with `plan_extra` added to the plan.
fn qemu_daemon(plan_extra: &str) -> Daemon {
    let images = images();
    let d = Daemon::new();
    // VM ports from 20100 up, 20 to a daemon: a range nothing else in the tests hands out
    // (free_port counts from 10000, process sessions from 14000 to 20000).
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let port_base = 20100 + 20 * NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let config = format!(
        "source: {{dir: desired}}\nstate_dir: state\nproviders:\n  compute:\n    qemu: {{images: '{}', port_base: {port_base}}}\n  proxy:\n    embedded: {{listen: '{}'}}\nstatus: {{listen: '{}'}}\npolicy:\n  resync_interval: 1s\n  allow_empty_source: true\n",
        images.display(),
        d.proxy,
        d.status
    );
    std::fs::write(d.dir.path().join("vessel.yaml"), config).expect("config");
    std::fs::write(d.source().join("plan.yaml"), format!("{PLAN}{plan_extra}")).expect("plan");
    d
}

/// A project: an index page, `node_modules`, and a CGI script that does work in the guest.
fn project(root: &Path, name: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = root.join(format!("proj-{name}"));
    std::fs::create_dir_all(p.join("node_modules/pkg")).expect("mkdir");
    std::fs::create_dir_all(p.join("cgi-bin")).expect("mkdir");
    std::fs::write(p.join("index.html"), format!("hello from {name}\n")).expect("write");
    std::fs::write(p.join("node_modules/pkg/index.js"), "dep\n").expect("write");
    let cgi = p.join("cgi-bin/work");
    std::fs::write(
        &cgi,
        "#!/bin/sh\necho made in $(hostname) > /workspace/work.txt\nprintf 'Content-Type: text/plain\\r\\n\\r\\n'\necho done\n",
    )
    .expect("write");
    std::fs::set_permissions(&cgi, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    p
}

fn wait(limit_s: u64, what: &str, d: &Daemon, f: impl FnMut() -> bool) -> Duration {
    wait_for(Duration::from_secs(limit_s), f)
        .unwrap_or_else(|| panic!("{what} within {limit_s} s; vessel's log:\n{}", d.log()))
}

/// Live QEMU processes of `state` (their argv names a path under it), by session.
fn vms(state: &Path) -> Vec<(String, i32)> {
    let state = state.canonicalize().unwrap_or(state.to_path_buf());
    let needle = state.display().to_string();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat
            .rsplit(')')
            .next()
            .is_some_and(|s| s.trim_start().starts_with('Z'))
        {
            continue;
        }
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if !args.iter().any(|a| a.contains(&needle)) {
            continue;
        }
        if let Some(name) = args
            .iter()
            .flat_map(|a| a.split_whitespace())
            .find_map(|t| t.strip_prefix("vessel.session="))
        {
            out.push((name.to_string(), pid));
        }
    }
    out.sort();
    out
}

/// Kill every VM of `state` (sessions outlive vessel by design; tests clean up after
/// themselves).
struct KillVms(PathBuf);

impl Drop for KillVms {
    fn drop(&mut self) {
        for (_, pid) in vms(&self.0) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// A QEMU process vessel did not start (no marker), stopped at its first instruction; killed
/// on drop.
struct Foreign(Child);

impl Foreign {
    fn start() -> Foreign {
        let child = Command::new("qemu-system-x86_64")
            .args([
                "-name",
                "vessel-foreign",
                "-M",
                "pc",
                "-accel",
                "tcg",
                "-m",
                "32",
                "-nodefaults",
                "-display",
                "none",
                "-S",
                "-monitor",
                "none",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("a foreign QEMU starts");
        Foreign(child)
    }

    fn alive(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(None))
    }
}

impl Drop for Foreign {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One QMP command on a VM's socket; its `return`.
fn qmp(sock: &Path, command: &str) -> serde_json::Value {
    use std::io::{BufRead, BufReader, Write};
    let s = std::os::unix::net::UnixStream::connect(sock).expect("QMP socket");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut w = s.try_clone().expect("clone");
    let mut r = BufReader::new(s);
    let mut line = String::new();
    let mut answer = |w: &mut std::os::unix::net::UnixStream, cmd: &str| {
        writeln!(w, "{{\"execute\": \"{cmd}\"}}").expect("write");
        loop {
            line.clear();
            r.read_line(&mut line).expect("read");
            let v: serde_json::Value = serde_json::from_str(&line).expect("JSON");
            if let Some(ret) = v.get("return") {
                return ret.clone();
            }
            assert!(v.get("error").is_none(), "{cmd}: {v}");
        }
    };
    answer(&mut w, "qmp_capabilities");
    answer(&mut w, command)
}

fn status(sock: &Path) -> String {
    qmp(sock, "query-status")["status"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn a_vm_session_serves_both_hosts_without_node_modules_is_repaired_sleeps_and_saves_its_work() {
    let mut foreign = Foreign::start();
    let mut d = qemu_daemon("idle_timeout: 4s\nsleep: pause\n");
    let _cleanup = KillVms(d.state());
    let src = project(d.dir.path(), "vm1");
    d.write(
        "vm1.yaml",
        &format!(
            "kind: Session\nname: vm1\nplan: vm\nsource: {{path: {}, exclude: [node_modules], save_on_stop: true}}\n",
            src.display()
        ),
    );
    d.start();
    let serves = |host: &str| {
        d.get(host, "/index.html")
            .is_some_and(|(c, b)| c == 200 && b == "hello from vm1\n")
    };
    let booted = wait(90, "the VM serves at its IDE host", &d, || {
        serves("vm1.localhost")
    });
    eprintln!("create to serving through the proxy: {booted:?}");
    assert!(serves("5173-vm1.localhost"), "the app port's host");
    assert_eq!(vms(&d.state()).len(), 1, "{:?}", vms(&d.state()));

    // The project is inside without node_modules: the guest's httpd serves /workspace.
    assert_eq!(
        d.get("vm1.localhost", "/node_modules/pkg/index.js")
            .map(|(c, _)| c),
        Some(404)
    );
    // Work done in the VM (a CGI script run by the guest writes a file).
    let (c, b) = d
        .get("vm1.localhost", "/cgi-bin/work")
        .expect("cgi answers");
    assert_eq!((c, b.as_str()), (200, "done\n"));

    // A VM killed by hand is repaired: a new VM serves again.
    let (_, pid) = vms(&d.state())[0].clone();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the VM");
    wait(90, "the killed VM is replaced and serves again", &d, || {
        vms(&d.state()).iter().any(|(_, p)| *p != pid) && serves("vm1.localhost")
    });
    assert_eq!(vms(&d.state()).len(), 1, "exactly one VM after the repair");

    // Idle, it is paused (QMP `stop`: the vCPUs stop, the process and its memory stay);
    // a request wakes it.
    let sock = d.state().join("qemu/vm1/qmp.sock");
    wait(30, "the idle VM is paused", &d, || {
        status(&sock) == "paused"
    });
    let before = vms(&d.state());
    let t = Instant::now();
    assert!(serves("vm1.localhost"), "a request wakes it");
    eprintln!("wake from pause through the proxy: {:?}", t.elapsed());
    assert_eq!(status(&sock), "running");
    assert_eq!(vms(&d.state()), before, "the same VM, resumed");

    // The session goes: its work is saved into the project after a clean shutdown, and the
    // VM leaves nothing behind.
    std::fs::remove_file(d.source().join("vm1.yaml")).expect("remove");
    wait(60, "the session is destroyed", &d, || {
        vms(&d.state()).is_empty()
            && crate::daemon_support::dir_names(&d.state().join("qemu")).is_empty()
    });
    assert_eq!(
        std::fs::read_to_string(src.join("work.txt")).expect("the VM's work is saved"),
        "made in vm1\n"
    );
    assert!(
        src.join("node_modules/pkg/index.js").exists(),
        "the project's own node_modules stay"
    );

    assert!(foreign.alive(), "the foreign QEMU is untouched");
}

#[test]
fn a_vessel_killed_mid_apply_and_restarted_leaves_exactly_one_vm() {
    let mut foreign = Foreign::start();
    let mut d = qemu_daemon("");
    let _cleanup = KillVms(d.state());
    let src = project(d.dir.path(), "vm2");
    d.write(
        "vm2.yaml",
        &format!(
            "kind: Session\nname: vm2\nplan: vm\nsource: {{path: {}}}\n",
            src.display()
        ),
    );
    d.start();
    // Killed as soon as its VM exists, while it waits for the VM to answer.
    wait(60, "the VM is started", &d, || !vms(&d.state()).is_empty());
    d.signal(nix::sys::signal::Signal::SIGKILL);
    // QEMU daemonizes: the VM is the process its pid file names (the parent exits).
    let pidfile = d.state().join("qemu/vm2/qemu.pid");
    wait_for(Duration::from_secs(30), || {
        let pid = std::fs::read_to_string(&pidfile).unwrap_or_default();
        let v = vms(&d.state());
        v.len() == 1 && v[0].1.to_string() == pid.trim()
    })
    .unwrap_or_else(|| {
        panic!(
            "QEMU has not daemonized: VMs {:?}, pid file {:?}, qemu.log {:?}; vessel's log:\n{}",
            vms(&d.state()),
            std::fs::read_to_string(&pidfile),
            std::fs::read_to_string(d.state().join("qemu/vm2/qemu.log")),
            d.log()
        )
    });
    let first = vms(&d.state());
    d.start();
    wait(90, "the restarted vessel serves the session", &d, || {
        d.get("vm2.localhost", "/index.html")
            .is_some_and(|(c, b)| c == 200 && b == "hello from vm2\n")
    });
    // Several passes later, still the one VM it adopted.
    let passes = d.passes();
    wait(30, "two more passes", &d, || d.passes() >= passes + 2);
    assert_eq!(vms(&d.state()), first, "the same single VM, adopted");
    assert!(foreign.alive(), "the foreign QEMU is untouched");
}
