//! The `redis` phase's workload: a real third-party server under connection churn. redis-server
//! (Debian's package) in the run's fresh namespace, on loopback only, driven by its own load tool,
//! `redis-benchmark -k 0`, which opens a new connection for every request. Bounded in count
//! (`--requests`) and in time ([`RedisSpec::timeout`]): the tool is killed past it.
use std::{
    net::{Ipv4Addr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use tcp_trace_test_support::NetNs;

use super::workload::ChurnResult;

/// The port redis listens on, inside the run's own namespace (nothing else is there).
const PORT: u16 = 6379;

#[derive(Clone, Copy, Debug)]
pub struct RedisSpec {
    /// Requests per run, each on its own connection.
    pub requests: u64,
    /// Parallel clients of redis-benchmark.
    pub clients: usize,
    /// The load tool is killed (and the run fails) past this.
    pub timeout: Duration,
}

/// The two programs, found on PATH or in /usr/bin, /usr/sbin.
#[derive(Clone, Debug)]
pub struct RedisTools {
    pub server: PathBuf,
    pub benchmark: PathBuf,
}

impl RedisTools {
    pub fn find() -> Option<RedisTools> {
        Some(RedisTools {
            server: find_program("redis-server")?,
            benchmark: find_program("redis-benchmark")?,
        })
    }
}

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/bin", "/usr/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// redis-server running in a namespace; killed and reaped on drop.
pub struct Server(Child);

impl Server {
    /// Starts it with no persistence and an accept backlog deep enough for the churn (a short
    /// backlog overflows and stalls clients on 1 s SYN retransmits), and returns once it
    /// accepts. That probe connection is made before any tracer starts counting.
    pub fn start(ns: &NetNs, tools: &RedisTools, log: &Path) -> Result<Server> {
        let child = ns
            .command(&tools.server)
            .args(["--bind", "127.0.0.1", "--port", &PORT.to_string()])
            .args(["--save", "", "--appendonly", "no", "--tcp-backlog", "4096"])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(log)?)
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("start {}", tools.server.display()))?;
        let mut server = Server(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while ns.run(|| TcpStream::connect((Ipv4Addr::LOCALHOST, PORT)).is_err()) {
            if let Some(status) = server.0.try_wait()? {
                bail!(
                    "redis-server exited at start ({status}): {}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            ensure!(
                Instant::now() < deadline,
                "redis-server did not accept within 10 s"
            );
            thread::sleep(Duration::from_millis(20));
        }
        Ok(server)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `redis-benchmark -k 0` against the server in `ns`; returns its requests (each one
/// connection) and the time its own clock measured for them (requests / its requests/s).
pub fn load(ns: &NetNs, tools: &RedisTools, spec: RedisSpec) -> Result<ChurnResult> {
    let requests = spec.requests.to_string();
    let clients = spec.clients.to_string();
    let mut child = ns
        .command(&tools.benchmark)
        .args(["-h", "127.0.0.1", "-p", &PORT.to_string()])
        .args([
            "-k", "0", "-c", &clients, "-n", &requests, "-t", "get", "--csv",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("start {}", tools.benchmark.display()))?;
    let deadline = Instant::now() + spec.timeout;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "redis-benchmark did not finish {} requests within {:?}",
                spec.requests,
                spec.timeout
            );
        }
        thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "redis-benchmark failed ({}): {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let rps = requests_per_second(&stdout)
        .with_context(|| format!("no GET line in redis-benchmark's CSV output:\n{stdout}"))?;
    ensure!(rps > 0.0, "redis-benchmark measured {rps} requests/s");
    Ok(ChurnResult {
        connections: spec.requests,
        errors: 0,
        elapsed: Duration::from_secs_f64(spec.requests as f64 / rps),
        // redis listened before the run and closes after it: none in the window.
        listeners: 0,
    })
}

/// The `rps` column of the `"GET",...` line of `redis-benchmark --csv`.
fn requests_per_second(csv: &str) -> Option<f64> {
    let line = csv.lines().find(|l| l.starts_with("\"GET\""))?;
    line.split(',').nth(1)?.trim_matches('"').parse().ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn requests_per_second_is_the_get_lines_second_column() {
        let csv = "\"test\",\"rps\",\"avg_latency_ms\"\n\"GET\",\"14084.51\",\"1.234\"\n";
        assert_eq!(super::requests_per_second(csv), Some(14084.51));
        assert_eq!(super::requests_per_second("\"SET\",\"1\"\n"), None);
    }
}
