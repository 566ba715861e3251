//! billing-router: rates overages against price plans, validates customer and contract
//! against master data, routes financial transactions to the ERP and commercial context to the CRM.
//!
//! The service's processing lands with its own issue; until then it runs the common service
//! shape ([`Idle`](tributary_runtime::service::Idle)): configuration, telemetry, the admin
//! port, readiness once Kafka answers, and a clean exit on SIGTERM.

use tributary_runtime::service::{Idle, ServiceIdentity};

/// The billing-router service's name and admin port.
#[derive(Debug)]
pub struct Identity;

impl ServiceIdentity for Identity {
    const NAME: &'static str = "billing-router";
    const DEFAULT_ADMIN_PORT: u16 = 19102;
}

/// The billing-router service.
pub type App = Idle<Identity>;
