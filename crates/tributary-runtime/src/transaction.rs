//! The producer side of the exactly-once loop: one transactional producer per instance, and
//! the bookkeeping of the open transaction (outputs, dead letters, changelog records, input
//! offsets), committed together or not at all.
//!
//! Timeouts, and why they are what they are:
//! - A transaction is open only while the loop writes what completed records produced and
//!   commits them: from the first write to the commit, about `commit_interval` (100 ms) plus the
//!   commit itself (tens of ms). Nothing waits inside a transaction: a retry's backoff, a
//!   paused downstream and a slow call (an ERP write) all happen while the record's partition
//!   waits outside of it, and their outputs join whichever transaction is open when they are
//!   done.
//! - [`TRANSACTION_TIMEOUT`] (60 s) is the broker's limit on one open transaction: far above
//!   that 100 ms, so that a broker fail-over during a commit does not fence us, and below the
//!   broker's `transaction.max.timeout.ms` (15 min by default), which would refuse a larger one.
//! - [`CALL_TIMEOUT`] (30 s) bounds each transactional call (begin, send offsets, commit,
//!   abort); it stays below the transaction timeout, so a call never outlives its transaction.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use tributary_telemetry::ServiceMetrics;
use tributary_telemetry::metrics::{OutcomeLabels, TopicLabels};

use crate::config::KafkaConfig;
use crate::engine::{DeadLetterRecord, EncodedOutput};
use crate::kafka::producer_config;
use crate::lag::LagTracker;
use crate::state::{PartitionState, changelog_topic};

/// The broker aborts a transaction open longer than this (see the module doc).
pub(crate) const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(60);
/// Each transactional call gives up after this (see the module doc).
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// How a commit ended.
#[derive(Debug)]
pub(crate) enum Committed {
    /// Everything is visible to `read_committed` readers.
    Yes,
    /// The transaction was aborted and its pending state dropped: whatever it held must be read
    /// again from the committed offsets.
    Aborted,
}

/// The transactional producer and what the open transaction holds.
pub(crate) struct Transactions {
    producer: Arc<ThreadedProducer<DefaultProducerContext>>,
    open: Arc<AtomicBool>,
    started: Instant,
    records: usize,
    /// Next offset to commit per input topic and partition.
    offsets: HashMap<String, BTreeMap<i32, i64>>,
    /// `occurred_at` of the inputs in the transaction, with their topic's end-to-end histogram.
    occurred: Vec<(Histogram, i64)>,
    kafka: KafkaConfig,
    service: &'static str,
    metrics: ServiceMetrics,
    dlq_topic: String,
    /// Full names and produced-counters of output topics, resolved once (the hot path looks
    /// them up by `&str`, allocating nothing).
    output_topics: HashMap<&'static str, (String, Counter)>,
    changelog_topics: HashMap<&'static str, String>,
    /// Told the offsets of every committed transaction, for the lag metric.
    lag: Arc<LagTracker>,
}

impl Transactions {
    /// A transactional producer with `transactional_id`, initialised: any predecessor with the
    /// same id is fenced and its open transaction aborted.
    pub(crate) async fn new(
        kafka: &KafkaConfig,
        service: &'static str,
        transactional_id: String,
        metrics: ServiceMetrics,
    ) -> anyhow::Result<Self> {
        let producer: ThreadedProducer<DefaultProducerContext> = producer_config(kafka)
            .set("transactional.id", transactional_id)
            .set("transaction.timeout.ms", TRANSACTION_TIMEOUT.as_millis().to_string())
            .create()
            .context("creating the transactional producer")?;
        let producer = Arc::new(producer);
        let init = producer.clone();
        tokio::task::spawn_blocking(move || init.init_transactions(CALL_TIMEOUT))
            .await?
            .context("initialising transactions")?;
        Ok(Self {
            producer,
            open: Arc::new(AtomicBool::new(false)),
            started: Instant::now(),
            records: 0,
            offsets: HashMap::new(),
            occurred: Vec::new(),
            dlq_topic: kafka.topic(&tributary_contracts::topics::dlq_topic(service)),
            kafka: kafka.clone(),
            service,
            metrics,
            output_topics: HashMap::new(),
            changelog_topics: HashMap::new(),
            lag: Arc::default(),
        })
    }

    /// The producer and the open flag, for the rebalance callback that aborts on revocation.
    pub(crate) fn shared(&self) -> (Arc<ThreadedProducer<DefaultProducerContext>>, Arc<AtomicBool>) {
        (self.producer.clone(), self.open.clone())
    }

    /// What learns the committed offsets, for the consumer's lag metric.
    pub(crate) fn lag(&self) -> Arc<LagTracker> {
        self.lag.clone()
    }

    pub(crate) fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// Whether the open transaction should be committed now.
    pub(crate) fn due(&self, interval: Duration, max_records: usize) -> bool {
        self.is_open() && (self.started.elapsed() >= interval || self.records >= max_records)
    }

    /// How long until the open transaction is due (`None`: none is open).
    pub(crate) fn until_due(&self, interval: Duration) -> Option<Duration> {
        self.is_open().then(|| interval.saturating_sub(self.started.elapsed()))
    }

    /// Opens a transaction if none is open.
    pub(crate) fn begin(&mut self) -> anyhow::Result<()> {
        if !self.is_open() {
            self.producer.begin_transaction().context("beginning a transaction")?;
            self.open.store(true, Ordering::Release);
            self.started = Instant::now();
            self.records = 0;
        }
        Ok(())
    }

    /// Writes a completed record's or timer's outputs.
    pub(crate) fn write_outputs(&mut self, outputs: Vec<EncodedOutput>) -> anyhow::Result<()> {
        self.begin()?;
        for output in outputs {
            let (topic, produced) = self.output_topics.entry(output.topic).or_insert_with(|| {
                let name = self.kafka.topic(output.topic);
                let produced =
                    self.metrics.records_produced.get_or_create(&TopicLabels { topic: name.clone() }).clone();
                (name, produced)
            });
            let mut headers = OwnedHeaders::new_with_capacity(output.headers.len());
            for (name, value) in &output.headers {
                headers = headers.insert(Header { key: name, value: Some(value) });
            }
            let record =
                BaseRecord::to(topic.as_str()).key(output.key.as_bytes()).payload(&output.payload).headers(headers);
            send(&self.producer, record).with_context(|| format!("writing to {topic}"))?;
            produced.inc();
        }
        Ok(())
    }

    /// Writes a dead letter.
    pub(crate) fn write_dead_letter(&mut self, letter: &DeadLetterRecord) -> anyhow::Result<()> {
        self.begin()?;
        let mut headers = OwnedHeaders::new_with_capacity(letter.headers.len());
        for (name, value) in &letter.headers {
            headers = headers.insert(Header { key: name, value: value.as_deref() });
        }
        let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(&self.dlq_topic).headers(headers);
        if let Some(key) = &letter.key {
            record = record.key(key);
        }
        if let Some(payload) = &letter.payload {
            record = record.payload(payload);
        }
        send(&self.producer, record).context("writing to the DLQ")?;
        self.metrics.records_produced.get_or_create(&TopicLabels { topic: self.dlq_topic.clone() }).inc();
        Ok(())
    }

    /// A record of `topic[partition]` at `offset` is done: its offset is committed with the
    /// transaction, and its `occurred_at` measured when it is.
    pub(crate) fn advance(
        &mut self,
        topic: &str,
        partition: i32,
        offset: i64,
        occurred: Option<(Histogram, i64)>,
    ) -> anyhow::Result<()> {
        self.begin()?;
        self.records += 1;
        match self.offsets.get_mut(topic) {
            Some(partitions) => {
                partitions.insert(partition, offset + 1);
            }
            None => {
                self.offsets.insert(topic.to_owned(), BTreeMap::from([(partition, offset + 1)]));
            }
        }
        self.occurred.extend(occurred);
        Ok(())
    }

    /// Commits: the changelog records of every partition's pending state, the input offsets,
    /// then the commit itself. On success the pending state becomes the committed state.
    pub(crate) async fn commit(
        &mut self,
        partitions: &BTreeMap<i32, Arc<PartitionState>>,
        group: ConsumerGroupMetadata,
    ) -> anyhow::Result<Committed> {
        if !self.is_open() {
            return Ok(Committed::Yes);
        }
        let started = Instant::now();
        for state in partitions.values().filter(|state| state.has_pending()) {
            let mut failed = None;
            state.for_each_pending(|store, key, value| {
                if failed.is_some() {
                    return;
                }
                let topic = self
                    .changelog_topics
                    .entry(store)
                    .or_insert_with(|| self.kafka.topic(&changelog_topic(self.service, store)));
                let mut record: BaseRecord<'_, str, [u8]> = BaseRecord::to(topic).partition(state.partition()).key(key);
                if let Some(value) = value {
                    record = record.payload(value);
                }
                failed = send(&self.producer, record).err();
            });
            if let Some(error) = failed {
                return Err(anyhow::Error::new(error).context("writing a changelog record"));
            }
        }
        let mut offsets = TopicPartitionList::new();
        for (topic, partitions) in &self.offsets {
            for (partition, offset) in partitions {
                offsets.add_partition_offset(topic, *partition, Offset::Offset(*offset))?;
            }
        }
        let producer = self.producer.clone();
        let result = tokio::task::spawn_blocking(move || {
            // rdkafka's commit_transaction flushes by polling in steps of up to 100 ms, and the
            // ThreadedProducer's own thread takes the delivery events, so every commit with a
            // message in flight would wait a full step. Waiting here in 1 ms steps first makes
            // that flush return at once.
            wait_until_delivered(&producer, CALL_TIMEOUT);
            if offsets.count() > 0 {
                producer.send_offsets_to_transaction(&offsets, &group, CALL_TIMEOUT)?;
            }
            producer.commit_transaction(CALL_TIMEOUT)
        })
        .await?;
        self.open.store(false, Ordering::Release);
        match result {
            Ok(()) => {
                for state in partitions.values() {
                    state.commit();
                }
                self.metrics.transaction_commit_seconds.observe(started.elapsed().as_secs_f64());
                self.metrics.transactions.get_or_create(&OutcomeLabels { outcome: "committed".into() }).inc();
                let now = chrono::Utc::now().timestamp_millis();
                for (end_to_end, occurred_at) in self.occurred.drain(..) {
                    end_to_end.observe((now - occurred_at).max(0) as f64 / 1000.0);
                }
                self.lag.committed(self.offsets.iter().flat_map(|(topic, partitions)| {
                    partitions.iter().map(move |(&partition, &offset)| (topic.as_str(), partition, offset))
                }));
                self.offsets.clear();
                Ok(Committed::Yes)
            }
            Err(error) => self.abort_after(error, partitions).await,
        }
    }

    /// An abortable commit failure aborts and drops the pending state; anything else (a fenced producer: another instance took over) stops the
    /// service.
    async fn abort_after(
        &mut self,
        error: KafkaError,
        partitions: &BTreeMap<i32, Arc<PartitionState>>,
    ) -> anyhow::Result<Committed> {
        self.metrics.error("commit", "commit");
        let abortable = matches!(&error, KafkaError::Transaction(e) if e.txn_requires_abort());
        if !abortable {
            return Err(anyhow::Error::new(error).context("committing a transaction failed fatally"));
        }
        tracing::warn!(%error, "commit failed; aborting and rewinding to the committed offsets");
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || producer.abort_transaction(CALL_TIMEOUT)).await?.context("aborting")?;
        self.metrics.transactions.get_or_create(&OutcomeLabels { outcome: "aborted".into() }).inc();
        for state in partitions.values() {
            state.abort();
        }
        self.discard();
        Ok(Committed::Aborted)
    }

    /// Forgets the open transaction's bookkeeping (it was aborted).
    pub(crate) fn discard(&mut self) {
        self.open.store(false, Ordering::Release);
        self.offsets.clear();
        self.occurred.clear();
        self.records = 0;
    }

    /// Waits until everything sent has been delivered.
    pub(crate) async fn flush(&self) -> anyhow::Result<()> {
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || producer.flush(CALL_TIMEOUT)).await?.context("flushing")?;
        Ok(())
    }
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
