//! What a service writes: a processor, a pure function of (state, input, context) → outputs.
//!
//! A processor never touches Kafka. It reads and writes keyed state through the [`Context`],
//! emits [`Output`]s, schedules timers, and returns a [`ProcessError`] that tells the runtime
//! what to do on failure: retry, dead-letter, pause the partition while a downstream system is
//! down, or stop the partition on a bug of ours. The runtime commits the outputs, the state
//! changes, the idempotency key and the input offset in one Kafka transaction, or none of them.
//!
//! Records of different partitions may be processed at the same time (a processor that calls a
//! slow system only holds up its own partition), so `process` takes `&self`: a processor keeps
//! its state in the stores, and anything else it shares (counters, clients) is thread-safe.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tributary_contracts::codec::{Codec, DecodeError, EncodeError, Location};
use tributary_contracts::{Contract, types::Envelope};

use crate::state::{Staged, StateError, Store, StoredValue};

/// A decodable input: one contract type, or an enum over several, declared with
/// [`input_enum!`](crate::input_enum).
pub trait Input: Sized + Send + Sync + 'static {
    /// The topics this input is read from.
    fn topics() -> Vec<&'static str>;
    /// Decodes the value read at `at` (whose topic is the contract's, without a deployment's
    /// prefix).
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

/// Declares an input enum over several contract types, one variant per topic, and its
/// [`Input`] implementation:
///
/// ```ignore
/// tributary_runtime::input_enum! {
///     /// What billing-router reads.
///     pub enum RouterInput {
///         /// A threshold crossing.
///         Threshold(UsageThresholdCrossed),
///         /// A running total.
///         Recorded(UsageRecorded),
///     }
/// }
/// ```
#[macro_export]
macro_rules! input_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $($(#[$variant_meta:meta])* $variant:ident($ty:ty)),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone)]
        $vis enum $name {
            $($(#[$variant_meta])* $variant($ty)),+
        }

        impl $crate::processor::Input for $name {
            fn topics() -> ::std::vec::Vec<&'static str> {
                ::std::vec![$(<$ty as $crate::__private::Contract>::TOPIC),+]
            }

            async fn decode(
                codec: &$crate::__private::Codec,
                at: &$crate::__private::Location,
                payload: &[u8],
            ) -> ::std::result::Result<Self, $crate::__private::DecodeError> {
                $(
                    if at.topic == <$ty as $crate::__private::Contract>::TOPIC {
                        return codec.decode::<$ty>(at, payload).await.map(Self::$variant);
                    }
                )+
                Err($crate::__private::DecodeError::Unresolvable {
                    at: at.clone(),
                    id: 0,
                    reader: ::std::stringify!($name).to_owned(),
                    reason: ::std::format!("topic {} is not an input of {}", at.topic, ::std::stringify!($name)),
                })
            }

            fn envelope(&self) -> &$crate::__private::Envelope {
                match self {
                    $(Self::$variant(value) => <$ty as $crate::__private::Contract>::envelope(value)),+
                }
            }
        }
    };
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

/// Who is at fault when processing fails: it decides what the runtime does (the error domains
/// of a streaming engine: user input, an external system, ourselves).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorDomain {
    /// The input can never succeed: dead-letter it.
    Input,
    /// Something passing failed: retry with backoff, then dead-letter.
    Transient,
    /// A downstream system is down: pause the partition, never dead-letter.
    Downstream,
    /// A bug of ours (state that cannot be read, an undeclared output): stop the partition and
    /// alert; the input is not at fault and is not dead-lettered.
    Internal,
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
    /// A bug of ours: the partition stops (paused, alerting metric, error log) until the
    /// service is fixed and restarted; the record stays where it is.
    #[error("internal error {class}: {message}")]
    Internal {
        /// A bounded error class.
        class: &'static str,
        /// What went wrong.
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

    /// An internal error.
    pub fn internal(class: &'static str, message: impl Into<String>) -> Self {
        Self::Internal { class, message: message.into() }
    }

    /// The error class.
    pub fn class(&self) -> &'static str {
        match self {
            Self::Permanent { class, .. } | Self::Retryable { class, .. } | Self::Internal { class, .. } => class,
            Self::Unavailable { .. } => "downstream_unavailable",
        }
    }

    /// Whose fault it is.
    pub fn domain(&self) -> ErrorDomain {
        match self {
            Self::Permanent { .. } => ErrorDomain::Input,
            Self::Retryable { .. } => ErrorDomain::Transient,
            Self::Unavailable { .. } => ErrorDomain::Downstream,
            Self::Internal { .. } => ErrorDomain::Internal,
        }
    }
}

impl From<StateError> for ProcessError {
    fn from(error: StateError) -> Self {
        Self::internal("state", error.to_string())
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
    /// Topic (as the contract names it, without a deployment's prefix), partition, offset.
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
    pub(crate) state: &'a mut Staged,
    pub(crate) outputs: Vec<Output>,
    pub(crate) dead_letter_outputs: Vec<Output>,
    pub(crate) given_up: Vec<GivenUp>,
    pub(crate) attempt: Attempt,
}

/// Work the processor held in its own state and gave up on (see [`Context::give_up`]).
#[derive(Debug, Clone)]
pub(crate) struct GivenUp {
    pub(crate) timer: String,
    pub(crate) payload: serde_json::Value,
    pub(crate) class: String,
    pub(crate) message: String,
    pub(crate) attempts: u32,
    pub(crate) first_failure_at: DateTime<Utc>,
}

/// Which attempt at a record or timer this is.
#[derive(Debug, Clone, Copy)]
pub struct Attempt {
    /// 1 for the first; a retry after a transient failure counts one more (a pause for an
    /// unavailable downstream does not).
    pub number: u32,
    /// When the first attempt started.
    pub first_at: DateTime<Utc>,
}

impl<'a> Context<'a> {
    pub(crate) fn new(
        now: DateTime<Utc>,
        partition: i32,
        record: Option<&'a RecordMeta>,
        state: &'a mut Staged,
        attempt: Attempt,
    ) -> Self {
        Self {
            now,
            partition,
            record,
            state,
            outputs: Vec::new(),
            dead_letter_outputs: Vec::new(),
            given_up: Vec::new(),
            attempt,
        }
    }

    /// Now, on the runtime's clock (the system clock in production, the controlled clock in
    /// tests and the demo). Read once per record or timer.
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

    /// Emits an output; written in the transaction that commits this record. Its topic must
    /// be one of [`Processor::outputs`].
    pub fn emit(&mut self, output: Output) {
        self.outputs.push(output);
    }

    /// Emits an output only if this attempt ends with the record dead-lettered (a permanent
    /// failure, or the last retry): an outcome record that says the record failed (e.g. a
    /// REJECTED posting result), written in the same transaction as the dead letter. Dropped
    /// when the attempt succeeds, or fails and will be retried.
    pub fn emit_if_dead_lettered(&mut self, output: Output) {
        self.dead_letter_outputs.push(output);
    }

    /// Gives up on a piece of work that the processor holds in its own state rather than in
    /// its input (a webhook delivery in a retry queue, say), while the current attempt
    /// succeeds: the work goes to the service's DLQ as the dead-lettered timer `timer` with
    /// `payload`, in this attempt's transaction, with `class`, `message`, `attempts` and
    /// `first_failure_at` in its headers. An operator's replay (`tributary dlq replay`)
    /// schedules timer `timer` with `payload` again on this partition, due at once, so that
    /// [`Processor::on_timer`] takes the work up again.
    pub fn give_up(
        &mut self,
        timer: &str,
        payload: serde_json::Value,
        class: &str,
        message: impl Into<String>,
        attempts: u32,
        first_failure_at: DateTime<Utc>,
    ) {
        self.given_up.push(GivenUp {
            timer: timer.to_owned(),
            payload,
            class: class.to_owned(),
            message: message.into(),
            attempts,
            first_failure_at,
        });
    }

    /// Which attempt this is.
    pub fn attempt(&self) -> Attempt {
        self.attempt
    }

    /// Reads `key` from `store` on this partition.
    pub fn get<V: StoredValue>(&self, store: Store<V>, key: &str) -> Result<Option<V>, StateError> {
        self.state.get(store.name(), key)
    }

    /// Writes `key` in `store` on this partition.
    pub fn put<V: StoredValue>(&mut self, store: Store<V>, key: &str, value: &V) -> Result<(), StateError> {
        self.state.put(store.name(), key, value)
    }

    /// The entries of `store` on this partition (committed and pending) whose key starts with
    /// `prefix`, in key order. Costs a pass over the store's keys: meant for timers that sweep
    /// (flushes, window closes), not for every record.
    pub fn scan_prefix<V: StoredValue>(&self, store: Store<V>, prefix: &str) -> Result<Vec<(String, V)>, StateError> {
        self.state.scan(store.name(), prefix)
    }

    /// Deletes `key` from `store` on this partition.
    pub fn delete<V>(&mut self, store: Store<V>, key: &str) {
        self.state.delete(store.name(), key);
    }

    /// Schedules (or moves) the timer `key` on this partition to fire at `due_at` on the
    /// runtime's clock.
    pub fn schedule(&mut self, key: &str, due_at: DateTime<Utc>, payload: serde_json::Value) -> Result<(), StateError> {
        self.state.schedule(key, due_at, payload)
    }

    /// When the timer `key` on this partition is due, if it is scheduled.
    pub fn scheduled(&self, key: &str) -> Result<Option<DateTime<Utc>>, StateError> {
        self.state.scheduled(key)
    }

    /// Cancels the timer `key` on this partition.
    pub fn cancel(&mut self, key: &str) {
        self.state.cancel(key);
    }
}

/// The key of the periodic sweep handed to [`Processor::on_timer`] (see
/// [`Processor::sweep_every`]).
pub const SWEEP_TIMER: &str = "tributary.sweep";

/// A service's logic.
pub trait Processor: Send + Sync + 'static {
    /// What it reads.
    type Input: Input;

    /// The state stores it uses (each backed by a changelog topic), by name.
    fn stores(&self) -> Vec<&'static str> {
        Vec::new()
    }

    /// The topics it writes (the runtime creates them; emitting to any other is a bug that
    /// stops the partition).
    fn outputs(&self) -> Vec<&'static str>;

    /// How often to sweep each partition: [`on_timer`](Self::on_timer) gets the timer
    /// [`SWEEP_TIMER`] on every partition the instance holds, once soon after the partition is
    /// assigned (or the instance starts) and then every `sweep_every` on the runtime's clock, even
    /// when no record arrives on it: for work no record of the partition triggers (master data
    /// that changed, schedules derived from a reference table). Nothing is stored for it; a
    /// clock moved far ahead runs one sweep, not one per period missed. `None` (the default):
    /// no sweep.
    fn sweep_every(&self) -> Option<Duration> {
        None
    }

    /// The idempotency key of an input: by default `source` and `event_id` of its envelope.
    /// `None` processes the input without a duplicate check.
    fn idempotency_key(&self, input: &Self::Input) -> Option<String> {
        let envelope = input.envelope();
        Some(format!("{}/{}", envelope.source, envelope.event_id))
    }

    /// Handles one input.
    fn process(
        &self,
        context: &mut Context<'_>,
        input: &Self::Input,
    ) -> impl Future<Output = Result<(), ProcessError>> + Send;

    /// Handles a timer that came due; by default nothing. Unless the handler schedules it
    /// again, the timer is gone once the handler succeeds.
    fn on_timer(
        &self,
        context: &mut Context<'_>,
        timer: &Timer,
    ) -> impl Future<Output = Result<(), ProcessError>> + Send {
        let _ = (context, timer);
        async { Ok(()) }
    }
}
