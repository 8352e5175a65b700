//! The `powerdns` DNS provider, through the PowerDNS HTTP API.
//!
//! Ownership: every rrset vessel writes carries a comment with account `vessel` and content
//! `vessel session=<name>`; rrsets without it are foreign and never changed. Comments are
//! invisible in DNS answers and need no extra records (external-dns's TXT registry doubles
//! the records and shows in DNS). The API key goes only into the `X-API-Key` header, never
//! into an error or a log. The API is `http://` (loopback or a private network) or `https://`
//! (with the config's `tls`: a CA file or a pinned certificate).
//!
//! Reads are cheap when nothing changed: a zone's full listing with comments costs PowerDNS
//! about 100 ms for 10,000 records, its zone-file export about 20 ms. Observe fetches the
//! export and reuses the last full listing while the export is byte for byte the same (any
//! change through the API also moves the SOA serial), re-reading in full at least once a
//! minute in case comments were edited behind the API's back.
//!
//! Writes never trust that cache: a batch re-reads each zone it touches in full and refuses
//! a step whose rrset exists without vessel's comment, then sends the changes as PATCHes of
//! at most `CHUNK_BYTES` each (PowerDNS refuses bodies over 2 MB by default), in order. When
//! all went through, the listing read plus the changes is cached with the export taken just
//! after, so the pass that follows a change is cheap too. (A change someone else makes between
//! that listing and that export, the time of the PATCHes, is seen at the next full read, at
//! most a minute later; a write in between is still checked against a fresh listing.) A step
//! that would conflict (a foreign rrset of the same type, or a CNAME beside other records) is
//! refused alone, since PowerDNS rejects a whole PATCH with one conflict in it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;
use serde::Deserialize;
use serde_json::json;

use crate::http_client::{Api, HttpError, Limits, Reply, TlsConfig};
use crate::model::observed::{ObservedRecord, RecordType};
use crate::model::plan::RecordAction;
use crate::secret::Secret;

use super::{BoxFut, DnsProvider, ProviderError};

const ACCOUNT: &str = "vessel";
const TTL: u32 = 60;
/// The largest PATCH body vessel sends (PowerDNS's `webserver-max-bodysize` is 2 MB).
const CHUNK_BYTES: usize = 3 << 19;
/// The longest a zone's listing is reused without a full read.
const REREAD_AFTER: Duration = Duration::from_secs(60);

pub struct PowerDns {
    api: Api,
    server_id: String,
    key: Secret,
    /// Zones, lower-cased, with the trailing dot.
    zones: Vec<String>,
    /// Per zone: the export last seen, when the listing was read, and the listing.
    cache: std::sync::Mutex<BTreeMap<String, Cached>>,
}

/// One step for a zone: action index, name, type, rrset change, the record after it.
type Item<'n> = (
    usize,
    &'n str,
    RecordType,
    serde_json::Value,
    Option<ObservedRecord>,
);

/// Why the powerdns provider could not do something. Display names what failed; the cause is
/// in `source`. Never holds the API key.
#[derive(Debug, thiserror::Error)]
pub enum PowerDnsError {
    #[error("the powerdns `api` setting")]
    Setting(#[source] HttpError),
    #[error("the PowerDNS API")]
    Api(#[source] HttpError),
    #[error("PowerDNS answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("PowerDNS sent something that is not a zone")]
    NotZone(#[source] serde_json::Error),
    #[error("an rrset without vessel's ownership comment is there; left alone")]
    Foreign,
    #[error("other records exist at this name, and a CNAME cannot sit beside them")]
    CnameBesideOthers,
    #[error("a CNAME vessel did not create is at this name; left alone")]
    ForeignCname,
    #[error("not sent after an earlier failure")]
    NotSent(#[source] Arc<PowerDnsError>),
}

struct Cached {
    export: Bytes,
    read_at: Instant,
    records: Vec<ObservedRecord>,
}

#[derive(Deserialize)]
struct Zone {
    rrsets: Vec<RrSet>,
}

#[derive(Deserialize)]
struct RrSet {
    name: String,
    #[serde(rename = "type")]
    rtype: String,
    records: Vec<Record>,
    #[serde(default)]
    comments: Vec<Comment>,
}

#[derive(Deserialize)]
struct Record {
    content: String,
}

#[derive(Deserialize)]
struct Comment {
    content: String,
    #[serde(default)]
    account: String,
}

fn fqdn(name: &str) -> String {
    let mut n = name.trim_end_matches('.').to_ascii_lowercase();
    n.push('.');
    n
}

fn record_type(t: &str) -> Option<RecordType> {
    match t {
        "A" => Some(RecordType::A),
        "AAAA" => Some(RecordType::AAAA),
        "CNAME" => Some(RecordType::CNAME),
        _ => None,
    }
}

impl PowerDns {
    /// `api` is `http://host:port` or `https://host:port` (with `tls` if given).
    pub fn new(
        api: &str,
        server_id: &str,
        key: Secret,
        zones: &[String],
        tls: Option<&TlsConfig>,
    ) -> Result<PowerDns, PowerDnsError> {
        Ok(PowerDns {
            api: Api::new(api, "PowerDNS API", tls, Limits::default())
                .map_err(PowerDnsError::Setting)?,
            server_id: server_id.to_string(),
            key,
            zones: zones.iter().map(|z| fqdn(z)).collect(),
            cache: Default::default(),
        })
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<Reply, PowerDnsError> {
        self.api
            .call(method, path, &[("x-api-key", self.key.expose())], body)
            .await
            .map_err(PowerDnsError::Api)
    }

    /// GET `path`, expecting 200.
    async fn get(&self, path: &str) -> Result<Bytes, PowerDnsError> {
        let reply = self.call(Method::GET, path, None).await?;
        if reply.status != 200 {
            return Err(PowerDnsError::Status {
                status: reply.status,
                body: reply.brief(),
            });
        }
        Ok(reply.body)
    }

    /// Every A, AAAA and CNAME rrset of `zone`, with its owner (from vessel's comment).
    /// Every rrset of `zone`: (name, type, owned) of all of them, and the A, AAAA and CNAME
    /// ones as records.
    async fn list_all(
        &self,
        zone: &str,
    ) -> Result<(Vec<(String, String, bool)>, Vec<ObservedRecord>), PowerDnsError> {
        let body = self.get(&self.zone_path(zone)).await?;
        let z: Zone = serde_json::from_slice(&body).map_err(PowerDnsError::NotZone)?;
        let all = z
            .rrsets
            .iter()
            .map(|rr| {
                (
                    rr.name.trim_end_matches('.').to_ascii_lowercase(),
                    rr.rtype.clone(),
                    rr.comments.iter().any(|c| c.account == ACCOUNT),
                )
            })
            .collect();
        let records = z
            .rrsets
            .into_iter()
            .filter_map(|rr| {
                let rtype = record_type(&rr.rtype)?;
                let session = rr
                    .comments
                    .iter()
                    .find(|c| c.account == ACCOUNT)
                    .map(|c| c.content.trim_start_matches("vessel session=").to_string());
                Some(ObservedRecord {
                    name: rr.name.trim_end_matches('.').to_ascii_lowercase(),
                    rtype,
                    content: rr
                        .records
                        .first()
                        .map(|r| r.content.trim_end_matches('.').to_string())
                        .unwrap_or_default(),
                    owned: session.is_some(),
                    session,
                })
            })
            .collect();
        Ok((all, records))
    }

    /// `zone`'s records: the cached listing while its export is unchanged, else a full read.
    async fn observe_zone(&self, zone: &str) -> Result<Vec<ObservedRecord>, PowerDnsError> {
        let export = self
            .get(&format!("{}/export", self.zone_path(zone)))
            .await?;
        if let Some(c) = crate::lock_or_reset(&self.cache).get(zone)
            && c.export == export
            && c.read_at.elapsed() < REREAD_AFTER
        {
            return Ok(c.records.clone());
        }
        let (_, records) = self.list_all(zone).await?;
        {
            let mut cache = crate::lock_or_reset(&self.cache);
            cache.insert(
                zone.to_string(),
                Cached {
                    export,
                    read_at: Instant::now(),
                    records: records.clone(),
                },
            );
        }
        Ok(records)
    }

    fn forget(&self, zone: &str) {
        crate::lock_or_reset(&self.cache).remove(zone);
    }

    /// Carry out `items` (action index, name, type, rrset change) in `zone`: each step whose
    /// rrset exists without vessel's comment is refused; the rest go in PATCHes in order.
    async fn apply_zone(
        &self,
        zone: &str,
        items: Vec<Item<'_>>,
    ) -> Vec<(usize, Result<(), Arc<PowerDnsError>>)> {
        self.forget(zone);
        let (all, existing) = match self.list_all(zone).await {
            Ok(r) => r,
            Err(e) => {
                let e = Arc::new(e);
                return items
                    .into_iter()
                    .map(|(i, ..)| (i, Err(e.clone())))
                    .collect();
            }
        };
        let mut listing: BTreeMap<(String, RecordType), ObservedRecord> = existing
            .into_iter()
            .map(|r| ((r.name.clone(), r.rtype), r))
            .collect();
        let mut after: BTreeMap<usize, ((String, RecordType), Option<ObservedRecord>)> =
            BTreeMap::new();
        let mut out = Vec::new();
        let mut chunks: Vec<(Vec<usize>, String)> = Vec::new();
        // Every rrset at each name, of any type: a CNAME cannot sit beside anything else, and
        // PowerDNS refuses a whole PATCH that tries (one conflict would block the zone).
        let mut at_name: BTreeMap<&str, Vec<(&str, bool)>> = BTreeMap::new();
        for (n, t, owned) in &all {
            at_name.entry(n).or_default().push((t, *owned));
        }
        for (i, name, rtype, rrset, record) in items {
            let key = (name.trim_end_matches('.').to_ascii_lowercase(), rtype);
            let there = at_name
                .get(key.0.as_str())
                .map(Vec::as_slice)
                .unwrap_or_default();
            let conflict = if listing.get(&key).is_some_and(|r| !r.owned) {
                Some(PowerDnsError::Foreign)
            } else if record.is_none() {
                None
            } else if rtype == RecordType::CNAME && there.iter().any(|(t, _)| *t != "CNAME") {
                Some(PowerDnsError::CnameBesideOthers)
            } else if rtype != RecordType::CNAME
                && there.iter().any(|(t, owned)| *t == "CNAME" && !owned)
            {
                Some(PowerDnsError::ForeignCname)
            } else {
                None
            };
            if let Some(why) = conflict {
                out.push((i, Err(Arc::new(why))));
                continue;
            }
            after.insert(i, (key, record));
            let text = rrset.to_string();
            match chunks.last_mut() {
                Some((idx, body)) if body.len() + text.len() < CHUNK_BYTES => {
                    idx.push(i);
                    body.push(',');
                    body.push_str(&text);
                }
                _ => chunks.push((vec![i], text)),
            }
        }
        let path = self.zone_path(zone);
        let mut failed: Option<Arc<PowerDnsError>> = None;
        for (idx, body) in chunks {
            // After a failed chunk, later ones are not sent: the steps stay for the next pass.
            let outcome = match &failed {
                Some(e) => Err(Arc::new(PowerDnsError::NotSent(e.clone()))),
                None => match self
                    .call(
                        Method::PATCH,
                        &path,
                        Some(Bytes::from(format!("{{\"rrsets\":[{body}]}}"))),
                    )
                    .await
                {
                    Ok(r) if r.status == 204 => Ok(()),
                    Ok(r) => Err(Arc::new(PowerDnsError::Status {
                        status: r.status,
                        body: r.brief(),
                    })),
                    Err(e) => Err(Arc::new(e)),
                },
            };
            if let Err(e) = &outcome
                && failed.is_none()
            {
                failed = Some(e.clone());
            }
            out.extend(idx.into_iter().map(|i| (i, outcome.clone())));
        }
        if failed.is_some() {
            return out;
        }
        // Everything went through: the listing is the one read plus these changes. Cache it
        // with the export as it is now, so the next pass need not list the zone again.
        for (key, record) in after.into_values() {
            match record {
                Some(r) => listing.insert(key, r),
                None => listing.remove(&key),
            };
        }
        if let Ok(export) = self.get(&format!("{}/export", self.zone_path(zone))).await {
            let mut cache = crate::lock_or_reset(&self.cache);
            cache.insert(
                zone.to_string(),
                Cached {
                    export,
                    read_at: Instant::now(),
                    records: listing.into_values().collect(),
                },
            );
        }
        out
    }

    fn zone_of(&self, name: &str) -> Option<&str> {
        let n = fqdn(name);
        self.zones
            .iter()
            .filter(|z| n == **z || n.ends_with(&format!(".{z}")))
            .max_by_key(|z| z.len())
            .map(String::as_str)
    }

    fn zone_path(&self, zone: &str) -> String {
        format!("/api/v1/servers/{}/zones/{zone}", self.server_id)
    }
}

impl DnsProvider for PowerDns {
    fn observe(&self) -> BoxFut<'_, Result<Vec<ObservedRecord>, ProviderError>> {
        Box::pin(async move {
            let mut out = Vec::new();
            for zone in &self.zones {
                let records = self
                    .observe_zone(zone)
                    .await
                    .map_err(|e| ProviderError::caused("read zone", zone.clone(), Arc::new(e)))?;
                out.extend(records);
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
            let mut by_zone: BTreeMap<&str, Vec<Item<'_>>> = BTreeMap::new();
            for (i, a) in actions.iter().enumerate() {
                let (name, rtype, rrset, record) = match a {
                    RecordAction::UpsertRecord {
                        name,
                        rtype,
                        content,
                        session,
                    } => {
                        let content = if *rtype == RecordType::CNAME {
                            fqdn(content)
                        } else {
                            content.clone()
                        };
                        (
                            name,
                            *rtype,
                            json!({
                                "name": fqdn(name), "type": rtype.as_str(), "ttl": TTL, "changetype": "REPLACE",
                                "records": [{"content": content}],
                                "comments": [{"content": format!("vessel session={session}"), "account": ACCOUNT}],
                            }),
                            Some(ObservedRecord {
                                name: name.trim_end_matches('.').to_ascii_lowercase(),
                                rtype: *rtype,
                                content: content.trim_end_matches('.').to_string(),
                                owned: true,
                                session: Some(session.clone()),
                            }),
                        )
                    }
                    RecordAction::RemoveRecord { name, rtype } => (
                        name,
                        *rtype,
                        json!({"name": fqdn(name), "type": rtype.as_str(), "changetype": "DELETE"}),
                        None,
                    ),
                };
                match self.zone_of(name) {
                    Some(zone) => by_zone
                        .entry(zone)
                        .or_default()
                        .push((i, name, rtype, rrset, record)),
                    None => {
                        results[i] = Some(Err(ProviderError::failed(
                            "publish",
                            name.clone(),
                            "it is in none of the configured zones",
                        )))
                    }
                }
            }
            for (zone, items) in by_zone {
                for (i, outcome) in self.apply_zone(zone, items).await {
                    let (name, rtype) = actions[i].name();
                    let name = format!("{name} {}", rtype.as_str());
                    results[i] =
                        Some(outcome.map_err(|e| ProviderError::caused("update", name, e)));
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
                            "no zone update answered for it",
                        ))
                    })
                })
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_go_to_their_longest_zone() {
        let p = PowerDns::new(
            "http://127.0.0.1:8081",
            "localhost",
            Secret::new("k"),
            &["example.com".into(), "dev.example.com.".into()],
            None,
        )
        .expect("api");
        assert_eq!(p.zone_of("a.dev.example.com"), Some("dev.example.com."));
        assert_eq!(p.zone_of("b.example.com"), Some("example.com."));
        assert_eq!(p.zone_of("example.com"), Some("example.com."));
        assert_eq!(p.zone_of("notexample.com"), None);
        assert!(PowerDns::new("ftp://x", "localhost", Secret::new("k"), &[], None).is_err());
    }
}
