//! What the benchmarks share: the identity pipeline on the stream runtime and the plain
//! consume → produce baseline, with their throughput and latency measurements. Each bench
//! binary uses part of it, hence `dead_code` is allowed here.
#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use tokio_util::sync::CancellationToken;
use tributary_contracts::Contract;
use tributary_contracts::codec::{Codec, Location};
use tributary_contracts::types::UsageEvent;
use tributary_runtime::kafka::producer_config;
use tributary_runtime::kafka::{TopicKind, client_config, ensure_topics};
use tributary_runtime::{BuildContext, Clock, Context, Output, ProcessError, Processor, StreamRuntime, StreamSettings};
use tributary_tests::kafka::{codec, usage_event};
use tributary_tests::{Stack, unique_name};

pub(crate) const BACKLOG: usize = 50_000;
pub(crate) const RATE: u64 = 1_000;
pub(crate) const LATENCY_SECONDS: u64 = 15;
pub(crate) const OUTPUT: &str = "bench.identity-out";

/// Re-emits every input unchanged to [`OUTPUT`].
#[derive(Debug)]
pub(crate) struct Identity;

impl Processor for Identity {
    type Input = UsageEvent;

    fn outputs(&self) -> Vec<&'static str> {
        vec![OUTPUT]
    }

    async fn process(&self, context: &mut Context<'_>, input: &UsageEvent) -> Result<(), ProcessError> {
        context.emit(Output { topic: OUTPUT, key: input.envelope.account_id.clone(), value: Box::new(input.clone()) });
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pipeline {
    Baseline,
    Runtime,
}

pub(crate) struct World {
    pub(crate) stack: &'static Stack,
    pub(crate) prefix: String,
    pub(crate) codec: Codec,
}

impl World {
    pub(crate) async fn new(stack: &'static Stack) -> Self {
        let prefix = format!("{}.", unique_name("bench"));
        let world = Self { stack, codec: codec(stack, &prefix), prefix };
        let (input, output) = (world.input(), world.output());
        let mut kafka = stack.kafka();
        kafka.partitions = 3;
        ensure_topics(&kafka, &[(&input, TopicKind::Events), (&output, TopicKind::Events)]).await.unwrap();
        world
    }
    pub(crate) fn input(&self) -> String {
        format!("{}{}", self.prefix, UsageEvent::TOPIC)
    }
    pub(crate) fn output(&self) -> String {
        format!("{}{OUTPUT}", self.prefix)
    }
}

pub(crate) fn raw_producer(stack: &Stack) -> ThreadedProducer<DefaultProducerContext> {
    producer_config(&stack.kafka()).set("acks", "all").set("linger.ms", "5").create().unwrap()
}

pub(crate) async fn encoded_events(codec: &Codec, count: usize) -> Vec<(String, Vec<u8>)> {
    let mut events = Vec::with_capacity(count);
    for i in 0..count {
        let event = usage_event(&format!("acct-{}", i % 500));
        events.push((event.envelope.account_id.clone(), codec.encode(&event).await.unwrap()));
    }
    events
}

pub(crate) fn send_all(producer: &ThreadedProducer<DefaultProducerContext>, topic: &str, events: &[(String, Vec<u8>)]) {
    for (key, payload) in events {
        let mut record = BaseRecord::to(topic).key(key.as_str()).payload(payload.as_slice());
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, returned)) => {
                    record = returned;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(60)).unwrap();
}

/// Starts `pipeline` from the input to the output topic; returns its stop token.
pub(crate) async fn start(world: &World, pipeline: Pipeline) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let stop = CancellationToken::new();
    let group = unique_name("bench-group");
    let task = match pipeline {
        Pipeline::Baseline => {
            let consumer: StreamConsumer = client_config(&world.stack.kafka())
                .set("group.id", &group)
                .set("auto.offset.reset", "earliest")
                .set("enable.auto.commit", "true")
                .create()
                .unwrap();
            consumer.subscribe(&[&world.input()]).unwrap();
            let producer = raw_producer(world.stack);
            let (output, stop) = (world.output(), stop.clone());
            tokio::spawn(async move {
                loop {
                    let message = tokio::select! {
                        () = stop.cancelled() => break,
                        message = consumer.recv() => message.unwrap(),
                    };
                    let mut record = BaseRecord::to(&output).payload(message.payload().unwrap_or_default());
                    if let Some(key) = message.key() {
                        record = record.key(key);
                    }
                    while let Err((_, returned)) = producer.send(record) {
                        record = returned;
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
                producer.flush(Duration::from_secs(30)).unwrap();
            })
        }
        Pipeline::Runtime => {
            let mut kafka = world.stack.kafka();
            kafka.group_id = Some(group.clone());
            kafka.transactional_id_prefix = Some(group);
            kafka.topic_prefix = world.prefix.clone();
            let settings = StreamSettings {
                service: "bench-identity",
                instance_id: "0".into(),
                kafka,
                runtime: tributary_runtime::config::RuntimeConfig::default(),
            };
            let mut context = BuildContext::new("bench-identity", Clock::system());
            let registry = std::mem::take(&mut context.registry);
            if std::env::var("BENCH_ONLY").is_ok() {
                // Profiling: print where the time went when the run stops.
                let registry = Arc::new(registry);
                let stopped = stop.clone();
                tokio::spawn(async move {
                    stopped.cancelled().await;
                    let text = tributary_telemetry::metrics::encode(&registry);
                    for line in text.lines().filter(|l| l.contains("_sum") || l.contains("_count")) {
                        eprintln!("{line}");
                    }
                });
            }
            let codec = codec(world.stack, "");
            let runtime = StreamRuntime::new(settings, Identity, codec, &context).await.unwrap();
            let stop = stop.clone();
            tokio::spawn(async move { runtime.run(stop).await.unwrap() })
        }
    };
    (stop, task)
}

/// What a reader saw: the receipt latency of every output (from the envelope's `occurred_at`)
/// and when the first one, the first tenth and the last one had arrived.
pub(crate) struct Arrivals {
    pub(crate) latencies: Vec<Duration>,
    pub(crate) first: Instant,
    pub(crate) tenth: Instant,
    pub(crate) last: Instant,
}

/// Reads outputs `read_committed` until `count` have arrived.
pub(crate) async fn read_outputs(world: &World, count: usize) -> Arrivals {
    let consumer: StreamConsumer = client_config(&world.stack.kafka())
        .set("group.id", unique_name("bench-reader"))
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        // A short long-poll, so that the reader does not add its own wait to either pipeline.
        .set("fetch.wait.max.ms", "10")
        .create()
        .unwrap();
    consumer.subscribe(&[&world.output()]).unwrap();
    let mut latencies = Vec::with_capacity(count);
    let mut first = None;
    let mut tenth = None;
    while latencies.len() < count {
        let message = tokio::time::timeout(Duration::from_secs(120), consumer.recv())
            .await
            .expect("outputs stopped arriving")
            .unwrap();
        first.get_or_insert_with(Instant::now);
        if latencies.len() == count / 10 {
            tenth.get_or_insert_with(Instant::now);
        }
        let received = Utc::now().timestamp_millis();
        let at = Location::new(UsageEvent::TOPIC, message.partition(), message.offset());
        let event: UsageEvent = world.codec.decode(&at, message.payload().unwrap()).await.unwrap();
        latencies.push(Duration::from_millis((received - event.envelope.occurred_at).max(0) as u64));
    }
    let last = Instant::now();
    Arrivals { latencies, first: first.unwrap_or(last), tenth: tenth.unwrap_or(last), last }
}

/// A throughput measurement over a preloaded backlog.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Throughput {
    /// Records per second from the pipeline's start to the last output: start-up included
    /// (for the runtime: topic checks, `init_transactions`, the group join, state restore).
    pub(crate) overall: f64,
    /// Records per second from the first tenth of the outputs to the last: the pipeline at
    /// work, without the start-up and the first transaction, whose timing varies from run to run.
    pub(crate) steady: f64,
    /// From the pipeline's start to its first output.
    pub(crate) first_output: Duration,
}

pub(crate) async fn throughput(stack: &'static Stack, pipeline: Pipeline) -> Throughput {
    let world = World::new(stack).await;
    let events = encoded_events(&world.codec, BACKLOG).await;
    let producer = raw_producer(stack);
    send_all(&producer, &world.input(), &events);
    let reader = read_outputs(&world, BACKLOG);
    let started = Instant::now();
    let (stop, task) = start(&world, pipeline).await;
    let arrivals = reader.await;
    stop.cancel();
    task.await.unwrap();
    Throughput {
        overall: BACKLOG as f64 / arrivals.last.duration_since(started).as_secs_f64(),
        steady: (BACKLOG - BACKLOG / 10) as f64 / arrivals.last.duration_since(arrivals.tenth).as_secs_f64(),
        first_output: arrivals.first.duration_since(started),
    }
}

pub(crate) async fn latency(stack: &'static Stack, pipeline: Pipeline) -> (Duration, Duration) {
    let world = World::new(stack).await;
    let (stop, task) = start(&world, pipeline).await;
    tokio::time::sleep(Duration::from_secs(3)).await; // joined and assigned
    let total = (RATE * LATENCY_SECONDS) as usize;
    let generating = Arc::new(AtomicBool::new(true));
    let generator = {
        let (codec, topic, generating) = (world.codec.clone(), world.input(), generating.clone());
        tokio::spawn(async move {
            let producer = raw_producer(stack);
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let per_tick = (RATE / 100) as usize;
            let mut sent = 0;
            while sent < total {
                tick.tick().await;
                // Encoded at send time, so that occurred_at is the moment of production.
                let batch = encoded_events(&codec, per_tick).await;
                for (key, payload) in &batch {
                    let mut record = BaseRecord::to(&topic).key(key.as_str()).payload(payload.as_slice());
                    while let Err((_, returned)) = producer.send(record) {
                        record = returned;
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
                sent += per_tick;
            }
            producer.flush(Duration::from_secs(30)).unwrap();
            generating.store(false, Ordering::Release);
        })
    };
    let mut latencies = read_outputs(&world, total).await.latencies;
    generator.await.unwrap();
    stop.cancel();
    task.await.unwrap();
    latencies.sort_unstable();
    let pick = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    (pick(0.50), pick(0.99))
}

/// Telemetry as in production: spans (and trace propagation) on, log lines at warn.
pub(crate) fn telemetry() -> tributary_telemetry::logging::TelemetryGuard {
    tributary_telemetry::logging::init(
        "bench",
        &tributary_telemetry::LoggingConfig { filter: "warn".into(), ..Default::default() },
    )
    .unwrap()
}

/// Resident and peak resident memory of this process, in bytes.
pub(crate) fn memory() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
            .unwrap()
            * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Resets the peak resident set to the current one (Linux `clear_refs`, value 5).
pub(crate) fn reset_peak() {
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
}

/// Waits until consumer group `group` has committed `expected` records in all on the three
/// partitions of `topic`: every record processed and its transaction committed.
pub(crate) async fn wait_until_committed(stack: &Stack, group: &str, topic: &str, expected: i64) {
    use rdkafka::consumer::BaseConsumer;
    use rdkafka::{Offset, TopicPartitionList};
    let consumer: BaseConsumer = client_config(&stack.kafka()).set("group.id", group).create().unwrap();
    let mut partitions = TopicPartitionList::new();
    for partition in 0..3 {
        partitions.add_partition(topic, partition);
    }
    loop {
        let committed = consumer.committed_offsets(partitions.clone(), Duration::from_secs(10)).unwrap();
        let total: i64 =
            committed.elements().iter().map(|e| if let Offset::Offset(o) = e.offset() { o } else { 0 }).sum();
        // Transaction markers take an offset each, so the committed positions exceed the
        // record count once everything is in.
        if total >= expected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
