//! The `clients` phase: how many events a second `tcp-trace watch` prints into a file, as JSON
//! and as text. The agent replays a fixed history it holds (`--replay-last`), so the figure is
//! the client's decoding and printing (and the agent's sending), not the kernel's.
use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};

use tcp_trace_test_support::process::AgentProcess;

use super::{
    Options,
    tracer::agent_counters,
    workload::{self, ChurnSpec},
};

/// One `watch` run: output mode, events per second, and the client's own CPU seconds.
#[derive(Clone, Debug)]
pub struct ClientRun {
    pub json: bool,
    pub events: u64,
    pub elapsed: Duration,
    pub cpu_s: f64,
}

impl ClientRun {
    pub fn rate(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }
}

/// Fills an agent's replay buffer with `events` events of loopback churn (`--all-transitions`:
/// nobody subscribes while it fills, and by default events are then only counted), then times `watch`
/// printing all of them, `rounds` times in each mode (JSON and text alternating).
pub async fn client_rates(opts: &Options) -> Result<Vec<ClientRun>> {
    let (events, rounds) = if opts.quick { (5_000, 1) } else { (200_000, 3) };
    let ns = workload::netns();
    let replay = events.to_string();
    let (process, mut client) = AgentProcess::start(
        &opts.agent,
        &opts.out_dir,
        "clients",
        Some(ns.inode()),
        &["--replay", &replay, "--all-transitions"],
    )
    .await?;
    let spec = ChurnSpec {
        concurrency: opts.concurrency,
        rate: None,
        duration: Duration::from_millis(500),
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while agent_counters(&mut client).await?.published < events {
        ensure!(Instant::now() < deadline, "no {events} events after 120 s");
        workload::churn(&ns, spec)?;
    }
    let connect = process.addr.to_string();
    let output = opts.out_dir.join("watch-output");
    let mut runs = Vec::new();
    for _ in 0..rounds {
        for json in [true, false] {
            let run = watch(&opts.agent, &connect, events, json, &output)?;
            eprintln!(
                "bench: client: watch{} {:>9.0} events/s ({:.2} s CPU)",
                if json { " --json" } else { "       " },
                run.rate(),
                run.cpu_s
            );
            runs.push(run);
        }
    }
    let _ = std::fs::remove_file(&output);
    drop(client);
    process.stop(!opts.quick)?;
    Ok(runs)
}

fn watch(exe: &Path, connect: &str, events: u64, json: bool, output: &Path) -> Result<ClientRun> {
    let n = events.to_string();
    let mut command = Command::new(exe);
    command
        .args([
            "watch",
            "--connect",
            connect,
            "--replay-last",
            &n,
            "--count",
            &n,
        ])
        .stdout(std::fs::File::create(output)?)
        .stderr(Stdio::inherit());
    if json {
        command.arg("--json");
    }
    let cpu_before = children_cpu_s();
    let started = Instant::now();
    let status = command.status().context("run tcp-trace watch")?;
    let elapsed = started.elapsed();
    ensure!(status.success(), "tcp-trace watch failed: {status}");
    let lines = std::fs::read(output)?
        .iter()
        .filter(|&&b| b == b'\n')
        .count() as u64;
    ensure!(lines == events, "watch printed {lines} of {events} lines");
    Ok(ClientRun {
        json,
        events,
        elapsed,
        cpu_s: children_cpu_s() - cpu_before,
    })
}

/// User + system CPU of this process's waited-for children.
fn children_cpu_s() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
        usage
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// The report's line: median (and range) of each mode.
pub fn report_line(runs: &[ClientRun]) -> Option<String> {
    let mode = |json: bool| {
        let mut rates: Vec<f64> = runs
            .iter()
            .filter(|r| r.json == json)
            .map(ClientRun::rate)
            .collect();
        rates.sort_by(f64::total_cmp);
        let cpu: f64 = runs
            .iter()
            .filter(|r| r.json == json)
            .map(|r| r.cpu_s / r.events as f64 * 1e6)
            .sum::<f64>()
            / rates.len().max(1) as f64;
        Some(format!(
            "{:.0} events/s (range {:.0}-{:.0}, client CPU {cpu:.2} µs/event)",
            rates.get(rates.len() / 2)?,
            rates.first()?,
            rates.last()?
        ))
    };
    let events = runs.first()?.events;
    Some(format!(
        "Client events/s: `tcp-trace watch --replay-last {events} --count {events}` into a file, \
         the agent replaying a history of {events} events it holds: `--json` {}; text {}.",
        mode(true)?,
        mode(false)?
    ))
}
