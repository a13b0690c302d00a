use anyhow::Context as _;
use clap::Parser as _;
use tcp_trace::{
    agent::Agent,
    cli::{self, Cli, Command},
    client, json, proto,
    top::Top,
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
async fn health(args: cli::HealthArgs) -> anyhow::Result<()> {
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
        .map_err(status)?
        .into_inner();
    let serving = response.status();
    anyhow::ensure!(
        serving == ServingStatus::Serving,
        "{:?} is {serving:?}",
        args.service
    );
    println!("{} SERVING", args.service);
    Ok(())
}

async fn agent(args: cli::AgentArgs) -> anyhow::Result<()> {
    let agent = Agent::start(args.config()).await?;
    for hook in &agent.hooks.attached {
        eprintln!("tcp-trace: attached {hook}");
    }
    for missing in &agent.hooks.missing {
        eprintln!("tcp-trace: NOT attached: {missing}");
    }
    for addr in &agent.listening {
        eprintln!("tcp-trace: listening on {addr}");
    }
    eprintln!("tcp-trace: tracing; Ctrl-C to stop");
    agent
        .run_until_signal()
        .await
        .context("waiting for SIGINT/SIGTERM")?;
    eprintln!("tcp-trace: stopped");
    Ok(())
}

async fn watch(args: cli::WatchArgs) -> anyhow::Result<()> {
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
        .map_err(status)?
        .into_inner();
    let mut seen = 0u64;
    while let Some(event) = stream.next().await {
        let event = event.map_err(status)?;
        if args.json {
            println!("{}", json::event(&event));
        } else {
            println!("{}", cli::event_line(&event));
        }
        seen += 1;
        if args.count.is_some_and(|limit| seen >= limit) {
            break;
        }
    }
    Ok(())
}

async fn conns(args: cli::ConnsArgs) -> anyhow::Result<()> {
    let mut client = client::connect_with(&args.client.connect, &args.client.options()).await?;
    let request = proto::ListConnectionsRequest {
        filter: Some(args.filter.to_proto()),
        order: proto::ConnectionOrder::from(args.sort) as i32,
        limit: args.limit,
    };
    let response = client
        .list_connections(request)
        .await
        .map_err(status)?
        .into_inner();
    if args.json {
        println!(
            "{}",
            json::to_json(&response, "tcptrace.v1.ListConnectionsResponse")
        );
    } else {
        println!(
            "{}",
            cli::connections_table(
                &response.connections,
                response.matched,
                std::time::SystemTime::now()
            )
        );
    }
    Ok(())
}

async fn stats(args: cli::StatsArgs) -> anyhow::Result<()> {
    let mut client = client::connect_with(&args.client.connect, &args.client.options()).await?;
    let stats = client
        .get_stats(proto::GetStatsRequest {})
        .await
        .map_err(status)?
        .into_inner();
    if args.json {
        println!("{}", json::to_json(&stats, "tcptrace.v1.Stats"));
    } else {
        println!("{}", cli::stats_text(&stats));
    }
    Ok(())
}

/// Redraws the busiest peers every interval (or prints one frame with --once).
async fn top(args: cli::TopArgs) -> anyhow::Result<()> {
    use std::io::Write as _;
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
            .map_err(status)?
            .into_inner();
        let elapsed = last.map_or(interval, |last| now - last);
        let frame = top.frame(&stats, elapsed, &filter, args.rows);
        if args.once {
            // One frame with rates over one interval: the first sample only sets the baseline.
            if last.is_some() {
                println!("{frame}");
                return Ok(());
            }
        } else {
            // Clear the screen and home the cursor: a plain redraw, no terminal library.
            let mut out = std::io::stdout().lock();
            write!(out, "\x1b[2J\x1b[H{frame}")?;
            out.flush()?;
        }
        last = Some(now);
    }
}

/// The agent's answer, in its own words.
fn status(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("the agent said {:?}: {}", status.code(), status.message())
}
