//! The report: the figures' table, written as report.md with the plot (report.svg, see
//! [`super::plot`]) and every run's raw numbers (runs.csv).
use std::{fmt::Write as _, path::PathBuf, process::Command};

use anyhow::{Context as _, Result};

use super::{
    Options, Phase, PopulationResult, Results, RunResult,
    figures::{Row, rows, thousands},
    tracer::AgentCounters,
};

pub struct Report {
    /// The markdown table alone (what the bench prints).
    pub table: String,
    pub markdown: String,
    pub rows: Vec<Row>,
    pub path: PathBuf,
}

fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| # | Measure | Setup | Median | Spread (min–max, n) | Target | Holds |\n\
         |---|---|---|---:|---|---|---|\n",
    );
    for r in rows {
        let (median, spread) = match &r.value {
            Some(s) => (
                r.format.show(s.median),
                format!(
                    "{}–{} (n={})",
                    r.format.show(s.min),
                    r.format.show(s.max),
                    s.n
                ),
            ),
            None => ("n/a".into(), "not measured".into()),
        };
        let holds = match r.holds {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "",
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {median} | {spread} | {} | {holds} |",
            r.figure, r.measure, r.setup, r.target
        );
    }
    out
}

fn runs_csv(results: &Results) -> String {
    let mut out = String::from(
        "phase,round,tracer,connections,errors,seconds,rate,active_opens,passive_opens,\
         attempt_fails,estab_resets,expected,delivered_min,delivered_max,reported_lost,foreign,\
         p50_us,p99_us,tracer_cpu_s,tracer_hwm_kib,tracer_records,agent_published,\
         agent_ring_full,agent_kernel_missed,agent_subscriber_drops,consumer_cpu_s,deferred_cpu_s,\
         foreign_cpu_s,bpf_programs\n",
    );
    for r in &results.runs {
        let us = |q| {
            r.latency
                .quantile(q)
                .map_or(String::new(), |d| d.as_micros().to_string())
        };
        let proc = r.tracer_proc.unwrap_or_default();
        let agent = r.agent.map(|a| a.counters).unwrap_or_default();
        let progs: Vec<String> = r
            .progs
            .iter()
            .map(|p| format!("{}:{}ns/{}", p.name, p.run_time_ns, p.run_cnt))
            .collect();
        let _ = writeln!(
            out,
            "{:?},{},\"{}\",{},{},{:.3},{:.1},{},{},{},{},{},{},{},{},{},{},{},{:.2},{},{},{},{},{},{},{:.2},{:.2},{:.2},{}",
            r.phase,
            r.round,
            r.tracer.label(),
            r.churn.connections,
            r.churn.errors,
            r.churn.elapsed.as_secs_f64(),
            r.rate(),
            r.kernel.active_opens,
            r.kernel.passive_opens,
            r.kernel.attempt_fails,
            r.kernel.estab_resets,
            r.expected,
            r.delivered.iter().min().copied().unwrap_or(0),
            r.delivered.iter().max().copied().unwrap_or(0),
            r.reported_lost,
            r.foreign,
            us(0.5),
            us(0.99),
            proc.cpu_s,
            proc.hwm_kib,
            r.tracer_records,
            agent.published,
            agent.ring_full,
            agent.kernel_missed,
            agent.subscriber_drops,
            r.consumer_cpu_s,
            r.deferred_cpu_s,
            r.foreign_cpu_s,
            progs.join(" ")
        );
    }
    out
}

/// Facts that qualify the numbers: anything that makes a run's count unexact.
fn caveats(results: &Results) -> Vec<String> {
    let mut out = Vec::new();
    let m = &results.machine;
    out.push(format!(
        "Load average (1, 5, 15 min) {} when the bench started, {} when it ended: the bench \
         shares the machine, and pairing runs within a round is what cancels drift.",
        m.loadavg_before, m.loadavg_after
    ));
    for (when, holders) in [("started", &m.holders_before), ("ended", &m.holders_after)] {
        if holders.is_empty() {
            continue;
        }
        let list: Vec<String> = holders
            .iter()
            .map(|h| format!("pid {} `{}` ({} programs)", h.pid, h.command, h.programs))
            .collect();
        out.push(format!(
            "**Other processes held BPF programs when the bench {when}**: {}. An attached \
             tracer runs in every run, the untraced ones included, and takes CPU from all of \
             them: the figures are then not those of a quiet machine.",
            list.join("; ")
        ));
    }
    let foreign: f64 = results.runs.iter().map(|r| r.foreign_cpu_s).sum();
    let seconds: f64 = results
        .runs
        .iter()
        .map(|r| r.churn.elapsed.as_secs_f64())
        .sum();
    if foreign > 0.0 {
        out.push(format!(
            "Other tracers used {foreign:.1} CPU-s during the runs' {seconds:.0} s ({:.0} % of a \
             CPU on average).",
            100.0 * foreign / seconds.max(1e-9)
        ));
    }
    let sum = |f: &dyn Fn(&RunResult) -> u64| results.runs.iter().map(f).sum::<u64>();
    let errors = sum(&|r| r.churn.errors + r.kernel.attempt_fails + r.kernel.estab_resets);
    if errors > 0 {
        out.push(format!(
            "{errors} connections failed or were reset (workload errors, AttemptFails, EstabResets): \
             those do not make 12 events, so their runs' loss figures are approximate."
        ));
    }
    // redis-benchmark makes a connection of its own (CONFIG GET) besides the requests.
    let mismatched = results
        .runs
        .iter()
        .filter(|r| r.phase != Phase::Redis && r.kernel.active_opens != r.churn.connections)
        .count();
    if mismatched > 0 {
        out.push(format!(
            "{mismatched} runs where the kernel's ActiveOpens differs from the connections the workload completed."
        ));
    }
    let mut phases: Vec<Phase> = Vec::new();
    for r in results.runs.iter().filter(|r| r.agent.is_some()) {
        if !phases.contains(&r.phase) {
            phases.push(r.phase);
        }
    }
    for phase in phases {
        let runs: Vec<&RunResult> = results.runs.iter().filter(|r| r.phase == phase).collect();
        let sum = |f: &dyn Fn(&AgentCounters) -> u64| {
            runs.iter()
                .filter_map(|r| r.agent.map(|a| f(&a.counters)))
                .sum::<u64>()
        };
        let foreign: u64 = runs.iter().map(|r| r.foreign).sum();
        out.push(format!(
            "`{}` phase, all agent runs: {} records lost to a full kernel ring, {} program runs \
             the kernel skipped (kernel missed: another BPF program was running on the CPU), {} \
             events dropped for slow subscribers; subscribers received {foreign} events of other \
             namespaces (the filter should make that 0).",
            phase.name(),
            sum(&|c| c.ring_full),
            sum(&|c| c.kernel_missed),
            sum(&|c| c.subscriber_drops),
        ));
    }
    out
}

fn machine() -> String {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    let kernel = read("/proc/sys/kernel/osrelease");
    let virt = if cpuinfo.contains(" hypervisor") {
        ", virtualised"
    } else {
        ""
    };
    format!(
        "{model}, {cpus} CPUs{virt}, {mem_gib:.0} GiB; Linux {}",
        kernel.trim()
    )
}

fn command_output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn population_line(p: &PopulationResult, opts: &Options) -> String {
    format!(
        "Idle population, {} subscriber(s): {} connections opened at up to {}/s in {:.1} s; the agent's table held {} of their \
         sockets (ListConnections); agent RSS {:.1} MiB before, {:.1} MiB with them open, peak \
         {:.1} MiB; meanwhile it decoded {} records, lost {} to a full kernel ring and dropped {} \
         events for its subscriber. Largest mappings (RSS): {}.",
        p.subscribers,
        thousands(p.connections as i64),
        thousands(opts.population_rate as i64),
        p.open_secs,
        thousands(p.tracked as i64),
        p.rss_before_kib as f64 / 1024.0,
        p.rss_kib as f64 / 1024.0,
        p.hwm_kib as f64 / 1024.0,
        thousands(p.agent.records as i64),
        thousands(p.agent.ring_full as i64),
        thousands(p.agent.subscriber_drops as i64),
        p.mappings
            .iter()
            .map(|(kib, name)| format!("{:.1} MiB {name}", *kib as f64 / 1024.0))
            .collect::<Vec<_>>()
            .join(", "),
    )
}

/// Writes report.md, report.svg and runs.csv into `opts.out_dir`.
pub fn write(opts: &Options, results: &Results) -> Result<Report> {
    let rows = rows(results, opts);
    let table = table(&rows);
    let commit = command_output("git", &["rev-parse", "--short", "HEAD"]);
    let dirty = !command_output("git", &["status", "--porcelain"]).is_empty();
    let bpftrace = opts
        .bpftrace
        .as_ref()
        .map(|p| command_output(&p.to_string_lossy(), &["--version"]))
        .unwrap_or_else(|| "not installed: its rows are missing".into());
    let date = command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let mut md = String::new();
    let _ = writeln!(md, "# tcp-trace benchmarks\n");
    if opts.quick {
        let _ = writeln!(
            md,
            "**Quick mode: a smoke run of every phase, far too short for its numbers to mean anything.**\n"
        );
    }
    let _ = writeln!(md, "- Command: `{}`", opts.command);
    let _ = writeln!(
        md,
        "- Date: {date}; wall time {:.0} s",
        results.wall.as_secs_f64()
    );
    let _ = writeln!(md, "- Machine: {}", machine());
    let _ = writeln!(
        md,
        "- tcp-trace: {commit}{} (agent binary {})",
        if dirty {
            " with uncommitted changes"
        } else {
            ""
        },
        opts.agent.display()
    );
    let _ = writeln!(md, "- Peer: {bpftrace}");
    let _ = writeln!(
        md,
        "- Workload: worker threads in a fresh network namespace per run, on loopback, each \
         doing connect, 1-byte request, 1-byte response, client close, server close, one \
         connection at a time on its own listener, as fast as it can: {} workers (one per CPU: \
         any CPU a tracer uses is taken from the workload) and {} worker (a CPU left for the \
         tracer); {} s per run, {} paired rounds interleaved (round r starts with the r-th \
         variant); trickle {} conn/s for {} s × {}; {} conn/s for the subscriber scaling; {} \
         idle keepalive connections held during runs. Always-on: the full-churn workload with \
         the agent running and nobody subscribed. Redis: redis-server {} with no persistence in a \
         fresh namespace, driven by `redis-benchmark -k 0 -c {} -n {} -t get` (a new connection \
         per request) from the same namespace, {} paired rounds.",
        opts.concurrency,
        opts.spare_concurrency,
        opts.duration.as_secs_f64(),
        opts.rounds,
        opts.trickle_rate,
        opts.trickle_duration.as_secs_f64(),
        opts.trickle_rounds,
        opts.scaling_rate,
        opts.idle,
        opts.redis_tools
            .as_ref()
            .map(|t| command_output(&t.server.to_string_lossy(), &["--version"]))
            .unwrap_or_else(|| "(not installed: its rows are missing)".into()),
        opts.redis.clients,
        opts.redis.requests,
        opts.rounds,
    );
    let _ = writeln!(
        md,
        "- Tracers: `tcp-trace agent` as a child process (all namespaces, unless `--netns`), its \
         subscribers gRPC clients in the bench process, each on its own connection, decoding every \
         event; bpftrace printing every TCP transition (`-B line`) into a pipe the bench reads."
    );
    let _ = writeln!(md, "\n## Figures\n");
    md.push_str(&table);
    let _ = writeln!(md, "\n![figures](report.svg)\n");
    let _ = writeln!(md, "## How each figure is measured\n");
    for line in METHOD {
        let _ = writeln!(md, "- {line}");
    }
    let _ = writeln!(md, "\n## Run notes\n");
    for p in &results.population {
        let _ = writeln!(md, "- {}", population_line(p, opts));
    }
    if let Some(line) = super::clients::report_line(&results.clients) {
        let _ = writeln!(md, "- {line}");
    }
    for c in caveats(results) {
        let _ = writeln!(md, "- {c}");
    }
    let _ = writeln!(
        md,
        "- Every run's raw numbers: `runs.csv` next to this report."
    );

    let dir = &opts.out_dir;
    let path = dir.join("report.md");
    std::fs::write(&path, &md).with_context(|| format!("write {}", path.display()))?;
    std::fs::write(
        dir.join("report.svg"),
        super::plot::svg(&rows, opts.quick).map_err(anyhow::Error::msg)?,
    )?;
    std::fs::write(dir.join("runs.csv"), runs_csv(results))?;
    Ok(Report {
        table,
        markdown: md,
        rows,
        path,
    })
}

const METHOD: &[&str] = &[
    "1 — connection rate: connections the workload completed / run length; the ratio is taken per \
     round against the untraced run of the same round, then median and range over rounds.",
    "1 — ratio with late CPU counted: the tracer process and the bench's consumers (subscriber \
     threads, or bpftrace's reader) keep working after the workload stops, draining what they \
     queued; on a host that stays busy that CPU would have been taken from the workload. So the \
     CPU-seconds they use from the workload's end until every consumer has every event (with no \
     subscriber: until the agent has decoded every record the kernel wrote) are added to the \
     run's length, divided by the number of CPUs: rate = connections / (run length + late \
     CPU-s / CPUs). Their CPU during the run needs no correction: they share the workload's \
     CPUs. This is the figure the 0.85 (one subscriber) and 0.97 (always-on) targets apply to.",
    "1 — always-on: `tcp-trace agent` running with no subscriber (its table, summaries, stats and \
     metrics still kept), both CPUs churning, paired with untraced runs like the churn phase.",
    "1 — redis: requests/s as redis-benchmark's own clock measures them (`--csv`), one \
     connection per request (`-k 0`), 20 clients, a fresh namespace and server per run (TIME_WAIT \
     piles up otherwise); ratios per round against the untraced run. The agent with 1 subscriber \
     reads every event of the namespace; loss = 12 × ActiveOpens − delivered.",
    "2 — loss: expected events = 12 × the namespace's Tcp ActiveOpens + 3 per listener \
     (/proc/net/snmp read in the namespace; AttemptFails and EstabResets must stay 0); each \
     subscriber counts what it reads until it has them all or 2 s (at least the run length) pass. \
     bpftrace: 10 × ActiveOpens + 2 per listener lines. Events per connection = (delivered − \
     listener events) / ActiveOpens.",
    "3 — latency: CLOCK_MONOTONIC when the consumer has decoded the event minus the event's \
     kernel_time_ns (bpf_ktime_get_ns, the same clock), over every event of every subscriber; \
     p50/p99 per run (5 µs buckets), then median and range over rounds.",
    "4 — BPF cost: run_time_ns / run_cnt of each program the tracer process holds \
     (/proc/PID/fdinfo), over the run, with kernel BPF stats on (BPF_ENABLE_STATS, the switch \
     behind kernel.bpf_stats_enabled, held only during this phase and released by the kernel \
     when the bench exits). \"All programs\" divides the time of every program, the timer, \
     accept and setsockopt hooks included, by the runs of the per-transition program. The empty \
     program (bpftrace, `{ }` on the same tracepoint) is the floor: tracepoint dispatch plus \
     the stats' own clock reads. The `floor:` rows are the agent's own object cut down \
     (tcp-trace-ebpf/src/floor.rs), attached alone to the BTF tracepoint by the bench: the empty \
     program (dispatch and stats), the transitions switch alone (a transition that writes no \
     record), the switch plus an empty record through its CPU's ring (what any record costs \
     before the socket is read), and the same record on every run through one ring shared by \
     all CPUs (the design before the rings were per CPU: what CPUs writing at once cost each \
     other). `floor_quiet` is the state program's own code for a transition it does not \
     record (the guard's log and the switch); with the always-on agent's guard (same round) it \
     is what such a transition costs, the ≤ 100 ns row. `floor_storage`, `floor_storage_end` \
     and `floor_hash_end` are the floors of a design that keeps each socket's state in the \
     kernel and writes one record per socket end: the state updated in the socket's own \
     storage (created on its first transition) with no record, then with a record at close, \
     then kept in a preallocated hash map keyed by the socket instead. `floor_hash_few` is that \
     design as it would run: the map touched only at connect (open time and owner), \
     establishment and close (read into the record, deleted), the other transitions on the \
     state program's unrecorded path; `floor_slots` the same with the state in an array of \
     slots indexed by a hash of the socket's address, each claimed by one socket until its \
     close (no hash map: no lock, allocation or hashing), and `floor_slots_full` with the \
     state program's own records, read from the socket. `floor_aggregate` is the \
     design that writes no record for an always-on connection: the same hash map and the owner \
     at connect, and at close the exported metrics' counters and histograms and the peer's \
     totals updated in per-CPU kernel maps (the agent would read them when asked). The `tcp-trace, 0 \
     subscribers` rows are the always-on mode (`--phases always-on` measures them without the \
     rest of this phase).",
    "5 — CPU: utime + stime of the tracer process (/proc/PID/stat, all threads) over the run, per \
     million transitions it handled in all namespaces (the agent's records_decoded; bpftrace's \
     event lines). Consumer CPU is the bench's own subscriber threads. RSS: VmHWM of the agent \
     after each churn run; VmRSS with the idle population open (server ends left unaccepted in \
     the listeners' queues, so each connection is two tracked sockets; opened at a steady pace, \
     with SO_KEEPALIVE), once the agent has decoded every record the kernel wrote, without \
     and with a subscriber.",
    "5 — agent CPU per connection: the agent process's utime + stime over the run (including its \
     late work) per million of the bench namespace's ActiveOpens. The agent watches every \
     namespace, so other traffic on the host counts in the CPU but not in the connections: an \
     upper bound on a shared machine. The always-on target (≤ 0.3) applies with no subscriber. \
     Its floor (always-on phase): `floor_record` writes the records the always-on state program \
     writes, and a thread of the bench drains them as the agent does with no subscriber (every \
     10 ms; read, merged in time order, decoded) and does nothing else; that thread's CPU per \
     million connections. \
     `floor_storage_end` and `floor_hash_end` give the same floor for one record per socket \
     end (2 a connection), and their ratios what keeping each socket's state in the kernel \
     costs the workload. `floor_aggregate` writes no record: its drain reads nothing, and its \
     ratio is what aggregating in the kernel costs the workload.",
    "6 — the same agent CPU figure at a fixed rate with 1, 10 and 100 subscribers.",
];
