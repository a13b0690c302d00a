//! A real agent as a child process: the `tcp-trace agent` binary, served on a Unix socket of its
//! own, stopped the way an operator stops it (SIGTERM). What the bench measures (its CPU and
//! memory are its own), and what a test needs when the agent's process itself matters.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use tcp_trace::{api::ListenAddr, client, proto, proto::tcp_trace_client::TcpTraceClient};
use tonic::transport::Channel;

/// How long the agent may take to load, attach and answer.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A `tcp-trace agent` child process serving on its own Unix socket.
pub struct AgentProcess {
    /// Killed and reaped if the process is dropped without [`AgentProcess::stop`].
    child: KillOnDrop,
    pub pid: u32,
    pub addr: ListenAddr,
    log: PathBuf,
}

impl AgentProcess {
    /// Starts `exe agent` (every namespace, or only `netns`, filtered in the kernel) with more
    /// `flags`, its stderr into `<dir>/agent-<tag>.log`, and returns once it answers GetStats,
    /// which it serves only after its programs are attached.
    pub async fn start(
        exe: &Path,
        dir: &Path,
        tag: &str,
        netns: Option<u64>,
        flags: &[&str],
    ) -> Result<(AgentProcess, TcpTraceClient<Channel>)> {
        let socket = crate::agent::socket_path(tag);
        let _ = std::fs::remove_file(&socket);
        let log = dir.join(format!("agent-{tag}.log"));
        let mut cmd = Command::new(exe);
        cmd.arg("agent")
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()));
        if let Some(inode) = netns {
            cmd.arg("--netns").arg(inode.to_string());
        }
        cmd.args(flags);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("start {}", exe.display()))?;
        let mut agent = AgentProcess {
            pid: child.id(),
            child: KillOnDrop(Some(child)),
            addr: ListenAddr::Unix(socket),
            log,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = agent.child.get().try_wait()? {
                bail!(
                    "the agent exited at start ({status}): {}",
                    std::fs::read_to_string(&agent.log).unwrap_or_default()
                );
            }
            if let Ok(mut c) = client::connect(&agent.addr).await
                && c.get_stats(proto::GetStatsRequest {}).await.is_ok()
            {
                return Ok((agent, c));
            }
            if Instant::now() > deadline {
                bail!("the agent did not answer within {START_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM (graceful: the agent detaches its programs and removes its socket), then waits
    /// for it to exit: the kernel takes most of a second to detach its programs (RCU grace
    /// periods), and the next run must not start with them still attached. `wait: false` leaves
    /// the wait to [`reap_stopped`] (when time matters more than a quiet next run).
    pub fn stop(mut self, wait: bool) -> Result<()> {
        let mut child = self.child.take();
        if wait {
            return terminate(&mut child, libc::SIGTERM);
        }
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let waiter = thread::spawn(move || {
            let _ = terminate(&mut child, 0);
        });
        STOPPING
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(waiter);
        Ok(())
    }
}

/// Agents stopped without waiting, still exiting.
static STOPPING: Mutex<Vec<JoinHandle<()>>> = Mutex::new(Vec::new());

/// Waits until every agent stopped with `stop(false)` has exited.
pub fn reap_stopped() {
    let waiters = std::mem::take(&mut *STOPPING.lock().unwrap_or_else(|p| p.into_inner()));
    for waiter in waiters {
        let _ = waiter.join();
    }
}

/// A child process killed (and reaped) when dropped, unless taken out first.
pub struct KillOnDrop(pub Option<Child>);

impl KillOnDrop {
    pub fn get(&mut self) -> &mut Child {
        self.0.as_mut().expect("present until taken")
    }

    pub fn take(&mut self) -> Child {
        self.0.take().expect("taken once")
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Sends `signal` (0: none, just wait) and waits up to 10 s for the exit, then kills.
pub fn terminate(child: &mut Child, signal: i32) -> Result<()> {
    if signal != 0 {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(child.id() as i32, signal) };
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(5));
    }
    child.kill()?;
    child.wait()?;
    bail!("{} did not stop within 10 s of signal {signal}", child.id())
}

/// The optimised tcp-trace binary, for tests whose agent must keep up with a real load (a debug
/// build cannot): `cargo xtask test` builds it and names it in TCP_TRACE_OPTIMISED_BIN; under
/// `cargo test --release` the test's own binary is one.
pub fn optimised_binary(own: &str) -> PathBuf {
    if let Some(path) = std::env::var_os("TCP_TRACE_OPTIMISED_BIN") {
        return path.into();
    }
    if cfg!(debug_assertions) {
        panic!(
            "this test needs an optimised tcp-trace: run it with `cargo xtask test` (which builds \
             one and sets TCP_TRACE_OPTIMISED_BIN) or `cargo test --release`"
        );
    }
    own.into()
}

/// An optimised agent tracing one namespace with no subscriber, serving `/metrics` on a free
/// loopback port: the always-on mode, read as an operator reads it.
pub struct MetricsAgent {
    pub agent: AgentProcess,
    pub client: TcpTraceClient<Channel>,
    pub metrics: std::net::SocketAddr,
}

impl MetricsAgent {
    /// `own` is the test's `env!("CARGO_BIN_EXE_tcp-trace")` (see [`optimised_binary`]).
    pub async fn start(own: &str, tag: &str, netns: u64, flags: &[&str]) -> MetricsAgent {
        let metrics = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port");
        let metrics_flag = metrics.to_string();
        let mut all = vec!["--metrics", metrics_flag.as_str()];
        all.extend_from_slice(flags);
        let (agent, client) = AgentProcess::start(
            &optimised_binary(own),
            &std::env::temp_dir(),
            tag,
            Some(netns),
            &all,
        )
        .await
        .expect("the agent starts");
        MetricsAgent {
            agent,
            client,
            metrics,
        }
    }

    /// `/metrics` as Prometheus' text format.
    pub fn scrape(&self) -> String {
        let (status, body) = crate::http_get(self.metrics, "/metrics", "text/plain");
        assert_eq!(status, 200, "{body}");
        body
    }

    pub async fn stats(&mut self) -> proto::Stats {
        crate::agent::stats(&mut self.client).await
    }

    /// Waits (30 s at most) until the agent has seen the close of every connection `ns` opened
    /// since `before` (its counters then), or reported the state program's skip; then half a
    /// second more, for anything extra (a duplicate). Returns the namespace's counters since
    /// `before`, and `/metrics` then.
    pub async fn caught_up(
        &self,
        ns: &crate::NetNs,
        before: &crate::Counters,
        at_start: &str,
    ) -> (crate::Counters, String) {
        let grown = |now: &str, name: &str, labels: &str| {
            crate::metric_sum(now, name, labels) - crate::metric_sum(at_start, name, labels)
        };
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let delta = ns.snmp().delta(before);
            let now = self.scrape();
            let opens = delta.get("Tcp:ActiveOpens") + delta.get("Tcp:PassiveOpens");
            let seen = grown(&now, "tcptrace_connections_closed_total", "")
                + grown(&now, "tcptrace_kernel_runs_missed_total", "hook=\"state\"");
            if seen >= opens || Instant::now() > until {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        (ns.snmp().delta(before), self.scrape())
    }
}

/// redis-server on 127.0.0.1:`port` in `ns` (a real server from Debian's packages; `cargo xtask
/// test` installs it), answering once this returns.
pub fn redis_server(ns: &crate::NetNs, port: u16) -> KillOnDrop {
    let server = ns
        .command("redis-server")
        .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .args(["--save", "", "--appendonly", "no", "--tcp-backlog", "4096"])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server runs (cargo xtask test installs it)");
    let server = KillOnDrop(Some(server));
    let until = Instant::now() + Duration::from_secs(10);
    while ns.run(|| std::net::TcpStream::connect(("127.0.0.1", port)).is_err()) {
        assert!(Instant::now() < until, "redis-server did not start");
        thread::sleep(Duration::from_millis(20));
    }
    server
}

/// `redis-benchmark` against [`redis_server`] on `port` in `ns`, a new connection per request
/// (`-k 0`, 20 clients, PING): `requests` connections that churn, until they are done.
pub async fn redis_churn(ns: &crate::NetNs, port: u16, requests: u32) {
    redis_churn_by(ns, port, requests, 20).await;
}

/// [`redis_churn`] with `clients` clients.
pub async fn redis_churn_by(ns: &crate::NetNs, port: u16, requests: u32, clients: u32) {
    let mut load = ns.command("redis-benchmark");
    load.args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-k", "0", "-c", &clients.to_string()])
        .args(["-n", &requests.to_string()])
        .args(["-t", "ping_inline", "-q"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let status = tokio::task::spawn_blocking(move || load.status())
        .await
        .expect("the benchmark's thread")
        .expect("redis-benchmark runs (cargo xtask test installs it)");
    assert!(status.success(), "redis-benchmark: {status}");
}
