//! Asking the agents for llama.cpp's own projection ([`ensure`]) and
//! keeping each answer in [`crate::projections::Projections`], with the
//! `estimate_disagrees` event when it disagrees with the formula.

use crate::estimate::EstimateOptions;
use crate::estimate::engine::{EngineCheck, EngineRecord, projection_settings};
use crate::events::Events;
use crate::nodes::{Liveness, NodeState};
use crate::observe::{CALL_TIMEOUT, Observed, agent_client, with_deadline};
use crate::projections::{Entry, Key, SettingsKey};
use proto::domain::projection::answer_from_wire;
use proto::domain::{ProjectionAnswer, ProjectionRequest, ProjectionSettings};
use std::time::Duration;
use tokio::time::Instant;

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
            let call = c.project_memory(with_deadline(proto::v1::ProjectMemoryRequest::from(req)));
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
