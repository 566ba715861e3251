//! Realistic records built from a few parameters, for unit tests, end-to-end tests, benchmarks
//! and the demo: master data (a customer, a contract, a price plan) and the platforms' events
//! (a threshold crossing, an invoice, a payment). Every field is set as the schemas document
//! it; tests change what they are about.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use crate::decimal::Decimal6;
use crate::types::{
    BillingPeriod, Contract, ContractStatus, Customer, CustomerStatus, DunningStatus, Envelope, IncludedUsage, Invoice,
    InvoiceLine, InvoiceLineKind, InvoiceStatus, MeterPrice, Payment, PaymentFailureReason, PaymentStatus, PricePlan,
    PriceTier, PricingModel, SupportTier, UsageThresholdCrossed,
};

/// A decimal from text; panics on a bad literal (fixtures are written by hand).
pub fn dec(text: &str) -> Decimal6 {
    Decimal6::new(Decimal::from_str(text).expect("a decimal literal")).expect("a decimal(18, 6)")
}

fn ms(time: DateTime<Utc>) -> i64 {
    time.timestamp_millis()
}

/// The customer `cus-<account>` of `account`, in the ERP as `C-<account>` and in the CRM.
pub fn customer(account: &str, currency: &str, at: DateTime<Utc>) -> Customer {
    Customer {
        envelope: Envelope::originating("crm", account, at),
        customer_id: format!("cus-{account}"),
        legal_name: format!("{account} Industries Ltd"),
        display_name: Some(account.to_owned()),
        billing_country: "US".into(),
        currency: currency.into(),
        tax_id: None,
        crm_account_id: Some(format!("crm-{account}")),
        erp_party_ref: Some(format!("C-{account}")),
        status: CustomerStatus::Active,
        deleted: false,
        version: 1,
    }
}

/// The ACTIVE monthly contract `ctr-<account>` of `account`, from `term_start` for a year,
/// including `included` units of `meter`, priced by `plan`.
pub fn contract(
    account: &str,
    plan: &str,
    currency: &str,
    meter: &str,
    included: &str,
    term_start: DateTime<Utc>,
) -> Contract {
    let term_end = term_start + chrono::Duration::days(365);
    Contract {
        envelope: Envelope::originating("crm", account, term_start),
        contract_id: format!("ctr-{account}"),
        customer_id: format!("cus-{account}"),
        subscription_id: format!("sub-{account}"),
        price_plan_id: plan.into(),
        status: ContractStatus::Active,
        term_start: ms(term_start),
        term_end: ms(term_end),
        renewal_date: i32::try_from(ms(term_end).div_euclid(86_400_000)).unwrap_or_default(),
        auto_renew: true,
        notice_period_days: Some(30),
        billing_period: BillingPeriod::Monthly,
        currency: currency.into(),
        contract_value: Some(dec("12000")),
        included_usage: vec![IncludedUsage {
            meter: meter.into(),
            included_quantity: dec(included),
            unit: "call".into(),
            threshold_percents: None,
        }],
        support_tier: SupportTier::Premium,
        grace_days: 14,
        deleted: false,
        version: 1,
    }
}

/// A price of `meter` (per `call`) of `model`, without its numbers.
pub fn meter_price(meter: &str, model: PricingModel) -> MeterPrice {
    MeterPrice {
        meter: meter.into(),
        unit: "call".into(),
        model,
        unit_price: None,
        tiers: Vec::new(),
        package_size: None,
        minimum_charge: None,
    }
}

/// A tier up to `up_to` (`None`: the last) at `unit_price`, with an optional flat fee.
pub fn tier(up_to: Option<&str>, unit_price: &str, flat_fee: Option<&str>) -> PriceTier {
    PriceTier { up_to: up_to.map(dec), unit_price: dec(unit_price), flat_fee: flat_fee.map(dec) }
}

/// The price plan `id` in `currency` with `prices`, effective from `from`, open-ended.
pub fn price_plan(id: &str, currency: &str, prices: Vec<MeterPrice>, from: DateTime<Utc>) -> PricePlan {
    PricePlan {
        envelope: Envelope::originating("cpq", "", from),
        price_plan_id: id.into(),
        name: format!("{id} ({currency})"),
        description: None,
        currency: currency.into(),
        meter_prices: prices,
        rounding_mode: None,
        effective_from: ms(from),
        effective_to: None,
        deleted: false,
        version: 1,
    }
}

/// A per-unit price of `meter`.
pub fn per_unit(meter: &str, unit_price: &str) -> MeterPrice {
    MeterPrice { unit_price: Some(dec(unit_price)), ..meter_price(meter, PricingModel::PerUnit) }
}

/// The crossing of `percent` % of `contract`'s included `meter` in the period
/// `[period_start, period_end)`, at `used` units, at `at`.
pub fn crossing(
    contract: &Contract,
    meter: &str,
    percent: i32,
    used: &str,
    period: (DateTime<Utc>, DateTime<Utc>),
    at: DateTime<Utc>,
) -> UsageThresholdCrossed {
    let included =
        contract.included_usage.iter().find(|u| u.meter == meter).map_or(Decimal6::ZERO, |u| u.included_quantity);
    let used = dec(used);
    let overage = (used.value() - included.value()).max(Decimal::ZERO);
    let threshold = included.value() * Decimal::from(percent) / Decimal::ONE_HUNDRED;
    let mut envelope = Envelope::originating("tributary.usage-ingest", &contract.envelope.account_id, at);
    envelope.source = "tributary.usage-ingest".into();
    UsageThresholdCrossed {
        envelope,
        subscription_id: contract.subscription_id.clone(),
        contract_id: contract.contract_id.clone(),
        meter: meter.into(),
        unit: "call".into(),
        threshold_percent: percent,
        included_quantity: included,
        threshold_quantity: Decimal6::new(threshold.round_dp(6)).unwrap_or(included),
        used_quantity: used,
        overage_quantity: Decimal6::new(overage).unwrap_or_default(),
        period_start: ms(period.0),
        period_end: ms(period.1),
        crossed_at: ms(at),
    }
}

/// An OPEN invoice `id` of `account`'s subscription with one SUBSCRIPTION line of `subtotal`
/// and `tax`, issued at `at`, due 14 days later.
pub fn invoice(account: &str, id: &str, currency: &str, subtotal: &str, tax: &str, at: DateTime<Utc>) -> Invoice {
    let (subtotal, tax) = (dec(subtotal), dec(tax));
    let total = Decimal6::new(subtotal.value() + tax.value()).expect("a total in range");
    Invoice {
        envelope: Envelope::originating("stripe", account, at),
        invoice_id: id.into(),
        invoice_number: Some(format!("INV-{id}")),
        subscription_id: Some(format!("sub-{account}")),
        status: InvoiceStatus::Open,
        currency: currency.into(),
        subtotal_amount: subtotal,
        tax_amount: tax,
        total_amount: total,
        amount_paid: Decimal6::ZERO,
        amount_due: total,
        issued_at: Some(ms(at)),
        due_at: Some(ms(at + chrono::Duration::days(14))),
        period_start: ms(at),
        period_end: ms(at + chrono::Duration::days(30)),
        lines: vec![InvoiceLine {
            line_id: format!("{id}-1"),
            kind: InvoiceLineKind::Subscription,
            description: "Pro plan".into(),
            quantity: Some(dec("1")),
            unit_amount: Some(subtotal),
            amount: subtotal,
            tax_amount: Some(tax),
            period_start: Some(ms(at)),
            period_end: Some(ms(at + chrono::Duration::days(30))),
            charge_id: None,
        }],
    }
}

/// Payment attempt `attempt` of `amount` on `invoice_id`; FAILED attempts carry a reason and
/// the dunning state `dunning`.
pub fn payment(
    account: &str,
    invoice_id: &str,
    attempt: i32,
    status: PaymentStatus,
    amount: &str,
    currency: &str,
    at: DateTime<Utc>,
) -> Payment {
    let failed = status == PaymentStatus::Failed;
    Payment {
        envelope: Envelope::originating("stripe", account, at),
        payment_id: format!("pay-{invoice_id}-{attempt}"),
        invoice_id: invoice_id.into(),
        subscription_id: Some(format!("sub-{account}")),
        status,
        amount: dec(amount),
        currency: currency.into(),
        method: Some("card".into()),
        failure_reason: failed
            .then(|| PaymentFailureReason { code: "card_declined".into(), message: "Your card was declined.".into() }),
        attempt_number: attempt,
        dunning_status: if failed { DunningStatus::InDunning } else { DunningStatus::None },
        next_retry_at: failed.then(|| ms(at + chrono::Duration::days(3))),
    }
}
