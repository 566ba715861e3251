//! The Rust types agree with `schemas/*.avsc` on every topic, and the codec round-trips them
//! in the Confluent wire format without a registry.

use std::sync::Arc;

use apache_avro::types::Value;
use tributary_contracts::codec::{Codec, DecodeError, InMemoryResolver, Location, reader_schema};
use tributary_contracts::samples::{Fill, sample};
use tributary_contracts::topics::{self, *};
use tributary_contracts::{Contract, for_each_contract, types};

fn codec() -> Codec {
    Codec::new(Arc::new(InMemoryResolver::new()))
}

/// A sample of `T` built from the schema, checked to map onto the Rust type and back to the
/// very same Avro value: any field added, removed, renamed or retyped on either side fails.
fn typed_sample<T: Contract>(fill: Fill, seed: i64) -> T {
    let schema = reader_schema(T::TOPIC).unwrap();
    let value = sample(schema, fill, seed);
    let typed: T = apache_avro::from_value(&value)
        .unwrap_or_else(|e| panic!("{}: schema sample does not fit the Rust type: {e}", T::TOPIC));
    let back = apache_avro::to_value(&typed)
        .unwrap()
        .resolve(schema)
        .unwrap_or_else(|e| panic!("{}: the Rust type's value does not fit the schema: {e}", T::TOPIC));
    assert_eq!(back, value, "{}: Rust type and schema disagree ({fill:?})", T::TOPIC);
    typed
}

async fn round_trip<T: Contract + PartialEq>() {
    let codec = codec();
    for (fill, seed) in [(Fill::Full, 1), (Fill::Minimal, 2)] {
        let value: T = typed_sample(fill, seed);
        let bytes = codec.encode(&value).await.unwrap();
        let at = Location::new(T::TOPIC, 0, 42);
        let decoded: T = codec.decode(&at, &bytes).await.unwrap();
        assert_eq!(decoded, value, "{}: codec round trip ({fill:?})", T::TOPIC);
    }
}

macro_rules! round_trip_all {
    ($($ty:ident => $topic:ident),* $(,)?) => {
        $(round_trip::<types::$ty>().await;)*
    };
}

#[tokio::test]
async fn every_contract_type_matches_its_schema_and_round_trips() {
    for_each_contract!(round_trip_all);
}

#[test]
fn every_topic_of_the_design_has_a_contract_and_a_parsed_schema() {
    // The seventeen of DESIGN.md's diagram, the outbound relays' deliveries and the operators'
    // entitlement overrides.
    assert_eq!(topics::ALL.len(), 19);
    for spec in topics::ALL {
        let schema = reader_schema(spec.name).unwrap();
        let json = serde_json::to_value(schema).unwrap();
        assert_eq!(json["fields"][0]["name"], "envelope", "{}: the envelope comes first", spec.name);
    }
}

#[tokio::test]
async fn framing_errors_are_typed_and_name_the_record() {
    let codec = codec();
    let at = Location::new(USAGE_EVENTS, 3, 17);
    let decode = |bytes: Vec<u8>| {
        let codec = codec.clone();
        let at = at.clone();
        async move { codec.decode::<types::UsageEvent>(&at, &bytes).await.unwrap_err() }
    };

    let error = decode(vec![0, 0, 0]).await;
    assert!(matches!(error, DecodeError::Truncated { len: 3, .. }), "{error}");
    assert!(error.to_string().contains("usage.events[3]@17"), "{error}");

    let error = decode(b"{\"json\": true}".to_vec()).await;
    assert!(matches!(error, DecodeError::WrongMagicByte { found: b'{', .. }), "{error}");

    let error = decode(vec![0, 0, 0, 0, 99, 1, 2]).await;
    assert!(matches!(error, DecodeError::UnknownSchemaId { id: 99, .. }), "{error}");

    let good = codec.encode(&typed_sample::<types::UsageEvent>(Fill::Full, 3)).await.unwrap();
    let error = decode(good[..good.len() / 2].to_vec()).await;
    assert!(matches!(error, DecodeError::Corrupt { .. }), "{error}");
    let mut trailing = good.clone();
    trailing.push(0);
    assert!(matches!(decode(trailing).await, DecodeError::Corrupt { .. }));
}

#[tokio::test]
async fn a_record_of_another_topic_is_unresolvable_not_misread() {
    let codec = codec();
    let payment = codec.encode(&typed_sample::<types::Payment>(Fill::Full, 4)).await.unwrap();
    let at = Location::new(USAGE_EVENTS, 0, 1);
    let error = codec.decode::<types::UsageEvent>(&at, &payment).await.unwrap_err();
    assert!(matches!(error, DecodeError::Unresolvable { .. }), "{error}");
}

#[tokio::test]
async fn no_input_bytes_make_the_decoder_panic() {
    // A deterministic pseudo-random walk over frames: valid header, random body; random
    // header; mutations of a valid record. Every outcome must be Ok or a typed error.
    let codec = codec();
    let valid = codec.encode(&typed_sample::<types::ErpPosting>(Fill::Full, 5)).await.unwrap();
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let at = Location::new(ERP_POSTINGS, 0, 0);
    for round in 0..3_000 {
        let mut bytes = valid.clone();
        match round % 3 {
            0 => {
                let len = (next() % 64) as usize;
                bytes.truncate(5);
                bytes.extend((0..len).map(|_| next() as u8));
            }
            1 => {
                for _ in 0..1 + next() % 4 {
                    let i = (next() as usize) % bytes.len();
                    bytes[i] = next() as u8;
                }
            }
            _ => bytes = (0..(next() % 32) as usize).map(|_| next() as u8).collect(),
        }
        let _ = codec.decode::<types::ErpPosting>(&at, &bytes).await;
    }
}

#[test]
fn samples_fill_every_field() {
    let schema = reader_schema(BILLING_PAYMENTS).unwrap();
    let Value::Record(fields) = sample(schema, Fill::Full, 1) else { panic!("a record") };
    assert!(fields.iter().all(|(_, v)| !matches!(v, Value::Union(_, inner) if **inner == Value::Null)));
}
