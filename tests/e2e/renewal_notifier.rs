//! renewal-notifier on the real stack, time driven by the controlled clock: milestones fire
//! once across restarts, with the risk signals of what the account did, and a Standard
//! Webhooks receiver verifies and receives each notification once.

use std::time::Duration;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use rand::Rng as _;
use renewal_notifier::{App, Settings};
use tokio::process::Command;
use tributary_contracts::codec::Codec;
use tributary_contracts::fixtures;
use tributary_contracts::topics;
use tributary_contracts::types::{
    Contract, EntitlementChanged, EntitlementState, Envelope, RenewalNotification, RiskLevel, RiskSignalKind,
    TransitionReason,
};
use tributary_outbound::EndpointSettings;
use tributary_runtime::ServiceConfig;
use tributary_runtime::clock::ClockMode;
use tributary_runtime::service::RunningService;
use tributary_tests::kafka::{Read, codec, produce, produce_keyed, producer, read_to_end};
use tributary_tests::webhook::Receiver;
use tributary_tests::{Stack, eventually, stack, unique_name, workspace_binary};

struct Notifier {
    stack: &'static Stack,
    prefix: String,
    group: String,
    codec: Codec,
}

impl Notifier {
    fn new() -> Self {
        let stack = stack();
        let prefix = format!("{}.", unique_name("rn"));
        Self { stack, codec: codec(stack, &prefix), group: unique_name("renewal-notifier"), prefix }
    }

    fn config(&self, receiver: &Receiver, secret: &str) -> ServiceConfig<Settings> {
        let mut config = self.stack.service_config::<Settings>("renewal-notifier");
        config.kafka.group_id = Some(self.group.clone());
        config.kafka.transactional_id_prefix = Some(self.group.clone());
        config.kafka.topic_prefix = self.prefix.clone();
        config.runtime.instance_id = "rn-0".into();
        config.runtime.clock = ClockMode::Controlled;
        // Every few seconds of the clock: the CLI's advance is picked up by the next sweep.
        config.service.schedule_check_every = Duration::from_secs(2);
        config.service.delivery.endpoints = vec![EndpointSettings {
            name: "customer-success".into(),
            topic: topics::RENEWAL_NOTIFICATIONS.into(),
            url: receiver.url(),
            secrets: vec![secret.to_owned()],
            timeout: Duration::from_secs(5),
            retry_schedule: [1, 1, 2, 2, 5, 5, 10, 10, 10, 10].map(Duration::from_secs).to_vec(),
            ..EndpointSettings::default()
        }];
        config
    }

    async fn start(&self, config: ServiceConfig<Settings>) -> RunningService {
        tributary_tests::spawn_ready::<App>(config).await
    }

    fn topic(&self, topic: &str) -> String {
        format!("{}{topic}", self.prefix)
    }

    async fn notifications(&self) -> Vec<RenewalNotification> {
        let records: Vec<Read<RenewalNotification>> =
            read_to_end(self.stack, &self.codec, &self.topic(topics::RENEWAL_NOTIFICATIONS)).await;
        records.into_iter().map(|r| r.value.expect("every record decodes")).collect()
    }

    async fn wait_for(&self, count: usize, what: &str) -> Vec<RenewalNotification> {
        eventually(Duration::from_secs(60), what, || async {
            let notifications = self.notifications().await;
            (notifications.len() >= count).then_some(notifications)
        })
        .await
    }

    async fn clock(&self, args: &[&str]) {
        let output = Command::new(workspace_binary("tributary"))
            .args(["--bootstrap-servers", &self.stack.bootstrap, "--topic-prefix", &self.prefix, "clock"])
            .args(args)
            .output()
            .await
            .expect("run tributary clock");
        assert!(output.status.success(), "tributary clock {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    }
}

/// Today's date (UTC) plus `days`, as days since the epoch.
fn in_days(days: i64) -> i32 {
    ((Utc::now() + chrono::Duration::days(days)).timestamp_millis().div_euclid(86_400_000)) as i32
}

#[tokio::test]
async fn milestones_fire_once_across_restarts_with_their_signals_and_reach_the_receiver_once() {
    let world = Notifier::new();
    let key: [u8; 32] = rand::rng().random();
    let secret = format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode(key));
    let receiver = Receiver::start(&secret).await;

    // Renews in 100 days (90-day milestone in 10), 30 days' notice; the account is suspended.
    let term_start: DateTime<Utc> = Utc::now() - chrono::Duration::days(265);
    let mut contract: Contract = fixtures::contract("acct-renew", "plan", "EUR", "api_calls", "1000", term_start);
    contract.renewal_date = in_days(100);
    let producer = producer(world.stack);
    let keyed = vec![(contract.contract_id.clone(), contract.clone())];
    produce_keyed(&producer, &world.codec, &world.topic(topics::REFDATA_CONTRACTS), &keyed).await;
    let suspension = EntitlementChanged {
        envelope: Envelope::originating("tributary.entitlement-watcher", "acct-renew", Utc::now()),
        from_state: Some(EntitlementState::Grace),
        to_state: EntitlementState::Suspended,
        reason: TransitionReason::GraceExpired,
        reason_detail: None,
        grace_ends_at: None,
        subscription_id: None,
        contract_id: Some(contract.contract_id.clone()),
        invoice_id: None,
        payment_id: None,
        outstanding_amount: Some(fixtures::dec("250")),
        currency: Some("EUR".into()),
    };
    produce(&producer, &world.codec, &world.topic(topics::ENTITLEMENT_CHANGES), &[suspension]).await;

    let config = world.config(&receiver, &secret);
    let service = world.start(config.clone()).await;
    // The suspension is 100 days before renewal, outside the 90-day window: nothing yet.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(world.notifications().await.is_empty(), "no milestone 100 days before");
    service.stop().await.expect("clean stop");

    // Stopped while the 90-day milestone passes; restarted, it fires once.
    world.clock(&["advance", "11d"]).await;
    let service = world.start(config.clone()).await;
    let notifications = world.wait_for(1, "the 90-day milestone").await;
    let ninety = &notifications[0];
    assert_eq!(ninety.milestone_days, 90);
    assert_eq!(ninety.days_until_renewal, 89);
    assert_eq!(ninety.risk_level, RiskLevel::High);
    assert_eq!(ninety.risk_signals[0].kind, RiskSignalKind::AccountSuspended);
    service.stop().await.expect("clean stop");

    // Restarted without a move of the clock: nothing again. Then the 60-day milestone.
    let service = world.start(config.clone()).await;
    tokio::time::sleep(Duration::from_secs(5)).await; // two sweeps: nothing may fire again
    assert_eq!(world.notifications().await.len(), 1, "the 90-day milestone once");
    world.clock(&["advance", "30d"]).await;
    let notifications = world.wait_for(2, "the 60-day milestone").await;
    assert_eq!(notifications.iter().map(|n| n.milestone_days).collect::<Vec<_>>(), vec![90, 60]);

    // The receiver verified and got each once, in order.
    let deliveries = eventually(Duration::from_secs(60), "two verified deliveries", || async {
        let deliveries = receiver.deliveries();
        (deliveries.len() >= 2).then_some(deliveries)
    })
    .await;
    let days: Vec<serde_json::Value> = deliveries.iter().map(|d| d.body["data"]["milestone_days"].clone()).collect();
    assert_eq!(days, vec![serde_json::json!(90), serde_json::json!(60)], "{deliveries:?}");
    assert!(receiver.refusals().is_empty(), "{:?}", receiver.refusals());
    service.stop().await.expect("clean stop");
}
