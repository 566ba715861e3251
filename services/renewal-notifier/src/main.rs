fn main() -> std::process::ExitCode {
    tributary_runtime::service::main::<renewal_notifier::App>()
}
