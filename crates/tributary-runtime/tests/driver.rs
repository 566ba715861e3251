//! The test driver's semantics, which are the stream loop's: idempotency, staged state, the
//! retry / dead-letter / pause / stop decisions, timers on the clock, versioned state,
//! multi-topic inputs. No broker, no registry.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tributary_contracts::decimal::Decimal6;
use tributary_contracts::headers;
use tributary_contracts::samples::{Fill, typed};
use tributary_contracts::topics;
use tributary_contracts::types::{Envelope, Payment, UsageEvent, UsageRecorded, WindowKind};
use tributary_runtime::config::RetryConfig;
use tributary_runtime::engine::TimerLetter;
use tributary_runtime::testing::{DriverBuilder, Outcome, TestDriver, TestRecord};
use tributary_runtime::{Context, Output, ProcessError, Processor, Store, StoredValue, Timer};

const SOURCE: &str = "driver-test";

/// Counts per account, as stored.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct Tally {
    seen: i64,
}

impl StoredValue for Tally {}

const TALLIES: Store<Tally> = Store::new("tallies");

tributary_runtime::input_enum! {
    /// Usage and payments: the driver's multi-topic input.
    enum Inbound {
        /// A usage event; its `type` says what the processor does with it.
        Usage(UsageEvent),
        /// A payment.
        Payment(Payment),
    }
}

/// A processor whose behaviour each input's `type` chooses:
/// - `ok`: counts the account and emits a `usage.recorded` naming the input;
/// - `flaky`: fails transiently `flaky_failures` times first;
/// - `poison`: fails permanently; `bug`: an internal error; `down`: its downstream is away
///   `down_for` attempts; `undeclared`: emits to a topic it did not declare;
/// - `schedule`: schedules timer `t/<id>` at now + `quantity` hours (payload: the `data`);
/// - `give_up`: succeeds, and gives up on work `g/<id>` it holds (payload `"held"`).
///
/// Timers emit a record at their due time; a payload `"poison"` fails permanently, `"flaky"`
/// transiently `flaky_failures` times.
#[derive(Debug, Default)]
struct Scripted {
    flaky_failures: u32,
    down_for: u32,
    attempts: Mutex<HashMap<String, u32>>,
}

impl Scripted {
    fn attempt(&self, id: &str) -> u32 {
        let mut attempts = self.attempts.lock().unwrap();
        let attempt = attempts.entry(id.to_owned()).or_default();
        *attempt += 1;
        *attempt
    }

    fn recorded(cause: &Envelope, what: &str, now: DateTime<Utc>) -> UsageRecorded {
        UsageRecorded {
            envelope: Envelope::caused_by(cause, SOURCE, what, now),
            subscription_id: None,
            contract_id: None,
            meter: what.to_owned(),
            unit: "event".into(),
            window_kind: WindowKind::Hour,
            window_start: now.timestamp_millis(),
            window_end: now.timestamp_millis(),
            total_quantity: Decimal6::from(1),
            event_count: 1,
            last_event_at: now.timestamp_millis(),
            dimensions: Default::default(),
            sequence: 1,
            is_final: false,
        }
    }
}

impl Processor for Scripted {
    type Input = Inbound;

    fn stores(&self) -> Vec<&'static str> {
        vec![TALLIES.name()]
    }

    fn outputs(&self) -> Vec<&'static str> {
        vec![topics::USAGE_RECORDED]
    }

    async fn process(&self, context: &mut Context<'_>, input: &Inbound) -> Result<(), ProcessError> {
        let event = match input {
            Inbound::Usage(event) => event,
            Inbound::Payment(payment) => {
                let recorded =
                    Self::recorded(&payment.envelope, &format!("payment/{}", payment.payment_id), context.now());
                context.emit(Output::new(payment.envelope.account_id.clone(), recorded));
                return Ok(());
            }
        };
        let account = event.envelope.account_id.clone();
        // State written before a failure must leave no trace.
        let mut tally = context.get(TALLIES, &account)?.unwrap_or_default();
        tally.seen += 1;
        context.put(TALLIES, &account, &tally)?;
        // What to say if this attempt ends in the DLQ: it names the attempt.
        let outcome = format!("outcome/{}/attempt-{}", event.id, context.attempt().number);
        context.emit_if_dead_lettered(Output::new(
            account.clone(),
            Self::recorded(&event.envelope, &outcome, context.now()),
        ));
        match event.r#type.as_str() {
            "flaky" if self.attempt(&event.id) <= self.flaky_failures => {
                return Err(ProcessError::retryable("flaky", "fails on purpose"));
            }
            "poison" => return Err(ProcessError::permanent("validation", format!("event {} is refused", event.id))),
            "bug" => return Err(ProcessError::internal("state", "a stored value this build cannot read")),
            "down" if self.attempt(&event.id) <= self.down_for => {
                return Err(ProcessError::Unavailable {
                    downstream: "ledger",
                    retry_after: Duration::from_secs(30),
                    message: "in maintenance".into(),
                });
            }
            "undeclared" => {
                context.emit(Output::new(account.clone(), event.clone()));
            }
            "give_up" => {
                let first = context.now() - chrono::Duration::hours(24);
                context.give_up(&format!("g/{}", event.id), serde_json::json!("held"), "gone", "410 Gone", 7, first);
            }
            "schedule" => {
                let hours = event.quantity.map_or(1, |q| q.value().try_into().unwrap_or(1));
                let due = context.now() + chrono::Duration::hours(hours);
                let payload: serde_json::Value = serde_json::from_str(&event.data).unwrap_or_default();
                context.schedule(&format!("t/{}", event.id), due, payload)?;
            }
            _ => {}
        }
        let recorded = Self::recorded(&event.envelope, &event.id, context.now());
        context.emit(Output::new(account, recorded));
        Ok(())
    }

    async fn on_timer(&self, context: &mut Context<'_>, timer: &Timer) -> Result<(), ProcessError> {
        match timer.payload.as_str() {
            Some("poison") => return Err(ProcessError::permanent("expired", "the timer's subject is gone")),
            Some("flaky") if self.attempt(&timer.key) <= self.flaky_failures => {
                return Err(ProcessError::retryable("flaky", "fails on purpose"));
            }
            _ => {}
        }
        let cause = Envelope::originating(SOURCE, "timers", timer.due_at);
        let mut recorded = Self::recorded(&cause, &timer.key, timer.due_at);
        recorded.last_event_at = timer.due_at.timestamp_millis();
        context.emit(Output::new("timers", recorded));
        Ok(())
    }
}

fn event(account: &str, kind: &str) -> UsageEvent {
    let now = DateTime::parse_from_rfc3339(tributary_runtime::testing::DEFAULT_START).unwrap().to_utc();
    let envelope = Envelope::originating("platform", account, now);
    UsageEvent {
        id: envelope.event_id.clone(),
        source: "platform".into(),
        r#type: kind.into(),
        subject: account.into(),
        time: now.timestamp_millis(),
        data: "{}".into(),
        subscription_id: None,
        meter: None,
        quantity: None,
        unit: None,
        dimensions: Default::default(),
        received_at: None,
        envelope,
    }
}

fn quick_retries() -> RetryConfig {
    RetryConfig { initial_backoff: Duration::from_millis(100), max_backoff: Duration::from_secs(1), max_attempts: 3 }
}

fn driver(processor: Scripted) -> TestDriver<Scripted> {
    DriverBuilder::new().service("driver-test").retry(quick_retries()).build(processor)
}

async fn meters_of(driver: &mut TestDriver<Scripted>) -> Vec<String> {
    driver.read::<UsageRecorded>().await.into_iter().map(|r| r.meter).collect()
}

#[tokio::test]
async fn an_input_is_processed_once_and_its_duplicate_is_skipped() {
    let mut driver = driver(Scripted::default());
    let input = event("acct-1", "ok");
    assert_eq!(driver.pipe(input.clone()).await, Outcome::Processed);
    assert_eq!(driver.pipe(input.clone()).await, Outcome::Duplicate);
    assert_eq!(meters_of(&mut driver).await, vec![input.id.clone()]);
    assert_eq!(driver.get(TALLIES, "acct-1"), Some(Tally { seen: 1 }));
    let metrics = driver.metrics();
    assert!(metrics.contains(r#"tributary_duplicates_skipped_total{topic="usage.events"} 1"#), "{metrics}");
}

#[tokio::test]
async fn a_transient_failure_waits_its_backoff_on_the_clock_and_later_records_wait_behind_it() {
    let mut driver = driver(Scripted { flaky_failures: 2, ..Scripted::default() });
    let flaky = event("acct-1", "flaky");
    let behind = event("acct-1", "ok");
    assert_eq!(driver.pipe(flaky.clone()).await, Outcome::Retrying(2));
    assert_eq!(driver.pipe(behind.clone()).await, Outcome::Queued, "same account, same partition: it waits");
    assert_eq!(driver.get(TALLIES, "acct-1"), None, "the failed attempt's state was dropped");

    assert!(driver.advance(Duration::from_millis(99)).await.is_empty(), "the first backoff is 100 ms");
    assert_eq!(driver.advance(Duration::from_millis(1)).await, vec![Outcome::Retrying(3)]);
    assert_eq!(driver.advance(Duration::from_millis(200)).await, vec![Outcome::Processed, Outcome::Processed]);
    assert_eq!(
        meters_of(&mut driver).await,
        vec![flaky.id, behind.id],
        "order within the partition is kept; no outcome of a failed attempt that was retried"
    );
    assert_eq!(driver.get(TALLIES, "acct-1"), Some(Tally { seen: 2 }), "each record counted once");
    assert!(driver.metrics().contains(r#"tributary_retries_total{stage="process"} 2"#), "{}", driver.metrics());
    assert!(driver.dead_letters().is_empty());
}

#[tokio::test]
async fn retries_that_run_out_dead_letter_the_record_with_the_attempts_made() {
    let mut driver = driver(Scripted { flaky_failures: 10, ..Scripted::default() });
    let flaky = event("acct-1", "flaky");
    driver.pipe(flaky.clone()).await;
    driver.advance(Duration::from_secs(1)).await;
    driver.advance(Duration::from_secs(1)).await;
    let letters = driver.dead_letters();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].letter.class, "flaky.retries_exhausted");
    assert_eq!(letters[0].letter.attempts, 3, "max_attempts in all");
    assert_eq!(
        meters_of(&mut driver).await,
        vec![format!("outcome/{}/attempt-3", flaky.id)],
        "the processor's outcome for the dead-letter case, from the last attempt only"
    );
    assert_eq!(driver.pipe(event("acct-1", "ok")).await, Outcome::Processed, "the partition moved on");
}

#[tokio::test]
async fn a_permanent_failure_dead_letters_the_original_bytes_with_the_reason_headers() {
    let mut driver = driver(Scripted::default());
    let poison = event("acct-1", "poison");
    let piped = driver
        .pipe_record(
            TestRecord::value(poison.clone())
                .header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        )
        .await;
    assert_eq!(piped, Outcome::DeadLettered("validation".into()));
    assert_eq!(
        meters_of(&mut driver).await,
        vec![format!("outcome/{}/attempt-1", poison.id)],
        "the outcome is written with the dead letter, the record's other outputs are not"
    );
    let letters = driver.dead_letters();
    let letter = &letters[0];
    assert_eq!(letter.letter.service, "driver-test");
    assert!(letter.letter.message.contains(&poison.id), "{:?}", letter.letter);
    assert_eq!(letter.letter.source.topic, topics::USAGE_EVENTS);
    assert_eq!(letter.key.as_deref(), Some(b"acct-1".as_slice()));
    let names: Vec<&str> = letter.headers.iter().map(|(name, _)| name.as_str()).collect();
    for name in ["traceparent", headers::DLQ_ERROR_CLASS, headers::DLQ_SOURCE_OFFSET, headers::DLQ_FIRST_FAILURE_AT] {
        assert!(names.contains(&name), "missing {name}: {names:?}");
    }
    assert_eq!(driver.get(TALLIES, "acct-1"), None, "nothing of the refused record is kept");
    // A corrected resend under the same id is processed: a refusal does not use up the key.
    let mut fixed = poison;
    fixed.r#type = "ok".into();
    assert_eq!(driver.pipe(fixed).await, Outcome::Processed);
}

#[tokio::test]
async fn bytes_that_are_not_avro_and_tombstones_are_dead_lettered_with_their_class() {
    let mut driver = driver(Scripted::default());
    let garbage = TestRecord::bytes(topics::USAGE_EVENTS, Some("acct-1"), Some(b"{\"not\":\"avro\"}".to_vec()));
    assert_eq!(driver.pipe_record(garbage).await, Outcome::DeadLettered("decode.wrong_magic_byte".into()));
    let tombstone = TestRecord::bytes(topics::USAGE_EVENTS, Some("acct-1"), None);
    assert_eq!(driver.pipe_record(tombstone).await, Outcome::DeadLettered("tombstone".into()));
}

#[tokio::test]
async fn an_unavailable_downstream_pauses_the_partition_and_dead_letters_nothing() {
    let mut driver = driver(Scripted { down_for: 2, ..Scripted::default() });
    let down = event("acct-1", "down");
    let behind = event("acct-1", "ok");
    assert_eq!(driver.pipe(down.clone()).await, Outcome::Paused("ledger".into()));
    assert_eq!(driver.pipe(behind.clone()).await, Outcome::Queued);
    assert_eq!(driver.advance(Duration::from_secs(30)).await, vec![Outcome::Paused("ledger".into())]);
    assert_eq!(driver.advance(Duration::from_secs(30)).await, vec![Outcome::Processed, Outcome::Processed]);
    assert_eq!(meters_of(&mut driver).await, vec![down.id, behind.id]);
    assert!(driver.dead_letters().is_empty(), "an outage is nobody's bad input");
}

#[tokio::test]
async fn an_internal_error_stops_its_partition_only_and_dead_letters_nothing() {
    let mut driver = driver(Scripted::default());
    let bug = event("acct-1", "bug");
    let other = (0..100)
        .map(|i| format!("acct-{i}"))
        .find(|a| driver.partition_of(a) != driver.partition_of("acct-1"))
        .unwrap();
    assert_eq!(driver.pipe(bug).await, Outcome::Stopped("state".into()));
    assert_eq!(driver.pipe(event("acct-1", "ok")).await, Outcome::Queued, "the stopped partition takes nothing");
    assert_eq!(driver.pipe(event(&other, "ok")).await, Outcome::Processed, "other partitions go on");
    assert!(driver.dead_letters().is_empty());
    assert!(driver.metrics().contains("tributary_partitions_stopped_total 1"), "{}", driver.metrics());

    let mut driver = self::driver(Scripted::default());
    assert_eq!(driver.pipe(event("acct-1", "undeclared")).await, Outcome::Stopped("undeclared_output".into()));
    assert_eq!(driver.pending_outputs().count(), 0, "nothing of it is written");
}

fn scheduling(account: &str, hours: i64, payload: &str) -> UsageEvent {
    let mut input = event(account, "schedule");
    input.quantity = Some(Decimal6::from(hours));
    input.data = serde_json::to_string(payload).unwrap();
    input
}

#[tokio::test]
async fn timers_due_in_a_skipped_interval_fire_once_each_in_due_order() {
    let mut driver = driver(Scripted::default());
    let inputs = [scheduling("acct-a", 72, "ok"), scheduling("acct-b", 24, "ok"), scheduling("acct-c", 48, "ok")];
    for input in &inputs {
        driver.pipe(input.clone()).await;
    }
    driver.read::<UsageRecorded>().await;
    assert_eq!(driver.timers().len(), 3);
    assert!(driver.advance(Duration::from_secs(23 * 3600)).await.is_empty(), "nothing due after 23 hours");

    let ran = driver.advance(Duration::from_secs(30 * 86_400)).await;
    assert_eq!(ran, vec![Outcome::Processed; 3]);
    let fired: Vec<String> = meters_of(&mut driver).await;
    let expected: Vec<String> = [1, 2, 0].iter().map(|&i| format!("t/{}", inputs[i].id)).collect();
    assert_eq!(fired, expected, "in due order: 24 h, 48 h, 72 h");
    assert!(driver.timers().is_empty(), "each fired once and is gone");
    assert!(driver.advance(Duration::from_secs(86_400)).await.is_empty());
}

#[tokio::test]
async fn a_timer_that_fails_permanently_is_dead_lettered_with_its_key_and_payload() {
    let mut driver = driver(Scripted::default());
    let input = scheduling("acct-a", 1, "poison");
    driver.pipe(input.clone()).await;
    let ran = driver.advance(Duration::from_secs(3600)).await;
    assert_eq!(ran, vec![Outcome::DeadLettered("expired".into())]);
    let letters = driver.dead_letters();
    let letter = &letters[0];
    assert_eq!(letter.letter.source.topic, "driver-test.timer-replays", "replayed to where the service takes it back");
    assert!(letter.headers.iter().any(|(name, value)| name == headers::DLQ_TIMER_KEY
        && value.as_deref() == Some(format!("t/{}", input.id).as_bytes())));
    let timer: TimerLetter = serde_json::from_slice(letter.payload.as_deref().unwrap()).unwrap();
    assert_eq!(timer.timer, format!("t/{}", input.id));
    assert_eq!(timer.payload, serde_json::json!("poison"));
    assert_eq!(timer.partition, driver.partition_of("acct-a"));
    assert!(driver.timers().is_empty(), "a dead-lettered timer does not fire again");

    // The operator's replay (what `tributary dlq replay` publishes) schedules it again, once.
    let replay = || {
        TestRecord::bytes("driver-test.timer-replays", Some(&timer.timer), letter.payload.clone())
            .header(headers::REPLAYED_FROM, "driver-test.dlq[0]@0")
            .partition(timer.partition)
    };
    assert_eq!(driver.pipe_record(replay()).await, Outcome::Processed);
    let again = driver.dead_letters();
    assert_eq!(again.len(), 1, "it fired at once (and is still poison)");
    assert_eq!(again[0].letter.class, "expired");
    assert_eq!(driver.pipe_record(replay()).await, Outcome::Duplicate, "the same replay twice schedules it once");
    assert!(driver.dead_letters().is_empty() && driver.timers().is_empty());
}

#[tokio::test]
async fn work_given_up_while_the_attempt_succeeds_is_dead_lettered_as_a_timer_and_a_replay_takes_it_up() {
    let mut driver = driver(Scripted::default());
    let input = event("acct-a", "give_up");
    assert_eq!(driver.pipe(input.clone()).await, Outcome::Processed, "the attempt itself succeeds");
    assert_eq!(meters_of(&mut driver).await, vec![input.id.clone()], "with its outputs");
    assert_eq!(driver.get(TALLIES, "acct-a").map(|t| t.seen), Some(1), "and its state");
    let letters = driver.dead_letters();
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(
        (letter.letter.class.as_str(), letter.letter.message.as_str(), letter.letter.attempts),
        ("gone", "410 Gone", 7)
    );
    assert_eq!(letter.letter.source.topic, "driver-test.timer-replays");
    assert_eq!(letter.letter.first_failure_at, driver.now() - chrono::Duration::hours(24));
    let timer: TimerLetter = serde_json::from_slice(letter.payload.as_deref().unwrap()).unwrap();
    assert_eq!(
        (timer.timer.as_str(), &timer.payload),
        (format!("g/{}", input.id).as_str(), &serde_json::json!("held"))
    );
    assert!(driver.timers().is_empty(), "nothing is scheduled until an operator replays it");

    let replay = TestRecord::bytes("driver-test.timer-replays", Some(&timer.timer), letter.payload.clone())
        .header(headers::REPLAYED_FROM, "driver-test.dlq[0]@0")
        .partition(timer.partition);
    assert_eq!(driver.pipe_record(replay).await, Outcome::Processed);
    assert_eq!(meters_of(&mut driver).await, vec![timer.timer.clone()], "the timer fired with the held work");
    assert!(driver.dead_letters().is_empty());
}

#[tokio::test]
async fn a_timer_that_fails_transiently_backs_off_and_then_fires() {
    let mut driver = driver(Scripted { flaky_failures: 2, ..Scripted::default() });
    let input = scheduling("acct-a", 1, "flaky");
    driver.pipe(input.clone()).await;
    driver.read::<UsageRecorded>().await;
    assert_eq!(driver.advance(Duration::from_secs(3600)).await, vec![Outcome::Retrying(2)]);
    let behind = event("acct-a", "ok");
    assert_eq!(driver.pipe(behind).await, Outcome::Queued, "a timer's retry holds its partition like a record's");
    assert_eq!(driver.advance(Duration::from_millis(100)).await, vec![Outcome::Retrying(3)]);
    assert_eq!(driver.advance(Duration::from_millis(200)).await, vec![Outcome::Processed, Outcome::Processed]);
    assert_eq!(meters_of(&mut driver).await.len(), 2);
    assert!(driver.timers().is_empty());
}

#[tokio::test]
async fn several_input_topics_are_declared_once_and_decoded_to_their_variant() {
    let mut driver = driver(Scripted::default());
    let mut payment: Payment = typed(Fill::Full, 3);
    payment.envelope.account_id = "acct-pay".into();
    assert_eq!(driver.pipe(payment.clone()).await, Outcome::Processed);
    assert_eq!(driver.pipe(event("acct-use", "ok")).await, Outcome::Processed);
    let meters = meters_of(&mut driver).await;
    assert_eq!(meters[0], format!("payment/{}", payment.payment_id));
    assert_eq!(<Inbound as tributary_runtime::Input>::topics(), vec![topics::USAGE_EVENTS, topics::BILLING_PAYMENTS]);
}

#[tokio::test]
async fn idempotency_keys_expire_after_their_window_on_the_clock() {
    let mut driver = DriverBuilder::new().idempotency_window(Duration::from_secs(86_400)).build(Scripted::default());
    let input = event("acct-1", "ok");
    driver.pipe(input.clone()).await;
    driver.advance(Duration::from_secs(3600)).await;
    assert_eq!(driver.pipe(input.clone()).await, Outcome::Duplicate, "within the window");
    driver.advance(Duration::from_secs(86_400)).await;
    assert_eq!(driver.pipe(input).await, Outcome::Processed, "a day later the key is gone");
}

/// The stored value of the first release.
#[derive(Debug, Serialize, Deserialize)]
struct CountV1 {
    count: i64,
}

impl StoredValue for CountV1 {}

/// The next release renamed the field and added one.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct CountV2 {
    seen: i64,
    #[serde(default)]
    last_type: String,
}

impl StoredValue for CountV2 {
    const VERSION: u32 = 2;
    fn upgrade(version: u32, mut value: serde_json::Value) -> Result<Self, serde_json::Error> {
        if version < 2 {
            value["seen"] = value["count"].take();
        }
        serde_json::from_value(value)
    }
}

/// A processor over a store whose value type is `V`.
#[derive(Debug)]
struct Counting<V>(std::marker::PhantomData<V>);

trait Counter: StoredValue + std::fmt::Debug + 'static {
    fn next(previous: Option<Self>, kind: &str) -> Self;
}

impl Counter for CountV1 {
    fn next(previous: Option<Self>, _: &str) -> Self {
        Self { count: previous.map_or(0, |c| c.count) + 1 }
    }
}

impl Counter for CountV2 {
    fn next(previous: Option<Self>, kind: &str) -> Self {
        Self { seen: previous.map_or(0, |c| c.seen) + 1, last_type: kind.to_owned() }
    }
}

impl<V: Counter> Processor for Counting<V> {
    type Input = UsageEvent;

    fn stores(&self) -> Vec<&'static str> {
        vec!["counts"]
    }

    fn outputs(&self) -> Vec<&'static str> {
        Vec::new()
    }

    async fn process(&self, context: &mut Context<'_>, input: &UsageEvent) -> Result<(), ProcessError> {
        let store: Store<V> = Store::new("counts");
        let count = V::next(context.get(store, &input.envelope.account_id)?, &input.r#type);
        context.put(store, &input.envelope.account_id, &count)?;
        Ok(())
    }
}

#[tokio::test]
async fn state_written_by_an_older_struct_is_read_after_an_upgrade_and_never_dead_lettered() {
    let mut driver = TestDriver::new(Counting::<CountV1>(Default::default()));
    driver.pipe(event("acct-1", "ok")).await;
    driver.pipe(event("acct-1", "ok")).await;

    let mut driver = driver.restart_with(Counting::<CountV2>(Default::default()));
    assert_eq!(driver.pipe(event("acct-1", "upgraded")).await, Outcome::Processed);
    let counts: Store<CountV2> = Store::new("counts");
    assert_eq!(driver.get(counts, "acct-1"), Some(CountV2 { seen: 3, last_type: "upgraded".into() }));
    assert!(driver.dead_letters().is_empty());

    // Rolled back to the first release, the newer values are refused: the partition stops,
    // the record is not dead-lettered.
    let mut driver = driver.restart_with(Counting::<CountV1>(Default::default()));
    assert_eq!(driver.pipe(event("acct-1", "ok")).await, Outcome::Stopped("state".into()));
    assert!(driver.dead_letters().is_empty());
}

/// A processor that only sweeps: it records which partition was swept when.
#[derive(Debug, Default)]
struct Sweeper {
    swept: Mutex<Vec<(i32, DateTime<Utc>)>>,
}

impl Processor for Sweeper {
    type Input = UsageEvent;

    fn outputs(&self) -> Vec<&'static str> {
        vec![]
    }

    fn sweep_every(&self) -> Option<Duration> {
        Some(Duration::from_secs(3600))
    }

    async fn process(&self, _: &mut Context<'_>, _: &UsageEvent) -> Result<(), ProcessError> {
        Ok(())
    }

    async fn on_timer(&self, context: &mut Context<'_>, timer: &Timer) -> Result<(), ProcessError> {
        assert_eq!(timer.key, tributary_runtime::SWEEP_TIMER);
        self.swept.lock().unwrap().push((context.partition(), context.now()));
        Ok(())
    }
}

#[tokio::test]
async fn every_partition_is_swept_at_start_and_every_interval_once_for_a_long_advance() {
    let start = DateTime::parse_from_rfc3339("2026-03-01T00:00:00Z").unwrap().to_utc();
    let mut driver = DriverBuilder::new().partitions(3).start_at(start).build(Sweeper::default());
    driver.advance(Duration::from_secs(1)).await;
    let swept = |driver: &TestDriver<Sweeper>| driver.processor().swept.lock().unwrap().clone();
    let mut partitions: Vec<i32> = swept(&driver).iter().map(|(p, _)| *p).collect();
    partitions.sort();
    assert_eq!(partitions, vec![0, 1, 2], "every partition, though no record reached any");
    driver.advance(Duration::from_secs(1800)).await;
    assert_eq!(swept(&driver).len(), 3, "not again before the interval");
    driver.advance(Duration::from_secs(1800)).await;
    assert_eq!(swept(&driver).len(), 6, "again after an hour");
    driver.advance(Duration::from_secs(30 * 86_400)).await;
    assert_eq!(swept(&driver).len(), 9, "a month ahead: one sweep per partition, not 720");
    assert!(driver.timers().is_empty(), "nothing stored for a sweep: {:?}", driver.timers());
}
