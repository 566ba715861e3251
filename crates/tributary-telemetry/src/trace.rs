//! The W3C trace context across process boundaries: a span continues the trace its caller
//! sent (HTTP or Kafka headers), and what the span sends on carries its context, so that one
//! business flow stays one trace from the platform's request through every service.

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TraceContextExt as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// Makes `span` a child of the trace context in `carrier` (`traceparent`, `tracestate`) when it
/// holds a valid one, and says whether it did. Call it before the span is first entered: a
/// started span keeps the parent it started with.
pub fn continue_trace(span: &tracing::Span, carrier: &dyn Extractor) -> bool {
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(carrier));
    parent.span().span_context().is_valid() && span.set_parent(parent).is_ok()
}

/// `span`'s trace context as headers: `traceparent`, and `tracestate` when it has one.
pub fn trace_headers(span: &tracing::Span) -> Vec<(String, String)> {
    let context = span.context();
    let mut carrier = HeaderList(Vec::new());
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&context, &mut carrier));
    carrier.0
}

struct HeaderList(Vec<(String, String)>);

impl Injector for HeaderList {
    fn set(&mut self, key: &str, value: String) {
        self.0.push((key.to_owned(), value));
    }
}

/// A single `traceparent` value as a carrier: the CloudEvents distributed-tracing extension
/// puts it in the event itself.
#[derive(Debug, Clone, Copy)]
pub struct Traceparent<'a>(pub &'a str);

impl Extractor for Traceparent<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == "traceparent").then_some(self.0)
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent"]
    }
}
