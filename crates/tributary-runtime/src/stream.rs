//! The exactly-once loop: consume `read_committed`, process, and commit outputs, changelog
//! records and input offsets in one Kafka transaction (DESIGN.md, "Processing guarantees").
//!
//! The algorithm, one instance:
//!
//! 1. Wait until the clock knows its time and every reference table has caught up.
//! 2. Loop until shutdown:
//!    - commit the open transaction every `commit_interval` (or `max_batch_records`);
//!    - a record arrives: if its partition is idle, attempt it (see below); if the partition is
//!      busy (an attempt in flight, a retry or a paused downstream waiting, a stop), queue it
//!      in the partition's backlog, attempted in order as the partition frees; with the
//!      backlog full, pause that topic-partition and rewind it to this record, to resume once
//!      the backlog is drained;
//!    - an attempt that did not finish at once (a slow downstream) runs as a task of its own;
//!      the partition waits for it, every other partition goes on, and the loop keeps
//!      committing;
//!    - on every tick and every move of the clock, idle partitions fire their due timers, in
//!      due order; waits that ended are attempted again;
//!    - partitions revoked: the open transaction is aborted in the rebalance callback, their
//!      state dropped; partitions assigned: their state is restored from the changelogs before
//!      their first record.
//! 3. On shutdown: let attempts in flight finish for a bounded time, commit, leave the group.
//!
//! What an attempt's outcome means (outputs, dead letter, retry, pause, stop) is decided by the
//! [`engine`](crate::engine), the same for records and timers and the same as under the test
//! driver; what is written goes through the [`transaction`](crate::transaction); assignment and
//! restore are in [`rebalance`](crate::rebalance).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use futures::FutureExt as _;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use tokio::task::{AbortHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tributary_contracts::codec::Codec;
use tributary_contracts::topics::dlq_topic;
use tributary_telemetry::Health;
use tributary_telemetry::metrics::TopicLabels;

use crate::config::{KafkaConfig, RuntimeConfig};
use crate::engine::{Attempted, Backoff, Completion, Engine, EngineSettings, Record, Work};
use crate::kafka::{TopicKind, client_config, ensure_topics};
use crate::lag::{self, LagTracker};
use crate::processor::{Attempt, Processor};
use crate::rebalance::{RebalanceEvents, RuntimeContext, restore};
use crate::service::BuildContext;
use crate::state::changelog_topic;
use crate::table::FollowedTable;
use crate::transaction::{CALL_TIMEOUT, Committed, Transactions};

/// How often expired idempotency keys are swept.
const EXPIRY_SWEEP_INTERVAL: Duration = Duration::from_secs(60);
/// Most timers one partition fires in one turn of the loop, so that a handler that keeps
/// rescheduling itself into the past cannot hold the loop.
const MAX_TIMERS_PER_TURN: usize = 1_000;
/// Records kept per busy partition before its topics are paused and rewound. 0 for now (a busy
/// partition is paused and rewound at once, and the webhook relays shorten their fetch wait
/// instead, see tributary-outbound): it was switched off while a shutdown hang it was suspected
/// of was looked into; the hang was elsewhere (a SIGTERM while the tables loaded, see
/// `subscribe_and_loop`), and 2,000 (BENCHMARKS.md, "Webhooks") waits for a CI run of its own.
const MAX_BACKLOG: usize = 0;
/// Longest the shutdown waits for attempts in flight before it aborts them (their records are
/// not committed, so the next owner takes them again); half the grace, so that the commit and
/// the goodbye to the group still fit.
const MAX_SHUTDOWN_DRAIN: Duration = Duration::from_secs(10);

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

/// Where one partition is.
#[derive(Debug)]
enum Slot {
    /// Nothing in flight: the next record or due timer starts at once.
    Idle,
    /// An attempt that did not finish at once runs in a task of its own.
    Running { work: Work, attempt: u32, first_at: Option<DateTime<Utc>>, task: AbortHandle, generation: u64 },
    /// A retry's backoff, or a downstream's pause: `work` is attempted again at `until`.
    Waiting { work: Work, attempt: u32, first_at: Option<DateTime<Utc>>, until: Instant },
    /// A bug of ours stopped the partition until the service is fixed and restarted.
    Stopped,
}

/// What a task hands back: its partition, the generation it was started in, its attempt.
type TaskOutcome = (i32, u64, std::thread::Result<Attempted>);

type RuntimeConsumer = StreamConsumer<RuntimeContext>;

/// The metric handles of one input topic.
#[derive(Debug, Clone)]
struct InputMetrics {
    consumed: Counter,
    processing: Histogram,
    end_to_end: Histogram,
}

/// The running loop of one service instance.
pub struct StreamRuntime<P: Processor> {
    engine: Engine<P>,
    settings: StreamSettings,
    health: Health,
    consumer: RuntimeConsumer,
    transactions: Transactions,
    events: Arc<Mutex<RebalanceEvents>>,
    /// Offsets taken into processing, for the consumer lag metric (see [`LagTracker`]).
    lag: Arc<LagTracker>,
    slots: BTreeMap<i32, Slot>,
    tasks: JoinSet<TaskOutcome>,
    /// Bumped whenever work in flight is thrown away (an abort), so that a task finishing
    /// afterwards is not mistaken for the partition's current attempt.
    generation: u64,
    /// Records fetched while their partition was busy, in arrival order: attempted one after
    /// the other as the partition frees, without fetching them again.
    backlog: BTreeMap<i32, VecDeque<Record>>,
    /// Partitions whose backlog is drained next (their attempt finished).
    freed: Vec<i32>,
    /// Input topics paused, by partition, because the partition's backlog was full when their
    /// next record arrived; each was rewound to that record and resumes once the backlog is
    /// drained.
    held: BTreeMap<i32, BTreeSet<String>>,
    input_metrics: HashMap<String, InputMetrics>,
    tables: Vec<Box<dyn FollowedTable>>,
    last_sweep: Instant,
    stopping: bool,
}

impl<P: Processor> std::fmt::Debug for StreamRuntime<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamRuntime").field("service", &self.settings.service).finish_non_exhaustive()
    }
}

impl<P: Processor> StreamRuntime<P> {
    /// Creates the topics the service reads and owns (inputs, outputs, DLQ, changelogs), the
    /// transactional producer and the consumer, and subscribes. Nothing is consumed until
    /// [`run`](Self::run).
    pub async fn new(
        settings: StreamSettings,
        processor: P,
        codec: Codec,
        context: &BuildContext,
    ) -> anyhow::Result<Self> {
        let service = settings.service;
        let kafka = &settings.kafka;
        let outputs: Vec<String> = processor.outputs().iter().map(|t| kafka.topic(t)).collect();
        let engine = Engine::new(
            processor,
            EngineSettings {
                service,
                topic_prefix: kafka.topic_prefix.clone(),
                retry: settings.runtime.retry.clone(),
                backoff: Backoff::Jittered,
            },
            codec.with_topic_prefix(&kafka.topic_prefix),
            context.clock.clone(),
            context.metrics.clone(),
        );
        let inputs = engine.input_topics();
        let changelogs: Vec<String> =
            engine.stores.iter().map(|store| kafka.topic(&changelog_topic(service, store))).collect();
        let dlq = kafka.topic(&dlq_topic(service));
        let mut topics: Vec<(&str, TopicKind)> =
            inputs.iter().chain(&outputs).chain([&dlq]).map(|t| (t.as_str(), TopicKind::Events)).collect();
        topics.extend(changelogs.iter().map(|t| (t.as_str(), TopicKind::Compacted)));
        ensure_topics(kafka, &topics).await.context("creating the service's topics")?;
        let produced: Vec<String> = outputs.iter().chain([&dlq]).chain(&changelogs).cloned().collect();
        context.metrics.declare(&inputs, &produced);

        let prefix = kafka.transactional_id_prefix.clone().unwrap_or_else(|| service.to_owned());
        let transactional_id = format!("{prefix}-{}", settings.instance_id);
        let transactions = Transactions::new(kafka, service, transactional_id, context.metrics.clone()).await?;

        let events = Arc::new(Mutex::new(RebalanceEvents::default()));
        let (producer, txn_open) = transactions.shared();
        let lag = transactions.lag();
        let consumer_context = RuntimeContext {
            producer,
            lag: lag.clone(),
            txn_open,
            events: events.clone(),
            metrics: context.metrics.clone(),
            health: context.health.clone(),
        };
        let group = kafka.group_id.clone().unwrap_or_else(|| service.to_owned());
        let consumer: RuntimeConsumer = client_config(kafka)
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
            .set("session.timeout.ms", kafka.properties.get("session.timeout.ms").map_or("10000", String::as_str))
            .create_with_context(consumer_context)
            .context("creating the consumer")?;
        tracing::info!(service, group, ?inputs, "stream runtime ready to consume");

        Ok(Self {
            engine,
            health: context.health.clone(),
            consumer,
            transactions,
            events,
            lag,
            slots: BTreeMap::new(),
            tasks: JoinSet::new(),
            generation: 0,
            backlog: BTreeMap::new(),
            freed: Vec::new(),
            held: BTreeMap::new(),
            input_metrics: HashMap::new(),
            tables: Vec::new(),
            last_sweep: Instant::now(),
            stopping: false,
            settings,
        })
    }

    /// The committed state of the partitions this instance holds, for queries from outside
    /// the loop (an admin endpoint); see [`StateView`](crate::state::StateView).
    pub fn state_view(&self) -> crate::state::StateView {
        self.engine.view.clone()
    }

    /// Holds `table` for the processor: the runtime follows its topic from the beginning and
    /// processes nothing before it (and every other table) has caught up with what the topic
    /// held at start-up, so that master data published before an event is visible to it.
    pub fn with_table(mut self, table: impl FollowedTable) -> Self {
        self.tables.push(Box::new(table));
        self
    }

    /// Runs until `shutdown` fires; then commits the open transaction and leaves the group.
    pub async fn run(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let tables_stop = shutdown.child_token();
        let mut followers = self.follow_tables(&tables_stop).await?;
        let ready = async {
            self.engine.clock.ready().await;
            for table in &self.tables {
                table.caught_up().await;
            }
        };
        let outcome = tokio::select! {
            () = shutdown.cancelled() => Ok(()),
            Some(stopped) = followers.join_next() => Err(table_stopped(stopped)),
            () = ready => self.subscribe_and_loop(&shutdown, &mut followers).await,
        };
        tables_stop.cancel();
        while let Some(stopped) = followers.join_next().await {
            if let Ok(Err(error)) = stopped {
                tracing::warn!(error = format!("{error:#}"), "a reference table stopped with an error");
            }
        }
        outcome
    }

    /// Joins the group only now that the tables have caught up: a consumer that joined and was
    /// never polled (a SIGTERM while the tables load) blocks its close until the group's
    /// rebalance times out, far beyond the shutdown grace.
    async fn subscribe_and_loop(
        &mut self,
        shutdown: &CancellationToken,
        followers: &mut JoinSet<anyhow::Result<()>>,
    ) -> anyhow::Result<()> {
        let inputs = self.engine.input_topics();
        let subscription: Vec<&str> = inputs.iter().map(String::as_str).collect();
        self.consumer.subscribe(&subscription).context("subscribing")?;
        let ends_stop = shutdown.child_token();
        let ends =
            lag::watch_ends(&self.settings.kafka, self.lag.clone(), self.engine.metrics.clone(), ends_stop.clone())
                .context("creating the client that asks for the partitions' ends")?;
        let outcome = self.run_loop(shutdown, followers).await;
        ends_stop.cancel();
        ends.abort();
        outcome
    }

    async fn follow_tables(&self, stop: &CancellationToken) -> anyhow::Result<JoinSet<anyhow::Result<()>>> {
        let kafka = &self.settings.kafka;
        let topics: Vec<String> = self.tables.iter().map(|t| kafka.topic(t.topic())).collect();
        let wanted: Vec<(&str, TopicKind)> = topics.iter().map(|t| (t.as_str(), TopicKind::Compacted)).collect();
        ensure_topics(kafka, &wanted).await.context("creating the reference topics")?;
        let mut followers = JoinSet::new();
        for table in &self.tables {
            followers.spawn(table.follow(kafka.clone(), (*self.engine.codec).clone(), stop.clone()));
        }
        Ok(followers)
    }

    async fn run_loop(
        &mut self,
        shutdown: &CancellationToken,
        followers: &mut JoinSet<anyhow::Result<()>>,
    ) -> anyhow::Result<()> {
        let mut tick = tokio::time::interval(self.settings.runtime.tick_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut clock_moves = self.engine.clock.moves();
        loop {
            if self.transactions.due(self.settings.runtime.commit_interval, self.settings.runtime.max_batch_records) {
                self.commit().await?;
            }
            self.resume_waiting()?;
            self.drain_freed()?;
            let wait = self.next_wake();
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                Some(finished) = self.tasks.join_next(), if !self.tasks.is_empty() => {
                    // A task that was aborted (revocation, abort) has nothing to say.
                    if let Ok((partition, generation, attempted)) = finished {
                        self.on_finished(partition, generation, attempted)?;
                    }
                }
                Some(stopped) = followers.join_next(), if !followers.is_empty() => return Err(table_stopped(stopped)),
                Ok(()) = clock_moves.changed() => self.fire_due_timers()?,
                _ = tick.tick() => {
                    self.handle_rebalance().await?;
                    self.on_tick()?;
                }
                received = tokio::time::timeout(wait, self.consumer.recv()) => match received {
                    Err(_) => {}
                    Ok(Err(error)) => {
                        self.engine.metrics.error("consume", "consume");
                        tracing::warn!(%error, "consume error");
                    }
                    Ok(Ok(message)) => {
                        let record = record_of(&message);
                        drop(message);
                        self.handle_rebalance().await?;
                        self.on_record(record)?;
                    }
                }
            }
        }
        self.shut_down().await
    }

    /// How long the loop may sleep: until the transaction is due or a wait ends.
    fn next_wake(&self) -> Duration {
        let interval = self.settings.runtime.commit_interval;
        let now = Instant::now();
        let waits = self.slots.values().filter_map(|slot| match slot {
            Slot::Waiting { until, .. } => Some(until.saturating_duration_since(now)),
            _ => None,
        });
        waits.chain(self.transactions.until_due(interval)).fold(interval, Duration::min).max(Duration::from_millis(1))
    }

    /// A record arrived: attempt it if its partition is idle and has no backlog, else queue it
    /// behind the partition's backlog (or, with the backlog full, hold its topic-partition).
    // While MAX_BACKLOG is 0 the backlog arm never matches; kept for when it returns.
    #[allow(clippy::absurd_extreme_comparisons)]
    fn on_record(&mut self, record: Record) -> anyhow::Result<()> {
        let partition = record.partition;
        if self.held.get(&partition).is_some_and(|topics| topics.contains(&record.topic)) {
            // Fetched before the pause took effect: it is read again after the rewind.
            return Ok(());
        }
        let queued = self.backlog.get(&partition).map_or(0, VecDeque::len);
        match self.slots.get(&partition) {
            None => Ok(()), // revoked meanwhile: its new owner reads it
            Some(Slot::Idle) if queued == 0 => {
                self.input_metrics(&record.topic).consumed.inc();
                self.start(partition, Work::Record(Arc::new(record)), 1, None)?;
                self.drive(partition)
            }
            Some(_) if queued < MAX_BACKLOG => {
                self.backlog.entry(partition).or_default().push_back(record);
                Ok(())
            }
            Some(_) => self.hold(&record),
        }
    }

    /// Attempts the backlog of the partitions whose attempt finished, one record after the
    /// other while each stays idle (in a loop, not by recursion: most attempts finish at once).
    fn drain_freed(&mut self) -> anyhow::Result<()> {
        while let Some(partition) = self.freed.pop() {
            if self.stopping {
                self.freed.clear();
                break;
            }
            if !matches!(self.slots.get(&partition), Some(Slot::Idle)) {
                continue;
            }
            match self.backlog.get_mut(&partition).and_then(VecDeque::pop_front) {
                Some(record) => {
                    self.input_metrics(&record.topic).consumed.inc();
                    self.start(partition, Work::Record(Arc::new(record)), 1, None)?;
                }
                None => {
                    if self.backlog.remove(&partition).is_some() || self.held.contains_key(&partition) {
                        self.release(partition)?;
                        self.drive(partition)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Attempts `work` on `partition`: at once if it finishes without waiting, else in a task.
    fn start(
        &mut self,
        partition: i32,
        work: Work,
        attempt: u32,
        first_at: Option<DateTime<Utc>>,
    ) -> anyhow::Result<()> {
        let state = self.engine.partition(partition);
        let started = first_at.unwrap_or_else(|| self.engine.clock.now());
        let first_at = Some(started);
        if let Work::Record(record) = &work {
            self.lag.taken(&record.topic, record.partition, record.offset);
        }
        let numbered = Attempt { number: attempt, first_at: started };
        let mut attempting = self.engine.attempt(&work, &state, numbered);
        // Most attempts never wait (no I/O): finishing them here costs no task and keeps the
        // partition's records in one pass of the loop.
        if let Some(attempted) = AssertUnwindSafe(&mut attempting).catch_unwind().now_or_never() {
            return self.complete(partition, work, attempt, first_at, attempted);
        }
        let generation = self.generation;
        let task = self.tasks.spawn(async move {
            let attempted = AssertUnwindSafe(attempting).catch_unwind().await;
            (partition, generation, attempted)
        });
        self.slots.insert(partition, Slot::Running { work, attempt, first_at, task, generation });
        Ok(())
    }

    /// A task finished: complete its attempt if it is still the partition's current one.
    fn on_finished(
        &mut self,
        partition: i32,
        generation: u64,
        attempted: std::thread::Result<Attempted>,
    ) -> anyhow::Result<()> {
        if !matches!(self.slots.get(&partition), Some(Slot::Running { generation: current, .. }) if *current == generation)
        {
            return Ok(());
        }
        let Some(Slot::Running { work, attempt, first_at, .. }) = self.slots.insert(partition, Slot::Idle) else {
            unreachable!("checked above")
        };
        self.complete(partition, work, attempt, first_at, attempted)?;
        self.drive(partition)
    }

    /// Acts on an attempt's outcome.
    fn complete(
        &mut self,
        partition: i32,
        work: Work,
        attempt: u32,
        first_at: Option<DateTime<Utc>>,
        attempted: std::thread::Result<Attempted>,
    ) -> anyhow::Result<()> {
        let attempted = match attempted {
            Ok(attempted) => attempted,
            Err(panic) => {
                let message = panic_message(&panic);
                self.stop(partition, "panic", &message);
                return Ok(());
            }
        };
        let end_to_end = work.record().map(|record| {
            let metrics = self.input_metrics(&record.topic);
            metrics.processing.observe(attempted.elapsed.as_secs_f64());
            metrics.end_to_end.clone()
        });
        let state = self.engine.partition(partition);
        let first_at = first_at.unwrap_or_else(|| self.engine.clock.now());
        match self.engine.finish(&state, &work, attempted, attempt, first_at) {
            Completion::Done { outputs, dead_letters, occurred_at } => {
                for letter in &dead_letters {
                    self.transactions.write_dead_letter(letter)?;
                }
                self.transactions.write_outputs(outputs)?;
                let end_to_end = end_to_end.zip(occurred_at);
                self.done(partition, &work, end_to_end)
            }
            Completion::Duplicate => self.done(partition, &work, None),
            Completion::DeadLetter(letter, outputs) => {
                self.transactions.write_dead_letter(&letter)?;
                self.transactions.write_outputs(outputs)?;
                self.done(partition, &work, None)
            }
            Completion::Retry { after, attempt, reason } => {
                tracing::info!(partition, attempt, ?after, reason, "retrying after a transient failure");
                self.wait(partition, work, attempt, first_at, after);
                Ok(())
            }
            Completion::Pause { downstream, after, reason } => {
                tracing::warn!(partition, downstream, ?after, reason, "downstream unavailable: partition paused");
                self.wait(partition, work, attempt, first_at, after);
                Ok(())
            }
            Completion::Stop { class, reason } => {
                self.stop(partition, class, &reason);
                Ok(())
            }
        }
    }

    /// `work` is done: a record's offset joins the transaction, and the partition is idle.
    fn done(&mut self, partition: i32, work: &Work, end_to_end: Option<(Histogram, i64)>) -> anyhow::Result<()> {
        match work {
            Work::Record(record) => self.transactions.advance(&record.topic, partition, record.offset, end_to_end)?,
            // A timer's state changes are committed with the transaction.
            Work::Timer(_) => self.transactions.begin()?,
        }
        self.slots.insert(partition, Slot::Idle);
        self.freed.push(partition);
        Ok(())
    }

    fn wait(&mut self, partition: i32, work: Work, attempt: u32, first_at: DateTime<Utc>, after: Duration) {
        let until = Instant::now() + after;
        self.slots.insert(partition, Slot::Waiting { work, attempt, first_at: Some(first_at), until });
    }

    /// A bug of ours: the partition stops where it is; its records wait in Kafka.
    fn stop(&mut self, partition: i32, class: &str, reason: &str) {
        self.engine.partition_stopped(partition, class, reason);
        self.slots.insert(partition, Slot::Stopped);
    }

    /// Fires `partition`'s due timers, in due order, while it is idle.
    fn drive(&mut self, partition: i32) -> anyhow::Result<()> {
        let now_ms = self.engine.clock.now_ms();
        for _ in 0..MAX_TIMERS_PER_TURN {
            if self.stopping || !matches!(self.slots.get(&partition), Some(Slot::Idle)) {
                break;
            }
            match self.engine.due_timer(partition, now_ms) {
                Ok(None) => break,
                Ok(Some(work)) => self.start(partition, work, 1, None)?,
                Err(error) => self.stop(partition, "state", &error.to_string()),
            }
        }
        Ok(())
    }

    fn fire_due_timers(&mut self) -> anyhow::Result<()> {
        let partitions: Vec<i32> = self.slots.keys().copied().collect();
        for partition in partitions {
            self.drive(partition)?;
        }
        Ok(())
    }

    /// Attempts again the work whose wait has ended.
    fn resume_waiting(&mut self) -> anyhow::Result<()> {
        let now = Instant::now();
        let ended: Vec<i32> = self
            .slots
            .iter()
            .filter(|(_, slot)| matches!(slot, Slot::Waiting { until, .. } if *until <= now))
            .map(|(partition, _)| *partition)
            .collect();
        for partition in ended {
            if let Some(Slot::Waiting { work, attempt, first_at, .. }) = self.slots.insert(partition, Slot::Idle) {
                self.start(partition, work, attempt, first_at)?;
                self.drive(partition)?;
            }
        }
        Ok(())
    }

    /// Pauses `record`'s topic-partition and rewinds it to `record`, until its partition is idle.
    fn hold(&mut self, record: &Record) -> anyhow::Result<()> {
        if self.held.entry(record.partition).or_default().insert(record.topic.clone()) {
            let mut partitions = TopicPartitionList::new();
            partitions.add_partition(&record.topic, record.partition);
            self.consumer.pause(&partitions)?;
            self.consumer.seek(&record.topic, record.partition, Offset::Offset(record.offset), CALL_TIMEOUT)?;
        }
        Ok(())
    }

    /// Resumes what [`hold`](Self::hold) paused on `partition`.
    fn release(&mut self, partition: i32) -> anyhow::Result<()> {
        if let Some(topics) = self.held.remove(&partition) {
            let mut partitions = TopicPartitionList::new();
            for topic in &topics {
                partitions.add_partition(topic, partition);
            }
            self.consumer.resume(&partitions)?;
        }
        Ok(())
    }

    fn on_tick(&mut self) -> anyhow::Result<()> {
        self.resume_waiting()?;
        self.fire_due_timers()?;
        if self.last_sweep.elapsed() >= EXPIRY_SWEEP_INTERVAL {
            self.last_sweep = Instant::now();
            if self.engine.expire_idempotency_keys(self.settings.runtime.idempotency_window) {
                self.transactions.begin()?;
            }
        }
        Ok(())
    }

    /// Commits the open transaction; after an abort, reads every owned partition again from its
    /// committed offsets.
    async fn commit(&mut self) -> anyhow::Result<()> {
        let group = self.consumer.group_metadata().context("the consumer has no group metadata")?;
        match self.transactions.commit(&self.engine.partitions, group).await? {
            Committed::Yes => Ok(()),
            Committed::Aborted => self.rewind_to_committed(),
        }
    }

    /// Throws away all work in flight and waiting (it read state the abort dropped) and rewinds
    /// every owned input partition to its committed offset.
    fn rewind_to_committed(&mut self) -> anyhow::Result<()> {
        self.drop_work_in_flight();
        let owned: Vec<i32> = self.slots.keys().copied().collect();
        for partition in owned {
            self.release(partition)?;
        }
        let committed = self.consumer.committed(CALL_TIMEOUT)?;
        for element in committed.elements() {
            if !self.slots.contains_key(&element.partition()) {
                continue;
            }
            let offset = match element.offset() {
                Offset::Offset(offset) => Offset::Offset(offset),
                _ => Offset::Beginning,
            };
            self.consumer.seek(element.topic(), element.partition(), offset, CALL_TIMEOUT)?;
        }
        Ok(())
    }

    fn drop_work_in_flight(&mut self) {
        self.generation += 1;
        // Fetched after the offsets the partitions are read again from.
        self.backlog.clear();
        self.freed.clear();
        self.tasks.abort_all();
        for slot in self.slots.values_mut() {
            if !matches!(slot, Slot::Stopped) {
                *slot = Slot::Idle;
            }
        }
    }

    /// Applies what the rebalance callback recorded: forgets revoked partitions, restores
    /// newly assigned ones, and drops what a transaction aborted on revocation held.
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
            self.transactions.discard();
            for state in self.engine.partitions.values() {
                state.abort();
            }
            self.drop_work_in_flight();
        }
        for partition in revoked.difference(&assigned) {
            self.forget(*partition);
        }
        let to_restore: Vec<i32> =
            assigned.iter().copied().filter(|p| !self.slots.contains_key(p) || revoked.contains(p)).collect();
        if !to_restore.is_empty() {
            self.health.set_ready(false);
            let mut states = Vec::with_capacity(to_restore.len());
            for &partition in &to_restore {
                self.forget(partition);
                states.push(self.engine.partition(partition));
            }
            let settings = &self.settings;
            restore(&settings.kafka, settings.service, &self.engine.stores, &states, &self.engine.metrics).await?;
            for state in states {
                self.engine.view.insert(state);
            }
            for partition in to_restore {
                self.slots.insert(partition, Slot::Idle);
            }
        }
        if joined && !self.health.is_ready() && self.events.lock().expect("rebalance lock").assigned.is_empty() {
            self.health.set_ready(true);
        }
        Ok(())
    }

    /// Forgets a partition this instance no longer owns (or is about to restore).
    fn forget(&mut self, partition: i32) {
        if let Some(Slot::Running { task, .. }) = self.slots.remove(&partition) {
            task.abort();
        }
        self.engine.partitions.remove(&partition);
        self.engine.view.remove(partition);
        self.engine.forget_sweep(partition);
        self.backlog.remove(&partition);
        self.held.remove(&partition);
    }

    async fn shut_down(&mut self) -> anyhow::Result<()> {
        self.stopping = true;
        let drain = (self.settings.runtime.shutdown_grace / 2).min(MAX_SHUTDOWN_DRAIN);
        tracing::info!(in_flight = self.tasks.len(), ?drain, "stopping: finishing attempts in flight, then committing");
        let deadline = tokio::time::Instant::now() + drain;
        while !self.tasks.is_empty() {
            tokio::select! {
                finished = self.tasks.join_next() => {
                    if let Some(Ok((partition, generation, attempted))) = finished {
                        self.on_finished(partition, generation, attempted)?;
                    }
                }
                () = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(in_flight = self.tasks.len(), "attempts still in flight at shutdown are abandoned; their records are read again");
                    self.drop_work_in_flight();
                    break;
                }
            }
        }
        self.handle_rebalance().await?;
        self.commit().await?;
        self.health.set_ready(false);
        self.consumer.unsubscribe();
        self.transactions.flush().await
    }

    /// The metric handles of input `topic`.
    fn input_metrics(&mut self, topic: &str) -> &InputMetrics {
        if !self.input_metrics.contains_key(topic) {
            let metrics = &self.engine.metrics;
            let labels = TopicLabels { topic: topic.to_owned() };
            let handles = InputMetrics {
                consumed: metrics.records_consumed.get_or_create(&labels).clone(),
                processing: metrics.processing_seconds.get_or_create(&labels).clone(),
                end_to_end: metrics.end_to_end_seconds.get_or_create(&labels).clone(),
            };
            self.input_metrics.insert(topic.to_owned(), handles);
        }
        &self.input_metrics[topic]
    }
}

/// The record of a consumed message, copied out of librdkafka's buffer once.
fn record_of(message: &BorrowedMessage<'_>) -> Record {
    let headers = message
        .headers()
        .map(|headers| headers.iter().map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec))).collect())
        .unwrap_or_default();
    Record {
        topic: message.topic().to_owned(),
        partition: message.partition(),
        offset: message.offset(),
        key: message.key().map(<[u8]>::to_vec),
        payload: message.payload().map(<[u8]>::to_vec),
        headers,
    }
}

fn table_stopped(stopped: Result<anyhow::Result<()>, tokio::task::JoinError>) -> anyhow::Error {
    match stopped {
        Ok(Ok(())) => anyhow::anyhow!("a reference table stopped following its topic"),
        Ok(Err(error)) => error.context("following a reference table"),
        Err(panicked) => anyhow::Error::from(panicked).context("a reference table task panicked"),
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}
