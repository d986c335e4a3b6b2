//! Bench results `haloctl bench` measured: kept as JSON under [`BENCH`]
//! (`bench/MODEL/AT-NODE`, one record per node and run, so a model's
//! history is one prefix read), at most [`MAX_PER_MODEL`] per model (the
//! oldest go first). Writes are the leader's, like every desired-state
//! write; a record says what it depends on ([`BenchSetup`]) and is never
//! merged with another.
//!
//! [`BenchSetup`]: proto::domain::BenchSetup

use crate::desired::{Desired, json};
use crate::error::Error;
use crate::store::{BENCH, Compare, Op, Store};
use proto::domain::BenchResult;
use proto::v1;

/// Most results kept per model.
pub const MAX_PER_MODEL: usize = 200;

/// The prefix of `model`'s results.
pub fn model_prefix(model: &str) -> String {
    format!("{BENCH}{model}/")
}

/// The store key of a result: ordered by time within its model.
pub fn result_key(r: &BenchResult) -> String {
    format!(
        "{}{:020}-{}",
        model_prefix(&r.setup.model),
        r.at_unix_ms,
        r.setup.node
    )
}

/// The checks `PutBenchResult` makes before anything is written. Pure.
pub fn put_request(r: v1::PutBenchResultRequest) -> Result<BenchResult, Error> {
    let w = r
        .result
        .ok_or_else(|| Error::InvalidArgument("result is required".into()))?;
    Ok(BenchResult::try_from(w)?)
}

/// Keeps a result (leader only), dropping the model's oldest beyond
/// [`MAX_PER_MODEL`] in the same write.
pub async fn put(desired: &Desired, r: &BenchResult) -> Result<(), Error> {
    if desired.leadership().term().is_none() {
        return Err(Error::NotLeader);
    }
    let key = result_key(r);
    let (existing, _) = desired.store().list(&model_prefix(&r.setup.model)).await?;
    let mut compares = vec![Compare::absent(&key)];
    let mut ops = vec![Op::Put {
        key: key.clone(),
        value: json(r),
    }];
    // Keys sort by time: the first ones are the oldest.
    let excess = (existing.len() + 1).saturating_sub(MAX_PER_MODEL);
    for kv in existing.iter().take(excess) {
        compares.push(Compare::at(&kv.key, kv.mod_revision));
        ops.push(Op::Delete {
            key: kv.key.clone(),
        });
    }
    match desired.write(compares, ops).await {
        Err(Error::Conflict(_)) => Err(Error::Conflict(format!(
            "another bench result of `{}` on {} was kept at the same time; retry",
            r.setup.model, r.setup.node
        ))),
        r => r.map(drop),
    }
}

/// The kept results of `model` (every model when empty), oldest first
/// within a model.
pub async fn list(desired: &Desired, model: &str) -> Result<Vec<BenchResult>, Error> {
    let prefix = if model.is_empty() {
        BENCH.to_owned()
    } else {
        proto::domain::catalog::check_name("model", model)?;
        model_prefix(model)
    };
    let (kvs, _) = desired.store().list(&prefix).await?;
    kvs.iter()
        .map(|kv| {
            serde_json::from_str::<BenchResult>(&kv.value).map_err(|e| Error::Corrupt {
                key: kv.key.clone(),
                reason: e.to_string(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::leader::Leadership;
    use crate::store::AnyStore;
    use crate::store::file::FileStore;
    use proto::domain::{BenchPoint, BenchSetup, Spread};

    fn result(model: &str, node: &str, at: u64) -> BenchResult {
        let s = Spread::of(&[10.0]);
        BenchResult {
            setup: BenchSetup {
                model: model.into(),
                model_id: format!("{model}.gguf"),
                node: node.into(),
                context_size: 512,
                slots: 1,
                flash_attention: "auto".into(),
                ..BenchSetup::default()
            },
            placement: model.into(),
            at_unix_ms: at,
            points: vec![BenchPoint {
                concurrency: 1,
                prompt_tokens: 8,
                gen_tokens: 8,
                runs: 1,
                pp: s,
                tg: s,
                ttft_ms: s,
                ..BenchPoint::default()
            }],
        }
    }

    #[tokio::test]
    async fn results_are_kept_per_model_oldest_dropped_beyond_the_limit_and_only_by_the_leader() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = FileStore::open(&dir.path().join("s.json")).expect("store");
        let leadership = Leadership::new("c1");
        let desired = Desired::new(AnyStore::File(file.clone()), leadership.clone());
        assert!(matches!(
            put(&desired, &result("tiny", "halo1", 1)).await,
            Err(Error::NotLeader)
        ));
        leadership.claim(&file).await.expect("claim");
        for at in 1..=(MAX_PER_MODEL as u64 + 2) {
            put(&desired, &result("tiny", "halo1", at))
                .await
                .expect("put");
        }
        put(&desired, &result("tiny-2", "halo2", 5))
            .await
            .expect("put");
        let tiny = list(&desired, "tiny").await.expect("list");
        assert_eq!(tiny.len(), MAX_PER_MODEL);
        assert_eq!(tiny[0].at_unix_ms, 3, "the oldest two are dropped");
        assert_eq!(
            tiny.last().map(|r| r.at_unix_ms),
            Some(MAX_PER_MODEL as u64 + 2)
        );
        assert_eq!(list(&desired, "tiny-2").await.expect("list").len(), 1);
        assert_eq!(
            list(&desired, "").await.expect("all").len(),
            MAX_PER_MODEL + 1
        );
        assert!(matches!(
            list(&desired, "../x").await,
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn the_fuzz_seed_is_a_valid_result() {
        use prost::Message;
        let seed = include_bytes!("../fuzz/corpus/controller_request/seed-put-bench-result");
        let r = v1::PutBenchResultRequest::decode(&seed[1..]).expect("decodes");
        let res = put_request(r).expect("valid");
        assert_eq!(res.points[0].tg.median, 47.1);
        assert_eq!(
            result_key(&res),
            "/halo/v1/bench/qwen3-coder-30b/00000001780000000000-strix-1"
        );
    }
}
