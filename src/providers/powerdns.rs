//! The `powerdns` DNS provider, through the PowerDNS HTTP API.
//!
//! Ownership: every rrset vessel writes carries a comment with account `vessel` and content
//! `vessel session=<name>`; rrsets without it are foreign and never changed. Changes are
//! batched: one PATCH per zone per batch. The API key goes only into the `X-API-Key` header.
//! Plain http only (the API is expected on loopback or a private network).

use std::collections::BTreeMap;

use bytes::Bytes;
use http::Method;
use serde::Deserialize;
use serde_json::json;

use crate::config::Secret;
use crate::observed::{ObservedRecord, RecordType};
use crate::planner::Action;

use super::{BoxFut, DnsProvider, ProviderError};

const ACCOUNT: &str = "vessel";
const TTL: u32 = 60;

pub struct PowerDns {
    /// `host:port` of the API.
    addr: String,
    server_id: String,
    key: Secret,
    /// Zones, lower-cased, with the trailing dot.
    zones: Vec<String>,
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

impl PowerDns {
    /// `api` is `http://host:port`.
    pub fn new(
        api: &str,
        server_id: &str,
        key: Secret,
        zones: &[String],
    ) -> Result<PowerDns, String> {
        let addr = super::http::authority(api, "PowerDNS API")?;
        Ok(PowerDns {
            addr,
            server_id: server_id.to_string(),
            key,
            zones: zones.iter().map(|z| fqdn(z)).collect(),
        })
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<super::http::Reply, String> {
        super::http::call(
            &self.addr,
            method,
            path,
            &[("x-api-key", self.key.expose())],
            body.map(|b| Bytes::from(b.to_string())),
        )
        .await
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
                let reply = self
                    .call(Method::GET, &self.zone_path(zone), None)
                    .await
                    .map_err(|m| ProviderError::failed("read zone", zone.clone(), m))?;
                if reply.status != 200 {
                    return Err(ProviderError::failed(
                        "read zone",
                        zone.clone(),
                        format!("PowerDNS answered {}: {}", reply.status, reply.brief()),
                    ));
                }
                let z: Zone = serde_json::from_slice(&reply.body).map_err(|e| {
                    ProviderError::failed("read zone", zone.clone(), format!("not a zone: {e}"))
                })?;
                for rr in z.rrsets {
                    let rtype = match rr.rtype.as_str() {
                        "A" => RecordType::A,
                        "AAAA" => RecordType::AAAA,
                        "CNAME" => RecordType::CNAME,
                        _ => continue,
                    };
                    let session = rr
                        .comments
                        .iter()
                        .find(|c| c.account == ACCOUNT)
                        .map(|c| c.content.trim_start_matches("vessel session=").to_string());
                    out.push(ObservedRecord {
                        name: rr.name.trim_end_matches('.').to_ascii_lowercase(),
                        rtype,
                        content: rr
                            .records
                            .first()
                            .map(|r| r.content.trim_end_matches('.').to_string())
                            .unwrap_or_default(),
                        owned: session.is_some(),
                        session,
                    });
                }
            }
            Ok(out)
        })
    }

    fn apply<'a>(
        &'a self,
        actions: &'a [&'a Action],
    ) -> BoxFut<'a, Vec<Result<(), ProviderError>>> {
        Box::pin(async move {
            let mut results: Vec<Option<Result<(), ProviderError>>> =
                actions.iter().map(|_| None).collect();
            let mut by_zone: BTreeMap<&str, Vec<(usize, serde_json::Value)>> = BTreeMap::new();
            for (i, a) in actions.iter().enumerate() {
                let (name, rrset) = match a {
                    Action::UpsertRecord {
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
                            json!({
                                "name": fqdn(name), "type": rtype.as_str(), "ttl": TTL, "changetype": "REPLACE",
                                "records": [{"content": content, "disabled": false}],
                                "comments": [{"content": format!("vessel session={session}"), "account": ACCOUNT}],
                            }),
                        )
                    }
                    Action::RemoveRecord { name, rtype } => (
                        name,
                        json!({"name": fqdn(name), "type": rtype.as_str(), "changetype": "DELETE"}),
                    ),
                    _ => {
                        results[i] = Some(Err(ProviderError::Unsupported("a non-DNS step")));
                        continue;
                    }
                };
                match self.zone_of(name) {
                    Some(zone) => by_zone.entry(zone).or_default().push((i, rrset)),
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
                let rrsets: Vec<serde_json::Value> = items.iter().map(|(_, r)| r.clone()).collect();
                let outcome = match self
                    .call(
                        Method::PATCH,
                        &self.zone_path(zone),
                        Some(json!({ "rrsets": rrsets })),
                    )
                    .await
                {
                    Ok(r) if r.status == 204 => Ok(()),
                    Ok(r) => Err(format!("PowerDNS answered {}: {}", r.status, r.brief())),
                    Err(m) => Err(m),
                };
                for (i, _) in items {
                    results[i] =
                        Some(outcome.clone().map_err(|m| {
                            ProviderError::failed("update zone", zone.to_string(), m)
                        }));
                }
            }
            results
                .into_iter()
                .map(|r| r.unwrap_or(Err(ProviderError::Unsupported("an unplanned step"))))
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
        )
        .expect("api");
        assert_eq!(p.zone_of("a.dev.example.com"), Some("dev.example.com."));
        assert_eq!(p.zone_of("b.example.com"), Some("example.com."));
        assert_eq!(p.zone_of("example.com"), Some("example.com."));
        assert_eq!(p.zone_of("notexample.com"), None);
        assert!(PowerDns::new("https://x", "localhost", Secret::new("k"), &[]).is_err());
    }
}
