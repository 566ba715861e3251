//! Benchmark: the Confluent codec's cost per record, without Kafka or a registry
//! (`cargo bench -p tributary-contracts --bench codec`). The runtime pays one decode and one
//! encode per record; this isolates that share of its per-record time.

use std::sync::Arc;
use std::time::Instant;

use tributary_contracts::codec::{Codec, InMemoryResolver, Location};
use tributary_contracts::samples::{Fill, sample};
use tributary_contracts::types::UsageEvent;

const RECORDS: u32 = 50_000;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let codec = Codec::new(Arc::new(InMemoryResolver::new()));
    let schema = tributary_contracts::codec::reader_schema("usage.events").unwrap();
    let event: UsageEvent = apache_avro::from_value(&sample(schema, Fill::Full, 1)).unwrap();
    let at = Location::new("usage.events", 0, 0);
    let bytes = codec.encode(&event).await.unwrap();

    let started = Instant::now();
    for _ in 0..RECORDS {
        std::hint::black_box(codec.encode(std::hint::black_box(&event)).await.unwrap());
    }
    let encode = started.elapsed() / RECORDS;
    let started = Instant::now();
    for _ in 0..RECORDS {
        std::hint::black_box(codec.decode::<UsageEvent>(&at, std::hint::black_box(&bytes)).await.unwrap());
    }
    let decode = started.elapsed() / RECORDS;
    println!("usage.events ({} bytes): encode {encode:?}/record, decode {decode:?}/record", bytes.len());
}
