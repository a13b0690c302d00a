//! The bus, fed by hand: sequencing, fan-out, queues, drops and replay.
use super::*;
use crate::{
    model::{Direction, TcpState},
    proto,
};

fn event(kind: EventKind, port: u16) -> (Bytes, Keys) {
    let keys = Keys {
        kind,
        local: format!("127.0.0.1:{port}").parse().unwrap(),
        remote: "127.0.0.1:9".parse().unwrap(),
        pid: None,
        netns: 1,
        comm: [0; 16],
        direction: Direction::Active,
        state: Some(TcpState::Established),
    };
    (Bytes::new(), keys)
}

fn events(n: usize) -> Vec<(Bytes, Keys)> {
    (0..n).map(|_| event(EventKind::StateChange, 1)).collect()
}

fn bus(replay: usize) -> Arc<Bus> {
    Bus::new(BusConfig {
        replay,
        max_subscribers: 10,
    })
}

fn subscribe(bus: &Arc<Bus>, filter: Filter, queue: usize, start: Start) -> Subscription {
    bus.subscribe(SubscribeRequest {
        filter,
        queue,
        queue_bytes: usize::MAX,
        start,
        peer: "test".into(),
    })
    .unwrap()
}

/// Everything deliverable now, as text.
fn seqs(sub: &mut Subscription) -> Vec<String> {
    let waker = std::task::Waker::noop();
    let mut cx = Context::from_waker(waker);
    let mut out = Vec::new();
    while let Poll::Ready(Some(d)) = sub.poll_next(&mut cx) {
        out.push(match d {
            Delivery::Event(p) => p.seq.to_string(),
            Delivery::Lost { count, last_seq } => format!("lost{count}@{last_seq}"),
            Delivery::Expired { count, last_seq } => format!("expired{count}@{last_seq}"),
            Delivery::Unrecorded {
                first_seq,
                last_seq,
            } => format!("unrecorded{first_seq}-{last_seq}"),
        });
    }
    out
}

fn closed_only() -> Filter {
    Filter {
        kinds: vec![EventKind::ConnectionClosed],
        ..Default::default()
    }
}

fn account(bus: &Bus, id: u64) -> SubscriberSnapshot {
    bus.snapshot()
        .subscribers
        .into_iter()
        .find(|s| s.id == id)
        .unwrap()
}

#[test]
fn events_are_numbered_from_one_and_filtered_per_subscriber() {
    let bus = bus(0);
    let mut all = subscribe(&bus, Filter::default(), 100, Start::Live);
    let only_80 = Filter {
        ports: vec![80],
        ..Default::default()
    };
    let mut some = subscribe(&bus, only_80, 100, Start::Live);
    let mut batch = vec![
        event(EventKind::StateChange, 80),
        event(EventKind::StateChange, 81),
        event(EventKind::ConnectionClosed, 80),
    ];
    bus.publish(&mut batch);
    assert!(batch.is_empty());
    assert_eq!(seqs(&mut all), ["1", "2", "3"]);
    assert_eq!(seqs(&mut some), ["1", "3"]);
    let s = bus.snapshot();
    assert!(s.by_kind.contains(&(EventKind::StateChange, 2)));
    assert_eq!(
        (s.subscribers.len(), s.last_seq, s.totals.dropped),
        (2, 3, 0)
    );
    assert_eq!(s.subscribers[1].filter, "port=80");
}

#[test]
fn each_event_is_sent_as_its_own_encoding_with_its_seq() {
    use prost::Message as _;
    let bus = bus(0);
    let mut sub = subscribe(&bus, Filter::default(), 100, Start::Live);
    let mut expected = vec![proto::Event::default(); 3];
    expected[1].kernel_time_ns = 42;
    let mut batch = events(3);
    for ((unnumbered, _), event) in batch.iter_mut().zip(&expected) {
        *unnumbered = event.encode_to_vec().into();
    }
    bus.publish(&mut batch);
    let waker = std::task::Waker::noop();
    let mut cx = Context::from_waker(waker);
    for (seq, event) in (1..).zip(&mut expected) {
        event.seq = seq;
        let Poll::Ready(Some(Delivery::Event(p))) = sub.poll_next(&mut cx) else {
            panic!("event {seq} was not delivered");
        };
        let sent = crate::event::EncodedEvent::new(p.seq, p.unnumbered.clone());
        assert_eq!(sent.encode_to_vec(), event.encode_to_vec());
    }
}

#[test]
fn a_waiting_stream_is_woken_once_per_batch_that_has_an_event_for_it() {
    struct Count(std::sync::atomic::AtomicUsize);
    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Relaxed);
        }
    }
    let bus = bus(0);
    let only_80 = Filter {
        ports: vec![80],
        ..Default::default()
    };
    let mut sub = subscribe(&bus, only_80, 100, Start::Live);
    let count = Arc::new(Count(Default::default()));
    let waker = Waker::from(Arc::clone(&count));
    let mut cx = Context::from_waker(&waker);
    assert!(sub.poll_next(&mut cx).is_pending());
    bus.publish(&mut events(3));
    assert_eq!(count.0.load(Relaxed), 0, "nothing for it");
    bus.publish(&mut vec![
        event(EventKind::StateChange, 80),
        event(EventKind::StateChange, 80),
    ]);
    assert_eq!(count.0.load(Relaxed), 1);
    assert_eq!(seqs(&mut sub), ["4", "5"]);
    assert!(sub.poll_next(&mut cx).is_pending());
    bus.publish(&mut vec![event(EventKind::StateChange, 80)]);
    assert_eq!(count.0.load(Relaxed), 2);
}

#[test]
fn a_full_queue_loses_events_and_says_exactly_how_many_where_the_gap_is() {
    let bus = bus(0);
    let mut slow = subscribe(&bus, Filter::default(), 2, Start::Live);
    let mut fast = subscribe(&bus, Filter::default(), 100, Start::Live);
    bus.publish(&mut events(5));
    let a = account(&bus, slow.id);
    assert_eq!((a.matched, a.dropped, a.queued, a.delivered), (5, 3, 2, 0));
    assert_eq!(
        seqs(&mut slow),
        ["1", "2", "lost3@5"],
        "reported once the queue is read"
    );
    bus.publish(&mut events(1));
    assert_eq!(seqs(&mut slow), ["6"]);
    assert_eq!(
        seqs(&mut fast),
        ["1", "2", "3", "4", "5", "6"],
        "others lose nothing"
    );
    let a = account(&bus, slow.id);
    assert_eq!((a.matched, a.delivered, a.dropped, a.queued), (6, 3, 3, 0));
}

#[test]
fn a_queue_holds_what_fits_in_its_bytes_and_always_at_least_one_event() {
    let bus = bus(0);
    let mut batch = events(4);
    for (unnumbered, _) in &mut batch {
        *unnumbered = Bytes::from(vec![0; 1000]);
    }
    let one = 1000
        + queued_bytes(&Published {
            seq: 0,
            keys: batch[0].1,
            unnumbered: Bytes::new(),
        });
    let subscribe_bytes = |queue_bytes| {
        bus.subscribe(SubscribeRequest {
            filter: Filter::default(),
            queue: 100,
            queue_bytes,
            start: Start::Live,
            peer: String::new(),
        })
        .unwrap()
    };
    let mut two = subscribe_bytes(2 * one + one / 2);
    let mut tiny = subscribe_bytes(1);
    bus.publish(&mut batch);
    assert_eq!(seqs(&mut two), ["1", "2", "lost2@4"]);
    assert_eq!(seqs(&mut tiny), ["1", "lost3@4"]);
    let mut batch = events(1);
    batch[0].0 = Bytes::from(vec![0; 1000]);
    bus.publish(&mut batch);
    assert_eq!(seqs(&mut two), ["5"], "what was sent no longer counts");
}

#[test]
fn drops_ride_on_the_next_event_when_one_comes_before_the_queue_is_read() {
    let bus = bus(0);
    let mut slow = subscribe(&bus, Filter::default(), 2, Start::Live);
    bus.publish(&mut events(4));
    let waker = std::task::Waker::noop();
    let mut cx = Context::from_waker(waker);
    assert!(matches!(
        slow.poll_next(&mut cx),
        Poll::Ready(Some(Delivery::Event(_)))
    ));
    bus.publish(&mut events(1));
    assert_eq!(seqs(&mut slow), ["2", "lost2@4", "5"]);
}

#[test]
fn a_resumed_subscription_gets_exactly_what_it_missed_then_live() {
    let bus = bus(100);
    let mut first = subscribe(&bus, Filter::default(), 100, Start::Live);
    bus.publish(&mut events(3));
    assert_eq!(seqs(&mut first), ["1", "2", "3"]);
    drop(first);
    bus.publish(&mut events(2));
    let mut again = subscribe(&bus, Filter::default(), 100, Start::After(3));
    bus.publish(&mut events(1));
    assert_eq!(seqs(&mut again), ["4", "5", "6"]);
    let a = account(&bus, again.id);
    assert_eq!((a.matched, a.replayed, a.delivered, a.queued), (3, 2, 3, 0));
    let mut latest = subscribe(&bus, Filter::default(), 100, Start::Last(2));
    assert_eq!(seqs(&mut latest), ["5", "6"]);
    assert_eq!(
        bus.subscribe(SubscribeRequest {
            filter: Filter::default(),
            queue: 1,
            queue_bytes: usize::MAX,
            start: Start::After(7),
            peer: String::new(),
        })
        .err(),
        Some(SubscribeError::Future {
            since: 7,
            latest: 6
        })
    );
}

#[test]
fn history_published_while_transitions_went_unrecorded_says_so_to_those_asking_for_them() {
    let bus = bus(100);
    let closed_only = closed_only();
    let closed = |n| -> Vec<(Bytes, Keys)> {
        (0..n)
            .map(|_| event(EventKind::ConnectionClosed, 1))
            .collect()
    };
    // A subscriber that asks only for closes keeps the kernel quiet: seqs 1-4, in two drains.
    let _watcher = subscribe(&bus, closed_only.clone(), 100, Start::Live);
    bus.publish_marked(&mut closed(2), true);
    bus.publish_marked(&mut closed(2), true);
    // Then someone asks for everything: recorded again from seq 5.
    bus.publish_marked(&mut events(2), false);
    let mut all = subscribe(&bus, Filter::default(), 100, Start::After(0));
    assert_eq!(
        seqs(&mut all),
        ["unrecorded1-4", "1", "2", "3", "4", "5", "6"]
    );
    let mut later = subscribe(&bus, Filter::default(), 100, Start::After(2));
    assert_eq!(seqs(&mut later), ["unrecorded3-4", "3", "4", "5", "6"]);
    let mut last = subscribe(&bus, Filter::default(), 100, Start::Last(3));
    assert_eq!(seqs(&mut last), ["unrecorded4-4", "4", "5", "6"]);
    // Nothing missing for those who did not ask for state changes, or whose history is after.
    let mut closes = subscribe(&bus, closed_only, 100, Start::After(0));
    assert_eq!(seqs(&mut closes), ["1", "2", "3", "4"]);
    let mut recent = subscribe(&bus, Filter::default(), 100, Start::After(4));
    assert_eq!(seqs(&mut recent), ["5", "6"]);
    // A stretch whose events the filter passes none of is still told, where it ends.
    let ports_2 = Filter {
        ports: vec![2],
        ..Default::default()
    };
    let mut none = subscribe(&bus, ports_2, 100, Start::After(0));
    assert_eq!(seqs(&mut none), ["unrecorded1-4"]);
}

#[test]
fn events_gone_from_the_replay_buffer_are_counted_over_all_kinds() {
    let bus3 = bus(3);
    let closed_only = closed_only();
    let mut batch = events(5);
    batch.push(event(EventKind::ConnectionClosed, 1));
    bus3.publish(&mut batch); // seqs 1-6; the buffer holds 4-6
    let mut resumed = subscribe(&bus3, closed_only.clone(), 10, Start::After(1));
    assert_eq!(seqs(&mut resumed), ["expired2@3", "6"]);
    assert_eq!(account(&bus3, resumed.id).replay_expired, 2);
    let mut everything = subscribe(&bus3, closed_only, 10, Start::After(0));
    assert_eq!(seqs(&mut everything), ["expired3@3", "6"]);
    let none = bus(0);
    none.publish(&mut events(2));
    let mut resumed = subscribe(&none, Filter::default(), 10, Start::After(1));
    assert_eq!(seqs(&mut resumed), ["expired1@2"]);
}

#[test]
fn replay_longer_than_the_queue_is_delivered_whole_and_live_events_queue_behind_it() {
    let bus = bus(100);
    bus.publish(&mut events(10));
    let mut sub = subscribe(&bus, Filter::default(), 2, Start::After(0));
    bus.publish(&mut events(3));
    let expected: Vec<String> = (1..=12)
        .map(|s| s.to_string())
        .chain(["lost1@13".to_string()])
        .collect();
    assert_eq!(seqs(&mut sub), expected);
}

#[test]
fn a_kernel_loss_reaches_every_subscriber_whatever_its_filter_live_and_in_replay() {
    let bus = bus(10);
    let only_80 = Filter {
        ports: vec![80],
        kinds: vec![EventKind::ConnectionClosed],
        ..Default::default()
    };
    let mut live = subscribe(&bus, only_80.clone(), 10, Start::Live);
    let mut batch = events(1);
    batch.push(event(EventKind::Lost, 0));
    bus.publish(&mut batch);
    assert_eq!(seqs(&mut live), ["2"]);
    let mut resumed = subscribe(&bus, only_80, 10, Start::After(0));
    assert_eq!(seqs(&mut resumed), ["2"]);
}

#[test]
fn subscribers_beyond_the_limit_are_refused() {
    let bus = Bus::new(BusConfig {
        replay: 0,
        max_subscribers: 1,
    });
    let _one = subscribe(&bus, Filter::default(), 1, Start::Live);
    let refused = bus.subscribe(SubscribeRequest {
        filter: Filter::default(),
        queue: 1,
        queue_bytes: usize::MAX,
        start: Start::Live,
        peer: String::new(),
    });
    assert_eq!(refused.err(), Some(SubscribeError::TooMany(1)));
}

#[test]
fn dropping_a_subscription_frees_it_and_its_accounting_stays_in_the_totals() {
    let bus = bus(0);
    let slow = subscribe(&bus, Filter::default(), 2, Start::Live);
    bus.publish(&mut events(3));
    drop(slow);
    let s = bus.snapshot();
    assert!(s.subscribers.is_empty());
    assert_eq!(
        s.totals,
        Totals {
            matched: 3,
            delivered: 0,
            dropped: 1,
            queued: 0,
            abandoned: 2
        }
    );
}

#[test]
fn the_demand_hook_hears_of_the_first_and_last_subscriber_and_of_state_change_demand() {
    let bus = bus(0);
    let heard = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&heard);
    bus.on_demand(Box::new(move |d| {
        log.lock().unwrap().push((d.subscribers, d.state_changes));
    }));
    let closes = subscribe(&bus, closed_only(), 10, Start::Live);
    let also_closes = subscribe(&bus, closed_only(), 10, Start::Live);
    let everything = subscribe(&bus, Filter::default(), 10, Start::Live);
    drop(everything);
    drop(closes);
    drop(also_closes);
    assert_eq!(
        *heard.lock().unwrap(),
        // Told at once; then only changes: a second closes-only subscriber changes nothing.
        [
            (false, false),
            (true, false),
            (true, true),
            (true, false),
            (false, false)
        ]
    );
}
