//! A contract double of the Proxmox VE API: no Proxmox runs on these machines, so the proxmox
//! provider is tested against this, and this is held to Proxmox's own published API schema
//! (`../shared/contracts/proxmox/pve-api.json`, pve-docs 9.1.3; see
//! `../shared/contracts/README.md`).
//!
//! Every request is checked against the schema of its path and method before anything else:
//! a path or method the schema does not have is 501, a parameter it does not define (where it
//! allows no others), one missing that is not optional, a wrong type, a value outside its enum,
//! pattern, range, length or format is 400 with Proxmox's `errors` map. Every answer is checked
//! against the method's `returns` schema too (a double that answers off-schema fails the test
//! with a 599). Behind that, a small cluster: nodes, guests and templates, asynchronous tasks
//! (UPIDs naming their node, polled on that node only) that take the time `Timing` says,
//! guest locks while a task runs, a racy `/cluster/nextid`, and injectable `Faults`.
//!
//! It serves plain HTTP/1.1 (one request per connection) on its own thread and runtime. Errors
//! are answered as Proxmox answers them: the message in the status line's reason phrase
//! (`HTTP/1.1 500 VM 100 already running`), the body `{"data": null}` (with `errors` for
//! parameters).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const TOKEN_ID: &str = "vessel@pve!ci";
pub const TOKEN_SECRET: &str = "5e1f7c2a-0b1d-4c8e-9d3a-7f6e5d4c3b2a";

/// The schema, indexed by path template.
struct Schema {
    paths: Vec<(Vec<String>, Value)>,
}

fn schema() -> &'static Schema {
    static S: OnceLock<Schema> = OnceLock::new();
    S.get_or_init(|| {
        let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/contracts/proxmox/pve-api.json");
        let text = std::fs::read_to_string(&file).unwrap_or_else(|e| {
            panic!(
                "the Proxmox API schema {} (see ../shared/contracts/README.md): {e}",
                file.display()
            )
        });
        let tree: Value = serde_json::from_str(&text).expect("pve-api.json is JSON");
        let mut paths = Vec::new();
        fn walk(n: &Value, out: &mut Vec<(Vec<String>, Value)>) {
            if let (Some(p), Some(info)) = (n["path"].as_str(), n.get("info")) {
                out.push((segments(p), info.clone()));
            }
            for c in n["children"].as_array().into_iter().flatten() {
                walk(c, out);
            }
        }
        for n in tree.as_array().expect("a list of nodes") {
            walk(n, &mut paths);
        }
        Schema { paths }
    })
}

fn segments(p: &str) -> Vec<String> {
    p.split('/')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// The method's schema and the path's variables, for the template that matches best (most
/// literal segments).
fn route(path: &[String]) -> Option<(&'static Value, BTreeMap<String, String>)> {
    let mut best: Option<(usize, &Value, BTreeMap<String, String>)> = None;
    for (tpl, info) in &schema().paths {
        if tpl.len() != path.len() {
            continue;
        }
        let mut vars = BTreeMap::new();
        let mut literal = 0;
        let ok = tpl.iter().zip(path).all(|(t, s)| {
            if t.starts_with('{') {
                vars.insert(t.trim_matches(['{', '}']).to_string(), s.clone());
                true
            } else {
                literal += 1;
                t == s
            }
        });
        if ok && best.as_ref().is_none_or(|(l, _, _)| literal > *l) {
            best = Some((literal, info, vars));
        }
    }
    best.map(|(_, i, v)| (i, v))
}

/// Check one value against a parameter's schema, as Proxmox's JSONSchema does; the error
/// text is Proxmox's.
fn check_param(s: &Value, v: &Value) -> Result<(), String> {
    let text = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => u8::from(*b).to_string(),
        _ => return Err("type check failed - got a structure".into()),
    };
    let ty = s["type"].as_str().unwrap_or("string");
    match ty {
        "integer" => {
            let n: i64 = text
                .parse()
                .map_err(|_| format!("type check ('integer') failed - got '{text}'"))?;
            if let Some(min) = bound(&s["minimum"])
                && (n as f64) < min
            {
                return Err(format!("value must have a minimum value of {min}"));
            }
            if let Some(max) = bound(&s["maximum"])
                && (n as f64) > max
            {
                return Err(format!("value must have a maximum value of {max}"));
            }
        }
        "number" => {
            let n: f64 = text
                .parse()
                .map_err(|_| format!("type check ('number') failed - got '{text}'"))?;
            if let Some(min) = bound(&s["minimum"])
                && n < min
            {
                return Err(format!("value must have a minimum value of {min}"));
            }
        }
        "boolean"
            if !["0", "1", "true", "false", "yes", "no", "on", "off"].contains(&text.as_str()) =>
        {
            return Err(format!("type check ('boolean') failed - got '{text}'"));
        }
        "string" => {
            if !v.is_string() {
                return Err(format!("type check ('string') failed - got '{text}'"));
            }
            if let Some(max) = s["maxLength"].as_u64()
                && text.len() as u64 > max
            {
                return Err(format!("value may only be {max} characters long"));
            }
        }
        _ => {}
    }
    if let Some(e) = s["enum"].as_array()
        && !e.iter().any(|x| x.as_str() == Some(text.as_str()))
    {
        return Err(format!(
            "value '{text}' does not have a value in the enumeration"
        ));
    }
    if let Some(p) = s["pattern"].as_str() {
        let re = regex::Regex::new(&format!("^(?:{p})$")).expect("schema pattern");
        if !re.is_match(&text) {
            return Err("value does not match the regex pattern".to_string());
        }
    }
    match &s["format"] {
        Value::String(f) => check_format(f, &text),
        Value::Object(keys) => check_property_string(keys, &text),
        _ => Ok(()),
    }
}

fn bound(v: &Value) -> Option<f64> {
    v.as_f64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
}

/// The formats vessel's requests use, as PVE::JSONSchema defines them.
fn check_format(f: &str, v: &str) -> Result<(), String> {
    let re = match f {
        "pve-node" => r"^[a-zA-Z0-9]([a-zA-Z0-9\-]*[a-zA-Z0-9])?$",
        "dns-name" => {
            r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9\-]*[a-zA-Z0-9])?\.)*[a-zA-Z0-9](?:[a-zA-Z0-9\-]*[a-zA-Z0-9])?$"
        }
        "pve-storage-id" => r"^[a-z][a-z0-9\-_.]*[a-z0-9]$",
        "pve-configid" => r"^[a-z][a-z0-9_]+$",
        "pve-tag-list" => r"^[a-z0-9_][a-z0-9_\-+.]*(?:[;, ][a-z0-9_][a-z0-9_\-+.]*)*$",
        "pve-vmid" => r"^[1-9][0-9]{2,8}$",
        "pve-fw-dport-spec" | "pve-fw-sport-spec" => {
            r"^[0-9a-z\-]+(:[0-9]+)?(,[0-9a-z\-]+(:[0-9]+)?)*$"
        }
        "pve-fw-addr-spec" => r"^[0-9a-fA-F:.]+(/[0-9]{1,3})?(,[0-9a-fA-F:.]+(/[0-9]{1,3})?)*$",
        "pve-fw-protocol-spec" => r"^[a-z0-9\-]+$",
        _ => return Ok(()),
    };
    if regex::Regex::new(re).expect("format").is_match(v) {
        Ok(())
    } else {
        Err(format!("value does not match format '{f}'"))
    }
}

/// A property string (`key=value,...`, a default key allowed bare) against its keys.
fn check_property_string(keys: &serde_json::Map<String, Value>, v: &str) -> Result<(), String> {
    for part in v.split(',') {
        let (k, val) = match part.split_once('=') {
            Some((k, val)) => (k.to_string(), val),
            None => {
                let Some((k, _)) = keys
                    .iter()
                    .find(|(_, s)| s["default_key"].as_u64() == Some(1))
                else {
                    return Err(
                        "value without key, but schema does not define a default key".to_string(),
                    );
                };
                (k.clone(), part)
            }
        };
        let Some(s) = keys.get(&k) else {
            return Err(format!("invalid format - unknown key '{k}'"));
        };
        check_param(s, &Value::from(val)).map_err(|e| format!("invalid format - {k}: {e}"))?;
    }
    Ok(())
}

/// Check a request's parameters (path variables included) against the method's schema.
fn check_params(info: &Value, params: &serde_json::Map<String, Value>) -> BTreeMap<String, String> {
    let mut errors = BTreeMap::new();
    let p = &info["parameters"];
    let empty = serde_json::Map::new();
    let props = p["properties"].as_object().unwrap_or(&empty);
    let additional = p["additionalProperties"].as_u64() == Some(1);
    for (k, v) in params {
        match props.get(k) {
            None if !additional => {
                errors.insert(
                    k.clone(),
                    "property is not defined in schema and the schema does not allow additional properties".into(),
                );
            }
            None => {}
            Some(s) => {
                if let Err(e) = check_param(s, v) {
                    errors.insert(k.clone(), e);
                }
            }
        }
    }
    for (k, s) in props {
        if s["optional"].as_u64() != Some(1) && !params.contains_key(k) {
            errors.insert(
                k.clone(),
                "property is missing and it is not optional".into(),
            );
        }
    }
    errors
}

/// Check an answer against a `returns` schema: types, and the properties that are not
/// optional.
fn check_return(s: &Value, v: &Value, at: &str) -> Result<(), String> {
    let ty = s["type"].as_str().unwrap_or("any");
    let ok = match ty {
        "null" => v.is_null(),
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean() || v.as_u64().is_some_and(|n| n <= 1),
        "array" => v.is_array(),
        "object" => v.is_object(),
        _ => true,
    };
    if !ok {
        return Err(format!("{at}: expected {ty}, answered {v}"));
    }
    if let Some(e) = s["enum"].as_array()
        && !e.contains(v)
    {
        return Err(format!("{at}: {v} is not in the enumeration"));
    }
    if let (Some(items), Some(list)) = (s.get("items"), v.as_array()) {
        for (i, x) in list.iter().enumerate() {
            check_return(items, x, &format!("{at}[{i}]"))?;
        }
    }
    if let (Some(props), Some(obj)) = (s["properties"].as_object(), v.as_object()) {
        for (k, ps) in props {
            match obj.get(k) {
                Some(x) => check_return(ps, x, &format!("{at}.{k}"))?,
                None if ps["optional"].as_u64() != Some(1) => {
                    return Err(format!("{at}: `{k}` is not optional"));
                }
                None => {}
            }
        }
    }
    Ok(())
}

/// How long things take.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub clone: Duration,
    pub start: Duration,
    pub stop: Duration,
    pub resize: Duration,
    pub delete: Duration,
    /// From a start until the guest agent (or the container) reports an address.
    pub address_after: Duration,
    /// Added to every answer.
    pub latency: Duration,
}

impl Timing {
    /// Fast, for tests.
    pub fn quick() -> Timing {
        Timing {
            clone: Duration::from_millis(300),
            start: Duration::from_millis(150),
            stop: Duration::from_millis(100),
            resize: Duration::from_millis(100),
            delete: Duration::from_millis(100),
            address_after: Duration::from_millis(300),
            latency: Duration::ZERO,
        }
    }
}

/// Failures to inject.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// The next this many clone tasks fail, leaving their guest behind (as an interrupted
    /// clone would).
    pub clones_fail: u32,
    /// The guest agent never answers (VMs never get an address).
    pub agent_never: bool,
    /// The next this many `/cluster/nextid` answers are taken by another client before the
    /// clone asks for them.
    pub steal_ids: u32,
    /// Requests whose path ends with the key answer 500, so many times.
    pub fail_500: BTreeMap<String, u32>,
    /// Every answer waits this long first (a frozen API).
    pub hang: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct GuestState {
    pub kind: &'static str,
    pub node: String,
    pub name: String,
    pub tags: String,
    pub status: &'static str,
    pub qmp: &'static str,
    pub template: bool,
    pub lock: Option<String>,
    pub cores: u64,
    pub memory_mib: u64,
    pub maxdisk: u64,
    pub started: Option<Instant>,
    /// Its firewall rules, in order (`pos` is the index), and whether it is enabled.
    pub rules: Vec<serde_json::Map<String, Value>>,
    pub firewall: bool,
    /// Its snapshots by name, oldest first.
    pub snapshots: Vec<String>,
    /// CPU and memory hot-plug enabled (a VM's `hotplug: cpu,memory` with NUMA).
    pub hotplug: bool,
    /// Cores and memory written while it ran without hot-plug: taken at its next stop (as
    /// Proxmox keeps them under `pending`).
    pub pending: Option<(u64, u64)>,
}

/// What a task does to the cluster when it ends.
type Effect = Box<dyn FnOnce(&mut World) + Send>;

struct Task {
    node: String,
    id: String,
    kind: String,
    start: i64,
    end: Instant,
    result: Result<(), String>,
    /// Applied once, when the task is first seen ended.
    effect: Option<Effect>,
}

pub struct World {
    pub nodes: Vec<String>,
    pub guests: BTreeMap<u64, GuestState>,
    tasks: HashMap<String, Task>,
    pub timing: Timing,
    pub faults: Faults,
    /// Every request: (method, path, parameters).
    pub log: Vec<(String, String, serde_json::Map<String, Value>)>,
    /// Headers and bodies seen, for leak checks (the Authorization header left out).
    pub seen: Vec<String>,
    seq: u64,
}

impl World {
    fn settle(&mut self) {
        let now = Instant::now();
        let done: Vec<String> = self
            .tasks
            .iter()
            .filter(|(_, t)| t.end <= now && t.effect.is_some())
            .map(|(k, _)| k.clone())
            .collect();
        for k in done {
            if let Some(f) = self.tasks.get_mut(&k).and_then(|t| t.effect.take()) {
                f(self);
            }
        }
    }

    fn task(
        &mut self,
        node: &str,
        kind: &str,
        id: u64,
        took: Duration,
        result: Result<(), String>,
        effect: impl FnOnce(&mut World) + Send + 'static,
    ) -> String {
        self.seq += 1;
        let start = 0x6750_0000 + self.seq as i64;
        let upid = format!(
            "UPID:{node}:{:08X}:{:08X}:{start:08X}:{kind}:{id}:{TOKEN_ID}:",
            1000 + self.seq,
            self.seq
        );
        self.tasks.insert(
            upid.clone(),
            Task {
                node: node.to_string(),
                id: id.to_string(),
                kind: kind.to_string(),
                start,
                end: Instant::now() + took,
                result,
                effect: Some(Box::new(effect)),
            },
        );
        upid
    }

    fn next_free(&self) -> u64 {
        (100..)
            .find(|i| !self.guests.contains_key(i))
            .unwrap_or(100)
    }
}

/// A running double.
pub struct Double {
    pub url: String,
    pub world: Arc<Mutex<World>>,
    /// Requests answered so far (whatever their outcome).
    pub calls: Arc<AtomicU64>,
    _thread: std::thread::JoinHandle<()>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Double {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

impl Double {
    /// A cluster of `nodes` with no guests, on a free port.
    pub fn start(nodes: &[&str], timing: Timing) -> Double {
        let world = Arc::new(Mutex::new(World {
            nodes: nodes.iter().map(|s| s.to_string()).collect(),
            guests: BTreeMap::new(),
            tasks: HashMap::new(),
            timing,
            faults: Faults::default(),
            log: Vec::new(),
            seen: Vec::new(),
            seq: 0,
        }));
        let calls = Arc::new(AtomicU64::new(0));
        let port = crate::daemon_support::free_port();
        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (w, c) = (world.clone(), calls.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let accept = async {
                    while let Ok((s, _)) = listener.accept().await {
                        let (w, c) = (w.clone(), c.clone());
                        tokio::spawn(async move {
                            let _ = serve(s, w, c).await;
                        });
                    }
                };
                tokio::select! {
                    _ = accept => {}
                    _ = rx => {}
                }
            });
        });
        schema();
        Double {
            url: format!("http://127.0.0.1:{port}"),
            world,
            calls,
            _thread: thread,
            stop: Some(tx),
        }
    }

    pub fn with<T>(&self, f: impl FnOnce(&mut World) -> T) -> T {
        let mut w = self.world.lock().expect("world");
        w.settle();
        f(&mut w)
    }

    /// Add a template (or, with `template: false`, a guest vessel did not make).
    pub fn add(&self, vmid: u64, kind: &'static str, node: &str, name: &str, template: bool) {
        self.with(|w| {
            w.guests.insert(
                vmid,
                GuestState {
                    kind,
                    node: node.into(),
                    name: name.into(),
                    tags: String::new(),
                    status: "stopped",
                    qmp: "stopped",
                    template,
                    lock: None,
                    cores: 1,
                    memory_mib: 512,
                    maxdisk: 4 << 30,
                    started: None,
                    rules: Vec::new(),
                    firewall: false,
                    snapshots: Vec::new(),
                    hotplug: false,
                    pending: None,
                },
            )
        });
    }

    /// Requests made so far, as `METHOD path`.
    pub fn requests(&self) -> Vec<String> {
        self.with(|w| w.log.iter().map(|(m, p, _)| format!("{m} {p}")).collect())
    }

    /// The parameters of the requests to paths ending with `suffix`.
    pub fn params_of(&self, method: &str, suffix: &str) -> Vec<serde_json::Map<String, Value>> {
        self.with(|w| {
            w.log
                .iter()
                .filter(|(m, p, _)| m == method && p.ends_with(suffix))
                .map(|(_, _, q)| q.clone())
                .collect()
        })
    }
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn serve(
    mut s: tokio::net::TcpStream,
    world: Arc<Mutex<World>>,
    calls: Arc<AtomicU64>,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let first = lines.next().unwrap_or_default().to_string();
    let mut headers = BTreeMap::new();
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = buf[head_end..].to_vec();
    calls.fetch_add(1, Ordering::Relaxed);
    let (hang, latency) = {
        let w = world.lock().expect("world");
        (w.faults.hang, w.timing.latency)
    };
    if let Some(h) = hang {
        tokio::time::sleep(h).await;
    }
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let (status, mut answer) = handle(&first, &headers, &body, &world);
    // As Proxmox answers: an error's message is the status line's reason phrase (one line),
    // and the body holds only `data` (and `errors` for parameters).
    let reason = match answer.as_object_mut().and_then(|m| m.remove("message")) {
        Some(Value::String(m)) if status != 200 => {
            m.lines().next().unwrap_or("").trim().to_string()
        }
        _ if status == 200 => "OK".to_string(),
        _ => "Error".to_string(),
    };
    let text = answer.to_string();
    let reply = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json;charset=UTF-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
        text.len()
    );
    s.write_all(reply.as_bytes()).await?;
    s.shutdown().await
}

fn fail(status: u16, message: impl Into<String>) -> (u16, Value) {
    (status, json!({"data": null, "message": message.into()}))
}

fn handle(
    first: &str,
    headers: &BTreeMap<String, String>,
    body: &[u8],
    world: &Mutex<World>,
) -> (u16, Value) {
    let mut parts = first.split(' ');
    let method = parts.next().unwrap_or_default().to_string();
    let target = parts.next().unwrap_or_default();
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    {
        let mut w = world.lock().expect("world");
        let mut seen = String::new();
        for (k, v) in headers {
            if k != "authorization" {
                seen.push_str(&format!("{k}: {v}\n"));
            }
        }
        seen.push_str(&String::from_utf8_lossy(body));
        seen.push_str(target);
        w.seen.push(seen);
    }
    let want = format!("PVEAPIToken={TOKEN_ID}={TOKEN_SECRET}");
    if headers.get("authorization") != Some(&want) {
        return fail(401, "authentication failure");
    }
    let Some(rest) = path.strip_prefix("/api2/json") else {
        return fail(501, format!("Method '{method} {path}' not implemented"));
    };
    let segs: Vec<String> = segments(rest).iter().map(|s| decode(s)).collect();
    let Some((info, vars)) = route(&segs) else {
        return fail(501, format!("Method '{method} {rest}' not implemented"));
    };
    let Some(minfo) = info.get(&method) else {
        return fail(501, format!("Method '{method} {rest}' not implemented"));
    };
    let mut params = serde_json::Map::new();
    for (k, v) in &vars {
        params.insert(k.clone(), Value::from(v.clone()));
    }
    let mut bad = BTreeMap::new();
    if !query.is_empty() {
        for pair in query.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            params.insert(decode(k), Value::from(decode(v)));
        }
    }
    if !body.is_empty() {
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(m)) if method == "POST" || method == "PUT" => {
                for (k, v) in m {
                    if vars.contains_key(&k) {
                        bad.insert(k.clone(), "duplicate parameter (path and body)".to_string());
                    }
                    params.insert(k, v);
                }
            }
            _ => {
                bad.insert(
                    "body".to_string(),
                    "a request body must be a JSON object, with POST or PUT only".to_string(),
                );
            }
        }
    }
    bad.extend(check_params(minfo, &params));
    let mut w = world.lock().expect("world");
    w.log
        .push((method.clone(), rest.to_string(), params.clone()));
    if !bad.is_empty() {
        return (
            400,
            json!({"data": null, "errors": bad, "message": "Parameter verification failed.\n"}),
        );
    }
    let suffix_fault = w
        .faults
        .fail_500
        .iter_mut()
        .find(|(k, n)| rest.ends_with(k.as_str()) && **n > 0)
        .map(|(_, n)| *n -= 1);
    if suffix_fault.is_some() {
        return fail(500, "injected failure: internal error");
    }
    w.settle();
    let answer = behave(&mut w, &method, &segs, &params);
    match answer {
        Ok(data) => {
            if let Err(e) = check_return(&minfo["returns"], &data, "data") {
                return fail(599, format!("the double answered off-schema: {e}"));
            }
            (200, json!({ "data": data }))
        }
        Err((status, msg)) => fail(status, msg),
    }
}

fn int(p: &serde_json::Map<String, Value>, k: &str) -> Option<u64> {
    match p.get(k)? {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

fn boolean(p: &serde_json::Map<String, Value>, k: &str) -> bool {
    match p.get(k) {
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_u64() == Some(1),
        Some(Value::String(s)) => ["1", "true", "yes", "on"].contains(&s.as_str()),
        _ => false,
    }
}

fn text(p: &serde_json::Map<String, Value>, k: &str) -> Option<String> {
    match p.get(k)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

type Answer = Result<Value, (u16, String)>;

/// What the cluster does.
fn behave(
    w: &mut World,
    method: &str,
    segs: &[String],
    p: &serde_json::Map<String, Value>,
) -> Answer {
    let s: Vec<&str> = segs.iter().map(String::as_str).collect();
    match (method, s.as_slice()) {
        ("GET", ["cluster", "resources"]) => Ok(Value::Array(
            w.guests
                .iter()
                .map(|(id, g)| {
                    let mut r = json!({
                        "id": format!("{}/{id}", g.kind), "type": g.kind, "vmid": id,
                        "node": g.node, "name": g.name, "status": g.status,
                        "template": u8::from(g.template), "maxdisk": g.maxdisk,
                        "maxmem": g.memory_mib << 20, "maxcpu": g.cores,
                    });
                    if !g.tags.is_empty() {
                        r["tags"] = json!(g.tags);
                    }
                    if let Some(l) = &g.lock {
                        r["lock"] = json!(l);
                    }
                    if let Some(s) = g.started.filter(|_| g.status == "running") {
                        r["uptime"] = json!(s.elapsed().as_secs());
                    }
                    r
                })
                .collect(),
        )),
        ("GET", ["cluster", "nextid"]) => {
            let id = w.next_free();
            if w.faults.steal_ids > 0 {
                w.faults.steal_ids -= 1;
                let node = w.nodes[0].clone();
                w.guests.insert(
                    id,
                    GuestState {
                        kind: "qemu",
                        node,
                        name: format!("someone-else-{id}"),
                        tags: String::new(),
                        status: "stopped",
                        qmp: "stopped",
                        template: false,
                        lock: None,
                        cores: 1,
                        memory_mib: 512,
                        maxdisk: 1 << 30,
                        started: None,
                        rules: Vec::new(),
                        firewall: false,
                        snapshots: Vec::new(),
                        hotplug: false,
                        pending: None,
                    },
                );
            }
            Ok(json!(id))
        }
        ("GET", ["nodes", node, "tasks", upid, "status"]) => {
            let Some(t) = w.tasks.get(*upid) else {
                return Err((500, format!("unable to parse worker upid '{upid}'")));
            };
            if t.node != *node {
                return Err((500, format!("no such task '{upid}' on node '{node}'")));
            }
            let ended = t.end <= Instant::now();
            let mut r = json!({
                "upid": upid, "node": t.node, "pid": 1000, "pstart": 1, "starttime": t.start,
                "type": t.kind, "id": t.id, "user": TOKEN_ID,
                "status": if ended { "stopped" } else { "running" },
            });
            if ended {
                r["exitstatus"] = json!(match &t.result {
                    Ok(()) => "OK".to_string(),
                    Err(e) => e.clone(),
                });
            }
            Ok(r)
        }
        (_, ["nodes", node, kind @ ("qemu" | "lxc"), vmid, rest @ ..]) => {
            if !w.nodes.iter().any(|n| n == node) {
                return Err((595, format!("no such cluster node '{node}'")));
            }
            let vmid: u64 = vmid.parse().unwrap_or(0);
            let conf = if *kind == "qemu" {
                "qemu-server"
            } else {
                "lxc"
            };
            let missing = || {
                Err((
                    500,
                    format!("Configuration file 'nodes/{node}/{conf}/{vmid}.conf' does not exist"),
                ))
            };
            let Some(g) = w.guests.get(&vmid).cloned() else {
                return missing();
            };
            if g.node != *node || g.kind != *kind {
                return missing();
            }
            guest_call(w, method, node, kind, vmid, g, rest, p)
        }
        _ => Err((
            501,
            format!("the double does not implement {method} /{}", s.join("/")),
        )),
    }
}

#[allow(clippy::too_many_arguments)]
fn guest_call(
    w: &mut World,
    method: &str,
    node: &str,
    kind: &str,
    vmid: u64,
    g: GuestState,
    rest: &[&str],
    p: &serde_json::Map<String, Value>,
) -> Answer {
    let t = w.timing;
    let locked = |what: &str| -> Result<(), (u16, String)> {
        match &g.lock {
            Some(l) => Err((500, format!("{what}: VM is locked ({l})"))),
            None => Ok(()),
        }
    };
    let running = g.status == "running";
    match (method, rest) {
        ("POST", ["clone"]) => {
            let newid = int(p, "newid").unwrap_or(0);
            if w.guests.contains_key(&newid) {
                let on = w.guests[&newid].node.clone();
                return Err((
                    500,
                    format!(
                        "unable to create VM {newid}: VM {newid} already exists on node '{on}'"
                    ),
                ));
            }
            let full = boolean(p, "full");
            if !full && !g.template {
                return Err((
                    500,
                    "Linked clone feature is not supported for a guest that is not a template"
                        .into(),
                ));
            }
            if !full && p.contains_key("storage") {
                return Err((
                    500,
                    "parameter 'storage' not allowed for linked clones".into(),
                ));
            }
            let target = text(p, "target").unwrap_or_else(|| node.to_string());
            if !w.nodes.contains(&target) {
                return Err((500, format!("no such node '{target}'")));
            }
            let name_key = if kind == "qemu" { "name" } else { "hostname" };
            let name = text(p, name_key).unwrap_or_else(|| format!("copy-of-{}", g.name));
            w.guests.insert(
                newid,
                GuestState {
                    node: target,
                    name,
                    tags: String::new(),
                    status: "stopped",
                    qmp: "stopped",
                    template: false,
                    lock: Some("clone".into()),
                    started: None,
                    rules: Vec::new(),
                    firewall: false,
                    snapshots: Vec::new(),
                    pending: None,
                    ..g.clone()
                },
            );
            let fails = w.faults.clones_fail > 0;
            if fails {
                w.faults.clones_fail -= 1;
            }
            let result = if fails {
                Err("clone failed: injected: storage did not answer".to_string())
            } else {
                Ok(())
            };
            let upid = w.task(
                node,
                if kind == "qemu" { "qmclone" } else { "vzclone" },
                vmid,
                t.clone,
                result,
                move |w| {
                    if let Some(n) = w.guests.get_mut(&newid) {
                        n.lock = None;
                    }
                },
            );
            Ok(json!(upid))
        }
        ("PUT", ["config"]) => {
            locked("update configuration")?;
            let Some(n) = w.guests.get_mut(&vmid) else {
                return Err((500, "gone".into()));
            };
            if let Some(tags) = text(p, "tags") {
                n.tags = tags;
            }
            let mut cores = n.pending.map_or(n.cores, |p| p.0);
            let mut memory = n.pending.map_or(n.memory_mib, |p| p.1);
            if let Some(c) = int(p, "cores") {
                cores = c;
            }
            if let Some(m) = text(p, "memory") {
                let m = m.trim_start_matches("current=");
                memory = m
                    .split(',')
                    .next()
                    .and_then(|x| x.parse().ok())
                    .unwrap_or(memory);
            }
            // A running VM without hot-plug keeps them pending until it stops; a container
            // and a VM with hot-plug take them at once.
            if n.kind == "qemu" && n.status == "running" && !n.hotplug {
                if (cores, memory) != (n.cores, n.memory_mib) {
                    n.pending = Some((cores, memory));
                }
            } else {
                (n.cores, n.memory_mib) = (cores, memory);
            }
            Ok(Value::Null)
        }
        ("PUT", ["resize"]) => {
            locked("resize")?;
            let size = text(p, "size").unwrap_or_default();
            let (plus, num) = match size.strip_prefix('+') {
                Some(n) => (true, n.to_string()),
                None => (false, size.clone()),
            };
            let unit = num.chars().last().filter(|c| c.is_ascii_alphabetic());
            let n: f64 = num
                .trim_end_matches(|c: char| c.is_ascii_alphabetic())
                .parse()
                .unwrap_or(0.0);
            let mult: u64 = match unit {
                Some('K') => 1 << 10,
                Some('M') => 1 << 20,
                Some('G') => 1 << 30,
                Some('T') => 1 << 40,
                _ => 1,
            };
            let bytes = (n * mult as f64) as u64;
            let new = if plus { g.maxdisk + bytes } else { bytes };
            if new < g.maxdisk {
                return Err((500, "shrinking disks is not supported".into()));
            }
            let upid = w.task(node, "resize", vmid, t.resize, Ok(()), move |w| {
                if let Some(n) = w.guests.get_mut(&vmid) {
                    n.maxdisk = new;
                }
            });
            Ok(json!(upid))
        }
        ("GET", ["status", "current"]) => {
            let mut r = json!({"vmid": vmid, "status": g.status, "name": g.name, "maxdisk": g.maxdisk,
                "cpus": g.cores, "maxmem": g.memory_mib << 20, "ha": {"managed": 0}});
            if kind == "qemu" {
                r["qmpstatus"] = json!(g.qmp);
                r["agent"] = json!(1);
            }
            if let Some(l) = &g.lock {
                r["lock"] = json!(l);
            }
            if !g.tags.is_empty() {
                r["tags"] = json!(g.tags);
            }
            Ok(r)
        }
        ("POST", ["status", op]) => {
            locked(op)?;
            let (took, to, qmp): (Duration, &'static str, &'static str) = match *op {
                "start" if running => return Err((500, format!("VM {vmid} already running"))),
                "start" => (t.start, "running", "running"),
                "stop" => (t.stop, "stopped", "stopped"),
                "shutdown" => (t.stop, "stopped", "stopped"),
                "reboot" if !running => return Err((500, format!("VM {vmid} not running"))),
                "reboot" => (t.start, "running", "running"),
                "suspend" if !running => return Err((500, format!("VM {vmid} not running"))),
                "suspend" => (Duration::from_millis(50), "running", "paused"),
                "resume" => (Duration::from_millis(50), "running", "running"),
                other => {
                    return Err((501, format!("the double does not implement status/{other}")));
                }
            };
            let task_kind = format!("{}{op}", if kind == "qemu" { "qm" } else { "vz" });
            let restarts = *op == "start" || *op == "reboot";
            if let Some(n) = w.guests.get_mut(&vmid) {
                n.lock = None;
            }
            let upid = w.task(node, &task_kind, vmid, took, Ok(()), move |w| {
                if let Some(n) = w.guests.get_mut(&vmid) {
                    n.status = to;
                    n.qmp = qmp;
                    if restarts {
                        n.started = Some(Instant::now());
                    }
                    if to == "stopped" {
                        n.started = None;
                        if let Some((c, m)) = n.pending.take() {
                            (n.cores, n.memory_mib) = (c, m);
                        }
                    }
                }
            });
            Ok(json!(upid))
        }
        ("GET", ["agent", "network-get-interfaces"]) | ("GET", ["interfaces"]) => {
            if !running {
                return Err((500, format!("VM {vmid} is not running")));
            }
            let ready = g.started.is_some_and(|s| s.elapsed() >= t.address_after);
            let agent = rest.first() == Some(&"agent");
            if agent && (w.faults.agent_never || !ready) {
                return Err((500, "QEMU guest agent is not running".into()));
            }
            let lo = json!({"name": "lo", "hardware-address": "00:00:00:00:00:00", "hwaddr": "00:00:00:00:00:00",
                "ip-addresses": [{"ip-address-type": "ipv4", "ip-address": "127.0.0.1", "prefix": 8}], "inet": "127.0.0.1/8"});
            let mut eth = json!({"name": "eth0", "hardware-address": "bc:24:11:00:00:01", "hwaddr": "bc:24:11:00:00:01",
                "ip-addresses": []});
            if ready {
                // The guests' services are the tests' own listeners on this machine.
                eth["ip-addresses"] =
                    json!([{"ip-address-type": "ipv4", "ip-address": "127.0.0.1", "prefix": 8}]);
                eth["inet"] = json!("127.0.0.1/8");
            }
            if agent {
                Ok(json!({"result": [lo, eth]}))
            } else {
                Ok(json!([lo, eth]))
            }
        }
        ("GET", ["firewall", "rules"]) => Ok(Value::Array(
            g.rules
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    let mut r = r.clone();
                    r.insert("pos".into(), json!(i));
                    r.insert("ipversion".into(), json!(4));
                    Value::Object(r)
                })
                .collect(),
        )),
        ("POST", ["firewall", "rules"]) => {
            let mut rule = serde_json::Map::new();
            for k in ["type", "action", "proto", "dport", "source", "comment"] {
                if let Some(v) = text(p, k) {
                    rule.insert(k.into(), json!(v));
                }
            }
            rule.insert("enable".into(), json!(int(p, "enable").unwrap_or(0)));
            let pos = int(p, "pos").map_or(0, |n| n as usize);
            if let Some(n) = w.guests.get_mut(&vmid) {
                let at = pos.min(n.rules.len());
                n.rules.insert(at, rule);
            }
            Ok(Value::Null)
        }
        ("DELETE", ["firewall", "rules", pos]) => {
            let pos: usize = pos.parse().unwrap_or(usize::MAX);
            let Some(n) = w.guests.get_mut(&vmid) else {
                return Err((500, "gone".into()));
            };
            if pos >= n.rules.len() {
                return Err((500, format!("no rule at position {pos}")));
            }
            n.rules.remove(pos);
            Ok(Value::Null)
        }
        ("POST", ["snapshot"]) => {
            locked("snapshot")?;
            let name = text(p, "snapname").unwrap_or_default();
            if g.snapshots.contains(&name) {
                return Err((500, format!("snapshot name '{name}' already used")));
            }
            if let Some(n) = w.guests.get_mut(&vmid) {
                n.lock = Some("snapshot".into());
            }
            let upid = w.task(
                node,
                if kind == "qemu" {
                    "qmsnapshot"
                } else {
                    "vzsnapshot"
                },
                vmid,
                t.resize,
                Ok(()),
                move |w| {
                    if let Some(n) = w.guests.get_mut(&vmid) {
                        n.lock = None;
                        n.snapshots.push(name);
                    }
                },
            );
            Ok(json!(upid))
        }
        ("DELETE", ["snapshot", name]) => {
            locked("delete snapshot")?;
            let name = name.to_string();
            if !g.snapshots.contains(&name) {
                return Err((500, format!("snapshot '{name}' does not exist")));
            }
            if let Some(n) = w.guests.get_mut(&vmid) {
                n.lock = Some("snapshot-delete".into());
            }
            let upid = w.task(
                node,
                if kind == "qemu" {
                    "qmdelsnapshot"
                } else {
                    "vzdelsnapshot"
                },
                vmid,
                t.resize,
                Ok(()),
                move |w| {
                    if let Some(n) = w.guests.get_mut(&vmid) {
                        n.lock = None;
                        n.snapshots.retain(|s| *s != name);
                    }
                },
            );
            Ok(json!(upid))
        }
        ("GET", ["snapshot"]) => {
            let mut list: Vec<Value> = g
                .snapshots
                .iter()
                .map(|s| json!({"name": s, "description": ""}))
                .collect();
            list.push(json!({"name": "current", "description": "You are here!", "running": i64::from(running)}));
            Ok(Value::Array(list))
        }
        ("PUT", ["firewall", "options"]) => {
            if let Some(n) = w.guests.get_mut(&vmid) {
                n.firewall = boolean(p, "enable");
            }
            Ok(Value::Null)
        }
        ("DELETE", []) => {
            locked("destroy")?;
            if running {
                return Err((500, format!("VM {vmid} is running - destroy failed")));
            }
            if let Some(n) = w.guests.get_mut(&vmid) {
                n.lock = Some("destroyed".into());
            }
            let upid = w.task(
                node,
                if kind == "qemu" {
                    "qmdestroy"
                } else {
                    "vzdestroy"
                },
                vmid,
                t.delete,
                Ok(()),
                move |w| {
                    w.guests.remove(&vmid);
                },
            );
            Ok(json!(upid))
        }
        _ => Err((
            501,
            format!("the double does not implement {method} {}", rest.join("/")),
        )),
    }
}
