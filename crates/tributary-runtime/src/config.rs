//! Typed service configuration: defaults, then an optional TOML file, then the environment.
//!
//! Every service has the same common sections (`kafka`, `registry`, `admin`, `log`, `runtime`)
//! and one section of its own, named after the service with underscores (`usage_ingest`).
//! Environment variables are `TRIBUTARY__<SECTION>__<KEY>`, nested with `__`:
//! `TRIBUTARY__KAFKA__BOOTSTRAP_SERVERS=broker:9092`. librdkafka properties pass through under
//! `kafka.properties`; from the environment, underscores in their names become dots
//! (`TRIBUTARY__KAFKA__PROPERTIES__SASL_MECHANISM=PLAIN` sets `sasl.mechanism`).
//!
//! Loading reports every problem at once, each section and each check, so that an operator
//! fixes a deployment in one round instead of one error per restart.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Value};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tributary_telemetry::LoggingConfig;

/// Prefix of every configuration environment variable.
pub const ENV_PREFIX: &str = "TRIBUTARY__";
/// Separator of nesting levels in environment variable names.
pub const ENV_SEPARATOR: &str = "__";
/// Environment variable naming the optional configuration file.
pub const CONFIG_FILE_ENV: &str = "TRIBUTARY_CONFIG";

/// Default Kafka bootstrap: the broker that `make up` starts (deploy/local/env.sh).
pub const DEFAULT_BOOTSTRAP_SERVERS: &str = "127.0.0.1:19092";
/// Default registry: the Apicurio Registry that `make up` starts, through its Confluent API.
pub const DEFAULT_REGISTRY_URL: &str = "http://127.0.0.1:18081/apis/ccompat/v7";
/// librdkafka property names whose values are secrets and never logged.
const SECRET_PROPERTY_MARKERS: [&str; 4] = ["password", "secret", "sasl.oauthbearer.config", "key.pem"];

/// Kafka connection settings.
#[derive(Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// Comma-separated `host:port` list of brokers.
    pub bootstrap_servers: String,
    /// Consumer group id; defaults to the service name.
    pub group_id: Option<String>,
    /// Prefix of transactional ids; defaults to the service name. Must be stable across
    /// restarts so that a restarted instance fences its predecessor's open transaction.
    pub transactional_id_prefix: Option<String>,
    /// Partition count used when the service creates a topic it owns (changelogs, DLQ). Event
    /// topics of a deployment share one partition count (DESIGN.md, "Contracts").
    pub partitions: i32,
    /// Replication factor of topics the service creates. 1 suits the local single broker; a
    /// production cluster wants 3.
    pub replication_factor: i32,
    /// Prefix of every topic name the service reads or writes (`staging.` gives
    /// `staging.usage.events`), for several environments on one cluster; empty by default.
    pub topic_prefix: String,
    /// Extra librdkafka properties (security.protocol, sasl.*, ssl.*), passed through as is.
    pub properties: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            bootstrap_servers: DEFAULT_BOOTSTRAP_SERVERS.into(),
            group_id: None,
            transactional_id_prefix: None,
            partitions: 3,
            replication_factor: 1,
            topic_prefix: String::new(),
            properties: BTreeMap::new(),
        }
    }
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let properties: BTreeMap<&str, &str> = self
            .properties
            .iter()
            .map(|(k, v)| (k.as_str(), if is_secret_property(k) { "<redacted>" } else { v.as_str() }))
            .collect();
        f.debug_struct("KafkaConfig")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("group_id", &self.group_id)
            .field("transactional_id_prefix", &self.transactional_id_prefix)
            .field("partitions", &self.partitions)
            .field("replication_factor", &self.replication_factor)
            .field("topic_prefix", &self.topic_prefix)
            .field("properties", &properties)
            .finish()
    }
}

impl KafkaConfig {
    /// The physical name of `topic` on the cluster: the configured prefix and the name.
    pub fn topic(&self, topic: &str) -> String {
        format!("{}{topic}", self.topic_prefix)
    }
}

/// Whether a librdkafka property holds a secret.
pub fn is_secret_property(name: &str) -> bool {
    SECRET_PROPERTY_MARKERS.iter().any(|marker| name.contains(marker))
}

/// Schema registry settings (any Confluent-compatible registry).
#[derive(Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// Base URL of the Confluent-compatible API.
    pub url: String,
    /// Basic-auth user, if the registry needs one.
    pub username: Option<String>,
    /// Basic-auth password; never logged.
    pub password: Option<String>,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self { url: DEFAULT_REGISTRY_URL.into(), username: None, password: None }
    }
}

impl fmt::Debug for RegistryConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryConfig")
            .field("url", &self.url)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// The admin HTTP port.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of `/metrics` and `/health/*`. Empty means the service's own default port on
    /// 127.0.0.1 (Kubernetes manifests set `0.0.0.0:<port>`).
    pub listen: Option<SocketAddr>,
}

/// Retry policy for transient failures: exponential backoff with full jitter, bounded.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// First backoff.
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// Ceiling of one backoff.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Attempts in all, the first included, before a transient failure counts as permanent.
    pub max_attempts: u32,
}

impl Default for RetryConfig {
    fn default() -> Self {
        // 100 ms doubling to 5 s over 8 attempts waits about 13 s in all: long enough to ride out
        // a broker leader election, short enough not to stall a partition for minutes.
        Self { initial_backoff: Duration::from_millis(100), max_backoff: Duration::from_secs(5), max_attempts: 8 }
    }
}

/// Stream-runtime settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// How often the open transaction is committed. Longer batches more records per commit
    /// (throughput); shorter makes outputs visible sooner (latency).
    #[serde(with = "humantime_serde")]
    pub commit_interval: Duration,
    /// Most records in one transaction, whatever the interval.
    pub max_batch_records: usize,
    /// How long idempotency keys are remembered.
    #[serde(with = "humantime_serde")]
    pub idempotency_window: Duration,
    /// How long SIGTERM may take before the process gives up; keep it below the Kubernetes
    /// `terminationGracePeriodSeconds`.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// How often timers are checked.
    #[serde(with = "humantime_serde")]
    pub tick_interval: Duration,
    /// Transient-failure retries.
    pub retry: RetryConfig,
    /// `system` (production) or `controlled`: the system clock plus an offset that
    /// `tributary clock advance|set` moves for every controlled service of the deployment
    /// (tests and the demo).
    pub clock: crate::clock::ClockMode,
    /// A stable name of this instance, part of its transactional id: a restarted instance
    /// with the same name fences its predecessor. Defaults to `HOSTNAME` (the pod name).
    pub instance_id: String,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            // 100 ms keeps end-to-end latency low while batching enough for throughput
            // (see BENCHMARKS.md).
            commit_interval: Duration::from_millis(100),
            max_batch_records: 10_000,
            // Seven days covers a platform that replays a week of events after an outage.
            idempotency_window: Duration::from_secs(7 * 24 * 3600),
            // Kubernetes' default grace period is 30 s; 20 s leaves room for the kill.
            shutdown_grace: Duration::from_secs(20),
            tick_interval: Duration::from_secs(1),
            retry: RetryConfig::default(),
            clock: crate::clock::ClockMode::System,
            instance_id: std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into()),
        }
    }
}

/// What a service section must provide: defaults and its own checks.
pub trait ServiceSection: DeserializeOwned + Default + fmt::Debug + Send + Sync + 'static {
    /// Adds a message to `errors` for each invalid value; the default checks nothing.
    fn validate(&self, errors: &mut Vec<String>) {
        let _ = errors;
    }
}

/// A service section for services with no settings of their own yet.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoSettings {}

impl ServiceSection for NoSettings {}

/// The whole configuration of one service.
#[derive(Debug, Clone)]
pub struct ServiceConfig<S> {
    /// Kafka connection.
    pub kafka: KafkaConfig,
    /// Schema registry.
    pub registry: RegistryConfig,
    /// Admin HTTP port.
    pub admin: AdminConfig,
    /// Log lines.
    pub log: LoggingConfig,
    /// Stream runtime.
    pub runtime: RuntimeConfig,
    /// The service's own section.
    pub service: S,
}

impl<S: Default> Default for ServiceConfig<S> {
    fn default() -> Self {
        Self {
            kafka: KafkaConfig::default(),
            registry: RegistryConfig::default(),
            admin: AdminConfig::default(),
            log: LoggingConfig::default(),
            runtime: RuntimeConfig::default(),
            service: S::default(),
        }
    }
}

/// Every problem found while loading a configuration.
#[derive(Debug, thiserror::Error)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration ({} problem(s)):", self.0.len())?;
        for error in &self.0 {
            writeln!(f, "  - {error}")?;
        }
        Ok(())
    }
}

/// Where configuration comes from. Production reads the process environment; tests pass a map.
#[derive(Debug, Clone, Default)]
pub struct ConfigSource {
    file: Option<PathBuf>,
    env: Vec<(String, String)>,
}

impl ConfigSource {
    /// The process environment, and the file named by `file` or by `TRIBUTARY_CONFIG`.
    pub fn from_process(file: Option<PathBuf>) -> Self {
        let file = file.or_else(|| std::env::var_os(CONFIG_FILE_ENV).map(PathBuf::from));
        Self { file, env: std::env::vars().collect() }
    }

    /// Given variables and an optional file; for tests.
    pub fn new(file: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Self {
        Self { file: file.map(Path::to_path_buf), env: env.into_iter().collect() }
    }

    /// Loads the configuration of `service` (its section is the name with `-` as `_`).
    pub fn load<S: ServiceSection>(&self, service: &str) -> Result<ServiceConfig<S>, ConfigErrors> {
        let mut figment = Figment::new();
        if let Some(file) = &self.file {
            if !file.exists() {
                return Err(ConfigErrors(vec![format!("configuration file {} does not exist", file.display())]));
            }
            figment = figment.merge(Toml::file(file));
        }
        figment = figment.merge(Serialized::globals(self.env_dict()));

        let mut errors = Vec::new();
        let mut config = ServiceConfig::<S>::default();
        section(&figment, "kafka", &mut config.kafka, &mut errors);
        section(&figment, "registry", &mut config.registry, &mut errors);
        section(&figment, "admin", &mut config.admin, &mut errors);
        section(&figment, "log", &mut config.log, &mut errors);
        section(&figment, "runtime", &mut config.runtime, &mut errors);
        section(&figment, &service.replace('-', "_"), &mut config.service, &mut errors);
        let known = ["kafka", "registry", "admin", "log", "runtime"];
        if let Ok(dict) = figment.extract::<Dict>() {
            for key in dict.keys() {
                if !known.contains(&key.as_str()) && *key != service.replace('-', "_") {
                    errors.push(format!("unknown section `{key}`"));
                }
            }
        }
        validate_common(&config, &mut errors);
        config.service.validate(&mut errors);
        if errors.is_empty() { Ok(config) } else { Err(ConfigErrors(errors)) }
    }

    /// `TRIBUTARY__A__B=v` as the nested dictionary `{a: {b: v}}`.
    fn env_dict(&self) -> Dict {
        let mut root = Dict::new();
        for (name, raw) in &self.env {
            let Some(path) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let mut keys: Vec<String> = path.split(ENV_SEPARATOR).map(str::to_ascii_lowercase).collect();
            if keys.iter().any(String::is_empty) {
                continue;
            }
            // librdkafka property names use dots, which environment variable names cannot.
            if keys.len() == 3 && keys[0] == "kafka" && keys[1] == "properties" {
                keys[2] = keys[2].replace('_', ".");
            }
            let value = if keys.get(1).is_some_and(|k| k == "properties") {
                Value::from(raw.clone())
            } else {
                raw.parse::<Value>().unwrap_or_else(|_| Value::from(raw.clone()))
            };
            insert_nested(&mut root, &keys, value);
        }
        root
    }
}

fn insert_nested(dict: &mut Dict, keys: &[String], value: Value) {
    match keys {
        [] => {}
        [last] => {
            dict.insert(last.clone(), value);
        }
        [first, rest @ ..] => {
            let entry = dict.entry(first.clone()).or_insert_with(|| Value::from(Dict::new()));
            if let Value::Dict(_, inner) = entry {
                insert_nested(inner, rest, value);
            }
        }
    }
}

fn section<T: DeserializeOwned>(figment: &Figment, name: &str, target: &mut T, errors: &mut Vec<String>) {
    if !figment.contains(name) {
        return;
    }
    match figment.extract_inner::<T>(name) {
        Ok(value) => *target = value,
        Err(error) => errors.extend(error.into_iter().map(|e| format!("[{name}] {e}"))),
    }
}

fn validate_common<S>(config: &ServiceConfig<S>, errors: &mut Vec<String>) {
    if config.kafka.bootstrap_servers.trim().is_empty() {
        errors.push("[kafka] bootstrap_servers must not be empty".into());
    }
    if config.kafka.partitions < 1 {
        errors.push(format!("[kafka] partitions must be at least 1, got {}", config.kafka.partitions));
    }
    if config.kafka.replication_factor < 1 {
        errors.push(format!("[kafka] replication_factor must be at least 1, got {}", config.kafka.replication_factor));
    }
    if !(config.registry.url.starts_with("http://") || config.registry.url.starts_with("https://")) {
        errors.push(format!("[registry] url must be an http(s) URL, got {:?}", config.registry.url));
    }
    if config.runtime.commit_interval.is_zero() {
        errors.push("[runtime] commit_interval must be greater than zero".into());
    }
    // A transaction stays open for about one commit interval; it must stay far below the
    // broker's limit on an open transaction (see transaction.rs).
    if config.runtime.commit_interval > crate::transaction::TRANSACTION_TIMEOUT / 4 {
        errors.push(format!(
            "[runtime] commit_interval must be at most {:?}, a quarter of the transaction timeout",
            crate::transaction::TRANSACTION_TIMEOUT / 4
        ));
    }
    if config.runtime.max_batch_records == 0 {
        errors.push("[runtime] max_batch_records must be at least 1".into());
    }
    if config.runtime.instance_id.trim().is_empty() {
        errors.push("[runtime] instance_id must not be empty".into());
    }
    if config.runtime.retry.max_attempts == 0 {
        errors.push("[runtime.retry] max_attempts must be at least 1".into());
    }
    if config.runtime.retry.initial_backoff > config.runtime.retry.max_backoff {
        errors.push("[runtime.retry] initial_backoff must not exceed max_backoff".into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Demo {
        threshold: u32,
    }

    impl ServiceSection for Demo {
        fn validate(&self, errors: &mut Vec<String>) {
            if self.threshold > 100 {
                errors.push(format!("[demo_service] threshold must be at most 100, got {}", self.threshold));
            }
        }
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_apply_when_nothing_is_set() {
        let config = ConfigSource::new(None, env(&[])).load::<Demo>("demo-service").unwrap();
        assert_eq!(config.kafka.bootstrap_servers, DEFAULT_BOOTSTRAP_SERVERS);
        assert_eq!(config.runtime.commit_interval, Duration::from_millis(100));
        assert_eq!(config.service.threshold, 0);
    }

    #[test]
    fn the_environment_overrides_the_file_which_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("svc.toml");
        std::fs::write(
            &file,
            "[kafka]\nbootstrap_servers = \"file:9092\"\ngroup_id = \"from-file\"\n[demo_service]\nthreshold = 7\n",
        )
        .unwrap();
        let config = ConfigSource::new(
            Some(&file),
            env(&[
                ("TRIBUTARY__KAFKA__BOOTSTRAP_SERVERS", "env:9092"),
                ("TRIBUTARY__RUNTIME__COMMIT_INTERVAL", "250ms"),
                ("TRIBUTARY__KAFKA__PROPERTIES__SASL_MECHANISM", "PLAIN"),
                ("UNRELATED", "x"),
            ]),
        )
        .load::<Demo>("demo-service")
        .unwrap();
        assert_eq!(config.kafka.bootstrap_servers, "env:9092");
        assert_eq!(config.kafka.group_id.as_deref(), Some("from-file"));
        assert_eq!(config.runtime.commit_interval, Duration::from_millis(250));
        assert_eq!(config.kafka.properties.get("sasl.mechanism").map(String::as_str), Some("PLAIN"));
        assert_eq!(config.service.threshold, 7);
    }

    #[test]
    fn every_error_is_reported_at_once() {
        let errors = ConfigSource::new(
            None,
            env(&[
                ("TRIBUTARY__KAFKA__PARTITIONS", "zero"),
                ("TRIBUTARY__REGISTRY__URL", "ftp://nope"),
                ("TRIBUTARY__RUNTIME__COMMIT_INTERVAL", "soon"),
                ("TRIBUTARY__DEMO_SERVICE__THRESHOLD", "500"),
                ("TRIBUTARY__NOPE__X", "1"),
            ]),
        )
        .load::<Demo>("demo-service")
        .unwrap_err();
        let text = errors.to_string();
        assert_eq!(errors.0.len(), 5, "{text}");
        for needle in
            ["[kafka]", "[registry] url", "[runtime]", "threshold must be at most 100", "unknown section `nope`"]
        {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
    }

    #[test]
    fn secrets_never_appear_in_debug_output() {
        let config = ConfigSource::new(
            None,
            env(&[
                ("TRIBUTARY__KAFKA__PROPERTIES__SASL_PASSWORD", "hunter2-kafka"),
                ("TRIBUTARY__REGISTRY__PASSWORD", "hunter2-registry"),
            ]),
        )
        .load::<Demo>("demo-service")
        .unwrap();
        let debug = format!("{config:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("<redacted>"));
    }
}
