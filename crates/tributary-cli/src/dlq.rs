//! `tributary dlq`: list, show and replay a service's dead letters.

use std::process::ExitCode;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde_json::json;
use tributary_runtime::dlq::{self, DlqEntry, ReplayFilter};

use crate::Connections;

/// `tributary dlq` subcommands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum DlqCommand {
    /// One line per dead letter: where it is, where it came from, why.
    List {
        /// The service, e.g. `billing-router` (its DLQ is `<service>.dlq`).
        service: String,
        /// Only this error class.
        #[arg(long)]
        class: Option<String>,
    },
    /// A dead letter in full, as JSON: headers, key and value (base64).
    Show {
        /// The service.
        service: String,
        /// The DLQ partition.
        #[arg(long, default_value_t = 0)]
        partition: i32,
        /// The DLQ offset.
        #[arg(long)]
        offset: i64,
    },
    /// Re-publish dead letters to their source topic (or `--to`), through the idempotency keys.
    Replay {
        /// The service.
        service: String,
        /// Only this error class.
        #[arg(long)]
        class: Option<String>,
        /// Only letters whose first failure is at or after this RFC 3339 time.
        #[arg(long)]
        since: Option<DateTime<Utc>>,
        /// Only letters whose first failure is before this RFC 3339 time.
        #[arg(long)]
        until: Option<DateTime<Utc>>,
        /// Only this DLQ partition.
        #[arg(long)]
        partition: Option<i32>,
        /// Only DLQ offsets FROM-TO, both included, e.g. `10-20`.
        #[arg(long, value_parser = parse_range)]
        offsets: Option<(i64, i64)>,
        /// Publish to this topic instead of each letter's source topic.
        #[arg(long)]
        to: Option<String>,
        /// Say what would be replayed, write nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

fn parse_range(text: &str) -> Result<(i64, i64), String> {
    let (from, to) = text.split_once('-').ok_or_else(|| format!("expected FROM-TO, got {text:?}"))?;
    let from: i64 = from.trim().parse().map_err(|e| format!("{from:?}: {e}"))?;
    let to: i64 = to.trim().parse().map_err(|e| format!("{to:?}: {e}"))?;
    if from > to {
        return Err(format!("{from} is after {to}"));
    }
    Ok((from, to))
}

fn summary(entry: &DlqEntry) -> serde_json::Value {
    match &entry.letter {
        Some(letter) => json!({
            "dlq": entry.location.to_string(),
            "class": letter.class,
            "message": letter.message,
            "source": letter.source.to_string(),
            "attempts": letter.attempts,
            "first_failure_at": letter.first_failure_at.to_rfc3339(),
            "key": entry.key.as_ref().map(|k| String::from_utf8_lossy(k).into_owned()),
        }),
        None => json!({"dlq": entry.location.to_string(), "error": "no dlq_* headers: not written by Tributary"}),
    }
}

pub(crate) async fn run(connections: &Connections, command: &DlqCommand) -> anyhow::Result<ExitCode> {
    let kafka = &connections.kafka;
    match command {
        DlqCommand::List { service, class } => {
            let entries = dlq::list(kafka, service).await?;
            let filter = ReplayFilter { class: class.clone(), ..ReplayFilter::default() };
            for entry in entries.iter().filter(|e| class.is_none() || filter.matches(e)) {
                println!("{}", summary(entry));
            }
        }
        DlqCommand::Show { service, partition, offset } => {
            let entries = dlq::list(kafka, service).await?;
            let entry = entries
                .iter()
                .find(|e| e.location.partition == *partition && e.location.offset == *offset)
                .ok_or_else(|| anyhow::anyhow!("no dead letter at partition {partition} offset {offset}"))?;
            let b64 =
                |bytes: &Option<Vec<u8>>| bytes.as_ref().map(|b| base64::engine::general_purpose::STANDARD.encode(b));
            let mut shown = summary(entry);
            shown["headers"] = json!(entry.header_map());
            shown["key_base64"] = json!(b64(&entry.key));
            shown["value_base64"] = json!(b64(&entry.payload));
            println!("{}", serde_json::to_string_pretty(&shown)?);
        }
        DlqCommand::Replay { service, class, since, until, partition, offsets, to, dry_run } => {
            let filter = ReplayFilter {
                class: class.clone(),
                since: *since,
                until: *until,
                partition: *partition,
                offsets: *offsets,
            };
            let report = dlq::replay(kafka, service, &filter, to.as_deref(), *dry_run).await?;
            let verb = if report.dry_run { "would replay" } else { "replayed" };
            println!("{verb} {} of {} dead letter(s)", report.selected, report.examined);
        }
    }
    Ok(ExitCode::SUCCESS)
}
