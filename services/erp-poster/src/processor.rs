//! The erp-poster logic: each `erp.postings` document into the ERP exactly once, and its
//! outcome on `erp.posting-results`.
//!
//! One posting, the steps in order:
//! 1. [`gate`](PosterProcessor::gate): in a maintenance window, or with the circuit open,
//!    nothing is called: the partition pauses (the runtime offers the record again later).
//! 2. [`throttle`](PosterProcessor::throttle): the rate limit and the bound on calls in flight.
//! 3. [`post`](PosterProcessor::post): look the reference up first, every attempt: a document
//!    found is reported DUPLICATE_FOUND (a redelivery, a restart between the ERP call and the
//!    Kafka commit). After an ambiguous failure of this process (a timeout, a reset after the
//!    request was sent), a miss is not trusted before the adapter's settle time has passed,
//!    since the write may still land; then the document is created. The ERP's uniqueness of
//!    the reference is the backstop: a second create answers Duplicate and is reported
//!    DUPLICATE_FOUND. One writer per reference: a reference belongs to one account, an
//!    account to one partition, and a partition has one posting in flight.
//! 4. The outcome: POSTED or DUPLICATE_FOUND with the ERP's document id and number; REJECTED
//!    (the ERP's validation) and FAILED_RETRYABLE_EXHAUSTED (the retry budget ran out) go to
//!    `erp-poster.dlq` with the result written beside the dead letter. Transient failures while
//!    the circuit is closed use up the budget; once it opens, postings wait without using it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use tributary_contracts::topics;
use tributary_contracts::types::{Envelope, ErpPosting, ErpPostingResult, PostingStatus};
use tributary_runtime::{Context, Output, ProcessError};

use crate::adapter::{AdapterError, ErpAdapter, ErpDocument};
use crate::maintenance::Windows;
use crate::settings::Settings;
use tributary_runtime::circuit::Circuit;

/// The `source` of every record erp-poster writes.
pub const SOURCE: &str = "tributary.erp-poster";
/// The downstream named when the partition pauses.
const DOWNSTREAM: &str = "erp";
/// How soon a posting refused as a duplicate of a write not visible yet looks again.
const DUPLICATE_RECHECK: Duration = Duration::from_secs(1);

/// Labels of an outcome.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    /// POSTED, DUPLICATE_FOUND, REJECTED, FAILED_RETRYABLE_EXHAUSTED.
    pub status: String,
}

/// Labels of an ERP call.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    /// `find` or `create`.
    pub operation: String,
    /// `ok` or the error's kind.
    pub outcome: String,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

fn delay() -> Histogram {
    // From a second to about 9 hours: a posting waits out outages and maintenance windows.
    Histogram::new(exponential_buckets(1.0, 2.0, 16))
}

/// erp-poster's own metrics, beside the runtime's (whose `tributary_circuit_state{circuit="erp"}`
/// and retries it also feeds).
#[derive(Debug, Clone)]
pub struct PosterMetrics {
    /// Outcomes by status.
    pub documents: Family<StatusLabels, Counter>,
    /// ERP calls by operation and outcome.
    pub calls: Histograms<CallLabels>,
    /// From the posting request's `occurred_at` to the document in the ERP.
    pub request_to_posted: Histogram,
    /// Attempts that waited (maintenance window, open circuit, settle time).
    pub paused: Family<StatusLabels, Counter>,
}

impl Default for PosterMetrics {
    fn default() -> Self {
        Self {
            documents: Family::default(),
            calls: Family::new_with_constructor(latency),
            request_to_posted: delay(),
            paused: Family::default(),
        }
    }
}

/// The erp-poster processor over an ERP adapter.
pub struct PosterProcessor<A> {
    adapter: A,
    circuit: Circuit,
    windows: Windows,
    maintenance_recheck: Duration,
    limiter: DefaultDirectRateLimiter,
    in_flight: tokio::sync::Semaphore,
    /// References whose create failed ambiguously in this process, and when (runtime clock).
    ambiguous: Mutex<HashMap<String, DateTime<Utc>>>,
    metrics: PosterMetrics,
}

impl<A> std::fmt::Debug for PosterProcessor<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PosterProcessor").field("windows", &self.windows).finish_non_exhaustive()
    }
}

fn symbol(status: PostingStatus) -> &'static str {
    match status {
        PostingStatus::Posted => "POSTED",
        PostingStatus::DuplicateFound => "DUPLICATE_FOUND",
        PostingStatus::Rejected => "REJECTED",
        PostingStatus::FailedRetryableExhausted => "FAILED_RETRYABLE_EXHAUSTED",
        PostingStatus::Unknown => "UNKNOWN",
    }
}

impl<A: ErpAdapter> PosterProcessor<A> {
    /// A processor posting through `adapter`.
    pub fn new(adapter: A, settings: &Settings, circuit: Circuit, metrics: PosterMetrics) -> Result<Self, Vec<String>> {
        let rate = std::num::NonZeroU32::new(settings.rate_per_second)
            .ok_or_else(|| vec!["rate_per_second is 0".to_owned()])?;
        let burst = std::num::NonZeroU32::new(settings.burst).ok_or_else(|| vec!["burst is 0".to_owned()])?;
        Ok(Self {
            adapter,
            circuit,
            windows: Windows::parse(&settings.maintenance_windows)?,
            maintenance_recheck: settings.maintenance_recheck,
            limiter: RateLimiter::direct(Quota::per_second(rate).allow_burst(burst)),
            in_flight: tokio::sync::Semaphore::new(settings.max_in_flight),
            ambiguous: Mutex::new(HashMap::new()),
            metrics,
        })
    }

    fn pause(&self, why: &str, retry_after: Duration, message: String) -> ProcessError {
        self.metrics.paused.get_or_create(&StatusLabels { status: why.to_owned() }).inc();
        ProcessError::Unavailable { downstream: DOWNSTREAM, retry_after, message }
    }

    /// Step 1: nothing is called during a maintenance window or while the circuit is open.
    fn gate(&self, context: &Context<'_>) -> Result<(), ProcessError> {
        let now = context.now();
        if let Some((window, ends)) = self.windows.current(now) {
            // Looked at again every few seconds: the window's end is on the runtime's clock,
            // which may move faster than the machine's.
            let remaining = (ends - now).to_std().unwrap_or_default();
            let message = format!("maintenance window {window} until {}", ends.to_rfc3339());
            return Err(self.pause("maintenance_window", remaining.min(self.maintenance_recheck), message));
        }
        self.circuit
            .permit(now)
            .map_err(|wait| self.pause("circuit_open", wait, format!("the ERP circuit is open for {wait:?} more")))
    }

    /// Step 2: the rate limit, then a slot among the calls in flight.
    async fn throttle(&self) -> tokio::sync::SemaphorePermit<'_> {
        self.limiter.until_ready().await;
        self.in_flight.acquire().await.expect("the semaphore is never closed")
    }

    async fn timed<T>(
        &self,
        now: DateTime<Utc>,
        operation: &str,
        call: impl std::future::Future<Output = Result<T, AdapterError>>,
    ) -> Result<T, AdapterError> {
        let started = Instant::now();
        let outcome = call.await;
        let kind = match &outcome {
            Ok(_) => "ok",
            Err(AdapterError::Rejected { .. }) => "rejected",
            Err(AdapterError::Duplicate { .. }) => "duplicate",
            Err(AdapterError::Unavailable { .. }) => "unavailable",
            Err(AdapterError::Unexpected(_)) => "unexpected",
        };
        let labels = CallLabels { operation: operation.to_owned(), outcome: kind.to_owned() };
        self.metrics.calls.get_or_create(&labels).observe(started.elapsed().as_secs_f64());
        match &outcome {
            Err(AdapterError::Unavailable { .. }) => {
                self.circuit.failure(now);
            }
            _ => self.circuit.success(),
        }
        outcome
    }

    fn settle_remaining(&self, reference: &str, now: DateTime<Utc>) -> Option<Duration> {
        let ambiguous = self.ambiguous.lock().expect("ambiguity lock");
        let elapsed = (now - *ambiguous.get(reference)?).to_std().unwrap_or_default();
        self.adapter.settle_time().checked_sub(elapsed).filter(|remaining| !remaining.is_zero())
    }

    fn settled(&self, reference: &str) {
        self.ambiguous.lock().expect("ambiguity lock").remove(reference);
    }

    /// Step 3: find, else create; returns the document and whether this attempt created it.
    async fn post(
        &self,
        posting: &ErpPosting,
        now: DateTime<Utc>,
    ) -> Result<(ErpDocument, PostingStatus), AdapterError> {
        let reference = &posting.external_reference;
        if let Some(found) = self.timed(now, "find", self.adapter.find(posting)).await? {
            self.settled(reference);
            return Ok((found, PostingStatus::DuplicateFound));
        }
        if let Some(remaining) = self.settle_remaining(reference, now) {
            return Err(AdapterError::Unavailable {
                code: "settling",
                message: format!(
                    "an earlier write of {reference} may still land; waiting {remaining:?} before creating it again"
                ),
                ambiguous: false,
            });
        }
        match self.timed(now, "create", self.adapter.create(posting)).await {
            Ok(created) => {
                self.settled(reference);
                Ok((created, PostingStatus::Posted))
            }
            Err(AdapterError::Duplicate { message }) => {
                // Another write of the reference landed first: report that document. It may not
                // be visible yet (its transaction commits as ours is refused): look again soon.
                match self.timed(now, "find", self.adapter.find(posting)).await? {
                    Some(found) => Ok((found, PostingStatus::DuplicateFound)),
                    None => Err(AdapterError::Unavailable {
                        code: "duplicate_not_visible",
                        message: format!(
                            "the ERP refused {reference} as a duplicate of a write not visible yet: {message}"
                        ),
                        ambiguous: false,
                    }),
                }
            }
            Err(error @ AdapterError::Unavailable { ambiguous: true, .. }) => {
                self.ambiguous.lock().expect("ambiguity lock").insert(reference.clone(), now);
                Err(error)
            }
            Err(error) => Err(error),
        }
    }

    fn result(
        &self,
        context: &Context<'_>,
        posting: &ErpPosting,
        status: PostingStatus,
        document: Option<&ErpDocument>,
        error: Option<(&str, String)>,
    ) -> ErpPostingResult {
        let now = context.now();
        let attempt = context.attempt();
        let posted = matches!(status, PostingStatus::Posted | PostingStatus::DuplicateFound);
        ErpPostingResult {
            envelope: Envelope::caused_by(&posting.envelope, SOURCE, "result", now),
            external_reference: posting.external_reference.clone(),
            document_type: posting.document_type,
            status,
            erp_system: self.adapter.system().to_owned(),
            erp_document_id: document.map(|d| d.id.clone()),
            erp_document_number: document.and_then(|d| d.number.clone()),
            attempts: attempt.number as i32,
            first_attempt_at: attempt.first_at.timestamp_millis(),
            posted_at: posted.then(|| document.and_then(|d| d.created_at).unwrap_or(now).timestamp_millis()),
            error_code: error.as_ref().map(|(code, _)| (*code).to_owned()),
            error_message: error.map(|(_, message)| message),
        }
    }

    fn counted(&self, status: PostingStatus) {
        self.metrics.documents.get_or_create(&StatusLabels { status: symbol(status).to_owned() }).inc();
    }

    /// One posting, the steps of the module doc.
    pub async fn handle(&self, context: &mut Context<'_>, posting: &ErpPosting) -> Result<(), ProcessError> {
        self.gate(context)?;
        let now = context.now();
        let outcome = {
            let _permit = self.throttle().await;
            self.post(posting, now).await
        };
        let account = posting.envelope.account_id.clone();
        match outcome {
            Ok((document, status)) => {
                let waited = Utc::now().timestamp_millis() - posting.envelope.occurred_at;
                self.metrics.request_to_posted.observe(waited.max(0) as f64 / 1000.0);
                self.counted(status);
                tracing::info!(
                    reference = posting.external_reference,
                    status = symbol(status),
                    document = document.id,
                    "posted"
                );
                let result = self.result(context, posting, status, Some(&document), None);
                context.emit(Output::new(account, result));
                Ok(())
            }
            Err(AdapterError::Rejected { code, message }) => {
                self.counted(PostingStatus::Rejected);
                let result =
                    self.result(context, posting, PostingStatus::Rejected, None, Some((code, message.clone())));
                context.emit_if_dead_lettered(Output::new(account, result));
                Err(ProcessError::permanent("erp_rejected", message))
            }
            Err(AdapterError::Unexpected(message)) => {
                self.counted(PostingStatus::Rejected);
                let result = self.result(
                    context,
                    posting,
                    PostingStatus::Rejected,
                    None,
                    Some(("unexpected_answer", message.clone())),
                );
                context.emit_if_dead_lettered(Output::new(account, result));
                Err(ProcessError::permanent("erp_unexpected_answer", message))
            }
            Err(AdapterError::Duplicate { message }) => {
                Err(ProcessError::internal("erp_duplicate", format!("a duplicate outside create: {message}")))
            }
            Err(AdapterError::Unavailable { code: "duplicate_not_visible", message, .. }) => {
                Err(self.pause("settling", DUPLICATE_RECHECK, message))
            }
            Err(AdapterError::Unavailable { code: "settling", message, .. }) => {
                let wait = self.settle_remaining(&posting.external_reference, now).unwrap_or_default();
                Err(self.pause("settling", wait.max(Duration::from_millis(100)), message))
            }
            Err(AdapterError::Unavailable { code, message, .. }) => {
                // While the circuit is open the posting waits without using up its retries.
                if let Err(wait) = self.circuit.permit(now) {
                    return Err(self.pause("circuit_open", wait, format!("{code}: {message}")));
                }
                let result = self.result(
                    context,
                    posting,
                    PostingStatus::FailedRetryableExhausted,
                    None,
                    Some((code, message.clone())),
                );
                context.emit_if_dead_lettered(Output::new(account, result));
                Err(ProcessError::retryable("erp_unavailable", format!("{code}: {message}")))
            }
        }
    }
}

impl<A: ErpAdapter> tributary_runtime::Processor for PosterProcessor<A> {
    type Input = ErpPosting;

    fn outputs(&self) -> Vec<&'static str> {
        vec![topics::ERP_POSTING_RESULTS]
    }

    async fn process(&self, context: &mut Context<'_>, posting: &ErpPosting) -> Result<(), ProcessError> {
        self.handle(context, posting).await
    }
}
