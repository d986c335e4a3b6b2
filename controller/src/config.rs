//! The controller's configuration: a TOML file (`--config`),
//! `HALO_CONTROLLER_*` environment variables and flags, precedence file <
//! env < flag (clap merges env and flag; [`Config::resolve`] lays them over
//! the file). Everything, including the catalog file, is read and validated
//! before a socket is bound; each error is one line naming the key.

use crate::observe::{NodeConfig, Timing};
use crate::store::etcd::{EtcdIdentity, EtcdTls};
use clap::Parser;
pub use proto::config::ConfigError;
use proto::config::{TomlErrors, invalid, read_toml};
use proto::domain::CatalogEntry;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default gRPC listen address (loopback; a mesh address needs TLS).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7300";
/// Default embedded store file.
pub const DEFAULT_STORE_PATH: &str = "/var/lib/halo-controller/state.json";

/// Command line of `halo-controller`. Every option is also an environment
/// variable and a key of the `--config` file (same name, `_` for `-`).
#[derive(Debug, Default, Parser)]
#[command(
    name = "halo-controller",
    version,
    args_override_self = true,
    about = "halo's controller: desired state, placement by memory, reconcile, failover"
)]
pub struct Args {
    /// TOML config file; flags and env vars override its keys.
    #[arg(long, env = "HALO_CONTROLLER_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// gRPC listen address [default: 127.0.0.1:7300].
    #[arg(long, env = "HALO_CONTROLLER_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,
    /// This controller's id in leader election [default: host name and pid].
    #[arg(long, env = "HALO_CONTROLLER_ID")]
    pub id: Option<String>,
    /// etcd client URLs; when set, desired state lives in etcd and several
    /// controllers elect a leader. Repeat or comma-separate.
    #[arg(long = "etcd", env = "HALO_CONTROLLER_ETCD", value_delimiter = ',')]
    pub etcd: Option<Vec<String>>,
    /// The CA (PEM) that signed etcd's server certificate: required with
    /// https:// etcd URLs, refused with http:// ones.
    #[arg(long, env = "HALO_CONTROLLER_ETCD_CA", value_name = "PEM")]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) shown to etcd, for an etcd started with
    /// --client-cert-auth; with etcd_key and etcd_ca [default: none].
    #[arg(long, env = "HALO_CONTROLLER_ETCD_CERT", value_name = "PEM")]
    pub etcd_cert: Option<PathBuf>,
    /// The etcd client certificate's private key (PEM).
    #[arg(long, env = "HALO_CONTROLLER_ETCD_KEY", value_name = "PEM")]
    pub etcd_key: Option<PathBuf>,
    /// Embedded store file, used when no etcd is given
    /// [default: /var/lib/halo-controller/state.json].
    #[arg(long, env = "HALO_CONTROLLER_STORE_PATH", value_name = "FILE")]
    pub store_path: Option<PathBuf>,
    /// Nodes as NAME=HOST:PORT (the agent's address); repeat or comma-separate.
    #[arg(long = "node", env = "HALO_CONTROLLER_NODES", value_delimiter = ',')]
    pub nodes: Option<Vec<String>>,
    /// Catalog file (TOML, `[[models]]` entries), written to the store at start.
    #[arg(long, env = "HALO_CONTROLLER_CATALOG", value_name = "FILE")]
    pub catalog: Option<PathBuf>,
    /// Silence after which a node is unreachable, ms [default: 2000]: four
    /// missed heartbeats, so a dead agent is seen within 3 s.
    #[arg(long, env = "HALO_CONTROLLER_GRACE_MS", value_name = "MS")]
    pub grace_ms: Option<u64>,
    /// Silence after which floating placements leave a node, s [default: 30]:
    /// longer than an agent restart or a network blip (which must move
    /// nothing), short next to the tens of seconds a big model takes to load.
    #[arg(long, env = "HALO_CONTROLLER_MOVE_AFTER_SECS", value_name = "SECS")]
    pub move_after_secs: Option<u64>,
    /// Memory sample period asked of agents, the heartbeat, ms [default: 500].
    #[arg(long, env = "HALO_CONTROLLER_HEARTBEAT_MS", value_name = "MS")]
    pub heartbeat_ms: Option<u64>,
    /// Reconcile at least this often, ms [default: 1000].
    #[arg(long, env = "HALO_CONTROLLER_REQUEUE_MS", value_name = "MS")]
    pub requeue_ms: Option<u64>,
    /// etcd leader lease, s [default: 5]: a paused or cut-off leader stops
    /// acting within this time, and another takes over.
    #[arg(long, env = "HALO_CONTROLLER_LEASE_SECS", value_name = "SECS")]
    pub lease_secs: Option<u64>,
    /// This daemon's certificate (PEM) for mutual TLS; with tls_key and
    /// tls_ca the gRPC server speaks only TLS, requires client certificates
    /// signed by tls_ca, and dials agents over TLS. Required unless
    /// --insecure-loopback-only.
    #[arg(long, env = "HALO_CONTROLLER_TLS_CERT", value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, env = "HALO_CONTROLLER_TLS_KEY", value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
    /// The CA (PEM) that signs every halo certificate (`haloctl certs init`).
    #[arg(long, env = "HALO_CONTROLLER_TLS_CA", value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,
    /// Serve and dial agents in plaintext, without TLS: refused unless the
    /// listen address and every node's address are loopback (a local
    /// cluster on one machine). Anything else needs tls_cert/key/ca.
    #[arg(long, env = "HALO_CONTROLLER_INSECURE_LOOPBACK_ONLY")]
    pub insecure_loopback_only: bool,
    /// Serve Prometheus metrics at /metrics on this address; off when
    /// unset. Plain HTTP on loopback only; elsewhere HTTPS with this
    /// controller's certificate, a client certificate from tls_ca required.
    #[arg(long, env = "HALO_CONTROLLER_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileNode {
    name: String,
    address: String,
    #[serde(default)]
    roles: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    id: Option<String>,
    etcd: Option<Vec<String>>,
    etcd_ca: Option<PathBuf>,
    etcd_cert: Option<PathBuf>,
    etcd_key: Option<PathBuf>,
    store_path: Option<PathBuf>,
    nodes: Option<Vec<FileNode>>,
    catalog: Option<PathBuf>,
    grace_ms: Option<u64>,
    move_after_secs: Option<u64>,
    heartbeat_ms: Option<u64>,
    requeue_ms: Option<u64>,
    lease_secs: Option<u64>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_ca: Option<PathBuf>,
    insecure_loopback_only: Option<bool>,
    metrics_listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    #[serde(default)]
    models: Vec<CatalogEntry>,
}

/// Where desired state lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// etcd.
    Etcd {
        /// Client URLs, all http:// or all https://.
        endpoints: Vec<String>,
        /// TLS, with https:// endpoints.
        tls: Option<EtcdTls>,
    },
    /// The embedded file.
    File(PathBuf),
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Election id.
    pub id: String,
    /// Store.
    pub store: StoreConfig,
    /// Nodes.
    pub nodes: Vec<NodeConfig>,
    /// Catalog entries from the catalog file.
    pub catalog: Vec<CatalogEntry>,
    /// Liveness timing.
    pub timing: Timing,
    /// Requeue period.
    pub requeue: Duration,
    /// Leader lease.
    pub lease: Duration,
    /// Mutual TLS files, when configured (all three were set).
    pub tls: Option<proto::tls::TlsFiles>,
    /// Where `/metrics` is served, when `metrics_listen` is set (HTTPS
    /// with client certificates when `tls` is set, else loopback only).
    pub metrics_listen: Option<SocketAddr>,
}

fn parse_node(s: &str) -> Result<NodeConfig, ConfigError> {
    let (name, address) = s
        .split_once('=')
        .ok_or_else(|| invalid("nodes", format!("`{s}` is not NAME=HOST:PORT")))?;
    Ok(NodeConfig {
        name: name.trim().to_owned(),
        address: address.trim().to_owned(),
        roles: Vec::new(),
    })
}

/// TLS towards etcd from its three keys: `etcd_ca` goes with https://
/// endpoints (all of them) and only with them, `etcd_cert` with `etcd_key`;
/// the files are read and checked here.
fn etcd_tls(
    endpoints: &[String],
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
) -> Result<Option<EtcdTls>, ConfigError> {
    if endpoints.is_empty() {
        return match (&ca, &cert, &key) {
            (None, None, None) => Ok(None),
            _ => Err(invalid(
                "etcd_ca",
                "etcd_ca, etcd_cert and etcd_key need etcd endpoints",
            )),
        };
    }
    let plain = endpoints.iter().find(|e| e.starts_with("http://"));
    let tls = endpoints.iter().find(|e| e.starts_with("https://"));
    if let (Some(p), Some(t)) = (plain, tls) {
        return Err(invalid(
            "etcd",
            format!("`{p}` is plaintext but `{t}` is TLS: use https:// for every endpoint"),
        ));
    }
    let identity = match (cert, key) {
        (None, None) => None,
        (Some(cert), Some(key)) => Some(EtcdIdentity { cert, key }),
        (Some(_), None) => return Err(invalid("etcd_key", "etcd_cert is set without etcd_key")),
        (None, Some(_)) => return Err(invalid("etcd_cert", "etcd_key is set without etcd_cert")),
    };
    let Some(ca) = ca else {
        if let Some(t) = tls {
            return Err(invalid(
                "etcd_ca",
                format!("`{t}` is https://: set etcd_ca to the CA that signed etcd's certificate"),
            ));
        }
        if identity.is_some() {
            return Err(invalid(
                "etcd_cert",
                "a client certificate needs etcd_ca and https:// etcd endpoints",
            ));
        }
        return Ok(None);
    };
    if let Some(p) = plain {
        return Err(invalid(
            "etcd_ca",
            format!("`{p}` is plaintext http://: use https:// with etcd_ca, or drop etcd_ca"),
        ));
    }
    let tls = EtcdTls { ca, identity };
    tls.client_config()
        .map_err(|e| invalid(e.key, e.to_string()))?;
    Ok(Some(tls))
}

fn millis(key: &'static str, v: u64, min: u64, max: u64) -> Result<Duration, ConfigError> {
    if !(min..=max).contains(&v) {
        return Err(invalid(key, format!("{v} is outside {min}-{max}")));
    }
    Ok(Duration::from_millis(v))
}

impl Config {
    /// Merges file, env and flags, reads the catalog file and validates.
    ///
    /// The steps, in the order their errors are reported: listen address
    /// and election id; the store (etcd with its TLS, or the file); the
    /// nodes; the catalog file; timings; mutual TLS.
    pub fn resolve(args: Args) -> Result<Config, ConfigError> {
        let file: FileConfig = match &args.config {
            Some(p) => read_toml(p, TomlErrors::Report)?,
            None => FileConfig::default(),
        };
        let listen_text = args
            .listen
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
        let listen: SocketAddr = listen_text
            .parse()
            .map_err(|_| invalid("listen", format!("`{listen_text}` is not host:port")))?;
        let id = args.id.or(file.id).unwrap_or_else(default_id);
        let store = store(
            args.etcd.or(file.etcd).unwrap_or_default(),
            (
                args.etcd_ca.or(file.etcd_ca),
                args.etcd_cert.or(file.etcd_cert),
                args.etcd_key.or(file.etcd_key),
            ),
            args.store_path.or(file.store_path),
        )?;
        let nodes = nodes(args.nodes, file.nodes)?;
        let catalog = match args.catalog.or(file.catalog) {
            Some(p) => read_catalog(&p)?,
            None => Vec::new(),
        };
        let (timing, requeue, lease) = timings(
            args.grace_ms.or(file.grace_ms),
            args.heartbeat_ms.or(file.heartbeat_ms),
            args.move_after_secs.or(file.move_after_secs),
            args.requeue_ms.or(file.requeue_ms),
            args.lease_secs.or(file.lease_secs),
        )?;
        let tls = tls(
            (
                args.tls_cert.or(file.tls_cert),
                args.tls_key.or(file.tls_key),
                args.tls_ca.or(file.tls_ca),
            ),
            args.insecure_loopback_only || file.insecure_loopback_only.unwrap_or(false),
            listen,
            &nodes,
        )?;
        let metrics_listen =
            metrics_listen(args.metrics_listen.or(file.metrics_listen), tls.is_some())?;
        Ok(Config {
            metrics_listen,
            tls,
            listen,
            id,
            store,
            nodes,
            catalog,
            timing,
            requeue,
            lease,
        })
    }
}

/// Checks `metrics_listen`: an address, plain HTTP only on loopback
/// unless the controller has its mutual TLS (`tls`).
fn metrics_listen(text: Option<String>, tls: bool) -> Result<Option<SocketAddr>, ConfigError> {
    let Some(text) = text.filter(|l| !l.trim().is_empty()) else {
        return Ok(None);
    };
    let addr: SocketAddr = text.trim().parse().map_err(|_| {
        invalid(
            "metrics_listen",
            format!("`{text}` is not an address such as 127.0.0.1:9300"),
        )
    })?;
    proto::metrics::check_listen(addr, tls).map_err(|e| invalid("metrics_listen", e))?;
    Ok(Some(addr))
}

/// The election id by default: the host name and the pid.
fn default_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "controller".to_owned());
    format!("{host}-{}", std::process::id())
}

/// etcd when endpoints are given (http(s):// URLs, with the TLS its
/// `(etcd_ca, etcd_cert, etcd_key)` describe), else the file at
/// `store_path` (default [`DEFAULT_STORE_PATH`]), whose directory must
/// exist.
fn store(
    etcd: Vec<String>,
    (ca, cert, key): (Option<PathBuf>, Option<PathBuf>, Option<PathBuf>),
    store_path: Option<PathBuf>,
) -> Result<StoreConfig, ConfigError> {
    let etcd: Vec<String> = etcd.into_iter().filter(|e| !e.trim().is_empty()).collect();
    for e in &etcd {
        if !(e.starts_with("http://") || e.starts_with("https://")) {
            return Err(invalid("etcd", format!("`{e}` is not an http(s):// URL")));
        }
    }
    let etcd_tls = etcd_tls(&etcd, ca, cert, key)?;
    if !etcd.is_empty() {
        return Ok(StoreConfig::Etcd {
            endpoints: etcd,
            tls: etcd_tls,
        });
    }
    let p = store_path.unwrap_or_else(|| PathBuf::from(DEFAULT_STORE_PATH));
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() && !d.is_dir() => {
            return Err(invalid(
                "store_path",
                format!("directory {} does not exist", d.display()),
            ));
        }
        _ => {}
    }
    Ok(StoreConfig::File(p))
}

/// The nodes from flags or env (`NAME=HOST:PORT`), else the file's; each
/// with a valid name, a host:port address, listed once.
fn nodes(
    flags: Option<Vec<String>>,
    file: Option<Vec<FileNode>>,
) -> Result<Vec<NodeConfig>, ConfigError> {
    let nodes: Vec<NodeConfig> = match flags {
        Some(list) => list
            .iter()
            .filter(|s| !s.trim().is_empty())
            .map(|s| parse_node(s))
            .collect::<Result<_, _>>()?,
        None => file
            .unwrap_or_default()
            .into_iter()
            .map(|n| NodeConfig {
                name: n.name,
                address: n.address,
                roles: n.roles,
            })
            .collect(),
    };
    let mut seen = std::collections::BTreeSet::new();
    for n in &nodes {
        proto::domain::catalog::check_name("nodes", &n.name)
            .map_err(|e| invalid("nodes", e.to_string()))?;
        if n.address.parse::<SocketAddr>().is_err()
            && !n
                .address
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
        {
            return Err(invalid(
                "nodes",
                format!("{}: `{}` is not host:port", n.name, n.address),
            ));
        }
        if !seen.insert(n.name.clone()) {
            return Err(invalid(
                "nodes",
                format!("node `{}` is listed twice", n.name),
            ));
        }
    }
    Ok(nodes)
}

/// The catalog file's entries, each validated.
fn read_catalog(p: &Path) -> Result<Vec<CatalogEntry>, ConfigError> {
    let c: CatalogFile = read_toml(p, TomlErrors::Report)?;
    for e in &c.models {
        e.validate().map_err(|err| ConfigError::Parse {
            path: p.to_owned(),
            message: format!("model `{}`: {err}", e.name),
        })?;
    }
    Ok(c.models)
}

/// Liveness timing (heartbeat < grace < move-after), the requeue period
/// and the leader lease, each within its bounds or at its default.
fn timings(
    grace_ms: Option<u64>,
    heartbeat_ms: Option<u64>,
    move_after_secs: Option<u64>,
    requeue_ms: Option<u64>,
    lease_secs: Option<u64>,
) -> Result<(Timing, Duration, Duration), ConfigError> {
    let grace = millis("grace_ms", grace_ms.unwrap_or(2000), 100, 600_000)?;
    let heartbeat = millis("heartbeat_ms", heartbeat_ms.unwrap_or(500), 100, 3_600_000)?;
    if heartbeat >= grace {
        return Err(invalid(
            "heartbeat_ms",
            format!("{heartbeat:?} must be shorter than the grace period {grace:?}"),
        ));
    }
    let move_after = Duration::from_secs(move_after_secs.unwrap_or(30));
    if move_after <= grace {
        return Err(invalid(
            "move_after_secs",
            format!("{move_after:?} must be longer than the grace period {grace:?}"),
        ));
    }
    let requeue = millis("requeue_ms", requeue_ms.unwrap_or(1000), 50, 600_000)?;
    let lease_secs = lease_secs.unwrap_or(5);
    if !(2..=600).contains(&lease_secs) {
        return Err(invalid(
            "lease_secs",
            format!("{lease_secs} is outside 2-600"),
        ));
    }
    let timing = Timing {
        grace,
        move_after,
        heartbeat,
    };
    Ok((timing, requeue, Duration::from_secs(lease_secs)))
}

/// Mutual TLS from its three files (all or none, read and checked), and
/// plaintext only with `insecure_loopback_only` when `listen` and every
/// node's address are loopback.
fn tls(
    (cert, key, ca): (Option<PathBuf>, Option<PathBuf>, Option<PathBuf>),
    insecure: bool,
    listen: SocketAddr,
    nodes: &[NodeConfig],
) -> Result<Option<proto::tls::TlsFiles>, ConfigError> {
    let tls = proto::tls::TlsFiles::from_parts(cert, key, ca)
        .map_err(|e| invalid("tls", e.to_string()))?;
    if let Some(t) = &tls {
        t.check().map_err(|e| invalid("tls", e.to_string()))?;
    }
    let peers: Vec<(&str, &str)> = nodes
        .iter()
        .map(|n| (n.name.as_str(), n.address.as_str()))
        .collect();
    proto::transport::check(tls.is_some(), insecure, listen, &peers)
        .map_err(|e| invalid("tls", e))?;
    Ok(tls)
}
