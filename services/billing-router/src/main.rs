fn main() -> std::process::ExitCode {
    tributary_runtime::service::main::<billing_router::App>()
}
