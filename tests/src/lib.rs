//! Helpers for Tributary's end-to-end tests against the real local stack.
//!
//! The stack (Kafka, Apicurio Registry, Tryton) is started by `make up` or by `make test`,
//! which export its addresses (deploy/local/env.sh). Each test takes [`stack()`], which checks
//! that every component answers and fails with instructions otherwise: a test that needs the
//! stack never skips silently.

pub mod cloudevents;
pub mod echo;
pub mod kafka;
pub mod otlp;
pub mod webhook;

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::OnceLock;
use std::time::Duration;

use tributary_runtime::config::{AdminConfig, KafkaConfig, RegistryConfig, ServiceConfig};

/// Environment variables `make` exports, with the defaults of deploy/local/env.sh.
const KAFKA_BOOTSTRAP_ENV: (&str, &str) = ("TRIBUTARY_KAFKA_BOOTSTRAP", "127.0.0.1:19092");
const REGISTRY_URL_ENV: (&str, &str) = ("TRIBUTARY_REGISTRY_URL", "http://127.0.0.1:18081/apis/ccompat/v7");
const TRYTON_URL_ENV: (&str, &str) = ("TRIBUTARY_TRYTON_URL", "http://127.0.0.1:18000/");
const TRYTON_DB_ENV: (&str, &str) = ("TRIBUTARY_TRYTON_DB", "tributary");
const TRYTON_USER_ENV: (&str, &str) = ("TRIBUTARY_TRYTON_USER", "admin");
const TRYTON_PASSWORD_ENV: (&str, &str) = ("TRIBUTARY_TRYTON_PASSWORD", "tributary-local-dev");

fn env_or((name, default): (&str, &str)) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// Addresses of the running local stack.
#[derive(Debug, Clone)]
pub struct Stack {
    /// Kafka bootstrap servers.
    pub bootstrap: String,
    /// Base URL of the registry's Confluent-compatible API.
    pub registry_url: String,
    /// Base URL of Tryton's JSON-RPC server.
    pub tryton_url: String,
    /// Tryton database name.
    pub tryton_db: String,
    /// Tryton user.
    pub tryton_user: String,
    /// Tryton password.
    pub tryton_password: String,
}

/// The running stack; panics with instructions when a component does not answer.
pub fn stack() -> &'static Stack {
    static STACK: OnceLock<Stack> = OnceLock::new();
    STACK.get_or_init(|| {
        let stack = Stack {
            bootstrap: env_or(KAFKA_BOOTSTRAP_ENV),
            registry_url: env_or(REGISTRY_URL_ENV),
            tryton_url: env_or(TRYTON_URL_ENV),
            tryton_db: env_or(TRYTON_DB_ENV),
            tryton_user: env_or(TRYTON_USER_ENV),
            tryton_password: env_or(TRYTON_PASSWORD_ENV),
        };
        let first_broker = stack.bootstrap.split(',').next().unwrap_or_default().to_owned();
        require_listening("Kafka", &first_broker);
        require_listening("the schema registry", &host_port(&stack.registry_url));
        require_listening("Tryton", &host_port(&stack.tryton_url));
        stack
    })
}

fn host_port(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    rest.split('/').next().unwrap_or_default().to_owned()
}

fn require_listening(component: &str, address: &str) {
    let reachable = address
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .is_some_and(|addr: SocketAddr| TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok());
    assert!(
        reachable,
        "{component} is not answering at {address}: the local stack is not running. \
         Start it with `make up` (then run `cargo test`), or run `make test`, which starts it."
    );
}

/// A name no other test run has used: `<prefix>-<uuid>`.
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

impl Stack {
    /// Kafka settings for the local broker.
    pub fn kafka(&self) -> KafkaConfig {
        KafkaConfig { bootstrap_servers: self.bootstrap.clone(), ..KafkaConfig::default() }
    }

    /// Registry settings for the local registry.
    pub fn registry(&self) -> RegistryConfig {
        RegistryConfig { url: self.registry_url.clone(), ..RegistryConfig::default() }
    }

    /// A service configuration pointed at the stack, with the admin port on an ephemeral port
    /// and a unique consumer group, so that tests never collide.
    pub fn service_config<S: Default>(&self, group_prefix: &str) -> ServiceConfig<S> {
        ServiceConfig {
            kafka: KafkaConfig {
                group_id: Some(unique_name(group_prefix)),
                transactional_id_prefix: Some(unique_name(group_prefix)),
                ..self.kafka()
            },
            registry: self.registry(),
            admin: AdminConfig { listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))) },
            ..ServiceConfig::default()
        }
    }

    /// Environment variables that point a service binary at the stack.
    pub fn service_env(&self) -> Vec<(String, String)> {
        vec![
            ("TRIBUTARY__KAFKA__BOOTSTRAP_SERVERS".into(), self.bootstrap.clone()),
            ("TRIBUTARY__REGISTRY__URL".into(), self.registry_url.clone()),
        ]
    }
}

/// The path of the workspace binary `name`, built by `cargo build --workspace --bins` (which
/// `make test` runs first) next to this test executable. Built once for the whole workspace:
/// building one package from inside a test would compile its dependencies again with that
/// package's features.
pub fn workspace_binary(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    // target/<profile>/deps/e2e-<hash> -> target/<profile>/<name>
    let path = exe.parent().and_then(std::path::Path::parent).expect("a target folder").join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace --bins` first (`make test` does)",
        path.display()
    );
    path
}

/// Tests that post to Tryton hold this for reading; a test that takes Tryton away holds it
/// for writing, so that no other test meets the outage it causes.
static TRYTON: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// Shared use of the stack's Tryton (see [`TRYTON`]).
pub async fn tryton_shared() -> tokio::sync::RwLockReadGuard<'static, ()> {
    TRYTON.read().await
}

/// Sole use of the stack's Tryton, for a test that stops it.
pub async fn tryton_exclusive() -> tokio::sync::RwLockWriteGuard<'static, ()> {
    TRYTON.write().await
}

/// Stops one component of the local stack (`kafka`, `registry`, `tryton`).
pub async fn stop_component(component: &str) {
    let status = tokio::process::Command::new(workspace_file("deploy/local/down.sh"))
        .arg(component)
        .status()
        .await
        .expect("run deploy/local/down.sh");
    assert!(status.success(), "stopping {component} failed");
}

/// Starts again whatever part of the local stack is not running, and waits until healthy.
pub async fn start_stack() {
    let status = tokio::process::Command::new(workspace_file("deploy/local/up.sh"))
        .stdout(std::process::Stdio::null())
        .status()
        .await
        .expect("run deploy/local/up.sh");
    assert!(status.success(), "starting the stack failed");
}

/// The path of `relative` in the workspace (configuration files the tests share with the demo).
pub fn workspace_file(relative: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace root").join(relative)
}

/// The venv's python (tests/python/setup.sh), made once per test process.
pub fn python() -> &'static str {
    static PYTHON: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PYTHON.get_or_init(|| {
        let setup = std::process::Command::new(workspace_file("tests/python/setup.sh"))
            .output()
            .expect("run tests/python/setup.sh");
        assert!(
            setup.status.success(),
            "setting up the Python venv failed:\n{}",
            String::from_utf8_lossy(&setup.stderr)
        );
        String::from_utf8_lossy(&setup.stdout)
            .lines()
            .last()
            .expect("setup.sh prints the python path")
            .trim()
            .to_owned()
    })
}

/// Polls `check` every 100 ms until it returns `Some` or `timeout` passes.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts service `S` in this process with `config` and waits (a minute at most) until its
/// admin port reports it ready: partitions assigned, state restored, its relays too.
pub async fn spawn_ready<S: tributary_runtime::Service>(
    config: tributary_runtime::ServiceConfig<S::Settings>,
) -> tributary_runtime::service::RunningService {
    let service = tributary_runtime::service::spawn::<S>(config)
        .await
        .unwrap_or_else(|error| panic!("starting {}: {error:#}", S::NAME));
    wait_ready(&service, S::NAME).await;
    service
}

/// Waits (a minute at most) until `service`'s admin port reports it ready.
pub async fn wait_ready(service: &tributary_runtime::service::RunningService, name: &str) {
    let ready = format!("http://{}/health/ready", service.admin_addr);
    eventually(Duration::from_secs(60), &format!("{name} to be ready"), || async {
        reqwest::get(&ready).await.ok().filter(|r| r.status().is_success())
    })
    .await;
}
