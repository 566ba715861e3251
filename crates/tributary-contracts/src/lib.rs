//! Tributary's event contracts: the public interface platforms write to and analysts read.
//!
//! - [`types`]: Rust types generated from `schemas/*.avsc` at build time (the schemas are the
//!   single source of truth; see build.rs).
//! - [`topics`]: topic names, value subjects, keys, and the [`Contract`](topics::Contract)
//!   trait tying each type to its topic.
//! - [`headers`]: Kafka header names (CloudEvents binding, trace context, DLQ).
//! - [`envelope`]: building the envelope every record carries.
//! - [`decimal`]: `decimal(18, 6)`, the type of every amount and quantity.
//! - [`codec`]: the Confluent wire format through a schema resolver, with typed errors.
//! - [`registry`]: the resolver backed by a Confluent-compatible registry.
//! - [`json`]: Avro values as JSON, decimals exact (`tributary tap`).
//! - [`samples`]: sample values of any schema, for drift and wire-format tests.
//! - [`fixtures`]: realistic master data and events built from a few parameters, for tests,
//!   benchmarks and the demo.
//! - [`compat`]: the offline compatibility check behind `tributary schemas check`.

pub mod codec;
pub mod compat;
pub mod decimal;
pub mod envelope;
pub mod fixtures;
pub mod headers;
pub mod json;
pub mod registry;
pub mod samples;
pub mod topics;

/// Types generated from `schemas/*.avsc` by rsgen-avro.
#[allow(missing_docs, clippy::all, unreachable_pub, missing_debug_implementations)]
pub mod types {
    include!(concat!(env!("OUT_DIR"), "/contracts.rs"));
}

pub use decimal::Decimal6;
pub use topics::Contract;
