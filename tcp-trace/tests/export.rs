//! The exporters against real components: a real Prometheus server (the Debian package) scraping
//! the agent's `/metrics`, `promtool check metrics`, and an OTLP/gRPC receiver built from the
//! official protos (tests/python/otlp_receiver.py), alive and dead. Each agent traces only its
//! test's namespace (the kernel-side filter), so its counters are that namespace's.
mod support;

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use serde_json::Value;
use support::{NetNs, Roundtrip, agent::TestAgent, http_get, roundtrips};
use tcp_trace::{
    agent::AgentConfig,
    capture::CaptureConfig,
    export::{ExportConfig, OtlpConfig, OtlpLogs},
};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

fn config(ns: &NetNs, export: ExportConfig) -> AgentConfig {
    AgentConfig {
        capture: CaptureConfig {
            netns: Some(u32::try_from(ns.inode()).expect("namespace inodes fit in 32 bits")),
            ..CaptureConfig::default()
        },
        export,
        ..AgentConfig::default()
    }
}

fn loopback_metrics() -> Option<SocketAddr> {
    Some(SocketAddr::from(([127, 0, 0, 1], 0)))
}

/// The agent's `/metrics` in the Prometheus text format.
fn scrape(agent: SocketAddr) -> String {
    let (status, body) = http_get(agent, "/metrics", "text/plain");
    assert_eq!(status, 200, "{body}");
    body
}

/// The value of one sample in a text exposition, e.g. `name{label="x"}`.
fn sample(text: &str, series: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().expect("an integer sample"))
}

/// Refused connections: connect() to a port nothing listens on, in `ns`.
fn refused(ns: &NetNs, n: usize) {
    ns.run(|| {
        for _ in 0..n {
            let err = TcpStream::connect(("127.0.0.1", 9)).expect_err("nothing listens on 9");
            assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
        }
    });
}

/// An agent tracing only `ns`, serving `/metrics` on loopback.
async fn metrics_agent(ns: &NetNs) -> TestAgent {
    let export = ExportConfig {
        metrics: loopback_metrics(),
        otlp: None,
    };
    TestAgent::start_with(config(ns, export)).await
}

/// `trips` roundtrips on loopback in `ns`, then `refused` connections refused.
fn workload(ns: &NetNs, trips: usize, refused_: usize) -> Vec<Roundtrip> {
    tokio::task::block_in_place(|| {
        let trips = roundtrips(ns, "127.0.0.1".parse().unwrap(), trips);
        refused(ns, refused_);
        trips
    })
}

/// A Prometheus server on loopback with a scrape config of its own; stopped on drop.
struct Prometheus {
    child: Child,
    dir: PathBuf,
    addr: SocketAddr,
}

impl Prometheus {
    /// Runs `prometheus` with docs/deploy/prometheus.yml, scraping `target`.
    fn start(target: SocketAddr) -> Prometheus {
        let config = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../docs/deploy/prometheus.yml"
        ))
        .expect("docs/deploy/prometheus.yml");
        assert!(config.contains("127.0.0.1:9464"), "the documented target");
        let config = config.replace("127.0.0.1:9464", &target.to_string());
        let dir = std::env::temp_dir().join(format!(
            "tcp-trace-prometheus-{}-{}",
            std::process::id(),
            target.port()
        ));
        std::fs::create_dir_all(&dir).expect("a directory for Prometheus");
        std::fs::write(dir.join("prometheus.yml"), config).expect("write the scrape config");
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("log")).expect("a log file"))
            .spawn()
            .expect("prometheus runs (cargo xtask setup installs the Debian package)");
        let prometheus = Prometheus { child, dir, addr };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(addr).is_err() || http_get(addr, "/-/ready", "*/*").0 != 200 {
            assert!(
                Instant::now() < deadline,
                "Prometheus not ready in 30 s: {}",
                prometheus.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        prometheus
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    /// An instant query's result vector.
    fn query(&self, query: &str) -> Vec<Value> {
        let (status, body) = http_get(self.addr, &format!("/api/v1/query?query={query}"), "*/*");
        assert_eq!(status, 200, "{query}: {body}");
        let json: Value = serde_json::from_str(&body).expect("Prometheus answers JSON");
        json["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Each series' `label` -> its value, for a query whose series differ in `label`.
    fn values_by(&self, query: &str, label: &str) -> Vec<(String, u64)> {
        let mut values: Vec<(String, u64)> = self
            .query(query)
            .iter()
            .map(|series| {
                let name = series["metric"][label].as_str().unwrap_or("").to_owned();
                let value = series["value"][1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .expect("a number");
                (name, value)
            })
            .collect();
        values.sort();
        values
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_as_many_opens_as_the_kernel_counted() {
    let ns = NetNs::new("prom");
    let agent = metrics_agent(&ns).await;
    let prometheus = Prometheus::start(agent.metrics_addr());
    let before = ns.snmp();
    workload(&ns, 20, 3);
    let delta = ns.snmp().delta(&before);
    let (active, passive) = (
        delta.get("Tcp:ActiveOpens") as u64,
        delta.get("Tcp:PassiveOpens") as u64,
    );
    assert_eq!((active, passive), (23, 20), "the workload's opens");
    let expected = vec![
        ("active".to_owned(), active),
        ("passive".to_owned(), passive),
    ];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = tokio::task::block_in_place(|| {
            prometheus.values_by("tcptrace_connections_opened_total", "direction")
        });
        if got == expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus has {got:?}, the kernel counted {expected:?}; up: {:?}; log: {}",
            prometheus.query("up"),
            prometheus.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let refused = tokio::task::block_in_place(|| {
        prometheus.values_by(
            "tcptrace_connection_failures_total{reason=\"refused\"}",
            "direction",
        )
    });
    assert_eq!(refused, [("active".to_owned(), 3)]);
    let addr = agent.metrics_addr();
    let text = tokio::task::block_in_place(|| scrape(addr));
    assert_eq!(
        sample(
            &text,
            "tcptrace_connections_closed_total{direction=\"passive\",cause=\"orderly\",closer=\"remote\"}"
        ),
        Some(20),
        "{text}"
    );
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_check_metrics_passes_on_the_scraped_text() {
    let ns = NetNs::new("promtool");
    let agent = metrics_agent(&ns).await;
    workload(&ns, 5, 1);
    let addr = agent.metrics_addr();
    let text = tokio::task::block_in_place(|| scrape(addr));
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs (cargo xtask setup installs the Debian package prometheus)");
    promtool
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let out = promtool.wait_with_output().expect("promtool finishes");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // OpenMetrics for those who ask for it (Prometheus does).
    let (status, open) = tokio::task::block_in_place(|| {
        http_get(
            addr,
            "/metrics",
            "application/openmetrics-text;version=1.0.0",
        )
    });
    assert_eq!(status, 200);
    assert!(open.ends_with("# EOF\n"), "{open}");
    let series = text.lines().filter(|l| !l.starts_with('#')).count();
    assert!(series > 0);
    agent.shutdown().await;
}

/// The OTLP receiver of tests/python, on 127.0.0.1:`port`; stopped on drop.
struct Receiver {
    child: Child,
    lines: mpsc::Receiver<Value>,
}

impl Receiver {
    fn start(port: u16) -> Receiver {
        let mut child = Command::new("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/python/otlp_receiver.py"
            ))
            .arg(port.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs (cargo xtask setup installs opentelemetry-proto and grpcio)");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let value = serde_json::from_str(&line).expect("the receiver prints JSON");
                if tx.send(value).is_err() {
                    return;
                }
            }
        });
        let receiver = Receiver { child, lines };
        let first = receiver.lines.recv_timeout(Duration::from_secs(30)).expect(
            "the receiver starts listening (are opentelemetry-proto and grpcio installed?)",
        );
        assert_eq!(first["kind"], "listening");
        receiver
    }

    /// What arrived until now: log records and metric exports.
    fn take(&self, logs: &mut Vec<Value>, metrics: &mut Vec<Value>) {
        while let Ok(line) = self.lines.try_recv() {
            match line["kind"].as_str() {
                Some("log") => logs.push(line),
                Some("metrics") => metrics.push(line),
                _ => panic!("unexpected line {line}"),
            }
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn otlp_config(port: u16, queue: usize) -> ExportConfig {
    ExportConfig {
        metrics: loopback_metrics(),
        otlp: Some(OtlpConfig {
            endpoint: format!("http://127.0.0.1:{port}"),
            queue,
            metrics_interval: Duration::from_secs(1),
            ..OtlpConfig::default()
        }),
    }
}

fn attribute<'a>(record: &'a Value, key: &str) -> &'a Value {
    &record["attributes"][key]
}

/// The records of `trip`: (active, passive), each exactly once.
fn records_of<'a>(logs: &'a [Value], trip: &Roundtrip) -> (&'a Value, &'a Value) {
    // Client ports come round again over thousands of connections; with the server's port
    // (a listener per `roundtrips` call) they name one connection.
    let ports = |r: &&Value| {
        (
            attribute(r, "client.port").as_u64(),
            attribute(r, "server.port").as_u64(),
        )
    };
    let trip_ports = (
        Some(u64::from(trip.client.port())),
        Some(u64::from(trip.server.port())),
    );
    let mine: Vec<&Value> = logs.iter().filter(|r| ports(r) == trip_ports).collect();
    let side = |direction: &str| {
        let found: Vec<&&Value> = mine
            .iter()
            .filter(|r| attribute(r, "tcptrace.direction") == direction)
            .collect();
        assert_eq!(found.len(), 1, "{direction} records of {trip:?}: {mine:?}");
        *found[0]
    };
    (side("active"), side("passive"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_receiver_gets_one_log_record_per_connection_end() {
    let ns = NetNs::new("otlp");
    let port = free_port();
    let receiver = Receiver::start(port);
    let agent = TestAgent::start_with(config(&ns, otlp_config(port, 8192))).await;
    let trips = workload(&ns, 10, 2);
    // Ten trips end twenty connections (both sides), and two refused ones end too.
    let expected = 2 * trips.len() + 2;
    let (mut logs, mut metrics) = (Vec::new(), Vec::new());
    let deadline = Instant::now() + Duration::from_secs(20);
    while logs.len() < expected || metrics.is_empty() {
        assert!(
            Instant::now() < deadline,
            "{} of {expected} log records, {} metric exports: {logs:?}",
            logs.len(),
            metrics.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        receiver.take(&mut logs, &mut metrics);
    }
    // Anything extra (a duplicate) would arrive within a batch's linger.
    tokio::time::sleep(Duration::from_secs(1)).await;
    receiver.take(&mut logs, &mut metrics);
    assert_eq!(logs.len(), expected, "{logs:#?}");
    for trip in &trips {
        let (active, passive) = records_of(&logs, trip);
        for record in [active, passive] {
            assert_eq!(record["event_name"], "tcptrace.connection.closed");
            assert_eq!(attribute(record, "network.transport"), "tcp");
            assert_eq!(attribute(record, "network.type"), "ipv4");
            assert_eq!(attribute(record, "server.address"), "127.0.0.1");
            assert_eq!(
                attribute(record, "server.port").as_u64(),
                Some(u64::from(trip.server.port()))
            );
            assert_eq!(
                attribute(record, "process.pid").as_u64(),
                Some(u64::from(std::process::id()))
            );
            assert_eq!(attribute(record, "tcptrace.close.cause"), "orderly");
            assert!(
                attribute(record, "tcptrace.handshake.duration").is_f64(),
                "{record}"
            );
            assert_eq!(record["resource"]["service.name"], "tcp-trace");
        }
        assert_eq!(
            attribute(active, "network.peer.port").as_u64(),
            Some(u64::from(trip.server.port()))
        );
        assert_eq!(
            attribute(passive, "network.local.port").as_u64(),
            Some(u64::from(trip.server.port()))
        );
        assert_eq!(attribute(active, "tcptrace.close.closer"), "local");
        assert_eq!(attribute(passive, "tcptrace.close.closer"), "remote");
    }
    let refused: Vec<&Value> = logs
        .iter()
        .filter(|r| attribute(r, "tcptrace.close.cause") == "refused")
        .collect();
    assert_eq!(refused.len(), 2, "{logs:#?}");
    // The metrics too, with the same names and labels as on /metrics.
    let last = &metrics.last().expect("a metrics export")["points"];
    for name in [
        "tcptrace_connections_opened{direction=active}",
        "tcptrace_connections_opened{direction=passive}",
        "tcptrace_handshake_duration{direction=active}",
        "tcptrace_events_lost{stage=otlp}",
        "tcptrace_build_info{version=0.1.0}",
    ] {
        assert!(last.get(name).is_some(), "{name} in {last}");
    }
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_logs_failures_exports_the_failed_connections_only() {
    let ns = NetNs::new("otlpfail");
    let port = free_port();
    let receiver = Receiver::start(port);
    let mut export = otlp_config(port, 8192);
    if let Some(otlp) = &mut export.otlp {
        otlp.logs = OtlpLogs::Failures;
    }
    let agent = TestAgent::start_with(config(&ns, export)).await;
    // Twenty orderly ends, three refused connections.
    let trips = workload(&ns, 10, 3);
    let (mut logs, mut metrics) = (Vec::new(), Vec::new());
    let deadline = Instant::now() + Duration::from_secs(20);
    while logs.len() < 3 || metrics.is_empty() {
        assert!(
            Instant::now() < deadline,
            "{} of 3 log records: {logs:?}",
            logs.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        receiver.take(&mut logs, &mut metrics);
    }
    // The orderly ends closed before the refusals: anything extra would be in by now, or
    // within a batch's linger.
    tokio::time::sleep(Duration::from_secs(1)).await;
    receiver.take(&mut logs, &mut metrics);
    let causes: Vec<&Value> = logs
        .iter()
        .map(|r| attribute(r, "tcptrace.close.cause"))
        .collect();
    assert_eq!(causes, ["refused"; 3], "{logs:#?}");
    // The metrics still count every connection.
    let last = &metrics.last().expect("a metrics export")["points"];
    let opened = &last["tcptrace_connections_opened{direction=passive}"];
    assert_eq!(opened.as_u64(), Some(trips.len() as u64), "{last}");
    agent.shutdown().await;
}

/// The agent binary in a process of its own, so that its memory is its own: traces `ns` only,
/// serves `/metrics` on loopback and exports to an OTLP receiver on `otlp_port`. Stopped on drop.
struct AgentProcess {
    child: Child,
    metrics: SocketAddr,
}

impl AgentProcess {
    fn start(ns: &NetNs, otlp_port: u16, queue: usize) -> AgentProcess {
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let socket = std::env::temp_dir().join(format!(
            "tcp-trace-export-{}-{}.sock",
            std::process::id(),
            metrics.port()
        ));
        let child = Command::new(env!("CARGO_BIN_EXE_tcp-trace"))
            .arg("agent")
            .arg(format!("--listen=unix:{}", socket.display()))
            .arg(format!("--netns={}", ns.inode()))
            .arg(format!("--metrics={metrics}"))
            .arg(format!("--otlp-endpoint=http://127.0.0.1:{otlp_port}"))
            .arg(format!("--otlp-queue={queue}"))
            // Each `roundtrips` call listens on a new port, a new peer: keep the per-peer
            // aggregates (bounded on their own) from growing into what this test measures.
            .arg("--max-peers=16")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the tcp-trace binary runs");
        let agent = AgentProcess { child, metrics };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(metrics).is_err() {
            assert!(
                Instant::now() < deadline,
                "the agent serves no metrics after 30 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        agent
    }

    /// Resident memory, KiB.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("the agent is running");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_dead_otlp_receiver_costs_counted_drops_not_memory_and_never_stalls_tracing() {
    let ns = NetNs::new("otlpdown");
    let port = free_port();
    let queue = 1024;
    let agent = AgentProcess::start(&ns, port, queue);
    let before = ns.snmp();
    let lo = "127.0.0.1".parse().unwrap();
    // Ten seconds of churn with nothing listening for OTLP; the agent's memory sampled each
    // second, from after the first second (the ring's pages and the table's first growth).
    let started = Instant::now();
    let mut trips = Vec::new();
    let mut rss = Vec::new();
    while started.elapsed() < Duration::from_secs(10) {
        trips.extend(roundtrips(&ns, lo, 20));
        // Below the rate where a debug build's drain falls behind the kernel ring (records
        // lost there are another stage's, counted as kernel_ring).
        std::thread::sleep(Duration::from_millis(5));
        if started.elapsed() >= Duration::from_secs(rss.len() as u64 + 1) {
            rss.push(agent.rss_kib());
        }
    }
    let ends = 2 * trips.len() as u64;
    // Tracing kept up meanwhile: every open the kernel counted is on /metrics.
    let delta = ns.snmp().delta(&before);
    let opens = (delta.get("Tcp:ActiveOpens") + delta.get("Tcp:PassiveOpens")) as u64;
    assert_eq!(opens, ends);
    let opened = |text: &str| {
        ["active", "passive"]
            .iter()
            .map(|d| {
                let series = format!("tcptrace_connections_opened_total{{direction=\"{d}\"}}");
                sample(text, &series).unwrap_or(0)
            })
            .sum::<u64>()
    };
    // And every end summarized (so handed to the exporter, and dropped there): with nobody
    // subscribed the agent drains every 10 ms, and a close completes in the drain after its own.
    let closed =
        |text: &str| support::metric_sum(text, "tcptrace_connections_closed_total", "") as u64;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = scrape(agent.metrics);
        if opened(&text) == opens && closed(&text) >= ends {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agent counted {} of the kernel's {opens} opens and {} of {ends} closes; ring: {:?}",
            opened(&text),
            closed(&text),
            sample(&text, "tcptrace_events_lost_total{stage=\"kernel_ring\"}")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let lost = |text: &str| sample(text, "tcptrace_events_lost_total{stage=\"otlp\"}").unwrap_or(0);
    let lost_while_down = lost(&scrape(agent.metrics));
    // At most the queue and one batch (512) are held; everything else was counted and freed.
    assert!(
        lost_while_down >= ends.saturating_sub(queue as u64 + 512),
        "{lost_while_down} of {ends} connection ends lost"
    );
    // Holding the ends instead, as log records (about 1.5 KiB each), would take tens of MiB; the
    // rest of the agent grows a few MiB over such a run (the bus, the heap's fragments).
    let (first, last) = (rss.first().copied(), rss.last().copied());
    let growth = last.unwrap_or(0).saturating_sub(first.unwrap_or(0));
    eprintln!(
        "{ends} connection ends, {lost_while_down} lost; agent RSS each second (KiB): {rss:?}"
    );
    assert!(
        growth < 16 << 10,
        "the agent grew {growth} KiB while the receiver was down: {rss:?}"
    );

    // The receiver comes up: the exporter's retries find it.
    let receiver = Receiver::start(port);
    let (mut logs, mut metrics) = (Vec::new(), Vec::new());
    let deadline = Instant::now() + Duration::from_secs(30);
    while logs.is_empty() {
        assert!(
            Instant::now() < deadline,
            "nothing arrived after the receiver came up"
        );
        std::thread::sleep(Duration::from_millis(100));
        receiver.take(&mut logs, &mut metrics);
    }
    // Every connection end is either delivered once or counted as lost...
    let settled = |logs: &mut Vec<Value>, metrics: &mut Vec<Value>, ends: u64| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            receiver.take(logs, metrics);
            let lost = lost(&scrape(agent.metrics));
            if logs.len() as u64 + lost == ends {
                return lost;
            }
            assert!(
                Instant::now() < deadline,
                "{} delivered + {lost} lost != {ends} connection ends",
                logs.len()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let lost_before = settled(&mut logs, &mut metrics, ends);
    // ... and once the backlog is through, nothing more is lost.
    let after = roundtrips(&ns, lo, 5);
    let lost_after = settled(&mut logs, &mut metrics, ends + 2 * after.len() as u64);
    assert_eq!(lost_after, lost_before);
    for trip in &after {
        records_of(&logs, trip);
    }
}

#[test]
fn deploy_md_shows_the_configs_the_tests_use() {
    let docs = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs");
    let read = |path: &str| {
        std::fs::read_to_string(format!("{docs}/{path}")).unwrap_or_else(|e| panic!("{path}: {e}"))
    };
    let deploy = read("deploy.md");
    for file in ["deploy/prometheus.yml", "deploy/otel-collector.yaml"] {
        assert!(
            deploy.contains(&read(file)),
            "docs/deploy.md shows docs/{file} verbatim"
        );
    }
}
