fn main() -> std::process::ExitCode {
    tributary_runtime::service::main::<entitlement_watcher::App>()
}
