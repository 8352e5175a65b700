//! A real Podman engine for the docker provider's tests: one `podman system service` on a
//! socket in a temporary directory, started once per test binary run (and stopped when the
//! test binary exits), with the settings that work on these machines (runc, cgroupfs, file
//! events, no default ulimits) in a containers.conf of its own, and a busybox image imported
//! from a local rootfs (there is no registry).
//!
//! Podman that cannot start fails the tests that need it: they never skip (`.ci/run` installs
//! podman, runc and busybox-static).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const IMAGE: &str = "localhost/busybox:test";

pub struct Podman {
    pub dir: PathBuf,
    pub socket: PathBuf,
}

const CONTAINERS_CONF: &str = "[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n";

/// The shared engine; panics (the test fails) when Podman cannot be started.
pub fn podman() -> &'static Podman {
    static POD: OnceLock<Result<Podman, String>> = OnceLock::new();
    match POD.get_or_init(start) {
        Ok(p) => p,
        Err(e) => panic!(
            "Podman cannot start, and the docker provider's tests need it (`bash .ci/run` installs podman, runc and busybox-static): {e}"
        ),
    }
}

impl Podman {
    /// Run the podman CLI against the same storage and settings; its stdout, or the error.
    pub fn try_cli(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("podman")
            .args(args)
            .env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .output()
            .map_err(|e| format!("cannot run podman: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "podman {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    pub fn cli(&self, args: &[&str]) -> String {
        self.try_cli(args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `podman inspect` of one container, as JSON.
    pub fn inspect(&self, name: &str) -> Option<serde_json::Value> {
        let out = self.try_cli(&["container", "inspect", name]).ok()?;
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        v.get(0).cloned()
    }

    /// Ids of the containers with `label=value`.
    pub fn ids_with_label(&self, label: &str) -> Vec<String> {
        self.cli(&[
            "ps",
            "-aq",
            "--no-trunc",
            "--filter",
            &format!("label={label}"),
        ])
        .lines()
        .map(str::to_string)
        .collect()
    }

    pub fn state(&self, name: &str) -> Option<String> {
        self.inspect(name)?
            .pointer("/State/Status")?
            .as_str()
            .map(str::to_string)
    }

    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }
}

/// Removes a test's containers (by the instance's marker, and by name) when dropped.
pub struct Cleanup {
    pub instance: String,
    pub names: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let p = podman();
        let mut ids = p.ids_with_label(&format!("vessel.managed-by={}", self.instance));
        ids.extend(self.names.iter().cloned());
        for id in ids {
            let _ = p.try_cli(&["rm", "-f", "-v", "-t", "0", &id]);
        }
    }
}

fn start() -> Result<Podman, String> {
    Command::new("podman")
        .arg("--version")
        .output()
        .map_err(|e| format!("podman is not installed: {e}"))?;
    let dir = std::env::temp_dir().join(format!("vessel-podman-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("containers.conf"), CONTAINERS_CONF).map_err(|e| e.to_string())?;
    let pod = Podman {
        socket: dir.join("podman.sock"),
        dir,
    };
    if pod.try_cli(&["image", "exists", IMAGE]).is_err() {
        import_busybox(&pod)?;
    }
    // The service lives as long as this test binary: a shell watches our pid and ends it.
    let log = std::fs::File::create(pod.dir.join("service.log")).map_err(|e| e.to_string())?;
    Command::new("sh")
        .arg("-c")
        .arg(
            "podman system service -t 0 \"unix://$1\" & p=$!; \
             while kill -0 \"$2\" 2>/dev/null && kill -0 $p 2>/dev/null; do sleep 1; done; \
             kill $p 2>/dev/null; rm -rf \"$3\"",
        )
        .arg("sh")
        .arg(&pod.socket)
        .arg(std::process::id().to_string())
        .arg(&pod.dir)
        .env("CONTAINERS_CONF", pod.dir.join("containers.conf"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start podman system service: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if ping(&pod.socket) {
            return Ok(pod);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!(
        "podman system service did not answer on {} within 30 s; its log:\n{}",
        pod.socket.display(),
        std::fs::read_to_string(pod.dir.join("service.log")).unwrap_or_default()
    ))
}

fn ping(socket: &Path) -> bool {
    let Ok(mut s) = UnixStream::connect(socket) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /_ping HTTP/1.0\r\nHost: d\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.starts_with("HTTP/1.0 200") || buf.starts_with("HTTP/1.1 200")
}

/// An image with just busybox in it, from a local rootfs.
fn import_busybox(pod: &Podman) -> Result<(), String> {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .ok_or("busybox is not installed (apt-get install busybox-static)")?;
    let root = pod.dir.join("rootfs");
    std::fs::create_dir_all(root.join("bin")).map_err(|e| e.to_string())?;
    std::fs::copy(busybox, root.join("bin/busybox")).map_err(|e| e.to_string())?;
    let tar = pod.dir.join("busybox.tar");
    let out = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    pod.try_cli(&["import", tar.to_str().unwrap_or_default(), IMAGE])
        .map(|_| ())
}

/// A Podman service of one test's own, with its own storage (`--root`, `--runroot`), socket and
/// registries.conf, that the test may stop, freeze and start again without touching the
/// shared one.
pub struct PrivatePodman {
    pub dir: PathBuf,
    pub socket: PathBuf,
    service: Option<std::process::Child>,
}

impl PrivatePodman {
    pub fn start() -> PrivatePodman {
        PrivatePodman::start_with_insecure_registries(&[])
    }

    /// A private Podman that reaches the registries at `insecure` (`127.0.0.1:PORT`) over plain
    /// HTTP: its own registries.conf (`CONTAINERS_REGISTRIES_CONF`) marks them `insecure`, as a
    /// test registry on loopback serves no TLS. Nothing outside this test's Podman changes.
    pub fn start_with_insecure_registries(insecure: &[&str]) -> PrivatePodman {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "vessel-podman-own-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("containers.conf"), CONTAINERS_CONF).expect("conf");
        let registries: String = insecure
            .iter()
            .map(|r| format!("[[registry]]\nlocation = \"{r}\"\ninsecure = true\n\n"))
            .collect();
        std::fs::write(dir.join("registries.conf"), registries).expect("registries.conf");
        let mut p = PrivatePodman {
            socket: dir.join("podman.sock"),
            dir,
            service: None,
        };
        // The image, imported into this storage.
        p.import_busybox_with(IMAGE, &[]);
        p.resume();
        p
    }

    /// Import an image of busybox plus `files` (path in the image, contents) as `image`.
    pub fn import_busybox_with(&self, image: &str, files: &[(&str, &[u8])]) {
        let busybox = ["/bin/busybox", "/usr/bin/busybox"]
            .into_iter()
            .find(|b| Path::new(b).exists())
            .expect("busybox is installed (apt-get install busybox-static)");
        let work = tempfile::tempdir_in(&self.dir).expect("tempdir");
        let root = work.path().join("rootfs");
        std::fs::create_dir_all(root.join("bin")).expect("mkdir");
        std::fs::copy(busybox, root.join("bin/busybox")).expect("copy");
        for (path, bytes) in files {
            std::fs::write(root.join(path), bytes).expect("write");
        }
        let tar = work.path().join("image.tar");
        let ok = Command::new("tar")
            .arg("-C")
            .arg(&root)
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "tar");
        self.cli(&["import", tar.to_str().unwrap_or_default(), image]);
    }

    /// `podman` on this storage, with this test's settings.
    fn podman(&self) -> Command {
        let mut c = Command::new("podman");
        c.arg("--root")
            .arg(self.dir.join("storage"))
            .arg("--runroot")
            .arg(self.dir.join("run"))
            .env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .env(
                "CONTAINERS_REGISTRIES_CONF",
                self.dir.join("registries.conf"),
            );
        c
    }

    pub fn cli(&self, args: &[&str]) -> String {
        let out = self.podman().args(args).output().expect("podman runs");
        assert!(
            out.status.success(),
            "podman {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Start the service (again) on the same socket, and wait until it answers.
    pub fn resume(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        let log = std::fs::File::create(self.dir.join("service.log")).expect("log");
        let child = self
            .podman()
            .args(["system", "service", "-t", "0"])
            .arg(format!("unix://{}", self.socket.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("podman system service starts");
        self.service = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ping(&self.socket) {
            assert!(Instant::now() < deadline, "the private podman answers");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stop the service (its containers keep running under their monitors).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.service.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        if let Some(c) = &self.service {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), sig);
        }
    }

    /// Freeze the service: it accepts connections and answers nothing.
    pub fn freeze(&self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
    }

    pub fn thaw(&self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
    }

    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// Names of the containers in this storage, running or not.
    pub fn containers(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .cli(&["ps", "-a", "--format", "{{.Names}}"])
            .lines()
            .map(str::to_string)
            .collect();
        v.sort();
        v
    }

    pub fn running(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .cli(&["ps", "--format", "{{.Names}}"])
            .lines()
            .map(str::to_string)
            .collect();
        v.sort();
        v
    }
}

impl Drop for PrivatePodman {
    fn drop(&mut self) {
        self.thaw();
        let _ = self
            .podman()
            .args(["rm", "-a", "-f", "-v", "-t", "0"])
            .output();
        let _ = self.podman().args(["rmi", "-a", "-f"]).output();
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
