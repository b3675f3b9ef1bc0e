//! Logging and, when an OTLP endpoint is configured, OpenTelemetry export.
//!
//! OTLP is off unless the standard `OTEL_EXPORTER_OTLP_ENDPOINT` (or the
//! per-signal `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` /
//! `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`) is set; export is OTLP over
//! HTTP/protobuf, from the SDK's own threads, so it never competes with
//! request handling. Every request span (evidence type, policy, outcome,
//! reason, latency — never a token or key) becomes an OTLP span, and the
//! server's instruments (`herald.issuance`, `herald.issuance.duration`,
//! ...) are exported every `OTEL_METRIC_EXPORT_INTERVAL` ms (default 60 s).

use std::io::IsTerminal as _;
use std::time::Duration;

use anyhow::Context;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Flushes and stops the exporters when dropped (outside the async runtime).
pub struct Telemetry {
    tracer: Option<SdkTracerProvider>,
    meter: Option<SdkMeterProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(t) = self.tracer.take() {
            let _ = t.shutdown();
        }
        if let Some(m) = self.meter.take() {
            let _ = m.shutdown();
        }
    }
}

fn configured(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| !v.trim().is_empty())
}

/// Installs the log subscriber (`HERALD_LOG` filter, `HERALD_LOG_FORMAT=json`)
/// and, if configured, the OTLP trace and metric pipelines. Call before the
/// async runtime starts.
pub fn init() -> anyhow::Result<Telemetry> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HERALD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = std::env::var("HERALD_LOG_FORMAT").is_ok_and(|v| v == "json");
    let any = configured("OTEL_EXPORTER_OTLP_ENDPOINT");
    let traces_on = any || configured("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
    let metrics_on = any || configured("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT");
    let resource = Resource::builder().with_service_name("herald").build();

    let tracer = if traces_on {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
            .context("OTLP span exporter")?;
        Some(
            SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(resource.clone())
                .build(),
        )
    } else {
        None
    };
    let meter = if metrics_on {
        let exporter = opentelemetry_otlp::MetricExporter::builder()
            .with_http()
            .build()
            .context("OTLP metric exporter")?;
        let interval = std::env::var("OTEL_METRIC_EXPORT_INTERVAL")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(Duration::from_secs(60), Duration::from_millis);
        let reader = PeriodicReader::builder(exporter)
            .with_interval(interval)
            .build();
        let provider = SdkMeterProvider::builder()
            .with_reader(reader)
            .with_resource(resource)
            .build();
        opentelemetry::global::set_meter_provider(provider.clone());
        Some(provider)
    } else {
        None
    };

    // HERALD_LOG filters the log lines only; exported spans always include
    // Herald's request spans (info level), whatever the log verbosity.
    let otel_layer = tracer.as_ref().map(|t| {
        tracing_opentelemetry::layer()
            .with_tracer(t.tracer("herald"))
            .with_filter(tracing_subscriber::EnvFilter::new(
                "herald=info,herald_server=info",
            ))
    });
    let registry = tracing_subscriber::registry().with(otel_layer);
    // Colour only for a person at a terminal: piped into a file, journald or
    // a log shipper, escape codes are noise (and NO_COLOR opts out anyway).
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    if json {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_writer(std::io::stderr)
                    .with_filter(filter),
            )
            .init();
    } else {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(ansi)
                    .with_writer(std::io::stderr)
                    .with_filter(filter),
            )
            .init();
    }
    Ok(Telemetry { tracer, meter })
}
