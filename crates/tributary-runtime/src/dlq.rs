//! Dead letters: the record as it was read, plus headers that say why it could not be
//! processed (DESIGN.md, "Processing guarantees").
//!
//! The value and key are the original bytes, untouched, so that a replay re-publishes exactly
//! what the producer sent; the original headers are kept and the `dlq_*` headers added.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use tributary_contracts::codec::Location;
use tributary_contracts::headers;

/// Why a record was dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The service that gave up on it.
    pub service: String,
    /// A bounded error class.
    pub class: String,
    /// The error message.
    pub message: String,
    /// Where the record was read.
    pub source: Location,
    /// Attempts made.
    pub attempts: u32,
    /// When the first attempt failed.
    pub first_failure_at: DateTime<Utc>,
}

impl DeadLetter {
    /// The `dlq_*` headers.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        vec![
            (headers::DLQ_SERVICE, self.service.clone()),
            (headers::DLQ_ERROR_CLASS, self.class.clone()),
            (headers::DLQ_ERROR_MESSAGE, self.message.clone()),
            (headers::DLQ_SOURCE_TOPIC, self.source.topic.clone()),
            (headers::DLQ_SOURCE_PARTITION, self.source.partition.to_string()),
            (headers::DLQ_SOURCE_OFFSET, self.source.offset.to_string()),
            (headers::DLQ_ATTEMPTS, self.attempts.to_string()),
            (headers::DLQ_FIRST_FAILURE_AT, self.first_failure_at.to_rfc3339_opts(SecondsFormat::Millis, true)),
        ]
    }

    /// Reads the `dlq_*` headers back; `None` if any is missing or malformed.
    pub fn from_headers(headers: &BTreeMap<String, String>) -> Option<Self> {
        let get = |name: &str| headers.get(name).cloned();
        Some(Self {
            service: get(headers::DLQ_SERVICE)?,
            class: get(headers::DLQ_ERROR_CLASS)?,
            message: get(headers::DLQ_ERROR_MESSAGE)?,
            source: Location::new(
                get(headers::DLQ_SOURCE_TOPIC)?,
                get(headers::DLQ_SOURCE_PARTITION)?.parse().ok()?,
                get(headers::DLQ_SOURCE_OFFSET)?.parse().ok()?,
            ),
            attempts: get(headers::DLQ_ATTEMPTS)?.parse().ok()?,
            first_failure_at: DateTime::parse_from_rfc3339(&get(headers::DLQ_FIRST_FAILURE_AT)?).ok()?.to_utc(),
        })
    }

    /// Whether `name` is one of the headers this module adds (dropped again on replay).
    pub fn is_dlq_header(name: &str) -> bool {
        name.starts_with("dlq_")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip() {
        let letter = DeadLetter {
            service: "usage-ingest".into(),
            class: "validation".into(),
            message: "negative quantity".into(),
            source: Location::new("usage.events", 2, 99),
            attempts: 1,
            first_failure_at: DateTime::parse_from_rfc3339("2026-11-29T10:00:00.123Z").unwrap().to_utc(),
        };
        let map: BTreeMap<String, String> = letter.headers().into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        assert_eq!(DeadLetter::from_headers(&map), Some(letter));
        assert!(map.keys().all(|k| DeadLetter::is_dlq_header(k)));
    }
}
