//! billing-router on the real stack: charges and their postings from threshold crossings and a
//! period's close, invoices, voids and payments routed, master-data failures through the DLQ
//! and back, and each posting request exactly once while the binary is SIGKILLed.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use billing_router::{App, NAME, Settings};
use chrono::{DateTime, Utc};
use rand::Rng as _;
use tributary_contracts::codec::Codec;
use tributary_contracts::fixtures::{self, dec};
use tributary_contracts::topics;
use tributary_contracts::types::{
    Contract, CrmAccountUpdate, CrmUpdateKind, Customer, Envelope, ErpDocumentType, ErpPosting, InvoiceStatus,
    OverageCharge, PaymentStatus, UsageRecorded, UsageThresholdCrossed, WindowKind,
};
use tributary_runtime::ServiceConfig;
use tributary_runtime::dlq::{self, ReplayFilter};
use tributary_runtime::service::RunningService;
use tributary_tests::kafka::{Read, codec, produce, produce_keyed, producer, read_to_end, trickle};
use tributary_tests::{Stack, eventually, stack, unique_name, workspace_binary};

const METER: &str = "api_calls";
const PLAN: &str = "plan-pro";

/// One test's isolated world: topics under a unique prefix, its own group.
pub(crate) struct Router {
    pub(crate) stack: &'static Stack,
    pub(crate) prefix: String,
    pub(crate) group: String,
    pub(crate) codec: Codec,
    /// The current billing period: this calendar month.
    pub(crate) period: (DateTime<Utc>, DateTime<Utc>),
}

fn month_of(now: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
    use chrono::{Datelike, TimeZone};
    let start = Utc.with_ymd_and_hms(now.year(), now.month(), 1, 0, 0, 0).unwrap();
    (start, start.checked_add_months(chrono::Months::new(1)).unwrap())
}

impl Router {
    pub(crate) fn new() -> Self {
        let stack = stack();
        let prefix = format!("{}.", unique_name("br"));
        Self {
            stack,
            codec: codec(stack, &prefix),
            group: unique_name("billing-router"),
            prefix,
            period: month_of(Utc::now()),
        }
    }

    pub(crate) fn config(&self) -> ServiceConfig<Settings> {
        let mut config = self.stack.service_config::<Settings>("billing-router");
        config.kafka.group_id = Some(self.group.clone());
        config.kafka.transactional_id_prefix = Some(self.group.clone());
        config.kafka.topic_prefix = self.prefix.clone();
        config.runtime.instance_id = "br-0".into();
        config.service.default_overage_product = Some("USAGE-OVERAGE".into());
        config
    }

    pub(crate) async fn start(&self) -> RunningService {
        self.start_with(self.config()).await
    }

    pub(crate) async fn start_with(&self, config: ServiceConfig<Settings>) -> RunningService {
        tributary_tests::spawn_ready::<App>(config).await
    }

    pub(crate) fn topic(&self, topic: &str) -> String {
        format!("{}{topic}", self.prefix)
    }

    /// The master data of `accounts`: a customer, a contract including 1,000 calls a month, and
    /// the per-unit plan (0.10 USD a call) they share.
    pub(crate) async fn publish_master_data(&self, accounts: &[String]) -> Vec<Contract> {
        let term_start = self.period.0 - chrono::Duration::days(40);
        let customers: Vec<(String, Customer)> = accounts
            .iter()
            .map(|a| fixtures::customer(a, "USD", term_start))
            .map(|c| (c.customer_id.clone(), c))
            .collect();
        let contracts: Vec<Contract> =
            accounts.iter().map(|a| fixtures::contract(a, PLAN, "USD", METER, "1000", term_start)).collect();
        let plan = fixtures::price_plan(PLAN, "USD", vec![fixtures::per_unit(METER, "0.10")], term_start);
        self.publish(&customers).await;
        self.publish(&contracts.iter().map(|c| (c.contract_id.clone(), c.clone())).collect::<Vec<_>>()).await;
        self.publish(&[(PLAN.to_owned(), plan)]).await;
        contracts
    }

    pub(crate) async fn publish<T: tributary_contracts::Contract>(&self, records: &[(String, T)]) {
        produce_keyed(&producer(self.stack), &self.codec, &self.topic(T::TOPIC), records).await;
    }

    pub(crate) async fn produce<T: tributary_contracts::Contract>(&self, values: &[T]) {
        produce(&producer(self.stack), &self.codec, &self.topic(T::TOPIC), values).await;
    }

    pub(crate) async fn read<T: tributary_contracts::Contract>(&self) -> Vec<T> {
        let records: Vec<Read<T>> = read_to_end(self.stack, &self.codec, &self.topic(T::TOPIC)).await;
        records.into_iter().map(|r| r.value.expect("every record decodes")).collect()
    }

    pub(crate) async fn wait_for<T: tributary_contracts::Contract>(&self, count: usize) -> Vec<T> {
        eventually(Duration::from_secs(60), &format!("{count} records on {}", T::TOPIC), || async {
            let records = self.read::<T>().await;
            (records.len() >= count).then_some(records)
        })
        .await
    }

    pub(crate) fn crossing(&self, contract: &Contract, percent: i32, used: &str) -> UsageThresholdCrossed {
        fixtures::crossing(contract, METER, percent, used, self.period, Utc::now())
    }

    pub(crate) fn final_total(&self, contract: &Contract, used: &str) -> UsageRecorded {
        let mut envelope = Envelope::originating("tributary.usage-ingest", &contract.envelope.account_id, Utc::now());
        envelope.source = "tributary.usage-ingest".into();
        UsageRecorded {
            envelope,
            subscription_id: Some(contract.subscription_id.clone()),
            contract_id: Some(contract.contract_id.clone()),
            meter: METER.into(),
            unit: "call".into(),
            window_kind: WindowKind::BillingPeriod,
            window_start: self.period.0.timestamp_millis(),
            window_end: self.period.1.timestamp_millis(),
            total_quantity: dec(used),
            event_count: 1,
            last_event_at: Utc::now().timestamp_millis(),
            dimensions: Default::default(),
            sequence: 99,
            is_final: true,
        }
    }
}

pub(crate) fn accounts(prefix: &str, count: usize) -> Vec<String> {
    (0..count).map(|i| format!("{prefix}-{i:02}")).collect()
}

#[tokio::test]
async fn a_crossing_charges_the_overage_once_and_the_120_percent_and_the_close_charge_the_differences() {
    let world = Router::new();
    let contracts = world.publish_master_data(&accounts("acct-charge", 1)).await;
    let contract = &contracts[0];
    let service = world.start().await;
    world.produce(&[world.crossing(contract, 80, "800")]).await;
    world.produce(&[world.crossing(contract, 100, "1010")]).await;
    world.wait_for::<OverageCharge>(1).await;
    world.produce(&[world.crossing(contract, 120, "1200")]).await;
    world.wait_for::<OverageCharge>(2).await; // usage.recorded is another topic: keep the order
    world.produce(&[world.final_total(contract, "1345")]).await;
    let charges = world.wait_for::<OverageCharge>(3).await;
    let postings = world.wait_for::<ErpPosting>(3).await;
    service.stop().await.expect("clean stop");

    let amounts: Vec<_> = charges.iter().map(|c| (c.rated_amount, c.amount)).collect();
    assert_eq!(amounts, vec![(dec("1"), dec("1")), (dec("20"), dec("19")), (dec("34.5"), dec("14.5"))]);
    assert!(charges[2].period_final);
    for (charge, posting) in charges.iter().zip(&postings) {
        assert_eq!(posting.document_type, ErpDocumentType::Invoice);
        assert_eq!(posting.external_reference, format!("tributary:charge:{}", charge.charge_id));
        assert_eq!(posting.total_amount, charge.amount);
        assert_eq!(posting.erp_party_ref, format!("C-{}", contract.envelope.account_id));
        assert_eq!(posting.lines[0].product_code.as_deref(), Some("USAGE-OVERAGE"));
    }
    let crm = world.read::<CrmAccountUpdate>().await;
    let kinds: Vec<_> = crm.iter().map(|u| u.kind).collect();
    assert_eq!(
        kinds,
        vec![
            CrmUpdateKind::UsageThreshold,
            CrmUpdateKind::OverageCharged,
            CrmUpdateKind::OverageCharged,
            CrmUpdateKind::OverageCharged
        ]
    );
}

#[tokio::test]
async fn an_invoice_a_void_and_a_payment_are_routed_to_the_erp_and_the_crm() {
    let world = Router::new();
    let account = accounts("acct-invoice", 1).remove(0);
    world.publish_master_data(std::slice::from_ref(&account)).await;
    let service = world.start().await;
    let now = Utc::now();
    let issued = fixtures::invoice(&account, "in-e2e-1", "USD", "100", "19", now);
    let paid = fixtures::invoice(&account, "in-e2e-2", "USD", "50", "0", now);
    world.produce(&[issued.clone(), paid.clone()]).await;
    let mut void = issued.clone();
    void.status = InvoiceStatus::Void;
    void.envelope = Envelope::originating("stripe", &account, now);
    world.produce(&[void]).await;
    // Payments are another topic: the invoice they settle is mirrored first.
    world.wait_for::<ErpPosting>(3).await;
    world
        .produce(&[
            fixtures::payment(&account, "in-e2e-2", 1, PaymentStatus::Failed, "50", "USD", now),
            fixtures::payment(&account, "in-e2e-2", 2, PaymentStatus::Succeeded, "50", "USD", now),
        ])
        .await;
    let postings = world.wait_for::<ErpPosting>(4).await;
    let crm = world.wait_for::<CrmAccountUpdate>(4).await;
    service.stop().await.expect("clean stop");

    let documents: Vec<(ErpDocumentType, &str)> =
        postings.iter().map(|p| (p.document_type, p.external_reference.as_str())).collect();
    assert_eq!(
        documents,
        vec![
            (ErpDocumentType::Invoice, "tributary:invoice:in-e2e-1"),
            (ErpDocumentType::Invoice, "tributary:invoice:in-e2e-2"),
            (ErpDocumentType::CreditNote, "tributary:credit-note:in-e2e-1"),
            (ErpDocumentType::Payment, "tributary:payment:pay-in-e2e-2-2"),
        ]
    );
    assert_eq!(postings[0].total_amount, dec("119"));
    assert_eq!(postings[2].original_document_ref.as_deref(), Some("tributary:invoice:in-e2e-1"));
    let settled = postings[3].payment.as_ref().unwrap();
    assert_eq!(settled.invoice_external_reference.as_deref(), Some("tributary:invoice:in-e2e-2"));
    let kinds: BTreeSet<_> = crm.iter().map(|u| format!("{:?}", u.kind)).collect();
    assert_eq!(kinds, ["InvoiceIssued", "InvoiceVoided", "PaymentRecovered"].map(String::from).into());
}

#[tokio::test]
async fn master_data_failures_land_in_the_dlq_with_their_class_and_are_routed_once_after_the_fix_and_a_replay() {
    let world = Router::new();
    let names = accounts("acct-broken", 3);
    let contracts = world.publish_master_data(&names).await;
    // Three ways to be broken: a customer not in the ERP, a contract whose customer is
    // unknown, an invoice that does not add up.
    let mut no_party = fixtures::customer(&names[0], "USD", world.period.0);
    no_party.erp_party_ref = None;
    no_party.version = 2;
    world.publish(&[(no_party.customer_id.clone(), no_party.clone())]).await;
    let mut orphan = contracts[1].clone();
    orphan.customer_id = "cus-nobody".into();
    orphan.version = 2;
    world.publish(&[(orphan.contract_id.clone(), orphan.clone())]).await;
    let mut wrong = fixtures::invoice(&names[2], "in-wrong", "USD", "100", "10", Utc::now());
    wrong.total_amount = dec("111");

    let service = world.start().await;
    world.produce(&[world.crossing(&contracts[0], 120, "1200"), world.crossing(&orphan, 120, "1200")]).await;
    world.produce(&[wrong.clone()]).await;
    let config = world.config();
    let letters = eventually(Duration::from_secs(60), "three dead letters", || async {
        let letters = dlq::list(&config.kafka, NAME).await.unwrap();
        (letters.len() >= 3).then_some(letters)
    })
    .await;
    let classes: BTreeSet<String> = letters.iter().filter_map(|l| l.letter.as_ref()).map(|l| l.class.clone()).collect();
    assert_eq!(
        classes,
        ["amounts_mismatch", "customer_without_erp_party", "unknown_customer"].map(String::from).into()
    );
    assert!(world.read::<ErpPosting>().await.is_empty(), "nothing posted on a guess");
    let metrics = reqwest::get(format!("http://{}/metrics", service.admin_addr)).await.unwrap().text().await.unwrap();
    assert!(metrics.contains(r#"class="customer_without_erp_party""#), "counted by class: {metrics}");

    // The master data is fixed and the invoice corrected at its source; the DLQ replayed twice.
    let mut party = no_party.clone();
    party.erp_party_ref = Some(format!("C-{}", names[0]));
    party.version = 3;
    world.publish(&[(party.customer_id.clone(), party)]).await;
    let mut fixed = orphan.clone();
    fixed.customer_id = contracts[1].customer_id.clone();
    fixed.version = 3;
    world.publish(&[(fixed.contract_id.clone(), fixed)]).await;
    // The tables pick the fixes up on their own time: replay until both crossings are posted.
    // A replay that comes before a fix is dead-lettered again and replayed with the rest; every
    // copy carries the same idempotency key, so the crossing is routed once however often.
    let master_data = ReplayFilter { class: Some("customer_without_erp_party".into()), ..ReplayFilter::default() };
    let unknown = ReplayFilter { class: Some("unknown_customer".into()), ..ReplayFilter::default() };
    let postings = eventually(Duration::from_secs(90), "both crossings posted after the fix", || async {
        dlq::replay(&config.kafka, NAME, &master_data, None, false).await.unwrap();
        dlq::replay(&config.kafka, NAME, &unknown, None, false).await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let postings = world.read::<ErpPosting>().await;
        (postings.len() >= 2).then_some(postings)
    })
    .await;
    dlq::replay(&config.kafka, NAME, &master_data, None, false).await.unwrap(); // once more: a no-op
    let marker = world.crossing(&contracts[2], 120, "1100");
    world.produce(&[marker]).await;
    world.wait_for::<ErpPosting>(3).await;
    service.stop().await.expect("clean stop");

    let postings_after = world.read::<ErpPosting>().await;
    assert_eq!(postings_after.len(), 3, "each replayed crossing posted once, then the marker: {postings:?}");
    let parties: BTreeSet<&str> = postings_after.iter().map(|p| p.erp_party_ref.as_str()).collect();
    assert_eq!(parties.len(), 3);
    assert_eq!(world.read::<OverageCharge>().await.len(), 3);
}

#[tokio::test]
async fn each_posting_request_is_written_exactly_once_while_the_binary_is_killed_at_random_moments() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;

    let world = Router::new();
    let names = accounts("acct-crash", 12);
    let contracts = world.publish_master_data(&names).await;
    // Per account: 100 % at 1,100 calls, 120 % at 1,200, 150 % at 1,500, the close at 1,750.
    let steps = [(100, "1100"), (120, "1200"), (150, "1500")];
    let mut inputs: Vec<(String, UsageThresholdCrossed)> = Vec::new();
    for (percent, used) in steps {
        for contract in &contracts {
            inputs.push((contract.envelope.account_id.clone(), world.crossing(contract, percent, used)));
        }
    }
    let finals: Vec<(String, UsageRecorded)> =
        contracts.iter().map(|c| (c.envelope.account_id.clone(), world.final_total(c, "1750"))).collect();
    let feeder = trickle(
        world.stack,
        world.codec.clone(),
        world.topic(topics::USAGE_THRESHOLDS),
        inputs,
        3,
        Duration::from_millis(300),
    );
    let closer = trickle(
        world.stack,
        world.codec.clone(),
        world.topic(topics::USAGE_RECORDED),
        finals,
        2,
        Duration::from_millis(900),
    );

    let config_file = std::env::temp_dir().join(format!("{}.toml", unique_name("billing-router")));
    std::fs::write(&config_file, "[billing_router]\ndefault_overage_product = \"USAGE-OVERAGE\"\n").unwrap();
    let spawn_binary = || {
        tokio::process::Command::new(workspace_binary("billing-router"))
            .envs(world.stack.service_env())
            .env("TRIBUTARY_CONFIG", &config_file)
            .env("TRIBUTARY__KAFKA__TOPIC_PREFIX", &world.prefix)
            .env("TRIBUTARY__KAFKA__GROUP_ID", &world.group)
            .env("TRIBUTARY__KAFKA__TRANSACTIONAL_ID_PREFIX", &world.group)
            .env("TRIBUTARY__RUNTIME__INSTANCE_ID", "crashy")
            .env("TRIBUTARY__ADMIN__LISTEN", "127.0.0.1:0")
            .env("TRIBUTARY__LOG__FILTER", std::env::var("BR_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(if std::env::var_os("BR_LOG").is_some() {
                std::process::Stdio::inherit()
            } else {
                std::process::Stdio::null()
            })
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start billing-router")
    };
    let mut rng = rand::rng();
    for crash in 0..4 {
        let mut child = spawn_binary();
        tokio::time::sleep(Duration::from_millis(rng.random_range(2_000..4_000))).await;
        kill(Pid::from_raw(child.id().expect("running") as i32), Signal::SIGKILL).expect("SIGKILL");
        assert!(!child.wait().await.expect("wait").success(), "crash {crash}: the process was killed");
    }
    feeder.await.expect("feeder");
    closer.await.expect("closer");
    let mut last = spawn_binary();
    // Per account the overage ends at 750 calls: 75 USD in all, however the steps were split
    // (the crossings and the close are two topics, read in any order after a crash).
    let charged = |charges: &[OverageCharge]| {
        let mut per_account: BTreeMap<String, rust_decimal::Decimal> = BTreeMap::new();
        for charge in charges {
            *per_account.entry(charge.envelope.account_id.clone()).or_default() += charge.amount.value();
        }
        per_account
    };
    eventually(Duration::from_secs(120), "every account charged 75 USD", || async {
        let per_account = charged(&world.read::<OverageCharge>().await);
        names.iter().all(|a| per_account.get(a) == Some(&dec("75").value())).then_some(())
    })
    .await;
    // The posting requests of the last charges follow them in the same transaction.
    kill(Pid::from_raw(last.id().expect("running") as i32), Signal::SIGTERM).expect("SIGTERM");
    let status = tokio::time::timeout(Duration::from_secs(30), last.wait()).await.expect("stops").expect("wait");
    assert_eq!(status.code(), Some(0));

    let charges = world.read::<OverageCharge>().await;
    let postings = world.read::<ErpPosting>().await;
    let once = |ids: Vec<String>, what: &str| {
        let mut seen = BTreeSet::new();
        let doubled: Vec<&String> = ids.iter().filter(|id| !seen.insert(id.as_str())).collect();
        assert!(doubled.is_empty(), "{what} written twice: {doubled:?}");
        seen.into_iter().map(str::to_owned).collect::<BTreeSet<String>>()
    };
    let charge_ids = once(charges.iter().map(|c| c.charge_id.clone()).collect(), "charges");
    let references = once(postings.iter().map(|p| p.external_reference.clone()).collect(), "posting requests");
    let expected: BTreeSet<String> = charge_ids.iter().map(|id| format!("tributary:charge:{id}")).collect();
    assert_eq!(references, expected, "exactly one posting request per charge");
    for (account, total) in charged(&charges) {
        assert_eq!(total, dec("75").value(), "{account}: the charges sum to the rating of the final overage");
    }
}
