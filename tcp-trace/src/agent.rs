//! The agent: capture -> lifecycle -> bus -> gRPC, wired together and shut down as one.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex, atomic::Ordering, mpsc},
    time::{Duration, Instant},
};

use tokio::task::JoinSet;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;

use crate::{
    api::{self, Access, Limits, ListenAddr, Listeners},
    bus::{Bus, BusConfig},
    capture::{
        self, Capture, CaptureConfig, DecodeError, Record,
        sockdiag::{SockDiag, SocketList},
    },
    event::Events,
    export::{self, ExportConfig, Observer},
    lifecycle::{Connection, KeepaliveChange, KeepaliveDefaults, Peers, Table},
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
    /// How often the table is healed against the kernel's socket list (also right after any
    /// kernel-side loss); zero turns healing off.
    pub heal_interval: Duration,
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
            heal_interval: DEFAULT_HEAL_INTERVAL,
            export: ExportConfig::default(),
        }
    }
}

/// Between heals when nothing was lost: a ghost a skipped run left lives at most this long.
pub const DEFAULT_HEAL_INTERVAL: Duration = Duration::from_secs(30);

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
    /// Removed when the agent is gone, each if it is still the agent's socket.
    _socket_files: Vec<api::SocketFile>,
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
        // Say what is missing before touching /run or the kernel, and check every file given
        // before anything is bound or loaded: nothing to undo when one is bad.
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
        // The kernel records every transition only while a subscriber asks for state changes,
        // unless told to always.
        let switch = capture.transition_switch();
        let always = config.capture.all_transitions;
        bus.on_state_change_demand(Box::new(move |wanted| {
            if let Err(err) = switch.set(wanted || always) {
                tracing::error!("cannot switch the kernel's transition records: {err}");
            }
        }));
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
            keep_replay: config.capture.all_transitions,
            closed: Vec::new(),
            keepalive_defaults: HashMap::new(),
            warned_malformed: false,
            table_capacity: 0,
            heal: Heal::start(config.heal_interval, config.capture.netns, &stats),
            export: exporters.observer,
        };
        let drain_cancel = cancel.clone();
        // The drain loop sleeps in sub-millisecond steps, finer than tokio's timers: it gets a
        // thread of its own.
        tasks.spawn_blocking(move || {
            capture.run(&drain_cancel, &mut pipeline);
            // `capture` drops here: the programs detach.
        });
        // From here an early return must stop the drain thread: nothing else would (the
        // runtime would wait for it forever, with the programs attached).
        let stop_on_error = cancel.clone().drop_guard();

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
        // Both reflection protocols: v1alpha is what grpcio-reflection, older grpcurl, Postman and
        // evans speak. They describe the health service too.
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = reflection()
            .build_v1()
            .expect("the embedded descriptor set is valid");
        let reflection_v1alpha = reflection()
            .build_v1alpha()
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
                .add_service(reflection_v1.clone())
                .add_service(reflection_v1alpha.clone())
        };
        // Unix sockets are guarded by file permissions; TLS is for TCP.
        let router = routes(server());
        let tcp_router = match tls {
            Some(tls) => match server().tls_config(tls) {
                Ok(server) => routes(server),
                Err(err) => {
                    // The files were checked above, so not expected; but if it happens, detach
                    // before saying so.
                    drop(stop_on_error);
                    while tasks.join_next().await.is_some() {}
                    return Err(api::ListenError::Tls(err.to_string()).into());
                }
            },
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
                // C-core and Java clients send the socket path as :authority (api/authority.rs).
                let incoming =
                    tokio_stream::StreamExt::map(UnixListenerStream::new(listener), |accepted| {
                        accepted.map(api::LocalAuthority::new)
                    });
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
                // Without TCP_NODELAY a small response waits for the client's delayed ACK:
                // unary calls from grpcio took 46 ms each on loopback.
                let incoming =
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
                if let Err(err) = router
                    .serve_with_incoming_shutdown(incoming, stop.cancelled())
                    .await
                {
                    tracing::error!("gRPC server on TCP failed: {err}");
                }
            });
        }
        drop(listeners);
        stop_on_error.disarm();
        Ok(Agent {
            cancel,
            tasks,
            listening,
            hooks,
            metrics_addr: exporters.metrics_addr,
            _socket_files: socket_files,
        })
    }

    /// Stops serving, detaches the programs and removes the socket files.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        while self.tasks.join_next().await.is_some() {}
    }

    /// Runs until one of `signals` arrives, then shuts down.
    pub async fn run_until_signal(self, mut signals: StopSignals) {
        signals.recv().await;
        // Graceful, but bounded: a client that never lets go of its connection, or a second
        // signal, does not keep the agent (and its programs) around.
        tokio::select! {
            _ = self.shutdown() => {}
            _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => {
                tracing::warn!("shutdown took over 5 s; exiting anyway");
            }
            _ = signals.recv() => {}
        }
    }
}

/// SIGINT, SIGTERM and SIGHUP, caught from the moment this is made. Make it before saying the
/// agent is ready: until then a signal's default action kills the agent with no cleanup, and
/// one that arrives while it starts is kept and stops it as soon as it runs. SIGHUP (a closed
/// terminal, or a supervisor's "reload") stops it too: there is no configuration to reload.
pub struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl StopSignals {
    pub fn new() -> std::io::Result<StopSignals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(StopSignals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
            _ = self.hup.recv() => {}
        }
    }
}

/// Decodes records, updates the table and publishes the resulting events, one drain at a time.
struct Pipeline {
    table: Arc<Mutex<Table>>,
    bus: Arc<Bus>,
    stats: Arc<AgentStats>,
    events: Events,
    /// Build events for the replay buffer even while nobody subscribes.
    keep_replay: bool,
    /// Reused buffer for connections whose lives completed.
    closed: Vec<Connection>,
    keepalive_defaults: HashMap<u32, KeepaliveDefaults>,
    warned_malformed: bool,
    /// The table's capacity after the last drain, to see it grow.
    table_capacity: usize,
    heal: Heal,
    /// Prometheus and OTLP: told of each connection's open, establishment and close.
    export: Observer,
}

/// The pipeline's side of healing: tells subscribers of kernel-side losses, asks the heal
/// thread for the kernel's socket list (after a loss, and to confirm suspects), and compares a
/// list with the table once a whole drain began after the list was complete.
struct Heal {
    /// None when healing is off.
    requests: Option<mpsc::SyncSender<()>>,
    lists: Option<mpsc::Receiver<SocketList>>,
    /// A list received at the end of the drain before.
    received: Option<SocketList>,
    /// The kernel counters when last checked, and when.
    counters: capture::KernelCounters,
    checked: Instant,
    /// Heals asked for in a row only to confirm suspects, bounded so a table that never
    /// settles costs one list per interval, not one a second.
    confirming: u32,
}

/// How often the drain looks at the kernel's loss counters (a read of each program's fdinfo).
const LOSS_CHECK: Duration = Duration::from_millis(250);
/// At most one socket list per this, however many losses ask for one.
const HEAL_SPACING: Duration = Duration::from_secs(1);
const MAX_CONFIRMING: u32 = 5;

impl Heal {
    fn start(interval: Duration, netns: Option<u32>, stats: &AgentStats) -> Heal {
        let mut heal = Heal {
            requests: None,
            lists: None,
            received: None,
            counters: stats.kernel.read(),
            checked: Instant::now(),
            confirming: 0,
        };
        if interval.is_zero() {
            return heal;
        }
        let (requests, requested) = mpsc::sync_channel(1);
        let (send_list, lists) = mpsc::sync_channel(1);
        let spawned = std::thread::Builder::new()
            .name("heal".into())
            .spawn(move || heal_thread(interval, netns, &requested, &send_list));
        match spawned {
            Ok(_) => (heal.requests, heal.lists) = (Some(requests), Some(lists)),
            Err(err) => tracing::warn!("no healing of the connection table: {err}"),
        }
        heal
    }

    fn request(&self) {
        if let Some(requests) = &self.requests {
            // Full: a list is already asked for.
            let _ = requests.try_send(());
        }
    }

    /// Kernel-side losses since the last check, as (ring full, runs skipped), at most every
    /// LOSS_CHECK.
    fn kernel_losses(&mut self, stats: &AgentStats) -> Option<(u64, u64)> {
        if self.checked.elapsed() < LOSS_CHECK {
            return None;
        }
        self.checked = Instant::now();
        let now = stats.kernel.read();
        let before = std::mem::replace(&mut self.counters, now);
        let lost = (
            now.ring_full.saturating_sub(before.ring_full),
            now.missed.saturating_sub(before.missed),
        );
        (lost != (0, 0)).then_some(lost)
    }
}

/// Lists the kernel's sockets every `interval`, or sooner when asked, until the pipeline is
/// gone. Its own thread: a list of 60,000 sockets takes tens of milliseconds, which the drain
/// must not wait for.
fn heal_thread(
    interval: Duration,
    netns: Option<u32>,
    requested: &mpsc::Receiver<()>,
    lists: &mpsc::SyncSender<SocketList>,
) {
    let mut diag = SockDiag::default();
    let mut warned = false;
    loop {
        if let Err(mpsc::RecvTimeoutError::Disconnected) = requested.recv_timeout(interval) {
            return;
        }
        let started = Instant::now();
        let (list, errors) = diag.list(netns);
        for err in &errors {
            if !warned {
                tracing::warn!("healing the connection table: {err}");
            } else {
                tracing::debug!("healing the connection table: {err}");
            }
        }
        warned |= !errors.is_empty();
        tracing::debug!(
            "listed {} sockets in {} namespaces in {:?}",
            list.sockets.len(),
            list.netns.len(),
            started.elapsed()
        );
        if lists.send(list).is_err() {
            return;
        }
        std::thread::sleep(HEAL_SPACING.saturating_sub(started.elapsed()));
    }
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
        // With nobody subscribed, events are counted, not built (unless the replay is to hold
        // them: --all-transitions). Decided per record: a Subscribe that returned sees every
        // event of every record the agent reads after it.
        self.events.unwatched = !self.keep_replay && !self.bus.has_subscribers();
        match record {
            Record::Transition(t) => {
                let applied = self.table().apply(&t);
                let c = &applied.connection;
                if applied.opened {
                    self.export.opened(c);
                }
                if t.new == TcpState::Established {
                    if let Some(ns) = c.handshake_ns() {
                        self.stats.established(ns);
                    }
                    self.export.established(c);
                }
                // A transition recorded while the kernel skipped its neighbours is not shown:
                // no subscriber asked for state changes when it happened.
                if t.all_recorded {
                    self.events.state_change(&t, c);
                }
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
        // Compared only now: this drain began after the list was complete, so the table has
        // every CLOSE the kernel wrote before the list missed a socket.
        let healed = self
            .heal
            .received
            .take()
            .map(|list| self.table().heal(&list));
        if let Some(healed) = healed {
            self.stats.healed(&healed);
            if healed.pending && self.heal.confirming < MAX_CONFIRMING {
                self.heal.confirming += 1;
                self.heal.request();
            } else if !healed.pending {
                self.heal.confirming = 0;
            }
        }
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
        // The events counted, not built, came before any built in this drain: a subscriber
        // arrived in between.
        self.bus.skip(std::mem::take(&mut self.events.skipped));
        self.bus.publish(&mut self.events.batch);
        self.events.drain_done();
        // After publishing: reading the kernel's counters (a file per program) must not delay
        // this drain's events. A loss found here goes out with the next drain, at most one
        // ring poll (100 ms) later.
        if let Some((ring_full, skipped)) = self.heal.kernel_losses(&self.stats) {
            self.events.kernel_lost(ring_full, skipped);
            self.heal.request();
        }
        if let Some(list) = self.heal.lists.as_ref().and_then(|l| l.try_recv().ok()) {
            self.heal.received = Some(list);
        }
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
