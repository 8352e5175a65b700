//! The DNS providers' settings (`providers.dns`): none, a hosts file, or PowerDNS.

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::http_client::TlsConfig;
use crate::secret::SecretRef;

/// Where DNS records for routes with `dns: true` go.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum DnsConfig {
    /// No DNS: `*.localhost` resolves to the loopback by itself.
    #[default]
    None,
    /// A managed block in a hosts file.
    Hosts {
        file: PathBuf,
        /// The address the names resolve to.
        address: String,
    },
    /// An authoritative PowerDNS server through its HTTP API.
    Powerdns {
        /// The API base, such as `http://127.0.0.1:8081`.
        api: String,
        #[serde(default = "default_pdns_server")]
        server_id: String,
        api_key: SecretRef,
        zones: Vec<String>,
        /// The address A/AAAA records point at.
        address: String,
        /// How to trust an `https://` API.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tls: Option<TlsConfig>,
    },
    /// Cloudflare zones, through the v4 API.
    Cloudflare(CloudflareDnsConfig),
}

/// The `cloudflare` DNS provider's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CloudflareDnsConfig {
    /// An API token with `Zone:DNS:Edit` (and `Zone:Zone:Read` for zones given by name) on the
    /// zones. Only ever sent in the `Authorization` header.
    pub api_token: SecretRef,
    /// The zones vessel's records go in: each a zone name (`example.com`, looked up once) or
    /// a zone ID (32 hex digits). A record goes to the longest zone its name is in.
    pub zones: Vec<String>,
    /// What A/AAAA (an IP address) or CNAME (a name) records point at. Not needed with the
    /// `cloudflare_tunnel` proxy: its routes' records are CNAMEs to the tunnel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Records go through Cloudflare's proxy (orange cloud). Records pointing at a tunnel are
    /// always proxied.
    #[serde(default)]
    pub proxied: bool,
    /// The name in vessel's ownership comment (`vessel:<instance> session=<name>`): two vessels
    /// sharing a zone need different instances. Letters, digits and `-`.
    #[serde(default = "default_instance")]
    pub instance: String,
    /// The most operations vessel sends in one batch request: 200 on Cloudflare's Free plan,
    /// 3,500 on Pro, Business and Enterprise.
    #[serde(default = "default_batch_limit")]
    pub batch_limit: u32,
    /// The requests per five minutes vessel allows itself with this token (Cloudflare allows
    /// 1,200). The `cloudflare_tunnel` proxy with the same token shares this budget.
    #[serde(default = "default_budget")]
    pub rate_budget: u32,
    /// The API, `https://api.cloudflare.com` unless set (for a test double).
    #[serde(default = "default_cf_api")]
    pub api: String,
    /// How to trust an `https://` `api`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
}

fn default_instance() -> String {
    "vessel".into()
}

fn default_batch_limit() -> u32 {
    200
}

pub(crate) fn default_budget() -> u32 {
    crate::providers::cloudflare::DEFAULT_BUDGET
}

pub(crate) fn default_cf_api() -> String {
    crate::providers::cloudflare::API.into()
}

fn default_pdns_server() -> String {
    "localhost".into()
}

impl DnsConfig {
    /// Make relative paths relative to `base` (the config file's directory).
    pub fn rebase(&mut self, base: &std::path::Path) {
        match self {
            DnsConfig::Hosts { file, .. } if file.is_relative() => *file = base.join(&*file),
            DnsConfig::Powerdns { tls: Some(t), .. } => t.rebase(base),
            DnsConfig::Cloudflare(CloudflareDnsConfig { tls: Some(t), .. }) => t.rebase(base),
            _ => {}
        }
    }
}
