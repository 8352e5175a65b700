//! The one HTTP client against a real HTTPS server (tokio-rustls on 127.0.0.1:0) with
//! certificates made in the test (rcgen): a CA and a leaf it signed, as Proxmox ships them.
//! Trust by CA file, by pin, and neither; answers too large; a server that never answers;
//! `vessel status` and the Caddy, PowerDNS, Traefik and Proxmox providers with their `tls`
//! setting.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Method;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vessel::config::TlsConfig;
use vessel::http_client::{Api, HttpError, Limits, fingerprint};

/// A CA, and a leaf for 127.0.0.1 and localhost it signed.
struct Certs {
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    leaf_der: CertificateDer<'static>,
    leaf_key: Vec<u8>,
}

fn certs() -> Certs {
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "vessel test CA");
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("ca key")).expect("ca");
    let leaf_key = KeyPair::generate().expect("leaf key");
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .expect("leaf params")
        .signed_by(&leaf_key, &ca)
        .expect("leaf");
    Certs {
        ca_pem: ca.pem(),
        ca_der: ca.der().clone(),
        leaf_der: leaf.der().clone(),
        leaf_key: leaf_key.serialize_der(),
    }
}

/// What the server does with a request.
#[derive(Clone, Copy)]
enum Answer {
    /// 200 with body `ok`.
    Ok,
    /// 200 with this JSON body.
    Json(&'static str),
    /// 200 with a chunked body of this many bytes and no `Content-Length`.
    Chunked(usize),
    /// 200 saying `Content-Length: n`, sending nothing more.
    Declared(u64),
    /// Read the request, never answer.
    Never,
}

/// Serve HTTPS with the leaf certificate on 127.0.0.1:0, answering every request with
/// `answer`; the port. Runs on the current runtime.
async fn serve(c: &Certs, answer: Answer) -> u16 {
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(c.leaf_key.clone()));
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(vec![c.leaf_der.clone(), c.ca_der.clone()], key)
    .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // A handshake the client refuses ends here.
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let reply = match answer {
                    Answer::Ok => {
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
                            .to_vec()
                    }
                    Answer::Json(body) => format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    )
                    .into_bytes(),
                    Answer::Chunked(n) => {
                        let mut r =
                            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
                        for _ in 0..n / 1000 {
                            r.extend_from_slice(b"3e8\r\n");
                            r.extend(std::iter::repeat_n(b'x', 1000));
                            r.extend_from_slice(b"\r\n");
                        }
                        r.extend_from_slice(b"0\r\n\r\n");
                        r
                    }
                    Answer::Declared(n) => {
                        format!("HTTP/1.1 200 OK\r\ncontent-length: {n}\r\n\r\n").into_bytes()
                    }
                    Answer::Never => {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                        return;
                    }
                };
                let _ = tls.write_all(&reply).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    port
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn api(port: u16, tls: Option<TlsConfig>, limits: Limits) -> Api {
    Api::new(
        &format!("https://127.0.0.1:{port}"),
        "test API",
        tls.as_ref(),
        limits,
    )
    .expect("client")
}

fn pin(sha: String) -> Option<TlsConfig> {
    Some(TlsConfig {
        ca_file: None,
        pin_sha256: Some(sha),
    })
}

#[test]
fn https_trusts_the_ca_file_or_the_pin_and_nothing_else() {
    let c = certs();
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &c.ca_pem).expect("write ca");
    let rt = runtime();
    rt.block_on(async {
        let port = serve(&c, Answer::Ok).await;
        let get = |a: Api| async move { a.call(Method::GET, "/", &[], None).await };

        // The CA file: trusted.
        let with_ca = Some(TlsConfig {
            ca_file: Some(ca_file.clone()),
            pin_sha256: None,
        });
        let r = get(api(port, with_ca, Limits::default()))
            .await
            .expect("trusted by the CA file");
        assert_eq!((r.status, &r.body[..]), (200, &b"ok"[..]));

        // Neither CA file nor pin: the system's roots do not know this CA.
        let err = get(api(port, None, Limits::default()))
            .await
            .expect_err("an unknown CA is refused");
        let text = vessel::error_chain(&err);
        assert!(text.contains("UnknownIssuer"), "{text}");

        // The right pin: trusted without any CA, in either spelling.
        let leaf = fingerprint(&c.leaf_der);
        for spelling in [leaf.clone(), leaf.replace(':', "").to_uppercase()] {
            let r = get(api(port, pin(spelling), Limits::default()))
                .await
                .expect("trusted by the pin");
            assert_eq!(r.status, 200);
        }

        // A wrong pin (the CA's own fingerprint): refused even with the CA file, naming both.
        let wrong = fingerprint(&c.ca_der);
        let both = Some(TlsConfig {
            ca_file: Some(ca_file.clone()),
            pin_sha256: Some(wrong.clone()),
        });
        let err = get(api(port, both, Limits::default()))
            .await
            .expect_err("a wrong pin is refused");
        assert!(
            matches!(&err, HttpError::PinMismatch { expected, actual, .. }
                if *expected == wrong && *actual == leaf),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(
            text.contains(&wrong) && text.contains(&leaf) && text.contains("127.0.0.1"),
            "{text}"
        );
    });
}

#[test]
fn answers_are_bounded_in_size_and_time() {
    let c = certs();
    let rt = runtime();
    rt.block_on(async {
        let trusted = || pin(fingerprint(&c.leaf_der));
        let small = Limits {
            max_body: 10_000,
            ..Limits::default()
        };

        // A chunked body (no Content-Length to go by) past the limit, and one within it.
        let port = serve(&c, Answer::Chunked(20_000)).await;
        let err = api(port, trusted(), small)
            .call(Method::GET, "/", &[], None)
            .await
            .expect_err("too large");
        assert!(
            matches!(err, HttpError::TooLarge { limit: 10_000, .. }),
            "{err:?}"
        );
        let port = serve(&c, Answer::Chunked(9_000)).await;
        let r = api(port, trusted(), small)
            .call(Method::GET, "/", &[], None)
            .await
            .expect("within the limit");
        assert_eq!(r.body.len(), 9_000);

        // A declared length past the limit fails before reading.
        let port = serve(&c, Answer::Declared(1 << 40)).await;
        let err = api(port, trusted(), small)
            .call(Method::GET, "/", &[], None)
            .await
            .expect_err("declared too large");
        assert!(matches!(err, HttpError::TooLarge { .. }), "{err:?}");

        // A server that takes the request and never answers: the call ends at its bound.
        let port = serve(&c, Answer::Never).await;
        let quick = Limits {
            answer: Duration::from_millis(500),
            ..Limits::default()
        };
        let t = Instant::now();
        let err = api(port, trusted(), quick)
            .call(Method::GET, "/", &[("x-api-key", "hunter2")], None)
            .await
            .expect_err("no answer");
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "took {:?}",
            t.elapsed()
        );
        assert!(matches!(err, HttpError::Timeout { .. }), "{err:?}");
        let text = vessel::error_chain(&err);
        assert!(
            text.contains("did not answer within 500 ms") && !text.contains("hunter2"),
            "{text}"
        );
    });
}

#[test]
fn vessel_status_reaches_an_https_endpoint_by_pin_or_ca_file() {
    let c = certs();
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &c.ca_pem).expect("write ca");
    let rt = runtime();
    let port = rt.block_on(serve(
        &c,
        Answer::Json(r#"{"converged":true,"ready":true,"not_converged":[]}"#),
    ));
    let url = format!("https://127.0.0.1:{port}");
    let status = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_vessel"))
            .args(["status", "--url", &url, "--json"])
            .args(extra)
            .output()
            .expect("vessel status");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let leaf = fingerprint(&c.leaf_der);
    for flags in [
        ["--pin-sha256", leaf.as_str()],
        ["--ca-file", ca_file.to_str().expect("utf-8 path")],
    ] {
        let (code, out, err) = status(&flags);
        assert_eq!(code, Some(0), "{flags:?}: {err}");
        let v: serde_json::Value = serde_json::from_str(&out).expect("json");
        assert_eq!(v["converged"], true, "{out}");
    }
    let wrong = fingerprint(&c.ca_der);
    let (code, _, err) = status(&["--pin-sha256", &wrong]);
    assert_eq!(code, Some(1));
    assert!(err.contains(&wrong) && err.contains(&leaf), "{err}");
    let (code, _, err) = status(&[]);
    assert_eq!(code, Some(1));
    assert!(err.contains("UnknownIssuer"), "{err}");
}

#[test]
fn the_api_providers_take_their_tls_setting() {
    use vessel::providers::{DnsProvider, ProxyProvider};
    let c = certs();
    let rt = runtime();
    // Caddy-shaped (an empty config) and PowerDNS-shaped (an empty zone) answers, over HTTPS.
    let caddy_port = rt.block_on(serve(&c, Answer::Json("null")));
    let pdns_port = rt.block_on(serve(&c, Answer::Json(r#"{"rrsets":[]}"#)));
    let (leaf, wrong) = (fingerprint(&c.leaf_der), fingerprint(&c.ca_der));
    let caddy = |p: &str| {
        vessel::providers::proxy::caddy::Caddy::new(
            &format!("https://127.0.0.1:{caddy_port}"),
            "srv",
            &[],
            "vessel",
            pin(p.to_string()).as_ref(),
        )
        .expect("caddy provider")
    };
    let pdns = |p: &str| {
        vessel::providers::dns::powerdns::PowerDns::new(
            &format!("https://127.0.0.1:{pdns_port}"),
            "localhost",
            vessel::config::Secret::new("hunter2"),
            &["dev.example.com".to_string()],
            pin(p.to_string()).as_ref(),
        )
        .expect("powerdns provider")
    };
    let traefik_port = rt.block_on(serve(&c, Answer::Json(r#"{"routers":{},"services":{}}"#)));
    let dir = tempfile::tempdir().expect("tempdir");
    let traefik = |p: &str| {
        vessel::providers::proxy::traefik::Traefik::new(&vessel::config::TraefikConfig {
            file: dir.path().join("vessel.yml"),
            entrypoints: Vec::new(),
            name_prefix: "vessel".into(),
            api: Some(format!("https://127.0.0.1:{traefik_port}")),
            confirm_within: vessel::model::Duration::from_secs(1),
            tls: pin(p.to_string()),
            wake_listen: None,
        })
        .expect("traefik provider")
    };
    // Proxmox-shaped (an empty `/cluster/resources`): Proxmox ships self-signed certificates,
    // so a pin (or its CA file) is how vessel trusts a cluster.
    let pve_port = rt.block_on(serve(&c, Answer::Json(r#"{"data":[]}"#)));
    let proxmox = |p: &str| {
        let yaml = format!(
            "clusters:\n  - name: lab\n    url: 'https://127.0.0.1:{pve_port}'\n    token_id: 'root@pam!vessel'\n    token_secret: {{env: VESSEL_TLS_TEST_PVE_TOKEN}}\n    tls: {{pin_sha256: '{p}'}}\n    nodes: [{{name: pve1}}]\n"
        );
        let config: vessel::providers::compute::proxmox::ProxmoxConfig =
            serde_saphyr::from_str(&yaml).expect("proxmox config");
        vessel::providers::compute::proxmox::ProxmoxProvider::new(
            config,
            dir.path().join("pve-records"),
        )
        .expect("proxmox provider")
    };
    // SAFETY: set once, before any thread of this test reads it; no other test uses it.
    unsafe { std::env::set_var("VESSEL_TLS_TEST_PVE_TOKEN", "hunter2") };
    // Each provider: with the right pin it observes (nothing there); with a wrong one it
    // fails naming both fingerprints, and never the API key.
    let observed = |p: &str| -> [(&str, Result<usize, String>); 4] {
        use vessel::providers::compute::ComputeProvider;
        let text = |e: vessel::providers::ProviderError| vessel::error_chain(&e);
        [
            (
                "caddy",
                rt.block_on(caddy(p).observe())
                    .map(|v| v.len())
                    .map_err(text),
            ),
            (
                "powerdns",
                rt.block_on(pdns(p).observe())
                    .map(|v| v.len())
                    .map_err(text),
            ),
            (
                "traefik",
                rt.block_on(traefik(p).observe())
                    .map(|v| v.len())
                    .map_err(text),
            ),
            (
                "proxmox",
                rt.block_on(proxmox(p).observe())
                    .map(|v| v.len())
                    .map_err(text),
            ),
        ]
    };
    for (provider, got) in observed(&leaf) {
        assert_eq!(got, Ok(0), "{provider} over https with the right pin");
    }
    for (provider, got) in observed(&wrong) {
        let text = got.expect_err("a wrong pin");
        assert!(
            text.contains(&wrong) && text.contains(&leaf) && !text.contains("hunter2"),
            "{provider}: {text}"
        );
    }
}
