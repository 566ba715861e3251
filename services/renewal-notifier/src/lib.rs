//! renewal-notifier: as renewals approach, tells customer success and revenue operations,
//! with the risk signals (usage, payments, support cases) that explain why.
//!
//! - [`processor`]: the logic (renewal schedules, milestones, the risk assessment);
//! - [`settings`]: the `[renewal_notifier]` section: milestones, scoring rules, audiences.
//!
//! The Kafka side (exactly-once, state, timers on the runtime's clock, the partition sweep
//! that keeps schedules in line with `refdata.contracts`) is the stream runtime's; the webhook
//! delivery of the notifications is `tributary-outbound`'s.

pub mod processor;
pub mod settings;

use tokio_util::sync::CancellationToken;
use tributary_contracts::types::RenewalNotification;
use tributary_outbound::{Outbound, Relays};
use tributary_runtime::{BuildContext, Service, ServiceConfig, StreamRuntime, registry_codec, stream_settings};

pub use crate::processor::{MasterData, NotifierMetrics, RenewalProcessor};
pub use crate::settings::Settings;

/// The service name.
pub const NAME: &str = "renewal-notifier";

/// The renewal-notifier service.
#[derive(Debug)]
pub struct App {
    runtime: StreamRuntime<RenewalProcessor>,
    /// The webhook relays of its notifications, if any endpoint is configured.
    relays: Relays,
}

impl App {
    fn register_metrics(context: &mut BuildContext, master: &MasterData) -> NotifierMetrics {
        let metrics = NotifierMetrics::default();
        let registry = context.registry.sub_registry_with_prefix("tributary_renewal_notifier");
        master.contracts.register_rows(registry, "contracts", "Contracts held from refdata.contracts");
        registry.register(
            "notifications",
            "Renewal notifications by risk level and trigger",
            metrics.notifications.clone(),
        );
        registry.register(
            "evaluations",
            "Contract schedules checked by the partition sweeps",
            metrics.evaluations.clone(),
        );
        metrics
    }
}

impl Service for App {
    const NAME: &'static str = NAME;
    const DEFAULT_ADMIN_PORT: u16 = 19105;
    type Settings = Settings;

    async fn build(config: ServiceConfig<Settings>, context: &mut BuildContext) -> anyhow::Result<Self> {
        // Contracts are found by the partition of their account: the one whose sweep
        // schedules them, and whose state holds the account's signals.
        let master = MasterData::new(config.kafka.partitions);
        let metrics = Self::register_metrics(context, &master);
        let processor = RenewalProcessor::new(master.clone(), config.service.clone(), metrics);
        let runtime =
            StreamRuntime::new(stream_settings(NAME, &config), processor, registry_codec(&config.registry)?, context)
                .await?
                .with_table(master.contracts.clone());
        let mut outbound = Outbound::new(NAME, &config.service.delivery, &config, context);
        outbound.relay::<RenewalNotification>().await?;
        let relays = outbound.finish()?;
        Ok(Self { runtime, relays })
    }

    async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let runtime = self.runtime;
        self.relays.run_beside(shutdown, |token| runtime.run(token)).await
    }
}
