//! Benchmark: the stream runtime (exactly-once, identity processor) against a plain rdkafka
//! consume → produce loop without transactions, measured in the same run on the same broker.
//!
//! Run with `make bench` (which starts the local stack). For each pipeline:
//! - throughput: a backlog of `BACKLOG` usage events is preloaded, the pipeline started, and
//!   the time measured until a `read_committed` reader has seen every output;
//! - latency: events are produced at `RATE` per second for `LATENCY_SECONDS`, each stamped with
//!   its production time in the envelope; the reader records the time from stamp to receipt.
//!
//! The runtime decodes and re-encodes every record through the registry (Avro), keeps an
//! idempotency key per record and commits every 100 ms; the baseline copies bytes. The
//! difference is the price of the guarantees, which BENCHMARKS.md reports.

mod common;

use common::{BACKLOG, LATENCY_SECONDS, Pipeline, RATE, latency, throughput};
use tributary_tests::stack;

#[tokio::main]
async fn main() {
    // BENCH_NO_TELEMETRY=1 leaves tracing and OpenTelemetry out, to measure what spans cost.
    let _telemetry = std::env::var_os("BENCH_NO_TELEMETRY").is_none().then(common::telemetry);
    let stack = stack();
    println!("Runtime benchmark: identity processor, exactly-once, commit interval 100 ms, 3 partitions");
    println!("backlog {BACKLOG} records for throughput; {RATE} records/s for {LATENCY_SECONDS} s for latency\n");
    // BENCH_ONLY=runtime-throughput runs one measurement alone, for profiling.
    let only = std::env::var("BENCH_ONLY").ok();
    if only.as_deref() == Some("runtime-throughput") {
        println!("runtime throughput: {:?}", throughput(stack, Pipeline::Runtime).await);
        return;
    }
    if only.as_deref() == Some("runtime-latency") {
        println!("runtime latency (p50, p99): {:?}", latency(stack, Pipeline::Runtime).await);
        return;
    }
    let mut rows = Vec::new();
    for pipeline in [Pipeline::Baseline, Pipeline::Runtime] {
        let rate = throughput(stack, pipeline).await;
        let (p50, p99) = latency(stack, pipeline).await;
        eprintln!("{pipeline:?}: {rate:?}, p50 {p50:?}, p99 {p99:?}");
        rows.push((pipeline, rate, p50, p99));
    }
    let baseline = rows[0].1;
    println!(
        "| pipeline | records/s, steady | vs baseline | records/s, start-up included | vs baseline | first output after | p50 latency | p99 latency |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (pipeline, rate, p50, p99) in rows {
        let name = match pipeline {
            Pipeline::Baseline => "baseline: plain consume → produce, no transactions",
            Pipeline::Runtime => "tributary runtime: identity processor, exactly-once",
        };
        println!(
            "| {name} | {:.0} | {:.0}% | {:.0} | {:.0}% | {} ms | {} ms | {} ms |",
            rate.steady,
            100.0 * rate.steady / baseline.steady,
            rate.overall,
            100.0 * rate.overall / baseline.overall,
            rate.first_output.as_millis(),
            p50.as_millis(),
            p99.as_millis()
        );
    }
}
