//! The command line: one binary that is the agent and its clients.
use std::{fmt::Write as _, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum, builder::RangedU64ValueParser};

use crate::{
    agent::AgentConfig,
    api::{Access, Limits, ListenAddr, TlsFiles},
    capture::CaptureConfig,
    client::{ClientTls, ConnectOptions},
    export::{ExportConfig, OtlpConfig},
    filter::Cidr,
    model::TcpState,
    proto,
    top::PeerFilter,
};

#[derive(Debug, Parser)]
#[command(
    name = "tcp-trace",
    version,
    about = "TCP connection lifecycles, traced with eBPF and streamed over gRPC"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: trace every TCP state transition on this host and serve them (needs root).
    Agent(AgentArgs),
    /// Stream events live from an agent, one line each.
    Watch(WatchArgs),
    /// List the connections an agent is following now.
    Conns(ConnsArgs),
    /// Show an agent's counters, and each subscriber's.
    Stats(StatsArgs),
    /// A live view of the busiest peers: connection rate, failures, handshake time.
    Top(TopArgs),
    /// Ask an agent's gRPC health service whether it is serving; exit status 0 if it is (for
    /// liveness and readiness probes, e.g. a Kubernetes exec probe).
    Health(HealthArgs),
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Where to serve gRPC: unix:PATH, HOST:PORT or PORT (loopback). Repeatable.
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "unix:/run/tcp-trace/tcp-trace.sock"
    )]
    pub listen: Vec<ListenAddr>,
    /// Kernel ring buffer size in bytes (a power of two, 4096 to 1 GiB; resident memory is twice
    /// this). Records that find it full are lost in the kernel and counted (`stats`: kernel
    /// ring full).
    #[arg(long, value_name = "BYTES", default_value_t = crate::capture::DEFAULT_RING_BYTES, value_parser = parse_ring_bytes)]
    pub ring_bytes: u32,
    /// Only trace sockets in this network namespace (inode, as `stat -L -c %i /proc/PID/ns/net`
    /// prints); filtered in the kernel. Default: every namespace.
    #[arg(long, value_name = "INODE", value_parser = parse_netns)]
    pub netns: Option<u32>,
    /// Most connections followed at once (1 to 10,000,000; about 500 bytes each); beyond it new
    /// connections are counted, not followed.
    #[arg(long, value_name = "N", default_value_t = 1_000_000, value_parser = RangedU64ValueParser::<usize>::new().range(1..=10_000_000))]
    pub max_connections: usize,
    /// Longest a record may wait in the kernel before the agent reads it, in microseconds.
    /// Lower is fresher, higher costs less CPU under heavy churn.
    #[arg(long, value_name = "MICROSECONDS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(50..=1_000_000))]
    pub wakeup_interval_us: u64,
    /// Trace transitions through the classic tracepoint even where the kernel takes the BTF
    /// one (which costs less per transition). For kernels where the BTF program misbehaves.
    #[arg(long)]
    pub classic_tracepoint: bool,
    /// Events queued per subscriber before it starts losing events (it is told how many); a
    /// queue also holds at most 128 MiB.
    #[arg(long, value_name = "N", default_value_t = 1_048_576, value_parser = clap::value_parser!(u64).range(2..=1_048_576))]
    pub subscriber_queue: u64,
    /// Closed connections that lived at least this many seconds count as long-lived, the rest
    /// as short-lived (churn that pooling or keepalive would avoid).
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    pub long_lived: u64,
    /// Most remote peers aggregated in `stats` (0 to 1,000,000); connections to more are
    /// counted, not aggregated.
    #[arg(long, value_name = "N", default_value_t = 10_000, value_parser = RangedU64ValueParser::<usize>::new().range(0..=1_000_000))]
    pub max_peers: usize,
    /// Seconds between comparisons of the connection table with the kernel's own socket list
    /// (also done right after the kernel loses records): connections whose CLOSE was lost are
    /// closed (cause UNKNOWN), sockets whose opening was lost are adopted. 0 turns it off.
    #[arg(long, value_name = "SECONDS", default_value_t = crate::agent::DEFAULT_HEAL_INTERVAL.as_secs())]
    pub heal_interval: u64,
    /// Most subscribers at once (1 to 65,536); more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, value_name = "N", default_value_t = 1024, value_parser = RangedU64ValueParser::<usize>::new().range(1..=65_536))]
    pub max_subscribers: usize,
    /// Latest events kept for clients that reconnect (`watch --since-seq`) or ask for history
    /// (`--replay-last`); 0 turns replay off, at most 1,000,000. Each held event costs about
    /// 350 bytes (its encoding).
    #[arg(long, value_name = "EVENTS", default_value_t = crate::bus::DEFAULT_REPLAY, value_parser = parse_replay)]
    pub replay: usize,
    /// Give the Unix sockets to this group (name or number): its members may connect. The
    /// mode stays 0660.
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,
    /// Serve TCP with TLS, with this certificate (PEM). Needed for addresses other than loopback.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require TLS clients to present a certificate signed by this CA (PEM): mutual TLS.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics (HOST:PORT, e.g. 127.0.0.1:9464).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,
    /// Export each closed connection as a log record, and the metrics, to this OTLP/gRPC
    /// receiver (http://HOST:PORT, e.g. an OpenTelemetry Collector on http://127.0.0.1:4317).
    #[arg(long, value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// Closed connections queued for OTLP while the receiver is slow or down; beyond it they are
    /// dropped and counted (tcptrace_events_lost_total{stage="otlp"}).
    #[arg(long, value_name = "N", default_value_t = 8192, value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    pub otlp_queue: u64,
}

impl AgentArgs {
    pub fn config(&self) -> AgentConfig {
        AgentConfig {
            listen: self.listen.clone(),
            capture: CaptureConfig {
                ring_bytes: self.ring_bytes,
                netns: self.netns,
                wakeup_interval: Duration::from_micros(self.wakeup_interval_us),
                classic_tracepoint: self.classic_tracepoint,
            },
            max_connections: self.max_connections,
            long_lived: Duration::from_secs(self.long_lived),
            max_peers: self.max_peers,
            heal_interval: Duration::from_secs(self.heal_interval),
            limits: Limits {
                subscriber_queue: self.subscriber_queue as usize,
                max_subscribers: self.max_subscribers,
                ..Limits::default()
            },
            replay: self.replay,
            access: Access {
                socket_group: self.socket_group.clone(),
                tls: match (&self.tls_cert, &self.tls_key) {
                    (Some(cert), Some(key)) => Some(TlsFiles {
                        cert: cert.clone(),
                        key: key.clone(),
                        client_ca: self.tls_client_ca.clone(),
                    }),
                    _ => None,
                },
            },
            export: ExportConfig {
                metrics: self.metrics,
                otlp: self.otlp_endpoint.as_ref().map(|endpoint| OtlpConfig {
                    endpoint: endpoint.clone(),
                    queue: self.otlp_queue as usize,
                    ..OtlpConfig::default()
                }),
            },
        }
    }
}

fn parse_ring_bytes(s: &str) -> Result<u32, String> {
    let n: u32 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of bytes"))?;
    if n < 4096 || !n.is_power_of_two() {
        return Err(format!(
            "{n} is not a power of two of at least 4096 (e.g. 8388608 for 8 MiB)"
        ));
    }
    if n > MAX_RING_BYTES {
        return Err(format!(
            "{n} bytes would keep {} MiB resident (twice the ring); at most {MAX_RING_BYTES} \
             (1 GiB)",
            (u64::from(n) * 2) >> 20
        ));
    }
    Ok(n)
}

/// The kernel maps a ring twice (for records that wrap around), all of it resident.
const MAX_RING_BYTES: u32 = 1 << 30;
/// Most events `--replay` may keep, and what each costs (measured by the service test).
const MAX_REPLAY: usize = 1_000_000;
const REPLAY_SLOT_BYTES: usize = 350;

fn parse_replay(s: &str) -> Result<usize, String> {
    let n: usize = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of events"))?;
    if n > MAX_REPLAY {
        return Err(format!(
            "{n} events would take about {} MiB (about {REPLAY_SLOT_BYTES} bytes each); at most \
             {MAX_REPLAY} (about {} MiB)",
            n.saturating_mul(REPLAY_SLOT_BYTES) >> 20,
            (MAX_REPLAY * REPLAY_SLOT_BYTES) >> 20
        ));
    }
    Ok(n)
}

/// 0 is no namespace's inode: a filter on it would trace nothing, silently.
fn parse_netns(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(0) => Err("0 is no namespace's inode; see `stat -L -c %i /proc/PID/ns/net`".into()),
        Ok(inode) => Ok(inode),
        Err(_) => Err(format!(
            "{s:?} is not a namespace inode (a number, as `stat -L -c %i /proc/PID/ns/net` prints)"
        )),
    }
}

#[derive(Debug, Args)]
pub struct ClientArgs {
    /// The agent's address: unix:PATH, HOST:PORT or PORT.
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "unix:/run/tcp-trace/tcp-trace.sock"
    )]
    pub connect: ListenAddr,
    /// Connect with TLS, trusting this CA (PEM) for the agent's certificate.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM), for agents that require one (mutual TLS).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Check the agent's certificate against this name instead of the address's host.
    #[arg(long, value_name = "NAME")]
    pub tls_domain: Option<String>,
}

impl ClientArgs {
    pub fn options(&self) -> ConnectOptions {
        let tls = self.tls_ca.is_some() || self.tls_cert.is_some() || self.tls_domain.is_some();
        ConnectOptions {
            tls: tls.then(|| ClientTls {
                ca: self.tls_ca.clone(),
                cert: self.tls_cert.clone(),
                key: self.tls_key.clone(),
                domain: self.tls_domain.clone(),
            }),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KindArg {
    StateChange,
    ConnectionClosed,
    Lost,
    Retransmit,
    Reset,
    Keepalive,
}

impl From<KindArg> for proto::EventKind {
    fn from(kind: KindArg) -> proto::EventKind {
        match kind {
            KindArg::StateChange => proto::EventKind::StateChange,
            KindArg::ConnectionClosed => proto::EventKind::ConnectionClosed,
            KindArg::Lost => proto::EventKind::Lost,
            KindArg::Retransmit => proto::EventKind::Retransmit,
            KindArg::Reset => proto::EventKind::Reset,
            KindArg::Keepalive => proto::EventKind::Keepalive,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DirectionArg {
    /// connect(): this host sent the SYN.
    Active,
    /// accept(): a SYN arrived at a listener here.
    Passive,
    /// Listening sockets.
    Listen,
    /// First seen mid-life.
    Unknown,
}

impl From<DirectionArg> for proto::Direction {
    fn from(d: DirectionArg) -> proto::Direction {
        match d {
            DirectionArg::Active => proto::Direction::Active,
            DirectionArg::Passive => proto::Direction::Passive,
            DirectionArg::Listen => proto::Direction::Listen,
            DirectionArg::Unknown => proto::Direction::Unknown,
        }
    }
}

fn parse_state(s: &str) -> Result<proto::TcpState, String> {
    let state = TcpState::from_name(&s.replace('-', "_")).ok_or_else(|| {
        let names: Vec<_> = TcpState::ALL.iter().map(|s| s.name()).collect();
        format!("{s:?} is not a TCP state ({})", names.join(", "))
    })?;
    Ok(crate::event::convert::state(state))
}

/// The server-side filter, as flags. Each flag is repeatable; all given flags must match.
#[derive(Debug, Args, Default)]
pub struct FilterArgs {
    /// Local or remote port.
    #[arg(long = "port", value_name = "PORT")]
    pub ports: Vec<u32>,
    /// Local or remote address or CIDR (198.51.100.0/24, ::1).
    #[arg(long = "addr", value_name = "IP[/PREFIX]")]
    pub addresses: Vec<String>,
    /// The connection owner's pid.
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// Network namespace inode.
    #[arg(long = "netns", value_name = "INODE")]
    pub netns: Vec<u64>,
    /// Event kind.
    #[arg(long = "kind", value_name = "KIND")]
    pub kinds: Vec<KindArg>,
    /// The connection owner's task name, exactly (as `ps -o comm` shows it, up to 15 bytes).
    #[arg(long = "comm", value_name = "NAME")]
    pub comms: Vec<String>,
    /// How the connection opened.
    #[arg(long = "direction", value_name = "DIRECTION")]
    pub directions: Vec<DirectionArg>,
    /// The connection's state after the event (ESTABLISHED, SYN_SENT, close-wait, ...); for
    /// `conns`, its current state.
    #[arg(long = "state", value_name = "STATE", value_parser = parse_state)]
    pub states: Vec<proto::TcpState>,
}

impl FilterArgs {
    pub fn to_proto(&self) -> proto::Filter {
        proto::Filter {
            ports: self.ports.clone(),
            addresses: self.addresses.clone(),
            pids: self.pids.clone(),
            netns: self.netns.clone(),
            kinds: self
                .kinds
                .iter()
                .map(|&k| proto::EventKind::from(k) as i32)
                .collect(),
            comms: self.comms.clone(),
            directions: self
                .directions
                .iter()
                .map(|&d| proto::Direction::from(d) as i32)
                .collect(),
            states: self.states.iter().map(|&s| s as i32).collect(),
        }
    }
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(flatten)]
    pub filter: FilterArgs,
    /// One JSON object per line (the proto3 JSON mapping of Event).
    #[arg(long)]
    pub json: bool,
    /// Stop after this many events.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// Resume: start after this seq (the last one a previous watch printed), with what was
    /// missed from the agent's replay buffer. A LOST line says how much was no longer held.
    #[arg(long, value_name = "SEQ", conflicts_with = "replay_last")]
    pub since_seq: Option<u64>,
    /// Start with the latest N matching events the agent holds, then go on live.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub replay_last: u32,
    /// Events the agent may queue for this client before it drops some (and says how many);
    /// 0 = the agent's default.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub queue: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SortArg {
    /// The order the agent first saw them.
    Id,
    /// Oldest first.
    Age,
    /// Slowest handshake first.
    Handshake,
}

impl From<SortArg> for proto::ConnectionOrder {
    fn from(s: SortArg) -> proto::ConnectionOrder {
        match s {
            SortArg::Id => proto::ConnectionOrder::Id,
            SortArg::Age => proto::ConnectionOrder::Age,
            SortArg::Handshake => proto::ConnectionOrder::HandshakeLatency,
        }
    }
}

#[derive(Debug, Args)]
pub struct ConnsArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(flatten)]
    pub filter: FilterArgs,
    /// JSON: the proto3 JSON mapping of one ListConnectionsResponse holding every page's
    /// connections.
    #[arg(long)]
    pub json: bool,
    /// Order of the list.
    #[arg(long, value_name = "ORDER", default_value = "id")]
    pub sort: SortArg,
    /// Show at most this many (the first in --sort order); 0 = all.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub limit: u32,
    /// Connections asked for per request; the agent sends fewer where a response would pass
    /// 3.5 MiB. Every page is fetched and shown either way. 0 = the agent's default (1000).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub page_size: u32,
}

#[derive(Debug, Args)]
pub struct TopArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Only peers in this network namespace (inode). Repeatable, as the peer flags below.
    #[arg(long = "netns", value_name = "INODE")]
    pub netns: Vec<u64>,
    /// Only peers of connections opened this way (active: services this host connects to;
    /// passive: clients of its listeners).
    #[arg(long = "direction", value_name = "DIRECTION")]
    pub directions: Vec<DirectionArg>,
    /// Only peers on this port (the remote service's port, or the local listener's).
    #[arg(long = "port", value_name = "PORT")]
    pub ports: Vec<u32>,
    /// Only peers in this address or CIDR.
    #[arg(long = "addr", value_name = "IP[/PREFIX]", value_parser = Cidr::parse)]
    pub addresses: Vec<Cidr>,
    /// Seconds between frames.
    #[arg(long, value_name = "SECONDS", default_value_t = 1.0, value_parser = parse_interval)]
    pub interval: f64,
    /// Print one frame, after one interval, and exit (no screen control codes).
    #[arg(long)]
    pub once: bool,
    /// Peers shown.
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub rows: usize,
}

impl TopArgs {
    pub fn peer_filter(&self) -> PeerFilter {
        PeerFilter {
            netns: self.netns.clone(),
            directions: self.directions.iter().map(|&d| d.into()).collect(),
            ports: self.ports.clone(),
            addresses: self.addresses.clone(),
        }
    }
}

fn parse_interval(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.05..=3600.0).contains(&v) => Ok(v),
        _ => Err(format!(
            "{s:?} is not a number of seconds from 0.05 to 3600"
        )),
    }
}

#[derive(Debug, Args)]
pub struct StatsArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// JSON (the proto3 JSON mapping of Stats).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct HealthArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The service to ask about (grpc.health.v1; "" is the server as a whole).
    #[arg(long, value_name = "NAME", default_value = "tcptrace.v1.TcpTrace")]
    pub service: String,
}

fn state_name(value: i32) -> &'static str {
    proto::TcpState::try_from(value)
        .map(|s| s.as_str_name().trim_start_matches("TCP_STATE_"))
        .unwrap_or("?")
}

/// `HH:MM:SS.micros` (UTC) of a timestamp.
fn write_time_of_day(out: &mut String, ts: Option<&prost_types::Timestamp>) {
    let Some(ts) = ts else {
        out.push_str("--:--:--.------");
        return;
    };
    let secs = ts.seconds.rem_euclid(86_400) as u32;
    let micros = (ts.nanos / 1000).clamp(0, 999_999) as u32;
    push_digits(out, secs / 3600, 2);
    out.push(':');
    push_digits(out, secs / 60 % 60, 2);
    out.push(':');
    push_digits(out, secs % 60, 2);
    out.push('.');
    push_digits(out, micros, 6);
}

/// `value` as exactly `width` decimal digits (zero-padded; `value` fits).
fn push_digits(out: &mut String, mut value: u32, width: usize) {
    let mut digits = [b'0'; 10];
    for d in digits[..width].iter_mut().rev() {
        *d = b'0' + (value % 10) as u8;
        value /= 10;
    }
    out.extend(digits[..width].iter().map(|&d| char::from(d)));
}

fn write_endpoint(out: &mut String, e: Option<&proto::Endpoint>) {
    match e {
        Some(e) if e.address.contains(':') => {
            let _ = write!(out, "[{}]:{}", e.address, e.port);
        }
        Some(e) => {
            let _ = write!(out, "{}:{}", e.address, e.port);
        }
        None => out.push('?'),
    }
}

#[cfg(test)]
fn endpoint(e: Option<&proto::Endpoint>) -> String {
    let mut out = String::new();
    write_endpoint(&mut out, e);
    out
}

/// Local and remote, with the arrow pointing from client to server.
fn write_tuple(out: &mut String, c: &proto::Connection) {
    write_endpoint(out, c.local.as_ref());
    let arrow = match proto::Direction::try_from(c.direction) {
        Ok(proto::Direction::Active) => " -> ",
        Ok(proto::Direction::Passive) => " <- ",
        Ok(proto::Direction::Listen) => {
            out.push_str(" (listening)");
            return;
        }
        _ => " -- ",
    };
    out.push_str(arrow);
    write_endpoint(out, c.remote.as_ref());
}

fn tuple(c: &proto::Connection) -> String {
    let mut out = String::new();
    write_tuple(&mut out, c);
    out
}

fn direction_name(value: i32) -> &'static str {
    match proto::Direction::try_from(value) {
        Ok(proto::Direction::Active) => "active",
        Ok(proto::Direction::Passive) => "passive",
        Ok(proto::Direction::Listen) => "listen",
        _ => "unknown",
    }
}

fn write_owner(out: &mut String, p: Option<&proto::Process>) {
    match p {
        Some(p) if p.attribution != proto::Attribution::None as i32 && p.pid != 0 => {
            let _ = write!(out, "{}/{}", p.pid, p.comm);
        }
        _ => out.push('-'),
    }
}

fn owner(p: Option<&proto::Process>) -> String {
    let mut out = String::new();
    write_owner(&mut out, p);
    out
}

fn write_duration(out: &mut String, d: Option<&prost_types::Duration>) {
    let Some(d) = d else {
        out.push('?');
        return;
    };
    let secs = d.seconds as f64 + f64::from(d.nanos) / 1e9;
    let _ = match secs {
        s if s < 1e-3 => write!(out, "{:.0}us", s * 1e6),
        s if s < 1.0 => write!(out, "{:.1}ms", s * 1e3),
        s => write!(out, "{s:.2}s"),
    };
}

fn duration(d: Option<&prost_types::Duration>) -> String {
    let mut out = String::new();
    write_duration(&mut out, d);
    out
}

/// One readable line per event.
pub fn event_line(event: &proto::Event) -> String {
    let mut line = String::new();
    write_event_line(&mut line, event);
    line
}

/// [`event_line`], appended to `line` (a buffer reused from event to event), with no newline.
pub fn write_event_line(line: &mut String, event: &proto::Event) {
    write_time_of_day(line, event.time.as_ref());
    let _ = write!(line, " {:>7} ", event.seq);
    let conn = event.connection.as_ref();
    if let Some(c) = conn {
        if c.id != 0 {
            let _ = write!(line, "conn {} ", c.id);
        }
        write_tuple(line, c);
        line.push(' ');
    }
    match &event.body {
        Some(proto::event::Body::StateChange(change)) => state_change_text(line, change, conn),
        Some(proto::event::Body::ConnectionClosed(closed)) => closed_text(line, closed),
        Some(proto::event::Body::Lost(lost)) if lost.stage == proto::LossStage::Kernel as i32 => {
            let _ = write!(
                line,
                "LOST up to {} transitions in the kernel ({} ring full, {} runs skipped): \
                 connections are healed from the kernel's socket list",
                lost.count, lost.ring_full, lost.runs_skipped
            );
        }
        Some(proto::event::Body::Lost(lost)) => {
            let _ = write!(
                line,
                "LOST {} events: this client read too slowly",
                lost.count
            );
        }
        Some(proto::event::Body::Retransmit(r)) => {
            let what = if r.state == proto::TcpState::SynSent as i32 {
                "SYN"
            } else {
                "segment"
            };
            let _ = write!(
                line,
                "{what} retransmitted (#{} in {})",
                r.count,
                state_name(r.state)
            );
        }
        Some(proto::event::Body::Reset(r)) => {
            line.push_str(if r.sent {
                "RESET sent"
            } else {
                "RESET received"
            });
            if r.without_socket {
                line.push_str(" (no socket: nothing listens there)");
            }
        }
        Some(proto::event::Body::Keepalive(k)) => keepalive_text(line, k),
        None => line.push_str("(empty event)"),
    }
    if let Some(c) = conn {
        let _ = write!(line, "  netns {}", c.netns);
    }
}

fn state_change_text(
    line: &mut String,
    change: &proto::StateChange,
    conn: Option<&proto::Connection>,
) {
    line.push_str(state_name(change.old_state));
    line.push_str(" -> ");
    line.push_str(state_name(change.new_state));
    if let Some(h) = &change.handshake {
        line.push_str("  handshake ");
        write_duration(line, h.latency.as_ref());
        if h.retransmits > 0 {
            let _ = write!(line, " after {} retransmit(s)", h.retransmits);
        }
    }
    if !change.error_name.is_empty() {
        line.push_str("  ");
        line.push_str(&change.error_name);
    }
    match change.task.as_ref() {
        Some(t) if t.attribution == proto::Attribution::ProcessContext as i32 => {
            let _ = write!(line, "  by {}/{}", t.pid, t.comm);
        }
        _ => {
            line.push_str("  in ");
            line.push_str(&change.context);
            if let Some(c) = conn {
                line.push_str(", owner ");
                write_owner(line, c.owner.as_ref());
            }
        }
    }
}

/// An enum value's name without its prefix, in lower case with spaces: `reset received`.
fn write_enum_name(out: &mut String, name: Option<&str>, prefix: &str) {
    match name {
        Some(name) => out.extend(name.trim_start_matches(prefix).chars().map(|c| {
            if c == '_' {
                ' '
            } else {
                c.to_ascii_lowercase()
            }
        })),
        None => out.push('?'),
    }
}

fn enum_name(name: Option<&str>, prefix: &str) -> String {
    let mut out = String::new();
    write_enum_name(&mut out, name, prefix);
    out
}

fn closed_text(line: &mut String, closed: &proto::ConnectionClosed) {
    let cause = proto::CloseCause::try_from(closed.cause)
        .ok()
        .map(|c| c.as_str_name());
    line.push_str("CLOSED ");
    write_enum_name(line, cause, "CLOSE_CAUSE_");
    if !closed.error_name.is_empty() {
        let _ = write!(line, " ({})", closed.error_name);
    }
    let first_fin = proto::Closer::try_from(closed.first_fin).ok();
    match first_fin {
        Some(proto::Closer::Local) => line.push_str(", closed here first"),
        Some(proto::Closer::Remote) => line.push_str(", peer closed first"),
        Some(proto::Closer::Simultaneous) => line.push_str(", both closed at once"),
        _ => {}
    }
    let lifetime = if closed.lifetime == proto::Lifetime::Long as i32 {
        "long-lived"
    } else {
        "short-lived"
    };
    line.push_str(" after ");
    write_duration(line, closed.duration.as_ref());
    let _ = write!(line, " ({lifetime})");
    if let Some(h) = &closed.handshake {
        line.push_str(", handshake ");
        write_duration(line, h.latency.as_ref());
        if h.retransmits > 0 {
            let _ = write!(line, " with {} retransmit(s)", h.retransmits);
        }
    } else if closed.failed_handshake_retransmits > 0 {
        let _ = write!(
            line,
            ", {} SYN retransmit(s)",
            closed.failed_handshake_retransmits
        );
    }
    if closed.bytes_sent > 0 || closed.bytes_received > 0 {
        let _ = write!(
            line,
            ", {} B out / {} B in",
            closed.bytes_sent, closed.bytes_received
        );
    }
    if closed.retransmits > 0 {
        let _ = write!(line, ", {} retransmits", closed.retransmits);
    }
    if closed.keepalive_probes > 0 {
        let _ = write!(line, ", {} keepalive probe(s)", closed.keepalive_probes);
    }
    line.push_str(": ");
    for (i, &state) in closed.path.iter().enumerate() {
        if i > 0 {
            line.push_str(" > ");
        }
        line.push_str(state_name(state));
    }
    if !closed.seen_open {
        line.push_str(" (opened before the agent saw it)");
    }
}

fn keepalive_text(line: &mut String, k: &proto::Keepalive) {
    use proto::keepalive::What;
    let settings = |line: &mut String| {
        if let Some(s) = &k.settings {
            let _ = write!(
                line,
                " (idle {}s, every {}s, {} probes)",
                s.idle_seconds, s.interval_seconds, s.count
            );
        }
    };
    match What::try_from(k.what) {
        Ok(What::Enabled) => {
            line.push_str("KEEPALIVE on");
            settings(line);
        }
        Ok(What::Disabled) => line.push_str("KEEPALIVE off"),
        Ok(What::Changed) => {
            line.push_str("KEEPALIVE changed");
            settings(line);
        }
        Ok(What::ProbeSent) => {
            let count = k.settings.as_ref().map(|s| s.count).unwrap_or(0);
            let _ = write!(line, "KEEPALIVE probe {} of {count} sent", k.probe);
        }
        Ok(What::PeerAnswered) => {
            let _ = write!(
                line,
                "KEEPALIVE peer answered after {} probe(s): alive",
                k.probe
            );
        }
        _ => line.push_str("KEEPALIVE ?"),
    }
    if let Some(by) = &k.by {
        let _ = write!(line, "  by {}/{}", by.pid, by.comm);
    }
}

/// The live connections as a table.
pub fn connections_table(
    conns: &[proto::Connection],
    matched: u64,
    now: std::time::SystemTime,
) -> String {
    let mut out = format!(
        "{:>8}  {:<8} {:<12} {:<46} {:<11} {:<22} {:>9}\n",
        "ID", "DIR", "STATE", "LOCAL / REMOTE", "NETNS", "OWNER", "AGE"
    );
    for c in conns {
        let age = c
            .opened_at
            .and_then(|t| std::time::SystemTime::try_from(t).ok())
            .and_then(|t| now.duration_since(t).ok())
            .and_then(|d| prost_types::Duration::try_from(d).ok());
        let _ = writeln!(
            out,
            "{:>8}  {:<8} {:<12} {:<46} {:<11} {:<22} {:>9}",
            c.id,
            direction_name(c.direction),
            state_name(c.state),
            tuple(c),
            c.netns,
            owner(c.owner.as_ref()),
            duration(age.as_ref()),
        );
    }
    if matched > conns.len() as u64 {
        let _ = write!(out, "{} of {matched} connections", conns.len());
    } else {
        let _ = write!(out, "{} connections", conns.len());
    }
    out
}

/// A peer as a user reads it: `-> ADDRESS:PORT` for a service this host connects to,
/// `<- ADDRESS on :PORT` for clients of a local port.
pub fn peer_label(p: &proto::PeerStats) -> String {
    let address = if p.address.contains(':') {
        format!("[{}]", p.address)
    } else {
        p.address.clone()
    };
    if p.direction == proto::Direction::Active as i32 {
        format!("-> {address}:{}", p.port)
    } else {
        format!("<- {address} on :{}", p.port)
    }
}

/// Per-peer aggregates: churn, handshake latency, failures.
pub fn peers_table(peers: &[proto::PeerStats]) -> String {
    let mut out = format!(
        "\n{:<48} {:>8} {:>7} {:>9} {:>9} {:>9} {:>7}  {}\n",
        "PEER", "OPENED", "CONN/S", "HS P50", "HS P99", "SHORT %", "FAILED", "FAILURES"
    );
    for p in peers {
        let peer = peer_label(p);
        let short = if p.closed > 0 {
            format!("{:.0}", 100.0 * p.short_lived as f64 / p.closed as f64)
        } else {
            "-".into()
        };
        let failures: Vec<String> = p
            .failures
            .iter()
            .map(|f| {
                let cause = proto::CloseCause::try_from(f.cause)
                    .ok()
                    .map(|c| c.as_str_name());
                format!("{} {}", f.count, enum_name(cause, "CLOSE_CAUSE_"))
            })
            .collect();
        let failed: u64 = p.failures.iter().map(|f| f.count).sum();
        let _ = writeln!(
            out,
            "{:<48} {:>8} {:>7.2} {:>9} {:>9} {:>9} {:>7}  {}",
            format!("{peer} (netns {})", p.netns),
            p.opened,
            p.opened_per_second,
            p.handshake_p50
                .as_ref()
                .map(|d| duration(Some(d)))
                .unwrap_or_else(|| "-".into()),
            p.handshake_p99
                .as_ref()
                .map(|d| duration(Some(d)))
                .unwrap_or_else(|| "-".into()),
            short,
            failed,
            failures.join(", ")
        );
    }
    out
}

pub fn stats_text(s: &proto::Stats) -> String {
    let mut out = String::new();
    let mut row = |name: &str, value: String| {
        let _ = writeln!(out, "{name:<28} {value}");
    };
    for k in &s.events {
        let kind = proto::EventKind::try_from(k.kind)
            .map(|k| k.as_str_name())
            .unwrap_or("?");
        row(
            &format!(
                "events {}",
                kind.trim_start_matches("EVENT_KIND_").to_lowercase()
            ),
            k.count.to_string(),
        );
    }
    row(
        "events published (last seq)",
        s.events_published.to_string(),
    );
    row("kernel records", s.kernel_records.to_string());
    row("kernel ring full (lost)", s.kernel_ring_full.to_string());
    row("kernel filtered (--netns)", s.kernel_filtered.to_string());
    row("kernel missed (nested BPF)", s.kernel_missed.to_string());
    row("records decoded", s.records_decoded.to_string());
    row("records malformed", s.records_malformed.to_string());
    row("live connections", s.live_connections.to_string());
    row("not followed (table full)", s.table_full.to_string());
    row("ends missed (cause unknown)", s.ends_missed.to_string());
    row(
        "healed: closed / adopted (heals)",
        format!("{} / {} ({})", s.healed_closed, s.healed_adopted, s.heals),
    );
    if let Some(r) = &s.replay {
        let held = match r.oldest_seq {
            0 => format!("{} of {} events", r.held, r.capacity),
            oldest => format!(
                "{} of {} events (seq {oldest} to {})",
                r.held, r.capacity, s.events_published
            ),
        };
        row("replay buffer", held);
    }
    row("subscribers", s.subscribers.to_string());
    row("subscriber drops", s.subscriber_drops.to_string());
    if let Some(t) = &s.subscriber_totals {
        row(
            "subscriber events",
            format!(
                "{} matched = {} delivered + {} dropped + {} queued + {} abandoned",
                t.matched, t.delivered, t.dropped, t.queued, t.abandoned
            ),
        );
    }
    row("hooks attached", s.hooks_attached.join(", "));
    row(
        "hooks missing",
        if s.hooks_missing.is_empty() {
            "none".into()
        } else {
            s.hooks_missing.join("; ")
        },
    );
    if let Some(h) = s.handshake_latency.as_ref().filter(|h| h.count > 0) {
        out.push_str("\nhandshake latency\n");
        out.push_str(&histogram_text(h));
    }
    if let Some(h) = s.connection_duration.as_ref().filter(|h| h.count > 0) {
        out.push_str("\nconnection duration (closed connections seen open)\n");
        out.push_str(&histogram_text(h));
    }
    if !s.peers.is_empty() {
        out.push_str(&peers_table(&s.peers));
    }
    if !s.subscriptions.is_empty() {
        out.push('\n');
        out.push_str(&subscribers_table(&s.subscriptions));
    }
    out.trim_end().to_owned()
}

/// One line per bucket up to the last non-empty one, with a bar scaled to the largest.
pub fn histogram_text(h: &proto::Histogram) -> String {
    let mut out = String::new();
    let largest = h.buckets.iter().map(|b| b.count).max().unwrap_or(0).max(1);
    let last = h.buckets.iter().rposition(|b| b.count > 0).unwrap_or(0);
    let mut lower = "0".to_string();
    for b in &h.buckets[..=last] {
        let upper = b
            .upper_bound
            .as_ref()
            .map_or_else(|| "inf".to_string(), |d| duration(Some(d)));
        let bar = "#".repeat(((b.count * 40).div_ceil(largest)) as usize);
        let line = format!(
            "  {:>18} {:>10}  {bar}",
            format!("{lower} - {upper}"),
            b.count
        );
        out.push_str(line.trim_end());
        out.push('\n');
        lower = upper;
    }
    let mean = h.sum.as_ref().map(|sum| {
        let ns = sum.seconds as f64 * 1e9 + f64::from(sum.nanos);
        let mean_ns = ns / h.count.max(1) as f64;
        duration(Some(&prost_types::Duration {
            seconds: (mean_ns / 1e9) as i64,
            nanos: (mean_ns % 1e9) as i32,
        }))
    });
    let _ = writeln!(
        out,
        "  {} connections, mean {}",
        h.count,
        mean.unwrap_or_else(|| "?".into())
    );
    out
}

/// Each subscriber's accounting: matched = delivered + dropped + queued.
pub fn subscribers_table(subs: &[proto::SubscriberStats]) -> String {
    let mut out = format!(
        "{:>5}  {:<24} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}  {}\n",
        "SUB", "PEER", "QUEUE", "QUEUED", "MATCHED", "DELIVERED", "DROPPED", "REPLAYED", "FILTER"
    );
    for s in subs {
        let _ = writeln!(
            out,
            "{:>5}  {:<24} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}  {}",
            s.id,
            s.peer,
            s.queue_capacity,
            s.queued,
            s.matched,
            s.delivered,
            s.dropped,
            s.replayed,
            s.filter
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(direction: proto::Direction) -> proto::Connection {
        proto::Connection {
            id: 7,
            local: Some(proto::Endpoint {
                address: "127.0.0.1".into(),
                port: 41000,
            }),
            remote: Some(proto::Endpoint {
                address: "127.0.0.1".into(),
                port: 8080,
            }),
            netns: 4026532000,
            direction: direction as i32,
            owner: Some(proto::Process {
                pid: 12,
                tid: 12,
                comm: "curl".into(),
                attribution: proto::Attribution::ProcessContext as i32,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_state_change_line_names_the_task_only_in_process_context() {
        let mut event = proto::Event {
            seq: 5,
            time: Some(prost_types::Timestamp {
                seconds: 3600 + 62,
                nanos: 1_500_000,
            }),
            connection: Some(conn(proto::Direction::Active)),
            body: Some(proto::event::Body::StateChange(proto::StateChange {
                old_state: proto::TcpState::Close as i32,
                new_state: proto::TcpState::SynSent as i32,
                task: Some(proto::Process {
                    pid: 12,
                    tid: 13,
                    comm: "curl".into(),
                    attribution: proto::Attribution::ProcessContext as i32,
                }),
                context: "process".into(),
                ..Default::default()
            })),
            ..Default::default()
        };
        assert_eq!(
            event_line(&event),
            "01:01:02.001500       5 conn 7 127.0.0.1:41000 -> 127.0.0.1:8080 CLOSE -> SYN_SENT  by 12/curl  netns 4026532000"
        );
        event.body = Some(proto::event::Body::StateChange(proto::StateChange {
            old_state: proto::TcpState::SynSent as i32,
            new_state: proto::TcpState::Established as i32,
            task: Some(proto::Process {
                attribution: proto::Attribution::None as i32,
                ..Default::default()
            }),
            context: "kernel".into(),
            ..Default::default()
        }));
        assert!(event_line(&event).contains("SYN_SENT -> ESTABLISHED  in kernel, owner 12/curl"));
    }

    #[test]
    fn a_closed_line_tells_the_whole_path_and_duration() {
        let event = proto::Event {
            seq: 9,
            connection: Some(conn(proto::Direction::Passive)),
            body: Some(proto::event::Body::ConnectionClosed(
                proto::ConnectionClosed {
                    path: [
                        proto::TcpState::Listen,
                        proto::TcpState::SynRecv,
                        proto::TcpState::Established,
                        proto::TcpState::Close,
                    ]
                    .iter()
                    .map(|&s| s as i32)
                    .collect(),
                    duration: Some(prost_types::Duration {
                        seconds: 0,
                        nanos: 2_500_000,
                    }),
                    seen_open: true,
                    cause: proto::CloseCause::ResetReceived as i32,
                    error_name: "ECONNRESET".into(),
                    first_fin: proto::Closer::None as i32,
                    lifetime: proto::Lifetime::Short as i32,
                    handshake: Some(proto::Handshake {
                        latency: Some(prost_types::Duration {
                            seconds: 1,
                            nanos: 20_000_000,
                        }),
                        retransmits: 1,
                    }),
                    ..Default::default()
                },
            )),
            ..Default::default()
        };
        let line = event_line(&event);
        assert!(line.contains("127.0.0.1:41000 <- 127.0.0.1:8080"), "{line}");
        assert!(
            line.contains(
                "CLOSED reset received (ECONNRESET) after 2.5ms (short-lived), handshake 1.02s with 1 retransmit(s): LISTEN > SYN_RECV > ESTABLISHED > CLOSE"
            ),
            "{line}"
        );
    }

    #[test]
    fn ipv6_endpoints_are_bracketed_and_ring_sizes_validated() {
        assert_eq!(
            endpoint(Some(&proto::Endpoint {
                address: "::1".into(),
                port: 80
            })),
            "[::1]:80"
        );
        assert!(parse_ring_bytes("4096").is_ok());
        assert!(
            parse_ring_bytes("5000")
                .unwrap_err()
                .contains("power of two")
        );
        assert!(parse_ring_bytes("lots").is_err());
        assert!(
            parse_ring_bytes("2147483648")
                .unwrap_err()
                .contains("4096 MiB")
        );
    }

    #[test]
    fn agent_sizes_beyond_their_bounds_are_refused_with_their_cost() {
        let agent = |flags: &[&str]| {
            Cli::try_parse_from(["tcp-trace", "agent"].iter().chain(flags))
                .map(|_| ())
                .map_err(|err| err.to_string())
        };
        assert!(agent(&["--replay", "1000000"]).is_ok());
        let replay = agent(&["--replay", "100000000"]).unwrap_err();
        assert!(replay.contains("about 33378 MiB"), "{replay}");
        assert!(
            agent(&["--netns", "0"])
                .unwrap_err()
                .contains("no namespace")
        );
        assert!(agent(&["--netns", "4026531840"]).is_ok());
        for flag in ["--max-connections", "--max-subscribers"] {
            assert!(agent(&[flag, "0"]).is_err(), "{flag} 0");
        }
        assert!(agent(&["--max-connections", "10000001"]).is_err());
        assert!(
            agent(&["--max-peers", "0"]).is_ok(),
            "peers: aggregation off"
        );
        assert!(agent(&["--max-peers", "1000001"]).is_err());
        assert!(agent(&["--subscriber-queue", "1048577"]).is_err());
    }

    #[test]
    fn filter_flags_become_the_proto_filter() {
        let cli = Cli::try_parse_from([
            "tcp-trace",
            "watch",
            "--port",
            "80",
            "--addr",
            "::1",
            "--kind",
            "connection-closed",
            "--netns",
            "5",
        ])
        .unwrap();
        let Command::Watch(watch) = cli.command else {
            panic!("watch parses as watch")
        };
        let f = watch.filter.to_proto();
        assert_eq!(f.ports, [80]);
        assert_eq!(f.addresses, ["::1"]);
        assert_eq!(f.netns, [5]);
        assert_eq!(f.kinds, [proto::EventKind::ConnectionClosed as i32]);
    }
}
