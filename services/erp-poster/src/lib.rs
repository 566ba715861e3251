//! erp-poster: posts financial transactions to the ERP with idempotency keys, retries, a\n//! circuit breaker, throttling and maintenance-window pauses, and publishes the outcome.
//!
//! The service's processing lands with its own issue; until then it runs the common service
//! shape: configuration, telemetry, the admin port, readiness once Kafka answers, and a clean
//! exit on SIGTERM. The ERP client it will post through is [`tryton`].

pub mod tryton;

use tokio_util::sync::CancellationToken;
use tributary_runtime::config::{KafkaConfig, NoSettings};
use tributary_runtime::{BuildContext, Service, ServiceConfig};
use tributary_telemetry::Health;

/// The erp-poster service.
#[derive(Debug)]
pub struct App {
    /// Kafka connection settings.
    kafka: KafkaConfig,
    /// Health flags shared with the admin port.
    health: Health,
}

impl Service for App {
    const NAME: &'static str = "erp-poster";
    const DEFAULT_ADMIN_PORT: u16 = 19103;
    type Settings = NoSettings;

    async fn build(config: ServiceConfig<NoSettings>, context: &mut BuildContext) -> anyhow::Result<Self> {
        Ok(Self { kafka: config.kafka, health: context.health.clone() })
    }

    async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        tributary_runtime::service::connect_and_idle(&self.kafka, &self.health, shutdown).await
    }
}
