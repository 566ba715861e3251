//! The exactly-once loop: consume `read_committed`, process, and commit outputs, changelog
//! records and input offsets in one Kafka transaction (DESIGN.md, "Processing guarantees").
//!
//! One consumer in the service's group and one transactional producer per instance. Records
//! are processed one at a time; a transaction spans many records and is committed every
//! `commit_interval` (or `max_batch_records`), on shutdown, and never left open across a
//! rebalance: when partitions are revoked, the open transaction is aborted inside the rebalance
//! callback, its state changes dropped, and the partitions' new owner (possibly this instance
//! again) resumes from the committed offsets. On assignment, state is restored from the
//! changelogs before the first record is processed; readiness stays false until then.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use opentelemetry::propagation::{Extractor, Injector};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{ClientContext, Offset, Statistics, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tributary_contracts::codec::{Codec, Location};
use tributary_contracts::headers;
use tributary_contracts::topics::dlq_topic;
use tributary_telemetry::metrics::{DlqLabels, OutcomeLabels, PartitionLabels, StageLabels, TopicLabels};
use tributary_telemetry::{Health, ServiceMetrics};

use crate::config::{KafkaConfig, RuntimeConfig};
use crate::dlq::DeadLetter;
use crate::kafka::{TopicKind, client_config, ensure_topics, read_to_end};
use crate::processor::{Context, Input, Output, ProcessError, Processor, RecordMeta, Timer};
use crate::retry;
use crate::state::{IDEMPOTENCY_STORE, StoredTimer, TIMER_STORE, TxnState, changelog_topic};

/// How long transactional calls may take before they count as failed.
const TXN_TIMEOUT: Duration = Duration::from_secs(30);
/// How often expired idempotency keys are swept.
const EXPIRY_SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// Everything the loop needs besides the processor.
#[derive(Debug, Clone)]
pub struct StreamSettings {
    /// The service name: consumer group, DLQ and changelog prefix.
    pub service: &'static str,
    /// A stable id of this instance (the pod name): the transactional id is
    /// `<prefix>-<instance>`, so that a restarted instance fences its predecessor.
    pub instance_id: String,
    /// Kafka settings.
    pub kafka: KafkaConfig,
    /// Runtime settings.
    pub runtime: RuntimeConfig,
}

/// What the rebalance callback shares with the loop.
#[derive(Debug, Default)]
struct RebalanceEvents {
    /// Partitions assigned since the loop last looked; their state must be restored.
    assigned: BTreeSet<i32>,
    /// Partitions revoked since the loop last looked.
    revoked: BTreeSet<i32>,
    /// The open transaction was aborted by a revocation.
    aborted: bool,
    /// Whether the consumer has joined the group at least once.
    joined: bool,
}

/// The consumer's context: aborts the open transaction before partitions are revoked, and
/// records lag from librdkafka's statistics.
struct RuntimeContext {
    producer: Arc<ThreadedProducer<DefaultProducerContext>>,
    txn_open: Arc<AtomicBool>,
    events: Arc<Mutex<RebalanceEvents>>,
    metrics: ServiceMetrics,
    health: Health,
}

impl ClientContext for RuntimeContext {
    fn stats(&self, statistics: Statistics) {
        for (topic, stats) in &statistics.topics {
            for (partition, p) in &stats.partitions {
                if *partition >= 0 && p.consumer_lag >= 0 {
                    self.metrics
                        .consumer_lag
                        .get_or_create(&PartitionLabels { topic: topic.clone(), partition: *partition })
                        .set(p.consumer_lag);
                }
            }
        }
    }
}

impl ConsumerContext for RuntimeContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(partitions) = rebalance {
            self.health.set_ready(false);
            let mut events = self.events.lock().expect("rebalance lock");
            if self.txn_open.swap(false, Ordering::AcqRel) {
                // The transaction holds records of partitions that are about to move: abort it
                // so that their new owner starts from the committed offsets.
                if let Err(error) = self.producer.abort_transaction(TXN_TIMEOUT) {
                    tracing::error!(%error, "aborting the open transaction on revocation failed");
                }
                events.aborted = true;
                self.metrics.transactions.get_or_create(&OutcomeLabels { outcome: "aborted".into() }).inc();
            }
            events.revoked.extend(partitions.elements().iter().map(|e| e.partition()));
            tracing::info!(partitions = ?partitions.elements().iter().map(|e| (e.topic().to_owned(), e.partition())).collect::<Vec<_>>(), "partitions revoked");
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let mut events = self.events.lock().expect("rebalance lock");
        match rebalance {
            Rebalance::Assign(partitions) => {
                events.joined = true;
                events.assigned.extend(partitions.elements().iter().map(|e| e.partition()));
                tracing::info!(partitions = ?partitions.elements().iter().map(|e| (e.topic().to_owned(), e.partition())).collect::<Vec<_>>(), "partitions assigned");
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(error) => tracing::error!(%error, "rebalance error"),
        }
    }
}

type RuntimeConsumer = StreamConsumer<RuntimeContext>;

/// The running loop of one service instance.
pub struct StreamRuntime<P: Processor> {
    processor: P,
    settings: StreamSettings,
    codec: Codec,
    metrics: ServiceMetrics,
    health: Health,
    consumer: RuntimeConsumer,
    producer: Arc<ThreadedProducer<DefaultProducerContext>>,
    txn_open: Arc<AtomicBool>,
    events: Arc<Mutex<RebalanceEvents>>,
    state: TxnState,
    stores: Vec<&'static str>,
    owned: BTreeSet<i32>,
    /// Next offset to commit per input topic and partition, for the open transaction.
    pending_offsets: HashMap<String, BTreeMap<i32, i64>>,
    /// `occurred_at` of the inputs in the open transaction, with the end-to-end latency
    /// histogram of their topic.
    pending_occurred: Vec<(Histogram, i64)>,
    /// Metric handles per input topic, and the full name and produced-counter of each output
    /// topic: looked up by `&str` for every record, so that the hot path allocates no labels.
    input_metrics: HashMap<String, InputMetrics>,
    output_topics: HashMap<&'static str, (String, Counter)>,
    records_in_txn: usize,
    txn_started: Instant,
    /// Paused partitions and when to resume them.
    paused: HashMap<(String, i32), Instant>,
    last_sweep: Instant,
}

impl<P: Processor> std::fmt::Debug for StreamRuntime<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamRuntime").field("service", &self.settings.service).finish_non_exhaustive()
    }
}

impl<P: Processor> StreamRuntime<P> {
    /// Creates the topics the service owns, the transactional producer and the consumer, and
    /// subscribes. Nothing is consumed until [`run`](Self::run).
    pub async fn new(
        settings: StreamSettings,
        processor: P,
        codec: Codec,
        metrics: ServiceMetrics,
        health: Health,
    ) -> anyhow::Result<Self> {
        let service = settings.service;
        let kafka = &settings.kafka;
        let inputs: Vec<String> = P::Input::topics().iter().map(|t| kafka.topic(t)).collect();
        let mut stores = processor.stores();
        stores.extend([IDEMPOTENCY_STORE, TIMER_STORE]);
        let changelogs: Vec<String> =
            stores.iter().map(|store| kafka.topic(&changelog_topic(service, store))).collect();
        let dlq = kafka.topic(&dlq_topic(service));
        let mut topics: Vec<(&str, TopicKind)> = inputs.iter().map(|t| (t.as_str(), TopicKind::Events)).collect();
        topics.push((&dlq, TopicKind::Events));
        topics.extend(changelogs.iter().map(|t| (t.as_str(), TopicKind::Compacted)));
        ensure_topics(&settings.kafka, &topics).await.context("creating the service's topics")?;

        let prefix = settings.kafka.transactional_id_prefix.clone().unwrap_or_else(|| service.to_owned());
        let producer: ThreadedProducer<DefaultProducerContext> = producer_config(&settings.kafka)
            .set("transactional.id", format!("{prefix}-{}", settings.instance_id))
            .create()
            .context("creating the transactional producer")?;
        let producer = Arc::new(producer);
        let init = producer.clone();
        // init_transactions blocks until the coordinator answers and fences any predecessor
        // with the same transactional id, aborting its open transaction.
        tokio::task::spawn_blocking(move || init.init_transactions(TXN_TIMEOUT))
            .await?
            .context("initialising transactions")?;

        let txn_open = Arc::new(AtomicBool::new(false));
        let events = Arc::new(Mutex::new(RebalanceEvents::default()));
        let context = RuntimeContext {
            producer: producer.clone(),
            txn_open: txn_open.clone(),
            events: events.clone(),
            metrics: metrics.clone(),
            health: health.clone(),
        };
        let group = settings.kafka.group_id.clone().unwrap_or_else(|| service.to_owned());
        let consumer: RuntimeConsumer = client_config(&settings.kafka)
            .set("group.id", &group)
            .set("isolation.level", "read_committed")
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            // Range assigns the same partition numbers of co-partitioned topics to one member,
            // so the state of partition p of every input lives in one instance.
            .set("partition.assignment.strategy", "range")
            .set("statistics.interval.ms", "5000")
            // Static membership: a restarted instance (same instance id) takes its partitions
            // back at once instead of waiting for the group to expire its predecessor.
            .set("group.instance.id", format!("{group}-{}", settings.instance_id))
            .set(
                "session.timeout.ms",
                settings.kafka.properties.get("session.timeout.ms").map_or("10000", String::as_str),
            )
            .create_with_context(context)
            .context("creating the consumer")?;
        let subscription: Vec<&str> = inputs.iter().map(String::as_str).collect();
        consumer.subscribe(&subscription).context("subscribing")?;
        tracing::info!(service, group, ?inputs, "stream runtime ready to consume");

        let codec = codec.with_topic_prefix(&settings.kafka.topic_prefix);
        Ok(Self {
            processor,
            codec,
            metrics,
            health,
            consumer,
            producer,
            txn_open,
            events,
            state: TxnState::default(),
            stores,
            owned: BTreeSet::new(),
            pending_offsets: HashMap::new(),
            pending_occurred: Vec::new(),
            input_metrics: HashMap::new(),
            output_topics: HashMap::new(),
            records_in_txn: 0,
            txn_started: Instant::now(),
            paused: HashMap::new(),
            last_sweep: Instant::now(),
            settings,
        })
    }

    /// Runs until `shutdown` fires; then commits the open transaction and leaves the group.
    pub async fn run(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut tick = tokio::time::interval(self.settings.runtime.tick_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let commit_due = self.txn_open.load(Ordering::Acquire)
                && (self.txn_started.elapsed() >= self.settings.runtime.commit_interval
                    || self.records_in_txn >= self.settings.runtime.max_batch_records);
            if commit_due {
                self.commit().await?;
            }
            // With a transaction open, wake up when it is due; with none, there is nothing to
            // commit and the next record (or tick) wakes the loop.
            let wait = if self.txn_open.load(Ordering::Acquire) {
                self.settings.runtime.commit_interval.saturating_sub(self.txn_started.elapsed())
            } else {
                self.settings.runtime.commit_interval
            };
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                _ = tick.tick() => {
                    self.handle_rebalance().await?;
                    self.on_tick().await?;
                }
                received = tokio::time::timeout(wait.max(Duration::from_millis(1)), self.consumer.recv()) => {
                    match received {
                        Err(_) => {}
                        Ok(Err(error)) => {
                            self.metrics.error("consume", "consume");
                            tracing::warn!(%error, "consume error");
                        }
                        Ok(Ok(message)) => {
                            let message = message.detach();
                            self.handle_rebalance().await?;
                            if self.owned.contains(&message.partition()) {
                                self.handle_record(message, &shutdown).await?;
                            }
                        }
                    }
                }
            }
        }
        tracing::info!("stopping: committing the open transaction");
        self.handle_rebalance().await?;
        if self.txn_open.load(Ordering::Acquire) {
            self.commit().await?;
        }
        self.health.set_ready(false);
        self.consumer.unsubscribe();
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || producer.flush(TXN_TIMEOUT)).await?.context("flushing")?;
        Ok(())
    }

    /// Applies what the rebalance callback recorded: forgets revoked partitions, restores
    /// newly assigned ones, and drops the state of a transaction aborted on revocation.
    async fn handle_rebalance(&mut self) -> anyhow::Result<()> {
        let (assigned, revoked, aborted, joined) = {
            let mut events = self.events.lock().expect("rebalance lock");
            (
                std::mem::take(&mut events.assigned),
                std::mem::take(&mut events.revoked),
                std::mem::take(&mut events.aborted),
                events.joined,
            )
        };
        if aborted {
            self.discard_transaction();
        }
        for partition in revoked.difference(&assigned) {
            self.state.drop_partition(*partition);
            self.owned.remove(partition);
        }
        self.paused.retain(|(_, p), _| !revoked.contains(p));
        let to_restore: Vec<i32> =
            assigned.iter().copied().filter(|p| !self.owned.contains(p) || revoked.contains(p)).collect();
        if !to_restore.is_empty() {
            self.health.set_ready(false);
            for partition in &to_restore {
                self.state.drop_partition(*partition);
            }
            self.restore(&to_restore).await?;
            self.owned.extend(to_restore);
        }
        if joined && !self.health.is_ready() && self.events.lock().expect("rebalance lock").assigned.is_empty() {
            self.health.set_ready(true);
        }
        Ok(())
    }

    /// Rebuilds the state of `partitions` from the changelogs, up to their current end.
    async fn restore(&mut self, partitions: &[i32]) -> anyhow::Result<()> {
        let started = Instant::now();
        let mut restored = 0_u64;
        for store in self.stores.clone() {
            let topic = self.settings.kafka.topic(&changelog_topic(self.settings.service, store));
            let state = &mut self.state;
            let read = read_to_end(&self.settings.kafka, &topic, Some(partitions), |message| {
                if let Some(key) = message.key() {
                    let key = String::from_utf8_lossy(key).into_owned();
                    state.restore(store, message.partition(), key, message.payload().map(<[u8]>::to_vec));
                }
            })
            .await
            .with_context(|| format!("restoring {topic}"))?;
            self.metrics.state_records_restored.get_or_create(&TopicLabels { topic }).inc_by(read);
            restored += read;
        }
        tracing::info!(?partitions, restored, elapsed = ?started.elapsed(), "state restored");
        Ok(())
    }

    fn begin_if_needed(&mut self) -> anyhow::Result<()> {
        if !self.txn_open.load(Ordering::Acquire) {
            self.producer.begin_transaction().context("beginning a transaction")?;
            self.txn_open.store(true, Ordering::Release);
            self.txn_started = Instant::now();
            self.records_in_txn = 0;
        }
        Ok(())
    }

    async fn handle_record(&mut self, message: OwnedMessage, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let started = Instant::now();
        let topic = message.topic().to_owned();
        let at = Location::new(&topic, message.partition(), message.offset());
        let meta = RecordMeta {
            location: at.clone(),
            key: message.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            headers: header_map(message.headers()),
        };
        let metrics = self.input_metrics(&topic);
        metrics.consumed.inc();
        self.begin_if_needed()?;
        self.records_in_txn += 1;

        let span = tracing::info_span!(
            "record",
            topic = %topic,
            partition = at.partition,
            offset = at.offset,
            correlation_id = meta.headers.get(headers::CORRELATION_ID).map(String::as_str).unwrap_or_default(),
        );
        let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(&meta.headers)));
        let _ = span.set_parent(parent);
        let advance = self.process_record(&message, &meta, &metrics, shutdown).instrument(span).await?;
        if advance {
            self.pending_offsets.entry(topic).or_default().insert(at.partition, at.offset + 1);
        }
        metrics.processing.observe(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// The metric handles of input `topic`.
    fn input_metrics(&mut self, topic: &str) -> InputMetrics {
        if let Some(handles) = self.input_metrics.get(topic) {
            return handles.clone();
        }
        let labels = TopicLabels { topic: topic.to_owned() };
        let handles = InputMetrics {
            consumed: self.metrics.records_consumed.get_or_create(&labels).clone(),
            duplicates: self.metrics.duplicates_skipped.get_or_create(&labels).clone(),
            processing: self.metrics.processing_seconds.get_or_create(&labels).clone(),
            end_to_end: self.metrics.end_to_end_seconds.get_or_create(&labels).clone(),
        };
        self.input_metrics.insert(topic.to_owned(), handles.clone());
        handles
    }

    /// The full name (with the environment's prefix) and produced-counter of output `topic`.
    fn output_topic(&mut self, topic: &'static str) -> &(String, Counter) {
        self.output_topics.entry(topic).or_insert_with(|| {
            let name = self.settings.kafka.topic(topic);
            let produced = self.metrics.records_produced.get_or_create(&TopicLabels { topic: name.clone() }).clone();
            (name, produced)
        })
    }

    /// Processes one record; returns whether its offset may be committed (false when its
    /// partition was paused to offer it again later).
    async fn process_record(
        &mut self,
        message: &OwnedMessage,
        meta: &RecordMeta,
        metrics: &InputMetrics,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<bool> {
        let at = &meta.location;
        let first_failure = Utc::now();
        let Some(payload) = message.payload() else {
            self.dead_letter(message, "tombstone", "a null value on an event topic".into(), 1, first_failure)?;
            return Ok(true);
        };

        // Decode under the contract's own topic name; only an unreachable registry is worth
        // retrying.
        let logical = Location {
            topic: at.topic.strip_prefix(&self.settings.kafka.topic_prefix).unwrap_or(&at.topic).to_owned(),
            ..at.clone()
        };
        let mut attempt = 1;
        let input = loop {
            match P::Input::decode(&self.codec, &logical, payload).await {
                Ok(input) => break input,
                Err(error) if error.is_transient() && attempt < self.settings.runtime.retry.max_attempts => {
                    self.wait_before_retry("decode", attempt, &error.to_string(), shutdown).await;
                    attempt += 1;
                }
                Err(error) => {
                    self.metrics.error(error.class(), "decode");
                    self.dead_letter(message, error.class(), error.to_string(), attempt, first_failure)?;
                    return Ok(true);
                }
            }
        };
        let correlation_id = input.envelope().correlation_id.as_str();
        if meta.headers.get(headers::CORRELATION_ID).is_none_or(|header| header != correlation_id) {
            // The span took the header's value; the envelope is the authority.
            tracing::Span::current().record("correlation_id", correlation_id);
        }

        let idempotency_key = self.processor.idempotency_key(&input);
        if let Some(key) = &idempotency_key
            && self.state.get_raw(IDEMPOTENCY_STORE, at.partition, key).is_some()
        {
            metrics.duplicates.inc();
            tracing::debug!(idempotency_key = %key, "duplicate skipped");
            return Ok(true);
        }

        let mut attempt = 1;
        loop {
            let now = Utc::now();
            let mut context = Context {
                now,
                partition: at.partition,
                record: Some(meta),
                state: &mut self.state,
                outputs: Vec::new(),
            };
            let outcome = self.processor.process(&mut context, &input).await;
            let outputs = std::mem::take(&mut context.outputs);
            let outcome = match outcome {
                Ok(()) => self.write_outputs(outputs).await,
                Err(error) => Err(error),
            };
            match outcome {
                Ok(()) => {
                    if let Some(key) = &idempotency_key {
                        self.state.put(IDEMPOTENCY_STORE, at.partition, key, &now.timestamp_millis())?;
                    }
                    self.state.accept_staged();
                    self.pending_occurred.push((metrics.end_to_end.clone(), input.envelope().occurred_at));
                    return Ok(true);
                }
                Err(error) => {
                    self.state.discard_staged();
                    self.metrics.error(error.class(), "process");
                    match error {
                        ProcessError::Unavailable { downstream, retry_after, message: reason } => {
                            tracing::warn!(
                                downstream,
                                ?retry_after,
                                reason,
                                "downstream unavailable: pausing the partition"
                            );
                            self.pause(at, retry_after)?;
                            return Ok(false);
                        }
                        ProcessError::Retryable { .. }
                            if attempt < self.settings.runtime.retry.max_attempts && !shutdown.is_cancelled() =>
                        {
                            self.wait_before_retry("process", attempt, &error.to_string(), shutdown).await;
                            attempt += 1;
                        }
                        ProcessError::Retryable { class, message: reason } => {
                            let class = format!("{class}.retries_exhausted");
                            self.dead_letter(message, &class, reason, attempt, first_failure)?;
                            return Ok(true);
                        }
                        ProcessError::Permanent { class, message: reason } => {
                            tracing::warn!(class, reason, "permanent failure: dead-lettering the record");
                            self.dead_letter(message, class, reason, attempt, first_failure)?;
                            return Ok(true);
                        }
                    }
                }
            }
        }
    }

    async fn wait_before_retry(&self, stage: &str, attempt: u32, error: &str, shutdown: &CancellationToken) {
        let delay = retry::backoff(&self.settings.runtime.retry, attempt);
        self.metrics.retries.get_or_create(&StageLabels { stage: stage.to_owned() }).inc();
        tracing::info!(stage, attempt, ?delay, error, "retrying after a transient failure");
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => {}
        }
    }

    /// Encodes and sends outputs inside the open transaction.
    async fn write_outputs(&mut self, outputs: Vec<Output>) -> Result<(), ProcessError> {
        let mut encoded = Vec::with_capacity(outputs.len());
        for output in &outputs {
            let bytes = output.value.encode(&self.codec).await.map_err(|error| {
                if error.is_transient() {
                    ProcessError::retryable("encode", error.to_string())
                } else {
                    ProcessError::permanent("encode", error.to_string())
                }
            })?;
            encoded.push(bytes);
        }
        for (output, bytes) in outputs.iter().zip(encoded) {
            let mut record_headers = OwnedHeaders::new();
            for (name, value) in output.value.envelope().cloudevents_headers(output.value.ce_type()) {
                record_headers = record_headers.insert(Header { key: name, value: Some(&value) });
            }
            for (name, value) in trace_headers() {
                record_headers = record_headers.insert(Header { key: &name, value: Some(&value) });
            }
            let producer = self.producer.clone();
            let (topic, produced) = self.output_topic(output.topic);
            let record = BaseRecord::to(topic).key(output.key.as_bytes()).payload(&bytes).headers(record_headers);
            send(&producer, record).map_err(|e| ProcessError::retryable("produce", e.to_string()))?;
            produced.inc();
        }
        Ok(())
    }

    /// Writes `message` to the DLQ inside the open transaction.
    fn dead_letter(
        &self,
        message: &OwnedMessage,
        class: &str,
        reason: String,
        attempts: u32,
        first_failure_at: DateTime<Utc>,
    ) -> anyhow::Result<()> {
        let letter = DeadLetter {
            service: self.settings.service.to_owned(),
            class: class.to_owned(),
            message: reason,
            source: Location::new(message.topic(), message.partition(), message.offset()),
            attempts,
            first_failure_at,
        };
        let mut record_headers = OwnedHeaders::new();
        if let Some(original) = message.headers() {
            for header in original.iter() {
                record_headers = record_headers.insert(Header { key: header.key, value: header.value });
            }
        }
        for (name, value) in letter.headers() {
            record_headers = record_headers.insert(Header { key: name, value: Some(&value) });
        }
        let topic = self.settings.kafka.topic(&dlq_topic(self.settings.service));
        let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(&topic).headers(record_headers);
        if let Some(key) = message.key() {
            record = record.key(key);
        }
        if let Some(payload) = message.payload() {
            record = record.payload(payload);
        }
        send(&self.producer, record).context("writing to the DLQ")?;
        self.metrics
            .dlq_writes
            .get_or_create(&DlqLabels { source_topic: message.topic().to_owned(), class: class.to_owned() })
            .inc();
        self.metrics.records_produced.get_or_create(&TopicLabels { topic }).inc();
        tracing::warn!(class, error = letter.message, source = %letter.source, "record dead-lettered");
        Ok(())
    }

    /// Stops fetching `at`'s partition and rewinds it to `at`, to resume after `retry_after`.
    fn pause(&mut self, at: &Location, retry_after: Duration) -> anyhow::Result<()> {
        let mut partitions = TopicPartitionList::new();
        partitions.add_partition(&at.topic, at.partition);
        self.consumer.pause(&partitions)?;
        self.consumer.seek(&at.topic, at.partition, Offset::Offset(at.offset), TXN_TIMEOUT)?;
        self.paused.insert((at.topic.clone(), at.partition), Instant::now() + retry_after);
        Ok(())
    }

    async fn on_tick(&mut self) -> anyhow::Result<()> {
        let now = Instant::now();
        let due: Vec<(String, i32)> =
            self.paused.iter().filter(|(_, at)| **at <= now).map(|(k, _)| k.clone()).collect();
        for (topic, partition) in due {
            self.paused.remove(&(topic.clone(), partition));
            let mut partitions = TopicPartitionList::new();
            partitions.add_partition(&topic, partition);
            self.consumer.resume(&partitions)?;
            tracing::info!(topic, partition, "partition resumed");
        }
        self.fire_timers().await?;
        if self.last_sweep.elapsed() >= EXPIRY_SWEEP_INTERVAL {
            self.last_sweep = Instant::now();
            self.expire_idempotency_keys()?;
        }
        Ok(())
    }

    async fn fire_timers(&mut self) -> anyhow::Result<()> {
        let now = Utc::now();
        let now_ms = now.timestamp_millis();
        for partition in self.owned.clone() {
            let due = self.state.scan::<StoredTimer>(TIMER_STORE, partition, "", |_, timer| timer.due_at_ms <= now_ms);
            for (key, stored) in due {
                self.begin_if_needed()?;
                let timer = Timer {
                    key: key.clone(),
                    due_at: DateTime::from_timestamp_millis(stored.due_at_ms).unwrap_or(now),
                    payload: stored.payload.clone(),
                    partition,
                };
                let mut context = Context { now, partition, record: None, state: &mut self.state, outputs: Vec::new() };
                let outcome = self.processor.on_timer(&mut context, &timer).await;
                let outputs = std::mem::take(&mut context.outputs);
                let outcome = match outcome {
                    Ok(()) => self.write_outputs(outputs).await,
                    Err(error) => Err(error),
                };
                match outcome {
                    Ok(()) => {
                        let rescheduled = self
                            .state
                            .get::<StoredTimer>(TIMER_STORE, partition, &key)?
                            .is_some_and(|t| t.due_at_ms != stored.due_at_ms);
                        if !rescheduled {
                            self.state.cancel(partition, &key);
                        }
                        self.state.accept_staged();
                    }
                    Err(ProcessError::Permanent { class, message }) => {
                        self.state.discard_staged();
                        self.metrics.error(class, "timer");
                        tracing::error!(timer = key, class, message, "timer failed permanently; dropped");
                        self.state.cancel(partition, &key);
                        self.state.accept_staged();
                    }
                    Err(error) => {
                        // Left in place: it fires again on the next tick.
                        self.state.discard_staged();
                        self.metrics.error(error.class(), "timer");
                        tracing::warn!(timer = key, %error, "timer failed; will fire again");
                    }
                }
            }
        }
        Ok(())
    }

    fn expire_idempotency_keys(&mut self) -> anyhow::Result<()> {
        let window =
            chrono::Duration::from_std(self.settings.runtime.idempotency_window).unwrap_or(chrono::Duration::MAX);
        let horizon = (Utc::now() - window).timestamp_millis();
        for partition in self.owned.clone() {
            let expired = self.state.scan::<i64>(IDEMPOTENCY_STORE, partition, "", |_, seen| *seen < horizon);
            if expired.is_empty() {
                continue;
            }
            self.begin_if_needed()?;
            for (key, _) in &expired {
                self.state.delete(IDEMPOTENCY_STORE, partition, key);
            }
            self.state.accept_staged();
            tracing::debug!(partition, expired = expired.len(), "idempotency keys expired");
        }
        Ok(())
    }

    /// Commits the open transaction: changelog records, input offsets, then the commit itself.
    async fn commit(&mut self) -> anyhow::Result<()> {
        if !self.txn_open.load(Ordering::Acquire) {
            return Ok(());
        }
        let started = Instant::now();
        for (store, partition, key, value) in self.state.pending_changes() {
            let topic = self.settings.kafka.topic(&changelog_topic(self.settings.service, store));
            let mut record: BaseRecord<'_, str, [u8]> = BaseRecord::to(&topic).partition(partition).key(key);
            if let Some(value) = value {
                record = record.payload(value);
            }
            send(&self.producer, record).context("writing a changelog record")?;
        }
        let mut offsets = TopicPartitionList::new();
        for (topic, partitions) in &self.pending_offsets {
            for (partition, offset) in partitions {
                offsets.add_partition_offset(topic, *partition, Offset::Offset(*offset))?;
            }
        }
        let group = self.consumer.group_metadata().context("the consumer has no group metadata")?;
        let producer = self.producer.clone();
        let result = tokio::task::spawn_blocking(move || {
            // rdkafka's commit_transaction flushes by polling in steps of up to 100 ms, and the
            // ThreadedProducer's own thread takes the delivery events, so every commit with a
            // message in flight would wait a full step. Waiting here in 1 ms steps first makes
            // that flush return at once.
            wait_until_delivered(&producer, TXN_TIMEOUT);
            if offsets.count() > 0 {
                producer.send_offsets_to_transaction(&offsets, &group, TXN_TIMEOUT)?;
            }
            producer.commit_transaction(TXN_TIMEOUT)
        })
        .await?;
        self.txn_open.store(false, Ordering::Release);
        match result {
            Ok(()) => {
                self.state.commit();
                self.metrics.transaction_commit_seconds.observe(started.elapsed().as_secs_f64());
                self.metrics.transactions.get_or_create(&OutcomeLabels { outcome: "committed".into() }).inc();
                let now = Utc::now().timestamp_millis();
                for (end_to_end, occurred_at) in self.pending_occurred.drain(..) {
                    end_to_end.observe((now - occurred_at).max(0) as f64 / 1000.0);
                }
                self.pending_offsets.clear();
                Ok(())
            }
            Err(error) => self.recover_from_failed_commit(error).await,
        }
    }

    /// An abortable commit failure aborts and rewinds to the committed offsets; anything else
    /// (a fenced producer: another instance took over) stops the service.
    async fn recover_from_failed_commit(&mut self, error: KafkaError) -> anyhow::Result<()> {
        self.metrics.error("commit", "commit");
        let abortable = matches!(&error, KafkaError::Transaction(e) if e.txn_requires_abort());
        if !abortable {
            return Err(anyhow::Error::new(error).context("committing a transaction failed fatally"));
        }
        tracing::warn!(%error, "commit failed; aborting and rewinding to the committed offsets");
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || producer.abort_transaction(TXN_TIMEOUT)).await?.context("aborting")?;
        self.metrics.transactions.get_or_create(&OutcomeLabels { outcome: "aborted".into() }).inc();
        let rewind: Vec<(String, i32)> = self
            .pending_offsets
            .iter()
            .flat_map(|(topic, partitions)| partitions.keys().map(|partition| (topic.clone(), *partition)))
            .collect();
        self.discard_transaction();
        let committed = self.consumer.committed(TXN_TIMEOUT)?;
        for (topic, partition) in rewind {
            let offset = committed
                .find_partition(&topic, partition)
                .map(|e| e.offset())
                .filter(|o| matches!(o, Offset::Offset(_)))
                .unwrap_or(Offset::Beginning);
            self.consumer.seek(&topic, partition, offset, TXN_TIMEOUT)?;
        }
        Ok(())
    }

    fn discard_transaction(&mut self) {
        self.txn_open.store(false, Ordering::Release);
        self.state.abort();
        self.pending_offsets.clear();
        self.pending_occurred.clear();
        self.records_in_txn = 0;
    }
}

/// The metric handles of one input topic.
#[derive(Debug, Clone)]
struct InputMetrics {
    consumed: Counter,
    duplicates: Counter,
    processing: Histogram,
    end_to_end: Histogram,
}

/// Producer settings shared by the runtime and its tests.
pub fn producer_config(kafka: &KafkaConfig) -> rdkafka::ClientConfig {
    let mut config = client_config(kafka);
    // The Java client's partitioner, so that platforms writing with Java and our services put
    // one account in the same partition number of every topic.
    config.set("partitioner", "murmur2_random");
    config.set("linger.ms", "5");
    config
}

/// Blocks until the producer has no message in flight, or `timeout` passes.
fn wait_until_delivered(producer: &ThreadedProducer<DefaultProducerContext>, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while producer.in_flight_count() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Enqueues `record`, waiting while the local queue is full.
fn send<K, P>(
    producer: &ThreadedProducer<DefaultProducerContext>,
    mut record: BaseRecord<'_, K, P>,
) -> Result<(), KafkaError>
where
    K: rdkafka::message::ToBytes + ?Sized,
    P: rdkafka::message::ToBytes + ?Sized,
{
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull), returned)) => {
                record = returned;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((error, _)) => return Err(error),
        }
    }
}

fn header_map(headers: Option<&OwnedHeaders>) -> BTreeMap<String, String> {
    headers
        .map(|headers| {
            headers
                .iter()
                .filter_map(|h| Some((h.key.to_owned(), String::from_utf8_lossy(h.value?).into_owned())))
                .collect()
        })
        .unwrap_or_default()
}

/// The current span's trace context as `traceparent`/`tracestate` headers.
fn trace_headers() -> Vec<(String, String)> {
    let context = tracing::Span::current().context();
    let mut carrier = HeaderInjector(Vec::new());
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&context, &mut carrier));
    carrier.0
}

struct HeaderInjector(Vec<(String, String)>);

impl Injector for HeaderInjector {
    fn set(&mut self, key: &str, value: String) {
        self.0.push((key.to_owned(), value));
    }
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
