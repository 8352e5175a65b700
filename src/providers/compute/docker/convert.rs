//! Between bollard's types and vessel's: the labels vessel puts on a container, the container
//! body a session's spec asks for, and what a container list says about each container.
//!
//! Lists are read through vessel's own lenient type (`Container`), not bollard's: Podman
//! reports states Docker does not have (`stopped`, `configured`), which bollard's enum
//! refuses, failing the whole list.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use bollard::models::{ContainerCreateBody, HostConfig, PortBinding};
use serde::Deserialize;

use super::{DockerConfig, DockerPorts};
use crate::model::observed::RuntimeSpec;

/// The ownership marker: vessel touches only containers carrying this label with its
/// instance name (`vessel` by default) as the value.
pub const MARKER: &str = "vessel.managed-by";
pub const SESSION: &str = "vessel.session";
pub const FINGERPRINT: &str = "vessel.fingerprint";
pub const HOST: &str = "vessel.host";
pub const SPEC: &str = "vessel.spec";
pub const SOURCE_FILE: &str = "vessel.source-file";
pub const SAVE_TO: &str = "vessel.save-to";

/// The name of a session's container.
pub fn container_name(session: &str) -> String {
    format!("vessel-{session}")
}

/// One container as a list reports it.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Container {
    #[serde(rename = "Id", default)]
    pub id: String,
    #[serde(rename = "Names", default)]
    pub names: Option<Vec<String>>,
    #[serde(rename = "Labels", default)]
    pub labels: Option<HashMap<String, String>>,
    #[serde(rename = "State", default)]
    pub state: Option<String>,
    #[serde(rename = "Status", default)]
    pub status: Option<String>,
    #[serde(rename = "Ports", default)]
    pub ports: Option<Vec<PortEntry>>,
    #[serde(rename = "NetworkSettings", default)]
    pub network_settings: Option<Networks>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct PortEntry {
    #[serde(rename = "IP", default)]
    pub ip: Option<String>,
    #[serde(rename = "PrivatePort", default)]
    pub private_port: u16,
    #[serde(rename = "PublicPort", default)]
    pub public_port: Option<u16>,
    #[serde(rename = "Type", default)]
    pub typ: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Networks {
    #[serde(rename = "Networks", default)]
    pub networks: Option<HashMap<String, Endpoint>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Endpoint {
    #[serde(rename = "IPAddress", default)]
    pub ip_address: Option<String>,
}

/// Why an engine's answer or a session's spec could not be converted.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("the container list is unreadable")]
    List(#[source] serde_json::Error),
    #[error("the command cannot be made")]
    Command(#[source] crate::providers::compute::PlaceholderError),
    #[error("the spec cannot be written into a label")]
    Spec(#[source] serde_json::Error),
}

/// A list's containers from bollard's typed answer (through JSON: the field names are the
/// API's on both sides).
pub fn from_summaries(
    list: &[bollard::models::ContainerSummary],
) -> Result<Vec<Container>, ConvertError> {
    serde_json::to_value(list)
        .and_then(serde_json::from_value)
        .map_err(ConvertError::List)
}

/// A list's containers from the raw JSON bollard could not read.
pub fn from_json(json: &str) -> Result<Vec<Container>, ConvertError> {
    serde_json::from_str(json).map_err(ConvertError::List)
}

impl Container {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.as_ref()?.get(key).map(String::as_str)
    }

    /// Carries the marker of vessel's `instance`.
    pub fn owned(&self, instance: &str) -> bool {
        self.label(MARKER) == Some(instance)
    }

    /// The container's name without the leading slash.
    pub fn name(&self) -> Option<&str> {
        let n = self.names.as_ref()?.first()?;
        Some(n.strip_prefix('/').unwrap_or(n))
    }

    /// The session a `vessel-<session>` name stands for, if it is a valid session name.
    pub fn session_by_name(&self) -> Option<&str> {
        let s = self.name()?.strip_prefix("vessel-")?;
        crate::model::dns_label_problem(s).is_none().then_some(s)
    }

    pub fn running(&self) -> bool {
        self.state.as_deref() == Some("running")
    }

    pub fn paused(&self) -> bool {
        self.state.as_deref() == Some("paused")
    }

    /// Where each of `ports` (name -> container port) answers, as routes reach it.
    pub fn endpoints(
        &self,
        ports: &BTreeMap<String, u16>,
        config: &DockerConfig,
    ) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        match config.ports {
            DockerPorts::Published => {
                for (name, port) in ports {
                    let entry = self.ports.iter().flatten().find(|p| {
                        p.private_port == *port
                            && p.public_port.is_some_and(|p| p != 0)
                            && p.typ.as_deref().is_none_or(|t| t == "tcp")
                    });
                    if let Some(e) = entry {
                        let ip =
                            e.ip.as_deref()
                                .and_then(|ip| ip.parse::<IpAddr>().ok())
                                .filter(|ip| !ip.is_unspecified())
                                .unwrap_or(if config.publish_address.is_unspecified() {
                                    IpAddr::from([127, 0, 0, 1])
                                } else {
                                    config.publish_address
                                });
                        let public = e.public_port.unwrap_or_default();
                        out.insert(name.clone(), socket(ip, public));
                    }
                }
            }
            DockerPorts::Container => {
                if let Some(ip) = self.address(config.network.as_deref()) {
                    for (name, port) in ports {
                        out.insert(name.clone(), socket(ip, *port));
                    }
                }
            }
        }
        out
    }

    /// The container's address on `network` (or on its first network that gives one).
    fn address(&self, network: Option<&str>) -> Option<IpAddr> {
        let nets = self.network_settings.as_ref()?.networks.as_ref()?;
        let mut names: Vec<&String> = nets.keys().collect();
        names.sort();
        names
            .into_iter()
            .filter(|n| network.is_none_or(|w| w == n.as_str()))
            .filter_map(|n| nets.get(n)?.ip_address.as_deref()?.parse().ok())
            .next()
    }
}

fn socket(ip: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(ip, port).to_string()
}

/// The plan's named ports as container ports.
pub fn port_numbers(spec: &RuntimeSpec) -> BTreeMap<String, u16> {
    spec.ports.iter().map(|(n, p)| (n.clone(), p.0)).collect()
}

/// The container body for a session: image, command, environment, limits, labels, ports.
pub fn create_body(
    r: &crate::providers::compute::CreateArgs,
    host: &str,
    config: &DockerConfig,
) -> Result<ContainerCreateBody, ConvertError> {
    let spec = r.spec;
    let ports = port_numbers(spec);
    let workspace = config.workspace.as_str();
    let cmd: Vec<String> = spec
        .command
        .iter()
        .map(|a| {
            crate::providers::compute::expand(a, |key| match key {
                "workspace" => Some(Ok(workspace.to_string())),
                "session" => Some(Ok(r.session.to_string())),
                k => crate::providers::compute::port_placeholder(k, &ports),
            })
        })
        .collect::<Result<_, _>>()
        .map_err(ConvertError::Command)?;
    let mut env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    for (name, port) in &ports {
        env.push(format!(
            "PORT_{}={port}",
            crate::providers::compute::env_name(name)
        ));
    }
    if let Some(p) = spec.health_port().and_then(|n| ports.get(n)) {
        env.push(format!("PORT={p}"));
    }
    env.push(format!("VESSEL_SESSION={}", r.session));
    env.push(format!("VESSEL_WORKSPACE={workspace}"));
    let spec_json = serde_json::to_string(spec).map_err(ConvertError::Spec)?;
    let mut labels: HashMap<String, String> = HashMap::from([
        (MARKER.to_string(), config.instance.clone()),
        (SESSION.to_string(), r.session.to_string()),
        (FINGERPRINT.to_string(), r.fingerprint.to_string()),
        (HOST.to_string(), host.to_string()),
        (SPEC.to_string(), spec_json),
        (SOURCE_FILE.to_string(), r.source_file.display().to_string()),
    ]);
    if let Some(p) = r.save_to {
        labels.insert(SAVE_TO.to_string(), p.display().to_string());
    }
    let exposed: Vec<String> = ports.values().map(|p| format!("{p}/tcp")).collect();
    let bindings: Option<HashMap<String, Option<Vec<PortBinding>>>> = match config.ports {
        DockerPorts::Published => Some(
            ports
                .values()
                .map(|p| {
                    (
                        format!("{p}/tcp"),
                        Some(vec![PortBinding {
                            host_ip: Some(config.publish_address.to_string()),
                            host_port: Some(String::new()),
                        }]),
                    )
                })
                .collect(),
        ),
        DockerPorts::Container => None,
    };
    let stop_timeout = spec
        .stop_timeout
        .map(|d| d.std().as_secs().max(1))
        .unwrap_or(10);
    Ok(ContainerCreateBody {
        hostname: Some(r.session.to_string()),
        image: spec.image.clone(),
        cmd: (!cmd.is_empty()).then_some(cmd),
        env: Some(env),
        working_dir: Some(workspace.to_string()),
        // The workspace is a volume of its own: kept while the container is, removed with it
        // (`remove_volumes`), and the engine need not mount the image's root file system at
        // create time to make the directory (a third of a create's time on Podman).
        volumes: Some(vec![workspace.to_string()]),
        labels: Some(labels),
        exposed_ports: (!exposed.is_empty()).then_some(exposed),
        stop_signal: Some("SIGTERM".into()),
        stop_timeout: Some(i64::try_from(stop_timeout).unwrap_or(i64::MAX)),
        host_config: Some(HostConfig {
            init: Some(config.init),
            memory: spec
                .memory
                .map(|m| i64::try_from(m.bytes()).unwrap_or(i64::MAX)),
            nano_cpus: spec.cpus.map(|c| (c * 1e9).round() as i64),
            port_bindings: bindings,
            network_mode: config.network.clone(),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// The seconds a stop waits before the engine kills the container.
pub fn stop_seconds(t: Option<crate::model::Duration>) -> i32 {
    t.map(|d| i32::try_from(d.std().as_secs().max(1)).unwrap_or(i32::MAX))
        .unwrap_or(10)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(ports: DockerPorts) -> DockerConfig {
        serde_saphyr::from_str::<DockerConfig>(&format!(
            "hosts: [{{name: a, endpoint: 'unix:///x'}}]\nports: {}\n",
            match ports {
                DockerPorts::Published => "published",
                DockerPorts::Container => "container",
            }
        ))
        .expect("config")
    }

    #[test]
    fn podman_states_that_docker_lacks_are_read() {
        let json = r#"[{"Id":"abc","Names":["/vessel-alice"],"State":"stopped",
            "Labels":{"vessel.managed-by":"vessel","vessel.session":"alice"},
            "Ports":[{"IP":"127.0.0.1","PrivatePort":8080,"PublicPort":32799,"Type":"tcp"}],
            "NetworkSettings":{"Networks":{"podman":{"IPAddress":"10.88.0.2"}}}}]"#;
        let list = from_json(json).expect("lenient");
        let c = &list[0];
        assert!(c.owned("vessel") && !c.running());
        assert!(!c.owned("another"));
        assert_eq!(c.session_by_name(), Some("alice"));
        let ports = BTreeMap::from([("ide".to_string(), 8080u16)]);
        assert_eq!(
            c.endpoints(&ports, &config(DockerPorts::Published))["ide"],
            "127.0.0.1:32799"
        );
        assert_eq!(
            c.endpoints(&ports, &config(DockerPorts::Container))["ide"],
            "10.88.0.2:8080"
        );
    }

    #[test]
    fn a_forged_session_label_without_the_marker_is_not_owned() {
        let json = r#"[{"Id":"x","Names":["/vessel-bob"],"State":"running",
            "Labels":{"vessel.session":"bob","vessel.managed-by":"someone-else"}}]"#;
        let list = from_json(json).expect("json");
        assert!(!list[0].owned("vessel"));
        let bad = r#"[{"Id":"y","Names":["/vessel-Not_A_Label"],"State":"running"}]"#;
        assert_eq!(from_json(bad).expect("json")[0].session_by_name(), None);
    }
}
