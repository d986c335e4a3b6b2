//! Desired state in the store, typed: catalog entries, placements and nodes
//! as JSON under [`crate::store::ROOT`], read with their revisions and
//! written only by the leader (every write compares the leader key's
//! revision with this controller's term, and the caller's revisions).

use crate::error::Error;
use crate::leader::Leadership;
use crate::observe::NodeConfig;
use crate::store::{AnyStore, CATALOG, Compare, KeyValue, LEADER, NODES, Op, PLACEMENTS, Store};
use proto::domain::{CatalogEntry, Placement};
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;

/// A value with the revision it was read at.
#[derive(Debug, Clone)]
pub struct Versioned<T> {
    /// The value.
    pub value: T,
    /// Its `mod_revision`.
    pub revision: u64,
}

/// Typed, leader-guarded access to the store.
#[derive(Debug, Clone)]
pub struct Desired {
    store: AnyStore,
    leadership: Leadership,
}

fn parse<T: DeserializeOwned>(kv: &KeyValue) -> Result<Versioned<T>, Error> {
    let value = serde_json::from_str(&kv.value).map_err(|e| Error::Corrupt {
        key: kv.key.clone(),
        reason: e.to_string(),
    })?;
    Ok(Versioned {
        value,
        revision: kv.mod_revision,
    })
}

/// A registered node as stored under `/halo/v1/nodes/`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeRecord {
    /// Name.
    pub name: String,
    /// Agent address, `host:port`.
    pub address: String,
    /// Configured roles (empty: the agent's own).
    #[serde(default)]
    pub roles: Vec<String>,
}

impl From<&NodeConfig> for NodeRecord {
    fn from(n: &NodeConfig) -> Self {
        NodeRecord {
            name: n.name.clone(),
            address: n.address.clone(),
            roles: n.roles.clone(),
        }
    }
}

impl From<NodeRecord> for NodeConfig {
    fn from(n: NodeRecord) -> Self {
        NodeConfig {
            name: n.name,
            address: n.address,
            roles: n.roles,
        }
    }
}

/// The key of a placement.
pub fn placement_key(name: &str) -> String {
    format!("{PLACEMENTS}{name}")
}

/// The key of a catalog entry.
pub fn catalog_key(name: &str) -> String {
    format!("{CATALOG}{name}")
}

/// JSON of a value (domain types always serialize).
pub fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

impl Desired {
    /// Over `store`, writing as `leadership` allows.
    pub fn new(store: AnyStore, leadership: Leadership) -> Desired {
        Desired { store, leadership }
    }

    /// The store.
    pub fn store(&self) -> &AnyStore {
        &self.store
    }

    /// The leadership.
    pub fn leadership(&self) -> &Leadership {
        &self.leadership
    }

    /// Every placement, by name, and the revision of the read.
    pub async fn placements(&self) -> Result<(Vec<Versioned<Placement>>, u64), Error> {
        let (kvs, rev) = self.store.list(PLACEMENTS).await?;
        let ps = kvs.iter().map(parse).collect::<Result<Vec<_>, _>>()?;
        Ok((ps, rev))
    }

    /// The catalog by name.
    pub async fn catalog(&self) -> Result<BTreeMap<String, CatalogEntry>, Error> {
        let (kvs, _) = self.store.list(CATALOG).await?;
        kvs.iter()
            .map(|kv| parse::<CatalogEntry>(kv).map(|v| (v.value.name.clone(), v.value)))
            .collect()
    }

    /// Registered nodes.
    pub async fn nodes(&self) -> Result<Vec<NodeRecord>, Error> {
        let (kvs, _) = self.store.list(NODES).await?;
        kvs.iter().map(|kv| parse(kv).map(|v| v.value)).collect()
    }

    /// Registers (or updates) nodes that differ from the stored records.
    pub async fn register_nodes(&self, nodes: &[NodeConfig]) -> Result<(), Error> {
        let stored = self.nodes().await?;
        for n in nodes {
            let rec = NodeRecord::from(n);
            if !stored.contains(&rec) {
                self.write(
                    vec![],
                    vec![Op::Put {
                        key: format!("{NODES}{}", rec.name),
                        value: json(&rec),
                    }],
                )
                .await?;
            }
        }
        Ok(())
    }

    /// Applies `ops` if `compares` hold and this controller is leader.
    pub async fn write(&self, mut compares: Vec<Compare>, ops: Vec<Op>) -> Result<u64, Error> {
        let term = self.leadership.term().ok_or(Error::NotLeader)?;
        compares.push(Compare::at(LEADER, term));
        match self.store.txn(compares, ops).await {
            Err(crate::store::StoreError::Conflict { key, .. }) if key == LEADER => {
                Err(Error::NotLeader)
            }
            r => Ok(r?),
        }
    }

    /// Writes a catalog entry (create or replace).
    pub async fn put_catalog(&self, e: &CatalogEntry) -> Result<u64, Error> {
        e.validate()?;
        self.write(
            vec![],
            vec![Op::Put {
                key: catalog_key(&e.name),
                value: json(e),
            }],
        )
        .await
    }

    /// Replaces a placement read at `revision`.
    pub async fn update_placement(&self, p: &Placement, revision: u64) -> Result<u64, Error> {
        let key = placement_key(&p.name);
        self.write(
            vec![Compare::at(&key, revision)],
            vec![Op::Put {
                key,
                value: json(p),
            }],
        )
        .await
    }
}
