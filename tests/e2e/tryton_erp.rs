//! erp-poster's Tryton adapter against the real Tryton of the local stack: documents created,
//! posted and read back; the uniqueness of the reference enforced by Tryton itself; credit
//! notes and payments doing what they should; refusals with Tryton's message.

use chrono::Utc;
use erp_poster::adapter::{AdapterError, ErpAdapter};
use erp_poster::settings::TrytonSettings;
use erp_poster::tryton::{TrytonAdapter, read_decimal};
use rust_decimal::Decimal;
use serde_json::json;
use tributary_contracts::fixtures::dec;
use tributary_contracts::types::{Envelope, ErpDocumentType, ErpPayment, ErpPosting, ErpPostingLine};
use tributary_tests::{stack, unique_name};

pub(crate) fn adapter() -> TrytonAdapter {
    let stack = stack();
    let settings = TrytonSettings {
        url: stack.tryton_url.clone(),
        database: stack.tryton_db.clone(),
        user: stack.tryton_user.clone(),
        ..TrytonSettings::default()
    };
    TrytonAdapter::new(&settings, stack.tryton_password.clone()).expect("a Tryton adapter")
}

/// A party for `account` in Tryton, as the master-data sync would have created it.
pub(crate) async fn party(adapter: &TrytonAdapter, account: &str) -> String {
    let code = format!("C-{account}");
    adapter.client().ensure_party(&code, &format!("{account} Industries Ltd")).await.expect("a party");
    code
}

pub(crate) fn invoice_posting(party: &str, reference: &str, lines: &[(&str, &str)]) -> ErpPosting {
    let now = Utc::now();
    let lines: Vec<ErpPostingLine> = lines
        .iter()
        .enumerate()
        .map(|(index, (quantity, unit_price))| {
            let (quantity, unit_price) = (dec(quantity), dec(unit_price));
            ErpPostingLine {
                line_number: index as i32 + 1,
                product_code: Some("USAGE-OVERAGE".into()),
                account_code: None,
                description: format!("line {}", index + 1),
                quantity,
                unit_price,
                tax_code: None,
                amount: tributary_contracts::Decimal6::new(quantity.value() * unit_price.value()).unwrap(),
            }
        })
        .collect();
    let net: Decimal = lines.iter().map(|l| l.amount.value()).sum();
    ErpPosting {
        envelope: Envelope::originating("tributary.billing-router", "acct", now),
        external_reference: reference.into(),
        document_type: ErpDocumentType::Invoice,
        customer_id: "cus".into(),
        erp_party_ref: party.into(),
        currency: "USD".into(),
        document_date: (now.timestamp_millis() / 86_400_000) as i32,
        due_date: None,
        description: Some("Usage overage".into()),
        lines,
        net_amount: tributary_contracts::Decimal6::new(net).unwrap(),
        tax_amount: None,
        total_amount: tributary_contracts::Decimal6::new(net).unwrap(),
        original_document_ref: None,
        payment: None,
        contract_id: None,
        charge_id: None,
        invoice_id: None,
    }
}

async fn invoice_lines(adapter: &TrytonAdapter, id: &str) -> Vec<(f64, Decimal, Option<String>)> {
    let id: i64 = id.trim_start_matches("account.invoice,").parse().unwrap();
    let rows = adapter.client().read("account.invoice", &[id], &["lines"]).await.unwrap();
    let line_ids: Vec<i64> = rows[0]["lines"].as_array().unwrap().iter().filter_map(|v| v.as_i64()).collect();
    let lines =
        adapter.client().read("account.invoice.line", &line_ids, &["quantity", "unit_price", "origin"]).await.unwrap();
    lines
        .iter()
        .map(|l| {
            (
                l["quantity"].as_f64().unwrap(),
                read_decimal(&l["unit_price"]).unwrap(),
                l["origin"].as_str().map(str::to_owned),
            )
        })
        .collect()
}

#[tokio::test]
async fn an_invoice_is_created_posted_with_its_lines_and_a_second_create_is_refused_by_tryton() {
    let _tryton = tributary_tests::tryton_shared().await;
    let adapter = adapter();
    let party = party(&adapter, &unique_name("acct")).await;
    let reference = format!("tributary:charge:{}", unique_name("chg"));
    let posting = invoice_posting(&party, &reference, &[("1", "187.50"), ("12500", "0.0012")]);
    assert_eq!(adapter.find(&posting).await.unwrap(), None, "nothing under a new reference");
    let created = adapter.create(&posting).await.expect("created and posted");
    assert_eq!(created.state, "posted");
    assert!(created.number.as_deref().is_some_and(|n| n.starts_with("INV/")), "{created:?}");
    assert_eq!(created.total, Decimal::new(20250, 2), "187.50 + 12,500 × 0.0012 = 202.50, no tax");
    let lines = invoice_lines(&adapter, &created.id).await;
    assert_eq!(
        lines.iter().map(|(q, p, _)| (*q, *p)).collect::<Vec<_>>(),
        vec![(1.0, Decimal::new(18750, 2)), (12500.0, Decimal::new(12, 4))]
    );
    assert_eq!(adapter.find(&posting).await.unwrap(), Some(created.clone()), "found again by its reference");

    match adapter.create(&posting).await {
        Err(AdapterError::Duplicate { message }) => assert!(message.contains("reference is already used"), "{message}"),
        other => panic!("Tryton itself refuses a second invoice with the reference, got {other:?}"),
    }
    let ids = adapter.client().search("account.invoice", json!([["reference", "=", reference]]), None).await.unwrap();
    assert_eq!(ids.len(), 1, "one invoice in Tryton");
}

#[tokio::test]
async fn a_credit_note_reverses_its_invoice_and_names_it() {
    let _tryton = tributary_tests::tryton_shared().await;
    let adapter = adapter();
    let party = party(&adapter, &unique_name("acct")).await;
    let original_reference = format!("tributary:invoice:{}", unique_name("in"));
    let original = adapter.create(&invoice_posting(&party, &original_reference, &[("1", "49.00")])).await.unwrap();
    let mut credit =
        invoice_posting(&party, &format!("tributary:credit-note:{}", unique_name("in")), &[("1", "49.00")]);
    credit.document_type = ErpDocumentType::CreditNote;
    credit.original_document_ref = Some(original_reference.clone());
    let reversed = adapter.create(&credit).await.expect("a credit note");
    assert_eq!(reversed.total, Decimal::new(-4900, 2));
    assert_eq!(reversed.state, "paid", "reconciled with the invoice it reverses in full");
    let original_id: i64 = original.id.trim_start_matches("account.invoice,").parse().unwrap();
    let settled = adapter.client().read("account.invoice", &[original_id], &["state"]).await.unwrap();
    assert_eq!(settled[0]["state"], "paid", "the reversed invoice is settled too");
    let lines = invoice_lines(&adapter, &reversed.id).await;
    let original_lines = invoice_lines(&adapter, &original.id).await;
    assert_eq!(lines[0].0, -1.0, "a negative quantity");
    assert!(
        lines[0].2.as_deref().is_some_and(|o| o.starts_with("account.invoice.line,")),
        "its origin is the original line: {lines:?}"
    );
    assert_eq!(original_lines.len(), 1);
    let id: i64 = reversed.id.trim_start_matches("account.invoice,").parse().unwrap();
    let origins = adapter.client().read("account.invoice", &[id], &["origin_invoices"]).await.unwrap();
    assert_eq!(origins[0]["origin_invoices"], json!([original_id]), "the credit note names the invoice it reverses");
}

#[tokio::test]
async fn a_payment_settles_its_invoice_once_and_is_found_by_its_reference() {
    let _tryton = tributary_tests::tryton_shared().await;
    let adapter = adapter();
    let party = party(&adapter, &unique_name("acct")).await;
    let invoice_reference = format!("tributary:invoice:{}", unique_name("in"));
    let invoice = adapter.create(&invoice_posting(&party, &invoice_reference, &[("1", "100.00")])).await.unwrap();
    let mut payment = invoice_posting(&party, &format!("tributary:payment:{}", unique_name("pi")), &[]);
    payment.document_type = ErpDocumentType::Payment;
    payment.net_amount = dec("100");
    payment.total_amount = dec("100");
    payment.payment = Some(ErpPayment {
        payment_id: unique_name("pi"),
        amount: dec("100"),
        method: "card".into(),
        paid_at: Utc::now().timestamp_millis(),
        invoice_external_reference: Some(invoice_reference.clone()),
    });
    assert_eq!(adapter.find(&payment).await.unwrap(), None);
    let paid = adapter.create(&payment).await.expect("the payment");
    assert!(paid.id.starts_with("account.move,"), "{paid:?}");
    assert_eq!(adapter.find(&payment).await.unwrap().map(|d| d.id), Some(paid.id.clone()), "found by its reference");
    let id: i64 = invoice.id.trim_start_matches("account.invoice,").parse().unwrap();
    let state = adapter.client().read("account.invoice", &[id], &["state", "amount_to_pay"]).await.unwrap();
    assert_eq!(state[0]["state"], "paid");

    // Paying it again is refused by Tryton.
    let mut again = payment.clone();
    again.external_reference = format!("tributary:payment:{}", unique_name("pi"));
    assert!(matches!(adapter.create(&again).await, Err(AdapterError::Rejected { .. })), "no overpayment");
}

#[tokio::test]
async fn a_document_for_an_unknown_party_or_account_is_rejected_with_the_reason() {
    let _tryton = tributary_tests::tryton_shared().await;
    let adapter = adapter();
    let unknown =
        invoice_posting("C-nobody-at-all", &format!("tributary:charge:{}", unique_name("chg")), &[("1", "1")]);
    match adapter.create(&unknown).await {
        Err(AdapterError::Rejected { code, message }) => {
            assert_eq!(code, "unknown_party");
            assert!(message.contains("C-nobody-at-all"), "{message}");
        }
        other => panic!("an unknown party is a refusal, got {other:?}"),
    }
    let party = party(&adapter, &unique_name("acct")).await;
    let mut bad_account = invoice_posting(&party, &format!("tributary:charge:{}", unique_name("chg")), &[("1", "1")]);
    bad_account.lines[0].account_code = Some("9.9.9.9".into());
    assert!(matches!(adapter.create(&bad_account).await, Err(AdapterError::Rejected { code: "unknown_account", .. })));
    // A date with no fiscal year in Tryton: refused by Tryton's own validation.
    let mut long_ago = invoice_posting(&party, &format!("tributary:charge:{}", unique_name("chg")), &[("1", "1")]);
    long_ago.document_date = 0; // 1970-01-01
    match adapter.create(&long_ago).await {
        Err(AdapterError::Rejected { code: "validation", message }) => assert!(!message.is_empty()),
        other => panic!("Tryton refuses a date without a fiscal year, got {other:?}"),
    }
}
