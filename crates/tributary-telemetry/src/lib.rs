//! Telemetry shared by every Tributary service.
//!
//! - [`logging`]: `tracing` subscriber (text or JSON lines), with OpenTelemetry trace export
//!   over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
//! - [`metrics`]: the Prometheus registry and the metrics every service must expose
//!   ([`metrics::ServiceMetrics`]), registered explicitly, no globals.
//! - [`health`]: liveness and readiness as shared flags the runtime flips.
//! - [`admin`]: the admin HTTP port: `/metrics`, `/health/live`, `/health/ready`.
//! - [`trace`]: the W3C trace context continued from a caller and passed on.

pub mod admin;
pub mod health;
pub mod logging;
pub mod metrics;
pub mod trace;

pub use admin::AdminServer;
pub use health::Health;
pub use logging::{LogFormat, LoggingConfig, TelemetryGuard};
pub use metrics::ServiceMetrics;
