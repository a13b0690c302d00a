//! tcp-trace's benchmark: what `cargo xtask bench` runs (the `tcp-trace-bench` binary, see
//! main.rs), and what tcp-trace's `tests/bench_smoke.rs` runs in `--quick` mode.
//!
//! Every run gets a fresh network namespace on loopback (tcp-trace-test-support's `NetNs`, the
//! one the integration tests use), so its kernel counters (/proc/net/snmp) count exactly the
//! bench's connections, whatever else the machine runs. The tracers run as child processes in
//! the host namespace and see every namespace; consumers count only the bench namespace's
//! events. Phases (`--phases` picks some; [`PHASES`] lists them in the order they run):
//!
//! - `churn`: paired rounds at full churn, one worker per CPU, interleaved (each round runs
//!   every variant, starting one further along each time): no tracer, tcp-trace with 1 and 10
//!   subscribers, bpftrace;
//! - `always-on`: the same with tcp-trace running and nobody subscribed (the agent still keeps
//!   its table, summaries and metrics), against no tracer;
//! - `spare`: the same with one worker, so a tracer has a CPU to itself;
//! - `trickle`: 50 connections/s with one subscriber, for latency without load;
//! - `stats`: BPF run-time stats (enabled only here, as they cost every program two clock
//!   reads): tcp-trace with 0 and 1 subscribers, with its kernel-side --netns filter, bpftrace,
//!   and an empty program on the same tracepoint (the floor);
//! - `scaling`: 1, 10 and 100 subscribers at a fixed moderate rate;
//! - `redis`: a real server, redis-server, driven by `redis-benchmark -k 0` (a new connection
//!   per request) in paired rounds: no tracer, tcp-trace with 0 and 1 subscribers, bpftrace;
//! - `population`: the agent's memory with a large idle population tracked, without and with
//!   a subscriber;
//! - `clients`: events per second `watch` prints into a file, JSON and text, from a replayed
//!   history.
pub mod clients;
pub mod export;
pub mod figures;
pub mod floor;
mod plot;
pub mod redis;
pub mod report;
mod run;
pub mod stats;
pub mod subscribers;
pub mod tracer;
pub mod workload;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};

use self::{
    redis::{RedisSpec, RedisTools},
    run::Workload,
    stats::Histogram,
    tracer::{AgentCounters, ProcSample, ProgStats},
    workload::{ChurnResult, ChurnSpec, TcpCounters},
};

/// Events tcp-trace publishes per connection: 5 transitions on each side (client CLOSE >
/// SYN_SENT > ESTABLISHED > FIN_WAIT1 > FIN_WAIT2 > CLOSE; server LISTEN > SYN_RECV >
/// ESTABLISHED > CLOSE_WAIT > LAST_ACK > CLOSE) and one closing summary per side.
pub const AGENT_EVENTS_PER_CONNECTION: u64 = 12;
/// Per listening socket: CLOSE > LISTEN, LISTEN > CLOSE and its summary.
pub const AGENT_EVENTS_PER_LISTENER: u64 = 3;
/// bpftrace prints transitions only.
pub const TRANSITIONS_PER_CONNECTION: u64 = 10;
pub const TRANSITIONS_PER_LISTENER: u64 = 2;

/// Thread-name prefix of the bench's own consumers (gRPC subscribers, bpftrace reader).
const CONSUMER_THREADS: &str = "bench-sub";

#[derive(Clone, Debug)]
pub struct Options {
    pub quick: bool,
    /// Paired rounds at full churn.
    pub rounds: usize,
    /// Length of one churn run.
    pub duration: Duration,
    /// Churn worker threads (each connects to its own listener).
    pub concurrency: usize,
    /// Workers of the spare-CPU phase (fewer than CPUs, so a tracer has a CPU of its own).
    pub spare_concurrency: usize,
    pub trickle_rate: f64,
    pub trickle_rounds: usize,
    pub trickle_duration: Duration,
    pub stats_rounds: usize,
    pub stats_duration: Duration,
    pub scaling_rate: f64,
    pub scaling_rounds: usize,
    pub scaling_duration: Duration,
    pub scaling_subscribers: Vec<usize>,
    /// `redis-benchmark -k 0`: requests per run (each a connection) and parallel clients.
    pub redis: RedisSpec,
    /// Idle keepalive connections held open during every churn run (0 = none).
    pub idle: usize,
    /// Connections opened for the memory figure (each is two tracked sockets).
    pub population: usize,
    /// How fast idle connections are opened (connections per second).
    pub population_rate: f64,
    pub keepalive: Duration,
    /// After the workload, how long consumers may take to read everything (at least the run's
    /// length); what they have not read by then counts as lost.
    pub drain_timeout: Duration,
    /// The `tcp-trace` binary to run as the agent.
    pub agent: PathBuf,
    /// The program to re-run as a population holder when the population exceeds this
    /// process's fd limit (the bench binary itself; None in the smoke test).
    pub holder_exe: Option<PathBuf>,
    pub bpftrace: Option<PathBuf>,
    /// redis-server and redis-benchmark, if installed (`cargo xtask bench` installs them).
    pub redis_tools: Option<RedisTools>,
    /// Where report.md, report.svg, runs.csv and the tracers' logs go.
    pub out_dir: PathBuf,
    /// The command line to print in the report.
    pub command: String,
    /// Phases to run (names from [`PHASES`]); the others are skipped and their rows empty.
    pub phases: Vec<String>,
}

impl Options {
    pub fn full(agent: PathBuf, out_dir: PathBuf) -> Options {
        Options {
            quick: false,
            rounds: 5,
            duration: Duration::from_secs(3),
            concurrency: std::thread::available_parallelism().map_or(2, |n| n.get()),
            spare_concurrency: 1,
            trickle_rate: 50.0,
            trickle_rounds: 3,
            trickle_duration: Duration::from_secs(3),
            stats_rounds: 3,
            stats_duration: Duration::from_secs(2),
            scaling_rate: 500.0,
            scaling_rounds: 3,
            scaling_duration: Duration::from_secs(2),
            scaling_subscribers: vec![1, 10, 100],
            // About 4 s at the 12,000-15,000 requests/s of these machines; fewer than the
            // namespace's 64,000 ephemeral ports, which the clients' TIME_WAITs hold.
            redis: RedisSpec {
                requests: 50_000,
                clients: 20,
                timeout: Duration::from_secs(60),
            },
            idle: 0,
            population: 50_000,
            population_rate: 10_000.0,
            keepalive: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(2),
            agent,
            holder_exe: None,
            bpftrace: tracer::find_bpftrace(),
            redis_tools: RedisTools::find(),
            out_dir,
            command: "cargo xtask bench".into(),
            phases: PHASES.iter().map(|p| p.to_string()).collect(),
        }
    }

    pub fn wants(&self, phase: &str) -> bool {
        self.phases.iter().any(|p| p == phase)
    }

    /// Every phase and every row, in a few seconds: for the smoke test, not for numbers.
    pub fn quick(agent: PathBuf, out_dir: PathBuf) -> Options {
        Options {
            quick: true,
            rounds: 1,
            duration: Duration::from_millis(150),
            trickle_rounds: 1,
            trickle_duration: Duration::from_millis(300),
            stats_rounds: 1,
            stats_duration: Duration::from_millis(150),
            scaling_rate: 200.0,
            scaling_rounds: 1,
            scaling_duration: Duration::from_millis(200),
            redis: RedisSpec {
                requests: 2_000,
                clients: 20,
                timeout: Duration::from_secs(30),
            },
            drain_timeout: Duration::from_millis(500),
            idle: 20,
            population: 300,
            command: "cargo xtask bench --quick".into(),
            ..Options::full(agent, out_dir)
        }
    }
}

/// Who watches the workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tracer {
    None,
    Agent {
        subscribers: usize,
        /// `--netns <the bench namespace>`: other namespaces' transitions are dropped in the
        /// kernel program.
        kernel_filter: bool,
        /// `--socket-slots 0`: every socket's transitions recorded as they happen, as before
        /// the slots (docs/always-on-slots.md), to compare with them in one run.
        without_slots: bool,
    },
    Bpftrace,
    /// bpftrace with an empty action on the tracepoint: the floor of any program's cost there
    /// (tracepoint dispatch, and the run-time stats' own clock reads).
    EmptyProgram,
    /// A cut-down state program on the BTF tracepoint, attached by the bench itself: the floor
    /// of one part of the agent's path.
    Floor(floor::FloorProgram),
}

impl Tracer {
    pub fn is_bpftrace(&self) -> bool {
        matches!(self, Tracer::Bpftrace | Tracer::EmptyProgram)
    }

    pub const fn agent(subscribers: usize) -> Tracer {
        Tracer::Agent {
            subscribers,
            kernel_filter: false,
            without_slots: false,
        }
    }

    pub fn label(&self) -> String {
        match self {
            Tracer::None => "no tracer".into(),
            Tracer::Agent {
                subscribers,
                kernel_filter,
                without_slots,
            } => format!(
                "tcp-trace{}{}, {subscribers} subscriber{}",
                if *kernel_filter { " --netns" } else { "" },
                if *without_slots {
                    " --socket-slots 0"
                } else {
                    ""
                },
                if *subscribers == 1 { "" } else { "s" }
            ),
            Tracer::Bpftrace => "bpftrace".into(),
            Tracer::EmptyProgram => "empty program (bpftrace)".into(),
            Tracer::Floor(program) => program.label().into(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Full churn, one worker per CPU: every cycle a tracer uses is taken from the workload.
    Churn,
    /// Full churn with the agent running and nobody subscribed.
    AlwaysOn,
    /// Full churn from fewer workers (one), leaving a CPU to the tracer.
    Spare,
    Trickle,
    BpfStats,
    Scaling,
    /// redis-server under `redis-benchmark -k 0`.
    Redis,
}

impl Phase {
    /// The name `--phases` takes.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Churn => "churn",
            Phase::AlwaysOn => "always-on",
            Phase::Spare => "spare",
            Phase::Trickle => "trickle",
            Phase::BpfStats => "stats",
            Phase::Scaling => "scaling",
            Phase::Redis => "redis",
        }
    }
}

/// Every phase `--phases` takes, in the order they run.
pub const PHASES: &[&str] = &[
    "churn",
    "always-on",
    "spare",
    "trickle",
    "stats",
    "scaling",
    "redis",
    "export",
    "population",
    "clients",
];

/// What the agent did during a run.
#[derive(Clone, Copy, Debug, Default)]
pub struct AgentRun {
    pub counters: AgentCounters,
}

/// One run: a workload in a fresh namespace, watched by one tracer.
#[derive(Debug)]
pub struct RunResult {
    pub phase: Phase,
    pub tracer: Tracer,
    pub round: usize,
    pub churn: ChurnResult,
    /// The namespace's Tcp counters over the workload.
    pub kernel: TcpCounters,
    /// Events each consumer should have received, from the kernel counters.
    pub expected: u64,
    /// Events each consumer received (one entry per subscriber; one for bpftrace).
    pub delivered: Vec<u64>,
    /// Losses the tracer itself reported to a consumer (Lost events, bpftrace's "Lost").
    pub reported_lost: u64,
    pub foreign: u64,
    pub latency: Histogram,
    /// CPU and memory of the tracer process (agent or bpftrace) over the run.
    pub tracer_proc: Option<ProcSample>,
    pub agent: Option<AgentRun>,
    /// Transitions the tracer handled in every namespace (the agent's decoded records,
    /// bpftrace's event lines): the denominator of its CPU cost.
    pub tracer_records: u64,
    /// CPU of the bench's consumer threads over the run.
    pub consumer_cpu_s: f64,
    /// CPU the tracer process and the consumers used after the workload stopped, catching up
    /// (see [`RunResult::counted_rate`]).
    pub deferred_cpu_s: f64,
    /// CPU used over the run by other processes holding BPF programs (other tracers).
    pub foreign_cpu_s: f64,
    /// The tracer's BPF programs over the run (stats phase only).
    pub progs: Vec<ProgStats>,
    /// CPU of a floor's drain thread over the run: its records read from the rings, merged and
    /// decoded, nothing else (what any agent with these records pays at least).
    pub floor_drain_cpu_s: f64,
}

impl RunResult {
    pub fn rate(&self) -> f64 {
        self.churn.connections as f64 / self.churn.elapsed.as_secs_f64()
    }

    /// The rate with the tracer's and the consumers' late work counted: CPU they spent after
    /// the workload stopped (draining a backlog) would, on a host that stays busy, have been
    /// taken from the workload, so it is charged to the run as that many CPU-seconds of the
    /// machine's `cpus`, i.e. `deferred_cpu_s / cpus` more seconds. Their CPU during the run
    /// is already counted: they share the workload's CPUs.
    pub fn counted_rate(&self, cpus: usize) -> f64 {
        let seconds = self.churn.elapsed.as_secs_f64() + self.deferred_cpu_s / cpus.max(1) as f64;
        self.churn.connections as f64 / seconds
    }

    /// Events the worst consumer missed.
    pub fn worst_loss(&self) -> u64 {
        self.delivered
            .iter()
            .map(|&d| self.expected.saturating_sub(d))
            .max()
            .unwrap_or(0)
    }
}

/// The idle-population memory figure.
#[derive(Debug, Default)]
pub struct PopulationResult {
    pub connections: usize,
    pub subscribers: usize,
    /// Sockets the agent's table held when memory was read.
    pub tracked: u64,
    pub rss_before_kib: u64,
    pub rss_kib: u64,
    pub hwm_kib: u64,
    pub open_secs: f64,
    /// The agent's largest mappings (KiB, perms and name) with the population open.
    pub mappings: Vec<(u64, String)>,
    /// The agent's counters over the opening (all namespaces).
    pub agent: AgentCounters,
}

pub struct Results {
    pub runs: Vec<RunResult>,
    /// Without a subscriber, then with one.
    pub population: Vec<PopulationResult>,
    /// `watch` printing a replayed history (the `clients` phase).
    pub clients: Vec<clients::ClientRun>,
    pub wall: Duration,
    pub machine: MachineLoad,
}

/// What else the machine was doing: the bench shares it, so the report says so.
#[derive(Debug, Default)]
pub struct MachineLoad {
    /// /proc/loadavg before and after.
    pub loadavg_before: String,
    pub loadavg_after: String,
    /// Other processes holding BPF programs when the bench started and ended (another tracer
    /// runs its programs on every run, the untraced ones included).
    pub holders_before: Vec<ProgramHolder>,
    pub holders_after: Vec<ProgramHolder>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgramHolder {
    pub pid: u32,
    pub command: String,
    pub programs: usize,
}

/// Processes other than this one that hold BPF program fds.
fn program_holders() -> Vec<ProgramHolder> {
    let me = std::process::id();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let programs = fds
            .flatten()
            .filter(|fd| {
                std::fs::read_link(fd.path())
                    .is_ok_and(|t| t.to_string_lossy() == "anon_inode:bpf-prog")
            })
            .count();
        if programs > 0 {
            let command = std::fs::read_to_string(entry.path().join("cmdline"))
                .unwrap_or_default()
                .replace('\0', " ")
                .trim()
                .chars()
                .take(100)
                .collect();
            out.push(ProgramHolder {
                pid,
                command,
                programs,
            });
        }
    }
    out
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs every phase and writes the report; returns it.
pub fn run(opts: &Options) -> Result<report::Report> {
    ensure!(
        opts.agent.is_file(),
        "no agent binary at {}",
        opts.agent.display()
    );
    std::fs::create_dir_all(&opts.out_dir)
        .with_context(|| format!("create {}", opts.out_dir.display()))?;
    workload::raise_nofile();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(CONSUMER_THREADS)
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    let started = Instant::now();
    let machine_before = (loadavg(), program_holders());
    let results = runtime.block_on(run_phases(opts));
    tcp_trace_test_support::process::reap_stopped();
    let results = Results {
        wall: started.elapsed(),
        machine: MachineLoad {
            loadavg_before: machine_before.0,
            loadavg_after: loadavg(),
            holders_before: machine_before.1,
            holders_after: program_holders(),
        },
        ..results?
    };
    report::write(opts, &results)
}

async fn run_phases(opts: &Options) -> Result<Results> {
    let mut runs = Vec::new();
    let full = |concurrency, duration| {
        Workload::Churn(ChurnSpec {
            concurrency,
            rate: None,
            duration,
        })
    };
    let paced = |rate, duration| {
        Workload::Churn(ChurnSpec {
            concurrency: opts.concurrency,
            rate: Some(rate),
            duration,
        })
    };
    let installed = |list: &[Tracer]| -> Vec<Tracer> {
        list.iter()
            .copied()
            .filter(|t| opts.bpftrace.is_some() || !t.is_bpftrace())
            .collect()
    };
    let stats = if opts.wants("stats") {
        if opts.quick {
            // bpftrace takes seconds to start and stop.
            [Tracer::agent(0), Tracer::agent(1)]
                .into_iter()
                .chain(floor::FloorProgram::ALL.map(Tracer::Floor))
                .collect()
        } else {
            installed(&[
                Tracer::agent(0),
                Tracer::agent(1),
                // Kernel-side filtering makes other namespaces' transitions cheap, which
                // would flatter the cost per event: measured separately.
                Tracer::Agent {
                    subscribers: 1,
                    kernel_filter: true,
                    without_slots: false,
                },
                Tracer::Bpftrace,
                Tracer::EmptyProgram,
            ])
            .into_iter()
            .chain(floor::FloorProgram::ALL.map(Tracer::Floor))
            .collect()
        }
    } else if opts.wants("always-on") {
        // The always-on figure's BPF cost, without the rest of the stats phase, with and
        // without the socket slots.
        vec![
            Tracer::agent(0),
            Tracer::Agent {
                subscribers: 0,
                kernel_filter: false,
                without_slots: true,
            },
        ]
    } else {
        Vec::new()
    };
    let redis = match &opts.redis_tools {
        Some(_) => installed(&[
            Tracer::None,
            Tracer::agent(0),
            Tracer::Agent {
                subscribers: 0,
                kernel_filter: false,
                without_slots: true,
            },
            Tracer::agent(1),
            Tracer::Bpftrace,
        ]),
        None => {
            if opts.wants("redis") {
                eprintln!("bench: redis-server or redis-benchmark is not installed: no redis rows");
            }
            Vec::new()
        }
    };
    let plan = [
        (
            Phase::Churn,
            installed(&[
                Tracer::None,
                Tracer::agent(1),
                Tracer::agent(10),
                Tracer::Bpftrace,
            ]),
            opts.rounds,
            full(opts.concurrency, opts.duration),
        ),
        (
            Phase::AlwaysOn,
            // The floor writes the records the always-on agent's state program writes, and its
            // drain reads them as the agent does: the least the agent's CPU can be. The
            // storage floor does the same for a design that keeps each socket's state in the
            // socket and writes one record per end: the least such a design can cost. The
            // aggregate floor is the design that writes none: metrics and peers in the kernel.
            vec![
                Tracer::None,
                Tracer::agent(0),
                // Today's agent against the one before the slots, side by side.
                Tracer::Agent {
                    subscribers: 0,
                    kernel_filter: false,
                    without_slots: true,
                },
                Tracer::Floor(floor::FloorProgram::Record),
                Tracer::Floor(floor::FloorProgram::StorageEnd),
                Tracer::Floor(floor::FloorProgram::HashEnd),
                Tracer::Floor(floor::FloorProgram::HashFew),
                Tracer::Floor(floor::FloorProgram::Slots),
                Tracer::Floor(floor::FloorProgram::SlotsFull),
                Tracer::Floor(floor::FloorProgram::Aggregate),
            ],
            opts.rounds,
            full(opts.concurrency, opts.duration),
        ),
        (
            Phase::Spare,
            installed(&[Tracer::None, Tracer::agent(1), Tracer::Bpftrace]),
            opts.rounds,
            full(opts.spare_concurrency, opts.duration),
        ),
        (
            Phase::Trickle,
            vec![Tracer::agent(1)],
            opts.trickle_rounds,
            paced(opts.trickle_rate, opts.trickle_duration),
        ),
        (
            Phase::BpfStats,
            stats,
            opts.stats_rounds,
            full(opts.concurrency, opts.stats_duration),
        ),
        (
            Phase::Scaling,
            opts.scaling_subscribers
                .iter()
                .map(|&n| Tracer::agent(n))
                .collect(),
            opts.scaling_rounds,
            paced(opts.scaling_rate, opts.scaling_duration),
        ),
        (
            Phase::Redis,
            redis,
            opts.rounds,
            Workload::Redis(opts.redis),
        ),
    ];
    for (phase, tracers, count, workload) in plan {
        // The stats phase's list already says whether it runs.
        let wanted = phase == Phase::BpfStats || opts.wants(phase.name());
        if wanted && count > 0 && !tracers.is_empty() {
            run::rounds(opts, &mut runs, phase, &tracers, count, workload).await?;
        }
    }
    let mut populations = Vec::new();
    if opts.population > 0 && opts.wants("population") {
        // The table alone, then with a subscriber reading what opening them sent.
        for subscribers in [0, 1] {
            eprintln!(
                "bench: agent memory with {} idle connections tracked, {subscribers} subscribers",
                opts.population
            );
            populations.push(run::population(opts, subscribers).await?);
        }
    }
    let clients = if opts.wants("clients") {
        clients::client_rates(opts).await?
    } else {
        Vec::new()
    };
    if opts.wants("export") {
        // Writes its own report (export.md) beside the main one.
        export::export_cost(opts).await?;
    }
    Ok(Results {
        runs,
        population: populations,
        clients,
        wall: Duration::ZERO,
        machine: Default::default(),
    })
}
