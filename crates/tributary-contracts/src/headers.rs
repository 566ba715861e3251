//! Kafka header names: the CloudEvents Kafka binding, W3C trace context, and the DLQ's.

/// CloudEvents `id`: the record's `envelope.event_id`.
pub const CE_ID: &str = "ce_id";
/// CloudEvents `type`: the value record's full name, e.g. `io.tributary.usage.UsageEvent`.
pub const CE_TYPE: &str = "ce_type";
/// CloudEvents `source`: the producing system, `envelope.source`.
pub const CE_SOURCE: &str = "ce_source";
/// CloudEvents `time`: `envelope.occurred_at` in RFC 3339.
pub const CE_TIME: &str = "ce_time";
/// CloudEvents `specversion`, always `1.0`.
pub const CE_SPECVERSION: &str = "ce_specversion";
/// The CloudEvents version we follow.
pub const CLOUDEVENTS_VERSION: &str = "1.0";
/// W3C trace context: the trace and parent span.
pub const TRACEPARENT: &str = "traceparent";
/// W3C trace context: vendor state.
pub const TRACESTATE: &str = "tracestate";
/// The business flow's correlation id, also in the envelope; in a header so that tools can
/// filter without decoding.
pub const CORRELATION_ID: &str = "correlation_id";

/// DLQ: a bounded error class (`decode`, `validation`, `unknown_reference`, ...).
pub const DLQ_ERROR_CLASS: &str = "dlq_error_class";
/// DLQ: the error message.
pub const DLQ_ERROR_MESSAGE: &str = "dlq_error_message";
/// DLQ: the topic the record was read from.
pub const DLQ_SOURCE_TOPIC: &str = "dlq_source_topic";
/// DLQ: its partition.
pub const DLQ_SOURCE_PARTITION: &str = "dlq_source_partition";
/// DLQ: its offset.
pub const DLQ_SOURCE_OFFSET: &str = "dlq_source_offset";
/// DLQ: attempts made before giving up.
pub const DLQ_ATTEMPTS: &str = "dlq_attempts";
/// DLQ: when the first attempt failed, RFC 3339.
pub const DLQ_FIRST_FAILURE_AT: &str = "dlq_first_failure_at";
/// DLQ: the service that dead-lettered the record.
pub const DLQ_SERVICE: &str = "dlq_service";
/// DLQ: the key of a dead-lettered timer (its value holds the timer as JSON).
pub const DLQ_TIMER_KEY: &str = "dlq_timer_key";
/// Set on a record re-published by `tributary dlq replay`: the DLQ offset it came from.
pub const REPLAYED_FROM: &str = "replayed_from";
