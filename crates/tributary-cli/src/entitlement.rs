//! `tributary entitlement override <account> --to <STATE> --by <who> --reason <why>`: an
//! operator's override of an account's entitlement (an `entitlement.overrides` record), which
//! entitlement-watcher applies as a MANUAL transition. A suspension or closure set this way
//! holds until another override; `--to ACTIVE` lifts it.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand, ValueEnum};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tributary_contracts::Contract as _;
use tributary_contracts::codec::Codec;
use tributary_contracts::registry::{RegistryClient, RegistryResolver};
use tributary_contracts::types::{EntitlementOverride, EntitlementState, Envelope};
use tributary_runtime::kafka::producer_config;

use crate::Connections;

/// What `tributary entitlement` does.
#[derive(Debug, Subcommand)]
pub(crate) enum EntitlementCommand {
    /// Put an account in a state, with who and why (MANUAL).
    Override(OverrideArgs),
}

/// The states an operator can put an account in.
#[derive(Debug, Clone, Copy, ValueEnum)]
#[value(rename_all = "UPPER")]
pub(crate) enum State {
    /// Full access; cancels a pending suspension.
    Active,
    /// Grace until `--grace-ends-at` (or the contract's grace from now).
    Grace,
    /// Suspended until another override.
    Suspended,
    /// Closed until another override.
    Closed,
}

impl From<State> for EntitlementState {
    fn from(state: State) -> Self {
        match state {
            State::Active => Self::Active,
            State::Grace => Self::Grace,
            State::Suspended => Self::Suspended,
            State::Closed => Self::Closed,
        }
    }
}

/// `tributary entitlement override`.
#[derive(Debug, Args)]
pub(crate) struct OverrideArgs {
    /// The account id.
    account: String,
    /// The state to put it in.
    #[arg(long = "to", value_enum)]
    to: State,
    /// Who asks (a user id or e-mail), for the audit trail.
    #[arg(long = "by")]
    requested_by: String,
    /// Why, in words.
    #[arg(long)]
    reason: String,
    /// With `--to GRACE`: when the grace ends (RFC 3339, e.g. 2026-12-20T00:00:00Z).
    #[arg(long)]
    grace_ends_at: Option<DateTime<Utc>>,
}

pub(crate) async fn run(connections: &Connections, command: &EntitlementCommand) -> anyhow::Result<ExitCode> {
    let EntitlementCommand::Override(args) = command;
    anyhow::ensure!(!args.requested_by.trim().is_empty(), "--by must name who asks");
    anyhow::ensure!(!args.reason.trim().is_empty(), "--reason must say why");
    anyhow::ensure!(
        args.grace_ends_at.is_none() || matches!(args.to, State::Grace),
        "--grace-ends-at goes with --to GRACE only"
    );
    let order = EntitlementOverride {
        envelope: Envelope::originating("tributary.cli", &args.account, Utc::now()),
        to_state: args.to.into(),
        requested_by: args.requested_by.clone(),
        reason: args.reason.clone(),
        grace_ends_at: args.grace_ends_at.map(|at| at.timestamp_millis()),
    };
    let registry = &connections.registry;
    let client = RegistryClient::new(&registry.url, registry.username.as_deref(), registry.password.as_deref())?;
    let prefix = &connections.kafka.topic_prefix;
    let codec = Codec::new(Arc::new(RegistryResolver::new(client))).with_topic_prefix(prefix);
    let payload = codec.encode(&order).await.context("encoding the override")?;
    let producer: FutureProducer = producer_config(&connections.kafka)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()
        .context("creating the producer")?;
    let topic = format!("{prefix}{}", EntitlementOverride::TOPIC);
    producer
        .send(FutureRecord::to(&topic).key(&args.account).payload(&payload), Duration::from_secs(30))
        .await
        .map_err(|(error, _)| error)
        .with_context(|| format!("writing the override to {topic}"))?;
    println!("override of {} to {:?} written to {topic} (event {})", args.account, args.to, order.envelope.event_id);
    Ok(ExitCode::SUCCESS)
}
