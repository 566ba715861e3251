fn main() -> std::process::ExitCode {
    tributary_runtime::service::main::<erp_poster::App>()
}
