//! The DNS providers' settings (`providers.dns`): none, a hosts file, or PowerDNS.

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

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
    },
}

fn default_pdns_server() -> String {
    "localhost".into()
}

impl DnsConfig {
    /// Make relative paths relative to `base` (the config file's directory).
    pub fn rebase(&mut self, base: &std::path::Path) {
        if let DnsConfig::Hosts { file, .. } = self
            && file.is_relative()
        {
            *file = base.join(&*file);
        }
    }
}
