//! The Tryton adapter: erp-poster's documents as Tryton records, over JSON-RPC.
//!
//! Tryton is a real open-source ERP; the local stack runs it (deploy/local/tryton/README.md
//! records the protocol as checked against trytond 8.2). Every call is
//! `POST /<db>/rpc/ {"id", "method": "model.<model>.<method>", "params": [..., context]}` with
//! `Authorization: Session base64(user:uid:token)`. Records are looked up by code, never by id,
//! so the adapter works against any Tryton set up with the same master data:
//!
//! - INVOICE: a customer invoice (`account.invoice`, type `out`) for the party whose `code` is
//!   the posting's `erp_party_ref`, its lines' products by `code` (the default product when a
//!   line names none) and revenue accounts by `code` (else the product's), created with the
//!   external reference in `reference`, then posted;
//! - CREDIT_NOTE: the same, with negative quantities, each line's `origin` the original
//!   invoice's line (so `origin_invoices` names the original);
//! - PAYMENT: the `account.invoice.pay` wizard on the invoice named by
//!   `invoice_external_reference`, with the payment method of the settings and the external
//!   reference as the payment's description (which is how it is found again); a full payment
//!   leaves the invoice `paid`.
//!
//! Exactly once: the module `tributary_erp` (deploy/local/tryton/modules) makes
//! (company, type, reference) unique, so a second invoice with a reference answers a
//! `UserError` that this adapter reports as [`AdapterError::Duplicate`]. Tryton's writes have no
//! server timeout and a write the client gave up on was seen landing 15 s later, so a miss of
//! `find` after an ambiguous failure is trusted only after twice the client's RPC timeout
//! ([`ErpAdapter::settle_time`]); the constraint covers what lands later still. A payment has
//! no such constraint; paying an invoice twice in full is refused by Tryton itself ("You
//! cannot overpay").
//!
//! Errors (../shared/notes/tryton.md): HTTP 200 with `"error": ["UserError", ...]` is a
//! validation refusal; other exception classes (a traceback) are unexpected; HTTP 503
//! ("database is locked") is transient and rolled back; a refused connection never reached the
//! server; a timeout or a reset after the request was sent is ambiguous.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine as _;
use chrono::{DateTime, Datelike, NaiveDate, Utc};
use rust_decimal::Decimal;
use serde_json::{Value, json};
use tokio::sync::RwLock;
use tributary_contracts::types::{ErpDocumentType, ErpPosting, ErpPostingLine};

use crate::adapter::{AdapterError, ErpAdapter, ErpDocument};
use crate::settings::TrytonSettings;

/// The text of the `tributary_erp` module's unique-reference message (its `ir.message`).
const DUPLICATE_REFERENCE: &str = "reference is already used";

/// Errors talking to Tryton, before they are classified.
#[derive(Debug, thiserror::Error)]
pub enum TrytonError {
    /// The server could not be reached, or the exchange broke off.
    #[error("tryton unreachable: {message}")]
    Transport {
        /// What failed.
        message: String,
        /// Whether the request may have reached the server (not a refused connection).
        ambiguous: bool,
        /// A timeout rather than a reset.
        timeout: bool,
    },
    /// The server answered with an HTTP error status.
    #[error("tryton answered HTTP {status} to {method}")]
    Http {
        /// The status code.
        status: u16,
        /// The RPC method.
        method: String,
    },
    /// The server raised an exception.
    #[error("tryton refused {method}: {kind}: {message}")]
    Refused {
        /// The RPC method.
        method: String,
        /// The exception class, e.g. `UserError`.
        kind: String,
        /// Its message.
        message: String,
    },
    /// The answer did not have the expected shape.
    #[error("unexpected answer from tryton: {0}")]
    Protocol(String),
}

impl TrytonError {
    /// Whether the same call may succeed later.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Transport { .. } | Self::Http { status: 429 | 500..=599, .. })
            || matches!(self, Self::Refused { kind, .. } if kind == "ConcurrencyException")
    }
}

impl From<TrytonError> for AdapterError {
    fn from(error: TrytonError) -> Self {
        match error {
            TrytonError::Transport { message, ambiguous, timeout } => AdapterError::Unavailable {
                code: match (ambiguous, timeout) {
                    (false, _) => "connect",
                    (true, true) => "timeout",
                    (true, false) => "connection_reset",
                },
                message,
                ambiguous,
            },
            TrytonError::Http { status, method } if status == 429 || status >= 500 => AdapterError::Unavailable {
                code: match status {
                    503 => "http_503",
                    429 => "http_429",
                    _ => "http_5xx",
                },
                message: format!("HTTP {status} to {method}"),
                // 503 is Tryton's "database is locked" after SQLite's retries: rolled back.
                // A 500, or a 502/504 of a proxy, may have come after the work was done.
                ambiguous: !matches!(status, 503 | 429),
            },
            TrytonError::Http { status, method } => AdapterError::Unexpected(format!("HTTP {status} to {method}")),
            TrytonError::Refused { kind, message, .. }
                if kind == "UserError" && message.contains(DUPLICATE_REFERENCE) =>
            {
                AdapterError::Duplicate { message }
            }
            TrytonError::Refused { kind, message, .. } if kind == "UserError" || kind == "UserWarning" => {
                AdapterError::Rejected { code: "validation", message }
            }
            TrytonError::Refused { kind, message, .. } if kind == "ConcurrencyException" => {
                AdapterError::Unavailable { code: "concurrency", message, ambiguous: false }
            }
            TrytonError::Refused { kind, message, method } => {
                AdapterError::Unexpected(format!("{method}: {kind}: {message}"))
            }
            TrytonError::Protocol(message) => AdapterError::Unexpected(message),
        }
    }
}

type Result<T, E = TrytonError> = std::result::Result<T, E>;

/// Tryton's JSON for a decimal.
pub fn decimal(value: Decimal) -> Value {
    json!({"__class__": "Decimal", "decimal": value.to_string()})
}

/// Tryton's JSON for a date.
pub fn date(value: NaiveDate) -> Value {
    json!({"__class__": "date", "year": value.year(), "month": value.month(), "day": value.day()})
}

/// Reads a decimal from Tryton's JSON.
pub fn read_decimal(value: &Value) -> Option<Decimal> {
    value.get("decimal")?.as_str()?.parse().ok()
}

/// Reads a datetime (`{"__class__": "datetime", ...}`, UTC) from Tryton's JSON.
fn read_datetime(value: &Value) -> Option<DateTime<Utc>> {
    let part = |name: &str| value.get(name).and_then(Value::as_i64);
    let day = NaiveDate::from_ymd_opt(part("year")? as i32, part("month")? as u32, part("day")? as u32)?;
    let time = day.and_hms_opt(part("hour")? as u32, part("minute")? as u32, part("second")? as u32)?;
    Some(time.and_utc())
}

/// Where Tryton is and who to log in as.
#[derive(Clone)]
pub struct TrytonConfig {
    /// Base URL of the server, e.g. `http://127.0.0.1:18000/`.
    pub url: String,
    /// Database name.
    pub database: String,
    /// User.
    pub user: String,
    /// Password; never logged.
    pub password: String,
    /// How long one RPC may take.
    pub rpc_timeout: Duration,
}

impl std::fmt::Debug for TrytonConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrytonConfig")
            .field("url", &self.url)
            .field("database", &self.database)
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .field("rpc_timeout", &self.rpc_timeout)
            .finish()
    }
}

#[derive(Debug, Default)]
struct Session {
    authorization: Option<String>,
    context: Value,
}

/// A JSON-RPC client that logs in on its first call and again when its session expires.
#[derive(Debug)]
pub struct TrytonClient {
    config: TrytonConfig,
    http: reqwest::Client,
    rpc_url: String,
    session: RwLock<Session>,
    next_id: AtomicU64,
}

impl TrytonClient {
    /// A client of `config`; nothing is sent yet.
    pub fn new(config: TrytonConfig) -> Result<Self> {
        let rpc_url = format!("{}/{}/rpc/", config.url.trim_end_matches('/'), config.database);
        let http = reqwest::Client::builder()
            .timeout(config.rpc_timeout)
            .build()
            .map_err(|e| TrytonError::Protocol(e.to_string()))?;
        Ok(Self { config, http, rpc_url, session: RwLock::default(), next_id: AtomicU64::new(1) })
    }

    async fn login(&self) -> Result<()> {
        let params = json!([self.config.user, {"password": self.config.password}, "en"]);
        let answer = self.post("common.db.login", params, None).await?;
        let (Some(uid), Some(token)) = (answer.get(0).and_then(Value::as_i64), answer.get(1).and_then(Value::as_str))
        else {
            return Err(TrytonError::Protocol(format!("login answered {answer}")));
        };
        let credentials = format!("{}:{uid}:{token}", self.config.user);
        let authorization = format!("Session {}", base64::engine::general_purpose::STANDARD.encode(credentials));
        let context = self.post("model.res.user.get_preferences", json!([true, {}]), Some(&authorization)).await?;
        *self.session.write().await = Session { authorization: Some(authorization), context };
        Ok(())
    }

    async fn post(&self, method: &str, params: Value, authorization: Option<&str>) -> Result<Value> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut request = self.http.post(&self.rpc_url).json(&json!({"id": id, "method": method, "params": params}));
        if let Some(authorization) = authorization {
            request = request.header(reqwest::header::AUTHORIZATION, authorization);
        }
        let transport = |e: reqwest::Error| TrytonError::Transport {
            ambiguous: !e.is_connect(),
            timeout: e.is_timeout(),
            message: e.to_string(),
        };
        let response = request.send().await.map_err(transport)?;
        let status = response.status();
        if !status.is_success() {
            return Err(TrytonError::Http { status: status.as_u16(), method: method.to_owned() });
        }
        let mut answer: Value = response.json().await.map_err(transport)?;
        if let Some(error) = answer.get("error").filter(|e| !e.is_null()) {
            let kind = error.get(0).and_then(Value::as_str).unwrap_or("Error").to_owned();
            let message = match error.get(1) {
                Some(Value::Array(args)) => args.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(": "),
                Some(other) => other.to_string(),
                None => String::new(),
            };
            return Err(TrytonError::Refused { method: method.to_owned(), kind, message });
        }
        Ok(answer["result"].take())
    }

    /// The user's context (company, language, ...), logging in first if needed.
    async fn context(&self) -> Result<(Option<String>, Value)> {
        if self.session.read().await.authorization.is_none() {
            self.login().await?;
        }
        let session = self.session.read().await;
        Ok((session.authorization.clone(), session.context.clone()))
    }

    /// Calls `method` (e.g. `model.account.invoice.read`) with `args` and the context (merged
    /// with `extra` context keys). A session that expired (HTTP 401) is renewed once.
    async fn call_with(&self, method: &str, args: Vec<Value>, extra: Option<&Value>) -> Result<Value> {
        for attempt in 0..2 {
            let (authorization, mut context) = self.context().await?;
            if let (Some(extra), Some(context)) = (extra.and_then(Value::as_object), context.as_object_mut()) {
                context.extend(extra.clone());
            }
            let mut params = args.clone();
            params.push(context);
            match self.post(method, Value::Array(params), authorization.as_deref()).await {
                Err(TrytonError::Http { status: 401, .. }) if attempt == 0 => self.login().await?,
                other => return other,
            }
        }
        unreachable!("the loop returns on its second attempt")
    }

    /// Calls `model.<model_method>` with `args`; the context is appended.
    pub async fn call(&self, model_method: &str, args: Vec<Value>) -> Result<Value> {
        self.call_with(&format!("model.{model_method}"), args, None).await
    }

    /// The ids of `model` matching `domain`, at most `limit`.
    pub async fn search(&self, model: &str, domain: Value, limit: Option<u32>) -> Result<Vec<i64>> {
        let ids = self.call(&format!("{model}.search"), vec![domain, json!(0), json!(limit), Value::Null]).await?;
        ids.as_array()
            .map(|ids| ids.iter().filter_map(Value::as_i64).collect())
            .ok_or_else(|| TrytonError::Protocol(format!("{model}.search answered {ids}")))
    }

    /// Reads `fields` of `ids` of `model`, in the order of `ids`.
    pub async fn read(&self, model: &str, ids: &[i64], fields: &[&str]) -> Result<Vec<Value>> {
        let answer = self.call(&format!("{model}.read"), vec![json!(ids), json!(fields)]).await?;
        let mut rows = answer
            .as_array()
            .cloned()
            .ok_or_else(|| TrytonError::Protocol(format!("{model}.read answered {answer}")))?;
        rows.sort_by_key(|row| ids.iter().position(|id| row["id"].as_i64() == Some(*id)));
        Ok(rows)
    }

    /// The party whose code is `code`, created with a name and an address if missing: for
    /// setting up the ERP's master data (tests, the demo), never on the posting path.
    pub async fn ensure_party(&self, code: &str, name: &str) -> Result<i64> {
        if let Some(id) = self.search("party.party", json!([["code", "=", code]]), Some(1)).await?.first() {
            return Ok(*id);
        }
        let created = self
            .call("party.party.create", vec![json!([{"code": code, "name": name, "addresses": [["create", [{}]]]}])])
            .await?;
        created
            .get(0)
            .and_then(Value::as_i64)
            .ok_or_else(|| TrytonError::Protocol(format!("party.party.create answered {created}")))
    }
}

/// An invoice as Tryton has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvoiceRecord {
    /// Tryton's id.
    pub id: i64,
    /// The number given at posting, e.g. `INV/2026/3`.
    pub number: Option<String>,
    /// `draft`, `validated`, `posted`, `paid`, `cancelled`.
    pub state: String,
    /// Total with taxes.
    pub total_amount: Decimal,
    /// What remains to be paid.
    pub amount_to_pay: Decimal,
    /// The external reference.
    pub reference: Option<String>,
    /// Its lines' ids, in order.
    pub lines: Vec<i64>,
    /// When it was created.
    pub created_at: Option<DateTime<Utc>>,
}

impl InvoiceRecord {
    fn document(&self) -> ErpDocument {
        ErpDocument {
            id: format!("account.invoice,{}", self.id),
            number: self.number.clone(),
            state: self.state.clone(),
            total: self.total_amount,
            created_at: self.created_at,
        }
    }
}

const INVOICE_FIELDS: [&str; 8] =
    ["id", "number", "state", "total_amount", "amount_to_pay", "reference", "lines", "create_date"];

/// Decimals of a unit price in Tryton (`account.invoice.line.unit_price`).
const PRICE_DIGITS: u32 = 4;

/// A line's quantity, unit price and text as Tryton can hold them: a unit price with more than
/// four decimals would be refused, so such a line is one unit at its amount, its own quantity
/// and price kept in the text.
fn tryton_price(line: &ErpPostingLine) -> (Decimal, Decimal, String) {
    let price = line.unit_price.value().normalize();
    if price.scale() <= PRICE_DIGITS {
        return (line.quantity.value(), price, line.description.clone());
    }
    let description = format!("{} ({} × {})", line.description, line.quantity.value().normalize(), price);
    (Decimal::ONE, line.amount.value().normalize(), description)
}

/// The Tryton adapter.
#[derive(Debug)]
pub struct TrytonAdapter {
    client: TrytonClient,
    default_product: String,
    payment_method: String,
    settle: Duration,
    /// Ids of records that do not change (currencies, products, accounts, journals), by
    /// `model|code`.
    ids: RwLock<HashMap<String, i64>>,
}

fn rejected(code: &'static str, message: String) -> AdapterError {
    AdapterError::Rejected { code, message }
}

impl TrytonAdapter {
    /// An adapter over the server of `settings`; it logs in on its first call.
    pub fn new(settings: &TrytonSettings, password: String) -> anyhow::Result<Self> {
        let config = TrytonConfig {
            url: settings.url.clone(),
            database: settings.database.clone(),
            user: settings.user.clone(),
            password,
            rpc_timeout: settings.rpc_timeout,
        };
        Ok(Self {
            client: TrytonClient::new(config)?,
            default_product: settings.default_product.clone(),
            payment_method: settings.payment_method.clone(),
            // See the module doc: twice the longest call the client waits for.
            settle: settings.rpc_timeout * 2,
            ids: RwLock::default(),
        })
    }

    /// The client, for setting up master data.
    pub fn client(&self) -> &TrytonClient {
        &self.client
    }

    /// The id of the one `model` record whose `field` is `value`, remembered; a record that
    /// does not exist is a refusal of the document that names it (`code`).
    async fn id_of(
        &self,
        model: &str,
        field: &str,
        value: &str,
        code: &'static str,
        cache: bool,
    ) -> Result<i64, AdapterError> {
        let key = format!("{model}|{field}|{value}");
        if let Some(id) = self.ids.read().await.get(&key) {
            return Ok(*id);
        }
        let found = self.client.search(model, json!([[field, "=", value]]), Some(2)).await?;
        match found.as_slice() {
            [id] => {
                if cache {
                    self.ids.write().await.insert(key, *id);
                }
                Ok(*id)
            }
            [] => Err(rejected(code, format!("no {model} with {field} {value:?} in Tryton"))),
            _ => Err(rejected(code, format!("several {model} records with {field} {value:?} in Tryton"))),
        }
    }

    /// The invoice (customer invoice or credit note) whose reference is `reference`.
    pub async fn find_invoice(&self, reference: &str) -> Result<Option<InvoiceRecord>, AdapterError> {
        let ids = self
            .client
            .search("account.invoice", json!([["reference", "=", reference], ["type", "=", "out"]]), Some(1))
            .await?;
        match ids.first() {
            Some(id) => self.read_invoice(*id).await.map(Some),
            None => Ok(None),
        }
    }

    async fn read_invoice(&self, id: i64) -> Result<InvoiceRecord, AdapterError> {
        let rows = self.client.read("account.invoice", &[id], &INVOICE_FIELDS).await?;
        let row = rows.first().ok_or_else(|| AdapterError::Unexpected(format!("invoice {id} vanished")))?;
        Ok(InvoiceRecord {
            id,
            number: row["number"].as_str().map(str::to_owned),
            state: row["state"].as_str().unwrap_or_default().to_owned(),
            total_amount: read_decimal(&row["total_amount"]).unwrap_or_default(),
            amount_to_pay: read_decimal(&row["amount_to_pay"]).unwrap_or_default(),
            reference: row["reference"].as_str().map(str::to_owned),
            lines: row["lines"].as_array().map(|l| l.iter().filter_map(Value::as_i64).collect()).unwrap_or_default(),
            created_at: read_datetime(&row["create_date"]),
        })
    }

    /// The payment recorded with `reference` as its description: its move, and the invoice.
    async fn find_payment(&self, posting: &ErpPosting) -> Result<Option<ErpDocument>, AdapterError> {
        let reference = &posting.external_reference;
        let moves = self.client.search("account.move", json!([["description", "=", reference]]), Some(1)).await?;
        let Some(id) = moves.first() else { return Ok(None) };
        let rows = self.client.read("account.move", &[*id], &["id", "number", "state", "create_date"]).await?;
        let row = rows.first().ok_or_else(|| AdapterError::Unexpected(format!("move {id} vanished")))?;
        let total = posting.payment.as_ref().map_or(Decimal::ZERO, |p| p.amount.value());
        Ok(Some(ErpDocument {
            id: format!("account.move,{id}"),
            number: row["number"].as_str().map(str::to_owned),
            state: row["state"].as_str().unwrap_or_default().to_owned(),
            total,
            created_at: read_datetime(&row["create_date"]),
        }))
    }

    async fn line_values(
        &self,
        line: &ErpPostingLine,
        negate: bool,
        origin: Option<i64>,
    ) -> Result<Value, AdapterError> {
        let product_code = line.product_code.clone().unwrap_or_else(|| self.default_product.clone());
        let product = self.id_of("product.product", "code", &product_code, "unknown_product", true).await?;
        let rows = self
            .client
            .read("product.product", &[product], &["default_uom", "account_category.account_revenue"])
            .await?;
        let row = rows.first().ok_or_else(|| AdapterError::Unexpected("product vanished".into()))?;
        let account = match &line.account_code {
            Some(code) => json!(self.id_of("account.account", "code", code, "unknown_account", true).await?),
            // Tryton answers a dotted field under the key of its first part plus a dot.
            None => row["account_category."]["account_revenue"].clone(),
        };
        let (quantity, unit_price, description) = tryton_price(line);
        let quantity = if negate { -quantity } else { quantity };
        let mut values = json!({
            "type": "line",
            "product": product,
            "unit": row["default_uom"],
            "account": account,
            "description": description,
            // Tryton's quantity is a float field.
            "quantity": quantity.to_string().parse::<f64>().unwrap_or_default(),
            "unit_price": decimal(unit_price),
        });
        if let Some(origin) = origin {
            values["origin"] = json!(format!("account.invoice.line,{origin}"));
        }
        Ok(values)
    }

    /// Reconciles a credit note with the invoice it reverses in full, so that both are settled
    /// (Tryton leaves them both posted, each with its amount to pay, otherwise). Best effort:
    /// the credit note stands either way, and a failure is logged for finance to reconcile.
    async fn reconcile(&self, invoice: &InvoiceRecord, credit_note: &InvoiceRecord) {
        let outcome = async {
            let rows = self.client.read("account.invoice", &[invoice.id, credit_note.id], &["lines_to_pay"]).await?;
            let lines: Vec<i64> = rows
                .iter()
                .flat_map(|r| r["lines_to_pay"].as_array().cloned().unwrap_or_default())
                .filter_map(|v| v.as_i64())
                .collect();
            let extra = json!({"active_model": "account.move.line", "active_id": lines.first(), "active_ids": lines});
            let create = "wizard.account.move.reconcile_lines.create";
            let session = self.client.call_with(create, Vec::new(), Some(&extra)).await?;
            let session = session.get(0).cloned().unwrap_or(Value::Null);
            let execute = "wizard.account.move.reconcile_lines.execute";
            let answer =
                self.client.call_with(execute, vec![session.clone(), json!({}), json!("start")], Some(&extra)).await;
            let delete = "wizard.account.move.reconcile_lines.delete";
            let _ = self.client.call_with(delete, vec![session], Some(&extra)).await;
            answer
        }
        .await;
        if let Err(error) = outcome {
            tracing::warn!(invoice = invoice.id, credit_note = credit_note.id, %error, "reconciling a credit note failed");
        }
    }

    /// Creates and posts the invoice or credit note of `posting`.
    async fn create_invoice(&self, posting: &ErpPosting) -> Result<ErpDocument, AdapterError> {
        let credit = posting.document_type == ErpDocumentType::CreditNote;
        let original = match (&posting.original_document_ref, credit) {
            (Some(original), true) => Some(self.find_invoice(original).await?.ok_or_else(|| {
                rejected(
                    "unknown_original",
                    format!("the invoice {original} this credit note reverses is not in Tryton"),
                )
            })?),
            (None, true) => return Err(rejected("validation", "a credit note without original_document_ref".into())),
            _ => None,
        };
        let origins = original.as_ref().map(|o| o.lines.clone()).unwrap_or_default();
        let party = self.id_of("party.party", "code", &posting.erp_party_ref, "unknown_party", false).await?;
        let currency = self.id_of("currency.currency", "code", &posting.currency, "unknown_currency", true).await?;
        let journal = self.id_of("account.journal", "type", "revenue", "setup", true).await?;
        let (_, context) = self.client.context().await?;
        let rows = self.client.read("party.party", &[party], &["addresses", "account_receivable"]).await?;
        let party_row = rows.first().ok_or_else(|| AdapterError::Unexpected("party vanished".into()))?;
        let receivable = match party_row["account_receivable"].as_i64() {
            Some(account) => account,
            None => {
                let config = self.client.read("account.configuration", &[1], &["default_account_receivable"]).await?;
                config.first().and_then(|c| c["default_account_receivable"].as_i64()).ok_or_else(|| {
                    AdapterError::Unexpected("no default receivable account in account.configuration".into())
                })?
            }
        };
        let mut lines = Vec::with_capacity(posting.lines.len());
        for (index, line) in posting.lines.iter().enumerate() {
            // The credit note's lines follow the original's, line by line.
            let origin = (origins.len() == posting.lines.len()).then(|| origins[index]);
            lines.push(self.line_values(line, credit, origin).await?);
        }
        let invoice_date = NaiveDate::from_ymd_opt(1970, 1, 1)
            .and_then(|epoch| {
                epoch.checked_add_days(chrono::Days::new(u64::try_from(posting.document_date).unwrap_or_default()))
            })
            .ok_or_else(|| rejected("validation", format!("document_date {} is not a date", posting.document_date)))?;
        let mut values = json!({
            "type": "out",
            "company": context.get("company").cloned().unwrap_or(Value::Null),
            "party": party,
            "invoice_address": party_row["addresses"].get(0).cloned().unwrap_or(Value::Null),
            "currency": currency,
            "journal": journal,
            "account": receivable,
            "invoice_date": date(invoice_date),
            "reference": posting.external_reference,
            "description": posting.description,
            "lines": [["create", lines]],
        });
        // The party's terms decide the due date in Tryton (the local set-up's "Net 30").
        if let Ok(term) = self.id_of("account.invoice.payment_term", "name", "Net 30", "setup", true).await {
            values["payment_term"] = json!(term);
        }
        let created = self.client.call("account.invoice.create", vec![json!([values])]).await?;
        let id = created
            .get(0)
            .and_then(Value::as_i64)
            .ok_or_else(|| AdapterError::Unexpected(format!("create answered {created}")))?;
        self.client.call("account.invoice.post", vec![json!([id])]).await?;
        let posted = self.read_invoice(id).await?;
        if let Some(original) = &original
            && original.state == "posted"
            && original.amount_to_pay + posted.amount_to_pay == Decimal::ZERO
        {
            self.reconcile(original, &posted).await;
            return Ok(self.read_invoice(id).await?.document());
        }
        Ok(posted.document())
    }

    /// Records the PAYMENT of `posting` against its invoice with the pay wizard.
    async fn pay(&self, posting: &ErpPosting) -> Result<ErpDocument, AdapterError> {
        let payment =
            posting.payment.as_ref().ok_or_else(|| rejected("validation", "a PAYMENT without its payment".into()))?;
        let invoice_reference = payment.invoice_external_reference.as_ref().ok_or_else(|| {
            rejected(
                "unmatched_payment",
                format!("payment {} names no invoice: Tryton does not match payments itself", payment.payment_id),
            )
        })?;
        let invoice = self.find_invoice(invoice_reference).await?.ok_or_else(|| {
            rejected(
                "unknown_invoice",
                format!("the invoice {invoice_reference} this payment settles is not in Tryton"),
            )
        })?;
        let currency = self.id_of("currency.currency", "code", &posting.currency, "unknown_currency", true).await?;
        let method = self.id_of("account.invoice.payment.method", "name", &self.payment_method, "setup", true).await?;
        let extra = json!({"active_model": "account.invoice", "active_id": invoice.id, "active_ids": [invoice.id]});
        let session = self.client.call_with("wizard.account.invoice.pay.create", Vec::new(), Some(&extra)).await?;
        let session = session
            .get(0)
            .cloned()
            .ok_or_else(|| AdapterError::Unexpected(format!("pay wizard create answered {session}")))?;
        let paid_on = DateTime::<Utc>::from_timestamp_millis(payment.paid_at).unwrap_or_default().date_naive();
        let start = json!({
            // Move lines hold the currency's digits: the amount as written, trailing zeros off.
            "amount": decimal(payment.amount.value().normalize()),
            "currency": currency,
            "payment_method": method,
            "date": date(paid_on),
            "description": posting.external_reference,
        });
        let outcome = async {
            let answer = self
                .client
                .call_with(
                    "wizard.account.invoice.pay.execute",
                    vec![session.clone(), json!({"start": start}), json!("choice")],
                    Some(&extra),
                )
                .await?;
            // A full payment goes straight through (answers {}); less than what is due stops at
            // the "ask" state, where a partial payment is confirmed; more is an overpayment.
            let asked = answer.pointer("/view/state").and_then(Value::as_str) == Some("ask");
            if asked {
                if payment.amount.value() > invoice.amount_to_pay {
                    return Err(rejected(
                        "overpayment",
                        format!(
                            "{} is more than the {} still due on {invoice_reference}",
                            payment.amount, invoice.amount_to_pay
                        ),
                    ));
                }
                self.client
                    .call_with(
                        "wizard.account.invoice.pay.execute",
                        vec![session.clone(), json!({"ask": {"type": "partial"}}), json!("pay")],
                        Some(&extra),
                    )
                    .await?;
            }
            Ok(())
        }
        .await;
        // The wizard's session is cleaned up whatever happened; a failure to do so is harmless.
        let _ = self.client.call_with("wizard.account.invoice.pay.delete", vec![session], Some(&extra)).await;
        outcome?;
        self.find_payment(posting).await?.ok_or_else(|| {
            AdapterError::Unexpected(format!("payment {} not found after the wizard", posting.external_reference))
        })
    }
}

impl ErpAdapter for TrytonAdapter {
    fn system(&self) -> &'static str {
        "tryton"
    }

    async fn find(&self, posting: &ErpPosting) -> Result<Option<ErpDocument>, AdapterError> {
        if posting.document_type == ErpDocumentType::Payment {
            return self.find_payment(posting).await;
        }
        let Some(invoice) = self.find_invoice(&posting.external_reference).await? else { return Ok(None) };
        if matches!(invoice.state.as_str(), "draft" | "validated") {
            // An earlier attempt created it and stopped before posting it: finish its work.
            self.client.call("account.invoice.post", vec![json!([invoice.id])]).await?;
            return Ok(Some(self.read_invoice(invoice.id).await?.document()));
        }
        Ok(Some(invoice.document()))
    }

    async fn create(&self, posting: &ErpPosting) -> Result<ErpDocument, AdapterError> {
        match posting.document_type {
            ErpDocumentType::Invoice | ErpDocumentType::CreditNote => self.create_invoice(posting).await,
            ErpDocumentType::Payment => self.pay(posting).await,
            ErpDocumentType::Unknown => {
                Err(rejected("validation", "a document type this release does not know".into()))
            }
        }
    }

    async fn health(&self) -> Result<(), AdapterError> {
        self.client.context().await.map(drop).map_err(AdapterError::from)
    }

    fn settle_time(&self) -> Duration {
        self.settle
    }
}
