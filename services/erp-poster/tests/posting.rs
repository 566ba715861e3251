//! erp-poster's logic on the runtime's test driver: each posting in the ERP once, whatever the
//! ERP does (times out after writing, writes late, refuses, goes away), the circuit, the
//! maintenance windows, and the outcome of every path.
//!
//! The ERP here is an in-memory double, scripted per call: only these unit tests use it, to
//! make the ERP fail in ways a test cannot make real Tryton fail on cue. The end-to-end tests
//! post to the real Tryton of the local stack.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use erp_poster::adapter::{AdapterError, ErpAdapter, ErpDocument};
use erp_poster::processor::{PosterMetrics, PosterProcessor};
use erp_poster::settings::Settings;
use prometheus_client::registry::Registry;
use rust_decimal::Decimal;
use tributary_contracts::fixtures::dec;
use tributary_contracts::types::{
    Envelope, ErpDocumentType, ErpPosting, ErpPostingLine, ErpPostingResult, PostingStatus,
};
use tributary_runtime::circuit::Circuit;
use tributary_runtime::testing::{DriverBuilder, Outcome, TestDriver};
use tributary_telemetry::ServiceMetrics;

/// What the next create does.
#[derive(Debug, Clone)]
enum Create {
    /// Writes the document and answers.
    Ok,
    /// Refuses it.
    Reject(&'static str),
    /// Times out; the write lands anyway, after `finds` more lookups (0: at once).
    TimeOut { lands_after_finds: usize },
    /// Never reaches the ERP.
    Refused,
}

#[derive(Debug, Default)]
struct Erp {
    documents: HashMap<String, ErpDocument>,
    script: VecDeque<Create>,
    /// Writes in flight: reference, lookups until it lands.
    landing: Vec<(String, usize)>,
    down: bool,
    creates: usize,
}

/// The in-memory ERP (see the module doc).
#[derive(Debug, Clone, Default)]
struct FakeErp(Arc<Mutex<Erp>>);

fn unavailable(ambiguous: bool) -> AdapterError {
    AdapterError::Unavailable {
        code: if ambiguous { "timeout" } else { "connect" },
        message: "no answer".into(),
        ambiguous,
    }
}

impl FakeErp {
    fn erp(&self) -> std::sync::MutexGuard<'_, Erp> {
        self.0.lock().unwrap()
    }

    fn document(number: usize) -> ErpDocument {
        ErpDocument {
            id: format!("account.invoice,{number}"),
            number: Some(format!("INV/{number}")),
            state: "posted".into(),
            total: Decimal::from(10),
            created_at: None,
        }
    }
}

impl ErpAdapter for FakeErp {
    fn system(&self) -> &'static str {
        "memory"
    }

    async fn find(&self, posting: &ErpPosting) -> Result<Option<ErpDocument>, AdapterError> {
        let mut erp = self.erp();
        if erp.down {
            return Err(unavailable(false));
        }
        let mut landed = Vec::new();
        for (reference, finds) in &mut erp.landing {
            if *finds == 0 {
                landed.push(reference.clone());
            } else {
                *finds -= 1;
            }
        }
        for reference in landed {
            erp.landing.retain(|(r, _)| *r != reference);
            let number = erp.documents.len() + 1;
            erp.documents.insert(reference, Self::document(number));
        }
        Ok(erp.documents.get(&posting.external_reference).cloned())
    }

    async fn create(&self, posting: &ErpPosting) -> Result<ErpDocument, AdapterError> {
        let mut erp = self.erp();
        if erp.down {
            return Err(unavailable(false));
        }
        let reference = posting.external_reference.clone();
        // The uniqueness backstop: a reference once.
        if erp.documents.contains_key(&reference) || erp.landing.iter().any(|(r, _)| *r == reference) {
            return Err(AdapterError::Duplicate { message: "reference is already used".into() });
        }
        erp.creates += 1;
        match erp.script.pop_front().unwrap_or(Create::Ok) {
            Create::Ok => {
                let document = Self::document(erp.documents.len() + 1);
                erp.documents.insert(reference, document.clone());
                Ok(document)
            }
            Create::Reject(message) => Err(AdapterError::Rejected { code: "validation", message: message.into() }),
            Create::TimeOut { lands_after_finds } => {
                erp.landing.push((reference, lands_after_finds));
                Err(unavailable(true))
            }
            Create::Refused => Err(unavailable(false)),
        }
    }

    async fn health(&self) -> Result<(), AdapterError> {
        Ok(())
    }

    fn settle_time(&self) -> Duration {
        Duration::from_secs(60)
    }
}

/// The defaults, with a rate limit no test reaches: the limiter waits on the machine's time,
/// which the driver does not move (the rate limit is measured by the benchmark).
fn settings() -> Settings {
    Settings { rate_per_second: 1_000_000, burst: 1_000_000, ..Settings::default() }
}

struct World {
    erp: FakeErp,
    driver: TestDriver<PosterProcessor<FakeErp>>,
    /// Where the circuit's gauge is registered.
    registry: Registry,
}

fn at(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text).unwrap().to_utc()
}

impl World {
    fn new(settings: Settings) -> Self {
        Self::starting_at(settings, at("2026-12-02T10:00:00Z"))
    }

    fn starting_at(settings: Settings, start: DateTime<Utc>) -> Self {
        let erp = FakeErp::default();
        let mut registry = Registry::default();
        let metrics = ServiceMetrics::register(&mut registry, "erp-poster");
        let circuit =
            Circuit::new("erp", settings.failures_to_open, settings.open_for, Duration::from_secs(60), metrics);
        let processor = PosterProcessor::new(erp.clone(), &settings, circuit, PosterMetrics::default()).unwrap();
        let driver = DriverBuilder::new().service("erp-poster").start_at(start).build(processor);
        Self { erp, driver, registry }
    }

    fn circuit_state(&self) -> String {
        let text = tributary_telemetry::metrics::encode(&self.registry);
        text.lines().find(|l| l.starts_with("tributary_circuit_state{")).unwrap_or_default().to_owned()
    }

    fn posting(&self, account: &str, reference: &str) -> ErpPosting {
        let now = self.driver.now();
        ErpPosting {
            envelope: Envelope::originating("tributary.billing-router", account, now),
            external_reference: reference.into(),
            document_type: ErpDocumentType::Invoice,
            customer_id: format!("cus-{account}"),
            erp_party_ref: format!("C-{account}"),
            currency: "USD".into(),
            document_date: (now.timestamp_millis() / 86_400_000) as i32,
            due_date: None,
            description: Some("Overage".into()),
            lines: vec![ErpPostingLine {
                line_number: 1,
                product_code: None,
                account_code: None,
                description: "api_calls overage".into(),
                quantity: dec("1"),
                unit_price: dec("10"),
                tax_code: None,
                amount: dec("10"),
            }],
            net_amount: dec("10"),
            tax_amount: None,
            total_amount: dec("10"),
            original_document_ref: None,
            payment: None,
            contract_id: None,
            charge_id: None,
            invoice_id: None,
        }
    }

    async fn results(&mut self) -> Vec<ErpPostingResult> {
        self.driver.read().await
    }

    fn documents(&self) -> usize {
        self.erp.erp().documents.len()
    }
}

#[tokio::test]
async fn a_posting_is_created_once_and_its_redelivery_finds_it() {
    let mut world = World::new(settings());
    let posting = world.posting("acct-1", "tributary:charge:chg_1");
    assert_eq!(world.driver.pipe(posting.clone()).await, Outcome::Processed);
    let results = world.results().await;
    assert_eq!(results.len(), 1);
    let result = &results[0];
    assert_eq!((result.status, result.attempts), (PostingStatus::Posted, 1));
    assert_eq!(result.erp_document_id.as_deref(), Some("account.invoice,1"));
    assert_eq!((result.erp_system.as_str(), result.error_code.as_deref()), ("memory", None));
    assert_eq!(result.envelope.causation_id.as_deref(), Some(posting.envelope.event_id.as_str()));

    // The same posting delivered again after a restart that lost the Kafka commit.
    let mut again = posting;
    again.envelope = Envelope::originating("tributary.billing-router", "acct-1", world.driver.now());
    assert_eq!(world.driver.pipe(again).await, Outcome::Processed);
    assert_eq!(world.results().await[0].status, PostingStatus::DuplicateFound);
    assert_eq!((world.documents(), world.erp.erp().creates), (1, 1), "looked up, not created again");
}

#[tokio::test]
async fn a_rejection_is_dead_lettered_with_the_erps_message_and_a_rejected_result() {
    let mut world = World::new(settings());
    world.erp.erp().script.push_back(Create::Reject("No party with code C-acct-1"));
    let outcome = world.driver.pipe(world.posting("acct-1", "tributary:charge:chg_2")).await;
    assert_eq!(outcome, Outcome::DeadLettered("erp_rejected".into()));
    let letters = world.driver.dead_letters();
    assert!(letters[0].letter.message.contains("No party with code C-acct-1"));
    let results = world.results().await;
    assert_eq!(results[0].status, PostingStatus::Rejected);
    assert_eq!(results[0].error_message.as_deref(), Some("No party with code C-acct-1"));
    assert_eq!(results[0].posted_at, None);
}

#[tokio::test]
async fn a_timeout_after_the_write_landed_is_found_by_the_next_attempt_not_written_twice() {
    let mut world = World::new(settings());
    world.erp.erp().script.push_back(Create::TimeOut { lands_after_finds: 0 });
    assert_eq!(world.driver.pipe(world.posting("acct-1", "ref-1")).await, Outcome::Retrying(2));
    world.driver.advance(Duration::from_millis(100)).await;
    let results = world.results().await;
    assert_eq!((results[0].status, results[0].attempts), (PostingStatus::DuplicateFound, 2));
    assert_eq!(world.documents(), 1);
}

#[tokio::test]
async fn after_an_ambiguous_failure_a_miss_is_not_trusted_before_the_settle_time() {
    let mut world = World::new(settings());
    // The write lands only after three more lookups, like Tryton's 15 s late invoice.
    world.erp.erp().script.push_back(Create::TimeOut { lands_after_finds: 3 });
    let posting = world.posting("acct-1", "ref-late");
    let behind = world.posting("acct-1", "ref-behind");
    assert_eq!(world.driver.pipe(posting).await, Outcome::Retrying(2));
    assert_eq!(world.driver.pipe(behind).await, Outcome::Queued, "the account's next document waits");
    let ran = world.driver.advance(Duration::from_millis(100)).await;
    assert_eq!(ran, vec![Outcome::Paused("erp".into())], "found nothing, but the write may still land: wait");
    assert_eq!(world.erp.erp().creates, 1, "not created again");
    world.driver.advance(Duration::from_secs(20)).await; // still settling
    // Settled: one more miss, then the create is refused by the ERP's uniqueness of the
    // reference (the late write holds it), and the next look finds the late write.
    world.driver.advance(Duration::from_secs(60)).await;
    world.driver.advance(Duration::from_secs(1)).await;
    let results = world.results().await;
    assert_eq!(
        results.iter().map(|r| r.status).collect::<Vec<_>>(),
        vec![PostingStatus::DuplicateFound, PostingStatus::Posted]
    );
    assert_eq!((world.documents(), world.erp.erp().creates), (2, 2), "each reference once");
}

#[tokio::test]
async fn an_erp_that_goes_away_opens_the_circuit_and_nothing_is_dead_lettered_however_long() {
    let settings = Settings { failures_to_open: 3, open_for: Duration::from_secs(10), ..settings() };
    let mut world = World::new(settings);
    world.erp.erp().down = true;
    assert_eq!(world.driver.pipe(world.posting("acct-1", "ref-down")).await, Outcome::Retrying(2));
    world.driver.advance(Duration::from_millis(100)).await; // attempt 2
    let ran = world.driver.advance(Duration::from_millis(200)).await; // attempt 3 opens the circuit
    assert_eq!(ran, vec![Outcome::Paused("erp".into())]);
    assert_eq!(world.circuit_state(), r#"tributary_circuit_state{circuit="erp"} 2"#, "open");
    // Ten minutes of outage: probes every 10 s fail, the posting waits without using its budget.
    for _ in 0..60 {
        world.driver.advance(Duration::from_secs(10)).await;
    }
    assert!(world.driver.dead_letters().is_empty(), "an outage is nobody's bad input");
    assert!(world.results().await.is_empty());
    world.erp.erp().down = false;
    world.driver.advance(Duration::from_secs(10)).await;
    let results = world.results().await;
    assert_eq!(results.len(), 1);
    assert_eq!(results[0].status, PostingStatus::Posted);
    assert!(results[0].attempts <= 5, "probes while open do not count as attempts: {}", results[0].attempts);
    assert_eq!(world.circuit_state(), r#"tributary_circuit_state{circuit="erp"} 0"#, "closed again");
}

#[tokio::test]
async fn transient_failures_while_the_erp_answers_others_exhaust_the_budget_into_the_dlq() {
    // The circuit stays closed (a success in between), this posting keeps failing.
    let settings = Settings { failures_to_open: 100, ..settings() };
    let mut world = World::new(settings);
    world.erp.erp().script.extend(std::iter::repeat_n(Create::Refused, 20));
    world.driver.pipe(world.posting("acct-1", "ref-flaky")).await;
    for _ in 0..10 {
        world.driver.advance(Duration::from_secs(5)).await;
    }
    let letters = world.driver.dead_letters();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].letter.class, "erp_unavailable.retries_exhausted");
    let results = world.results().await;
    assert_eq!(results[0].status, PostingStatus::FailedRetryableExhausted);
    assert_eq!(results[0].attempts, 8, "the runtime's budget");
    assert_eq!(results[0].error_code.as_deref(), Some("connect"));
}

#[tokio::test]
async fn a_maintenance_window_on_the_clock_pauses_posting_until_it_ends() {
    let settings = Settings { maintenance_windows: vec!["Sun 01:00-03:00".into()], ..settings() };
    // 2026-12-06 is a Sunday.
    let mut world = World::starting_at(settings, at("2026-12-06T01:30:00Z"));
    assert_eq!(world.driver.pipe(world.posting("acct-1", "ref-window")).await, Outcome::Paused("erp".into()));
    world.driver.advance(Duration::from_secs(3600)).await;
    assert!(world.results().await.is_empty(), "02:30: still in the window");
    assert_eq!(world.erp.erp().creates, 0, "the ERP is not called during its maintenance");
    world.driver.advance_to(at("2026-12-06T03:00:05Z")).await;
    assert_eq!(world.results().await[0].status, PostingStatus::Posted);
}
