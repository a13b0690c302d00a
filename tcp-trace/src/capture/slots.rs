//! The agent's side of the socket slots (tcp-trace-ebpf/src/slots.rs): while nobody asks for
//! every transition, the kernel keeps a socket's open, handshake end and owner in a slot and
//! writes one record at its close. A connection that is still open is in no record, so the
//! agent adopts the slots before anything reads the table (a listing, GetStats, a scrape, a
//! heal) and about once a second: it takes each held slot's facts by the same
//! compare-and-swap the programs use, in the mapped array (no system call), frees the slot, and
//! applies the facts as the records they stand for. The socket's later records are then
//! written as without slots: its program finds the slot no longer its socket's.
//!
//! Adoption runs on the drain thread between two drains, so a socket's adopted facts are
//! applied after every record written before them and before every record written after.
use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use aya::{Ebpf, maps::MapData};
use tcp_trace_common::{Kept as Facts, slot};

use super::{
    CaptureConfig, CaptureError,
    decode::{DecodeError, Kept, Record},
    rings::Mapping,
};

/// Slots the agent gives the programs unless told otherwise: 1.75 MiB of kernel memory. A
/// socket holds its slot from its open to its close or the agent's adoption, at most about
/// [`ADOPT_EVERY`]: 16,384 leaves a slot free for most sockets at 100,000 opens a second.
pub const DEFAULT_SOCKET_SLOTS: u32 = 1 << 14;

/// The longest a held slot waits for adoption while nothing asks for one: how long a
/// connection that is still open may be missing from the open counters a trace keeps.
pub const ADOPT_EVERY: Duration = Duration::from_secs(1);

/// The slot arrays, mapped: the holders, and the facts.
pub(super) struct Slots {
    holders: Mapping,
    facts: Mapping,
    count: usize,
    last: Instant,
    requests: Arc<Requests>,
    /// Reused between adoptions.
    adopted: Vec<Result<Record, DecodeError>>,
    /// The requests the adoption under way answers.
    pending_answer: u64,
}

/// Adoptions asked for by other threads, and those done.
struct Requests {
    asked: AtomicU64,
    done: Mutex<u64>,
    adopted: Condvar,
    /// An eventfd the drain thread polls with its rings: a request wakes it.
    wake: OwnedFd,
}

/// Asks the drain thread for an adoption of every held slot, and waits for it.
#[derive(Clone)]
pub struct Adopter(Option<Arc<Requests>>);

impl Adopter {
    /// One that does nothing: no slots.
    pub fn none() -> Adopter {
        Adopter(None)
    }

    /// Returns once every socket that held a slot when called is in the table, or after
    /// `timeout` (false).
    pub fn adopt(&self, timeout: Duration) -> bool {
        let Some(requests) = &self.0 else {
            return true;
        };
        let target = requests.asked.fetch_add(1, Ordering::AcqRel) + 1;
        let one: u64 = 1;
        // SAFETY: an 8-byte write to the eventfd.
        unsafe { libc::write(requests.wake.as_raw_fd(), (&raw const one).cast(), 8) };
        let deadline = Instant::now() + timeout;
        let mut done = requests.done.lock().unwrap_or_else(|p| p.into_inner());
        while *done < target {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            done = requests
                .adopted
                .wait_timeout(done, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }
}

/// The slots to give the programs: `--socket-slots`, but none where the BTF state program
/// does not run (the classic one has none) or every transition is recorded (the programs then
/// never keep any).
pub(super) fn count(config: &CaptureConfig, btf_state: bool) -> Result<u32, CaptureError> {
    let count = if config.all_transitions || config.classic_tracepoint || !btf_state {
        0
    } else {
        config.socket_slots
    };
    if count != 0 && !count.is_power_of_two() {
        return Err(CaptureError::Slots(format!(
            "{count} socket slots: not a power of two"
        )));
    }
    Ok(count)
}

impl Slots {
    /// The loaded programs' `count` slots, mapped; None for none.
    pub(super) fn map(ebpf: &Ebpf, count: u32) -> Result<Option<Slots>, CaptureError> {
        if count == 0 {
            return Ok(None);
        }
        let array = |name: &'static str| match ebpf.map(name) {
            Some(aya::maps::Map::Array(data)) => Ok(data),
            _ => Err(CaptureError::Slots(format!("{name} is not an array"))),
        };
        Slots::new(array("SOCKET_SLOT_HOLDERS")?, array("SOCKET_SLOTS")?, count)
            .map(Some)
            .map_err(|err| CaptureError::Slots(format!("mapping the socket slots: {err}")))
    }

    /// Maps `count` slots of the programs' `SOCKET_SLOT_HOLDERS` and `SOCKET_SLOTS`.
    fn new(holders: &MapData, facts: &MapData, count: u32) -> io::Result<Slots> {
        let count = count as usize;
        let map = |data: &MapData, size: usize| {
            let fd = data.fd().as_fd().try_clone_to_owned()?;
            let page = 4096;
            let len = (count * size).div_ceil(page) * page;
            Mapping::new(&fd, len, libc::PROT_READ | libc::PROT_WRITE, 0)
        };
        let holders = map(holders, std::mem::size_of::<u64>())?;
        let facts = map(facts, std::mem::size_of::<Facts>())?;
        // SAFETY: a new eventfd, owned here.
        let wake = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if wake < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Slots {
            holders,
            facts,
            count,
            last: Instant::now(),
            requests: Arc::new(Requests {
                asked: AtomicU64::new(0),
                done: Mutex::new(0),
                adopted: Condvar::new(),
                // SAFETY: the fd just created.
                wake: unsafe { OwnedFd::from_raw_fd(wake) },
            }),
            adopted: Vec::new(),
            pending_answer: 0,
        })
    }

    pub(super) fn adopter(&self) -> Adopter {
        Adopter(Some(Arc::clone(&self.requests)))
    }

    /// The fd a request makes readable.
    pub(super) fn wake_fd(&self) -> RawFd {
        self.requests.wake.as_raw_fd()
    }

    /// Whether an adoption is due: asked for, or [`ADOPT_EVERY`] since the last.
    pub(super) fn due(&self) -> bool {
        let asked = self.requests.asked.load(Ordering::Acquire);
        asked > *self.requests.done.lock().unwrap_or_else(|p| p.into_inner())
            || self.last.elapsed() >= ADOPT_EVERY
    }

    /// Takes the facts of every held slot whose socket opened at or before `cut` (every
    /// record written before then has been handed on: a slot taken later may belong to a
    /// socket whose address an unread CLOSE still names). Hand them on, then call
    /// [`Slots::done`].
    pub(super) fn adopt(&mut self, cut: u64) -> &[Result<Record, DecodeError>] {
        let asked = self.requests.asked.load(Ordering::Acquire);
        self.adopted.clear();
        let holders = self.holders.ptr.as_ptr().cast::<u64>();
        let all_facts = self.facts.ptr.as_ptr().cast::<Facts>();
        for i in 0..self.count {
            // SAFETY: slot `i` of the mapped arrays; its holder is only changed atomically (by
            // the programs' CMPXCHG and this thread), and its facts only by whoever moved the
            // holder to BUSY.
            let (holder, facts) = unsafe {
                (
                    AtomicU64::from_ptr(holders.add(i)),
                    all_facts.add(i).cast_const(),
                )
            };
            let sock = holder.load(Ordering::Acquire);
            if sock <= slot::BUSY
                || unsafe { std::ptr::read_volatile(&raw const (*facts).opened_ns) } > cut
            {
                continue;
            }
            if holder
                .compare_exchange(sock, slot::BUSY, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
            {
                continue;
            }
            // SAFETY: the slot is this thread's until the store below.
            let facts = unsafe { std::ptr::read_volatile(facts) };
            holder.store(slot::FREE, Ordering::Release);
            self.adopted
                .push(Kept::new(sock, 0, facts).map(Record::Kept));
        }
        self.last = Instant::now();
        // Cleared before the requests are answered: one that comes after wakes the thread again.
        let mut count = 0u64;
        // SAFETY: an 8-byte read of the eventfd (non-blocking: nothing to read is fine).
        unsafe { libc::read(self.wake_fd(), (&raw mut count).cast(), 8) };
        self.pending_answer = asked;
        &self.adopted
    }

    /// The adopted facts are in the table: answers the requests made before the adoption.
    pub(super) fn done(&mut self) {
        let mut done = self.requests.done.lock().unwrap_or_else(|p| p.into_inner());
        *done = (*done).max(self.pending_answer);
        self.requests.adopted.notify_all();
    }
}
