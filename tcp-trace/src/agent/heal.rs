//! Healing's agent side: the thread that lists the kernel's sockets, and what the drain
//! asks of it.
use std::{
    sync::{Arc, atomic::Ordering, mpsc},
    time::{Duration, Instant},
};

use crate::{
    capture::{
        self,
        sockdiag::{SockDiag, SocketList},
    },
    event::thread_cpu,
    lifecycle::Healed,
    stats::AgentStats,
};

/// The pipeline's side of healing: tells subscribers of kernel-side losses, asks the heal
/// thread for the kernel's socket list (after a loss, and to confirm suspects), and compares a
/// list with the table once a whole drain began after the list was complete.
pub(super) struct Heal {
    /// None when healing is off.
    requests: Option<mpsc::SyncSender<()>>,
    pub(super) lists: Option<mpsc::Receiver<SocketList>>,
    /// A list received at the end of an earlier drain, to compare once the drain has handed
    /// on every record written before the list was complete.
    pub(super) received: Option<SocketList>,
    /// The kernel counters when last checked, and when.
    counters: capture::KernelCounters,
    checked: Instant,
    /// Heals asked for in a row only to confirm suspects.
    pub(super) confirming: Confirming,
}

/// How often the drain looks at the kernel's loss counters (a read of each program's fdinfo).
const LOSS_CHECK: Duration = Duration::from_millis(250);
/// At most one socket list per this, however many losses ask for one.
const HEAL_SPACING: Duration = Duration::from_secs(1);
/// Most of one CPU the socket lists may take. A list costs the kernel a walk of its whole
/// established-socket hash for each namespace, empty buckets included (262,144 of them on the
/// 24 GiB test machines, ~1.9 ms), so its cost grows with namespaces × the host's memory, not
/// with sockets: 190 ms of CPU for 100 empty namespaces here, and ~8 times more per namespace on
/// a host with 8 times the memory. Lists are spaced so that they stay under this share.
const HEAL_CPU_SHARE: f64 = 0.01;
/// Most lists in a row asked for only to confirm suspects: a table that never settles costs
/// a few lists per interval, not one a second.
const MAX_CONFIRMING: u32 = 5;

/// How many lists in a row were asked for only to confirm the suspects of the one before.
#[derive(Debug, Default)]
pub(super) struct Confirming(u32);

impl Confirming {
    /// Whether to list again soon, after a list that healed `healed`: once to confirm a list's
    /// suspects, then only while confirming lists still heal something. A table that never
    /// settles then costs one list per interval until a list finds no suspect.
    ///
    /// Under churn every list has suspects that are no loss: sockets the dump saw that closed
    /// before the list was compared, which the next list no longer has. Confirming those
    /// until none were left took all five confirmations whenever churn began on a settled
    /// table: six dumps of every namespace where one was due, 90 ms each on the bench's host
    /// (redis churn, 75 s: 7 lists before, 4 now). A lost open or close is still confirmed,
    /// by the next list or the next interval's.
    pub(super) fn again(&mut self, healed: &Healed) -> bool {
        if !healed.pending {
            self.0 = 0;
            return false;
        }
        let progress = healed.closed + healed.adopted > 0;
        if self.0 < MAX_CONFIRMING && (self.0 == 0 || progress) {
            self.0 += 1;
            true
        } else {
            self.0 = MAX_CONFIRMING;
            false
        }
    }
}

impl Heal {
    pub(super) fn start(interval: Duration, netns: Option<u32>, stats: &Arc<AgentStats>) -> Heal {
        let mut heal = Heal {
            requests: None,
            lists: None,
            received: None,
            counters: stats.kernel.read(),
            checked: Instant::now(),
            confirming: Confirming::default(),
        };
        if interval.is_zero() {
            return heal;
        }
        let (requests, requested) = mpsc::sync_channel(1);
        let (send_list, lists) = mpsc::sync_channel(1);
        let stats = Arc::clone(stats);
        let spawned = std::thread::Builder::new()
            .name("heal".into())
            .spawn(move || heal_thread(interval, netns, &requested, &send_list, &stats));
        match spawned {
            Ok(_) => (heal.requests, heal.lists) = (Some(requests), Some(lists)),
            Err(err) => tracing::warn!("no healing of the connection table: {err}"),
        }
        heal
    }

    pub(super) fn request(&self) {
        if let Some(requests) = &self.requests {
            // Full: a list is already asked for.
            let _ = requests.try_send(());
        }
    }

    /// Kernel-side losses since the last check, as (ring full, runs skipped), at most every
    /// LOSS_CHECK.
    pub(super) fn kernel_losses(&mut self, stats: &AgentStats) -> Option<(u64, u64)> {
        if self.checked.elapsed() < LOSS_CHECK {
            return None;
        }
        self.checked = Instant::now();
        let now = stats.kernel.read();
        let lost = (
            now.ring_full.saturating_sub(self.counters.ring_full),
            now.missed.saturating_sub(self.counters.missed),
        );
        self.counters = now;
        (lost != (0, 0)).then_some(lost)
    }
}

/// Lists the kernel's sockets every `interval`, or sooner when asked, until the pipeline is
/// gone. Its own thread: a list of 60,000 sockets takes tens of milliseconds, which the drain
/// must not wait for. Lists are spaced by [`spacing`], so that they take at most
/// `HEAL_CPU_SHARE` of a CPU however many namespaces the host has.
fn heal_thread(
    interval: Duration,
    netns: Option<u32>,
    requested: &mpsc::Receiver<()>,
    lists: &mpsc::SyncSender<SocketList>,
    stats: &AgentStats,
) {
    let mut diag = SockDiag::default();
    let mut warned = false;
    let mut stretched = false;
    let mut wait = interval;
    loop {
        if let Err(mpsc::RecvTimeoutError::Disconnected) = requested.recv_timeout(wait) {
            return;
        }
        let started = Instant::now();
        let cpu_before = thread_cpu();
        let (list, errors) = diag.list(netns);
        let cpu = thread_cpu().saturating_sub(cpu_before);
        stats
            .heal_cpu_ns
            .fetch_add(cpu.as_nanos() as u64, Ordering::Relaxed);
        for err in &errors {
            if !warned {
                tracing::warn!("healing the connection table: {err}");
            } else {
                tracing::debug!("healing the connection table: {err}");
            }
        }
        warned |= !errors.is_empty();
        let gap = spacing(cpu);
        tracing::debug!(
            "listed {} sockets in {} namespaces in {:?} ({cpu:?} of CPU); next list in {gap:?} at the soonest",
            list.sockets.len(),
            list.netns.len(),
            started.elapsed(),
        );
        if gap > interval && !stretched {
            tracing::info!(
                "the kernel's socket list of {} namespaces took {cpu:?} of CPU: healing every \
                 {gap:?} instead of every {interval:?}, to keep it under {}% of a CPU",
                list.netns.len(),
                HEAL_CPU_SHARE * 100.0,
            );
        }
        stretched = gap > interval;
        if lists.send(list).is_err() {
            return;
        }
        std::thread::sleep(gap.saturating_sub(started.elapsed()));
        wait = (started + interval.max(gap)).saturating_duration_since(Instant::now());
    }
}

/// The least time from the start of a list that cost `cpu` to the start of the next one, asked
/// for or not: `HEAL_SPACING`, or longer when lists are dear enough to take more than
/// `HEAL_CPU_SHARE` of a CPU at that pace.
fn spacing(cpu: Duration) -> Duration {
    HEAL_SPACING.max(cpu.div_f64(HEAL_CPU_SHARE))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn healed(closed: u64, adopted: u64, pending: bool) -> Healed {
        Healed {
            closed,
            adopted,
            pending,
        }
    }

    #[test]
    fn a_list_with_suspects_is_confirmed_once_and_again_only_while_confirming_heals() {
        let mut confirming = Confirming::default();
        // Churn: suspects at every list, none of them a loss. One confirmation, then one list
        // per interval until a list finds no suspect.
        assert!(confirming.again(&healed(0, 0, true)));
        assert!(!confirming.again(&healed(0, 0, true)));
        assert!(!confirming.again(&healed(0, 0, true)));
        assert!(!confirming.again(&healed(0, 0, false)));
        // Settled: the next list with suspects is confirmed, and a confirming list that healed
        // something asks for another, up to the bound.
        assert!(confirming.again(&healed(0, 0, true)));
        for _ in 1..MAX_CONFIRMING {
            assert!(confirming.again(&healed(1, 0, true)));
        }
        assert!(!confirming.again(&healed(0, 1, true)));
    }

    #[test]
    fn lists_are_spaced_to_take_at_most_their_share_of_a_cpu() {
        // Cheap lists (a few namespaces): the usual spacing.
        assert_eq!(spacing(Duration::from_millis(7)), HEAL_SPACING);
        // 100 namespaces at ~1.9 ms each: 19 s between lists at the soonest.
        assert_eq!(spacing(Duration::from_millis(190)), Duration::from_secs(19));
        // Whatever the cost, a list and the gap after it keep to the share.
        for ms in [1, 10, 100, 1000, 10_000] {
            let cpu = Duration::from_millis(ms);
            assert!(cpu.as_secs_f64() / spacing(cpu).as_secs_f64() <= HEAL_CPU_SHARE + 1e-12);
        }
    }
}
