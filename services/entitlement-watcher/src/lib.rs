//! entitlement-watcher: moves an account through grace to suspension on payment failure,
//! flags it in the support platform, and restores it when payment succeeds.
//!
//! - [`processor`]: the logic (the state machine per account, what each input does);
//! - [`settings`]: the `[entitlement_watcher]` section: states, rules, grace, escalation;
//! - [`query`]: `GET /accounts/{id}/entitlement` on the admin port.
//!
//! The Kafka side (exactly-once, deduplication, state, durable timers on the runtime's clock,
//! DLQ, the reference tables caught up before the first record) is the stream runtime's; the
//! webhook delivery of its flags to the support platform is `tributary-outbound`'s.

pub mod processor;
pub mod query;
pub mod settings;

use tokio_util::sync::CancellationToken;
use tributary_contracts::types::{CrmAccountUpdate, EntitlementChanged, SupportAccountFlag};
use tributary_outbound::{Outbound, Relays};
use tributary_runtime::{BuildContext, Service, ServiceConfig, StreamRuntime, registry_codec, stream_settings};

pub use crate::processor::{EntitlementProcessor, MasterData, WatcherMetrics};
pub use crate::settings::Settings;

/// The service name.
pub const NAME: &str = "entitlement-watcher";

/// The entitlement-watcher service.
#[derive(Debug)]
pub struct App {
    runtime: StreamRuntime<EntitlementProcessor>,
    /// The webhook relays of its output topics, if any endpoint is configured.
    relays: Relays,
}

impl App {
    fn register_metrics(context: &mut BuildContext, master: &MasterData) -> WatcherMetrics {
        let metrics = WatcherMetrics::default();
        let registry = context.registry.sub_registry_with_prefix("tributary_entitlement_watcher");
        master.customers.register_rows(registry, "customers", "Customers held from refdata.customers");
        master.contracts.register_rows(registry, "contracts", "Contracts held from refdata.contracts");
        registry.register("transitions", "Entitlement transitions by from, to and reason", metrics.transitions.clone());
        registry.register(
            "flags",
            "Support flags written, by flag, action and whether on the account or a case",
            metrics.flags.clone(),
        );
        registry.register(
            "stale_payments",
            "Payment events that changed nothing: older than what the account knew of the invoice",
            metrics.stale_payments.clone(),
        );
        registry.register("escalations", "Support cases flagged for escalation", metrics.escalations.clone());
        metrics
    }
}

impl Service for App {
    const NAME: &'static str = NAME;
    const DEFAULT_ADMIN_PORT: u16 = 19104;
    type Settings = Settings;

    async fn build(config: ServiceConfig<Settings>, context: &mut BuildContext) -> anyhow::Result<Self> {
        let master = MasterData::default();
        let metrics = Self::register_metrics(context, &master);
        let processor = EntitlementProcessor::new(master.clone(), config.service.clone(), metrics);
        // A payment must see the contract (grace days, tier) published before it.
        let runtime =
            StreamRuntime::new(stream_settings(NAME, &config), processor, registry_codec(&config.registry)?, context)
                .await?
                .with_table(master.contracts.clone())
                .with_table(master.customers.clone());
        let view = runtime.state_view();
        context.admin_routes(query::routes(view, master, context.health.clone(), config.kafka.partitions));
        let mut outbound = Outbound::new(NAME, &config.service.delivery, &config, context);
        outbound.relay::<SupportAccountFlag>().await?;
        outbound.relay::<EntitlementChanged>().await?;
        outbound.relay::<CrmAccountUpdate>().await?;
        let relays = outbound.finish()?;
        Ok(Self { runtime, relays })
    }

    async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let runtime = self.runtime;
        self.relays.run_beside(shutdown, |token| runtime.run(token)).await
    }
}
