//! What decides a plan besides desired and observed state: the policy (the clock, the domain
//! and templates, the guards' limits, DNS, placement, what is settling). Built outside the
//! planner (`Config::policy`), which imports no config.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Utc};

use crate::model::observed::RecordType;
use crate::model::plan::Object;
use crate::model::{
    ComputeKind, DestroyBudget, HostCapacity, PlacementHost, RouteTemplate, SessionLimits,
};

/// Everything besides desired and observed state that decides a plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// The clock, passed in.
    pub now: DateTime<Utc>,
    pub domain: String,
    pub templates: Vec<RouteTemplate>,
    pub destroy_budget: DestroyBudget,
    /// Destroys past the budget are allowed (`--allow-destroy`).
    pub allow_destroy: bool,
    pub allow_empty_source: bool,
    /// What DNS records for routes look like; `None` when no DNS provider is configured.
    pub dns: Option<(RecordType, String)>,
    /// The hosts of compute providers that have several, sorted by name: where new sessions
    /// are placed.
    pub placement: BTreeMap<ComputeKind, Vec<PlacementHost>>,
    /// Files that changed recently: what a change to them would take away waits.
    pub settle: Arc<Settle>,
    /// Compute kinds whose provider keeps a destroyed session's workspace (to restore it if
    /// the session comes back, and across a replace).
    pub keeps_workspaces: BTreeSet<ComputeKind>,
    /// Caps on running sessions: the excess is held.
    pub limits: SessionLimits,
    /// What each compute host holds, by provider and host (`None`: a provider that is one
    /// place): sessions that would take the sum of their plans past it are held.
    pub capacity: BTreeMap<(ComputeKind, Option<String>), HostCapacity>,
}

/// Which desired-state files are still settling, and where objects were last declared: a
/// destroy, a replace, a route removal or a DNS removal whose file changed less than the
/// settle time ago waits (an editor that truncates a file before writing it must not destroy
/// what it declared). Built by the loop from the history of the files it loaded; empty for a
/// one-off plan.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Settle {
    /// Files still settling, by path relative to the tree's root: when each settles.
    pub until: BTreeMap<PathBuf, DateTime<Utc>>,
    /// The file each session (`Object::Session`) and each routed host (`Object::Route`) was
    /// last declared in, including objects no longer declared.
    pub origins: BTreeMap<Object, PathBuf>,
}

impl Settle {
    /// When the last of `files` settles, if any of them is still settling at `now`. With no
    /// file known, the last of all settling files counts (unknown is not settled).
    pub fn wait_for<'a>(
        &self,
        files: impl IntoIterator<Item = &'a Path>,
        now: DateTime<Utc>,
    ) -> Option<(PathBuf, DateTime<Utc>)> {
        let mut known = false;
        let mut latest: Option<(PathBuf, DateTime<Utc>)> = None;
        let mut consider = |f: &Path, at: DateTime<Utc>| {
            if at > now && latest.as_ref().is_none_or(|(_, l)| at > *l) {
                latest = Some((f.to_path_buf(), at));
            }
        };
        for f in files {
            known = true;
            if let Some(at) = self.until.get(f) {
                consider(f, *at);
            }
        }
        if !known {
            for (f, at) in &self.until {
                consider(f, *at);
            }
        }
        latest
    }

    /// The files `object` comes from: where it was last declared, and where its provider says
    /// it was made from.
    pub(super) fn files_of<'a>(
        &'a self,
        object: &Object,
        made_from: Option<&'a Path>,
    ) -> Vec<&'a Path> {
        let mut v: Vec<&Path> = self
            .origins
            .get(object)
            .map(PathBuf::as_path)
            .into_iter()
            .collect();
        v.extend(made_from);
        v
    }
}

/// The record type an address calls for: A for IPv4, AAAA for IPv6, CNAME for a name.
pub fn record_for(address: &str) -> (RecordType, String) {
    // In the canonical form DNS servers store (`2001:DB8:0::1` reads back as `2001:db8::1`,
    // names case-insensitively), so what is read back compares equal to what is desired.
    match address.parse::<std::net::IpAddr>() {
        Ok(ip @ std::net::IpAddr::V4(_)) => (RecordType::A, ip.to_string()),
        Ok(ip @ std::net::IpAddr::V6(_)) => (RecordType::AAAA, ip.to_string()),
        Err(_) => (
            RecordType::CNAME,
            address.trim_end_matches('.').to_ascii_lowercase(),
        ),
    }
}
