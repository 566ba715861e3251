//! The metrics every Tributary service exposes, registered into a registry passed in.
//!
//! Names follow Prometheus conventions (`_total` for counters, `_seconds` for durations) and
//! carry only bounded labels: topics, stages, error classes, partitions. Never a customer or
//! account id, since those would make the series count grow with the customer base.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Prefix of every metric name, so that a shared Prometheus can tell ours apart.
pub const METRIC_PREFIX: &str = "tributary";

/// Labels naming a Kafka topic.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TopicLabels {
    /// The topic name.
    pub topic: String,
}

/// Labels naming one partition of a topic.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabels {
    /// The topic name.
    pub topic: String,
    /// The partition number.
    pub partition: i32,
}

/// Labels of an error: what kind, and where in the pipeline it happened.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// A bounded error class, such as `decode`, `validation`, `downstream_unavailable`.
    pub class: String,
    /// The pipeline stage: `decode`, `process`, `produce`, `commit`, `side_effect`.
    pub stage: String,
}

/// Labels of a dead-letter write.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DlqLabels {
    /// The topic the failed record came from.
    pub source_topic: String,
    /// The error class recorded in the DLQ headers.
    pub class: String,
}

/// Labels naming a stage of processing.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    /// The pipeline stage.
    pub stage: String,
}

/// Labels of a transaction's end.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `committed` or `aborted`.
    pub outcome: String,
}

/// Labels naming a circuit breaker.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CircuitLabels {
    /// The downstream system the breaker protects, such as `erp`.
    pub circuit: String,
}

/// Labels of the service-info metric.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InfoLabels {
    service: String,
    version: String,
}

/// Circuit states as gauge values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    /// Calls flow.
    Closed = 0,
    /// One trial call is allowed.
    HalfOpen = 1,
    /// Calls are refused; the affected partitions are paused.
    Open = 2,
}

/// The errors the runtime itself counts, as (class, stage): an input that does not decode, a
/// failed consume, a failed commit.
pub const RUNTIME_ERRORS: [(&str, &str); 3] = [("decode", "decode"), ("consume", "consume"), ("commit", "commit")];

/// The stages whose transient failures are retried.
pub const RETRIED_STAGES: [&str; 3] = ["process", "produce", "timer"];

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Latency buckets from 1 ms to about 33 s: wide enough for a record's processing and for an
/// end-to-end delay that includes a commit interval and a downstream retry.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// The metrics the stream runtime records for every service (DESIGN.md, "Operations").
#[derive(Debug, Clone)]
pub struct ServiceMetrics {
    /// Records read from input topics.
    pub records_consumed: Family<TopicLabels, Counter>,
    /// Records written to output topics (outputs, changelogs and DLQ alike).
    pub records_produced: Family<TopicLabels, Counter>,
    /// Errors by class and stage.
    pub errors: Family<ErrorLabels, Counter>,
    /// Records written to the service's dead-letter topic.
    pub dlq_writes: Family<DlqLabels, Counter>,
    /// Retries of transient failures.
    pub retries: Family<StageLabels, Counter>,
    /// Inputs skipped because their idempotency key was already recorded.
    pub duplicates_skipped: Family<TopicLabels, Counter>,
    /// Time from taking a record to having its outputs ready, per input topic.
    pub processing_seconds: HistogramFamily<TopicLabels>,
    /// Time from the input event's `occurred_at` to the commit of its outputs.
    pub end_to_end_seconds: HistogramFamily<TopicLabels>,
    /// Time spent committing one transaction.
    pub transaction_commit_seconds: Histogram,
    /// Transactions by outcome.
    pub transactions: Family<OutcomeLabels, Counter>,
    /// Records between the committed position and the end of each assigned partition.
    pub consumer_lag: Family<PartitionLabels, Gauge>,
    /// State of each circuit breaker, see [`CircuitState`].
    pub circuit_state: Family<CircuitLabels, Gauge>,
    /// State records restored from changelogs on partition assignment.
    pub state_records_restored: Family<TopicLabels, Counter>,
    /// Partitions stopped by an internal error (state that cannot be read, a panic): each needs
    /// a fix and a restart. Alert on anything above zero.
    pub partitions_stopped: Counter,
}

impl ServiceMetrics {
    /// Creates the metrics and registers them, under [`METRIC_PREFIX`], with a `service_info`
    /// gauge naming the service and its version.
    pub fn register(registry: &mut Registry, service: &str) -> Self {
        Self::register_with_prefix(registry, METRIC_PREFIX, service)
    }

    /// The same metrics under another prefix, for a second stream runtime in one process (the
    /// outbound relays, `tributary_relay_*`), so that no metric name is registered twice.
    pub fn register_with_prefix(registry: &mut Registry, prefix: &str, service: &str) -> Self {
        let metrics = Self {
            records_consumed: Family::default(),
            records_produced: Family::default(),
            errors: Family::default(),
            dlq_writes: Family::default(),
            retries: Family::default(),
            duplicates_skipped: Family::default(),
            processing_seconds: Family::new_with_constructor(latency_histogram),
            end_to_end_seconds: Family::new_with_constructor(latency_histogram),
            transaction_commit_seconds: latency_histogram(),
            transactions: Family::default(),
            consumer_lag: Family::default(),
            circuit_state: Family::default(),
            state_records_restored: Family::default(),
            partitions_stopped: Counter::default(),
        };
        let r = registry.sub_registry_with_prefix(prefix);
        let info: Family<InfoLabels, Gauge> = Family::default();
        info.get_or_create(&InfoLabels { service: service.to_owned(), version: env!("CARGO_PKG_VERSION").to_owned() })
            .set(1);
        r.register("service_info", "The service and its version", info);
        r.register("records_consumed", "Records read from input topics", metrics.records_consumed.clone());
        r.register("records_produced", "Records written to output topics", metrics.records_produced.clone());
        r.register("errors", "Errors by class and stage", metrics.errors.clone());
        r.register("dlq_records", "Records written to the dead-letter topic", metrics.dlq_writes.clone());
        r.register("retries", "Retries of transient failures", metrics.retries.clone());
        r.register(
            "duplicates_skipped",
            "Inputs skipped because their idempotency key was already recorded",
            metrics.duplicates_skipped.clone(),
        );
        r.register("processing_seconds", "Time to process one input record", metrics.processing_seconds.clone());
        r.register(
            "end_to_end_seconds",
            "Time from an input's occurred_at to the commit of its outputs",
            metrics.end_to_end_seconds.clone(),
        );
        r.register(
            "transaction_commit_seconds",
            "Time to commit one Kafka transaction",
            metrics.transaction_commit_seconds.clone(),
        );
        r.register("transactions", "Kafka transactions by outcome", metrics.transactions.clone());
        r.register(
            "consumer_lag",
            "Records between the committed offset and the end of an assigned partition",
            metrics.consumer_lag.clone(),
        );
        r.register(
            "circuit_state",
            "Circuit breaker state: 0 closed, 1 half-open, 2 open",
            metrics.circuit_state.clone(),
        );
        r.register(
            "partitions_stopped",
            "Partitions stopped by an internal error until the service is fixed and restarted",
            metrics.partitions_stopped.clone(),
        );
        r.register(
            "state_records_restored",
            "State records restored from changelog topics",
            metrics.state_records_restored.clone(),
        );
        metrics
    }

    /// Creates, at zero, the series that exist from the start: per input topic, what is
    /// consumed, skipped, dead-lettered and timed; per output topic, what is produced; the
    /// errors and retries of the runtime's own stages; both transaction outcomes. An alert on
    /// `increase(...)` then sees the first event (a series born at 1 shows no increase), and a
    /// dashboard shows 0 rather than "no data". Errors of a processor's own classes, circuits
    /// and lag appear when they exist: when the class first occurs, the circuit is built, and
    /// the partition is assigned.
    pub fn declare(&self, inputs: &[String], outputs: &[String]) {
        for topic in inputs {
            let labels = TopicLabels { topic: topic.clone() };
            let _ = self.records_consumed.get_or_create(&labels);
            let _ = self.duplicates_skipped.get_or_create(&labels);
            let _ = self.processing_seconds.get_or_create(&labels);
            let _ = self.end_to_end_seconds.get_or_create(&labels);
            let _ = self.dlq_writes.get_or_create(&DlqLabels { source_topic: topic.clone(), class: "decode".into() });
        }
        for topic in outputs {
            let _ = self.records_produced.get_or_create(&TopicLabels { topic: topic.clone() });
        }
        for (class, stage) in RUNTIME_ERRORS {
            let _ = self.errors.get_or_create(&ErrorLabels { class: class.into(), stage: stage.into() });
        }
        for stage in RETRIED_STAGES {
            let _ = self.retries.get_or_create(&StageLabels { stage: stage.into() });
        }
        for outcome in ["committed", "aborted"] {
            let _ = self.transactions.get_or_create(&OutcomeLabels { outcome: outcome.into() });
        }
    }

    /// Counts one error of `class` at `stage`.
    pub fn error(&self, class: &str, stage: &str) {
        self.errors.get_or_create(&ErrorLabels { class: class.to_owned(), stage: stage.to_owned() }).inc();
    }

    /// Sets the state of the circuit breaker named `circuit`.
    pub fn set_circuit(&self, circuit: &str, state: CircuitState) {
        self.circuit_state.get_or_create(&CircuitLabels { circuit: circuit.to_owned() }).set(state as i64);
    }
}

/// Renders a registry in the Prometheus/OpenMetrics text format.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail: fmt::Write for String is infallible.
    prometheus_client::encoding::text::encode(&mut out, registry).expect("writing metrics into a String cannot fail");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_required_metric_is_exposed_with_the_prefix() {
        let mut registry = Registry::default();
        let metrics = ServiceMetrics::register(&mut registry, "usage-ingest");
        // Families without a labelled child print nothing, as Prometheus expects: touch each.
        let topic = TopicLabels { topic: "usage.events".into() };
        metrics.records_consumed.get_or_create(&topic).inc();
        metrics.records_produced.get_or_create(&topic).inc();
        metrics.error("decode", "decode");
        metrics
            .dlq_writes
            .get_or_create(&DlqLabels { source_topic: "usage.events".into(), class: "decode".into() })
            .inc();
        metrics.retries.get_or_create(&StageLabels { stage: "produce".into() }).inc();
        metrics.duplicates_skipped.get_or_create(&topic).inc();
        metrics.processing_seconds.get_or_create(&topic).observe(0.002);
        metrics.end_to_end_seconds.get_or_create(&topic).observe(0.2);
        metrics.transactions.get_or_create(&OutcomeLabels { outcome: "committed".into() }).inc();
        metrics.consumer_lag.get_or_create(&PartitionLabels { topic: "usage.events".into(), partition: 0 }).set(5);
        metrics.set_circuit("erp", CircuitState::Open);
        let text = encode(&registry);
        for name in [
            "tributary_service_info",
            "tributary_records_consumed_total",
            "tributary_records_produced",
            "tributary_errors",
            "tributary_dlq_records",
            "tributary_retries",
            "tributary_duplicates_skipped",
            "tributary_processing_seconds",
            "tributary_end_to_end_seconds",
            "tributary_transaction_commit_seconds",
            "tributary_transactions",
            "tributary_consumer_lag",
            "tributary_circuit_state",
        ] {
            assert!(text.contains(name), "metric {name} missing from:\n{text}");
        }
        assert!(text.contains(r#"tributary_records_consumed_total{topic="usage.events"} 1"#));
        assert!(text.contains(r#"tributary_errors_total{class="decode",stage="decode"} 1"#));
        assert!(text.contains(r#"service="usage-ingest""#));
        assert!(text.contains(r#"tributary_circuit_state{circuit="erp"} 2"#), "{text}");
    }
}
