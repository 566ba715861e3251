//! Usage windows: the clock hour and the contract's billing period an event time falls in.

use chrono::{DateTime, Datelike, Months, TimeZone, Utc};
use tributary_contracts::types::{BillingPeriod, Contract, WindowKind};

const HOUR_MS: i64 = 3_600_000;

/// One window: `[start, end)` in UTC milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Hour or billing period.
    pub kind: WindowKind,
    /// Inclusive start.
    pub start: i64,
    /// Exclusive end.
    pub end: i64,
}

/// The clock hour (UTC) of `time_ms`.
pub fn hour(time_ms: i64) -> Window {
    let start = time_ms.div_euclid(HOUR_MS) * HOUR_MS;
    Window { kind: WindowKind::Hour, start, end: start + HOUR_MS }
}

/// The billing period of `time_ms`: periods of the contract's length counted from its
/// `term_start` and cut at `term_end`; without a contract, the calendar month (UTC).
pub fn billing_period(contract: Option<&Contract>, time_ms: i64) -> Window {
    let time = DateTime::<Utc>::from_timestamp_millis(time_ms).unwrap_or_default();
    // A term start outside chrono's range cannot anchor periods: such a contract counts as none.
    let anchored = contract.and_then(|c| Some((c, DateTime::<Utc>::from_timestamp_millis(c.term_start)?)));
    let (anchor, months, term_end) = match anchored {
        Some((contract, anchor)) => (anchor, period_months(contract.billing_period), Some(contract.term_end)),
        None => (Utc.with_ymd_and_hms(time.year(), time.month(), 1, 0, 0, 0).unwrap(), 1, None),
    };
    // Each period start is computed from the anchor (not from the previous start), so that a
    // term starting on the 31st has its periods on the last day of shorter months and back on
    // the 31st afterwards.
    let start_of = |k: i64| -> DateTime<Utc> {
        if k >= 0 {
            anchor.checked_add_months(Months::new((k * months) as u32)).unwrap_or(anchor)
        } else {
            anchor.checked_sub_months(Months::new((-k * months) as u32)).unwrap_or(anchor)
        }
    };
    let elapsed_months = (time.year() - anchor.year()) as i64 * 12 + time.month() as i64 - anchor.month() as i64;
    // The estimate is off by at most one period (day of month, time of day); a contract with
    // dates beyond chrono's range could make the steps go nowhere, hence the bounded search
    // and the calendar month as the answer of last resort.
    let estimate = elapsed_months.div_euclid(months);
    let Some(k) = (estimate - 2..=estimate + 1).find(|&k| start_of(k) <= time && time < start_of(k + 1)) else {
        return billing_period(None, time_ms);
    };
    let start = start_of(k).timestamp_millis();
    let mut end = start_of(k + 1).timestamp_millis();
    if let Some(term_end) = term_end
        && term_end > start
    {
        end = end.min(term_end);
    }
    Window { kind: WindowKind::BillingPeriod, start, end }
}

fn period_months(period: BillingPeriod) -> i64 {
    match period {
        BillingPeriod::Quarterly => 3,
        BillingPeriod::Annual => 12,
        // MONTHLY, and a symbol newer than this reader: monthly is the safe reading, as it
        // never folds usage of two invoices into one total.
        BillingPeriod::Monthly | BillingPeriod::Unknown => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tributary_contracts::samples::{Fill, typed};

    fn ms(text: &str) -> i64 {
        DateTime::parse_from_rfc3339(text).unwrap().timestamp_millis()
    }

    fn contract(term_start: &str, term_end: &str, period: BillingPeriod) -> Contract {
        let mut contract: Contract = typed(Fill::Full, 1);
        contract.term_start = ms(term_start);
        contract.term_end = ms(term_end);
        contract.billing_period = period;
        contract
    }

    #[test]
    fn hours_are_clock_hours() {
        let window = hour(ms("2026-03-04T05:06:07Z"));
        assert_eq!((window.start, window.end), (ms("2026-03-04T05:00:00Z"), ms("2026-03-04T06:00:00Z")));
    }

    #[test]
    fn periods_follow_the_term_start_and_stop_at_the_term_end() {
        let c = contract("2026-01-31T00:00:00Z", "2027-01-31T00:00:00Z", BillingPeriod::Monthly);
        let feb = billing_period(Some(&c), ms("2026-03-01T12:00:00Z"));
        assert_eq!((feb.start, feb.end), (ms("2026-02-28T00:00:00Z"), ms("2026-03-31T00:00:00Z")));
        let first = billing_period(Some(&c), ms("2026-01-31T00:00:00Z"));
        assert_eq!(first.start, ms("2026-01-31T00:00:00Z"));

        let q = contract("2026-02-15T00:00:00Z", "2026-06-01T00:00:00Z", BillingPeriod::Quarterly);
        let second = billing_period(Some(&q), ms("2026-05-20T00:00:00Z"));
        assert_eq!((second.start, second.end), (ms("2026-05-15T00:00:00Z"), ms("2026-06-01T00:00:00Z")));

        let annual = contract("2025-07-01T00:00:00Z", "2027-07-01T00:00:00Z", BillingPeriod::Annual);
        let year = billing_period(Some(&annual), ms("2026-06-30T23:59:59Z"));
        assert_eq!((year.start, year.end), (ms("2025-07-01T00:00:00Z"), ms("2026-07-01T00:00:00Z")));
    }

    #[test]
    fn a_contract_with_dates_out_of_range_falls_back_to_the_calendar_month() {
        let mut absurd = contract("2026-01-01T00:00:00Z", "2027-01-01T00:00:00Z", BillingPeriod::Quarterly);
        absurd.term_start = i64::MAX / 2;
        let month = billing_period(Some(&absurd), ms("2026-02-10T08:00:00Z"));
        assert_eq!((month.start, month.end), (ms("2026-02-01T00:00:00Z"), ms("2026-03-01T00:00:00Z")));
    }

    #[test]
    fn without_a_contract_the_period_is_the_calendar_month() {
        let month = billing_period(None, ms("2026-02-10T08:00:00Z"));
        assert_eq!((month.start, month.end), (ms("2026-02-01T00:00:00Z"), ms("2026-03-01T00:00:00Z")));
    }
}
