//! The `tcp-trace` binary: parses the command line and runs one subcommand
//! ([`tcp_trace::cli::commands`]); here only the exit status is decided.
use clap::Parser as _;
use tcp_trace::cli::{args::Cli, commands::StdoutError};

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
    tcp_trace::cli::commands::run(Cli::parse().command).await
}
