//! The entitlement-watcher logic: a state machine per account, driven by payments, invoices,
//! the runtime's clock, master data and operators.
//!
//! What each input does:
//! - `billing.payments` FAILED: the invoice becomes overdue ([`on_failure`](EntitlementProcessor::on_failure));
//!   the first overdue invoice starts grace (`payment_failed`), dunning EXHAUSTED suspends
//!   (`dunning_exhausted`). SUCCEEDED: the invoice is settled, and once nothing is overdue the
//!   account is restored (`paid`).
//! - `billing.invoices`: PAID or VOID settles the invoice like a successful payment; an OPEN
//!   invoice's `amount_due` keeps the overdue amount right after a partial payment.
//! - `support.cases`: the account's open cases are tracked; while it is in GRACE or SUSPENDED
//!   each open case gets a flag with the payment status for its agent, once per case and state,
//!   and a severity-1 case of a suspended ENTERPRISE account is flagged for escalation.
//! - `entitlement.overrides`: an operator's MANUAL transition, with who and why.
//! - the grace timer `grace/<account>`, due when grace ends: `grace_expired`.
//! - the partition sweep (the runtime's [`SWEEP_TIMER`], every `closure_check_every`):
//!   `contract_ended` / `customer_closed` for the accounts whose contract ended or whose
//!   customer was closed in the master data.
//!
//! Every transition writes `entitlement.changes` (from, to, reason, effective time, what is
//! overdue), brings the account's support flags in line with its state (`support.account-flags`:
//! PAYMENT_GRACE or SUSPENDED SET, CLEARED when lifted) and tells the CRM (ENTITLEMENT_CHANGED,
//! PAYMENT_RECOVERED on restore; PAYMENT_FAILED when an invoice first fails).
//!
//! Out of order and twice: what a payment says is compared with what the account already knows
//! of the same invoice, by business time. A failure older than the invoice's settlement, or not
//! newer than the failure already recorded, changes nothing; a success older than the invoice's
//! latest failure does not settle it. The runtime drops exact redeliveries (same source and
//! event id) before any of this. Grace is one timer per account: a second failing invoice does
//! not move it (unless `extend_grace_on_new_failure`), a restore cancels it.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use tributary_contracts::decimal::Decimal6;
use tributary_contracts::topics;
use tributary_contracts::types::{
    AccountFlag, CaseAction, CaseSeverity, CaseStatus, Contract, ContractStatus, CrmAccountUpdate, CrmUpdateKind,
    Customer, CustomerStatus, DunningStatus, EntitlementChanged, EntitlementOverride, EntitlementState, Envelope,
    FlagAction, Invoice, InvoiceStatus, Payment, PaymentStatus, SupportAccountFlag, SupportCase, SupportTier,
    TransitionReason,
};
use tributary_runtime::table::ReferenceTable;
use tributary_runtime::{Context, Output, ProcessError, Processor, SWEEP_TIMER, Store, StoredValue, Timer};

use crate::settings::{Settings, Trigger};

/// The `source` of every record entitlement-watcher writes.
pub const SOURCE: &str = "tributary.entitlement-watcher";

tributary_runtime::input_enum! {
    /// What entitlement-watcher reads.
    pub enum WatcherInput {
        /// A payment attempt.
        Payment(Payment),
        /// The state of a platform invoice.
        Invoice(Invoice),
        /// A support case opened, updated or closed.
        Case(SupportCase),
        /// An operator's override.
        Override(EntitlementOverride),
    }
}

/// Every account's entitlement, by account id.
pub const ACCOUNTS: Store<AccountEntitlement> = Store::new("accounts");
const GRACE_TIMER_PREFIX: &str = "grace/";
/// Settled invoices remembered per account (to ignore their late, older failures).
const SETTLED_KEPT: usize = 64;

/// An invoice whose payment failed and is still owed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Overdue {
    /// What is owed on it.
    pub amount: Decimal6,
    /// Its currency.
    pub currency: String,
    /// Business time of its latest failed attempt.
    pub failed_at: i64,
    /// The latest failed attempt.
    pub payment_id: String,
    /// Its attempt number.
    pub attempt: i32,
    /// The dunning state after it.
    pub dunning: DunningStatus,
    /// The failure code, e.g. `card_declined`.
    pub failure_code: Option<String>,
    /// The subscription of the invoice.
    pub subscription_id: Option<String>,
}

/// One account's entitlement and what it is based on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AccountEntitlement {
    /// The account.
    pub account_id: String,
    /// The current state.
    pub state: EntitlementState,
    /// When it was entered (business time, ms).
    pub since: i64,
    /// Why.
    pub reason: TransitionReason,
    /// Its detail.
    #[serde(default)]
    pub reason_detail: Option<String>,
    /// When grace ends (state GRACE).
    #[serde(default)]
    pub grace_ends_at: Option<i64>,
    /// An operator put it in a state that payments do not lift (SUSPENDED, CLOSED).
    #[serde(default)]
    pub manual_hold: bool,
    /// The invoices overdue, by invoice id.
    #[serde(default)]
    pub overdue: BTreeMap<String, Overdue>,
    /// Settled invoices, by invoice id, with when (business time): a late failure older than
    /// the settlement does not make them overdue again.
    #[serde(default)]
    pub settled: BTreeMap<String, i64>,
    /// The contract last seen for the account.
    #[serde(default)]
    pub contract_id: Option<String>,
    /// The account's flags SET in the support platform.
    #[serde(default)]
    pub flags: BTreeSet<AccountFlag>,
    /// The account's open support cases and their severity.
    #[serde(default)]
    pub open_cases: BTreeMap<String, CaseSeverity>,
    /// The open cases flagged, with the state they were flagged for.
    #[serde(default)]
    pub flagged_cases: BTreeMap<String, EntitlementState>,
    /// Transitions made so far (the sequence in event ids).
    #[serde(default)]
    pub transitions: u64,
}

impl StoredValue for AccountEntitlement {}

impl AccountEntitlement {
    fn new(account_id: &str, since: i64) -> Self {
        Self {
            account_id: account_id.to_owned(),
            state: EntitlementState::Active,
            since,
            reason: TransitionReason::Unknown,
            reason_detail: None,
            grace_ends_at: None,
            manual_hold: false,
            overdue: BTreeMap::new(),
            settled: BTreeMap::new(),
            contract_id: None,
            flags: BTreeSet::new(),
            open_cases: BTreeMap::new(),
            flagged_cases: BTreeMap::new(),
            transitions: 0,
        }
    }

    /// What is overdue, and its currency (the first overdue invoice's; accounts bill in one).
    pub fn outstanding(&self) -> Option<(Decimal6, String)> {
        let first = self.overdue.values().next()?;
        let total: Decimal = self.overdue.values().map(|o| o.amount.value()).sum();
        Some((Decimal6::new(total).unwrap_or(first.amount), first.currency.clone()))
    }

    /// The latest failed payment's dunning state.
    fn dunning(&self) -> Option<DunningStatus> {
        self.overdue.values().max_by_key(|o| o.failed_at).map(|o| o.dunning)
    }

    fn settle(&mut self, invoice_id: &str, at: i64) {
        self.overdue.remove(invoice_id);
        let at = self.settled.get(invoice_id).map_or(at, |known| (*known).max(at));
        self.settled.insert(invoice_id.to_owned(), at);
        while self.settled.len() > SETTLED_KEPT {
            let oldest = self.settled.iter().min_by_key(|(_, at)| **at).map(|(id, _)| id.clone());
            if let Some(oldest) = oldest {
                self.settled.remove(&oldest);
            }
        }
    }
}

/// Labels of a transition.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransitionLabels {
    /// State left.
    pub from: String,
    /// State entered.
    pub to: String,
    /// Why.
    pub reason: String,
}

/// Labels of a flag written.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FlagLabels {
    /// PAYMENT_GRACE or SUSPENDED.
    pub flag: String,
    /// SET or CLEARED.
    pub action: String,
    /// `account` or `case`.
    pub on: String,
}

/// entitlement-watcher's own metrics, beside the runtime's.
#[derive(Debug, Clone, Default)]
pub struct WatcherMetrics {
    /// Transitions made.
    pub transitions: Family<TransitionLabels, Counter>,
    /// Support flags written.
    pub flags: Family<FlagLabels, Counter>,
    /// Payment events that changed nothing because they were older than what the account
    /// knew, or repeated a failure already recorded.
    pub stale_payments: Counter,
    /// Cases flagged for escalation.
    pub escalations: Counter,
}

/// What moved the account, for the records a transition writes.
struct Cause<'a> {
    /// The triggering record's envelope (`None` for a timer).
    envelope: Option<&'a Envelope>,
    reason: TransitionReason,
    detail: Option<String>,
    invoice_id: Option<String>,
    payment_id: Option<String>,
    subscription_id: Option<String>,
}

impl<'a> Cause<'a> {
    fn new(envelope: Option<&'a Envelope>, reason: TransitionReason, detail: impl Into<Option<String>>) -> Self {
        Self { envelope, reason, detail: detail.into(), invoice_id: None, payment_id: None, subscription_id: None }
    }

    fn payment(envelope: &'a Envelope, reason: TransitionReason, detail: String, payment: &Payment) -> Self {
        Self {
            envelope: Some(envelope),
            reason,
            detail: Some(detail),
            invoice_id: Some(payment.invoice_id.clone()),
            payment_id: Some(payment.payment_id.clone()),
            subscription_id: payment.subscription_id.clone(),
        }
    }
}

/// The master data entitlement-watcher reads: contracts (by id, subscription and account) and
/// customers.
#[derive(Debug, Clone)]
pub struct MasterData {
    /// `refdata.contracts`, also found under `sub:<subscription>` and `acct:<account>`.
    pub contracts: ReferenceTable<Contract>,
    /// `refdata.customers`.
    pub customers: ReferenceTable<Customer>,
}

impl Default for MasterData {
    fn default() -> Self {
        Self {
            contracts: ReferenceTable::new(|contract: &Contract| {
                vec![format!("sub:{}", contract.subscription_id), format!("acct:{}", contract.envelope.account_id)]
            }),
            customers: ReferenceTable::new(|_: &Customer| Vec::new()),
        }
    }
}

impl MasterData {
    /// The account's contract: the one named, else the subscription's, else the account's
    /// current one (ACTIVE first, then the latest term).
    pub fn contract_of(
        &self,
        contract_id: Option<&str>,
        subscription_id: Option<&str>,
        account: &str,
    ) -> Option<Contract> {
        if let Some(contract) = contract_id.and_then(|id| self.contracts.get(id)) {
            return Some((*contract).clone());
        }
        let candidates = match subscription_id {
            Some(subscription) => self.contracts.find(&format!("sub:{subscription}")),
            None => Vec::new(),
        };
        let candidates =
            if candidates.is_empty() { self.contracts.find(&format!("acct:{account}")) } else { candidates };
        candidates
            .iter()
            .max_by_key(|c| (c.status == ContractStatus::Active, c.term_start))
            .map(|contract| (**contract).clone())
    }
}

/// The entitlement-watcher processor.
#[derive(Debug)]
pub struct EntitlementProcessor {
    master: MasterData,
    settings: Settings,
    metrics: WatcherMetrics,
}

impl Processor for EntitlementProcessor {
    type Input = WatcherInput;

    fn stores(&self) -> Vec<&'static str> {
        vec![ACCOUNTS.name()]
    }

    fn outputs(&self) -> Vec<&'static str> {
        vec![topics::ENTITLEMENT_CHANGES, topics::SUPPORT_ACCOUNT_FLAGS, topics::CRM_ACCOUNT_UPDATES]
    }

    /// The closure check: master data does not arrive on the account's partition.
    fn sweep_every(&self) -> Option<std::time::Duration> {
        Some(self.settings.closure_check_every)
    }

    async fn process(&self, context: &mut Context<'_>, input: &WatcherInput) -> Result<(), ProcessError> {
        match input {
            WatcherInput::Payment(payment) => self.on_payment(context, payment),
            WatcherInput::Invoice(invoice) => self.on_invoice(context, invoice),
            WatcherInput::Case(case) => self.on_case(context, case),
            WatcherInput::Override(order) => self.on_override(context, order),
        }
    }

    async fn on_timer(&self, context: &mut Context<'_>, timer: &Timer) -> Result<(), ProcessError> {
        if let Some(account) = timer.key.strip_prefix(GRACE_TIMER_PREFIX) {
            return self.on_grace_end(context, account, timer);
        }
        if timer.key == SWEEP_TIMER {
            return self.check_closures(context);
        }
        tracing::warn!(timer = timer.key, "unknown timer dropped");
        Ok(())
    }
}

impl EntitlementProcessor {
    /// A processor over `master` data.
    pub fn new(master: MasterData, settings: Settings, metrics: WatcherMetrics) -> Self {
        Self { master, settings, metrics }
    }

    fn load(&self, context: &Context<'_>, account: &str) -> Result<AccountEntitlement, ProcessError> {
        Ok(context
            .get(ACCOUNTS, account)?
            .unwrap_or_else(|| AccountEntitlement::new(account, context.now().timestamp_millis())))
    }

    /// A payment attempt.
    fn on_payment(&self, context: &mut Context<'_>, payment: &Payment) -> Result<(), ProcessError> {
        let account_id = payment.envelope.account_id.as_str();
        let mut account = self.load(context, account_id)?;
        let contract = self.master.contract_of(None, payment.subscription_id.as_deref(), account_id);
        if let Some(contract) = &contract {
            account.contract_id = Some(contract.contract_id.clone());
        }
        match payment.status {
            PaymentStatus::Failed => self.on_failure(context, &mut account, payment, contract.as_ref())?,
            PaymentStatus::Succeeded => self.on_success(context, &mut account, payment, contract.as_ref())?,
            PaymentStatus::Unknown => {
                return Err(ProcessError::permanent(
                    "unknown_payment_status",
                    format!("payment {} has a status this version does not know", payment.payment_id),
                ));
            }
        }
        context.put(ACCOUNTS, account_id, &account)?;
        Ok(())
    }

    /// A failed attempt: the invoice is overdue; grace starts, or dunning exhaustion suspends.
    fn on_failure(
        &self,
        context: &mut Context<'_>,
        account: &mut AccountEntitlement,
        payment: &Payment,
        contract: Option<&Contract>,
    ) -> Result<(), ProcessError> {
        let at = payment.envelope.occurred_at;
        let invoice = payment.invoice_id.as_str();
        if account.settled.get(invoice).is_some_and(|settled| *settled >= at) {
            tracing::info!(invoice, "failure older than the invoice's settlement: ignored");
            self.metrics.stale_payments.inc();
            return Ok(());
        }
        let known = account.overdue.get(invoice);
        if known.is_some_and(|known| known.failed_at >= at) {
            tracing::debug!(invoice, payment = payment.payment_id, "failure not newer than the one recorded: ignored");
            self.metrics.stale_payments.inc();
            return Ok(());
        }
        let first_failure_of_invoice = known.is_none();
        let overdue_before = !account.overdue.is_empty();
        account.overdue.insert(
            invoice.to_owned(),
            Overdue {
                amount: payment.amount,
                currency: payment.currency.clone(),
                failed_at: at,
                payment_id: payment.payment_id.clone(),
                attempt: payment.attempt_number,
                dunning: payment.dunning_status,
                failure_code: payment.failure_reason.as_ref().map(|reason| reason.code.clone()),
                subscription_id: payment.subscription_id.clone(),
            },
        );
        let code = payment.failure_reason.as_ref().map_or("failed", |reason| reason.code.as_str());
        let detail = format!("{code} on invoice {invoice}, attempt {}", payment.attempt_number);
        if first_failure_of_invoice {
            self.tell_crm_payment_failed(context, account, payment, &detail);
        }
        if account.manual_hold {
            return Ok(());
        }
        if payment.dunning_status == DunningStatus::Exhausted {
            let detail = format!("dunning exhausted: {detail}");
            let cause = Cause::payment(&payment.envelope, TransitionReason::DunningExhausted, detail, payment);
            return self.apply(context, account, Trigger::DunningExhausted, &cause, contract, None);
        }
        let grace_days = self.settings.grace_days(contract.map(|c| (c.grace_days, c.support_tier)));
        if grace_days == 0 {
            // A contract without grace: the account stays as it is until dunning is exhausted.
            return Ok(());
        }
        let grace_ends_at = at + i64::from(grace_days) * 86_400_000;
        let cause = Cause::payment(&payment.envelope, TransitionReason::PaymentFailed, detail, payment);
        if !overdue_before || account.state == EntitlementState::Active {
            return self.apply(context, account, Trigger::PaymentFailed, &cause, contract, Some(grace_ends_at));
        }
        let extends = self.settings.extend_grace_on_new_failure
            && first_failure_of_invoice
            && account.state == EntitlementState::Grace
            && account.grace_ends_at.is_some_and(|ends| ends < grace_ends_at);
        if extends {
            self.transition(context, account, EntitlementState::Grace, &cause, contract, Some(grace_ends_at))?;
        }
        Ok(())
    }

    /// A successful attempt: the invoice is settled unless it failed again after this success.
    fn on_success(
        &self,
        context: &mut Context<'_>,
        account: &mut AccountEntitlement,
        payment: &Payment,
        contract: Option<&Contract>,
    ) -> Result<(), ProcessError> {
        let at = payment.envelope.occurred_at;
        let invoice = payment.invoice_id.as_str();
        if account.overdue.get(invoice).is_some_and(|overdue| overdue.failed_at > at) {
            tracing::info!(
                invoice,
                payment = payment.payment_id,
                "success older than the invoice's latest failure: not restored"
            );
            self.metrics.stale_payments.inc();
            return Ok(());
        }
        let was_overdue = account.overdue.contains_key(invoice);
        account.settle(invoice, at);
        if was_overdue && account.overdue.is_empty() {
            let detail = format!("invoice {invoice} paid (payment {})", payment.payment_id);
            let cause = Cause::payment(&payment.envelope, TransitionReason::PaymentSucceeded, detail, payment);
            self.restore(context, account, &cause, contract)?;
        }
        Ok(())
    }

    /// Nothing is overdue any more: `paid`, unless an operator holds the account.
    fn restore(
        &self,
        context: &mut Context<'_>,
        account: &mut AccountEntitlement,
        cause: &Cause<'_>,
        contract: Option<&Contract>,
    ) -> Result<(), ProcessError> {
        if account.manual_hold {
            return Ok(());
        }
        let from = account.state;
        self.apply(context, account, Trigger::Paid, cause, contract, None)?;
        if account.state != from && cause.envelope.is_some() {
            self.tell_crm(
                context,
                account,
                cause,
                contract,
                CrmUpdateKind::PaymentRecovered,
                format!("Payment recovered: {}", cause.detail.clone().unwrap_or_default()),
            );
        }
        Ok(())
    }

    /// A platform invoice: PAID and VOID settle it; OPEN keeps its amount due current.
    fn on_invoice(&self, context: &mut Context<'_>, invoice: &Invoice) -> Result<(), ProcessError> {
        let account_id = invoice.envelope.account_id.as_str();
        let Some(mut account) = context.get(ACCOUNTS, account_id)? else { return Ok(()) };
        if !account.overdue.contains_key(&invoice.invoice_id) {
            return Ok(());
        }
        let contract =
            self.master.contract_of(account.contract_id.as_deref(), invoice.subscription_id.as_deref(), account_id);
        match invoice.status {
            InvoiceStatus::Paid | InvoiceStatus::Void => {
                account.settle(&invoice.invoice_id, invoice.envelope.occurred_at);
                if account.overdue.is_empty() {
                    let detail = format!("invoice {} {}", invoice.invoice_id, symbol(&invoice.status).to_lowercase());
                    let mut cause = Cause::new(Some(&invoice.envelope), TransitionReason::PaymentSucceeded, detail);
                    cause.invoice_id = Some(invoice.invoice_id.clone());
                    cause.subscription_id = invoice.subscription_id.clone();
                    self.restore(context, &mut account, &cause, contract.as_ref())?;
                }
            }
            InvoiceStatus::Open if invoice.amount_due.value() > Decimal::ZERO => {
                if let Some(overdue) = account.overdue.get_mut(&invoice.invoice_id) {
                    overdue.amount = invoice.amount_due;
                }
            }
            // DRAFT is not owed yet; an UNCOLLECTIBLE invoice stays owed.
            _ => {}
        }
        context.put(ACCOUNTS, account_id, &account)?;
        Ok(())
    }

    /// A support case: tracked while open, flagged for its agent while the account is in
    /// GRACE or SUSPENDED.
    fn on_case(&self, context: &mut Context<'_>, case: &SupportCase) -> Result<(), ProcessError> {
        let account_id = case.envelope.account_id.as_str();
        let mut account = self.load(context, account_id)?;
        let closed = case.action == CaseAction::Closed
            || matches!(case.status, CaseStatus::Solved | CaseStatus::Closed)
            || case.closed_at.is_some();
        if closed {
            account.open_cases.remove(&case.case_id);
            account.flagged_cases.remove(&case.case_id);
        } else {
            account.open_cases.insert(case.case_id.clone(), case.severity);
            let contract = self.master.contract_of(
                case.contract_id.as_deref().or(account.contract_id.as_deref()),
                None,
                account_id,
            );
            self.flag_cases(context, &mut account, Some(&case.envelope), contract.as_ref());
        }
        context.put(ACCOUNTS, account_id, &account)?;
        Ok(())
    }

    /// An operator's override: MANUAL, with who and why.
    fn on_override(&self, context: &mut Context<'_>, order: &EntitlementOverride) -> Result<(), ProcessError> {
        let to = order.to_state;
        if to == EntitlementState::Unknown || self.settings.rank(to).is_none() {
            return Err(ProcessError::permanent(
                "invalid_override",
                format!("override of {} to {to:?}: not a state of this deployment", order.envelope.account_id),
            ));
        }
        if order.requested_by.trim().is_empty() || order.reason.trim().is_empty() {
            return Err(ProcessError::permanent(
                "invalid_override",
                format!("override of {}: requested_by and reason are required", order.envelope.account_id),
            ));
        }
        let account_id = order.envelope.account_id.as_str();
        let mut account = self.load(context, account_id)?;
        let contract = self.master.contract_of(account.contract_id.as_deref(), None, account_id);
        let grace_ends_at = (to == EntitlementState::Grace).then(|| {
            order.grace_ends_at.unwrap_or_else(|| {
                let days = self.settings.grace_days(contract.as_ref().map(|c| (c.grace_days, c.support_tier)));
                context.now().timestamp_millis() + i64::from(days.max(1)) * 86_400_000
            })
        });
        let detail = format!("by {}: {}", order.requested_by, order.reason);
        let cause = Cause::new(Some(&order.envelope), TransitionReason::Manual, detail);
        account.manual_hold = matches!(to, EntitlementState::Suspended | EntitlementState::Closed);
        self.transition(context, &mut account, to, &cause, contract.as_ref(), grace_ends_at)?;
        context.put(ACCOUNTS, account_id, &account)?;
        Ok(())
    }

    /// The grace timer: suspends the account if it is still in the grace that scheduled it.
    fn on_grace_end(&self, context: &mut Context<'_>, account_id: &str, timer: &Timer) -> Result<(), ProcessError> {
        let Some(mut account) = context.get(ACCOUNTS, account_id)? else { return Ok(()) };
        let due = timer.due_at.timestamp_millis();
        if account.state != EntitlementState::Grace || account.grace_ends_at != Some(due) {
            tracing::debug!(account = account_id, "grace timer of a grace that is over: nothing to do");
            return Ok(());
        }
        let contract = self.master.contract_of(account.contract_id.as_deref(), None, account_id);
        let detail = format!("grace ended {}", day_label(due));
        let cause = Cause::new(None, TransitionReason::GraceExpired, detail);
        self.apply(context, &mut account, Trigger::GraceExpired, &cause, contract.as_ref(), None)?;
        context.put(ACCOUNTS, account_id, &account)?;
        Ok(())
    }

    /// Closes the partition's accounts whose contract ended or whose customer was closed.
    fn check_closures(&self, context: &mut Context<'_>) -> Result<(), ProcessError> {
        let now = context.now();
        for (account_id, mut account) in context.scan_prefix(ACCOUNTS, "")? {
            if account.state == EntitlementState::Closed {
                continue;
            }
            let contract = self.master.contract_of(account.contract_id.as_deref(), None, &account_id);
            let Some(contract) = contract else { continue };
            let customer = self.master.customers.get(&contract.customer_id);
            let (trigger, reason, detail) =
                if customer.as_ref().is_some_and(|c| c.status == CustomerStatus::Closed || c.deleted) {
                    (
                        Trigger::CustomerClosed,
                        TransitionReason::CustomerClosed,
                        format!("customer {} closed", contract.customer_id),
                    )
                } else if contract_ended(&contract, now) {
                    let detail =
                        format!("contract {} {}", contract.contract_id, symbol(&contract.status).to_lowercase());
                    (Trigger::ContractEnded, TransitionReason::ContractEnded, detail)
                } else {
                    continue;
                };
            let cause = Cause::new(None, reason, detail);
            let before = account.state;
            self.apply(context, &mut account, trigger, &cause, Some(&contract), None)?;
            if account.state != before {
                context.put(ACCOUNTS, &account_id, &account)?;
            }
        }
        Ok(())
    }

    /// Applies the rule for `trigger` in the account's state, if there is one.
    fn apply(
        &self,
        context: &mut Context<'_>,
        account: &mut AccountEntitlement,
        trigger: Trigger,
        cause: &Cause<'_>,
        contract: Option<&Contract>,
        grace_ends_at: Option<i64>,
    ) -> Result<(), ProcessError> {
        let Some(to) = self.settings.next(trigger, account.state) else { return Ok(()) };
        self.transition(context, account, to, cause, contract, grace_ends_at)
    }

    /// Moves the account to `to` and writes what a transition writes.
    fn transition(
        &self,
        context: &mut Context<'_>,
        account: &mut AccountEntitlement,
        to: EntitlementState,
        cause: &Cause<'_>,
        contract: Option<&Contract>,
        grace_ends_at: Option<i64>,
    ) -> Result<(), ProcessError> {
        let account_id = account.account_id.clone();
        let now = context.now();
        let from = account.state;
        let first = account.transitions == 0 && account.reason == TransitionReason::Unknown;
        account.state = to;
        account.since = now.timestamp_millis();
        account.reason = cause.reason;
        account.reason_detail = cause.detail.clone();
        account.transitions += 1;
        if cause.reason != TransitionReason::Manual {
            account.manual_hold = false;
        }
        let timer = format!("{GRACE_TIMER_PREFIX}{account_id}");
        account.grace_ends_at = if to == EntitlementState::Grace { grace_ends_at } else { None };
        match account.grace_ends_at {
            Some(ends) => {
                // A grace that ended before the failure arrived (a late event) ends at once.
                let due = DateTime::from_timestamp_millis(ends).unwrap_or(now);
                context.schedule(&timer, due, serde_json::json!({"grace_ends_at": ends}))?;
            }
            None => context.cancel(&timer),
        }
        let outstanding = account.outstanding();
        let envelope = self.envelope(cause, &account_id, &format!("entitlement/{}", account.transitions), now);
        let change = EntitlementChanged {
            envelope,
            from_state: (!first).then_some(from),
            to_state: to,
            reason: cause.reason,
            reason_detail: cause.detail.clone(),
            grace_ends_at: account.grace_ends_at,
            subscription_id: cause
                .subscription_id
                .clone()
                .or_else(|| account.overdue.values().find_map(|o| o.subscription_id.clone()))
                .or_else(|| contract.map(|c| c.subscription_id.clone())),
            contract_id: contract.map(|c| c.contract_id.clone()).or_else(|| account.contract_id.clone()),
            invoice_id: cause.invoice_id.clone(),
            payment_id: cause.payment_id.clone(),
            outstanding_amount: outstanding.as_ref().map(|(amount, _)| *amount),
            currency: outstanding.map(|(_, currency)| currency),
        };
        self.metrics
            .transitions
            .get_or_create(&TransitionLabels { from: symbol(&from), to: symbol(&to), reason: symbol(&cause.reason) })
            .inc();
        tracing::info!(account = account_id, from = ?from, to = ?to, reason = ?cause.reason, "entitlement changed");
        let summary = format!(
            "Entitlement {} -> {}: {}",
            symbol(&from),
            symbol(&to),
            cause.detail.clone().unwrap_or_else(|| symbol(&cause.reason).to_lowercase())
        );
        self.tell_crm(context, account, cause, contract, CrmUpdateKind::EntitlementChanged, summary);
        context.emit(Output::new(account_id.clone(), change));
        self.sync_account_flags(context, account, cause, contract);
        self.flag_cases(context, account, cause.envelope, contract);
        Ok(())
    }

    /// The flag the account's state calls for, if any.
    fn flag_for(state: EntitlementState) -> Option<AccountFlag> {
        match state {
            EntitlementState::Grace => Some(AccountFlag::PaymentGrace),
            EntitlementState::Suspended => Some(AccountFlag::Suspended),
            _ => None,
        }
    }

    /// SETs the flag the account's state calls for and CLEARs the others, each once.
    fn sync_account_flags(
        &self,
        context: &mut Context<'_>,
        account: &mut AccountEntitlement,
        cause: &Cause<'_>,
        contract: Option<&Contract>,
    ) {
        let account_id = account.account_id.clone();
        let account_id = account_id.as_str();
        let wanted = Self::flag_for(account.state);
        let to_clear: Vec<AccountFlag> = account.flags.iter().copied().filter(|flag| Some(*flag) != wanted).collect();
        for flag in to_clear {
            account.flags.remove(&flag);
            let reason = match account.state {
                EntitlementState::Active => "payment_succeeded",
                EntitlementState::Suspended => "suspended",
                EntitlementState::Closed => "closed",
                _ => "state_changed",
            };
            let note = format!("{} lifted: account {}", symbol(&flag), symbol(&account.state));
            let record = self.flag_record(
                context,
                account,
                cause,
                account_id,
                contract,
                flag,
                FlagAction::Cleared,
                reason,
                note,
                None,
            );
            context.emit(Output::new(account_id.to_owned(), record));
        }
        if let Some(flag) = wanted
            && account.flags.insert(flag)
        {
            let reason = match cause.reason {
                TransitionReason::GraceExpired => "grace_expired",
                TransitionReason::DunningExhausted => "dunning_exhausted",
                TransitionReason::Manual => "manual",
                _ => "payment_failed",
            };
            let note = self.payment_note(account);
            let record = self.flag_record(
                context,
                account,
                cause,
                account_id,
                contract,
                flag,
                FlagAction::Set,
                reason,
                note,
                None,
            );
            context.emit(Output::new(account_id.to_owned(), record));
        }
    }

    /// Flags each open case of an account in GRACE or SUSPENDED for its agent, once per case
    /// and state; clears the case flags once the account is out of both.
    fn flag_cases(
        &self,
        context: &mut Context<'_>,
        account: &mut AccountEntitlement,
        cause: Option<&Envelope>,
        contract: Option<&Contract>,
    ) {
        let account_id = account.account_id.clone();
        let cause = Cause::new(cause, account.reason, None);
        let cases: Vec<(String, CaseSeverity)> = account.open_cases.iter().map(|(id, s)| (id.clone(), *s)).collect();
        for (case_id, severity) in cases {
            let flagged = account.flagged_cases.get(&case_id).copied();
            match Self::flag_for(account.state) {
                Some(flag) if flagged != Some(account.state) => {
                    let tier = contract.map(|c| c.support_tier);
                    let escalation = &self.settings.escalation;
                    let escalate = escalation.severities.contains(&severity)
                        && escalation.states.contains(&account.state)
                        && tier.is_some_and(|tier| escalation.tiers.contains(&tier));
                    let reason = if escalate { "escalate" } else { "case_during_payment_problem" };
                    let mut note = self.payment_note(account);
                    if escalate {
                        self.metrics.escalations.inc();
                        note = format!(
                            "Escalate: {} case of a suspended {} account. {note}",
                            symbol(&severity),
                            tier.map(|t| symbol(&t)).unwrap_or_default()
                        );
                    }
                    let mut record = self.flag_record(
                        context,
                        account,
                        &cause,
                        &account_id,
                        contract,
                        flag,
                        FlagAction::Set,
                        reason,
                        note,
                        Some(&case_id),
                    );
                    record.escalate = escalate;
                    account.flagged_cases.insert(case_id, account.state);
                    context.emit(Output::new(account_id.clone(), record));
                }
                None if flagged.is_some() => {
                    let flag = flagged.and_then(Self::flag_for).unwrap_or(AccountFlag::PaymentGrace);
                    let note = format!("Payment problem over: account {}", symbol(&account.state));
                    let record = self.flag_record(
                        context,
                        account,
                        &cause,
                        &account_id,
                        contract,
                        flag,
                        FlagAction::Cleared,
                        "payment_succeeded",
                        note,
                        Some(&case_id),
                    );
                    account.flagged_cases.remove(&case_id);
                    context.emit(Output::new(account_id.clone(), record));
                }
                _ => {}
            }
        }
    }

    /// The text an agent sees: state, since when, what is overdue, until when.
    fn payment_note(&self, account: &AccountEntitlement) -> String {
        let mut note = match account.state {
            EntitlementState::Grace => format!("Payment failed; in grace since {}", day_label(account.since)),
            EntitlementState::Suspended => format!("Suspended for non-payment since {}", day_label(account.since)),
            state => format!("Account {}", symbol(&state)),
        };
        if let Some((amount, currency)) = account.outstanding() {
            note.push_str(&format!("; {currency} {} overdue", amount.value().round_dp(2)));
        }
        if let Some(ends) = account.grace_ends_at {
            note.push_str(&format!("; suspension on {} unless paid", day_label(ends)));
        }
        note.push('.');
        note
    }

    #[allow(clippy::too_many_arguments)]
    fn flag_record(
        &self,
        context: &mut Context<'_>,
        account: &AccountEntitlement,
        cause: &Cause<'_>,
        account_id: &str,
        contract: Option<&Contract>,
        flag: AccountFlag,
        action: FlagAction,
        reason: &str,
        note: String,
        case_id: Option<&str>,
    ) -> SupportAccountFlag {
        let now = context.now();
        let discriminator = format!(
            "flag/{}/{}/{}/{}",
            account.transitions,
            case_id.unwrap_or("account"),
            symbol(&flag),
            symbol(&action)
        );
        self.metrics
            .flags
            .get_or_create(&FlagLabels {
                flag: symbol(&flag),
                action: symbol(&action),
                on: if case_id.is_some() { "case" } else { "account" }.into(),
            })
            .inc();
        let outstanding = account.outstanding();
        let set = action == FlagAction::Set;
        SupportAccountFlag {
            envelope: self.envelope(cause, account_id, &discriminator, now),
            flag,
            action,
            reason: reason.to_owned(),
            note: Some(note),
            expires_at: if set && flag == AccountFlag::PaymentGrace { account.grace_ends_at } else { None },
            case_id: case_id.map(str::to_owned),
            entitlement_state: Some(account.state),
            dunning_status: account.dunning(),
            amount_due: outstanding.as_ref().map(|(amount, _)| *amount),
            currency: outstanding.map(|(_, currency)| currency),
            support_tier: contract.map(|c| c.support_tier).filter(|tier| *tier != SupportTier::Unknown),
            escalate: false,
        }
    }

    /// The envelope of a record caused by `cause` (or by the timer, when it has no envelope).
    fn envelope(&self, cause: &Cause<'_>, account_id: &str, discriminator: &str, now: DateTime<Utc>) -> Envelope {
        match cause.envelope {
            Some(envelope) => Envelope::caused_by(envelope, SOURCE, discriminator, now),
            // A timer's record: its ids derived from the account and the transition.
            None => {
                Envelope::scheduled(SOURCE, account_id, &format!("{account_id}/{discriminator}"), discriminator, now)
            }
        }
    }

    fn tell_crm_payment_failed(
        &self,
        context: &mut Context<'_>,
        account: &AccountEntitlement,
        payment: &Payment,
        detail: &str,
    ) {
        let contract = self.master.contract_of(
            account.contract_id.as_deref(),
            payment.subscription_id.as_deref(),
            &payment.envelope.account_id,
        );
        let cause = Cause::payment(&payment.envelope, TransitionReason::PaymentFailed, detail.to_owned(), payment);
        let summary = format!("Payment failed: {} {} ({detail})", payment.currency, payment.amount.value().round_dp(2));
        self.tell_crm(context, account, &cause, contract.as_ref(), CrmUpdateKind::PaymentFailed, summary);
    }

    /// A CRM timeline entry, when the customer is in the CRM.
    fn tell_crm(
        &self,
        context: &mut Context<'_>,
        account: &AccountEntitlement,
        cause: &Cause<'_>,
        contract: Option<&Contract>,
        kind: CrmUpdateKind,
        summary: String,
    ) {
        let Some(contract) = contract else { return };
        let Some(customer) = self.master.customers.get(&contract.customer_id) else { return };
        let Some(crm_account_id) = customer.crm_account_id.clone() else { return };
        let account_id = account.account_id.clone();
        let discriminator = format!("crm/{}/{}", symbol(&kind), account.transitions);
        let now = context.now();
        let (amount, currency) = match (kind, &cause.payment_id) {
            (CrmUpdateKind::PaymentFailed, _) => {
                let invoice = cause.invoice_id.as_deref().and_then(|id| account.overdue.get(id));
                (invoice.map(|o| o.amount), invoice.map(|o| o.currency.clone()))
            }
            _ => account.outstanding().map_or((None, None), |(a, c)| (Some(a), Some(c))),
        };
        let attributes = [
            ("to_state", Some(symbol(&account.state))),
            ("reason", Some(symbol(&cause.reason))),
            ("grace_ends_at", account.grace_ends_at.map(day_label)),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k.to_owned(), v)))
        .collect();
        let update = CrmAccountUpdate {
            envelope: self.envelope(cause, &account_id, &discriminator, now),
            kind,
            summary,
            crm_account_id: Some(crm_account_id),
            amount,
            currency,
            customer_id: Some(customer.customer_id.clone()),
            contract_id: Some(contract.contract_id.clone()),
            subscription_id: cause.subscription_id.clone().or_else(|| Some(contract.subscription_id.clone())),
            invoice_id: cause.invoice_id.clone(),
            payment_id: cause.payment_id.clone(),
            charge_id: None,
            case_id: None,
            attributes,
        };
        context.emit(Output::new(account_id, update));
    }
}

/// Whether the contract is over at `now`: expired, cancelled or deleted, or past its term
/// without renewing itself.
fn contract_ended(contract: &Contract, now: DateTime<Utc>) -> bool {
    contract.deleted
        || matches!(contract.status, ContractStatus::Expired | ContractStatus::Cancelled)
        || (!contract.auto_renew && contract.term_end <= now.timestamp_millis())
}

/// The schema's symbol of an enum value (`GRACE`).
pub fn symbol<T: Serialize>(value: &T) -> String {
    serde_json::to_value(value).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
}

/// `2025-01-17`.
pub fn day_label(ms: i64) -> String {
    DateTime::from_timestamp_millis(ms).map(|t| t.format("%Y-%m-%d").to_string()).unwrap_or_default()
}
