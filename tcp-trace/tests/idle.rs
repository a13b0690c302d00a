//! What the agent costs when nobody watches. With nothing to trace it wakes about ten times a
//! second (the drain's periodic check for losses the kernel counts without writing a record)
//! and uses no measurable CPU; under churn with no subscriber it drains every 10 ms, not every
//! millisecond as for a subscriber. The agent is the optimised binary, tracing only a fresh
//! namespace, so other tests' traffic on the shared kernel writes it no record (the
//! kernel-side `--netns` filter drops it).
mod support;

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use support::{NetNs, process::AgentProcess};
use tcp_trace::proto;

/// (voluntary context switches, CPU ticks) of every thread of `pid`: the times its threads went
/// to sleep (the wake-ups that follow are what this counts), not the preemptions other tests
/// on the machine cause.
fn activity(pid: u32) -> (u64, u64) {
    let mut switches = 0;
    let mut ticks = 0;
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the agent runs");
    for task in tasks.flatten() {
        let path = task.path();
        let status = std::fs::read_to_string(path.join("status")).unwrap_or_default();
        switches += status
            .lines()
            .filter(|l| l.starts_with("voluntary_ctxt_switches:"))
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

/// The optimised agent, tracing only `ns`, and a client of it.
async fn agent_tracing(
    ns: &NetNs,
    tag: &str,
) -> (
    AgentProcess,
    proto::tcp_trace_client::TcpTraceClient<tonic::transport::Channel>,
) {
    let binary = support::process::optimised_binary(env!("CARGO_BIN_EXE_tcp-trace"));
    AgentProcess::start(&binary, &std::env::temp_dir(), tag, Some(ns.inode()), &[])
        .await
        .expect("the agent starts")
}

/// After `settle`, the agent's voluntary context switches a second and CPU seconds over
/// `window`.
async fn measure(pid: u32, settle: Duration, window: Duration) -> (f64, f64) {
    tokio::time::sleep(settle).await;
    let before = activity(pid);
    tokio::time::sleep(window).await;
    let after = activity(pid);
    (
        (after.0 - before.0) as f64 / window.as_secs_f64(),
        // USER_HZ ticks of 10 ms.
        (after.1 - before.1) as f64 / 100.0,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_agent_wakes_about_ten_times_a_second_and_uses_no_measurable_cpu() {
    let ns = NetNs::new("idle");
    let (agent, _client) = agent_tracing(&ns, "idle").await;
    let window = Duration::from_secs(5);
    // Settled: past start-up and the first client's connection.
    let (wakeups, cpu_s) = measure(agent.pid, Duration::from_secs(1), window).await;
    eprintln!(
        "idle agent: {wakeups:.1} context switches a second, {cpu_s:.2} s of CPU in {window:?}"
    );
    // The drain polls the rings with a 100 ms timeout and goes back at once when they are
    // empty (it used to drain three more times at 250 us each: 40 a second).
    assert!(
        wakeups <= 15.0,
        "{wakeups:.1} context switches a second with nothing to trace"
    );
    // At most 1% of a CPU, with a tick of rounding to spare.
    assert!(
        cpu_s <= 0.01 * window.as_secs_f64() + 0.01,
        "{cpu_s:.2} s of CPU in {window:?} with nothing to trace"
    );
}

/// Connections in `ns`, about `per_ms` a millisecond, until `stop`: a steady stream of records.
fn paced_churn(ns: &NetNs, per_ms: u32, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    let listener = ns.run(|| TcpListener::bind("127.0.0.1:0").expect("bind in the namespace"));
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut byte = [0u8];
            if conn.read_exact(&mut byte).is_err() || conn.write_all(&byte).is_err() {
                return;
            }
        }
    });
    ns.spawn(move || {
        let mut done = 0;
        let mut next = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            for _ in 0..per_ms {
                let mut c = TcpStream::connect(addr).expect("connect");
                c.write_all(&[1]).unwrap();
                let mut byte = [0u8];
                c.read_exact(&mut byte).unwrap();
                done += 1;
            }
            next += Duration::from_millis(1);
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        done
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_subscriber_the_agent_drains_a_steady_churn_ten_times_less_often() {
    let ns = NetNs::new("paced");
    let (agent, mut client) = agent_tracing(&ns, "paced").await;
    let stop = Arc::new(AtomicBool::new(false));
    let churn = paced_churn(&ns, 3, Arc::clone(&stop));
    let (settle, window) = (Duration::from_millis(500), Duration::from_secs(2));
    let (unwatched, _) = measure(agent.pid, settle, window).await;

    let mut stream = client
        .subscribe(proto::SubscribeRequest {
            filter: Some(proto::Filter {
                kinds: vec![proto::EventKind::ConnectionClosed as i32],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("Subscribe")
        .into_inner();
    let closes = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&closes);
    let reader = tokio::spawn(async move {
        while let Ok(Some(_)) = stream.message().await {
            counted.fetch_add(1, Ordering::Relaxed);
        }
    });
    let (watched, _) = measure(agent.pid, settle, window).await;
    stop.store(true, Ordering::Relaxed);
    let connections = tokio::task::spawn_blocking(move || churn.join().unwrap())
        .await
        .unwrap();
    reader.abort();
    eprintln!(
        "{connections} connections: {unwatched:.0} context switches a second with no subscriber, \
         {watched:.0} with one; {} closes delivered",
        closes.load(Ordering::Relaxed)
    );
    assert!(
        closes.load(Ordering::Relaxed) > 0,
        "the subscriber got the churn's summaries"
    );
    // A drain a millisecond with a subscriber (its gRPC task woken by each): 4,000 context
    // switches a second here. Without one, a drain each 10 ms: 100 (892 when the agent drained
    // every millisecond for nobody).
    assert!(
        unwatched <= 300.0 && unwatched * 3.0 < watched,
        "{unwatched:.0} context switches a second unwatched, {watched:.0} watched"
    );
}
