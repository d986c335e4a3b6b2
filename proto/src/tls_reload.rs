//! Mutual TLS that follows its files: a daemon's server config (and the
//! client config it dials peers with) rebuilt from `tls_cert`, `tls_key` and
//! `tls_ca` on SIGHUP and whenever their contents change, without a restart.
//!
//! [`ReloadingTls`] owns the current material; [`ReloadingTls::incoming`]
//! accepts TCP connections and does each TLS handshake (concurrently, with
//! a deadline) against the config current at that moment, so new
//! connections get new certificates and open ones keep theirs. A reload
//! that fails keeps the last good material and logs which file is wrong.
//! The streams it yields are `tokio_rustls::server::TlsStream<TcpStream>`,
//! for which tonic records the client's certificates, so
//! [`crate::tls::peer_role`] works as with tonic's own TLS.

use crate::tls::{TlsError, TlsFiles, TlsMaterial, expires_soon};
use crate::units::now_unix;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::ClientTlsConfig;

/// How often the three files are read and compared with the loaded
/// material (a change reloads without waiting for SIGHUP).
pub const POLL_PERIOD: Duration = Duration::from_secs(2);

/// Longest one TLS handshake may take; a client that is slower is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Most handshakes in flight at once; connections beyond it are dropped.
pub const MAX_HANDSHAKES: usize = 256;

/// The protocol offered by ALPN: gRPC runs over HTTP/2.
const ALPN_H2: &[u8] = b"h2";

/// One loaded set of TLS material, checked and ready to use.
#[derive(Clone)]
pub struct Loaded {
    /// The rustls server config: this side's certificate, a client
    /// certificate signed by the CA required of every caller, ALPN h2.
    pub server: Arc<ServerConfig>,
    /// The tonic client config from the same files (for dialling peers).
    pub client: ClientTlsConfig,
    /// When this side's certificate stops being valid, Unix seconds.
    pub not_after_unix: i64,
    /// The same, as the certificate states it (for messages).
    pub not_after: String,
    material: TlsMaterial,
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

fn invalid(path: &Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError::Invalid {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

fn certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(path, format!("bad PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(path, "no certificate in it"));
    }
    Ok(certs)
}

impl TlsFiles {
    /// Reads the files and checks that rustls accepts them (the server
    /// config is built as a reload builds it, then dropped), so a daemon
    /// refuses bad material at start rather than at its first connection.
    /// It lives here, beside [`Loaded::build`], so that `tls` needs
    /// nothing of this module.
    pub fn check(&self) -> Result<(), TlsError> {
        Loaded::build(self, self.load()?).map(drop)
    }
}

impl Loaded {
    /// Checks `material` (read from `files`) and builds both configs; an
    /// error names the file at fault.
    pub(crate) fn build(files: &TlsFiles, material: TlsMaterial) -> Result<Loaded, TlsError> {
        use x509_parser::prelude::{FromDer, X509Certificate};
        let chain = certs(&files.cert, &material.cert)?;
        let (_, leaf) = X509Certificate::from_der(chain[0].as_ref())
            .map_err(|e| invalid(&files.cert, format!("bad certificate: {e}")))?;
        let not_after_unix = leaf.validity().not_after.timestamp();
        let not_after = leaf.validity().not_after.to_string();
        let key = PrivateKeyDer::from_pem_slice(&material.key)
            .map_err(|e| invalid(&files.key, format!("bad PEM private key: {e}")))?;
        let mut roots = RootCertStore::empty();
        for ca in certs(&files.ca, &material.ca)? {
            roots
                .add(ca)
                .map_err(|e| invalid(&files.ca, format!("bad CA certificate: {e}")))?;
        }
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| invalid(&files.ca, e))?;
        let mut server = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Setup(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| match e {
                tokio_rustls::rustls::Error::InconsistentKeys(_) => invalid(
                    &files.key,
                    format!(
                        "the private key does not match the certificate in {}",
                        files.cert.display()
                    ),
                ),
                e => invalid(&files.key, format!("unusable private key: {e}")),
            })?;
        server.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Loaded {
            server: Arc::new(server),
            client: material.client_config(),
            not_after_unix,
            not_after,
            material,
        })
    }

    /// Days until the certificate expires (negative once expired).
    pub fn days_left(&self, now_unix: i64) -> i64 {
        self.not_after_unix
            .saturating_sub(now_unix)
            .div_euclid(86_400)
    }

    fn warn_if_expiring(&self, files: &TlsFiles) {
        let now = now_unix();
        if !expires_soon(self.not_after_unix, now) {
            return;
        }
        let cert = files.cert.display();
        if self.not_after_unix <= now {
            tracing::warn!(
                "TLS certificate {cert} has EXPIRED (not after {}): peers refuse it; issue a \
                 new one (`haloctl certs issue`) and send SIGHUP",
                self.not_after
            );
        } else {
            tracing::warn!(
                "TLS certificate {cert} expires in {} days (not after {}): issue a new one \
                 (`haloctl certs issue`) and send SIGHUP",
                self.days_left(now),
                self.not_after
            );
        }
    }
}

/// A daemon's TLS material, reloaded on SIGHUP and when a file changes
/// (see [`ReloadingTls::run`]); cheap to clone, all clones share it.
#[derive(Debug, Clone)]
pub struct ReloadingTls {
    files: TlsFiles,
    current: Arc<watch::Sender<Arc<Loaded>>>,
}

impl ReloadingTls {
    /// Reads and checks the files (an error names the file at fault) and
    /// warns when the certificate expires within 30 days.
    pub fn load(files: TlsFiles) -> Result<ReloadingTls, TlsError> {
        let loaded = Loaded::build(&files, files.load()?)?;
        loaded.warn_if_expiring(&files);
        Ok(ReloadingTls {
            files,
            current: Arc::new(watch::channel(Arc::new(loaded)).0),
        })
    }

    /// The files.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// The material in use now.
    pub fn current(&self) -> Arc<Loaded> {
        self.current.borrow().clone()
    }

    /// Sees every successful reload.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Loaded>> {
        self.current.subscribe()
    }

    /// Calls `f` with the material of each successful reload from now on,
    /// until `token` is cancelled (spawn it): how a daemon passes new
    /// material to what uses it besides the listener.
    pub fn on_reload(
        &self,
        token: CancellationToken,
        mut f: impl FnMut(&Loaded) + Send + 'static,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut loaded = self.subscribe();
        async move {
            loop {
                tokio::select! {
                    () = token.cancelled() => return,
                    r = loaded.changed() => if r.is_err() { return },
                }
                let now = loaded.borrow_and_update().clone();
                f(&now);
            }
        }
    }

    /// Reads the files and, when their contents differ from the loaded
    /// material (or `force`), builds and swaps in new configs. `Ok(true)`
    /// when swapped; on an error the old material stays.
    pub fn reload(&self, force: bool) -> Result<bool, TlsError> {
        let material = self.files.load()?;
        if !force && self.current.borrow().material == material {
            return Ok(false);
        }
        let loaded = Loaded::build(&self.files, material)?;
        tracing::info!(
            cert = %self.files.cert.display(),
            not_after = %loaded.not_after,
            expires_in_days = loaded.days_left(now_unix()),
            "TLS certificates reloaded"
        );
        loaded.warn_if_expiring(&self.files);
        self.current.send_replace(Arc::new(loaded));
        Ok(true)
    }

    /// Reloads on SIGHUP (always) and every [`POLL_PERIOD`] when the files'
    /// contents changed, until `token` is cancelled. A failed reload is
    /// logged once per distinct error, and the old material stays.
    pub async fn run(self, token: CancellationToken) {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("SIGHUP not handled ({e}); TLS files are still polled");
                None
            }
        };
        let mut poll = tokio::time::interval(POLL_PERIOD);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        poll.tick().await;
        let mut last_error: Option<String> = None;
        loop {
            let force = tokio::select! {
                () = token.cancelled() => return,
                Some(()) = async {
                    match hup.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                } => true,
                _ = poll.tick() => false,
            };
            if force {
                tracing::info!("SIGHUP: reloading TLS certificates");
            }
            match self.reload(force) {
                Ok(_) => last_error = None,
                Err(e) => {
                    let msg = e.to_string();
                    if force || last_error.as_deref() != Some(msg.as_str()) {
                        tracing::error!(
                            "TLS certificates not reloaded, still serving the last good ones: \
                             {msg}"
                        );
                    }
                    last_error = Some(msg);
                }
            }
        }
    }

    /// Accepts connections on `listener` and yields those whose TLS
    /// handshake succeeds against the config current when each arrived.
    /// Handshakes run concurrently, each within [`HANDSHAKE_TIMEOUT`]; a
    /// failed one drops only its connection. `nodelay` sets TCP_NODELAY on
    /// accepted sockets. Accepting stops when the stream is dropped.
    pub fn incoming(
        &self,
        listener: TcpListener,
        nodelay: bool,
    ) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
        let (tx, rx) = mpsc::channel(MAX_HANDSHAKES);
        let current = self.current.subscribe();
        tokio::spawn(async move {
            let permits = Arc::new(Semaphore::new(MAX_HANDSHAKES));
            loop {
                let (tcp, peer) = tokio::select! {
                    () = tx.closed() => return,
                    r = listener.accept() => match r {
                        Ok(c) => c,
                        Err(e) => {
                            // Out of file descriptors and the like: wait
                            // rather than spin.
                            tracing::warn!("accept: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                };
                if nodelay && let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!(%peer, "TCP_NODELAY: {e}");
                }
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    tracing::warn!(%peer, "{MAX_HANDSHAKES} TLS handshakes in flight; dropped");
                    continue;
                };
                let acceptor = TlsAcceptor::from(current.borrow().server.clone());
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    if let Some(s) = handshake(&acceptor, tcp, peer).await {
                        let _ = tx.send(Ok(s)).await;
                    }
                });
            }
        });
        ReceiverStream::new(rx)
    }
}

async fn handshake(
    acceptor: &TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
) -> Option<TlsStream<TcpStream>> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => Some(s),
        Ok(Err(e)) => {
            tracing::debug!(%peer, "TLS handshake failed: {e}");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out after {HANDSHAKE_TIMEOUT:?}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

    /// A CA, and a certificate from it: (ca pem, cert pem, key pem).
    fn material() -> (String, String, String) {
        let ca_key = KeyPair::generate().expect("key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_pem = ca.self_signed(&ca_key).expect("ca").pem();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().expect("key");
        let leaf = CertificateParams::new(vec!["localhost".to_owned()])
            .expect("params")
            .signed_by(&key, &issuer)
            .expect("leaf");
        (ca_pem, leaf.pem(), key.serialize_pem())
    }

    fn write(files: &TlsFiles, (ca, cert, key): &(String, String, String)) {
        for (p, v) in [(&files.ca, ca), (&files.cert, cert), (&files.key, key)] {
            std::fs::write(p, v).expect("write");
        }
    }

    #[test]
    fn a_failed_reload_names_the_file_and_keeps_the_last_good_material() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = TlsFiles {
            cert: dir.path().join("c.pem"),
            key: dir.path().join("k.pem"),
            ca: dir.path().join("ca.pem"),
        };
        let first = material();
        write(&files, &first);
        let tls = ReloadingTls::load(files.clone()).expect("load");
        let before = tls.current().not_after_unix;
        assert_eq!(
            Some(before),
            crate::tls::cert_not_after_unix(first.1.as_bytes())
        );
        assert_eq!(tls.current().server.alpn_protocols, vec![b"h2".to_vec()]);
        assert!(!tls.reload(false).expect("unchanged"), "nothing changed");

        // Another certificate's key: refused, naming the key file.
        let other = material();
        std::fs::write(&files.key, &other.2).expect("write");
        let e = tls.reload(false).expect_err("mismatched key accepted");
        let msg = e.to_string();
        assert!(
            msg.starts_with(&files.key.display().to_string()) && msg.contains("does not match"),
            "{msg}"
        );
        // Not PEM, gone: each names its file.
        std::fs::write(&files.cert, "garbage").expect("write");
        let msg = tls.reload(true).expect_err("garbage accepted").to_string();
        assert!(msg.contains(&files.cert.display().to_string()), "{msg}");
        write(&files, &first);
        std::fs::remove_file(&files.ca).expect("rm");
        let msg = tls.reload(true).expect_err("no CA accepted").to_string();
        assert!(msg.contains(&files.ca.display().to_string()), "{msg}");
        assert_eq!(tls.current().material.cert, first.1.as_bytes());

        // A whole new set: swapped in, and subscribers see it.
        let seen = tls.subscribe();
        write(&files, &other);
        assert!(tls.reload(false).expect("reload"), "not swapped");
        assert!(seen.has_changed().unwrap_or(false));
        assert_eq!(tls.current().material.cert, other.1.as_bytes());
    }
}
