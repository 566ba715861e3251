//! `tributary trace` on the real stack: a threshold crossing's story through billing-router,
//! read back from every topic by its correlation id, in time order, with its trace id.

use std::collections::BTreeSet;

use tokio::process::Command;
use tributary_contracts::types::{CrmAccountUpdate, ErpPosting, OverageCharge};
use tributary_tests::workspace_binary;

use crate::billing_router::{Router, accounts};

async fn trace(world: &Router, args: &[&str]) -> (bool, String, String) {
    let output = Command::new(workspace_binary("tributary"))
        .args(["--bootstrap-servers", &world.stack.bootstrap, "--registry-url", &world.stack.registry_url])
        .args(["--topic-prefix", &world.prefix, "trace"])
        .args(args)
        .output()
        .await
        .expect("run tributary trace");
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    (output.status.success(), text(&output.stdout), text(&output.stderr))
}

#[tokio::test]
async fn a_story_is_read_back_from_every_topic_in_time_order_by_its_correlation_id() {
    let world = Router::new();
    let contracts = world.publish_master_data(&accounts("acct-trace", 2)).await;
    let service = world.start().await;
    let crossing = world.crossing(&contracts[0], 100, "1010");
    let other = world.crossing(&contracts[1], 100, "1200");
    world.produce(&[crossing.clone(), other]).await;
    world.wait_for::<OverageCharge>(2).await;
    world.wait_for::<ErpPosting>(2).await;
    world.wait_for::<CrmAccountUpdate>(2).await;
    service.stop().await.expect("clean stop");

    let correlation = crossing.envelope.correlation_id.clone();
    let (ok, out, err) = trace(&world, &[&correlation, "--json"]).await;
    assert!(ok, "{err}");
    let steps: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let topics: Vec<&str> = steps.iter().map(|s| s["topic"].as_str().unwrap()).collect();
    assert_eq!(topics[0], "usage.thresholds", "the crossing first: {topics:?}");
    let found: BTreeSet<&str> = topics.iter().copied().collect();
    let expected: BTreeSet<&str> =
        ["usage.thresholds", "billing.charges", "erp.postings", "crm.account-updates"].into();
    assert_eq!(found, expected, "{topics:?}");
    assert!(steps.iter().all(|s| s["value"]["envelope"]["correlation_id"] == correlation.as_str()));
    assert!(
        steps.iter().all(|s| s["key"] == contracts[0].envelope.account_id.as_str()),
        "the other account is not in it"
    );
    // The crossing was produced without a traceparent: whatever trace the records carry, it
    // is one (the runtime's trace propagation has its own test in runtime.rs).
    let traces: BTreeSet<&str> = steps.iter().filter_map(|s| s["trace_id"].as_str()).collect();
    assert!(traces.len() <= 1, "one trace at most: {traces:?}");

    let (ok, timeline, _) = trace(&world, &[&correlation]).await;
    assert!(ok);
    let lines: Vec<&str> = timeline.lines().collect();
    assert_eq!(lines.len(), steps.len());
    assert!(lines.iter().any(|l| l.contains("billing-router") && l.contains("charge USD 1")), "{timeline}");
    assert!(lines.iter().any(|l| l.contains("INVOICE tributary:charge:")), "{timeline}");

    let (ok, _, err) = trace(&world, &["no-such-correlation-id"]).await;
    assert!(!ok && err.contains("no record carries correlation id"), "{err}");
}
