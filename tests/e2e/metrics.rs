//! Telemetry that holds, in the style of vector's component specification tests: each of the
//! five services is started against the stack, its `/metrics` is parsed by the Prometheus
//! project's own OpenMetrics parser (tests/python/parse_metrics.py), and every metric that
//! DESIGN.md ("Operations") promises must be there, with its type and labels, from the start;
//! no label may carry an account id.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use base64::Engine as _;
use serde_json::Value;
use tributary_contracts::topics;
use tributary_outbound::EndpointSettings;
use tributary_runtime::ServiceConfig;
use tributary_runtime::config::ServiceSection;
use tributary_runtime::service::RunningService;
use tributary_tests::kafka::{produce_raw, producer};
use tributary_tests::{Stack, eventually, python, stack, unique_name, workspace_file};

/// The families every service exposes, with their type and their labels (DESIGN.md,
/// "Operations"), under `tributary_` (the webhook relays' under `tributary_relay_`).
const PROMISED: [(&str, &str, &[&str]); 13] = [
    ("records_consumed", "counter", &["topic"]),
    ("records_produced", "counter", &["topic"]),
    ("errors", "counter", &["class", "stage"]),
    ("dlq_records", "counter", &["source_topic", "class"]),
    ("retries", "counter", &["stage"]),
    ("duplicates_skipped", "counter", &["topic"]),
    ("processing_seconds", "histogram", &["topic"]),
    ("end_to_end_seconds", "histogram", &["topic"]),
    ("transaction_commit_seconds", "histogram", &[]),
    ("transactions", "counter", &["outcome"]),
    ("consumer_lag", "gauge", &["topic", "partition"]),
    ("circuit_state", "gauge", &["circuit"]),
    ("service_info", "gauge", &["service", "version"]),
];

/// A family with no series where there is nothing to say: a circuit exists only where a
/// downstream is called through one (erp-poster's ERP, each webhook endpoint, whose circuit is
/// the service's, not its relay's); elsewhere the family is absent from the scrape.
const CIRCUIT_STATE: &str = "circuit_state";

/// One family as the parser read it.
#[derive(Debug, Clone)]
struct Family {
    kind: String,
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

/// A scrape of `service`, parsed by prometheus_client's OpenMetrics parser.
async fn scrape(service: &RunningService) -> BTreeMap<String, Family> {
    let text = reqwest::get(format!("http://{}/metrics", service.admin_addr))
        .await
        .expect("the admin port answers")
        .text()
        .await
        .expect("a body");
    let mut parser = tokio::process::Command::new(python())
        .arg(workspace_file("tests/python/parse_metrics.py"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run parse_metrics.py");
    use tokio::io::AsyncWriteExt as _;
    let mut stdin = parser.stdin.take().expect("stdin");
    stdin.write_all(text.as_bytes()).await.expect("feed the parser");
    drop(stdin);
    let output = parser.wait_with_output().await.expect("the parser ends");
    assert!(
        output.status.success(),
        "the OpenMetrics parser refused the scrape: {}\n{text}",
        String::from_utf8_lossy(&output.stderr)
    );
    let parsed: Value = serde_json::from_slice(&output.stdout).expect("the parser prints JSON");
    parsed["families"]
        .as_array()
        .expect("families")
        .iter()
        .map(|family| {
            let samples = family["samples"]
                .as_array()
                .expect("samples")
                .iter()
                .map(|s| {
                    let labels = s["labels"]
                        .as_object()
                        .expect("labels")
                        .iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                        .collect();
                    (s["name"].as_str().unwrap().to_owned(), labels, s["value"].as_f64().unwrap_or(f64::NAN))
                })
                .collect();
            let name = family["name"].as_str().expect("a name").to_owned();
            (name, Family { kind: family["type"].as_str().expect("a type").to_owned(), samples })
        })
        .collect()
}

/// A service under test: its running instance, its input topics, its partitions.
struct Subject {
    name: &'static str,
    service: RunningService,
    prefix: String,
    partitions: i32,
    /// Prefixes of the stream runtimes it runs (the service's, and its relays' if any).
    runtimes: Vec<&'static str>,
    circuits: BTreeSet<&'static str>,
}

impl Subject {
    /// `circuits` are the service's own (its webhook relays' included); `with_relay` when it
    /// runs a relay, whose runtime reports under `tributary_relay_`.
    fn new(
        name: &'static str,
        service: RunningService,
        prefix: String,
        partitions: i32,
        circuits: &[&'static str],
        with_relay: bool,
    ) -> Self {
        let runtimes = if with_relay { vec!["tributary", "tributary_relay"] } else { vec!["tributary"] };
        Self { name, service, prefix, partitions, runtimes, circuits: circuits.iter().copied().collect() }
    }
}

fn configured<S: ServiceSection>(stack: &Stack, name: &str) -> (ServiceConfig<S>, String) {
    let prefix = format!("{}.", unique_name("metrics"));
    let mut config = stack.service_config::<S>(name);
    let group = unique_name(name);
    config.kafka.group_id = Some(group.clone());
    config.kafka.transactional_id_prefix = Some(group);
    config.kafka.topic_prefix = prefix.clone();
    config.runtime.instance_id = "metrics-0".into();
    (config, prefix)
}

async fn start_all(stack: &'static Stack) -> Vec<Subject> {
    let mut subjects = Vec::new();

    let (mut config, prefix) = configured::<usage_ingest::Settings>(stack, "usage-ingest");
    config.service.http.listen = "127.0.0.1:0".parse().unwrap();
    config.service.http.api_keys = vec!["metrics-test-key-0123456789".into()];
    config.service.meters = vec![usage_ingest::meters::MeterDefinition {
        key: "api_calls".into(),
        event_type: "api.call".into(),
        aggregation: usage_ingest::meters::Aggregation::Count,
        value_property: None,
        unit: "call".into(),
        group_by: BTreeMap::new(),
    }];
    let partitions = config.kafka.partitions;
    let service = tributary_tests::spawn_ready::<usage_ingest::App>(config).await;
    subjects.push(Subject::new("usage-ingest", service, prefix, partitions, &[], false));

    let (mut config, prefix) = configured::<billing_router::Settings>(stack, "billing-router");
    config.service.default_overage_product = Some("USAGE-OVERAGE".into());
    let service = tributary_tests::spawn_ready::<billing_router::App>(config).await;
    subjects.push(Subject::new("billing-router", service, prefix, partitions, &[], false));

    let (mut config, prefix) = configured::<erp_poster::Settings>(stack, "erp-poster");
    config.service.tryton.url = stack.tryton_url.clone();
    config.service.tryton.database = stack.tryton_db.clone();
    config.service.tryton.user = stack.tryton_user.clone();
    config.service.tryton.password = Some(stack.tryton_password.clone());
    let service = tributary_tests::spawn_ready::<erp_poster::App>(config).await;
    subjects.push(Subject::new("erp-poster", service, prefix, partitions, &["erp"], false));

    let (config, prefix) = configured::<entitlement_watcher::Settings>(stack, "entitlement-watcher");
    let service = tributary_tests::spawn_ready::<entitlement_watcher::App>(config).await;
    subjects.push(Subject::new("entitlement-watcher", service, prefix, partitions, &[], false));

    // With one webhook endpoint, so that its delivery relay is held to the same list. Nothing
    // listens at its URL; no notification is due, so nothing is sent there.
    let (mut config, prefix) = configured::<renewal_notifier::Settings>(stack, "renewal-notifier");
    let secret = format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode([7u8; 32]));
    config.service.delivery.endpoints = vec![EndpointSettings {
        name: "customer-success".into(),
        topic: topics::RENEWAL_NOTIFICATIONS.into(),
        url: "http://127.0.0.1:9/renewals".into(),
        secrets: vec![secret],
        ..EndpointSettings::default()
    }];
    let service = tributary_tests::spawn_ready::<renewal_notifier::App>(config).await;
    subjects.push(Subject::new("renewal-notifier", service, prefix, partitions, &["webhook.customer-success"], true));
    subjects
}

/// The input topics of a runtime, as its zero-valued `records_consumed` series name them.
fn inputs_of(scrape: &BTreeMap<String, Family>, runtime: &str) -> BTreeSet<String> {
    scrape
        .get(&format!("{runtime}_records_consumed"))
        .map(|family| family.samples.iter().filter_map(|(_, labels, _)| labels.get("topic").cloned()).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn every_service_exposes_every_promised_metric_from_the_start_with_bounded_labels() {
    let stack = stack();
    let subjects = start_all(stack).await;
    let account = unique_name("acct-cardinality");
    let producer = producer(stack);
    let mut failures = Vec::new();

    for subject in &subjects {
        let first = scrape(&subject.service).await;
        // Something for each service to count and dead-letter: a record that does not decode,
        // on every input topic, keyed by an account id no label may repeat.
        for runtime in &subject.runtimes {
            let inputs = inputs_of(&first, runtime);
            if inputs.is_empty() {
                failures.push(format!("{}: {runtime} declares no input topic at start", subject.name));
            }
            if *runtime == "tributary" {
                for topic in &inputs {
                    produce_raw(&producer, topic, &account, b"not an Avro record").await;
                }
            }
        }
    }

    for subject in &subjects {
        for runtime in &subject.runtimes {
            let runtime = *runtime;
            let inputs = inputs_of(&scrape(&subject.service).await, runtime);
            // Lag is a sample per assigned partition of every input, 0 once the bad records
            // are dead-lettered and committed (librdkafka's statistics come every 5 s).
            let settled = eventually(
                Duration::from_secs(90),
                &format!("{}: {runtime} lag samples for every input partition, all 0", subject.name),
                || async {
                    let scraped = scrape(&subject.service).await;
                    let lag = scraped.get(&format!("{runtime}_consumer_lag"))?;
                    let seen: BTreeSet<(String, String)> = lag
                        .samples
                        .iter()
                        .filter(|(_, _, value)| *value == 0.0)
                        .map(|(_, l, _)| (l["topic"].clone(), l["partition"].clone()))
                        .collect();
                    let wanted: BTreeSet<(String, String)> = inputs
                        .iter()
                        .flat_map(|t| (0..subject.partitions).map(move |p| (t.clone(), p.to_string())))
                        .collect();
                    let dead_lettered = runtime != "tributary"
                        || scraped.get(&format!("{runtime}_dlq_records")).is_some_and(|f| {
                            f.samples.iter().filter(|(_, _, value)| *value >= 1.0).count() >= inputs.len()
                        });
                    (seen == wanted && dead_lettered).then_some(scraped)
                },
            )
            .await;
            failures.extend(check(subject, runtime, &settled, &account));
        }
        let scraped = scrape(&subject.service).await;
        for (name, value) in [("tributary_ready", 1.0), ("tributary_live", 1.0)] {
            match scraped.get(name) {
                Some(f) if f.kind == "gauge" && f.samples.iter().any(|(_, _, v)| *v == value) => {}
                other => failures.push(format!("{}: {name} is not a gauge at {value}: {other:?}", subject.name)),
            }
        }
    }

    let usage_ingest = &subjects[0].service;
    let http = scrape(usage_ingest).await;
    match http.get("tributary_usage_ingest_http_request_duration_seconds") {
        Some(family) if family.kind == "histogram" => {
            let classes: BTreeSet<&str> =
                family.samples.iter().filter_map(|(_, l, _)| l.get("status_class").map(String::as_str)).collect();
            if classes != BTreeSet::from(["2xx", "4xx", "5xx"]) {
                failures.push(format!("usage-ingest: request durations by status class from the start: {classes:?}"));
            }
        }
        other => failures.push(format!("usage-ingest: no request duration histogram: {other:?}")),
    }

    for subject in subjects {
        subject.service.stop().await.expect("clean stop");
    }
    assert!(failures.is_empty(), "{} finding(s):\n{}", failures.len(), failures.join("\n"));
}

/// What is wrong with `runtime`'s families in `scraped`.
fn check(subject: &Subject, runtime: &str, scraped: &BTreeMap<String, Family>, account: &str) -> Vec<String> {
    let mut failures = Vec::new();
    // The circuits are the service's own runtime's (the relays report theirs there too).
    let circuits: BTreeSet<&str> =
        if runtime == "tributary" { subject.circuits.iter().copied().collect() } else { BTreeSet::new() };
    for (family, kind, labels) in PROMISED {
        let name = format!("{runtime}_{family}");
        let Some(found) = scraped.get(&name) else {
            if !(family == CIRCUIT_STATE && circuits.is_empty()) {
                failures.push(format!("{}: {name} is missing", subject.name));
            }
            continue;
        };
        if found.kind != kind {
            failures.push(format!("{}: {name} is a {}, not a {kind}", subject.name, found.kind));
        }
        if found.samples.is_empty() {
            failures.push(format!("{}: {name} has no series at start", subject.name));
        }
        let wanted: BTreeSet<&str> = labels.iter().copied().collect();
        for (sample, sample_labels, _) in &found.samples {
            let names: BTreeSet<&str> = sample_labels.keys().map(String::as_str).filter(|l| *l != "le").collect();
            if names != wanted {
                failures.push(format!("{}: {sample} has labels {names:?}, not {wanted:?}", subject.name));
            }
        }
    }
    let named: BTreeSet<&str> = scraped
        .get(&format!("{runtime}_{CIRCUIT_STATE}"))
        .map(|f| f.samples.iter().filter_map(|(_, l, _)| l.get("circuit").map(String::as_str)).collect())
        .unwrap_or_default();
    if named != circuits {
        failures.push(format!("{}: {runtime} circuits {named:?}, expected {circuits:?} (closed)", subject.name));
    }
    // Bounded cardinality: no label value carries the account id of the records it saw.
    for (name, family) in scraped {
        for (sample, labels, _) in &family.samples {
            if labels.values().any(|v| v.contains(account) || v.contains(&subject.prefix) && v.contains("acct")) {
                failures.push(format!("{}: {name} {sample} {labels:?} carries an account id", subject.name));
            }
        }
    }
    failures
}
