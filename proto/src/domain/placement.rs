//! Desired state of one placement: a catalog model, the options its
//! instances run with, and where each replica goes. Stored as JSON under
//! `/halo/v1/placements/`. A replica's StartInstance request id is derived
//! from (placement name, replica index, generation), so a retried start is
//! the same start and the agent deduplicates it.

use super::catalog::{cache_from_name, check_name};
use crate::ConversionError;
use crate::v1;
use serde::{Deserialize, Serialize};

/// Prefix of every request id the controller sends; instances whose request
/// id lacks it are not the controller's and are never touched.
pub const REQUEST_ID_PREFIX: &str = "halo.";

/// The llama-server options of a placement's instances.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementOptions {
    /// `-c`
    pub context_size: u32,
    /// `-np`
    pub parallel: u32,
    /// `-ctk` (llama.cpp name).
    pub cache_type_k: String,
    /// `-ctv` (llama.cpp name).
    pub cache_type_v: String,
    /// Names from the agents' allow-list.
    pub extra_flags: Vec<String>,
}

/// One instance of a placement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replica {
    /// 0-based index within the placement.
    pub index: u32,
    /// Node it runs on.
    pub node: String,
    /// Bumped on every move or restart; part of the request id.
    pub generation: u64,
}

/// A placement: desired state only; what agents report is observed state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// Unique name (`a-z 0-9 . _ -`).
    pub name: String,
    /// Role asked for.
    pub role: String,
    /// Catalog name.
    pub model: String,
    /// File id agents report.
    pub model_id: String,
    /// Node the user pinned it to; pinned placements never move.
    pub pinned_node: Option<String>,
    /// Instance options.
    pub options: PlacementOptions,
    /// Estimated bytes of one replica.
    pub estimate_bytes: u64,
    /// Catalog priority when placed.
    pub priority: i32,
    /// Replicas.
    pub replicas: Vec<Replica>,
    /// Memory is held but no instance is started.
    pub paused: bool,
}

/// A request id split into its parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaKey {
    /// Placement name.
    pub placement: String,
    /// Replica index.
    pub index: u32,
    /// Generation.
    pub generation: u64,
}

impl ReplicaKey {
    /// The deterministic StartInstance request id.
    pub fn request_id(&self) -> String {
        format!(
            "{REQUEST_ID_PREFIX}{}.r{}.g{}",
            self.placement, self.index, self.generation
        )
    }

    /// Parses a request id made by [`ReplicaKey::request_id`]; `None` for
    /// ids the controller did not make.
    pub fn parse(id: &str) -> Option<ReplicaKey> {
        let rest = id.strip_prefix(REQUEST_ID_PREFIX)?;
        let (rest, generation) = rest.rsplit_once(".g")?;
        let (placement, index) = rest.rsplit_once(".r")?;
        check_name("placement", placement).ok()?;
        Some(ReplicaKey {
            placement: placement.to_owned(),
            index: index.parse().ok()?,
            generation: generation.parse().ok()?,
        })
    }
}

impl Placement {
    /// The key of one replica.
    pub fn key(&self, r: &Replica) -> ReplicaKey {
        ReplicaKey {
            placement: self.name.clone(),
            index: r.index,
            generation: r.generation,
        }
    }

    /// The options as the agent takes them.
    pub fn instance_options(&self) -> v1::InstanceOptions {
        let cache = |n: &str| cache_from_name(n).unwrap_or(v1::CacheType::Unspecified) as i32;
        v1::InstanceOptions {
            context_size: self.options.context_size,
            parallel: self.options.parallel,
            cache_type_k: cache(&self.options.cache_type_k),
            cache_type_v: cache(&self.options.cache_type_v),
            alias: self.model.clone(),
            extra_flags: self.options.extra_flags.clone(),
            ..v1::InstanceOptions::default()
        }
    }
}

impl From<Placement> for v1::Placement {
    fn from(p: Placement) -> Self {
        let options = Some(p.instance_options());
        v1::Placement {
            replicas: p
                .replicas
                .iter()
                .map(|r| v1::Replica {
                    index: r.index,
                    node: r.node.clone(),
                    generation: r.generation,
                    request_id: p.key(r).request_id(),
                    instance: None,
                })
                .collect(),
            name: p.name,
            role: p.role,
            model: p.model,
            model_id: p.model_id,
            pinned_node: p.pinned_node.unwrap_or_default(),
            options,
            estimate_bytes: p.estimate_bytes,
            priority: p.priority,
            paused: p.paused,
        }
    }
}

impl TryFrom<v1::Placement> for Placement {
    type Error = ConversionError;

    fn try_from(p: v1::Placement) -> Result<Self, Self::Error> {
        check_name("name", &p.name)?;
        let o = p.options.ok_or(ConversionError::Missing("options"))?;
        let cache = |v: i32| {
            v1::CacheType::try_from(v)
                .ok()
                .and_then(super::catalog::cache_name)
                .unwrap_or("f16")
                .to_owned()
        };
        Ok(Placement {
            name: p.name,
            role: p.role,
            model: p.model,
            model_id: p.model_id,
            pinned_node: (!p.pinned_node.is_empty()).then_some(p.pinned_node),
            options: PlacementOptions {
                context_size: o.context_size,
                parallel: o.parallel.max(1),
                cache_type_k: cache(o.cache_type_k),
                cache_type_v: cache(o.cache_type_v),
                extra_flags: o.extra_flags,
            },
            estimate_bytes: p.estimate_bytes,
            priority: p.priority,
            replicas: p
                .replicas
                .into_iter()
                .map(|r| Replica {
                    index: r.index,
                    node: r.node,
                    generation: r.generation,
                })
                .collect(),
            paused: p.paused,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_round_trip_and_foreign_ids_are_not_ours() {
        let k = ReplicaKey {
            placement: "qwen3-coder-30b.2".into(),
            index: 3,
            generation: 17,
        };
        assert_eq!(k.request_id(), "halo.qwen3-coder-30b.2.r3.g17");
        assert_eq!(ReplicaKey::parse(&k.request_id()), Some(k));
        assert_eq!(ReplicaKey::parse("test-1"), None);
        assert_eq!(ReplicaKey::parse("halo.x.r1.gz"), None);
    }
}
