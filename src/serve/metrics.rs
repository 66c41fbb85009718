//! The server's Prometheus metrics (`GET /metrics`, OpenMetrics text).
//!
//! The HTTP side counts requests, tokens and timings; the batching loop sets the gauges it
//! alone knows ([`Metrics::busy_slots`], [`Metrics::kv_cells_used`]); the queue length is read
//! from the queue when scraped.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels of the request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The route's pattern (`/v1/chat/completions`), not the raw path.
    pub route: String,
    pub status: u16,
}

/// Every metric, shared by the HTTP side and the loop.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    /// Jobs waiting in the queue (set when scraped).
    pub queue_length: Gauge,
    /// Sequence slots generating or processing a prompt (set by the loop).
    pub busy_slots: Gauge,
    /// KV-cache cells in use (set by the loop).
    pub kv_cells_used: Gauge,
    pub prompt_tokens: Counter,
    pub generated_tokens: Counter,
    pub time_to_first_token: Histogram,
    pub time_per_output_token: Histogram,
    pub request_duration: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    #[must_use]
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("falcon");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "HTTP requests by route and status",
            requests.clone(),
        );
        let queue_length = Gauge::default();
        registry.register(
            "queue_length",
            "Requests waiting for a sequence slot",
            queue_length.clone(),
        );
        let busy_slots = Gauge::default();
        registry.register("busy_slots", "Sequence slots in use", busy_slots.clone());
        let kv_cells_used = Gauge::default();
        registry.register(
            "kv_cache_cells_used",
            "KV-cache cells in use",
            kv_cells_used.clone(),
        );
        let prompt_tokens = Counter::default();
        registry.register(
            "prompt_tokens",
            "Prompt tokens of accepted requests",
            prompt_tokens.clone(),
        );
        let generated_tokens = Counter::default();
        registry.register(
            "generated_tokens",
            "Tokens generated",
            generated_tokens.clone(),
        );
        // 1 ms .. ~65 s
        let time_to_first_token = Histogram::new(exponential_buckets(0.001, 2.0, 17));
        registry.register(
            "time_to_first_token_seconds",
            "From queueing a request to its first generated token",
            time_to_first_token.clone(),
        );
        // 0.5 ms .. ~16 s
        let time_per_output_token = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register(
            "time_per_output_token_seconds",
            "Mean time between generated tokens of a request, after the first",
            time_per_output_token.clone(),
        );
        let request_duration = Histogram::new(exponential_buckets(0.001, 2.0, 20));
        registry.register(
            "request_duration_seconds",
            "From receiving a request to its last byte",
            request_duration.clone(),
        );
        Metrics {
            registry,
            requests,
            queue_length,
            busy_slots,
            kv_cells_used,
            prompt_tokens,
            generated_tokens,
            time_to_first_token,
            time_per_output_token,
            request_duration,
        }
    }

    /// Counts one answered request.
    pub fn count_request(&self, route: &str, status: u16) {
        self.requests
            .get_or_create(&RequestLabels {
                route: route.to_string(),
                status,
            })
            .inc();
    }

    /// The OpenMetrics text of every metric.
    #[must_use]
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// `Content-Type` of [`Metrics::encode`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_exposed() {
        let m = Metrics::new();
        m.count_request("/generate", 200);
        m.count_request("/generate", 200);
        m.busy_slots.set(3);
        m.kv_cells_used.set(1234);
        m.generated_tokens.inc_by(7);
        m.time_to_first_token.observe(0.02);
        let text = m.encode();
        for want in [
            r#"falcon_requests_total{route="/generate",status="200"} 2"#,
            "falcon_queue_length 0",
            "falcon_busy_slots 3",
            "falcon_kv_cache_cells_used 1234",
            "falcon_prompt_tokens_total 0",
            "falcon_generated_tokens_total 7",
            "falcon_time_to_first_token_seconds_count 1",
            "falcon_time_per_output_token_seconds_count 0",
            "falcon_request_duration_seconds_count 0",
            "# EOF",
        ] {
            assert!(text.contains(want), "{want} missing from\n{text}");
        }
    }
}
