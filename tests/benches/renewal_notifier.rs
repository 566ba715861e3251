//! Benchmark: renewal-notifier's schedules and milestones with 100,000 contracts, on the
//! runtime's test driver (the service's logic and state structures, no broker: what is
//! measured is the evaluation, not Kafka's transactions, which the other benchmarks measure).
//!
//! Run with `make bench`, or alone with `cargo bench -p tributary-tests --bench renewal_notifier`.
//!
//! - Sweep: 100,000 contracts in the table (3 partitions), each with renewal activity on its
//!   account (an open case), swept once: each contract's schedule evaluated and its milestone
//!   timer set. Evaluations per second.
//! - Milestones: the clock moved to the 90-day milestone of all of them: 100,000 timers fire,
//!   each assessing the account's risk and writing a notification. Notifications per second.
//! - Memory: the resident set of the process above what it held before the contracts were
//!   published (the table, the account views, the timers), in a child process of its own.

mod common;

use std::time::Instant;

use chrono::{DateTime, Utc};
use renewal_notifier::processor::{NotifierMetrics, RenewalProcessor};
use renewal_notifier::{MasterData, Settings};
use tributary_contracts::fixtures;
use tributary_contracts::types::{
    CaseAction, CasePriority, CaseSeverity, CaseStatus, Envelope, RenewalNotification, SupportCase,
};
use tributary_runtime::testing::DriverBuilder;

use common::{memory, reset_peak};

const CONTRACTS: usize = 100_000;
const PARTITIONS: i32 = 3;

fn at(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text).unwrap().to_utc()
}

/// Prints "<sweep evaluations/s> <notifications/s> <rss before> <rss after> <peak>".
async fn run() {
    let start = at("2026-09-01T00:00:00Z");
    reset_peak();
    let (before, _) = memory();
    let master = MasterData::new(PARTITIONS);
    let renewal = ((at("2026-12-31T00:00:00Z").timestamp_millis()) / 86_400_000) as i32;
    let processor = RenewalProcessor::new(master.clone(), Settings::default(), NotifierMetrics::default());
    let mut driver =
        DriverBuilder::new().service("renewal-notifier").partitions(PARTITIONS).start_at(start).build(processor);
    let accounts: Vec<String> = (0..CONTRACTS).map(|i| format!("acct-{i:07}")).collect();
    for account in &accounts {
        let mut contract = fixtures::contract(account, "plan", "EUR", "api_calls", "1000", at("2026-01-01T00:00:00Z"));
        contract.renewal_date = renewal;
        master.contracts.apply(&contract.contract_id.clone(), Some(contract));
    }
    // The first sweeps of the three partitions: every schedule evaluated, every timer set.
    let swept = Instant::now();
    driver.advance(std::time::Duration::from_secs(1)).await;
    let sweep_rate = CONTRACTS as f64 / swept.elapsed().as_secs_f64();
    assert_eq!(driver.timers().iter().filter(|(_, key, _)| key.starts_with("renewal/")).count(), CONTRACTS);
    // Something to assess: an open case per account.
    for (i, account) in accounts.iter().enumerate() {
        let case = SupportCase {
            envelope: Envelope::originating("zendesk", account, start),
            case_id: format!("case-{i}"),
            action: CaseAction::Opened,
            severity: CaseSeverity::Sev2,
            priority: CasePriority::Normal,
            status: CaseStatus::Open,
            subject: "Slow exports".into(),
            opened_at: start.timestamp_millis(),
            closed_at: None,
            contract_id: None,
            url: None,
            tags: vec![],
        };
        driver.pipe(case).await;
    }

    let fired = Instant::now();
    driver.advance_to(at("2026-10-02T00:00:00Z")).await;
    let notifications = driver.read::<RenewalNotification>().await;
    let fire_rate = CONTRACTS as f64 / fired.elapsed().as_secs_f64();
    assert_eq!(notifications.len(), CONTRACTS, "one 90-day notification per contract");
    let (after, peak) = memory();
    println!("{sweep_rate} {fire_rate} {before} {after} {peak}");
}

#[tokio::main]
async fn main() {
    if std::env::var_os("BENCH_CHILD").is_some() {
        run().await;
        return;
    }
    println!("renewal-notifier benchmark: {CONTRACTS} contracts, {PARTITIONS} partitions, on the test driver\n");
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .env("BENCH_CHILD", "1")
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap();
    assert!(output.status.success(), "benchmark child failed");
    let numbers: Vec<f64> =
        String::from_utf8(output.stdout).unwrap().split_whitespace().filter_map(|n| n.parse().ok()).collect();
    let (sweep, fire, before, after, peak) = (numbers[0], numbers[1], numbers[2], numbers[3], numbers[4]);
    let mib = |bytes: f64| bytes / (1024.0 * 1024.0);
    println!("| measurement | per second |");
    println!("| --- | ---: |");
    println!("| schedule evaluations by the sweep (timer set) | {sweep:.0} |");
    println!("| 90-day milestones fired: risk assessed, notification written | {fire:.0} |");
    println!();
    println!("| memory, {CONTRACTS} contracts scheduled | RSS before | RSS after | growth | per contract | peak RSS |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    let growth = (after - before).max(0.0);
    println!(
        "| table, account views (one open case each), timers | {:.0} MiB | {:.0} MiB | {:.0} MiB | {:.0} bytes | {:.0} MiB |",
        mib(before),
        mib(after),
        mib(growth),
        growth / CONTRACTS as f64,
        mib(peak)
    );
}
