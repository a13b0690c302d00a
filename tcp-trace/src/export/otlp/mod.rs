//! OTLP/gRPC export with the official protos: one log record per closed connection, and the
//! metrics of [`super::metrics`] every `metrics_interval`.
//!
//! Log records are written into batches by the pipeline itself ([`queue`], [`record`]) and sent
//! by a task of their own over a tonic channel, as the generated `LogsServiceClient` would send
//! them. The queue is bounded: a closed connection that finds it full is dropped and counted, as
//! is a batch the collector still refuses after the retries, and what cannot be sent within a
//! second of shutdown. A dead collector costs the queue's memory and nothing more.
mod queue;
mod record;

use std::{
    sync::{Arc, atomic::AtomicU64},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use opentelemetry_proto::tonic::{
    collector::{
        logs::v1::ExportLogsServiceResponse,
        metrics::v1::{ExportMetricsServiceRequest, metrics_service_client::MetricsServiceClient},
    },
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value},
    metrics::v1::{
        AggregationTemporality, Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint,
        ResourceMetrics, ScopeMetrics, Sum, metric, number_data_point,
    },
    resource::v1::Resource,
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::{client::Grpc, codegen::http::uri::PathAndQuery, transport::Channel};
use tonic_prost::ProstCodec;

pub use queue::Queue;
use record::{EncodedRequest, Framing};

use super::{
    EXPORT_TIMEOUT, ExportError, Sources,
    metrics::{Family, Kind, Value},
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
    /// Which closed connections become log records.
    pub logs: Logs,
}

/// Which closed connections are exported as log records. A record costs the agent about as
/// much as tracing the connection did (docs/benchmarks.md, "Export cost"): on hosts that
/// churn, `failures` keeps the records that alerts and investigations start from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Logs {
    /// Every connection's end.
    #[default]
    All,
    /// Only connections that failed: refused, reset, timed out, unreachable, dead peer.
    Failures,
    /// None: OTLP carries the metrics only.
    None,
}

impl Default for OtlpConfig {
    fn default() -> Self {
        OtlpConfig {
            endpoint: "http://127.0.0.1:4317".into(),
            queue: 8192,
            batch: 512,
            metrics_interval: Duration::from_secs(10),
            logs: Logs::All,
        }
    }
}

pub struct Exporter {
    config: OtlpConfig,
    queue: Queue,
    logs: Grpc<Channel>,
    framing: Framing,
    metrics: MetricsServiceClient<Channel>,
    sources: Arc<Sources>,
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
    let queue = Queue::new(config.queue, config.batch, lost);
    let resource = resource();
    let exporter = Exporter {
        config: config.clone(),
        queue: queue.clone(),
        logs: Grpc::new(channel.clone()),
        framing: Framing::new(&resource, &scope()),
        metrics: MetricsServiceClient::new(channel),
        sources,
        resource,
        started_ns: unix_ns(SystemTime::now()),
    };
    Ok((queue, exporter))
}

/// The log export's floor, for the bench: records encoded exactly as the exporter encodes them,
/// into one buffer, and never sent.
pub struct LogEncoder {
    writer: record::RecordWriter,
    clock: crate::event::Clock,
    /// The encoded records.
    pub out: Vec<u8>,
}

impl Default for LogEncoder {
    fn default() -> Self {
        LogEncoder {
            writer: record::RecordWriter::default(),
            clock: crate::event::Clock::now(),
            out: Vec::new(),
        }
    }
}

impl LogEncoder {
    pub fn encode(&mut self, c: &crate::lifecycle::Connection) {
        let now_ns = unix_ns(SystemTime::now());
        self.writer.write(&mut self.out, c, &self.clock, now_ns);
    }
}

/// Waits between attempts to send one batch; after the last it is dropped (and counted).
const BACKOFF: [Duration; 5] = [
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
];

/// At shutdown: how long the pipeline's last records may take to arrive, and then how long
/// what is queued may take to be sent; what is not sent by then is counted as lost. Well
/// within the 5 s the agent gives itself to stop.
const SHUTDOWN_PRODUCERS: Duration = Duration::from_secs(1);
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(1);

/// How sending one batch ended.
enum Sent {
    /// Delivered, or dropped and counted.
    Done,
    /// The agent is stopping: still to send (or count) at shutdown.
    Stopped,
}

impl Exporter {
    /// Sends log records until `stop`, then what is left within [`SHUTDOWN_FLUSH`]; exports
    /// metrics every `metrics_interval` meanwhile.
    pub async fn run(self, stop: CancellationToken) {
        let Exporter {
            config,
            queue,
            logs,
            framing,
            metrics,
            sources,
            resource,
            started_ns,
        } = self;
        let metrics = MetricsExporter {
            client: metrics,
            sources,
            resource,
            started_ns,
        };
        let mut logs = LogsExporter {
            client: logs,
            framing,
            queue,
        };
        tokio::join!(metrics.run(config.metrics_interval, &stop), logs.run(&stop));
    }
}

struct LogsExporter {
    client: Grpc<Channel>,
    framing: Framing,
    queue: Queue,
}

impl LogsExporter {
    async fn run(&mut self, stop: &CancellationToken) {
        let mut unsent = Vec::new();
        while let Some(batch) = self.queue.next(stop).await {
            let request = self.framing.request(&batch.records);
            // The records are in the request now: their buffer goes back before the send.
            drop(batch.records);
            if let Sent::Stopped = self.send(&request, batch.count, stop).await {
                unsent.push((request, batch.count));
                break;
            }
        }
        // The pipeline's last drain may still be writing records: it holds its end until done.
        let deadline = Instant::now() + SHUTDOWN_PRODUCERS;
        while self.queue.has_producers() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        unsent.extend(
            self.queue
                .close()
                .into_iter()
                .map(|b| (self.framing.request(&b.records), b.count)),
        );
        self.flush(unsent).await;
    }

    /// Sends `request` (`count` records), retrying what the OTLP spec calls retryable, until it
    /// is delivered or dropped, or the agent stops. A call under way when the agent stops may
    /// finish within [`SHUTDOWN_FLUSH`] (sending it again could duplicate it); if it does not, its
    /// records are counted as lost.
    async fn send(&mut self, request: &Bytes, count: u64, stop: &CancellationToken) -> Sent {
        for wait in BACKOFF.iter().copied().map(Some).chain([None]) {
            let result = {
                let call = self.export(request.clone());
                tokio::pin!(call);
                tokio::select! {
                    result = &mut call => Some(result),
                    _ = stop.cancelled() => tokio::time::timeout(SHUTDOWN_FLUSH, call).await.ok(),
                }
            };
            match result {
                None => break,
                Some(Ok(rejected)) => {
                    self.queue.count_lost(rejected);
                    return Sent::Done;
                }
                Some(Err(status)) if retryable(status.code()) => {
                    let Some(wait) = wait else { break };
                    tokio::select! {
                        _ = stop.cancelled() => return Sent::Stopped,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
                Some(Err(status)) => {
                    tracing::warn!("the OTLP receiver refused {count} log records: {status}");
                    break;
                }
            }
        }
        self.queue.count_lost(count);
        Sent::Done
    }

    /// At shutdown: one attempt per batch within [`SHUTDOWN_FLUSH`]; the rest is counted.
    async fn flush(&mut self, batches: Vec<(Bytes, u64)>) {
        let deadline = Instant::now() + SHUTDOWN_FLUSH;
        let mut unsent = 0;
        let mut reachable = true;
        for (request, count) in batches {
            let sent = if reachable {
                tokio::time::timeout_at(deadline, self.export(request)).await
            } else {
                Ok(Err(tonic::Status::unavailable("gave up")))
            };
            match sent {
                Ok(Ok(rejected)) => self.queue.count_lost(rejected),
                _ => {
                    reachable = false;
                    unsent += count;
                }
            }
        }
        if unsent > 0 {
            self.queue.count_lost(unsent);
            tracing::warn!(
                "{unsent} log records could not be sent to the OTLP receiver at shutdown \
                 (counted in tcptrace_events_lost_total{{stage=\"otlp\"}})"
            );
        }
    }

    /// One Export call; the records the receiver rejected.
    async fn export(&mut self, request: Bytes) -> Result<u64, tonic::Status> {
        self.client
            .ready()
            .await
            .map_err(|err| tonic::Status::unavailable(err.to_string()))?;
        let path = PathAndQuery::from_static(LOGS_EXPORT_PATH);
        let codec = ProstCodec::<EncodedRequest, ExportLogsServiceResponse>::default();
        let response = self
            .client
            .unary(tonic::Request::new(EncodedRequest(request)), path, codec)
            .await?;
        Ok(response
            .into_inner()
            .partial_success
            .map_or(0, |p| u64::try_from(p.rejected_log_records).unwrap_or(0)))
    }
}

/// The gRPC method the generated `LogsServiceClient::export` calls.
const LOGS_EXPORT_PATH: &str = "/opentelemetry.proto.collector.logs.v1.LogsService/Export";

struct MetricsExporter {
    client: MetricsServiceClient<Channel>,
    sources: Arc<Sources>,
    resource: Resource,
    started_ns: u64,
}

impl MetricsExporter {
    async fn run(mut self, interval: Duration, stop: &CancellationToken) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {
                    // Cumulative values: a failed export is made good by the next one.
                    let request = self.request();
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = self.client.export(request) => {}
                    }
                }
            }
        }
    }

    fn request(&self) -> ExportMetricsServiceRequest {
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

pub(super) fn unix_ns(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|d| u64::try_from(d.as_nanos()).ok())
        .unwrap_or(0)
}

pub(super) fn kv(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

pub(super) fn text(key: &str, value: impl Into<String>) -> KeyValue {
    kv(key, any_value::Value::StringValue(value.into()))
}

pub(super) fn resource() -> Resource {
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

pub(super) fn scope() -> InstrumentationScope {
    InstrumentationScope {
        name: "tcp-trace".into(),
        version: env!("CARGO_PKG_VERSION").into(),
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use opentelemetry_proto::tonic::collector::logs::v1::{
        ExportLogsServiceRequest,
        logs_service_server::{LogsService, LogsServiceServer},
    };

    use super::*;
    use crate::export::otlp::record::tests::closed_connections;

    /// A receiver on loopback that counts the records it gets.
    #[derive(Clone, Default)]
    struct Counting(Arc<AtomicU64>);

    #[tonic::async_trait]
    impl LogsService for Counting {
        async fn export(
            &self,
            request: tonic::Request<ExportLogsServiceRequest>,
        ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
            let n: usize = request
                .get_ref()
                .resource_logs
                .iter()
                .flat_map(|r| &r.scope_logs)
                .map(|s| s.log_records.len())
                .sum();
            self.0.fetch_add(n as u64, Ordering::Relaxed);
            Ok(tonic::Response::new(ExportLogsServiceResponse::default()))
        }
    }

    /// A queue of `n` records whose producer is gone, its exporter to `port`, and the lost count.
    fn exporter(port: u16, n: usize) -> (LogsExporter, Arc<AtomicU64>) {
        let lost = Arc::new(AtomicU64::new(0));
        let queue = Queue::new(1000, 512, Arc::clone(&lost));
        for c in closed_connections().iter().cycle().take(n) {
            queue.push(c);
        }
        let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect_lazy();
        let exporter = LogsExporter {
            client: Grpc::new(channel),
            framing: Framing::new(&resource(), &scope()),
            queue,
        };
        (exporter, lost)
    }

    #[tokio::test]
    async fn at_shutdown_what_a_dead_receiver_cannot_take_is_counted_as_lost_within_the_bound() {
        // A port nobody listens on: connections are refused.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let (mut exporter, lost) = exporter(port, 700);
        let stop = CancellationToken::new();
        stop.cancel();
        let began = std::time::Instant::now();
        exporter.run(&stop).await;
        assert!(began.elapsed() <= SHUTDOWN_FLUSH + Duration::from_millis(500));
        assert_eq!(lost.load(Ordering::Relaxed), 700);
    }

    #[tokio::test]
    async fn at_shutdown_what_is_queued_reaches_a_live_receiver() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let received = Counting::default();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(LogsServiceServer::new(received.clone()))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        // More than a batch, and a partial one that has not lingered yet.
        let (mut exporter, lost) = exporter(port, 700);
        let stop = CancellationToken::new();
        stop.cancel();
        exporter.run(&stop).await;
        assert_eq!(received.0.load(Ordering::Relaxed), 700);
        assert_eq!(lost.load(Ordering::Relaxed), 0);
        server.abort();
    }
}
