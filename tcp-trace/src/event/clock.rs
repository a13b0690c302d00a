//! The kernel's clock on the wall: events carry the kernel's CLOCK_MONOTONIC timestamp and the
//! wall-clock time it stands for.
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Maps the kernel's CLOCK_MONOTONIC timestamps to wall-clock time.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// CLOCK_REALTIME - CLOCK_MONOTONIC, in nanoseconds.
    offset_ns: i128,
}

impl Clock {
    pub fn now() -> Clock {
        let real = clock_ns(libc::CLOCK_REALTIME);
        let mono = clock_ns(libc::CLOCK_MONOTONIC);
        Clock {
            offset_ns: real - mono,
        }
    }

    pub fn wall(&self, monotonic_ns: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.unix_ns(monotonic_ns))
    }

    /// `wall(monotonic_ns)` as a protobuf Timestamp, by arithmetic: going through SystemTime
    /// (and prost's conversion back from it) cost 3% of the agent's time with a subscriber,
    /// two timestamps per event.
    pub fn timestamp(&self, monotonic_ns: u64) -> prost_types::Timestamp {
        let ns = self.unix_ns(monotonic_ns);
        prost_types::Timestamp {
            seconds: (ns / 1_000_000_000) as i64,
            nanos: (ns % 1_000_000_000) as i32,
        }
    }

    /// Nanoseconds since the Unix epoch; 0 for a time before it.
    fn unix_ns(&self, monotonic_ns: u64) -> u64 {
        u64::try_from(i128::from(monotonic_ns) + self.offset_ns).unwrap_or(0)
    }
}

/// The CPU time the calling thread has used, user and system (work a system call does for it,
/// such as the kernel's walk of its socket hash in a sock_diag dump, counts).
pub fn thread_cpu() -> Duration {
    Duration::from_nanos(clock_ns(libc::CLOCK_THREAD_CPUTIME_ID) as u64)
}

pub fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and a valid out pointer.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    #[test]
    fn a_timestamp_is_what_prost_makes_of_the_wall_clock_time() {
        let clocks = [
            Clock::now(),
            Clock { offset_ns: 0 },
            Clock {
                offset_ns: -5_000_000_000,
            },
            Clock {
                offset_ns: 1_700_000_000_123_456_789,
            },
        ];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for clock in clocks {
            for i in 0..10_000u64 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let mono = match i % 4 {
                    0 => i,
                    1 => x >> 1,
                    2 => i * 999_999_999,
                    _ => x,
                };
                let expected: prost_types::Timestamp = clock.wall(mono).into();
                assert_eq!(clock.timestamp(mono), expected, "{mono} {clock:?}");
            }
        }
    }

    #[test]
    fn thread_cpu_counts_this_threads_work_only() {
        let before = thread_cpu();
        let slept = Instant::now();
        std::thread::sleep(Duration::from_millis(50));
        let asleep = thread_cpu() - before;
        assert!(slept.elapsed() >= Duration::from_millis(50));
        assert!(asleep < Duration::from_millis(25), "asleep: {asleep:?}");
        let spin = Instant::now();
        let mut x = 0u64;
        while spin.elapsed() < Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(
            thread_cpu() - before >= Duration::from_millis(20),
            "spun: {x}"
        );
    }
}
