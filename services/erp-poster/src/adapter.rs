//! The ERP behind erp-poster, as three operations: find a document by its external reference,
//! create (and post) one, and say whether the ERP answers. The service's core never names an
//! ERP; [`crate::tryton`] is the first adapter.
//!
//! What an adapter promises:
//! - `find` is a read, safe to repeat; it reports a document that exists under the reference,
//!   whatever state an interrupted earlier attempt left it in (an adapter may finish such a
//!   document, e.g. post a draft, and report it).
//! - `create` writes at most one document per reference when the ERP enforces uniqueness of the
//!   reference (the backstop against writes still in flight from an attempt the service gave up
//!   on); a second create answers [`AdapterError::Duplicate`].
//! - Errors say what the service may do: [`AdapterError::Rejected`] is permanent (the ERP's
//!   validation refused the document), [`AdapterError::Unavailable`] is transient and says
//!   whether the request may have been applied (`ambiguous`), [`AdapterError::Unexpected`] is an
//!   answer the adapter does not understand (treated as permanent, and alerted on).
//! - [`ErpAdapter::settle_time`]: how long after an ambiguous failure a miss of `find` can be
//!   trusted, derived from the adapter's own timeouts.
//!
//! What other ERPs' adapters would implement:
//! - **NetSuite** (SuiteTalk REST): `find` is a SuiteQL query on `transaction.externalId` (or
//!   `tranId`); `create` POSTs `/record/v1/invoice`, `/creditMemo` (with `createdFrom` naming
//!   the invoice) or `/customerPayment` (with the invoice in `apply`), with `externalId` set to
//!   the reference, which NetSuite keeps unique per record type (a duplicate answers
//!   `DUP_ENTITY`, the backstop); the party is `entity` by `externalId`; HTTP 429 and 5xx are
//!   transient; concurrency limits per account apply (the rate limit here).
//! - **SAP S/4HANA** (OData `API_BILLING_DOCUMENT_SRV` / journal entry APIs): `find` filters on
//!   the document's reference field (`YourReference` or `DocumentReferenceID`); `create` posts a
//!   billing document, a credit memo request referencing the original, and an incoming payment
//!   clearing the receivable; uniqueness of the reference is a duplicate-invoice check
//!   configured in FI; CSRF tokens and 503 during maintenance are transient.
//! - **Microsoft Dynamics 365 Finance** (OData data entities): `find` queries
//!   `FreeTextInvoiceHeaders` / `CustomerPaymentJournalLines` by an external reference field;
//!   `create` inserts the free-text invoice with its lines and posts it, a credit note as a
//!   free-text invoice with negative lines linked to the original, a payment journal line
//!   settling the invoice; throttling answers 429 with `Retry-After`.

use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use tributary_contracts::types::ErpPosting;

/// A document as the ERP has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErpDocument {
    /// The ERP's id, e.g. `account.invoice,42`.
    pub id: String,
    /// Its human-facing number, e.g. `INV/2026/42`, when the ERP gave one.
    pub number: Option<String>,
    /// Its state in the ERP, e.g. `posted`, `paid`.
    pub state: String,
    /// Its total as the ERP computed it.
    pub total: Decimal,
    /// When the ERP created it, if it says.
    pub created_at: Option<DateTime<Utc>>,
}

/// What went wrong, classified for the decision.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdapterError {
    /// The ERP refused the document; retrying cannot help.
    #[error("rejected by the ERP: {message}")]
    Rejected {
        /// A bounded code, e.g. `validation`, `unknown_party`.
        code: &'static str,
        /// The ERP's message.
        message: String,
    },
    /// A document with this reference exists already (the ERP's uniqueness backstop).
    #[error("a document with this reference exists already: {message}")]
    Duplicate {
        /// The ERP's message.
        message: String,
    },
    /// The ERP could not be reached or failed transiently.
    #[error("ERP unavailable ({code}): {message}")]
    Unavailable {
        /// A bounded code, e.g. `timeout`, `connect`, `http_503`.
        code: &'static str,
        /// What failed.
        message: String,
        /// Whether the request may have been applied (a timeout or reset after it was sent).
        ambiguous: bool,
    },
    /// An answer the adapter does not understand: a bug on one side or the other.
    #[error("unexpected answer from the ERP: {0}")]
    Unexpected(String),
}

/// One ERP.
pub trait ErpAdapter: Send + Sync + 'static {
    /// The name in `erp.posting-results` (`erp_system`), e.g. `tryton`.
    fn system(&self) -> &'static str;

    /// The document posted under `posting.external_reference`, if one exists.
    fn find(&self, posting: &ErpPosting) -> impl Future<Output = Result<Option<ErpDocument>, AdapterError>> + Send;

    /// Creates and posts the document of `posting`.
    fn create(&self, posting: &ErpPosting) -> impl Future<Output = Result<ErpDocument, AdapterError>> + Send;

    /// Whether the ERP answers (a cheap read).
    fn health(&self) -> impl Future<Output = Result<(), AdapterError>> + Send;

    /// How long after an ambiguous failure a write may still land: until then a miss of
    /// [`find`](Self::find) is not trusted and nothing is created again.
    fn settle_time(&self) -> Duration;
}
