//! Maintenance windows of the ERP: weekly intervals in UTC, on the runtime's clock, during which
//! nothing is posted (the partitions pause) and after which the backlog drains at the rate
//! limit.
//!
//! A window is written `<days> HH:MM-HH:MM`: `Sun 01:00-03:00`, `Mon-Fri 22:00-23:30`,
//! `daily 02:00-02:15`; an end before its start runs past midnight into the next day
//! (`Sat 23:00-01:00`). A cron expression names instants, not intervals, hence this small
//! format rather than a cron crate.

use chrono::{DateTime, Datelike, Duration, NaiveTime, TimeZone, Utc, Weekday};

/// One weekly window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    days: Vec<Weekday>,
    start: NaiveTime,
    end: NaiveTime,
    text: String,
}

const DAYS: [(&str, Weekday); 7] = [
    ("Mon", Weekday::Mon),
    ("Tue", Weekday::Tue),
    ("Wed", Weekday::Wed),
    ("Thu", Weekday::Thu),
    ("Fri", Weekday::Fri),
    ("Sat", Weekday::Sat),
    ("Sun", Weekday::Sun),
];

fn day(text: &str) -> Result<Weekday, String> {
    DAYS.iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(text))
        .map(|(_, day)| *day)
        .ok_or_else(|| format!("{text:?} is not a day (Mon, Tue, Wed, Thu, Fri, Sat, Sun)"))
}

impl std::str::FromStr for Window {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let invalid = |reason: String| format!("maintenance window {text:?}: {reason}");
        let (days, times) =
            text.trim().split_once(' ').ok_or_else(|| invalid("expected `<days> HH:MM-HH:MM`".into()))?;
        let days = match days {
            "daily" => DAYS.iter().map(|(_, day)| *day).collect(),
            range if range.contains('-') => {
                let (first, last) = range.split_once('-').unwrap_or_default();
                let (first, last) = (day(first).map_err(invalid)?, day(last).map_err(invalid)?);
                let mut days = vec![first];
                let mut next = first;
                while next != last {
                    next = next.succ();
                    days.push(next);
                }
                days
            }
            single => vec![day(single).map_err(invalid)?],
        };
        let (start, end) = times.trim().split_once('-').ok_or_else(|| invalid("expected HH:MM-HH:MM".into()))?;
        let time = |t: &str| NaiveTime::parse_from_str(t.trim(), "%H:%M").map_err(|e| invalid(format!("{t:?}: {e}")));
        let (start, end) = (time(start)?, time(end)?);
        if start == end {
            return Err(invalid("an empty window".into()));
        }
        Ok(Self { days, start, end, text: text.trim().to_owned() })
    }
}

impl Window {
    /// The end of this window if `now` is inside it (of the occurrence that started today or,
    /// past midnight, yesterday).
    pub fn ends_after(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        for days_back in [0, 1] {
            let date = (now - Duration::days(days_back)).date_naive();
            if !self.days.contains(&date.weekday()) {
                continue;
            }
            let start = Utc.from_utc_datetime(&date.and_time(self.start));
            let mut end = Utc.from_utc_datetime(&date.and_time(self.end));
            if self.end < self.start {
                end += Duration::days(1);
            }
            if start <= now && now < end {
                return Some(end);
            }
        }
        None
    }
}

impl std::fmt::Display for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// The configured windows.
#[derive(Debug, Clone, Default)]
pub struct Windows(Vec<Window>);

impl Windows {
    /// Parses every window; all errors at once.
    pub fn parse(texts: &[String]) -> Result<Self, Vec<String>> {
        let (windows, errors): (Vec<_>, Vec<_>) = texts.iter().map(|t| t.parse::<Window>()).partition(Result::is_ok);
        if errors.is_empty() {
            Ok(Self(windows.into_iter().map(Result::unwrap).collect()))
        } else {
            Err(errors.into_iter().map(Result::unwrap_err).collect())
        }
    }

    /// The window `now` is in, with when it ends (the latest end, should windows overlap).
    pub fn current(&self, now: DateTime<Utc>) -> Option<(&Window, DateTime<Utc>)> {
        self.0.iter().filter_map(|w| w.ends_after(now).map(|end| (w, end))).max_by_key(|(_, end)| *end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().to_utc()
    }

    #[test]
    fn weekly_windows_hold_their_days_and_hours_in_utc() {
        let windows =
            Windows::parse(&["Sun 01:00-03:00".into(), "Mon-Fri 22:00-23:30".into(), "Sat 23:00-01:00".into()])
                .unwrap();
        // 2026-12-06 is a Sunday.
        assert_eq!(
            windows.current(at("2026-12-06T00:59:59Z")).map(|(_, end)| end),
            Some(at("2026-12-06T01:00:00Z")),
            "Saturday's window runs past midnight"
        );
        assert_eq!(windows.current(at("2026-12-06T01:00:00Z")).map(|(_, end)| end), Some(at("2026-12-06T03:00:00Z")));
        assert!(windows.current(at("2026-12-06T03:00:00Z")).is_none(), "the end is exclusive");
        assert_eq!(
            windows.current(at("2026-12-02T22:15:00Z")).map(|(_, end)| end),
            Some(at("2026-12-02T23:30:00Z")),
            "a Wednesday"
        );
        assert!(windows.current(at("2026-12-05T22:15:00Z")).is_none(), "not on a Saturday at 22:15");
        assert_eq!(windows.current(at("2026-12-05T23:30:00Z")).unwrap().0.to_string(), "Sat 23:00-01:00");
        let daily = Windows::parse(&["daily 02:00-02:15".into()]).unwrap();
        assert!(daily.current(at("2026-12-03T02:10:00Z")).is_some());
    }

    #[test]
    fn malformed_windows_are_all_reported() {
        let errors =
            Windows::parse(&["Funday 01:00-02:00".into(), "Sun 1-2".into(), "Sun 01:00-01:00".into(), "Sun".into()])
                .unwrap_err();
        assert_eq!(errors.len(), 4, "{errors:?}");
        assert!(errors[0].contains("not a day"));
    }
}
