//! The relay's logic on the runtime's test driver, with a scripted endpoint standing in for
//! HTTP (the real one, signatures verified by the Standard Webhooks library, is in the e2e
//! tests): what is sent, in which order, when it is retried, when it is given up.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::Value as Json;
use tributary_contracts::headers;
use tributary_contracts::samples::{Fill, typed};
use tributary_contracts::types::{CrmAccountUpdate, CrmUpdateKind, DeliveryOutcome, Envelope, WebhookDeliveryAttempt};
use tributary_outbound::filter::Filter;
use tributary_outbound::http::{Answer, SendError, Transport};
use tributary_outbound::metrics::EndpointMetrics;
use tributary_outbound::relay::{Relay, RelayPlan};
use tributary_runtime::circuit::Circuit;
use tributary_runtime::engine::TimerLetter;
use tributary_runtime::testing::{DriverBuilder, Outcome, TestDriver, TestRecord};
use tributary_telemetry::ServiceMetrics;

const SERVICE: &str = "billing-router.relay.crm";

/// One request as the endpoint received it.
#[derive(Debug, Clone)]
struct Sent {
    id: String,
    body: Json,
}

/// An endpoint that answers from a script (200 once the script is used up) and remembers
/// every request.
#[derive(Debug, Clone, Default)]
struct ScriptedEndpoint {
    script: Arc<Mutex<VecDeque<Result<Answer, SendError>>>>,
    sent: Arc<Mutex<Vec<Sent>>>,
}

impl ScriptedEndpoint {
    fn then(&self, answer: Result<Answer, SendError>) -> &Self {
        self.script.lock().unwrap().push_back(answer);
        self
    }

    fn sent(&self) -> Vec<Sent> {
        std::mem::take(&mut self.sent.lock().unwrap())
    }
}

fn status(status: u16) -> Result<Answer, SendError> {
    Ok(Answer { status, retry_after: None, body: String::new() })
}

impl Transport for ScriptedEndpoint {
    fn send<'a>(&'a self, id: &'a str, body: &'a str) -> BoxFuture<'a, Result<Answer, SendError>> {
        let body: Json = serde_json::from_str(body).expect("the body is JSON");
        self.sent.lock().unwrap().push(Sent { id: id.to_owned(), body });
        let answer = self.script.lock().unwrap().pop_front().unwrap_or_else(|| status(200));
        Box::pin(async move { answer })
    }
}

/// The per-test world: the relay on the driver, its endpoint, and records to send.
struct World {
    driver: TestDriver<Relay<CrmAccountUpdate, ScriptedEndpoint>>,
    endpoint: ScriptedEndpoint,
    seed: i64,
}

fn schedule() -> Vec<Duration> {
    [5, 300, 1_800].map(Duration::from_secs).to_vec()
}

fn relay(endpoint: ScriptedEndpoint, only: &[(&str, &[&str])]) -> Relay<CrmAccountUpdate, ScriptedEndpoint> {
    let only: BTreeMap<String, Vec<String>> =
        only.iter().map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect())).collect();
    let plan = RelayPlan {
        endpoint: "crm".into(),
        source: "tributary.billing-router".into(),
        filter: Filter::new(&only),
        schedule: schedule(),
        open_for: Duration::from_secs(30),
    };
    let metrics = ServiceMetrics::register(&mut prometheus_client::registry::Registry::default(), SERVICE);
    let circuit = Circuit::new("webhook.crm", 3, Duration::from_secs(30), Duration::from_secs(20), metrics);
    Relay::new(plan, endpoint, circuit, EndpointMetrics::unregistered("crm"))
}

impl World {
    fn new() -> Self {
        Self::filtered(&[])
    }

    fn filtered(only: &[(&str, &[&str])]) -> Self {
        let endpoint = ScriptedEndpoint::default();
        let driver = DriverBuilder::new().service(SERVICE).build(relay(endpoint.clone(), only));
        Self { driver, endpoint, seed: 0 }
    }

    fn update(&mut self, account: &str, kind: CrmUpdateKind) -> CrmAccountUpdate {
        self.seed += 1;
        let mut update: CrmAccountUpdate = typed(Fill::Full, self.seed);
        update.envelope = Envelope::originating("tributary.billing-router", account, self.driver.now());
        update.kind = kind;
        update.summary = format!("update {}", self.seed);
        update
    }

    async fn attempts(&mut self) -> Vec<WebhookDeliveryAttempt> {
        self.driver.read::<WebhookDeliveryAttempt>().await
    }
}

fn summaries(sent: &[Sent]) -> Vec<String> {
    sent.iter().map(|s| s.body["data"]["summary"].as_str().unwrap().to_owned()).collect()
}

#[tokio::test]
async fn a_record_is_delivered_once_as_a_cloud_event_and_its_attempt_is_recorded() {
    let mut world = World::new();
    let update = world.update("acct-a", CrmUpdateKind::OverageCharged);
    assert_eq!(world.driver.pipe(update.clone()).await, Outcome::Processed);
    let sent = world.endpoint.sent();
    assert_eq!(sent.len(), 1);
    let body = &sent[0].body;
    assert_eq!(body["specversion"], "1.0");
    assert_eq!(body["id"], update.envelope.event_id.as_str());
    assert_eq!(body["type"], "io.tributary.crm.CrmAccountUpdate");
    assert_eq!(body["source"], "tributary.billing-router");
    assert_eq!(body["subject"], "acct-a");
    assert_eq!(body["correlationid"], update.envelope.correlation_id.as_str());
    assert_eq!(body["data"]["kind"], "OVERAGE_CHARGED");
    assert!(body["data"]["amount"].is_string(), "decimals as strings, as tap prints them: {body}");

    let attempts = world.attempts().await;
    assert_eq!(attempts.len(), 1);
    let attempt = &attempts[0];
    assert_eq!((attempt.outcome, attempt.attempt, attempt.status_code), (DeliveryOutcome::Delivered, 1, Some(200)));
    assert_eq!(attempt.delivery_id, sent[0].id, "the record names the webhook-id sent");
    assert_eq!((attempt.endpoint.as_str(), attempt.topic.as_str()), ("crm", "crm.account-updates"));
    assert_eq!(attempt.envelope.causation_id.as_deref(), Some(update.envelope.event_id.as_str()));
    assert_eq!(attempt.envelope.account_id, "acct-a");
    assert_eq!(attempt.error, None);

    assert_eq!(world.driver.pipe(update).await, Outcome::Duplicate, "the same record again");
    assert!(world.endpoint.sent().is_empty(), "is not sent twice");
}

#[tokio::test]
async fn records_the_filter_refuses_are_not_sent_nor_recorded() {
    let mut world = World::filtered(&[("kind", &["ENTITLEMENT_CHANGED", "RENEWAL_RISK"])]);
    let charged = world.update("acct-a", CrmUpdateKind::OverageCharged);
    let at_risk = world.update("acct-a", CrmUpdateKind::RenewalRisk);
    world.driver.pipe(charged).await;
    world.driver.pipe(at_risk).await;
    assert_eq!(summaries(&world.endpoint.sent()), vec!["update 2"]);
    assert_eq!(world.attempts().await.len(), 1);
}

#[tokio::test]
async fn a_transient_failure_waits_its_step_and_the_accounts_later_records_wait_behind_it_in_order() {
    let mut world = World::new();
    world.endpoint.then(status(503));
    let first = world.update("acct-a", CrmUpdateKind::OverageCharged);
    let second = world.update("acct-a", CrmUpdateKind::InvoiceIssued);
    let other = world.update("acct-b", CrmUpdateKind::OverageCharged);
    for update in [first, second, other] {
        assert_eq!(world.driver.pipe(update).await, Outcome::Processed, "nothing holds the partition");
    }
    assert_eq!(summaries(&world.endpoint.sent()), vec!["update 1", "update 3"], "acct-b is not held up by acct-a");
    let attempts = world.attempts().await;
    assert_eq!(attempts[0].outcome, DeliveryOutcome::RetryScheduled);
    assert_eq!((attempts[0].status_code, attempts[0].error.as_deref()), (Some(503), Some("HTTP 503")));
    let next = attempts[0].next_attempt_at.expect("a retry time");
    let wait = next - world.driver.now().timestamp_millis();
    assert!((4_000..=6_000).contains(&wait), "the first step, 5 s jittered by a fifth: {wait} ms");

    world.driver.advance(Duration::from_secs(3)).await;
    assert!(world.endpoint.sent().is_empty(), "not before its time");
    world.driver.advance(Duration::from_secs(4)).await;
    let sent = world.endpoint.sent();
    assert_eq!(summaries(&sent), vec!["update 1", "update 2"], "the retry, then the one behind it");
    let attempts = world.attempts().await;
    assert_eq!(
        attempts.iter().map(|a| (a.attempt, a.outcome)).collect::<Vec<_>>(),
        vec![(2, DeliveryOutcome::Delivered), (1, DeliveryOutcome::Delivered)]
    );
    assert!(world.driver.get(tributary_outbound::relay::WAITING, "acct-a").is_none(), "nothing left waiting");
    assert!(world.driver.timers().is_empty(), "no timer left either");
}

#[tokio::test]
async fn retry_after_is_honoured_when_it_asks_for_longer_than_the_schedule() {
    let mut world = World::new();
    world.endpoint.then(Ok(Answer {
        status: 429,
        retry_after: Some(Duration::from_secs(600)),
        body: "slow down".into(),
    }));
    let update = world.update("acct-a", CrmUpdateKind::OverageCharged);
    world.driver.pipe(update).await;
    let attempt = world.attempts().await.remove(0);
    assert_eq!(attempt.error.as_deref(), Some("slow down"), "the answer's body, for the operator");
    assert_eq!(attempt.next_attempt_at, Some(world.driver.now().timestamp_millis() + 600_000));
    world.driver.advance(Duration::from_secs(599)).await;
    assert!(world.endpoint.sent().len() == 1, "only the first attempt so far");
    world.driver.advance(Duration::from_secs(1)).await;
    assert_eq!(world.endpoint.sent().len(), 1, "the retry, at Retry-After");
}

#[tokio::test]
async fn a_410_is_never_retried_is_dead_lettered_with_the_answer_and_a_replay_sends_the_same_id() {
    let mut world = World::new();
    world.endpoint.then(Ok(Answer { status: 410, retry_after: None, body: "endpoint retired".into() }));
    let gone = world.update("acct-a", CrmUpdateKind::OverageCharged);
    let next = world.update("acct-a", CrmUpdateKind::InvoiceIssued);
    world.driver.pipe(gone).await;
    world.driver.pipe(next).await;
    let sent = world.endpoint.sent();
    assert_eq!(summaries(&sent), vec!["update 1", "update 2"], "the account's next record is not held");
    let attempts = world.attempts().await;
    assert_eq!((attempts[0].outcome, attempts[0].status_code), (DeliveryOutcome::Refused, Some(410)));

    let letters = world.driver.dead_letters();
    assert_eq!(letters.len(), 1);
    let letter = &letters[0].letter;
    assert_eq!((letter.class.as_str(), letter.attempts), ("webhook_refused", 1));
    assert!(letter.message.contains("410") && letter.message.contains("endpoint retired"), "{}", letter.message);
    world.driver.advance(Duration::from_secs(86_400)).await;
    assert!(world.endpoint.sent().is_empty(), "no retry, ever");

    // The operator fixed the endpoint and replays the dead letter: the same delivery again.
    let timer: TimerLetter = serde_json::from_slice(letters[0].payload.as_deref().unwrap()).unwrap();
    let replay = TestRecord::bytes(&format!("{SERVICE}.timer-replays"), Some(&timer.timer), letters[0].payload.clone())
        .header(headers::REPLAYED_FROM, &format!("{SERVICE}.dlq[0]@0"))
        .partition(timer.partition);
    assert_eq!(world.driver.pipe_record(replay).await, Outcome::Processed);
    let again = world.endpoint.sent();
    assert_eq!(again.len(), 1);
    assert_eq!((again[0].id.as_str(), &again[0].body), (sent[0].id.as_str(), &sent[0].body), "same id, same body");
    let attempt = world.attempts().await.remove(0);
    assert_eq!((attempt.outcome, attempt.attempt), (DeliveryOutcome::Delivered, 1), "a new round");
}

#[tokio::test]
async fn a_schedule_used_up_dead_letters_the_delivery_and_the_next_one_goes() {
    let mut world = World::new();
    for _ in 0..4 {
        world.endpoint.then(Err(SendError::Timeout(Duration::from_secs(10))));
    }
    let update = world.update("acct-a", CrmUpdateKind::OverageCharged);
    world.driver.pipe(update).await;
    let update = world.update("acct-a", CrmUpdateKind::InvoiceIssued);
    world.driver.pipe(update).await;
    // Waits of 5 s, 300 s and 1,800 s, each at most a fifth longer: every step of the clock
    // below passes the next retry's time (a timer fires at the clock's new time).
    for _ in 0..4 {
        world.driver.advance(Duration::from_secs(2_200)).await;
    }
    let sent = world.endpoint.sent();
    assert_eq!(summaries(&sent), vec!["update 1"; 4].into_iter().chain(["update 2"]).collect::<Vec<_>>());
    assert!(sent.iter().take(4).all(|s| s.id == sent[0].id), "one delivery id for every attempt");
    let outcomes: Vec<_> = world.attempts().await.iter().map(|a| (a.attempt, a.outcome, a.status_code)).collect();
    assert_eq!(
        outcomes,
        vec![
            (1, DeliveryOutcome::RetryScheduled, None),
            (2, DeliveryOutcome::RetryScheduled, None),
            (3, DeliveryOutcome::RetryScheduled, None),
            (4, DeliveryOutcome::RetriesExhausted, None),
            (1, DeliveryOutcome::Delivered, Some(200)),
        ]
    );
    let letters = world.driver.dead_letters();
    assert_eq!(letters.len(), 1);
    assert_eq!((letters[0].letter.class.as_str(), letters[0].letter.attempts), ("webhook_retries_exhausted", 4));
    assert!(letters[0].letter.message.contains("timeout after 10s"), "{}", letters[0].letter.message);
}

#[tokio::test]
async fn an_open_circuit_pauses_the_partition_and_a_probe_that_succeeds_closes_it() {
    let mut world = World::new();
    for _ in 0..3 {
        world.endpoint.then(Err(SendError::Connect("connection refused".into())));
    }
    for account in ["acct-a", "acct-b", "acct-c"] {
        let update = world.update(account, CrmUpdateKind::OverageCharged);
        world.driver.pipe(update).await;
    }
    assert_eq!(world.endpoint.sent().len(), 3, "three failures in a row open the circuit");
    let held = world.update("acct-d", CrmUpdateKind::OverageCharged);
    assert_eq!(world.driver.pipe(held).await, Outcome::Paused("webhook".into()), "nothing is sent while open");
    assert!(world.endpoint.sent().is_empty());
    assert!(world.driver.dead_letters().is_empty(), "and nothing is dead-lettered");

    // After 30 s one probe goes; it succeeds, and everything flows again.
    world.driver.advance(Duration::from_secs(31)).await;
    let mut delivered = summaries(&world.endpoint.sent());
    delivered.sort();
    assert_eq!(delivered, vec!["update 1", "update 2", "update 3", "update 4"]);
}

#[tokio::test]
async fn deliveries_waiting_for_a_retry_survive_a_restart() {
    let mut world = World::new();
    world.endpoint.then(status(500));
    let update = world.update("acct-a", CrmUpdateKind::OverageCharged);
    world.driver.pipe(update).await;
    let update = world.update("acct-a", CrmUpdateKind::InvoiceIssued);
    world.driver.pipe(update).await;
    assert_eq!(world.endpoint.sent().len(), 1);
    let endpoint = ScriptedEndpoint::default();
    let mut driver = world.driver.restart_with(relay(endpoint.clone(), &[]));
    driver.advance(Duration::from_secs(10)).await;
    assert_eq!(summaries(&endpoint.sent()), vec!["update 1", "update 2"], "from the state, in order");
}
