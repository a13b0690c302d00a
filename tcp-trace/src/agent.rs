//! The agent: capture -> lifecycle -> bus -> gRPC, wired together and shut down as one.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use tokio::task::JoinSet;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tokio_util::sync::CancellationToken;

use crate::{
    api::{self, Access, Limits, ListenAddr, Listeners},
    bus::{Bus, BusConfig},
    capture::{self, Capture, CaptureConfig, DecodeError, Record},
    event::Events,
    export::{self, ExportConfig, Observer},
    lifecycle::{self, Connection, KeepaliveChange, KeepaliveDefaults, Peers, Table},
    model::TcpState,
    proto,
    stats::AgentStats,
};

#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub listen: Vec<ListenAddr>,
    pub capture: CaptureConfig,
    /// Most connections followed at once; beyond it new ones are counted, not followed.
    pub max_connections: usize,
    /// Closed connections that lived at least this long are long-lived, the rest short-lived.
    pub long_lived: Duration,
    /// Most remote peers aggregated in GetStats.
    pub max_peers: usize,
    pub limits: Limits,
    /// Latest events kept for clients that resume (`since_seq`) or ask for history.
    pub replay: usize,
    /// Socket group and TLS.
    pub access: Access,
    /// Prometheus and OTLP.
    pub export: ExportConfig,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            listen: vec![ListenAddr::default()],
            capture: CaptureConfig::default(),
            max_connections: 1_000_000,
            long_lived: Duration::from_secs(60),
            max_peers: 10_000,
            limits: Limits::default(),
            replay: BusConfig::default().replay,
            access: Access::default(),
            export: ExportConfig::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Capture(#[from] capture::CaptureError),
    #[error(transparent)]
    Listen(#[from] api::ListenError),
    #[error(transparent)]
    Export(#[from] export::ExportError),
}

/// A running agent. Stop it with [`Agent::shutdown`].
pub struct Agent {
    cancel: CancellationToken,
    tasks: JoinSet<()>,
    /// Where it listens, with TCP port 0 resolved.
    pub listening: Vec<ListenAddr>,
    pub hooks: capture::Hooks,
    /// Where `/metrics` is served (`--metrics`), port resolved.
    pub metrics_addr: Option<std::net::SocketAddr>,
    _listeners_cleanup: ListenerFiles,
}

/// Removes Unix socket files when the agent is gone.
struct ListenerFiles(Vec<std::path::PathBuf>);

impl Drop for ListenerFiles {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// An agent dropped without [`Agent::shutdown`] (a panicking caller) still stops its drain
/// thread, which would otherwise keep the runtime from shutting down.
impl Drop for Agent {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl Agent {
    /// Loads and attaches the programs, binds the listeners and starts serving. Returns once
    /// events are being captured.
    pub async fn start(config: AgentConfig) -> Result<Agent, AgentError> {
        // Say what is missing before touching /run or the kernel.
        capture::check_privileges()?;
        let tls = match &config.access.tls {
            Some(files) => Some(files.server_config()?),
            None => None,
        };
        let mut listeners = Listeners::bind(&config.listen, &config.access).await?;
        let mut capture = Capture::load(&config.capture)?;
        // Loading parsed the kernel's BTF (megabytes, now freed): give the heap back.
        release_free_heap();
        let hooks = capture.hooks().clone();
        let stats = Arc::new(AgentStats::new(capture.kernel_counters(), hooks.clone()));
        let table = Arc::new(Mutex::new(Table::new(
            config.max_connections,
            Peers::new(
                config.max_peers,
                u64::try_from(config.long_lived.as_nanos()).unwrap_or(u64::MAX),
            ),
        )));
        let bus = Bus::new(BusConfig {
            replay: config.replay,
            max_subscribers: config.limits.max_subscribers,
        });
        let cancel = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let exporters = export::start(
            &config.export,
            Arc::clone(&table),
            Arc::clone(&bus),
            Arc::clone(&stats),
            &cancel,
            &mut tasks,
        )
        .await?;

        let mut pipeline = Pipeline {
            table: Arc::clone(&table),
            bus: Arc::clone(&bus),
            stats: Arc::clone(&stats),
            events: Events::default(),
            closed: Vec::new(),
            keepalive_defaults: HashMap::new(),
            warned_malformed: false,
            table_capacity: 0,
            export: exporters.observer,
        };
        let drain_cancel = cancel.clone();
        // The drain loop sleeps in sub-millisecond steps, finer than tokio's timers: it gets a
        // thread of its own.
        tasks.spawn_blocking(move || {
            capture.run(&drain_cancel, &mut pipeline);
            // `capture` drops here: the programs detach.
        });

        let service = Arc::new(api::Service {
            bus,
            table,
            stats,
            limits: config.limits.clone(),
            stop: cancel.clone(),
        });
        let (health_reporter, health) = tonic_health::server::health_reporter();
        health_reporter
            .set_serving::<proto::tcp_trace_server::TcpTraceServer<api::Service>>()
            .await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .build_v1()
            .expect("the embedded descriptor set is valid");
        let server = || {
            // Keepalive pings find clients that vanished without closing (a host gone, a
            // network cut), so their subscriptions are freed.
            tonic::transport::Server::builder()
                .http2_keepalive_interval(Some(Duration::from_secs(30)))
                .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        };
        let routes = |builder: tonic::transport::Server| {
            let tcptrace = proto::tcp_trace_server::TcpTraceServer::from_arc(Arc::clone(&service))
                .max_decoding_message_size(config.limits.max_request_bytes);
            let mut builder = builder;
            builder
                .add_service(tcptrace)
                .add_service(health.clone())
                .add_service(reflection.clone())
        };
        // Unix sockets are guarded by file permissions; TLS is for TCP.
        let router = routes(server());
        let tcp_router = match tls {
            Some(tls) => routes(
                server()
                    .tls_config(tls)
                    .map_err(|err| api::ListenError::Tls(err.to_string()))?,
            ),
            None => router.clone(),
        };

        let listening = listeners.bound.clone();
        // The socket files now belong to the agent (removed when it is dropped), not to the
        // listener set, which is emptied below.
        let socket_files = listeners.take_socket_files();
        for (_, listener) in listeners.unix.drain(..) {
            let router = router.clone();
            let stop = cancel.clone();
            tasks.spawn(async move {
                let incoming = UnixListenerStream::new(listener);
                if let Err(err) = router
                    .serve_with_incoming_shutdown(incoming, stop.cancelled())
                    .await
                {
                    tracing::error!("gRPC server on a Unix socket failed: {err}");
                }
            });
        }
        for listener in listeners.tcp.drain(..) {
            let router = tcp_router.clone();
            let stop = cancel.clone();
            tasks.spawn(async move {
                let incoming = TcpListenerStream::new(listener);
                if let Err(err) = router
                    .serve_with_incoming_shutdown(incoming, stop.cancelled())
                    .await
                {
                    tracing::error!("gRPC server on TCP failed: {err}");
                }
            });
        }
        drop(listeners);
        Ok(Agent {
            cancel,
            tasks,
            listening,
            hooks,
            metrics_addr: exporters.metrics_addr,
            _listeners_cleanup: ListenerFiles(socket_files),
        })
    }

    /// Stops serving, detaches the programs and removes the socket files.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        while self.tasks.join_next().await.is_some() {}
    }

    /// Runs until SIGINT or SIGTERM, then shuts down.
    pub async fn run_until_signal(self) -> std::io::Result<()> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        // Graceful, but bounded: a client that never lets go of its connection, or a second
        // signal, does not keep the agent (and its programs) around.
        tokio::select! {
            _ = self.shutdown() => {}
            _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => {
                tracing::warn!("shutdown took over 5 s; exiting anyway");
            }
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        Ok(())
    }
}

/// Decodes records, updates the table and publishes the resulting events, one drain at a time.
struct Pipeline {
    table: Arc<Mutex<Table>>,
    bus: Arc<Bus>,
    stats: Arc<AgentStats>,
    events: Events,
    /// Reused buffer for connections whose lives completed.
    closed: Vec<Connection>,
    keepalive_defaults: HashMap<u32, KeepaliveDefaults>,
    warned_malformed: bool,
    /// The table's capacity after the last drain, to see it grow.
    table_capacity: usize,
    /// Prometheus and OTLP: told of each connection's open, establishment and close.
    export: Observer,
}

impl Pipeline {
    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The keepalive sysctls of a namespace, read once per namespace through a process in it.
    fn keepalive_defaults(&mut self, netns: u32, pid: u32) -> KeepaliveDefaults {
        *self
            .keepalive_defaults
            .entry(netns)
            .or_insert_with(|| capture::keepalive_defaults(pid).unwrap_or(KeepaliveDefaults::LINUX))
    }
}

impl capture::Sink for Pipeline {
    fn record(&mut self, record: Result<Record, DecodeError>) {
        let record = match record {
            Ok(record) => record,
            Err(err) => {
                self.stats.records_malformed.fetch_add(1, Ordering::Relaxed);
                if !self.warned_malformed {
                    self.warned_malformed = true;
                    tracing::warn!("undecodable record from the kernel (counted in stats): {err}");
                }
                return;
            }
        };
        self.stats.records_decoded.fetch_add(1, Ordering::Relaxed);
        match record {
            Record::Transition(t) => {
                let applied = self.table().apply(&t);
                let c = &applied.connection;
                if lifecycle::opening(&t).is_some() {
                    self.export.opened(c);
                }
                if t.new == TcpState::Established {
                    if let Some(ns) = c.handshake_ns() {
                        self.stats.established(ns);
                    }
                    self.export.established(c);
                }
                self.events.state_change(&t, c);
            }
            Record::Retransmit(r) => {
                let connection = self.table().retransmit(&r);
                if let Some(c) = connection {
                    self.events.retransmit(&r, &c);
                }
            }
            Record::Reset(r) => {
                let connection = self.table().reset(&r);
                // A reset sent without a socket has no connection; a reset for a socket the
                // agent never saw is reported bare too.
                self.events.reset(&r, connection.as_ref());
            }
            Record::Keepalive(k) => {
                let changes = self.table().keepalive_timer(&k);
                if let Some((c, changes)) = changes {
                    for change in changes.iter().flatten() {
                        if let KeepaliveChange::ProbeSent { .. } = change {
                            self.export.keepalive_probe();
                        }
                        self.events.keepalive(k.ts_ns, change, &c);
                    }
                }
            }
            Record::Accept(a) => {
                // Changes the owner that later events carry; not an event of its own.
                self.table().accepted(&a);
            }
            Record::SocketOption(o) => {
                let defaults = self.keepalive_defaults(o.netns, o.task.pid);
                let change = self.table().socket_option(&o, defaults);
                if let Some((c, change)) = change {
                    self.events.keepalive(o.ts_ns, &change, &c);
                }
            }
        }
    }

    fn batch_done(&mut self) {
        let mut closed = std::mem::take(&mut self.closed);
        let (long_lived_ns, table_capacity) = {
            let mut table = self.table();
            table.end_batch(&mut closed);
            (table.peers.long_lived_ns(), table.capacity())
        };
        if table_capacity > self.table_capacity {
            // The table doubled and freed its old slots: megabytes that glibc keeps resident in
            // the heap (blocks that size come from it rather than from mmap once blocks as
            // large were freed, as the BTF was at load). 4 MiB at 100,000 connections; at most
            // once per doubling, and only once the old slots were worth it (a trim walks every
            // arena under its lock, on this thread).
            self.table_capacity = table_capacity;
            if table_capacity >= 1 << 14 {
                release_free_heap();
            }
        }
        for connection in closed.drain(..) {
            self.stats.closed(&connection);
            self.export.closed(&connection);
            self.events.closed(&connection, long_lived_ns);
        }
        self.closed = closed;
        self.bus.publish(&mut self.events.batch);
        self.events.drain_done();
    }
}

/// Returns the heap's free pages to the kernel (glibc keeps them resident otherwise).
fn release_free_heap() {
    // SAFETY: malloc_trim only releases free memory, from every arena.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0);
    }
}
