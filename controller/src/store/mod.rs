//! Desired state storage: one [`Store`] trait, two backends. [`etcd`] talks
//! to a real etcd through the `etcd-client` crate;
//! [`file`] is a single JSON file for the one-controller homelab (atomic write, fsync, rename). Both give every
//! write a revision, make every write conditional ([`Compare`]) and let a
//! reader list a prefix at a revision and watch from the next one; a watcher
//! that falls behind a compaction gets [`StoreError::Compacted`] and re-lists
//! (`conformance`, behind the `conformance` feature the tests enable,
//! checks both backends behave the same).
//!
//! Keys live under [`ROOT`]: `nodes/`, `catalog/`, `placements/`, `keys/`
//! (user keys of the gateways, hashed), `bench/` (kept bench results),
//! `leader`.

#[cfg(feature = "conformance")]
pub mod conformance;
pub mod etcd;
pub mod file;

use std::future::Future;
use tokio::sync::mpsc;

/// Every key halo writes starts with this.
pub const ROOT: &str = "/halo/v1/";
/// Registered nodes.
pub const NODES: &str = "/halo/v1/nodes/";
/// Catalog entries.
pub const CATALOG: &str = "/halo/v1/catalog/";
/// Placements.
pub const PLACEMENTS: &str = "/halo/v1/placements/";
/// User keys of the gateways (their SHA-256, never their text).
pub const KEYS: &str = "/halo/v1/keys/";
/// Bench results, `bench/MODEL/AT-NODE`.
pub const BENCH: &str = "/halo/v1/bench/";
/// The leader record (embedded store) / election prefix (etcd).
pub const LEADER: &str = "/halo/v1/leader";

/// A key, its value and its revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key.
    pub key: String,
    /// The value (JSON for everything halo stores).
    pub value: String,
    /// Revision of the write that created the key.
    pub create_revision: u64,
    /// Revision of the last write to the key.
    pub mod_revision: u64,
}

/// A condition a transaction needs: `key`'s `mod_revision` equals
/// `mod_revision` (0 = the key must not exist).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compare {
    /// The key.
    pub key: String,
    /// Expected modification revision; 0 means absent.
    pub mod_revision: u64,
}

impl Compare {
    /// The key must not exist.
    pub fn absent(key: &str) -> Compare {
        Compare {
            key: key.to_owned(),
            mod_revision: 0,
        }
    }

    /// The key must be unchanged since `rev`.
    pub fn at(key: &str, rev: u64) -> Compare {
        Compare {
            key: key.to_owned(),
            mod_revision: rev,
        }
    }
}

/// A write in a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Set a key.
    Put {
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
    /// Remove a key (absent is fine).
    Delete {
        /// The key.
        key: String,
    },
}

/// One change a watcher sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A key was written.
    Put(KeyValue),
    /// A key was deleted at `revision`.
    Delete {
        /// The key.
        key: String,
        /// The revision of the delete.
        revision: u64,
    },
}

impl Event {
    /// The revision of the change.
    pub fn revision(&self) -> u64 {
        match self {
            Event::Put(kv) => kv.mod_revision,
            Event::Delete { revision, .. } => *revision,
        }
    }

    /// The key changed.
    pub fn key(&self) -> &str {
        match self {
            Event::Put(kv) => &kv.key,
            Event::Delete { key, .. } => key,
        }
    }
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A compare of a transaction did not hold; nothing was written.
    #[error("conflict: {key} changed (expected revision {expected}, found {found})")]
    Conflict {
        /// The first key whose compare failed.
        key: String,
        /// The revision the writer expected (0 = absent).
        expected: u64,
        /// The revision found (0 = absent).
        found: u64,
    },
    /// The watch start revision was compacted away: list again.
    #[error("revision {requested} is compacted (oldest kept {compact_revision}); list again")]
    Compacted {
        /// What the watcher asked for.
        requested: u64,
        /// The oldest revision still available.
        compact_revision: u64,
    },
    /// The store cannot be reached.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The embedded store's file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The embedded store's file is not a store, or another process holds it.
    #[error("{path}: {reason}")]
    Corrupt {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// A live watch: batches of events in revision order, or an error after
/// which the watch has ended.
#[derive(Debug)]
pub struct Watch {
    rx: mpsc::Receiver<Result<Vec<Event>, StoreError>>,
}

impl Watch {
    /// A watch fed by `rx`.
    pub fn new(rx: mpsc::Receiver<Result<Vec<Event>, StoreError>>) -> Watch {
        Watch { rx }
    }

    /// The next batch; `None` when the watch ended.
    pub async fn next(&mut self) -> Option<Result<Vec<Event>, StoreError>> {
        self.rx.recv().await
    }
}

/// Desired-state storage. All writes are transactions conditional on
/// revisions; all revisions are one store-wide, increasing counter.
pub trait Store: Send + Sync {
    /// One key.
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<KeyValue>, StoreError>> + Send;
    /// Every key under `prefix` and the store revision they were read at.
    fn list(
        &self,
        prefix: &str,
    ) -> impl Future<Output = Result<(Vec<KeyValue>, u64), StoreError>> + Send;
    /// Applies `ops` if every compare holds; the new revision.
    fn txn(
        &self,
        compares: Vec<Compare>,
        ops: Vec<Op>,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
    /// Changes under `prefix` with revision ≥ `from`.
    fn watch(
        &self,
        prefix: &str,
        from: u64,
    ) -> impl Future<Output = Result<Watch, StoreError>> + Send;
    /// Drops history before `revision` (watches from older revisions fail).
    fn compact(&self, revision: u64) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// Either backend, chosen by configuration.
#[derive(Debug, Clone)]
pub enum AnyStore {
    /// etcd.
    Etcd(Box<etcd::EtcdStore>),
    /// The embedded file.
    File(file::FileStore),
}

impl Store for AnyStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        timed("get", async {
            match self {
                AnyStore::Etcd(s) => s.get(key).await,
                AnyStore::File(s) => s.get(key).await,
            }
        })
        .await
    }
    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, u64), StoreError> {
        timed("list", async {
            match self {
                AnyStore::Etcd(s) => s.list(prefix).await,
                AnyStore::File(s) => s.list(prefix).await,
            }
        })
        .await
    }
    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<u64, StoreError> {
        timed("txn", async {
            match self {
                AnyStore::Etcd(s) => s.txn(compares, ops).await,
                AnyStore::File(s) => s.txn(compares, ops).await,
            }
        })
        .await
    }
    async fn watch(&self, prefix: &str, from: u64) -> Result<Watch, StoreError> {
        timed("watch", async {
            match self {
                AnyStore::Etcd(s) => s.watch(prefix, from).await,
                AnyStore::File(s) => s.watch(prefix, from).await,
            }
        })
        .await
    }
    async fn compact(&self, revision: u64) -> Result<(), StoreError> {
        timed("compact", async {
            match self {
                AnyStore::Etcd(s) => s.compact(revision).await,
                AnyStore::File(s) => s.compact(revision).await,
            }
        })
        .await
    }
}

/// Runs one store operation, recording its latency and failure in
/// [`crate::metrics`].
async fn timed<T>(
    op: &'static str,
    f: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let start = std::time::Instant::now();
    let r = f.await;
    crate::counters::global().store_op(op, start.elapsed(), r.is_ok());
    r
}
