//! The bounded queue between the pipeline and the OTLP exporter.
//!
//! The pipeline writes each closed connection's log record straight into the batch being
//! filled (under a lock the exporter takes only to take a batch), so a record costs its
//! encoding and nothing else: no copy of the connection, no allocation, no wake-up. The
//! exporter is woken twice per batch: when a record starts one (so it can send it after
//! [`LINGER`]) and when one is full. Beyond `capacity` records waiting, records are dropped and
//! counted; after [`Queue::close`] every record is.
use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{sync::Notify, time::Instant};
use tokio_util::sync::CancellationToken;

use super::record::RecordWriter;
use crate::{
    event::{Clock, clock_ns},
    lifecycle::Connection,
};

/// How long a partial batch waits for more records.
pub(super) const LINGER: Duration = Duration::from_millis(200);

/// Room a batch reserves per record, so that a batch grows its buffer once or not at all (an
/// IPv4 record is a few hundred bytes).
const RECORD_BYTES: usize = 768;

/// Log records, encoded, one after the other.
#[derive(Default)]
pub(super) struct Batch {
    pub records: Vec<u8>,
    pub count: u64,
    started: Option<Instant>,
}

/// The pipeline's end (and the exporter's: both hold one).
#[derive(Clone)]
pub struct Queue {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    ready: Notify,
    lost: Arc<AtomicU64>,
    batch: usize,
    capacity: usize,
}

struct State {
    filling: Batch,
    full: VecDeque<Batch>,
    /// Records in `filling` and `full`.
    queued: usize,
    closed: bool,
    writer: RecordWriter,
    /// Refreshed at each batch's first record (it drifts when the wall clock is set).
    clock: Clock,
}

impl Queue {
    /// Holds at most `capacity` records, in batches of up to `batch`; drops are counted in `lost`.
    pub(super) fn new(capacity: usize, batch: usize, lost: Arc<AtomicU64>) -> Queue {
        Queue {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    filling: Batch::default(),
                    full: VecDeque::new(),
                    queued: 0,
                    closed: false,
                    writer: RecordWriter::default(),
                    clock: Clock::now(),
                }),
                ready: Notify::new(),
                lost,
                batch: batch.max(1),
                capacity: capacity.max(1),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues the log record of `c`, or counts it as lost if the queue is full or closed.
    /// Never waits (but for the lock, which the exporter holds only to take a batch).
    pub fn push(&self, c: &Connection) {
        let shared = &*self.shared;
        let mut state = self.state();
        if state.closed || state.queued >= shared.capacity {
            drop(state);
            shared.lost.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let State {
            filling,
            full,
            queued,
            writer,
            clock,
            ..
        } = &mut *state;
        let first = filling.count == 0;
        if first {
            filling.started = Some(Instant::now());
            filling.records.reserve(shared.batch * RECORD_BYTES);
            *clock = Clock::now();
        }
        // When the agent saw the end: the record's observed time.
        let now_ns = u64::try_from(clock_ns(libc::CLOCK_REALTIME)).unwrap_or(0);
        writer.write(&mut filling.records, c, clock, now_ns);
        filling.count += 1;
        *queued += 1;
        let filled = filling.count >= shared.batch as u64;
        if filled {
            full.push_back(std::mem::take(filling));
        }
        drop(state);
        if first || filled {
            shared.ready.notify_one();
        }
    }

    /// The next batch to send: a full one, or the one being filled once it is [`LINGER`] old.
    /// None once `stop` is cancelled.
    pub(super) async fn next(&self, stop: &CancellationToken) -> Option<Batch> {
        loop {
            let due = {
                let mut state = self.state();
                if let Some(batch) = state.full.pop_front() {
                    state.queued -= batch.count as usize;
                    return Some(batch);
                }
                match state.filling.started {
                    Some(started) if started.elapsed() >= LINGER => {
                        return Some(state.take_filling());
                    }
                    Some(started) => Some(started + LINGER),
                    None => None,
                }
            };
            // A notification sent meanwhile is kept (notify_one stores one), so none is missed.
            tokio::select! {
                _ = stop.cancelled() => return None,
                _ = self.shared.ready.notified() => {}
                _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {}
            }
        }
    }

    /// Closes the queue and returns what it held; every record pushed from now on is counted
    /// as lost.
    pub(super) fn close(&self) -> Vec<Batch> {
        let mut state = self.state();
        state.closed = true;
        let mut batches: Vec<Batch> = state.full.drain(..).collect();
        if state.filling.count > 0 {
            batches.push(state.take_filling());
        }
        state.queued = 0;
        batches
    }

    /// Whether the pipeline still holds its end.
    pub(super) fn has_producers(&self) -> bool {
        Arc::strong_count(&self.shared) > 1
    }

    pub(super) fn count_lost(&self, n: u64) {
        self.shared.lost.fetch_add(n, Ordering::Relaxed);
    }
}

impl State {
    fn take_filling(&mut self) -> Batch {
        let batch = std::mem::take(&mut self.filling);
        self.queued -= batch.count as usize;
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::otlp::record::tests::closed_connections;

    #[test]
    fn a_full_queue_counts_what_it_drops_and_a_closed_one_counts_everything() {
        let lost = Arc::new(AtomicU64::new(0));
        let queue = Queue::new(10, 4, Arc::clone(&lost));
        let connections = closed_connections();
        assert!(connections.len() >= 15);
        for c in &connections[..15] {
            queue.push(c);
        }
        assert_eq!(lost.load(Ordering::Relaxed), 5);
        let held = queue.close();
        assert_eq!(held.iter().map(|b| b.count).collect::<Vec<_>>(), [4, 4, 2]);
        queue.push(&connections[0]);
        assert_eq!(lost.load(Ordering::Relaxed), 6);
        assert!(queue.close().is_empty());
    }

    #[tokio::test]
    async fn a_partial_batch_goes_out_after_the_linger_and_a_full_one_at_once() {
        let queue = Queue::new(100, 4, Arc::default());
        let stop = CancellationToken::new();
        let connections = closed_connections();
        queue.push(&connections[0]);
        let began = Instant::now();
        let batch = queue.next(&stop).await.expect("a batch");
        assert_eq!(batch.count, 1);
        assert!(began.elapsed() >= LINGER);
        for c in &connections[..5] {
            queue.push(c);
        }
        let began = Instant::now();
        let batch = queue.next(&stop).await.expect("a batch");
        assert_eq!(batch.count, 4);
        assert!(began.elapsed() < LINGER);
        stop.cancel();
        assert!(queue.next(&stop).await.is_none());
    }
}
