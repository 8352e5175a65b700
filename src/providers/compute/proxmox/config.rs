//! The proxmox provider's settings (`providers.compute.proxmox`): its clusters (API URL, API
//! token by reference, TLS trust), each cluster's nodes and their locations (where sessions may
//! be placed), and its time and concurrency limits.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::http_client::TlsConfig;
use crate::model::Duration;
use crate::secret::SecretRef;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProxmoxConfig {
    /// The Proxmox VE clusters (or single hosts) sessions run on.
    pub clusters: Vec<ProxmoxCluster>,
    /// This vessel's name on the clusters: guests it makes carry the tag `vessel.<instance>`.
    /// Guests of another instance sharing a cluster are foreign to this one.
    #[serde(default = "default_instance")]
    pub instance: String,
    /// The longest one API call may take (connect, answer and body).
    #[serde(default = "default_call_timeout")]
    pub call_timeout: Duration,
    /// The longest one task (a clone, a start, a resize, a delete) may run before its step
    /// fails; the task is then left to Proxmox, and the next pass finds the guest as it is.
    #[serde(default = "default_task_timeout")]
    pub task_timeout: Duration,
    /// The longest a started guest may take to report an address (the QEMU guest agent for a
    /// VM, the container's interfaces for LXC).
    #[serde(default = "default_address_timeout")]
    pub address_timeout: Duration,
    /// How often a running task or a guest's address is asked for.
    #[serde(default = "default_poll")]
    pub poll_interval: Duration,
    /// At most this many clones and starts run at once on one node (more wait their turn).
    #[serde(default = "default_per_node")]
    pub max_tasks_per_node: u32,
    /// The disk a VM's size applies to (`scsi0`, `virtio0`, ...); a container's is `rootfs`.
    #[serde(default = "default_vm_disk")]
    pub vm_disk: String,
}

/// One Proxmox VE cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProxmoxCluster {
    /// Its name in vessel (a DNS label), in messages and status.
    pub name: String,
    /// The API's address, `https://host:8006` (any node of the cluster answers for all).
    pub url: String,
    /// The API token's id, `USER@REALM!TOKENID` (such as `vessel@pve!vessel`).
    pub token_id: String,
    /// The API token's secret (a UUID): `{env: NAME}` or `{file: PATH}`. Sent only in the
    /// `Authorization: PVEAPIToken=...` header; never logged, shown in status or written to
    /// the state directory.
    pub token_secret: SecretRef,
    /// How the API's certificate is trusted: Proxmox ships a self-signed one, so give the
    /// cluster's CA (`ca_file: pve-root-ca.pem`) or pin the node's certificate
    /// (`pin_sha256`). Without it, the system's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    /// The nodes sessions may be placed on, each with its location. Node names are unique
    /// across all clusters.
    pub nodes: Vec<ProxmoxNode>,
}

/// A node of a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProxmoxNode {
    /// The node's name in Proxmox (`pve1`).
    pub name: String,
    /// Where it is; a session's `location` places it on a node here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
}

fn default_instance() -> String {
    "vessel".into()
}

fn default_call_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_task_timeout() -> Duration {
    Duration::from_secs(600)
}

fn default_address_timeout() -> Duration {
    Duration::from_secs(180)
}

fn default_poll() -> Duration {
    Duration::from_secs(1)
}

fn default_per_node() -> u32 {
    8
}

fn default_vm_disk() -> String {
    "scsi0".into()
}

impl crate::providers::compute::ComputeConfig for ProxmoxConfig {
    fn rebase(&mut self, base: &std::path::Path) {
        for c in &mut self.clusters {
            if let SecretRef::File(p) = &mut c.token_secret
                && p.is_relative()
            {
                *p = base.join(&*p);
            }
            if let Some(t) = &mut c.tls {
                t.rebase(base);
            }
        }
    }

    fn build(
        &self,
        env: &crate::providers::Env,
    ) -> Result<std::sync::Arc<dyn crate::providers::ComputeProvider>, crate::providers::SetupError>
    {
        let provider = super::ProxmoxProvider::new(self.clone(), env.state_dir.join("proxmox"))?;
        Ok(std::sync::Arc::new(provider))
    }

    /// Every node of every cluster, sorted by name.
    fn placement_hosts(&self) -> Vec<crate::model::PlacementHost> {
        let mut hosts: Vec<crate::model::PlacementHost> = self
            .clusters
            .iter()
            .flat_map(|c| &c.nodes)
            .map(|n| crate::model::PlacementHost {
                name: n.name.clone(),
                location: n.location.clone(),
            })
            .collect();
        hosts.sort_by(|a, b| a.name.cmp(&b.name));
        hosts
    }
}
