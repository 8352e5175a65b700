//! The proxy providers' settings (`providers.proxy`): one of the embedded proxy, Caddy, Traefik.

use std::net::SocketAddr;
use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::http_client::TlsConfig;
use crate::model::Duration;

/// The reverse proxy that serves session routes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum ProxyConfig {
    /// vessel's own reverse proxy.
    Embedded {
        /// The address it listens on.
        #[serde(default = "default_proxy_listen")]
        listen: SocketAddr,
    },
    /// Caddy, through its admin API.
    Caddy {
        /// The admin API, such as `http://127.0.0.1:2019`.
        admin: String,
        /// The HTTP server in Caddy's config that vessel's routes go into.
        server: String,
        /// The addresses that server listens on, such as `[":8080"]`, used only to create it
        /// when Caddy's config does not have it (after Caddy restarted with an empty config).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        listen: Vec<String>,
        /// The prefix of the `@id` that marks vessel's routes (`<prefix>_<session>_<route>_<host>`).
        /// Two vessels sharing one Caddy need different prefixes.
        #[serde(default = "default_route_prefix")]
        id_prefix: String,
        /// How to trust an `https://` admin API.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tls: Option<TlsConfig>,
        /// vessel's wake-and-activity listener, such as `127.0.0.1:8090`. When set, every
        /// route in Caddy points at this address (Host kept), and vessel forwards from there to
        /// the session: so sessions behind Caddy sleep when idle and a request wakes them.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        wake_listen: Option<SocketAddr>,
    },
    /// Traefik, through its file provider: vessel owns one dynamic-configuration file.
    Traefik(TraefikConfig),
    /// A Cloudflare Tunnel's remotely managed configuration: each route an ingress rule.
    #[serde(rename = "cloudflare_tunnel")]
    CloudflareTunnel(CloudflareTunnelConfig),
}

/// The `cloudflare_tunnel` proxy provider's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CloudflareTunnelConfig {
    /// The Cloudflare account the tunnel belongs to (its ID, 32 hex digits).
    pub account_id: String,
    /// The tunnel's ID (a UUID). Its routes' DNS records become CNAMEs to
    /// `<tunnel_id>.cfargotunnel.com`.
    pub tunnel_id: String,
    /// An API token with `Account:Cloudflare Tunnel:Edit`. Only ever sent in the
    /// `Authorization` header.
    pub api_token: crate::secret::SecretRef,
    /// The requests per five minutes vessel allows itself with this token (Cloudflare allows
    /// 1,200). The `cloudflare` DNS provider with the same token shares this budget.
    #[serde(default = "crate::providers::dns::default_budget")]
    pub rate_budget: u32,
    /// The API, `https://api.cloudflare.com` unless set (for a test double).
    #[serde(default = "crate::providers::dns::default_cf_api")]
    pub api: String,
    /// How to trust an `https://` `api`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
}

impl CloudflareTunnelConfig {
    /// What the tunnel's routes' DNS records point at.
    pub fn cname_target(&self) -> String {
        format!("{}.cfargotunnel.com", self.tunnel_id.to_ascii_lowercase())
    }
}

/// The `traefik` proxy provider's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TraefikConfig {
    /// The file, in a directory Traefik's file provider watches.
    pub file: PathBuf,
    /// The entry points vessel's routers attach to (all, when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entrypoints: Vec<String>,
    /// The prefix of vessel's router and service names.
    #[serde(default = "default_route_prefix")]
    pub name_prefix: String,
    /// Traefik's API, such as `http://127.0.0.1:8081` (`--api` on a loopback entry point). With
    /// it, a write counts as done only once the API shows vessel's routers loaded and enabled
    /// (a router Traefik refuses fails its step with Traefik's own error), and a route Traefik
    /// has not loaded or has refused reads as drifted, so the next pass repairs it. Without
    /// it, a write counts as done once the file is replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<String>,
    /// How long a write waits for Traefik to load it (with `api`). Traefik applies a change at
    /// most once per `providersThrottleDuration` (2 s unless set).
    #[serde(default = "default_traefik_confirm")]
    pub confirm_within: Duration,
    /// How to trust an `https://` `api`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    /// vessel's wake-and-activity listener, such as `127.0.0.1:8090`. When set, every router's
    /// service points at this address (Host kept), and vessel forwards from there to the
    /// session: so sessions behind Traefik sleep when idle and a request wakes them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wake_listen: Option<SocketAddr>,
}

fn default_traefik_confirm() -> Duration {
    Duration::from_secs(10)
}

fn default_route_prefix() -> String {
    "vessel".into()
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig::Embedded {
            listen: default_proxy_listen(),
        }
    }
}

fn default_proxy_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

impl ProxyConfig {
    /// Where the daemon serves vessel's own proxy: the embedded proxy's `listen`, or the wake
    /// listener in front of which Caddy or Traefik sits (None: vessel serves no proxy).
    pub fn served_listen(&self) -> Option<SocketAddr> {
        match self {
            ProxyConfig::Embedded { listen } => Some(*listen),
            ProxyConfig::Caddy { wake_listen, .. } => *wake_listen,
            ProxyConfig::Traefik(t) => t.wake_listen,
            ProxyConfig::CloudflareTunnel(_) => None,
        }
    }

    /// The wake listener's address, when Caddy or Traefik forwards to one.
    pub fn wake_listen(&self) -> Option<SocketAddr> {
        match self {
            ProxyConfig::Embedded { .. } => None,
            ProxyConfig::Caddy { wake_listen, .. } => *wake_listen,
            ProxyConfig::Traefik(t) => t.wake_listen,
            ProxyConfig::CloudflareTunnel(_) => None,
        }
    }

    /// Make relative paths relative to `base` (the config file's directory).
    pub fn rebase(&mut self, base: &std::path::Path) {
        let tls = match self {
            ProxyConfig::Traefik(t) => {
                if t.file.is_relative() {
                    t.file = base.join(&t.file);
                }
                t.tls.as_mut()
            }
            ProxyConfig::Caddy { tls, .. } => tls.as_mut(),
            ProxyConfig::CloudflareTunnel(c) => c.tls.as_mut(),
            ProxyConfig::Embedded { .. } => None,
        };
        if let Some(t) = tls {
            t.rebase(base);
        }
    }
}
