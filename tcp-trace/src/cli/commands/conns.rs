//! `tcp-trace conns`: every page of ListConnections, shown as one list.
use super::{Output, status};
use crate::{cli::args, cli::view::conns, client, json, proto};

/// Fetches page after page until the agent says there are no more, and shows them as one list.
pub async fn conns(args: args::ConnsArgs) -> anyhow::Result<()> {
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
        conns::connections_table(&all.connections, all.matched, std::time::SystemTime::now())
    };
    Output::line(&text)
}
