//! The qemu provider's settings (`providers.compute.qemu`).

use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::super::yes;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QemuConfig {
    /// Where images are: a plan's `image: NAME` boots `<images>/NAME/vmlinuz` with
    /// `<images>/NAME/initrd.img`, and, where there is one, `<images>/NAME/disk.qcow2` as the
    /// read-only base of a per-session copy-on-write overlay sized to the plan's `disk`
    /// (`examples/microvm/build-image.sh` builds `devbox`). Relative to the config file; a
    /// leading `~/` is the home directory (`$HOME`).
    pub images: PathBuf,
    /// The QEMU binary.
    #[serde(default = "default_binary")]
    pub binary: String,
    /// `qemu-img`, for disk overlays.
    #[serde(default = "default_qemu_img")]
    pub qemu_img: String,
    /// The accelerator: `auto` (the default: KVM when a probe VM really starts on it, TCG
    /// otherwise), `kvm` or `tcg`.
    #[serde(default)]
    pub accel: Accel,
    /// The first host port handed to sessions (forwarded on 127.0.0.1 to the guest's ports);
    /// ports are allocated upward from here.
    #[serde(default = "default_port_base")]
    pub port_base: u16,
    /// Memory of a VM whose plan sets none.
    #[serde(default = "default_memory")]
    pub default_memory: crate::model::Size,
    /// Extra kernel command line arguments for every VM.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub append: String,
    /// Leave VMs running when vessel exits (a restarted vessel adopts them).
    #[serde(default = "yes")]
    pub keep_on_exit: bool,
    /// What this machine holds for sessions: the `cpus` and `memory` of their plans are
    /// summed against it, and a session that would pass it is held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<crate::model::HostCapacity>,
}

/// Which accelerator VMs run on.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema, PartialOrd, Ord,
)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM when it works here, TCG otherwise.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

fn default_binary() -> String {
    "qemu-system-x86_64".into()
}

fn default_qemu_img() -> String {
    "qemu-img".into()
}

fn default_port_base() -> u16 {
    21000
}

fn default_memory() -> crate::model::Size {
    crate::model::Size(256 << 20)
}

impl crate::providers::compute::ComputeConfig for QemuConfig {
    fn rebase(&mut self, base: &Path) {
        if let Ok(rest) = self.images.strip_prefix("~")
            && let Some(home) = std::env::var_os("HOME")
        {
            self.images = PathBuf::from(home).join(rest);
        }
        if self.images.is_relative() {
            self.images = base.join(&self.images);
        }
    }

    fn capacity(&self) -> Vec<(Option<String>, crate::model::HostCapacity)> {
        self.capacity.into_iter().map(|c| (None, c)).collect()
    }

    fn build(
        &self,
        env: &crate::providers::Env,
    ) -> Result<std::sync::Arc<dyn crate::providers::ComputeProvider>, crate::providers::SetupError>
    {
        use crate::model::ComputeKind;
        let root = env.state_dir.join("qemu");
        let kept = crate::providers::compute::kept::Kept::new(
            env.state_dir.join("retained/qemu"),
            ComputeKind::Qemu,
            env.workspace_retention,
        );
        let provider = super::QemuProvider::new(root.clone(), self.clone(), kept)
            .map_err(|source| crate::providers::SetupError::StateDir { path: root, source })?;
        Ok(std::sync::Arc::new(provider))
    }
}
