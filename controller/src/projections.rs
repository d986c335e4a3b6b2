//! llama.cpp's own projection, asked of the agents: when a (model, node,
//! context, cache types, slots) combination is first planned, the
//! controller asks that node's agent (`ProjectMemory`) in the background
//! and keeps the answer ([`Projections`], shared through [`Observed`]).
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
use crate::estimate::engine::EngineRecord;
use crate::estimate::engine::{EngineCheck, projection_settings};
use crate::events::Events;
use crate::nodes::{Liveness, NodeState};
use crate::observe::{CALL_TIMEOUT, Observed, agent_client};
use proto::domain::projection::answer_from_wire;
use proto::domain::{ProjectionAnswer, ProjectionRequest, ProjectionSettings};
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
enum Entry {
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
    fn claim(&self, key: &Key) -> bool {
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

    fn settle(&self, key: Key, entry: Entry) {
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

/// Asks every live node of `nodes` that holds `model_id` for llama.cpp's
/// projection at `opts`, unless it was asked already; returns the keys to
/// [`Projections::wait`] on. Answers arrive in the background.
pub fn ensure(
    observed: &Observed,
    events: &Events,
    nodes: &[NodeState],
    model_id: &str,
    opts: &EstimateOptions,
) -> Vec<Key> {
    let settings = projection_settings(opts);
    let mut keys = Vec::new();
    for n in nodes {
        if n.liveness != Liveness::Ready || !n.models.contains_key(model_id) {
            continue;
        }
        let key = Key {
            node: n.name.clone(),
            model_id: model_id.to_owned(),
            settings: SettingsKey::from(&settings),
        };
        let Some(address) = observed.address(&n.name) else {
            continue;
        };
        if observed.projections().claim(&key) {
            tokio::spawn(ask(
                observed.clone(),
                events.clone(),
                address,
                key.clone(),
                settings.clone(),
                opts.clone(),
            ));
        }
        keys.push(key);
    }
    keys
}

/// One ProjectMemory call, its answer kept, a disagreement told.
async fn ask(
    observed: Observed,
    events: Events,
    address: String,
    key: Key,
    settings: ProjectionSettings,
    opts: EstimateOptions,
) {
    let req = ProjectionRequest {
        model_id: key.model_id.clone(),
        settings: settings.clone(),
    };
    let answer = match agent_client(&address) {
        Err(e) => Err(format!("cannot reach the agent at {address}: {e}")),
        Ok(mut c) => {
            let call = c.project_memory(crate::observe::with_deadline(
                proto::v1::ProjectMemoryRequest::from(req),
            ));
            match tokio::time::timeout(CALL_TIMEOUT + Duration::from_secs(1), call).await {
                Ok(Ok(r)) => Ok(answer_from_wire(r.into_inner())),
                Ok(Err(s)) if s.code() == tonic::Code::Unimplemented => Ok(Err(
                    "the agent does not offer ProjectMemory (an older halo-agent)".to_owned(),
                )),
                Ok(Err(s)) if s.code() == tonic::Code::NotFound => {
                    Ok(Err(format!("the agent: {}", s.message())))
                }
                Ok(Err(s)) => Err(format!("no answer from the agent: {}", s.message())),
                Err(_) => Err(format!(
                    "no answer from the agent within {} s",
                    CALL_TIMEOUT.as_secs()
                )),
            }
        }
    };
    let (answer, entry): (ProjectionAnswer, fn(EngineRecord) -> Entry) = match answer {
        Ok(a) => (a, Entry::Answered),
        Err(why) => (Err(why), |r| Entry::Missed(r, Instant::now())),
    };
    let record = EngineRecord {
        model_id: key.model_id.clone(),
        settings,
        answer,
    };
    if let Some(params) = observed.model_params(&key.node, &key.model_id) {
        let check = EngineCheck::new(&key.node, &params, &opts, &record.answer);
        if check.disagrees() {
            events.emit(
                "estimate_disagrees",
                &key.model_id,
                format!(
                    "`{}` ({}) on {} at context {}, {}/{} KV, {} slot(s): {}",
                    key.model_id,
                    params.architecture,
                    key.node,
                    opts.ctx,
                    opts.cache_type_k,
                    opts.cache_type_v,
                    opts.parallel,
                    check.note()
                ),
            );
        }
    }
    observed.projections().settle(key, entry(record));
}
