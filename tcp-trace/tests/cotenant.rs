//! Nothing the kernel counted is lost while another BPF tracer shares the host.
//!
//! Syscall tracers (Falco, Tetragon) are common neighbours. A classic tracepoint or kprobe
//! program runs under the kernel's one per-CPU recursion guard (`bpf_prog_active`): a softirq
//! that fires while the neighbour's program runs in a system call skips every classic program
//! it would run, and the kernel only counts the skip. Here bpftrace on `raw_syscalls:sys_enter`
//! stands in for the neighbour, a real server (redis, `redis-benchmark -k 0`) churns 100,000
//! connections, and keepalive probes go out all along; the agent must report exactly what the
//! namespace's own counters say.
//!
//! The agent's state and timer programs are BTF tracepoints, whose guard is per program: the
//! neighbour cannot make them skip. The kernel still skips a run when the same program is
//! already running on that CPU (an interrupt's softirq changing another socket's state in the
//! middle of a run); such skips are rare, counted, and reported by hook. So each count must
//! equal the kernel's, short by no more than the skips the agent reported for the hook that
//! records it: no loss goes unreported, and nothing is counted twice. The one exception is the
//! test VMs': no BPF program runs while a thread of PID 1 is current, and the kernel counts no
//! skip. A [`Witness`] (ftrace) logs what runs then, and the bound includes it; elsewhere it
//! logs nothing.
mod support;

use std::{
    io::{BufRead, BufReader},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use support::{
    NetNs,
    hidden::Witness,
    metric_sum,
    process::{KillOnDrop, MetricsAgent, redis_churn, redis_server},
};

/// Ports no other test uses: the witness tells this test's connections apart by port alone.
const REDIS_PORT: u16 = 6392;
const PROBED_PORT: u16 = 6393;
const REQUESTS: u32 = 100_000;
/// Idle connections probed every second during the churn.
const PROBED: usize = 32;

/// bpftrace counting every system call, attached before this returns.
fn cotenant() -> KillOnDrop {
    let mut bpftrace = Command::new("bpftrace")
        .args([
            "-e",
            "tracepoint:raw_syscalls:sys_enter { @[cpu] = count(); }",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("bpftrace runs (cargo xtask test installs it)");
    let stdout = bpftrace.stdout.take().expect("piped");
    let mut bpftrace = KillOnDrop(Some(bpftrace));
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("bpftrace writes");
    assert!(
        line.starts_with("Attaching"),
        "bpftrace did not attach: {line:?} ({:?})",
        bpftrace.get().try_wait()
    );
    bpftrace
}

fn set(stream: &TcpStream, level: i32, name: i32, value: i32) {
    // SAFETY: setsockopt with a pointer to a live i32 and its size.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            size_of::<i32>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt: {}", std::io::Error::last_os_error());
}

/// `PROBED` connections to a server that holds them open, each probing its live peer every
/// second once idle for a second.
fn probing(ns: &NetNs) -> (Vec<TcpStream>, Vec<TcpStream>) {
    ns.run(|| {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, PROBED_PORT)).unwrap();
        let server: SocketAddr = listener.local_addr().unwrap();
        let clients: Vec<TcpStream> = (0..PROBED)
            .map(|_| {
                let client = TcpStream::connect(server).unwrap();
                set(&client, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
                set(&client, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 1);
                set(&client, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 1);
                client
            })
            .collect();
        let accepted = (0..PROBED).map(|_| listener.accept().unwrap().0).collect();
        (clients, accepted)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_syscall_tracer_beside_it_a_churn_of_100000_connections_and_keepalive_probes_match_the_kernel_counters()
 {
    let ns = NetNs::new("cotenant");
    // The client closes first: TIME_WAIT may take every ephemeral port otherwise.
    ns.sysctl("ipv4/ip_local_port_range", "1024 65000");
    let _bpftrace = cotenant();
    // No subscriber: the always-on mode, read as an operator reads it, from /metrics.
    let mut agent =
        MetricsAgent::start(env!("CARGO_BIN_EXE_tcp-trace"), "cotenant", ns.inode(), &[]).await;
    let witness = Witness::start("cotenant", &[REDIS_PORT, PROBED_PORT]);
    let _redis = redis_server(&ns, REDIS_PORT);
    // The readiness probe's server side closes a moment after it: before the count starts.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (opened, closed, probes): (&str, &str, &str) = (
        "tcptrace_connections_opened_total",
        "tcptrace_connections_closed_total",
        "tcptrace_keepalive_probes_total",
    );
    let at_start = agent.scrape();
    let before = ns.snmp();

    let (clients, accepted) = probing(&ns);
    let started = Instant::now();
    redis_churn(&ns, REDIS_PORT, REQUESTS).await;
    eprintln!("churn took {:?}", started.elapsed());
    // At least two probes each, however fast the churn was.
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(started.elapsed())).await;
    drop(clients);
    drop(accepted);

    let (delta, now) = agent.caught_up(&ns, &before, &at_start).await;
    let stats = agent.stats().await;
    agent.agent.stop(true).unwrap();
    // What ran while a thread of PID 1 was current, which no BPF program sees (README, Limits).
    let hidden = witness.read();

    let opens = delta.get("Tcp:ActiveOpens") + delta.get("Tcp:PassiveOpens");
    assert!(opens >= 200_000, "{opens} opens");
    let grown = |name| metric_sum(&now, name, "") - metric_sum(&at_start, name, "");
    let lost = |stage: &str| {
        let labels = format!("stage=\"{stage}\"");
        metric_sum(&now, "tcptrace_events_lost_total", &labels)
    };
    let skips = |hook| {
        let labels = format!("hook=\"{hook}\"");
        let at = |text| metric_sum(text, "tcptrace_kernel_runs_missed_total", &labels);
        at(&now) - at(&at_start)
    };
    eprintln!(
        "runs skipped by program: {:?}; hooks: {:?}; missing: {:?}; healed closed {}, adopted \
         {}; keepalive timer runs on unfollowed sockets {}, unpaired {}; ring full {}, filtered \
         {}; under PID 1: {hidden:?}",
        stats.kernel_missed_by_program,
        stats.hooks_attached,
        stats.hooks_missing,
        stats.healed_closed,
        stats.healed_adopted,
        stats.keepalive_unfollowed,
        stats.kernel_keepalive_unpaired,
        stats.kernel_ring_full,
        stats.kernel_filtered
    );
    assert_eq!(lost("kernel_ring"), 0, "no record dropped");
    assert!(
        lost("kernel_missed") <= opens / 1_000,
        "runs skipped are rare: {}",
        lost("kernel_missed")
    );
    assert!(grown(probes) >= 2 * PROBED as i64, "{}", grown(probes));
    let kernel = (opens, opens, delta.get("TcpExt:TCPKeepAlive"));
    let agent = (grown(opened), grown(closed), grown(probes));
    let unreported =
        |kernel: i64, agent: i64, skipped: i64| !(0..=skipped).contains(&(kernel - agent));
    let (transitions, timers) = (hidden.transitions as i64, hidden.keepalive_timers as i64);
    assert!(
        !unreported(kernel.0, agent.0, skips("state") + transitions)
            && !unreported(kernel.1, agent.1, skips("state") + transitions)
            && !unreported(kernel.2, agent.2, skips("keepalive") + timers),
        "opens, closes and keepalive probes {agent:?} as the namespace's counters {kernel:?}, \
         short by no more than the runs skipped (state {}, keepalive {}) and the runs under PID \
         1 (transitions {transitions}, keepalive timers {timers})",
        skips("state"),
        skips("keepalive")
    );
}
