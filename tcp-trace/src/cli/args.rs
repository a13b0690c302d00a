//! The command line's arguments (clap): every subcommand, its flags, their defaults and checks.
use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum, builder::RangedU64ValueParser};

use crate::{
    agent::AgentConfig,
    api::{Access, Limits, ListenAddr, TlsFiles},
    capture::CaptureConfig,
    client::{ClientTls, ConnectOptions},
    export::{ExportConfig, OtlpConfig, OtlpLogs},
    filter::Cidr,
    model::TcpState,
    proto,
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
    #[arg(long, value_name = "ADDR", default_values_t = defaults().listen)]
    pub listen: Vec<ListenAddr>,
    /// Each CPU's kernel ring buffer, in bytes (a power of two, 4096 to 1 GiB); there is one per
    /// possible CPU, so the kernel memory is this times the CPUs. Records that find their CPU's
    /// ring full are lost in the kernel and counted (`stats`: kernel ring full).
    #[arg(long, value_name = "BYTES", default_value_t = defaults().capture.ring_bytes, value_parser = parse_ring_bytes)]
    pub ring_bytes: u32,
    /// Only trace sockets in this network namespace (inode, as `stat -L -c %i /proc/PID/ns/net`
    /// prints); filtered in the kernel. Default: every namespace.
    #[arg(long, value_name = "INODE", value_parser = parse_netns)]
    pub netns: Option<u32>,
    /// Most connections followed at once (1 to 10,000,000; about 500 bytes each); beyond it new
    /// connections are counted, not followed.
    #[arg(long, value_name = "N", default_value_t = defaults().max_connections, value_parser = RangedU64ValueParser::<usize>::new().range(1..=10_000_000))]
    pub max_connections: usize,
    /// Longest a record may wait in the kernel before the agent reads it while a client
    /// subscribes, in microseconds. Lower is fresher, higher costs less CPU under heavy churn.
    /// With no subscriber, records wait up to 10 ms (or this, if longer): the table, metrics
    /// and summaries need them no sooner, and draining less often costs less.
    #[arg(long, value_name = "MICROSECONDS", default_value_t = defaults().capture.wakeup_interval.as_micros() as u64, value_parser = clap::value_parser!(u64).range(50..=1_000_000))]
    pub wakeup_interval_us: u64,
    /// Trace transitions, segment retransmits and resets received through the classic
    /// tracepoints even where the kernel takes the BTF ones (which cost less and which other
    /// tracers' programs never make the kernel skip). For kernels where a BTF program misbehaves.
    #[arg(long)]
    pub classic_tracepoint: bool,
    /// Record every state transition even while no subscriber asks for state changes, so that
    /// subscriptions resumed later (since_seq) replay them. By default the kernel records only
    /// opens, establishments and closes until someone asks: about half the records.
    #[arg(long)]
    pub all_transitions: bool,
    /// Socket slots in the kernel (a power of two up to 4,194,304, 112 bytes each; 0 for
    /// none). While nobody asks for every transition, a socket keeps its open and handshake in
    /// its slot and the kernel writes one record at its close instead of one per transition.
    /// A socket whose slot another holds is recorded as without slots (`stats`: kernel slot
    /// taken); the agent empties held slots about once a second and before any listing.
    #[arg(long, value_name = "N", default_value_t = defaults().capture.socket_slots, value_parser = parse_socket_slots)]
    pub socket_slots: u32,
    /// Events queued per subscriber before it starts losing events (it is told how many); a
    /// queue also holds at most --subscriber-queue-mib.
    #[arg(long, value_name = "N", default_value_t = defaults().limits.subscriber_queue as u64, value_parser = clap::value_parser!(u64).range(2..=1_048_576))]
    pub subscriber_queue: u64,
    /// Most MiB of events queued per subscriber, whatever its queue length: the memory one
    /// slow client may hold while it is behind (1 to 4096).
    #[arg(long, value_name = "MIB", default_value_t = (defaults().limits.subscriber_queue_bytes >> 20) as u64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub subscriber_queue_mib: u64,
    /// Closed connections that lived at least this many seconds count as long-lived, the rest
    /// as short-lived (churn that pooling or keepalive would avoid).
    #[arg(long, value_name = "SECONDS", default_value_t = defaults().long_lived.as_secs())]
    pub long_lived: u64,
    /// Most remote peers aggregated in `stats` (0 to 1,000,000); connections to more are
    /// counted, not aggregated.
    #[arg(long, value_name = "N", default_value_t = defaults().max_peers, value_parser = RangedU64ValueParser::<usize>::new().range(0..=1_000_000))]
    pub max_peers: usize,
    /// Seconds between comparisons of the connection table with the kernel's own socket list
    /// (also done right after the kernel loses records): connections whose CLOSE was lost are
    /// closed (cause UNKNOWN), sockets whose opening was lost are adopted. 0 turns it off.
    #[arg(long, value_name = "SECONDS", default_value_t = defaults().heal_interval.as_secs())]
    pub heal_interval: u64,
    /// Most subscribers at once (1 to 65,536); more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, value_name = "N", default_value_t = defaults().limits.max_subscribers, value_parser = RangedU64ValueParser::<usize>::new().range(1..=65_536))]
    pub max_subscribers: usize,
    /// Latest events kept for clients that reconnect (`watch --since-seq`) or ask for history
    /// (`--replay-last`); 0 turns replay off, at most 1,000,000. Each held event costs about
    /// 350 bytes (its encoding).
    #[arg(long, value_name = "EVENTS", default_value_t = defaults().replay, value_parser = parse_replay)]
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
    #[arg(long, value_name = "N", default_value_t = OtlpConfig::default().queue as u64, value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    pub otlp_queue: u64,
    /// Which closed connections --otlp-endpoint exports as log records: all, failures (refused,
    /// reset, timed out, unreachable, dead peer) or none (metrics only). A record costs the
    /// agent about as much as tracing the connection did.
    #[arg(long, value_name = "WHICH", value_enum, default_value_t = Logs::All, requires = "otlp_endpoint")]
    pub otlp_logs: Logs,
}

/// The agent's defaults, declared once in the library ([`AgentConfig::default`]): the flags
/// show them in `--help` and take them when not given.
fn defaults() -> AgentConfig {
    AgentConfig::default()
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
                all_transitions: self.all_transitions,
                socket_slots: self.socket_slots,
            },
            max_connections: self.max_connections,
            long_lived: Duration::from_secs(self.long_lived),
            max_peers: self.max_peers,
            heal_interval: Duration::from_secs(self.heal_interval),
            limits: Limits {
                subscriber_queue: self.subscriber_queue as usize,
                subscriber_queue_bytes: (self.subscriber_queue_mib as usize) << 20,
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
                    logs: match self.otlp_logs {
                        Logs::All => OtlpLogs::All,
                        Logs::Failures => OtlpLogs::Failures,
                        Logs::None => OtlpLogs::None,
                    },
                    ..OtlpConfig::default()
                }),
            },
        }
    }
}

/// `--otlp-logs`: which closed connections become OTLP log records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Logs {
    /// Every connection's end.
    All,
    /// Only failed connections: refused, reset, timed out, unreachable, dead peer.
    Failures,
    /// None: OTLP carries the metrics only.
    None,
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
            "{n} bytes per CPU would keep {} MiB resident per CPU (the agent maps each ring \
             twice); at most {MAX_RING_BYTES} (1 GiB)",
            (u64::from(n) * 2) >> 20
        ));
    }
    Ok(n)
}

fn parse_socket_slots(s: &str) -> Result<u32, String> {
    let n: u32 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of slots"))?;
    if n != 0 && (!n.is_power_of_two() || n > MAX_SOCKET_SLOTS) {
        return Err(format!(
            "{n} is not 0 or a power of two up to {MAX_SOCKET_SLOTS} (e.g. 16384)"
        ));
    }
    Ok(n)
}

/// 448 MiB of kernel memory.
const MAX_SOCKET_SLOTS: u32 = 1 << 22;

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
    #[arg(long, value_name = "ADDR", default_value_t = ListenAddr::default())]
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_sizes_are_powers_of_two_up_to_1_gib() {
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
    fn an_agent_without_flags_runs_with_the_librarys_defaults() {
        let Command::Agent(agent) = Cli::try_parse_from(["tcp-trace", "agent"]).unwrap().command
        else {
            panic!("agent parses as agent")
        };
        assert_eq!(
            format!("{:?}", agent.config()),
            format!("{:?}", AgentConfig::default())
        );
        let Command::Stats(stats) = Cli::try_parse_from(["tcp-trace", "stats"]).unwrap().command
        else {
            panic!("stats parses as stats")
        };
        assert_eq!(stats.client.connect, ListenAddr::default());
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
        for mib in ["0", "4097"] {
            assert!(
                agent(&["--subscriber-queue-mib", mib]).is_err(),
                "{mib} MiB"
            );
        }
        let Command::Agent(small) =
            Cli::try_parse_from(["tcp-trace", "agent", "--subscriber-queue-mib", "16"])
                .unwrap()
                .command
        else {
            panic!("agent parses as agent")
        };
        assert_eq!(small.config().limits.subscriber_queue_bytes, 16 << 20);
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
