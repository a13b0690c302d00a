//! ListConnections' states while the kernel records only opens and closes: the table never
//! hears of a socket entering CLOSE_WAIT, FIN_WAIT1/2, LAST_ACK or CLOSING then, and would list
//! it as ESTABLISHED until it closes. Before a listing, a sock_diag dump of just those states
//! (the kernel filters by state, so 100,000 established sockets cost a walk of its hash and no
//! answer) moves the connections it finds to the state they are in.
use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use crate::{
    capture::sockdiag::SockDiag,
    event::clock_ns,
    lifecycle::{Table, UNRECORDED_WHEN_QUIET},
};

/// Catches the table up with the kernel before a listing; see the module.
pub(super) struct CatchUp {
    table: Arc<Mutex<Table>>,
    /// Since when the kernel records every transition (CLOCK_MONOTONIC ns); u64::MAX while it
    /// records only opens and closes.
    recording_all_since: Arc<AtomicU64>,
    dumps: Mutex<Dumps>,
}

/// One dump at a time; the netlink sockets are kept for the next.
struct Dumps {
    diag: SockDiag,
    /// When the last dump began: a listing asked for before it needs no dump of its own.
    last_started_ns: u64,
    warned: bool,
}

impl CatchUp {
    pub(super) fn new(table: Arc<Mutex<Table>>, recording_all_since: Arc<AtomicU64>) -> CatchUp {
        CatchUp {
            table,
            recording_all_since,
            dumps: Mutex::new(Dumps {
                diag: SockDiag::default(),
                last_started_ns: 0,
                warned: false,
            }),
        }
    }

    /// Blocks for a dump when some connection may be behind its socket (none may be while
    /// the kernel has recorded every transition since before their last one), unless one that
    /// began at most `fresh_enough` ago caught it up already.
    pub(super) fn run(&self, fresh_enough: Duration) {
        let asked_ns = monotonic_ns().saturating_sub(fresh_enough.as_nanos() as u64);
        let since = self.recording_all_since.load(Ordering::Acquire);
        let netns = self.table().behind_netns(since);
        if netns.is_empty() {
            return;
        }
        let mut dumps = self.dumps.lock().unwrap_or_else(|p| p.into_inner());
        // Listings asked for together share the dump that began after them all.
        if dumps.last_started_ns >= asked_ns {
            return;
        }
        let started = std::time::Instant::now();
        let (list, errors) = dumps.diag.list_states(&netns, &UNRECORDED_WHEN_QUIET);
        dumps.last_started_ns = list.started_ns;
        let dumped = started.elapsed();
        let moved = self.table().catch_up(&list);
        tracing::debug!(
            "listing: {moved} connections caught up with {} closing sockets in {} namespaces \
             (dump {dumped:?})",
            list.sockets.len(),
            list.netns.len(),
        );
        for err in &errors {
            if dumps.warned {
                tracing::debug!("connection states may be behind the kernel's: {err}");
            } else {
                tracing::warn!("connection states may be behind the kernel's: {err}");
            }
        }
        dumps.warned |= !errors.is_empty();
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub(super) fn monotonic_ns() -> u64 {
    u64::try_from(clock_ns(libc::CLOCK_MONOTONIC)).unwrap_or(0)
}
