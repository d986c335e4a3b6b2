//! Fuzzes the decode + validate path of every `AgentService` request: the
//! first byte picks the message, the rest is decoded with prost and, when
//! it decodes, checked the way the service checks it before acting (the
//! domain conversions, the request id, the kind and the model id). Hostile
//! bytes must give a value or an error, never a panic; what decodes must
//! survive a re-encode, and what validates must survive the wire.
//!
//! Run from `agent/fuzz`: `cargo fuzz run agent_request` (nightly), or on a
//! stable toolchain `RUSTC_BOOTSTRAP=1 cargo fuzz run agent_request`.

#![no_main]

use agent::error::Error;
use agent::scan::check_model_id;
use agent::supervisor::{StartRequest, check_kind, check_request_id};
use libfuzzer_sys::fuzz_target;
use proto::domain::{InstanceKind, InstanceOptions, ReplicaKey};
use proto::v1;

use proto::fuzz::decode;

/// The status a refused request is answered with (what the client sees).
fn answer(e: Error) {
    let _ = e.to_string();
    let status = tonic::Status::from(e);
    assert_ne!(status.code(), tonic::Code::Ok);
}

/// A request id checked the way the agent and the controller read it.
fn request_id(id: &str) {
    if let Err(e) = check_request_id(id) {
        answer(e);
    }
    if let Some(k) = ReplicaKey::parse(id) {
        assert!(proto::domain::catalog::check_name("placement", &k.placement).is_ok());
        // Parsing what it prints gives the same key.
        assert_eq!(
            ReplicaKey::parse(&k.request_id()),
            Some(k.clone()),
            "{id:?}"
        );
    }
}

fn start(r: v1::StartInstanceRequest) {
    request_id(&r.request_id);
    let _ = check_model_id(&r.model_id);
    let options = match InstanceOptions::try_from(r.options.unwrap_or_default()) {
        Ok(o) => o,
        Err(e) => return answer(e.into()),
    };
    // A checked value survives the wire unchanged.
    assert_eq!(
        InstanceOptions::try_from(v1::InstanceOptions::from(options.clone())).as_ref(),
        Ok(&options)
    );
    let kind = match InstanceKind::from_wire(r.kind) {
        Ok(k) => k,
        Err(e) => return answer(e.into()),
    };
    assert_eq!(v1::InstanceKind::from(kind) as i32 == r.kind, r.kind != 0);
    let req = StartRequest {
        request_id: r.request_id,
        model_id: r.model_id,
        options,
        generation: r.generation,
        leader_revision: r.leader_revision,
        kind,
        estimate_bytes: r.estimate_bytes,
    };
    // What `Supervisor::start` checks before it touches its state.
    if let Err(e) = check_request_id(&req.request_id) {
        return answer(e);
    }
    if let Err(e) = check_kind(&req) {
        return answer(e);
    }
    match req.kind {
        InstanceKind::LlamaServer => {
            assert!(req.options.rpc_client.is_none());
            // What `plan_llama_server` checks before any lookup.
            if let Err(reason) = check_model_id(&req.model_id) {
                return answer(Error::BadModelId {
                    id: req.model_id,
                    reason,
                });
            }
            assert!(!req.model_id.is_empty() && !req.model_id.starts_with('/'));
        }
        InstanceKind::RpcServer => {
            let key = ReplicaKey::parse(&req.request_id).expect("accepted helper id parses");
            assert!(key.share >= 1);
            assert!(req.model_id.is_empty() && req.leader_revision > 0);
            assert!(req.options.rpc_client.is_some());
        }
    }
}

/// ProjectMemory's checks: the request's conversion (the model id, bounded
/// settings); what converts survives the wire.
fn project(r: v1::ProjectMemoryRequest) {
    match proto::domain::ProjectionRequest::try_from(r) {
        Ok(p) => {
            let back = proto::domain::ProjectionRequest::try_from(v1::ProjectMemoryRequest::from(
                p.clone(),
            ));
            assert_eq!(back.as_ref(), Ok(&p));
        }
        Err(e) => answer(e.into()),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 9 {
        0 => {
            let _ = decode::<v1::GetNodeRequest>(rest);
        }
        1 => {
            let _ = decode::<v1::GetMemoryRequest>(rest);
        }
        2 => {
            let _ = decode::<v1::ListModelsRequest>(rest);
        }
        3 => {
            let _ = decode::<v1::ListInstancesRequest>(rest);
        }
        4 => {
            if let Some(r) = decode::<v1::StartInstanceRequest>(rest) {
                start(r);
            }
        }
        5 => {
            if let Some(r) = decode::<v1::StopInstanceRequest>(rest) {
                // `Supervisor::stop` looks the id up as given.
                let _ = ReplicaKey::parse(&r.instance_id);
            }
        }
        6 => {
            // The period is clamped, never refused.
            let _ = decode::<v1::WatchRequest>(rest);
        }
        8 => {
            if let Some(r) = decode::<v1::ProjectMemoryRequest>(rest) {
                project(r);
            }
        }
        _ => {
            if let Some(r) = decode::<v1::TailLogsRequest>(rest) {
                // `Supervisor::tail` looks the id up as given.
                let _ = ReplicaKey::parse(&r.instance_id);
            }
        }
    }
});
