//! The stream runtime every Tributary service runs on.
//!
//! A service supplies a [`Processor`](processor::Processor): a function of its state and one
//! input that returns outputs and state changes, or a typed error. The runtime owns all Kafka
//! I/O and the guarantees of DESIGN.md:
//!
//! - [`config`]: typed configuration, layered defaults → file → environment.
//! - [`service`]: the [`Service`](service::Service) trait and the shared `main`.
//! - [`processor`]: what a service writes: inputs, outputs, context, errors, timers.
//! - [`stream`]: the exactly-once loop: transactions, restore, retries, DLQ, pause, shutdown.
//! - [`state`]: keyed state per partition with changelog-backed layers.
//! - [`dlq`]: dead-letter headers; [`retry`]: backoff with jitter.
//! - [`table`]: refdata topics held whole in memory by every instance (global tables).
//! - [`kafka`]: librdkafka client configuration, broker checks, topic creation.

pub mod config;
pub mod dlq;
pub mod kafka;
pub mod processor;
pub mod retry;
pub mod service;
pub mod state;
pub mod stream;
pub mod table;

use std::sync::Arc;

pub use config::{ServiceConfig, ServiceSection};
pub use processor::{Context, Input, Output, ProcessError, Processor, Timer};
pub use service::{BuildContext, Service};
pub use stream::{StreamRuntime, StreamSettings};

use tributary_contracts::codec::Codec;
use tributary_contracts::registry::{RegistryClient, RegistryResolver};

/// A codec resolving schemas through the configured registry.
pub fn registry_codec(registry: &config::RegistryConfig) -> anyhow::Result<Codec> {
    let client = RegistryClient::new(&registry.url, registry.username.as_deref(), registry.password.as_deref())?;
    Ok(Codec::new(Arc::new(RegistryResolver::new(client))))
}

/// The stream settings of `service` from its configuration.
pub fn stream_settings<S>(service: &'static str, config: &ServiceConfig<S>) -> StreamSettings {
    StreamSettings {
        service,
        instance_id: config.runtime.instance_id.clone(),
        kafka: config.kafka.clone(),
        runtime: config.runtime.clone(),
    }
}
