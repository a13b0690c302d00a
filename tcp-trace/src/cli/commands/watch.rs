//! `tcp-trace watch`: the Subscribe stream, written out as it comes (JSON or one line an event).
use tokio_stream::StreamExt as _;

use super::{Output, status};
use crate::{cli::args, cli::view::events, client, json, proto};

/// Streams events until the agent ends the stream or `--count` of them were written.
pub async fn watch(args: args::WatchArgs) -> anyhow::Result<()> {
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
            events::write_event_line(&mut line, &event);
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
