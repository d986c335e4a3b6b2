//! The gateway's Prometheus metrics, kept in memory and written as text
//! for `GET /metrics`. Label sets are bounded: model labels are names from
//! the routing table (or empty when a request named none that exists),
//! key labels are key names (or empty before authentication).

use proto::metrics::{Histogram, Kind, LATENCY_BUCKETS, Text};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A request's labels for `halo_gateway_requests_total`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct RequestLabels {
    model: String,
    mode: String,
    key: String,
    status: u16,
}

#[derive(Debug, Default)]
struct Inner {
    requests: BTreeMap<RequestLabels, u64>,
    ttfb: BTreeMap<String, Histogram>,
    duration: BTreeMap<String, Histogram>,
    queue_wait: BTreeMap<String, Histogram>,
    prompt_tokens: BTreeMap<String, u64>,
    completion_tokens: BTreeMap<String, u64>,
    queue_depth: BTreeMap<String, i64>,
    upstream_errors: BTreeMap<(String, &'static str), u64>,
}

/// Every metric the gateway exports.
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
    retries: AtomicU64,
}

impl Metrics {
    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    /// Counts one answered request.
    pub fn request(&self, model: &str, mode: &str, key: &str, status: u16) {
        self.with(|m| {
            let labels = RequestLabels {
                model: model.to_owned(),
                mode: mode.to_owned(),
                key: key.to_owned(),
                status,
            };
            *m.requests.entry(labels).or_default() += 1;
        });
    }

    /// Time from the request's arrival to the first body byte sent.
    pub fn first_byte(&self, model: &str, d: Duration) {
        self.with(|m| observe(&mut m.ttfb, model, d));
    }

    /// Time from the request's arrival to the end of its response.
    pub fn duration(&self, model: &str, d: Duration) {
        self.with(|m| observe(&mut m.duration, model, d));
    }

    /// Time a request waited for a ready replica.
    pub fn queue_wait(&self, model: &str, d: Duration) {
        self.with(|m| observe(&mut m.queue_wait, model, d));
    }

    /// Tokens a response's `usage` reported.
    pub fn tokens(&self, model: &str, prompt: u64, completion: u64) {
        self.with(|m| {
            add(&mut m.prompt_tokens, model, prompt);
            add(&mut m.completion_tokens, model, completion);
        });
    }

    /// A request starts (+1) or stops (-1) waiting for `model`.
    pub fn queue_depth(&self, model: &str, delta: i64) {
        self.with(|m| match m.queue_depth.get_mut(model) {
            Some(v) => *v += delta,
            None => {
                m.queue_depth.insert(model.to_owned(), delta);
            }
        });
    }

    /// One more attempt on another replica.
    pub fn retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    /// An upstream failure of a kind ("connect", "io", "status_502", …).
    pub fn upstream_error(&self, model: &str, kind: &'static str) {
        self.with(|m| {
            *m.upstream_errors
                .entry((model.to_owned(), kind))
                .or_default() += 1;
        });
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut t = Text::new();
        let retries = self.retries.load(Ordering::Relaxed);
        self.with(|m| {
            let name = "halo_gateway_requests_total";
            t.family(name, Kind::Counter, "Requests answered, by model, mode, key name and status.");
            for (l, v) in &m.requests {
                let status = l.status.to_string();
                t.int(
                    name,
                    &[("model", &l.model), ("mode", &l.mode), ("key", &l.key), ("status", &status)],
                    *v,
                );
            }
            histograms(&mut t, "halo_gateway_time_to_first_byte_seconds", "Time from a request's arrival to its first response byte (first token when streaming).", &m.ttfb);
            histograms(&mut t, "halo_gateway_request_duration_seconds", "Time from a request's arrival to the end of its response.", &m.duration);
            histograms(&mut t, "halo_gateway_queue_wait_seconds", "Time requests waited for a ready replica.", &m.queue_wait);
            counters(&mut t, "halo_gateway_prompt_tokens_total", "Prompt tokens, from the responses' usage.", &m.prompt_tokens);
            counters(&mut t, "halo_gateway_completion_tokens_total", "Completion tokens, from the responses' usage.", &m.completion_tokens);
            let name = "halo_gateway_queue_depth";
            t.family(name, Kind::Gauge, "Requests waiting for a ready replica now.");
            for (model, v) in &m.queue_depth {
                t.sample(name, &[("model", model)], *v as f64);
            }
            let name = "halo_gateway_upstream_errors_total";
            t.family(name, Kind::Counter, "Upstream failures, by model and kind.");
            for ((model, kind), v) in &m.upstream_errors {
                t.int(name, &[("model", model), ("kind", kind)], *v);
            }
        });
        let name = "halo_gateway_retries_total";
        t.family(
            name,
            Kind::Counter,
            "Requests sent again to another replica after a failure before any byte reached the client.",
        )
        .int(name, &[], retries);
        t.finish()
    }
}

fn observe(m: &mut BTreeMap<String, Histogram>, model: &str, d: Duration) {
    match m.get_mut(model) {
        Some(h) => h.observe(d.as_secs_f64()),
        None => {
            let mut h = Histogram::new(LATENCY_BUCKETS);
            h.observe(d.as_secs_f64());
            m.insert(model.to_owned(), h);
        }
    }
}

fn add(m: &mut BTreeMap<String, u64>, model: &str, n: u64) {
    if n == 0 {
        return;
    }
    match m.get_mut(model) {
        Some(v) => *v += n,
        None => {
            m.insert(model.to_owned(), n);
        }
    }
}

fn counters(t: &mut Text, name: &str, help: &str, m: &BTreeMap<String, u64>) {
    t.family(name, Kind::Counter, help);
    for (model, v) in m {
        t.int(name, &[("model", model)], *v);
    }
}

fn histograms(t: &mut Text, name: &str, help: &str, m: &BTreeMap<String, Histogram>) {
    t.family(name, Kind::Histogram, help);
    for (model, h) in m {
        t.histogram(name, &[("model", model)], h);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests unwrap what they built themselves.
mod tests {
    use super::*;

    #[test]
    fn metrics_render_as_prometheus_text() {
        let m = Metrics::default();
        m.request("tiny", "code", "alice", 200);
        m.request("tiny", "code", "alice", 200);
        m.first_byte("tiny", Duration::from_millis(3));
        m.tokens("tiny", 12, 5);
        m.queue_depth("tiny", 1);
        m.queue_depth("tiny", -1);
        m.upstream_error("tiny", "connect");
        m.retry();
        let t = m.render();
        assert!(t.contains(
            "halo_gateway_requests_total{model=\"tiny\",mode=\"code\",key=\"alice\",status=\"200\"} 2"
        ), "{t}");
        assert!(t.contains(
            "halo_gateway_time_to_first_byte_seconds_bucket{model=\"tiny\",le=\"0.0025\"} 0"
        ));
        assert!(t.contains(
            "halo_gateway_time_to_first_byte_seconds_bucket{model=\"tiny\",le=\"0.005\"} 1"
        ));
        assert!(t.contains("halo_gateway_prompt_tokens_total{model=\"tiny\"} 12"));
        assert!(t.contains("halo_gateway_completion_tokens_total{model=\"tiny\"} 5"));
        assert!(t.contains("halo_gateway_queue_depth{model=\"tiny\"} 0"));
        assert!(
            t.contains("halo_gateway_upstream_errors_total{model=\"tiny\",kind=\"connect\"} 1")
        );
        assert!(t.contains("halo_gateway_retries_total 1"));
    }
}
