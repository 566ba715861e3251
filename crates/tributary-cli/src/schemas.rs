//! `tributary schemas`: register, check offline, release.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use tributary_contracts::compat;
use tributary_contracts::registry::{COMPATIBILITY, RegistryClient};
use tributary_contracts::topics::{self, TopicSpec};

use crate::Connections;

/// The topics with a schema file in `dir`, in file-name order.
fn schema_files(dir: &Path) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let mut files: Vec<(String, PathBuf)> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "avsc"))
        .filter_map(|path| Some((path.file_stem()?.to_str()?.to_owned(), path)))
        .collect();
    files.sort();
    Ok(files)
}

/// Checks every schema in `dir` against its released versions; exit 1 on any break.
pub(crate) fn check(dir: &Path) -> anyhow::Result<ExitCode> {
    let released = dir.join("released");
    let mut breaks = 0;
    let files = schema_files(dir)?;
    anyhow::ensure!(!files.is_empty(), "no *.avsc files in {}", dir.display());
    for (topic, path) in &files {
        let report = compat::check_topic(topic, path, &released)?;
        let status = if !report.breaks.is_empty() {
            "BREAKS"
        } else if report.versions.is_empty() {
            "new (no released version yet)"
        } else if report.unreleased_changes {
            "compatible, unreleased changes"
        } else {
            "unchanged"
        };
        println!("{topic:<24} {status} [released: {}]", report.versions.join(", "));
        for broken in &report.breaks {
            print!("{broken}");
        }
        breaks += report.breaks.len();
    }
    if breaks > 0 {
        println!(
            "\n{breaks} compatibility break(s): FULL_TRANSITIVE requires every change to be readable both ways against every released version."
        );
        println!("Add fields with defaults, remove only fields that have defaults, and never change a field's type.");
        return Ok(ExitCode::FAILURE);
    }
    println!("\nall {} schemas are FULL_TRANSITIVE-compatible with their released versions", files.len());
    Ok(ExitCode::SUCCESS)
}

/// Copies each changed schema to `released/<topic>/v<N+1>.avsc`, after checking compatibility.
pub(crate) fn release(dir: &Path) -> anyhow::Result<ExitCode> {
    if check(dir)? != ExitCode::SUCCESS {
        anyhow::bail!("refusing to release incompatible schemas");
    }
    let released = dir.join("released");
    for (topic, path) in schema_files(dir)? {
        let report = compat::check_topic(&topic, &path, &released)?;
        if report.unreleased_changes {
            let next = format!("v{}", report.versions.len() + 1);
            let target = released.join(&topic).join(format!("{next}.avsc"));
            std::fs::create_dir_all(target.parent().expect("a released file has a folder"))?;
            std::fs::copy(&path, &target)?;
            println!("{topic}: released as {next}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Registers every contract schema and sets FULL_TRANSITIVE on its subject.
pub(crate) async fn register(connections: &Connections, dir: &Path) -> anyhow::Result<ExitCode> {
    let registry = &connections.registry;
    let client = RegistryClient::new(&registry.url, registry.username.as_deref(), registry.password.as_deref())?;
    // The schemas compiled into this binary are the contracts; make sure they are the files.
    for (topic, path) in schema_files(dir)? {
        let spec: &TopicSpec =
            topics::spec(&topic).with_context(|| format!("{} names no contract topic", path.display()))?;
        let on_disk = std::fs::read_to_string(&path)?;
        anyhow::ensure!(
            on_disk == spec.schema,
            "{} differs from the schema built into this binary; rebuild tributary",
            path.display()
        );
    }
    for spec in topics::ALL {
        let subject = spec.subject();
        // Compatibility first, so that the very first registration is already governed.
        client.set_compatibility(&subject, COMPATIBILITY).await.with_context(|| format!("configuring {subject}"))?;
        let id = client.register(spec).await.with_context(|| format!("registering {subject}"))?;
        let level = client.compatibility(&subject).await?.unwrap_or_default();
        anyhow::ensure!(level == COMPATIBILITY, "{subject}: compatibility reads back as {level:?}");
        println!("{subject:<32} id {id:<5} {level}");
    }
    Ok(ExitCode::SUCCESS)
}
