//! Benchmark: billing-router, beside the stream runtime's identity pipeline measured in the same
//! run on the same broker.
//!
//! Run with `make bench` (which starts the local stack), or alone with
//! `deploy/local/with-stack.sh cargo bench -p tributary-tests --bench billing_router`.
//!
//! - Throughput: master data for `ACCOUNTS` accounts (a customer and a contract each, one
//!   per-unit plan), then `BACKLOG` threshold crossings preloaded into `usage.thresholds`, each a
//!   new step of its account's period (so each is rated, validated against the three tables and
//!   writes a charge, a posting request and a CRM update); the time from the service's start
//!   until its group has committed every crossing. The identity runtime is timed the same way
//!   (start-up included) on the same number of records.
//! - Memory: `CONTRACTS` contracts and as many customers, and `PLANS` price plans, published,
//!   then the service started; the resident set once its tables have caught up (it is ready),
//!   above what the process held just before, in a child process of its own.

mod common;

use std::time::{Duration, Instant};

use billing_router::{App, Settings};
use chrono::{Datelike, TimeZone, Utc};
use tributary_contracts::Contract as _;
use tributary_contracts::codec::Codec;
use tributary_contracts::fixtures;
use tributary_contracts::types::{Contract, Customer, PricePlan, UsageThresholdCrossed};
use tributary_runtime::kafka::{TopicKind, ensure_topics};
use tributary_runtime::service::{RunningService, spawn};
use tributary_tests::kafka::{codec, produce_keyed, producer};
use tributary_tests::{Stack, eventually, stack, unique_name};

use common::{Pipeline, memory, reset_peak};

const ACCOUNTS: usize = 500;
const BACKLOG: usize = 20_000;
const CONTRACTS: usize = 100_000;
const PLANS: usize = 1_000;
const METER: &str = "api_calls";

struct Router {
    stack: &'static Stack,
    prefix: String,
    group: String,
    codec: Codec,
}

impl Router {
    async fn new(stack: &'static Stack) -> Self {
        let prefix = format!("{}.", unique_name("bench-br"));
        let world = Self { stack, codec: codec(stack, &prefix), group: unique_name("bench-br"), prefix };
        let mut kafka = stack.kafka();
        kafka.partitions = 3;
        let topics: Vec<String> =
            [tributary_contracts::topics::USAGE_THRESHOLDS, Customer::TOPIC, Contract::TOPIC, PricePlan::TOPIC]
                .iter()
                .map(|t| world.topic(t))
                .collect();
        let kinds = [TopicKind::Events, TopicKind::Compacted, TopicKind::Compacted, TopicKind::Compacted];
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

    /// `accounts` customers and contracts, and `plans` price plans (the contracts use the first).
    async fn publish_master_data(&self, accounts: usize, plans: usize) -> Vec<Contract> {
        let start = Utc.with_ymd_and_hms(Utc::now().year(), Utc::now().month(), 1, 0, 0, 0).unwrap()
            - chrono::Duration::days(40);
        let names: Vec<String> = (0..accounts).map(|i| format!("acct-{i:06}")).collect();
        let plans: Vec<(String, PricePlan)> = (0..plans)
            .map(|i| {
                fixtures::price_plan(&format!("plan-{i:04}"), "USD", vec![fixtures::per_unit(METER, "0.10")], start)
            })
            .map(|p| (p.price_plan_id.clone(), p))
            .collect();
        self.publish(plans).await;
        self.publish(
            names.iter().map(|a| fixtures::customer(a, "USD", start)).map(|c| (c.customer_id.clone(), c)).collect(),
        )
        .await;
        let contracts: Vec<Contract> =
            names.iter().map(|a| fixtures::contract(a, "plan-0000", "USD", METER, "1000", start)).collect();
        self.publish(contracts.iter().map(|c| (c.contract_id.clone(), c.clone())).collect()).await;
        contracts
    }

    async fn start(&self) -> RunningService {
        let mut config = self.stack.service_config::<Settings>("bench-br");
        config.kafka.group_id = Some(self.group.clone());
        config.kafka.transactional_id_prefix = Some(self.group.clone());
        config.kafka.topic_prefix = self.prefix.clone();
        let service = spawn::<App>(config).await.unwrap();
        let ready = format!("http://{}/health/ready", service.admin_addr);
        eventually(Duration::from_secs(300), "billing-router ready", || async {
            reqwest::get(&ready).await.ok().filter(|r| r.status().is_success())
        })
        .await;
        service
    }
}

/// `BACKLOG` crossings over the accounts of `contracts`: per account, the percents 101, 102, …
/// of this month, each a new step with its own charge.
fn crossings(contracts: &[Contract]) -> Vec<(String, UsageThresholdCrossed)> {
    let now = Utc::now();
    let start = Utc.with_ymd_and_hms(now.year(), now.month(), 1, 0, 0, 0).unwrap();
    let period = (start, start.checked_add_months(chrono::Months::new(1)).unwrap());
    (0..BACKLOG)
        .map(|i| {
            let contract = &contracts[i % contracts.len()];
            let step = (i / contracts.len()) as i32 + 101;
            let used = (step * 10).to_string();
            (contract.envelope.account_id.clone(), fixtures::crossing(contract, METER, step, &used, period, now))
        })
        .collect()
}

async fn throughput(stack: &'static Stack) -> f64 {
    let world = Router::new(stack).await;
    let contracts = world.publish_master_data(ACCOUNTS, 1).await;
    world.publish(crossings(&contracts)).await;
    let started = Instant::now();
    let service = world.start().await;
    common::wait_until_committed(
        stack,
        &world.group,
        &world.topic(tributary_contracts::topics::USAGE_THRESHOLDS),
        BACKLOG as i64,
    )
    .await;
    let elapsed = started.elapsed();
    service.stop().await.unwrap();
    BACKLOG as f64 / elapsed.as_secs_f64()
}

/// Child process: publishes the master data, starts the service, prints
/// "<rss before> <rss when ready> <peak rss>".
async fn memory_child(stack: &'static Stack) {
    let world = Router::new(stack).await;
    world.publish_master_data(CONTRACTS, PLANS).await;
    reset_peak();
    let (before, _) = memory();
    let service = world.start().await;
    let (held, peak) = memory();
    service.stop().await.unwrap();
    println!("{before} {held} {peak}");
}

#[tokio::main]
async fn main() {
    let _telemetry = common::telemetry();
    let stack = stack();
    if std::env::var_os("BENCH_MEMORY_CHILD").is_some() {
        memory_child(stack).await;
        return;
    }
    println!("billing-router benchmark: {BACKLOG} threshold crossings, {ACCOUNTS} accounts, 3 partitions\n");
    let identity = common::throughput(stack, Pipeline::Runtime).await.overall;
    eprintln!("identity runtime: {identity:.0} records/s");
    let router = throughput(stack).await;
    eprintln!("billing-router: {router:.0} crossings/s");
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .env("BENCH_MEMORY_CHILD", "1")
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap();
    assert!(output.status.success(), "memory child failed");
    let numbers: Vec<u64> =
        String::from_utf8(output.stdout).unwrap().split_whitespace().filter_map(|n| n.parse().ok()).collect();
    let (before, held, peak) = (numbers[0], numbers[1], numbers[2]);
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    println!("| measurement | records/s | vs identity runtime |");
    println!("| --- | ---: | ---: |");
    println!("| identity runtime (baseline), start-up included | {identity:.0} | 100% |");
    println!(
        "| billing-router: crossings rated, validated, 3 outputs each, start-up included | {router:.0} | {:.0}% |",
        100.0 * router / identity
    );
    println!();
    println!(
        "| memory, {CONTRACTS} contracts and customers, {PLANS} price plans | RSS before | RSS when ready | growth | per contract and customer | peak RSS |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    let growth = held.saturating_sub(before);
    println!(
        "| billing-router | {:.0} MiB | {:.0} MiB | {:.0} MiB | {} bytes | {:.0} MiB |",
        mib(before),
        mib(held),
        mib(growth),
        growth / CONTRACTS as u64,
        mib(peak)
    );
}
