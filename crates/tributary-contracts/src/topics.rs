//! Topic names, their value schemas and their keys: the one place these names are spelled.

use crate::types;

/// `usage.events`: raw usage events from platforms (CloudEvents / OpenMeter shape).
pub const USAGE_EVENTS: &str = "usage.events";
/// `usage.recorded`: running usage totals per account, subscription, meter and window.
pub const USAGE_RECORDED: &str = "usage.recorded";
/// `usage.thresholds`: crossings of a share of the contracted quantity.
pub const USAGE_THRESHOLDS: &str = "usage.thresholds";
/// `usage.late`: usage events that arrived after their window closed, for correction.
pub const USAGE_LATE: &str = "usage.late";
/// `refdata.customers` (compacted): customer master data.
pub const REFDATA_CUSTOMERS: &str = "refdata.customers";
/// `refdata.contracts` (compacted): contracts with terms, quotas and renewal dates.
pub const REFDATA_CONTRACTS: &str = "refdata.contracts";
/// `refdata.price-plans` (compacted): price plans per meter.
pub const REFDATA_PRICE_PLANS: &str = "refdata.price-plans";
/// `billing.invoices`: invoices from the subscription billing platform.
pub const BILLING_INVOICES: &str = "billing.invoices";
/// `billing.payments`: payment attempts and their outcomes.
pub const BILLING_PAYMENTS: &str = "billing.payments";
/// `billing.charges`: overage charges rated by billing-router.
pub const BILLING_CHARGES: &str = "billing.charges";
/// `erp.postings`: financial documents for the ERP.
pub const ERP_POSTINGS: &str = "erp.postings";
/// `erp.posting-results`: what the ERP made of each posting.
pub const ERP_POSTING_RESULTS: &str = "erp.posting-results";
/// `entitlement.changes`: account entitlement state transitions.
pub const ENTITLEMENT_CHANGES: &str = "entitlement.changes";
/// `support.cases`: support cases from the support platform.
pub const SUPPORT_CASES: &str = "support.cases";
/// `support.account-flags`: flags to set or clear on accounts in the support platform.
pub const SUPPORT_ACCOUNT_FLAGS: &str = "support.account-flags";
/// `crm.account-updates`: commercial context for the CRM.
pub const CRM_ACCOUNT_UPDATES: &str = "crm.account-updates";
/// `renewal.notifications`: renewal milestones with their risk signals.
pub const RENEWAL_NOTIFICATIONS: &str = "renewal.notifications";
/// `webhook.deliveries`: every attempt of the outbound relays to deliver a record to a webhook.
pub const WEBHOOK_DELIVERIES: &str = "webhook.deliveries";

/// `entitlement.overrides`: an operator's override of an account's entitlement state.
pub const ENTITLEMENT_OVERRIDES: &str = "entitlement.overrides";

/// Suffix of a service's dead-letter topic: `<service>.dlq`.
pub const DLQ_SUFFIX: &str = ".dlq";

/// The dead-letter topic of `service`.
pub fn dlq_topic(service: &str) -> String {
    format!("{service}{DLQ_SUFFIX}")
}

/// The value subject of `topic` under TopicNameStrategy.
pub fn value_subject(topic: &str) -> String {
    format!("{topic}-value")
}

/// What a topic's Kafka key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// The UTF-8 account id: everything about one account shares a partition number.
    AccountId,
    /// The UTF-8 id of the entity, on compacted reference-data topics.
    EntityId(&'static str),
}

/// A topic of the contracts: its name, value schema and key.
#[derive(Debug, Clone, Copy)]
pub struct TopicSpec {
    /// The topic name.
    pub name: &'static str,
    /// The value schema, as in `schemas/<name>.avsc`.
    pub schema: &'static str,
    /// What the key holds.
    pub key: KeyKind,
}

impl TopicSpec {
    /// Whether the topic is compacted (reference data).
    pub fn compacted(&self) -> bool {
        matches!(self.key, KeyKind::EntityId(_))
    }

    /// The value subject under TopicNameStrategy.
    pub fn subject(&self) -> String {
        value_subject(self.name)
    }
}

macro_rules! topic {
    ($name:expr, $file:literal, $key:expr) => {
        TopicSpec { name: $name, schema: include_str!(concat!("../../../schemas/", $file, ".avsc")), key: $key }
    };
}

/// Every topic of the contracts, in the order of DESIGN.md's diagram.
pub const ALL: &[TopicSpec] = &[
    topic!(USAGE_EVENTS, "usage.events", KeyKind::AccountId),
    topic!(USAGE_RECORDED, "usage.recorded", KeyKind::AccountId),
    topic!(USAGE_THRESHOLDS, "usage.thresholds", KeyKind::AccountId),
    topic!(USAGE_LATE, "usage.late", KeyKind::AccountId),
    topic!(REFDATA_CUSTOMERS, "refdata.customers", KeyKind::EntityId("customer_id")),
    topic!(REFDATA_CONTRACTS, "refdata.contracts", KeyKind::EntityId("contract_id")),
    topic!(REFDATA_PRICE_PLANS, "refdata.price-plans", KeyKind::EntityId("price_plan_id")),
    topic!(BILLING_INVOICES, "billing.invoices", KeyKind::AccountId),
    topic!(BILLING_PAYMENTS, "billing.payments", KeyKind::AccountId),
    topic!(BILLING_CHARGES, "billing.charges", KeyKind::AccountId),
    topic!(ERP_POSTINGS, "erp.postings", KeyKind::AccountId),
    topic!(ERP_POSTING_RESULTS, "erp.posting-results", KeyKind::AccountId),
    topic!(ENTITLEMENT_CHANGES, "entitlement.changes", KeyKind::AccountId),
    topic!(SUPPORT_CASES, "support.cases", KeyKind::AccountId),
    topic!(SUPPORT_ACCOUNT_FLAGS, "support.account-flags", KeyKind::AccountId),
    topic!(CRM_ACCOUNT_UPDATES, "crm.account-updates", KeyKind::AccountId),
    topic!(RENEWAL_NOTIFICATIONS, "renewal.notifications", KeyKind::AccountId),
    topic!(WEBHOOK_DELIVERIES, "webhook.deliveries", KeyKind::AccountId),
    topic!(ENTITLEMENT_OVERRIDES, "entitlement.overrides", KeyKind::AccountId),
];

/// The spec of `topic`, if it is one of the contracts.
pub fn spec(topic: &str) -> Option<&'static TopicSpec> {
    ALL.iter().find(|spec| spec.name == topic)
}

/// A value type of one contract topic.
pub trait Contract: serde::Serialize + serde::de::DeserializeOwned + Clone + std::fmt::Debug + Send + Sync {
    /// The topic this type is the value of.
    const TOPIC: &'static str;
    /// The record's envelope.
    fn envelope(&self) -> &types::Envelope;
    /// The spec of [`Self::TOPIC`].
    fn spec() -> &'static TopicSpec {
        spec(Self::TOPIC).expect("every Contract names a topic of ALL")
    }
}

/// Calls macro `$callback` with the list `Type => TOPIC_CONSTANT, ...` of every contract, so
/// that the one list here drives the [`Contract`] impls, the drift tests and the tools.
#[macro_export]
macro_rules! for_each_contract {
    ($callback:ident) => {
        $callback! {
            UsageEvent => USAGE_EVENTS,
            UsageRecorded => USAGE_RECORDED,
            UsageThresholdCrossed => USAGE_THRESHOLDS,
            UsageLate => USAGE_LATE,
            Customer => REFDATA_CUSTOMERS,
            Contract => REFDATA_CONTRACTS,
            PricePlan => REFDATA_PRICE_PLANS,
            Invoice => BILLING_INVOICES,
            Payment => BILLING_PAYMENTS,
            OverageCharge => BILLING_CHARGES,
            ErpPosting => ERP_POSTINGS,
            ErpPostingResult => ERP_POSTING_RESULTS,
            EntitlementChanged => ENTITLEMENT_CHANGES,
            SupportCase => SUPPORT_CASES,
            SupportAccountFlag => SUPPORT_ACCOUNT_FLAGS,
            CrmAccountUpdate => CRM_ACCOUNT_UPDATES,
            RenewalNotification => RENEWAL_NOTIFICATIONS,
            WebhookDeliveryAttempt => WEBHOOK_DELIVERIES,
            EntitlementOverride => ENTITLEMENT_OVERRIDES,
        }
    };
}

macro_rules! impl_contract {
    ($($ty:ident => $topic:ident),* $(,)?) => {
        $(impl Contract for types::$ty {
            const TOPIC: &'static str = $topic;
            fn envelope(&self) -> &types::Envelope {
                &self.envelope
            }
        })*
    };
}

for_each_contract!(impl_contract);
