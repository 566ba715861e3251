//! What a service writes: a processor, a pure function of (state, input, context) → outputs.
//!
//! A processor never touches Kafka. It reads and writes keyed state through the [`Context`],
//! emits [`Output`]s, schedules timers, and returns a [`ProcessError`] that tells the runtime
//! what to do on failure: retry, dead-letter, or pause the partition while a downstream system
//! is down. The runtime commits the outputs, the state changes, the idempotency key and the
//! input offset in one Kafka transaction, or none of them.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tributary_contracts::codec::{Codec, DecodeError, EncodeError, Location};
use tributary_contracts::{Contract, types::Envelope};

use crate::state::{StateError, TxnState};

/// A decodable input: one contract type, or an enum over several (a service reading several
/// topics implements this for its own enum).
pub trait Input: Sized + Send + 'static {
    /// The topics this input is read from.
    fn topics() -> Vec<&'static str>;
    /// Decodes the value read at `at`.
    fn decode(codec: &Codec, at: &Location, payload: &[u8]) -> impl Future<Output = Result<Self, DecodeError>> + Send;
    /// The envelope of the decoded value.
    fn envelope(&self) -> &Envelope;
}

impl<T: Contract + 'static> Input for T {
    fn topics() -> Vec<&'static str> {
        vec![T::TOPIC]
    }

    async fn decode(codec: &Codec, at: &Location, payload: &[u8]) -> Result<Self, DecodeError> {
        codec.decode::<T>(at, payload).await
    }

    fn envelope(&self) -> &Envelope {
        Contract::envelope(self)
    }
}

/// A record to write: topic, key and an encodable value.
#[derive(Debug)]
pub struct Output {
    /// The topic.
    pub topic: &'static str,
    /// The Kafka key (the account id on event topics).
    pub key: String,
    /// The value, encoded by the runtime through the registry.
    pub value: Box<dyn EncodeOutput>,
}

impl Output {
    /// An output of a contract value to its own topic.
    pub fn new<T: Contract + 'static>(key: impl Into<String>, value: T) -> Self {
        Self { topic: T::TOPIC, key: key.into(), value: Box::new(value) }
    }
}

/// A contract value the runtime can encode without knowing its type.
pub trait EncodeOutput: std::fmt::Debug + Send + Sync {
    /// Encodes the value in the Confluent wire format.
    fn encode<'a>(&'a self, codec: &'a Codec) -> futures::future::BoxFuture<'a, Result<Vec<u8>, EncodeError>>;
    /// The value's envelope, for headers.
    fn envelope(&self) -> &Envelope;
    /// The CloudEvents type: the value record's full name.
    fn ce_type(&self) -> &'static str;
}

impl<T: Contract + 'static> EncodeOutput for T {
    fn encode<'a>(&'a self, codec: &'a Codec) -> futures::future::BoxFuture<'a, Result<Vec<u8>, EncodeError>> {
        Box::pin(codec.encode(self))
    }

    fn envelope(&self) -> &Envelope {
        Contract::envelope(self)
    }

    fn ce_type(&self) -> &'static str {
        tributary_contracts::codec::record_full_name(T::TOPIC).expect("every contract topic has a named record")
    }
}

/// Why processing failed, and what the runtime should do about it.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The input can never succeed (invalid, unknown reference): dead-letter it and move on.
    #[error("{class}: {message}")]
    Permanent {
        /// A bounded error class for metrics and the DLQ header.
        class: &'static str,
        /// What is wrong, for the operator.
        message: String,
    },
    /// Retrying may help (a timeout): retry with backoff, then dead-letter when attempts run out.
    #[error("{class} (retryable): {message}")]
    Retryable {
        /// A bounded error class.
        class: &'static str,
        /// What failed.
        message: String,
    },
    /// A downstream system is down or in a maintenance window: stop consuming this partition,
    /// and offer the same record again after `retry_after`. Never dead-letters.
    #[error("{downstream} unavailable, retry after {retry_after:?}: {message}")]
    Unavailable {
        /// The downstream system, e.g. `erp`.
        downstream: &'static str,
        /// How long to pause.
        retry_after: Duration,
        /// Why.
        message: String,
    },
}

impl ProcessError {
    /// A permanent error.
    pub fn permanent(class: &'static str, message: impl Into<String>) -> Self {
        Self::Permanent { class, message: message.into() }
    }

    /// A retryable error.
    pub fn retryable(class: &'static str, message: impl Into<String>) -> Self {
        Self::Retryable { class, message: message.into() }
    }

    /// The error class.
    pub fn class(&self) -> &'static str {
        match self {
            Self::Permanent { class, .. } | Self::Retryable { class, .. } => class,
            Self::Unavailable { .. } => "downstream_unavailable",
        }
    }
}

impl From<StateError> for ProcessError {
    fn from(error: StateError) -> Self {
        Self::permanent("state", error.to_string())
    }
}

/// A timer that came due.
#[derive(Debug, Clone)]
pub struct Timer {
    /// The key it was scheduled under (unique per partition).
    pub key: String,
    /// When it was due.
    pub due_at: DateTime<Utc>,
    /// What the processor stored with it.
    pub payload: serde_json::Value,
    /// The partition it belongs to.
    pub partition: i32,
}

/// Where the current record came from.
#[derive(Debug, Clone)]
pub struct RecordMeta {
    /// Topic, partition, offset.
    pub location: Location,
    /// The Kafka key.
    pub key: Option<String>,
    /// Headers as text.
    pub headers: BTreeMap<String, String>,
}

/// What a processor sees and does while handling one record or timer.
#[derive(Debug)]
pub struct Context<'a> {
    pub(crate) now: DateTime<Utc>,
    pub(crate) partition: i32,
    pub(crate) record: Option<&'a RecordMeta>,
    pub(crate) state: &'a mut TxnState,
    pub(crate) outputs: Vec<Output>,
}

impl Context<'_> {
    /// The processing time (wall clock, read once per record).
    pub fn now(&self) -> DateTime<Utc> {
        self.now
    }

    /// The partition whose state this record or timer uses.
    pub fn partition(&self) -> i32 {
        self.partition
    }

    /// The record being processed (`None` in a timer).
    pub fn record(&self) -> Option<&RecordMeta> {
        self.record
    }

    /// Emits an output; written in the transaction that commits this record.
    pub fn emit(&mut self, output: Output) {
        self.outputs.push(output);
    }

    /// Reads `key` from `store` on this partition.
    pub fn get<V: DeserializeOwned>(&self, store: &str, key: &str) -> Result<Option<V>, StateError> {
        self.state.get(store, self.partition, key)
    }

    /// Writes `key` in `store` on this partition.
    pub fn put<V: Serialize>(&mut self, store: &str, key: &str, value: &V) -> Result<(), StateError> {
        self.state.put(store, self.partition, key, value)
    }

    /// The entries of `store` on this partition (committed and pending) whose key starts with
    /// `prefix`, in key order. Costs a pass over the store's keys: meant for timers that sweep
    /// (flushes, window closes), not for every record.
    pub fn scan_prefix<V: DeserializeOwned>(&self, store: &str, prefix: &str) -> Vec<(String, V)> {
        self.state.scan(store, self.partition, prefix, |_, _| true)
    }

    /// Deletes `key` from `store` on this partition.
    pub fn delete(&mut self, store: &str, key: &str) {
        self.state.delete(store, self.partition, key);
    }

    /// Schedules (or moves) the timer `key` on this partition to fire at `due_at`.
    pub fn schedule(&mut self, key: &str, due_at: DateTime<Utc>, payload: serde_json::Value) -> Result<(), StateError> {
        self.state.schedule(self.partition, key, due_at, payload)
    }

    /// When the timer `key` on this partition is due, if it is scheduled.
    pub fn scheduled(&self, key: &str) -> Result<Option<DateTime<Utc>>, StateError> {
        self.state.scheduled(self.partition, key)
    }

    /// Cancels the timer `key` on this partition.
    pub fn cancel(&mut self, key: &str) {
        self.state.cancel(self.partition, key);
    }
}

/// A service's logic.
pub trait Processor: Send + 'static {
    /// What it reads.
    type Input: Input;

    /// The state stores it uses (each backed by a changelog topic).
    fn stores(&self) -> Vec<&'static str> {
        Vec::new()
    }

    /// The idempotency key of an input: by default `source` and `event_id` of its envelope.
    /// `None` processes the input without a duplicate check.
    fn idempotency_key(&self, input: &Self::Input) -> Option<String> {
        let envelope = input.envelope();
        Some(format!("{}/{}", envelope.source, envelope.event_id))
    }

    /// Handles one input.
    fn process(
        &mut self,
        context: &mut Context<'_>,
        input: &Self::Input,
    ) -> impl Future<Output = Result<(), ProcessError>> + Send;

    /// Handles a timer that came due; by default nothing.
    fn on_timer(
        &mut self,
        context: &mut Context<'_>,
        timer: &Timer,
    ) -> impl Future<Output = Result<(), ProcessError>> + Send {
        let _ = (context, timer);
        async { Ok(()) }
    }
}
