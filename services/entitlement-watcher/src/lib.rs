//! entitlement-watcher: moves an account through grace to suspension on payment failure,\n//! flags it in the support platform, and restores it when payment succeeds.
//!
//! The service's processing lands with its own issue; until then it runs the common service
//! shape: configuration, telemetry, the admin port, readiness once Kafka answers, and a clean
//! exit on SIGTERM.

use tokio_util::sync::CancellationToken;
use tributary_runtime::config::{KafkaConfig, NoSettings};
use tributary_runtime::{BuildContext, Service, ServiceConfig};
use tributary_telemetry::Health;

/// The entitlement-watcher service.
#[derive(Debug)]
pub struct App {
    /// Kafka connection settings.
    kafka: KafkaConfig,
    /// Health flags shared with the admin port.
    health: Health,
}

impl Service for App {
    const NAME: &'static str = "entitlement-watcher";
    const DEFAULT_ADMIN_PORT: u16 = 19104;
    type Settings = NoSettings;

    async fn build(config: ServiceConfig<NoSettings>, context: &mut BuildContext) -> anyhow::Result<Self> {
        Ok(Self { kafka: config.kafka, health: context.health.clone() })
    }

    async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        tributary_runtime::service::connect_and_idle(&self.kafka, &self.health, shutdown).await
    }
}
