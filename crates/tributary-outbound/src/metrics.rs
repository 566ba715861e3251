//! What the relays report, per endpoint (a bounded name from configuration, never a URL):
//!
//! - `tributary_webhook_deliveries_total{endpoint,outcome}`: deliveries finished: `delivered`,
//!   `refused`, `retries_exhausted`, or `filtered` (not for this endpoint);
//! - `tributary_webhook_attempts_total{endpoint,result}`: attempts by answer: `2xx`, `3xx`,
//!   `4xx`, `5xx`, or no answer: `timeout`, `connect`, `transport`;
//! - `tributary_webhook_attempt_seconds{endpoint}`: from sending to the answer;
//! - `tributary_webhook_oldest_undelivered_age_seconds{endpoint}`: age of the oldest record not
//!   yet delivered that this instance knows of (waiting for a retry, or held by an open
//!   circuit), 0 when none;
//! - `tributary_webhook_waiting{endpoint}`: deliveries waiting for a retry on this instance;
//! - the circuit: `tributary_circuit_state{circuit="webhook.<endpoint>"}`, with the service's
//!   other circuits.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::http::{Answer, SendError};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    endpoint: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    endpoint: String,
    outcome: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    endpoint: String,
    result: String,
}

/// The families, registered once per service.
#[derive(Debug, Clone)]
pub struct OutboundMetrics {
    deliveries: Family<OutcomeLabels, Counter>,
    attempts: Family<ResultLabels, Counter>,
    attempt_seconds: Family<EndpointLabels, Histogram>,
    oldest_undelivered: Family<EndpointLabels, Gauge>,
    waiting: Family<EndpointLabels, Gauge>,
}

fn attempt_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

impl OutboundMetrics {
    /// Creates the families and registers them in `registry` (the service's).
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            deliveries: Family::default(),
            attempts: Family::default(),
            attempt_seconds: Family::new_with_constructor(attempt_histogram),
            oldest_undelivered: Family::default(),
            waiting: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("tributary_webhook");
        r.register("deliveries", "Deliveries finished, by endpoint and outcome", metrics.deliveries.clone());
        r.register("attempts", "Delivery attempts, by endpoint and answer", metrics.attempts.clone());
        r.register("attempt_seconds", "From sending a delivery to its answer", metrics.attempt_seconds.clone());
        r.register(
            "oldest_undelivered_age_seconds",
            "Age of the oldest record not yet delivered (waiting for a retry or an open circuit)",
            metrics.oldest_undelivered.clone(),
        );
        r.register("waiting", "Deliveries waiting for a retry", metrics.waiting.clone());
        metrics
    }

    /// The handles of one endpoint.
    pub fn endpoint(&self, endpoint: &str) -> EndpointMetrics {
        let labels = EndpointLabels { endpoint: endpoint.to_owned() };
        // Every series exists from the start, so that a dashboard shows 0 rather than nothing.
        for outcome in ["delivered", "refused", "retries_exhausted", "filtered"] {
            let _ = self
                .deliveries
                .get_or_create(&OutcomeLabels { endpoint: endpoint.to_owned(), outcome: outcome.into() });
        }
        EndpointMetrics {
            endpoint: endpoint.to_owned(),
            families: self.clone(),
            attempt_seconds: self.attempt_seconds.get_or_create(&labels).clone(),
            oldest_undelivered: self.oldest_undelivered.get_or_create(&labels).clone(),
            waiting: self.waiting.get_or_create(&labels).clone(),
        }
    }
}

/// One endpoint's handles.
#[derive(Debug, Clone)]
pub struct EndpointMetrics {
    endpoint: String,
    families: OutboundMetrics,
    attempt_seconds: Histogram,
    oldest_undelivered: Gauge,
    waiting: Gauge,
}

impl EndpointMetrics {
    /// Handles that count into a registry of their own (tests).
    pub fn unregistered(endpoint: &str) -> Self {
        OutboundMetrics::register(&mut Registry::default()).endpoint(endpoint)
    }

    pub(crate) fn attempted(&self, sent: &Result<Answer, SendError>, latency: Duration) {
        let result = match sent {
            Ok(answer) => format!("{}xx", answer.status / 100),
            Err(error) => error.class().to_owned(),
        };
        self.families.attempts.get_or_create(&ResultLabels { endpoint: self.endpoint.clone(), result }).inc();
        self.attempt_seconds.observe(latency.as_secs_f64());
    }

    pub(crate) fn finished(&self, outcome: &str) {
        self.families
            .deliveries
            .get_or_create(&OutcomeLabels { endpoint: self.endpoint.clone(), outcome: outcome.to_owned() })
            .inc();
    }

    pub(crate) fn set_undelivered(&self, oldest_age_seconds: i64, waiting: usize) {
        self.oldest_undelivered.set(oldest_age_seconds);
        self.waiting.set(i64::try_from(waiting).unwrap_or(i64::MAX));
    }
}
