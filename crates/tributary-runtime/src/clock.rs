//! One clock for the runtime and every processor (DESIGN.md, "State and time").
//!
//! Every "now" a service reads (timers, idempotency expiry, grace ends, milestones, validation
//! windows) comes from its [`Clock`]:
//!
//! - **system**: the machine's clock; production.
//! - **controlled**: the system clock plus an offset that an operator moves with
//!   `tributary clock advance 30d` or `tributary clock set 2027-01-31T00:00:00Z`. The offset is
//!   the newest record of the compacted one-partition topic [`CLOCK_TOPIC`]; every controlled
//!   service of a deployment follows it, so one command moves them all, and a service that was
//!   stopped meanwhile reads the new offset before it processes anything. Time keeps flowing
//!   between moves, so events stamped "now" stay valid. Off by default; a service started with
//!   it logs a warning and exposes `tributary_clock_controlled 1`.
//! - **manual**: a time that only moves when told (the test driver's).
//!
//! Time never moves backwards: `now` is the largest time handed out so far, whatever the system
//! clock or a clock record says.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, SecondsFormat, Utc};
use prometheus_client::metrics::gauge::Gauge;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::KafkaConfig;
use crate::kafka::{TopicKind, client_config, ends_of, ensure_topics, reached};

/// The topic holding the controlled clock's offset: compacted, one partition, under the
/// deployment's topic prefix.
pub const CLOCK_TOPIC: &str = "tributary.clock";
/// The key of the one record that matters on [`CLOCK_TOPIC`].
const CLOCK_KEY: &str = "clock";

/// Which clock a service runs on (`runtime.clock`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ClockMode {
    /// The system clock (production).
    #[default]
    System,
    /// The system clock plus the offset on [`CLOCK_TOPIC`], moved by `tributary clock`
    /// (tests and the demo).
    Controlled,
}

#[derive(Debug)]
enum Kind {
    System,
    Controlled,
    Manual,
}

#[derive(Debug)]
struct Inner {
    kind: Kind,
    /// Controlled: the offset from the system clock; manual: the time itself (millis).
    value_ms: AtomicI64,
    /// The latest time handed out.
    last_ms: AtomicI64,
    /// Bumped on every move, so that the loop fires what came due at once.
    moves: watch::Sender<u64>,
    /// Whether the clock has read its setting (the controlled clock reads its topic first).
    ready: watch::Sender<bool>,
    offset_gauge: std::sync::OnceLock<Gauge>,
}

/// The runtime's clock; clones share it.
#[derive(Debug, Clone)]
pub struct Clock {
    inner: Arc<Inner>,
}

/// A move the clock refuses.
#[derive(Debug, thiserror::Error)]
pub enum ClockError {
    /// Time never moves backwards.
    #[error("the clock never moves backwards: it is {now}, {requested} was asked")]
    Backwards {
        /// The clock's time.
        now: String,
        /// The time asked for.
        requested: String,
    },
    /// Only a manual clock moves in place: the system clock never does, and a controlled one
    /// moves through its topic so that every service of the deployment moves with it.
    #[error(
        "this clock is not moved in place: the system clock never moves, a controlled one moves with `tributary clock`"
    )]
    NotManual,
}

fn rfc3339(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Millis, true)
}

impl Clock {
    fn with(kind: Kind, value_ms: i64, ready: bool) -> Self {
        let (moves, _) = watch::channel(0);
        let (ready, _) = watch::channel(ready);
        Self {
            inner: Arc::new(Inner {
                kind,
                value_ms: AtomicI64::new(value_ms),
                last_ms: AtomicI64::new(i64::MIN),
                moves,
                ready,
                offset_gauge: Default::default(),
            }),
        }
    }

    /// The system clock.
    pub fn system() -> Self {
        Self::with(Kind::System, 0, true)
    }

    /// A controlled clock at offset zero, not ready until [`follow`] has read the clock topic.
    pub fn controlled() -> Self {
        Self::with(Kind::Controlled, 0, false)
    }

    /// A clock that stands at `start` and moves only by [`advance`](Self::advance) and
    /// [`set`](Self::set).
    pub fn manual(start: DateTime<Utc>) -> Self {
        Self::with(Kind::Manual, start.timestamp_millis(), true)
    }

    /// The clock of `mode`.
    pub fn for_mode(mode: ClockMode) -> Self {
        match mode {
            ClockMode::System => Self::system(),
            ClockMode::Controlled => Self::controlled(),
        }
    }

    /// Whether anyone but the system moves this clock.
    pub fn is_controlled(&self) -> bool {
        !matches!(self.inner.kind, Kind::System)
    }

    /// Now, in milliseconds since the epoch.
    pub fn now_ms(&self) -> i64 {
        let computed = match self.inner.kind {
            Kind::System => Utc::now().timestamp_millis(),
            Kind::Controlled => {
                Utc::now().timestamp_millis().saturating_add(self.inner.value_ms.load(Ordering::Acquire))
            }
            Kind::Manual => self.inner.value_ms.load(Ordering::Acquire),
        };
        let previous = self.inner.last_ms.fetch_max(computed, Ordering::AcqRel);
        previous.max(computed)
    }

    /// Now.
    pub fn now(&self) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(self.now_ms()).unwrap_or_default()
    }

    /// How far a controlled clock is ahead of the system clock (zero for the others).
    pub fn offset(&self) -> chrono::Duration {
        match self.inner.kind {
            Kind::Controlled => chrono::Duration::milliseconds(self.inner.value_ms.load(Ordering::Acquire)),
            _ => chrono::Duration::zero(),
        }
    }

    /// Moves a manual clock forward by `by`.
    pub fn advance(&self, by: Duration) -> Result<DateTime<Utc>, ClockError> {
        let by = chrono::Duration::from_std(by).unwrap_or(chrono::Duration::MAX);
        self.set(self.now() + by)
    }

    /// Moves a manual clock to `to`, which must not be before now.
    pub fn set(&self, to: DateTime<Utc>) -> Result<DateTime<Utc>, ClockError> {
        let Kind::Manual = self.inner.kind else {
            // A controlled clock moves through its topic, so that every service moves with it.
            return Err(ClockError::NotManual);
        };
        let now = self.now();
        if to < now {
            return Err(ClockError::Backwards { now: rfc3339(now), requested: rfc3339(to) });
        }
        self.inner.value_ms.store(to.timestamp_millis(), Ordering::Release);
        self.moved();
        Ok(to)
    }

    /// Applies an offset read from the clock topic.
    fn apply_offset(&self, offset_ms: i64) {
        self.inner.value_ms.store(offset_ms, Ordering::Release);
        if let Some(gauge) = self.inner.offset_gauge.get() {
            gauge.set(offset_ms / 1000);
        }
        self.moved();
    }

    fn moved(&self) {
        self.inner.moves.send_modify(|moves| *moves += 1);
    }

    /// A receiver that sees every move (not the passing of time).
    pub fn moves(&self) -> watch::Receiver<u64> {
        self.inner.moves.subscribe()
    }

    /// Waits until the clock knows its time (at once, but for a controlled clock that has not
    /// read its topic yet).
    pub async fn ready(&self) {
        let mut ready = self.inner.ready.subscribe();
        let _ = ready.wait_for(|ready| *ready).await;
    }

    /// Registers `tributary_clock_controlled` and `tributary_clock_offset_seconds`.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        let controlled = Gauge::<i64>::default();
        controlled.set(i64::from(self.is_controlled()));
        let offset = Gauge::<i64>::default();
        offset.set(self.offset().num_seconds());
        let r = registry.sub_registry_with_prefix(tributary_telemetry::metrics::METRIC_PREFIX);
        r.register(
            "clock_controlled",
            "1 when the service runs on a controlled clock (never in production)",
            controlled,
        );
        r.register("clock_offset_seconds", "How far the controlled clock is ahead of the system clock", offset.clone());
        let _ = self.inner.offset_gauge.set(offset);
    }
}

/// The newest record of the clock topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockSetting {
    /// How far the controlled clock is ahead of the system clock.
    pub offset_ms: i64,
    /// When (system time) the setting was written.
    pub written_at: DateTime<Utc>,
    /// What moved it, e.g. `tributary clock advance 30d`.
    pub reason: String,
}

impl ClockSetting {
    /// The controlled time this setting gives now.
    pub fn now(&self) -> DateTime<Utc> {
        Utc::now() + chrono::Duration::milliseconds(self.offset_ms)
    }
}

/// Creates the clock topic of the deployment if it does not exist.
async fn ensure_clock_topic(kafka: &KafkaConfig) -> anyhow::Result<String> {
    let topic = kafka.topic(CLOCK_TOPIC);
    ensure_topics(kafka, &[(&topic, TopicKind::Control)]).await.context("creating the clock topic")?;
    Ok(topic)
}

fn parse_setting(payload: Option<&[u8]>) -> Option<ClockSetting> {
    serde_json::from_slice(payload?).ok()
}

/// The newest clock setting of the deployment (`None`: never moved).
pub async fn read_setting(kafka: &KafkaConfig) -> anyhow::Result<Option<ClockSetting>> {
    let topic = ensure_clock_topic(kafka).await?;
    let mut newest = None;
    crate::kafka::read_to_end(kafka, &topic, Some(&[0]), |message| {
        if message.key() == Some(CLOCK_KEY.as_bytes())
            && let Some(setting) = parse_setting(message.payload())
        {
            newest = Some(setting);
        }
    })
    .await
    .with_context(|| format!("reading {topic}"))?;
    Ok(newest)
}

async fn write_setting(kafka: &KafkaConfig, setting: &ClockSetting) -> anyhow::Result<()> {
    let topic = kafka.topic(CLOCK_TOPIC);
    let producer: FutureProducer =
        client_config(kafka).set("enable.idempotence", "true").set("acks", "all").create()?;
    let payload = serde_json::to_vec(setting)?;
    producer
        .send(FutureRecord::to(&topic).partition(0).key(CLOCK_KEY).payload(&payload), Duration::from_secs(30))
        .await
        .map_err(|(error, _)| anyhow::Error::new(error).context(format!("writing {topic}")))?;
    Ok(())
}

/// Moves the deployment's controlled clock forward by `by`; returns the new setting.
pub async fn advance(kafka: &KafkaConfig, by: Duration, reason: &str) -> anyhow::Result<ClockSetting> {
    let current = read_setting(kafka).await?.map_or(0, |s| s.offset_ms);
    let by_ms = i64::try_from(by.as_millis()).context("the step is too large")?;
    let setting =
        ClockSetting { offset_ms: current.saturating_add(by_ms), written_at: Utc::now(), reason: reason.to_owned() };
    write_setting(kafka, &setting).await?;
    Ok(setting)
}

/// Moves the deployment's controlled clock to `to`, which must not be before its time now.
pub async fn set(kafka: &KafkaConfig, to: DateTime<Utc>, reason: &str) -> anyhow::Result<ClockSetting> {
    let now = Utc::now();
    let current = read_setting(kafka).await?.map_or(0, |s| s.offset_ms);
    let controlled_now = now + chrono::Duration::milliseconds(current);
    if to < controlled_now {
        anyhow::bail!(ClockError::Backwards { now: rfc3339(controlled_now), requested: rfc3339(to) });
    }
    let setting = ClockSetting { offset_ms: (to - now).num_milliseconds(), written_at: now, reason: reason.to_owned() };
    write_setting(kafka, &setting).await?;
    Ok(setting)
}

/// Keeps a controlled `clock` at the newest setting of the clock topic until `shutdown`; the
/// clock is ready once the topic has been read to the end it had at the start. A broker that
/// cannot be reached is tried again every few seconds: the service waits, it does not guess
/// the time.
pub async fn follow(clock: Clock, kafka: KafkaConfig, shutdown: CancellationToken) {
    const RETRY: Duration = Duration::from_secs(2);
    loop {
        match follow_topic(&clock, &kafka, &shutdown).await {
            Ok(()) => return,
            Err(error) => tracing::warn!(error = format!("{error:#}"), "following the clock topic failed; retrying"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(RETRY) => {}
        }
    }
}

async fn follow_topic(clock: &Clock, kafka: &KafkaConfig, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let topic = ensure_clock_topic(kafka).await?;
    let consumer: StreamConsumer = client_config(kafka)
        .set("group.id", format!("tributary-clock-{}", uuid::Uuid::new_v4().simple()))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .context("creating the clock consumer")?;
    let ends = ends_of(&consumer, &topic, &[0])?;
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(&topic, 0, Offset::Beginning)?;
    consumer.assign(&assignment)?;
    let mut caught_up = false;
    loop {
        if !caught_up && reached(&consumer, &topic, &ends)? {
            caught_up = true;
            clock.inner.ready.send_replace(true);
            tracing::warn!(now = %rfc3339(clock.now()), offset = %clock.offset(), "running on the controlled clock");
        }
        let message = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            received = tokio::time::timeout(Duration::from_millis(200), consumer.recv()) => match received {
                Err(_) => continue,
                Ok(Err(error)) => {
                    tracing::warn!(%error, "clock topic consume error");
                    continue;
                }
                Ok(Ok(message)) => message,
            },
        };
        if message.key() != Some(CLOCK_KEY.as_bytes()) {
            continue;
        }
        match parse_setting(message.payload()) {
            Some(setting) => {
                clock.apply_offset(setting.offset_ms);
                if caught_up {
                    tracing::info!(now = %rfc3339(clock.now()), reason = setting.reason, "the controlled clock moved");
                }
            }
            None => tracing::error!(offset = message.offset(), "unreadable clock setting skipped"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_forward_only() {
        let start = DateTime::parse_from_rfc3339("2026-12-01T00:00:00Z").unwrap().to_utc();
        let clock = Clock::manual(start);
        let moves = clock.moves();
        assert_eq!(clock.now(), start);
        clock.advance(Duration::from_secs(30 * 86_400)).unwrap();
        assert_eq!(clock.now(), start + chrono::Duration::days(30));
        assert!(moves.has_changed().unwrap(), "a move is announced");
        assert!(matches!(clock.set(start), Err(ClockError::Backwards { .. })));
        assert_eq!(clock.now(), start + chrono::Duration::days(30), "a refused move changes nothing");
    }

    #[test]
    fn a_controlled_clock_follows_its_offset_and_never_goes_back() {
        let clock = Clock::controlled();
        let before = Utc::now().timestamp_millis();
        clock.apply_offset(86_400_000);
        let now = clock.now();
        assert!(now.timestamp_millis() >= before + 86_400_000);
        clock.apply_offset(0);
        assert!(clock.now() >= now, "a smaller offset does not move time back");
        assert!(matches!(clock.set(Utc::now()), Err(ClockError::NotManual)), "only its topic moves it");
    }
}
