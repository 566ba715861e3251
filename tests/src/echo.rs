//! A test service on the real runtime: one `usage.recorded` per `usage.events` input, carrying
//! a running count per account kept in a state store.
//!
//! The count makes state bugs visible: with exactly-once processing and correct restores, the
//! outputs of each account carry the sequence 1, 2, 3, … with no gap and no repeat, whatever
//! crashes, restarts and rebalances happened in between. Inputs whose `type` is the configured
//! `reject_type` fail permanently (a poison record).

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tributary_contracts::types::{Envelope, UsageEvent, UsageRecorded, WindowKind};
use tributary_contracts::{Decimal6, topics};
use tributary_runtime::{
    BuildContext, Context, Output, ProcessError, Processor, Service, ServiceConfig, ServiceSection, StreamRuntime,
    registry_codec, stream_settings,
};

/// The service name (consumer group, DLQ `echo-service.dlq`).
pub const NAME: &str = "echo-service";
/// The store of running counts.
pub const COUNTS: &str = "counts";
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
}

impl ServiceSection for EchoSettings {}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Count {
    count: i64,
    total: Decimal6,
}

/// The processor.
#[derive(Debug, Default)]
pub struct EchoProcessor {
    settings: EchoSettings,
    flaky_attempts: std::collections::HashMap<String, u32>,
}

impl Processor for EchoProcessor {
    type Input = UsageEvent;

    fn stores(&self) -> Vec<&'static str> {
        vec![COUNTS]
    }

    async fn process(&mut self, context: &mut Context<'_>, input: &UsageEvent) -> Result<(), ProcessError> {
        if self.settings.reject_type.as_deref() == Some(input.r#type.as_str()) {
            return Err(ProcessError::permanent("validation", format!("events of type {} are refused", input.r#type)));
        }
        if self.settings.flaky_type.as_deref() == Some(input.r#type.as_str()) {
            let attempts = self.flaky_attempts.entry(input.id.clone()).or_default();
            *attempts += 1;
            if *attempts <= self.settings.flaky_failures {
                return Err(ProcessError::retryable("flaky", format!("attempt {attempts} fails on purpose")));
            }
        }
        let account = input.envelope.account_id.clone();
        let mut count: Count = context.get(COUNTS, &account)?.unwrap_or_default();
        count.count += 1;
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
        let processor = EchoProcessor { settings: config.service.clone(), ..EchoProcessor::default() };
        let runtime = StreamRuntime::new(
            stream_settings(NAME, &config),
            processor,
            registry_codec(&config.registry)?,
            context.metrics.clone(),
            context.health.clone(),
        )
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
