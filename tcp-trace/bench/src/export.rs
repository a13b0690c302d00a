//! The `export` phase: what Prometheus scraping and OTLP export add to the agent's CPU at full
//! churn (the target is at most 1%). Paired rounds of three agents, each tracing only the
//! bench namespace with no subscriber: one exporting nothing; one serving `--metrics` (scraped
//! every second, as Prometheus would) and sending the metrics over OTLP (`--otlp-logs none`);
//! one doing that and sending a log record per connection end (`--otlp-logs all`, the
//! default). The receiver is this process, with the official protos' generated server: it
//! counts the log records and drops them, so the export's cost is the agent's alone.
//!
//! With `TCP_TRACE_BENCH_EXPORT_BASELINE=<another tcp-trace binary>`, every round runs that
//! agent's pair too, for a before/after figure measured side by side.
use std::{
    net::SocketAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use opentelemetry_proto::tonic::collector::{
    logs::v1::{
        ExportLogsServiceRequest, ExportLogsServiceResponse,
        logs_service_server::{LogsService, LogsServiceServer},
    },
    metrics::v1::{
        ExportMetricsServiceRequest, ExportMetricsServiceResponse,
        metrics_service_server::{MetricsService, MetricsServiceServer},
    },
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;

use tcp_trace_test_support::{NetNs, process::AgentProcess};

use crate::{
    Options,
    workload::{self, ChurnSpec, TcpCounters},
};

/// What an agent exports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Export {
    Off,
    /// `--metrics` scraped every second, and the metrics over OTLP.
    Metrics,
    /// That, and a log record per connection end.
    Logs,
}

impl Export {
    const ALL: [Export; 3] = [Export::Off, Export::Metrics, Export::Logs];

    fn label(self) -> &'static str {
        match self {
            Export::Off => "no export",
            Export::Metrics => "--metrics + OTLP metrics",
            Export::Logs => "--metrics + OTLP metrics + logs",
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Export::Off => "off",
            Export::Metrics => "metrics",
            Export::Logs => "logs",
        }
    }
}

/// One run of one variant.
#[derive(Clone, Debug)]
pub struct ExportRun {
    /// Which agent binary: "current", or "baseline".
    pub agent: &'static str,
    pub export: Export,
    pub round: usize,
    /// Connections the kernel counted (ActiveOpens).
    pub connections: u64,
    pub agent_cpu_s: f64,
    /// Log records the receiver got, and scrapes of `/metrics` answered.
    pub records: u64,
    pub scrapes: u64,
    /// `tcptrace_events_lost_total{stage="otlp"}` at the end of the run.
    pub lost: u64,
}

impl ExportRun {
    /// Agent CPU seconds per million connections.
    pub fn cpu_per_million(&self) -> f64 {
        self.agent_cpu_s * 1e6 / self.connections.max(1) as f64
    }
}

/// Counts what it receives, keeps nothing.
#[derive(Clone, Default)]
struct Receiver {
    records: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl LogsService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportLogsServiceRequest>,
    ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
        let records: usize = request
            .get_ref()
            .resource_logs
            .iter()
            .flat_map(|r| &r.scope_logs)
            .map(|s| s.log_records.len())
            .sum();
        self.records.fetch_add(records as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportLogsServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Receiver {
    async fn export(
        &self,
        _: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

/// Paired rounds, alternating which variant goes first; prints and writes `export.md`.
pub async fn export_cost(opts: &Options) -> Result<Vec<ExportRun>> {
    let mut agents = vec![("current", opts.agent.clone())];
    if let Some(baseline) = std::env::var_os("TCP_TRACE_BENCH_EXPORT_BASELINE") {
        agents.push(("baseline", baseline.into()));
    }
    let variants: Vec<(&'static str, &Path, Export)> = agents
        .iter()
        .flat_map(|(name, exe)| Export::ALL.map(|export| (*name, exe.as_path(), export)))
        .collect();
    let mut runs = Vec::new();
    for round in 0..opts.rounds {
        for i in 0..variants.len() {
            let (agent, exe, export) = variants[(i + round) % variants.len()];
            let run = run_once(opts, agent, exe, round, export).await?;
            eprintln!(
                "bench: export round {round}: {agent:<8} {:<31} {:>8} connections, {:.2} agent CPU-s per million, {} records, {} scrapes, {} lost",
                export.label(),
                run.connections,
                run.cpu_per_million(),
                run.records,
                run.scrapes,
                run.lost
            );
            runs.push(run);
        }
    }
    let table = render(&runs) + &encode_floor::render(&encode_floor::measure());
    eprintln!("{table}");
    let path = opts.out_dir.join("export.md");
    std::fs::write(&path, &table).with_context(|| format!("write {}", path.display()))?;
    Ok(runs)
}

async fn run_once(
    opts: &Options,
    agent: &'static str,
    exe: &Path,
    round: usize,
    export: Export,
) -> Result<ExportRun> {
    let exporting = export != Export::Off;
    let ns = NetNs::new("export");
    let receiver = Receiver::default();
    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    let (metrics, otlp) = (free_addr()?, free_addr()?);
    let flags: Vec<String> = if exporting {
        serve_receiver(otlp, receiver.clone(), stop.clone()).await?;
        let logs = if export == Export::Logs {
            "all"
        } else {
            "none"
        };
        vec![
            format!("--metrics={metrics}"),
            format!("--otlp-endpoint=http://{otlp}"),
            format!("--otlp-logs={logs}"),
        ]
    } else {
        Vec::new()
    };
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let tag = format!("export-{round}-{agent}-{}", export.tag());
    let (process, _client) =
        AgentProcess::start(exe, &opts.out_dir, &tag, Some(ns.inode()), &flags).await?;
    let scrapes = Arc::new(AtomicU64::new(0));
    if exporting {
        tokio::spawn(scrape_every_second(
            metrics,
            Arc::clone(&scrapes),
            stop.clone(),
        ));
    }
    let kernel_before = TcpCounters::read(&ns);
    let before = cpu_seconds(process.pid)?;
    let spec = ChurnSpec {
        concurrency: opts.concurrency,
        rate: None,
        duration: opts.duration,
    };
    // The workload's threads block: the receiver and the scraper keep the runtime's workers.
    tokio::task::block_in_place(|| workload::churn(&ns, spec))?;
    let connections = TcpCounters::read(&ns).since(&kernel_before).active_opens;
    // Both ends of every connection are exported: wait for them (a batch lingers 200 ms), for
    // as long in both variants.
    let expected = if export == Export::Logs {
        2 * connections
    } else {
        0
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    tokio::time::sleep(Duration::from_millis(300)).await;
    while exporting
        && receiver.records.load(Ordering::Relaxed) < expected
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after = cpu_seconds(process.pid)?;
    let lost = if exporting {
        let text = scrape(metrics).await.unwrap_or_default();
        sample(&text, "tcptrace_events_lost_total{stage=\"otlp\"}").unwrap_or(0)
    } else {
        0
    };
    stop.cancel();
    process.stop(!opts.quick)?;
    Ok(ExportRun {
        agent,
        export,
        round,
        connections,
        agent_cpu_s: after - before,
        records: receiver.records.load(Ordering::Relaxed),
        scrapes: scrapes.load(Ordering::Relaxed),
        lost,
    })
}

/// A loopback port nobody uses now.
fn free_addr() -> Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

async fn serve_receiver(
    addr: SocketAddr,
    receiver: Receiver,
    stop: CancellationToken,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind the OTLP receiver on {addr}"))?;
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(LogsServiceServer::new(receiver.clone()))
            .add_service(MetricsServiceServer::new(receiver))
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned()),
    );
    Ok(())
}

async fn scrape_every_second(addr: SocketAddr, scrapes: Arc<AtomicU64>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {
                if scrape(addr).await.is_ok() {
                    scrapes.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// `GET /metrics` over HTTP/1.0: the body.
async fn scrape(addr: SocketAddr) -> Result<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n")
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let (_, body) = response
        .split_once("\r\n\r\n")
        .context("no HTTP response")?;
    Ok(body.to_owned())
}

/// The value of `series` (name and labels, as printed) in Prometheus text.
fn sample(text: &str, series: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// The figure: agent CPU-s per million connections for each variant (median over rounds), and
/// the median of each round's added percentage, per agent binary.
pub fn render(runs: &[ExportRun]) -> String {
    let mut out = String::from(
        "## Export cost at full churn\n\n\
         | agent | export | connections/run | agent CPU-s per million connections (median) | log records | lost |\n\
         |---|---|---:|---:|---:|---:|\n",
    );
    let mut summary = String::new();
    for agent in ["current", "baseline"] {
        let of = |export: Export| -> Vec<&ExportRun> {
            runs.iter()
                .filter(|r| r.agent == agent && r.export == export)
                .collect()
        };
        let off = of(Export::Off);
        if off.is_empty() {
            continue;
        }
        for export in Export::ALL {
            let runs = of(export);
            out.push_str(&format!(
                "| {agent} | {} | {:.0} | {:.2} | {} | {} |\n",
                export.label(),
                median(runs.iter().map(|r| r.connections as f64).collect()),
                median(runs.iter().map(|r| r.cpu_per_million()).collect()),
                runs.iter().map(|r| r.records).sum::<u64>(),
                runs.iter().map(|r| r.lost).sum::<u64>(),
            ));
        }
        for export in [Export::Metrics, Export::Logs] {
            let on = of(export);
            let added: Vec<f64> = off
                .iter()
                .filter_map(|a| {
                    let b = on.iter().find(|b| b.round == a.round)?;
                    Some(100.0 * (b.cpu_per_million() / a.cpu_per_million() - 1.0))
                })
                .collect();
            summary.push_str(&format!(
                "\n{agent}: {} adds {:.1}% of the agent's CPU (median of {} paired rounds; each: {}).\n",
                export.label(),
                median(added.clone()),
                added.len(),
                added
                    .iter()
                    .map(|a| format!("{a:+.1}%"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    out + &summary
}

/// CPU time of every live thread of `pid`, from schedstat (nanoseconds, where /proc's stat has
/// ticks of 10 ms: too coarse for a difference of a few percent).
fn cpu_seconds(pid: u32) -> Result<f64> {
    let mut ns = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))?.flatten() {
        if let Ok(stat) = std::fs::read_to_string(task.path().join("schedstat")) {
            ns += stat
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Ok(ns as f64 * 1e-9)
}

/// The log export's floor: what encoding the log records alone costs, the agent's own encoder
/// (`tcp_trace::export::LogEncoder`) on closed connections as the agent's table completes them
/// (both ends of each: a client closing first, and its server), nothing sent.
pub mod encode_floor {
    use std::{
        net::{IpAddr, Ipv4Addr, SocketAddr},
        time::Instant,
    };

    use tcp_trace::{
        export::LogEncoder,
        lifecycle::{Connection, Peers, Table},
        model::{Context, TcpState::*, Transition},
    };

    /// Closed connections per timed pass, and passes.
    const CONNECTIONS: usize = 50_000;
    const PASSES: usize = 7;

    /// Nanoseconds per record of each pass, and the bytes of one record.
    pub struct Floor {
        pub ns_per_record: Vec<f64>,
        pub bytes_per_record: f64,
    }

    fn closed_connections() -> Vec<Connection> {
        let mut table = Table::new(2 * CONNECTIONS, Peers::new(16, 1_000_000_000));
        let mut closed = Vec::with_capacity(2 * CONNECTIONS);
        let ip = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1));
        for i in 0..CONNECTIONS {
            let port = 1024 + (i % 60_000) as u16;
            let (client, server) = (SocketAddr::new(ip, port), SocketAddr::new(ip, 6379));
            let ts = i as u64 * 10_000;
            let sock = 2 * i as u64 + 1;
            let lives = [
                (
                    sock,
                    client,
                    server,
                    [
                        (Close, SynSent),
                        (SynSent, Established),
                        (Established, FinWait1),
                        (FinWait1, FinWait2),
                        (FinWait2, Close),
                    ],
                ),
                (
                    sock + 1,
                    server,
                    client,
                    [
                        (Listen, SynRecv),
                        (SynRecv, Established),
                        (Established, CloseWait),
                        (CloseWait, LastAck),
                        (LastAck, Close),
                    ],
                ),
            ];
            for (sock, local, remote, path) in lives {
                for (step, (old, new)) in path.into_iter().enumerate() {
                    let applied = table.apply(&Transition {
                        ts_ns: ts + step as u64 * 1_000,
                        sock,
                        netns: 1,
                        old,
                        new,
                        local,
                        remote,
                        context: Context::Kernel,
                        cpu: 0,
                        error: 0,
                        srtt_us: 50,
                        total_retrans: 0,
                        bytes_acked: 7,
                        bytes_received: 7,
                        all_recorded: true,
                    });
                    if applied.closed {
                        closed.push(applied.connection.clone());
                    }
                }
            }
        }
        closed
    }

    pub fn measure() -> Floor {
        let connections = closed_connections();
        let mut encoder = LogEncoder::default();
        let mut ns_per_record = Vec::with_capacity(PASSES);
        let mut bytes = 0;
        for _ in 0..PASSES {
            encoder.out.clear();
            let began = Instant::now();
            for c in &connections {
                encoder.encode(c);
            }
            let elapsed = began.elapsed();
            bytes = encoder.out.len();
            ns_per_record.push(elapsed.as_nanos() as f64 / connections.len() as f64);
        }
        Floor {
            ns_per_record,
            bytes_per_record: bytes as f64 / connections.len().max(1) as f64,
        }
    }

    pub fn render(floor: &Floor) -> String {
        let mut sorted = floor.ns_per_record.clone();
        sorted.sort_by(f64::total_cmp);
        format!(
            "\nFloor of the log export (the agent's encoder alone, nothing sent, {} records per \
             pass, {} passes): median {:.0} ns per record (min {:.0}, max {:.0}), {:.0} bytes \
             per record.\n",
            2 * CONNECTIONS,
            sorted.len(),
            sorted[sorted.len() / 2],
            sorted[0],
            sorted[sorted.len() - 1],
            floor.bytes_per_record,
        )
    }
}
