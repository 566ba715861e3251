//! erp-poster: posts the financial documents of `erp.postings` to the ERP exactly once, with
//! idempotency keys, retries, a circuit breaker, a rate limit and maintenance-window pauses,
//! and publishes each outcome on `erp.posting-results`.
//!
//! - [`processor`]: the logic (the steps of one posting, exactly once in the ERP);
//! - [`adapter`]: the ERP as three operations, and what NetSuite, SAP or Dynamics adapters
//!   would implement;
//! - [`tryton`]: the first adapter, Tryton over JSON-RPC;
//! - [`maintenance`]: the maintenance windows (the circuit breaker is the runtime's);
//! - [`settings`]: the `[erp_poster]` configuration section.

pub mod adapter;
pub mod maintenance;
pub mod processor;
pub mod settings;
pub mod tryton;

use tokio_util::sync::CancellationToken;
use tributary_runtime::circuit::Circuit;
use tributary_runtime::{BuildContext, Service, ServiceConfig, StreamRuntime, registry_codec, stream_settings};

use crate::processor::{PosterMetrics, PosterProcessor};
pub use crate::settings::Settings;
use crate::tryton::TrytonAdapter;

/// The service name.
pub const NAME: &str = "erp-poster";

/// The erp-poster service.
#[derive(Debug)]
pub struct App {
    runtime: StreamRuntime<PosterProcessor<TrytonAdapter>>,
}

fn register_metrics(context: &mut BuildContext) -> PosterMetrics {
    let metrics = PosterMetrics::default();
    let registry = context.registry.sub_registry_with_prefix("tributary_erp_poster");
    registry.register("documents", "Postings by outcome", metrics.documents.clone());
    registry.register("erp_call_seconds", "ERP calls by operation and outcome", metrics.calls.clone());
    registry.register(
        "request_to_posted_seconds",
        "From a posting request's occurred_at to its document in the ERP",
        metrics.request_to_posted.clone(),
    );
    registry.register(
        "paused",
        "Attempts that waited: maintenance window, open circuit, settling",
        metrics.paused.clone(),
    );
    metrics
}

impl Service for App {
    const NAME: &'static str = NAME;
    const DEFAULT_ADMIN_PORT: u16 = 19103;
    type Settings = Settings;

    async fn build(config: ServiceConfig<Settings>, context: &mut BuildContext) -> anyhow::Result<Self> {
        let settings = config.service.clone();
        let password = settings.tryton.load_password().map_err(anyhow::Error::msg)?;
        let adapter = TrytonAdapter::new(&settings.tryton, password)?;
        // A probe whose attempt was dropped (a rebalance) lets another go after twice the
        // longest call.
        let probe_timeout = settings.tryton.rpc_timeout * 2;
        let circuit =
            Circuit::new("erp", settings.failures_to_open, settings.open_for, probe_timeout, context.metrics.clone());
        let metrics = register_metrics(context);
        let processor =
            PosterProcessor::new(adapter, &settings, circuit, metrics).map_err(|e| anyhow::anyhow!(e.join("; ")))?;
        let runtime =
            StreamRuntime::new(stream_settings(NAME, &config), processor, registry_codec(&config.registry)?, context)
                .await?;
        Ok(Self { runtime })
    }

    async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        self.runtime.run(shutdown).await
    }
}
