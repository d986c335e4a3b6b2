//! The store conformance suite: the behaviour halo relies on, checked the
//! same way against every backend (the tests crate runs it on a real etcd
//! and on the embedded file). Each check panics with what differed.

use super::{Compare, Event, Op, Store, StoreError};
use std::time::Duration;

/// How long a watch may take to deliver an event.
const WATCH_DEADLINE: Duration = Duration::from_secs(5);

fn put(key: &str, value: &str) -> Op {
    Op::Put {
        key: key.to_owned(),
        value: value.to_owned(),
    }
}

/// Runs every check under `prefix` (which must be empty).
pub async fn run<S: Store>(store: &S, prefix: &str) {
    create_only_if_absent(store, &format!("{prefix}create/")).await;
    update_compares_revision(store, &format!("{prefix}update/")).await;
    transactions_are_all_or_nothing(store, &format!("{prefix}txn/")).await;
    list_reads_one_prefix_at_a_revision(store, &format!("{prefix}list/")).await;
    watch_replays_from_a_revision_then_follows(store, &format!("{prefix}watch/")).await;
    compacted_watch_asks_for_a_relist(store, &format!("{prefix}compact/")).await;
}

async fn create_only_if_absent<S: Store>(s: &S, p: &str) {
    let k = format!("{p}a");
    let r1 = s
        .txn(vec![Compare::absent(&k)], vec![put(&k, "1")])
        .await
        .expect("create");
    let kv = s.get(&k).await.expect("get").expect("key exists");
    assert_eq!(kv.value, "1");
    assert_eq!(kv.mod_revision, r1, "mod_revision is the write's revision");
    assert_eq!(kv.create_revision, r1);
    match s.txn(vec![Compare::absent(&k)], vec![put(&k, "2")]).await {
        Err(StoreError::Conflict {
            key,
            expected,
            found,
        }) => {
            assert_eq!((key.as_str(), expected, found), (k.as_str(), 0, r1));
        }
        other => panic!("second create must conflict, got {other:?}"),
    }
    assert_eq!(s.get(&k).await.expect("get").expect("kept").value, "1");
    assert_eq!(s.get(&format!("{p}none")).await.expect("get"), None);
}

async fn update_compares_revision<S: Store>(s: &S, p: &str) {
    let k = format!("{p}a");
    let r1 = s
        .txn(vec![Compare::absent(&k)], vec![put(&k, "1")])
        .await
        .expect("create");
    let r2 = s
        .txn(vec![Compare::at(&k, r1)], vec![put(&k, "2")])
        .await
        .expect("update at the current revision");
    assert!(r2 > r1, "revisions increase: {r1} then {r2}");
    let kv = s.get(&k).await.expect("get").expect("exists");
    assert_eq!(
        (kv.value.as_str(), kv.create_revision, kv.mod_revision),
        ("2", r1, r2)
    );
    assert!(
        matches!(
            s.txn(vec![Compare::at(&k, r1)], vec![put(&k, "3")]).await,
            Err(StoreError::Conflict { found, .. }) if found == r2
        ),
        "a write at a stale revision conflicts"
    );
    let r3 = s
        .txn(
            vec![Compare::at(&k, r2)],
            vec![Op::Delete { key: k.clone() }],
        )
        .await
        .expect("conditional delete");
    assert!(r3 > r2);
    assert_eq!(s.get(&k).await.expect("get"), None);
}

async fn transactions_are_all_or_nothing<S: Store>(s: &S, p: &str) {
    let (a, b, guard) = (format!("{p}a"), format!("{p}b"), format!("{p}guard"));
    let rg = s
        .txn(vec![], vec![put(&guard, "leader-1")])
        .await
        .expect("guard");
    // A failing compare on the guard writes nothing.
    let err = s
        .txn(
            vec![Compare::absent(&a), Compare::at(&guard, rg + 1000)],
            vec![put(&a, "x"), put(&b, "y")],
        )
        .await;
    assert!(
        matches!(err, Err(StoreError::Conflict { ref key, .. }) if *key == guard),
        "{err:?}"
    );
    assert_eq!(s.get(&a).await.expect("get"), None);
    assert_eq!(s.get(&b).await.expect("get"), None);
    // Holding compares write both at one revision.
    let r = s
        .txn(
            vec![Compare::absent(&a), Compare::at(&guard, rg)],
            vec![put(&a, "x"), put(&b, "y")],
        )
        .await
        .expect("both");
    let ka = s.get(&a).await.expect("get").expect("a");
    let kb = s.get(&b).await.expect("get").expect("b");
    assert_eq!((ka.mod_revision, kb.mod_revision), (r, r));
}

async fn list_reads_one_prefix_at_a_revision<S: Store>(s: &S, p: &str) {
    let mut last = 0;
    for k in ["c", "a", "b"] {
        last = s
            .txn(vec![], vec![put(&format!("{p}in/{k}"), k)])
            .await
            .expect("put");
    }
    s.txn(vec![], vec![put(&format!("{p}out/z"), "z")])
        .await
        .expect("put");
    let (kvs, rev) = s.list(&format!("{p}in/")).await.expect("list");
    let keys: Vec<&str> = kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(
        keys,
        [format!("{p}in/a"), format!("{p}in/b"), format!("{p}in/c")],
        "sorted, prefix only"
    );
    assert!(
        rev > last,
        "list revision {rev} covers the last write {last}"
    );
}

async fn next_events(w: &mut super::Watch, n: usize) -> Vec<Event> {
    let mut out = Vec::new();
    while out.len() < n {
        match tokio::time::timeout(WATCH_DEADLINE, w.next()).await {
            Ok(Some(Ok(batch))) => out.extend(batch),
            Ok(Some(Err(e))) => panic!("watch failed: {e}"),
            Ok(None) => panic!("watch ended after {} of {n} events", out.len()),
            Err(_) => panic!(
                "watch delivered {} of {n} events in {WATCH_DEADLINE:?}",
                out.len()
            ),
        }
    }
    out
}

async fn watch_replays_from_a_revision_then_follows<S: Store>(s: &S, p: &str) {
    let a = format!("{p}a");
    let r1 = s.txn(vec![], vec![put(&a, "1")]).await.expect("put");
    let r2 = s.txn(vec![], vec![put(&a, "2")]).await.expect("put");
    // From r2: only the second write, then what follows.
    let mut w = s.watch(p, r2).await.expect("watch");
    let first = next_events(&mut w, 1).await;
    assert!(
        matches!(&first[0], Event::Put(kv) if kv.value == "2" && kv.mod_revision == r2),
        "{first:?}"
    );
    let r3 = s
        .txn(vec![], vec![Op::Delete { key: a.clone() }])
        .await
        .expect("delete");
    s.txn(vec![], vec![put(&format!("/elsewhere{p}x"), "x")])
        .await
        .expect("put elsewhere");
    let r4 = s
        .txn(vec![], vec![put(&format!("{p}b"), "b")])
        .await
        .expect("put");
    let more = next_events(&mut w, 2).await;
    assert_eq!(
        more[0],
        Event::Delete {
            key: a.clone(),
            revision: r3
        }
    );
    assert!(
        matches!(&more[1], Event::Put(kv) if kv.key == format!("{p}b") && kv.mod_revision == r4),
        "other prefixes are filtered out: {more:?}"
    );
    assert!(r1 < r2);
}

async fn compacted_watch_asks_for_a_relist<S: Store>(s: &S, p: &str) {
    let a = format!("{p}a");
    let r1 = s.txn(vec![], vec![put(&a, "1")]).await.expect("put");
    let r2 = s.txn(vec![], vec![put(&a, "2")]).await.expect("put");
    let r3 = s.txn(vec![], vec![put(&a, "3")]).await.expect("put");
    s.compact(r3).await.expect("compact");
    let err = match s.watch(p, r1).await {
        Err(e) => e,
        Ok(mut w) => match tokio::time::timeout(WATCH_DEADLINE, w.next()).await {
            Ok(Some(Err(e))) => e,
            other => panic!("watch from a compacted revision must fail, got {other:?}"),
        },
    };
    assert!(
        matches!(err, StoreError::Compacted { compact_revision, .. } if compact_revision >= r2),
        "{err:?}"
    );
    // The recovery: list, then watch from the list's revision + 1.
    let (kvs, rev) = s.list(p).await.expect("relist");
    assert_eq!(kvs.len(), 1);
    assert_eq!(kvs[0].value, "3");
    let mut w = s.watch(p, rev + 1).await.expect("watch after relist");
    let r4 = s.txn(vec![], vec![put(&a, "4")]).await.expect("put");
    let ev = next_events(&mut w, 1).await;
    assert!(
        matches!(&ev[0], Event::Put(kv) if kv.value == "4" && kv.mod_revision == r4),
        "{ev:?}"
    );
}
