//! Liveness and readiness, as seen by Kubernetes probes.
//!
//! Live means the process is running its loops; ready means it can do useful work: for a stream
//! service, its partitions are assigned and their state is restored. The runtime owns the
//! transitions; the admin server only reads them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

/// Shared health flags. Cloning shares the same flags.
#[derive(Debug, Clone, Default)]
pub struct Health {
    inner: Arc<HealthInner>,
}

#[derive(Debug, Default)]
struct HealthInner {
    /// False once the service has started to shut down, so probes stop routing to it.
    not_live: AtomicBool,
    /// True while the service can process: partitions assigned and state restored.
    ready: AtomicBool,
    /// Loops of the same process that must be ready too (a service's webhook relays).
    parts: Mutex<Vec<Health>>,
}

impl Health {
    /// New flags: live, not ready.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the process is running its loops.
    pub fn is_live(&self) -> bool {
        !self.inner.not_live.load(Ordering::Acquire)
    }

    /// Whether the service can do useful work: its own loop and every [required](Self::require)
    /// part are ready.
    pub fn is_ready(&self) -> bool {
        self.is_live()
            && self.inner.ready.load(Ordering::Acquire)
            && self.inner.parts.lock().expect("health lock").iter().all(Health::is_ready)
    }

    /// Makes readiness wait for `part` too: another loop of the process, with flags of its own
    /// (a webhook relay beside the service's stream loop).
    pub fn require(&self, part: Health) {
        self.inner.parts.lock().expect("health lock").push(part);
    }

    /// Sets readiness.
    pub fn set_ready(&self, ready: bool) {
        self.inner.ready.store(ready, Ordering::Release);
    }

    /// Marks the service as shutting down: neither live nor ready from now on.
    pub fn set_stopping(&self) {
        self.inner.ready.store(false, Ordering::Release);
        self.inner.not_live.store(true, Ordering::Release);
    }
}

/// `tributary_ready` and `tributary_live` (1 or 0), read from the flags at each scrape, so that
/// an alert sees what the probes see (`tributary_ready == 0 for 5m`).
#[derive(Debug)]
struct HealthCollector(Health);

impl Collector for HealthCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        for (name, help, value) in [
            ("ready", "1 while the service can process (its readiness probe answers 200), else 0", self.0.is_ready()),
            ("live", "1 while the service runs its loops (its liveness probe answers 200), else 0", self.0.is_live()),
        ] {
            let gauge = ConstGauge::new(i64::from(value));
            let full_name = format!("{}_{name}", crate::metrics::METRIC_PREFIX);
            let metric = encoder.encode_descriptor(&full_name, help, None, gauge.metric_type())?;
            gauge.encode(metric)?;
        }
        Ok(())
    }
}

impl Health {
    /// Exposes these flags in `registry` as `tributary_ready` and `tributary_live`.
    pub fn register_metrics(&self, registry: &mut Registry) {
        registry.register_collector(Box::new(HealthCollector(self.clone())));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_service_is_live_but_not_ready() {
        let health = Health::new();
        assert!(health.is_live());
        assert!(!health.is_ready());
    }

    #[test]
    fn a_stopping_service_is_neither_live_nor_ready() {
        let health = Health::new();
        health.set_ready(true);
        assert!(health.is_ready());
        health.set_stopping();
        assert!(!health.is_live());
        assert!(!health.is_ready());
        health.set_ready(true);
        assert!(!health.is_ready(), "a stopping service must not report ready again");
    }

    #[test]
    fn a_service_is_ready_once_every_required_part_is() {
        let health = Health::new();
        let relay = Health::new();
        health.require(relay.clone());
        health.set_ready(true);
        assert!(!health.is_ready(), "its relay is not ready yet");
        relay.set_ready(true);
        assert!(health.is_ready());
        relay.set_ready(false);
        assert!(!health.is_ready(), "a relay restoring after a rebalance makes the service not ready");
    }

    #[test]
    fn readiness_is_a_gauge_read_at_each_scrape() {
        let health = Health::new();
        let mut registry = Registry::default();
        health.register_metrics(&mut registry);
        let scrape = || crate::metrics::encode(&registry);
        assert!(scrape().contains("tributary_ready 0\n") && scrape().contains("tributary_live 1\n"), "{}", scrape());
        health.set_ready(true);
        assert!(scrape().contains("tributary_ready 1\n"), "{}", scrape());
        health.set_stopping();
        assert!(scrape().contains("tributary_ready 0\n") && scrape().contains("tributary_live 0\n"), "{}", scrape());
    }
}
