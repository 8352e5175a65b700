//! Desired state from a git repository: real remotes on this machine, a bare repository over
//! file:// and the same served by `git daemon` over git://.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::daemon_support::{Daemon, PLAN, free_port, session, wait_for};
use crate::support::{base64, git};

const LIMIT: Duration = Duration::from_secs(20);

/// A bare remote and a work clone with the plan and alice committed and pushed.
struct Remote {
    bare: PathBuf,
    work: PathBuf,
}

impl Remote {
    fn new(root: &Path) -> Remote {
        let bare = root.join("remote.git");
        let work = root.join("work");
        git(
            root,
            &[
                "init",
                "-q",
                "--bare",
                "-b",
                "main",
                bare.to_str().expect("utf-8"),
            ],
        );
        git(
            root,
            &[
                "clone",
                "-q",
                bare.to_str().expect("utf-8"),
                work.to_str().expect("utf-8"),
            ],
        );
        std::fs::create_dir_all(work.join("sessions")).expect("mkdir");
        std::fs::write(work.join("sessions/plan.yaml"), PLAN).expect("plan");
        std::fs::write(work.join("sessions/alice.yaml"), session("alice")).expect("alice");
        let r = Remote { bare, work };
        r.commit("plan and alice");
        r
    }

    fn commit(&self, message: &str) {
        git(&self.work, &["add", "-A"]);
        git(&self.work, &["commit", "-q", "-m", message]);
        git(&self.work, &["push", "-q", "origin", "HEAD:main"]);
    }
}

fn git_daemon(url: &str, d: &mut Daemon) {
    let cfg = std::fs::read_to_string(d.dir.path().join("vessel.yaml")).expect("config");
    let cfg = cfg.replace(
        "source: {dir: desired}",
        &format!("source: {{git: {{url: '{url}', ref: main, path: sessions, poll_interval: 1s}}}}"),
    );
    std::fs::write(d.dir.path().join("vessel.yaml"), cfg).expect("config");
}

fn serves(d: &Daemon, name: &str) -> bool {
    d.get(&format!("{name}.localhost"), "/healthz")
        .is_some_and(|(c, _)| c == 200)
}

fn status(d: &Daemon) -> serde_json::Value {
    crate::daemon_support::get(d.status, "status", "/status")
        .and_then(|(_, b)| serde_json::from_str(&b).ok())
        .unwrap_or_default()
}

#[test]
fn commits_converge_deletes_tear_down_and_reverts_bring_back() {
    let mut d = Daemon::new();
    let remote = Remote::new(d.dir.path());
    git_daemon(&format!("file://{}", remote.bare.display()), &mut d);
    d.start();
    wait_for(LIMIT, || serves(&d, "alice")).expect("alice serves from the remote");
    let rev = status(&d)["revision"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        rev.ends_with("plan and alice"),
        "the revision (commit and summary) shows: {rev}"
    );

    std::fs::write(remote.work.join("sessions/bob.yaml"), session("bob")).expect("bob");
    remote.commit("add bob");
    let took =
        wait_for(LIMIT, || serves(&d, "bob")).expect("a commit that adds a session converges");
    eprintln!(
        "commit to serving: {} ms (poll interval 1 s)",
        took.as_millis()
    );
    let events = std::fs::read_to_string(d.state().join("events.jsonl")).unwrap_or_default();
    assert!(
        events
            .lines()
            .any(|l| l.contains("session bob") && l.contains("add bob")),
        "events carry the revision: {events}"
    );

    std::fs::remove_file(remote.work.join("sessions/bob.yaml")).expect("rm");
    remote.commit("remove bob");
    wait_for(LIMIT, || {
        d.get("bob.localhost", "/healthz")
            .is_some_and(|(c, _)| c == 404)
            && d.processes().iter().all(|(n, _)| n != "bob")
    })
    .expect("a commit that deletes it tears it down");

    git(&remote.work, &["revert", "--no-edit", "HEAD"]);
    git(&remote.work, &["push", "-q", "origin", "HEAD:main"]);
    wait_for(LIMIT, || serves(&d, "bob")).expect("a revert brings it back");
}

#[test]
fn an_unreachable_remote_and_broken_yaml_keep_everything_running() {
    let mut d = Daemon::new();
    let remote = Remote::new(d.dir.path());
    std::fs::write(remote.work.join("sessions/bob.yaml"), session("bob")).expect("bob");
    remote.commit("add bob");
    git_daemon(&format!("file://{}", remote.bare.display()), &mut d);
    d.start();
    wait_for(LIMIT, || serves(&d, "alice") && serves(&d, "bob")).expect("both serve");
    let before = d.processes();

    // Broken YAML in a commit: bob's file is held as it is.
    std::fs::write(
        remote.work.join("sessions/bob.yaml"),
        "kind: Session\nname: bob\nplan: [web\n",
    )
    .expect("break");
    remote.commit("break bob");
    wait_for(LIMIT, || {
        status(&d)["quarantined"]
            .as_array()
            .is_some_and(|q| !q.is_empty())
    })
    .expect("the broken file shows");
    assert_eq!(d.processes(), before);

    // The remote goes away: the last good revision stays applied, and status says why.
    std::fs::rename(&remote.bare, d.dir.path().join("gone.git")).expect("move the remote away");
    wait_for(LIMIT, || {
        status(&d)["last_pass"]["source_error"].is_string()
    })
    .expect("status shows the fetch error");
    let since = status(&d)["source_failing_since"]
        .as_str()
        .map(str::to_string)
        .expect("and since when");
    assert!(
        status(&d)["source_error"]
            .as_str()
            .is_some_and(|e| e.contains("last fetched revision")),
        "{}",
        status(&d)
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(d.processes(), before, "nothing was torn down");
    assert!(serves(&d, "alice") && serves(&d, "bob"));
    assert_eq!(
        status(&d)["source_failing_since"].as_str(),
        Some(since.as_str()),
        "since when stays put while it fails"
    );
}

#[test]
fn a_force_push_to_an_older_commit_is_applied_like_any_other() {
    let mut d = Daemon::new();
    let remote = Remote::new(d.dir.path());
    std::fs::write(remote.work.join("sessions/bob.yaml"), session("bob")).expect("bob");
    remote.commit("add bob");
    git_daemon(&format!("file://{}", remote.bare.display()), &mut d);
    d.start();
    wait_for(LIMIT, || serves(&d, "alice") && serves(&d, "bob")).expect("both serve");
    git(&remote.work, &["reset", "-q", "--hard", "HEAD~1"]);
    git(
        &remote.work,
        &["push", "-q", "--force", "origin", "HEAD:main"],
    );
    wait_for(LIMIT, || {
        d.get("bob.localhost", "/healthz")
            .is_some_and(|(c, _)| c == 404)
    })
    .expect("the older revision is applied");
    // Status publishes the revision when the pass ends, a moment after the route goes.
    wait_for(LIMIT, || {
        status(&d)["revision"]
            .as_str()
            .is_some_and(|r| r.ends_with("plan and alice"))
    })
    .unwrap_or_else(|| panic!("{}", status(&d)));
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_same_repository_served_by_git_daemon() {
    let mut d = Daemon::new();
    let remote = Remote::new(d.dir.path());
    let port = free_port();
    let base = d.dir.path().to_path_buf();
    let _daemon = Kill(
        Command::new("git")
            .args([
                "daemon",
                "--export-all",
                "--reuseaddr",
                "--listen=127.0.0.1",
                &format!("--port={port}"),
                &format!("--base-path={}", base.display()),
                &base.display().to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("git daemon runs"),
    );
    wait_for(LIMIT, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .expect("git daemon listens");
    git_daemon(&format!("git://127.0.0.1:{port}/remote.git"), &mut d);
    d.start();
    wait_for(LIMIT, || serves(&d, "alice")).expect("alice serves from git://");
    std::fs::write(remote.work.join("sessions/carol.yaml"), session("carol")).expect("carol");
    remote.commit("add carol");
    wait_for(LIMIT, || serves(&d, "carol")).expect("a commit over git:// converges");
}

fn post(addr: std::net::SocketAddr, body: &str, header: Option<(&str, String)>) -> u16 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    let h = header
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .unwrap_or_default();
    write!(s, "POST /hook HTTP/1.0\r\nHost: hook\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{h}\r\n{body}", body.len()).expect("write");
    let mut buf = String::new();
    s.read_to_string(&mut buf).expect("read");
    buf.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0)
}

#[test]
fn a_signed_webhook_fetches_at_once_and_bad_signatures_change_nothing() {
    let mut d = Daemon::new();
    let remote = Remote::new(d.dir.path());
    git_daemon(&format!("file://{}", remote.bare.display()), &mut d);
    let hook = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    // Poll and resync rarely, so only the webhook can make it fetch soon.
    let cfg = std::fs::read_to_string(d.dir.path().join("vessel.yaml")).expect("config")
        .replace("poll_interval: 1s}}", &format!("poll_interval: 60s, webhook: {{listen: '{hook}', secret: {{env: VESSEL_TEST_HOOK_SECRET}}}}}}}}"))
        .replace("resync_interval: 1s", "resync_interval: 60s");
    std::fs::write(d.dir.path().join("vessel.yaml"), cfg).expect("config");
    d.start_with_env(Some(("VESSEL_TEST_HOOK_SECRET", "hook-s3cret")));
    wait_for(LIMIT, || serves(&d, "alice")).expect("alice serves");

    std::fs::write(remote.work.join("sessions/dora.yaml"), session("dora")).expect("dora");
    remote.commit("add dora");
    let body = r#"{"ref":"refs/heads/main"}"#;
    // Wrong and missing signatures: 401, no fetch.
    let wrong = format!(
        "sha256={}",
        hex::encode(vessel::webhook::hmac_sha256(
            b"not-the-secret",
            body.as_bytes()
        ))
    );
    assert_eq!(post(hook, body, Some(("X-Hub-Signature-256", wrong))), 401);
    assert_eq!(post(hook, body, None), 401);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!serves(&d, "dora"), "an unsigned poke changed nothing");
    // The right signature: fetched and applied within about a second.
    let sig = format!(
        "sha256={}",
        hex::encode(vessel::webhook::hmac_sha256(
            b"hook-s3cret",
            body.as_bytes()
        ))
    );
    assert_eq!(post(hook, body, Some(("X-Hub-Signature-256", sig))), 202);
    let took = wait_for(LIMIT, || serves(&d, "dora")).expect("the webhook makes it fetch now");
    eprintln!("webhook to serving: {} ms", took.as_millis());
    assert!(
        !d.log().contains("hook-s3cret"),
        "the secret never shows in the log"
    );
}

#[test]
fn with_verification_on_an_unsigned_commit_is_refused() {
    let mut d = Daemon::new();
    let root = d.dir.path().to_path_buf();
    // A signing key and an allowed-signers file naming it.
    let key = root.join("signing");
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "t@example.com", "-f"])
        .arg(&key)
        .output()
        .expect("ssh-keygen runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let public = std::fs::read_to_string(key.with_extension("pub")).expect("public key");
    std::fs::write(
        root.join("allowed_signers"),
        format!("t@example.com {public}"),
    )
    .expect("allowed signers");

    let bare = root.join("remote.git");
    let work = root.join("work");
    git(
        &root,
        &[
            "init",
            "-q",
            "--bare",
            "-b",
            "main",
            bare.to_str().expect("utf-8"),
        ],
    );
    git(
        &root,
        &[
            "clone",
            "-q",
            bare.to_str().expect("utf-8"),
            work.to_str().expect("utf-8"),
        ],
    );
    git(&work, &["config", "gpg.format", "ssh"]);
    git(
        &work,
        &["config", "user.signingkey", key.to_str().expect("utf-8")],
    );
    std::fs::create_dir_all(work.join("sessions")).expect("mkdir");
    std::fs::write(work.join("sessions/plan.yaml"), PLAN).expect("plan");
    std::fs::write(work.join("sessions/alice.yaml"), session("alice")).expect("alice");
    git(&work, &["add", "-A"]);
    git(
        &work,
        &["commit", "-q", "-S", "-m", "signed: plan and alice"],
    );
    git(&work, &["push", "-q", "origin", "HEAD:main"]);

    git_daemon(&format!("file://{}", bare.display()), &mut d);
    let cfg = std::fs::read_to_string(root.join("vessel.yaml"))
        .expect("config")
        .replace(
            "poll_interval: 1s}}",
            "poll_interval: 1s, verify: {allowed_signers: allowed_signers}}}",
        );
    std::fs::write(root.join("vessel.yaml"), cfg).expect("config");
    d.start();
    wait_for(LIMIT, || serves(&d, "alice")).expect("a signed commit is applied");

    // An unsigned commit: refused, the last verified revision stays applied, status says why.
    std::fs::write(work.join("sessions/bob.yaml"), session("bob")).expect("bob");
    git(&work, &["add", "-A"]);
    git(
        &work,
        &["commit", "-q", "--no-gpg-sign", "-m", "unsigned: add bob"],
    );
    git(&work, &["push", "-q", "origin", "HEAD:main"]);
    wait_for(LIMIT, || {
        status(&d)["last_pass"]["source_error"]
            .as_str()
            .is_some_and(|e| e.contains("is not signed"))
    })
    .expect("status says the commit is not signed");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!serves(&d, "bob"), "the unsigned commit was not applied");
    assert!(serves(&d, "alice"));
    assert!(
        status(&d)["revision"]
            .as_str()
            .is_some_and(|r| r.ends_with("signed: plan and alice")),
        "{}",
        status(&d)
    );

    // A signed commit on top is applied (with bob, whose file it carries).
    std::fs::write(work.join("sessions/carol.yaml"), session("carol")).expect("carol");
    git(&work, &["add", "-A"]);
    git(&work, &["commit", "-q", "-S", "-m", "signed: add carol"]);
    git(&work, &["push", "-q", "origin", "HEAD:main"]);
    wait_for(LIMIT, || serves(&d, "carol") && serves(&d, "bob"))
        .expect("the next signed commit is applied");

    // The key is revoked: its commits no longer verify, not even the last one applied, so
    // nothing is planned (and nothing running is touched).
    let before = d.processes();
    std::fs::write(root.join("allowed_signers"), "").expect("revoke");
    wait_for(LIMIT, || {
        status(&d)["last_pass"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("today's allowed signers"))
    })
    .unwrap_or_else(|| panic!("{}", status(&d)));
    assert_eq!(d.processes(), before);
}

/// `git http-backend` behind HTTP Basic auth: a small CGI server, a thread per connection.
fn http_backend(root: PathBuf, user: &str, pass: &str) -> u16 {
    use std::io::{BufRead, BufReader, Read, Write};
    let port = free_port();
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind");
    let expected = format!("Basic {}", base64(format!("{user}:{pass}").as_bytes()));
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (root, expected) = (root.clone(), expected.clone());
            std::thread::spawn(move || {
                let mut r = BufReader::new(stream.try_clone().expect("clone"));
                let mut line = String::new();
                if r.read_line(&mut line).is_err() {
                    return;
                }
                let mut parts = line.split_whitespace();
                let (method, target) = (
                    parts.next().unwrap_or("GET").to_string(),
                    parts.next().unwrap_or("/").to_string(),
                );
                let (path, query) = target
                    .split_once('?')
                    .map(|(p, q)| (p.to_string(), q.to_string()))
                    .unwrap_or((target.clone(), String::new()));
                let mut headers = std::collections::HashMap::new();
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).is_err() || h.trim().is_empty() {
                        break;
                    }
                    if let Some((k, v)) = h.split_once(':') {
                        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
                    }
                }
                let mut body = Vec::new();
                if headers
                    .get("transfer-encoding")
                    .is_some_and(|t| t.contains("chunked"))
                {
                    loop {
                        let mut size = String::new();
                        if r.read_line(&mut size).is_err() {
                            return;
                        }
                        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
                        if n == 0 {
                            let mut end = String::new();
                            let _ = r.read_line(&mut end);
                            break;
                        }
                        let mut chunk = vec![0; n + 2];
                        if r.read_exact(&mut chunk).is_err() {
                            return;
                        }
                        body.extend_from_slice(&chunk[..n]);
                    }
                } else if let Some(n) = headers
                    .get("content-length")
                    .and_then(|n| n.parse::<usize>().ok())
                {
                    body.resize(n, 0);
                    if r.read_exact(&mut body).is_err() {
                        return;
                    }
                }
                let mut out = stream;
                // Only vessel's own transport (rustls-capable, src/source/transport.rs) is
                // served: libgit2's built-in HTTP client would say `git/2.0 (libgit2 ...)`.
                if !headers
                    .get("user-agent")
                    .is_some_and(|ua| ua.starts_with("git/2.0 (vessel "))
                {
                    let _ = out.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                    return;
                }
                if headers.get("authorization") != Some(&expected) {
                    let _ = out.write_all(b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"git\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                    return;
                }
                let mut cmd = Command::new("git");
                cmd.arg("http-backend")
                    .env("GIT_PROJECT_ROOT", &root)
                    .env("GIT_HTTP_EXPORT_ALL", "1")
                    .env("REQUEST_METHOD", &method)
                    .env("PATH_INFO", &path)
                    .env("QUERY_STRING", &query)
                    .env(
                        "CONTENT_TYPE",
                        headers.get("content-type").cloned().unwrap_or_default(),
                    )
                    .env("CONTENT_LENGTH", body.len().to_string())
                    .env("REMOTE_USER", "tester")
                    .env("REMOTE_ADDR", "127.0.0.1")
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null());
                if let Some(enc) = headers.get("content-encoding") {
                    cmd.env("HTTP_CONTENT_ENCODING", enc);
                }
                let Ok(mut child) = cmd.spawn() else { return };
                if let Some(mut stdin) = child.stdin.take() {
                    let _ = stdin.write_all(&body);
                }
                let Ok(cgi) = child.wait_with_output() else {
                    return;
                };
                let split = cgi
                    .stdout
                    .windows(4)
                    .position(|w| w == b"\r\n\r\n")
                    .map(|i| (i, 4))
                    .or_else(|| {
                        cgi.stdout
                            .windows(2)
                            .position(|w| w == b"\n\n")
                            .map(|i| (i, 2))
                    });
                let (head, payload) = match split {
                    Some((i, n)) => (
                        String::from_utf8_lossy(&cgi.stdout[..i]).into_owned(),
                        cgi.stdout[i + n..].to_vec(),
                    ),
                    None => (String::new(), cgi.stdout.clone()),
                };
                let mut status = "200 OK".to_string();
                let mut resp = String::new();
                for h in head.lines() {
                    match h.split_once(':') {
                        Some((k, v)) if k.eq_ignore_ascii_case("status") => {
                            status = v.trim().to_string()
                        }
                        Some(_) => resp.push_str(&format!("{}\r\n", h.trim_end())),
                        None => {}
                    }
                }
                let _ = out.write_all(format!("HTTP/1.1 {status}\r\n{resp}Content-Length: {}\r\nConnection: close\r\n\r\n", payload.len()).as_bytes());
                let _ = out.write_all(&payload);
            });
        }
    });
    port
}

#[test]
fn over_http_with_basic_auth_and_a_wrong_password_fails_visibly() {
    let mut d = Daemon::new();
    let remote = Remote::new(d.dir.path());
    let port = http_backend(d.dir.path().to_path_buf(), "vessel", "pa55-word-value");
    let url = format!("http://127.0.0.1:{port}/remote.git");
    git_daemon(&url, &mut d);
    let cfg = std::fs::read_to_string(d.dir.path().join("vessel.yaml")).expect("config")
        .replace("poll_interval: 1s}}", "poll_interval: 1s, auth: {basic: {username: vessel, password: {env: VESSEL_TEST_GIT_PASSWORD}}}}}");
    std::fs::write(d.dir.path().join("vessel.yaml"), cfg.clone()).expect("config");
    d.start_with_env(Some(("VESSEL_TEST_GIT_PASSWORD", "pa55-word-value")));
    wait_for(LIMIT, || serves(&d, "alice"))
        .expect("alice serves from an authenticated http remote");
    std::fs::write(remote.work.join("sessions/erin.yaml"), session("erin")).expect("erin");
    remote.commit("add erin");
    wait_for(LIMIT, || serves(&d, "erin")).expect("commits over http converge");
    drop(d);

    // The wrong password: nothing is applied, status says why, the password never shows.
    let mut w = Daemon::new();
    w.write("plan.yaml", PLAN);
    git_daemon(&url, &mut w);
    let cfg = std::fs::read_to_string(w.dir.path().join("vessel.yaml")).expect("config")
        .replace("poll_interval: 1s}}", "poll_interval: 1s, auth: {basic: {username: vessel, password: {env: VESSEL_TEST_GIT_PASSWORD}}}}}");
    std::fs::write(w.dir.path().join("vessel.yaml"), cfg).expect("config");
    w.start_with_env(Some(("VESSEL_TEST_GIT_PASSWORD", "wrong-pa55-value")));
    wait_for(LIMIT, || {
        status(&w)["last_pass"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("nothing has been fetched"))
    })
    .expect("status says the fetch fails");
    assert!(w.processes().is_empty(), "nothing is applied");
    let everything = format!("{}{}", w.log(), status(&w));
    assert!(
        !everything.contains("wrong-pa55-value"),
        "the password never shows"
    );
}

fn keygen(path: &Path) -> String {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .output()
        .expect("ssh-keygen runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_to_string(path.with_extension("pub"))
        .expect("public key")
        .trim()
        .to_string()
}

#[test]
fn over_ssh_with_a_key_and_known_hosts_checking() {
    let mut d = Daemon::new();
    let root = d.dir.path().to_path_buf();
    let remote = Remote::new(&root);
    // A real sshd on a loopback port, accepting one key.
    let host_pub = keygen(&root.join("host_key"));
    let user_pub = keygen(&root.join("user_key"));
    std::fs::write(root.join("authorized_keys"), format!("{user_pub}\n")).expect("authorized_keys");
    let port = free_port();
    std::fs::write(
        root.join("sshd_config"),
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\nPermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nStrictModes no\nUsePAM no\nPidFile none\nLogLevel ERROR\n",
            root.join("host_key").display(),
            root.join("authorized_keys").display()
        ),
    )
    .expect("sshd_config");
    let _ = std::fs::create_dir_all("/run/sshd");
    let _sshd = Kill(
        Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(root.join("sshd_config"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("sshd runs (openssh-server; .ci/run installs it)"),
    );
    wait_for(LIMIT, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .expect("sshd listens");
    let user = String::from_utf8_lossy(&Command::new("id").arg("-un").output().expect("id").stdout)
        .trim()
        .to_string();
    std::fs::write(
        root.join("known_hosts"),
        format!("[127.0.0.1]:{port} {host_pub}\n"),
    )
    .expect("known_hosts");
    let url = format!("ssh://{user}@127.0.0.1:{port}{}", remote.bare.display());
    git_daemon(&url, &mut d);
    let auth = "poll_interval: 1s, auth: {ssh: {key: user_key, known_hosts: known_hosts}}}}";
    let cfg = std::fs::read_to_string(root.join("vessel.yaml"))
        .expect("config")
        .replace("poll_interval: 1s}}", auth);
    std::fs::write(root.join("vessel.yaml"), cfg).expect("config");
    d.start();
    wait_for(LIMIT, || serves(&d, "alice"))
        .unwrap_or_else(|| panic!("alice serves over ssh: {}\n{}", status(&d), d.log()));
    std::fs::write(remote.work.join("sessions/finn.yaml"), session("finn")).expect("finn");
    remote.commit("add finn");
    wait_for(LIMIT, || serves(&d, "finn")).expect("commits over ssh converge");
    let user_key = std::fs::read(root.join("user_key")).expect("key");
    // The first daemon stays up: the remote and sshd live in its directory.

    // A known_hosts that does not have this server's key: refused, nothing applied.
    let mut w = Daemon::new();
    let other = keygen(&w.dir.path().join("other_host_key"));
    std::fs::write(w.dir.path().join("user_key"), &user_key).expect("key");
    let _ = std::fs::set_permissions(
        w.dir.path().join("user_key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    );
    std::fs::write(
        w.dir.path().join("known_hosts"),
        format!("[127.0.0.1]:{port} {other}\n"),
    )
    .expect("known_hosts");
    git_daemon(&url, &mut w);
    let cfg = std::fs::read_to_string(w.dir.path().join("vessel.yaml"))
        .expect("config")
        .replace("poll_interval: 1s}}", auth);
    std::fs::write(w.dir.path().join("vessel.yaml"), cfg).expect("config");
    w.start();
    wait_for(LIMIT, || {
        status(&w)["source_error"]
            .as_str()
            .is_some_and(|e| e.contains("known_hosts") || e.contains("hostkey"))
    })
    .unwrap_or_else(|| panic!("{}", status(&w)));
    assert!(
        w.processes().is_empty(),
        "nothing is applied from an unknown host"
    );
}
