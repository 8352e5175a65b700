//! The reconciler's own config file: where desired state comes from, the state directory,
//! providers and their endpoints, route templates, the status listener and the safety policy.
//!
//! Secrets are references (`{env: NAME}` or `{file: PATH}`), never values: the config type has
//! nowhere to put an inline secret, and `SecretRef`'s Debug never shows what it resolves to.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use crate::http_client::TlsConfig;
pub use crate::model::{DestroyBudget, RouteTemplate};
use crate::model::{Duration, Size};
pub use crate::providers::ProvidersConfig;
pub use crate::providers::compute::ComputeProviders;
pub use crate::providers::compute::docker::{DockerConfig, DockerHost, DockerPorts};
pub use crate::providers::compute::process::ProcessConfig;
pub use crate::providers::dns::DnsConfig;
pub use crate::providers::proxy::{ProxyConfig, TraefikConfig};
pub use crate::secret::{Secret, SecretError, SecretRef};

/// The embedded default config: local processes, the built-in proxy, no DNS.
pub const DEFAULT_CONFIG_YAML: &str = include_str!("default-config.yaml");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "vessel config")]
pub struct Config {
    /// Where desired state comes from. Relative paths are relative to the config file.
    #[serde(default)]
    pub source: SourceConfig,
    /// The state directory (last observed snapshot, events, lock, workspaces).
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// The domain `{domain}` stands for in route templates.
    #[serde(default = "default_domain")]
    pub domain: String,
    /// Routes every session gets from its plan's ports.
    #[serde(default)]
    pub routes: RoutesConfig,
    /// Absolute directories a session's `source.path` may be inside. Empty: any absolute path.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_roots: Vec<PathBuf>,
    #[serde(default)]
    pub providers: ProvidersConfig,
    #[serde(default)]
    pub status: StatusConfig,
    /// Limits of every HTTP listener vessel has: the embedded proxy, the status endpoint and
    /// the webhook receiver.
    #[serde(default)]
    pub listeners: ListenersConfig,
    #[serde(default)]
    pub policy: PolicyConfig,
    /// Limits on reading the desired-state tree.
    #[serde(default)]
    pub load: LoadLimits,
    /// Sleep when idle and wake on request.
    #[serde(default)]
    pub lifecycle: LifecycleConfig,
    /// Caps on running sessions: a plan holds the excess (by name, deterministically), and a
    /// wake at a cap first puts the least recently active sleep-capable session to sleep.
    #[serde(default)]
    pub limits: crate::model::SessionLimits,
    /// Webhook targets told what happens to sessions (CloudEvents 1.0, signed with
    /// HMAC-SHA256), each with the events it wants. Delivered at least once, in order, from an
    /// outbox in the state directory.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notify: Vec<crate::notify::NotifyTarget>,
}

/// How sessions sleep and wake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LifecycleConfig {
    /// A request for a sleeping session waits this long for it to wake, then gets a 503 with
    /// `Retry-After`.
    #[serde(default = "default_wake_timeout")]
    pub wake_timeout: Duration,
    /// Requests held at most while sessions wake, all together; past it, a 503 at once.
    #[serde(default = "default_max_held")]
    pub max_held: u32,
    /// A browser's navigation (a GET accepting HTML) to a waking session gets a small page
    /// that reloads itself, rather than waiting.
    #[serde(default)]
    pub waking_page: bool,
    /// The idle timeout of `sleeping` sessions whose plan and session set none.
    #[serde(default = "default_sleeping_idle")]
    pub idle_timeout: Duration,
    /// How often idleness is checked (sleep comes within this after the idle timeout).
    #[serde(default = "default_idle_check")]
    pub check_interval: Duration,
}

impl Default for LifecycleConfig {
    fn default() -> Self {
        LifecycleConfig {
            wake_timeout: default_wake_timeout(),
            max_held: default_max_held(),
            waking_page: false,
            idle_timeout: default_sleeping_idle(),
            check_interval: default_idle_check(),
        }
    }
}

fn default_wake_timeout() -> Duration {
    Duration::from_secs(60)
}

fn default_max_held() -> u32 {
    4096
}

fn default_sleeping_idle() -> Duration {
    Duration::from_secs(30 * 60)
}

fn default_idle_check() -> Duration {
    Duration(std::time::Duration::from_millis(250))
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("state")
}

fn default_domain() -> String {
    "localhost".into()
}

/// Where the desired-state tree is read from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum SourceConfig {
    /// A directory on this machine, watched for changes.
    Dir(PathBuf),
    /// A git repository, fetched into the state directory and polled.
    Git(Box<GitSourceConfig>),
}

/// A git repository as the source of desired state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GitSourceConfig {
    /// `file:///srv/desired.git` or `git://host/desired.git`.
    pub url: String,
    /// A branch, a tag or a commit.
    #[serde(rename = "ref", default = "default_git_ref")]
    pub reference: String,
    /// The desired-state tree's directory inside the repository.
    #[serde(default, skip_serializing_if = "is_empty_path")]
    pub path: PathBuf,
    /// How often to fetch.
    #[serde(default = "default_poll")]
    pub poll_interval: Duration,
    /// Credentials for the remote (https or http).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<GitAuth>,
    /// Apply only commits signed by an allowed signer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<VerifyConfig>,
    /// A webhook receiver (off by default) whose signed POSTs make vessel fetch at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<WebhookConfig>,
}

/// How vessel authenticates to a git remote. Secrets by reference only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum GitAuth {
    /// An access token, sent as the password of `username`.
    Token {
        token: SecretRef,
        #[serde(default = "default_token_user")]
        username: String,
    },
    /// A user name and a password.
    Basic {
        username: String,
        password: SecretRef,
    },
    /// An SSH key; the server's host key must be in `known_hosts`.
    Ssh {
        /// The private key file.
        key: PathBuf,
        /// A known_hosts file with the server's key (`host` or `[host]:port` entries).
        known_hosts: PathBuf,
        #[serde(default = "default_ssh_user")]
        username: String,
    },
}

fn default_ssh_user() -> String {
    "git".into()
}

fn default_token_user() -> String {
    "x-access-token".into()
}

/// Commit signature verification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VerifyConfig {
    /// An SSH allowed-signers file (the format of git's `gpg.ssh.allowedSignersFile`).
    pub allowed_signers: PathBuf,
}

/// A webhook receiver: POSTs signed with HMAC-SHA256 only poke the loop to fetch now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Where it listens, on a listener of its own.
    pub listen: SocketAddr,
    /// The shared secret (`X-Hub-Signature-256` as GitHub signs, or `X-Vessel-Signature`).
    pub secret: SecretRef,
}

fn default_git_ref() -> String {
    "main".into()
}

fn default_poll() -> Duration {
    Duration::from_secs(30)
}

fn is_empty_path(p: &Path) -> bool {
    p.as_os_str().is_empty()
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig::Dir(PathBuf::from("."))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RoutesConfig {
    /// Host templates. `{session}`, `{owner}` (the session's `owner`: sessions without one are
    /// an error with such a template), `{domain}`, `{port}` (the port number) and `{port_name}`
    /// are replaced; each template applies to one named port, or to every port with `"*"`.
    #[serde(default = "default_templates")]
    pub templates: Vec<RouteTemplate>,
}

impl Default for RoutesConfig {
    fn default() -> Self {
        RoutesConfig {
            templates: default_templates(),
        }
    }
}

fn default_templates() -> Vec<RouteTemplate> {
    vec![
        RouteTemplate {
            host: "{session}.{domain}".into(),
            port: "ide".into(),
            dns: false,
            waking_page: None,
        },
        RouteTemplate {
            host: "{port}-{session}.{domain}".into(),
            port: "*".into(),
            dns: false,
            waking_page: None,
        },
    ]
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StatusConfig {
    /// Where the read-only status endpoint listens.
    #[serde(default = "default_status_listen")]
    pub listen: SocketAddr,
    /// A bearer token required for everything but `/healthz`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<SecretRef>,
}

impl Default for StatusConfig {
    fn default() -> Self {
        StatusConfig {
            listen: default_status_listen(),
            token: None,
        }
    }
}

fn default_status_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9090))
}

/// Limits of vessel's HTTP listeners (the embedded proxy, the status endpoint, the webhook
/// receiver). Each listener has them on its own: one full listener never starves another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListenersConfig {
    /// Open connections at most, per listener. `0` (the default) derives the number from the
    /// open-file limit, which vessel raises to its hard limit at start: a quarter of it (at
    /// least 256 files) always stays for the reconcile loop, providers and sessions, and a
    /// number set here that the limit cannot carry is lowered (the log says so).
    #[serde(default)]
    pub max_connections: MaxConnections,
    /// Open connections from one client address at most, per listener (an IPv6 /64 counts as
    /// one address). At this bound, or the listener's, a new connection takes the place of
    /// the connection idle the longest; when none is idle it is closed at once.
    #[serde(default = "default_per_client")]
    pub max_connections_per_client: u32,
    /// A request's header must arrive whole within this, counted from the connection's start
    /// or from the first byte of a later request (slowloris).
    #[serde(default = "default_header_timeout")]
    pub header_timeout: Duration,
    /// A keep-alive connection with no request for this long is closed.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: Duration,
    /// The embedded proxy answers 502 when a session sends no response header within this.
    #[serde(default = "default_upstream_header_timeout")]
    pub upstream_header_timeout: Duration,
}

impl Default for ListenersConfig {
    fn default() -> Self {
        ListenersConfig {
            max_connections: MaxConnections::default(),
            max_connections_per_client: default_per_client(),
            header_timeout: default_header_timeout(),
            idle_timeout: default_idle_timeout(),
            upstream_header_timeout: default_upstream_header_timeout(),
        }
    }
}

/// Limits on one load of the desired-state tree, so a hostile or mistaken source (a git
/// repository of many files sharing one large blob, say) cannot take the memory of the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LoadLimits {
    /// A file larger than this is refused unread (its objects are held).
    #[serde(default = "default_max_file_bytes")]
    pub max_file_bytes: Size,
    /// At most this many bytes are read in one load, all files together, in path order. The
    /// files past it are refused unread and quarantined as unreadable: their objects are held
    /// and nothing anywhere is destroyed while any are.
    #[serde(default = "default_max_total_bytes")]
    pub max_total_bytes: Size,
    /// At most this many YAML nodes in one load, all files together, in path order: what the
    /// loaded objects take in memory grows with their nodes more than with their bytes (a
    /// megabyte of one-line map entries is some 100,000 of them). A file that would take the
    /// load past it is refused (`too-large`) and quarantined as incomplete.
    #[serde(default = "default_max_total_nodes")]
    pub max_total_nodes: u64,
}

impl Default for LoadLimits {
    fn default() -> Self {
        LoadLimits {
            max_file_bytes: default_max_file_bytes(),
            max_total_bytes: default_max_total_bytes(),
            max_total_nodes: default_max_total_nodes(),
        }
    }
}

/// Open connections at most, per listener; `0` derives the number from the open-file limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MaxConnections {
    #[serde(default)]
    pub proxy: u32,
    #[serde(default)]
    pub status: u32,
    #[serde(default)]
    pub webhook: u32,
}

fn default_per_client() -> u32 {
    128
}

fn default_header_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_idle_timeout() -> Duration {
    Duration::from_secs(60)
}

fn default_upstream_header_timeout() -> Duration {
    Duration::from_secs(60)
}

fn default_max_file_bytes() -> Size {
    Size(4 << 20)
}

fn default_max_total_bytes() -> Size {
    Size(64 << 20)
}

fn default_max_total_nodes() -> u64 {
    1_000_000
}

/// Safety and timing policy for the reconciler.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Hold a plan that destroys more sessions than this, unless allowed explicitly.
    #[serde(default)]
    pub destroy_budget: DestroyBudget,
    /// Allow a source with no sessions at all to destroy every session.
    #[serde(default)]
    pub allow_empty_source: bool,
    /// A pass at least this often, to repair drift. One that finds nothing changed since a
    /// pass that changed nothing (no file event, no provider saw a change, nothing came due)
    /// does nothing; see `full_resync_interval`.
    #[serde(default = "default_resync")]
    pub resync_interval: Duration,
    /// How often the resync looks at the world again instead of trusting what the providers
    /// keep in memory (the process provider's records, the embedded proxy's table) and what
    /// the file watcher reported: every directory listed, every record read.
    #[serde(default = "default_full_resync")]
    pub full_resync_interval: Duration,
    /// What a change to the desired-state files takes away (a destroy, a replace, a route or
    /// DNS removal) waits until the files involved have been unchanged this long; a file that
    /// turns empty holds what it declared this long. Creates and updates do not wait. `0s`
    /// turns it off.
    #[serde(default = "default_settle")]
    pub settle: Duration,
    /// How long a destroyed session's workspace is kept in the state directory, to be restored
    /// if the session is declared again. `0s` keeps nothing.
    #[serde(default = "default_retention")]
    pub workspace_retention: Duration,
    /// "Expiring soon" notifications this long before a session's `expires`, one per
    /// threshold; a plan or a session may set its own.
    #[serde(default = "default_warn_before")]
    pub warn_before: Vec<Duration>,
}

fn default_warn_before() -> Vec<Duration> {
    vec![Duration::from_secs(3 * 86_400), Duration::from_secs(86_400)]
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            destroy_budget: DestroyBudget::default(),
            allow_empty_source: false,
            resync_interval: default_resync(),
            full_resync_interval: default_full_resync(),
            settle: default_settle(),
            workspace_retention: default_retention(),
            warn_before: default_warn_before(),
        }
    }
}

fn default_settle() -> Duration {
    Duration::from_secs(2)
}

fn default_retention() -> Duration {
    Duration::from_secs(24 * 3600)
}

fn default_resync() -> Duration {
    Duration::from_secs(30)
}

fn default_full_resync() -> Duration {
    Duration::from_secs(600)
}

impl Config {
    /// The planner's policy for a plan made at `now` (the planner reads no config): the
    /// domain and templates, the guards' limits, DNS records' content, where sessions may be
    /// placed, and which compute providers keep destroyed workspaces.
    pub fn policy(&self, now: chrono::DateTime<chrono::Utc>) -> crate::planner::Policy {
        // A tunnel's routes are reached through the tunnel: their records are CNAMEs to it.
        let dns = match (&self.providers.dns, &self.providers.proxy) {
            (DnsConfig::None, _) => None,
            (_, ProxyConfig::CloudflareTunnel(t)) => {
                Some(crate::planner::record_for(&t.cname_target()))
            }
            (DnsConfig::Hosts { address, .. } | DnsConfig::Powerdns { address, .. }, _) => {
                Some(crate::planner::record_for(address))
            }
            (DnsConfig::Cloudflare(c), _) => c.address.as_deref().map(crate::planner::record_for),
        };
        let c = &self.providers.compute;
        let keeps_workspaces = if self.policy.workspace_retention.std().is_zero() {
            std::collections::BTreeSet::new()
        } else {
            c.each().into_iter().map(|(kind, _)| kind).collect()
        };
        let placement = c.placement();
        let capacity = c.capacity();
        crate::planner::Policy {
            now,
            domain: self.domain.clone(),
            templates: self.routes.templates.clone(),
            destroy_budget: self.policy.destroy_budget,
            allow_destroy: false,
            allow_empty_source: self.policy.allow_empty_source,
            dns,
            placement,
            settle: std::sync::Arc::default(),
            keeps_workspaces,
            limits: self.limits,
            capacity,
        }
    }

    /// The embedded default, with its source directory set to `dir`.
    pub fn embedded_default(dir: &Path) -> Config {
        let mut c: Config = serde_saphyr::from_str(DEFAULT_CONFIG_YAML)
            .unwrap_or_else(|e| panic!("the embedded default config is invalid: {e}"));
        c.source = SourceConfig::Dir(dir.to_path_buf());
        c
    }

    /// Make relative paths relative to `base` (the config file's directory).
    pub fn rebase(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        match &mut self.source {
            SourceConfig::Dir(d) => fix(d),
            SourceConfig::Git(g) => {
                // A relative file URL is relative to the config file too.
                if let Some(v) = &mut g.verify {
                    fix(&mut v.allowed_signers);
                }
                if let Some(GitAuth::Ssh {
                    key, known_hosts, ..
                }) = &mut g.auth
                {
                    fix(key);
                    fix(known_hosts);
                }
                if let Some(rest) = g.url.strip_prefix("file://")
                    && !rest.starts_with('/')
                {
                    g.url = format!("file://{}", base.join(rest).display());
                }
            }
        }
        fix(&mut self.state_dir);
        self.providers.rebase(base);
        for t in &mut self.notify {
            t.rebase(base);
        }
    }

    /// What the providers are given besides their own config.
    pub fn provider_env(&self) -> crate::providers::Env {
        crate::providers::Env {
            state_dir: self.state_dir.clone(),
            workspace_retention: self.policy.workspace_retention.std(),
        }
    }

    /// The source directory, for a directory source.
    pub fn source_dir(&self) -> Option<&Path> {
        match &self.source {
            SourceConfig::Dir(d) => Some(d),
            SourceConfig::Git(_) => None,
        }
    }

    /// Where the source is, for messages.
    pub fn source_display(&self) -> String {
        match &self.source {
            SourceConfig::Dir(d) => d.display().to_string(),
            SourceConfig::Git(g) => format!("{}#{}", g.url, g.reference),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_parses_and_matches_the_built_in_defaults() {
        let c = Config::embedded_default(Path::new("/tmp/x"));
        assert_eq!(c.source_dir(), Some(Path::new("/tmp/x")));
        assert_eq!(c.routes, RoutesConfig::default());
        assert_eq!(c.providers, ProvidersConfig::default());
        assert_eq!(c.policy, PolicyConfig::default());
        assert_eq!(c.status, StatusConfig::default());
        assert_eq!(c.listeners, ListenersConfig::default());
        assert_eq!(c.load, LoadLimits::default());
    }

    #[test]
    fn tls_ca_files_are_relative_to_the_config_file() {
        let tls = |ca: &str| {
            Some(TlsConfig {
                ca_file: Some(PathBuf::from(ca)),
                pin_sha256: None,
            })
        };
        let mut c = Config::embedded_default(Path::new("/tmp/x"));
        c.providers.proxy = ProxyConfig::Caddy {
            admin: "https://caddy:2019".into(),
            server: "srv".into(),
            listen: Vec::new(),
            id_prefix: "vessel".into(),
            tls: tls("caddy-ca.pem"),
            wake_listen: None,
        };
        c.providers.dns = DnsConfig::Powerdns {
            api: "https://pdns:8081".into(),
            server_id: "localhost".into(),
            api_key: SecretRef::Env("K".into()),
            zones: Vec::new(),
            address: "192.0.2.1".into(),
            tls: tls("/etc/pdns-ca.pem"),
        };
        c.rebase(Path::new("/etc/vessel"));
        let ProxyConfig::Caddy { tls: Some(t), .. } = &c.providers.proxy else {
            panic!("caddy")
        };
        assert_eq!(
            t.ca_file.as_deref(),
            Some(Path::new("/etc/vessel/caddy-ca.pem"))
        );
        let DnsConfig::Powerdns { tls: Some(t), .. } = &c.providers.dns else {
            panic!("powerdns")
        };
        assert_eq!(t.ca_file.as_deref(), Some(Path::new("/etc/pdns-ca.pem")));
        let mut t = TraefikConfig {
            file: "dynamic/vessel.yml".into(),
            entrypoints: Vec::new(),
            name_prefix: "vessel".into(),
            api: Some("https://traefik:8081".into()),
            confirm_within: Duration::from_secs(10),
            tls: tls("traefik-ca.pem"),
            wake_listen: None,
        };
        c.providers.proxy = ProxyConfig::Traefik(t.clone());
        c.rebase(Path::new("/etc/vessel"));
        t.file = "/etc/vessel/dynamic/vessel.yml".into();
        t.tls = tls("/etc/vessel/traefik-ca.pem");
        assert_eq!(c.providers.proxy, ProxyConfig::Traefik(t));
    }

    #[test]
    fn secrets_are_references_and_never_print() {
        let bad = serde_saphyr::from_str::<SecretRef>("value: hunter2\n");
        assert!(bad.is_err());
        // SAFETY of the test: a unique variable name, set before it is read.
        let name = "VESSEL_TEST_SECRET_PRINT";
        unsafe { std::env::set_var(name, "hunter2") };
        let s = SecretRef::Env(name.into())
            .resolve()
            .map_err(|e| e.to_string());
        let s = s.as_ref().map(|s| format!("{s:?}"));
        assert_eq!(s, Ok("<redacted>".to_string()));
        let missing = SecretRef::Env("VESSEL_TEST_SECRET_UNSET".into()).resolve();
        assert!(matches!(missing, Err(SecretError::MissingEnv(_))));
    }
}
