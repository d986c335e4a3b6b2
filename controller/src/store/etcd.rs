//! The etcd backend, on the `etcd-client` crate: transactions compare
//! `mod_revision` (0 = absent, which etcd spells the same way), lists read a
//! prefix at one revision, watches start at a revision and report a
//! compacted start as [`StoreError::Compacted`].
//!
//! One client per endpoint, and fail-over between them in
//! [`EtcdStore::call`] (leader election calls through it too): calls go to
//! the endpoint that last answered, within [`REQUEST_TIMEOUT`]. A call that
//! could not even connect is retried on the next endpoint within the same
//! deadline (it never reached etcd, so even a transaction is safe to
//! resend); any other unavailability or a timeout is returned to the caller
//! and moves later calls to the next endpoint. The crate's own balancer
//! over several endpoints picks one at random, a dead one included, and
//! hands its connect error to the call.
//!
//! TLS ([`EtcdTls`]) is opt-in: `https://` endpoints, etcd's certificate
//! verified against one CA, and a client certificate when etcd requires
//! one (`--client-cert-auth`). A handshake etcd refuses is reported as one
//! line that says it is a TLS problem and what to check, at connect time
//! rather than as a store that never answers.

use super::{Compare, Event, KeyValue, Op, Store, StoreError, Watch};
use etcd_client::{
    Certificate, Client, CompareOp, ConnectOptions, EventType, GetOptions, GetResponse, Identity,
    TlsOptions, Txn, TxnOp, WatchOptions, WatchResponse, WatchStream,
};
use proto::tls::{TlsError, read_cert_pem, read_key_pem};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::transport::Endpoint;

/// Deadline of every etcd request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline of connecting.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// HTTP/2 keep-alive: ping interval, and how long a ping may go unanswered
/// before the connection counts as dead (also while idle).
const KEEP_ALIVE: Duration = Duration::from_secs(2);

/// A store on an etcd cluster.
#[derive(Clone)]
pub struct EtcdStore {
    /// One client per endpoint, in the order given.
    clients: Arc<[Client]>,
    /// The endpoint calls go to first (the last that answered).
    current: Arc<AtomicUsize>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore").finish_non_exhaustive()
    }
}

/// Why an etcd call failed.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// The call did not finish within its deadline.
    #[error("etcd {0} timed out")]
    Timeout(&'static str),
    /// etcd (or the transport) answered with an error; a TLS failure is
    /// told as one, with what to check.
    #[error("etcd {call}: {}", error_text(error))]
    Failed {
        /// The call.
        call: &'static str,
        /// The client's error.
        error: etcd_client::Error,
    },
    /// etcd answered, but not as the API says it should (a stream that
    /// ended, a lease not granted, a keep-alive for another lease).
    #[error("etcd {0}")]
    Protocol(String),
}

impl EtcdError {
    /// Whether this is a TLS failure with etcd (a refused handshake: wrong
    /// CA, missing or unknown client certificate, not a TLS port).
    pub fn is_tls(&self) -> bool {
        matches!(self, EtcdError::Failed { error, .. } if tls_failure(error).is_some())
    }
}

impl From<EtcdError> for StoreError {
    fn from(e: EtcdError) -> StoreError {
        StoreError::Unavailable(e.to_string())
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
fn accepted(config: &TlsOptions) -> Result<(), String> {
    Endpoint::from_static("https://etcd.invalid")
        .tls_config(config.clone())
        .map(drop)
        .map_err(|e| proto::error_chain(&e))
}

impl EtcdTls {
    /// The same material as a rustls client config (ring, h2), for
    /// [`handshake_refusal`].
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
    pub fn client_config(&self) -> Result<TlsOptions, EtcdTlsError> {
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
        let mut config = TlsOptions::new()
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

/// The error's text: what went wrong with TLS and what to check when it is
/// a TLS failure, else the gRPC status or the client's own words.
fn error_text(e: &etcd_client::Error) -> String {
    match (tls_failure(e), e) {
        (Some(why), _) => format!("TLS with etcd failed: {why}"),
        (None, etcd_client::Error::GRpcStatus(status)) => status.to_string(),
        (None, other) => other.to_string(),
    }
}

/// Where the client's error keeps the transport's: its sources lead to a
/// TLS or connect failure.
fn transport_cause(e: &etcd_client::Error) -> Option<&(dyn std::error::Error + 'static)> {
    match e {
        etcd_client::Error::GRpcStatus(status) => Some(status),
        etcd_client::Error::TransportError(t) => Some(t),
        etcd_client::Error::IoError(io) => Some(io),
        _ => None,
    }
}

/// What went wrong, and what to check, when `e` is a TLS failure.
fn tls_failure(e: &etcd_client::Error) -> Option<String> {
    let mut cur = transport_cause(e);
    while let Some(e) = cur {
        // rustls errors travel inside `std::io::Error`, whose `source()`
        // skips the error it wraps.
        let inner = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|i| i as &(dyn std::error::Error + 'static));
        for candidate in [Some(e), inner].into_iter().flatten() {
            if let Some(r) = candidate.downcast_ref::<rustls::Error>() {
                return Some(explain_tls(r));
            }
        }
        // An alert after the handshake reaches here through h2, whose
        // error keeps the io error without exposing it as a source; and
        // tonic's own TLS errors are private types. Their texts are stable.
        let text = e.to_string();
        if let Some((_, alert)) = text.split_once("received fatal alert: ") {
            let name: String = alert
                .chars()
                .take_while(char::is_ascii_alphanumeric)
                .collect();
            return Some(explain_alert(&name));
        }
        if text.contains("TLS handshake timeout") {
            return Some(
                "no TLS handshake within the connect timeout: does this URL reach etcd's TLS \
                 port?"
                    .into(),
            );
        }
        if text.contains("HTTP/2 was not negotiated") {
            return Some("etcd did not offer HTTP/2 (ALPN h2) in the handshake".into());
        }
        cur = e.source();
    }
    None
}

fn explain_tls(e: &rustls::Error) -> String {
    use rustls::{CertificateError as C, Error as E};
    match e {
        // Another halo CA has the same name, so its certificates fail the
        // signature check rather than the issuer look-up.
        E::InvalidCertificate(c @ (C::UnknownIssuer | C::BadSignature)) => {
            format!("etcd's certificate is not signed by etcd_ca ({c:?})")
        }
        E::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
            "etcd's certificate does not name the host of the etcd URL (issue it with --host \
             for that name or address)"
                .into()
        }
        E::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            "etcd's certificate has expired".into()
        }
        E::InvalidCertificate(c) => format!("etcd's certificate was refused: {c:?}"),
        E::AlertReceived(a) => explain_alert(&format!("{a:?}")),
        E::InvalidMessage(_) | E::InappropriateMessage { .. } => {
            format!("etcd did not answer with TLS ({e}): does this URL reach etcd's TLS port?")
        }
        other => other.to_string(),
    }
}

/// A TLS alert from etcd, by its name in rustls (`BadCertificate`, …).
fn explain_alert(name: &str) -> String {
    match name {
        "CertificateRequired" => {
            "etcd requires a client certificate (alert CertificateRequired): set etcd_cert and \
             etcd_key"
                .into()
        }
        "BadCertificate"
        | "UnknownCA"
        | "CertificateUnknown"
        | "UnsupportedCertificate"
        | "CertificateExpired"
        | "CertificateRevoked"
        | "AccessDenied" => format!(
            "etcd refused the client certificate (alert {name}): etcd requires one \
             (--client-cert-auth), so set etcd_cert and etcd_key to a valid certificate \
             signed by etcd's --trusted-ca-file"
        ),
        _ => format!("etcd sent TLS alert {name}"),
    }
}

/// A bare TLS handshake with `endpoint` (`https://host:port`) that sends
/// nothing after it, then a read of up to a second: `Some` with what is
/// wrong when etcd refuses this client (a handshake error, or an alert
/// right after it, as etcd sends when it checks a TLS 1.3 client
/// certificate); `None` when it accepts or cannot be reached. Blocking.
fn handshake_refusal(
    endpoint: &str,
    config: Arc<rustls::ClientConfig>,
    connect_timeout: Duration,
) -> Option<String> {
    use std::io::Read;
    use std::net::ToSocketAddrs;
    let uri: tonic::codegen::http::Uri = endpoint.parse().ok()?;
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
    let addr = (host, uri.port_u16().unwrap_or(443))
        .to_socket_addrs()
        .ok()?
        .next()?;
    let name = rustls::pki_types::ServerName::try_from(host.to_owned()).ok()?;
    let mut conn = rustls::ClientConnection::new(config, name).ok()?;
    let mut sock = std::net::TcpStream::connect_timeout(&addr, connect_timeout).ok()?;
    sock.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    sock.set_write_timeout(Some(connect_timeout)).ok()?;
    let mut byte = [0u8; 1];
    match rustls::Stream::new(&mut conn, &mut sock).read(&mut byte) {
        Err(e) => e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .map(explain_tls),
        // Data (etcd would not send any first) or a clean close: no refusal.
        Ok(0 | 1..) => None,
    }
}

/// Whether `e` says the endpoint is unavailable (gRPC `UNAVAILABLE`).
fn is_unavailable(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.code() == tonic::Code::Unavailable)
}

/// Whether the call failed while connecting, so etcd never saw it.
fn never_sent(e: &etcd_client::Error) -> bool {
    let mut source = transport_cause(e);
    while let Some(e) = source {
        if e.is::<tonic::ConnectError>() {
            return true;
        }
        source = e.source();
    }
    false
}

fn rev(r: i64) -> u64 {
    u64::try_from(r).unwrap_or(0)
}

fn irev(r: u64) -> i64 {
    i64::try_from(r).unwrap_or(i64::MAX)
}

fn to_kv(kv: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: String::from_utf8_lossy(kv.value()).into_owned(),
        create_revision: rev(kv.create_revision()),
        mod_revision: rev(kv.mod_revision()),
    }
}

/// The revision a response was read or written at (0 without a header).
fn header_revision(header: Option<&etcd_client::ResponseHeader>) -> u64 {
    header.map_or(0, |h| rev(h.revision()))
}

/// The transaction that applies `ops` if every compare holds.
fn to_txn(compares: &[Compare], ops: &[Op]) -> Txn {
    let compares: Vec<_> = compares
        .iter()
        .map(|c| {
            etcd_client::Compare::mod_revision(
                c.key.as_str(),
                CompareOp::Equal,
                irev(c.mod_revision),
            )
        })
        .collect();
    let ops: Vec<_> = ops
        .iter()
        .map(|op| match op {
            Op::Put { key, value } => TxnOp::put(key.as_str(), value.as_str(), None),
            Op::Delete { key } => TxnOp::delete(key.as_str(), None),
        })
        .collect();
    Txn::new().when(compares).and_then(ops)
}

/// What one watch response means for a watch that started at `from`: its
/// events (possibly none), or the error that ends the watch (a compacted
/// start, a cancel).
fn watch_events(resp: &WatchResponse, from: u64) -> Result<Vec<Event>, StoreError> {
    if resp.compact_revision() > 0 {
        return Err(StoreError::Compacted {
            requested: from,
            compact_revision: rev(resp.compact_revision()),
        });
    }
    if resp.canceled() {
        let reason = resp.cancel_reason();
        return Err(StoreError::Unavailable(format!("watch canceled: {reason}")));
    }
    Ok(resp
        .events()
        .iter()
        .filter_map(|e| {
            let kv = e.kv()?;
            Some(match e.event_type() {
                EventType::Put => Event::Put(to_kv(kv)),
                EventType::Delete => Event::Delete {
                    key: String::from_utf8_lossy(kv.key()).into_owned(),
                    revision: rev(kv.mod_revision()),
                },
            })
        })
        .collect())
}

/// Forwards a watch's event batches to `tx` until the watch ends (then
/// sends why) or the receiver is dropped (dropping the stream ends the
/// watch in etcd). No deadline: a quiet prefix sends nothing (HTTP/2
/// keep-alive notices a dead connection).
async fn forward(
    mut stream: WatchStream,
    tx: mpsc::Sender<Result<Vec<Event>, StoreError>>,
    from: u64,
) {
    loop {
        let msg = tokio::select! {
            () = tx.closed() => return,
            m = stream.message() => m,
        };
        let batch = match msg {
            Ok(Some(resp)) => watch_events(&resp, from),
            Ok(None) => Err(StoreError::Unavailable("watch ended".into())),
            Err(error) => Err(EtcdError::Failed {
                call: "watch",
                error,
            }
            .into()),
        };
        match batch {
            Ok(events) if events.is_empty() => {}
            Ok(events) => {
                if tx.send(Ok(events)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        }
    }
}

/// Reads one key to see whether etcd accepts this client's TLS: a refused
/// handshake is an error; any other failure is logged and left to the
/// callers' retries. etcd checks a TLS 1.3 client certificate only after
/// the client has finished its side of the handshake, and the alert it
/// sends can be lost to the reset that follows the HTTP/2 preface the
/// client already wrote; so after a failure that does not look like TLS,
/// each endpoint also gets a bare handshake that sends nothing
/// ([`handshake_refusal`]).
async fn probe(store: &EtcdStore, endpoints: &[String], tls: &EtcdTls) -> Result<(), StoreError> {
    let failure = match store.range(super::LEADER, false).await {
        Ok(_) => return Ok(()),
        Err(e) if e.is_tls() => return Err(e.into()),
        Err(e) => e.to_string(),
    };
    let config = Arc::new(
        tls.rustls_config()
            .map_err(|e| StoreError::Unavailable(format!("etcd TLS: {e}")))?,
    );
    let eps = endpoints.to_vec();
    let check = tokio::task::spawn_blocking(move || {
        eps.iter().find_map(|e| {
            handshake_refusal(e, config.clone(), CONNECT_TIMEOUT).map(|why| (e.clone(), why))
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
        let bad = |endpoint: &str, reason: String| {
            StoreError::Unavailable(format!("bad etcd endpoint {endpoint:?}: {reason}"))
        };
        if endpoints.is_empty() {
            return Err(bad("", "no etcd endpoints given".into()));
        }
        for e in endpoints {
            Endpoint::from_shared(e.clone()).map_err(|err| bad(e, err.to_string()))?;
        }
        let mut options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(KEEP_ALIVE, KEEP_ALIVE)
            .with_keep_alive_while_idle(true);
        if let Some(t) = tls {
            let config = t
                .client_config()
                .map_err(|e| StoreError::Unavailable(format!("etcd TLS: {e}")))?;
            options = options.with_tls(config);
        }
        let mut clients = Vec::with_capacity(endpoints.len());
        for e in endpoints {
            // Nothing is dialled yet.
            let client = Client::connect([e], Some(options.clone()))
                .await
                .map_err(|error| EtcdError::Failed {
                    call: "connect",
                    error,
                })?;
            clients.push(client);
        }
        let store = EtcdStore {
            clients: clients.into(),
            current: Arc::new(AtomicUsize::new(0)),
        };
        if let Some(t) = tls {
            probe(&store, endpoints, t).await?;
        }
        Ok(store)
    }

    /// Runs `attempt` (a call on one endpoint's client) within
    /// [`REQUEST_TIMEOUT`], failing over between endpoints as the module
    /// says.
    pub async fn call<T, F, Fut>(&self, name: &'static str, mut attempt: F) -> Result<T, EtcdError>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        let n = self.clients.len();
        let first = self.current.load(Ordering::Relaxed) % n;
        // Later calls start at the next endpoint (unless another call
        // moved them already).
        let move_on = |idx: usize| {
            let next = (idx + 1) % n;
            let _ = self
                .current
                .compare_exchange(idx, next, Ordering::Relaxed, Ordering::Relaxed);
        };
        let mut last = None;
        for i in 0..n {
            let idx = (first + i) % n;
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(client) = self.clients.get(idx).filter(|_| !left.is_zero()) else {
                break;
            };
            match tokio::time::timeout(left, attempt(client.clone())).await {
                Ok(Ok(v)) => {
                    self.current.store(idx, Ordering::Relaxed);
                    return Ok(v);
                }
                Err(_) => {
                    move_on(idx);
                    return Err(EtcdError::Timeout(name));
                }
                Ok(Err(error)) if is_unavailable(&error) => {
                    move_on(idx);
                    if !never_sent(&error) {
                        return Err(EtcdError::Failed { call: name, error });
                    }
                    last = Some(error);
                }
                Ok(Err(error)) => return Err(EtcdError::Failed { call: name, error }),
            }
        }
        Err(match last {
            Some(error) => EtcdError::Failed { call: name, error },
            None => EtcdError::Timeout(name),
        })
    }

    /// A linearizable read of `key`, or of every key under it when
    /// `prefix`.
    async fn range(&self, key: &str, prefix: bool) -> Result<GetResponse, EtcdError> {
        let options = prefix.then(|| GetOptions::new().with_prefix());
        self.call("range", |c| {
            let options = options.clone();
            async move { c.kv_client().get(key, options).await }
        })
        .await
    }
}

impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let r = self.range(key, false).await?;
        Ok(r.kvs().first().map(to_kv))
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, u64), StoreError> {
        let r = self.range(prefix, true).await?;
        Ok((
            r.kvs().iter().map(to_kv).collect(),
            header_revision(r.header()),
        ))
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<u64, StoreError> {
        let txn = to_txn(&compares, &ops);
        let r = self
            .call("txn", |c| {
                let txn = txn.clone();
                async move { c.kv_client().txn(txn).await }
            })
            .await?;
        if r.succeeded() {
            return Ok(header_revision(r.header()));
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
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(if from > 0 { irev(from) } else { 0 });
        let stream = self
            .call("watch", |c| {
                let options = options.clone();
                async move { c.watch_client().watch(prefix, Some(options)).await }
            })
            .await?;
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(forward(stream, tx, from));
        Ok(Watch::new(rx))
    }

    async fn compact(&self, revision: u64) -> Result<(), StoreError> {
        self.call("compact", |c| async move {
            c.kv_client().compact(irev(revision), None).await
        })
        .await?;
        Ok(())
    }
}
