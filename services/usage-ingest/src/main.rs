fn main() -> std::process::ExitCode {
    tributary_runtime::service::main::<usage_ingest::App>()
}
