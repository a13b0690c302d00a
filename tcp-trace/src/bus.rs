//! The sequenced event bus: numbers every event and fans it out to subscribers.
//!
//! Each subscriber has its own bounded queue. The producer (the ring drain) never waits: it
//! `try_send`s, and when a queue is full it counts what the subscriber lost and tells it in-band
//! with one `Lost{count}` as soon as there is room again (the linkerd tap model).
use std::sync::{
    Arc, Mutex,
    atomic::{AtomicU64, Ordering},
};

use tokio::sync::mpsc;

use crate::{
    filter::{Filter, Keys},
    proto,
};

/// One slot per `proto::EventKind` value (and spare room).
pub const KINDS: usize = 8;

/// An event as published: built once, shared by every subscriber it matches.
#[derive(Debug)]
pub struct Published {
    pub event: proto::Event,
    pub keys: Keys,
}

/// What a subscriber receives.
#[derive(Debug, Clone)]
pub enum Delivery {
    Event(Arc<Published>),
    /// `count` events for this subscriber were dropped; `last_seq` is the last one's seq.
    Lost {
        count: u64,
        last_seq: u64,
    },
}

struct Subscriber {
    id: u64,
    filter: Filter,
    tx: mpsc::Sender<Delivery>,
    /// Dropped since the last Lost was queued.
    pending_lost: u64,
    last_lost_seq: u64,
    dropped_total: u64,
}

#[derive(Default)]
struct Subscribers {
    list: Vec<Subscriber>,
    next_id: u64,
    /// Drops of subscribers that have gone, so the total never goes down.
    dropped_by_gone: u64,
}

#[derive(Default)]
pub struct Bus {
    subscribers: Mutex<Subscribers>,
    next_seq: AtomicU64,
    /// Events published, indexed by `proto::EventKind` value.
    published: [AtomicU64; KINDS],
}

/// A live subscription. Dropping it unsubscribes and frees its queue.
pub struct Subscription {
    pub id: u64,
    pub rx: mpsc::Receiver<Delivery>,
    bus: Arc<Bus>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.bus.unsubscribe(self.id);
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BusCounters {
    pub by_kind: [u64; KINDS],
    pub subscribers: usize,
    pub dropped: u64,
    pub last_seq: u64,
}

impl Bus {
    pub fn new() -> Arc<Bus> {
        Arc::new(Bus {
            next_seq: AtomicU64::new(1),
            ..Default::default()
        })
    }

    pub fn subscribe(self: &Arc<Self>, filter: Filter, queue: usize) -> Subscription {
        let (tx, rx) = mpsc::channel(queue.max(2));
        let mut subs = self.lock();
        subs.next_id += 1;
        let id = subs.next_id;
        subs.list.push(Subscriber {
            id,
            filter,
            tx,
            pending_lost: 0,
            last_lost_seq: 0,
            dropped_total: 0,
        });
        Subscription {
            id,
            rx,
            bus: Arc::clone(self),
        }
    }

    fn unsubscribe(&self, id: u64) {
        let mut subs = self.lock();
        if let Some(at) = subs.list.iter().position(|s| s.id == id) {
            let gone = subs.list.swap_remove(at);
            subs.dropped_by_gone += gone.dropped_total;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Subscribers> {
        // A panic while holding the lock leaves plain counters behind: still usable.
        self.subscribers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Numbers the events in order and offers each to every subscriber whose filter matches.
    /// Drains `batch`.
    pub fn publish(&self, batch: &mut Vec<(proto::Event, Keys)>) {
        if batch.is_empty() {
            return;
        }
        let mut subs = self.lock();
        for (mut event, keys) in batch.drain(..) {
            let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
            event.seq = seq;
            self.published[(keys.kind as usize).min(KINDS - 1)].fetch_add(1, Ordering::Relaxed);
            let mut shared: Option<Arc<Published>> = None;
            let mut published = Some(Published { event, keys });
            for sub in subs.list.iter_mut() {
                if !sub.filter.matches(&keys) {
                    continue;
                }
                let item = shared
                    .get_or_insert_with(|| Arc::new(published.take().expect("taken once")))
                    .clone();
                sub.offer(item, seq);
            }
        }
        subs.list.retain(|s| !s.tx.is_closed());
    }

    pub fn counters(&self) -> BusCounters {
        let subs = self.lock();
        BusCounters {
            by_kind: std::array::from_fn(|k| self.published[k].load(Ordering::Relaxed)),
            subscribers: subs.list.len(),
            dropped: subs.dropped_by_gone + subs.list.iter().map(|s| s.dropped_total).sum::<u64>(),
            last_seq: self.next_seq.load(Ordering::Relaxed) - 1,
        }
    }
}

impl Subscriber {
    fn offer(&mut self, item: Arc<Published>, seq: u64) {
        // A pending Lost goes first, and only together with the event, so the subscriber sees
        // the gap where it happened.
        let needed = if self.pending_lost > 0 { 2 } else { 1 };
        if self.tx.capacity() < needed {
            self.pending_lost += 1;
            self.dropped_total += 1;
            self.last_lost_seq = seq;
            return;
        }
        if self.pending_lost > 0 {
            let lost = Delivery::Lost {
                count: self.pending_lost,
                last_seq: self.last_lost_seq,
            };
            // Capacity was checked under the bus lock, and only this producer sends.
            let _ = self.tx.try_send(lost);
            self.pending_lost = 0;
        }
        let _ = self.tx.try_send(Delivery::Event(item));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: proto::EventKind, port: u16) -> (proto::Event, Keys) {
        let keys = Keys {
            kind,
            local: format!("127.0.0.1:{port}").parse().unwrap(),
            remote: "127.0.0.1:9".parse().unwrap(),
            pid: None,
            netns: 1,
        };
        (proto::Event::default(), keys)
    }

    fn seqs(sub: &mut Subscription) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(d) = sub.rx.try_recv() {
            out.push(match d {
                Delivery::Event(p) => p.event.seq.to_string(),
                Delivery::Lost { count, last_seq } => format!("lost{count}@{last_seq}"),
            });
        }
        out
    }

    #[test]
    fn events_are_numbered_from_one_and_filtered_per_subscriber() {
        let bus = Bus::new();
        let mut all = bus.subscribe(Filter::default(), 100);
        let only_80 = Filter {
            ports: vec![80],
            ..Default::default()
        };
        let mut some = bus.subscribe(only_80, 100);
        let mut batch = vec![
            event(proto::EventKind::StateChange, 80),
            event(proto::EventKind::StateChange, 81),
            event(proto::EventKind::ConnectionClosed, 80),
        ];
        bus.publish(&mut batch);
        assert!(batch.is_empty());
        assert_eq!(seqs(&mut all), ["1", "2", "3"]);
        assert_eq!(seqs(&mut some), ["1", "3"]);
        let c = bus.counters();
        assert_eq!(c.by_kind[proto::EventKind::StateChange as usize], 2);
        assert_eq!((c.subscribers, c.last_seq, c.dropped), (2, 3, 0));
    }

    #[test]
    fn a_full_queue_loses_events_and_says_exactly_how_many_in_band() {
        let bus = Bus::new();
        let mut slow = bus.subscribe(Filter::default(), 2);
        let mut fast = bus.subscribe(Filter::default(), 100);
        let mut batch: Vec<_> = (0..5)
            .map(|_| event(proto::EventKind::StateChange, 1))
            .collect();
        bus.publish(&mut batch);
        assert_eq!(seqs(&mut slow), ["1", "2"]);
        assert_eq!(bus.counters().dropped, 3);
        bus.publish(&mut vec![event(proto::EventKind::StateChange, 1)]);
        assert_eq!(seqs(&mut slow), ["lost3@5", "6"]);
        assert_eq!(
            seqs(&mut fast),
            ["1", "2", "3", "4", "5", "6"],
            "others lose nothing"
        );
    }

    #[test]
    fn dropping_a_subscription_frees_it_and_keeps_its_drop_count() {
        let bus = Bus::new();
        let slow = bus.subscribe(Filter::default(), 2);
        let mut batch: Vec<_> = (0..3)
            .map(|_| event(proto::EventKind::StateChange, 1))
            .collect();
        bus.publish(&mut batch);
        drop(slow);
        let c = bus.counters();
        assert_eq!((c.subscribers, c.dropped), (0, 1));
    }
}
