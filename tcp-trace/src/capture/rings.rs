//! The kernel's rings of records, one per CPU, read and merged into one stream in time order.
//!
//! A program writes its record into the ring of the CPU it runs on (`RINGS` in the eBPF
//! object), so CPUs that write at once share no lock and no cache line. The price is order: a
//! socket's transitions can run on different CPUs (connect() on one, the SYN-ACK's softirq on
//! another), so the agent merges the rings by the records' kernel time (`bpf_ktime_get_ns`,
//! CLOCK_MONOTONIC), which orders the records of one socket: its transitions run one after the
//! other, each program done before the next transition begins.
//!
//! Merging by time is exact only for records that can no longer be overtaken. A drain notes the
//! time `t`, then reads every ring until it is empty. A record not yet read then was reserved
//! after its ring was read empty, so its time is later than `t` (a program reads the clock
//! after it reserves), or it was still being written and shows as busy. So when no ring was
//! busy, every record up to `t` has been read: those are handed on in time order, and the later
//! ones wait for the next drain (which is why a drain reads again while it finds records: each
//! complete pass moves `t` past what the one before read). A busy ring (a program on another
//! CPU between reserve and commit, for a few hundred nanoseconds) is read again; one that stays
//! busy, or a ring not read to the end because the drain took its share of it, holds the cut
//! back to shortly before its last record.
use std::{
    io,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd},
    ptr::NonNull,
    sync::atomic::{AtomicU32, AtomicUsize, Ordering},
};

use super::{
    decode::{self, DecodeError, Record},
    sockdiag::monotonic_ns,
};

/// A record read from a ring: its kernel time, and what it decoded to.
pub type Timed = (u64, Result<Record, DecodeError>);

/// How far before the last record read from a ring that could not be read to its end the cut
/// is held: longer than a program can be kept between reserving its record and reading the
/// clock by the softirqs that interrupt it (whose own records then come first in the ring).
const OVERTAKE_NS: u64 = 5_000_000;

/// Most passes over the rings in one drain.
const PASSES: usize = 3;

/// Fewest records a drain reads from each ring before it moves on to the next.
const MIN_SHARE: usize = 1024;

/// Reads of a busy ring before the drain gives up on it.
const BUSY_RETRIES: usize = 64;

pub struct Rings {
    rings: Vec<Ring>,
    /// Records read but later than the last cut, in the order they were read.
    pending: Vec<Timed>,
    /// The last cut: every record up to it was handed on.
    cut: u64,
    /// This drain's records, held ones first, then as read ring after ring.
    read: Vec<Timed>,
    /// (time, index in `read`): sorted, the order they are handed on in. Sorting these rather
    /// than the records moves 16 bytes a record instead of the whole record.
    order: Vec<(u64, u32)>,
    /// Where each block of `read` ends: the held records, then each ring's records of each
    /// pass. A block is in time order but for the few records an interrupt put out of it.
    blocks: Vec<usize>,
    /// Records read from each ring this drain.
    taken: Vec<usize>,
}

impl Rings {
    /// Creates one ring of `bytes` for each of `cpus` CPUs. Each returned file descriptor goes
    /// into the programs' `RINGS` at its CPU's index.
    pub fn create(cpus: usize, bytes: u32) -> io::Result<Rings> {
        let rings = (0..cpus)
            .map(|cpu| Ring::create(cpu, bytes))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Rings {
            rings,
            pending: Vec::new(),
            cut: 0,
            read: Vec::new(),
            order: Vec::new(),
            blocks: Vec::new(),
            taken: Vec::new(),
        })
    }

    pub fn fds(&self) -> impl Iterator<Item = RawFd> + '_ {
        self.rings.iter().map(|r| r.fd.as_raw_fd())
    }

    pub fn map_fds(&self) -> impl Iterator<Item = std::os::fd::BorrowedFd<'_>> {
        self.rings.iter().map(|r| r.fd.as_fd())
    }

    /// The last cut (CLOCK_MONOTONIC): every record the programs wrote up to it was handed on.
    /// Behind the present while the agent is behind the programs: rings read only in part.
    pub fn cut(&self) -> u64 {
        self.cut
    }

    /// Records read and held for a later drain.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Reads the rings (about `max` records at most, and at least a share of each) and returns, in time order, every record
    /// that nothing unread can precede; `flush` returns everything read (at a stop).
    ///
    /// `amend` sees each record once, as it is read. The records are lent, not copied: they
    /// are 160 bytes each, and a copy per record was a measurable part of the agent's work.
    pub fn drain(
        &mut self,
        max: usize,
        flush: bool,
        mut amend: impl FnMut(&mut Result<Record, DecodeError>),
    ) -> impl ExactSizeIterator<Item = &Result<Record, DecodeError>> + '_ {
        self.read.clear();
        self.read.append(&mut self.pending);
        self.blocks.clear();
        let held = self.read.len();
        self.blocks.push(held);
        let mut cut = self.read_rings(max);
        for (_, record) in &mut self.read[held..] {
            amend(record);
        }
        if flush {
            cut = u64::MAX;
        }
        let ready = order(&self.read, &self.blocks, &mut self.order, cut);
        for &(_, i) in &self.order[ready..] {
            self.pending.push(self.read[i as usize]);
        }
        self.cut = self.cut.max(cut.min(u64::MAX - 1));
        let read = &self.read;
        self.order[..ready]
            .iter()
            .map(move |&(_, i)| &read[i as usize].1)
    }

    /// Reads every ring into `read`; returns the cut: a time up to which every record written
    /// has been read.
    ///
    /// A pass that reads every ring to its end proves its start time a cut. The records it read
    /// were mostly written before it began, and those written during it are later than that
    /// time and would wait for the next drain; so while a pass reads anything, another pass
    /// follows (up to [`PASSES`]), whose start is a later cut, and a trickle's records go out
    /// in the drain that read them.
    fn read_rings(&mut self, max: usize) -> u64 {
        let read = &mut self.read;
        let count = self.rings.len();
        // Every ring gets its share of each drain: a ring left unread would hold the cut back
        // to its last record read, and the records held would pile up behind it.
        let share = (max / count.max(1)).max(MIN_SHARE);
        self.taken.clear();
        self.taken.resize(count, 0);
        let mut cut = None;
        for _ in 0..PASSES {
            let start = monotonic_ns();
            let mut read_any = false;
            let mut held_back = u64::MAX;
            for (ring, taken) in self.rings.iter_mut().zip(self.taken.iter_mut()) {
                let mut retries = 0;
                let complete = loop {
                    if *taken >= share {
                        break false;
                    }
                    match ring.next(read) {
                        Next::Read => {
                            *taken += 1;
                            read_any = true;
                        }
                        Next::Empty => break true,
                        Next::Busy if retries < BUSY_RETRIES => {
                            retries += 1;
                            std::hint::spin_loop();
                        }
                        Next::Busy => break false,
                    }
                };
                if !complete {
                    // Its unread records were reserved after its last read one: none is older
                    // than that one's time, but for what interrupted its program meanwhile.
                    held_back = held_back.min(ring.last_ts.saturating_sub(OVERTAKE_NS));
                }
                if self.blocks.last() != Some(&read.len()) {
                    self.blocks.push(read.len());
                }
            }
            if held_back != u64::MAX {
                // This pass proves nothing; an earlier complete one still does.
                cut = cut.or(Some(start.min(held_back)));
                break;
            }
            cut = Some(start);
            if !read_any {
                break;
            }
        }
        cut.unwrap_or(self.cut).max(self.cut)
    }
}

/// Fills `order` with (time, index) of the records of `read`, sorted by time (ties in the order
/// read); returns how many are at or before `cut`. `blocks` are where runs of `read` that are
/// nearly in time order end (any split sorts the same, only slower).
///
/// Each block is put in order by insertion, which costs little more than a pass for records
/// out of place by a few; the sorted blocks are then runs the standard library's stable sort
/// finds and merges: 12 ns a record against 25 to 40 for sorting the whole at 1,000 to 16,000
/// records from two rings; in the always-on agent, sort and drain went from 10.7% of its CPU
/// samples to 5.9% (docs/benchmarks.md, 23:35).
fn order(read: &[Timed], blocks: &[usize], order: &mut Vec<(u64, u32)>, cut: u64) -> usize {
    order.clear();
    order.extend(read.iter().enumerate().map(|(i, (ts, _))| (*ts, i as u32)));
    let mut start = 0;
    for &end in blocks.iter().chain([&order.len()]) {
        let end = end.min(order.len());
        insertion_sort(&mut order[start.min(end)..end]);
        start = end;
    }
    order.sort();
    order.partition_point(|(ts, _)| *ts <= cut)
}

/// Sorts a slice that is nearly sorted in time proportional to its length and the records out
/// of place.
fn insertion_sort(run: &mut [(u64, u32)]) {
    for i in 1..run.len() {
        let item = run[i];
        let mut j = i;
        while j > 0 && run[j - 1] > item {
            run[j] = run[j - 1];
            j -= 1;
        }
        run[j] = item;
    }
}

enum Next {
    Read,
    Empty,
    Busy,
}

/// One BPF ring buffer map, mapped for reading (the layout of kernel/bpf/ringbuf.c: a consumer
/// page the reader writes its position to, then a producer page and the data pages, mapped
/// twice in a row so that a record never wraps).
struct Ring {
    fd: OwnedFd,
    consumer: Mapping,
    producer: Mapping,
    page: usize,
    mask: usize,
    /// The reader's position (bytes ever consumed).
    pos: usize,
    /// The kernel time of the last record read.
    last_ts: u64,
}

const HEADER: usize = 8;
const BUSY: u32 = 1 << 31;
const DISCARD: u32 = 1 << 30;
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_TYPE_RINGBUF: u32 = 27;

impl Ring {
    fn create(cpu: usize, bytes: u32) -> io::Result<Ring> {
        // union bpf_attr for BPF_MAP_CREATE: map_type, key_size, value_size, max_entries,
        // map_flags, inner_map_fd, numa_node, map_name[16]; the rest zero.
        let mut attr = [0u8; 72];
        attr[0..4].copy_from_slice(&BPF_MAP_TYPE_RINGBUF.to_ne_bytes());
        attr[12..16].copy_from_slice(&bytes.to_ne_bytes());
        let name = format!("tcptrace_cpu{cpu}");
        let name = &name.as_bytes()[..name.len().min(15)];
        attr[28..28 + name.len()].copy_from_slice(name);
        // SAFETY: a valid bpf_attr of the size passed.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_CREATE,
                attr.as_ptr(),
                attr.len() as libc::c_uint,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned this descriptor to us alone.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let size = bytes as usize;
        let consumer = Mapping::new(&fd, page, libc::PROT_READ | libc::PROT_WRITE, 0)?;
        let producer = Mapping::new(&fd, page + 2 * size, libc::PROT_READ, page)?;
        Ok(Ring {
            fd,
            consumer,
            producer,
            page,
            mask: size - 1,
            pos: 0,
            last_ts: 0,
        })
    }

    fn consumer_pos(&self) -> &AtomicUsize {
        // SAFETY: the consumer page starts with the kernel's consumer_pos, an aligned word.
        unsafe { self.consumer.ptr.cast::<AtomicUsize>().as_ref() }
    }

    fn producer_pos(&self) -> usize {
        // SAFETY: the producer page starts with producer_pos; the kernel writes it with release.
        unsafe { self.producer.ptr.cast::<AtomicUsize>().as_ref() }.load(Ordering::Acquire)
    }

    /// Reads the next record into `out` (its header's time and its decoding).
    fn next(&mut self, out: &mut Vec<Timed>) -> Next {
        loop {
            if self.pos == self.producer_pos() {
                return Next::Empty;
            }
            let offset = self.pos & self.mask;
            // SAFETY: offset < size, within the first copy of the data pages.
            let data = unsafe { self.producer.ptr.as_ptr().add(self.page + offset) };
            // SAFETY: the record header is an aligned u32 the kernel commits with xchg.
            let header = unsafe { &*data.cast::<AtomicU32>() }.load(Ordering::Acquire);
            if header & BUSY != 0 {
                return Next::Busy;
            }
            let len = (header & !(BUSY | DISCARD)) as usize;
            let discarded = header & DISCARD != 0;
            if !discarded {
                // SAFETY: a committed record of len bytes after its header; the double mapping
                // keeps it contiguous.
                let bytes = unsafe { std::slice::from_raw_parts(data.add(HEADER), len) };
                let ts = record_time(bytes);
                self.last_ts = self.last_ts.max(ts);
                out.push((ts, decode::decode(bytes)));
            }
            self.pos += (HEADER + len).next_multiple_of(8);
            // The kernel pairs this with an acquire load before it reuses the space.
            self.consumer_pos().store(self.pos, Ordering::Release);
            if !discarded {
                return Next::Read;
            }
        }
    }
}

/// The kernel time in a record's header (kind u32, cpu u32, ts_ns u64); 0 for a record too
/// short to have one (its decoding says why).
fn record_time(bytes: &[u8]) -> u64 {
    bytes
        .get(8..16)
        .map_or(0, |b| u64::from_ne_bytes(b.try_into().expect("8 bytes")))
}

pub(super) struct Mapping {
    pub(super) ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; access goes through atomics and reads.
unsafe impl Send for Mapping {}

impl Mapping {
    pub(super) fn new(
        fd: &OwnedFd,
        len: usize,
        prot: libc::c_int,
        offset: usize,
    ) -> io::Result<Mapping> {
        // SAFETY: a fresh shared mapping of a ring buffer map's fd, at the kernel's layout.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping {
            ptr: NonNull::new(ptr.cast()).expect("mmap succeeded"),
            len,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping what new() mapped.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in record, told apart by its number.
    fn timed(ts: u64, id: usize) -> Timed {
        (ts, Err(DecodeError::Short(id)))
    }

    /// The ids of the records handed on, and of those held.
    fn split(read: &[Timed], blocks: &[usize], cut: u64) -> (Vec<usize>, Vec<usize>) {
        let mut sorted = Vec::new();
        let ready = order(read, blocks, &mut sorted, cut);
        let id = |&(_, i): &(u64, u32)| match read[i as usize].1 {
            Err(DecodeError::Short(id)) => id,
            ref other => panic!("{other:?}"),
        };
        (
            sorted[..ready].iter().map(id).collect(),
            sorted[ready..].iter().map(id).collect(),
        )
    }

    #[test]
    fn rings_merge_in_time_order_and_later_records_wait_for_the_next_cut() {
        // Two rings read one after the other: CPU 0's records, then CPU 1's.
        let read = [
            timed(10, 1),
            timed(30, 3),
            timed(55, 5),
            timed(20, 2),
            timed(40, 4),
        ];
        assert_eq!(split(&read, &[0, 3, 5], 45), (vec![1, 2, 3, 4], vec![5]));
        // The next drain: the held record first, then one read since that is older (written
        // meanwhile on a CPU whose ring was read before it was), then a newer one.
        let read = [timed(55, 5), timed(60, 6), timed(50, 7)];
        assert_eq!(split(&read, &[1, 2, 3], 70), (vec![7, 5, 6], vec![]));
    }

    #[test]
    fn records_of_the_same_time_keep_the_order_they_were_read_in() {
        let read = [timed(5, 1), timed(5, 2), timed(5, 3)];
        assert_eq!(split(&read, &[3], 5), (vec![1, 2, 3], vec![]));
    }

    #[test]
    fn any_blocks_sort_the_same_as_a_whole_sort() {
        // Four rings' blocks, each in time order but for records an interrupt put out of place,
        // split where the drain splits them, nowhere, and at arbitrary points.
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut read = Vec::new();
        let mut ends = Vec::new();
        for ring in 0..4 {
            let mut ts = 1_000 + ring;
            for _ in 0..(500 + next() % 500) {
                ts += next() % 50;
                let out_of_place = next() % 20 == 0;
                read.push(timed(if out_of_place { ts - 60 } else { ts }, read.len()));
            }
            ends.push(read.len());
        }
        let whole: Vec<usize> = {
            let mut ids: Vec<(u64, usize)> = read
                .iter()
                .map(|(ts, r)| match r {
                    Err(DecodeError::Short(id)) => (*ts, *id),
                    other => panic!("{other:?}"),
                })
                .collect();
            ids.sort_unstable();
            ids.into_iter().map(|(_, id)| id).collect()
        };
        let cut = u64::MAX;
        let arbitrary = [7, 7, 400, 1_999, read.len() + 5];
        for blocks in [&ends[..], &[], &arbitrary[..]] {
            assert_eq!(split(&read, blocks, cut).0, whole, "blocks {blocks:?}");
        }
    }
}
