//! One handler per subcommand: each runs the agent or asks it, and hands the answer to its
//! view. Errors are `anyhow` here, at the binary's edge: one readable line for the user.
mod agent;
mod conns;
mod health;
mod output;
mod stats;
mod top;
mod watch;

pub use output::StdoutError;

use crate::{
    cli::args::{self, Command},
    client,
};
use output::Output;

/// Runs one subcommand to its end.
pub async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Agent(args) => agent::agent(args).await,
        Command::Watch(args) => watch::watch(args).await,
        Command::Conns(args) => conns::conns(args).await,
        Command::Stats(args) => stats::stats(args).await,
        Command::Top(args) => top::top(args).await,
        Command::Health(args) => health::health(args).await,
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
