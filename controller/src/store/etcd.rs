//! The etcd backend, through halo's own small etcd v3 client ([`client`]):
//! transactions compare `mod_revision` (0 = absent, which etcd spells the
//! same way), lists read a prefix at one revision, watches start at a
//! revision and report a compacted start as [`StoreError::Compacted`].

pub mod client;

use super::{Compare, Event, KeyValue, Op, Store, StoreError, Watch};
use client::{ConnectOptions, EtcdClient, EtcdError, EventType};
use proto::etcd::etcdserverpb::TxnRequest;
use std::time::Duration;
use tokio::sync::mpsc;

/// Deadline of every etcd request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline of connecting.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// A store on an etcd cluster.
#[derive(Clone)]
pub struct EtcdStore {
    client: EtcdClient,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore").finish_non_exhaustive()
    }
}

fn unavailable(e: EtcdError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn rev(r: i64) -> u64 {
    u64::try_from(r).unwrap_or(0)
}

fn irev(r: u64) -> i64 {
    i64::try_from(r).unwrap_or(i64::MAX)
}

fn to_kv(kv: &client::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(&kv.key).into_owned(),
        value: String::from_utf8_lossy(&kv.value).into_owned(),
        create_revision: rev(kv.create_revision),
        mod_revision: rev(kv.mod_revision),
    }
}

impl EtcdStore {
    /// Connects to `endpoints` (`http://host:port`), balanced over all of
    /// them; connections open lazily, so an unreachable etcd shows up as
    /// operations failing with [`StoreError::Unavailable`].
    pub async fn connect(endpoints: &[String]) -> Result<EtcdStore, StoreError> {
        let options = ConnectOptions {
            connect_timeout: CONNECT_TIMEOUT,
            request_timeout: REQUEST_TIMEOUT,
            keep_alive_interval: Duration::from_secs(2),
            keep_alive_timeout: Duration::from_secs(2),
        };
        let client = EtcdClient::connect(endpoints, options).map_err(unavailable)?;
        Ok(EtcdStore { client })
    }

    /// The underlying client (leader election uses leases and campaigns).
    pub fn client(&self) -> EtcdClient {
        self.client.clone()
    }
}

impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let kv = self.client.get(key).await.map_err(unavailable)?;
        Ok(kv.as_ref().map(to_kv))
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, u64), StoreError> {
        let (kvs, revision) = self.client.get_prefix(prefix).await.map_err(unavailable)?;
        Ok((kvs.iter().map(to_kv).collect(), rev(revision)))
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<u64, StoreError> {
        let request = TxnRequest {
            compare: compares
                .iter()
                .map(|c| client::compare_mod_revision(&c.key, irev(c.mod_revision)))
                .collect(),
            success: ops
                .iter()
                .map(|op| match op {
                    Op::Put { key, value } => client::put_op(key, value, 0),
                    Op::Delete { key } => client::delete_op(key),
                })
                .collect(),
            failure: Vec::new(),
        };
        let r = self.client.txn(request).await.map_err(unavailable)?;
        if r.succeeded {
            return Ok(rev(client::txn_revision(&r)));
        }
        // Name the first compare that failed.
        for cmp in compares {
            let found = self.get(&cmp.key).await?.map_or(0, |kv| kv.mod_revision);
            if found != cmp.mod_revision {
                return Err(StoreError::Conflict {
                    key: cmp.key,
                    expected: cmp.mod_revision,
                    found,
                });
            }
        }
        Err(StoreError::Conflict {
            key: String::new(),
            expected: 0,
            found: 0,
        })
    }

    async fn watch(&self, prefix: &str, from: u64) -> Result<Watch, StoreError> {
        // 0 asks etcd for changes from now on.
        let start = if from > 0 { irev(from) } else { 0 };
        let mut stream = self
            .client
            .watch_prefix(prefix, start)
            .await
            .map_err(unavailable)?;
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    () = tx.closed() => return,
                    m = stream.message() => m,
                };
                let resp = match msg {
                    Ok(Some(r)) => r,
                    Ok(None) => {
                        let _ = tx
                            .send(Err(StoreError::Unavailable("watch ended".into())))
                            .await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(unavailable(e))).await;
                        return;
                    }
                };
                if resp.compact_revision > 0 {
                    let _ = tx
                        .send(Err(StoreError::Compacted {
                            requested: from,
                            compact_revision: rev(resp.compact_revision),
                        }))
                        .await;
                    return;
                }
                if resp.canceled {
                    let reason = resp.cancel_reason;
                    let _ = tx
                        .send(Err(StoreError::Unavailable(format!(
                            "watch canceled: {reason}"
                        ))))
                        .await;
                    return;
                }
                let events: Vec<Event> = resp
                    .events
                    .iter()
                    .filter_map(|e| {
                        let kv = e.kv.as_ref()?;
                        Some(match EventType::try_from(e.r#type).ok()? {
                            EventType::Put => Event::Put(to_kv(kv)),
                            EventType::Delete => Event::Delete {
                                key: String::from_utf8_lossy(&kv.key).into_owned(),
                                revision: rev(kv.mod_revision),
                            },
                        })
                    })
                    .collect();
                if !events.is_empty() && tx.send(Ok(events)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Watch::new(rx))
    }

    async fn compact(&self, revision: u64) -> Result<(), StoreError> {
        self.client
            .compact(irev(revision))
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}
