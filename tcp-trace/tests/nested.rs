//! Transitions that nest in the state program's own run are recorded, or counted.
//!
//! The kernel runs a BTF tracepoint program once per CPU at a time. When a timer tick
//! interrupts the state program while it runs in a system call (connect, close, a socket's
//! backlog), the tick's softirq runs on the way out: its expired SYN timers close their
//! sockets, and the kernel skips the state program for each of those transitions, only
//! counting them. Here a real server churns connections (redis, `redis-benchmark -k 0`) while
//! connects to a peer that drops every SYN time out all along, on every tick. The guard program
//! records the nested transitions in the state program's place (`kernel nested, recorded`), so
//! each count the agent reports must equal the namespace's own counter, short by no more than
//! the skips it reported for the hook that records it: connect timeouts against
//! `TcpAttemptFails`, SYN retransmits against `TCPSynRetrans`.
//!
//! One loss is the test VMs' and silent: their kernel runs no BPF program while a thread of
//! PID 1 (`process_api`, the VM's own guest agent, hidden from tracing) is the current task,
//! in its own context or in a softirq that interrupts it, and counts no skip (README, Limits:
//! proven with bpftrace on 2026-12-02). A timer batch of these closes (twenty to 120 sockets
//! whose SYN timers expire together), or a server's handshake, that interrupts it reaches
//! neither the state program nor its guard. The kernel's own ftrace events still fire there, so
//! the test runs a [`Witness`]: an ftrace instance that logs this test's transitions and
//! retransmits only while a thread of PID 1 is current. Every count must then equal the
//! kernel's, short by no more than the reported skips plus what the witness logged; the heal's
//! closes (`healed closed`, cause unknown) must be among the witnessed losses. On a host without
//! such a task the witness logs nothing and every count is exact.
mod support;

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use support::{
    NetNs,
    hidden::Witness,
    metric_sum,
    process::{MetricsAgent, redis_churn, redis_server},
};

/// Ports no other test uses: the witness tells this test's connections apart by port alone.
const REDIS_PORT: u16 = 6390;
const DROPPED_PORT: u16 = 6391;
/// Connects to the dropping peer per second, and for how long.
const TIMEOUTS_PER_SECOND: usize = 2_000;
const TIMEOUT_SECONDS: u64 = 6;

/// Non-blocking connects to `peer`, `TIMEOUTS_PER_SECOND` a second for `TIMEOUT_SECONDS`;
/// the sockets are held until their SYNs have timed out.
fn timing_out(ns: &NetNs, peer: IpAddr) -> std::thread::JoinHandle<usize> {
    ns.spawn(move || {
        let mut held = Vec::new();
        let started = Instant::now();
        let per_tick = TIMEOUTS_PER_SECOND / 100;
        while started.elapsed() < Duration::from_secs(TIMEOUT_SECONDS) {
            let tick = Instant::now();
            for _ in 0..per_tick {
                // SAFETY: plain socket calls on a fresh fd, closed by the OwnedFd.
                let fd = unsafe {
                    libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0)
                };
                assert!(fd >= 0);
                let fd =
                    unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
                let IpAddr::V4(v4) = peer else { unreachable!() };
                let addr = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: DROPPED_PORT.to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from(v4).to_be(),
                    },
                    sin_zero: [0; 8],
                };
                // SAFETY: a sockaddr_in and its size.
                let rc = unsafe {
                    libc::connect(
                        std::os::fd::AsRawFd::as_raw_fd(&fd),
                        (&raw const addr).cast(),
                        size_of::<libc::sockaddr_in>() as libc::socklen_t,
                    )
                };
                assert_eq!(rc, -1);
                assert_eq!(
                    std::io::Error::last_os_error().raw_os_error(),
                    Some(libc::EINPROGRESS)
                );
                held.push(fd);
            }
            std::thread::sleep(Duration::from_millis(10).saturating_sub(tick.elapsed()));
        }
        // tcp_syn_retries=1: a SYN, one retransmit after 1 s, the timeout 2 s later.
        std::thread::sleep(Duration::from_millis(3_500));
        held.len()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transitions_nested_in_the_state_programs_run_are_recorded_or_counted() {
    let ns = NetNs::new("nested");
    let peer_ns = NetNs::new("nestedpeer");
    let veth = NetNs::veth_pair(&ns, &peer_ns);
    peer_ns.exec(&[
        "nft",
        &format!(
            "add table inet t; add chain inet t in {{ type filter hook input priority 0; }}; \
             add rule inet t in tcp dport {DROPPED_PORT} drop"
        ),
    ]);
    ns.sysctl("ipv4/tcp_syn_retries", "1");
    ns.sysctl("ipv4/ip_local_port_range", "1024 65000");
    // Heals every 2 s: the silent losses are closed within the test's wait.
    let mut agent = MetricsAgent::start(
        env!("CARGO_BIN_EXE_tcp-trace"),
        "nested",
        ns.inode(),
        &["--heal-interval", "2"],
    )
    .await;
    let witness = Witness::start("nested", &[REDIS_PORT, DROPPED_PORT]);
    let _redis = redis_server(&ns, REDIS_PORT);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let at_start = agent.scrape();
    let before = ns.snmp();

    let timeouts = timing_out(&ns, veth.b_v4);
    redis_churn(&ns, REDIS_PORT, 150_000).await;
    let attempted = tokio::task::spawn_blocking(move || timeouts.join().unwrap())
        .await
        .unwrap();

    let (delta, now) = agent.caught_up(&ns, &before, &at_start).await;
    let grown = |name: &str, labels: &str| {
        metric_sum(&now, name, labels) - metric_sum(&at_start, name, labels)
    };
    let skipped = |hook: &str| {
        grown(
            "tcptrace_kernel_runs_missed_total",
            &format!("hook=\"{hook}\""),
        )
    };
    let stats = agent.stats().await;
    agent.agent.stop(true).unwrap();
    let hidden = witness.read();

    let failed = delta.get("Tcp:AttemptFails");
    eprintln!(
        "{attempted} connects timed out ({failed} attempt fails); nested transitions recorded by \
         the guard: {}; runs skipped by program: {:?}; ends missed {}, healed closed {}, \
         adopted {}, malformed {}; under PID 1 (no BPF program runs): {hidden:?}",
        stats.kernel_recovered,
        stats.kernel_missed_by_program,
        stats.ends_missed,
        stats.healed_closed,
        stats.healed_adopted,
        stats.records_malformed
    );
    assert!(
        failed >= attempted as i64 * 9 / 10,
        "{failed} of {attempted}"
    );
    let opens = delta.get("Tcp:ActiveOpens") + delta.get("Tcp:PassiveOpens");
    let ring = grown("tcptrace_events_lost_total", "stage=\"kernel_ring\"");
    assert_eq!(ring, 0, "no record lost to a full ring");
    let (state, tcp) = (skipped("state"), skipped("tcp"));
    let within = |kernel: i64, agent: i64, skips: i64| (0..=skips).contains(&(kernel - agent));
    let opened = grown("tcptrace_connections_opened_total", "");
    let closed = grown("tcptrace_connections_closed_total", "");
    let timed_out = grown(
        "tcptrace_connections_closed_total",
        "cause=\"connect_timeout\"",
    );
    let syn_retransmits = grown("tcptrace_syn_retransmits_total", "direction=\"active\"");
    // Each transition under PID 1 may have cost one open and one close (a passive open whose
    // handshake it carried ends unseen as well).
    let unseen = hidden.transitions as i64;
    assert!(
        within(opens, opened, state + unseen) && within(opens, closed, state + unseen),
        "opened {opened} and closed {closed} (the heal's included) as the kernel's {opens} \
         opens, short by no more than the state program's reported skips ({state}) and the \
         transitions under PID 1 ({unseen})"
    );
    let healed = stats.healed_closed as i64;
    let unseen_failed = hidden.connects_failed as i64;
    assert!(
        healed <= state + unseen_failed,
        "the heal closed {healed} connections, more than were skipped ({state}) or failed under \
         PID 1 ({unseen_failed})"
    );
    assert!(
        within(failed, timed_out + healed, state + unseen_failed - healed),
        "connect timeouts {timed_out} and the heal's closes ({healed}) as the kernel's {failed} \
         attempt fails, short by no more than the state program's reported skips ({state}) and \
         the failures under PID 1 not yet healed ({unseen_failed} - {healed}); closes:\n{}",
        now.lines()
            .filter(|l| l.starts_with("tcptrace_connections_closed_total"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // A connect whose close was skipped or healed takes its SYN retransmits with it (they are
    // counted when its handshake ends); a retransmit under PID 1 is lost by itself.
    let kernel_retransmits = delta.get("TcpExt:TCPSynRetrans");
    let per_connect = (kernel_retransmits + failed - 1) / failed.max(1);
    eprintln!(
        "SYN retransmits {syn_retransmits} of the kernel's {kernel_retransmits} (tcp hooks' \
         reported skips {tcp}); healed closed {}",
        stats.healed_closed
    );
    assert!(
        within(
            kernel_retransmits,
            syn_retransmits,
            tcp + per_connect * (state + healed) + hidden.retransmits as i64
        ),
        "SYN retransmits {syn_retransmits} as the kernel's {kernel_retransmits}, short by no \
         more than the reported skips (tcp {tcp}, state {state} of {per_connect} each), the \
         healed connects' ({healed}) and those under PID 1 ({})",
        hidden.retransmits
    );
}
