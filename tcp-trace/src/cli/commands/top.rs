//! `tcp-trace top`: polls the agent's stats every interval and redraws the busiest peers.
use super::{Output, status};
use crate::{
    cli::{
        args,
        view::top::{PeerFilter, Top},
    },
    client, proto,
};

/// Redraws the busiest peers every interval (or prints one frame with --once).
pub async fn top(args: args::TopArgs) -> anyhow::Result<()> {
    let mut client = client::connect_with(&args.client.connect, &args.client.options()).await?;
    let interval = std::time::Duration::from_secs_f64(args.interval);
    let filter = peer_filter(&args);
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

/// The peer flags as the view's filter.
fn peer_filter(args: &args::TopArgs) -> PeerFilter {
    PeerFilter {
        netns: args.netns.clone(),
        directions: args.directions.iter().map(|&d| d.into()).collect(),
        ports: args.ports.clone(),
        addresses: args.addresses.clone(),
    }
}
