//! With nothing to trace, the agent costs next to nothing: it wakes about ten times a second
//! (the drain's periodic check for losses the kernel counts without writing a record) and uses
//! no measurable CPU. The agent is the optimised binary, tracing only a fresh namespace in which
//! nothing happens, so other tests' traffic on the shared kernel writes it no record (the
//! kernel-side `--netns` filter drops it).
mod support;

use std::time::Duration;

use support::{NetNs, process::AgentProcess};

/// (context switches, CPU ticks) of every thread of `pid`.
fn activity(pid: u32) -> (u64, u64) {
    let mut switches = 0;
    let mut ticks = 0;
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the agent runs");
    for task in tasks.flatten() {
        let path = task.path();
        let status = std::fs::read_to_string(path.join("status")).unwrap_or_default();
        switches += status
            .lines()
            .filter(|l| l.contains("ctxt_switches:"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum::<u64>();
        let stat = std::fs::read_to_string(path.join("stat")).unwrap_or_default();
        // After the command's closing parenthesis: utime and stime are the 12th and 13th fields.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        ticks += fields
            .get(11..13)
            .into_iter()
            .flatten()
            .filter_map(|f| f.parse::<u64>().ok())
            .sum::<u64>();
    }
    (switches, ticks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_agent_wakes_about_ten_times_a_second_and_uses_no_measurable_cpu() {
    let ns = NetNs::new("idle");
    let binary = support::process::optimised_binary(env!("CARGO_BIN_EXE_tcp-trace"));
    let (agent, _client) = AgentProcess::start(
        &binary,
        &std::env::temp_dir(),
        "idle",
        Some(ns.inode()),
        &[],
    )
    .await
    .expect("the agent starts");
    // Past start-up and the first client's connection.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let window = Duration::from_secs(5);
    let before = activity(agent.pid);
    tokio::time::sleep(window).await;
    let after = activity(agent.pid);
    let wakeups = (after.0 - before.0) as f64 / window.as_secs_f64();
    let cpu_s = (after.1 - before.1) as f64 / 100.0;
    eprintln!(
        "idle agent: {wakeups:.1} context switches a second, {cpu_s:.2} s of CPU in {window:?}"
    );
    // The drain polls the rings with a 100 ms timeout and goes back at once when they are
    // empty (it used to drain three more times at 250 us each: 40 a second).
    assert!(
        wakeups <= 15.0,
        "{wakeups:.1} context switches a second with nothing to trace"
    );
    // USER_HZ ticks of 10 ms: at most 1% of a CPU, with a tick of rounding to spare.
    assert!(
        cpu_s <= 0.01 * window.as_secs_f64() + 0.01,
        "{cpu_s:.2} s of CPU in {window:?} with nothing to trace"
    );
}
