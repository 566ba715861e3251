//! The relay of one endpoint: each committed record of its topic delivered once, in order per
//! account, or dead-lettered with the endpoint's last answer.
//!
//! The steps of one record:
//!
//! 1. [`filter`](Relay::process): the endpoint's `only` filter on the record as delivered;
//! 2. [`offer`](Relay::offer): behind the account's waiting deliveries, if it has any (order
//!    per account); else through the endpoint's circuit (open: the partition pauses, records
//!    stay in Kafka, nothing is dead-lettered);
//! 3. [`attempt`](Relay::attempt): one signed POST; its answer decides:
//!    - 2xx: delivered;
//!    - 5xx, 408, 429, a timeout, no connection: the delivery waits at the head of its
//!      account's queue (a store) for the next step of the retry schedule, or `Retry-After` if
//!      later, on the runtime's clock; after the last step it is given up;
//!    - any other answer (4xx: 410 Gone, 401, 400; 3xx): refused, no retry, given up.
//!
//!    Every attempt is recorded on `webhook.deliveries` in the transaction that commits its
//!    outcome. A delivery given up goes to the relay's DLQ (`<service>.relay.<endpoint>.dlq`)
//!    as a timer with the delivery and the last answer: `tributary dlq replay` sends it again,
//!    with the same delivery id, behind the account's waiting deliveries.
//!
//! Exactly once inside Kafka; at least once toward the endpoint: a crash after the endpoint
//! answered and before the commit sends the same delivery again, with the same `webhook-id`.

use std::collections::{HashMap, VecDeque};
use std::marker::PhantomData;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value as Json, json};
use tributary_contracts::Contract;
use tributary_contracts::codec::{contract_to_json, record_full_name};
use tributary_contracts::topics::WEBHOOK_DELIVERIES;
use tributary_contracts::types::{DeliveryOutcome, Envelope, WebhookDeliveryAttempt};
use tributary_runtime::circuit::Circuit;
use tributary_runtime::{Context, Output, ProcessError, Processor, Store, StoredValue, Timer};
use uuid::Uuid;

use crate::filter::Filter;
use crate::http::{Answer, SendError, Transport};
use crate::metrics::EndpointMetrics;

/// Namespace of delivery ids (`webhook-id`).
const DELIVERY_NAMESPACE: Uuid = Uuid::from_u128(0x7d3f_62a4_1c0b_4e55_8b1e_7765_6268_6f6f);
/// Longest wait a `Retry-After` can impose.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);
/// How often a partition with waiting deliveries reports its oldest one.
const SWEEP_EVERY: chrono::TimeDelta = chrono::TimeDelta::minutes(1);

const RETRY_TIMER: &str = "retry/";
const REDELIVER_TIMER: &str = "redeliver/";
const SWEEP_TIMER: &str = "sweep";

/// The deliveries of one account waiting behind one that failed, head first.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Waiting {
    /// Head first.
    pub deliveries: VecDeque<Delivery>,
}

impl StoredValue for Waiting {}

/// Waiting deliveries by account.
pub const WAITING: Store<Waiting> = Store::new("waiting");

/// One record for one endpoint, as it is sent every time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    /// The `webhook-id`: UUIDv5 of the endpoint, the topic and the record's event id.
    pub delivery_id: String,
    /// The record's envelope (its account, flow and id).
    pub record: Envelope,
    /// The record's CloudEvents type.
    pub event_type: String,
    /// The body, exactly as sent: the signature covers these bytes.
    pub body: String,
    /// When the record happened (the age of an undelivered record counts from here).
    pub since: DateTime<Utc>,
    /// Attempts made in this round (a replay starts a new round).
    pub attempts: u32,
    /// When this round's first attempt was made.
    pub first_attempt_at: Option<DateTime<Utc>>,
}

/// The delivery id (`webhook-id`) of the record `event_id` of `topic` to `endpoint`: the same
/// for every attempt, redelivery and replay.
pub fn delivery_id(endpoint: &str, topic: &str, event_id: &str) -> String {
    let name = format!("{endpoint}\u{1f}{topic}\u{1f}{event_id}");
    Uuid::new_v5(&DELIVERY_NAMESPACE, name.as_bytes()).to_string()
}

/// What one attempt came to.
#[derive(Debug, Clone, PartialEq)]
enum Verdict {
    Delivered,
    /// No retry will help.
    Refused(String),
    /// Another attempt may succeed, not before `not_before`.
    Transient {
        reason: String,
        not_before: Duration,
    },
}

/// The relay of one endpoint, for records of `T`.
pub struct Relay<T, S = crate::http::HttpEndpoint> {
    endpoint: String,
    source: String,
    filter: Filter,
    schedule: Vec<Duration>,
    transport: S,
    circuit: Circuit,
    metrics: EndpointMetrics,
    /// The oldest undelivered record per partition, as last seen (for the age gauge).
    oldest: Mutex<HashMap<i32, Observed>>,
    /// How long an observation counts (a partition that moved to another instance stops
    /// counting here after this).
    observation_lasts: Duration,
    record: PhantomData<fn() -> T>,
}

#[derive(Debug, Clone, Copy)]
struct Observed {
    oldest: Option<DateTime<Utc>>,
    waiting: usize,
    at: Instant,
}

impl<T, S> std::fmt::Debug for Relay<T, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay").field("endpoint", &self.endpoint).field("filter", &self.filter).finish()
    }
}

/// How a relay is made: what it is called, what it delivers, how hard it tries.
#[derive(Debug, Clone)]
pub struct RelayPlan {
    /// The endpoint's name.
    pub endpoint: String,
    /// `tributary.<service>`: the source of the delivery records.
    pub source: String,
    /// Which records go.
    pub filter: Filter,
    /// The waits before each retry.
    pub schedule: Vec<Duration>,
    /// How long the circuit stays open (observations of a paused partition last longer).
    pub open_for: Duration,
}

impl<T: Contract + 'static, S: Transport> Relay<T, S> {
    /// A relay of `plan` sending through `transport`, behind `circuit`.
    pub fn new(plan: RelayPlan, transport: S, circuit: Circuit, metrics: EndpointMetrics) -> Self {
        Self {
            observation_lasts: (plan.open_for * 3).max(Duration::from_secs(180)),
            endpoint: plan.endpoint,
            source: plan.source,
            filter: plan.filter,
            schedule: plan.schedule,
            transport,
            circuit,
            metrics,
            oldest: Mutex::new(HashMap::new()),
            record: PhantomData,
        }
    }

    /// The delivery of `record`: its id and the body every attempt sends.
    fn delivery(&self, record: &T, data: Json) -> Delivery {
        let envelope = record.envelope().clone();
        let event_type = record_full_name(T::TOPIC).unwrap_or(T::TOPIC).to_owned();
        let delivery_id = delivery_id(&self.endpoint, T::TOPIC, &envelope.event_id);
        let since = envelope.occurred_at_utc();
        let body = cloud_event(&envelope, &event_type, data).to_string();
        Delivery { delivery_id, record: envelope, event_type, body, since, attempts: 0, first_attempt_at: None }
    }

    /// Step 2: behind the account's waiting deliveries, or through the circuit to an attempt.
    async fn offer(&self, context: &mut Context<'_>, delivery: Delivery) -> Result<(), ProcessError> {
        let account = delivery.record.account_id.clone();
        let mut waiting = context.get(WAITING, &account)?.unwrap_or_default();
        if !waiting.deliveries.is_empty() {
            waiting.deliveries.push_back(delivery);
            context.put(WAITING, &account, &waiting)?;
            self.observe(context)?;
            return Ok(());
        }
        if let Err(error) = self.gate(context.now()) {
            self.observe_held(context, delivery.since)?;
            return Err(error);
        }
        self.attempt(context, delivery, waiting).await
    }

    /// Nothing is sent while the endpoint's circuit is open: the partition pauses.
    fn gate(&self, now: DateTime<Utc>) -> Result<(), ProcessError> {
        self.circuit.permit(now).map_err(|wait| ProcessError::Unavailable {
            downstream: "webhook",
            retry_after: wait,
            message: format!("the circuit of endpoint {} is open for {wait:?} more", self.endpoint),
        })
    }

    /// Step 3: one attempt at `delivery` (the head of its account's queue; `rest` waits
    /// behind it), its record on the deliveries topic, and what comes next.
    async fn attempt(
        &self,
        context: &mut Context<'_>,
        mut delivery: Delivery,
        mut rest: Waiting,
    ) -> Result<(), ProcessError> {
        let now = context.now();
        delivery.attempts += 1;
        let first_attempt_at = *delivery.first_attempt_at.get_or_insert(now);
        let started = Instant::now();
        let sent = self.transport.send(&delivery.delivery_id, &delivery.body).await;
        let latency = started.elapsed();
        self.metrics.attempted(&sent, latency);
        let verdict = verdict(&sent);
        let mut record = self.attempt_record(&delivery, now, &sent, latency);
        let account = delivery.record.account_id.clone();
        match verdict {
            Verdict::Delivered => {
                self.circuit.success();
                record.outcome = DeliveryOutcome::Delivered;
                self.metrics.finished("delivered");
                tracing::debug!(endpoint = self.endpoint, delivery_id = delivery.delivery_id, "delivered");
            }
            Verdict::Refused(reason) => {
                // The endpoint is up: it answered, and said no.
                self.circuit.success();
                record.outcome = DeliveryOutcome::Refused;
                self.give_up(context, &delivery, "webhook_refused", &reason, first_attempt_at);
            }
            Verdict::Transient { reason, not_before } => {
                self.circuit.failure(now);
                let step = self.schedule.get(delivery.attempts as usize - 1).copied();
                match step {
                    Some(step) => {
                        let wait = jittered(step, &delivery.delivery_id, delivery.attempts).max(not_before);
                        let next = now + chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::MAX);
                        record.outcome = DeliveryOutcome::RetryScheduled;
                        record.next_attempt_at = Some(next.timestamp_millis());
                        tracing::info!(
                            endpoint = self.endpoint,
                            delivery_id = delivery.delivery_id,
                            attempt = delivery.attempts,
                            reason,
                            next = %next,
                            "delivery failed; retry scheduled"
                        );
                        rest.deliveries.push_front(delivery);
                        context.put(WAITING, &account, &rest)?;
                        context.schedule(&format!("{RETRY_TIMER}{account}"), next, Json::Null)?;
                        context.emit(Output::new(account, record));
                        return self.observe(context);
                    }
                    None => {
                        record.outcome = DeliveryOutcome::RetriesExhausted;
                        let class = "webhook_retries_exhausted";
                        self.give_up(context, &delivery, class, &reason, first_attempt_at);
                    }
                }
            }
        }
        context.emit(Output::new(account.clone(), record));
        self.next_in_line(context, &account, rest)
    }

    /// The account's next waiting delivery, if any, is due at once.
    fn next_in_line(&self, context: &mut Context<'_>, account: &str, rest: Waiting) -> Result<(), ProcessError> {
        let timer = format!("{RETRY_TIMER}{account}");
        if rest.deliveries.is_empty() {
            context.delete(WAITING, account);
            context.cancel(&timer);
        } else {
            context.put(WAITING, account, &rest)?;
            context.schedule(&timer, context.now(), Json::Null)?;
        }
        self.observe(context)
    }

    /// Gives `delivery` up: to the relay's DLQ, as a timer that a replay brings back.
    fn give_up(
        &self,
        context: &mut Context<'_>,
        delivery: &Delivery,
        class: &str,
        reason: &str,
        first_attempt_at: DateTime<Utc>,
    ) {
        self.metrics.finished(if class == "webhook_refused" { "refused" } else { "retries_exhausted" });
        let message = format!("endpoint {}: {reason}", self.endpoint);
        tracing::warn!(
            endpoint = self.endpoint,
            delivery_id = delivery.delivery_id,
            class,
            reason,
            "delivery given up"
        );
        let payload = serde_json::to_value(delivery).unwrap_or(Json::Null);
        let timer = format!("{REDELIVER_TIMER}{}", delivery.delivery_id);
        context.give_up(&timer, payload, class, message, delivery.attempts, first_attempt_at);
    }

    /// The `webhook.deliveries` record of one attempt (its outcome is set by the caller).
    fn attempt_record(
        &self,
        delivery: &Delivery,
        now: DateTime<Utc>,
        sent: &Result<Answer, SendError>,
        latency: Duration,
    ) -> WebhookDeliveryAttempt {
        let discriminator = format!("delivery/{}/{}/{}", self.endpoint, now.timestamp_millis(), delivery.attempts);
        let (status_code, error) = match sent {
            Ok(answer) if (200..300).contains(&answer.status) => (Some(i32::from(answer.status)), None),
            Ok(answer) => (Some(i32::from(answer.status)), Some(answer.body.clone()).filter(|b| !b.is_empty())),
            Err(error) => (None, Some(error.to_string())),
        };
        WebhookDeliveryAttempt {
            envelope: Envelope::caused_by(&delivery.record, &self.source, &discriminator, now),
            endpoint: self.endpoint.clone(),
            delivery_id: delivery.delivery_id.clone(),
            topic: T::TOPIC.to_owned(),
            event_type: delivery.event_type.clone(),
            attempt: i32::try_from(delivery.attempts).unwrap_or(i32::MAX),
            attempted_at: now.timestamp_millis(),
            outcome: DeliveryOutcome::Unknown,
            status_code,
            error: error.or_else(|| status_code.filter(|s| !(200..300).contains(s)).map(|s| format!("HTTP {s}"))),
            latency_ms: i64::try_from(latency.as_millis()).unwrap_or(i64::MAX),
            next_attempt_at: None,
        }
    }

    /// Records this partition's oldest waiting delivery, and keeps a sweep timer reporting it
    /// while there is one.
    fn observe(&self, context: &mut Context<'_>) -> Result<(), ProcessError> {
        let waiting = context.scan_prefix(WAITING, "")?;
        let oldest = waiting.iter().flat_map(|(_, w)| w.deliveries.iter().map(|d| d.since)).min();
        let count = waiting.iter().map(|(_, w)| w.deliveries.len()).sum::<usize>();
        match (oldest, context.scheduled(SWEEP_TIMER)?) {
            (Some(_), None) => context.schedule(SWEEP_TIMER, context.now() + SWEEP_EVERY, Json::Null)?,
            (None, Some(_)) => context.cancel(SWEEP_TIMER),
            _ => {}
        }
        self.record_oldest(context.partition(), Observed { oldest, waiting: count, at: Instant::now() }, context.now());
        Ok(())
    }

    /// A record held at the head of its partition (the circuit is open).
    fn observe_held(&self, context: &Context<'_>, since: DateTime<Utc>) -> Result<(), ProcessError> {
        let waiting = context.scan_prefix(WAITING, "")?;
        let oldest = waiting.iter().flat_map(|(_, w)| w.deliveries.iter().map(|d| d.since)).chain([since]).min();
        let count = waiting.iter().map(|(_, w)| w.deliveries.len()).sum::<usize>();
        self.record_oldest(context.partition(), Observed { oldest, waiting: count, at: Instant::now() }, context.now());
        Ok(())
    }

    /// Publishes the age of the oldest undelivered record and the waiting count over the
    /// partitions observed lately.
    fn record_oldest(&self, partition: i32, observation: Observed, now: DateTime<Utc>) {
        let mut observed = self.oldest.lock().expect("oldest lock");
        observed.insert(partition, observation);
        observed.retain(|_, o| o.at.elapsed() < self.observation_lasts);
        let age = observed.values().filter_map(|o| o.oldest).min().map_or(0, |oldest| (now - oldest).num_seconds());
        self.metrics.set_undelivered(age.max(0), observed.values().map(|o| o.waiting).sum());
    }
}

impl<T: Contract + 'static, S: Transport> Processor for Relay<T, S> {
    type Input = T;

    fn stores(&self) -> Vec<&'static str> {
        vec![WAITING.name()]
    }

    fn outputs(&self) -> Vec<&'static str> {
        vec![WEBHOOK_DELIVERIES]
    }

    /// Step 1, then 2: records the filter lets through are offered for delivery.
    async fn process(&self, context: &mut Context<'_>, record: &T) -> Result<(), ProcessError> {
        let data = contract_to_json(record).map_err(|e| ProcessError::internal("encode", e.to_string()))?;
        if !self.filter.passes(&data) {
            self.metrics.finished("filtered");
            return Ok(());
        }
        let delivery = self.delivery(record, data);
        self.offer(context, delivery).await
    }

    /// The head of an account's queue is due; a replayed delivery is offered again; the
    /// sweep reports the oldest waiting delivery.
    async fn on_timer(&self, context: &mut Context<'_>, timer: &Timer) -> Result<(), ProcessError> {
        if let Some(account) = timer.key.strip_prefix(RETRY_TIMER) {
            let mut waiting = context.get(WAITING, account)?.unwrap_or_default();
            let Some(head) = waiting.deliveries.pop_front() else { return Ok(()) };
            if let Err(error) = self.gate(context.now()) {
                self.observe_held(context, head.since)?;
                return Err(error);
            }
            return self.attempt(context, head, waiting).await;
        }
        if timer.key.starts_with(REDELIVER_TIMER) {
            let mut delivery: Delivery = serde_json::from_value(timer.payload.clone())
                .map_err(|e| ProcessError::permanent("redelivery", format!("not a delivery: {e}")))?;
            tracing::info!(
                endpoint = self.endpoint,
                delivery_id = delivery.delivery_id,
                "replayed delivery offered again"
            );
            delivery.attempts = 0;
            delivery.first_attempt_at = None;
            return self.offer(context, delivery).await;
        }
        if timer.key == SWEEP_TIMER {
            // Fired: gone unless observed deliveries still wait, then due again.
            context.cancel(SWEEP_TIMER);
            self.observe(context)?;
        }
        Ok(())
    }
}

/// What an answer means for the delivery (RFC 9110 semantics: 408 and 429 are "try later").
fn verdict(sent: &Result<Answer, SendError>) -> Verdict {
    match sent {
        Ok(answer) if (200..300).contains(&answer.status) => Verdict::Delivered,
        Ok(answer) if answer.status == 408 || answer.status == 429 || answer.status >= 500 => Verdict::Transient {
            reason: describe(answer),
            not_before: answer.retry_after.unwrap_or_default().min(MAX_RETRY_AFTER),
        },
        Ok(answer) => Verdict::Refused(describe(answer)),
        Err(error) => Verdict::Transient { reason: error.to_string(), not_before: Duration::ZERO },
    }
}

fn describe(answer: &Answer) -> String {
    if answer.body.is_empty() {
        format!("HTTP {}", answer.status)
    } else {
        format!("HTTP {}: {}", answer.status, answer.body)
    }
}

/// `step` moved by up to a fifth either way, by a hash of the delivery and attempt: the
/// retries of deliveries that failed together spread out, and the same delivery's wait is the
/// same on every replay of its attempt (the processor stays a function of its input).
fn jittered(step: Duration, delivery_id: &str, attempt: u32) -> Duration {
    let hash = Uuid::new_v5(&DELIVERY_NAMESPACE, format!("{delivery_id}/{attempt}").as_bytes()).as_u128();
    let unit = (hash % 10_001) as f64 / 10_000.0; // 0..=1
    step.mul_f64(0.8 + 0.4 * unit)
}

/// The record as a structured-mode CloudEvent (JSON event format): its attributes from the
/// envelope, the record in the shape `tributary tap` prints as `data`.
pub fn cloud_event(envelope: &Envelope, event_type: &str, data: Json) -> Json {
    let mut event = json!({
        "specversion": "1.0",
        "id": envelope.event_id,
        "source": envelope.source,
        "type": event_type,
        "subject": envelope.account_id,
        "time": envelope.occurred_at_utc().to_rfc3339_opts(SecondsFormat::Millis, true),
        "datacontenttype": "application/json",
        "correlationid": envelope.correlation_id,
        "data": data,
    });
    if let Some(cause) = &envelope.causation_id {
        event["causationid"] = json!(cause);
    }
    event
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_a_fifth_and_differs_between_deliveries() {
        let step = Duration::from_secs(300);
        let waits: Vec<Duration> = (0..50).map(|n| jittered(step, &format!("d-{n}"), 1)).collect();
        assert!(waits.iter().all(|w| *w >= step.mul_f64(0.8) && *w <= step.mul_f64(1.2)), "{waits:?}");
        assert!(waits.iter().any(|w| *w != waits[0]), "spread out");
        assert_eq!(jittered(step, "d-1", 2), jittered(step, "d-1", 2), "deterministic");
    }

    #[test]
    fn answers_are_read_as_rfc_9110_says() {
        let answer = |status, retry_after| Ok(Answer { status, retry_after, body: String::new() });
        assert_eq!(verdict(&answer(204, None)), Verdict::Delivered);
        assert!(matches!(verdict(&answer(503, None)), Verdict::Transient { .. }));
        assert!(matches!(verdict(&answer(408, None)), Verdict::Transient { .. }));
        assert_eq!(
            verdict(&answer(429, Some(Duration::from_secs(90)))),
            Verdict::Transient { reason: "HTTP 429".into(), not_before: Duration::from_secs(90) }
        );
        assert_eq!(verdict(&answer(410, None)), Verdict::Refused("HTTP 410".into()));
        assert_eq!(verdict(&answer(302, None)), Verdict::Refused("HTTP 302".into()));
        assert!(matches!(verdict(&Err(SendError::Timeout(Duration::from_secs(1)))), Verdict::Transient { .. }));
    }
}
