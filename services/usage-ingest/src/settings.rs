//! The `[usage-ingest]` configuration section: meters, windows, limits and the HTTP endpoint.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tributary_runtime::ServiceSection;

use crate::meters::{MeterDefinition, Meters};

/// The usage-ingest settings.
#[derive(Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// The meters: which events count, how, and grouped by what.
    pub meters: Vec<MeterDefinition>,
    /// Thresholds in percent of the included quantity, for contracts that name none.
    pub default_thresholds: Vec<i32>,
    /// How long an hourly window keeps accepting events after it ends.
    #[serde(with = "humantime_serde")]
    pub hour_grace: Duration,
    /// How long a billing period keeps accepting events after it ends; a later event goes to
    /// `usage.late`.
    #[serde(with = "humantime_serde")]
    pub period_grace: Duration,
    /// Events older than this are refused: past it, a duplicate could no longer be recognised
    /// (keep it within `runtime.idempotency_window`).
    #[serde(with = "humantime_serde")]
    pub max_event_age: Duration,
    /// Events further than this in the future are refused (clock skew of the sender).
    #[serde(with = "humantime_serde")]
    pub max_clock_skew: Duration,
    /// Most often one aggregate's running total is written to `usage.recorded`.
    #[serde(with = "humantime_serde")]
    pub recorded_interval: Duration,
    /// The HTTP endpoint for platforms that cannot write to Kafka.
    pub http: HttpSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            meters: Vec::new(),
            default_thresholds: vec![80, 100, 120],
            hour_grace: Duration::from_secs(3600),
            period_grace: Duration::from_secs(6 * 3600),
            max_event_age: Duration::from_secs(7 * 24 * 3600),
            max_clock_skew: Duration::from_secs(5 * 60),
            recorded_interval: Duration::from_secs(2),
            http: HttpSettings::default(),
        }
    }
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("meters", &self.meters)
            .field("default_thresholds", &self.default_thresholds)
            .field("hour_grace", &self.hour_grace)
            .field("period_grace", &self.period_grace)
            .field("max_event_age", &self.max_event_age)
            .field("max_clock_skew", &self.max_clock_skew)
            .field("recorded_interval", &self.recorded_interval)
            .field("http", &self.http)
            .finish()
    }
}

/// `POST /v1/events`.
#[derive(Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSettings {
    /// Serve the endpoint at all.
    pub enabled: bool,
    /// Where it listens.
    pub listen: SocketAddr,
    /// Accepted API keys (`Authorization: Bearer <key>`); never logged.
    pub api_keys: Vec<String>,
    /// A file with one API key per line (`#` starts a comment), e.g. a mounted Kubernetes
    /// secret; read at start-up, added to `api_keys`.
    pub api_keys_file: Option<PathBuf>,
    /// Largest request body in bytes; a larger one gets 413.
    pub max_body_bytes: usize,
    /// Most events in one batch.
    pub max_batch_events: usize,
    /// How long the Kafka write of a request may take before it answers 503.
    #[serde(with = "humantime_serde")]
    pub produce_timeout: Duration,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 18090)),
            api_keys: Vec::new(),
            api_keys_file: None,
            max_body_bytes: 1 << 20,
            max_batch_events: 1_000,
            produce_timeout: Duration::from_secs(10),
        }
    }
}

impl std::fmt::Debug for HttpSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpSettings")
            .field("enabled", &self.enabled)
            .field("listen", &self.listen)
            .field("api_keys", &format_args!("<{} redacted>", self.api_keys.len()))
            .field("api_keys_file", &self.api_keys_file)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_batch_events", &self.max_batch_events)
            .field("produce_timeout", &self.produce_timeout)
            .finish()
    }
}

impl HttpSettings {
    /// The configured keys plus those of `api_keys_file`.
    pub fn load_api_keys(&self) -> anyhow::Result<Vec<String>> {
        let mut keys = self.api_keys.clone();
        if let Some(path) = &self.api_keys_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("reading http.api_keys_file {}: {e}", path.display()))?;
            keys.extend(
                text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_owned),
            );
        }
        Ok(keys)
    }
}

impl ServiceSection for Settings {
    fn validate(&self, errors: &mut Vec<String>) {
        if let Err(meter_errors) = Meters::compile(&self.meters) {
            errors.extend(meter_errors);
        }
        if let Some(bad) = self.default_thresholds.iter().find(|p| **p <= 0) {
            errors.push(format!("usage_ingest.default_thresholds: {bad} is not a positive percentage"));
        }
        if self.recorded_interval.is_zero() {
            errors.push("usage_ingest.recorded_interval must be positive".into());
        }
        if self.http.enabled {
            if self.http.max_body_bytes == 0 || self.http.max_batch_events == 0 {
                errors.push("usage_ingest.http.max_body_bytes and max_batch_events must be positive".into());
            }
            match self.http.load_api_keys() {
                Ok(keys) if keys.is_empty() => errors.push(
                    "usage_ingest.http: no API key configured (set http.api_keys or http.api_keys_file, \
                     or http.enabled = false)"
                        .into(),
                ),
                Ok(keys) if keys.iter().any(|k| k.len() < 16) => {
                    errors.push("usage_ingest.http: API keys must be at least 16 characters".into())
                }
                Ok(_) => {}
                Err(error) => errors.push(format!("usage_ingest.{error}")),
            }
        }
    }
}
