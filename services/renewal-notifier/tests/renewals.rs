//! renewal-notifier's logic on the runtime's test driver: milestones once each (also across a
//! contract change, a renewal and a restart), signals and level for constructed accounts (each
//! signal alone, all together, none), and a sharp rise between milestones raised once per
//! cause. No broker; time is the driver's clock.

use std::time::Duration;

use chrono::{DateTime, Utc};
use renewal_notifier::processor::{NotifierMetrics, RenewalProcessor};
use renewal_notifier::{MasterData, Settings};
use tributary_contracts::fixtures::{self, dec};
use tributary_contracts::types::{
    ActionKind, Audience, CaseAction, CasePriority, CaseSeverity, CaseStatus, Contract, ContractStatus,
    EntitlementChanged, EntitlementState, Envelope, PaymentStatus, RenewalNotification, RiskLevel, RiskSignalKind,
    SupportCase, TransitionReason, UsageRecorded, WindowKind,
};
use tributary_runtime::testing::{DriverBuilder, TestDriver};

const ACCOUNT: &str = "acct-1";
const DAY: Duration = Duration::from_secs(86_400);
const PARTITIONS: i32 = 3;

fn at(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text).unwrap().to_utc()
}

struct World {
    master: MasterData,
    driver: TestDriver<RenewalProcessor>,
}

impl World {
    /// A contract renewing on 2026-12-31 (term from 2026-01-01), 30 days' notice; the clock on
    /// 2026-09-01, 121 days before.
    fn new() -> Self {
        let master = MasterData::new(PARTITIONS);
        let processor = RenewalProcessor::new(master.clone(), Settings::default(), NotifierMetrics::default());
        let driver = DriverBuilder::new()
            .service("renewal-notifier")
            .partitions(PARTITIONS)
            .start_at(at("2026-09-01T00:00:00Z"))
            .build(processor);
        let world = Self { master, driver };
        world.publish(world.contract());
        world
    }

    fn contract(&self) -> Contract {
        self.master.contracts.get("ctr-acct-1").map(|c| (*c).clone()).unwrap_or_else(|| {
            let mut contract =
                fixtures::contract(ACCOUNT, "plan", "EUR", "api_calls", "1000", at("2026-01-01T00:00:00Z"));
            contract.renewal_date = days("2026-12-31");
            contract
        })
    }

    fn publish(&self, contract: Contract) {
        let mut contract = contract;
        contract.version += 1;
        self.master.contracts.apply(&contract.contract_id.clone(), Some(contract));
    }

    async fn advance(&mut self, by: Duration) -> Vec<RenewalNotification> {
        self.driver.advance(by).await;
        self.driver.read().await
    }

    async fn advance_to(&mut self, to: &str) -> Vec<RenewalNotification> {
        self.driver.advance_to(at(to)).await;
        self.driver.read().await
    }

    async fn pipe<T: tributary_contracts::Contract + 'static>(&mut self, value: T) -> Vec<RenewalNotification> {
        self.driver.pipe(value).await;
        self.driver.read().await
    }

    fn entitlement(&self, to: EntitlementState) -> EntitlementChanged {
        EntitlementChanged {
            envelope: Envelope::originating("tributary.entitlement-watcher", ACCOUNT, self.driver.now()),
            from_state: Some(EntitlementState::Active),
            to_state: to,
            reason: TransitionReason::PaymentFailed,
            reason_detail: None,
            grace_ends_at: None,
            subscription_id: None,
            contract_id: Some("ctr-acct-1".into()),
            invoice_id: None,
            payment_id: None,
            outstanding_amount: Some(dec("100")),
            currency: Some("EUR".into()),
        }
    }

    fn case(&self, id: &str, severity: CaseSeverity) -> SupportCase {
        SupportCase {
            envelope: Envelope::originating("zendesk", ACCOUNT, self.driver.now()),
            case_id: id.into(),
            action: CaseAction::Opened,
            severity,
            priority: CasePriority::High,
            status: CaseStatus::Open,
            subject: "Exports fail".into(),
            opened_at: self.driver.now().timestamp_millis(),
            closed_at: None,
            contract_id: None,
            url: None,
            tags: vec![],
        }
    }

    fn usage(&self, period_start: &str, period_end: &str, used: &str, is_final: bool) -> UsageRecorded {
        UsageRecorded {
            envelope: Envelope::originating("tributary.usage-ingest", ACCOUNT, self.driver.now()),
            subscription_id: Some("sub-acct-1".into()),
            contract_id: Some("ctr-acct-1".into()),
            meter: "api_calls".into(),
            unit: "call".into(),
            window_kind: WindowKind::BillingPeriod,
            window_start: at(period_start).timestamp_millis(),
            window_end: at(period_end).timestamp_millis(),
            total_quantity: dec(used),
            event_count: 1,
            last_event_at: self.driver.now().timestamp_millis(),
            dimensions: Default::default(),
            sequence: 1,
            is_final,
        }
    }
}

fn days(date: &str) -> i32 {
    (at(&format!("{date}T00:00:00Z")).timestamp_millis() / 86_400_000) as i32
}

fn milestones(notifications: &[RenewalNotification]) -> Vec<i32> {
    notifications.iter().map(|n| n.milestone_days).collect()
}

fn kinds(notification: &RenewalNotification) -> Vec<RiskSignalKind> {
    notification.risk_signals.iter().map(|s| s.kind).collect()
}

#[tokio::test]
async fn each_milestone_fires_once_on_its_day() {
    let mut world = World::new();
    assert!(world.advance(Duration::from_secs(60)).await.is_empty(), "121 days before: nothing yet");
    let ninety = world.advance_to("2026-10-02T00:00:00Z").await;
    assert_eq!(milestones(&ninety), vec![90]);
    let first = &ninety[0];
    assert_eq!(first.days_until_renewal, 90);
    assert_eq!(first.renewal_date, days("2026-12-31"));
    assert_eq!(first.risk_level, RiskLevel::Low);
    assert!(first.risk_signals.is_empty(), "no signal: {:?}", first.risk_signals);
    assert_eq!(first.audience, vec![Audience::CustomerSuccess]);
    assert_eq!(first.recommended_actions[0].kind, ActionKind::ScheduleRenewalCall);
    assert_eq!(first.envelope.causation_id, None, "a milestone is a timer's");
    assert_eq!(first.contract_value, Some(dec("12000")));
    assert_eq!(first.currency.as_deref(), Some("EUR"));

    assert!(world.advance(10 * DAY).await.is_empty(), "once");
    assert_eq!(milestones(&world.advance_to("2026-11-01T00:00:00Z").await), vec![60]);
    let thirty = world.advance_to("2026-12-01T00:00:00Z").await;
    assert_eq!(milestones(&thirty), vec![30], "the notice deadline (30 days) and the 30-day milestone are one");
    assert!(thirty[0].recommended_actions.iter().any(|a| a.kind == ActionKind::ConfirmRenewalTerms));
    assert_eq!(milestones(&world.advance_to("2026-12-24T00:00:00Z").await), vec![7]);
    assert!(world.advance_to("2027-03-01T00:00:00Z").await.is_empty(), "after the renewal: nothing more");
}

#[tokio::test]
async fn a_moved_renewal_moves_its_schedule_and_a_cancelled_contract_clears_it() {
    let mut world = World::new();
    assert_eq!(milestones(&world.advance_to("2026-10-02T00:00:00Z").await), vec![90]);
    // The renewal moves a month later: the old date's 60 days (2026-11-01) do not fire; the
    // new date's milestones do, from its 90 days (2026-11-02).
    let mut moved = world.contract();
    moved.renewal_date = days("2027-01-31");
    world.publish(moved);
    assert!(world.advance(Duration::from_secs(3600)).await.is_empty(), "nothing due for the new date yet");
    assert!(world.advance_to("2026-11-01T12:00:00Z").await.is_empty(), "the old date's 60 days do not fire");
    let ninety = world.advance_to("2026-11-02T00:00:00Z").await;
    assert_eq!(milestones(&ninety), vec![90]);
    assert_eq!(ninety[0].renewal_date, days("2027-01-31"));
    assert_eq!(milestones(&world.advance_to("2026-12-02T00:00:00Z").await), vec![60]);

    let mut cancelled = world.contract();
    cancelled.status = ContractStatus::Cancelled;
    world.publish(cancelled);
    assert!(world.advance_to("2027-01-31T00:00:00Z").await.is_empty(), "a cancelled contract is not notified");
}

#[tokio::test]
async fn a_renewed_contract_starts_a_new_schedule() {
    let mut world = World::new();
    world.advance_to("2026-12-25T00:00:00Z").await;
    let mut renewed = world.contract();
    renewed.renewal_date = days("2027-12-31");
    renewed.term_start = at("2027-01-01T00:00:00Z").timestamp_millis();
    world.publish(renewed);
    assert!(world.advance_to("2027-10-01T00:00:00Z").await.is_empty());
    assert_eq!(milestones(&world.advance_to("2027-10-03T00:00:00Z").await), vec![90]);
}

#[tokio::test]
async fn milestones_survive_a_restart_and_fire_once() {
    let mut world = World::new();
    assert_eq!(milestones(&world.advance_to("2026-10-02T00:00:00Z").await), vec![90]);
    let master = world.master.clone();
    let processor = RenewalProcessor::new(master, Settings::default(), NotifierMetrics::default());
    world.driver = world.driver.restart_with(processor);
    assert!(world.advance(Duration::from_secs(3600)).await.is_empty(), "the 90 days are not sent again");
    assert_eq!(milestones(&world.advance_to("2026-11-01T00:00:00Z").await), vec![60]);
}

#[tokio::test]
async fn each_signal_alone_and_all_together() {
    // Suspended alone: HIGH, both teams, resolve payment first.
    let mut world = World::new();
    world.pipe(world.entitlement(EntitlementState::Suspended)).await;
    let n = &world.advance_to("2026-10-02T00:00:00Z").await[0];
    assert_eq!((kinds(n), n.risk_level), (vec![RiskSignalKind::AccountSuspended], RiskLevel::High));
    assert_eq!(n.audience, vec![Audience::CustomerSuccess, Audience::RevenueOperations]);
    assert_eq!(n.recommended_actions[0].kind, ActionKind::ResolvePayment);
    assert_eq!(n.recommended_actions[0].owner, Audience::RevenueOperations);
    assert!(n.risk_signals[0].description.starts_with("Account suspended for non-payment since 2026-09-01"));

    // One failed payment: MEDIUM.
    let mut world = World::new();
    world.advance_to("2026-09-20T00:00:00Z").await;
    let failure = fixtures::payment(ACCOUNT, "in-1", 1, PaymentStatus::Failed, "100", "EUR", world.driver.now());
    world.pipe(failure).await;
    let n = &world.advance_to("2026-10-02T00:00:00Z").await[0];
    assert_eq!((kinds(n), n.risk_level), (vec![RiskSignalKind::PaymentFailed], RiskLevel::Medium));
    assert_eq!(n.risk_signals[0].description, "1 failed payment in the last 30 days");

    // An open SEV2 case, 9 days old at the milestone: raised to HIGH by its age.
    let mut world = World::new();
    world.advance_to("2026-09-23T00:00:00Z").await;
    world.pipe(world.case("48213", CaseSeverity::Sev2)).await;
    let n = &world.advance_to("2026-10-02T00:00:00Z").await[0];
    assert_eq!(kinds(n), vec![RiskSignalKind::OpenSupportCase]);
    assert_eq!(n.risk_signals[0].description, "1 open SEV2 case for 9 days (48213)");
    assert_eq!(n.risk_level, RiskLevel::High, "older than 7 days: one level up");
    assert_eq!(n.risk_signals[0].evidence.get("case_id").map(String::as_str), Some("48213"));

    // Usage at 134 %: overage, LOW.
    let mut world = World::new();
    world.pipe(world.usage("2026-09-01T00:00:00Z", "2026-10-01T00:00:00Z", "1340", false)).await;
    let n = &world.advance_to("2026-10-02T00:00:00Z").await[0];
    assert_eq!((kinds(n), n.risk_level), (vec![RiskSignalKind::UsageOverage], RiskLevel::Low));
    assert!(n.risk_signals[0].description.starts_with("Usage of api_calls at 134 % of contract this period"));
    assert_eq!(n.recommended_actions[0].kind, ActionKind::ReviewUsageAndUpsell);

    // Usage falling to a fifth of the contract: decline, MEDIUM.
    let mut world = World::new();
    world.pipe(world.usage("2026-08-01T00:00:00Z", "2026-09-01T00:00:00Z", "900", true)).await;
    world.pipe(world.usage("2026-09-01T00:00:00Z", "2026-10-01T00:00:00Z", "200", true)).await;
    let n = &world.advance_to("2026-10-02T00:00:00Z").await[0];
    assert_eq!((kinds(n), n.risk_level), (vec![RiskSignalKind::UsageDecline], RiskLevel::Medium));
    assert!(n.risk_signals[0].description.contains("at 20 % of contract"), "{}", n.risk_signals[0].description);
    assert!(n.risk_signals[0].description.contains("down from 900"), "{}", n.risk_signals[0].description);

    // All together: HIGH, every signal, most severe first (the failure within the 30 days).
    let mut world = World::new();
    world.advance_to("2026-09-20T00:00:00Z").await;
    world.pipe(world.entitlement(EntitlementState::Grace)).await;
    let failure = fixtures::payment(ACCOUNT, "in-1", 1, PaymentStatus::Failed, "100", "EUR", world.driver.now());
    world.pipe(failure).await;
    world.pipe(world.case("48213", CaseSeverity::Sev1)).await;
    world.pipe(world.usage("2026-09-01T00:00:00Z", "2026-10-01T00:00:00Z", "1600", false)).await;
    let n = world.advance_to("2026-10-02T00:00:00Z").await.remove(0);
    assert_eq!(n.risk_level, RiskLevel::High);
    let mut found = kinds(&n);
    found.sort();
    let mut expected = vec![
        RiskSignalKind::AccountInGrace,
        RiskSignalKind::PaymentFailed,
        RiskSignalKind::OpenSupportCase,
        RiskSignalKind::UsageOverage,
    ];
    expected.sort();
    assert_eq!(found, expected);
    assert!(n.risk_signals.windows(2).all(|w| w[0].severity >= w[1].severity), "most severe first");
}

#[tokio::test]
async fn two_medium_signals_make_the_risk_high() {
    let mut world = World::new();
    world.pipe(world.entitlement(EntitlementState::Grace)).await;
    world.pipe(world.usage("2026-08-01T00:00:00Z", "2026-09-01T00:00:00Z", "100", true)).await;
    let n = &world.advance_to("2026-10-02T00:00:00Z").await[0];
    assert_eq!(n.risk_signals.len(), 2);
    assert!(n.risk_signals.iter().all(|s| s.severity == RiskLevel::Medium));
    assert_eq!(n.risk_level, RiskLevel::High);
}

#[tokio::test]
async fn a_sharp_rise_between_milestones_is_raised_at_once_once_per_cause() {
    let mut world = World::new();
    world.advance_to("2026-10-02T00:00:00Z").await; // the 90-day milestone: LOW
    world.advance_to("2026-12-11T00:00:00Z").await; // 20 days before renewal
    world.driver.read::<RenewalNotification>().await;
    let suspension = world.entitlement(EntitlementState::Suspended);
    let raised = world.pipe(suspension.clone()).await;
    let [n] = raised.as_slice() else { panic!("one notification at once: {raised:?}") };
    assert_eq!(n.milestone_days, 20, "the days until renewal when it was raised");
    assert_eq!(n.risk_level, RiskLevel::High);
    assert!(n.risk_increase_cause.as_deref().unwrap().contains("Account suspended"), "{:?}", n.risk_increase_cause);
    assert_eq!(n.envelope.causation_id.as_deref(), Some(suspension.envelope.event_id.as_str()));

    let mut again = suspension.clone();
    again.envelope.event_id = "6c1f0f5e-8a8b-4b47-9a0e-0f1d2c3b4a59".into();
    assert!(world.pipe(world.case("9", CaseSeverity::Sev1)).await.is_empty(), "already HIGH: no new rise");
    assert!(world.pipe(again).await.is_empty(), "the same suspension relayed again is no new cause");
    assert_eq!(milestones(&world.advance_to("2026-12-24T00:00:00Z").await), vec![7], "the milestone still comes");

    // Outside the window (121 days before): a suspension waits for the milestone.
    let mut world = World::new();
    assert!(world.pipe(world.entitlement(EntitlementState::Suspended)).await.is_empty());
}
