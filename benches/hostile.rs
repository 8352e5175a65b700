//! The long form of the hostile-HTTP and open-file exhaustion tests (issue 13): a daemon started
//! under an open-file limit of 1,024, ten process sessions behind its proxy, and then, for each
//! phase, 10,000 connections held against the proxy (and 1,000 against the status endpoint)
//! from 100 loopback addresses, so the per-client bound does not come into it:
//!
//! 1. idle: connections that send nothing; any the daemon closes is opened again at once;
//! 2. slowloris: connections that send a request head one header line every 2 s, forever;
//!    any the daemon closes is opened again at once.
//!
//! Meanwhile every session is asked for `/healthz` through the proxy on a new connection
//! once a second, and the status endpoint's `/healthz` too. Prints how many answered, their
//! latency, the daemon's open files, its passes, and any "Too many open files" in its log.
//! Target: every session answers, every round.
//!
//! Run: `cargo bench --bench hostile` (options after `--`: `--connections N`,
//! `--status-connections N`, `--seconds N` per phase, `--sessions N`, `--limit N`).
//! Asserts nothing; it prints the figures.

#[path = "../tests/it/daemon_support.rs"]
#[allow(dead_code)]
mod daemon_support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use daemon_support::{Daemon, get, session};

struct Options {
    connections: usize,
    status_connections: usize,
    seconds: u64,
    sessions: usize,
    limit: u64,
}

fn options() -> Options {
    let mut o = Options {
        connections: 10_000,
        status_connections: 1_000,
        seconds: 30,
        sessions: 10,
        limit: 1024,
    };
    let args: Vec<String> = std::env::args().collect();
    for w in args.windows(2) {
        let n = w[1].parse::<u64>().ok();
        match (w[0].as_str(), n) {
            ("--connections", Some(n)) => o.connections = n as usize,
            ("--status-connections", Some(n)) => o.status_connections = n as usize,
            ("--seconds", Some(n)) => o.seconds = n,
            ("--sessions", Some(n)) => o.sessions = n as usize,
            ("--limit", Some(n)) => o.limit = n,
            _ => {}
        }
    }
    o
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Attack {
    Idle,
    Slowloris,
}

/// What the holders did in one phase.
#[derive(Default)]
struct Held {
    connects: u64,
    failed: u64,
}

/// Keep `n` connections open against `to` (from 127.0.1.1 to 127.0.1.100), opening again any
/// the daemon closes, until `stop`. Slowloris connections send a head a line at a time.
async fn hold(to: SocketAddr, n: usize, attack: Attack, stop: CancellationToken) -> Held {
    let mut held = Held::default();
    let mut slots: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
    let mut line = 0u64;
    while !stop.is_cancelled() {
        // Open what is closed, 256 at a time.
        let missing: Vec<usize> = (0..n).filter(|i| slots[*i].is_none()).collect();
        for batch in missing.chunks(256) {
            let mut set = JoinSet::new();
            for &i in batch {
                set.spawn(async move {
                    let source = SocketAddr::from(([127, 0, 1, 1 + (i % 100) as u8], 0));
                    let sock = TcpSocket::new_v4().ok()?;
                    sock.bind(source).ok()?;
                    let mut s = tokio::time::timeout(Duration::from_secs(3), sock.connect(to))
                        .await
                        .ok()?
                        .ok()?;
                    if attack == Attack::Slowloris {
                        s.write_all(b"GET / HTTP/1.1\r\nHost: a.localhost\r\n")
                            .await
                            .ok()?;
                    }
                    Some((i, s))
                });
            }
            while let Some(r) = set.join_next().await {
                match r.ok().flatten() {
                    Some((i, s)) => {
                        held.connects += 1;
                        slots[i] = Some(s);
                    }
                    None => held.failed += 1,
                }
            }
            if stop.is_cancelled() {
                return held;
            }
        }
        // Two seconds of holding: every connection is checked (and, for slowloris, sent one
        // more header line) once in that time.
        line += 1;
        let start = Instant::now();
        for slot in slots.iter_mut() {
            let Some(s) = slot else { continue };
            let mut b = [0u8; 512];
            let gone = match s.try_read(&mut b) {
                Ok(_) => true,
                Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
            };
            let gone = gone
                || attack == Attack::Slowloris
                    && s.try_write(format!("X-{line}: {line}\r\n").as_bytes())
                        .is_err_and(|e| e.kind() != std::io::ErrorKind::WouldBlock);
            if gone {
                *slot = None;
            }
        }
        let rest = Duration::from_secs(2).saturating_sub(start.elapsed());
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(rest) => {}
        }
    }
    held
}

fn open_files(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn passes(d: &Daemon) -> Option<(u64, bool)> {
    let (code, body) = get(d.status, "status", "/status")?;
    let v: Value = serde_json::from_str(&body).ok().filter(|_| code == 200)?;
    Some((v["passes"].as_u64()?, v["last_pass"]["error"].is_null()))
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn phase(d: &Daemon, o: &Options, attack: Attack, names: &[String]) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let stop = CancellationToken::new();
    let proxy = rt.spawn(hold(d.proxy, o.connections, attack, stop.clone()));
    let status = rt.spawn(hold(d.status, o.status_connections, attack, stop.clone()));
    let pid = d.pid().unwrap_or(0);
    let before = passes(d);
    let (mut asked, mut answered, mut health, mut rounds) = (0, 0, 0, 0);
    let mut times = Vec::new();
    let mut max_files = 0;
    // Give the holders a head start, then probe once a second.
    std::thread::sleep(Duration::from_secs(3));
    let end = Instant::now() + Duration::from_secs(o.seconds);
    while Instant::now() < end {
        let round = Instant::now();
        rounds += 1;
        for n in names {
            asked += 1;
            let t = Instant::now();
            if d.get(&format!("{n}.localhost"), "/healthz")
                .is_some_and(|(c, _)| c == 200)
            {
                answered += 1;
                times.push(t.elapsed());
            }
        }
        if get(d.status, "status", "/healthz").is_some_and(|(c, _)| c == 200) {
            health += 1;
        }
        max_files = max_files.max(open_files(pid));
        std::thread::sleep(Duration::from_secs(1).saturating_sub(round.elapsed()));
    }
    let after = passes(d);
    stop.cancel();
    let proxy = rt.block_on(proxy).unwrap_or_default();
    let status = rt.block_on(status).unwrap_or_default();
    times.sort();
    let pct = |p: usize| {
        times
            .get((times.len() * p / 100).min(times.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    let label = match attack {
        Attack::Idle => "idle",
        Attack::Slowloris => "slowloris",
    };
    println!(
        "{label}: {} connections held against the proxy and {} against the status endpoint, from 100 addresses, {} s",
        o.connections, o.status_connections, o.seconds
    );
    println!(
        "  connects made: proxy {} ({} failed), status {} ({} failed); each one the daemon closed was opened again",
        proxy.connects, proxy.failed, status.connects, status.failed
    );
    println!(
        "  sessions answering through the proxy: {answered}/{asked} ({} sessions x {rounds} rounds), p50 {}, p99 {}, max {}",
        names.len(),
        ms(pct(50)),
        ms(pct(99)),
        ms(times.last().copied().unwrap_or_default())
    );
    println!("  status /healthz answering: {health}/{rounds}");
    println!(
        "  daemon open files: at most {max_files} of {}; passes {} -> {} (last pass ok: {})",
        o.limit,
        before.map(|p| p.0).unwrap_or(0),
        after.map(|p| p.0).unwrap_or(0),
        after.is_some_and(|p| p.1)
    );
}

fn main() {
    let o = options();
    let own = vessel::listeners::fds::raise_nofile()
        .map(|r| r.limit)
        .unwrap_or(1024);
    let need = (o.connections + o.status_connections) as u64 + 256;
    if own < need {
        println!(
            "hostile: this process may open {own} files, and holding the connections needs {need}; raise the hard limit (ulimit -Hn)"
        );
        return;
    }
    let mut d = Daemon::new();
    let names: Vec<String> = (0..o.sessions).map(|i| format!("s{i}")).collect();
    for n in &names {
        d.write(&format!("{n}.yaml"), &session(n));
    }
    d.start_with_file_limit(o.limit, o.limit);
    let answering = |d: &Daemon| {
        names.iter().all(|n| {
            d.get(&format!("{n}.localhost"), "/healthz")
                .is_some_and(|(c, _)| c == 200)
        })
    };
    if daemon_support::wait_for(Duration::from_secs(60), || answering(&d)).is_none() {
        println!("hostile: the sessions do not answer; log:\n{}", d.log());
        return;
    }
    let budget = d
        .log()
        .lines()
        .find(|l| l.contains("open files:"))
        .map(|l| l.trim().to_string())
        .unwrap_or_default();
    println!(
        "hostile long form: vessel run under an open-file limit of {}, {} process sessions",
        o.limit, o.sessions
    );
    println!("  {budget}");
    phase(&d, &o, Attack::Idle, &names);
    // Let the daemon's idle and header timeouts clear what the first phase left.
    std::thread::sleep(Duration::from_secs(11));
    phase(&d, &o, Attack::Slowloris, &names);
    let log = d.log();
    println!(
        "\"Too many open files\" in the daemon's log: {}",
        log.matches("Too many open files").count() + log.matches("os error 24").count()
    );
}
