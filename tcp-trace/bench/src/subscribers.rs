//! `watch`-style gRPC subscribers inside the bench: each its own connection to the agent, its own
//! Subscribe stream filtered (by the agent) to the bench's namespace, reading and decoding every
//! event, counting it and its kernel-to-client latency.
use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use anyhow::{Context as _, Result};
use tcp_trace::{api::ListenAddr, client, proto, proto::event::Body};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{stats::Histogram, tracer::monotonic_ns};

/// What one subscriber read.
#[derive(Debug, Default)]
pub struct Received {
    pub state_changes: u64,
    pub closed: u64,
    /// Sum of the counts of Lost events: what the agent dropped for this subscriber.
    pub lost: u64,
    /// Events from another namespace (the filter should make this 0).
    pub foreign: u64,
    /// Events of other kinds (retransmits, resets, keepalive): not part of the expected count.
    pub other: u64,
    pub latency: Histogram,
}

impl Received {
    pub fn events(&self) -> u64 {
        self.state_changes + self.closed
    }
}

pub struct Subscribers {
    progress: Vec<Arc<AtomicU64>>,
    tasks: Vec<JoinHandle<Result<Received>>>,
    stop: CancellationToken,
}

impl Subscribers {
    pub fn empty() -> Subscribers {
        Subscribers {
            progress: Vec::new(),
            tasks: Vec::new(),
            stop: CancellationToken::new(),
        }
    }

    /// Connects `n` subscribers; returns once the agent has registered every one (a Subscribe
    /// call returns after the agent added the subscriber to its bus).
    pub async fn connect(addr: &ListenAddr, n: usize, netns: u64) -> Result<Subscribers> {
        let stop = CancellationToken::new();
        let mut progress = Vec::with_capacity(n);
        let mut tasks = Vec::with_capacity(n);
        for _ in 0..n {
            let mut c = client::connect(addr).await?;
            let request = proto::SubscribeRequest {
                filter: Some(proto::Filter {
                    netns: vec![netns],
                    ..Default::default()
                }),
                queue: 0,
                ..Default::default()
            };
            let stream = c
                .subscribe(request)
                .await
                .context("Subscribe")?
                .into_inner();
            let count = Arc::new(AtomicU64::new(0));
            progress.push(Arc::clone(&count));
            tasks.push(tokio::spawn(read(stream, netns, count, stop.clone())));
        }
        Ok(Subscribers {
            progress,
            tasks,
            stop,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Events (state changes and summaries) the slowest subscriber has read or been told it
    /// lost, so far.
    pub fn slowest(&self) -> u64 {
        self.progress
            .iter()
            .map(|p| p.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0)
    }

    pub async fn stop(self) -> Result<Vec<Received>> {
        self.stop.cancel();
        let mut out = Vec::with_capacity(self.tasks.len());
        for task in self.tasks {
            out.push(task.await.context("a subscriber task panicked")??);
        }
        Ok(out)
    }
}

async fn read(
    mut stream: tonic::Streaming<proto::Event>,
    netns: u64,
    progress: Arc<AtomicU64>,
    stop: CancellationToken,
) -> Result<Received> {
    let mut got = Received::default();
    loop {
        let event = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            message = stream.message() => match message.context("the event stream failed")? {
                Some(event) => event,
                None => break,
            },
        };
        let now = monotonic_ns();
        let ours = event.connection.as_ref().is_none_or(|c| c.netns == netns);
        match &event.body {
            Some(Body::Lost(lost)) => got.lost += lost.count,
            Some(_) if !ours => got.foreign += 1,
            Some(Body::StateChange(_)) => got.state_changes += 1,
            Some(Body::ConnectionClosed(_)) => got.closed += 1,
            Some(_) => got.other += 1,
            None => continue,
        }
        if ours && event.kernel_time_ns != 0 {
            got.latency.record(now.saturating_sub(event.kernel_time_ns));
        }
        progress.store(got.events() + got.lost, Ordering::Relaxed);
    }
    Ok(got)
}
