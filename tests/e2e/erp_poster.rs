//! erp-poster on the real stack, posting to the real Tryton: one document per posting request
//! with its lines and totals, redeliveries and SIGKILLs that never create a second one, Tryton
//! stopped for a minute without a dead letter, refusals with Tryton's message, and a
//! maintenance window on the controlled clock. Every test ends with the ledger check: what
//! Tryton holds for the test's references sums to what was asked.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{DateTime, Datelike, TimeZone, Utc};
use erp_poster::adapter::ErpAdapter;
use erp_poster::settings::TrytonSettings;
use erp_poster::tryton::{TrytonAdapter, read_decimal};
use erp_poster::{App, NAME, Settings};
use rand::Rng as _;
use rust_decimal::Decimal;
use serde_json::json;
use tokio::process::Command;
use tributary_contracts::codec::Codec;
use tributary_contracts::topics;
use tributary_contracts::types::{ErpPosting, ErpPostingResult, PostingStatus};
use tributary_runtime::ServiceConfig;
use tributary_runtime::clock::ClockMode;
use tributary_runtime::dlq;
use tributary_runtime::service::RunningService;
use tributary_tests::kafka::{Read, codec, produce, producer, read_to_end, trickle};
use tributary_tests::{Stack, eventually, stack, unique_name, workspace_binary};

use crate::tryton_erp::{adapter, invoice_posting, party};

/// One test's isolated world: topics under a unique prefix, its own group, its own parties.
struct Poster {
    stack: &'static Stack,
    prefix: String,
    group: String,
    codec: Codec,
    adapter: TrytonAdapter,
}

impl Poster {
    fn new() -> Self {
        let stack = stack();
        let prefix = format!("{}.", unique_name("ep"));
        Self { stack, codec: codec(stack, &prefix), group: unique_name("erp-poster"), prefix, adapter: adapter() }
    }

    fn settings(&self) -> Settings {
        Settings {
            tryton: TrytonSettings {
                url: self.stack.tryton_url.clone(),
                database: self.stack.tryton_db.clone(),
                user: self.stack.tryton_user.clone(),
                password: Some(self.stack.tryton_password.clone()),
                rpc_timeout: Duration::from_secs(10),
                ..TrytonSettings::default()
            },
            rate_per_second: 20,
            burst: 20,
            open_for: Duration::from_secs(5),
            ..Settings::default()
        }
    }

    fn config(&self, settings: Settings) -> ServiceConfig<Settings> {
        let mut config = self.stack.service_config::<Settings>("erp-poster");
        config.kafka.group_id = Some(self.group.clone());
        config.kafka.transactional_id_prefix = Some(self.group.clone());
        config.kafka.topic_prefix = self.prefix.clone();
        config.runtime.instance_id = "ep-0".into();
        config.service = settings;
        config
    }

    async fn start(&self, config: ServiceConfig<Settings>) -> RunningService {
        tributary_tests::spawn_ready::<App>(config).await
    }

    fn topic(&self, topic: &str) -> String {
        format!("{}{topic}", self.prefix)
    }

    async fn produce(&self, postings: &[ErpPosting]) {
        produce(&producer(self.stack), &self.codec, &self.topic(topics::ERP_POSTINGS), postings).await;
    }

    async fn results(&self) -> Vec<ErpPostingResult> {
        let records: Vec<Read<ErpPostingResult>> =
            read_to_end(self.stack, &self.codec, &self.topic(topics::ERP_POSTING_RESULTS)).await;
        records.into_iter().map(|r| r.value.expect("every result decodes")).collect()
    }

    async fn wait_for_results(&self, count: usize, timeout: Duration) -> Vec<ErpPostingResult> {
        eventually(timeout, &format!("{count} posting results"), || async {
            let results = self.results().await;
            (results.len() >= count).then_some(results)
        })
        .await
    }

    /// `count` invoice postings for `accounts`' parties, 10.00 + n cents each.
    fn postings(&self, parties: &[String], count: usize) -> Vec<ErpPosting> {
        (0..count)
            .map(|n| {
                let party = &parties[n % parties.len()];
                let amount = format!("{}.{:02}", 10 + n / 100, n % 100);
                let mut posting =
                    invoice_posting(party, &format!("tributary:charge:{}", unique_name("chg")), &[("1", &amount)]);
                posting.envelope.account_id = party.trim_start_matches("C-").to_owned();
                posting
            })
            .collect()
    }

    async fn parties(&self, count: usize) -> Vec<String> {
        let mut parties = Vec::with_capacity(count);
        for _ in 0..count {
            parties.push(party(&self.adapter, &unique_name("acct")).await);
        }
        parties
    }

    /// The ledger check: per reference, Tryton holds exactly one document, and the documents
    /// sum to what the postings asked for.
    async fn ledger_check(&self, postings: &[ErpPosting]) {
        let references: Vec<&str> = postings.iter().map(|p| p.external_reference.as_str()).collect();
        let ids = self
            .adapter
            .client()
            .search("account.invoice", json!([["reference", "in", references]]), None)
            .await
            .unwrap();
        let rows =
            self.adapter.client().read("account.invoice", &ids, &["reference", "total_amount", "state"]).await.unwrap();
        let mut per_reference: BTreeMap<String, usize> = BTreeMap::new();
        let mut posted = Decimal::ZERO;
        for row in &rows {
            *per_reference.entry(row["reference"].as_str().unwrap().to_owned()).or_default() += 1;
            posted += read_decimal(&row["total_amount"]).unwrap();
            assert_eq!(row["state"], "posted", "{row}");
        }
        let doubled: Vec<_> = per_reference.iter().filter(|(_, n)| **n > 1).collect();
        assert!(doubled.is_empty(), "documents created twice in Tryton: {doubled:?}");
        assert_eq!(per_reference.len(), postings.len(), "one document per posting request");
        let asked: Decimal = postings.iter().map(|p| p.total_amount.value()).sum();
        assert_eq!(posted, asked, "the ledger: the documents in Tryton sum to the posting requests");
    }
}

fn one_result_each(results: &[ErpPostingResult], postings: &[ErpPosting]) {
    let mut seen = BTreeSet::new();
    for result in results {
        assert!(seen.insert(result.external_reference.clone()), "two results for {}", result.external_reference);
        assert!(matches!(result.status, PostingStatus::Posted | PostingStatus::DuplicateFound), "{result:?}");
    }
    let expected: BTreeSet<String> = postings.iter().map(|p| p.external_reference.clone()).collect();
    assert_eq!(seen, expected, "exactly one result per posting request");
}

#[tokio::test]
async fn a_posting_creates_one_posted_invoice_with_its_lines_and_reports_its_number() {
    let _tryton = tributary_tests::tryton_shared().await;
    let world = Poster::new();
    let parties = world.parties(1).await;
    let mut posting = invoice_posting(
        &parties[0],
        &format!("tributary:charge:{}", unique_name("chg")),
        &[("1", "187.50"), ("3", "4.25")],
    );
    posting.envelope.account_id = "acct-lines".into();
    // The same record again (a redelivery), then another posting of the account: by the time the
    // latter's result is in, the redelivery has been read (one partition, in order).
    let mut marker = invoice_posting(&parties[0], &format!("tributary:charge:{}", unique_name("chg")), &[("1", "1")]);
    marker.envelope.account_id = posting.envelope.account_id.clone();
    let service = world.start(world.config(world.settings())).await;
    world.produce(&[posting.clone(), posting.clone(), marker.clone()]).await;
    let results = world.wait_for_results(2, Duration::from_secs(60)).await;
    service.stop().await.expect("clean stop");

    assert_eq!(world.results().await.len(), 2, "{results:?}");
    let result = results.iter().find(|r| r.external_reference == posting.external_reference).unwrap();
    assert_eq!(result.status, PostingStatus::Posted);
    assert_eq!(result.erp_system, "tryton");
    let invoice = world.adapter.find(&posting).await.unwrap().expect("the invoice in Tryton");
    assert_eq!(result.erp_document_id.as_deref(), Some(invoice.id.as_str()));
    assert_eq!(result.erp_document_number, invoice.number);
    assert_eq!(invoice.total, Decimal::new(20025, 2), "187.50 + 3 × 4.25");
    world.ledger_check(&[posting, marker]).await;
}

#[tokio::test]
async fn a_posting_tryton_refuses_is_rejected_with_its_message_and_dead_lettered() {
    let _tryton = tributary_tests::tryton_shared().await;
    let world = Poster::new();
    let parties = world.parties(1).await;
    let unknown =
        invoice_posting("C-never-heard-of", &format!("tributary:charge:{}", unique_name("chg")), &[("1", "5")]);
    let mut long_ago = invoice_posting(&parties[0], &format!("tributary:charge:{}", unique_name("chg")), &[("1", "5")]);
    long_ago.document_date = 0; // no fiscal year in Tryton for 1970
    let good = invoice_posting(&parties[0], &format!("tributary:charge:{}", unique_name("chg")), &[("1", "5")]);
    let service = world.start(world.config(world.settings())).await;
    world.produce(&[unknown.clone(), long_ago.clone(), good.clone()]).await;
    let results = world.wait_for_results(3, Duration::from_secs(60)).await;
    let letters = dlq::list(&world.config(world.settings()).kafka, NAME).await.unwrap();
    service.stop().await.expect("clean stop");

    let by_reference: BTreeMap<&str, &ErpPostingResult> =
        results.iter().map(|r| (r.external_reference.as_str(), r)).collect();
    let refused = by_reference[unknown.external_reference.as_str()];
    assert_eq!((refused.status, refused.error_code.as_deref()), (PostingStatus::Rejected, Some("unknown_party")));
    let invalid = by_reference[long_ago.external_reference.as_str()];
    assert_eq!((invalid.status, invalid.error_code.as_deref()), (PostingStatus::Rejected, Some("validation")));
    assert!(invalid.error_message.as_deref().is_some_and(|m| !m.is_empty()), "Tryton's own message: {invalid:?}");
    assert_eq!(by_reference[good.external_reference.as_str()].status, PostingStatus::Posted);
    assert_eq!(letters.len(), 2, "both refusals in the DLQ");
    for letter in &letters {
        let letter = letter.letter.as_ref().unwrap();
        assert_eq!(letter.class, "erp_rejected");
    }
    world.ledger_check(&[good]).await;
}

#[tokio::test]
async fn redeliveries_and_sigkills_between_the_erp_call_and_the_commit_never_create_a_second_document() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;

    let _tryton = tributary_tests::tryton_shared().await;
    let world = Poster::new();
    let parties = world.parties(6).await;
    let postings = world.postings(&parties, 60);
    let keyed: Vec<(String, ErpPosting)> =
        postings.iter().map(|p| (p.envelope.account_id.clone(), p.clone())).collect();
    let feeder = trickle(
        world.stack,
        world.codec.clone(),
        world.topic(topics::ERP_POSTINGS),
        keyed,
        4,
        Duration::from_millis(400),
    );
    let config_file = std::env::temp_dir().join(format!("{}.toml", unique_name("erp-poster")));
    let settings = world.settings();
    std::fs::write(
        &config_file,
        format!(
            "[erp_poster]\nrate_per_second = 20\nburst = 20\n[erp_poster.tryton]\nurl = {:?}\ndatabase = {:?}\nuser = {:?}\npassword = {:?}\n",
            settings.tryton.url,
            settings.tryton.database,
            settings.tryton.user,
            settings.tryton.password.clone().unwrap()
        ),
    )
    .unwrap();
    let spawn_binary = || {
        Command::new(workspace_binary("erp-poster"))
            .envs(world.stack.service_env())
            .env("TRIBUTARY_CONFIG", &config_file)
            .env("TRIBUTARY__KAFKA__TOPIC_PREFIX", &world.prefix)
            .env("TRIBUTARY__KAFKA__GROUP_ID", &world.group)
            .env("TRIBUTARY__KAFKA__TRANSACTIONAL_ID_PREFIX", &world.group)
            .env("TRIBUTARY__RUNTIME__INSTANCE_ID", "crashy")
            .env("TRIBUTARY__ADMIN__LISTEN", "127.0.0.1:0")
            .env("TRIBUTARY__LOG__FILTER", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start erp-poster")
    };
    let mut rng = rand::rng();
    for crash in 0..4 {
        let mut child = spawn_binary();
        tokio::time::sleep(Duration::from_millis(rng.random_range(2_500..5_000))).await;
        kill(Pid::from_raw(child.id().expect("running") as i32), Signal::SIGKILL).expect("SIGKILL");
        assert!(!child.wait().await.expect("wait").success(), "crash {crash}: the process was killed");
    }
    feeder.await.expect("feeder");
    let mut last = spawn_binary();
    world.wait_for_results(postings.len(), Duration::from_secs(180)).await;
    kill(Pid::from_raw(last.id().expect("running") as i32), Signal::SIGTERM).expect("SIGTERM");
    let status = tokio::time::timeout(Duration::from_secs(30), last.wait()).await.expect("stops").expect("wait");
    assert_eq!(status.code(), Some(0));

    let results = world.results().await;
    one_result_each(&results, &postings);
    world.ledger_check(&postings).await;
}

#[tokio::test]
async fn tryton_stopped_for_a_minute_opens_the_circuit_dead_letters_nothing_and_every_posting_lands_once() {
    let _tryton = tributary_tests::tryton_exclusive().await;
    let world = Poster::new();
    let parties = world.parties(3).await;
    let before = world.postings(&parties, 6);
    let during = world.postings(&parties, 12);
    let service = world.start(world.config(world.settings())).await;
    world.produce(&before).await;
    world.wait_for_results(before.len(), Duration::from_secs(60)).await;

    tributary_tests::stop_component("tryton").await;
    world.produce(&during).await;
    let metrics = format!("http://{}/metrics", service.admin_addr);
    eventually(Duration::from_secs(60), "the circuit to open", || async {
        let text = reqwest::get(&metrics).await.ok()?.text().await.ok()?;
        text.contains(r#"tributary_circuit_state{circuit="erp"} 2"#).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(45)).await; // the rest of the minute: Tryton stays away
    assert_eq!(world.results().await.len(), before.len(), "nothing posted while Tryton is down");
    tributary_tests::start_stack().await;

    let all: Vec<ErpPosting> = before.iter().chain(&during).cloned().collect();
    let results = world.wait_for_results(all.len(), Duration::from_secs(120)).await;
    let text = reqwest::get(&metrics).await.unwrap().text().await.unwrap();
    service.stop().await.expect("clean stop");
    assert!(dlq::list(&world.config(world.settings()).kafka, NAME).await.unwrap().is_empty(), "nothing dead-lettered");
    one_result_each(&results, &all);
    assert!(text.contains(r#"tributary_circuit_state{circuit="erp"} 0"#), "closed again:\n{text}");
    world.ledger_check(&all).await;
}

/// The next Sunday at 01:30 UTC, at least a day ahead.
fn next_sunday_night() -> DateTime<Utc> {
    let mut day = Utc::now().date_naive() + chrono::Days::new(1);
    while day.weekday() != chrono::Weekday::Sun {
        day = day + chrono::Days::new(1);
    }
    Utc.from_utc_datetime(&day.and_hms_opt(1, 30, 0).unwrap())
}

#[tokio::test]
async fn a_maintenance_window_on_the_controlled_clock_pauses_posting_and_it_resumes_after() {
    let _tryton = tributary_tests::tryton_shared().await;
    let world = Poster::new();
    let parties = world.parties(1).await;
    let mut settings = world.settings();
    settings.maintenance_windows = vec!["Sun 01:00-03:00".into()];
    settings.maintenance_recheck = Duration::from_millis(500);
    let mut config = world.config(settings);
    config.runtime.clock = ClockMode::Controlled;
    let clock = |args: Vec<String>| {
        let (stack, prefix) = (world.stack, world.prefix.clone());
        async move {
            let output = Command::new(workspace_binary("tributary"))
                .args(["--bootstrap-servers", &stack.bootstrap, "--topic-prefix", &prefix, "clock"])
                .args(&args)
                .output()
                .await
                .unwrap();
            assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        }
    };
    clock(vec!["set".into(), next_sunday_night().to_rfc3339()]).await;
    let service = world.start(config).await;
    let postings = world.postings(&parties, 3);
    world.produce(&postings).await;
    // The partition pauses: no result while the clock is inside the window.
    let metrics = format!("http://{}/metrics", service.admin_addr);
    eventually(Duration::from_secs(60), "the window to pause the posting", || async {
        let text = reqwest::get(&metrics).await.ok()?.text().await.ok()?;
        text.contains(r#"tributary_erp_poster_paused_total{status="maintenance_window"}"#).then_some(())
    })
    .await;
    assert!(world.results().await.is_empty(), "nothing posted during the window");
    clock(vec!["advance".into(), "2h".into()]).await; // 03:30: the window has ended
    let results = world.wait_for_results(postings.len(), Duration::from_secs(60)).await;
    service.stop().await.expect("clean stop");
    one_result_each(&results, &postings);
    world.ledger_check(&postings).await;
}
