//! The etcd backend, through `etcd-client`: transactions compare
//! `mod_revision` (0 = absent, which etcd spells the same way), lists read
//! a prefix at one revision, watches start at a revision and report a
//! compacted start as [`StoreError::Compacted`].

use super::{Compare, Event, KeyValue, Op, Store, StoreError, Watch};
use etcd_client::{
    Client, CompareOp, ConnectOptions, EventType, GetOptions, Txn, TxnOp, WatchOptions,
};
use std::time::Duration;
use tokio::sync::mpsc;

/// Deadline of every etcd request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline of connecting.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// A store on an etcd cluster.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore").finish_non_exhaustive()
    }
}

fn unavailable(e: etcd_client::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn rev(r: i64) -> u64 {
    u64::try_from(r).unwrap_or(0)
}

fn irev(r: u64) -> i64 {
    i64::try_from(r).unwrap_or(i64::MAX)
}

fn to_kv(kv: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: String::from_utf8_lossy(kv.value()).into_owned(),
        create_revision: rev(kv.create_revision()),
        mod_revision: rev(kv.mod_revision()),
    }
}

impl EtcdStore {
    /// Connects to `endpoints` (`http://host:port`).
    pub async fn connect(endpoints: &[String]) -> Result<EtcdStore, StoreError> {
        let options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
        let client = tokio::time::timeout(
            CONNECT_TIMEOUT * 2,
            Client::connect(endpoints, Some(options)),
        )
        .await
        .map_err(|_| StoreError::Unavailable(format!("connecting to {endpoints:?} timed out")))?
        .map_err(unavailable)?;
        Ok(EtcdStore { client })
    }

    /// The underlying client (leader election uses leases and campaigns).
    pub fn client(&self) -> Client {
        self.client.clone()
    }
}

impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let mut c = self.client.kv_client();
        let r = c.get(key, None).await.map_err(unavailable)?;
        Ok(r.kvs().first().map(to_kv))
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, u64), StoreError> {
        let mut c = self.client.kv_client();
        let r = c
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(unavailable)?;
        let revision = r.header().map_or(0, |h| rev(h.revision()));
        Ok((r.kvs().iter().map(to_kv).collect(), revision))
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<u64, StoreError> {
        let mut c = self.client.kv_client();
        let when: Vec<etcd_client::Compare> = compares
            .iter()
            .map(|c| {
                etcd_client::Compare::mod_revision(
                    c.key.as_str(),
                    CompareOp::Equal,
                    irev(c.mod_revision),
                )
            })
            .collect();
        let then: Vec<TxnOp> = ops
            .into_iter()
            .map(|op| match op {
                Op::Put { key, value } => TxnOp::put(key, value, None),
                Op::Delete { key } => TxnOp::delete(key, None),
            })
            .collect();
        let r = c
            .txn(Txn::new().when(when).and_then(then))
            .await
            .map_err(unavailable)?;
        if r.succeeded() {
            return Ok(r.header().map_or(0, |h| rev(h.revision())));
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
        let mut c = self.client.watch_client();
        let mut opts = WatchOptions::new().with_prefix();
        if from > 0 {
            opts = opts.with_start_revision(irev(from));
        }
        let mut stream = c.watch(prefix, Some(opts)).await.map_err(unavailable)?;
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
                if resp.compact_revision() > 0 {
                    let _ = tx
                        .send(Err(StoreError::Compacted {
                            requested: from,
                            compact_revision: rev(resp.compact_revision()),
                        }))
                        .await;
                    return;
                }
                if resp.canceled() {
                    let reason = resp.cancel_reason().to_owned();
                    let _ = tx
                        .send(Err(StoreError::Unavailable(format!(
                            "watch canceled: {reason}"
                        ))))
                        .await;
                    return;
                }
                let events: Vec<Event> = resp
                    .events()
                    .iter()
                    .filter_map(|e| {
                        let kv = e.kv()?;
                        Some(match e.event_type() {
                            EventType::Put => Event::Put(to_kv(kv)),
                            EventType::Delete => Event::Delete {
                                key: String::from_utf8_lossy(kv.key()).into_owned(),
                                revision: rev(kv.mod_revision()),
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
        let mut c = self.client.kv_client();
        c.compact(irev(revision), None).await.map_err(unavailable)?;
        Ok(())
    }
}
