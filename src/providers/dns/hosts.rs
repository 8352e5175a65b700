//! The `hosts` DNS provider: records in a managed block of a hosts file.
//!
//! vessel owns only the lines between its two marker lines; each carries its session in a
//! comment (the ownership marker). Everything outside the block stays byte for byte as it
//! was, and names found there are reported as foreign, so vessel never shadows them. The
//! file is rewritten atomically (a temporary file beside it, then a rename).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use crate::model::observed::{ObservedRecord, RecordType};
use crate::model::plan::RecordAction;

use super::{BoxFut, DnsProvider, ProviderError};

pub const BEGIN: &str = "# BEGIN vessel managed block: edits here are overwritten";
pub const END: &str = "# END vessel managed block";

pub struct HostsDns {
    file: PathBuf,
    /// Serialises read-modify-write of the file.
    lock: tokio::sync::Mutex<()>,
}

/// A hosts file split around the managed block.
#[derive(Debug, Default, PartialEq)]
struct Parsed {
    before: String,
    /// name -> (address, session)
    block: BTreeMap<String, (String, Option<String>)>,
    after: String,
    /// Names outside the block, with their addresses.
    foreign: Vec<(String, String)>,
}

fn parse(text: &str) -> Parsed {
    let mut p = Parsed::default();
    let mut state = 0; // 0 before, 1 inside, 2 after
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_end_matches(['\n', '\r']);
        match state {
            0 if trimmed == BEGIN => state = 1,
            1 if trimmed == END => state = 2,
            1 => {
                let (entry, comment) = trimmed.split_once('#').unwrap_or((trimmed, ""));
                let mut f = entry.split_whitespace();
                if let (Some(addr), Some(name)) = (f.next(), f.next()) {
                    let session = comment
                        .trim()
                        .strip_prefix("vessel session=")
                        .map(|s| s.trim().to_string());
                    p.block
                        .insert(name.to_ascii_lowercase(), (addr.to_string(), session));
                }
            }
            _ => {
                let entry = trimmed.split('#').next().unwrap_or("");
                let mut f = entry.split_whitespace();
                if let Some(addr) = f.next() {
                    for name in f {
                        p.foreign
                            .push((name.to_ascii_lowercase(), addr.to_string()));
                    }
                }
                if state == 0 {
                    p.before.push_str(line);
                } else {
                    p.after.push_str(line);
                }
            }
        }
    }
    p
}

fn render(p: &Parsed) -> String {
    let mut out = p.before.clone();
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    if !p.block.is_empty() {
        out.push_str(BEGIN);
        out.push('\n');
        for (name, (addr, session)) in &p.block {
            match session {
                Some(s) => out.push_str(&format!("{addr} {name} # vessel session={s}\n")),
                None => out.push_str(&format!("{addr} {name}\n")),
            }
        }
        out.push_str(END);
        out.push('\n');
    }
    out.push_str(&p.after);
    out
}

fn rtype(addr: &str) -> RecordType {
    match addr.parse::<IpAddr>() {
        Ok(IpAddr::V6(_)) => RecordType::AAAA,
        _ => RecordType::A,
    }
}

impl HostsDns {
    pub fn new(file: PathBuf) -> HostsDns {
        HostsDns {
            file,
            lock: tokio::sync::Mutex::new(()),
        }
    }

    fn read(&self) -> Result<String, ProviderError> {
        match std::fs::read_to_string(&self.file) {
            Ok(t) => Ok(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
            Err(e) => Err(ProviderError::io("read", self.file.display().to_string())(
                e,
            )),
        }
    }

    fn write(&self, text: &str) -> Result<(), ProviderError> {
        crate::providers::write_atomically(&self.file, text.as_bytes())
            .map_err(ProviderError::io("write", self.file.display().to_string()))
    }
}

impl DnsProvider for HostsDns {
    fn observe(&self) -> BoxFut<'_, Result<Vec<ObservedRecord>, ProviderError>> {
        Box::pin(async move {
            let p = parse(&self.read()?);
            let mut out: Vec<ObservedRecord> = p
                .block
                .iter()
                .map(|(name, (addr, session))| ObservedRecord {
                    name: name.clone(),
                    rtype: rtype(addr),
                    content: addr.clone(),
                    owned: true,
                    session: session.clone(),
                })
                .collect();
            out.extend(p.foreign.into_iter().map(|(name, addr)| ObservedRecord {
                name,
                rtype: rtype(&addr),
                content: addr,
                owned: false,
                session: None,
            }));
            Ok(out)
        })
    }

    fn apply<'a>(
        &'a self,
        actions: &'a [&'a RecordAction],
    ) -> BoxFut<'a, Vec<Result<(), ProviderError>>> {
        Box::pin(async move {
            let _guard = self.lock.lock().await;
            // The file cannot be read or written: every step of the batch fails with that.
            let fail_all = |e: ProviderError| -> Vec<Result<(), ProviderError>> {
                let msg = crate::error_chain(&e);
                let file = self.file.display().to_string();
                actions
                    .iter()
                    .map(|_| Err(ProviderError::failed("update", file.clone(), msg.clone())))
                    .collect()
            };
            let mut p = match self.read() {
                Ok(t) => parse(&t),
                Err(e) => return fail_all(e),
            };
            let mut results = Vec::new();
            for a in actions {
                results.push(match a {
                    RecordAction::UpsertRecord {
                        name,
                        content,
                        session,
                        rtype: RecordType::A | RecordType::AAAA,
                    } => {
                        p.block.insert(
                            name.to_ascii_lowercase(),
                            (content.clone(), Some(session.clone())),
                        );
                        Ok(())
                    }
                    RecordAction::UpsertRecord { name, .. } => Err(ProviderError::failed(
                        "upsert",
                        name.clone(),
                        "a hosts file holds only addresses (A or AAAA)",
                    )),
                    RecordAction::RemoveRecord { name, .. } => {
                        p.block.remove(&name.to_ascii_lowercase());
                        Ok(())
                    }
                });
            }
            if let Err(e) = self.write(&render(&p)) {
                return fail_all(e);
            }
            results
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FOREIGN: &str =
        "127.0.0.1\tlocalhost\n::1 localhost ip6-localhost # keep me\n\n192.0.2.7 printer.lan\n";

    #[test]
    fn the_block_round_trips_and_the_rest_is_untouched() {
        let mut p = parse(FOREIGN);
        assert_eq!(
            p.foreign.iter().map(|f| f.0.as_str()).collect::<Vec<_>>(),
            ["localhost", "localhost", "ip6-localhost", "printer.lan"]
        );
        p.block.insert(
            "alice.dev.example.com".into(),
            ("192.0.2.10".into(), Some("alice".into())),
        );
        let text = render(&p);
        assert!(text.starts_with(FOREIGN), "{text}");
        let again = parse(&text);
        assert_eq!(again.block, p.block);
        assert_eq!(render(&again), text, "rendering is stable");
        // Lines after the block stay after it.
        let with_after = format!("{text}10.0.0.1 after.lan\n");
        let mut q = parse(&with_after);
        q.block.clear();
        assert_eq!(render(&q), format!("{FOREIGN}10.0.0.1 after.lan\n"));
    }
}
