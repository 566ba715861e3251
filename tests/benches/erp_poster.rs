//! Benchmark: erp-poster posting into the real Tryton, beside a bare sequential JSON-RPC client
//! creating and posting the same invoices in the same run. Tryton is the limit here (it
//! renders every invoice while posting it); the ratio shows what the service adds.
//!
//! Run with `make bench` (which starts the local stack), or alone with
//! `deploy/local/with-stack.sh cargo bench -p tributary-tests --bench erp_poster`.
//!
//! - bare client: `COUNT` invoices created and posted one after the other through the Tryton
//!   adapter's client (find by reference, create, post, read back), no Kafka;
//! - erp-poster: `COUNT` posting requests preloaded into `erp.postings` for `ACCOUNTS`
//!   accounts, the rate limit out of the way; from the service's start to the last result;
//! - drain: `BENCH_DRAIN` (default 1,000) posting requests preloaded, the service at its
//!   default rate limit (5 a second); the time until the last result.

use std::time::{Duration, Instant};

use chrono::Utc;
use erp_poster::adapter::ErpAdapter;
use erp_poster::settings::TrytonSettings;
use erp_poster::tryton::TrytonAdapter;
use erp_poster::{App, Settings};
use tributary_contracts::codec::Codec;
use tributary_contracts::topics;
use tributary_contracts::types::{Envelope, ErpDocumentType, ErpPosting, ErpPostingLine, ErpPostingResult};
use tributary_runtime::kafka::{TopicKind, ensure_topics};
use tributary_runtime::service::spawn;
use tributary_tests::kafka::{Read, codec, produce_keyed, producer, read_to_end};
use tributary_tests::{Stack, stack, unique_name};

const COUNT: usize = 40;
const ACCOUNTS: usize = 8;

fn tryton_settings(stack: &Stack) -> TrytonSettings {
    TrytonSettings {
        url: stack.tryton_url.clone(),
        database: stack.tryton_db.clone(),
        user: stack.tryton_user.clone(),
        password: Some(stack.tryton_password.clone()),
        ..TrytonSettings::default()
    }
}

fn adapter(stack: &Stack) -> TrytonAdapter {
    TrytonAdapter::new(&tryton_settings(stack), stack.tryton_password.clone()).unwrap()
}

fn posting(account: &str, n: usize) -> ErpPosting {
    let now = Utc::now();
    let amount = tributary_contracts::fixtures::dec(&format!("{}.{:02}", 10 + n / 100, n % 100));
    ErpPosting {
        envelope: Envelope::originating("bench", account, now),
        external_reference: format!("tributary:charge:{}", unique_name("bench")),
        document_type: ErpDocumentType::Invoice,
        customer_id: format!("cus-{account}"),
        erp_party_ref: format!("C-{account}"),
        currency: "USD".into(),
        document_date: (now.timestamp_millis() / 86_400_000) as i32,
        due_date: None,
        description: Some("Benchmark overage".into()),
        lines: vec![ErpPostingLine {
            line_number: 1,
            product_code: Some("USAGE-OVERAGE".into()),
            account_code: None,
            description: "api_calls overage".into(),
            quantity: tributary_contracts::fixtures::dec("1"),
            unit_price: amount,
            tax_code: None,
            amount,
        }],
        net_amount: amount,
        tax_amount: None,
        total_amount: amount,
        original_document_ref: None,
        payment: None,
        contract_id: None,
        charge_id: None,
        invoice_id: None,
    }
}

async fn accounts(adapter: &TrytonAdapter, count: usize) -> Vec<String> {
    let mut accounts = Vec::with_capacity(count);
    for _ in 0..count {
        let account = unique_name("bench-acct");
        adapter.client().ensure_party(&format!("C-{account}"), &account).await.unwrap();
        accounts.push(account);
    }
    accounts
}

async fn bare(stack: &Stack) -> f64 {
    let adapter = adapter(stack);
    let accounts = accounts(&adapter, 1).await;
    let postings: Vec<ErpPosting> = (0..COUNT).map(|n| posting(&accounts[0], n)).collect();
    adapter.create(&postings[0]).await.unwrap(); // log in and fill the caches, as the service does
    let started = Instant::now();
    for posting in &postings[1..] {
        assert!(adapter.find(posting).await.unwrap().is_none());
        adapter.create(posting).await.unwrap();
    }
    (COUNT - 1) as f64 / started.elapsed().as_secs_f64()
}

struct Run {
    stack: &'static Stack,
    prefix: String,
    codec: Codec,
}

impl Run {
    async fn new(stack: &'static Stack) -> Self {
        let prefix = format!("{}.", unique_name("bench-ep"));
        let run = Self { stack, codec: codec(stack, &prefix), prefix };
        let mut kafka = stack.kafka();
        kafka.partitions = 3;
        ensure_topics(&kafka, &[(&run.topic(topics::ERP_POSTINGS), TopicKind::Events)]).await.unwrap();
        run
    }

    fn topic(&self, topic: &str) -> String {
        format!("{}{topic}", self.prefix)
    }

    /// Preloads `count` postings, starts the service with `rate`, returns the seconds from its
    /// start to the last result, and to the first.
    async fn post(&self, count: usize, rate: u32) -> (f64, f64) {
        let adapter = adapter(self.stack);
        let accounts = accounts(&adapter, ACCOUNTS).await;
        let postings: Vec<(String, ErpPosting)> =
            (0..count).map(|n| (accounts[n % ACCOUNTS].clone(), posting(&accounts[n % ACCOUNTS], n))).collect();
        produce_keyed(&producer(self.stack), &self.codec, &self.topic(topics::ERP_POSTINGS), &postings).await;
        let mut config = self.stack.service_config::<Settings>("bench-ep");
        config.kafka.topic_prefix = self.prefix.clone();
        config.service =
            Settings { tryton: tryton_settings(self.stack), rate_per_second: rate, burst: rate, ..Settings::default() };
        let started = Instant::now();
        let service = spawn::<App>(config).await.unwrap();
        let mut first = None;
        loop {
            let results: Vec<Read<ErpPostingResult>> =
                read_to_end(self.stack, &self.codec, &self.topic(topics::ERP_POSTING_RESULTS)).await;
            if !results.is_empty() {
                first.get_or_insert_with(|| started.elapsed());
            }
            if results.len() >= count {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let elapsed = started.elapsed();
        service.stop().await.unwrap();
        (elapsed.as_secs_f64(), first.unwrap_or(elapsed).as_secs_f64())
    }
}

#[tokio::main]
async fn main() {
    let stack = stack();
    let drain: usize = std::env::var("BENCH_DRAIN").ok().and_then(|n| n.parse().ok()).unwrap_or(1_000);
    println!(
        "erp-poster benchmark: {COUNT} invoices into Tryton, {ACCOUNTS} accounts, 3 partitions; drain of {drain}\n"
    );
    let bare = bare(stack).await;
    eprintln!("bare sequential client: {bare:.2} invoices/s");
    let (total, first) = Run::new(stack).await.post(COUNT, 1_000).await;
    let service = COUNT as f64 / total;
    let steady = (COUNT - 1) as f64 / (total - first).max(0.001);
    eprintln!("erp-poster: {service:.2} postings/s (start-up included), {steady:.2} after the first");
    let (drained, _) = Run::new(stack).await.post(drain, Settings::default().rate_per_second).await;
    eprintln!("drain of {drain}: {drained:.0} s");
    println!("| measurement | invoices/s | vs bare client |");
    println!("| --- | ---: | ---: |");
    println!("| bare sequential JSON-RPC client (find, create, post, read) | {bare:.2} | 100% |");
    println!("| erp-poster, from its start to the last result | {service:.2} | {:.0}% |", 100.0 * service / bare);
    println!("| erp-poster, from its first result to its last | {steady:.2} | {:.0}% |", 100.0 * steady / bare);
    println!();
    println!(
        "| drain of {drain} posting requests at the default rate limit ({} a second) | {drained:.0} s | {:.2} a second |",
        Settings::default().rate_per_second,
        drain as f64 / drained
    );
}
