//! entitlement-watcher on the real stack: grace that ends while the service is stopped
//! suspends once after the restart, the clock advanced by the CLI suspends exactly the accounts
//! whose grace ended, a case opened during grace carries the flag (once, and delivered to the
//! support platform's webhook, verified by the Standard Webhooks library), and the admin query.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use chrono::Utc;
use entitlement_watcher::{App, Settings};
use rand::Rng as _;
use tokio::process::Command;
use tributary_contracts::codec::Codec;
use tributary_contracts::fixtures;
use tributary_contracts::topics;
use tributary_contracts::types::{
    AccountFlag, CaseAction, CasePriority, CaseSeverity, CaseStatus, Contract, EntitlementChanged, EntitlementState,
    Envelope, FlagAction, Payment, PaymentStatus, SupportAccountFlag, SupportCase,
};
use tributary_outbound::EndpointSettings;
use tributary_runtime::ServiceConfig;
use tributary_runtime::clock::ClockMode;
use tributary_runtime::service::RunningService;
use tributary_tests::kafka::{Read, codec, produce, produce_keyed, producer, read_to_end};
use tributary_tests::webhook::Receiver;
use tributary_tests::{Stack, eventually, stack, unique_name, workspace_binary};

/// One test's isolated world: topics under a unique prefix, its own group, its own clock topic.
struct Watcher {
    stack: &'static Stack,
    prefix: String,
    group: String,
    codec: Codec,
}

impl Watcher {
    fn new() -> Self {
        let stack = stack();
        let prefix = format!("{}.", unique_name("ew"));
        Self { stack, codec: codec(stack, &prefix), group: unique_name("entitlement-watcher"), prefix }
    }

    fn config(&self) -> ServiceConfig<Settings> {
        let mut config = self.stack.service_config::<Settings>("entitlement-watcher");
        config.kafka.group_id = Some(self.group.clone());
        config.kafka.transactional_id_prefix = Some(self.group.clone());
        config.kafka.topic_prefix = self.prefix.clone();
        config.runtime.instance_id = "ew-0".into();
        config.runtime.clock = ClockMode::Controlled;
        config
    }

    async fn start(&self, config: ServiceConfig<Settings>) -> RunningService {
        tributary_tests::spawn_ready::<App>(config).await
    }

    fn topic(&self, topic: &str) -> String {
        format!("{}{topic}", self.prefix)
    }

    /// A customer and a contract with `grace_days` for each account.
    async fn publish_master_data(&self, accounts: &[(&str, i32)]) -> Vec<Contract> {
        let term_start = Utc::now() - chrono::Duration::days(40);
        let mut customers = Vec::new();
        let mut contracts = Vec::new();
        for (account, grace_days) in accounts {
            let customer = fixtures::customer(account, "EUR", term_start);
            customers.push((customer.customer_id.clone(), customer));
            let mut contract = fixtures::contract(account, "plan", "EUR", "api_calls", "1000", term_start);
            contract.grace_days = *grace_days;
            contracts.push(contract);
        }
        let producer = producer(self.stack);
        produce_keyed(&producer, &self.codec, &self.topic(topics::REFDATA_CUSTOMERS), &customers).await;
        let keyed: Vec<(String, Contract)> = contracts.iter().map(|c| (c.contract_id.clone(), c.clone())).collect();
        produce_keyed(&producer, &self.codec, &self.topic(topics::REFDATA_CONTRACTS), &keyed).await;
        contracts
    }

    async fn produce<T: tributary_contracts::Contract>(&self, values: &[T]) {
        produce(&producer(self.stack), &self.codec, &self.topic(T::TOPIC), values).await;
    }

    async fn read<T: tributary_contracts::Contract>(&self) -> Vec<T> {
        let records: Vec<Read<T>> = read_to_end(self.stack, &self.codec, &self.topic(T::TOPIC)).await;
        records.into_iter().map(|r| r.value.expect("every record decodes")).collect()
    }

    /// The changes so far, by account, in order.
    async fn changes(&self) -> BTreeMap<String, Vec<EntitlementChanged>> {
        let mut by_account: BTreeMap<String, Vec<EntitlementChanged>> = BTreeMap::new();
        for change in self.read::<EntitlementChanged>().await {
            by_account.entry(change.envelope.account_id.clone()).or_default().push(change);
        }
        by_account
    }

    async fn wait_for_changes(&self, count: usize, what: &str) -> BTreeMap<String, Vec<EntitlementChanged>> {
        eventually(Duration::from_secs(60), what, || async {
            let changes = self.changes().await;
            (changes.values().map(Vec::len).sum::<usize>() >= count).then_some(changes)
        })
        .await
    }

    /// Runs `tributary clock <args>` against the world's deployment.
    async fn clock(&self, args: &[&str]) -> String {
        let mut command = vec!["clock"];
        command.extend_from_slice(args);
        self.cli(&command).await
    }

    /// Runs `tributary <args>` against the world's deployment; returns what it printed.
    async fn cli(&self, args: &[&str]) -> String {
        let output = Command::new(workspace_binary("tributary"))
            .args(["--bootstrap-servers", &self.stack.bootstrap, "--topic-prefix", &self.prefix])
            .args(["--registry-url", &self.stack.registry_url])
            .args(args)
            .output()
            .await
            .expect("run tributary");
        assert!(output.status.success(), "tributary {args:?}: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

fn failure(account: &str, invoice: &str) -> Payment {
    fixtures::payment(account, invoice, 1, PaymentStatus::Failed, "250", "EUR", Utc::now())
}

fn states(changes: &[EntitlementChanged]) -> Vec<EntitlementState> {
    changes.iter().map(|c| c.to_state).collect()
}

fn case(account: &str, case_id: &str, action: CaseAction) -> SupportCase {
    SupportCase {
        envelope: Envelope::originating("zendesk", account, Utc::now()),
        case_id: case_id.into(),
        action,
        severity: CaseSeverity::Sev2,
        priority: CasePriority::High,
        status: CaseStatus::Open,
        subject: "Dashboard does not load".into(),
        opened_at: Utc::now().timestamp_millis(),
        closed_at: None,
        contract_id: None,
        url: None,
        tags: vec![],
    }
}

#[tokio::test]
async fn grace_that_ends_while_the_service_is_stopped_suspends_exactly_those_accounts_once_after_the_restart() {
    let world = Watcher::new();
    // Grace of 14 days for the first two, 30 for the third; the fourth pays during grace.
    world.publish_master_data(&[("acct-a", 14), ("acct-b", 14), ("acct-long", 30), ("acct-paid", 14)]).await;
    let service = world.start(world.config()).await;
    let failures: Vec<Payment> =
        ["acct-a", "acct-b", "acct-long", "acct-paid"].iter().map(|a| failure(a, &format!("in-{a}"))).collect();
    world.produce(&failures).await;
    world.wait_for_changes(4, "four accounts in grace").await;
    let paid = fixtures::payment("acct-paid", "in-acct-paid", 2, PaymentStatus::Succeeded, "250", "EUR", Utc::now());
    world.produce(&[paid]).await;
    world.wait_for_changes(5, "the paying account restored").await;
    service.stop().await.expect("clean stop");

    world.clock(&["advance", "15d"]).await;
    assert!(world.clock(&["show"]).await.contains("system clock + 15days"));
    let service = world.start(world.config()).await;
    let changes = world.wait_for_changes(7, "two suspensions after the restart").await;
    // A few more ticks of the clock: nothing may fire twice.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let changes_later = world.changes().await;
    assert_eq!(changes, changes_later, "no transition after the suspensions");

    use EntitlementState::{Active, Grace, Suspended};
    assert_eq!(states(&changes["acct-a"]), vec![Grace, Suspended]);
    assert_eq!(states(&changes["acct-b"]), vec![Grace, Suspended]);
    assert_eq!(states(&changes["acct-long"]), vec![Grace], "30 days of grace have not ended");
    assert_eq!(states(&changes["acct-paid"]), vec![Grace, Active], "paid during grace: never suspended");
    let suspension = &changes["acct-a"][1];
    assert_eq!(suspension.envelope.causation_id, None, "a grace-expiry timer");
    assert_eq!(suspension.grace_ends_at, None);
    assert_eq!(suspension.outstanding_amount, Some(fixtures::dec("250")));

    // The clock moved by the CLI again: now the long grace ends too, once.
    world.clock(&["advance", "16d"]).await;
    let changes = world.wait_for_changes(8, "the long grace ended").await;
    assert_eq!(states(&changes["acct-long"]), vec![Grace, Suspended]);
    let flags = world.read::<SupportAccountFlag>().await;
    let suspended_flags = flags.iter().filter(|f| f.flag == AccountFlag::Suspended && f.action == FlagAction::Set);
    assert_eq!(suspended_flags.count(), 3, "one SUSPENDED flag per suspended account: {flags:?}");
    service.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_case_opened_during_grace_carries_the_flag_once_and_reaches_the_support_platform() {
    let world = Watcher::new();
    let key: [u8; 32] = rand::rng().random();
    let secret = format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode(key));
    let receiver = Receiver::start(&secret).await;
    let mut config = world.config();
    config.service.delivery.endpoints = vec![EndpointSettings {
        name: "support".into(),
        topic: topics::SUPPORT_ACCOUNT_FLAGS.into(),
        url: receiver.url(),
        secrets: vec![secret.clone()],
        timeout: Duration::from_secs(5),
        retry_schedule: [1, 1, 2, 2, 5, 5, 10, 10, 10, 10].map(Duration::from_secs).to_vec(),
        ..EndpointSettings::default()
    }];
    world.publish_master_data(&[("acct-case", 14)]).await;
    let service = world.start(config).await;

    let first = failure("acct-case", "in-1");
    world.produce(std::slice::from_ref(&first)).await;
    world.wait_for_changes(1, "the account in grace").await;
    world.produce(&[case("acct-case", "48213", CaseAction::Opened)]).await;
    eventually(Duration::from_secs(60), "the case flag", || async {
        let flags = world.read::<SupportAccountFlag>().await;
        (flags.len() >= 2).then_some(())
    })
    .await;
    // The same failure relayed again under a new event id, and an update of the same case:
    // neither is a new cause for a flag.
    let mut relayed = first.clone();
    relayed.envelope.event_id = uuid::Uuid::new_v4().to_string();
    world.produce(&[relayed]).await;
    world.produce(&[case("acct-case", "48213", CaseAction::Updated)]).await;
    // A marker after them, on the same partition: once its flag is there, they were processed.
    world.produce(&[case("acct-case", "48214", CaseAction::Opened)]).await;
    let flags = eventually(Duration::from_secs(60), "the marker case's flag", || async {
        let flags = world.read::<SupportAccountFlag>().await;
        flags.iter().any(|f| f.case_id.as_deref() == Some("48214")).then_some(flags)
    })
    .await;

    let summary: Vec<(AccountFlag, FlagAction, Option<String>)> =
        flags.iter().map(|f| (f.flag, f.action, f.case_id.clone())).collect();
    assert_eq!(
        summary,
        vec![
            (AccountFlag::PaymentGrace, FlagAction::Set, None),
            (AccountFlag::PaymentGrace, FlagAction::Set, Some("48213".into())),
            (AccountFlag::PaymentGrace, FlagAction::Set, Some("48214".into())),
        ],
        "one flag per cause"
    );
    let on_case = &flags[1];
    assert_eq!(on_case.entitlement_state, Some(EntitlementState::Grace));
    assert_eq!(on_case.amount_due, Some(fixtures::dec("250")));
    assert!(on_case.note.as_deref().unwrap_or_default().contains("EUR 250.00 overdue"), "{:?}", on_case.note);

    // The admin query, over HTTP.
    let url = format!("http://{}/accounts/acct-case/entitlement", service.admin_addr);
    let answer: serde_json::Value = reqwest::get(&url).await.unwrap().json().await.unwrap();
    assert_eq!(answer["state"], "GRACE", "{answer}");
    assert_eq!(answer["outstanding_amount"], "250");
    assert_eq!(answer["open_cases"], serde_json::json!(["48213", "48214"]));
    let unknown =
        reqwest::get(format!("http://{}/accounts/acct-nobody/entitlement", service.admin_addr)).await.unwrap();
    assert_eq!(unknown.status(), reqwest::StatusCode::NOT_FOUND);

    // Every flag reached the support platform's webhook, verified by the library, once each.
    let deliveries = eventually(Duration::from_secs(60), "three verified deliveries", || async {
        let deliveries = receiver.deliveries();
        (deliveries.len() >= 3).then_some(deliveries)
    })
    .await;
    let cases: Vec<serde_json::Value> = deliveries.iter().map(|d| d.body["data"]["case_id"].clone()).collect();
    assert_eq!(cases, vec![serde_json::Value::Null, "48213".into(), "48214".into()], "{deliveries:?}");
    assert!(receiver.refusals().is_empty(), "{:?}", receiver.refusals());

    // Finance suspends the account by hand, through the CLI: MANUAL, with who and why.
    let printed = world
        .cli(&[
            "entitlement",
            "override",
            "acct-case",
            "--to",
            "SUSPENDED",
            "--by",
            "jane@finance",
            "--reason",
            "chargeback under review",
        ])
        .await;
    assert!(printed.contains("override of acct-case"), "{printed}");
    let changes = world.wait_for_changes(2, "the manual suspension").await;
    let manual = &changes["acct-case"][1];
    assert_eq!(manual.to_state, EntitlementState::Suspended);
    assert_eq!(manual.reason, tributary_contracts::types::TransitionReason::Manual);
    assert_eq!(manual.reason_detail.as_deref(), Some("by jane@finance: chargeback under review"));
    let answer: serde_json::Value = reqwest::get(&url).await.unwrap().json().await.unwrap();
    assert_eq!((answer["state"].as_str(), answer["manual_hold"].as_bool()), (Some("SUSPENDED"), Some(true)));
    service.stop().await.expect("clean stop");
}
