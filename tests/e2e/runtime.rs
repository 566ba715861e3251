//! The stream runtime's guarantees on the real broker, with the echo test service
//! (`tributary_tests::echo`): one output per input, a running count per account in state.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rand::Rng as _;
use tokio::process::{Child, Command};
use tributary_contracts::codec::Codec;
use tributary_contracts::headers;
use tributary_contracts::types::{UsageEvent, UsageRecorded};
use tributary_runtime::ServiceConfig;
use tributary_runtime::clock::ClockMode;
use tributary_runtime::dlq::{self, ReplayFilter};
use tributary_runtime::kafka::partition_of;
use tributary_runtime::service::{RunningService, spawn};
use tributary_tests::echo::{EchoService, EchoSettings, FOLLOW_UP, INPUT_EVENT, NAME, input_topic, output_topic};
use tributary_tests::kafka::{
    Read, by_account, codec, produce, produce_raw, produce_with_headers, producer, read_to_end, trickle, usage_event,
};
use tributary_tests::{Stack, eventually, stack, unique_name};

/// One test's isolated world: topics under a unique prefix, a unique consumer group.
struct World {
    stack: &'static Stack,
    prefix: String,
    group: String,
    codec: Codec,
}

impl World {
    fn new() -> Self {
        let stack = stack();
        let prefix = format!("{}.", unique_name("rt"));
        Self { stack, codec: codec(stack, &prefix), group: unique_name("echo"), prefix }
    }

    fn config(&self, instance: &str, settings: EchoSettings) -> ServiceConfig<EchoSettings> {
        let mut config = self.stack.service_config::<EchoSettings>("echo");
        config.kafka.group_id = Some(self.group.clone());
        config.kafka.transactional_id_prefix = Some(self.group.clone());
        config.kafka.topic_prefix = self.prefix.clone();
        config.runtime.instance_id = instance.to_owned();
        config.service = settings;
        config
    }

    async fn start(&self, instance: &str, settings: EchoSettings) -> RunningService {
        self.start_on(instance, settings, ClockMode::System).await
    }

    async fn start_on(&self, instance: &str, settings: EchoSettings, clock: ClockMode) -> RunningService {
        let mut config = self.config(instance, settings);
        config.runtime.clock = clock;
        let service = spawn::<EchoService>(config).await.expect("start the echo service");
        let ready = format!("http://{}/health/ready", service.admin_addr);
        eventually(Duration::from_secs(60), "the echo service to be ready", || async {
            reqwest::get(&ready).await.ok().filter(|r| r.status().is_success())
        })
        .await;
        service
    }

    /// The process-level echo service, for tests that kill it.
    fn spawn_process(&self, binary: &std::path::Path, instance: &str) -> Child {
        Command::new(binary)
            .envs(self.stack.service_env())
            .env("TRIBUTARY__KAFKA__TOPIC_PREFIX", &self.prefix)
            .env("TRIBUTARY__KAFKA__GROUP_ID", &self.group)
            .env("TRIBUTARY__KAFKA__TRANSACTIONAL_ID_PREFIX", &self.group)
            .env("TRIBUTARY__RUNTIME__INSTANCE_ID", instance)
            .env("TRIBUTARY__ADMIN__LISTEN", "127.0.0.1:0")
            .env("TRIBUTARY__LOG__FILTER", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start echo-service")
    }

    async fn produce(&self, events: &[UsageEvent]) {
        produce(&producer(self.stack), &self.codec, &input_topic(&self.prefix), events).await;
    }

    async fn outputs(&self) -> Vec<Read<UsageRecorded>> {
        read_to_end(self.stack, &self.codec, &output_topic(&self.prefix)).await
    }

    /// Waits until outputs for `expected` distinct inputs are committed.
    async fn wait_for_outputs(&self, expected: usize, timeout: Duration) {
        eventually(timeout, &format!("{expected} outputs"), || async {
            let distinct: BTreeSet<String> = self.outputs().await.iter().filter_map(input_of).collect();
            (distinct.len() >= expected).then_some(())
        })
        .await;
    }
}

fn input_of(read: &Read<UsageRecorded>) -> Option<String> {
    read.value.as_ref()?.dimensions.get(INPUT_EVENT).cloned()
}

/// Exactly one output per input, and per account the running counts 1..=n in order: nothing
/// lost, nothing doubled, state neither lost nor double-counted.
fn assert_exactly_once(outputs: &[Read<UsageRecorded>], inputs: &[UsageEvent]) {
    let undecodable = outputs.iter().filter(|r| r.value.is_none()).count();
    assert_eq!(undecodable, 0, "every output decodes");
    let mut per_input: BTreeMap<String, usize> = BTreeMap::new();
    for output in outputs {
        *per_input.entry(input_of(output).unwrap()).or_default() += 1;
    }
    let expected: BTreeSet<String> = inputs.iter().map(|e| e.id.clone()).collect();
    let missing: Vec<_> = expected.iter().filter(|id| !per_input.contains_key(*id)).collect();
    let doubled: Vec<_> = per_input.iter().filter(|(_, n)| **n > 1).collect();
    let unexpected: Vec<_> = per_input.keys().filter(|id| !expected.contains(*id)).collect();
    assert!(missing.is_empty(), "{} input(s) without output, e.g. {:?}", missing.len(), missing.first());
    assert!(doubled.is_empty(), "{} input(s) with several outputs, e.g. {:?}", doubled.len(), doubled.first());
    assert!(unexpected.is_empty(), "outputs for unknown inputs: {unexpected:?}");

    let mut sequences: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for output in outputs {
        let value = output.value.as_ref().unwrap();
        sequences.entry(value.envelope.account_id.clone()).or_default().push(value.sequence);
    }
    for (account, mut seen) in sequences {
        seen.sort_unstable();
        let n = seen.len() as i64;
        assert_eq!(seen, (1..=n).collect::<Vec<_>>(), "account {account}: running counts must be 1..={n}");
    }
}

fn events(accounts: usize, per_account: usize) -> Vec<UsageEvent> {
    (0..per_account).flat_map(|_| (0..accounts).map(|a| usage_event(&format!("acct-{a}")))).collect()
}

fn echo_binary() -> std::path::PathBuf {
    tributary_tests::workspace_binary("echo-service")
}

fn signal(child: &Child, signal: Signal) {
    kill(Pid::from_raw(child.id().expect("running") as i32), signal).expect("signal");
}

#[tokio::test]
async fn a_repeated_input_yields_one_output_also_when_it_repeats_after_a_restart() {
    let world = World::new();
    let inputs = events(3, 2);
    let service = world.start("a", EchoSettings::default()).await;
    world.produce(&inputs).await;
    world.produce(&inputs[..2]).await; // the platform retried two events
    world.wait_for_outputs(inputs.len(), Duration::from_secs(60)).await;
    service.stop().await.expect("clean stop");

    let service = world.start("a", EchoSettings::default()).await;
    world.produce(&inputs).await; // every event once more, after the restart
    let late = events(1, 1);
    world.produce(&late).await;
    world.wait_for_outputs(inputs.len() + late.len(), Duration::from_secs(60)).await;
    service.stop().await.expect("clean stop");

    let all: Vec<UsageEvent> = inputs.iter().chain(&late).cloned().collect();
    assert_exactly_once(&world.outputs().await, &all);
}

#[tokio::test]
async fn a_transient_failure_is_retried_and_processed_once() {
    let world = World::new();
    let settings = EchoSettings { flaky_type: Some("flaky".into()), flaky_failures: 2, ..EchoSettings::default() };
    let service = world.start("a", settings).await;
    let mut flaky = usage_event("acct-flaky");
    flaky.r#type = "flaky".into();
    world.produce(std::slice::from_ref(&flaky)).await;
    world.wait_for_outputs(1, Duration::from_secs(60)).await;
    let metrics = reqwest::get(format!("http://{}/metrics", service.admin_addr)).await.unwrap().text().await.unwrap();
    service.stop().await.expect("clean stop");
    assert!(metrics.contains(r#"tributary_retries_total{stage="process"} 2"#), "{metrics}");
    assert_exactly_once(&world.outputs().await, &[flaky]);
    assert!(dlq::list(&world.config("a", EchoSettings::default()).kafka, NAME).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_poison_record_goes_to_the_dlq_and_a_replay_after_the_fix_processes_it_exactly_once() {
    let world = World::new();
    let reject = EchoSettings { reject_type: Some("poison".into()), ..EchoSettings::default() };
    let service = world.start("a", reject).await;
    let before = usage_event("acct-1");
    let mut poison = usage_event("acct-1");
    poison.r#type = "poison".into();
    let after = usage_event("acct-1");
    world.produce(&[before.clone(), poison.clone(), after.clone()]).await;
    // Bytes that are not Avro at all go to the DLQ as well, with a decode error.
    produce_raw(&producer(world.stack), &input_topic(&world.prefix), "acct-1", b"{\"not\": \"avro\"}").await;
    world.wait_for_outputs(2, Duration::from_secs(60)).await;
    service.stop().await.expect("clean stop");

    let kafka = world.config("a", EchoSettings::default()).kafka;
    let letters = dlq::list(&kafka, NAME).await.unwrap();
    assert_eq!(letters.len(), 2, "{letters:?}");
    let poisoned = letters.iter().find(|e| e.letter.as_ref().unwrap().class == "validation").expect("poison");
    let letter = poisoned.letter.as_ref().unwrap();
    assert_eq!(letter.source.topic, input_topic(&world.prefix));
    assert_eq!(letter.attempts, 1);
    assert!(letter.message.contains("poison"), "{letter:?}");
    let headers = poisoned.header_map();
    for name in [headers::DLQ_SOURCE_PARTITION, headers::DLQ_SOURCE_OFFSET, headers::DLQ_FIRST_FAILURE_AT] {
        assert!(headers.contains_key(name), "missing {name}: {headers:?}");
    }
    let garbage = letters.iter().find(|e| e.letter.as_ref().unwrap().class == "decode.wrong_magic_byte");
    assert!(garbage.is_some(), "the non-Avro record is dead-lettered with its decode class: {letters:?}");
    let outputs = world.outputs().await;
    assert_exactly_once(&outputs, &[before.clone(), after.clone()]);

    // The cause is fixed (the service no longer refuses the type) and the record replayed.
    let service = world.start("a", EchoSettings::default()).await;
    let only_poison = ReplayFilter { class: Some("validation".into()), ..ReplayFilter::default() };
    let dry = dlq::replay(&kafka, NAME, &only_poison, None, true).await.unwrap();
    assert_eq!((dry.examined, dry.selected), (2, 1));
    dlq::replay(&kafka, NAME, &only_poison, None, false).await.unwrap();
    world.wait_for_outputs(3, Duration::from_secs(60)).await;
    // A second replay of the same record passes the idempotency keys: nothing new.
    dlq::replay(&kafka, NAME, &only_poison, None, false).await.unwrap();
    let marker = usage_event("acct-2");
    world.produce(std::slice::from_ref(&marker)).await;
    world.wait_for_outputs(4, Duration::from_secs(60)).await;
    service.stop().await.expect("clean stop");
    assert_exactly_once(&world.outputs().await, &[before, poison, after, marker]);
}

#[tokio::test]
async fn two_instances_split_the_partitions_and_one_takes_over_the_others_state() {
    let world = World::new();
    let first = world.start("a", EchoSettings::default()).await;
    let second = world.start("b", EchoSettings::default()).await;
    let phase_one = events(12, 20);
    world.produce(&phase_one).await;
    world.wait_for_outputs(phase_one.len(), Duration::from_secs(90)).await;
    let consumed = |addr| async move {
        let text = reqwest::get(format!("http://{addr}/metrics")).await.unwrap().text().await.unwrap();
        text.lines()
            .filter(|l| l.starts_with("tributary_records_consumed_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let (by_first, by_second) = (consumed(first.admin_addr).await, consumed(second.admin_addr).await);
    assert!(by_first > 0.0 && by_second > 0.0, "both instances worked: {by_first} and {by_second}");

    first.stop().await.expect("clean stop");
    let phase_two = events(12, 20);
    world.produce(&phase_two).await;
    world.wait_for_outputs(phase_one.len() + phase_two.len(), Duration::from_secs(90)).await;
    second.stop().await.expect("clean stop");

    let all: Vec<UsageEvent> = phase_one.into_iter().chain(phase_two).collect();
    assert_exactly_once(&world.outputs().await, &all);
}

#[tokio::test]
async fn outputs_are_exactly_once_when_the_process_is_killed_at_random_moments() {
    let world = World::new();
    let binary = echo_binary();
    let inputs = events(20, 100);
    let feeder = trickle(
        world.stack,
        world.codec.clone(),
        input_topic(&world.prefix),
        by_account(&inputs),
        100,
        Duration::from_millis(150),
    );
    let mut rng = rand::rng();
    for crash in 0..4 {
        let child = world.spawn_process(&binary, "crashy");
        tokio::time::sleep(Duration::from_millis(rng.random_range(1_500..4_000))).await;
        signal(&child, Signal::SIGKILL);
        let status = child.wait_with_output().await.expect("wait");
        assert!(!status.status.success(), "crash {crash}: the process was killed");
    }
    feeder.await.expect("feeder");
    let mut last = world.spawn_process(&binary, "crashy");
    world.wait_for_outputs(inputs.len(), Duration::from_secs(120)).await;
    signal(&last, Signal::SIGTERM);
    let status = tokio::time::timeout(Duration::from_secs(30), last.wait()).await.expect("stops").expect("wait");
    assert_eq!(status.code(), Some(0));
    assert_exactly_once(&world.outputs().await, &inputs);
}

#[tokio::test]
async fn sigterm_during_load_exits_0_and_loses_or_doubles_nothing() {
    let world = World::new();
    let binary = echo_binary();
    let inputs = events(10, 100);
    let mut child = world.spawn_process(&binary, "graceful");
    world.produce(&inputs[..300]).await;
    let feeder = trickle(
        world.stack,
        world.codec.clone(),
        input_topic(&world.prefix),
        by_account(&inputs[300..]),
        50,
        Duration::from_millis(50),
    );
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    signal(&child, Signal::SIGTERM);
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait()).await.expect("stops in grace").unwrap();
    assert_eq!(status.code(), Some(0), "clean exit on SIGTERM under load");
    feeder.await.expect("feeder");

    let mut child = world.spawn_process(&binary, "graceful");
    world.wait_for_outputs(inputs.len(), Duration::from_secs(120)).await;
    signal(&child, Signal::SIGTERM);
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait()).await.expect("stops").unwrap();
    assert_eq!(status.code(), Some(0));
    assert_exactly_once(&world.outputs().await, &inputs);
}

#[tokio::test]
async fn trace_context_and_correlation_id_travel_from_input_to_output() {
    // The services install this at start; the test process does it once for its services.
    let _telemetry = tributary_telemetry::logging::init(
        "runtime-tests",
        &tributary_telemetry::LoggingConfig { filter: "warn".into(), ..Default::default() },
    )
    .unwrap();
    let world = World::new();
    let service = world.start("a", EchoSettings::default()).await;
    let input = usage_event("acct-traced");
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let traceparent = format!("00-{trace_id}-00f067aa0ba902b7-01");
    produce_with_headers(
        &producer(world.stack),
        &world.codec,
        &input_topic(&world.prefix),
        &input,
        &[("traceparent", traceparent.as_str()), (headers::CORRELATION_ID, input.envelope.correlation_id.as_str())],
    )
    .await;
    world.wait_for_outputs(1, Duration::from_secs(60)).await;
    service.stop().await.expect("clean stop");

    let outputs = world.outputs().await;
    let output = &outputs[0];
    let value = output.value.as_ref().unwrap();
    assert_eq!(value.envelope.correlation_id, input.envelope.correlation_id, "same business flow");
    assert_eq!(value.envelope.causation_id.as_deref(), Some(input.envelope.event_id.as_str()));
    assert_eq!(output.headers.get(headers::CORRELATION_ID), Some(&input.envelope.correlation_id));
    assert_eq!(output.headers.get(headers::CE_ID), Some(&value.envelope.event_id));
    assert_eq!(output.headers.get(headers::CE_TYPE).map(String::as_str), Some("io.tributary.usage.UsageRecorded"));
    let out_parent = output.headers.get("traceparent").expect("a traceparent on the output");
    assert!(out_parent.contains(trace_id), "the output continues the input's trace: {out_parent}");
    assert_ne!(out_parent, &traceparent, "under a span of its own");
}

#[tokio::test]
async fn a_timer_survives_a_restart_and_fires_once() {
    let world = World::new();
    let settings = EchoSettings { follow_up_after_ms: Some(4_000), ..EchoSettings::default() };
    let service = world.start("a", settings.clone()).await;
    let input = usage_event("acct-timer");
    world.produce(std::slice::from_ref(&input)).await;
    world.wait_for_outputs(1, Duration::from_secs(60)).await;
    service.stop().await.expect("clean stop, before the timer is due");
    let follow_ups = |outputs: &[Read<UsageRecorded>]| {
        outputs.iter().filter(|r| r.value.as_ref().is_some_and(|v| v.dimensions.contains_key(FOLLOW_UP))).count()
    };
    assert_eq!(follow_ups(&world.outputs().await), 0, "not due yet");

    let service = world.start("a", settings).await;
    eventually(Duration::from_secs(60), "the follow-up after the restart", || async {
        (follow_ups(&world.outputs().await) > 0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await; // a few more ticks: it must not fire again
    service.stop().await.expect("clean stop");
    let outputs = world.outputs().await;
    assert_eq!(follow_ups(&outputs), 1, "the timer fired exactly once");
    let follow_up = outputs.iter().find_map(|r| r.value.as_ref().filter(|v| v.is_final)).unwrap();
    assert_eq!(follow_up.envelope.causation_id.as_deref(), Some(input.envelope.event_id.as_str()));
    assert_eq!(follow_up.event_count, 1, "the timer saw the restored state");
}

#[tokio::test]
async fn an_unavailable_downstream_pauses_the_partition_without_dead_lettering_and_keeps_order() {
    let world = World::new();
    let settings = EchoSettings {
        unavailable_type: Some("needs-erp".into()),
        unavailable_for_ms: 3_000,
        ..EchoSettings::default()
    };
    let service = world.start("a", settings).await;
    let started = std::time::Instant::now();
    let mut blocked = usage_event("acct-paused");
    blocked.r#type = "needs-erp".into();
    let behind = usage_event("acct-paused"); // same account, same partition, after it
    world.produce(&[blocked.clone(), behind.clone()]).await;
    world.wait_for_outputs(2, Duration::from_secs(60)).await;
    let waited = started.elapsed();
    service.stop().await.expect("clean stop");

    assert!(waited >= Duration::from_millis(2_500), "the record waited for its downstream ({waited:?})");
    let outputs = world.outputs().await;
    assert_exactly_once(&outputs, &[blocked.clone(), behind]);
    let first = outputs.iter().min_by_key(|r| r.value.as_ref().unwrap().sequence).unwrap();
    assert_eq!(input_of(first).as_deref(), Some(blocked.id.as_str()), "order within the partition is kept");
    assert!(dlq::list(&world.config("a", EchoSettings::default()).kafka, NAME).await.unwrap().is_empty());
}

const DAY_MS: u64 = 86_400_000;

fn follow_ups_of(outputs: &[Read<UsageRecorded>], account: &str) -> Vec<UsageRecorded> {
    outputs
        .iter()
        .filter_map(|r| r.value.clone())
        .filter(|v| v.dimensions.contains_key(FOLLOW_UP) && v.envelope.account_id == account)
        .collect()
}

/// Runs `tributary clock <args>` against the world's deployment; returns what it printed.
async fn clock_cli(world: &World, args: &[&str]) -> String {
    let output = Command::new(tributary_tests::workspace_binary("tributary"))
        .args(["--bootstrap-servers", &world.stack.bootstrap, "--topic-prefix", &world.prefix, "clock"])
        .args(args)
        .output()
        .await
        .expect("run tributary clock");
    assert!(output.status.success(), "tributary clock {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

async fn metrics_of(service: &RunningService) -> String {
    reqwest::get(format!("http://{}/metrics", service.admin_addr)).await.unwrap().text().await.unwrap()
}

#[tokio::test]
async fn a_controlled_clock_advanced_by_the_cli_fires_a_timer_29_days_ahead_once() {
    let world = World::new();
    let settings = EchoSettings { follow_up_after_ms: Some(29 * DAY_MS), ..EchoSettings::default() };
    let service = world.start_on("a", settings, ClockMode::Controlled).await;
    let input = usage_event("acct-clock");
    world.produce(std::slice::from_ref(&input)).await;
    world.wait_for_outputs(1, Duration::from_secs(60)).await;
    assert!(metrics_of(&service).await.contains("tributary_clock_controlled 1"), "the controlled clock is visible");
    assert!(follow_ups_of(&world.outputs().await, "acct-clock").is_empty(), "due in 29 days, not now");

    let shown = clock_cli(&world, &["advance", "30d"]).await;
    assert!(shown.contains("system clock + 30days"), "{shown}");
    eventually(Duration::from_secs(60), "the follow-up after the advance", || async {
        (!follow_ups_of(&world.outputs().await, "acct-clock").is_empty()).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await; // a few more ticks: it must not fire again
    service.stop().await.expect("clean stop");

    let follow_ups = follow_ups_of(&world.outputs().await, "acct-clock");
    assert_eq!(follow_ups.len(), 1, "the timer fired exactly once");
    let due = input.envelope.occurred_at_utc() + chrono::Duration::days(29);
    let fired_due = follow_ups[0].window_start;
    assert!((fired_due - due.timestamp_millis()).abs() < 60_000, "due 29 days after the input: {fired_due}");
}

#[tokio::test]
async fn a_timer_whose_time_came_while_the_service_was_stopped_fires_once_after_the_restart() {
    let world = World::new();
    let settings = EchoSettings { follow_up_after_ms: Some(29 * DAY_MS), ..EchoSettings::default() };
    let service = world.start_on("a", settings.clone(), ClockMode::Controlled).await;
    world.produce(&[usage_event("acct-asleep")]).await;
    world.wait_for_outputs(1, Duration::from_secs(60)).await;
    service.stop().await.expect("clean stop");

    clock_cli(&world, &["advance", "30d"]).await;
    let shown = clock_cli(&world, &["show"]).await;
    assert!(shown.contains("system clock + 30days"), "{shown}");

    let service = world.start_on("a", settings, ClockMode::Controlled).await;
    eventually(Duration::from_secs(60), "the follow-up after the restart", || async {
        (!follow_ups_of(&world.outputs().await, "acct-asleep").is_empty()).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await; // a few more ticks: it must not fire again
    service.stop().await.expect("clean stop");
    assert_eq!(follow_ups_of(&world.outputs().await, "acct-asleep").len(), 1, "fired exactly once");
}

#[tokio::test]
async fn a_slow_downstream_holds_only_its_own_partition_and_never_fails_a_commit() {
    let world = World::new();
    let gate_dir = tempfile::tempdir().unwrap();
    let gate = gate_dir.path().join("open");
    let settings = EchoSettings {
        slow_type: Some("slow".into()),
        slow_for_ms: 20_000,
        slow_gate: Some(gate.clone()),
        ..EchoSettings::default()
    };
    let service = world.start("a", settings).await;
    let partitions = world.config("a", EchoSettings::default()).kafka.partitions;
    let slow_account = "acct-slow";
    let slow_partition = partition_of(slow_account.as_bytes(), partitions);
    let mut slow = usage_event(slow_account);
    slow.r#type = "slow".into();
    let behind: Vec<UsageEvent> = (0..3).map(|_| usage_event(slow_account)).collect();
    let mut held = vec![slow.clone()];
    held.extend(behind.iter().cloned());
    world.produce(&held).await;
    let other_accounts: Vec<String> = (0..60)
        .map(|i| format!("acct-other-{i}"))
        .filter(|account| partition_of(account.as_bytes(), partitions) != slow_partition)
        .take(20)
        .collect();
    let others: Vec<UsageEvent> =
        (0..3).flat_map(|_| other_accounts.iter().map(|account| usage_event(account))).collect();
    world.produce(&others).await;

    // Every record of the other partitions is committed while the slow call is still running
    // (the gate is closed: it cannot have finished), and nothing of its own partition is.
    world.wait_for_outputs(others.len(), Duration::from_secs(120)).await;
    let done: BTreeSet<String> = world.outputs().await.iter().filter_map(input_of).collect();
    assert!(held.iter().all(|e| !done.contains(&e.id)), "the slow record and those behind it wait");
    assert_eq!(done.len(), others.len());

    std::fs::write(&gate, b"").unwrap();
    let all: Vec<UsageEvent> = held.iter().chain(&others).cloned().collect();
    world.wait_for_outputs(all.len(), Duration::from_secs(120)).await;
    let metrics = metrics_of(&service).await;
    service.stop().await.expect("clean stop");

    let outputs = world.outputs().await;
    assert_exactly_once(&outputs, &all);
    let mut order: Vec<(i64, String)> = outputs
        .iter()
        .filter_map(|r| {
            r.value
                .as_ref()
                .filter(|v| v.envelope.account_id == slow_account)
                .map(|v| (v.sequence, input_of(r).unwrap()))
        })
        .collect();
    order.sort();
    let expected: Vec<String> = held.iter().map(|e| e.id.clone()).collect();
    assert_eq!(order.into_iter().map(|(_, id)| id).collect::<Vec<_>>(), expected, "order within the partition is kept");
    assert!(metrics.contains("tributary_transactions_total{outcome=\"aborted\"} 0\n"), "none aborted:\n{metrics}");
    assert!(metrics.contains("tributary_errors_total{class=\"commit\",stage=\"commit\"} 0\n"), "{metrics}");
}

#[tokio::test]
async fn a_dead_lettered_timer_is_replayed_to_its_partition_and_fires_once() {
    let world = World::new();
    let account = "acct-timer-dlq";
    let refusing = EchoSettings { follow_up_after_ms: Some(500), reject_timers: true, ..EchoSettings::default() };
    let service = world.start("a", refusing).await;
    world.produce(&[usage_event(account)]).await;
    let kafka = world.config("a", EchoSettings::default()).kafka;
    let letters = eventually(Duration::from_secs(60), "the refused timer in the DLQ", || async {
        let letters = dlq::list(&kafka, NAME).await.unwrap();
        (!letters.is_empty()).then_some(letters)
    })
    .await;
    service.stop().await.expect("clean stop");
    let letter = letters[0].letter.clone().unwrap();
    assert_eq!(letter.class, "follow_up_refused");
    assert_eq!(letter.source.topic, format!("{}{NAME}.timer-replays", world.prefix));
    assert_eq!(letter.source.partition, partition_of(account.as_bytes(), kafka.partitions));
    let headers = letters[0].header_map();
    assert_eq!(headers.get(headers::DLQ_TIMER_KEY).map(String::as_str), Some(format!("follow-up/{account}").as_str()));
    assert!(follow_ups_of(&world.outputs().await, account).is_empty());

    // Fixed (timers are no longer refused) and replayed: the timer is scheduled again and fires.
    let fixed = EchoSettings { follow_up_after_ms: Some(500), ..EchoSettings::default() };
    let service = world.start("a", fixed).await;
    let refused = ReplayFilter { class: Some("follow_up_refused".into()), ..ReplayFilter::default() };
    dlq::replay(&kafka, NAME, &refused, None, false).await.unwrap();
    eventually(Duration::from_secs(60), "the replayed timer's follow-up", || async {
        (!follow_ups_of(&world.outputs().await, account).is_empty()).then_some(())
    })
    .await;
    dlq::replay(&kafka, NAME, &refused, None, false).await.unwrap(); // the same letter again
    tokio::time::sleep(Duration::from_secs(3)).await; // a few ticks: a second schedule would fire
    service.stop().await.expect("clean stop");
    assert_eq!(follow_ups_of(&world.outputs().await, account).len(), 1, "replayed twice, fired once");
}

/// The consumer lag samples of `topic` in a scrape, by partition.
fn lag_of(metrics: &str, topic: &str) -> BTreeMap<i32, i64> {
    let prefix = format!("tributary_consumer_lag{{topic=\"{topic}\",partition=\"");
    metrics
        .lines()
        .filter_map(|line| line.strip_prefix(&prefix))
        .filter_map(|rest| {
            let (partition, value) = rest.split_once("\"} ")?;
            Some((partition.parse().ok()?, value.trim().parse().ok()?))
        })
        .collect()
}

#[tokio::test]
async fn consumer_lag_under_exactly_once_counts_a_held_backlog_and_falls_to_zero_past_commit_markers() {
    let world = World::new();
    let gate_dir = tempfile::tempdir().unwrap();
    let gate = gate_dir.path().join("open");
    let settings =
        EchoSettings { slow_type: Some("slow".into()), slow_gate: Some(gate.clone()), ..EchoSettings::default() };
    let service = world.start("a", settings).await;
    let partitions = world.config("a", EchoSettings::default()).kafka.partitions;
    let account = "acct-lagging";
    let held_partition = partition_of(account.as_bytes(), partitions);
    let mut slow = usage_event(account);
    slow.r#type = "slow".into();
    let behind: Vec<UsageEvent> = (0..40).map(|_| usage_event(account)).collect();
    let mut backlog = vec![slow];
    backlog.extend(behind);
    // Written the way an exactly-once service writes: a commit marker after every record, so
    // the partition's end is past offsets no consumer ever receives.
    let topic = input_topic(&world.prefix);
    tributary_tests::kafka::produce_transactionally(world.stack, &world.codec, &topic, &backlog).await;

    // The slow call holds the first record (its gate is closed), so nothing of the partition
    // is committed: its lag is the whole backlog with its markers, from the transactions'
    // offsets (librdkafka's own figure would not know them).
    // librdkafka's statistics come every 5 s, so a sample may predate the last writes: wait for
    // the figure of the whole backlog (41 records, each with its marker), which then holds.
    let expected = 2 * backlog.len() as i64;
    let held = eventually(Duration::from_secs(60), &format!("a lag of {expected} on the held partition"), || async {
        let lag = lag_of(&metrics_of(&service).await, &topic);
        (lag.get(&held_partition) == Some(&expected)).then_some(lag)
    })
    .await;
    assert_eq!(held.len(), partitions as usize, "a sample per assigned partition: {held:?}");
    assert!(held.iter().all(|(p, lag)| *p == held_partition || *lag == 0), "the others are caught up: {held:?}");

    std::fs::write(&gate, b"").unwrap();
    world.wait_for_outputs(backlog.len(), Duration::from_secs(120)).await;
    eventually(Duration::from_secs(60), "every partition's lag to fall to 0", || async {
        let lag = lag_of(&metrics_of(&service).await, &topic);
        (lag.len() == partitions as usize && lag.values().all(|lag| *lag == 0)).then_some(())
    })
    .await;
    service.stop().await.expect("clean stop");
}
