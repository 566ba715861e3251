//! billing-router: rates overages against price plans, validates customer and contract against
//! master data, routes financial transactions to the ERP and commercial context to the CRM.
//!
//! - [`processor`]: the logic (what each input does, charges cumulative per period);
//! - [`rating`]: the pricing models of `refdata.price-plans`, in exact decimals, and rounding
//!   to the currency's minor unit;
//! - [`masterdata`]: the reference tables and the checks whose failures are dead-lettered;
//! - [`documents`]: the ERP documents and CRM updates it writes;
//! - [`settings`]: the `[billing_router]` configuration section.
//!
//! The Kafka side (exactly-once, deduplication, state, timers, DLQ, the reference tables
//! caught up before the first record) is the stream runtime's.

pub mod documents;
pub mod masterdata;
pub mod processor;
pub mod rating;
pub mod settings;

use tokio_util::sync::CancellationToken;
use tributary_contracts::types::CrmAccountUpdate;
use tributary_outbound::{Outbound, Relays};
use tributary_runtime::{BuildContext, Service, ServiceConfig, StreamRuntime, registry_codec, stream_settings};

pub use crate::masterdata::MasterData;
use crate::processor::{RouterMetrics, RouterProcessor};
pub use crate::settings::Settings;

/// The service name.
pub const NAME: &str = "billing-router";

/// The billing-router service.
#[derive(Debug)]
pub struct App {
    runtime: StreamRuntime<RouterProcessor>,
    /// The webhook relays of its output topics, if any endpoint is configured.
    relays: Relays,
}

impl App {
    fn register_metrics(context: &mut BuildContext, master: &MasterData) -> RouterMetrics {
        let metrics = RouterMetrics::default();
        let registry = context.registry.sub_registry_with_prefix("tributary_billing_router");
        master.customers.register_rows(registry, "customers", "Customers held from refdata.customers");
        master.contracts.register_rows(registry, "contracts", "Contracts held from refdata.contracts");
        master.plans.register_rows(registry, "price_plans", "Price plans held from refdata.price-plans");
        registry.register("charges", "Overage charges emitted", metrics.charges.clone());
        registry.register(
            "charges_not_needed",
            "Rated steps that charged nothing more (the minimum or a later step charged it already)",
            metrics.charges_not_needed.clone(),
        );
        registry.register("postings", "ERP postings by document type", metrics.postings.clone());
        registry.register("crm_updates", "CRM updates by kind", metrics.crm_updates.clone());
        metrics
    }
}

impl Service for App {
    const NAME: &'static str = NAME;
    const DEFAULT_ADMIN_PORT: u16 = 19102;
    type Settings = Settings;

    async fn build(config: ServiceConfig<Settings>, context: &mut BuildContext) -> anyhow::Result<Self> {
        let master = MasterData::default();
        let metrics = Self::register_metrics(context, &master);
        let processor = RouterProcessor::new(master.clone(), config.service.clone(), metrics);
        // Master data published before a record must be visible to it: nothing is routed
        // before the three tables have read what their topics held at start-up.
        let runtime =
            StreamRuntime::new(stream_settings(NAME, &config), processor, registry_codec(&config.registry)?, context)
                .await?
                .with_table(master.customers)
                .with_table(master.contracts)
                .with_table(master.plans);
        let mut outbound = Outbound::new(NAME, &config.service.delivery, &config, context);
        outbound.relay::<CrmAccountUpdate>().await?;
        let relays = outbound.finish()?;
        Ok(Self { runtime, relays })
    }

    async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let runtime = self.runtime;
        self.relays.run_beside(shutdown, |token| runtime.run(token)).await
    }
}
