//! The `cloudflare` DNS provider: A, AAAA and CNAME records in Cloudflare zones, through the
//! v4 API (`providers/cloudflare.rs`: token, rate budget, envelope).
//!
//! Ownership: every record vessel writes carries the comment `vessel:<instance> session=<name>`;
//! a record without that prefix (another instance's, or nobody's) is foreign and never
//! changed. Comments do not show in DNS answers and need no extra records.
//!
//! Observe: one list per zone, filtered by that prefix (`comment.startswith`), paginated
//! (`per_page` 5,000; a short page ends it). Zones are given by name or by ID; each is looked
//! up once (`GET /zones?name=` or `GET /zones/{id}`) and remembered.
//!
//! Writes never trust what was observed: a batch lists each zone it touches afresh, whole
//! (foreign records included: a create beside a foreign record of its name and type, or a
//! CNAME beside anything, is refused alone, since Cloudflare refuses a whole batch with one
//! conflict in it), then sends the changes through `POST /zones/{id}/dns_records/batch`
//! (deletes, puts by ID, posts), at most `batch_limit` operations a request (200 on the Free
//! plan, 3,500 on paid ones), in order. After a failed request the later ones are not sent.
//! Records for tunnel CNAMEs (`<tunnel-id>.cfargotunnel.com`) are always proxied, as
//! Cloudflare requires; others as the `proxied` setting says. TTL is 1 (automatic).

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use http::Method;
use serde::Deserialize;
use serde_json::json;

use crate::model::observed::{ObservedRecord, RecordType};
use crate::model::plan::RecordAction;
use crate::providers::cloudflare::{Client, CloudflareError, is_id, query_value};

use super::{BoxFut, DnsProvider, ProviderError};

/// Records asked for per page of a list.
const PER_PAGE: u32 = 5000;
/// The most pages one list reads (5,000,000 records).
const MAX_PAGES: u32 = 1000;

/// The `cloudflare` DNS provider.
pub struct CloudflareDns {
    client: Client,
    /// The zones as configured (names or IDs).
    zones: Vec<String>,
    /// Configured zone -> (ID, lower-cased name), once looked up.
    resolved: std::sync::Mutex<BTreeMap<String, (String, String)>>,
    /// `vessel:<instance> `.
    prefix: String,
    proxied: bool,
    batch_limit: usize,
}

/// Why a step was refused or not sent. Never holds the token.
#[derive(Debug, thiserror::Error)]
pub enum CloudflareDnsError {
    #[error(transparent)]
    Api(#[from] CloudflareError),
    #[error("a record without vessel's ownership comment is there; left alone")]
    Foreign,
    #[error("other records exist at this name, and a CNAME cannot sit beside them")]
    CnameBesideOthers,
    #[error("a CNAME vessel did not create is at this name; left alone")]
    ForeignCname,
    #[error("not sent after an earlier batch failed")]
    NotSent(#[source] Arc<CloudflareDnsError>),
}

/// One record as Cloudflare lists it (only what vessel reads).
#[derive(Deserialize, Debug, Clone)]
struct Record {
    id: String,
    name: String,
    #[serde(rename = "type")]
    rtype: String,
    #[serde(default)]
    content: String,
    #[serde(default)]
    comment: Option<String>,
    #[serde(default)]
    proxied: bool,
}

#[derive(Deserialize)]
struct ZoneInfo {
    id: String,
    name: String,
}

fn record_type(t: &str) -> Option<RecordType> {
    match t {
        "A" => Some(RecordType::A),
        "AAAA" => Some(RecordType::AAAA),
        "CNAME" => Some(RecordType::CNAME),
        _ => None,
    }
}

fn bare(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// One change in a batch, in the order Cloudflare runs them (deletes, puts, posts).
#[derive(Debug)]
enum Op {
    Delete(String),
    Put(serde_json::Value),
    Post(serde_json::Value),
}

impl CloudflareDns {
    pub fn new(
        client: Client,
        zones: &[String],
        instance: &str,
        proxied: bool,
        batch_limit: u32,
    ) -> CloudflareDns {
        CloudflareDns {
            client,
            zones: zones.to_vec(),
            resolved: Default::default(),
            prefix: format!("vessel:{instance} "),
            proxied,
            batch_limit: batch_limit.max(1) as usize,
        }
    }

    /// The API client (its budget counts the calls).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Every configured zone's (ID, name), looked up once.
    async fn zones(&self) -> Result<Vec<(String, String)>, CloudflareError> {
        let mut out = Vec::new();
        for z in &self.zones {
            if let Some(r) = crate::lock_or_reset(&self.resolved).get(z) {
                out.push(r.clone());
                continue;
            }
            let info: ZoneInfo = if is_id(z) {
                let a = self
                    .client
                    .call(Method::GET, &format!("/zones/{z}"), None)
                    .await?;
                serde_json::from_value(a.result).map_err(CloudflareError::Answer)?
            } else {
                let a = self
                    .client
                    .call(
                        Method::GET,
                        &format!("/zones?name={}", query_value(&bare(z))),
                        None,
                    )
                    .await?;
                let mut found: Vec<ZoneInfo> =
                    serde_json::from_value(a.result).map_err(CloudflareError::Answer)?;
                found.retain(|f| bare(&f.name) == bare(z));
                found
                    .pop()
                    .ok_or_else(|| CloudflareError::NoZone(bare(z)))?
            };
            let r = (info.id, bare(&info.name));
            crate::lock_or_reset(&self.resolved).insert(z.clone(), r.clone());
            out.push(r);
        }
        Ok(out)
    }

    /// Every record of zone `id`, or only vessel's (`owned_only`), all pages.
    async fn list(&self, id: &str, owned_only: bool) -> Result<Vec<Record>, CloudflareError> {
        let filter = if owned_only {
            format!("&comment.startswith={}", query_value(&self.prefix))
        } else {
            String::new()
        };
        let mut out = Vec::new();
        for page in 1..=MAX_PAGES {
            let a = self
                .client
                .call(
                    Method::GET,
                    &format!("/zones/{id}/dns_records?per_page={PER_PAGE}&page={page}{filter}"),
                    None,
                )
                .await?;
            let records: Vec<Record> =
                serde_json::from_value(a.result).map_err(CloudflareError::Answer)?;
            let n = records.len() as u32;
            out.extend(records);
            let info = a.info.unwrap_or_default();
            let per_page = info.per_page.unwrap_or(PER_PAGE).max(1);
            let more = match info.total_pages {
                Some(total) => page < total,
                None => n >= per_page,
            };
            if !more || n == 0 {
                break;
            }
        }
        Ok(out)
    }

    fn owned(&self, r: &Record) -> bool {
        r.comment
            .as_deref()
            .is_some_and(|c| c.starts_with(&self.prefix))
    }

    fn observed(&self, r: &Record) -> Option<ObservedRecord> {
        let rtype = record_type(&r.rtype)?;
        let session = r
            .comment
            .as_deref()
            .and_then(|c| c.strip_prefix(&self.prefix))
            .map(|rest| rest.trim_start_matches("session=").to_string());
        Some(ObservedRecord {
            name: bare(&r.name),
            rtype,
            content: if rtype == RecordType::CNAME {
                bare(&r.content)
            } else {
                r.content.clone()
            },
            owned: session.is_some(),
            session,
        })
    }

    fn body(
        &self,
        name: &str,
        rtype: RecordType,
        content: &str,
        session: &str,
    ) -> serde_json::Value {
        let proxied = self.proxied || content.ends_with(".cfargotunnel.com");
        json!({
            "name": bare(name),
            "type": rtype.as_str(),
            "content": content,
            "ttl": 1,
            "proxied": proxied,
            "comment": format!("{}session={session}", self.prefix),
        })
    }

    fn zone_of<'z>(zones: &'z [(String, String)], name: &str) -> Option<&'z (String, String)> {
        let n = bare(name);
        zones
            .iter()
            .filter(|(_, z)| n == *z || n.ends_with(&format!(".{z}")))
            .max_by_key(|(_, z)| z.len())
    }

    /// Carry out `items` (action index, action) in zone `id`.
    async fn apply_zone(
        &self,
        id: &str,
        items: Vec<(usize, &RecordAction)>,
    ) -> Vec<(usize, Result<(), Arc<CloudflareDnsError>>)> {
        let all = match self.list(id, false).await {
            Ok(r) => r,
            Err(e) => {
                let e = Arc::new(CloudflareDnsError::Api(e));
                return items
                    .into_iter()
                    .map(|(i, _)| (i, Err(e.clone())))
                    .collect();
            }
        };
        let mut at_name: BTreeMap<String, Vec<&Record>> = BTreeMap::new();
        for r in &all {
            at_name.entry(bare(&r.name)).or_default().push(r);
        }
        // Records this batch removes: a CNAME may take the place of vessel's own A record.
        let removed: std::collections::BTreeSet<(String, &str)> = items
            .iter()
            .filter(|(_, a)| matches!(a, RecordAction::RemoveRecord { .. }))
            .map(|(_, a)| (bare(a.name().0), a.name().1.as_str()))
            .collect();
        let mut out = Vec::new();
        // (action index, its operations)
        let mut planned: Vec<(usize, Vec<Op>)> = Vec::new();
        for (i, a) in items {
            let (name, rtype) = a.name();
            let name = bare(name);
            let there: &[&Record] = at_name.get(&name).map(Vec::as_slice).unwrap_or_default();
            let same: Vec<&&Record> = there.iter().filter(|r| r.rtype == rtype.as_str()).collect();
            let (mine, foreign): (Vec<&&Record>, Vec<&&Record>) =
                same.into_iter().partition(|r| self.owned(r));
            let mut ops = Vec::new();
            match a {
                RecordAction::RemoveRecord { .. } => {
                    ops.extend(mine.iter().map(|r| Op::Delete(r.id.clone())));
                }
                RecordAction::UpsertRecord {
                    content, session, ..
                } => {
                    let conflict = if !foreign.is_empty() {
                        Some(CloudflareDnsError::Foreign)
                    } else if rtype == RecordType::CNAME
                        && there.iter().any(|r| {
                            r.rtype != "CNAME"
                                && !(self.owned(r)
                                    && removed.contains(&(name.clone(), r.rtype.as_str())))
                        })
                    {
                        Some(CloudflareDnsError::CnameBesideOthers)
                    } else if rtype != RecordType::CNAME
                        && there.iter().any(|r| r.rtype == "CNAME" && !self.owned(r))
                    {
                        Some(CloudflareDnsError::ForeignCname)
                    } else {
                        None
                    };
                    if let Some(why) = conflict {
                        out.push((i, Err(Arc::new(why))));
                        continue;
                    }
                    let content = if rtype == RecordType::CNAME {
                        bare(content)
                    } else {
                        content.clone()
                    };
                    let body = self.body(&name, rtype, &content, session);
                    match mine.split_first() {
                        Some((first, rest)) => {
                            let same = self.observed(first).is_some_and(|o| {
                                o.content == content && o.session.as_deref() == Some(session)
                            }) && Some(first.proxied) == body["proxied"].as_bool();
                            if !same {
                                let mut put = body;
                                put["id"] = json!(first.id);
                                ops.push(Op::Put(put));
                            }
                            ops.extend(rest.iter().map(|r| Op::Delete(r.id.clone())));
                        }
                        None => ops.push(Op::Post(body)),
                    }
                }
            }
            planned.push((i, ops));
        }
        // Chunks of at most `batch_limit` operations, each action's operations in one chunk;
        // Cloudflare runs a chunk's deletes, then puts, then posts.
        let mut chunks: Vec<(Vec<usize>, Vec<Op>)> = Vec::new();
        for (i, ops) in planned {
            if ops.is_empty() {
                out.push((i, Ok(())));
                continue;
            }
            match chunks.last_mut() {
                Some((idx, c)) if c.len() + ops.len() <= self.batch_limit => {
                    idx.push(i);
                    c.extend(ops);
                }
                _ => chunks.push((vec![i], ops)),
            }
        }
        let mut failed: Option<Arc<CloudflareDnsError>> = None;
        for (idx, ops) in chunks {
            let outcome = match &failed {
                Some(e) => Err(Arc::new(CloudflareDnsError::NotSent(e.clone()))),
                None => self.batch(id, ops).await.map_err(Arc::new),
            };
            if let Err(e) = &outcome
                && failed.is_none()
            {
                failed = Some(e.clone());
            }
            out.extend(idx.into_iter().map(|i| (i, outcome.clone())));
        }
        out
    }

    async fn batch(&self, id: &str, ops: Vec<Op>) -> Result<(), CloudflareDnsError> {
        let (mut deletes, mut puts, mut posts) = (Vec::new(), Vec::new(), Vec::new());
        for op in ops {
            match op {
                Op::Delete(id) => deletes.push(json!({ "id": id })),
                Op::Put(b) => puts.push(b),
                Op::Post(b) => posts.push(b),
            }
        }
        let mut body = serde_json::Map::new();
        for (k, v) in [("deletes", deletes), ("puts", puts), ("posts", posts)] {
            if !v.is_empty() {
                body.insert(k.into(), serde_json::Value::Array(v));
            }
        }
        let body = serde_json::Value::Object(body).to_string();
        self.client
            .call(
                Method::POST,
                &format!("/zones/{id}/dns_records/batch"),
                Some(Bytes::from(body)),
            )
            .await?;
        Ok(())
    }
}

impl DnsProvider for CloudflareDns {
    fn observe(&self) -> BoxFut<'_, Result<Vec<ObservedRecord>, ProviderError>> {
        Box::pin(async move {
            let zones = self.zones().await.map_err(|e| {
                ProviderError::caused("look up zones", "in Cloudflare", Arc::new(e))
            })?;
            let mut out = Vec::new();
            for (id, name) in &zones {
                let records = self
                    .list(id, true)
                    .await
                    .map_err(|e| ProviderError::caused("read zone", name.clone(), Arc::new(e)))?;
                // The filter is Cloudflare's; ownership is checked here all the same.
                out.extend(
                    records
                        .iter()
                        .filter(|r| self.owned(r))
                        .filter_map(|r| self.observed(r)),
                );
            }
            Ok(out)
        })
    }

    fn apply<'a>(
        &'a self,
        actions: &'a [&'a RecordAction],
    ) -> BoxFut<'a, Vec<Result<(), ProviderError>>> {
        Box::pin(async move {
            let mut results: Vec<Option<Result<(), ProviderError>>> =
                actions.iter().map(|_| None).collect();
            let zones = match self.zones().await {
                Ok(z) => z,
                Err(e) => {
                    let e: Arc<dyn std::error::Error + Send + Sync> = Arc::new(e);
                    return actions
                        .iter()
                        .map(|a| Err(ProviderError::caused("update", a.name().0, e.clone())))
                        .collect();
                }
            };
            let mut by_zone: BTreeMap<&str, Vec<(usize, &RecordAction)>> = BTreeMap::new();
            for (i, a) in actions.iter().enumerate() {
                match Self::zone_of(&zones, a.name().0) {
                    Some((id, _)) => by_zone.entry(id).or_default().push((i, a)),
                    None => {
                        results[i] = Some(Err(ProviderError::failed(
                            "publish",
                            a.name().0,
                            "it is in none of the configured zones",
                        )))
                    }
                }
            }
            for (zone, items) in by_zone {
                for (i, outcome) in self.apply_zone(zone, items).await {
                    let (name, rtype) = actions[i].name();
                    let name = format!("{name} {}", rtype.as_str());
                    results[i] = Some(outcome.map_err(|e| {
                        ProviderError::caused(
                            "update",
                            name,
                            e as Arc<dyn std::error::Error + Send + Sync>,
                        )
                    }));
                }
            }
            results
                .into_iter()
                .zip(actions)
                .map(|(r, a)| {
                    r.unwrap_or_else(|| {
                        Err(ProviderError::failed(
                            "update",
                            a.name().0,
                            "no batch answered for it",
                        ))
                    })
                })
                .collect()
        })
    }
}
