//! The `[erp_poster]` configuration section: the ERP, and how gently it is posted to.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tributary_runtime::ServiceSection;

use crate::maintenance::Windows;

/// The erp-poster settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// The Tryton server (the first adapter).
    pub tryton: TrytonSettings,
    /// Postings per second at most, over all partitions: a backlog drains at this rate.
    pub rate_per_second: u32,
    /// Postings let through at once after a quiet spell, above the rate.
    pub burst: u32,
    /// Postings in flight toward the ERP at once, at most (one per partition at most, so that
    /// each account's documents keep their order).
    pub max_in_flight: usize,
    /// Transient failures in a row that open the circuit.
    pub failures_to_open: u32,
    /// How long the circuit stays open before one probe is let through.
    #[serde(with = "humantime_serde")]
    pub open_for: Duration,
    /// Weekly windows, UTC, on the runtime's clock, when nothing is posted: `Sun 01:00-03:00`.
    pub maintenance_windows: Vec<String>,
    /// How often a partition paused by a maintenance window looks at the clock again (the
    /// window's end is on the runtime's clock, which an operator may move).
    #[serde(with = "humantime_serde")]
    pub maintenance_recheck: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            tryton: TrytonSettings::default(),
            // Tryton posts about 1.4 invoices a second (post renders the invoice in-request,
            // ../shared/notes/tryton.md): 5 a second with a burst of 5 keeps a backlog from
            // queueing requests in its workers.
            rate_per_second: 5,
            burst: 5,
            max_in_flight: 4,
            failures_to_open: 3,
            open_for: Duration::from_secs(10),
            maintenance_windows: Vec::new(),
            maintenance_recheck: Duration::from_secs(5),
        }
    }
}

/// Where Tryton is and how to post to it.
#[derive(Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrytonSettings {
    /// Base URL, e.g. `http://127.0.0.1:18000/`.
    pub url: String,
    /// Database.
    pub database: String,
    /// User.
    pub user: String,
    /// Password; never logged. Or `password_file`.
    pub password: Option<String>,
    /// A file holding the password (a mounted secret); read at start.
    pub password_file: Option<PathBuf>,
    /// Product of lines that name none.
    pub default_product: String,
    /// The `account.invoice.payment.method` that records payments.
    pub payment_method: String,
    /// How long one RPC may take before the client gives up.
    #[serde(with = "humantime_serde")]
    pub rpc_timeout: Duration,
}

impl Default for TrytonSettings {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:18000/".into(),
            database: "tributary".into(),
            user: "admin".into(),
            password: None,
            password_file: None,
            default_product: "USAGE-OVERAGE".into(),
            payment_method: "Tributary".into(),
            // Tryton renders an invoice while posting it (0.6 to 1.1 s, more under load); 30 s
            // is far above that, and below the 60 s its worker may take on a read.
            rpc_timeout: Duration::from_secs(30),
        }
    }
}

impl std::fmt::Debug for TrytonSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrytonSettings")
            .field("url", &self.url)
            .field("database", &self.database)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("password_file", &self.password_file)
            .field("default_product", &self.default_product)
            .field("payment_method", &self.payment_method)
            .field("rpc_timeout", &self.rpc_timeout)
            .finish()
    }
}

impl TrytonSettings {
    /// The password, from the settings or the file.
    pub fn load_password(&self) -> Result<String, String> {
        match (&self.password, &self.password_file) {
            (Some(password), _) => Ok(password.clone()),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map(|text| text.trim().to_owned())
                .map_err(|e| format!("erp_poster.tryton.password_file {}: {e}", path.display())),
            (None, None) => Err("erp_poster.tryton: set password or password_file".into()),
        }
    }
}

impl ServiceSection for Settings {
    fn validate(&self, errors: &mut Vec<String>) {
        if let Err(window_errors) = Windows::parse(&self.maintenance_windows) {
            errors.extend(window_errors.into_iter().map(|e| format!("erp_poster.{e}")));
        }
        if self.rate_per_second == 0 || self.burst == 0 {
            errors.push("erp_poster.rate_per_second and burst must be at least 1".into());
        }
        if self.max_in_flight == 0 || self.failures_to_open == 0 {
            errors.push("erp_poster.max_in_flight and failures_to_open must be at least 1".into());
        }
        if self.open_for.is_zero() || self.maintenance_recheck.is_zero() {
            errors.push("erp_poster.open_for and maintenance_recheck must be positive".into());
        }
        if !(self.tryton.url.starts_with("http://") || self.tryton.url.starts_with("https://")) {
            errors.push(format!("erp_poster.tryton.url must be an http(s) URL, got {:?}", self.tryton.url));
        }
        if let Err(error) = self.tryton.load_password() {
            errors.push(error);
        }
    }
}
