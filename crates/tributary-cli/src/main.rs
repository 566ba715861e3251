//! `tributary`: the operations CLI.
//!
//! - `schemas register | check | release`: schema governance ([`schemas`]).
//! - `tap <topic>`: any topic decoded through the registry to JSON lines ([`tap`]).
//! - `publish <topic>`: JSON values encoded through the registry into a topic ([`publish`]).
//! - `dlq list | show | replay`: dead-letter inspection and replay ([`dlq`]).
//! - `clock show | advance | set`: the controlled clock of a deployment ([`clock`]).
//! - `entitlement override`: an operator's override of an account's entitlement ([`entitlement`]).
//! - `trace <correlation-id>`: one story across every topic, in time order ([`trace`]).
//!
//! Kafka and registry settings come from the same `TRIBUTARY__KAFKA__…` and
//! `TRIBUTARY__REGISTRY__…` variables as the services, or from the flags.

mod clock;
mod dlq;
mod entitlement;
mod publish;
mod schemas;
mod tap;
mod trace;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tributary_runtime::config::{ConfigSource, KafkaConfig, NoSettings, RegistryConfig};

/// Tributary operations: schema governance, topic taps, DLQ replay, the controlled clock.
#[derive(Debug, Parser)]
#[command(name = "tributary", version, about)]
struct Cli {
    /// Kafka bootstrap servers (default: TRIBUTARY__KAFKA__BOOTSTRAP_SERVERS, then the local stack).
    #[arg(long, global = true)]
    bootstrap_servers: Option<String>,
    /// Schema registry URL (default: TRIBUTARY__REGISTRY__URL, then the local stack).
    #[arg(long, global = true)]
    registry_url: Option<String>,
    /// Prefix of the deployment's topic names (default: TRIBUTARY__KAFKA__TOPIC_PREFIX, then none).
    #[arg(long, global = true)]
    topic_prefix: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Schema governance.
    #[command(subcommand)]
    Schemas(SchemasCommand),
    /// Print a topic as JSON lines, decoded through the registry.
    Tap(tap::TapArgs),
    /// Write JSON values (the shape `tap` prints) to a topic, encoded through the registry.
    Publish(publish::PublishArgs),
    /// Dead letters: list, show, replay.
    #[command(subcommand)]
    Dlq(dlq::DlqCommand),
    /// The controlled clock of every service of the deployment: show, advance, set.
    #[command(subcommand)]
    Clock(clock::ClockCommand),
    /// Entitlements: an operator's override of an account's state (with who and why).
    #[command(subcommand)]
    Entitlement(entitlement::EntitlementCommand),
    /// Every record of one correlation id, across every Tributary topic, in time order.
    Trace(trace::TraceArgs),
}

#[derive(Debug, Subcommand)]
enum SchemasCommand {
    /// Register every schema under `<topic>-value` and set FULL_TRANSITIVE compatibility.
    Register {
        /// The folder of `*.avsc` files.
        #[arg(long, default_value = "schemas")]
        dir: PathBuf,
    },
    /// Offline: check every schema against all its released versions (FULL_TRANSITIVE).
    Check {
        /// The folder of `*.avsc` files (released versions under `released/<topic>/vN.avsc`).
        #[arg(long, default_value = "schemas")]
        dir: PathBuf,
    },
    /// Record every changed schema as its topic's next released version.
    Release {
        /// The folder of `*.avsc` files.
        #[arg(long, default_value = "schemas")]
        dir: PathBuf,
    },
}

/// Kafka and registry settings: flags over environment over defaults.
#[derive(Debug, Clone)]
pub(crate) struct Connections {
    pub(crate) kafka: KafkaConfig,
    pub(crate) registry: RegistryConfig,
}

fn connections(cli: &Cli) -> anyhow::Result<Connections> {
    let config = ConfigSource::from_process(None)
        .load::<NoSettings>("tributary")
        .map_err(|errors| anyhow::anyhow!("{errors}"))?;
    let mut kafka = config.kafka;
    let mut registry = config.registry;
    if let Some(bootstrap) = &cli.bootstrap_servers {
        kafka.bootstrap_servers = bootstrap.clone();
    }
    if let Some(url) = &cli.registry_url {
        registry.url = url.clone();
    }
    if let Some(prefix) = &cli.topic_prefix {
        kafka.topic_prefix = prefix.clone();
    }
    Ok(Connections { kafka, registry })
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = async {
        match &cli.command {
            Command::Schemas(SchemasCommand::Check { dir }) => schemas::check(dir),
            Command::Schemas(SchemasCommand::Release { dir }) => schemas::release(dir),
            Command::Schemas(SchemasCommand::Register { dir }) => schemas::register(&connections(&cli)?, dir).await,
            Command::Tap(args) => tap::run(&connections(&cli)?, args).await,
            Command::Publish(args) => publish::run(&connections(&cli)?, args).await,
            Command::Dlq(command) => dlq::run(&connections(&cli)?, command).await,
            Command::Clock(command) => clock::run(&connections(&cli)?, command).await,
            Command::Entitlement(command) => entitlement::run(&connections(&cli)?, command).await,
            Command::Trace(args) => trace::run(&connections(&cli)?, args).await,
        }
    }
    .await;
    match outcome {
        Ok(code) => code,
        Err(error) => {
            eprintln!("tributary: {error:#}");
            ExitCode::FAILURE
        }
    }
}
