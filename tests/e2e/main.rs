//! End-to-end tests against the real local stack. Start it with `make up`, or run `make test`.

mod billing_router;
mod contracts;
mod entitlement_watcher;
mod erp_poster;
mod kafka_transactions;
mod metrics;
mod renewal_notifier;
mod runtime;
mod schema_registry;
mod service_shape;
mod trace;
mod tryton_erp;
mod usage_ingest;
mod webhooks;
