//! Avro values as JSON for people and analysts' tools (`tributary tap`), and back
//! (`tributary publish`).
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

/// Why a JSON value does not fit a schema: where (a path such as `included_usage[0].unit`)
/// and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct JsonMismatch {
    /// The field path, `$` for the root.
    pub path: String,
    /// What is wrong.
    pub reason: String,
}

/// `json` as an Avro value of `schema`: the inverse of [`value_to_json`]. Decimals are read from
/// strings or numbers (exactly, by their text), `timestamp-millis` from RFC 3339 or epoch
/// milliseconds, `date` from `YYYY-MM-DD` or days; a missing field takes the schema's default.
pub fn json_to_value(json: &Json, schema: &Schema) -> Result<Value, JsonMismatch> {
    let names = ResolvedSchema::try_from(schema).map(|r| r.get_names().clone()).unwrap_or_default();
    unwalk(json, schema, &names, "$")
}

fn unwalk(json: &Json, schema: &Schema, names: &NamesRef<'_>, path: &str) -> Result<Value, JsonMismatch> {
    let mismatch = |reason: String| JsonMismatch { path: path.to_owned(), reason };
    let schema = match schema {
        Schema::Ref { name } => names.get(name).copied().ok_or_else(|| mismatch(format!("unknown type {name}")))?,
        other => other,
    };
    Ok(match (schema, json) {
        (Schema::Union(union), json) => {
            let mut last = None;
            for (index, variant) in union.variants().iter().enumerate() {
                match (variant, json) {
                    (Schema::Null, Json::Null) => return Ok(Value::Union(index as u32, Box::new(Value::Null))),
                    (Schema::Null, _) => continue,
                    (variant, json) => match unwalk(json, variant, names, path) {
                        Ok(value) => return Ok(Value::Union(index as u32, Box::new(value))),
                        Err(error) => last = Some(error),
                    },
                }
            }
            return Err(last.unwrap_or_else(|| mismatch(format!("{json} fits no branch of the union"))));
        }
        (Schema::Record(record), Json::Object(object)) => {
            let mut fields = Vec::with_capacity(record.fields.len());
            for field in &record.fields {
                let field_path = if path == "$" { field.name.clone() } else { format!("{path}.{}", field.name) };
                let value = match (object.get(&field.name), &field.default) {
                    (Some(json), _) => unwalk(json, &field.schema, names, &field_path)?,
                    (None, Some(default)) => unwalk(default, &field.schema, names, &field_path)?,
                    (None, None) => {
                        return Err(JsonMismatch { path: field_path, reason: "missing (and has no default)".into() });
                    }
                };
                fields.push((field.name.clone(), value));
            }
            if let Some(unknown) = object.keys().find(|k| !record.lookup.contains_key(*k)) {
                return Err(mismatch(format!("unknown field {unknown:?}")));
            }
            Value::Record(fields)
        }
        (Schema::Array(array), Json::Array(items)) => Value::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, item)| unwalk(item, &array.items, names, &format!("{path}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        (Schema::Map(map), Json::Object(entries)) => Value::Map(
            entries
                .iter()
                .map(|(k, v)| Ok((k.clone(), unwalk(v, &map.types, names, &format!("{path}.{k}"))?)))
                .collect::<Result<_, _>>()?,
        ),
        (Schema::Enum(enumeration), Json::String(symbol)) => {
            let index = enumeration
                .symbols
                .iter()
                .position(|s| s == symbol)
                .ok_or_else(|| mismatch(format!("{symbol:?} is not one of {:?}", enumeration.symbols)))?;
            Value::Enum(index as u32, symbol.clone())
        }
        (Schema::Decimal(decimal), Json::String(_) | Json::Number(_)) => {
            let text = match json {
                Json::String(text) => text.clone(),
                other => other.to_string(),
            };
            let parsed: Decimal = text.parse().map_err(|_| mismatch(format!("{text:?} is not a decimal")))?;
            let scale = decimal.scale as u32;
            if parsed.scale() > scale {
                return Err(mismatch(format!("{text} has more than {scale} fractional digits")));
            }
            let mut scaled = parsed;
            scaled.rescale(scale);
            Value::Decimal(apache_avro::Decimal::from(scaled.mantissa().to_be_bytes().to_vec()))
        }
        (Schema::TimestampMillis, Json::String(text)) => Value::TimestampMillis(
            DateTime::parse_from_rfc3339(text)
                .map_err(|e| mismatch(format!("{text:?} is not an RFC 3339 time: {e}")))?
                .timestamp_millis(),
        ),
        (Schema::TimestampMillis, Json::Number(n)) => {
            Value::TimestampMillis(n.as_i64().ok_or_else(|| mismatch(format!("{n} is not epoch milliseconds")))?)
        }
        (Schema::Date, Json::String(text)) => {
            let date: NaiveDate = text.parse().map_err(|_| mismatch(format!("{text:?} is not a YYYY-MM-DD date")))?;
            let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).expect("the epoch");
            Value::Date((date - epoch).num_days() as i32)
        }
        (Schema::Date, Json::Number(n)) => Value::Date(
            n.as_i64()
                .and_then(|d| i32::try_from(d).ok())
                .ok_or_else(|| mismatch(format!("{n} is not a day count")))?,
        ),
        (Schema::Null, Json::Null) => Value::Null,
        (Schema::Boolean, Json::Bool(b)) => Value::Boolean(*b),
        (Schema::Int, Json::Number(n)) => Value::Int(
            n.as_i64().and_then(|i| i32::try_from(i).ok()).ok_or_else(|| mismatch(format!("{n} is not an int")))?,
        ),
        (Schema::Long, Json::Number(n)) => {
            Value::Long(n.as_i64().ok_or_else(|| mismatch(format!("{n} is not a long")))?)
        }
        (Schema::Double, Json::Number(n)) => Value::Double(n.as_f64().unwrap_or_default()),
        (Schema::Float, Json::Number(n)) => Value::Float(n.as_f64().unwrap_or_default() as f32),
        (Schema::String, Json::String(text)) => Value::String(text.clone()),
        (Schema::Bytes, Json::String(text)) => Value::Bytes(
            base64::engine::general_purpose::STANDARD.decode(text).map_err(|e| mismatch(format!("not base64: {e}")))?,
        ),
        (schema, json) => return Err(mismatch(format!("{json} does not fit {}", kind_of(schema)))),
    })
}

fn kind_of(schema: &Schema) -> String {
    match schema {
        Schema::Record(record) => format!("record {}", record.name.name()),
        Schema::Enum(enumeration) => format!("enum {}", enumeration.name.name()),
        other => format!("{:?}", apache_avro::schema::SchemaKind::from(other)).to_lowercase(),
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
    fn json_goes_back_to_the_same_avro_value() {
        for topic in ["refdata.contracts", "billing.payments", "usage.events", "usage.late"] {
            let schema = crate::codec::reader_schema(topic).unwrap();
            let value = crate::samples::sample(schema, crate::samples::Fill::Full, 9);
            let json = value_to_json(&value, schema);
            let back = json_to_value(&json, schema).unwrap_or_else(|e| panic!("{topic}: {e}"));
            assert_eq!(value_to_json(&back, schema), json, "{topic}");
            assert!(back.validate(schema), "{topic}: the value fits its schema");
        }
    }

    #[test]
    fn a_typed_contract_prints_as_its_avro_value_does() {
        let payment: crate::types::Payment = crate::samples::typed(crate::samples::Fill::Full, 4);
        let schema = crate::codec::reader_schema("billing.payments").unwrap();
        let value = apache_avro::to_value(&payment).unwrap().resolve(schema).unwrap();
        let json = crate::codec::contract_to_json(&payment).unwrap();
        assert_eq!(json, value_to_json(&value, schema));
        assert!(json["amount"].is_string(), "decimals as exact strings: {json}");
        assert_eq!(json["envelope"]["event_id"], json!(payment.envelope.event_id));
    }

    #[test]
    fn a_mismatch_names_the_field_path() {
        let schema = crate::codec::reader_schema("refdata.contracts").unwrap();
        let value = crate::samples::sample(schema, crate::samples::Fill::Full, 9);
        let mut json = value_to_json(&value, schema);
        json["included_usage"][0]["included_quantity"] = json!("1.0000001");
        let error = json_to_value(&json, schema).unwrap_err();
        assert_eq!(error.path, "included_usage[0].included_quantity");
        json["included_usage"][0]["included_quantity"] = json!("12");
        json["status"] = json!("ALIVE");
        assert_eq!(json_to_value(&json, schema).unwrap_err().path, "status");
        json["status"] = json!("ACTIVE");
        json.as_object_mut().unwrap().remove("currency");
        assert_eq!(json_to_value(&json, schema).unwrap_err().path, "currency");
    }

    #[test]
    fn negative_and_large_decimals_are_exact() {
        assert_eq!(decimal_string(&(-1_i64).to_be_bytes(), 6).unwrap(), "-0.000001");
        assert_eq!(decimal_string(&999_999_999_999_999_999_i64.to_be_bytes(), 6).unwrap(), "999999999999.999999");
        assert_eq!(decimal_string(&1_000_000_000_000_i64.to_be_bytes(), 6).unwrap(), "1000000");
    }
}
