//! The records billing-router writes, built from what it decided: ERP documents
//! (`erp.postings`) and commercial context for the CRM (`crm.account-updates`).
//!
//! External references are deterministic, so that a document built twice (a redelivery, a
//! replay) is one document in the ERP: `tributary:charge:<charge_id>`,
//! `tributary:period:<contract_id>:<period start>`, `tributary:invoice:<invoice_id>`,
//! `tributary:credit-note:<invoice_id>`, `tributary:payment:<payment_id>`.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use tributary_contracts::decimal::Decimal6;
use tributary_contracts::types::{
    CrmAccountUpdate, CrmUpdateKind, Customer, Envelope, ErpDocumentType, ErpPayment, ErpPosting, ErpPostingLine,
    OverageCharge,
};

use crate::processor::SOURCE;
use crate::settings::Settings;

/// The external reference of the ERP invoice of a charge.
pub fn charge_reference(charge_id: &str) -> String {
    format!("tributary:charge:{charge_id}")
}

/// The external reference of the accrued invoice of a contract's period.
pub fn period_reference(contract_id: &str, period_start: i64) -> String {
    format!("tributary:period:{contract_id}:{}", day_label(period_start))
}

/// The external reference of a mirrored platform invoice.
pub fn invoice_reference(invoice_id: &str) -> String {
    format!("tributary:invoice:{invoice_id}")
}

/// The external reference of the credit note reversing a mirrored invoice.
pub fn credit_note_reference(invoice_id: &str) -> String {
    format!("tributary:credit-note:{invoice_id}")
}

/// The external reference of a payment.
pub fn payment_reference(payment_id: &str) -> String {
    format!("tributary:payment:{payment_id}")
}

/// Days since 1970-01-01 of the UTC day of `ms` (Avro `date`).
pub fn day_of(ms: i64) -> i32 {
    i32::try_from(ms.div_euclid(86_400_000)).unwrap_or_default()
}

/// `ms` as a UTC date, e.g. `2026-03-01`.
pub fn day_label(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms).map_or_else(|| ms.to_string(), |t| t.format("%Y-%m-%d").to_string())
}

/// `amount` with `digits` decimals and thousands separators, e.g. `1,875.00`.
pub fn money(amount: Decimal, digits: u32) -> String {
    let text = format!("{:.*}", digits as usize, amount.abs());
    let (whole, fraction) = text.split_once('.').map_or((text.as_str(), None), |(w, f)| (w, Some(f)));
    let mut grouped = String::new();
    for (i, digit) in whole.chars().enumerate() {
        if i > 0 && (whole.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    let sign = if amount.is_sign_negative() && !amount.is_zero() { "-" } else { "" };
    match fraction {
        Some(fraction) => format!("{sign}{grouped}.{fraction}"),
        None => format!("{sign}{grouped}"),
    }
}

/// The ERP codes of a line; each `None` leaves it to the ERP (default product, the product's
/// account, the product's and party's tax rules).
#[derive(Debug, Clone, Default)]
pub struct LineCodes {
    /// ERP product code.
    pub product_code: Option<String>,
    /// Revenue account code.
    pub account_code: Option<String>,
    /// Tax code.
    pub tax_code: Option<String>,
}

impl LineCodes {
    /// The codes of `meter`'s overage lines.
    pub fn overage(settings: &Settings, meter: &str) -> Self {
        Self {
            product_code: settings.overage_product(meter),
            account_code: settings.overage_accounts.get(meter).cloned(),
            tax_code: settings.overage_tax_code.clone(),
        }
    }
}

/// One line of an ERP document.
pub fn line(
    number: usize,
    description: String,
    quantity: Decimal6,
    unit_price: Decimal6,
    amount: Decimal6,
    codes: LineCodes,
) -> ErpPostingLine {
    ErpPostingLine {
        line_number: number as i32,
        product_code: codes.product_code,
        account_code: codes.account_code,
        description,
        quantity,
        unit_price,
        tax_code: codes.tax_code,
        amount,
    }
}

/// The overage line of `charge`: one unit at the charged amount, so that the line is exact;
/// the quantities are in its description.
pub fn charge_line(number: usize, charge: &OverageCharge, settings: &Settings) -> ErpPostingLine {
    line(
        number,
        charge.description.clone(),
        Decimal6::from(1),
        charge.amount,
        charge.amount,
        LineCodes::overage(settings, &charge.meter),
    )
}

/// What every invoice-like document has.
#[derive(Debug)]
pub struct DocumentHead<'a> {
    /// The record this document is caused by.
    pub cause: &'a Envelope,
    /// Tells apart several documents of one cause.
    pub discriminator: String,
    /// Business time of the decision.
    pub at: i64,
    /// The customer.
    pub customer: &'a Customer,
    /// Its ERP party.
    pub erp_party_ref: String,
    /// The document's currency.
    pub currency: String,
}

/// An INVOICE or CREDIT_NOTE with `lines`.
pub fn document(
    head: DocumentHead<'_>,
    document_type: ErpDocumentType,
    external_reference: String,
    description: String,
    lines: Vec<ErpPostingLine>,
    tax_amount: Option<Decimal6>,
) -> ErpPosting {
    let net: Decimal = lines.iter().map(|l| l.amount.value()).sum();
    let net = Decimal6::new(net).unwrap_or_default();
    let total = Decimal6::new(net.value() + tax_amount.map_or(Decimal::ZERO, Decimal6::value)).unwrap_or(net);
    ErpPosting {
        envelope: Envelope::caused_by(head.cause, SOURCE, &head.discriminator, at_time(head.at)),
        external_reference,
        document_type,
        customer_id: head.customer.customer_id.clone(),
        erp_party_ref: head.erp_party_ref,
        currency: head.currency,
        document_date: day_of(head.at),
        due_date: None,
        description: Some(description),
        lines,
        net_amount: net,
        tax_amount,
        total_amount: total,
        original_document_ref: None,
        payment: None,
        contract_id: None,
        charge_id: None,
        invoice_id: None,
    }
}

/// A PAYMENT of `amount` received at `paid_at`.
pub fn payment(head: DocumentHead<'_>, external_reference: String, payment: ErpPayment) -> ErpPosting {
    let amount = payment.amount;
    ErpPosting {
        envelope: Envelope::caused_by(head.cause, SOURCE, &head.discriminator, at_time(head.at)),
        external_reference,
        document_type: ErpDocumentType::Payment,
        customer_id: head.customer.customer_id.clone(),
        erp_party_ref: head.erp_party_ref,
        currency: head.currency,
        document_date: day_of(head.at),
        due_date: None,
        description: Some(format!("Payment {}", payment.payment_id)),
        lines: Vec::new(),
        net_amount: amount,
        tax_amount: None,
        total_amount: amount,
        original_document_ref: None,
        payment: Some(payment),
        contract_id: None,
        charge_id: None,
        invoice_id: None,
    }
}

fn at_time(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

/// A CRM timeline entry for `customer`; `None` when the customer is not in the CRM (the
/// customers contract: updates for it are skipped).
pub fn crm_update(
    customer: &Customer,
    cause: &Envelope,
    discriminator: &str,
    at: i64,
    kind: CrmUpdateKind,
    summary: String,
) -> Option<CrmAccountUpdate> {
    let crm_account_id = customer.crm_account_id.clone()?;
    Some(CrmAccountUpdate {
        envelope: Envelope::caused_by(cause, SOURCE, discriminator, at_time(at)),
        kind,
        summary,
        crm_account_id: Some(crm_account_id),
        amount: None,
        currency: None,
        customer_id: Some(customer.customer_id.clone()),
        contract_id: None,
        subscription_id: None,
        invoice_id: None,
        payment_id: None,
        charge_id: None,
        case_id: None,
        attributes: HashMap::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    #[test]
    fn money_is_grouped_with_the_currency_digits() {
        let m = |text, digits| money(Decimal::from_str(text).unwrap(), digits);
        assert_eq!(m("1875", 2), "1,875.00");
        assert_eq!(m("187.5", 2), "187.50");
        assert_eq!(m("1234567", 0), "1,234,567");
        assert_eq!(m("12.345", 3), "12.345");
        assert_eq!(m("-1000.5", 2), "-1,000.50");
        assert_eq!(m("0", 2), "0.00");
    }

    #[test]
    fn references_and_days_are_stable() {
        assert_eq!(charge_reference("chg_1"), "tributary:charge:chg_1");
        let march = DateTime::parse_from_rfc3339("2026-03-01T00:00:00Z").unwrap().timestamp_millis();
        assert_eq!(period_reference("ctr_1", march), "tributary:period:ctr_1:2026-03-01");
        assert_eq!(day_of(march), 20_513);
        assert_eq!(day_of(march + 86_399_999), 20_513);
    }
}
