//! The etcd backend, through halo's own small etcd v3 client ([`client`]):
//! transactions compare `mod_revision` (0 = absent, which etcd spells the
//! same way), lists read a prefix at one revision, watches start at a
//! revision and report a compacted start as [`StoreError::Compacted`].
//!
//! TLS ([`EtcdTls`]) is opt-in: `https://` endpoints, etcd's certificate
//! verified against one CA, and a client certificate when etcd requires
//! one (`--client-cert-auth`). A handshake etcd refuses is reported as one
//! line that says it is a TLS problem and what to check, at connect time
//! rather than as a store that never answers.

pub mod client;

use super::{Compare, Event, KeyValue, Op, Store, StoreError, Watch};
use client::{ConnectOptions, EtcdClient, EtcdError, EventType};
use proto::etcd::etcdserverpb::TxnRequest;
use proto::tls::{TlsError, read_cert_pem, read_key_pem};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::mpsc;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// Deadline of every etcd request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline of connecting.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// A store on an etcd cluster.
#[derive(Clone)]
pub struct EtcdStore {
    client: EtcdClient,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore").finish_non_exhaustive()
    }
}

/// TLS towards etcd (the `etcd_ca`, `etcd_cert` and `etcd_key` keys):
/// the CA that verifies etcd's server certificate and, for etcd's
/// `--client-cert-auth`, a client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTls {
    /// The CA (PEM) that signed etcd's server certificate.
    pub ca: PathBuf,
    /// The client certificate shown to etcd, if any.
    pub identity: Option<EtcdIdentity>,
}

/// A client certificate for etcd and its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdIdentity {
    /// The certificate (chain), PEM.
    pub cert: PathBuf,
    /// Its private key, PEM.
    pub key: PathBuf,
}

/// A TLS file for etcd that cannot be used. Displays as one line naming
/// the file.
#[derive(Debug, thiserror::Error)]
#[error("{}: {reason}", path.display())]
pub struct EtcdTlsError {
    /// The config key: `etcd_ca`, `etcd_cert` or `etcd_key`.
    pub key: &'static str,
    /// The file.
    pub path: PathBuf,
    /// What is wrong with it.
    pub reason: String,
}

/// Reads one of the etcd TLS files with `read` (proto's certificate or key
/// reader), naming the config key on failure.
fn read_pem(
    key: &'static str,
    path: &Path,
    read: fn(&Path) -> Result<Vec<u8>, TlsError>,
) -> Result<Vec<u8>, EtcdTlsError> {
    read(path).map_err(|e| EtcdTlsError {
        key,
        path: path.to_owned(),
        reason: match e {
            TlsError::Read { source, .. } => source.to_string(),
            TlsError::NotPem { kind, .. } => format!("no PEM {kind} in it"),
            other => other.to_string(),
        },
    })
}

/// Whether tonic/rustls accept `config` (a connector is built and dropped).
fn accepted(config: &ClientTlsConfig) -> Result<(), String> {
    Endpoint::from_static("https://etcd.invalid")
        .tls_config(config.clone())
        .map(drop)
        .map_err(|e| proto::error_chain(&e))
}

impl EtcdTls {
    /// The same material as a rustls client config (ring, h2), for
    /// [`client::handshake_refusal`].
    fn rustls_config(&self) -> Result<rustls::ClientConfig, String> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&self.ca).map_err(|e| e.to_string())? {
            roots
                .add(c.map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
        let mut config = match &self.identity {
            Some(id) => {
                let certs = CertificateDer::pem_file_iter(&id.cert)
                    .map_err(|e| e.to_string())?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| e.to_string())?;
                let key = PrivateKeyDer::from_pem_file(&id.key).map_err(|e| e.to_string())?;
                builder
                    .with_client_auth_cert(certs, key)
                    .map_err(|e| e.to_string())?
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }

    /// Reads the files and builds the client TLS config. Each file must
    /// hold PEM of its kind that rustls accepts (the CA as a trust anchor,
    /// the certificate with its key); handshakes time out after
    /// [`CONNECT_TIMEOUT`].
    pub fn client_config(&self) -> Result<ClientTlsConfig, EtcdTlsError> {
        let ca = read_pem("etcd_ca", &self.ca, read_cert_pem)?;
        let ca_error = |reason: String| EtcdTlsError {
            key: "etcd_ca",
            path: self.ca.clone(),
            reason,
        };
        let mut anchors = rustls::RootCertStore::empty();
        for der in rustls::pki_types::pem::PemObject::pem_slice_iter(&ca) {
            let der: rustls::pki_types::CertificateDer<'_> =
                der.map_err(|e| ca_error(format!("bad PEM: {e}")))?;
            anchors
                .add(der)
                .map_err(|e| ca_error(format!("not a usable CA certificate: {e}")))?;
        }
        let mut config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&ca))
            .timeout(CONNECT_TIMEOUT);
        accepted(&config).map_err(ca_error)?;
        if let Some(id) = &self.identity {
            let cert = read_pem("etcd_cert", &id.cert, read_cert_pem)?;
            let key = read_pem("etcd_key", &id.key, read_key_pem)?;
            config = config.identity(Identity::from_pem(cert, key));
            accepted(&config).map_err(|reason| EtcdTlsError {
                key: "etcd_cert",
                path: id.cert.clone(),
                reason: format!("with key {}: {reason}", id.key.display()),
            })?;
        }
        Ok(config)
    }
}

fn unavailable(e: EtcdError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn rev(r: i64) -> u64 {
    u64::try_from(r).unwrap_or(0)
}

fn irev(r: u64) -> i64 {
    i64::try_from(r).unwrap_or(i64::MAX)
}

fn to_kv(kv: &client::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(&kv.key).into_owned(),
        value: String::from_utf8_lossy(&kv.value).into_owned(),
        create_revision: rev(kv.create_revision),
        mod_revision: rev(kv.mod_revision),
    }
}

/// Reads one key to see whether etcd accepts this client's TLS: a refused
/// handshake is an error; any other failure is logged and left to the
/// callers' retries. etcd checks a TLS 1.3 client certificate only after
/// the client has finished its side of the handshake, and the alert it
/// sends can be lost to the reset that follows the HTTP/2 preface the
/// client already wrote; so after a failure that does not look like TLS,
/// each endpoint also gets a bare handshake that sends nothing
/// ([`client::handshake_refusal`]).
async fn probe(client: &EtcdClient, endpoints: &[String], tls: &EtcdTls) -> Result<(), StoreError> {
    let failure = match tokio::time::timeout(REQUEST_TIMEOUT, client.get(super::LEADER)).await {
        Ok(Ok(_)) => return Ok(()),
        Ok(Err(e)) if e.is_tls() => return Err(unavailable(e)),
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("no answer in {REQUEST_TIMEOUT:?}"),
    };
    let config = std::sync::Arc::new(
        tls.rustls_config()
            .map_err(|e| StoreError::Unavailable(format!("etcd TLS: {e}")))?,
    );
    let eps = endpoints.to_vec();
    let check = tokio::task::spawn_blocking(move || {
        eps.iter().find_map(|e| {
            client::handshake_refusal(e, config.clone(), CONNECT_TIMEOUT)
                .map(|why| (e.clone(), why))
        })
    });
    if let Ok(Ok(Some((endpoint, why)))) = tokio::time::timeout(REQUEST_TIMEOUT, check).await {
        return Err(StoreError::Unavailable(format!(
            "etcd at {endpoint}: TLS with etcd failed: {why}"
        )));
    }
    tracing::warn!("etcd not reachable yet: {failure}");
    Ok(())
}

impl EtcdStore {
    /// Connects to `endpoints` (`http://host:port`), balanced over all of
    /// them; connections open lazily, so an unreachable etcd shows up as
    /// operations failing with [`StoreError::Unavailable`].
    pub async fn connect(endpoints: &[String]) -> Result<EtcdStore, StoreError> {
        EtcdStore::connect_with(endpoints, None).await
    }

    /// Like [`EtcdStore::connect`], over TLS when `tls` is given
    /// (`https://` endpoints). With TLS, one read is made at once: a
    /// handshake etcd refuses (wrong CA, missing or unknown client
    /// certificate) fails here as [`StoreError::Unavailable`] saying it is
    /// TLS, as it would fail every later call; an etcd that does not answer
    /// yet is waited for as without TLS.
    pub async fn connect_with(
        endpoints: &[String],
        tls: Option<&EtcdTls>,
    ) -> Result<EtcdStore, StoreError> {
        let tls_config = match tls {
            Some(t) => Some(
                t.client_config()
                    .map_err(|e| StoreError::Unavailable(format!("etcd TLS: {e}")))?,
            ),
            None => None,
        };
        let options = ConnectOptions {
            connect_timeout: CONNECT_TIMEOUT,
            request_timeout: REQUEST_TIMEOUT,
            keep_alive_interval: Duration::from_secs(2),
            keep_alive_timeout: Duration::from_secs(2),
            tls: tls_config,
        };
        let client = EtcdClient::connect(endpoints, options).map_err(unavailable)?;
        if let Some(t) = tls {
            probe(&client, endpoints, t).await?;
        }
        Ok(EtcdStore { client })
    }

    /// The underlying client (leader election uses leases and campaigns).
    pub fn client(&self) -> EtcdClient {
        self.client.clone()
    }
}

impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let kv = self.client.get(key).await.map_err(unavailable)?;
        Ok(kv.as_ref().map(to_kv))
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, u64), StoreError> {
        let (kvs, revision) = self.client.get_prefix(prefix).await.map_err(unavailable)?;
        Ok((kvs.iter().map(to_kv).collect(), rev(revision)))
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<u64, StoreError> {
        let request = TxnRequest {
            compare: compares
                .iter()
                .map(|c| client::compare_mod_revision(&c.key, irev(c.mod_revision)))
                .collect(),
            success: ops
                .iter()
                .map(|op| match op {
                    Op::Put { key, value } => client::put_op(key, value, 0),
                    Op::Delete { key } => client::delete_op(key),
                })
                .collect(),
            failure: Vec::new(),
        };
        let r = self.client.txn(request).await.map_err(unavailable)?;
        if r.succeeded {
            return Ok(rev(client::txn_revision(&r)));
        }
        // Name the first compare that failed.
        for cmp in compares {
            let found = self.get(&cmp.key).await?.map_or(0, |kv| kv.mod_revision);
            if found != cmp.mod_revision {
                return Err(StoreError::Conflict {
                    key: cmp.key,
                    expected: cmp.mod_revision,
                    found,
                });
            }
        }
        Err(StoreError::Conflict {
            key: String::new(),
            expected: 0,
            found: 0,
        })
    }

    async fn watch(&self, prefix: &str, from: u64) -> Result<Watch, StoreError> {
        // 0 asks etcd for changes from now on.
        let start = if from > 0 { irev(from) } else { 0 };
        let mut stream = self
            .client
            .watch_prefix(prefix, start)
            .await
            .map_err(unavailable)?;
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    () = tx.closed() => return,
                    m = stream.message() => m,
                };
                let resp = match msg {
                    Ok(Some(r)) => r,
                    Ok(None) => {
                        let _ = tx
                            .send(Err(StoreError::Unavailable("watch ended".into())))
                            .await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(unavailable(e))).await;
                        return;
                    }
                };
                if resp.compact_revision > 0 {
                    let _ = tx
                        .send(Err(StoreError::Compacted {
                            requested: from,
                            compact_revision: rev(resp.compact_revision),
                        }))
                        .await;
                    return;
                }
                if resp.canceled {
                    let reason = resp.cancel_reason;
                    let _ = tx
                        .send(Err(StoreError::Unavailable(format!(
                            "watch canceled: {reason}"
                        ))))
                        .await;
                    return;
                }
                let events: Vec<Event> = resp
                    .events
                    .iter()
                    .filter_map(|e| {
                        let kv = e.kv.as_ref()?;
                        Some(match EventType::try_from(e.r#type).ok()? {
                            EventType::Put => Event::Put(to_kv(kv)),
                            EventType::Delete => Event::Delete {
                                key: String::from_utf8_lossy(&kv.key).into_owned(),
                                revision: rev(kv.mod_revision),
                            },
                        })
                    })
                    .collect();
                if !events.is_empty() && tx.send(Ok(events)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Watch::new(rx))
    }

    async fn compact(&self, revision: u64) -> Result<(), StoreError> {
        self.client
            .compact(irev(revision))
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}
