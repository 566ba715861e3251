//! The offline compatibility gate: every schema against every released version of its topic.
//!
//! FULL_TRANSITIVE means both directions against all earlier versions: the new schema reads
//! every old record (backward) and every old reader reads new records (forward). The check
//! runs without a registry, so CI refuses a breaking change before it can reach one. Avro's own
//! rules decide (apache-avro's `SchemaCompatibility`); on a break we also walk the records
//! field by field to say, in words, which field broke which rule.

use std::fmt;
use std::path::{Path, PathBuf};

use apache_avro::Schema;
use apache_avro::schema::RecordSchema;
use apache_avro::schema_compatibility::SchemaCompatibility;

/// One direction of a compatibility break.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Break {
    /// The topic.
    pub topic: String,
    /// The released version it breaks with, e.g. `v1`.
    pub version: String,
    /// `backward` (new cannot read old records) or `forward` (old readers cannot read new).
    pub direction: &'static str,
    /// One sentence per problem found.
    pub reasons: Vec<String>,
}

impl fmt::Display for Break {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.direction {
            "backward" => "the new schema cannot read records written with",
            _ => "readers of",
        };
        let tail = if self.direction == "backward" { "" } else { " cannot read records written with the new schema" };
        writeln!(f, "{}: {what} {}{tail}:", self.topic, self.version)?;
        for reason in &self.reasons {
            writeln!(f, "    - {reason}")?;
        }
        Ok(())
    }
}

/// The outcome of checking one topic.
#[derive(Debug, Clone, Default)]
pub struct TopicReport {
    /// The topic.
    pub topic: String,
    /// Released versions found, in order.
    pub versions: Vec<String>,
    /// Breaks found.
    pub breaks: Vec<Break>,
    /// Whether the current schema differs from the latest released one.
    pub unreleased_changes: bool,
}

/// Errors reading the schema files.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file is not a valid Avro schema.
    #[error("{path} is not a valid Avro schema: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

fn read(path: &Path) -> Result<String, CheckError> {
    std::fs::read_to_string(path).map_err(|source| CheckError::Io { path: path.to_owned(), source })
}

fn parse(path: &Path, text: &str) -> Result<Schema, CheckError> {
    Schema::parse_str(text).map_err(|e| CheckError::Parse { path: path.to_owned(), reason: e.to_string() })
}

/// Released versions of `topic` under `released_dir/<topic>/v<N>.avsc`, sorted by N.
pub fn released_versions(released_dir: &Path, topic: &str) -> Result<Vec<(String, PathBuf)>, CheckError> {
    let dir = released_dir.join(topic);
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let entries = std::fs::read_dir(&dir).map_err(|source| CheckError::Io { path: dir.clone(), source })?;
    let mut versions: Vec<(u32, String, PathBuf)> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter_map(|path| {
            let stem = path.file_stem()?.to_str()?.to_owned();
            let number = stem.strip_prefix('v')?.parse().ok()?;
            (path.extension()? == "avsc").then_some((number, stem, path))
        })
        .collect();
    versions.sort();
    Ok(versions.into_iter().map(|(_, stem, path)| (stem, path)).collect())
}

/// Checks `current` (the text of `schemas/<topic>.avsc`) against every released version.
pub fn check_topic(topic: &str, current_path: &Path, released_dir: &Path) -> Result<TopicReport, CheckError> {
    let current_text = read(current_path)?;
    let current = parse(current_path, &current_text)?;
    let mut report = TopicReport { topic: topic.to_owned(), ..TopicReport::default() };
    let versions = released_versions(released_dir, topic)?;
    for (version, path) in &versions {
        let old_text = read(path)?;
        let old = parse(path, &old_text)?;
        if let Some(reasons) = incompatibility(&old, &current) {
            report.breaks.push(Break { topic: topic.into(), version: version.clone(), direction: "backward", reasons });
        }
        if let Some(reasons) = incompatibility(&current, &old) {
            report.breaks.push(Break { topic: topic.into(), version: version.clone(), direction: "forward", reasons });
        }
    }
    report.versions = versions.iter().map(|(v, _)| v.clone()).collect();
    report.unreleased_changes = match versions.last() {
        Some((_, path)) => parse(path, &read(path)?)?.canonical_form() != current.canonical_form(),
        None => true,
    };
    Ok(report)
}

/// Why `reader` cannot read data written with `writer`, or `None` if it can.
pub fn incompatibility(writer: &Schema, reader: &Schema) -> Option<Vec<String>> {
    let error = SchemaCompatibility::can_read(writer, reader).err()?;
    let mut reasons = Vec::new();
    explain(writer, reader, "", &mut reasons);
    if reasons.is_empty() {
        reasons.push(error.to_string());
    }
    Some(reasons)
}

/// Walks matching records field by field and says which field breaks which rule.
fn explain(writer: &Schema, reader: &Schema, path: &str, reasons: &mut Vec<String>) {
    match (writer, reader) {
        (Schema::Record(w), Schema::Record(r)) => explain_record(w, r, path, reasons),
        (Schema::Array(w), Schema::Array(r)) => explain(&w.items, &r.items, &format!("{path}[]"), reasons),
        (Schema::Map(w), Schema::Map(r)) => explain(&w.types, &r.types, &format!("{path}{{}}"), reasons),
        _ => {
            if let Err(error) = SchemaCompatibility::can_read(writer, reader) {
                let at = if path.is_empty() { "the value".to_owned() } else { format!("field `{path}`") };
                reasons.push(format!("{at} changed from {} to {}: {error}", describe(writer), describe(reader)));
            }
        }
    }
}

fn explain_record(writer: &RecordSchema, reader: &RecordSchema, path: &str, reasons: &mut Vec<String>) {
    let join = |name: &str| {
        if path.is_empty() { name.to_owned() } else { format!("{path}.{name}") }
    };
    for field in &reader.fields {
        let matching = writer.fields.iter().find(|w| w.name == field.name || field.aliases.contains(&w.name));
        match matching {
            Some(w) => explain(&w.schema, &field.schema, &join(&field.name), reasons),
            None if field.default.is_none() => reasons.push(format!(
                "field `{}` exists only in the reading schema and has no default \
                 (rule: a field may be added or removed only if it has a default)",
                join(&field.name)
            )),
            None => {}
        }
    }
}

/// A short description of a schema's type for messages.
fn describe(schema: &Schema) -> String {
    let json = serde_json::to_value(schema).unwrap_or_default();
    let text = match &json {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Object(o) => match (o.get("logicalType"), o.get("type"), o.get("name")) {
            (Some(logical), _, _) => logical.as_str().unwrap_or_default().to_owned(),
            (None, Some(t), Some(name)) => {
                format!("{} {}", t.as_str().unwrap_or_default(), name.as_str().unwrap_or_default())
            }
            (None, Some(t), None) => t.to_string(),
            _ => json.to_string(),
        },
        other => other.to_string(),
    };
    text.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: &str = r#"{"type":"record","name":"Payment","namespace":"t","fields":[
        {"name":"payment_id","type":"string"},
        {"name":"attempt","type":"int"},
        {"name":"note","type":["null","string"],"default":null}]}"#;

    fn schema(text: &str) -> Schema {
        Schema::parse_str(text).unwrap()
    }

    fn full_transitive(old: &str, new: &str) -> Vec<String> {
        let (old, new) = (schema(old), schema(new));
        let mut reasons = incompatibility(&old, &new).unwrap_or_default();
        reasons.extend(incompatibility(&new, &old).unwrap_or_default());
        reasons
    }

    #[test]
    fn removing_a_field_without_a_default_is_refused_and_named() {
        let v2 = V1.replace(r#"{"name":"attempt","type":"int"},"#, "");
        let reasons = full_transitive(V1, &v2);
        assert_eq!(reasons.len(), 1, "{reasons:?}");
        assert!(reasons[0].contains("field `attempt`") && reasons[0].contains("has no default"), "{reasons:?}");
    }

    #[test]
    fn changing_a_field_type_is_refused_and_named() {
        let v2 = V1.replace(r#""name":"attempt","type":"int""#, r#""name":"attempt","type":"string""#);
        let reasons = full_transitive(V1, &v2);
        assert!(!reasons.is_empty());
        assert!(reasons.iter().all(|r| r.contains("field `attempt` changed from")), "{reasons:?}");
    }

    #[test]
    fn adding_an_optional_field_with_a_default_passes() {
        let v2 = V1.replace(
            r#"{"name":"note""#,
            r#"{"name":"method","type":["null","string"],"default":null},{"name":"note""#,
        );
        assert_eq!(full_transitive(V1, &v2), Vec::<String>::new());
    }

    #[test]
    fn widening_int_to_long_is_backward_but_not_forward_compatible() {
        let v2 = V1.replace(r#""name":"attempt","type":"int""#, r#""name":"attempt","type":"long""#);
        let (old, new) = (schema(V1), schema(&v2));
        assert!(incompatibility(&old, &new).is_none(), "a long reader reads int data");
        assert!(incompatibility(&new, &old).is_some(), "an int reader cannot read long data");
    }
}
