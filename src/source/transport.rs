//! vessel's own git transports, registered with libgit2 in place of its built-in ones, so the
//! binary links neither the system's OpenSSL (libgit2's HTTPS) nor libssh2 (libgit2's SSH):
//!
//! - `http://` and `https://`: git's smart HTTP protocol over hyper with rustls (the ring
//!   provider, the system's root certificates);
//! - `ssh://`: the OpenSSH client (`ssh`), as git itself does it, with the configured key and
//!   known_hosts file and strict host-key checking.
//!
//! It owns the wire only: what is fetched and kept is `git.rs`'s. Credentials come from the
//! fetch running on this thread (`with_auth`), never from the environment; they are never
//! part of an error. Fetch only: a push is refused.

use std::cell::RefCell;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use bytes::Bytes;
use git2::transport::{Service, SmartSubtransport, SmartSubtransportStream, Transport};
use http_body_util::{BodyExt, Full};

use crate::config::Secret;

/// How long a connection may take to open, and a read may wait for the next bytes.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const READ_TIMEOUT: Duration = Duration::from_secs(15);

/// The credentials of the fetch running on this thread.
#[derive(Clone)]
pub enum Auth {
    /// HTTP Basic (a token is the password of its user name).
    Basic { username: String, secret: Secret },
    /// An SSH key, and the known_hosts file the server's key must be in.
    Ssh {
        key: PathBuf,
        known_hosts: PathBuf,
        username: String,
    },
}

thread_local! {
    static AUTH: RefCell<Option<Auth>> = const { RefCell::new(None) };
}

/// Run `f` (a fetch) with `auth` as the credentials of the transports it opens.
pub fn with_auth<T>(auth: Option<Auth>, f: impl FnOnce() -> T) -> T {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            AUTH.with(|a| a.borrow_mut().take());
        }
    }
    AUTH.with(|a| *a.borrow_mut() = auth);
    let _reset = Reset;
    f()
}

fn current_auth() -> Option<Auth> {
    AUTH.with(|a| a.borrow().clone())
}

/// Register the transports. Call once, before any thread uses libgit2 (`cli::main` does, from
/// `git::init_network_timeouts`).
///
/// # Safety
/// libgit2's transport registry is not synchronised: no other thread may be creating a
/// transport at the same time.
pub unsafe fn register() -> Result<(), git2::Error> {
    for scheme in ["http", "https"] {
        // SAFETY: the caller guarantees no concurrent transport creation.
        unsafe {
            git2::transport::register(scheme, |remote| {
                Transport::smart(
                    remote,
                    true,
                    HttpTransport {
                        auth: current_auth(),
                        base: Arc::new(Mutex::new(None)),
                    },
                )
            })?;
        }
    }
    // SAFETY: as above.
    unsafe {
        git2::transport::register("ssh", |remote| {
            Transport::smart(
                remote,
                false,
                SshTransport {
                    auth: current_auth(),
                    conn: Mutex::new(None),
                },
            )
        })
    }
}

fn io_err(message: impl Into<String>) -> std::io::Error {
    std::io::Error::other(message.into())
}

// ---- smart HTTP ----

struct HttpTransport {
    auth: Option<Auth>,
    /// The repository URL after a redirect of the first request, for the ones after it.
    base: Arc<Mutex<Option<String>>>,
}

impl SmartSubtransport for HttpTransport {
    fn action(
        &self,
        url: &str,
        action: Service,
    ) -> Result<Box<dyn SmartSubtransportStream>, git2::Error> {
        let base = crate::lock_or_reset(&self.base)
            .clone()
            .unwrap_or_else(|| url.trim_end_matches('/').to_string());
        let (get, path) = match action {
            Service::UploadPackLs => (true, "/info/refs?service=git-upload-pack"),
            Service::UploadPack => (false, "/git-upload-pack"),
            Service::ReceivePackLs | Service::ReceivePack => {
                return Err(git2::Error::from_str(
                    "vessel only fetches; it never pushes",
                ));
            }
        };
        let authorization = match &self.auth {
            Some(Auth::Basic { username, secret }) => Some(format!(
                "Basic {}",
                base64(format!("{username}:{}", secret.expose()).as_bytes())
            )),
            _ => None,
        };
        Ok(Box::new(HttpStream {
            base,
            path,
            get,
            authorization,
            body: Vec::new(),
            response: None,
            pending: Bytes::new(),
            redirected: self.base.clone(),
        }))
    }

    fn close(&self) -> Result<(), git2::Error> {
        Ok(())
    }
}

struct HttpStream {
    base: String,
    path: &'static str,
    get: bool,
    authorization: Option<String>,
    /// What libgit2 wrote: the request body of a POST.
    body: Vec<u8>,
    response: Option<Response>,
    pending: Bytes,
    /// Where a redirect of the first request moved the repository, for the requests after it.
    redirected: Arc<Mutex<Option<String>>>,
}

struct Response {
    runtime: tokio::runtime::Runtime,
    body: hyper::body::Incoming,
}

fn client() -> Result<
    hyper_util::client::legacy::Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        Full<Bytes>,
    >,
    std::io::Error,
> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = hyper_rustls::HttpsConnectorBuilder::new();
    let builder = match builder.with_provider_and_native_roots(provider.clone()) {
        Ok(b) => b,
        // No root certificate on this machine: http:// still works, https:// says why.
        Err(_) => hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| io_err(format!("cannot set up TLS: {e}")))?
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
        ),
    };
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    let connector = builder.https_or_http().enable_http1().wrap_connector(http);
    Ok(
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(connector),
    )
}

impl HttpStream {
    fn send(&mut self) -> std::io::Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| io_err(format!("cannot start an HTTP client: {e}")))?;
        let client = client()?;
        let mut url = format!("{}{}", self.base, self.path);
        for _ in 0..5 {
            let mut req = http::Request::builder().uri(&url).header(
                http::header::USER_AGENT,
                concat!("git/2.0 (vessel ", env!("CARGO_PKG_VERSION"), ")"),
            );
            if let Some(a) = &self.authorization {
                req = req.header(http::header::AUTHORIZATION, a);
            }
            let req = if self.get {
                req.method(http::Method::GET).body(Full::new(Bytes::new()))
            } else {
                req.method(http::Method::POST)
                    .header(
                        http::header::CONTENT_TYPE,
                        "application/x-git-upload-pack-request",
                    )
                    .header(http::header::ACCEPT, "application/x-git-upload-pack-result")
                    .body(Full::new(Bytes::from(std::mem::take(&mut self.body))))
            }
            .map_err(|e| io_err(format!("bad request URL {}: {e}", redact_url(&url))))?;
            let response = runtime
                .block_on(async {
                    tokio::time::timeout(CONNECT_TIMEOUT + READ_TIMEOUT, client.request(req)).await
                })
                .map_err(|_| {
                    io_err(format!(
                        "{} did not answer within {}s",
                        redact_url(&url),
                        (CONNECT_TIMEOUT + READ_TIMEOUT).as_secs()
                    ))
                })?
                .map_err(|e| {
                    io_err(format!(
                        "request to {} failed: {}",
                        redact_url(&url),
                        crate::error_chain(&e)
                    ))
                })?;
            let status = response.status();
            if status.is_redirection() && self.get {
                let Some(location) = response
                    .headers()
                    .get(http::header::LOCATION)
                    .and_then(|l| l.to_str().ok())
                else {
                    return Err(io_err(format!(
                        "{} redirected without a location",
                        redact_url(&url)
                    )));
                };
                let Some(base) = location.strip_suffix(self.path) else {
                    return Err(io_err(format!(
                        "{} redirected to {}, which is not the same repository",
                        redact_url(&url),
                        redact_url(location)
                    )));
                };
                *crate::lock_or_reset(&self.redirected) = Some(base.to_string());
                self.base = base.to_string();
                url = location.to_string();
                continue;
            }
            match status.as_u16() {
                200 => {}
                401 | 403 if self.authorization.is_some() => {
                    return Err(io_err("the remote refused the configured credentials"));
                }
                401 | 403 => {
                    return Err(io_err("the remote requires credentials (source.git.auth)"));
                }
                404 => {
                    return Err(io_err(format!(
                        "no repository at {}",
                        redact_url(&self.base)
                    )));
                }
                code => {
                    return Err(io_err(format!("{} answered {code}", redact_url(&url))));
                }
            }
            let expected = if self.get {
                "application/x-git-upload-pack-advertisement"
            } else {
                "application/x-git-upload-pack-result"
            };
            let content_type = response
                .headers()
                .get(http::header::CONTENT_TYPE)
                .and_then(|c| c.to_str().ok())
                .unwrap_or("");
            if !content_type.starts_with(expected) {
                return Err(io_err(format!(
                    "{} is not a smart git HTTP server (content type `{content_type}`)",
                    redact_url(&self.base)
                )));
            }
            self.response = Some(Response {
                runtime,
                body: response.into_body(),
            });
            return Ok(());
        }
        Err(io_err(format!(
            "{} redirected too many times",
            redact_url(&self.base)
        )))
    }
}

impl Read for HttpStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.response.is_none() {
            self.send()?;
        }
        loop {
            if !self.pending.is_empty() {
                let n = buf.len().min(self.pending.len());
                buf[..n].copy_from_slice(&self.pending.split_to(n));
                return Ok(n);
            }
            let Some(r) = self.response.as_mut() else {
                return Ok(0);
            };
            let frame = r
                .runtime
                .block_on(async { tokio::time::timeout(READ_TIMEOUT, r.body.frame()).await })
                .map_err(|_| {
                    io_err(format!(
                        "{} sent nothing for {}s",
                        redact_url(&self.base),
                        READ_TIMEOUT.as_secs()
                    ))
                })?;
            match frame {
                None => return Ok(0),
                Some(Err(e)) => {
                    return Err(io_err(format!(
                        "reading from {} failed: {}",
                        redact_url(&self.base),
                        crate::error_chain(&e)
                    )));
                }
                Some(Ok(f)) => {
                    if let Ok(data) = f.into_data() {
                        self.pending = data;
                    }
                }
            }
        }
    }
}

impl Write for HttpStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.body.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A URL without any user information (`https://user:pass@host/` -> `https://host/`).
fn redact_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            format!("{scheme}://{host}{path}")
        }
        None => url.to_string(),
    }
}

// ---- SSH, through the OpenSSH client ----

struct SshTransport {
    auth: Option<Auth>,
    conn: Mutex<Option<Arc<Mutex<SshConn>>>>,
}

struct SshConn {
    child: Child,
    stdin: Option<ChildStdin>,
    chunks: mpsc::Receiver<std::io::Result<Vec<u8>>>,
    pending: Vec<u8>,
    stderr: Arc<Mutex<Vec<u8>>>,
    host: String,
    known_hosts: Option<PathBuf>,
}

/// The parts of `ssh://[user@]host[:port]/path`.
#[derive(Debug, PartialEq)]
struct SshUrl {
    user: Option<String>,
    host: String,
    port: Option<u16>,
    path: String,
}

fn parse_ssh_url(url: &str) -> Option<SshUrl> {
    let rest = url.strip_prefix("ssh://")?;
    let slash = rest.find('/')?;
    let (authority, path) = rest.split_at(slash);
    let (user, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u.to_string()), h),
        None => (None, authority),
    };
    let (host, port) = if let Some(h) = hostport.strip_prefix('[') {
        let (h, after) = h.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p.parse().ok()?),
            None => None,
        };
        (h.to_string(), port)
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p.parse().ok()?)),
            None => (hostport.to_string(), None),
        }
    };
    if host.is_empty() || host.starts_with('-') {
        return None;
    }
    Some(SshUrl {
        user,
        host,
        port,
        path: path.to_string(),
    })
}

/// A path quoted for the remote shell, as git quotes it.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

impl SshTransport {
    fn connect(&self, url: &str) -> Result<Arc<Mutex<SshConn>>, git2::Error> {
        let parsed = parse_ssh_url(url)
            .ok_or_else(|| git2::Error::from_str("not an ssh://[user@]host[:port]/path URL"))?;
        let mut cmd = Command::new("ssh");
        cmd.args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes"])
            .args([
                "-o",
                &format!("ConnectTimeout={}", CONNECT_TIMEOUT.as_secs()),
            ])
            .args(["-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"]);
        let mut known_hosts = None;
        let mut user = parsed.user.clone();
        if let Some(Auth::Ssh {
            key,
            known_hosts: kh,
            username,
        }) = &self.auth
        {
            // Exactly the configured key and known_hosts: no user or system ssh config.
            cmd.args([
                "-F",
                "none",
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "GlobalKnownHostsFile=/dev/null",
            ])
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", kh.display()))
            .arg("-i")
            .arg(key);
            known_hosts = Some(kh.clone());
            user.get_or_insert_with(|| username.clone());
        }
        if let Some(port) = parsed.port {
            cmd.args(["-p", &port.to_string()]);
        }
        if let Some(u) = &user {
            cmd.args(["-l", u]);
        }
        cmd.arg("--")
            .arg(&parsed.host)
            .arg(format!("git-upload-pack {}", shell_quote(&parsed.path)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env_remove("SSH_ASKPASS")
            .env("SSH_ASKPASS_REQUIRE", "never");
        let mut child = cmd.spawn().map_err(|e| {
            git2::Error::from_str(&format!("cannot run ssh (install openssh-client): {e}"))
        })?;
        let (Some(stdin), Some(mut stdout), Some(mut stderr_pipe)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(git2::Error::from_str("ssh started without its pipes"));
        };
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr_pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let mut s = crate::lock_or_reset(&sink);
                if s.len() < 64 * 1024 {
                    s.extend_from_slice(&buf[..n]);
                }
            }
        });
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match stdout.read(&mut buf) {
                    Ok(0) => {
                        let _ = tx.send(Ok(Vec::new()));
                        break;
                    }
                    Ok(n) => {
                        if tx.send(Ok(buf[..n].to_vec())).is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        break;
                    }
                }
            }
        });
        Ok(Arc::new(Mutex::new(SshConn {
            child,
            stdin: Some(stdin),
            chunks: rx,
            pending: Vec::new(),
            stderr,
            host: parsed.host,
            known_hosts,
        })))
    }
}

impl SmartSubtransport for SshTransport {
    fn action(
        &self,
        url: &str,
        action: Service,
    ) -> Result<Box<dyn SmartSubtransportStream>, git2::Error> {
        let mut slot = self
            .conn
            .lock()
            .map_err(|_| git2::Error::from_str("ssh transport state poisoned"))?;
        let conn = match action {
            Service::UploadPackLs => {
                let conn = self.connect(url)?;
                *slot = Some(conn.clone());
                conn
            }
            // The same connection carries the negotiation after the ref advertisement.
            Service::UploadPack => match slot.as_ref() {
                Some(c) => c.clone(),
                None => {
                    let conn = self.connect(url)?;
                    *slot = Some(conn.clone());
                    conn
                }
            },
            Service::ReceivePackLs | Service::ReceivePack => {
                return Err(git2::Error::from_str(
                    "vessel only fetches; it never pushes",
                ));
            }
        };
        Ok(Box::new(SshStream(conn)))
    }

    fn close(&self) -> Result<(), git2::Error> {
        // A poisoned slot still holds the connection, which must be closed all the same.
        let taken = self.conn.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(conn) = taken {
            let mut c = conn.lock().unwrap_or_else(|p| p.into_inner());
            c.stdin.take();
            let _ = c.child.kill();
            let _ = c.child.wait();
        }
        Ok(())
    }
}

impl Drop for SshTransport {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

struct SshStream(Arc<Mutex<SshConn>>);

impl SshConn {
    /// Why ssh ended, in words (after its output ended early or a read failed).
    fn failure(&mut self) -> std::io::Error {
        // stderr is read to its end by its own thread; give it a moment to get there.
        let status = self.child.wait().ok();
        std::thread::sleep(Duration::from_millis(50));
        let stderr = self
            .stderr
            .lock()
            .map(|s| String::from_utf8_lossy(&s).into_owned())
            .unwrap_or_default();
        if stderr.contains("Host key verification failed") {
            return io_err(match &self.known_hosts {
                Some(kh) => format!(
                    "the host key of {} is not in the configured known_hosts {}",
                    self.host,
                    kh.display()
                ),
                None => format!("the host key of {} is not in known_hosts", self.host),
            });
        }
        if stderr.contains("Permission denied") {
            return io_err("the remote refused the configured SSH key");
        }
        let last = stderr
            .lines()
            .map(str::trim)
            .rfind(|l| !l.is_empty())
            .unwrap_or("no message");
        match status {
            Some(s) => io_err(format!("ssh to {} ended ({s}): {last}", self.host)),
            None => io_err(format!("ssh to {} ended: {last}", self.host)),
        }
    }
}

impl Read for SshStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut c = self
            .0
            .lock()
            .map_err(|_| io_err("ssh transport state poisoned"))?;
        if c.pending.is_empty() {
            match c.chunks.recv_timeout(READ_TIMEOUT) {
                Ok(Ok(chunk)) if chunk.is_empty() => {
                    // The remote ended its output: fine after a complete exchange, and libgit2
                    // asks for no more then; otherwise say why ssh ended.
                    return Err(c.failure());
                }
                Ok(Ok(chunk)) => c.pending = chunk,
                Ok(Err(e)) => return Err(io_err(format!("reading from ssh failed: {e}"))),
                Err(_) => {
                    let _ = c.child.kill();
                    let host = c.host.clone();
                    return Err(io_err(format!(
                        "{host} sent nothing over ssh for {}s",
                        READ_TIMEOUT.as_secs()
                    )));
                }
            }
        }
        let n = buf.len().min(c.pending.len());
        buf[..n].copy_from_slice(&c.pending[..n]);
        c.pending.drain(..n);
        Ok(n)
    }
}

impl Write for SshStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut c = self
            .0
            .lock()
            .map_err(|_| io_err("ssh transport state poisoned"))?;
        let Some(stdin) = c.stdin.as_mut() else {
            return Err(io_err("the ssh connection is closed"));
        };
        match stdin.write_all(buf) {
            Ok(()) => Ok(buf.len()),
            Err(_) => Err(c.failure()),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        let mut c = self
            .0
            .lock()
            .map_err(|_| io_err("ssh transport state poisoned"))?;
        match c.stdin.as_mut() {
            Some(s) => s.flush(),
            None => Ok(()),
        }
    }
}

/// Standard base64 with padding (for HTTP Basic).
pub(crate) fn base64(input: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_urls() {
        assert_eq!(
            parse_ssh_url("ssh://git@example.com:2222/team/sessions.git"),
            Some(SshUrl {
                user: Some("git".into()),
                host: "example.com".into(),
                port: Some(2222),
                path: "/team/sessions.git".into()
            })
        );
        assert_eq!(
            parse_ssh_url("ssh://[::1]/srv/repo"),
            Some(SshUrl {
                user: None,
                host: "::1".into(),
                port: None,
                path: "/srv/repo".into()
            })
        );
        assert_eq!(parse_ssh_url("ssh://-oProxyCommand=x/repo"), None);
        assert_eq!(parse_ssh_url("ssh://host"), None);
        assert_eq!(shell_quote("/a b/it's"), r"'/a b/it'\''s'");
    }

    #[test]
    fn base64_and_redaction() {
        assert_eq!(base64(b"vessel:pw"), "dmVzc2VsOnB3");
        assert_eq!(base64(b"a"), "YQ==");
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(
            redact_url("https://u:secret@host.example/x.git/info"),
            "https://host.example/x.git/info"
        );
    }
}
