//! `vessel devserver`: a small HTTP server for process sessions on a machine with nothing
//! installed. It serves a workspace's files (a page about the session when there is no
//! `index.html`), answers `/healthz`, and echoes WebSocket messages on `/ws`, which is what
//! an IDE's live connection looks like to a proxy. The quickstart's plan runs it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

/// Serve `root` on every address in `listen` until the process is stopped.
pub async fn run(listen: Vec<SocketAddr>, root: PathBuf, name: String) -> std::io::Result<()> {
    let mut tasks = Vec::new();
    for addr in listen {
        let listener = TcpListener::bind(addr).await?;
        let root = root.clone();
        let name = name.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let root = root.clone();
                let name = name.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let root = root.clone();
                        let name = name.clone();
                        async move { Ok::<_, Infallible>(handle(req, &root, &name, addr).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .with_upgrades()
                        .await;
                });
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}

fn respond(status: StatusCode, ctype: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = header::HeaderValue::from_str(ctype) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

async fn handle(
    mut req: Request<Incoming>,
    root: &Path,
    name: &str,
    addr: SocketAddr,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    if path == "/healthz" {
        return respond(StatusCode::OK, "text/plain", "ok\n");
    }
    if path == "/ws" {
        let Some(key) = req
            .headers()
            .get(header::SEC_WEBSOCKET_KEY)
            .map(|k| derive_accept_key(k.as_bytes()))
        else {
            return respond(
                StatusCode::BAD_REQUEST,
                "text/plain",
                "a WebSocket upgrade is expected here\n",
            );
        };
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let Ok(io) = upgrade.await else { return };
            let mut ws =
                WebSocketStream::from_raw_socket(TokioIo::new(io), Role::Server, None).await;
            while let Some(Ok(msg)) = ws.next().await {
                if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                    break;
                }
            }
        });
        let mut r = respond(StatusCode::SWITCHING_PROTOCOLS, "text/plain", Bytes::new());
        let h = r.headers_mut();
        h.insert(
            header::UPGRADE,
            header::HeaderValue::from_static("websocket"),
        );
        h.insert(
            header::CONNECTION,
            header::HeaderValue::from_static("Upgrade"),
        );
        if let Ok(v) = header::HeaderValue::from_str(&key) {
            h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
        }
        return r;
    }
    let rel = PathBuf::from(path.trim_start_matches('/'));
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return respond(StatusCode::BAD_REQUEST, "text/plain", "bad path\n");
    }
    let mut file = root.join(&rel);
    if file.is_dir() {
        file = file.join("index.html");
    }
    match tokio::fs::read(&file).await {
        Ok(bytes) => respond(StatusCode::OK, content_type(&file), bytes),
        Err(_) if rel.as_os_str().is_empty() => respond(
            StatusCode::OK,
            "text/html; charset=utf-8",
            landing(root, name, addr),
        ),
        Err(_) => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            format!("no such file: /{}\n", rel.display()),
        ),
    }
}

fn content_type(p: &Path) -> &'static str {
    match p.extension().and_then(|e| e.to_str()) {
        Some("html") | Some("htm") => "text/html; charset=utf-8",
        Some("css") => "text/css",
        Some("js") | Some("mjs") => "text/javascript",
        Some("json") => "application/json",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("txt") | Some("md") => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

fn landing(root: &Path, name: &str, addr: SocketAddr) -> String {
    let mut files: Vec<String> = std::fs::read_dir(root)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    let list: String = files
        .iter()
        .map(|f| format!("<li><a href=\"/{f}\">{f}</a></li>"))
        .collect();
    format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{name}</title></head><body>\
         <h1>vessel session {name}</h1><p>Serving <code>{}</code> on port {}.</p><ul>{list}</ul></body></html>\n",
        root.display(),
        addr.port()
    )
}
