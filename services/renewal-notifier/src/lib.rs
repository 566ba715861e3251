//! renewal-notifier: as renewals approach, tells customer success and revenue operations,
//! with the risk signals (usage, payments, support cases) that explain why.
//!
//! The service's processing lands with its own issue; until then it runs the common service
//! shape ([`Idle`](tributary_runtime::service::Idle)): configuration, telemetry, the admin
//! port, readiness once Kafka answers, and a clean exit on SIGTERM.

use tributary_runtime::service::{Idle, ServiceIdentity};

/// The renewal-notifier service's name and admin port.
#[derive(Debug)]
pub struct Identity;

impl ServiceIdentity for Identity {
    const NAME: &'static str = "renewal-notifier";
    const DEFAULT_ADMIN_PORT: u16 = 19105;
}

/// The renewal-notifier service.
pub type App = Idle<Identity>;
