//! Usage sent the way a platform sends it: with the CloudEvents Python SDK
//! (`tests/python/cloudevents_client.py`), nothing of Tributary's building the requests.

use serde_json::{Value, json};

use crate::{python, unique_name, workspace_file};

/// What usage-ingest answered one request.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The HTTP status.
    pub status: u16,
    /// The `Content-Type` of the answer.
    pub content_type: String,
    /// The body, as JSON.
    pub body: Value,
}

/// Sends `requests` (cloudevents_client.py's plan: mode, events, headers, drop, body) to `url`
/// with `key`, in order, and returns the answers.
pub async fn send(url: &str, key: &str, requests: Value) -> Vec<Answer> {
    let plan = std::env::temp_dir().join(format!("{}.json", unique_name("cloudevents-plan")));
    std::fs::write(&plan, json!({"url": url, "key": key, "requests": requests}).to_string()).expect("write the plan");
    let output = tokio::process::Command::new(python())
        .arg(workspace_file("tests/python/cloudevents_client.py"))
        .arg(&plan)
        .output()
        .await
        .expect("run cloudevents_client.py");
    let _ = std::fs::remove_file(&plan);
    assert!(output.status.success(), "cloudevents_client.py failed:\n{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| {
            let answer: Value = serde_json::from_str(line).expect("one JSON answer per line");
            Answer {
                status: answer["status"].as_u64().expect("a status") as u16,
                content_type: answer["content_type"].as_str().unwrap_or_default().to_owned(),
                body: answer["body"].clone(),
            }
        })
        .collect()
}
