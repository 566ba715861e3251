//! Master data: the customers, contracts and price plans billing-router holds whole (reference
//! tables over the compacted `refdata.*` topics), and the checks that decide whether a financial
//! document may be built from them. Nothing is posted on a guess: each failed check is a
//! [`Rejected`] with its own DLQ class and a reason an operator can act on; once the master
//! data is fixed, replaying the dead letter routes it once.

use std::sync::Arc;

use tributary_contracts::types::{Contract, ContractStatus, Customer, CustomerStatus, MeterPrice, PricePlan};
use tributary_runtime::ProcessError;
use tributary_runtime::table::ReferenceTable;

/// DLQ classes, one per reason.
pub mod class {
    /// The customer named by the contract (or found for the account) is not in refdata.customers.
    pub const UNKNOWN_CUSTOMER: &str = "unknown_customer";
    /// The customer has no ERP party reference yet.
    pub const CUSTOMER_WITHOUT_ERP_PARTY: &str = "customer_without_erp_party";
    /// The contract is not in refdata.contracts.
    pub const UNKNOWN_CONTRACT: &str = "unknown_contract";
    /// The contract's term or status does not cover the period.
    pub const CONTRACT_NOT_ACTIVE: &str = "contract_not_active";
    /// The contract's price plan is not in refdata.price-plans.
    pub const UNKNOWN_PRICE_PLAN: &str = "unknown_price_plan";
    /// The price plan is not effective at the start of the period.
    pub const PRICE_PLAN_NOT_EFFECTIVE: &str = "price_plan_not_effective";
    /// Contract, plan and invoice (or payment) are not in one currency.
    pub const CURRENCY_MISMATCH: &str = "currency_mismatch";
    /// The currency is not an ISO 4217 code.
    pub const UNKNOWN_CURRENCY: &str = "unknown_currency";
    /// The plan has no price for the meter.
    pub const UNPRICED_METER: &str = "unpriced_meter";
    /// The meter's price cannot rate (missing unit price, tiers out of order, wrong unit).
    pub const INVALID_PRICE_PLAN: &str = "invalid_price_plan";
    /// An invoice's lines, subtotal, tax and total do not add up.
    pub const AMOUNTS_MISMATCH: &str = "amounts_mismatch";

    /// Every class, for metrics and documentation.
    pub const ALL: [&str; 11] = [
        UNKNOWN_CUSTOMER,
        CUSTOMER_WITHOUT_ERP_PARTY,
        UNKNOWN_CONTRACT,
        CONTRACT_NOT_ACTIVE,
        UNKNOWN_PRICE_PLAN,
        PRICE_PLAN_NOT_EFFECTIVE,
        CURRENCY_MISMATCH,
        UNKNOWN_CURRENCY,
        UNPRICED_METER,
        INVALID_PRICE_PLAN,
        AMOUNTS_MISMATCH,
    ];
}

/// Why an input cannot be routed: its DLQ class and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// One of [`class`].
    pub class: &'static str,
    /// What is wrong, naming the records involved.
    pub reason: String,
}

impl Rejected {
    /// A rejection of `class`.
    pub fn new(class: &'static str, reason: impl Into<String>) -> Self {
        Self { class, reason: reason.into() }
    }
}

impl From<Rejected> for ProcessError {
    fn from(rejected: Rejected) -> Self {
        ProcessError::permanent(rejected.class, rejected.reason)
    }
}

/// Contracts by subscription (`sub:<id>`) and by account (`acct:<id>`).
pub fn contract_index(contract: &Contract) -> Vec<String> {
    vec![format!("sub:{}", contract.subscription_id), format!("acct:{}", contract.envelope.account_id)]
}

/// Customers by product account (`acct:<id>`).
pub fn customer_index(customer: &Customer) -> Vec<String> {
    vec![format!("acct:{}", customer.envelope.account_id)]
}

/// The three reference tables.
#[derive(Debug, Clone)]
pub struct MasterData {
    /// refdata.customers.
    pub customers: ReferenceTable<Customer>,
    /// refdata.contracts.
    pub contracts: ReferenceTable<Contract>,
    /// refdata.price-plans.
    pub plans: ReferenceTable<PricePlan>,
}

impl Default for MasterData {
    fn default() -> Self {
        Self {
            customers: ReferenceTable::new(customer_index),
            contracts: ReferenceTable::new(contract_index),
            plans: ReferenceTable::new(|_| Vec::new()),
        }
    }
}

fn day(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).map_or_else(|| ms.to_string(), |t| t.format("%Y-%m-%d").to_string())
}

impl MasterData {
    /// The contract `contract_id`, active in the period starting at `period_start`: its term
    /// covers that instant and it is ACTIVE (or EXPIRED since: it was active then).
    pub fn contract_for_period(&self, contract_id: &str, period_start: i64) -> Result<Arc<Contract>, Rejected> {
        let contract = self.contracts.get(contract_id).ok_or_else(|| {
            Rejected::new(class::UNKNOWN_CONTRACT, format!("contract {contract_id} is not in refdata.contracts"))
        })?;
        let in_term = contract.term_start <= period_start && period_start < contract.term_end;
        let status_ok = matches!(contract.status, ContractStatus::Active | ContractStatus::Expired);
        if !in_term || !status_ok {
            return Err(Rejected::new(
                class::CONTRACT_NOT_ACTIVE,
                format!(
                    "contract {contract_id} is {:?} with term {} to {}, which does not cover the period starting {}",
                    contract.status,
                    day(contract.term_start),
                    day(contract.term_end),
                    day(period_start)
                ),
            ));
        }
        Ok(contract)
    }

    /// The contract of `subscription_id`, or of the account, whose term covers `at`.
    pub fn contract_of(&self, subscription_id: Option<&str>, account_id: &str, at: i64) -> Option<Arc<Contract>> {
        let key = subscription_id.map_or_else(|| format!("acct:{account_id}"), |s| format!("sub:{s}"));
        self.contracts
            .find(&key)
            .into_iter()
            .filter(|c| c.term_start <= at && at < c.term_end)
            .max_by_key(|c| (c.status == ContractStatus::Active, c.version))
    }

    /// The customer `customer_id`, known and not closed.
    pub fn customer(&self, customer_id: &str) -> Result<Arc<Customer>, Rejected> {
        self.customers.get(customer_id).filter(|c| c.status != CustomerStatus::Closed).ok_or_else(|| {
            Rejected::new(
                class::UNKNOWN_CUSTOMER,
                format!("customer {customer_id} is not in refdata.customers (or is closed)"),
            )
        })
    }

    /// The customer of `contract`, or else of the account.
    pub fn customer_of(&self, contract: Option<&Contract>, account_id: &str) -> Result<Arc<Customer>, Rejected> {
        match contract {
            Some(contract) => self.customer(&contract.customer_id),
            None => {
                self.customers.find(&format!("acct:{account_id}")).into_iter().max_by_key(|c| c.version).ok_or_else(
                    || {
                        Rejected::new(
                            class::UNKNOWN_CUSTOMER,
                            format!("no customer in refdata.customers for account {account_id}"),
                        )
                    },
                )
            }
        }
    }

    /// The customer's ERP party reference, without which nothing is posted for it.
    pub fn erp_party(customer: &Customer) -> Result<String, Rejected> {
        customer.erp_party_ref.clone().filter(|r| !r.trim().is_empty()).ok_or_else(|| {
            Rejected::new(
                class::CUSTOMER_WITHOUT_ERP_PARTY,
                format!("customer {} has no erp_party_ref yet: it is not in the ERP", customer.customer_id),
            )
        })
    }

    /// The price plan of `contract` and its price for `meter`, effective at `period_start`,
    /// in the contract's currency.
    pub fn price(
        &self,
        contract: &Contract,
        meter: &str,
        unit: &str,
        period_start: i64,
    ) -> Result<(Arc<PricePlan>, MeterPrice), Rejected> {
        let plan_id = &contract.price_plan_id;
        let plan = self.plans.get(plan_id).ok_or_else(|| {
            Rejected::new(
                class::UNKNOWN_PRICE_PLAN,
                format!("price plan {plan_id} of contract {} is not in refdata.price-plans", contract.contract_id),
            )
        })?;
        let effective = plan.effective_from <= period_start && plan.effective_to.is_none_or(|to| period_start < to);
        if !effective {
            return Err(Rejected::new(
                class::PRICE_PLAN_NOT_EFFECTIVE,
                format!(
                    "price plan {plan_id} version {} is effective from {} to {}, not at the period start {}",
                    plan.version,
                    day(plan.effective_from),
                    plan.effective_to.map_or_else(|| "open end".to_owned(), day),
                    day(period_start)
                ),
            ));
        }
        if plan.currency != contract.currency {
            return Err(Rejected::new(
                class::CURRENCY_MISMATCH,
                format!(
                    "contract {} is in {} but its price plan {plan_id} in {}",
                    contract.contract_id, contract.currency, plan.currency
                ),
            ));
        }
        let price = plan.meter_prices.iter().find(|p| p.meter == meter).cloned().ok_or_else(|| {
            Rejected::new(class::UNPRICED_METER, format!("price plan {plan_id} has no price for meter {meter}"))
        })?;
        if price.unit != unit {
            return Err(Rejected::new(
                class::INVALID_PRICE_PLAN,
                format!("price plan {plan_id} prices {meter} per {:?}, but its usage is in {unit:?}", price.unit),
            ));
        }
        Ok((plan, price))
    }
}
