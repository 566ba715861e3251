//! entitlement-watcher: moves an account through grace to suspension on payment failure,
//! flags it in the support platform, and restores it when payment succeeds.
//!
//! The service's processing lands with its own issue; until then it runs the common service
//! shape ([`Idle`](tributary_runtime::service::Idle)): configuration, telemetry, the admin
//! port, readiness once Kafka answers, and a clean exit on SIGTERM.

use tributary_runtime::service::{Idle, ServiceIdentity};

/// The entitlement-watcher service's name and admin port.
#[derive(Debug)]
pub struct Identity;

impl ServiceIdentity for Identity {
    const NAME: &'static str = "entitlement-watcher";
    const DEFAULT_ADMIN_PORT: u16 = 19104;
}

/// The entitlement-watcher service.
pub type App = Idle<Identity>;
