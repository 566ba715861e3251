//! The `[billing_router]` configuration section: how charges reach the ERP, and the ERP codes
//! of the lines billing-router writes.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tributary_outbound::DeliverySettings;
use tributary_runtime::ServiceSection;

/// When overage charges are posted to the ERP.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PostingMode {
    /// Every charge is posted as an invoice of its own as it happens.
    #[default]
    PerCharge,
    /// A period's charges are accrued and posted as one invoice (a line per charge) once the
    /// period has closed; a charge that arrives after that is posted on its own.
    PerPeriod,
}

/// The kinds of lines of a subscription platform's invoice, as `invoice_line_products` names
/// them.
pub const INVOICE_LINE_KINDS: [&str; 5] = ["SUBSCRIPTION", "USAGE", "OVERAGE", "ONE_TIME", "ADJUSTMENT"];

/// The billing-router settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// `per_charge` (default) or `per_period`.
    pub posting: PostingMode,
    /// `per_period`: how long after a period's end its accrued invoice is posted. Longer than
    /// usage-ingest's `period_grace` (6 h), so that the period's final total, and the charge it
    /// may bring, has arrived.
    #[serde(with = "humantime_serde")]
    pub period_close_delay: Duration,
    /// ERP product code of overage lines, per meter.
    pub overage_products: BTreeMap<String, String>,
    /// ERP product code of overage lines of meters not in `overage_products` (none: the ERP
    /// adapter's default product).
    pub default_overage_product: Option<String>,
    /// Revenue account code of overage lines, per meter (none: the product's account).
    pub overage_accounts: BTreeMap<String, String>,
    /// Tax code of overage lines (none: the product's and the party's tax rules).
    pub overage_tax_code: Option<String>,
    /// ERP product code of the lines of mirrored invoices, per line kind (SUBSCRIPTION, USAGE,
    /// OVERAGE, ONE_TIME, ADJUSTMENT).
    pub invoice_line_products: BTreeMap<String, String>,
    /// Webhook endpoints for its output topics (`crm.account-updates` to a CRM that does not
    /// read Kafka): `[[billing_router.delivery.endpoints]]`, see `tributary_outbound::settings`.
    pub delivery: DeliverySettings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            posting: PostingMode::PerCharge,
            // usage-ingest closes a period 6 h after its end; twice that leaves room for a slow
            // close without holding finance's invoice for a day.
            period_close_delay: Duration::from_secs(12 * 3600),
            overage_products: BTreeMap::new(),
            default_overage_product: None,
            overage_accounts: BTreeMap::new(),
            overage_tax_code: None,
            invoice_line_products: BTreeMap::new(),
            delivery: DeliverySettings::default(),
        }
    }
}

impl Settings {
    /// The ERP product of `meter`'s overage lines.
    pub fn overage_product(&self, meter: &str) -> Option<String> {
        self.overage_products.get(meter).cloned().or_else(|| self.default_overage_product.clone())
    }
}

impl ServiceSection for Settings {
    fn validate(&self, errors: &mut Vec<String>) {
        self.delivery.validate("billing_router", errors);
        if self.period_close_delay.is_zero() {
            errors.push("billing_router.period_close_delay must be positive".into());
        }
        for kind in self.invoice_line_products.keys() {
            if !INVOICE_LINE_KINDS.contains(&kind.as_str()) {
                errors.push(format!(
                    "billing_router.invoice_line_products: {kind:?} is not a line kind ({})",
                    INVOICE_LINE_KINDS.join(", ")
                ));
            }
        }
        let blank = |code: &String| code.trim().is_empty();
        if self.overage_products.values().chain(self.overage_accounts.values()).any(blank) {
            errors.push("billing_router: product and account codes must not be empty".into());
        }
    }
}
