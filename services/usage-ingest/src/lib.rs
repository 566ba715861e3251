//! usage-ingest: usage events in over Kafka and HTTP, deduplicated, aggregated per
//! account, subscription and meter, with threshold crossings against the contracted quota.
//!
//! - [`processor`]: the logic (what an event does to the totals, thresholds, late events);
//! - [`meters`]: the configured meters and the checks every event passes;
//! - [`windows`]: hourly windows and the contract's billing periods;
//! - [`http`]: `POST /v1/events` (CloudEvents, OpenMeter-compatible) into `usage.events`;
//! - [`settings`]: the `[usage_ingest]` configuration section.
//!
//! The Kafka side (exactly-once, deduplication by `source/id`, state, timers, DLQ) is the
//! stream runtime's; contracts come from `refdata.contracts`, held whole by every instance.

pub mod http;
pub mod meters;
pub mod processor;
pub mod settings;
pub mod windows;

use std::sync::Arc;

use anyhow::Context as _;
use prometheus_client::metrics::gauge::Gauge;
use tokio_util::sync::CancellationToken;
use tributary_contracts::topics;
use tributary_runtime::table::ReferenceTable;
use tributary_runtime::{BuildContext, Service, ServiceConfig, StreamRuntime, registry_codec, stream_settings};

use crate::meters::{Meters, TimeBounds};
use crate::processor::{IngestCounters, UsageProcessor, contract_index};
pub use crate::settings::Settings;

/// The service name.
pub const NAME: &str = "usage-ingest";

/// The usage-ingest service.
#[derive(Debug)]
pub struct App {
    runtime: StreamRuntime<UsageProcessor>,
    http: Option<(tokio::net::TcpListener, axum::Router)>,
}

impl App {
    fn register_metrics(context: &mut BuildContext) -> (IngestCounters, http::HttpMetrics, Gauge) {
        let counters = IngestCounters::default();
        let http_metrics = http::HttpMetrics::default();
        let contract_rows = Gauge::default();
        let registry = context.registry.sub_registry_with_prefix("tributary_usage_ingest");
        registry.register("contracts", "Contracts held from refdata.contracts", contract_rows.clone());
        registry.register("late_events", "Events sent to usage.late", counters.late_events.clone());
        registry.register(
            "hourly_windows_missed",
            "Events counted in their billing period after their hourly window closed",
            counters.hourly_windows_missed.clone(),
        );
        registry.register("thresholds_crossed", "Threshold crossings emitted", counters.thresholds_crossed.clone());
        registry.register(
            "events_without_contract",
            "Events counted with no contract covering their time (calendar month, no thresholds)",
            counters.events_without_contract.clone(),
        );
        registry.register("http_requests", "POST /v1/events requests by status", http_metrics.requests.clone());
        registry.register(
            "http_request_duration_seconds",
            "Time to answer POST /v1/events, by status class (2xx, 4xx, 5xx)",
            http_metrics.request_seconds.clone(),
        );
        registry.register("http_events_accepted", "Events accepted over HTTP", http_metrics.events_accepted.clone());
        registry.register("http_events_rejected", "Events refused over HTTP", http_metrics.events_rejected.clone());
        (counters, http_metrics, contract_rows)
    }
}

impl Service for App {
    const NAME: &'static str = NAME;
    const DEFAULT_ADMIN_PORT: u16 = 19101;
    type Settings = Settings;

    async fn build(config: ServiceConfig<Settings>, context: &mut BuildContext) -> anyhow::Result<Self> {
        let settings = config.service.clone();
        anyhow::ensure!(
            settings.max_event_age <= config.runtime.idempotency_window,
            "usage_ingest.max_event_age ({}) must not exceed runtime.idempotency_window ({}): \
             older duplicates could not be recognised",
            humantime::format_duration(settings.max_event_age),
            humantime::format_duration(config.runtime.idempotency_window),
        );
        // The HTTP endpoint refuses what the processor would dead-letter: both use these.
        let meters = Arc::new(Meters::compile(&settings.meters).map_err(|errors| anyhow::anyhow!(errors.join("; ")))?);
        let (counters, http_metrics, contract_rows) = Self::register_metrics(context);
        let kafka = config.kafka.clone();
        let codec = registry_codec(&config.registry)?;
        let contracts = ReferenceTable::new(contract_index);
        contracts.observe_rows(contract_rows);
        let processor = UsageProcessor::new(meters.clone(), contracts.clone(), settings.clone(), counters);
        // Contracts published before an event must be visible to it: the runtime processes no
        // event before the table has read what refdata.contracts held at start-up.
        let runtime = StreamRuntime::new(stream_settings(NAME, &config), processor, codec.clone(), context)
            .await?
            .with_table(contracts);

        let http = if settings.http.enabled {
            let ingress = http::Ingress {
                meters,
                bounds: TimeBounds { max_age: settings.max_event_age, max_skew: settings.max_clock_skew },
                api_keys: settings.http.load_api_keys()?,
                max_batch_events: settings.http.max_batch_events,
                produce_timeout: settings.http.produce_timeout,
                producer: http::producer(&kafka, settings.http.produce_timeout)?,
                topic: kafka.topic(topics::USAGE_EVENTS),
                codec: codec.with_topic_prefix(&kafka.topic_prefix),
                clock: context.clock.clone(),
                metrics: http_metrics,
            };
            let listener = context.listen("http", settings.http.listen).await?;
            Some((listener, http::router(Arc::new(ingress), settings.http.max_body_bytes)))
        } else {
            None
        };
        Ok(Self { runtime, http })
    }

    async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Self { runtime, http } = self;
        let http_task = http.map(|(listener, router)| {
            let stop = shutdown.clone();
            tokio::spawn(
                async move { axum::serve(listener, router).with_graceful_shutdown(stop.cancelled_owned()).await },
            )
        });
        let outcome = runtime.run(shutdown.clone()).await;
        shutdown.cancel();
        if let Some(task) = http_task {
            task.await.context("HTTP task panicked")?.context("HTTP endpoint")?;
        }
        outcome
    }
}
