//! The Proxmox VE API as the proxmox provider uses it: one `Cluster` client per cluster
//! (`http_client::Api`, the token in a sensitive `Authorization: PVEAPIToken=...` header,
//! resolved at each call), the answers it reads (leniently: Proxmox writes booleans as `0`/`1`
//! and some integers as strings), and task (UPID) polling on the node the UPID names. Proxmox's
//! JSON stops here: the provider sees `Resource`, `TaskEnd` and plain values.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use serde_json::Value;

use crate::http_client::{Api, HttpError, Limits, TlsConfig};
use crate::secret::{SecretError, SecretRef};

/// Why a call to a cluster failed. Display names the cluster and the call, never the token.
#[derive(Debug, thiserror::Error)]
pub enum PveError {
    #[error("cannot read the API token of proxmox cluster `{cluster}`")]
    Token {
        cluster: String,
        #[source]
        source: SecretError,
    },
    #[error("proxmox cluster `{cluster}`: {method} {path}")]
    Http {
        cluster: String,
        method: Method,
        path: String,
        #[source]
        source: HttpError,
    },
    #[error("proxmox cluster `{cluster}`: {method} {path} answered {status}: {message}")]
    Status {
        cluster: String,
        method: Method,
        path: String,
        status: u16,
        message: String,
    },
    #[error(
        "proxmox cluster `{cluster}`: {method} {path} gave an answer vessel cannot read: {problem}"
    )]
    Answer {
        cluster: String,
        method: Method,
        path: String,
        problem: String,
    },
    #[error("proxmox task {upid} failed: {exitstatus}")]
    TaskFailed { upid: String, exitstatus: String },
    #[error("proxmox task {upid} did not end within {} s", .within.as_secs())]
    TaskTimeout { upid: String, within: Duration },
    #[error("`{0}` is not a proxmox task id (UPID)")]
    Upid(String),
}

impl PveError {
    /// The HTTP status Proxmox answered with, if it answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            PveError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Proxmox's message, if it answered with one.
    pub fn message(&self) -> &str {
        match self {
            PveError::Status { message, .. } => message,
            _ => "",
        }
    }
}

/// A client for one cluster's API.
pub struct Cluster {
    pub name: String,
    api: Api,
    token_id: String,
    token_secret: SecretRef,
    calls: std::sync::Arc<AtomicU64>,
}

impl Cluster {
    pub fn new(
        name: &str,
        url: &str,
        tls: Option<&TlsConfig>,
        token_id: &str,
        token_secret: &SecretRef,
        call_timeout: Duration,
        calls: std::sync::Arc<AtomicU64>,
    ) -> Result<Cluster, HttpError> {
        let limits = Limits {
            connect: call_timeout.min(Duration::from_secs(5)),
            answer: call_timeout,
            max_body: 64 << 20,
        };
        Ok(Cluster {
            name: name.to_string(),
            api: Api::new(url, "proxmox API URL", tls, limits)?,
            token_id: token_id.to_string(),
            token_secret: token_secret.clone(),
            calls,
        })
    }

    /// One call: `params` go in the query string (GET, DELETE) or as a JSON body (POST, PUT).
    /// Answers `data`.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        params: &[(&str, Value)],
    ) -> Result<Value, PveError> {
        let secret = self
            .token_secret
            .resolve()
            .map_err(|source| PveError::Token {
                cluster: self.name.clone(),
                source,
            })?;
        let auth = format!("PVEAPIToken={}={}", self.token_id, secret.expose());
        let with_body = matches!(method, Method::POST | Method::PUT);
        let (full, body) = if with_body {
            let map: serde_json::Map<String, Value> = params
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect();
            (
                format!("/api2/json{path}"),
                Some(Bytes::from(
                    serde_json::to_vec(&Value::Object(map)).unwrap_or_default(),
                )),
            )
        } else {
            let q: Vec<String> = params
                .iter()
                .map(|(k, v)| format!("{}={}", encode(k), encode(&plain(v))))
                .collect();
            let sep = if q.is_empty() { "" } else { "?" };
            (format!("/api2/json{path}{sep}{}", q.join("&")), None)
        };
        self.calls.fetch_add(1, Ordering::Relaxed);
        let reply = self
            .api
            .call(method.clone(), &full, &[("authorization", &auth)], body)
            .await
            .map_err(|source| PveError::Http {
                cluster: self.name.clone(),
                method: method.clone(),
                path: path.to_string(),
                source,
            })?;
        let parsed: Option<Value> = serde_json::from_slice(&reply.body).ok();
        if !(200..300).contains(&reply.status) {
            // Proxmox says what went wrong in the status line (`500 VM 100 already
            // running`), with parameter errors in the body's `errors`.
            let body = parsed.as_ref().map(error_message).filter(|m| !m.is_empty());
            let message = match (reply.reason.clone(), body) {
                (Some(r), Some(b)) if b.contains(&r) => b,
                (Some(r), Some(b)) => format!("{}: {b}", r.trim_end_matches('.')),
                (Some(r), None) => r,
                (None, Some(b)) => b,
                (None, None) => reply.brief(),
            };
            return Err(PveError::Status {
                cluster: self.name.clone(),
                method,
                path: path.to_string(),
                status: reply.status,
                message,
            });
        }
        match parsed {
            Some(Value::Object(mut m)) => Ok(m.remove("data").unwrap_or(Value::Null)),
            _ => Err(PveError::Answer {
                cluster: self.name.clone(),
                method,
                path: path.to_string(),
                problem: "not a JSON object".into(),
            }),
        }
    }

    pub async fn get(&self, path: &str, params: &[(&str, Value)]) -> Result<Value, PveError> {
        self.call(Method::GET, path, params).await
    }

    /// A call that starts a task: its UPID.
    pub async fn task(
        &self,
        method: Method,
        path: &str,
        params: &[(&str, Value)],
    ) -> Result<String, PveError> {
        let data = self.call(method.clone(), path, params).await?;
        match data {
            Value::String(upid) => Ok(upid),
            other => Err(PveError::Answer {
                cluster: self.name.clone(),
                method,
                path: path.to_string(),
                problem: format!("expected a task id, got {}", kind_of(&other)),
            }),
        }
    }

    /// Poll the task `upid` on the node it names until it ends (within `within`, asking every
    /// `every`): Ok for `OK` (or warnings), its exit status otherwise.
    pub async fn wait_task(
        &self,
        upid: &str,
        within: Duration,
        every: Duration,
    ) -> Result<(), PveError> {
        let node = upid_node(upid).ok_or_else(|| PveError::Upid(upid.to_string()))?;
        let path = format!("/nodes/{}/tasks/{}/status", encode(node), encode(upid));
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let status = self.get(&path, &[]).await?;
            if status.get("status").and_then(Value::as_str) == Some("stopped") {
                let exit = status
                    .get("exitstatus")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown");
                return if exit == "OK" || exit.starts_with("WARNINGS") {
                    Ok(())
                } else {
                    Err(PveError::TaskFailed {
                        upid: upid.to_string(),
                        exitstatus: exit.to_string(),
                    })
                };
            }
            if tokio::time::Instant::now() + every > deadline {
                return Err(PveError::TaskTimeout {
                    upid: upid.to_string(),
                    within,
                });
            }
            tokio::time::sleep(every).await;
        }
    }

    /// Every guest and template of the cluster: one `GET /cluster/resources?type=vm`.
    pub async fn resources(&self) -> Result<Vec<Resource>, PveError> {
        let data = self
            .get("/cluster/resources", &[("type", Value::from("vm"))])
            .await?;
        let Value::Array(items) = data else {
            return Err(PveError::Answer {
                cluster: self.name.clone(),
                method: Method::GET,
                path: "/cluster/resources".into(),
                problem: "not a list".into(),
            });
        };
        Ok(items.iter().filter_map(Resource::from_json).collect())
    }
}

/// The node a UPID names (`UPID:<node>:...`).
pub fn upid_node(upid: &str) -> Option<&str> {
    let mut parts = upid.split(':');
    (parts.next()? == "UPID").then_some(())?;
    parts.next().filter(|n| !n.is_empty())
}

/// What kind of guest a resource is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Qemu,
    Lxc,
}

impl Kind {
    /// Its segment in API paths.
    pub fn path(self) -> &'static str {
        match self {
            Kind::Qemu => "qemu",
            Kind::Lxc => "lxc",
        }
    }
}

/// One guest or template in `/cluster/resources`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    pub kind: Kind,
    pub vmid: u64,
    pub node: String,
    pub name: String,
    pub status: String,
    pub template: bool,
    pub lock: Option<String>,
    /// Its tags as a set (Proxmox may reorder them, and splits on `;`, `,` or spaces).
    pub tags: BTreeSet<String>,
    pub maxdisk: Option<u64>,
    /// Seconds since it started, while it runs.
    pub uptime: Option<u64>,
}

impl Resource {
    fn from_json(v: &Value) -> Option<Resource> {
        let kind = match v.get("type")?.as_str()? {
            "qemu" => Kind::Qemu,
            "lxc" => Kind::Lxc,
            _ => return None,
        };
        Some(Resource {
            kind,
            vmid: number(v.get("vmid")?)?,
            node: v.get("node")?.as_str()?.to_string(),
            name: v
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            status: v
                .get("status")
                .and_then(Value::as_str)
                .unwrap_or("unknown")
                .to_string(),
            template: v.get("template").is_some_and(truthy),
            lock: v
                .get("lock")
                .and_then(Value::as_str)
                .filter(|l| !l.is_empty())
                .map(str::to_string),
            tags: tag_set(v.get("tags").and_then(Value::as_str).unwrap_or_default()),
            maxdisk: v.get("maxdisk").and_then(number),
            uptime: v.get("uptime").and_then(number),
        })
    }
}

/// A tag list as a set.
pub fn tag_set(tags: &str) -> BTreeSet<String> {
    tags.split([';', ',', ' '])
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

/// An unsigned number, written as a number or a string of digits.
pub fn number(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// A Proxmox boolean: `1`, `true` or `"1"`.
pub fn truthy(v: &Value) -> bool {
    match v {
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_i64().is_some_and(|n| n != 0),
        Value::String(s) => s == "1" || s == "true",
        _ => false,
    }
}

/// The first IPv4 address of a guest's interfaces that is not loopback-only or link-local:
/// the QEMU guest agent's `network-get-interfaces` (`{result: [{ip-addresses: [...]}]}`) or
/// LXC's `interfaces` (`[{inet: "10.0.0.5/24"}]`). A loopback address counts only when it is
/// all there is and the interface is not `lo` (a guest in the contract double answers so).
pub fn guest_address(data: &Value) -> Option<String> {
    let list = data
        .get("result")
        .and_then(Value::as_array)
        .or_else(|| data.as_array())?;
    let mut found = Vec::new();
    for iface in list {
        if iface.get("name").and_then(Value::as_str) == Some("lo") {
            continue;
        }
        if let Some(inet) = iface.get("inet").and_then(Value::as_str) {
            found.push(inet.split('/').next().unwrap_or(inet).to_string());
        }
        for a in iface
            .get("ip-addresses")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if a.get("ip-address-type").and_then(Value::as_str) == Some("ipv4")
                && let Some(ip) = a.get("ip-address").and_then(Value::as_str)
            {
                found.push(ip.to_string());
            }
        }
    }
    found
        .into_iter()
        .filter_map(|ip| ip.parse::<std::net::Ipv4Addr>().ok())
        .find(|ip| !ip.is_link_local() && !ip.is_unspecified())
        .map(|ip| ip.to_string())
}

/// What Proxmox said went wrong: its `message`, else its per-parameter `errors`.
fn error_message(v: &Value) -> String {
    if let Some(m) = v.get("message").and_then(Value::as_str) {
        return m.trim().to_string();
    }
    match v.get("errors") {
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| format!("{k}: {}", plain(v).trim()))
            .collect::<Vec<_>>()
            .join("; "),
        _ => String::new(),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// A parameter's value as a query string writes it.
fn plain(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Bool(b) => u8::from(*b).to_string(),
        other => other.to_string(),
    }
}

/// Percent-encode everything but unreserved characters.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upids_name_their_node() {
        assert_eq!(
            upid_node("UPID:pve2:0000C1A2:0001B2C3:6750A1B2:qmclone:101:vessel@pve!t:"),
            Some("pve2")
        );
        assert_eq!(upid_node("pve2:1"), None);
    }

    #[test]
    fn tags_compare_as_sets_and_addresses_skip_loopback_interfaces() {
        assert_eq!(tag_set("b;a"), tag_set("a,b"));
        let agent = serde_json::json!({"result": [
            {"name": "lo", "ip-addresses": [{"ip-address-type": "ipv4", "ip-address": "127.0.0.1"}]},
            {"name": "eth0", "ip-addresses": [
                {"ip-address-type": "ipv6", "ip-address": "fe80::1"},
                {"ip-address-type": "ipv4", "ip-address": "10.0.0.7"}]}
        ]});
        assert_eq!(guest_address(&agent).as_deref(), Some("10.0.0.7"));
        let lxc = serde_json::json!([{"name": "lo", "inet": "127.0.0.1/8"}, {"name": "eth0", "inet": "10.0.0.8/24"}]);
        assert_eq!(guest_address(&lxc).as_deref(), Some("10.0.0.8"));
        assert_eq!(
            guest_address(&serde_json::json!([{"name": "lo", "inet": "127.0.0.1/8"}])),
            None
        );
    }
}
