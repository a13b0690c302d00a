//! The gRPC service: requests -> filters, bus deliveries -> event stream, errors -> Status, all
//! here. Plus the standard health and reflection services, and the listeners.
mod authority;
pub(crate) mod codec;
mod listen;
pub mod page;

use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use std::future::Future as _;

use tokio_stream::Stream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::{Request, Response, Status};

pub use authority::LocalAuthority;
pub use listen::{Access, ListenAddr, ListenError, Listeners, SocketFile, TlsFiles};

use crate::{
    bus::{self, Bus, Delivery, Start, SubscribeError, Subscription},
    event::{Clock, EncodedEvent, EventKind, convert},
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
    #[error(transparent)]
    PageToken(#[from] page::TokenError),
}

impl From<ApiError> for Status {
    fn from(err: ApiError) -> Status {
        match err {
            ApiError::Filter(_)
            | ApiError::Queue(..)
            | ApiError::SinceAndLast
            | ApiError::Order(_)
            | ApiError::PageToken(_) => Status::invalid_argument(err.to_string()),
            ApiError::Subscribe(SubscribeError::TooMany(_)) => {
                Status::resource_exhausted(err.to_string())
            }
            ApiError::Subscribe(SubscribeError::Future { .. }) => {
                Status::out_of_range(err.to_string())
            }
        }
    }
}

/// Bytes queued per subscriber at most by default: about 3 s of a server taking 12,000
/// connections/s (150,000 events/s of some 300 bytes). A watcher that shares the CPUs with such
/// a load falls behind for as long as the load lasts and catches up after it, so its queue must
/// hold seconds of events, not milliseconds (`tests/watch_follows.rs` holds it to that; the
/// figures are in docs/benchmarks.md). Memory is only held while a subscriber is behind, and
/// what it holds is mostly shared with the replay buffer and the other subscribers.
pub const SUBSCRIBER_QUEUE_BYTES: usize = 128 << 20;

/// Limits and defaults the service applies to clients.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Queue length per subscriber when the client does not ask for one.
    pub subscriber_queue: usize,
    pub max_queue: usize,
    /// Most bytes queued per subscriber, whatever its queue length (see [`SUBSCRIBER_QUEUE_BYTES`]).
    pub subscriber_queue_bytes: usize,
    pub max_subscribers: usize,
    /// Largest request accepted, in bytes: a filter at its value limit fits many times over.
    pub max_request_bytes: usize,
    /// Most bytes of connections in one ListConnections response (see [`page::MAX_PAGE_BYTES`]).
    pub max_page_bytes: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            subscriber_queue: 1 << 20,
            max_queue: 1 << 20,
            subscriber_queue_bytes: SUBSCRIBER_QUEUE_BYTES,
            max_subscribers: 1024,
            max_request_bytes: 64 << 10,
            max_page_bytes: page::MAX_PAGE_BYTES,
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
    /// Called before a listing (blocking) to bring the table's states up to the kernel's.
    pub catch_up: Option<CatchUp>,
    /// Called before GetStats reads the table (blocking, briefly): brings it up to the
    /// kernel's open connections (the agent's wiring: the socket slots' adoption).
    pub before_read: Option<crate::stats::BeforeRead>,
}

/// Brings the table's connection states up to date with the kernel's (the agent's wiring: a
/// socket dump while the kernel records only opens and closes), unless that was done at most
/// the given time ago. Blocking.
pub type CatchUp = Arc<dyn Fn(std::time::Duration) + Send + Sync>;

/// How old the catch-up a page after the first may use: the first page's. A dump took 25 to
/// 70 ms among 108,000 established sockets here, and a listing of them takes 108 pages.
const CATCH_UP_PER_LISTING: std::time::Duration = std::time::Duration::from_secs(1);

/// A subscriber's stream: ends when the agent stops (so graceful shutdown does not wait on
/// endless streams); dropping it unsubscribes.
pub struct EventStream {
    subscription: Subscription,
    stop: Pin<Box<WaitForCancellationFutureOwned>>,
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
                    Delivery::Event(published) => {
                        EncodedEvent::new(published.seq, published.unnumbered.clone())
                    }
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
                    Delivery::Unrecorded {
                        first_seq,
                        last_seq,
                    } => EncodedEvent::message(convert::unrecorded(first_seq, last_seq)),
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
                queue_bytes: self.limits.subscriber_queue_bytes,
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
        let wire_filter = request.filter.unwrap_or_default();
        let filter = Filter::try_from(wire_filter.clone()).map_err(ApiError::from)?;
        let order = proto::ConnectionOrder::try_from(request.order)
            .map_err(|_| ApiError::Order(request.order))?;
        // Ids start again with the agent, so a token names the run that gave it out.
        let run = self
            .stats
            .started_at
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let listing = page::Listing::new(run, &wire_filter, request.order, request.limit);
        let resume = listing
            .resume(&request.page_token)
            .map_err(ApiError::from)?;
        if let Some(catch_up) = &self.catch_up {
            let catch_up = Arc::clone(catch_up);
            let fresh_enough = if request.page_token.is_empty() {
                std::time::Duration::ZERO
            } else {
                CATCH_UP_PER_LISTING
            };
            // A netlink dump: off the async workers. A panic in it leaves the table as it was.
            let _ = tokio::task::spawn_blocking(move || catch_up(fresh_enough)).await;
        }
        let clock = Clock::now();
        let mut matched = 0u64;
        let table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let candidates = table
            .connections()
            // A connection is not an event: the kind part of a filter does not apply (nor the
            // kind the keys are made with).
            .filter(|c| filter.matches_connection(&convert::keys(c, EventKind::StateChange)))
            .inspect(|_| matched += 1)
            .map(|c| (page::Position::of(order, c), c));
        let page = listing.page(
            resume,
            candidates,
            request.page_size,
            self.limits.max_page_bytes,
            |c: &Connection| convert::connection(c, &clock),
        );
        drop(table);
        Ok(Response::new(proto::ListConnectionsResponse {
            connections: page.items,
            matched,
            next_page_token: page.next_token,
        }))
    }

    async fn get_stats(
        &self,
        _request: Request<proto::GetStatsRequest>,
    ) -> Result<Response<proto::Stats>, Status> {
        if let Some(before_read) = &self.before_read {
            let before_read = Arc::clone(before_read);
            let _ = tokio::task::spawn_blocking(move || before_read()).await;
        }
        let bus = self.bus.snapshot();
        let table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let stats = self.stats.snapshot(&bus, &table);
        drop(table);
        Ok(Response::new(stats))
    }
}
