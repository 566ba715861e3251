//! usage-ingest: usage events in over Kafka and HTTP, deduplicated, aggregated per
//! account, subscription and meter, with threshold crossings against the contracted quota.
//!
//! The service's processing lands with its own issue; until then it runs the common service
//! shape ([`Idle`](tributary_runtime::service::Idle)): configuration, telemetry, the admin
//! port, readiness once Kafka answers, and a clean exit on SIGTERM.

use tributary_runtime::service::{Idle, ServiceIdentity};

/// The usage-ingest service's name and admin port.
#[derive(Debug)]
pub struct Identity;

impl ServiceIdentity for Identity {
    const NAME: &'static str = "usage-ingest";
    const DEFAULT_ADMIN_PORT: u16 = 19101;
}

/// The usage-ingest service.
pub type App = Idle<Identity>;
