//! `tcp-trace stats`: the agent's counters, once.
use super::{Output, status};
use crate::{cli::args, cli::view::stats, client, json, proto};

pub async fn stats(args: args::StatsArgs) -> anyhow::Result<()> {
    let mut client = client::connect_with(&args.client.connect, &args.client.options()).await?;
    let stats = client
        .get_stats(proto::GetStatsRequest {})
        .await
        .map_err(|s| status(&args.client, s))?
        .into_inner();
    let text = if args.json {
        json::to_json(&stats, "tcptrace.v1.Stats")
    } else {
        stats::stats_text(&stats)
    };
    Output::line(&text)
}
