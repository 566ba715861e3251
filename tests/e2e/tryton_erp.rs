//! erp-poster's ERP client posts real customer invoices in Tryton over JSON-RPC.

use chrono::Utc;
use erp_poster::tryton::{InvoiceDraft, InvoiceLine, PostOutcome, TrytonClient, TrytonConfig};
use rust_decimal::Decimal;
use tributary_tests::{stack, unique_name};

async fn client() -> TrytonClient {
    let stack = stack();
    TrytonClient::connect(TrytonConfig {
        url: stack.tryton_url.clone(),
        database: stack.tryton_db.clone(),
        user: stack.tryton_user.clone(),
        password: stack.tryton_password.clone(),
    })
    .await
    .expect("log in to Tryton")
}

fn draft(reference: &str) -> InvoiceDraft {
    InvoiceDraft {
        reference: reference.to_owned(),
        party_name: "ACME Corp".into(),
        currency: "USD".into(),
        invoice_date: Utc::now().date_naive(),
        description: "Usage overage, API calls".into(),
        lines: vec![InvoiceLine {
            product_code: "USAGE-OVERAGE".into(),
            description: "12,500 API calls over the contracted quota".into(),
            quantity: Decimal::new(12_500, 0),
            unit_price: Decimal::new(12, 4), // 0.0012 per call
        }],
    }
}

#[tokio::test]
async fn a_customer_invoice_is_created_posted_and_read_back() {
    let client = client().await;
    let reference = unique_name("inv");
    let outcome = client.post_customer_invoice(&draft(&reference)).await.expect("post");
    let PostOutcome::Posted(posted) = outcome else { panic!("a new reference is posted, got {outcome:?}") };
    assert_eq!(posted.state, "posted");
    assert!(posted.number.as_deref().is_some_and(|n| n.starts_with("INV/")), "{posted:?}");
    assert_eq!(posted.total_amount, Decimal::new(15, 0), "12,500 x 0.0012 = 15.00, no tax");

    let found = client.find_invoice(&reference).await.expect("search").expect("found by reference");
    assert_eq!(found, posted);
}

#[tokio::test]
async fn posting_the_same_reference_twice_creates_one_invoice() {
    let client = client().await;
    let reference = unique_name("inv-twice");
    let first = client.post_customer_invoice(&draft(&reference)).await.expect("first post");
    let second = client.post_customer_invoice(&draft(&reference)).await.expect("second post");
    let (PostOutcome::Posted(first), PostOutcome::AlreadyPosted(second)) = (first, second) else {
        panic!("the second post must find the first invoice");
    };
    assert_eq!(first.id, second.id);
    assert_eq!(first.number, second.number);
}
