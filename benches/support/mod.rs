//! Helpers the benches share: loopback ports, plain HTTP GETs, waiting, percentiles, a
//! `vessel devserver` upstream, `wrk` runs and an nginx with 1,000 server names to compare
//! against. Included by path (`mod support;`), so each bench takes what it uses.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

pub fn get(addr: SocketAddr, host: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    Some((buf.get(9..12)?.parse().ok()?, buf))
}

pub fn wait_for(limit: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    None
}

pub fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

pub fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// A child process, stopped (SIGTERM) and reaped on drop.
pub struct Kill(pub Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.0.wait();
    }
}

pub fn vessel() -> &'static str {
    env!("CARGO_BIN_EXE_vessel")
}

pub fn devserver(port: u16, root: &Path) -> Kill {
    let child = Command::new(vessel())
        .args([
            "devserver",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--root",
            &root.display().to_string(),
            "--name",
            "upstream",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("devserver");
    wait_for(Duration::from_secs(5), || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .expect("devserver listens");
    Kill(child)
}

pub fn wrk(url: &str, host: Option<&str>) -> Option<(f64, String)> {
    let mut cmd = Command::new("wrk");
    cmd.args(["-t2", "-c64", "-d8s", "--latency"]);
    if let Some(h) = host {
        cmd.args(["-H", &format!("Host: {h}")]);
    }
    let out = cmd.arg(url).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())?;
    let p99 = text
        .lines()
        .find(|l| l.trim_start().starts_with("99%"))
        .map(|l| l.split_whitespace().nth(1).unwrap_or("").to_string())
        .unwrap_or_default();
    let errors = text
        .lines()
        .find(|l| l.contains("Non-2xx") || l.contains("Socket errors"))
        .map(|l| format!(" [{}]", l.trim()))
        .unwrap_or_default();
    Some((rps, format!("p99 {p99}{errors}")))
}

pub fn nginx(upstream: u16, dir: &Path) -> Option<(Kill, u16)> {
    Command::new("nginx").arg("-v").output().ok()?;
    let port = free_port();
    let mut servers = String::new();
    for i in 0..1000 {
        servers.push_str(&format!(
            "server {{ listen 127.0.0.1:{port}; server_name r{i}.localhost; location / {{ proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_set_header Host $host; proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; proxy_set_header X-Forwarded-Host $host; proxy_set_header X-Forwarded-Proto $scheme; }} }}\n"
        ));
    }
    let conf = format!(
        "worker_processes auto; pid {d}/nginx.pid; error_log {d}/error.log; events {{ worker_connections 4096; }}\n\
         http {{ access_log off; server_names_hash_max_size 4096; server_names_hash_bucket_size 128;\n\
         upstream up {{ server 127.0.0.1:{upstream}; keepalive 128; }}\n{servers}}}\n",
        d = dir.display()
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).ok()?;
    let child = Command::new("nginx")
        .args([
            "-c",
            &path.display().to_string(),
            "-p",
            &dir.display().to_string(),
            "-g",
            "daemon off;",
        ])
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    wait_for(Duration::from_secs(5), || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    })?;
    Some((Kill(child), port))
}

/// Serve `proxy` on a new listener on 127.0.0.1 as the daemon serves it (a thread per core),
/// until the token is cancelled: its address.
pub fn serve_proxy(
    proxy: &vessel::proxy::Proxy,
) -> (SocketAddr, tokio_util::sync::CancellationToken) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let cancel = tokio_util::sync::CancellationToken::new();
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    proxy
        .serve_threads(listener, threads, Default::default(), cancel.clone())
        .expect("serve");
    (addr, cancel)
}
