//! The processor test driver: a processor run without a broker or a registry, with the
//! semantics of the real loop. Kafka Streams' `TopologyTestDriver` is the model.
//!
//! ```ignore
//! let mut driver = TestDriver::new(UsageProcessor::new(...));
//! driver.pipe(event).await;                        // encoded and decoded as on the wire
//! driver.advance(Duration::from_secs(3600)).await; // timers due meanwhile fire, in due order
//! let totals: Vec<UsageRecorded> = driver.read().await;
//! let letters = driver.dead_letters();             // with the headers the loop writes
//! ```
//!
//! What is the same as in production, because it is the same code ([`crate::engine`]): the Avro
//! round trip of inputs and outputs (through an in-memory schema registry), idempotency keys,
//! staged state dropped on failure, declared outputs, the retry / dead-letter / pause / stop
//! decision of each error class, the dead letters' headers, timers and their due-time order,
//! versioned state. What the driver simplifies: each input is its own transaction (committed at
//! once), partitions are run one after the other, and a retry's backoff is its ceiling (no
//! jitter), measured on the driver's clock: a record waiting for a retry or a paused downstream
//! is attempted again when [`advance`](TestDriver::advance) passes its time; the partition's
//! later records wait behind it, as they do in Kafka.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use prometheus_client::registry::Registry;
use tributary_contracts::codec::{Codec, InMemoryResolver, Location};
use tributary_contracts::{Contract, topics};
use tributary_telemetry::ServiceMetrics;

use crate::clock::Clock;
use crate::config::RetryConfig;
use crate::engine::{Backoff, Completion, DeadLetterRecord, EncodedOutput, Engine, EngineSettings, Record, Work};
use crate::kafka::partition_of;
use crate::processor::{Attempt, EncodeOutput, Processor};
use crate::state::{PartitionState, StateView, Store, StoredValue};

/// Where the driver's clock starts unless told otherwise: a fixed time, so that tests repeat.
pub const DEFAULT_START: &str = "2026-01-01T00:00:00Z";

/// What became of one piped input (or of the work that ran when the clock moved).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Processed: its outputs and state changes are committed.
    Processed,
    /// Its idempotency key was already recorded: skipped.
    Duplicate,
    /// Dead-lettered with this class.
    DeadLettered(String),
    /// A transient failure: it will be attempted again (attempt number given) once the clock
    /// passes its backoff.
    Retrying(u32),
    /// Its downstream is unavailable: attempted again once the clock passes the pause.
    Paused(String),
    /// A bug of ours stopped its partition, with this class.
    Stopped(String),
    /// Its partition is busy (a record before it waits): it waits behind.
    Queued,
}

/// A record to pipe in: a contract value, or raw bytes, with its key, headers and partition.
#[derive(Debug)]
pub struct TestRecord {
    topic: String,
    key: Option<Vec<u8>>,
    value: TestValue,
    headers: Vec<(String, Option<Vec<u8>>)>,
    partition: Option<i32>,
}

#[derive(Debug)]
enum TestValue {
    Contract(Box<dyn EncodeOutput>),
    Bytes(Option<Vec<u8>>),
}

impl TestRecord {
    /// `value` on its contract's topic, keyed by its account id (as event topics are).
    pub fn value<T: Contract + 'static>(value: T) -> Self {
        let key = value.envelope().account_id.clone().into_bytes();
        Self {
            topic: T::TOPIC.to_owned(),
            key: Some(key),
            value: TestValue::Contract(Box::new(value)),
            headers: Vec::new(),
            partition: None,
        }
    }

    /// Raw bytes (`None`: a tombstone) on `topic`, as a misbehaving producer would write them.
    pub fn bytes(topic: &str, key: Option<&str>, payload: Option<Vec<u8>>) -> Self {
        Self {
            topic: topic.to_owned(),
            key: key.map(|k| k.as_bytes().to_vec()),
            value: TestValue::Bytes(payload),
            headers: Vec::new(),
            partition: None,
        }
    }

    /// Another key.
    pub fn key(mut self, key: &str) -> Self {
        self.key = Some(key.as_bytes().to_vec());
        self
    }

    /// A header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), Some(value.as_bytes().to_vec())));
        self
    }

    /// A partition of its own choosing, instead of the key's.
    pub fn partition(mut self, partition: i32) -> Self {
        self.partition = Some(partition);
        self
    }
}

/// An output the processor emitted, decoded.
#[derive(Debug, Clone)]
pub struct OutputRecord<T> {
    /// The Kafka key.
    pub key: String,
    /// Its headers.
    pub headers: BTreeMap<String, String>,
    /// The value.
    pub value: T,
}

#[derive(Debug)]
enum Slot {
    Idle,
    Waiting { work: Work, attempt: u32, first_at: DateTime<Utc>, until: DateTime<Utc> },
    Stopped,
}

/// Builds a [`TestDriver`].
#[derive(Debug, Clone)]
pub struct DriverBuilder {
    service: &'static str,
    partitions: i32,
    start: DateTime<Utc>,
    retry: RetryConfig,
    idempotency_window: Duration,
}

impl Default for DriverBuilder {
    fn default() -> Self {
        Self {
            service: "test-service",
            partitions: 3,
            start: DateTime::parse_from_rfc3339(DEFAULT_START).expect("a valid time").to_utc(),
            retry: RetryConfig::default(),
            idempotency_window: crate::config::RuntimeConfig::default().idempotency_window,
        }
    }
}

impl DriverBuilder {
    /// The defaults: 3 partitions, the clock at [`DEFAULT_START`], the runtime's retry policy
    /// and idempotency window.
    pub fn new() -> Self {
        Self::default()
    }

    /// The service name (the DLQ headers name it).
    pub fn service(mut self, service: &'static str) -> Self {
        self.service = service;
        self
    }

    /// Partitions of every input topic (3 by default).
    pub fn partitions(mut self, partitions: i32) -> Self {
        self.partitions = partitions.max(1);
        self
    }

    /// Where the clock starts ([`DEFAULT_START`] by default).
    pub fn start_at(mut self, start: DateTime<Utc>) -> Self {
        self.start = start;
        self
    }

    /// The retry policy (the runtime's default otherwise).
    pub fn retry(mut self, retry: RetryConfig) -> Self {
        self.retry = retry;
        self
    }

    /// How long idempotency keys are kept.
    pub fn idempotency_window(mut self, window: Duration) -> Self {
        self.idempotency_window = window;
        self
    }

    /// The clock the driver will run on, for processors that need it when they are built.
    pub fn clock(&self) -> Clock {
        Clock::manual(self.start)
    }

    /// The driver, running `processor`.
    pub fn build<P: Processor>(self, processor: P) -> TestDriver<P> {
        let clock = self.clock();
        self.build_on(processor, clock)
    }

    /// The driver, running `processor` on `clock` (from [`clock`](Self::clock), or a manual
    /// clock of the test's own).
    pub fn build_on<P: Processor>(self, processor: P, clock: Clock) -> TestDriver<P> {
        let mut registry = Registry::default();
        let metrics = ServiceMetrics::register(&mut registry, self.service);
        let settings = EngineSettings {
            service: self.service,
            topic_prefix: String::new(),
            retry: self.retry,
            backoff: Backoff::Ceiling,
        };
        let codec = in_memory_codec();
        let mut engine = Engine::new(processor, settings, codec.clone(), clock, metrics);
        if engine.processor.sweep_every().is_some() {
            // Every partition is swept, whether a record ever reaches it or not.
            for partition in 0..self.partitions {
                let state = engine.partition(partition);
                engine.view.insert(state);
            }
        }
        TestDriver {
            engine,
            codec,
            registry,
            partitions: self.partitions,
            idempotency_window: self.idempotency_window,
            offsets: HashMap::new(),
            queues: BTreeMap::new(),
            slots: BTreeMap::new(),
            outputs: VecDeque::new(),
            dead_letters: Vec::new(),
        }
    }
}

/// A codec over an in-memory registry holding every contract's schema.
fn in_memory_codec() -> Codec {
    let resolver = InMemoryResolver::new();
    for spec in topics::ALL {
        resolver.register(&spec.subject(), spec.schema).expect("every contract schema parses");
    }
    Codec::new(Arc::new(resolver))
}

/// A processor under test. See the module documentation.
pub struct TestDriver<P: Processor> {
    engine: Engine<P>,
    codec: Codec,
    registry: Registry,
    partitions: i32,
    idempotency_window: Duration,
    offsets: HashMap<(String, i32), i64>,
    queues: BTreeMap<i32, VecDeque<Work>>,
    slots: BTreeMap<i32, Slot>,
    outputs: VecDeque<EncodedOutput>,
    dead_letters: Vec<DeadLetterRecord>,
}

impl<P: Processor> std::fmt::Debug for TestDriver<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestDriver").field("service", &self.engine.service).finish_non_exhaustive()
    }
}

impl<P: Processor> TestDriver<P> {
    /// A driver with the defaults of [`DriverBuilder`].
    pub fn new(processor: P) -> Self {
        DriverBuilder::default().build(processor)
    }

    /// The processor.
    pub fn processor(&self) -> &P {
        &self.engine.processor
    }

    /// The driver's clock.
    pub fn clock(&self) -> &Clock {
        &self.engine.clock
    }

    /// Now, on the driver's clock.
    pub fn now(&self) -> DateTime<Utc> {
        self.engine.clock.now()
    }

    /// The partition a key lands on, as the Java client's partitioner puts it.
    pub fn partition_of(&self, key: &str) -> i32 {
        partition_of(key.as_bytes(), self.partitions)
    }

    /// Pipes `value` into its contract's topic, keyed by its account id.
    pub async fn pipe<T: Contract + 'static>(&mut self, value: T) -> Outcome {
        self.pipe_record(TestRecord::value(value)).await
    }

    /// Pipes `record` in and runs its partition until it is processed or waits.
    pub async fn pipe_record(&mut self, record: TestRecord) -> Outcome {
        let payload = match record.value {
            TestValue::Bytes(bytes) => bytes,
            TestValue::Contract(value) => Some(value.encode(&self.codec).await.expect("a test value fits its schema")),
        };
        let partition = record
            .partition
            .unwrap_or_else(|| partition_of(record.key.as_deref().unwrap_or_default(), self.partitions));
        let offset = self.offsets.entry((record.topic.clone(), partition)).or_default();
        let piped = Record {
            topic: record.topic,
            partition,
            offset: *offset,
            key: record.key,
            payload,
            headers: record.headers,
        };
        *offset += 1;
        let at = piped.location();
        self.queues.entry(partition).or_default().push_back(Work::Record(Arc::new(piped)));
        let outcomes = self.run_partition(partition).await;
        outcomes.into_iter().find(|(location, _)| location.as_ref() == Some(&at)).map_or(Outcome::Queued, |(_, o)| o)
    }

    /// Moves the clock forward by `by`, then fires the timers that came due, in due order, and
    /// attempts again what waited for a retry or a paused downstream. Returns what ran.
    pub async fn advance(&mut self, by: Duration) -> Vec<Outcome> {
        self.engine.clock.advance(by).expect("a manual clock moves forward");
        self.run_due().await
    }

    /// Moves the clock to `to` (not before now), like [`advance`](Self::advance).
    pub async fn advance_to(&mut self, to: DateTime<Utc>) -> Vec<Outcome> {
        self.engine.clock.set(to).expect("the driver's clock moves forward only");
        self.run_due().await
    }

    /// Drains the outputs of `T`'s topic, decoded, in the order they were emitted.
    pub async fn read<T: Contract>(&mut self) -> Vec<T> {
        self.read_records::<T>().await.into_iter().map(|record| record.value).collect()
    }

    /// Drains the outputs of `T`'s topic with their keys and headers.
    pub async fn read_records<T: Contract>(&mut self) -> Vec<OutputRecord<T>> {
        let (mine, others): (Vec<EncodedOutput>, Vec<EncodedOutput>) =
            std::mem::take(&mut self.outputs).into_iter().partition(|output| output.topic == T::TOPIC);
        self.outputs = others.into();
        let mut records = Vec::with_capacity(mine.len());
        for (index, output) in mine.into_iter().enumerate() {
            let at = Location::new(T::TOPIC, 0, index as i64);
            let value =
                self.codec.decode::<T>(&at, &output.payload).await.expect("an output decodes as its topic's contract");
            let headers = output.headers.into_iter().map(|(name, value)| (name.into_owned(), value)).collect();
            records.push(OutputRecord { key: output.key, headers, value });
        }
        records
    }

    /// Every output not read yet, encoded, in order.
    pub fn pending_outputs(&self) -> impl Iterator<Item = &EncodedOutput> {
        self.outputs.iter()
    }

    /// Drains the dead letters written so far.
    pub fn dead_letters(&mut self) -> Vec<DeadLetterRecord> {
        std::mem::take(&mut self.dead_letters)
    }

    /// The committed value of `key` in `store`, on whichever partition holds it.
    pub fn get<V: StoredValue>(&self, store: Store<V>, key: &str) -> Option<V> {
        self.engine.partitions.values().find_map(|state| state.read(store, key).expect("stored state reads back"))
    }

    /// The committed state as a query from outside the loop sees it (what the service's
    /// [`StreamRuntime::state_view`](crate::StreamRuntime::state_view) gives).
    pub fn state_view(&self) -> StateView {
        self.engine.view.clone()
    }

    /// The state of `partition`, committed and pending.
    pub fn state(&self, partition: i32) -> Option<&PartitionState> {
        self.engine.partitions.get(&partition).map(|state| &**state)
    }

    /// Every scheduled timer: partition, key, due time, in due order per partition.
    pub fn timers(&self) -> Vec<(i32, String, DateTime<Utc>)> {
        self.engine
            .partitions
            .iter()
            .flat_map(|(partition, state)| state.timers().into_iter().map(move |(key, due)| (*partition, key, due)))
            .collect()
    }

    /// The service's metrics, in the Prometheus text format.
    pub fn metrics(&self) -> String {
        tributary_telemetry::metrics::encode(&self.registry)
    }

    /// The same state, clock, queued records and outputs under another processor (or a new
    /// build of this one): what a restart of the service does. What was not committed
    /// (records waiting for a retry, queued behind one) is read again, in order.
    pub fn restart_with<Q: Processor>(self, processor: Q) -> TestDriver<Q> {
        let Self {
            engine,
            codec,
            partitions,
            idempotency_window,
            offsets,
            mut queues,
            slots,
            outputs,
            dead_letters,
            ..
        } = self;
        for (partition, slot) in slots {
            if let Slot::Waiting { work: Work::Record(record), .. } = slot {
                queues.entry(partition).or_default().push_front(Work::Record(record));
            }
        }
        let mut registry = Registry::default();
        let metrics = ServiceMetrics::register(&mut registry, engine.service);
        let settings = EngineSettings {
            service: engine.service,
            topic_prefix: String::new(),
            retry: engine_retry(&engine),
            backoff: Backoff::Ceiling,
        };
        let mut restarted = Engine::new(processor, settings, codec.clone(), engine.clock.clone(), metrics);
        restarted.partitions = engine.partitions;
        restarted.view = engine.view;
        TestDriver {
            engine: restarted,
            codec,
            registry,
            partitions,
            idempotency_window,
            offsets,
            queues,
            slots: BTreeMap::new(),
            outputs,
            dead_letters,
        }
    }

    /// Runs `partition` while it is idle: its queued records, each followed by its due timers
    /// (as the loop does); returns each record's outcome by location.
    async fn run_partition(&mut self, partition: i32) -> Vec<(Option<Location>, Outcome)> {
        let mut outcomes = Vec::new();
        loop {
            if !matches!(self.slots.get(&partition), None | Some(Slot::Idle)) {
                break;
            }
            outcomes.extend(self.fire_timers(partition).await);
            if !matches!(self.slots.get(&partition), None | Some(Slot::Idle)) {
                break;
            }
            let Some(work) = self.queues.get_mut(&partition).and_then(VecDeque::pop_front) else { break };
            let at = work.record().map(Record::location);
            let outcome = self.attempt(partition, work, 1, None).await;
            outcomes.push((at, outcome));
        }
        outcomes
    }

    /// Fires `partition`'s due timers while it is idle.
    async fn fire_timers(&mut self, partition: i32) -> Vec<(Option<Location>, Outcome)> {
        let mut outcomes = Vec::new();
        while matches!(self.slots.get(&partition), None | Some(Slot::Idle)) {
            let due = self.engine.due_timer(partition, self.engine.clock.now_ms()).expect("stored timers read back");
            let Some(timer) = due else { break };
            outcomes.push((None, self.attempt(partition, timer, 1, None).await));
        }
        outcomes
    }

    /// Everything that is due, in time order: waits that ended, the earliest due timer of the
    /// idle partitions, records queued behind a wait that ended.
    async fn run_due(&mut self) -> Vec<Outcome> {
        let mut ran = Vec::new();
        self.expire_idempotency_keys();
        loop {
            let now = self.engine.clock.now();
            let ended = self
                .slots
                .iter()
                .filter_map(|(partition, slot)| match slot {
                    Slot::Waiting { until, .. } if *until <= now => Some((*until, *partition)),
                    _ => None,
                })
                .min();
            let idle = |p: &i32| matches!(self.slots.get(p), None | Some(Slot::Idle));
            let timer = self
                .engine
                .partitions
                .iter()
                .filter(|(partition, _)| idle(partition))
                .filter_map(|(partition, state)| {
                    let now_ms = now.timestamp_millis();
                    let timer = state.first_due_timer(now_ms).map(|(due, _)| due);
                    let sweep = self.engine.sweep_due(*partition, now_ms).filter(|due| *due <= now_ms);
                    timer.into_iter().chain(sweep).min().map(|due| (due, *partition))
                })
                .min();
            match (ended, timer) {
                (Some((until, partition)), timer) if timer.is_none_or(|(due, _)| until.timestamp_millis() <= due) => {
                    let Some(Slot::Waiting { work, attempt, first_at, .. }) = self.slots.insert(partition, Slot::Idle)
                    else {
                        unreachable!("found waiting above")
                    };
                    ran.push(self.attempt(partition, work, attempt, Some(first_at)).await);
                    ran.extend(self.run_partition(partition).await.into_iter().map(|(_, outcome)| outcome));
                }
                (_, Some((_, partition))) => {
                    let work =
                        self.engine.due_timer(partition, now.timestamp_millis()).expect("stored timers read back");
                    let Some(work) = work else { continue };
                    ran.push(self.attempt(partition, work, 1, None).await);
                    ran.extend(self.run_partition(partition).await.into_iter().map(|(_, outcome)| outcome));
                }
                (None, None) => break,
                (Some(_), None) => unreachable!("the first arm takes a wait when no timer is due"),
            }
        }
        ran
    }

    /// One attempt, and what its outcome means, committed at once.
    async fn attempt(&mut self, partition: i32, work: Work, attempt: u32, first_at: Option<DateTime<Utc>>) -> Outcome {
        let state = self.engine.partition(partition);
        self.engine.view.insert(state.clone());
        let first_at = first_at.unwrap_or_else(|| self.engine.clock.now());
        let attempted = self.engine.attempt(&work, &state, Attempt { number: attempt, first_at }).await;
        let completion = self.engine.finish(&state, &work, attempted, attempt, first_at);
        state.commit();
        let now = self.engine.clock.now();
        let to_duration = |after: Duration| chrono::Duration::from_std(after).unwrap_or(chrono::Duration::MAX);
        match completion {
            Completion::Done { outputs, dead_letters, .. } => {
                self.dead_letters.extend(dead_letters);
                self.outputs.extend(outputs);
                Outcome::Processed
            }
            Completion::Duplicate => Outcome::Duplicate,
            Completion::DeadLetter(letter, outputs) => {
                let class = letter.letter.class.clone();
                self.dead_letters.push(*letter);
                self.outputs.extend(outputs);
                Outcome::DeadLettered(class)
            }
            Completion::Retry { after, attempt, .. } => {
                let until = now + to_duration(after);
                self.slots.insert(partition, Slot::Waiting { work, attempt, first_at, until });
                Outcome::Retrying(attempt)
            }
            Completion::Pause { downstream, after, .. } => {
                let until = now + to_duration(after);
                self.slots.insert(partition, Slot::Waiting { work, attempt, first_at, until });
                Outcome::Paused(downstream.to_owned())
            }
            Completion::Stop { class, reason } => {
                self.engine.partition_stopped(partition, class, &reason);
                self.slots.insert(partition, Slot::Stopped);
                Outcome::Stopped(class.to_owned())
            }
        }
    }

    /// Forgets idempotency keys older than the window, as the loop's sweep does.
    fn expire_idempotency_keys(&mut self) {
        self.engine.expire_idempotency_keys(self.idempotency_window);
        for state in self.engine.partitions.values() {
            state.commit();
        }
    }
}

fn engine_retry<P: Processor>(engine: &Engine<P>) -> RetryConfig {
    engine.retry_policy().clone()
}
