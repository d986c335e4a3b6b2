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
//!
//! The calls go through `etcd-client` ([`EtcdStore::call`]: deadline and
//! fail-over), the lease kept alive on its `lease_keep_alive` stream. etcd's
//! own election API is not used: its `Campaign` writes one key per
//! candidate (`/halo/v1/leader/<lease>`) and blocks on the server until
//! that key is the oldest, while halo's term is the revision of the one
//! key `/halo/v1/leader` that every write compares, and a candidate that
//! loses should hold no key and keep its calls within their deadline.

use crate::store::etcd::{EtcdError, EtcdStore, REQUEST_TIMEOUT};
use crate::store::{LEADER, Op, Store, StoreError};
use etcd_client::{
    Compare as EtcdCompare, CompareOp, LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn, TxnOp,
};
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

/// A lease kept alive over one stream.
struct Lease {
    keeper: LeaseKeeper,
    stream: LeaseKeepAliveStream,
}

impl Lease {
    /// Keeps the lease alive once, within [`REQUEST_TIMEOUT`]: the TTL
    /// left (0: the lease is gone).
    async fn keep_alive(&mut self) -> Result<i64, EtcdError> {
        let failed = |error| EtcdError::Failed {
            call: "keep-alive",
            error,
        };
        self.keeper.keep_alive().await.map_err(failed)?;
        let answer = tokio::time::timeout(REQUEST_TIMEOUT, self.stream.message())
            .await
            .map_err(|_| EtcdError::Timeout("keep-alive"))?
            .map_err(failed)?;
        match answer {
            Some(r) if r.id() == self.keeper.id() => Ok(r.ttl()),
            Some(r) => Err(EtcdError::Protocol(format!(
                "keep-alive for lease {} answered for {}",
                self.keeper.id(),
                r.id()
            ))),
            None => Err(EtcdError::Protocol("keep-alive stream ended".into())),
        }
    }
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

    /// A lease of the election's TTL: its id.
    async fn grant(&self) -> Result<i64, EtcdError> {
        let ttl_secs = i64::try_from(self.ttl.as_secs()).unwrap_or(5);
        let r = self
            .store
            .call("lease grant", |c| async move {
                c.lease_client().grant(ttl_secs, None).await
            })
            .await?;
        if !r.error().is_empty() {
            return Err(EtcdError::Protocol(format!("lease grant: {}", r.error())));
        }
        Ok(r.id())
    }

    /// Opens the keep-alive stream of lease `id`, keeping it alive once
    /// (the client refuses a lease etcd no longer has).
    async fn keep_alive(&self, id: i64) -> Result<Lease, EtcdError> {
        let (keeper, stream) = self
            .store
            .call("keep-alive", |c| async move {
                c.lease_client().keep_alive(id).await
            })
            .await?;
        Ok(Lease { keeper, stream })
    }

    /// Revokes lease `id` (the leader key goes with it), within `limit`;
    /// a failure is left to the lease's expiry.
    async fn revoke(&self, id: i64, limit: Duration) {
        let revoke = self.store.call("lease revoke", |c| async move {
            c.lease_client().revoke(id).await
        });
        let _ = tokio::time::timeout(limit, revoke).await;
    }

    /// Creates the leader key under `lease` if it is absent: the term (the
    /// key's revision) when this controller won.
    async fn campaign(&self, lease: i64) -> Result<Option<u64>, EtcdError> {
        let txn = Txn::new()
            .when([EtcdCompare::create_revision(LEADER, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                LEADER,
                self.leadership.id.as_str(),
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let r = self
            .store
            .call("txn", |c| {
                let txn = txn.clone();
                async move { c.kv_client().txn(txn).await }
            })
            .await?;
        let revision = r.header().map_or(0, |h| h.revision());
        Ok(r.succeeded().then(|| u64::try_from(revision).unwrap_or(0)))
    }

    /// One lease: campaign, lead until the lease is lost.
    async fn term(&self, token: &CancellationToken) -> Result<(), String> {
        let step = self.ttl / 3;
        let lease = tokio::time::timeout(step, self.grant())
            .await
            .map_err(|_| "lease grant timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        let opened = tokio::time::timeout(step, self.keep_alive(lease))
            .await
            .map_err(|_| "keep-alive timed out".to_owned())
            .and_then(|r| r.map_err(|e| e.to_string()));
        let mut kept = match opened {
            Ok(kept) => kept,
            Err(e) => {
                self.revoke(lease, step).await;
                return Err(e);
            }
        };
        let mut term: Option<u64> = None;
        let mut tick = tokio::time::interval(step);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = token.cancelled() => {
                    self.revoke(lease, step).await;
                    return Ok(());
                }
                _ = tick.tick() => {}
            }
            // Keep the lease alive; a missing or zero-TTL answer ends the term.
            let sent = Instant::now();
            let ka = tokio::time::timeout(step, kept.keep_alive())
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
                let won = tokio::time::timeout(step, self.campaign(lease))
                    .await
                    .map_err(|_| "campaign timed out".to_owned())?
                    .map_err(|e| e.to_string())?;
                if let Some(rev) = won {
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
