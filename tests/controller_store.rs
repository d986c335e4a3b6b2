//! The store conformance suite (`controller::store::conformance`) on both
//! backends: a real etcd started for the test, and the embedded file store.

use controller::store::etcd::EtcdStore;
use controller::store::file::FileStore;
use controller::store::{Compare, Op, Store, conformance};
use tests::cluster::Etcd;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_conformance_holds_on_a_real_etcd() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::start(dir.path(), "conformance");
    let store = EtcdStore::connect(std::slice::from_ref(&etcd.endpoint))
        .await
        .expect("connect to etcd");
    conformance::run(&store, "/halo-test/conformance/").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_conformance_holds_on_the_embedded_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = FileStore::open(&dir.path().join("state.json")).expect("open");
    conformance::run(&store, "/halo-test/conformance/").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_reopens_with_every_acknowledged_write_and_refuses_a_second_opener() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.json");
    let store = FileStore::open(&path).expect("open");
    let mut last = 0;
    for i in 0..20 {
        last = store
            .txn(
                vec![Compare::absent(&format!("/k/{i}"))],
                vec![Op::Put {
                    key: format!("/k/{i}"),
                    value: i.to_string(),
                }],
            )
            .await
            .expect("write");
    }
    let second = FileStore::open(&path);
    assert!(second.is_err(), "a second opener must be refused");
    drop(store);
    let reopened = FileStore::open(&path).expect("reopen");
    let (kvs, rev) = reopened.list("/k/").await.expect("list");
    assert_eq!(kvs.len(), 20);
    assert_eq!(rev, last, "the revision survives");
    // Watch history does not: an older start asks for a re-list.
    assert!(reopened.watch("/k/", 1).await.is_err());
}
