//! Image pulls for the docker provider against a real registry: Debian's `docker-registry`
//! (the Registry API v2) on a loopback port below 32768, with htpasswd authentication and
//! without, driven through a private Podman (`PrivatePodman`, its own storage, so every pull is
//! a real one) whose own registries.conf marks the registry `insecure`: it serves plain HTTP on
//! loopback, and a registries.conf private to the test changes nothing else on the machine
//! (a self-signed certificate would have to be trusted machine-wide, in
//! /etc/containers/certs.d).
//!
//! A registry that cannot start fails the test (`.ci/run` installs docker-registry and
//! apache2-utils, whose `htpasswd` makes the bcrypt password file).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::daemon_support::{Daemon, wait_for};
use crate::podman_support::{IMAGE, PrivatePodman};

const USER: &str = "vessel-puller";
const PASSWORD: &str = "reg-pass-Vx71q";
const WRONG: &str = "reg-wrong-Kd09z";
const LIMIT: Duration = Duration::from_secs(90);

/// A `docker-registry serve` of this test's own; killed when dropped.
struct Registry {
    child: Child,
    dir: tempfile::TempDir,
    /// `127.0.0.1:PORT`, as image names spell it.
    addr: String,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Registry {
    /// A registry on a free loopback port below 32768, with htpasswd auth for `auth`.
    fn start(auth: Option<(&str, &str)>) -> Registry {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_low_port();
        let addr = format!("127.0.0.1:{port}");
        let mut config = format!(
            "version: 0.1\nlog: {{level: info}}\nstorage:\n  filesystem: {{rootdirectory: '{}'}}\n  delete: {{enabled: true}}\nhttp: {{addr: '{addr}', secret: vessel-test}}\n",
            dir.path().join("data").display()
        );
        if let Some((user, password)) = auth {
            let out = Command::new("htpasswd")
                .args(["-Bbn", user, password])
                .output()
                .expect("htpasswd runs (apache2-utils; .ci/run installs it)");
            assert!(out.status.success(), "htpasswd: {out:?}");
            std::fs::write(dir.path().join("htpasswd"), &out.stdout).expect("htpasswd file");
            config.push_str(&format!(
                "auth:\n  htpasswd: {{realm: vessel-test, path: '{}'}}\n",
                dir.path().join("htpasswd").display()
            ));
        }
        std::fs::write(dir.path().join("config.yml"), config).expect("config");
        let log = std::fs::File::create(dir.path().join("registry.log")).expect("log");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("docker-registry runs (Debian package docker-registry; .ci/run installs it)");
        let mut r = Registry { child, dir, addr };
        let t0 = Instant::now();
        loop {
            if let Ok(Some(status)) = r.child.try_wait() {
                panic!(
                    "docker-registry exited ({status}) on {}:\n{}",
                    r.addr,
                    r.log()
                );
            }
            if r.answers() {
                return r;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "docker-registry does not answer on {}:\n{}",
                r.addr,
                r.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `GET /v2/` answers (200, or 401 with auth).
    fn answers(&self) -> bool {
        let Ok(mut s) = std::net::TcpStream::connect(&self.addr) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        if write!(s, "GET /v2/ HTTP/1.0\r\nHost: {}\r\n\r\n", self.addr).is_err() {
            return false;
        }
        let mut buf = String::new();
        let _ = s.read_to_string(&mut buf);
        buf.starts_with("HTTP/1.0 200") || buf.starts_with("HTTP/1.0 401")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// How many times a manifest of `repo` was fetched (a pull asks for one; a push does not
    /// GET it).
    fn manifest_gets(&self, repo: &str) -> usize {
        let needle = format!("\"GET /v2/{repo}/manifests/");
        self.log()
            .lines()
            .filter(|l| l.contains(&needle) && (l.contains("\" 200 ") || l.contains("\" 304 ")))
            .count()
    }
}

/// A loopback port below 32768 that nothing listens on now (the registry binds it next).
fn free_low_port() -> u16 {
    static N: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let start = 21_000 + (std::process::id() % 5_000) as u16 * 2;
    for i in 0..2_000u16 {
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p = 21_000 + (start - 21_000 + n.wrapping_mul(37) + i) % 11_000;
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
    panic!("no free loopback port below 32768");
}

/// Push the test image to `reg` as `repo:tag` (with credentials when it needs them).
fn push(pod: &PrivatePodman, reg: &Registry, repo: &str, creds: Option<&str>) {
    let dest = format!("{}/{repo}", reg.addr);
    let mut args = vec!["push", "--tls-verify=false"];
    if let Some(c) = creds {
        args.extend(["--creds", c]);
    }
    args.extend([IMAGE, dest.as_str()]);
    pod.cli(&args);
}

/// A daemon (not started) whose sessions are containers on `pod`, with `registries` (YAML)
/// in the docker provider's config.
fn daemon(pod: &PrivatePodman, registries: &str) -> Daemon {
    let d = Daemon::new();
    let config = format!(
        "source: {{dir: desired}}\nstate_dir: state\nproviders:\n  compute:\n    docker:\n      hosts: [{{name: local, endpoint: '{}'}}]\n      instance: pulls\n      transfer_timeout: 60s\n{registries}  proxy:\n    embedded: {{listen: '{}'}}\nstatus: {{listen: '{}'}}\npolicy:\n  resync_interval: 2s\n",
        pod.endpoint(),
        d.proxy,
        d.status
    );
    std::fs::write(d.dir.path().join("vessel.yaml"), config).expect("config");
    let _ = std::fs::remove_file(d.source().join("plan.yaml"));
    d
}

fn plan(name: &str, image: &str, extra: &str) -> String {
    format!(
        "kind: Plan\nname: {name}\ncompute: docker\nimage: {image}\n{extra}command: [/bin/busybox, httpd, -f, -p, '{{port.ide}}', -h, /]\nports: {{ide: 8080}}\nstop_timeout: 2s\n"
    )
}

/// `GET /sessions` entry of `name` (Null while absent).
fn session_view(d: &Daemon, name: &str) -> Value {
    let list = crate::status::json(d.status, "/sessions");
    list.as_array()
        .and_then(|l| l.iter().find(|s| s["name"] == name))
        .cloned()
        .unwrap_or(Value::Null)
}

fn condition(v: &Value, kind: &str) -> Option<bool> {
    v["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
        .and_then(|c| c["status"].as_bool())
}

/// The image a container was made from, if it exists.
fn image_of(pod: &PrivatePodman, container: &str) -> Option<String> {
    pod.running().contains(&container.to_string()).then(|| {
        pod.cli(&["inspect", "--format", "{{.ImageName}}", container])
            .trim()
            .to_string()
    })
}

fn wait(d: &Daemon, what: &str, f: impl FnMut() -> bool) {
    if wait_for(LIMIT, f).is_none() {
        panic!("{what} within {LIMIT:?}; vessel's log:\n{}", d.log());
    }
}

/// Every file under `dir`, read as text (lossy).
fn all_text(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&p) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path) {
                out.push((path, String::from_utf8_lossy(&bytes).into_owned()));
            }
        }
    }
    out
}

#[test]
fn registry_with_authentication_pulls_with_the_configured_secret_and_a_failed_pull_destroys_nothing()
 {
    let reg = Registry::start(Some((USER, PASSWORD)));
    let pod = PrivatePodman::start_with_insecure_registries(&[reg.addr.as_str()]);
    let creds = format!("{USER}:{PASSWORD}");
    push(&pod, &reg, "team/box:1", Some(&creds));
    push(&pod, &reg, "team/box:2", Some(&creds));
    // Nothing local: the session's image can only come from the registry.
    pod.cli(&["rmi", "-f", IMAGE]);
    let mut d = daemon(
        &pod,
        &format!(
            "      registries:\n        '{}': {{username: {USER}, password: {{file: registry-password}}}}\n",
            reg.addr
        ),
    );
    let secret_file = d.dir.path().join("registry-password");
    std::fs::write(&secret_file, format!("{PASSWORD}\n")).expect("secret");
    let one = format!("{}/team/box:1", reg.addr);
    let two = format!("{}/team/box:2", reg.addr);
    d.write("plan.yaml", &plan("web", &one, ""));
    d.write("s.yaml", "kind: Session\nname: puller\nplan: web\n");
    d.start();
    wait(
        &d,
        "the session runs the image pulled with the credentials",
        || image_of(&pod, "vessel-puller").as_deref() == Some(one.as_str()),
    );
    assert!(
        reg.manifest_gets("team/box") >= 1,
        "the registry served the pull:\n{}",
        reg.log()
    );
    wait(&d, "the session reads Ready", || {
        condition(&session_view(&d, "puller"), "Ready") == Some(true)
    });

    // A replace whose pull fails (the registry refuses the credentials now): held with the
    // registry's message, Stalled, and the old container is neither stopped nor removed.
    std::fs::write(&secret_file, format!("{WRONG}\n")).expect("secret");
    d.write("plan.yaml", &plan("web", &two, ""));
    let mut seen = Value::Null;
    wait(&d, "the failed pull shows in status", || {
        seen = session_view(&d, "puller");
        condition(&seen, "Stalled") == Some(true)
            && seen["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("pull") && e.contains(&two))
    });
    let error = seen["last_error"].as_str().unwrap_or_default().to_string();
    assert!(
        error.to_ascii_lowercase().contains("unauthorized")
            || error
                .to_ascii_lowercase()
                .contains("authentication required"),
        "the registry's own message: {error}"
    );
    assert_eq!(condition(&seen, "Reconciling"), Some(false), "{seen}");
    // Several tries later, still the old container, untouched.
    wait(&d, "a second failed try", || {
        session_view(&d, "puller")["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == "Stalled"))
            .and_then(|c| c["reason"].as_str())
            .is_some_and(|r| r.contains("failures in a row"))
    });
    assert_eq!(
        image_of(&pod, "vessel-puller").as_deref(),
        Some(one.as_str()),
        "nothing was destroyed"
    );

    // Secrets are never in the log, the state directory or anything status serves.
    let served: String = [
        "/sessions",
        "/status",
        "/events",
        "/plan",
        "/sessions/puller",
        "/",
    ]
    .iter()
    .map(|p| {
        let (_, _, body) = crate::status::call_auth(d.status, "GET", p, None);
        body
    })
    .collect();
    for secret in [PASSWORD, WRONG] {
        assert!(!d.log().contains(secret), "a password in vessel's log");
        assert!(!served.contains(secret), "a password served by status");
        for (path, text) in all_text(&d.state()) {
            assert!(!text.contains(secret), "a password in {}", path.display());
        }
    }

    // The credentials fixed: the replace goes through (the retry picks the new secret up).
    std::fs::write(&secret_file, format!("{PASSWORD}\n")).expect("secret");
    wait(&d, "the replace with the new image", || {
        image_of(&pod, "vessel-puller").as_deref() == Some(two.as_str())
    });
}

#[test]
fn registry_pull_policies_missing_always_never_and_an_unknown_image() {
    let reg = Registry::start(None);
    let pod = PrivatePodman::start_with_insecure_registries(&[reg.addr.as_str()]);
    push(&pod, &reg, "open/box:1", None);
    pod.cli(&["rmi", "-f", IMAGE]);
    let image = format!("{}/open/box:1", reg.addr);
    let mut d = daemon(&pod, "");
    d.write("plan.yaml", &plan("web", &image, ""));
    d.write("a.yaml", "kind: Session\nname: pa\nplan: web\n");
    // `never`, with an image the engine does not have: never pulled, never made.
    d.write(
        "never.yaml",
        &plan(
            "offline",
            &format!("{}/open/elsewhere:1", reg.addr),
            "pull: never\n",
        ),
    );
    d.write("b.yaml", "kind: Session\nname: pb\nplan: offline\n");
    // An image the registry does not have: its message, in status.
    d.write(
        "gone.yaml",
        &plan("gone", &format!("{}/open/nope:1", reg.addr), ""),
    );
    d.write("c.yaml", "kind: Session\nname: pc\nplan: gone\n");
    d.start();
    wait(&d, "pa runs the pulled image", || {
        image_of(&pod, "vessel-pa").as_deref() == Some(image.as_str())
    });
    let mut b = Value::Null;
    wait(&d, "pb fails: not on the host, and never pulled", || {
        b = session_view(&d, "pb");
        b["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("pull: never"))
    });
    assert_eq!(condition(&b, "Stalled"), Some(true), "{b}");
    let mut c = Value::Null;
    wait(&d, "pc fails with the registry's message", || {
        c = session_view(&d, "pc");
        c["last_error"].as_str().is_some_and(|e| e.contains("nope"))
    });
    let e = c["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_ascii_lowercase();
    assert!(
        e.contains("manifest unknown") || e.contains("not found"),
        "the registry's message: {e}"
    );
    assert!(
        !reg.log().contains("/v2/open/elsewhere/manifests"),
        "never pulled"
    );
    let running = pod.running();
    assert!(
        !running.iter().any(|n| n == "vessel-pb" || n == "vessel-pc"),
        "{running:?}"
    );

    // `missing` with the image there: no pull; `always`: a pull even so.
    let before = reg.manifest_gets("open/box");
    d.write("d.yaml", "kind: Session\nname: pd\nplan: web\n");
    wait(&d, "pd runs", || image_of(&pod, "vessel-pd").is_some());
    assert_eq!(
        reg.manifest_gets("open/box"),
        before,
        "missing: not pulled again"
    );
    d.write("fresh.yaml", &plan("fresh", &image, "pull: always\n"));
    d.write("e.yaml", "kind: Session\nname: pe\nplan: fresh\n");
    wait(&d, "pe runs", || image_of(&pod, "vessel-pe").is_some());
    assert!(
        reg.manifest_gets("open/box") > before,
        "always: pulled again\n{}",
        reg.log()
    );
    assert!(d.log().contains("pulled image"), "{}", d.log());

    // `never` on a replace: the new image is looked for first, and as the engine lacks it,
    // the old container stays as it is.
    d.write("pinned.yaml", &plan("pinned", &image, "pull: never\n"));
    d.write("f.yaml", "kind: Session\nname: pf\nplan: pinned\n");
    wait(&d, "pf runs the image already there", || {
        image_of(&pod, "vessel-pf").is_some()
    });
    let absent = format!("{}/open/absent:1", reg.addr);
    d.write("pinned.yaml", &plan("pinned", &absent, "pull: never\n"));
    wait(&d, "pf's replace is held: its image is not there", || {
        session_view(&d, "pf")["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("pull: never") && e.contains(&absent))
    });
    assert_eq!(
        image_of(&pod, "vessel-pf").as_deref(),
        Some(image.as_str()),
        "nothing was destroyed"
    );
    assert!(
        !reg.log().contains("/v2/open/absent/manifests"),
        "never pulled"
    );
}

/// A loopback relay to `target` that sends what comes back slowly (16 KiB per 10 ms), so a
/// pull through it takes long enough to be watched. It lives as long as the test process.
fn slow_relay(target: &str) -> String {
    let port = free_low_port();
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).expect("relay binds");
    let target = target.to_string();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(upstream) = std::net::TcpStream::connect(&target) else {
                continue;
            };
            let (Ok(mut c_read), Ok(mut u_write)) = (client.try_clone(), upstream.try_clone())
            else {
                continue;
            };
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c_read, &mut u_write);
                let _ = u_write.shutdown(std::net::Shutdown::Write);
            });
            let (mut u_read, mut c_write) = (upstream, client);
            std::thread::spawn(move || {
                let mut buf = [0u8; 16 << 10];
                while let Ok(n) = u_read.read(&mut buf) {
                    if n == 0 || c_write.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                let _ = c_write.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    format!("127.0.0.1:{port}")
}

#[test]
fn registry_pull_progress_shows_in_status_while_it_runs() {
    let reg = Registry::start(None);
    let relay = slow_relay(&reg.addr);
    let pod = PrivatePodman::start_with_insecure_registries(&[reg.addr.as_str(), relay.as_str()]);
    // An image of about 6 MB: busybox and 4 MiB of noise, so the slow pull takes seconds.
    let mut noise = vec![0u8; 4 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for b in noise.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    pod.import_busybox_with("localhost/big:1", &[("noise", &noise)]);
    let pushed = format!("{}/open/big:1", reg.addr);
    pod.cli(&["push", "--tls-verify=false", "localhost/big:1", &pushed]);
    pod.cli(&["rmi", "-f", "localhost/big:1", IMAGE]);
    let image = format!("{relay}/open/big:1");
    let mut d = daemon(&pod, "");
    d.write("plan.yaml", &plan("web", &image, ""));
    d.write("a.yaml", "kind: Session\nname: slow\nplan: web\n");
    d.start();
    let mut progress: Vec<String> = Vec::new();
    wait(&d, "the session runs the slowly pulled image", || {
        if let Some(a) = session_view(&d, "slow")["activity"].as_str()
            && progress.last().map(String::as_str) != Some(a)
        {
            progress.push(a.to_string());
        }
        image_of(&pod, "vessel-slow").is_some()
    });
    assert!(
        progress
            .iter()
            .any(|p| p.starts_with(&format!("pulling {image} on local"))),
        "the pull's progress was in status while it ran: {progress:?}; vessel's log:\n{}",
        d.log()
    );
    assert!(
        progress.iter().any(|p| p.contains(" MB")),
        "layers and megabytes done: {progress:?}"
    );
    // Once done, nothing is said to be happening (status reads the provider's activity through
    // a channel: allow it a moment to catch up on a loaded machine).
    assert!(
        wait_for(Duration::from_secs(10), || {
            session_view(&d, "slow")["activity"].is_null()
        })
        .is_some(),
        "{}",
        session_view(&d, "slow")
    );
}
