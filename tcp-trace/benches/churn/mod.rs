//! The churn benchmark harness: what `cargo xtask bench` runs (through `benches/churn.rs`), and
//! what `tests/bench_smoke.rs` runs in `--quick` mode.
//!
//! Every run gets a fresh anonymous network namespace on loopback, so its kernel counters
//! (/proc/net/snmp) count exactly the bench's connections, whatever else the machine runs. The
//! tracers run as child processes in the host namespace and see every namespace; consumers
//! count only the bench namespace's events. Phases (`--phases` picks some):
//!
//! 1. `churn`: paired rounds at full churn, one worker per CPU, interleaved (each round runs
//!    every variant, starting one further along each time): no tracer, tcp-trace with 1 and 10
//!    subscribers, bpftrace;
//! 2. `spare`: the same with one worker, so a tracer has a CPU to itself;
//! 3. `trickle`: 50 connections/s with one subscriber, for latency without load;
//! 4. `stats`: BPF run-time stats (enabled only here, as they cost every program two clock
//!    reads): tcp-trace, tcp-trace with its kernel-side --netns filter, bpftrace, and an empty
//!    program on the same tracepoint (the floor);
//! 5. `scaling`: 1, 10 and 100 subscribers at a fixed moderate rate;
//! 6. `population`: the agent's memory with a large idle population tracked, without and with
//!    a subscriber;
//! 7. `clients`: events per second `watch` prints into a file, JSON and text, from a replayed
//!    history.

// The bench binary and the smoke test each use a part of the harness.
#![allow(dead_code)]
pub mod clients;
pub mod export;
pub mod netns;
pub mod report;
mod report_svg;
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
    netns::{Netns, TcpCounters},
    stats::Histogram,
    subscribers::Subscribers,
    tracer::{AgentCounters, AgentProcess, BpftraceProcess, ProcSample, ProgStats},
    workload::{ChurnResult, ChurnSpec, Population},
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
            idle: 0,
            population: 50_000,
            population_rate: 10_000.0,
            keepalive: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(2),
            agent,
            holder_exe: None,
            bpftrace: tracer::find_bpftrace(),
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
    },
    Bpftrace,
    /// bpftrace with an empty action on the tracepoint: the floor of any program's cost there
    /// (tracepoint dispatch, and the run-time stats' own clock reads).
    EmptyProgram,
}

impl Tracer {
    pub fn is_bpftrace(&self) -> bool {
        matches!(self, Tracer::Bpftrace | Tracer::EmptyProgram)
    }

    pub const fn agent(subscribers: usize) -> Tracer {
        Tracer::Agent {
            subscribers,
            kernel_filter: false,
        }
    }

    pub fn label(&self) -> String {
        match self {
            Tracer::None => "no tracer".into(),
            Tracer::Agent {
                subscribers,
                kernel_filter,
            } => format!(
                "tcp-trace{}, {subscribers} subscriber{}",
                if *kernel_filter { " --netns" } else { "" },
                if *subscribers == 1 { "" } else { "s" }
            ),
            Tracer::Bpftrace => "bpftrace".into(),
            Tracer::EmptyProgram => "empty program (bpftrace)".into(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Full churn, one worker per CPU: every cycle a tracer uses is taken from the workload.
    Churn,
    /// Full churn from fewer workers (one), leaving a CPU to the tracer.
    Spare,
    Trickle,
    BpfStats,
    Scaling,
}

impl Phase {
    /// The name `--phases` takes.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Churn => "churn",
            Phase::Spare => "spare",
            Phase::Trickle => "trickle",
            Phase::BpfStats => "stats",
            Phase::Scaling => "scaling",
        }
    }
}

/// Every phase `--phases` takes, in the order they run.
pub const PHASES: &[&str] = &[
    "churn",
    "spare",
    "trickle",
    "stats",
    "scaling",
    "population",
    "clients",
    "export",
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
    /// CPU used over the run by other processes holding BPF programs (other tracers).
    pub foreign_cpu_s: f64,
    /// The tracer's BPF programs over the run (stats phase only).
    pub progs: Vec<ProgStats>,
}

impl RunResult {
    pub fn rate(&self) -> f64 {
        self.churn.connections as f64 / self.churn.elapsed.as_secs_f64()
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
    tracer::reap_stopped();
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
    let full = |concurrency, duration| ChurnSpec {
        concurrency,
        rate: None,
        duration,
    };
    let paced = |rate, duration| ChurnSpec {
        concurrency: opts.concurrency,
        rate: Some(rate),
        duration,
    };
    let installed = |list: &[Tracer]| -> Vec<Tracer> {
        list.iter()
            .copied()
            .filter(|t| opts.bpftrace.is_some() || !t.is_bpftrace())
            .collect()
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
            if opts.quick {
                // bpftrace takes seconds to start and stop.
                vec![Tracer::agent(1)]
            } else {
                installed(&[
                    Tracer::agent(1),
                    // Kernel-side filtering makes other namespaces' transitions cheap, which
                    // would flatter the cost per event: measured separately.
                    Tracer::Agent {
                        subscribers: 1,
                        kernel_filter: true,
                    },
                    Tracer::Bpftrace,
                    Tracer::EmptyProgram,
                ])
            },
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
    ];
    for (phase, tracers, count, spec) in plan {
        if opts.wants(phase.name()) && count > 0 {
            rounds(opts, &mut runs, phase, &tracers, count, spec).await?;
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
            populations.push(population(opts, subscribers).await?);
        }
    }
    let clients = if opts.wants("clients") {
        clients::client_rates(opts).await?
    } else {
        Vec::new()
    };
    if opts.wants("export") {
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

/// `count` rounds of every tracer in `tracers`, round r starting at the r-th tracer.
async fn rounds(
    opts: &Options,
    runs: &mut Vec<RunResult>,
    phase: Phase,
    tracers: &[Tracer],
    count: usize,
    spec: ChurnSpec,
) -> Result<()> {
    let _stats = if phase == Phase::BpfStats {
        Some(tracer::enable_bpf_stats()?)
    } else {
        None
    };
    for round in 0..count {
        for i in 0..tracers.len() {
            let tracer = tracers[(i + round) % tracers.len()];
            let began = Instant::now();
            let result = run_once(opts, phase, tracer, round, spec)
                .await
                .with_context(|| format!("{phase:?} round {round}: {}", tracer.label()))?;
            eprintln!(
                "bench: {phase:?} round {round}: {:<32} {:>8.0} conn/s, {} of {} events to the worst consumer ({:.1} s)",
                tracer.label(),
                result.rate(),
                result.delivered.iter().min().copied().unwrap_or(0),
                result.expected,
                began.elapsed().as_secs_f64()
            );
            runs.push(result);
        }
    }
    Ok(())
}

/// A running tracer of either kind.
enum Running {
    None,
    Agent {
        process: AgentProcess,
        client: Box<tcp_trace::proto::tcp_trace_client::TcpTraceClient<tonic::transport::Channel>>,
        subscribers: Subscribers,
    },
    Bpftrace(BpftraceProcess),
}

impl Running {
    fn pid(&self) -> Option<u32> {
        match self {
            Running::None => None,
            Running::Agent { process, .. } => Some(process.pid),
            Running::Bpftrace(bt) => Some(bt.pid),
        }
    }

    /// Events the slowest consumer has counted.
    fn slowest(&self) -> u64 {
        match self {
            Running::None => 0,
            Running::Agent { subscribers, .. } => subscribers.slowest(),
            Running::Bpftrace(bt) => bt.progress.load(std::sync::atomic::Ordering::Relaxed),
        }
    }
}

async fn run_once(
    opts: &Options,
    phase: Phase,
    tracer: Tracer,
    round: usize,
    spec: ChurnSpec,
) -> Result<RunResult> {
    let ns = Netns::new()?;
    let tag = format!("{phase:?}-{round}-{}", tracer.label()).replace([' ', ',', '-'], "_");
    let mut running = match tracer {
        Tracer::None => Running::None,
        Tracer::Agent {
            subscribers: _,
            kernel_filter,
        } => {
            let filter = kernel_filter.then_some(ns.inode);
            let (process, client) =
                AgentProcess::start(&opts.agent, &opts.out_dir, &tag, filter).await?;
            Running::Agent {
                process,
                client: Box::new(client),
                subscribers: Subscribers::empty(),
            }
        }
        Tracer::Bpftrace | Tracer::EmptyProgram => {
            let exe = opts
                .bpftrace
                .as_deref()
                .context("bpftrace is not installed")?;
            let script = if tracer == Tracer::Bpftrace {
                tracer::BPFTRACE_PRINT_EVERY
            } else {
                tracer::BPFTRACE_EMPTY
            };
            Running::Bpftrace(BpftraceProcess::start(
                exe,
                script,
                &opts.out_dir,
                &tag,
                ns.inode,
            )?)
        }
    };
    // The idle population opens before consumers subscribe, so they count only the churn.
    let population = match opts.idle {
        0 => None,
        n => {
            let watcher = match &running {
                Running::Agent { process, .. } => {
                    Some(Subscribers::connect(&process.addr, 1, ns.inode).await?)
                }
                _ => None,
            };
            let pop = Population::open(
                &ns,
                n,
                opts.keepalive,
                Some(opts.population_rate),
                opts.holder_exe.as_deref(),
            )?;
            if let Some(watcher) = watcher {
                wait_for_events(&watcher, pop.opening_events()).await?;
                watcher.stop().await?;
            }
            // What bpftrace printed about them is read before counting starts.
            tokio::time::sleep(Duration::from_millis(100)).await;
            Some(pop)
        }
    };
    if let (
        Running::Agent {
            process,
            subscribers,
            ..
        },
        Tracer::Agent { subscribers: n, .. },
    ) = (&mut running, tracer)
    {
        *subscribers = Subscribers::connect(&process.addr, n, ns.inode).await?;
    }

    let mut in_use = ns.sockets_in_use()?;
    let idle_sockets = in_use.read()?;
    let kernel_before = ns.tcp_counters()?;
    let proc_before = running.pid().map(tracer::proc_sample).transpose()?;
    let progs_before = running
        .pid()
        .map(tracer::prog_stats)
        .transpose()?
        .unwrap_or_default();
    let consumer_before = tracer::threads_cpu_seconds(CONSUMER_THREADS);
    // Other tracers on the machine: their CPU over the run says how much they disturbed it.
    let foreign: Vec<u32> = program_holders()
        .into_iter()
        .map(|h| h.pid)
        .filter(|&pid| Some(pid) != running.pid())
        .collect();
    let foreign_cpu = |pids: &[u32]| -> f64 {
        pids.iter()
            .filter_map(|&pid| tracer::proc_sample(pid).ok())
            .map(|s| s.cpu_s)
            .sum()
    };
    let foreign_before = foreign_cpu(&foreign);
    let agent_before = match &mut running {
        Running::Agent { client, .. } => Some(tracer::agent_counters(client).await?),
        _ => None,
    };
    if let Running::Bpftrace(bt) = &running {
        bt.start_counting();
    }

    let churn = workload::churn(&ns, spec)?;
    in_use.wait_for(idle_sockets, Duration::from_secs(10))?;
    let kernel = ns.tcp_counters()?.since(&kernel_before);
    let expected = match tracer {
        Tracer::None | Tracer::EmptyProgram => 0,
        Tracer::Agent { .. } => {
            AGENT_EVENTS_PER_CONNECTION * kernel.active_opens
                + AGENT_EVENTS_PER_LISTENER * churn.listeners
        }
        Tracer::Bpftrace => {
            TRANSITIONS_PER_CONNECTION * kernel.active_opens
                + TRANSITIONS_PER_LISTENER * churn.listeners
        }
    };
    // Every consumer has everything, or the tracer had its chance: a lossy tracer gets the
    // same bounded wait as a slow one.
    let deadline = Instant::now() + opts.drain_timeout.max(spec.duration);
    while !matches!(running, Running::None)
        && running.slowest() < expected
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Anything extra (duplicates, foreign events) would arrive now.
    tokio::time::sleep(Duration::from_millis(50)).await;

    let proc_after = running.pid().map(tracer::proc_sample).transpose()?;
    let progs_after = running
        .pid()
        .map(tracer::prog_stats)
        .transpose()?
        .unwrap_or_default();
    let consumer_cpu_s = tracer::threads_cpu_seconds(CONSUMER_THREADS) - consumer_before;
    let foreign_cpu_s = (foreign_cpu(&foreign) - foreign_before).max(0.0);
    let mut result = RunResult {
        phase,
        tracer,
        round,
        churn,
        kernel,
        expected,
        delivered: Vec::new(),
        reported_lost: 0,
        foreign: 0,
        latency: Histogram::default(),
        tracer_proc: proc_before.zip(proc_after).map(|(b, a)| ProcSample {
            cpu_s: a.cpu_s - b.cpu_s,
            ..a
        }),
        agent: None,
        tracer_records: 0,
        consumer_cpu_s,
        foreign_cpu_s,
        progs: tracer::prog_delta(&progs_before, &progs_after),
    };
    match running {
        Running::None => {}
        Running::Agent {
            process,
            mut client,
            subscribers,
        } => {
            let after = tracer::agent_counters(&mut client).await?;
            result.agent = agent_before.map(|before| AgentRun {
                counters: after.since(&before),
            });
            result.tracer_records = result.agent.map_or(0, |a| a.counters.records);
            for got in subscribers.stop().await? {
                result.delivered.push(got.events());
                result.reported_lost = result.reported_lost.max(got.lost);
                result.foreign += got.foreign;
                result.latency.merge(&got.latency);
            }
            drop(client);
            process.stop(!opts.quick)?;
        }
        Running::Bpftrace(bt) => {
            let got = bt.stop()?;
            result.delivered.push(got.lines);
            result.tracer_records = got.all_lines;
            result.reported_lost = got.lost;
            result.latency = got.latency;
        }
    }
    drop(population);
    Ok(result)
}

/// Waits until the slowest subscriber has `expected` events (read, or reported lost).
async fn wait_for_events(subscribers: &Subscribers, expected: u64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while subscribers.slowest() < expected {
        ensure!(
            Instant::now() < deadline,
            "the subscriber has {} of the {expected} opening events after 60 s",
            subscribers.slowest()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// The agent's memory with `opts.population` idle connections (2 tracked sockets each) open,
/// with `subscribers` subscribed to the namespace.
async fn population(opts: &Options, subscribers: usize) -> Result<PopulationResult> {
    let ns = Netns::new()?;
    let subscribers_count = subscribers;
    let tag = format!("population-{subscribers}");
    let (process, mut client) = AgentProcess::start(&opts.agent, &opts.out_dir, &tag, None).await?;
    let subscribers = Subscribers::connect(&process.addr, subscribers, ns.inode).await?;
    let before = tracer::proc_sample(process.pid)?;
    let counters_before = tracer::agent_counters(&mut client).await?;
    let opened = Instant::now();
    let pop = Population::open(
        &ns,
        opts.population,
        opts.keepalive,
        Some(opts.population_rate),
        opts.holder_exe.as_deref(),
    )?;
    // Every connection is established once connect() returned: once the agent has decoded
    // every record the kernel wrote by now, its table holds them all.
    let written = tracer::agent_counters(&mut client).await?.kernel_records;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let decoded = tracer::agent_counters(&mut client).await?.records;
        if decoded >= written {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the agent decoded {decoded} of the {written} records written after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let open_secs = opened.elapsed().as_secs_f64();
    // Let the agent settle (its next drain ends the batch) before reading.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = tracer::proc_sample(process.pid)?;
    let mappings = tracer::largest_mappings(process.pid, 6);
    let agent = tracer::agent_counters(&mut client)
        .await?
        .since(&counters_before);
    // Counted after the memory was read: the answer is large, and the agent builds it in memory.
    let tracked = tracked_in(&mut client, ns.inode).await.unwrap_or(0);
    subscribers.stop().await?;
    drop(client);
    process.stop(!opts.quick)?;
    drop(pop);
    Ok(PopulationResult {
        connections: opts.population,
        subscribers: subscribers_count,
        tracked,
        rss_before_kib: before.rss_kib,
        rss_kib: after.rss_kib,
        hwm_kib: after.hwm_kib,
        open_secs,
        mappings,
        agent,
    })
}

/// How many sockets of namespace `netns` the agent's table holds (ListConnections).
async fn tracked_in(
    client: &mut tcp_trace::proto::tcp_trace_client::TcpTraceClient<tonic::transport::Channel>,
    netns: u64,
) -> Result<u64> {
    let request = tcp_trace::proto::ListConnectionsRequest {
        filter: Some(tcp_trace::proto::Filter {
            netns: vec![netns],
            ..Default::default()
        }),
        ..Default::default()
    };
    let response = client
        .list_connections(request)
        .await
        .context("ListConnections")?;
    // All of them, not only the first page's.
    Ok(response.into_inner().matched)
}
