//! `GET /accounts/{id}/entitlement` on the admin port: an account's current entitlement, for
//! systems that must ask before they act (the product's access check, a support tool).
//!
//! It answers from the committed state of the partitions this instance holds: never from a
//! transaction that may still abort, and only once those partitions are restored. An account
//! that no payment problem, case or override ever touched has no state: it is ACTIVE when
//! `refdata.contracts` knows it, unknown (404) otherwise. An account whose partition another
//! instance holds is answered there; this one says which partition that is.

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chrono::{DateTime, SecondsFormat};
use serde_json::{Value, json};
use tributary_runtime::state::StateView;
use tributary_telemetry::Health;

use crate::processor::{ACCOUNTS, AccountEntitlement, MasterData, symbol};

#[derive(Debug, Clone)]
struct Query {
    view: StateView,
    master: MasterData,
    health: Health,
    partitions: i32,
}

/// The routes, over the runtime's `view` of its state.
pub fn routes(view: StateView, master: MasterData, health: Health, partitions: i32) -> Router {
    Router::new().route("/accounts/{account_id}/entitlement", get(entitlement)).with_state(Query {
        view,
        master,
        health,
        partitions,
    })
}

async fn entitlement(State(query): State<Query>, Path(account_id): Path<String>) -> Response {
    if !query.health.is_ready() {
        let body = json!({"error": "not ready: partitions are being restored; retry shortly"});
        return (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response();
    }
    match query.view.find(ACCOUNTS, &account_id) {
        Ok(Some((partition, account))) => axum::Json(describe(&account, partition)).into_response(),
        Ok(None) => {
            let partition = tributary_runtime::kafka::partition_of(account_id.as_bytes(), query.partitions);
            let held = query.view.held();
            if !held.contains(&partition) {
                let body = json!({
                    "error": format!("account {account_id} is on partition {partition}, which another instance holds (this one holds {held:?})"),
                    "partition": partition,
                });
                return (StatusCode::MISDIRECTED_REQUEST, axum::Json(body)).into_response();
            }
            if query.master.contracts.find(&format!("acct:{account_id}")).is_empty() {
                let body = json!({"error": format!("account {account_id} is unknown: no contract in refdata.contracts and no payment, case or override seen")});
                return (StatusCode::NOT_FOUND, axum::Json(body)).into_response();
            }
            axum::Json(json!({
                "account_id": account_id,
                "state": "ACTIVE",
                "recorded": false,
                "partition": partition,
                "overdue_invoices": [],
            }))
            .into_response()
        }
        Err(error) => {
            let body = json!({"error": format!("state of {account_id} unreadable: {error}")});
            (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(body)).into_response()
        }
    }
}

fn time(ms: i64) -> Value {
    DateTime::from_timestamp_millis(ms).map_or(Value::Null, |t| t.to_rfc3339_opts(SecondsFormat::Millis, true).into())
}

/// The JSON answer for a recorded account (amounts as decimal strings, times RFC 3339 UTC).
pub fn describe(account: &AccountEntitlement, partition: i32) -> Value {
    let outstanding = account.outstanding();
    json!({
        "account_id": account.account_id,
        "state": symbol(&account.state),
        "recorded": true,
        "since": time(account.since),
        "reason": symbol(&account.reason),
        "reason_detail": account.reason_detail,
        "grace_ends_at": account.grace_ends_at.map_or(Value::Null, time),
        "manual_hold": account.manual_hold,
        "outstanding_amount": outstanding.as_ref().map(|(amount, _)| amount.to_string()),
        "currency": outstanding.map(|(_, currency)| currency),
        "contract_id": account.contract_id,
        "overdue_invoices": account.overdue.iter().map(|(invoice_id, overdue)| json!({
            "invoice_id": invoice_id,
            "amount": overdue.amount.to_string(),
            "currency": overdue.currency,
            "failed_at": time(overdue.failed_at),
            "payment_id": overdue.payment_id,
            "attempt": overdue.attempt,
            "dunning_status": symbol(&overdue.dunning),
            "failure_code": overdue.failure_code,
        })).collect::<Vec<_>>(),
        "open_cases": account.open_cases.keys().collect::<Vec<_>>(),
        "partition": partition,
    })
}
