//! The billing-router logic: overage rated into charges, financial documents routed to the ERP,
//! commercial context to the CRM.
//!
//! What each input does:
//! - `usage.thresholds` at 100 % or more, with overage: [`charge`](RouterProcessor::charge) rates
//!   the whole overage so far against the contract's price plan and charges what was not charged
//!   yet in the period (`billing.charges`); the charge is posted as an INVOICE (`erp.postings`),
//!   or accrued into the period's invoice, and told to the CRM (OVERAGE_CHARGED). Below 100 %,
//!   or at it with nothing over: the CRM hears of the crossing (USAGE_THRESHOLD).
//! - `usage.recorded`, a billing period's final total (`is_final`): the period's last charge, for
//!   what the overage grew by after its last threshold. Other totals are not billing-router's.
//! - `billing.invoices`: OPEN → an INVOICE mirroring the platform's invoice, without the overage
//!   lines Tributary posted itself; VOID → a CREDIT_NOTE reversing it (INVOICE_ISSUED /
//!   INVOICE_VOIDED to the CRM).
//! - `billing.payments`: SUCCEEDED → a PAYMENT against the invoice; one that succeeds after failed
//!   attempts → PAYMENT_RECOVERED to the CRM. FAILED payments are entitlement-watcher's.
//! - the period-close timer (`per_period` posting): one INVOICE with the period's accrued charges.
//!
//! Charges are cumulative per contract, meter and period: each step rates the whole overage
//! again and charges the difference, rounded once to the currency's minor unit, so the charges
//! of a period always sum to the rounded rating of its final overage, in whatever order the
//! steps arrive. A step is rated once and its charge id is a function of (contract, meter,
//! period, step), so no reprocessing charges twice. Nothing is posted on a guess: master data
//! that does not check out dead-letters the input with its reason ([`masterdata::class`]).

use std::collections::BTreeSet;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use tributary_contracts::decimal::Decimal6;
use tributary_contracts::topics;
use tributary_contracts::types::{
    ChargeRounding, Contract, CrmAccountUpdate, CrmUpdateKind, Customer, Envelope, ErpDocumentType, ErpPayment,
    ErpPosting, ErpPostingLine, Invoice, InvoiceLineKind, InvoiceStatus, OverageCharge, Payment, PaymentStatus,
    UsageRecorded, UsageThresholdCrossed, WindowKind,
};
use tributary_runtime::{Context, Output, ProcessError, Processor, Store, StoredValue, Timer};

use crate::documents::{self, DocumentHead, LineCodes};
use crate::masterdata::{MasterData, Rejected, class};
use crate::rating::{self, effective_mode, minor_unit_digits, round_to_currency};
use crate::settings::{PostingMode, Settings};

/// The `source` of every record billing-router writes.
pub const SOURCE: &str = "tributary.billing-router";

tributary_runtime::input_enum! {
    /// What billing-router reads.
    pub enum RouterInput {
        /// A crossing of a share of the contracted quantity.
        Threshold(UsageThresholdCrossed),
        /// A running or final usage total.
        Recorded(UsageRecorded),
        /// The state of a platform invoice.
        Invoice(Invoice),
        /// A payment attempt.
        Payment(Payment),
    }
}

/// What a period of one contract and meter was charged so far, by key
/// `<contract>|<period start, 13 digits>|<meter>`.
pub const PERIODS: Store<PeriodCharges> = Store::new("periods");
/// The platform invoices mirrored into the ERP, by invoice id (what a credit note reverses).
pub const INVOICES: Store<MirroredInvoice> = Store::new("invoices");
/// External references of the documents posted, with when: a document is never sent twice.
pub const POSTED: Store<i64> = Store::new("posted");
const CLOSE_TIMER_PREFIX: &str = "close/";

/// A charge waiting for its period's accrued invoice (`per_period`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChargeEntry {
    /// The charge id.
    pub charge_id: String,
    /// Its amount.
    pub amount: Decimal6,
    /// Its invoice line text.
    pub description: String,
    /// The event id of its cause, for the accrued invoice's envelope.
    pub cause_event_id: String,
    /// The correlation id of its cause.
    pub correlation_id: String,
}

/// What a period of one contract and meter was charged so far.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeriodCharges {
    /// Sum of the amounts charged.
    pub charged: Decimal6,
    /// Steps already rated (`100`, `120`, `final`), whether they charged anything or not.
    pub steps: BTreeSet<String>,
    /// Charges not posted yet, waiting for the period's accrued invoice (`per_period` only).
    pub pending: Vec<ChargeEntry>,
}

impl StoredValue for PeriodCharges {}

/// A platform invoice mirrored into the ERP.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MirroredInvoice {
    /// The ERP document's reference; `None` when every line was a Tributary charge, posted
    /// already, so no document was needed.
    pub external_reference: Option<String>,
    /// The customer.
    pub customer_id: String,
    /// The currency.
    pub currency: String,
    /// The lines posted.
    pub lines: Vec<ErpPostingLine>,
    /// Tax posted.
    pub tax_amount: Option<Decimal6>,
    /// Whether a credit note reversed it.
    pub voided: bool,
}

impl StoredValue for MirroredInvoice {}

/// Labels of a posting.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DocumentLabels {
    /// INVOICE, CREDIT_NOTE or PAYMENT.
    pub document_type: String,
}

/// Labels of a CRM update.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// The update's kind.
    pub kind: String,
}

/// billing-router's own metrics, beside the runtime's (its DLQ writes are
/// `tributary_dlq_records_total{class=...}`).
#[derive(Debug, Clone, Default)]
pub struct RouterMetrics {
    /// Charges emitted.
    pub charges: Counter,
    /// Steps rated that charged nothing more (the minimum was charged already, or nothing grew).
    pub charges_not_needed: Counter,
    /// ERP postings by document type.
    pub postings: Family<DocumentLabels, Counter>,
    /// CRM updates by kind.
    pub crm_updates: Family<KindLabels, Counter>,
}

/// What triggers a rating: a threshold crossing, or the period's final total.
struct Trigger<'a> {
    cause: &'a Envelope,
    contract_id: &'a str,
    meter: &'a str,
    unit: &'a str,
    period_start: i64,
    period_end: i64,
    used: Decimal6,
    /// The threshold (`None`: the period's final total).
    threshold_percent: Option<i32>,
    /// Business time of the decision.
    at: i64,
}

impl Trigger<'_> {
    fn step(&self) -> String {
        self.threshold_percent.map_or_else(|| "final".to_owned(), |p| p.to_string())
    }
}

/// The deterministic id of the charge of `step` of a contract's meter and period.
pub fn charge_id(contract_id: &str, meter: &str, period_start: i64, step: &str) -> String {
    const NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x2c6a_9d3e_5b1f_4e7a_8c0d_6368_6172_6765);
    let name = format!("{contract_id}\u{1f}{meter}\u{1f}{period_start}\u{1f}{step}");
    format!("chg_{}", uuid::Uuid::new_v5(&NAMESPACE, name.as_bytes()).simple())
}

fn period_key(contract_id: &str, period_start: i64, meter: &str) -> String {
    format!("{contract_id}|{period_start:013}|{meter}")
}

fn d6(value: Decimal) -> Result<Decimal6, ProcessError> {
    Decimal6::new(value).map_err(|e| ProcessError::permanent("overflow", e.to_string()))
}

/// The billing-router processor.
#[derive(Debug)]
pub struct RouterProcessor {
    master: MasterData,
    settings: Settings,
    metrics: RouterMetrics,
}

impl RouterProcessor {
    /// A processor over `master` data.
    pub fn new(master: MasterData, settings: Settings, metrics: RouterMetrics) -> Self {
        Self { master, settings, metrics }
    }

    fn emit_posting(&self, context: &mut Context<'_>, account: &str, posting: ErpPosting) -> Result<(), ProcessError> {
        if context.get(POSTED, &posting.external_reference)?.is_some() {
            tracing::debug!(reference = posting.external_reference, "already posted");
            return Ok(());
        }
        context.put(POSTED, &posting.external_reference, &context.now().timestamp_millis())?;
        let document_type = symbol(&posting.document_type);
        self.metrics.postings.get_or_create(&DocumentLabels { document_type }).inc();
        context.emit(Output::new(account, posting));
        Ok(())
    }

    fn emit_crm(&self, context: &mut Context<'_>, account: &str, update: Option<CrmAccountUpdate>) {
        if let Some(update) = update {
            let kind = symbol(&update.kind);
            self.metrics.crm_updates.get_or_create(&KindLabels { kind }).inc();
            context.emit(Output::new(account, update));
        }
    }

    /// A threshold crossing: a charge at or above 100 % with overage, else a CRM note.
    fn on_threshold(&self, context: &mut Context<'_>, crossing: &UsageThresholdCrossed) -> Result<(), ProcessError> {
        if crossing.threshold_percent >= 100 && crossing.overage_quantity.value() > Decimal::ZERO {
            let trigger = Trigger {
                cause: &crossing.envelope,
                contract_id: &crossing.contract_id,
                meter: &crossing.meter,
                unit: &crossing.unit,
                period_start: crossing.period_start,
                period_end: crossing.period_end,
                used: crossing.used_quantity,
                threshold_percent: Some(crossing.threshold_percent),
                at: crossing.crossed_at,
            };
            return self.charge(context, &trigger);
        }
        self.note_crossing(context, crossing);
        Ok(())
    }

    /// USAGE_THRESHOLD to the CRM: commercial context only, so master data that does not check
    /// out skips it instead of dead-lettering it.
    fn note_crossing(&self, context: &mut Context<'_>, crossing: &UsageThresholdCrossed) {
        let Some(contract) = self.master.contracts.get(&crossing.contract_id) else { return };
        let Ok(customer) = self.master.customer(&contract.customer_id) else { return };
        let summary = format!(
            "Usage at {} % of contract: {} of {} {} included ({}, period from {})",
            crossing.threshold_percent,
            crossing.used_quantity,
            crossing.included_quantity,
            crossing.unit,
            crossing.meter,
            documents::day_label(crossing.period_start),
        );
        let discriminator = format!("crm/threshold/{}", crossing.threshold_percent);
        let update = documents::crm_update(
            &customer,
            &crossing.envelope,
            &discriminator,
            crossing.crossed_at,
            CrmUpdateKind::UsageThreshold,
            summary,
        )
        .map(|mut update| {
            update.contract_id = Some(contract.contract_id.clone());
            update.subscription_id = Some(crossing.subscription_id.clone());
            update.attributes = [
                ("meter", crossing.meter.clone()),
                ("threshold_percent", crossing.threshold_percent.to_string()),
                ("used_quantity", crossing.used_quantity.to_string()),
                ("included_quantity", crossing.included_quantity.to_string()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
            update
        });
        self.emit_crm(context, &crossing.envelope.account_id, update);
    }

    /// A period's final total: its last charge.
    fn on_recorded(&self, context: &mut Context<'_>, total: &UsageRecorded) -> Result<(), ProcessError> {
        let is_period_total =
            total.is_final && total.window_kind == WindowKind::BillingPeriod && total.dimensions.is_empty();
        let Some(contract_id) = total.contract_id.as_deref().filter(|_| is_period_total) else { return Ok(()) };
        let trigger = Trigger {
            cause: &total.envelope,
            contract_id,
            meter: &total.meter,
            unit: &total.unit,
            period_start: total.window_start,
            period_end: total.window_end,
            used: total.total_quantity,
            threshold_percent: None,
            at: total.envelope.occurred_at,
        };
        self.charge(context, &trigger)
    }

    /// Rates the period's whole overage so far and charges what was not charged yet.
    fn charge(&self, context: &mut Context<'_>, trigger: &Trigger<'_>) -> Result<(), ProcessError> {
        let contract = self.master.contract_for_period(trigger.contract_id, trigger.period_start)?;
        let customer = self.master.customer(&contract.customer_id)?;
        let erp_party_ref = MasterData::erp_party(&customer)?;
        let (plan, price) = self.master.price(&contract, trigger.meter, trigger.unit, trigger.period_start)?;
        let digits = minor_unit_digits(&plan.currency).ok_or_else(|| {
            Rejected::new(
                class::UNKNOWN_CURRENCY,
                format!("{:?} (price plan {}) is not an ISO 4217 currency", plan.currency, plan.price_plan_id),
            )
        })?;
        // A meter the contract does not list has nothing included: all of its usage is overage.
        let included = contract
            .included_usage
            .iter()
            .find(|u| u.meter == trigger.meter)
            .map_or(Decimal6::ZERO, |u| u.included_quantity);
        let overage = trigger.used.value() - included.value();
        if overage <= Decimal::ZERO {
            return Ok(());
        }
        let key = period_key(&contract.contract_id, trigger.period_start, trigger.meter);
        let mut period = context.get(PERIODS, &key)?.unwrap_or_default();
        let step = trigger.step();
        if !period.steps.insert(step.clone()) {
            tracing::debug!(key, step, "step rated already");
            return Ok(());
        }
        let rating = rating::rate(&price, overage).map_err(|invalid| {
            Rejected::new(
                class::INVALID_PRICE_PLAN,
                format!("price plan {}, meter {}: {invalid}", plan.price_plan_id, trigger.meter),
            )
        })?;
        let mode = effective_mode(plan.rounding_mode);
        let unrounded = rating.amount - period.charged.value();
        let amount = round_to_currency(unrounded, digits, mode);
        if amount <= Decimal::ZERO {
            // Nothing more to charge (the minimum was charged already, or a later step came
            // first): the step is remembered, nothing is written.
            self.metrics.charges_not_needed.inc();
            context.put(PERIODS, &key, &period)?;
            return Ok(());
        }
        let charge_id = charge_id(&contract.contract_id, trigger.meter, trigger.period_start, &step);
        let overage = d6(overage)?;
        let description = format!(
            "{} overage {}: {} {} above {} included (contract {})",
            trigger.meter,
            documents::day_label(trigger.period_start),
            overage,
            trigger.unit,
            included,
            contract.contract_id,
        );
        let charge = OverageCharge {
            envelope: Envelope::caused_by(
                trigger.cause,
                SOURCE,
                &format!("charge/{charge_id}"),
                chrono::DateTime::from_timestamp_millis(trigger.at).unwrap_or_default(),
            ),
            charge_id: charge_id.clone(),
            contract_id: contract.contract_id.clone(),
            subscription_id: contract.subscription_id.clone(),
            price_plan_id: plan.price_plan_id.clone(),
            price_plan_version: plan.version,
            meter: trigger.meter.to_owned(),
            unit: trigger.unit.to_owned(),
            period_start: trigger.period_start,
            period_end: trigger.period_end,
            included_quantity: included,
            used_quantity: trigger.used,
            overage_quantity: overage,
            pricing_model: price.model,
            breakdown: rating.steps,
            minimum_charge_applied: rating.minimum_applied,
            currency: plan.currency.clone(),
            rated_amount: d6(rating.amount)?,
            previously_charged_amount: period.charged,
            amount: d6(amount)?,
            description,
            threshold_event_id: trigger.cause.event_id.clone(),
            threshold_percent: trigger.threshold_percent.unwrap_or_else(|| percent_of(trigger.used, included)),
            period_final: trigger.threshold_percent.is_none(),
            rounding: Some(ChargeRounding { mode, minor_unit_digits: digits as i32, unrounded_amount: d6(unrounded)? }),
        };
        let account = trigger.cause.account_id.clone();
        let close_at = trigger.period_end + millis(self.settings.period_close_delay);
        let post_now = self.settings.posting == PostingMode::PerCharge || context.now().timestamp_millis() >= close_at;
        if post_now {
            let head = DocumentHead {
                cause: trigger.cause,
                discriminator: format!("posting/{charge_id}"),
                at: trigger.at,
                customer: &customer,
                erp_party_ref,
                currency: plan.currency.clone(),
            };
            let description = format!(
                "Overage {} {}, contract {}",
                trigger.meter,
                documents::day_label(trigger.period_start),
                contract.contract_id
            );
            let lines = vec![documents::charge_line(1, &charge, &self.settings)];
            let mut posting = documents::document(
                head,
                ErpDocumentType::Invoice,
                documents::charge_reference(&charge_id),
                description,
                lines,
                None,
            );
            posting.contract_id = Some(contract.contract_id.clone());
            posting.charge_id = Some(charge_id.clone());
            self.emit_posting(context, &account, posting)?;
        } else {
            self.schedule_period_close(
                context,
                &contract.contract_id,
                trigger.period_start,
                trigger.period_end,
                close_at,
            )?;
        }
        self.emit_crm(context, &account, overage_update(&customer, &contract, &charge, digits));
        period.charged = d6(period.charged.value() + amount)?;
        if !post_now {
            period.pending.push(ChargeEntry {
                charge_id,
                amount: charge.amount,
                description: charge.description.clone(),
                cause_event_id: trigger.cause.event_id.clone(),
                correlation_id: trigger.cause.correlation_id.clone(),
            });
        }
        context.put(PERIODS, &key, &period)?;
        self.metrics.charges.inc();
        tracing::info!(account, contract = contract.contract_id, meter = trigger.meter, step, amount = %charge.amount, "overage charged");
        context.emit(Output::new(account, charge));
        Ok(())
    }

    fn schedule_period_close(
        &self,
        context: &mut Context<'_>,
        contract_id: &str,
        period_start: i64,
        period_end: i64,
        close_at: i64,
    ) -> Result<(), ProcessError> {
        let timer = format!("{CLOSE_TIMER_PREFIX}{contract_id}|{period_start:013}");
        if context.scheduled(&timer)?.is_none() {
            let due = chrono::DateTime::from_timestamp_millis(close_at).unwrap_or_else(|| context.now());
            let payload =
                serde_json::json!({"contract_id": contract_id, "period_start": period_start, "period_end": period_end});
            context.schedule(&timer, due, payload)?;
        }
        Ok(())
    }

    /// `per_period`: the period's accrued charges, every meter of the contract, as one invoice.
    fn close_period(&self, context: &mut Context<'_>, timer: &Timer) -> Result<(), ProcessError> {
        let field = |name: &str| timer.payload.get(name).cloned().unwrap_or_default();
        let contract_id = field("contract_id").as_str().unwrap_or_default().to_owned();
        let period_start = field("period_start").as_i64().unwrap_or_default();
        let contract = self.master.contracts.get(&contract_id).ok_or_else(|| {
            Rejected::new(class::UNKNOWN_CONTRACT, format!("contract {contract_id} is not in refdata.contracts"))
        })?;
        let customer = self.master.customer(&contract.customer_id)?;
        let erp_party_ref = MasterData::erp_party(&customer)?;
        let mut lines = Vec::new();
        let mut last_cause = None;
        for (key, mut period) in context.scan_prefix(PERIODS, &format!("{contract_id}|{period_start:013}|"))? {
            let meter = key.rsplit('|').next().unwrap_or_default().to_owned();
            for entry in std::mem::take(&mut period.pending) {
                let codes = LineCodes::overage(&self.settings, &meter);
                lines.push(documents::line(
                    lines.len() + 1,
                    entry.description.clone(),
                    Decimal6::from(1),
                    entry.amount,
                    entry.amount,
                    codes,
                ));
                last_cause = Some((entry.cause_event_id.clone(), entry.correlation_id.clone()));
            }
            context.put(PERIODS, &key, &period)?;
        }
        let Some((event_id, correlation_id)) = last_cause else { return Ok(()) };
        let cause = Envelope {
            event_id,
            occurred_at: timer.due_at.timestamp_millis(),
            correlation_id,
            causation_id: None,
            source: SOURCE.into(),
            account_id: contract.envelope.account_id.clone(),
        };
        let head = DocumentHead {
            cause: &cause,
            discriminator: format!("period/{contract_id}/{period_start}"),
            at: timer.due_at.timestamp_millis(),
            customer: &customer,
            erp_party_ref,
            currency: contract.currency.clone(),
        };
        let description =
            format!("Overage for the period from {}, contract {contract_id}", documents::day_label(period_start));
        let reference = documents::period_reference(&contract_id, period_start);
        let mut posting = documents::document(head, ErpDocumentType::Invoice, reference, description, lines, None);
        posting.contract_id = Some(contract_id);
        self.emit_posting(context, &contract.envelope.account_id, posting)
    }

    /// A platform invoice: mirrored when it is issued, reversed when it is voided.
    fn on_invoice(&self, context: &mut Context<'_>, invoice: &Invoice) -> Result<(), ProcessError> {
        match invoice.status {
            InvoiceStatus::Open => self.mirror_invoice(context, invoice),
            InvoiceStatus::Void => self.reverse_invoice(context, invoice),
            // DRAFT is not final; PAID comes with its payment; a write-off (UNCOLLECTIBLE) is
            // an accounting decision in the ERP, not a document of ours.
            _ => Ok(()),
        }
    }

    fn mirror_invoice(&self, context: &mut Context<'_>, invoice: &Invoice) -> Result<(), ProcessError> {
        if context.get(INVOICES, &invoice.invoice_id)?.is_some() {
            return Ok(()); // relayed again while open
        }
        let account = invoice.envelope.account_id.as_str();
        let contract = self.master.contract_of(invoice.subscription_id.as_deref(), account, invoice.period_start);
        if let Some(contract) = &contract
            && contract.currency != invoice.currency
        {
            return Err(Rejected::new(
                class::CURRENCY_MISMATCH,
                format!(
                    "invoice {} is in {} but contract {} in {}",
                    invoice.invoice_id, invoice.currency, contract.contract_id, contract.currency
                ),
            )
            .into());
        }
        let digits = minor_unit_digits(&invoice.currency).ok_or_else(|| {
            Rejected::new(
                class::UNKNOWN_CURRENCY,
                format!("invoice {}: {:?} is not an ISO 4217 currency", invoice.invoice_id, invoice.currency),
            )
        })?;
        check_amounts(invoice, digits)?;
        let customer = self.master.customer_of(contract.as_deref(), account)?;
        let erp_party_ref = MasterData::erp_party(&customer)?;
        let (lines, tax_amount) = mirrored_lines(invoice, &self.settings);
        let number = invoice.invoice_number.clone().unwrap_or_else(|| invoice.invoice_id.clone());
        let mut mirrored = MirroredInvoice {
            external_reference: None,
            customer_id: customer.customer_id.clone(),
            currency: invoice.currency.clone(),
            lines: lines.clone(),
            tax_amount,
            voided: false,
        };
        if !lines.is_empty() {
            let at = invoice.issued_at.unwrap_or(invoice.envelope.occurred_at);
            let head = DocumentHead {
                cause: &invoice.envelope,
                discriminator: format!("posting/invoice/{}", invoice.invoice_id),
                at,
                customer: &customer,
                erp_party_ref,
                currency: invoice.currency.clone(),
            };
            let reference = documents::invoice_reference(&invoice.invoice_id);
            let mut posting = documents::document(
                head,
                ErpDocumentType::Invoice,
                reference.clone(),
                format!("Invoice {number}"),
                lines,
                tax_amount,
            );
            posting.due_date = invoice.due_at.map(documents::day_of);
            posting.contract_id = contract.as_ref().map(|c| c.contract_id.clone());
            posting.invoice_id = Some(invoice.invoice_id.clone());
            self.emit_posting(context, account, posting)?;
            mirrored.external_reference = Some(reference);
        }
        context.put(INVOICES, &invoice.invoice_id, &mirrored)?;
        let summary = format!(
            "Invoice {number} issued: {} {}",
            invoice.currency,
            documents::money(invoice.total_amount.value(), digits)
        );
        let update = documents::crm_update(
            &customer,
            &invoice.envelope,
            "crm/invoice-issued",
            invoice.envelope.occurred_at,
            CrmUpdateKind::InvoiceIssued,
            summary,
        )
        .map(|update| with_invoice(update, invoice, contract.as_deref()));
        self.emit_crm(context, account, update);
        Ok(())
    }

    fn reverse_invoice(&self, context: &mut Context<'_>, invoice: &Invoice) -> Result<(), ProcessError> {
        let Some(mut mirrored) = context.get(INVOICES, &invoice.invoice_id)? else {
            // Never issued (voided as a draft): there is nothing in the ERP to reverse.
            return Ok(());
        };
        if mirrored.voided {
            return Ok(());
        }
        let account = invoice.envelope.account_id.as_str();
        let customer = self.master.customer(&mirrored.customer_id)?;
        let erp_party_ref = MasterData::erp_party(&customer)?;
        let digits = minor_unit_digits(&invoice.currency).unwrap_or(2);
        let number = invoice.invoice_number.clone().unwrap_or_else(|| invoice.invoice_id.clone());
        if let Some(original) = &mirrored.external_reference {
            let head = DocumentHead {
                cause: &invoice.envelope,
                discriminator: format!("posting/credit-note/{}", invoice.invoice_id),
                at: invoice.envelope.occurred_at,
                customer: &customer,
                erp_party_ref,
                currency: mirrored.currency.clone(),
            };
            let reference = documents::credit_note_reference(&invoice.invoice_id);
            let description = format!("Credit note for invoice {number} (voided)");
            let mut posting = documents::document(
                head,
                ErpDocumentType::CreditNote,
                reference,
                description,
                mirrored.lines.clone(),
                mirrored.tax_amount,
            );
            posting.original_document_ref = Some(original.clone());
            posting.invoice_id = Some(invoice.invoice_id.clone());
            self.emit_posting(context, account, posting)?;
        }
        mirrored.voided = true;
        context.put(INVOICES, &invoice.invoice_id, &mirrored)?;
        let summary = format!(
            "Invoice {number} voided: {} {}",
            invoice.currency,
            documents::money(invoice.total_amount.value(), digits)
        );
        let update = documents::crm_update(
            &customer,
            &invoice.envelope,
            "crm/invoice-voided",
            invoice.envelope.occurred_at,
            CrmUpdateKind::InvoiceVoided,
            summary,
        )
        .map(|update| with_invoice(update, invoice, None));
        self.emit_crm(context, account, update);
        Ok(())
    }

    /// A successful payment: a PAYMENT against the invoice it pays.
    fn on_payment(&self, context: &mut Context<'_>, payment: &Payment) -> Result<(), ProcessError> {
        if payment.status != PaymentStatus::Succeeded {
            return Ok(());
        }
        let account = payment.envelope.account_id.as_str();
        let mirrored = context.get(INVOICES, &payment.invoice_id)?;
        let contract =
            self.master.contract_of(payment.subscription_id.as_deref(), account, payment.envelope.occurred_at);
        let customer = match &mirrored {
            Some(mirrored) => self.master.customer(&mirrored.customer_id)?,
            None => self.master.customer_of(contract.as_deref(), account)?,
        };
        let erp_party_ref = MasterData::erp_party(&customer)?;
        let expected_currency =
            mirrored.as_ref().map(|m| m.currency.clone()).or_else(|| contract.as_ref().map(|c| c.currency.clone()));
        if let Some(expected) = expected_currency
            && expected != payment.currency
        {
            return Err(Rejected::new(
                class::CURRENCY_MISMATCH,
                format!(
                    "payment {} is in {} but its invoice {} in {expected}",
                    payment.payment_id, payment.currency, payment.invoice_id
                ),
            )
            .into());
        }
        let digits = minor_unit_digits(&payment.currency).ok_or_else(|| {
            Rejected::new(
                class::UNKNOWN_CURRENCY,
                format!("payment {}: {:?} is not an ISO 4217 currency", payment.payment_id, payment.currency),
            )
        })?;
        let head = DocumentHead {
            cause: &payment.envelope,
            discriminator: format!("posting/payment/{}", payment.payment_id),
            at: payment.envelope.occurred_at,
            customer: &customer,
            erp_party_ref,
            currency: payment.currency.clone(),
        };
        let received = ErpPayment {
            payment_id: payment.payment_id.clone(),
            amount: payment.amount,
            method: payment.method.clone().unwrap_or_else(|| "unknown".into()),
            paid_at: payment.envelope.occurred_at,
            invoice_external_reference: mirrored.as_ref().and_then(|m| m.external_reference.clone()),
        };
        let mut posting = documents::payment(head, documents::payment_reference(&payment.payment_id), received);
        posting.invoice_id = Some(payment.invoice_id.clone());
        posting.contract_id = contract.as_ref().map(|c| c.contract_id.clone());
        self.emit_posting(context, account, posting)?;
        // A success after failed attempts ends a payment problem.
        if payment.attempt_number > 1 {
            let summary = format!(
                "Payment recovered: {} {} for invoice {} on attempt {}",
                payment.currency,
                documents::money(payment.amount.value(), digits),
                payment.invoice_id,
                payment.attempt_number
            );
            let update = documents::crm_update(
                &customer,
                &payment.envelope,
                "crm/payment-recovered",
                payment.envelope.occurred_at,
                CrmUpdateKind::PaymentRecovered,
                summary,
            )
            .map(|mut update| {
                update.amount = Some(payment.amount);
                update.currency = Some(payment.currency.clone());
                update.invoice_id = Some(payment.invoice_id.clone());
                update.payment_id = Some(payment.payment_id.clone());
                update.subscription_id = payment.subscription_id.clone();
                update
            });
            self.emit_crm(context, account, update);
        }
        Ok(())
    }
}

/// The Avro symbol of an enum value, e.g. `CREDIT_NOTE`.
fn symbol<T: Serialize>(value: &T) -> String {
    serde_json::to_value(value).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
}

/// `used` in percent of `included`, rounded down (0 when nothing is included).
fn percent_of(used: Decimal6, included: Decimal6) -> i32 {
    if included.value() <= Decimal::ZERO {
        return 0;
    }
    (used.value() * Decimal::ONE_HUNDRED / included.value()).floor().try_into().unwrap_or(i32::MAX)
}

fn millis(duration: std::time::Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// The CRM's OVERAGE_CHARGED entry of `charge`.
fn overage_update(
    customer: &Customer,
    contract: &Contract,
    charge: &OverageCharge,
    digits: u32,
) -> Option<CrmAccountUpdate> {
    let summary = format!(
        "Overage charged: {} {} for {} (period from {})",
        charge.currency,
        documents::money(charge.amount.value(), digits),
        charge.meter,
        documents::day_label(charge.period_start)
    );
    let discriminator = format!("crm/{}", charge.charge_id);
    let at = charge.envelope.occurred_at;
    documents::crm_update(customer, &charge.envelope, &discriminator, at, CrmUpdateKind::OverageCharged, summary).map(
        |mut update| {
            update.amount = Some(charge.amount);
            update.currency = Some(charge.currency.clone());
            update.contract_id = Some(contract.contract_id.clone());
            update.subscription_id = Some(contract.subscription_id.clone());
            update.charge_id = Some(charge.charge_id.clone());
            update.attributes = [
                ("meter", charge.meter.clone()),
                ("period_start", documents::day_label(charge.period_start)),
                ("period_end", documents::day_label(charge.period_end)),
                ("overage_quantity", charge.overage_quantity.to_string()),
                ("rated_amount", charge.rated_amount.to_string()),
                ("threshold_percent", charge.threshold_percent.to_string()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
            update
        },
    )
}

fn with_invoice(mut update: CrmAccountUpdate, invoice: &Invoice, contract: Option<&Contract>) -> CrmAccountUpdate {
    update.amount = Some(invoice.total_amount);
    update.currency = Some(invoice.currency.clone());
    update.invoice_id = Some(invoice.invoice_id.clone());
    update.subscription_id = invoice.subscription_id.clone();
    update.contract_id = contract.map(|c| c.contract_id.clone());
    update
}

/// The lines of a platform invoice that add up: each line's quantity × unit price (when given)
/// is its amount in the currency's minor unit, the lines sum to the subtotal, and subtotal and
/// tax to the total.
fn check_amounts(invoice: &Invoice, digits: u32) -> Result<(), Rejected> {
    let mismatch =
        |reason: String| Rejected::new(class::AMOUNTS_MISMATCH, format!("invoice {}: {reason}", invoice.invoice_id));
    for line in &invoice.lines {
        if let (Some(quantity), Some(unit)) = (line.quantity, line.unit_amount) {
            let product = round_to_currency(
                quantity.value() * unit.value(),
                digits,
                tributary_contracts::types::RoundingMode::HalfEven,
            );
            if product != line.amount.value() {
                return Err(mismatch(format!(
                    "line {}: {quantity} × {unit} is not its amount {}",
                    line.line_id, line.amount
                )));
            }
        }
    }
    let lines: Decimal = invoice.lines.iter().map(|l| l.amount.value()).sum();
    if lines != invoice.subtotal_amount.value() {
        return Err(mismatch(format!("the lines sum to {lines}, the subtotal is {}", invoice.subtotal_amount)));
    }
    let total = invoice.subtotal_amount.value() + invoice.tax_amount.value();
    if total != invoice.total_amount.value() {
        return Err(mismatch(format!(
            "subtotal {} + tax {} is not the total {}",
            invoice.subtotal_amount, invoice.tax_amount, invoice.total_amount
        )));
    }
    Ok(())
}

/// The ERP lines of a platform invoice and its tax. An OVERAGE line that bills a Tributary
/// charge (it names the charge) is left out: the charge reached the ERP as its own document,
/// and posting it again would count the revenue twice. The tax then is the invoice's minus
/// those lines' tax when every one of them states it, else left to the ERP (null).
fn mirrored_lines(invoice: &Invoice, settings: &Settings) -> (Vec<ErpPostingLine>, Option<Decimal6>) {
    let ours =
        |kind: InvoiceLineKind, charge_id: &Option<String>| kind == InvoiceLineKind::Overage && charge_id.is_some();
    let excluded: Vec<_> = invoice.lines.iter().filter(|l| ours(l.kind, &l.charge_id)).collect();
    let tax = if excluded.is_empty() {
        Some(invoice.tax_amount)
    } else if excluded.iter().all(|l| l.tax_amount.is_some()) {
        let excluded_tax: Decimal = excluded.iter().filter_map(|l| l.tax_amount).map(Decimal6::value).sum();
        Decimal6::new(invoice.tax_amount.value() - excluded_tax).ok()
    } else {
        None
    };
    let lines = invoice
        .lines
        .iter()
        .filter(|l| !ours(l.kind, &l.charge_id))
        .enumerate()
        .map(|(index, l)| {
            // Quantities are never negative in the ERP: a negative quantity moves its sign to
            // the price; a line without a quantity is one unit at its amount.
            let (quantity, unit_price) = match (l.quantity, l.unit_amount) {
                (Some(q), Some(u)) if q.value() < Decimal::ZERO => {
                    (Decimal6::new(-q.value()).unwrap_or_default(), Decimal6::new(-u.value()).unwrap_or_default())
                }
                (Some(q), Some(u)) => (q, u),
                _ => (Decimal6::from(1), l.amount),
            };
            let kind = symbol(&l.kind);
            let codes =
                LineCodes { product_code: settings.invoice_line_products.get(&kind).cloned(), ..LineCodes::default() };
            documents::line(index + 1, l.description.clone(), quantity, unit_price, l.amount, codes)
        })
        .collect();
    (lines, tax)
}

impl Processor for RouterProcessor {
    type Input = RouterInput;

    fn stores(&self) -> Vec<&'static str> {
        vec![PERIODS.name(), INVOICES.name(), POSTED.name()]
    }

    fn outputs(&self) -> Vec<&'static str> {
        vec![topics::BILLING_CHARGES, topics::ERP_POSTINGS, topics::CRM_ACCOUNT_UPDATES]
    }

    async fn process(&self, context: &mut Context<'_>, input: &RouterInput) -> Result<(), ProcessError> {
        match input {
            RouterInput::Threshold(crossing) => self.on_threshold(context, crossing),
            RouterInput::Recorded(total) => self.on_recorded(context, total),
            RouterInput::Invoice(invoice) => self.on_invoice(context, invoice),
            RouterInput::Payment(payment) => self.on_payment(context, payment),
        }
    }

    async fn on_timer(&self, context: &mut Context<'_>, timer: &Timer) -> Result<(), ProcessError> {
        if timer.key.starts_with(CLOSE_TIMER_PREFIX) { self.close_period(context, timer) } else { Ok(()) }
    }
}
