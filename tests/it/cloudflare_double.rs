//! A contract double of the Cloudflare v4 API: the calls vessel's `cloudflare` DNS provider
//! and `cloudflare_tunnel` proxy make (zones, DNS record lists and batches, a tunnel's
//! configuration), served from memory on a loopback port below 32768. Cloudflare cannot be
//! reached from here, so this stands in for it; what keeps it honest is `check_contract`:
//! every request body it received and every answer it gave is recorded and type-checked
//! against the official Cloudflare TypeScript SDK's published types (`tsc --strict`, in
//! `tests/contracts/cloudflare/`). A test fails, never skips, when that check does.
//!
//! Behaviour modelled on the API: a bearer token (403, code 10000, for any other); list pages
//! (`page`, `per_page` up to `max_per_page`); batches run deletes, puts, posts in order, as one
//! transaction (one error and nothing changes), at most `batch_limit` operations; a CNAME
//! cannot sit beside other records at its name, and an identical record is refused; a
//! tunnel's configuration has a version that every write moves on, and its last rule must be
//! a catch-all. Faults can be queued (a status, a 429 with `Retry-After`, a hang).

#![allow(dead_code)]

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

pub const TOKEN: &str = "cf-test-token-8c1d0e5b7a";
pub const ACCOUNT: &str = "0123456789abcdef0123456789abcdef";
pub const TUNNEL: &str = "c1744f8b-faa1-48a4-9e5c-02ac921467fa";
pub const ZONE_ID: &str = "023e105f4ecef8ad9ca31a8372d0c353";
pub const ZONE: &str = "example.com";

/// A fault for the next request.
#[derive(Debug, Clone)]
pub enum Fault {
    Status(u16),
    RateLimited { retry_after: u64 },
    Hang(Duration),
}

/// One recorded exchange, in the shape `check.mjs` reads.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Exchange {
    pub op: &'static str,
    pub request: Option<Value>,
    pub status: u16,
    pub response: Value,
}

pub struct World {
    pub token: String,
    pub zones: Vec<(String, String)>,
    /// By zone ID: records as Cloudflare answers them.
    pub records: BTreeMap<String, Vec<Value>>,
    pub config: Value,
    pub version: i64,
    pub max_per_page: usize,
    pub batch_limit: usize,
    pub faults: VecDeque<Fault>,
    /// A rule someone else puts first in the tunnel's configuration at the next read of it.
    pub concurrent_rule: Option<Value>,
    /// Every call: (method, path and query).
    pub calls: Vec<(String, String)>,
    pub exchanges: Vec<Exchange>,
    /// Whether exchanges are recorded (a bench turns it off).
    pub record: bool,
    next_id: u64,
}

impl World {
    fn new() -> World {
        World {
            token: TOKEN.into(),
            zones: vec![(ZONE_ID.into(), ZONE.into())],
            records: BTreeMap::from([(ZONE_ID.to_string(), Vec::new())]),
            config: json!({"ingress": [{"hostname": "", "service": "http_status:404"}]}),
            version: 1,
            max_per_page: 5000,
            batch_limit: 200,
            faults: VecDeque::new(),
            concurrent_rule: None,
            calls: Vec::new(),
            exchanges: Vec::new(),
            record: true,
            next_id: 1,
        }
    }

    /// A record as Cloudflare lists it.
    pub fn record_json(&mut self, mut r: Value) -> Value {
        self.next_id += 1;
        let id = format!("{:032x}", self.next_id);
        let obj = r.as_object_mut().expect("a record is an object");
        obj.insert("id".into(), json!(id));
        obj.entry("ttl").or_insert(json!(1));
        obj.entry("proxied").or_insert(json!(false));
        obj.insert("proxiable".into(), json!(true));
        obj.insert("created_on".into(), json!("2026-12-01T00:00:00Z"));
        obj.insert("modified_on".into(), json!("2026-12-01T00:00:00Z"));
        obj.insert("meta".into(), json!({}));
        obj.insert("settings".into(), json!({}));
        obj.insert("tags".into(), json!([]));
        r
    }

    /// Add a record someone else made.
    pub fn add_record(&mut self, name: &str, rtype: &str, content: &str, comment: Option<&str>) {
        let mut r = json!({"name": name, "type": rtype, "content": content});
        if let Some(c) = comment {
            r["comment"] = json!(c);
        }
        let r = self.record_json(r);
        self.records.entry(ZONE_ID.into()).or_default().push(r);
    }

    pub fn ingress(&self) -> Vec<Value> {
        self.config["ingress"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    pub fn zone_records(&self) -> Vec<Value> {
        self.records.get(ZONE_ID).cloned().unwrap_or_default()
    }
}

#[derive(Clone)]
pub struct Double {
    pub url: String,
    pub world: Arc<Mutex<World>>,
}

fn ok(result: Value) -> Value {
    json!({"success": true, "errors": [], "messages": [], "result": result})
}

fn failure(code: i64, message: &str) -> Value {
    json!({"success": false, "errors": [{"code": code, "message": message}], "messages": [], "result": null})
}

impl Double {
    /// Start on `port` (from the tests' port helper), in the current tokio runtime.
    pub async fn start(port: u16) -> Double {
        let world = Arc::new(Mutex::new(World::new()));
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind the Cloudflare double");
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(world.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Double {
            url: format!("http://127.0.0.1:{port}"),
            world,
        }
    }

    pub fn with<T>(&self, f: impl FnOnce(&mut World) -> T) -> T {
        f(&mut self.world.lock().expect("world"))
    }

    pub fn calls(&self) -> usize {
        self.with(|w| w.calls.len())
    }

    /// Type-check every exchange so far against the Cloudflare SDK (`tsc --strict`); panics
    /// with tsc's output if any does not match.
    pub fn check_contract(&self, name: &str) {
        if let Err(e) = self.contract(name) {
            panic!(
                "the contract double's exchanges do not match Cloudflare's published types:\n{e}"
            );
        }
    }

    /// What `check_contract` checks: tsc's complaints, if any.
    pub fn contract(&self, name: &str) -> Result<(), String> {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/contracts/cloudflare");
        assert!(
            dir.join("node_modules/cloudflare/package.json").exists()
                && dir.join("node_modules/.bin/tsc").exists(),
            "the contract check needs the Cloudflare SDK and tsc: run `npm ci` in {} (.ci/run does)",
            dir.display()
        );
        let exchanges = self.with(|w| w.exchanges.clone());
        assert!(!exchanges.is_empty(), "nothing was recorded to check");
        std::fs::create_dir_all(dir.join("generated")).expect("generated/");
        let file = dir.join("generated").join(format!("{name}.json"));
        std::fs::write(
            &file,
            serde_json::to_vec_pretty(&exchanges).expect("exchanges"),
        )
        .expect("write exchanges");
        let out = std::process::Command::new("node")
            .arg(dir.join("check.mjs"))
            .arg(&file)
            .current_dir(&dir)
            .output()
            .expect("node runs (.ci/run installs it)");
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }
}

/// `a.b=v&page=2` as nested params, with the path parameters added.
fn params(query: &str, path_params: &[(&str, &str)]) -> Value {
    let mut p = serde_json::Map::new();
    for (k, v) in path_params {
        p.insert((*k).into(), json!(v));
    }
    for pair in query.split('&').filter(|s| !s.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v);
        let value = match k {
            "page" | "per_page" => v.parse::<u64>().map(|n| json!(n)).unwrap_or(json!(v)),
            _ => json!(v),
        };
        match k.split_once('.') {
            Some((outer, inner)) => {
                let o = p.entry(outer.to_string()).or_insert(json!({}));
                o[inner] = value;
            }
            None => {
                p.insert(k.into(), value);
            }
        }
    }
    Value::Object(p)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(n) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(n);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn handle(
    State(world): State<Arc<Mutex<World>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let fault = {
        let mut w = world.lock().expect("world");
        w.calls.push((
            method.to_string(),
            uri.path_and_query()
                .map(|p| p.to_string())
                .unwrap_or_default(),
        ));
        w.faults.pop_front()
    };
    if let Some(Fault::Hang(d)) = &fault {
        tokio::time::sleep(*d).await;
    }
    let mut w = world.lock().expect("world");
    let (op, request, status, response, retry_after) =
        answer(&mut w, &method, &uri, &headers, &body, fault);
    if w.record {
        w.exchanges.push(Exchange {
            op,
            request,
            status,
            response: response.clone(),
        });
    }
    let mut resp = (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        [("content-type", "application/json")],
        response.to_string(),
    )
        .into_response();
    if let Some(s) = retry_after {
        resp.headers_mut()
            .insert("retry-after", s.to_string().parse().expect("header"));
    }
    resp
}

type Answer = (&'static str, Option<Value>, u16, Value, Option<u64>);

fn answer(
    w: &mut World,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
    fault: Option<Fault>,
) -> Answer {
    let path = uri.path().strip_prefix("/client/v4").unwrap_or("");
    let query = uri.query().unwrap_or("");
    let parts: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let json_body: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let with = |mut b: Value, extra: &[(&str, &str)]| {
        if let Some(o) = b.as_object_mut() {
            for (k, v) in extra {
                o.insert((*k).into(), json!(v));
            }
        }
        b
    };
    let (op, request): (&'static str, Option<Value>) = match (method.as_str(), parts.as_slice()) {
        ("GET", ["zones"]) => ("zones.list", Some(params(query, &[]))),
        ("GET", ["zones", z]) => ("zones.get", Some(params(query, &[("zone_id", z)]))),
        ("GET", ["zones", z, "dns_records"]) => {
            ("dns.list", Some(params(query, &[("zone_id", z)])))
        }
        ("POST", ["zones", z, "dns_records", "batch"]) => (
            "dns.batch",
            Some(with(json_body.clone(), &[("zone_id", z)])),
        ),
        ("GET", ["accounts", a, "cfd_tunnel", _, "configurations"]) => {
            ("tunnel.get", Some(params(query, &[("account_id", a)])))
        }
        ("PUT", ["accounts", a, "cfd_tunnel", _, "configurations"]) => (
            "tunnel.put",
            Some(with(json_body.clone(), &[("account_id", a)])),
        ),
        _ => {
            return (
                "zones.get",
                None,
                404,
                failure(7003, "Could not route"),
                None,
            );
        }
    };
    match fault {
        Some(Fault::Status(s)) => {
            return (op, request, s, failure(10001, "service unavailable"), None);
        }
        Some(Fault::RateLimited { retry_after }) => {
            return (
                op,
                request,
                429,
                failure(
                    971,
                    "Please wait and consider throttling your request speed",
                ),
                Some(retry_after),
            );
        }
        _ => {}
    }
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if auth != format!("Bearer {}", w.token) {
        return (
            op,
            request,
            403,
            failure(10000, "Authentication error"),
            None,
        );
    }
    let (status, response) = match op {
        "zones.list" => {
            let name = request
                .as_ref()
                .and_then(|r| r["name"].as_str())
                .unwrap_or("");
            let zones: Vec<Value> = w
                .zones
                .iter()
                .filter(|(_, n)| name.is_empty() || n == name)
                .map(|(id, n)| zone(id, n))
                .collect();
            let mut r = ok(json!(zones));
            r["result_info"] = json!({"page": 1, "per_page": 20});
            (200, r)
        }
        "zones.get" => match w.zones.iter().find(|(id, _)| id == parts[1]) {
            Some((id, n)) => (200, ok(zone(id, n))),
            None => (
                404,
                failure(
                    7003,
                    "Could not route to /zones, perhaps your object identifier is invalid?",
                ),
            ),
        },
        "dns.list" => list(w, parts[1], request.as_ref().unwrap_or(&Value::Null)),
        "dns.batch" => batch(w, parts[1], &json_body),
        "tunnel.get" => {
            if let Some(rule) = w.concurrent_rule.take() {
                let mut ingress = w.ingress();
                ingress.insert(0, rule);
                w.config["ingress"] = json!(ingress);
                w.version += 1;
            }
            (200, ok(tunnel_result(w)))
        }
        "tunnel.put" => {
            let config = json_body.get("config").cloned().unwrap_or(Value::Null);
            let ingress = config["ingress"].as_array().cloned().unwrap_or_default();
            let last_ok = ingress.last().is_some_and(|r| {
                r.get("hostname")
                    .and_then(Value::as_str)
                    .is_none_or(str::is_empty)
                    && r.get("path").is_none()
            });
            if !last_ok {
                (
                    400,
                    failure(1055, "the last ingress rule must match all URLs"),
                )
            } else {
                w.config = config;
                w.version += 1;
                (200, ok(tunnel_result(w)))
            }
        }
        _ => unreachable!(),
    };
    (op, request, status, response, None)
}

fn zone(id: &str, name: &str) -> Value {
    json!({
        "id": id, "name": name,
        "account": {"id": ACCOUNT, "name": "vessel test"},
        "activated_on": "2026-01-01T00:00:00Z", "created_on": "2026-01-01T00:00:00Z",
        "development_mode": 0, "meta": {}, "modified_on": "2026-01-01T00:00:00Z",
        "name_servers": ["a.ns.cloudflare.com", "b.ns.cloudflare.com"],
        "original_dnshost": null, "original_name_servers": null, "original_registrar": null,
        "owner": {"type": "user"},
        "plan": {"id": "0feeeeeeeeeeeeeeeeeeeeeeeeeeeeee", "name": "Free Website"},
        "status": "active", "paused": false, "type": "full",
    })
}

fn tunnel_result(w: &World) -> Value {
    json!({
        "account_id": ACCOUNT, "tunnel_id": TUNNEL, "version": w.version,
        "config": w.config, "source": "cloudflare", "created_at": "2026-12-01T00:00:00Z",
    })
}

fn list(w: &World, zone_id: &str, p: &Value) -> (u16, Value) {
    let Some(all) = w.records.get(zone_id) else {
        return (404, failure(7003, "no such zone"));
    };
    let page = p["page"].as_u64().unwrap_or(1).max(1) as usize;
    let per_page = (p["per_page"].as_u64().unwrap_or(100) as usize).clamp(5, w.max_per_page);
    let prefix = p["comment"]["startswith"].as_str();
    let matching: Vec<&Value> = all
        .iter()
        .filter(|r| {
            prefix.is_none_or(|pre| r["comment"].as_str().is_some_and(|c| c.starts_with(pre)))
        })
        .collect();
    let items: Vec<Value> = matching
        .iter()
        .skip((page - 1) * per_page)
        .take(per_page)
        .map(|v| (*v).clone())
        .collect();
    let mut r = ok(json!(items));
    r["result_info"] = json!({"page": page, "per_page": per_page});
    (200, r)
}

fn batch(w: &mut World, zone_id: &str, body: &Value) -> (u16, Value) {
    let Some(before) = w.records.get(zone_id).cloned() else {
        return (404, failure(7003, "no such zone"));
    };
    let list_of = |k: &str| {
        body.get(k)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let (deletes, puts, posts) = (list_of("deletes"), list_of("puts"), list_of("posts"));
    if deletes.len() + puts.len() + posts.len() > w.batch_limit {
        return (400, failure(81000, "too many operations in one batch"));
    }
    let mut records = before;
    let mut done = json!({"deletes": [], "puts": [], "posts": []});
    for d in &deletes {
        let id = d["id"].as_str().unwrap_or("");
        let Some(i) = records.iter().position(|r| r["id"] == id) else {
            return (400, failure(81044, "Record does not exist."));
        };
        done["deletes"]
            .as_array_mut()
            .expect("array")
            .push(records.remove(i));
    }
    let conflict =
        |records: &[Value], r: &Value, except: Option<&str>| -> Option<(i64, &'static str)> {
            let name = r["name"].as_str().unwrap_or("");
            let others: Vec<&Value> = records
                .iter()
                .filter(|x| x["name"] == name && except.is_none_or(|id| x["id"] != id))
                .collect();
            if r["type"] == "CNAME" && !others.is_empty()
                || others.iter().any(|x| x["type"] == "CNAME")
            {
                return Some((
                    81053,
                    "An A, AAAA, or CNAME record with that host already exists.",
                ));
            }
            if others
                .iter()
                .any(|x| x["type"] == r["type"] && x["content"] == r["content"])
            {
                return Some((81058, "An identical record already exists."));
            }
            None
        };
    for p in &puts {
        let id = p["id"].as_str().unwrap_or("").to_string();
        let Some(i) = records.iter().position(|r| r["id"] == id.as_str()) else {
            return (400, failure(81044, "Record does not exist."));
        };
        if let Some((code, m)) = conflict(&records, p, Some(&id)) {
            return (400, failure(code, m));
        }
        let mut r = p.clone();
        r.as_object_mut().expect("object").remove("id");
        let mut r = w.record_json(r);
        r["id"] = json!(id);
        records[i] = r.clone();
        done["puts"].as_array_mut().expect("array").push(r);
    }
    for p in &posts {
        if let Some((code, m)) = conflict(&records, p, None) {
            return (400, failure(code, m));
        }
        let r = w.record_json(p.clone());
        records.push(r.clone());
        done["posts"].as_array_mut().expect("array").push(r);
    }
    w.records.insert(zone_id.to_string(), records);
    (200, ok(done))
}
