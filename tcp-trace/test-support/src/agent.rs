//! A real agent for a test: the real eBPF programs, loaded in this process, served on a Unix
//! socket of its own, with a gRPC client to it.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use tcp_trace::{
    agent::{Agent, AgentConfig},
    api::ListenAddr,
    proto::{self, event::Body, tcp_trace_client::TcpTraceClient},
};
use tonic::transport::Channel;

pub struct TestAgent {
    agent: Option<Agent>,
    pub addr: ListenAddr,
    pub client: TcpTraceClient<Channel>,
}

impl TestAgent {
    pub async fn start() -> TestAgent {
        Self::start_with(AgentConfig::default()).await
    }

    pub async fn start_with(config: AgentConfig) -> TestAgent {
        Self::start_serving(config, Vec::new()).await
    }

    /// Also listens on `tcp` (TCP addresses; port 0 picks one, see [`TestAgent::tcp_addr`]).
    pub async fn start_serving(mut config: AgentConfig, tcp: Vec<ListenAddr>) -> TestAgent {
        let addr = ListenAddr::Unix(socket_path("test"));
        config.listen = vec![addr.clone()];
        config.listen.extend(tcp);
        let agent = Agent::start(config)
            .await
            .expect("the agent starts (run the tests as root)");
        let client = tcp_trace::client::connect(&addr)
            .await
            .expect("the agent accepts clients");
        TestAgent {
            agent: Some(agent),
            addr,
            client,
        }
    }

    pub async fn subscribe(&mut self, filter: proto::Filter) -> tonic::Streaming<proto::Event> {
        let request = proto::SubscribeRequest {
            filter: Some(filter),
            queue: 0,
            ..Default::default()
        };
        self.client
            .subscribe(request)
            .await
            .expect("subscribe")
            .into_inner()
    }

    /// The first TCP address it listens on, port resolved.
    pub fn tcp_addr(&self) -> std::net::SocketAddr {
        let agent = self.agent.as_ref().expect("running");
        agent
            .listening
            .iter()
            .find_map(|a| match a {
                ListenAddr::Tcp(sock) => Some(*sock),
                ListenAddr::Unix(_) => None,
            })
            .expect("the agent listens on TCP")
    }

    /// Where it serves `/metrics` (`AgentConfig::export.metrics`), port resolved.
    pub fn metrics_addr(&self) -> std::net::SocketAddr {
        let agent = self.agent.as_ref().expect("running");
        agent.metrics_addr.expect("the agent serves metrics")
    }

    pub async fn subscribe_with(
        &mut self,
        request: proto::SubscribeRequest,
    ) -> tonic::Streaming<proto::Event> {
        self.client
            .subscribe(request)
            .await
            .expect("subscribe")
            .into_inner()
    }

    /// Waits until the agent counts exactly `n` subscribers (a dropped stream is noticed by the
    /// server a moment later).
    pub async fn wait_for_subscribers(&mut self, n: u32) -> proto::Stats {
        wait_for_subscribers(&mut self.client, n).await
    }

    /// ListConnections of one network namespace (inode), one page.
    pub async fn connections(&mut self, netns: u64) -> Vec<proto::Connection> {
        self.client
            .list_connections(proto::ListConnectionsRequest {
                filter: Some(netns_filter(netns)),
                ..Default::default()
            })
            .await
            .expect("ListConnections answers")
            .into_inner()
            .connections
    }

    pub async fn stats(&mut self) -> proto::Stats {
        stats(&mut self.client).await
    }

    /// Which hooks attached and which are missing.
    pub fn hooks(&self) -> &tcp_trace::capture::Hooks {
        &self.agent.as_ref().expect("running until shutdown").hooks
    }

    pub async fn shutdown(mut self) {
        if let Some(agent) = self.agent.take() {
            agent.shutdown().await;
        }
    }
}

/// A client that reads slowly on the wire too: its HTTP/2 stream window is small, so once its
/// application stops reading, the agent can send it only a few events before they queue.
pub async fn stalling_client(addr: &ListenAddr) -> TcpTraceClient<Channel> {
    let ListenAddr::Unix(path) = addr.clone() else {
        panic!("a Unix socket address")
    };
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .initial_stream_window_size(Some(8 << 10))
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        }))
        .await
        .expect("the agent accepts clients");
    TcpTraceClient::new(channel)
}

pub fn netns_filter(inode: u64) -> proto::Filter {
    proto::Filter {
        netns: vec![inode],
        ..Default::default()
    }
}

/// Reads events until `count` have arrived (panicking after `deadline` with what did), then
/// keeps reading for `grace` to catch any extra (duplicated or leaked) event.
pub async fn collect(
    stream: &mut tonic::Streaming<proto::Event>,
    count: usize,
    deadline: Duration,
    grace: Duration,
) -> Vec<proto::Event> {
    let mut events = Vec::new();
    let until = tokio::time::Instant::now() + deadline;
    while events.len() < count {
        match tokio::time::timeout_at(until, stream.message()).await {
            Ok(Ok(Some(event))) => events.push(event),
            Ok(other) => panic!(
                "stream ended after {} of {count} events: {other:?}",
                events.len()
            ),
            Err(_) => panic!(
                "only {} of {count} events within {deadline:?}; last: {:?}",
                events.len(),
                events.last()
            ),
        }
    }
    while let Ok(Ok(Some(event))) = tokio::time::timeout(grace, stream.message()).await {
        events.push(event);
    }
    events
}

/// A connection's transitions, `(old, new)` by name, in event order, keyed by connection id.
pub fn transitions_by_connection(events: &[proto::Event]) -> BTreeMap<u64, Vec<(String, String)>> {
    let mut out: BTreeMap<u64, Vec<(String, String)>> = BTreeMap::new();
    for event in events {
        if let Some(Body::StateChange(change)) = &event.body {
            let id = event
                .connection
                .as_ref()
                .expect("state changes carry their connection")
                .id;
            out.entry(id)
                .or_default()
                .push((state(change.old_state), state(change.new_state)));
        }
    }
    out
}

pub fn state(value: i32) -> String {
    proto::TcpState::try_from(value)
        .map(|s| s.as_str_name().trim_start_matches("TCP_STATE_").to_owned())
        .unwrap_or_else(|_| format!("?{value}"))
}

pub fn endpoint(e: &Option<proto::Endpoint>) -> std::net::SocketAddr {
    let e = e.as_ref().expect("endpoint present");
    std::net::SocketAddr::new(e.address.parse().expect("an IP address"), e.port as u16)
}

/// `[("CLOSE","SYN_SENT"), ...]` from `["CLOSE", "SYN_SENT", ...]`.
pub fn path(states: &[&str]) -> Vec<(String, String)> {
    states
        .windows(2)
        .map(|w| (w[0].to_owned(), w[1].to_owned()))
        .collect()
}

/// A Unix socket path of its own for an agent of this process: `/tmp/tcp-trace-<tag>-<pid>-<n>.sock`.
pub fn socket_path(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    std::env::temp_dir().join(format!(
        "tcp-trace-{tag}-{}-{}.sock",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// The `tcp-trace` binary of this build. Cargo builds a package's binaries before its
/// integration tests and puts them beside the tests' `deps/` directory: `target/<profile>/`.
pub fn tcp_trace_exe() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>");
    let bin = dir.join("tcp-trace");
    assert!(
        bin.is_file(),
        "no tcp-trace binary at {} (run the tests with cargo test)",
        bin.display()
    );
    bin
}

/// Runs the `tcp-trace` binary with `args`, asserts it succeeded (its stderr in the message),
/// and returns its stdout.
pub fn cli(args: &[&str]) -> String {
    let out = std::process::Command::new(tcp_trace_exe())
        .args(args)
        .output()
        .expect("the tcp-trace binary runs");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// Waits (up to 10 s, then panics) until the agent behind `client` counts `n` subscribers;
/// returns its stats then.
/// GetStats, answered.
pub async fn stats(client: &mut TcpTraceClient<Channel>) -> proto::Stats {
    client
        .get_stats(proto::GetStatsRequest {})
        .await
        .expect("GetStats")
        .into_inner()
}

pub async fn wait_for_subscribers(client: &mut TcpTraceClient<Channel>, n: u32) -> proto::Stats {
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let stats = stats(client).await;
        if stats.subscribers == n {
            return stats;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "{} subscribers, expected {n}",
            stats.subscribers
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
