//! Benchmark: the stream runtime (exactly-once, identity processor) against a plain rdkafka
//! consume → produce loop without transactions, measured in the same run on the same broker.
//!
//! Run with `make bench` (which starts the local stack). For each pipeline:
//! - throughput: a backlog of `BACKLOG` usage events is preloaded, the pipeline started, and
//!   the time measured until a `read_committed` reader has seen every output;
//! - latency: events are produced at `RATE` per second for `LATENCY_SECONDS`, each stamped with
//!   its production time in the envelope; the reader records the time from stamp to receipt.
//!
//! The runtime decodes and re-encodes every record through the registry (Avro), keeps an
//! idempotency key per record and commits every 100 ms; the baseline copies bytes. The
//! difference is the price of the guarantees, which BENCHMARKS.md reports.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use prometheus_client::registry::Registry;
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use tokio_util::sync::CancellationToken;
use tributary_contracts::Contract;
use tributary_contracts::codec::{Codec, Location};
use tributary_contracts::types::UsageEvent;
use tributary_runtime::kafka::{TopicKind, client_config, ensure_topics};
use tributary_runtime::stream::producer_config;
use tributary_runtime::{Context, Output, ProcessError, Processor, StreamRuntime, StreamSettings};
use tributary_telemetry::{Health, ServiceMetrics};
use tributary_tests::kafka::{codec, usage_event};
use tributary_tests::{Stack, stack, unique_name};

const BACKLOG: usize = 50_000;
const RATE: u64 = 1_000;
const LATENCY_SECONDS: u64 = 15;
const OUTPUT: &str = "bench.identity-out";

/// Re-emits every input unchanged to [`OUTPUT`].
#[derive(Debug)]
struct Identity;

impl Processor for Identity {
    type Input = UsageEvent;

    async fn process(&mut self, context: &mut Context<'_>, input: &UsageEvent) -> Result<(), ProcessError> {
        context.emit(Output { topic: OUTPUT, key: input.envelope.account_id.clone(), value: Box::new(input.clone()) });
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pipeline {
    Baseline,
    Runtime,
}

struct World {
    stack: &'static Stack,
    prefix: String,
    codec: Codec,
}

impl World {
    async fn new(stack: &'static Stack) -> Self {
        let prefix = format!("{}.", unique_name("bench"));
        let world = Self { stack, codec: codec(stack, &prefix), prefix };
        let (input, output) = (world.input(), world.output());
        let mut kafka = stack.kafka();
        kafka.partitions = 3;
        ensure_topics(&kafka, &[(&input, TopicKind::Events), (&output, TopicKind::Events)]).await.unwrap();
        world
    }
    fn input(&self) -> String {
        format!("{}{}", self.prefix, UsageEvent::TOPIC)
    }
    fn output(&self) -> String {
        format!("{}{OUTPUT}", self.prefix)
    }
}

fn raw_producer(stack: &Stack) -> ThreadedProducer<DefaultProducerContext> {
    producer_config(&stack.kafka()).set("acks", "all").set("linger.ms", "5").create().unwrap()
}

async fn encoded_events(codec: &Codec, count: usize) -> Vec<(String, Vec<u8>)> {
    let mut events = Vec::with_capacity(count);
    for i in 0..count {
        let event = usage_event(&format!("acct-{}", i % 500));
        events.push((event.envelope.account_id.clone(), codec.encode(&event).await.unwrap()));
    }
    events
}

fn send_all(producer: &ThreadedProducer<DefaultProducerContext>, topic: &str, events: &[(String, Vec<u8>)]) {
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
async fn start(world: &World, pipeline: Pipeline) -> (CancellationToken, tokio::task::JoinHandle<()>) {
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
            let mut registry = Registry::default();
            let metrics = ServiceMetrics::register(&mut registry, "bench-identity");
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
            let runtime = StreamRuntime::new(settings, Identity, codec, metrics, Health::new()).await.unwrap();
            let stop = stop.clone();
            tokio::spawn(async move { runtime.run(stop).await.unwrap() })
        }
    };
    (stop, task)
}

/// Reads outputs `read_committed` until `count` have arrived; returns the receipt latencies
/// (from the envelope's `occurred_at`) and the instant the last one arrived.
async fn read_outputs(world: &World, count: usize) -> (Vec<Duration>, Instant) {
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
    while latencies.len() < count {
        let message = tokio::time::timeout(Duration::from_secs(120), consumer.recv())
            .await
            .expect("outputs stopped arriving")
            .unwrap();
        let received = Utc::now().timestamp_millis();
        let at = Location::new(UsageEvent::TOPIC, message.partition(), message.offset());
        let event: UsageEvent = world.codec.decode(&at, message.payload().unwrap()).await.unwrap();
        latencies.push(Duration::from_millis((received - event.envelope.occurred_at).max(0) as u64));
    }
    (latencies, Instant::now())
}

async fn throughput(stack: &'static Stack, pipeline: Pipeline) -> f64 {
    let world = World::new(stack).await;
    let events = encoded_events(&world.codec, BACKLOG).await;
    let producer = raw_producer(stack);
    send_all(&producer, &world.input(), &events);
    let reader = read_outputs(&world, BACKLOG);
    let started = Instant::now();
    let (stop, task) = start(&world, pipeline).await;
    let (_, finished) = reader.await;
    stop.cancel();
    task.await.unwrap();
    BACKLOG as f64 / finished.duration_since(started).as_secs_f64()
}

async fn latency(stack: &'static Stack, pipeline: Pipeline) -> (Duration, Duration) {
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
    let (mut latencies, _) = read_outputs(&world, total).await;
    generator.await.unwrap();
    stop.cancel();
    task.await.unwrap();
    latencies.sort_unstable();
    let pick = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    (pick(0.50), pick(0.99))
}

#[tokio::main]
async fn main() {
    // As in production: spans (and trace propagation) on, log lines at warn.
    let _telemetry = tributary_telemetry::logging::init(
        "bench",
        &tributary_telemetry::LoggingConfig { filter: "warn".into(), ..Default::default() },
    )
    .unwrap();
    let stack = stack();
    println!("Runtime benchmark: identity processor, exactly-once, commit interval 100 ms, 3 partitions");
    println!("backlog {BACKLOG} records for throughput; {RATE} records/s for {LATENCY_SECONDS} s for latency\n");
    // BENCH_ONLY=runtime-throughput runs one measurement alone, for profiling.
    let only = std::env::var("BENCH_ONLY").ok();
    if only.as_deref() == Some("runtime-throughput") {
        println!("runtime throughput: {:.0} records/s", throughput(stack, Pipeline::Runtime).await);
        return;
    }
    if only.as_deref() == Some("runtime-latency") {
        println!("runtime latency (p50, p99): {:?}", latency(stack, Pipeline::Runtime).await);
        return;
    }
    let mut rows = Vec::new();
    for pipeline in [Pipeline::Baseline, Pipeline::Runtime] {
        let rps = throughput(stack, pipeline).await;
        let (p50, p99) = latency(stack, pipeline).await;
        eprintln!("{pipeline:?}: {rps:.0} records/s, p50 {p50:?}, p99 {p99:?}");
        rows.push((pipeline, rps, p50, p99));
    }
    let baseline = rows[0].1;
    println!("| pipeline | records/s | vs baseline | p50 latency | p99 latency |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for (pipeline, rps, p50, p99) in rows {
        let name = match pipeline {
            Pipeline::Baseline => "baseline: plain consume → produce, no transactions",
            Pipeline::Runtime => "tributary runtime: identity processor, exactly-once",
        };
        println!(
            "| {name} | {rps:.0} | {:.0}% | {} ms | {} ms |",
            100.0 * rps / baseline,
            p50.as_millis(),
            p99.as_millis()
        );
    }
}
