//! The figures: one row per measure and setup (median and min–max over rounds, target,
//! whether it holds), computed from the runs; [`super::report`] writes them out and
//! [`super::plot`] draws them.
use super::{
    AGENT_EVENTS_PER_CONNECTION, AGENT_EVENTS_PER_LISTENER, Options, Phase, Results, RunResult,
    Tracer, floor::FloorProgram, stats::Spread, tracer::ProgStats,
};

/// The measures every report has a row for (the smoke test checks them).
pub const MEASURES: &[&str] = &[
    RATE,
    REDIS_RATE,
    RATIO,
    RATIO_COUNTED,
    LOSS,
    PER_CONNECTION,
    P50_CHURN,
    P99_CHURN,
    P50_TRICKLE,
    P99_TRICKLE,
    BPF_RUN,
    BPF_TRANSITION,
    AGENT_CPU,
    AGENT_CPU_CONNECTION,
    CONSUMER_CPU,
    PEAK_RSS,
    POPULATION_RSS,
];
pub const RATE: &str = "connections/s";
pub const REDIS_RATE: &str = "redis requests/s (a connection each)";
pub const RATIO: &str = "overhead ratio (traced / untraced)";
pub const RATIO_COUNTED: &str = "overhead ratio, tracer's and consumers' late CPU counted";
pub const LOSS: &str = "events lost, worst consumer";
pub const PER_CONNECTION: &str = "events delivered per connection";
pub const P50_CHURN: &str = "latency p50, full churn (ms)";
pub const P99_CHURN: &str = "latency p99, full churn (ms)";
pub const P50_TRICKLE: &str = "latency p50, trickle (ms)";
pub const P99_TRICKLE: &str = "latency p99, trickle (ms)";
pub const BPF_RUN: &str = "BPF ns per program run";
pub const BPF_TRANSITION: &str = "BPF ns per transition, all programs";
pub const AGENT_CPU: &str = "tracer CPU-s per million transitions";
pub const AGENT_CPU_CONNECTION: &str = "agent CPU-s per million connections";
pub const CONSUMER_CPU: &str = "consumer CPU-s per million events";
pub const PEAK_RSS: &str = "agent peak RSS, churn (MiB)";
pub const POPULATION_RSS: &str = "agent RSS, idle population (MiB)";

#[derive(Clone, Debug)]
pub struct Row {
    pub figure: u8,
    pub measure: &'static str,
    pub setup: String,
    pub value: Option<Spread>,
    pub format: Format,
    pub target: &'static str,
    pub holds: Option<bool>,
}

#[derive(Clone, Copy, Debug)]
pub enum Format {
    Integer,
    Ratio,
    Decimal2,
}

impl Format {
    pub(crate) fn show(self, v: f64) -> String {
        match self {
            Format::Integer => thousands(v.round() as i64),
            Format::Ratio => format!("{v:.3}"),
            Format::Decimal2 => format!("{v:.2}"),
        }
    }
}

pub(crate) fn thousands(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

struct Rows<'a> {
    results: &'a Results,
    rows: Vec<Row>,
}

impl<'a> Rows<'a> {
    fn runs(&self, phase: Phase, tracer: Tracer) -> Vec<&'a RunResult> {
        self.results
            .runs
            .iter()
            .filter(|r| r.phase == phase && r.tracer == tracer)
            .collect()
    }

    fn tracers(&self, phase: Phase) -> Vec<Tracer> {
        let mut out: Vec<Tracer> = Vec::new();
        for r in self.results.runs.iter().filter(|r| r.phase == phase) {
            if !out.contains(&r.tracer) {
                out.push(r.tracer);
            }
        }
        out
    }

    fn push(
        &mut self,
        figure: u8,
        measure: &'static str,
        setup: impl Into<String>,
        value: Option<Spread>,
        format: Format,
    ) -> &mut Row {
        self.rows.push(Row {
            figure,
            measure,
            setup: setup.into(),
            value,
            format,
            target: "",
            holds: None,
        });
        self.rows.last_mut().expect("just pushed")
    }
}

impl Row {
    fn target(&mut self, text: &'static str, holds: impl FnOnce(&Spread) -> bool) {
        self.target = text;
        self.holds = self.value.as_ref().map(holds);
    }
}

fn spread_of<'r>(
    runs: &[&'r RunResult],
    f: impl Fn(&'r RunResult) -> Option<f64>,
) -> Option<Spread> {
    Spread::of(runs.iter().filter_map(|r| f(r)))
}

fn ms(d: Option<std::time::Duration>) -> Option<f64> {
    d.map(|d| d.as_secs_f64() * 1e3)
}

/// The program on sock:inet_sock_set_state: tcp-trace's (named after its function, cut to 15
/// bytes by the kernel) or bpftrace's (named after the probe).
fn state_prog(run: &RunResult) -> Option<&ProgStats> {
    run.progs
        .iter()
        .filter(|p| p.name.starts_with("inet_sock_set") || p.name.starts_with("tracepoint_sock"))
        .max_by_key(|p| p.run_cnt)
}

fn per_million(cost: f64, count: u64) -> Option<f64> {
    (count > 0).then(|| cost / (count as f64 / 1e6))
}

pub fn rows(results: &Results, opts: &Options) -> Vec<Row> {
    let mut t = Rows {
        results,
        rows: Vec::new(),
    };
    let one = Tracer::agent(1);
    let always_on = Tracer::agent(0);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let setup =
        |tracer: Tracer, phase: Phase| format!("{}, {}", tracer.label(), workers(phase, opts));

    for phase in [Phase::Churn, Phase::AlwaysOn, Phase::Spare, Phase::Redis] {
        let tracers = t.tracers(phase);
        let traced: Vec<Tracer> = tracers
            .iter()
            .copied()
            .filter(|t| *t != Tracer::None)
            .collect();
        // Loss and latency need a consumer: not the agent nobody subscribed to.
        let consumed: Vec<Tracer> = traced
            .iter()
            .copied()
            .filter(|t| !matches!(t, Tracer::Agent { subscribers: 0, .. }))
            .collect();

        // 1. Connection rate and overhead ratio (per round: traced / untraced of that round).
        let rate = if phase == Phase::Redis {
            REDIS_RATE
        } else {
            RATE
        };
        for &tracer in &tracers {
            let v = spread_of(&t.runs(phase, tracer), |r| Some(r.rate()));
            t.push(1, rate, setup(tracer, phase), v, Format::Integer);
        }
        let untraced = t.runs(phase, Tracer::None);
        let ratio = |runs: Vec<&RunResult>, counted: bool| {
            spread_of(&runs, |r| {
                let base = untraced.iter().find(|b| b.round == r.round)?;
                let traced = if counted {
                    r.counted_rate(cpus)
                } else {
                    r.rate()
                };
                Some(traced / base.rate())
            })
        };
        for &tracer in &traced {
            let v = ratio(t.runs(phase, tracer), false);
            t.push(1, RATIO, setup(tracer, phase), v, Format::Ratio);
        }
        let bpftrace_ratio = ratio(t.runs(phase, Tracer::Bpftrace), true);
        for &tracer in &traced {
            let v = ratio(t.runs(phase, tracer), true);
            let row = t.push(1, RATIO_COUNTED, setup(tracer, phase), v, Format::Ratio);
            match phase {
                Phase::Churn if tracer == one => row.target("≥ 0.85 and > bpftrace", |s| {
                    s.median >= 0.85 && bpftrace_ratio.is_none_or(|b| s.median > b.median)
                }),
                Phase::AlwaysOn | Phase::Redis if tracer == always_on => {
                    row.target("≥ 0.97", |s| s.median >= 0.97)
                }
                _ => {}
            }
        }

        // 2. Loss against the kernel's counters.
        for &tracer in &consumed {
            let v = spread_of(&t.runs(phase, tracer), |r| Some(r.worst_loss() as f64));
            let row = t.push(2, LOSS, setup(tracer, phase), v, Format::Integer);
            if matches!(tracer, Tracer::Agent { .. }) {
                row.target("0", |s| s.max == 0.0);
            }
        }

        // 3. Kernel-to-client latency.
        for &tracer in &consumed {
            let runs = t.runs(phase, tracer);
            let v = spread_of(&runs, |r| ms(r.latency.quantile(0.5)));
            t.push(3, P50_CHURN, setup(tracer, phase), v, Format::Decimal2);
            let v = spread_of(&runs, |r| ms(r.latency.quantile(0.99)));
            let row = t.push(3, P99_CHURN, setup(tracer, phase), v, Format::Decimal2);
            if matches!(tracer, Tracer::Agent { .. }) && phase != Phase::Redis {
                row.target("≤ 10", |s| s.median <= 10.0);
            }
        }

        // 5. The agent's CPU per connection of the workload.
        for &tracer in traced.iter().filter(|t| matches!(t, Tracer::Agent { .. })) {
            let v = spread_of(&t.runs(phase, tracer), |r| {
                per_million(r.tracer_proc?.cpu_s, r.kernel.active_opens)
            });
            let row = t.push(
                5,
                AGENT_CPU_CONNECTION,
                setup(tracer, phase),
                v,
                Format::Decimal2,
            );
            if phase == Phase::AlwaysOn && tracer == always_on {
                row.target("≤ 0.3", |s| s.median <= 0.3);
            }
        }
        for &tracer in traced.iter().filter(|t| matches!(t, Tracer::Floor(_))) {
            if phase != Phase::AlwaysOn {
                continue;
            }
            let v = spread_of(&t.runs(phase, tracer), |r| {
                per_million(r.floor_drain_cpu_s, r.kernel.active_opens)
            });
            t.push(
                5,
                AGENT_CPU_CONNECTION,
                format!(
                    "{}: its records read and decoded, nothing else",
                    setup(tracer, phase)
                ),
                v,
                Format::Decimal2,
            );
        }
    }

    // 2. The measured events per connection, at full churn and when quiet.
    for (phase, tracer) in [(Phase::Churn, one), (Phase::Trickle, one)] {
        let v = spread_of(&t.runs(phase, tracer), |r| {
            let worst = *r.delivered.iter().min()?;
            let listeners = AGENT_EVENTS_PER_LISTENER * r.churn.listeners;
            (r.kernel.active_opens > 0)
                .then(|| worst.saturating_sub(listeners) as f64 / r.kernel.active_opens as f64)
        });
        let setup = format!("{}, {}", tracer.label(), phase_name(phase, opts));
        t.push(2, PER_CONNECTION, setup, v, Format::Decimal2)
            .target("12 (5 transitions + 1 summary per side)", |s| {
                s.min == AGENT_EVENTS_PER_CONNECTION as f64
            });
    }

    let trickle = t.runs(Phase::Trickle, one);
    let setup = format!("{}, {}", one.label(), phase_name(Phase::Trickle, opts));
    t.push(
        3,
        P50_TRICKLE,
        setup.clone(),
        spread_of(&trickle, |r| ms(r.latency.quantile(0.5))),
        Format::Decimal2,
    );
    t.push(
        3,
        P99_TRICKLE,
        setup,
        spread_of(&trickle, |r| ms(r.latency.quantile(0.99))),
        Format::Decimal2,
    )
    .target("≤ 2", |s| s.median <= 2.0);

    // 4. BPF cost, from the kernel's run-time stats.
    for tracer in t.tracers(Phase::BpfStats) {
        let runs = t.runs(Phase::BpfStats, tracer);
        let mut names: Vec<String> = runs
            .iter()
            .flat_map(|r| r.progs.iter().map(|p| p.name.clone()))
            .collect();
        names.sort();
        names.dedup();
        for name in names {
            let v = spread_of(&runs, |r| ns_per_run(r, &name));
            if v.is_none() {
                continue; // bpftrace's BEGIN probe, run before the window
            }
            let row = t.push(
                4,
                BPF_RUN,
                format!("{}: {name}", tracer.label()),
                v,
                Format::Integer,
            );
            let is_state = runs
                .first()
                .and_then(|r| state_prog(r))
                .is_some_and(|p| p.name == name);
            if (tracer == one || tracer == always_on) && is_state {
                row.target("≤ 150", |s| s.median <= 150.0);
            }
        }
        if !matches!(tracer, Tracer::Agent { .. }) {
            continue;
        }
        let v = spread_of(&runs, |r| {
            let runs = state_prog(r)?.run_cnt;
            let total: u64 = r.progs.iter().map(|p| p.run_time_ns).sum();
            (runs > 0).then(|| total as f64 / runs as f64)
        });
        t.push(4, BPF_TRANSITION, tracer.label(), v, Format::Integer);
    }
    // A transition the always-on agent does not record: the state program's own path for it
    // (its floor runs exactly that code alone) plus the guard, which runs on every transition.
    let agent_runs = t.runs(Phase::BpfStats, always_on);
    let v = spread_of(
        &t.runs(Phase::BpfStats, Tracer::Floor(FloorProgram::Quiet)),
        |quiet| {
            let agent = agent_runs.iter().find(|a| a.round == quiet.round)?;
            Some(ns_per_run(quiet, "floor_quiet")? + ns_per_run(agent, "set_state_guard")?)
        },
    );
    if v.is_some() {
        t.push(
            4,
            BPF_RUN,
            "a transition the always-on agent does not record: floor_quiet + set_state_guard",
            v,
            Format::Integer,
        )
        .target("≤ 100", |s| s.median <= 100.0);
    }

    // 5. Tracer CPU and memory.
    let churn = t.tracers(Phase::Churn);
    for &tracer in churn.iter().filter(|t| **t != Tracer::None) {
        let v = spread_of(&t.runs(Phase::Churn, tracer), |r| {
            per_million(r.tracer_proc?.cpu_s, r.tracer_records)
        });
        let setup = format!("{}, {}", tracer.label(), phase_name(Phase::Churn, opts));
        let row = t.push(5, AGENT_CPU, setup, v, Format::Decimal2);
        if tracer == one {
            row.target("≤ 1", |s| s.median <= 1.0);
        }
    }
    for &tracer in churn.iter().filter(|t| **t != Tracer::None) {
        let v = spread_of(&t.runs(Phase::Churn, tracer), |r| {
            per_million(r.consumer_cpu_s, r.delivered.iter().sum())
        });
        t.push(
            5,
            CONSUMER_CPU,
            format!("bench's consumers of {}", tracer.label()),
            v,
            Format::Decimal2,
        );
    }
    let agents: Vec<&RunResult> = results
        .runs
        .iter()
        .filter(|r| r.phase == Phase::Churn && matches!(r.tracer, Tracer::Agent { .. }))
        .collect();
    let v = spread_of(&agents, |r| Some(r.tracer_proc?.hwm_kib as f64 / 1024.0));
    t.push(
        5,
        PEAK_RSS,
        "tcp-trace, 1 and 10 subscribers",
        v,
        Format::Decimal2,
    );
    for p in &results.population {
        let setup = format!(
            "{} tracked sockets ({} connections, both ends), {} subscriber{}",
            thousands(p.tracked as i64),
            thousands(p.connections as i64),
            p.subscribers,
            if p.subscribers == 1 { "" } else { "s" }
        );
        let v = Spread::of([p.rss_kib as f64 / 1024.0]);
        let row = t.push(5, POPULATION_RSS, setup, v, Format::Decimal2);
        if p.tracked >= 100_000 {
            row.target("≤ 64 at 100,000", |s| s.median <= 64.0);
        } else {
            row.target = "≤ 64 at 100,000 (not evaluated: smaller population)";
        }
    }
    if results.population.is_empty() {
        t.push(5, POPULATION_RSS, "not run", None, Format::Decimal2);
    }

    // 6. Agent cost per event as subscribers are added (fixed rate, so the same events).
    for tracer in t.tracers(Phase::Scaling) {
        let runs = t.runs(Phase::Scaling, tracer);
        let setup = format!("{}, {}", tracer.label(), phase_name(Phase::Scaling, opts));
        let v = spread_of(&runs, |r| {
            per_million(r.tracer_proc?.cpu_s, r.tracer_records)
        });
        t.push(6, AGENT_CPU, setup.clone(), v, Format::Decimal2);
        let v = spread_of(&runs, |r| Some(r.worst_loss() as f64));
        t.push(6, LOSS, setup, v, Format::Integer);
    }
    t.rows
}

/// The workload of a phase, in a few words.
fn workers(phase: Phase, opts: &Options) -> String {
    let n = match phase {
        Phase::Spare => opts.spare_concurrency,
        Phase::Redis => {
            return format!("redis-benchmark -k 0 -c {}", opts.redis.clients);
        }
        _ => opts.concurrency,
    };
    format!("{n} worker{}", if n == 1 { "" } else { "s" })
}

fn phase_name(phase: Phase, opts: &Options) -> String {
    match phase {
        Phase::Churn | Phase::AlwaysOn | Phase::BpfStats => {
            format!("full churn, {} workers", opts.concurrency)
        }
        Phase::Redis => workers(phase, opts),
        Phase::Spare => format!("full churn, {} worker", opts.spare_concurrency),
        Phase::Trickle => format!("trickle {} conn/s", opts.trickle_rate),
        Phase::Scaling => format!("{} conn/s", opts.scaling_rate),
    }
}

/// A program's mean run time over a run, by its name as the kernel keeps it.
fn ns_per_run(run: &RunResult, name: &str) -> Option<f64> {
    let p = run.progs.iter().find(|p| p.name == name)?;
    (p.run_cnt > 0).then(|| p.run_time_ns as f64 / p.run_cnt as f64)
}
