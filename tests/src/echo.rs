//! A test service on the real runtime: one `usage.recorded` per `usage.events` input, carrying
//! a running count per account kept in a state store.
//!
//! The count makes state bugs visible: with exactly-once processing and correct restores, the
//! outputs of each account carry the sequence 1, 2, 3, … with no gap and no repeat, whatever
//! crashes, restarts and rebalances happened in between. Inputs whose `type` is the configured
//! `reject_type` fail permanently (a poison record).

use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tributary_contracts::types::{Envelope, UsageEvent, UsageRecorded, WindowKind};
use tributary_contracts::{Decimal6, topics};
use tributary_runtime::{
    BuildContext, Context, Output, ProcessError, Processor, Service, ServiceConfig, ServiceSection, Store, StoredValue,
    StreamRuntime, Timer, registry_codec, stream_settings,
};

/// The service name (consumer group, DLQ `echo-service.dlq`).
pub const NAME: &str = "echo-service";
/// The store of running counts.
pub const COUNTS: Store<Count> = Store::new("counts");
/// The `dimensions` entry of each output that names its input event.
pub const INPUT_EVENT: &str = "input_event_id";

/// The echo service's own settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EchoSettings {
    /// Inputs of this `type` are refused permanently.
    pub reject_type: Option<String>,
    /// Inputs of this `type` fail with a retryable error this many times before succeeding.
    pub flaky_type: Option<String>,
    /// How many times a flaky input fails.
    pub flaky_failures: u32,
    /// Inputs of this `type` find their downstream unavailable for `unavailable_for_ms`
    /// after the first attempt at one of them (so the outage is measured from the moment a
    /// record first meets it, whatever the start-up and assignment took).
    pub unavailable_type: Option<String>,
    /// How long the downstream of `unavailable_type` is unavailable.
    pub unavailable_for_ms: u64,
    /// When set, the first input of an account schedules a follow-up timer this far ahead (on
    /// the runtime's clock), which emits a final record for the account.
    pub follow_up_after_ms: Option<u64>,
    /// Inputs of this `type` call a slow downstream: the call takes `slow_for_ms`, and does
    /// not end before the file `slow_gate` exists (when one is named), so that a test decides
    /// when the slow call may finish.
    pub slow_type: Option<String>,
    /// How long a slow call takes at least.
    pub slow_for_ms: u64,
    /// A file whose existence ends the slow calls (after `slow_for_ms`).
    pub slow_gate: Option<std::path::PathBuf>,
    /// Follow-up timers fail permanently (their subject is gone), so they are dead-lettered.
    pub reject_timers: bool,
}

impl ServiceSection for EchoSettings {}

/// A running count per account, as stored.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Count {
    /// Inputs so far.
    pub count: i64,
    /// Sum of their quantities.
    pub total: Decimal6,
}

impl StoredValue for Count {}

/// The `dimensions` entry of a record emitted by the follow-up timer.
pub const FOLLOW_UP: &str = "follow_up";

/// The processor.
#[derive(Debug)]
pub struct EchoProcessor {
    settings: EchoSettings,
    flaky_attempts: Mutex<std::collections::HashMap<String, u32>>,
    outage_started: Mutex<Option<std::time::Instant>>,
}

impl EchoProcessor {
    /// A processor with `settings`.
    pub fn new(settings: EchoSettings) -> Self {
        Self { settings, flaky_attempts: Default::default(), outage_started: Default::default() }
    }

    /// The slow downstream: at least `slow_for_ms`, and until the gate file exists.
    async fn slow_call(&self) {
        tokio::time::sleep(std::time::Duration::from_millis(self.settings.slow_for_ms)).await;
        if let Some(gate) = &self.settings.slow_gate {
            while !gate.exists() {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

impl Processor for EchoProcessor {
    type Input = UsageEvent;

    fn stores(&self) -> Vec<&'static str> {
        vec![COUNTS.name()]
    }

    fn outputs(&self) -> Vec<&'static str> {
        vec![topics::USAGE_RECORDED]
    }

    async fn process(&self, context: &mut Context<'_>, input: &UsageEvent) -> Result<(), ProcessError> {
        if self.settings.reject_type.as_deref() == Some(input.r#type.as_str()) {
            return Err(ProcessError::permanent("validation", format!("events of type {} are refused", input.r#type)));
        }
        if self.settings.flaky_type.as_deref() == Some(input.r#type.as_str()) {
            let attempts = {
                let mut attempts = self.flaky_attempts.lock().expect("attempts lock");
                let attempts = attempts.entry(input.id.clone()).or_default();
                *attempts += 1;
                *attempts
            };
            if attempts <= self.settings.flaky_failures {
                return Err(ProcessError::retryable("flaky", format!("attempt {attempts} fails on purpose")));
            }
        }
        if self.settings.unavailable_type.as_deref() == Some(input.r#type.as_str()) {
            let until = std::time::Duration::from_millis(self.settings.unavailable_for_ms);
            let outage_started =
                *self.outage_started.lock().expect("outage lock").get_or_insert_with(std::time::Instant::now);
            if outage_started.elapsed() < until {
                return Err(ProcessError::Unavailable {
                    downstream: "test-downstream",
                    retry_after: std::time::Duration::from_millis(500),
                    message: "in a maintenance window".into(),
                });
            }
        }
        if self.settings.slow_type.as_deref() == Some(input.r#type.as_str()) {
            self.slow_call().await;
        }
        let account = input.envelope.account_id.clone();
        let mut count: Count = context.get(COUNTS, &account)?.unwrap_or_default();
        count.count += 1;
        if let (1, Some(delay)) = (count.count, self.settings.follow_up_after_ms) {
            let due = context.now() + chrono::Duration::milliseconds(delay as i64);
            let payload = serde_json::json!({"envelope": serde_json::to_value(&input.envelope).unwrap_or_default()});
            context.schedule(&format!("follow-up/{account}"), due, payload)?;
        }
        let quantity = input.quantity.unwrap_or(Decimal6::from(1));
        count.total = Decimal6::new(count.total.value() + quantity.value())
            .map_err(|e| ProcessError::permanent("validation", e.to_string()))?;
        context.put(COUNTS, &account, &count)?;
        let output = UsageRecorded {
            envelope: Envelope::caused_by(&input.envelope, NAME, "recorded", context.now()),
            subscription_id: input.subscription_id.clone(),
            contract_id: None,
            meter: input.meter.clone().unwrap_or_else(|| "events".into()),
            unit: "event".into(),
            window_kind: WindowKind::BillingPeriod,
            window_start: input.time,
            window_end: input.time,
            total_quantity: count.total,
            event_count: count.count,
            last_event_at: input.time,
            dimensions: [(INPUT_EVENT.to_owned(), input.id.clone())].into(),
            sequence: count.count,
            is_final: false,
        };
        context.emit(Output::new(account, output));
        Ok(())
    }

    async fn on_timer(&self, context: &mut Context<'_>, timer: &Timer) -> Result<(), ProcessError> {
        if self.settings.reject_timers {
            return Err(ProcessError::permanent("follow_up_refused", format!("timer {} is refused", timer.key)));
        }
        Self::follow_up(context, timer)
    }
}

impl EchoProcessor {
    fn follow_up(context: &mut Context<'_>, timer: &Timer) -> Result<(), ProcessError> {
        let cause: Envelope = serde_json::from_value(timer.payload["envelope"].clone())
            .map_err(|e| ProcessError::permanent("timer", e.to_string()))?;
        let account = cause.account_id.clone();
        let count: Count = context.get(COUNTS, &account)?.unwrap_or_default();
        let output = UsageRecorded {
            envelope: Envelope::caused_by(&cause, NAME, "follow-up", context.now()),
            subscription_id: None,
            contract_id: None,
            meter: "events".into(),
            unit: "event".into(),
            window_kind: WindowKind::BillingPeriod,
            window_start: timer.due_at.timestamp_millis(),
            window_end: timer.due_at.timestamp_millis(),
            total_quantity: count.total,
            event_count: count.count,
            last_event_at: timer.due_at.timestamp_millis(),
            dimensions: [(FOLLOW_UP.to_owned(), timer.key.clone())].into(),
            sequence: 0,
            is_final: true,
        };
        context.emit(Output::new(account, output));
        Ok(())
    }
}

/// The service: the echo processor on the stream runtime.
#[derive(Debug)]
pub struct EchoService {
    runtime: StreamRuntime<EchoProcessor>,
}

impl Service for EchoService {
    const NAME: &'static str = NAME;
    const DEFAULT_ADMIN_PORT: u16 = 19199;
    type Settings = EchoSettings;

    async fn build(config: ServiceConfig<EchoSettings>, context: &mut BuildContext) -> anyhow::Result<Self> {
        let processor = EchoProcessor::new(config.service.clone());
        let runtime =
            StreamRuntime::new(stream_settings(NAME, &config), processor, registry_codec(&config.registry)?, context)
                .await?;
        Ok(Self { runtime })
    }

    async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        self.runtime.run(shutdown).await
    }
}

/// The input topic of the echo service under `prefix`.
pub fn input_topic(prefix: &str) -> String {
    format!("{prefix}{}", topics::USAGE_EVENTS)
}

/// The output topic of the echo service under `prefix`.
pub fn output_topic(prefix: &str) -> String {
    format!("{prefix}{}", topics::USAGE_RECORDED)
}
