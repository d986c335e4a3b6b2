//! The `/metrics` listener of the agent and the controller: `GET /metrics`
//! and nothing else, over HTTP/1.1. Plain HTTP on a loopback address;
//! anywhere else HTTPS with the daemon's own certificate, a client
//! certificate from the cluster CA required (any role: metrics are
//! read-only), the material followed through reloads
//! ([`ReloadingTls`]). [`fetch`] is the matching client (`haloctl top`).

use crate::tls_reload::ReloadingTls;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// Longest a connection may stay open (handshake, request and answer).
const CONNECTION_DEADLINE: Duration = Duration::from_secs(30);

/// Most connections served at once; more are closed at accept.
const MAX_CONNECTIONS: usize = 32;

/// The content type of the text exposition format.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Why `/metrics` could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The configured address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Checks where `/metrics` may listen: plain HTTP on loopback, else only
/// with the daemon's mutual TLS (`tls`); the error says how to fix it.
pub fn check_listen(addr: SocketAddr, tls: bool) -> Result<(), String> {
    if addr.ip().is_loopback() || tls {
        return Ok(());
    }
    Err(format!(
        "{addr} is not a loopback address: metrics off loopback are served over HTTPS with \
         this daemon's certificate and need tls_cert, tls_key and tls_ca (a scraper then \
         shows a client certificate from the same CA, e.g. `haloctl certs issue read-only \
         prometheus`); or listen on 127.0.0.1"
    ))
}

/// A bound `/metrics` listener.
#[derive(Debug)]
pub struct MetricsListener {
    listener: TcpListener,
    tls: Option<ReloadingTls>,
}

impl MetricsListener {
    /// Binds `addr`: plain HTTP on loopback, else HTTPS with `tls` (the
    /// daemon's own material), client certificates required. The address
    /// was checked by [`check_listen`] with the config.
    pub async fn bind(
        addr: SocketAddr,
        tls: Option<ReloadingTls>,
    ) -> Result<MetricsListener, ServeError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::Listen { addr, source })?;
        let tls = tls.filter(|_| !addr.ip().is_loopback());
        Ok(MetricsListener { listener, tls })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// `https://ADDR/metrics` or `http://ADDR/metrics`; a wildcard
    /// address (every interface) is named by `host` instead.
    pub fn url(&self, host: &str) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        match self.listener.local_addr() {
            Ok(a) if a.ip().is_unspecified() => format!("{scheme}://{host}:{}/metrics", a.port()),
            Ok(a) => format!("{scheme}://{a}/metrics"),
            Err(_) => String::new(),
        }
    }
}

/// Serves `GET /metrics` on `listener`, answering with what `render`
/// writes at that moment, until `token` is cancelled.
pub async fn serve<F, Fut>(listener: MetricsListener, render: F, token: CancellationToken)
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = String> + Send + 'static,
{
    let MetricsListener { listener, tls } = listener;
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (tcp, peer) = tokio::select! {
            () = token.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("metrics accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "metrics: {MAX_CONNECTIONS} connections open; closed");
            continue;
        };
        let acceptor = tls.as_ref().map(http1_acceptor);
        let render = render.clone();
        let token = token.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let conn = connection(tcp, acceptor, render);
            tokio::select! {
                () = token.cancelled() => {}
                r = tokio::time::timeout(CONNECTION_DEADLINE, conn) => {
                    if let Ok(Err(e)) = r {
                        tracing::debug!(%peer, "metrics connection: {e}");
                    }
                }
            }
        });
    }
}

/// The daemon's current server config (client certificate required from
/// the CA) offering HTTP/1.1 instead of gRPC's h2.
fn http1_acceptor(tls: &ReloadingTls) -> TlsAcceptor {
    let mut config = (*tls.current().server).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    TlsAcceptor::from(Arc::new(config))
}

async fn connection<F, Fut>(
    tcp: TcpStream,
    acceptor: Option<TlsAcceptor>,
    render: F,
) -> Result<(), String>
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = String> + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let render = render.clone();
        async move { Ok::<_, std::convert::Infallible>(answer(&req, render).await) }
    });
    let http = hyper::server::conn::http1::Builder::new();
    match acceptor {
        Some(a) => {
            let tls = a.accept(tcp).await.map_err(|e| format!("TLS: {e}"))?;
            http.serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await
                .map_err(|e| e.to_string())
        }
        None => http
            .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
            .await
            .map_err(|e| e.to_string()),
    }
}

async fn answer<F, Fut>(req: &Request<Incoming>, render: F) -> Response<Full<Bytes>>
where
    F: Fn() -> Fut,
    Fut: Future<Output = String>,
{
    let reply = |status: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r
    };
    if req.uri().path() != "/metrics" {
        return reply(
            StatusCode::NOT_FOUND,
            "only /metrics is served here\n".into(),
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = reply(StatusCode::METHOD_NOT_ALLOWED, "GET /metrics\n".into());
        r.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
        return r;
    }
    let mut r = reply(StatusCode::OK, render().await);
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(CONTENT_TYPE),
    );
    r
}

/// Reads a `/metrics` URL (`http://HOST:PORT/metrics`, or `https://` with
/// `tls`: this side's certificate, shown to the server, and the CA its
/// certificate must come from) within `deadline`; the error is one line.
pub async fn fetch(
    url: &str,
    tls: Option<&crate::tls::TlsMaterial>,
    deadline: Duration,
) -> Result<String, String> {
    tokio::time::timeout(deadline, fetch_inner(url, tls))
        .await
        .map_err(|_| format!("{url}: no answer within {deadline:?}"))?
        .map_err(|e| format!("{url}: {e}"))
}

async fn fetch_inner(url: &str, tls: Option<&crate::tls::TlsMaterial>) -> Result<String, String> {
    use http_body_util::BodyExt;
    let (https, rest) = match (url.strip_prefix("http://"), url.strip_prefix("https://")) {
        (Some(r), _) => (false, r),
        (_, Some(r)) => (true, r),
        _ => return Err("not an http:// or https:// URL".into()),
    };
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let path = format!("/{path}");
    let tcp = TcpStream::connect(authority)
        .await
        .map_err(|e| e.to_string())?;
    let req = Request::get(path.as_str())
        .header(hyper::header::HOST, authority)
        .body(http_body_util::Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = if https {
        let material =
            tls.ok_or("https needs a client certificate (--tls-cert, --tls-key, --tls-ca)")?;
        let host = authority
            .rsplit_once(':')
            .map_or(authority, |(h, _)| h)
            .trim_start_matches('[')
            .trim_end_matches(']');
        let name = tokio_rustls::rustls::pki_types::ServerName::try_from(host.to_owned())
            .map_err(|e| e.to_string())?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(material)?));
        let stream = connector
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        send(stream, req).await?
    } else {
        send(tcp, req).await?
    };
    if resp.status() != StatusCode::OK {
        return Err(format!("HTTP {}", resp.status()));
    }
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    String::from_utf8(body.to_vec()).map_err(|e| e.to_string())
}

async fn send<S>(
    stream: S,
    req: Request<http_body_util::Empty<Bytes>>,
) -> Result<Response<Incoming>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    sender.send_request(req).await.map_err(|e| e.to_string())
}

/// A rustls client config from `m`: only its CA trusted, its certificate
/// shown.
fn client_config(
    m: &crate::tls::TlsMaterial,
) -> Result<tokio_rustls::rustls::ClientConfig, String> {
    use tokio_rustls::rustls::RootCertStore;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&m.ca) {
        roots
            .add(ca.map_err(|e| format!("CA: {e}"))?)
            .map_err(|e| format!("CA: {e}"))?;
    }
    let chain = CertificateDer::pem_slice_iter(&m.cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("certificate: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(&m.key).map_err(|e| format!("key: {e}"))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| format!("client certificate: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_only_on_loopback() {
        let lo: SocketAddr = "127.0.0.1:9100".parse().expect("addr");
        let any: SocketAddr = "0.0.0.0:9100".parse().expect("addr");
        assert!(check_listen(lo, false).is_ok());
        assert!(check_listen("[::1]:9100".parse().expect("addr"), false).is_ok());
        let e = check_listen(any, false).expect_err("plain off loopback");
        assert!(e.contains("tls_cert"), "{e}");
        assert!(check_listen(any, true).is_ok());
    }

    #[tokio::test]
    async fn metrics_are_served_and_other_paths_are_not() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = MetricsListener::bind("127.0.0.1:0".parse().expect("addr"), None)
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        assert!(l.url("n").starts_with("http://127.0.0.1:"));
        let token = CancellationToken::new();
        tokio::spawn(serve(
            l,
            || async { "x_total 1\n".to_owned() },
            token.clone(),
        ));
        let get = |path: &'static str| async move {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .expect("write");
            let mut out = String::new();
            s.read_to_string(&mut out).await.expect("read");
            out
        };
        let ok = get("/metrics").await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.contains("text/plain; version=0.0.4"), "{ok}");
        assert!(ok.ends_with("x_total 1\n"), "{ok}");
        assert!(get("/").await.starts_with("HTTP/1.1 404"));
        let url = l_url(addr);
        let text = fetch(&url, None, Duration::from_secs(5))
            .await
            .expect("fetch");
        assert_eq!(text, "x_total 1\n");
        token.cancel();
    }

    fn l_url(addr: SocketAddr) -> String {
        format!("http://{addr}/metrics")
    }

    /// A CA and two certificates from it (server for 127.0.0.1, client),
    /// and a certificate from another CA: their TLS files in `dir`.
    fn pki(
        dir: &std::path::Path,
    ) -> (
        crate::tls::TlsFiles,
        crate::tls::TlsFiles,
        crate::tls::TlsFiles,
    ) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca = |name: &str| {
            let key = KeyPair::generate().expect("key");
            let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let pem = p.self_signed(&key).expect("ca").pem();
            std::fs::write(dir.join(format!("{name}.pem")), &pem).expect("write");
            Issuer::new(p, key)
        };
        let ours = ca("ca");
        let theirs = ca("other-ca");
        let leaf = |name: &str, issuer: &Issuer<'_, KeyPair>, ca: &str| {
            let key = KeyPair::generate().expect("key");
            let cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])
                .expect("params")
                .signed_by(&key, issuer)
                .expect("leaf");
            let files = crate::tls::TlsFiles {
                cert: dir.join(format!("{name}.crt")),
                key: dir.join(format!("{name}.key")),
                ca: dir.join(format!("{ca}.pem")),
            };
            std::fs::write(&files.cert, cert.pem()).expect("write");
            std::fs::write(&files.key, key.serialize_pem()).expect("write");
            files
        };
        (
            leaf("server", &ours, "ca"),
            leaf("client", &ours, "ca"),
            leaf("stranger", &theirs, "ca"),
        )
    }

    #[tokio::test]
    async fn off_loopback_metrics_need_a_client_certificate_from_the_ca() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (server, client, stranger) = pki(dir.path());
        let tls = ReloadingTls::load(server).expect("tls");
        // Loopback stays plain even for a daemon with TLS.
        let plain = MetricsListener::bind("127.0.0.1:0".parse().expect("addr"), Some(tls.clone()))
            .await
            .expect("bind");
        assert!(plain.url("n").starts_with("http://"));
        // Any address but loopback is HTTPS: every interface, reached here
        // through 127.0.0.1.
        let l = MetricsListener::bind("0.0.0.0:0".parse().expect("addr"), Some(tls))
            .await
            .expect("bind");
        let port = l.local_addr().expect("addr").port();
        assert_eq!(l.url("halo1"), format!("https://halo1:{port}/metrics"));
        let token = CancellationToken::new();
        tokio::spawn(serve(
            l,
            || async { "x_total 1\n".to_owned() },
            token.clone(),
        ));
        let url = format!("https://127.0.0.1:{port}/metrics");
        let d = Duration::from_secs(5);
        let ok = fetch(&url, Some(&client.load().expect("load")), d).await;
        assert_eq!(ok.as_deref(), Ok("x_total 1\n"));
        let e = fetch(&url, Some(&stranger.load().expect("load")), d)
            .await
            .expect_err("a certificate from another CA was let in");
        assert!(e.contains(&url), "{e}");
        let e = fetch(&format!("http://127.0.0.1:{port}/metrics"), None, d)
            .await
            .expect_err("plain HTTP was answered off loopback");
        assert!(e.contains("127.0.0.1"), "{e}");
        token.cancel();
    }
}
