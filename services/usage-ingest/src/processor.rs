//! The usage-ingest logic: one usage event in; running totals, threshold crossings and late
//! notices out.
//!
//! For every meter an event belongs to, the processor folds its reading into aggregates keyed
//! by account, subscription, meter, window and group-by values: one for the contract's billing
//! period and one for the clock hour, each both per dimension values and as a total over all
//! of them. State lives in the runtime's changelogged stores, so it survives restarts and
//! moves with its partition; duplicates never reach this code (the runtime drops inputs whose
//! `source/id` it has seen within the idempotency window).
//!
//! Outputs:
//! - `usage.thresholds` at once, when the billing-period total first reaches a threshold
//!   (once per threshold and period: the aggregate remembers which fired);
//! - `usage.recorded` at a bounded rate: touched aggregates are marked dirty and a per-partition
//!   flush timer writes each at most once per `recorded_interval`, and a final record when
//!   the window closes (window end plus grace);
//! - `usage.late` for an event whose billing period has closed, with the windows it missed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use prometheus_client::metrics::counter::Counter;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use tributary_contracts::decimal::Decimal6;
use tributary_contracts::topics;
use tributary_contracts::types::{
    Contract, ContractStatus, Envelope, LateReason, MissedWindow, UsageEvent, UsageLate, UsageRecorded,
    UsageThresholdCrossed, WindowKind,
};
use tributary_runtime::table::ReferenceTable;
use tributary_runtime::{Context, Output, ProcessError, Processor, Store, StoredValue, Timer};

use crate::meters::{Aggregation, Measurement, MeterDefinition, Meters, Reading, TimeBounds};
use crate::settings::Settings;
use crate::windows::{self, Window};

/// The `source` of every record usage-ingest writes.
pub const SOURCE: &str = "tributary.usage-ingest";
/// Store of aggregates, keyed by [`aggregate_key`].
pub const AGGREGATES: Store<Aggregate> = Store::new("aggregates");
/// Store of aggregates changed since their last `usage.recorded` (the value is unused).
pub const DIRTY: Store<i64> = Store::new("dirty");
const FLUSH_TIMER: &str = "flush";
const CLOSE_TIMER_PREFIX: &str = "close/";

/// Contracts by subscription (`sub:<id>`) and by account (`acct:<id>`).
pub fn contract_index(contract: &Contract) -> Vec<String> {
    vec![format!("sub:{}", contract.subscription_id), format!("acct:{}", contract.envelope.account_id)]
}

/// Counters of what the processor decided, beside the runtime's metrics.
#[derive(Debug, Clone, Default)]
pub struct IngestCounters {
    /// Events sent to `usage.late`.
    pub late_events: Counter,
    /// Events counted in their billing period whose hourly window had already closed.
    pub hourly_windows_missed: Counter,
    /// Threshold crossings emitted.
    pub thresholds_crossed: Counter,
    /// Events counted without a contract (calendar-month period, no thresholds).
    pub events_without_contract: Counter,
}

/// The usage-ingest processor.
#[derive(Debug)]
pub struct UsageProcessor {
    meters: Arc<Meters>,
    contracts: ReferenceTable<Contract>,
    settings: Settings,
    counters: IngestCounters,
}

/// What the contract includes for a meter, and at which percentages of it to report.
#[derive(Debug, Clone)]
struct Thresholds {
    included: Decimal6,
    percents: Vec<i32>,
}

/// One running total, as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Aggregate {
    account_id: String,
    subscription_id: Option<String>,
    contract_id: Option<String>,
    meter: String,
    unit: String,
    aggregation: Aggregation,
    window_kind: WindowKind,
    window_start: i64,
    window_end: i64,
    dimensions: BTreeMap<String, String>,
    total: Decimal6,
    event_count: i64,
    last_event_at: i64,
    /// Distinct values seen (UNIQUE_COUNT only).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    distinct: BTreeSet<String>,
    /// Time of the event whose value `total` holds (LATEST only).
    #[serde(default)]
    latest_at: Option<i64>,
    /// Revisions written to `usage.recorded` so far.
    sequence: i64,
    /// Threshold percentages already reported for this period (billing-period totals only).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    fired_thresholds: BTreeSet<i32>,
    /// The last event folded in: the cause of the next `usage.recorded`.
    cause: Cause,
}

impl StoredValue for Aggregate {}

/// What a derived record needs of its cause (the whole envelope would double the size of
/// an aggregate, and there is one per account, meter, window and dimension values).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Cause {
    event_id: String,
    correlation_id: String,
}

impl Cause {
    fn of(envelope: &Envelope) -> Self {
        Self { event_id: envelope.event_id.clone(), correlation_id: envelope.correlation_id.clone() }
    }
}

/// The subscription usage counts against: the contract's, else the one the event names.
fn subscription_of(contract: Option<&Contract>, event: &UsageEvent) -> Option<String> {
    contract.map(|c| c.subscription_id.clone()).or_else(|| event.subscription_id.clone())
}

impl Aggregate {
    /// An empty aggregate for `event`'s account in `window`.
    fn open(
        event: &UsageEvent,
        meter: &MeterDefinition,
        window: &Window,
        dimensions: &BTreeMap<String, String>,
        contract: Option<&Contract>,
    ) -> Self {
        Self {
            account_id: event.envelope.account_id.clone(),
            subscription_id: subscription_of(contract, event),
            contract_id: contract.map(|c| c.contract_id.clone()),
            meter: meter.key.clone(),
            unit: meter.unit.clone(),
            aggregation: meter.aggregation,
            window_kind: window.kind,
            window_start: window.start,
            window_end: window.end,
            dimensions: dimensions.clone(),
            total: Decimal6::default(),
            event_count: 0,
            last_event_at: event.time,
            distinct: BTreeSet::new(),
            latest_at: None,
            sequence: 0,
            fired_thresholds: BTreeSet::new(),
            cause: Cause::of(&event.envelope),
        }
    }

    fn fold(&mut self, reading: &Reading, time: i64) -> Result<(), ProcessError> {
        let overflow = |e| ProcessError::permanent("overflow", format!("total of meter {}: {e}", self.meter));
        match (self.aggregation, reading) {
            (Aggregation::Count, _) => {
                self.total = Decimal6::new(self.total.value() + Decimal::ONE).map_err(overflow)?
            }
            (Aggregation::Sum, Reading::Quantity(q)) => {
                self.total = Decimal6::new(self.total.value() + q.value()).map_err(overflow)?
            }
            (Aggregation::Max, Reading::Quantity(q)) => {
                if self.event_count == 0 || q.value() > self.total.value() {
                    self.total = *q;
                }
            }
            (Aggregation::Latest, Reading::Quantity(q)) => {
                if self.latest_at.is_none_or(|at| time >= at) {
                    self.total = *q;
                    self.latest_at = Some(time);
                }
            }
            (Aggregation::UniqueCount, Reading::Distinct(value)) => {
                self.distinct.insert(value.clone());
                self.total = Decimal6::from(self.distinct.len() as i64);
            }
            (aggregation, reading) => {
                return Err(ProcessError::permanent("meter", format!("{aggregation:?} cannot fold {reading:?}")));
            }
        }
        self.event_count += 1;
        self.last_event_at = self.last_event_at.max(time);
        Ok(())
    }

    fn recorded(&self, key: &str, now: DateTime<Utc>, is_final: bool) -> UsageRecorded {
        let cause = Envelope {
            event_id: self.cause.event_id.clone(),
            correlation_id: self.cause.correlation_id.clone(),
            account_id: self.account_id.clone(),
            occurred_at: self.last_event_at,
            causation_id: None,
            source: String::new(),
        };
        UsageRecorded {
            envelope: Envelope::caused_by(&cause, SOURCE, &format!("recorded/{key}/{}", self.sequence), now),
            subscription_id: self.subscription_id.clone(),
            contract_id: self.contract_id.clone(),
            meter: self.meter.clone(),
            unit: self.unit.clone(),
            window_kind: self.window_kind,
            window_start: self.window_start,
            window_end: self.window_end,
            total_quantity: self.total,
            event_count: self.event_count,
            last_event_at: self.last_event_at,
            dimensions: self.dimensions.clone().into_iter().collect(),
            sequence: self.sequence,
            is_final,
        }
    }
}

/// The key of an aggregate. It starts with the close time, so that the timer closing all
/// windows that end together finds them by prefix.
fn aggregate_key(
    close_at: i64,
    account: &str,
    window: &Window,
    meter: &str,
    subscription: Option<&str>,
    dimensions: &BTreeMap<String, String>,
) -> String {
    let kind = match window.kind {
        WindowKind::Hour => "hour",
        _ => "period",
    };
    let dimensions = serde_json::to_string(dimensions).unwrap_or_default();
    format!("{close_at:013}|{account}|{kind}|{}|{meter}|{}|{dimensions}", window.start, subscription.unwrap_or(""))
}

fn millis(duration: std::time::Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

impl UsageProcessor {
    /// A processor counting with `meters` against the contracts of `contracts`.
    pub fn new(
        meters: Arc<Meters>,
        contracts: ReferenceTable<Contract>,
        settings: Settings,
        counters: IngestCounters,
    ) -> Self {
        Self { meters, contracts, settings, counters }
    }

    /// The contract whose term covers the event: by its subscription, else by its account;
    /// an ACTIVE one before others, then the newest version.
    fn contract_for(&self, event: &UsageEvent) -> Option<Arc<Contract>> {
        let index_key = match &event.subscription_id {
            Some(subscription) => format!("sub:{subscription}"),
            None => format!("acct:{}", event.envelope.account_id),
        };
        self.contracts
            .find(&index_key)
            .into_iter()
            .filter(|c| c.term_start <= event.time && event.time < c.term_end)
            .max_by_key(|c| (c.status == ContractStatus::Active, c.version))
    }

    fn thresholds(&self, contract: Option<&Contract>, meter: &str) -> Option<Thresholds> {
        let included = contract?.included_usage.iter().find(|u| u.meter == meter)?;
        let mut percents =
            included.threshold_percents.clone().unwrap_or_else(|| self.settings.default_thresholds.clone());
        percents.sort_unstable();
        percents.dedup();
        Some(Thresholds { included: included.included_quantity, percents })
    }

    fn late(
        &self,
        context: &mut Context<'_>,
        input: &UsageEvent,
        measurements: &[Measurement<'_>],
        windows: &[(Window, i64)],
    ) {
        let now = context.now();
        let missed: Vec<MissedWindow> = measurements
            .iter()
            .flat_map(|m| {
                windows.iter().map(|(window, close_at)| MissedWindow {
                    meter: m.meter.definition.key.clone(),
                    window_kind: window.kind,
                    window_start: window.start,
                    window_end: window.end,
                    grace_ends_at: *close_at,
                })
            })
            .collect();
        let latest_close = windows.iter().map(|(_, close)| *close).max().unwrap_or_default();
        let (period, period_close) = windows[0];
        let detail = format!(
            "billing period {} – {} closed at {} (grace {})",
            format_ms(period.start),
            format_ms(period.end),
            format_ms(period_close),
            humantime::format_duration(self.settings.period_grace),
        );
        let late = UsageLate {
            envelope: Envelope::caused_by(&input.envelope, SOURCE, "late", now),
            id: input.id.clone(),
            source: input.source.clone(),
            r#type: input.r#type.clone(),
            subject: input.subject.clone(),
            time: input.time,
            data: input.data.clone(),
            subscription_id: input.subscription_id.clone(),
            meter: input.meter.clone(),
            quantity: input.quantity,
            unit: input.unit.clone(),
            dimensions: input.dimensions.clone(),
            received_at: input.received_at,
            reason: LateReason::GraceExpired,
            reason_detail: Some(detail),
            missed_windows: missed,
            lateness_ms: (now.timestamp_millis() - latest_close).max(1),
        };
        self.counters.late_events.inc();
        context.emit(Output::new(input.envelope.account_id.clone(), late));
    }

    /// Emits the crossings of `thresholds` that the billing-period total `aggregate` has
    /// reached and not yet reported.
    fn check_thresholds(
        &self,
        context: &mut Context<'_>,
        key: &str,
        aggregate: &mut Aggregate,
        thresholds: &Thresholds,
        input: &UsageEvent,
    ) {
        let (Some(subscription), Some(contract)) = (&aggregate.subscription_id, &aggregate.contract_id) else {
            return;
        };
        for &percent in &thresholds.percents {
            if aggregate.fired_thresholds.contains(&percent) {
                continue;
            }
            let threshold = (thresholds.included.value() * Decimal::from(percent) / Decimal::ONE_HUNDRED).round_dp(6);
            if aggregate.total.value() < threshold {
                break; // percents are sorted: the higher ones are not reached either
            }
            aggregate.fired_thresholds.insert(percent);
            let overage = (aggregate.total.value() - thresholds.included.value()).max(Decimal::ZERO);
            let crossed = UsageThresholdCrossed {
                envelope: Envelope::caused_by(
                    &input.envelope,
                    SOURCE,
                    &format!("threshold/{key}/{percent}"),
                    DateTime::from_timestamp_millis(input.time).unwrap_or_default(),
                ),
                subscription_id: subscription.clone(),
                contract_id: contract.clone(),
                meter: aggregate.meter.clone(),
                unit: aggregate.unit.clone(),
                threshold_percent: percent,
                included_quantity: thresholds.included,
                threshold_quantity: Decimal6::new(threshold).unwrap_or(thresholds.included),
                used_quantity: aggregate.total,
                overage_quantity: Decimal6::new(overage).unwrap_or_default(),
                period_start: aggregate.window_start,
                period_end: aggregate.window_end,
                crossed_at: input.time,
            };
            self.counters.thresholds_crossed.inc();
            tracing::info!(account = aggregate.account_id, meter = aggregate.meter, percent, "threshold crossed");
            context.emit(Output::new(aggregate.account_id.clone(), crossed));
        }
    }

    /// Makes sure the timer closing the windows that close at `close_at` is set.
    fn schedule_close(context: &mut Context<'_>, close_at: i64) -> Result<(), ProcessError> {
        let timer = format!("{CLOSE_TIMER_PREFIX}{close_at:013}");
        if context.scheduled(&timer)?.is_none() {
            let due = DateTime::from_timestamp_millis(close_at).unwrap_or_else(|| context.now());
            context.schedule(&timer, due, serde_json::Value::Null)?;
        }
        Ok(())
    }

    /// Writes the running total of every dirty aggregate of this partition.
    fn flush(context: &mut Context<'_>) -> Result<(), ProcessError> {
        let now = context.now();
        for (key, _) in context.scan_prefix(DIRTY, "")? {
            context.delete(DIRTY, &key);
            let Some(mut aggregate) = context.get(AGGREGATES, &key)? else { continue };
            aggregate.sequence += 1;
            context.emit(Output::new(aggregate.account_id.clone(), aggregate.recorded(&key, now, false)));
            context.put(AGGREGATES, &key, &aggregate)?;
        }
        Ok(())
    }

    /// Writes the final total of every aggregate closing at `close_at` and forgets them.
    fn close(context: &mut Context<'_>, close_at: &str) -> Result<(), ProcessError> {
        let now = context.now();
        for (key, mut aggregate) in context.scan_prefix(AGGREGATES, &format!("{close_at}|"))? {
            aggregate.sequence += 1;
            context.emit(Output::new(aggregate.account_id.clone(), aggregate.recorded(&key, now, true)));
            context.delete(AGGREGATES, &key);
            context.delete(DIRTY, &key);
        }
        Ok(())
    }
}

fn format_ms(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| ms.to_string())
}

impl Processor for UsageProcessor {
    type Input = UsageEvent;

    fn stores(&self) -> Vec<&'static str> {
        vec![AGGREGATES.name(), DIRTY.name()]
    }

    fn outputs(&self) -> Vec<&'static str> {
        vec![topics::USAGE_RECORDED, topics::USAGE_THRESHOLDS, topics::USAGE_LATE]
    }

    /// Duplicates are the same `source` and `id` as the platform sent them, whichever way
    /// (Kafka or HTTP) and however often they came.
    fn idempotency_key(&self, input: &UsageEvent) -> Option<String> {
        Some(format!("{}/{}", input.source, input.id))
    }

    async fn process(&self, context: &mut Context<'_>, input: &UsageEvent) -> Result<(), ProcessError> {
        let now = context.now();
        let bounds = TimeBounds { max_age: self.settings.max_event_age, max_skew: self.settings.max_clock_skew };
        let measurements = self
            .meters
            .measure(input, now, bounds)
            .map_err(|rejection| ProcessError::permanent("validation", rejection.to_string()))?;
        let contract = self.contract_for(input);
        if contract.is_none() {
            self.counters.events_without_contract.inc();
        }
        let period = windows::billing_period(contract.as_deref(), input.time);
        let hour = windows::hour(input.time);
        let period_close = period.end + millis(self.settings.period_grace);
        let hour_close = hour.end + millis(self.settings.hour_grace);
        let now_ms = now.timestamp_millis();
        // The billing period decides: once it has closed, the event is counted nowhere and
        // reported for correction. An hour that closed inside an open period only loses its
        // hourly total.
        if now_ms >= period_close {
            let mut missed = vec![(period, period_close)];
            if now_ms >= hour_close {
                missed.push((hour, hour_close));
            }
            self.late(context, input, &measurements, &missed);
            return Ok(());
        }
        let mut windows = vec![(period, period_close)];
        if now_ms < hour_close {
            windows.push((hour, hour_close));
        } else {
            self.counters.hourly_windows_missed.inc();
        }

        let account = input.envelope.account_id.as_str();
        let subscription = subscription_of(contract.as_deref(), input);
        for measurement in &measurements {
            let definition = &measurement.meter.definition;
            let mut dimension_sets = vec![BTreeMap::new()];
            if !measurement.dimensions.is_empty() {
                dimension_sets.push(measurement.dimensions.clone());
            }
            for (window, close_at) in &windows {
                for dimensions in &dimension_sets {
                    let key =
                        aggregate_key(*close_at, account, window, &definition.key, subscription.as_deref(), dimensions);
                    let mut aggregate = match context.get(AGGREGATES, &key)? {
                        Some(aggregate) => aggregate,
                        None => {
                            Self::schedule_close(context, *close_at)?;
                            Aggregate::open(input, definition, window, dimensions, contract.as_deref())
                        }
                    };
                    aggregate.fold(&measurement.reading, input.time)?;
                    aggregate.cause = Cause::of(&input.envelope);
                    // Thresholds are read from the contract at every event, so a contract
                    // revised mid-period applies from the next event on; only what already
                    // fired is state.
                    let is_period_total = window.kind == WindowKind::BillingPeriod && dimensions.is_empty();
                    if is_period_total && let Some(thresholds) = self.thresholds(contract.as_deref(), &definition.key) {
                        self.check_thresholds(context, &key, &mut aggregate, &thresholds, input);
                    }
                    context.put(AGGREGATES, &key, &aggregate)?;
                    context.put(DIRTY, &key, &1_i64)?;
                }
            }
        }
        if context.scheduled(FLUSH_TIMER)?.is_none() {
            let interval = chrono::Duration::from_std(self.settings.recorded_interval).unwrap_or_default();
            context.schedule(FLUSH_TIMER, now + interval, serde_json::Value::Null)?;
        }
        Ok(())
    }

    async fn on_timer(&self, context: &mut Context<'_>, timer: &Timer) -> Result<(), ProcessError> {
        match timer.key.strip_prefix(CLOSE_TIMER_PREFIX) {
            Some(close_at) => Self::close(context, close_at),
            None => Self::flush(context),
        }
    }
}

/// The processor's logic on the runtime's test driver: no broker, time moved by the clock.
#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use chrono::{DateTime, Utc};
    use tributary_contracts::samples::{Fill, typed};
    use tributary_contracts::types::{BillingPeriod, IncludedUsage};
    use tributary_runtime::testing::{DriverBuilder, Outcome, TestDriver};

    use super::*;
    use crate::meters::{Aggregation, MeterDefinition};

    /// The driver's clock starts here; the contract's annual term started a month earlier.
    const START: &str = "2026-03-10T12:00:00Z";

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().to_utc()
    }

    fn contract(account: &str, included: i64) -> Contract {
        let mut contract: Contract = typed(Fill::Full, 7);
        contract.envelope = Envelope::originating("crm", account, at(START));
        contract.contract_id = format!("ctr-{account}");
        contract.subscription_id = format!("sub-{account}");
        contract.status = ContractStatus::Active;
        contract.term_start = at("2026-02-01T00:00:00Z").timestamp_millis();
        contract.term_end = at("2026-05-01T00:00:00Z").timestamp_millis();
        contract.billing_period = BillingPeriod::Monthly;
        contract.included_usage = vec![IncludedUsage {
            meter: "api_calls".into(),
            included_quantity: Decimal6::from(included),
            unit: "call".into(),
            threshold_percents: None,
        }];
        contract.deleted = false;
        contract.version = 1;
        contract
    }

    fn driver(contracts: &[Contract]) -> TestDriver<UsageProcessor> {
        let meters = Meters::compile(&[MeterDefinition {
            key: "api_calls".into(),
            event_type: "api.call".into(),
            aggregation: Aggregation::Count,
            value_property: None,
            unit: "call".into(),
            group_by: BTreeMap::new(),
        }])
        .unwrap();
        let table = ReferenceTable::new(contract_index);
        for contract in contracts {
            table.apply(&contract.contract_id, Some(contract.clone()));
        }
        let settings = Settings { recorded_interval: Duration::from_secs(2), ..Settings::default() };
        let processor = UsageProcessor::new(Arc::new(meters), table, settings, IngestCounters::default());
        DriverBuilder::new().service(crate::NAME).start_at(at(START)).build(processor)
    }

    fn call(account: &str, id: &str, time: DateTime<Utc>) -> UsageEvent {
        let mut envelope = Envelope::originating("gateway", account, time);
        envelope.event_id = format!("env-{id}");
        UsageEvent {
            envelope,
            id: id.into(),
            source: "gateway".into(),
            r#type: "api.call".into(),
            subject: account.into(),
            time: time.timestamp_millis(),
            data: "{}".into(),
            subscription_id: None,
            meter: None,
            quantity: None,
            unit: None,
            dimensions: Default::default(),
            received_at: None,
        }
    }

    /// The newest `usage.recorded` of each window kind, among `records`.
    fn latest(records: &[UsageRecorded], kind: WindowKind) -> Option<&UsageRecorded> {
        records.iter().filter(|r| r.window_kind == kind && r.dimensions.is_empty()).max_by_key(|r| r.sequence)
    }

    #[tokio::test]
    async fn running_totals_are_written_once_per_interval_not_per_event() {
        let mut driver = driver(&[contract("acct-1", 100)]);
        for i in 0..5 {
            assert_eq!(driver.pipe(call("acct-1", &format!("e{i}"), driver.now())).await, Outcome::Processed);
        }
        assert!(driver.read::<UsageRecorded>().await.is_empty(), "nothing before the interval");
        driver.advance(Duration::from_secs(2)).await;
        let records = driver.read::<UsageRecorded>().await;
        assert_eq!(records.len(), 2, "one per window (period, hour): {records:?}");
        for record in &records {
            assert_eq!((record.total_quantity, record.event_count, record.sequence), (Decimal6::from(5), 5, 1));
            assert!(!record.is_final);
        }
        driver.advance(Duration::from_secs(10)).await;
        assert!(driver.read::<UsageRecorded>().await.is_empty(), "unchanged aggregates are not written again");
    }

    #[tokio::test]
    async fn thresholds_fire_once_each_at_the_share_of_the_included_quantity() {
        let mut driver = driver(&[contract("acct-1", 10)]);
        for i in 0..13 {
            driver.pipe(call("acct-1", &format!("e{i}"), driver.now())).await;
        }
        let crossings = driver.read::<UsageThresholdCrossed>().await;
        let fired: Vec<(i32, Decimal6, Decimal6)> =
            crossings.iter().map(|c| (c.threshold_percent, c.used_quantity, c.overage_quantity)).collect();
        assert_eq!(
            fired,
            vec![
                (80, Decimal6::from(8), Decimal6::from(0)),
                (100, Decimal6::from(10), Decimal6::from(0)),
                (120, Decimal6::from(12), Decimal6::from(2)),
            ]
        );
        assert_eq!(crossings[0].period_start, at("2026-03-01T00:00:00Z").timestamp_millis(), "the contract's month");
        assert_eq!(crossings[0].contract_id, "ctr-acct-1");
    }

    #[tokio::test]
    async fn the_hour_and_then_the_billing_period_close_on_the_clock_with_a_final_total() {
        let mut driver = driver(&[contract("acct-1", 100)]);
        driver.pipe(call("acct-1", "e1", driver.now())).await;
        driver.pipe(call("acct-1", "e2", driver.now())).await;
        driver.advance(Duration::from_secs(2)).await;
        driver.read::<UsageRecorded>().await;

        // 13:00 is the end of the hour; it closes after the hour's grace (1 h).
        driver.advance_to(at("2026-03-10T13:59:59Z")).await;
        assert!(driver.read::<UsageRecorded>().await.is_empty(), "the hour's grace has not ended");
        driver.advance(Duration::from_secs(1)).await;
        let records = driver.read::<UsageRecorded>().await;
        let hour = latest(&records, WindowKind::Hour).expect("the hour's final total");
        assert!(hour.is_final);
        assert_eq!((hour.total_quantity, hour.event_count, hour.sequence), (Decimal6::from(2), 2, 2));
        assert!(latest(&records, WindowKind::BillingPeriod).is_none(), "the period is still open");

        // The month ends on 1 April; it closes after the period's grace (6 h).
        driver.advance_to(at("2026-04-01T06:00:00Z")).await;
        let records = driver.read::<UsageRecorded>().await;
        let period = latest(&records, WindowKind::BillingPeriod).expect("the period's final total");
        assert!(period.is_final);
        assert_eq!(period.total_quantity, Decimal6::from(2));
        assert_eq!(period.window_end, at("2026-04-01T00:00:00Z").timestamp_millis());
        let partition = driver.partition_of("acct-1");
        assert_eq!(driver.state(partition).unwrap().len(AGGREGATES.name()), 0, "closed aggregates are forgotten");
        assert!(driver.timers().is_empty(), "no timer is left behind");
    }

    #[tokio::test]
    async fn an_event_of_a_closed_period_goes_to_usage_late_and_is_counted_nowhere() {
        let mut driver = driver(&[contract("acct-1", 100)]);
        // March closed at 06:00 on 1 April (period end plus 6 h of grace).
        driver.advance_to(at("2026-04-02T00:00:00Z")).await;
        let march = call("acct-1", "march", at("2026-03-31T20:00:00Z"));
        assert_eq!(driver.pipe(march).await, Outcome::Processed);
        let late = driver.read::<UsageLate>().await;
        assert_eq!(late.len(), 1);
        assert_eq!(late[0].reason, LateReason::GraceExpired);
        let missed = &late[0].missed_windows[0];
        assert_eq!(missed.window_end, at("2026-04-01T00:00:00Z").timestamp_millis());
        assert_eq!(missed.grace_ends_at, at("2026-04-01T06:00:00Z").timestamp_millis());
        driver.advance(Duration::from_secs(5)).await;
        assert!(driver.read::<UsageRecorded>().await.is_empty(), "counted nowhere");

        // An April event an hour old is counted in the open period.
        assert_eq!(driver.pipe(call("acct-1", "april", at("2026-04-01T23:00:00Z"))).await, Outcome::Processed);
        assert!(driver.read::<UsageLate>().await.is_empty());
    }

    #[tokio::test]
    async fn a_duplicate_is_counted_once_and_an_invalid_event_is_dead_lettered_with_its_reason() {
        let mut driver = driver(&[contract("acct-1", 100)]);
        let first = call("acct-1", "e1", driver.now());
        assert_eq!(driver.pipe(first.clone()).await, Outcome::Processed);
        let mut resent = first.clone();
        resent.envelope.event_id = "another-envelope".into();
        assert_eq!(driver.pipe(resent).await, Outcome::Duplicate, "same source and id");
        let mut unknown = call("acct-1", "e2", driver.now());
        unknown.r#type = "unknown.type".into();
        assert_eq!(driver.pipe(unknown).await, Outcome::DeadLettered("validation".into()));
        let letters = driver.dead_letters();
        assert!(letters[0].letter.message.contains("unknown.type"), "{:?}", letters[0].letter);
        driver.advance(Duration::from_secs(2)).await;
        let records = driver.read::<UsageRecorded>().await;
        assert_eq!(latest(&records, WindowKind::BillingPeriod).unwrap().event_count, 1);
    }
}
