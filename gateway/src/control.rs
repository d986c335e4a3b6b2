//! The gateway's calls to the controllers beyond reading routes: asking
//! for an on-demand model a request names (`Demand`) and reporting what
//! its requests use (`ReportUse`), so idle on-demand models unload and
//! busy ones never do. Each call tries the controllers in turn from the
//! last one that answered (only the leader decides; the others refuse).

use proto::v1;
use proto::v1::controller_service_client::ControllerServiceClient;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

/// Deadline of one Demand or ReportUse call.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// A boxed future of a link call.
pub type Call<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the gateway asks of the controllers (a trait, so the gateway's own
/// tests can stand in for them).
pub trait ControllerLink: Send + Sync + std::fmt::Debug {
    /// Asks for the on-demand catalog model `model` for a request with
    /// the user key `key_name`.
    fn demand<'a>(
        &'a self,
        model: &'a str,
        key_name: &'a str,
    ) -> Call<'a, Result<v1::DemandResponse, String>>;
    /// Reports what requests used since the last report.
    fn report_use(&self, uses: Vec<v1::ModelUse>) -> Call<'_, ()>;
    /// Asks the table's feed to read the routes again soon (a demanded
    /// model is loading: its readiness should reach requests at once).
    fn hurry(&self);
}

/// A lazily connected client of the controller at `url`.
pub fn dial(
    url: &str,
    tls: Option<&ClientTlsConfig>,
    timeout: Duration,
) -> Result<ControllerServiceClient<Channel>, String> {
    let ep = match tls {
        None => Endpoint::from_shared(url.to_owned()),
        Some(c) => Endpoint::from_shared(url.replacen("http://", "https://", 1))
            .and_then(|e| e.tls_config(c.clone())),
    }
    .map_err(|e| proto::error_chain(&e))?;
    let ep = ep
        .connect_timeout(timeout)
        .timeout(timeout)
        .tcp_nodelay(true);
    Ok(ControllerServiceClient::new(ep.connect_lazy())
        .max_decoding_message_size(proto::limits::CONTROLLER.max_response_bytes))
}

/// The controllers, dialled lazily.
#[derive(Debug)]
pub struct Controllers {
    urls: Vec<String>,
    tls: Option<ClientTlsConfig>,
    /// Who this gateway is, for the controller's events.
    name: String,
    clients: Mutex<(usize, Vec<Option<ControllerServiceClient<Channel>>>)>,
    hurry: Arc<Notify>,
}

impl Controllers {
    /// The controllers at `urls`; `hurry` is the feed's.
    pub fn new(
        urls: Vec<String>,
        tls: Option<ClientTlsConfig>,
        name: String,
        hurry: Arc<Notify>,
    ) -> Controllers {
        let n = urls.len();
        Controllers {
            urls,
            tls,
            name,
            clients: Mutex::new((0, vec![None; n])),
            hurry,
        }
    }

    /// The controllers to try, first the one that last answered.
    fn order(&self) -> Vec<(usize, ControllerServiceClient<Channel>)> {
        let mut g = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        let n = self.urls.len();
        let first = g.0;
        (0..n)
            .map(|k| (first + k) % n)
            .filter_map(|i| {
                if g.1[i].is_none() {
                    g.1[i] = dial(&self.urls[i], self.tls.as_ref(), CALL_TIMEOUT).ok();
                }
                g.1[i].clone().map(|c| (i, c))
            })
            .collect()
    }

    fn answered(&self, i: usize) {
        self.clients.lock().unwrap_or_else(|p| p.into_inner()).0 = i;
    }
}

impl ControllerLink for Controllers {
    fn demand<'a>(
        &'a self,
        model: &'a str,
        key_name: &'a str,
    ) -> Call<'a, Result<v1::DemandResponse, String>> {
        Box::pin(async move {
            let mut last = String::from("no controller configured");
            for (i, mut c) in self.order() {
                let req = v1::DemandRequest {
                    model: model.to_owned(),
                    gateway: self.name.clone(),
                    key_name: key_name.to_owned(),
                };
                match tokio::time::timeout(CALL_TIMEOUT, c.demand(req)).await {
                    Ok(Ok(r)) => {
                        self.answered(i);
                        return Ok(r.into_inner());
                    }
                    Ok(Err(s)) => last = format!("{}: {}", self.urls[i], s.message()),
                    Err(_) => last = format!("{}: no answer within {CALL_TIMEOUT:?}", self.urls[i]),
                }
            }
            Err(last)
        })
    }

    fn report_use(&self, uses: Vec<v1::ModelUse>) -> Call<'_, ()> {
        Box::pin(async move {
            for (i, mut c) in self.order() {
                let req = v1::ReportUseRequest {
                    gateway: self.name.clone(),
                    uses: uses.clone(),
                };
                if let Ok(Ok(_)) = tokio::time::timeout(CALL_TIMEOUT, c.report_use(req)).await {
                    self.answered(i);
                    return;
                }
            }
        })
    }

    fn hurry(&self) {
        self.hurry.notify_one();
    }
}
