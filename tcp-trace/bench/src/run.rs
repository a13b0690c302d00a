//! One phase's rounds, and one run: a workload in a fresh namespace, watched by one tracer.
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use tcp_trace_test_support::process::AgentProcess;

use super::{
    AGENT_EVENTS_PER_CONNECTION, AGENT_EVENTS_PER_LISTENER, AgentRun, CONSUMER_THREADS, Options,
    Phase, PopulationResult, RunResult, TRANSITIONS_PER_CONNECTION, TRANSITIONS_PER_LISTENER,
    Tracer,
    floor::Floor,
    program_holders,
    redis::{self, RedisSpec},
    stats::Histogram,
    subscribers::Subscribers,
    tracer::{self, BpftraceProcess, ProcSample},
    workload::{self, ChurnSpec, Population, TcpCounters},
};

/// `count` rounds of every tracer in `tracers`, round r starting at the r-th tracer.
pub(crate) async fn rounds(
    opts: &Options,
    runs: &mut Vec<RunResult>,
    phase: Phase,
    tracers: &[Tracer],
    count: usize,
    workload: Workload,
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
            let result = run_once(opts, phase, tracer, round, workload)
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
    /// Attached by this process (its programs are the bench's own) until dropped.
    Floor {
        _attached: Floor,
    },
}

impl Running {
    fn pid(&self) -> Option<u32> {
        match self {
            Running::None => None,
            Running::Agent { process, .. } => Some(process.pid),
            Running::Bpftrace(bt) => Some(bt.pid),
            Running::Floor { .. } => Some(std::process::id()),
        }
    }

    /// Whether every consumer has counted `expected` events; with no subscriber, whether the
    /// agent has decoded every record the kernel wrote.
    async fn caught_up(&mut self, expected: u64) -> Result<bool> {
        Ok(match self {
            Running::None | Running::Floor { .. } => true,
            Running::Agent {
                subscribers,
                client,
                ..
            } if subscribers.is_empty() => {
                // Polled less often: each GetStats costs the agent CPU too.
                tokio::time::sleep(Duration::from_millis(8)).await;
                let counters = tracer::agent_counters(client).await?;
                counters.records >= counters.kernel_records
            }
            Running::Agent { subscribers, .. } => subscribers.slowest() >= expected,
            Running::Bpftrace(bt) => {
                bt.progress.load(std::sync::atomic::Ordering::Relaxed) >= expected
            }
        })
    }
}

/// What a run's namespace does while a tracer watches it.
#[derive(Clone, Copy, Debug)]
pub enum Workload {
    Churn(ChurnSpec),
    Redis(RedisSpec),
}

async fn run_once(
    opts: &Options,
    phase: Phase,
    tracer: Tracer,
    round: usize,
    workload: Workload,
) -> Result<RunResult> {
    let ns = workload::netns();
    let tag = format!("{phase:?}-{round}-{}", tracer.label()).replace([' ', ',', '-'], "_");
    // The server opens (and its readiness probe closes) before the tracer starts.
    let _server = match workload {
        Workload::Churn(_) => None,
        Workload::Redis(_) => {
            let tools = opts
                .redis_tools
                .as_ref()
                .context("redis is not installed")?;
            let log = opts.out_dir.join(format!("redis-{tag}.log"));
            Some(redis::Server::start(&ns, tools, &log)?)
        }
    };
    let mut running = match tracer {
        Tracer::None => Running::None,
        Tracer::Agent {
            subscribers: _,
            kernel_filter,
            without_slots,
        } => {
            let filter = kernel_filter.then_some(ns.inode());
            let args: &[&str] = if without_slots {
                &["--socket-slots", "0"]
            } else {
                &[]
            };
            let (process, client) =
                AgentProcess::start(&opts.agent, &opts.out_dir, &tag, filter, args).await?;
            Running::Agent {
                process,
                client: Box::new(client),
                subscribers: Subscribers::empty(),
            }
        }
        Tracer::Floor(program) => Running::Floor {
            _attached: Floor::start(program)?,
        },
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
                ns.inode(),
            )?)
        }
    };
    // The idle population opens before consumers subscribe, so they count only the churn.
    let population = match (opts.idle, workload) {
        (0, _) | (_, Workload::Redis(_)) => None,
        (n, Workload::Churn(_)) => {
            let watcher = match &running {
                Running::Agent { process, .. } => {
                    Some(Subscribers::connect(&process.addr, 1, ns.inode()).await?)
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
        *subscribers = Subscribers::connect(&process.addr, n, ns.inode()).await?;
    }

    let mut in_use = ns.tcp_in_use();
    let idle_sockets = in_use.read();
    let kernel_before = TcpCounters::read(&ns);
    let proc_before = running.pid().map(tracer::proc_sample).transpose()?;
    let progs_before = running
        .pid()
        .map(tracer::prog_stats)
        .transpose()?
        .unwrap_or_default();
    let consumer_before = tracer::threads_cpu_seconds(CONSUMER_THREADS);
    let floor_drain_before = tracer::threads_cpu_seconds(crate::floor::DRAIN_THREAD);
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

    let churn = match workload {
        Workload::Churn(spec) => workload::churn(&ns, spec)?,
        Workload::Redis(spec) => {
            let tools = opts
                .redis_tools
                .as_ref()
                .context("redis is not installed")?;
            redis::load(&ns, tools, spec)?
        }
    };
    // What the tracer and the consumers spend from here on is deferred work.
    let tracer_at_end = running.pid().map(tracer::proc_sample).transpose()?;
    let consumer_at_end = tracer::threads_cpu_seconds(CONSUMER_THREADS);
    if let Err(now) = in_use.wait_for(idle_sockets, Instant::now() + Duration::from_secs(10)) {
        anyhow::bail!(
            "{now} TCP sockets still in use 10 s after the workload stopped (expected {idle_sockets})"
        );
    }
    let kernel = TcpCounters::read(&ns).since(&kernel_before);
    let expected = match tracer {
        Tracer::None
        | Tracer::EmptyProgram
        | Tracer::Floor(_)
        | Tracer::Agent { subscribers: 0, .. } => 0,
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
    let deadline = Instant::now() + opts.drain_timeout.max(churn.elapsed);
    while !running.caught_up(expected).await? && Instant::now() < deadline {
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
    let consumer_after = tracer::threads_cpu_seconds(CONSUMER_THREADS);
    let consumer_cpu_s = consumer_after - consumer_before;
    let floor_drain_cpu_s =
        tracer::threads_cpu_seconds(crate::floor::DRAIN_THREAD) - floor_drain_before;
    let deferred_cpu_s = (consumer_after - consumer_at_end)
        + tracer_at_end
            .zip(proc_after)
            .map_or(0.0, |(end, after)| after.cpu_s - end.cpu_s);
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
        deferred_cpu_s,
        foreign_cpu_s,
        progs: tracer::prog_delta(&progs_before, &progs_after),
        floor_drain_cpu_s,
    };
    match running {
        Running::None | Running::Floor { .. } => {}
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
pub(crate) async fn population(opts: &Options, subscribers: usize) -> Result<PopulationResult> {
    let ns = workload::netns();
    let subscribers_count = subscribers;
    let tag = format!("population-{subscribers}");
    let (process, mut client) =
        AgentProcess::start(&opts.agent, &opts.out_dir, &tag, None, &[]).await?;
    let subscribers = Subscribers::connect(&process.addr, subscribers, ns.inode()).await?;
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
    let tracked = tracked_in(&mut client, ns.inode()).await.unwrap_or(0);
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
