//! What `haloctl bench` asks a llama-server over HTTP: `GET /props` (slots,
//! context per slot, build), `GET /v1/models` (vocabulary size) and
//! `POST /completion` with the prompt as token ids, streamed, read up to the
//! last chunk, whose `timings` (`prompt_n`, `prompt_ms`, `predicted_n`,
//! `predicted_ms`, `cache_n`: `server_slot_stats::to_json` in llama.cpp's
//! `tools/server/server-common.cpp`) are the figures halo reports.

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, Uri, header};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_rustls::rustls;

/// Longest wait for one request (a deep prompt on a big model is slow).
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(1800);
/// Longest wait for a connection (TCP and TLS).
const CONNECT_DEADLINE: Duration = Duration::from_secs(10);
/// Largest answer read.
const MAX_ANSWER: usize = 16 << 20;

/// One llama-server instance, or a gateway in front of several.
#[derive(Debug, Clone)]
pub struct Server {
    base: String,
    api_key: String,
    /// For `https://` bases: trusts only the given CA.
    tls: Option<Arc<rustls::ClientConfig>>,
}
/// What `/props` and `/v1/models` say about the instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Props {
    /// Slots (`-np`).
    pub total_slots: u32,
    /// Context per slot.
    pub slot_ctx: u32,
    /// `build_info`.
    pub build_info: String,
    /// Tokens in the vocabulary.
    pub n_vocab: u32,
}

/// The server's own account of one completion.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
pub struct Timings {
    /// Prompt tokens taken from the slot's cache.
    #[serde(default)]
    pub cache_n: u64,
    /// Prompt tokens processed.
    pub prompt_n: u64,
    /// Time processing them, ms.
    pub prompt_ms: f64,
    /// Tokens generated.
    pub predicted_n: u64,
    /// Time generating them, ms.
    pub predicted_ms: f64,
}

/// One measured completion.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measured {
    /// From sending the request (connecting included) to the first
    /// streamed token, ms.
    pub ttft_ms: f64,
    /// The server's timings.
    pub timings: Timings,
}

impl Server {
    /// A client of the instance at `base` (`http://host:port`).
    pub fn new(base: &str, api_key: &str) -> Server {
        Server {
            base: base.trim_end_matches('/').to_owned(),
            api_key: api_key.to_owned(),
            tls: None,
        }
    }

    /// A client of `base` that may be `https://`, trusting only the CA in
    /// `ca_pem` (halo's: it signs the agents' gateway certificates).
    pub fn with_ca(base: &str, api_key: &str, ca_pem: &[u8]) -> anyhow::Result<Server> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca_pem) {
            roots.add(c.context("the CA certificate")?)?;
        }
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let mut s = Server::new(base, api_key);
        s.tls = Some(Arc::new(config));
        Ok(s)
    }

    fn request(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> anyhow::Result<Request<Full<Bytes>>> {
        let mut b = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header(header::CONTENT_TYPE, "application/json");
        if !self.api_key.is_empty() {
            b = b.header(header::AUTHORIZATION, format!("Bearer {}", self.api_key));
        }
        Ok(b.body(Full::new(body))?)
    }

    /// Sends `req` on a new connection (llama-server closes keep-alive
    /// connections after a few requests; a pooled one closed under a new
    /// request would fail a run for nothing), TLS for `https://`.
    async fn send(&self, mut req: Request<Full<Bytes>>) -> anyhow::Result<Response<Incoming>> {
        let uri = req.uri().clone();
        let https = uri.scheme_str() == Some("https");
        let host = uri
            .host()
            .ok_or_else(|| anyhow!("{}: no host", self.base))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let authority = uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .unwrap_or_default();
        *req.uri_mut() = uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .parse::<Uri>()?;
        req.headers_mut()
            .insert(header::HOST, header::HeaderValue::try_from(authority)?);
        let connect = async {
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            anyhow::Ok(tcp)
        };
        let tcp = tokio::time::timeout(CONNECT_DEADLINE, connect)
            .await
            .map_err(|_| anyhow!("{}: no connection in {CONNECT_DEADLINE:?}", self.base))?
            .with_context(|| format!("connecting to {}", self.base))?;
        if https {
            let config = self.tls.clone().ok_or_else(|| {
                anyhow!(
                    "{} is HTTPS: haloctl needs its certificate files (--tls-ca names the CA \
                     that signed the gateway's certificate)",
                    self.base
                )
            })?;
            let name = rustls::pki_types::ServerName::try_from(host.clone())?;
            let tls = tokio::time::timeout(
                CONNECT_DEADLINE,
                tokio_rustls::TlsConnector::from(config).connect(name, tcp),
            )
            .await
            .map_err(|_| anyhow!("{}: no TLS handshake in {CONNECT_DEADLINE:?}", self.base))?
            .with_context(|| format!("TLS to {}", self.base))?;
            Self::exchange(TokioIo::new(tls), req).await
        } else {
            Self::exchange(TokioIo::new(tcp), req).await
        }
    }

    async fn exchange<T>(io: T, req: Request<Full<Bytes>>) -> anyhow::Result<Response<Incoming>>
    where
        T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender.send_request(req).await?)
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> anyhow::Result<serde_json::Value> {
        let req = self.request(method, path, body)?;
        let fut = async {
            let resp = self
                .send(req)
                .await
                .with_context(|| format!("{}{path}", self.base))?;
            let status = resp.status();
            let body = http_body_util::Limited::new(resp.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| anyhow!("{}{path}: reading the answer: {e}", self.base))?
                .to_bytes();
            if !status.is_success() {
                bail!(
                    "{}{path} answered {status}: {}",
                    self.base,
                    String::from_utf8_lossy(&body[..body.len().min(300)])
                );
            }
            serde_json::from_slice(&body)
                .with_context(|| format!("{}{path}: the answer is not JSON", self.base))
        };
        tokio::time::timeout(REQUEST_DEADLINE, fut)
            .await
            .map_err(|_| anyhow!("{}{path}: no answer in {REQUEST_DEADLINE:?}", self.base))?
    }

    /// Slots, context per slot, build and vocabulary size.
    pub async fn props(&self) -> anyhow::Result<Props> {
        let p = self.call(Method::GET, "/props", Bytes::new()).await?;
        let m = self.call(Method::GET, "/v1/models", Bytes::new()).await?;
        let num = |v: &serde_json::Value, what: &str| -> anyhow::Result<u32> {
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| anyhow!("{}: no `{what}` in its answer", self.base))
        };
        Ok(Props {
            total_slots: num(&p["total_slots"], "total_slots")?,
            slot_ctx: num(&p["default_generation_settings"]["n_ctx"], "n_ctx")?,
            build_info: p["build_info"].as_str().unwrap_or_default().to_owned(),
            n_vocab: num(&m["data"][0]["meta"]["n_vocab"], "n_vocab")?,
        })
    }

    /// Waits (at most `deadline`) until `GET /v1/models` answers 200: a
    /// gateway that has learned a new user key.
    pub async fn wait_models(&self, deadline: Duration) -> anyhow::Result<()> {
        let until = Instant::now() + deadline;
        loop {
            match self.call(Method::GET, "/v1/models", Bytes::new()).await {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= until => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// Puts `prefix` into slot `slot`'s cache (one token generated, not
    /// timed).
    pub async fn fill(&self, slot: u32, prefix: &[u32]) -> anyhow::Result<Timings> {
        let body = serde_json::json!({
            "prompt": prefix,
            "n_predict": 1,
            "cache_prompt": true,
            "id_slot": slot,
        });
        let v = self
            .call(Method::POST, "/completion", Bytes::from(body.to_string()))
            .await?;
        Timings::deserialize(&v["timings"])
            .with_context(|| format!("{}/completion: no timings in the answer", self.base))
    }

    /// Sends `prompt` to slot `slot` and generates exactly `n_predict`
    /// tokens (end of text ignored), streamed; `cache_prompt` lets the
    /// slot reuse the prefix it holds.
    /// Through a gateway, `model` names the placement and `slot` is
    /// `None` (the gateway picks the replica).
    pub async fn complete(
        &self,
        slot: Option<u32>,
        model: Option<&str>,
        prompt: &[u32],
        n_predict: u32,
        cache_prompt: bool,
    ) -> anyhow::Result<Measured> {
        let mut body = serde_json::json!({
            "prompt": prompt,
            "n_predict": n_predict,
            "ignore_eos": true,
            "cache_prompt": cache_prompt,
            "stream": true,
            "return_tokens": true,
        });
        if let Some(s) = slot {
            body["id_slot"] = s.into();
        }
        if let Some(m) = model {
            body["model"] = m.into();
        }
        let req = self.request(Method::POST, "/completion", Bytes::from(body.to_string()))?;
        let start = Instant::now();
        let fut = async {
            let resp = self
                .send(req)
                .await
                .with_context(|| format!("{}/completion", self.base))?;
            let status = resp.status();
            let mut body = resp.into_body();
            if !status.is_success() {
                let b = http_body_util::Limited::new(body, MAX_ANSWER)
                    .collect()
                    .await
                    .map(|c| c.to_bytes())
                    .unwrap_or_default();
                bail!(
                    "{}/completion answered {status}: {}",
                    self.base,
                    String::from_utf8_lossy(&b[..b.len().min(300)])
                );
            }
            let mut sse = Sse::default();
            let mut ttft = None;
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| anyhow!("{}/completion: {e}", self.base))?;
                let Some(data) = frame.data_ref() else {
                    continue;
                };
                for ev in sse.push(data)? {
                    if ttft.is_none() && ev.first_token() {
                        ttft = Some(start.elapsed());
                    }
                    if let Some(t) = ev.timings()? {
                        let ttft = ttft.unwrap_or_else(|| start.elapsed());
                        return Ok(Measured {
                            ttft_ms: ttft.as_secs_f64() * 1000.0,
                            timings: t,
                        });
                    }
                    if let Some(e) = ev.error() {
                        bail!("{}/completion: {e}", self.base);
                    }
                }
            }
            bail!("{}/completion: the stream ended without timings", self.base)
        };
        tokio::time::timeout(REQUEST_DEADLINE, fut)
            .await
            .map_err(|_| {
                anyhow!(
                    "{}/completion: no answer in {REQUEST_DEADLINE:?}",
                    self.base
                )
            })?
    }
}

/// Server-sent events cut into `data:` lines.
#[derive(Debug, Default)]
struct Sse {
    buf: Vec<u8>,
}

/// One `data:` object.
#[derive(Debug)]
struct Event(serde_json::Value);

impl Sse {
    fn push(&mut self, bytes: &[u8]) -> anyhow::Result<Vec<Event>> {
        self.buf.extend_from_slice(bytes);
        if self.buf.len() > MAX_ANSWER {
            bail!("a streamed event is larger than {MAX_ANSWER} bytes");
        }
        let mut out = Vec::new();
        while let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=i).collect();
            let line = String::from_utf8_lossy(&line);
            let Some(data) = line.trim_end().strip_prefix("data:") else {
                continue;
            };
            let data = data.trim();
            if data.is_empty() || data == "[DONE]" {
                continue;
            }
            out.push(Event(
                serde_json::from_str(data).with_context(|| format!("a streamed event: {data}"))?,
            ));
        }
        Ok(out)
    }
}

impl Event {
    /// Whether the chunk carries a generated token (not the header-flushing
    /// first chunk).
    fn first_token(&self) -> bool {
        self.0["tokens"].as_array().is_some_and(|t| !t.is_empty())
            || self.0["content"].as_str().is_some_and(|c| !c.is_empty())
    }

    fn timings(&self) -> anyhow::Result<Option<Timings>> {
        if self.0["stop"].as_bool() != Some(true) {
            return Ok(None);
        }
        Ok(Some(
            Timings::deserialize(&self.0["timings"]).context("the last chunk's timings")?,
        ))
    }

    fn error(&self) -> Option<String> {
        let e = &self.0["error"];
        (!e.is_null()).then(|| {
            e["message"]
                .as_str()
                .map_or_else(|| e.to_string(), str::to_owned)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_chunks_are_joined_and_the_last_has_timings() {
        let mut s = Sse::default();
        assert!(
            s.push(b"data: {\"content\":\"\",\"tok")
                .expect("ok")
                .is_empty()
        );
        let ev = s
            .push(b"ens\":[]}\n\ndata: {\"content\":\"a\",\"tokens\":[65]}\n\n")
            .expect("ok");
        assert_eq!(ev.len(), 2);
        assert!(!ev[0].first_token());
        assert!(ev[1].first_token());
        let ev = s
            .push(b"data: {\"stop\":true,\"timings\":{\"cache_n\":3,\"prompt_n\":64,\"prompt_ms\":8.5,\"predicted_n\":16,\"predicted_ms\":20.0,\"prompt_per_second\":1}}\n\n")
            .expect("ok");
        let t = ev[0].timings().expect("parses").expect("present");
        assert_eq!((t.cache_n, t.prompt_n, t.predicted_n), (3, 64, 16));
        assert!(s.push(b"data: {not json}\n").is_err());
    }
}
