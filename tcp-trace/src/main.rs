use anyhow::Context as _;
use clap::Parser as _;
use tcp_trace::{
    agent::{Agent, StopSignals},
    api::ListenAddr,
    cli::{
        args::{self, Cli, Command},
        view::{self, top::Top},
    },
    client, json, proto,
};
use tokio_stream::StreamExt as _;

fn main() -> std::process::ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("tcp-trace: cannot start the async runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // Whoever read the output has gone (`watch | head`): end quietly, as `cat` does.
        Err(err)
            if err
                .downcast_ref::<StdoutError>()
                .is_some_and(StdoutError::is_closed) =>
        {
            std::process::ExitCode::SUCCESS
        }
        Err(err) => {
            // One readable line with its causes, no backtrace: these are users' errors.
            eprintln!("tcp-trace: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Agent(args) => agent(args).await,
        Command::Watch(args) => watch(args).await,
        Command::Conns(args) => conns(args).await,
        Command::Stats(args) => stats(args).await,
        Command::Top(args) => top(args).await,
        Command::Health(args) => health(args).await,
    }
}

/// grpc.health.v1 Check, as a probe: success only for SERVING.
async fn health(args: args::HealthArgs) -> anyhow::Result<()> {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let channel = client::channel_with(&args.client.connect, &args.client.options()).await?;
    let request = HealthCheckRequest {
        service: args.service.clone(),
    };
    let response = HealthClient::new(channel)
        .check(request)
        .await
        .map_err(|s| status(&args.client, s))?
        .into_inner();
    let serving = response.status();
    anyhow::ensure!(
        serving == ServingStatus::Serving,
        "{:?} is {serving:?}",
        args.service
    );
    Output::line(&format!("{} SERVING", args.service))
}

async fn agent(args: args::AgentArgs) -> anyhow::Result<()> {
    if let Some(inode) = args.netns
        && !namespace_exists(inode)
    {
        eprintln!(
            "tcp-trace: warning: no network namespace has inode {inode} now (no process is in \
             it and /run/netns names none): --netns {inode} traces nothing until one does"
        );
    }
    let signals = StopSignals::new().context("catching SIGINT/SIGTERM/SIGHUP")?;
    let agent = Agent::start(args.config()).await?;
    for hook in &agent.hooks.attached {
        eprintln!("tcp-trace: attached {hook}");
    }
    for missing in &agent.hooks.missing {
        eprintln!("tcp-trace: NOT attached: {missing}");
    }
    for addr in &agent.listening {
        eprintln!("tcp-trace: listening on {addr}");
        if matches!(addr, ListenAddr::Tcp(_)) && args.tls_cert.is_none() {
            eprintln!(
                "tcp-trace: warning: {addr} is plain-text TCP: every local user can connect and \
                 watch every connection on this host; serve a Unix socket (--socket-group) or \
                 mutual TLS (--tls-cert, --tls-key, --tls-client-ca) to restrict it"
            );
        }
    }
    eprintln!("tcp-trace: tracing; Ctrl-C to stop");
    agent.run_until_signal(signals).await;
    eprintln!("tcp-trace: stopped");
    Ok(())
}

/// Whether a network namespace with this inode exists now: one a process is in, or one
/// mounted under /run/netns (`ip netns add`) with no process in it.
fn namespace_exists(inode: u32) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let matches = |path: std::path::PathBuf| {
        std::fs::metadata(path).is_ok_and(|meta| meta.ino() == u64::from(inode))
    };
    let entries = |dir: &str| {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| entry.path())
    };
    entries("/run/netns").any(matches) || entries("/proc").any(|pid| matches(pid.join("ns/net")))
}

async fn watch(args: args::WatchArgs) -> anyhow::Result<()> {
    let mut client = client::connect_with(&args.client.connect, &args.client.options()).await?;
    let request = proto::SubscribeRequest {
        filter: Some(args.filter.to_proto()),
        queue: args.queue,
        since_seq: args.since_seq,
        replay_last: args.replay_last,
    };
    let mut stream = client
        .subscribe(request)
        .await
        .map_err(|s| status(&args.client, s))?
        .into_inner();
    let mut out = Output::new();
    let mut json = json::EventWriter::default();
    let mut line = String::new();
    let mut seen = 0u64;
    loop {
        // Write out what is buffered only when no event is ready: one write(2) per batch,
        // and still live when events trickle.
        let next = match ready(&mut stream) {
            Some(next) => next,
            None => {
                out.flush()?;
                stream.next().await
            }
        };
        let Some(event) = next else { break };
        let event = event.map_err(|s| status(&args.client, s))?;
        if args.json {
            json.write(&mut out.buf, &event);
        } else {
            line.clear();
            view::events::write_event_line(&mut line, &event);
            out.buf.extend_from_slice(line.as_bytes());
        }
        out.buf.push(b'\n');
        out.flush_if_full()?;
        seen += 1;
        if args.count.is_some_and(|limit| seen >= limit) {
            break;
        }
    }
    out.flush()
}

/// The stream's next item if one is ready now, without waiting.
fn ready<S: tokio_stream::Stream + Unpin>(stream: &mut S) -> Option<Option<S::Item>> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::Pin::new(stream).poll_next(&mut cx) {
        std::task::Poll::Ready(item) => Some(item),
        std::task::Poll::Pending => None,
    }
}

/// Fetches page after page until the agent says there are no more, and shows them as one list.
async fn conns(args: args::ConnsArgs) -> anyhow::Result<()> {
    let mut client = client::connect_with(&args.client.connect, &args.client.options()).await?;
    let mut request = proto::ListConnectionsRequest {
        filter: Some(args.filter.to_proto()),
        order: proto::ConnectionOrder::from(args.sort) as i32,
        limit: args.limit,
        page_size: args.page_size,
        page_token: String::new(),
    };
    let mut all = proto::ListConnectionsResponse::default();
    loop {
        let page = client
            .list_connections(request.clone())
            .await
            .map_err(|s| status(&args.client, s))?
            .into_inner();
        all.connections.extend(page.connections);
        // The latest count: connections open and close while the pages come.
        all.matched = page.matched;
        if page.next_page_token.is_empty() {
            break;
        }
        request.page_token = page.next_page_token;
    }
    if args.limit == 0 {
        // Every page was shown: "N of M" would only tell how the table moved meanwhile.
        all.matched = all.connections.len() as u64;
    }
    let text = if args.json {
        json::to_json(&all, "tcptrace.v1.ListConnectionsResponse")
    } else {
        view::conns::connections_table(&all.connections, all.matched, std::time::SystemTime::now())
    };
    Output::line(&text)
}

async fn stats(args: args::StatsArgs) -> anyhow::Result<()> {
    let mut client = client::connect_with(&args.client.connect, &args.client.options()).await?;
    let stats = client
        .get_stats(proto::GetStatsRequest {})
        .await
        .map_err(|s| status(&args.client, s))?
        .into_inner();
    let text = if args.json {
        json::to_json(&stats, "tcptrace.v1.Stats")
    } else {
        view::stats::stats_text(&stats)
    };
    Output::line(&text)
}

/// Redraws the busiest peers every interval (or prints one frame with --once).
async fn top(args: args::TopArgs) -> anyhow::Result<()> {
    let mut client = client::connect_with(&args.client.connect, &args.client.options()).await?;
    let interval = std::time::Duration::from_secs_f64(args.interval);
    let filter = args.peer_filter();
    let mut top = Top::new();
    let mut ticker = tokio::time::interval(interval);
    let mut last: Option<tokio::time::Instant> = None;
    loop {
        let now = ticker.tick().await;
        let stats = client
            .get_stats(proto::GetStatsRequest {})
            .await
            .map_err(|s| status(&args.client, s))?
            .into_inner();
        let elapsed = last.map_or(interval, |last| now - last);
        let frame = top.frame(&stats, elapsed, &filter, args.rows);
        if args.once {
            // One frame with rates over one interval: the first sample only sets the baseline.
            if last.is_some() {
                return Output::line(&frame);
            }
        } else {
            // Clear the screen and home the cursor: a plain redraw, no terminal library.
            let mut out = Output::new();
            out.buf.extend_from_slice(b"\x1b[2J\x1b[H");
            out.buf.extend_from_slice(frame.as_bytes());
            out.flush()?;
        }
        last = Some(now);
    }
}

/// A client's standard output, written in batches. A closed pipe or a full disk is a
/// [`StdoutError`], never a panic (`println!` panics on both).
struct Output {
    buf: Vec<u8>,
}

impl Output {
    /// Written out once this full: a few hundred events.
    const BATCH: usize = 64 << 10;

    fn new() -> Output {
        Output {
            buf: Vec::with_capacity(Self::BATCH + 4096),
        }
    }

    /// One answer and a newline.
    fn line(text: &str) -> anyhow::Result<()> {
        let mut out = Output::new();
        out.buf.extend_from_slice(text.as_bytes());
        out.buf.push(b'\n');
        out.flush()
    }

    fn flush_if_full(&mut self) -> anyhow::Result<()> {
        if self.buf.len() >= Self::BATCH {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        use std::io::Write as _;
        if self.buf.is_empty() {
            return Ok(());
        }
        let mut stdout = std::io::stdout().lock();
        stdout
            .write_all(&self.buf)
            .and_then(|()| stdout.flush())
            .map_err(StdoutError)?;
        self.buf.clear();
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot write to stdout: {0}")]
struct StdoutError(std::io::Error);

impl StdoutError {
    /// The reader closed the pipe (Rust ignores SIGPIPE, so a write gets EPIPE instead).
    fn is_closed(&self) -> bool {
        self.0.kind() == std::io::ErrorKind::BrokenPipe
    }
}

/// Why a call failed: a TLS mismatch says what to pass, anything else is the agent's answer in
/// its own words, with the transport's causes when it has them.
fn status(args: &args::ClientArgs, status: tonic::Status) -> anyhow::Error {
    if let Some(mismatch) = client::mismatch(&args.connect, &args.options(), true, &status) {
        return mismatch.into();
    }
    let mut said = format!("the agent said {:?}: {}", status.code(), status.message());
    if let Some(source) = std::error::Error::source(&status) {
        said.push_str(": ");
        said.push_str(&client::causes(source));
    }
    anyhow::anyhow!(said)
}
