//! Every service has the same shape: it starts, reports ready, serves metrics, and stops
//! cleanly on SIGTERM.

use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tributary_tests::{eventually, stack};

async fn get(url: &str) -> Option<(u16, String)> {
    let response = reqwest::get(url).await.ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().await.ok()?))
}

#[tokio::test]
async fn a_service_binary_reports_ready_serves_metrics_and_exits_0_on_sigterm() {
    let stack = stack();
    let binary = tributary_tests::workspace_binary("usage-ingest");
    let addresses = tempfile::tempdir().unwrap();
    let addresses_file = addresses.path().join("addresses.json");
    let mut child = tokio::process::Command::new(&binary)
        .envs(stack.service_env())
        .arg("--addresses-file")
        .arg(&addresses_file)
        .env("TRIBUTARY__ADMIN__LISTEN", "127.0.0.1:0")
        .env("TRIBUTARY_CONFIG", tributary_tests::workspace_file("deploy/config/usage-ingest.toml"))
        .env("TRIBUTARY__USAGE_INGEST__HTTP__LISTEN", "127.0.0.1:0")
        .env("TRIBUTARY__KAFKA__TOPIC_PREFIX", format!("{}.", tributary_tests::unique_name("shape")))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start usage-ingest");

    // Every listener is on port 0: the binary says where it bound them.
    let bound: serde_json::Value = eventually(Duration::from_secs(60), "the addresses file", || async {
        std::fs::read(&addresses_file).ok().and_then(|bytes| serde_json::from_slice(&bytes).ok())
    })
    .await;
    let admin = format!("http://{}", bound["admin"].as_str().expect("the admin address"));
    assert!(bound["http"].as_str().is_some_and(|http| !http.ends_with(":0")), "the HTTP port is reported: {bound}");
    eventually(Duration::from_secs(60), "the service to report ready", || async {
        get(&format!("{admin}/health/ready")).await.filter(|(status, _)| *status == 200)
    })
    .await;
    let (status, metrics) = get(&format!("{admin}/metrics")).await.expect("metrics");
    assert_eq!(status, 200);
    assert!(metrics.contains(r#"tributary_service_info{service="usage-ingest""#), "{metrics}");
    assert!(metrics.contains("tributary_usage_ingest_contracts "), "the service's own metrics too: {metrics}");

    let pid = Pid::from_raw(child.id().expect("running") as i32);
    kill(pid, Signal::SIGTERM).expect("send SIGTERM");
    // A bound on the wait, so that a hung shutdown fails the test instead of hanging it.
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the service exits after SIGTERM")
        .expect("wait");
    assert_eq!(status.code(), Some(0), "clean exit after SIGTERM");
}

#[tokio::test]
async fn a_service_runs_in_process_and_stops_when_asked() {
    let stack = stack();
    let mut config = stack.service_config::<usage_ingest::Settings>("shape");
    config.kafka.topic_prefix = format!("{}.", tributary_tests::unique_name("shape"));
    config.service.http.enabled = false;
    let service = tributary_runtime::service::spawn::<usage_ingest::App>(config).await.expect("spawn");
    let ready_url = format!("http://{}/health/ready", service.admin_addr);
    eventually(Duration::from_secs(30), "readiness", || async {
        get(&ready_url).await.filter(|(status, _)| *status == 200)
    })
    .await;
    service.stop().await.expect("clean stop");
    assert!(get(&ready_url).await.is_none(), "the admin port is closed after stop");
}
