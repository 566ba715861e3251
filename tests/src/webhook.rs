//! A real HTTP webhook receiver for the e2e tests: `tests/python/webhook_receiver.py`, which
//! verifies every request with the Standard Webhooks project's own Python library.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value as Json;

use crate::{eventually, python, unique_name, workspace_file};

/// A delivery the receiver verified.
#[derive(Debug, Clone)]
pub struct Received {
    /// `webhook-id`.
    pub id: String,
    /// `webhook-timestamp`.
    pub timestamp: i64,
    /// `Content-Type`.
    pub content_type: String,
    /// The body, parsed.
    pub body: Json,
    /// What the receiver answered.
    pub status: u16,
    /// When it arrived (Unix seconds, the receiver's clock).
    pub received_at: f64,
}

/// The receiver process.
#[derive(Debug)]
pub struct Receiver {
    secret: String,
    dir: tempfile::TempDir,
    port: u16,
    child: Option<tokio::process::Child>,
}

impl Receiver {
    /// A receiver on a free port, verifying with `secret`.
    pub async fn start(secret: &str) -> Self {
        let dir = tempfile::Builder::new().prefix(&unique_name("webhooks")).tempdir().expect("a temp dir");
        let mut receiver = Self { secret: secret.to_owned(), dir, port: 0, child: None };
        receiver.spawn().await;
        receiver
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("received.jsonl")
    }

    async fn spawn(&mut self) {
        let port_file = self.dir.path().join("port");
        let _ = std::fs::remove_file(&port_file);
        let child = tokio::process::Command::new(python())
            .arg(workspace_file("tests/python/webhook_receiver.py"))
            .args(["serve", "--secret", &self.secret, "--port", &self.port.to_string()])
            .arg("--port-file")
            .arg(&port_file)
            .arg("--log")
            .arg(self.log())
            .kill_on_drop(true)
            .spawn()
            .expect("start webhook_receiver.py");
        self.child = Some(child);
        self.port = eventually(Duration::from_secs(30), "the webhook receiver to listen", || async {
            std::fs::read_to_string(&port_file).ok().and_then(|text| text.trim().parse().ok())
        })
        .await;
    }

    /// Where it listens.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hooks", self.port)
    }

    /// Every delivery it verified, in the order received.
    pub fn deliveries(&self) -> Vec<Received> {
        self.entries("delivery")
            .into_iter()
            .map(|entry| Received {
                id: entry["id"].as_str().expect("an id").to_owned(),
                timestamp: entry["timestamp"].as_str().and_then(|t| t.parse().ok()).expect("a timestamp"),
                content_type: entry["content_type"].as_str().unwrap_or_default().to_owned(),
                body: serde_json::from_str(entry["body"].as_str().expect("a body")).expect("a JSON body"),
                status: entry["status"].as_u64().expect("a status") as u16,
                received_at: entry["received_at"].as_f64().expect("a receipt time"),
            })
            .collect()
    }

    /// Why the library refused requests, if it refused any.
    pub fn refusals(&self) -> Vec<String> {
        self.entries("refused").iter().map(|e| e["reason"].as_str().unwrap_or_default().to_owned()).collect()
    }

    fn entries(&self, kind: &str) -> Vec<Json> {
        std::fs::read_to_string(self.log())
            .unwrap_or_default()
            .lines()
            .filter_map(|line| serde_json::from_str::<Json>(line).ok())
            .filter(|entry| entry["kind"] == kind)
            .collect()
    }

    /// Answers later deliveries with `status`.
    pub async fn answer_with(&self, status: u16) {
        let answer = reqwest::Client::new()
            .post(format!("http://127.0.0.1:{}/_mode", self.port))
            .body(status.to_string())
            .send()
            .await
            .expect("the receiver answers");
        assert!(answer.status().is_success());
    }

    /// Stops the process: connections are refused until [`start_again`](Self::start_again).
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.expect("kill the receiver");
        }
    }

    /// Starts it again on the same port, with the same log.
    pub async fn start_again(&mut self) {
        self.spawn().await;
    }

    /// The library's verdict on the first delivery as received, on it with one byte of the body
    /// changed, and on it verified ten minutes after it was sent.
    pub fn check_first_delivery(&self) -> Json {
        let output = std::process::Command::new(python())
            .arg(workspace_file("tests/python/webhook_receiver.py"))
            .args(["check", "--secret", &self.secret])
            .arg("--log")
            .arg(self.log())
            .output()
            .expect("run webhook_receiver.py check");
        assert!(output.status.success(), "check failed: {}", String::from_utf8_lossy(&output.stderr));
        serde_json::from_slice(&output.stdout).expect("the check prints JSON")
    }
}
