//! Which ready replica serves a request: fewest requests in flight through
//! this gateway, informed by llama-server's `GET /slots` (idle slots, which
//! also counts other gateways' work), with conversation affinity: a
//! conversation goes back to the replica that holds its prefix in its
//! prompt cache unless that replica is clearly busier than another.
//!
//! The balancer knows nothing of keys or routes: it is given candidates
//! (ready replicas only) and answers an index.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio::sync::watch;

use crate::proxy::Upstream;
use crate::table::{Replica, Table};

/// Conversations remembered (per generation; two generations are kept).
const AFFINITY_GENERATION: usize = 8192;
/// How often a used replica's `/slots` is read.
const SLOTS_EVERY: Duration = Duration::from_secs(1);
/// A replica unused for this long is no longer polled.
const POLL_WHILE_USED: Duration = Duration::from_secs(10);
/// A replica that refused a connection is passed over this long (unless
/// every candidate is).
const COOL_DOWN_MS: u64 = 2000;
/// Deadline of one `/slots` read.
const SLOTS_DEADLINE: Duration = Duration::from_secs(2);
/// Requests this gateway sends a replica beyond its slots. llama-server
/// serves HTTP with `slots + 4` fixed threads, and a kept-alive idle
/// connection holds one for its 5 s keep-alive: connections beyond that
/// wait 5 s in its accept queue. Past `slots + 2` a request waits in the
/// gateway's queue instead, where it reuses a kept connection.
const BEYOND_SLOTS: usize = 2;
/// The cap before `/slots` has been read.
const CAP_UNKNOWN_SLOTS: usize = 4;

/// What the picker knows of one candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    /// Requests this gateway has in flight on it.
    pub in_flight: usize,
    /// Idle slots by its last `/slots` answer, less what was sent since;
    /// `None` when unknown.
    pub idle_slots: Option<usize>,
}

impl Load {
    fn saturated(&self) -> bool {
        self.idle_slots == Some(0)
    }
}

/// The candidate to use: the least loaded (a free slot first, then fewest
/// in flight; ties taken in turn from `turn`), or `preferred` (the
/// conversation's replica) unless it is clearly busier: at least twice the
/// least loaded's requests in flight plus three (3 against 0, 5 against
/// 1), or no idle slot while the least loaded has two or more.
pub fn pick(loads: &[Load], preferred: Option<usize>, turn: usize) -> usize {
    let n = loads.len();
    if n == 0 {
        return 0;
    }
    let mut best = turn % n;
    for k in 1..n {
        let i = (turn + k) % n;
        let (a, b) = (&loads[i], &loads[best]);
        if (a.saturated(), a.in_flight) < (b.saturated(), b.in_flight) {
            best = i;
        }
    }
    match preferred {
        Some(p) if p < n => {
            let (a, b) = (&loads[p], &loads[best]);
            // One request queued behind another costs less than
            // re-reading a long conversation's prompt elsewhere: stay
            // unless the other is clearly freer.
            let busier = a.in_flight >= 2 * b.in_flight + 3
                || (a.saturated() && b.idle_slots.is_some_and(|i| i >= 2));
            if busier { best } else { p }
        }
        _ => best,
    }
}

/// A stable hash of a conversation's prefix.
pub fn conversation_hash(parts: &[&[u8]]) -> u64 {
    let mut h = DefaultHasher::new();
    for p in parts {
        p.hash(&mut h);
    }
    h.finish()
}

/// One replica's load, shared by the requests on it and its poller.
#[derive(Debug)]
struct ReplicaLoad {
    in_flight: AtomicUsize,
    /// -1: unknown.
    idle_slots: AtomicI64,
    total_slots: AtomicI64,
    last_used_ms: AtomicU64,
    polling: AtomicBool,
    /// Passed over until then (ms since the balancer's epoch).
    down_until_ms: AtomicU64,
}

impl ReplicaLoad {
    /// Whether this gateway already sends it all it can take at once.
    fn full(&self) -> bool {
        let cap = usize::try_from(self.total_slots.load(Ordering::Relaxed))
            .map_or(CAP_UNKNOWN_SLOTS, |t| t.max(1) + BEYOND_SLOTS);
        self.in_flight.load(Ordering::Relaxed) >= cap
    }

    fn load(&self) -> Load {
        let idle = self.idle_slots.load(Ordering::Relaxed);
        Load {
            in_flight: self.in_flight.load(Ordering::Relaxed),
            idle_slots: usize::try_from(idle).ok(),
        }
    }
}

/// Holds one request's place on a replica; dropping it ends the request.
#[derive(Debug)]
pub struct InFlight {
    load: Arc<ReplicaLoad>,
    freed: Arc<tokio::sync::Notify>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.load.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.freed.notify_waiters();
        let total = self.load.total_slots.load(Ordering::Relaxed);
        let _ = self
            .load
            .idle_slots
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                (v >= 0 && v < total).then_some(v + 1)
            });
    }
}

/// Two generations of conversation → replica (`base_url`): a bounded,
/// roughly least-recently-used memory.
#[derive(Debug, Default)]
struct Affinity {
    current: HashMap<u64, Arc<str>>,
    old: HashMap<u64, Arc<str>>,
}

impl Affinity {
    fn get(&mut self, h: u64) -> Option<Arc<str>> {
        if let Some(v) = self.current.get(&h) {
            return Some(v.clone());
        }
        let v = self.old.remove(&h)?;
        self.put(h, v.clone());
        Some(v)
    }

    fn put(&mut self, h: u64, url: Arc<str>) {
        if self.current.len() >= AFFINITY_GENERATION && !self.current.contains_key(&h) {
            self.old = std::mem::take(&mut self.current);
        }
        self.current.insert(h, url);
    }
}

/// Picks replicas and keeps what picking needs.
#[derive(Debug)]
pub struct Balancer {
    loads: Mutex<HashMap<Arc<str>, Arc<ReplicaLoad>>>,
    affinity: Mutex<Affinity>,
    turn: AtomicUsize,
    upstream: Upstream,
    table: watch::Receiver<Arc<Table>>,
    epoch: Instant,
    /// Notified whenever a request ends (a full replica may take one).
    freed: Arc<tokio::sync::Notify>,
}

impl Balancer {
    /// A balancer polling `/slots` through `upstream` while replicas stay
    /// ready in `table`.
    pub fn new(upstream: Upstream, table: watch::Receiver<Arc<Table>>) -> Arc<Balancer> {
        Arc::new(Balancer {
            loads: Mutex::new(HashMap::new()),
            affinity: Mutex::new(Affinity::default()),
            turn: AtomicUsize::new(0),
            upstream,
            table,
            epoch: Instant::now(),
            freed: Arc::default(),
        })
    }

    /// Resolves when a request ends somewhere (a full replica may take the
    /// next one).
    pub fn freed(&self) -> impl std::future::Future<Output = ()> + '_ {
        self.freed.notified()
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Chooses among `candidates` (ready replicas, none empty) for a
    /// conversation `conv`, and counts the request on the chosen one.
    pub fn choose(
        self: &Arc<Self>,
        candidates: &[&Replica],
        conv: Option<u64>,
    ) -> Option<(usize, InFlight)> {
        if candidates.is_empty() {
            return None;
        }
        let now = self.now_ms();
        let mut start_polls = Vec::new();
        let entries: Vec<Arc<ReplicaLoad>> = {
            let mut loads = self.loads.lock().unwrap_or_else(|p| p.into_inner());
            if loads.len() > 1024 {
                let cutoff = now.saturating_sub(600_000);
                loads.retain(|_, l| {
                    l.last_used_ms.load(Ordering::Relaxed) >= cutoff
                        || l.in_flight.load(Ordering::Relaxed) > 0
                });
            }
            candidates
                .iter()
                .map(|r| match loads.get(r.base_url.as_str()) {
                    Some(l) => l.clone(),
                    None => {
                        let l = Arc::new(ReplicaLoad {
                            in_flight: AtomicUsize::new(0),
                            idle_slots: AtomicI64::new(-1),
                            total_slots: AtomicI64::new(-1),
                            last_used_ms: AtomicU64::new(now),
                            polling: AtomicBool::new(false),
                            down_until_ms: AtomicU64::new(0),
                        });
                        loads.insert(Arc::from(r.base_url.as_str()), l.clone());
                        l
                    }
                })
                .collect()
        };
        let preferred = conv.and_then(|h| {
            let url = self
                .affinity
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(h)?;
            candidates.iter().position(|r| *r.base_url == *url)
        });
        // Replicas this gateway already sends all they take: the request
        // waits in the gateway's queue when every one is, or when the
        // conversation's replica is and affinity would keep it there
        // (waiting a moment beats re-reading its prompt elsewhere).
        let open: Vec<usize> = (0..entries.len()).filter(|&i| !entries[i].full()).collect();
        if open.is_empty() {
            return None;
        }
        if let Some(p) = preferred
            && !open.contains(&p)
        {
            let all: Vec<Load> = entries.iter().map(|l| l.load()).collect();
            let turn = self.turn.load(Ordering::Relaxed);
            if pick(&all, Some(p), turn) == p {
                return None;
            }
        }
        let entries: Vec<Arc<ReplicaLoad>> = open.iter().map(|&i| entries[i].clone()).collect();
        let candidates: Vec<&Replica> = open.iter().map(|&i| candidates[i]).collect();
        let preferred = preferred.and_then(|p| open.iter().position(|&i| i == p));
        let loads: Vec<Load> = entries.iter().map(|l| l.load()).collect();
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        let up: Vec<usize> = (0..entries.len())
            .filter(|&i| entries[i].down_until_ms.load(Ordering::Relaxed) <= now)
            .collect();
        let i = if up.is_empty() || up.len() == entries.len() {
            pick(&loads, preferred, turn)
        } else {
            let up_loads: Vec<Load> = up.iter().map(|&i| loads[i]).collect();
            let pref = preferred.and_then(|p| up.iter().position(|&i| i == p));
            up[pick(&up_loads, pref, turn)]
        };
        let chosen = &entries[i];
        chosen.in_flight.fetch_add(1, Ordering::Relaxed);
        let _ = chosen
            .idle_slots
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                (v > 0).then_some(v - 1)
            });
        chosen.last_used_ms.store(now, Ordering::Relaxed);
        if !chosen.polling.swap(true, Ordering::AcqRel) {
            start_polls.push((chosen.clone(), candidates[i]));
        }
        if let Some(h) = conv
            && preferred != Some(i)
        {
            self.affinity
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .put(h, Arc::from(candidates[i].base_url.as_str()));
        }
        for (load, r) in start_polls {
            self.spawn_poller(load, r.base_url.clone());
        }
        Some((
            open[i],
            InFlight {
                load: chosen.clone(),
                freed: self.freed.clone(),
            },
        ))
    }

    /// Notes that `base_url` refused a connection: new requests pass it
    /// over for a moment (the table may not know yet that it is gone).
    pub fn failed(&self, base_url: &str) {
        let loads = self.loads.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = loads.get(base_url) {
            l.down_until_ms
                .store(self.now_ms() + COOL_DOWN_MS, Ordering::Relaxed);
        }
    }

    /// Reads `/slots` about once a second while the replica stays ready
    /// in the table and keeps being used.
    fn spawn_poller(self: &Arc<Self>, load: Arc<ReplicaLoad>, base_url: String) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SLOTS_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(me) = me.upgrade() else { break };
                let api_key = {
                    let t = me.table.borrow();
                    t.routes
                        .iter()
                        .flat_map(|r| r.replicas.iter())
                        .find(|r| r.ready && r.base_url == base_url)
                        .map(|r| r.api_key.clone())
                };
                let idle_for = me
                    .now_ms()
                    .saturating_sub(load.last_used_ms.load(Ordering::Relaxed));
                let Some(api_key) = api_key.filter(|_| {
                    idle_for < POLL_WHILE_USED.as_millis() as u64
                        || load.in_flight.load(Ordering::Relaxed) > 0
                }) else {
                    load.idle_slots.store(-1, Ordering::Relaxed);
                    load.polling.store(false, Ordering::Release);
                    break;
                };
                let (idle, total) = me
                    .read_slots(&base_url, &api_key)
                    .await
                    .map_or((-1, -1), |(i, t)| (i as i64, t as i64));
                // What was sent since the answer left the server is not in
                // it; the count the requests keep is close enough.
                load.total_slots.store(total, Ordering::Relaxed);
                load.idle_slots.store(idle, Ordering::Relaxed);
            }
        });
    }

    /// (idle, total) slots of a llama-server, or `None` when it does not say.
    async fn read_slots(&self, base_url: &str, api_key: &str) -> Option<(usize, usize)> {
        let mut req = http::Request::get(format!("{base_url}/slots"));
        if !api_key.is_empty() {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {api_key}"));
        }
        let req = req.body(Full::new(Bytes::new())).ok()?;
        let read = async {
            let resp = self.upstream.client.request(req).await.ok()?;
            if !resp.status().is_success() {
                return None;
            }
            let body = http_body_util::Limited::new(resp.into_body(), 1 << 20)
                .collect()
                .await
                .ok()?
                .to_bytes();
            parse_slots(&body)
        };
        tokio::time::timeout(SLOTS_DEADLINE, read).await.ok()?
    }
}

/// (idle, total) from a `/slots` answer: slots not processing are idle.
pub fn parse_slots(body: &[u8]) -> Option<(usize, usize)> {
    #[derive(serde::Deserialize)]
    struct Slot {
        is_processing: bool,
    }
    let slots: Vec<Slot> = serde_json::from_slice(body).ok()?;
    Some((
        slots.iter().filter(|s| !s.is_processing).count(),
        slots.len(),
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests unwrap what they built themselves.
mod tests {
    use super::*;

    fn l(in_flight: usize, idle: Option<usize>) -> Load {
        Load {
            in_flight,
            idle_slots: idle,
        }
    }

    #[test]
    fn picker_takes_the_least_loaded_without_affinity() {
        assert_eq!(pick(&[l(3, None), l(1, None), l(2, None)], None, 0), 1);
        // A free slot beats fewer in flight through this gateway.
        assert_eq!(pick(&[l(0, Some(0)), l(2, Some(1))], None, 0), 1);
        // Even loads are taken in turn.
        let even = [l(0, Some(2)), l(0, Some(2))];
        assert_ne!(pick(&even, None, 0), pick(&even, None, 1));
    }

    #[test]
    fn picker_keeps_affinity_while_loads_are_even() {
        let loads = [l(1, Some(3)), l(1, Some(3))];
        for turn in 0..10 {
            assert_eq!(pick(&loads, Some(1), turn), 1);
        }
        // One more in flight is not clearly busier.
        assert_eq!(pick(&[l(1, Some(2)), l(2, Some(1))], Some(1), 0), 1);
    }

    #[test]
    fn picker_yields_affinity_when_the_replica_is_saturated() {
        // No idle slot while another has two or more.
        assert_eq!(pick(&[l(1, Some(2)), l(1, Some(0))], Some(1), 0), 0);
        // One request behind another on a one-slot replica: stays (a
        // prompt re-read elsewhere costs more).
        assert_eq!(pick(&[l(0, Some(1)), l(1, Some(0))], Some(1), 0), 1);
        // Three on it while the other is idle, five against one.
        assert_eq!(pick(&[l(0, None), l(3, None)], Some(1), 0), 0);
        assert_eq!(pick(&[l(1, None), l(5, None)], Some(1), 0), 0);
        // Two against none, four against one: the prompt cache is worth
        // the wait.
        assert_eq!(pick(&[l(0, None), l(2, None)], Some(1), 0), 1);
        assert_eq!(pick(&[l(1, None), l(4, None)], Some(1), 0), 1);
        // Both saturated and even: stays.
        assert_eq!(pick(&[l(4, Some(0)), l(4, Some(0))], Some(1), 0), 1);
    }

    #[test]
    fn slots_answers_count_idle_slots() {
        let body = br#"[{"id":0,"is_processing":true,"n_ctx":512},{"id":1,"is_processing":false}]"#;
        assert_eq!(parse_slots(body), Some((1, 2)));
        assert_eq!(parse_slots(b"{\"error\":1}"), None);
    }

    #[test]
    fn affinity_memory_is_bounded_and_keeps_recent_conversations() {
        let mut a = Affinity::default();
        let url: Arc<str> = Arc::from("http://a");
        a.put(1, url.clone());
        for h in 2..(3 * AFFINITY_GENERATION as u64) {
            a.put(h, url.clone());
            if h % 1000 == 0 {
                // Touching keeps it.
                assert!(a.get(1).is_some());
            }
        }
        assert!(a.current.len() + a.old.len() <= 2 * AFFINITY_GENERATION);
        assert!(a.get(2).is_none(), "an old conversation is forgotten");
    }
}
