//! The crash harness: `kill -9` of `vessel run` and `vessel apply` at random moments during
//! random changes to the desired tree, for process or docker sessions; then one last
//! `vessel apply`, and counts of what went wrong:
//!
//! - duplicates: a session with more than one process group (or container);
//! - orphans: a process, session directory or container of a session no longer declared;
//! - lost: a declared session that is missing, or not running when it should;
//! - work lost: a token written into a session's workspace that is gone while the session
//!   stayed declared all along (process sessions).
//!
//! Self-contained, so the integration tests (short form, `tests/it/crash.rs`) and the bench
//! (long form, `cargo bench --bench crash`) share it with `#[path]`.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What to run.
#[derive(Clone)]
pub struct Options {
    /// The vessel binary.
    pub vessel: PathBuf,
    pub cycles: usize,
    pub seed: u64,
    /// Session processes get ports from here up (below 32768).
    pub port_base: u16,
    /// Free ports for the proxy and the status endpoint.
    pub proxy_port: u16,
    pub status_port: u16,
    /// Sessions are containers on this engine (a unix socket path) instead of processes.
    pub docker: Option<PathBuf>,
    /// The longest a vessel runs before it is killed.
    pub max_life: Duration,
    /// Print each cycle.
    pub verbose: bool,
}

/// What went wrong, counted.
#[derive(Debug, Default)]
pub struct Report {
    pub cycles: usize,
    pub run_kills: usize,
    pub apply_kills: usize,
    pub changes: usize,
    pub duplicates: usize,
    pub orphans: usize,
    pub lost: usize,
    pub work_lost: usize,
    pub details: Vec<String>,
    pub final_apply: Option<i32>,
    pub took: Duration,
}

impl Report {
    pub fn clean(&self) -> bool {
        self.duplicates == 0 && self.orphans == 0 && self.lost == 0 && self.work_lost == 0
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[derive(Clone, Debug)]
struct Want {
    env: u32,
    stopped: bool,
}

const PROCESS_PLAN: &str = "kind: Plan
name: web
command: ['{vessel}', devserver, --listen, '127.0.0.1:{port.ide}', --root, '{workspace}']
ports: {ide: 8080}
health: {port: ide, path: /healthz}
stop_timeout: 2s
";

const DOCKER_PLAN: &str = "kind: Plan
name: web
compute: docker
image: localhost/busybox:test
command: [/bin/busybox, httpd, -f, -p, '{port.ide}', -h, '{workspace}']
ports: {ide: 8080}
stop_timeout: 1s
";

struct World {
    dir: PathBuf,
    opts_docker: Option<PathBuf>,
    instance: String,
    /// The session name prefix (unique per run).
    prefix: String,
}

impl World {
    fn source(&self) -> PathBuf {
        self.dir.join("desired")
    }

    fn write(&self, name: &str, w: &Want) {
        let mut text = format!(
            "kind: Session\nname: {name}\nplan: web\nenv: {{GEN: '{}'}}\n",
            w.env
        );
        if w.stopped {
            text.push_str("state: stopped\n");
        }
        let tmp = self.source().join(format!(".{name}.tmp"));
        let _ = std::fs::write(&tmp, text);
        let _ = std::fs::rename(tmp, self.source().join(format!("{name}.yaml")));
    }

    fn remove(&self, name: &str) {
        let _ = std::fs::remove_file(self.source().join(format!("{name}.yaml")));
    }

    fn sessions_root(&self) -> PathBuf {
        self.dir.join("state/sessions")
    }

    /// Live process-group leaders of each session (process sessions).
    fn leaders(&self) -> BTreeMap<String, Vec<i32>> {
        let root = self.sessions_root();
        let root = root.canonicalize().unwrap_or(root);
        let prefix = format!("VESSEL_SESSION_KEY={}#", root.display());
        let mut out: BTreeMap<String, Vec<i32>> = BTreeMap::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
                continue;
            };
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let after = stat.rsplit(')').next().unwrap_or("");
            let fields: Vec<&str> = after.split_whitespace().collect();
            if fields.first().is_some_and(|s| *s == "Z") {
                continue;
            }
            let pgrp: i32 = fields.get(2).and_then(|p| p.parse().ok()).unwrap_or(0);
            for v in env.split(|b| *b == 0) {
                if let Some(name) = v.strip_prefix(prefix.as_bytes())
                    && pgrp == pid
                {
                    out.entry(String::from_utf8_lossy(name).into_owned())
                        .or_default()
                        .push(pid);
                }
            }
        }
        out
    }

    /// Containers of this instance: (session, running) per container.
    fn containers(&self) -> Vec<(String, bool)> {
        let Some(sock) = &self.opts_docker else {
            return Vec::new();
        };
        let filter = format!(
            "%7B%22label%22%3A%5B%22vessel.managed-by%3D{}%22%5D%7D",
            self.instance
        );
        let body = docker_get(sock, &format!("/containers/json?all=1&filters={filter}"))
            .unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        v.as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                let session = c["Labels"]["vessel.session"]
                    .as_str()
                    .unwrap_or("?")
                    .to_string();
                (session, c["State"] == "running")
            })
            .collect()
    }

    fn cleanup(&self) {
        for (_, pids) in self.leaders() {
            for p in pids {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(p),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        if let Some(sock) = &self.opts_docker {
            let filter = format!(
                "%7B%22label%22%3A%5B%22vessel.managed-by%3D{}%22%5D%7D",
                self.instance
            );
            let body = docker_get(sock, &format!("/containers/json?all=1&filters={filter}"))
                .unwrap_or_default();
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            for c in v.as_array().into_iter().flatten() {
                if let Some(id) = c["Id"].as_str() {
                    let _ =
                        docker_request(sock, "DELETE", &format!("/containers/{id}?force=1&v=1"));
                }
            }
        }
    }
}

fn docker_request(sock: &Path, method: &str, path: &str) -> Option<String> {
    let mut s = std::os::unix::net::UnixStream::connect(sock).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    write!(s, "{method} {path} HTTP/1.0\r\nHost: d\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

fn docker_get(sock: &Path, path: &str) -> Option<String> {
    docker_request(sock, "GET", path)
}

fn healthz(port: u16) -> bool {
    let Ok(mut s) = std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(2),
    ) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
    if s.write_all(b"GET /healthz HTTP/1.0\r\nHost: x\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.starts_with("HTTP/1.1 200") || buf.starts_with("HTTP/1.0 200")
}

/// Run the harness.
pub fn run(opts: &Options) -> Report {
    let started = Instant::now();
    let dir =
        std::env::temp_dir().join(format!("vessel-crash-{}-{}", std::process::id(), opts.seed));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("desired")).expect("mkdir");
    let instance = format!("crash{}x{}", std::process::id() % 100_000, opts.seed % 1000);
    let compute = match &opts.docker {
        Some(sock) => format!(
            "    docker:\n      hosts: [{{name: local, endpoint: 'unix://{}'}}]\n      instance: {instance}\n",
            sock.display()
        ),
        None => format!(
            "    process: {{port_base: {}, keep_on_exit: true}}\n",
            opts.port_base
        ),
    };
    let config = format!(
        "source: {{dir: desired}}\nstate_dir: state\nproviders:\n  compute:\n{compute}  proxy:\n    embedded: {{listen: '127.0.0.1:{}'}}\nstatus: {{listen: '127.0.0.1:{}'}}\npolicy:\n  resync_interval: 1s\n  destroy_budget: {{max_count: 1000, max_percent: 100}}\n",
        opts.proxy_port, opts.status_port
    );
    std::fs::write(dir.join("vessel.yaml"), config).expect("config");
    let plan = if opts.docker.is_some() {
        DOCKER_PLAN
    } else {
        PROCESS_PLAN
    };
    std::fs::write(dir.join("desired/plan.yaml"), plan).expect("plan");
    let world = World {
        dir: dir.clone(),
        opts_docker: opts.docker.clone(),
        instance,
        prefix: format!("c{}", opts.seed % 1000),
    };
    let mut rng = Rng(opts.seed | 1);
    let mut declared: BTreeMap<String, Want> = BTreeMap::new();
    let mut next = 0usize;
    for _ in 0..3 {
        let name = format!("{}s{next}", world.prefix);
        next += 1;
        let w = Want {
            env: 0,
            stopped: false,
        };
        world.write(&name, &w);
        declared.insert(name, w);
    }
    // Work tokens: session -> what was written into its workspace. A session removed from the
    // tree loses its claim (its work is kept elsewhere, not checked here).
    let mut tokens: BTreeMap<String, String> = BTreeMap::new();
    let mut report = Report::default();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("vessel.log"))
        .expect("log");
    for cycle in 0..opts.cycles {
        // One random change.
        let names: Vec<String> = declared.keys().cloned().collect();
        let pick = |rng: &mut Rng| names[rng.below(names.len() as u64) as usize].clone();
        let change = rng.below(10);
        match change {
            0..=3 if declared.len() < 10 => {
                let name = format!("{}s{next}", world.prefix);
                next += 1;
                let w = Want {
                    env: 0,
                    stopped: false,
                };
                world.write(&name, &w);
                declared.insert(name, w);
            }
            4 | 5 if declared.len() > 1 => {
                let name = pick(&mut rng);
                world.remove(&name);
                declared.remove(&name);
                tokens.remove(&name);
            }
            6 | 7 if !names.is_empty() => {
                let name = pick(&mut rng);
                if let Some(w) = declared.get_mut(&name) {
                    w.env += 1;
                    world.write(&name, w);
                }
            }
            _ if !names.is_empty() => {
                let name = pick(&mut rng);
                if let Some(w) = declared.get_mut(&name) {
                    w.stopped = !w.stopped;
                    world.write(&name, w);
                }
            }
            _ => {}
        }
        report.changes += 1;
        // A vessel, killed at a random moment.
        let apply = rng.below(10) < 3;
        let args: &[&str] = if apply {
            &["apply", "vessel.yaml"]
        } else {
            &["run", "vessel.yaml"]
        };
        let child = Command::new(&opts.vessel)
            .args(args)
            .current_dir(&dir)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log.try_clone().expect("log"))
            .spawn();
        let Ok(mut child) = child else {
            report
                .details
                .push(format!("cycle {cycle}: vessel did not start"));
            continue;
        };
        let life = Duration::from_millis(rng.below(opts.max_life.as_millis() as u64));
        std::thread::sleep(life);
        let _ = child.kill();
        let _ = child.wait();
        if apply {
            report.apply_kills += 1;
        } else {
            report.run_kills += 1;
        }
        // Work in the workspaces of process sessions that run.
        if opts.docker.is_none() {
            for (name, w) in &declared {
                let ws = world.sessions_root().join(name).join("workspace");
                if !w.stopped && !tokens.contains_key(name) && ws.is_dir() {
                    let t = format!("{}-{cycle}", rng.next());
                    if std::fs::write(ws.join("harness-token"), &t).is_ok() {
                        tokens.insert(name.clone(), t);
                    }
                }
            }
        }
        if opts.verbose {
            eprintln!(
                "cycle {cycle}: {} for {} ms, {} declared",
                args[0],
                life.as_millis(),
                declared.len()
            );
        }
        report.cycles += 1;
    }
    // Converge once more, then count.
    for _ in 0..3 {
        let out = Command::new(&opts.vessel)
            .args(["apply", "vessel.yaml"])
            .current_dir(&dir)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log.try_clone().expect("log"))
            .status();
        report.final_apply = out.ok().and_then(|s| s.code());
        if report.final_apply == Some(0) {
            break;
        }
    }
    if opts.docker.is_none() {
        let leaders = world.leaders();
        for (name, pids) in &leaders {
            if pids.len() > 1 {
                report.duplicates += 1;
                report
                    .details
                    .push(format!("{name}: {} process groups", pids.len()));
            }
            if !declared.contains_key(name) {
                report.orphans += 1;
                report
                    .details
                    .push(format!("{name}: runs, but is not declared"));
            }
        }
        let dirs: BTreeSet<String> = std::fs::read_dir(world.sessions_root())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|n| !n.starts_with('.'))
            .collect();
        for d in &dirs {
            if !declared.contains_key(d) {
                report.orphans += 1;
                report
                    .details
                    .push(format!("{d}: a session directory left behind"));
            }
        }
        for (name, w) in &declared {
            let record =
                std::fs::read_to_string(world.sessions_root().join(name).join("session.json"))
                    .ok()
                    .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
            let Some(record) = record else {
                report.lost += 1;
                report
                    .details
                    .push(format!("{name}: declared, but missing"));
                continue;
            };
            let port = record["ports"]["ide"].as_u64().unwrap_or(0) as u16;
            let runs = leaders.contains_key(name);
            let serving = runs && healthz(port);
            if !w.stopped && !serving {
                report.lost += 1;
                report
                    .details
                    .push(format!("{name}: declared running, but not serving"));
            }
            if w.stopped && runs {
                report.lost += 1;
                report
                    .details
                    .push(format!("{name}: declared stopped, but running"));
            }
            if let Some(t) = tokens.get(name) {
                let got = std::fs::read_to_string(
                    world
                        .sessions_root()
                        .join(name)
                        .join("workspace/harness-token"),
                )
                .ok();
                if got.as_deref() != Some(t.as_str()) {
                    report.work_lost += 1;
                    report
                        .details
                        .push(format!("{name}: the work in its workspace is gone"));
                }
            }
        }
    } else {
        let containers = world.containers();
        let mut per: BTreeMap<String, Vec<bool>> = BTreeMap::new();
        for (s, running) in containers {
            per.entry(s).or_default().push(running);
        }
        for (name, states) in &per {
            if states.len() > 1 {
                report.duplicates += 1;
                report
                    .details
                    .push(format!("{name}: {} containers", states.len()));
            }
            if !declared.contains_key(name) {
                report.orphans += 1;
                report
                    .details
                    .push(format!("{name}: a container, but not declared"));
            }
        }
        for (name, w) in &declared {
            match per.get(name) {
                None => {
                    report.lost += 1;
                    report
                        .details
                        .push(format!("{name}: declared, but no container"));
                }
                Some(states) if !w.stopped && !states.iter().any(|r| *r) => {
                    report.lost += 1;
                    report
                        .details
                        .push(format!("{name}: declared running, but stopped"));
                }
                Some(states) if w.stopped && states.iter().any(|r| *r) => {
                    report.lost += 1;
                    report
                        .details
                        .push(format!("{name}: declared stopped, but running"));
                }
                _ => {}
            }
        }
    }
    if !report.clean() {
        report.details.push(format!(
            "vessel's log: {}",
            dir.join("vessel.log").display()
        ));
    }
    world.cleanup();
    if report.clean() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    report.took = started.elapsed();
    report
}
