//! Sample values of any schema, for drift tests, wire-format tests and demos.
//!
//! [`Fill::Full`] sets every optional field and puts elements in every array and map, so that
//! every field of a contract is exercised; [`Fill::Minimal`] leaves every optional field null
//! and every collection empty. Values differ by field (a running counter), so a field swapped
//! with another shows up in a comparison.

use std::collections::HashMap;

use apache_avro::Schema;
use apache_avro::schema::{NamesRef, ResolvedSchema};
use apache_avro::types::Value;

/// How much of the schema a sample fills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// Every optional field set, every collection non-empty.
    Full,
    /// Every optional field null, every collection empty.
    Minimal,
}

/// A sample of contract `T` as its Rust type; `seed` varies the values between samples.
///
/// # Panics
/// When the schema's sample does not fit the generated type, which the drift test rules out.
pub fn typed<T: crate::Contract>(fill: Fill, seed: i64) -> T {
    let schema = crate::codec::reader_schema(T::TOPIC).expect("every contract has a reader schema");
    apache_avro::from_value(&sample(schema, fill, seed))
        .unwrap_or_else(|e| panic!("{}: schema sample does not fit the Rust type: {e}", T::TOPIC))
}

/// A sample value of `schema`; `seed` varies the values between samples.
pub fn sample(schema: &Schema, fill: Fill, seed: i64) -> Value {
    let names = ResolvedSchema::try_from(schema).map(|r| r.get_names().clone()).unwrap_or_default();
    let mut counter = seed.rem_euclid(1_000) * 1_000;
    generate(schema, fill, &names, &mut counter)
}

fn generate(schema: &Schema, fill: Fill, names: &NamesRef<'_>, n: &mut i64) -> Value {
    *n += 1;
    let k = *n;
    match schema {
        Schema::Ref { name } => match names.get(name) {
            Some(named) => generate(named, fill, names, n),
            None => Value::Null,
        },
        Schema::Null => Value::Null,
        Schema::Boolean => Value::Boolean(k % 2 == 0),
        Schema::Int => Value::Int(k as i32),
        Schema::Long => Value::Long(k),
        Schema::Float => Value::Float(k as f32),
        Schema::Double => Value::Double(k as f64),
        Schema::Bytes => Value::Bytes(k.to_be_bytes().to_vec()),
        Schema::String => Value::String(format!("s{k}")),
        Schema::Uuid(_) => Value::Uuid(uuid::Uuid::from_u128(k as u128)),
        Schema::Date => Value::Date(20_000 + k as i32),
        Schema::TimestampMillis => Value::TimestampMillis(1_750_000_000_000 + k * 1_000),
        Schema::Decimal(_) => {
            // k * 1.234567, with scale 6: exercises both integer and fraction digits.
            Value::Decimal(apache_avro::Decimal::from((k * 1_234_567).to_be_bytes().to_vec()))
        }
        Schema::Enum(e) => {
            // The last symbol: not the default, so a silent fallback to the default shows.
            let index = e.symbols.len().saturating_sub(1);
            Value::Enum(index as u32, e.symbols.get(index).cloned().unwrap_or_default())
        }
        Schema::Union(union) => {
            let variants = union.variants();
            let null = variants.iter().position(|v| matches!(v, Schema::Null));
            let index = match (fill, null) {
                (Fill::Minimal, Some(null)) => null,
                _ => variants.iter().position(|v| !matches!(v, Schema::Null)).unwrap_or(0),
            };
            Value::Union(index as u32, Box::new(generate(&variants[index], fill, names, n)))
        }
        Schema::Array(array) => Value::Array(match fill {
            Fill::Full => (0..2).map(|_| generate(&array.items, fill, names, n)).collect(),
            Fill::Minimal => Vec::new(),
        }),
        Schema::Map(map) => Value::Map(match fill {
            Fill::Full => (1..=2).map(|i| (format!("key{i}"), generate(&map.types, fill, names, n))).collect(),
            Fill::Minimal => HashMap::new(),
        }),
        Schema::Record(record) => Value::Record(
            record.fields.iter().map(|field| (field.name.clone(), generate(&field.schema, fill, names, n))).collect(),
        ),
        // Types the contracts do not use; a null shows up as a mismatch if one ever appears.
        _ => Value::Null,
    }
}
