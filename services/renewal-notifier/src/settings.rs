//! The `[renewal_notifier]` configuration section: the milestones, and the scoring rules that
//! turn what the service has seen of an account into a risk level.
//!
//! Scoring (each rule yields one signal with its severity; the level is the highest severity,
//! raised to HIGH when `medium_signals_for_high` signals are MEDIUM or above; no signal: LOW):
//!
//! | signal | when | severity |
//! | --- | --- | --- |
//! | ACCOUNT_SUSPENDED | entitlement SUSPENDED | `suspended` (HIGH) |
//! | ACCOUNT_IN_GRACE | entitlement GRACE | `grace` (MEDIUM) |
//! | PAYMENT_FAILED | failed payments in the last `failed_payments_window_days` | MEDIUM from 1, HIGH from `failed_payments_high` (2) |
//! | OPEN_SUPPORT_CASE | open cases of a severity in `case_severities` | that severity's level, one level up once the oldest is `case_age_days` old |
//! | USAGE_OVERAGE | this period's usage of a meter at `overage_percent` (100) % of the included quantity or more | LOW, MEDIUM from `overage_percent_medium` (150) |
//! | USAGE_DECLINE | last complete period's usage below `low_usage_percent` (30) % of the included quantity, or below `decline_percent` (50) % of the period before | MEDIUM |

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tributary_contracts::types::{Audience, RiskLevel};
use tributary_outbound::DeliverySettings;
use tributary_runtime::ServiceSection;

/// The scoring rules.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Scoring {
    /// Severity of a suspended account.
    pub suspended: RiskLevel,
    /// Severity of an account in grace.
    pub grace: RiskLevel,
    /// Failed payments counted over this many days.
    pub failed_payments_window_days: u32,
    /// Failed payments in the window that make the signal HIGH (one makes it MEDIUM).
    pub failed_payments_high: u32,
    /// Severity of open cases, by case severity (`SEV1`, `SEV2`, ...); others are not signals.
    pub case_severities: BTreeMap<String, RiskLevel>,
    /// An open case this old raises its signal one level.
    pub case_age_days: u32,
    /// Usage at this share of the included quantity (percent) is an overage signal (LOW).
    pub overage_percent: u32,
    /// ... and MEDIUM from this share.
    pub overage_percent_medium: u32,
    /// A complete period's usage below this share of the included quantity (percent) is a
    /// decline signal.
    pub low_usage_percent: u32,
    /// A complete period's usage below this share of the period before (percent) is a
    /// decline signal.
    pub decline_percent: u32,
    /// This many signals at MEDIUM or above make the level HIGH.
    pub medium_signals_for_high: usize,
    /// Overage charges summed over this many days, as evidence.
    pub charges_window_days: u32,
}

impl Default for Scoring {
    fn default() -> Self {
        Self {
            suspended: RiskLevel::High,
            grace: RiskLevel::Medium,
            failed_payments_window_days: 30,
            failed_payments_high: 2,
            case_severities: [("SEV1".to_owned(), RiskLevel::High), ("SEV2".to_owned(), RiskLevel::Medium)].into(),
            case_age_days: 7,
            overage_percent: 100,
            overage_percent_medium: 150,
            low_usage_percent: 30,
            decline_percent: 50,
            medium_signals_for_high: 2,
            charges_window_days: 90,
        }
    }
}

/// The renewal-notifier settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Days before the renewal date at which a notification goes out.
    pub milestones_days: Vec<u32>,
    /// Also notify when the notice period ends (renewal date minus `notice_period_days`).
    pub notify_at_notice_deadline: bool,
    /// How often each partition's renewal schedules are checked against `refdata.contracts`
    /// (a changed, renewed or cancelled contract moves its schedule within this time).
    #[serde(with = "humantime_serde")]
    pub schedule_check_every: Duration,
    /// A rise of the risk to this level between milestones raises a notification at once
    /// (once per cause), within `milestones_days`' largest value before renewal.
    pub raise_on: RiskLevel,
    /// Teams addressed, by risk level.
    pub audience: BTreeMap<String, Vec<Audience>>,
    /// The scoring rules.
    pub scoring: Scoring,
    /// Webhook endpoints for its output topics (`renewal.notifications` to customer success
    /// and revenue operations tools): `[[renewal_notifier.delivery.endpoints]]`.
    pub delivery: DeliverySettings,
}

impl Default for Settings {
    fn default() -> Self {
        use Audience::{CustomerSuccess, RevenueOperations};
        Self {
            milestones_days: vec![90, 60, 30, 7],
            notify_at_notice_deadline: true,
            schedule_check_every: Duration::from_secs(3600),
            raise_on: RiskLevel::High,
            audience: [
                ("LOW".to_owned(), vec![CustomerSuccess]),
                ("MEDIUM".to_owned(), vec![CustomerSuccess, RevenueOperations]),
                ("HIGH".to_owned(), vec![CustomerSuccess, RevenueOperations]),
            ]
            .into(),
            scoring: Scoring::default(),
            delivery: DeliverySettings::default(),
        }
    }
}

/// The schema's symbol of an enum value (`HIGH`).
pub fn symbol<T: Serialize>(value: &T) -> String {
    serde_json::to_value(value).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
}

impl Settings {
    /// The teams a notification at `level` goes to.
    pub fn audience_for(&self, level: RiskLevel) -> Vec<Audience> {
        self.audience.get(&symbol(&level)).cloned().unwrap_or_else(|| vec![Audience::CustomerSuccess])
    }

    /// The widest milestone: the window in which risk rises raise notifications.
    pub fn window_days(&self) -> u32 {
        self.milestones_days.iter().copied().max().unwrap_or(0)
    }
}

impl ServiceSection for Settings {
    fn validate(&self, errors: &mut Vec<String>) {
        const SECTION: &str = "renewal_notifier";
        self.delivery.validate(SECTION, errors);
        if self.milestones_days.is_empty() {
            errors.push(format!("{SECTION}.milestones_days: at least one milestone"));
        }
        if self.milestones_days.iter().any(|days| *days > 730) {
            errors.push(format!("{SECTION}.milestones_days: at most 730 days before renewal"));
        }
        if self.schedule_check_every < Duration::from_secs(1) {
            errors.push(format!("{SECTION}.schedule_check_every must be at least 1s"));
        }
        for (level, teams) in &self.audience {
            if !["LOW", "MEDIUM", "HIGH"].contains(&level.as_str()) {
                errors.push(format!("{SECTION}.audience: {level:?} is not a risk level (LOW, MEDIUM, HIGH)"));
            }
            if teams.is_empty() || teams.contains(&Audience::Unknown) {
                errors.push(format!(
                    "{SECTION}.audience.{level}: at least one team, CUSTOMER_SUCCESS or REVENUE_OPERATIONS"
                ));
            }
        }
        let levels = [&self.scoring.suspended, &self.scoring.grace, &self.raise_on]
            .into_iter()
            .chain(self.scoring.case_severities.values());
        if levels.into_iter().any(|level| *level == RiskLevel::Unknown) {
            errors.push(format!("{SECTION}: UNKNOWN is not a risk level to score with"));
        }
        for severity in self.scoring.case_severities.keys() {
            if !["SEV1", "SEV2", "SEV3", "SEV4"].contains(&severity.as_str()) {
                errors.push(format!("{SECTION}.scoring.case_severities: {severity:?} is not a case severity"));
            }
        }
        let scoring = &self.scoring;
        if scoring.overage_percent_medium < scoring.overage_percent || scoring.failed_payments_high == 0 {
            errors.push(format!(
                "{SECTION}.scoring: overage_percent_medium >= overage_percent, failed_payments_high >= 1"
            ));
        }
        if scoring.medium_signals_for_high < 2 {
            errors.push(format!("{SECTION}.scoring.medium_signals_for_high must be at least 2"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid_and_a_bad_section_is_refused() {
        let mut errors = Vec::new();
        Settings::default().validate(&mut errors);
        assert_eq!(errors, Vec::<String>::new());
        let mut settings = Settings { milestones_days: vec![], ..Settings::default() };
        settings.audience.insert("CRITICAL".into(), vec![]);
        settings.scoring.case_severities.insert("P1".into(), RiskLevel::High);
        let mut errors = Vec::new();
        settings.validate(&mut errors);
        assert_eq!(errors.len(), 4, "{errors:?}");
    }
}
