//! The registry's Confluent-compatible API serves what `schema_registry_converter` expects.

use apache_avro::types::Value;
use schema_registry_converter::async_impl::avro::{AvroDecoder, AvroEncoder};
use schema_registry_converter::async_impl::schema_registry::{SrSettings, get_schema_by_id_and_type, post_schema};
use schema_registry_converter::schema_registry_common::{SchemaType, SubjectNameStrategy, SuppliedSchema};
use tributary_tests::{stack, unique_name};

const SCHEMA: &str = r#"{
  "type": "record", "name": "Probe", "namespace": "io.tributary.test",
  "doc": "A schema registered by the foundation tests.",
  "fields": [
    {"name": "account_id", "type": "string", "doc": "The account."},
    {"name": "count", "type": "long", "doc": "A count."}
  ]
}"#;

#[tokio::test]
async fn a_schema_registered_through_the_confluent_api_is_fetched_back_and_used_for_a_round_trip() {
    let stack = stack();
    let settings = SrSettings::new(stack.registry_url.clone());
    let subject = format!("{}-value", unique_name("probe"));
    let supplied = SuppliedSchema::new(Some("io.tributary.test.Probe".into()), SchemaType::Avro, SCHEMA.into());
    let registered = post_schema(&settings, subject.clone(), supplied).await.expect("register");
    assert!(registered.id > 0, "the registry assigned an id");

    let fetched = get_schema_by_id_and_type(registered.id, &settings, SchemaType::Avro).await.expect("fetch by id");
    let fetched: serde_json::Value = serde_json::from_str(&fetched.schema).expect("fetched schema is JSON");
    assert_eq!(fetched["name"], "Probe");
    assert_eq!(fetched["fields"][1]["name"], "count");

    let topic = subject.trim_end_matches("-value").to_owned();
    let encoder = AvroEncoder::new(settings.clone());
    let bytes = encoder
        .encode(
            vec![("account_id", Value::String("acct-42".into())), ("count", Value::Long(7))],
            SubjectNameStrategy::TopicNameStrategy(topic, false),
        )
        .await
        .expect("encode");
    assert_eq!(bytes[0], 0, "Confluent framing starts with magic byte 0");
    assert_eq!(u32::from_be_bytes(bytes[1..5].try_into().unwrap()), registered.id, "then the schema id");

    let decoded = AvroDecoder::new(settings).decode(Some(&bytes)).await.expect("decode");
    assert_eq!(
        decoded.value,
        Value::Record(vec![("account_id".into(), Value::String("acct-42".into())), ("count".into(), Value::Long(7))])
    );
}
