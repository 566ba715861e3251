//! The envelope every record carries, and the Kafka headers derived from it.
//!
//! A record that starts a business flow gets a fresh correlation id; every record caused by
//! another keeps the cause's correlation id and names the cause in `causation_id`. Derived
//! records get a deterministic `event_id` (UUIDv5 of the cause and a discriminator), so that an
//! input processed twice (after a crash, before its commit) yields byte-identical outputs.

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use uuid::Uuid;

use crate::headers;
use crate::types::Envelope;

/// Namespace of the UUIDv5 event ids of derived records.
const DERIVED_EVENT_NAMESPACE: Uuid = Uuid::from_u128(0x5c1e_7a0b_7d1b_4f4e_9a57_7269_6275_7461);

impl Envelope {
    /// The envelope of a record that starts a business flow.
    pub fn originating(source: &str, account_id: &str, occurred_at: DateTime<Utc>) -> Self {
        let event_id = Uuid::new_v4().to_string();
        Self {
            correlation_id: event_id.clone(),
            event_id,
            occurred_at: occurred_at.timestamp_millis(),
            causation_id: None,
            source: source.to_owned(),
            account_id: account_id.to_owned(),
        }
    }

    /// The envelope of a record caused by the record with envelope `cause`.
    ///
    /// `discriminator` tells apart several outputs of one input (e.g. `threshold-80`); the
    /// event id is a function of the cause, the source and the discriminator only.
    pub fn caused_by(cause: &Envelope, source: &str, discriminator: &str, occurred_at: DateTime<Utc>) -> Self {
        let name = format!("{source}\u{1f}{}\u{1f}{discriminator}", cause.event_id);
        Self {
            event_id: Uuid::new_v5(&DERIVED_EVENT_NAMESPACE, name.as_bytes()).to_string(),
            occurred_at: occurred_at.timestamp_millis(),
            correlation_id: cause.correlation_id.clone(),
            causation_id: Some(cause.event_id.clone()),
            source: source.to_owned(),
            account_id: cause.account_id.clone(),
        }
    }

    /// The envelope of a record that a schedule caused (a timer: a grace period ended, a renewal
    /// milestone came): it starts a flow of its own (its correlation id is its event id, it has
    /// no causation id), and its event id is derived from `seed` and `discriminator`, so that a
    /// timer fired twice writes the same ids.
    pub fn scheduled(
        source: &str,
        account_id: &str,
        seed: &str,
        discriminator: &str,
        occurred_at: DateTime<Utc>,
    ) -> Self {
        let origin = Envelope {
            event_id: seed.to_owned(),
            occurred_at: occurred_at.timestamp_millis(),
            correlation_id: String::new(),
            causation_id: None,
            source: source.to_owned(),
            account_id: account_id.to_owned(),
        };
        let mut envelope = Self::caused_by(&origin, source, discriminator, occurred_at);
        envelope.correlation_id = envelope.event_id.clone();
        envelope.causation_id = None;
        envelope
    }

    /// `occurred_at` as a UTC time (the epoch if out of range, which no valid record is).
    pub fn occurred_at_utc(&self) -> DateTime<Utc> {
        Utc.timestamp_millis_opt(self.occurred_at).single().unwrap_or_default()
    }

    /// The CloudEvents headers of a record with this envelope and value type `ce_type`
    /// (the record's full Avro name), plus the correlation id.
    pub fn cloudevents_headers(&self, ce_type: &str) -> Vec<(&'static str, String)> {
        vec![
            (headers::CE_SPECVERSION, headers::CLOUDEVENTS_VERSION.to_owned()),
            (headers::CE_ID, self.event_id.clone()),
            (headers::CE_TYPE, ce_type.to_owned()),
            (headers::CE_SOURCE, self.source.clone()),
            (headers::CE_TIME, self.occurred_at_utc().to_rfc3339_opts(SecondsFormat::Millis, true)),
            (headers::CORRELATION_ID, self.correlation_id.clone()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_derived_envelope_keeps_the_flow_and_names_its_cause() {
        let now = Utc::now();
        let cause = Envelope::originating("platform", "acct-1", now);
        assert_eq!(cause.correlation_id, cause.event_id);
        let derived = Envelope::caused_by(&cause, "tributary.usage-ingest", "threshold-80", now);
        assert_eq!(derived.correlation_id, cause.correlation_id);
        assert_eq!(derived.causation_id.as_deref(), Some(cause.event_id.as_str()));
        assert_eq!(derived.account_id, "acct-1");
        assert_ne!(derived.event_id, cause.event_id);
    }

    #[test]
    fn derived_event_ids_are_deterministic_per_cause_and_discriminator() {
        let now = Utc::now();
        let cause = Envelope::originating("platform", "acct-1", now);
        let a = Envelope::caused_by(&cause, "svc", "threshold-80", now);
        let again = Envelope::caused_by(&cause, "svc", "threshold-80", now);
        let other = Envelope::caused_by(&cause, "svc", "threshold-100", now);
        assert_eq!(a.event_id, again.event_id);
        assert_ne!(a.event_id, other.event_id);
    }

    #[test]
    fn cloudevents_headers_mirror_the_envelope() {
        let cause = Envelope::originating("platform", "acct-1", Utc.timestamp_millis_opt(1_700_000_000_123).unwrap());
        let headers = cause.cloudevents_headers("io.tributary.usage.UsageEvent");
        let get = |name| headers.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str());
        assert_eq!(get(headers::CE_ID), Some(cause.event_id.as_str()));
        assert_eq!(get(headers::CE_TIME), Some("2023-11-14T22:13:20.123Z"));
        assert_eq!(get(headers::CE_TYPE), Some("io.tributary.usage.UsageEvent"));
    }
}
