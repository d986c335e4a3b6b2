//! `haloctl gateway`: the OpenAI-compatible gateway on a workstation, so the
//! editor's front door survives the loss of any one node. The same gateway
//! every `halo-agent` can serve (`gateway_listen`), fed by the controllers
//! named here and by the agents' watch streams.

use crate::Failure;
use crate::cli::GatewayArgs;
use crate::client::Target;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Serves until SIGINT (Ctrl-C) or SIGTERM.
pub fn run(t: &Target, a: &GatewayArgs) -> Result<(), Failure> {
    let https = match (&a.https_cert, &a.https_key) {
        (Some(c), Some(k)) => Some(
            gateway::server::tls_acceptor(c, k)
                .map_err(|e| Failure::Usage(format!("HTTPS: {e}")))?,
        ),
        _ => {
            gateway::server::check_plain_listen(a.listen, &a.plain_http_on)
                .map_err(Failure::Usage)?;
            None
        }
    };
    let controllers = if a.controllers.is_empty() {
        vec![t.url.clone()]
    } else {
        a.controllers.iter().map(|c| c.trim().to_owned()).collect()
    };
    if t.tls.is_none()
        && let Some(c) = controllers.iter().find(|c| c.starts_with("https://"))
    {
        return Err(Failure::Usage(format!(
            "{c} speaks mutual TLS and haloctl has no client certificate: pass --tls-cert, \
             --tls-key and --tls-ca (a gateway or admin certificate from `haloctl certs issue`)"
        )));
    }
    // Its access log and its warnings (no controller answers, a replica
    // failed) go to stderr like the daemons' (`HALO_LOG`).
    proto::runtime::init_tracing();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Failure::Other(anyhow::anyhow!("starting the async runtime: {e}")))?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(a.listen)
            .await
            .map_err(|e| Failure::Usage(format!("cannot listen on {}: {e}", a.listen)))?;
        let shutdown = CancellationToken::new();
        let mut feed = gateway::feed::FeedConfig::new(controllers.clone(), t.tls.clone());
        feed.name = format!("workstation {}", a.listen);
        let (table, link) = gateway::feed::spawn_linked(feed, shutdown.child_token());
        let config = gateway::config::GatewayConfig {
            queue_timeout: Duration::from_secs(a.queue_timeout),
            ..Default::default()
        };
        let scheme = if https.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://{}", listener.local_addr().unwrap_or(a.listen));
        eprintln!(
            "halo gateway on {url} (OpenAI base URL {url}/v1), routes from {}",
            controllers.join(", ")
        );
        let gw = gateway::server::Gateway::new(config, table);
        gw.set_controller(link);
        let serve = tokio::spawn(gw.serve(listener, https, shutdown.clone()));
        tokio::spawn(proto::runtime::cancel_on_signal(shutdown.clone()));
        shutdown.cancelled().await;
        eprintln!("halo gateway: stopping");
        let _ = tokio::time::timeout(Duration::from_secs(5), serve).await;
        Ok(())
    })
}
