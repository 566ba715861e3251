//! Benchmark: webhook deliveries per second from a relay (billing-router's, for
//! `crm.account-updates`) to a local receiver, beside a bare HTTP client posting the same
//! signed bodies to the same receiver, in the same run.
//!
//! Run with `make bench` (which starts the local stack), or alone with
//! `deploy/local/with-stack.sh cargo bench -p tributary-tests --bench webhooks`.
//!
//! - the receiver: an axum server in this process that counts requests and answers 204 (it
//!   verifies nothing: the receiver's cost is not what is measured);
//! - bare client: the relay's own signed POST (`HttpEndpoint`), the same `COUNT` bodies one
//!   after the other, then from `PARTITIONS` tasks at once (the relay's concurrency: one
//!   delivery in flight per partition, to keep each account's order);
//! - relay: `COUNT` CRM updates for `ACCOUNTS` accounts preloaded into `crm.account-updates`
//!   (`PARTITIONS` partitions), billing-router started with the endpoint; from its start, and
//!   from the first delivery, to the last. Each delivery is also a committed
//!   `webhook.deliveries` record.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use billing_router::{App, Settings};
use chrono::Utc;
use tokio::sync::Mutex;
use tributary_contracts::Contract as _;
use tributary_contracts::codec::{contract_to_json, record_full_name};
use tributary_contracts::samples::{Fill, typed};
use tributary_contracts::topics;
use tributary_contracts::types::{CrmAccountUpdate, Envelope};
use tributary_outbound::EndpointSettings;
use tributary_outbound::http::{HttpEndpoint, Transport};
use tributary_outbound::relay::{cloud_event, delivery_id};
use tributary_runtime::kafka::{TopicKind, ensure_topics};
use tributary_runtime::service::spawn;
use tributary_tests::kafka::{codec, produce_keyed, producer};
use tributary_tests::{stack, unique_name};

const COUNT: usize = 5_000;
const ACCOUNTS: usize = 60;
const PARTITIONS: i32 = 3;
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// What the receiver has seen.
#[derive(Default)]
struct Seen {
    count: AtomicUsize,
    first_and_last: Mutex<(Option<Instant>, Option<Instant>)>,
}

async fn receiver() -> (String, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let state = seen.clone();
    let app = axum::Router::new().route(
        "/hooks",
        axum::routing::post(move |_body: axum::body::Bytes| {
            let seen = state.clone();
            async move {
                seen.count.fetch_add(1, Ordering::Relaxed);
                let mut times = seen.first_and_last.lock().await;
                let now = Instant::now();
                times.0.get_or_insert(now);
                times.1 = Some(now);
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hooks", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, seen)
}

fn endpoint(url: &str) -> EndpointSettings {
    EndpointSettings {
        name: "crm".into(),
        topic: topics::CRM_ACCOUNT_UPDATES.into(),
        url: url.into(),
        secrets: vec![SECRET.into()],
        ..EndpointSettings::default()
    }
}

fn updates(accounts: &[String]) -> Vec<CrmAccountUpdate> {
    (0..COUNT)
        .map(|n| {
            let mut update: CrmAccountUpdate = typed(Fill::Full, n as i64);
            update.envelope =
                Envelope::originating("tributary.billing-router", &accounts[n % accounts.len()], Utc::now());
            update
        })
        .collect()
}

/// The bodies and ids the relay would send.
fn bodies(updates: &[CrmAccountUpdate]) -> Vec<(String, String)> {
    let event_type = record_full_name(topics::CRM_ACCOUNT_UPDATES).unwrap();
    updates
        .iter()
        .map(|u| {
            let body = cloud_event(u.envelope(), event_type, contract_to_json(u).unwrap()).to_string();
            (delivery_id("crm", topics::CRM_ACCOUNT_UPDATES, &u.envelope.event_id), body)
        })
        .collect()
}

async fn bare(url: &str, bodies: &[(String, String)], tasks: usize) -> f64 {
    let client = Arc::new(HttpEndpoint::new(&endpoint(url)).unwrap());
    client.send(&bodies[0].0, &bodies[0].1).await.unwrap(); // connect first, as a warm relay has
    let bodies = Arc::new(bodies.to_vec());
    let started = Instant::now();
    let mut handles = Vec::new();
    for task in 0..tasks {
        let (client, bodies) = (client.clone(), bodies.clone());
        handles.push(tokio::spawn(async move {
            for (id, body) in bodies.iter().skip(task).step_by(tasks) {
                assert_eq!(client.send(id, body).await.unwrap().status, 204);
            }
        }));
    }
    for handle in handles {
        handle.await.unwrap();
    }
    bodies.len() as f64 / started.elapsed().as_secs_f64()
}

async fn relay(updates: &[CrmAccountUpdate]) -> (f64, f64) {
    let stack = stack();
    let prefix = format!("{}.", unique_name("bench-hooks"));
    let codec = codec(stack, &prefix);
    let topic = format!("{prefix}{}", topics::CRM_ACCOUNT_UPDATES);
    let mut kafka = stack.kafka();
    kafka.partitions = PARTITIONS;
    ensure_topics(&kafka, &[(&topic, TopicKind::Events)]).await.unwrap();
    let keyed: Vec<(String, CrmAccountUpdate)> =
        updates.iter().map(|u| (u.envelope.account_id.clone(), u.clone())).collect();
    produce_keyed(&producer(stack), &codec, &topic, &keyed).await;

    let (url, seen) = receiver().await;
    let mut config = stack.service_config::<Settings>("bench-hooks");
    config.kafka.topic_prefix = prefix.clone();
    config.kafka.partitions = PARTITIONS;
    config.service.delivery.endpoints = vec![endpoint(&url)];
    let started = Instant::now();
    let service = spawn::<App>(config).await.unwrap();
    while seen.count.load(Ordering::Relaxed) < COUNT {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let total = started.elapsed().as_secs_f64();
    let (first, last) = *seen.first_and_last.lock().await;
    service.stop().await.unwrap();
    let steady = (COUNT - 1) as f64 / (last.unwrap() - first.unwrap()).as_secs_f64();
    (COUNT as f64 / total, steady)
}

#[tokio::main]
async fn main() {
    println!("webhook benchmark: {COUNT} CRM updates, {ACCOUNTS} accounts, {PARTITIONS} partitions\n");
    let accounts: Vec<String> = (0..ACCOUNTS).map(|_| unique_name("bench-acct")).collect();
    let updates = updates(&accounts);
    let bodies = bodies(&updates);
    let (url, _seen) = receiver().await;
    let sequential = bare(&url, &bodies, 1).await;
    eprintln!("bare client, sequential: {sequential:.0} deliveries/s");
    let concurrent = bare(&url, &bodies, PARTITIONS as usize).await;
    eprintln!("bare client, {PARTITIONS} at once: {concurrent:.0} deliveries/s");
    let (with_start, steady) = relay(&updates).await;
    eprintln!("relay: {with_start:.0} deliveries/s (start-up included), {steady:.0} from the first to the last");
    println!("| measurement | deliveries/s | vs bare sequential | vs bare {PARTITIONS} at once |");
    println!("| --- | ---: | ---: | ---: |");
    println!("| bare signed POSTs, one after the other | {sequential:.0} | 100% | |");
    println!("| bare signed POSTs, {PARTITIONS} at once | {concurrent:.0} | | 100% |");
    for (what, rate) in [
        ("relay, from its start to the last delivery", with_start),
        ("relay, from the first delivery to the last", steady),
    ] {
        println!("| {what} | {rate:.0} | {:.0}% | {:.0}% |", 100.0 * rate / sequential, 100.0 * rate / concurrent);
    }
}
