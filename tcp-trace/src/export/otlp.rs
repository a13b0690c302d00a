//! OTLP/gRPC export with the official protos' tonic client: one log record per closed
//! connection, and the metrics of [`super::metrics`] every `metrics_interval`.
//!
//! The queue between the pipeline and the exporter is bounded: the pipeline's `try_send` never
//! waits, and a closed connection that finds the queue full is dropped and counted, as is a batch
//! the collector still refuses after the retries. A dead collector costs the queue's memory and
//! nothing more.
use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use opentelemetry_proto::tonic::{
    collector::{
        logs::v1::{ExportLogsServiceRequest, logs_service_client::LogsServiceClient},
        metrics::v1::{ExportMetricsServiceRequest, metrics_service_client::MetricsServiceClient},
    },
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value},
    logs::v1::{LogRecord, ResourceLogs, ScopeLogs, SeverityNumber},
    metrics::v1::{
        AggregationTemporality, Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint,
        ResourceMetrics, ScopeMetrics, Sum, metric, number_data_point,
    },
    resource::v1::Resource,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use super::{
    EXPORT_TIMEOUT, ExportError, Sources,
    metrics::{Family, Kind, Value},
};
use crate::{
    event::Clock,
    lifecycle::{Closer, Connection, Direction},
};

#[derive(Clone, Debug)]
pub struct OtlpConfig {
    /// The receiver, `http://HOST:PORT` (4317 is OTLP/gRPC's port).
    pub endpoint: String,
    /// Closed connections waiting to be sent; beyond it they are dropped and counted.
    pub queue: usize,
    /// Most log records per export request.
    pub batch: usize,
    pub metrics_interval: Duration,
}

impl Default for OtlpConfig {
    fn default() -> Self {
        OtlpConfig {
            endpoint: "http://127.0.0.1:4317".into(),
            queue: 8192,
            batch: 512,
            metrics_interval: Duration::from_secs(10),
        }
    }
}

/// The pipeline's end of the queue.
#[derive(Clone)]
pub struct Queue {
    tx: mpsc::Sender<Connection>,
    lost: Arc<AtomicU64>,
}

impl Queue {
    pub fn push(&self, c: &Connection) {
        if self.tx.try_send(c.clone()).is_err() {
            self.lost.fetch_add(1, Ordering::Relaxed);
        }
    }
}

pub struct Exporter {
    config: OtlpConfig,
    rx: mpsc::Receiver<Connection>,
    logs: LogsServiceClient<Channel>,
    metrics: MetricsServiceClient<Channel>,
    sources: Arc<Sources>,
    lost: Arc<AtomicU64>,
    resource: Resource,
    started_ns: u64,
}

pub fn start(
    config: &OtlpConfig,
    sources: Arc<Sources>,
    lost: Arc<AtomicU64>,
) -> Result<(Queue, Exporter), ExportError> {
    let invalid = |reason: String| ExportError::OtlpEndpoint {
        url: config.endpoint.clone(),
        reason,
    };
    if !config.endpoint.starts_with("http://") {
        return Err(invalid("only plaintext http:// is supported".into()));
    }
    // Lazy: a collector that is not up yet is retried at each export, not at start-up.
    let channel = tonic::transport::Endpoint::from_shared(config.endpoint.clone())
        .map_err(|err| invalid(err.to_string()))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(EXPORT_TIMEOUT)
        .connect_lazy();
    let (tx, rx) = mpsc::channel(config.queue.max(1));
    let exporter = Exporter {
        config: config.clone(),
        rx,
        logs: LogsServiceClient::new(channel.clone()),
        metrics: MetricsServiceClient::new(channel),
        sources,
        lost: Arc::clone(&lost),
        resource: resource(),
        started_ns: unix_ns(SystemTime::now()),
    };
    Ok((Queue { tx, lost }, exporter))
}

/// Waits between attempts to send one batch; after the last it is dropped (and counted).
const BACKOFF: [Duration; 5] = [
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
];

/// How long a partial batch waits for more records.
const LINGER: Duration = Duration::from_millis(200);

impl Exporter {
    pub async fn run(mut self, stop: CancellationToken) {
        let mut batch = Vec::with_capacity(self.config.batch);
        let mut metrics_tick = tokio::time::interval(self.config.metrics_interval);
        metrics_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = metrics_tick.tick() => {
                    // Cumulative values: a failed export is made good by the next one.
                    let request = self.metrics_request();
                    let _ = self.metrics.export(request).await;
                }
                n = self.rx.recv_many(&mut batch, self.config.batch) => {
                    if n == 0 {
                        return;
                    }
                    self.fill(&mut batch).await;
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = self.send_logs(&mut batch) => {}
                    }
                }
            }
        }
    }

    /// Lets a partial batch grow for up to [`LINGER`]. It polls the queue rather than waiting on
    /// it: a task waiting on the channel is woken for every record sent, a thread wake-up per
    /// closed connection (it tripled the agent's CPU per connection under churn).
    async fn fill(&mut self, batch: &mut Vec<Connection>) {
        let max = self.config.batch;
        let until = tokio::time::Instant::now() + LINGER;
        loop {
            while batch.len() < max {
                match self.rx.try_recv() {
                    Ok(c) => batch.push(c),
                    Err(_) => break,
                }
            }
            if batch.len() >= max || tokio::time::Instant::now() >= until {
                return;
            }
            tokio::time::sleep(LINGER / 4).await;
        }
    }

    /// Sends `batch` (emptying it), retrying what the OTLP spec calls retryable.
    async fn send_logs(&mut self, batch: &mut Vec<Connection>) {
        let clock = Clock::now();
        let now_ns = unix_ns(SystemTime::now());
        let count = batch.len() as u64;
        for wait in BACKOFF.iter().copied().map(Some).chain([None]) {
            // Built again for a retry (rare) rather than cloned for every send.
            let request = self.logs_request(batch, &clock, now_ns);
            match self.logs.export(request).await {
                Ok(response) => {
                    let rejected = response
                        .into_inner()
                        .partial_success
                        .map_or(0, |p| u64::try_from(p.rejected_log_records).unwrap_or(0));
                    self.lost.fetch_add(rejected, Ordering::Relaxed);
                    batch.clear();
                    return;
                }
                Err(status) if retryable(status.code()) => {
                    if let Some(wait) = wait {
                        tokio::time::sleep(wait).await;
                    }
                }
                Err(status) => {
                    tracing::warn!("the OTLP receiver refused {count} log records: {status}");
                    break;
                }
            }
        }
        batch.clear();
        self.lost.fetch_add(count, Ordering::Relaxed);
    }

    fn logs_request(
        &self,
        batch: &[Connection],
        clock: &Clock,
        now_ns: u64,
    ) -> ExportLogsServiceRequest {
        ExportLogsServiceRequest {
            resource_logs: vec![ResourceLogs {
                resource: Some(self.resource.clone()),
                scope_logs: vec![ScopeLogs {
                    scope: Some(scope()),
                    log_records: batch.iter().map(|c| log_record(c, clock, now_ns)).collect(),
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        }
    }

    fn metrics_request(&self) -> ExportMetricsServiceRequest {
        let now_ns = unix_ns(SystemTime::now());
        let metrics = self
            .sources
            .families()
            .into_iter()
            .map(|f| metric(f, self.started_ns, now_ns))
            .collect();
        ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                resource: Some(self.resource.clone()),
                scope_metrics: vec![ScopeMetrics {
                    scope: Some(scope()),
                    metrics,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        }
    }
}

/// The gRPC codes OTLP/gRPC says to retry.
fn retryable(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(
        code,
        Unavailable
            | ResourceExhausted
            | DeadlineExceeded
            | Aborted
            | Cancelled
            | OutOfRange
            | DataLoss
    )
}

fn unix_ns(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|d| u64::try_from(d.as_nanos()).ok())
        .unwrap_or(0)
}

fn kv(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

fn text(key: &str, value: impl Into<String>) -> KeyValue {
    kv(key, any_value::Value::StringValue(value.into()))
}

fn int(key: &str, value: impl Into<i64>) -> KeyValue {
    kv(key, any_value::Value::IntValue(value.into()))
}

fn seconds(key: &str, ns: u64) -> KeyValue {
    kv(key, any_value::Value::DoubleValue(ns as f64 * 1e-9))
}

fn resource() -> Resource {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    Resource {
        attributes: vec![
            text("service.name", "tcp-trace"),
            text("service.version", env!("CARGO_PKG_VERSION")),
            text("host.name", host.trim()),
            // What a collector's Prometheus exporter turns into `instance`: one per host.
            text("service.instance.id", host.trim()),
        ],
        ..Default::default()
    }
}

fn scope() -> InstrumentationScope {
    InstrumentationScope {
        name: "tcp-trace".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        ..Default::default()
    }
}

/// A closed connection's summary, with the semantic conventions' network attributes and
/// tcp-trace's own under `tcptrace.`.
pub fn log_record(c: &Connection, clock: &Clock, now_ns: u64) -> LogRecord {
    let (local, peer) = (c.local(), c.remote());
    let mut attributes = vec![
        text("network.transport", "tcp"),
        text(
            "network.type",
            if local.is_ipv4() { "ipv4" } else { "ipv6" },
        ),
        text("network.local.address", local.ip().to_string()),
        int("network.local.port", local.port()),
        text("network.peer.address", peer.ip().to_string()),
        int("network.peer.port", peer.port()),
    ];
    let client_server = match c.direction {
        Direction::Active => Some((local, peer)),
        Direction::Passive => Some((peer, local)),
        Direction::Listen | Direction::Unknown => None,
    };
    if let Some((client, server)) = client_server {
        attributes.extend([
            text("client.address", client.ip().to_string()),
            int("client.port", client.port()),
            text("server.address", server.ip().to_string()),
            int("server.port", server.port()),
        ]);
    }
    if let Some(owner) = c.owner() {
        attributes.push(int("process.pid", owner.task.pid));
    }
    let cause = super::metrics::cause_name(c.cause());
    let closer = super::metrics::closer_name(c.first_closer());
    attributes.extend([
        int(
            "tcptrace.connection.id",
            i64::try_from(c.id).unwrap_or(i64::MAX),
        ),
        int("tcptrace.netns", c.netns),
        text("tcptrace.direction", c.direction.name()),
        text("tcptrace.close.cause", cause),
        text("tcptrace.close.closer", closer),
        int("tcptrace.retransmits", c.retransmits()),
        int("tcptrace.handshake.retransmits", c.handshake_retransmits()),
        kv(
            "tcptrace.keepalive.enabled",
            any_value::Value::BoolValue(c.keepalive().enabled),
        ),
        int("tcptrace.keepalive.probes", c.keepalive().probes),
    ]);
    if c.seen_open() {
        attributes.push(seconds("tcptrace.duration", c.duration_ns()));
    }
    if let Some(ns) = c.handshake_ns() {
        attributes.push(seconds("tcptrace.handshake.duration", ns));
    }
    let body = format!(
        "{} {} -> {} closed: {cause}{}",
        c.direction.name(),
        local,
        peer,
        if c.first_closer() == Closer::None {
            String::new()
        } else {
            format!(", {closer} sent the first FIN")
        }
    );
    LogRecord {
        time_unix_nano: unix_ns(clock.wall(c.last_ns)),
        observed_time_unix_nano: now_ns,
        severity_number: SeverityNumber::Info as i32,
        severity_text: "INFO".into(),
        event_name: "tcptrace.connection.closed".into(),
        body: Some(AnyValue {
            value: Some(any_value::Value::StringValue(body)),
        }),
        attributes,
        ..Default::default()
    }
}

/// A family as an OTLP metric: counters as cumulative monotonic sums, the rest as gauges and
/// cumulative histograms, named as in Prometheus (a collector's Prometheus exporter adds the
/// same `_total` and `_seconds` suffixes back).
fn metric(f: Family, start_ns: u64, now_ns: u64) -> Metric {
    let cumulative = AggregationTemporality::Cumulative as i32;
    let attributes = |labels: &[(&str, &str)]| -> Vec<KeyValue> {
        labels.iter().map(|&(k, v)| text(k, v)).collect()
    };
    let numbers = |f: &Family| -> Vec<NumberDataPoint> {
        f.points
            .iter()
            .filter_map(|p| match p.value {
                Value::Counter(v) | Value::Gauge(v) => Some(NumberDataPoint {
                    attributes: attributes(&p.labels),
                    start_time_unix_nano: start_ns,
                    time_unix_nano: now_ns,
                    value: Some(number_data_point::Value::AsInt(
                        i64::try_from(v).unwrap_or(i64::MAX),
                    )),
                    ..Default::default()
                }),
                Value::Histogram(_) => None,
            })
            .collect()
    };
    let data = match f.kind {
        Kind::Counter => metric::Data::Sum(Sum {
            data_points: numbers(&f),
            aggregation_temporality: cumulative,
            is_monotonic: true,
        }),
        Kind::Gauge | Kind::Info => metric::Data::Gauge(Gauge {
            data_points: numbers(&f),
        }),
        Kind::Histogram => metric::Data::Histogram(Histogram {
            data_points: f
                .points
                .iter()
                .filter_map(|p| match &p.value {
                    Value::Histogram(h) => Some(HistogramDataPoint {
                        attributes: attributes(&p.labels),
                        start_time_unix_nano: start_ns,
                        time_unix_nano: now_ns,
                        count: h.count(),
                        sum: Some(h.sum),
                        bucket_counts: h.counts.clone(),
                        explicit_bounds: h.bounds.clone(),
                        ..Default::default()
                    }),
                    _ => None,
                })
                .collect(),
            aggregation_temporality: cumulative,
        }),
    };
    Metric {
        name: if f.kind == Kind::Info {
            format!("{}_info", f.name)
        } else {
            f.name.to_owned()
        },
        description: f.help.to_owned(),
        unit: if f.seconds { "s".into() } else { String::new() },
        data: Some(data),
        ..Default::default()
    }
}
