//! A QMP client for one command at a time: connect to a VM's QMP socket, read the greeting,
//! leave capabilities negotiation, run one command and return its `return` value. Every
//! call is bounded in time (the whole exchange) and size (each message line); events that
//! arrive in between are skipped. QEMU serves one QMP client per socket at a time, so callers
//! keep their connections short.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// The longest one QMP message may be.
const MAX_LINE: usize = 1 << 20;

/// Why a QMP call failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("connect to {path}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("talk to QMP")]
    Io(#[from] std::io::Error),
    #[error("QMP did not answer within {0:?}")]
    Timeout(Duration),
    #[error("QMP closed the connection")]
    Closed,
    #[error("a QMP message longer than {MAX_LINE} bytes")]
    TooLong,
    #[error("QMP sent what is not JSON: {0}")]
    NotJson(String),
    #[error("QMP refused `{command}`: {class}: {desc}")]
    Refused {
        command: String,
        class: String,
        desc: String,
    },
}

/// Run `command` (with `arguments`, if any) on the QMP socket at `path`, within `timeout`.
pub async fn execute(
    path: &Path,
    command: &str,
    arguments: Option<Value>,
    timeout: Duration,
) -> Result<Value, QmpError> {
    tokio::time::timeout(timeout, exchange(path, command, arguments))
        .await
        .map_err(|_| QmpError::Timeout(timeout))?
}

async fn exchange(path: &Path, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
    let stream = UnixStream::connect(path)
        .await
        .map_err(|source| QmpError::Connect {
            path: path.display().to_string(),
            source,
        })?;
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    // The greeting.
    loop {
        let v = read_message(&mut r).await?;
        if v.get("QMP").is_some() {
            break;
        }
    }
    call(&mut r, &mut w, "qmp_capabilities", None).await?;
    call(&mut r, &mut w, command, arguments).await
}

async fn call(
    r: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
    w: &mut tokio::net::unix::OwnedWriteHalf,
    command: &str,
    arguments: Option<Value>,
) -> Result<Value, QmpError> {
    let mut msg = serde_json::json!({ "execute": command });
    if let Some(a) = arguments {
        msg["arguments"] = a;
    }
    let mut line = msg.to_string();
    line.push('\n');
    w.write_all(line.as_bytes()).await?;
    loop {
        let v = read_message(r).await?;
        if let Some(ret) = v.get("return") {
            return Ok(ret.clone());
        }
        if let Some(e) = v.get("error") {
            let field = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_string();
            return Err(QmpError::Refused {
                command: command.to_string(),
                class: field("class"),
                desc: field("desc"),
            });
        }
        // An event: not the answer.
    }
}

async fn read_message(
    r: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
) -> Result<Value, QmpError> {
    let mut buf = Vec::new();
    loop {
        let n = (&mut *r)
            .take((MAX_LINE + 1 - buf.len()) as u64)
            .read_until(b'\n', &mut buf)
            .await?;
        if n == 0 {
            return Err(QmpError::Closed);
        }
        if buf.len() > MAX_LINE {
            return Err(QmpError::TooLong);
        }
        if buf.ends_with(b"\n") {
            break;
        }
    }
    serde_json::from_slice(&buf)
        .map_err(|_| QmpError::NotJson(String::from_utf8_lossy(&buf[..buf.len().min(200)]).into()))
}
