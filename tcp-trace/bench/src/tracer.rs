//! The tracers under test, each a child process the bench starts and stops per run: the
//! `tcp-trace agent` binary (tcp-trace-test-support's `AgentProcess`), and bpftrace printing
//! every event into a pipe the bench reads. Also what the bench reads about them from /proc:
//! CPU time, memory, their BPF programs' stats; and the agent's own counters.
use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use tcp_trace::{proto, proto::tcp_trace_client::TcpTraceClient};
use tcp_trace_test_support::process::terminate;
use tonic::transport::Channel;

use super::stats::Histogram;

/// How long bpftrace may take to start (it parses the kernel's BTF first).
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// CPU time and memory of a process, from /proc/<pid>/stat and /proc/<pid>/status.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcSample {
    /// utime + stime of every thread, live or exited, in seconds (10 ms resolution).
    pub cpu_s: f64,
    pub rss_kib: u64,
    /// Peak resident set (VmHWM).
    pub hwm_kib: u64,
}

pub fn proc_sample(pid: u32) -> Result<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    Ok(ProcSample {
        cpu_s: stat_cpu_seconds(&stat)?,
        rss_kib: kib("VmRSS:"),
        hwm_kib: kib("VmHWM:"),
    })
}

/// utime + stime (fields 14 and 15) of a /proc stat line, in seconds.
fn stat_cpu_seconds(stat: &str) -> Result<f64> {
    // The command name (field 2) may contain spaces and parentheses: count from the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|v| v.parse().ok())
            .context("malformed /proc stat")
    };
    // After ')': state is field 3, so utime (14) and stime (15) are at 11 and 12.
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok((ticks(11)? + ticks(12)?) as f64 / hz)
}

/// CPU seconds of this process's threads whose name starts with `prefix` (the subscribers).
pub fn threads_cpu_seconds(prefix: &str) -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    tasks
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with(prefix))
        })
        .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
        .filter_map(|s| stat_cpu_seconds(&s).ok())
        .sum()
}

/// The largest mappings of a process by resident size, from /proc/<pid>/smaps: where its
/// memory is (heap arenas, the ring buffer's double mapping, stacks).
pub fn largest_mappings(pid: u32, n: usize) -> Vec<(u64, String)> {
    let Ok(smaps) = std::fs::read_to_string(format!("/proc/{pid}/smaps")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut current = String::new();
    for line in smaps.lines() {
        if let Some(kib) = line.strip_prefix("Rss:") {
            let kib = kib
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .unwrap_or(0);
            out.push((kib, current.clone()));
        } else if line
            .split_whitespace()
            .next()
            .is_some_and(|f| f.contains('-'))
        {
            // A mapping's header: "start-end perms offset dev inode [path]".
            let fields: Vec<&str> = line.split_whitespace().collect();
            current = format!(
                "{} {}",
                fields.get(1).copied().unwrap_or(""),
                fields.get(5).copied().unwrap_or("[anon]")
            );
        }
    }
    out.sort_by_key(|m| std::cmp::Reverse(m.0));
    out.truncate(n);
    out
}

/// One BPF program's cumulated stats (counted only while BPF stats are enabled).
#[derive(Clone, Debug, Default)]
pub struct ProgStats {
    pub id: u32,
    pub name: String,
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

/// The BPF programs a process holds, from /proc/<pid>/fdinfo of its `anon_inode:bpf-prog` fds;
/// names from the kernel's program info (BPF_OBJ_GET_INFO_BY_FD, through aya).
pub fn prog_stats(pid: u32) -> Result<Vec<ProgStats>> {
    let mut progs = Vec::new();
    let dir = format!("/proc/{pid}/fd");
    for entry in std::fs::read_dir(&dir).with_context(|| format!("list {dir}"))? {
        let entry = entry?;
        let is_prog = std::fs::read_link(entry.path())
            .is_ok_and(|target| target.to_string_lossy() == "anon_inode:bpf-prog");
        if !is_prog {
            continue;
        }
        let info = format!("/proc/{pid}/fdinfo/{}", entry.file_name().to_string_lossy());
        let Ok(text) = std::fs::read_to_string(&info) else {
            continue; // closed meanwhile
        };
        let field = |key: &str| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        progs.push(ProgStats {
            id: field("prog_id:") as u32,
            name: String::new(),
            run_time_ns: field("run_time_ns:"),
            run_cnt: field("run_cnt:"),
        });
    }
    progs.sort_by_key(|p| p.id);
    progs.dedup_by_key(|p| p.id);
    let names: HashMap<u32, String> = aya::programs::loaded_programs()
        .flatten()
        .map(|info| {
            let name = info.name_as_str().unwrap_or("?").to_owned();
            (info.id(), name)
        })
        .collect();
    for prog in &mut progs {
        prog.name = names
            .get(&prog.id)
            .cloned()
            .unwrap_or_else(|| format!("prog{}", prog.id));
    }
    Ok(progs)
}

/// `after - before` per program (matched by id).
pub fn prog_delta(before: &[ProgStats], after: &[ProgStats]) -> Vec<ProgStats> {
    after
        .iter()
        .map(|a| {
            let b = before.iter().find(|b| b.id == a.id);
            ProgStats {
                run_time_ns: a.run_time_ns - b.map_or(0, |b| b.run_time_ns),
                run_cnt: a.run_cnt - b.map_or(0, |b| b.run_cnt),
                ..a.clone()
            }
        })
        .collect()
}

/// bpftrace on the same tracepoint, printing every TCP transition as a line: the same fields
/// the agent reads (socket, netns through the socket as the agent does, states, ports, pid).
/// `-B line` flushes each line, so the reader sees events as a live `bpftrace | consumer` would.
pub const BPFTRACE_PRINT_EVERY: &str = r#"BEGIN { printf("ready\n"); }
tracepoint:sock:inet_sock_set_state /args->protocol == 6/ {
  printf("%llu %u %llx %d %d %d %d %d %s\n", nsecs,
    ((struct sock *)args->skaddr)->__sk_common.skc_net.net->ns.inum, args->skaddr,
    args->oldstate, args->newstate, args->sport, args->dport, pid, comm);
}"#;

/// A program on the same tracepoint that does nothing: what attaching anything there costs.
pub const BPFTRACE_EMPTY: &str = r#"BEGIN { printf("ready\n"); }
tracepoint:sock:inet_sock_set_state { }"#;

/// What the bench's reader of bpftrace's output counted.
#[derive(Debug, Default)]
pub struct BpftraceCounts {
    /// Lines for the bench's namespace read while counting.
    pub lines: u64,
    /// Event lines of every namespace read while counting.
    pub all_lines: u64,
    /// Events bpftrace itself reported lost ("Lost N events").
    pub lost: u64,
    pub latency: Histogram,
}

pub struct BpftraceProcess {
    child: Child,
    pub pid: u32,
    counting: Arc<AtomicBool>,
    pub progress: Arc<AtomicU64>,
    reader: Option<JoinHandle<BpftraceCounts>>,
    log: PathBuf,
}

impl BpftraceProcess {
    pub fn start(
        exe: &Path,
        script: &str,
        dir: &Path,
        tag: &str,
        netns: u64,
    ) -> Result<BpftraceProcess> {
        let log = dir.join(format!("bpftrace-{tag}.log"));
        let mut child = Command::new(exe)
            .args(["-B", "line", "-e", script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("start {}", exe.display()))?;
        let stdout = child.stdout.take().context("bpftrace stdout")?;
        let counting = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(AtomicU64::new(0));
        let (ready_tx, ready_rx) = mpsc::channel();
        let reader = {
            let counting = Arc::clone(&counting);
            let progress = Arc::clone(&progress);
            thread::Builder::new()
                .name("bench-sub-bt".into())
                .spawn(move || read_bpftrace(stdout, netns, &counting, &progress, ready_tx))?
        };
        let mut bt = BpftraceProcess {
            pid: child.id(),
            child,
            counting,
            progress,
            reader: Some(reader),
            log,
        };
        match ready_rx.recv_timeout(START_TIMEOUT) {
            Ok(()) => Ok(bt),
            Err(_) => {
                let _ = bt.child.kill();
                bail!(
                    "bpftrace did not start within {START_TIMEOUT:?}: {}",
                    std::fs::read_to_string(&bt.log).unwrap_or_default()
                )
            }
        }
    }

    /// From now on, lines for the namespace count.
    pub fn start_counting(&self) {
        self.counting.store(true, Ordering::SeqCst);
    }

    /// SIGINT (bpftrace's own way to stop), then the reader's counts.
    pub fn stop(mut self) -> Result<BpftraceCounts> {
        terminate(&mut self.child, libc::SIGINT)?;
        let reader = self.reader.take().context("stopped twice")?;
        let mut counts = reader
            .join()
            .map_err(|_| anyhow::anyhow!("the bpftrace reader panicked"))?;
        // bpftrace reports perf buffer losses as "Lost N events" (stdout or stderr by version).
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        counts.lost += lost_lines(&log);
        Ok(counts)
    }
}

impl Drop for BpftraceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn lost_lines(text: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.strip_prefix("Lost "))
        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

fn read_bpftrace(
    stdout: std::process::ChildStdout,
    netns: u64,
    counting: &AtomicBool,
    progress: &AtomicU64,
    ready: mpsc::Sender<()>,
) -> BpftraceCounts {
    let mut counts = BpftraceCounts::default();
    let mut reader = BufReader::with_capacity(1 << 16, stdout);
    let mut line = String::new();
    let mut ready = Some(ready);
    let netns = netns.to_string();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let now = monotonic_ns();
        let mut words = line.split_ascii_whitespace();
        let (Some(first), Some(second)) = (words.next(), words.next()) else {
            if line.trim() == "ready"
                && let Some(tx) = ready.take()
            {
                let _ = tx.send(());
            }
            continue;
        };
        if first == "Lost" {
            counts.lost += second.parse::<u64>().unwrap_or(0);
            continue;
        }
        if !counting.load(Ordering::Relaxed) {
            continue;
        }
        counts.all_lines += 1;
        if second != netns {
            continue;
        }
        counts.lines += 1;
        progress.store(counts.lines, Ordering::Relaxed);
        if let Ok(ts) = first.parse::<u64>() {
            counts.latency.record(now.saturating_sub(ts));
        }
    }
    counts
}

/// CLOCK_MONOTONIC in ns: the clock of bpf_ktime_get_ns, so of the events' kernel timestamps.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The agent's counters that matter here, from GetStats.
#[derive(Clone, Copy, Debug, Default)]
pub struct AgentCounters {
    /// Records the kernel programs wrote into the ring (all namespaces).
    pub kernel_records: u64,
    /// Records the agent decoded.
    pub records: u64,
    pub published: u64,
    pub ring_full: u64,
    /// Program runs the kernel skipped (another BPF program was running on that CPU).
    pub kernel_missed: u64,
    pub subscriber_drops: u64,
    pub live_connections: u64,
}

impl AgentCounters {
    pub fn from_stats(s: &proto::Stats) -> AgentCounters {
        AgentCounters {
            kernel_records: s.kernel_records,
            records: s.records_decoded,
            published: s.events.iter().map(|k| k.count).sum(),
            ring_full: s.kernel_ring_full,
            kernel_missed: s.kernel_missed,
            subscriber_drops: s.subscriber_drops,
            live_connections: s.live_connections,
        }
    }

    pub fn since(&self, before: &AgentCounters) -> AgentCounters {
        AgentCounters {
            kernel_records: self.kernel_records - before.kernel_records,
            records: self.records - before.records,
            published: self.published - before.published,
            ring_full: self.ring_full - before.ring_full,
            kernel_missed: self.kernel_missed - before.kernel_missed,
            subscriber_drops: self.subscriber_drops - before.subscriber_drops,
            live_connections: self.live_connections,
        }
    }
}

pub async fn agent_counters(client: &mut TcpTraceClient<Channel>) -> Result<AgentCounters> {
    let stats = client
        .get_stats(proto::GetStatsRequest {})
        .await
        .context("GetStats")?
        .into_inner();
    Ok(AgentCounters::from_stats(&stats))
}

/// Finds bpftrace on PATH or in /usr/sbin, /usr/bin.
pub fn find_bpftrace() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|d| d.join("bpftrace"))
        .find(|p| p.is_file())
}

/// Holds kernel BPF run-time statistics on while it lives. BPF_ENABLE_STATS is the same switch
/// as the kernel.bpf_stats_enabled sysctl (one static key), but reference-counted per fd: the
/// kernel turns it off when the last holder closes, even if this process is killed, and it
/// never turns off stats someone else enabled.
pub struct BpfStatsOn(#[allow(dead_code)] std::os::fd::OwnedFd);

pub fn enable_bpf_stats() -> Result<BpfStatsOn> {
    let fd = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("BPF_ENABLE_STATS (needs kernel 5.8+ and CAP_SYS_ADMIN)")?;
    Ok(BpfStatsOn(fd))
}
