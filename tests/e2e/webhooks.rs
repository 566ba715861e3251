//! Outbound webhooks on the real stack, to a real HTTP receiver that verifies with the Standard
//! Webhooks project's own library: billing-router's CRM updates delivered once and verified,
//! forgeries refused by the library, a receiver down for a while served in order once it
//! returns, a 410 never retried and dead-lettered (and a replay delivering it again with the
//! same id), and SIGKILLs of the binary redelivering only what was not acknowledged.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use base64::Engine as _;
use billing_router::Settings;
use chrono::Utc;
use rand::Rng as _;
use tributary_contracts::codec::contract_to_json;
use tributary_contracts::samples::{Fill, typed};
use tributary_contracts::topics;
use tributary_contracts::types::{CrmAccountUpdate, CrmUpdateKind, DeliveryOutcome, Envelope, WebhookDeliveryAttempt};
use tributary_outbound::relay::delivery_id;
use tributary_outbound::{EndpointSettings, relay_service};
use tributary_runtime::ServiceConfig;
use tributary_runtime::dlq::{self, ReplayFilter};
use tributary_runtime::service::RunningService;
use tributary_tests::webhook::{Received, Receiver};
use tributary_tests::{eventually, unique_name, workspace_binary};

use crate::billing_router::{Router, accounts};

const ENDPOINT: &str = "crm";

/// One test's world: billing-router's (topics under a unique prefix, its own group) and a
/// receiver with a fresh secret.
struct Hooks {
    router: Router,
    receiver: Receiver,
    secret: String,
    seed: std::cell::Cell<i64>,
}

impl Hooks {
    async fn new() -> Self {
        let key: [u8; 32] = rand::rng().random();
        let secret = format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode(key));
        let receiver = Receiver::start(&secret).await;
        Self { router: Router::new(), receiver, secret, seed: std::cell::Cell::new(0) }
    }

    /// The CRM endpoint: the receiver, retries every second or two for about two minutes.
    fn endpoint(&self) -> EndpointSettings {
        EndpointSettings {
            name: ENDPOINT.into(),
            topic: topics::CRM_ACCOUNT_UPDATES.into(),
            url: self.receiver.url(),
            secrets: vec![self.secret.clone()],
            timeout: Duration::from_secs(5),
            retry_schedule: [1, 1, 2, 2, 5, 5, 10, 10, 10, 10, 10, 10, 10, 10].map(Duration::from_secs).to_vec(),
            failures_to_open: 3,
            open_for: Duration::from_secs(2),
            ..EndpointSettings::default()
        }
    }

    fn config(&self) -> ServiceConfig<Settings> {
        let mut config = self.router.config();
        config.service.delivery.endpoints = vec![self.endpoint()];
        config
    }

    async fn start(&self) -> RunningService {
        self.router.start_with(self.config()).await
    }

    /// A CRM update of `account` as billing-router writes them (published straight to the
    /// topic, so that a test chooses how many and for whom).
    fn update(&self, account: &str) -> CrmAccountUpdate {
        self.seed.set(self.seed.get() + 1);
        let mut update: CrmAccountUpdate = typed(Fill::Full, self.seed.get());
        update.envelope = Envelope::originating("tributary.billing-router", account, Utc::now());
        update.kind = CrmUpdateKind::OverageCharged;
        update.summary = format!("update {}", self.seed.get());
        update
    }

    async fn deliveries_until(&self, what: &str, done: impl Fn(&[Received]) -> bool) -> Vec<Received> {
        eventually(Duration::from_secs(120), what, || async {
            let received = self.receiver.deliveries();
            done(&received).then_some(received)
        })
        .await
    }

    async fn attempts(&self) -> Vec<WebhookDeliveryAttempt> {
        self.router.read::<WebhookDeliveryAttempt>().await
    }

    fn relay_dlq(&self) -> String {
        relay_service(billing_router::NAME, ENDPOINT)
    }
}

fn id_of(update: &CrmAccountUpdate) -> String {
    delivery_id(ENDPOINT, topics::CRM_ACCOUNT_UPDATES, &update.envelope.event_id)
}

#[tokio::test]
async fn a_crm_update_is_delivered_once_and_the_libraries_verifier_accepts_it_and_refuses_forgeries() {
    let hooks = Hooks::new().await;
    let contracts = hooks.router.publish_master_data(&accounts("acct-hook", 1)).await;
    let service = hooks.start().await;
    hooks.router.produce(&[hooks.router.crossing(&contracts[0], 80, "800")]).await;
    hooks.router.produce(&[hooks.router.crossing(&contracts[0], 100, "1010")]).await;
    // The 80 % crossing is a USAGE_THRESHOLD update, the 100 % one an OVERAGE_CHARGED one.
    let updates = hooks.router.wait_for::<CrmAccountUpdate>(2).await;
    let received = hooks.deliveries_until("both updates delivered", |r| r.len() >= 2).await;
    assert_eq!(
        received.iter().map(|r| r.id.clone()).collect::<Vec<_>>(),
        updates.iter().map(id_of).collect::<Vec<_>>()
    );
    for (delivery, update) in received.iter().zip(&updates) {
        assert!(delivery.content_type.starts_with("application/cloudevents+json"), "{}", delivery.content_type);
        assert_eq!(delivery.body["specversion"], "1.0");
        assert_eq!(delivery.body["id"], update.envelope.event_id.as_str());
        assert_eq!(delivery.body["type"], "io.tributary.crm.CrmAccountUpdate");
        assert_eq!(delivery.body["source"], "tributary.billing-router");
        assert_eq!(delivery.body["data"], contract_to_json(update).unwrap(), "the record as tap prints it");
        assert!((delivery.timestamp - Utc::now().timestamp()).abs() < 300, "the timestamp is the wall clock's");
    }
    assert!(hooks.receiver.refusals().is_empty(), "{:?}", hooks.receiver.refusals());

    let verdicts = hooks.receiver.check_first_delivery();
    assert_eq!(verdicts["original"], "accepted");
    assert_eq!(verdicts["tampered_body"], "No matching signature found");
    assert_eq!(verdicts["replayed_later"], "Message timestamp too old");

    let attempts = eventually(Duration::from_secs(30), "two attempts recorded", || async {
        Some(hooks.attempts().await).filter(|a| a.len() >= 2)
    })
    .await;
    for (attempt, delivery) in attempts.iter().zip(&received) {
        assert_eq!((attempt.outcome, attempt.status_code, attempt.attempt), (DeliveryOutcome::Delivered, Some(200), 1));
        assert_eq!(attempt.delivery_id, delivery.id);
        assert_eq!(attempt.endpoint, ENDPOINT);
    }

    // A restart sends nothing again: the relay's offsets were committed with its records.
    service.stop().await.expect("clean stop");
    let service = hooks.start().await;
    hooks.router.produce(&[hooks.router.crossing(&contracts[0], 120, "1200")]).await;
    let received = hooks.deliveries_until("the 120 % update delivered", |r| r.len() >= 3).await;
    service.stop().await.expect("clean stop");
    let ids: BTreeSet<&str> = received.iter().map(|r| r.id.as_str()).collect();
    assert_eq!((received.len(), ids.len()), (3, 3), "each update once");
}

#[tokio::test]
async fn a_receiver_down_for_a_while_gets_every_record_once_after_it_returns_in_order_per_account() {
    let mut hooks = Hooks::new().await;
    let service = hooks.start().await;
    hooks.receiver.stop().await;
    let names = accounts("acct-down", 5);
    let mut updates = Vec::new();
    for round in 0..6 {
        for name in &names {
            let _ = round;
            updates.push(hooks.update(name));
        }
    }
    hooks.router.produce(&updates).await;
    // The relay has seen the endpoint down: failed attempts, then its circuit opened.
    eventually(Duration::from_secs(60), "failed attempts while the receiver is down", || async {
        let attempts = hooks.attempts().await;
        (attempts.iter().filter(|a| a.outcome == DeliveryOutcome::RetryScheduled).count() >= 3).then_some(())
    })
    .await;
    let failures = hooks.attempts().await;
    assert!(
        failures
            .iter()
            .all(|a| a.status_code.is_none() && a.error.as_deref().is_some_and(|e| e.contains("connection"))),
        "{failures:?}"
    );
    hooks.receiver.start_again().await;

    let received = hooks.deliveries_until("all 30 updates delivered", |r| r.len() >= 30).await;
    tokio::time::sleep(Duration::from_secs(2)).await; // anything sent twice would arrive now
    let received_again = hooks.receiver.deliveries();
    service.stop().await.expect("clean stop");
    assert_eq!(received_again.len(), received.len(), "nothing more arrived");
    let ids: Vec<String> = received.iter().map(|r| r.id.clone()).collect();
    let unique: BTreeSet<&String> = ids.iter().collect();
    assert_eq!((ids.len(), unique.len()), (30, 30), "every record once");
    let expected: BTreeSet<String> = updates.iter().map(id_of).collect();
    assert_eq!(unique.into_iter().cloned().collect::<BTreeSet<_>>(), expected);
    // Per account, in the order written.
    let position: BTreeMap<String, usize> = ids.iter().enumerate().map(|(i, id)| (id.clone(), i)).collect();
    for name in &names {
        let order: Vec<usize> =
            updates.iter().filter(|u| &u.envelope.account_id == name).map(|u| position[&id_of(u)]).collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{name}: delivered out of order: {order:?}");
    }
    let delivered = hooks.attempts().await.iter().filter(|a| a.outcome == DeliveryOutcome::Delivered).count();
    assert_eq!(delivered, 30, "one DELIVERED record per update");
}

#[tokio::test]
async fn a_receiver_answering_410_gets_no_retry_the_record_is_in_the_relays_dlq_and_a_replay_delivers_it() {
    let hooks = Hooks::new().await;
    let service = hooks.start().await;
    hooks.receiver.answer_with(410).await;
    let gone = hooks.update("acct-gone");
    hooks.router.produce(std::slice::from_ref(&gone)).await;
    let kafka = hooks.config().kafka;
    let letters = eventually(Duration::from_secs(60), "the refused delivery in the relay's DLQ", || async {
        Some(dlq::list(&kafka, &hooks.relay_dlq()).await.unwrap()).filter(|l| !l.is_empty())
    })
    .await;
    let letter = letters[0].letter.as_ref().expect("dlq headers");
    assert_eq!((letter.class.as_str(), letter.attempts), ("webhook_refused", 1));
    assert!(letter.message.contains("HTTP 410") && letter.message.contains("endpoint retired"), "{}", letter.message);

    // Later records go on (and prove the relay moved past the refused one without retrying it).
    hooks.receiver.answer_with(200).await;
    let next = hooks.update("acct-gone");
    hooks.router.produce(std::slice::from_ref(&next)).await;
    let received = hooks.deliveries_until("the next update", |r| r.iter().any(|d| d.id == id_of(&next))).await;
    assert_eq!(received.iter().filter(|d| d.id == id_of(&gone)).count(), 1, "the 410 was not retried");
    let refused: Vec<_> = hooks.attempts().await.into_iter().filter(|a| a.delivery_id == id_of(&gone)).collect();
    assert_eq!(refused.len(), 1);
    assert_eq!((refused[0].outcome, refused[0].status_code), (DeliveryOutcome::Refused, Some(410)));

    // The endpoint is back: the operator replays the DLQ, and the same delivery arrives.
    let report = dlq::replay(&kafka, &hooks.relay_dlq(), &ReplayFilter::default(), None, false).await.unwrap();
    assert_eq!(report.selected, 1);
    let received = hooks
        .deliveries_until("the replayed delivery", |r| r.iter().filter(|d| d.id == id_of(&gone)).count() == 2)
        .await;
    service.stop().await.expect("clean stop");
    let both: Vec<&Received> = received.iter().filter(|d| d.id == id_of(&gone)).collect();
    assert_eq!(both[0].body, both[1].body, "the same delivery: same id, same body");
    assert_eq!(both[1].status, 200);
}

#[tokio::test]
async fn sigkills_during_delivery_redeliver_only_what_was_not_acknowledged_with_the_same_ids() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;

    let hooks = Hooks::new().await;
    let names = accounts("acct-kill", 6);
    let updates: Vec<CrmAccountUpdate> = (0..150).map(|n| hooks.update(&names[n % names.len()])).collect();
    let feeder = tributary_tests::kafka::trickle(
        hooks.router.stack,
        hooks.router.codec.clone(),
        hooks.router.topic(topics::CRM_ACCOUNT_UPDATES),
        updates.iter().map(|u| (u.envelope.account_id.clone(), u.clone())).collect(),
        2,
        Duration::from_millis(300),
    );
    let config_file = std::env::temp_dir().join(format!("{}.toml", unique_name("billing-router-hooks")));
    std::fs::write(
        &config_file,
        format!(
            "[billing_router]\ndefault_overage_product = \"USAGE-OVERAGE\"\n\n[[billing_router.delivery.endpoints]]\n\
             name = \"{ENDPOINT}\"\ntopic = \"crm.account-updates\"\nurl = \"{}\"\nsecrets_env = \"CRM_WEBHOOK_SECRETS\"\n\
             retry_schedule = [\"1s\", \"2s\", \"5s\", \"10s\", \"10s\", \"10s\"]\n",
            hooks.receiver.url()
        ),
    )
    .unwrap();
    let router = &hooks.router;
    let spawn_binary = || {
        tokio::process::Command::new(workspace_binary("billing-router"))
            .envs(router.stack.service_env())
            .env("CRM_WEBHOOK_SECRETS", &hooks.secret)
            .env("TRIBUTARY_CONFIG", &config_file)
            .env("TRIBUTARY__KAFKA__TOPIC_PREFIX", &router.prefix)
            .env("TRIBUTARY__KAFKA__GROUP_ID", &router.group)
            .env("TRIBUTARY__KAFKA__TRANSACTIONAL_ID_PREFIX", &router.group)
            .env("TRIBUTARY__RUNTIME__INSTANCE_ID", "crashy")
            .env("TRIBUTARY__ADMIN__LISTEN", "127.0.0.1:0")
            .env("TRIBUTARY__LOG__FILTER", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start billing-router")
    };
    let mut rng = rand::rng();
    for crash in 0..3 {
        let mut child = spawn_binary();
        // Killed at a random moment while records keep arriving (the feeder runs for ~22 s).
        tokio::time::sleep(Duration::from_millis(rng.random_range(2_000..4_000))).await;
        kill(Pid::from_raw(child.id().expect("running") as i32), Signal::SIGKILL).expect("SIGKILL");
        assert!(!child.wait().await.expect("wait").success(), "crash {crash}: the process was killed");
    }
    feeder.await.expect("feeder");
    // What a killed process had sent is in the receiver's log by now (the feeder ran on for
    // many seconds after the last kill); from here on, one process runs undisturbed.
    let last_started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let mut last = spawn_binary();
    let expected: BTreeSet<String> = updates.iter().map(id_of).collect();
    let received = hooks
        .deliveries_until("every update delivered", |r| {
            r.iter().map(|d| d.id.clone()).collect::<BTreeSet<_>>().is_superset(&expected)
        })
        .await;
    kill(Pid::from_raw(last.id().expect("running") as i32), Signal::SIGTERM).expect("SIGTERM");
    let status = tokio::time::timeout(Duration::from_secs(30), last.wait()).await.expect("stops").expect("wait");
    assert_eq!(status.code(), Some(0));

    let mut receipts: BTreeMap<&str, Vec<&Received>> = BTreeMap::new();
    for delivery in &received {
        receipts.entry(delivery.id.as_str()).or_default().push(delivery);
    }
    assert_eq!(receipts.keys().map(|k| k.to_string()).collect::<BTreeSet<_>>(), expected, "only our deliveries");
    for (id, copies) in &receipts {
        assert!(copies.windows(2).all(|w| w[0].body == w[1].body), "{id}: a redelivery is the same delivery");
        if copies.len() > 1 {
            assert!(
                copies[0].received_at < last_started,
                "{id}: sent twice by the process that ran undisturbed: only a delivery whose outcome a killed \
                 process did not commit is sent again"
            );
        }
    }
    // Inside Kafka exactly once: one committed DELIVERED record per update.
    let delivered: Vec<String> = hooks
        .attempts()
        .await
        .into_iter()
        .filter(|a| a.outcome == DeliveryOutcome::Delivered)
        .map(|a| a.delivery_id)
        .collect();
    assert_eq!(delivered.len(), expected.len(), "one DELIVERED record per update");
    assert_eq!(delivered.into_iter().collect::<BTreeSet<_>>(), expected);
    let redelivered = receipts.values().filter(|c| c.len() > 1).count();
    eprintln!("{redelivered} of {} deliveries were sent again after a SIGKILL", expected.len());
}
