//! The drain's side of the agent: each record from the kernel through the table to the bus.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex, atomic::Ordering},
};

use super::{heal::Heal, release_free_heap};
use crate::{
    bus::Bus,
    capture::{self, DecodeError, Record},
    event::Events,
    export::Observer,
    lifecycle::{Connection, KeepaliveChange, KeepaliveDefaults, Table},
    model::TcpState,
    stats::AgentStats,
};

/// Decodes records, updates the table and publishes the resulting events, one drain at a time.
pub(super) struct Pipeline {
    pub(super) table: Arc<Mutex<Table>>,
    pub(super) bus: Arc<Bus>,
    pub(super) stats: Arc<AgentStats>,
    pub(super) events: Events,
    /// Build events for the replay buffer even while nobody subscribes.
    pub(super) keep_replay: bool,
    /// Reused buffer for connections whose lives completed.
    pub(super) closed: Vec<Connection>,
    pub(super) keepalive_defaults: HashMap<u32, KeepaliveDefaults>,
    pub(super) warned_malformed: bool,
    /// The table's capacity after the last drain, to see it grow.
    pub(super) table_capacity: usize,
    pub(super) heal: Heal,
    /// Prometheus and OTLP: told of each connection's open, establishment and close.
    pub(super) export: Observer,
}

impl Pipeline {
    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The keepalive sysctls of a namespace, read once per namespace through a process in it.
    fn keepalive_defaults(&mut self, netns: u32, pid: u32) -> KeepaliveDefaults {
        *self
            .keepalive_defaults
            .entry(netns)
            .or_insert_with(|| capture::keepalive_defaults(pid).unwrap_or(KeepaliveDefaults::LINUX))
    }
}

impl Pipeline {
    /// Applies one record to the table and builds its events.
    fn record(&mut self, table: &mut Table, record: &Record) {
        // With nobody subscribed, events are counted, not built (unless the replay is to hold
        // them: --all-transitions). Decided per record: a Subscribe that returned sees every
        // event of every record the agent reads after it.
        self.events.unwatched = !self.keep_replay && !self.bus.has_subscribers();
        match record {
            Record::Transition(t) => self.transition(table, t),
            Record::Retransmit(r) => {
                let connection = table.retransmit(r);
                if let Some(c) = connection {
                    self.events.retransmit(r, c);
                }
            }
            Record::Reset(r) => {
                let connection = table.reset(r);
                // A reset sent without a socket has no connection; a reset for a socket the
                // agent never saw is reported bare too.
                self.events.reset(r, connection);
            }
            Record::Keepalive(k) => {
                let changes = table.keepalive_timer(k);
                if let Some((c, changes)) = changes {
                    for change in changes.iter().flatten() {
                        if let KeepaliveChange::ProbeSent { .. } = change {
                            self.export.keepalive_probe();
                        }
                        self.events.keepalive(k.ts_ns, change, c);
                    }
                }
            }
            Record::Accept(a) => {
                // Changes the owner that later events carry; not an event of its own.
                table.accepted(a);
            }
            Record::Kept(kept) => {
                // The records the slot stood for, applied in place: not copied into records.
                let (opened, established, accepted) = kept.parts();
                for t in [opened, established].iter().flatten() {
                    self.transition(table, t);
                }
                if let Some(a) = &accepted {
                    table.accepted(a);
                }
                if let Some(close) = &kept.close {
                    self.transition(table, close);
                }
            }
            Record::SocketOption(o) => {
                let defaults = self.keepalive_defaults(o.netns, o.task.pid);
                let change = table.socket_option(o, defaults);
                if let Some((c, change)) = change {
                    self.events.keepalive(o.ts_ns, &change, c);
                }
            }
        }
    }
}

impl Pipeline {
    /// Applies each decoded record under one hold of the table's lock, and counts (and warns
    /// of, once) the undecodable ones; returns how many it applied.
    fn apply_all<'a>(
        &mut self,
        records: impl Iterator<Item = &'a Result<Record, DecodeError>>,
    ) -> u64 {
        // The table's lock is taken once per drain, not once per record: under churn a lock
        // and unlock per record was a tenth of the agent's CPU. A listing or a scrape waits
        // for one drain at most.
        let table = Arc::clone(&self.table);
        let mut table = table.lock().unwrap_or_else(|p| p.into_inner());
        let mut applied = 0;
        for record in records {
            match record {
                Ok(record) => {
                    applied += 1;
                    self.record(&mut table, record);
                }
                Err(err) => {
                    self.stats.records_malformed.fetch_add(1, Ordering::Relaxed);
                    if !self.warned_malformed {
                        self.warned_malformed = true;
                        tracing::warn!(
                            "undecodable record from the kernel (counted in stats): {err}"
                        );
                    }
                }
            }
        }
        applied
    }

    fn transition(&mut self, table: &mut Table, t: &crate::model::Transition) {
        // Recorded while the kernel recorded only opens and closes?
        self.events.quiet = !t.all_recorded;
        self.events.unrecorded |= self.events.quiet;
        let applied = table.apply(t);
        let c = applied.connection;
        if applied.opened {
            self.export.opened(c);
        }
        if t.new == TcpState::Established {
            if let Some(ns) = c.handshake_ns() {
                self.stats.established(ns);
            }
            self.export.established(c);
        }
        // A transition recorded while the kernel skipped its neighbours is not shown:
        // no subscriber asked for state changes when it happened.
        if t.all_recorded {
            self.events.state_change(t, c);
        }
    }
}

impl capture::Sink for Pipeline {
    fn records<'a>(&mut self, records: impl Iterator<Item = &'a Result<Record, DecodeError>>) {
        let decoded = self.apply_all(records);
        self.stats
            .records_decoded
            .fetch_add(decoded, Ordering::Relaxed);
    }

    fn adopted<'a>(&mut self, records: impl Iterator<Item = &'a Result<Record, DecodeError>>) {
        let adopted = self.apply_all(records);
        self.stats
            .slots_adopted
            .fetch_add(adopted, Ordering::Relaxed);
    }

    fn wants_adoption(&self, handed_on_ns: u64) -> bool {
        // The heal below compares the table with the kernel's list: every socket still in a
        // slot must be in the table by then.
        self.heal
            .received
            .as_ref()
            .is_some_and(|list| list.finished_ns <= handed_on_ns)
    }

    fn batch_done(&mut self, handed_on_ns: u64) {
        let mut closed = std::mem::take(&mut self.closed);
        // Compared only once every record written before the list was complete is in the
        // table: then the table has the CLOSE of every socket the list misses, and the open of
        // every socket it lists. An agent behind the kernel (rings read in part) waits.
        let healed = self
            .heal
            .received
            .take_if(|list| list.finished_ns <= handed_on_ns)
            .map(|list| self.table().heal(&list));
        if let Some(healed) = healed {
            self.stats.healed(&healed);
            if self.heal.confirming.again(&healed) {
                self.heal.request();
            }
        }
        let (long_lived_ns, table_capacity) = {
            let mut table = self.table();
            table.end_batch(&mut closed);
            (table.peers.long_lived_ns(), table.capacity())
        };
        if table_capacity > self.table_capacity {
            // The table doubled and freed its old slots: megabytes that glibc keeps resident in
            // the heap (blocks that size come from it rather than from mmap once blocks as
            // large were freed, as the BTF was at load). 4 MiB at 100,000 connections; at most
            // once per doubling, and only once the old slots were worth it (a trim walks every
            // arena under its lock, on this thread).
            self.table_capacity = table_capacity;
            if table_capacity >= 1 << 14 {
                release_free_heap();
            }
        }
        for connection in &closed {
            self.stats.closed(connection);
            self.export.closed(connection);
            self.events.closed(connection, long_lived_ns);
        }
        if !closed.is_empty() {
            self.table().recycle(closed.drain(..));
        }
        self.closed = closed;
        // The events counted, not built, came before any built in this drain: a subscriber
        // arrived in between.
        self.bus.skip(std::mem::take(&mut self.events.skipped));
        self.bus
            .publish_marked(&mut self.events.batch, self.events.unrecorded);
        self.events.drain_done();
        // After publishing: reading the kernel's counters (a file per program) must not delay
        // this drain's events. A loss found here goes out with the next drain, at most one
        // ring poll (100 ms) later.
        if let Some((ring_full, skipped)) = self.heal.kernel_losses(&self.stats) {
            self.events.kernel_lost(ring_full, skipped);
            self.heal.request();
        }
        // One list at a time: a newer one would need a later cut still.
        if self.heal.received.is_none()
            && let Some(list) = self.heal.lists.as_ref().and_then(|l| l.try_recv().ok())
        {
            self.heal.received = Some(list);
        }
    }
}
