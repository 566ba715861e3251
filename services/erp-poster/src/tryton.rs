//! A client of Tryton's JSON-RPC, the first ERP adapter of erp-poster.
//!
//! Tryton is a real open-source ERP; the local stack runs it (deploy/local/tryton/README.md
//! records the protocol as checked against trytond 8.2). Every call is
//! `POST /<db>/rpc/ {"id", "method": "model.<model>.<method>", "params": [..., context]}` with
//! `Authorization: Session base64(user:uid:token)`. Records are looked up by name or code,
//! never by id, so the client works against any Tryton set up with the same master data.
//!
//! Posting is idempotent by the external reference: [`TrytonClient::post_customer_invoice`]
//! looks the reference up before it creates anything, and posts a draft it finds instead of
//! creating a second one; this is what makes a retry after an ambiguous failure safe.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine as _;
use chrono::{Datelike, NaiveDate};
use rust_decimal::Decimal;
use serde_json::{Value, json};
use tokio::sync::RwLock;

/// How long one RPC may take; Tryton's own request timeout is 60 s.
const RPC_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors talking to Tryton, classified for the retry decision.
#[derive(Debug, thiserror::Error)]
pub enum TrytonError {
    /// The server could not be reached or timed out: the outcome is unknown; retry after
    /// looking the document up.
    #[error("tryton unreachable: {0}")]
    Transport(String),
    /// The server answered with an HTTP error status.
    #[error("tryton answered HTTP {status} to {method}")]
    Http {
        /// The status code.
        status: u16,
        /// The RPC method.
        method: String,
    },
    /// A business rule refused the call (UserError / UserWarning): retrying cannot help.
    #[error("tryton refused {method}: {kind}: {message}")]
    Refused {
        /// The RPC method.
        method: String,
        /// The exception class, e.g. `UserError`.
        kind: String,
        /// Its message.
        message: String,
    },
    /// The answer did not have the expected shape, or master data is missing.
    #[error("unexpected answer from tryton: {0}")]
    Protocol(String),
}

impl TrytonError {
    /// Whether the same call may succeed later.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Transport(_) | Self::Http { status: 429 | 500..=599, .. })
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
}

impl std::fmt::Debug for TrytonConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrytonConfig")
            .field("url", &self.url)
            .field("database", &self.database)
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

#[derive(Debug, Default)]
struct Session {
    authorization: Option<String>,
    context: Value,
}

/// A logged-in JSON-RPC client.
#[derive(Debug)]
pub struct TrytonClient {
    config: TrytonConfig,
    http: reqwest::Client,
    rpc_url: String,
    session: RwLock<Session>,
    next_id: AtomicU64,
}

/// A customer invoice to post.
#[derive(Debug, Clone)]
pub struct InvoiceDraft {
    /// The external idempotency key, stored in the invoice's `reference`.
    pub reference: String,
    /// The customer party's name (created if it does not exist).
    pub party_name: String,
    /// ISO-4217 currency code.
    pub currency: String,
    /// The invoice date.
    pub invoice_date: NaiveDate,
    /// A description shown on the invoice.
    pub description: String,
    /// Lines.
    pub lines: Vec<InvoiceLine>,
}

/// One invoice line.
#[derive(Debug, Clone)]
pub struct InvoiceLine {
    /// Product code, e.g. `USAGE-OVERAGE`.
    pub product_code: String,
    /// Line description.
    pub description: String,
    /// Quantity.
    pub quantity: Decimal,
    /// Unit price (Tryton keeps 4 decimals).
    pub unit_price: Decimal,
}

/// An invoice as Tryton has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvoiceSummary {
    /// Tryton's id.
    pub id: i64,
    /// The number given at posting, e.g. `INV/2026/3`.
    pub number: Option<String>,
    /// `draft`, `validated`, `posted`, `paid`, `cancelled`.
    pub state: String,
    /// Total with taxes.
    pub total_amount: Decimal,
    /// The external reference.
    pub reference: Option<String>,
}

/// The outcome of an idempotent post.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PostOutcome {
    /// Created and posted now.
    Posted(InvoiceSummary),
    /// An invoice with this reference was already posted; nothing was created.
    AlreadyPosted(InvoiceSummary),
}

impl TrytonClient {
    /// Logs in and loads the user's preferences, the context every call carries.
    pub async fn connect(config: TrytonConfig) -> Result<Self> {
        let rpc_url = format!("{}/{}/rpc/", config.url.trim_end_matches('/'), config.database);
        let http = reqwest::Client::builder()
            .timeout(RPC_TIMEOUT)
            .build()
            .map_err(|e| TrytonError::Transport(e.to_string()))?;
        let client = Self { config, http, rpc_url, session: RwLock::default(), next_id: AtomicU64::new(1) };
        client.login().await?;
        Ok(client)
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
        let response = request.send().await.map_err(|e| TrytonError::Transport(e.to_string()))?;
        let status = response.status();
        if !status.is_success() {
            return Err(TrytonError::Http { status: status.as_u16(), method: method.to_owned() });
        }
        let mut answer: Value = response.json().await.map_err(|e| TrytonError::Protocol(e.to_string()))?;
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

    /// Calls `model.<model_method>` with `args`; the context is appended. A session that
    /// expired (HTTP 401) is renewed once.
    pub async fn call(&self, model_method: &str, args: Vec<Value>) -> Result<Value> {
        let method = format!("model.{model_method}");
        for attempt in 0..2 {
            let (authorization, context) = {
                let session = self.session.read().await;
                (session.authorization.clone(), session.context.clone())
            };
            let mut params = args.clone();
            params.push(context);
            match self.post(&method, Value::Array(params), authorization.as_deref()).await {
                Err(TrytonError::Http { status: 401, .. }) if attempt == 0 => self.login().await?,
                other => return other,
            }
        }
        unreachable!("the loop returns on its second attempt")
    }

    /// The id of the single record of `model` matching `domain`.
    pub async fn find_one(&self, model: &str, domain: Value) -> Result<i64> {
        let ids = self.call(&format!("{model}.search"), vec![domain.clone(), json!(0), json!(2), Value::Null]).await?;
        match ids.as_array().map(Vec::as_slice) {
            Some([id]) => id.as_i64().ok_or_else(|| TrytonError::Protocol(format!("{model} id {id}"))),
            other => Err(TrytonError::Protocol(format!(
                "expected one {model} matching {domain}, found {}; is the ERP's master data set up?",
                other.map_or(0, <[Value]>::len)
            ))),
        }
    }

    async fn read(&self, model: &str, ids: &[i64], fields: &[&str]) -> Result<Vec<Value>> {
        let answer = self.call(&format!("{model}.read"), vec![json!(ids), json!(fields)]).await?;
        answer.as_array().cloned().ok_or_else(|| TrytonError::Protocol(format!("{model}.read answered {answer}")))
    }

    /// Finds the customer invoice whose reference is `reference`.
    pub async fn find_invoice(&self, reference: &str) -> Result<Option<InvoiceSummary>> {
        let ids = self
            .call(
                "account.invoice.search",
                vec![json!([["reference", "=", reference], ["type", "=", "out"]]), json!(0), Value::Null, Value::Null],
            )
            .await?;
        match ids.as_array().and_then(|ids| ids.first()).and_then(Value::as_i64) {
            Some(id) => self.read_invoice(id).await.map(Some),
            None => Ok(None),
        }
    }

    /// Reads an invoice.
    pub async fn read_invoice(&self, id: i64) -> Result<InvoiceSummary> {
        let rows = self.read("account.invoice", &[id], &["id", "number", "state", "total_amount", "reference"]).await?;
        let row = rows.first().ok_or_else(|| TrytonError::Protocol(format!("invoice {id} not found")))?;
        Ok(InvoiceSummary {
            id,
            number: row["number"].as_str().map(str::to_owned),
            state: row["state"].as_str().unwrap_or_default().to_owned(),
            total_amount: read_decimal(&row["total_amount"]).unwrap_or_default(),
            reference: row["reference"].as_str().map(str::to_owned),
        })
    }

    /// The party named `name`, created with a default address if it does not exist.
    pub async fn ensure_party(&self, name: &str) -> Result<i64> {
        let ids = self
            .call("party.party.search", vec![json!([["name", "=", name]]), json!(0), json!(1), Value::Null])
            .await?;
        if let Some(id) = ids.as_array().and_then(|ids| ids.first()).and_then(Value::as_i64) {
            return Ok(id);
        }
        let created =
            self.call("party.party.create", vec![json!([{"name": name, "addresses": [["create", [{}]]]}])]).await?;
        created
            .get(0)
            .and_then(Value::as_i64)
            .ok_or_else(|| TrytonError::Protocol(format!("party.party.create answered {created}")))
    }

    /// Posts `draft` exactly once per reference: finds it first, posts a draft left by an
    /// interrupted earlier attempt, and creates it only when it does not exist.
    pub async fn post_customer_invoice(&self, draft: &InvoiceDraft) -> Result<PostOutcome> {
        if let Some(existing) = self.find_invoice(&draft.reference).await? {
            return match existing.state.as_str() {
                "draft" | "validated" => {
                    self.call("account.invoice.post", vec![json!([existing.id])]).await?;
                    Ok(PostOutcome::Posted(self.read_invoice(existing.id).await?))
                }
                _ => Ok(PostOutcome::AlreadyPosted(existing)),
            };
        }
        let id = self.create_invoice(draft).await?;
        self.call("account.invoice.post", vec![json!([id])]).await?;
        Ok(PostOutcome::Posted(self.read_invoice(id).await?))
    }

    async fn create_invoice(&self, draft: &InvoiceDraft) -> Result<i64> {
        let company = self.session.read().await.context.get("company").cloned().unwrap_or(Value::Null);
        let currency = self.find_one("currency.currency", json!([["code", "=", draft.currency]])).await?;
        let journal = self.find_one("account.journal", json!([["type", "=", "revenue"]])).await?;
        let payment_term = self.find_one("account.invoice.payment_term", json!([["name", "=", "Net 30"]])).await?;
        let party_id = self.ensure_party(&draft.party_name).await?;
        let party = self.read("party.party", &[party_id], &["addresses", "account_receivable"]).await?;
        let party = party.first().ok_or_else(|| TrytonError::Protocol("party vanished".into()))?;
        let receivable = match party["account_receivable"].as_i64() {
            Some(account) => account,
            None => {
                let config = self.read("account.configuration", &[1], &["default_account_receivable"]).await?;
                config.first().and_then(|c| c["default_account_receivable"].as_i64()).ok_or_else(|| {
                    TrytonError::Protocol("no default receivable account in account.configuration".into())
                })?
            }
        };
        let address = party["addresses"].get(0).cloned().unwrap_or(Value::Null);

        let mut lines = Vec::with_capacity(draft.lines.len());
        for line in &draft.lines {
            let product = self.find_one("product.product", json!([["code", "=", line.product_code]])).await?;
            let rows =
                self.read("product.product", &[product], &["default_uom", "account_category.account_revenue"]).await?;
            let row = rows.first().ok_or_else(|| TrytonError::Protocol("product vanished".into()))?;
            // Tryton answers a dotted field under the key of its first part plus a dot.
            let revenue = row["account_category."]["account_revenue"].clone();
            lines.push(json!({
                "type": "line",
                "product": product,
                "unit": row["default_uom"],
                "account": revenue,
                "description": line.description,
                "quantity": line.quantity.to_string().parse::<f64>().unwrap_or_default(),
                "unit_price": decimal(line.unit_price),
            }));
        }
        let values = json!([{
            "type": "out",
            "company": company,
            "party": party_id,
            "invoice_address": address,
            "currency": currency,
            "journal": journal,
            "account": receivable,
            "payment_term": payment_term,
            "invoice_date": date(draft.invoice_date),
            "reference": draft.reference,
            "description": draft.description,
            "lines": [["create", lines]],
        }]);
        let created = self.call("account.invoice.create", vec![values]).await?;
        created
            .get(0)
            .and_then(Value::as_i64)
            .ok_or_else(|| TrytonError::Protocol(format!("account.invoice.create answered {created}")))
    }
}
