//! llama.cpp's own projection, asked of the agents: when a (model, node,
//! context, cache types, slots) combination is first planned, the
//! controller asks that node's agent (`ProjectMemory`) in the background
//! and keeps the answer ([`Projections`], shared through `Observed`; the
//! asking is `ask_engine.rs`).
//! Placement reads the answers from [`NodeState::engine`] and uses the
//! formula until one arrives; Plan and Place wait a few seconds for them
//! ([`Projections::wait`]). An answer that disagrees with the formula by
//! more than 2 % is an `estimate_disagrees` event, once per combination.
//!
//! The agent's own answers (a projection, or "llama-fit-params not found",
//! "failed: ...", "timed out ...") are kept for the controller's life: the
//! agent caches them per file too. A call that did not reach an answer
//! (the agent down, a deadline) is asked again after [`RETRY_AFTER`].

use crate::estimate::EstimateOptions;
use crate::estimate::engine::{EngineRecord, projection_settings};
use proto::domain::ProjectionSettings;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// How long Plan and Place wait for answers not yet in.
pub const WAIT: Duration = Duration::from_secs(5);
/// When a call that got no answer from the agent is made again.
pub const RETRY_AFTER: Duration = Duration::from_secs(60);

/// One combination asked of one node.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    /// The node asked.
    pub node: String,
    /// The model id.
    pub model_id: String,
    /// The settings, as the agent is asked.
    pub settings: SettingsKey,
}

impl Key {
    /// Whether this asks for `model_id` at `opts`.
    pub fn matches(&self, model_id: &str, opts: &EstimateOptions) -> bool {
        self.model_id == model_id && self.settings == SettingsKey::from(&projection_settings(opts))
    }
}

/// [`ProjectionSettings`] in an orderable form.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SettingsKey(u32, u32, &'static str, &'static str, Option<bool>, u32, u32);

impl From<&ProjectionSettings> for SettingsKey {
    fn from(s: &ProjectionSettings) -> Self {
        SettingsKey(
            s.context_size,
            s.parallel,
            s.cache_type_k.name(),
            s.cache_type_v.name(),
            s.flash_attention,
            s.batch_size,
            s.ubatch_size,
        )
    }
}

#[derive(Debug)]
pub(crate) enum Entry {
    /// Asked; no answer yet.
    Pending,
    /// The agent's answer.
    Answered(EngineRecord),
    /// No answer reached us (a transport error or deadline), at this time.
    Missed(EngineRecord, Instant),
}

/// The answers and the questions in flight, shared by every clone.
#[derive(Debug, Clone, Default)]
pub struct Projections {
    book: Arc<Mutex<HashMap<Key, Entry>>>,
    changed: Arc<Notify>,
}

impl Projections {
    fn book(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Entry>> {
        self.book.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every answer from `node`, for placement.
    pub fn records(&self, node: &str) -> Vec<EngineRecord> {
        self.book()
            .iter()
            .filter(|(k, _)| k.node == node)
            .filter_map(|(_, e)| match e {
                Entry::Answered(r) | Entry::Missed(r, _) => Some(r.clone()),
                Entry::Pending => None,
            })
            .collect()
    }

    /// Answers by node, for placement ([`NodeState::engine`]).
    pub fn by_node(&self) -> BTreeMap<String, Vec<EngineRecord>> {
        let mut out: BTreeMap<String, Vec<EngineRecord>> = BTreeMap::new();
        for (k, e) in self.book().iter() {
            if let Entry::Answered(r) | Entry::Missed(r, _) = e {
                out.entry(k.node.clone()).or_default().push(r.clone());
            }
        }
        out
    }

    /// Whether `key` still waits for its answer.
    fn pending(&self, key: &Key) -> bool {
        matches!(self.book().get(key), Some(Entry::Pending))
    }

    /// Marks `key` asked unless it is answered (or was missed recently);
    /// true when the caller is to ask.
    pub(crate) fn claim(&self, key: &Key) -> bool {
        let mut book = self.book();
        match book.get(key) {
            Some(Entry::Pending | Entry::Answered(_)) => false,
            Some(Entry::Missed(_, at)) if at.elapsed() < RETRY_AFTER => false,
            _ => {
                book.insert(key.clone(), Entry::Pending);
                true
            }
        }
    }

    pub(crate) fn settle(&self, key: Key, entry: Entry) {
        self.book().insert(key, entry);
        self.changed.notify_waiters();
    }

    /// Waits until none of `keys` is pending, at most `within`.
    pub async fn wait(&self, keys: &[Key], within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !keys.iter().any(|k| self.pending(k)) {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return;
            }
        }
    }
}
