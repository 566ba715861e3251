//! Benchmark: usage-ingest, beside the stream runtime's identity pipeline measured in the same
//! run on the same broker.
//!
//! Run with `make bench` (which starts the local stack), or alone with
//! `deploy/local/with-stack.sh cargo bench -p tributary-tests --bench usage_ingest`.
//!
//! - Kafka path: `BACKLOG` usage events preloaded into `usage.events` (the identity benchmark's
//!   records: 500 accounts, explicit quantity), then the time until the service's consumer
//!   group has committed the end of every partition, i.e. until every event is folded into the
//!   totals and the transaction holding them is committed.
//! - HTTP: `BACKLOG` events POSTed to `/v1/events` in batches of `BATCH` by `CLIENTS`
//!   concurrent clients, with the service consuming at the same time; the time until the last
//!   202. Beside it, the same events written straight to Kafka by one idempotent producer.
//! - Memory: one event for each of `ACCOUNTS` distinct accounts, processed to the end; the peak
//!   resident set of a process that runs nothing but the pipeline, above what it held just
//!   before the pipeline started. Each memory figure comes from its own child process, so
//!   that memory freed by an earlier phase cannot hide growth in a later one.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use tributary_contracts::codec::Codec;
use tributary_contracts::topics;
use tributary_runtime::kafka::{TopicKind, ensure_topics};
use tributary_runtime::service::{RunningService, spawn};
use tributary_tests::kafka::{codec, usage_event};
use tributary_tests::{Stack, stack, unique_name};
use usage_ingest::meters::{Aggregation, MeterDefinition};
use usage_ingest::{App, Settings};

use common::{BACKLOG, Pipeline, encoded_events, memory, raw_producer, reset_peak, send_all};

const BATCH: usize = 100;
const CLIENTS: usize = 4;
const ACCOUNTS: usize = 100_000;
const API_KEY: &str = "bench-key-0123456789abcdef";

struct Ingest {
    stack: &'static Stack,
    prefix: String,
    group: String,
    codec: Codec,
}

impl Ingest {
    async fn new(stack: &'static Stack) -> Self {
        let prefix = format!("{}.", unique_name("bench-ui"));
        let world = Self { stack, codec: codec(stack, &prefix), group: unique_name("bench-ui"), prefix };
        let mut kafka = stack.kafka();
        kafka.partitions = 3;
        ensure_topics(&kafka, &[(&world.input(), TopicKind::Events)]).await.unwrap();
        world
    }

    fn input(&self) -> String {
        format!("{}{}", self.prefix, topics::USAGE_EVENTS)
    }

    async fn start(&self, http: bool) -> RunningService {
        let mut config = self.stack.service_config::<Settings>("bench-ui");
        config.kafka.group_id = Some(self.group.clone());
        config.kafka.transactional_id_prefix = Some(self.group.clone());
        config.kafka.topic_prefix = self.prefix.clone();
        config.service.meters = vec![MeterDefinition {
            key: "api_calls".into(),
            event_type: "api.call".into(),
            aggregation: Aggregation::Sum,
            value_property: Some("$.calls".into()),
            unit: "call".into(),
            group_by: BTreeMap::new(),
        }];
        config.service.http.enabled = http;
        config.service.http.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        config.service.http.api_keys = vec![API_KEY.into()];
        spawn::<App>(config).await.unwrap()
    }

    /// Waits until the service's group has committed `expected` records in all.
    async fn wait_until_committed(&self, expected: i64) {
        common::wait_until_committed(self.stack, &self.group, &self.input(), expected).await;
    }
}

async fn kafka_path(stack: &'static Stack) -> f64 {
    let world = Ingest::new(stack).await;
    let events = encoded_events(&world.codec, BACKLOG).await;
    send_all(&raw_producer(stack), &world.input(), &events);
    let started = Instant::now();
    let service = world.start(false).await;
    world.wait_until_committed(BACKLOG as i64).await;
    let elapsed = started.elapsed();
    service.stop().await.unwrap();
    BACKLOG as f64 / elapsed.as_secs_f64()
}

fn cloud_events(count: usize) -> Vec<serde_json::Value> {
    let now = Utc::now().to_rfc3339();
    (0..count)
        .map(|i| {
            serde_json::json!({
                "specversion": "1.0", "id": format!("http-{i}"), "source": "bench", "type": "api.call",
                "subject": format!("acct-{}", i % 500), "time": now, "data": {"calls": 1},
            })
        })
        .collect()
}

async fn http_path(stack: &'static Stack) -> f64 {
    let world = Ingest::new(stack).await;
    let service = world.start(true).await;
    let bodies: Vec<Vec<u8>> = cloud_events(BACKLOG).chunks(BATCH).map(|c| serde_json::to_vec(c).unwrap()).collect();
    let bodies = Arc::new(std::sync::Mutex::new(bodies));
    let client = reqwest::Client::new();
    let url = format!("http://{}/v1/events", service.address("http").expect("the HTTP endpoint is bound"));
    let started = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (bodies, client, url) = (bodies.clone(), client.clone(), url.clone());
            tokio::spawn(async move {
                loop {
                    let Some(body) = bodies.lock().unwrap().pop() else { break };
                    let response = client
                        .post(&url)
                        .bearer_auth(API_KEY)
                        .header("content-type", "application/cloudevents-batch+json")
                        .body(body)
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(response.status().as_u16(), 202);
                }
            })
        })
        .collect();
    for client in clients {
        client.await.unwrap();
    }
    let elapsed = started.elapsed();
    service.stop().await.unwrap();
    BACKLOG as f64 / elapsed.as_secs_f64()
}

async fn direct_produce(stack: &'static Stack) -> f64 {
    let world = Ingest::new(stack).await;
    let events = encoded_events(&world.codec, BACKLOG).await;
    let producer = common::raw_producer(stack);
    let started = Instant::now();
    send_all(&producer, &world.input(), &events);
    BACKLOG as f64 / started.elapsed().as_secs_f64()
}

async fn distinct_account_events(codec: &Codec) -> Vec<(String, Vec<u8>)> {
    let mut events = Vec::with_capacity(ACCOUNTS);
    for i in 0..ACCOUNTS {
        let event = usage_event(&format!("acct-{i:06}"));
        events.push((event.envelope.account_id.clone(), codec.encode(&event).await.unwrap()));
    }
    events
}

/// Child process: processes one event for each of `ACCOUNTS` accounts with `pipeline` and
/// prints "<rss before> <peak rss> <rss at the end>".
async fn memory_child(stack: &'static Stack, pipeline: &str) {
    if pipeline == "identity" {
        let world = common::World::new(stack).await;
        send_all(&raw_producer(stack), &world.input(), &distinct_account_events(&world.codec).await);
        reset_peak();
        let (before, _) = memory();
        let (stop, task) = common::start(&world, Pipeline::Runtime).await;
        common::read_outputs(&world, ACCOUNTS).await;
        let (held, peak) = memory();
        stop.cancel();
        task.await.unwrap();
        println!("{before} {peak} {held}");
    } else {
        let world = Ingest::new(stack).await;
        send_all(&raw_producer(stack), &world.input(), &distinct_account_events(&world.codec).await);
        reset_peak();
        let (before, _) = memory();
        let service = world.start(false).await;
        world.wait_until_committed(ACCOUNTS as i64).await;
        // Let the flush timers write the running totals: part of the work, and of the peak.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (held, peak) = memory();
        service.stop().await.unwrap();
        println!("{before} {peak} {held}");
    }
}

fn run_memory_child(pipeline: &str) -> (u64, u64, u64) {
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .env("BENCH_MEMORY_CHILD", pipeline)
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap();
    assert!(output.status.success(), "memory child {pipeline} failed");
    let text = String::from_utf8(output.stdout).unwrap();
    let numbers: Vec<u64> = text.split_whitespace().filter_map(|n| n.parse().ok()).collect();
    (numbers[0], numbers[1], numbers[2])
}

#[tokio::main]
async fn main() {
    let _telemetry = common::telemetry();
    let stack = stack();
    if let Ok(pipeline) = std::env::var("BENCH_MEMORY_CHILD") {
        memory_child(stack, &pipeline).await;
        return;
    }
    println!("usage-ingest benchmark: {BACKLOG} events, 3 partitions, commit interval 100 ms\n");
    // Both sides include start-up (the Kafka path is timed from the service's start too).
    let identity = common::throughput(stack, Pipeline::Runtime).await.overall;
    eprintln!("identity runtime: {identity:.0} events/s");
    let kafka = kafka_path(stack).await;
    eprintln!("usage-ingest, Kafka path: {kafka:.0} events/s");
    let direct = direct_produce(stack).await;
    eprintln!("direct idempotent produce: {direct:.0} events/s");
    let http = http_path(stack).await;
    eprintln!("usage-ingest, HTTP: {http:.0} events/s");
    let identity_memory = run_memory_child("identity");
    let ingest_memory = run_memory_child("usage-ingest");

    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    println!("| measurement | events/s | vs identity runtime |");
    println!("| --- | ---: | ---: |");
    println!("| identity runtime (baseline), Kafka → Kafka, exactly-once | {identity:.0} | 100% |");
    println!("| usage-ingest, `usage.events` → totals committed | {kafka:.0} | {:.0}% |", 100.0 * kafka / identity);
    println!(
        "| usage-ingest, `POST /v1/events`, batches of {BATCH}, {CLIENTS} clients | {http:.0} | {:.0}% |",
        100.0 * http / identity
    );
    println!(
        "| one idempotent producer straight to Kafka (what HTTP adds to) | {direct:.0} | {:.0}% |",
        100.0 * direct / identity
    );
    println!();
    println!(
        "| memory, {ACCOUNTS} distinct accounts | RSS before | peak RSS | peak growth | per account | RSS held at the end |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for (name, (before, peak, held)) in
        [("identity runtime (baseline)", identity_memory), ("usage-ingest", ingest_memory)]
    {
        let growth = peak.saturating_sub(before);
        println!(
            "| {name} | {:.0} MiB | {:.0} MiB | {:.0} MiB | {} bytes | {:.0} MiB |",
            mib(before),
            mib(peak),
            mib(growth),
            growth / ACCOUNTS as u64,
            mib(held)
        );
    }
}
