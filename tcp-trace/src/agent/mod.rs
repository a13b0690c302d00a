//! The agent: capture -> lifecycle -> bus -> gRPC, wired together and shut down as one.
mod catch_up;
mod heal;
mod pipeline;
#[cfg(test)]
mod replay_tests;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::task::JoinSet;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;

use self::{catch_up::CatchUp, heal::Heal, pipeline::Pipeline};
use crate::{
    api::{self, Access, Limits, ListenAddr, Listeners},
    bus::{Bus, BusConfig},
    capture::{self, Capture, CaptureConfig},
    event::Events,
    export::{self, ExportConfig},
    lifecycle::{Peers, Table},
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

/// Longest a read of the table waits for the drain thread to adopt the socket slots (it
/// answers within a drain: well under a millisecond unless it is behind the kernel).
const ADOPTION_WAIT: Duration = Duration::from_millis(200);

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
        // unless told to always; and wakes the agent less often while nobody subscribes.
        let switches = capture.switches();
        let always = config.capture.all_transitions;
        // Until then, a listing catches the table up with the kernel's socket list first.
        let recording_all_since = Arc::new(AtomicU64::new(u64::MAX));
        let since = Arc::clone(&recording_all_since);
        // The transitions switch as last set (2: not yet): a change of subscribers alone leaves
        // it, and when recording all began, alone.
        let transitions_set = std::sync::atomic::AtomicU8::new(2);
        bus.on_demand(Box::new(move |demand| {
            if let Err(err) = switches.set_unwatched(!demand.subscribers) {
                tracing::error!("cannot switch the kernel's wake-up pace: {err}");
            }
            let on = demand.state_changes || always;
            if transitions_set.swap(u8::from(on), Ordering::Relaxed) == u8::from(on) {
                return;
            }
            if !on {
                // Before: a transition from here on may go unrecorded.
                since.store(u64::MAX, Ordering::Release);
            }
            match switches.set_transitions(on) {
                // After: every transition from here on is recorded.
                Ok(()) if on => since.store(catch_up::monotonic_ns(), Ordering::Release),
                Ok(()) => {}
                Err(err) => {
                    since.store(u64::MAX, Ordering::Release);
                    tracing::error!("cannot switch the kernel's transition records: {err}");
                }
            }
        }));
        let cancel = CancellationToken::new();
        let mut tasks = JoinSet::new();
        // Every read of the table as a whole first takes in the connections whose open the
        // kernel still keeps in a socket slot (capture/slots.rs).
        let adopter = capture.adopter();
        let before_read: crate::stats::BeforeRead = Arc::new(move || {
            if !adopter.adopt(ADOPTION_WAIT) {
                tracing::debug!("socket slots not adopted within {ADOPTION_WAIT:?}");
            }
        });
        let exporters = export::start(
            &config.export,
            Arc::clone(&table),
            Arc::clone(&bus),
            Arc::clone(&stats),
            Some(Arc::clone(&before_read)),
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

        let catch_up = CatchUp::new(Arc::clone(&table), recording_all_since);
        let service = Arc::new(api::Service {
            bus,
            table,
            stats,
            limits: config.limits.clone(),
            stop: cancel.clone(),
            catch_up: Some(Arc::new({
                let before_read = Arc::clone(&before_read);
                move |fresh_enough| {
                    before_read();
                    catch_up.run(fresh_enough)
                }
            })),
            before_read: Some(before_read),
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

/// Returns the heap's free pages to the kernel (glibc keeps them resident otherwise).
fn release_free_heap() {
    // SAFETY: malloc_trim only releases free memory, from every arena.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0);
    }
}
