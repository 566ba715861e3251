//! `POST /v1/events`: CloudEvents over HTTP for platforms that cannot write to Kafka.
//!
//! Every content mode of the CloudEvents HTTP protocol binding is taken: binary (the
//! attributes in `ce-*` headers, the data alone as the body: the SDKs' default), structured
//! (one event, `application/cloudevents+json`) and batched
//! (`application/cloudevents-batch+json`), in the shape OpenMeter ingests, so a platform
//! already sending to OpenMeter only changes its URL and key (`/api/v1/events` is served too).
//! A request is all or nothing: every event is checked with the same rules as the Kafka path,
//! and when any is refused the answer is 400 with a reason per refused event and nothing is
//! written, so that the sender fixes and resends the batch as it was. Accepted events are
//! written to `usage.events` by an idempotent producer (`acks=all`) and 202 is answered only
//! once Kafka has them; resending after a timeout is safe, since duplicates (same `source`
//! and `id`) are counted once downstream. Refusals are RFC 9457 problem details. Each request
//! is a server span continuing the caller's trace, and every record written carries it on.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use chrono::{DateTime, Utc};
use futures::future::join_all;
use percent_encoding::percent_decode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::Instrument as _;
use tributary_contracts::codec::Codec;
use tributary_contracts::topics;
use tributary_contracts::types::{Envelope, UsageEvent};
use tributary_runtime::config::KafkaConfig;
use tributary_telemetry::trace;
use uuid::Uuid;

use crate::meters::{Meters, Rejection, TimeBounds, quantity_from_json};

/// Namespace of the envelope ids of events that arrive over HTTP: the id is a function of
/// `source` and `id`, so a resent event has the same envelope too.
const HTTP_EVENT_NAMESPACE: Uuid = Uuid::from_u128(0x7d3c_2a51_8e0f_4b6a_a1c4_7573_6167_6521);

/// A flow id the sender may pass on; it becomes the events' correlation id.
const CORRELATION_HEADER: &str = "x-correlation-id";

const SINGLE: &str = "application/cloudevents+json";
const BATCH: &str = "application/cloudevents-batch+json";
const PROBLEM_JSON: &str = "application/problem+json";
/// The prefix of the headers that carry a binary-mode event's attributes.
const CE_HEADER_PREFIX: &str = "ce-";

/// Request outcomes by status code.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    /// The HTTP status code.
    pub status: u16,
}

/// Request durations by status class.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusClassLabels {
    /// `2xx`, `4xx` or `5xx`.
    pub status_class: &'static str,
}

/// The classes every answer falls in, created at zero so that an alert on 5xx sees the first.
const STATUS_CLASSES: [&str; 3] = ["2xx", "4xx", "5xx"];

type DurationFamily = Family<StatusClassLabels, Histogram, fn() -> Histogram>;

/// HTTP metrics.
#[derive(Debug, Clone)]
pub struct HttpMetrics {
    /// Requests by answer.
    pub requests: Family<StatusLabels, Counter>,
    /// Time to answer, from the request's arrival to its answer, by status class.
    pub request_seconds: DurationFamily,
    /// Events accepted and written to Kafka.
    pub events_accepted: Counter,
    /// Events refused with a reason.
    pub events_rejected: Counter,
}

impl Default for HttpMetrics {
    fn default() -> Self {
        // From 1 ms to about 16 s: an answer waits for Kafka's acknowledgement of every event.
        let request_seconds: DurationFamily =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.001, 2.0, 15)));
        for status_class in STATUS_CLASSES {
            let _ = request_seconds.get_or_create(&StatusClassLabels { status_class });
        }
        Self {
            requests: Family::default(),
            request_seconds,
            events_accepted: Counter::default(),
            events_rejected: Counter::default(),
        }
    }
}

/// What the handler needs.
pub struct Ingress {
    /// Meters, to refuse what the Kafka path would dead-letter.
    pub meters: Arc<Meters>,
    /// Time bounds of event times.
    pub bounds: TimeBounds,
    /// The accepted keys.
    pub api_keys: Vec<String>,
    /// Most events in one request.
    pub max_batch_events: usize,
    /// Longest wait for Kafka.
    pub produce_timeout: Duration,
    /// The writer of `usage.events`.
    pub producer: FutureProducer,
    /// Where it writes.
    pub topic: String,
    /// Encoder of the values.
    pub codec: Codec,
    /// The service's clock: what "now" is for the time bounds and `received_at`.
    pub clock: tributary_runtime::Clock,
    /// Metrics.
    pub metrics: HttpMetrics,
}

impl std::fmt::Debug for Ingress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingress")
            .field("topic", &self.topic)
            .field("api_keys", &self.api_keys.len())
            .finish_non_exhaustive()
    }
}

/// An idempotent producer (`acks=all`) for `usage.events` that gives up on a record after
/// `timeout`: a request is answered 503 then, instead of hanging for librdkafka's default of
/// five minutes while Kafka is unreachable.
pub fn producer(kafka: &KafkaConfig, timeout: Duration) -> anyhow::Result<FutureProducer> {
    Ok(tributary_runtime::kafka::producer_config(kafka)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", timeout.as_millis().max(1).to_string())
        .create()?)
}

/// The router: `POST /v1/events` and its OpenMeter alias `/api/v1/events`.
pub fn router(ingress: Arc<Ingress>, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/v1/events", post(ingest))
        .route("/api/v1/events", post(ingest))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(ingress)
}

/// One CloudEvent as OpenMeter accepts it, plus optional extension attributes that map to the
/// explicit fields of `usage.events`.
#[derive(Debug, Deserialize)]
struct CloudEvent {
    specversion: String,
    id: String,
    source: String,
    #[serde(rename = "type")]
    event_type: String,
    subject: Option<String>,
    time: Option<String>,
    #[serde(default)]
    datacontenttype: Option<String>,
    #[serde(default)]
    data: Option<Value>,
    /// Extension: the subscription, when the platform knows it.
    #[serde(default)]
    subscriptionid: Option<String>,
    /// Extension: the meter key, when the platform knows it.
    #[serde(default)]
    meter: Option<String>,
    /// Extension: an explicit quantity (a number or a decimal string).
    #[serde(default)]
    quantity: Option<Value>,
    /// Extension: the unit of `quantity`.
    #[serde(default)]
    unit: Option<String>,
}

fn reject(field: &str, reason: impl Into<String>) -> Rejection {
    Rejection { field: field.into(), reason: reason.into() }
}

impl CloudEvent {
    fn into_usage_event(
        self,
        received_at: DateTime<Utc>,
        correlation_id: Option<&str>,
    ) -> Result<UsageEvent, Rejection> {
        if self.specversion != "1.0" {
            return Err(reject("specversion", format!("{:?} is not 1.0", self.specversion)));
        }
        if let Some(content_type) = &self.datacontenttype
            && !is_json(&media_type(content_type))
        {
            return Err(reject("datacontenttype", format!("{content_type:?}: only application/json data is metered")));
        }
        let subject = self.subject.unwrap_or_default();
        let time = match &self.time {
            None => received_at,
            Some(text) => DateTime::parse_from_rfc3339(text)
                .map_err(|e| reject("time", format!("{text:?} is not an RFC 3339 time: {e}")))?
                .with_timezone(&Utc),
        };
        let data = match self.data {
            None | Some(Value::Null) => "{}".to_owned(),
            Some(data @ Value::Object(_)) => data.to_string(),
            Some(_) => return Err(reject("data", "must be a JSON object")),
        };
        let quantity = match &self.quantity {
            None | Some(Value::Null) => None,
            Some(value) => Some(quantity_from_json("quantity", value)?),
        };
        let event_id = Uuid::new_v5(&HTTP_EVENT_NAMESPACE, format!("{}\u{1f}{}", self.source, self.id).as_bytes());
        let event_id = event_id.to_string();
        let envelope = Envelope {
            correlation_id: correlation_id.map_or_else(|| event_id.clone(), str::to_owned),
            event_id,
            occurred_at: time.timestamp_millis(),
            causation_id: None,
            source: self.source.clone(),
            account_id: subject.clone(),
        };
        Ok(UsageEvent {
            envelope,
            id: self.id,
            source: self.source,
            r#type: self.event_type,
            subject,
            time: time.timestamp_millis(),
            data,
            subscription_id: self.subscriptionid,
            meter: self.meter,
            quantity,
            unit: self.unit,
            dimensions: Default::default(),
            received_at: Some(received_at.timestamp_millis()),
        })
    }
}

fn authorised(ingress: &Ingress, headers: &HeaderMap) -> bool {
    let Some(presented) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
    else {
        return false;
    };
    // Compare against every key in constant time, so timing tells nothing about a key.
    ingress.api_keys.iter().fold(false, |found, key| {
        found | constant_time_eq::constant_time_eq(key.as_bytes(), presented.trim().as_bytes())
    })
}

// --- Content modes (CloudEvents HTTP protocol binding, section 3) -----------------------------

/// One event of a request as it arrived: the JSON of a CloudEvent, or an event already refused
/// while it was read (a binary-mode event whose body is not JSON).
enum Incoming {
    Event(Value),
    Refused { id: Option<String>, rejection: Rejection },
}

/// The events of a request, read as its content mode says: binary when any `ce-*` header is
/// present (whatever the content type), else structured, batched or plain JSON by content type.
fn read_events(headers: &HeaderMap, body: &[u8]) -> Result<Vec<Incoming>, Problem> {
    if headers.keys().any(|name| name.as_str().starts_with(CE_HEADER_PREFIX)) {
        return Ok(vec![binary_event(headers, body)]);
    }
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let media_type = media_type(content_type);
    if !matches!(media_type.as_str(), SINGLE | BATCH | "application/json") {
        return Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "content type {content_type:?} is not {SINGLE}, {BATCH} or application/json, and no ce-* \
                 headers make it a binary-mode event"
            ),
        ));
    }
    let parsed: Value = serde_json::from_slice(body)
        .map_err(|error| Problem::new(StatusCode::BAD_REQUEST, format!("the body is not JSON: {error}")))?;
    let events = match (media_type.as_str(), parsed) {
        (SINGLE | "application/json", event @ Value::Object(_)) => vec![event],
        (BATCH | "application/json", Value::Array(events)) => events,
        (SINGLE, _) => return Err(Problem::new(StatusCode::BAD_REQUEST, format!("{SINGLE} must be one JSON object"))),
        _ => return Err(Problem::new(StatusCode::BAD_REQUEST, format!("{BATCH} must be a JSON array"))),
    };
    Ok(events.into_iter().map(Incoming::Event).collect())
}

/// The event of a binary-mode request: each `ce-<name>` header is the attribute `<name>`
/// (percent-decoded, binding section 3.1.3.2), `Content-Type` is `datacontenttype`, and the
/// body is the data. Only JSON data is metered; other data is refused by the same check as a
/// structured event's `datacontenttype`.
fn binary_event(headers: &HeaderMap, body: &[u8]) -> Incoming {
    let mut event = serde_json::Map::new();
    for (name, value) in headers {
        let Some(attribute) = name.as_str().strip_prefix(CE_HEADER_PREFIX) else { continue };
        let Ok(text) = percent_decode(value.as_bytes()).decode_utf8() else {
            let id = event.get("id").and_then(Value::as_str).map(str::to_owned);
            return Incoming::Refused { id, rejection: reject(attribute, "the header is not percent-encoded UTF-8") };
        };
        event.insert(attribute.to_owned(), Value::String(text.into_owned()));
    }
    let id = event.get("id").and_then(Value::as_str).map(str::to_owned);
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
    if let Some(content_type) = content_type {
        event.insert("datacontenttype".into(), Value::String(content_type.to_owned()));
    }
    // No content type: the data is JSON (CloudEvents: an absent datacontenttype means JSON).
    let json_data = content_type.is_none_or(|t| is_json(&media_type(t)));
    if json_data && !body.is_empty() {
        match serde_json::from_slice::<Value>(body) {
            Ok(data) => {
                event.insert("data".into(), data);
            }
            Err(error) => {
                return Incoming::Refused { id, rejection: reject("data", format!("the body is not JSON: {error}")) };
            }
        }
    }
    Incoming::Event(Value::Object(event))
}

/// The media type of a `Content-Type` value, without parameters, in lower case.
fn media_type(content_type: &str) -> String {
    content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase()
}

/// `application/json` or a `+json` type.
fn is_json(media_type: &str) -> bool {
    media_type == "application/json" || media_type.ends_with("+json")
}

/// The context attributes every CloudEvent has, checked here so that a refusal names the one
/// missing (CloudEvents 1.0, section 3.1: non-empty strings).
fn check_required_attributes(event: &Value) -> Result<(), Rejection> {
    for attribute in ["specversion", "id", "source", "type"] {
        match event.get(attribute) {
            Some(Value::String(text)) if !text.is_empty() => {}
            None | Some(Value::Null) => return Err(reject(attribute, "is required")),
            Some(_) => return Err(reject(attribute, "must be a non-empty string")),
        }
    }
    Ok(())
}

// --- Answers ------------------------------------------------------------------------------------

/// An answer other than 202: RFC 9457 problem details (`application/problem+json`), with the
/// per-event reasons as the extension member `rejected`, as OpenMeter's ingest answers. A
/// client whose `Accept` asks for `application/json` and not for problem details gets the
/// earlier shape: `{"error": detail, "rejected": [...]}`.
#[derive(Debug)]
struct Problem {
    status: StatusCode,
    detail: String,
    rejected: Vec<Value>,
    retry_after: Option<&'static str>,
}

impl Problem {
    fn new(status: StatusCode, detail: impl Into<String>) -> Self {
        Self { status, detail: detail.into(), rejected: Vec::new(), retry_after: None }
    }

    fn into_response(self, accept: Option<&str>) -> Response {
        let rejected = (!self.rejected.is_empty()).then_some(self.rejected);
        let wants_plain_json =
            accept.is_some_and(|a| a.contains("application/json") && !a.contains("application/problem+json"));
        let mut response = if wants_plain_json {
            let mut body = json!({"error": self.detail});
            if let Some(rejected) = rejected {
                body["rejected"] = Value::Array(rejected);
            }
            (self.status, axum::Json(body)).into_response()
        } else {
            // `instance` names this occurrence; the same id is in the service's log line.
            let instance = format!("urn:uuid:{}", Uuid::new_v4());
            tracing::info!(status = self.status.as_u16(), %instance, detail = %self.detail, "request refused");
            let mut body = json!({
                "type": "about:blank",
                "title": self.status.canonical_reason().unwrap_or("Error"),
                "status": self.status.as_u16(),
                "detail": self.detail,
                "instance": instance,
            });
            if let Some(rejected) = rejected {
                body["rejected"] = Value::Array(rejected);
            }
            let mut response = (self.status, body.to_string()).into_response();
            response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(PROBLEM_JSON));
            response
        };
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        }
        if let Some(seconds) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static(seconds));
        }
        response
    }
}

// --- The handler --------------------------------------------------------------------------------

async fn ingest(
    State(ingress): State<Arc<Ingress>>,
    path: Option<MatchedPath>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    // The body has been read by now; a slow sender's upload is not the service's latency.
    let started = std::time::Instant::now();
    // The events are read before the request's span starts, so that the span can continue the
    // trace an event carries when the request itself carries none.
    let events = if authorised(&ingress, &headers) {
        body.map_err(|rejection| Problem::new(rejection.status(), rejection.body_text()))
            .and_then(|body| read_events(&headers, &body))
    } else {
        Err(Problem::new(StatusCode::UNAUTHORIZED, "a valid API key is required (Authorization: Bearer <key>)"))
    };
    let route = path.as_ref().map_or("/v1/events", MatchedPath::as_str);
    let span = request_span(route, &headers, events.as_deref().unwrap_or_default());
    let outcome = match events {
        Ok(events) => accept(&ingress, &headers, events, &span).instrument(span.clone()).await,
        Err(problem) => Err(problem),
    };
    let response = match outcome {
        Ok(ids) => (StatusCode::ACCEPTED, axum::Json(json!({"accepted": ids}))).into_response(),
        Err(problem) => problem.into_response(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok())),
    };
    let status = response.status();
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
    ingress.metrics.requests.get_or_create(&StatusLabels { status: status.as_u16() }).inc();
    let status_class = match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    ingress
        .metrics
        .request_seconds
        .get_or_create(&StatusClassLabels { status_class })
        .observe(started.elapsed().as_secs_f64());
    response
}

/// The request's server span (OpenTelemetry HTTP semantic conventions), a child of the caller's
/// W3C `traceparent` header, or else of the `traceparent` attribute (CloudEvents distributed
/// tracing extension) of the first event that has one.
fn request_span(route: &str, headers: &HeaderMap, events: &[Incoming]) -> tracing::Span {
    let span = tracing::info_span!(
        "http.request",
        otel.name = %format!("POST {route}"),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        http.request.method = "POST",
        http.route = %route,
        http.response.status_code = tracing::field::Empty,
    );
    if !trace::continue_trace(&span, &opentelemetry_http::HeaderExtractor(headers)) {
        let carried = events.iter().find_map(|event| match event {
            Incoming::Event(event) => event.get("traceparent").and_then(Value::as_str),
            Incoming::Refused { .. } => None,
        });
        if let Some(traceparent) = carried {
            trace::continue_trace(&span, &trace::Traceparent(traceparent));
        }
    }
    span
}

/// Checks every event and writes them all, or none: the accepted ids, or why not.
async fn accept(
    ingress: &Ingress,
    headers: &HeaderMap,
    events: Vec<Incoming>,
    span: &tracing::Span,
) -> Result<Vec<String>, Problem> {
    if events.is_empty() {
        return Err(Problem::new(StatusCode::BAD_REQUEST, "the batch is empty"));
    }
    if events.len() > ingress.max_batch_events {
        return Err(Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("{} events in one request; at most {} are accepted", events.len(), ingress.max_batch_events),
        ));
    }

    let now = ingress.clock.now();
    let correlation_id = headers.get(CORRELATION_HEADER).and_then(|v| v.to_str().ok());
    let mut accepted = Vec::with_capacity(events.len());
    let mut rejected = Vec::new();
    for (index, incoming) in events.into_iter().enumerate() {
        let (id, checked) = match incoming {
            Incoming::Refused { id, rejection } => (id, Err(rejection)),
            Incoming::Event(raw) => {
                let id = raw.get("id").and_then(Value::as_str).map(str::to_owned);
                let checked = check_required_attributes(&raw)
                    .and_then(|()| {
                        serde_json::from_value::<CloudEvent>(raw)
                            .map_err(|e| reject("event", format!("not a CloudEvent: {e}")))
                    })
                    .and_then(|event| event.into_usage_event(now, correlation_id))
                    .and_then(|event| ingress.meters.measure(&event, now, ingress.bounds).map(|_| event));
                (id, checked)
            }
        };
        match checked {
            Ok(event) => accepted.push(event),
            Err(rejection) => {
                rejected.push(json!({"index": index, "id": id, "field": rejection.field, "reason": rejection.reason}))
            }
        }
    }
    if !rejected.is_empty() {
        ingress.metrics.events_rejected.inc_by(rejected.len() as u64);
        let total = rejected.len() + accepted.len();
        let mut problem = Problem::new(
            StatusCode::BAD_REQUEST,
            format!("{} of {total} events refused; nothing was written", rejected.len()),
        );
        problem.rejected = rejected;
        return Err(problem);
    }

    let trace_headers = trace::trace_headers(span);
    match write(ingress, &accepted, &trace_headers).await {
        Ok(()) => {
            ingress.metrics.events_accepted.inc_by(accepted.len() as u64);
            Ok(accepted.into_iter().map(|e| e.id).collect())
        }
        Err(error) => {
            tracing::warn!(%error, events = accepted.len(), "writing usage events failed");
            let mut problem = Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the events could not be stored, resend them: {error}"),
            );
            problem.retry_after = Some("5");
            Err(problem)
        }
    }
}

/// Writes `events` and waits until Kafka acknowledged every one.
/// Each record carries the request span's trace context, so that the trace runs on.
async fn write(ingress: &Ingress, events: &[UsageEvent], trace_headers: &[(String, String)]) -> anyhow::Result<()> {
    let ce_type = tributary_contracts::codec::record_full_name(topics::USAGE_EVENTS).unwrap_or("UsageEvent");
    let mut encoded = Vec::with_capacity(events.len());
    for event in events {
        encoded.push(ingress.codec.encode(event).await?);
    }
    let deliveries = events.iter().zip(&encoded).map(|(event, payload)| {
        let mut record_headers = OwnedHeaders::new();
        let mut headers: BTreeMap<&str, String> = event.envelope.cloudevents_headers(ce_type).into_iter().collect();
        headers.extend(trace_headers.iter().map(|(name, value)| (name.as_str(), value.clone())));
        for (name, value) in &headers {
            record_headers = record_headers.insert(Header { key: name, value: Some(value.as_str()) });
        }
        let record = FutureRecord::to(&ingress.topic)
            .key(event.envelope.account_id.as_str())
            .payload(payload.as_slice())
            .headers(record_headers);
        ingress.producer.send(record, ingress.produce_timeout)
    });
    for outcome in join_all(deliveries).await {
        outcome.map_err(|(error, _)| anyhow::anyhow!("{error}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt as _;
    use tributary_contracts::codec::InMemoryResolver;

    const KEY: &str = "unit-test-key-0123456789";

    /// An endpoint whose Kafka is unreachable (nothing listens on port 1), with a schema
    /// resolver in memory: no stack is needed to see what a client gets when Kafka is down.
    fn ingress_without_kafka() -> Arc<Ingress> {
        let resolver = InMemoryResolver::new();
        let spec = topics::spec(topics::USAGE_EVENTS).unwrap();
        resolver.register(&topics::value_subject(spec.name), spec.schema).unwrap();
        let kafka = KafkaConfig { bootstrap_servers: "127.0.0.1:1".into(), ..KafkaConfig::default() };
        let meters = Meters::compile(&[crate::meters::MeterDefinition {
            key: "api_calls".into(),
            event_type: "api.call".into(),
            aggregation: crate::meters::Aggregation::Count,
            value_property: None,
            unit: "call".into(),
            group_by: BTreeMap::new(),
        }])
        .unwrap();
        let timeout = Duration::from_millis(500);
        Arc::new(Ingress {
            meters: Arc::new(meters),
            bounds: TimeBounds { max_age: Duration::from_secs(3600), max_skew: Duration::from_secs(60) },
            api_keys: vec![KEY.into()],
            max_batch_events: 10,
            produce_timeout: timeout,
            producer: producer(&kafka, timeout).unwrap(),
            topic: topics::USAGE_EVENTS.into(),
            codec: Codec::new(Arc::new(resolver)),
            clock: tributary_runtime::Clock::system(),
            metrics: HttpMetrics::default(),
        })
    }

    #[tokio::test]
    async fn kafka_unreachable_answers_503_with_retry_after_within_the_produce_timeout() {
        let ingress = ingress_without_kafka();
        let body = json!([{"specversion": "1.0", "id": "e1", "source": "s", "type": "api.call", "subject": "acct"}]);
        let request = Request::post("/v1/events")
            .header(header::AUTHORIZATION, format!("Bearer {KEY}"))
            .header(header::CONTENT_TYPE, BATCH)
            .body(Body::from(body.to_string()))
            .unwrap();
        let started = std::time::Instant::now();
        let response = router(ingress.clone(), 1 << 16).oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers().get(header::RETRY_AFTER).unwrap(), "5");
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "answered after the produce timeout, not librdkafka's 5 min"
        );
        assert_eq!(ingress.metrics.events_accepted.get(), 0, "nothing counted as accepted");
    }

    async fn call(request: Request<Body>) -> (StatusCode, HeaderMap, Value) {
        let response = router(ingress_without_kafka(), 1 << 10).oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = axum::body::to_bytes(response.into_body(), 1 << 16).await.unwrap();
        (status, headers, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    fn binary(attributes: &[(&str, &str)], content_type: Option<&str>, body: &str) -> Request<Body> {
        let mut request = Request::post("/v1/events").header(header::AUTHORIZATION, format!("Bearer {KEY}"));
        for (name, value) in attributes {
            request = request.header(format!("ce-{name}"), *value);
        }
        if let Some(content_type) = content_type {
            request = request.header(header::CONTENT_TYPE, content_type);
        }
        request.body(Body::from(body.to_owned())).unwrap()
    }

    const ATTRIBUTES: [(&str, &str); 5] =
        [("specversion", "1.0"), ("id", "e1"), ("source", "s"), ("type", "api.call"), ("subject", "acct")];

    #[tokio::test]
    async fn a_binary_event_is_read_from_its_headers_percent_decoded_whatever_its_content_type() {
        let ok = call(binary(&ATTRIBUTES, None, "")).await;
        // Accepted up to the write, which fails only because Kafka is unreachable here.
        assert_eq!(ok.0, StatusCode::SERVICE_UNAVAILABLE, "{}", ok.2);
        let with_structured_type = call(binary(&ATTRIBUTES, Some(SINGLE), "{\"a\": 1}")).await;
        assert_eq!(with_structured_type.0, StatusCode::SERVICE_UNAVAILABLE, "binary wins: {}", with_structured_type.2);

        let mut quoted = ATTRIBUTES.to_vec();
        quoted.push(("time", "2026-12-02T10%3A00%3A00Z%20"));
        let (status, _, body) = call(binary(&quoted, None, "")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let reason = body["rejected"][0]["reason"].as_str().unwrap();
        assert!(reason.contains("\"2026-12-02T10:00:00Z \""), "decoded before it is checked: {reason}");
    }

    #[tokio::test]
    async fn a_binary_event_refused_names_the_missing_attribute_or_the_data() {
        let without_id: Vec<_> = ATTRIBUTES.iter().copied().filter(|(name, _)| *name != "id").collect();
        let (status, headers, body) = call(binary(&without_id, None, "")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(headers[header::CONTENT_TYPE], PROBLEM_JSON);
        assert_eq!(
            (body["rejected"][0]["field"].as_str(), body["rejected"][0]["reason"].as_str()),
            (Some("id"), Some("is required"))
        );

        let (_, _, body) = call(binary(&ATTRIBUTES, Some("application/json"), "{not json")).await;
        assert_eq!(body["rejected"][0]["field"], "data", "{body}");
        let (_, _, body) = call(binary(&ATTRIBUTES, Some("text/plain"), "hello")).await;
        assert_eq!(body["rejected"][0]["field"], "datacontenttype", "{body}");
        let (_, _, body) = call(binary(&ATTRIBUTES, Some("application/json"), "[1]")).await;
        assert_eq!(body["rejected"][0]["field"], "data", "an array is no event data: {body}");
    }

    #[tokio::test]
    async fn every_refusal_is_a_problem_document_and_plain_json_when_asked() {
        let unauthorised =
            Request::post("/v1/events").header(header::CONTENT_TYPE, BATCH).body(Body::from("[]")).unwrap();
        let (status, headers, body) = call(unauthorised).await;
        assert_eq!((status, headers[header::WWW_AUTHENTICATE].to_str().unwrap()), (StatusCode::UNAUTHORIZED, "Bearer"));
        assert_eq!(
            (body["type"].as_str(), body["title"].as_str(), body["status"].as_u64()),
            (Some("about:blank"), Some("Unauthorized"), Some(401))
        );
        assert!(body["instance"].as_str().unwrap().starts_with("urn:uuid:"));

        let too_big = Request::post("/v1/events")
            .header(header::AUTHORIZATION, format!("Bearer {KEY}"))
            .header(header::CONTENT_TYPE, BATCH)
            .body(Body::from(vec![b' '; 2 << 10]))
            .unwrap();
        let (status, headers, body) = call(too_big).await;
        assert_eq!(
            (status, headers[header::CONTENT_TYPE].to_str().unwrap()),
            (StatusCode::PAYLOAD_TOO_LARGE, PROBLEM_JSON)
        );
        assert_eq!(body["status"], 413);

        let plain = Request::post("/v1/events")
            .header(header::AUTHORIZATION, format!("Bearer {KEY}"))
            .header(header::CONTENT_TYPE, "text/plain")
            .header(header::ACCEPT, "application/json")
            .body(Body::from("x"))
            .unwrap();
        let (status, headers, body) = call(plain).await;
        assert_eq!(
            (status, headers[header::CONTENT_TYPE].to_str().unwrap()),
            (StatusCode::UNSUPPORTED_MEDIA_TYPE, "application/json")
        );
        assert!(body["error"].as_str().unwrap().contains("text/plain"), "{body}");
    }
}
