//! Who a node is, and what its agent streams to watchers: a full snapshot
//! first, then instance state changes, memory samples and model lists.

use super::{Instance, MemoryReport, ModelFile};
use crate::ConversionError;
use crate::v1;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A node's name, the roles placement matches on, and free-form labels.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeIdentity {
    /// Node name, unique in the cluster.
    pub name: String,
    /// Roles such as `speed` or `reasoning`.
    pub roles: Vec<String>,
    /// Free-form labels.
    pub labels: BTreeMap<String, String>,
    /// Address the agent serves gRPC on (`host:port`).
    pub agent_address: String,
    /// The agent's version.
    pub agent_version: String,
    /// `llama-server --version` of the node's llama.cpp build; empty when
    /// unknown. Nodes of a split must run the same build.
    #[serde(default)]
    pub llama_version: String,
    /// Whether the agent can start ggml-rpc-server.
    #[serde(default)]
    pub rpc_server_available: bool,
    /// Non-CPU devices llama-server offloads layers to (empty: CPU only).
    #[serde(default)]
    pub gpu_devices: Vec<String>,
    /// Not-after of the certificate the agent serves, Unix seconds; `None`
    /// when it serves plaintext.
    #[serde(default)]
    pub tls_cert_not_after_unix: Option<i64>,
    /// Base URL of the gateway the agent serves; empty when none.
    #[serde(default)]
    pub gateway_url: String,
    /// URL of the agent's `/metrics`; empty when it serves none.
    #[serde(default)]
    pub metrics_url: String,
}

impl From<NodeIdentity> for v1::NodeIdentity {
    fn from(n: NodeIdentity) -> Self {
        v1::NodeIdentity {
            name: n.name,
            roles: n.roles,
            labels: n.labels.into_iter().collect(),
            agent_address: n.agent_address,
            agent_version: n.agent_version,
            llama_version: n.llama_version,
            rpc_server_available: n.rpc_server_available,
            gpu_devices: n.gpu_devices,
            tls_cert_not_after_unix: n.tls_cert_not_after_unix,
            gateway_url: n.gateway_url,
            metrics_url: n.metrics_url,
        }
    }
}

impl From<v1::NodeIdentity> for NodeIdentity {
    fn from(n: v1::NodeIdentity) -> Self {
        NodeIdentity {
            name: n.name,
            roles: n.roles,
            labels: n.labels.into_iter().collect(),
            agent_address: n.agent_address,
            agent_version: n.agent_version,
            llama_version: n.llama_version,
            rpc_server_available: n.rpc_server_available,
            gpu_devices: n.gpu_devices,
            tls_cert_not_after_unix: n.tls_cert_not_after_unix,
            gateway_url: n.gateway_url,
            metrics_url: n.metrics_url,
        }
    }
}

/// Whether the controller hears from a node: its agent's stream is live
/// (Ready), silent past the grace period (Unreachable) or past the move
/// period (Lost), or never heard from (Unknown).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum NodeStatus {
    /// The agent's stream is live.
    Ready,
    /// Silent for longer than the grace period.
    Unreachable,
    /// Silent for longer than the move period.
    Lost,
    /// Never heard from.
    Unknown,
}

impl NodeStatus {
    /// Lower-case name for people, events and `-o json`.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Ready => "ready",
            NodeStatus::Unreachable => "unreachable",
            NodeStatus::Lost => "lost",
            NodeStatus::Unknown => "unknown",
        }
    }

    /// The status a wire value names; unspecified or a value outside the
    /// enum is Unknown.
    pub fn from_wire(v: i32) -> NodeStatus {
        match v1::NodeStatus::try_from(v) {
            Ok(v1::NodeStatus::Ready) => NodeStatus::Ready,
            Ok(v1::NodeStatus::Unreachable) => NodeStatus::Unreachable,
            Ok(v1::NodeStatus::Lost) => NodeStatus::Lost,
            Ok(v1::NodeStatus::Unknown | v1::NodeStatus::Unspecified) | Err(_) => {
                NodeStatus::Unknown
            }
        }
    }
}

impl std::fmt::Display for NodeStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<NodeStatus> for v1::NodeStatus {
    fn from(s: NodeStatus) -> Self {
        match s {
            NodeStatus::Ready => v1::NodeStatus::Ready,
            NodeStatus::Unreachable => v1::NodeStatus::Unreachable,
            NodeStatus::Lost => v1::NodeStatus::Lost,
            NodeStatus::Unknown => v1::NodeStatus::Unknown,
        }
    }
}

/// Everything a watcher needs to start from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The node.
    pub node: NodeIdentity,
    /// A fresh memory reading.
    pub memory: MemoryReport,
    /// Models on disk.
    pub models: Vec<ModelFile>,
    /// Instances, managed and unmanaged.
    pub instances: Vec<Instance>,
}

/// What an agent's Watch stream carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AgentEventKind {
    /// Full state; first on every stream, and again after a watcher lagged.
    Snapshot(Box<Snapshot>),
    /// An instance changed (state, pid, observed buffers…).
    Instance(Box<Instance>),
    /// A memory sample.
    Memory(Box<MemoryReport>),
    /// The model list after a rescan.
    Models(Vec<ModelFile>),
}

/// One event with its time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentEvent {
    /// When it happened (Unix ms).
    pub at_unix_ms: u64,
    /// What happened.
    pub kind: AgentEventKind,
}

impl From<Snapshot> for v1::Snapshot {
    fn from(s: Snapshot) -> Self {
        v1::Snapshot {
            node: Some(s.node.into()),
            memory: Some(s.memory.into()),
            models: s.models.into_iter().map(Into::into).collect(),
            instances: s.instances.into_iter().map(Into::into).collect(),
        }
    }
}

impl TryFrom<v1::Snapshot> for Snapshot {
    type Error = ConversionError;

    fn try_from(s: v1::Snapshot) -> Result<Self, Self::Error> {
        Ok(Snapshot {
            node: s.node.ok_or(ConversionError::Missing("node"))?.into(),
            memory: s
                .memory
                .ok_or(ConversionError::Missing("memory"))?
                .try_into()?,
            models: s
                .models
                .into_iter()
                .map(TryInto::try_into)
                .collect::<Result<_, _>>()?,
            instances: s
                .instances
                .into_iter()
                .map(TryInto::try_into)
                .collect::<Result<_, _>>()?,
        })
    }
}

impl From<AgentEvent> for v1::AgentEvent {
    fn from(e: AgentEvent) -> Self {
        use v1::agent_event::Event;
        let event = match e.kind {
            AgentEventKind::Snapshot(s) => Event::Snapshot((*s).into()),
            AgentEventKind::Instance(i) => Event::Instance((*i).into()),
            AgentEventKind::Memory(m) => Event::Memory((*m).into()),
            AgentEventKind::Models(models) => Event::Models(v1::ListModelsResponse {
                models: models.into_iter().map(Into::into).collect(),
            }),
        };
        v1::AgentEvent {
            at_unix_ms: e.at_unix_ms,
            event: Some(event),
        }
    }
}

impl TryFrom<v1::AgentEvent> for AgentEvent {
    type Error = ConversionError;

    fn try_from(e: v1::AgentEvent) -> Result<Self, Self::Error> {
        use v1::agent_event::Event;
        let kind = match e.event.ok_or(ConversionError::Missing("event"))? {
            Event::Snapshot(s) => AgentEventKind::Snapshot(Box::new(s.try_into()?)),
            Event::Instance(i) => AgentEventKind::Instance(Box::new(i.try_into()?)),
            Event::Memory(m) => AgentEventKind::Memory(Box::new(m.try_into()?)),
            Event::Models(m) => AgentEventKind::Models(
                m.models
                    .into_iter()
                    .map(TryInto::try_into)
                    .collect::<Result<_, _>>()?,
            ),
        };
        Ok(AgentEvent {
            at_unix_ms: e.at_unix_ms,
            kind,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_statuses_cross_the_wire_and_anything_else_is_unknown() {
        for s in [
            NodeStatus::Ready,
            NodeStatus::Unreachable,
            NodeStatus::Lost,
            NodeStatus::Unknown,
        ] {
            assert_eq!(NodeStatus::from_wire(v1::NodeStatus::from(s) as i32), s);
        }
        assert_eq!(NodeStatus::from_wire(0), NodeStatus::Unknown);
        assert_eq!(NodeStatus::from_wire(99).as_str(), "unknown");
        assert_eq!(NodeStatus::Unreachable.to_string(), "unreachable");
    }
}
