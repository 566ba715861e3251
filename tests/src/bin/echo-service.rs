//! The echo test service as a process, for tests that kill it (see `tributary_tests::echo`).

fn main() -> std::process::ExitCode {
    tributary_runtime::service::main::<tributary_tests::echo::EchoService>()
}
