//! The renewal-notifier logic: a renewal schedule per contract, milestones on the runtime's
//! clock, and at each the account's risk with the signals that explain it.
//!
//! What each input does:
//! - the partition sweep ([`SWEEP_TIMER`], every `schedule_check_every`): for each contract of
//!   `refdata.contracts` whose account is on this partition, the timer `renewal/<contract>` is
//!   set to its next milestone (90, 60, 30 and 7 days before the renewal date, and the end of
//!   the notice period, by default), moved when the contract's renewal date changed, cleared
//!   when it was cancelled, expired or deleted; milestones that passed before the contract was
//!   known fire as one, the latest;
//! - the milestone timer: the contract is read again (a milestone of a renewal date that
//!   changed meanwhile does not fire), the risk assessed ([`assess`]) and a notification
//!   written, once per (contract, renewal date, milestone);
//! - `entitlement.changes`, `billing.payments`, `support.cases`, `usage.recorded`,
//!   `usage.thresholds`, `billing.charges`: what the account's risk is made of ([`Signals`]);
//!   a record that raises it to `raise_on` (HIGH) within the notification window raises a
//!   notification at once, once per cause.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, NaiveDate};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use tributary_contracts::decimal::Decimal6;
use tributary_contracts::topics;
use tributary_contracts::types::{
    ActionKind, Audience, CaseAction, CaseSeverity, CaseStatus, Contract, ContractStatus, EntitlementChanged,
    EntitlementState, Envelope, OverageCharge, Payment, PaymentStatus, RecommendedAction, RenewalNotification,
    RiskLevel, RiskSignal, RiskSignalKind, SupportCase, UsageRecorded, UsageThresholdCrossed, WindowKind,
};
use tributary_runtime::kafka::partition_of;
use tributary_runtime::table::ReferenceTable;
use tributary_runtime::{Context, Output, ProcessError, Processor, SWEEP_TIMER, Store, StoredValue, Timer};

use crate::settings::{Settings, symbol};

/// The `source` of every record renewal-notifier writes.
pub const SOURCE: &str = "tributary.renewal-notifier";
const DAY_MS: i64 = 86_400_000;
const RENEWAL_TIMER_PREFIX: &str = "renewal/";

tributary_runtime::input_enum! {
    /// What renewal-notifier reads.
    pub enum NotifierInput {
        /// Entitlement transitions (grace, suspension).
        Entitlement(EntitlementChanged),
        /// Payment attempts.
        Payment(Payment),
        /// Support cases.
        Case(SupportCase),
        /// Usage totals.
        Usage(UsageRecorded),
        /// Usage threshold crossings.
        Threshold(UsageThresholdCrossed),
        /// Overage charges.
        Charge(OverageCharge),
    }
}

/// What the service has seen of each account, by account id.
pub const ACCOUNTS: Store<AccountView> = Store::new("accounts");

/// A failed payment remembered.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FailedPayment {
    /// When (business time).
    pub at: i64,
    /// The invoice.
    pub invoice_id: String,
    /// The event id.
    pub event_id: String,
}

/// An open case.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OpenCase {
    /// Its severity.
    pub severity: CaseSeverity,
    /// When it was opened.
    pub opened_at: i64,
    /// The event id of its latest record.
    pub event_id: String,
}

/// One meter's usage in a billing period.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeriodUsage {
    /// Period start.
    pub period_start: i64,
    /// Used so far (or in total, when final).
    pub used: Decimal6,
    /// Whether the period is over.
    pub complete: bool,
    /// The unit.
    pub unit: String,
    /// When observed.
    pub at: i64,
    /// Its event id.
    pub event_id: String,
}

/// A renewal's notifications so far.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Schedule {
    /// The renewal date they are for (days since the epoch).
    pub renewal_date: i32,
    /// Milestones sent, or passed before the contract was known (days before renewal).
    pub done: BTreeSet<i32>,
    /// Level of the latest notification.
    pub last_level: Option<RiskLevel>,
    /// Causes of sharp rises notified.
    pub raised: BTreeSet<String>,
}

/// What renewal-notifier knows of one account.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AccountView {
    /// Entitlement state, since when, from which event.
    #[serde(default)]
    pub entitlement: Option<(EntitlementState, i64, String)>,
    /// Failed payments in the window.
    #[serde(default)]
    pub failed_payments: Vec<FailedPayment>,
    /// Open cases by id.
    #[serde(default)]
    pub open_cases: BTreeMap<String, OpenCase>,
    /// Usage by meter: the current period, and the last two complete ones.
    #[serde(default)]
    pub usage: BTreeMap<String, Vec<PeriodUsage>>,
    /// Overage charges: when, amount, currency.
    #[serde(default)]
    pub charges: Vec<(i64, Decimal6, String)>,
    /// The renewals notified, by contract id.
    #[serde(default)]
    pub schedules: BTreeMap<String, Schedule>,
}

impl StoredValue for AccountView {}

/// Labels of a notification.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NotificationLabels {
    /// LOW, MEDIUM or HIGH.
    pub risk_level: String,
    /// `milestone` or `risk_increase`.
    pub trigger: String,
}

/// renewal-notifier's own metrics, beside the runtime's.
#[derive(Debug, Clone, Default)]
pub struct NotifierMetrics {
    /// Notifications written.
    pub notifications: Family<NotificationLabels, Counter>,
    /// Contracts whose schedule a sweep looked at.
    pub evaluations: Counter,
}

/// The master data renewal-notifier reads: contracts, found by account and by the partition
/// of their account.
#[derive(Debug, Clone)]
pub struct MasterData {
    /// `refdata.contracts`, also under `acct:<account>` and `part:<partition of the account>`.
    pub contracts: ReferenceTable<Contract>,
}

impl MasterData {
    /// The tables, for a deployment whose event topics have `partitions` partitions.
    pub fn new(partitions: i32) -> Self {
        Self {
            contracts: ReferenceTable::new(move |contract: &Contract| {
                let account = &contract.envelope.account_id;
                vec![format!("acct:{account}"), format!("part:{}", partition_of(account.as_bytes(), partitions))]
            }),
        }
    }
}

/// One renewal milestone: its days before renewal and when it is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Milestone {
    days: i32,
    due_ms: i64,
}

/// The renewal-notifier processor.
#[derive(Debug)]
pub struct RenewalProcessor {
    master: MasterData,
    settings: Settings,
    metrics: NotifierMetrics,
}

impl Processor for RenewalProcessor {
    type Input = NotifierInput;

    fn stores(&self) -> Vec<&'static str> {
        vec![ACCOUNTS.name()]
    }

    fn outputs(&self) -> Vec<&'static str> {
        vec![topics::RENEWAL_NOTIFICATIONS]
    }

    fn sweep_every(&self) -> Option<std::time::Duration> {
        Some(self.settings.schedule_check_every)
    }

    async fn process(&self, context: &mut Context<'_>, input: &NotifierInput) -> Result<(), ProcessError> {
        let account_id = input_account(input);
        let mut view = context.get(ACCOUNTS, account_id)?.unwrap_or_default();
        let now = context.now().timestamp_millis();
        let cause = self.observe(&mut view, input, now);
        if let Some(cause) = cause {
            self.raise_if_risen(context, account_id, &mut view, input_envelope(input), &cause)?;
        }
        context.put(ACCOUNTS, account_id, &view)?;
        Ok(())
    }

    async fn on_timer(&self, context: &mut Context<'_>, timer: &Timer) -> Result<(), ProcessError> {
        if timer.key == SWEEP_TIMER {
            return self.sweep(context);
        }
        if let Some(contract_id) = timer.key.strip_prefix(RENEWAL_TIMER_PREFIX) {
            return self.on_milestone(context, contract_id, timer);
        }
        tracing::warn!(timer = timer.key, "unknown timer dropped");
        Ok(())
    }
}

fn input_envelope(input: &NotifierInput) -> &Envelope {
    match input {
        NotifierInput::Entitlement(v) => &v.envelope,
        NotifierInput::Payment(v) => &v.envelope,
        NotifierInput::Case(v) => &v.envelope,
        NotifierInput::Usage(v) => &v.envelope,
        NotifierInput::Threshold(v) => &v.envelope,
        NotifierInput::Charge(v) => &v.envelope,
    }
}

fn input_account(input: &NotifierInput) -> &str {
    &input_envelope(input).account_id
}

/// Days since the epoch of a UTC instant.
fn day_of(ms: i64) -> i32 {
    i32::try_from(ms.div_euclid(DAY_MS)).unwrap_or_default()
}

fn date_label(days: i32) -> String {
    NaiveDate::from_num_days_from_ce_opt(days + 719_163).map(|d| d.to_string()).unwrap_or_default()
}

fn day_label(ms: i64) -> String {
    DateTime::from_timestamp_millis(ms).map(|t| t.format("%Y-%m-%d").to_string()).unwrap_or_default()
}

impl RenewalProcessor {
    /// A processor over `master` data.
    pub fn new(master: MasterData, settings: Settings, metrics: NotifierMetrics) -> Self {
        Self { master, settings, metrics }
    }

    /// Folds `input` into the account's view; returns a short name of what changed, when it may
    /// raise the risk.
    fn observe(&self, view: &mut AccountView, input: &NotifierInput, now: i64) -> Option<String> {
        let window = i64::from(self.settings.scoring.failed_payments_window_days) * DAY_MS;
        view.failed_payments.retain(|p| p.at >= now - window);
        let charges_window = i64::from(self.settings.scoring.charges_window_days) * DAY_MS;
        view.charges.retain(|(at, _, _)| *at >= now - charges_window);
        match input {
            NotifierInput::Entitlement(change) => {
                view.entitlement =
                    Some((change.to_state, change.envelope.occurred_at, change.envelope.event_id.clone()));
                Some(format!("entitlement/{}", change.envelope.event_id))
            }
            NotifierInput::Payment(payment) if payment.status == PaymentStatus::Failed => {
                if !view.failed_payments.iter().any(|p| p.event_id == payment.envelope.event_id) {
                    view.failed_payments.push(FailedPayment {
                        at: payment.envelope.occurred_at,
                        invoice_id: payment.invoice_id.clone(),
                        event_id: payment.envelope.event_id.clone(),
                    });
                }
                Some(format!("payment/{}", payment.payment_id))
            }
            NotifierInput::Payment(_) => None,
            NotifierInput::Case(case) => {
                let closed = case.action == CaseAction::Closed
                    || matches!(case.status, CaseStatus::Solved | CaseStatus::Closed)
                    || case.closed_at.is_some();
                if closed {
                    view.open_cases.remove(&case.case_id);
                    None
                } else {
                    let open = OpenCase {
                        severity: case.severity,
                        opened_at: case.opened_at,
                        event_id: case.envelope.event_id.clone(),
                    };
                    view.open_cases.insert(case.case_id.clone(), open);
                    Some(format!("case/{}/{}", case.case_id, symbol(&case.severity)))
                }
            }
            NotifierInput::Usage(total) => {
                let period = total.window_kind == WindowKind::BillingPeriod && total.dimensions.is_empty();
                if period {
                    let usage = PeriodUsage {
                        period_start: total.window_start,
                        used: total.total_quantity,
                        complete: total.is_final,
                        unit: total.unit.clone(),
                        at: total.envelope.occurred_at,
                        event_id: total.envelope.event_id.clone(),
                    };
                    record_usage(view.usage.entry(total.meter.clone()).or_default(), usage);
                }
                None
            }
            NotifierInput::Threshold(crossing) => {
                let usage = PeriodUsage {
                    period_start: crossing.period_start,
                    used: crossing.used_quantity,
                    complete: false,
                    unit: crossing.unit.clone(),
                    at: crossing.crossed_at,
                    event_id: crossing.envelope.event_id.clone(),
                };
                record_usage(view.usage.entry(crossing.meter.clone()).or_default(), usage);
                None
            }
            NotifierInput::Charge(charge) => {
                view.charges.push((charge.envelope.occurred_at, charge.amount, charge.currency.clone()));
                None
            }
        }
    }

    /// The milestones of `contract`'s renewal, earliest first.
    fn milestones(&self, contract: &Contract) -> Vec<Milestone> {
        let mut days: BTreeSet<i32> = self.settings.milestones_days.iter().map(|d| *d as i32).collect();
        if self.settings.notify_at_notice_deadline
            && let Some(notice) = contract.notice_period_days.filter(|n| *n > 0)
        {
            days.insert(notice);
        }
        let renewal_ms = i64::from(contract.renewal_date) * DAY_MS;
        days.into_iter().rev().map(|days| Milestone { days, due_ms: renewal_ms - i64::from(days) * DAY_MS }).collect()
    }

    /// Whether the contract is to be notified at all.
    fn scheduled(contract: &Contract) -> bool {
        !contract.deleted && matches!(contract.status, ContractStatus::Active | ContractStatus::Pending)
    }

    /// Sets the contract's timer to its next milestone, or clears it; marks milestones that
    /// passed unseen as done but the latest.
    fn reschedule(
        &self,
        context: &mut Context<'_>,
        contract: &Contract,
        view: &mut AccountView,
    ) -> Result<(), ProcessError> {
        let timer = format!("{RENEWAL_TIMER_PREFIX}{}", contract.contract_id);
        if !Self::scheduled(contract) {
            view.schedules.remove(&contract.contract_id);
            context.cancel(&timer);
            return Ok(());
        }
        let now = context.now().timestamp_millis();
        let schedule = view.schedules.entry(contract.contract_id.clone()).or_default();
        if schedule.renewal_date != contract.renewal_date {
            // Renewed, or moved: a new schedule.
            *schedule = Schedule { renewal_date: contract.renewal_date, ..Schedule::default() };
        }
        let renewal_ms = i64::from(contract.renewal_date) * DAY_MS;
        let pending: Vec<Milestone> =
            self.milestones(contract).into_iter().filter(|m| !schedule.done.contains(&m.days)).collect();
        let passed: Vec<&Milestone> = pending.iter().filter(|m| m.due_ms <= now).collect();
        // Of the milestones already passed, only the latest is still worth a notification.
        if let Some((latest, earlier)) = passed.split_last() {
            for milestone in earlier {
                schedule.done.insert(milestone.days);
            }
            if now >= renewal_ms {
                schedule.done.insert(latest.days);
            }
        }
        let next = pending.iter().find(|m| !schedule.done.contains(&m.days));
        match next {
            Some(milestone) => {
                let due = DateTime::from_timestamp_millis(milestone.due_ms.max(now)).unwrap_or_else(|| context.now());
                if context.scheduled(&timer)? != Some(due) {
                    let payload = serde_json::json!({
                        "account_id": contract.envelope.account_id,
                        "renewal_date": contract.renewal_date,
                        "milestone_days": milestone.days,
                    });
                    context.schedule(&timer, due, payload)?;
                }
            }
            None => context.cancel(&timer),
        }
        Ok(())
    }

    /// The partition sweep: every contract of an account on this partition scheduled.
    fn sweep(&self, context: &mut Context<'_>) -> Result<(), ProcessError> {
        let contracts = self.master.contracts.find(&format!("part:{}", context.partition()));
        // Each account's view, as read and as rescheduled: only the changed ones are written.
        let mut views: BTreeMap<String, (AccountView, AccountView)> = BTreeMap::new();
        for contract in contracts {
            self.metrics.evaluations.inc();
            let account = contract.envelope.account_id.clone();
            if !views.contains_key(&account) {
                let view = context.get(ACCOUNTS, &account)?.unwrap_or_default();
                views.insert(account.clone(), (view.clone(), view));
            }
            let (_, view) = views.get_mut(&account).expect("inserted above");
            self.reschedule(context, &contract, view)?;
        }
        for (account, (before, view)) in views {
            if view != before {
                context.put(ACCOUNTS, &account, &view)?;
            }
        }
        Ok(())
    }

    /// A milestone came due: notify, unless the renewal moved meanwhile; then the next one.
    fn on_milestone(&self, context: &mut Context<'_>, contract_id: &str, timer: &Timer) -> Result<(), ProcessError> {
        let Some(contract) = self.master.contracts.get(contract_id) else { return Ok(()) };
        let account = contract.envelope.account_id.clone();
        let mut view = context.get(ACCOUNTS, &account)?.unwrap_or_default();
        let renewal_date = timer.payload["renewal_date"].as_i64().unwrap_or_default() as i32;
        let days = timer.payload["milestone_days"].as_i64().unwrap_or_default() as i32;
        let current = Self::scheduled(&contract) && contract.renewal_date == renewal_date;
        let done =
            view.schedules.get(contract_id).is_some_and(|s| s.renewal_date == renewal_date && s.done.contains(&days));
        if current && !done {
            let notification = self.notification(context, &contract, &view, days, None, None);
            let schedule = view.schedules.entry(contract_id.to_owned()).or_default();
            if schedule.renewal_date != renewal_date {
                *schedule = Schedule { renewal_date, ..Schedule::default() };
            }
            schedule.done.insert(days);
            schedule.last_level = Some(notification.risk_level);
            self.emit(context, &account, notification, "milestone");
        }
        self.reschedule(context, &contract, &mut view)?;
        context.put(ACCOUNTS, &account, &view)?;
        Ok(())
    }

    /// A record raised the account's risk to `raise_on` within the window: a notification now,
    /// once per cause.
    fn raise_if_risen(
        &self,
        context: &mut Context<'_>,
        account: &str,
        view: &mut AccountView,
        envelope: &Envelope,
        cause: &str,
    ) -> Result<(), ProcessError> {
        let now = context.now().timestamp_millis();
        for contract in self.master.contracts.find(&format!("acct:{account}")) {
            if !Self::scheduled(&contract) {
                continue;
            }
            let until = contract.renewal_date - day_of(now);
            if until < 0 || until > self.settings.window_days() as i32 {
                continue;
            }
            let signals = self.assess(view, &contract, now);
            let level = level_of(&signals, self.settings.scoring.medium_signals_for_high);
            let schedule = view.schedules.entry(contract.contract_id.clone()).or_default();
            if schedule.renewal_date != contract.renewal_date {
                *schedule = Schedule { renewal_date: contract.renewal_date, ..Schedule::default() };
            }
            let risen = level >= self.settings.raise_on && schedule.last_level.is_none_or(|last| last < level);
            if !risen || schedule.raised.contains(cause) {
                continue;
            }
            schedule.raised.insert(cause.to_owned());
            schedule.last_level = Some(level);
            let why = signals
                .iter()
                .filter(|s| s.severity >= self.settings.raise_on)
                .map(|s| s.description.clone())
                .collect::<Vec<_>>()
                .join("; ");
            let notification = self.notification(context, &contract, view, until, Some(why), Some((envelope, cause)));
            self.emit(context, account, notification, "risk_increase");
        }
        Ok(())
    }

    fn emit(&self, context: &mut Context<'_>, account: &str, notification: RenewalNotification, trigger: &str) {
        let labels = NotificationLabels { risk_level: symbol(&notification.risk_level), trigger: trigger.to_owned() };
        self.metrics.notifications.get_or_create(&labels).inc();
        tracing::info!(
            account,
            contract = notification.contract_id,
            milestone = notification.milestone_days,
            level = ?notification.risk_level,
            "renewal notification"
        );
        context.emit(Output::new(account.to_owned(), notification));
    }

    /// The notification of `contract` at `milestone_days`.
    fn notification(
        &self,
        context: &Context<'_>,
        contract: &Contract,
        view: &AccountView,
        milestone_days: i32,
        risk_increase_cause: Option<String>,
        caused_by: Option<(&Envelope, &str)>,
    ) -> RenewalNotification {
        let now = context.now();
        let signals = self.assess(view, contract, now.timestamp_millis());
        let level = level_of(&signals, self.settings.scoring.medium_signals_for_high);
        let discriminator = format!("renewal/{}/{}/{}", contract.contract_id, contract.renewal_date, milestone_days);
        let envelope = match caused_by {
            Some((cause, key)) => Envelope::caused_by(cause, SOURCE, &format!("{discriminator}/{key}"), now),
            // A milestone's record: its ids derived from what it is for.
            None => Envelope::scheduled(SOURCE, &contract.envelope.account_id, &discriminator, &discriminator, now),
        };
        let actions = self.actions(&signals, contract, milestone_days);
        RenewalNotification {
            envelope,
            contract_id: contract.contract_id.clone(),
            customer_id: contract.customer_id.clone(),
            subscription_id: Some(contract.subscription_id.clone()),
            renewal_date: contract.renewal_date,
            days_until_renewal: contract.renewal_date - day_of(now.timestamp_millis()),
            milestone_days,
            auto_renew: contract.auto_renew,
            contract_value: contract.contract_value,
            currency: contract.contract_value.map(|_| contract.currency.clone()),
            audience: self.settings.audience_for(level),
            risk_level: level,
            risk_signals: signals,
            recommended_actions: actions,
            risk_increase_cause,
        }
    }

    /// The account's risk signals for `contract`, most severe first.
    pub fn assess(&self, view: &AccountView, contract: &Contract, now: i64) -> Vec<RiskSignal> {
        let scoring = &self.settings.scoring;
        let mut signals = Vec::new();
        let signal =
            |kind, severity, description: String, at, evidence: Vec<(&str, String)>, source: Option<&String>| {
                RiskSignal {
                    kind,
                    description,
                    severity,
                    observed_at: at,
                    evidence: evidence.into_iter().map(|(k, v)| (k.to_owned(), v)).collect::<HashMap<_, _>>(),
                    source_event_id: source.cloned(),
                }
            };
        if let Some((state, since, event_id)) = &view.entitlement {
            let found = match state {
                EntitlementState::Suspended => {
                    Some((RiskSignalKind::AccountSuspended, scoring.suspended, "suspended for non-payment"))
                }
                EntitlementState::Grace => Some((RiskSignalKind::AccountInGrace, scoring.grace, "in payment grace")),
                _ => None,
            };
            if let Some((kind, severity, what)) = found {
                let description = format!("Account {what} since {}", day_label(*since));
                signals.push(signal(
                    kind,
                    severity,
                    description,
                    *since,
                    vec![("state", symbol(state))],
                    Some(event_id),
                ));
            }
        }
        let window = i64::from(scoring.failed_payments_window_days) * DAY_MS;
        let failed: Vec<&FailedPayment> = view.failed_payments.iter().filter(|p| p.at >= now - window).collect();
        if let Some(last) = failed.iter().max_by_key(|p| p.at) {
            let count = failed.len();
            let severity =
                if count as u32 >= scoring.failed_payments_high { RiskLevel::High } else { RiskLevel::Medium };
            let description = format!(
                "{count} failed payment{} in the last {} days",
                if count == 1 { "" } else { "s" },
                scoring.failed_payments_window_days
            );
            let evidence = vec![("count", count.to_string()), ("last_invoice_id", last.invoice_id.clone())];
            signals.push(signal(
                RiskSignalKind::PaymentFailed,
                severity,
                description,
                last.at,
                evidence,
                Some(&last.event_id),
            ));
        }
        let mut by_severity: BTreeMap<CaseSeverity, Vec<(&String, &OpenCase)>> = BTreeMap::new();
        for (id, case) in &view.open_cases {
            by_severity.entry(case.severity).or_default().push((id, case));
        }
        for (severity, cases) in by_severity {
            let Some(base) = scoring.case_severities.get(&symbol(&severity)).copied() else { continue };
            let oldest = cases.iter().min_by_key(|(_, c)| c.opened_at).expect("at least one");
            let age_days = (now - oldest.1.opened_at).max(0) / DAY_MS;
            let level = if age_days >= i64::from(scoring.case_age_days) { raise(base) } else { base };
            let count = cases.len();
            let description = format!(
                "{count} open {} case{} for {age_days} day{}{}",
                symbol(&severity),
                if count == 1 { "" } else { "s" },
                if age_days == 1 { "" } else { "s" },
                if count == 1 { format!(" ({})", oldest.0) } else { format!(", the oldest {}", oldest.0) },
            );
            let evidence = vec![
                ("severity", symbol(&severity)),
                ("count", count.to_string()),
                ("case_id", oldest.0.clone()),
                ("age_days", age_days.to_string()),
            ];
            signals.push(signal(
                RiskSignalKind::OpenSupportCase,
                level,
                description,
                oldest.1.opened_at,
                evidence,
                Some(&oldest.1.event_id),
            ));
        }
        let charged: Decimal =
            view.charges.iter().filter(|(_, _, c)| *c == contract.currency).map(|(_, a, _)| a.value()).sum();
        for included in &contract.included_usage {
            let Some(periods) = view.usage.get(&included.meter) else { continue };
            let quota = included.included_quantity.value();
            if quota <= Decimal::ZERO {
                continue;
            }
            let percent = |used: Decimal6| (used.value() * Decimal::from(100) / quota).round();
            if let Some(current) = periods.last() {
                let share = percent(current.used);
                if share >= Decimal::from(scoring.overage_percent) {
                    let severity = if share >= Decimal::from(scoring.overage_percent_medium) {
                        RiskLevel::Medium
                    } else {
                        RiskLevel::Low
                    };
                    let mut description = format!(
                        "Usage of {} at {share} % of contract this period ({} of {} {} included)",
                        included.meter, current.used, included.included_quantity, current.unit
                    );
                    let mut evidence = vec![("meter", included.meter.clone()), ("used_percent", share.to_string())];
                    if charged > Decimal::ZERO {
                        description.push_str(&format!(
                            "; {} {} overage charged in the last {} days",
                            contract.currency,
                            charged.round_dp(2),
                            scoring.charges_window_days
                        ));
                        evidence.push(("overage_charged", charged.round_dp(2).to_string()));
                    }
                    signals.push(signal(
                        RiskSignalKind::UsageOverage,
                        severity,
                        description,
                        current.at,
                        evidence,
                        Some(&current.event_id),
                    ));
                }
            }
            let complete: Vec<&PeriodUsage> = periods.iter().filter(|p| p.complete).collect();
            if let Some(last) = complete.last() {
                let share = percent(last.used);
                let before = complete.len().checked_sub(2).map(|i| complete[i]);
                let fell = before.filter(|b| {
                    b.used.value() > Decimal::ZERO
                        && last.used.value() * Decimal::from(100)
                            < b.used.value() * Decimal::from(scoring.decline_percent)
                });
                if share < Decimal::from(scoring.low_usage_percent) || fell.is_some() {
                    let mut description = format!(
                        "Usage of {} at {share} % of contract in the period from {}",
                        included.meter,
                        day_label(last.period_start)
                    );
                    if let Some(before) = fell {
                        description.push_str(&format!(", down from {} the period before", before.used));
                    }
                    let evidence = vec![("meter", included.meter.clone()), ("used_percent", share.to_string())];
                    signals.push(signal(
                        RiskSignalKind::UsageDecline,
                        RiskLevel::Medium,
                        description,
                        last.at,
                        evidence,
                        Some(&last.event_id),
                    ));
                }
            }
        }
        signals.sort_by_key(|signal| std::cmp::Reverse(signal.severity));
        signals
    }

    /// What to do about it, most important first, each with its owner.
    fn actions(&self, signals: &[RiskSignal], contract: &Contract, milestone_days: i32) -> Vec<RecommendedAction> {
        let mut actions: Vec<(RiskLevel, RecommendedAction)> = Vec::new();
        let action = |kind, description: String, owner| RecommendedAction { kind, description, owner };
        let worst =
            |kinds: &[RiskSignalKind]| signals.iter().filter(|s| kinds.contains(&s.kind)).map(|s| s.severity).max();
        use RiskSignalKind as K;
        if let Some(level) = worst(&[K::PaymentFailed, K::AccountInGrace, K::AccountSuspended]) {
            let text = "Resolve the open payment before the renewal: contact billing, update the payment method".into();
            actions.push((level, action(ActionKind::ResolvePayment, text, Audience::RevenueOperations)));
        }
        if let Some(level) = worst(&[K::OpenSupportCase]) {
            let text = "Escalate the open support cases and agree a fix date with the customer".into();
            actions.push((level, action(ActionKind::EscalateSupportCase, text, Audience::CustomerSuccess)));
        }
        if let Some(level) = worst(&[K::UsageOverage]) {
            let text = "Review usage and offer the next tier: usage is above the contracted quantity".into();
            actions.push((level, action(ActionKind::ReviewUsageAndUpsell, text, Audience::CustomerSuccess)));
        }
        if let Some(level) = worst(&[K::UsageDecline]) {
            let text = "Review adoption with the customer: usage is well below the contract".into();
            actions.push((level, action(ActionKind::ScheduleRenewalCall, text, Audience::CustomerSuccess)));
        }
        let notice = contract.notice_period_days.is_some_and(|n| n == milestone_days);
        if !contract.auto_renew || notice {
            let text = if contract.auto_renew {
                format!(
                    "Notice period ends today: confirm the renewal terms (renews {})",
                    date_label(contract.renewal_date)
                )
            } else {
                format!(
                    "Contract does not renew by itself: agree the renewal terms before {}",
                    date_label(contract.renewal_date)
                )
            };
            actions
                .push((RiskLevel::Medium, action(ActionKind::ConfirmRenewalTerms, text, Audience::RevenueOperations)));
        }
        if !actions.iter().any(|(_, a)| a.kind == ActionKind::ScheduleRenewalCall) {
            let text = format!("Schedule the renewal call ({milestone_days} days before renewal)");
            actions.push((RiskLevel::Low, action(ActionKind::ScheduleRenewalCall, text, Audience::CustomerSuccess)));
        }
        actions.sort_by_key(|(level, _)| std::cmp::Reverse(*level));
        actions.into_iter().map(|(_, a)| a).collect()
    }
}

/// Keeps a meter's current period and the last two complete ones.
fn record_usage(periods: &mut Vec<PeriodUsage>, usage: PeriodUsage) {
    match periods.iter_mut().find(|p| p.period_start == usage.period_start) {
        Some(known) if known.complete && !usage.complete => {} // a late running total
        Some(known) => {
            if usage.complete || usage.at >= known.at {
                *known = usage;
            }
        }
        None => periods.push(usage),
    }
    periods.sort_by_key(|p| p.period_start);
    while periods.len() > 3 {
        periods.remove(0);
    }
}

/// One level up (HIGH stays HIGH).
fn raise(level: RiskLevel) -> RiskLevel {
    match level {
        RiskLevel::Low => RiskLevel::Medium,
        _ => RiskLevel::High,
    }
}

/// The overall level: the highest severity, HIGH once `for_high` signals are MEDIUM or above,
/// LOW without signals.
pub fn level_of(signals: &[RiskSignal], for_high: usize) -> RiskLevel {
    let highest = signals.iter().map(|s| s.severity).max().unwrap_or(RiskLevel::Low);
    let medium_or_above = signals.iter().filter(|s| s.severity >= RiskLevel::Medium).count();
    if medium_or_above >= for_high { RiskLevel::High } else { highest.max(RiskLevel::Low) }
}
