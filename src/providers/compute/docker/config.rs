//! The docker provider's settings (`providers.compute.docker`): its engine hosts (where sessions
//! may be placed), how routes reach containers, its time limits, and the credentials of the
//! registries it pulls from (by reference).

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::super::yes;
use crate::model::Duration;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DockerConfig {
    /// Engine hosts by name. A new session is placed on one deterministically.
    pub hosts: Vec<DockerHost>,
    /// How routes reach a session's ports.
    #[serde(default)]
    pub ports: DockerPorts,
    /// The address published ports bind to on the engine's host (`ports: published`).
    #[serde(default = "loopback")]
    pub publish_address: std::net::IpAddr,
    /// The network sessions join (default: the engine's default, `podman` or `bridge`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Where the workspace (the synced source) lives in the container.
    #[serde(default = "default_container_workspace")]
    pub workspace: String,
    /// Run an init process as PID 1, so the command gets signals even if it ignores them as
    /// PID 1 (busybox httpd does) and a stop does not wait out its timeout.
    #[serde(default = "yes")]
    pub init: bool,
    /// Remove a session's anonymous volumes with it.
    #[serde(default = "yes")]
    pub remove_volumes: bool,
    /// This vessel's name on the engines: the value of its ownership label. Containers of
    /// another instance sharing an engine are foreign to this one.
    #[serde(default = "default_instance")]
    pub instance: String,
    /// The longest any one Engine API call may take to answer (a stop gets its stop timeout on
    /// top). A frozen engine costs at most this per call; the host then reads as unobserved.
    #[serde(default = "default_call_timeout")]
    pub call_timeout: Duration,
    /// The longest a workspace upload (source sync, a kept workspace restored) or an image
    /// pull may take.
    #[serde(default = "default_transfer_timeout")]
    pub transfer_timeout: Duration,
    /// Credentials for pulling from private registries, by registry as image names spell it
    /// (`registry.example.com`, `127.0.0.1:5000`; `docker.io` for Docker Hub): a user name and
    /// a password or token by reference. Resolved for each pull and sent only to the engine
    /// with that pull; never logged, shown in status or written to the state directory.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub registries: std::collections::BTreeMap<String, RegistryAuth>,
}

/// Credentials for one container registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RegistryAuth {
    /// The user name.
    pub username: String,
    /// The password or access token: `{env: NAME}` or `{file: PATH}`.
    pub password: crate::secret::SecretRef,
}

fn default_call_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_transfer_timeout() -> Duration {
    Duration::from_secs(600)
}

impl crate::providers::compute::ComputeConfig for DockerConfig {
    fn rebase(&mut self, base: &std::path::Path) {
        for r in self.registries.values_mut() {
            if let crate::secret::SecretRef::File(p) = &mut r.password
                && p.is_relative()
            {
                *p = base.join(&*p);
            }
        }
        for h in &mut self.hosts {
            if let Some(p) = &mut h.tls_cert_path
                && p.is_relative()
            {
                *p = base.join(&*p);
            }
            // A relative unix socket path is relative to the config file too.
            if let Some(rest) = h.endpoint.strip_prefix("unix://")
                && !rest.starts_with('/')
            {
                h.endpoint = format!("unix://{}", base.join(rest).display());
            }
        }
    }

    fn build(
        &self,
        env: &crate::providers::Env,
    ) -> Result<std::sync::Arc<dyn crate::providers::ComputeProvider>, crate::providers::SetupError>
    {
        use crate::model::ComputeKind;
        let kept = crate::providers::compute::kept::Kept::new(
            env.state_dir.join("retained/docker"),
            ComputeKind::Docker,
            env.workspace_retention,
        );
        let provider =
            super::DockerProvider::new(self.clone(), env.state_dir.join("docker"), kept)?;
        Ok(std::sync::Arc::new(provider))
    }

    fn capacity(&self) -> Vec<(Option<String>, crate::model::HostCapacity)> {
        self.hosts
            .iter()
            .filter_map(|h| Some((Some(h.name.clone()), h.capacity?)))
            .collect()
    }

    /// Its engine hosts, sorted by name.
    fn placement_hosts(&self) -> Vec<crate::model::PlacementHost> {
        let mut hosts: Vec<crate::model::PlacementHost> = self
            .hosts
            .iter()
            .map(|h| crate::model::PlacementHost {
                name: h.name.clone(),
                location: h.location.clone(),
            })
            .collect();
        hosts.sort_by(|a, b| a.name.cmp(&b.name));
        hosts
    }
}

fn default_instance() -> String {
    "vessel".into()
}

/// How routes reach a container's ports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DockerPorts {
    /// Host ports the engine picks, published on `publish_address`.
    #[default]
    Published,
    /// The container's own address on its network (the engine's host must route to it).
    Container,
}

fn loopback() -> std::net::IpAddr {
    std::net::IpAddr::from([127, 0, 0, 1])
}

fn default_container_workspace() -> String {
    "/workspace".into()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DockerHost {
    /// The host's name, recorded on its containers (a label).
    pub name: String,
    /// `unix:///run/podman/podman.sock`, `tcp://host:2375`, or `https://host:2376` with
    /// `tls_cert_path` (DOCKER_HOST style).
    pub endpoint: String,
    /// Where it is; a session's `location` places it on a host here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// A directory with `ca.pem`, `cert.pem` and `key.pem` (as DOCKER_CERT_PATH) for TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert_path: Option<PathBuf>,
    /// What the host holds: the `cpus` and `memory` of the plans of its sessions are summed
    /// against it, and a session that would pass it is held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<crate::model::HostCapacity>,
}
