//! Fuzzes the decode + validate path of every `ControllerService` request
//! and of the placements and catalog entries the controller reads back: the
//! first byte picks the message, the rest is decoded (prost, or for what
//! the store holds, JSON) and, when it decodes, checked the way the
//! controller checks it before acting (`CatalogEntry::try_from`, the place
//! request's checks, `Placement::try_from`). Hostile bytes must give a value
//! or an error, never a panic; what decodes must survive a re-encode, and
//! what validates must survive the wire and the store.
//!
//! Run from `controller/fuzz`: `cargo fuzz run controller_request` (nightly), or
//! on a stable toolchain `RUSTC_BOOTSTRAP=1 cargo fuzz run controller_request`.

#![no_main]

use controller::desired::{json, placement_key};
use controller::error::Error;
use libfuzzer_sys::fuzz_target;
use proto::domain::{CatalogEntry, InstanceOptions, Placement, ReplicaKey};
use proto::v1;
use std::collections::BTreeMap;

use proto::fuzz::decode;

/// The status a refused request is answered with (what the client sees).
fn answer(e: Error) {
    let _ = e.to_string();
    let status = tonic::Status::from(e);
    assert_ne!(status.code(), tonic::Code::Ok);
}

fn put_catalog_entry(r: v1::PutCatalogEntryRequest) {
    let Some(e) = r.entry else {
        return;
    };
    let e = match CatalogEntry::try_from(e) {
        Ok(e) => e,
        Err(e) => return answer(e.into()),
    };
    // `Desired::put_catalog` validates again before it writes.
    assert_eq!(e.validate(), Ok(()));
    // What the service answers, and what the store gives back.
    assert_eq!(
        CatalogEntry::try_from(v1::CatalogEntry::from(e.clone())).as_ref(),
        Ok(&e)
    );
    let stored: CatalogEntry = serde_json::from_str(&json(&e)).expect("stored entry reads back");
    assert_eq!(stored, e);
}

/// What the controller derives from a placement it holds: request ids
/// (parsed back when agents report them), the split's shares and the
/// options it sends to agents.
fn use_placement(p: &Placement) {
    let helpers = p.split.as_ref().map_or(0, |s| s.helpers().count());
    for r in &p.replicas {
        let key = p.key(r);
        let rid = key.request_id();
        let _ = ReplicaKey::parse(&rid);
        for k in 1..=helpers {
            let _ = ReplicaKey::parse(
                &key.helper(u32::try_from(k).unwrap_or(u32::MAX))
                    .request_id(),
            );
        }
    }
    if let Some(s) = &p.split {
        let _ = s.host();
        for share in &s.shares {
            let _ = share.fits();
            let _ = s.bytes_on(&share.node);
        }
    }
    let _ = InstanceOptions::try_from(v1::InstanceOptions::from(p.instance_options()));
    let _ = placement_key(&p.name);
}

fn placement(w: v1::Placement) {
    for r in &w.replicas {
        // haloctl and ListPlacements parse the ids they are given.
        let _ = ReplicaKey::parse(&r.request_id);
    }
    let p = match Placement::try_from(w) {
        Ok(p) => p,
        Err(e) => return answer(e.into()),
    };
    use_placement(&p);
    // A checked placement's request ids are the controller's own.
    for r in &p.replicas {
        let key = p.key(r);
        assert_eq!(ReplicaKey::parse(&key.request_id()), Some(key.clone()));
        let helper = key.helper(1);
        assert_eq!(ReplicaKey::parse(&helper.request_id()), Some(helper));
    }
    // It survives the wire and the store.
    assert_eq!(
        Placement::try_from(v1::Placement::from(p.clone())).as_ref(),
        Ok(&p)
    );
    let stored: Placement = serde_json::from_str(&json(&p)).expect("stored placement reads back");
    assert_eq!(stored, p);
}

fn place(r: v1::PlaceRequest) {
    let req = match controller::api::place_request(&r) {
        Ok(req) => req,
        Err(e) => return answer(e),
    };
    assert!((1..=64).contains(&req.replicas));
    // The decision itself is pure: with the model in the catalog and no
    // node to put it on, it is refused, with reasons.
    let mut catalog = BTreeMap::new();
    catalog.insert(req.model.clone(), CatalogEntry::new(&req.model, "m.gguf"));
    let d = controller::placement::place(&[], &[], &catalog, &req);
    assert!(!d.accepted && d.placement.is_none());
}

fn create_key(r: v1::CreateKeyRequest) {
    let k = match controller::keys::new_key_request(&r) {
        Ok(k) => k,
        Err(e) => return answer(e),
    };
    // What is stored reads back, and holds the hash, never the text.
    let rec = k.record("halo-fuzz", u64::MAX - 1);
    let json = json(&rec);
    assert!(!json.contains("halo-fuzz"));
    let stored: controller::keys::KeyRecord =
        serde_json::from_str(&json).expect("stored key reads back");
    assert_eq!(stored, rec);
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 20 {
        0 => {
            let _ = decode::<v1::ListNodesRequest>(rest);
        }
        1 => {
            let _ = decode::<v1::ListCatalogRequest>(rest);
        }
        2 => {
            if let Some(r) = decode::<v1::PutCatalogEntryRequest>(rest) {
                put_catalog_entry(r);
            }
        }
        3 => {
            let _ = decode::<v1::ListPlacementsRequest>(rest);
        }
        4 => {
            // Unknown models and nodes are looked up, not refused up front.
            let _ = decode::<v1::PlanRequest>(rest);
        }
        5 => {
            if let Some(r) = decode::<v1::PlaceRequest>(rest) {
                place(r);
            }
        }
        6 => {
            if let Some(r) = decode::<v1::UnplaceRequest>(rest) {
                assert!(placement_key(&r.name).ends_with(&r.name));
            }
        }
        7 => {
            let _ = decode::<v1::EndpointsRequest>(rest);
        }
        8 => {
            if let Some(r) = decode::<v1::WatchEventsRequest>(rest) {
                let events = controller::events::Events::default();
                events.emit("placed", "fuzz", "one");
                let (recent, _rx) = events.recent_and_subscribe(r.recent.map(|n| n as usize));
                assert!(recent.len() <= r.recent.map_or(1, |n| n as usize).min(1));
            }
        }
        9 => {
            // The placement and replica are looked up, not refused up front.
            let _ = decode::<v1::PlacementLogsRequest>(rest);
        }
        10 => {
            if let Some(p) = decode::<v1::Placement>(rest) {
                placement(p);
            }
        }
        11 => {
            // A placement as the store holds it (JSON), read back unchecked.
            if let Ok(p) = serde_json::from_slice::<Placement>(rest) {
                use_placement(&p);
                let _ = Placement::try_from(v1::Placement::from(p));
            }
        }
        12 => {
            let _ = decode::<v1::RoutesRequest>(rest);
        }
        13 => {
            if let Some(r) = decode::<v1::CreateKeyRequest>(rest) {
                create_key(r);
            }
        }
        14 => {
            let _ = decode::<v1::ListKeysRequest>(rest);
        }
        15 => {
            if let Some(r) = decode::<v1::RevokeKeyRequest>(rest) {
                match controller::keys::check_key_name(&r.name) {
                    Ok(()) => assert!(controller::keys::key_key(&r.name).ends_with(&r.name)),
                    Err(e) => answer(e),
                }
            }
        }
        16 => {
            // A user key as the store holds it, read back unchecked.
            if let Ok(k) = serde_json::from_slice::<controller::keys::KeyRecord>(rest) {
                assert!(k.to_wire(false).sha256.is_empty());
                let _ = k.to_wire(true);
            }
        }
        18 => {
            // A bench result: checked, kept as JSON, read back the same.
            if let Some(r) = decode::<v1::PutBenchResultRequest>(rest) {
                match controller::bench::put_request(r) {
                    Ok(res) => {
                        let key = controller::bench::result_key(&res);
                        assert!(key.starts_with(&controller::bench::model_prefix(&res.setup.model)));
                        let back: proto::domain::BenchResult =
                            serde_json::from_str(&json(&res)).expect("stored result reads back");
                        assert_eq!(back, res);
                    }
                    Err(e) => answer(e),
                }
            }
        }
        19 => {
            if let Some(r) = decode::<v1::ListBenchResultsRequest>(rest) {
                let _ = proto::domain::catalog::check_name("model", &r.model);
            }
        }
        _ => {
            // A catalog entry as the store holds it.
            if let Ok(e) = serde_json::from_slice::<CatalogEntry>(rest) {
                if e.validate().is_ok() {
                    assert_eq!(
                        CatalogEntry::try_from(v1::CatalogEntry::from(e.clone())).map(|_| ()),
                        Ok(())
                    );
                }
            }
        }
    }
});
