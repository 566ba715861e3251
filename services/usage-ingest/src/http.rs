//! `POST /v1/events`: CloudEvents over HTTP for platforms that cannot write to Kafka.
//!
//! The body is one CloudEvent (`application/cloudevents+json`) or a batch
//! (`application/cloudevents-batch+json`) in the shape OpenMeter ingests, so a platform
//! already sending to OpenMeter only changes its URL and key (`/api/v1/events` is served too).
//! A request is all or nothing: every event is checked with the same rules as the Kafka path,
//! and when any is refused the answer is 400 with a reason per refused event and nothing is
//! written, so that the sender fixes and resends the batch as it was. Accepted events are
//! written to `usage.events` by an idempotent producer (`acks=all`) and 202 is answered only
//! once Kafka has them; resending after a timeout is safe, since duplicates (same `source`
//! and `id`) are counted once downstream.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use chrono::{DateTime, Utc};
use futures::future::join_all;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Deserialize;
use serde_json::{Value, json};
use tributary_contracts::codec::Codec;
use tributary_contracts::topics;
use tributary_contracts::types::{Envelope, UsageEvent};
use tributary_runtime::config::KafkaConfig;
use uuid::Uuid;

use crate::meters::{Meters, Rejection, TimeBounds, quantity_from_json};

/// Namespace of the envelope ids of events that arrive over HTTP: the id is a function of
/// `source` and `id`, so a resent event has the same envelope too.
const HTTP_EVENT_NAMESPACE: Uuid = Uuid::from_u128(0x7d3c_2a51_8e0f_4b6a_a1c4_7573_6167_6521);

/// A flow id the sender may pass on; it becomes the events' correlation id.
const CORRELATION_HEADER: &str = "x-correlation-id";

const SINGLE: &str = "application/cloudevents+json";
const BATCH: &str = "application/cloudevents-batch+json";

/// Request outcomes by status code.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    /// The HTTP status code.
    pub status: u16,
}

/// HTTP metrics.
#[derive(Debug, Clone, Default)]
pub struct HttpMetrics {
    /// Requests by answer.
    pub requests: Family<StatusLabels, Counter>,
    /// Events accepted and written to Kafka.
    pub events_accepted: Counter,
    /// Events refused with a reason.
    pub events_rejected: Counter,
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
            && !content_type.starts_with("application/json")
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

fn answer(ingress: &Ingress, status: StatusCode, body: Value) -> Response {
    ingress.metrics.requests.get_or_create(&StatusLabels { status: status.as_u16() }).inc();
    (status, axum::Json(body)).into_response()
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

async fn ingest(State(ingress): State<Arc<Ingress>>, headers: HeaderMap, body: Bytes) -> Response {
    if !authorised(&ingress, &headers) {
        let mut response = answer(
            &ingress,
            StatusCode::UNAUTHORIZED,
            json!({"error": "a valid API key is required (Authorization: Bearer <key>)"}),
        );
        response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        return response;
    }
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let media_type = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    let parsed: Result<Value, _> = serde_json::from_slice(&body);
    let events: Vec<Value> = match (media_type.as_str(), parsed) {
        (SINGLE | BATCH | "application/json", Err(error)) => {
            return answer(
                &ingress,
                StatusCode::BAD_REQUEST,
                json!({"error": format!("the body is not JSON: {error}")}),
            );
        }
        (SINGLE, Ok(event @ Value::Object(_))) => vec![event],
        (BATCH, Ok(Value::Array(events))) => events,
        ("application/json", Ok(Value::Array(events))) => events,
        ("application/json", Ok(event @ Value::Object(_))) => vec![event],
        (SINGLE, Ok(_)) => {
            return answer(
                &ingress,
                StatusCode::BAD_REQUEST,
                json!({"error": format!("{SINGLE} must be one JSON object")}),
            );
        }
        (BATCH, Ok(_)) => {
            return answer(
                &ingress,
                StatusCode::BAD_REQUEST,
                json!({"error": format!("{BATCH} must be a JSON array")}),
            );
        }
        _ => {
            return answer(
                &ingress,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                json!({"error": format!("content type {content_type:?} is not {SINGLE}, {BATCH} or application/json")}),
            );
        }
    };
    if events.is_empty() {
        return answer(&ingress, StatusCode::BAD_REQUEST, json!({"error": "the batch is empty"}));
    }
    if events.len() > ingress.max_batch_events {
        return answer(
            &ingress,
            StatusCode::PAYLOAD_TOO_LARGE,
            json!({"error": format!("{} events in one request; at most {} are accepted", events.len(), ingress.max_batch_events)}),
        );
    }

    let now = ingress.clock.now();
    let correlation_id = headers.get(CORRELATION_HEADER).and_then(|v| v.to_str().ok());
    let mut accepted = Vec::with_capacity(events.len());
    let mut rejected = Vec::new();
    for (index, raw) in events.into_iter().enumerate() {
        let id = raw.get("id").and_then(Value::as_str).map(str::to_owned);
        let checked = serde_json::from_value::<CloudEvent>(raw)
            .map_err(|e| reject("event", format!("not a CloudEvent: {e}")))
            .and_then(|event| event.into_usage_event(now, correlation_id))
            .and_then(|event| ingress.meters.measure(&event, now, ingress.bounds).map(|_| event));
        match checked {
            Ok(event) => accepted.push(event),
            Err(rejection) => {
                rejected.push(json!({"index": index, "id": id, "field": rejection.field, "reason": rejection.reason}))
            }
        }
    }
    if !rejected.is_empty() {
        ingress.metrics.events_rejected.inc_by(rejected.len() as u64);
        return answer(
            &ingress,
            StatusCode::BAD_REQUEST,
            json!({"error": format!("{} of {} events refused; nothing was written", rejected.len(), rejected.len() + accepted.len()), "rejected": rejected}),
        );
    }

    match write(&ingress, &accepted).await {
        Ok(()) => {
            ingress.metrics.events_accepted.inc_by(accepted.len() as u64);
            let ids: Vec<&str> = accepted.iter().map(|e| e.id.as_str()).collect();
            answer(&ingress, StatusCode::ACCEPTED, json!({"accepted": ids}))
        }
        Err(error) => {
            tracing::warn!(%error, events = accepted.len(), "writing usage events failed");
            let mut response = answer(
                &ingress,
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"error": format!("the events could not be stored, resend them: {error}")}),
            );
            response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
            response
        }
    }
}

/// Writes `events` and waits until Kafka acknowledged every one.
async fn write(ingress: &Ingress, events: &[UsageEvent]) -> anyhow::Result<()> {
    let ce_type = tributary_contracts::codec::record_full_name(topics::USAGE_EVENTS).unwrap_or("UsageEvent");
    let mut encoded = Vec::with_capacity(events.len());
    for event in events {
        encoded.push(ingress.codec.encode(event).await?);
    }
    let deliveries = events.iter().zip(&encoded).map(|(event, payload)| {
        let mut record_headers = OwnedHeaders::new();
        let headers: BTreeMap<&str, String> = event.envelope.cloudevents_headers(ce_type).into_iter().collect();
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
}
