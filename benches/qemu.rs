//! QEMU microVM sessions (issue 16), against a running daemon (release binary), side by side
//! with the floor measured in the same run:
//!
//! - boot to serving: 10 sessions created one after another, each timed from its file being
//!   written to its page answering through the proxy, next to 10 bare `qemu-system-x86_64`
//!   boots of the same kernel and initramfs started by a shell script until the forwarded
//!   port answers (the floor; target floor + 150 ms at p50);
//! - wake from pause: 10 requests to a paused VM until their answer (target under 50 ms at
//!   p50);
//! - 10 VMs from empty (10 session files at once, until all answer) against 10 sequential
//!   bare boots (target at most 0.5x), and against 10 bare boots at once (what the machine's
//!   cores allow);
//! - resident memory per VM (VmRSS of the 10 QEMU processes).
//!
//! Needs QEMU and the example image (`examples/microvm/build-image.sh`, or `.ci/run`).
//! Run: `cargo bench --bench qemu`. Prints its figures.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{Kill, free_port, get, ms, percentile, wait_for};

const N: usize = 10;

static NEXT_BASE: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);

const PLAN: &str = "kind: Plan
name: vm
compute: qemu
image: devbox
memory: 128MiB
command: [httpd, -f, -p, '{port.ide}', -h, /workspace]
ports: {ide: 8080}
stop_timeout: 5s
";

fn images() -> PathBuf {
    let dir = std::env::var_os("VESSEL_MICROVM_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/vessel/microvm")
        });
    assert!(
        dir.join("devbox/vmlinuz").is_file(),
        "no image in {} (examples/microvm/build-image.sh)",
        dir.display()
    );
    dir
}

struct Daemon {
    dir: tempfile::TempDir,
    proxy: SocketAddr,
    _child: Kill,
}

impl Daemon {
    fn new(plan_extra: &str) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        std::fs::create_dir_all(d.join("desired")).expect("mkdir");
        std::fs::create_dir_all(d.join("project")).expect("mkdir");
        std::fs::write(d.join("project/index.html"), "hello\n").expect("page");
        std::fs::write(d.join("desired/plan.yaml"), format!("{PLAN}{plan_extra}")).expect("plan");
        let proxy = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let status = SocketAddr::from(([127, 0, 0, 1], free_port()));
        std::fs::write(
            d.join("vessel.yaml"),
            format!(
                "source: {{dir: desired}}\nstate_dir: state\nproviders:\n  compute:\n    qemu: {{images: '{}', port_base: {}}}\n  proxy:\n    embedded: {{listen: '{proxy}'}}\nstatus: {{listen: '{status}'}}\nlifecycle: {{check_interval: 20ms}}\npolicy: {{allow_empty_source: true, resync_interval: 1s, destroy_budget: {{max_count: 100, max_percent: 100}}}}\n",
                images().display(),
                // VM ports in a range of their own, above the ports `free_port` hands out.
                22000 + 100 * NEXT_BASE.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            ),
        )
        .expect("config");
        let log = std::fs::File::create(d.join("vessel.log")).expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_vessel"))
            .args(["run", "vessel.yaml"])
            .current_dir(d)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("vessel runs");
        wait_for(Duration::from_secs(15), || {
            std::net::TcpStream::connect(proxy).is_ok()
        })
        .expect("the proxy listens");
        Daemon {
            dir,
            proxy,
            _child: Kill(child),
        }
    }

    fn add(&self, name: &str) {
        let d = self.dir.path();
        let tmp = d.join(format!("desired/.{name}.tmp"));
        std::fs::write(
            &tmp,
            format!(
                "kind: Session\nname: {name}\nplan: vm\nsource: {{path: {}}}\n",
                d.join("project").display()
            ),
        )
        .expect("session");
        std::fs::rename(tmp, d.join(format!("desired/{name}.yaml"))).expect("rename");
    }

    fn remove(&self, name: &str) {
        let _ = std::fs::remove_file(self.dir.path().join(format!("desired/{name}.yaml")));
    }

    fn serves(&self, name: &str) -> bool {
        get(self.proxy, &format!("{name}.localhost"), "/index.html")
            .is_some_and(|(c, b)| c == 200 && b.ends_with("hello\n"))
    }

    fn wait_serves(&self, name: &str) {
        wait_for(Duration::from_secs(180), || self.serves(name)).unwrap_or_else(|| {
            panic!(
                "{name} never serves; log:\n{}",
                std::fs::read_to_string(self.dir.path().join("vessel.log")).unwrap_or_default()
            )
        });
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// QEMU pids of this daemon's VMs.
    fn vm_pids(&self) -> Vec<i32> {
        let needle = self
            .state()
            .canonicalize()
            .unwrap_or(self.state())
            .display()
            .to_string();
        pids_with(&needle)
    }

    fn wait_gone(&self) {
        wait_for(Duration::from_secs(120), || self.vm_pids().is_empty()).expect("VMs destroyed");
    }
}

/// Live processes whose argv has an argument containing `needle`.
fn pids_with(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(c) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        if c.split(|b| *b == 0)
            .any(|a| String::from_utf8_lossy(a).contains(needle))
        {
            out.push(pid);
        }
    }
    out
}

fn rss_kib(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The floor: the same kernel and initramfs booted by a shell script with plain QEMU, user
/// networking forwarding one port, the workspace shared the same way; timed until the page
/// answers.
fn bare_boot(images: &Path, work: &Path) -> Duration {
    let port = free_port();
    let run = "exec httpd -f -p 8080 -h /workspace\n";
    let b64 = {
        // The guest's script, as vessel passes it (base64 on the kernel command line).
        let out = Command::new("base64")
            .arg("-w0")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().expect("stdin").write_all(run.as_bytes())?;
                c.wait_with_output()
            })
            .expect("base64");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let script = format!(
        "exec qemu-system-x86_64 -M pc -accel tcg -m 128 -nodefaults -no-user-config -display none -no-reboot \
         -kernel {img}/devbox/vmlinuz -initrd {img}/devbox/initrd.img \
         -append 'console=ttyS0 quiet loglevel=1 panic=-1 vessel.session=bare vessel.run={b64}' \
         -serial null -netdev user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:8080 -device virtio-net-pci,netdev=n0 \
         -fsdev local,id=ws,path={ws},security_model=none -device virtio-9p-pci,fsdev=ws,mount_tag=workspace",
        img = images.display(),
        ws = work.display(),
    );
    let t = Instant::now();
    let child = Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu");
    let _k = Kill(child);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_for(Duration::from_secs(120), || {
        get(addr, "x", "/index.html").is_some_and(|(c, _)| c == 200)
    })
    .expect("the bare VM serves");
    t.elapsed()
}

fn main() {
    let images = images();
    let work = tempfile::tempdir().expect("tempdir");
    std::fs::write(work.path().join("index.html"), "hello\n").expect("page");

    // The floor: 10 sequential bare boots.
    let mut floor: Vec<Duration> = (0..N).map(|_| bare_boot(&images, work.path())).collect();
    let floor_total: Duration = floor.iter().sum();
    // What this machine does with 10 bare boots at once: on few cores TCG boots share them,
    // so this is the floor for 10 VMs from empty.
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..N {
            s.spawn(|| bare_boot(&images, work.path()));
        }
    });
    let bare_parallel = t.elapsed();

    // Boot to serving through vessel, one after another.
    let d = Daemon::new("");
    let mut boots = Vec::new();
    for i in 0..N {
        let name = format!("b{i}");
        let t = Instant::now();
        d.add(&name);
        d.wait_serves(&name);
        boots.push(t.elapsed());
        d.remove(&name);
        d.wait_gone();
    }
    println!(
        "qemu: boot to serving through vessel over {N}: p50 {} p95 {}; bare qemu script (floor): p50 {} p95 {}",
        ms(percentile(&mut boots, 0.5)),
        ms(percentile(&mut boots, 0.95)),
        ms(percentile(&mut floor, 0.5)),
        ms(percentile(&mut floor, 0.95)),
    );

    // 10 VMs from empty, all at once.
    let t = Instant::now();
    for i in 0..N {
        d.add(&format!("m{i}"));
    }
    for i in 0..N {
        d.wait_serves(&format!("m{i}"));
    }
    let all = t.elapsed();
    let rss: Vec<u64> = d.vm_pids().into_iter().filter_map(rss_kib).collect();
    println!(
        "qemu: {N} VMs from empty {} against {N} sequential bare boots {} ({:.2}x); {N} bare boots at once {} ({:.2}x of sequential; vessel {:.2}x of it) on {} cores",
        ms(all),
        ms(floor_total),
        all.as_secs_f64() / floor_total.as_secs_f64(),
        ms(bare_parallel),
        bare_parallel.as_secs_f64() / floor_total.as_secs_f64(),
        all.as_secs_f64() / bare_parallel.as_secs_f64(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    if !rss.is_empty() {
        println!(
            "qemu: resident memory per VM (128 MiB guests, {} VMs): mean {} MiB, max {} MiB",
            rss.len(),
            rss.iter().sum::<u64>() / rss.len() as u64 / 1024,
            rss.iter().max().copied().unwrap_or(0) / 1024
        );
    }
    for i in 0..N {
        d.remove(&format!("m{i}"));
    }
    d.wait_gone();
    drop(d);

    // Wake from pause.
    let d = Daemon::new("idle_timeout: 1s\nsleep: pause\n");
    d.add("w");
    d.wait_serves("w");
    let sock = d.state().join("qemu/w/qmp.sock");
    let mut wakes = Vec::new();
    for _ in 0..N {
        wait_for(Duration::from_secs(60), || paused(&sock)).expect("paused when idle");
        std::thread::sleep(Duration::from_millis(100));
        let t = Instant::now();
        assert!(d.serves("w"), "a paused VM answers");
        wakes.push(t.elapsed());
    }
    println!(
        "qemu: wake from pause over {N}: p50 {} p95 {}",
        ms(percentile(&mut wakes, 0.5)),
        ms(percentile(&mut wakes, 0.95))
    );
    d.remove("w");
    d.wait_gone();
}

/// Is the VM behind `sock` paused (QMP `query-status`)?
fn paused(sock: &Path) -> bool {
    use std::io::{BufRead, BufReader, Write};
    let Ok(s) = std::os::unix::net::UnixStream::connect(sock) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let Ok(mut w) = s.try_clone() else {
        return false;
    };
    let mut r = BufReader::new(s);
    let _ = writeln!(w, "{{\"execute\": \"qmp_capabilities\"}}");
    let _ = writeln!(w, "{{\"execute\": \"query-status\"}}");
    let mut line = String::new();
    for _ in 0..10 {
        line.clear();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return false;
        }
        if line.contains("\"status\"") {
            return line.contains("\"paused\"");
        }
    }
    false
}
