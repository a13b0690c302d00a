//! The kernel's own witness of what no BPF program can see.
//!
//! On the test VMs no BPF program runs while a thread of PID 1 (`process_api`, the VM's guest
//! agent, hidden from tracing) is the current task, in its own context or in a softirq that
//! interrupts it, and the kernel counts no skip (README, Limits). Its ftrace events still fire
//! there. A [`Witness`] is an ftrace instance that logs a test's TCP transitions and
//! retransmits, and the keepalive timer, only while a thread of PID 1 is current: the exact
//! transitions any tracer built on BPF misses on such a host. A test then asks that the agent's
//! counts fall short of the kernel's by no more than what it reported skipped plus what this
//! witness logged. On a host without such a task the witness logs nothing and the test is exact.
use std::{
    fs,
    path::{Path, PathBuf},
};

const TRACING: &str = "/sys/kernel/tracing";

/// An ftrace instance logging what PID 1's threads run; removed on drop.
pub struct Witness {
    dir: PathBuf,
    tids: Vec<u32>,
}

/// What the witness logged.
#[derive(Debug, Default)]
pub struct Hidden {
    /// `inet_sock_set_state` events: each may have cost the agent a connection's open or its
    /// close (or both, when it was the one its open depended on).
    pub transitions: usize,
    /// SYN-state transitions to CLOSE among them: connects that timed out or were refused.
    pub connects_failed: usize,
    /// `tcp_retransmit_skb` events.
    pub retransmits: usize,
    /// `tcp_keepalive_timer` runs (a probe, a dead-peer verdict or a re-arm, per run).
    pub keepalive_timers: usize,
}

impl Witness {
    /// Starts logging the transitions and retransmits of connections with `port` at either end,
    /// and every keepalive timer run, while a thread of PID 1 is current.
    pub fn start(tag: &str, ports: &[u16]) -> Witness {
        let tids = pid1_threads();
        let dir = Path::new(TRACING)
            .join("instances")
            .join(format!("tcpt-witness-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir(&dir);
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("ftrace instance {}: {e}", dir.display()));
        let witness = Witness { dir, tids };
        let current = witness
            .tids
            .iter()
            .map(|t| format!("common_pid == {t}"))
            .collect::<Vec<_>>()
            .join(" || ");
        let ports = ports
            .iter()
            .map(|p| format!("sport == {p} || dport == {p}"))
            .collect::<Vec<_>>()
            .join(" || ");
        let ours = format!("({current}) && ({ports})");
        witness.write("buffer_size_kb", "2048");
        witness.event("sock/inet_sock_set_state", &ours);
        witness.event("tcp/tcp_retransmit_skb", &ours);
        witness.event(
            "timer/timer_expire_entry",
            &format!("({current}) && function.function == tcp_keepalive_timer"),
        );
        witness.write("tracing_on", "1");
        witness
    }

    fn write(&self, file: &str, value: &str) {
        let path = self.dir.join(file);
        fs::write(&path, value).unwrap_or_else(|e| panic!("{} <- {value}: {e}", path.display()));
    }

    fn event(&self, event: &str, filter: &str) {
        self.write(&format!("events/{event}/filter"), filter);
        self.write(&format!("events/{event}/enable"), "1");
    }

    /// What was logged so far. Panics if ftrace's buffer overflowed, as the count would be short.
    pub fn read(&self) -> Hidden {
        let trace = fs::read_to_string(self.dir.join("trace")).expect("the witness's trace");
        let mut hidden = Hidden::default();
        for line in trace.lines().filter(|l| !l.starts_with('#')) {
            if line.contains("inet_sock_set_state:") {
                hidden.transitions += 1;
                if line.contains("oldstate=TCP_SYN_") && line.contains("newstate=TCP_CLOSE") {
                    hidden.connects_failed += 1;
                }
            } else if line.contains("tcp_retransmit_skb:") {
                hidden.retransmits += 1;
            } else if line.contains("timer_expire_entry:") {
                hidden.keepalive_timers += 1;
            }
        }
        let overrun: u64 = fs::read_dir(self.dir.join("per_cpu"))
            .expect("the witness's per-CPU buffers")
            .filter_map(|cpu| fs::read_to_string(cpu.ok()?.path().join("stats")).ok())
            .filter_map(|stats| {
                stats
                    .lines()
                    .find_map(|l| l.strip_prefix("overrun: ")?.trim().parse::<u64>().ok())
            })
            .sum();
        assert_eq!(overrun, 0, "the witness's ftrace buffer overflowed");
        if pid1_threads() != self.tids {
            eprintln!(
                "witness: PID 1's threads changed during the test ({:?} -> {:?}); new ones were \
                 not watched",
                self.tids,
                pid1_threads()
            );
        }
        hidden
    }
}

impl Drop for Witness {
    fn drop(&mut self) {
        let _ = fs::write(self.dir.join("tracing_on"), "0");
        for event in [
            "sock/inet_sock_set_state",
            "tcp/tcp_retransmit_skb",
            "timer/timer_expire_entry",
        ] {
            let _ = fs::write(self.dir.join(format!("events/{event}/enable")), "0");
        }
        let _ = fs::remove_dir(&self.dir);
    }
}

/// The thread ids of PID 1.
fn pid1_threads() -> Vec<u32> {
    let mut tids: Vec<u32> = fs::read_dir("/proc/1/task")
        .expect("/proc/1/task")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    tids.sort_unstable();
    tids
}
