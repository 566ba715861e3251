//! `tributary clock`: show or move the controlled clock of a deployment.
//!
//! Every service started with `runtime.clock = "controlled"` follows the clock topic of its
//! deployment (`<prefix>tributary.clock`), so one command moves them all; timers that came due
//! in the skipped interval fire right after, in due order. Time never moves backwards.

use std::process::ExitCode;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use tributary_runtime::clock::{self, ClockSetting};

use crate::Connections;

/// `tributary clock` subcommands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum ClockCommand {
    /// The controlled time of the deployment, and how far it is ahead of the system clock.
    Show,
    /// Move the controlled clock forward, e.g. `30d`, `36h`, `90min`.
    Advance {
        /// How far (humantime: `30d`, `2h 30m`, `90s`).
        #[arg(value_parser = humantime::parse_duration)]
        by: Duration,
    },
    /// Move the controlled clock to an RFC 3339 time, e.g. `2027-01-31T00:00:00Z` (never back).
    Set {
        /// The time.
        to: DateTime<Utc>,
    },
}

fn describe(setting: Option<&ClockSetting>) -> String {
    let offset_ms = setting.map_or(0, |s| s.offset_ms);
    let now = Utc::now() + chrono::Duration::milliseconds(offset_ms);
    let ahead = humantime::format_duration(Duration::from_secs(offset_ms.max(0) as u64 / 1000));
    format!("{} (system clock + {ahead})", now.to_rfc3339_opts(SecondsFormat::Secs, true))
}

/// Runs a clock subcommand.
pub(crate) async fn run(connections: &Connections, command: &ClockCommand) -> anyhow::Result<ExitCode> {
    let kafka = &connections.kafka;
    let setting = match command {
        ClockCommand::Show => clock::read_setting(kafka).await?,
        ClockCommand::Advance { by } => {
            let reason = format!("tributary clock advance {}", humantime::format_duration(*by));
            Some(clock::advance(kafka, *by, &reason).await?)
        }
        ClockCommand::Set { to } => {
            let reason = format!("tributary clock set {}", to.to_rfc3339_opts(SecondsFormat::Secs, true));
            Some(clock::set(kafka, *to, &reason).await?)
        }
    };
    println!("{}", describe(setting.as_ref()));
    Ok(ExitCode::SUCCESS)
}
