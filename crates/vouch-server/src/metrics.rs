//! Prometheus metrics: request counts and latency histograms per route and status,
//! recorded by one middleware that also writes the access log line; and the same per
//! answer type and response code for the ISO 8583 listener.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::AppState;

/// Latency buckets in seconds, from a fast cache hit to a stalled database.
const LATENCY_BUCKETS_SECS: [f64; 14] =
    [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    route: String,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Iso8583Labels {
    /// The answer's MTI, e.g. `0110`.
    mti: String,
    /// DE 39.
    response_code: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeliveryLabels {
    /// `delivered`, `retry` or `dead`.
    outcome: &'static str,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<RequestLabels, Histogram>,
    iso8583_messages: Family<Iso8583Labels, Counter>,
    iso8583_latency: Family<Iso8583Labels, Histogram>,
    tsm_deliveries: Family<DeliveryLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<RequestLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(LATENCY_BUCKETS_SECS)) as fn() -> Histogram,
        );
        let iso8583_messages = Family::<Iso8583Labels, Counter>::default();
        let iso8583_latency = Family::<Iso8583Labels, Histogram>::new_with_constructor(
            (|| Histogram::new(LATENCY_BUCKETS_SECS)) as fn() -> Histogram,
        );
        let mut registry = Registry::with_prefix("vouch");
        registry.register("http_requests", "HTTP requests by route and status", requests.clone());
        registry.register("http_request_duration_seconds", "HTTP request latency by route and status", latency.clone());
        registry.register(
            "iso8583_messages",
            "ISO 8583 requests answered, by answer MTI and response code",
            iso8583_messages.clone(),
        );
        registry.register(
            "iso8583_message_duration_seconds",
            "ISO 8583 time from whole request to answer, by answer MTI and response code",
            iso8583_latency.clone(),
        );
        let tsm_deliveries = Family::<DeliveryLabels, Counter>::default();
        registry.register(
            "tsm_deliveries",
            "Deliveries of relayed messages to service providers, by outcome",
            tsm_deliveries.clone(),
        );
        Metrics { registry, requests, latency, iso8583_messages, iso8583_latency, tsm_deliveries }
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Invariant: writing to a String cannot fail.
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("encoding to a String");
        text
    }

    /// Counts one ISO 8583 answer and the time taken to make it.
    pub fn observe_iso8583(&self, answer: &vouch_proto::iso8583::Message, elapsed: std::time::Duration) {
        let labels =
            Iso8583Labels { mti: answer.mti().to_string(), response_code: answer.get(39).unwrap_or("none").to_owned() };
        self.iso8583_messages.get_or_create(&labels).inc();
        self.iso8583_latency.get_or_create(&labels).observe(elapsed.as_secs_f64());
    }
}

impl Metrics {
    /// Counts one delivery round's outcomes.
    pub fn observe_deliveries(&self, round: &crate::tsm::DeliveryRound) {
        for (outcome, count) in [("delivered", round.delivered), ("retry", round.retried), ("dead", round.dead)] {
            if count > 0 {
                self.tsm_deliveries.get_or_create(&DeliveryLabels { outcome }).inc_by(count as u64);
            }
        }
    }
}

/// Labels by the route template, never the raw path, so ids do not explode the series.
pub async fn observe(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().to_string();
    let route = request.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_owned();
    let response = next.run(request).await;
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    let labels = RequestLabels { method, route, status };
    state.metrics.requests.get_or_create(&labels).inc();
    state.metrics.latency.get_or_create(&labels).observe(elapsed.as_secs_f64());
    tracing::info!(
        method = %labels.method,
        route = %labels.route,
        status,
        latency_ms = elapsed.as_secs_f64() * 1e3,
        "request"
    );
    response
}
