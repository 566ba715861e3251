//! The stream runtime every Tributary service runs on.
//!
//! - [`config`]: typed configuration, layered defaults → file → environment.
//! - [`service`]: the [`Service`](service::Service) trait and the shared `main`.
//! - [`kafka`]: librdkafka client configuration, broker checks, topic creation.

pub mod config;
pub mod kafka;
pub mod service;

pub use config::{ServiceConfig, ServiceSection};
pub use service::{BuildContext, Service};
