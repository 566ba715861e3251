//! Consumer lag under exactly-once, per input topic and partition.
//!
//! librdkafka's own `consumer_lag` is measured from the offsets the consumer committed itself;
//! here offsets are committed by the producer's transactions, so that figure never moves. The
//! runtime keeps, per assigned input partition, the offset after the last record it took into
//! processing and the offset committed by its last transaction. The partition's end comes from
//! librdkafka's statistics (every `statistics.interval.ms`: the last stable offset, what a
//! `read_committed` consumer can reach) and, every [`LAG_INTERVAL`], from a ListOffsets query of
//! its own: the statistics learn the end from fetches, and a paused partition (a slow or
//! unavailable downstream: exactly when lag matters) is not fetched.
//!
//! The lag is the end minus the committed offset, with one correction: a transactional
//! producer's commit markers take offsets no consumer ever receives, so a partition whose last
//! records came from transactions would otherwise lag by a marker or two for ever. A partition
//! is caught up (lag 0) when everything taken was committed, nothing is prefetched, and the
//! fetch position has reached the end; the records in between can only be markers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::statistics::Partition;
use tokio_util::sync::CancellationToken;
use tributary_telemetry::ServiceMetrics;
use tributary_telemetry::metrics::PartitionLabels;

use crate::config::KafkaConfig;
use crate::kafka::client_config;

/// How often the ends of the assigned partitions are asked for.
pub(crate) const LAG_INTERVAL: Duration = Duration::from_secs(5);

/// How long one ListOffsets query may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(1);

/// What the loop, the transactions and the statistics record; the lag gauge is set from it.
/// Positions are kept by topic, then partition, so that the loop's note of each record it takes
/// looks its topic up by `&str` and allocates nothing.
#[derive(Debug, Default)]
pub(crate) struct LagTracker {
    positions: Mutex<HashMap<String, HashMap<i32, Position>>>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Position {
    /// The offset after the last record taken into processing.
    taken: Option<i64>,
    /// The offset the last committed transaction stored for the group.
    committed: Option<i64>,
    /// The end: the highest last stable offset (or high watermark) seen.
    end: Option<i64>,
    /// The consumer's side, from the last statistics: present while the partition is assigned.
    fetch: Option<Fetch>,
}

#[derive(Debug, Clone, Copy)]
struct Fetch {
    /// The next offset to fetch.
    next_offset: i64,
    /// Records fetched, not yet handed to the loop.
    prefetched: i64,
    /// The group's committed offset as librdkafka fetched it on assignment.
    group_offset: i64,
    /// The partition's first offset.
    low: i64,
}

impl Position {
    fn lag(&self) -> Option<i64> {
        let (end, fetch) = (self.end?, self.fetch?);
        // Before this instance's first commit: the group's offset, or the start of the
        // partition (a new group reads from the earliest).
        let committed =
            self.committed.or((fetch.group_offset >= 0).then_some(fetch.group_offset)).unwrap_or(fetch.low.max(0));
        let all_taken_committed = self.taken.is_none_or(|taken| taken <= committed);
        let caught_up = all_taken_committed && fetch.prefetched == 0 && fetch.next_offset >= end;
        Some(if caught_up { 0 } else { (end - committed).max(0) })
    }
}

/// The position of `topic`/`partition` in `positions`, made on first use.
fn position<'a>(
    positions: &'a mut HashMap<String, HashMap<i32, Position>>,
    topic: &str,
    partition: i32,
) -> &'a mut Position {
    if !positions.contains_key(topic) {
        positions.insert(topic.to_owned(), HashMap::new());
    }
    positions.get_mut(topic).expect("inserted above").entry(partition).or_default()
}

impl LagTracker {
    /// The record at `offset` of `topic`/`partition` was taken into processing.
    pub(crate) fn taken(&self, topic: &str, partition: i32, offset: i64) {
        let mut positions = self.positions.lock().expect("lag lock");
        let position = position(&mut positions, topic, partition);
        position.taken = Some(position.taken.map_or(offset + 1, |taken| taken.max(offset + 1)));
    }

    /// A transaction committed these next offsets.
    pub(crate) fn committed<'a>(&self, offsets: impl IntoIterator<Item = (&'a str, i32, i64)>) {
        let mut positions = self.positions.lock().expect("lag lock");
        for (topic, partition, offset) in offsets {
            position(&mut positions, topic, partition).committed = Some(offset);
        }
    }

    /// librdkafka's statistics of an assigned partition of `topic`.
    pub(crate) fn fetched(&self, topic: &str, statistics: &Partition) {
        let mut positions = self.positions.lock().expect("lag lock");
        let position = position(&mut positions, topic, statistics.partition);
        position.fetch = Some(Fetch {
            next_offset: statistics.next_offset,
            prefetched: statistics.fetchq_cnt,
            group_offset: statistics.committed_offset,
            low: statistics.lo_offset,
        });
        let end = if statistics.ls_offset >= 0 { statistics.ls_offset } else { statistics.hi_offset };
        if end >= 0 {
            position.end = Some(position.end.map_or(end, |known| known.max(end)));
        }
    }

    /// The end of `topic`/`partition` as a ListOffsets query found it.
    fn ended(&self, topic: &str, partition: i32, end: i64) {
        if let Some(position) = self
            .positions
            .lock()
            .expect("lag lock")
            .get_mut(topic)
            .and_then(|partitions| partitions.get_mut(&partition))
        {
            position.end = Some(position.end.map_or(end, |known| known.max(end)));
        }
    }

    /// The partition was revoked: its next owner knows its lag.
    pub(crate) fn forget(&self, topic: &str, partition: i32) {
        if let Some(partitions) = self.positions.lock().expect("lag lock").get_mut(topic) {
            partitions.remove(&partition);
        }
    }

    /// The lag of `topic`/`partition`, once its end and its fetch state are known.
    pub(crate) fn lag(&self, topic: &str, partition: i32) -> Option<i64> {
        let positions = self.positions.lock().expect("lag lock");
        positions.get(topic).and_then(|partitions| partitions.get(&partition)).and_then(Position::lag)
    }

    /// The assigned partitions (those the statistics reported).
    fn assigned(&self) -> Vec<(String, i32)> {
        let positions = self.positions.lock().expect("lag lock");
        positions
            .iter()
            .flat_map(|(topic, partitions)| {
                partitions.iter().filter(|(_, p)| p.fetch.is_some()).map(|(&partition, _)| (topic.clone(), partition))
            })
            .collect()
    }

    /// Sets the gauge of every assigned partition whose lag is known.
    pub(crate) fn publish(&self, metrics: &ServiceMetrics) {
        for (topic, partition) in self.assigned() {
            if let Some(lag) = self.lag(&topic, partition) {
                metrics.consumer_lag.get_or_create(&PartitionLabels { topic, partition }).set(lag);
            }
        }
    }
}

/// Asks for the end of every assigned partition every [`LAG_INTERVAL`] and publishes the lag,
/// until `stop`. Its own client, with no group: the queries never wait behind the loop.
pub(crate) fn watch_ends(
    kafka: &KafkaConfig,
    lag: Arc<LagTracker>,
    metrics: ServiceMetrics,
    stop: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let client: BaseConsumer = client_config(kafka).set("isolation.level", "read_committed").create()?;
    let client = Arc::new(client);
    Ok(tokio::spawn(async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(LAG_INTERVAL) => {}
            }
            let (client, tracker, stopped) = (client.clone(), lag.clone(), stop.clone());
            let queried = tokio::task::spawn_blocking(move || {
                for (topic, partition) in tracker.assigned() {
                    // A shutdown waits for this thread: at most one short query more.
                    if stopped.is_cancelled() {
                        return;
                    }
                    match client.fetch_watermarks(&topic, partition, QUERY_TIMEOUT) {
                        Ok((_, end)) => tracker.ended(&topic, partition, end),
                        Err(error) => tracing::debug!(%error, topic, partition, "the end of a partition is not known"),
                    }
                }
            })
            .await;
            if queried.is_err() {
                return; // the runtime is shutting down
            }
            lag.publish(&metrics);
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn statistics(partition: i32, ls_offset: i64, next_offset: i64, fetchq_cnt: i64) -> Partition {
        Partition {
            partition,
            ls_offset,
            hi_offset: ls_offset,
            next_offset,
            fetchq_cnt,
            committed_offset: -1001,
            ..Default::default()
        }
    }

    fn lag_after(
        tracker: &LagTracker,
        partition: i32,
        ls_offset: i64,
        next_offset: i64,
        fetchq_cnt: i64,
    ) -> Option<i64> {
        tracker.fetched("in", &statistics(partition, ls_offset, next_offset, fetchq_cnt));
        tracker.lag("in", partition)
    }

    #[test]
    fn the_lag_is_the_end_minus_what_the_transactions_committed() {
        let lag = LagTracker::default();
        assert_eq!(lag_after(&lag, 0, 100, 0, 0), Some(100), "a new group reads from the start");
        lag.taken("in", 0, 39);
        assert_eq!(lag_after(&lag, 0, 100, 100, 60), Some(100), "taken is not committed");
        lag.committed([("in", 0, 40)]);
        assert_eq!(lag_after(&lag, 0, 100, 100, 60), Some(60));
        assert_eq!(lag_after(&lag, 1, -1, -1, 0), None, "an end not known yet");
    }

    #[test]
    fn commit_markers_after_the_last_record_leave_no_lag() {
        let lag = LagTracker::default();
        // Records 0..=9, each batch of a transaction followed by its marker: the end is 12.
        lag.taken("in", 0, 9);
        lag.committed([("in", 0, 10)]);
        assert_eq!(lag_after(&lag, 0, 12, 11, 0), Some(2), "not fetched to the end yet");
        assert_eq!(lag_after(&lag, 0, 12, 12, 1), Some(2), "a record is prefetched");
        assert_eq!(lag_after(&lag, 0, 12, 12, 0), Some(0), "only markers are left");
        lag.taken("in", 0, 10);
        assert_eq!(lag_after(&lag, 0, 12, 12, 0), Some(2), "taken, not yet committed");
    }

    #[test]
    fn a_paused_partition_learns_its_end_from_the_query_not_from_stale_statistics() {
        let lag = LagTracker::default();
        assert_eq!(lag_after(&lag, 0, 5, 5, 0), Some(0));
        lag.ended("in", 0, 80);
        assert_eq!(lag.lag("in", 0), Some(80), "75 records arrived while nothing was fetched");
        assert_eq!(lag_after(&lag, 0, 5, 5, 0), Some(80), "older statistics do not lower the end");
    }

    #[test]
    fn a_forgotten_partition_falls_back_to_the_groups_offset() {
        let lag = LagTracker::default();
        lag.committed([("in", 0, 50)]);
        lag.forget("in", 0);
        let mut assigned = statistics(0, 80, 50, 0);
        assigned.committed_offset = 30;
        lag.fetched("in", &assigned);
        assert_eq!(lag.lag("in", 0), Some(50));
    }
}
