//! What the Kafka loop and the test driver share: one attempt at a record or a timer, and what
//! its outcome means. Both run every record through [`Engine::attempt`] and every outcome
//! through [`Engine::finish`], so a processor behaves the same under the driver as in
//! production: decoding, idempotency keys, staged state dropped on failure, declared outputs,
//! and the error classes' retry, dead-letter, pause and stop decisions.
//!
//! The engine does no Kafka I/O. An attempt is a `'static` future, so that the loop can run
//! attempts of different partitions at the same time; [`Completion`] tells the caller what to
//! write and whether the partition moves on, waits or stops.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::FutureExt as _;
use futures::future::BoxFuture;
use opentelemetry::propagation::Extractor;
use serde::{Deserialize, Serialize};
use tracing::Instrument as _;
use tributary_contracts::codec::{Codec, Location};
use tributary_contracts::headers;
use tributary_telemetry::ServiceMetrics;
use tributary_telemetry::metrics::{DlqLabels, StageLabels, TopicLabels};

use crate::clock::Clock;
use crate::config::RetryConfig;
use crate::dlq::DeadLetter;
use crate::processor::{
    Attempt, Context, GivenUp, Input, Output, ProcessError, Processor, RecordMeta, SWEEP_TIMER, Timer,
};
use crate::retry;
use crate::state::{
    Changes, IDEMPOTENCY_STORE, PartitionState, Staged, StateError, StateView, StoredTimer, TIMER_STORE, decode_value,
    encode_value,
};

/// How long a partition waits before it is offered a record again whose schema registry or
/// downstream answered "unavailable" without saying for how long.
const REGISTRY_RETRY_AFTER: Duration = Duration::from_secs(5);

/// The input topic on which an operator's replay of a dead-lettered timer arrives:
/// `<service>.timer-replays`, partitioned like the event topics, read by the owner of the
/// timer's partition.
pub fn timer_replay_topic(service: &str) -> String {
    format!("{service}.timer-replays")
}

/// One record as read from Kafka (or piped into the test driver).
#[derive(Debug, Clone)]
pub struct Record {
    /// The topic as named on the cluster (with the deployment's prefix).
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Key bytes.
    pub key: Option<Vec<u8>>,
    /// Value bytes.
    pub payload: Option<Vec<u8>>,
    /// Headers in order.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Record {
    /// Headers with a value, as text.
    pub fn header_map(&self) -> BTreeMap<String, String> {
        self.headers
            .iter()
            .filter_map(|(name, value)| Some((name.clone(), String::from_utf8_lossy(value.as_deref()?).into_owned())))
            .collect()
    }

    /// Where it was read.
    pub fn location(&self) -> Location {
        Location::new(&self.topic, self.partition, self.offset)
    }
}

/// One unit of work on a partition.
#[derive(Debug, Clone)]
pub(crate) enum Work {
    /// An input record.
    Record(Arc<Record>),
    /// A timer that came due.
    Timer(Timer),
}

impl Work {
    /// The record, if this is one.
    pub(crate) fn record(&self) -> Option<&Record> {
        match self {
            Self::Record(record) => Some(record),
            Self::Timer(_) => None,
        }
    }
}

/// An output encoded for its topic, with its headers.
#[derive(Debug, Clone)]
pub struct EncodedOutput {
    /// The topic as the contract names it.
    pub topic: &'static str,
    /// The Kafka key.
    pub key: String,
    /// The Confluent-framed value.
    pub payload: Vec<u8>,
    /// CloudEvents, correlation and trace headers.
    pub headers: Vec<(Cow<'static, str>, String)>,
}

/// A dead letter as it is written: the original record's key, value and headers (or the
/// timer's), plus the `dlq_*` headers.
#[derive(Debug, Clone)]
pub struct DeadLetterRecord {
    /// Why, and where from.
    pub letter: DeadLetter,
    /// Key bytes.
    pub key: Option<Vec<u8>>,
    /// Value bytes.
    pub payload: Option<Vec<u8>>,
    /// Headers: the original ones, then the `dlq_*` ones.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

/// A dead-lettered timer, as JSON in the dead letter's value and in its replay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimerLetter {
    /// The timer's key.
    pub timer: String,
    /// When it was due.
    pub due_at: DateTime<Utc>,
    /// Its partition.
    pub partition: i32,
    /// What the processor stored with it.
    pub payload: serde_json::Value,
}

/// What an attempt produced, before the engine decides what it means.
pub(crate) struct Attempted {
    result: Result<Success, Failure>,
    /// How long the attempt took.
    pub(crate) elapsed: Duration,
}

enum Success {
    Processed {
        staged: HashMap<&'static str, Changes>,
        outputs: Vec<EncodedOutput>,
        given_up: Vec<GivenUp>,
        idempotency_key: Option<String>,
        occurred_at: Option<i64>,
    },
    Duplicate,
}

struct Failure {
    stage: &'static str,
    error: ProcessError,
    /// What the processor asked to write if the record is dead-lettered, encoded.
    dead_letter_outputs: Vec<EncodedOutput>,
}

impl Failure {
    fn at(stage: &'static str) -> impl FnOnce(ProcessError) -> Self {
        move |error| Self { stage, error, dead_letter_outputs: Vec::new() }
    }
}

/// What the caller does after an attempt.
#[derive(Debug)]
pub(crate) enum Completion {
    /// Done: write the outputs; a record's offset may be committed.
    Done {
        /// The outputs, in order.
        outputs: Vec<EncodedOutput>,
        /// Dead letters of work the processor gave up on while the attempt succeeded.
        dead_letters: Vec<DeadLetterRecord>,
        /// The input's `occurred_at` (records only), for the end-to-end latency.
        occurred_at: Option<i64>,
    },
    /// The input's idempotency key was already recorded: nothing to write, the offset moves on.
    Duplicate,
    /// Write this dead letter, and the processor's outputs for that case; the offset moves on.
    DeadLetter(Box<DeadLetterRecord>, Vec<EncodedOutput>),
    /// A transient failure: offer the same work again after `after` as attempt `attempt`.
    Retry {
        /// How long to wait.
        after: Duration,
        /// The number of the next attempt.
        attempt: u32,
        /// What failed.
        reason: String,
    },
    /// A downstream is unavailable: offer the same work again after `after`, same attempt.
    Pause {
        /// Which downstream.
        downstream: &'static str,
        /// How long to wait.
        after: Duration,
        /// Why.
        reason: String,
    },
    /// A bug of ours: the partition stops where it is.
    Stop {
        /// The error class.
        class: &'static str,
        /// What went wrong.
        reason: String,
    },
}

/// How the engine waits before a retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backoff {
    /// Full jitter under the exponential ceiling (production: spreads the retries of many
    /// instances that failed together).
    Jittered,
    /// The ceiling itself (the test driver: deterministic).
    Ceiling,
}

/// The shared part of the loop and the driver.
pub(crate) struct Engine<P: Processor> {
    pub(crate) processor: Arc<P>,
    pub(crate) service: &'static str,
    topic_prefix: String,
    /// Shared with every attempt in flight (a clone per record would copy its prefix).
    pub(crate) codec: Arc<Codec>,
    pub(crate) clock: Clock,
    retry: RetryConfig,
    backoff: Backoff,
    pub(crate) metrics: ServiceMetrics,
    declared_outputs: Arc<HashSet<&'static str>>,
    /// Every store: the processor's, then the runtime's own.
    pub(crate) stores: Vec<&'static str>,
    replay_topic: String,
    pub(crate) partitions: BTreeMap<i32, Arc<PartitionState>>,
    /// The committed state of the partitions restored, for queries from outside the loop.
    pub(crate) view: StateView,
    /// When each partition's next sweep is due (clock ms), if the processor sweeps; kept in
    /// memory only: a partition assigned, or an instance started, sweeps at once.
    sweeps: Mutex<HashMap<i32, i64>>,
}

impl<P: Processor> std::fmt::Debug for Engine<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("service", &self.service).finish_non_exhaustive()
    }
}

/// Settings of an [`Engine`].
pub(crate) struct EngineSettings {
    pub(crate) service: &'static str,
    pub(crate) topic_prefix: String,
    pub(crate) retry: RetryConfig,
    pub(crate) backoff: Backoff,
}

impl<P: Processor> Engine<P> {
    pub(crate) fn new(
        processor: P,
        settings: EngineSettings,
        codec: Codec,
        clock: Clock,
        metrics: ServiceMetrics,
    ) -> Self {
        let mut stores = processor.stores();
        stores.extend([IDEMPOTENCY_STORE, TIMER_STORE]);
        let declared_outputs = Arc::new(processor.outputs().into_iter().collect());
        Self {
            processor: Arc::new(processor),
            service: settings.service,
            replay_topic: timer_replay_topic(settings.service),
            topic_prefix: settings.topic_prefix,
            codec: Arc::new(codec),
            clock,
            retry: settings.retry,
            backoff: settings.backoff,
            metrics,
            declared_outputs,
            stores,
            partitions: BTreeMap::new(),
            view: StateView::default(),
            sweeps: Mutex::default(),
        }
    }

    /// The retry policy.
    pub(crate) fn retry_policy(&self) -> &RetryConfig {
        &self.retry
    }

    /// The topics a processor's records arrive on: its inputs and the timer replays.
    pub(crate) fn input_topics(&self) -> Vec<String> {
        let mut topics: Vec<String> = P::Input::topics().iter().map(|t| self.physical(t)).collect();
        topics.push(self.physical(&self.replay_topic));
        topics
    }

    /// `topic` as named on the cluster.
    pub(crate) fn physical(&self, topic: &str) -> String {
        format!("{}{topic}", self.topic_prefix)
    }

    /// `topic` as the contracts name it.
    pub(crate) fn logical<'t>(&self, topic: &'t str) -> &'t str {
        topic.strip_prefix(&self.topic_prefix).unwrap_or(topic)
    }

    /// The state of `partition`, created empty if new.
    pub(crate) fn partition(&mut self, partition: i32) -> Arc<PartitionState> {
        self.partitions.entry(partition).or_insert_with(|| PartitionState::new(partition)).clone()
    }

    /// When `partition`'s next sweep is due, if the processor sweeps (at once for a partition
    /// not swept yet).
    pub(crate) fn sweep_due(&self, partition: i32, now_ms: i64) -> Option<i64> {
        self.processor.sweep_every()?;
        Some(self.sweeps.lock().expect("sweep lock").get(&partition).copied().unwrap_or(now_ms))
    }

    /// Forgets when `partition` was swept (it was revoked): its next owner sweeps it at once.
    pub(crate) fn forget_sweep(&self, partition: i32) {
        self.sweeps.lock().expect("sweep lock").remove(&partition);
    }

    /// The earliest timer of `partition` due at `now_ms`, as work: its sweep first, if due.
    pub(crate) fn due_timer(&self, partition: i32, now_ms: i64) -> Result<Option<Work>, StateError> {
        if let Some(every) = self.processor.sweep_every()
            && self.sweep_due(partition, now_ms).is_some_and(|due| due <= now_ms)
        {
            let every_ms = i64::try_from(every.as_millis()).unwrap_or(i64::MAX).max(1);
            self.sweeps.lock().expect("sweep lock").insert(partition, now_ms.saturating_add(every_ms));
            return Ok(Some(Work::Timer(Timer {
                key: SWEEP_TIMER.to_owned(),
                due_at: DateTime::from_timestamp_millis(now_ms).unwrap_or_default(),
                payload: serde_json::Value::Null,
                partition,
            })));
        }
        let Some(state) = self.partitions.get(&partition) else { return Ok(None) };
        let Some((due_ms, key)) = state.first_due_timer(now_ms) else { return Ok(None) };
        let Some(stored) = state.get::<StoredTimer>(TIMER_STORE, &key)? else { return Ok(None) };
        Ok(Some(Work::Timer(Timer {
            due_at: DateTime::from_timestamp_millis(due_ms).unwrap_or_default(),
            key,
            payload: stored.payload,
            partition,
        })))
    }

    /// One attempt at `work` on `partition`, as a future that borrows nothing.
    pub(crate) fn attempt(
        &self,
        work: &Work,
        partition: &Arc<PartitionState>,
        attempt: Attempt,
    ) -> BoxFuture<'static, Attempted> {
        let processor = self.processor.clone();
        let codec = self.codec.clone();
        let declared = self.declared_outputs.clone();
        let state = partition.clone();
        let now = self.clock.now();
        let started = Instant::now();
        match work {
            Work::Record(record) => {
                let record = record.clone();
                let logical = self.logical(&record.topic).to_owned();
                let replay = logical == self.replay_topic;
                let headers = record.header_map();
                let span = record_span(&record, &logical, &headers);
                async move {
                    let result = if replay {
                        attempt_timer_replay(&state, &record, &headers).await
                    } else {
                        let at = Location::new(logical, record.partition, record.offset);
                        let key = record.key.as_ref().map(|k| String::from_utf8_lossy(k).into_owned());
                        let meta = RecordMeta { location: at, key, headers };
                        let scope = Scope { processor: &*processor, codec: &codec, declared: &declared, now, attempt };
                        attempt_record(scope, state, &record, meta).await
                    };
                    Attempted { result, elapsed: started.elapsed() }
                }
                .instrument(span)
                .boxed()
            }
            Work::Timer(timer) => {
                let timer = timer.clone();
                let span = tracing::info_span!("timer", timer = %timer.key, partition = timer.partition);
                async move {
                    let scope = Scope { processor: &*processor, codec: &codec, declared: &declared, now, attempt };
                    let result = attempt_timer(scope, state, &timer).await;
                    Attempted { result, elapsed: started.elapsed() }
                }
                .instrument(span)
                .boxed()
            }
        }
    }

    /// What an attempt means: applies a success to the partition's state, and decides retry,
    /// dead letter, pause or stop for a failure (and counts it).
    pub(crate) fn finish(
        &self,
        partition: &PartitionState,
        work: &Work,
        attempted: Attempted,
        attempt: u32,
        first_failure_at: DateTime<Utc>,
    ) -> Completion {
        let failure = match attempted.result {
            Ok(Success::Duplicate) => {
                if let Some(record) = work.record() {
                    self.metrics.duplicates_skipped.get_or_create(&TopicLabels { topic: record.topic.clone() }).inc();
                }
                return Completion::Duplicate;
            }
            Ok(Success::Processed { staged, outputs, given_up, idempotency_key, occurred_at }) => {
                partition.accept(staged);
                let dead_letters = given_up.into_iter().map(|work| self.given_up_letter(partition, work)).collect();
                if let Some(key) = idempotency_key {
                    match encode_value(IDEMPOTENCY_STORE, &key, &self.clock.now_ms()) {
                        Ok(seen) => partition.write(IDEMPOTENCY_STORE, key, Some(seen)),
                        Err(error) => return Completion::Stop { class: "state", reason: error.to_string() },
                    }
                }
                return Completion::Done { outputs, dead_letters, occurred_at };
            }
            Err(failure) => failure,
        };
        let Failure { stage, error, dead_letter_outputs } = failure;
        self.metrics.error(error.class(), stage);
        match error {
            ProcessError::Permanent { class, message } => self.dead_letter(
                partition,
                work,
                class.to_owned(),
                message,
                attempt,
                first_failure_at,
                dead_letter_outputs,
            ),
            ProcessError::Retryable { class, message } if attempt >= self.retry.max_attempts => self.dead_letter(
                partition,
                work,
                format!("{class}.retries_exhausted"),
                message,
                attempt,
                first_failure_at,
                dead_letter_outputs,
            ),
            ProcessError::Retryable { class, message } => {
                self.metrics.retries.get_or_create(&StageLabels { stage: stage.to_owned() }).inc();
                let after = match self.backoff {
                    Backoff::Jittered => retry::backoff(&self.retry, attempt),
                    Backoff::Ceiling => retry::ceiling(&self.retry, attempt),
                };
                Completion::Retry { after, attempt: attempt + 1, reason: format!("{class}: {message}") }
            }
            ProcessError::Unavailable { downstream, retry_after, message } => {
                Completion::Pause { downstream, after: retry_after, reason: message }
            }
            ProcessError::Internal { class, message } => Completion::Stop { class, reason: message },
        }
    }

    /// Forgets the idempotency keys recorded longer than `window` ago on the clock, in the open
    /// transaction; returns whether any was forgotten. A pass over every key: a disk-backed store
    /// with keys ordered by time would make it a range delete (DESIGN.md, "State and time").
    pub(crate) fn expire_idempotency_keys(&self, window: Duration) -> bool {
        let window = i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
        let horizon = self.clock.now_ms().saturating_sub(window);
        let mut expired_any = false;
        for state in self.partitions.values() {
            let expired: Vec<String> = state
                .scan_raw(IDEMPOTENCY_STORE, "")
                .into_iter()
                .filter(|(key, seen)| {
                    decode_value::<i64>(IDEMPOTENCY_STORE, key, seen).is_ok_and(|seen| seen < horizon)
                })
                .map(|(key, _)| key)
                .collect();
            tracing::debug!(partition = state.partition(), expired = expired.len(), "idempotency keys expired");
            for key in expired {
                state.write(IDEMPOTENCY_STORE, key, None);
                expired_any = true;
            }
        }
        expired_any
    }

    /// Counts and reports a partition stopped by a bug of ours (the caller stops it).
    pub(crate) fn partition_stopped(&self, partition: i32, class: &str, reason: &str) {
        self.metrics.partitions_stopped.inc();
        tracing::error!(
            partition,
            class,
            reason,
            "partition stopped: an internal error, not the input's fault; fix and restart the service"
        );
    }

    /// The dead letter of `work`; a dead-lettered timer is cancelled in the same transaction.
    #[allow(clippy::too_many_arguments)]
    fn dead_letter(
        &self,
        partition: &PartitionState,
        work: &Work,
        class: String,
        message: String,
        attempts: u32,
        first_failure_at: DateTime<Utc>,
        outputs: Vec<EncodedOutput>,
    ) -> Completion {
        let (source, key, payload, record_headers) = match work {
            Work::Record(record) => {
                (record.location(), record.key.clone(), record.payload.clone(), record.headers.clone())
            }
            Work::Timer(timer) => {
                partition.write(TIMER_STORE, timer.key.clone(), None);
                let letter = TimerLetter {
                    timer: timer.key.clone(),
                    due_at: timer.due_at,
                    partition: timer.partition,
                    payload: timer.payload.clone(),
                };
                self.timer_letter_parts(letter)
            }
        };
        let letter =
            DeadLetter { service: self.service.to_owned(), class, message, source, attempts, first_failure_at };
        Completion::DeadLetter(Box::new(self.letter_record(letter, key, payload, record_headers)), outputs)
    }

    /// The dead letter of work a processor gave up on (as a timer of `partition`, due at once
    /// when replayed).
    fn given_up_letter(&self, partition: &PartitionState, work: GivenUp) -> DeadLetterRecord {
        let GivenUp { timer, payload, class, message, attempts, first_failure_at } = work;
        let letter = TimerLetter { timer, due_at: first_failure_at, partition: partition.partition(), payload };
        let (source, key, payload, record_headers) = self.timer_letter_parts(letter);
        let letter =
            DeadLetter { service: self.service.to_owned(), class, message, source, attempts, first_failure_at };
        self.letter_record(letter, key, payload, record_headers)
    }

    /// Source, key, value and headers of the dead letter of a timer.
    #[allow(clippy::type_complexity)]
    fn timer_letter_parts(
        &self,
        letter: TimerLetter,
    ) -> (Location, Option<Vec<u8>>, Option<Vec<u8>>, Vec<(String, Option<Vec<u8>>)>) {
        let value = serde_json::to_vec(&letter).unwrap_or_default();
        let source = Location::new(self.physical(&self.replay_topic), letter.partition, -1);
        let timer_header = (headers::DLQ_TIMER_KEY.to_owned(), Some(letter.timer.clone().into_bytes()));
        (source, Some(letter.timer.into_bytes()), Some(value), vec![timer_header])
    }

    /// The dead letter record: the original key, value and headers plus the `dlq_*` headers;
    /// counted and logged.
    fn letter_record(
        &self,
        letter: DeadLetter,
        key: Option<Vec<u8>>,
        payload: Option<Vec<u8>>,
        mut record_headers: Vec<(String, Option<Vec<u8>>)>,
    ) -> DeadLetterRecord {
        record_headers
            .extend(letter.headers().into_iter().map(|(name, value)| (name.to_owned(), Some(value.into_bytes()))));
        self.metrics
            .dlq_writes
            .get_or_create(&DlqLabels { source_topic: letter.source.topic.clone(), class: letter.class.clone() })
            .inc();
        tracing::warn!(class = letter.class, error = letter.message, source = %letter.source, "dead-lettered");
        DeadLetterRecord { letter, key, payload, headers: record_headers }
    }
}

fn record_span(record: &Record, logical: &str, header_map: &BTreeMap<String, String>) -> tracing::Span {
    let span = tracing::info_span!(
        "record",
        topic = %logical,
        partition = record.partition,
        offset = record.offset,
        correlation_id = header_map.get(headers::CORRELATION_ID).map(String::as_str).unwrap_or_default(),
    );
    tributary_telemetry::trace::continue_trace(&span, &HeaderExtractor(header_map));
    span
}

/// What every attempt runs with.
struct Scope<'a, P> {
    processor: &'a P,
    codec: &'a Codec,
    declared: &'a HashSet<&'static str>,
    now: DateTime<Utc>,
    attempt: Attempt,
}

async fn attempt_record<P: Processor>(
    scope: Scope<'_, P>,
    state: Arc<PartitionState>,
    record: &Record,
    meta: RecordMeta,
) -> Result<Success, Failure> {
    let Scope { processor, codec, declared, now, attempt } = scope;
    let Some(payload) = &record.payload else {
        return Err(Failure::at("decode")(ProcessError::permanent("tombstone", "a null value on an event topic")));
    };
    let input = P::Input::decode(codec, &meta.location, payload).await.map_err(|error| {
        let error = if error.is_transient() {
            // The registry is a downstream like any other: while it is away the partition
            // waits, and nothing valid is dead-lettered.
            ProcessError::Unavailable {
                downstream: "schema-registry",
                retry_after: REGISTRY_RETRY_AFTER,
                message: error.to_string(),
            }
        } else {
            ProcessError::permanent(error.class(), error.to_string())
        };
        Failure::at("decode")(error)
    })?;
    let correlation_id = input.envelope().correlation_id.as_str();
    if meta.headers.get(headers::CORRELATION_ID).is_none_or(|header| header != correlation_id) {
        // The span took the header's value; the envelope is the authority.
        tracing::Span::current().record("correlation_id", correlation_id);
    }
    let idempotency_key = processor.idempotency_key(&input);
    if let Some(key) = &idempotency_key
        && state.contains(IDEMPOTENCY_STORE, key)
    {
        tracing::debug!(idempotency_key = %key, "duplicate skipped");
        return Ok(Success::Duplicate);
    }
    let partition = state.partition();
    let mut staged = Staged::new(state);
    let mut context = Context::new(now, partition, Some(&meta), &mut staged, attempt);
    let outcome = processor.process(&mut context, &input).await;
    let outputs = std::mem::take(&mut context.outputs);
    let if_dead_lettered = std::mem::take(&mut context.dead_letter_outputs);
    let given_up = std::mem::take(&mut context.given_up);
    if let Err(error) = outcome {
        return Err(failed("process", error, codec, declared, if_dead_lettered).await);
    }
    let outputs = encode_outputs(codec, declared, outputs).await?;
    Ok(Success::Processed {
        staged: staged.into_changes(),
        outputs,
        given_up,
        idempotency_key,
        occurred_at: Some(input.envelope().occurred_at),
    })
}

async fn attempt_timer<P: Processor>(
    scope: Scope<'_, P>,
    state: Arc<PartitionState>,
    timer: &Timer,
) -> Result<Success, Failure> {
    let Scope { processor, codec, declared, now, attempt } = scope;
    let mut staged = Staged::new(state);
    let mut context = Context::new(now, timer.partition, None, &mut staged, attempt);
    let outcome = processor.on_timer(&mut context, timer).await;
    let outputs = std::mem::take(&mut context.outputs);
    let if_dead_lettered = std::mem::take(&mut context.dead_letter_outputs);
    let given_up = std::mem::take(&mut context.given_up);
    if let Err(error) = outcome {
        return Err(failed("timer", error, codec, declared, if_dead_lettered).await);
    }
    // A timer fires once: unless its handler scheduled it again (for any time, its own due
    // time included: more work is due at once), it is gone.
    let scheduled_again = staged.touched_timer(&timer.key)
        && staged.scheduled(&timer.key).map_err(|e| Failure::at("timer")(e.into()))?.is_some();
    if !scheduled_again && timer.key != SWEEP_TIMER {
        staged.cancel(&timer.key);
    }
    let outputs = encode_outputs(codec, declared, outputs).await?;
    Ok(Success::Processed {
        staged: staged.into_changes(),
        outputs,
        given_up,
        idempotency_key: None,
        occurred_at: None,
    })
}

/// A timer an operator replayed from the DLQ: scheduled again at its own due time (so it fires
/// at once), once per replayed dead letter.
async fn attempt_timer_replay(
    state: &Arc<PartitionState>,
    record: &Record,
    header_map: &BTreeMap<String, String>,
) -> Result<Success, Failure> {
    let invalid = |reason: String| Failure::at("decode")(ProcessError::permanent("timer_replay", reason));
    let letter: TimerLetter = serde_json::from_slice(record.payload.as_deref().unwrap_or_default())
        .map_err(|e| invalid(format!("not a dead-lettered timer: {e}")))?;
    if letter.partition != record.partition {
        return Err(invalid(format!(
            "timer of partition {} replayed to partition {}",
            letter.partition, record.partition
        )));
    }
    let origin = header_map.get(headers::REPLAYED_FROM).cloned().unwrap_or_else(|| record.location().to_string());
    let idempotency_key = format!("timer-replay/{origin}");
    if state.contains(IDEMPOTENCY_STORE, &idempotency_key) {
        return Ok(Success::Duplicate);
    }
    let mut staged = Staged::new(state.clone());
    staged.schedule(&letter.timer, letter.due_at, letter.payload).map_err(|e| Failure::at("timer")(e.into()))?;
    tracing::info!(timer = letter.timer, origin, "dead-lettered timer replayed");
    Ok(Success::Processed {
        staged: staged.into_changes(),
        outputs: Vec::new(),
        given_up: Vec::new(),
        idempotency_key: Some(idempotency_key),
        occurred_at: None,
    })
}

/// The failure of a processor's attempt, with the outputs it asked for in case the record is
/// dead-lettered (encoded now; outputs that do not encode are left out and logged, so that the
/// dead letter itself is never lost to them).
async fn failed(
    stage: &'static str,
    error: ProcessError,
    codec: &Codec,
    declared: &HashSet<&'static str>,
    if_dead_lettered: Vec<Output>,
) -> Failure {
    let mut failure = Failure::at(stage)(error);
    if !if_dead_lettered.is_empty() {
        match encode_outputs(codec, declared, if_dead_lettered).await {
            Ok(outputs) => failure.dead_letter_outputs = outputs,
            Err(unencodable) => {
                tracing::error!(error = %unencodable.error, "an output for the dead-letter case did not encode")
            }
        }
    }
    failure
}

/// Encodes `outputs`, each with its CloudEvents, correlation and trace headers; an output to a
/// topic the processor did not declare is a bug of ours.
async fn encode_outputs(
    codec: &Codec,
    declared: &HashSet<&'static str>,
    outputs: Vec<Output>,
) -> Result<Vec<EncodedOutput>, Failure> {
    let trace = tributary_telemetry::trace::trace_headers(&tracing::Span::current());
    let mut encoded = Vec::with_capacity(outputs.len());
    for output in outputs {
        if !declared.contains(output.topic) {
            return Err(Failure::at("produce")(ProcessError::internal(
                "undeclared_output",
                format!("an output to {} which the processor's outputs() does not declare", output.topic),
            )));
        }
        let payload = output.value.encode(codec).await.map_err(|error| {
            let error = if error.is_transient() {
                ProcessError::Unavailable {
                    downstream: "schema-registry",
                    retry_after: REGISTRY_RETRY_AFTER,
                    message: error.to_string(),
                }
            } else {
                ProcessError::permanent("encode", error.to_string())
            };
            Failure::at("produce")(error)
        })?;
        let mut headers: Vec<(Cow<'static, str>, String)> = output
            .value
            .envelope()
            .cloudevents_headers(output.value.ce_type())
            .into_iter()
            .map(|(name, value)| (Cow::Borrowed(name), value))
            .collect();
        headers.extend(trace.iter().map(|(name, value)| (Cow::Owned(name.clone()), value.clone())));
        encoded.push(EncodedOutput { topic: output.topic, key: output.key, payload, headers });
    }
    Ok(encoded)
}

struct HeaderExtractor<'a>(&'a BTreeMap<String, String>);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}
