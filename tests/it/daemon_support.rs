//! Running `vessel run` for tests: a temporary source tree and state directory, a config
//! with free ports, the daemon as a child process, and cleanup of every session process it
//! started (sessions outlive vessel by design).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

/// Each daemon gets its own range of session ports, so parallel tests never collide.
static NEXT_BASE: AtomicU16 = AtomicU16::new(0);

/// A port nobody else is handed: counted upward from 10000, below the kernel's ephemeral
/// range (32768 and up, shared with outgoing connections), so a port one test just released
/// is never given to another; and bindable now.
pub fn free_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(10000);
    loop {
        let p = NEXT.fetch_add(1, Ordering::SeqCst);
        assert!(p < 14000, "out of test ports");
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
}

pub const PLAN: &str = "kind: Plan
name: web
command: ['{vessel}', devserver, --listen, '127.0.0.1:{port.ide}', --listen, '127.0.0.1:{port.app}', --root, '{workspace}']
ports: {ide: 8080, app: 5173}
health: {port: ide, path: /healthz}
stop_timeout: 3s
";

pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub proxy: SocketAddr,
    pub status: SocketAddr,
    pub child: Option<Child>,
}

impl Daemon {
    pub fn source(&self) -> PathBuf {
        self.dir.path().join("desired")
    }
    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("vessel.log")).unwrap_or_default()
    }

    /// A tree with the plan in it, and a config; not started.
    pub fn new() -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("desired")).expect("mkdir");
        std::fs::write(dir.path().join("desired/plan.yaml"), PLAN).expect("write plan");
        // Session ports from 14000 up, 60 to a daemon: below the ephemeral range too.
        let port_base = 14000 + 60 * (NEXT_BASE.fetch_add(1, Ordering::SeqCst) % 100);
        let proxy = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let status = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let config = format!(
            "source: {{dir: desired}}\nstate_dir: state\nproviders:\n  compute:\n    process: {{port_base: {port_base}, keep_on_exit: true}}\n  proxy:\n    embedded: {{listen: '{proxy}'}}\nstatus: {{listen: '{status}'}}\npolicy:\n  resync_interval: 1s\n"
        );
        std::fs::write(dir.path().join("vessel.yaml"), config).expect("write config");
        Daemon {
            dir,
            proxy,
            status,
            child: None,
        }
    }

    pub fn start(&mut self) {
        self.start_with_env(None)
    }

    /// Start with one extra environment variable (a secret the config refers to, say).
    pub fn start_with_env(&mut self, env: Option<(&str, &str)>) {
        self.spawn(&[], env, None)
    }

    /// Start with extra arguments after `run vessel.yaml`.
    pub fn start_with_args(&mut self, args: &[&str], env: Option<(&str, &str)>) {
        self.spawn(args, env, None)
    }

    /// Start under an open-file limit of `soft` (and `hard`), as `ulimit -n` would set it.
    pub fn start_with_file_limit(&mut self, soft: u64, hard: u64) {
        self.spawn(&[], None, Some((soft, hard)))
    }

    fn spawn(&mut self, args: &[&str], env: Option<(&str, &str)>, nofile: Option<(u64, u64)>) {
        use std::os::unix::process::CommandExt;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("vessel.log"))
            .expect("log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vessel"));
        cmd.args(["run", "vessel.yaml"])
            .args(args)
            .current_dir(self.dir.path())
            .env("NO_COLOR", "1")
            .env("VESSEL_LOG", "debug")
            .envs(env)
            .stdout(Stdio::null())
            .stderr(log);
        if let Some((soft, hard)) = nofile {
            // SAFETY: setrlimit is async-signal-safe, and the closure touches nothing else.
            unsafe {
                cmd.pre_exec(move || {
                    nix::sys::resource::setrlimit(
                        nix::sys::resource::Resource::RLIMIT_NOFILE,
                        soft,
                        hard,
                    )
                    .map_err(std::io::Error::from)
                });
            }
        }
        let child = cmd.spawn().expect("vessel runs");
        self.child = Some(child);
        // Both listeners (the status endpoint binds a moment after the proxy).
        if wait_for(Duration::from_secs(15), || {
            TcpStream::connect(self.proxy).is_ok() && TcpStream::connect(self.status).is_ok()
        })
        .is_none()
        {
            panic!(
                "the proxy or the status endpoint does not listen; vessel's log:\n{}",
                self.log()
            );
        }
    }

    pub fn signal(&mut self, sig: nix::sys::signal::Signal) -> Option<i32> {
        let child = self.child.as_mut()?;
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Add `yaml` (top-level keys) to the config file, before starting.
    pub fn configure(&self, yaml: &str) {
        let path = self.dir.path().join("vessel.yaml");
        let mut cfg = std::fs::read_to_string(&path).expect("config");
        cfg.push_str(yaml);
        std::fs::write(&path, cfg).expect("config");
    }

    /// Add `fields` (flow-style, such as `capacity: {memory: 1Gi}`) to the process provider's
    /// config, before starting.
    pub fn set_process_config(&self, fields: &str) {
        let path = self.dir.path().join("vessel.yaml");
        let cfg = std::fs::read_to_string(&path).expect("config");
        let cfg = cfg.replacen(
            "keep_on_exit: true}",
            &format!("keep_on_exit: true, {fields}}}"),
            1,
        );
        std::fs::write(&path, cfg).expect("config");
    }

    /// The daemon's pid, while it runs.
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    pub fn write(&self, name: &str, text: &str) {
        let tmp = self.source().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).expect("write");
        std::fs::rename(tmp, self.source().join(name)).expect("rename");
    }

    /// Change the config file's text.
    pub fn edit_config(&self, f: impl FnOnce(String) -> String) {
        let path = self.dir.path().join("vessel.yaml");
        let cfg = std::fs::read_to_string(&path).expect("config");
        std::fs::write(&path, f(cfg)).expect("config");
    }

    /// How many passes the daemon has run, from its status endpoint.
    pub fn passes(&self) -> u64 {
        let (code, body) = get(self.status, "status", "/status").unwrap_or_default();
        assert_eq!(code, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("status is JSON");
        v["passes"].as_u64().expect("passes")
    }

    /// Serve routes through another proxy provider: `yaml` is its config under `proxy:`
    /// (`caddy: {...}`, say), `serving` is where it serves them.
    pub fn use_proxy(&mut self, yaml: &str, serving: SocketAddr) {
        let path = self.dir.path().join("vessel.yaml");
        let cfg = std::fs::read_to_string(&path).expect("config");
        let embedded = format!("    embedded: {{listen: '{}'}}\n", self.proxy);
        assert!(cfg.contains(&embedded), "{cfg}");
        std::fs::write(&path, cfg.replace(&embedded, &format!("    {yaml}\n"))).expect("config");
        self.proxy = serving;
    }

    /// The events recorded so far (`events.jsonl`; written when each pass ends).
    pub fn events(&self) -> String {
        std::fs::read_to_string(self.state().join("events.jsonl")).unwrap_or_default()
    }

    /// The line of the first event `verb` on `object` (`route a.localhost`, `dns a.example A`).
    pub fn event_line(&self, verb: &str, object: &str) -> Option<usize> {
        let needle = format!("\"{verb}\",\"object\":\"{object}\"");
        self.events().lines().position(|l| l.contains(&needle))
    }

    pub fn get(&self, host: &str, path: &str) -> Option<(u16, String)> {
        get(self.proxy, host, path)
    }

    /// Session processes of this daemon's state directory, by session name.
    pub fn processes(&self) -> Vec<(String, i32)> {
        let state = self.state().join("sessions");
        let prefix = format!(
            "VESSEL_SESSION_KEY={}#",
            state.canonicalize().unwrap_or(state).display()
        );
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
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
            for v in env.split(|b| *b == 0) {
                if let Some(name) = v.strip_prefix(prefix.as_bytes()) {
                    out.push((String::from_utf8_lossy(name).into_owned(), pid));
                }
            }
        }
        out.sort();
        out
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for (_, pid) in self.processes() {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// A plain HTTP/1.0 GET through `addr` with the given Host.
pub fn get(addr: SocketAddr, host: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let code = buf.get(9..12)?.parse().ok()?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((code, body))
}

/// Poll `f` until it is true or `limit` passes; how long it took.
pub fn wait_for(limit: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

pub fn session(name: &str) -> String {
    format!("kind: Session\nname: {name}\nplan: web\n")
}

pub fn dir_names(p: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(p)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect();
    v.sort();
    v
}

/// A `vessel devserver` on `port` serving `root`; killed on drop.
pub struct Devserver(Child);

impl Drop for Devserver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn spawn_devserver(port: u16, root: &Path) -> Devserver {
    let child = Command::new(env!("CARGO_BIN_EXE_vessel"))
        .args([
            "devserver",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--root",
        ])
        .arg(root)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("vessel devserver runs");
    wait_for(Duration::from_secs(10), || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .expect("devserver listens");
    Devserver(child)
}

/// Open a WebSocket to `host` through `addr`, send 20 messages to the devserver's `/ws` echo
/// and check each comes back.
pub fn websocket_echo(addr: SocketAddr, host: &str) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let url = format!("ws://{host}:{}/ws", addr.port());
        let (mut ws, resp) = tokio_tungstenite::client_async(url, stream)
            .await
            .expect("the upgrade goes through");
        assert_eq!(resp.status().as_u16(), 101);
        for i in 0..20 {
            let text = format!("hello {i}");
            ws.send(Message::text(text.clone())).await.expect("send");
            let echo = ws.next().await.expect("an answer").expect("a frame");
            assert_eq!(echo.into_text().expect("text").as_str(), text);
        }
        ws.close(None).await.expect("close");
    });
}
