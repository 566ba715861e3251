//! The `[entitlement_watcher]` configuration section: the states, their order and the rules that
//! move an account between them, how long grace lasts, and where support flags are delivered.
//!
//! The states are those of `entitlement.changes` (ACTIVE, GRACE, SUSPENDED, CLOSED), listed from
//! the least to the most restricted; a deployment may leave GRACE out (a failed payment then
//! suspends at once, if a rule says so). A rule names a trigger, the states it applies in and the
//! state it leads to; a trigger that no rule covers in the account's state changes nothing. The
//! defaults are Kill Bill's overdue ladder in miniature:
//!
//! | trigger | from | to |
//! | --- | --- | --- |
//! | `payment_failed` | ACTIVE | GRACE |
//! | `grace_expired` | GRACE | SUSPENDED |
//! | `dunning_exhausted` | ACTIVE, GRACE | SUSPENDED |
//! | `paid` | GRACE, SUSPENDED | ACTIVE |
//! | `contract_ended`, `customer_closed` | ACTIVE, GRACE, SUSPENDED | CLOSED |
//!
//! Checked at start: every state known and listed once, ACTIVE first; rules on listed states,
//! at most one per trigger and state; payment problems only ever lead to a more restricted
//! state and `paid` to a less restricted one; an account that a rule can put in GRACE has a way
//! out of it when grace ends; every state a payment problem leads to is left again on `paid`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tributary_contracts::types::{CaseSeverity, EntitlementState, SupportTier};
use tributary_outbound::DeliverySettings;
use tributary_runtime::ServiceSection;

/// What can move an account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// A payment of an invoice failed (not yet overdue before).
    PaymentFailed,
    /// The account's grace ended with the amount still overdue.
    GraceExpired,
    /// The platform reports that it gave up retrying (dunning EXHAUSTED).
    DunningExhausted,
    /// Nothing is overdue any more: the failed invoices were paid (or voided).
    Paid,
    /// The account's contract expired, was cancelled, or was deleted.
    ContractEnded,
    /// The customer was closed in the master data.
    CustomerClosed,
}

impl Trigger {
    /// Whether the trigger is a payment problem (it may only restrict an account further).
    pub fn restricts(self) -> bool {
        matches!(self, Self::PaymentFailed | Self::GraceExpired | Self::DunningExhausted)
    }
}

/// One rule: on `on`, an account in one of `from` moves to `to`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// The trigger.
    pub on: Trigger,
    /// The states it applies in.
    pub from: Vec<EntitlementState>,
    /// The state it leads to.
    pub to: EntitlementState,
}

impl Rule {
    fn new(on: Trigger, from: &[EntitlementState], to: EntitlementState) -> Self {
        Self { on, from: from.to_vec(), to }
    }
}

/// When a support case is flagged for escalation instead of being left to the queue.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct EscalationSettings {
    /// Severities escalated (default SEV1).
    pub severities: Vec<CaseSeverity>,
    /// Account states escalated (default SUSPENDED).
    pub states: Vec<EntitlementState>,
    /// Support tiers of the contract escalated (default ENTERPRISE).
    pub tiers: Vec<SupportTier>,
}

impl Default for EscalationSettings {
    fn default() -> Self {
        Self {
            severities: vec![CaseSeverity::Sev1],
            states: vec![EntitlementState::Suspended],
            tiers: vec![SupportTier::Enterprise],
        }
    }
}

/// The entitlement-watcher settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// The states, least restricted first.
    pub states: Vec<EntitlementState>,
    /// The transitions.
    pub rules: Vec<Rule>,
    /// Grace of an account whose contract is not in `refdata.contracts`.
    pub default_grace_days: u32,
    /// Grace by support tier for contracts whose `grace_days` is 0 (e.g. `ENTERPRISE = 30`).
    /// Empty by default: a contract's 0 then means what `refdata.contracts` says, no grace, and
    /// suspension once dunning is exhausted.
    pub tier_grace_days: BTreeMap<String, u32>,
    /// Whether another invoice failing during grace restarts the grace period from its
    /// failure (default: no, grace ends when the first failure's grace ends).
    pub extend_grace_on_new_failure: bool,
    /// How often each partition's accounts are checked for ended contracts and closed
    /// customers (master data does not arrive on the account's partition).
    #[serde(with = "humantime_serde")]
    pub closure_check_every: Duration,
    /// Which support cases are flagged for escalation.
    pub escalation: EscalationSettings,
    /// Webhook endpoints for its output topics (`support.account-flags` to the support
    /// platform): `[[entitlement_watcher.delivery.endpoints]]`, see `tributary_outbound::settings`.
    pub delivery: DeliverySettings,
}

impl Default for Settings {
    fn default() -> Self {
        use EntitlementState::{Active, Closed, Grace, Suspended};
        Self {
            states: vec![Active, Grace, Suspended, Closed],
            rules: vec![
                Rule::new(Trigger::PaymentFailed, &[Active], Grace),
                Rule::new(Trigger::GraceExpired, &[Grace], Suspended),
                Rule::new(Trigger::DunningExhausted, &[Active, Grace], Suspended),
                Rule::new(Trigger::Paid, &[Grace, Suspended], Active),
                Rule::new(Trigger::ContractEnded, &[Active, Grace, Suspended], Closed),
                Rule::new(Trigger::CustomerClosed, &[Active, Grace, Suspended], Closed),
            ],
            default_grace_days: 14,
            tier_grace_days: BTreeMap::new(),
            extend_grace_on_new_failure: false,
            closure_check_every: Duration::from_secs(3600),
            escalation: EscalationSettings::default(),
            delivery: DeliverySettings::default(),
        }
    }
}

impl Settings {
    /// Where `trigger` takes an account in `state`, if a rule says so.
    pub fn next(&self, trigger: Trigger, state: EntitlementState) -> Option<EntitlementState> {
        self.rules.iter().find(|rule| rule.on == trigger && rule.from.contains(&state)).map(|rule| rule.to)
    }

    /// The position of `state` in the order of restriction.
    pub fn rank(&self, state: EntitlementState) -> Option<usize> {
        self.states.iter().position(|s| *s == state)
    }

    /// Grace days of a contract with `grace_days` and `tier`; `None` for an unknown contract.
    pub fn grace_days(&self, contract: Option<(i32, SupportTier)>) -> u32 {
        match contract {
            None => self.default_grace_days,
            Some((days, tier)) if days <= 0 => self.tier_grace_days.get(&tier_symbol(tier)).copied().unwrap_or(0),
            Some((days, _)) => days as u32,
        }
    }
}

const TIERS: [SupportTier; 3] = [SupportTier::Standard, SupportTier::Premium, SupportTier::Enterprise];

/// The schema's symbol of `tier` (`ENTERPRISE`).
pub fn tier_symbol(tier: SupportTier) -> String {
    serde_json::to_value(tier).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
}

impl ServiceSection for Settings {
    fn validate(&self, errors: &mut Vec<String>) {
        const SECTION: &str = "entitlement_watcher";
        self.delivery.validate(SECTION, errors);
        let listed: BTreeSet<EntitlementState> = self.states.iter().copied().collect();
        if listed.len() != self.states.len() {
            errors.push(format!("{SECTION}.states: a state is listed twice"));
        }
        if listed.contains(&EntitlementState::Unknown) {
            errors.push(format!("{SECTION}.states: UNKNOWN is not a state an account can be in"));
        }
        if self.states.first() != Some(&EntitlementState::Active) {
            errors.push(format!("{SECTION}.states: ACTIVE comes first (the least restricted state)"));
        }
        let mut covered = BTreeSet::new();
        for rule in &self.rules {
            for state in rule.from.iter().chain([&rule.to]) {
                if !listed.contains(state) {
                    errors.push(format!("{SECTION}.rules: {:?} uses {state:?}, which is not in states", rule.on));
                }
            }
            for from in &rule.from {
                if !covered.insert((rule.on, *from)) {
                    errors.push(format!("{SECTION}.rules: two rules for {:?} in {from:?}", rule.on));
                }
                let (Some(from_rank), Some(to_rank)) = (self.rank(*from), self.rank(rule.to)) else { continue };
                if rule.on.restricts() && to_rank <= from_rank {
                    errors.push(format!(
                        "{SECTION}.rules: {:?} must lead to a more restricted state than {from:?}, not {:?}",
                        rule.on, rule.to
                    ));
                }
                if rule.on == Trigger::Paid && to_rank >= from_rank {
                    errors.push(format!(
                        "{SECTION}.rules: paid must lead to a less restricted state than {from:?}, not {:?}",
                        rule.to
                    ));
                }
            }
        }
        let entered_by_payment: BTreeSet<EntitlementState> =
            self.rules.iter().filter(|rule| rule.on.restricts()).map(|rule| rule.to).collect();
        for state in &entered_by_payment {
            if self.next(Trigger::Paid, *state).is_none() {
                errors.push(format!("{SECTION}.rules: an account put in {state:?} by a payment problem is never restored (no paid rule from {state:?})"));
            }
        }
        if entered_by_payment.contains(&EntitlementState::Grace)
            && self.next(Trigger::GraceExpired, EntitlementState::Grace).is_none()
        {
            errors.push(format!("{SECTION}.rules: accounts enter GRACE but no grace_expired rule leaves it"));
        }
        for tier in self.tier_grace_days.keys() {
            if !TIERS.iter().any(|known| tier_symbol(*known) == *tier) {
                errors.push(format!(
                    "{SECTION}.tier_grace_days: {tier:?} is not a support tier (STANDARD, PREMIUM, ENTERPRISE)"
                ));
            }
        }
        if self.closure_check_every < Duration::from_secs(1) {
            errors.push(format!("{SECTION}.closure_check_every must be at least 1s"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(settings: &Settings) -> Vec<String> {
        let mut errors = Vec::new();
        settings.validate(&mut errors);
        errors
    }

    #[test]
    fn the_default_ladder_is_valid() {
        assert_eq!(problems(&Settings::default()), Vec::<String>::new());
        let settings = Settings::default();
        assert_eq!(settings.next(Trigger::PaymentFailed, EntitlementState::Active), Some(EntitlementState::Grace));
        assert_eq!(settings.next(Trigger::PaymentFailed, EntitlementState::Grace), None);
        assert_eq!(settings.next(Trigger::Paid, EntitlementState::Closed), None);
    }

    #[test]
    fn grace_days_follow_the_contract_then_the_tier() {
        let mut settings = Settings::default();
        assert_eq!(settings.grace_days(Some((14, SupportTier::Standard))), 14);
        assert_eq!(settings.grace_days(Some((0, SupportTier::Enterprise))), 0, "0 means no grace by default");
        settings.tier_grace_days.insert("ENTERPRISE".into(), 30);
        assert_eq!(settings.grace_days(Some((0, SupportTier::Enterprise))), 30);
        assert_eq!(settings.grace_days(None), 14);
    }

    #[test]
    fn a_ladder_that_strands_accounts_is_refused() {
        let mut settings = Settings::default();
        settings.rules.retain(|rule| rule.on != Trigger::Paid);
        let errors = problems(&settings);
        assert!(errors.iter().any(|e| e.contains("never restored (no paid rule from Grace)")), "{errors:?}");

        let mut settings = Settings::default();
        settings.rules.retain(|rule| rule.on != Trigger::GraceExpired);
        assert!(problems(&settings).iter().any(|e| e.contains("no grace_expired rule")));

        let mut settings = Settings::default();
        settings.rules.push(Rule::new(Trigger::PaymentFailed, &[EntitlementState::Suspended], EntitlementState::Grace));
        assert!(problems(&settings).iter().any(|e| e.contains("more restricted state")));

        let settings =
            Settings { states: vec![EntitlementState::Grace, EntitlementState::Active], ..Settings::default() };
        assert!(!problems(&settings).is_empty());
    }

    #[test]
    fn a_ladder_without_grace_suspends_at_once() {
        use EntitlementState::{Active, Closed, Suspended};
        let settings = Settings {
            states: vec![Active, Suspended, Closed],
            rules: vec![
                Rule::new(Trigger::PaymentFailed, &[Active], Suspended),
                Rule::new(Trigger::Paid, &[Suspended], Active),
            ],
            ..Settings::default()
        };
        assert_eq!(problems(&settings), Vec::<String>::new());
    }
}
