//! The shape of a Tributary service and the `main` every service binary calls.
//!
//! A service implements [`Service`]: `build` from its typed configuration, then `run` until the
//! shutdown token fires. [`main`] does the rest the same way for all five binaries: parse the
//! command line, load configuration (all errors at once), start telemetry, serve the admin port,
//! turn SIGTERM/SIGINT into a shutdown, and enforce the shutdown grace. [`spawn`] runs a
//! service in-process for tests, on the same path.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use prometheus_client::registry::Registry;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tributary_telemetry::{AdminServer, Health, ServiceMetrics};

use crate::clock::Clock;
use crate::config::{ConfigSource, ServiceConfig, ServiceSection};

/// What a service hands the harness, and what the harness hands the service while it builds.
#[derive(Debug)]
pub struct BuildContext {
    /// Registry for the service's own metrics, beside the common ones.
    pub registry: Registry,
    /// The metrics every service exposes; the stream runtime records them.
    pub metrics: ServiceMetrics,
    /// Health flags: the service sets ready once it can do its work.
    pub health: Health,
    /// The one clock of the service: every "now" of the runtime and of its logic.
    pub clock: Clock,
    /// The addresses the service's own listeners are bound to, by name (see [`listen`](Self::listen)).
    bound: Vec<(&'static str, SocketAddr)>,
    /// The service's own routes on the admin port (see [`admin_routes`](Self::admin_routes)).
    admin_routes: Option<axum::Router>,
}

impl BuildContext {
    /// A context for `service` on `clock`, with a registry of its own and the common metrics
    /// registered; for running a stream runtime outside [`main`] and [`spawn`] (benchmarks).
    pub fn new(service: &str, clock: Clock) -> Self {
        let mut registry = Registry::default();
        let metrics = ServiceMetrics::register(&mut registry, service);
        clock.register_metrics(&mut registry);
        let health = Health::new();
        health.register_metrics(&mut registry);
        Self { registry, metrics, health, clock, bound: Vec::new(), admin_routes: None }
    }

    /// Serves `routes` on the admin port too, beside `/metrics` and the probes: read-only
    /// queries for operators and for systems that must ask before they act. The admin port is
    /// never exposed publicly.
    pub fn admin_routes(&mut self, routes: axum::Router) {
        self.admin_routes = Some(match self.admin_routes.take() {
            Some(existing) => existing.merge(routes),
            None => routes,
        });
    }

    /// Binds a listener of the service's, named `name` (e.g. `http`). Port 0 takes a free port;
    /// the bound address is reported by [`RunningService::address`] and in the addresses file.
    pub async fn listen(&mut self, name: &'static str, address: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("binding the {name} listener {address}"))?;
        let bound = listener.local_addr()?;
        tracing::info!(listener = name, address = %bound, "listening");
        self.bound.push((name, bound));
        Ok(listener)
    }
}

/// A Tributary service: a library with a build step and a run loop.
pub trait Service: Sized + Send + 'static {
    /// The service name: binary, consumer group, metric label and config section.
    const NAME: &'static str;
    /// Admin port used when the configuration names none, distinct per service so that all
    /// five can run side by side on one machine.
    const DEFAULT_ADMIN_PORT: u16;
    /// The service's own configuration section.
    type Settings: ServiceSection;

    /// Builds the service: connects clients, registers metrics. Nothing is consumed yet.
    fn build(
        config: ServiceConfig<Self::Settings>,
        context: &mut BuildContext,
    ) -> impl Future<Output = anyhow::Result<Self>> + Send;

    /// Runs until `shutdown` is cancelled, then finishes or aborts in-flight work and returns.
    fn run(self, shutdown: CancellationToken) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// A service started by [`spawn`].
#[derive(Debug)]
pub struct RunningService {
    /// Where its admin port listens.
    pub admin_addr: SocketAddr,
    /// Its health flags.
    pub health: Health,
    /// Its clock.
    pub clock: Clock,
    bound: Vec<(&'static str, SocketAddr)>,
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl RunningService {
    /// Where the service's listener `name` is bound (`admin` is the admin port).
    pub fn address(&self, name: &str) -> Option<SocketAddr> {
        self.bound.iter().find(|(bound, _)| *bound == name).map(|(_, address)| *address)
    }

    /// Asks the service to stop, as SIGTERM would, and waits for it.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.task.await.context("service task panicked")?
    }

    /// The token that stops it.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}

/// Builds `S` with `config` and runs it in the current Tokio runtime, with its admin port.
pub async fn spawn<S: Service>(config: ServiceConfig<S::Settings>) -> anyhow::Result<RunningService> {
    let shutdown = CancellationToken::new();
    let started = start::<S>(config, shutdown.clone(), None).await?;
    Ok(RunningService {
        admin_addr: started.admin_addr,
        health: started.health,
        clock: started.clock,
        bound: started.bound,
        shutdown,
        task: started.task,
    })
}

/// A started service, as [`start`] hands it back.
struct Started {
    admin_addr: SocketAddr,
    health: Health,
    clock: Clock,
    bound: Vec<(&'static str, SocketAddr)>,
    task: JoinHandle<anyhow::Result<()>>,
}

async fn start<S: Service>(
    config: ServiceConfig<S::Settings>,
    shutdown: CancellationToken,
    addresses_file: Option<PathBuf>,
) -> anyhow::Result<Started> {
    let clock = Clock::for_mode(config.runtime.clock);
    let mut context = BuildContext::new(S::NAME, clock.clone());
    let health = context.health.clone();
    let clock_task = clock.is_controlled().then(|| {
        tracing::warn!(
            service = S::NAME,
            "runtime.clock = \"controlled\": time follows `tributary clock`, not the system clock (never in production)"
        );
        tokio::spawn(crate::clock::follow(clock.clone(), config.kafka.clone(), shutdown.clone()))
    });
    let admin_listen =
        config.admin.listen.unwrap_or_else(|| SocketAddr::from((Ipv4Addr::LOCALHOST, S::DEFAULT_ADMIN_PORT)));
    let grace = config.runtime.shutdown_grace;
    let service = S::build(config, &mut context).await.with_context(|| format!("building {}", S::NAME))?;

    let mut admin = AdminServer::bind(admin_listen, Arc::new(context.registry), health.clone())
        .await
        .with_context(|| format!("binding the admin port {admin_listen}"))?;
    if let Some(routes) = context.admin_routes {
        admin = admin.with_routes(routes);
    }
    let admin_addr = admin.local_addr()?;
    let mut bound = context.bound;
    bound.insert(0, ("admin", admin_addr));
    if let Some(path) = addresses_file {
        write_addresses(&path, &bound)?;
    }
    let admin_stop = CancellationToken::new();
    let admin_task = tokio::spawn(admin.serve(admin_stop.clone().cancelled_owned()));

    let task_health = health.clone();
    let task = tokio::spawn(async move {
        let run = tokio::spawn(service.run(shutdown.clone()));
        tokio::pin!(run);
        let outcome = tokio::select! {
            finished = &mut run => finished,
            () = shutdown.cancelled() => {
                task_health.set_stopping();
                tracing::info!(grace = ?grace, "shutting down");
                match tokio::time::timeout(grace, &mut run).await {
                    Ok(finished) => finished,
                    Err(_) => {
                        run.abort();
                        admin_stop.cancel();
                        anyhow::bail!("{} did not stop within the shutdown grace of {grace:?}", S::NAME);
                    }
                }
            }
        };
        task_health.set_stopping();
        admin_stop.cancel();
        let _ = admin_task.await;
        if let Some(clock_task) = clock_task {
            clock_task.abort();
        }
        outcome.context("service run loop panicked")?
    });
    tracing::info!(service = S::NAME, admin = %admin_addr, "started");
    Ok(Started { admin_addr, health, clock, bound, task })
}

/// Writes the bound addresses as a JSON object (`{"admin": "127.0.0.1:41234", ...}`), so that
/// whoever started the binary with port 0 finds its ports.
fn write_addresses(path: &std::path::Path, bound: &[(&'static str, SocketAddr)]) -> anyhow::Result<()> {
    let addresses: serde_json::Map<String, serde_json::Value> =
        bound.iter().map(|(name, address)| ((*name).to_owned(), address.to_string().into())).collect();
    let temporary = path.with_extension("partial");
    std::fs::write(&temporary, serde_json::to_vec(&addresses)?)
        .with_context(|| format!("writing {}", temporary.display()))?;
    // Renamed into place, so that a reader never sees half a file.
    std::fs::rename(&temporary, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Command-line arguments common to every service binary.
#[derive(Debug, clap::Parser)]
struct Args {
    /// A TOML configuration file; the environment (`TRIBUTARY__…`) overrides it.
    #[arg(long, env = crate::config::CONFIG_FILE_ENV)]
    config: Option<PathBuf>,
    /// Load and check the configuration, print it (secrets redacted), and exit.
    #[arg(long)]
    check_config: bool,
    /// Once bound, write the addresses of the admin port and the service's listeners to this
    /// file as JSON, e.g. `{"admin": "127.0.0.1:41234"}` (for listeners configured on port 0).
    #[arg(long, env = "TRIBUTARY_ADDRESSES_FILE")]
    addresses_file: Option<PathBuf>,
}

/// The whole `main` of a service binary.
///
/// Exit codes: 0 after a clean shutdown, 1 when the service failed, 2 for a bad configuration.
pub fn main<S: Service>() -> ExitCode {
    use clap::Parser as _;
    let args = Args::parse();
    let config = match ConfigSource::from_process(args.config).load::<S::Settings>(S::NAME) {
        Ok(config) => config,
        Err(errors) => {
            eprintln!("{}: {errors}", S::NAME);
            return ExitCode::from(2);
        }
    };
    if args.check_config {
        println!("{config:#?}");
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("{}: cannot start the async runtime: {error}", S::NAME);
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let _telemetry = match tributary_telemetry::logging::init(S::NAME, &config.log) {
            Ok(guard) => guard,
            Err(error) => {
                eprintln!("{}: {error}", S::NAME);
                return ExitCode::from(2);
            }
        };
        let shutdown = CancellationToken::new();
        tokio::spawn(cancel_on_signal(shutdown.clone()));
        let outcome = match start::<S>(config, shutdown, args.addresses_file).await {
            Ok(started) => started.task.await.map_err(anyhow::Error::from).and_then(|r| r),
            Err(error) => Err(error),
        };
        match outcome {
            Ok(()) => {
                tracing::info!(service = S::NAME, "stopped");
                ExitCode::SUCCESS
            }
            Err(error) => {
                tracing::error!(service = S::NAME, error = format!("{error:#}"), "failed");
                eprintln!("{}: {error:#}", S::NAME);
                ExitCode::FAILURE
            }
        }
    })
}

/// Cancels `shutdown` on SIGTERM (Kubernetes) or SIGINT (a terminal).
async fn cancel_on_signal(shutdown: CancellationToken) {
    let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(signal) => signal,
        Err(error) => {
            tracing::error!(%error, "cannot listen for SIGTERM");
            return;
        }
    };
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
    shutdown.cancel();
}

/// The name and default admin port of a service, for [`Idle`].
pub trait ServiceIdentity: Send + Sync + 'static {
    /// See [`Service::NAME`].
    const NAME: &'static str;
    /// See [`Service::DEFAULT_ADMIN_PORT`].
    const DEFAULT_ADMIN_PORT: u16;
}

/// A service whose processing is not built yet: it waits for the broker, reports ready, and
/// idles until shutdown. It proves the service's shape (configuration, admin port, probes,
/// signals) end to end before its logic lands.
#[derive(Debug)]
pub struct Idle<I> {
    kafka: crate::config::KafkaConfig,
    health: Health,
    identity: std::marker::PhantomData<I>,
}

impl<I: ServiceIdentity> Service for Idle<I> {
    const NAME: &'static str = I::NAME;
    const DEFAULT_ADMIN_PORT: u16 = I::DEFAULT_ADMIN_PORT;
    type Settings = crate::config::NoSettings;

    async fn build(config: ServiceConfig<Self::Settings>, context: &mut BuildContext) -> anyhow::Result<Self> {
        Ok(Self { kafka: config.kafka, health: context.health.clone(), identity: std::marker::PhantomData })
    }

    async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        // Retry in short rounds so that a broker that starts after the service is picked up
        // and a shutdown during the wait is honoured promptly.
        const ROUND: std::time::Duration = std::time::Duration::from_secs(2);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                reached = crate::kafka::wait_for_broker(&self.kafka, ROUND) => match reached {
                    Ok(brokers) => {
                        tracing::info!(brokers, "connected to Kafka");
                        break;
                    }
                    Err(error) => tracing::warn!(%error, "waiting for Kafka"),
                },
            }
        }
        self.health.set_ready(true);
        shutdown.cancelled().await;
        Ok(())
    }
}
