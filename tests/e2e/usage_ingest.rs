//! usage-ingest on the real stack: deduplication over HTTP and Kafka, thresholds, late
//! events, the HTTP error paths, and totals against a recomputation from the inputs.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use chrono::Utc;
use rand::Rng as _;
use rand::seq::IndexedRandom as _;
use serde_json::{Value, json};
use tributary_contracts::codec::Codec;
use tributary_contracts::decimal::Decimal6;
use tributary_contracts::samples::{Fill, typed};
use tributary_contracts::topics;
use tributary_contracts::types::{
    BillingPeriod, Contract, ContractStatus, Envelope, IncludedUsage, LateReason, UsageEvent, UsageLate, UsageRecorded,
    UsageThresholdCrossed, WindowKind,
};
use tributary_runtime::ServiceConfig;
use tributary_runtime::dlq;
use tributary_runtime::service::{RunningService, spawn};
use tributary_tests::kafka::{Read, codec, produce, produce_keyed, producer, read_to_end, trickle};
use tributary_tests::{Stack, eventually, stack, unique_name, workspace_binary};
use usage_ingest::meters::{Aggregation, MeterDefinition};
use usage_ingest::{App, NAME, Settings};

const API_KEY: &str = "test-key-0123456789abcdef";
const SOURCE: &str = "test-platform";

/// One test's isolated world: topics under a unique prefix, its own group and HTTP port.
struct Ingest {
    stack: &'static Stack,
    prefix: String,
    group: String,
    codec: Codec,
    /// Where the running service's HTTP endpoint is bound (port 0, read back at each start).
    http: std::sync::Mutex<SocketAddr>,
    client: reqwest::Client,
}

fn meter(key: &str, event_type: &str, aggregation: Aggregation, value: Option<&str>, unit: &str) -> MeterDefinition {
    MeterDefinition {
        key: key.into(),
        event_type: event_type.into(),
        aggregation,
        value_property: value.map(str::to_owned),
        unit: unit.into(),
        group_by: BTreeMap::new(),
    }
}

impl Ingest {
    fn new() -> Self {
        let stack = stack();
        let prefix = format!("{}.", unique_name("ui"));
        Self {
            stack,
            codec: codec(stack, &prefix),
            group: unique_name("usage-ingest"),
            prefix,
            http: std::sync::Mutex::new(SocketAddr::from(([127, 0, 0, 1], 0))),
            client: reqwest::Client::new(),
        }
    }

    fn settings(&self) -> Settings {
        let mut tokens = meter("tokens", "llm.completion", Aggregation::Sum, Some("$.tokens"), "token");
        tokens.group_by.insert("model".into(), "$.model".into());
        let mut settings = Settings {
            meters: vec![
                meter("api_calls", "api.call", Aggregation::Count, None, "call"),
                tokens,
                meter("active_users", "login", Aggregation::UniqueCount, Some("$.user"), "user"),
                meter("peak_seats", "seats.observed", Aggregation::Max, Some("$.seats"), "seat"),
                meter("storage", "storage.snapshot", Aggregation::Latest, Some("$.gb"), "GB"),
            ],
            recorded_interval: Duration::from_millis(500),
            ..Settings::default()
        };
        settings.http.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        settings.http.api_keys = vec![API_KEY.into()];
        settings
    }

    fn config(&self, settings: Settings) -> ServiceConfig<Settings> {
        let mut config = self.stack.service_config::<Settings>("usage-ingest");
        config.kafka.group_id = Some(self.group.clone());
        config.kafka.transactional_id_prefix = Some(self.group.clone());
        config.kafka.topic_prefix = self.prefix.clone();
        config.runtime.instance_id = "ui-0".into();
        config.runtime.tick_interval = Duration::from_millis(200);
        config.service = settings;
        config
    }

    fn http_address(&self) -> SocketAddr {
        *self.http.lock().expect("address lock")
    }

    async fn start_with(&self, settings: Settings) -> RunningService {
        let service = spawn::<App>(self.config(settings)).await.expect("start usage-ingest");
        if let Some(http) = service.address("http") {
            *self.http.lock().expect("address lock") = http;
        }
        tributary_tests::wait_ready(&service, "usage-ingest").await;
        service
    }

    async fn start(&self) -> RunningService {
        self.start_with(self.settings()).await
    }

    fn topic(&self, topic: &str) -> String {
        format!("{}{topic}", self.prefix)
    }

    async fn produce(&self, events: &[UsageEvent]) {
        produce(&producer(self.stack), &self.codec, &self.topic(topics::USAGE_EVENTS), events).await;
    }

    async fn publish_contracts(&self, contracts: &[Contract]) {
        let keyed: Vec<(String, Contract)> = contracts.iter().map(|c| (c.contract_id.clone(), c.clone())).collect();
        produce_keyed(&producer(self.stack), &self.codec, &self.topic(topics::REFDATA_CONTRACTS), &keyed).await;
    }

    async fn read<T: tributary_contracts::Contract>(&self) -> Vec<T> {
        let records: Vec<Read<T>> = read_to_end(self.stack, &self.codec, &self.topic(T::TOPIC)).await;
        records.into_iter().map(|r| r.value.expect("every record decodes")).collect()
    }

    /// The newest revision of every aggregate written to `usage.recorded`.
    async fn latest_totals(&self) -> BTreeMap<AggregateId, UsageRecorded> {
        let mut latest: BTreeMap<AggregateId, UsageRecorded> = BTreeMap::new();
        for record in self.read::<UsageRecorded>().await {
            let id = AggregateId::of(&record);
            if latest.get(&id).is_none_or(|seen| seen.sequence < record.sequence) {
                latest.insert(id, record);
            }
        }
        latest
    }

    /// Waits until the billing-period total of `meter` for `account` reaches `expected`.
    async fn wait_for_period_total(&self, account: &str, meter: &str, expected: i64) -> UsageRecorded {
        eventually(Duration::from_secs(60), &format!("{account}/{meter} to total {expected}"), || async {
            self.latest_totals().await.into_values().find(|r| {
                r.envelope.account_id == account
                    && r.meter == meter
                    && r.window_kind == WindowKind::BillingPeriod
                    && r.dimensions.is_empty()
                    && r.total_quantity == Decimal6::from(expected)
            })
        })
        .await
    }

    async fn post(&self, content_type: &str, key: Option<&str>, body: impl Into<reqwest::Body>) -> (u16, Value) {
        let mut request = self
            .client
            .post(format!("http://{}/v1/events", self.http_address()))
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(body);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.expect("the HTTP endpoint answers");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn post_events(&self, events: &[Value]) -> (u16, Value) {
        self.post("application/cloudevents-batch+json", Some(API_KEY), serde_json::to_vec(events).unwrap()).await
    }
}

/// What identifies one aggregate in `usage.recorded`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct AggregateId {
    account: String,
    meter: String,
    kind: String,
    window_start: i64,
    dimensions: BTreeMap<String, String>,
}

impl AggregateId {
    fn of(record: &UsageRecorded) -> Self {
        Self {
            account: record.envelope.account_id.clone(),
            meter: record.meter.clone(),
            kind: format!("{:?}", record.window_kind),
            window_start: record.window_start,
            dimensions: record.dimensions.clone().into_iter().collect(),
        }
    }
}

fn cloud_event(id: &str, account: &str, event_type: &str, data: Value) -> Value {
    json!({
        "specversion": "1.0",
        "id": id,
        "source": SOURCE,
        "type": event_type,
        "subject": account,
        "time": Utc::now().to_rfc3339(),
        "data": data,
    })
}

fn kafka_event(id: &str, account: &str, event_type: &str, data: Value, time_ms: i64) -> UsageEvent {
    let mut envelope = Envelope::originating(SOURCE, account, Utc::now());
    envelope.occurred_at = time_ms;
    UsageEvent {
        envelope,
        id: id.into(),
        source: SOURCE.into(),
        r#type: event_type.into(),
        subject: account.into(),
        time: time_ms,
        data: data.to_string(),
        subscription_id: None,
        meter: None,
        quantity: None,
        unit: None,
        dimensions: Default::default(),
        received_at: None,
    }
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

const DAY_MS: i64 = 86_400_000;

fn contract(account: &str, included_calls: i64, percents: Option<Vec<i32>>, term: (i64, i64)) -> Contract {
    let mut contract: Contract = typed(Fill::Full, 7);
    contract.envelope = Envelope::originating("test-crm", account, Utc::now());
    contract.contract_id = format!("ctr-{account}");
    contract.customer_id = format!("cus-{account}");
    contract.subscription_id = format!("sub-{account}");
    contract.status = ContractStatus::Active;
    contract.term_start = term.0;
    contract.term_end = term.1;
    contract.billing_period = BillingPeriod::Annual;
    contract.included_usage = vec![IncludedUsage {
        meter: "api_calls".into(),
        included_quantity: Decimal6::from(included_calls),
        unit: "call".into(),
        threshold_percents: percents,
    }];
    contract.deleted = false;
    contract.version = 1;
    contract
}

fn current_term() -> (i64, i64) {
    (now_ms() - 30 * DAY_MS, now_ms() + 300 * DAY_MS)
}

#[tokio::test]
async fn duplicates_over_http_and_kafka_are_counted_once_also_across_a_restart() {
    let world = Ingest::new();
    let account = "acct-dedup";
    let service = world.start().await;

    let first = cloud_event("evt-1", account, "api.call", json!({}));
    assert_eq!(world.post_events(std::slice::from_ref(&first)).await.0, 202);
    assert_eq!(world.post_events(std::slice::from_ref(&first)).await.0, 202, "a resent event is accepted again");
    let now = now_ms();
    world.produce(&[kafka_event("evt-1", account, "api.call", json!({}), now)]).await; // same source and id
    world.produce(&[kafka_event("evt-2", account, "api.call", json!({}), now)]).await;
    world.wait_for_period_total(account, "api_calls", 2).await;
    service.stop().await.expect("clean stop");

    let service = world.start().await;
    assert_eq!(world.post_events(&[first]).await.0, 202);
    world.produce(&[kafka_event("evt-2", account, "api.call", json!({}), now)]).await;
    world.produce(&[kafka_event("evt-3", account, "api.call", json!({}), now)]).await; // behind the repeats
    let total = world.wait_for_period_total(account, "api_calls", 3).await;
    tokio::time::sleep(Duration::from_secs(2)).await; // a few more flushes: nothing may follow
    service.stop().await.expect("clean stop");

    assert_eq!(total.event_count, 3, "three distinct events");
    let highest = world
        .latest_totals()
        .await
        .into_values()
        .filter(|r| r.envelope.account_id == account && r.window_kind == WindowKind::BillingPeriod)
        .map(|r| r.total_quantity)
        .max();
    assert_eq!(highest, Some(Decimal6::from(3)), "the repeats after the restart were not counted");
}

#[tokio::test]
async fn usage_recorded_carries_running_totals_at_a_bounded_rate_not_per_event() {
    let world = Ingest::new();
    let account = "acct-burst";
    let service = world.start().await;
    let now = now_ms();
    let burst: Vec<(String, UsageEvent)> = (0..500)
        .map(|i| (account.to_owned(), kafka_event(&format!("burst-{i}"), account, "api.call", json!({}), now)))
        .collect();
    produce_keyed(&producer(world.stack), &world.codec, &world.topic(topics::USAGE_EVENTS), &burst).await;
    world.wait_for_period_total(account, "api_calls", 500).await;
    service.stop().await.expect("clean stop");

    let revisions: Vec<UsageRecorded> = world
        .read::<UsageRecorded>()
        .await
        .into_iter()
        .filter(|r| r.window_kind == WindowKind::BillingPeriod)
        .collect();
    assert!(
        revisions.len() <= 50,
        "500 events gave {} revisions of the period total; one per event would be 500",
        revisions.len()
    );
    let sequences: Vec<i64> = revisions.iter().map(|r| r.sequence).collect();
    assert_eq!(sequences, (1..=revisions.len() as i64).collect::<Vec<_>>(), "revisions count up by one");
    assert!(revisions.windows(2).all(|w| w[0].total_quantity <= w[1].total_quantity), "running totals only grow");
}

#[tokio::test]
async fn each_threshold_fires_once_also_across_restarts() {
    let world = Ingest::new();
    let (standard, custom) = ("acct-thresholds", "acct-custom-thresholds");
    world
        .publish_contracts(&[
            contract(standard, 10, None, current_term()),
            contract(custom, 4, Some(vec![50]), current_term()),
        ])
        .await;
    let calls = |account: &str, range: std::ops::Range<i32>| -> Vec<UsageEvent> {
        range.map(|i| kafka_event(&format!("{account}-{i}"), account, "api.call", json!({}), now_ms())).collect()
    };

    let service = world.start().await;
    world.produce(&calls(standard, 0..9)).await;
    world.produce(&calls(custom, 0..3)).await;
    world.wait_for_period_total(standard, "api_calls", 9).await;
    service.stop().await.expect("clean stop");

    let service = world.start().await;
    world.produce(&calls(standard, 9..13)).await;
    world.produce(&calls(custom, 3..8)).await;
    world.wait_for_period_total(standard, "api_calls", 13).await;
    world.wait_for_period_total(custom, "api_calls", 8).await;
    service.stop().await.expect("clean stop");

    let crossings = world.read::<UsageThresholdCrossed>().await;
    let of = |account: &str| -> Vec<(i32, Decimal6, Decimal6)> {
        let mut seen: Vec<_> = crossings
            .iter()
            .filter(|c| c.envelope.account_id == account)
            .map(|c| (c.threshold_percent, c.used_quantity, c.overage_quantity))
            .collect();
        seen.sort();
        seen
    };
    assert_eq!(
        of(standard),
        vec![
            (80, Decimal6::from(8), Decimal6::from(0)),
            (100, Decimal6::from(10), Decimal6::from(0)),
            (120, Decimal6::from(12), Decimal6::from(2)),
        ],
        "80, 100 and 120 % each fire once, at the event that crosses them"
    );
    assert_eq!(of(custom), vec![(50, Decimal6::from(2), Decimal6::from(0))], "the contract's own thresholds");
    let crossing = crossings.iter().find(|c| c.envelope.account_id == standard).unwrap();
    assert_eq!(crossing.contract_id, format!("ctr-{standard}"));
    assert_eq!(crossing.subscription_id, format!("sub-{standard}"));
    assert_eq!(crossing.included_quantity, Decimal6::from(10));
}

#[tokio::test]
async fn a_contract_published_while_the_service_runs_applies_to_the_events_after_it() {
    let world = Ingest::new();
    let account = "acct-live-contract";
    let service = world.start().await;
    world.publish_contracts(&[contract(account, 2, None, current_term())]).await;
    let metrics = format!("http://{}/metrics", service.admin_addr);
    eventually(Duration::from_secs(30), "the contract to be loaded", || async {
        let text = reqwest::get(&metrics).await.ok()?.text().await.ok()?;
        text.lines().any(|l| l == "tributary_usage_ingest_contracts 1").then_some(())
    })
    .await;
    let calls: Vec<UsageEvent> =
        (0..3).map(|i| kafka_event(&format!("live-{i}"), account, "api.call", json!({}), now_ms())).collect();
    world.produce(&calls).await;
    let total = world.wait_for_period_total(account, "api_calls", 3).await;
    service.stop().await.expect("clean stop");

    assert_eq!(total.contract_id.as_deref(), Some("ctr-acct-live-contract"), "counted against the new contract");
    let mut percents: Vec<i32> =
        world.read::<UsageThresholdCrossed>().await.iter().map(|c| c.threshold_percent).collect();
    percents.sort_unstable();
    assert_eq!(percents, vec![80, 100, 120], "2 included: the 2nd call crosses 80 and 100, the 3rd 120");
}

#[tokio::test]
async fn late_events_go_to_usage_late_and_an_hour_closed_inside_an_open_period_only_loses_its_hour() {
    let world = Ingest::new();
    let (ended, open) = ("acct-ended-term", "acct-open-term");
    let ended_term = (now_ms() - 5 * DAY_MS, now_ms() - 2 * DAY_MS);
    world.publish_contracts(&[contract(ended, 100, None, ended_term), contract(open, 100, None, current_term())]).await;
    let service = world.start().await;

    let three_days_ago = now_ms() - 3 * DAY_MS;
    let three_hours_ago = now_ms() - 3 * 3_600_000;
    world.produce(&[kafka_event("late-1", ended, "api.call", json!({}), three_days_ago)]).await;
    world.produce(&[kafka_event("old-hour-1", open, "api.call", json!({}), three_hours_ago)]).await;
    let counted = world.wait_for_period_total(open, "api_calls", 1).await;
    let late: Vec<UsageLate> = eventually(Duration::from_secs(30), "the late event", || async {
        let late = world.read::<UsageLate>().await;
        (!late.is_empty()).then_some(late)
    })
    .await;
    service.stop().await.expect("clean stop");

    assert_eq!(late.len(), 1, "only the event of the closed period is late: {late:?}");
    let late = &late[0];
    assert_eq!((late.id.as_str(), late.reason), ("late-1", LateReason::GraceExpired));
    let period = late.missed_windows.iter().find(|w| w.window_kind == WindowKind::BillingPeriod).expect("the period");
    assert_eq!(period.window_end, ended_term.1, "the period ended with the term");
    assert_eq!(period.grace_ends_at, ended_term.1 + 6 * 3_600_000, "default period grace: 6 h");
    assert!(late.lateness_ms > 0);
    assert!(late.reason_detail.as_deref().unwrap_or_default().contains("closed"));

    let totals = world.latest_totals().await;
    assert!(totals.keys().all(|id| id.account != ended), "the late event was counted nowhere");
    assert_eq!(counted.contract_id.as_deref(), Some(format!("ctr-{open}").as_str()));
    assert!(
        !totals.keys().any(|id| id.account == open && id.kind == "Hour"),
        "an hour closed three hours ago gets no total"
    );
}

#[tokio::test]
async fn every_http_error_path_answers_as_specified() {
    let world = Ingest::new();
    let mut settings = world.settings();
    settings.http.max_body_bytes = 8 * 1024;
    settings.http.max_batch_events = 20;
    let service = world.start_with(settings).await;
    let good = |id: &str| cloud_event(id, "acct-http", "llm.completion", json!({"tokens": 10, "model": "small"}));
    let batch = |events: &[Value]| serde_json::to_vec(events).unwrap();

    let (status, body) = world.post("application/cloudevents-batch+json", None, batch(&[good("a")])).await;
    assert_eq!(status, 401, "no key: {body}");
    let (status, _) =
        world.post("application/cloudevents-batch+json", Some("wrong-key-0123456789"), batch(&[good("a")])).await;
    assert_eq!(status, 401, "a wrong key");
    let (status, body) = world.post("text/plain", Some(API_KEY), batch(&[good("a")])).await;
    assert_eq!(status, 415, "{body}");
    let big: Vec<Value> = (0..19)
        .map(|i| {
            cloud_event(
                &format!("big-{i}"),
                "acct-http",
                "llm.completion",
                json!({"tokens": 1, "pad": "x".repeat(600)}),
            )
        })
        .collect();
    let (status, _) = world.post_events(&big).await;
    assert_eq!(status, 413, "a body over max_body_bytes");
    let many: Vec<Value> = (0..21).map(|i| good(&format!("many-{i}"))).collect();
    let (status, body) = world.post_events(&many).await;
    assert_eq!(status, 413, "a batch over max_batch_events: {body}");
    let (status, body) = world.post("application/cloudevents+json", Some(API_KEY), "{not json").await;
    assert_eq!(status, 400, "malformed JSON: {body}");
    let (status, body) = world.post("application/cloudevents+json", Some(API_KEY), batch(&[good("a")])).await;
    assert_eq!(status, 400, "a batch sent as a single event: {body}");

    let mut future = good("future");
    future["time"] = json!((Utc::now() + chrono::Duration::hours(2)).to_rfc3339());
    let mut negative = good("negative");
    negative["data"]["tokens"] = json!(-5);
    let mut no_id = good("x");
    no_id.as_object_mut().unwrap().remove("id");
    let unknown = cloud_event("unknown", "acct-http", "nobody.meters.this", json!({}));
    let (status, body) = world.post_events(&[good("valid-but-withheld"), future, negative, unknown, no_id]).await;
    assert_eq!(status, 400, "{body}");
    let rejected = body["rejected"].as_array().expect("a reason per refused event");
    let reasons: Vec<(u64, &str)> =
        rejected.iter().map(|r| (r["index"].as_u64().unwrap(), r["field"].as_str().unwrap())).collect();
    assert_eq!(reasons, vec![(1, "time"), (2, "data.tokens"), (3, "type"), (4, "id")], "{body}");
    assert!(rejected.iter().all(|r| !r["reason"].as_str().unwrap().is_empty()));

    let (status, body) =
        world.post("application/cloudevents+json", Some(API_KEY), serde_json::to_vec(&good("single")).unwrap()).await;
    assert_eq!((status, body["accepted"].clone()), (202, json!(["single"])));
    let (status, body) = world.post_events(&[good("b1"), good("b2")]).await;
    assert_eq!((status, body["accepted"].clone()), (202, json!(["b1", "b2"])));
    service.stop().await.expect("clean stop");

    let written = world.read::<UsageEvent>().await;
    let ids: BTreeSet<&str> = written.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(
        ids,
        BTreeSet::from(["single", "b1", "b2"]),
        "a refused batch writes nothing, not even its valid events"
    );
    let single = written.iter().find(|e| e.id == "single").unwrap();
    assert_eq!((single.envelope.account_id.as_str(), single.source.as_str()), ("acct-http", SOURCE));
    assert!(single.received_at.is_some(), "the HTTP edge stamps received_at");
}

#[tokio::test]
async fn invalid_kafka_input_goes_to_the_dlq_with_the_reason_and_a_corrected_resend_counts() {
    let world = Ingest::new();
    let account = "acct-dlq";
    let service = world.start().await;
    let now = now_ms();
    let mut negative = kafka_event("neg", account, "llm.completion", json!({"tokens": 1}), now);
    negative.quantity = Some("-1".parse().unwrap());
    world
        .produce(&[
            kafka_event("unknown", account, "nobody.meters.this", json!({}), now),
            negative,
            kafka_event("future", account, "api.call", json!({}), now + 3_600_000),
            kafka_event("ok", account, "api.call", json!({}), now),
        ])
        .await;
    world.wait_for_period_total(account, "api_calls", 1).await;
    // The platform fixes the refused event and sends it again under the same id: a refusal
    // never uses up the idempotency key, so it counts now.
    world.produce(&[kafka_event("unknown", account, "api.call", json!({}), now)]).await;
    world.wait_for_period_total(account, "api_calls", 2).await;
    service.stop().await.expect("clean stop");

    let kafka = world.config(Settings::default()).kafka;
    let letters: Vec<(String, String)> = dlq::list(&kafka, NAME)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.letter.expect("dlq headers"))
        .map(|l| (l.class, l.message))
        .collect();
    assert_eq!(letters.len(), 3, "{letters:?}");
    assert!(letters.iter().all(|(class, _)| class == "validation"));
    assert!(letters[0].1.contains("unknown meter"), "{letters:?}");
    assert!(letters[1].1.starts_with("quantity"), "{letters:?}");
    assert!(letters[2].1.contains("future"), "{letters:?}");
}

#[tokio::test]
async fn totals_equal_a_recomputation_from_10000_random_events() {
    let world = Ingest::new();
    let mut rng = rand::rng();
    let accounts: Vec<String> = (0..150).map(|i| format!("acct-r{i:03}")).collect();
    let models = ["small", "large"];
    let now = now_ms();
    let mut events = Vec::new();
    for i in 0..10_000 {
        let account = accounts.choose(&mut rng).unwrap();
        // The last 50 minutes: the current and the previous hourly window, both still open.
        let time = now - rng.random_range(0..50 * 60_000);
        let event = match rng.random_range(0..5) {
            0 => kafka_event(&format!("r{i}"), account, "api.call", json!({}), time),
            1 => kafka_event(
                &format!("r{i}"),
                account,
                "llm.completion",
                json!({"tokens": rng.random_range(0..5_000), "model": models.choose(&mut rng).unwrap()}),
                time,
            ),
            2 => kafka_event(
                &format!("r{i}"),
                account,
                "login",
                json!({"user": format!("u{}", rng.random_range(0..20))}),
                time,
            ),
            3 => kafka_event(
                &format!("r{i}"),
                account,
                "seats.observed",
                json!({"seats": rng.random_range(1..500)}),
                time,
            ),
            _ => kafka_event(
                &format!("r{i}"),
                account,
                "storage.snapshot",
                json!({"gb": format!("{}.{:03}", rng.random_range(0..900), rng.random_range(0..1000))}),
                time,
            ),
        };
        events.push(event);
    }
    // One in twenty is sent again (a platform retrying): it must be counted once.
    let repeats: Vec<UsageEvent> = events.iter().filter(|_| rng.random_bool(0.05)).cloned().collect();
    let mut inputs = events.clone();
    inputs.extend(repeats);
    let expected = recompute(&events);

    let service = world.start().await;
    let keyed: Vec<(String, UsageEvent)> = inputs.iter().map(|e| (e.envelope.account_id.clone(), e.clone())).collect();
    produce_keyed(&producer(world.stack), &world.codec, &world.topic(topics::USAGE_EVENTS), &keyed).await;
    let mut last_difference = String::new();
    let matched = tokio::time::timeout(Duration::from_secs(180), async {
        loop {
            let actual: BTreeMap<AggregateId, (Decimal6, i64)> = world
                .latest_totals()
                .await
                .into_iter()
                .map(|(id, r)| (id, (r.total_quantity, r.event_count)))
                .collect();
            if actual == expected {
                return;
            }
            let wrong = expected.iter().filter(|(id, want)| actual.get(*id) != Some(*want)).count();
            last_difference = format!("{wrong} of {} aggregates differ, {} present", expected.len(), actual.len());
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    })
    .await;
    service.stop().await.expect("clean stop");
    assert!(matched.is_ok(), "the totals never matched the recomputation: {last_difference}");
}

/// The totals of `events` (without repeats), computed directly: per account, meter, window
/// (calendar month without a contract, clock hour) and dimension values.
fn recompute(events: &[UsageEvent]) -> BTreeMap<AggregateId, (Decimal6, i64)> {
    #[derive(Default)]
    struct Fold {
        values: Vec<(i64, rust_decimal::Decimal)>,
        distinct: BTreeSet<String>,
    }
    let mut folds: BTreeMap<(AggregateId, &'static str), Fold> = BTreeMap::new();
    for event in events {
        let data: Value = serde_json::from_str(&event.data).unwrap();
        let (meter, aggregation, value, model): (&str, &'static str, Option<&Value>, Option<&str>) =
            match event.r#type.as_str() {
                "api.call" => ("api_calls", "count", None, None),
                "llm.completion" => ("tokens", "sum", data.get("tokens"), data.get("model").and_then(Value::as_str)),
                "login" => ("active_users", "unique", data.get("user"), None),
                "seats.observed" => ("peak_seats", "max", data.get("seats"), None),
                _ => ("storage", "latest", data.get("gb"), None),
            };
        let windows = [
            ("BillingPeriod", usage_ingest::windows::billing_period(None, event.time).start),
            ("Hour", usage_ingest::windows::hour(event.time).start),
        ];
        let mut dimension_sets = vec![BTreeMap::new()];
        if let Some(model) = model {
            dimension_sets.push(BTreeMap::from([("model".to_owned(), model.to_owned())]));
        }
        for (kind, window_start) in windows {
            for dimensions in &dimension_sets {
                let id = AggregateId {
                    account: event.envelope.account_id.clone(),
                    meter: meter.into(),
                    kind: kind.into(),
                    window_start,
                    dimensions: dimensions.clone(),
                };
                let fold = folds.entry((id, aggregation)).or_default();
                let number = match value {
                    _ if aggregation == "unique" || aggregation == "count" => rust_decimal::Decimal::ONE,
                    Some(Value::String(text)) => text.parse().unwrap(),
                    Some(Value::Number(n)) => n.to_string().parse().unwrap(),
                    _ => rust_decimal::Decimal::ONE,
                };
                fold.values.push((event.time, number));
                if let Some(user) = value.and_then(Value::as_str) {
                    fold.distinct.insert(user.to_owned());
                }
            }
        }
    }
    folds
        .into_iter()
        .map(|((id, aggregation), fold)| {
            let total = match aggregation {
                "count" => rust_decimal::Decimal::from(fold.values.len()),
                "sum" => fold.values.iter().map(|(_, v)| *v).sum(),
                "unique" => rust_decimal::Decimal::from(fold.distinct.len()),
                "max" => fold.values.iter().map(|(_, v)| *v).max().unwrap(),
                _ => fold.values.iter().max_by_key(|(time, _)| *time).unwrap().1,
            };
            (id, (Decimal6::new(total).unwrap(), fold.values.len() as i64))
        })
        .collect()
}

/// The usage-ingest binary on this world's topics, configured by a TOML file like an
/// operator's; the caller adds what its test needs and spawns it.
fn binary_command(world: &Ingest, config: &std::path::Path) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(workspace_binary("usage-ingest"));
    command
        .envs(world.stack.service_env())
        .env("TRIBUTARY_CONFIG", config)
        .env("TRIBUTARY__KAFKA__TOPIC_PREFIX", &world.prefix)
        .env("TRIBUTARY__KAFKA__GROUP_ID", &world.group)
        .env("TRIBUTARY__KAFKA__TRANSACTIONAL_ID_PREFIX", &world.group)
        .env("TRIBUTARY__RUNTIME__INSTANCE_ID", "crashy")
        .env("TRIBUTARY__RUNTIME__TICK_INTERVAL", "200ms")
        .env("TRIBUTARY__ADMIN__LISTEN", "127.0.0.1:0")
        .env("TRIBUTARY__LOG__FILTER", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true);
    command
}

fn spawn_binary(world: &Ingest, config: &std::path::Path) -> tokio::process::Child {
    binary_command(world, config).spawn().expect("start usage-ingest")
}

#[tokio::test]
async fn totals_and_thresholds_are_exact_when_the_process_is_killed_at_random_moments() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;

    let world = Ingest::new();
    let config = std::env::temp_dir().join(format!("{}.toml", unique_name("usage-ingest-crash")));
    std::fs::write(
        &config,
        r#"
[usage_ingest]
recorded_interval = "300ms"
[usage_ingest.http]
enabled = false
[[usage_ingest.meters]]
key = "api_calls"
event_type = "api.call"
aggregation = "COUNT"
unit = "call"
"#,
    )
    .unwrap();
    let accounts: Vec<String> = (0..20).map(|i| format!("acct-crash-{i:02}")).collect();
    let contracts: Vec<Contract> = accounts.iter().map(|a| contract(a, 50, None, current_term())).collect();
    world.publish_contracts(&contracts).await;
    // 100 calls per account: thresholds at 40, 50 and 60 calls, fed while the process dies.
    let inputs: Vec<(String, UsageEvent)> = (0..100)
        .flat_map(|i| {
            accounts
                .iter()
                .map(move |a| (a.clone(), kafka_event(&format!("{a}-{i}"), a, "api.call", json!({}), now_ms())))
        })
        .collect();
    // About 15 s of traffic, so that every crash lands while events are flowing.
    let feeder = trickle(
        world.stack,
        world.codec.clone(),
        world.topic(topics::USAGE_EVENTS),
        inputs.clone(),
        40,
        Duration::from_millis(250),
    );
    let mut rng = rand::rng();
    for crash in 0..4 {
        let mut child = spawn_binary(&world, &config);
        tokio::time::sleep(Duration::from_millis(rng.random_range(2_000..4_500))).await;
        kill(Pid::from_raw(child.id().expect("running") as i32), Signal::SIGKILL).expect("SIGKILL");
        let status = child.wait().await.expect("wait");
        assert!(!status.success(), "crash {crash}: the process was killed");
    }
    feeder.await.expect("feeder");
    let mut last = spawn_binary(&world, &config);
    for account in &accounts {
        world.wait_for_period_total(account, "api_calls", 100).await;
    }
    kill(Pid::from_raw(last.id().expect("running") as i32), Signal::SIGTERM).expect("SIGTERM");
    let status = tokio::time::timeout(Duration::from_secs(30), last.wait()).await.expect("stops").expect("wait");
    assert_eq!(status.code(), Some(0));
    let _ = std::fs::remove_file(&config);

    let totals = world.latest_totals().await;
    for account in &accounts {
        let period = totals
            .values()
            .find(|r| &r.envelope.account_id == account && r.window_kind == WindowKind::BillingPeriod)
            .expect("a period total");
        assert_eq!((period.total_quantity, period.event_count), (Decimal6::from(100), 100), "{account}");
    }
    let crossings = world.read::<UsageThresholdCrossed>().await;
    for account in &accounts {
        let mut seen: Vec<(i32, Decimal6)> = crossings
            .iter()
            .filter(|c| &c.envelope.account_id == account)
            .map(|c| (c.threshold_percent, c.used_quantity))
            .collect();
        seen.sort();
        assert_eq!(
            seen,
            vec![(80, Decimal6::from(40)), (100, Decimal6::from(50)), (120, Decimal6::from(60))],
            "{account}: each threshold exactly once, at the event that crossed it"
        );
    }
    let recorded = world.read::<UsageRecorded>().await;
    let mut revisions: BTreeMap<AggregateId, Vec<i64>> = BTreeMap::new();
    for record in &recorded {
        revisions.entry(AggregateId::of(record)).or_default().push(record.sequence);
    }
    for (id, sequences) in revisions {
        assert_eq!(sequences, (1..=sequences.len() as i64).collect::<Vec<_>>(), "{id:?}: revisions 1..n, none doubled");
    }
}

/// One event for cloudevents_client.py: the SDK sets `specversion` and `time` (now).
fn sdk_event(id: &str, account: &str, tokens: Value, extra: Value) -> Value {
    let mut attributes = json!({"id": id, "source": SOURCE, "type": "llm.completion", "subject": account});
    attributes.as_object_mut().unwrap().extend(extra.as_object().cloned().unwrap_or_default());
    json!({"attributes": attributes, "data": {"tokens": tokens, "model": "small"}})
}

/// An RFC 9457 problem details answer of `status`, naming `field` first among the refused.
fn assert_problem(answer: &tributary_tests::cloudevents::Answer, status: u16, field: &str) {
    let body = &answer.body;
    assert_eq!(answer.status, status, "{body}");
    assert_eq!(answer.content_type, "application/problem+json", "{body}");
    assert_eq!((body["type"].as_str(), body["status"].as_u64()), (Some("about:blank"), Some(u64::from(status))));
    assert!(body["title"].as_str().is_some_and(|t| !t.is_empty()), "a title: {body}");
    assert!(body["detail"].as_str().is_some_and(|t| !t.is_empty()), "a detail: {body}");
    assert!(body["instance"].as_str().is_some_and(|i| i.starts_with("urn:uuid:")), "an instance: {body}");
    assert_eq!(body["rejected"][0]["field"].as_str(), Some(field), "the refused field: {body}");
    assert!(body["rejected"][0]["reason"].as_str().is_some_and(|r| !r.is_empty()), "a reason: {body}");
}

#[tokio::test]
async fn the_cloudevents_sdk_is_heard_in_binary_structured_and_batch_mode_once_each_also_when_sent_twice() {
    let world = Ingest::new();
    let service = world.start().await;
    let url = format!("http://{}/v1/events", world.http_address());
    let account = "acct-sdk";
    let accepted = json!([
        {"mode": "binary", "events": [sdk_event("bin-1", account, json!(3), json!({}))]},
        {"mode": "structured", "events": [sdk_event("str-1", account, json!(5), json!({"datacontenttype": "application/json"}))]},
        {"mode": "batch", "events": [
            sdk_event("bat-1", account, json!(7), json!({"datacontenttype": "application/json"})),
            sdk_event("bat-2", account, json!(11), json!({"datacontenttype": "application/json"})),
        ]},
    ]);
    let mut twice = accepted.as_array().unwrap().clone();
    twice.extend(accepted.as_array().unwrap().clone());
    let answers = tributary_tests::cloudevents::send(&url, API_KEY, Value::Array(twice)).await;
    let ids: Vec<(u16, Value)> = answers.iter().map(|a| (a.status, a.body["accepted"].clone())).collect();
    let first = vec![(202, json!(["bin-1"])), (202, json!(["str-1"])), (202, json!(["bat-1", "bat-2"]))];
    assert_eq!(ids, [first.clone(), first].concat(), "every mode is accepted, also the second time");

    let refused = tributary_tests::cloudevents::send(
        &url,
        API_KEY,
        json!([
            {"mode": "binary", "events": [sdk_event("no-id", account, json!(1), json!({}))], "drop": ["ce-id"]},
            {"mode": "binary", "events": [sdk_event("negative", account, json!(1), json!({"quantity": "-3"}))]},
            {"mode": "binary", "events": [sdk_event("not-json", account, json!(1), json!({"datacontenttype": "application/json"}))],
             "body": "tokens=1"},
            {"mode": "binary", "events": [{"attributes": {"id": "text", "source": SOURCE, "type": "llm.completion",
             "subject": account, "datacontenttype": "text/plain"}, "data": "one token"}]},
            {"mode": "structured", "events": [sdk_event("plain", account, json!(-1), json!({}))],
             "headers": {"Accept": "application/json"}},
        ]),
    )
    .await;
    assert_problem(&refused[0], 400, "id");
    assert_problem(&refused[1], 400, "quantity");
    assert_problem(&refused[2], 400, "data");
    assert_problem(&refused[3], 400, "datacontenttype");
    let plain = &refused[4];
    assert_eq!((plain.status, plain.content_type.as_str()), (400, "application/json"), "{}", plain.body);
    assert!(plain.body["error"].as_str().is_some(), "the earlier shape for Accept: application/json: {}", plain.body);
    assert_eq!(plain.body["rejected"][0]["field"], "data.tokens", "{}", plain.body);

    // A last event after every repeat, on the same partition (one account): a total of exactly
    // 3 + 5 + 7 + 11 + 1 proves that the repeats counted nothing and the refused wrote nothing.
    let last = tributary_tests::cloudevents::send(
        &url,
        API_KEY,
        json!([{"mode": "binary", "events": [sdk_event("last", account, json!(1), json!({}))]}]),
    )
    .await;
    assert_eq!(last[0].status, 202, "{}", last[0].body);
    world.wait_for_period_total(account, "tokens", 27).await;
    service.stop().await.expect("clean stop");
    let written: BTreeSet<String> = world.read::<UsageEvent>().await.into_iter().map(|e| e.id).collect();
    assert_eq!(written, BTreeSet::from(["bin-1", "str-1", "bat-1", "bat-2", "last"].map(String::from)));
}

#[tokio::test]
async fn a_request_continues_the_callers_trace_through_its_server_span_to_the_record_span() {
    use tributary_tests::otlp::{OtlpReceiver, ReceivedSpan, SPAN_KIND_SERVER};

    let world = Ingest::new();
    let receiver = OtlpReceiver::start().await;
    let addresses = tempfile::tempdir().unwrap();
    let addresses_file = addresses.path().join("addresses.json");
    let mut child = binary_command(&world, &tributary_tests::workspace_file("deploy/config/usage-ingest.toml"))
        .arg("--addresses-file")
        .arg(&addresses_file)
        .env("TRIBUTARY__USAGE_INGEST__HTTP__LISTEN", "127.0.0.1:0")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint)
        // Export spans every 100 ms rather than every 5 s, so the test waits less.
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .spawn()
        .expect("start usage-ingest");
    let bound: Value = eventually(Duration::from_secs(60), "the addresses file", || async {
        std::fs::read(&addresses_file).ok().and_then(|bytes| serde_json::from_slice(&bytes).ok())
    })
    .await;
    let admin = format!("http://{}", bound["admin"].as_str().expect("the admin address"));
    let url = format!("http://{}/v1/events", bound["http"].as_str().expect("the HTTP address"));
    eventually(Duration::from_secs(60), "usage-ingest to report ready", || async {
        let ready = reqwest::get(format!("{admin}/health/ready")).await.ok()?;
        ready.status().is_success().then_some(())
    })
    .await;

    // The caller's trace in the W3C header (binary mode), and in the CloudEvents distributed
    // tracing extension of an event whose request has no header (structured mode).
    let (header_trace, header_parent) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let (event_trace, event_parent) = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");
    let answers = tributary_tests::cloudevents::send(
        &url,
        "tributary-local-dev-key",
        json!([
            {"mode": "binary", "events": [sdk_event("traced-1", "acct-traced", json!(2), json!({}))],
             "headers": {"traceparent": format!("00-{header_trace}-{header_parent}-01")}},
            {"mode": "structured", "events": [sdk_event("traced-2", "acct-traced", json!(2),
             json!({"traceparent": format!("00-{event_trace}-{event_parent}-01")}))]},
        ]),
    )
    .await;
    assert!(answers.iter().all(|a| a.status == 202), "{answers:?}");

    for (trace_id, caller) in [(header_trace, header_parent), (event_trace, event_parent)] {
        let (request, record) = eventually(
            Duration::from_secs(60),
            &format!("the request span and the record span in trace {trace_id}"),
            || async {
                let spans = receiver.spans();
                let request: ReceivedSpan = spans
                    .iter()
                    .find(|s| s.trace_id == trace_id && s.kind == SPAN_KIND_SERVER && s.parent_span_id == caller)?
                    .clone();
                let record = spans.iter().find(|s| s.name == "record" && s.parent_span_id == request.span_id)?.clone();
                Some((request, record))
            },
        )
        .await;
        assert_eq!(request.service, NAME);
        assert_eq!(request.name, "POST /v1/events");
        assert_eq!(request.attribute("http.response.status_code"), Some("202"), "{request:?}");
        assert_eq!(record.trace_id, trace_id, "the record span is in the caller's trace: {record:?}");
        assert_eq!(record.attribute("topic"), Some(topics::USAGE_EVENTS), "{record:?}");
    }
    child.start_kill().expect("stop usage-ingest");
}
