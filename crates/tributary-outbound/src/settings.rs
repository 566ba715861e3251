//! The `delivery` part of a service's configuration section: its webhook endpoints.
//!
//! ```toml
//! [[billing_router.delivery.endpoints]]
//! name = "crm"                                  # in metrics, logs, the deliveries topic
//! topic = "crm.account-updates"                 # one of the service's output topics
//! url = "https://crm.example.com/hooks/tributary"
//! secrets_file = "/var/run/secrets/crm-webhook/secrets"   # or secrets_env, or secrets
//! only = { update_type = ["OVERAGE_CHARGED"] }  # optional filter on the record's fields
//! ```
//!
//! Secrets are Standard Webhooks secrets, `whsec_<base64 of 24 to 64 random bytes>`, several
//! separated by whitespace during a key rotation (every one signs, so that a receiver holding
//! either the old or the new one accepts). They come from a file (a mounted Kubernetes
//! Secret), an environment variable, or, for local runs only, the config itself; they never
//! appear in logs or in the `Debug` of these settings.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The webhook endpoints of one service.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeliverySettings {
    /// The endpoints; none means no relay runs.
    pub endpoints: Vec<EndpointSettings>,
}

/// One endpoint: where the records of one topic go, and how hard to try.
#[derive(Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct EndpointSettings {
    /// A short name, unique in the service: `[a-z0-9-]`, e.g. `crm`. It names the relay's
    /// consumer group and DLQ (`<service>.relay.<name>`), its metrics and its delivery records.
    pub name: String,
    /// The topic whose committed records are delivered (one of the service's outputs).
    pub topic: String,
    /// Where to POST them: `https://...` (`http://` only for a receiver on this machine).
    pub url: String,
    /// Secrets inline (local runs only; use `secrets_file` or `secrets_env` elsewhere).
    pub secrets: Vec<String>,
    /// A file holding the secrets, separated by whitespace (a mounted Secret); read at start.
    pub secrets_file: Option<PathBuf>,
    /// An environment variable holding the secrets, separated by whitespace.
    pub secrets_env: Option<String>,
    /// Deliver only records whose fields have one of the listed values: a dotted path into the
    /// record as delivered (`risk_level`, `flag`, `envelope.source`) to its allowed values. A
    /// record passes when every listed field matches; an absent or null field matches nothing.
    pub only: BTreeMap<String, Vec<String>>,
    /// How long one request may take before it counts as a timeout (a transient failure).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// The waits before each retry of a transient failure, in order; after the last one the
    /// delivery is dead-lettered. Each wait is jittered by up to a fifth either way, and is at
    /// least what the endpoint asked for in `Retry-After`.
    #[serde(with = "durations")]
    pub retry_schedule: Vec<Duration>,
    /// Transient failures in a row that open the endpoint's circuit.
    pub failures_to_open: u32,
    /// How long the circuit stays open before one probe is let through.
    #[serde(with = "humantime_serde")]
    pub open_for: Duration,
}

impl Default for EndpointSettings {
    fn default() -> Self {
        Self {
            name: String::new(),
            topic: String::new(),
            url: String::new(),
            secrets: Vec::new(),
            secrets_file: None,
            secrets_env: None,
            only: BTreeMap::new(),
            timeout: Duration::from_secs(10),
            // The schedule Standard Webhooks' authors (Svix) use: 5 s, 5 min, 30 min, 2 h, 5 h,
            // 10 h, 10 h; the last attempt comes about 27.6 hours after the first.
            retry_schedule: [5, 300, 1_800, 7_200, 18_000, 36_000, 36_000].map(Duration::from_secs).to_vec(),
            failures_to_open: 5,
            open_for: Duration::from_secs(30),
        }
    }
}

impl std::fmt::Debug for EndpointSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointSettings")
            .field("name", &self.name)
            .field("topic", &self.topic)
            .field("url", &redacted_url(&self.url))
            .field("secrets", &format_args!("<{} redacted>", self.secrets.len()))
            .field("secrets_file", &self.secrets_file)
            .field("secrets_env", &self.secrets_env)
            .field("only", &self.only)
            .field("timeout", &self.timeout)
            .field("retry_schedule", &self.retry_schedule)
            .field("failures_to_open", &self.failures_to_open)
            .field("open_for", &self.open_for)
            .finish()
    }
}

/// A list of durations in humantime's words (`["5s", "5m", "2h"]`).
mod durations {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(waits: &[Duration], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(waits.iter().map(|wait| humantime::format_duration(*wait).to_string()))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<Duration>, D::Error> {
        Vec::<String>::deserialize(deserializer)?
            .iter()
            .map(|text| humantime::parse_duration(text).map_err(|e| serde::de::Error::custom(format!("{text:?}: {e}"))))
            .collect()
    }
}

/// `url` without its query string and user info, which may carry credentials.
pub(crate) fn redacted_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) => {
            let _ = parsed.set_username("");
            let _ = parsed.set_password(None);
            if parsed.query().is_some() {
                parsed.set_query(Some("<redacted>"));
            }
            parsed.to_string()
        }
        Err(_) => "<not a URL>".into(),
    }
}

/// A Standard Webhooks signing secret; its `Debug` shows nothing of it.
#[derive(Clone)]
pub struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Secret {
    /// The secret as configured (`whsec_...`).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// Shortest and longest key the specification allows, in bytes.
const SECRET_BYTES: std::ops::RangeInclusive<usize> = 24..=64;

impl EndpointSettings {
    /// The secrets, from wherever they are configured; errors never quote a secret.
    pub fn load_secrets(&self) -> Result<Vec<Secret>, String> {
        let name = &self.name;
        let text = match (&self.secrets[..], &self.secrets_file, &self.secrets_env) {
            ([_, ..], None, None) => self.secrets.join(" "),
            ([], Some(path), None) => std::fs::read_to_string(path)
                .map_err(|e| format!("endpoint {name}: secrets_file {}: {e}", path.display()))?,
            ([], None, Some(variable)) => {
                std::env::var(variable).map_err(|_| format!("endpoint {name}: secrets_env {variable} is not set"))?
            }
            ([], None, None) => return Err(format!("endpoint {name}: set secrets_file, secrets_env or secrets")),
            _ => return Err(format!("endpoint {name}: set only one of secrets_file, secrets_env and secrets")),
        };
        let secrets: Vec<Secret> = text.split_whitespace().map(|s| Secret(s.to_owned())).collect();
        if secrets.is_empty() {
            return Err(format!("endpoint {name}: no secret configured"));
        }
        for (index, secret) in secrets.iter().enumerate() {
            let Some(encoded) = secret.0.strip_prefix("whsec_") else {
                return Err(format!("endpoint {name}: secret {} does not start with whsec_", index + 1));
            };
            use base64::Engine as _;
            let key = base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .map_err(|_| format!("endpoint {name}: secret {} is not base64 after whsec_", index + 1))?;
            if !SECRET_BYTES.contains(&key.len()) {
                return Err(format!(
                    "endpoint {name}: secret {} holds {} bytes; the specification asks for 24 to 64",
                    index + 1,
                    key.len()
                ));
            }
        }
        Ok(secrets)
    }

    /// Adds a message to `errors` for each invalid value, prefixed with `section`.
    pub(crate) fn validate(&self, section: &str, errors: &mut Vec<String>) {
        let at = format!("{section}.delivery endpoint {:?}", self.name);
        let valid_name = !self.name.is_empty()
            && self.name.len() <= 40
            && self.name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !valid_name {
            errors.push(format!("{at}: name must be 1 to 40 of [a-z0-9-]"));
        }
        if tributary_contracts::topics::spec(&self.topic).is_none() {
            errors.push(format!("{at}: topic {:?} is not a Tributary topic", self.topic));
        }
        match reqwest::Url::parse(&self.url) {
            Ok(url) if url.scheme() == "https" => {}
            Ok(url) if url.scheme() == "http" && is_local(&url) => {}
            Ok(_) => errors.push(format!(
                "{at}: url must be https:// (http:// only to this machine), got {}",
                redacted_url(&self.url)
            )),
            Err(e) => errors.push(format!("{at}: url is not a URL: {e}")),
        }
        if let Err(error) = self.load_secrets() {
            errors.push(format!("{section}.delivery {error}"));
        }
        if self.timeout.is_zero() || self.timeout > MAX_TIMEOUT {
            errors.push(format!("{at}: timeout must be above 0 and at most {MAX_TIMEOUT:?}"));
        }
        if self.retry_schedule.iter().any(Duration::is_zero) {
            errors.push(format!("{at}: retry_schedule waits must be positive"));
        }
        if self.failures_to_open == 0 || self.open_for.is_zero() {
            errors.push(format!("{at}: failures_to_open and open_for must be positive"));
        }
        if self.only.values().any(Vec::is_empty) {
            errors.push(format!("{at}: every field of `only` needs at least one allowed value"));
        }
    }
}

/// Longest timeout of one request: an attempt holds its partition while it runs, and the
/// runtime's transactional calls give up after 30 s.
const MAX_TIMEOUT: Duration = Duration::from_secs(25);

fn is_local(url: &reqwest::Url) -> bool {
    matches!(url.host_str(), Some("localhost" | "127.0.0.1" | "[::1]"))
}

impl DeliverySettings {
    /// Adds a message to `errors` for each invalid endpoint; `section` is the service's
    /// configuration section, e.g. `billing_router`.
    pub fn validate(&self, section: &str, errors: &mut Vec<String>) {
        for endpoint in &self.endpoints {
            endpoint.validate(section, errors);
        }
        let mut names: Vec<&str> = self.endpoints.iter().map(|e| e.name.as_str()).collect();
        names.sort_unstable();
        if let Some(pair) = names.windows(2).find(|pair| pair[0] == pair[1]) {
            errors.push(format!("{section}.delivery: endpoint name {:?} is used twice", pair[0]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint() -> EndpointSettings {
        EndpointSettings {
            name: "crm".into(),
            topic: "crm.account-updates".into(),
            url: "https://crm.example.com/hooks?token=abc".into(),
            secrets: vec!["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into()],
            ..EndpointSettings::default()
        }
    }

    #[test]
    fn a_valid_endpoint_passes_and_its_debug_shows_no_secret_and_no_query() {
        let mut errors = Vec::new();
        endpoint().validate("billing_router", &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        let debug = format!("{:?}", endpoint());
        assert!(!debug.contains("MfKQ9r8") && !debug.contains("token=abc"), "{debug}");
        assert!(debug.contains("crm.example.com"), "{debug}");
    }

    #[test]
    fn every_mistake_is_reported_at_once_without_quoting_a_secret() {
        let bad = EndpointSettings {
            name: "CRM!".into(),
            topic: "crm.updates".into(),
            url: "http://crm.example.com/".into(),
            secrets: vec!["whsec_c2hvcnQ=".into()],
            retry_schedule: vec![Duration::ZERO],
            only: BTreeMap::from([("risk_level".into(), vec![])]),
            ..EndpointSettings::default()
        };
        let mut errors = Vec::new();
        DeliverySettings { endpoints: vec![bad.clone(), bad] }.validate("billing_router", &mut errors);
        let text = errors.join("\n");
        for expected in [
            "name must be",
            "not a Tributary topic",
            "must be https://",
            "holds 5 bytes",
            "positive",
            "allowed value",
            "used twice",
        ] {
            assert!(text.contains(expected), "{expected}: {text}");
        }
        assert!(!text.contains("c2hvcnQ"), "{text}");
    }

    #[test]
    fn secrets_come_from_one_source_and_a_rotation_holds_several() {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            file.path(),
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\nwhsec_bmV3LXNlY3JldC1vZi0yNC1ieXRlcy1hdC1sZWFzdA==\n",
        )
        .unwrap();
        let from_file = EndpointSettings { secrets: vec![], secrets_file: Some(file.path().into()), ..endpoint() };
        assert_eq!(from_file.load_secrets().unwrap().len(), 2);
        let both = EndpointSettings { secrets_file: Some(file.path().into()), ..endpoint() };
        assert!(both.load_secrets().unwrap_err().contains("only one"));
        let none = EndpointSettings { secrets: vec![], ..endpoint() };
        assert!(none.load_secrets().unwrap_err().contains("set secrets_file"));
        let unprefixed = EndpointSettings { secrets: vec!["MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into()], ..endpoint() };
        assert!(unprefixed.load_secrets().unwrap_err().contains("whsec_"));
    }

    #[test]
    fn the_default_schedule_gives_up_after_about_a_day() {
        let total: Duration = EndpointSettings::default().retry_schedule.iter().sum();
        assert!(total > Duration::from_secs(24 * 3600) && total < Duration::from_secs(30 * 3600), "{total:?}");
    }
}
