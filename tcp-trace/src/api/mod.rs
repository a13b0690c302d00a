//! The gRPC service: requests -> filters, bus deliveries -> event stream, errors -> Status, all
//! here. Plus the standard health and reflection services, and the listeners.
pub mod convert;
pub mod encode;
mod listen;

use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use std::future::Future as _;

use tokio_stream::Stream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::{Request, Response, Status};

pub use listen::{Access, ListenAddr, ListenError, Listeners, TlsFiles};

use crate::{
    bus::{self, Bus, Delivery, Start, SubscribeError, Subscription},
    filter::{Filter, FilterError},
    lifecycle::{Connection, Table},
    proto::{self, tcp_trace_server::TcpTrace},
    stats::AgentStats,
};

/// Every way a request can fail, mapped to a status code in one place.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Filter(#[from] FilterError),
    #[error("queue {0} is larger than the limit {1}")]
    Queue(u32, usize),
    #[error(transparent)]
    Subscribe(#[from] SubscribeError),
    #[error(
        "since_seq and replay_last cannot be used together: since_seq resumes, replay_last starts fresh"
    )]
    SinceAndLast,
    #[error("order {0} is not a ConnectionOrder")]
    Order(i32),
}

impl From<ApiError> for Status {
    fn from(err: ApiError) -> Status {
        match err {
            ApiError::Filter(_)
            | ApiError::Queue(..)
            | ApiError::SinceAndLast
            | ApiError::Order(_) => Status::invalid_argument(err.to_string()),
            ApiError::Subscribe(SubscribeError::TooMany(_)) => {
                Status::resource_exhausted(err.to_string())
            }
            ApiError::Subscribe(SubscribeError::Future { .. }) => {
                Status::out_of_range(err.to_string())
            }
        }
    }
}

/// Limits and defaults the service applies to clients.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Queue length per subscriber when the client does not ask for one.
    pub subscriber_queue: usize,
    pub max_queue: usize,
    pub max_subscribers: usize,
    /// Largest request accepted, in bytes: a filter at its value limit fits many times over.
    pub max_request_bytes: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            subscriber_queue: 16_384,
            max_queue: 1 << 20,
            max_subscribers: 1024,
            max_request_bytes: 64 << 10,
        }
    }
}

pub struct Service {
    pub bus: Arc<Bus>,
    pub table: Arc<Mutex<Table>>,
    pub stats: Arc<AgentStats>,
    pub limits: Limits,
    /// Cancelled when the agent stops.
    pub stop: CancellationToken,
}

/// A subscriber's stream: ends when the agent stops (so graceful shutdown does not wait on
/// endless streams); dropping it unsubscribes.
pub struct EventStream {
    subscription: Subscription,
    stop: Pin<Box<WaitForCancellationFutureOwned>>,
}

/// An `Event` already encoded: what the Subscribe stream sends (the server code is generated
/// with this type for `tcptrace.v1.Event`, see build.rs), so that an event goes to any number of
/// subscribers for one encoding and no copies of its strings.
///
/// The seq is written in front of the rest of the encoding as it is sent: field 1 comes first
/// in prost's encoding too, so the bytes are the same as those of the whole message.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EncodedEvent {
    seq: u64,
    unnumbered: bytes::Bytes,
}

impl EncodedEvent {
    pub fn of(published: &bus::Published) -> EncodedEvent {
        EncodedEvent {
            seq: published.seq,
            unnumbered: published.unnumbered.clone(),
        }
    }

    fn message(mut event: proto::Event) -> EncodedEvent {
        use prost::Message as _;
        let seq = std::mem::take(&mut event.seq);
        EncodedEvent {
            seq,
            unnumbered: event.encode_to_vec().into(),
        }
    }
}

impl prost::Message for EncodedEvent {
    fn encode_raw(&self, buf: &mut impl bytes::BufMut) {
        if self.seq != 0 {
            prost::encoding::uint64::encode(1, &self.seq, buf);
        }
        buf.put_slice(&self.unnumbered);
    }

    /// The server only sends events; should one ever be decoded, its fields are skipped.
    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        let seq = if self.seq != 0 {
            prost::encoding::uint64::encoded_len(1, &self.seq)
        } else {
            0
        };
        seq + self.unnumbered.len()
    }

    fn clear(&mut self) {
        *self = EncodedEvent::default();
    }
}

impl Stream for EventStream {
    type Item = Result<EncodedEvent, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.stop.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        self.subscription.poll_next(cx).map(|delivery| {
            delivery.map(|d| {
                Ok(match d {
                    Delivery::Event(published) => EncodedEvent::of(&published),
                    Delivery::Lost { count, last_seq } => EncodedEvent::message(convert::lost(
                        count,
                        last_seq,
                        proto::LossStage::Queue,
                    )),
                    Delivery::Expired { count, last_seq } => EncodedEvent::message(convert::lost(
                        count,
                        last_seq,
                        proto::LossStage::Replay,
                    )),
                })
            })
        })
    }
}

/// Who is asking, for GetStats: the Unix socket's peer credentials, or the TCP peer.
fn peer<T>(request: &Request<T>) -> String {
    if let Some(addr) = request.remote_addr() {
        return addr.to_string();
    }
    match request
        .extensions()
        .get::<tonic::transport::server::UdsConnectInfo>()
        .and_then(|info| info.peer_cred)
    {
        Some(cred) => match cred.pid() {
            Some(pid) => format!("unix pid={pid} uid={}", cred.uid()),
            None => format!("unix uid={}", cred.uid()),
        },
        None => "unix".into(),
    }
}

#[tonic::async_trait]
impl TcpTrace for Service {
    type SubscribeStream = EventStream;

    async fn subscribe(
        &self,
        request: Request<proto::SubscribeRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let peer = peer(&request);
        let request = request.into_inner();
        let filter =
            Filter::try_from(request.filter.unwrap_or_default()).map_err(ApiError::from)?;
        let queue = match request.queue as usize {
            0 => self.limits.subscriber_queue,
            n if n > self.limits.max_queue => {
                return Err(ApiError::Queue(request.queue, self.limits.max_queue).into());
            }
            n => n,
        };
        let start = match (request.since_seq, request.replay_last) {
            (Some(_), 1..) => return Err(ApiError::SinceAndLast.into()),
            (Some(since), 0) => Start::After(since),
            (None, 0) => Start::Live,
            (None, last) => Start::Last(last as usize),
        };
        let subscription = self
            .bus
            .subscribe(bus::SubscribeRequest {
                filter,
                queue,
                start,
                peer,
            })
            .map_err(ApiError::from)?;
        let stop = Box::pin(self.stop.clone().cancelled_owned());
        Ok(Response::new(EventStream { subscription, stop }))
    }

    async fn list_connections(
        &self,
        request: Request<proto::ListConnectionsRequest>,
    ) -> Result<Response<proto::ListConnectionsResponse>, Status> {
        let request = request.into_inner();
        let filter =
            Filter::try_from(request.filter.unwrap_or_default()).map_err(ApiError::from)?;
        // A connection is not an event: the kind part of a filter does not apply.
        let filter = Filter {
            kinds: Vec::new(),
            ..filter
        };
        let order = proto::ConnectionOrder::try_from(request.order)
            .map_err(|_| ApiError::Order(request.order))?;
        let limit = match request.limit {
            0 => usize::MAX,
            n => n as usize,
        };
        let clock = convert::Clock::now();
        let table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let mut matching: Vec<&Connection> = table
            .connections()
            .filter(|c| filter.matches(&convert::keys(c, proto::EventKind::Unspecified)))
            .collect();
        let matched = matching.len() as u64;
        let key = |c: &&Connection| match order {
            proto::ConnectionOrder::Unspecified | proto::ConnectionOrder::Id => (0, c.id),
            proto::ConnectionOrder::Age => (c.opened_ns, c.id),
            // Slowest first; no handshake measured sorts last.
            proto::ConnectionOrder::HandshakeLatency => {
                (u64::MAX - c.handshake_ns().unwrap_or(0), c.id)
            }
        };
        if limit < matching.len() {
            // Only the first `limit` need sorting.
            matching.select_nth_unstable_by_key(limit, key);
            matching.truncate(limit);
        }
        matching.sort_unstable_by_key(key);
        let connections = matching
            .into_iter()
            .map(|c| convert::connection(c, &clock))
            .collect();
        drop(table);
        Ok(Response::new(proto::ListConnectionsResponse {
            connections,
            matched,
        }))
    }

    async fn get_stats(
        &self,
        _request: Request<proto::GetStatsRequest>,
    ) -> Result<Response<proto::Stats>, Status> {
        let table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let (live, table_full, ends_missed) =
            (table.len() as u64, table.table_full, table.reopened);
        let peers = convert::peers(&table.peers);
        let peers_full = table.peers.peers_full;
        let long_lived = table.peers.long_lived_ns();
        drop(table);
        let mut stats = self.stats.snapshot(&self.bus.snapshot(), live, table_full);
        stats.ends_missed = ends_missed;
        stats.peers = peers;
        stats.peers_full = peers_full;
        stats.long_lived_threshold =
            prost_types::Duration::try_from(std::time::Duration::from_nanos(long_lived)).ok();
        Ok(Response::new(stats))
    }
}
