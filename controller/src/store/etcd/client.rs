//! A small typed etcd v3 client over the generated `proto::etcd` code (a
//! subset of etcd's API compiled with protox, so building halo needs no
//! `protoc`). It owns one lazily connected channel per endpoint (connect
//! timeout, HTTP/2 keep-alive), a deadline on every call, fail-over between
//! endpoints, and the three things halo needs: KV (range, txn, compact),
//! watch streams and leases.
//!
//! Fail-over: calls go to the endpoint that last answered. A call that
//! could not even connect is retried on the next endpoint within the same
//! deadline (it never reached etcd, so even a transaction is safe to
//! resend); any other unavailability or a timeout is returned to the caller
//! and moves later calls to the next endpoint.

use proto::etcd::etcdserverpb as pb;
use proto::etcd::etcdserverpb::kv_client::KvClient;
use proto::etcd::etcdserverpb::lease_client::LeaseClient;
use proto::etcd::etcdserverpb::watch_client::WatchClient;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

pub use proto::etcd::etcdserverpb::{TxnResponse, WatchResponse};
pub use proto::etcd::mvccpb::KeyValue;
pub use proto::etcd::mvccpb::event::EventType;

/// How to reach etcd.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Deadline of opening a connection to one endpoint.
    pub connect_timeout: Duration,
    /// Deadline of every call (of opening a stream, for streams), fail-over
    /// included.
    pub request_timeout: Duration,
    /// HTTP/2 keep-alive ping interval.
    pub keep_alive_interval: Duration,
    /// How long a keep-alive ping may go unanswered before the connection
    /// counts as dead.
    pub keep_alive_timeout: Duration,
    /// TLS for `https://` endpoints (the CA that verifies etcd, and a
    /// client certificate when etcd asks for one); `None` for `http://`.
    pub tls: Option<ClientTlsConfig>,
}

/// Why an etcd call failed.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// No endpoints, or one that is not a URI.
    #[error("bad etcd endpoint {endpoint:?}: {reason}")]
    Endpoint {
        /// The endpoint as given.
        endpoint: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The call did not finish within its deadline.
    #[error("etcd {0} timed out")]
    Timeout(&'static str),
    /// etcd (or the transport) answered with an error; a TLS failure is
    /// told as one, with what to check.
    #[error("etcd {call}: {}", status_text(status))]
    Status {
        /// The call.
        call: &'static str,
        /// The gRPC status.
        status: tonic::Status,
    },
    /// A stream ended (etcd closed it, or the connection broke).
    #[error("etcd {0} stream ended")]
    StreamEnded(&'static str),
    /// etcd answered, but not as the API says it should.
    #[error("etcd {0}")]
    Protocol(String),
}

impl EtcdError {
    /// Whether this is a TLS failure with etcd (a refused handshake: wrong
    /// CA, missing or unknown client certificate, not a TLS port).
    pub fn is_tls(&self) -> bool {
        matches!(self, EtcdError::Status { status, .. } if tls_failure(status).is_some())
    }
}

fn status_text(status: &tonic::Status) -> String {
    match tls_failure(status) {
        Some(why) => format!("TLS with etcd failed: {why}"),
        None => status.to_string(),
    }
}

/// What went wrong, and what to check, when `status` is a TLS failure.
fn tls_failure(status: &tonic::Status) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(status);
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

/// A bare TLS handshake with `endpoint` (`https://host:port`) that sends
/// nothing after it, then a read of up to a second: `Some` with what is
/// wrong when etcd refuses this client (a handshake error, or an alert
/// right after it, as etcd sends when it checks a TLS 1.3 client
/// certificate); `None` when it accepts or cannot be reached. Blocking.
pub fn handshake_refusal(
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

/// A handle on an etcd cluster; cheap to clone (clones share the channels
/// and the choice of endpoint).
#[derive(Debug, Clone)]
pub struct EtcdClient {
    channels: Arc<[Channel]>,
    current: Arc<AtomicUsize>,
    timeout: Duration,
}

/// The key after every key that starts with `prefix` (etcd's `range_end`
/// for a prefix): the prefix with its last byte below 0xff incremented and
/// what follows it dropped; `[0]` (every key) when there is no such byte.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// The revision in a response header (0 when there is none).
fn revision(header: Option<&pb::ResponseHeader>) -> i64 {
    header.map_or(0, |h| h.revision)
}

/// Whether the call failed while connecting, so etcd never saw it.
fn never_sent(status: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        if e.is::<tonic::ConnectError>() {
            return true;
        }
        source = e.source();
    }
    false
}

/// `message` as a request that tells etcd the deadline too.
fn request<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.set_timeout(timeout);
    r
}

impl EtcdClient {
    /// A client over the endpoints in `endpoints` (`http://host:port`, or
    /// `https://host:port` with [`ConnectOptions::tls`]). Connections are
    /// made lazily, so an unreachable cluster shows up as calls failing
    /// (each within its deadline), not here.
    pub fn connect(endpoints: &[String], options: ConnectOptions) -> Result<EtcdClient, EtcdError> {
        if endpoints.is_empty() {
            return Err(EtcdError::Endpoint {
                endpoint: String::new(),
                reason: "no etcd endpoints given".into(),
            });
        }
        let mut channels = Vec::with_capacity(endpoints.len());
        for e in endpoints {
            let endpoint = Endpoint::from_shared(e.clone())
                .map_err(|err| EtcdError::Endpoint {
                    endpoint: e.clone(),
                    reason: err.to_string(),
                })?
                .connect_timeout(options.connect_timeout)
                .http2_keep_alive_interval(options.keep_alive_interval)
                .keep_alive_timeout(options.keep_alive_timeout)
                .keep_alive_while_idle(true)
                .tcp_nodelay(true);
            let endpoint = match &options.tls {
                Some(tls) => {
                    endpoint
                        .tls_config(tls.clone())
                        .map_err(|err| EtcdError::Endpoint {
                            endpoint: e.clone(),
                            reason: format!("TLS: {err}"),
                        })?
                }
                None => endpoint,
            };
            channels.push(endpoint.connect_lazy());
        }
        Ok(EtcdClient {
            channels: channels.into(),
            current: Arc::new(AtomicUsize::new(0)),
            timeout: options.request_timeout,
        })
    }

    /// Runs `attempt` (given a channel and the time left) within the
    /// deadline, failing over between endpoints as the module says.
    async fn call<T, F, Fut>(&self, name: &'static str, mut attempt: F) -> Result<T, EtcdError>
    where
        F: FnMut(Channel, Duration) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let deadline = Instant::now() + self.timeout;
        let n = self.channels.len();
        let first = self.current.load(Ordering::Relaxed) % n;
        let mut last = None;
        for i in 0..n {
            let idx = (first + i) % n;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let Some(channel) = self.channels.get(idx) else {
                break;
            };
            let next = (idx + 1) % n;
            match tokio::time::timeout(left, attempt(channel.clone(), left)).await {
                Ok(Ok(v)) => {
                    self.current.store(idx, Ordering::Relaxed);
                    return Ok(v);
                }
                Err(_) => {
                    let _ = self.current.compare_exchange(
                        idx,
                        next,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                    return Err(EtcdError::Timeout(name));
                }
                Ok(Err(status)) if status.code() == tonic::Code::Unavailable => {
                    let _ = self.current.compare_exchange(
                        idx,
                        next,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                    if !never_sent(&status) {
                        return Err(EtcdError::Status { call: name, status });
                    }
                    last = Some(status);
                }
                Ok(Err(status)) => return Err(EtcdError::Status { call: name, status }),
            }
        }
        Err(match last {
            Some(status) => EtcdError::Status { call: name, status },
            None => EtcdError::Timeout(name),
        })
    }

    /// A range read at the latest revision (linearizable).
    pub async fn range(&self, req: pb::RangeRequest) -> Result<pb::RangeResponse, EtcdError> {
        self.call("range", |ch, left| {
            let r = request(req.clone(), left);
            async move { Ok(KvClient::new(ch).range(r).await?.into_inner()) }
        })
        .await
    }

    /// One key.
    pub async fn get(&self, key: &str) -> Result<Option<KeyValue>, EtcdError> {
        let r = self
            .range(pb::RangeRequest {
                key: key.as_bytes().to_vec(),
                ..Default::default()
            })
            .await?;
        Ok(r.kvs.into_iter().next())
    }

    /// Every key under `prefix`, and the revision they were read at.
    pub async fn get_prefix(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), EtcdError> {
        let r = self
            .range(pb::RangeRequest {
                key: prefix.as_bytes().to_vec(),
                range_end: prefix_end(prefix.as_bytes()),
                ..Default::default()
            })
            .await?;
        Ok((r.kvs, revision(r.header.as_ref())))
    }

    /// A transaction: `success` if every compare holds, else `failure`.
    pub async fn txn(&self, req: pb::TxnRequest) -> Result<TxnResponse, EtcdError> {
        self.call("txn", |ch, left| {
            let r = request(req.clone(), left);
            async move { Ok(KvClient::new(ch).txn(r).await?.into_inner()) }
        })
        .await
    }

    /// Writes `key` (under `lease` unless 0); the new revision.
    pub async fn put(&self, key: &str, value: &str, lease: i64) -> Result<i64, EtcdError> {
        let r = self
            .txn(pb::TxnRequest {
                success: vec![put_op(key, value, lease)],
                ..Default::default()
            })
            .await?;
        Ok(revision(r.header.as_ref()))
    }

    /// Deletes `key` (absent is fine); the store revision after.
    pub async fn delete(&self, key: &str) -> Result<i64, EtcdError> {
        let r = self
            .txn(pb::TxnRequest {
                success: vec![delete_op(key)],
                ..Default::default()
            })
            .await?;
        Ok(revision(r.header.as_ref()))
    }

    /// Drops history before `revision`.
    pub async fn compact(&self, revision: i64) -> Result<(), EtcdError> {
        let req = pb::CompactionRequest {
            revision,
            physical: false,
        };
        self.call("compact", |ch, left| {
            let r = request(req, left);
            async move { Ok(KvClient::new(ch).compact(r).await?.into_inner()) }
        })
        .await?;
        Ok(())
    }

    /// Watches every key under `prefix` from `start_revision` (0: from now).
    /// etcd first answers `created`; a start below the compacted revision is
    /// answered with `compact_revision` set and the watch canceled.
    pub async fn watch_prefix(
        &self,
        prefix: &str,
        start_revision: i64,
    ) -> Result<WatchStream, EtcdError> {
        let create = pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                pb::WatchCreateRequest {
                    key: prefix.as_bytes().to_vec(),
                    range_end: prefix_end(prefix.as_bytes()),
                    start_revision,
                    ..Default::default()
                },
            )),
        };
        let (tx, inner) = self
            .call("watch", |ch, _| {
                let (tx, rx) = mpsc::channel(4);
                // Sent before the call: etcd sends its response headers only
                // with its first message, which answers this. The channel is
                // new and empty, so there is room.
                let sent = tx.try_send(create.clone());
                async move {
                    sent.map_err(|_| tonic::Status::internal("watch request not queued"))?;
                    let inner = WatchClient::new(ch)
                        .watch(ReceiverStream::new(rx))
                        .await?
                        .into_inner();
                    Ok((tx, inner))
                }
            })
            .await?;
        Ok(WatchStream {
            tx,
            inner,
            watch_id: None,
        })
    }

    /// A lease of `ttl` seconds: its id and the TTL etcd granted.
    pub async fn lease_grant(&self, ttl: i64) -> Result<(i64, i64), EtcdError> {
        let r = self
            .call("lease grant", |ch, left| {
                let r = request(pb::LeaseGrantRequest { ttl, id: 0 }, left);
                async move { Ok(LeaseClient::new(ch).lease_grant(r).await?.into_inner()) }
            })
            .await?;
        if !r.error.is_empty() {
            return Err(EtcdError::Protocol(format!("lease grant: {}", r.error)));
        }
        Ok((r.id, r.ttl))
    }

    /// Revokes lease `id` (its keys are deleted).
    pub async fn lease_revoke(&self, id: i64) -> Result<(), EtcdError> {
        self.call("lease revoke", |ch, left| {
            let r = request(pb::LeaseRevokeRequest { id }, left);
            async move { Ok(LeaseClient::new(ch).lease_revoke(r).await?.into_inner()) }
        })
        .await?;
        Ok(())
    }

    /// Opens a keep-alive stream for lease `id`, keeping it alive once:
    /// the keeper and the TTL left (0: the lease is gone).
    pub async fn lease_keep_alive(&self, id: i64) -> Result<(LeaseKeeper, i64), EtcdError> {
        let (tx, inner) = self
            .call("keep-alive", |ch, _| {
                let (tx, rx) = mpsc::channel(4);
                // As with watches, etcd's headers come with its first answer.
                let sent = tx.try_send(pb::LeaseKeepAliveRequest { id });
                async move {
                    sent.map_err(|_| tonic::Status::internal("keep-alive not queued"))?;
                    let inner = LeaseClient::new(ch)
                        .lease_keep_alive(ReceiverStream::new(rx))
                        .await?
                        .into_inner();
                    Ok((tx, inner))
                }
            })
            .await?;
        let mut keeper = LeaseKeeper {
            id,
            tx,
            inner,
            timeout: self.timeout,
        };
        let ttl = keeper.receive().await?;
        Ok((keeper, ttl))
    }
}

/// A compare on `key`'s `mod_revision` (0 = absent).
pub fn compare_mod_revision(key: &str, mod_revision: i64) -> pb::Compare {
    pb::Compare {
        result: pb::compare::CompareResult::Equal.into(),
        target: pb::compare::CompareTarget::Mod.into(),
        key: key.as_bytes().to_vec(),
        target_union: Some(pb::compare::TargetUnion::ModRevision(mod_revision)),
        range_end: Vec::new(),
    }
}

/// A compare on `key`'s `create_revision` (0 = absent).
pub fn compare_create_revision(key: &str, create_revision: i64) -> pb::Compare {
    pb::Compare {
        result: pb::compare::CompareResult::Equal.into(),
        target: pb::compare::CompareTarget::Create.into(),
        key: key.as_bytes().to_vec(),
        target_union: Some(pb::compare::TargetUnion::CreateRevision(create_revision)),
        range_end: Vec::new(),
    }
}

/// A put in a transaction, under `lease` unless 0.
pub fn put_op(key: &str, value: &str, lease: i64) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
            lease,
            prev_kv: false,
        })),
    }
}

/// A delete of one key in a transaction.
pub fn delete_op(key: &str) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(pb::request_op::Request::RequestDeleteRange(
            pb::DeleteRangeRequest {
                key: key.as_bytes().to_vec(),
                ..Default::default()
            },
        )),
    }
}

/// The revision a transaction ran at.
pub fn txn_revision(r: &TxnResponse) -> i64 {
    revision(r.header.as_ref())
}

/// A live watch. Dropping it closes the stream, which ends the watch in etcd.
#[derive(Debug)]
pub struct WatchStream {
    tx: mpsc::Sender<pb::WatchRequest>,
    inner: tonic::Streaming<WatchResponse>,
    watch_id: Option<i64>,
}

impl WatchStream {
    /// The next response; `None` when etcd ended the stream. No deadline:
    /// a quiet prefix sends nothing (HTTP/2 keep-alive notices a dead
    /// connection).
    pub async fn message(&mut self) -> Result<Option<WatchResponse>, EtcdError> {
        let m = self
            .inner
            .message()
            .await
            .map_err(|status| EtcdError::Status {
                call: "watch",
                status,
            })?;
        if let Some(r) = &m
            && r.created
        {
            self.watch_id = Some(r.watch_id);
        }
        Ok(m)
    }

    /// Asks etcd to cancel the watch (it answers with `canceled`).
    pub async fn cancel(&mut self) -> Result<(), EtcdError> {
        let Some(watch_id) = self.watch_id else {
            return Ok(());
        };
        let cancel = pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CancelRequest(
                pb::WatchCancelRequest { watch_id },
            )),
        };
        self.tx
            .send(cancel)
            .await
            .map_err(|_| EtcdError::StreamEnded("watch"))
    }
}

/// Keeps one lease alive over a stream.
#[derive(Debug)]
pub struct LeaseKeeper {
    id: i64,
    tx: mpsc::Sender<pb::LeaseKeepAliveRequest>,
    inner: tonic::Streaming<pb::LeaseKeepAliveResponse>,
    timeout: Duration,
}

impl LeaseKeeper {
    /// The lease.
    pub fn id(&self) -> i64 {
        self.id
    }

    /// Keeps the lease alive once, within the deadline: the TTL left (0: the
    /// lease is gone).
    pub async fn keep_alive(&mut self) -> Result<i64, EtcdError> {
        self.tx
            .send(pb::LeaseKeepAliveRequest { id: self.id })
            .await
            .map_err(|_| EtcdError::StreamEnded("keep-alive"))?;
        self.receive().await
    }

    async fn receive(&mut self) -> Result<i64, EtcdError> {
        let m = tokio::time::timeout(self.timeout, self.inner.message())
            .await
            .map_err(|_| EtcdError::Timeout("keep-alive"))?
            .map_err(|status| EtcdError::Status {
                call: "keep-alive",
                status,
            })?;
        match m {
            Some(r) if r.id == self.id => Ok(r.ttl),
            Some(r) => Err(EtcdError::Protocol(format!(
                "keep-alive for lease {} answered for {}",
                self.id, r.id
            ))),
            None => Err(EtcdError::StreamEnded("keep-alive")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_end_increments_the_last_byte_below_0xff() {
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
        assert_eq!(prefix_end(b""), vec![0]);
    }
}
