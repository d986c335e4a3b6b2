//! The embedded store: the whole desired state in one JSON file, for the
//! one-controller homelab. A write builds the new file next to the old one
//! (`.FILE.tmp`, `proto::fsutil::write_atomic`), fsyncs it, renames it over
//! the old one and fsyncs the directory before it is acknowledged; a crash
//! (kill -9, power loss) at any point leaves either the old or the new file,
//! never a torn one, and never loses an acknowledged write. An exclusive
//! `flock` on `FILE.lock` keeps a second controller off the same file.
//!
//! Watch history is kept in memory (the last [`HISTORY`] events since the
//! process opened the file); older start revisions get
//! [`StoreError::Compacted`], and the watcher re-lists, as with etcd.

use super::{Compare, Event, KeyValue, Op, Store, StoreError, Watch};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::{broadcast, mpsc};

/// Events kept for watchers.
pub const HISTORY: usize = 10_000;
/// Current file format.
const FORMAT: &str = "halo-store-v1";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    value: String,
    create_revision: u64,
    mod_revision: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Data {
    format: String,
    revision: u64,
    kvs: BTreeMap<String, Entry>,
}

#[derive(Debug)]
struct State {
    data: Data,
    history: VecDeque<Event>,
    /// Watches from a revision below this one cannot be served.
    history_from: u64,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    state: Mutex<State>,
    events: broadcast::Sender<Vec<Event>>,
    _lock: File,
}

/// The embedded single-file store.
#[derive(Debug, Clone)]
pub struct FileStore {
    inner: Arc<Inner>,
}

fn io(path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl FileStore {
    /// Opens (or creates) the store at `path`, taking its lock.
    pub fn open(path: &Path) -> Result<FileStore, StoreError> {
        let lock_path = path.with_extension("lock");
        let lock = proto::fsutil::lock_exclusive(&lock_path).map_err(|e| match e {
            proto::fsutil::LockError::Busy { .. } => StoreError::Corrupt {
                path: path.display().to_string(),
                reason: "another process holds the store (lock file busy)".into(),
            },
            proto::fsutil::LockError::Io(e) => io(&lock_path, e),
        })?;
        let data = match std::fs::read(path) {
            Ok(bytes) => {
                let data: Data =
                    serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                        path: path.display().to_string(),
                        reason: format!("not a halo store: {e}"),
                    })?;
                if data.format != FORMAT {
                    return Err(StoreError::Corrupt {
                        path: path.display().to_string(),
                        reason: format!("format `{}`, expected `{FORMAT}`", data.format),
                    });
                }
                data
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Data {
                format: FORMAT.to_owned(),
                revision: 0,
                kvs: BTreeMap::new(),
            },
            Err(e) => return Err(io(path, e)),
        };
        let history_from = data.revision + 1;
        let (events, _) = broadcast::channel(1024);
        Ok(FileStore {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                state: Mutex::new(State {
                    data,
                    history: VecDeque::new(),
                    history_from,
                }),
                events,
                _lock: lock,
            }),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data: every
        // change is applied to a copy first.
        self.inner
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Writes `data` durably: temp file, fsync, rename, fsync directory.
    fn persist(&self, data: &Data) -> Result<(), StoreError> {
        let path = &self.inner.path;
        let bytes = serde_json::to_vec_pretty(data).map_err(|e| StoreError::Corrupt {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        // Created like `File::create` would: 0o666 before the umask.
        proto::fsutil::write_atomic(path, &bytes, 0o666).map_err(|e| io(path, e))?;
        Ok(())
    }
}

fn kv(key: &str, e: &Entry) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: e.value.clone(),
        create_revision: e.create_revision,
        mod_revision: e.mod_revision,
    }
}

impl Store for FileStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        Ok(self.state().data.kvs.get(key).map(|e| kv(key, e)))
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, u64), StoreError> {
        let s = self.state();
        let kvs = s
            .data
            .kvs
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, e)| kv(k, e))
            .collect();
        Ok((kvs, s.data.revision))
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<u64, StoreError> {
        let mut s = self.state();
        for c in &compares {
            let found = s.data.kvs.get(&c.key).map_or(0, |e| e.mod_revision);
            if found != c.mod_revision {
                return Err(StoreError::Conflict {
                    key: c.key.clone(),
                    expected: c.mod_revision,
                    found,
                });
            }
        }
        if ops.is_empty() {
            return Ok(s.data.revision);
        }
        let mut next = s.data.clone();
        next.revision += 1;
        let rev = next.revision;
        let mut events = Vec::new();
        for op in ops {
            match op {
                Op::Put { key, value } => {
                    let create_revision = next.kvs.get(&key).map_or(rev, |e| e.create_revision);
                    let e = Entry {
                        value,
                        create_revision,
                        mod_revision: rev,
                    };
                    events.push(Event::Put(kv(&key, &e)));
                    next.kvs.insert(key, e);
                }
                Op::Delete { key } => {
                    if next.kvs.remove(&key).is_some() {
                        events.push(Event::Delete { key, revision: rev });
                    }
                }
            }
        }
        // Durable before it is visible or acknowledged.
        self.persist(&next)?;
        s.data = next;
        for e in &events {
            s.history.push_back(e.clone());
        }
        while s.history.len() > HISTORY {
            if let Some(old) = s.history.pop_front() {
                s.history_from = s.history_from.max(old.revision() + 1);
            }
        }
        if !events.is_empty() {
            let _ = self.inner.events.send(events);
        }
        Ok(rev)
    }

    async fn watch(&self, prefix: &str, from: u64) -> Result<Watch, StoreError> {
        let (tx, rx) = mpsc::channel(256);
        let (backlog, mut live, current) = {
            let s = self.state();
            let current = s.data.revision;
            let from = if from == 0 { current + 1 } else { from };
            if from < s.history_from && from <= current {
                return Err(StoreError::Compacted {
                    requested: from,
                    compact_revision: s.history_from,
                });
            }
            let backlog: Vec<Event> = s
                .history
                .iter()
                .filter(|e| e.revision() >= from && e.key().starts_with(prefix))
                .cloned()
                .collect();
            // Subscribing under the lock: nothing between backlog and live.
            (backlog, self.inner.events.subscribe(), current)
        };
        let prefix = prefix.to_owned();
        tokio::spawn(async move {
            if !backlog.is_empty() && tx.send(Ok(backlog)).await.is_err() {
                return;
            }
            let mut last = current;
            loop {
                let batch = tokio::select! {
                    () = tx.closed() => return,
                    b = live.recv() => b,
                };
                let batch = match batch {
                    Ok(b) => b,
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let _ = tx
                            .send(Err(StoreError::Compacted {
                                requested: last + 1,
                                compact_revision: last + 1,
                            }))
                            .await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if let Some(e) = batch.last() {
                    last = e.revision();
                }
                let mine: Vec<Event> = batch
                    .into_iter()
                    .filter(|e| e.key().starts_with(&prefix))
                    .collect();
                if !mine.is_empty() && tx.send(Ok(mine)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Watch::new(rx))
    }

    async fn compact(&self, revision: u64) -> Result<(), StoreError> {
        let mut s = self.state();
        let revision = revision.min(s.data.revision);
        s.history.retain(|e| e.revision() >= revision);
        s.history_from = s.history_from.max(revision);
        Ok(())
    }
}
