//! `tcp-trace agent`: run the tracer and serve it, saying on stderr what attached and where it
//! listens.
use anyhow::Context as _;

use crate::{
    agent::{Agent, StopSignals},
    api::ListenAddr,
    cli::args,
};

pub async fn agent(args: args::AgentArgs) -> anyhow::Result<()> {
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
