//! erp-poster: posts financial transactions to the ERP with idempotency keys, retries, a
//! circuit breaker, throttling and maintenance-window pauses, and publishes the outcome.
//!
//! The service's processing lands with its own issue; until then it runs the common service
//! shape ([`Idle`](tributary_runtime::service::Idle)): configuration, telemetry, the admin
//! port, readiness once Kafka answers, and a clean exit on SIGTERM.
//! The ERP client it will post through is [`tryton`].

pub mod tryton;

use tributary_runtime::service::{Idle, ServiceIdentity};

/// The erp-poster service's name and admin port.
#[derive(Debug)]
pub struct Identity;

impl ServiceIdentity for Identity {
    const NAME: &'static str = "erp-poster";
    const DEFAULT_ADMIN_PORT: u16 = 19103;
}

/// The erp-poster service.
pub type App = Idle<Identity>;
