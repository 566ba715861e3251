//! Partition assignment: what the consumer's rebalance callbacks record for the loop, and the
//! restore of a newly assigned partition's state from the changelogs.
//!
//! The callbacks run inside the consumer's poll. Before partitions are revoked, the open
//! transaction is aborted there and then, so that their new owner (possibly this instance
//! again) starts from the committed offsets; the loop learns about it the next time it looks
//! and drops what the aborted transaction held.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::consumer::{BaseConsumer, ConsumerContext, Rebalance};
use rdkafka::producer::{DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{ClientContext, Message as _, Statistics};
use tributary_telemetry::metrics::{OutcomeLabels, PartitionLabels, TopicLabels};
use tributary_telemetry::{Health, ServiceMetrics};

use crate::config::KafkaConfig;
use crate::kafka::read_to_end;
use crate::lag::LagTracker;
use crate::state::{PartitionState, changelog_topic};

/// How long aborting the open transaction on revocation may take.
const ABORT_TIMEOUT: Duration = Duration::from_secs(30);

/// What the rebalance callbacks share with the loop.
#[derive(Debug, Default)]
pub(crate) struct RebalanceEvents {
    /// Partitions assigned since the loop last looked; their state must be restored.
    pub(crate) assigned: BTreeSet<i32>,
    /// Partitions revoked since the loop last looked.
    pub(crate) revoked: BTreeSet<i32>,
    /// The open transaction was aborted by a revocation.
    pub(crate) aborted: bool,
    /// Whether the consumer has joined the group at least once.
    pub(crate) joined: bool,
}

/// The consumer's context: aborts the open transaction before partitions are revoked, and
/// records lag from librdkafka's statistics (see [`LagTracker`]).
pub(crate) struct RuntimeContext {
    pub(crate) producer: Arc<ThreadedProducer<DefaultProducerContext>>,
    pub(crate) lag: Arc<LagTracker>,
    pub(crate) txn_open: Arc<AtomicBool>,
    pub(crate) events: Arc<Mutex<RebalanceEvents>>,
    pub(crate) metrics: ServiceMetrics,
    pub(crate) health: Health,
}

impl ClientContext for RuntimeContext {
    fn stats(&self, statistics: Statistics) {
        for (topic, stats) in &statistics.topics {
            for (&partition, p) in &stats.partitions {
                if partition < 0 {
                    continue; // librdkafka's internal "unassigned" partition
                }
                if p.desired {
                    self.lag.fetched(topic, p);
                } else {
                    self.lag.forget(topic, partition);
                    self.metrics.consumer_lag.remove(&PartitionLabels { topic: topic.clone(), partition });
                }
            }
        }
        self.lag.publish(&self.metrics);
    }
}

impl ConsumerContext for RuntimeContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(partitions) = rebalance {
            self.health.set_ready(false);
            let mut events = self.events.lock().expect("rebalance lock");
            if self.txn_open.swap(false, Ordering::AcqRel) {
                // The transaction holds records of partitions that are about to move: abort it
                // so that their new owner starts from the committed offsets.
                if let Err(error) = self.producer.abort_transaction(ABORT_TIMEOUT) {
                    tracing::error!(%error, "aborting the open transaction on revocation failed");
                }
                events.aborted = true;
                self.metrics.transactions.get_or_create(&OutcomeLabels { outcome: "aborted".into() }).inc();
            }
            events.revoked.extend(partitions.elements().iter().map(|e| e.partition()));
            for element in partitions.elements() {
                self.lag.forget(element.topic(), element.partition());
                self.metrics
                    .consumer_lag
                    .remove(&PartitionLabels { topic: element.topic().to_owned(), partition: element.partition() });
            }
            tracing::info!(partitions = ?partitions.elements().iter().map(|e| (e.topic().to_owned(), e.partition())).collect::<Vec<_>>(), "partitions revoked");
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let mut events = self.events.lock().expect("rebalance lock");
        match rebalance {
            Rebalance::Assign(partitions) => {
                events.joined = true;
                events.assigned.extend(partitions.elements().iter().map(|e| e.partition()));
                tracing::info!(partitions = ?partitions.elements().iter().map(|e| (e.topic().to_owned(), e.partition())).collect::<Vec<_>>(), "partitions assigned");
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(error) => tracing::error!(%error, "rebalance error"),
        }
    }
}

/// Rebuilds `partitions`' state of every store from the changelogs of `service`, up to their
/// current end.
pub(crate) async fn restore(
    kafka: &KafkaConfig,
    service: &str,
    stores: &[&'static str],
    partitions: &[Arc<PartitionState>],
    metrics: &ServiceMetrics,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let numbers: Vec<i32> = partitions.iter().map(|p| p.partition()).collect();
    let mut restored = 0_u64;
    for &store in stores {
        let topic = kafka.topic(&changelog_topic(service, store));
        let read = read_to_end(kafka, &topic, Some(&numbers), |message| {
            let Some(key) = message.key() else { return };
            if let Some(state) = partitions.iter().find(|p| p.partition() == message.partition()) {
                let key = String::from_utf8_lossy(key).into_owned();
                state.restore(store, key, message.payload().map(<[u8]>::to_vec));
            }
        })
        .await
        .with_context(|| format!("restoring {topic}"))?;
        metrics.state_records_restored.get_or_create(&TopicLabels { topic }).inc_by(read);
        restored += read;
    }
    tracing::info!(partitions = ?numbers, restored, elapsed = ?started.elapsed(), "state restored");
    Ok(())
}
