//! The stream runtime every Tributary service runs on.
//!
//! A service supplies a [`Processor`](processor::Processor): a function of its state and one
//! input that returns outputs and state changes, or a typed error. The runtime owns all Kafka
//! I/O and the guarantees of DESIGN.md:
//!
//! - [`config`]: typed configuration, layered defaults → file → environment.
//! - [`service`]: the [`Service`](service::Service) trait and the shared `main`.
//! - [`processor`]: what a service writes: inputs, outputs, context, errors, timers.
//! - [`clock`]: the one clock (system, or controlled by `tributary clock`).
//! - [`stream`]: the exactly-once loop, which reads as the algorithm; its parts:
//!   [`engine`] (one attempt at a record or timer and what its outcome means, shared with the
//!   test driver), [`transaction`] (the transactional producer), [`rebalance`] (assignment and
//!   restore).
//! - [`state`]: keyed, versioned state per partition with changelog-backed layers and a
//!   due-time index of timers.
//! - [`testing`]: the processor test driver: no broker, the same semantics as the loop.
//! - [`dlq`]: dead-letter headers, listing and replay; [`retry`]: backoff with jitter;
//!   [`circuit`]: a circuit breaker on the runtime's clock, for a downstream system.
//! - [`table`]: refdata topics held whole in memory by every instance (global tables).
//! - [`kafka`]: librdkafka client configuration, broker checks, topic creation.

pub mod circuit;
pub mod clock;
pub mod config;
pub mod dlq;
pub mod engine;
pub mod kafka;
mod lag;
pub mod processor;
mod rebalance;
pub mod retry;
pub mod service;
pub mod state;
pub mod stream;
pub mod table;
pub mod testing;
mod transaction;

use std::sync::Arc;

/// Every binary built on the runtime (the services, the CLI, the tests and benchmarks)
/// allocates through mimalloc. The loop allocates a little for every record (an attempt's state
/// of about 1.3 KiB, headers, state values), and glibc's malloc consolidates its free lists on
/// every request above 1 KiB: that alone cost the loop about a third of its throughput
/// (BENCHMARKS.md, session 4).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub use clock::Clock;
pub use config::{ServiceConfig, ServiceSection};
pub use processor::{Context, ErrorDomain, Input, Output, ProcessError, Processor, SWEEP_TIMER, Timer};
pub use service::{BuildContext, Service};
pub use state::{Store, StoredValue};
pub use stream::{StreamRuntime, StreamSettings};

/// What [`input_enum!`] expands to refers to; not part of the API.
#[doc(hidden)]
pub mod __private {
    pub use tributary_contracts::Contract;
    pub use tributary_contracts::codec::{Codec, DecodeError, Location};
    pub use tributary_contracts::types::Envelope;
}

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
