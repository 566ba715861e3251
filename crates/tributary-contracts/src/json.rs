//! Avro values as JSON for people and analysts' tools (`tributary tap`).
//!
//! Unions print as their plain value; decimals print as exact strings (`"12.5"`), never as
//! floats; `timestamp-millis` as RFC 3339 UTC with milliseconds; `date` as `YYYY-MM-DD`; bytes
//! as base64. The Python wire-format test projects what Confluent's client reads the same way,
//! so the two can be compared value for value.

use apache_avro::Schema;
use apache_avro::schema::{NamesRef, ResolvedSchema};
use apache_avro::types::Value;
use base64::Engine as _;
use chrono::{DateTime, NaiveDate, SecondsFormat, TimeDelta};
use rust_decimal::Decimal;
use serde_json::{Map, Value as Json, json};

/// `value` (written with `schema`) as JSON.
pub fn value_to_json(value: &Value, schema: &Schema) -> Json {
    let names = ResolvedSchema::try_from(schema).map(|r| r.get_names().clone()).unwrap_or_default();
    walk(value, schema, &names)
}

fn walk(value: &Value, schema: &Schema, names: &NamesRef<'_>) -> Json {
    let schema = match schema {
        Schema::Ref { name } => names.get(name).copied().unwrap_or(schema),
        other => other,
    };
    match (value, schema) {
        (Value::Union(index, inner), Schema::Union(union)) => match union.variants().get(*index as usize) {
            Some(variant) => walk(inner, variant, names),
            None => walk(inner, &Schema::Null, names),
        },
        (Value::Union(_, inner), other) => walk(inner, other, names),
        (Value::Record(fields), Schema::Record(record)) => {
            let mut object = Map::new();
            for (name, field_value) in fields {
                let field_schema = record.lookup.get(name).map(|&i| &record.fields[i].schema).unwrap_or(&Schema::Null);
                object.insert(name.clone(), walk(field_value, field_schema, names));
            }
            Json::Object(object)
        }
        (Value::Array(items), Schema::Array(array)) => {
            Json::Array(items.iter().map(|item| walk(item, &array.items, names)).collect())
        }
        (Value::Map(entries), Schema::Map(map)) => {
            let mut sorted: Vec<_> = entries.iter().collect();
            sorted.sort_by(|a, b| a.0.cmp(b.0));
            Json::Object(sorted.into_iter().map(|(k, v)| (k.clone(), walk(v, &map.types, names))).collect())
        }
        (Value::Decimal(decimal), Schema::Decimal(decimal_schema)) => {
            let bytes = Vec::<u8>::try_from(decimal).unwrap_or_default();
            decimal_string(&bytes, decimal_schema.scale as u32).map_or_else(|| json!(base64_of(&bytes)), Json::String)
        }
        (Value::Bytes(bytes), Schema::Decimal(decimal_schema)) => {
            decimal_string(bytes, decimal_schema.scale as u32).map_or_else(|| json!(base64_of(bytes)), Json::String)
        }
        (value, _) => scalar(value, names, schema),
    }
}

fn scalar(value: &Value, names: &NamesRef<'_>, schema: &Schema) -> Json {
    match value {
        Value::Null => Json::Null,
        Value::Boolean(b) => json!(b),
        Value::Int(i) | Value::TimeMillis(i) => json!(i),
        Value::Long(l) | Value::TimeMicros(l) | Value::TimestampMicros(l) | Value::TimestampNanos(l) => json!(l),
        Value::LocalTimestampMicros(l) | Value::LocalTimestampNanos(l) => json!(l),
        Value::Float(f) => json!(f),
        Value::Double(d) => json!(d),
        Value::String(s) => json!(s),
        Value::Enum(_, symbol) => json!(symbol),
        Value::Bytes(bytes) | Value::Fixed(_, bytes) => json!(base64_of(bytes)),
        Value::TimestampMillis(ms) | Value::LocalTimestampMillis(ms) => DateTime::from_timestamp_millis(*ms)
            .map_or_else(|| json!(ms), |t| json!(t.to_rfc3339_opts(SecondsFormat::Millis, true))),
        Value::Date(days) => NaiveDate::from_ymd_opt(1970, 1, 1)
            .and_then(|epoch| epoch.checked_add_signed(TimeDelta::days(i64::from(*days))))
            .map_or_else(|| json!(days), |d| json!(d.to_string())),
        Value::Uuid(uuid) => json!(uuid.to_string()),
        Value::BigDecimal(big) => json!(big.to_string()),
        // Containers only reach here when value and schema disagree; print them schema-less.
        Value::Union(_, inner) => walk(inner, schema, names),
        Value::Array(items) => Json::Array(items.iter().map(|i| scalar(i, names, &Schema::Null)).collect()),
        Value::Map(m) => Json::Object(m.iter().map(|(k, v)| (k.clone(), scalar(v, names, &Schema::Null))).collect()),
        Value::Record(fields) => {
            Json::Object(fields.iter().map(|(k, v)| (k.clone(), scalar(v, names, &Schema::Null))).collect())
        }
        Value::Decimal(d) => json!(base64_of(&Vec::<u8>::try_from(d).unwrap_or_default())),
        Value::Duration(d) => json!(format!("{d:?}")),
    }
}

/// The exact decimal string of big-endian two's complement `bytes` with `scale`, normalised
/// (`12.5`, `0`, `1000000`); `None` beyond 16 bytes or rust_decimal's range.
fn decimal_string(bytes: &[u8], scale: u32) -> Option<String> {
    if bytes.is_empty() || bytes.len() > 16 || scale > 28 {
        return None;
    }
    let fill = if bytes[0] & 0x80 != 0 { 0xFF } else { 0 };
    let mut buffer = [fill; 16];
    buffer[16 - bytes.len()..].copy_from_slice(bytes);
    let unscaled = i128::from_be_bytes(buffer);
    Decimal::try_from_i128_with_scale(unscaled, scale).ok().map(|d| d.normalize().to_string())
}

fn base64_of(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_times_and_unions_print_exactly() {
        let schema = Schema::parse_str(
            r#"{"type":"record","name":"R","fields":[
              {"name":"amount","type":{"type":"bytes","logicalType":"decimal","precision":18,"scale":6}},
              {"name":"at","type":{"type":"long","logicalType":"timestamp-millis"}},
              {"name":"day","type":{"type":"int","logicalType":"date"}},
              {"name":"note","type":["null","string"],"default":null}]}"#,
        )
        .unwrap();
        let value = Value::Record(vec![
            ("amount".into(), Value::Decimal(apache_avro::Decimal::from(12_500_000_i64.to_be_bytes().to_vec()))),
            ("at".into(), Value::TimestampMillis(1_700_000_000_123)),
            ("day".into(), Value::Date(19_000)),
            ("note".into(), Value::Union(1, Box::new(Value::String("hi".into())))),
        ]);
        assert_eq!(
            value_to_json(&value, &schema),
            json!({"amount": "12.5", "at": "2023-11-14T22:13:20.123Z", "day": "2022-01-08", "note": "hi"})
        );
    }

    #[test]
    fn negative_and_large_decimals_are_exact() {
        assert_eq!(decimal_string(&(-1_i64).to_be_bytes(), 6).unwrap(), "-0.000001");
        assert_eq!(decimal_string(&999_999_999_999_999_999_i64.to_be_bytes(), 6).unwrap(), "999999999999.999999");
        assert_eq!(decimal_string(&1_000_000_000_000_i64.to_be_bytes(), 6).unwrap(), "1000000");
    }
}
