//! Per-endpoint filters: which records an endpoint wants (only HIGH risk, only SUSPENDED
//! flags), on the record as it is delivered.

use std::collections::BTreeMap;

use serde_json::Value as Json;

/// Every listed field must hold one of its allowed values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Dotted path (`risk_level`, `envelope.source`) to the allowed values.
    only: Vec<(Vec<String>, Vec<String>)>,
}

impl Filter {
    /// A filter from the endpoint's `only` setting; empty lets everything through.
    pub fn new(only: &BTreeMap<String, Vec<String>>) -> Self {
        Self {
            only: only
                .iter()
                .map(|(path, allowed)| (path.split('.').map(str::to_owned).collect(), allowed.clone()))
                .collect(),
        }
    }

    /// Whether `record` (as JSON, `tributary tap`'s shape) is delivered.
    pub fn passes(&self, record: &Json) -> bool {
        self.only.iter().all(|(path, allowed)| {
            let value = path.iter().try_fold(record, |value, field| value.get(field));
            match value {
                Some(Json::String(text)) => allowed.iter().any(|a| a == text),
                Some(Json::Array(items)) => {
                    items.iter().any(|item| allowed.iter().any(|a| scalar(item).as_ref() == Some(a)))
                }
                Some(other) => scalar(other).is_some_and(|text| allowed.contains(&text)),
                None => false,
            }
        })
    }
}

/// A scalar as the text a filter compares: strings as they are, numbers and booleans printed.
fn scalar(value: &Json) -> Option<String> {
    match value {
        Json::String(text) => Some(text.clone()),
        Json::Number(n) => Some(n.to_string()),
        Json::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn filter(pairs: &[(&str, &[&str])]) -> Filter {
        Filter::new(&pairs.iter().map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect())).collect())
    }

    #[test]
    fn every_listed_field_must_hold_an_allowed_value() {
        let notice = json!({"risk_level": "HIGH", "days_until_renewal": 30, "envelope": {"source": "tributary.renewal-notifier"}, "risk_signals": [{"kind": "USAGE_DROP"}], "audience": ["CUSTOMER_SUCCESS", "REVENUE_OPERATIONS"], "note": null});
        assert!(Filter::default().passes(&notice), "no filter: everything");
        assert!(filter(&[("risk_level", &["HIGH", "CRITICAL"])]).passes(&notice));
        assert!(!filter(&[("risk_level", &["LOW"])]).passes(&notice));
        assert!(filter(&[("risk_level", &["HIGH"]), ("days_until_renewal", &["30"])]).passes(&notice));
        assert!(
            !filter(&[("risk_level", &["HIGH"]), ("days_until_renewal", &["7"])]).passes(&notice),
            "all must match"
        );
        assert!(filter(&[("envelope.source", &["tributary.renewal-notifier"])]).passes(&notice), "dotted paths");
        assert!(filter(&[("audience", &["REVENUE_OPERATIONS"])]).passes(&notice), "a list matches by any item");
        assert!(!filter(&[("note", &["null"])]).passes(&notice), "null matches nothing");
        assert!(!filter(&[("missing", &["x"])]).passes(&notice), "absent matches nothing");
    }
}
