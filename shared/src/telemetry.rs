//! Logging, tracing and W3C trace-context (`traceparent`) propagation.
//!
//! Every process runs an OpenTelemetry tracer under `tracing`, so spans have real trace and
//! span ids: one order is one trace, from the HTTP request that accepted it through every
//! worker hop and compensation (each message carries its producer's `traceparent`). Spans
//! are exported over OTLP/HTTP when OTEL_EXPORTER_OTLP_ENDPOINT is set, and dropped
//! otherwise.

use std::collections::HashMap;

use opentelemetry::{
    Context,
    trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _},
};
use opentelemetry_sdk::{Resource, trace::SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{EnvFilter, fmt, prelude::*};
use uuid::Uuid;

use crate::config::LogFormat;

/// Keeps the tracer provider alive; flushes pending spans when dropped.
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        let _ = self.provider.shutdown();
    }
}

/// Most links a span keeps (the SDK's default is 128): a relay batch (500 rows) or a worker
/// batch (WORKER_BATCH, at most 1,000 deliveries) links each message it carried.
pub const MAX_LINKS: u32 = 1_000;

/// The production tracer provider: OTLP/HTTP export when `otlp_endpoint` is set.
pub fn provider(otlp_endpoint: Option<&str>) -> anyhow::Result<SdkTracerProvider> {
    let resource = Resource::builder().with_service_name("orderflow").build();
    // A batch span links every message or order it handled: up to the largest batch.
    let builder = SdkTracerProvider::builder()
        .with_resource(resource)
        .with_max_links_per_span(MAX_LINKS);
    Ok(match otlp_endpoint.filter(|e| !e.is_empty()) {
        Some(endpoint) => {
            use opentelemetry_otlp::WithExportConfig;
            EXPORTING.store(true, std::sync::atomic::Ordering::Relaxed);
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
                .build()?;
            builder.with_batch_exporter(exporter).build()
        }
        None => builder.build(),
    })
}

/// Installs the global subscriber (logs in `format`, spans into `provider`). `RUST_LOG`
/// overrides the default filter. A second call (tests start several apps in one process)
/// keeps the first subscriber.
pub fn init(format: LogFormat, provider: SdkTracerProvider) -> Telemetry {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,lapin=warn,tower_http=warn"));
    let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer("orderflow"));
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::filter::filter_fn(|meta| {
            !is_lapin_close_report(meta)
        }))
        .with(otel);
    // Colours only for a person at a terminal, never in files or log collectors.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = match format {
        LogFormat::Text => registry
            .with(
                fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(ansi)
                    .with_target(false),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .with_writer(std::io::stderr)
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false),
            )
            .try_init(),
    };
    Telemetry { provider }
}

/// lapin logs every channel or connection close the broker sends at ERROR ("Channel closed",
/// "Connection closed": target `lapin::channel`, fields `channel`, `method`, `error`),
/// including those orderflow expects and handles: the 404 of a passive declare that asks
/// whether a queue exists, the 406 of a queue an earlier release declared with other
/// arguments, a broker restarting. The operation that caused it returns the same error to its
/// caller, which logs it as what it is (a lost connection is a WARN with its reconnect), so
/// these reports are left out rather than shown as errors that are not.
fn is_lapin_close_report(meta: &tracing::Metadata<'_>) -> bool {
    let fields = meta.fields();
    *meta.level() == tracing::Level::ERROR
        && meta.target() == "lapin::channel"
        && fields.field("method").is_some()
        && fields.field("error").is_some()
        && fields.field("channel").is_some()
}

/// The trace context of the current span, to put on the messages it sends.
pub fn current() -> Option<TraceParent> {
    of(&tracing::Span::current())
}

/// The trace context of `span` (`None` when it has none: no OpenTelemetry layer).
pub fn of(span: &tracing::Span) -> Option<TraceParent> {
    let context = span.context();
    let span = context.span();
    let sc = span.span_context();
    sc.is_valid().then(|| TraceParent {
        trace_id: u128::from_be_bytes(sc.trace_id().to_bytes()),
        span_id: u64::from_be_bytes(sc.span_id().to_bytes()),
        sampled: sc.is_sampled(),
    })
}

/// Whether spans leave the process (an OTLP endpoint is set): spans that exist only to be
/// exported (one per order of a batched message) are made only then.
pub fn exporting() -> bool {
    EXPORTING.load(std::sync::atomic::Ordering::Relaxed)
}

static EXPORTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

tokio::task_local! {
    static ORDER_TRACES: HashMap<Uuid, TraceParent>;
}

/// Runs `f` with each order's trace context in this process (a worker's span for that order):
/// the messages `f` writes about an order go on in the order's own trace, even when one
/// transaction handles many orders of many traces ([`order_trace`]).
pub async fn with_order_traces<F: Future>(traces: HashMap<Uuid, TraceParent>, f: F) -> F::Output {
    ORDER_TRACES.scope(traces, f).await
}

/// The trace context [`with_order_traces`] gave `order`, if any.
pub fn order_trace(order: Uuid) -> Option<TraceParent> {
    ORDER_TRACES.try_with(|t| t.get(&order).copied()).ok().flatten()
}

/// A messaging span's name by OpenTelemetry's messaging conventions: `{operation}
/// {destination}`, or the operation alone when there is no destination to name (RabbitMQ's
/// default exchange, or a batch for several exchanges).
pub fn messaging_span_name(operation: &str, destination: Option<&str>) -> String {
    match destination.filter(|d| !d.is_empty()) {
        Some(destination) => format!("{operation} {destination}"),
        None => operation.to_owned(),
    }
}

/// Sets OpenTelemetry attributes on `span` that only a trace backend reads (they stay out of
/// the logs, unlike span fields), when spans are exported; nothing otherwise.
pub fn set_attributes(span: &tracing::Span, attributes: &[(&'static str, opentelemetry::Value)]) {
    if exporting() {
        for (key, value) in attributes {
            span.set_attribute(*key, value.clone());
        }
    }
}

/// A message's creation context, by OpenTelemetry's messaging conventions: a PRODUCER span
/// `create {exchange}` in `parent`'s trace (a child of the span that decided to send it),
/// ended at once; its context is what the message carries, so the consumer's span is its
/// child and the relay's publish links it. Without export, `parent` itself; without a
/// parent, none. `order` is the order it carries the message for.
pub fn create(
    exchange: &'static str,
    routing_key: &'static str,
    order: Uuid,
    parent: Option<TraceParent>,
) -> Option<TraceParent> {
    if !exporting() {
        return parent;
    }
    let parent = parent?;
    let span = tracing::info_span!("create", "otel.kind" = "producer");
    set_parent(&span, parent);
    set_attributes(
        &span,
        &[
            ("messaging.system", "rabbitmq".into()),
            ("messaging.operation.type", "create".into()),
            ("messaging.operation.name", "create".into()),
            ("messaging.destination.name", exchange.into()),
            ("messaging.rabbitmq.destination.routing_key", routing_key.into()),
            ("orderflow.order_id", order.to_string().into()),
        ],
    );
    rename(&span, messaging_span_name("create", Some(exchange)));
    of(&span).or(Some(parent))
}

/// Makes `parent` (a message's or request's `traceparent`) the parent of `span`.
pub fn set_parent(span: &tracing::Span, parent: TraceParent) {
    let _ = span.set_parent(Context::new().with_remote_span_context(parent.span_context()));
}

/// Renames `span` (its OpenTelemetry name): an HTTP server span gets its route only once the
/// request is routed. (Recording `otel.name` is too late once the span's context exists.)
pub fn rename(span: &tracing::Span, name: String) {
    span.context().span().update_name(name);
}

/// Links `span` to `other` (a span of another trace it relates to: a batch span to each
/// order's trace it handled, as the OpenTelemetry messaging conventions ask of batches).
pub fn link(span: &tracing::Span, other: TraceParent) {
    span.add_link(other.span_context());
}

/// A W3C `traceparent`: `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: u128,
    pub span_id: u64,
    pub sampled: bool,
}

impl TraceParent {
    /// A new trace (a new order starts one).
    pub fn new_root() -> Self {
        let trace_id = uuid::Uuid::new_v4().as_u128();
        Self {
            trace_id,
            span_id: new_span_id(),
            sampled: true,
        }
    }

    /// As an OpenTelemetry remote span context.
    fn span_context(self) -> SpanContext {
        let flags = if self.sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        SpanContext::new(
            TraceId::from_bytes(self.trace_id.to_be_bytes()),
            SpanId::from_bytes(self.span_id.to_be_bytes()),
            flags,
            true,
            TraceState::default(),
        )
    }

    /// The same trace with a new span: what a consumer puts on the messages it sends.
    pub fn child(self) -> Self {
        Self {
            span_id: new_span_id(),
            ..self
        }
    }

    /// Reads a `traceparent` by the W3C Trace Context grammar: `version "-" trace-id "-"
    /// parent-id "-" trace-flags`, all lower-case hex (`HEXDIGLC`), version `ff` invalid,
    /// trace and parent ids not all zeros; version `00` has exactly these four fields, a later
    /// version may add fields after another `-` (read as version 00, as the spec says).
    /// Anything else is `None` (the request or message starts a trace of its own).
    pub fn parse(s: &str) -> Option<Self> {
        fn hex(field: &str, len: usize) -> Option<&str> {
            (field.len() == len && field.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))).then_some(field)
        }
        let s = s.trim_matches(|c| c == ' ' || c == '\t');
        let version = hex(s.get(..2)?, 2).filter(|v| *v != "ff")?;
        let rest = s.get(2..)?.strip_prefix('-')?;
        let (trace, rest) = rest.split_at_checked(32)?;
        let (span, rest) = rest.strip_prefix('-')?.split_at_checked(16)?;
        let (flags, rest) = rest.strip_prefix('-')?.split_at_checked(2)?;
        if !(rest.is_empty() || version != "00" && rest.starts_with('-')) {
            return None;
        }
        let trace_id = u128::from_str_radix(hex(trace, 32)?, 16).ok().filter(|t| *t != 0)?;
        let span_id = u64::from_str_radix(hex(span, 16)?, 16).ok().filter(|s| *s != 0)?;
        let flags = u8::from_str_radix(hex(flags, 2)?, 16).ok()?;
        Some(Self {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
        })
    }

    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }
}

impl std::fmt::Display for TraceParent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id,
            self.span_id,
            u8::from(self.sampled)
        )
    }
}

fn new_span_id() -> u64 {
    // Low 64 random bits of a v4 UUID; never zero (zero is invalid in W3C).
    (uuid::Uuid::new_v4().as_u128() as u64).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_children_share_the_trace() {
        let root = TraceParent::new_root();
        let text = root.to_string();
        assert_eq!(text.len(), 55);
        assert_eq!(TraceParent::parse(&text), Some(root));
        let child = root.child();
        assert_eq!(child.trace_id, root.trace_id);
        assert_ne!(child.span_id, root.span_id);
        assert_eq!(
            TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").map(|t| t.trace_id_hex()),
            Some("4bf92f3577b34da6a3ce929d0e0e4736".to_owned())
        );
        assert_eq!(
            TraceParent::parse("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            None
        );
        assert_eq!(TraceParent::parse("garbage"), None);
        // The grammar, not a split on '-' and a lenient number parser.
        let ok = "4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        for bad in [
            format!("00-{}", ok.to_uppercase()),
            format!("ff-{ok}"),
            format!("00-{ok}-extra"),
            format!("0-{ok}"),
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-+0f067aa0ba902b7-01".to_owned(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01".to_owned(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1".to_owned(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7_01".to_owned(),
            format!("00-{ok}é"),
        ] {
            assert_eq!(TraceParent::parse(&bad), None, "{bad}");
        }
        assert!(TraceParent::parse(&format!("01-{ok}-what-comes-later")).is_some());
        assert!(TraceParent::parse(&format!(" 00-{ok} ")).is_some());
    }
}
