//! Generates the Rust types of every event contract from `schemas/*.avsc`, the single source of
//! truth (DESIGN.md, "Contracts"), with rsgen-avro.
//!
//! Each `.avsc` is self-contained, so shared named types (the envelope) are defined in every
//! file; rsgen-avro emits each name once. Decimal fields are generated as `apache_avro::Decimal`,
//! which knows no scale; they are rewritten to [`crate::decimal::Decimal6`], which carries our
//! fixed scale of 6 and converts to and from `rust_decimal`.

use std::path::{Path, PathBuf};

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let schemas_dir = manifest.join("../../schemas");
    println!("cargo::rerun-if-changed={}", schemas_dir.display());

    let mut files: Vec<PathBuf> = std::fs::read_dir(&schemas_dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", schemas_dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "avsc"))
        .collect();
    files.sort();
    let schemas: Vec<rsgen_avro::Schema> = files.iter().map(|path| parse(path)).collect();

    let generator = rsgen_avro::Generator::builder().build().expect("rsgen-avro generator");
    let mut code = Vec::new();
    generator
        .generate(&rsgen_avro::Source::Schemas(&schemas), &mut code)
        .expect("generating Rust types from schemas/*.avsc");
    let code = String::from_utf8(code)
        .expect("generated code is UTF-8")
        .replace("apache_avro::Decimal", "crate::decimal::Decimal6");

    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("contracts.rs");
    std::fs::write(&out, code).unwrap_or_else(|e| panic!("writing {}: {e}", out.display()));
}

fn parse(path: &Path) -> rsgen_avro::Schema {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    rsgen_avro::Schema::parse_str(&text)
        .unwrap_or_else(|e| panic!("{} is not a valid Avro schema: {e}", path.display()))
}
