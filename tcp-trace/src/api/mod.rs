//! The gRPC service: requests -> filters, bus deliveries -> event stream, errors -> Status, all
//! here. Plus the standard health and reflection services, and the listeners.
pub mod convert;
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

pub use listen::{ListenAddr, ListenError, Listeners};

use crate::{
    bus::{Bus, Delivery, Subscription},
    filter::{Filter, FilterError},
    lifecycle::Table,
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
    #[error("{0} subscribers are connected, the most this agent takes (--max-subscribers)")]
    TooManySubscribers(usize),
}

impl From<ApiError> for Status {
    fn from(err: ApiError) -> Status {
        match err {
            ApiError::Filter(_) | ApiError::Queue(..) => Status::invalid_argument(err.to_string()),
            ApiError::TooManySubscribers(_) => Status::resource_exhausted(err.to_string()),
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
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            subscriber_queue: 16_384,
            max_queue: 1 << 20,
            max_subscribers: 1024,
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

impl Stream for EventStream {
    type Item = Result<proto::Event, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.stop.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        self.subscription.rx.poll_recv(cx).map(|delivery| {
            delivery.map(|d| {
                Ok(match d {
                    Delivery::Event(published) => published.event.clone(),
                    Delivery::Lost { count, last_seq } => convert::lost(count, last_seq),
                })
            })
        })
    }
}

#[tonic::async_trait]
impl TcpTrace for Service {
    type SubscribeStream = EventStream;

    async fn subscribe(
        &self,
        request: Request<proto::SubscribeRequest>,
    ) -> Result<Response<EventStream>, Status> {
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
        let subscribers = self.bus.counters().subscribers;
        if subscribers >= self.limits.max_subscribers {
            return Err(ApiError::TooManySubscribers(subscribers).into());
        }
        let subscription = self.bus.subscribe(filter, queue);
        let stop = Box::pin(self.stop.clone().cancelled_owned());
        Ok(Response::new(EventStream { subscription, stop }))
    }

    async fn list_connections(
        &self,
        request: Request<proto::ListConnectionsRequest>,
    ) -> Result<Response<proto::ListConnectionsResponse>, Status> {
        let filter = Filter::try_from(request.into_inner().filter.unwrap_or_default())
            .map_err(ApiError::from)?;
        // A connection is not an event: the kind part of a filter does not apply.
        let filter = Filter {
            kinds: Vec::new(),
            ..filter
        };
        let clock = convert::Clock::now();
        let table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let mut connections: Vec<proto::Connection> = table
            .connections()
            .filter(|c| filter.matches(&convert::keys(c, proto::EventKind::Unspecified)))
            .map(|c| convert::connection(c, &clock))
            .collect();
        drop(table);
        connections.sort_by_key(|c| c.id);
        Ok(Response::new(proto::ListConnectionsResponse {
            connections,
        }))
    }

    async fn get_stats(
        &self,
        _request: Request<proto::GetStatsRequest>,
    ) -> Result<Response<proto::Stats>, Status> {
        let table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let (live, table_full) = (table.len() as u64, table.table_full);
        let peers = convert::peers(&table.peers);
        let peers_full = table.peers.peers_full;
        let long_lived = table.peers.long_lived_ns();
        drop(table);
        let mut stats = self.stats.snapshot(&self.bus.counters(), live, table_full);
        stats.peers = peers;
        stats.peers_full = peers_full;
        stats.long_lived_threshold =
            prost_types::Duration::try_from(std::time::Duration::from_nanos(long_lived)).ok();
        Ok(Response::new(stats))
    }
}
