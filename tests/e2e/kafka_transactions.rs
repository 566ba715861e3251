//! The broker's transactions behave as the exactly-once design relies on.

use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tributary_runtime::kafka::{TopicKind, client_config, ensure_topics};
use tributary_tests::{Stack, stack, unique_name};

const TIMEOUT: Duration = Duration::from_secs(30);

fn consumer(stack: &Stack, topic: &str, isolation: &str) -> StreamConsumer {
    let consumer: StreamConsumer = client_config(&stack.kafka())
        .set("group.id", unique_name("tx-test"))
        .set("isolation.level", isolation)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    consumer
}

fn transactional_producer(stack: &Stack) -> FutureProducer {
    let producer: FutureProducer =
        client_config(&stack.kafka()).set("transactional.id", unique_name("tx-test")).create().expect("producer");
    producer.init_transactions(TIMEOUT).expect("init_transactions");
    producer
}

async fn send(producer: &FutureProducer, topic: &str, payload: &str) {
    producer
        .send(FutureRecord::to(topic).key("acct-1").payload(payload), TIMEOUT)
        .await
        .map_err(|(error, _)| error)
        .expect("send");
}

/// Reads payloads until `until` is seen, or until `idle` passes without a record.
async fn read_payloads(consumer: &StreamConsumer, idle: Duration, until: Option<&str>) -> Vec<String> {
    let mut seen = Vec::new();
    while let Ok(message) = tokio::time::timeout(idle, consumer.recv()).await {
        let message = message.expect("consume");
        let payload = String::from_utf8_lossy(message.payload().unwrap_or_default()).into_owned();
        let done = until == Some(payload.as_str());
        seen.push(payload);
        if done {
            break;
        }
    }
    seen
}

#[tokio::test]
async fn a_transactional_write_is_visible_to_read_committed_only_after_commit_and_never_after_abort() {
    let stack = stack();
    let topic = unique_name("tx");
    ensure_topics(&stack.kafka(), &[(&topic, TopicKind::Events)]).await.expect("create topic");
    let producer = transactional_producer(stack);
    let committed_reader = consumer(stack, &topic, "read_committed");
    let uncommitted_reader = consumer(stack, &topic, "read_uncommitted");

    producer.begin_transaction().expect("begin");
    for payload in ["a", "b", "c"] {
        send(&producer, &topic, payload).await;
    }
    // The records are in the log: a read_uncommitted reader sees them ...
    assert_eq!(read_payloads(&uncommitted_reader, TIMEOUT, Some("c")).await, ["a", "b", "c"]);
    // ... while a read_committed reader sees nothing of the open transaction.
    assert!(read_payloads(&committed_reader, Duration::from_secs(3), None).await.is_empty());

    producer.commit_transaction(TIMEOUT).expect("commit");
    assert_eq!(read_payloads(&committed_reader, TIMEOUT, Some("c")).await, ["a", "b", "c"]);

    producer.begin_transaction().expect("begin");
    send(&producer, &topic, "aborted-1").await;
    send(&producer, &topic, "aborted-2").await;
    producer.abort_transaction(TIMEOUT).expect("abort");
    producer.begin_transaction().expect("begin");
    send(&producer, &topic, "after-abort").await;
    producer.commit_transaction(TIMEOUT).expect("commit");

    // Reading up to the record committed after the aborted ones proves the aborted ones were
    // skipped, not merely late.
    assert_eq!(read_payloads(&committed_reader, TIMEOUT, Some("after-abort")).await, ["after-abort"]);
    let raw = read_payloads(&uncommitted_reader, TIMEOUT, Some("after-abort")).await;
    assert_eq!(raw, ["aborted-1", "aborted-2", "after-abort"], "the aborted records are in the log");
}

/// A topic exists before its partitions have leaders. `ensure_topics` returns only once they
/// do, so that a service (or a test) reading its end right after creating it does not fail with
/// NotLeaderForPartition, which is how CI once failed. Many partitions created at once make
/// the election take long enough to be seen.
#[tokio::test]
async fn topics_are_readable_as_soon_as_ensure_topics_returns() {
    const PARTITIONS: i32 = 24;
    let stack = stack();
    let mut kafka = stack.kafka();
    kafka.partitions = PARTITIONS;
    let topics: Vec<String> = (0..8).map(|_| unique_name("fresh")).collect();
    let specs: Vec<(&str, TopicKind)> = topics.iter().map(|t| (t.as_str(), TopicKind::Events)).collect();
    ensure_topics(&kafka, &specs).await.expect("create the topics");
    let reader = consumer(stack, &topics[0], "read_committed");
    for topic in &topics {
        for partition in 0..PARTITIONS {
            let (low, high) = reader
                .fetch_watermarks(topic, partition, TIMEOUT)
                .unwrap_or_else(|e| panic!("partition {partition} of {topic} has no leader yet: {e}"));
            assert_eq!((low, high), (0, 0), "a new topic holds nothing");
        }
    }
    for topic in &topics {
        let read = tributary_runtime::kafka::read_to_end(&kafka, topic, None, |_| {})
            .await
            .expect("reading a topic just created succeeds");
        assert_eq!(read, 0, "a new topic holds nothing");
    }
}
