//! The process provider's settings (`providers.compute.process`).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::super::yes;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProcessConfig {
    /// The first host port handed to sessions; ports are allocated upward from here.
    #[serde(default = "default_port_base")]
    pub port_base: u16,
    /// Leave sessions running when vessel exits (a restarted vessel adopts them).
    #[serde(default = "yes")]
    pub keep_on_exit: bool,
    /// What this machine holds for sessions: the `cpus` and `memory` of their plans are
    /// summed against it, and a session that would pass it is held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<crate::model::HostCapacity>,
}

impl Default for ProcessConfig {
    fn default() -> Self {
        ProcessConfig {
            port_base: default_port_base(),
            keep_on_exit: true,
            capacity: None,
        }
    }
}

fn default_port_base() -> u16 {
    20000
}

impl crate::providers::compute::ComputeConfig for ProcessConfig {
    fn capacity(&self) -> Vec<(Option<String>, crate::model::HostCapacity)> {
        self.capacity.into_iter().map(|c| (None, c)).collect()
    }

    fn build(
        &self,
        env: &crate::providers::Env,
    ) -> Result<std::sync::Arc<dyn crate::providers::ComputeProvider>, crate::providers::SetupError>
    {
        use crate::model::ComputeKind;
        let root = env.state_dir.join("sessions");
        let kept = crate::providers::compute::kept::Kept::new(
            env.state_dir.join("retained/process"),
            ComputeKind::Process,
            env.workspace_retention,
        );
        let provider = super::ProcessProvider::new(root.clone(), self.clone(), kept)
            .map_err(|source| crate::providers::SetupError::StateDir { path: root, source })?;
        Ok(std::sync::Arc::new(provider))
    }
}
