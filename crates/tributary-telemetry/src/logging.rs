//! The `tracing` subscriber: log lines to stdout and spans to OpenTelemetry.
//!
//! A tracer provider is always installed, so that every record gets a trace id that travels in
//! its Kafka headers (`traceparent`), and one business flow stays one trace across services.
//! Spans leave the process only when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (OTLP over HTTP).

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use serde::Deserialize;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Environment variable that switches on OTLP export; its name is fixed by OpenTelemetry.
pub const OTLP_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines, for a terminal.
    #[default]
    Text,
    /// One JSON object per line, for a log pipeline.
    Json,
}

/// Logging settings, the `log` section of every service's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoggingConfig {
    /// Line format.
    pub format: LogFormat,
    /// An `EnvFilter` directive such as `info,rdkafka=warn`.
    pub filter: String,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        // Info for our crates and warnings for the noisy HTTP internals: enough to follow a
        // flow without drowning it.
        Self { format: LogFormat::Text, filter: "info,hyper=warn,reqwest=warn,h2=warn".into() }
    }
}

/// Errors while setting up telemetry.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The log filter directive does not parse.
    #[error("invalid log filter {filter:?}: {source}")]
    Filter {
        /// The directive as configured.
        filter: String,
        /// Why it does not parse.
        source: tracing_subscriber::filter::ParseError,
    },
    /// The OTLP exporter could not be built.
    #[error("cannot build the OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
}

/// Keeps the tracer provider alive; flushes pending spans when dropped.
#[derive(Debug)]
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        // Best effort: at exit there is nobody left to report a failed flush to.
        let _ = self.provider.shutdown();
    }
}

/// Installs the global subscriber and propagator for `service`.
///
/// If a global subscriber is already installed (several services started in one test process),
/// the existing one is kept and only the guard of a fresh provider is returned.
pub fn init(service: &str, config: &LoggingConfig) -> Result<TelemetryGuard, TelemetryError> {
    let filter = EnvFilter::try_new(&config.filter)
        .map_err(|source| TelemetryError::Filter { filter: config.filter.clone(), source })?;

    let mut provider =
        SdkTracerProvider::builder().with_resource(Resource::builder().with_service_name(service.to_owned()).build());
    if std::env::var_os(OTLP_ENDPOINT_ENV).is_some() {
        let exporter = opentelemetry_otlp::SpanExporter::builder().with_http().build()?;
        provider = provider.with_batch_exporter(exporter);
    }
    let provider = provider.build();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    opentelemetry::global::set_tracer_provider(provider.clone());
    // The log filter applies to log lines only: spans reach OpenTelemetry at info and above
    // whatever the log level, so that a quieter log never breaks trace propagation.
    // Spans are made per record, so what each one carries is paid per record: the source
    // location and thread are the same for every record span, and busy/idle tracking reads the
    // clock at every poll of the record's future (BENCHMARKS.md, "Where the time goes").
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer(service.to_owned()))
        .with_location(false)
        .with_threads(false)
        .with_tracked_inactivity(false)
        .with_filter(LevelFilter::INFO);
    let registry = tracing_subscriber::registry().with(otel);
    let installed = match config.format {
        LogFormat::Text => registry.with(tracing_subscriber::fmt::layer().with_filter(filter)).try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer().json().flatten_event(true).with_current_span(true).with_filter(filter),
            )
            .try_init(),
    };
    if installed.is_err() {
        tracing::debug!("a global subscriber was already installed; keeping it");
    }
    Ok(TelemetryGuard { provider })
}
