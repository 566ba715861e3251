//! entitlement-watcher's logic on the runtime's test driver: every transition of the default
//! ladder, grace on the clock, out-of-order and repeated payment events, support flags on the
//! account and on its cases, operators' overrides, closures, and the state the admin query
//! reads. No broker; time is the driver's clock.

use std::time::Duration;

use chrono::{DateTime, Utc};
use entitlement_watcher::processor::{ACCOUNTS, AccountEntitlement, EntitlementProcessor, MasterData, WatcherMetrics};
use entitlement_watcher::query;
use entitlement_watcher::settings::Settings;
use tributary_contracts::fixtures;
use tributary_contracts::types::{
    AccountFlag, CaseAction, CasePriority, CaseSeverity, CaseStatus, ContractStatus, CrmAccountUpdate, CrmUpdateKind,
    DunningStatus, EntitlementChanged, EntitlementOverride, EntitlementState, Envelope, FlagAction, InvoiceStatus,
    Payment, PaymentStatus, SupportAccountFlag, SupportCase, SupportTier, TransitionReason,
};
use tributary_runtime::testing::{DriverBuilder, Outcome, TestDriver};

const ACCOUNT: &str = "acct-1";
const DAY: Duration = Duration::from_secs(86_400);

fn at(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text).unwrap().to_utc()
}

fn ms(text: &str) -> i64 {
    at(text).timestamp_millis()
}

/// The records one step wrote.
#[derive(Debug, Default)]
struct Written {
    changes: Vec<EntitlementChanged>,
    flags: Vec<SupportAccountFlag>,
    crm: Vec<CrmAccountUpdate>,
}

struct World {
    master: MasterData,
    driver: TestDriver<EntitlementProcessor>,
}

impl World {
    /// A PREMIUM contract with 14 grace days, its customer in the CRM, on 2026-03-01.
    fn new() -> Self {
        Self::with(Settings::default(), 14, SupportTier::Premium)
    }

    fn with(settings: Settings, grace_days: i32, tier: SupportTier) -> Self {
        let master = MasterData::default();
        let processor = EntitlementProcessor::new(master.clone(), settings, WatcherMetrics::default());
        let driver =
            DriverBuilder::new().service("entitlement-watcher").start_at(at("2026-03-01T00:00:00Z")).build(processor);
        let customer = fixtures::customer(ACCOUNT, "EUR", at("2026-01-01T00:00:00Z"));
        master.customers.apply(&customer.customer_id.clone(), Some(customer));
        let mut contract = fixtures::contract(ACCOUNT, "plan", "EUR", "api_calls", "1000", at("2026-01-01T00:00:00Z"));
        contract.grace_days = grace_days;
        contract.support_tier = tier;
        master.contracts.apply(&contract.contract_id.clone(), Some(contract));
        Self { master, driver }
    }

    fn payment(&self, invoice: &str, attempt: i32, status: PaymentStatus, amount: &str) -> Payment {
        fixtures::payment(ACCOUNT, invoice, attempt, status, amount, "EUR", self.driver.now())
    }

    async fn pay(&mut self, payment: Payment) -> Written {
        assert_eq!(self.driver.pipe(payment).await, Outcome::Processed);
        self.written().await
    }

    async fn fail(&mut self, invoice: &str, attempt: i32, amount: &str) -> Written {
        let payment = self.payment(invoice, attempt, PaymentStatus::Failed, amount);
        self.pay(payment).await
    }

    async fn succeed(&mut self, invoice: &str, amount: &str) -> Written {
        let payment = self.payment(invoice, 9, PaymentStatus::Succeeded, amount);
        self.pay(payment).await
    }

    async fn advance(&mut self, by: Duration) -> Written {
        for outcome in self.driver.advance(by).await {
            assert_eq!(outcome, Outcome::Processed);
        }
        self.written().await
    }

    async fn written(&mut self) -> Written {
        Written { changes: self.driver.read().await, flags: self.driver.read().await, crm: self.driver.read().await }
    }

    fn account(&self) -> AccountEntitlement {
        self.driver.get(ACCOUNTS, ACCOUNT).expect("the account has state")
    }

    fn case(&self, case_id: &str, action: CaseAction, severity: CaseSeverity) -> SupportCase {
        SupportCase {
            envelope: Envelope::originating("zendesk", ACCOUNT, self.driver.now()),
            case_id: case_id.into(),
            action,
            severity,
            priority: CasePriority::Normal,
            status: if action == CaseAction::Closed { CaseStatus::Closed } else { CaseStatus::Open },
            subject: "API errors".into(),
            opened_at: self.driver.now().timestamp_millis(),
            closed_at: None,
            contract_id: None,
            url: None,
            tags: vec![],
        }
    }

    async fn open_case(&mut self, case_id: &str, severity: CaseSeverity) -> Written {
        let case = self.case(case_id, CaseAction::Opened, severity);
        assert_eq!(self.driver.pipe(case).await, Outcome::Processed);
        self.written().await
    }

    fn override_to(&self, to: EntitlementState, by: &str, why: &str) -> EntitlementOverride {
        EntitlementOverride {
            envelope: Envelope::originating("tributary.cli", ACCOUNT, self.driver.now()),
            to_state: to,
            requested_by: by.into(),
            reason: why.into(),
            grace_ends_at: None,
        }
    }
}

fn flags(written: &Written) -> Vec<(AccountFlag, FlagAction, Option<String>)> {
    written.flags.iter().map(|f| (f.flag, f.action, f.case_id.clone())).collect()
}

fn kinds(written: &Written) -> Vec<CrmUpdateKind> {
    written.crm.iter().map(|u| u.kind).collect()
}

#[tokio::test]
async fn a_failed_payment_starts_the_contracts_grace_and_flags_the_account() {
    let mut world = World::new();
    let written = world.fail("in-1", 1, "120.50").await;

    let [change] = written.changes.as_slice() else { panic!("one change: {:?}", written.changes) };
    assert_eq!(change.from_state, None, "the first state recorded for the account");
    assert_eq!(change.to_state, EntitlementState::Grace);
    assert_eq!(change.reason, TransitionReason::PaymentFailed);
    assert_eq!(change.grace_ends_at, Some(ms("2026-03-15T00:00:00Z")), "14 grace days from the failure");
    assert_eq!(change.outstanding_amount, Some(fixtures::dec("120.50")));
    assert_eq!(change.currency.as_deref(), Some("EUR"));
    assert_eq!(change.invoice_id.as_deref(), Some("in-1"));
    assert_eq!(change.payment_id.as_deref(), Some("pay-in-1-1"));
    assert_eq!(change.contract_id.as_deref(), Some("ctr-acct-1"));
    assert_eq!(change.envelope.source, "tributary.entitlement-watcher");

    let [flag] = written.flags.as_slice() else { panic!("one flag: {:?}", written.flags) };
    assert_eq!((flag.flag, flag.action, flag.case_id.clone()), (AccountFlag::PaymentGrace, FlagAction::Set, None));
    assert_eq!(flag.entitlement_state, Some(EntitlementState::Grace));
    assert_eq!(flag.dunning_status, Some(DunningStatus::InDunning));
    assert_eq!(flag.amount_due, Some(fixtures::dec("120.50")));
    assert_eq!(flag.support_tier, Some(SupportTier::Premium));
    assert_eq!(flag.expires_at, Some(ms("2026-03-15T00:00:00Z")));
    assert!(!flag.escalate);
    assert!(flag.note.as_deref().unwrap().contains("EUR 120.50 overdue"), "{:?}", flag.note);

    assert_eq!(kinds(&written), vec![CrmUpdateKind::PaymentFailed, CrmUpdateKind::EntitlementChanged]);
    assert_eq!(written.crm[0].crm_account_id.as_deref(), Some("crm-acct-1"));
    let timers: Vec<String> = world.driver.timers().into_iter().map(|(_, key, _)| key).collect();
    assert_eq!(timers, vec!["grace/acct-1".to_owned()], "the grace timer");
}

#[tokio::test]
async fn grace_ends_on_the_clock_once_and_suspends() {
    let mut world = World::new();
    world.fail("in-1", 1, "100").await;

    let before = world.advance(13 * DAY).await;
    assert!(before.changes.is_empty(), "still in grace after 13 days: {:?}", before.changes);
    let written = world.advance(DAY).await;
    let [change] = written.changes.as_slice() else { panic!("one change: {:?}", written.changes) };
    assert_eq!((change.from_state, change.to_state), (Some(EntitlementState::Grace), EntitlementState::Suspended));
    assert_eq!(change.reason, TransitionReason::GraceExpired);
    assert_eq!(change.envelope.causation_id, None, "a grace-expiry timer has no causing record");
    assert_eq!(change.envelope.occurred_at, ms("2026-03-15T00:00:00Z"));
    assert_eq!(
        flags(&written),
        vec![(AccountFlag::PaymentGrace, FlagAction::Cleared, None), (AccountFlag::Suspended, FlagAction::Set, None)]
    );
    let again = world.advance(30 * DAY).await;
    assert!(again.changes.is_empty() && again.flags.is_empty(), "suspended once: {again:?}");
    assert_eq!(world.account().state, EntitlementState::Suspended);
}

#[tokio::test]
async fn a_payment_during_grace_cancels_the_suspension() {
    let mut world = World::new();
    world.fail("in-1", 1, "100").await;
    world.advance(3 * DAY).await;
    let written = world.succeed("in-1", "100").await;

    let [change] = written.changes.as_slice() else { panic!("one change: {:?}", written.changes) };
    assert_eq!((change.from_state, change.to_state), (Some(EntitlementState::Grace), EntitlementState::Active));
    assert_eq!(change.reason, TransitionReason::PaymentSucceeded);
    assert_eq!(change.outstanding_amount, None);
    assert_eq!(flags(&written), vec![(AccountFlag::PaymentGrace, FlagAction::Cleared, None)]);
    assert_eq!(kinds(&written), vec![CrmUpdateKind::EntitlementChanged, CrmUpdateKind::PaymentRecovered]);
    assert!(world.driver.timers().iter().all(|(_, key, _)| !key.starts_with("grace/")), "{:?}", world.driver.timers());
    let later = world.advance(30 * DAY).await;
    assert!(later.changes.is_empty(), "no suspension after the payment: {:?}", later.changes);
}

#[tokio::test]
async fn a_suspended_account_is_restored_when_everything_overdue_is_paid() {
    let mut world = World::new();
    world.fail("in-1", 1, "100").await;
    world.advance(DAY).await;
    world.fail("in-2", 1, "50").await;
    world.advance(14 * DAY).await;
    assert_eq!(world.account().state, EntitlementState::Suspended);

    let first = world.succeed("in-1", "100").await;
    assert!(first.changes.is_empty(), "in-2 is still overdue: {:?}", first.changes);
    let second = world.succeed("in-2", "50").await;
    let [change] = second.changes.as_slice() else { panic!("one change: {:?}", second.changes) };
    assert_eq!((change.from_state, change.to_state), (Some(EntitlementState::Suspended), EntitlementState::Active));
    assert_eq!(flags(&second), vec![(AccountFlag::Suspended, FlagAction::Cleared, None)]);
}

#[tokio::test]
async fn the_same_failure_twice_starts_one_grace_period() {
    let mut world = World::new();
    let failure = world.payment("in-1", 1, PaymentStatus::Failed, "100");
    world.pay(failure.clone()).await;
    assert_eq!(world.driver.pipe(failure.clone()).await, Outcome::Duplicate, "the same event is dropped");

    // The platform relays the same attempt again under a new event id, a day later.
    world.advance(DAY).await;
    let mut relayed = failure;
    relayed.envelope.event_id = "4b0c7a52-1f0e-4d8e-9c55-4e8e7d6a1b11".into();
    let written = world.pay(relayed).await;
    assert!(written.changes.is_empty() && written.flags.is_empty() && written.crm.is_empty(), "{written:?}");
    assert_eq!(world.account().grace_ends_at, Some(ms("2026-03-15T00:00:00Z")));
}

#[tokio::test]
async fn a_second_invoice_failing_during_grace_does_not_extend_it_unless_configured() {
    let mut world = World::new();
    world.fail("in-1", 1, "100").await;
    world.advance(5 * DAY).await;
    let written = world.fail("in-2", 1, "40").await;
    assert!(written.changes.is_empty(), "grace is not extended: {:?}", written.changes);
    assert_eq!(kinds(&written), vec![CrmUpdateKind::PaymentFailed], "the CRM hears of the second invoice");
    assert_eq!(world.account().grace_ends_at, Some(ms("2026-03-15T00:00:00Z")));
    let suspended = world.advance(9 * DAY).await;
    assert_eq!(suspended.changes[0].outstanding_amount, Some(fixtures::dec("140")), "both invoices overdue");

    let settings = Settings { extend_grace_on_new_failure: true, ..Settings::default() };
    let mut world = World::with(settings, 14, SupportTier::Premium);
    world.fail("in-1", 1, "100").await;
    world.advance(5 * DAY).await;
    let written = world.fail("in-2", 1, "40").await;
    let [change] = written.changes.as_slice() else { panic!("grace extended: {:?}", written.changes) };
    assert_eq!((change.from_state, change.to_state), (Some(EntitlementState::Grace), EntitlementState::Grace));
    assert_eq!(change.grace_ends_at, Some(ms("2026-03-20T00:00:00Z")));
    assert!(world.advance(13 * DAY).await.changes.is_empty());
    assert_eq!(world.advance(DAY).await.changes[0].to_state, EntitlementState::Suspended);
}

#[tokio::test]
async fn a_success_older_than_the_latest_failure_does_not_restore() {
    let mut world = World::new();
    let early_success = world.payment("in-1", 1, PaymentStatus::Succeeded, "100");
    world.advance(DAY).await;
    world.fail("in-1", 2, "100").await;
    // The success, made before the failure, arrives after it.
    let written = world.pay(early_success).await;
    assert!(written.changes.is_empty(), "{:?}", written.changes);
    assert_eq!(world.account().state, EntitlementState::Grace);
}

#[tokio::test]
async fn a_failure_older_than_the_invoices_payment_changes_nothing() {
    let mut world = World::new();
    let early_failure = world.payment("in-1", 1, PaymentStatus::Failed, "100");
    world.advance(DAY).await;
    world.succeed("in-1", "100").await;
    let written = world.pay(early_failure).await;
    assert!(written.changes.is_empty() && written.flags.is_empty(), "{written:?}");
    assert!(world.driver.timers().iter().all(|(_, key, _)| !key.starts_with("grace/")));
}

#[tokio::test]
async fn dunning_exhausted_suspends_at_once() {
    let mut world = World::new();
    world.fail("in-1", 1, "100").await;
    world.advance(DAY).await;
    let mut last = world.payment("in-1", 4, PaymentStatus::Failed, "100");
    last.dunning_status = DunningStatus::Exhausted;
    let written = world.pay(last).await;
    let [change] = written.changes.as_slice() else { panic!("{:?}", written.changes) };
    assert_eq!((change.from_state, change.to_state), (Some(EntitlementState::Grace), EntitlementState::Suspended));
    assert_eq!(change.reason, TransitionReason::DunningExhausted);
    assert!(world.driver.timers().iter().all(|(_, key, _)| !key.starts_with("grace/")), "grace timer cancelled");
}

#[tokio::test]
async fn a_contract_without_grace_days_suspends_when_dunning_is_exhausted() {
    let mut world = World::with(Settings::default(), 0, SupportTier::Standard);
    let written = world.fail("in-1", 1, "100").await;
    assert!(written.changes.is_empty(), "no grace: {:?}", written.changes);
    assert_eq!(kinds(&written), vec![CrmUpdateKind::PaymentFailed]);
    world.advance(DAY).await;
    let mut last = world.payment("in-1", 3, PaymentStatus::Failed, "100");
    last.dunning_status = DunningStatus::Exhausted;
    let written = world.pay(last).await;
    assert_eq!(written.changes[0].from_state, None);
    assert_eq!(written.changes[0].to_state, EntitlementState::Suspended);

    // Grace by support tier, when configured, for contracts whose grace_days is 0.
    let mut settings = Settings::default();
    settings.tier_grace_days.insert("ENTERPRISE".into(), 30);
    let mut world = World::with(settings, 0, SupportTier::Enterprise);
    let written = world.fail("in-1", 1, "100").await;
    assert_eq!(written.changes[0].grace_ends_at, Some(ms("2026-03-31T00:00:00Z")));
}

#[tokio::test]
async fn a_case_opened_during_grace_carries_the_flag_once() {
    let mut world = World::new();
    let quiet = world.open_case("c-0", CaseSeverity::Sev3).await;
    assert!(quiet.flags.is_empty(), "an ACTIVE account's case is not flagged");
    let entered = world.fail("in-1", 1, "100").await;
    assert_eq!(
        flags(&entered),
        vec![
            (AccountFlag::PaymentGrace, FlagAction::Set, None),
            (AccountFlag::PaymentGrace, FlagAction::Set, Some("c-0".into()))
        ],
        "a case already open is flagged when grace starts"
    );

    let written = world.open_case("c-1", CaseSeverity::Sev2).await;
    let [flag] = written.flags.as_slice() else { panic!("{:?}", written.flags) };
    assert_eq!(flag.case_id.as_deref(), Some("c-1"));
    assert_eq!((flag.flag, flag.action), (AccountFlag::PaymentGrace, FlagAction::Set));
    assert_eq!(flag.entitlement_state, Some(EntitlementState::Grace));
    assert_eq!(flag.amount_due, Some(fixtures::dec("100")));
    assert!(!flag.escalate);

    let update = world.case("c-1", CaseAction::Updated, CaseSeverity::Sev2);
    world.driver.pipe(update).await;
    assert!(world.written().await.flags.is_empty(), "not raised twice for one cause");

    let restored = world.succeed("in-1", "100").await;
    assert_eq!(
        flags(&restored),
        vec![
            (AccountFlag::PaymentGrace, FlagAction::Cleared, None),
            (AccountFlag::PaymentGrace, FlagAction::Cleared, Some("c-0".into())),
            (AccountFlag::PaymentGrace, FlagAction::Cleared, Some("c-1".into())),
        ]
    );
}

#[tokio::test]
async fn a_severity_1_case_of_a_suspended_enterprise_account_is_escalated() {
    let mut world = World::with(Settings::default(), 14, SupportTier::Enterprise);
    world.fail("in-1", 1, "100").await;
    let in_grace = world.open_case("c-1", CaseSeverity::Sev1).await;
    assert!(!in_grace.flags[0].escalate, "in grace, not suspended: left to the queue");
    world.advance(14 * DAY).await;
    let written = world.open_case("c-2", CaseSeverity::Sev1).await;
    let [flag] = written.flags.as_slice() else { panic!("{:?}", written.flags) };
    assert!(flag.escalate);
    assert_eq!(flag.flag, AccountFlag::Suspended);
    assert_eq!(flag.support_tier, Some(SupportTier::Enterprise));
    let low = world.open_case("c-3", CaseSeverity::Sev3).await;
    assert!(!low.flags[0].escalate);

    let mut world = World::with(Settings::default(), 14, SupportTier::Premium);
    world.fail("in-1", 1, "100").await;
    world.advance(14 * DAY).await;
    assert!(!world.open_case("c-1", CaseSeverity::Sev1).await.flags[0].escalate, "PREMIUM is not escalated");
}

#[tokio::test]
async fn an_operators_suspension_holds_until_another_override() {
    let mut world = World::new();
    let order = world.override_to(EntitlementState::Suspended, "jane@finance", "chargeback under review");
    assert_eq!(world.driver.pipe(order).await, Outcome::Processed);
    let written = world.written().await;
    let [change] = written.changes.as_slice() else { panic!("{:?}", written.changes) };
    assert_eq!(change.to_state, EntitlementState::Suspended);
    assert_eq!(change.reason, TransitionReason::Manual);
    assert_eq!(change.reason_detail.as_deref(), Some("by jane@finance: chargeback under review"));

    world.fail("in-1", 1, "100").await;
    let paid = world.succeed("in-1", "100").await;
    assert!(paid.changes.is_empty(), "a payment does not lift an operator's suspension: {:?}", paid.changes);

    let lift = world.override_to(EntitlementState::Active, "jane@finance", "cleared");
    world.driver.pipe(lift).await;
    let written = world.written().await;
    assert_eq!(written.changes[0].to_state, EntitlementState::Active);
    assert_eq!(flags(&written), vec![(AccountFlag::Suspended, FlagAction::Cleared, None)]);

    let mut invalid = world.override_to(EntitlementState::Unknown, "jane@finance", "typo");
    assert_eq!(world.driver.pipe(invalid.clone()).await, Outcome::DeadLettered("invalid_override".into()));
    invalid.to_state = EntitlementState::Grace;
    invalid.requested_by = " ".into();
    invalid.envelope.event_id = "0d6f3b7e-2a41-4c1b-8a57-3c2b1e0f9a88".into();
    assert_eq!(world.driver.pipe(invalid).await, Outcome::DeadLettered("invalid_override".into()));
}

#[tokio::test]
async fn accounts_are_closed_when_their_contract_ends() {
    let mut world = World::new();
    world.fail("in-1", 1, "100").await;
    let mut contract = (*world.master.contracts.get("ctr-acct-1").unwrap()).clone();
    contract.status = ContractStatus::Cancelled;
    contract.version += 1;
    world.master.contracts.apply("ctr-acct-1", Some(contract));
    let written = world.advance(Duration::from_secs(3600)).await;
    let [change] = written.changes.as_slice() else { panic!("{:?}", written.changes) };
    assert_eq!((change.from_state, change.to_state), (Some(EntitlementState::Grace), EntitlementState::Closed));
    assert_eq!(change.reason, TransitionReason::ContractEnded);
    assert_eq!(flags(&written), vec![(AccountFlag::PaymentGrace, FlagAction::Cleared, None)]);
    assert!(world.advance(20 * DAY).await.changes.is_empty(), "closed once; grace no longer runs");
}

#[tokio::test]
async fn a_voided_invoice_restores_like_a_payment() {
    let mut world = World::new();
    world.fail("in-1", 1, "100").await;
    let mut invoice = fixtures::invoice(ACCOUNT, "in-1", "EUR", "100", "0", world.driver.now());
    invoice.status = InvoiceStatus::Void;
    world.driver.pipe(invoice).await;
    let written = world.written().await;
    assert_eq!(written.changes[0].to_state, EntitlementState::Active);
}

#[tokio::test]
async fn grace_survives_a_restart_and_fires_once() {
    let mut world = World::new();
    world.fail("in-1", 1, "100").await;
    let master = world.master.clone();
    let driver =
        world.driver.restart_with(EntitlementProcessor::new(master, Settings::default(), WatcherMetrics::default()));
    world.driver = driver;
    let written = world.advance(15 * DAY).await;
    assert_eq!(written.changes.len(), 1, "{:?}", written.changes);
    assert_eq!(written.changes[0].to_state, EntitlementState::Suspended);
}

#[tokio::test]
async fn the_query_answers_from_committed_state() {
    let mut world = World::new();
    world.fail("in-1", 1, "100").await;
    let (partition, account) = world.driver.state_view().find(ACCOUNTS, ACCOUNT).unwrap().expect("recorded");
    let answer = query::describe(&account, partition);
    assert_eq!(answer["state"], "GRACE");
    assert_eq!(answer["outstanding_amount"], "100");
    assert_eq!(answer["grace_ends_at"], "2026-03-15T00:00:00.000Z");
    assert_eq!(answer["overdue_invoices"][0]["invoice_id"], "in-1");
    assert!(world.driver.state_view().find(ACCOUNTS, "acct-unknown").unwrap().is_none());
}
