//! The `qemu` compute provider: a session is a QEMU VM named `vessel-<session>`, booted from a
//! kernel and initramfs (and, where the image has one, a disk under a per-session
//! copy-on-write overlay), with the plan's ports forwarded from 127.0.0.1 by QEMU's user
//! network, and the session's workspace shared into it over virtio-9p.
//!
//! Layout: `<state>/qemu/<name>/` holds `session.json` (the spec, the host ports, the pid and
//! its start time, the accelerator; written atomically), `workspace/` (the 9p share, mounted
//! at `/workspace` in the guest), `qmp.sock`, `qemu.pid`, `qemu.log` (QEMU's own messages),
//! `console.log` (the serial console)
//! and `overlay.qcow2` where the image has a disk. The directory is vessel's.
//!
//! The guest learns its session, env and command from the kernel command line
//! (`vessel.session=`, `vessel.run=` a base64 shell script of exports and the command): the
//! images this provider boots are minimal (busybox as PID 1, `examples/microvm/init`), which
//! read it in a few lines of shell. Cloud-init NoCloud seeds are not written (not done: a
//! cloud image's boot takes far longer than the kernel-and-initramfs one this is built for).
//!
//! Ownership: every VM carries `vessel.key=<state dir hash>-<session>` on its kernel command
//! line (so in its process's argv). A VM whose pid was not recorded (vessel killed between
//! spawn and write) is found by it and adopted, never started twice; a QEMU process without
//! it is never looked at again, let alone touched.
//!
//! Control is through each VM's QMP socket: `system_powerdown` for a graceful stop (the guest
//! stops its command, flushes and unmounts the workspace and powers off), `quit` after the
//! stop timeout; `stop`/`cont` for the `pause` sleep depth. Work is saved only after the guest
//! powered off by itself: a guest that does not is left running and the save fails, so
//! nothing half-flushed is ever saved over the project.

mod config;
pub mod qmp;

pub use config::{Accel, QemuConfig};

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::model::observed::{ObservedSession, RuntimeSpec, SessionState};
use crate::model::plan::SessionAction;
use crate::model::{ComputeKind, Health};

use super::process::{alive, allocate_in, clean_trash, list_dirs, proc_stat};
use super::{
    BoxFut, ComputeProvider, CreateArgs, Intent, ProviderError, SessionSteps, Synced, no_symlinks,
};

const RECORD: &str = "session.json";
/// The kernel's command line limit on x86 (`COMMAND_LINE_SIZE`).
const MAX_CMDLINE: usize = 2048;
/// How long one QMP call may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(5);

/// `session.json`: the process provider's record (the spec, host ports, pid and start time,
/// intent, what was synced), and the accelerator.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    #[serde(flatten)]
    base: super::process::Record,
    /// The accelerator it was last started on (`kvm` or `tcg`).
    #[serde(default)]
    accel: Option<String>,
}

impl std::ops::Deref for Record {
    type Target = super::process::Record;
    fn deref(&self) -> &Self::Target {
        &self.base
    }
}

impl std::ops::DerefMut for Record {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.base
    }
}

#[derive(Clone)]
pub struct QemuProvider {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    config: QemuConfig,
    /// `vessel.key=<hash>-`: this state directory's marker prefix.
    key_prefix: String,
    lock: Mutex<()>,
    kept: super::kept::Kept,
    changes: tokio::sync::watch::Sender<u64>,
    /// The accelerator VMs start on, probed once: (`kvm` or `tcg`, why).
    accel: tokio::sync::OnceCell<(&'static str, String)>,
    /// Pids watched for exit (to tick `changes`).
    watched: std::sync::Mutex<BTreeSet<i32>>,
    /// Per-session activity for status (the accelerator a VM runs on).
    activity: tokio::sync::watch::Sender<BTreeMap<String, String>>,
}

impl QemuProvider {
    /// A provider keeping its VMs' state under `root` (created if missing).
    pub fn new(
        root: PathBuf,
        config: QemuConfig,
        kept: super::kept::Kept,
    ) -> std::io::Result<QemuProvider> {
        use sha2::{Digest, Sha256};
        std::fs::create_dir_all(&root)?;
        let root = root.canonicalize()?;
        if root.to_string_lossy().contains(',') {
            // QEMU's option syntax splits on commas: a path with one cannot be passed.
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a qemu state directory may not contain a comma",
            ));
        }
        let hash = hex::encode(&Sha256::digest(root.as_os_str().as_encoded_bytes())[..6]);
        Ok(QemuProvider {
            inner: Arc::new(Inner {
                root,
                config,
                key_prefix: format!("vessel.key={hash}-"),
                lock: Mutex::new(()),
                kept,
                changes: tokio::sync::watch::channel(0).0,
                accel: tokio::sync::OnceCell::new(),
                watched: std::sync::Mutex::new(BTreeSet::new()),
                activity: tokio::sync::watch::channel(BTreeMap::new()).0,
            }),
        })
    }

    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    fn dir(&self, session: &str) -> PathBuf {
        self.inner.root.join(session)
    }

    /// The marker on a session's kernel command line.
    fn marker(&self, session: &str) -> String {
        format!("{}{session}", self.inner.key_prefix)
    }

    /// The accelerator VMs start on: KVM when configured, or when `auto` and a probe VM
    /// really starts on it (`/dev/kvm` existing is not enough: vCPU set-up can fail on an
    /// MSR), TCG otherwise. Probed once.
    pub async fn accel(&self) -> (&'static str, String) {
        self.inner
            .accel
            .get_or_init(|| async {
                match self.inner.config.accel {
                    Accel::Kvm => ("kvm", "configured".to_string()),
                    Accel::Tcg => ("tcg", "configured".to_string()),
                    Accel::Auto => match probe_kvm(&self.inner.config.binary).await {
                        Ok(()) => ("kvm", "probed".to_string()),
                        Err(e) => {
                            let why = crate::error_chain(&e);
                            tracing::info!("qemu: KVM does not work here ({why}); VMs run on TCG");
                            ("tcg", format!("KVM unusable: {why}"))
                        }
                    },
                }
            })
            .await
            .clone()
    }

    /// Stop every running VM (used at exit when `keep_on_exit` is false), several at once:
    /// each powers down in its own time.
    pub async fn stop_all(&self) {
        use futures_util::StreamExt;
        futures_util::stream::iter(list_dirs(&self.inner.root).unwrap_or_default())
            .for_each_concurrent(16, |n| async move {
                if let Err(e) = self.stop(&n, None).await {
                    tracing::warn!(session = %n, "at exit: {e}");
                }
            })
            .await;
    }

    /// Watch `pid` and tick `changes` when it exits.
    fn watch(&self, pid: i32, ticks: Option<u64>) {
        let Ok(mut w) = self.inner.watched.lock() else {
            return;
        };
        if !w.insert(pid) {
            return;
        }
        let inner = self.inner.clone();
        tokio::spawn(async move {
            while alive(Some(pid), ticks) {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            if let Ok(mut w) = inner.watched.lock() {
                w.remove(&pid);
            }
            inner.changes.send_modify(|v| *v += 1);
        });
    }

    fn set_activity(&self, session: &str, what: Option<String>) {
        self.inner.activity.send_modify(|m| match what {
            Some(w) => {
                m.insert(session.to_string(), w);
            }
            None => {
                m.remove(session);
            }
        });
    }
}

fn read_record(dir: &Path) -> Result<Option<Record>, ProviderError> {
    super::record::read(&dir.join(RECORD))
}

fn write_record(dir: &Path, r: &Record) -> Result<(), ProviderError> {
    super::record::write(&dir.join(RECORD), r)
}

/// Live processes whose argv carries a `vessel.key=` marker with `prefix`, by session, in
/// one pass over `/proc`.
fn marked_vms(prefix: &str) -> BTreeMap<String, Vec<i32>> {
    let mut out: BTreeMap<String, Vec<i32>> = BTreeMap::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let session = cmdline
            .split(|b| *b == 0)
            .filter_map(|a| std::str::from_utf8(a).ok())
            .flat_map(str::split_whitespace)
            .find_map(|t| t.strip_prefix(prefix).map(str::to_string));
        if let Some(s) = session
            && proc_stat(pid).is_some_and(|(st, _)| st != 'Z' && st != 'X')
        {
            out.entry(s).or_default().push(pid);
        }
    }
    out
}

/// Does KVM really start a VM here? A probe VM (stopped, no guest) either keeps running for a
/// moment (yes) or exits at once with QEMU's reason (no).
async fn probe_kvm(binary: &str) -> Result<(), ProviderError> {
    if !Path::new("/dev/kvm").exists() {
        return Err(ProviderError::failed("probe", "KVM", "no /dev/kvm"));
    }
    let child = tokio::process::Command::new(binary)
        .args([
            "-accel",
            "kvm",
            "-cpu",
            "max",
            "-M",
            "pc",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-m",
            "64",
            "-S",
            "-monitor",
            "none",
            "-serial",
            "none",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(ProviderError::io("start a KVM probe with", binary))?;
    match tokio::time::timeout(Duration::from_millis(1500), child.wait_with_output()).await {
        // Still running: KVM set the VM up. Dropping the wait kills it.
        Err(_) => Ok(()),
        Ok(Ok(out)) => {
            let text = String::from_utf8_lossy(&out.stderr);
            let first: String = text
                .lines()
                .next()
                .unwrap_or("it exited")
                .chars()
                .take(200)
                .collect();
            Err(ProviderError::failed("probe", "KVM", first))
        }
        Ok(Err(e)) => Err(ProviderError::io("wait for the KVM probe of", binary)(e)),
    }
}

/// Quote `s` for a POSIX shell.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Is `k` an environment variable name a shell can export?
fn env_name_ok(k: &str) -> bool {
    let mut chars = k.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The guest's script: the plan's env and ports as exports, then its command (placeholders
/// expanded for the guest: `{port.NAME}` is the guest port, `{workspace}` `/workspace`).
fn guest_script(session: &str, spec: &RuntimeSpec) -> Result<String, ProviderError> {
    let guest_ports: BTreeMap<String, u16> =
        spec.ports.iter().map(|(n, p)| (n.clone(), p.0)).collect();
    let argv: Vec<String> = spec
        .command
        .iter()
        .map(|a| {
            super::expand(a, |key| match key {
                "workspace" => Some(Ok("/workspace".to_string())),
                "session" => Some(Ok(session.to_string())),
                k => super::port_placeholder(k, &guest_ports),
            })
        })
        .collect::<Result<_, _>>()
        .map_err(|e| ProviderError::caused("start", session, Arc::new(e)))?;
    if argv.is_empty() {
        return Err(ProviderError::failed(
            "start",
            session,
            "the plan has no command",
        ));
    }
    let mut s = String::new();
    for (k, v) in &spec.env {
        if !env_name_ok(k) {
            return Err(ProviderError::failed(
                "start",
                session,
                format!("`{k}` is not an environment variable name a guest shell can set"),
            ));
        }
        s.push_str(&format!("export {k}={}\n", sh_quote(v)));
    }
    for (name, port) in &guest_ports {
        s.push_str(&format!("export PORT_{}={port}\n", super::env_name(name)));
    }
    if let Some(port) = spec.health_port().and_then(|n| guest_ports.get(n)) {
        s.push_str(&format!("export PORT={port}\n"));
    }
    s.push_str("exec");
    for a in &argv {
        s.push(' ');
        s.push_str(&sh_quote(a));
    }
    s.push('\n');
    Ok(s)
}

/// The last lines of a VM's serial console, for errors.
fn console_tail(dir: &Path) -> String {
    let text = std::fs::read(dir.join("console.log"))
        .map(|b| {
            let from = b.len().saturating_sub(4096);
            String::from_utf8_lossy(&b[from..]).into_owned()
        })
        .unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    if lines.is_empty() {
        return "(nothing)".into();
    }
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

/// Wait until `pid` is gone, at most `timeout`; is it gone?
async fn gone_within(pid: i32, ticks: Option<u64>, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if !alive(Some(pid), ticks) {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl QemuProvider {
    async fn observe_all(&self) -> Result<Vec<ObservedSession>, ProviderError> {
        let root = self.inner.root.clone();
        let prefix = self.inner.key_prefix.clone();
        let (records, marked) = tokio::task::spawn_blocking(move || {
            let names =
                list_dirs(&root).map_err(ProviderError::io("list", root.display().to_string()))?;
            clean_trash(&root);
            let records: Vec<(String, Result<Option<Record>, ProviderError>)> = names
                .into_iter()
                .map(|n| {
                    let r = read_record(&root.join(&n));
                    (n, r)
                })
                .collect();
            Ok::<_, ProviderError>((records, marked_vms(&prefix)))
        })
        .await
        .map_err(|e| ProviderError::failed("observe", "qemu sessions", e.to_string()))??;
        let mut out = Vec::new();
        for (name, record) in records {
            let dir = self.dir(&name);
            let mut r = match record {
                Ok(Some(r)) => r,
                Ok(None) => {
                    // Half made: ours, broken, so the plan replaces or removes it.
                    out.push(ObservedSession {
                        healthy: Some(false),
                        ..ObservedSession::bare(name, ComputeKind::Qemu, SessionState::Failed, true)
                    });
                    continue;
                }
                Err(e) => {
                    tracing::warn!(session = %name, "{}", crate::error_chain(&e));
                    out.push(ObservedSession::bare(
                        name,
                        ComputeKind::Qemu,
                        SessionState::Failed,
                        false,
                    ));
                    continue;
                }
            };
            let mut running = alive(r.pid, r.start_ticks);
            if !running && let Some(pid) = marked.get(&name).and_then(|p| p.first()).copied() {
                // Started but never recorded (vessel killed in between): adopted. Looked at
                // again under the lock: a start in progress records its VM itself.
                let _guard = self.inner.lock.lock().await;
                if let Some(now) = read_record(&dir)? {
                    r = now;
                }
                running = alive(r.pid, r.start_ticks);
                if !running && alive(Some(pid), None) {
                    r.pid = Some(pid);
                    r.start_ticks = proc_stat(pid).map(|(_, t)| t);
                    r.intent = Intent::Running;
                    write_record(&dir, &r)?;
                    running = true;
                    tracing::info!(session = %name, pid, "adopted a running VM");
                }
            }
            if running && let Some(pid) = r.pid {
                self.watch(pid, r.start_ticks);
            }
            out.push(r.observed(ComputeKind::Qemu, running));
        }
        Ok(out)
    }

    /// Host ports for `names`, none held by another session. Call with the lock held.
    fn allocate(&self, names: &[String]) -> Result<BTreeMap<String, u16>, ProviderError> {
        allocate_in(&self.inner.root, self.inner.config.port_base, names)
    }

    /// The image's files: (kernel, initrd, disk base if any).
    fn image(
        &self,
        session: &str,
        spec: &RuntimeSpec,
    ) -> Result<(PathBuf, PathBuf, Option<PathBuf>), ProviderError> {
        let name = spec
            .image
            .as_deref()
            .ok_or_else(|| ProviderError::failed("start", session, "the plan has no `image`"))?;
        if name.is_empty() || name.contains('/') || name.starts_with('.') || name.contains(',') {
            return Err(ProviderError::failed(
                "start",
                session,
                format!("`{name}` is not an image name (a directory under `images`)"),
            ));
        }
        let dir = self.inner.config.images.join(name);
        let (kernel, initrd, disk) = (
            dir.join("vmlinuz"),
            dir.join("initrd.img"),
            dir.join("disk.qcow2"),
        );
        for f in [&kernel, &initrd] {
            if !f.is_file() {
                return Err(ProviderError::failed(
                    "start",
                    session,
                    format!(
                        "image `{name}` has no {} (build it with examples/microvm/build-image.sh)",
                        f.display()
                    ),
                ));
            }
        }
        Ok((kernel, initrd, disk.is_file().then_some(disk)))
    }

    /// QEMU's argv for a session.
    fn argv(&self, r: &Record, accel: &str) -> Result<Vec<String>, ProviderError> {
        let session = r.name.as_str();
        let dir = self.dir(session);
        let (kernel, initrd, disk) = self.image(session, &r.spec)?;
        for p in [&kernel, &initrd] {
            if p.to_string_lossy().contains(',') {
                return Err(ProviderError::failed(
                    "start",
                    session,
                    format!(
                        "{} has a comma, which QEMU's options cannot carry",
                        p.display()
                    ),
                ));
            }
        }
        let script = guest_script(session, &r.spec)?;
        let mut append = String::from("console=ttyS0 quiet loglevel=1 panic=-1");
        if !self.inner.config.append.is_empty() {
            append.push(' ');
            append.push_str(&self.inner.config.append);
        }
        append.push_str(&format!(
            " {} vessel.session={session} vessel.run={}",
            self.marker(session),
            crate::source::transport::base64(script.as_bytes())
        ));
        if append.len() >= MAX_CMDLINE {
            return Err(ProviderError::failed(
                "start",
                session,
                format!(
                    "the kernel command line would be {} bytes (the limit is {MAX_CMDLINE}): the plan's env and command are too long for it",
                    append.len()
                ),
            ));
        }
        let mem_mib = r
            .spec
            .memory
            .unwrap_or(self.inner.config.default_memory)
            .bytes()
            .div_ceil(1 << 20)
            .max(64);
        let cpus = r.spec.cpus.map(|c| c.ceil().max(1.0) as u32).unwrap_or(1);
        let mut hostfwd = String::new();
        for (name, host) in &r.ports {
            if let Some(guest) = r.spec.ports.get(name) {
                hostfwd.push_str(&format!(",hostfwd=tcp:127.0.0.1:{host}-:{}", guest.0));
            }
        }
        let d = |f: &str| dir.join(f).display().to_string();
        let mut a: Vec<String> = vec![
            "-name".into(),
            format!("vessel-{session},process=vessel-{session}"),
            "-M".into(),
            "pc".into(),
            "-accel".into(),
            accel.into(),
        ];
        if accel == "kvm" {
            a.extend(["-cpu".into(), "max".into()]);
        }
        a.extend([
            "-m".into(),
            mem_mib.to_string(),
            "-smp".into(),
            cpus.to_string(),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-no-reboot".into(),
            "-kernel".into(),
            kernel.display().to_string(),
            "-initrd".into(),
            initrd.display().to_string(),
            "-append".into(),
            append,
            "-serial".into(),
            format!("file:{}", d("console.log")),
            "-netdev".into(),
            format!("user,id=n0{hostfwd}"),
            "-device".into(),
            "virtio-net-pci,netdev=n0".into(),
            "-fsdev".into(),
            format!("local,id=ws,path={},security_model=none", d("workspace")),
            "-device".into(),
            "virtio-9p-pci,fsdev=ws,mount_tag=workspace".into(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", d("qmp.sock")),
            "-pidfile".into(),
            d("qemu.pid"),
            "-daemonize".into(),
        ]);
        if disk.is_some() {
            a.extend([
                "-drive".into(),
                format!("file={},if=virtio,format=qcow2", d("overlay.qcow2")),
            ]);
        }
        Ok(a)
    }

    /// A per-session copy-on-write overlay over the image's disk, sized to the plan's `disk`.
    async fn make_overlay(
        &self,
        session: &str,
        base: &Path,
        size: Option<crate::model::Size>,
    ) -> Result<(), ProviderError> {
        let overlay = self.dir(session).join("overlay.qcow2");
        if overlay.exists() {
            return Ok(());
        }
        let tmp = self.dir(session).join(".overlay.qcow2.tmp");
        let mut cmd = tokio::process::Command::new(&self.inner.config.qemu_img);
        cmd.args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(base)
            .arg(&tmp);
        if let Some(s) = size {
            cmd.arg(s.bytes().to_string());
        }
        let out = tokio::time::timeout(Duration::from_secs(30), cmd.kill_on_drop(true).output())
            .await
            .map_err(|_| {
                ProviderError::failed("create the disk of", session, "qemu-img took over 30 s")
            })?
            .map_err(ProviderError::io("create the disk of", session))?;
        if !out.status.success() {
            return Err(ProviderError::failed(
                "create the disk of",
                session,
                String::from_utf8_lossy(&out.stderr)
                    .chars()
                    .take(500)
                    .collect::<String>(),
            ));
        }
        std::fs::rename(&tmp, &overlay).map_err(ProviderError::io("create the disk of", session))
    }

    /// Start the VM of record `r` (its directory exists). Call with the lock held.
    async fn spawn(&self, r: &mut Record) -> Result<(), ProviderError> {
        let session = r.name.clone();
        let dir = self.dir(&session);
        let (accel, why) = self.accel().await;
        if let (_, _, Some(base)) = self.image(&session, &r.spec)? {
            self.make_overlay(&session, &base, r.spec.disk).await?;
        }
        let argv = self.argv(r, accel)?;
        for f in ["qmp.sock", "qemu.pid"] {
            let _ = std::fs::remove_file(dir.join(f));
        }
        std::fs::create_dir_all(dir.join("workspace")).map_err(ProviderError::io(
            "create the workspace of",
            session.clone(),
        ))?;
        // QEMU daemonizes once the machine is set up: its exit status and stderr say whether
        // it started, and the pid file where it runs. Its stderr is a file, not a pipe to
        // vessel: a vessel killed mid-start must not take QEMU with it (SIGPIPE).
        let log_path = dir.join("qemu.log");
        let log = std::fs::File::create(&log_path)
            .map_err(ProviderError::io("start", log_path.display().to_string()))?;
        let status = tokio::time::timeout(
            Duration::from_secs(60),
            tokio::process::Command::new(&self.inner.config.binary)
                .args(&argv)
                .current_dir(&dir)
                .env_clear()
                .env(
                    "PATH",
                    std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
                )
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(log)
                .kill_on_drop(true)
                .status(),
        )
        .await
        .map_err(|_| {
            ProviderError::failed("start", session.clone(), "QEMU did not start within 60 s")
        })?
        .map_err(ProviderError::io(
            "start",
            format!("{session} ({})", self.inner.config.binary),
        ))?;
        if !status.success() {
            let said = std::fs::read(&log_path).unwrap_or_default();
            let said = String::from_utf8_lossy(&said[..said.len().min(4096)]);
            return Err(ProviderError::failed(
                "start",
                session,
                format!(
                    "QEMU exited with {status}: {}",
                    said.trim().chars().take(500).collect::<String>()
                ),
            ));
        }
        let pid: Option<i32> = std::fs::read_to_string(dir.join("qemu.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .or_else(|| {
                marked_vms(&self.inner.key_prefix)
                    .get(&session)
                    .and_then(|p| p.first().copied())
            });
        let Some(pid) = pid else {
            return Err(ProviderError::failed(
                "start",
                session,
                "QEMU started but left no pid",
            ));
        };
        r.pid = Some(pid);
        r.start_ticks = proc_stat(pid).map(|(_, t)| t);
        r.intent = Intent::Running;
        r.accel = Some(accel.to_string());
        write_record(&dir, r)?;
        self.watch(pid, r.start_ticks);
        self.set_activity(&session, Some(format!("VM on {accel} ({why})")));
        Ok(())
    }

    /// Ask the guest to power off (`system_powerdown`, after a `cont` in case it is paused)
    /// and wait for QEMU to exit, at most `timeout`: did it?
    async fn powerdown(&self, dir: &Path, pid: i32, ticks: Option<u64>, timeout: Duration) -> bool {
        let sock = dir.join("qmp.sock");
        let _ = qmp::execute(&sock, "cont", None, QMP_TIMEOUT).await;
        if let Err(e) = qmp::execute(&sock, "system_powerdown", None, QMP_TIMEOUT).await {
            tracing::warn!(dir = %dir.display(), "system_powerdown: {}", crate::error_chain(&e));
        }
        gone_within(pid, ticks, timeout).await
    }

    /// Make sure the VM `pid` is gone: QMP `quit`, then SIGKILL. Is it gone?
    async fn force_off(&self, dir: &Path, pid: i32, ticks: Option<u64>) -> bool {
        let _ = qmp::execute(&dir.join("qmp.sock"), "quit", None, QMP_TIMEOUT).await;
        if gone_within(pid, ticks, Duration::from_secs(2)).await {
            return true;
        }
        if alive(Some(pid), ticks) {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        gone_within(pid, ticks, Duration::from_secs(2)).await
    }

    /// The VM's live pid: the recorded one, or one carrying its marker.
    fn live_pid(&self, session: &str, r: &Record) -> Option<(i32, Option<u64>)> {
        if let Some(pid) = r.pid.filter(|_| alive(r.pid, r.start_ticks)) {
            return Some((pid, r.start_ticks));
        }
        let pid = marked_vms(&self.inner.key_prefix)
            .get(session)?
            .first()
            .copied()?;
        Some((pid, proc_stat(pid).map(|(_, t)| t)))
    }

    fn stop_timeout(r: &Record, asked: Option<crate::model::Duration>) -> Duration {
        asked
            .or(r.spec.stop_timeout)
            .map(|d| d.std())
            .unwrap_or(Duration::from_secs(10))
    }

    /// Kill every VM carrying the session's marker (what a half-made session left).
    async fn kill_marked(&self, session: &str) {
        let dir = self.dir(session);
        for pid in marked_vms(&self.inner.key_prefix)
            .remove(session)
            .unwrap_or_default()
        {
            let ticks = proc_stat(pid).map(|(_, t)| t);
            self.force_off(&dir, pid, ticks).await;
        }
    }
}

impl SessionSteps for QemuProvider {
    async fn pull_image(
        &self,
        session: &str,
        image: &str,
        _pull: crate::model::PullPolicy,
        _host: Option<&str>,
    ) -> Result<(), ProviderError> {
        // Images are local directories: there is nothing to pull, only to check.
        let dir = self.inner.config.images.join(image);
        if dir.join("vmlinuz").is_file() && dir.join("initrd.img").is_file() {
            Ok(())
        } else {
            Err(ProviderError::failed(
                "pull image for",
                session,
                format!(
                    "no image `{image}` under {}",
                    self.inner.config.images.display()
                ),
            ))
        }
    }

    async fn create(&self, a: &CreateArgs<'_>) -> Result<(), ProviderError> {
        let session = a.session;
        let dir = self.dir(session);
        {
            let _guard = self.inner.lock.lock().await;
            if let Some(r) = read_record(&dir)? {
                if r.fingerprint != a.fingerprint {
                    return Err(ProviderError::failed(
                        "create",
                        session,
                        "a session with another spec exists; it must be destroyed first",
                    ));
                }
            } else {
                if dir.exists() {
                    self.kill_marked(session).await;
                    std::fs::remove_dir_all(&dir)
                        .map_err(ProviderError::io("clean", dir.display().to_string()))?;
                }
                std::fs::create_dir_all(&dir)
                    .map_err(ProviderError::io("create", dir.display().to_string()))?;
                super::local::make_workspace(&dir, &self.inner.kept, a.restore, session)?;
                let ports = self.allocate(&a.spec.ports.keys().cloned().collect::<Vec<_>>())?;
                let r = Record {
                    base: super::process::Record {
                        name: session.to_string(),
                        spec: a.spec.clone(),
                        fingerprint: a.fingerprint.to_string(),
                        source_file: a.source_file.to_path_buf(),
                        synced: Synced {
                            save_to: a.save_to.map(Path::to_path_buf),
                            ..Synced::default()
                        },
                        ports,
                        intent: if a.start {
                            Intent::Running
                        } else {
                            Intent::Stopped
                        },
                        pid: None,
                        start_ticks: None,
                    },
                    accel: None,
                };
                write_record(&dir, &r)?;
            }
        }
        if a.start {
            self.start(session).await
        } else {
            Ok(())
        }
    }

    /// The record takes the new spec (everything but `health`, `stop_timeout` and `pull`
    /// replaces a VM, so only those change here); with `restart`, the VM reboots with it.
    async fn update(
        &self,
        session: &str,
        spec: &RuntimeSpec,
        fingerprint: &str,
        restart: bool,
    ) -> Result<(), ProviderError> {
        let dir = self.dir(session);
        if restart {
            self.stop(session, None).await?;
        }
        {
            let _guard = self.inner.lock.lock().await;
            let mut r = read_record(&dir)?
                .ok_or_else(|| ProviderError::failed("update", session, "it does not exist"))?;
            r.spec = spec.clone();
            r.fingerprint = fingerprint.to_string();
            write_record(&dir, &r)?;
        }
        if restart {
            self.start(session).await?;
        }
        Ok(())
    }

    async fn start(&self, session: &str) -> Result<(), ProviderError> {
        let dir = self.dir(session);
        let _guard = self.inner.lock.lock().await;
        let mut r = read_record(&dir)?
            .ok_or_else(|| ProviderError::failed("start", session, "it does not exist"))?;
        if let Some((pid, ticks)) = self.live_pid(session, &r) {
            // Running, or paused (asleep at depth `pause`): resumed either way, never twice.
            qmp::execute(&dir.join("qmp.sock"), "cont", None, QMP_TIMEOUT)
                .await
                .map_err(|e| ProviderError::caused("resume", session, Arc::new(e)))?;
            if r.pid != Some(pid) || r.intent != Intent::Running {
                r.pid = Some(pid);
                r.start_ticks = ticks;
                r.intent = Intent::Running;
                write_record(&dir, &r)?;
            }
            self.watch(pid, ticks);
            return Ok(());
        }
        self.spawn(&mut r).await
    }

    /// `system_powerdown`, then `quit` (and SIGKILL) after the stop timeout.
    async fn stop(
        &self,
        session: &str,
        stop_timeout: Option<crate::model::Duration>,
    ) -> Result<(), ProviderError> {
        let dir = self.dir(session);
        let Some(mut r) = read_record(&dir)? else {
            return Ok(());
        };
        if let Some((pid, ticks)) = self.live_pid(session, &r) {
            let timeout = Self::stop_timeout(&r, stop_timeout);
            if !self.powerdown(&dir, pid, ticks, timeout).await
                && !self.force_off(&dir, pid, ticks).await
            {
                return Err(ProviderError::failed(
                    "stop",
                    session,
                    format!("QEMU (pid {pid}) survived SIGKILL"),
                ));
            }
        }
        let _guard = self.inner.lock.lock().await;
        r.intent = Intent::Stopped;
        r.pid = None;
        r.start_ticks = None;
        write_record(&dir, &r)?;
        self.set_activity(session, None);
        Ok(())
    }

    async fn destroy(
        &self,
        session: &str,
        stop_timeout: Option<crate::model::Duration>,
        retain: bool,
    ) -> Result<(), ProviderError> {
        let dir = self.dir(session);
        if !dir.exists() {
            return Ok(());
        }
        if read_record(&dir).ok().flatten().is_some() {
            self.stop(session, stop_timeout).await?;
        }
        self.kill_marked(session).await;
        self.set_activity(session, None);
        // The overlay, the socket, the pid file and the console go with the directory.
        super::local::keep_and_remove(&self.inner.root, &dir, &self.inner.kept, session, retain)
            .await
    }

    async fn wait_healthy(
        &self,
        session: &str,
        port: &str,
        check: Option<&Health>,
    ) -> Result<(), ProviderError> {
        let dir = self.dir(session);
        let r = read_record(&dir)?.ok_or_else(|| {
            ProviderError::failed("check health of", session, "it does not exist")
        })?;
        let Some(port) = r.ports.get(port).copied() else {
            return Err(ProviderError::failed(
                "check health of",
                session,
                format!("it has no port `{port}`"),
            ));
        };
        let path = check.map(|h| h.path.as_str());
        let addr = format!("127.0.0.1:{port}");
        // QMP's `running` only means the vCPUs run: readiness is the forwarded port answering
        // (QEMU accepts on it at once and closes while nothing listens in the guest, so the
        // probe needs an answer: an HTTP GET, `/` when the plan names no path).
        let path = Some(path.unwrap_or("/"));
        super::health::wait_until_healthy(path, Duration::ZERO, Duration::ZERO, || async {
            let r = read_record(&dir)?
                .ok_or_else(|| ProviderError::failed("check health of", session, "it went away"))?;
            if self.live_pid(session, &r).is_none() {
                return Err(ProviderError::failed(
                    "check health of",
                    session,
                    format!(
                        "the VM exited; its console ends with: {}",
                        console_tail(&dir)
                    ),
                ));
            }
            Ok(Some(addr.clone()))
        })
        .await
    }

    /// Into the workspace the VM shares (seen at once in the guest), without the excluded
    /// entries.
    async fn sync_source(
        &self,
        session: &str,
        path: &Path,
        exclude: &[String],
        save_to: &Option<PathBuf>,
    ) -> Result<(), ProviderError> {
        let dir = self.dir(session);
        super::local::sync_in(session, path, &dir.join("workspace"), exclude).await?;
        let _guard = self.inner.lock.lock().await;
        let mut r = read_record(&dir)?.ok_or_else(|| {
            ProviderError::failed("sync source into", session, "it does not exist")
        })?;
        r.set_synced(path, exclude, save_to);
        write_record(&dir, &r)
    }

    /// Power the guest off (it flushes and unmounts the workspace first), then save the
    /// workspace over `path` atomically. A guest that does not power off within its stop
    /// timeout is left running and nothing is saved: the step fails and is retried.
    async fn save_work(&self, session: &str, path: &Path) -> Result<(), ProviderError> {
        let dir = self.dir(session);
        let r = read_record(&dir)?
            .ok_or_else(|| ProviderError::failed("save work of", session, "it does not exist"))?;
        no_symlinks("save work of", session, path)?;
        if let Some((pid, ticks)) = self.live_pid(session, &r) {
            let timeout = Self::stop_timeout(&r, None);
            if !self.powerdown(&dir, pid, ticks, timeout).await {
                return Err(ProviderError::failed(
                    "save work of",
                    session,
                    format!(
                        "the guest did not power off within {timeout:?}, so its work may not be flushed: nothing was saved, and the VM is left running"
                    ),
                ));
            }
            let _guard = self.inner.lock.lock().await;
            let mut r = r.clone();
            r.intent = Intent::Stopped;
            r.pid = None;
            r.start_ticks = None;
            write_record(&dir, &r)?;
        }
        super::local::save_out(session, &dir.join("workspace"), path, &r.synced.exclude).await
    }
}

impl ComputeProvider for QemuProvider {
    fn kind(&self) -> ComputeKind {
        ComputeKind::Qemu
    }

    fn observe(&self) -> BoxFut<'_, Result<Vec<ObservedSession>, ProviderError>> {
        Box::pin(self.observe_all())
    }

    fn apply<'a>(&'a self, action: &'a SessionAction) -> BoxFut<'a, Result<(), ProviderError>> {
        Box::pin(super::run_session_step(self, action))
    }

    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.inner.changes.subscribe())
    }

    fn activity(&self) -> Option<tokio::sync::watch::Receiver<BTreeMap<String, String>>> {
        Some(self.inner.activity.subscribe())
    }

    /// From the VM's record alone: the host ports its guest ports are forwarded to.
    fn endpoints<'a>(
        &'a self,
        session: &'a str,
    ) -> BoxFut<'a, Result<BTreeMap<String, String>, ProviderError>> {
        Box::pin(async move {
            Ok(read_record(&self.dir(session))?
                .map(|r| r.endpoints())
                .unwrap_or_default())
        })
    }

    /// QMP `stop`: the vCPUs stop where they are, memory kept; `StartSession` (`cont`)
    /// resumes them.
    fn pause<'a>(&'a self, session: &'a str) -> BoxFut<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            let dir = self.dir(session);
            let _guard = self.inner.lock.lock().await;
            let r = read_record(&dir)?
                .ok_or_else(|| ProviderError::failed("pause", session, "it does not exist"))?;
            if self.live_pid(session, &r).is_none() {
                return Err(ProviderError::failed("pause", session, "it is not running"));
            }
            qmp::execute(&dir.join("qmp.sock"), "stop", None, QMP_TIMEOUT)
                .await
                .map(|_| ())
                .map_err(|e| ProviderError::caused("pause", session, Arc::new(e)))
        })
    }

    fn retained(
        &self,
    ) -> BoxFut<'_, Result<Vec<(String, crate::model::observed::RetainedWorkspace)>, ProviderError>>
    {
        Box::pin(self.inner.kept.list_now())
    }

    fn shutdown(&self) -> BoxFut<'_, ()> {
        Box::pin(async move {
            if !self.inner.config.keep_on_exit {
                self.stop_all().await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_script_quotes_env_and_expands_guest_ports() {
        let spec: RuntimeSpec = serde_json::from_value(serde_json::json!({
            "compute": "qemu",
            "image": "devbox",
            "command": ["httpd", "-f", "-p", "{port.ide}", "-h", "{workspace}"],
            "env": {"GREETING": "it's here"},
            "ports": {"ide": 8080, "app": 5173}
        }))
        .expect("spec");
        let s = guest_script("alice", &spec).expect("script");
        assert!(s.contains("export GREETING='it'\\''s here'\n"), "{s}");
        assert!(s.contains("export PORT_IDE=8080\n"), "{s}");
        assert!(s.contains("export PORT=8080\n"), "{s}");
        assert!(
            s.ends_with("exec 'httpd' '-f' '-p' '8080' '-h' '/workspace'\n"),
            "{s}"
        );
        let bad: RuntimeSpec = serde_json::from_value(serde_json::json!({
            "compute": "qemu", "command": ["x"], "env": {"A B": "1"}
        }))
        .expect("spec");
        assert!(guest_script("alice", &bad).is_err());
    }
}
