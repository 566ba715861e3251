//! billing-router's logic on the runtime's test driver: rating of every pricing model, charges
//! cumulative per period, postings and CRM updates, and every reason to dead-letter, each
//! routed once after the master data is fixed. No broker; time is the driver's clock.

use std::time::Duration;

use billing_router::MasterData;
use billing_router::masterdata::class;
use billing_router::processor::{RouterMetrics, RouterProcessor, charge_id};
use billing_router::settings::{PostingMode, Settings};
use chrono::{DateTime, Utc};
use tributary_contracts::fixtures::{self, dec};
use tributary_contracts::types::{
    ContractStatus, CrmAccountUpdate, CrmUpdateKind, Envelope, ErpDocumentType, ErpPosting, InvoiceLine,
    InvoiceLineKind, InvoiceStatus, OverageCharge, PaymentStatus, PricePlan, PricingModel, RoundingMode, UsageRecorded,
    WindowKind,
};
use tributary_runtime::testing::{DriverBuilder, Outcome, TestDriver};

const ACCOUNT: &str = "acct-1";
const METER: &str = "api_calls";
const PLAN: &str = "plan-pro";

fn at(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text).unwrap().to_utc()
}

/// March 2026, the period of every test.
fn march() -> (DateTime<Utc>, DateTime<Utc>) {
    (at("2026-03-01T00:00:00Z"), at("2026-04-01T00:00:00Z"))
}

struct World {
    master: MasterData,
    driver: TestDriver<RouterProcessor>,
}

impl World {
    fn new(settings: Settings) -> Self {
        let master = MasterData::default();
        let processor = RouterProcessor::new(master.clone(), settings, RouterMetrics::default());
        let driver =
            DriverBuilder::new().service("billing-router").start_at(at("2026-03-10T12:00:00Z")).build(processor);
        Self { master, driver }
    }

    /// A customer, a contract including 1,000 calls a month and `plan`.
    fn with(plan: PricePlan) -> Self {
        let world = Self::new(Settings::default());
        world.master_data(plan);
        world
    }

    fn master_data(&self, plan: PricePlan) {
        let currency = plan.currency.clone();
        let customer = fixtures::customer(ACCOUNT, &currency, at("2026-01-01T00:00:00Z"));
        self.master.customers.apply(&customer.customer_id, Some(customer.clone()));
        let contract = fixtures::contract(ACCOUNT, PLAN, &currency, METER, "1000", at("2026-01-01T00:00:00Z"));
        self.master.contracts.apply(&contract.contract_id.clone(), Some(contract));
        self.master.plans.apply(&plan.price_plan_id.clone(), Some(plan));
    }

    fn contract(&self) -> tributary_contracts::types::Contract {
        (*self.master.contracts.get("ctr-acct-1").unwrap()).clone()
    }

    async fn cross(&mut self, percent: i32, used: &str) -> Outcome {
        let crossing = fixtures::crossing(&self.contract(), METER, percent, used, march(), self.driver.now());
        self.driver.pipe(crossing).await
    }

    async fn close_period(&mut self, used: &str) -> Outcome {
        let (start, end) = march();
        let mut envelope = Envelope::originating("tributary.usage-ingest", ACCOUNT, end);
        envelope.source = "tributary.usage-ingest".into();
        let total = UsageRecorded {
            envelope,
            subscription_id: Some("sub-acct-1".into()),
            contract_id: Some("ctr-acct-1".into()),
            meter: METER.into(),
            unit: "call".into(),
            window_kind: WindowKind::BillingPeriod,
            window_start: start.timestamp_millis(),
            window_end: end.timestamp_millis(),
            total_quantity: dec(used),
            event_count: 1,
            last_event_at: end.timestamp_millis() - 1,
            dimensions: Default::default(),
            sequence: 9,
            is_final: true,
        };
        self.driver.pipe(total).await
    }

    async fn charges(&mut self) -> Vec<OverageCharge> {
        self.driver.read().await
    }

    async fn postings(&mut self) -> Vec<ErpPosting> {
        self.driver.read().await
    }

    async fn crm(&mut self) -> Vec<CrmAccountUpdate> {
        self.driver.read().await
    }
}

fn plan(prices: Vec<tributary_contracts::types::MeterPrice>) -> PricePlan {
    fixtures::price_plan(PLAN, "USD", prices, at("2026-01-01T00:00:00Z"))
}

fn graduated() -> tributary_contracts::types::MeterPrice {
    let mut price = fixtures::meter_price(METER, PricingModel::Graduated);
    price.tiers = vec![
        fixtures::tier(Some("100"), "0.10", None),
        fixtures::tier(Some("1000"), "0.05", Some("2.50")),
        fixtures::tier(None, "0.01", Some("10")),
    ];
    price
}

/// (model's price, used in the period, rated amount of the whole overage, charged amount).
#[tokio::test]
async fn every_pricing_model_rates_the_overage_as_the_plan_documents() {
    let mut volume = fixtures::meter_price(METER, PricingModel::Volume);
    volume.tiers = vec![fixtures::tier(Some("100"), "0.20", None), fixtures::tier(None, "0.10", Some("5"))];
    let mut package = fixtures::meter_price(METER, PricingModel::Package);
    package.unit_price = Some(dec("7.50"));
    package.package_size = Some(dec("250"));
    let cases = [
        (fixtures::per_unit(METER, "0.015"), "1001", "0.015", "0.02"),
        (fixtures::per_unit(METER, "0.015"), "1500", "7.5", "7.50"),
        (graduated(), "1050", "5", "5.00"),       // inside the first tier
        (graduated(), "1100", "10", "10.00"),     // exactly its bound: the second is not entered
        (graduated(), "1101", "12.55", "12.55"),  // 10 + (2.50 + 0.05)
        (graduated(), "2000", "57.5", "57.50"),   // 10 + (2.50 + 45) at the second bound
        (graduated(), "2500", "72.5", "72.50"),   // + (10 + 5) in the last tier
        (volume.clone(), "1100", "20", "20.00"),  // the bound belongs to the first tier
        (volume, "1101", "15.1", "15.10"),        // all 101 units at the second tier, + 5
        (package.clone(), "1001", "7.5", "7.50"), // a partial package is a whole one
        (package.clone(), "1250", "7.5", "7.50"),
        (package, "1251", "15", "15.00"),
    ];
    for (price, used, rated, charged) in cases {
        let model = price.model;
        let mut world = World::with(plan(vec![price]));
        assert_eq!(world.cross(120, used).await, Outcome::Processed, "{model:?} at {used}");
        let charges = world.charges().await;
        assert_eq!(charges.len(), 1, "{model:?} at {used}");
        let charge = &charges[0];
        assert_eq!((charge.rated_amount, charge.amount), (dec(rated), dec(charged)), "{model:?} at {used}");
        let steps: rust_decimal::Decimal = charge.breakdown.iter().map(|s| s.amount.value()).sum();
        assert_eq!(steps, charge.rated_amount.value(), "{model:?} at {used}: the breakdown sums to the rated amount");
        assert_eq!(charge.pricing_model, model);
    }
}

#[tokio::test]
async fn usage_at_or_below_the_included_quantity_charges_nothing() {
    let mut world = World::with(plan(vec![fixtures::per_unit(METER, "0.01")]));
    assert_eq!(world.cross(80, "800").await, Outcome::Processed);
    assert_eq!(world.cross(100, "1000").await, Outcome::Processed, "exactly the included quantity");
    assert_eq!(world.close_period("1000").await, Outcome::Processed);
    assert!(world.charges().await.is_empty());
    assert!(world.postings().await.is_empty());
    let crm = world.crm().await;
    assert_eq!(crm.iter().map(|u| u.kind).collect::<Vec<_>>(), vec![CrmUpdateKind::UsageThreshold; 2]);
    assert!(crm[1].summary.contains("100 %"), "{}", crm[1].summary);
}

#[tokio::test]
async fn charges_are_cumulative_and_sum_to_the_rating_of_the_final_overage() {
    let mut world = World::with(plan(vec![graduated()]));
    world.cross(100, "1050").await; // overage 50
    world.cross(120, "1200").await; // overage 200
    world.close_period("2345").await; // overage 1345
    let charges = world.charges().await;
    let amounts: Vec<_> = charges.iter().map(|c| (c.rated_amount, c.previously_charged_amount, c.amount)).collect();
    // 50 × 0.10 = 5; 200: 10 + 2.50 + 5 = 17.50; 1345: 10 + 47.50 + 10 + 3.45 = 70.95
    assert_eq!(
        amounts,
        vec![
            (dec("5"), dec("0"), dec("5")),
            (dec("17.5"), dec("5"), dec("12.5")),
            (dec("70.95"), dec("17.5"), dec("53.45"))
        ]
    );
    let total: rust_decimal::Decimal = charges.iter().map(|c| c.amount.value()).sum();
    assert_eq!(total, dec("70.95").value(), "the period's charges sum to its final rating");
    assert!(charges[2].period_final && !charges[1].period_final);
    assert_eq!(charges[2].threshold_percent, 234, "the final usage in percent, rounded down");
    let ids: Vec<&str> = charges.iter().map(|c| c.charge_id.as_str()).collect();
    let start = march().0.timestamp_millis();
    assert_eq!(
        ids,
        [100, 120]
            .map(|p| charge_id("ctr-acct-1", METER, start, &p.to_string()))
            .iter()
            .map(String::as_str)
            .chain([charge_id("ctr-acct-1", METER, start, "final").as_str()])
            .collect::<Vec<_>>()
    );

    // The same crossing again (re-emitted under another event id) is rated once.
    assert_eq!(world.cross(120, "1200").await, Outcome::Processed);
    assert!(world.charges().await.is_empty(), "no second charge for a step");
}

#[tokio::test]
async fn steps_that_arrive_out_of_order_never_charge_twice() {
    let mut world = World::with(plan(vec![fixtures::per_unit(METER, "0.10")]));
    world.close_period("1500").await; // the final total first: 500 × 0.10
    world.cross(120, "1200").await; // rated 20, charged 50 already
    let charges = world.charges().await;
    assert_eq!(
        charges.iter().map(|c| c.amount).collect::<Vec<_>>(),
        vec![dec("50")],
        "the later threshold charges nothing"
    );
}

#[tokio::test]
async fn the_minimum_charge_is_charged_once_then_only_what_exceeds_it() {
    let mut price = fixtures::per_unit(METER, "0.10");
    price.minimum_charge = Some(dec("25"));
    let mut world = World::with(plan(vec![price]));
    world.cross(100, "1010").await; // rated 1, raised to 25
    world.cross(120, "1200").await; // rated 20 < 25: nothing more
    world.close_period("1400").await; // rated 40: 15 more
    let charges = world.charges().await;
    assert_eq!(charges.iter().map(|c| c.amount).collect::<Vec<_>>(), vec![dec("25"), dec("15")]);
    assert!(charges[0].minimum_charge_applied);
    let raise = charges[0].breakdown.last().unwrap();
    assert_eq!((raise.tier_index, raise.amount), (None, dec("24")), "the raise is a step of its own");
}

#[tokio::test]
async fn amounts_round_once_to_the_minor_unit_of_the_currency() {
    // JPY has no minor unit, KWD three decimals; a plan may round other than half-even.
    let cases = [
        ("JPY", None, "0.5", "1001", "0", "0.5"), // 0.5 ¥, half-even: 0, nothing charged
        ("JPY", None, "1.5", "1001", "2", "1.5"),
        ("JPY", Some(RoundingMode::HalfUp), "2.5", "1001", "3", "2.5"),
        ("KWD", None, "0.0125", "1001", "0.012", "0.0125"), // ties to even at three decimals
        ("KWD", Some(RoundingMode::Up), "0.0121", "1001", "0.013", "0.0121"),
        ("EUR", None, "0.125", "1001", "0.12", "0.125"),
    ];
    for (currency, mode, unit_price, used, amount, unrounded) in cases {
        let mut plan = fixtures::price_plan(
            PLAN,
            currency,
            vec![fixtures::per_unit(METER, unit_price)],
            at("2026-01-01T00:00:00Z"),
        );
        plan.rounding_mode = mode;
        let mut world = World::with(plan);
        world.cross(120, used).await;
        let charges = world.charges().await;
        if dec(amount) == dec("0") {
            assert!(charges.is_empty(), "{currency}: nothing to charge once rounded");
            continue;
        }
        let rounding = charges[0].rounding.as_ref().unwrap();
        assert_eq!(charges[0].amount, dec(amount), "{currency} {mode:?}");
        assert_eq!(rounding.unrounded_amount, dec(unrounded));
        assert_eq!(
            rounding.minor_unit_digits,
            match currency {
                "JPY" => 0,
                "KWD" => 3,
                _ => 2,
            }
        );
        assert_eq!(rounding.mode, mode.unwrap_or(RoundingMode::HalfEven));
    }
}

#[tokio::test]
async fn a_charge_is_posted_as_an_invoice_and_told_to_the_crm() {
    let settings = Settings { default_overage_product: Some("USAGE-OVERAGE".into()), ..Settings::default() };
    let mut world = World::new(settings);
    world.master_data(plan(vec![fixtures::per_unit(METER, "0.10")]));
    world.cross(120, "1200").await;
    let charge = world.charges().await.remove(0);
    let postings = world.postings().await;
    assert_eq!(postings.len(), 1);
    let posting = &postings[0];
    assert_eq!(posting.document_type, ErpDocumentType::Invoice);
    assert_eq!(posting.external_reference, format!("tributary:charge:{}", charge.charge_id));
    assert_eq!((posting.customer_id.as_str(), posting.erp_party_ref.as_str()), ("cus-acct-1", "C-acct-1"));
    assert_eq!((posting.net_amount, posting.total_amount, posting.tax_amount), (dec("20"), dec("20"), None));
    assert_eq!(posting.lines[0].product_code.as_deref(), Some("USAGE-OVERAGE"));
    assert_eq!((posting.lines[0].quantity, posting.lines[0].unit_price), (dec("1"), dec("20")));
    assert_eq!(posting.charge_id.as_deref(), Some(charge.charge_id.as_str()));
    assert_eq!(posting.envelope.correlation_id, charge.envelope.correlation_id, "one story");
    let crm = world.crm().await;
    assert_eq!(crm.len(), 1);
    assert_eq!(crm[0].kind, CrmUpdateKind::OverageCharged);
    assert_eq!((crm[0].amount, crm[0].crm_account_id.as_deref()), (Some(dec("20")), Some("crm-acct-1")));
    assert!(crm[0].summary.starts_with("Overage charged: USD 20.00 for api_calls"), "{}", crm[0].summary);
    assert_eq!(crm[0].attributes.get("meter").map(String::as_str), Some(METER));

    // A customer that is not in the CRM gets no CRM update; the posting still goes.
    let mut world = World::with(plan(vec![fixtures::per_unit(METER, "0.10")]));
    let mut customer = (*world.master.customers.get("cus-acct-1").unwrap()).clone();
    customer.crm_account_id = None;
    customer.version = 2;
    world.master.customers.apply("cus-acct-1", Some(customer));
    world.cross(120, "1200").await;
    assert_eq!(world.postings().await.len(), 1);
    assert!(world.crm().await.is_empty());
}

#[tokio::test]
async fn per_period_posting_accrues_the_charges_into_one_invoice_when_the_period_closes() {
    let mut world = World::new(Settings { posting: PostingMode::PerPeriod, ..Settings::default() });
    world.master_data(plan(vec![fixtures::per_unit(METER, "0.10")]));
    world.cross(100, "1100").await;
    world.cross(120, "1200").await;
    assert_eq!(world.charges().await.len(), 2);
    assert!(world.postings().await.is_empty(), "accrued, not posted");

    world.driver.advance_to(at("2026-04-01T06:00:00Z")).await;
    world.close_period("1300").await; // the final total arrives after usage-ingest's grace
    assert!(world.postings().await.is_empty(), "still accrued until period end + 12 h");
    world.driver.advance_to(at("2026-04-01T12:00:00Z")).await;
    let postings = world.postings().await;
    assert_eq!(postings.len(), 1, "one invoice for the period");
    let invoice = &postings[0];
    assert_eq!(invoice.external_reference, "tributary:period:ctr-acct-1:2026-03-01");
    assert_eq!(invoice.lines.iter().map(|l| l.amount).collect::<Vec<_>>(), vec![dec("10"), dec("10"), dec("10")]);
    assert_eq!(invoice.total_amount, dec("30"));

    // A charge after the close is posted on its own.
    world.driver.advance(Duration::from_secs(3600)).await;
    world.cross(150, "1500").await;
    let late = world.postings().await;
    assert_eq!(late.len(), 1);
    assert!(late[0].external_reference.starts_with("tributary:charge:"));
}

#[tokio::test]
async fn an_issued_invoice_is_mirrored_without_tributarys_own_overage_lines_and_a_void_reverses_it() {
    let mut world = World::with(plan(vec![fixtures::per_unit(METER, "0.10")]));
    let mut invoice = fixtures::invoice(ACCOUNT, "in-1", "USD", "120", "24", world.driver.now());
    invoice.lines.push(InvoiceLine {
        line_id: "in-1-2".into(),
        kind: InvoiceLineKind::Overage,
        description: "API calls overage".into(),
        quantity: None,
        unit_amount: None,
        amount: dec("20"),
        tax_amount: Some(dec("4")),
        period_start: None,
        period_end: None,
        charge_id: Some("chg_posted_by_billing_router".into()),
    });
    invoice.lines[0].amount = dec("100");
    invoice.lines[0].unit_amount = Some(dec("100"));
    invoice.lines[0].tax_amount = Some(dec("20"));
    assert_eq!(world.driver.pipe(invoice.clone()).await, Outcome::Processed);
    assert_eq!(world.driver.pipe(invoice.clone()).await, Outcome::Duplicate);
    let mut relayed = invoice.clone();
    relayed.envelope = Envelope::originating("stripe", ACCOUNT, world.driver.now());
    world.driver.pipe(relayed).await; // the same invoice relayed again while open
    let postings = world.postings().await;
    assert_eq!(postings.len(), 1);
    let mirrored = &postings[0];
    assert_eq!(mirrored.external_reference, "tributary:invoice:in-1");
    assert_eq!(mirrored.lines.len(), 1, "the overage line is the charge's own document already");
    assert_eq!(
        (mirrored.net_amount, mirrored.tax_amount, mirrored.total_amount),
        (dec("100"), Some(dec("20")), dec("120"))
    );
    assert!(mirrored.due_date.is_some());

    let mut void = invoice.clone();
    void.status = InvoiceStatus::Void;
    void.envelope = Envelope::originating("stripe", ACCOUNT, world.driver.now());
    world.driver.pipe(void).await;
    let credit = world.postings().await.remove(0);
    assert_eq!(credit.document_type, ErpDocumentType::CreditNote);
    assert_eq!(credit.original_document_ref.as_deref(), Some("tributary:invoice:in-1"));
    assert_eq!(credit.total_amount, dec("120"));
    let kinds: Vec<_> = world.crm().await.into_iter().map(|u| u.kind).collect();
    assert_eq!(kinds, vec![CrmUpdateKind::InvoiceIssued, CrmUpdateKind::InvoiceVoided]);
}

#[tokio::test]
async fn a_successful_payment_is_posted_against_its_invoice_and_a_recovery_is_told_to_the_crm() {
    let mut world = World::with(plan(vec![fixtures::per_unit(METER, "0.10")]));
    world.driver.pipe(fixtures::invoice(ACCOUNT, "in-2", "USD", "100", "0", world.driver.now())).await;
    let now = world.driver.now();
    world.driver.pipe(fixtures::payment(ACCOUNT, "in-2", 1, PaymentStatus::Failed, "100", "USD", now)).await;
    world.driver.pipe(fixtures::payment(ACCOUNT, "in-2", 2, PaymentStatus::Succeeded, "100", "USD", now)).await;
    let postings = world.postings().await;
    let kinds: Vec<_> = postings.iter().map(|p| p.document_type).collect();
    assert_eq!(kinds, vec![ErpDocumentType::Invoice, ErpDocumentType::Payment], "a failed attempt posts nothing");
    let payment = postings[1].payment.as_ref().unwrap();
    assert_eq!(payment.invoice_external_reference.as_deref(), Some("tributary:invoice:in-2"));
    assert_eq!((postings[1].external_reference.as_str(), payment.amount), ("tributary:payment:pay-in-2-2", dec("100")));
    let crm = world.crm().await;
    assert_eq!(crm.last().unwrap().kind, CrmUpdateKind::PaymentRecovered);
    assert!(crm.last().unwrap().summary.contains("attempt 2"));
}

/// Breaks master data in one way, pipes `input`, expects `class`, repairs it, replays: routed once.
#[tokio::test]
async fn every_reason_to_refuse_dead_letters_with_its_class_and_a_replay_after_the_fix_routes_once() {
    type Break = fn(&MasterData);
    let cases: Vec<(&str, Break)> = vec![
        (class::UNKNOWN_CUSTOMER, |m| {
            m.customers.apply("cus-acct-1", None);
        }),
        (class::CUSTOMER_WITHOUT_ERP_PARTY, |m| {
            let mut c = (*m.customers.get("cus-acct-1").unwrap()).clone();
            c.erp_party_ref = None;
            c.version += 1;
            m.customers.apply("cus-acct-1", Some(c));
        }),
        (class::UNKNOWN_CONTRACT, |m| {
            m.contracts.apply("ctr-acct-1", None);
        }),
        (class::CONTRACT_NOT_ACTIVE, |m| {
            let mut c = (*m.contracts.get("ctr-acct-1").unwrap()).clone();
            c.status = ContractStatus::Pending;
            c.version += 1;
            m.contracts.apply("ctr-acct-1", Some(c));
        }),
        (class::UNKNOWN_PRICE_PLAN, |m| {
            m.plans.apply(PLAN, None);
        }),
        (class::PRICE_PLAN_NOT_EFFECTIVE, |m| {
            let mut p = (*m.plans.get(PLAN).unwrap()).clone();
            p.effective_from = at("2026-03-15T00:00:00Z").timestamp_millis();
            p.version += 1;
            m.plans.apply(PLAN, Some(p));
        }),
        (class::CURRENCY_MISMATCH, |m| {
            let mut p = (*m.plans.get(PLAN).unwrap()).clone();
            p.currency = "EUR".into();
            p.version += 1;
            m.plans.apply(PLAN, Some(p));
        }),
        (class::UNPRICED_METER, |m| {
            let mut p = (*m.plans.get(PLAN).unwrap()).clone();
            p.meter_prices[0].meter = "storage".into();
            p.version += 1;
            m.plans.apply(PLAN, Some(p));
        }),
        (class::INVALID_PRICE_PLAN, |m| {
            let mut p = (*m.plans.get(PLAN).unwrap()).clone();
            p.meter_prices[0].unit_price = None;
            p.version += 1;
            m.plans.apply(PLAN, Some(p));
        }),
    ];
    for (expected, break_it) in cases {
        let mut world = World::with(plan(vec![fixtures::per_unit(METER, "0.10")]));
        let good = World::new(Settings::default());
        good.master_data(plan(vec![fixtures::per_unit(METER, "0.10")]));
        break_it(&world.master);
        let crossing = fixtures::crossing(&world.contract_or(&good), METER, 120, "1200", march(), world.driver.now());
        assert_eq!(world.driver.pipe(crossing.clone()).await, Outcome::DeadLettered(expected.into()), "{expected}");
        let letters = world.driver.dead_letters();
        assert!(!letters[0].letter.message.is_empty(), "{expected}: a reason");
        assert!(
            world.charges().await.is_empty() && world.postings().await.is_empty(),
            "{expected}: nothing on a guess"
        );

        // The master data is fixed (a newer version of each record), the dead letter replayed.
        for customer in good.master.customers.find("acct:acct-1") {
            let mut fixed = (*customer).clone();
            fixed.version = 10;
            world.master.customers.apply(&fixed.customer_id.clone(), Some(fixed));
        }
        let mut contract = good.contract();
        contract.version = 10;
        world.master.contracts.apply("ctr-acct-1", Some(contract));
        let mut fixed_plan = (*good.master.plans.get(PLAN).unwrap()).clone();
        fixed_plan.version = 10;
        world.master.plans.apply(PLAN, Some(fixed_plan));
        assert_eq!(world.driver.pipe(crossing.clone()).await, Outcome::Processed, "{expected}: replayed");
        assert_eq!(world.driver.pipe(crossing).await, Outcome::Duplicate, "{expected}: a second replay is a no-op");
        assert_eq!(world.charges().await.len(), 1, "{expected}");
        assert_eq!(world.postings().await.len(), 1, "{expected}");
    }
}

#[tokio::test]
async fn an_invoice_that_does_not_add_up_or_is_in_another_currency_is_refused() {
    let mut world = World::with(plan(vec![fixtures::per_unit(METER, "0.10")]));
    let mut wrong_total = fixtures::invoice(ACCOUNT, "in-3", "USD", "100", "20", world.driver.now());
    wrong_total.total_amount = dec("130");
    assert_eq!(world.driver.pipe(wrong_total).await, Outcome::DeadLettered(class::AMOUNTS_MISMATCH.into()));
    let mut wrong_lines = fixtures::invoice(ACCOUNT, "in-4", "USD", "100", "20", world.driver.now());
    wrong_lines.lines[0].amount = dec("90");
    assert_eq!(world.driver.pipe(wrong_lines).await, Outcome::DeadLettered(class::AMOUNTS_MISMATCH.into()));
    let euros = fixtures::invoice(ACCOUNT, "in-5", "EUR", "100", "20", world.driver.now());
    assert_eq!(world.driver.pipe(euros).await, Outcome::DeadLettered(class::CURRENCY_MISMATCH.into()));
    let letters = world.driver.dead_letters();
    assert!(letters[0].letter.message.contains("130"), "{}", letters[0].letter.message);
    assert!(world.postings().await.is_empty());
}

impl World {
    /// This world's contract, or the intact one when this world's was removed.
    fn contract_or(&self, good: &World) -> tributary_contracts::types::Contract {
        self.master.contracts.get("ctr-acct-1").map_or_else(|| good.contract(), |c| (*c).clone())
    }
}
