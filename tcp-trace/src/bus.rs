//! The sequenced event bus: numbers every event, keeps the latest ones for replay, and fans each
//! out to the subscribers whose filter it matches.
//!
//! Each subscriber has its own bounded queue. The producer (the ring drain) never waits: it
//! queues what fits, and when a queue is full it counts what that subscriber lost and tells it
//! in-band with one `Lost{count}` at the place of the gap (the linkerd tap model). A queue is
//! bounded in events (what the client asked for) and in bytes (what it costs the agent). It fills each
//! queue a drain's events at a time: one lock and at most one wake-up per subscriber and drain,
//! not per event.
//!
//! Losses upstream of the bus (records the kernel could not write) are published as events of
//! kind LOST, numbered like any other, and every subscriber gets them whatever its filter:
//! which connections the lost records were about is unknown.
//!
//! The replay buffer holds the latest events, so a client that reconnects with the last seq it
//! saw gets exactly what it missed. Publishing, subscribing and snapshotting the buffer all take
//! the one bus lock, so a new subscriber's replay ends exactly where its live events begin.
use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    task::{Context, Poll, Waker},
    time::SystemTime,
};

use bytes::Bytes;

pub use demand::{Demand, DemandHook};

use crate::{
    event::{EventKind, Keys},
    filter::Filter,
};

/// An event as published: numbered, encoded once, and shared by every subscriber it matches and
/// by the replay buffer.
#[derive(Debug)]
pub struct Published {
    pub seq: u64,
    pub keys: Keys,
    /// The event's protobuf encoding without its seq, which goes in front when it is sent (see
    /// `event::EncodedEvent`): a slice of the buffer its drain's events were encoded into.
    pub unnumbered: Bytes,
}

/// What a subscriber receives, in order.
#[derive(Debug, Clone)]
pub enum Delivery {
    Event(Arc<Published>),
    /// `count` events that matched were dropped because the queue was full; `last_seq` is the
    /// last one's seq.
    Lost {
        count: u64,
        last_seq: u64,
    },
    /// A resumed subscription asked for events that had left the replay buffer: `count` events
    /// of every kind and filter, seqs up to `last_seq`.
    Expired {
        count: u64,
        last_seq: u64,
    },
    /// Replayed history that asks for state changes, over seqs `first_seq..=last_seq`
    /// published while nobody asked for them: the kernel did not record them then.
    Unrecorded {
        first_seq: u64,
        last_seq: u64,
    },
}

/// Where a subscription starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// With the next event published.
    Live,
    /// With the events numbered after this seq (the last one the client saw).
    After(u64),
    /// With the latest N matching events held.
    Last(usize),
}

pub struct SubscribeRequest {
    pub filter: Filter,
    /// Queue capacity, in events.
    pub queue: usize,
    /// Queue capacity, in bytes (see [`queued_bytes`]); the first of the two bounds reached
    /// counts.
    pub queue_bytes: usize,
    pub start: Start,
    /// Who subscribes, for GetStats.
    pub peer: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubscribeError {
    #[error("{0} subscribers are connected, the most this agent takes (--max-subscribers)")]
    TooMany(usize),
    #[error(
        "since_seq {since} is beyond the latest event ({latest}): the agent restarted since that \
         event (seqs start again at 1); subscribe without since_seq"
    )]
    Future { since: u64, latest: u64 },
}

#[derive(Clone, Copy, Debug)]
pub struct BusConfig {
    /// Events the replay buffer holds; 0 = no replay.
    pub replay: usize,
    pub max_subscribers: usize,
}

/// Events held for replay by default: a few seconds of a busy host's history for clients that
/// reconnect, at about 350 bytes each (encoded; `tests/service.rs` measures it), 1.4 MiB in all.
pub const DEFAULT_REPLAY: usize = 4096;

impl Default for BusConfig {
    fn default() -> Self {
        BusConfig {
            replay: DEFAULT_REPLAY,
            max_subscribers: 1024,
        }
    }
}

/// What the producer puts in a subscriber's queue: an event, and the drops just before it.
/// Carrying the drops on the next event (instead of a marker of its own) keeps the queue's
/// length a count of events and the Lost exactly at the place of the gap.
struct Queued {
    lost_before: u64,
    last_lost_seq: u64,
    event: Arc<Published>,
}

/// Drops not yet reported, because no event could carry them yet.
#[derive(Default)]
struct Pending {
    count: u64,
    last_seq: u64,
}

/// What one queued event costs the agent, roughly: its encoding (shared with the replay buffer
/// and the other subscribers, so this overstates what one subscriber adds) plus its bookkeeping.
fn queued_bytes(published: &Published) -> usize {
    const BOOKKEEPING: usize =
        std::mem::size_of::<Queued>() + std::mem::size_of::<Published>() + 2 * 8;
    published.unnumbered.len() + BOOKKEEPING
}

/// A subscriber's queue, filled by the producer and emptied by the subscription's stream.
#[derive(Default)]
struct Queue {
    items: VecDeque<Queued>,
    /// `queued_bytes` of `items`.
    bytes: usize,
    pending: Pending,
    /// The stream's task, when it found the queue empty.
    waker: Option<Waker>,
}

/// One subscriber's accounting, written by the producer and by the subscription's stream.
#[derive(Default)]
struct Account {
    matched: AtomicU64,
    replayed: AtomicU64,
    delivered: AtomicU64,
    dropped: AtomicU64,
    /// Events the stream holds outside the queue: replay not yet sent, an event behind a Lost.
    held: AtomicU64,
    replay_expired: AtomicU64,
}

struct Shared {
    /// Events and drops go in and out under this one lock, so drops are reported after every
    /// event queued before them and before every one after.
    queue: Mutex<Queue>,
    /// Most events `queue` holds.
    capacity: usize,
    /// Most bytes `queue` holds (at least one event fits whatever its size).
    capacity_bytes: usize,
    account: Account,
}

impl Shared {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct Subscriber {
    id: u64,
    filter: Filter,
    shared: Arc<Shared>,
    filter_text: String,
    peer: String,
    since: SystemTime,
}

/// The subscribers' accounting; see `Stats` in the proto for the identities.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub matched: u64,
    pub delivered: u64,
    pub dropped: u64,
    pub queued: u64,
    pub abandoned: u64,
}

struct State {
    subscribers: Vec<Subscriber>,
    next_id: u64,
    next_seq: u64,
    replay: VecDeque<Arc<Published>>,
    /// The batch being published, numbered (kept for its allocation).
    fresh: Vec<Arc<Published>>,
    /// The accounting of subscribers that have gone, so totals never go down.
    gone: Totals,
    /// Stretches of seqs (first, last), oldest first, published from records the kernel wrote
    /// while it recorded only opens and closes: no state changes among them. Only those the
    /// replay buffer still reaches are kept.
    unrecorded: VecDeque<(u64, u64)>,
}

pub struct Bus {
    state: Mutex<State>,
    demand_hook: std::sync::OnceLock<DemandHook>,
    /// Subscribers now, readable without the lock (set under it).
    subscribers_now: std::sync::atomic::AtomicUsize,
    config: BusConfig,
    /// Events published by kind (indexed by `EventKind` value).
    published: [AtomicU64; KINDS],
}

const KINDS: usize = 32;

fn kind_index(kind: EventKind) -> usize {
    (kind as usize).min(KINDS - 1)
}

/// Whether a subscriber with `filter` gets an event: a published LOST (a kernel loss) goes to
/// everyone.
fn delivers(filter: &Filter, keys: &Keys) -> bool {
    keys.kind == EventKind::Lost || filter.matches(keys)
}

/// A live subscription: replay first, then live events. Dropping it unsubscribes and frees its
/// queue and whatever replay it still held.
pub struct Subscription {
    pub id: u64,
    replay: VecDeque<Delivery>,
    /// The event that came behind a Lost, sent next.
    behind_lost: Option<Arc<Published>>,
    shared: Arc<Shared>,
    bus: Arc<Bus>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.bus.unsubscribe(self.id);
    }
}

/// One subscriber now, for GetStats.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscriberSnapshot {
    pub id: u64,
    pub filter: String,
    pub peer: String,
    pub since: SystemTime,
    pub queue_capacity: usize,
    pub matched: u64,
    pub replayed: u64,
    pub delivered: u64,
    pub dropped: u64,
    pub queued: u64,
    pub replay_expired: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BusSnapshot {
    /// Events published, by kind value.
    pub by_kind: Vec<(EventKind, u64)>,
    /// The latest seq.
    pub last_seq: u64,
    pub subscribers: Vec<SubscriberSnapshot>,
    /// Over every subscriber since the start, gone ones included.
    pub totals: Totals,
    pub replay_capacity: usize,
    pub replay_held: usize,
    /// 0 when the buffer is empty.
    pub replay_oldest_seq: u64,
}

impl Bus {
    pub fn new(config: BusConfig) -> Arc<Bus> {
        Arc::new(Bus {
            state: Mutex::new(State {
                subscribers: Vec::new(),
                next_id: 0,
                next_seq: 1,
                replay: VecDeque::new(),
                fresh: Vec::new(),
                gone: Totals::default(),
                unrecorded: VecDeque::new(),
            }),
            config,
            demand_hook: std::sync::OnceLock::new(),
            subscribers_now: std::sync::atomic::AtomicUsize::new(0),
            published: std::array::from_fn(|_| AtomicU64::new(0)),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain counters behind: still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn subscribe(
        self: &Arc<Self>,
        request: SubscribeRequest,
    ) -> Result<Subscription, SubscribeError> {
        let shared = Arc::new(Shared {
            queue: Mutex::default(),
            capacity: request.queue.max(1),
            capacity_bytes: request.queue_bytes,
            account: Account::default(),
        });
        let mut state = self.lock();
        if state.subscribers.len() >= self.config.max_subscribers {
            return Err(SubscribeError::TooMany(state.subscribers.len()));
        }
        let replay = state.replay_for(&request.filter, request.start)?;
        let replayed = replay
            .iter()
            .filter(|d| matches!(d, Delivery::Event(_)))
            .count() as u64;
        if let Some(Delivery::Expired { count, .. }) = replay.front() {
            shared.account.replay_expired.store(*count, Relaxed);
        }
        shared.account.matched.store(replayed, Relaxed);
        shared.account.replayed.store(replayed, Relaxed);
        shared.account.held.store(replayed, Relaxed);
        state.next_id += 1;
        let id = state.next_id;
        let demand_before = state.demand();
        state.subscribers.push(Subscriber {
            id,
            filter_text: request.filter.to_string(),
            filter: request.filter,
            shared: Arc::clone(&shared),
            peer: request.peer,
            since: SystemTime::now(),
        });
        self.subscribers_changed(&state, demand_before);
        Ok(Subscription {
            id,
            replay,
            behind_lost: None,
            shared,
            bus: Arc::clone(self),
        })
    }

    fn unsubscribe(&self, id: u64) {
        let mut state = self.lock();
        let demand_before = state.demand();
        if let Some(at) = state.subscribers.iter().position(|s| s.id == id) {
            let gone = state.subscribers.swap_remove(at).snapshot();
            state.gone.matched += gone.matched;
            state.gone.delivered += gone.delivered;
            state.gone.dropped += gone.dropped;
            state.gone.abandoned += gone.queued;
        }
        self.subscribers_changed(&state, demand_before);
    }

    /// Numbers the events (encoded without their seq) in order, offers each to every subscriber
    /// whose filter matches and keeps it for replay. Drains `batch`.
    pub fn publish(&self, batch: &mut Vec<(Bytes, Keys)>) {
        self.publish_marked(batch, false);
    }

    /// As [`Bus::publish`]; `unrecorded` says the batch came from records the kernel wrote while
    /// it recorded only opens and closes (replayed history tells subscribers that ask for state
    /// changes that it has none there).
    pub fn publish_marked(&self, batch: &mut Vec<(Bytes, Keys)>, unrecorded: bool) {
        if batch.is_empty() {
            return;
        }
        let mut state = self.lock();
        let state = &mut *state;
        if unrecorded {
            let (first, last) = (state.next_seq, state.next_seq + batch.len() as u64 - 1);
            match state.unrecorded.back_mut() {
                Some(stretch) if stretch.1 + 1 == first => stretch.1 = last,
                _ => state.unrecorded.push_back((first, last)),
            }
        }
        let mut fresh = std::mem::take(&mut state.fresh);
        for (unnumbered, keys) in batch.drain(..) {
            let seq = state.next_seq;
            state.next_seq += 1;
            self.published[kind_index(keys.kind)].fetch_add(1, Relaxed);
            fresh.push(Arc::new(Published {
                seq,
                keys,
                unnumbered,
            }));
        }
        for sub in &state.subscribers {
            sub.offer(&fresh);
        }
        if self.config.replay > 0 {
            for published in fresh.drain(..) {
                if state.replay.len() >= self.config.replay {
                    state.replay.pop_front();
                }
                state.replay.push_back(published);
            }
        }
        fresh.clear();
        state.fresh = fresh;
        let oldest = state.replay.front().map_or(state.next_seq, |p| p.seq);
        while state.unrecorded.front().is_some_and(|s| s.1 < oldest) {
            state.unrecorded.pop_front();
        }
    }

    /// Numbers `count` events that were not built because nobody subscribed. The replay buffer
    /// holds consecutive seqs, so it is emptied: a subscription resumed from before them is told
    /// how many it missed (a REPLAY Lost), as for events that left the buffer.
    pub fn skip(&self, count: u64) {
        if count == 0 {
            return;
        }
        let mut state = self.lock();
        state.next_seq += count;
        state.replay.clear();
        state.unrecorded.clear();
    }

    /// Whether anyone subscribes now (no lock taken: the agent asks once per record).
    pub fn has_subscribers(&self) -> bool {
        self.subscribers_now
            .load(std::sync::atomic::Ordering::Acquire)
            != 0
    }

    pub fn subscriber_count(&self) -> usize {
        self.lock().subscribers.len()
    }

    pub fn snapshot(&self) -> BusSnapshot {
        let state = self.lock();
        let subscribers: Vec<SubscriberSnapshot> =
            state.subscribers.iter().map(Subscriber::snapshot).collect();
        let mut totals = state.gone;
        for s in &subscribers {
            totals.matched += s.matched;
            totals.delivered += s.delivered;
            totals.dropped += s.dropped;
            totals.queued += s.queued;
        }
        let by_kind = EventKind::ALL
            .into_iter()
            .map(|kind| (kind, self.published[kind_index(kind)].load(Relaxed)))
            .collect();
        BusSnapshot {
            by_kind,
            last_seq: state.next_seq - 1,
            subscribers,
            totals,
            replay_capacity: self.config.replay,
            replay_held: state.replay.len(),
            replay_oldest_seq: state.replay.front().map_or(0, |p| p.seq),
        }
    }
}

impl State {
    /// What a new subscriber gets before live events. Called under the bus lock, so the next
    /// event published is the first live one.
    fn replay_for(
        &self,
        filter: &Filter,
        start: Start,
    ) -> Result<VecDeque<Delivery>, SubscribeError> {
        let latest = self.next_seq - 1;
        let matching = |p: &&Arc<Published>| delivers(filter, &p.keys);
        let event = |p: &Arc<Published>| Delivery::Event(Arc::clone(p));
        let mut replay = VecDeque::new();
        match start {
            Start::Live => {}
            Start::After(since) => {
                if since > latest {
                    return Err(SubscribeError::Future { since, latest });
                }
                // The buffer holds consecutive seqs, oldest first.
                let oldest = self.replay.front().map_or(latest + 1, |p| p.seq);
                if since + 1 < oldest {
                    replay.push_back(Delivery::Expired {
                        count: oldest - 1 - since,
                        last_seq: oldest - 1,
                    });
                }
                let skip =
                    usize::try_from((since + 1).saturating_sub(oldest)).unwrap_or(usize::MAX);
                replay.extend(self.replay.iter().skip(skip).filter(matching).map(event));
            }
            Start::Last(n) => {
                let mut last: Vec<Delivery> = self
                    .replay
                    .iter()
                    .rev()
                    .filter(matching)
                    .take(n)
                    .map(event)
                    .collect();
                last.reverse();
                replay.extend(last);
            }
        }
        let from = match start {
            Start::Live => return Ok(replay),
            Start::After(since) => since + 1,
            Start::Last(_) => match replay.front() {
                Some(Delivery::Event(first)) => first.seq,
                _ => return Ok(replay),
            },
        };
        if self.unrecorded.is_empty() || !filter.asks_for_state_changes() {
            return Ok(replay);
        }
        Ok(replay::with_unrecorded(replay, &self.unrecorded, from))
    }
}

impl Subscriber {
    /// Queues the events of `batch` that match, in order, as far as the queue has room, and
    /// counts the rest as lost; then wakes the stream if it waits.
    fn offer(&self, batch: &[Arc<Published>]) {
        let (mut matched, mut dropped) = (0, 0);
        let mut queue = self.shared.queue();
        for published in batch.iter().filter(|p| delivers(&self.filter, &p.keys)) {
            matched += 1;
            let bytes = queued_bytes(published);
            let fits = queue.items.is_empty()
                || (queue.items.len() < self.shared.capacity
                    && queue.bytes + bytes <= self.shared.capacity_bytes);
            if fits {
                queue.bytes += bytes;
                let item = Queued {
                    lost_before: std::mem::take(&mut queue.pending.count),
                    last_lost_seq: queue.pending.last_seq,
                    event: Arc::clone(published),
                };
                queue.items.push_back(item);
            } else {
                dropped += 1;
                queue.pending.count += 1;
                queue.pending.last_seq = published.seq;
            }
        }
        // A waker is only there if the stream found the queue empty.
        let waker = if matched > 0 {
            queue.waker.take()
        } else {
            None
        };
        drop(queue);
        let account = &self.shared.account;
        account.matched.fetch_add(matched, Relaxed);
        account.dropped.fetch_add(dropped, Relaxed);
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    fn snapshot(&self) -> SubscriberSnapshot {
        let a = &self.shared.account;
        let in_queue = self.shared.queue().items.len() as u64;
        SubscriberSnapshot {
            id: self.id,
            filter: self.filter_text.clone(),
            peer: self.peer.clone(),
            since: self.since,
            queue_capacity: self.shared.capacity,
            matched: a.matched.load(Relaxed),
            replayed: a.replayed.load(Relaxed),
            delivered: a.delivered.load(Relaxed),
            dropped: a.dropped.load(Relaxed),
            queued: in_queue + a.held.load(Relaxed),
            replay_expired: a.replay_expired.load(Relaxed),
        }
    }
}

impl Subscription {
    /// The next delivery: replay first, then the queue, with each Lost where its gap is. Never
    /// `None`: a subscription ends when it is dropped.
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        let account = &self.shared.account;
        if let Some(event) = self.behind_lost.take() {
            account.held.fetch_sub(1, Relaxed);
            account.delivered.fetch_add(1, Relaxed);
            return Poll::Ready(Some(Delivery::Event(event)));
        }
        if let Some(delivery) = self.replay.pop_front() {
            if let Delivery::Event(_) = delivery {
                account.held.fetch_sub(1, Relaxed);
                account.delivered.fetch_add(1, Relaxed);
            }
            return Poll::Ready(Some(delivery));
        }
        let mut queue = self.shared.queue();
        let Some(queued) = queue.items.pop_front() else {
            // The queue is empty: report drops that no later event has carried yet (none may
            // come for a long time).
            if queue.pending.count > 0 {
                let lost = Delivery::Lost {
                    count: std::mem::take(&mut queue.pending.count),
                    last_seq: queue.pending.last_seq,
                };
                return Poll::Ready(Some(lost));
            }
            queue.waker = Some(cx.waker().clone());
            return Poll::Pending;
        };
        queue.bytes -= queued_bytes(&queued.event);
        drop(queue);
        Poll::Ready(Some(self.unpack(queued)))
    }

    fn unpack(&mut self, queued: Queued) -> Delivery {
        let account = &self.shared.account;
        if queued.lost_before == 0 {
            account.delivered.fetch_add(1, Relaxed);
            return Delivery::Event(queued.event);
        }
        account.held.fetch_add(1, Relaxed);
        self.behind_lost = Some(queued.event);
        Delivery::Lost {
            count: queued.lost_before,
            last_seq: queued.last_lost_seq,
        }
    }

    /// The next delivery, waiting for it.
    pub async fn next(&mut self) -> Option<Delivery> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }
}

#[cfg(test)]
#[path = "bus_tests.rs"]
mod tests;

mod demand;
mod replay;
