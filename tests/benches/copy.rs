//! Model copy throughput with real processes, printed (not asserted): two
//! agents speaking mutual TLS on loopback and a controller; a file of
//! random bytes copied from halo1 to halo2 (`CopyModel`, as `haloctl
//! models copy` asks) next to a plain copy of the same file on the same
//! disk (`std::fs::copy` then fsync, as the agent fsyncs), with the ratio,
//! and the CPU time of the sending and the receiving agent per GiB (both
//! hash every byte; the sender reads, the receiver writes).
//!
//!     cargo bench -p tests --bench copy
//!
//! `HALO_BENCH_SMOKE=1`: an 8 MiB file, one run.

use proto::v1;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};
use tests::cluster::{AgentNode, ControllerProc, connect, eventually, write_catalog};

/// CPU seconds (user + system) a process has used.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|x| x.parse().ok())
        .collect();
    // /proc counts in USER_HZ, 100 a second on Linux.
    f.iter().sum::<u64>() as f64 / 100.0
}

fn pid(n: &AgentNode) -> u32 {
    n.proc.as_ref().expect("running").pid()
}

fn write_random(path: &Path, mib: u64) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for c in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&buf).expect("write");
    }
    f.into_inner().expect("flush").sync_all().expect("sync");
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let (mib, runs) = if tests::smoke() { (8, 1) } else { (512, 3) };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut halo1 = AgentNode::new(dir.path(), "halo1", &["speed"], 2);
    let mut halo2 = AgentNode::new(dir.path(), "halo2", &["speed"], 2);
    let src = halo1.models.join("big.gguf");
    write_random(&src, mib);
    halo1.start();
    halo2.start();
    let catalog = dir.path().join("catalog.toml");
    write_catalog(
        &catalog,
        "[[models]]\nname = \"big\"\nmodel_id = \"big.gguf\"\nmodes = [\"ask\"]\n",
    );
    let args = vec![
        "--store-path".to_owned(),
        dir.path().join("state.json").display().to_string(),
        "--node".to_owned(),
        format!("halo1={},halo2={}", halo1.address(), halo2.address()),
        "--catalog".to_owned(),
        catalog.display().to_string(),
    ];
    let mut ctl = ControllerProc::new(dir.path(), "controller", &args);
    ctl.start();
    let c = connect(&ctl.url()).await;
    let listed = eventually(Duration::from_secs(30), || {
        let mut c = c.clone();
        async move {
            let e = c.list_catalog(v1::ListCatalogRequest {}).await.ok()?;
            let e = e.into_inner().entries;
            (e.first()?.nodes.iter().any(|n| n == "halo1") && halo2_connected(&mut c).await)
                .then_some(())
        }
    })
    .await;
    assert!(listed.is_some(), "the controller never listed big on halo1");

    let bytes = mib << 20;
    let gib = bytes as f64 / f64::from(1u32 << 30);
    for run in 1..=runs {
        let dest = halo2.models.join("big.gguf");
        let _ = std::fs::remove_file(&dest);
        let (s0, r0) = (cpu_secs(pid(&halo1)), cpu_secs(pid(&halo2)));
        let t0 = Instant::now();
        let mut stream = c
            .clone()
            .copy_model(v1::CopyModelRequest {
                model: "big".into(),
                to_node: "halo2".into(),
                from_node: String::new(),
            })
            .await
            .expect("copy")
            .into_inner();
        let mut last = None;
        while let Some(p) = stream.message().await.expect("progress") {
            last = Some(p);
        }
        let copy_secs = t0.elapsed().as_secs_f64();
        let last = last.expect("a result");
        assert_eq!(last.state, v1::CopyState::Done as i32, "{last:?}");
        let (s1, r1) = (cpu_secs(pid(&halo1)), cpu_secs(pid(&halo2)));

        let plain = dir.path().join("plain.copy");
        let t0 = Instant::now();
        std::fs::copy(&src, &plain).expect("cp");
        std::fs::File::open(&plain)
            .and_then(|f| f.sync_all())
            .expect("fsync");
        let cp_secs = t0.elapsed().as_secs_f64();
        std::fs::remove_file(&plain).expect("rm");

        let mibs = |secs: f64| mib as f64 / secs;
        println!(
            "copy run {run}: {mib} MiB in {copy_secs:.2} s = {:.0} MiB/s (agent's own clock \
             {} ms); cp + fsync {cp_secs:.2} s = {:.0} MiB/s; copy / cp throughput {:.2}; \
             CPU per GiB: sender {:.2} s, receiver {:.2} s",
            mibs(copy_secs),
            last.elapsed_ms,
            mibs(cp_secs),
            cp_secs / copy_secs,
            (s1 - s0) / gib,
            (r1 - r0) / gib,
        );
    }
}

/// Whether the controller sees halo2's agent.
async fn halo2_connected(c: &mut tests::cluster::Client) -> bool {
    c.list_nodes(v1::ListNodesRequest {})
        .await
        .map(|r| {
            r.into_inner().nodes.iter().any(|n| {
                n.node.as_ref().is_some_and(|i| i.name == "halo2")
                    && n.status == v1::NodeStatus::Ready as i32
            })
        })
        .unwrap_or(false)
}
