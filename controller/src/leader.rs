//! Who may write and command agents. [`Leadership`] holds the current term
//! (the leader key's revision) or none. With the embedded store the single
//! controller claims the term at start (the file lock keeps others out);
//! with etcd, [`Election`] grants a lease, campaigns by creating the leader
//! key under it (a transaction that only succeeds while the key is absent),
//! acts as leader only after the first keep-alive succeeds, and steps down
//! when a keep-alive fails or the lease's time runs out without one.
//!
//! Every desired-state write compares the leader key's revision, so a
//! deposed leader cannot write; every agent command carries the term as
//! `leader_revision`, which agents use to refuse a deposed leader.

use crate::store::etcd::EtcdStore;
use crate::store::etcd::client::{self, EtcdClient};
use crate::store::{LEADER, Op, Store, StoreError};
use proto::etcd::etcdserverpb::TxnRequest;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The current term, shared.
#[derive(Debug, Clone)]
pub struct Leadership {
    tx: watch::Sender<Option<Term>>,
    id: String,
}

/// A term and until when it may be acted on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Term {
    /// The leader key's revision.
    pub revision: u64,
    /// `None`: until the process ends (embedded store).
    pub valid_until: Option<Instant>,
}

impl Leadership {
    /// Not leader yet; `id` names this controller.
    pub fn new(id: &str) -> Leadership {
        Leadership {
            tx: watch::Sender::new(None),
            id: id.to_owned(),
        }
    }

    /// This controller's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The term (leader key revision) while leader. A term is only good
    /// until its lease could have expired since the last keep-alive: a
    /// process that was paused (SIGSTOP) past it is not leader on waking,
    /// even before its election task notices.
    pub fn term(&self) -> Option<u64> {
        let t = (*self.tx.borrow())?;
        match t.valid_until {
            Some(until) if Instant::now() >= until => None,
            _ => Some(t.revision),
        }
    }

    /// Changes of the term.
    pub fn subscribe(&self) -> watch::Receiver<Option<Term>> {
        self.tx.subscribe()
    }

    fn set(&self, term: Option<Term>) {
        self.tx.send_replace(term);
    }

    /// Claims the term on a store only this process uses (the embedded
    /// file): writes the leader key; its revision is the term, higher than
    /// any earlier controller's on the same file.
    pub async fn claim<S: Store>(&self, store: &S) -> Result<u64, StoreError> {
        let rev = store
            .txn(
                vec![],
                vec![Op::Put {
                    key: LEADER.to_owned(),
                    value: self.id.clone(),
                }],
            )
            .await?;
        self.set(Some(Term {
            revision: rev,
            valid_until: None,
        }));
        Ok(rev)
    }
}

/// Leader election on etcd.
#[derive(Debug)]
pub struct Election {
    store: EtcdStore,
    leadership: Leadership,
    ttl: Duration,
}

impl Election {
    /// Campaigns with a lease of `ttl` (at least 2 s).
    pub fn new(store: EtcdStore, leadership: Leadership, ttl: Duration) -> Election {
        Election {
            store,
            leadership,
            ttl: ttl.max(Duration::from_secs(2)),
        }
    }

    /// Campaigns, leads, steps down and campaigns again until cancelled.
    pub async fn run(self, token: CancellationToken) {
        loop {
            let r = tokio::select! {
                () = token.cancelled() => break,
                r = self.term(&token) => r,
            };
            self.leadership.set(None);
            if let Err(e) = r {
                tracing::warn!("leadership: {e}");
            }
            tokio::select! {
                () = token.cancelled() => break,
                () = tokio::time::sleep(self.ttl / 4) => {}
            }
        }
        self.leadership.set(None);
    }

    /// One lease: campaign, lead until the lease is lost.
    async fn term(&self, token: &CancellationToken) -> Result<(), String> {
        let etcd: EtcdClient = self.store.client();
        let step = self.ttl / 3;
        let ttl_secs = i64::try_from(self.ttl.as_secs()).unwrap_or(5);
        let (lease, _) = tokio::time::timeout(step, etcd.lease_grant(ttl_secs))
            .await
            .map_err(|_| "lease grant timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        let opened = tokio::time::timeout(step, etcd.lease_keep_alive(lease))
            .await
            .map_err(|_| "keep-alive timed out".to_owned())
            .and_then(|r| r.map_err(|e| e.to_string()));
        let mut keeper = match opened {
            Ok((keeper, _)) => keeper,
            Err(e) => {
                let _ = tokio::time::timeout(step, etcd.lease_revoke(lease)).await;
                return Err(e);
            }
        };
        let mut term: Option<u64> = None;
        let mut tick = tokio::time::interval(step);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = token.cancelled() => {
                    let _ = tokio::time::timeout(step, etcd.lease_revoke(lease)).await;
                    return Ok(());
                }
                _ = tick.tick() => {}
            }
            // Keep the lease alive; a missing or zero-TTL answer ends the term.
            let sent = Instant::now();
            let ka = tokio::time::timeout(step, keeper.keep_alive())
                .await
                .map_err(|_| "keep-alive timed out".to_owned())
                .and_then(|r| match r {
                    Ok(ttl) if ttl > 0 => Ok(()),
                    Ok(_) => Err("lease expired".to_owned()),
                    Err(e) => Err(e.to_string()),
                });
            if let Err(e) = ka {
                if term.is_some() {
                    tracing::warn!("stepping down: {e}");
                }
                return Err(e);
            }
            // The lease lives at least `ttl` from when the keep-alive left;
            // act on the term until a third of that is left.
            let valid_until = Some(sent + self.ttl - step);
            if let Some(revision) = term {
                self.leadership.set(Some(Term {
                    revision,
                    valid_until,
                }));
            }
            if term.is_none() {
                // Campaign: create the leader key under our lease if absent.
                let txn = TxnRequest {
                    compare: vec![client::compare_create_revision(LEADER, 0)],
                    success: vec![client::put_op(LEADER, &self.leadership.id, lease)],
                    failure: Vec::new(),
                };
                let r = tokio::time::timeout(step, etcd.txn(txn))
                    .await
                    .map_err(|_| "campaign timed out".to_owned())?
                    .map_err(|e| e.to_string())?;
                if r.succeeded {
                    let rev = u64::try_from(client::txn_revision(&r)).unwrap_or(0);
                    tracing::info!(term = rev, "elected leader");
                    term = Some(rev);
                    // The keep-alive above succeeded after the grant: act now.
                    self.leadership.set(Some(Term {
                        revision: rev,
                        valid_until,
                    }));
                }
            }
        }
    }
}
