//! Outbound delivery: the records of a service's output topics, signed as Standard Webhooks
//! say, to the systems that do not read Kafka (DESIGN.md, "Beyond Kafka: outbound delivery").
//!
//! An outbox relay: the service writes each record to its topic in its transaction, as ever; a
//! relay per configured endpoint, in the same binary, reads that topic `read_committed` in its
//! own consumer group (`<service>.relay.<endpoint>`) and delivers each committed record. It is
//! a stream runtime like the service's own, so it has its own offsets, state (the deliveries
//! waiting for a retry), timers (the retries, on the runtime's clock), DLQ and exactly-once
//! commits of its `webhook.deliveries` records. One endpoint that is down pauses only its own
//! relay; the others go on.
//!
//! - [`relay`]: the logic of one endpoint (filter, order per account, attempt, retry schedule,
//!   give up);
//! - [`http`]: the signed POST and what an answer means; [`filter`]: which records go;
//! - [`settings`]: endpoints, secrets, schedule; [`metrics`]: what operations watch.
//!
//! A service wires it in its `build` and runs it beside its own loop:
//!
//! ```ignore
//! let mut outbound = Outbound::new(NAME, &settings.delivery, &config, context);
//! outbound.relay::<CrmAccountUpdate>().await?;     // every output topic it may relay
//! let relays = outbound.finish()?;                  // an endpoint for any other topic is an error
//! // in `run`:
//! relays.run_beside(shutdown, |token| runtime.run(token)).await
//! ```

pub mod filter;
pub mod http;
pub mod metrics;
pub mod relay;
pub mod settings;

use std::future::Future;

use anyhow::Context as _;
use futures::FutureExt as _;
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;
use tributary_contracts::Contract;
use tributary_runtime::circuit::Circuit;
use tributary_runtime::config::ServiceConfig;
use tributary_runtime::{BuildContext, Processor, StreamRuntime, registry_codec, stream_settings};
use tributary_telemetry::ServiceMetrics;

use crate::filter::Filter;
use crate::http::HttpEndpoint;
use crate::metrics::OutboundMetrics;
use crate::relay::{Relay, RelayPlan};
pub use crate::settings::{DeliverySettings, EndpointSettings};

/// The service name of an endpoint's relay: its consumer group, DLQ and changelog prefix.
pub fn relay_service(service: &str, endpoint: &str) -> String {
    format!("{service}.relay.{endpoint}")
}

/// The relays of one service, being built.
#[derive(Debug)]
pub struct Outbound<'a, S> {
    service: &'static str,
    endpoints: Vec<EndpointSettings>,
    config: &'a ServiceConfig<S>,
    context: &'a BuildContext,
    /// The runtime metrics every relay of the service shares (`tributary_relay_*`).
    relay_metrics: Option<ServiceMetrics>,
    metrics: Option<OutboundMetrics>,
    built: Vec<Box<dyn RunRelay>>,
}

impl<'a, S> Outbound<'a, S> {
    /// The relays of `settings` for `service`, whose configuration is `config`. Registers the
    /// relays' metrics in the service's registry if any endpoint is configured.
    pub fn new(
        service: &'static str,
        settings: &DeliverySettings,
        config: &'a ServiceConfig<S>,
        context: &'a mut BuildContext,
    ) -> Self {
        let (relay_metrics, metrics) = if settings.endpoints.is_empty() {
            (None, None)
        } else {
            let relay_metrics = ServiceMetrics::register_with_prefix(&mut context.registry, "tributary_relay", service);
            (Some(relay_metrics), Some(OutboundMetrics::register(&mut context.registry)))
        };
        Self {
            service,
            endpoints: settings.endpoints.clone(),
            config,
            context,
            relay_metrics,
            metrics,
            built: Vec::new(),
        }
    }

    /// Builds a relay for every endpoint configured for `T`'s topic (one the service writes).
    pub async fn relay<T: Contract + 'static>(&mut self) -> anyhow::Result<()> {
        let (mine, others): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.endpoints).into_iter().partition(|endpoint| endpoint.topic == T::TOPIC);
        self.endpoints = others;
        for endpoint in mine {
            let runtime = self
                .build::<T>(&endpoint)
                .await
                .with_context(|| format!("building the relay of endpoint {}", endpoint.name))?;
            self.built.push(Box::new(runtime));
        }
        Ok(())
    }

    async fn build<T: Contract + 'static>(
        &self,
        endpoint: &EndpointSettings,
    ) -> anyhow::Result<StreamRuntime<Relay<T, HttpEndpoint>>> {
        // A relay lives as long as the process; its name is needed for as long.
        let name: &'static str = Box::leak(relay_service(self.service, &endpoint.name).into_boxed_str());
        let mut settings = stream_settings(name, self.config);
        // A configured group or transactional id is the service's own: the relay's extend it.
        settings.kafka.group_id = settings.kafka.group_id.map(|group| relay_service(&group, &endpoint.name));
        settings.kafka.transactional_id_prefix =
            settings.kafka.transactional_id_prefix.map(|prefix| relay_service(&prefix, &endpoint.name));
        // Every delivery holds its partition, which the runtime pauses and rewinds to the next
        // record until the delivery is done; the refetch then waits out librdkafka's
        // fetch.wait.max.ms (500 ms) on the idle partitions. 10 ms keeps a backlog draining
        // (BENCHMARKS.md, "Webhooks"); a deployment may set its own.
        settings.kafka.properties.entry("fetch.wait.max.ms".into()).or_insert_with(|| "10".into());
        let mut context = BuildContext::new(name, self.context.clock.clone());
        context.metrics = self.relay_metrics.clone().expect("registered when an endpoint is configured");
        // The service is ready when its relays are too: a pod whose relay cannot join its group
        // delivers nothing, and must say so.
        self.context.health.require(context.health.clone());
        let metrics =
            self.metrics.as_ref().expect("registered when an endpoint is configured").endpoint(&endpoint.name);
        // A probe that never answered lets another go after twice the request timeout.
        let circuit = Circuit::new(
            format!("webhook.{}", endpoint.name),
            endpoint.failures_to_open,
            endpoint.open_for,
            endpoint.timeout * 2,
            self.context.metrics.clone(),
        );
        let plan = RelayPlan {
            endpoint: endpoint.name.clone(),
            source: format!("tributary.{}", self.service),
            filter: Filter::new(&endpoint.only),
            schedule: endpoint.retry_schedule.clone(),
            open_for: endpoint.open_for,
        };
        let relay: Relay<T, HttpEndpoint> = Relay::new(plan, HttpEndpoint::new(endpoint)?, circuit, metrics);
        tracing::info!(
            relay = name,
            topic = T::TOPIC,
            url = settings::redacted_url(&endpoint.url),
            "webhook relay configured"
        );
        StreamRuntime::new(settings, relay, registry_codec(&self.config.registry)?, &context).await
    }

    /// The relays built; an endpoint whose topic no [`relay`](Self::relay) call claimed is an
    /// error (the service does not write that topic, or cannot relay it).
    pub fn finish(self) -> anyhow::Result<Relays> {
        if let Some(endpoint) = self.endpoints.first() {
            anyhow::bail!(
                "endpoint {}: {} does not relay topic {} (it relays the topics it writes)",
                endpoint.name,
                self.service,
                endpoint.topic
            );
        }
        Ok(Relays { relays: self.built })
    }
}

/// A relay's runtime, whatever record type it delivers.
trait RunRelay: Send + Sync + std::fmt::Debug {
    fn run(self: Box<Self>, shutdown: CancellationToken) -> BoxFuture<'static, anyhow::Result<()>>;
}

impl<P: Processor> RunRelay for StreamRuntime<P> {
    fn run(self: Box<Self>, shutdown: CancellationToken) -> BoxFuture<'static, anyhow::Result<()>> {
        (*self).run(shutdown).boxed()
    }
}

/// The built relays of one service.
#[derive(Debug, Default)]
pub struct Relays {
    relays: Vec<Box<dyn RunRelay>>,
}

impl Relays {
    /// How many endpoints are relayed.
    pub fn len(&self) -> usize {
        self.relays.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.relays.is_empty()
    }

    /// Runs the relays beside the service's own loop (`service`, given the token that stops
    /// it) until `shutdown`; if any of them fails, the others are stopped gracefully and the
    /// first error is returned.
    pub async fn run_beside<F, Fut>(self, shutdown: CancellationToken, service: F) -> anyhow::Result<()>
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = anyhow::Result<()>>,
    {
        let stop = shutdown.child_token();
        let stopping_on_error = |future: BoxFuture<'static, anyhow::Result<()>>, stop: CancellationToken| async move {
            let result = future.await;
            if result.is_err() {
                stop.cancel();
            }
            result
        };
        let relays = self.relays.into_iter().map(|relay| stopping_on_error(relay.run(stop.clone()), stop.clone()));
        let own = service(stop.clone());
        let own = async {
            let result = own.await;
            if result.is_err() {
                stop.cancel();
            }
            result
        };
        let (own, relays) = tokio::join!(own, futures::future::join_all(relays));
        own?;
        relays.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
        Ok(())
    }
}
