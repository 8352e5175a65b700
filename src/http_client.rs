//! The one HTTP client for APIs vessel calls: Caddy's admin API, PowerDNS, Traefik's API and
//! `vessel status`. reqwest over HTTP/1 with rustls (the ring provider, as everywhere else in
//! vessel), plus what every call to something outside must have:
//!
//! - every call is bounded in time (`Limits::connect` to connect, `Limits::answer` for the
//!   whole exchange, body included);
//! - every answer is bounded in size: the body is read frame by frame and refused past
//!   `Limits::max_body`, whatever `Content-Length` says;
//! - no redirects, no system proxy (`HTTP_PROXY` never sees an admin API's traffic), and no
//!   kept-alive connection: Caddy restarts its admin listener after every config change, so a
//!   pooled connection would be reset under us (`Api::keep_alive` keeps one, for notification
//!   targets, which are called many times in a row);
//! - TLS trust per API (`TlsConfig`): the system's roots, a CA file instead of them, or
//!   a pin on the SHA-256 fingerprint of the server's own certificate (for self-signed ones,
//!   such as Proxmox's). A pin that does not match fails naming both fingerprints;
//! - errors name the address and the operation, never a header value (headers carry API keys
//!   and tokens), and URLs never hold credentials (refused when the client is made).
//!
//! The git transport (`source/transport.rs`) is separate on purpose: libgit2 drives it
//! synchronously and streams packfiles of any size through it, which neither cap nor one
//! timeout for the whole exchange fits.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Method};
use http_body_util::BodyExt;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::Digest;

/// How vessel trusts an API it reaches over `https://`. Without it, the system's root
/// certificates. Only for `https://` URLs: with `http://` it is refused, since it would never
/// be used.
#[derive(
    Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// A PEM file of the CA certificates to trust instead of the system's (a Proxmox node's
    /// `pve-root-ca.pem`, say). Relative to the config file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// The SHA-256 fingerprint of the server's own (leaf) certificate, 64 hex digits (`:`
    /// between pairs allowed, as `openssl x509 -fingerprint -sha256` prints it). When set, a
    /// connection succeeds only if the server presents that certificate, whatever CA signed
    /// it (or none) and whatever names or dates it carries; `ca_file` is then not consulted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin_sha256: Option<String>,
}

impl TlsConfig {
    /// Make a relative CA file relative to `base` (the config file's directory).
    pub fn rebase(&mut self, base: &std::path::Path) {
        if let Some(ca) = &mut self.ca_file
            && ca.is_relative()
        {
            *ca = base.join(&*ca);
        }
    }
}

/// How long a call may take, and how much it may read.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// To open the connection (TCP and TLS).
    pub connect: Duration,
    /// For the whole call: connecting, sending, the answer's head and its whole body.
    pub answer: Duration,
    /// The largest body read; a longer one fails the call.
    pub max_body: usize,
}

impl Default for Limits {
    /// What the API providers use: 5 s to connect, 30 s a call, 64 MiB an answer (a
    /// 10,000-record PowerDNS zone listing is about 2 MB).
    fn default() -> Self {
        Limits {
            connect: Duration::from_secs(5),
            answer: Duration::from_secs(30),
            max_body: 64 << 20,
        }
    }
}

/// One answer, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Bytes,
    /// The `ETag`, from the headers or the trailers (Caddy sends it as a trailer).
    pub etag: Option<String>,
    /// A `Retry-After` in seconds (on a 429 or 503), if the answer has one.
    pub retry_after: Option<Duration>,
    /// The status line's reason phrase when it is not the standard one for the status
    /// (Proxmox puts its error message there), printable and at most 300 characters.
    pub reason: Option<String>,
}

impl Reply {
    /// The start of the body, for an error message.
    pub fn brief(&self) -> String {
        String::from_utf8_lossy(&self.body[..self.body.len().min(300)])
            .trim()
            .to_string()
    }
}

/// Why a client could not be made or a call did not get an answer. Display names the API's
/// address (never a header value); the cause is in `source`.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("the {what} `{url}` must be an http:// or https:// URL")]
    Scheme { what: &'static str, url: String },
    /// The URL is not repeated: it holds credentials.
    #[error(
        "the {what} must be just http(s)://host:port: credentials go in their own setting, never in the URL"
    )]
    Credentials { what: &'static str },
    #[error("the {what} `{url}` must be just http(s)://host:port, with no path")]
    Path { what: &'static str, url: String },
    #[error(
        "the {what} `{url}` is http://, so its `tls` settings would never be used (make it https://)"
    )]
    TlsOverHttp { what: &'static str, url: String },
    #[error("cannot read the CA file {path}")]
    CaFile {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("the CA file {path} holds no PEM certificate")]
    CaFileEmpty { path: PathBuf },
    #[error("the CA file {path} holds a certificate that cannot be a root")]
    CaCertificate {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error(
        "the `pin_sha256` `{pin}` is not a SHA-256 fingerprint (64 hex digits, `:` between pairs allowed)"
    )]
    Pin { pin: String },
    #[error("cannot set up TLS")]
    Tls(#[source] rustls::Error),
    #[error("cannot set up the HTTP client")]
    Client(#[source] reqwest::Error),
    #[error("header `{name}` has a value that cannot be sent")]
    Header { name: &'static str },
    #[error("{addr} did not answer within {} ms", .within.as_millis())]
    Timeout { addr: String, within: Duration },
    #[error(
        "{addr} presented a certificate whose SHA-256 fingerprint is {actual}, not the pinned {expected}"
    )]
    PinMismatch {
        addr: String,
        expected: String,
        actual: String,
    },
    #[error("{method} {path} to {addr} failed")]
    Request {
        addr: String,
        method: Method,
        path: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{addr} sent an answer of more than {limit} bytes")]
    TooLarge { addr: String, limit: usize },
    #[error("reading the answer of {addr} failed")]
    Body {
        addr: String,
        #[source]
        source: reqwest::Error,
    },
}

/// A client for one API (`scheme://host:port`), with its TLS trust and limits.
#[derive(Clone)]
pub struct Api {
    client: reqwest::Client,
    /// `scheme://host:port`, without a trailing slash.
    base: String,
    /// `host:port`, for messages.
    addr: String,
    limits: Limits,
}

impl Api {
    /// A client for `url` (`http://host:port` or `https://host:port`, a trailing slash
    /// allowed); `what` names the setting in messages ("Caddy admin API"). `tls` applies to
    /// `https://` only.
    pub fn new(
        url: &str,
        what: &'static str,
        tls: Option<&TlsConfig>,
        limits: Limits,
    ) -> Result<Api, HttpError> {
        Api::build(url, what, tls, limits, false)
    }

    /// As `new`, but keeping one idle connection for the next call (for a receiver called
    /// many times in a row, such as a notification target; not for Caddy's admin API).
    pub fn keep_alive(
        url: &str,
        what: &'static str,
        tls: Option<&TlsConfig>,
        limits: Limits,
    ) -> Result<Api, HttpError> {
        Api::build(url, what, tls, limits, true)
    }

    fn build(
        url: &str,
        what: &'static str,
        tls: Option<&TlsConfig>,
        limits: Limits,
        keep_alive: bool,
    ) -> Result<Api, HttpError> {
        // Before anything that would repeat the URL: user information is credentials.
        if url.contains('@') {
            return Err(HttpError::Credentials { what });
        }
        let (https, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(HttpError::Scheme {
                what,
                url: url.to_string(),
            });
        };
        let addr = rest.trim_end_matches('/');
        if addr.is_empty() || addr.contains(['/', '?', '#']) {
            return Err(HttpError::Path {
                what,
                url: url.to_string(),
            });
        }
        if !https && tls.is_some() {
            return Err(HttpError::TlsOverHttp {
                what,
                url: url.to_string(),
            });
        }
        let tls = rustls_config(https, tls)?;
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .http1_only()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .pool_max_idle_per_host(usize::from(keep_alive))
            .connect_timeout(limits.connect)
            .timeout(limits.answer)
            .build()
            .map_err(HttpError::Client)?;
        let scheme = if https { "https" } else { "http" };
        Ok(Api {
            client,
            base: format!("{scheme}://{addr}"),
            addr: addr.to_string(),
            limits,
        })
    }

    /// `host:port` of the API.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Send one request for `path` (starting with `/`); a `body` if given, JSON unless a
    /// `content-type` header says otherwise. Header values
    /// are marked sensitive and never appear in an error. A refused connection is tried again
    /// for up to half a second: Caddy's admin listener is briefly down while it restarts after
    /// each config change, and a refused connection means nothing was sent, so trying again is
    /// safe for any request.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        headers: &[(&'static str, &str)],
        body: Option<Bytes>,
    ) -> Result<Reply, HttpError> {
        let mut values = Vec::with_capacity(headers.len());
        for (name, value) in headers {
            let mut v = HeaderValue::from_str(value).map_err(|_| HttpError::Header { name })?;
            v.set_sensitive(true);
            values.push((*name, v));
        }
        let exchange = async {
            let mut refused = 0;
            loop {
                let mut req = self
                    .client
                    .request(method.clone(), format!("{}{path}", self.base));
                for (name, v) in &values {
                    req = req.header(*name, v.clone());
                }
                if let Some(b) = &body {
                    // JSON unless the caller says otherwise.
                    if !headers
                        .iter()
                        .any(|(n, _)| n.eq_ignore_ascii_case("content-type"))
                    {
                        req = req.header(http::header::CONTENT_TYPE, "application/json");
                    }
                    req = req.body(b.clone());
                }
                match req.send().await {
                    Ok(resp) => return self.read(resp).await,
                    Err(e) if is_refused(&e) && refused < 10 => {
                        refused += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(e) => return Err(self.failed(&method, path, e)),
                }
            }
        };
        tokio::time::timeout(self.limits.answer, exchange)
            .await
            .map_err(|_| HttpError::Timeout {
                addr: self.addr.clone(),
                within: self.limits.answer,
            })?
    }

    /// The whole answer, at most `max_body` bytes of body.
    async fn read(&self, resp: reqwest::Response) -> Result<Reply, HttpError> {
        let limit = self.limits.max_body;
        let too_large = || HttpError::TooLarge {
            addr: self.addr.clone(),
            limit,
        };
        // A declared length over the limit fails at once; a smaller one is not trusted.
        if resp.content_length().is_some_and(|n| n > limit as u64) {
            return Err(too_large());
        }
        let status = resp.status().as_u16();
        let mut etag = header_text(resp.headers());
        let retry_after = resp
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let resp = http::Response::<reqwest::Body>::from(resp);
        let reason = resp
            .extensions()
            .get::<hyper::ext::ReasonPhrase>()
            .map(|r| {
                String::from_utf8_lossy(r.as_bytes())
                    .chars()
                    .filter(|c| !c.is_control())
                    .take(300)
                    .collect::<String>()
                    .trim()
                    .to_string()
            })
            .filter(|r| !r.is_empty());
        let mut body = resp.into_body();
        let mut buf = BytesMut::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|source| {
                if source.is_timeout() {
                    HttpError::Timeout {
                        addr: self.addr.clone(),
                        within: self.limits.answer,
                    }
                } else {
                    HttpError::Body {
                        addr: self.addr.clone(),
                        source,
                    }
                }
            })?;
            match frame.into_data() {
                Ok(data) => {
                    if buf.len() + data.len() > limit {
                        return Err(too_large());
                    }
                    buf.extend_from_slice(&data);
                }
                Err(frame) => {
                    if let (None, Some(t)) = (&etag, frame.trailers_ref()) {
                        etag = header_text(t);
                    }
                }
            }
        }
        Ok(Reply {
            status,
            body: buf.freeze(),
            etag,
            retry_after,
            reason,
        })
    }

    /// The error for a call that got no answer: a pin mismatch found in the causes is said
    /// as such, a timeout as a timeout.
    fn failed(&self, method: &Method, path: &str, source: reqwest::Error) -> HttpError {
        if let Some(m) = pin_mismatch(&source) {
            return HttpError::PinMismatch {
                addr: self.addr.clone(),
                expected: m.expected.clone(),
                actual: m.actual.clone(),
            };
        }
        if source.is_timeout() {
            return HttpError::Timeout {
                addr: self.addr.clone(),
                within: self.limits.answer,
            };
        }
        HttpError::Request {
            addr: self.addr.clone(),
            method: method.clone(),
            path: path.to_string(),
            source,
        }
    }
}

fn header_text(h: &http::HeaderMap) -> Option<String> {
    h.get(http::header::ETAG)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// `e` and its causes, stepping into the error an `std::io::Error` wraps (whose `source`
/// skips it).
fn causes<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(e), |c| match c.downcast_ref::<std::io::Error>() {
        Some(io) => io
            .get_ref()
            .map(|i| i as &(dyn std::error::Error + 'static)),
        None => c.source(),
    })
}

fn is_refused(e: &reqwest::Error) -> bool {
    causes(e).any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
    })
}

fn pin_mismatch(e: &reqwest::Error) -> Option<&PinMismatch> {
    causes(e).find_map(|c| match c.downcast_ref::<rustls::Error>()? {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(o)) => {
            o.0.downcast_ref::<PinMismatch>()
        }
        _ => None,
    })
}

/// The rustls config for an API: for `https://`, the pin, else the CA file, else the system's
/// roots; for `http://`, one that is never used (reqwest needs one all the same).
fn rustls_config(https: bool, tls: Option<&TlsConfig>) -> Result<rustls::ClientConfig, HttpError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(HttpError::Tls)?;
    let pin = tls.and_then(|t| t.pin_sha256.as_deref());
    let ca = tls.and_then(|t| t.ca_file.as_deref());
    let mut config = match (pin, ca) {
        (Some(pin), _) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinned {
                expected: parse_pin(pin)?,
                algorithms: provider.signature_verification_algorithms,
            }))
            .with_no_client_auth(),
        (None, Some(path)) => {
            let mut roots = rustls::RootCertStore::empty();
            let certs =
                CertificateDer::pem_file_iter(path).map_err(|source| HttpError::CaFile {
                    path: path.to_path_buf(),
                    source,
                })?;
            for cert in certs {
                let cert = cert.map_err(|source| HttpError::CaFile {
                    path: path.to_path_buf(),
                    source,
                })?;
                roots.add(cert).map_err(|source| HttpError::CaCertificate {
                    path: path.to_path_buf(),
                    source,
                })?;
            }
            if roots.is_empty() {
                return Err(HttpError::CaFileEmpty {
                    path: path.to_path_buf(),
                });
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        (None, None) => {
            let mut roots = rustls::RootCertStore::empty();
            if https {
                // Certificates the system has that rustls cannot use are skipped; none at
                // all makes every https:// call fail, saying the issuer is unknown.
                roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// A pin as 32 bytes: 64 hex digits, any case, `:` between pairs allowed.
fn parse_pin(pin: &str) -> Result<[u8; 32], HttpError> {
    let digits: String = pin.chars().filter(|c| *c != ':').collect();
    let mut out = [0u8; 32];
    hex::decode_to_slice(&digits, &mut out).map_err(|_| HttpError::Pin {
        pin: pin.to_string(),
    })?;
    Ok(out)
}

/// The SHA-256 fingerprint of a DER certificate, as lower-case hex with `:` between pairs
/// (how `openssl x509 -fingerprint -sha256` prints it, lower-cased).
pub fn fingerprint(der: &[u8]) -> String {
    colons(&sha2::Sha256::digest(der))
}

fn colons(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The pinned certificate was not the one presented. Travels inside rustls's error, and is
/// found again by `pin_mismatch`.
#[derive(Debug, thiserror::Error)]
#[error("the certificate's SHA-256 fingerprint is {actual}, not the pinned {expected}")]
struct PinMismatch {
    expected: String,
    actual: String,
}

/// Trusts exactly one leaf certificate, by its SHA-256 fingerprint: no chain, name or date
/// checks (the pin is the identity), but the handshake's signatures are still verified
/// against that certificate's key, so a server must hold the key to pass.
#[derive(Debug)]
struct Pinned {
    expected: [u8; 32],
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let actual = sha2::Sha256::digest(end_entity.as_ref());
        if actual.as_slice() == self.expected {
            return Ok(ServerCertVerified::assertion());
        }
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::Other(rustls::OtherError(Arc::new(PinMismatch {
                expected: colons(&self.expected),
                actual: colons(&actual),
            }))),
        ))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_scheme_host_port_and_never_hold_credentials() {
        let ok = |u: &str| Api::new(u, "API", None, Limits::default()).map(|a| a.base);
        assert_eq!(
            ok("http://127.0.0.1:2019/").ok().as_deref(),
            Some("http://127.0.0.1:2019")
        );
        assert_eq!(
            ok("https://pve:8006").ok().as_deref(),
            Some("https://pve:8006")
        );
        assert!(matches!(ok("ftp://x"), Err(HttpError::Scheme { .. })));
        assert!(matches!(ok("http://x/api"), Err(HttpError::Path { .. })));
        let creds = ok("ftp://admin:hunter2@x:1")
            .map(|_| ())
            .map_err(|e| e.to_string());
        assert!(
            creds.as_ref().is_err_and(|e| !e.contains("hunter2")),
            "{creds:?}"
        );
        let tls = TlsConfig {
            ca_file: None,
            pin_sha256: Some("00".repeat(32)),
        };
        assert!(matches!(
            Api::new("http://x:1", "API", Some(&tls), Limits::default()),
            Err(HttpError::TlsOverHttp { .. })
        ));
    }

    #[test]
    fn pins_are_64_hex_digits_with_optional_colons() {
        let hexes = "AB".repeat(32);
        let coloned = vec!["ab"; 32].join(":");
        assert_eq!(parse_pin(&hexes).ok(), Some([0xab; 32]));
        assert_eq!(parse_pin(&coloned).ok(), Some([0xab; 32]));
        assert!(parse_pin("ab").is_err());
        assert!(parse_pin(&"zz".repeat(32)).is_err());
        assert_eq!(colons(&[0xab; 32]), coloned);
    }
}
