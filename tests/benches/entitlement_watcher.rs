//! Benchmark: entitlement-watcher, beside the stream runtime's identity pipeline measured in the
//! same run on the same broker.
//!
//! Run with `make bench` (which starts the local stack), or alone with
//! `deploy/local/with-stack.sh cargo bench -p tributary-tests --bench entitlement_watcher`.
//!
//! - Throughput: master data for `ACCOUNTS` accounts (a customer and a contract each), then
//!   `BACKLOG` payment events preloaded into `billing.payments`: per account, an invoice that
//!   fails and is then paid, again and again, so that every event is a transition (ACTIVE ->
//!   GRACE -> ACTIVE) writing an entitlement change, a support flag and two CRM updates, and
//!   scheduling or cancelling a grace timer; the time from the service's start until its group
//!   has committed every event. The identity runtime is timed the same way (start-up included).
//! - Memory: `STATE_ACCOUNTS` accounts in grace (one failed invoice each, the state a real
//!   account in trouble holds, with its grace timer) held in the runtime's partition state, on
//!   the runtime's test driver in a child process of its own: the same state structures the
//!   service holds in memory, without a broker between (a million payments through Kafka would
//!   take the bench minutes); it includes the runtime's idempotency keys of those payments. The
//!   resident set above what the process held before.

mod common;

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use entitlement_watcher::processor::{ACCOUNTS as ACCOUNT_STORE, EntitlementProcessor, MasterData, WatcherMetrics};
use entitlement_watcher::{App, Settings};
use tributary_contracts::Contract as _;
use tributary_contracts::codec::Codec;
use tributary_contracts::fixtures;
use tributary_contracts::types::{Contract, Customer, Payment, PaymentStatus};
use tributary_runtime::kafka::{TopicKind, ensure_topics};
use tributary_runtime::service::{RunningService, spawn};
use tributary_runtime::testing::{DriverBuilder, Outcome};
use tributary_tests::kafka::{codec, produce_keyed, producer};
use tributary_tests::{Stack, eventually, stack, unique_name};

use common::{Pipeline, memory, reset_peak};

const ACCOUNTS: usize = 2_000;
const BACKLOG: usize = 20_000;
const STATE_ACCOUNTS: usize = 1_000_000;

struct Watcher {
    stack: &'static Stack,
    prefix: String,
    group: String,
    codec: Codec,
}

impl Watcher {
    async fn new(stack: &'static Stack) -> Self {
        let prefix = format!("{}.", unique_name("bench-ew"));
        let world = Self { stack, codec: codec(stack, &prefix), group: unique_name("bench-ew"), prefix };
        let mut kafka = stack.kafka();
        kafka.partitions = 3;
        let topics: Vec<String> =
            [Payment::TOPIC, Customer::TOPIC, Contract::TOPIC].iter().map(|t| world.topic(t)).collect();
        let kinds = [TopicKind::Events, TopicKind::Compacted, TopicKind::Compacted];
        let wanted: Vec<(&str, TopicKind)> = topics.iter().map(String::as_str).zip(kinds).collect();
        ensure_topics(&kafka, &wanted).await.unwrap();
        world
    }

    fn topic(&self, topic: &str) -> String {
        format!("{}{topic}", self.prefix)
    }

    async fn publish<T: tributary_contracts::Contract>(&self, records: Vec<(String, T)>) {
        produce_keyed(&producer(self.stack), &self.codec, &self.topic(T::TOPIC), &records).await;
    }

    async fn start(&self) -> RunningService {
        let mut config = self.stack.service_config::<Settings>("bench-ew");
        config.kafka.group_id = Some(self.group.clone());
        config.kafka.transactional_id_prefix = Some(self.group.clone());
        config.kafka.topic_prefix = self.prefix.clone();
        let service = spawn::<App>(config).await.unwrap();
        let ready = format!("http://{}/health/ready", service.admin_addr);
        eventually(Duration::from_secs(300), "entitlement-watcher ready", || async {
            reqwest::get(&ready).await.ok().filter(|r| r.status().is_success())
        })
        .await;
        service
    }
}

fn account(i: usize) -> String {
    format!("acct-{i:07}")
}

/// Per account, invoice n fails (event 2n) and is paid (event 2n + 1), a second apart.
fn payments(start: DateTime<Utc>) -> Vec<(String, Payment)> {
    (0..BACKLOG)
        .map(|i| {
            let (who, step) = (i % ACCOUNTS, i / ACCOUNTS);
            let invoice = format!("in-{}", step / 2);
            let status = if step % 2 == 0 { PaymentStatus::Failed } else { PaymentStatus::Succeeded };
            let at = start + chrono::Duration::seconds(step as i64);
            let payment = fixtures::payment(&account(who), &invoice, 1, status, "99.90", "EUR", at);
            (account(who), payment)
        })
        .collect()
}

async fn throughput(stack: &'static Stack) -> f64 {
    let world = Watcher::new(stack).await;
    let start = Utc::now() - chrono::Duration::days(40);
    let names: Vec<String> = (0..ACCOUNTS).map(account).collect();
    world
        .publish(
            names.iter().map(|a| fixtures::customer(a, "EUR", start)).map(|c| (c.customer_id.clone(), c)).collect(),
        )
        .await;
    let contracts = names.iter().map(|a| fixtures::contract(a, "plan", "EUR", "api_calls", "1000", start));
    world.publish(contracts.map(|c| (c.contract_id.clone(), c)).collect()).await;
    world.publish(payments(Utc::now())).await;
    let started = Instant::now();
    let service = world.start().await;
    common::wait_until_committed(stack, &world.group, &world.topic(Payment::TOPIC), BACKLOG as i64).await;
    let elapsed = started.elapsed();
    service.stop().await.unwrap();
    BACKLOG as f64 / elapsed.as_secs_f64()
}

/// Child process: `STATE_ACCOUNTS` accounts put in grace on the test driver; prints
/// "<rss before> <rss after> <peak rss>".
async fn memory_child() {
    let master = MasterData::default();
    let start = Utc::now();
    let processor = EntitlementProcessor::new(master, Settings::default(), WatcherMetrics::default());
    let mut driver = DriverBuilder::new().service("entitlement-watcher").partitions(3).start_at(start).build(processor);
    reset_peak();
    let (before, _) = memory();
    for i in 0..STATE_ACCOUNTS {
        let payment = fixtures::payment(&account(i), "in-1", 1, PaymentStatus::Failed, "99.90", "EUR", start);
        assert_eq!(driver.pipe(payment).await, Outcome::Processed);
        if i % 10_000 == 0 {
            // What the service's commits would ship: the outputs do not stay in memory.
            driver.read::<tributary_contracts::types::EntitlementChanged>().await;
            driver.read::<tributary_contracts::types::SupportAccountFlag>().await;
            driver.read::<tributary_contracts::types::CrmAccountUpdate>().await;
        }
    }
    driver.read::<tributary_contracts::types::EntitlementChanged>().await;
    driver.read::<tributary_contracts::types::SupportAccountFlag>().await;
    driver.read::<tributary_contracts::types::CrmAccountUpdate>().await;
    let held = (0..3).map(|p| driver.state(p).map_or(0, |s| s.len(ACCOUNT_STORE.name()))).sum::<usize>();
    assert_eq!(held, STATE_ACCOUNTS, "every account in state");
    let (after, peak) = memory();
    println!("{before} {after} {peak}");
}

#[tokio::main]
async fn main() {
    if std::env::var_os("BENCH_MEMORY_CHILD").is_some() {
        memory_child().await;
        return;
    }
    let _telemetry = common::telemetry();
    let stack = stack();
    println!("entitlement-watcher benchmark: {BACKLOG} payment events, {ACCOUNTS} accounts, 3 partitions\n");
    let identity = common::throughput(stack, Pipeline::Runtime).await.overall;
    eprintln!("identity runtime: {identity:.0} records/s");
    let watcher = throughput(stack).await;
    eprintln!("entitlement-watcher: {watcher:.0} payment events/s");
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .env("BENCH_MEMORY_CHILD", "1")
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap();
    assert!(output.status.success(), "memory child failed");
    let numbers: Vec<u64> =
        String::from_utf8(output.stdout).unwrap().split_whitespace().filter_map(|n| n.parse().ok()).collect();
    let (before, after, peak) = (numbers[0], numbers[1], numbers[2]);
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    println!("| measurement | records/s | vs identity runtime |");
    println!("| --- | ---: | ---: |");
    println!("| identity runtime (baseline), start-up included | {identity:.0} | 100% |");
    println!(
        "| entitlement-watcher: payment events, each a transition with 4 outputs, start-up included | {watcher:.0} | {:.0}% |",
        100.0 * watcher / identity
    );
    println!();
    println!(
        "| memory, {STATE_ACCOUNTS} accounts in grace in state | RSS before | RSS after | growth | per account | peak RSS |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    let growth = after.saturating_sub(before);
    println!(
        "| entitlement-watcher's state on the runtime's test driver | {:.0} MiB | {:.0} MiB | {:.0} MiB | {} bytes | {:.0} MiB |",
        mib(before),
        mib(after),
        mib(growth),
        growth / STATE_ACCOUNTS as u64,
        mib(peak)
    );
}
