//! The contracts on the real registry: governance (FULL_TRANSITIVE, refusal of a breaking
//! change), the wire format as Confluent's own Python client reads it, `tributary tap`, and
//! `tributary publish`.

use std::path::PathBuf;
use std::process::Command;

use apache_avro::types::Value;
use rdkafka::producer::FutureRecord;
use serde_json::json;
use tributary_contracts::codec::reader_schema;
use tributary_contracts::json::value_to_json;
use tributary_contracts::registry::{COMPATIBILITY, RegistryClient};
use tributary_contracts::samples::{Fill, sample};
use tributary_contracts::topics::{self, *};
use tributary_contracts::{Contract, for_each_contract, types};
use tributary_tests::kafka::{codec, producer};
use tributary_tests::{stack, unique_name};

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn tributary_cli() -> PathBuf {
    tributary_tests::workspace_binary("tributary")
}

#[tokio::test]
async fn every_schema_is_registered_under_full_transitive_and_a_breaking_change_is_refused() {
    let stack = stack();
    let output = Command::new(tributary_cli())
        .args(["--registry-url", &stack.registry_url, "schemas", "register", "--dir"])
        .arg(workspace_root().join("schemas"))
        .output()
        .expect("run tributary schemas register");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(stdout.lines().filter(|l| l.contains(COMPATIBILITY)).count(), topics::ALL.len(), "{stdout}");

    let client = RegistryClient::new(&stack.registry_url, None, None).unwrap();
    for spec in topics::ALL {
        assert_eq!(client.compatibility(&spec.subject()).await.unwrap().as_deref(), Some(COMPATIBILITY));
    }
    // Removing a field without a default (the payment's attempt number) breaks old readers.
    let payments = topics::spec(BILLING_PAYMENTS).unwrap();
    let mut broken: serde_json::Value = serde_json::from_str(payments.schema).unwrap();
    let fields = broken["fields"].as_array_mut().unwrap();
    fields.retain(|f| f["name"] != "attempt_number");
    let broken_spec = TopicSpec { schema: Box::leak(broken.to_string().into_boxed_str()), ..*payments };
    let refused = client.register(&broken_spec).await;
    assert!(refused.is_err(), "the registry must refuse an incompatible schema, got {refused:?}");
}

/// Produces a full and a minimal sample of `T` and returns the Python expectations for them.
async fn produce_samples<T: Contract + 'static>(prefix: &str) -> Vec<serde_json::Value> {
    let stack = stack();
    let codec = codec(stack, prefix);
    let producer = producer(stack);
    let schema = reader_schema(T::TOPIC).unwrap();
    let topic = format!("{prefix}{}", T::TOPIC);
    let mut expectations = Vec::new();
    for (fill, seed) in [(Fill::Full, 7), (Fill::Minimal, 8)] {
        let value: Value = sample(schema, fill, seed);
        let typed: T = apache_avro::from_value(&value).expect("sample fits the type");
        let payload = codec.encode(&typed).await.expect("encode");
        let key = typed.envelope().account_id.clone();
        let delivery = producer
            .send(FutureRecord::to(&topic).key(&key).payload(&payload), std::time::Duration::from_secs(30))
            .await
            .map_err(|(e, _)| e)
            .expect("produce");
        expectations.push(json!({
            "topic": topic, "partition": delivery.partition, "offset": delivery.offset,
            "expected": value_to_json(&value, schema),
        }));
    }
    expectations
}

macro_rules! produce_all {
    ($($ty:ident => $topic:ident),* $(,)?) => {
        async fn produce_every_contract(prefix: &str) -> Vec<serde_json::Value> {
            let mut all = Vec::new();
            $(all.extend(produce_samples::<types::$ty>(prefix).await);)*
            all
        }
    };
}
for_each_contract!(produce_all);

#[tokio::test]
async fn confluents_python_client_reads_every_topic_with_the_values_rust_wrote() {
    let stack = stack();
    let prefix = format!("{}.", unique_name("wire"));
    let records = produce_every_contract(&prefix).await;
    assert_eq!(records.len(), 2 * topics::ALL.len());
    let file = std::env::temp_dir().join(format!("{}.json", unique_name("wire-expectations")));
    let expectations = json!({"bootstrap": stack.bootstrap, "registry": stack.registry_url, "records": records});
    std::fs::write(&file, serde_json::to_vec_pretty(&expectations).unwrap()).unwrap();

    let root = workspace_root();
    let setup = Command::new(root.join("tests/python/setup.sh")).output().expect("run tests/python/setup.sh");
    assert!(setup.status.success(), "setting up the Python venv failed:\n{}", String::from_utf8_lossy(&setup.stderr));
    let python =
        String::from_utf8_lossy(&setup.stdout).lines().last().expect("setup.sh prints the python path").to_owned();
    let read = Command::new(python.trim())
        .arg(root.join("tests/python/read_confluent.py"))
        .arg(&file)
        .output()
        .expect("run read_confluent.py");
    let report = String::from_utf8_lossy(&read.stdout);
    assert!(
        read.status.success(),
        "Confluent's client disagrees:\n{report}\n{}",
        String::from_utf8_lossy(&read.stderr)
    );
    assert_eq!(report.lines().filter(|l| l.starts_with("OK ")).count(), records.len(), "{report}");
}

#[tokio::test]
async fn tap_prints_a_topic_as_json_lines_with_exact_decimals() {
    let stack = stack();
    let prefix = format!("{}.", unique_name("tap"));
    let codec = codec(stack, &prefix);
    let topic = format!("{prefix}{BILLING_PAYMENTS}");
    let schema = reader_schema(BILLING_PAYMENTS).unwrap();
    let mut payment: types::Payment = apache_avro::from_value(&sample(schema, Fill::Full, 3)).unwrap();
    payment.amount = "1234.567891".parse().unwrap();
    payment.envelope.account_id = "acct-tap".into();
    let mut other = payment.clone();
    other.envelope.account_id = "acct-other".into();
    let producer = producer(stack);
    for value in [&payment, &other] {
        let bytes = codec.encode(value).await.unwrap();
        producer
            .send(
                FutureRecord::to(&topic).key(&value.envelope.account_id).payload(&bytes),
                std::time::Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
    let output = Command::new(tributary_cli())
        .args(["--bootstrap-servers", &stack.bootstrap, "--registry-url", &stack.registry_url, "tap", &topic])
        .args(["--from-beginning", "--key", "acct-tap", "--headers"])
        .output()
        .expect("run tributary tap");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 1, "only the record with the key asked for: {lines:?}");
    assert_eq!(lines[0]["value"]["amount"], "1234.567891", "decimals print exactly");
    assert_eq!(lines[0]["key"], "acct-tap");
    assert_eq!(lines[0]["value"]["envelope"]["account_id"], "acct-tap");
    assert!(lines[0]["headers"].is_object());
}

#[tokio::test]
async fn publish_writes_what_tap_printed_into_another_topic_and_refuses_a_bad_record_whole() {
    let stack = stack();
    let (from, to) = (format!("{}.", unique_name("tap-from")), format!("{}.", unique_name("publish-to")));
    let mut contract: types::Contract = tributary_contracts::samples::typed(Fill::Full, 11);
    contract.contract_id = "ctr-published".into();
    let bytes = codec(stack, &from).encode(&contract).await.unwrap();
    producer(stack)
        .send(
            FutureRecord::to(&format!("{from}{REFDATA_CONTRACTS}")).key(&contract.contract_id).payload(&bytes),
            std::time::Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    let connection = ["--bootstrap-servers", &stack.bootstrap, "--registry-url", &stack.registry_url];
    let tapped = Command::new(tributary_cli())
        .args(connection)
        .args(["tap", &format!("{from}{REFDATA_CONTRACTS}"), "--from-beginning"])
        .output()
        .expect("run tributary tap");
    assert!(tapped.status.success(), "{}", String::from_utf8_lossy(&tapped.stderr));

    let publish = |input: Vec<u8>| {
        let mut child = Command::new(tributary_cli())
            .args(connection)
            .args(["publish", &format!("{to}{REFDATA_CONTRACTS}")])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run tributary publish");
        use std::io::Write as _;
        child.stdin.take().unwrap().write_all(&input).unwrap();
        child.wait_with_output().unwrap()
    };
    let mut broken = tapped.stdout.clone();
    broken.extend_from_slice(br#"{"envelope": {"account_id": "a"}, "contract_id": "half-a-contract"}"#);
    let refused = publish(broken);
    assert!(!refused.status.success(), "a record that does not fit the schema fails the command");
    let reason = String::from_utf8_lossy(&refused.stderr);
    assert!(reason.contains("record 2") && reason.contains("customer_id"), "{reason}");

    let published = publish(tapped.stdout);
    assert!(published.status.success(), "{}", String::from_utf8_lossy(&published.stderr));
    let read: Vec<tributary_tests::kafka::Read<types::Contract>> =
        tributary_tests::kafka::read_to_end(stack, &codec(stack, &to), &format!("{to}{REFDATA_CONTRACTS}")).await;
    assert_eq!(read.len(), 1, "the refused run wrote nothing, the second wrote one record");
    assert_eq!(read[0].key.as_deref(), Some("ctr-published"), "keyed by the entity id");
    assert_eq!(read[0].value.as_ref(), Some(&contract), "the same value, field for field");
}
