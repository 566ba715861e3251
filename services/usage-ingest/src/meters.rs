//! Meters: which usage events count towards what, and how.
//!
//! A meter is configuration (the OpenMeter model): the event `type` it listens to, the JSON
//! path of the value in `data`, the aggregation, and the group-by dimensions. [`Meters::measure`]
//! turns one event into one [`Measurement`] per meter it belongs to, or refuses it with the
//! reason; the HTTP endpoint and the Kafka path use the same check, so an event is refused
//! the same way whichever way it came in.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json_path::JsonPath;
use tributary_contracts::decimal::Decimal6;
use tributary_contracts::types::UsageEvent;

/// How a meter folds values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Aggregation {
    /// The sum of the values.
    Sum,
    /// The number of events.
    Count,
    /// The largest value.
    Max,
    /// The number of distinct values.
    UniqueCount,
    /// The value of the event with the latest `time`.
    Latest,
}

/// A meter as configured.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeterDefinition {
    /// The meter key, e.g. `api_calls`; what contracts' `included_usage` names.
    pub key: String,
    /// The event `type` it counts, e.g. `api_request`.
    pub event_type: String,
    /// How it folds values.
    pub aggregation: Aggregation,
    /// JSONPath of the value in `data`, e.g. `$.tokens`; not used by COUNT.
    #[serde(default)]
    pub value_property: Option<String>,
    /// Unit of the totals, e.g. `request`.
    pub unit: String,
    /// Group-by dimensions: name → JSONPath in `data`, e.g. `region = "$.region"`.
    #[serde(default)]
    pub group_by: BTreeMap<String, String>,
}

/// A compiled meter.
#[derive(Debug)]
pub struct Meter {
    /// Its definition.
    pub definition: MeterDefinition,
    value: Option<JsonPath>,
    group_by: Vec<(String, JsonPath)>,
}

/// What one event contributes to one meter.
#[derive(Debug, Clone, PartialEq)]
pub enum Reading {
    /// A quantity (SUM, MAX, LATEST).
    Quantity(Decimal6),
    /// One event (COUNT).
    One,
    /// A value whose distinct occurrences are counted (UNIQUE_COUNT).
    Distinct(String),
}

/// One event's contribution to one meter.
#[derive(Debug)]
pub struct Measurement<'m> {
    /// The meter.
    pub meter: &'m Meter,
    /// The value.
    pub reading: Reading,
    /// Group-by values (explicit ones from the event win over extracted ones).
    pub dimensions: BTreeMap<String, String>,
}

/// Why an event is refused: the field at fault and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize)]
#[error("{field}: {reason}")]
pub struct Rejection {
    /// The field, e.g. `time` or `data.tokens`.
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

impl Rejection {
    fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self { field: field.into(), reason: reason.into() }
    }
}

/// Bounds on event times, relative to the processing time.
#[derive(Debug, Clone, Copy)]
pub struct TimeBounds {
    /// Oldest acceptable event age.
    pub max_age: Duration,
    /// Furthest acceptable distance into the future.
    pub max_skew: Duration,
}

/// Every configured meter.
#[derive(Debug)]
pub struct Meters {
    meters: Vec<Meter>,
}

impl Meters {
    /// Compiles the definitions; every problem is reported.
    pub fn compile(definitions: &[MeterDefinition]) -> Result<Self, Vec<String>> {
        let mut errors = Vec::new();
        let mut meters = Vec::new();
        let mut keys = std::collections::BTreeSet::new();
        for definition in definitions {
            let at = format!("usage_ingest.meters[{}]", definition.key);
            if definition.key.is_empty() || definition.event_type.is_empty() || definition.unit.is_empty() {
                errors.push(format!("{at}: key, event_type and unit must not be empty"));
            }
            if !keys.insert(definition.key.clone()) {
                errors.push(format!("{at}: defined twice"));
            }
            let value = match (&definition.value_property, definition.aggregation) {
                (None, Aggregation::Count) => None,
                (None, aggregation) => {
                    errors.push(format!("{at}: {aggregation:?} needs a value_property"));
                    None
                }
                (Some(path), _) => match JsonPath::parse(path) {
                    Ok(path) => Some(path),
                    Err(error) => {
                        errors.push(format!("{at}.value_property {path:?}: {error}"));
                        None
                    }
                },
            };
            let mut group_by = Vec::new();
            for (dimension, path) in &definition.group_by {
                match JsonPath::parse(path) {
                    Ok(parsed) => group_by.push((dimension.clone(), parsed)),
                    Err(error) => errors.push(format!("{at}.group_by.{dimension} {path:?}: {error}")),
                }
            }
            meters.push(Meter { definition: definition.clone(), value, group_by });
        }
        if errors.is_empty() { Ok(Self { meters }) } else { Err(errors) }
    }

    /// The meter `key`.
    pub fn get(&self, key: &str) -> Option<&Meter> {
        self.meters.iter().find(|m| m.definition.key == key)
    }

    /// Checks `event` and returns what it contributes to each of its meters, or why it is
    /// refused.
    pub fn measure(
        &self,
        event: &UsageEvent,
        now: DateTime<Utc>,
        bounds: TimeBounds,
    ) -> Result<Vec<Measurement<'_>>, Rejection> {
        for (field, value) in [
            ("id", &event.id),
            ("source", &event.source),
            ("type", &event.r#type),
            ("subject", &event.subject),
            ("account", &event.envelope.account_id),
        ] {
            if value.trim().is_empty() {
                return Err(Rejection::new(field, "missing"));
            }
        }
        check_time(event.time, now, bounds)?;
        let data: Value =
            serde_json::from_str(&event.data).map_err(|e| Rejection::new("data", format!("not JSON: {e}")))?;
        if !data.is_object() {
            return Err(Rejection::new("data", "must be a JSON object"));
        }
        if let Some(quantity) = event.quantity
            && quantity.value().is_sign_negative()
            && !quantity.value().is_zero()
        {
            return Err(Rejection::new("quantity", format!("{quantity} is negative")));
        }
        let meters: Vec<&Meter> = match &event.meter {
            Some(key) => vec![self.get(key).ok_or_else(|| Rejection::new("meter", format!("unknown meter {key:?}")))?],
            None => self.meters.iter().filter(|m| m.definition.event_type == event.r#type).collect(),
        };
        if meters.is_empty() {
            return Err(Rejection::new(
                "type",
                format!("unknown meter: no meter counts events of type {:?}", event.r#type),
            ));
        }
        meters.into_iter().map(|meter| meter.measure(event, &data)).collect()
    }
}

impl Meter {
    fn measure(&self, event: &UsageEvent, data: &Value) -> Result<Measurement<'_>, Rejection> {
        let definition = &self.definition;
        if let Some(unit) = &event.unit
            && unit != &definition.unit
        {
            return Err(Rejection::new(
                "unit",
                format!("{unit:?} is not the unit {:?} of meter {}", definition.unit, definition.key),
            ));
        }
        let reading = match definition.aggregation {
            Aggregation::Count => Reading::One,
            Aggregation::UniqueCount => Reading::Distinct(self.distinct_value(data)?),
            Aggregation::Sum | Aggregation::Max | Aggregation::Latest => Reading::Quantity(match event.quantity {
                Some(quantity) => quantity,
                None => self.quantity(data)?,
            }),
        };
        let mut dimensions = BTreeMap::new();
        for (dimension, path) in &self.group_by {
            if let Ok(Some(value)) = path.query(data).at_most_one() {
                dimensions.insert(dimension.clone(), scalar_text(value));
            }
        }
        for (dimension, value) in &event.dimensions {
            if definition.group_by.contains_key(dimension) {
                dimensions.insert(dimension.clone(), value.clone());
            }
        }
        Ok(Measurement { meter: self, reading, dimensions })
    }

    fn value_field(&self) -> String {
        let path = self.definition.value_property.as_deref().unwrap_or("$");
        format!("data{}", path.trim_start_matches('$'))
    }

    fn value<'d>(&self, data: &'d Value) -> Result<&'d Value, Rejection> {
        let path = self.value.as_ref().expect("compiled: every non-COUNT meter has a value path");
        match path.query(data).at_most_one() {
            Ok(Some(Value::Null)) | Ok(None) => Err(Rejection::new(
                self.value_field(),
                format!("missing (meter {} reads its value there)", self.definition.key),
            )),
            Ok(Some(value)) => Ok(value),
            Err(_) => Err(Rejection::new(self.value_field(), "matches more than one value")),
        }
    }

    fn quantity(&self, data: &Value) -> Result<Decimal6, Rejection> {
        let field = self.value_field();
        let quantity = quantity_from_json(&field, self.value(data)?)?;
        if quantity.value().is_sign_negative() && !quantity.value().is_zero() {
            return Err(Rejection::new(field, format!("{quantity} is negative")));
        }
        Ok(quantity)
    }

    fn distinct_value(&self, data: &Value) -> Result<String, Rejection> {
        Ok(scalar_text(self.value(data)?))
    }
}

/// A quantity given as a JSON number or a decimal string (`1532`, `"1.5"`, `1e3`), read exactly
/// from its text; `field` names it in the rejection.
pub fn quantity_from_json(field: &str, value: &Value) -> Result<Decimal6, Rejection> {
    let text = match value {
        Value::Number(number) => number.to_string(),
        Value::String(text) => text.clone(),
        other => return Err(Rejection::new(field, format!("{other} is not a number"))),
    };
    let decimal = Decimal::from_scientific(&text)
        .or_else(|_| text.parse::<Decimal>())
        .map_err(|_| Rejection::new(field, format!("{text:?} is not a number")))?;
    Decimal6::new(decimal).map_err(|e| Rejection::new(field, e.to_string()))
}

/// A JSON value as group-by text: strings unquoted, anything else as JSON.
fn scalar_text(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

fn check_time(time_ms: i64, now: DateTime<Utc>, bounds: TimeBounds) -> Result<(), Rejection> {
    let Some(time) = DateTime::<Utc>::from_timestamp_millis(time_ms) else {
        return Err(Rejection::new("time", format!("{time_ms} ms is out of range")));
    };
    let skew = chrono::Duration::from_std(bounds.max_skew).unwrap_or(chrono::Duration::MAX);
    let age = chrono::Duration::from_std(bounds.max_age).unwrap_or(chrono::Duration::MAX);
    if time > now + skew {
        return Err(Rejection::new(
            "time",
            format!(
                "{time} is in the future (more than {} ahead of {now})",
                humantime::format_duration(bounds.max_skew)
            ),
        ));
    }
    if time < now - age {
        return Err(Rejection::new(
            "time",
            format!(
                "{time} is too far in the past (older than {}, beyond which duplicates cannot be recognised)",
                humantime::format_duration(bounds.max_age)
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tributary_contracts::samples::{Fill, typed};

    fn meters() -> Meters {
        let toml = r#"
            [[meters]]
            key = "tokens"
            event_type = "llm.completion"
            aggregation = "SUM"
            value_property = "$.tokens"
            unit = "token"
            group_by = { model = "$.model" }
            [[meters]]
            key = "requests"
            event_type = "llm.completion"
            aggregation = "COUNT"
            unit = "request"
            [[meters]]
            key = "users"
            event_type = "login"
            aggregation = "UNIQUE_COUNT"
            value_property = "$.user.id"
            unit = "user"
        "#;
        #[derive(Deserialize)]
        struct Doc {
            meters: Vec<MeterDefinition>,
        }
        let doc: Doc = toml::from_str(toml).unwrap();
        Meters::compile(&doc.meters).unwrap()
    }

    fn event(event_type: &str, data: &str) -> UsageEvent {
        let mut event: UsageEvent = typed(Fill::Minimal, 1);
        event.id = "e1".into();
        event.source = "test".into();
        event.subject = "acct-1".into();
        event.envelope.account_id = "acct-1".into();
        event.r#type = event_type.into();
        event.data = data.into();
        event.time = Utc::now().timestamp_millis();
        event
    }

    const BOUNDS: TimeBounds = TimeBounds { max_age: Duration::from_secs(86_400), max_skew: Duration::from_secs(300) };

    #[test]
    fn an_event_is_measured_by_every_meter_of_its_type_with_its_dimensions() {
        let meters = meters();
        let completion = event("llm.completion", r#"{"tokens": 1532.5, "model": "large"}"#);
        let measured = meters.measure(&completion, Utc::now(), BOUNDS).unwrap();
        assert_eq!(measured.len(), 2);
        assert_eq!(measured[0].reading, Reading::Quantity("1532.5".parse().unwrap()));
        assert_eq!(measured[0].dimensions.get("model").map(String::as_str), Some("large"));
        assert_eq!(measured[1].reading, Reading::One);
        let login = event("login", r#"{"user": {"id": 42}}"#);
        assert_eq!(meters.measure(&login, Utc::now(), BOUNDS).unwrap()[0].reading, Reading::Distinct("42".into()));
    }

    #[test]
    fn invalid_events_are_refused_with_the_field_at_fault() {
        let meters = meters();
        let now = Utc::now();
        let field = |event: &UsageEvent| meters.measure(event, now, BOUNDS).unwrap_err().field;
        assert_eq!(field(&event("nope", "{}")), "type");
        assert_eq!(field(&event("llm.completion", r#"{"model": "x"}"#)), "data.tokens");
        assert_eq!(field(&event("llm.completion", r#"{"tokens": -3}"#)), "data.tokens");
        assert_eq!(field(&event("llm.completion", "[1]")), "data");
        let mut future = event("login", r#"{"user": {"id": 1}}"#);
        future.time = (now + chrono::Duration::hours(1)).timestamp_millis();
        assert_eq!(field(&future), "time");
        let mut old = future.clone();
        old.time = (now - chrono::Duration::days(2)).timestamp_millis();
        assert_eq!(field(&old), "time");
        let mut unknown = future.clone();
        unknown.time = now.timestamp_millis();
        unknown.meter = Some("nope".into());
        assert_eq!(field(&unknown), "meter");
        let mut no_id = unknown.clone();
        no_id.meter = None;
        no_id.id = String::new();
        assert_eq!(field(&no_id), "id");
    }

    #[test]
    fn a_bad_meter_definition_is_reported() {
        let bad = MeterDefinition {
            key: "x".into(),
            event_type: "t".into(),
            aggregation: Aggregation::Sum,
            value_property: None,
            unit: "u".into(),
            group_by: [("r".into(), "$[".into())].into(),
        };
        let errors = Meters::compile(&[bad]).unwrap_err();
        assert_eq!(errors.len(), 2, "{errors:?}");
    }
}
