//! Liveness and readiness, as seen by Kubernetes probes.
//!
//! Live means the process is running its loops; ready means it can do useful work: for a stream
//! service, its partitions are assigned and their state is restored. The runtime owns the
//! transitions; the admin server only reads them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

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

    /// Whether the service can do useful work.
    pub fn is_ready(&self) -> bool {
        self.is_live() && self.inner.ready.load(Ordering::Acquire)
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
}
