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

/// A record found in a DLQ.
#[derive(Debug, Clone)]
pub struct DlqEntry {
    /// Where it sits in the DLQ.
    pub location: tributary_contracts::codec::Location,
    /// Why it is there; `None` if the `dlq_*` headers are missing (not written by Tributary).
    pub letter: Option<DeadLetter>,
    /// The original key.
    pub key: Option<Vec<u8>>,
    /// The original value.
    pub payload: Option<Vec<u8>>,
    /// All headers, the original ones and the `dlq_*` ones.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl DlqEntry {
    /// The headers as text.
    pub fn header_map(&self) -> BTreeMap<String, String> {
        self.headers
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), String::from_utf8_lossy(v.as_ref()?).into_owned())))
            .collect()
    }
}

/// Which DLQ records to replay.
#[derive(Debug, Clone, Default)]
pub struct ReplayFilter {
    /// Only this error class.
    pub class: Option<String>,
    /// Only records whose first failure is at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Only records whose first failure is before this time.
    pub until: Option<DateTime<Utc>>,
    /// Only this DLQ partition.
    pub partition: Option<i32>,
    /// Only DLQ offsets in this inclusive range.
    pub offsets: Option<(i64, i64)>,
}

impl ReplayFilter {
    /// Whether `entry` passes the filter.
    pub fn matches(&self, entry: &DlqEntry) -> bool {
        let Some(letter) = &entry.letter else { return false };
        self.class.as_ref().is_none_or(|class| *class == letter.class)
            && self.since.is_none_or(|since| letter.first_failure_at >= since)
            && self.until.is_none_or(|until| letter.first_failure_at < until)
            && self.partition.is_none_or(|p| p == entry.location.partition)
            && self.offsets.is_none_or(|(from, to)| (from..=to).contains(&entry.location.offset))
    }
}

/// The DLQ topic of `service` on the cluster described by `kafka`.
pub fn dlq_topic(kafka: &crate::config::KafkaConfig, service: &str) -> String {
    kafka.topic(&tributary_contracts::topics::dlq_topic(service))
}

/// Every record in the DLQ of `service`.
pub async fn list(kafka: &crate::config::KafkaConfig, service: &str) -> anyhow::Result<Vec<DlqEntry>> {
    use rdkafka::message::{Headers, Message};
    let topic = dlq_topic(kafka, service);
    let mut entries = Vec::new();
    crate::kafka::read_to_end(kafka, &topic, None, |message| {
        let headers: Vec<(String, Option<Vec<u8>>)> = message
            .headers()
            .map(|h| h.iter().map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec))).collect())
            .unwrap_or_default();
        let mut entry = DlqEntry {
            location: tributary_contracts::codec::Location::new(&topic, message.partition(), message.offset()),
            letter: None,
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
            headers,
        };
        entry.letter = DeadLetter::from_headers(&entry.header_map());
        entries.push(entry);
    })
    .await?;
    Ok(entries)
}

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// DLQ records read.
    pub examined: usize,
    /// Records that passed the filter (and were re-published, unless a dry run).
    pub selected: usize,
    /// Whether anything was written.
    pub dry_run: bool,
}

/// Re-publishes the DLQ records of `service` that pass `filter` to their source topic (or to
/// `target`), with their original key, value and headers, plus `replayed_from`. They pass the
/// service's idempotency keys again, so replaying a record twice processes it once. A
/// dead-lettered timer goes back to its partition of `<service>.timer-replays`, where the
/// service schedules it again (once per dead letter).
pub async fn replay(
    kafka: &crate::config::KafkaConfig,
    service: &str,
    filter: &ReplayFilter,
    target: Option<&str>,
    dry_run: bool,
) -> anyhow::Result<ReplayReport> {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let entries = list(kafka, service).await?;
    let selected: Vec<&DlqEntry> = entries.iter().filter(|e| filter.matches(e)).collect();
    let report = ReplayReport { examined: entries.len(), selected: selected.len(), dry_run };
    if dry_run || selected.is_empty() {
        return Ok(report);
    }
    let producer: FutureProducer =
        crate::kafka::producer_config(kafka).set("enable.idempotence", "true").set("acks", "all").create()?;
    for entry in selected {
        let letter = entry.letter.as_ref().expect("the filter passes only entries with DLQ headers");
        let topic = target.unwrap_or(&letter.source.topic);
        let mut headers = OwnedHeaders::new();
        for (name, value) in entry.headers.iter().filter(|(name, _)| !DeadLetter::is_dlq_header(name)) {
            headers = headers.insert(Header { key: name, value: value.as_deref() });
        }
        let origin = entry.location.to_string();
        headers = headers.insert(Header { key: tributary_contracts::headers::REPLAYED_FROM, value: Some(&origin) });
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(headers);
        // A dead-lettered timer belongs to its partition's state, whatever its key hashes to.
        let is_timer = entry.headers.iter().any(|(name, _)| name == tributary_contracts::headers::DLQ_TIMER_KEY);
        if is_timer && target.is_none() {
            record = record.partition(letter.source.partition);
        }
        if let Some(key) = &entry.key {
            record = record.key(key);
        }
        if let Some(payload) = &entry.payload {
            record = record.payload(payload);
        }
        producer
            .send(record, std::time::Duration::from_secs(30))
            .await
            .map_err(|(error, _)| anyhow::Error::new(error).context(format!("replaying {origin} to {topic}")))?;
    }
    Ok(report)
}
