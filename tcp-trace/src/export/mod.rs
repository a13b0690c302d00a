//! Exporters into the operator's stack: Prometheus metrics on `/metrics` and OTLP (a log record
//! per closed connection, and the same metrics) to an OpenTelemetry collector.
//!
//! Fed like any subscriber, but without decoding events: the agent's pipeline calls an
//! [`Observer`] once per connection opened, established and closed (and per keepalive probe),
//! which bumps lock-free counters and queues closed connections for OTLP without waiting. The
//! rest (live connections, losses) is read from the table, the bus and the kernel counters when
//! a scrape or an export asks.
pub mod metrics;
mod otlp;
mod prometheus;

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use metrics::Metrics;
pub use otlp::{LogEncoder, Logs as OtlpLogs, OtlpConfig};

use crate::{
    bus::Bus,
    lifecycle::{Connection, Table},
    stats::{AgentStats, BeforeRead},
};
use metrics::{Family, Live};

/// Where to export; nothing by default.
#[derive(Clone, Debug, Default)]
pub struct ExportConfig {
    /// Serve `/metrics` here (port 0 picks one).
    pub metrics: Option<SocketAddr>,
    pub otlp: Option<OtlpConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(
        "cannot serve metrics on {addr}: {source} (is the port taken? choose another --metrics address)"
    )]
    MetricsBind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "invalid --otlp-endpoint {url:?}: {reason} (expected http://HOST:PORT of an OTLP/gRPC receiver)"
    )]
    OtlpEndpoint { url: String, reason: String },
}

/// The pipeline's hook: called once per connection at its open, establishment and close, and
/// per keepalive probe. Never blocks.
#[derive(Clone, Default)]
pub struct Observer {
    metrics: Arc<Metrics>,
    otlp: Option<otlp::Queue>,
    logs: otlp::Logs,
}

impl Observer {
    /// Metrics alone, as an agent serves them with no exporter configured.
    #[cfg(test)]
    pub(crate) fn metrics_only() -> Observer {
        Observer {
            metrics: Arc::new(Metrics::default()),
            otlp: None,
            logs: otlp::Logs::None,
        }
    }

    pub fn opened(&self, c: &Connection) {
        self.metrics.opened(c);
    }

    pub fn established(&self, c: &Connection) {
        self.metrics.established(c);
    }

    pub fn keepalive_probe(&self) {
        self.metrics.keepalive_probe();
    }

    pub fn closed(&self, c: &Connection) {
        self.metrics.closed(c);
        // A log record per connection (a listener closing is not one), or per failed one.
        if let Some(otlp) = &self.otlp
            && c.direction != crate::lifecycle::Direction::Listen
            && match self.logs {
                otlp::Logs::All => true,
                otlp::Logs::Failures => metrics::is_failure(c.cause()),
                otlp::Logs::None => false,
            }
        {
            otlp.push(c);
        }
    }
}

/// What the exporters read from the other stages.
pub struct Sources {
    pub metrics: Arc<Metrics>,
    pub table: Arc<Mutex<Table>>,
    pub bus: Arc<Bus>,
    pub stats: Arc<AgentStats>,
    /// Closed connections the OTLP exporter dropped.
    pub otlp_lost: Arc<AtomicU64>,
    /// Brings the table up to the kernel's open connections before it is counted (the
    /// agent's wiring: the socket slots' adoption). Blocking, briefly.
    pub before_read: Option<BeforeRead>,
}

impl Sources {
    /// Every family as it is now. Counting live connections walks the table under its lock, so
    /// it runs once per scrape or export, never per event.
    pub fn families(&self) -> Vec<Family> {
        let mut live = Live::default();
        if let Some(before_read) = &self.before_read {
            before_read();
        }
        let table_full = {
            let table = self.table.lock().unwrap_or_else(|p| p.into_inner());
            live.count(table.connections());
            table.table_full
        };
        let kernel = self.stats.kernel.read();
        live.lost = [
            kernel.ring_full,
            kernel.missed,
            self.bus.snapshot().totals.dropped,
            table_full,
            self.otlp_lost.load(Ordering::Relaxed),
        ];
        live.missed_by_hook = kernel.missed_by_hook();
        self.metrics.families(&live)
    }
}

/// The exporters started for an agent.
pub struct Exporters {
    pub observer: Observer,
    /// Where `/metrics` is served, port resolved.
    pub metrics_addr: Option<SocketAddr>,
}

/// Binds the metrics endpoint and starts the exporters `config` asks for, as tasks in `tasks`
/// that end with `stop`.
pub async fn start(
    config: &ExportConfig,
    table: Arc<Mutex<Table>>,
    bus: Arc<Bus>,
    stats: Arc<AgentStats>,
    before_read: Option<BeforeRead>,
    stop: &CancellationToken,
    tasks: &mut JoinSet<()>,
) -> Result<Exporters, ExportError> {
    let otlp_lost = Arc::new(AtomicU64::new(0));
    let sources = Arc::new(Sources {
        metrics: Arc::new(Metrics::default()),
        table,
        bus,
        stats,
        otlp_lost: Arc::clone(&otlp_lost),
        before_read,
    });
    let mut observer = Observer {
        metrics: Arc::clone(&sources.metrics),
        otlp: None,
        logs: otlp::Logs::None,
    };
    let mut metrics_addr = None;
    if let Some(addr) = config.metrics {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| ExportError::MetricsBind { addr, source })?;
        metrics_addr = listener.local_addr().ok();
        tasks.spawn(prometheus::serve(
            listener,
            Arc::clone(&sources),
            stop.clone(),
        ));
    }
    if let Some(otlp) = &config.otlp {
        let (queue, exporter) = otlp::start(otlp, Arc::clone(&sources), otlp_lost)?;
        (observer.otlp, observer.logs) = (Some(queue), otlp.logs);
        let stop = stop.clone();
        tasks.spawn(exporter.run(stop));
    }
    Ok(Exporters {
        observer,
        metrics_addr,
    })
}

/// How long the exporters wait for the collector before they count a batch as lost.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
